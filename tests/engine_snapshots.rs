//! Internal snapshots taken, applied and deleted by the engine: the data each shows, the VM
//! state kept with it, and the image QEMU's qcow2 (the system's qemu-img) reads afterwards:
//! the same snapshot list, the same content per snapshot, `qemu-img check` clean (no leak,
//! no corruption); and the other way round, snapshots QEMU took applied and deleted by the
//! engine. Each mode's write-back is exercised (ordered and txg).

#[path = "engine_support.rs"]
mod support;

use std::fs::File;
use std::path::Path;
use std::process::Command;

use qcow2b::engine::{Error, Image, OpenOptions, SnapshotParams, TxgOptions};
use support::*;

const MIB: u64 = 1 << 20;

fn params(name: &str) -> SnapshotParams {
    SnapshotParams {
        name: name.as_bytes().to_vec(),
        date_sec: 1_700_000_000,
        date_nsec: 5,
        vm_clock_nsec: 42_000_000_000,
        ..SnapshotParams::default()
    }
}

fn read(image: &mut Image<File>, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    image.read(offset, &mut buf, None).unwrap();
    buf
}

fn write(image: &mut Image<File>, offset: u64, byte: u8, len: usize) {
    image.write(offset, &vec![byte; len], None).unwrap();
}

fn snapshot_list(path: &Path) -> String {
    run_ok(
        Command::new("qemu-img")
            .args(["snapshot", "-l", "-f", "qcow2", "-U"])
            .arg(path),
    )
}

/// The guest content of snapshot `name` as QEMU reads it (`qemu-img convert -l`).
fn qemu_snapshot_content(path: &Path, name: &str, dir: &Path) -> Vec<u8> {
    let raw = dir.join(format!("{name}.raw"));
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw", "-l"])
            .arg(format!("snapshot.name={name}"))
            .arg(path)
            .arg(&raw),
    );
    std::fs::read(raw).unwrap()
}

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

#[test]
fn a_snapshot_keeps_its_data_while_the_disk_changes_and_qemu_reads_both() {
    for (mode, opts) in modes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.qcow2");
        qemu_img_create(&path, 65536, 4 * MIB, None);
        let mut image = open_file(&path, &opts);
        write(&mut image, 0, 0x11, 128 << 10);
        write(&mut image, 2 * MIB, 0x22, 4096);
        let taken = image.create_snapshot(&params("first")).unwrap();
        assert_eq!(taken.id, b"1", "{mode}");
        write(&mut image, 0, 0x33, 4096);
        write(&mut image, 3 * MIB, 0x44, 4096);
        image.barrier().unwrap();
        image.create_snapshot(&params("second")).unwrap();
        write(&mut image, 65536, 0x55, 4096);
        image.close().unwrap();

        qemu_img_check(&path);
        let list = snapshot_list(&path);
        assert!(
            list.contains("first") && list.contains("second"),
            "{mode}: {list}"
        );
        let first = qemu_snapshot_content(&path, "first", dir.path());
        assert_eq!(first[..4096], [0x11; 4096], "{mode}");
        assert_eq!(first[3 * MIB as usize], 0, "{mode}");
        assert_eq!(first[2 * MIB as usize], 0x22, "{mode}");
        let second = qemu_snapshot_content(&path, "second", dir.path());
        assert_eq!(second[..4096], [0x33; 4096], "{mode}");
        assert_eq!(second[65536], 0x11, "{mode}");
        assert_eq!(second[3 * MIB as usize], 0x44, "{mode}");
        let active = qemu_img_to_raw(&path, &dir.path().join("active.raw"));
        assert_eq!(active[65536], 0x55, "{mode}");

        // Applied and deleted by the engine: back to the first snapshot's content.
        let mut image = open_file(&path, &opts);
        image.goto_snapshot(b"first").unwrap();
        assert_eq!(read(&mut image, 0, 4096), vec![0x11; 4096], "{mode}");
        assert_eq!(read(&mut image, 3 * MIB, 16), vec![0; 16], "{mode}");
        // Writing after the revert leaves the snapshot alone.
        write(&mut image, 0, 0x66, 4096);
        let deleted = image.delete_snapshot(None, Some(b"second")).unwrap();
        assert_eq!(deleted.name, b"second");
        image.close().unwrap();
        qemu_img_check(&path);
        let first = qemu_snapshot_content(&path, "first", dir.path());
        assert_eq!(first[..4096], [0x11; 4096], "{mode}");
        let active = qemu_img_to_raw(&path, &dir.path().join("active.raw"));
        assert_eq!(active[..4096], [0x66; 4096], "{mode}");
        assert!(!snapshot_list(&path).contains("second"), "{mode}");

        // The last snapshot deleted: every cluster counted once again (COPIED back).
        let mut image = open_file(&path, &opts);
        image.delete_snapshot(Some(b"1"), None).unwrap();
        image.close().unwrap();
        qemu_img_check(&path);
        assert_eq!(snapshot_list(&path).trim(), "", "{mode}");
        let (_, report) = qemu_img_check_json(&path);
        assert_eq!(report.u64_or_0("leaks"), 0, "{mode}");
    }
}

#[test]
fn snapshots_qemu_took_are_applied_and_deleted_by_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, 65536, 4 * MIB, None);
    qemu_io(&path, &["write -P 0x11 0 192k"]);
    run_ok(
        Command::new("qemu-img")
            .args(["snapshot", "-c", "base", "-f", "qcow2"])
            .arg(&path),
    );
    qemu_io(&path, &["write -P 0x22 64k 64k"]);
    let mut image = open_file(&path, &OpenOptions::default());
    assert_eq!(read(&mut image, 65536, 8), vec![0x22; 8]);
    image.goto_snapshot(b"base").unwrap();
    assert_eq!(read(&mut image, 65536, 8), vec![0x11; 8]);
    write(&mut image, 0, 0x33, 512);
    image.close().unwrap();
    qemu_img_check(&path);
    let active = qemu_img_to_raw(&path, &dir.path().join("a.raw"));
    assert_eq!(active[..512], [0x33; 512]);
    assert_eq!(active[65536], 0x11);

    let mut image = open_file(&path, &OpenOptions::default());
    image.delete_snapshot(None, Some(b"base")).unwrap();
    image.close().unwrap();
    qemu_img_check(&path);
    assert_eq!(snapshot_list(&path).trim(), "");
}

#[test]
fn vm_state_is_kept_by_the_snapshot_and_leaves_the_active_tables() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, 65536, 3 * MIB + 512, None);
    let mut image = open_file(&path, &OpenOptions::default());
    write(&mut image, 0, 0x11, 4096);
    let state: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    image.write_vmstate(0, &state[..100_000]).unwrap();
    image.write_vmstate(100_000, &state[100_000..]).unwrap();
    let taken = image
        .create_snapshot(&SnapshotParams {
            vm_state_size: state.len() as u64,
            icount: Some(7),
            ..params("vm")
        })
        .unwrap();
    assert_eq!(taken.vm_state_size, state.len() as u64);
    // Unmapped from the active tables.
    let mut back = vec![1u8; 4096];
    image.read_vmstate(0, &mut back).unwrap();
    assert_eq!(back, vec![0; 4096]);
    write(&mut image, 0, 0x22, 4096);
    image.close().unwrap();
    qemu_img_check(&path);
    let list = snapshot_list(&path);
    assert!(list.contains("293 KiB"), "{list}");

    let mut image = open_file(&path, &OpenOptions::default());
    assert_eq!(image.snapshots()[0].icount, Some(7));
    image.goto_snapshot(b"vm").unwrap();
    let mut back = vec![0u8; state.len()];
    image.read_vmstate(0, &mut back).unwrap();
    assert_eq!(back, state);
    assert_eq!(read(&mut image, 0, 8), vec![0x11; 8]);
    image.close().unwrap();
    qemu_img_check(&path);
}

#[test]
fn a_snapshot_of_another_size_brings_its_size_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, 65536, 2 * MIB, None);
    let mut image = open_file(&path, &OpenOptions::default());
    write(&mut image, MIB, 0x11, 4096);
    image.create_snapshot(&params("small")).unwrap();
    image.truncate(64 * MIB).unwrap();
    write(&mut image, 40 * MIB, 0x22, 4096);
    image.create_snapshot(&params("big")).unwrap();
    image.goto_snapshot(b"small").unwrap();
    assert_eq!(image.virtual_size(), 2 * MIB);
    image.goto_snapshot(b"big").unwrap();
    assert_eq!(image.virtual_size(), 64 * MIB);
    assert_eq!(read(&mut image, 40 * MIB, 8), vec![0x22; 8]);
    image.close().unwrap();
    qemu_img_check(&path);
    let info = qemu_img_info_json(&path);
    assert_eq!(info.u64_or_0("virtual-size"), 64 * MIB);
}

#[test]
fn unknown_snapshots_are_refused_with_enoent_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, 65536, MIB, None);
    let before = std::fs::read(&path).unwrap();
    let mut image = open_file(&path, &OpenOptions::default());
    for result in [
        image.goto_snapshot(b"nope").map(|_| ()),
        image.delete_snapshot(Some(b"1"), None).map(|_| ()),
        image.delete_snapshot(None, None).map(|_| ()),
    ] {
        match result {
            Err(e @ Error::Refused { .. }) => assert_eq!(e.errno(), libc::ENOENT),
            other => panic!("expected ENOENT, got {other:?}"),
        }
    }
    drop(image);
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn snapshot_ids_follow_the_highest_and_names_may_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, 65536, MIB, None);
    let mut image = open_file(&path, &OpenOptions::default());
    for _ in 0..3 {
        image.create_snapshot(&params("same")).unwrap();
    }
    image.delete_snapshot(Some(b"2"), None).unwrap();
    let next = image.create_snapshot(&params("same")).unwrap();
    assert_eq!(next.id, b"4");
    let ids: Vec<&[u8]> = image.snapshots().iter().map(|s| &s.id[..]).collect();
    assert_eq!(ids, [&b"1"[..], b"3", b"4"]);
    image.close().unwrap();
    qemu_img_check(&path);
}

/// Random writes, snapshots taken, applied and deleted, against a model of every snapshot's
/// content; QEMU reads each snapshot and the active disk alike at the end.
#[test]
fn random_snapshot_operations_match_a_model() {
    for (mode, opts) in modes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.qcow2");
        let size = 2 * MIB;
        qemu_img_create(&path, 4096, size, None);
        let mut image = open_file(&path, &opts);
        let mut rng = XorShift::new(0x5eed_0000 + mode.len() as u64);
        let mut active = vec![0u8; size as usize];
        let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
        let mut taken = 0;
        for step in 0..120 {
            match rng.below(10) {
                0 if snaps.len() < 6 => {
                    taken += 1;
                    let name = format!("s{taken}");
                    image.create_snapshot(&params(&name)).unwrap();
                    snaps.push((name, active.clone()));
                }
                1 if !snaps.is_empty() => {
                    let i = rng.below(snaps.len() as u64) as usize;
                    image.goto_snapshot(snaps[i].0.as_bytes()).unwrap();
                    active = snaps[i].1.clone();
                }
                2 if !snaps.is_empty() => {
                    let i = rng.below(snaps.len() as u64) as usize;
                    let (name, _) = snaps.remove(i);
                    image.delete_snapshot(None, Some(name.as_bytes())).unwrap();
                }
                3 => image.flush().unwrap(),
                _ => {
                    let offset = rng.below(size - 20_000);
                    let len = 1 + rng.below(20_000) as usize;
                    let byte = (step % 250 + 1) as u8;
                    write(&mut image, offset, byte, len);
                    active[offset as usize..offset as usize + len].fill(byte);
                }
            }
        }
        assert_eq!(read(&mut image, 0, size as usize), active, "{mode}");
        image.close().unwrap();
        qemu_img_check(&path);
        let qemu_active = qemu_img_to_raw(&path, &dir.path().join("active.raw"));
        assert!(qemu_active == active, "{mode}: active content differs");
        for (name, content) in &snaps {
            let got = qemu_snapshot_content(&path, name, dir.path());
            assert!(&got == content, "{mode}: snapshot {name} differs");
        }
    }
}

/// iotest 261: a snapshot table entry with more extra data than QEMU's limit (1024 bytes) is
/// refused at open with QEMU's hint; an open for check reads the table in part, a check that
/// may not repair fails (EFBIG), and `check -r all` writes the table again without the
/// excess, after which the image opens, lists both snapshots and checks clean.
#[test]
fn too_much_snapshot_extra_data_is_refused_and_cut_by_a_repair() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, 64 << 10, 8 << 20, None);
    qemu_io(&path, &["write -P 0x11 0 128k"]);
    for name in ["first", "second"] {
        run_ok(
            Command::new("qemu-img")
                .args(["snapshot", "-c", name])
                .arg(&path),
        );
    }
    // Entry 1 follows entry 0, 8-byte aligned; its extra data grows to 64 KiB (the file
    // made long enough for the entry, which now ends in zeros).
    let table = file_be64(&path, 64);
    let be = |at: u64, len: usize| -> u64 {
        let bytes = std::fs::read(&path).unwrap();
        bytes[at as usize..at as usize + len]
            .iter()
            .fold(0, |v, &b| v << 8 | u64::from(b))
    };
    let entry0_len = 40 + be(table + 36, 4) + be(table + 12, 2) + be(table + 14, 2);
    let entry1 = table + entry0_len.next_multiple_of(8);
    file_write(&path, entry1 + 36, &0x1_0000u32.to_be_bytes());
    let file = File::options().read(true).write(true).open(&path).unwrap();
    let len = file.metadata().unwrap().len();
    file.set_len(len + (1 << 20)).unwrap();
    drop(file);
    let before = std::fs::read(&path).unwrap();

    let refusal = |e: Error| match e {
        Error::Refused { errno, msg } => {
            assert_eq!(errno, libc::EFBIG);
            msg
        }
        other => panic!("expected a refusal, got {other:?}"),
    };
    let file = File::options().read(true).write(true).open(&path).unwrap();
    let msg = refusal(Image::open(file, &OpenOptions::default()).err().unwrap());
    assert_eq!(
        msg,
        "Too much extra metadata in snapshot table entry 1\nYou can force-remove this extra \
         metadata with qemu-img check -r all"
    );
    let for_check = OpenOptions {
        for_check: true,
        ..Default::default()
    };
    let mut image = open_file(&path, &for_check);
    assert_eq!(image.snapshots().len(), 2);
    let msg = refusal(image.check(qcow2b::engine::CheckFix::Leaks).unwrap_err());
    assert!(msg.starts_with("ERROR failed to read the snapshot table: Too much extra"));
    drop(image);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "a check changed the image"
    );

    let mut image = open_file(&path, &for_check);
    let report = image.check(qcow2b::engine::CheckFix::All).unwrap();
    assert!(
        report
            .messages
            .iter()
            .any(|m| m
                == "Discarding too much extra metadata in snapshot table entry 1 (65536 > 1024)"),
        "{:?}",
        report.messages
    );
    assert_eq!(report.corruptions, 0, "{:?}", report.messages);
    image.close().unwrap();
    let image = open_file(&path, &OpenOptions::default());
    let names: Vec<&[u8]> = image.snapshots().iter().map(|s| &s.name[..]).collect();
    assert_eq!(names[0], b"first");
    assert_eq!(names.len(), 2);
    assert_eq!(image.snapshots()[1].extra_data_size, 1024);
    drop(image);
    qemu_img_check(&path);
    qemu_io(&path, &["read -P 0x11 0 128k"]);
}
