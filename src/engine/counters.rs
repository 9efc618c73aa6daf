//! Counts of the I/O an image issued, so tests and benchmarks can see how many syncs a guest
//! flush cost.

/// Cumulative counts since the image was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Calls to [`crate::engine::Image::flush`] (including the one in `close`).
    pub guest_flushes: u64,
    /// Calls to [`crate::engine::Storage::flush`], for ordering and for durability.
    pub storage_flushes: u64,
    /// Calls to [`crate::engine::Image::barrier`] (guest barriers).
    pub guest_barriers: u64,
    /// Calls to [`crate::engine::Storage::barrier`].
    pub storage_barriers: u64,
    /// Ordering points between dependent writes (each one a storage barrier).
    pub ordering_points: u64,
    /// Clusters taken into the zero reserve, and handed out from it.
    pub reserved_clusters: u64,
    pub reserved_clusters_used: u64,
    /// Transaction groups committed, in all and by what made them commit (the three add up):
    /// the age bound, the size bound, or a durability point (a flush, a close, an
    /// inactivation, a check or resize that writes outside groups).
    pub groups_committed: u64,
    pub groups_committed_by_age: u64,
    pub groups_committed_by_size: u64,
    pub groups_committed_for_durability: u64,
    /// The most guest bytes a group held when it committed, and the oldest a group was then
    /// (milliseconds from its first write until it was durable): the most that was written,
    /// and for the longest, without being durable.
    pub peak_group_bytes: u64,
    pub peak_group_age_ms: u64,
    /// Metadata writes (header, L1/L2 tables, refcount table and blocks).
    pub metadata_writes: u64,
    /// Guest data writes (in place, or whole newly allocated clusters).
    pub data_writes: u64,
    /// Freed host clusters discarded on the file (`discard.rs`), and discards the file
    /// refused or failed (advisory: nothing else changes).
    pub discarded_clusters: u64,
    pub discards_refused: u64,
}
