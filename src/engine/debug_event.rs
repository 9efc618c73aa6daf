//! Debug events: the engine announces each metadata and ordering point to its storage just
//! before the I/O it names, so that a test can inject an error there (QEMU's blkdebug) or
//! stop a request at it.
//!
//! The names are QEMU's `BlkdebugEvent`s (qapi/block-core.json), one to one, plus
//! [`DebugEvent::Barrier`]; each is emitted where QEMU 7.2's qcow2 emits the same event, as far
//! as this engine has such a point. Where qcow2b differs: metadata is written at write-back
//! (a flush, a cache eviction, a close), not when the request changes it, so `l1_update`,
//! `l2_update`, `l2_alloc_write`, `refblock_update_part`, `refblock_alloc_write` and
//! `refblock_alloc_hookup` fire then; `cluster_alloc` also fires when a cluster is taken from
//! the zero reserve (`reserve.rs`).

/// A point in the engine's I/O that a debugger or an error injector may hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DebugEvent {
    /// An L1 entry is written (write-back stage 4).
    L1Update,
    /// Clusters for a larger L1 table are allocated (growing the virtual size).
    L1GrowAllocTable,
    /// The larger L1 table is written.
    L1GrowWriteTable,
    /// The header switches to the larger L1 table.
    L1GrowActivateTable,
    /// An L2 table is read into the cache.
    L2Load,
    /// An L2 table is written (write-back stage 3).
    L2Update,
    /// A shared L2 table is read to be copied (copy-on-write of a table).
    L2AllocCowRead,
    /// A new L2 table is written for the first time (before its `L2Update`).
    L2AllocWrite,
    /// Guest data is read from the image file.
    ReadAio,
    /// Guest data is read from the backing file.
    ReadBackingAio,
    /// A compressed cluster is read.
    ReadCompressed,
    /// A compressed cluster's bytes are written (`compressed.rs`).
    WriteCompressed,
    /// Bytes for a compressed cluster are allocated (inside a host cluster, or a new one).
    ClusterAllocBytes,
    /// An L2 entry is set to name a compressed cluster (in the cache; written back later).
    L2UpdateCompressed,
    /// Guest data is written to the image file.
    WriteAio,
    /// Old content is read for a copy-on-write fill.
    CowRead,
    /// A new cluster is written with copy-on-write fills around the guest's bytes.
    CowWrite,
    /// The refcount table is read (open).
    ReftableLoad,
    /// The refcount table grows: a new table and blocks are about to be written.
    ReftableGrow,
    /// A refcount block is read into the cache.
    RefblockLoad,
    /// A refcount block is written (write-back stage 1, a cache eviction).
    RefblockUpdatePart,
    /// A new refcount block is made (in the cache; written later).
    RefblockAlloc,
    /// A refcount table entry naming a new refcount block is written (stage 2).
    RefblockAllocHookup,
    /// A new refcount block is written for the first time.
    RefblockAllocWrite,
    /// Refcount table growth: the new refcount blocks are written.
    RefblockAllocWriteBlocks,
    /// Refcount table growth: the new refcount table is written.
    RefblockAllocWriteTable,
    /// Refcount table growth: the header switches to the new table.
    RefblockAllocSwitchTable,
    /// Host clusters are allocated (counted in the cache, or taken from the zero reserve).
    ClusterAlloc,
    /// Refcounts of clusters that lost a reference are decremented (write-back stage 5).
    ClusterFree,
    /// The file is extended over newly reserved clusters (the zero reserve's one write).
    ClusterAllocSpace,
    /// An ordering point: a storage barrier (an fdatasync in `flush` mode, an epoch boundary
    /// in `ordered` mode, fdatabarrier in `barrierfs` mode). Not in QEMU 7.2's list: added by
    /// this project's QAPI patch as `barrier`.
    Barrier,
}

impl DebugEvent {
    /// QEMU's name for the event (blkdebug's `event = "..."`).
    pub fn name(self) -> &'static str {
        match self {
            DebugEvent::L1Update => "l1_update",
            DebugEvent::L1GrowAllocTable => "l1_grow_alloc_table",
            DebugEvent::L1GrowWriteTable => "l1_grow_write_table",
            DebugEvent::L1GrowActivateTable => "l1_grow_activate_table",
            DebugEvent::L2Load => "l2_load",
            DebugEvent::L2Update => "l2_update",
            DebugEvent::L2AllocCowRead => "l2_alloc_cow_read",
            DebugEvent::L2AllocWrite => "l2_alloc_write",
            DebugEvent::ReadAio => "read_aio",
            DebugEvent::ReadBackingAio => "read_backing_aio",
            DebugEvent::ReadCompressed => "read_compressed",
            DebugEvent::WriteCompressed => "write_compressed",
            DebugEvent::ClusterAllocBytes => "cluster_alloc_bytes",
            DebugEvent::L2UpdateCompressed => "l2_update_compressed",
            DebugEvent::WriteAio => "write_aio",
            DebugEvent::CowRead => "cow_read",
            DebugEvent::CowWrite => "cow_write",
            DebugEvent::ReftableLoad => "reftable_load",
            DebugEvent::ReftableGrow => "reftable_grow",
            DebugEvent::RefblockLoad => "refblock_load",
            DebugEvent::RefblockUpdatePart => "refblock_update_part",
            DebugEvent::RefblockAlloc => "refblock_alloc",
            DebugEvent::RefblockAllocHookup => "refblock_alloc_hookup",
            DebugEvent::RefblockAllocWrite => "refblock_alloc_write",
            DebugEvent::RefblockAllocWriteBlocks => "refblock_alloc_write_blocks",
            DebugEvent::RefblockAllocWriteTable => "refblock_alloc_write_table",
            DebugEvent::RefblockAllocSwitchTable => "refblock_alloc_switch_table",
            DebugEvent::ClusterAlloc => "cluster_alloc",
            DebugEvent::ClusterFree => "cluster_free",
            DebugEvent::ClusterAllocSpace => "cluster_alloc_space",
            DebugEvent::Barrier => "barrier",
        }
    }
}
