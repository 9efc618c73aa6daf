//! The debug events (QEMU's blkdebug names, `engine::DebugEvent`) the engine announces to its
//! storage before each metadata write, table load, data access and ordering point, recorded
//! by MemStorage. blkdebug turns them into injected errors and breakpoints in the iotests
//! (tests/qemu-iotests/); here: each kind of write is announced, once per write, right before
//! it, and every ordering point is a `barrier` event.

#[path = "engine_support.rs"]
mod support;

use std::io;

use qcow2b::engine::{Backing, DebugEvent, Image, MemStorage, OpenOptions};
use support::*;
use DebugEvent::*;

fn image_of(cluster_size: u64, size: u64) -> Image<MemStorage> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, cluster_size, size, None);
    reopen_bytes(std::fs::read(&path).unwrap())
}

fn reopen_bytes(bytes: Vec<u8>) -> Image<MemStorage> {
    Image::open(MemStorage::new(bytes), &OpenOptions::default()).unwrap()
}

fn reopen(image: Image<MemStorage>) -> Image<MemStorage> {
    reopen_bytes(image.close().unwrap().into_inner())
}

/// The events so far, and forget them.
fn take_events(image: &Image<MemStorage>) -> Vec<DebugEvent> {
    std::mem::take(&mut *image.storage().events.borrow_mut())
}

fn count(events: &[DebugEvent], event: DebugEvent) -> usize {
    events.iter().filter(|&&e| e == event).count()
}

/// Whether `wanted` appears in `events` in this order (not necessarily adjacent).
fn in_order(events: &[DebugEvent], wanted: &[DebugEvent]) -> bool {
    let mut rest = events.iter();
    wanted.iter().all(|w| rest.any(|e| e == w))
}

#[test]
fn a_first_write_and_flush_announce_the_allocation_the_data_and_each_table_write() {
    let mut image = image_of(65536, 1 << 30);
    take_events(&image);
    image.write(0, &[0x5a; 65536], None).unwrap();
    image.flush().unwrap();
    let events = take_events(&image);
    assert!(
        in_order(
            &events,
            &[
                ClusterAlloc,
                ClusterAllocSpace,
                WriteAio,
                L2AllocWrite,
                L2Update,
                L1Update
            ]
        ),
        "{events:?}"
    );
    assert_eq!(count(&events, L2Update), 1, "{events:?}");
    assert_eq!(count(&events, L1Update), 1, "{events:?}");
    assert_eq!(count(&events, WriteAio), 1, "{events:?}");
    // The new table's write is announced as both, alloc first, as QEMU's l2_allocate does.
    let alloc = events.iter().position(|&e| e == L2AllocWrite).unwrap();
    assert_eq!(events[alloc + 1], L2Update);
    assert_eq!(
        count(&events, Barrier) as u64,
        image.counters().ordering_points,
        "{events:?}"
    );
}

#[test]
fn every_new_l2_table_and_l1_entry_write_is_announced_once() {
    let mut image = image_of(65536, 8 << 30);
    for region in 0..16u64 {
        image.write(region << 29, &[1; 4096], None).unwrap();
    }
    take_events(&image);
    image.flush().unwrap();
    let events = take_events(&image);
    assert_eq!(count(&events, L2AllocWrite), 16, "{events:?}");
    assert_eq!(count(&events, L2Update), 16, "{events:?}");
    assert_eq!(count(&events, L1Update), 16, "{events:?}");
    // Rewriting a table that exists is an update, not an allocation.
    image.write(4096, &[2; 4096], None).unwrap();
    image.write(65536, &[3; 4096], None).unwrap();
    image.flush().unwrap();
    let events = take_events(&image);
    assert_eq!(count(&events, L2AllocWrite), 0, "{events:?}");
    assert_eq!(count(&events, L2Update), 1, "{events:?}");
    assert_eq!(count(&events, L1Update), 0, "{events:?}");
}

#[test]
fn new_refcount_blocks_and_refcount_table_growth_are_announced() {
    // 512-byte clusters with 16-bit refcounts: a refcount block covers 128 KiB, a one-cluster
    // refcount table 64 blocks (8 MiB).
    let mut image = image_of(512, 64 << 20);
    take_events(&image);
    image.write(0, &vec![7u8; 1 << 20], None).unwrap();
    image.flush().unwrap();
    let events = take_events(&image);
    assert!(
        in_order(
            &events,
            &[
                RefblockAlloc,
                RefblockAllocWrite,
                RefblockUpdatePart,
                RefblockAllocHookup
            ]
        ),
        "{events:?}"
    );
    assert!(
        count(&events, RefblockUpdatePart) >= count(&events, RefblockAllocWrite),
        "{events:?}"
    );
    // Past 8 MiB of file, the refcount table must grow.
    image.write(1 << 20, &vec![8u8; 12 << 20], None).unwrap();
    image.flush().unwrap();
    let events = take_events(&image);
    assert!(
        in_order(
            &events,
            &[
                ReftableGrow,
                RefblockAllocWriteBlocks,
                RefblockAllocWriteTable,
                Barrier,
                RefblockAllocSwitchTable,
                Barrier
            ]
        ),
        "{events:?}"
    );
    let mut back = vec![0u8; 4096];
    image.read(12 << 20, &mut back, None).unwrap();
    assert_eq!(back, vec![8u8; 4096]);
}

#[test]
fn growing_the_l1_table_is_announced_step_by_step() {
    let mut image = image_of(65536, 1 << 20);
    image.write(0, &[9; 4096], None).unwrap();
    take_events(&image);
    image.truncate(64 << 30).unwrap();
    let events = take_events(&image);
    assert!(
        in_order(
            &events,
            &[
                L1GrowAllocTable,
                L1GrowWriteTable,
                Barrier,
                L1GrowActivateTable
            ]
        ),
        "{events:?}"
    );
}

#[test]
fn loads_reads_frees_and_copy_on_write_are_announced() {
    let mut image = image_of(65536, 64 << 20);
    image.write(0, &[1; 65536], None).unwrap();
    image.write(65536, &[2; 65536], None).unwrap();
    let mut image = reopen(image);
    let events = take_events(&image);
    assert_eq!(events.first(), Some(&ReftableLoad), "{events:?}");

    let mut buf = [0u8; 4096];
    image.read(0, &mut buf, None).unwrap();
    assert_eq!(take_events(&image), vec![L2Load, ReadAio]);

    // A partial write over a backing file reads the rest of the cluster from it.
    struct Pattern;
    impl Backing for Pattern {
        fn read_at(&self, _offset: u64, buf: &mut [u8]) -> io::Result<()> {
            buf.fill(0x42);
            Ok(())
        }
    }
    image.write(4 << 20, &[3; 512], Some(&Pattern)).unwrap();
    let events = take_events(&image);
    assert!(
        in_order(&events, &[CowRead, CowWrite, WriteAio]),
        "{events:?}"
    );
    image.read(4 << 20, &mut buf, Some(&Pattern)).unwrap();
    assert_eq!(&buf[..512], &[3; 512]);
    assert_eq!(&buf[512..], &[0x42; 4096 - 512]);
    image.read(8 << 20, &mut buf, Some(&Pattern)).unwrap();
    assert!(take_events(&image).contains(&ReadBackingAio));

    // Freed clusters: their refcounts drop after the entries (write-back stage 5).
    image.discard(0, 65536).unwrap();
    image.flush().unwrap();
    let events = take_events(&image);
    assert!(in_order(&events, &[L2Update, ClusterFree]), "{events:?}");
}

/// A backing file whose byte at guest offset `o` is `o / 512 % 251`, recording every read.
struct Recording(std::cell::RefCell<Vec<(u64, usize)>>);

impl Backing for Recording {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.borrow_mut().push((offset, buf.len()));
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((offset + i as u64) / 512 % 251) as u8;
        }
        Ok(())
    }
}

#[test]
fn a_write_inside_a_cluster_over_a_backing_file_reads_both_fills_in_one_read() {
    let mut image = image_of(65536, 64 << 20);
    let backing = Recording(Default::default());
    let cluster = 3 << 16;
    image
        .write(cluster + 8192, &[0xee; 4096], Some(&backing))
        .unwrap();
    // The head [0, 8 KiB) and the tail [12 KiB, 64 KiB) of the cluster: one read of it all.
    assert_eq!(*backing.0.borrow(), vec![(cluster, 65536)]);
    let events = take_events(&image);
    assert_eq!(count(&events, CowRead), 1, "{events:?}");

    let mut buf = vec![0u8; 65536];
    let reads = Recording(Default::default());
    image.read(cluster, &mut buf, Some(&reads)).unwrap();
    assert!(reads.0.borrow().is_empty(), "the cluster is allocated now");
    for (i, &b) in buf.iter().enumerate() {
        let want = if (8192..12288).contains(&i) {
            0xee
        } else {
            ((cluster + i as u64) / 512 % 251) as u8
        };
        assert_eq!(b, want, "byte {i} of the cluster");
    }

    // A write at the start of a cluster has only a tail: one read of the tail alone.
    backing.0.borrow_mut().clear();
    image.write(5 << 16, &[0xdd; 4096], Some(&backing)).unwrap();
    assert_eq!(*backing.0.borrow(), vec![((5 << 16) + 4096, 65536 - 4096)]);
}

#[test]
fn copying_a_shared_l2_table_is_announced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.qcow2");
    qemu_img_create(&path, 65536, 64 << 20, None);
    qemu_io(&path, &["write -P 0x11 0 64k"]);
    run_ok(
        std::process::Command::new("qemu-img")
            .args(["snapshot", "-c", "s1"])
            .arg(&path),
    );
    let mut image = reopen_bytes(std::fs::read(&path).unwrap());
    take_events(&image);
    image.write(0, &[0x22; 4096], None).unwrap();
    let events = take_events(&image);
    assert!(in_order(&events, &[L2AllocCowRead, WriteAio]), "{events:?}");
    let mut buf = [0u8; 65536];
    image.read(0, &mut buf, None).unwrap();
    assert_eq!(&buf[..4096], &[0x22; 4096]);
    assert_eq!(&buf[4096..], &[0x11; 65536 - 4096]);
}
