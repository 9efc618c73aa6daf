//! L1 and L2 table entries and refcount table entries: their flag bits and what they decode
//! to. L2 entries come in two widths: standard (64 bits) and extended (incompatible feature
//! bit 4: the standard 64 bits, then a 64-bit bitmap that says of each of the cluster's 32
//! subclusters whether it is allocated, reads as zeros, or is unallocated).
//!
//! Decoding checks the reserved bits, alignment and the bitmap's rules; whether an offset
//! lies inside the file is checked by the image, which knows the file length.

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
        /// Bit 0 of a standard L2 entry (version 3): the cluster reads as zeros. Unused in an
        /// extended L2 entry (its bitmap says which subclusters read as zeros): ignored there,
        /// as QEMU ignores it.
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

/// Subclusters per cluster in an image with extended L2 entries.
pub const SUBCLUSTERS_PER_CLUSTER: u32 = 32;
/// log2 of [`SUBCLUSTERS_PER_CLUSTER`].
pub const SUBCLUSTER_SHIFT: u32 = 5;
/// The smallest cluster with extended L2 entries: 32 subclusters of 512 bytes (16 KiB).
pub const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 9 + SUBCLUSTER_SHIFT;

/// How wide an image's L2 entries are: what the extended L2 feature bit says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum L2Width {
    /// 64-bit entries; a cluster is one unit (its "subcluster" is the whole cluster).
    #[default]
    Standard,
    /// 128-bit entries: the standard descriptor, then a [`SubclusterBitmap`].
    Extended,
}

impl L2Width {
    /// Bytes of one entry (8 or 16).
    pub const fn entry_bytes(self) -> u64 {
        1 << self.entry_bits()
    }

    /// log2 of [`Self::entry_bytes`].
    pub const fn entry_bits(self) -> u32 {
        match self {
            L2Width::Standard => 3,
            L2Width::Extended => 4,
        }
    }

    /// 64-bit words per entry (the descriptor is the first).
    pub const fn words(self) -> usize {
        match self {
            L2Width::Standard => 1,
            L2Width::Extended => 2,
        }
    }

    /// log2 of the unit a cluster is allocated, zeroed and copied in: a subcluster of an
    /// extended entry, the whole cluster of a standard one.
    pub const fn subcluster_bits(self, cluster_bits: u32) -> u32 {
        match self {
            L2Width::Standard => cluster_bits,
            L2Width::Extended => cluster_bits - SUBCLUSTER_SHIFT,
        }
    }
}

/// What one subcluster of an extended L2 entry is, as its two bitmap bits say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubclusterState {
    /// Allocated: its data is in the entry's host cluster.
    Allocated,
    /// Reads as zeros (the host cluster, if any, is not read).
    Zero,
    /// Not allocated: reads from the backing file, or as zeros without one.
    Unallocated,
}

/// The subcluster allocation bitmap of an extended L2 entry (its second 64 bits): bit `x`
/// (0..32) says subcluster `x` is allocated, bit `32 + x` that it reads as zeros. Which
/// combinations are valid depends on the descriptor ([`L2Entry::decode_extended`]).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct SubclusterBitmap(pub u64);

impl fmt::Debug for SubclusterBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SubclusterBitmap {{ allocated: {:#010x}, zero: {:#010x} }}",
            self.allocated(),
            self.zeroes()
        )
    }
}

impl SubclusterBitmap {
    /// Every subcluster unallocated.
    pub const EMPTY: SubclusterBitmap = SubclusterBitmap(0);
    /// Every subcluster reads as zeros.
    pub const ALL_ZEROES: SubclusterBitmap = SubclusterBitmap(0xffff_ffff_0000_0000);
    /// Every subcluster allocated.
    pub const ALL_ALLOCATED: SubclusterBitmap = SubclusterBitmap(0xffff_ffff);

    /// The allocation bits (bit x: subcluster x).
    pub const fn allocated(self) -> u32 {
        self.0 as u32
    }

    /// The "reads as zeros" bits (bit x: subcluster x).
    pub const fn zeroes(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// The bits of subclusters `first..end` (`end` at most 32).
    pub const fn mask(first: u32, end: u32) -> u32 {
        if first >= end {
            return 0;
        }
        let upto = if end >= 32 { u32::MAX } else { (1 << end) - 1 };
        upto & !((1u32 << first) - 1)
    }

    const fn from_parts(allocated: u32, zeroes: u32) -> SubclusterBitmap {
        SubclusterBitmap(((zeroes as u64) << 32) | allocated as u64)
    }

    /// Subclusters `first..end` allocated (and no longer reading as zeros): what a write
    /// that covered them leaves.
    pub const fn with_allocated(self, first: u32, end: u32) -> SubclusterBitmap {
        let m = Self::mask(first, end);
        Self::from_parts(self.allocated() | m, self.zeroes() & !m)
    }

    /// Subclusters `first..end` reading as zeros (and no longer allocated).
    pub const fn with_zeroes(self, first: u32, end: u32) -> SubclusterBitmap {
        let m = Self::mask(first, end);
        Self::from_parts(self.allocated() & !m, self.zeroes() | m)
    }

    /// Allocated subclusters become zero ones (the rest is kept): what QEMU's repair of an
    /// entry whose host cluster it drops leaves.
    pub const fn allocated_to_zeroes(self) -> SubclusterBitmap {
        Self::from_parts(0, self.zeroes() | self.allocated())
    }

    /// The state of subcluster `index` (0..32), by the zero bit first.
    pub const fn state(self, index: u32) -> SubclusterState {
        if self.zeroes() & (1 << index) != 0 {
            SubclusterState::Zero
        } else if self.allocated() & (1 << index) != 0 {
            SubclusterState::Allocated
        } else {
            SubclusterState::Unallocated
        }
    }

    /// The state of subcluster `from` and how many subclusters from it (to the end of the
    /// cluster at most) share it.
    pub fn run(self, from: u32) -> (SubclusterState, u32) {
        let state = self.state(from);
        let same = match state {
            SubclusterState::Zero => self.zeroes(),
            SubclusterState::Allocated => self.allocated() & !self.zeroes(),
            SubclusterState::Unallocated => !(self.allocated() | self.zeroes()),
        };
        let count = (same >> from)
            .trailing_ones()
            .min(SUBCLUSTERS_PER_CLUSTER - from);
        (state, count)
    }

    /// Whether every subcluster of `first..end` is allocated.
    pub const fn all_allocated(self, first: u32, end: u32) -> bool {
        let m = Self::mask(first, end);
        self.allocated() & !self.zeroes() & m == m
    }

    /// The first allocated subcluster (32 if none).
    pub const fn first_allocated(self) -> u32 {
        self.allocated().trailing_zeros()
    }

    /// One past the last allocated subcluster (0 if none).
    pub const fn allocated_end(self) -> u32 {
        32 - self.allocated().leading_zeros()
    }
}

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

/// What one L2 entry says about its guest cluster.
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
    /// A standard cluster of an image with extended L2 entries: each of its 32 subclusters
    /// is allocated in the host cluster at `host_offset`, reads as zeros, or is unallocated,
    /// as `bitmap` says. `host_offset` 0: no host cluster (no subcluster is allocated).
    Subclusters {
        host_offset: u64,
        copied: bool,
        bitmap: SubclusterBitmap,
    },
}

/// What the guest bytes at one offset read from: one subcluster of an extended L2 entry, or
/// the whole cluster of a standard one (an entry resolved at an offset, see
/// [`Cluster::at`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subcluster {
    /// Not allocated: the backing file, or zeros.
    Unallocated,
    /// Zeros. `host_offset`: the cluster's host cluster (a preallocated one, or the host
    /// cluster of an extended entry), 0 if none.
    Zero { host_offset: u64 },
    /// Guest data in the host cluster at `host_offset` (the cluster's start).
    Data { host_offset: u64 },
    /// A compressed cluster (never divided into subclusters).
    Compressed {
        host_offset: u64,
        max_len_bytes: u64,
    },
}

impl Cluster {
    /// What the bytes at `in_cluster` (an offset inside the cluster) read from, and for how
    /// many bytes from there (to the end of the cluster at most) the same holds.
    pub fn at(self, in_cluster: u64, cluster_bits: u32) -> (Subcluster, u64) {
        let to_end = (1u64 << cluster_bits) - in_cluster;
        let whole = match self {
            Cluster::Unallocated => Subcluster::Unallocated,
            Cluster::Zero { host_offset, .. } => Subcluster::Zero { host_offset },
            Cluster::Data { host_offset, .. } => Subcluster::Data { host_offset },
            Cluster::Compressed {
                host_offset,
                max_len_bytes,
            } => Subcluster::Compressed {
                host_offset,
                max_len_bytes,
            },
            Cluster::Subclusters {
                host_offset,
                bitmap,
                ..
            } => {
                let sc_bits = L2Width::Extended.subcluster_bits(cluster_bits);
                let first = (in_cluster >> sc_bits) as u32;
                let (state, count) = bitmap.run(first);
                let run = (u64::from(first + count) << sc_bits) - in_cluster;
                let part = match state {
                    SubclusterState::Allocated => Subcluster::Data { host_offset },
                    SubclusterState::Zero => Subcluster::Zero { host_offset },
                    SubclusterState::Unallocated => Subcluster::Unallocated,
                };
                return (part, run);
            }
        };
        (whole, to_end)
    }
}

/// A standard (64-bit) L2 table entry, or the descriptor (first 64 bits) of an extended one.
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

    /// A compressed cluster's descriptor: its data is `len_bytes` (at least 1) bytes at byte
    /// `host_offset`. The spec's fields: with x = 62 - (cluster_bits - 8), the host offset in
    /// bits 0..x and the number of 512-byte sectors the data touches after its first in bits
    /// x..62 (QEMU's `nb_csectors`); never COPIED. Refused when a field cannot hold its value.
    pub fn compressed(host_offset: u64, len_bytes: u64, cluster_bits: u32) -> Result<L2Entry> {
        let x = 62 - (cluster_bits - 8);
        let last = host_offset
            .checked_add(len_bytes.max(1) - 1)
            .ok_or_else(|| Error::Unsupported("compressed data beyond 2^64 bytes".into()))?;
        let more_sectors = last / 512 - host_offset / 512;
        if host_offset >> x != 0 || more_sectors >> (62 - x) != 0 {
            return Err(Error::Unsupported(format!(
                "compressed data of {len_bytes} bytes at {host_offset:#x} does not fit an L2 \
                 entry with {cluster_bits}-bit clusters"
            )));
        }
        Ok(L2Entry(
            EntryFlags::COMPRESSED.bits() | (more_sectors << x) | host_offset,
        ))
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

impl L2Entry {
    /// Decodes an extended L2 entry: this descriptor and its subcluster `bitmap`. Bit 0 of
    /// the descriptor is unused and ignored; a compressed cluster's bitmap is unused and
    /// ignored (as QEMU reads them; `qemu-img check` reports a non-zero one). Refused: a
    /// subcluster both allocated and reading as zeros, and allocated subclusters without a
    /// host cluster.
    pub fn decode_extended(
        self,
        bitmap: SubclusterBitmap,
        cluster_bits: u32,
        guest_cluster: u64,
    ) -> Result<Cluster> {
        if self.0 & EntryFlags::COMPRESSED.bits() != 0 {
            return self.decode(cluster_bits, 3, guest_cluster);
        }
        // Bit 0 is not a zero flag here; the rest is a standard descriptor without it.
        let descriptor = L2Entry(self.0 & !EntryFlags::ZERO.bits());
        let (host_offset, copied) = match descriptor.decode(cluster_bits, 3, guest_cluster)? {
            Cluster::Unallocated => (0, false),
            Cluster::Data {
                host_offset,
                copied,
            } => (host_offset, copied),
            other => {
                return Err(Error::Corrupt(format!(
                    "L2 entry for guest cluster {guest_cluster}: {other:?} in an extended entry"
                )))
            }
        };
        let both = bitmap.allocated() & bitmap.zeroes();
        if host_offset != 0 && both != 0 {
            return Err(Error::Corrupt(format!(
                "L2 entry for guest cluster {guest_cluster}: subcluster {} is both allocated \
                 and reads as zeros (bitmap {:#018x})",
                both.trailing_zeros(),
                bitmap.0
            )));
        }
        if host_offset == 0 && bitmap.allocated() != 0 {
            return Err(Error::Corrupt(format!(
                "L2 entry for guest cluster {guest_cluster}: allocated subclusters without a \
                 host cluster (bitmap {:#018x})",
                bitmap.0
            )));
        }
        Ok(Cluster::Subclusters {
            host_offset,
            copied,
            bitmap,
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
    fn subcluster_bitmap_ranges_states_and_runs() {
        assert_eq!(SubclusterBitmap::mask(0, 32), u32::MAX);
        assert_eq!(SubclusterBitmap::mask(3, 5), 0b11000);
        assert_eq!(SubclusterBitmap::mask(5, 5), 0);
        // 271's "write 63k 4k" then "write -z 2k 2k": subclusters 0, 2..=9, 16 and 31
        // allocated, 1 zero.
        let b = SubclusterBitmap(0x3ff | 1 << 16 | 1 << 31).with_zeroes(1, 2);
        assert_eq!(b.0, 0x0000_0002_8001_03fd);
        assert_eq!(b.state(0), SubclusterState::Allocated);
        assert_eq!(b.state(1), SubclusterState::Zero);
        assert_eq!(b.state(10), SubclusterState::Unallocated);
        assert_eq!(b.run(0), (SubclusterState::Allocated, 1));
        assert_eq!(b.run(2), (SubclusterState::Allocated, 8));
        assert_eq!(b.run(10), (SubclusterState::Unallocated, 6));
        assert_eq!(b.run(31), (SubclusterState::Allocated, 1));
        assert_eq!((b.first_allocated(), b.allocated_end()), (0, 32));
        assert!(b.all_allocated(2, 10) && !b.all_allocated(1, 3) && !b.all_allocated(9, 11));
        // Writing over a zero subcluster allocates it and clears its zero bit.
        assert_eq!(b.with_allocated(1, 2).0, 0x8001_03ff);
        assert_eq!(
            SubclusterBitmap::EMPTY.run(0),
            (SubclusterState::Unallocated, 32)
        );
        assert_eq!(
            SubclusterBitmap::ALL_ZEROES.run(7),
            (SubclusterState::Zero, 25)
        );
        assert_eq!(
            (
                SubclusterBitmap::EMPTY.first_allocated(),
                SubclusterBitmap::EMPTY.allocated_end()
            ),
            (32, 0)
        );
        assert_eq!(
            SubclusterBitmap(0b101 | 1 << 40).allocated_to_zeroes().0,
            (0b101 | 1 << 8) << 32
        );
    }

    #[test]
    fn extended_entries_decode_and_invalid_bitmaps_are_refused() {
        let d =
            |raw: u64, bitmap: u64| L2Entry(raw).decode_extended(SubclusterBitmap(bitmap), 16, 0);
        let copied = EntryFlags::COPIED.bits();
        assert_eq!(
            d(0x5_0000 | copied, 0x1_0000_0002).unwrap(),
            Cluster::Subclusters {
                host_offset: 0x5_0000,
                copied: true,
                bitmap: SubclusterBitmap(0x1_0000_0002)
            }
        );
        // Bit 0 is unused: ignored, not a zero flag.
        assert_eq!(
            d(0x5_0000 | copied | 1, 1).unwrap(),
            Cluster::Subclusters {
                host_offset: 0x5_0000,
                copied: true,
                bitmap: SubclusterBitmap(1)
            }
        );
        assert_eq!(
            d(1, 0xffff_ffff_0000_0000).unwrap(),
            Cluster::Subclusters {
                host_offset: 0,
                copied: false,
                bitmap: SubclusterBitmap::ALL_ZEROES
            }
        );
        // A compressed cluster's bitmap is unused: ignored.
        let compressed = EntryFlags::COMPRESSED.bits() | 0x1234;
        assert!(matches!(
            d(compressed, 0x1_8000_0000).unwrap(),
            Cluster::Compressed { .. }
        ));
        // Invalid: a subcluster allocated and zero; allocated ones without a host cluster.
        assert!(
            matches!(d(0x5_0000 | copied, 0x1_0000_0001), Err(Error::Corrupt(m)) if m.contains("subcluster 0"))
        );
        assert!(matches!(d(0, 1), Err(Error::Corrupt(m)) if m.contains("without a host")));
        // The descriptor's own rules hold as in a standard entry.
        assert!(matches!(d(0x5_0200, 0), Err(Error::Corrupt(_))));
        assert!(matches!(d(copied, 0), Err(Error::Corrupt(_))));
    }

    #[test]
    fn an_extended_entry_resolves_by_subcluster() {
        let cluster = Cluster::Subclusters {
            host_offset: 0x5_0000,
            copied: true,
            bitmap: SubclusterBitmap(0b0110 | 1 << 32),
        };
        // 64 KiB clusters: 2 KiB subclusters.
        let zero = Subcluster::Zero {
            host_offset: 0x5_0000,
        };
        let data = Subcluster::Data {
            host_offset: 0x5_0000,
        };
        for (in_cluster, want) in [
            (0, (zero, 2048)),
            (100, (zero, 1948)),
            (2048, (data, 4096)),
            (6144, (Subcluster::Unallocated, 65536 - 6144)),
        ] {
            assert_eq!(cluster.at(in_cluster, 16), want, "at {in_cluster}");
        }
        let standard = Cluster::Data {
            host_offset: 0x5_0000,
            copied: true,
        };
        assert_eq!(
            standard.at(10, 16),
            (
                Subcluster::Data {
                    host_offset: 0x5_0000
                },
                65526
            )
        );
    }

    #[test]
    fn compressed_descriptor_round_trips() {
        // QEMU 7.2's first two 2 MiB compressed clusters of iotest 214: 5 sectors each.
        let e = L2Entry::compressed(0xa0_0000, 0x802, 21).unwrap();
        assert_eq!(e.0, 0x4008_0000_00a0_0000);
        let e = L2Entry::compressed(0xa0_0802, 0x802, 21).unwrap();
        assert_eq!(e.0, 0x4008_0000_00a0_0802);
        for (offset, len, bits) in [
            (0x10000u64, 1u64, 16u32),
            (0x1_01ff, 0xffff, 16),
            (512, 511, 9),
        ] {
            match L2Entry::compressed(offset, len, bits)
                .unwrap()
                .decode(bits, 3, 0)
                .unwrap()
            {
                Cluster::Compressed {
                    host_offset,
                    max_len_bytes,
                } => {
                    assert_eq!(host_offset, offset);
                    assert!(max_len_bytes >= len && max_len_bytes < len + 512);
                }
                other => panic!("{other:?}"),
            }
        }
        // The offset field of 16-bit clusters is 54 bits wide.
        assert!(L2Entry::compressed(1 << 54, 100, 16).is_err());
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
