//! Validation of where the header says the tables are: every offset and size is checked
//! against the file length and against the other tables (bounds, alignment, overlap, L1 size
//! vs virtual size) before anything is read or allocated from it. After this, reading the L1
//! and refcount tables allocates at most the file's length.

use crate::engine::error::{Error, Result};
use crate::engine::format::entry::L2Width;
use crate::engine::format::header::Header;

/// QEMU's limit on the L1 table (32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's limit on the number of internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// QEMU's limit on the number of persistent bitmaps (`QCOW2_MAX_BITMAPS`).
pub const MAX_BITMAPS: u32 = 65535;
/// QEMU's limit on the bitmap directory (`QCOW2_MAX_BITMAP_DIRECTORY_SIZE`: 1 KiB per
/// bitmap).
pub const MAX_BITMAP_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS as u64;
/// QEMU's limit on the entries of one bitmap table (`BME_MAX_TABLE_SIZE`).
pub const MAX_BITMAP_TABLE_ENTRIES: u64 = 0x800_0000;
/// QEMU's limit on the clusters one bitmap's table may name, in bytes (`BME_MAX_PHYS_SIZE`:
/// entries times the cluster size).
pub const MAX_BITMAP_BYTES: u64 = 0x2000_0000;

/// The region name of the LUKS header's clusters (`validate`).
pub const ENCRYPTION_HEADER: &str = "encryption header";

fn invalid(msg: String) -> Error {
    Error::Invalid(msg)
}

/// A byte range of the file that holds one kind of metadata.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    pub name: &'static str,
    pub start: u64,
    pub end: u64,
}

impl Region {
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end
    }
}

/// Guest bytes one L1 entry covers: a cluster-sized L2 table of 8-byte (standard) or
/// 16-byte (extended) entries.
pub fn bytes_per_l1_entry(cluster_bits: u32, width: L2Width) -> u64 {
    1u64 << (2 * cluster_bits - width.entry_bits())
}

/// Checks a table given as (offset, length in bytes) and returns its region.
fn table_region(
    name: &'static str,
    offset: u64,
    len_bytes: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<Region> {
    if offset == 0 {
        return Err(invalid(format!("{name} offset is 0 (inside the header)")));
    }
    if !offset.is_multiple_of(cluster_size) {
        return Err(invalid(format!(
            "{name} offset {offset:#x} not aligned to the cluster size"
        )));
    }
    let end = offset.checked_add(len_bytes).ok_or_else(|| {
        invalid(format!(
            "{name} at {offset:#x} of {len_bytes} bytes overflows"
        ))
    })?;
    if end > file_len {
        return Err(invalid(format!(
            "{name} at {offset:#x} of {len_bytes} bytes extends beyond the end of the file \
             ({file_len} bytes)"
        )));
    }
    // Tables occupy whole clusters; the overlap checks use the rounded-up end.
    let end = end
        .checked_next_multiple_of(cluster_size)
        .unwrap_or(u64::MAX);
    Ok(Region {
        name,
        start: offset,
        end,
    })
}

/// The metadata regions named by the header, validated. Returns the header cluster, the L1
/// table, the refcount table and the encryption header's clusters (the regions later writes
/// must never hit).
pub fn validate(h: &Header, file_len: u64) -> Result<Vec<Region>> {
    let cluster_size = h.cluster_size();
    if file_len < cluster_size.min(512) {
        return Err(invalid(format!(
            "file of {file_len} bytes is too short for a qcow2 image"
        )));
    }
    let mut regions = vec![Region {
        name: "header",
        start: 0,
        end: cluster_size,
    }];

    // L1 table: large enough for the virtual size, within QEMU's limit, inside the file.
    let needed_l1 = h
        .virtual_size
        .div_ceil(bytes_per_l1_entry(h.cluster_bits, h.l2_width()));
    let l1_bytes = u64::from(h.l1_size_entries) * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(invalid(format!(
            "l1_size {} too large ({l1_bytes} bytes, limit {MAX_L1_BYTES})",
            h.l1_size_entries
        )));
    }
    if u64::from(h.l1_size_entries) < needed_l1 {
        return Err(invalid(format!(
            "l1_size {} too small for the virtual size {} (needs {needed_l1} entries)",
            h.l1_size_entries, h.virtual_size
        )));
    }
    if h.l1_size_entries > 0 {
        regions.push(table_region(
            "L1 table",
            h.l1_table_offset,
            l1_bytes,
            cluster_size,
            file_len,
        )?);
    }

    // Refcount table.
    if h.refcount_table_clusters == 0 {
        return Err(invalid("refcount_table_clusters is 0".into()));
    }
    let reftable_bytes = u64::from(h.refcount_table_clusters) << h.cluster_bits;
    if reftable_bytes > MAX_REFTABLE_BYTES {
        return Err(invalid(format!(
            "refcount_table_clusters {} too large ({reftable_bytes} bytes, limit \
             {MAX_REFTABLE_BYTES})",
            h.refcount_table_clusters
        )));
    }
    regions.push(table_region(
        "refcount table",
        h.refcount_table_offset,
        reftable_bytes,
        cluster_size,
        file_len,
    )?);

    // Snapshot table: only its start is checked here (entries have variable length;
    // `snapshot.rs` reads and checks them, their count against QEMU's limit first).
    if h.nb_snapshots > 0 && h.nb_snapshots <= MAX_SNAPSHOTS {
        table_region(
            "snapshot table",
            h.snapshots_offset,
            40,
            cluster_size,
            file_len,
        )?;
    }
    // The LUKS header's clusters: metadata no data write, table or free may hit.
    if let Some(e) = h.encryption_header.filter(|e| e.length_bytes > 0) {
        regions.push(table_region(
            ENCRYPTION_HEADER,
            e.offset,
            e.length_bytes,
            cluster_size,
            file_len,
        )?);
    }
    if let Some(b) = h.bitmaps {
        if b.directory_size_bytes > 0 {
            table_region(
                "bitmap directory",
                b.directory_offset,
                b.directory_size_bytes,
                cluster_size,
                file_len,
            )?;
        }
    }

    for (i, a) in regions.iter().enumerate() {
        for b in regions.iter().skip(i + 1) {
            if a.overlaps(b.start, b.end) {
                return Err(invalid(format!(
                    "{} ({:#x}..{:#x}) overlaps {} ({:#x}..{:#x})",
                    b.name, b.start, b.end, a.name, a.start, a.end
                )));
            }
        }
    }
    Ok(regions)
}
