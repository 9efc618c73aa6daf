//! The driver's runtime options (`-drive driver=qcow2b,...`, `-blockdev`, blockdev-add, a
//! reopen's options): every option of QEMU 7.2's qcow2, with qcow2's meaning and messages,
//! and qcow2b's own (the barrier mode and its bounds).
//!
//! qcow2's options and what they do here:
//! - `l2-cache-size`, `refcount-cache-size`, `cache-size`: the cache sizes, split as qcow2
//!   splits them (`OpenOptions::cache_bytes`); a reopen resizes the caches.
//! - `cache-clean-interval` (seconds, default 600 as in qcow2; 0 never): cached tables unused
//!   for that long are dropped (`cache_clean.rs`).
//! - `pass-discard-request` (default: on with `discard=unmap`), `pass-discard-snapshot`
//!   (default on), `pass-discard-other` (default off): which freed clusters are discarded on
//!   the file (`engine::image::discard`).
//! - `l2-cache-entry-size`: checked as qcow2 checks it (a power of two from 512 to the cluster
//!   size) and used for qcow2's bound on the L2 cache's entry count; otherwise moot: qcow2b
//!   caches whole L2 tables.
//! - `lazy-refcounts`: refused on a version 2 image as qcow2 refuses it; otherwise moot:
//!   qcow2b orders refcount updates without extra syncs, so it never defers them or marks
//!   the image dirty.
//! - `overlap-check` and its per-structure booleans: values checked as qcow2 checks them;
//!   otherwise moot: qcow2b always refuses a write or a free that would hit its metadata.
//! - `encrypt.format`, `encrypt.key-secret` (QEMU's `BlockdevQcow2Encryption`): the format
//!   is checked against the image with qcow2's messages, the secret unlocks an encrypted
//!   image's key (`crypto.rs`).

use std::ffi::{c_int, CStr};
use std::time::Duration;

use super::bindings;
use super::crypto;
use super::ffi::entries;
use super::opts::{bool_opt, leak_list, number_opt, size_opt, string_opt, Opts, OptsListCell};
use crate::engine::format::header::Header;
use crate::engine::{cache_sizes, CacheSizes, DiscardPolicy, Error, OpenOptions};
use crate::ordering::{BarrierMode, BarrierOptions};

const LAZY_REFCOUNTS: &CStr = c"lazy-refcounts";
const DISCARD_REQUEST: &CStr = c"pass-discard-request";
const DISCARD_SNAPSHOT: &CStr = c"pass-discard-snapshot";
const DISCARD_OTHER: &CStr = c"pass-discard-other";
const OVERLAP: &CStr = c"overlap-check";
const OVERLAP_TEMPLATE: &CStr = c"overlap-check.template";
const CACHE_SIZE: &CStr = c"cache-size";
const L2_CACHE_SIZE: &CStr = c"l2-cache-size";
const L2_CACHE_ENTRY_SIZE: &CStr = c"l2-cache-entry-size";
const REFCOUNT_CACHE_SIZE: &CStr = c"refcount-cache-size";
const CACHE_CLEAN_INTERVAL: &CStr = c"cache-clean-interval";
const ENCRYPT_FORMAT: &CStr = c"encrypt.format";
const ENCRYPT_KEY_SECRET: &CStr = c"encrypt.key-secret";
const BARRIER: &CStr = c"barrier";
const BARRIERFS_SYSCALL: &CStr = c"barrierfs-syscall";
const BARRIERFS_INJECT: &CStr = c"x-barrierfs-inject";
const BUFFER_SIZE: &CStr = c"buffer-size";
const TXG_MAX_BYTES: &CStr = c"txg-max-bytes";
const TXG_MAX_AGE_MS: &CStr = c"txg-max-age-ms";
/// Test only: `stage3` removes one ordering point (see `OpenOptions::test_skip_stage3_ordering`),
/// `txg-first-sync` one sync of every commit (`OpenOptions::test_skip_txg_first_sync`).
const TEST_SKIP_ORDERING: &CStr = c"x-test-skip-ordering";

/// qcow2's default `cache-clean-interval` on Linux.
pub const DEFAULT_CACHE_CLEAN_INTERVAL: Duration = Duration::from_secs(600);
/// qcow2's smallest cluster size, the smallest L2 cache entry.
const MIN_L2_CACHE_ENTRY: u64 = 512;
/// qcow2's L2 cache minimum, in entries.
const MIN_L2_CACHE_ENTRIES: u64 = 2;
/// The values of `overlap-check` (and `overlap-check.template`).
const OVERLAP_TEMPLATES: [&str; 4] = ["none", "constant", "cached", "all"];
/// The per-structure booleans of `overlap-check`.
const OVERLAP_STRUCTURES: [&CStr; 9] = [
    c"overlap-check.main-header",
    c"overlap-check.active-l1",
    c"overlap-check.active-l2",
    c"overlap-check.refcount-table",
    c"overlap-check.refcount-block",
    c"overlap-check.snapshot-table",
    c"overlap-check.inactive-l1",
    c"overlap-check.inactive-l2",
    c"overlap-check.bitmap-directory",
];

/// The option list, built once.
pub fn list() -> *mut bindings::QemuOptsList {
    static LIST: OptsListCell = OptsListCell::new();
    LIST.get_or_init(|| {
        let mut opts = vec![
            bool_opt(
                LAZY_REFCOUNTS,
                c"Accepted as qcow2's (compat=1.1 images only) and moot: qcow2b orders refcount updates without extra syncs, so it never defers them or marks the image dirty",
            ),
            bool_opt(
                DISCARD_REQUEST,
                c"Pass guest discard requests to the layer below (the clusters they free are discarded once that free is durable)",
            ),
            bool_opt(
                DISCARD_SNAPSHOT,
                c"Generate discard requests when snapshot related space is freed",
            ),
            bool_opt(
                DISCARD_OTHER,
                c"Generate discard requests when other clusters are freed",
            ),
            string_opt(
                OVERLAP,
                c"Checked as qcow2's (none, constant, cached, all) and moot: qcow2b always refuses a write or free that would hit metadata",
            ),
            string_opt(OVERLAP_TEMPLATE, c"As overlap-check (qcow2's spelling)"),
            size_opt(
                CACHE_SIZE,
                c"Maximum bytes of both caches together (split as QEMU's qcow2 does)",
            ),
            size_opt(
                L2_CACHE_SIZE,
                c"Maximum bytes of L2 tables cached (default: enough for the whole disk, at most 32 MiB)",
            ),
            size_opt(
                L2_CACHE_ENTRY_SIZE,
                c"Checked as qcow2's (a power of two from 512 to the cluster size); qcow2b caches whole L2 tables",
            ),
            size_opt(
                REFCOUNT_CACHE_SIZE,
                c"Maximum bytes of refcount blocks cached (default: 4 clusters)",
            ),
            number_opt(
                CACHE_CLEAN_INTERVAL,
                c"Drop cached tables unused for this many seconds (default 600; 0: never)",
            ),
            string_opt(
                ENCRYPT_FORMAT,
                c"Encryption format of the image (aes, luks), checked against its header",
            ),
            string_opt(
                ENCRYPT_KEY_SECRET,
                c"ID of the secret that provides the image's key (an encrypted image)",
            ),
            string_opt(
                BARRIER,
                c"How barriers reach the host: auto (barrierfs when barrierfs-syscall is given, else ordered), barrierfs, ordered, flush, txg",
            ),
            number_opt(
                BARRIERFS_SYSCALL,
                c"System call number of BarrierFS's fdatabarrier on this host (never guessed)",
            ),
            bool_opt(
                BARRIERFS_INJECT,
                c"barrierfs with an injected primitive that records barriers and orders nothing (tests and bounds only)",
            ),
            size_opt(
                BUFFER_SIZE,
                c"Bytes the ordered mode may buffer before new writes wait (default 16M)",
            ),
            size_opt(
                TXG_MAX_BYTES,
                c"With barrier=txg, commit a transaction group once it holds this many guest bytes (default 64M)",
            ),
            number_opt(
                TXG_MAX_AGE_MS,
                c"With barrier=txg, commit a transaction group once it is this many milliseconds old (default 5000)",
            ),
            string_opt(
                TEST_SKIP_ORDERING,
                c"Test only, breaks crash consistency: stage3 leaves out the ordering point before L2 tables are written; txg-first-sync the first sync of every transaction group commit; discard-early discards freed clusters before their free is durable; snapshot-table lets the header name a new snapshot table before the table and its counts are ordered; bitmap-table lets the header name a new bitmap directory before the bitmaps' clusters, tables and directory are ordered; amend-refcount lets the header name a refcount table of a new width before the table and its blocks are durable",
            ),
        ];
        for name in OVERLAP_STRUCTURES {
            opts.push(bool_opt(
                name,
                c"Checked as qcow2's and moot: qcow2b always refuses a write into its metadata",
            ));
        }
        leak_list::<30>(c"qcow2b", &opts)
    })
}

/// What a node runs with, read from its runtime options at open and at every reopen.
#[derive(Clone, Debug)]
pub struct Settings {
    pub mode: BarrierMode,
    /// The engine's options (cache sizes, discards, transaction groups, test switches);
    /// `read_only` and `for_check` come from the open's flags.
    pub open: OpenOptions,
    /// How long a cached table may go unused before it is dropped; zero: never.
    pub cache_clean_interval: Duration,
    /// What needs the image's header to be checked ([`Settings::check_image`]).
    lazy_refcounts: bool,
    l2_cache_entry_bytes: Option<u64>,
    encrypt_format: Option<String>,
    /// The ID of the secret with an encrypted image's key.
    pub key_secret: Option<String>,
}

fn bad(message: impl Into<String>) -> Error {
    Error::BadOption(message.into())
}

impl Settings {
    /// Reads and checks `opts` (QEMU's messages for what qcow2 refuses); `flags` are the
    /// open's (`BDRV_O_*`).
    pub fn read(opts: &Opts, flags: c_int) -> Result<Settings, Error> {
        let mode = BarrierMode::from_options(BarrierOptions {
            mode: opts.string(BARRIER).as_deref(),
            syscall: opts.number(BARRIERFS_SYSCALL).map(|n| n as i64),
            inject: opts.bool(BARRIERFS_INJECT).unwrap_or(false),
            buffer_bytes: opts.size(BUFFER_SIZE),
            txg_max_bytes: opts.size(TXG_MAX_BYTES),
            txg_max_age_ms: opts.number(TXG_MAX_AGE_MS),
        })
        .map_err(|e| bad(e.to_string()))?;

        let (cache_bytes, l2_cache_bytes, refcount_cache_bytes) = (
            opts.size(CACHE_SIZE),
            opts.size(L2_CACHE_SIZE),
            opts.size(REFCOUNT_CACHE_SIZE),
        );
        if let Some(total) = cache_bytes {
            if l2_cache_bytes.is_some() && refcount_cache_bytes.is_some() {
                return Err(bad(
                    "cache-size, l2-cache-size and refcount-cache-size may not be set at the \
                     same time",
                ));
            }
            if l2_cache_bytes.is_some_and(|l2| l2 > total) {
                return Err(bad("l2-cache-size may not exceed cache-size"));
            }
            if refcount_cache_bytes.is_some_and(|rc| rc > total) {
                return Err(bad("refcount-cache-size may not exceed cache-size"));
            }
        }

        let cache_clean_seconds = opts
            .number(CACHE_CLEAN_INTERVAL)
            .unwrap_or(DEFAULT_CACHE_CLEAN_INTERVAL.as_secs());
        if cache_clean_seconds > u64::from(u32::MAX) {
            return Err(bad("Cache clean interval too big"));
        }

        let overlap = opts.string(OVERLAP);
        let template = opts.string(OVERLAP_TEMPLATE);
        if let (Some(o), Some(t)) = (&overlap, &template) {
            if o != t {
                return Err(bad(format!(
                    "Conflicting values for qcow2 options 'overlap-check' ('{o}') and \
                     'overlap-check.template' ('{t}')"
                )));
            }
        }
        if let Some(value) = overlap.or(template) {
            if !OVERLAP_TEMPLATES.contains(&value.as_str()) {
                return Err(bad(format!(
                    "Unsupported value '{value}' for qcow2 option 'overlap-check'. Allowed \
                     are any of the following: none, constant, cached, all"
                )));
            }
        }

        let discard = DiscardPolicy {
            request: opts
                .bool(DISCARD_REQUEST)
                .unwrap_or(flags & bindings::BDRV_O_UNMAP as c_int != 0),
            snapshot: opts
                .bool(DISCARD_SNAPSHOT)
                .unwrap_or(DiscardPolicy::DEFAULT.snapshot),
            other: opts
                .bool(DISCARD_OTHER)
                .unwrap_or(DiscardPolicy::DEFAULT.other),
        };

        let skip = opts.string(TEST_SKIP_ORDERING);
        let (test_skip_stage3_ordering, test_skip_txg_first_sync, test_discard_early) = match skip
            .as_deref()
        {
            None | Some("snapshot-table") | Some("bitmap-table") | Some("amend-refcount") => {
                (false, false, false)
            }
            Some("stage3") => (true, false, false),
            Some("txg-first-sync") if matches!(mode, BarrierMode::Txg(_)) => (false, true, false),
            Some("discard-early") => (false, false, true),
            Some(other) => {
                return Err(bad(format!(
                    "x-test-skip-ordering={other}: the (test-only) values are stage3, \
                         discard-early, snapshot-table, bitmap-table, amend-refcount, and \
                         txg-first-sync with \
                         barrier=txg"
                )))
            }
        };
        let test_skip_snapshot_ordering = skip.as_deref() == Some("snapshot-table");
        let test_skip_bitmap_ordering = skip.as_deref() == Some("bitmap-table");
        let test_skip_amend_ordering = skip.as_deref() == Some("amend-refcount");

        let open = OpenOptions {
            read_only: flags & bindings::BDRV_O_RDWR as c_int == 0,
            for_check: flags & bindings::BDRV_O_CHECK as c_int != 0,
            l2_cache_bytes,
            refcount_cache_bytes,
            cache_bytes,
            discard,
            txg: match mode {
                BarrierMode::Txg(txg) => Some(txg),
                _ => None,
            },
            test_skip_stage3_ordering,
            test_skip_txg_first_sync,
            test_txg_overwrite_after_barrier: false,
            test_discard_early,
            test_skip_snapshot_ordering,
            test_skip_bitmap_ordering,
            test_skip_amend_ordering,
        };
        Ok(Settings {
            mode,
            open,
            cache_clean_interval: Duration::from_secs(cache_clean_seconds),
            lazy_refcounts: opts.bool(LAZY_REFCOUNTS) == Some(true),
            l2_cache_entry_bytes: opts.size(L2_CACHE_ENTRY_SIZE),
            encrypt_format: opts.string(ENCRYPT_FORMAT),
            key_secret: opts.string(ENCRYPT_KEY_SECRET),
        })
    }

    /// The checks that need the image's header, with qcow2's messages and in qcow2's order.
    pub fn check_image(&self, header: &Header) -> Result<(), Error> {
        let cluster_size = header.cluster_size();
        let CacheSizes {
            l2_bytes,
            refcount_bytes,
            disk_l2_bytes,
        } = cache_sizes(header, &self.open);
        let entry_bytes = match self.l2_cache_entry_bytes {
            Some(entry) => entry,
            // A cache that does not cover the disk defaults to 4 KiB entries in qcow2.
            None if l2_bytes < disk_l2_bytes => cluster_size.min(4096),
            None => cluster_size,
        };
        if !(MIN_L2_CACHE_ENTRY..=cluster_size).contains(&entry_bytes)
            || !entry_bytes.is_power_of_two()
        {
            return Err(bad(format!(
                "L2 cache entry size must be a power of two between {MIN_L2_CACHE_ENTRY} and \
                 the cluster size ({cluster_size})"
            )));
        }
        if (l2_bytes / entry_bytes).max(MIN_L2_CACHE_ENTRIES) > i32::MAX as u64 {
            return Err(bad("L2 cache size too big"));
        }
        if refcount_bytes / cluster_size > i32::MAX as u64 {
            return Err(bad("Refcount cache size too big"));
        }
        if self.lazy_refcounts && header.version < 3 {
            return Err(bad(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility \
                 level",
            ));
        }
        crypto::check_format(header.crypt_method(), self.encrypt_format.as_deref())
    }
}

entries! {
/// `bdrv_join_options`: a reopen that keeps the old options (qemu-io's `reopen -o`) merges
/// them under the new ones as QEMU's qcow2 does: a new overlap-check template replaces every
/// old overlap option, a new `cache-size` the old partial sizes, and an old `cache-size`
/// goes when a partial size is set after the merge (unless `cache-size` is new).
///
/// # Safety
/// QEMU passes two valid dictionaries.
pub fn join_options(options: *mut bindings::QDict, old: *mut bindings::QDict) -> () {
    // SAFETY: per the caller; keys are NUL-terminated.
    unsafe {
        let has = |dict, key: &CStr| bindings::qdict_haskey(dict, key.as_ptr()) != 0;
        let new_template = has(options, OVERLAP) || has(options, OVERLAP_TEMPLATE);
        let new_total = has(options, CACHE_SIZE);
        if new_template {
            for key in [OVERLAP, OVERLAP_TEMPLATE]
                .into_iter()
                .chain(OVERLAP_STRUCTURES)
            {
                bindings::qdict_del(old, key.as_ptr());
            }
        }
        if new_total {
            bindings::qdict_del(old, L2_CACHE_SIZE.as_ptr());
            bindings::qdict_del(old, REFCOUNT_CACHE_SIZE.as_ptr());
        }
        bindings::qdict_join(options, old, false);
        let partial = has(options, L2_CACHE_SIZE) || has(options, REFCOUNT_CACHE_SIZE);
        if partial && !new_total {
            bindings::qdict_del(options, CACHE_SIZE.as_ptr());
        }
    }
}
}

/// `BlockDriver.mutable_opts`: the options a reopen may leave out (resetting them to their
/// defaults): qcow2's. The barrier options are not among them: a reopen that leaves out
/// one that was set is refused by the block layer ("cannot be reset to its default value"),
/// as one that changes it is refused here.
pub fn mutable_opts() -> *const *const std::ffi::c_char {
    struct Names(Vec<*const std::ffi::c_char>);
    // SAFETY: the pointers are to static strings, never written.
    unsafe impl Send for Names {}
    // SAFETY: as above.
    unsafe impl Sync for Names {}
    static NAMES: std::sync::OnceLock<Names> = std::sync::OnceLock::new();
    let names = NAMES.get_or_init(|| {
        let mut v: Vec<*const std::ffi::c_char> = [
            LAZY_REFCOUNTS,
            DISCARD_REQUEST,
            DISCARD_SNAPSHOT,
            DISCARD_OTHER,
            OVERLAP,
            OVERLAP_TEMPLATE,
            CACHE_SIZE,
            L2_CACHE_SIZE,
            L2_CACHE_ENTRY_SIZE,
            REFCOUNT_CACHE_SIZE,
            CACHE_CLEAN_INTERVAL,
        ]
        .into_iter()
        .chain(OVERLAP_STRUCTURES)
        .map(CStr::as_ptr)
        .collect();
        v.push(std::ptr::null());
        Names(v)
    });
    names.0.as_ptr()
}
