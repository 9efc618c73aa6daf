//! Metadata write-back: the one routine ([`Image::write_back`]) that writes dirty metadata to
//! storage, and the ordering points between its stages.
//!
//! The invariants it keeps, so that a crash at any moment leaves an image whose every
//! reference is valid (at worst a leaked cluster, never a refcount below its references) and
//! whose every guest sector holds what the guest wrote there or what it held before:
//! - (a) guest data is written before the L2 entry that points to it, unless the cluster is a
//!   reserved one replacing a cluster that read as zeros (`reserve.rs`: losing the data then
//!   shows the zeros the guest had) in an image without encryption (an encrypted cluster
//!   that lost its data decrypts to noise, `encryption.rs`);
//! - (b) refcount increments are written before the L2 or L1 entry that references the
//!   counted cluster (and a new refcount block before the refcount table entry naming it);
//!   reserved clusters were counted before they were handed out;
//! - (c) a new L2 table is written before the L1 entry that points to it, unless it lives in
//!   a reserved cluster and replaces nothing (a zero table reads as the unallocated range it
//!   replaces);
//! - (d) clusters freed are not reused before the next guest flush (they are quarantined by
//!   `apply_pending_frees` and released by `Image::flush`), and their refcount decrement is
//!   only written after the entries that dropped the reference;
//! - (e) a COPIED flag given back to an entry (stage 6: its cluster was named twice by the
//!   active table) is written only after the decrement that brought its refcount to one.
//!
//! Extended L2 entries (subclusters) change nothing in this order, only what counts as an L2
//! entry change. A write into subclusters of a host cluster the entry already names (not
//! allocated yet, or zero) sets their bits in the bitmap: an L2 entry change whose data may
//! not be lost first, since the host cluster holds stale bytes there, so rule (a) holds for
//! it as for a new cluster (`request.rs` marks such a write `needs_order`), and no refcount
//! changes. A new host cluster for a partial write leaves the subclusters it did not write
//! unallocated or zero in the same entry, written under rule (a) with the reserve exception
//! only where every subcluster it did write read as zeros before. Zeroing subclusters
//! changes their bits alone, like the zero flag: nothing to order it after; a cluster
//! unmapped whole is freed as any other (rule (d)). The bitmap is written with its entry
//! in stage 3 (one 16-byte slot, aligned, so inside one sector: a torn table write never
//! separates a descriptor from its bitmap).
//!
//! Compressed writes (`compressed.rs`) take bytes, not clusters: their refcount increments
//! (a new host cluster, and one more reference to the host cluster the last compressed cluster
//! ends in) go out in stage 1 and their L2 entries in stage 3 after an ordering point, as (b)
//! asks; their data always counts for (a) (`unordered.data`: lost compressed data decodes to
//! garbage, never to zeros, so no reserve exception). They never replace a host cluster, so
//! (d) has nothing to free for them; freeing a compressed cluster later drops one reference
//! from each host cluster it touches, in stage 5 as any free.
//!
//! An ordering point is the single method [`Image::ordering_point`]: a storage barrier
//! (`Storage::barrier`: BarrierFS's fdatabarrier, an epoch boundary of the ordered mode, or an
//! fdatasync in flush mode). Each stage takes one only when a write it depends on was issued
//! since the last one ([`Unordered`]), so a flush that only appended costs no ordering point
//! at all, and its one sync is the flush's own.

use crate::engine::debug_event::DebugEvent;
use crate::engine::error::{Error, Result};
use crate::engine::format::bytes;
use crate::engine::format::entry::{Cluster, EntryFlags, L1Entry, L2Entry, OFFSET_MASK};
use crate::engine::image::discard::FreeKind;
use crate::engine::image::Image;
use crate::engine::storage::Storage;

/// Writes issued since the last ordering point (or sync) that a later stage depends on.
#[derive(Clone, Copy, Debug, Default)]
pub(in crate::engine) struct Unordered {
    /// (a) Guest data in new clusters, where a crash keeping the new L2 entry without the
    /// data would show bytes the guest never wrote there.
    pub data: bool,
    /// (b) Refcount blocks or refcount table entries (increments, new blocks).
    pub refcounts: bool,
    /// (c) New L2 tables that would not read as unallocated if lost or torn (copies of a
    /// shared table, or tables outside the reserve).
    pub l2_tables: bool,
    /// (d) L2 tables or L1 entries, which may have dropped references to clusters whose
    /// refcounts are about to drop.
    pub entries: bool,
}

/// One metadata write, its error naming what was written and where. A free function, so that
/// the bytes may be borrowed from the image's caches while the storage is written.
fn write_to<S: Storage>(storage: &S, host_offset: u64, bytes: &[u8], what: &str) -> Result<()> {
    storage
        .write_at(host_offset, bytes)
        .map_err(|e| Error::io(format!("{what} at {host_offset:#x}"), e))
}

impl<S: Storage> Image<S> {
    /// Everything written before this call is ordered before anything written after it; no
    /// durability. The one place ordering points go through.
    pub(in crate::engine) fn ordering_point(&mut self) -> Result<()> {
        // Guest data in an external data file first: no barrier of the image file orders
        // it (`data_file.rs`).
        self.sync_data_file()?;
        self.counters.ordering_points += 1;
        self.storage.debug_event(DebugEvent::Barrier);
        self.storage
            .barrier()
            .map_err(|e| Error::io("ordering writes to the image file (barrier)", e))?;
        self.counters.storage_barriers += 1;
        self.unordered = Unordered::default();
        self.unbarriered_writes = false;
        // What was reserved before this barrier is ordered before everything after it.
        self.promote_pending_reserve();
        Ok(())
    }

    /// One `Storage::flush` (durability), counted.
    pub(in crate::engine) fn storage_flush(&mut self) -> Result<()> {
        self.sync_data_file()?;
        self.storage
            .flush()
            .map_err(|e| Error::io("flushing the image file", e))?;
        self.counters.storage_flushes += 1;
        self.unordered = Unordered::default();
        self.unbarriered_writes = false;
        self.unflushed_writes = false;
        // What was reserved before this sync is ordered before everything after it.
        self.promote_pending_reserve();
        Ok(())
    }

    /// An ordering point if `needed`.
    fn order_if(&mut self, needed: bool) -> Result<()> {
        if needed {
            self.ordering_point()?;
        }
        Ok(())
    }

    /// A metadata write, counted. The caller notes in `self.unordered` what later stages must
    /// be ordered after.
    pub(in crate::engine) fn write_metadata(
        &mut self,
        host_offset: u64,
        bytes: &[u8],
        what: &str,
    ) -> Result<()> {
        write_to(&self.storage, host_offset, bytes, what)?;
        self.count_metadata_write();
        Ok(())
    }

    /// What every metadata write notes once it was issued.
    fn count_metadata_write(&mut self) {
        self.counters.metadata_writes += 1;
        self.unbarriered_writes = true;
        self.unflushed_writes = true;
    }

    /// A table written from the cache itself, without a copy of its cluster (an L2 table, or a
    /// refcount block when `refblock`), counted as [`Self::write_metadata`] counts. A table
    /// missing from the cache writes nothing.
    pub(in crate::engine) fn write_cached_table(
        &mut self,
        refblock: bool,
        host_offset: u64,
        what: &str,
    ) -> Result<()> {
        let cache = if refblock {
            &self.refblock_cache
        } else {
            &self.l2_cache
        };
        let Some(bytes) = cache.peek(host_offset) else {
            return Ok(());
        };
        write_to(&self.storage, host_offset, bytes, what)?;
        self.count_metadata_write();
        Ok(())
    }

    /// Stages 1 and 2 of [`Self::write_back`]: refcount blocks, then (after an ordering point
    /// if a block was written) the refcount table entries naming new blocks.
    pub(in crate::engine) fn write_refcount_structures(&mut self) -> Result<()> {
        // Stage 1: refcount blocks. They hold only increments and new blocks here (decrements
        // wait for stage 5), so writing them early is always safe: at worst a leak.
        self.write_dirty_refblocks()?;

        // Stage 2: refcount table entries naming new refcount blocks. (b) The blocks were
        // written in stage 1 (or on eviction); order them first.
        if !self.reftable_dirty.is_empty() {
            self.order_if(self.unordered.refcounts)?;
            // An entry leaves the dirty set only once written: after a failed write (or a
            // failed ordering point between batches) the next write-back writes it again.
            //
            // (b) A new block is itself counted by some block; when that is another new one,
            // its entry goes first, with an ordering point before the entries that depend on
            // it: an entry naming a block whose own count is not yet reachable would make a
            // referenced cluster read refcount 0.
            while !self.reftable_dirty.is_empty() {
                let ready: Vec<usize> = self
                    .reftable_dirty
                    .iter()
                    .copied()
                    .filter(|&index| match self.counting_entry(index) {
                        Some(counter) => {
                            counter == index || !self.reftable_dirty.contains(&counter)
                        }
                        None => true,
                    })
                    .collect();
                // A cycle cannot come from this allocator; should one appear, write it all.
                let batch = if ready.is_empty() {
                    self.reftable_dirty.iter().copied().collect()
                } else {
                    ready
                };
                for &index in &batch {
                    let entry = self.reftable.get(index).copied().unwrap_or(0);
                    let at = self.header.refcount_table_offset + index as u64 * 8;
                    self.storage.debug_event(DebugEvent::RefblockAllocHookup);
                    self.write_metadata(
                        at,
                        &entry.to_be_bytes(),
                        "writing a refcount table entry",
                    )?;
                    // Noted at once, so that a retry after a failed ordering point below
                    // orders this entry before the ones that depend on it.
                    self.unordered.refcounts = true;
                    self.reftable_dirty.remove(&index);
                }
                if !self.reftable_dirty.is_empty() {
                    self.ordering_point()?;
                }
            }
        }
        Ok(())
    }

    /// The refcount table index whose block counts the refcount block named by entry
    /// `index` (None for an empty entry).
    fn counting_entry(&self, index: usize) -> Option<usize> {
        let offset =
            self.reftable.get(index).copied()? & crate::engine::format::entry::REFTABLE_OFFSET_MASK;
        if offset == 0 {
            return None;
        }
        usize::try_from(self.rc.locate(offset >> self.cluster_bits).0).ok()
    }

    /// Writes back all dirty metadata, stage by stage, with an ordering point before a stage
    /// only when it depends on a write issued since the last one. Does not sync at the end:
    /// [`Image::flush`] does that.
    pub(in crate::engine) fn write_back(&mut self) -> Result<()> {
        if self.txg.is_some() {
            // Nothing of the durable image is written: no order to keep (`txg.rs`).
            return self.write_back_group();
        }
        self.write_refcount_structures()?;

        // Stage 3: L2 tables. (a) The data of allocating writes was written before this call
        // (finish_write noted it if it needs ordering); (b) the refcounts of the clusters they
        // name were written in stages 1-2.
        if self.l2_cache.has_dirty() {
            let needed = self.unordered.data || self.unordered.refcounts;
            // The crash harness's mutation test removes this one point (test only).
            self.order_if(needed && !self.test_skip_stage3_ordering)?;
            for offset in self.l2_cache.dirty_offsets() {
                if self.l2_table_is_new(offset) {
                    self.storage.debug_event(DebugEvent::L2AllocWrite);
                }
                self.storage.debug_event(DebugEvent::L2Update);
                self.write_cached_table(false, offset, "writing an L2 table")?;
                self.l2_cache.mark_clean(offset);
                if self.new_l2_tables_to_order.remove(&offset) {
                    self.unordered.l2_tables = true;
                }
            }
            self.unordered.entries = true;
        }

        // Stage 4: L1 entries. (c) New L2 tables were written in stage 3; (b) their refcounts
        // in stages 1-2.
        if !self.l1_dirty.is_empty() {
            self.order_if(self.unordered.l2_tables || self.unordered.refcounts)?;
            // As for the refcount table entries: dirty until written.
            for index in self.l1_dirty.clone() {
                let entry = self.l1.get(index).copied().unwrap_or(0);
                let at = self.header.l1_table_offset + index as u64 * 8;
                self.storage.debug_event(DebugEvent::L1Update);
                self.write_metadata(at, &entry.to_be_bytes(), "writing an L1 entry")?;
                self.l1_dirty.remove(&index);
            }
            self.unordered.entries = true;
        }

        // Stage 5: refcount decrements of clusters that lost a reference (copy-on-write,
        // discard). (d) Only after the entries that dropped the reference are written, so a
        // crash never leaves a reference to a cluster counted too low; the freed clusters
        // stay quarantined until the next guest flush.
        if !self.pending_frees.is_empty() {
            self.order_if(self.unordered.entries)?;
            self.storage.debug_event(DebugEvent::ClusterFree);
            self.apply_pending_frees()?;
            self.write_dirty_refblocks()?;
        }

        // Stage 6, for images whose active tables name a cluster twice (no snapshot): the
        // L1 or L2 entry left naming a cluster whose refcount stage 5 brought down to one gets
        // its COPIED flag back, as the spec requires of the active tables. (e) Only after that
        // decrement is written: the entry goes out in stage 3 or 4 of the write-back below,
        // after its ordering point (stage 5 set `unordered.refcounts`), so a crash never
        // leaves COPIED on a cluster counted twice.
        if !self.copied_candidates.is_empty() && self.pending_frees.is_empty() {
            self.restore_copied_flags()?;
            if self.l2_cache.has_dirty() || !self.l1_dirty.is_empty() {
                return self.write_back();
            }
        }
        Ok(())
    }

    /// Sets COPIED on the active L2 entries that name a candidate cluster whose refcount is
    /// now one (`copied_candidates`). Looks through every active L2 table; only images whose
    /// active table names one cluster twice ever get here.
    pub(in crate::engine) fn restore_copied_flags(&mut self) -> Result<()> {
        let mut wanted = std::collections::BTreeSet::new();
        for cluster in std::mem::take(&mut self.copied_candidates) {
            if self.refcount(cluster)? == 1 {
                wanted.insert(cluster << self.cluster_bits);
            }
        }
        let entries = 1u64 << self.l2_bits();
        let mut found = Vec::new();
        // L1 entries first: a table two of them shared, or a cluster one of them used as a
        // table while an L2 entry named it as data.
        for l1_index in 0..self.l1.len() {
            let l1_entry = L1Entry(self.l1[l1_index]);
            if l1_entry.copied() {
                continue;
            }
            let Ok(l2_offset) = l1_entry.l2_offset(self.cluster_size(), l1_index as u64) else {
                continue;
            };
            if l2_offset != 0 && wanted.remove(&l2_offset) {
                self.l1[l1_index] = L1Entry::new_copied(l2_offset).0;
                self.l1_dirty.insert(l1_index);
            }
        }
        for l1_index in 0..self.l1.len() {
            if wanted.is_empty() {
                break;
            }
            let l1_entry = L1Entry(self.l1[l1_index]);
            let Ok(l2_offset) = l1_entry.l2_offset(self.cluster_size(), l1_index as u64) else {
                continue;
            };
            if l2_offset == 0 {
                continue;
            }
            self.load_l2(l2_offset)?;
            for l2_index in 0..entries {
                let (raw, bitmap) = self.cached_l2_slot(l2_offset, l2_index as usize)?;
                let guest_cluster = ((l1_index as u64) << self.l2_bits()) + l2_index;
                let decoded = self.decode_l2(raw, bitmap, guest_cluster);
                let (Ok(Cluster::Data {
                    host_offset,
                    copied: false,
                })
                | Ok(Cluster::Zero {
                    host_offset,
                    copied: false,
                })
                | Ok(Cluster::Subclusters {
                    host_offset,
                    copied: false,
                    ..
                })) = decoded
                else {
                    continue;
                };
                if host_offset != 0 && wanted.remove(&host_offset) {
                    found.push((guest_cluster, raw));
                }
            }
        }
        // Through `l2_table_for_write`, which copies a table the image does not own alone.
        for (guest_cluster, raw) in found {
            let (l2_offset, l2_index) = self.l2_table_for_write(guest_cluster)?;
            self.set_l2_entry(
                l2_offset,
                l2_index,
                L2Entry(raw | EntryFlags::COPIED.bits()),
            )?;
        }
        Ok(())
    }

    /// Grows the refcount table in memory (a transaction group writes it whole at commit).
    pub(in crate::engine) fn grow_reftable_in_group(&mut self, min_entries: u64) {
        let new_entries = (self.reftable.len() as u64 * 2).max(min_entries).max(1);
        self.reftable.resize(new_entries as usize, 0);
        if let Some(t) = self.txg.as_mut() {
            t.reftable_changed = true;
        }
    }

    /// Replaces the refcount table with a larger one so that it reaches `min_entries` entries,
    /// placed at host cluster `area_start` (free, beyond what the current table covers)
    /// together with the new refcount blocks that count the new table and themselves.
    ///
    /// Order: the dirty refcount blocks and the new blocks and table are written; ordering
    /// point; the header switches to the new table; ordering point. The old table's clusters
    /// are freed through `pending_frees` (stage 5 of the next write-back). A crash before the
    /// header write leaves the old table in force and the new area as unreferenced clusters
    /// past the old table's reach (a leak QEMU repairs; nothing counted too low).
    pub(in crate::engine) fn grow_reftable(
        &mut self,
        min_entries: u64,
        area_start: u64,
    ) -> Result<()> {
        let cluster_size = self.cluster_size();
        let cluster_bits = self.cluster_bits;
        let per_block = self.rc.entries_per_block();
        let old_entries = self.reftable.len() as u64;
        self.storage.debug_event(DebugEvent::ReftableGrow);
        // Find a size that covers the new table and its own refcount blocks.
        let mut new_entries = old_entries.saturating_mul(2).max(min_entries).max(1);
        let (table_clusters, first_block, block_count) = loop {
            let table_clusters = (new_entries * 8).div_ceil(cluster_size);
            let first_block = area_start / per_block;
            let mut block_count = 1;
            loop {
                let area_end = area_start + table_clusters + block_count;
                let needed = (area_end - 1) / per_block - first_block + 1;
                if needed <= block_count {
                    break;
                }
                block_count = needed;
            }
            if first_block + block_count <= new_entries {
                break (table_clusters, first_block, block_count);
            }
            new_entries = first_block + block_count;
        };
        let table_bytes = table_clusters << cluster_bits;
        if table_bytes > crate::engine::format::layout::MAX_REFTABLE_BYTES {
            return Err(Error::Unsupported(format!(
                "refcount table growth beyond {} bytes",
                crate::engine::format::layout::MAX_REFTABLE_BYTES
            )));
        }
        let area_clusters = table_clusters + block_count;
        let table_offset = area_start << cluster_bits;
        let blocks_start = area_start + table_clusters;

        // Dirty blocks first: the new table names them.
        self.write_dirty_refblocks()?;
        let mut table = self.reftable.clone();
        table.resize(new_entries as usize, 0);
        self.storage
            .debug_event(DebugEvent::RefblockAllocWriteBlocks);
        for j in 0..block_count {
            let block_cluster = blocks_start + j;
            if let Some(e) = table.get_mut((first_block + j) as usize) {
                *e = block_cluster << cluster_bits;
            }
            let mut block = vec![0u8; cluster_size as usize];
            let covered_start = (first_block + j) * per_block;
            for cluster in area_start..area_start + area_clusters {
                if cluster >= covered_start && cluster < covered_start + per_block {
                    self.rc.set(&mut block, cluster - covered_start, 1)?;
                }
            }
            self.write_metadata(
                block_cluster << cluster_bits,
                &block,
                "writing a new refcount block",
            )?;
        }
        let mut table_raw = bytes::encode_table(&table);
        table_raw.resize(table_bytes as usize, 0);
        self.storage
            .debug_event(DebugEvent::RefblockAllocWriteTable);
        self.write_metadata(table_offset, &table_raw, "writing the new refcount table")?;

        // The header names the new table only once the table and its blocks are on disk.
        self.ordering_point()?;
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&table_offset.to_be_bytes());
        fields[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        self.storage
            .debug_event(DebugEvent::RefblockAllocSwitchTable);
        self.write_metadata(
            48,
            &fields,
            "switching the header to the new refcount table",
        )?;
        self.ordering_point()?;

        let old_offset = self.header.refcount_table_offset;
        let old_clusters = u64::from(self.header.refcount_table_clusters);
        self.header.refcount_table_offset = table_offset;
        self.header.refcount_table_clusters = table_clusters as u32;
        self.reftable = table;
        self.reftable_dirty.clear();
        self.metadata
            .move_region("refcount table", table_offset, table_offset + table_bytes);
        for j in 0..block_count {
            self.metadata
                .add_refblock((blocks_start + j) << cluster_bits);
        }
        let old_first = old_offset >> cluster_bits;
        self.free_later(old_first..old_first + old_clusters, FreeKind::Other);
        self.free_cluster_hint = area_start + area_clusters;
        self.host_end = self
            .host_end
            .max((area_start + area_clusters) << cluster_bits);
        Ok(())
    }

    pub(in crate::engine) fn write_dirty_refblocks(&mut self) -> Result<()> {
        for offset in self.refblock_cache.dirty_offsets() {
            self.write_refblock(offset)?;
        }
        Ok(())
    }

    fn write_refblock(&mut self, offset: u64) -> Result<()> {
        if self.refblock_is_new(offset) {
            self.storage.debug_event(DebugEvent::RefblockAllocWrite);
        }
        self.storage.debug_event(DebugEvent::RefblockUpdatePart);
        self.write_cached_table(true, offset, "writing a refcount block")?;
        self.refblock_cache.mark_clean(offset);
        self.unordered.refcounts = true;
        Ok(())
    }

    /// Whether the L2 table at `offset` is new since the last write-back (a dirty L1 entry
    /// names it): its write is announced as `l2_alloc_write` too.
    fn l2_table_is_new(&self, offset: u64) -> bool {
        self.l1_dirty
            .iter()
            .any(|&i| self.l1.get(i).is_some_and(|&e| e & OFFSET_MASK == offset))
    }

    /// Whether the refcount block at `offset` is new since the last write-back (a dirty
    /// refcount table entry names it): its write is announced as `refblock_alloc_write` too.
    fn refblock_is_new(&self, offset: u64) -> bool {
        self.reftable_dirty.iter().any(|&i| {
            self.reftable
                .get(i)
                .is_some_and(|&e| e & OFFSET_MASK == offset)
        })
    }

    /// Frees a slot in the L2 cache. A dirty victim may depend on data and refcounts not yet
    /// ordered before it, so the whole write-back runs first.
    pub(in crate::engine) fn make_room_in_l2_cache(&mut self) -> Result<()> {
        if let Some((victim, dirty)) = self.l2_cache.victim() {
            if dirty {
                self.write_back()?;
            }
            self.l2_cache.evict(victim);
        }
        Ok(())
    }

    /// Frees a slot in the refcount block cache. A dirty block holds only increments or new
    /// blocks (decrements are applied in stage 5 after their ordering point), which may be
    /// written at any time: the victim alone is written.
    pub(in crate::engine) fn make_room_in_refblock_cache(&mut self) -> Result<()> {
        if let Some((victim, dirty)) = self.refblock_cache.victim() {
            if dirty {
                self.write_refblock(victim)?;
            }
            self.refblock_cache.evict(victim);
        }
        Ok(())
    }
}
