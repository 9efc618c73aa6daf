//! Growing the virtual disk: a new virtual size in the header, and a larger L1 table when the
//! current one does not reach the new end. Shrinking is not supported.

use super::debug_event::DebugEvent;
use super::error::{Error, Result};
use super::image::Image;
use super::layout::{bytes_per_l1_entry, MAX_L1_BYTES};
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
            self.pending_frees
                .extend(old_first..old_first + old_clusters);
        }
        self.header.virtual_size = new_size;
        self.header.l1_size_entries = needed_l1 as u32;
        self.header.l1_table_offset = table_offset;
        self.l1 = table;
        self.metadata
            .move_region("L1 table", table_offset, table_offset + table_bytes);
        Ok(())
    }
}
