//! Freed clusters passed down to the file as discards (`pass-discard-request`, `-snapshot`,
//! `-other`, src/engine/image/discard.rs): which frees reach the file; that none reaches it
//! before the sync that made the free durable; that it rides on the next flush's sync (so the
//! block layer's flush of the file after it costs no second one); and that nothing reuses a
//! cluster before its discard.

#[path = "engine_support.rs"]
mod support;

use std::process::Command;

use qcow2b::engine::{DiscardPolicy, Image, Mapping, MemStorage, OpenOptions};
use support::*;

const CLUSTER: u64 = 65536;

fn open(bytes: Vec<u8>, discard: DiscardPolicy) -> Image<MemStorage> {
    let opts = OpenOptions {
        discard,
        ..OpenOptions::default()
    };
    Image::open(MemStorage::new(bytes), &opts).unwrap()
}

fn fresh(discard: DiscardPolicy) -> Image<MemStorage> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, CLUSTER, 64 << 20, None);
    open(std::fs::read(&path).unwrap(), discard)
}

const REQUEST: DiscardPolicy = DiscardPolicy {
    request: true,
    snapshot: false,
    other: false,
};

const NONE: DiscardPolicy = DiscardPolicy {
    request: false,
    snapshot: false,
    other: false,
};

/// The host offset of guest `offset`, which must be allocated data.
fn host_offset(image: &mut Image<MemStorage>, offset: u64) -> u64 {
    match image.map(offset, CLUSTER).unwrap().0 {
        Mapping::Data { host_offset } => host_offset,
        other => panic!("guest {offset:#x} is {other:?}, not data"),
    }
}

/// Closes the image and checks it with the system's qemu-img: no corruption, no leak.
fn close_and_check(image: Image<MemStorage>) -> Vec<u8> {
    let bytes = image.close().unwrap().into_inner();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("closed.qcow2");
    std::fs::write(&path, &bytes).unwrap();
    qemu_img_check(&path);
    bytes
}

#[test]
fn a_guest_discard_reaches_the_file_after_the_sync_that_made_the_free_durable() {
    let mut image = fresh(REQUEST);
    image
        .write(0, &vec![0x5a; 4 * CLUSTER as usize], None)
        .unwrap();
    image.flush().unwrap();
    let second = host_offset(&mut image, CLUSTER);
    let third = host_offset(&mut image, 2 * CLUSTER);
    assert_eq!(third, second + CLUSTER, "the writes got adjacent clusters");

    image.discard(CLUSTER, 2 * CLUSTER).unwrap();
    image.flush().unwrap();
    // This flush made the free durable: the discard waits for the next one.
    assert!(
        image.storage().discards.borrow().is_empty(),
        "nothing is discarded before the flush that made the free durable has synced"
    );
    let syncs_durable = image.storage().flushes.get();
    image.write(8 * CLUSTER, &[1; 512], None).unwrap();
    image.flush().unwrap();
    let discards = image.storage().discards.borrow().clone();
    assert_eq!(discards.len(), 1, "one discard for the run of two clusters");
    let (offset, len, syncs_then) = discards[0];
    assert_eq!((offset, len), (second, 2 * CLUSTER));
    assert_eq!(
        syncs_then, syncs_durable,
        "the discard follows the sync that made the free durable and precedes the next"
    );
    assert_eq!(
        image.storage().flushes.get(),
        syncs_durable + 1,
        "one sync covers it"
    );
    assert_eq!(image.counters().discarded_clusters, 2);
    let file = image.storage().snapshot();
    assert!(file[second as usize..(second + 2 * CLUSTER) as usize]
        .iter()
        .all(|&b| b == 0));

    // The guest reads zeros there, its other data as before; a new write reuses the space.
    let mut buf = vec![1u8; 2 * CLUSTER as usize];
    image.read(CLUSTER, &mut buf, None).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    image.read(0, &mut buf[..CLUSTER as usize], None).unwrap();
    assert!(buf[..CLUSTER as usize].iter().all(|&b| b == 0x5a));
    image
        .write(9 * CLUSTER, &vec![7; CLUSTER as usize], None)
        .unwrap();
    assert_eq!(host_offset(&mut image, 9 * CLUSTER), second);
    close_and_check(image);
}

#[test]
fn a_discard_made_due_by_the_close_is_issued_by_the_close() {
    let mut image = fresh(REQUEST);
    image.write(0, &vec![0x5a; CLUSTER as usize], None).unwrap();
    image.flush().unwrap();
    let host = host_offset(&mut image, 0);
    image.discard(0, CLUSTER).unwrap();
    let storage = image.close().unwrap();
    let discards = storage.discards.borrow().clone();
    assert_eq!(
        discards.iter().map(|d| (d.0, d.1)).collect::<Vec<_>>(),
        [(host, CLUSTER)]
    );
    assert!(discards[0].2 >= 1, "after the close's sync");
}

#[test]
fn without_pass_discard_request_a_guest_discard_leaves_the_file_alone() {
    let mut image = fresh(DiscardPolicy::default());
    image
        .write(0, &vec![0x5a; 2 * CLUSTER as usize], None)
        .unwrap();
    image.flush().unwrap();
    let host = host_offset(&mut image, CLUSTER);
    image.discard(CLUSTER, CLUSTER).unwrap();
    image.write_zeroes(0, CLUSTER, true, None).unwrap();
    image.flush().unwrap();
    assert!(image.storage().discards.borrow().is_empty());
    assert_eq!(image.counters().discarded_clusters, 0);
    let file = image.storage().snapshot();
    assert!(file[host as usize..(host + CLUSTER) as usize]
        .iter()
        .all(|&b| b == 0x5a));
    close_and_check(image);
}

#[test]
fn zeroing_with_unmap_is_a_request_and_is_discarded_too() {
    let mut image = fresh(REQUEST);
    image.write(0, &vec![0x11; CLUSTER as usize], None).unwrap();
    image.flush().unwrap();
    let host = host_offset(&mut image, 0);
    image.write_zeroes(0, CLUSTER, true, None).unwrap();
    image.flush().unwrap();
    image.flush().unwrap();
    let discards = image.storage().discards.borrow().clone();
    assert_eq!(
        discards.iter().map(|d| (d.0, d.1)).collect::<Vec<_>>(),
        [(host, CLUSTER)]
    );
    close_and_check(image);
}

#[test]
fn a_cluster_an_internal_snapshot_still_holds_is_not_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, CLUSTER, 64 << 20, None);
    qemu_io(&path, &["write -P 0x33 0 128k"]);
    run_ok(
        Command::new("qemu-img")
            .args(["snapshot", "-c", "before"])
            .arg(&path),
    );
    let mut image = open(std::fs::read(&path).unwrap(), REQUEST);
    image.discard(0, 2 * CLUSTER).unwrap();
    image.flush().unwrap();
    assert!(
        image.storage().discards.borrow().is_empty(),
        "the snapshot's clusters keep a reference: nothing is freed, nothing discarded"
    );
    let bytes = close_and_check(image);
    std::fs::write(&path, bytes).unwrap();
    run_ok(
        Command::new("qemu-img")
            .args(["snapshot", "-a", "before"])
            .arg(&path),
    );
    qemu_io(&path, &["read -P 0x33 0 128k"]);
}

#[test]
fn a_compressed_cluster_replaced_by_copy_on_write_is_never_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("data.raw");
    let path = dir.path().join("img.qcow2");
    std::fs::write(&raw, vec![0x42u8; 4 * CLUSTER as usize]).unwrap();
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-c", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&path),
    );
    let all = DiscardPolicy {
        request: true,
        snapshot: true,
        other: true,
    };
    let mut image = open(std::fs::read(&path).unwrap(), all);
    assert_eq!(image.map(0, CLUSTER).unwrap().0, Mapping::Compressed);
    image.write(0, &vec![0x43; 4096], None).unwrap();
    image.flush().unwrap();
    assert!(image.storage().discards.borrow().is_empty());
    close_and_check(image);
}

#[test]
fn emptying_the_image_passes_its_clusters_as_snapshot_frees() {
    let with_snapshot_class = DiscardPolicy {
        snapshot: true,
        ..NONE
    };
    for (policy, expected) in [(with_snapshot_class, 3), (REQUEST, 0)] {
        let mut image = fresh(policy);
        image
            .write(0, &vec![9; 3 * CLUSTER as usize], None)
            .unwrap();
        image.flush().unwrap();
        image.make_empty().unwrap();
        image.flush().unwrap();
        image.flush().unwrap();
        assert_eq!(
            image.counters().discarded_clusters,
            expected,
            "policy {policy:?}"
        );
        close_and_check(image);
    }
}

#[test]
fn an_old_l1_table_is_discarded_only_with_pass_discard_other() {
    for (policy, expected) in [
        (
            DiscardPolicy {
                other: true,
                ..NONE
            },
            1,
        ),
        (DiscardPolicy::default(), 0),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.qcow2");
        qemu_img_create(&path, CLUSTER, 1 << 30, None);
        let mut image = open(std::fs::read(&path).unwrap(), policy);
        image.write(0, &[1; 512], None).unwrap();
        // Past what one L1 cluster maps (8192 entries of 512 MiB each): a new table.
        image.truncate(8 << 40).unwrap();
        image.flush().unwrap();
        image.flush().unwrap();
        assert_eq!(
            image.counters().discarded_clusters,
            expected,
            "policy {policy:?}"
        );
        close_and_check(image);
    }
}

#[test]
fn nothing_reuses_a_cluster_before_its_discard() {
    // The free stays quarantined until the flush that discards it: writes between the
    // guest's discard and that flush never get the cluster (so the discard cannot destroy
    // a new owner's data).
    let mut image = fresh(REQUEST);
    image.write(0, &vec![0x5a; CLUSTER as usize], None).unwrap();
    image.flush().unwrap();
    let host = host_offset(&mut image, 0);
    image.discard(0, CLUSTER).unwrap();
    image
        .write(CLUSTER, &vec![0x6b; CLUSTER as usize], None)
        .unwrap();
    image.flush().unwrap();
    image
        .write(2 * CLUSTER, &vec![0x7c; CLUSTER as usize], None)
        .unwrap();
    assert_ne!(host_offset(&mut image, CLUSTER), host);
    assert_ne!(host_offset(&mut image, 2 * CLUSTER), host);
    image.flush().unwrap();
    assert_eq!(image.counters().discarded_clusters, 1);
    for (offset, byte) in [(CLUSTER, 0x6b), (2 * CLUSTER, 0x7c)] {
        let mut buf = vec![0u8; CLUSTER as usize];
        image.read(offset, &mut buf, None).unwrap();
        assert!(buf.iter().all(|&b| b == byte));
    }
    // Released now: the next allocation may take it.
    image
        .write(3 * CLUSTER, &vec![0x11; CLUSTER as usize], None)
        .unwrap();
    assert_eq!(host_offset(&mut image, 3 * CLUSTER), host);
    close_and_check(image);
}

#[test]
fn in_a_transaction_group_the_discard_follows_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, CLUSTER, 64 << 20, None);
    let opts = OpenOptions {
        discard: REQUEST,
        txg: Some(qcow2b::engine::TxgOptions::default()),
        ..OpenOptions::default()
    };
    let mut image = Image::open(MemStorage::new(std::fs::read(&path).unwrap()), &opts).unwrap();
    image
        .write(0, &vec![0x5a; 2 * CLUSTER as usize], None)
        .unwrap();
    image.flush().unwrap();
    let host = host_offset(&mut image, CLUSTER);
    // A barrier after a write opens a group; the discard is in it.
    image.write(0, &[1; 512], None).unwrap();
    image.barrier().unwrap();
    image.discard(CLUSTER, CLUSTER).unwrap();
    image.barrier().unwrap();
    assert!(image.storage().discards.borrow().is_empty());
    let syncs_before = image.storage().flushes.get();
    image.flush().unwrap();
    assert!(
        image.storage().discards.borrow().is_empty(),
        "not before the next commit"
    );
    let syncs_after_commit = image.storage().flushes.get();
    assert!(syncs_after_commit > syncs_before);
    image.write(8 * CLUSTER, &[1; 512], None).unwrap();
    image.flush().unwrap();
    let discards = image.storage().discards.borrow().clone();
    assert_eq!(
        discards.iter().map(|d| (d.0, d.1)).collect::<Vec<_>>(),
        [(host, CLUSTER)]
    );
    assert_eq!(
        discards[0].2, syncs_after_commit,
        "after the commit that made it durable"
    );
    close_and_check(image);
}

/// Version 2 has no zero flag: without a backing file QEMU's qcow2 zeroes whole clusters by
/// unallocating them (they read as zeros), which qcow2b does too, so that `write_zeroes`
/// with no fallback (`qemu-img convert -n`) leaves a version 2 target unallocated (iotest
/// 122); a partial cluster, or a backing file, still gets the block layer's fallback.
#[test]
fn version_2_zeroes_whole_clusters_by_unallocating_them_without_a_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2.qcow2");
    qemu_img_create_with(&path, "compat=0.10,cluster_size=65536", "1M", None);
    let mut image = open_file(&path, &OpenOptions::default());
    image.write(0, &[0x11; 65536 * 3], None).unwrap();
    image.zero_by_metadata(0, 2 * 65536, false).unwrap();
    assert_eq!(
        image.map(0, 2 * 65536).unwrap(),
        (Mapping::Unallocated, 2 * 65536)
    );
    let mut back = vec![1u8; 65536];
    image.read(65536, &mut back, None).unwrap();
    assert_eq!(back, vec![0; 65536]);
    // Control: a partial cluster is not done by the tables.
    assert!(image.zero_by_metadata(2 * 65536, 512, false).is_err());
    image.close().unwrap();
    qemu_img_check(&path);

    let base = dir.path().join("base.qcow2");
    qemu_img_create(&base, 65536, 1 << 20, None);
    let over = dir.path().join("over.qcow2");
    qemu_img_create_with(&over, "compat=0.10", "", Some(&base));
    let mut image = open_file(&over, &OpenOptions::default());
    assert!(image.zero_by_metadata(0, 65536, false).is_err());
    image.close().unwrap();
}
