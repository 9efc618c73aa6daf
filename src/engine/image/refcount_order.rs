//! Changing the refcount width (`qemu-img amend -o refcount_bits=N`): every refcount is
//! copied into a new refcount table and new blocks of the new width, placed past everything
//! counted, and the header switches to them in one write.
//!
//! Write order: dirty metadata written back and the zero reserve given back, durable (the
//! counts copied are final); the new blocks and the new table written, durable; the header
//! cluster names the new width, table and size in one write (its fields lie in its first
//! sector), durable; only then are the old table and blocks freed, through the new counts
//! (stage 5 of the next write-back), durable. A crash before the header write leaves the
//! old structures in force and the new ones as unreferenced clusters past them (leaked
//! clusters, which `qemu-img check -r leaks` reclaims); after it, the new ones, which count
//! the old ones until their free (leaks again, never a count below its references).

use crate::engine::error::{Error, Result};
use crate::engine::format::bytes;
use crate::engine::format::header::Header;
use crate::engine::format::layout::MAX_REFTABLE_BYTES;
use crate::engine::format::refcount::RefcountGeometry;
use crate::engine::image::discard::FreeKind;
use crate::engine::image::Image;
use crate::engine::storage::Storage;

impl<S: Storage> Image<S> {
    /// Rewrites the refcount structures with entries of `1 << new_order` bits (module
    /// comment: order). Refuses, before writing anything, a cluster whose refcount the new
    /// width cannot hold, with QEMU's message.
    ///
    /// `progress` hears (done, total) in refcount blocks written, the header switch last. The
    /// new layout is computed, not found by walks over the table as QEMU's qcow2 finds it, so
    /// the progress never goes back (iotest 112's last case sees QEMU's go back).
    pub(in crate::engine) fn change_refcount_order(
        &mut self,
        new_order: u32,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let old = self.rc;
        if new_order == old.refcount_order {
            return Ok(());
        }
        let new = RefcountGeometry {
            refcount_order: new_order,
            cluster_bits: self.cluster_bits,
        };
        self.release_reserve()?;
        self.write_back()?;
        self.storage_flush()?;

        let counted_end = self.counted_end()?;
        if new.max_refcount() < old.max_refcount() {
            for cluster in 0..counted_end {
                let refcount = self.refcount(cluster)?;
                if refcount > new.max_refcount() {
                    return Err(Error::BadOption(format!(
                        "Cannot decrease refcount entry width to {} bits: Cluster at offset \
                         {:#x} has a refcount of {refcount}",
                        new.refcount_bits(),
                        cluster << self.cluster_bits
                    )));
                }
            }
        }

        // The new table and blocks go past everything counted: blocks for every cluster up to
        // the end of the new area (the area counting itself), and a table naming them.
        let cluster_size = self.cluster_size();
        let per_block = new.entries_per_block();
        let area_start = counted_end;
        let (mut table_clusters, mut block_count) = (1u64, 1u64);
        loop {
            let area_end = area_start + table_clusters + block_count;
            let blocks = area_end.div_ceil(per_block);
            let table = (blocks * 8).div_ceil(cluster_size);
            if blocks <= block_count && table <= table_clusters {
                break;
            }
            block_count = block_count.max(blocks);
            table_clusters = table_clusters.max(table);
        }
        let table_bytes = table_clusters * cluster_size;
        if table_bytes > MAX_REFTABLE_BYTES {
            return Err(Error::Unsupported(format!(
                "a refcount table of {table_bytes} bytes (QEMU's limit is {MAX_REFTABLE_BYTES})"
            )));
        }
        let table_start = area_start;
        let blocks_start = area_start + table_clusters;
        let area_end = blocks_start + block_count;

        // Every block, then the table and the header: one more step.
        let steps = block_count + 1;
        progress(0, steps);
        let mut table = vec![0u64; (table_bytes / 8) as usize];
        for (j, entry) in table.iter_mut().enumerate().take(block_count as usize) {
            let block_cluster = blocks_start + j as u64;
            *entry = block_cluster << self.cluster_bits;
            let mut block = vec![0u8; cluster_size as usize];
            let first = j as u64 * per_block;
            for index in 0..per_block {
                let cluster = first + index;
                let refcount = if cluster < counted_end {
                    self.refcount(cluster)?
                } else if (area_start..area_end).contains(&cluster) {
                    1
                } else {
                    0
                };
                if refcount != 0 {
                    new.set(&mut block, index, refcount)?;
                }
            }
            self.write_metadata(
                block_cluster << self.cluster_bits,
                &block,
                "writing a refcount block of the new width",
            )?;
            progress(j as u64 + 1, steps);
        }
        self.write_metadata(
            table_start << self.cluster_bits,
            &bytes::encode_table(&table),
            "writing the refcount table of the new width",
        )?;
        // The new table and blocks durable before the header names them. (The crash
        // harness's amend mutation leaves this sync out: test only.)
        if !self.test_skip_amend_ordering {
            self.storage_flush()?;
        }

        let mut header = self.header.clone();
        header.refcount_order = new_order;
        header.refcount_table_offset = table_start << self.cluster_bits;
        header.refcount_table_clusters = table_clusters as u32;
        let raw = header.encode()?;
        let header = Header::parse(&raw)?;
        self.write_metadata(0, &raw, "switching the header to the new refcount width")?;
        self.storage_flush()?;
        progress(steps, steps);

        // The old structures, now counted by the new ones, go at the next write-back.
        let old_table_first = self.header.refcount_table_offset >> self.cluster_bits;
        let old_table_clusters = u64::from(self.header.refcount_table_clusters);
        let old_blocks: Vec<u64> = self
            .reftable
            .iter()
            .map(|&e| e & crate::engine::format::entry::REFTABLE_OFFSET_MASK)
            .filter(|&o| o != 0)
            .map(|o| o >> self.cluster_bits)
            .collect();
        // Every cached block is of the old width and about to be freed: none may stay
        // (written back above, so all are clean), or a later lookup of its offset, once the
        // cluster is reused, would find it.
        self.refblock_cache.evict_clean();
        if self.refblock_cache.has_dirty() {
            return Err(Error::Corrupt(
                "a refcount block of the old width is dirty after its write-back".into(),
            ));
        }
        self.header = header;
        self.rc = new;
        self.reftable = table;
        self.reftable_dirty.clear();
        self.metadata.reload_tables(&self.l1, &self.reftable);
        self.metadata.move_region(
            "refcount table",
            table_start << self.cluster_bits,
            (table_start << self.cluster_bits) + table_bytes,
        );
        self.host_end = self.host_end.max(area_end << self.cluster_bits);
        self.free_cluster_hint = self.free_cluster_hint.max(area_end);
        self.free_later(
            (old_table_first..old_table_first + old_table_clusters).chain(old_blocks),
            FreeKind::Other,
        );
        self.write_back()?;
        self.storage_flush()
    }

    /// One past the last host cluster with a refcount (at least the file's clusters).
    fn counted_end(&mut self) -> Result<u64> {
        let file_clusters = self.host_end.div_ceil(self.cluster_size());
        let per_block = self.rc.entries_per_block();
        let last_block = self
            .reftable
            .iter()
            .rposition(|&e| e & crate::engine::format::entry::REFTABLE_OFFSET_MASK != 0);
        let Some(last_block) = last_block else {
            return Ok(file_clusters);
        };
        let mut end = (last_block as u64 + 1) * per_block;
        while end > file_clusters && self.refcount(end - 1)? == 0 {
            end -= 1;
        }
        Ok(end.max(file_clusters))
    }
}
