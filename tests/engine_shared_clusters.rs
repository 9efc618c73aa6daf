//! An active L2 table that names one host cluster twice (refcount 2, neither entry COPIED):
//! qcow2 allows it, qemu-img never makes it, the fuzzer did (a dirty image whose refcounts
//! the open rebuilt). When a write or a discard moves one entry away, the other is left
//! alone with refcount 1; the spec wants COPIED on it again, and QEMU's check calls the
//! missing flag a corruption. qcow2b gives the flag back (write-back stage 6), and only
//! after the decrement that brought the refcount to one is ordered.

#[path = "engine_support.rs"]
mod support;

use qcow2b::engine::{CheckFix, Image, MemStorage, OpenOptions};
use support::*;

const CLUSTER: usize = 512;
const COPIED: u64 = 1 << 63;

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Where things are in the image made by `shared_image`.
struct Layout {
    l2: usize,
    refblock: usize,
    shared: u64,
}

/// A 512-byte-cluster image whose guest clusters 0 and 1 both name the host cluster that
/// held cluster 0 (0x11 bytes), counted twice; cluster 1's own host cluster is freed.
fn shared_image(dir: &std::path::Path) -> (Vec<u8>, Layout) {
    let path = dir.join("shared.qcow2");
    qemu_img_create(&path, CLUSTER as u64, 1 << 20, None);
    qemu_io(&path, &["write -P 0x11 0 512", "write -P 0x22 512 512"]);
    let mut bytes = std::fs::read(&path).unwrap();
    let l1 = be64(&bytes, 40) as usize;
    let l2 = (be64(&bytes, l1) & !COPIED) as usize;
    let reftable = be64(&bytes, 48) as usize;
    let refblock = be64(&bytes, reftable) as usize;
    let first = be64(&bytes, l2) & !COPIED;
    let second = be64(&bytes, l2 + 8) & !COPIED;
    put64(&mut bytes, l2, first);
    put64(&mut bytes, l2 + 8, first);
    let count = |b: &mut Vec<u8>, host: u64, n: u16| {
        let at = refblock + 2 * (host as usize / CLUSTER);
        b[at..at + 2].copy_from_slice(&n.to_be_bytes());
    };
    count(&mut bytes, first, 2);
    count(&mut bytes, second, 0);
    (
        bytes,
        Layout {
            l2,
            refblock,
            shared: first,
        },
    )
}

fn assert_clean_with_qemu(dir: &std::path::Path, bytes: Vec<u8>) {
    let path = dir.join("after.qcow2");
    std::fs::write(&path, bytes).unwrap();
    qemu_img_check(&path);
}

#[test]
fn the_image_as_made_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, _) = shared_image(dir.path());
    let mut image = Image::open(MemStorage::new(bytes.clone()), &OpenOptions::default()).unwrap();
    let report = image.check(CheckFix::None).unwrap();
    assert_eq!(
        report.corruptions + report.leaks,
        0,
        "{:?}",
        report.messages
    );
    assert_clean_with_qemu(dir.path(), bytes);
}

#[test]
fn a_write_to_one_entry_gives_the_other_its_copied_flag_back() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, layout) = shared_image(dir.path());
    let mut image = Image::open(MemStorage::new(bytes), &OpenOptions::default()).unwrap();
    image.write(0, &[0x33; CLUSTER], None).unwrap();
    image.flush().unwrap();
    let report = image.check(CheckFix::None).unwrap();
    assert_eq!(report.corruptions, 0, "{:?}", report.messages);
    let mut back = vec![0u8; 2 * CLUSTER];
    image.read(0, &mut back, None).unwrap();
    assert!(back[..CLUSTER].iter().all(|&b| b == 0x33));
    assert!(back[CLUSTER..].iter().all(|&b| b == 0x11));
    let bytes = image.close().unwrap().into_inner();
    assert_eq!(be64(&bytes, layout.l2 + 8), layout.shared | COPIED);
    assert_clean_with_qemu(dir.path(), bytes.clone());

    // Now that it is COPIED, a write to cluster 1 goes in place.
    let mut image = Image::open(MemStorage::new(bytes), &OpenOptions::default()).unwrap();
    image.write(CLUSTER as u64, &[0x44; CLUSTER], None).unwrap();
    let bytes = image.close().unwrap().into_inner();
    assert_eq!(be64(&bytes, layout.l2 + 8), layout.shared | COPIED);
    assert_clean_with_qemu(dir.path(), bytes);
}

#[test]
fn a_discard_or_zeroing_of_one_entry_gives_the_other_its_copied_flag_back() {
    for unmap in [None, Some(false), Some(true)] {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, layout) = shared_image(dir.path());
        let mut image = Image::open(MemStorage::new(bytes), &OpenOptions::default()).unwrap();
        match unmap {
            None => image.discard(CLUSTER as u64, CLUSTER as u64).unwrap(),
            Some(unmap) => image
                .write_zeroes(CLUSTER as u64, CLUSTER as u64, unmap, None)
                .unwrap(),
        }
        let bytes = image.close().unwrap().into_inner();
        assert_eq!(be64(&bytes, layout.l2), layout.shared | COPIED, "{unmap:?}");
        assert_clean_with_qemu(dir.path(), bytes);
    }
}

#[test]
fn the_copied_flag_is_written_after_the_decrement_is_ordered() {
    let dir = tempfile::tempdir().unwrap();
    let (start, layout) = shared_image(dir.path());
    let mut image = Image::open(LogStorage::new(start.clone()), &OpenOptions::default()).unwrap();
    image.write(0, &[0x33; CLUSTER], None).unwrap();
    image.flush().unwrap();
    let events = image.storage().events.take();

    // Replay: `ordered` is the file as of the last ordering point. When the write that sets
    // COPIED on entry 1 is issued, the shared cluster must be counted once there.
    let count_at = layout.refblock + 2 * (layout.shared as usize / CLUSTER);
    let mut ordered = start.clone();
    let mut now = start;
    let mut seen = false;
    for event in &events {
        let LogEvent::Write(offset, data) = event else {
            ordered = now.clone();
            continue;
        };
        let (offset, end) = (*offset as usize, *offset as usize + data.len());
        if now.len() < end {
            now.resize(end, 0);
        }
        now[offset..end].copy_from_slice(data);
        let entry = layout.l2 + 8;
        if offset <= entry && entry + 8 <= end && be64(&now, entry) == layout.shared | COPIED {
            let count = u16::from_be_bytes([ordered[count_at], ordered[count_at + 1]]);
            assert_eq!(
                count, 1,
                "COPIED written while the cluster is counted {count}"
            );
            seen = true;
        }
    }
    assert!(seen, "the COPIED flag was never written");
}

#[test]
fn in_txg_mode_the_group_commits_the_copied_flag() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, layout) = shared_image(dir.path());
    let opts = OpenOptions {
        txg: Some(qcow2b::engine::TxgOptions {
            max_group_bytes: 64 << 20,
            max_group_age: std::time::Duration::from_secs(3600),
        }),
        ..Default::default()
    };
    let mut image = Image::open(MemStorage::new(bytes), &opts).unwrap();
    // A write elsewhere and a barrier open a group (before it, writes follow the ordinary
    // rules, "One epoch" in txg.rs); the write under test is the group's.
    image.write(1 << 19, &[0x44; CLUSTER], None).unwrap();
    image.barrier().unwrap();
    image.write(0, &[0x33; CLUSTER], None).unwrap();
    image.flush().unwrap();
    // The flush committed the group; the close after it has nothing left to write back but
    // gives the interval's unused zero reserve back.
    let bytes = image.close().unwrap().into_inner();
    // The group copied the L2 table; find it through the L1 table.
    let l1 = be64(&bytes, 40) as usize;
    let l2 = (be64(&bytes, l1) & !COPIED) as usize;
    assert_ne!(l2, layout.l2, "the group writes a copy of the table");
    assert_eq!(be64(&bytes, l2 + 8), layout.shared | COPIED);
    assert_clean_with_qemu(dir.path(), bytes);
}

#[test]
fn a_table_two_l1_entries_shared_gets_copied_back_on_the_one_left() {
    // L1 entries 0 and 1 name the same L2 table (counted twice), whose entry 0 names a data
    // cluster counted twice (once per walk through an L1 entry), neither flag set.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared-table.qcow2");
    qemu_img_create(&path, CLUSTER as u64, 1 << 20, None);
    qemu_io(&path, &["write -P 0x11 0 512"]);
    let mut bytes = std::fs::read(&path).unwrap();
    let l1 = be64(&bytes, 40) as usize;
    let table = be64(&bytes, l1) & !COPIED;
    let data = be64(&bytes, table as usize) & !COPIED;
    let reftable = be64(&bytes, 48) as usize;
    let refblock = be64(&bytes, reftable) as usize;
    put64(&mut bytes, l1, table);
    put64(&mut bytes, l1 + 8, table);
    put64(&mut bytes, table as usize, data);
    for host in [table, data] {
        let at = refblock + 2 * (host as usize / CLUSTER);
        bytes[at..at + 2].copy_from_slice(&2u16.to_be_bytes());
    }
    assert_clean_with_qemu(dir.path(), bytes.clone());

    let mut image = Image::open(MemStorage::new(bytes), &OpenOptions::default()).unwrap();
    image.write(0, &[0x33; CLUSTER], None).unwrap();
    let bytes = image.close().unwrap().into_inner();
    assert_eq!(
        be64(&bytes, l1 + 8),
        table | COPIED,
        "L1 entry 1 keeps the table alone"
    );
    assert_eq!(
        be64(&bytes, table as usize),
        data | COPIED,
        "and its entry the cluster"
    );
    assert_clean_with_qemu(dir.path(), bytes.clone());
    let mut image = Image::open(MemStorage::new(bytes), &OpenOptions::default()).unwrap();
    let mut back = vec![0u8; CLUSTER];
    image.read(64 * CLUSTER as u64, &mut back, None).unwrap();
    assert!(back.iter().all(|&b| b == 0x11));
    image.read(0, &mut back, None).unwrap();
    assert!(back.iter().all(|&b| b == 0x33));
}
