//! Shrinking the virtual disk (`qemu-img resize --shrink`, QMP `block_resize` to a smaller
//! size), as QEMU's qcow2 shrinks: the whole clusters past the new end are unallocated and
//! what they named is freed, the L1 entries wholly past it are cleared and their L2 tables
//! freed (the L1 table keeps its size, as QEMU keeps it), the file loses the clusters past
//! the last one still counted, and the header takes the new size. The cluster that holds
//! the new end keeps its bytes past it (they lie past the end, and a later growth zeroes
//! them: `resize.rs`).
//!
//! Write order: the cleared L2 entries (stage 3 of `write_back`) and L1 entries (stage 4),
//! then an ordering point, then the decrements of what they named (stage 5, rule (d)), all
//! made durable; then the new size in the header, durable; then the file is cut after the
//! last counted cluster (every cluster cut has a durable refcount of zero). A crash before
//! the size leaves the old size with its tail unallocated (the guest asked for that tail to
//! go); never an entry naming a freed cluster.

use crate::engine::error::{Error, Result};
use crate::engine::format::entry::OFFSET_MASK;
use crate::engine::format::layout::bytes_per_l1_entry;
use crate::engine::image::discard::FreeKind;
use crate::engine::image::Image;
use crate::engine::storage::Storage;

/// Header bytes 24..32: the virtual size.
const SIZE_FIELD_OFFSET: u64 = 24;

impl<S: Storage> Image<S> {
    /// Shrinks the virtual size to `new_size` (module comment: what goes, and in which
    /// order). Refuses a size that is not a multiple of 512 and a version 2 image with
    /// internal snapshots, with QEMU's messages.
    pub fn shrink(&mut self, new_size: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        // A transaction group commits first; the shrink itself is written in place, in order.
        self.outside_group(|image| image.shrink_in_place(new_size))
    }

    fn shrink_in_place(&mut self, new_size: u64) -> Result<()> {
        let old_size = self.header.virtual_size;
        if new_size >= old_size {
            return Err(Error::Invalid(format!(
                "shrinking from {old_size} to {new_size} bytes"
            )));
        }
        if !new_size.is_multiple_of(512) {
            return Err(Error::BadOption(
                "The new size must be a multiple of 512".into(),
            ));
        }
        if self.header.nb_snapshots > 0 && self.header.version < 3 {
            return Err(Error::BadOption(
                "Can't resize a v2 image which has snapshots".into(),
            ));
        }
        let cluster_size = self.cluster_size();
        let per_table = 1u64 << self.l2_bits();
        let cut = new_size.next_multiple_of(cluster_size) >> self.cluster_bits;
        let old_end = old_size.div_ceil(cluster_size);
        let kept_l1 = new_size.div_ceil(bytes_per_l1_entry(self.cluster_bits, self.l2_width));

        // The whole clusters past the new end: unallocated, what they named freed at stage 5.
        let mut first = cut;
        while first < old_end {
            let end = ((first / per_table + 1) * per_table).min(old_end);
            if self.l2_offset_for(first)?.2 != 0 {
                self.unallocate_clusters(first, end)?;
            }
            first = end;
        }
        // The L1 entries wholly past it: cleared, their tables freed after them.
        let mut freed_tables = Vec::new();
        for l1_index in kept_l1 as usize..self.l1.len() {
            let l2_offset = self.l1[l1_index] & OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            self.l1[l1_index] = 0;
            self.l1_dirty.insert(l1_index);
            self.metadata.remove_l2_table(l2_offset);
            freed_tables.push(l2_offset);
            self.free_later([l2_offset >> self.cluster_bits], FreeKind::Other);
        }
        // The reserve lies at the end of the file: given back, so that the file can be cut.
        self.release_reserve()?;
        self.write_back()?;
        self.storage_flush()?;
        for l2_offset in freed_tables {
            // Clean since the write-back; a freed table must not stay cached (its cluster
            // may hold anything once reused).
            self.l2_cache.take(l2_offset);
        }

        self.write_metadata(
            SIZE_FIELD_OFFSET,
            &new_size.to_be_bytes(),
            "writing the new virtual size",
        )?;
        self.storage_flush()?;
        self.header.virtual_size = new_size;

        if let Some(data) = &self.data_file {
            // As QEMU's qcow2: the data file as long as the disk.
            data.set_len(new_size)
                .map_err(|e| Error::io("shrinking the external data file", e))?;
        }
        self.cut_file_after_last_counted_cluster()
    }

    /// Cuts the image file after its last counted cluster, as QEMU's qcow2 does after a
    /// shrink (a failure is harmless: the tail is unused). Storage that cannot change its
    /// length (a block device) keeps it.
    fn cut_file_after_last_counted_cluster(&mut self) -> Result<()> {
        if !self.storage.is_growable() {
            return Ok(());
        }
        let end = self.host_end.div_ceil(self.cluster_size());
        let mut last = end;
        while last > 1 && self.refcount(last - 1)? == 0 {
            last -= 1;
        }
        let len = last << self.cluster_bits;
        if len < self.host_end && self.storage.set_len(len).is_ok() {
            self.host_end = len;
            self.free_cluster_hint = self.free_cluster_hint.min(last);
        }
        Ok(())
    }
}
