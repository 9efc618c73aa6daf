//! Sizes a hostile image controls are bounded by QEMU's limits before anything is allocated:
//! the bitmap directory (refused at open) and each bitmap table (a corruption `check`
//! reports without reading the table). Each hostile image is a sparse file as large as the
//! structure it claims, so only the limit, not the file length, stands between the claim and
//! the allocation; a counting allocator measures the largest single allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fs::File;

use qcow2b::engine::format::header::{ext, AutoclearFeatures, Header, RawExtension};
use qcow2b::engine::format::layout::MAX_BITMAP_DIRECTORY_BYTES;
use qcow2b::engine::{create, CheckFix, CreateOptions, Error, Image, OpenOptions, Storage};

thread_local! {
    /// The largest allocation this thread made since the last `take_peak`.
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

struct PeakAlloc;

// SAFETY: forwards to the system allocator; only notes the size.
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = PEAK.try_with(|p| p.set(p.get().max(layout.size())));
        // SAFETY: the caller's layout contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let _ = PEAK.try_with(|p| p.set(p.get().max(layout.size())));
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr came from System with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

fn take_peak() -> usize {
    PEAK.with(|p| p.replace(0))
}

const CLUSTER: u64 = 65536;
const MIB: usize = 1 << 20;
/// Where the crafted bitmap directory and table lie (past the image's own clusters).
const DIRECTORY_AT: u64 = 8 * CLUSTER;
const TABLE_AT: u64 = 9 * CLUSTER;
const DATA_AT: u64 = 10 * CLUSTER;

/// A fresh image file with a bitmaps extension (in use: autoclear bit set) naming a directory
/// of `directory_bytes` at `DIRECTORY_AT`, holding one entry whose table has `table_entries`
/// entries at `TABLE_AT`, the first naming the cluster at `DATA_AT`; the file is sparse and
/// `file_len` long.
fn image_with_bitmap(directory_bytes: u64, table_entries: u32, file_len: u64) -> File {
    let file = tempfile::tempfile().unwrap();
    create(&file, &CreateOptions::new(64 << 20)).unwrap();
    let mut first = vec![0u8; CLUSTER as usize];
    file.read_at(0, &mut first).unwrap();
    let mut header = Header::parse(&first).unwrap();
    let mut data = Vec::new();
    data.extend_from_slice(&1u32.to_be_bytes());
    data.extend_from_slice(&0u32.to_be_bytes());
    data.extend_from_slice(&directory_bytes.to_be_bytes());
    data.extend_from_slice(&DIRECTORY_AT.to_be_bytes());
    header.extensions.push(RawExtension {
        kind: ext::BITMAPS,
        data,
    });
    header.autoclear |= AutoclearFeatures::BITMAPS;
    file.write_at(0, &header.encode().unwrap()).unwrap();
    // Directory entry: table offset, table entries, flags, type, granularity, name size,
    // extra data size, then the name.
    let mut entry = Vec::new();
    entry.extend_from_slice(&TABLE_AT.to_be_bytes());
    entry.extend_from_slice(&table_entries.to_be_bytes());
    entry.extend_from_slice(&0u32.to_be_bytes());
    entry.extend_from_slice(&[1, 16]);
    entry.extend_from_slice(&1u16.to_be_bytes());
    entry.extend_from_slice(&0u32.to_be_bytes());
    entry.push(b'b');
    file.write_at(DIRECTORY_AT, &entry).unwrap();
    file.write_at(TABLE_AT, &DATA_AT.to_be_bytes()).unwrap();
    file.set_len(file_len).unwrap();
    file
}

/// Opened as `qemu-img check` opens it (an ordinary open refuses a bitmap directory that
/// breaks QEMU's limits, as QEMU's qcow2 does: `image/bitmaps.rs`).
fn open(file: File) -> Result<Image<File>, Error> {
    let opts = OpenOptions {
        read_only: true,
        for_check: true,
        ..Default::default()
    };
    Image::open(file, &opts)
}

#[test]
fn a_bitmap_directory_above_qemus_limit_is_refused_at_open_without_allocating_it() {
    let directory_bytes = MAX_BITMAP_DIRECTORY_BYTES + 8;
    let file = image_with_bitmap(directory_bytes, 1, DIRECTORY_AT + directory_bytes + CLUSTER);
    take_peak();
    let err = open(file).err().expect("refused");
    assert!(take_peak() < 4 * MIB, "open allocated a large buffer");
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("bitmap directory") && text.contains("limit"),
        "{text}"
    );
}

#[test]
fn a_bitmap_table_above_qemus_limits_is_a_corruption_check_does_not_read() {
    // 2^27 - 1 entries (1 GiB of table, under QEMU's entry limit but naming 8 PiB of bitmap at
    // 64 KiB clusters), in a file long enough to hold it.
    let entries = (1u32 << 27) - 1;
    let file = image_with_bitmap(32, entries, TABLE_AT + u64::from(entries) * 8 + CLUSTER);
    let mut image = open(file).unwrap();
    take_peak();
    let report = image.check(CheckFix::None).unwrap();
    assert!(take_peak() < 4 * MIB, "check allocated a large buffer");
    assert!(
        report
            .messages
            .iter()
            .any(|m| m.contains("bitmap 0") && m.contains("exceeds QEMU's limits")),
        "{report:?}"
    );
    assert!(report.corruptions > 0);
}

/// Negative control: a table within the limits is read, and the cluster it names is counted
/// (its refcount, never set by this test, is 0: a corruption that names that cluster).
#[test]
fn a_bitmap_table_within_the_limits_is_read_and_counted() {
    let file = image_with_bitmap(32, 1, DATA_AT + CLUSTER);
    let mut image = open(file).unwrap();
    let report = image.check(CheckFix::None).unwrap();
    let data_cluster = DATA_AT / CLUSTER;
    assert!(
        report
            .messages
            .iter()
            .any(|m| m.contains(&format!("cluster {data_cluster} refcount=0 reference=1"))),
        "{report:?}"
    );
    assert!(!report.messages.iter().any(|m| m.contains("exceeds")));
}

/// Negative control of the instrument: a large allocation shows in the peak.
#[test]
fn the_allocation_peak_sees_a_large_allocation() {
    take_peak();
    let big = vec![0u8; 64 * MIB];
    assert!(take_peak() >= 64 * MIB);
    drop(big);
}
