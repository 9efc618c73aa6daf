//! Persistent dirty bitmaps kept by the engine: stored bits read back by QEMU's qcow2 (the
//! system's qemu-img and qemu-io) with the same bits, bits QEMU stored read by the engine,
//! the in-use flag a read-write open sets (and what a crash leaves), removal, `qemu-img
//! check` clean after each, and the write order of a store (everything the new directory
//! names, and the directory, ordered before the header names it; old clusters freed after).

#[path = "engine_support.rs"]
mod support;

use std::path::Path;
use std::process::Command;

use qcow2b::engine::{Image, MemStorage, OpenOptions, StoredBitmap, TxgOptions};
use support::*;

const MIB: u64 = 1 << 20;

fn modes() -> Vec<(&'static str, OpenOptions)> {
    vec![
        ("ordered", OpenOptions::default()),
        (
            "txg",
            OpenOptions {
                txg: Some(TxgOptions::default()),
                ..OpenOptions::default()
            },
        ),
    ]
}

/// Bits set for the guest bytes `[offset, offset + len)` in a bitmap of `bytes` bytes at
/// granularity `1 << gran_bits`.
fn bits_for(bytes: usize, gran_bits: u8, ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut data = vec![0u8; bytes];
    for &(offset, len) in ranges {
        let first = offset >> gran_bits;
        let end = (offset + len).div_ceil(1 << gran_bits);
        for bit in first..end {
            data[(bit / 8) as usize] |= 1 << (bit % 8);
        }
    }
    data
}

fn bitmap_info(path: &Path) -> Vec<(String, u64, Vec<String>)> {
    let info = qemu_img_info_json(path);
    let Some(bitmaps) = info
        .get("format-specific")
        .and_then(|f| f.get("data"))
        .and_then(|d| d.get("bitmaps"))
    else {
        return Vec::new();
    };
    bitmaps
        .array()
        .iter()
        .map(|b| {
            let flags = b
                .get("flags")
                .map(|f| {
                    f.array()
                        .iter()
                        .filter_map(|x| match x {
                            Json::Str(s) => Some(s.clone()),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            (
                b.str_of("name").unwrap_or("").to_string(),
                b.u64_or_0("granularity"),
                flags,
            )
        })
        .collect()
}

#[test]
fn bits_the_engine_stores_are_the_bits_qemu_loads_and_stores_again() {
    for (mode, opts) in modes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.qcow2");
        // 4 KiB clusters and 512-byte granules over 64 MiB: 16 KiB of bits, four data
        // clusters, two of them all zeros (left out of the table).
        qemu_img_create(&path, 4096, 64 * MIB, None);
        let mut image = open_file(&path, &opts);
        let len = 16 * 1024;
        let b0 = bits_for(
            len,
            9,
            &[(0, 4096), (40 * MIB, 1 << 20), (64 * MIB - 512, 512)],
        );
        let b1 = bits_for(128, 16, &[(3 * MIB, 200 << 10)]);
        image
            .store_bitmaps(&[
                StoredBitmap {
                    name: b"b0".to_vec(),
                    granularity_bits: 9,
                    enabled: true,
                    data: b0.clone(),
                },
                StoredBitmap {
                    name: b"frozen".to_vec(),
                    granularity_bits: 16,
                    enabled: false,
                    data: b1.clone(),
                },
            ])
            .unwrap();
        assert_eq!(image.bitmaps().len(), 2);
        image.close().unwrap();
        qemu_img_check(&path);
        assert_eq!(
            bitmap_info(&path),
            vec![
                ("b0".into(), 512, vec!["auto".into()]),
                ("frozen".into(), 65536, vec![]),
            ],
            "{mode}"
        );

        // QEMU loads them, marks what qemu-io writes in the enabled one, stores both.
        qemu_io(&path, &["write -P 7 8M 4k"]);
        qemu_img_check(&path);
        assert_eq!(bitmap_info(&path).len(), 2, "{mode}");
        let image = open_file(
            &path,
            &OpenOptions {
                read_only: true,
                ..OpenOptions::default()
            },
        );
        let got0 = image.read_bitmap(b"b0").unwrap();
        let expected0 = bits_for(
            len,
            9,
            &[
                (0, 4096),
                (40 * MIB, 1 << 20),
                (64 * MIB - 512, 512),
                (8 * MIB, 4096),
            ],
        );
        assert_eq!(
            got0, expected0,
            "{mode}: QEMU's write marked in the enabled bitmap"
        );
        assert_eq!(
            image.read_bitmap(b"frozen").unwrap(),
            b1,
            "{mode}: frozen unchanged"
        );
    }
}

#[test]
fn bits_qemu_stores_are_read_by_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, 65536, 32 * MIB, None);
    run_ok(
        Command::new("qemu-img")
            .args(["bitmap", "--add", "-g", "64k", "-f", "qcow2"])
            .arg(&path)
            .arg("q"),
    );
    qemu_io(&path, &["write 1M 64k", "write 20M 192k"]);
    let image = open_file(
        &path,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    );
    let entry = &image.bitmaps()[0];
    assert_eq!(
        (entry.name.as_slice(), entry.granularity_bits, entry.auto()),
        (&b"q"[..], 16, true)
    );
    assert!(!entry.in_use());
    assert_eq!(
        image.read_bitmap(b"q").unwrap(),
        bits_for(64, 16, &[(MIB, 64 << 10), (20 * MIB, 192 << 10)])
    );
}

#[test]
fn a_read_write_open_marks_bitmaps_in_use_and_a_crash_leaves_them_inconsistent() {
    for (mode, opts) in modes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.qcow2");
        qemu_img_create(&path, 65536, 32 * MIB, None);
        run_ok(
            Command::new("qemu-img")
                .args(["bitmap", "--add", "-f", "qcow2"])
                .arg(&path)
                .arg("q"),
        );
        let mut image = open_file(&path, &opts);
        // The open marked it in use (on storage already), and its stored bits are the ones
        // loaded: consistent for this open.
        assert!(image.bitmaps()[0].in_use(), "{mode}");
        assert!(image.bitmap_consistent(b"q"), "{mode}");
        assert!(
            bitmap_info(&path)[0].2.contains(&"in-use".to_string()),
            "{mode}"
        );
        image.write(0, &[1u8; 4096], None).unwrap();
        image.flush().unwrap();
        // A crash: the image dropped without storing the bitmap.
        drop(image);
        // Leaks at most (the txg mode's unused reserve), no corruption.
        let (code, check) = qemu_img_check_json(&path);
        assert!(code == 0 || code == 3, "{mode}: check exited {code}");
        assert_eq!(check.u64_or_0("corruptions"), 0, "{mode}");
        let image = open_file(&path, &opts);
        assert!(
            !image.bitmap_consistent(b"q"),
            "{mode}: in use from before: inconsistent"
        );
        assert!(
            image.read_bitmap(b"q").is_err(),
            "{mode}: never read as trustworthy"
        );
        image.close().unwrap();
        let (_, check) = qemu_img_check_json(&path);
        assert_eq!(check.u64_or_0("corruptions"), 0, "{mode}");
        // QEMU's qcow2 says so too: its info shows the flag.
        assert_eq!(
            bitmap_info(&path)[0].2,
            vec!["in-use".to_string(), "auto".to_string()]
        );
    }
}

#[test]
fn removing_a_bitmap_frees_its_clusters_and_a_second_store_replaces_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, 65536, 32 * MIB, None);
    let mut image = open_file(&path, &OpenOptions::default());
    let data = bits_for(64, 16, &[(0, 32 * MIB)]);
    let stored = |name: &str| StoredBitmap {
        name: name.as_bytes().to_vec(),
        granularity_bits: 16,
        enabled: true,
        data: data.clone(),
    };
    image.store_bitmaps(&[stored("a"), stored("b")]).unwrap();
    // Stored consistent: a second store of the same name is another writer's.
    assert!(image.store_bitmaps(&[stored("a")]).is_err());
    assert!(image.remove_bitmap(b"a").unwrap());
    assert!(
        !image.remove_bitmap(b"a").unwrap(),
        "absent: no error, as QEMU"
    );
    image.close().unwrap();
    qemu_img_check(&path);
    assert_eq!(
        bitmap_info(&path),
        vec![("b".into(), 65536, vec!["auto".into()])]
    );

    // Reopened read-write: in use, so stored again in place of the old one.
    let mut image = open_file(&path, &OpenOptions::default());
    assert_eq!(image.read_bitmap(b"b").unwrap(), data);
    let fewer = bits_for(64, 16, &[(MIB, 1)]);
    image
        .store_bitmaps(&[StoredBitmap {
            data: fewer.clone(),
            ..stored("b")
        }])
        .unwrap();
    assert!(image.remove_bitmap(b"b").unwrap());
    image.close().unwrap();
    let (code, check) = qemu_img_check_json(&path);
    assert_eq!((code, check.u64_or_0("leaks")), (0, 0));
    assert!(bitmap_info(&path).is_empty());
    // No extension left, no autoclear bit.
    assert_eq!(file_be64(&path, 88) & 1, 0);
}

#[test]
fn a_store_orders_tables_and_directory_before_the_header_and_frees_after() {
    // An image made here (version 3, 64 KiB clusters, 64 MiB) in memory, over a log of
    // writes and ordering points.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, 65536, 64 * MIB, None);
    let bytes = std::fs::read(&path).unwrap();
    let mut image = Image::open(LogStorage::new(bytes), &OpenOptions::default()).unwrap();
    let data = bits_for(128, 16, &[(0, 64 * MIB)]);
    let stored = StoredBitmap {
        name: b"x".to_vec(),
        granularity_bits: 16,
        enabled: true,
        data,
    };
    image.store_bitmaps(std::slice::from_ref(&stored)).unwrap();
    image.storage().events.borrow_mut().clear();
    // A second store over it (marked in use first, as a reopen does).
    image.make_read_only().unwrap();
    image.make_writable().unwrap();
    let marked = image.bitmaps()[0].table_offset;
    image.storage().events.borrow_mut().clear();
    image.store_bitmaps(&[stored]).unwrap();
    let new_table = image.bitmaps()[0].table_offset;
    assert_ne!(new_table, marked);
    let events = image.storage().events.borrow();
    let position = |pred: &dyn Fn(u64, &[u8]) -> bool| {
        events
            .iter()
            .position(|e| matches!(e, LogEvent::Write(o, b) if pred(*o, b)))
    };
    let header = position(&|o, _| o == 0).expect("a header write");
    let table = position(&|o, _| o == new_table).expect("the new table");
    let barrier_between = events[table..header]
        .iter()
        .any(|e| matches!(e, LogEvent::Barrier));
    assert!(
        barrier_between,
        "an ordering point between the table and the header"
    );
    // The old table's cluster is freed after the header: its refcount block is written
    // after an ordering point that follows the header.
    let after = &events[header + 1..];
    let first_barrier = after
        .iter()
        .position(|e| matches!(e, LogEvent::Barrier))
        .expect("an ordering point after the header");
    let refblock_writes_before: usize = after[..first_barrier]
        .iter()
        .filter(|e| matches!(e, LogEvent::Write(o, _) if *o != 0))
        .count();
    assert_eq!(
        refblock_writes_before, 0,
        "nothing freed before the header is ordered"
    );
    drop(events);
    let bytes = image.close().unwrap();
    let mut image = Image::open(
        MemStorage::new(bytes.inner.into_inner()),
        &OpenOptions::default(),
    )
    .unwrap();
    let report = image.check(qcow2b::engine::CheckFix::None).unwrap();
    assert_eq!(
        (report.corruptions, report.leaks),
        (0, 0),
        "{:?}",
        report.messages
    );
}

#[test]
fn the_mutation_leaves_out_the_ordering_point_before_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, 65536, 64 * MIB, None);
    let bytes = std::fs::read(&path).unwrap();
    let opts = OpenOptions {
        test_skip_bitmap_ordering: true,
        ..OpenOptions::default()
    };
    let mut image = Image::open(LogStorage::new(bytes), &opts).unwrap();
    image
        .store_bitmaps(&[StoredBitmap {
            name: b"x".to_vec(),
            granularity_bits: 16,
            enabled: true,
            data: bits_for(128, 16, &[(0, MIB)]),
        }])
        .unwrap();
    let table = image.bitmaps()[0].table_offset;
    let events = image.storage().events.borrow();
    let at = |off: u64| {
        events
            .iter()
            .rposition(|e| matches!(e, LogEvent::Write(o, _) if *o == off))
            .unwrap()
    };
    let (t, h) = (at(table), at(0));
    assert!(t < h);
    assert!(!events[t..h].iter().any(|e| matches!(e, LogEvent::Barrier)));
}
