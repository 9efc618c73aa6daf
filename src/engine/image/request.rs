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
use crate::engine::format::entry::{Cluster, L2Entry};
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
    /// written contiguously. Linked into the L2 tables by `finish_write`.
    Allocate {
        host_offset: u64,
        guest_cluster: u64,
        clusters: u64,
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
    pub pieces: Vec<WritePiece>,
    ticket: Ticket,
}

/// Guest clusters `[start, end)` whose allocation is in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::engine) struct InflightAlloc {
    pub(in crate::engine) start: u64,
    pub(in crate::engine) end: u64,
}

impl<S: Storage> Image<S> {
    fn take_ticket(&mut self) -> Ticket {
        let epoch = self.io_epoch;
        match self.inflight_tickets.back_mut() {
            Some((e, count)) if *e == epoch => *count += 1,
            _ => self.inflight_tickets.push_back((epoch, 1)),
        }
        Ticket { epoch }
    }

    fn return_ticket(&mut self, ticket: Ticket) {
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
        let mut pieces = Vec::new();
        let mut names_host_clusters = false;
        let mut done = 0;
        while done < len {
            let offset = guest_offset + done;
            let in_cluster = offset & (self.cluster_size() - 1);
            let (cluster, run) = self.lookup_run(offset, len - done)?;
            let source = match cluster {
                Cluster::Unallocated => ReadSource::Backing {
                    guest_offset: offset,
                },
                Cluster::Zero { .. } => ReadSource::Zeros,
                Cluster::Data { host_offset, .. } => ReadSource::Data {
                    host_offset: host_offset + in_cluster,
                },
                Cluster::Compressed {
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
        Ok(ReadPlan { pieces, ticket })
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
        if self.write_conflicts(guest_offset, len) || self.commit_pending() {
            return Ok(None);
        }
        let mut pieces = Vec::new();
        let result = self.plan_write_pieces(guest_offset, len, &mut pieces);
        let ticket = self.take_ticket();
        self.write_plans_in_flight += 1;
        let plan = WritePlan { pieces, ticket };
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
            match self.cluster_at(guest_cluster)? {
                Cluster::Data {
                    host_offset,
                    copied: true,
                } if self.may_overwrite_data(host_offset) => {
                    // In place, over as many following clusters as are contiguous in the file.
                    if self.data_file.is_none() {
                        self.check_data_target(host_offset)?;
                    }
                    let mut stop = cluster_end.min(end);
                    let mut next_host = host_offset + cluster_size;
                    while stop < end {
                        let next = self.cluster_at(stop >> self.cluster_bits)?;
                        if next
                            != (Cluster::Data {
                                host_offset: next_host,
                                copied: true,
                            })
                            || !self.may_overwrite_data(next_host)
                        {
                            break;
                        }
                        if self.data_file.is_none() {
                            self.check_data_target(next_host)?;
                        }
                        stop = (stop + cluster_size).min(end);
                        next_host += cluster_size;
                    }
                    pieces.push(WritePiece::InPlace {
                        host_offset: host_offset + in_cluster,
                        req_at,
                        len: (stop - at) as usize,
                    });
                    at = stop;
                }
                Cluster::Zero {
                    host_offset,
                    copied: true,
                } if host_offset != 0
                    && self.data_file.is_none()
                    && self.may_overwrite(host_offset) =>
                {
                    // A preallocated zero cluster that is ours alone: written whole, in place.
                    self.check_data_target(host_offset)?;
                    let stop = cluster_end.min(end);
                    self.inflight_allocs.push(InflightAlloc {
                        start: guest_cluster,
                        end: guest_cluster + 1,
                    });
                    pieces.push(WritePiece::Allocate {
                        host_offset,
                        guest_cluster,
                        clusters: 1,
                        req_at,
                        len: (stop - at) as usize,
                        head: CowFill {
                            len: in_cluster as usize,
                            source: CowSource::Zeros,
                            over_hole: false,
                        },
                        tail: CowFill {
                            len: (cluster_end - stop) as usize,
                            source: CowSource::Zeros,
                            over_hole: false,
                        },
                        reused: true,
                        // The preallocated cluster holds stale bytes behind its zero flag.
                        needs_order: true,
                    });
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
                    let growable = self.storage.is_growable();
                    let is_hole = |host: u64| growable && (from_reserve || host >= unwritten_from);
                    self.inflight_allocs.push(InflightAlloc {
                        start: guest_cluster,
                        end: guest_cluster + clusters,
                    });
                    let run_end = (guest_cluster + clusters) << self.cluster_bits;
                    let stop = run_end.min(end);
                    let head = self
                        .cow_fill(first_state, guest_cluster, 0, in_cluster)?
                        .over_hole(is_hole(host_offset));
                    let tail_len = run_end - stop;
                    let tail = if tail_len == 0 {
                        CowFill::NONE
                    } else {
                        let last = guest_cluster + clusters - 1;
                        let last_state = if clusters == 1 {
                            first_state
                        } else {
                            self.cluster_at(last)?
                        };
                        let last_host = host_offset + ((clusters - 1) << self.cluster_bits);
                        self.cow_fill(last_state, last, cluster_size - tail_len, tail_len)?
                            .over_hole(is_hole(last_host))
                    };
                    pieces.push(WritePiece::Allocate {
                        host_offset,
                        guest_cluster,
                        clusters,
                        req_at,
                        len: (stop - at) as usize,
                        head,
                        tail,
                        reused: false,
                        needs_order: !(from_reserve && zeros_before),
                    });
                    at = stop;
                }
            }
        }
        Ok(())
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
        let source = match state {
            Cluster::Unallocated => CowSource::Backing {
                guest_offset: (guest_cluster << self.cluster_bits) + from,
            },
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
                let (linked, outcome) = if result.is_ok() {
                    self.link_clusters(guest_cluster, clusters, host_offset, reused)
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
    /// `host_offset` on. Returns how many were linked, and the error that stopped it.
    fn link_clusters(
        &mut self,
        guest_cluster: u64,
        clusters: u64,
        host_offset: u64,
        reused: bool,
    ) -> (u64, Result<()>) {
        for i in 0..clusters {
            let host = host_offset + (i << self.cluster_bits);
            if let Err(e) = self.link_cluster(guest_cluster + i, host, reused) {
                return (i, Err(e));
            }
        }
        (clusters, Ok(()))
    }

    fn link_cluster(&mut self, guest_cluster: u64, host_offset: u64, reused: bool) -> Result<()> {
        self.link_entry(guest_cluster, L2Entry::data_copied(host_offset), reused)
    }

    /// Sets the L2 entry of `guest_cluster` to `entry`, which names a host cluster allocated
    /// for it; unless that cluster was `reused` from the old entry, what the old entry named
    /// loses a reference (freed after the new entry is written, rule (d)).
    pub(in crate::engine) fn link_entry(
        &mut self,
        guest_cluster: u64,
        entry: L2Entry,
        reused: bool,
    ) -> Result<()> {
        let (l2_offset, l2_index) = self.l2_table_for_write(guest_cluster)?;
        let old = self.l2_entry(l2_offset, l2_index, guest_cluster)?;
        self.set_l2_entry(l2_offset, l2_index, entry)?;
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

    fn end_inflight_alloc(&mut self, start: u64, clusters: u64) {
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
            Cluster::Data { .. } | Cluster::Compressed { .. } => false,
        }
    }
}
