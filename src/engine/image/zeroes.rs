//! Writing zeroes and discarding: whole clusters change their L2 entry only (the v3 zero flag,
//! or unallocated); partial clusters at the ends are written as zero bytes (write_zeroes) or
//! left alone (discard, which is advisory).
//!
//! With extended L2 entries the unit is the subcluster, as in QEMU's qcow2: whole subclusters
//! get their "reads as zeros" bit (a cluster's host cluster stays, unless unmapped whole),
//! and a partial subcluster whose rest reads as zeros already is zeroed whole. Discard works
//! on whole clusters: afterwards they read as zeros (all zero bits), their host cluster freed.
//!
//! A host cluster that loses its last reference goes through `pending_frees`, so its refcount
//! drops only after the new L2 entry is written and it is not reused before the next flush
//! (write-back stage 5, rule (d)); with `pass-discard-request` it is discarded on the file
//! then (`discard.rs`).

use crate::engine::error::{Error, Result};
use crate::engine::format::entry::{Cluster, L2Entry, Subcluster, SubclusterBitmap};
use crate::engine::image::discard::FreeKind;
use crate::engine::image::Image;
use crate::engine::storage::{Backing, Storage};

/// What to do with a whole cluster.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ClusterOp {
    /// Read as zeros; `unmap` frees the host cluster, otherwise a cluster that is ours alone
    /// stays allocated (preallocated zero cluster).
    Zero { unmap: bool },
    /// Guest discard: like QEMU, zero flag on v3 for allocated clusters, unallocated on v2.
    Discard,
    /// Emptying the image: unallocated, whatever the cluster was (the backing file shows
    /// through again).
    Unallocate,
}

impl<S: Storage> Image<S> {
    /// Makes `len` bytes at `guest_offset` read as zeros. Whole clusters get the v3 zero flag
    /// (`unmap` also releases their host clusters); on a v2 image, and for partial clusters,
    /// zero bytes are written.
    pub fn write_zeroes(
        &mut self,
        guest_offset: u64,
        len: u64,
        unmap: bool,
        backing: Option<&dyn Backing>,
    ) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_request(guest_offset, len)?;
        if self.has_subclusters() {
            return self.write_zeroes_in_subclusters(guest_offset, len, unmap, backing);
        }
        let (head_end, tail_start) = self.whole_cluster_span(guest_offset, len);
        if self.header.version < 3 || head_end >= tail_start {
            return self.write_zero_bytes(guest_offset, len, backing);
        }
        self.write_zero_bytes(guest_offset, head_end - guest_offset, backing)?;
        self.zero_raw_data_file(head_end, tail_start - head_end)?;
        self.for_each_whole_cluster(head_end, tail_start, ClusterOp::Zero { unmap })?;
        self.write_zero_bytes(tail_start, guest_offset + len - tail_start, backing)
    }

    /// Makes `len` bytes at `guest_offset` read as zeros by changing table entries alone, as
    /// QEMU's qcow2 driver does for a write_zeroes request; [`Error::Unsupported`] where it
    /// cannot (QEMU's -ENOTSUP: the block layer writes zero bytes instead). Standard L2
    /// entries: whole clusters of a version 3 image (the last one may end at the end of the
    /// disk). Extended ones: whole subclusters, or a partial subcluster whose rest reads as
    /// zeros already (and which is unallocated or zero); a compressed cluster only whole.
    pub fn zero_by_metadata(&mut self, guest_offset: u64, len: u64, unmap: bool) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_request(guest_offset, len)?;
        let unsupported = || Err(Error::Unsupported("the zero flag for this range".into()));
        let unit = self.subcluster_size();
        let end = guest_offset + len;
        let at_disk_end = end == self.header.virtual_size;
        let head = guest_offset & (unit - 1);
        let tail = if at_disk_end {
            0
        } else {
            end.next_multiple_of(unit) - end
        };
        if self.header.version < 3 {
            // No zero flag in version 2; but without a backing file an unallocated cluster
            // reads as zeros, so whole clusters are unallocated, as QEMU's qcow2 does it.
            if self.header.backing_file.is_some() || head != 0 || tail != 0 {
                return unsupported();
            }
            let whole_end = end.next_multiple_of(self.cluster_size());
            return self.for_each_whole_cluster(guest_offset, whole_end, ClusterOp::Discard);
        }
        if !self.has_subclusters() {
            if head != 0 || tail != 0 {
                return unsupported();
            }
            return self.write_zeroes(guest_offset, len, unmap, None);
        }
        if head == 0 && tail == 0 {
            return self.zero_subclusters(guest_offset, end, unmap);
        }
        // A partial subcluster: zeroed whole if the rest of it reads as zeros already.
        let start = guest_offset - head;
        let unit_end = (start + unit).min(self.header.virtual_size);
        if end + tail > start + unit
            || !self.reads_as_zeros_now(start, head)?
            || !self.reads_as_zeros_now(end, tail)?
            || !matches!(
                self.lookup_run(start, 1)?.0,
                Subcluster::Unallocated | Subcluster::Zero { .. }
            )
        {
            return unsupported();
        }
        self.zero_subclusters(start, unit_end, unmap)
    }

    /// Whether `len` bytes at `guest_offset` read as zeros without reading any data: zero
    /// (sub)clusters, or unallocated ones without a backing file.
    fn reads_as_zeros_now(&mut self, guest_offset: u64, len: u64) -> Result<bool> {
        let mut done = 0;
        while done < len {
            let (state, run) = self.lookup_run(guest_offset + done, len - done)?;
            let zeros = match state {
                Subcluster::Zero { .. } => true,
                Subcluster::Unallocated => self.header.backing_file.is_none(),
                Subcluster::Data { .. } | Subcluster::Compressed { .. } => false,
            };
            if !zeros {
                return Ok(false);
            }
            done += run;
        }
        Ok(true)
    }

    /// The engine's write_zeroes with extended L2 entries: the range split as QEMU's block
    /// layer splits it for a subcluster alignment (a partial subcluster at each end, the
    /// whole ones between), each part zeroed by metadata where QEMU's qcow2 would, with zero
    /// bytes written otherwise.
    fn write_zeroes_in_subclusters(
        &mut self,
        guest_offset: u64,
        len: u64,
        unmap: bool,
        backing: Option<&dyn Backing>,
    ) -> Result<()> {
        let unit = self.subcluster_size();
        let end = guest_offset + len;
        // As the block layer splits it: also at the end of the disk, whose partial last
        // subcluster is a request of its own (zeroed by metadata: nothing lies past it).
        let head_end = guest_offset.next_multiple_of(unit).min(end);
        let tail_start = (end / unit * unit).max(head_end);
        for (start, stop) in [
            (guest_offset, head_end),
            (head_end, tail_start),
            (tail_start, end),
        ] {
            if start >= stop {
                continue;
            }
            match self.zero_by_metadata(start, stop - start, unmap) {
                Err(Error::Unsupported(_)) => {
                    self.write_zero_bytes(start, stop - start, backing)?
                }
                other => other?,
            }
        }
        Ok(())
    }

    /// Zeroes `start..end` (subcluster-aligned; `end` may be the end of the disk) in the
    /// bitmaps, as QEMU's `qcow2_subcluster_zeroize`: the subclusters of a partial cluster at
    /// each end get their zero bits, whole clusters read as zeros whole (their host cluster
    /// kept if it is ours alone and not unmapped). A partial compressed cluster cannot be
    /// zeroed so: [`Error::Unsupported`].
    fn zero_subclusters(&mut self, start: u64, end: u64, unmap: bool) -> Result<()> {
        let cluster_size = self.cluster_size();
        let sc_bits = self.subcluster_bits();
        let head = end.min(start.next_multiple_of(cluster_size)) - start;
        let whole_start = start + head;
        let tail = if end >= self.header.virtual_size {
            0
        } else {
            end - whole_start.max(end / cluster_size * cluster_size)
        };
        let whole_end = end - tail;
        let units = (end - start).div_ceil(1 << sc_bits);
        self.note_group_bytes(units.div_ceil(32) * 16);
        let partial = |image: &mut Self, from: u64, bytes: u64| -> Result<()> {
            let guest_cluster = from >> image.cluster_bits;
            let first = ((from & (cluster_size - 1)) >> sc_bits) as u32;
            let count = bytes.div_ceil(1 << sc_bits) as u32;
            image.change_subclusters(guest_cluster, |bitmap| {
                bitmap.with_zeroes(first, first + count)
            })
        };
        if head > 0 {
            partial(self, start, head)?;
        }
        let mut offset = whole_start;
        while offset < whole_end {
            self.change_whole_cluster(offset >> self.cluster_bits, ClusterOp::Zero { unmap })?;
            offset += cluster_size;
        }
        if tail > 0 {
            partial(self, whole_end, tail)?;
        }
        Ok(())
    }

    /// Changes the subcluster bitmap of `guest_cluster` (extended L2 entries) as `change`
    /// says, keeping its descriptor; refuses a compressed cluster (it has no subclusters).
    fn change_subclusters(
        &mut self,
        guest_cluster: u64,
        change: impl FnOnce(SubclusterBitmap) -> SubclusterBitmap,
    ) -> Result<()> {
        let old = match self.cluster_at(guest_cluster)? {
            Cluster::Subclusters { bitmap, .. } => bitmap,
            Cluster::Unallocated => SubclusterBitmap::EMPTY,
            _ => {
                return Err(Error::Unsupported(
                    "zeroing part of a compressed cluster".into(),
                ))
            }
        };
        let new = change(old);
        if new != old {
            let (l2_offset, l2_index) = self.l2_table_for_write(guest_cluster)?;
            self.set_l2_bitmap(l2_offset, l2_index, new)?;
        }
        Ok(())
    }

    /// Discards the whole clusters inside the range (partial clusters at its ends are left as
    /// they are). Afterwards they read as zeros: the zero flag on v3 images, unallocated on
    /// v2 images (which are refused when they have a backing file).
    pub fn discard(&mut self, guest_offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.header.version < 3 && self.header.backing_file.is_some() {
            // Without the zero flag a discarded cluster would read from the backing file
            // again: stale data. QEMU's qcow2 refuses the same.
            return Err(Error::Unsupported(
                "discard on a version 2 image with a backing file (it would expose the \
                 backing file's data)"
                    .into(),
            ));
        }
        self.check_request(guest_offset, len)?;
        let (head_end, tail_start) = self.whole_cluster_span(guest_offset, len);
        if head_end < tail_start {
            // A discarded cluster reads as zeros (the zero flag): so does the raw data file.
            self.zero_raw_data_file(head_end, tail_start - head_end)?;
            self.for_each_whole_cluster(head_end, tail_start, ClusterOp::Discard)?;
        }
        Ok(())
    }

    /// Makes every cluster unallocated, so that the image reads as its backing file again
    /// (as zeros without one): `qemu-img commit` empties the committed image so. Host
    /// clusters are freed through `pending_frees` as a discard's are (rule (d)); the L2
    /// tables stay, with unallocated entries. Like every change here it reaches the file at
    /// the next write-back.
    pub fn make_empty(&mut self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let clusters_per_table = 1u64 << self.l2_bits();
        let guest_clusters = self.header.virtual_size.div_ceil(self.cluster_size());
        let mut first = 0;
        while first < guest_clusters {
            let end = (first + clusters_per_table).min(guest_clusters);
            // A range without an L2 table is unallocated already.
            if self.l2_offset_for(first)?.2 != 0 {
                self.unallocate_clusters(first, end)?;
            }
            first = end;
        }
        Ok(())
    }

    /// Makes guest clusters `first..end` unallocated, what they named freed through
    /// `pending_frees` (rule (d)), shared tables copied first: emptying, shrinking
    /// (`shrink.rs`), and the VM state a snapshot took (`snapshots.rs`; past the virtual
    /// size).
    pub(in crate::engine) fn unallocate_clusters(&mut self, first: u64, end: u64) -> Result<()> {
        for guest_cluster in first..end {
            self.change_whole_cluster(guest_cluster, ClusterOp::Unallocate)?;
        }
        Ok(())
    }

    fn check_request(&self, guest_offset: u64, len: u64) -> Result<()> {
        let size = self.header.virtual_size;
        match guest_offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange {
                offset: guest_offset,
                len,
                size,
            }),
        }
    }

    /// The cluster-aligned part of a range: (start of the first whole cluster, end of the
    /// last). A range ending at the end of the image counts its last partial cluster as whole.
    fn whole_cluster_span(&self, guest_offset: u64, len: u64) -> (u64, u64) {
        let cluster_size = self.cluster_size();
        let end = guest_offset + len;
        let head_end = guest_offset.next_multiple_of(cluster_size).min(end);
        let tail_start = if end == self.header.virtual_size {
            end.max(head_end)
        } else {
            (end / cluster_size * cluster_size).max(head_end)
        };
        (head_end, tail_start)
    }

    fn write_zero_bytes(
        &mut self,
        guest_offset: u64,
        len: u64,
        backing: Option<&dyn Backing>,
    ) -> Result<()> {
        let step = self.cluster_size().max(1 << 16);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(step);
            let zeros = vec![0u8; n as usize];
            self.write(guest_offset + done, &zeros, backing)?;
            done += n;
        }
        Ok(())
    }

    fn for_each_whole_cluster(&mut self, start: u64, end: u64, op: ClusterOp) -> Result<()> {
        // A transaction group's size bound counts what the group writes for these clusters:
        // their L2 entries of 8 bytes, not the bytes they cover (zeroing 1 GiB with 64 KiB
        // clusters changes 128 KiB of entries).
        let clusters = (end - start).div_ceil(self.cluster_size());
        self.note_group_bytes(clusters * 8);
        let mut offset = start;
        while offset < end {
            let guest_cluster = offset >> self.cluster_bits;
            self.change_whole_cluster(guest_cluster, op)?;
            offset += self.cluster_size();
        }
        Ok(())
    }

    fn change_whole_cluster(&mut self, guest_cluster: u64, op: ClusterOp) -> Result<()> {
        let current = self.cluster_at(guest_cluster)?;
        if self.has_subclusters() {
            return self.change_whole_extended(guest_cluster, current, op);
        }
        let v3 = self.header.version >= 3;
        let has_backing = self.header.backing_file.is_some();
        let (new_entry, freed): (Option<L2Entry>, Vec<u64>) = match (op, current) {
            // Unallocated reads as zeros already, unless a backing file shows through: then
            // a discard marks it zero like any other cluster (as QEMU's qcow2 does).
            (ClusterOp::Discard, Cluster::Unallocated) if !has_backing => (None, Vec::new()),
            (ClusterOp::Discard, Cluster::Zero { host_offset: 0, .. }) => (None, Vec::new()),
            (ClusterOp::Zero { unmap: false }, Cluster::Zero { .. }) => (None, Vec::new()),
            (ClusterOp::Zero { unmap: true }, Cluster::Zero { host_offset: 0, .. }) => {
                (None, Vec::new())
            }
            (ClusterOp::Unallocate, Cluster::Unallocated) => (None, Vec::new()),
            (ClusterOp::Unallocate, other) => {
                (Some(L2Entry::UNALLOCATED), self.host_clusters_of(other))
            }
            // Keep a cluster that is ours alone, marked zero.
            (
                ClusterOp::Zero { unmap: false },
                Cluster::Data {
                    host_offset,
                    copied: true,
                },
            ) => (Some(L2Entry::preallocated_zero(host_offset)), Vec::new()),
            (_, other) => {
                let entry = if v3 {
                    L2Entry::zero()
                } else {
                    L2Entry::UNALLOCATED
                };
                (Some(entry), self.host_clusters_of(other))
            }
        };
        let Some(entry) = new_entry else {
            return Ok(());
        };
        let (l2_offset, l2_index) = self.l2_table_for_write(guest_cluster)?;
        self.set_l2_entry(l2_offset, l2_index, entry)?;
        self.note_shared_release(current);
        let kind = match op {
            // qemu-img commit empties the image (QEMU's qcow2 counts it as a snapshot free).
            ClusterOp::Unallocate => FreeKind::Snapshot,
            ClusterOp::Zero { .. } | ClusterOp::Discard => FreeKind::Request,
        };
        self.free_later(freed, kind);
        Ok(())
    }

    /// A whole cluster of an image with extended L2 entries, as QEMU's qcow2 changes it:
    /// zeroing gives every subcluster its zero bit (the host cluster stays if it is ours
    /// alone and not unmapped; a compressed one goes); a discard makes an allocated cluster,
    /// or any cluster over a backing file, read as zeros without a host cluster, and leaves
    /// an unallocated one without a backing file alone; emptying clears the entry.
    fn change_whole_extended(
        &mut self,
        guest_cluster: u64,
        current: Cluster,
        op: ClusterOp,
    ) -> Result<()> {
        let (host_offset, copied, bitmap) = match current {
            Cluster::Subclusters {
                host_offset,
                copied,
                bitmap,
            } => (host_offset, copied, bitmap),
            // No subclusters: a compressed cluster (allocated, below), or no L2 table yet.
            _ => (0, false, SubclusterBitmap::EMPTY),
        };
        let allocated = host_offset != 0 || matches!(current, Cluster::Compressed { .. });
        let dropped = (L2Entry::UNALLOCATED, SubclusterBitmap::ALL_ZEROES);
        let (entry, new_bitmap) = match op {
            ClusterOp::Unallocate if allocated || bitmap != SubclusterBitmap::EMPTY => {
                (L2Entry::UNALLOCATED, SubclusterBitmap::EMPTY)
            }
            ClusterOp::Discard if allocated || self.header.backing_file.is_some() => dropped,
            ClusterOp::Zero { unmap: false } if copied && host_offset != 0 => (
                L2Entry::data_copied(host_offset),
                SubclusterBitmap::ALL_ZEROES,
            ),
            ClusterOp::Zero { .. } => dropped,
            ClusterOp::Unallocate | ClusterOp::Discard => return Ok(()),
        };
        let keeps_host = entry != L2Entry::UNALLOCATED;
        if (keeps_host || !allocated) && new_bitmap == bitmap {
            return Ok(());
        }
        let (l2_offset, l2_index) = self.l2_table_for_write(guest_cluster)?;
        if !keeps_host {
            self.set_l2_entry(l2_offset, l2_index, entry)?;
        }
        self.set_l2_bitmap(l2_offset, l2_index, new_bitmap)?;
        if keeps_host {
            return Ok(());
        }
        self.note_shared_release(current);
        let kind = match op {
            ClusterOp::Unallocate => FreeKind::Snapshot,
            ClusterOp::Zero { .. } | ClusterOp::Discard => FreeKind::Request,
        };
        let freed = self.host_clusters_of(current);
        self.free_later(freed, kind);
        Ok(())
    }

    /// The host clusters an L2 entry holds a reference to.
    /// An active L2 entry stopped naming `old`: if it was a plain cluster without COPIED in
    /// an image without internal snapshots, the other reference is another active entry,
    /// which `restore_copied_flags` marks COPIED once the refcount is down to one.
    pub(in crate::engine) fn note_shared_release(&mut self, old: Cluster) {
        if self.header.nb_snapshots != 0 {
            return;
        }
        match old {
            Cluster::Data {
                host_offset,
                copied: false,
            }
            | Cluster::Zero {
                host_offset,
                copied: false,
            }
            | Cluster::Subclusters {
                host_offset,
                copied: false,
                ..
            } if host_offset != 0 => self
                .copied_candidates
                .push(host_offset >> self.cluster_bits),
            _ => {}
        }
    }

    pub(in crate::engine) fn host_clusters_of(&self, cluster: Cluster) -> Vec<u64> {
        if self.data_file.is_some() {
            // Clusters of the data file: not refcounted (`data_file.rs`).
            return Vec::new();
        }
        match cluster {
            Cluster::Unallocated | Cluster::Zero { host_offset: 0, .. } => Vec::new(),
            Cluster::Subclusters { host_offset: 0, .. } => Vec::new(),
            Cluster::Zero { host_offset, .. }
            | Cluster::Data { host_offset, .. }
            | Cluster::Subclusters { host_offset, .. } => vec![host_offset >> self.cluster_bits],
            Cluster::Compressed {
                host_offset,
                max_len_bytes,
            } => {
                let first = host_offset >> self.cluster_bits;
                let last = (host_offset + max_len_bytes.max(1) - 1) >> self.cluster_bits;
                (first..=last).collect()
            }
        }
    }
}
