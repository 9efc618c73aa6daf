//! Internal snapshots: taking one, applying one (revert), deleting one, reading one in place
//! of the active tables (`load_tmp`), and the VM state a snapshot keeps in the image.
//!
//! How qcow2 counts: a host cluster's refcount is the number of paths that reach it, one per
//! (L1 table, L2 entry) naming it: an L2 table named by the active L1 table and by a
//! snapshot's counts 2, and so does every cluster it names. COPIED marks an active entry
//! whose cluster has refcount 1, the only one a write may change in place; every other write
//! copies first (`l2_table_for_write`, the allocating write path), which is what keeps a
//! snapshot's data unchanged.
//!
//! Every operation starts and ends with a durability point, so that it starts from metadata
//! that is all on storage and leaves nothing of it to a later flush; in the txg mode the open
//! group commits first and the operation writes in place with the ordinary rules
//! (`Image::outside_group`). The write order of each, and why a crash anywhere leaves a valid
//! image (at worst leaked clusters), is stated at the function.
//!
//! The VM state of a snapshot (savevm) lives in guest clusters past the disk: from the first
//! L1 entry after the virtual size on (QEMU's `qcow2_vm_state_offset`), written into the
//! active tables before the snapshot is taken, so that the snapshot's copy of the L1 table
//! names it; taking the snapshot then unmaps it from the active tables.

use crate::engine::error::{Error, Result};
use crate::engine::format::entry::{Cluster, EntryFlags, L1Entry};
use crate::engine::format::layout::{bytes_per_l1_entry, Region, MAX_L1_BYTES, MAX_SNAPSHOTS};
use crate::engine::format::snapshot::{
    encode_table, Snapshot, SNAPSHOT_L1_REGION, SNAPSHOT_TABLE_REGION,
};
use crate::engine::image::discard::FreeKind;
use crate::engine::image::txg::CommitReason;
use crate::engine::image::Image;
use crate::engine::storage::Storage;

/// Header bytes 60..72: nb_snapshots (4) and snapshots_offset (8), written as one.
const SNAPSHOT_FIELDS_OFFSET: u64 = 60;

/// What the caller says about a snapshot it takes (QEMU's `QEMUSnapshotInfo`); the id is
/// always the next free number, as QEMU's qcow2 makes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotParams {
    pub name: Vec<u8>,
    pub date_sec: u32,
    pub date_nsec: u32,
    /// Guest clock at the snapshot, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Bytes of VM state written with [`Image::write_vmstate`] before the snapshot (0: a disk
    /// only snapshot).
    pub vm_state_size: u64,
    /// Instruction count, when the VM records one.
    pub icount: Option<u64>,
}

fn not_found(msg: &str) -> Error {
    Error::Refused {
        errno: libc::ENOENT,
        msg: msg.into(),
    }
}

impl<S: Storage> Image<S> {
    /// Where the VM state starts: the first L1 entry's range after the virtual size.
    pub fn vm_state_offset(&self) -> u64 {
        let per_l1 = bytes_per_l1_entry(self.cluster_bits, self.l2_width);
        self.header.virtual_size.div_ceil(per_l1) * per_l1
    }

    /// Whether the range `[offset, offset + len)` lies in the VM state area and the active L1
    /// table covers it (a read-write open makes it cover it first): `check_range` for the
    /// VM state's reads and writes.
    pub(super) fn in_vm_state_area(&self, offset: u64, len: u64) -> bool {
        let per_l1 = bytes_per_l1_entry(self.cluster_bits, self.l2_width);
        let covered = (self.l1.len() as u64).saturating_mul(per_l1);
        self.vm_state_io
            && offset >= self.vm_state_offset()
            && offset.checked_add(len).is_some_and(|end| end <= covered)
    }

    /// Refuses what no snapshot operation may run on.
    fn check_snapshot_operation(&self) -> Result<()> {
        if self.data_file.is_some() {
            // QEMU's qcow2 refuses it too (ENOTSUP): guest clusters at fixed places in the
            // data file cannot be shared by two trees.
            return Err(Error::Unsupported(
                "internal snapshots of an image with an external data file".into(),
            ));
        }
        if self.write_plans_in_flight > 0 || !self.inflight_allocs.is_empty() {
            return Err(Error::Invalid(
                "a snapshot operation while guest writes are in flight (drain first)".into(),
            ));
        }
        Ok(())
    }

    /// Writes `buf` at `pos` of the VM state area (QEMU's `bdrv_save_vmstate`), growing the
    /// active L1 table to cover it. The clusters are ordinary guest clusters of the active
    /// tables until a snapshot takes them.
    pub fn write_vmstate(&mut self, pos: u64, buf: &[u8]) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_snapshot_operation()?;
        let offset = self.vm_state_offset().checked_add(pos);
        let end = offset.and_then(|o| o.checked_add(buf.len() as u64));
        let (Some(offset), Some(end)) = (offset, end) else {
            return Err(Error::BadOption(format!("VM state offset {pos} too large")));
        };
        let per_l1 = bytes_per_l1_entry(self.cluster_bits, self.l2_width);
        let needed_l1 = end.div_ceil(per_l1);
        if needed_l1 > self.l1.len() as u64 {
            if needed_l1.saturating_mul(8) > MAX_L1_BYTES {
                return Err(Error::Unsupported(format!(
                    "VM state up to {end} bytes needs an L1 table above {MAX_L1_BYTES} bytes"
                )));
            }
            // A transaction group commits first; the new table is written in place, in order.
            self.outside_group(|image| image.grow_l1_table(needed_l1, None))?;
        }
        self.vm_state_io = true;
        let written = self.write(offset, buf, None);
        self.vm_state_io = false;
        written
    }

    /// Reads `buf` from `pos` of the VM state area (QEMU's `bdrv_load_vmstate`): what
    /// [`Image::write_vmstate`] wrote, or what the snapshot applied last holds there; zeros
    /// where nothing was written.
    pub fn read_vmstate(&mut self, pos: u64, buf: &mut [u8]) -> Result<()> {
        let Some(offset) = self.vm_state_offset().checked_add(pos) else {
            return Err(Error::BadOption(format!("VM state offset {pos} too large")));
        };
        let per_l1 = bytes_per_l1_entry(self.cluster_bits, self.l2_width);
        let covered = (self.l1.len() as u64).saturating_mul(per_l1);
        let inside = covered.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        if inside == 0 {
            return Ok(());
        }
        self.vm_state_io = true;
        let read = self.read(offset, &mut buf[..inside], None);
        self.vm_state_io = false;
        read
    }

    /// The snapshot whose id is `id_or_name`, else the first whose name is (QEMU's
    /// `find_snapshot_by_id_or_name`).
    pub fn find_snapshot(&self, id_or_name: &[u8]) -> Option<usize> {
        let by_id = self.snapshots.iter().position(|s| s.id == id_or_name);
        by_id.or_else(|| self.snapshots.iter().position(|s| s.name == id_or_name))
    }

    /// The snapshot with this id and this name, where given (QEMU's
    /// `find_snapshot_by_id_and_name`; neither given finds none).
    pub fn find_snapshot_by(&self, id: Option<&[u8]>, name: Option<&[u8]>) -> Option<usize> {
        if id.is_none() && name.is_none() {
            return None;
        }
        self.snapshots
            .iter()
            .position(|s| id.is_none_or(|id| s.id == id) && name.is_none_or(|n| s.name == n))
    }

    /// Takes an internal snapshot of the active tables (and of the VM state written before,
    /// `params.vm_state_size` bytes of it). Returns the snapshot as the table now holds it.
    ///
    /// Write order (each step written before the next):
    /// 1. a durability point: the metadata in memory is all on storage;
    /// 2. the copy of the active L1 table, in new clusters; COPIED cleared in the active L1
    ///    and L2 entries; ordering point; the refcount of every cluster the active tables
    ///    reach raised by one; the new snapshot table, in new clusters, naming the copy;
    /// 3. ordering point; the header's nb_snapshots and snapshots_offset, one 12-byte write;
    /// 4. ordering point; the old table's clusters freed and the VM state unmapped from the
    ///    active tables (write-back stage 5, rule (d)); a durability point.
    ///
    /// A crash before 3 leaves the old snapshot table in force: the raised refcounts and the
    /// new clusters are leaks, and COPIED may be missing on clusters counted once (QEMU's
    /// check reports that as an OFLAG_COPIED error and repairs it; a write copies such a
    /// cluster first, so no data is at risk). COPIED is never left on a cluster counted
    /// twice. After 3, the snapshot, every cluster it reaches counted for it.
    pub fn create_snapshot(&mut self, params: &SnapshotParams) -> Result<Snapshot> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_snapshot_operation()?;
        if self.snapshots.len() as u64 >= u64::from(MAX_SNAPSHOTS) {
            return Err(Error::Refused {
                errno: libc::EFBIG,
                msg: format!("an image holds at most {MAX_SNAPSHOTS} snapshots"),
            });
        }
        self.outside_group(|image| image.create_snapshot_in_place(params))
    }

    fn create_snapshot_in_place(&mut self, params: &SnapshotParams) -> Result<Snapshot> {
        self.durability_point(false, CommitReason::Durability)?;
        let cluster_size = self.cluster_size();
        let next_id = self
            .snapshots
            .iter()
            .filter_map(|s| std::str::from_utf8(&s.id).ok()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;

        // 2. The copy of the active L1 table (its flags as they are: only the active tables'
        // COPIED means anything).
        let l1_copy = self.l1.clone();
        let l1_bytes = l1_copy.len() as u64 * 8;
        let l1_offset = if l1_copy.is_empty() {
            0
        } else {
            let offset = self.alloc_snapshot_clusters(l1_bytes.div_ceil(cluster_size))?;
            let raw = crate::engine::format::bytes::encode_table(&l1_copy);
            self.write_metadata(offset, &raw, "writing a snapshot's copy of the L1 table")?;
            offset
        };
        // COPIED leaves the active entries before their clusters are counted twice: a crash
        // between the two shows a cluster counted once without COPIED (a write copies it
        // first: nothing at risk), never one counted twice with COPIED.
        let references = self.tree_references(&l1_copy)?;
        // Refused (refcount overflow) before anything changes but the copy's leaked clusters.
        let counts = self.raised_refcounts(references)?;
        self.clear_active_copied_flags()?;
        self.write_back()?;
        self.ordering_point()?;
        self.set_refcounts(counts)?;

        let snapshot = Snapshot {
            id: next_id.to_string().into_bytes(),
            name: params.name.clone(),
            date_sec: params.date_sec,
            date_nsec: params.date_nsec,
            vm_clock_nsec: params.vm_clock_nsec,
            vm_state_size: params.vm_state_size,
            disk_size: self.header.virtual_size,
            icount: params.icount,
            l1_table_offset: l1_offset,
            l1_size_entries: l1_copy.len() as u32,
            extra_data_size: 0,
            entry_offset: 0,
            raw: Vec::new(),
        };
        let mut table = self.snapshots.clone();
        table.push(snapshot);
        self.switch_snapshot_table(table)?;

        // 4. The VM state belongs to the snapshot now; the active tables let go of it.
        self.unmap_vm_state(params.vm_state_size)?;
        self.durability_point(false, CommitReason::Durability)?;
        self.snapshots
            .last()
            .cloned()
            .ok_or_else(|| Error::Corrupt("the snapshot just taken vanished".into()))
    }

    /// Applies (reverts to) the snapshot whose id or name is `id_or_name`: the active tables
    /// become a copy of its tables, the virtual size its disk size.
    ///
    /// Write order:
    /// 1. a durability point;
    /// 2. the refcount of every cluster the snapshot's tables reach raised by one
    ///    (write-back, refcount blocks only);
    /// 3. a new active L1 table holding the snapshot's entries, in new clusters; ordering
    ///    point; the header names it, with the snapshot's disk size, in one write
    ///    ([`Image::replace_l1_table`]);
    /// 4. ordering point; the refcounts of what the old active tables reached, and of the old
    ///    L1 table, lowered (stage 5, rule (d));
    /// 5. COPIED set anew on the active entries whose clusters are now counted once, after
    ///    the decrements that brought them there are written (rule (e)); a durability point.
    ///    (Between 4 and 5 a crash leaves COPIED missing on clusters counted once: see
    ///    [`Image::create_snapshot`].)
    ///
    /// A crash before the header write of 3 leaves the old active tables, everything the
    /// snapshot reaches counted once more (leaks); after it, the snapshot's tables in force,
    /// the old ones counted until 4 (leaks).
    pub fn goto_snapshot(&mut self, id_or_name: &[u8]) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_snapshot_operation()?;
        let index = self
            .find_snapshot(id_or_name)
            .ok_or_else(|| not_found("Can't find snapshot"))?;
        self.outside_group(|image| image.goto_snapshot_in_place(index))
    }

    fn goto_snapshot_in_place(&mut self, index: usize) -> Result<()> {
        self.durability_point(false, CommitReason::Durability)?;
        let snapshot = self.snapshots[index].clone();
        let snapshot_l1 = self.snapshot_l1(&snapshot)?;
        let per_l1 = bytes_per_l1_entry(self.cluster_bits, self.l2_width);
        let needed = snapshot.disk_size.div_ceil(per_l1);
        if needed.saturating_mul(8) > MAX_L1_BYTES {
            return Err(Error::Invalid(format!(
                "snapshot {}: a disk size of {} bytes needs an L1 table above {MAX_L1_BYTES} \
                 bytes",
                String::from_utf8_lossy(&snapshot.id),
                snapshot.disk_size
            )));
        }
        let references = self.tree_references(&snapshot_l1)?;
        let counts = self.raised_refcounts(references)?;
        self.set_refcounts(counts)?;
        let old_l1 = self.l1.clone();
        let old_references = self.tree_references(&old_l1)?;

        let mut table: Vec<u64> = snapshot_l1
            .iter()
            .map(|&e| e & !EntryFlags::COPIED.bits())
            .collect();
        if (table.len() as u64) < needed {
            table.resize(needed as usize, 0);
        }
        // write_back inside: the increments reach storage before the new table does.
        self.replace_l1_table(table.len() as u64, Some(snapshot.disk_size), |_| table)?;
        self.l1_dirty.clear();
        self.metadata.reload_tables(&self.l1, &self.reftable);
        self.free_later(old_references, FreeKind::Snapshot);
        self.write_back()?;
        self.l2_cache.evict_clean();
        self.restore_active_copied_flags()?;
        self.durability_point(false, CommitReason::Durability)
    }

    /// Deletes the snapshot with this id and name (where given). Returns it.
    ///
    /// Write order, the reverse of taking one:
    /// 1. a durability point;
    /// 2. a new snapshot table without it, in new clusters (write-back: their refcounts);
    ///    ordering point; the header's nb_snapshots and snapshots_offset, one write;
    /// 3. ordering point; the refcounts of what the snapshot's tables reach, of its L1 table
    ///    and of the old snapshot table lowered (stage 5, rule (d));
    /// 4. COPIED set anew where a cluster is now counted once (rule (e)); a durability point.
    ///
    /// A crash before the header write leaves the snapshot; after it, the snapshot gone and
    /// its clusters counted until 3 (leaks).
    pub fn delete_snapshot(&mut self, id: Option<&[u8]>, name: Option<&[u8]>) -> Result<Snapshot> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_snapshot_operation()?;
        let index = self
            .find_snapshot_by(id, name)
            .ok_or_else(|| not_found("Can't find the snapshot"))?;
        self.outside_group(|image| image.delete_snapshot_in_place(index))
    }

    fn delete_snapshot_in_place(&mut self, index: usize) -> Result<Snapshot> {
        self.durability_point(false, CommitReason::Durability)?;
        let snapshot = self.snapshots[index].clone();
        let snapshot_l1 = self.snapshot_l1(&snapshot)?;
        let references = self.tree_references(&snapshot_l1)?;
        let mut table = self.snapshots.clone();
        table.remove(index);
        self.switch_snapshot_table(table)?;
        self.free_later(references, FreeKind::Snapshot);
        let l1_clusters = (u64::from(snapshot.l1_size_entries) * 8).div_ceil(self.cluster_size());
        let l1_first = snapshot.l1_table_offset >> self.cluster_bits;
        self.free_later(l1_first..l1_first + l1_clusters, FreeKind::Snapshot);
        self.write_back()?;
        self.l2_cache.evict_clean();
        self.restore_active_copied_flags()?;
        self.durability_point(false, CommitReason::Durability)?;
        Ok(snapshot)
    }

    /// Reads the snapshot with this id and name (where given) in place of the active tables,
    /// in memory only, for a read-only image (QEMU's `bdrv_snapshot_load_tmp`: `qemu-img
    /// convert -l`). The image shows the snapshot until it is closed.
    pub fn load_snapshot_tmp(&mut self, id: Option<&[u8]>, name: Option<&[u8]>) -> Result<()> {
        if !self.read_only {
            return Err(Error::Invalid(
                "a snapshot is loaded temporarily only into a read-only image".into(),
            ));
        }
        let index = self
            .find_snapshot_by(id, name)
            .ok_or_else(|| not_found("Can't find snapshot"))?;
        let snapshot = self.snapshots[index].clone();
        self.l1 = self.snapshot_l1(&snapshot)?;
        self.header.l1_table_offset = snapshot.l1_table_offset;
        self.header.l1_size_entries = snapshot.l1_size_entries;
        self.metadata.reload_tables(&self.l1, &self.reftable);
        self.l2_cache.evict_clean();
        Ok(())
    }

    /// The L1 table of `snapshot`, read from storage (its place was validated at open).
    fn snapshot_l1(&self, snapshot: &Snapshot) -> Result<Vec<u64>> {
        crate::engine::format::bytes::read_table(
            &self.storage,
            snapshot.l1_table_offset,
            u64::from(snapshot.l1_size_entries),
            "a snapshot's L1 table",
        )
    }

    /// Every host cluster the tree under `l1` holds a reference to, once per path: each L2
    /// table once per L1 entry naming it, each cluster once per L2 entry naming it (the
    /// host clusters a compressed cluster's bytes touch, each one).
    fn tree_references(&mut self, l1: &[u64]) -> Result<Vec<u64>> {
        let cluster_size = self.cluster_size();
        let per_table = 1u64 << self.l2_bits();
        let mut references = Vec::new();
        for (l1_index, &raw) in l1.iter().enumerate() {
            let l2_offset = L1Entry(raw).l2_offset(cluster_size, l1_index as u64)?;
            if l2_offset == 0 {
                continue;
            }
            self.check_host_offset(l2_offset, || format!("L2 table of L1 entry {l1_index}"))?;
            references.push(l2_offset >> self.cluster_bits);
            let table = self.l2_table_bytes(l2_offset)?;
            for l2_index in 0..per_table {
                let guest_cluster = (l1_index as u64) * per_table + l2_index;
                let (raw, bitmap) = self.l2_slot_in(&table, l2_offset, l2_index as usize)?;
                let cluster = self.decode_l2(raw, bitmap, guest_cluster)?;
                references.extend(self.host_clusters_of(cluster));
            }
        }
        Ok(references)
    }

    /// Clusters for a snapshot's L1 table or the snapshot table: the first free one when one
    /// is enough (where QEMU's qcow2 puts it, so that a failure leaks the same cluster),
    /// a run past everything in use otherwise.
    fn alloc_snapshot_clusters(&mut self, count: u64) -> Result<u64> {
        if count == 1 {
            return self.alloc_cluster();
        }
        self.alloc_contiguous(count)
    }

    /// The refcount each cluster gets when raised by one per time it is listed. Refuses,
    /// changing nothing, if one would pass the largest refcount the image's width holds
    /// (EINVAL, as QEMU's qcow2: with `refcount_bits=1` no cluster can be shared).
    fn raised_refcounts(&mut self, mut clusters: Vec<u64>) -> Result<Vec<(u64, u64)>> {
        clusters.sort_unstable();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for c in clusters {
            match runs.last_mut() {
                Some((last, n)) if *last == c => *n += 1,
                _ => runs.push((c, 1)),
            }
        }
        let max = self.rc.max_refcount();
        for (cluster, n) in runs.iter_mut() {
            let count = self.refcount(*cluster)?;
            match count.checked_add(*n).filter(|&c| c <= max) {
                Some(raised) => *n = raised,
                None => {
                    return Err(Error::Refused {
                        errno: libc::EINVAL,
                        msg: format!(
                            "the refcount of host cluster {cluster} would pass {max} \
                             (refcount_bits={})",
                            self.rc.refcount_bits()
                        ),
                    })
                }
            }
        }
        Ok(runs)
    }

    /// Sets the refcounts [`Self::raised_refcounts`] gave, in the cache (an increment may
    /// reach storage at any time: at worst a leak).
    fn set_refcounts(&mut self, counts: Vec<(u64, u64)>) -> Result<()> {
        for (cluster, count) in counts {
            self.set_refcount(cluster, count)?;
        }
        Ok(())
    }

    /// The bytes of the L2 table at `l2_offset`: the cached copy if there is one, else read
    /// from storage without caching it (a snapshot's tables are walked once).
    fn l2_table_bytes(&self, l2_offset: u64) -> Result<Vec<u8>> {
        if let Some(table) = self.l2_cache.peek(l2_offset) {
            return Ok(table.to_vec());
        }
        let mut table = vec![0u8; self.cluster_size() as usize];
        self.storage
            .read_at(l2_offset, &mut table)
            .map_err(|e| Error::io(format!("reading the L2 table at {l2_offset:#x}"), e))?;
        Ok(table)
    }

    /// Clears COPIED in every active L1 and L2 entry: everything they name is counted twice
    /// once the snapshot is taken (the refcount increments went to the cache before).
    fn clear_active_copied_flags(&mut self) -> Result<()> {
        self.set_active_copied_flags(|_, _| Ok(false))
    }

    /// Sets COPIED on exactly the active entries whose cluster has refcount one, and clears
    /// it elsewhere (after a snapshot was applied or deleted).
    fn restore_active_copied_flags(&mut self) -> Result<()> {
        self.set_active_copied_flags(|image, cluster| Ok(image.refcount(cluster)? == 1))?;
        self.write_back()
    }

    /// Gives each active L1 entry and each active L2 entry naming a host cluster (not a
    /// compressed one) the COPIED flag `copied(cluster)` says, changing the tables in place:
    /// a flag changes nothing a snapshot reads.
    fn set_active_copied_flags(
        &mut self,
        mut copied: impl FnMut(&mut Self, u64) -> Result<bool>,
    ) -> Result<()> {
        let cluster_size = self.cluster_size();
        let per_table = 1u64 << self.l2_bits();
        let copied_bit = EntryFlags::COPIED.bits();
        for l1_index in 0..self.l1.len() {
            let raw = self.l1[l1_index];
            let l2_offset = L1Entry(raw).l2_offset(cluster_size, l1_index as u64)?;
            if l2_offset == 0 {
                continue;
            }
            let want = copied(self, l2_offset >> self.cluster_bits)?;
            let entry = if want {
                raw | copied_bit
            } else {
                raw & !copied_bit
            };
            if entry != raw {
                self.l1[l1_index] = entry;
                self.l1_dirty.insert(l1_index);
            }
            self.load_l2(l2_offset)?;
            for l2_index in 0..per_table as usize {
                let (raw, bitmap) = self.cached_l2_slot(l2_offset, l2_index)?;
                let guest_cluster = (l1_index as u64) * per_table + l2_index as u64;
                let host_offset = match self.decode_l2(raw, bitmap, guest_cluster)? {
                    Cluster::Data { host_offset, .. }
                    | Cluster::Zero { host_offset, .. }
                    | Cluster::Subclusters { host_offset, .. } => host_offset,
                    Cluster::Unallocated | Cluster::Compressed { .. } => 0,
                };
                if host_offset == 0 {
                    continue;
                }
                let want = copied(self, host_offset >> self.cluster_bits)?;
                let entry = if want {
                    raw | copied_bit
                } else {
                    raw & !copied_bit
                };
                if entry != raw {
                    self.load_l2(l2_offset)?;
                    self.set_l2_entry(
                        l2_offset,
                        l2_index,
                        crate::engine::format::entry::L2Entry(entry),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Makes `table` the snapshot table: written to new clusters, their refcounts and
    /// everything dirty written back, ordering point, then the header names it (one 12-byte
    /// write of nb_snapshots and snapshots_offset), ordering point; the old table is freed at
    /// the next write-back.
    pub(in crate::engine) fn switch_snapshot_table(
        &mut self,
        mut table: Vec<Snapshot>,
    ) -> Result<()> {
        let cluster_size = self.cluster_size();
        // Laid out once to learn its size, then again at its place.
        let bytes = encode_table(0, &mut table)?.len() as u64;
        let offset = if table.is_empty() {
            0
        } else {
            let offset = self.alloc_snapshot_clusters(bytes.div_ceil(cluster_size))?;
            let encoded = encode_table(offset, &mut table)?;
            self.write_metadata(offset, &encoded, "writing the snapshot table")?;
            offset
        };
        self.write_back()?;
        // The crash harness's snapshot mutation leaves this point out (test only).
        if !self.test_skip_snapshot_ordering {
            self.ordering_point()?;
        }
        let mut fields = [0u8; 12];
        fields[..4].copy_from_slice(&(table.len() as u32).to_be_bytes());
        fields[4..].copy_from_slice(&offset.to_be_bytes());
        self.write_metadata(
            SNAPSHOT_FIELDS_OFFSET,
            &fields,
            "switching the header to the new snapshot table",
        )?;
        // (d) What the old table named loses its references only after this write (the
        // ordering point before stage 5).
        self.unordered.entries = true;

        // A table read in part (over QEMU's limits, for a check) is longer on disk, but what
        // lies past the part read may be anything (a hostile or damaged entry's length says
        // so, not the refcounts): only the part read is freed here, and the check that
        // writes such a table counts the rest afterwards (leaked clusters, repaired).
        self.snapshot_table_over_limits = None;
        let old_bytes = crate::engine::format::snapshot::table_bytes(&self.header, &self.snapshots);
        if self.header.snapshots_offset != 0 && old_bytes > 0 {
            let first = self.header.snapshots_offset >> self.cluster_bits;
            let clusters = old_bytes.div_ceil(cluster_size);
            self.free_later(first..first + clusters, FreeKind::Snapshot);
        }
        self.header.nb_snapshots = table.len() as u32;
        self.header.snapshots_offset = offset;
        if table.is_empty() {
            self.metadata.remove_region(SNAPSHOT_TABLE_REGION);
        } else {
            let end = (offset + bytes).next_multiple_of(cluster_size);
            self.metadata
                .move_region(SNAPSHOT_TABLE_REGION, offset, end);
        }
        let l1_regions: Vec<Region> = table
            .iter()
            .filter(|s| s.l1_size_entries > 0)
            .map(|s| Region {
                name: SNAPSHOT_L1_REGION,
                start: s.l1_table_offset,
                end: (s.l1_table_offset + u64::from(s.l1_size_entries) * 8)
                    .next_multiple_of(cluster_size),
            })
            .collect();
        self.metadata
            .replace_regions(SNAPSHOT_L1_REGION, l1_regions);
        self.snapshots = table;
        self.reload_snapshot_l2_tables()
    }

    /// Tells the metadata map which L2 tables the snapshots' L1 tables name (at open, and
    /// after the snapshot table changed), so that no data write lands on one. Each cluster of
    /// the L1 tables is read once however many snapshots name it, so a hostile table costs
    /// at most the file's size in reads.
    pub(super) fn reload_snapshot_l2_tables(&mut self) -> Result<()> {
        let cluster_size = self.cluster_size();
        let mut seen = std::collections::BTreeSet::new();
        let mut tables = std::collections::BTreeSet::new();
        let mut cluster = vec![0u8; cluster_size as usize];
        for s in &self.snapshots {
            let bytes = u64::from(s.l1_size_entries) * 8;
            let mut at = 0;
            while at < bytes {
                let offset = s.l1_table_offset + at;
                let len = (bytes - at).min(cluster_size);
                at += len;
                if !seen.insert(offset) {
                    continue;
                }
                let part = &mut cluster[..len as usize];
                self.storage.read_at(offset, part).map_err(|e| {
                    Error::io(format!("reading a snapshot's L1 table at {offset:#x}"), e)
                })?;
                for entry in part.chunks_exact(8) {
                    let raw = u64::from_be_bytes(entry.try_into().unwrap_or([0; 8]));
                    // Entries that do not decode are refused where they are used.
                    if let Ok(l2 @ 1..) = L1Entry(raw).l2_offset(cluster_size, 0) {
                        tables.insert(l2);
                    }
                }
            }
        }
        self.metadata.set_inactive_l2_tables(tables);
        Ok(())
    }

    /// Unmaps the first `len` bytes of the VM state area from the active tables (a snapshot
    /// just took them), as QEMU's qcow2 does after a savevm.
    fn unmap_vm_state(&mut self, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let per_table = 1u64 << self.l2_bits();
        let first = self.vm_state_offset() >> self.cluster_bits;
        let end = (self.vm_state_offset() + len).div_ceil(self.cluster_size());
        let end = end.min((self.l1.len() as u64) * per_table);
        let mut cluster = first;
        while cluster < end {
            let table_end = ((cluster / per_table) + 1) * per_table;
            if self.l2_offset_for(cluster)?.2 == 0 {
                cluster = table_end;
                continue;
            }
            self.unallocate_clusters(cluster, table_end.min(end))?;
            cluster = table_end;
        }
        Ok(())
    }
}
