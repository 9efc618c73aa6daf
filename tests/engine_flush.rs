//! What a guest flush and a guest barrier cost in storage syncs and storage barriers, counted on
//! MemStorage. Stock QEMU's qcow2 (measured, shared/FACTS.md): 2 syncs per flush for 64 KiB
//! appends, 5 for the first write into a new L2 region, 1 for overwrites. In flush mode every
//! barrier is a sync too, so "syncs + barriers" is what qcow2b costs there.

#[path = "engine_support.rs"]
mod support;

use std::cell::RefCell;

use qcow2b::engine::{Image, MemStorage, OpenOptions, Storage};
use support::*;

const CLUSTER: u64 = 65536;

fn image_from(path: &std::path::Path) -> Image<MemStorage> {
    Image::open(
        MemStorage::new(std::fs::read(path).unwrap()),
        &OpenOptions::default(),
    )
    .unwrap()
}

fn fresh_image() -> Image<MemStorage> {
    image_of_size(1 << 30)
}

fn image_of_size(bytes: u64) -> Image<MemStorage> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, CLUSTER, bytes, None);
    image_from(&path)
}

/// (syncs, barriers) issued so far.
fn cost(image: &Image<MemStorage>) -> (u64, u64) {
    let s = image.storage();
    (s.flushes.get(), s.barriers.get())
}

/// Closes the image and checks what it left with the system's qemu-img (no leaks either).
fn close_and_check(image: Image<MemStorage>) {
    let bytes = image.close().unwrap().into_inner();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("closed.qcow2");
    std::fs::write(&path, bytes).unwrap();
    qemu_img_check(&path);
}

#[test]
fn appending_64k_writes_with_a_flush_each_cost_one_sync_per_flush() {
    let mut image = fresh_image();
    let data = vec![0x5au8; CLUSTER as usize];
    for i in 0..200u64 {
        image.write(i * CLUSTER, &data, None).unwrap();
        image.flush().unwrap();
    }
    let (syncs, barriers) = cost(&image);
    println!("200 x (64k append + flush): {syncs} syncs, {barriers} barriers");
    assert_eq!(syncs, 200);
    // The first write finds the reserve empty and fills it behind one ordering point; every
    // later flush tops it up before its own sync.
    assert!(barriers <= 3, "{barriers} barriers");
    assert_eq!(image.counters().guest_flushes, 200);
    close_and_check(image);
}

#[test]
fn overwriting_allocated_clusters_costs_one_sync_per_flush() {
    let mut image = fresh_image();
    let data = vec![0x5au8; CLUSTER as usize];
    image.write(0, &data, None).unwrap();
    image.flush().unwrap();
    let before = cost(&image);
    for _ in 0..200 {
        image.write(0, &data, None).unwrap();
        image.flush().unwrap();
    }
    let after = cost(&image);
    assert_eq!(after.0 - before.0, 200);
    assert_eq!(after.1, before.1, "no ordering point for overwrites");
}

#[test]
fn a_guest_that_only_overwrites_reserves_nothing_and_closes_with_one_sync() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, CLUSTER, 64 << 20, None);
    qemu_io(&path, &["write -P 0x11 0 1M"]);
    let mut image = image_from(&path);
    image.write(4096, &[0x22; 4096], None).unwrap();
    image.flush().unwrap();
    assert_eq!(cost(&image), (1, 0));
    image.write(8192, &[0x33; 4096], None).unwrap();
    assert_eq!(
        image.counters().reserved_clusters,
        0,
        "no cluster was needed"
    );
    let storage = image.close().unwrap();
    assert_eq!(
        storage.flushes.get(),
        2,
        "the close's flush is the only other sync"
    );
    let closed = dir.path().join("closed.qcow2");
    std::fs::write(&closed, storage.into_inner()).unwrap();
    qemu_img_check(&closed);
    assert_eq!(
        std::fs::metadata(&closed).unwrap().len(),
        std::fs::metadata(&path).unwrap().len()
    );
}

#[test]
fn a_flush_with_nothing_written_does_not_sync() {
    let mut image = fresh_image();
    image.flush().unwrap();
    assert_eq!(cost(&image), (0, 0));
    image.write(0, &[1; 512], None).unwrap();
    image.flush().unwrap();
    let c = cost(&image);
    image.flush().unwrap();
    image.flush().unwrap();
    assert_eq!(cost(&image), c);
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
fn writes_into_new_l2_regions_cost_one_sync_per_flush() {
    // QEMU 7.2 needs 5 syncs here (FACTS.md). A new L2 table in a reserved cluster reads as
    // "all unallocated" until written, so its L1 entry needs no ordering point.
    let mut image = image_of_size(8 << 30);
    image.write(0, &[1; 4096], None).unwrap();
    image.flush().unwrap();
    let before = cost(&image);
    let l2_range = CLUSTER * CLUSTER / 8; // guest bytes one L2 table maps
    for i in 1..8u64 {
        image.write(i * l2_range, &[i as u8; 4096], None).unwrap();
        image.flush().unwrap();
    }
    let after = cost(&image);
    assert_eq!(after.0 - before.0, 7);
    assert_eq!(after.1, before.1, "no ordering point for a new L2 region");
    for i in 1..8u64 {
        let mut buf = [0u8; 4096];
        image.read(i * l2_range, &mut buf, None).unwrap();
        assert!(buf.iter().all(|&b| b == i as u8));
    }
    close_and_check(image);
}

#[test]
fn partial_cluster_writes_into_fresh_clusters_cost_one_sync() {
    let mut image = fresh_image();
    image.write(0, &[1; 512], None).unwrap();
    image.flush().unwrap();
    let before = cost(&image);
    for i in 1..50u64 {
        image.write(i * CLUSTER + 1000, &[2; 3000], None).unwrap();
        image.flush().unwrap();
    }
    let after = cost(&image);
    assert_eq!(after.0 - before.0, 49);
    assert_eq!(after.1, before.1);
    close_and_check(image);
}

#[test]
fn appends_over_a_backing_file_order_their_data_before_the_l2_entry() {
    // The old content is the backing file's, not zeros: losing the data after the entry
    // would show zeros the guest never had. One ordering point per flush keeps rule (a).
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img_create(&base, CLUSTER, 64 << 20, None);
    qemu_io(&base, &["write -P 0x11 0 64M"]);
    qemu_img_create(&top, CLUSTER, 64 << 20, Some(&base));
    let backing = ImageBacking(RefCell::new(open_file(
        &base,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )));
    let mut image = image_from(&top);
    image.write(0, &[1; 4096], Some(&backing)).unwrap();
    image.flush().unwrap();
    let before = cost(&image);
    for i in 1..20u64 {
        image
            .write(i * CLUSTER, &[2; 4096], Some(&backing))
            .unwrap();
        image.flush().unwrap();
    }
    let after = cost(&image);
    assert_eq!(after.0 - before.0, 19);
    assert_eq!(after.1 - before.1, 19, "one ordering point per flush");
}

#[test]
fn barrier_writes_cost_one_barrier_each_and_the_final_flush_one_sync() {
    let mut image = fresh_image();
    let data = vec![0x3cu8; CLUSTER as usize];
    for i in 0..200u64 {
        image.write(i * CLUSTER, &data, None).unwrap();
        image.barrier().unwrap();
    }
    let (syncs, barriers) = cost(&image);
    assert_eq!(syncs, 0, "a barrier never syncs");
    // One per guest barrier, plus the reserve's own (it doubles when it runs dry).
    assert!((200..=210).contains(&barriers), "{barriers} barriers");
    image.flush().unwrap();
    assert_eq!(cost(&image).0, 1);
    assert_eq!(image.counters().guest_barriers, 200);
    close_and_check(image);
}

#[test]
fn a_barrier_with_nothing_written_since_the_last_costs_nothing() {
    let mut image = fresh_image();
    image.write(0, &[1; 4096], None).unwrap();
    image.barrier().unwrap();
    let c = cost(&image);
    image.barrier().unwrap();
    image.barrier().unwrap();
    assert_eq!(cost(&image), c);
}

#[test]
fn discarded_clusters_are_reused_before_the_file_grows() {
    let mut image = fresh_image();
    let data = vec![9u8; CLUSTER as usize];
    for i in 0..64u64 {
        image.write(i * CLUSTER, &data, None).unwrap();
    }
    image.flush().unwrap();
    let grown = image.storage().len().unwrap();
    for round in 0..5u64 {
        image.discard(0, 64 * CLUSTER).unwrap();
        image.flush().unwrap();
        for i in 0..64u64 {
            image
                .write(i * CLUSTER, &[round as u8; 4096], None)
                .unwrap();
        }
        image.flush().unwrap();
    }
    let len = image.storage().len().unwrap();
    assert!(
        len <= grown + 4 * CLUSTER,
        "file grew from {grown} to {len} under discard and rewrite"
    );
    close_and_check(image);
}

#[test]
fn close_gives_the_reserve_back_and_trims_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, CLUSTER, 1 << 30, None);
    let mut image = image_from(&path);
    image.write(0, &[1; 4096], None).unwrap();
    image.flush().unwrap();
    assert!(
        image.storage().len().unwrap() > 8 * CLUSTER,
        "the reserve extends the file while open"
    );
    let bytes = image.close().unwrap().into_inner();
    std::fs::write(&path, &bytes).unwrap();
    qemu_img_check(&path);
    // Header, refcount table and block, L1, one L2 table, one data cluster.
    assert_eq!(bytes.len() as u64, 6 * CLUSTER);
}
