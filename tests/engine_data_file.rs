//! External data files (src/engine/image/data_file.rs): guest clusters at their guest offsets
//! in another file, which nothing refcounts. Images made by QEMU's qcow2 (the system's
//! qemu-img) are read and written, images made here are read by QEMU, the raw bit keeps the
//! data file the guest's disk, and the data file is synced before the entries naming it.

#[path = "engine_support.rs"]
mod support;

use std::fs::File;
use std::path::Path;
use std::process::Command;

use qcow2b::engine::{
    create_with_data_file, CheckFix, CreateOptions, Error, Image, Mapping, MemStorage, OpenOptions,
    Preallocation, TxgOptions,
};
use support::*;

const CLUSTER: u64 = 65536;

fn rw_file(path: &Path) -> File {
    File::options().read(true).write(true).open(path).unwrap()
}

/// An image made by the system's qemu-img with `data_file=` (and `data_file_raw=on`).
fn qemu_made(dir: &Path, raw: bool) -> (std::path::PathBuf, std::path::PathBuf) {
    let img = dir.join("img.qcow2");
    let data = dir.join("img.data");
    let mut opts = format!("data_file={}", data.display());
    if raw {
        opts.push_str(",data_file_raw=on");
    }
    qemu_img_create_with(&img, &opts, "4M", None);
    (img, data)
}

/// What QEMU's qemu-img info says of the image's data-file-raw.
fn data_file_raw_of(img: &Path) -> Option<bool> {
    let info = qemu_img_info_json(img);
    let data = info.get("format-specific")?.get("data")?;
    match data.get("data-file-raw")? {
        Json::Bool(b) => Some(*b),
        _ => None,
    }
}

fn open(img: &Path, data: &Path) -> Image<File> {
    Image::open_with_data_file(rw_file(img), rw_file(data), &OpenOptions::default()).unwrap()
}

#[test]
fn data_written_here_lands_at_its_guest_offset_and_qemu_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let (img, data) = qemu_made(dir.path(), false);
    qemu_io(&img, &["write -P 0x11 0 128k"]);
    let image_len_before = std::fs::metadata(&img).unwrap().len();
    let mut image = open(&img, &data);
    assert!(image.has_data_file());
    // Guest cluster 0 at offset 0 of the data file: its entry is COPIED with offset 0.
    assert_eq!(
        image.map(0, CLUSTER).unwrap().0,
        Mapping::Data { host_offset: 0 }
    );
    image.write(4096, &[0x33; 8192], None).unwrap();
    image.write(2 << 20, &vec![0x44; 100_000], None).unwrap();
    image.write(3 << 20, &[0x55; 512], None).unwrap();
    assert_eq!(
        image.map(2 << 20, CLUSTER).unwrap().0,
        Mapping::Data {
            host_offset: 2 << 20
        }
    );
    image.close().unwrap();
    // The data file holds the guest's bytes at their offsets.
    let raw = std::fs::read(&data).unwrap();
    assert!(raw[4096..12288].iter().all(|&b| b == 0x33));
    assert!(raw[(2 << 20)..(2 << 20) + 100_000]
        .iter()
        .all(|&b| b == 0x44));
    // Nothing of the guest's data went into the image file (new L2 tables at most).
    let grown = std::fs::metadata(&img).unwrap().len() - image_len_before;
    assert!(grown <= 2 * CLUSTER, "the image file grew by {grown} bytes");
    qemu_io(
        &img,
        &[
            "read -P 0x11 0 4k",
            "read -P 0x33 4k 8k",
            "read -P 0x11 12k 116k",
            "read -P 0x44 2M 100000",
            "read -P 0 3145728 0",
            "read -P 0x55 3M 512",
            "read -P 0 3146240 65024",
        ],
    );
    qemu_img_check(&img);
}

#[test]
fn the_raw_bit_keeps_the_data_file_the_guests_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (img, data) = qemu_made(dir.path(), true);
    let mut image = open(&img, &data);
    image
        .write(0, &vec![0x5a; 3 * CLUSTER as usize], None)
        .unwrap();
    // Zeroes and a discard of whole clusters: the zero flag in the image, zeros in the file.
    image.write_zeroes(CLUSTER, CLUSTER, true, None).unwrap();
    image.discard(2 * CLUSTER, CLUSTER).unwrap();
    image.close().unwrap();
    let raw = std::fs::read(&data).unwrap();
    assert!(raw[..CLUSTER as usize].iter().all(|&b| b == 0x5a));
    assert!(raw[CLUSTER as usize..3 * CLUSTER as usize]
        .iter()
        .all(|&b| b == 0));
    // QEMU's qcow2 and the raw file read the same disk; the bit is still set.
    let out = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(&img)
            .arg(&data),
    );
    assert!(out.contains("identical"), "{out}");
    assert_eq!(data_file_raw_of(&img), Some(true));
    qemu_img_check(&img);
}

#[test]
fn an_image_created_here_is_qemus_to_read() {
    for (raw, preallocation) in [
        (false, Preallocation::Off),
        (false, Preallocation::Metadata),
        (true, Preallocation::Off),
        (false, Preallocation::Full),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("new.qcow2");
        let data = dir.path().join("new.data");
        File::create(&img).unwrap();
        File::create(&data).unwrap();
        let mut opts = CreateOptions::new(8 << 20);
        opts.data_file = Some(data.display().to_string());
        opts.data_file_raw = raw;
        opts.preallocation = preallocation;
        create_with_data_file(&rw_file(&img), &rw_file(&data), &opts).unwrap();
        let what = format!("raw {raw}, {preallocation:?}");
        assert_eq!(std::fs::metadata(&data).unwrap().len(), 8 << 20, "{what}");
        let mut image = open(&img, &data);
        image.write(CLUSTER + 100, &[0x77; 300], None).unwrap();
        image.close().unwrap();
        qemu_io(&img, &["read -P 0x77 65636 300", "read -P 0 0 65636"]);
        qemu_img_check(&img);
        assert_eq!(data_file_raw_of(&img), Some(raw), "{what}");
        if raw || preallocation != Preallocation::Off {
            // Every guest cluster named (metadata at least for a raw data file).
            let mut probe = Image::open_with_data_file(
                rw_file(&img),
                rw_file(&data),
                &OpenOptions {
                    read_only: true,
                    ..OpenOptions::default()
                },
            )
            .unwrap();
            assert_eq!(
                probe.map(5 << 20, CLUSTER).unwrap().0,
                Mapping::Data {
                    host_offset: 5 << 20
                },
                "{what}"
            );
        }
    }
}

/// blockdev-create of a `data_file_raw` image over an existing raw image (iotest 244's
/// "non-zeroed data file"): the raw image's bytes become the disk's, as with QEMU's qcow2;
/// before, creation emptied the data file and the disk read as zeros.
#[test]
fn creation_keeps_what_the_data_file_holds() {
    for (raw, preallocation) in [(true, Preallocation::Off), (false, Preallocation::Full)] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("new.qcow2");
        let data = dir.path().join("new.data");
        File::create(&img).unwrap();
        std::fs::write(&data, vec![0x42u8; 1 << 20]).unwrap();
        let mut opts = CreateOptions::new(4 << 20);
        opts.data_file = Some(data.display().to_string());
        opts.data_file_raw = raw;
        opts.preallocation = preallocation;
        create_with_data_file(&rw_file(&img), &rw_file(&data), &opts).unwrap();
        let what = format!("raw {raw}, {preallocation:?}");
        // Grown to the disk's size past what it held, which is still there.
        let bytes = std::fs::read(&data).unwrap();
        assert_eq!(bytes.len(), 4 << 20, "{what}");
        assert!(bytes[..1 << 20].iter().all(|&b| b == 0x42), "{what}");
        assert!(bytes[1 << 20..].iter().all(|&b| b == 0), "{what}");
        qemu_img_check(&img);
        if raw {
            // The raw image is the disk, through the metadata too (QEMU reads it so).
            qemu_io(&img, &["read -P 0x42 0 1M", "read -P 0 1M 3M"]);
        }
    }
}

#[test]
fn the_data_file_is_synced_before_the_entries_that_name_its_new_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let (img, data) = qemu_made(dir.path(), false);
    let mut image = Image::open_with_data_file(
        MemStorage::new(std::fs::read(&img).unwrap()),
        MemStorage::new(std::fs::read(&data).unwrap()),
        &OpenOptions::default(),
    )
    .unwrap();
    image.write(0, &vec![1; CLUSTER as usize], None).unwrap();
    // A guest barrier writes the new entry back after an ordering point; the data file's
    // sync comes first.
    let data_syncs = |image: &Image<MemStorage>| image.data_file().unwrap().flushes.get();
    assert_eq!(data_syncs(&image), 0);
    image.barrier().unwrap();
    assert_eq!(data_syncs(&image), 1, "the data file synced at the barrier");
    let events = image.storage().events.borrow().clone();
    assert!(
        events.contains(&qcow2b::engine::DebugEvent::L2Update),
        "the entry written after it: {events:?}"
    );
    // Nothing written to the data file since: no second sync at the flush.
    image.flush().unwrap();
    assert_eq!(data_syncs(&image), 1);
    image.write(4096, &[2; 512], None).unwrap();
    image.flush().unwrap();
    assert_eq!(
        data_syncs(&image),
        2,
        "an overwrite is made durable by the flush"
    );
}

#[test]
fn a_data_file_is_needed_exactly_when_the_header_names_one() {
    let dir = tempfile::tempdir().unwrap();
    let (img, data) = qemu_made(dir.path(), false);
    match Image::open(rw_file(&img), &OpenOptions::default()) {
        Err(Error::Unsupported(msg)) => assert!(msg.contains("external data file"), "{msg}"),
        other => panic!("opened without its data file: {:?}", other.map(|_| ())),
    }
    let plain = dir.path().join("plain.qcow2");
    qemu_img_create(&plain, CLUSTER, 4 << 20, None);
    match Image::open_with_data_file(rw_file(&plain), rw_file(&data), &OpenOptions::default()) {
        Err(Error::BadOption(msg)) => assert!(msg.contains("'data-file' can only be set"), "{msg}"),
        other => panic!(
            "a data file for an image without one: {:?}",
            other.map(|_| ())
        ),
    }
    let txg = OpenOptions {
        txg: Some(TxgOptions::default()),
        ..OpenOptions::default()
    };
    match Image::open_with_data_file(rw_file(&img), rw_file(&data), &txg) {
        Err(Error::BadOption(msg)) => assert!(msg.contains("barrier=txg"), "{msg}"),
        other => panic!("txg with a data file: {:?}", other.map(|_| ())),
    }
}

#[test]
fn an_entry_whose_offset_is_not_its_guest_offset_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let (img, data) = qemu_made(dir.path(), false);
    qemu_io(&img, &["write -P 0x11 64k 64k"]);
    // The L2 entry of guest cluster 1 names offset 2 * 64k instead.
    let l1 = file_be64(&img, 40);
    let l2 = file_be64(&img, l1) & 0x00ff_ffff_ffff_fe00;
    file_write(&img, l2 + 8, &((2 * CLUSTER) | (1 << 63)).to_be_bytes());
    let mut image = open(&img, &data);
    let mut buf = [0u8; 512];
    match image.read(CLUSTER, &mut buf, None) {
        Err(Error::Corrupt(msg)) => assert!(msg.contains("does not match guest"), "{msg}"),
        other => panic!("read through a wrong entry: {other:?}"),
    }
    // QEMU's check does not count data clusters, nor does ours.
    let report = image.check(CheckFix::None).unwrap();
    assert_eq!(
        (report.corruptions, report.leaks),
        (0, 0),
        "{:?}",
        report.messages
    );
}

#[test]
fn check_counts_no_refcounts_for_data_clusters_and_finds_nothing_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let (img, data) = qemu_made(dir.path(), false);
    let mut image = open(&img, &data);
    // Data clusters at offsets the image file's own clusters have: their COPIED flags must
    // not be compared with the image file's refcounts there.
    for i in 0..8u64 {
        image
            .write(i * CLUSTER, &[i as u8 + 1; 4096], None)
            .unwrap();
    }
    image.flush().unwrap();
    let report = image.check(CheckFix::None).unwrap();
    assert_eq!(
        (report.corruptions, report.leaks, report.check_errors),
        (0, 0, 0),
        "{:?}",
        report.messages
    );
    image.close().unwrap();
    qemu_img_check(&img);
}
