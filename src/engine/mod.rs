//! The qcow2 format and its read/write engine: pure Rust, no QEMU types, generic over
//! [`Storage`].
//!
//! Folders by concept:
//! - [`format`](mod@format): the on-disk format, parsed and validated before anything trusts it: the byte
//!   reader, header, table layout, entries, refcount fields, snapshot table, compression.
//!   This is the untrusted-input surface, and what the fuzz targets drive.
//! - `check`: `qemu-img check` for qcow2: the reference walk (with the bitmaps' checks),
//!   comparing and repairing, rebuilding the refcount structure; the repair of images
//!   opened with the dirty bit.
//! - [`create`](mod@create): creating new images (`qemu-img create`): layout, writing, and measuring
//!   them (`qemu-img measure`).
//! - [`image`]: [`Image`], an open image: opening, the guest-facing read/write/map/flush, and
//!   the allocation and write-back core (lookup and allocation, caches, the overlap check,
//!   write-back order, requests and their data step, the zero reserve, transaction groups,
//!   discards passed to the file, resize, zeroes and discard, backing file names).
//!
//! Shared by all of them:
//! - [`error`]: the engine's error, with the context a user needs;
//! - [`storage`]: the [`Storage`] and [`Backing`] traits, and [`MemStorage`];
//! - [`debug_event`]: the metadata and ordering points announced to the storage (blkdebug);
//! - `counters`: what the engine did, for the driver's statistics ([`Counters`]).
//!
//! Data I/O (guest bytes to and from host clusters) is kept apart from metadata work: a
//! request is planned under the metadata lock (`request`: where the bytes go, which clusters
//! are allocated), its bytes move without the lock (`dataio`), and it is finished under the
//! lock (new clusters linked into their L2 tables). The engine's own `read`/`write` run the
//! three steps in one call; the QEMU glue runs them around its `CoMutex`.

mod check;
mod counters;
pub mod create;
pub mod debug_event;
pub mod error;
pub mod format;
pub mod image;
pub mod storage;

pub use check::{CheckFix, CheckReport, FragmentationInfo};
pub use counters::Counters;
pub use create::{
    begin_create, create, create_with_data_file, measure, CreateEncryption, CreateOptions, Measure,
    NewImage, Preallocation,
};
pub use debug_event::DebugEvent;
pub use error::{Error, Result};
pub use format::bitmap::{BitmapEntry, BitmapFlags};
pub use format::header::CryptMethod;
pub use format::snapshot::Snapshot;
pub use image::compressed::CompressedWrite;
pub use image::discard::DiscardPolicy;
pub use image::encryption::{DataCipher, Encryption, ENCRYPTION_SECTOR_BYTES};
pub use image::request::{ReadPlan, ReadSource, WritePiece, WritePlan};
pub use image::txg::{CommitReason, GroupExposure, TxgOptions};
pub use image::{bitmap_constraints, Amendment, Growth, SnapshotParams, StoredBitmap};
pub use image::{cache_sizes, CacheSizes, Image};
pub use storage::{Backing, MemStorage, Storage};

/// How to open an image.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Refuse every write; allows images marked corrupt or dirty to be read.
    pub read_only: bool,
    /// Bytes of L2 tables to cache. Default: enough to map the whole virtual disk, at most
    /// 32 MiB (QEMU 7.2's default on Linux, `DEFAULT_L2_CACHE_MAX_SIZE`); at least 2 tables.
    pub l2_cache_bytes: Option<u64>,
    /// Bytes of refcount blocks to cache. Default: 4 clusters (QEMU 7.2's
    /// `MIN_REFCOUNT_CACHE_SIZE`, its default too: 256 KiB with 64 KiB clusters); at least 4
    /// blocks.
    pub refcount_cache_bytes: Option<u64>,
    /// Bytes of both caches together (QEMU's `cache-size`), split as QEMU's qcow2 splits it:
    /// what one of the two sizes above leaves, or, with neither given, what the L2 tables of
    /// the whole disk need and the rest (at least the refcount minimum) for refcount blocks.
    /// The caller refuses combinations QEMU refuses (all three, or a part above the total).
    pub cache_bytes: Option<u64>,
    /// Opened for `qemu-img check` (QEMU's `BDRV_O_CHECK`): an image marked corrupt may be
    /// opened read-write so that the check can repair it, and a dirty image is not repaired
    /// at open, so that the check reports what is wrong.
    pub for_check: bool,
    /// Which freed host clusters are discarded on the file (QEMU's `pass-discard-*`).
    pub discard: DiscardPolicy,
    /// Work in transaction groups (`barrier=txg`, `txg.rs`): nothing the durable image names
    /// is overwritten until a commit switches the header to the group's tables.
    pub txg: Option<TxgOptions>,
    /// Test only, never for real data: `write_back` leaves out its stage-3 ordering point (L2
    /// tables after the data and refcounts they name), so that the crash-consistency harness
    /// (`tests/crash/`) can show it catches a missing barrier. Driver option
    /// `x-test-skip-ordering=stage3`.
    pub test_skip_stage3_ordering: bool,
    /// Test only, never for real data: a transaction group's commit leaves out its first
    /// sync (the group's tables before the header that names them), so that the crash
    /// harness can show it catches that. Driver option `x-test-skip-ordering=txg-first-sync`.
    pub test_skip_txg_first_sync: bool,
    /// Test only, never for real data: a transaction group overwrites the durable image's
    /// data clusters in place after a guest barrier too (breaking "One epoch" in `txg.rs`),
    /// so that the engine's crash check can show it catches that.
    pub test_txg_overwrite_after_barrier: bool,
    /// Test only, never for real data: a freed cluster the discard policy passes is
    /// discarded at once, when its refcount drops (breaking the ordering invariant of
    /// `image/discard.rs`), so that the crash-consistency harness can show it catches that.
    /// Driver option `x-test-skip-ordering=discard-early`.
    pub test_discard_early: bool,
    /// Test only, never for real data: the header names a new snapshot table without the
    /// ordering point that puts the table, the snapshot's L1 copy and their refcounts first
    /// (`image/snapshots.rs`), so that the crash-consistency harness can show it catches
    /// that. Driver option `x-test-skip-ordering=snapshot-table`.
    pub test_skip_snapshot_ordering: bool,
    /// Test only, never for real data: the header names a new bitmap directory without the
    /// ordering point that puts the bitmaps' data clusters, tables, the directory and their
    /// refcounts first (`image/bitmaps.rs`), so that the crash-consistency harness can show
    /// it catches that. Driver option `x-test-skip-ordering=bitmap-table`.
    pub test_skip_bitmap_ordering: bool,
    /// Test only, never for real data: a refcount width change switches the header to the
    /// new refcount table before the new table and blocks are durable
    /// (`image/refcount_order.rs`), so that the crash-consistency harness can show it
    /// catches that. Driver option `x-test-skip-ordering=amend-refcount`.
    pub test_skip_amend_ordering: bool,
}

/// What backs a range of guest bytes (the answer of [`Image::map`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Not allocated in this image: reads go to the backing file, or read as zeros.
    Unallocated,
    /// Reads as zeros (v3 zero flag), without reading the backing file; `host_offset` is
    /// the preallocated host cluster's (of the first byte asked for), if it has one.
    Zero { host_offset: Option<u64> },
    /// Stored uncompressed at `host_offset` in the image file (the offset of the first byte
    /// asked for; the range is contiguous in the file).
    Data { host_offset: u64 },
    /// Stored compressed (one guest cluster at most per answer).
    Compressed,
}
