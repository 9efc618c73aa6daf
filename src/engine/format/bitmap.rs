//! Persistent dirty bitmaps: the bitmap directory the bitmaps extension names, its entries,
//! and the bitmap tables' entries (docs/interop/qcow2.txt, "Bitmaps").
//!
//! A bitmap is a bit per `granularity` bytes of the guest disk, stored as clusters of raw
//! bits (bit `n` of the bitmap is bit `n % 8` of byte `n / 8`) named by a bitmap table of
//! 64-bit entries; a table entry of zero is a cluster of zero bits, one with only bit 0 set a
//! cluster of one bits. The directory lists the bitmaps: each entry a fixed part, the
//! type-specific extra data, the name, padded to 8 bytes.
//!
//! Everything here is parsed once and validated with QEMU's limits, with an error that names
//! the bitmap and the field.

use bitflags::bitflags;

use crate::engine::error::{Error, Result};
use crate::engine::format::bytes::{BeBytes, BeWriter};
use crate::engine::format::layout::{
    MAX_BITMAPS, MAX_BITMAP_BYTES, MAX_BITMAP_DIRECTORY_BYTES, MAX_BITMAP_TABLE_ENTRIES,
};

/// The fixed part of a directory entry, in bytes.
pub const DIRECTORY_ENTRY_FIXED_BYTES: usize = 24;
/// The only bitmap type the format defines: a dirty tracking bitmap.
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// Smallest and largest granularity (QEMU's `BME_MIN/MAX_GRANULARITY_BITS`).
pub const MIN_GRANULARITY_BITS: u8 = 9;
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Longest name, in bytes (QEMU's `BME_MAX_NAME_SIZE`).
pub const MAX_NAME_BYTES: usize = 1023;

/// Reserved bits of a bitmap table entry (1..=8 and 56..=63).
pub const TABLE_ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// The host offset of a bitmap table entry.
pub const TABLE_ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 0 of an entry without an offset: the cluster reads as all ones.
pub const TABLE_ENTRY_ALL_ONES: u64 = 1;

/// Names of the metadata map's regions for bitmaps (`image/overlap.rs`).
pub const BITMAP_DIRECTORY_REGION: &str = "bitmap directory";
pub const BITMAP_TABLE_REGION: &str = "bitmap table";

bitflags! {
    /// A directory entry's flags. Unknown bits are kept (`from_bits_retain`) so that the
    /// refusal can name them.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct BitmapFlags: u32 {
        /// The bitmap is being changed by a writer: its bits cannot be trusted (after a
        /// crash, an inconsistent bitmap).
        const IN_USE = 1 << 0;
        /// The bitmap tracks guest writes (enabled); without it, it is frozen.
        const AUTO = 1 << 1;
    }
}

/// One entry of the bitmap directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapEntry {
    pub table_offset: u64,
    pub table_size_entries: u32,
    pub flags: BitmapFlags,
    pub bitmap_type: u8,
    pub granularity_bits: u8,
    pub name: Vec<u8>,
    /// Type-specific extra data, kept as stored (none is defined yet).
    pub extra_data: Vec<u8>,
}

/// The bytes of a bitmap covering `virtual_size` bytes at `granularity_bits`, as QEMU
/// serializes it: one bit per granule, rounded up to whole 64-bit words.
pub fn data_bytes(virtual_size: u64, granularity_bits: u8) -> u64 {
    let bits = virtual_size.div_ceil(1u64 << granularity_bits);
    bits.div_ceil(64) * 8
}

/// The bitmap table entries a bitmap of `data_bytes` bytes needs with clusters of
/// `cluster_size`.
pub fn table_entries(data_bytes: u64, cluster_size: u64) -> u64 {
    data_bytes.div_ceil(cluster_size)
}

/// The bytes one directory entry takes with a name and extra data of these sizes.
pub fn entry_bytes(name_bytes: usize, extra_bytes: usize) -> usize {
    (DIRECTORY_ENTRY_FIXED_BYTES + extra_bytes + name_bytes).next_multiple_of(8)
}

impl BitmapEntry {
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits
    }

    pub fn in_use(&self) -> bool {
        self.flags.contains(BitmapFlags::IN_USE)
    }

    /// Whether it tracks guest writes (QEMU: enabled).
    pub fn auto(&self) -> bool {
        self.flags.contains(BitmapFlags::AUTO)
    }

    pub fn encoded_len(&self) -> usize {
        entry_bytes(self.name.len(), self.extra_data.len())
    }

    /// The name for messages.
    pub fn display_name(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.name)
    }

    /// Checks the entry against the format and QEMU's limits (QEMU's `check_dir_entry`,
    /// and its refusal of extra data), for an image of `cluster_size` clusters and
    /// `virtual_size` bytes.
    pub fn validate(&self, cluster_size: u64, virtual_size: u64) -> Result<()> {
        // QEMU's message, which names the bitmap only; `why` is for the debug log.
        let bad = |why: String| {
            log::debug!("bitmap '{}': {why}", self.display_name());
            Err(Error::Invalid(format!(
                "Bitmap '{}' doesn't satisfy the constraints",
                self.display_name()
            )))
        };
        if self.table_size_entries == 0 || self.table_offset == 0 {
            return bad("no bitmap table".into());
        }
        if !self.table_offset.is_multiple_of(cluster_size) {
            return bad(format!(
                "bitmap table offset {:#x} not cluster aligned",
                self.table_offset
            ));
        }
        if u64::from(self.table_size_entries) > MAX_BITMAP_TABLE_ENTRIES {
            return bad(format!(
                "bitmap table of {} entries, above {MAX_BITMAP_TABLE_ENTRIES}",
                self.table_size_entries
            ));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&self.granularity_bits) {
            return bad(format!(
                "granularity_bits {} out of {MIN_GRANULARITY_BITS}..={MAX_GRANULARITY_BITS}",
                self.granularity_bits
            ));
        }
        let unknown = self.flags.bits() & !BitmapFlags::all().bits();
        if unknown != 0 {
            return bad(format!("reserved flags {unknown:#x} set"));
        }
        if self.name.len() > MAX_NAME_BYTES {
            return bad(format!("name of {} bytes", self.name.len()));
        }
        if self.bitmap_type != TYPE_DIRTY_TRACKING {
            return bad(format!("unknown bitmap type {}", self.bitmap_type));
        }
        if !self.extra_data.is_empty() {
            return Err(Error::Unsupported(
                "Bitmap extra data is not supported".into(),
            ));
        }
        let table_bytes = u64::from(self.table_size_entries) * cluster_size;
        if table_bytes > MAX_BITMAP_BYTES {
            return bad(format!(
                "its table names {table_bytes} bytes of bitmap, above {MAX_BITMAP_BYTES}"
            ));
        }
        // A bitmap in use may have any size (not stored after a resize); a consistent one
        // must cover the disk.
        let covered = (table_bytes * 8).checked_shl(u32::from(self.granularity_bits));
        if !self.in_use() && covered.is_some_and(|c| c < virtual_size) {
            return bad(format!(
                "its table covers {} bytes of a {virtual_size}-byte disk",
                covered.unwrap_or(0)
            ));
        }
        Ok(())
    }
}

/// Parses a bitmap directory of `nb_bitmaps` entries (QEMU's `bitmap_list_load`): every
/// entry inside `bytes`, exactly `nb_bitmaps` of them and nothing after them. Entries are
/// not validated here (see [`BitmapEntry::validate`]).
pub fn parse_directory(bytes: &[u8], nb_bitmaps: u32) -> Result<Vec<BitmapEntry>> {
    if bytes.is_empty() {
        return Err(Error::Invalid("bitmap directory of 0 bytes".into()));
    }
    if bytes.len() as u64 > MAX_BITMAP_DIRECTORY_BYTES || nb_bitmaps > MAX_BITMAPS {
        return Err(Error::Invalid(format!(
            "bitmap directory of {} bytes and {nb_bitmaps} bitmaps exceeds QEMU's limits",
            bytes.len()
        )));
    }
    let mut entries = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let n = entries.len();
        if n as u64 >= u64::from(nb_bitmaps) {
            return Err(Error::Invalid(
                "More bitmaps found than specified in header extension".into(),
            ));
        }
        let what = format!("bitmap directory entry {n}");
        let Some(fixed) = bytes.get(at..at + DIRECTORY_ENTRY_FIXED_BYTES) else {
            return Err(Error::Invalid(format!("Broken bitmap directory ({what})")));
        };
        let f = BeBytes::new(&what, fixed);
        let name_size = usize::from(f.u16(18)?);
        let extra_size = f.u32(20)? as usize;
        let len = entry_bytes(name_size, extra_size);
        let Some(entry) = bytes.get(at..at.saturating_add(len)) else {
            return Err(Error::Invalid(format!("Broken bitmap directory ({what})")));
        };
        let extra_at = DIRECTORY_ENTRY_FIXED_BYTES;
        let name_at = extra_at + extra_size;
        entries.push(BitmapEntry {
            table_offset: f.u64(0)?,
            table_size_entries: f.u32(8)?,
            flags: BitmapFlags::from_bits_retain(f.u32(12)?),
            bitmap_type: f.u8(16)?,
            granularity_bits: f.u8(17)?,
            extra_data: entry[extra_at..name_at].to_vec(),
            name: entry[name_at..name_at + name_size].to_vec(),
        });
        at += len;
    }
    if entries.len() as u64 != u64::from(nb_bitmaps) {
        return Err(Error::Invalid(
            "Less bitmaps found than specified in header extension".into(),
        ));
    }
    Ok(entries)
}

/// Encodes a bitmap directory; refuses one over QEMU's limits.
pub fn encode_directory(entries: &[BitmapEntry]) -> Result<Vec<u8>> {
    let len: usize = entries.iter().map(BitmapEntry::encoded_len).sum();
    if len as u64 > MAX_BITMAP_DIRECTORY_BYTES || entries.len() as u64 > u64::from(MAX_BITMAPS) {
        return Err(Error::Refused {
            errno: libc::EINVAL,
            msg: format!(
                "a bitmap directory of {} bitmaps and {len} bytes exceeds QEMU's limits \
                 ({MAX_BITMAPS} bitmaps, {MAX_BITMAP_DIRECTORY_BYTES} bytes)",
                entries.len()
            ),
        });
    }
    let mut out = BeWriter::with_capacity(len);
    for e in entries {
        if e.name.len() > usize::from(u16::MAX) {
            return Err(Error::Invalid(format!(
                "bitmap name of {} bytes",
                e.name.len()
            )));
        }
        out.u64(e.table_offset)
            .u32(e.table_size_entries)
            .u32(e.flags.bits())
            .bytes(&[e.bitmap_type, e.granularity_bits])
            .bytes(&(e.name.len() as u16).to_be_bytes())
            .u32(e.extra_data.len() as u32)
            .bytes(&e.extra_data)
            .bytes(&e.name)
            .pad_to(8);
    }
    Ok(out.into_bytes())
}

/// Checks one bitmap table entry (QEMU's `check_table_entry`): no reserved bit, an aligned
/// offset, and the all-ones flag only without an offset. Returns the host offset (0: none).
pub fn table_entry_offset(entry: u64, cluster_size: u64) -> Result<u64> {
    let offset = entry & TABLE_ENTRY_OFFSET_MASK;
    let invalid = entry & TABLE_ENTRY_RESERVED_MASK != 0
        || (offset != 0
            && (entry & TABLE_ENTRY_ALL_ONES != 0 || !offset.is_multiple_of(cluster_size)));
    if invalid {
        return Err(Error::Invalid(format!(
            "invalid bitmap table entry {entry:#x}"
        )));
    }
    Ok(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, flags: BitmapFlags) -> BitmapEntry {
        BitmapEntry {
            table_offset: 0x30000,
            table_size_entries: 1,
            flags,
            bitmap_type: TYPE_DIRTY_TRACKING,
            granularity_bits: 16,
            name: name.as_bytes().to_vec(),
            extra_data: Vec::new(),
        }
    }

    #[test]
    fn directory_round_trips_with_padding_and_extra_data() {
        let mut b = entry("b1", BitmapFlags::IN_USE);
        b.extra_data = vec![1, 2, 3];
        let dir = vec![entry("a", BitmapFlags::AUTO), b];
        let bytes = encode_directory(&dir).unwrap();
        assert_eq!(bytes.len(), 32 + 32);
        assert_eq!(parse_directory(&bytes, 2).unwrap(), dir);
        // The count must match exactly.
        assert!(parse_directory(&bytes, 1).is_err());
        assert!(parse_directory(&bytes, 3).is_err());
        // A truncated directory is broken.
        assert!(parse_directory(&bytes[..40], 2).is_err());
    }

    #[test]
    fn validate_applies_qemus_constraints() {
        let size = 1 << 30;
        assert!(entry("ok", BitmapFlags::AUTO).validate(65536, size).is_ok());
        let mut e = entry("gran", BitmapFlags::empty());
        e.granularity_bits = 8;
        assert!(e.validate(65536, size).is_err());
        let mut e = entry("flags", BitmapFlags::from_bits_retain(4));
        assert!(e.validate(65536, size).is_err());
        e.flags = BitmapFlags::empty();
        e.extra_data = vec![0];
        assert!(matches!(
            e.validate(65536, size),
            Err(Error::Unsupported(_))
        ));
        // One 512-byte cluster of bits at 64 KiB covers 256 MiB: too small for 1 TiB,
        // unless the bitmap is in use.
        let small = entry("small", BitmapFlags::empty());
        assert!(small.validate(512, 1 << 40).is_err());
        let in_use = entry("small", BitmapFlags::IN_USE);
        assert!(in_use.validate(512, 1 << 40).is_ok());
    }

    #[test]
    fn table_entries_are_checked() {
        assert_eq!(table_entry_offset(0, 65536).unwrap(), 0);
        assert_eq!(table_entry_offset(1, 65536).unwrap(), 0);
        assert_eq!(table_entry_offset(0x20000, 65536).unwrap(), 0x20000);
        assert!(table_entry_offset(0x20001, 65536).is_err());
        assert!(table_entry_offset(0x20200, 65536).is_err());
        assert!(table_entry_offset(1 << 60, 65536).is_err());
        assert_eq!(data_bytes(1 << 20, 16), 8);
        assert_eq!(data_bytes((1 << 20) + 1, 16), 8);
        assert_eq!(data_bytes(1 << 30, 16), 2048);
    }
}
