//! L1 and L2 table entries (standard 64-bit L2 entries; extended L2 is refused at open) and
//! refcount table entries: their flag bits and what they decode to.
//!
//! Decoding checks the reserved bits and alignment; whether an offset lies inside the file is
//! checked by the image, which knows the file length.

use std::fmt;

use bitflags::bitflags;

use crate::engine::error::{Error, Result};

bitflags! {
    /// The flag bits of L1 and L2 entries (a raw entry is its host offset with these).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct EntryFlags: u64 {
        /// Bit 63 of L1 and standard L2 entries: the refcount of what the entry points to is
        /// exactly one, so it may be written in place.
        const COPIED = 1 << 63;
        /// Bit 62 of L2 entries: the cluster is compressed.
        const COMPRESSED = 1 << 62;
        /// Bit 0 of a standard L2 entry (version 3): the cluster reads as zeros.
        const ZERO = 1;
    }
}

/// Bits 9..=55: a cluster-aligned host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry (0..=8 and 56..=62).
pub const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry (1..=8 and 56..=61).
pub const L2_STANDARD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Reserved bits of a refcount table entry (0..=8).
pub const REFTABLE_RESERVED_MASK: u64 = 0x1ff;
/// Bits 9..=63 of a refcount table entry (QEMU's `REFT_OFFSET_MASK`).
pub const REFTABLE_OFFSET_MASK: u64 = !REFTABLE_RESERVED_MASK;

/// An L1 table entry: where the L2 table for one range of guest clusters lives.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct L1Entry(pub u64);

impl fmt::Debug for L1Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("L1Entry")
            .field("offset", &format_args!("{:#x}", self.0 & OFFSET_MASK))
            .field("flags", &EntryFlags::from_bits_truncate(self.0))
            .finish()
    }
}

impl L1Entry {
    /// Checks reserved bits and alignment; returns the L2 table's host offset (0 if none).
    pub fn l2_offset(self, cluster_size: u64, l1_index: u64) -> Result<u64> {
        if self.0 & L1_RESERVED_MASK != 0 {
            return Err(Error::Corrupt(format!(
                "L1 entry {l1_index} ({:#x}) has reserved bits set",
                self.0
            )));
        }
        let offset = self.0 & OFFSET_MASK;
        if !offset.is_multiple_of(cluster_size) {
            return Err(Error::Corrupt(format!(
                "L1 entry {l1_index}: L2 table offset {offset:#x} not cluster aligned"
            )));
        }
        Ok(offset)
    }

    pub fn flags(self) -> EntryFlags {
        EntryFlags::from_bits_truncate(self.0) & EntryFlags::COPIED
    }

    pub fn copied(self) -> bool {
        self.flags().contains(EntryFlags::COPIED)
    }

    /// An entry for an L2 table at `offset` whose refcount is one.
    pub fn new_copied(offset: u64) -> L1Entry {
        L1Entry(offset | EntryFlags::COPIED.bits())
    }
}

/// What one standard L2 entry says about its guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cluster {
    /// Not allocated: read from the backing file, or zeros.
    Unallocated,
    /// Reads as zeros. `host_offset` is a preallocated cluster (or 0); `copied` says whether
    /// that cluster's refcount is one.
    Zero { host_offset: u64, copied: bool },
    /// Guest data at `host_offset`.
    Data { host_offset: u64, copied: bool },
    /// Compressed data: `host_offset` (byte granular) and the number of bytes that may hold it.
    Compressed {
        host_offset: u64,
        max_len_bytes: u64,
    },
}

/// A standard (64-bit) L2 table entry.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct L2Entry(pub u64);

impl fmt::Debug for L2Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("L2Entry")
            .field("raw", &format_args!("{:#x}", self.0))
            .field("flags", &self.flags())
            .finish()
    }
}

impl L2Entry {
    pub const UNALLOCATED: L2Entry = L2Entry(0);

    /// The entry's flags (of a compressed entry: COMPRESSED, and COPIED if wrongly set).
    pub fn flags(self) -> EntryFlags {
        let flags = EntryFlags::from_bits_truncate(self.0);
        if flags.contains(EntryFlags::COMPRESSED) {
            flags - EntryFlags::ZERO
        } else {
            flags
        }
    }

    /// An entry for data at `host_offset` whose refcount is one.
    pub fn data_copied(host_offset: u64) -> L2Entry {
        L2Entry(host_offset | EntryFlags::COPIED.bits())
    }

    /// A zero cluster without a preallocated host cluster.
    pub fn zero() -> L2Entry {
        L2Entry(EntryFlags::ZERO.bits())
    }

    /// A zero cluster with its host cluster at `host_offset` (refcount one): it reads as
    /// zeros, and a write goes there in place.
    pub fn preallocated_zero(host_offset: u64) -> L2Entry {
        L2Entry(host_offset | (EntryFlags::COPIED | EntryFlags::ZERO).bits())
    }

    /// Decodes the entry. `version` decides whether the zero flag exists; `guest_cluster` is
    /// only for the error message.
    pub fn decode(self, cluster_bits: u32, version: u32, guest_cluster: u64) -> Result<Cluster> {
        let cluster_size = 1u64 << cluster_bits;
        let raw = self.0;
        if raw & EntryFlags::COMPRESSED.bits() != 0 {
            // x = 62 - (cluster_bits - 8): the offset is in bits 0..x, the count of additional
            // 512-byte sectors in bits x..62.
            let x = 62 - (cluster_bits - 8);
            let offset = raw & ((1u64 << x) - 1);
            let sectors =
                ((raw & !EntryFlags::COPIED.bits() & !EntryFlags::COMPRESSED.bits()) >> x) + 1;
            if raw & EntryFlags::COPIED.bits() != 0 {
                return Err(Error::Corrupt(format!(
                    "L2 entry for guest cluster {guest_cluster} ({raw:#x}): compressed cluster \
                     with the COPIED flag"
                )));
            }
            // The data starts at `offset` and runs to the end of its last 512-byte sector.
            let max_len_bytes = sectors * 512 - (offset % 512);
            return Ok(Cluster::Compressed {
                host_offset: offset,
                max_len_bytes,
            });
        }
        if raw & L2_STANDARD_RESERVED_MASK != 0 {
            return Err(Error::Corrupt(format!(
                "L2 entry for guest cluster {guest_cluster} ({raw:#x}) has reserved bits set"
            )));
        }
        let host_offset = raw & OFFSET_MASK;
        let copied = raw & EntryFlags::COPIED.bits() != 0;
        if !host_offset.is_multiple_of(cluster_size) {
            return Err(Error::Corrupt(format!(
                "L2 entry for guest cluster {guest_cluster}: host offset {host_offset:#x} not \
                 cluster aligned"
            )));
        }
        if raw & EntryFlags::ZERO.bits() != 0 {
            if version < 3 {
                return Err(Error::Corrupt(format!(
                    "L2 entry for guest cluster {guest_cluster}: zero flag in a version 2 image"
                )));
            }
            return Ok(Cluster::Zero {
                host_offset,
                copied,
            });
        }
        if host_offset == 0 {
            if copied {
                return Err(Error::Corrupt(format!(
                    "L2 entry for guest cluster {guest_cluster}: host offset 0 with the COPIED \
                     flag (no external data file)"
                )));
            }
            return Ok(Cluster::Unallocated);
        }
        Ok(Cluster::Data {
            host_offset,
            copied,
        })
    }
}

/// A refcount table entry: where one refcount block lives (0 if none yet).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReftableEntry(pub u64);

impl ReftableEntry {
    pub fn refblock_offset(self, cluster_size: u64, index: u64) -> Result<u64> {
        if self.0 & REFTABLE_RESERVED_MASK != 0 || !self.0.is_multiple_of(cluster_size) {
            return Err(Error::Corrupt(format!(
                "refcount table entry {index} ({:#x}) is not a cluster-aligned offset",
                self.0
            )));
        }
        Ok(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l2_entry_kinds() {
        let c = |raw: u64| L2Entry(raw).decode(16, 3, 0);
        assert_eq!(c(0).unwrap(), Cluster::Unallocated);
        assert_eq!(
            c(1).unwrap(),
            Cluster::Zero {
                host_offset: 0,
                copied: false
            }
        );
        assert_eq!(
            c(0x3_0000 | EntryFlags::COPIED.bits() | 1).unwrap(),
            Cluster::Zero {
                host_offset: 0x3_0000,
                copied: true
            }
        );
        assert_eq!(
            c(0x5_0000 | EntryFlags::COPIED.bits()).unwrap(),
            Cluster::Data {
                host_offset: 0x5_0000,
                copied: true
            }
        );
        assert!(matches!(c(0x5_0200), Err(Error::Corrupt(_))));
        assert!(matches!(c(0x5_0000 | 2), Err(Error::Corrupt(_))));
        assert!(matches!(
            c(EntryFlags::COPIED.bits()),
            Err(Error::Corrupt(_))
        ));
        assert!(matches!(
            L2Entry(1).decode(16, 2, 0),
            Err(Error::Corrupt(_))
        ));
    }

    #[test]
    fn compressed_descriptor() {
        // 64k clusters: x = 54. Offset 0x1234, 2 additional sectors.
        let raw = EntryFlags::COMPRESSED.bits() | (2u64 << 54) | 0x1234;
        assert_eq!(
            L2Entry(raw).decode(16, 3, 0).unwrap(),
            Cluster::Compressed {
                host_offset: 0x1234,
                max_len_bytes: 3 * 512 - 0x34
            }
        );
    }
}
