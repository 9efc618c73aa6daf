//! Guest requests in three steps, so that data I/O runs without the metadata lock:
//!
//! 1. plan ([`Image::plan_read`], [`Image::plan_write`]), under the lock: look the clusters up,
//!    allocate the new ones, and describe where every byte goes ([`ReadPlan`], [`WritePlan`]);
//! 2. the data step ([`crate::engine::image::dataio`]), without the lock: move the guest bytes;
//! 3. finish ([`Image::finish_read`], [`Image::finish_write`] or [`Image::abort_write`]), under
//!    the lock again: link the new clusters into their L2 tables, note what was written.
//!
//! Two guarantees make step 2 safe while other requests run:
//! - **No two allocations of one guest cluster.** A write plan that allocates records its guest
//!   clusters as in flight until it finishes. A write, write_zeroes or discard touching them
//!   must wait ([`Image::write_conflicts`]; `plan_write` answers `None`). So the second of two
//!   requests to a cluster being allocated sees the first one's cluster, and writes in place.
//! - **No reuse of a host cluster that in-flight I/O may touch.** Every plan that names host
//!   clusters holds a [`Ticket`] of the current I/O epoch. A host cluster freed in epoch `f`
//!   is reused only after a guest flush has ended that epoch *and* no ticket of an epoch up to
//!   `f` is outstanding (`Image::release_quarantine`). Without this, a read planned before a
//!   discard could return the data of the guest cluster that the freed cluster went to next.

use crate::engine::error::{Error, Result};
use crate::engine::format::entry::{
    Cluster, L2Entry, Subcluster, SubclusterBitmap, SubclusterState,
};
use crate::engine::image::discard::FreeKind;
use crate::engine::image::Image;
use crate::engine::storage::Storage;

/// Keeps freed host clusters from reuse while the plan that holds it is in flight. Returned
/// by `finish_read`/`finish_write`/`abort_write`; a plan dropped without finishing keeps its
/// epoch's freed clusters out of use for good (a leak, never a corruption).
#[derive(Debug)]
pub struct Ticket {
    epoch: u64,
}

/// Where one contiguous piece of a guest read comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadSource {
    /// Zeros (v3 zero clusters).
    Zeros,
    /// The backing file at this guest offset (zeros past its end, or when there is none).
    Backing { guest_offset: u64 },
    /// The image file at this host offset (contiguous for the whole piece).
    Data { host_offset: u64 },
    /// A compressed cluster: `read_len` bytes at `host_offset` hold it; the piece starts
    /// `offset_in_cluster` bytes into the decompressed cluster.
    Compressed {
        host_offset: u64,
        read_len: u64,
        offset_in_cluster: u64,
    },
}

/// `len` guest bytes from one source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadPiece {
    pub len: u64,
    pub source: ReadSource,
}

/// Where the bytes of a guest read are, in request order.
#[derive(Debug)]
pub struct ReadPlan {
    /// The guest offset of the request's first byte.
    pub guest_offset: u64,
    pub pieces: Vec<ReadPiece>,
    ticket: Option<Ticket>,
}

impl ReadPlan {
    /// Whether `finish_read` has something to release (the plan names host clusters). A plan
    /// that holds no ticket may simply be dropped.
    pub fn holds_ticket(&self) -> bool {
        self.ticket.is_some()
    }
}

/// Where the bytes of a copy-on-write fill (the part of a new cluster the request does not
/// cover) come from: the old content of that guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CowSource {
    Zeros,
    /// The backing file, at the guest offset of the fill's first byte.
    Backing {
        guest_offset: u64,
    },
    /// The old (shared) cluster, at the host offset of the fill's first byte.
    Data {
        host_offset: u64,
    },
    /// The old compressed cluster; the fill starts `offset_in_cluster` bytes into it.
    Compressed {
        host_offset: u64,
        read_len: u64,
        offset_in_cluster: u64,
    },
    /// The old content of a cluster with extended L2 entries whose subclusters differ over
    /// the fill: allocated ones from its host cluster (`host_offset` of the fill's first
    /// byte), zero ones as zeros, unallocated ones from the backing file (`guest_offset` of
    /// the fill's first byte), as `bitmap` says.
    Subclusters {
        guest_offset: u64,
        host_offset: u64,
        bitmap: SubclusterBitmap,
    },
}

/// `len` bytes of old content around the request's bytes in a new cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CowFill {
    pub len: usize,
    pub source: CowSource,
    /// The new host cluster reads as zeros here already: it lies past everything the file
    /// was ever written with (a hole, or past its end). A fill whose old content is zeros
    /// is then not written at all (the data step starts the write after the head, or ends
    /// it before the tail).
    pub over_hole: bool,
}

impl CowFill {
    pub(in crate::engine) const NONE: CowFill = CowFill {
        len: 0,
        source: CowSource::Zeros,
        over_hole: false,
    };

    fn over_hole(self, over_hole: bool) -> CowFill {
        CowFill { over_hole, ..self }
    }
}

/// One contiguous piece of a guest write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WritePiece {
    /// Request bytes `[req_at, req_at + len)` go in place at `host_offset`: the clusters are
    /// this image's alone (COPIED) and already referenced, so no metadata changes.
    InPlace {
        host_offset: u64,
        req_at: usize,
        len: usize,
    },
    /// `clusters` whole host clusters at `host_offset`, for guest clusters from
    /// `guest_cluster` on: `head`, then request bytes `[req_at, req_at + len)`, then `tail`,
    /// written contiguously from `head_start` bytes into the first one. Linked into the L2
    /// tables by `finish_write`.
    Allocate {
        host_offset: u64,
        guest_cluster: u64,
        clusters: u64,
        /// Where the head starts in the first host cluster: 0 with standard L2 entries (a new
        /// cluster is written whole); with extended ones the subclusters before it are not
        /// written and keep their state (unallocated, or zeros).
        head_start: usize,
        req_at: usize,
        len: usize,
        head: CowFill,
        tail: CowFill,
        /// The host cluster is a preallocated zero cluster of this guest cluster, reused:
        /// nothing was allocated and nothing is freed.
        reused: bool,
        /// The data must be ordered before the L2 entries naming it (rule (a) of
        /// `writeback.rs`): false only for reserved clusters replacing clusters that read as
        /// zeros.
        needs_order: bool,
    },
}

/// Where the bytes of a guest write go, in request order.
#[derive(Debug)]
pub struct WritePlan {
    /// The guest offset of the request's first byte.
    pub guest_offset: u64,
    pub pieces: Vec<WritePiece>,
    ticket: Ticket,
}

/// A host cluster its guest cluster names already, written again around a request: a
/// preallocated zero cluster, or (extended L2 entries) one whose written subclusters are not
/// all allocated yet. `head` starts `head_start` bytes into it.
struct ReusedCluster {
    host_offset: u64,
    guest_cluster: u64,
    head_start: u64,
    head: CowFill,
    tail: CowFill,
}

/// Guest clusters `[start, end)` whose allocation is in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::engine) struct InflightAlloc {
    pub(in crate::engine) start: u64,
    pub(in crate::engine) end: u64,
}

impl<S: Storage> Image<S> {
    pub(in crate::engine) fn take_ticket(&mut self) -> Ticket {
        let epoch = self.io_epoch;
        match self.inflight_tickets.back_mut() {
            Some((e, count)) if *e == epoch => *count += 1,
            _ => self.inflight_tickets.push_back((epoch, 1)),
        }
        Ticket { epoch }
    }

    pub(in crate::engine) fn return_ticket(&mut self, ticket: Ticket) {
        if let Some((_, count)) = self
            .inflight_tickets
            .iter_mut()
            .find(|(e, _)| *e == ticket.epoch)
        {
            *count -= 1;
        }
        while self.inflight_tickets.front().is_some_and(|&(_, n)| n == 0) {
            self.inflight_tickets.pop_front();
        }
    }

    /// The oldest epoch with I/O in flight (the current one if none).
    pub(in crate::engine) fn oldest_inflight_epoch(&self) -> u64 {
        self.inflight_tickets
            .front()
            .map_or(self.io_epoch, |&(epoch, _)| epoch)
    }

    /// Bytes to read for a compressed cluster: what its descriptor covers, never past the end
    /// of the file nor more than a compressed cluster can take.
    pub(in crate::engine) fn compressed_read_len(
        &self,
        host_offset: u64,
        max_len_bytes: u64,
    ) -> u64 {
        let available = self.host_end.saturating_sub(host_offset);
        max_len_bytes
            .min(available)
            .min(2 * self.cluster_size() + 512)
    }

    /// Describes a guest read.
    pub fn plan_read(&mut self, guest_offset: u64, len: u64) -> Result<ReadPlan> {
        self.check_range(guest_offset, len)?;
        self.check_encrypted_request(guest_offset, len)?;
        let mut pieces = Vec::new();
        let mut names_host_clusters = false;
        let mut done = 0;
        while done < len {
            let offset = guest_offset + done;
            let in_cluster = offset & (self.cluster_size() - 1);
            let (cluster, run) = self.lookup_run(offset, len - done)?;
            let source = match cluster {
                Subcluster::Unallocated => ReadSource::Backing {
                    guest_offset: offset,
                },
                Subcluster::Zero { .. } => ReadSource::Zeros,
                Subcluster::Data { host_offset } => ReadSource::Data {
                    host_offset: host_offset + in_cluster,
                },
                Subcluster::Compressed {
                    host_offset,
                    max_len_bytes,
                } => ReadSource::Compressed {
                    host_offset,
                    read_len: self.compressed_read_len(host_offset, max_len_bytes),
                    offset_in_cluster: in_cluster,
                },
            };
            names_host_clusters |= matches!(
                source,
                ReadSource::Data { .. } | ReadSource::Compressed { .. }
            );
            pieces.push(ReadPiece { len: run, source });
            done += run;
        }
        let ticket = names_host_clusters.then(|| self.take_ticket());
        Ok(ReadPlan {
            guest_offset,
            pieces,
            ticket,
        })
    }

    /// Ends a read (whether its data step succeeded or not).
    pub fn finish_read(&mut self, plan: ReadPlan) {
        if let Some(ticket) = plan.ticket {
            self.return_ticket(ticket);
        }
    }

    /// Whether a write, write_zeroes or discard of this range must wait for an allocation in
    /// flight (see the module comment).
    pub fn write_conflicts(&self, guest_offset: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let first = guest_offset >> self.cluster_bits;
        let end = (guest_offset.saturating_add(len - 1) >> self.cluster_bits) + 1;
        self.inflight_allocs
            .iter()
            .any(|a| a.start < end && first < a.end)
    }

    /// Whether any allocation is in flight.
    pub fn has_writes_in_flight(&self) -> bool {
        !self.inflight_allocs.is_empty()
    }

    /// Whether any write plan is between `plan_write` and its finish or abort.
    pub fn has_write_plans_in_flight(&self) -> bool {
        self.write_plans_in_flight > 0
    }

    /// Describes a guest write and allocates the clusters it needs. `None`: the range overlaps
    /// an allocation in flight; wait for it to finish and plan again.
    pub fn plan_write(&mut self, guest_offset: u64, len: u64) -> Result<Option<WritePlan>> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_range(guest_offset, len)?;
        self.check_encrypted_request(guest_offset, len)?;
        if let Some(encryption) = &self.encryption {
            // Every byte written is encrypted: refused before anything is allocated.
            encryption.check_key()?;
        }
        if self.write_conflicts(guest_offset, len) || self.commit_pending() {
            return Ok(None);
        }
        let mut pieces = Vec::new();
        let result = self.plan_write_pieces(guest_offset, len, &mut pieces);
        let ticket = self.take_ticket();
        self.write_plans_in_flight += 1;
        let plan = WritePlan {
            guest_offset,
            pieces,
            ticket,
        };
        match result {
            Ok(()) => Ok(Some(plan)),
            Err(e) => {
                // Give back what was allocated before the failure.
                self.abort_write(plan);
                Err(e)
            }
        }
    }

    fn plan_write_pieces(
        &mut self,
        guest_offset: u64,
        len: u64,
        pieces: &mut Vec<WritePiece>,
    ) -> Result<()> {
        let cluster_size = self.cluster_size();
        let end = guest_offset + len;
        let mut at = guest_offset;
        while at < end {
            let guest_cluster = at >> self.cluster_bits;
            let in_cluster = at & (cluster_size - 1);
            let cluster_end = (guest_cluster + 1) << self.cluster_bits;
            let req_at = (at - guest_offset) as usize;
            let state = self.cluster_at(guest_cluster)?;
            let stop = cluster_end.min(end);
            if let Some(host_offset) = self.in_place_target(state, in_cluster, stop - at) {
                // In place, over as many following clusters as are contiguous in the file
                // (the image file's, or the data file's, which holds no metadata).
                if self.data_file.is_none() {
                    self.check_data_target(host_offset)?;
                }
                let mut stop = stop;
                let mut next_host = host_offset + cluster_size;
                while stop < end {
                    let next = self.cluster_at(stop >> self.cluster_bits)?;
                    let next_len = (end - stop).min(cluster_size);
                    if self.in_place_target(next, 0, next_len) != Some(next_host) {
                        break;
                    }
                    if self.data_file.is_none() {
                        self.check_data_target(next_host)?;
                    }
                    stop += next_len;
                    next_host += cluster_size;
                }
                pieces.push(WritePiece::InPlace {
                    host_offset: host_offset + in_cluster,
                    req_at,
                    len: (stop - at) as usize,
                });
                at = stop;
                continue;
            }
            match state {
                Cluster::Zero {
                    host_offset,
                    copied: true,
                } if host_offset != 0
                    && self.data_file.is_none()
                    && self.may_overwrite(host_offset) =>
                {
                    // A preallocated zero cluster that is ours alone: written whole, in place
                    // (it holds stale bytes behind its zero flag).
                    self.check_data_target(host_offset)?;
                    let zeros = |len: u64| CowFill {
                        len: len as usize,
                        source: CowSource::Zeros,
                        over_hole: false,
                    };
                    let reused = ReusedCluster {
                        host_offset,
                        guest_cluster,
                        head_start: 0,
                        head: zeros(in_cluster),
                        tail: zeros(cluster_end - stop),
                    };
                    pieces.push(self.reused_in_place(reused, req_at, (stop - at) as usize));
                    at = stop;
                }
                Cluster::Subclusters {
                    host_offset,
                    copied: true,
                    bitmap,
                } if host_offset != 0 && self.may_overwrite_data(host_offset) => {
                    // Ours alone, but some subclusters written are not allocated yet: written
                    // in place, each such subcluster at the ends filled whole from what it
                    // read as (zeros, or the backing file), as QEMU's qcow2 does; the bitmap
                    // changes, so the data is ordered before the entry (its host cluster
                    // holds stale bytes there).
                    self.check_data_target(host_offset)?;
                    let sc_bits = self.subcluster_bits();
                    let stop_in = stop - (guest_cluster << self.cluster_bits);
                    let (first_sc, end_sc) = self.subcluster_span(in_cluster, stop - at);
                    let allocated = |sc: u32| bitmap.state(sc) == SubclusterState::Allocated;
                    let head_start = if allocated(first_sc) {
                        in_cluster
                    } else {
                        u64::from(first_sc) << sc_bits
                    };
                    let tail_end = if allocated(end_sc - 1) {
                        stop_in
                    } else {
                        (u64::from(end_sc) << sc_bits).min(cluster_size)
                    };
                    let head =
                        self.cow_fill(state, guest_cluster, head_start, in_cluster - head_start)?;
                    let tail = self.cow_fill(state, guest_cluster, stop_in, tail_end - stop_in)?;
                    let reused = ReusedCluster {
                        host_offset,
                        guest_cluster,
                        head_start,
                        head,
                        tail,
                    };
                    pieces.push(self.reused_in_place(reused, req_at, (stop - at) as usize));
                    at = stop;
                }
                first_state if self.data_file.is_some() => {
                    let (piece, stop) =
                        self.plan_data_file_run(guest_cluster, first_state, at, end, req_at)?;
                    pieces.push(piece);
                    at = stop;
                }
                first_state => {
                    let last_cluster = (end - 1) >> self.cluster_bits;
                    let zeros_before = self.reads_as_zeros(first_state);
                    let mut wanted = 1;
                    while guest_cluster + wanted <= last_cluster {
                        let next = self.cluster_at(guest_cluster + wanted)?;
                        if !self.needs_new_cluster(next)
                            || self.reads_as_zeros(next) != zeros_before
                        {
                            break;
                        }
                        wanted += 1;
                    }
                    // The L2 table before the data clusters, as QEMU's qcow2 allocates them: a
                    // fresh image is laid out alike (tests and tools that know where QEMU puts
                    // the first tables find them there); finish_write links into it.
                    self.l2_table_for_write(guest_cluster)?;
                    // Placed and counted now, linked by finish_write once the data is written.
                    // Clusters that would extend the file come from the zero reserve; freed
                    // clusters in the middle of the file are reused first.
                    let from_reserve = self.next_allocation_extends_file()?;
                    let unwritten_from = self.host_end;
                    let (host_offset, clusters) = if from_reserve {
                        self.take_reserved(wanted)?
                    } else {
                        self.alloc_run(wanted)?
                    };
                    // A host cluster that reads as zeros needs no zeros written: a reserved
                    // one (`reserve.rs`: counted past everything in use, never written), or
                    // one at or past the end of everything allocated before this plan (the
                    // file never held bytes there: every write lies inside an allocation, and
                    // `host_end` covers every allocation). QEMU's qcow2 gets the same from
                    // the file with one write_zeroes per new cluster; here no call is made.
                    // Not on an encrypted image, where zeros are written as ciphertext like
                    // any data (`encryption.rs`).
                    let growable = self.storage.is_growable() && self.encryption.is_none();
                    let is_hole = |host: u64| growable && (from_reserve || host >= unwritten_from);
                    self.inflight_allocs.push(InflightAlloc {
                        start: guest_cluster,
                        end: guest_cluster + clusters,
                    });
                    let run_end = (guest_cluster + clusters) << self.cluster_bits;
                    let stop = run_end.min(end);
                    // What the new cluster takes of the old content around the request: the
                    // whole cluster with standard L2 entries; with extended ones the partial
                    // subclusters at the ends, and whatever the old host cluster holds.
                    let head_start = self.cow_start(first_state, in_cluster);
                    let head = self
                        .cow_fill(
                            first_state,
                            guest_cluster,
                            head_start,
                            in_cluster - head_start,
                        )?
                        .over_hole(is_hole(host_offset));
                    let last = guest_cluster + clusters - 1;
                    let last_state = if clusters == 1 {
                        first_state
                    } else {
                        self.cluster_at(last)?
                    };
                    let stop_in_last = stop - (last << self.cluster_bits);
                    let tail_end = self.cow_end(last_state, stop_in_last);
                    let last_host = host_offset + ((clusters - 1) << self.cluster_bits);
                    let tail = self
                        .cow_fill(last_state, last, stop_in_last, tail_end - stop_in_last)?
                        .over_hole(is_hole(last_host));
                    pieces.push(WritePiece::Allocate {
                        host_offset,
                        guest_cluster,
                        clusters,
                        head_start: head_start as usize,
                        req_at,
                        len: (stop - at) as usize,
                        head,
                        tail,
                        reused: false,
                        // An encrypted cluster that lost its data reads as noise, not zeros.
                        needs_order: !(from_reserve && zeros_before && self.encryption.is_none()),
                    });
                    at = stop;
                }
            }
        }
        Ok(())
    }

    /// A piece that writes request bytes `[req_at, req_at + len)` into the host cluster its
    /// guest cluster names already, with the fills of `reused` around them: the entry changes
    /// once the data is written (ordered after it, rule (a) of `writeback.rs`: the cluster
    /// holds stale bytes where the fills go), nothing is allocated or freed. The guest cluster
    /// counts as in flight until then.
    fn reused_in_place(&mut self, reused: ReusedCluster, req_at: usize, len: usize) -> WritePiece {
        let ReusedCluster {
            host_offset,
            guest_cluster,
            head_start,
            head,
            tail,
        } = reused;
        self.inflight_allocs.push(InflightAlloc {
            start: guest_cluster,
            end: guest_cluster + 1,
        });
        WritePiece::Allocate {
            host_offset,
            guest_cluster,
            clusters: 1,
            head_start: head_start as usize,
            req_at,
            len,
            head,
            tail,
            reused: true,
            needs_order: true,
        }
    }

    /// Where a write of `len` bytes at `in_cluster` of a cluster in `state` can go in place,
    /// changing no metadata: its host cluster, if the cluster is this image's alone and
    /// (with extended L2 entries) every subcluster written is allocated already.
    fn in_place_target(&self, state: Cluster, in_cluster: u64, len: u64) -> Option<u64> {
        match state {
            Cluster::Data {
                host_offset,
                copied: true,
            } if self.may_overwrite_data(host_offset) => Some(host_offset),
            Cluster::Subclusters {
                host_offset,
                copied: true,
                bitmap,
            } if host_offset != 0 && self.may_overwrite_data(host_offset) => {
                let (first, end) = self.subcluster_span(in_cluster, len);
                bitmap.all_allocated(first, end).then_some(host_offset)
            }
            _ => None,
        }
    }

    /// The subclusters `len` bytes (at least 1) at `in_cluster` touch: (first, one past the
    /// last).
    fn subcluster_span(&self, in_cluster: u64, len: u64) -> (u32, u32) {
        let sc_bits = self.subcluster_bits();
        let first = (in_cluster >> sc_bits) as u32;
        let last = ((in_cluster + len - 1) >> sc_bits) as u32;
        (first, last + 1)
    }

    /// Where a new cluster's copy of the old content starts, for a write starting at
    /// `in_cluster` of a cluster in `state`: the cluster's start with standard L2 entries
    /// (and for a compressed cluster); with extended ones the start of the subcluster
    /// written, or of the first allocated one of an old host cluster if that is earlier (the
    /// new cluster takes over all of the old one's data), as QEMU's qcow2 copies.
    fn cow_start(&self, state: Cluster, in_cluster: u64) -> u64 {
        let sc_bits = self.subcluster_bits();
        let sc = in_cluster >> sc_bits;
        match state {
            Cluster::Subclusters {
                host_offset,
                bitmap,
                ..
            } if host_offset != 0 => sc.min(u64::from(bitmap.first_allocated())) << sc_bits,
            Cluster::Subclusters { .. } | Cluster::Unallocated if self.has_subclusters() => {
                sc << sc_bits
            }
            _ => 0,
        }
    }

    /// Where a new cluster's copy of the old content ends, for a write ending at
    /// `end_in_cluster` (> 0) of a cluster in `state`: as [`Self::cow_start`], at the other
    /// end.
    fn cow_end(&self, state: Cluster, end_in_cluster: u64) -> u64 {
        let sc_bits = self.subcluster_bits();
        let sc_end = ((end_in_cluster - 1) >> sc_bits) + 1;
        match state {
            Cluster::Subclusters {
                host_offset,
                bitmap,
                ..
            } if host_offset != 0 => sc_end.max(u64::from(bitmap.allocated_end())) << sc_bits,
            Cluster::Subclusters { .. } | Cluster::Unallocated if self.has_subclusters() => {
                sc_end << sc_bits
            }
            _ => self.cluster_size(),
        }
    }

    /// The old content of bytes `[from, from + len)` of guest cluster `guest_cluster`, whose
    /// current state is `state`.
    pub(in crate::engine) fn cow_fill(
        &self,
        state: Cluster,
        guest_cluster: u64,
        from: u64,
        len: u64,
    ) -> Result<CowFill> {
        if len == 0 {
            return Ok(CowFill::NONE);
        }
        let guest_offset = (guest_cluster << self.cluster_bits) + from;
        let source = match state {
            Cluster::Unallocated => CowSource::Backing { guest_offset },
            Cluster::Zero { .. } => CowSource::Zeros,
            Cluster::Data { host_offset, .. } => CowSource::Data {
                host_offset: host_offset + from,
            },
            Cluster::Compressed {
                host_offset,
                max_len_bytes,
            } => CowSource::Compressed {
                host_offset,
                read_len: self.compressed_read_len(host_offset, max_len_bytes),
                offset_in_cluster: from,
            },
            Cluster::Subclusters {
                host_offset,
                bitmap,
                ..
            } => {
                let (first, end) = self.subcluster_span(from, len);
                match bitmap.run(first) {
                    (_, count) if first + count < end => CowSource::Subclusters {
                        guest_offset,
                        host_offset: host_offset + from,
                        bitmap,
                    },
                    (SubclusterState::Allocated, _) => CowSource::Data {
                        host_offset: host_offset + from,
                    },
                    (SubclusterState::Zero, _) => CowSource::Zeros,
                    (SubclusterState::Unallocated, _) => CowSource::Backing { guest_offset },
                }
            }
        };
        Ok(CowFill {
            len: len as usize,
            source,
            over_hole: false,
        })
    }

    /// Ends a write whose data step succeeded: links the new clusters into their L2 tables
    /// (the entries stay in the cache; `write_back` writes them after an ordering point, rule
    /// (a)) and releases the old clusters they replace (rule (d), through `pending_frees`).
    pub fn finish_write(&mut self, plan: WritePlan) -> Result<()> {
        let mut result = Ok(());
        for piece in &plan.pieces {
            self.counters.data_writes += 1;
            self.unflushed_writes = true;
            self.unbarriered_writes = true;
            if self.data_file.is_some() {
                self.data_unsynced = true;
            }
            let len = match *piece {
                WritePiece::InPlace { len, .. } | WritePiece::Allocate { len, .. } => len,
            };
            self.note_group_bytes(len as u64);
            if let WritePiece::Allocate {
                host_offset,
                guest_cluster,
                clusters,
                head_start,
                head,
                tail,
                reused,
                needs_order,
                ..
            } = *piece
            {
                // (a) This data write completed before the entries naming it change; unless
                // losing it shows zeros where the guest had zeros, the L2 write waits for an
                // ordering point after it.
                if needs_order {
                    self.unordered.data = true;
                }
                // The bytes the data step wrote, from the first cluster's start.
                let written = head_start as u64..(head_start + head.len + len + tail.len) as u64;
                let (linked, outcome) = if result.is_ok() {
                    self.link_clusters(guest_cluster, clusters, host_offset, reused, written)
                } else {
                    (0, Ok(()))
                };
                if linked < clusters && !reused {
                    let first_unlinked = host_offset + (linked << self.cluster_bits);
                    self.release_unlinked(first_unlinked, clusters - linked);
                }
                if result.is_ok() {
                    result = outcome;
                }
                self.end_inflight_alloc(guest_cluster, clusters);
            }
        }
        self.return_ticket(plan.ticket);
        self.write_plans_in_flight -= 1;
        result
    }

    /// Points guest clusters `[guest_cluster, +clusters)` at the host clusters from
    /// `host_offset` on; `written` is the byte range the data step wrote, counted from the
    /// first cluster's start (with extended L2 entries, its subclusters become allocated).
    /// Returns how many were linked, and the error that stopped it.
    fn link_clusters(
        &mut self,
        guest_cluster: u64,
        clusters: u64,
        host_offset: u64,
        reused: bool,
        written: std::ops::Range<u64>,
    ) -> (u64, Result<()>) {
        for i in 0..clusters {
            let start = i << self.cluster_bits;
            let end = start + self.cluster_size();
            let in_cluster = written.start.max(start) - start..written.end.min(end) - start;
            let host = host_offset + start;
            if let Err(e) = self.link_cluster(guest_cluster + i, host, reused, in_cluster) {
                return (i, Err(e));
            }
        }
        (clusters, Ok(()))
    }

    /// Links one guest cluster to `host_offset`, of which the data step wrote bytes
    /// `written` (with extended L2 entries: those subclusters become allocated, the others
    /// keep their state).
    fn link_cluster(
        &mut self,
        guest_cluster: u64,
        host_offset: u64,
        reused: bool,
        written: std::ops::Range<u64>,
    ) -> Result<()> {
        let bitmap = if self.has_subclusters() && !written.is_empty() {
            // A compressed cluster's bitmap is unused: it starts from nothing.
            let old = match self.cluster_at(guest_cluster)? {
                Cluster::Subclusters { bitmap, .. } => bitmap,
                _ => SubclusterBitmap::EMPTY,
            };
            let (first, end) = self.subcluster_span(written.start, written.end - written.start);
            old.with_allocated(first, end)
        } else {
            SubclusterBitmap::EMPTY
        };
        self.link_entry(
            guest_cluster,
            L2Entry::data_copied(host_offset),
            bitmap,
            reused,
        )
    }

    /// Sets the L2 entry of `guest_cluster` to `entry` (and, with extended L2 entries, its
    /// bitmap to `bitmap`), which names a host cluster allocated for it; unless that cluster
    /// was `reused` from the old entry, what the old entry named loses a reference (freed
    /// after the new entry is written, rule (d)).
    pub(in crate::engine) fn link_entry(
        &mut self,
        guest_cluster: u64,
        entry: L2Entry,
        bitmap: SubclusterBitmap,
        reused: bool,
    ) -> Result<()> {
        let (l2_offset, l2_index) = self.l2_table_for_write(guest_cluster)?;
        let old = self.l2_entry(l2_offset, l2_index, guest_cluster)?;
        self.set_l2_entry(l2_offset, l2_index, entry)?;
        if self.has_subclusters() {
            self.set_l2_bitmap(l2_offset, l2_index, bitmap)?;
        }
        if !reused {
            self.note_shared_release(old);
            let freed = self.host_clusters_of(old);
            self.free_later(freed, FreeKind::Never);
        }
        Ok(())
    }

    /// Ends a write whose data step failed: the clusters it allocated are given back (nothing
    /// references them), and nothing else changes.
    pub fn abort_write(&mut self, plan: WritePlan) {
        for piece in &plan.pieces {
            if let WritePiece::Allocate {
                host_offset,
                guest_cluster,
                clusters,
                reused,
                ..
            } = *piece
            {
                if !reused {
                    self.release_unlinked(host_offset, clusters);
                }
                self.end_inflight_alloc(guest_cluster, clusters);
            }
        }
        self.return_ticket(plan.ticket);
        self.write_plans_in_flight -= 1;
    }

    /// Drops the refcount of allocated clusters that no entry references. Any failure here
    /// leaves them counted: a leak, never a corruption.
    fn release_unlinked(&mut self, host_offset: u64, clusters: u64) {
        let first = host_offset >> self.cluster_bits;
        for cluster in first..first + clusters {
            if self.set_refcount(cluster, 0).is_ok() {
                self.quarantine.insert(cluster, self.io_epoch);
            }
        }
    }

    pub(in crate::engine) fn end_inflight_alloc(&mut self, start: u64, clusters: u64) {
        let done = InflightAlloc {
            start,
            end: start + clusters,
        };
        if let Some(i) = self.inflight_allocs.iter().position(|a| *a == done) {
            self.inflight_allocs.swap_remove(i);
        }
    }
}

impl<S: Storage> Image<S> {
    /// Whether a write to a guest cluster in this state needs a newly allocated host cluster:
    /// one this image does not own alone, or (in a transaction group) one the durable image
    /// names.
    fn needs_new_cluster(&self, state: Cluster) -> bool {
        match state {
            Cluster::Data {
                host_offset,
                copied: true,
            } => !self.may_overwrite_data(host_offset),
            Cluster::Subclusters {
                host_offset,
                copied: true,
                ..
            } if host_offset != 0 => !self.may_overwrite_data(host_offset),
            Cluster::Zero {
                host_offset,
                copied: true,
            } if host_offset != 0 => !self.may_overwrite(host_offset),
            _ => true,
        }
    }

    /// Whether a guest cluster in this state reads as zeros (what a crash that loses a write
    /// into a fresh reserved cluster would show).
    fn reads_as_zeros(&self, state: Cluster) -> bool {
        match state {
            Cluster::Unallocated => self.header.backing_file.is_none(),
            Cluster::Zero { .. } => true,
            Cluster::Subclusters {
                host_offset: 0,
                bitmap,
                ..
            } => self.header.backing_file.is_none() || bitmap.zeroes() == u32::MAX,
            Cluster::Data { .. } | Cluster::Compressed { .. } | Cluster::Subclusters { .. } => {
                false
            }
        }
    }
}
