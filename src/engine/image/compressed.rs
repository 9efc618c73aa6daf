//! Compressed writes, as QEMU 7.2's qcow2 makes them (`qemu-img convert -c`, `qemu-io write
//! -c`, backup jobs with `compress=on`): whole guest clusters (the disk's last one may be
//! short: it is padded with zeros), each compressed on its own ([`compress_cluster`]); a
//! cluster that does not compress below the cluster size is written as an ordinary cluster.
//!
//! Compressed data is packed at byte granularity (QEMU's `qcow2_alloc_bytes`): the next
//! compressed cluster starts where the last one ended (`Image::compressed_tail`), inside the
//! same host cluster while it fits, running on into the next host cluster when that is the
//! one the allocator hands out, else starting a new one. Each host cluster's refcount counts
//! every compressed cluster that touches it, so one freed compressed cluster
//! (`zeroes.rs`, `host_clusters_of`) drops exactly its own share.
//!
//! A compressed write never overwrites: QEMU's qcow2 refuses one over a cluster whose entry
//! names a host cluster (data, preallocated zeros, compressed) with EIO, and so does this
//! engine; unallocated clusters and zero clusters without a host cluster take one. So a
//! compressed write frees nothing, and rule (d) of `writeback.rs` has nothing to do here
//! (freeing a compressed cluster later, by a write, a discard or a zeroing, goes through the
//! ordinary paths).
//!
//! Write order (the rules of `writeback.rs`; the plan, data step and finish of `request.rs`):
//! 1. plan, under the lock: the L2 table made writable, the bytes allocated: refcounts
//!    incremented in the cache (a new host cluster counted once, the host cluster the tail
//!    lies in once more);
//! 2. data step, without the lock: the compressed bytes written at their host offset;
//! 3. finish, under the lock: the L2 entry set in the cache, and `unordered.data` noted.
//!
//! `Image::write_back` then writes the refcount blocks (stage 1), takes an ordering point,
//! and writes the L2 table (stage 3): (b) the increments are ordered before the entry, and
//! (a) the data too, always: lost compressed data decodes to garbage (or not at all), never
//! to the zeros a reserved cluster shows, so the reserve's exception of rule (a) never
//! applies. A crash before the entry is on storage leaves at worst counted, unreferenced
//! bytes (a leak).
//!
//! Transaction groups (`txg.rs`): a compressed write joins the open group like any write.
//! Its bytes go only into host clusters the group owns: the tail is used inside a group only
//! when its host cluster was allocated by the group, so nothing the durable image names is
//! written (not even the unused end of one of its host clusters); the entry and refcounts
//! change in the group's tables and appear with its commit. A commit waits for compressed
//! writes in flight as for any write plan. Committing first would cost two syncs per
//! compressed cluster for nothing: the group's copy-on-write rules hold for them as they are.

use crate::engine::debug_event::DebugEvent;
use crate::engine::error::{Error, Result};
use crate::engine::format::compress::compress_cluster;
use crate::engine::format::entry::{Cluster, L2Entry, SubclusterBitmap};
use crate::engine::image::overlap::MetadataMap;
use crate::engine::image::request::{InflightAlloc, Ticket};
use crate::engine::image::Image;
use crate::engine::storage::{Backing, Storage};

/// A planned compressed cluster: its bytes are allocated at `host_offset`; the data step
/// writes the `len_bytes` compressed bytes there, then [`Image::finish_compressed_write`]
/// links them (or [`Image::abort_compressed_write`] gives them back).
#[derive(Debug)]
pub struct CompressedWrite {
    /// The guest cluster's first byte.
    pub guest_offset: u64,
    /// Where the compressed bytes go (byte granular).
    pub host_offset: u64,
    pub len_bytes: u64,
    ticket: Ticket,
}

fn errno(context: String, errno: i32) -> Error {
    Error::io(context, std::io::Error::from_raw_os_error(errno))
}

impl<S: Storage> Image<S> {
    /// Whether a compressed write of `[guest_offset, +len)` is possible here, as QEMU's qcow2
    /// decides: whole clusters only (the last one of the disk may be short), EINVAL otherwise;
    /// not with an external data file (ENOTSUP, as QEMU); not on an encrypted image (ENOTSUP:
    /// QEMU 7.2's qcow2 would store the cluster unencrypted, which this engine refuses to do).
    pub fn check_compressed_write(&self, guest_offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.data_file.is_some() {
            return Err(Error::Unsupported(
                "compressed writes with an external data file".into(),
            ));
        }
        if self.encryption.is_some() {
            return Err(Error::Unsupported(
                "compressed writes to an encrypted image (QEMU's qcow2 would store the \
                 compressed clusters unencrypted)"
                    .into(),
            ));
        }
        self.check_range(guest_offset, len)?;
        let mask = self.cluster_size() - 1;
        let end = guest_offset + len;
        if guest_offset & mask != 0 || (end & mask != 0 && end != self.virtual_size()) {
            return Err(errno(
                format!(
                    "a compressed write of {len} bytes at {guest_offset:#x}: whole clusters only"
                ),
                libc::EINVAL,
            ));
        }
        Ok(())
    }

    /// Plans one compressed cluster of `len_bytes` (1 to cluster size - 1) compressed bytes
    /// for the guest cluster at `guest_offset` (step 1 of the module comment). `None`: the
    /// cluster has an allocation in flight (or a group commit waits); plan again once it
    /// finished. EIO when the cluster's entry names a host cluster already, as QEMU.
    pub fn plan_compressed_write(
        &mut self,
        guest_offset: u64,
        len_bytes: u64,
    ) -> Result<Option<CompressedWrite>> {
        let cluster_size = self.cluster_size();
        let in_disk = cluster_size.min(self.virtual_size().saturating_sub(guest_offset));
        self.check_compressed_write(guest_offset, in_disk)?;
        if len_bytes == 0 || len_bytes >= cluster_size {
            return Err(Error::Invalid(format!(
                "{len_bytes} compressed bytes for a cluster of {cluster_size}"
            )));
        }
        if self.write_conflicts(guest_offset, 1) || self.commit_pending() {
            return Ok(None);
        }
        let guest_cluster = guest_offset >> self.cluster_bits;
        let named = match self.cluster_at(guest_cluster)? {
            Cluster::Unallocated => None,
            Cluster::Zero { host_offset, .. } | Cluster::Subclusters { host_offset, .. } => {
                (host_offset != 0).then_some(host_offset)
            }
            Cluster::Data { host_offset, .. } | Cluster::Compressed { host_offset, .. } => {
                Some(host_offset)
            }
        };
        if let Some(host_offset) = named {
            return Err(errno(
                format!(
                    "a compressed write over guest cluster {guest_cluster}, which names host \
                     offset {host_offset:#x} (compression never overwrites, as with QEMU's \
                     qcow2)"
                ),
                libc::EIO,
            ));
        }
        // The L2 table first (allocated or copied), as QEMU's qcow2 takes it before the bytes.
        self.l2_table_for_write(guest_cluster)?;
        let host_offset = self.alloc_compressed_bytes(len_bytes)?;
        if let Some(what) = self
            .metadata
            .metadata_at(host_offset, host_offset + len_bytes)
        {
            self.release_compressed_bytes(host_offset, len_bytes);
            return Err(Error::Corrupt(format!(
                "compressed data at {host_offset:#x} would overlap {}",
                MetadataMap::definite(what)
            )));
        }
        self.inflight_allocs.push(InflightAlloc {
            start: guest_cluster,
            end: guest_cluster + 1,
        });
        self.write_plans_in_flight += 1;
        Ok(Some(CompressedWrite {
            guest_offset,
            host_offset,
            len_bytes,
            ticket: self.take_ticket(),
        }))
    }

    /// Ends a compressed write whose data step succeeded (step 3): the L2 entry names the
    /// bytes (in the cache; `write_back` orders it after the data and the refcounts).
    pub fn finish_compressed_write(&mut self, write: CompressedWrite) -> Result<()> {
        let guest_cluster = write.guest_offset >> self.cluster_bits;
        self.counters.data_writes += 1;
        self.unflushed_writes = true;
        self.unbarriered_writes = true;
        // (a) always: see the module comment.
        self.unordered.data = true;
        self.note_group_bytes(self.cluster_size());
        let linked = L2Entry::compressed(write.host_offset, write.len_bytes, self.cluster_bits)
            .and_then(|entry| {
                self.storage.debug_event(DebugEvent::L2UpdateCompressed);
                // The old entry names no host cluster (checked by the plan; the cluster was
                // in flight since): nothing is freed. A compressed entry's bitmap is 0.
                self.link_entry(guest_cluster, entry, SubclusterBitmap::EMPTY, false)
            });
        if linked.is_err() {
            self.release_compressed_bytes(write.host_offset, write.len_bytes);
        }
        self.end_compressed_write(write);
        linked
    }

    /// Ends a compressed write whose data step failed: its bytes are given back.
    pub fn abort_compressed_write(&mut self, write: CompressedWrite) {
        self.release_compressed_bytes(write.host_offset, write.len_bytes);
        self.end_compressed_write(write);
    }

    fn end_compressed_write(&mut self, write: CompressedWrite) {
        self.end_inflight_alloc(write.guest_offset >> self.cluster_bits, 1);
        self.return_ticket(write.ticket);
        self.write_plans_in_flight -= 1;
    }

    /// Writes `buf` (whole clusters at `guest_offset`, the disk's last one possibly short)
    /// compressed, cluster by cluster: plan, data step and finish in one call, as
    /// [`Image::write`] does for ordinary writes. Clusters that do not compress are written
    /// as ordinary clusters (reading `backing` for nothing: they are written whole).
    pub fn write_compressed(
        &mut self,
        guest_offset: u64,
        buf: &[u8],
        backing: Option<&dyn Backing>,
    ) -> Result<()> {
        self.check_compressed_write(guest_offset, buf.len() as u64)?;
        let cluster_size = self.cluster_size() as usize;
        for (i, chunk) in buf.chunks(cluster_size).enumerate() {
            let at = guest_offset + (i * cluster_size) as u64;
            let mut cluster = chunk.to_vec();
            cluster.resize(cluster_size, 0);
            let Some(packed) = compress_cluster(self.header.compression_type, &cluster)? else {
                self.write(at, chunk, backing)?;
                continue;
            };
            let Some(write) = self.plan_compressed_write(at, packed.len() as u64)? else {
                return Err(Error::Invalid(
                    "compressed write overlaps an allocation in flight; plan it again once \
                     that finishes"
                        .into(),
                ));
            };
            self.storage.debug_event(DebugEvent::WriteCompressed);
            match self.storage.write_at(write.host_offset, &packed) {
                Ok(()) => self.finish_compressed_write(write)?,
                Err(e) => {
                    let host_offset = write.host_offset;
                    self.abort_compressed_write(write);
                    return Err(Error::io(
                        format!("writing a compressed cluster at {host_offset:#x}"),
                        e,
                    ));
                }
            }
        }
        Ok(())
    }

    /// The end of a compressed stream (QEMU's compressed write of 0 bytes, which `qemu-img
    /// convert -c` sends last): the image file's length is made a multiple of 512 bytes, as
    /// QEMU's qcow2 does (compressed data may end it anywhere), for readers in sectors.
    pub fn end_compressed_stream(&mut self) -> Result<()> {
        if self.read_only || self.data_file.is_some() || !self.storage.is_growable() {
            return Ok(());
        }
        let len = self
            .storage
            .len()
            .map_err(|e| Error::io("getting the image file length", e))?;
        let aligned = len.next_multiple_of(512);
        if aligned != len {
            self.storage
                .set_len(aligned)
                .map_err(|e| Error::io("aligning the image file's end to a sector", e))?;
            self.host_end = self.host_end.max(aligned);
        }
        Ok(())
    }

    /// Allocates `len_bytes` (less than a cluster) for compressed data, as QEMU's
    /// `qcow2_alloc_bytes`: after the last compressed cluster if its host cluster has room
    /// (or if the next host cluster handed out follows it), else at the start of a new host
    /// cluster. Every host cluster the bytes touch gains one reference.
    fn alloc_compressed_bytes(&mut self, len_bytes: u64) -> Result<u64> {
        self.storage.debug_event(DebugEvent::ClusterAllocBytes);
        let cluster_size = self.cluster_size();
        let tail = match self.compressed_tail.take() {
            Some(tail) if self.compressed_tail_usable(tail)? => Some(tail),
            _ => None,
        };
        let room = tail.map_or(0, |t| cluster_size - (t & (cluster_size - 1)));
        let start = match tail {
            Some(t) if room >= len_bytes => {
                self.add_reference(t >> self.cluster_bits)?;
                t
            }
            _ => {
                // A new host cluster, counted once (from the zero reserve when it would
                // extend the file, as for ordinary clusters).
                let new = if self.next_allocation_extends_file()? {
                    self.take_reserved(1)?.0
                } else {
                    self.alloc_cluster()?
                };
                match tail {
                    // It follows the tail's cluster: the data runs on into it.
                    Some(t) if t.next_multiple_of(cluster_size) == new => {
                        if let Err(e) = self.add_reference(t >> self.cluster_bits) {
                            self.release_compressed_bytes(new, 1);
                            return Err(e);
                        }
                        t
                    }
                    _ => new,
                }
            }
        };
        let end = start + len_bytes;
        self.compressed_tail = (end & (cluster_size - 1) != 0).then_some(end);
        Ok(start)
    }

    /// Whether the next compressed cluster may go at `tail`: its host cluster still holds the
    /// compressed clusters written before (a free to refcount 0 forgets the tail, in
    /// `set_refcount`), may take one more reference (QEMU starts a new cluster at the
    /// refcount's maximum), and may be written (inside a transaction group: allocated by it).
    fn compressed_tail_usable(&mut self, tail: u64) -> Result<bool> {
        let cluster = tail >> self.cluster_bits;
        let refcount = self.refcount(cluster)?;
        Ok(refcount != 0
            && refcount < self.rc.max_refcount()
            && self.may_overwrite(cluster << self.cluster_bits))
    }

    fn add_reference(&mut self, cluster: u64) -> Result<()> {
        let refcount = self.refcount(cluster)?;
        self.set_refcount(cluster, refcount + 1)
    }

    /// Drops the reference of compressed bytes no entry names (a failed plan or data step)
    /// from every host cluster they touch, at once (nothing is ordered after nothing). Any
    /// failure leaves them counted: a leak, never a corruption.
    fn release_compressed_bytes(&mut self, host_offset: u64, len_bytes: u64) {
        let first = host_offset >> self.cluster_bits;
        let last = (host_offset + len_bytes.max(1) - 1) >> self.cluster_bits;
        for cluster in first..=last {
            let Ok(refcount) = self.refcount(cluster) else {
                continue;
            };
            if refcount > 0 && self.set_refcount(cluster, refcount - 1).is_ok() && refcount == 1 {
                self.quarantine.insert(cluster, self.io_epoch);
            }
        }
    }

    /// A host cluster dropped to refcount 0: the next compressed cluster no longer goes into
    /// it (it may be handed out for anything from now on).
    pub(in crate::engine) fn forget_compressed_tail_in(&mut self, cluster: u64) {
        if self
            .compressed_tail
            .is_some_and(|t| t >> self.cluster_bits == cluster)
        {
            self.compressed_tail = None;
        }
    }
}
