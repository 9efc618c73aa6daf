//! Reads and writes against QEMU's own qcow2: images made by `qemu-img`/`qemu-io` read back
//! right through the engine, and what the engine writes reads back right in QEMU, with
//! `qemu-img check` clean. The differential test applies the same random writes to an image
//! and to a plain byte vector.

#[path = "engine_support.rs"]
mod support;

use std::cell::RefCell;
use std::fs::File;
use std::path::Path;

use qcow2b::engine::{Backing, Image, Mapping, OpenOptions};
use support::*;

fn rw(l2_cache_bytes: Option<u64>) -> OpenOptions {
    OpenOptions {
        read_only: false,
        l2_cache_bytes,
        ..Default::default()
    }
}

fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..Default::default()
    }
}

/// Opens `path` read-only as the backing of another image.
fn backing_of(path: &Path) -> ImageBacking<File> {
    ImageBacking(RefCell::new(open_file(path, &ro())))
}

fn read_all(image: &mut Image<File>, backing: Option<&dyn Backing>) -> Vec<u8> {
    let mut buf = vec![0u8; image.virtual_size() as usize];
    image.read(0, &mut buf, backing).unwrap();
    buf
}

#[track_caller]
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        let end = i + got[i..]
            .iter()
            .zip(&want[i..])
            .take_while(|(a, b)| a != b)
            .count();
        panic!(
            "{what}: first difference at {i}, through {end}: got {} want {}",
            got[i], want[i]
        );
    }
}

/// One differential run: random writes (sizes and alignments from one byte to several
/// clusters), reads and flushes through the engine and on a Vec model, several sessions with
/// a reopen between them; then QEMU checks and compares the result.
fn differential(cluster_size: u64, with_backing: bool, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    let raw = dir.path().join("model.raw");
    let size: u64 = match cluster_size {
        512 => 2 << 20,
        4096 => 8 << 20,
        _ => 16 << 20,
    } + 7 * 512; // not a multiple of the cluster size (qemu-img rounds to 512)
    let mut model = vec![0u8; size as usize];

    let base = dir.path().join("base.qcow2");
    if with_backing {
        // Smaller than the overlay: past its end the overlay reads zeros.
        let base_size = size * 3 / 4;
        qemu_img_create(&base, 65536, base_size, None);
        qemu_io(
            &base,
            &[
                "write -P 0x11 0 100k",
                &format!("write -P 0x22 {} 300k", cluster_size * 5 + 512),
                &format!("write -P 0x33 {} 64k", base_size - 65536),
            ],
        );
        let content = qemu_img_to_raw(&base, &dir.path().join("base.raw"));
        model[..content.len()].copy_from_slice(&content);
    }
    qemu_img_create(
        &img,
        cluster_size,
        size,
        with_backing.then_some(base.as_path()),
    );
    let backing = with_backing.then(|| backing_of(&base));
    let backing_ref = backing.as_ref().map(|b| b as &dyn Backing);

    let mut rng = XorShift::new(seed);
    for session in 0..3 {
        // Small caches in some sessions, so evictions write back mid-sequence.
        let l2_cache = if session == 1 {
            Some(2 * cluster_size)
        } else {
            None
        };
        let mut image = open_file(&img, &rw(l2_cache));
        for _ in 0..150 {
            let offset = match rng.below(4) {
                0 => rng.below(size / cluster_size) * cluster_size,
                1 => rng.below(size / 512) * 512,
                _ => rng.below(size),
            };
            let len = match rng.below(6) {
                0 => 1 + rng.below(16),
                1 => 512,
                2 => cluster_size,
                3 => cluster_size + 1 + rng.below(cluster_size),
                4 => 1 + rng.below(4 * cluster_size),
                _ => 3 * cluster_size + 7,
            }
            .min(size - offset);
            let range = offset as usize..(offset + len) as usize;
            match rng.below(12) {
                0 => {
                    image
                        .write_zeroes(offset, len, rng.below(2) == 0, backing_ref)
                        .unwrap();
                    model[range].fill(0);
                }
                1 => {
                    // Whole clusters inside the range (or up to the end of the image) read as
                    // zeros afterwards, even where the backing file showed through.
                    image.discard(offset, len).unwrap();
                    let first = offset.div_ceil(cluster_size);
                    let end = if offset + len == size {
                        size.div_ceil(cluster_size)
                    } else {
                        (offset + len) / cluster_size
                    };
                    for c in first..end.max(first) {
                        let start = (c * cluster_size) as usize;
                        let stop = (start + cluster_size as usize).min(size as usize);
                        model[start..stop].fill(0);
                    }
                }
                _ => {
                    let mut data = vec![0u8; len as usize];
                    rng.fill(&mut data);
                    image.write(offset, &data, backing_ref).unwrap();
                    model[range].copy_from_slice(&data);
                }
            }
            match rng.below(10) {
                0 => image.flush().unwrap(),
                1 => {
                    let off = rng.below(size);
                    let n = (1 + rng.below(3 * cluster_size)).min(size - off) as usize;
                    let mut buf = vec![0u8; n];
                    image.read(off, &mut buf, backing_ref).unwrap();
                    assert!(
                        buf == model[off as usize..off as usize + n],
                        "read at {off} len {n}"
                    );
                }
                _ => {}
            }
        }
        assert_same(
            &read_all(&mut image, backing_ref),
            &model,
            &format!("session {session} before close"),
        );
        image.close().unwrap();
        qemu_img_check(&img);
    }
    let mut image = open_file(&img, &ro());
    assert_same(&read_all(&mut image, backing_ref), &model, "after reopen");
    std::fs::write(&raw, &model).unwrap();
    qemu_img_compare_raw(&img, &raw);
}

#[test]
fn differential_512_byte_clusters() {
    differential(512, false, 1);
}

#[test]
fn differential_512_byte_clusters_with_backing() {
    differential(512, true, 2);
}

#[test]
fn differential_4k_clusters() {
    differential(4096, false, 3);
}

#[test]
fn differential_4k_clusters_with_backing() {
    differential(4096, true, 4);
}

#[test]
fn differential_64k_clusters() {
    differential(65536, false, 5);
}

#[test]
fn differential_64k_clusters_with_backing() {
    differential(65536, true, 6);
}

#[test]
fn qemu_written_pattern_reads_back_and_engine_writes_read_back_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    qemu_img_create(&img, 65536, 4 << 20, None);
    qemu_io(&img, &["write -P 0x5a 0 128k", "write -P 0x6b 1M 4k"]);

    let mut image = open_file(&img, &rw(None));
    let mut buf = vec![0u8; 128 << 10];
    image.read(0, &mut buf, None).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    let mut buf = vec![0u8; 8192];
    image.read((1 << 20) - 4096, &mut buf, None).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0) && buf[4096..].iter().all(|&b| b == 0x6b));

    // In place (allocated cluster), partial into a fresh cluster, and across clusters.
    image.write(65536, &[0xa5; 4096], None).unwrap();
    image.write(3 << 20, &[0xc3; 1000], None).unwrap();
    image.write((2 << 20) - 512, &[0x3c; 70000], None).unwrap();
    image.close().unwrap();

    qemu_img_check(&img);
    qemu_io(
        &img,
        &[
            "read -P 0x5a 0 64k",
            "read -P 0xa5 64k 4k",
            "read -P 0x5a 68k 60k",
            "read -P 0x6b 1M 4k",
            "read -P 0xc3 3M 1000",
            "read -P 0 3146728 64536",
            "read -P 0x3c 2096640 70000",
        ],
    );
}

#[test]
fn header_encode_reproduces_what_qemu_img_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let img = dir.path().join("img.qcow2");
    qemu_img_create(&base, 65536, 1 << 20, None);
    qemu_img_create(&img, 65536, 1 << 20, Some(&base));
    let bytes = std::fs::read(&img).unwrap();
    let header = qcow2b::engine::format::header::Header::parse(&bytes[..65536]).unwrap();
    assert_eq!(header.backing_format.as_deref(), Some(&b"qcow2"[..]));
    assert!(!header.feature_names.is_empty());
    assert!(header.encode().unwrap() == bytes[..65536]);
}

#[test]
fn map_reports_runs_like_qemu_allocates_them() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    qemu_img_create(&img, 65536, 4 << 20, None);
    qemu_io(&img, &["write -P 1 0 192k", "write -z 256k 128k"]);
    let mut image = open_file(&img, &ro());
    let (m, n) = image.map(4096, 1 << 20).unwrap();
    assert!(
        matches!(m, Mapping::Data { host_offset } if host_offset % 65536 == 4096),
        "{m:?}"
    );
    assert_eq!(n, (192 << 10) - 4096);
    assert_eq!(
        image.map(192 << 10, 1 << 20).unwrap(),
        (Mapping::Unallocated, 64 << 10)
    );
    assert_eq!(
        image.map(256 << 10, 1 << 20).unwrap(),
        (Mapping::Zero { host_offset: None }, 128 << 10)
    );
    assert_eq!(
        image.map(384 << 10, 10).unwrap(),
        (Mapping::Unallocated, 10)
    );
    assert_eq!(
        image.map((4 << 20) - 1, 100).unwrap(),
        (Mapping::Unallocated, 1)
    );
}

#[test]
fn zero_flagged_clusters_read_as_zeros_and_take_writes() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let img = dir.path().join("img.qcow2");
    qemu_img_create(&base, 65536, 1 << 20, None);
    qemu_io(&base, &["write -P 0x77 0 1M"]);
    qemu_img_create(&img, 65536, 1 << 20, Some(&base));
    // 0..128k: zero flag without a host cluster; 128k..256k: allocated then zeroed in place
    // (zero flag with a preallocated host cluster).
    qemu_io(
        &img,
        &[
            "write -z 0 128k",
            "write -P 0x12 128k 128k",
            "write -z 128k 128k",
        ],
    );
    let backing = backing_of(&base);
    let mut image = open_file(&img, &rw(None));
    let mut buf = vec![0xffu8; 256 << 10];
    image.read(0, &mut buf, Some(&backing)).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "zero clusters do not read the backing file"
    );
    image.write(1000, &[9; 10], Some(&backing)).unwrap();
    image
        .write((128 << 10) + 1000, &[8; 10], Some(&backing))
        .unwrap();
    image.close().unwrap();
    qemu_img_check(&img);
    qemu_io(
        &img,
        &[
            "read -P 0 0 1000",
            "read -P 9 1000 10",
            "read -P 0 1010 130062",
            "read -P 8 132072 10",
            "read -P 0 132082 130062",
            "read -P 0x77 256k 768k",
        ],
    );
}

#[test]
fn writes_copy_clusters_shared_with_an_internal_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    qemu_img_create(&img, 4096, 1 << 20, None);
    qemu_io(&img, &["write -P 0x41 0 1M"]);
    run_ok(
        std::process::Command::new("qemu-img")
            .args(["snapshot", "-c", "snap"])
            .arg(&img),
    );

    let mut image = open_file(&img, &rw(None));
    image.write(100, &[0x42; 5000], None).unwrap();
    image.write(512 << 10, &[0x43; 4096], None).unwrap();
    image.flush().unwrap();
    // A second write to the copied cluster goes in place.
    image.write(200, &[0x44; 10], None).unwrap();
    image.close().unwrap();
    qemu_img_check(&img);
    qemu_io(
        &img,
        &[
            "read -P 0x41 0 100",
            "read -P 0x42 100 100",
            "read -P 0x44 200 10",
            "read -P 0x42 210 4890",
        ],
    );
    qemu_io(&img, &["read -P 0x43 512k 4k", "read -P 0x41 516k 508k"]);
    // The snapshot still holds the old content.
    let snap_raw = dir.path().join("snap.raw");
    run_ok(
        std::process::Command::new("qemu-img")
            .args([
                "convert",
                "-f",
                "qcow2",
                "-l",
                "snapshot.name=snap",
                "-O",
                "raw",
            ])
            .arg(&img)
            .arg(&snap_raw),
    );
    assert!(std::fs::read(&snap_raw).unwrap().iter().all(|&b| b == 0x41));
}

fn compressed_clusters(compression_type: &str) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    qemu_img_create_with(
        &img,
        &format!("compression_type={compression_type}"),
        "1M",
        None,
    );
    // Several compressed clusters, some sharing host clusters.
    qemu_io(
        &img,
        &[
            "write -c -P 0x61 0 64k",
            "write -c -P 0x62 64k 64k",
            "write -c -P 0x63 128k 64k",
        ],
    );
    let mut image = open_file(&img, &rw(None));
    assert_eq!(image.map(0, 1 << 20).unwrap(), (Mapping::Compressed, 65536));
    let mut buf = vec![0u8; 3 * 65536];
    image.read(0, &mut buf, None).unwrap();
    for (i, chunk) in buf.chunks(65536).enumerate() {
        assert!(chunk.iter().all(|&b| b == 0x61 + i as u8), "cluster {i}");
    }
    // Writing into a compressed cluster copies it to a new, uncompressed one.
    image.write(65536 + 100, &[0x70; 10], None).unwrap();
    image.write(0, &[0x71; 65536], None).unwrap();
    image.close().unwrap();
    qemu_img_check(&img);
    qemu_io(
        &img,
        &[
            "read -P 0x71 0 64k",
            "read -P 0x62 64k 100",
            "read -P 0x70 65636 10",
            "read -P 0x62 65646 65426",
            "read -P 0x63 128k 64k",
        ],
    );
}

#[test]
fn zlib_compressed_clusters_read_and_copy_on_write() {
    compressed_clusters("zlib");
}

#[test]
fn zstd_compressed_clusters_read_and_copy_on_write() {
    compressed_clusters("zstd");
}

#[test]
fn refcount_table_grows_when_the_file_outgrows_it() {
    // 512-byte clusters with 64-bit refcounts: one refcount block covers 64 clusters and the
    // one-cluster table 64 blocks (2 MiB of file); writing 6 MiB needs the table to grow
    // (twice).
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    let raw = dir.path().join("model.raw");
    qemu_img_create_with(&img, "cluster_size=512,refcount_bits=64", "6M", None);
    let mut model = vec![0u8; 6 << 20];
    let mut rng = XorShift::new(77);
    rng.fill(&mut model);
    let mut image = open_file(&img, &rw(None));
    let table_before = image.header().refcount_table_offset;
    for (i, chunk) in model.chunks(40_000).enumerate() {
        image.write(i as u64 * 40_000, chunk, None).unwrap();
        if i % 7 == 0 {
            image.flush().unwrap();
        }
    }
    assert_same(&read_all(&mut image, None), &model, "before close");
    assert_ne!(image.header().refcount_table_offset, table_before);
    image.close().unwrap();
    qemu_img_check(&img);
    std::fs::write(&raw, &model).unwrap();
    qemu_img_compare_raw(&img, &raw);
}

#[test]
fn write_zeroes_and_discard_are_seen_by_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let img = dir.path().join("img.qcow2");
    qemu_img_create(&base, 65536, 1 << 20, None);
    qemu_io(&base, &["write -P 0x77 0 1M"]);
    qemu_img_create(&img, 65536, 1 << 20, Some(&base));
    let backing = backing_of(&base);
    let b = Some(&backing as &dyn Backing);
    let mut image = open_file(&img, &rw(None));
    image.write(0, &vec![0x12; 512 << 10], b).unwrap();
    image.flush().unwrap();
    image.write_zeroes(64 << 10, 128 << 10, true, b).unwrap();
    image.write_zeroes(200 << 10, 100 << 10, false, b).unwrap();
    image.discard(320 << 10, 100 << 10).unwrap();
    image.discard(600 << 10, 100 << 10).unwrap();
    assert_eq!(
        image.map(64 << 10, 1 << 20).unwrap(),
        (Mapping::Zero { host_offset: None }, 128 << 10)
    );
    assert_eq!(
        image.map(320 << 10, 1 << 20).unwrap(),
        (Mapping::Zero { host_offset: None }, 64 << 10)
    );
    assert_eq!(
        image.map(576 << 10, 1 << 20).unwrap(),
        (Mapping::Unallocated, 448 << 10)
    );
    image.close().unwrap();
    qemu_img_check(&img);
    qemu_io(
        &img,
        &[
            "read -P 0x12 0 64k",
            "read -P 0 64k 128k",
            "read -P 0x12 192k 8k",
            "read -P 0 200k 100k",
            "read -P 0x12 300k 20k",
            "read -P 0 320k 64k",
            "read -P 0x12 384k 128k",
            "read -P 0x77 512k 512k",
        ],
    );
    // Unmapped clusters were freed: the file holds fewer clusters than were written.
    let info = run_ok(
        std::process::Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&img),
    );
    assert!(info.contains("No errors"), "{info}");
}

#[test]
fn discard_on_a_v2_image_unallocates() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    qemu_img_create_with(&img, "compat=0.10", "1M", None);
    let mut image = open_file(&img, &rw(None));
    image.write(0, &vec![0x12; 256 << 10], None).unwrap();
    image.write_zeroes(0, 64 << 10, true, None).unwrap();
    image.discard(64 << 10, 64 << 10).unwrap();
    assert_eq!(
        image.map(64 << 10, 1 << 20).unwrap(),
        (Mapping::Unallocated, 64 << 10)
    );
    image.close().unwrap();
    qemu_img_check(&img);
    qemu_io(&img, &["read -P 0 0 128k", "read -P 0x12 128k 128k"]);
}

/// `qemu-img commit` empties the committed image: afterwards every cluster (data, zero,
/// preallocated zero, in both L2 tables) is unallocated, the backing file shows through, and
/// the host clusters are freed without a leak.
#[test]
fn make_empty_unallocates_every_cluster_and_frees_them() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let img = dir.path().join("img.qcow2");
    // 4 KiB clusters: one L2 table covers 2 MiB, so 4 MiB needs two.
    qemu_img_create(&base, 4096, 4 << 20, None);
    qemu_io(&base, &["write -P 0x77 0 4M"]);
    qemu_img_create(&img, 4096, 4 << 20, Some(&base));
    let backing = backing_of(&base);
    let b = Some(&backing as &dyn Backing);
    let mut image = open_file(&img, &rw(None));
    image.write(0, &vec![0x12; 64 << 10], b).unwrap();
    image.write((3 << 20) + 100, &[0x34; 9000], b).unwrap();
    image.write_zeroes(1 << 20, 16 << 10, true, b).unwrap();
    image.write_zeroes(8 << 10, 8 << 10, false, b).unwrap();
    image.flush().unwrap();

    image.make_empty().unwrap();
    assert_eq!(
        image.map(0, 4 << 20).unwrap(),
        (Mapping::Unallocated, 4 << 20)
    );
    image.close().unwrap();

    let (code, report) = qemu_img_check_json(&img);
    assert_eq!(code, 0, "{report:?}");
    assert_eq!(report.u64_or_0("allocated-clusters"), 0, "{report:?}");
    qemu_io(&img, &["read -P 0x77 0 4M"]);
}

fn virtual_size_per_qemu(img: &Path) -> u64 {
    let info = run_ok(
        std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(img),
    );
    let at = info.rfind("\"virtual-size\":").unwrap() + "\"virtual-size\":".len();
    info[at..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn truncate_grows_the_disk_and_the_l1_table() {
    for (cluster_opts, new_size) in [
        ("cluster_size=65536", 100u64 << 30),
        ("cluster_size=65536", 2 << 20),
        ("cluster_size=512,refcount_bits=64", 64 << 20),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img.qcow2");
        qemu_img_create_with(&img, cluster_opts, "1M", None);
        qemu_io(&img, &["write -P 0x31 0 1M"]);
        let mut image = open_file(&img, &rw(None));
        assert!(matches!(
            image.truncate(512 << 10),
            Err(qcow2b::engine::Error::Unsupported(_))
        ));
        image.truncate(new_size).unwrap();
        assert_eq!(image.virtual_size(), new_size);
        image
            .write(new_size - 70_000, &[0x32; 70_000], None)
            .unwrap();
        image.write(1 << 20, &[0x33; 3000], None).unwrap();
        let mut buf = vec![0u8; 4096];
        image.read((1 << 20) - 1024, &mut buf, None).unwrap();
        assert!(buf[..1024].iter().all(|&b| b == 0x31));
        assert!(buf[1024..4024].iter().all(|&b| b == 0x33));
        assert!(buf[4024..].iter().all(|&b| b == 0));
        image.close().unwrap();
        qemu_img_check(&img);
        assert_eq!(virtual_size_per_qemu(&img), new_size, "{cluster_opts}");
        qemu_io(
            &img,
            &[
                "read -P 0x31 0 1M",
                &format!("read -P 0x33 {} 3000", 1 << 20),
                &format!("read -P 0x32 {} 70000", new_size - 70_000),
            ],
        );
    }
}

#[test]
fn a_version_2_image_with_snapshots_is_not_resized() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("v2.qcow2");
    qemu_img_create_with(&img, "compat=0.10", "1M", None);
    run_ok(
        std::process::Command::new("qemu-img")
            .args(["snapshot", "-c", "s"])
            .arg(&img),
    );
    let mut image = open_file(&img, &rw(None));
    let err = image.truncate(2 << 20).unwrap_err();
    assert!(
        err.to_string()
            .contains("Can't resize a v2 image which has snapshots"),
        "{err}"
    );
    assert_eq!(image.virtual_size(), 1 << 20);
}

/// `qemu-img rebase` and block jobs name another backing file through
/// `Image::change_backing_file` (the glue's bdrv_change_backing_file): it once failed with
/// "Operation not supported", so every rebase of a qcow2b image did.
#[test]
fn change_backing_file_rewrites_the_header_as_qemu_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new, img) = (
        dir.path().join("old.qcow2"),
        dir.path().join("new.qcow2"),
        dir.path().join("img.qcow2"),
    );
    qemu_img_create(&old, 65536, 1 << 20, None);
    qemu_img_create(&new, 65536, 1 << 20, None);
    qemu_io(&new, &["write -P 0x33 0 64k"]);
    qemu_img_create(&img, 65536, 1 << 20, Some(&old));
    qemu_io(&img, &["write -P 0x44 64k 64k"]);

    let mut image = open_file(&img, &rw(None));
    assert!(image.change_backing_file(None, Some(b"qcow2")).is_err());
    image
        .change_backing_file(Some(new.as_os_str().as_encoded_bytes()), Some(b"qcow2"))
        .unwrap();
    assert_eq!(
        image.backing_file(),
        Some(new.as_os_str().as_encoded_bytes())
    );
    assert_eq!(image.backing_format(), Some(&b"qcow2"[..]));
    image.close().unwrap();
    qemu_img_check(&img);
    // QEMU reads the new backing file's data through the image, and the image's own.
    qemu_io(&img, &["read -P 0x33 0 64k", "read -P 0x44 64k 64k"]);

    let mut image = open_file(&img, &rw(None));
    image.change_backing_file(None, None).unwrap();
    image.close().unwrap();
    qemu_img_check(&img);
    qemu_io(&img, &["read -P 0 0 64k", "read -P 0x44 64k 64k"]);
}

/// QEMU's qcow2 puts a fresh image's first L2 table before the first data cluster; qcow2b
/// allocates in the same order, so the iotests that poke QEMU's offsets (060) meet the same
/// tables.
#[test]
fn a_first_write_lays_out_the_l2_table_then_the_data_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, 65536, 1 << 30, None);
    let mut image = open_file(&path, &rw(None));
    image.write(0, &[0x5a; 65536], None).unwrap();
    image.write(512 << 20, &[0x5b; 65536], None).unwrap();
    image.close().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    let mask = 0x00ff_ffff_ffff_fe00;
    let l1 = be64(40) as usize;
    let l2 = (be64(l1) & mask) as usize;
    let second_l2 = (be64(l1 + 8) & mask) as usize;
    assert_eq!(l2, 0x40000);
    assert_eq!(be64(l2) & mask, 0x50000);
    assert_eq!(second_l2, 0x60000);
    assert_eq!(be64(second_l2) & mask, 0x70000);
}

/// Before a migration QEMU inactivates the node and the other side opens the image: the
/// unused zero reserve must not stay counted (it was, as leaked clusters, after every
/// migration), and nothing may be left to write at the close that follows.
#[test]
fn hand_over_leaves_the_image_clean_for_another_process_while_it_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, 65536, 1 << 30, None);
    let mut image = open_file(&path, &rw(None));
    image.write(0, &[0x5a; 65536], None).unwrap();
    image.write(512 << 20, &[0x5b; 4096], None).unwrap();
    image.hand_over().unwrap();
    // The other side: a clean image (no leaks) with the data.
    qemu_img_check(&path);
    qemu_io(&path, &["read -P 0x5a 0 64k", "read -P 0x5b 512M 4k"]);
    // This side is dropped without a close (QEMU closes an inactive node without writing).
    drop(image);
    qemu_img_check(&path);
}

/// The writes that reached the file inside the host cluster at `start`: (offset, length).
fn data_writes_in(events: &[LogEvent], start: u64, cluster: u64) -> Vec<(u64, usize)> {
    events
        .iter()
        .filter_map(|e| match e {
            LogEvent::Write(offset, data) if *offset >= start && *offset < start + cluster => {
                Some((*offset, data.len()))
            }
            _ => None,
        })
        .collect()
}

fn host_cluster_of(image: &mut Image<LogStorage>, guest_offset: u64, cluster: u64) -> u64 {
    match image.map(guest_offset, 1).unwrap().0 {
        Mapping::Data { host_offset } => host_offset & !(cluster - 1),
        other => panic!("guest offset {guest_offset:#x} maps to {other:?}"),
    }
}

#[test]
fn a_small_write_into_a_cluster_freed_in_the_middle_of_the_file_writes_the_zeros_around_it() {
    // A cluster freed by a discard still holds its old bytes: when a new guest cluster reuses
    // it, the parts the guest did not write are written as zeros, never left as they were.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let cluster = 64 << 10;
    qemu_img_create(&path, cluster, 64 << 20, None);
    let start = std::fs::read(&path).unwrap();
    let mut image = Image::open(LogStorage::new(start), &OpenOptions::default()).unwrap();
    image
        .write(0, &vec![0xee; 4 * cluster as usize], None)
        .unwrap();
    image.flush().unwrap();
    let freed = host_cluster_of(&mut image, cluster, cluster);
    image.discard(cluster, cluster).unwrap();
    image.flush().unwrap();
    image.flush().unwrap();
    image.storage().events.take();
    // A new guest cluster far away: its host cluster is the freed one (reused first).
    let guest = 32 * cluster + 8192;
    image.write(guest, &[0x5a; 4096], None).unwrap();
    image.flush().unwrap();
    let host = host_cluster_of(&mut image, guest, cluster);
    assert_eq!(host, freed, "the freed cluster is reused");
    let events = image.storage().events.take();
    let written: usize = data_writes_in(&events, host, cluster)
        .iter()
        .map(|w| w.1)
        .sum();
    assert_eq!(
        written, cluster as usize,
        "the whole reused cluster is written"
    );
    let mut back = vec![1u8; cluster as usize];
    image.read(guest & !(cluster - 1), &mut back, None).unwrap();
    assert!(
        back[..8192].iter().all(|&b| b == 0),
        "no old bytes before the write"
    );
    assert!(
        back[8192 + 4096..].iter().all(|&b| b == 0),
        "no old bytes after it"
    );
}

#[test]
fn a_small_write_into_a_new_cluster_past_everything_written_writes_only_its_own_bytes() {
    // A host cluster past everything the file ever held reads as zeros already: only the
    // guest's bytes are written (QEMU's qcow2 writes them plus one write_zeroes). The freed
    // cluster above is the case where the zeros must be written.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let cluster = 64 << 10;
    qemu_img_create(&path, cluster, 64 << 20, None);
    let start = std::fs::read(&path).unwrap();
    let mut image = Image::open(LogStorage::new(start), &OpenOptions::default()).unwrap();
    let mut guests = Vec::new();
    for i in 0..40u64 {
        // Every write starts a new guest cluster, 8 KiB into it: a head and a tail.
        let guest = i * 3 * cluster + 8192;
        image.write(guest, &[0x5a; 4096], None).unwrap();
        guests.push(guest);
    }
    image.flush().unwrap();
    let events = image.storage().events.take();
    for &guest in &guests {
        let host = host_cluster_of(&mut image, guest, cluster);
        // The zero reserve extends the file with one zero sector at the end of each batch
        // of clusters it counts; that sector may fall in this cluster.
        let writes: Vec<_> = data_writes_in(&events, host, cluster)
            .into_iter()
            .filter(|&w| w != (host + cluster - 512, 512))
            .collect();
        assert_eq!(
            writes,
            vec![(host + 8192, 4096)],
            "guest {guest:#x}: only the request's bytes reach host cluster {host:#x}"
        );
        let mut back = vec![1u8; cluster as usize];
        image.read(guest & !(cluster - 1), &mut back, None).unwrap();
        assert!(back[..8192].iter().all(|&b| b == 0), "zeros before");
        assert!(back[8192..12288].iter().all(|&b| b == 0x5a), "the data");
        assert!(back[12288..].iter().all(|&b| b == 0), "zeros after");
    }
    let bytes = image.close().unwrap().inner.into_inner();
    let img = dir.path().join("after.qcow2");
    std::fs::write(&img, bytes).unwrap();
    qemu_img_check(&img);
    for &guest in &guests {
        let head = guest & !(cluster - 1);
        qemu_io(
            &img,
            &[
                &format!("read -P 0 {head} 8k"),
                &format!("read -P 0x5a {guest} 4k"),
                &format!("read -P 0 {} {}", guest + 4096, cluster - 12288),
            ],
        );
    }
}
