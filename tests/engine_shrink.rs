//! Shrinking the virtual disk (`qemu-img resize --shrink`, `block_resize`): what lies past
//! the new end is freed, what lies before it stays, and the file gives back its tail; the
//! result is clean for QEMU's `qemu-img check` (no leak, no corruption), with and without
//! internal snapshots sharing the clusters cut, and in the txg mode.

#[path = "engine_support.rs"]
mod support;

use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use qcow2b::engine::{Error, Image, OpenOptions, TxgOptions};
use support::*;

/// A 512-byte-cluster image (64 clusters per L2 table: 32 KiB per L1 entry) of 256 KiB,
/// every 4 KiB holding its own byte.
fn filled(dir: &Path, compat: &str) -> std::path::PathBuf {
    let path = dir.join("img.qcow2");
    qemu_img_create_with(
        &path,
        &format!("cluster_size=512,compat={compat}"),
        "256K",
        None,
    );
    let writes: Vec<String> = (0..64)
        .map(|i| format!("write -P {} {}k 4k", i + 1, i * 4))
        .collect();
    let writes: Vec<&str> = writes.iter().map(String::as_str).collect();
    qemu_io(&path, &writes);
    path
}

fn open_rw(path: &Path, opts: &OpenOptions) -> Image<File> {
    open_file(path, opts)
}

fn expect_pattern(path: &Path, len_kib: u64) {
    for i in 0..len_kib / 4 {
        qemu_io(path, &[&format!("read -P {} {}k 4k", i + 1, i * 4)]);
    }
}

/// A shrink to 100.5 KiB: the first 100 KiB read as before, the size is the new one, L1
/// entries past the new end are zero, the file is shorter, and QEMU finds the image clean
/// (exit 0: no leak of the freed data and L2 tables).
#[test]
fn a_shrink_frees_the_tail_and_keeps_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(dir.path(), "1.1");
    let before = std::fs::metadata(&path).unwrap().len();
    let mut image = open_rw(&path, &OpenOptions::default());
    image.shrink(100 * 1024 + 512).unwrap();
    assert_eq!(image.virtual_size(), 100 * 1024 + 512);
    image.close().unwrap();

    qemu_img_check(&path);
    let info = qemu_img_info_json(&path);
    assert_eq!(Some(info.u64_or_0("virtual-size")), Some(100 * 1024 + 512));
    expect_pattern(&path, 100);
    let after = std::fs::metadata(&path).unwrap().len();
    assert!(
        after < before,
        "the file kept its tail: {before} -> {after}"
    );
    // L1 entries 4.. (128 KiB on) name nothing; the L1 table keeps its size, as QEMU's.
    let l1_offset = file_be64(&path, 40);
    for index in 4..8 {
        assert_eq!(
            file_be64(&path, l1_offset + index * 8),
            0,
            "L1 entry {index}"
        );
    }
    // Grown again, the new area reads as zeros past the cluster holding the old end.
    let mut image = open_rw(&path, &OpenOptions::default());
    image.truncate(256 * 1024).unwrap();
    let mut tail = vec![0xffu8; 128 * 1024];
    image.read(128 * 1024, &mut tail, None).unwrap();
    assert!(tail.iter().all(|&b| b == 0));
    image.close().unwrap();
    qemu_img_check(&path);
}

/// Clusters shared with an internal snapshot (taken by QEMU) lose the active reference only:
/// the snapshot still reads the whole old disk, and every count is exact.
#[test]
fn a_shrink_keeps_what_a_snapshot_shares() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(dir.path(), "1.1");
    run_ok(
        Command::new("qemu-img")
            .args(["snapshot", "-c", "s1"])
            .arg(&path),
    );
    let mut image = open_rw(&path, &OpenOptions::default());
    image.shrink(64 * 1024).unwrap();
    image.close().unwrap();
    qemu_img_check(&path);
    expect_pattern(&path, 64);
    run_ok(
        Command::new("qemu-img")
            .args(["snapshot", "-a", "s1"])
            .arg(&path),
    );
    qemu_img_check(&path);
    expect_pattern(&path, 256);
}

/// A version 2 image with snapshots is refused (its snapshots do not record their size),
/// with QEMU's message, and nothing changes.
#[test]
fn a_version_2_image_with_snapshots_is_refused_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(dir.path(), "0.10");
    run_ok(
        Command::new("qemu-img")
            .args(["snapshot", "-c", "s1"])
            .arg(&path),
    );
    let before = std::fs::read(&path).unwrap();
    let mut image = open_rw(&path, &OpenOptions::default());
    match image.shrink(64 * 1024) {
        Err(e @ Error::Refused { .. }) => {
            assert_eq!(e.errno(), libc::ENOTSUP);
            assert_eq!(e.to_string(), "Can't resize a v2 image which has snapshots")
        }
        other => panic!("expected the refusal, got {other:?}"),
    }
    image.close().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // Control: the same image without snapshots shrinks.
    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let path = filled(&plain, "0.10");
    let mut image = open_rw(&path, &OpenOptions::default());
    image.shrink(64 * 1024).unwrap();
    image.close().unwrap();
    qemu_img_check(&path);
    expect_pattern(&path, 64);
}

/// In the txg mode the open group commits first; the guest's writes before the shrink stay.
#[test]
fn a_shrink_in_the_txg_mode_commits_the_group_first() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(dir.path(), "1.1");
    let opts = OpenOptions {
        txg: Some(TxgOptions {
            max_group_bytes: 64 << 20,
            max_group_age: Duration::from_secs(3600),
        }),
        ..Default::default()
    };
    let mut image = open_rw(&path, &opts);
    image.write(4096, &[0x5a; 4096], None).unwrap();
    image.barrier().unwrap();
    image.write(8192, &[0x5b; 4096], None).unwrap();
    image.shrink(32 * 1024).unwrap();
    image.close().unwrap();
    qemu_img_check(&path);
    qemu_io(
        &path,
        &["read -P 1 0 4k", "read -P 0x5a 4k 4k", "read -P 0x5b 8k 4k"],
    );
    let info = qemu_img_info_json(&path);
    assert_eq!(Some(info.u64_or_0("virtual-size")), Some(32 * 1024));
}

/// Sizes QEMU refuses: not a multiple of 512.
#[test]
fn a_size_not_a_multiple_of_512_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(dir.path(), "1.1");
    let mut image = open_rw(&path, &OpenOptions::default());
    match image.shrink(1000) {
        Err(Error::BadOption(msg)) => assert_eq!(msg, "The new size must be a multiple of 512"),
        other => panic!("expected the refusal, got {other:?}"),
    }
    assert_eq!(image.virtual_size(), 256 * 1024);
    image.close().unwrap();
    qemu_img_check(&path);
}
