//! Image creation and measurement against the system QEMU: images made by
//! `engine::create` pass `qemu-img check`, show their options in `qemu-img info`, take writes
//! from `qemu-io` and from the engine itself; preallocated images map every cluster; invalid
//! options fail with QEMU's own messages; `engine::measure` reports what `qemu-img measure`
//! does.

#[path = "engine_support.rs"]
mod support;

use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use qcow2b::engine::create::{Compat, CreateEncryption, Preallocation};
use qcow2b::engine::format::header::CompressionType;
use qcow2b::engine::{create, measure, Backing, CreateOptions, Error, Measure, OpenOptions};
use support::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

fn create_file(path: &Path, opts: &CreateOptions) -> Result<(), Error> {
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap();
    create(&file, opts)
}

fn opts(size_bytes: u64) -> CreateOptions {
    CreateOptions::new(size_bytes)
}

fn with(size_bytes: u64, f: impl FnOnce(&mut CreateOptions)) -> CreateOptions {
    let mut o = opts(size_bytes);
    f(&mut o);
    o
}

/// A value from `qemu-img info --output=json`, found by key at a given indentation (4 for
/// the top level, 12 for format-specific data): strings without quotes, others verbatim.
fn json_value(json: &str, key: &str, indent: usize) -> Option<String> {
    let prefix = format!("{}\"{key}\": ", " ".repeat(indent));
    let line = json.lines().find(|l| l.starts_with(&prefix))?;
    let value = line[prefix.len()..].trim_end_matches(',');
    Some(value.trim_matches('"').to_owned())
}

fn qemu_img_info(path: &Path) -> String {
    run_ok(
        Command::new("qemu-img")
            .args(["info", "-U", "--output=json", "-f", "qcow2"])
            .arg(path),
    )
}

/// One extent of `qemu-img map --output=json`.
#[derive(Debug)]
struct Extent {
    start: u64,
    length: u64,
    data: bool,
    zero: bool,
    offset: Option<u64>,
}

fn map_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!("\"{key}\": "))? + key.len() + 4;
    let rest = &line[at..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

fn qemu_img_map(path: &Path) -> Vec<Extent> {
    let text = run_ok(
        Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "qcow2"])
            .arg(path),
    );
    text.lines()
        .filter(|l| l.contains("\"start\""))
        .map(|l| Extent {
            start: map_field(l, "start").unwrap().parse().unwrap(),
            length: map_field(l, "length").unwrap().parse().unwrap(),
            data: map_field(l, "data") == Some("true"),
            zero: map_field(l, "zero") == Some("true"),
            offset: map_field(l, "offset").map(|o| o.parse().unwrap()),
        })
        .collect()
}

/// What `qemu-img info` should show for an image created with `o`.
#[track_caller]
fn assert_info_matches(path: &Path, o: &CreateOptions) {
    let info = qemu_img_info(path);
    let top = |key| json_value(&info, key, 4);
    let specific = |key| json_value(&info, key, 12);
    let size = o.size_bytes.next_multiple_of(512);
    assert_eq!(top("virtual-size"), Some(size.to_string()), "{info}");
    assert_eq!(
        top("cluster-size"),
        Some(o.cluster_size_bytes.to_string()),
        "{info}"
    );
    assert_eq!(specific("compat").as_deref(), Some(o.compat.as_str()));
    assert_eq!(
        specific("refcount-bits"),
        Some(o.refcount_bits.to_string()),
        "{info}"
    );
    let compression = match o.compression_type {
        CompressionType::Zlib => "zlib",
        CompressionType::Zstd => "zstd",
    };
    assert_eq!(specific("compression-type").as_deref(), Some(compression));
    if o.compat == Compat::V3 {
        assert_eq!(
            specific("lazy-refcounts"),
            Some(o.lazy_refcounts.to_string()),
            "{info}"
        );
        assert_eq!(
            specific("extended-l2"),
            Some(o.extended_l2.to_string()),
            "{info}"
        );
    }
    assert_eq!(
        top("backing-filename").map(String::into_bytes),
        o.backing_file,
        "{info}"
    );
    assert_eq!(
        top("backing-filename-format").map(String::into_bytes),
        o.backing_format,
        "{info}"
    );
    assert_eq!(top("dirty-flag").as_deref(), Some("false"));
}

/// Guest offsets to write at: the start, the middle and the last 512 bytes.
fn probe_offsets(size: u64) -> Vec<u64> {
    if size < 512 {
        return Vec::new();
    }
    let mut offsets = vec![0, (size / 2) & !511, size - 512];
    offsets.dedup();
    offsets
}

/// QEMU writes and reads back; the engine opens the image, writes and reads back; QEMU sees
/// the engine's data; `qemu-img check` stays clean throughout.
#[track_caller]
fn assert_usable(path: &Path, o: &CreateOptions, backing: Option<&Path>) {
    let size = o.size_bytes.next_multiple_of(512);
    for (i, &offset) in probe_offsets(size).iter().enumerate() {
        let len = 512u64.min(size - offset);
        let pattern = 0x40 + i;
        qemu_io(
            path,
            &[
                &format!("write -P {pattern} {offset} {len}"),
                &format!("read -P {pattern} {offset} {len}"),
            ],
        );
    }
    qemu_img_check(path);

    let base = backing.map(|b| {
        ImageBacking(RefCell::new(open_file(
            b,
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )))
    });
    let base_ref = base.as_ref().map(|b| b as &dyn Backing);
    let mut image = open_file(path, &OpenOptions::default());
    assert_eq!(image.virtual_size(), size);
    assert_eq!(image.cluster_size(), o.cluster_size_bytes);
    assert_eq!(image.backing_file(), o.backing_file.as_deref());
    assert_eq!(image.backing_format(), o.backing_format.as_deref());
    let mut written = Vec::new();
    let probes = probe_offsets(size);
    for (i, &probe) in probes.iter().enumerate() {
        // From just after the probe, over a cluster boundary, short of the next probe.
        let offset = probe + 100;
        let limit = probes.get(i + 1).copied().unwrap_or(size);
        let len = (3 * o.cluster_size_bytes / 2).min(limit - offset) as usize;
        let data = vec![0x90 + i as u8; len];
        image.write(offset, &data, base_ref).unwrap();
        let mut back = vec![0u8; len];
        image.read(offset, &mut back, base_ref).unwrap();
        assert!(back == data, "engine read back other bytes at {offset}");
        written.push((offset, len, 0x90 + i));
    }
    image.close().unwrap();
    qemu_img_check(path);
    for (offset, len, pattern) in written {
        qemu_io(path, &[&format!("read -P {pattern} {offset} {len}")]);
    }
}

/// Creates the image and runs every check on it.
#[track_caller]
fn create_and_verify(dir: &Path, name: &str, o: &CreateOptions, backing: Option<&Path>) {
    let path = dir.join(name);
    create_file(&path, o).unwrap_or_else(|e| panic!("{name}: {e}"));
    qemu_img_check(&path);
    assert_info_matches(&path, o);
    assert_usable(&path, o, backing);
}

#[test]
fn every_cluster_size_and_refcount_width_makes_a_clean_image() {
    let dir = tempfile::tempdir().unwrap();
    for cluster in [512, 4 * KIB, 64 * KIB, 2 * MIB] {
        for refcount_bits in [1, 16, 64] {
            let o = with(64 * MIB + 7 * 512, |o| {
                o.cluster_size_bytes = cluster;
                o.refcount_bits = refcount_bits;
            });
            let name = format!("c{cluster}-r{refcount_bits}.qcow2");
            create_and_verify(dir.path(), &name, &o, None);
        }
    }
}

#[test]
fn large_l1_tables_with_small_refcounts_need_several_refcount_blocks() {
    let dir = tempfile::tempdir().unwrap();
    // 1 GiB of 512-byte clusters: an L1 table of 512 clusters; 64-bit refcounts count 64
    // clusters per block, so nine blocks.
    let o = with(GIB, |o| {
        o.cluster_size_bytes = 512;
        o.refcount_bits = 64;
    });
    create_and_verify(dir.path(), "many-refblocks.qcow2", &o, None);
}

#[test]
fn version_2_images_are_clean_and_say_compat_0_10() {
    let dir = tempfile::tempdir().unwrap();
    for cluster in [512, 64 * KIB] {
        let o = with(100 * MIB, |o| {
            o.compat = Compat::V2;
            o.cluster_size_bytes = cluster;
        });
        create_and_verify(dir.path(), &format!("v2-{cluster}.qcow2"), &o, None);
    }
}

#[test]
fn lazy_refcounts_and_zstd_show_in_qemu_img_info() {
    let dir = tempfile::tempdir().unwrap();
    let lazy = with(GIB, |o| o.lazy_refcounts = true);
    create_and_verify(dir.path(), "lazy.qcow2", &lazy, None);
    let zstd = with(GIB, |o| o.compression_type = CompressionType::Zstd);
    create_and_verify(dir.path(), "zstd.qcow2", &zstd, None);
    // A compressed write through QEMU uses zstd and reads back.
    let path = dir.path().join("zstd.qcow2");
    qemu_io(&path, &["write -c -P 0x5a 1M 64k", "read -P 0x5a 1M 64k"]);
    qemu_img_check(&path);
    let both = with(GIB, |o| {
        o.lazy_refcounts = true;
        o.compression_type = CompressionType::Zstd;
        o.cluster_size_bytes = 4 * KIB;
    });
    create_and_verify(dir.path(), "lazy-zstd-4k.qcow2", &both, None);
}

#[test]
fn backing_file_and_format_are_recorded_and_read_through() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_img_create(&base, 65536, 12 * MIB, None);
    qemu_io(&base, &["write -P 0x11 0 12M"]);
    let base_name = base.to_str().unwrap().to_owned();

    for (name, compat, format, cluster) in [
        ("v3-fmt.qcow2", Compat::V3, Some("qcow2"), 64 * KIB),
        ("v2-fmt.qcow2", Compat::V2, Some("qcow2"), 64 * KIB),
        ("v3-nofmt.qcow2", Compat::V3, None, 64 * KIB),
        ("v3-fmt-512.qcow2", Compat::V3, Some("qcow2"), 512),
    ] {
        let o = with(16 * MIB, |o| {
            o.compat = compat;
            o.cluster_size_bytes = cluster;
            o.backing_file = Some(base_name.clone().into_bytes());
            o.backing_format = format.map(|f| f.as_bytes().to_vec());
        });
        let path = dir.path().join(name);
        create_file(&path, &o).unwrap();
        qemu_img_check(&path);
        assert_info_matches(&path, &o);
        // Unallocated clusters read the backing file, up to its end; zeros after.
        qemu_io(&path, &["read -P 0x11 0 12M", "read -P 0 12M 4M"]);
        assert_usable(&path, &o, Some(&base));
        // The engine's write at 8M + 100 (1.5 clusters) copied the backing data after it
        // into its last cluster; the next cluster is still the backing file's.
        let end = 8 * MIB + 100 + 3 * cluster / 2;
        let tail = end.next_multiple_of(cluster) - end;
        qemu_io(
            &path,
            &[
                &format!("read -P 0x11 {end} {tail}"),
                &format!("read -P 0x11 {} 512", end + tail),
            ],
        );
    }
}

#[test]
fn sizes_zero_unaligned_and_one_tib_make_clean_images() {
    let dir = tempfile::tempdir().unwrap();
    for (name, size) in [
        ("zero.qcow2", 0),
        ("tiny.qcow2", 1000),
        ("unaligned.qcow2", MIB + 7 * 512 + 3),
        ("one-tib.qcow2", TIB),
    ] {
        create_and_verify(dir.path(), name, &opts(size), None);
    }
    // 1 TiB without preallocation stays small.
    let len = std::fs::metadata(dir.path().join("one-tib.qcow2"))
        .unwrap()
        .len();
    assert!(len < 2 * MIB, "1 TiB image file is {len} bytes");
}

#[test]
fn size_is_rounded_up_to_512_bytes_like_qemu_img_create() {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    create_file(&ours, &opts(1000)).unwrap();
    qemu_img_create_with(&theirs, "", "1000", None);
    let size = |p: &Path| json_value(&qemu_img_info(p), "virtual-size", 4);
    assert_eq!(size(&ours), Some("1024".into()));
    assert_eq!(size(&ours), size(&theirs));
}

/// Everything the guest can address is allocated data at a host offset, reading as zeros.
#[track_caller]
fn assert_fully_mapped(path: &Path, size: u64) {
    let extents = qemu_img_map(path);
    let mut next = 0;
    // (qemu-img map shows one empty extent for an empty image.)
    for e in extents.iter().filter(|e| e.length > 0) {
        assert_eq!(e.start, next, "{extents:?}");
        assert!(e.data && e.offset.is_some(), "not allocated: {e:?}");
        next = e.start + e.length;
    }
    assert_eq!(next, size, "{extents:?}");
    // Reads as zeros: all of it for small images, the start, middle and end of large ones
    // (whose extents the file system reports as holes).
    let chunk = 256 * MIB;
    let reads: Vec<String> = if size <= chunk {
        vec![format!("read -P 0 0 {size}")]
    } else {
        assert!(extents.iter().all(|e| e.zero), "{extents:?}");
        [0, (size / 2) & !511, size - chunk]
            .iter()
            .map(|o| format!("read -P 0 {o} {chunk}"))
            .collect()
    };
    let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
    if size > 0 {
        qemu_io(path, &reads);
    }
}

#[test]
fn metadata_preallocation_maps_every_cluster_and_reads_zeros() {
    let dir = tempfile::tempdir().unwrap();
    for (cluster, refcount_bits, size, compat) in [
        (64 * KIB, 16, 100 * MIB + 512, Compat::V3),
        (512, 1, 8 * MIB + 1536, Compat::V3),
        (4 * KIB, 64, 40 * MIB, Compat::V3),
        (2 * MIB, 16, GIB, Compat::V3),
        (64 * KIB, 16, 32 * MIB, Compat::V2),
    ] {
        let o = with(size, |o| {
            o.cluster_size_bytes = cluster;
            o.refcount_bits = refcount_bits;
            o.compat = compat;
            o.preallocation = Preallocation::Metadata;
        });
        let name = format!("meta-{cluster}-{refcount_bits}-{size}.qcow2");
        let path = dir.path().join(&name);
        create_file(&path, &o).unwrap();
        qemu_img_check(&path);
        assert_info_matches(&path, &o);
        assert_fully_mapped(&path, size);
        // Sparse: the data area takes no space.
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.blocks() * 512 < meta.len() / 2, "{name} is not sparse");
        assert_usable(&path, &o, None);
        // Writes went in place: still one data cluster per guest cluster, nothing leaked.
        assert_fully_mapped_without_growth(&path, &o, meta.len());
    }
}

/// After guest writes, a preallocated image has not grown: every write found its cluster.
#[track_caller]
fn assert_fully_mapped_without_growth(path: &Path, o: &CreateOptions, len_before: u64) {
    let len = std::fs::metadata(path).unwrap().len();
    assert_eq!(
        len, len_before,
        "{o:?}: file grew from {len_before} to {len}"
    );
    for e in qemu_img_map(path).iter().filter(|e| e.length > 0) {
        assert!(e.data, "{o:?}: unallocated after writes: {e:?}");
    }
}

#[test]
fn full_and_falloc_preallocation_allocate_the_data_area() {
    let dir = tempfile::tempdir().unwrap();
    for (prealloc, cluster, size) in [
        (Preallocation::Full, 4 * KIB, 16 * MIB + 512),
        (Preallocation::Full, 64 * KIB, 32 * MIB),
        (Preallocation::Falloc, 64 * KIB, 64 * MIB),
        (Preallocation::Falloc, 512, 4 * MIB),
        (Preallocation::Full, 64 * KIB, 0),
    ] {
        let o = with(size, |o| {
            o.cluster_size_bytes = cluster;
            o.preallocation = prealloc;
        });
        let name = format!("{}-{cluster}-{size}.qcow2", prealloc.as_str());
        let path = dir.path().join(&name);
        create_file(&path, &o).unwrap();
        qemu_img_check(&path);
        assert_info_matches(&path, &o);
        assert_fully_mapped(&path, size);
        let meta = std::fs::metadata(&path).unwrap();
        assert!(
            meta.blocks() * 512 >= size,
            "{name}: only {} bytes allocated for {size} guest bytes",
            meta.blocks() * 512
        );
        assert_usable(&path, &o, None);
        assert_fully_mapped_without_growth(&path, &o, meta.len());
    }
}

#[test]
fn preallocated_file_is_as_long_as_measure_says_and_as_qemu_makes_it() {
    let dir = tempfile::tempdir().unwrap();
    for (cluster, refcount_bits, size) in [
        (64 * KIB, 16u64, 10 * GIB),
        (64 * KIB, 16, MIB + 512),
        (512, 16, 64 * MIB),
        (512, 1, 64 * MIB),
        (4 * KIB, 64, 3 * GIB + 4096),
        (2 * MIB, 8, 5 * GIB),
    ] {
        let o = with(size, |o| {
            o.cluster_size_bytes = cluster;
            o.refcount_bits = refcount_bits as u32;
            o.preallocation = Preallocation::Metadata;
        });
        let ours = dir.path().join("ours.qcow2");
        create_file(&ours, &o).unwrap();
        let len = std::fs::metadata(&ours).unwrap().len();
        assert_eq!(len, measure(&o, None).unwrap().fully_allocated, "{o:?}");

        let theirs = dir.path().join("theirs.qcow2");
        qemu_img_create_with(
            &theirs,
            &format!("cluster_size={cluster},refcount_bits={refcount_bits},preallocation=metadata"),
            &size.to_string(),
            None,
        );
        let qemu_len = std::fs::metadata(&theirs).unwrap().len();
        // QEMU grows its refcount table while it preallocates; where one table cluster is
        // not enough, the clusters of the tables it outgrew stay behind as free holes and its
        // file ends up longer than its own measure says. Without growth, the same length.
        let covered_by_one_reftable_cluster = (cluster / 8) * (cluster * 8 / refcount_bits);
        let one_reftable_cluster = size / cluster < covered_by_one_reftable_cluster;
        if one_reftable_cluster {
            assert_eq!(len, qemu_len, "{o:?}: ours {len}, qemu-img's {qemu_len}");
        } else {
            assert!(len <= qemu_len, "{o:?}: ours {len}, qemu-img's {qemu_len}");
        }
        qemu_img_check(&ours);
        std::fs::remove_file(&ours).unwrap();
        std::fs::remove_file(&theirs).unwrap();
    }
}

#[test]
fn ten_gib_metadata_preallocation_maps_every_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ten-gib.qcow2");
    let o = with(10 * GIB, |o| o.preallocation = Preallocation::Metadata);
    let started = Instant::now();
    create_file(&path, &o).unwrap();
    // Shown, not asserted: speed is the benchmarks' business.
    eprintln!(
        "10 GiB, 64 KiB clusters, preallocation=metadata: {:?}",
        started.elapsed()
    );
    qemu_img_check(&path);
    assert_fully_mapped(&path, 10 * GIB);
}

/// iotest 250: a metadata-preallocated image's data clusters are holes in the file, and the
/// block status must say so (by asking the file) as QEMU's qcow2 does; the image is found by
/// its refcounts naming far more clusters than the file has blocks for.
#[test]
fn metadata_preallocation_is_found_by_referenced_clusters_against_allocated_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let preallocated = dir.path().join("preallocated.qcow2");
    create_file(
        &preallocated,
        &with(256 * MIB, |o| o.preallocation = Preallocation::Metadata),
    )
    .unwrap();
    let blocks_bytes = |path: &Path| std::fs::metadata(path).unwrap().blocks() * 512;
    let file_bytes = |path: &Path| std::fs::metadata(path).unwrap().len();
    let mut image = open_file(&preallocated, &OpenOptions::default());
    assert!(image
        .looks_metadata_preallocated(blocks_bytes(&preallocated))
        .unwrap());
    // The same image with every cluster backed by blocks (a full preallocation, or a guest
    // that wrote everything) is not: its refcounts name what the file holds.
    assert!(!image
        .looks_metadata_preallocated(file_bytes(&preallocated))
        .unwrap());
    drop(image);

    let plain = dir.path().join("plain.qcow2");
    create_file(&plain, &opts(256 * MIB)).unwrap();
    qemu_io(&plain, &["write -P 0x5a 0 4M"]);
    let mut image = open_file(&plain, &OpenOptions::default());
    assert!(!image
        .looks_metadata_preallocated(blocks_bytes(&plain))
        .unwrap());
}

#[test]
fn create_replaces_existing_content() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reused.qcow2");
    std::fs::write(&path, vec![0xee; 3 * MIB as usize]).unwrap();
    let o = opts(GIB);
    create_file(&path, &o).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        3 * 64 * KIB + 16,
        "header, refcount table, refcount block and 2 L1 entries"
    );
    create_and_verify(dir.path(), "reused.qcow2", &o, None);
}

/// Options for which QEMU makes the very same bytes: no preallocation and one refcount
/// block (so QEMU's incremental growth ends where the computed layout does).
#[test]
fn images_without_preallocation_are_byte_identical_to_qemu_img_create() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_img_create(&base, 65536, MIB, None);
    let base_name = base.to_str().unwrap().to_owned();
    let cases: Vec<(CreateOptions, &str)> = vec![
        (opts(GIB), ""),
        (opts(0), ""),
        (opts(MIB + 3), ""),
        (with(GIB, |o| o.compat = Compat::V2), "compat=0.10"),
        (
            with(10 * MIB, |o| o.cluster_size_bytes = 4096),
            "cluster_size=4096",
        ),
        (
            with(100 * MIB, |o| o.cluster_size_bytes = 512),
            "cluster_size=512",
        ),
        (
            with(TIB, |o| o.cluster_size_bytes = 2 * MIB),
            "cluster_size=2M",
        ),
        (with(GIB, |o| o.refcount_bits = 1), "refcount_bits=1"),
        (with(GIB, |o| o.refcount_bits = 64), "refcount_bits=64"),
        (with(GIB, |o| o.lazy_refcounts = true), "lazy_refcounts=on"),
        (
            with(GIB, |o| o.compression_type = CompressionType::Zstd),
            "compression_type=zstd",
        ),
        (
            with(GIB, |o| {
                o.backing_file = Some(base_name.clone().into_bytes());
                o.backing_format = Some(b"qcow2".to_vec());
            }),
            "",
        ),
        (
            with(GIB, |o| {
                o.compat = Compat::V2;
                o.backing_file = Some(base_name.clone().into_bytes());
                o.backing_format = Some(b"qcow2".to_vec());
            }),
            "compat=0.10",
        ),
    ];
    for (o, qemu_opts) in cases {
        let ours = dir.path().join("ours.qcow2");
        let theirs = dir.path().join("theirs.qcow2");
        create_file(&ours, &o).unwrap();
        let mut cmd = Command::new("qemu-img");
        cmd.args(["create", "-q", "-f", "qcow2", "-u"]);
        if !qemu_opts.is_empty() {
            cmd.arg("-o").arg(qemu_opts);
        }
        if let Some(b) = &o.backing_file {
            cmd.arg("-b").arg(std::str::from_utf8(b).unwrap());
        }
        if let Some(f) = &o.backing_format {
            cmd.arg("-F").arg(std::str::from_utf8(f).unwrap());
        }
        run_ok(cmd.arg(&theirs).arg(o.size_bytes.to_string()));
        let (a, b) = (
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
        );
        assert_eq!(a.len(), b.len(), "{o:?}: file length");
        if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
            panic!("{o:?}: first difference at byte {i:#x}");
        }
    }
}

/// Runs `qemu-img create` with the given arguments and returns its error output.
fn qemu_img_create_error(dir: &Path, args: &[&str], size: &str) -> String {
    let out = run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .args(args)
        .arg(dir.join("refused.qcow2"))
        .arg(size));
    assert!(!out.status.success(), "qemu-img create {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn invalid_option_combinations_fail_with_qemu_img_creates_messages() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_img_create(&base, 65536, MIB, None);
    let base_name = base.to_str().unwrap().to_owned();
    let cases: Vec<(CreateOptions, Vec<&str>, &str)> = vec![
        (
            with(MIB, |o| o.cluster_size_bytes = 1000),
            vec!["-o", "cluster_size=1000"],
            "Cluster size must be a power of two between 512 and 2048k",
        ),
        (
            with(MIB, |o| o.cluster_size_bytes = 256),
            vec!["-o", "cluster_size=256"],
            "Cluster size must be a power of two between 512 and 2048k",
        ),
        (
            with(MIB, |o| o.cluster_size_bytes = 4 * MIB),
            vec!["-o", "cluster_size=4M"],
            "Cluster size must be a power of two between 512 and 2048k",
        ),
        (
            with(MIB, |o| {
                o.compat = Compat::V2;
                o.refcount_bits = 8;
            }),
            vec!["-o", "compat=0.10,refcount_bits=8"],
            "Different refcount widths than 16 bits require compatibility level 1.1 or above",
        ),
        (
            with(MIB, |o| o.refcount_bits = 3),
            vec!["-o", "refcount_bits=3"],
            "Refcount width must be a power of two and may not exceed 64 bits",
        ),
        (
            with(MIB, |o| o.refcount_bits = 128),
            vec!["-o", "refcount_bits=128"],
            "Refcount width must be a power of two and may not exceed 64 bits",
        ),
        (
            with(MIB, |o| {
                o.compat = Compat::V2;
                o.lazy_refcounts = true;
            }),
            vec!["-o", "compat=0.10,lazy_refcounts=on"],
            "Lazy refcounts only supported with compatibility level 1.1 and above",
        ),
        (
            with(MIB, |o| o.backing_format = Some("qcow2".into())),
            vec!["-F", "qcow2"],
            "Backing format cannot be used without backing file",
        ),
        (
            with(MIB, |o| {
                o.compat = Compat::V2;
                o.compression_type = CompressionType::Zstd;
            }),
            vec!["-o", "compat=0.10,compression_type=zstd"],
            "Non-zlib compression type is only supported with compatibility level 1.1",
        ),
        (
            with(MIB, |o| {
                o.backing_file = Some(base_name.clone().into_bytes());
                o.backing_format = Some(b"qcow2".to_vec());
                o.preallocation = Preallocation::Metadata;
            }),
            vec![
                "-b",
                &base_name,
                "-F",
                "qcow2",
                "-o",
                "preallocation=metadata",
            ],
            "Backing file and preallocation can only be used at the same time if extended_l2 \
             is on",
        ),
        (
            opts(1 << 60),
            vec![],
            "The image size is too large for file format 'qcow2' (try using a larger cluster \
             size)",
        ),
        (
            with(200 * GIB, |o| o.cluster_size_bytes = 512),
            vec!["-o", "cluster_size=512"],
            "The image size is too large for file format 'qcow2' (try using a larger cluster \
             size)",
        ),
    ];
    for (o, qemu_args, message) in cases {
        let path = dir.path().join("ours.qcow2");
        match create_file(&path, &o) {
            Err(Error::BadOption(msg)) => {
                assert!(msg.contains(message), "{msg:?} is not {message:?}");
                // Word for word what qemu-img create says.
                let size = o.size_bytes.to_string();
                let qemu = qemu_img_create_error(dir.path(), &qemu_args, &size);
                assert!(
                    qemu.contains(&msg),
                    "qemu-img says {qemu:?}, we say {msg:?}"
                );
            }
            other => panic!("{o:?}: expected BadOption({message}), got {other:?}"),
        }
        // Nothing was written.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }
}

#[test]
fn unusable_backing_names_and_sizes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("refused.qcow2");
    let long = "b".repeat(1024);
    let o = with(MIB, |o| o.backing_file = Some(long.clone().into_bytes()));
    assert!(matches!(create_file(&path, &o), Err(Error::BadOption(m)) if m.contains("1023")));
    // 512-byte clusters: header, backing format extension and end marker leave 376 bytes.
    let o = with(MIB, |o| {
        o.cluster_size_bytes = 512;
        o.backing_file = Some("b".repeat(500).into_bytes());
        o.backing_format = Some(b"qcow2".to_vec());
    });
    assert!(
        matches!(create_file(&path, &o), Err(Error::BadOption(m)) if m.contains("do not fit")),
        "a 500-byte name cannot fit a 512-byte cluster"
    );
    let o = with(MIB, |o| {
        o.cluster_size_bytes = 512;
        o.backing_file = Some(format!("/{}", "b".repeat(374)).into_bytes());
        o.backing_format = Some(b"qcow2".to_vec());
    });
    create_file(&path, &o).unwrap();
    // (The name fills the cluster to the last byte; nothing exists there to open.)
    let image = open_file(&path, &OpenOptions::default());
    assert_eq!(image.backing_file(), o.backing_file.as_deref());
    assert_eq!(image.backing_format(), Some(&b"qcow2"[..]));
    drop(image);
    assert_info_matches(&path, &o);
    let o = opts(u64::MAX - 100);
    assert!(
        matches!(create_file(&path, &o), Err(Error::BadOption(m)) if m.contains("8 EiB")),
        "sizes above 8 EiB"
    );
}

#[test]
fn unsupported_options_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("refused.qcow2");
    for (o, name) in [
        (
            with(MIB, |o| {
                o.extended_l2 = true;
                o.data_file = Some("data.raw".into());
            }),
            "extended L2 entries with an external data file",
        ),
        (
            with(MIB, |o| {
                o.extended_l2 = true;
                o.encryption = Some(CreateEncryption::Aes);
            }),
            "extended L2 entries with encryption",
        ),
    ] {
        match create_file(&path, &o) {
            Err(Error::Unsupported(msg)) => assert!(msg.contains(name), "{msg}"),
            other => panic!("{name}: expected Unsupported, got {other:?}"),
        }
    }
}

#[test]
fn data_file_options_are_checked_as_qemu_checks_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("refused.qcow2");
    for (o, message) in [
        (
            with(MIB, |o| o.data_file_raw = true),
            "data-file-raw requires data-file",
        ),
        (
            with(MIB, |o| {
                o.data_file = Some("d".into());
                o.data_file_raw = true;
                o.backing_file = Some(b"base".to_vec());
            }),
            "Backing file and data-file-raw cannot be used at the same time",
        ),
        (
            with(MIB, |o| {
                o.data_file = Some("d".into());
                o.compat = qcow2b::engine::create::Compat::V2;
            }),
            "External data files are only supported with compatibility level 1.1",
        ),
    ] {
        match create_file(&path, &o) {
            Err(Error::BadOption(msg)) => assert!(msg.contains(message), "{msg}"),
            other => panic!("{message}: got {other:?}"),
        }
    }
    // Without the data file's storage the engine says how to create one.
    match create_file(&path, &with(MIB, |o| o.data_file = Some("d".into()))) {
        Err(Error::Invalid(msg)) => assert!(msg.contains("create_with_data_file"), "{msg}"),
        other => panic!("got {other:?}"),
    }
}

/// `qemu-img measure --output=json` for the given options, or None if it refuses.
fn qemu_img_measure(args: &[String]) -> Option<Measure> {
    let out = run(Command::new("qemu-img")
        .args(["measure", "-O", "qcow2", "--output=json"])
        .args(args));
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |key| json_value(&text, key, 4).unwrap().parse().unwrap();
    Some(Measure {
        required: field("required"),
        fully_allocated: field("fully-allocated"),
    })
}

#[test]
fn measure_matches_qemu_img_measure_for_sizes_clusters_and_refcount_widths() {
    let sizes = [0, 1, 512, MIB, GIB + 1, 10 * GIB, TIB, 100 * TIB];
    for cluster in [512, 4 * KIB, 64 * KIB, 2 * MIB] {
        for refcount_bits in [1, 16, 64] {
            for prealloc in [Preallocation::Off, Preallocation::Full] {
                for &size in &sizes {
                    let o = with(size, |o| {
                        o.cluster_size_bytes = cluster;
                        o.refcount_bits = refcount_bits;
                        o.preallocation = prealloc;
                    });
                    let qemu = qemu_img_measure(&[
                        "--size".into(),
                        size.to_string(),
                        "-o".into(),
                        format!(
                            "cluster_size={cluster},refcount_bits={refcount_bits},\
                             preallocation={}",
                            prealloc.as_str()
                        ),
                    ]);
                    let ours = measure(&o, None).ok();
                    assert_eq!(ours, qemu, "{o:?}");
                }
            }
        }
    }
    // Version 2 and metadata preallocation change nothing; falloc counts like full.
    for (compat, prealloc) in [
        ("0.10", Preallocation::Off),
        ("1.1", Preallocation::Metadata),
        ("1.1", Preallocation::Falloc),
    ] {
        let o = with(10 * GIB, |o| {
            o.compat = if compat == "0.10" {
                Compat::V2
            } else {
                Compat::V3
            };
            o.preallocation = prealloc;
        });
        let qemu = qemu_img_measure(&[
            "--size".into(),
            "10G".into(),
            "-o".into(),
            format!("compat={compat},preallocation={}", prealloc.as_str()),
        ]);
        assert_eq!(measure(&o, None).ok(), qemu, "{o:?}");
    }
}

/// Guest bytes QEMU counts for converting `source`: every cluster of the target that holds
/// allocated, non-zero data, counted once.
fn allocated_bytes_in_target_clusters(source: &Path, cluster: u64) -> u64 {
    let mut clusters = std::collections::BTreeSet::new();
    for e in qemu_img_map(source) {
        if e.data && !e.zero {
            for c in e.start / cluster..(e.start + e.length).div_ceil(cluster) {
                clusters.insert(c);
            }
        }
    }
    clusters.len() as u64 * cluster
}

#[test]
fn measure_of_an_existing_image_matches_qemu_img_measure() {
    let dir = tempfile::tempdir().unwrap();
    let source: PathBuf = dir.path().join("source.qcow2");
    let size = 64 * MIB + 512;
    qemu_img_create(&source, 65536, size, None);
    qemu_io(
        &source,
        &[
            "write -P 1 0 100k",
            "write -P 2 1049088 3000",
            "write -z 10M 1M",
            "write -P 3 40M 1M",
            &format!("write -P 4 {} 512", size - 512),
        ],
    );
    for cluster in [512, 4 * KIB, 64 * KIB, 2 * MIB] {
        let o = with(size, |o| o.cluster_size_bytes = cluster);
        let allocated = allocated_bytes_in_target_clusters(&source, cluster);
        let qemu = qemu_img_measure(&[
            "-o".into(),
            format!("cluster_size={cluster}"),
            "-f".into(),
            "qcow2".into(),
            source.to_str().unwrap().into(),
        ]);
        assert_eq!(measure(&o, Some(allocated)).ok(), qemu, "cluster {cluster}");
    }
}
