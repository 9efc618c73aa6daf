//! Checking and repairing an image: what `qemu-img check [-r leaks|all]` does for qcow2, and
//! the refcount repair of an image opened with the dirty bit set.
//!
//! A check counts the references to every host cluster (`references.rs`), compares them with
//! the stored refcounts, then checks the COPIED flags of the active L1 and L2 entries against
//! the refcounts. The counts it reports are QEMU's (`BdrvCheckResult`), so the glue can hand
//! them over as they are.
//!
//! Repair order, so that a crash at any point leaves at worst leaked clusters (never a
//! refcount below its references, never a table naming a cluster that may be reused):
//! 1. the walk rewrites the L1 and L2 entries it drops or cleans up;
//! 2. ordering point: no refcount is lowered before the entries that stopped referencing the
//!    cluster are on disk;
//! 3. refcounts are fixed in place (raised or lowered), or, if the refcount structure itself
//!    is broken, rebuilt from the counted references (`rebuild.rs`: a new table and blocks
//!    past the end of the file, ordering point, the header switches to them, sync);
//! 4. ordering point: COPIED flags are set only once the refcount of 1 they promise is on
//!    disk;
//! 5. COPIED flags are fixed;
//! 6. ordering point, then the dirty bit (and the corrupt bit) are cleared if nothing is left
//!    to repair;
//! 7. the engine drops its caches and reloads the L1 and refcount tables, and a storage flush
//!    makes everything durable.
//!
//! Where this differs from QEMU 10's check (same counts otherwise):
//! - an L2 table, data or compressed cluster on top of other metadata is a corruption of its
//!   own (QEMU only sees the refcount mismatch); so is a refcount table sharing a cluster;
//! - repair drops references QEMU leaves in place (misaligned data clusters, clusters and L2
//!   tables past the end of the file, references into the header or an L1 or snapshot
//!   table) and clears reserved bits;
//! - a refcount block outside the file is replaced by a rebuild, where QEMU grows the file to
//!   reach it, and a misaligned one is rebuilt too (QEMU's repair gives up);
//! - a snapshot table QEMU would repair (too many snapshots, oversized extra data) is refused
//!   at open, and version 3 entries with less than 16 bytes of extra data stay reported as
//!   corruptions: this engine does not rewrite snapshot tables.

mod bitmaps;
mod rebuild;
mod references;

use crate::engine::check::references::{MetadataSpace, Walk};
use crate::engine::error::{Error, Result};
use crate::engine::format::bytes::{self, read_table};
use crate::engine::format::entry::REFTABLE_OFFSET_MASK;
use crate::engine::format::entry::{EntryFlags, OFFSET_MASK};
use crate::engine::format::header::IncompatibleFeatures;
use crate::engine::image::cache::TableCache;
use crate::engine::image::Image;
use crate::engine::storage::Storage;

/// Most messages a report keeps; later ones are only counted.
pub const MAX_CHECK_MESSAGES: usize = 1000;
/// Largest file a check handles, in clusters (the counting needs 2 bytes per cluster).
pub const MAX_CHECK_CLUSTERS: u64 = 1 << 31;
/// Byte offset of the incompatible feature bits in the header.
const INCOMPATIBLE_FIELD_OFFSET: u64 = 72;

/// What a check may repair (QEMU's `BdrvCheckMode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CheckFix {
    /// Report only.
    #[default]
    None,
    /// Lower refcounts that are too high (`BDRV_FIX_LEAKS`).
    Leaks,
    /// Repair everything repairable (`BDRV_FIX_LEAKS | BDRV_FIX_ERRORS`).
    All,
}

/// Allocation and fragmentation of the active image (QEMU's `BlockFragInfo`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentationInfo {
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters with a host cluster (data, preallocated zero, compressed).
    pub allocated_clusters: u64,
    /// Allocated clusters not stored right after the previous one of their L2 table.
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
}

/// The result of [`Image::check`] (the fields of QEMU's `BdrvCheckResult`), with the messages
/// `qemu-img check` would print.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Inconsistencies left that may lose data or make writes corrupt the image.
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references (space lost, nothing worse).
    pub leaks: u64,
    /// Things the check could not examine (unreadable refcounts) or failed to repair.
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    /// End of the last cluster with a refcount or a reference.
    pub image_end_offset: u64,
    pub fragmentation: FragmentationInfo,
    /// The refcount table and blocks were rebuilt from the references.
    pub rebuilt_refcounts: bool,
    /// One line per problem, in QEMU's words ("Leaked cluster 9 refcount=1 reference=0").
    pub messages: Vec<String>,
    /// Messages left out past `MAX_CHECK_MESSAGES` (1000).
    pub messages_dropped: u64,
}

impl CheckReport {
    /// No corruption, leak or check error is left.
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }

    pub(super) fn note(&mut self, msg: String) {
        if self.messages.len() < MAX_CHECK_MESSAGES {
            self.messages.push(msg);
        } else {
            self.messages_dropped += 1;
        }
    }

    fn counts(&self) -> Counts {
        Counts {
            corruptions: self.corruptions,
            leaks: self.leaks,
            check_errors: self.check_errors,
            corruptions_fixed: self.corruptions_fixed,
            leaks_fixed: self.leaks_fixed,
        }
    }

    fn restore(&mut self, c: Counts) {
        self.corruptions = c.corruptions;
        self.leaks = c.leaks;
        self.check_errors = c.check_errors;
        self.corruptions_fixed = c.corruptions_fixed;
        self.leaks_fixed = c.leaks_fixed;
    }
}

#[derive(Clone, Copy)]
struct Counts {
    corruptions: u64,
    leaks: u64,
    check_errors: u64,
    corruptions_fixed: u64,
    leaks_fixed: u64,
}

/// Stored refcounts read straight from the file, a few blocks cached (for the COPIED check).
struct StoredRefcounts {
    blocks: Vec<(u64, Vec<u8>)>,
}

impl StoredRefcounts {
    const CACHED_BLOCKS: usize = 8;

    /// The stored refcount of `cluster`; None where QEMU could not read it either (a
    /// misaligned refcount block offset).
    fn get<S: Storage>(&mut self, image: &Image<S>, cluster: u64) -> Result<Option<u64>> {
        let (block_index, index) = image.rc.locate(cluster);
        let raw = usize::try_from(block_index)
            .ok()
            .and_then(|i| image.reftable.get(i))
            .copied()
            .unwrap_or(0);
        let offset = raw & REFTABLE_OFFSET_MASK;
        if offset == 0 {
            return Ok(Some(0));
        }
        if !offset.is_multiple_of(image.cluster_size()) {
            return Ok(None);
        }
        if let Some((_, block)) = self.blocks.iter().find(|(o, _)| *o == offset) {
            return image.rc.get(block, index).map(Some);
        }
        let mut block = vec![0u8; image.cluster_size() as usize];
        image
            .storage
            .read_at(offset, &mut block)
            .map_err(|e| Error::io(format!("reading the refcount block at {offset:#x}"), e))?;
        let value = image.rc.get(&block, index)?;
        if self.blocks.len() >= Self::CACHED_BLOCKS {
            self.blocks.remove(0);
        }
        self.blocks.push((offset, block));
        Ok(Some(value))
    }
}

impl<S: Storage> Image<S> {
    /// Checks the image's metadata and, as `fix` allows, repairs it; like `qemu-img check`.
    ///
    /// Dirty metadata is flushed first. A read-only image is only checked. After a repair the
    /// engine's caches and tables are reloaded from disk, and the repair is durable when this
    /// returns. A report with `check_errors` means the check could not finish its work (QEMU
    /// returns -EIO then; for example, `CheckFix::Leaks` when only a rebuild of the refcount
    /// structure would do).
    pub fn check(&mut self, fix: CheckFix) -> Result<CheckReport> {
        // In the txg mode the group commits first: the check sees the durable image, and a
        // repair writes in place with the ordinary ordering rules.
        self.outside_group(|image| image.check_outside_group(fix))
    }

    fn check_outside_group(&mut self, fix: CheckFix) -> Result<CheckReport> {
        let fix = if self.read_only { CheckFix::None } else { fix };
        if !self.read_only {
            // Reserved clusters are counted but named by nothing: not leaks of the image.
            self.release_reserve()?;
            self.flush_metadata_and_sync(false)?;
        }
        let file_len = self.file_len()?;
        let clusters = file_len.div_ceil(self.cluster_size());
        if clusters > MAX_CHECK_CLUSTERS {
            return Err(Error::Unsupported(format!(
                "checking a file of {clusters} clusters (limit {MAX_CHECK_CLUSTERS})"
            )));
        }
        let result = self.check_and_repair(fix, file_len);
        if fix != CheckFix::None {
            // Whatever happened, the caches must not outlive changes made on disk.
            self.reload_after_repair()?;
            self.storage_flush()?;
        }
        result
    }

    pub(super) fn file_len(&self) -> Result<u64> {
        self.storage
            .len()
            .map_err(|e| Error::io("getting the image file length", e))
    }

    fn check_and_repair(&mut self, fix: CheckFix, file_len: u64) -> Result<CheckReport> {
        // Step 0: snapshot table entries a version 3 image needs longer are written again
        // (`snapshots.rs`: the table, then the header naming it), before anything is counted.
        let incomplete = references::incomplete_snapshot_entries(self);
        // A table over QEMU's limits was read in part (`format::snapshot::TableOverLimits`):
        // only a repair of errors goes on, and writes that part as the table.
        let over_limits = self.snapshot_table_over_limits.clone();
        if let (Some(over), false) = (&over_limits, fix == CheckFix::All) {
            return Err(Error::Refused {
                errno: libc::EFBIG,
                msg: over.check_refusal(),
            });
        }
        let rewrite = fix == CheckFix::All && (!incomplete.is_empty() || over_limits.is_some());
        let file_len = if rewrite {
            self.switch_snapshot_table(self.snapshots.clone())?;
            self.flush_metadata_and_sync(false)?;
            self.file_len()?
        } else {
            file_len
        };
        let mut walk = Walk::new(self, fix, file_len);
        walk.report.fragmentation.total_clusters =
            self.header.virtual_size.div_ceil(self.cluster_size());
        if rewrite {
            if let Some(over) = &over_limits {
                walk.snapshot_table_cut(over.repairs(), over.corruptions());
            }
            walk.snapshot_entries_repaired(&incomplete);
        } else {
            walk.check_snapshot_entries(self);
        }
        walk.count_all(self)?;
        if walk.wrote_entries {
            // Step 2: dropped references reach the disk before any refcount is lowered.
            self.ordering_point()?;
        }

        let before_compare = walk.report.counts();
        let mut highest = walk.compare(self, CheckFix::None)?;
        let mut report = if walk.rebuild && fix == CheckFix::All {
            self.rebuild_and_recount(walk, &mut highest)?
        } else if fix != CheckFix::None {
            if walk.rebuild {
                walk.report.check_errors += 1;
                walk.report
                    .note("ERROR need to rebuild refcount structures".into());
                walk.report.image_end_offset = (highest + 1) << self.cluster_bits;
                return Ok(walk.report);
            }
            if walk.report.leaks > 0 || walk.report.corruptions > 0 {
                walk.report.restore(before_compare);
                highest = walk.compare(self, fix)?;
            }
            walk.report
        } else {
            walk.report
        };

        if fix != CheckFix::None {
            // Step 4: the refcounts the COPIED flags are checked against are on disk.
            self.ordering_point()?;
        }
        self.check_copied_flags(&mut report, fix)?;
        report.image_end_offset = (highest + 1) << self.cluster_bits;
        if fix != CheckFix::None && report.corruptions == 0 && report.check_errors == 0 {
            self.mark_clean_and_consistent()?;
        }
        Ok(report)
    }

    /// Rebuilds the refcount structure from the walk's references, then counts and compares
    /// again (fixing leaks the rebuild may have left) to report what remains.
    fn rebuild_and_recount(&mut self, mut walk: Walk, highest: &mut u64) -> Result<CheckReport> {
        walk.report.note("Rebuilding refcount structure".into());
        self.rebuild_refcount_structure(&mut walk.refs, &walk.refcount_structure)?;
        let mut report = walk.report;
        report.rebuilt_refcounts = true;
        let old_corruptions = report.corruptions;
        let old_leaks = report.leaks;
        // Refcounts that were unreadable are moot now that the structure is new.
        report.check_errors -= walk.unreadable_refcounts.min(report.check_errors);

        let file_len = self.file_len()?;
        let mut verify = Walk::new(self, CheckFix::None, file_len);
        verify.quiet = true;
        verify.count_all(self)?;
        verify.quiet = false;
        let walked = verify.report.counts();
        *highest = verify.compare(self, CheckFix::Leaks)?;
        if verify.rebuild || verify.report.corruptions > walked.corruptions {
            verify
                .report
                .note("ERROR rebuilt refcount structure is still broken".into());
        }
        report.corruptions = verify.report.corruptions;
        report.check_errors += verify.report.check_errors;
        report.corruptions_fixed += old_corruptions.saturating_sub(report.corruptions);
        report.leaks_fixed += old_leaks;
        report.leaks = verify.report.leaks;
        for msg in verify.report.messages {
            report.note(msg);
        }
        Ok(report)
    }

    /// Checks that the COPIED flag of each active L1 and L2 entry says exactly whether the
    /// stored refcount of what it names is 1 (QEMU's `check_oflag_copied`). Repairs with
    /// [`CheckFix::All`], and with [`CheckFix::Leaks`] when nothing else is wrong (the
    /// refcounts are trustworthy then).
    fn check_copied_flags(&mut self, report: &mut CheckReport, fix: CheckFix) -> Result<()> {
        let repair = match fix {
            CheckFix::All => true,
            CheckFix::Leaks => {
                report.check_errors == 0 && report.corruptions == 0 && report.leaks == 0
            }
            CheckFix::None => false,
        };
        let verb = if repair { "Repairing" } else { "ERROR" };
        let cluster_size = self.cluster_size();
        let file_len = self.file_len()?;
        let mut stored = StoredRefcounts { blocks: Vec::new() };
        let l1_offset = self.header.l1_table_offset;
        let l1_entries = u64::from(self.header.l1_size_entries);
        let l1 = read_table(&self.storage, l1_offset, l1_entries, "the L1 table")?;
        let metadata = MetadataSpace::of(self);
        for (l1_index, &l1_entry) in l1.iter().enumerate() {
            let l2_offset = l1_entry & OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            let Some(refcount) = stored.get(self, l2_offset >> self.cluster_bits)? else {
                continue;
            };
            if (refcount == 1) != (l1_entry & EntryFlags::COPIED.bits() != 0) {
                report.note(format!(
                    "{verb} OFLAG_COPIED L2 cluster: l1_index={l1_index} l1_entry={l1_entry:x} \
                     refcount={refcount}"
                ));
                if repair {
                    let fixed = l1_entry ^ EntryFlags::COPIED.bits();
                    let at = l1_offset + l1_index as u64 * 8;
                    self.write_metadata(at, &fixed.to_be_bytes(), "repairing an L1 entry")?;
                    report.corruptions_fixed += 1;
                } else {
                    report.corruptions += 1;
                }
            }
            // Tables QEMU could only read garbage or zeros from were reported by the walk.
            // Data clusters of an external data file have no refcount to agree with.
            if !l2_offset.is_multiple_of(cluster_size)
                || l2_offset >= file_len
                || self.header.has_data_file()
            {
                continue;
            }
            let mut table = read_table(&self.storage, l2_offset, cluster_size / 8, "an L2 table")?;
            let mut flipped = 0u64;
            // The descriptor of each entry (an extended entry's bitmap follows it).
            for slot in table.iter_mut().step_by(self.l2_width.words()) {
                let entry = *slot;
                let data_offset = entry & OFFSET_MASK;
                if entry & EntryFlags::COMPRESSED.bits() != 0 || data_offset == 0 {
                    continue;
                }
                let Some(refcount) = stored.get(self, data_offset >> self.cluster_bits)? else {
                    continue;
                };
                if (refcount == 1) != (entry & EntryFlags::COPIED.bits() != 0) {
                    report.note(format!(
                        "{verb} OFLAG_COPIED data cluster: l2_entry={entry:x} \
                         refcount={refcount}"
                    ));
                    if repair {
                        *slot = entry ^ EntryFlags::COPIED.bits();
                        flipped += 1;
                    } else {
                        report.corruptions += 1;
                    }
                }
            }
            if flipped > 0 {
                if metadata.overlaps(l2_offset, l2_offset + cluster_size) {
                    report.check_errors += 1;
                    report.corruptions += flipped;
                    report.note(format!(
                        "ERROR: Could not write L2 table at {l2_offset:#x}; metadata overlap \
                         check failed"
                    ));
                    continue;
                }
                let bytes = bytes::encode_table(&table);
                self.write_metadata(l2_offset, &bytes, "repairing COPIED flags in an L2 table")?;
                report.corruptions_fixed += flipped;
            }
        }
        Ok(())
    }

    /// Clears the dirty and corrupt bits (when set) once the refcounts they warn about are
    /// on disk (QEMU's `qcow2_mark_clean` and `qcow2_mark_consistent`).
    fn mark_clean_and_consistent(&mut self) -> Result<()> {
        let bits = IncompatibleFeatures::DIRTY | IncompatibleFeatures::CORRUPT;
        if self.header.version < 3 || !self.header.incompatible.intersects(bits) {
            return Ok(());
        }
        // Step 6: everything the bits stood for is repaired and on disk before they go.
        self.ordering_point()?;
        let cleared = self.header.incompatible - bits;
        self.write_metadata(
            INCOMPATIBLE_FIELD_OFFSET,
            &cleared.bits().to_be_bytes(),
            "clearing the dirty and corrupt bits",
        )?;
        self.header.incompatible = cleared;
        Ok(())
    }

    /// Drops every cache and in-memory table a repair may have made stale, and reads the L1
    /// and refcount tables again.
    fn reload_after_repair(&mut self) -> Result<()> {
        let file_len = self.file_len()?;
        self.l1 = read_table(
            &self.storage,
            self.header.l1_table_offset,
            u64::from(self.header.l1_size_entries),
            "the L1 table",
        )?;
        let reftable_entries =
            (u64::from(self.header.refcount_table_clusters) << self.cluster_bits) / 8;
        self.reftable = read_table(
            &self.storage,
            self.header.refcount_table_offset,
            reftable_entries,
            "the refcount table",
        )?;
        self.l1_dirty.clear();
        self.reftable_dirty.clear();
        self.metadata.reload_tables(&self.l1, &self.reftable);
        self.l2_cache = TableCache::new(self.l2_cache.capacity_tables());
        self.refblock_cache = TableCache::new(self.refblock_cache.capacity_tables());
        self.pending_frees.clear();
        self.copied_candidates.clear();
        self.quarantine.clear();
        self.discard.on_release.clear();
        self.discard.due.clear();
        self.free_cluster_hint = 0;
        self.host_end = self.host_end.max(file_len);
        Ok(())
    }

    /// Called by `open` for a read-write open of an image with the dirty bit: repairs every
    /// refcount (as QEMU does before its first write) and clears the bit. Refuses the image if
    /// anything is left that the repair could not fix.
    pub(super) fn repair_dirty_image(&mut self) -> Result<()> {
        let report = self.check(CheckFix::All)?;
        if report.corruptions > 0 || report.check_errors > 0 {
            let first: Vec<&str> = report.messages.iter().take(3).map(|m| m.as_str()).collect();
            return Err(Error::Corrupt(format!(
                "the image is dirty (incompatible feature bit 0) and its repair left {} \
                 corruptions and {} check errors ({}); open it read-only",
                report.corruptions,
                report.check_errors,
                first.join("; ")
            )));
        }
        Ok(())
    }
}
