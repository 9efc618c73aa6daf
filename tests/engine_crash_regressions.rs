//! Bugs the crash-consistency harness (tests/crash) found in the engine, as engine tests:
//! - KB1: after a crash that kept refcounts of clusters past the end of the file (the zero
//!   reserve's refcount block reached the file, the write that extends it did not), every
//!   allocating write failed ("past the end of the file has a refcount");
//! - KB2: write_back wrote the refcount table entries of several new refcount blocks with no
//!   ordering point between them, while the blocks' own counts live in one of them: a crash
//!   could keep an entry whose block is counted 0 (corruption).

#[path = "engine_support.rs"]
mod support;

use qcow2b::engine::{CheckFix, Image, MemStorage, OpenOptions};
use support::*;

#[test]
fn kb1_counted_clusters_past_the_end_of_the_file_are_skipped() {
    // A 512-byte-cluster image (header, reftable, refblock, L1): the refcount block counts
    // clusters 0..256. Count clusters 4..8 as if a reserve top-up reached the file but the
    // file extension did not.
    let mut bytes = build_image(9, 1 << 20, 3);
    let len = bytes.len();
    assert_eq!(len, 4 * 512);
    for c in 4..8 {
        bytes[2 * 512 + 2 * c + 1] = 1;
    }
    let mut image = Image::open(MemStorage::new(bytes), &OpenOptions::default()).unwrap();
    let data = vec![0x5au8; 64 << 10];
    image.write(0, &data, None).unwrap();
    image.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    image.read(0, &mut back, None).unwrap();
    assert_eq!(back, data);
    let report = image.check(CheckFix::None).unwrap();
    assert_eq!(report.corruptions, 0, "{:?}", report.messages);
    let bytes = image.close().unwrap().into_inner();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kb1.qcow2");
    std::fs::write(&path, bytes).unwrap();
    // The four clusters are leaks now that the file reaches over them (exit 3), never
    // corruption (exit 2).
    let (code, _) = qemu_img_check_json(&path);
    assert!(code == 0 || code == 3, "qemu-img check exited {code}");
}

#[test]
fn kb2_a_refcount_table_entry_is_written_after_the_entry_of_the_block_that_counts_it() {
    // 512-byte clusters, 16-bit refcounts: a block counts 256 clusters. Writing 1 MiB at once
    // needs several new refcount blocks in one write-back.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, 512, 64 << 20, None);
    let start = std::fs::read(&path).unwrap();
    let mut image = Image::open(LogStorage::new(start.clone()), &OpenOptions::default()).unwrap();
    for i in 0..4u64 {
        image.write(i << 20, &vec![1u8; 1 << 20], None).unwrap();
    }
    image.flush().unwrap();
    let reftable = image.header().refcount_table_offset;
    let reftable_len = u64::from(image.header().refcount_table_clusters) * 512;
    let events = image.storage().events.take();

    // Replay: `ordered` is the file as of the last barrier. Every refcount table entry
    // written must name a block whose own count is reachable there (or the block itself).
    let mut ordered = start.clone();
    let mut now = start;
    let mut checked = 0;
    let be64 =
        |b: &[u8], at: u64| u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap());
    for e in &events {
        match e {
            LogEvent::Barrier => ordered = now.clone(),
            LogEvent::Write(offset, data) => {
                let end = offset + data.len() as u64;
                if now.len() < end as usize {
                    now.resize(end as usize, 0);
                }
                now[*offset as usize..end as usize].copy_from_slice(data);
                if *offset >= reftable && end <= reftable + reftable_len && data.len() == 8 {
                    let index = (offset - reftable) / 8;
                    let block = be64(data, 0);
                    if block == 0 {
                        continue;
                    }
                    let counter = (block / 512) / 256;
                    if counter != index {
                        let entry_at = reftable + counter * 8;
                        let there = ordered.len() >= (entry_at + 8) as usize
                            && be64(&ordered, entry_at) != 0;
                        assert!(
                            there,
                            "entry {index} (block at {block:#x}) was written before the entry \
                             {counter} of the block that counts it was ordered"
                        );
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(
        checked >= 4,
        "the workload should write several new entries ({checked})"
    );
}
