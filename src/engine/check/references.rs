//! Counting references: the expected refcount of every host cluster, computed by walking
//! everything that names a cluster (the first step of a check, see `check.rs`).
//!
//! What holds a reference, as QEMU counts it: the header cluster; the active L1 table and
//! every snapshot's L1 table; each L2 table once per L1 entry naming it (a table shared by a
//! snapshot and the active L1 counts twice, and so do the clusters it names, since QEMU
//! raised their refcounts when it took the snapshot); each data cluster (standard and
//! preallocated zero clusters, and with extended L2 entries every host cluster an entry names,
//! whatever its bitmap says); each host cluster a compressed cluster's sectors touch; the
//! snapshot table; the refcount table and every refcount block; the LUKS header's clusters
//! (encrypted images); and the bitmap directory, tables and data clusters, but only while
//! the bitmaps autoclear bit says they are valid.
//!
//! With [`CheckFix::All`] the walk also repairs the entries it cannot count: reserved bits
//! are cleared, a compressed entry loses a COPIED flag, and a reference that is misaligned,
//! past the end of the file or on top of the header or an L1 or snapshot table is dropped (an
//! L2 entry becomes a zero cluster on version 3, unallocated on version 2, and an extended
//! one loses its host cluster, its allocated subclusters reading as zeros; an L1 entry
//! becomes 0). An extended entry's invalid bitmap (a subcluster allocated and zero,
//! allocated subclusters without a host cluster) is reported as QEMU's check reports it and
//! left alone; a compressed cluster's non-zero bitmap is cleared. A reference on top of the refcount table or a refcount block is kept: the
//! refcount structure gives way instead (a rebuild moves it). Each repaired table is written
//! back at once; the caller puts an ordering point after the walk, before any refcount is
//! lowered.

use std::collections::HashMap;

use crate::engine::check::{CheckFix, CheckReport};
use crate::engine::error::{Error, Result};
use crate::engine::format::bytes::{self, read_table};
use crate::engine::format::entry::{
    Cluster, EntryFlags, L2Entry, L2Width, SubclusterBitmap, L1_RESERVED_MASK,
    L2_STANDARD_RESERVED_MASK, OFFSET_MASK, REFTABLE_OFFSET_MASK, REFTABLE_RESERVED_MASK,
};
use crate::engine::format::refcount::RefcountGeometry;
use crate::engine::format::snapshot;
use crate::engine::image::Image;
use crate::engine::storage::Storage;

/// A saturated `u16` entry: the real count is in [`HostRefs::large`].
const SPILLED: u16 = u16::MAX;

/// The expected refcount of each host cluster: two bytes per cluster of the file, with the
/// rare counts of 65535 and above kept aside.
pub(in crate::engine) struct HostRefs {
    small: Vec<u16>,
    large: HashMap<u64, u64>,
    /// The largest refcount the image can store; counting stops there (an overflow).
    pub(in crate::engine) max: u64,
}

impl HostRefs {
    pub(in crate::engine) fn new(clusters: u64, max: u64) -> HostRefs {
        HostRefs {
            small: vec![0; clusters as usize],
            large: HashMap::new(),
            max,
        }
    }

    /// Clusters covered (the file's, plus any counted past its end).
    pub(in crate::engine) fn len(&self) -> u64 {
        self.small.len() as u64
    }

    pub(in crate::engine) fn get(&self, cluster: u64) -> u64 {
        match self.small.get(cluster as usize) {
            None => 0,
            Some(&SPILLED) => self.large.get(&cluster).copied().unwrap_or(0),
            Some(&v) => u64::from(v),
        }
    }

    pub(in crate::engine) fn set(&mut self, cluster: u64, value: u64) {
        let index = cluster as usize;
        if index >= self.small.len() {
            self.small.resize(index + 1, 0);
        }
        if value >= u64::from(SPILLED) {
            self.small[index] = SPILLED;
            self.large.insert(cluster, value);
        } else {
            if self.small[index] == SPILLED {
                self.large.remove(&cluster);
            }
            self.small[index] = value as u16;
        }
    }

    /// Whether any cluster in `start..end` has a reference.
    pub(in crate::engine) fn any_in(&self, start: u64, end: u64) -> bool {
        let end = (end as usize).min(self.small.len());
        let start = (start as usize).min(end);
        self.small[start..end].iter().any(|&v| v != 0)
    }
}

/// Byte ranges of the file, merged and sorted, for overlap questions.
#[derive(Default)]
struct Occupied(Vec<(u64, u64)>);

impl Occupied {
    fn from_ranges(mut ranges: Vec<(u64, u64)>) -> Occupied {
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        Occupied(merged)
    }

    fn overlaps(&self, start: u64, end: u64) -> bool {
        // The last range starting before `end` is the only candidate (ranges are disjoint).
        let i = self.0.partition_point(|&(s, _)| s < end);
        i > 0 && self.0.get(i - 1).is_some_and(|&(_, e)| e > start)
    }
}

/// Where metadata lies, for the question whether a reference (or a repair write) lands on
/// it.
pub(in crate::engine) struct MetadataSpace {
    /// The header, L1 tables and snapshot table: a reference into them is dropped.
    tables: Occupied,
    /// The refcount table and blocks: a reference into them calls for a rebuild.
    refcounts: Occupied,
}

impl MetadataSpace {
    pub(in crate::engine) fn of<S: Storage>(image: &Image<S>) -> MetadataSpace {
        let cluster_size = image.cluster_size();
        let tables = Occupied::from_ranges(
            image
                .metadata
                .regions()
                .filter(|r| r.name != "refcount table")
                .map(|r| (r.start, r.end))
                .collect(),
        );
        let reftable_start = image.header.refcount_table_offset;
        let reftable_bytes = u64::from(image.header.refcount_table_clusters) << image.cluster_bits;
        let mut refcount_ranges = vec![(reftable_start, reftable_start + reftable_bytes)];
        refcount_ranges.extend(
            image
                .reftable
                .iter()
                .filter(|&&e| e != 0 && e & REFTABLE_RESERVED_MASK == 0)
                .filter(|&&e| e.is_multiple_of(cluster_size))
                .map(|&e| (e, e.saturating_add(cluster_size))),
        );
        MetadataSpace {
            tables,
            refcounts: Occupied::from_ranges(refcount_ranges),
        }
    }

    /// Whether `start..end` overlaps any of it.
    pub(in crate::engine) fn overlaps(&self, start: u64, end: u64) -> bool {
        self.tables.overlaps(start, end) || self.refcounts.overlaps(start, end)
    }
}

/// The bookkeeping of one counting pass (and of the comparison that follows it).
pub(in crate::engine) struct Walk {
    pub(in crate::engine) fix: CheckFix,
    pub(in crate::engine) report: CheckReport,
    pub(in crate::engine) refs: HostRefs,
    /// The refcount structure is broken (a block missing, outside the file, misaligned or
    /// overlapping): fixing needs a rebuild rather than changes in place.
    pub(in crate::engine) rebuild: bool,
    /// Clusters counted for the refcount table and blocks: what a rebuild replaces.
    pub(in crate::engine) refcount_structure: Vec<u64>,
    /// Some repair rewrote an entry: order it before lowering any refcount.
    pub(in crate::engine) wrote_entries: bool,
    /// Messages are not recorded (the verification pass after a rebuild).
    pub(in crate::engine) quiet: bool,
    /// Check errors counted for refcounts that could not be read (misaligned blocks).
    pub(in crate::engine) unreadable_refcounts: u64,
    cluster_bits: u32,
    pub(super) file_len: u64,
    version: u32,
    width: L2Width,
    metadata: MetadataSpace,
    /// Guest clusters live in an external data file: not refcounted, not in this file.
    data_file: bool,
}

impl Walk {
    pub(in crate::engine) fn new<S: Storage>(
        image: &Image<S>,
        fix: CheckFix,
        file_len: u64,
    ) -> Walk {
        let clusters = file_len.div_ceil(image.cluster_size());
        Walk {
            fix,
            report: CheckReport::default(),
            refs: HostRefs::new(clusters, image.rc.max_refcount()),
            rebuild: false,
            refcount_structure: Vec::new(),
            wrote_entries: false,
            quiet: false,
            unreadable_refcounts: 0,
            cluster_bits: image.cluster_bits,
            file_len,
            version: image.header.version,
            data_file: image.header.has_data_file(),
            width: image.l2_width,
            metadata: MetadataSpace::of(image),
        }
    }

    pub(super) fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    fn note(&mut self, msg: String) {
        if !self.quiet {
            self.report.note(msg);
        }
    }

    /// An inconsistency left as it is.
    pub(in crate::engine) fn corruption(&mut self, msg: String) {
        self.report.corruptions += 1;
        self.note(msg);
    }

    /// An inconsistency repaired.
    fn repaired(&mut self, msg: String) {
        self.report.corruptions_fixed += 1;
        self.note(msg);
    }

    /// What a dropped L2 entry (with extended L2 entries: and its `bitmap`) becomes: reads
    /// as zeros on version 3 (as the bytes past the end of the file did), unallocated on
    /// version 2; an extended entry's allocated subclusters read as zeros, its others stay
    /// as they were (QEMU's repair of such an entry).
    fn dropped_l2_entry(&self, bitmap: SubclusterBitmap) -> (u64, SubclusterBitmap) {
        match self.width {
            L2Width::Extended => (0, bitmap.allocated_to_zeroes()),
            L2Width::Standard if self.version >= 3 => {
                (EntryFlags::ZERO.bits(), SubclusterBitmap::EMPTY)
            }
            L2Width::Standard => (0, SubclusterBitmap::EMPTY),
        }
    }

    /// Counts one reference to every cluster `offset..offset + size` touches. A region ending
    /// a cluster or more past the end of the file is a corruption and is not counted (QEMU
    /// allows the last cluster to be partly past the end). Returns whether it was counted.
    pub(super) fn count_region(&mut self, offset: u64, size: u64) -> bool {
        if size == 0 {
            return true;
        }
        let end = offset.saturating_add(size);
        if end.saturating_sub(self.file_len) >= self.cluster_size() {
            self.corruption(format!(
                "ERROR: counting reference for region exceeding the end of the file by one \
                 cluster or more: offset {offset:#x} size {size:#x}"
            ));
            return false;
        }
        for cluster in offset >> self.cluster_bits..=(end - 1) >> self.cluster_bits {
            let count = self.refs.get(cluster);
            if count >= self.refs.max {
                self.corruption(format!(
                    "ERROR: overflow cluster offset={:#x}",
                    cluster << self.cluster_bits
                ));
                // The way out, as QEMU's check gives it.
                self.note(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img \
                     convert to create a clean copy if the image cannot be opened for writing"
                        .into(),
                );
                continue;
            }
            self.refs.set(cluster, count + 1);
        }
        true
    }

    /// Whether a reference to `start..end` (past the checks for alignment and the end of the
    /// file) lands on metadata; reports it. Returns true if the reference must be dropped
    /// (it lies on the header or a table that is not part of the refcount structure).
    fn reference_lands_on_metadata(&mut self, what: &str, start: u64, end: u64) -> bool {
        if self.metadata.tables.overlaps(start, end) {
            if self.fix == CheckFix::All {
                self.repaired(format!(
                    "Repairing {what} at {start:#x} overlaps the header, an L1 table or the \
                     snapshot table; reference dropped"
                ));
                return true;
            }
            self.corruption(format!(
                "ERROR {what} at {start:#x} overlaps the header, an L1 table or the snapshot \
                 table"
            ));
        } else if self.metadata.refcounts.overlaps(start, end) {
            // The refcount structure is what gives way: a rebuild moves it.
            self.rebuild = true;
            self.corruption(format!(
                "ERROR {what} at {start:#x} overlaps the refcount table or a refcount block"
            ));
        }
        false
    }

    /// Counts everything: header, L1 and L2 tables with their clusters, snapshots, the
    /// refcount structure and bitmaps. Repairs entries on the way with [`CheckFix::All`].
    pub(in crate::engine) fn count_all<S: Storage>(&mut self, image: &mut Image<S>) -> Result<()> {
        let cluster_size = self.cluster_size();
        self.count_region(0, cluster_size);

        let (l1_offset, l1_entries) = (image.header.l1_table_offset, image.header.l1_size_entries);
        self.walk_l1(image, l1_offset, l1_entries, true)?;
        let snapshot_l1s: Vec<(u64, u32)> = image
            .snapshots
            .iter()
            .map(|s| (s.l1_table_offset, s.l1_size_entries))
            .collect();
        for (offset, entries) in snapshot_l1s {
            self.walk_l1(image, offset, entries, false)?;
        }
        let table_bytes = snapshot::table_bytes(&image.header, &image.snapshots);
        self.count_region(image.header.snapshots_offset, table_bytes);

        let reftable_offset = image.header.refcount_table_offset;
        let reftable_bytes = u64::from(image.header.refcount_table_clusters) << image.cluster_bits;
        let reftable_counted = self.count_region(reftable_offset, reftable_bytes);
        let reftable_clusters = reftable_offset >> self.cluster_bits
            ..(reftable_offset + reftable_bytes).div_ceil(cluster_size);
        if reftable_counted {
            self.refcount_structure.extend(reftable_clusters.clone());
        }

        // The LUKS header's clusters, as QEMU counts them.
        if let Some(extent) = image.header.encryption_header {
            if extent.length_bytes > 0 {
                self.count_region(extent.offset, extent.length_bytes);
            }
        }

        self.count_bitmaps(image)?;

        // Beyond QEMU: a refcount table sharing a cluster with anything else is part of a
        // broken refcount structure, like a refcount block would be.
        if reftable_counted {
            for cluster in reftable_clusters {
                let count = self.refs.get(cluster);
                if count != 1 {
                    self.rebuild = true;
                    self.corruption(format!(
                        "ERROR refcount table cluster {cluster} reference={count}"
                    ));
                }
            }
        }
        self.count_refblocks(image);
        Ok(())
    }

    fn walk_l1<S: Storage>(
        &mut self,
        image: &mut Image<S>,
        l1_offset: u64,
        l1_entries: u32,
        active: bool,
    ) -> Result<()> {
        if l1_entries == 0 {
            return Ok(());
        }
        let cluster_size = self.cluster_size();
        self.count_region(l1_offset, u64::from(l1_entries) * 8);
        // The table lies inside the file (checked at open), so this allocation is bounded.
        let table = read_table(
            &image.storage,
            l1_offset,
            u64::from(l1_entries),
            "an L1 table",
        )?;
        let fix_all = self.fix == CheckFix::All;
        for (index, &raw) in table.iter().enumerate() {
            if raw == 0 {
                continue;
            }
            let mut entry = raw;
            if raw & L1_RESERVED_MASK != 0 {
                if fix_all {
                    entry &= !L1_RESERVED_MASK;
                    self.repaired(format!(
                        "Repairing L1 entry with reserved bits set: {raw:x}"
                    ));
                } else {
                    self.corruption(format!(
                        "ERROR found L1 entry with reserved bits set: {raw:x}"
                    ));
                }
            }
            let l2_offset = entry & OFFSET_MASK;
            let misaligned = !l2_offset.is_multiple_of(cluster_size);
            let past_eof = l2_offset >= self.file_len;
            let l2_end = l2_offset.saturating_add(cluster_size);
            let drop = if l2_offset == 0 {
                false
            } else if fix_all && misaligned {
                self.repaired(format!(
                    "Repairing l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry \
                     dropped"
                ));
                true
            } else if fix_all && past_eof {
                self.repaired(format!(
                    "Repairing l2_offset={l2_offset:x}: Table is beyond the end of the file; \
                     L1 entry dropped"
                ));
                true
            } else {
                !misaligned
                    && !past_eof
                    && self.reference_lands_on_metadata(
                        &format!("L2 table of L1 entry {index}"),
                        l2_offset,
                        l2_end,
                    )
            };
            if drop {
                entry = 0;
            }
            if entry != raw {
                let at = l1_offset + index as u64 * 8;
                image.write_metadata(at, &entry.to_be_bytes(), "repairing an L1 entry")?;
                self.wrote_entries = true;
            }
            if drop || l2_offset == 0 {
                continue;
            }
            self.count_region(l2_offset, cluster_size);
            if misaligned {
                self.corruption(format!(
                    "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry \
                     corrupted"
                ));
            }
            self.walk_l2(image, l2_offset, active)?;
        }
        Ok(())
    }

    fn walk_l2<S: Storage>(
        &mut self,
        image: &mut Image<S>,
        l2_offset: u64,
        active: bool,
    ) -> Result<()> {
        let cluster_size = self.cluster_size();
        let words = cluster_size / 8;
        // Bytes past the end of the file read as zeros, as QEMU reads them.
        let mut table = read_table(&image.storage, l2_offset, words, "an L2 table")?;
        // Repairs are written only to a table that is where a table may be.
        let writable = l2_offset.is_multiple_of(cluster_size)
            && l2_offset < self.file_len
            && !self.metadata.overlaps(l2_offset, l2_offset + cluster_size);
        let fix_all = self.fix == CheckFix::All && writable;
        let mut dirty = false;
        let mut next_contiguous = 0u64;
        for (index, slot) in table.chunks_exact_mut(self.width.words()).enumerate() {
            let raw = slot[0];
            let bitmap = SubclusterBitmap(slot.get(1).copied().unwrap_or(0));
            let (entry, new_bitmap) = if raw & EntryFlags::COMPRESSED.bits() != 0 {
                self.check_compressed(raw, bitmap, index, fix_all, active)
            } else {
                self.check_standard(raw, bitmap, fix_all, active, &mut next_contiguous)
            };
            if entry != raw || new_bitmap != bitmap {
                slot[0] = entry;
                if let Some(b) = slot.get_mut(1) {
                    *b = new_bitmap.0;
                }
                dirty = true;
            }
        }
        if dirty {
            image.write_metadata(
                l2_offset,
                &bytes::encode_table(&table),
                "repairing an L2 table",
            )?;
            self.wrote_entries = true;
        }
        Ok(())
    }

    /// Checks and counts a compressed L2 entry (entry `index` of its table; `bitmap` with
    /// extended L2 entries, where it is unused and must be 0); returns the entry (and
    /// bitmap) as it should be.
    fn check_compressed(
        &mut self,
        raw: u64,
        bitmap: SubclusterBitmap,
        index: usize,
        fix_all: bool,
        active: bool,
    ) -> (u64, SubclusterBitmap) {
        let mut entry = raw;
        if self.data_file {
            // There are none with a data file (the spec); reads refuse the entry too.
            self.corruption(format!(
                "ERROR compressed cluster entry {raw:#x} in an image with an external data file"
            ));
            return (entry, bitmap);
        }
        let mut bitmap = bitmap;
        if bitmap != SubclusterBitmap::EMPTY {
            // The data is still counted (QEMU leaves it uncounted, so that its refcount
            // would look leaked and `-r leaks` free it under the entry).
            if fix_all {
                bitmap = SubclusterBitmap::EMPTY;
                self.repaired(format!(
                    "Repairing compressed cluster {index} with non-zero subcluster allocation \
                     bitmap, entry=0x{raw:x}"
                ));
            } else {
                self.corruption(format!(
                    "ERROR compressed cluster {index} with non-zero subcluster allocation \
                     bitmap, entry=0x{raw:x}"
                ));
            }
        }
        if raw & EntryFlags::COPIED.bits() != 0 {
            let coffset = raw & !(EntryFlags::COPIED.bits() | EntryFlags::COMPRESSED.bits());
            if fix_all {
                entry &= !EntryFlags::COPIED.bits();
                self.repaired(format!(
                    "Repairing: coffset={coffset:#x}: copied flag must never be set for \
                     compressed clusters"
                ));
            } else {
                self.corruption(format!(
                    "ERROR: coffset={coffset:#x}: copied flag must never be set for compressed \
                     clusters"
                ));
            }
        }
        let decoded =
            L2Entry(entry & !EntryFlags::COPIED.bits()).decode(self.cluster_bits, self.version, 0);
        let Ok(Cluster::Compressed {
            host_offset,
            max_len_bytes,
        }) = decoded
        else {
            return (entry, bitmap);
        };
        let end = host_offset.saturating_add(max_len_bytes);
        if fix_all {
            let dropped = if end.saturating_sub(self.file_len) >= self.cluster_size() {
                self.repaired(format!(
                    "Repairing compressed cluster at {host_offset:#x} of {max_len_bytes} bytes \
                     beyond the end of the file; L2 entry dropped"
                ));
                true
            } else {
                self.reference_lands_on_metadata("compressed cluster", host_offset, end)
            };
            if dropped {
                return self.dropped_l2_entry(SubclusterBitmap::EMPTY);
            }
        } else if end.saturating_sub(self.file_len) < self.cluster_size() {
            self.reference_lands_on_metadata("compressed cluster", host_offset, end);
        }
        self.count_region(host_offset, max_len_bytes);
        if active {
            let frag = &mut self.report.fragmentation;
            frag.allocated_clusters += 1;
            frag.compressed_clusters += 1;
            // Compressed clusters are fragmented by nature (QEMU counts them so).
            frag.fragmented_clusters += 1;
        }
        (entry, bitmap)
    }

    /// Checks and counts a standard L2 entry (with extended L2 entries: a descriptor and its
    /// subcluster `bitmap`); returns the entry (and bitmap) as it should be.
    fn check_standard(
        &mut self,
        raw: u64,
        bitmap: SubclusterBitmap,
        fix_all: bool,
        active: bool,
        next_contiguous: &mut u64,
    ) -> (u64, SubclusterBitmap) {
        let cluster_size = self.cluster_size();
        let extended = self.width == L2Width::Extended;
        // Bit 0 is the zero flag of a standard entry; unused (ignored) in an extended one.
        let zero_flag = if extended { 0 } else { EntryFlags::ZERO.bits() };
        let mut entry = raw;
        if raw & L2_STANDARD_RESERVED_MASK != 0 {
            if fix_all {
                entry &= !L2_STANDARD_RESERVED_MASK;
                self.repaired(format!(
                    "Repairing l2 entry with reserved bits set: {raw:x}"
                ));
            } else {
                self.corruption(format!(
                    "ERROR found l2 entry with reserved bits set: {raw:x}"
                ));
            }
        }
        let offset = entry & OFFSET_MASK;
        if self.data_file {
            // A cluster of the external data file (offset 0 with COPIED is guest cluster 0
            // there): nothing of this file to count or to check against it.
            let allocated = offset != 0 || entry & EntryFlags::COPIED.bits() != 0;
            if active && allocated && entry & EntryFlags::ZERO.bits() == 0 {
                self.report.fragmentation.allocated_clusters += 1;
            }
            return (entry, bitmap);
        }
        if offset == 0 && entry & EntryFlags::COPIED.bits() != 0 && entry & zero_flag == 0 {
            // A data cluster at host offset 0 is the header (an offset of 0 may only have the
            // flag with an external data file): reads and writes refuse the entry, so check
            // says so, and -r all makes the cluster unallocated (what QEMU reads there).
            if fix_all {
                self.repaired(format!(
                    "Repairing l2 entry {raw:x}: host offset 0 with the COPIED flag; the \
                     cluster is now unallocated"
                ));
                return (entry & !EntryFlags::COPIED.bits(), bitmap);
            }
            self.corruption(format!(
                "ERROR l2 entry {raw:x}: host offset 0 with the COPIED flag (no external data \
                 file)"
            ));
            return (entry, bitmap);
        }
        if offset == 0 {
            // Unallocated, or a zero cluster without a host cluster: nothing to count. An
            // extended entry has no allocated subcluster then.
            if bitmap.allocated() != 0 {
                self.corruption(
                    "ERROR: Unallocated cluster has non-zero subcluster allocation map".into(),
                );
            }
            return (entry, bitmap);
        }
        if bitmap.allocated() & bitmap.zeroes() != 0 {
            self.corruption(format!(
                "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation \
                 bitmap"
            ));
        }
        // No data in it: a preallocated cluster (zero flag; no allocated subcluster).
        let zero = if extended {
            bitmap.allocated() == 0
        } else {
            entry & EntryFlags::ZERO.bits() != 0
        };
        if !offset.is_multiple_of(cluster_size) {
            let what = if zero {
                "Preallocated cluster"
            } else {
                "Data cluster"
            };
            if fix_all {
                self.repaired(format!(
                    "Repairing offset={offset:x}: {what} is not properly aligned; L2 entry \
                     corrupted."
                ));
                return self.dropped_l2_entry(bitmap);
            }
            self.corruption(format!(
                "ERROR offset={offset:x}: {what} is not properly aligned; L2 entry corrupted."
            ));
        }
        if fix_all {
            let dropped = if offset >= self.file_len {
                self.repaired(format!(
                    "Repairing offset={offset:x}: cluster beyond the end of the file; L2 entry \
                     dropped"
                ));
                true
            } else {
                self.reference_lands_on_metadata("data cluster", offset, offset + cluster_size)
            };
            if dropped {
                return self.dropped_l2_entry(bitmap);
            }
        } else if offset.is_multiple_of(cluster_size) && offset < self.file_len {
            self.reference_lands_on_metadata("data cluster", offset, offset + cluster_size);
        }
        if active {
            let frag = &mut self.report.fragmentation;
            frag.allocated_clusters += 1;
            if *next_contiguous != 0 && offset != *next_contiguous {
                frag.fragmented_clusters += 1;
            }
            *next_contiguous = offset + cluster_size;
        }
        self.count_region(offset, cluster_size);
        (entry, bitmap)
    }

    /// Counts each refcount block and checks where it lies (QEMU's `check_refblocks`).
    fn count_refblocks<S: Storage>(&mut self, image: &Image<S>) {
        let cluster_size = self.cluster_size();
        let file_clusters = self.file_len.div_ceil(cluster_size);
        for (index, &raw) in image.reftable.iter().enumerate() {
            if raw == 0 {
                continue;
            }
            if raw & REFTABLE_RESERVED_MASK != 0 {
                self.rebuild = true;
                self.corruption(format!(
                    "ERROR refcount table entry {index} has reserved bits set"
                ));
                continue;
            }
            if !raw.is_multiple_of(cluster_size) {
                self.rebuild = true;
                self.corruption(format!(
                    "ERROR refcount block {index} is not cluster aligned; refcount table entry \
                     corrupted"
                ));
                continue;
            }
            let cluster = raw >> self.cluster_bits;
            if cluster >= file_clusters {
                self.rebuild = true;
                self.corruption(format!("ERROR refcount block {index} is outside image"));
                continue;
            }
            self.count_region(raw, cluster_size);
            self.refcount_structure.push(cluster);
            let count = self.refs.get(cluster);
            if count != 1 {
                self.rebuild = true;
                self.corruption(format!("ERROR refcount block {index} refcount={count}"));
            }
        }
    }

    /// Compares the stored refcounts with the counted references, repairing in place what
    /// `fix` allows (never a refcount of 0: that block may not exist, so it needs a rebuild).
    /// Returns the highest cluster with a refcount or a reference.
    pub(in crate::engine) fn compare<S: Storage>(
        &mut self,
        image: &mut Image<S>,
        fix: CheckFix,
    ) -> Result<u64> {
        let rc: RefcountGeometry = image.rc;
        let cluster_size = self.cluster_size();
        let per_block = rc.entries_per_block();
        let clusters = self.refs.len();
        let mut highest = 0u64;
        for block_index in 0..clusters.div_ceil(per_block) {
            let base = block_index * per_block;
            let end = (base + per_block).min(clusters);
            let raw = usize::try_from(block_index)
                .ok()
                .and_then(|i| image.reftable.get(i))
                .copied()
                .unwrap_or(0);
            let block_offset = raw & REFTABLE_OFFSET_MASK;
            if !block_offset.is_multiple_of(cluster_size) {
                // QEMU cannot read these refcounts either.
                for cluster in base..end {
                    self.report.check_errors += 1;
                    self.unreadable_refcounts += 1;
                    self.note(format!(
                        "Can't get refcount for cluster {cluster}: Input/output error"
                    ));
                }
                continue;
            }
            let mut block = vec![0u8; cluster_size as usize];
            if block_offset != 0 {
                image
                    .storage
                    .read_at(block_offset, &mut block)
                    .map_err(|e| {
                        Error::io(
                            format!("reading the refcount block at {block_offset:#x}"),
                            e,
                        )
                    })?;
            }
            let mut changed = false;
            for cluster in base..end {
                let index = cluster - base;
                let stored = rc.get(&block, index)?;
                let expected = self.refs.get(cluster);
                if stored > 0 || expected > 0 {
                    highest = cluster;
                }
                if stored == expected {
                    continue;
                }
                let fixable = if stored == 0 {
                    self.rebuild = true;
                    false
                } else if stored > expected {
                    fix != CheckFix::None
                } else {
                    fix == CheckFix::All
                };
                let verb = if fixable {
                    "Repairing"
                } else if stored < expected {
                    "ERROR"
                } else {
                    "Leaked"
                };
                self.note(format!(
                    "{verb} cluster {cluster} refcount={stored} reference={expected}"
                ));
                if fixable {
                    rc.set(&mut block, index, expected)?;
                    changed = true;
                    if stored > expected {
                        self.report.leaks_fixed += 1;
                    } else {
                        self.report.corruptions_fixed += 1;
                    }
                } else if stored < expected {
                    self.report.corruptions += 1;
                } else {
                    self.report.leaks += 1;
                }
            }
            if changed {
                image.write_metadata(block_offset, &block, "repairing a refcount block")?;
            }
        }
        Ok(highest)
    }

    /// The version 3 requirement that each snapshot entry has at least 16 bytes of extra
    /// data. (QEMU rewrites the table to repair this; this engine does not write snapshot
    /// tables, so it stays a corruption.)
    pub(in crate::engine) fn check_snapshot_entries<S: Storage>(&mut self, image: &Image<S>) {
        for i in incomplete_snapshot_entries(image) {
            self.corruption(format!("ERROR snapshot table entry {i} is incomplete"));
        }
    }

    /// Notes the entries a repair rewrote with their extra data (`incomplete`, as
    /// [`incomplete_snapshot_entries`] listed them before).
    /// The repairs of a snapshot table over QEMU's limits (one line each), made by writing
    /// the part read as the table.
    pub(in crate::engine) fn snapshot_table_cut(&mut self, repairs: Vec<String>, fixed: u64) {
        for line in repairs {
            self.note(line);
        }
        self.report.corruptions_fixed += fixed;
    }

    pub(in crate::engine) fn snapshot_entries_repaired(&mut self, incomplete: &[usize]) {
        for i in incomplete {
            self.repaired(format!("Repairing snapshot table entry {i} is incomplete"));
        }
    }
}

/// The snapshot table entries of a version 3 image without the 16 bytes of extra data
/// (VM state size and disk size) version 3 requires: what a version 2 writer left, or a
/// version 2 image whose header was changed by hand. A repair writes the table again,
/// with every entry's extra data.
pub(in crate::engine) fn incomplete_snapshot_entries<S: Storage>(image: &Image<S>) -> Vec<usize> {
    if image.header.version < 3 {
        return Vec::new();
    }
    image
        .snapshots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.extra_data_size < snapshot::V3_MIN_EXTRA_DATA_BYTES)
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_above_u16_spill_and_come_back() {
        let mut refs = HostRefs::new(4, u64::MAX);
        refs.set(2, 70_000);
        assert_eq!(refs.get(2), 70_000);
        refs.set(2, 3);
        assert_eq!(refs.get(2), 3);
        assert!(refs.large.is_empty());
        refs.set(10, 1);
        assert_eq!(
            (refs.len(), refs.get(10), refs.get(9), refs.get(99)),
            (11, 1, 0, 0)
        );
        assert!(refs.any_in(10, 11) && !refs.any_in(3, 10) && !refs.any_in(50, 60));
    }

    #[test]
    fn occupied_ranges_merge_and_answer_overlaps() {
        let o = Occupied::from_ranges(vec![(100, 200), (0, 10), (150, 300), (300, 310)]);
        assert_eq!(o.0, vec![(0, 10), (100, 310)]);
        assert!(o.overlaps(5, 6) && o.overlaps(309, 400) && o.overlaps(50, 101));
        assert!(!o.overlaps(10, 100) && !o.overlaps(310, 1000));
    }
}
