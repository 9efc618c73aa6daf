//! How many storage flushes (syncs) a guest flush costs, counted on MemStorage. Stock QEMU's
//! qcow2 (measured, shared/FACTS.md): 2 per flush for 64 KiB appends, 1 for overwrites.

#[path = "engine_support.rs"]
mod support;

use qcow2b::engine::{Image, MemStorage, OpenOptions, Storage};
use support::*;

fn fresh_image() -> Image<MemStorage> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, 65536, 1 << 30, None);
    Image::open(
        MemStorage::new(std::fs::read(&path).unwrap()),
        &OpenOptions::default(),
    )
    .unwrap()
}

#[test]
fn appending_64k_writes_with_a_flush_each_cost_two_syncs_per_flush() {
    let mut image = fresh_image();
    let data = vec![0x5au8; 65536];
    for i in 0..200u64 {
        image.write(i * 65536, &data, None).unwrap();
        image.flush().unwrap();
    }
    let c = image.counters();
    let syncs = image.storage().flushes.get();
    println!("200 x (64k append + flush): {c:?}, Storage::flush calls: {syncs}");
    assert_eq!(c.guest_flushes, 200);
    assert_eq!(syncs, c.storage_flushes);
    // The first flush also writes the new L2 table and its L1 entry (3 syncs); then 2 each.
    assert_eq!(syncs, 3 + 2 * 199);
    assert_eq!(c.ordering_points, 2 + 199);
}

#[test]
fn overwriting_allocated_clusters_costs_one_sync_per_flush() {
    let mut image = fresh_image();
    let data = vec![0x5au8; 65536];
    image.write(0, &data, None).unwrap();
    image.flush().unwrap();
    let before = image.counters();
    for _ in 0..200 {
        image.write(0, &data, None).unwrap();
        image.flush().unwrap();
    }
    let after = image.counters();
    println!(
        "200 x (64k overwrite + flush): {} syncs",
        after.storage_flushes - before.storage_flushes
    );
    assert_eq!(after.storage_flushes - before.storage_flushes, 200);
    assert_eq!(after.ordering_points, before.ordering_points);
}

#[test]
fn a_flush_with_nothing_written_does_not_sync() {
    let mut image = fresh_image();
    image.flush().unwrap();
    image.write(0, &[1; 512], None).unwrap();
    image.flush().unwrap();
    let c = image.counters();
    image.flush().unwrap();
    image.flush().unwrap();
    assert_eq!(image.counters().storage_flushes, c.storage_flushes);
    assert_eq!(image.counters().guest_flushes, 4);
}

#[test]
fn flushed_metadata_is_on_storage_and_reopens() {
    let mut image = fresh_image();
    image.write(12345, &[7; 100_000], None).unwrap();
    image.flush().unwrap();
    // Reopen from the storage bytes as they are after the flush.
    let mut bytes = vec![0u8; image.storage().len().unwrap() as usize];
    image.storage().read_at(0, &mut bytes).unwrap();
    let mut reopened = Image::open(MemStorage::new(bytes), &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 100_002];
    reopened.read(12344, &mut buf, None).unwrap();
    assert_eq!(buf[0], 0);
    assert!(buf[1..100_001].iter().all(|&b| b == 7));
    assert_eq!(buf[100_001], 0);
}

#[test]
fn first_write_into_a_new_l2_region_costs_three_syncs() {
    // QEMU 7.2 needs 5 here (FACTS.md); the engine defers the L2 table and the L1 entry to
    // write-back: refcount block | L2 table | L1 entry | final flush.
    let mut image = fresh_image();
    image.write(0, &[1; 4096], None).unwrap();
    image.flush().unwrap();
    let after_first = image.counters();
    assert_eq!(after_first.storage_flushes, 3);
    // A 4 KiB write into another fresh cluster of the same L2 range: refcount | L2 | flush.
    image.write(1 << 20, &[2; 4096], None).unwrap();
    image.flush().unwrap();
    assert_eq!(
        image.counters().storage_flushes - after_first.storage_flushes,
        2
    );
}
