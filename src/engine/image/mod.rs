//! [`Image`]: an open qcow2 image and the guest-facing operations (read, write, map, flush).
//!
//! Each guest request is cut into runs that one metadata answer covers; the metadata step
//! (`metadata.rs`) says where the bytes are or allocates a cluster for them, then the data
//! step moves bytes with a plain [`Storage`] call. Dirty metadata stays in the caches until
//! `write_back` (`writeback.rs`) writes it in the order the format's crash consistency
//! needs.

//!
//! The allocation and write-back core, one concept per file:
//! - `metadata`: cluster lookup, L2 allocation and copy-on-write, the cluster allocator;
//! - [`cache`]: the write-back cache of L2 tables and refcount blocks;
//! - `overlap`: where the metadata is, so that no data write, table use or free can hit it;
//! - `writeback`: the one routine that writes dirty metadata back, in the required order;
//! - [`request`]: request plans (reads, writes), in-flight allocations and I/O tickets;
//! - [`dataio`]: the data step of a request, over slices or QEMU I/O vectors;
//! - [`compressed`]: compressed writes: clusters compressed and packed at byte granularity;
//! - [`encryption`]: encrypted images: what is encrypted, with which IV offset, by a
//!   [`encryption::DataCipher`] the caller provides;
//! - `reserve`: the zero reserve: clusters counted and ordered ahead of need, so appends
//!   need no ordering point before their flush's sync;
//! - [`txg`]: transaction groups: barriers for free, two syncs per commit, a plain qcow2
//!   image at every commit;
//! - [`discard`]: which freed clusters are discarded on the file, and when;
//! - `resize`: growing the virtual size (and the L1 table); `shrink`: shrinking it;
//! - `amend`: `qemu-img amend` (version, lazy refcounts, data file, size);
//!   `refcount_order`: its change of the refcount width;
//! - `snapshots`: internal snapshots taken, applied and deleted, and their VM state;
//! - `backing_file`: naming another backing file (`qemu-img rebase`, block jobs);
//! - `data_file`: an external data file: guest clusters at their guest offsets there;
//! - `zeroes`: write_zeroes and discard (zero flag, unallocation; zero subclusters).
//!
//! Images with extended L2 entries (subclusters) go through the same steps: a lookup
//! resolves an entry at a subcluster (`format/entry.rs`), a write plan allocates and copies
//! whole subclusters (`request.rs`), and its finish sets the bitmap of what it wrote.

mod amend;
mod backing_file;
mod bitmaps;
pub mod cache;
pub mod compressed;
mod data_file;
pub mod dataio;
pub mod discard;
pub mod encryption;
mod metadata;
mod overlap;
mod refcount_order;
pub mod request;
mod reserve;
mod resize;
mod shrink;
mod snapshots;
pub mod txg;
mod writeback;
mod zeroes;

pub use amend::Amendment;
pub use bitmaps::{bitmap_constraints, StoredBitmap};
pub use resize::Growth;
pub use snapshots::SnapshotParams;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::engine::counters::Counters;
use crate::engine::debug_event::DebugEvent;
use crate::engine::error::{Error, Result};
use crate::engine::format::bytes::{read_table, BeBytes};
use crate::engine::format::entry::{L2Width, Subcluster};
use crate::engine::format::header::{
    AutoclearFeatures, Header, IncompatibleFeatures, MAX_CLUSTER_BITS,
};
use crate::engine::format::layout;
use crate::engine::format::refcount::RefcountGeometry;
use crate::engine::format::snapshot::{self, Snapshot};
use crate::engine::image::cache::TableCache;
use crate::engine::image::dataio::{DataContext, SliceSource, SliceTarget};
use crate::engine::image::discard::DiscardState;
use crate::engine::image::encryption::Encryption;
use crate::engine::image::overlap::MetadataMap;
use crate::engine::image::request::InflightAlloc;
use crate::engine::image::reserve::Reserve;
use crate::engine::image::txg::TxgState;
use crate::engine::image::writeback::Unordered;
use crate::engine::storage::{Backing, Storage};
use {crate::engine::Mapping, crate::engine::OpenOptions};

/// QEMU 7.2's default upper bound for the L2 cache on Linux.
const DEFAULT_L2_CACHE_MAX_BYTES: u64 = 32 << 20;
/// QEMU 7.2's default (and minimum) refcount cache, in clusters.
const DEFAULT_REFCOUNT_CACHE_CLUSTERS: u64 = 4;
const MIN_REFCOUNT_CACHE_CLUSTERS: u64 = 4;

/// An open qcow2 image over a [`Storage`].
///
/// Call [`Image::close`] (or [`Image::flush`]) before dropping it: dropping an image loses the
/// metadata still in its caches.
pub struct Image<S: Storage> {
    pub(super) storage: S,
    /// The external data file, when the header has one: guest clusters live there at their
    /// own guest offsets (`data_file.rs`).
    pub(super) data_file: Option<S>,
    /// Guest data was written to the data file since its last sync.
    pub(super) data_unsynced: bool,
    pub(super) header: Header,
    pub(super) read_only: bool,
    pub(super) cluster_bits: u32,
    /// Standard or extended L2 entries (the header's feature bit, kept at hand: every lookup
    /// needs it).
    pub(super) l2_width: L2Width,
    pub(super) rc: RefcountGeometry,
    /// Where the metadata is: never a target of data writes or frees (`overlap.rs`).
    pub(super) metadata: MetadataMap,
    /// The active L1 table (raw entries), fully in memory.
    pub(super) l1: Vec<u64>,
    /// L1 indices changed since the last write-back.
    pub(super) l1_dirty: BTreeSet<usize>,
    /// The refcount table (raw entries), fully in memory.
    pub(super) reftable: Vec<u64>,
    /// Refcount table indices changed since the last write-back.
    pub(super) reftable_dirty: BTreeSet<usize>,
    pub(super) l2_cache: TableCache,
    pub(super) refblock_cache: TableCache,
    /// Host clusters whose refcount must drop by one once the L2/L1 entries that stopped
    /// referencing them are written (applied by `write_back`), each with whether it is
    /// discarded on the file once free (`discard.rs`).
    pub(super) pending_frees: Vec<(u64, bool)>,
    /// Which freed clusters are discarded on the file, and those waiting for it.
    pub(super) discard: DiscardState,
    /// Host clusters an active L2 entry without COPIED stopped naming while the image has no
    /// internal snapshot: another active entry may name them too (qcow2 allows it; qemu-img
    /// never makes it), and gets its COPIED flag back once the refcount is down to one
    /// (`restore_copied_flags`).
    pub(super) copied_candidates: Vec<u64>,
    /// Freed host clusters not yet reusable, with the I/O epoch they were freed in: they
    /// wait for the next guest flush and for the I/O in flight when they were freed
    /// (`release_quarantine`, and the module comment of `request.rs`).
    pub(super) quarantine: BTreeMap<u64, u64>,
    /// The current I/O epoch: advanced by every guest flush.
    pub(super) io_epoch: u64,
    /// Outstanding request tickets per I/O epoch, oldest first (epochs only grow, and a
    /// ticket is always of the current one; no allocation per request once warm).
    pub(super) inflight_tickets: VecDeque<(u64, u32)>,
    /// Write plans not yet finished or aborted (a transaction group commits only when there
    /// are none: `txg.rs`).
    pub(super) write_plans_in_flight: usize,
    /// Guest cluster ranges whose allocation is in flight.
    pub(super) inflight_allocs: Vec<InflightAlloc>,
    /// Where the allocator starts looking for a free host cluster.
    pub(super) free_cluster_hint: u64,
    /// Where the next compressed cluster's bytes may go: just after the last one, inside a
    /// host cluster it filled in part (QEMU's `free_byte_offset`; `compressed.rs`).
    pub(super) compressed_tail: Option<u64>,
    /// End of the host file as the engine knows it: the file length at open or the end of the
    /// last cluster allocated since, whichever is larger.
    pub(super) host_end: u64,
    /// What later write-back stages must be ordered after (`writeback.rs`).
    pub(super) unordered: Unordered,
    /// Some write was issued since the last ordering point or sync.
    pub(super) unbarriered_writes: bool,
    /// New L2 tables whose L1 entries must wait for them (copies of shared tables, tables
    /// outside the zero reserve): rule (c) of `writeback.rs`.
    pub(super) new_l2_tables_to_order: BTreeSet<u64>,
    /// Clusters allocated ahead, counted and ordered before use (`reserve.rs`).
    pub(super) reserve: Reserve,
    /// The open transaction group, in the txg mode (`txg.rs`).
    pub(super) txg: Option<TxgState>,
    /// The txg mode's state while no group is open: the interval of one epoch before the
    /// guest's next barrier, which follows the ordinary rules (`txg.rs`, "One epoch").
    pub(super) txg_parked: Option<TxgState>,
    /// Some write was issued since the last storage flush.
    pub(super) unflushed_writes: bool,
    pub(super) counters: Counters,
    /// Opened for `qemu-img check` (see [`OpenOptions::for_check`]).
    pub(super) for_check: bool,
    /// What QEMU's limits cut from the snapshot table as an open for check read it
    /// (`format::snapshot::TableOverLimits`): `check -r all` writes the table anew, any other
    /// check fails.
    pub(super) snapshot_table_over_limits: Option<snapshot::TableOverLimits>,
    /// The internal snapshot table, parsed and validated at open (`snapshot.rs`).
    pub(super) snapshots: Vec<Snapshot>,
    /// How guest data is encrypted, and the cipher once it is given (`encryption.rs`).
    pub(super) encryption: Option<Encryption>,
    /// A read or write of the VM state area is running: `check_range` lets it past the
    /// virtual size (`snapshots.rs`).
    pub(super) vm_state_io: bool,
    /// Test only: see [`OpenOptions::test_skip_stage3_ordering`].
    pub(super) test_skip_stage3_ordering: bool,
    /// Test only: see [`OpenOptions::test_skip_txg_first_sync`].
    pub(super) test_skip_txg_first_sync: bool,
    /// Test only: see [`OpenOptions::test_txg_overwrite_after_barrier`].
    pub(super) test_txg_overwrite_after_barrier: bool,
    /// Test only: see [`OpenOptions::test_discard_early`].
    pub(super) test_discard_early: bool,
    /// Test only: see [`OpenOptions::test_skip_snapshot_ordering`].
    pub(super) test_skip_snapshot_ordering: bool,
    /// Test only: see [`OpenOptions::test_skip_bitmap_ordering`].
    pub(super) test_skip_bitmap_ordering: bool,
    /// Test only: see [`OpenOptions::test_skip_amend_ordering`].
    pub(super) test_skip_amend_ordering: bool,
    /// The bitmap directory, as on storage (empty unless the bitmaps autoclear bit is set).
    pub(super) bitmaps: Vec<crate::engine::format::bitmap::BitmapEntry>,
    /// Names of the bitmaps this open marked in use (they were consistent when it did): their
    /// stored bits are the ones the caller loaded and may trust (`bitmaps.rs`).
    pub(super) bitmaps_marked: BTreeSet<Vec<u8>>,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |e| Error::io(context, e)
}

/// The cache sizes an image gets, in bytes (see [`cache_sizes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheSizes {
    pub l2_bytes: u64,
    pub refcount_bytes: u64,
    /// What the L2 tables of the whole disk take (the most an L2 cache can use).
    pub disk_l2_bytes: u64,
}

/// The cache sizes for `header` from the sizes asked for in bytes (QEMU's `l2-cache-size`,
/// `refcount-cache-size` and `cache-size`), split and bounded as QEMU's qcow2 does: the L2
/// part at most what the whole disk needs (and, unless given, at most 32 MiB); with only
/// `cache-size`, the L2 tables of the whole disk first if the refcount minimum fits beside
/// them. The minimum counts of tables are the caches' own.
pub fn cache_sizes(header: &Header, opts: &OpenOptions) -> CacheSizes {
    let cluster_size = header.cluster_size();
    let disk_l2_bytes = header
        .virtual_size
        .div_ceil(layout::bytes_per_l1_entry(
            header.cluster_bits,
            header.l2_width(),
        ))
        .saturating_mul(cluster_size);
    let min_refcount_bytes = MIN_REFCOUNT_CACHE_CLUSTERS * cluster_size;
    let l2 = disk_l2_bytes.min(opts.l2_cache_bytes.unwrap_or(DEFAULT_L2_CACHE_MAX_BYTES));
    let (l2_bytes, refcount_bytes) = match (
        opts.cache_bytes,
        opts.l2_cache_bytes,
        opts.refcount_cache_bytes,
    ) {
        (None, _, rc) => (
            l2,
            rc.unwrap_or(DEFAULT_REFCOUNT_CACHE_CLUSTERS * cluster_size),
        ),
        (Some(total), Some(_), _) => (l2, total.saturating_sub(l2)),
        (Some(total), None, Some(rc)) => (total.saturating_sub(rc), rc),
        (Some(total), None, None) if total >= disk_l2_bytes + min_refcount_bytes => {
            (disk_l2_bytes, total - disk_l2_bytes)
        }
        (Some(total), None, None) => {
            let rc = total.min(min_refcount_bytes);
            (total - rc, rc)
        }
    };
    CacheSizes {
        l2_bytes,
        refcount_bytes,
        disk_l2_bytes,
    }
}

/// How many L2 tables and refcount blocks the caches hold ([`cache_sizes`] in tables).
fn cache_capacities(header: &Header, opts: &OpenOptions) -> (usize, usize) {
    let sizes = cache_sizes(header, opts);
    let cluster_size = header.cluster_size();
    let refblocks = (sizes.refcount_bytes / cluster_size).max(MIN_REFCOUNT_CACHE_CLUSTERS);
    let tables = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    (tables(sizes.l2_bytes / cluster_size), tables(refblocks))
}

impl<S: Storage> Image<S> {
    /// Opens and validates an image. Refuses what this engine cannot handle safely, with an
    /// error naming the field or feature. An image with an external data file needs
    /// [`Image::open_with_data_file`].
    pub fn open(storage: S, opts: &OpenOptions) -> Result<Self> {
        Self::open_with(storage, None, opts, |_| Ok(()))
    }

    /// Opens an image whose guest clusters live in the external data file `data`
    /// (`data_file.rs`); refuses an image without one.
    pub fn open_with_data_file(storage: S, data: S, opts: &OpenOptions) -> Result<Self> {
        Self::open_with(storage, Some(data), opts, |_| Ok(()))
    }

    /// The header of the image in `storage`, parsed and validated, without opening it: what
    /// a caller needs to know first (whether it names an external data file, and which).
    pub fn read_header(storage: &S) -> Result<Header> {
        let file_len = storage.len().map_err(io("getting the image file length"))?;
        if file_len < 72 {
            return Err(Error::Invalid(format!(
                "file of {file_len} bytes is too short for a qcow2 header"
            )));
        }
        let mut first = vec![0u8; 512];
        storage
            .read_at(0, &mut first)
            .map_err(io("reading the header"))?;
        let cluster_bits = BeBytes::new("the header", &first).u32(20)?;
        if cluster_bits <= MAX_CLUSTER_BITS && cluster_bits > 9 {
            first = vec![0u8; 1usize << cluster_bits];
            storage
                .read_at(0, &mut first)
                .map_err(io("reading the header"))?;
        }
        Header::parse(&first)
    }

    /// Opens an image as [`Image::open`] (or, with `data_file`, [`Image::open_with_data_file`])
    /// does, with `before_writing` run once the image is read and validated and before a
    /// read-write open writes anything (a dirty image's repair, the autoclear bits): what the
    /// caller must check first (an encrypted image's key), so that an open it refuses leaves
    /// the file as it was.
    pub fn open_with(
        storage: S,
        data_file: Option<S>,
        opts: &OpenOptions,
        before_writing: impl FnOnce(&mut Self) -> Result<()>,
    ) -> Result<Self> {
        let header = Self::read_header(&storage)?;
        match (header.has_data_file(), data_file.is_some()) {
            (true, false) => {
                return Err(Error::Unsupported(
                    "the image keeps its data in an external data file, which was not given".into(),
                ))
            }
            (false, true) => {
                return Err(Error::BadOption(
                    "'data-file' can only be set for images with an external data file".into(),
                ))
            }
            _ => {}
        }
        if header.has_data_file() && opts.txg.is_some() {
            return Err(Error::BadOption(
                "barrier=txg is not available for an image with an external data file: its \
                 data clusters have fixed places, so a transaction group could not keep the \
                 data the durable image names"
                    .into(),
            ));
        }
        let file_len = storage.len().map_err(io("getting the image file length"))?;
        if file_len < 72 {
            return Err(Error::Invalid(format!(
                "file of {file_len} bytes is too short for a qcow2 header"
            )));
        }
        let mut regions = layout::validate(&header, file_len)?;
        let (snapshots, snapshot_table_over_limits) =
            snapshot::read_table(&storage, &header, file_len, &mut regions, opts.for_check)?;

        let cluster_bits = header.cluster_bits;
        let l1 = read_table(
            &storage,
            header.l1_table_offset,
            u64::from(header.l1_size_entries),
            "the L1 table",
        )?;
        let reftable_entries = (u64::from(header.refcount_table_clusters) << cluster_bits) / 8;
        storage.debug_event(DebugEvent::ReftableLoad);
        let reftable = read_table(
            &storage,
            header.refcount_table_offset,
            reftable_entries,
            "the refcount table",
        )?;

        let (l2_tables, refblocks) = cache_capacities(&header, opts);

        let mut image = Image {
            rc: RefcountGeometry {
                refcount_order: header.refcount_order,
                cluster_bits,
            },
            storage,
            data_file,
            data_unsynced: false,
            // Read-only until `make_writable` says otherwise, below.
            read_only: true,
            cluster_bits,
            l2_width: header.l2_width(),
            metadata: MetadataMap::new(regions, header.cluster_size()),
            l1,
            l1_dirty: BTreeSet::new(),
            reftable,
            reftable_dirty: BTreeSet::new(),
            l2_cache: TableCache::new(l2_tables),
            refblock_cache: TableCache::new(refblocks),
            pending_frees: Vec::new(),
            discard: DiscardState {
                policy: opts.discard,
                ..DiscardState::default()
            },
            copied_candidates: Vec::new(),
            quarantine: BTreeMap::new(),
            io_epoch: 0,
            inflight_tickets: VecDeque::new(),
            write_plans_in_flight: 0,
            inflight_allocs: Vec::new(),
            free_cluster_hint: 0,
            compressed_tail: None,
            host_end: file_len,
            unordered: Unordered::default(),
            unbarriered_writes: false,
            new_l2_tables_to_order: BTreeSet::new(),
            reserve: Reserve::default(),
            txg: None,
            txg_parked: None,
            unflushed_writes: false,
            counters: Counters::default(),
            for_check: opts.for_check,
            snapshot_table_over_limits,
            snapshots,
            encryption: header.crypt_method().map(|method| Encryption {
                method,
                cipher: None,
            }),
            vm_state_io: false,
            header,
            test_skip_stage3_ordering: opts.test_skip_stage3_ordering,
            test_skip_txg_first_sync: opts.test_skip_txg_first_sync,
            test_txg_overwrite_after_barrier: opts.test_txg_overwrite_after_barrier,
            test_discard_early: opts.test_discard_early,
            test_skip_snapshot_ordering: opts.test_skip_snapshot_ordering,
            test_skip_bitmap_ordering: opts.test_skip_bitmap_ordering,
            test_skip_amend_ordering: opts.test_skip_amend_ordering,
            bitmaps: Vec::new(),
            bitmaps_marked: BTreeSet::new(),
        };
        image.metadata.reload_tables(&image.l1, &image.reftable);
        image.reload_snapshot_l2_tables()?;
        image.load_bitmap_directory()?;
        before_writing(&mut image)?;
        if !opts.read_only {
            image.make_writable()?;
            // Groups start once the image is writable (its own repairs are written in place
            // and made durable first) and never under `qemu-img check`.
            if let (Some(options), false) = (opts.txg, opts.for_check) {
                image.txg_parked = Some(TxgState::new(options));
            }
        }
        Ok(image)
    }

    /// Allows writes from now on (a read-write open, or QEMU's reopen from read-only to
    /// read-write): refuses an image marked corrupt or dirty, and clears the autoclear
    /// features this engine does not maintain before anything else is written.
    pub fn make_writable(&mut self) -> Result<()> {
        if !self.read_only {
            return Ok(());
        }
        self.check_can_write()?;
        self.read_only = false;
        let made = self.repair_if_dirty_and_clear_autoclear();
        if made.is_err() {
            self.read_only = true;
        }
        made
    }

    /// The writes that becoming writable needs: an image left dirty (lazy refcounts, then a
    /// crash) gets its refcounts repaired and the bit cleared before anything else, as QEMU
    /// does; the autoclear features this engine does not maintain are cleared.
    fn repair_if_dirty_and_clear_autoclear(&mut self) -> Result<()> {
        // Under `qemu-img check` the check itself reports and repairs (with -r).
        let dirty = self
            .header
            .incompatible
            .contains(IncompatibleFeatures::DIRTY);
        if dirty && !self.for_check {
            self.repair_dirty_image()?;
        }
        let stale_bitmaps = self.header.bitmaps.is_some() && self.bitmaps.is_empty();
        if !self.header.autoclear.is_empty() || stale_bitmaps {
            self.clear_autoclear_features()?;
        }
        // In use before the first guest write can reach the image (`bitmaps.rs`); `qemu-img
        // check` writes no guest data, and leaves the bitmaps as they are.
        if !self.for_check {
            self.mark_bitmaps_in_use()?;
        }
        Ok(())
    }

    /// Whether `make_writable` may succeed without writing: refuses images marked corrupt
    /// (unless opened for `qemu-img check`, which may repair them).
    pub fn check_can_write(&self) -> Result<()> {
        let incompatible = self.header.incompatible;
        if incompatible.contains(IncompatibleFeatures::CORRUPT) && !self.for_check {
            return Err(Error::Corrupt(
                "the image is marked corrupt (incompatible feature bit 1) and cannot be opened \
                 read-write; open it read-only, or repair it with `qemu-img check -r all`"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Refuses writes from now on (QEMU's reopen to read-only): everything is written back
    /// and made durable first.
    pub fn make_read_only(&mut self) -> Result<()> {
        if !self.read_only {
            self.flush()?;
            self.read_only = true;
        }
        Ok(())
    }

    /// Sizes the caches anew (a reopen with other cache options) from the cache sizes of
    /// `opts`, as at an open. Clean tables beyond the new size go at once; dirty ones at
    /// their next write-back.
    pub fn set_cache_sizes(&mut self, opts: &OpenOptions) {
        let (l2_tables, refblocks) = cache_capacities(&self.header, opts);
        self.l2_cache.set_capacity(l2_tables);
        self.refblock_cache.set_capacity(refblocks);
    }

    /// Drops the cached tables unused since the previous call (QEMU's
    /// `cache-clean-interval`, once per interval), giving their memory back. Dirty tables
    /// stay. Returns how many were dropped.
    pub fn drop_idle_cache_tables(&mut self) -> usize {
        self.l2_cache.drop_unused() + self.refblock_cache.drop_unused()
    }

    /// Tables cached now: (L2 tables, refcount blocks).
    pub fn cached_tables(&self) -> (usize, usize) {
        (self.l2_cache.len(), self.refblock_cache.len())
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Whether the image looks preallocated as QEMU's qcow2 tells (`qcow2_has_zero_init`):
    /// its first L1 entry names an L2 table (preallocated images have them all, others
    /// none before the first write).
    pub fn first_l2_table_allocated(&self) -> bool {
        self.l1.first().is_some_and(|&entry| entry != 0)
    }

    /// Before the first write, clears the autoclear features this engine does not maintain,
    /// as the spec requires, and drops a stale bitmaps extension (one without its autoclear
    /// bit: QEMU's qcow2 drops it too, its clusters are leaks).
    fn clear_autoclear_features(&mut self) -> Result<()> {
        // The raw data file bit is kept: writes keep the data file a raw image
        // (`data_file.rs`); so is the bitmaps bit while the directory loaded: the bitmaps are
        // marked in use next and stored by their owner (`bitmaps.rs`).
        let mut maintained = AutoclearFeatures::RAW_EXTERNAL_DATA;
        if !self.bitmaps.is_empty() {
            maintained |= AutoclearFeatures::BITMAPS;
        }
        let kept = self.header.autoclear & maintained;
        let stale_bitmaps = self.header.bitmaps.is_some() && self.bitmaps.is_empty();
        if self.header.autoclear == kept && !stale_bitmaps {
            return Ok(());
        }
        self.header.autoclear = kept;
        if stale_bitmaps {
            self.header.set_bitmaps_extension(None);
        }
        let bytes = self.header.encode()?;
        self.write_metadata(0, &bytes, "rewriting the header")?;
        self.storage.flush().map_err(io("flushing the header"))?;
        self.counters.storage_flushes += 1;
        self.unflushed_writes = false;
        self.unbarriered_writes = false;
        self.unordered = Unordered::default();
        Ok(())
    }

    pub fn virtual_size(&self) -> u64 {
        self.header.virtual_size
    }

    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// The unit guest data is allocated, copied and zeroed in: a subcluster (a 32nd of a
    /// cluster) with extended L2 entries, the cluster otherwise.
    pub fn subcluster_size(&self) -> u64 {
        1u64 << self.subcluster_bits()
    }

    pub(super) fn subcluster_bits(&self) -> u32 {
        self.l2_width.subcluster_bits(self.cluster_bits)
    }

    /// Whether the image has extended L2 entries (subclusters).
    pub fn has_subclusters(&self) -> bool {
        self.l2_width == L2Width::Extended
    }

    /// The backing file name as stored (names have no encoding in qcow2: bytes, as QEMU
    /// keeps them).
    pub fn backing_file(&self) -> Option<&[u8]> {
        self.header.backing_file.as_deref()
    }

    /// The backing format as stored.
    pub fn backing_format(&self) -> Option<&[u8]> {
        self.header.backing_format.as_deref()
    }

    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The internal snapshots, in table order.
    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The L2 and refcount block cache capacities, in tables.
    pub fn cache_capacity_tables(&self) -> (usize, usize) {
        (
            self.l2_cache.capacity_tables(),
            self.refblock_cache.capacity_tables(),
        )
    }

    pub(super) fn check_range(&self, guest_offset: u64, len: u64) -> Result<()> {
        let size = self.header.virtual_size;
        match guest_offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ if self.in_vm_state_area(guest_offset, len) => Ok(()),
            _ => Err(Error::OutOfRange {
                offset: guest_offset,
                len,
                size,
            }),
        }
    }

    /// What the data step needs besides the request's buffer.
    pub fn data_context<'a>(&'a self, backing: Option<&'a dyn Backing>) -> DataContext<'a, S> {
        DataContext {
            storage: self.data_file.as_ref().unwrap_or(&self.storage),
            backing,
            compression: self.header.compression_type,
            cluster_size: self.cluster_size(),
            encryption: self.encryption.as_ref(),
        }
    }

    /// Guest bytes into `buf`. Unallocated clusters read from `backing` (zeros past its end,
    /// zeros if there is none). Plan, data step and finish in one call: see `request.rs` for
    /// the steps a concurrent caller runs itself.
    pub fn read(
        &mut self,
        guest_offset: u64,
        buf: &mut [u8],
        backing: Option<&dyn Backing>,
    ) -> Result<()> {
        let plan = self.plan_read(guest_offset, buf.len() as u64)?;
        let mut target = SliceTarget {
            buf,
            storage: self.data_file.as_ref().unwrap_or(&self.storage),
            backing,
        };
        let result = self.data_context(backing).read(&plan, &mut target);
        self.finish_read(plan);
        result
    }

    /// Writes guest bytes at any offset, length and alignment inside the virtual size.
    pub fn write(
        &mut self,
        guest_offset: u64,
        buf: &[u8],
        backing: Option<&dyn Backing>,
    ) -> Result<()> {
        let Some(plan) = self.plan_write(guest_offset, buf.len() as u64)? else {
            return Err(Error::Invalid(
                "write overlaps an allocation in flight; plan it again once that finishes".into(),
            ));
        };
        let mut source = SliceSource {
            buf,
            storage: self.data_file.as_ref().unwrap_or(&self.storage),
        };
        match self.data_context(backing).write(&plan, &mut source) {
            Ok(()) => self.finish_write(plan),
            Err(e) => {
                self.abort_write(plan);
                Err(e)
            }
        }
    }

    /// Refuses a data write that would land on the header or a table.
    pub(super) fn check_data_target(&mut self, host_offset: u64) -> Result<()> {
        let end = host_offset + self.cluster_size();
        let what = self.metadata.metadata_at(host_offset, end).or_else(|| {
            self.metadata
                .inactive_l2_table_at(host_offset, end)
                .then_some("an L2 table of a snapshot")
        });
        if let Some(what) = what {
            return Err(Error::Corrupt(format!(
                "data cluster at {host_offset:#x} overlaps {}",
                MetadataMap::definite(what)
            )));
        }
        if end > self.host_end {
            // Past the end of the file (cut short outside of QEMU): written in place, as
            // QEMU's qcow2 does, only if its refcount counts it, so that no allocation can
            // hand it out again (the file's extension skips counted clusters); the file ends
            // after it from now on.
            if self.refcount(host_offset >> self.cluster_bits)? == 0 {
                return Err(Error::Corrupt(format!(
                    "data cluster at {host_offset:#x} is beyond the end of the image file \
                     ({:#x}) and has refcount 0",
                    self.host_end
                )));
            }
            self.host_end = end;
        }
        Ok(())
    }

    /// Writes all dirty metadata back (in order, see `write_back`), then makes everything
    /// durable with one storage flush, skipped if nothing was written since the last one.
    pub fn flush(&mut self) -> Result<()> {
        self.counters.guest_flushes += 1;
        self.flush_metadata_and_sync(true)
    }

    /// The first half of a guest flush, as QEMU's block layer splits one (`flush_to_os`):
    /// dirty metadata written back in order, nothing made durable. An open transaction group
    /// is left whole for the second half, which commits it. Counts the guest flush.
    pub fn flush_to_os(&mut self) -> Result<()> {
        self.counters.guest_flushes += 1;
        if self.read_only || self.txg.is_some() {
            return Ok(());
        }
        self.write_back()
    }

    /// The second half of a guest flush (`flush_to_disk`): what [`Image::flush`] does, without
    /// counting the guest flush again. The block layer skips it when the guest wrote nothing
    /// since its last flush, so the first half must leave nothing that only this half would
    /// make durable but that the guest was promised: it writes back only what the guest's own
    /// requests dirtied, which the last flush made durable unless the guest wrote since.
    pub fn flush_to_disk(&mut self) -> Result<()> {
        self.flush_metadata_and_sync(true)
    }

    /// What a flush does; `top_up_reserve` is false when the reserve was just given back (a
    /// close, a check) and must stay empty.
    pub(super) fn flush_metadata_and_sync(&mut self, top_up_reserve: bool) -> Result<()> {
        self.durability_point(
            top_up_reserve,
            crate::engine::image::txg::CommitReason::Durability,
        )
    }

    /// Everything written so far made durable, for `reason` (counted by the txg mode): an
    /// open group's commit (two syncs, or none), else the ordinary flush, which in the txg mode
    /// with no group open makes the interval durable (`txg.rs`).
    pub(super) fn durability_point(
        &mut self,
        top_up_reserve: bool,
        reason: crate::engine::image::txg::CommitReason,
    ) -> Result<()> {
        // Clusters whose free an earlier durability point made durable: discarded now, so
        // that this point's sync covers them (`discard.rs`).
        self.issue_due_discards();
        if self.txg.is_some() {
            return self.commit_and_release(reason);
        }
        self.ordinary_flush(top_up_reserve)?;
        self.end_interval(reason);
        Ok(())
    }

    /// Write-back in order, then one storage flush (skipped if nothing was written since the
    /// last one), and the end of the I/O epoch.
    fn ordinary_flush(&mut self, top_up_reserve: bool) -> Result<()> {
        self.write_back()?;
        if self.unflushed_writes {
            // The sync is due anyway: the reserve rides along (`reserve.rs`).
            if top_up_reserve {
                self.top_up_reserve()?;
            }
            self.storage_flush()?;
        }
        self.io_epoch += 1;
        self.release_quarantine();
        Ok(())
    }

    /// A guest barrier: everything written before it (guest data, and the metadata that
    /// names it) is ordered before everything written after it. No durability, no sync.
    pub fn barrier(&mut self) -> Result<()> {
        self.counters.guest_barriers += 1;
        if self.read_only {
            return Ok(());
        }
        if self.in_transaction_groups() {
            // A group commits whole or not at all: every barrier in it is kept for free; the
            // first one after a write opens it (`txg.rs`, "One epoch").
            return self.txg_barrier();
        }
        self.write_back()?;
        if self.unbarriered_writes {
            // The barrier orders a reserve top-up as well as the guest's writes: the next
            // interval's appends need no ordering point of their own (`reserve.rs`).
            self.top_up_reserve()?;
            self.ordering_point()?;
        }
        Ok(())
    }

    /// Flushes and leaves the image clean: the unused reserve is given back and, when it ends
    /// the file, cut off. (This engine never sets the dirty bit, so there is nothing more to
    /// clear.) Returns the storage.
    pub fn close(mut self) -> Result<S> {
        self.hand_over()?;
        // What the close's own durability point made due (nothing can reuse it any more).
        // Not in hand_over: after it the image may be another process's.
        self.issue_due_discards();
        Ok(self.storage)
    }

    /// What a close writes, with the image left open: before another process takes the image
    /// over (QEMU's inactivation for migration), after which this one must write nothing.
    /// Without it the other side would find the unused reserve counted: leaked clusters,
    /// after every migration.
    pub fn hand_over(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let reserved_tail = self.reserved_tail();
        self.release_reserve()?;
        self.counters.guest_flushes += 1;
        self.flush_metadata_and_sync(false)?;
        if let Some(start) = reserved_tail {
            // The write-back may have allocated (a copied L2 table, a refcount block), also
            // in the tail: only the clusters past the last one counted go. Their counts are
            // zero on storage now and nothing names them.
            let first = start >> self.cluster_bits;
            let end = self.host_end.div_ceil(self.cluster_size());
            let mut cut = end;
            while cut > first && self.refcount(cut - 1)? == 0 {
                cut -= 1;
            }
            if cut < end {
                let len = cut << self.cluster_bits;
                self.storage
                    .set_len(len)
                    .map_err(|e| Error::io("trimming the unused reserve off the file", e))?;
                self.host_end = len;
            }
        }
        Ok(())
    }

    /// Where the run of reserved clusters that ends the file starts, if one does.
    fn reserved_tail(&self) -> Option<u64> {
        let mut reserved: Vec<u64> = self.reserve.all().collect();
        reserved.sort_unstable();
        // Only a file that ends exactly at the end of a reserved cluster is trimmed.
        if !self.host_end.is_multiple_of(self.cluster_size()) {
            return None;
        }
        let file_end = self.host_end >> self.cluster_bits;
        let mut end = file_end;
        while end > 0 && reserved.last() == Some(&(end - 1)) {
            reserved.pop();
            end -= 1;
        }
        (end < file_end).then_some(end << self.cluster_bits)
    }

    /// What backs `guest_offset`, and for how many bytes (at least 1, at most `len`) the same
    /// answer holds contiguously (with contiguous host offsets for [`Mapping::Data`]).
    pub fn map(&mut self, guest_offset: u64, len: u64) -> Result<(Mapping, u64)> {
        let size = self.header.virtual_size;
        if len == 0 || guest_offset >= size {
            return Err(Error::OutOfRange {
                offset: guest_offset,
                len,
                size,
            });
        }
        let len = len.min(size - guest_offset);
        let (cluster, run_bytes) = self.lookup_run(guest_offset, len)?;
        let in_cluster = guest_offset & (self.cluster_size() - 1);
        let mapping = match cluster {
            Subcluster::Unallocated => Mapping::Unallocated,
            Subcluster::Zero { host_offset: 0 } => Mapping::Zero { host_offset: None },
            Subcluster::Zero { host_offset } => Mapping::Zero {
                host_offset: Some(host_offset + in_cluster),
            },
            Subcluster::Data { host_offset } => Mapping::Data {
                host_offset: host_offset + in_cluster,
            },
            Subcluster::Compressed { .. } => Mapping::Compressed,
        };
        Ok((mapping, run_bytes))
    }

    /// Whether the image looks preallocated with `preallocation=metadata`: its refcounts name
    /// clearly more clusters than the file has blocks for (`allocated_file_bytes`, what the
    /// host file system holds). Those clusters read as zeros from the file's holes, so a
    /// block-status query should ask the file about them (`BDRV_BLOCK_RECURSE`) instead of
    /// calling them data. The rule is QEMU's qcow2's, so that both drivers map an image the
    /// same way: referenced clusters reach max(allocated clusters * 10/9, allocated + 2).
    /// The walk stops at that count, so its cost is bounded by the file's allocation.
    pub fn looks_metadata_preallocated(&mut self, allocated_file_bytes: u64) -> Result<bool> {
        let allocated_clusters = allocated_file_bytes >> self.cluster_bits;
        let threshold = (allocated_clusters.saturating_mul(10) / 9).max(allocated_clusters + 2);
        let file_bytes = self
            .storage
            .len()
            .map_err(|e| Error::io("getting the image file's length", e))?;
        let end_cluster = file_bytes.div_ceil(self.cluster_size());
        let mut referenced = 0u64;
        for host_cluster in 0..end_cluster {
            if referenced >= threshold {
                break;
            }
            referenced += u64::from(self.refcount(host_cluster)? > 0);
        }
        Ok(referenced >= threshold)
    }
}
