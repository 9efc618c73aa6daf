//! Growing the virtual disk: a new virtual size in the header, and a larger L1 table when the
//! current one does not reach the new end. Shrinking is not supported.

use super::debug_event::DebugEvent;
use super::discard::FreeKind;
use super::entry::{L2Entry, OFFSET_MASK};
use super::error::{Error, Result};
use super::image::Image;
use super::layout::{bytes_per_l1_entry, MAX_L1_BYTES};
use super::metadata::be64_at;
use super::storage::Storage;

/// Header bytes 24..48: size (8), crypt_method (4), l1_size (4), l1_table_offset (8).
const SIZE_FIELD_OFFSET: u64 = 24;

impl<S: Storage> Image<S> {
    /// Changes the virtual size. Only growth is supported.
    ///
    /// Order when the L1 table must grow: all dirty metadata is written back (so the table on
    /// disk equals the one in memory) and the new table's refcounts with it; the new table is
    /// written; ordering point; the header switches to the new size and table; the old
    /// table's clusters are freed at the next write-back (stage 5, after an ordering point).
    pub fn truncate(&mut self, new_size: u64) -> Result<()> {
        // A transaction group commits first; the resize itself is written in place, in order.
        self.outside_group(|image| image.truncate_in_place(new_size))
    }

    fn truncate_in_place(&mut self, new_size: u64) -> Result<()> {
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
            return Err(Error::Unsupported(
                "resizing a version 2 image that has internal snapshots".into(),
            ));
        }
        let needed_l1 = new_size.div_ceil(bytes_per_l1_entry(self.cluster_bits));
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
        if needed_l1 <= self.l1.len() as u64 {
            self.write_metadata(
                SIZE_FIELD_OFFSET,
                &new_size.to_be_bytes(),
                "writing the new virtual size",
            )?;
            self.header.virtual_size = new_size;
            return Ok(());
        }

        let cluster_size = self.cluster_size();
        let table_bytes = (needed_l1 * 8).next_multiple_of(cluster_size);
        self.storage.debug_event(DebugEvent::L1GrowAllocTable);
        let table_offset = self.alloc_contiguous(table_bytes / cluster_size)?;
        self.write_back()?;
        let mut table = self.l1.clone();
        table.resize(needed_l1 as usize, 0);
        let mut raw = Vec::with_capacity(table_bytes as usize);
        for e in &table {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        raw.resize(table_bytes as usize, 0);
        self.storage.debug_event(DebugEvent::L1GrowWriteTable);
        self.write_metadata(table_offset, &raw, "writing the new L1 table")?;
        self.ordering_point()?;

        let mut fields = Vec::with_capacity(24);
        fields.extend_from_slice(&new_size.to_be_bytes());
        fields.extend_from_slice(&self.header.crypt_method.to_be_bytes());
        fields.extend_from_slice(&(needed_l1 as u32).to_be_bytes());
        fields.extend_from_slice(&table_offset.to_be_bytes());
        self.storage.debug_event(DebugEvent::L1GrowActivateTable);
        self.write_metadata(
            SIZE_FIELD_OFFSET,
            &fields,
            "switching the header to the new L1 table",
        )?;
        // (d) The old table's clusters are freed only after this write, which dropped them.
        self.unordered.entries = true;

        let old_first = self.header.l1_table_offset >> self.cluster_bits;
        let old_clusters = (u64::from(self.header.l1_size_entries) * 8).div_ceil(cluster_size);
        if self.header.l1_size_entries > 0 {
            self.free_later(old_first..old_first + old_clusters, FreeKind::Other);
        }
        self.header.virtual_size = new_size;
        self.header.l1_size_entries = needed_l1 as u32;
        self.header.l1_table_offset = table_offset;
        self.l1 = table;
        self.metadata
            .move_region("L1 table", table_offset, table_offset + table_bytes);
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
                    let raw = self
                        .l2_cache
                        .peek(l2_offset)
                        .map_or(0, |t| be64_at(t, index));
                    if raw != 0 {
                        let (l2_offset, l2_index) = self.l2_table_for_write(cluster)?;
                        self.set_l2_entry(l2_offset, l2_index, L2Entry::UNALLOCATED)?;
                        changed = true;
                    }
                }
            }
            guest_cluster = table_end;
        }
        Ok(changed)
    }
}
