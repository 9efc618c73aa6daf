//! Shrinking the virtual disk (`qemu-img resize --shrink`, QMP `block_resize` to a smaller
//! size), as QEMU's qcow2 shrinks: the whole clusters past the new end are unallocated and
//! what they named is freed, the L1 entries wholly past it are cleared and their L2 tables
//! freed (the L1 table keeps its size, as QEMU keeps it), the file loses the clusters past
//! the last one still counted, and the header takes the new size. The cluster that holds
//! the new end keeps its bytes past it (they lie past the end, and a later growth zeroes
//! them: `resize.rs`).
//!
//! Write order: the new size in the header first, made durable; then the cleared L2
//! entries (stage 3 of `write_back`) and L1 entries (stage 4), an ordering point, the
//! decrements of what they named (stage 5, rule (d)), all made durable; then the refcount
//! blocks left counting nothing are dropped (their table entries cleared and durable before
//! anything else changes: `drop_empty_refcount_blocks`); then the file is cut after the
//! last counted cluster (every cluster cut has a durable refcount of zero). A crash before
//! the size is durable leaves the old size with everything in it; after it, the new size,
//! with at worst entries past the end still naming their clusters (counted: no leak, and
//! unreadable; a later growth by qcow2b clears them before the size grows, `resize.rs`;
//! QEMU's qcow2 would show them again if it grew such an image). So a crash shows the guest
//! its disk before the shrink or after it, never a tail read as zeros.

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
            return Err(Error::Refused {
                errno: libc::ENOTSUP,
                msg: "Can't resize a v2 image which has snapshots".into(),
            });
        }
        let cluster_size = self.cluster_size();
        let per_table = 1u64 << self.l2_bits();
        let cut = new_size.next_multiple_of(cluster_size) >> self.cluster_bits;
        let old_end = old_size.div_ceil(cluster_size);
        let kept_l1 = new_size.div_ceil(bytes_per_l1_entry(self.cluster_bits, self.l2_width));

        // The new size first, durable: from here on the tail is past the end for every reader.
        self.write_back()?;
        self.write_metadata(
            SIZE_FIELD_OFFSET,
            &new_size.to_be_bytes(),
            "writing the new virtual size",
        )?;
        self.storage_flush()?;
        self.header.virtual_size = new_size;

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

        if let Some(data) = &self.data_file {
            // As QEMU's qcow2: the data file as long as the disk.
            data.set_len(new_size)
                .map_err(|e| Error::io("shrinking the external data file", e))?;
        }
        self.drop_empty_refcount_blocks()?;
        self.cut_file_after_last_counted_cluster()
    }

    /// Drops the refcount blocks that count nothing but, perhaps, themselves (what a shrink
    /// leaves past the new end), as QEMU's qcow2 shrinks its refcount table: the table entry
    /// is cleared and made durable first, then a block counted by another one loses that
    /// count; a block that counted itself is counted by nothing once its entry is gone. Only
    /// after the sync may the cluster be reused (before it, the entry on disk still names
    /// it).
    fn drop_empty_refcount_blocks(&mut self) -> Result<()> {
        let mut dropped = Vec::new();
        for rt_index in 0..self.reftable.len() as u64 {
            // An entry that does not name a valid block is left for check to report.
            let Ok(Some(block @ 1..)) = self.refblock_offset(rt_index) else {
                continue;
            };
            let block_cluster = block >> self.cluster_bits;
            let (own_rt, own_index) = self.rc.locate(block_cluster);
            self.load_refblock(block)?;
            let rc = self.rc;
            let table = self
                .refblock_cache
                .get(block)
                .ok_or_else(|| Error::Corrupt(format!("refcount block {block:#x} not cached")))?;
            let mut empty = true;
            for i in 0..rc.entries_per_block() {
                if (own_rt, own_index) == (rt_index, i) {
                    continue;
                }
                if rc.get(table, i)? != 0 {
                    empty = false;
                    break;
                }
            }
            if empty && !self.refblock_cache.is_dirty(block) {
                dropped.push((rt_index, block, own_rt == rt_index));
            }
        }
        if dropped.is_empty() {
            return Ok(());
        }
        for &(rt_index, block, _) in &dropped {
            self.reftable[rt_index as usize] = 0;
            self.reftable_dirty.insert(rt_index as usize);
            self.metadata.remove_refblock(block);
            self.refblock_cache.evict(block);
        }
        self.write_back()?;
        self.storage_flush()?;
        for (_, block, counts_itself) in dropped {
            if !counts_itself {
                let cluster = block >> self.cluster_bits;
                let count = self.refcount(cluster)?;
                self.set_refcount(cluster, count.saturating_sub(1))?;
            }
        }
        self.write_back()?;
        self.storage_flush()
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
