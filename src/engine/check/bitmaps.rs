//! The bitmaps' part of the reference walk: the bitmap directory, each bitmap's table and the
//! clusters the tables name, counted only while the bitmaps autoclear bit says they are valid
//! (otherwise QEMU considers the extension stale and its clusters leaked).
//!
//! Everything read here is sized by the image, so each size is bounded before anything is
//! allocated: the directory by QEMU's limit (refused at open, `format::header`), each table
//! by QEMU's limits on its entries and on the bytes it names. A table over them is a
//! corruption, reported and not read.

use crate::engine::check::references::Walk;
use crate::engine::error::{Error, Result};
use crate::engine::format::bytes::{read_table, BeBytes};
use crate::engine::format::entry::OFFSET_MASK;
use crate::engine::format::header::AutoclearFeatures;
use crate::engine::format::layout::{MAX_BITMAP_BYTES, MAX_BITMAP_TABLE_ENTRIES};
use crate::engine::image::Image;
use crate::engine::storage::Storage;

/// Reserved bits of a bitmap table entry, and its "all ones" flag.
const BITMAP_TABLE_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
const BITMAP_TABLE_ALL_ONES: u64 = 1;
/// Fixed part of a bitmap directory entry.
const BITMAP_DIRECTORY_ENTRY_BYTES: usize = 24;

impl Walk {
    /// Counts the bitmap directory, bitmap tables and bitmap data clusters.
    pub(super) fn count_bitmaps<S: Storage>(&mut self, image: &Image<S>) -> Result<()> {
        if !image.header.autoclear.contains(AutoclearFeatures::BITMAPS) {
            return Ok(());
        }
        let Some(ext) = image.header.bitmaps else {
            return Ok(());
        };
        if ext.nb_bitmaps == 0 {
            return Ok(());
        }
        let cluster_size = self.cluster_size();
        if !self.count_region(ext.directory_offset, ext.directory_size_bytes) {
            return Ok(());
        }
        // The directory lies inside the file and within QEMU's limit (both checked at open).
        let mut directory = vec![0u8; ext.directory_size_bytes as usize];
        image
            .storage
            .read_at(ext.directory_offset, &mut directory)
            .map_err(|e| Error::io("reading the bitmap directory", e))?;
        let mut at = 0usize;
        for n in 0..ext.nb_bitmaps {
            let what = format!("bitmap directory entry {n}");
            let Some(fixed) = directory.get(at..at + BITMAP_DIRECTORY_ENTRY_BYTES) else {
                self.corruption(format!(
                    "ERROR bitmap directory entry {n} is beyond the end of the directory"
                ));
                return Ok(());
            };
            let fixed = BeBytes::new(&what, fixed);
            let table_offset = fixed.u64(0)?;
            let table_entries = u64::from(fixed.u32(8)?);
            let name_size = usize::from(fixed.u16(18)?);
            let extra_size = fixed.u32(20)? as usize;
            at = (at + BITMAP_DIRECTORY_ENTRY_BYTES)
                .saturating_add(extra_size)
                .saturating_add(name_size)
                .next_multiple_of(8);
            if table_entries > MAX_BITMAP_TABLE_ENTRIES
                || table_entries.saturating_mul(cluster_size) > MAX_BITMAP_BYTES
            {
                self.corruption(format!(
                    "ERROR bitmap {n}: bitmap table of {table_entries} entries exceeds QEMU's \
                     limits ({MAX_BITMAP_TABLE_ENTRIES} entries, {MAX_BITMAP_BYTES} bytes of \
                     bitmap)"
                ));
                continue;
            }
            let table_bytes = table_entries * 8;
            if !table_offset.is_multiple_of(cluster_size) || table_bytes > self.file_len {
                self.corruption(format!(
                    "ERROR bitmap {n}: bitmap table at {table_offset:#x} of {table_entries} \
                     entries is invalid"
                ));
                continue;
            }
            if !self.count_region(table_offset, table_bytes) {
                continue;
            }
            let table = read_table(
                &image.storage,
                table_offset,
                table_entries,
                "a bitmap table",
            )?;
            for entry in table {
                let offset = entry & OFFSET_MASK;
                let invalid = entry & BITMAP_TABLE_RESERVED_MASK != 0
                    || (offset != 0
                        && (entry & BITMAP_TABLE_ALL_ONES != 0
                            || !offset.is_multiple_of(cluster_size)));
                if invalid {
                    self.corruption(format!(
                        "ERROR bitmap {n}: invalid bitmap table entry {entry:#x}"
                    ));
                    continue;
                }
                if offset != 0 {
                    self.count_region(offset, cluster_size);
                }
            }
        }
        Ok(())
    }
}
