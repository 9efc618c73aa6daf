//! Growing the virtual disk over entries that lie past its end. An image may hold L1 and L2
//! entries beyond its virtual size (another writer's leftovers after a shrink, or a crafted
//! image; the fuzzer found one): nothing reads them while they lie past the end, and growth
//! must not expose them. The new range reads as zeros; the clusters they named leak at worst.

#[path = "engine_support.rs"]
mod support;

use qcow2b::engine::{CheckFix, Image, MemStorage, OpenOptions};
use support::*;

const CLUSTER: u64 = 512;

/// A 512-byte-cluster image of 200 KiB whose L2 entries for 200..256 KiB name data (0x77):
/// L1 entry 7 (224..256 KiB) lies wholly past the end, L1 entry 6 straddles it.
fn image_with_entries_past_the_end() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, CLUSTER, 256 << 10, None);
    qemu_io(&path, &["write -P 0x11 0 4k", "write -P 0x77 200k 56k"]);
    let mut bytes = std::fs::read(&path).unwrap();
    put64(&mut bytes, 24, 200 << 10);
    bytes
}

fn grow_and_read(new_size: u64) {
    let mut image = Image::open(
        MemStorage::new(image_with_entries_past_the_end()),
        &OpenOptions::default(),
    )
    .unwrap();
    let report = image.check(CheckFix::None).unwrap();
    assert_eq!(report.corruptions, 0, "{:?}", report.messages);
    image.truncate(new_size).unwrap();
    let mut grown = vec![0xffu8; (new_size - (200 << 10)) as usize];
    image.read(200 << 10, &mut grown, None).unwrap();
    assert!(
        grown.iter().all(|&b| b == 0),
        "the new range shows old entries"
    );
    let mut head = vec![0u8; 4096];
    image.read(0, &mut head, None).unwrap();
    assert!(head.iter().all(|&b| b == 0x11));
    let bytes = image.close().unwrap().into_inner();

    // Reopened: the same, and clean (leaks aside) for qcow2b and QEMU alike.
    let mut image = Image::open(MemStorage::new(bytes.clone()), &OpenOptions::default()).unwrap();
    assert_eq!(image.virtual_size(), new_size);
    let mut again = vec![0xffu8; grown.len()];
    image.read(200 << 10, &mut again, None).unwrap();
    assert!(again.iter().all(|&b| b == 0));
    let report = image.check(CheckFix::None).unwrap();
    assert_eq!(report.corruptions, 0, "{:?}", report.messages);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grown.qcow2");
    std::fs::write(&path, bytes).unwrap();
    let (code, _) = qemu_img_check_json(&path);
    assert!(code == 0 || code == 3, "qemu-img check exited {code}");
    let raw = qemu_img_to_raw(&path, &dir.path().join("grown.raw"));
    assert!(
        raw[200 << 10..].iter().all(|&b| b == 0),
        "QEMU reads old entries"
    );
}

#[test]
fn growth_within_the_l1_table_reads_zeros() {
    grow_and_read(256 << 10);
}

#[test]
fn growth_past_the_l1_table_reads_zeros() {
    grow_and_read(512 << 10);
}
