//! Where every table of a new image goes: the layout computed before anything is written
//! (the module docs of `create` have the picture).

use crate::engine::error::{Error, Result};
use crate::engine::format::entry::L2Width;
use crate::engine::format::layout::{bytes_per_l1_entry, MAX_L1_BYTES, MAX_REFTABLE_BYTES};
use crate::engine::format::refcount::RefcountGeometry;

use super::MAX_HOST_OFFSET_BYTES;

/// The L1 size (entries) QEMU gives an image of `size` bytes, refused above QEMU's L1 limit.
pub(super) fn l1_entries_for(size: u64, cluster_bits: u32, width: L2Width) -> Result<u64> {
    let entries = size.div_ceil(bytes_per_l1_entry(cluster_bits, width));
    if entries * 8 > MAX_L1_BYTES {
        return Err(Error::BadOption(
            "The image size is too large for file format 'qcow2' (try using a larger cluster \
             size)"
                .into(),
        ));
    }
    Ok(entries)
}

/// Refcount blocks and refcount table clusters needed so that `other_clusters` clusters plus
/// the refcount blocks and table themselves are all counted: the smallest fixed point, as
/// QEMU's `qcow2_refcount_metadata_size` finds it. Returns (blocks, table clusters).
pub(super) fn refcount_structure_clusters(other_clusters: u64, rc: RefcountGeometry) -> (u64, u64) {
    let entries_per_block = rc.entries_per_block();
    let blocks_per_table_cluster = 1u64 << (rc.cluster_bits - 3);
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let next_blocks = (other_clusters + blocks + table).div_ceil(entries_per_block);
        let next_table = next_blocks.div_ceil(blocks_per_table_cluster);
        // Both only grow, so the pair settles once neither changes.
        if (next_blocks, next_table) == (blocks, table) {
            return (blocks, table);
        }
        (blocks, table) = (next_blocks, next_table);
    }
}

/// Where every table of a new image goes (offsets in bytes, counts in clusters unless said).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Layout {
    pub(super) rc: RefcountGeometry,
    /// The L2 tables' entry width.
    pub(super) width: L2Width,
    pub(super) reftable_offset: u64,
    pub(super) reftable_clusters: u64,
    pub(super) refblocks_offset: u64,
    pub(super) refblock_count: u64,
    pub(super) l1_offset: u64,
    pub(super) l1_entries: u64,
    pub(super) l1_clusters: u64,
    /// The LUKS header's clusters (encrypt.format=luks only; else 0 of them at l2_offset).
    pub(super) encryption_header_offset: u64,
    pub(super) encryption_header_clusters: u64,
    pub(super) l2_offset: u64,
    pub(super) l2_count: u64,
    pub(super) data_offset: u64,
    pub(super) data_clusters: u64,
    /// Guest clusters the preallocated L2 tables name (0 without preallocation): in the
    /// data area, or in the external data file.
    pub(super) named_clusters: u64,
    /// Every cluster below this one is in use (refcount 1).
    pub(super) clusters_in_use: u64,
    /// Length of the finished file: the end of the L1 entries without preallocation (as
    /// QEMU leaves it) or of the LUKS header's clusters, the end of the data area with.
    pub(super) file_len: u64,
}

impl Layout {
    pub(super) fn cluster_size(&self) -> u64 {
        1u64 << self.rc.cluster_bits
    }

    /// The layout of an image of `size` bytes. `data_file`: guest clusters live in an
    /// external data file (at their guest offsets), so preallocation makes the L2 tables
    /// only. `encryption_header_bytes` of LUKS header get whole clusters of their own after
    /// the L1 table (where QEMU's qcow2 puts them in an image without preallocation),
    /// counted like the tables.
    pub(super) fn new(
        size: u64,
        rc: RefcountGeometry,
        width: L2Width,
        preallocate: bool,
        data_file: bool,
        encryption_header_bytes: u64,
    ) -> Result<Layout> {
        let cluster_bits = rc.cluster_bits;
        let cluster_size = 1u64 << cluster_bits;
        let l1_entries = l1_entries_for(size, cluster_bits, width)?;
        let l1_clusters = (l1_entries * 8).div_ceil(cluster_size);
        let encryption_header_clusters = encryption_header_bytes.div_ceil(cluster_size);
        let (l2_count, data_clusters) = match (preallocate, data_file) {
            (true, false) => (l1_entries, size.div_ceil(cluster_size)),
            (true, true) => (l1_entries, 0),
            (false, _) => (0, 0),
        };
        let other_clusters =
            1 + l1_clusters + encryption_header_clusters + l2_count + data_clusters;
        let (refblock_count, reftable_clusters) = refcount_structure_clusters(other_clusters, rc);
        if reftable_clusters << cluster_bits > MAX_REFTABLE_BYTES {
            return Err(Error::BadOption(format!(
                "The image needs a refcount table of {} bytes, above the {MAX_REFTABLE_BYTES} \
                 bytes QEMU accepts (use a larger cluster size or fewer refcount bits)",
                reftable_clusters << cluster_bits
            )));
        }
        let clusters_in_use = other_clusters + refblock_count + reftable_clusters;
        if clusters_in_use > MAX_HOST_OFFSET_BYTES >> cluster_bits {
            return Err(Error::Unsupported(format!(
                "preallocating {clusters_in_use} clusters: host offsets above 2^56 bytes"
            )));
        }

        let reftable_offset = cluster_size;
        let refblocks_offset = reftable_offset + (reftable_clusters << cluster_bits);
        let l1_offset = refblocks_offset + (refblock_count << cluster_bits);
        let encryption_header_offset = l1_offset + (l1_clusters << cluster_bits);
        let l2_offset = encryption_header_offset + (encryption_header_clusters << cluster_bits);
        // With a data file the L2 entries name guest offsets there (guest cluster n at n
        // clusters), which the data area's start of 0 gives.
        let data_offset = if data_file {
            0
        } else {
            l2_offset + (l2_count << cluster_bits)
        };
        let file_len = if preallocate || l1_entries == 0 || encryption_header_clusters > 0 {
            clusters_in_use << cluster_bits
        } else {
            l1_offset + l1_entries * 8
        };
        Ok(Layout {
            rc,
            width,
            reftable_offset,
            reftable_clusters,
            refblocks_offset,
            refblock_count,
            // QEMU leaves the L1 offset at 0 when the table is empty.
            l1_offset: if l1_entries == 0 { 0 } else { l1_offset },
            l1_entries,
            l1_clusters,
            encryption_header_offset,
            encryption_header_clusters,
            l2_offset,
            l2_count,
            data_offset,
            data_clusters,
            named_clusters: if preallocate {
                size.div_ceil(cluster_size)
            } else {
                0
            },
            clusters_in_use,
            file_len,
        })
    }
}
