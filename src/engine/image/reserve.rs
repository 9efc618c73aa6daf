//! The zero reserve: host clusters allocated ahead of need, past everything in use, whose
//! refcounts (and the file length covering them) reached storage before anything may name
//! them.
//!
//! Why: most of a guest flush's ordering points exist because a new cluster is named by an
//! L2 entry (or a new L2 table by an L1 entry) in the same interval in which it was counted
//! and written. A reserved cluster breaks both dependencies:
//! - its refcount is already on storage, ordered before the entry that will name it (rule
//!   (b) of `writeback.rs` holds without a new ordering point);
//! - it reads as zeros (a hole in the file), so when the guest cluster it replaces also read
//!   as zeros (no backing file; unallocated or zero flag), a crash that keeps the new L2 entry
//!   but loses (part of) the data shows zeros where the guest had zeros: each sector old or
//!   new, as for any write the guest has not flushed (rule (a) needs no ordering point;
//!   not on an encrypted image, where the hole decrypts to noise);
//! - a new L2 table in a reserved cluster reads as "all unallocated" until it is written, which
//!   is what the L1 range it covers held (rule (c) needs no ordering point).
//!
//! So an appending guest write plus flush costs one sync, whatever the barrier mode.
//!
//! Invariants kept here:
//! - a cluster is in `usable` only once its refcount and the file extension covering it are
//!   ordered before every later write (a barrier after writing them), or durable (the sync of
//!   the flush that reserved them); a `pending` cluster handed out when `usable` ran dry is an
//!   ordinary allocation as far as (b) goes: `unordered.refcounts` makes the write-back order
//!   its refcount before the entry naming it;
//! - reserved clusters are never named by any table while reserved; `take` hands them out
//!   once each;
//! - freed clusters in the middle of the file are reused before the reserve grows (the file
//!   does not grow without bound under discard and rewrite); only clusters that would extend
//!   the file come from the reserve.
//!
//! A crash leaves the unused reserve counted but unreferenced: leaked clusters, which
//! `qemu-img check -r leaks` gives back. A clean close gives them back itself.

use std::collections::VecDeque;
use std::ops::Range;

use crate::engine::debug_event::DebugEvent;
use crate::engine::error::{Error, Result};
use crate::engine::image::Image;
use crate::engine::storage::Storage;

/// Clusters reserved by the first replenish; each time the reserve runs dry between two
/// flushes, the next batch doubles, up to [`MAX_BATCH_CLUSTERS`].
const FIRST_BATCH_CLUSTERS: u64 = 16;
const MAX_BATCH_CLUSTERS: u64 = 1024;

#[derive(Debug)]
pub(in crate::engine) struct Reserve {
    /// Runs of reserved clusters that may be named now (see the invariants above), handed out
    /// from the front.
    usable: VecDeque<Range<u64>>,
    /// Runs reserved since the last sync, without an ordering point yet: usable after it.
    pending: Vec<Range<u64>>,
    /// Clusters the next replenish reserves.
    batch: u64,
    /// A cluster was taken since the last top-up: the guest appends, so the next flush or
    /// barrier tops the reserve up. A guest that only overwrites never draws from it, and
    /// its flushes (the close's included) write no reserve at all.
    drawn: bool,
}

impl Default for Reserve {
    fn default() -> Self {
        Reserve {
            usable: VecDeque::new(),
            pending: Vec::new(),
            batch: FIRST_BATCH_CLUSTERS,
            drawn: false,
        }
    }
}

impl Reserve {
    /// Every reserved cluster, usable or pending.
    pub fn all(&self) -> impl Iterator<Item = u64> + '_ {
        self.usable
            .iter()
            .chain(&self.pending)
            .flat_map(|r| r.clone())
    }

    fn usable_clusters(&self) -> u64 {
        self.usable.iter().map(|r| r.end - r.start).sum()
    }
}

impl<S: Storage> Image<S> {
    /// Up to `wanted` contiguous reserved host clusters (at least one), replenishing the
    /// reserve with an ordering point if it is empty. Returns (first host offset, count).
    pub(in crate::engine) fn take_reserved(&mut self, wanted: u64) -> Result<(u64, u64)> {
        self.storage.debug_event(DebugEvent::ClusterAlloc);
        self.reserve.drawn = true;
        if self.reserve.usable.is_empty() {
            // Ran dry between flushes: the next batch is larger. This one is handed out
            // before an ordering point has ordered its refcounts, like any cluster the
            // allocator counts: (b) is kept by the write-back, whose stage 3 orders the
            // refcounts before the L2 entries naming these clusters (`unordered.refcounts`,
            // set here in case nothing was written). No ordering point is taken now, so a
            // guest that never flushes makes no host sync for the reserve; the clusters still
            // read as zeros, so (a) and (c) need nothing either.
            if self.reserve.pending.is_empty() {
                self.reserve.batch = (self.reserve.batch * 2).min(self.reserve_cap());
                self.replenish_reserve()?;
            }
            self.unordered.refcounts = true;
        }
        let run = match self.reserve.usable.front_mut() {
            Some(run) => run,
            None => self.reserve.pending.first_mut().ok_or_else(|| {
                Error::Corrupt("the zero reserve is empty after a replenish".into())
            })?,
        };
        let n = wanted.min(run.end - run.start).max(1);
        let first = run.start;
        run.start += n;
        self.reserve.usable.retain(|r| !r.is_empty());
        self.reserve.pending.retain(|r| !r.is_empty());
        self.counters.reserved_clusters_used += n;
        Ok((first << self.cluster_bits, n))
    }

    /// Whether the next cluster the allocator would hand out extends the file (so a reserved
    /// cluster serves as well, and better): false when a freed cluster waits in the middle.
    /// Never on storage that cannot grow: there is no reserve there (nothing lies past the
    /// end of a block device, and its free clusters do not read as zeros).
    pub(in crate::engine) fn next_allocation_extends_file(&mut self) -> Result<bool> {
        // A transaction group needs no reserve either: nothing it writes is named by the
        // image until its commit.
        if self.txg.is_some() || !self.storage.is_growable() {
            return Ok(false);
        }
        let free = self.find_free_cluster()?;
        Ok(free << self.cluster_bits >= self.host_end)
    }

    /// The most clusters a batch may take: enough for a burst of large writes, never a large
    /// share of a small disk.
    fn reserve_cap(&self) -> u64 {
        let disk_clusters = self.header.virtual_size >> self.cluster_bits;
        MAX_BATCH_CLUSTERS.min((disk_clusters / 8).max(FIRST_BATCH_CLUSTERS))
    }

    /// Reserves a batch of clusters past everything in use: counts them, writes the refcount
    /// structures and one zero sector at the end of the batch (so the file covers it). They
    /// are pending until the next ordering point or sync ([`Self::promote_pending_reserve`]).
    pub(in crate::engine) fn replenish_reserve(&mut self) -> Result<()> {
        let count = self.reserve.batch.min(self.reserve_cap()).max(1);
        let first = self.alloc_contiguous(count)? >> self.cluster_bits;
        let end = first + count;
        self.write_refcount_structures()?;
        let sector = 512u64;
        self.storage.debug_event(DebugEvent::ClusterAllocSpace);
        self.write_metadata(
            (end << self.cluster_bits) - sector,
            &[0u8; 512],
            "extending the image file over reserved clusters",
        )?;
        match self.reserve.pending.last_mut() {
            Some(last) if last.end == first => last.end = end,
            // New refcount blocks may sit between two batches.
            _ => self.reserve.pending.push(first..end),
        }
        self.counters.reserved_clusters += count;
        Ok(())
    }

    /// After an ordering point or a sync: the pending reserve becomes usable.
    pub(in crate::engine) fn promote_pending_reserve(&mut self) {
        for run in std::mem::take(&mut self.reserve.pending) {
            match self.reserve.usable.back_mut() {
                Some(last) if last.end == run.start => last.end = run.end,
                _ => self.reserve.usable.push_back(run),
            }
        }
    }

    /// At a guest flush or barrier, before its sync or ordering point: tops the reserve up if
    /// it was drawn from since the last top-up and is below half a batch, so the next
    /// interval's appends find it usable (that sync or ordering point orders it before them).
    pub(in crate::engine) fn top_up_reserve(&mut self) -> Result<()> {
        if self.read_only
            || self.txg.is_some()
            || !self.reserve.drawn
            || !self.reserve.pending.is_empty()
            || !self.storage.is_growable()
        {
            return Ok(());
        }
        self.reserve.drawn = false;
        if self.reserve.usable_clusters() >= self.reserve.batch / 2 {
            return Ok(());
        }
        self.replenish_reserve()
    }

    /// Gives every reserved cluster back (refcount 0): before a close, a check, or anything
    /// that recounts. Written back with the next write-back.
    pub(in crate::engine) fn release_reserve(&mut self) -> Result<()> {
        let clusters: Vec<u64> = self.reserve.all().collect();
        self.reserve.usable.clear();
        self.reserve.pending.clear();
        for cluster in clusters {
            // Never named by any table: dropping the count orders after nothing.
            self.set_refcount(cluster, 0)?;
            let lowest = self.free_cluster_hint.min(cluster);
            self.free_cluster_hint = lowest;
        }
        Ok(())
    }
}
