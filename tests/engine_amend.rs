//! `qemu-img amend` in the engine: version down (zero clusters expanded, in the active and the
//! snapshots' tables, over a backing file or not) and up, the refcount width, lazy refcounts,
//! the data file's name, the size; QEMU's refusals with QEMU's messages, the image unchanged.
//! Every image amended reads back in the system's QEMU as it did, and checks clean.

#[path = "engine_support.rs"]
mod support;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use qcow2b::engine::{Amendment, Backing, Error, Image, OpenOptions};
use support::*;

fn create(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let path = dir.join(name);
    qemu_img_create_with(&path, opts, size, None);
    path
}

fn amend(path: &Path, a: &Amendment, backing: Option<&dyn Backing>) -> Result<(), Error> {
    let mut image = open_file(path, &OpenOptions::default());
    let result = image.amend(a, backing);
    image.close().unwrap();
    result
}

fn be32(path: &Path, at: u64) -> u32 {
    (file_be64(path, at) >> 32) as u32
}

fn refused(path: &Path, a: &Amendment, want: &str) {
    let before = std::fs::read(path).unwrap();
    match amend(path, a, None) {
        Err(Error::BadOption(msg)) => assert_eq!(msg, want),
        other => panic!("expected {want:?}, got {other:?}"),
    }
    assert_eq!(
        std::fs::read(path).unwrap(),
        before,
        "a refusal changed the image"
    );
}

fn v2() -> Amendment {
    Amendment {
        version: Some(2),
        ..Default::default()
    }
}

/// Zero clusters without a backing file become unallocated, preallocated zero clusters
/// clusters of zeros; the header is QEMU's version 2 header (72 bytes, no feature table).
#[test]
fn a_downgrade_expands_zero_clusters_and_writes_a_version_2_header() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "img", "compat=1.1,lazy_refcounts=on", "64M");
    qemu_io(
        &img,
        &[
            "write -P 0x2a 0 256k",
            "write -z 0 64k",
            "write -z -u 64k 64k",
            "write -z 1M 128k",
        ],
    );
    amend(&img, &v2(), None).unwrap();
    assert_eq!(be32(&img, 4), 2, "version");
    qemu_img_check(&img);
    let info = qemu_img_info_json(&img);
    let specific = info
        .get("format-specific")
        .and_then(|f| f.get("data"))
        .unwrap();
    assert_eq!(specific.str_of("compat"), Some("0.10"));
    qemu_io(
        &img,
        &[
            "read -P 0 0 128k",
            "read -P 0x2a 128k 128k",
            "read -P 0 1M 128k",
        ],
    );
    // No zero flag is left (a version 2 reader would take it for data).
    let map = run_ok(
        Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "qcow2"])
            .arg(&img),
    );
    assert!(!map.contains("\"zero\": true, \"data\": true"), "{map}");
}

/// Over a backing file a zero cluster gets a cluster of zeros, so that the backing file's
/// data stays hidden.
#[test]
fn a_downgrade_over_a_backing_file_keeps_the_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let base = create(dir.path(), "base", "compat=1.1", "1M");
    qemu_io(&base, &["write -P 0x2a 0 128k"]);
    let img = dir.path().join("img");
    qemu_img_create_with(&img, "", "", Some(&base));
    qemu_io(&img, &["write -z 0 64k"]);
    let backing = ImageBacking(std::cell::RefCell::new(open_file(
        &base,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )));
    amend(&img, &v2(), Some(&backing)).unwrap();
    qemu_img_check(&img);
    qemu_io(&img, &["read -P 0 0 64k", "read -P 0x2a 64k 64k"]);
}

/// Zero clusters of a snapshot's tables are expanded too (the snapshot taken by QEMU shares
/// the active L2 table, then the active one is rewritten).
#[test]
fn a_downgrade_expands_the_snapshots_zero_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "img", "compat=1.1", "64M");
    qemu_io(&img, &["write -z 0 128k"]);
    run_ok(
        Command::new("qemu-img")
            .args(["snapshot", "-c", "foo"])
            .arg(&img),
    );
    qemu_io(&img, &["write -P 0x2a 0 128k"]);
    amend(&img, &v2(), None).unwrap();
    qemu_img_check(&img);
    qemu_io(&img, &["read -P 0x2a 0 128k"]);
    run_ok(
        Command::new("qemu-img")
            .args(["snapshot", "-a", "foo"])
            .arg(&img),
    );
    qemu_img_check(&img);
    qemu_io(&img, &["read -P 0 0 128k"]);
}

/// What version 2 cannot hold is refused with QEMU's messages, the image unchanged.
#[test]
fn a_downgrade_refuses_what_version_2_cannot_hold() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "rc8", "compat=1.1,refcount_bits=8", "1M");
    refused(&img, &v2(), "compat=0.10 requires refcount_bits=16");
    let img = create(dir.path(), "l2", "compat=1.1,extended_l2=on", "1M");
    refused(
        &img,
        &v2(),
        "Cannot downgrade an image with incompatible features 0x10 set",
    );
    let img = create(dir.path(), "lazy", "compat=0.10", "1M");
    refused(
        &img,
        &Amendment {
            lazy_refcounts: Some(true),
            ..Default::default()
        },
        "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 \
         or greater)",
    );
    refused(
        &img,
        &Amendment {
            refcount_bits: Some(8),
            ..Default::default()
        },
        "Refcount widths other than 16 bits require compatibility level 1.1 or above (use \
         compat=1.1 or greater)",
    );
    refused(
        &img,
        &Amendment {
            backing_file: Some(b"other.qcow2".to_vec()),
            ..Default::default()
        },
        "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.",
    );
}

/// An upgrade writes QEMU's version 3 header: 112 bytes and the feature name table.
#[test]
fn an_upgrade_writes_qemus_version_3_header() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "img", "compat=0.10", "64M");
    qemu_io(&img, &["write -P 0x2a 42M 64k"]);
    amend(
        &img,
        &Amendment {
            version: Some(3),
            lazy_refcounts: Some(true),
            size: Some(128 << 20),
            ..Default::default()
        },
        None,
    )
    .unwrap();
    assert_eq!(be32(&img, 4), 3);
    assert_eq!(be32(&img, 100), 112, "header_length");
    assert_eq!(be32(&img, 112), 0x6803_f857, "the feature name table first");
    let info = qemu_img_info_json(&img);
    assert_eq!(info.u64_or_0("virtual-size"), 128 << 20);
    let specific = info
        .get("format-specific")
        .and_then(|f| f.get("data"))
        .unwrap();
    assert_eq!(specific.str_of("compat"), Some("1.1"));
    assert_eq!(specific.get("lazy-refcounts"), Some(&Json::Bool(true)));
    qemu_img_check(&img);
    qemu_io(&img, &["read -P 0x2a 42M 64k"]);
    // And off again.
    amend(
        &img,
        &Amendment {
            lazy_refcounts: Some(false),
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let info = qemu_img_info_json(&img);
    let specific = info
        .get("format-specific")
        .and_then(|f| f.get("data"))
        .unwrap();
    assert_eq!(specific.get("lazy-refcounts"), Some(&Json::Bool(false)));
    qemu_img_check(&img);
}

/// Every refcount width there and back: the counts copied exactly (a snapshot makes some
/// of them 2), the guest content unchanged, clean for QEMU at each step.
#[test]
fn the_refcount_width_changes_and_the_counts_stay() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "img", "compat=1.1,cluster_size=4096", "8M");
    qemu_io(&img, &["write -P 0x11 0 1M", "write -P 0x22 4M 512k"]);
    run_ok(
        Command::new("qemu-img")
            .args(["snapshot", "-c", "s"])
            .arg(&img),
    );
    qemu_io(&img, &["write -P 0x33 256k 64k"]);
    for bits in [64u32, 2, 8, 32, 16] {
        amend(
            &img,
            &Amendment {
                refcount_bits: Some(bits),
                ..Default::default()
            },
            None,
        )
        .unwrap();
        let info = qemu_img_info_json(&img);
        let specific = info
            .get("format-specific")
            .and_then(|f| f.get("data"))
            .unwrap();
        assert_eq!(specific.u64_or_0("refcount-bits"), u64::from(bits));
        qemu_img_check(&img);
        qemu_io(
            &img,
            &[
                "read -P 0x11 0 256k",
                "read -P 0x33 256k 64k",
                "read -P 0x22 4M 512k",
            ],
        );
    }
    // 1 bit cannot count the snapshot's shared clusters: QEMU's message, nothing written.
    let before = std::fs::read(&img).unwrap();
    match amend(
        &img,
        &Amendment {
            refcount_bits: Some(1),
            ..Default::default()
        },
        None,
    ) {
        Err(Error::BadOption(msg)) => assert!(
            msg.starts_with("Cannot decrease refcount entry width to 1 bits: Cluster at offset")
                && msg.ends_with("has a refcount of 2"),
            "{msg}"
        ),
        other => panic!("expected the refusal, got {other:?}"),
    }
    assert_eq!(std::fs::read(&img).unwrap(), before);
    run_ok(
        Command::new("qemu-img")
            .args(["snapshot", "-a", "s"])
            .arg(&img),
    );
    qemu_io(&img, &["read -P 0x11 0 1M"]);
    qemu_img_check(&img);
}

/// The external data file's name and raw flag: renamed, and the raw flag cleared (never set).
#[test]
fn the_data_file_name_and_raw_flag() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("img.data");
    let img = create(
        dir.path(),
        "img",
        &format!("data_file={},data_file_raw=on", data.display()),
        "4M",
    );
    let moved = dir.path().join("moved.data");
    std::fs::rename(&data, &moved).unwrap();
    let rw = |p: &Path| File::options().read(true).write(true).open(p).unwrap();
    let mut image =
        Image::open_with_data_file(rw(&img), rw(&moved), &OpenOptions::default()).unwrap();
    image
        .amend(
            &Amendment {
                data_file: Some(moved.to_str().unwrap().as_bytes().to_vec()),
                data_file_raw: Some(false),
                ..Default::default()
            },
            None,
        )
        .unwrap();
    image.close().unwrap();
    let info = qemu_img_info_json(&img);
    let specific = info
        .get("format-specific")
        .and_then(|f| f.get("data"))
        .unwrap();
    assert_eq!(specific.str_of("data-file"), moved.to_str());
    assert_eq!(specific.get("data-file-raw"), Some(&Json::Bool(false)));
    qemu_img_check(&img);

    let mut image =
        Image::open_with_data_file(rw(&img), rw(&moved), &OpenOptions::default()).unwrap();
    let again = image.amend(
        &Amendment {
            data_file_raw: Some(true),
            ..Default::default()
        },
        None,
    );
    image.close().unwrap();
    assert!(
        matches!(&again, Err(Error::BadOption(m)) if m == "data-file-raw cannot be set on existing images"),
        "{again:?}"
    );
    let plain = create(dir.path(), "plain", "compat=1.1", "1M");
    refused(
        &plain,
        &Amendment {
            data_file: Some(b"x".to_vec()),
            ..Default::default()
        },
        "data-file can only be set for images that use an external data file",
    );
}

/// Progress of an amend: a refcount width change tells each refcount block written, and an
/// upgrade with a width change shares the whole between the two steps; the figures only go
/// forward and end at the whole.
#[test]
fn amend_progress_goes_forward_through_every_step_to_the_whole() {
    let dir = tempfile::tempdir().unwrap();
    for (opts, amendment, at_least) in [
        (
            "compat=1.1,cluster_size=512,refcount_bits=1",
            Amendment {
                refcount_bits: Some(64),
                ..Default::default()
            },
            // 64-bit entries, 64 per 512-byte block: 8 blocks at least for 400 clusters.
            9,
        ),
        (
            "compat=0.10,cluster_size=512",
            Amendment {
                version: Some(3),
                refcount_bits: Some(64),
                ..Default::default()
            },
            11,
        ),
    ] {
        let img = create(dir.path(), "img", opts, "1M");
        qemu_io(&img, &["write -P 0x5a 0 200k"]);
        let mut image = open_file(&img, &OpenOptions::default());
        let mut heard: Vec<(u64, u64)> = Vec::new();
        image
            .amend_with_progress(&amendment, None, &mut |done, total| {
                heard.push((done, total))
            })
            .unwrap();
        image.close().unwrap();
        let what = format!("{opts} {amendment:?}: {heard:?}");
        assert!(heard.len() >= at_least, "{what}");
        let share = |&(done, total): &(u64, u64)| done as f64 / total as f64;
        assert!(
            heard.windows(2).all(|w| share(&w[0]) <= share(&w[1])),
            "{what}"
        );
        assert!(heard.iter().all(|&(d, t)| d <= t && t > 0), "{what}");
        assert_eq!(share(heard.last().unwrap()), 1.0, "{what}");
        qemu_img_check(&img);
        qemu_io(&img, &["read -P 0x5a 0 200k"]);
        std::fs::remove_file(&img).unwrap();
    }
}

/// A refcount width change left the old width's refcount blocks in the cache when it was
/// not full (its loop emptied it only while full): the next allocation of such a freed
/// cluster (first in the txg mode, which writes every overwrite to a new cluster) was
/// refused as corrupt ("has refcount 0 but holds a refcount block"), and a reused offset
/// would have found the stale block. Found by the crash harness's `amend` workload.
#[test]
fn a_refcount_width_change_leaves_no_old_block_cached() {
    use qcow2b::engine::TxgOptions;
    let dir = tempfile::tempdir().unwrap();
    for (what, opts) in [
        ("plain", OpenOptions::default()),
        (
            "txg",
            OpenOptions {
                txg: Some(TxgOptions::default()),
                ..Default::default()
            },
        ),
    ] {
        let img = create(dir.path(), "img", "compat=1.1,cluster_size=4096", "4M");
        qemu_io(&img, &["write -P 0x11 0 256k", "write -P 0x22 1M 64k"]);
        run_ok(
            Command::new("qemu-img")
                .args(["snapshot", "-c", "s"])
                .arg(&img),
        );
        let mut image = open_file(&img, &opts);
        image
            .amend(
                &Amendment {
                    refcount_bits: Some(64),
                    ..Default::default()
                },
                None,
            )
            .unwrap();
        // Overwrites and new clusters, enough to reach the freed clusters of the old
        // refcount structures.
        for i in 0..64u64 {
            image
                .write(i * 4096, &[0x33; 4096], None)
                .unwrap_or_else(|e| panic!("{what}: write {i}: {e}"));
        }
        image.flush().unwrap();
        image.close().unwrap();
        qemu_img_check(&img);
        qemu_io(&img, &["read -P 0x33 0 256k", "read -P 0x22 1M 64k"]);
        std::fs::remove_file(&img).unwrap();
    }
}
