//! Compressed writes (`src/engine/image/compressed.rs`): clusters compressed as QEMU's qcow2
//! compresses them (zlib: raw deflate with a 4 KiB window; zstd), packed at byte granularity
//! into shared host clusters whose refcounts count every compressed cluster touching them,
//! and read back identically by the system's QEMU (`qemu-img compare`, clean `qemu-img
//! check`).

#[path = "engine_support.rs"]
mod support;

use std::fs::File;
use std::path::Path;
use std::process::Command;

use qcow2b::engine::format::header::CompressionType;
use qcow2b::engine::{create, CheckFix, CreateOptions, Image, OpenOptions, TxgOptions};
use support::*;

const K: u64 = 1024;

fn rw() -> OpenOptions {
    OpenOptions::default()
}

/// A new image file made by the engine.
fn new_image(path: &Path, size: u64, cluster_size: u64, tune: impl FnOnce(&mut CreateOptions)) {
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    let mut o = CreateOptions::new(size);
    o.cluster_size_bytes = cluster_size;
    tune(&mut o);
    create(&file, &o).unwrap();
}

/// Guest data that compresses: a small alphabet, runs and text, different per cluster.
fn compressible(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = XorShift::new(seed);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        match rng.below(4) {
            0 => out.extend(std::iter::repeat_n(
                rng.below(256) as u8,
                rng.below(300) as usize,
            )),
            1 => out.extend_from_slice(b"qcow2b compressed cluster, packed at byte granularity; "),
            2 => out.extend((0..rng.below(200)).map(|_| b'a' + rng.below(4) as u8)),
            _ => out.extend((0..rng.below(64)).map(|_| rng.below(256) as u8)),
        }
    }
    out.truncate(len);
    out
}

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    XorShift::new(seed).fill(&mut out);
    out
}

/// The raw L2 entry of guest cluster `guest_cluster` (standard entries; first L2 table).
fn l2_entry(path: &Path, guest_cluster: u64) -> u64 {
    let l1_offset = file_be64(path, 40);
    let l2_offset = file_be64(path, l1_offset) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2_offset, 0, "no L2 table");
    file_be64(path, l2_offset + 8 * guest_cluster)
}

/// (host offset, more sectors) of a compressed entry, None for any other.
fn compressed_at(entry: u64, cluster_bits: u32) -> Option<(u64, u64)> {
    if entry & (1 << 62) == 0 {
        return None;
    }
    let x = 62 - (cluster_bits - 8);
    Some((entry & ((1 << x) - 1), (entry & ((1 << 62) - 1)) >> x))
}

/// The refcount of a host cluster as the file holds it (16-bit refcounts).
fn refcount_on_file(path: &Path, cluster_bits: u32, host_cluster: u64) -> u64 {
    let reftable = file_be64(path, 48);
    let per_block = (1u64 << cluster_bits) / 2;
    let block = file_be64(path, reftable + 8 * (host_cluster / per_block)) & !0x1ff;
    assert_ne!(block, 0);
    let mut b = [0u8; 2];
    use std::os::unix::fs::FileExt;
    File::open(path)
        .unwrap()
        .read_exact_at(&mut b, block + 2 * (host_cluster % per_block))
        .unwrap();
    u64::from(u16::from_be_bytes(b))
}

/// QEMU 10.0 reads the image as `expected` and finds it clean; returns its compressed
/// cluster count.
fn qemu_reads(path: &Path, expected: &[u8]) -> u64 {
    let raw = path.with_extension("raw");
    std::fs::write(&raw, expected).unwrap();
    qemu_img_compare_raw(path, &raw);
    let (code, report) = qemu_img_check_json(path);
    assert_eq!(code, 0, "qemu-img check of {}", path.display());
    report.u64_or_0("compressed-clusters")
}

fn engine_check_clean(path: &Path) {
    let mut image = open_file(path, &rw());
    let report = image.check(CheckFix::None).unwrap();
    assert!(report.is_clean(), "{report:?}");
    image.close().unwrap();
}

#[test]
fn compressed_clusters_round_trip_through_qemu_for_both_types_and_cluster_sizes() {
    let dir = tempfile::tempdir().unwrap();
    for kind in [CompressionType::Zlib, CompressionType::Zstd] {
        for cluster_size in [4 * K, 64 * K, 2048 * K] {
            let clusters = 6;
            let size = cluster_size * (clusters + 2);
            let path = dir.path().join(format!("{kind:?}-{cluster_size}.qcow2"));
            new_image(&path, size, cluster_size, |o| o.compression_type = kind);
            let data = compressible((cluster_size * clusters) as usize, cluster_size);
            let mut image = open_file(&path, &rw());
            image.write_compressed(cluster_size, &data, None).unwrap();
            let mut got = vec![0u8; data.len()];
            image.read(cluster_size, &mut got, None).unwrap();
            assert!(got == data, "{kind:?} {cluster_size}: engine read differs");
            image.close().unwrap();

            let mut expected = vec![0u8; size as usize];
            expected[cluster_size as usize..][..data.len()].copy_from_slice(&data);
            assert_eq!(
                qemu_reads(&path, &expected),
                clusters,
                "{kind:?} {cluster_size}"
            );
            engine_check_clean(&path);
        }
    }
}

#[test]
fn the_system_zstd_tool_decodes_the_frames() {
    if Command::new("zstd").arg("--version").output().is_err() {
        eprintln!("zstd tool missing: QEMU's read back in the other tests covers the frames");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("z.qcow2");
    let cluster_size = 64 * K;
    new_image(&path, 4 * cluster_size, cluster_size, |o| {
        o.compression_type = CompressionType::Zstd
    });
    let data = compressible(cluster_size as usize, 7);
    let mut image = open_file(&path, &rw());
    image.write_compressed(0, &data, None).unwrap();
    image.close().unwrap();
    let (offset, _) = compressed_at(l2_entry(&path, 0), 16).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    // The frame ends where the file does (one compressed cluster, last written).
    let frame = dir.path().join("c.zst");
    std::fs::write(&frame, &bytes[offset as usize..]).unwrap();
    let out = run(Command::new("zstd").args(["-d", "-c", "-q"]).arg(&frame));
    assert!(out.stdout.len() >= data.len(), "{out:?}");
    assert!(out.stdout[..data.len()] == data[..]);
}

#[test]
fn consecutive_compressed_clusters_share_host_clusters_counted_per_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pack.qcow2");
    let (cluster_bits, cluster_size) = (12u32, 4 * K);
    new_image(&path, 64 * cluster_size, cluster_size, |_| {});
    let clusters = 24u64;
    let data = compressible((clusters * cluster_size) as usize, 3);
    let mut image = open_file(&path, &rw());
    image.write_compressed(0, &data, None).unwrap();
    image.close().unwrap();

    let mut touching = std::collections::BTreeMap::<u64, u64>::new();
    let mut last_end = None;
    for c in 0..clusters {
        let (offset, more) = compressed_at(l2_entry(&path, c), cluster_bits)
            .unwrap_or_else(|| panic!("cluster {c} not compressed"));
        // Each starts in the last 512-byte sector of the one before (byte granular).
        if let Some(end) = last_end {
            assert!(
                offset <= end && offset + 512 > end,
                "cluster {c} at {offset:#x}"
            );
        }
        // The descriptor covers up to the end of its last sector, which lies in the host
        // cluster of the data's last byte (clusters are whole sectors).
        let end = (offset / 512 + more + 1) * 512;
        last_end = Some(end);
        for host in offset >> cluster_bits..=(end - 1) >> cluster_bits {
            *touching.entry(host).or_default() += 1;
        }
    }
    // Packed: fewer host clusters than compressed clusters (the negative control: one host
    // cluster each would make these equal).
    assert!(
        (touching.len() as u64) < clusters / 2,
        "{} host clusters",
        touching.len()
    );
    for (&host, &count) in &touching {
        // One reference per compressed cluster touching the host cluster.
        assert_eq!(
            refcount_on_file(&path, cluster_bits, host),
            count,
            "host cluster {host}"
        );
    }
    assert!(touching.values().any(|&n| n > 2));
    assert_eq!(
        qemu_reads(&path, &data_padded(&data, 64 * cluster_size)),
        clusters
    );
    engine_check_clean(&path);
}

fn data_padded(data: &[u8], size: u64) -> Vec<u8> {
    let mut v = data.to_vec();
    v.resize(size as usize, 0);
    v
}

#[test]
fn overwriting_compressed_clusters_frees_their_share_of_the_host_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("free.qcow2");
    let (cluster_bits, cluster_size) = (16u32, 64 * K);
    let size = 16 * cluster_size;
    new_image(&path, size, cluster_size, |_| {});
    // Three clusters of runs: each compresses to a few hundred bytes, all in one host cluster.
    let data: Vec<u8> = (0..3 * cluster_size).map(|i| (i / 4096) as u8).collect();
    let mut image = open_file(&path, &rw());
    image.write_compressed(0, &data, None).unwrap();
    image.flush().unwrap();
    let host = compressed_at(l2_entry(&path, 0), cluster_bits).unwrap().0 >> cluster_bits;
    for c in 1..3 {
        let (offset, _) = compressed_at(l2_entry(&path, c), cluster_bits).unwrap();
        assert_eq!(offset >> cluster_bits, host);
    }
    assert_eq!(refcount_on_file(&path, cluster_bits, host), 3);

    // A compressed write never overwrites (QEMU: EIO), and changes nothing.
    let err = image.write_compressed(0, &data[..cluster_size as usize], None);
    assert_eq!(err.unwrap_err().errno(), libc::EIO);

    // An ordinary write over the middle one: copied out, its share freed after the flush.
    let mut expected = data_padded(&data, size);
    let new = vec![0x5au8; 4096];
    image.write(cluster_size + 4096, &new, None).unwrap();
    expected[(cluster_size + 4096) as usize..][..4096].copy_from_slice(&new);
    assert!(compressed_at(l2_entry(&path, 1), cluster_bits).is_some());
    image.flush().unwrap();
    assert!(compressed_at(l2_entry(&path, 1), cluster_bits).is_none());
    assert_eq!(refcount_on_file(&path, cluster_bits, host), 2);

    // Discards of the other two: the host cluster is free.
    image.discard(0, cluster_size).unwrap();
    image.discard(2 * cluster_size, cluster_size).unwrap();
    expected[..cluster_size as usize].fill(0);
    expected[2 * cluster_size as usize..3 * cluster_size as usize].fill(0);
    image.flush().unwrap();
    assert_eq!(refcount_on_file(&path, cluster_bits, host), 0);

    // The next compressed cluster does not go into the freed host cluster's old tail.
    let more = compressible(cluster_size as usize, 11);
    image
        .write_compressed(8 * cluster_size, &more, None)
        .unwrap();
    expected[8 * cluster_size as usize..][..more.len()].copy_from_slice(&more);
    image.close().unwrap();
    let (offset, _) = compressed_at(l2_entry(&path, 8), cluster_bits).unwrap();
    assert_eq!(
        offset % cluster_size,
        0,
        "a fresh host cluster at {offset:#x}"
    );
    assert_eq!(qemu_reads(&path, &expected), 1);
    engine_check_clean(&path);
}

#[test]
fn incompressible_clusters_are_written_as_ordinary_clusters() {
    let dir = tempfile::tempdir().unwrap();
    for kind in [CompressionType::Zlib, CompressionType::Zstd] {
        let path = dir.path().join(format!("noise-{kind:?}.qcow2"));
        let (cluster_bits, cluster_size) = (16u32, 64 * K);
        let size = 8 * cluster_size;
        new_image(&path, size, cluster_size, |o| o.compression_type = kind);
        let mut data = compressible(cluster_size as usize, 1);
        data.extend(noise(cluster_size as usize, 2));
        data.extend(compressible(cluster_size as usize, 3));
        let mut image = open_file(&path, &rw());
        image.write_compressed(0, &data, None).unwrap();
        image.close().unwrap();
        assert!(compressed_at(l2_entry(&path, 0), cluster_bits).is_some());
        let plain = l2_entry(&path, 1);
        assert!(
            compressed_at(plain, cluster_bits).is_none() && plain & 0x00ff_ffff_ffff_fe00 != 0,
            "{kind:?}: the noise cluster is a data cluster ({plain:#x})"
        );
        assert!(compressed_at(l2_entry(&path, 2), cluster_bits).is_some());
        assert_eq!(qemu_reads(&path, &data_padded(&data, size)), 2, "{kind:?}");
        engine_check_clean(&path);
    }
}

#[test]
fn the_short_last_cluster_is_padded_and_partial_clusters_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("short.qcow2");
    let cluster_size = 64 * K;
    let size = 3 * cluster_size + 4 * K;
    new_image(&path, size, cluster_size, |_| {});
    let mut image = open_file(&path, &rw());
    // Not whole clusters: EINVAL, as QEMU.
    assert_eq!(
        image
            .write_compressed(4 * K, &[1u8; 4096], None)
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
    assert_eq!(
        image
            .write_compressed(0, &vec![1u8; 4096], None)
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
    let data = compressible((cluster_size + 4 * K) as usize, 5);
    image
        .write_compressed(2 * cluster_size, &data, None)
        .unwrap();
    image.end_compressed_stream().unwrap();
    image.close().unwrap();
    let mut expected = vec![0u8; size as usize];
    expected[2 * cluster_size as usize..].copy_from_slice(&data);
    assert_eq!(qemu_reads(&path, &expected), 2);
    assert_eq!(std::fs::metadata(&path).unwrap().len() % 512, 0);
    engine_check_clean(&path);
}

#[test]
fn extended_l2_images_take_compressed_clusters_with_an_empty_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ext.qcow2");
    let cluster_size = 64 * K;
    let size = 8 * cluster_size;
    new_image(&path, size, cluster_size, |o| o.extended_l2 = true);
    let data = compressible(3 * cluster_size as usize, 9);
    let mut image = open_file(&path, &rw());
    // A zeroed subcluster first: a cluster without a host cluster takes compression.
    image.write_zeroes(0, 2 * K, false, None).unwrap();
    image.write_compressed(0, &data, None).unwrap();
    image.close().unwrap();
    let l1 = file_be64(&path, 40);
    let l2 = file_be64(&path, l1) & 0x00ff_ffff_ffff_fe00;
    for c in 0..3 {
        assert!(compressed_at(file_be64(&path, l2 + 16 * c), 16).is_some());
        assert_eq!(
            file_be64(&path, l2 + 16 * c + 8),
            0,
            "bitmap of cluster {c}"
        );
    }
    assert_eq!(qemu_reads(&path, &data_padded(&data, size)), 3);
    engine_check_clean(&path);
}

#[test]
fn compressed_writes_in_transaction_groups_commit_with_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("txg.qcow2");
    let cluster_size = 4 * K;
    let size = 256 * cluster_size;
    new_image(&path, size, cluster_size, |_| {});
    let mut expected = vec![0u8; size as usize];
    let opts = OpenOptions {
        txg: Some(TxgOptions::default()),
        ..OpenOptions::default()
    };
    let mut rng = XorShift::new(42);
    for session in 0..3u64 {
        let mut image = open_file(&path, &opts);
        for step in 0..40u64 {
            let cluster = rng.below(256);
            let at = cluster * cluster_size;
            let free = compressed_or_free(&mut image, cluster);
            match rng.below(4) {
                0 | 1 if free => {
                    let data = compressible(cluster_size as usize, session * 100 + step);
                    image.write_compressed(at, &data, None).unwrap();
                    expected[at as usize..][..data.len()].copy_from_slice(&data);
                }
                2 => {
                    let data = noise(1024, step);
                    image.write(at + 512, &data, None).unwrap();
                    expected[(at + 512) as usize..][..1024].copy_from_slice(&data);
                }
                _ => image.barrier().unwrap(),
            }
            if step % 13 == 12 {
                image.flush().unwrap();
            }
        }
        let mut got = vec![0u8; size as usize];
        image.read(0, &mut got, None).unwrap();
        assert!(got == expected, "session {session}: read differs");
        image.close().unwrap();
    }
    qemu_reads(&path, &expected);
    engine_check_clean(&path);
}

/// Whether guest cluster `cluster` names no host cluster yet (a compressed write may go).
fn compressed_or_free(image: &mut Image<File>, cluster: u64) -> bool {
    let cs = image.cluster_size();
    matches!(
        image.map(cluster * cs, cs).unwrap().0,
        qcow2b::engine::Mapping::Unallocated | qcow2b::engine::Mapping::Zero { host_offset: None }
    )
}

#[test]
fn one_bit_refcounts_give_each_compressed_cluster_its_own_host_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rc1.qcow2");
    let (cluster_bits, cluster_size) = (16u32, 64 * K);
    let size = 8 * cluster_size;
    new_image(&path, size, cluster_size, |o| o.refcount_bits = 1);
    let data = compressible(4 * cluster_size as usize, 13);
    let mut image = open_file(&path, &rw());
    image.write_compressed(0, &data, None).unwrap();
    image.close().unwrap();
    for c in 0..4 {
        let (offset, _) = compressed_at(l2_entry(&path, c), cluster_bits).unwrap();
        assert_eq!(offset % cluster_size, 0, "cluster {c} at {offset:#x}");
    }
    assert_eq!(qemu_reads(&path, &data_padded(&data, size)), 4);
}

#[test]
fn qemu_reads_compressed_clusters_written_among_ordinary_writes_and_reopens() {
    // Compressed clusters of an image QEMU wrote too: the engine packs after its own data
    // only, and both read everything back.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.qcow2");
    let cluster_size = 64 * K;
    let size = 32 * cluster_size;
    qemu_img_create(&path, cluster_size, size, None);
    qemu_io(
        &path,
        &["write -c -P 0x11 0 128k", "write -P 0x22 128k 64k"],
    );
    let mut expected = vec![0u8; size as usize];
    expected[..128 * 1024].fill(0x11);
    expected[128 * 1024..192 * 1024].fill(0x22);
    for round in 0..3u64 {
        let mut image = open_file(&path, &rw());
        let at = (4 + round * 5) * cluster_size;
        let data = compressible(3 * cluster_size as usize, round);
        image.write_compressed(at, &data, None).unwrap();
        expected[at as usize..][..data.len()].copy_from_slice(&data);
        let plain = noise(8 * K as usize, round);
        let plain_at = at + 3 * cluster_size + 512;
        image.write(plain_at, &plain, None).unwrap();
        expected[plain_at as usize..][..plain.len()].copy_from_slice(&plain);
        image.close().unwrap();
    }
    assert_eq!(qemu_reads(&path, &expected), 2 + 9);
    engine_check_clean(&path);
}

#[test]
fn external_data_files_and_encryption_refuse_compression() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("df.qcow2");
    let data = dir.path().join("df.data");
    qemu_img_create_with(&path, &format!("data_file={}", data.display()), "1M", None);
    let file = File::options().read(true).write(true).open(&path).unwrap();
    let data_file = File::options().read(true).write(true).open(&data).unwrap();
    let mut image = Image::open_with_data_file(file, data_file, &rw()).unwrap();
    let err = image
        .write_compressed(0, &vec![0u8; 64 * K as usize], None)
        .unwrap_err();
    assert_eq!(err.errno(), libc::ENOTSUP, "{err}");
    image.close().unwrap();
}
