//! Growing the virtual disk: a new virtual size in the header, a larger L1 table when the
//! current one does not reach the new end, and, when asked, the new area preallocated
//! (`metadata`, `falloc`, `full`) or made to read as zeros over a backing file that reaches
//! into it (QEMU's `BDRV_REQ_ZERO_WRITE`). Shrinking: `shrink.rs`.

use crate::engine::create::{allocate_data_area, Preallocation};
use crate::engine::debug_event::DebugEvent;
use crate::engine::error::{Error, Result};
use crate::engine::format::bytes;
use crate::engine::format::entry::{L2Entry, SubclusterBitmap, OFFSET_MASK};
use crate::engine::format::layout::{bytes_per_l1_entry, MAX_L1_BYTES};
use crate::engine::image::discard::FreeKind;
use crate::engine::image::Image;
use crate::engine::storage::{Backing, Storage};

/// Header bytes 24..48: size (8), crypt_method (4), l1_size (4), l1_table_offset (8).
const SIZE_FIELD_OFFSET: u64 = 24;
const L1_FIELDS_OFFSET: u64 = 36;

/// How a resize fills the area it adds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Growth {
    /// Host clusters for the new area, as `qemu-img resize --preallocation` asks.
    pub preallocation: Preallocation,
    /// The new area reads as zeros even where the backing file has data there (QEMU's
    /// `BDRV_REQ_ZERO_WRITE`, which the block layer asks for when the backing file is
    /// longer than the image was).
    pub zero: bool,
}

impl<S: Storage> Image<S> {
    /// Changes the virtual size. Only growth is supported; the new area is unallocated.
    pub fn truncate(&mut self, new_size: u64) -> Result<()> {
        self.grow(new_size, Growth::default(), None)
    }

    /// Grows the virtual size to `new_size`, filling the new area as `growth` says (the
    /// backing file serves the copy-on-write of the cluster that held the old end).
    ///
    /// Order when the L1 table must grow: all dirty metadata is written back (so the table on
    /// disk equals the one in memory) and the new table's refcounts with it; the new table is
    /// written; ordering point; the header switches to the new table; the old table's
    /// clusters are freed at the next write-back (stage 5, after an ordering point).
    ///
    /// Order when the new area is filled (preallocated or zeroed): its table entries and the
    /// refcounts of its clusters are written back, in the order of `write_back`, then an
    /// ordering point, and only then the header names the new size. A crash before shows the
    /// old size: never the backing file's data, nor a cluster not counted, in the new area.
    /// (Without filling, the size goes with the L1 switch, or alone: the area is unallocated,
    /// so there is nothing to order it after.)
    pub fn grow(
        &mut self,
        new_size: u64,
        growth: Growth,
        backing: Option<&dyn Backing>,
    ) -> Result<()> {
        // A transaction group commits first; the resize itself is written in place, in order.
        self.outside_group(|image| image.grow_in_place(new_size, growth, backing))
    }

    fn grow_in_place(
        &mut self,
        new_size: u64,
        growth: Growth,
        backing: Option<&dyn Backing>,
    ) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let old_size = self.header.virtual_size;
        if new_size < old_size {
            return Err(Error::Unsupported(format!(
                "shrinking the image from {old_size} to {new_size} bytes"
            )));
        }
        if new_size == old_size {
            return Ok(());
        }
        if self.header.version < 3 && self.header.nb_snapshots > 0 {
            // A version 2 snapshot entry does not record its disk size: it would silently
            // take the new one. QEMU's qcow2 refuses this too.
            return Err(Error::Refused {
                errno: libc::ENOTSUP,
                msg: "Can't resize a v2 image which has snapshots".into(),
            });
        }
        let needed_l1 = new_size.div_ceil(bytes_per_l1_entry(self.cluster_bits, self.l2_width));
        if needed_l1.saturating_mul(8) > MAX_L1_BYTES {
            return Err(Error::Unsupported(format!(
                "a virtual size of {new_size} bytes needs an L1 table above {MAX_L1_BYTES} bytes"
            )));
        }
        // Entries past the old end would show through: cut them, in order before the size.
        if self.clear_entries_past(old_size, new_size)? {
            self.write_back()?;
            self.ordering_point()?;
        }
        // A raw data file keeps every guest cluster named (as at its creation).
        let growth = if self.header.data_file_raw() && growth.preallocation == Preallocation::Off {
            Growth {
                preallocation: Preallocation::Metadata,
                ..growth
            }
        } else {
            growth
        };
        let fill = growth.preallocation != Preallocation::Off || growth.zero;
        if let Some(data) = &self.data_file {
            // The data file as long as the disk, as QEMU's qcow2 keeps it (a raw one must be).
            let len = data
                .len()
                .map_err(|e| Error::io("getting the external data file's length", e))?;
            if len < new_size {
                data.set_len(new_size)
                    .map_err(|e| Error::io("growing the external data file", e))?;
            }
        }
        if needed_l1 > self.l1.len() as u64 {
            self.grow_l1_table(needed_l1, (!fill).then_some(new_size))?;
        } else if !fill {
            self.write_metadata(
                SIZE_FIELD_OFFSET,
                &new_size.to_be_bytes(),
                "writing the new virtual size",
            )?;
        }
        if !fill {
            self.header.virtual_size = new_size;
            return Ok(());
        }
        // The preallocated area starts where the clusters in use end, as with QEMU's qcow2:
        // the unused zero reserve that ends the file (counted, never named by any table, a
        // hole in the file) is given back first and the allocations start over it, so that
        // it does not stay a gap between the two (blocks that a preallocating file layer
        // below, iotest 298's, would keep allocated).
        let released_tail = if growth.preallocation != Preallocation::Off {
            let tail = self.reserved_tail();
            self.release_reserve()?;
            if let Some(start) = tail {
                if growth.preallocation == Preallocation::Metadata && self.host_end > start {
                    // Those clusters become preallocated ones, which are holes in the file as
                    // with QEMU's qcow2. They were never written (zeros), but a file layer may
                    // have allocated blocks under them when the reserve extended the file (the
                    // preallocate filter does): give those back. Zeros before and after, so
                    // nothing orders against it; a file that cannot discard keeps the blocks.
                    let _ = self.storage.discard(start, self.host_end - start);
                }
                self.host_end = self.host_end.min(start);
            }
            tail
        } else {
            None
        };
        // The new area is inside the disk for the engine from here on (its entries are
        // made with the ordinary tools), on disk only once they are written.
        self.header.virtual_size = new_size;
        let filled = self
            .fill_new_area(old_size, new_size, growth, backing)
            .and_then(|()| self.write_back())
            .and_then(|()| self.ordering_point())
            .and_then(|()| {
                self.write_metadata(
                    SIZE_FIELD_OFFSET,
                    &new_size.to_be_bytes(),
                    "writing the new virtual size",
                )
            });
        if filled.is_err() {
            // The entries made stay (past the size on disk, harmless; cleared by the next
            // growth), the guest sees the old size.
            self.header.virtual_size = old_size;
            return filled;
        }
        if released_tail.is_some() {
            // A new area smaller than the reserve it replaced leaves the file longer than the
            // clusters in use: holes whose zero refcounts were written and ordered above.
            let file_len = self
                .storage
                .len()
                .map_err(|e| Error::io("getting the image file length", e))?;
            if file_len > self.host_end {
                self.storage
                    .set_len(self.host_end)
                    .map_err(|e| Error::io("trimming the given-back reserve off the file", e))?;
            }
        }
        Ok(())
    }

    /// A larger L1 table, switched to in the header, with the new virtual size in the same
    /// write if `size` is given (the header's size is left alone otherwise).
    pub(in crate::engine) fn grow_l1_table(
        &mut self,
        needed_l1: u64,
        size: Option<u64>,
    ) -> Result<()> {
        self.replace_l1_table(needed_l1, size, |image| {
            let mut table = image.l1.clone();
            table.resize(needed_l1 as usize, 0);
            table
        })
    }

    /// Makes the table `table` gives (`needed_l1` entries, built from the image once all
    /// dirty metadata is written back: the write-back may still change active L1 entries,
    /// stage 6's COPIED) the active L1 table, at a new place, switched to in the header, with
    /// the virtual size `size` in the same header write if given: a crash shows the old table
    /// (and size) or the new one, never a mix. What the new table names must be counted
    /// before (in the cache is enough: the write-back here writes it first); the old table's
    /// clusters are freed at the next write-back (stage 5).
    pub(in crate::engine) fn replace_l1_table(
        &mut self,
        needed_l1: u64,
        size: Option<u64>,
        table: impl FnOnce(&Self) -> Vec<u64>,
    ) -> Result<()> {
        let cluster_size = self.cluster_size();
        let table_bytes = (needed_l1 * 8)
            .next_multiple_of(cluster_size)
            .max(cluster_size);
        self.storage.debug_event(DebugEvent::L1GrowAllocTable);
        let table_offset = self.alloc_contiguous(table_bytes / cluster_size)?;
        self.write_back()?;
        let table = table(self);
        let mut raw = bytes::encode_table(&table);
        raw.resize(table_bytes as usize, 0);
        self.storage.debug_event(DebugEvent::L1GrowWriteTable);
        self.write_metadata(table_offset, &raw, "writing the new L1 table")?;
        self.ordering_point()?;

        let mut fields = Vec::with_capacity(24);
        if let Some(size) = size {
            fields.extend_from_slice(&size.to_be_bytes());
            fields.extend_from_slice(&self.header.crypt_method.to_be_bytes());
        }
        fields.extend_from_slice(&(needed_l1 as u32).to_be_bytes());
        fields.extend_from_slice(&table_offset.to_be_bytes());
        self.storage.debug_event(DebugEvent::L1GrowActivateTable);
        let at = if size.is_some() {
            SIZE_FIELD_OFFSET
        } else {
            L1_FIELDS_OFFSET
        };
        self.write_metadata(at, &fields, "switching the header to the new L1 table")?;
        // (d) The old table's clusters are freed only after this write, which dropped them.
        self.unordered.entries = true;

        let old_first = self.header.l1_table_offset >> self.cluster_bits;
        let old_clusters = (u64::from(self.header.l1_size_entries) * 8).div_ceil(cluster_size);
        if self.header.l1_size_entries > 0 {
            self.free_later(old_first..old_first + old_clusters, FreeKind::Other);
        }
        if let Some(size) = size {
            self.header.virtual_size = size;
        }
        self.header.l1_size_entries = needed_l1 as u32;
        self.header.l1_table_offset = table_offset;
        self.l1 = table;
        self.metadata
            .move_region("L1 table", table_offset, table_offset + table_bytes);
        Ok(())
    }

    /// Fills `old_size..new_size` (inside the in-memory size already) as `growth` says. The
    /// cluster that held the old end gets zeros after it through the ordinary write path
    /// (copy-on-write of its start); whole new clusters get the zero flag, or are
    /// preallocated past everything in use, where the file reads as zeros: one L2 table's
    /// range at a time, the table first and then its clusters (QEMU's layout). With
    /// `metadata` their entries also carry the zero flag on a version 3 image (a
    /// preallocated zero cluster, as QEMU's qcow2 makes them: what is there was never
    /// written); `falloc` and `full` make plain data clusters.
    ///
    /// With extended L2 entries, as QEMU's qcow2: zeros are written only up to the end of
    /// the subcluster holding the old end, the rest of that cluster gets zero bits; a
    /// preallocated cluster's subclusters stay unallocated (reading as zeros, the backing
    /// file ending before them), or, when the backing file reaches into the new area, read as
    /// zeros (`metadata`) or are allocated (`falloc`, `full`: the file holds zeros there).
    fn fill_new_area(
        &mut self,
        old_size: u64,
        new_size: u64,
        growth: Growth,
        backing: Option<&dyn Backing>,
    ) -> Result<()> {
        let cluster_size = self.cluster_size();
        let head_end = old_size.next_multiple_of(cluster_size).min(new_size);
        if head_end < new_size {
            self.fill_whole_clusters(head_end, new_size, growth, backing)?;
        }
        // Last, so that what its allocation may add to the zero reserve ends the file (and
        // goes at the close) rather than lie between the new area's clusters.
        let written_end = old_size
            .next_multiple_of(self.subcluster_size())
            .min(head_end);
        if written_end > old_size {
            let zeros = vec![0u8; (written_end - old_size) as usize];
            self.write(old_size, &zeros, backing)?;
        }
        if head_end > written_end {
            self.zero_by_metadata(written_end, head_end - written_end, false)?;
        }
        Ok(())
    }

    /// The whole clusters of the new area, from `start` (cluster-aligned) to `new_size`.
    fn fill_whole_clusters(
        &mut self,
        start: u64,
        new_size: u64,
        growth: Growth,
        backing: Option<&dyn Backing>,
    ) -> Result<()> {
        let cluster_size = self.cluster_size();
        if growth.preallocation == Preallocation::Off {
            // Only zeroing asked: the zero flag (zero bytes on a version 2 image).
            return self.write_zeroes(start, new_size - start, true, backing);
        }
        let zero_flag = growth.preallocation == Preallocation::Metadata
            && self.header.version >= 3
            && self.data_file.is_none();
        let bitmap = match (growth.zero, growth.preallocation) {
            (false, _) => SubclusterBitmap::EMPTY,
            (true, Preallocation::Metadata) => SubclusterBitmap::ALL_ZEROES,
            (true, _) => SubclusterBitmap::ALL_ALLOCATED,
        };
        let per_table = 1u64 << self.l2_bits();
        let end = new_size.div_ceil(cluster_size);
        let mut first = start / cluster_size;
        if let Some(data) = &self.data_file {
            // Each cluster's place is its guest offset in the data file: preallocated there,
            // named by its entry (nothing is allocated in the image file but L2 tables).
            allocate_data_area(
                data,
                start,
                end * cluster_size - start,
                growth.preallocation,
            )?;
            self.data_unsynced = true;
            for cluster in first..end {
                let entry = L2Entry::data_copied(cluster << self.cluster_bits);
                // (No extended L2 entries with a data file: refused at open.)
                self.link_entry(cluster, entry, SubclusterBitmap::EMPTY, true)?;
            }
            return Ok(());
        }
        while first < end {
            let count = (first / per_table + 1) * per_table - first;
            let count = count.min(end - first);
            // The table first (its range has none: entries past the old size were cleared
            // with their tables), then its clusters, each past everything in use.
            if self.l2_offset_for(first)?.2 == 0 {
                let table = self.alloc_contiguous(1)?;
                self.new_l2_table_at(first, table)?;
            }
            let run = self.alloc_contiguous(count)?;
            let len = count * cluster_size;
            allocate_data_area(&self.storage, run, len, growth.preallocation)?;
            let file_len = self
                .storage
                .len()
                .map_err(|e| Error::io("getting the image file length", e))?;
            if file_len < run + len {
                // metadata: the file covers the clusters, sparse (they read as zeros).
                self.storage
                    .set_len(run + len)
                    .map_err(|e| Error::io("extending the image file over the new area", e))?;
            }
            for i in 0..count {
                let host = run + i * cluster_size;
                let entry = if zero_flag && !self.has_subclusters() {
                    L2Entry::preallocated_zero(host)
                } else {
                    L2Entry::data_copied(host)
                };
                self.link_entry(first + i, entry, bitmap, false)?;
            }
            first += count;
        }
        Ok(())
    }

    /// Makes every whole guest cluster between the old and the new end unallocated. An image
    /// may hold L1 and L2 entries past its virtual size (another writer's leftovers, or a
    /// crafted image: nothing reads them while they lie past the end), and growth must not
    /// expose them: the new range reads as zeros. An L1 entry wholly past the old end is
    /// cleared, an L2 entry in the table that straddles it too; what they named is not
    /// freed (it may be anything), so it shows as leaked clusters at worst. Returns whether
    /// an entry changed (written back by the caller before the new size).
    fn clear_entries_past(&mut self, old_size: u64, new_size: u64) -> Result<bool> {
        let cluster_size = self.cluster_size();
        let per_table = 1u64 << self.l2_bits();
        let end = new_size.div_ceil(cluster_size);
        let mut guest_cluster = old_size.div_ceil(cluster_size);
        let mut changed = false;
        while guest_cluster < end {
            let l1_index = (guest_cluster / per_table) as usize;
            let Some(&raw) = self.l1.get(l1_index) else {
                break;
            };
            let table_end = (guest_cluster / per_table + 1) * per_table;
            if raw != 0 && guest_cluster.is_multiple_of(per_table) {
                self.l1[l1_index] = 0;
                self.l1_dirty.insert(l1_index);
                self.metadata.remove_l2_table(raw & OFFSET_MASK);
                changed = true;
            } else if raw != 0 {
                let (_, _, l2_offset) = self.l2_offset_for(guest_cluster)?;
                self.load_l2(l2_offset)?;
                for cluster in guest_cluster..table_end.min(end) {
                    // The raw entry: what lies past the end was never validated.
                    let index = (cluster % per_table) as usize;
                    let (raw, bitmap) = self.cached_l2_slot(l2_offset, index)?;
                    if raw != 0 || bitmap != SubclusterBitmap::EMPTY {
                        let (l2_offset, l2_index) = self.l2_table_for_write(cluster)?;
                        self.set_l2_entry(l2_offset, l2_index, L2Entry::UNALLOCATED)?;
                        if self.has_subclusters() {
                            self.set_l2_bitmap(l2_offset, l2_index, SubclusterBitmap::EMPTY)?;
                        }
                        changed = true;
                    }
                }
            }
            guest_cluster = table_end;
        }
        Ok(changed)
    }
}
