//! Freed host clusters passed down to the file as discards (QEMU's qcow2 runtime options
//! `pass-discard-request`, `pass-discard-snapshot`, `pass-discard-other`), so that a guest's
//! TRIM gives the host its space back.
//!
//! Every free goes through [`Image::free_later`] with the kind of operation that dropped the
//! reference (the classes QEMU's qcow2 uses, so that the options mean the same). A cluster
//! whose refcount reaches zero enters quarantine (`metadata.rs`). One of a kind the policy
//! passes does not leave it at the durability point that ends its quarantine: it is due for
//! a discard then, which the next durability point issues before its sync (or the close,
//! after its own), and leaves quarantine after that point.
//!
//! Ordering invariant (kept by `release_quarantine` and [`Image::issue_due_discards`]): a
//! cluster is discarded only after a durability point (a flush's sync, a transaction group's
//! commit) that follows the write of every table entry that stopped naming it and of its
//! refcount decrement, and before any allocation can reuse it. So a crash never leaves an
//! entry naming a discarded cluster (its data read back as zeros, or a compressed cluster
//! made undecodable), and the discard never destroys a new owner's data. QEMU's qcow2 passes
//! only the safe classes because it discards right after the refcount update; here any
//! class would be safe, and the options only choose which ones the user wants passed.
//!
//! Why one durability point later: a discard changes the file, so one issued after a flush's
//! sync would cost the block layer's flush of the file right after it a second sync. Issued
//! before the next flush's sync, it rides on that sync; the clusters stay unusable for one
//! flush more.

use std::collections::BTreeSet;

use crate::engine::image::Image;
use crate::engine::storage::Storage;

/// Which kinds of freed clusters are discarded on the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscardPolicy {
    /// Clusters freed by a guest request: discard, write_zeroes that may unmap
    /// (`pass-discard-request`; QEMU's default: on when the drive has `discard=unmap`).
    pub request: bool,
    /// Clusters freed by emptying the image or deleting an internal snapshot
    /// (`pass-discard-snapshot`; default on).
    pub snapshot: bool,
    /// Clusters freed otherwise: old tables after a copy or a move (`pass-discard-other`;
    /// default off).
    pub other: bool,
}

impl DiscardPolicy {
    /// QEMU's qcow2 defaults for a drive without `discard=unmap`.
    pub const DEFAULT: DiscardPolicy = DiscardPolicy {
        request: false,
        snapshot: true,
        other: false,
    };
}

impl Default for DiscardPolicy {
    fn default() -> DiscardPolicy {
        DiscardPolicy::DEFAULT
    }
}

/// What dropped a reference to a host cluster: decides whether the cluster is discarded
/// once it is free (see [`DiscardPolicy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreeKind {
    /// A guest discard or write_zeroes.
    Request,
    /// Emptying the image (`qemu-img commit`), a snapshot's deletion.
    Snapshot,
    /// A table replaced by a copy or moved (L1, L2, refcount table and blocks).
    Other,
    /// A data cluster replaced by copy-on-write: never discarded, as in QEMU's qcow2.
    Never,
}

impl DiscardPolicy {
    fn passes(self, kind: FreeKind) -> bool {
        match kind {
            FreeKind::Request => self.request,
            FreeKind::Snapshot => self.snapshot,
            FreeKind::Other => self.other,
            FreeKind::Never => false,
        }
    }
}

/// The clusters to discard, and when.
#[derive(Debug, Default)]
pub(in crate::engine) struct DiscardState {
    pub(in crate::engine) policy: DiscardPolicy,
    /// Host clusters (in cluster units) whose last reference a passed kind dropped, in
    /// quarantine until a durability point makes them due.
    pub(in crate::engine) on_release: BTreeSet<u64>,
    /// Host clusters whose free is durable, still in quarantine: discarded by the next
    /// durability point, before its sync.
    pub(in crate::engine) due: BTreeSet<u64>,
}

impl<S: Storage> Image<S> {
    /// Drops one reference to each host cluster in `clusters` once the entries that stopped
    /// naming them are written (write-back stage 5, rule (d) of `writeback.rs`); `kind` says
    /// what dropped them (whether they are discarded once free).
    pub(in crate::engine) fn free_later(
        &mut self,
        clusters: impl IntoIterator<Item = u64>,
        kind: FreeKind,
    ) {
        let pass = self.discard.policy.passes(kind);
        for cluster in clusters {
            self.pending_frees.push((cluster, pass));
        }
    }

    /// Which frees are discarded on the file from now on (a reopen with other options).
    pub fn set_discard_policy(&mut self, policy: DiscardPolicy) {
        self.discard.policy = policy;
    }

    /// Whether a cluster whose quarantine ends now stays in it (`release_quarantine`): one
    /// freed by a passed kind becomes due for a discard, and stays until it was issued.
    pub(in crate::engine) fn held_for_discard(&mut self, cluster: u64) -> bool {
        if self.discard.on_release.remove(&cluster) {
            self.discard.due.insert(cluster);
        }
        self.discard.due.contains(&cluster)
    }

    /// Discards the clusters due, in runs of adjacent clusters, before the sync of a
    /// durability point (or at the close, after its own). A discard is advisory: a file that
    /// cannot discard, or fails to, changes nothing (its count is kept). The clusters leave
    /// quarantine at the durability point's end.
    pub(in crate::engine) fn issue_due_discards(&mut self) {
        if self.discard.due.is_empty() {
            return;
        }
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for cluster in std::mem::take(&mut self.discard.due) {
            match runs.last_mut() {
                Some((start, count)) if *start + *count == cluster => *count += 1,
                _ => runs.push((cluster, 1)),
            }
        }
        // The sync that follows covers them, so the block layer's own flush of the file
        // finds nothing new.
        self.unflushed_writes = true;
        for (start, count) in runs {
            let outcome = self
                .storage
                .discard(start << self.cluster_bits, count << self.cluster_bits);
            match outcome {
                Ok(()) => self.counters.discarded_clusters += count,
                Err(_) => self.counters.discards_refused += 1,
            }
        }
    }
}
