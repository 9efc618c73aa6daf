//! Transaction groups (`barrier=txg`): many guest barriers for a constant number of syncs, in
//! the way copy-on-write file systems commit, without leaving the qcow2 format.
//!
//! The durable image D is what the header on storage names: its L1 table and L2 tables, data
//! clusters, refcount table and blocks. While a group is open, the engine works on a tree W
//! in memory and in clusters allocated since the last commit ("owned" by the group), and
//! **nothing D references is overwritten**:
//! - a guest write to a cluster of D goes to a new cluster (copy-on-write, even where the
//!   image owns the cluster: `Image::may_overwrite`);
//! - an L2 table of D that changes is copied to a new cluster first (`l2_table_for_write`);
//! - a refcount block of D that changes is copied to a new cluster first
//!   (`Image::cow_refblock`);
//! - L1 and refcount table entries change in memory only; the commit writes both tables
//!   whole, at new places.
//!
//! Clusters that only D uses (the old copies) drop to refcount 0 in W but stay quarantined
//! until the commit is durable, so nothing of D can be reused while D is the durable image.
//!
//! Commit (`Image::commit_group`): write everything of the group (owned tables, the new L1 and
//! refcount tables); sync; write the header's first sector, which names the new L1 table and
//! refcount table; sync. A crash before that sector is durable leaves D: untouched, clean,
//! and without even leaked clusters (D's refcounts never counted the group's clusters). After
//! it, W: clean too. The header sector is one 512-byte sector, written alone: it cannot be
//! torn. Every guest barrier inside a group is kept because a crash shows a whole group or
//! none of it: a prefix of the guest's epochs.
//!
//! When: at a guest flush (durability asks for it), when the group's bytes reach a bound, and
//! when it is older than a time bound (the glue checks [`Image::group_is_due`]). A flush with
//! nothing new commits nothing and costs nothing.
//!
//! One epoch: a group opens only at the guest's first barrier after a write since the last
//! commit. Until then the txg state is parked (`Image::txg_parked`, `Image::txg` is `None`)
//! and the image follows the ordinary rules of `writeback.rs`, as the `ordered` mode does:
//! writes in place, new clusters from the zero reserve, ordering points where those rules
//! need them. That interval holds a single guest epoch (the one the last commit left open),
//! which a crash may show in part, each sector old or new, with every reference valid and at
//! worst leaked reserve clusters: a prefix of the guest's epochs whose last one is partial. A
//! durability point in it (a flush, a bound) is the ordinary flush, write-back and one sync,
//! so a guest that flushes after every write pays what it pays in the `ordered` mode. The
//! barrier that ends the interval opens the group and hands it the interval's changed tables
//! (`Image::txg_barrier`): they are copied into the group like any table of D it changes,
//! nothing is written and nothing synced, so the barrier is free; from then on nothing on
//! storage is overwritten, and the interval's tables and the later epochs appear only with
//! the commit.
//!
//! INVARIANT (one epoch): a group is open exactly from the first guest barrier that follows a
//! change of the interval to the end of its commit; when it opens, no table of D is dirty
//! (the refcount blocks were written, the L2 tables taken over), so W starts from what
//! storage holds. A commit parks the state again.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::engine::error::{Error, Result};
use crate::engine::format::bytes;
use crate::engine::image::cache::TableCache;
use crate::engine::image::discard::FreeKind;
use crate::engine::image::metadata::not_cached;
use crate::engine::image::Image;
use crate::engine::storage::Storage;

/// When a transaction group commits on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxgOptions {
    /// Commit once this many guest bytes were written in the group.
    pub max_group_bytes: u64,
    /// Commit once the group is this old (checked by the caller, `Image::group_is_due`).
    pub max_group_age: Duration,
}

/// The defaults of `barrier=txg` (`txg-max-bytes`, `txg-max-age-ms`): 64 MiB, and ZFS's
/// `zfs_txg_timeout` of 5 s.
impl Default for TxgOptions {
    fn default() -> Self {
        TxgOptions {
            max_group_bytes: 64 << 20,
            max_group_age: Duration::from_secs(5),
        }
    }
}

/// What made a transaction group commit (counted apart in [`crate::engine::Counters`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitReason {
    /// The group was `max_group_age` old.
    Age,
    /// The group held `max_group_bytes` of guest writes.
    Size,
    /// Durability was asked for: a flush, a close, an inactivation, or an operation that
    /// writes outside groups (resize, check).
    Durability,
}

/// What the open group holds that is not durable yet: guest bytes written since the last
/// commit and how long ago its first write came (zero and `None` when it holds none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupExposure {
    pub bytes: u64,
    pub age: Option<Duration>,
}

/// The open group.
#[derive(Debug)]
pub(in crate::engine) struct TxgState {
    pub options: TxgOptions,
    /// Host clusters allocated since the last commit: D does not reference them, so they may
    /// be written in place.
    owned: BTreeSet<u64>,
    /// The L1 table or the refcount table changed: the commit writes them at new places.
    pub l1_changed: bool,
    pub reftable_changed: bool,
    /// Guest bytes written in the group, and when its first write came.
    pub group_bytes: u64,
    pub group_started: Option<Instant>,
    /// Groups committed since open.
    pub commits: u64,
    /// A commit waits for the write plans in flight: new ones wait meanwhile.
    pub commit_wanted: bool,
    /// The tables placed by a commit attempt that failed (freed by the next attempt).
    staged: Option<Roots>,
    /// D's L1 and refcount tables were freed in W (by a commit attempt).
    durable_roots_freed: bool,
}

/// Where an L1 table and a refcount table are.
#[derive(Clone, Copy, Debug)]
struct Roots {
    l1: u64,
    l1_clusters: u64,
    rt: u64,
    rt_clusters: u64,
}

impl TxgState {
    pub fn new(options: TxgOptions) -> TxgState {
        TxgState {
            options,
            owned: BTreeSet::new(),
            l1_changed: false,
            reftable_changed: false,
            group_bytes: 0,
            group_started: None,
            commits: 0,
            commit_wanted: false,
            staged: None,
            durable_roots_freed: false,
        }
    }
}

/// Header bytes 24..64: size, crypt_method, l1_size, l1_table_offset, refcount_table_offset,
/// refcount_table_clusters. They lie inside the first 512-byte sector, which a device writes
/// whole or not at all: the commit's switch cannot be torn.
const ROOT_FIELDS: std::ops::Range<usize> = 24..64;

impl<S: Storage> Image<S> {
    /// Whether host cluster `host_offset` may be written in place: always outside transaction
    /// groups; inside one, only when the group allocated it.
    pub(in crate::engine) fn may_overwrite(&self, host_offset: u64) -> bool {
        match &self.txg {
            None => true,
            Some(t) => t.owned.contains(&(host_offset >> self.cluster_bits)),
        }
    }

    /// Whether guest data may be written in place into host cluster `host_offset`, a data
    /// cluster the image owns alone: as [`Image::may_overwrite`] (the test option
    /// `test_txg_overwrite_after_barrier` breaks this inside groups, for the crash check's
    /// negative control).
    pub(in crate::engine) fn may_overwrite_data(&self, host_offset: u64) -> bool {
        self.test_txg_overwrite_after_barrier || self.may_overwrite(host_offset)
    }

    /// The txg mode's state, parked or in an open group (`None` outside the mode).
    fn txg_state(&self) -> Option<&TxgState> {
        self.txg.as_ref().or(self.txg_parked.as_ref())
    }

    fn txg_state_mut(&mut self) -> Option<&mut TxgState> {
        self.txg.as_mut().or(self.txg_parked.as_mut())
    }

    /// Whether a transaction group is open (its copy-on-write rules hold).
    pub fn group_open(&self) -> bool {
        self.txg.is_some()
    }

    /// A guest barrier in the txg mode. Inside a group: nothing, the group keeps it. With no
    /// group open, one that follows a change since the last sync ends the interval of one
    /// epoch: a group opens and takes the interval's changed tables over ("One epoch" in the
    /// module comment). A barrier with nothing before it opens nothing.
    pub(in crate::engine) fn txg_barrier(&mut self) -> Result<()> {
        let Some(parked) = self.txg_parked.as_ref() else {
            return Ok(());
        };
        let changed = parked.group_started.is_some()
            || self.unflushed_writes
            || self.l2_cache.has_dirty()
            || self.refblock_cache.has_dirty()
            || !self.pending_frees.is_empty();
        if !changed {
            return Ok(());
        }
        // Refcount blocks go out in place (stage 1 of `write_back`): increments and new
        // blocks only, safe at any time (a crash leaves at worst a leak), so no ordering
        // point; the group then copies them like any block of D it changes.
        self.write_dirty_refblocks()?;
        self.txg = self.txg_parked.take();
        self.take_over_interval_tables()
    }

    /// The interval's changed L2 tables become the group's: each is moved, as it is in the
    /// cache, to a cluster the group allocates, and the L1 entry (in memory) names the copy.
    /// Nothing of them is written now: D on storage keeps its tables, the interval's changes
    /// reach storage with the group and become durable with its commit (the L1 and refcount
    /// table changes too: `write_back_group` marks them for it). So the barrier costs no
    /// write and no sync, and until the commit a crash shows D with the interval's in-place
    /// data writes in part, its new clusters unnamed (free, or leaked where the reserve or
    /// the refcount blocks just written count them).
    fn take_over_interval_tables(&mut self) -> Result<()> {
        for old in self.l2_cache.dirty_offsets() {
            if self.may_overwrite(old) {
                continue;
            }
            let l1_index = self
                .l1
                .iter()
                .position(|&e| e & crate::engine::format::entry::OFFSET_MASK == old)
                .ok_or_else(|| {
                    Error::Corrupt(format!(
                        "the dirty L2 table at {old:#x} is named by no L1 entry"
                    ))
                })?;
            let new = self.alloc_cluster()?;
            let content = self
                .l2_cache
                .take(old)
                .ok_or_else(|| not_cached("L2 table", old))?;
            // One table out, one in: the cache needs no room made (which could write back).
            self.l2_cache.insert(new, content, true);
            if let Some(e) = self.l1.get_mut(l1_index) {
                *e = crate::engine::format::entry::L1Entry::new_copied(new).0;
            }
            self.l1_dirty.insert(l1_index);
            self.metadata.remove_l2_table(old);
            self.metadata.add_l2_table(new);
            // D's table (or a table only the interval used) is freed at the commit.
            self.free_later([old >> self.cluster_bits], FreeKind::Other);
        }
        // Nothing written since the last sync is owed an order any more: what the interval
        // wrote before now is named only by the group's tables, which its commit's first
        // sync orders after everything.
        self.unordered = crate::engine::image::writeback::Unordered::default();
        self.new_l2_tables_to_order.clear();
        Ok(())
    }

    /// Notes a cluster allocated in the open group.
    pub(in crate::engine) fn note_owned(&mut self, cluster: u64) {
        if let Some(t) = self.txg.as_mut() {
            t.owned.insert(cluster);
        }
    }

    /// Notes bytes the group (or the interval before it) writes for the guest, for its size
    /// bound.
    pub(in crate::engine) fn note_group_bytes(&mut self, bytes: u64) {
        if let Some(t) = self.txg_state_mut() {
            t.group_bytes += bytes;
            t.group_started.get_or_insert_with(Instant::now);
        }
    }

    /// Whether the open group has reached its size or age bound.
    pub fn group_is_due(&self) -> bool {
        self.group_due_reason().is_some()
    }

    /// Which bound the open group has reached, the size bound first; `None` when neither
    /// (or outside the txg mode).
    pub fn group_due_reason(&self) -> Option<CommitReason> {
        let t = self.txg_state()?;
        if t.group_bytes >= t.options.max_group_bytes {
            Some(CommitReason::Size)
        } else if t
            .group_started
            .is_some_and(|s| s.elapsed() >= t.options.max_group_age)
        {
            Some(CommitReason::Age)
        } else {
            None
        }
    }

    /// What the open group holds that is not durable yet (`None` outside the txg mode).
    pub fn group_exposure(&self) -> Option<GroupExposure> {
        let t = self.txg_state()?;
        Some(GroupExposure {
            bytes: t.group_bytes,
            age: t.group_started.map(|s| s.elapsed()),
        })
    }

    /// How long until the open group reaches its age bound (zero once it has); `None` when
    /// no guest write is in the group, or outside the txg mode.
    pub fn group_age_left(&self) -> Option<Duration> {
        let t = self.txg_state()?;
        let started = t.group_started?;
        Some(t.options.max_group_age.saturating_sub(started.elapsed()))
    }

    /// Asks for a commit: until it happens, `plan_write` answers `None` (wait), so that the
    /// write plans in flight drain and the commit can run (see [`Image::commit`]).
    pub fn request_commit(&mut self) {
        if let Some(t) = self.txg.as_mut() {
            t.commit_wanted = true;
        }
    }

    /// Whether a commit was asked for and has not happened yet.
    pub fn commit_pending(&self) -> bool {
        self.txg.as_ref().is_some_and(|t| t.commit_wanted)
    }

    /// Commits the open group because a bound was reached (the size bound when both are, as
    /// [`Image::group_due_reason`] says; the age bound when neither is, for a caller that
    /// commits on its own schedule): everything written so far becomes durable with at most
    /// two syncs. Outside the txg mode, nothing. No write plan may be in flight (the caller
    /// asks with [`Image::request_commit`] and waits for them): a plan in flight may write in
    /// place into a cluster the group owns, which the commit hands to the durable image.
    pub fn commit(&mut self) -> Result<()> {
        if self.txg_state().is_none() || self.read_only {
            return Ok(());
        }
        let reason = self.group_due_reason().unwrap_or(CommitReason::Age);
        self.durability_point(true, reason)
    }

    /// A bound reached with no group open: the interval's metadata is written back in the
    /// ordinary order and its window starts again; the caller then syncs the file, without
    /// holding the image, so that the guest's requests do not wait for that sync (nobody asked
    /// for it: it only keeps the durability bound). Returns whether a sync is due. Nothing
    /// here assumes it happens: the image's own bookkeeping of what is unflushed stays as it
    /// is (the next flush syncs again), so the sync is a pure "durable now" that is safe at
    /// any time, whatever the requests meanwhile. With a group open, or outside the txg mode,
    /// nothing: `false`.
    pub fn write_back_interval_for_bound(&mut self) -> Result<bool> {
        if self.txg.is_some() || self.txg_parked.is_none() || self.read_only {
            return Ok(false);
        }
        let reason = self.group_due_reason().unwrap_or(CommitReason::Age);
        self.write_back()?;
        self.end_interval(reason);
        Ok(self.unflushed_writes)
    }

    /// The commit, then the end of the I/O epoch: the old tree's clusters become reusable
    /// (once no request in flight may still touch them).
    pub(in crate::engine) fn commit_and_release(&mut self, reason: CommitReason) -> Result<()> {
        if self.write_plans_in_flight > 0 {
            if let Some(t) = self.txg.as_mut() {
                t.commit_wanted = false;
            }
            return Err(Error::Invalid(format!(
                "a transaction group cannot commit while {} write(s) are in flight",
                self.write_plans_in_flight
            )));
        }
        let committed = self.commit_group(reason);
        if let Some(t) = self.txg.as_mut() {
            // Failed or not: the writes waiting for it go on (the error reaches the flush).
            t.commit_wanted = false;
        }
        committed?;
        self.io_epoch += 1;
        self.release_quarantine();
        // The next interval follows the ordinary rules until a barrier opens a group.
        self.txg_parked = self.txg.take();
        Ok(())
    }

    /// Runs `f` with no group open: an open group commits first, `f` writes in place with the
    /// ordinary ordering rules, and its result is made durable before a group may open again.
    /// For rare operations that change the image's shape (resize, check with repair).
    pub(in crate::engine) fn outside_group<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        if self.txg_state().is_none() {
            return f(self);
        }
        if self.txg.is_some() {
            self.commit_and_release(CommitReason::Durability)?;
        }
        f(self).and_then(|v| self.flush_metadata_and_sync(false).map(|()| v))
    }

    /// Groups committed since the image was opened, intervals of one epoch made durable
    /// included (0 outside the txg mode).
    pub fn groups_committed(&self) -> u64 {
        self.txg_state().map_or(0, |t| t.commits)
    }

    /// Whether the image is in the txg mode (a group open or not).
    pub fn in_transaction_groups(&self) -> bool {
        self.txg_state().is_some()
    }

    /// Copies refcount block `rt_index` (a block of D) to a new cluster owned by the group and
    /// points the refcount table (in memory) at the copy. Returns the copy's offset.
    ///
    /// The copy is named by the refcount table before it is counted, so that counting it
    /// (which may fall in the range this very block covers) updates the copy.
    pub(in crate::engine) fn cow_refblock(
        &mut self,
        rt_index: u64,
        old_offset: u64,
    ) -> Result<u64> {
        self.load_refblock(old_offset)?;
        let content = self
            .refblock_cache
            .get(old_offset)
            .map(|b| b.to_vec())
            .ok_or_else(|| not_cached("refcount block", old_offset))?;
        let free = self.find_free_cluster()?;
        let covered = matches!(self.refblock_offset(self.rc.locate(free).0)?, Some(o) if o != 0);
        // A free cluster no block counts yet: the allocator makes that block (owned by the
        // group) and counts the cluster there, never in the block being copied.
        let (cluster, counted) = if covered {
            (free, false)
        } else {
            (self.alloc_cluster()? >> self.cluster_bits, true)
        };
        let new_offset = cluster << self.cluster_bits;
        self.make_room_in_refblock_cache()?;
        self.refblock_cache.insert(new_offset, content, true);
        // D's block is clean (nothing writes it) and freed at the commit.
        self.refblock_cache.evict(old_offset);
        if let Some(e) = usize::try_from(rt_index)
            .ok()
            .and_then(|i| self.reftable.get_mut(i))
        {
            *e = new_offset;
        }
        self.metadata.add_refblock(new_offset);
        self.metadata.remove_refblock(old_offset);
        self.note_allocated(cluster);
        if let Some(t) = self.txg.as_mut() {
            t.reftable_changed = true;
        }
        if !counted {
            self.set_refcount(cluster, 1)?;
        }
        // D's block loses the refcount table's reference: freed once the group commits.
        self.free_later([old_offset >> self.cluster_bits], FreeKind::Other);
        Ok(new_offset)
    }

    /// Makes the open group durable as the image (see the module comment): two syncs,
    /// whatever the number of barriers in it; nothing when the group is empty.
    ///
    /// On an error the group stays open and the next commit tries again. The tables placed
    /// for the failed attempt are given back then (quarantined until that commit is
    /// durable, as the header may name them if its write reached the disk after all); from a
    /// failed switch on, nothing the group wrote is overwritten either.
    pub(in crate::engine) fn commit_group(&mut self, reason: CommitReason) -> Result<()> {
        self.write_back()?;
        let changed = self.unflushed_writes
            || self
                .txg
                .as_ref()
                .is_some_and(|t| t.l1_changed || t.reftable_changed || t.staged.is_some());
        if !changed {
            return Ok(());
        }
        let tables_unchanged = self.txg.as_ref().is_some_and(|t| {
            t.owned.is_empty()
                && !t.l1_changed
                && !t.reftable_changed
                && t.staged.is_none()
                && !t.durable_roots_freed
        }) && self.pending_frees.is_empty()
            && !self.l2_cache.has_dirty()
            && !self.refblock_cache.has_dirty();
        if tables_unchanged {
            // Neither the group nor the interval before it changed a table (storage holds D,
            // the interval's in-place data writes and the refcount blocks the opening barrier
            // wrote, "One epoch"): D stays the image, and one sync makes it durable. No header
            // write, no second sync.
            self.storage_flush()?;
            self.end_group(reason);
            return Ok(());
        }
        let roots = self.place_roots()?;
        if let Some(t) = self.txg.as_mut() {
            t.staged = Some(roots);
        }

        // Everything of the group reaches storage: owned tables, the two new tables. D names
        // none of it, so the order among these writes does not matter.
        self.write_owned_tables()?;
        let cluster_bits = self.cluster_bits;
        let mut l1_raw = bytes::encode_table(&self.l1);
        l1_raw.resize((roots.l1_clusters << cluster_bits) as usize, 0);
        if roots.l1_clusters > 0 {
            self.write_metadata(roots.l1, &l1_raw, "writing the group's L1 table")?;
        }
        let mut rt_raw = bytes::encode_table(&self.reftable);
        rt_raw.resize((roots.rt_clusters << cluster_bits) as usize, 0);
        self.write_metadata(roots.rt, &rt_raw, "writing the group's refcount table")?;
        // INVARIANT (commit order 1): every write of the group is durable before the header
        // names it.
        if !self.test_skip_txg_first_sync {
            self.storage_flush()?;
        }

        // The switch: the header fields that name the new tables, inside its first sector.
        let mut next = self.header.clone();
        next.l1_table_offset = roots.l1;
        next.l1_size_entries = self.l1.len() as u32;
        next.refcount_table_offset = roots.rt;
        next.refcount_table_clusters = roots.rt_clusters as u32;
        let encoded = next.encode()?;
        let fields = encoded.get(ROOT_FIELDS).ok_or_else(|| {
            Error::Invalid("the encoded header is shorter than its fixed fields".into())
        })?;
        let switched = self
            .write_metadata(
                ROOT_FIELDS.start as u64,
                fields,
                "switching the header to the committed group",
            )
            // INVARIANT (commit order 2): the switch is durable before the old tree's clusters
            // are reused (`commit_and_release` ends their quarantine after this returns).
            .and_then(|()| self.storage_flush());
        if let Err(e) = switched {
            // The header may or may not name the group now: treat all of it as durable.
            if let Some(t) = self.txg.as_mut() {
                t.owned.clear();
            }
            return Err(e);
        }
        self.header = next;
        self.end_group(reason);
        Ok(())
    }

    /// After a commit: W is D now, nothing is owned, the old tree's clusters are free (after
    /// the quarantine of in-flight I/O), and the next group starts empty.
    fn end_group(&mut self, reason: CommitReason) {
        let Some(t) = self.txg_state_mut() else {
            return;
        };
        let (bytes, age_ms) = (
            t.group_bytes,
            t.group_started
                .map_or(0, |s| s.elapsed().as_millis() as u64),
        );
        t.owned.clear();
        t.staged = None;
        t.durable_roots_freed = false;
        t.l1_changed = false;
        t.reftable_changed = false;
        t.group_bytes = 0;
        t.group_started = None;
        t.commits += 1;
        let c = &mut self.counters;
        c.peak_group_bytes = c.peak_group_bytes.max(bytes);
        c.peak_group_age_ms = c.peak_group_age_ms.max(age_ms);
        match reason {
            CommitReason::Age => c.groups_committed_by_age += 1,
            CommitReason::Size => c.groups_committed_by_size += 1,
            CommitReason::Durability => c.groups_committed_for_durability += 1,
        }
        c.groups_committed += 1;
    }

    /// After a durability point with no group open: the interval, if the guest changed
    /// anything in it, counts as a group committed (in place, with the ordinary flush).
    pub(in crate::engine) fn end_interval(&mut self, reason: CommitReason) {
        if self
            .txg_parked
            .as_ref()
            .is_some_and(|t| t.group_started.is_some())
        {
            self.end_group(reason);
        }
    }

    /// New places for the L1 table and the refcount table. The old ones (D's, or a failed
    /// attempt's) are freed in W, after their regions moved in the overlap map; they are
    /// quarantined until the commit. Counting the new places may copy refcount blocks and add
    /// refcount table entries, so the refcount table's size is settled in a loop.
    fn place_roots(&mut self) -> Result<Roots> {
        let cluster_size = self.cluster_size();
        let clusters_for = |bytes: u64| bytes.div_ceil(cluster_size);
        let (staged, durable_freed) = match self.txg.as_mut() {
            Some(t) => (t.staged.take(), t.durable_roots_freed),
            None => return Err(Error::Invalid("no transaction group is open".into())),
        };
        let old = match staged {
            Some(s) => s,
            None if durable_freed => {
                return Err(Error::Invalid(
                    "the durable tables were freed but no new ones were placed".into(),
                ))
            }
            None => Roots {
                l1: self.header.l1_table_offset,
                l1_clusters: clusters_for(u64::from(self.header.l1_size_entries) * 8),
                rt: self.header.refcount_table_offset,
                rt_clusters: u64::from(self.header.refcount_table_clusters),
            },
        };
        if let Some(t) = self.txg.as_mut() {
            // From here on the old tables are freed (below) whatever happens.
            t.durable_roots_freed = true;
            t.staged = Some(old);
        }
        let old_l1 = old.l1 >> self.cluster_bits;
        let old_rt = old.rt >> self.cluster_bits;

        let l1_clusters = clusters_for(self.l1.len() as u64 * 8);
        let l1 = if l1_clusters > 0 {
            self.alloc_table(l1_clusters)?
        } else {
            0
        };
        self.metadata
            .move_region("L1 table", l1, l1 + (l1_clusters << self.cluster_bits));
        self.free_later(old_l1..old_l1 + old.l1_clusters, FreeKind::Other);

        let mut old_rt_freed = false;
        let (rt, rt_clusters) = loop {
            self.settle_frees()?;
            let want = clusters_for(self.reftable.len() as u64 * 8).max(1);
            let at = self.alloc_table(want)?;
            self.metadata
                .move_region("refcount table", at, at + (want << self.cluster_bits));
            if !old_rt_freed {
                self.free_later(old_rt..old_rt + old.rt_clusters, FreeKind::Other);
                old_rt_freed = true;
            }
            self.settle_frees()?;
            if clusters_for(self.reftable.len() as u64 * 8) <= want {
                break (at, want);
            }
            // The table outgrew the place: give the place back and try a larger one.
            let first = at >> self.cluster_bits;
            for c in first..first + want {
                self.set_refcount(c, 0)?;
                self.quarantine.insert(c, self.io_epoch);
            }
        };
        self.settle_frees()?;
        Ok(Roots {
            l1,
            l1_clusters,
            rt,
            rt_clusters,
        })
    }

    /// `clusters` contiguous clusters for a table: a freed cluster in the middle of the file
    /// when one will do (commits do not grow the file), else past everything in use.
    fn alloc_table(&mut self, clusters: u64) -> Result<u64> {
        if clusters == 1 {
            self.alloc_cluster()
        } else {
            self.alloc_contiguous(clusters)
        }
    }

    /// Applies refcount decrements until none is left (applying one may copy a refcount
    /// block, which frees D's copy).
    fn settle_frees(&mut self) -> Result<()> {
        while !self.pending_frees.is_empty() {
            self.apply_pending_frees()?;
        }
        Ok(())
    }

    /// Writes the group's dirty L2 tables and refcount blocks, all in owned clusters, in any
    /// order (D names none of them).
    pub(in crate::engine) fn write_owned_tables(&mut self) -> Result<()> {
        self.write_owned(false)?;
        self.write_owned(true)
    }

    /// The dirty tables of one cache (L2 tables, or refcount blocks) written out.
    fn write_owned(&mut self, refblocks: bool) -> Result<()> {
        let (what, writing) = if refblocks {
            ("a refcount block", "writing a refcount block of the group")
        } else {
            ("an L2 table", "writing an L2 table of the group")
        };
        fn cache<S: Storage>(image: &mut Image<S>, refblocks: bool) -> &mut TableCache {
            if refblocks {
                &mut image.refblock_cache
            } else {
                &mut image.l2_cache
            }
        }
        for offset in cache(self, refblocks).dirty_offsets() {
            if !self.may_overwrite(offset) {
                return Err(Error::Corrupt(format!(
                    "{what} at {offset:#x}, dirty, belongs to the durable image"
                )));
            }
            self.write_cached_table(refblocks, offset, writing)?;
            cache(self, refblocks).mark_clean(offset);
        }
        Ok(())
    }

    /// The txg write-back: owned tables go out (they may, any time); L1 and refcount table
    /// entries stay in memory for the commit; decrements apply in memory (their clusters are
    /// quarantined until the commit).
    pub(in crate::engine) fn write_back_group(&mut self) -> Result<()> {
        if !self.l1_dirty.is_empty() || !self.reftable_dirty.is_empty() {
            if let Some(t) = self.txg.as_mut() {
                t.l1_changed |= !self.l1_dirty.is_empty();
                t.reftable_changed |= !self.reftable_dirty.is_empty();
            }
            self.l1_dirty.clear();
            self.reftable_dirty.clear();
        }
        self.settle_frees()?;
        // Write-back's stage 6 (a cluster the active table named twice): the group commits
        // the flag and the decrement together, so no order to keep.
        if !self.copied_candidates.is_empty() {
            self.restore_copied_flags()?;
            self.settle_frees()?;
        }
        self.write_owned_tables()
    }
}
