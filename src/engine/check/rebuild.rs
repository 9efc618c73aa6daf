//! Rebuilding the refcount structure (table and blocks) from counted references, for images
//! whose refcount blocks are missing, outside the file, misaligned or overlapping other
//! metadata, and for dirty images whose refcounts were never written.
//!
//! Crash safety: the new table and blocks go past the end of the file, where nothing in use
//! lies, so writing them changes nothing the old structure describes. An ordering point
//! orders them before the header switch (bytes 48..60: table offset and size), which is then
//! made durable with a storage flush. A crash before the switch leaves the old structure in
//! force and some unreferenced bytes past its end; after it, the new one. The old table and
//! blocks are not referenced by the new structure: their clusters are free once it is in
//! force.

use crate::engine::check::references::HostRefs;
use crate::engine::error::{Error, Result};
use crate::engine::format::bytes;
use crate::engine::format::layout::MAX_REFTABLE_BYTES;
use crate::engine::image::Image;
use crate::engine::storage::Storage;

/// Header bytes 48..60: refcount_table_offset (8) and refcount_table_clusters (4).
const REFTABLE_FIELDS_OFFSET: u64 = 48;

/// Where a new refcount structure goes.
struct Layout {
    table_start: u64,
    table_clusters: u64,
    /// Refcount table indices that get a block, ascending; block k is at cluster
    /// `table_start + table_clusters + k`.
    block_indices: Vec<u64>,
}

impl Layout {
    fn end(&self) -> u64 {
        self.table_start + self.table_clusters + self.block_indices.len() as u64
    }
}

/// Finds a layout at `area_start` whose table covers every block and whose blocks cover every
/// cluster with a reference, the new table and blocks included. Growing the area can need
/// another block or table cluster, so this iterates to a fixed point (it converges: each
/// block covers many more clusters than it adds).
fn plan(
    refs: &HostRefs,
    area_start: u64,
    per_block: u64,
    cluster_size: u64,
    min_table_clusters: u64,
) -> Layout {
    let used_below: Vec<u64> = (0..area_start.div_ceil(per_block))
        .filter(|&b| refs.any_in(b * per_block, (b + 1) * per_block))
        .collect();
    let mut table_clusters = min_table_clusters.max(1);
    loop {
        let mut block_indices = used_below.clone();
        loop {
            let end = area_start + table_clusters + block_indices.len() as u64;
            let mut wanted = used_below.clone();
            for b in area_start / per_block..=(end - 1) / per_block {
                if wanted.last().is_none_or(|&last| last < b) {
                    wanted.push(b);
                }
            }
            if wanted.len() == block_indices.len() {
                break;
            }
            block_indices = wanted;
        }
        let layout = Layout {
            table_start: area_start,
            table_clusters,
            block_indices,
        };
        let entries = layout.end().div_ceil(per_block);
        let needed = (entries * 8).div_ceil(cluster_size);
        if needed <= table_clusters {
            return layout;
        }
        table_clusters = needed;
    }
}

impl<S: Storage> Image<S> {
    /// Replaces the refcount table and blocks with new ones that hold exactly the counts in
    /// `refs`, less the references of the old structure (`old_structure`, one entry per
    /// reference counted for it). On return `refs` also counts the new structure, and the
    /// header, `reftable` and regions describe it.
    pub(in crate::engine) fn rebuild_refcount_structure(
        &mut self,
        refs: &mut HostRefs,
        old_structure: &[u64],
    ) -> Result<()> {
        for &cluster in old_structure {
            refs.set(cluster, refs.get(cluster).saturating_sub(1));
        }
        let cluster_size = self.cluster_size();
        let cluster_bits = self.cluster_bits;
        let per_block = self.rc.entries_per_block();
        let file_len = self.file_len()?;
        let area_start = file_len
            .div_ceil(cluster_size)
            .max(refs.len())
            .max(self.host_end.div_ceil(cluster_size))
            .max(1);
        let layout = plan(
            refs,
            area_start,
            per_block,
            cluster_size,
            u64::from(self.header.refcount_table_clusters),
        );
        let table_bytes = layout.table_clusters << cluster_bits;
        if table_bytes > MAX_REFTABLE_BYTES {
            return Err(Error::Unsupported(format!(
                "a rebuilt refcount table of {table_bytes} bytes (limit {MAX_REFTABLE_BYTES})"
            )));
        }
        let area_end = layout.end();
        let fits = area_end
            .checked_mul(cluster_size)
            .is_some_and(|o| o & !crate::engine::format::entry::OFFSET_MASK == 0);
        if !fits {
            return Err(Error::Unsupported(
                "rebuilt refcount structure beyond 2^56 bytes".into(),
            ));
        }
        for cluster in layout.table_start..area_end {
            refs.set(cluster, 1);
        }

        let blocks_start = layout.table_start + layout.table_clusters;
        let mut table = vec![0u64; (table_bytes / 8) as usize];
        for (k, &block_index) in layout.block_indices.iter().enumerate() {
            let block_offset = (blocks_start + k as u64) << cluster_bits;
            let mut block = vec![0u8; cluster_size as usize];
            let base = block_index * per_block;
            for index in 0..per_block {
                let count = refs.get(base + index);
                if count != 0 {
                    self.rc.set(&mut block, index, count)?;
                }
            }
            self.write_metadata(block_offset, &block, "writing a rebuilt refcount block")?;
            if let Some(e) = table.get_mut(block_index as usize) {
                *e = block_offset;
            }
        }
        let table_raw = bytes::encode_table(&table);
        let table_offset = layout.table_start << cluster_bits;
        self.write_metadata(
            table_offset,
            &table_raw,
            "writing the rebuilt refcount table",
        )?;

        // The header names the new structure only once all of it is on disk.
        self.ordering_point()?;
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&table_offset.to_be_bytes());
        fields[8..].copy_from_slice(&(layout.table_clusters as u32).to_be_bytes());
        self.write_metadata(
            REFTABLE_FIELDS_OFFSET,
            &fields,
            "switching the header to the rebuilt refcount table",
        )?;
        self.storage_flush()?;

        self.header.refcount_table_offset = table_offset;
        self.header.refcount_table_clusters = layout.table_clusters as u32;
        self.reftable = table;
        self.reftable_dirty.clear();
        self.metadata
            .move_region("refcount table", table_offset, table_offset + table_bytes);
        self.metadata.reload_tables(&self.l1, &self.reftable);
        self.host_end = self.host_end.max(area_end << cluster_bits);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_covers_the_new_structure_and_every_used_block() {
        // 512-byte clusters with 64-bit refcounts: 64 clusters per block, so the new area
        // needs blocks of its own and the table must reach them.
        let mut refs = HostRefs::new(1000, u64::MAX);
        for c in [0, 1, 2, 500, 999] {
            refs.set(c, 1);
        }
        let layout = plan(&refs, 1000, 64, 512, 1);
        let end = layout.end();
        for b in [0, 7, 15] {
            assert!(layout.block_indices.contains(&b), "block {b}");
        }
        for b in 1000 / 64..=(end - 1) / 64 {
            assert!(layout.block_indices.contains(&b), "new-area block {b}");
        }
        assert!(layout.table_clusters * 512 / 8 >= end.div_ceil(64));
        assert!(layout.block_indices.windows(2).all(|w| w[0] < w[1]));
    }
}
