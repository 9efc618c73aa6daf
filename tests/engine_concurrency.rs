//! Requests in three steps (plan, data step, finish) interleaved the way the QEMU glue runs
//! them when many requests are in flight: what one request plans stays right while others
//! plan, write and finish around it.

#[path = "engine_support.rs"]
mod support;

use qcow2b::engine::image::dataio::{SliceSource, SliceTarget};
use qcow2b::engine::{Image, Mapping, MemStorage, OpenOptions, WritePiece, WritePlan};
use support::*;

const CLUSTER: u64 = 65536;

fn fresh_image(size: u64) -> Image<MemStorage> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, CLUSTER, size, None);
    Image::open(
        MemStorage::new(std::fs::read(&path).unwrap()),
        &OpenOptions::default(),
    )
    .unwrap()
}

/// The data step of a write plan, from `data`.
fn write_data(image: &Image<MemStorage>, plan: &WritePlan, data: &[u8]) {
    let mut source = SliceSource {
        buf: data,
        storage: image.storage(),
    };
    image.data_context(None).write(plan, &mut source).unwrap();
}

fn read(image: &mut Image<MemStorage>, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    image.read(offset, &mut buf, None).unwrap();
    buf
}

fn host_offset_of(image: &mut Image<MemStorage>, guest_offset: u64) -> Option<u64> {
    match image.map(guest_offset, 1).unwrap().0 {
        Mapping::Data { host_offset } => Some(host_offset),
        _ => None,
    }
}

/// Closes the image and runs the system's `qemu-img check` on what it left.
fn assert_clean(image: Image<MemStorage>) {
    let storage = image.close().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.qcow2");
    std::fs::write(&path, storage.into_inner()).unwrap();
    qemu_img_check(&path);
}

#[test]
fn a_second_write_to_a_cluster_being_allocated_waits_then_writes_in_place() {
    let mut image = fresh_image(16 << 20);
    let first = image
        .plan_write(0, 4096)
        .unwrap()
        .expect("nothing in flight");
    assert!(image.write_conflicts(8192, 4096));
    assert!(image.plan_write(8192, 4096).unwrap().is_none(), "must wait");
    assert!(
        !image.write_conflicts(CLUSTER, 4096),
        "other clusters are free to go"
    );

    write_data(&image, &first, &[1u8; 4096]);
    image.finish_write(first).unwrap();
    let second = image
        .plan_write(8192, 4096)
        .unwrap()
        .expect("allocation finished");
    assert!(
        matches!(second.pieces[..], [WritePiece::InPlace { .. }]),
        "the cluster is allocated now: {:?}",
        second.pieces
    );
    write_data(&image, &second, &[2u8; 4096]);
    image.finish_write(second).unwrap();

    let got = read(&mut image, 0, 12288);
    assert_eq!(&got[..4096], &[1u8; 4096][..]);
    assert_eq!(&got[4096..8192], &[0u8; 4096][..]);
    assert_eq!(&got[8192..], &[2u8; 4096][..]);
    assert_clean(image);
}

#[test]
fn allocations_finishing_out_of_order_each_keep_their_data() {
    let mut image = fresh_image(64 << 20);
    let plans: Vec<(u64, WritePlan)> = (0..8u64)
        .map(|i| {
            let offset = i * 3 * CLUSTER + 512;
            (offset, image.plan_write(offset, 100_000).unwrap().unwrap())
        })
        .collect();
    for (i, (_, plan)) in plans.iter().enumerate().rev() {
        write_data(&image, plan, &vec![i as u8 + 1; 100_000]);
    }
    for (_, plan) in plans.into_iter().rev() {
        image.finish_write(plan).unwrap();
    }
    for i in 0..8u64 {
        let offset = i * 3 * CLUSTER + 512;
        assert_eq!(
            read(&mut image, offset, 100_000),
            vec![i as u8 + 1; 100_000]
        );
        assert_eq!(read(&mut image, offset - 512, 512), vec![0u8; 512]);
    }
    assert_clean(image);
}

#[test]
fn a_freed_cluster_is_not_reused_while_a_read_planned_before_the_free_is_in_flight() {
    let mut image = fresh_image(16 << 20);
    image.write(0, &vec![7u8; CLUSTER as usize], None).unwrap();
    image.flush().unwrap();
    let old_host = host_offset_of(&mut image, 0).unwrap();

    // A read is planned, then the guest discards the cluster and flushes while the read's
    // data step has not run yet.
    let plan = image.plan_read(0, CLUSTER).unwrap();
    image.discard(0, CLUSTER).unwrap();
    image.flush().unwrap();
    image
        .write(CLUSTER, &vec![9u8; CLUSTER as usize], None)
        .unwrap();
    let new_host = host_offset_of(&mut image, CLUSTER).unwrap();
    assert_ne!(new_host, old_host, "reused under an in-flight read");

    // The read still returns what was there when it was planned.
    let mut buf = vec![0u8; CLUSTER as usize];
    let mut target = SliceTarget {
        buf: &mut buf,
        storage: image.storage(),
        backing: None,
    };
    image.data_context(None).read(&plan, &mut target).unwrap();
    image.finish_read(plan);
    assert_eq!(buf, vec![7u8; CLUSTER as usize]);

    // Once the read finished and a flush passed, the cluster is free for reuse again.
    image.flush().unwrap();
    image
        .write(2 * CLUSTER, &vec![3u8; CLUSTER as usize], None)
        .unwrap();
    assert_eq!(host_offset_of(&mut image, 2 * CLUSTER), Some(old_host));
    assert_clean(image);
}

#[test]
fn an_aborted_write_gives_its_clusters_back_and_changes_nothing() {
    let mut image = fresh_image(16 << 20);
    image.write(0, &[5u8; 4096], None).unwrap();
    let plan = image.plan_write(CLUSTER, 3 * CLUSTER).unwrap().unwrap();
    image.abort_write(plan);
    assert!(!image.has_writes_in_flight());
    assert_eq!(
        read(&mut image, CLUSTER, 3 * CLUSTER as usize),
        vec![0u8; 3 * CLUSTER as usize]
    );
    assert_eq!(host_offset_of(&mut image, CLUSTER), None);
    assert_clean(image);
}

#[test]
fn a_large_write_to_fresh_clusters_is_one_contiguous_allocation() {
    let mut image = fresh_image(64 << 20);
    let plan = image
        .plan_write(CLUSTER / 2, 16 * CLUSTER)
        .unwrap()
        .unwrap();
    match plan.pieces[..] {
        [WritePiece::Allocate {
            clusters,
            head,
            tail,
            len,
            ..
        }] => {
            assert_eq!(clusters, 17);
            assert_eq!(head.len as u64, CLUSTER / 2);
            assert_eq!(tail.len as u64, CLUSTER / 2);
            assert_eq!(len as u64, 16 * CLUSTER);
        }
        ref other => panic!("expected one allocation, got {other:?}"),
    }
    let data: Vec<u8> = (0..16 * CLUSTER).map(|i| (i % 251) as u8).collect();
    write_data(&image, &plan, &data);
    image.finish_write(plan).unwrap();
    assert_eq!(read(&mut image, CLUSTER / 2, data.len()), data);
    assert_eq!(
        read(&mut image, 0, (CLUSTER / 2) as usize),
        vec![0u8; (CLUSTER / 2) as usize]
    );
    assert_clean(image);
}

#[test]
fn a_write_over_mixed_clusters_goes_in_place_where_it_can() {
    let mut image = fresh_image(16 << 20);
    image
        .write(CLUSTER, &vec![1u8; CLUSTER as usize], None)
        .unwrap();
    image.flush().unwrap();
    let plan = image.plan_write(0, 3 * CLUSTER).unwrap().unwrap();
    let kinds: Vec<&str> = plan
        .pieces
        .iter()
        .map(|p| match p {
            WritePiece::InPlace { .. } => "in place",
            WritePiece::Allocate { .. } => "allocate",
        })
        .collect();
    assert_eq!(kinds, ["allocate", "in place", "allocate"]);
    write_data(&image, &plan, &vec![4u8; 3 * CLUSTER as usize]);
    image.finish_write(plan).unwrap();
    assert_eq!(
        read(&mut image, 0, 3 * CLUSTER as usize),
        vec![4u8; 3 * CLUSTER as usize]
    );
    assert_clean(image);
}
