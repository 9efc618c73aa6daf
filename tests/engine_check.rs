//! `Image::check` against QEMU's own `qemu-img check`: images made by the system QEMU check
//! clean with the same allocation figures; crafted inconsistencies are found with QEMU's
//! counts and repaired so that QEMU finds the image clean and reads the same guest data; dirty
//! images are repaired on a read-write open. Also the snapshot table: parsed as `qemu-img`
//! lists it, and hostile tables refused without a panic.

#[path = "engine_support.rs"]
mod support;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use qcow2b::engine::format::header::display_name;
use qcow2b::engine::{CheckFix, CheckReport, Error, Image, MemStorage, OpenOptions};
use support::*;

fn rw() -> OpenOptions {
    OpenOptions::default()
}

fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..Default::default()
    }
}

fn check_file(path: &Path, opts: &OpenOptions, fix: CheckFix) -> CheckReport {
    let mut image = open_file(path, opts);
    let report = image.check(fix).unwrap();
    image.close().unwrap();
    report
}

/// Asserts that our report says what `qemu-img check --output=json` says of the same image.
#[track_caller]
fn assert_same_as_qemu(report: &CheckReport, path: &Path) {
    let (_, q) = qemu_img_check_json(path);
    let ours = [
        ("corruptions", report.corruptions),
        ("leaks", report.leaks),
        ("check-errors", report.check_errors),
        ("image-end-offset", report.image_end_offset),
        ("total-clusters", report.fragmentation.total_clusters),
        (
            "allocated-clusters",
            report.fragmentation.allocated_clusters,
        ),
        (
            "fragmented-clusters",
            report.fragmentation.fragmented_clusters,
        ),
        (
            "compressed-clusters",
            report.fragmentation.compressed_clusters,
        ),
    ];
    for (key, value) in ours {
        assert_eq!(
            value,
            q.u64_or_0(key),
            "{key} differs from qemu-img check of {}; our messages: {:#?}",
            path.display(),
            report.messages
        );
    }
}

#[track_caller]
fn assert_clean(report: &CheckReport, what: &str) {
    assert!(
        report.is_clean() && report.corruptions_fixed == 0 && report.leaks_fixed == 0,
        "{what}: {report:#?}"
    );
}

fn qemu_img(args: &[&str]) -> String {
    run_ok(Command::new("qemu-img").args(args))
}

fn qemu_io_fmt(fmt: &str, path: &Path, commands: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", fmt]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let text = run_ok(cmd.arg(path));
    assert!(!text.contains("failed"), "qemu-io {commands:?}: {text}");
}

/// Guest writes of several kinds: patterns at and across cluster boundaries, zeroes, a
/// discard.
const WRITES: &[&str] = &[
    "write -P 0x11 0 200k",
    "write -P 0x22 1M 64k",
    "write -P 0x33 3000k 5k",
    "write -P 0x44 5M 1M",
    "discard 5M 64k",
];

/// The matrix of images made by the system QEMU that must check clean.
struct CleanCase {
    name: &'static str,
    options: &'static str,
    /// Commands to run on the image after creating it ("io:<qemu-io command>",
    /// "snapshot:<name>", "bitmap:<name>").
    steps: &'static [&'static str],
}

const CLEAN_CASES: &[CleanCase] = &[
    CleanCase {
        name: "v2 64k",
        options: "compat=0.10,cluster_size=65536",
        steps: &["writes"],
    },
    CleanCase {
        name: "v2 64k with snapshots",
        options: "compat=0.10,cluster_size=65536",
        steps: &[
            "writes",
            "snapshot:one",
            "io:write -P 0x55 0 100k",
            "snapshot:two",
        ],
    },
    CleanCase {
        name: "v3 512-byte clusters, 1-bit refcounts",
        options: "cluster_size=512,refcount_bits=1",
        steps: &["writes", "io:write -z 40k 8k"],
    },
    CleanCase {
        name: "v3 64k, 16-bit refcounts, snapshots, zero clusters",
        options: "cluster_size=65536,refcount_bits=16",
        steps: &[
            "writes",
            "snapshot:first",
            "io:write -P 0x66 64k 128k",
            "io:write -z 1M 64k",
            "snapshot:second snapshot",
            "io:write -P 0x77 3M 1M",
        ],
    },
    CleanCase {
        name: "v3 2M clusters, 64-bit refcounts",
        options: "cluster_size=2097152,refcount_bits=64",
        steps: &["writes", "snapshot:s", "io:write -P 0x12 0 4k"],
    },
    CleanCase {
        name: "lazy refcounts, closed cleanly",
        options: "cluster_size=65536,lazy_refcounts=on",
        steps: &["writes"],
    },
    CleanCase {
        name: "preallocation=metadata",
        options: "cluster_size=65536,preallocation=metadata",
        steps: &["writes", "io:write -z 2M 128k"],
    },
    CleanCase {
        name: "persistent dirty bitmap",
        options: "cluster_size=65536",
        steps: &["bitmap:b0", "writes", "bitmap:b1"],
    },
];

fn apply_steps(path: &Path, steps: &[&str]) {
    for step in steps {
        if *step == "writes" {
            qemu_io(path, WRITES);
        } else if let Some(cmd) = step.strip_prefix("io:") {
            qemu_io(path, &[cmd]);
        } else if let Some(name) = step.strip_prefix("snapshot:") {
            qemu_img(&["snapshot", "-c", name, path.to_str().unwrap()]);
        } else if let Some(name) = step.strip_prefix("bitmap:") {
            qemu_img(&["bitmap", "--add", path.to_str().unwrap(), name]);
        } else {
            panic!("unknown step {step}");
        }
    }
}

#[test]
fn images_made_by_qemu_check_clean_with_qemus_allocation_figures() {
    let dir = tempfile::tempdir().unwrap();
    for case in CLEAN_CASES {
        let img = dir.path().join("clean.qcow2");
        qemu_img_create_with(&img, case.options, "64M", None);
        apply_steps(&img, case.steps);
        let (code, _) = qemu_img_check_json(&img);
        assert_eq!(code, 0, "{}: qemu-img itself finds problems", case.name);

        let report = check_file(&img, &ro(), CheckFix::None);
        assert_clean(&report, case.name);
        assert_same_as_qemu(&report, &img);
    }
}

#[test]
fn read_write_check_with_repair_changes_nothing_on_a_clean_image() {
    let dir = tempfile::tempdir().unwrap();
    for case in CLEAN_CASES.iter().filter(|c| !c.name.contains("bitmap")) {
        let img = dir.path().join("clean.qcow2");
        qemu_img_create_with(&img, case.options, "64M", None);
        apply_steps(&img, case.steps);
        let before = std::fs::read(&img).unwrap();
        let report = check_file(&img, &rw(), CheckFix::All);
        assert_clean(&report, case.name);
        assert!(
            std::fs::read(&img).unwrap() == before,
            "{}: a clean check wrote to the image",
            case.name
        );
    }
}

/// Compressed images: zlib and zstd, with several compressed clusters sharing a host
/// cluster (their refcounts above 1), made with `qemu-img convert -c`.
#[test]
fn compressed_images_check_clean_with_qemus_counts() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    qemu_img(&["create", "-q", "-f", "raw", raw.to_str().unwrap(), "8M"]);
    // Patterns compress to a few bytes; a stretch of an executable does not compress much.
    qemu_io_fmt(
        "raw",
        &raw,
        &[
            "write -P 0x61 0 1M",
            "write -P 0x62 2M 300k",
            "write -P 0 3M 1M",
        ],
    );
    let noise = std::fs::read("/usr/bin/qemu-img").unwrap();
    file_write(&raw, 5 << 20, &noise[..(1 << 20).min(noise.len())]);
    for (ctype, cluster_size) in [
        ("zlib", 65536),
        ("zstd", 65536),
        ("zlib", 4096),
        ("zstd", 512),
    ] {
        let img = dir.path().join(format!("c-{ctype}-{cluster_size}.qcow2"));
        qemu_img(&[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ctype},cluster_size={cluster_size}"),
            raw.to_str().unwrap(),
            img.to_str().unwrap(),
        ]);
        let report = check_file(&img, &ro(), CheckFix::None);
        let what = format!("{ctype} {cluster_size}");
        assert_clean(&report, &what);
        assert!(
            report.fragmentation.compressed_clusters > 10,
            "{what}: {report:?}"
        );
        assert_same_as_qemu(&report, &img);
    }
}

/// A read-write open keeps valid bitmaps (marked in use, `image/bitmaps.rs`) and the check
/// counts their clusters: no leak, as QEMU finds. Once another program cleared the bitmaps
/// autoclear bit the extension is stale: the open drops it and QEMU counts the bitmap
/// clusters as leaked; the check agrees with QEMU on that, and repairing the leaks leaves an
/// image QEMU finds clean.
#[test]
fn bitmap_clusters_are_counted_and_become_leaks_once_the_autoclear_bit_is_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("bitmap.qcow2");
    qemu_img_create_with(&img, "cluster_size=65536", "64M", None);
    apply_steps(&img, &["bitmap:b0", "writes"]);
    let copy = dir.path().join("copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();

    let mut image = open_file(&img, &rw());
    let report = image.check(CheckFix::None).unwrap();
    image.close().unwrap();
    assert_eq!((report.leaks, report.corruptions), (0, 0), "{report:#?}");
    assert_same_as_qemu(&report, &img);

    // Another program's write cleared the autoclear bit (header byte 95, bit 0).
    let autoclear = file_be64(&img, 88);
    file_write(&img, 88, &(autoclear & !1).to_be_bytes());
    let mut image = open_file(&img, &rw());
    let report = image.check(CheckFix::None).unwrap();
    image.close().unwrap();
    assert!(report.leaks > 0 && report.corruptions == 0, "{report:#?}");
    assert_same_as_qemu(&report, &img);

    let report = check_file(&img, &rw(), CheckFix::Leaks);
    assert_eq!(report.leaks, 0);
    assert!(report.leaks_fixed > 0);
    qemu_img_check(&img);
    qemu_img(&[
        "compare",
        "-q",
        img.to_str().unwrap(),
        copy.to_str().unwrap(),
    ]);
}

// ---------------------------------------------------------------------------------------
// Crafted inconsistencies.

/// Where QEMU put things in a small image: cluster size 64 KiB, 16-bit refcounts.
struct Layout {
    l1_offset: u64,
    reftable_offset: u64,
    refblock0: u64,
    l2_of_l1_entry0: u64,
}

fn layout_of(path: &Path) -> Layout {
    let l1_offset = file_be64(path, field::L1_OFFSET as u64);
    let reftable_offset = file_be64(path, field::REFTABLE_OFFSET as u64);
    Layout {
        l1_offset,
        reftable_offset,
        refblock0: file_be64(path, reftable_offset),
        l2_of_l1_entry0: file_be64(path, l1_offset) & 0x00ff_ffff_ffff_fe00,
    }
}

fn set_refcount16(path: &Path, l: &Layout, cluster: u64, value: u16) {
    file_write(path, l.refblock0 + 2 * cluster, &value.to_be_bytes());
}

/// A 64 MiB v3 image with 64 KiB clusters and some data from QEMU, plus a copy of it.
struct Fixture {
    _dir: tempfile::TempDir,
    img: PathBuf,
    before: PathBuf,
}

fn fixture(options: &str, steps: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    qemu_img_create_with(&img, options, "64M", None);
    apply_steps(&img, steps);
    let before = dir.path().join("before.qcow2");
    Fixture {
        _dir: dir,
        img,
        before,
    }
}

impl Fixture {
    /// Keeps a copy of the (now broken) image, to compare guest data after the repair.
    fn keep_copy(&self) {
        std::fs::copy(&self.img, &self.before).unwrap();
    }

    /// After a repair: QEMU finds the image clean and reads the same guest data as from the
    /// copy taken before.
    #[track_caller]
    fn assert_repaired_and_data_unchanged(&self) {
        qemu_img_check(&self.img);
        qemu_img(&[
            "compare",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            self.before.to_str().unwrap(),
            self.img.to_str().unwrap(),
        ]);
    }
}

#[track_caller]
fn assert_message(report: &CheckReport, needle: &str) {
    assert!(
        report.messages.iter().any(|m| m.contains(needle)),
        "no message contains {needle:?}: {:#?}",
        report.messages
    );
}

#[test]
fn leaked_cluster_is_reported_and_fixed_by_leak_repair() {
    let f = fixture("cluster_size=65536", &["io:write -P 0x11 0 256k"]);
    let l = layout_of(&f.img);
    // One more cluster at the end of the file, counted but referenced by nothing.
    let len = std::fs::metadata(&f.img).unwrap().len();
    File::options()
        .write(true)
        .open(&f.img)
        .unwrap()
        .set_len(len + 65536)
        .unwrap();
    let leaked = len / 65536;
    set_refcount16(&f.img, &l, leaked, 1);
    f.keep_copy();

    let report = check_file(&f.img, &ro(), CheckFix::None);
    assert_eq!((report.leaks, report.corruptions), (1, 0), "{report:#?}");
    assert_message(
        &report,
        &format!("Leaked cluster {leaked} refcount=1 reference=0"),
    );
    assert_same_as_qemu(&report, &f.img);

    let report = check_file(&f.img, &rw(), CheckFix::Leaks);
    assert_eq!((report.leaks, report.leaks_fixed), (0, 1), "{report:#?}");
    assert_message(
        &report,
        &format!("Repairing cluster {leaked} refcount=1 reference=0"),
    );
    f.assert_repaired_and_data_unchanged();
}

#[test]
fn refcount_of_zero_under_a_data_cluster_is_a_corruption_fixed_by_a_rebuild() {
    let f = fixture("cluster_size=65536", &["io:write -P 0x11 0 256k"]);
    let l = layout_of(&f.img);
    let data_cluster = (file_be64(&f.img, l.l2_of_l1_entry0) & 0x00ff_ffff_ffff_fe00) >> 16;
    set_refcount16(&f.img, &l, data_cluster, 0);
    f.keep_copy();

    let report = check_file(&f.img, &ro(), CheckFix::None);
    // QEMU: the refcount below the reference, and the COPIED flag that no longer matches.
    assert_eq!(report.corruptions, 2, "{report:#?}");
    assert_message(
        &report,
        &format!("ERROR cluster {data_cluster} refcount=0 reference=1"),
    );
    assert_message(&report, "ERROR OFLAG_COPIED data cluster");
    assert_same_as_qemu(&report, &f.img);

    // A refcount of 0 may mean a missing block: only a rebuild may fix it, which leak
    // repair does not do.
    let report = check_file(&f.img, &rw(), CheckFix::Leaks);
    assert_eq!(report.check_errors, 1, "{report:#?}");
    assert_message(&report, "need to rebuild refcount structures");

    let report = check_file(&f.img, &rw(), CheckFix::All);
    assert!(report.rebuilt_refcounts);
    assert_eq!(
        (report.corruptions, report.leaks, report.check_errors),
        (0, 0, 0),
        "{report:#?}"
    );
    assert!(report.corruptions_fixed >= 1);
    f.assert_repaired_and_data_unchanged();
    assert_clean(
        &check_file(&f.img, &ro(), CheckFix::None),
        "after the rebuild",
    );
}

#[test]
fn refcount_too_low_on_a_snapshot_shared_cluster_is_raised_in_place() {
    let f = fixture(
        "cluster_size=65536",
        &["io:write -P 0x11 0 256k", "snapshot:s1"],
    );
    let l = layout_of(&f.img);
    let data_cluster = (file_be64(&f.img, l.l2_of_l1_entry0) & 0x00ff_ffff_ffff_fe00) >> 16;
    set_refcount16(&f.img, &l, data_cluster, 1);
    f.keep_copy();

    let report = check_file(&f.img, &ro(), CheckFix::None);
    assert_message(
        &report,
        &format!("ERROR cluster {data_cluster} refcount=1 reference=2"),
    );
    assert_same_as_qemu(&report, &f.img);

    let report = check_file(&f.img, &rw(), CheckFix::All);
    assert!(!report.rebuilt_refcounts, "{report:#?}");
    assert_eq!(report.corruptions, 0, "{report:#?}");
    assert_message(
        &report,
        &format!("Repairing cluster {data_cluster} refcount=1 reference=2"),
    );
    f.assert_repaired_and_data_unchanged();
}

#[test]
fn wrong_copied_flags_are_reported_and_repaired_even_by_leak_repair() {
    let f = fixture("cluster_size=65536", &["io:write -P 0x11 0 256k"]);
    let l = layout_of(&f.img);
    let l1_entry = file_be64(&f.img, l.l1_offset);
    file_write(&f.img, l.l1_offset, &(l1_entry & !(1 << 63)).to_be_bytes());
    let l2_entry = file_be64(&f.img, l.l2_of_l1_entry0 + 8);
    file_write(
        &f.img,
        l.l2_of_l1_entry0 + 8,
        &(l2_entry & !(1 << 63)).to_be_bytes(),
    );
    f.keep_copy();

    let report = check_file(&f.img, &ro(), CheckFix::None);
    assert_eq!(report.corruptions, 2, "{report:#?}");
    assert_message(&report, "ERROR OFLAG_COPIED L2 cluster: l1_index=0");
    assert_message(&report, "ERROR OFLAG_COPIED data cluster");
    assert_same_as_qemu(&report, &f.img);

    // With nothing else wrong the refcounts are trusted, so leak repair fixes the flags (as
    // QEMU's does).
    let report = check_file(&f.img, &rw(), CheckFix::Leaks);
    assert_eq!(
        (report.corruptions, report.corruptions_fixed),
        (0, 2),
        "{report:#?}"
    );
    assert_eq!(file_be64(&f.img, l.l1_offset), l1_entry);
    assert_eq!(file_be64(&f.img, l.l2_of_l1_entry0 + 8), l2_entry);
    f.assert_repaired_and_data_unchanged();
}

/// Reads and writes refuse an L2 entry naming host offset 0 with the COPIED flag (the header;
/// only an external data file may have a data cluster at 0), so check must not call the image
/// harmless: it was once counted as unallocated here (QEMU's view), exit 3 at worst, while
/// every request to the cluster failed. -r all makes it what QEMU reads there: unallocated.
#[test]
fn l2_entry_at_host_offset_0_with_the_copied_flag_is_a_corruption_repaired_to_unallocated() {
    let f = fixture("cluster_size=65536", &["io:write -P 0x11 0 256k"]);
    let l = layout_of(&f.img);
    file_write(&f.img, l.l2_of_l1_entry0 + 8, &(1u64 << 63).to_be_bytes());

    let mut image = open_file(&f.img, &rw());
    let mut buf = [0u8; 512];
    assert!(matches!(
        image.read(65536, &mut buf, None),
        Err(Error::Corrupt(_))
    ));
    let report = image.check(CheckFix::None).unwrap();
    image.close().unwrap();
    // The cluster the entry named before is leaked too (as QEMU counts it).
    assert_eq!((report.corruptions, report.leaks), (1, 1), "{report:#?}");
    assert_message(&report, "host offset 0 with the COPIED flag");

    let report = check_file(&f.img, &rw(), CheckFix::All);
    assert_eq!(report.corruptions, 0, "{report:#?}");
    assert_eq!(
        file_be64(&f.img, l.l2_of_l1_entry0 + 8),
        0,
        "now unallocated"
    );
    qemu_img_check(&f.img);
    let mut image = open_file(&f.img, &rw());
    image.read(65536, &mut buf, None).unwrap();
    assert_eq!(buf, [0u8; 512]);
    image.read(0, &mut buf, None).unwrap();
    assert_eq!(buf, [0x11u8; 512]);
    image.close().unwrap();
}

#[test]
fn l2_entry_past_the_end_of_the_file_is_dropped_by_full_repair() {
    let f = fixture("cluster_size=65536", &["io:write -P 0x11 0 256k"]);
    let l = layout_of(&f.img);
    // Guest cluster 10 was never written; its entry now names a cluster at 1 TiB.
    file_write(
        &f.img,
        l.l2_of_l1_entry0 + 10 * 8,
        &((1u64 << 40) | (1 << 63)).to_be_bytes(),
    );
    f.keep_copy();

    let report = check_file(&f.img, &ro(), CheckFix::None);
    assert_eq!(report.corruptions, 2, "{report:#?}");
    assert_message(&report, "exceeding the end of the file");
    assert_same_as_qemu(&report, &f.img);

    let report = check_file(&f.img, &rw(), CheckFix::All);
    assert_eq!(report.corruptions, 0, "{report:#?}");
    assert!(report.corruptions_fixed >= 1);
    assert_eq!(
        file_be64(&f.img, l.l2_of_l1_entry0 + 10 * 8),
        1,
        "now a zero cluster"
    );
    f.assert_repaired_and_data_unchanged();
}

#[test]
fn refcount_block_outside_the_file_is_rebuilt_without_growing_the_file_to_reach_it() {
    let f = fixture("cluster_size=65536", &["io:write -P 0x11 0 256k"]);
    let l = layout_of(&f.img);
    file_write(&f.img, l.reftable_offset, &(1u64 << 40).to_be_bytes());
    f.keep_copy();

    let report = check_file(&f.img, &ro(), CheckFix::None);
    assert_message(&report, "ERROR refcount block 0 is outside image");
    assert_same_as_qemu(&report, &f.img);

    let report = check_file(&f.img, &rw(), CheckFix::All);
    assert!(report.rebuilt_refcounts);
    assert!(report.is_clean(), "{report:#?}");
    assert!(std::fs::metadata(&f.img).unwrap().len() < 16 << 20);
    f.assert_repaired_and_data_unchanged();
}

#[test]
fn refcount_block_overlapping_an_l2_table_is_moved_by_a_rebuild() {
    let f = fixture("cluster_size=65536", &["io:write -P 0x11 0 256k"]);
    let l = layout_of(&f.img);
    // The refcount table now says the L2 table is refcount block 0.
    file_write(&f.img, l.reftable_offset, &l.l2_of_l1_entry0.to_be_bytes());
    f.keep_copy();

    let report = check_file(&f.img, &ro(), CheckFix::None);
    assert_message(&report, "ERROR refcount block 0 refcount=2");
    assert!(report.corruptions > 0);

    let report = check_file(&f.img, &rw(), CheckFix::All);
    assert!(report.rebuilt_refcounts);
    assert!(report.is_clean(), "{report:#?}");
    f.assert_repaired_and_data_unchanged();
}

#[test]
fn misaligned_refcount_block_is_unreadable_like_in_qemu_and_rebuilt_where_qemu_gives_up() {
    let f = fixture("cluster_size=65536", &["io:write -P 0x11 0 256k"]);
    let l = layout_of(&f.img);
    file_write(
        &f.img,
        l.reftable_offset,
        &(l.refblock0 + 0x200).to_be_bytes(),
    );
    f.keep_copy();

    let report = check_file(&f.img, &ro(), CheckFix::None);
    assert_message(&report, "ERROR refcount block 0 is not cluster aligned");
    assert_message(&report, "Can't get refcount for cluster 0");
    assert_eq!(report.corruptions, 1);
    assert_same_as_qemu(&report, &f.img);

    // QEMU's own repair fails here (it marks the image corrupt and refuses to write).
    let report = check_file(&f.img, &rw(), CheckFix::All);
    assert!(report.rebuilt_refcounts);
    assert!(report.is_clean(), "{report:#?}");
    f.assert_repaired_and_data_unchanged();
}

#[test]
fn reserved_bits_in_l1_and_l2_entries_are_cleared_keeping_the_mapping() {
    let f = fixture("cluster_size=65536", &["io:write -P 0x11 0 256k"]);
    let l = layout_of(&f.img);
    let l1_entry = file_be64(&f.img, l.l1_offset);
    file_write(&f.img, l.l1_offset, &(l1_entry | 2).to_be_bytes());
    let l2_entry = file_be64(&f.img, l.l2_of_l1_entry0 + 8);
    file_write(&f.img, l.l2_of_l1_entry0 + 8, &(l2_entry | 2).to_be_bytes());
    f.keep_copy();

    let report = check_file(&f.img, &ro(), CheckFix::None);
    assert_eq!(report.corruptions, 2, "{report:#?}");
    assert_message(&report, "ERROR found L1 entry with reserved bits set");
    assert_message(&report, "ERROR found l2 entry with reserved bits set");
    assert_same_as_qemu(&report, &f.img);

    let report = check_file(&f.img, &rw(), CheckFix::All);
    assert!(
        report.is_clean() && report.corruptions_fixed == 2,
        "{report:#?}"
    );
    assert_eq!(file_be64(&f.img, l.l1_offset), l1_entry);
    assert_eq!(file_be64(&f.img, l.l2_of_l1_entry0 + 8), l2_entry);
    f.assert_repaired_and_data_unchanged();
}

#[test]
fn misaligned_data_and_preallocated_zero_clusters_are_dropped_by_full_repair() {
    let f = fixture("cluster_size=65536", &["io:write -P 0x11 0 256k"]);
    let l = layout_of(&f.img);
    // Guest cluster 1: data at a misaligned offset; guest cluster 2: a preallocated zero
    // cluster at a misaligned offset.
    let e1 = file_be64(&f.img, l.l2_of_l1_entry0 + 8);
    file_write(&f.img, l.l2_of_l1_entry0 + 8, &(e1 + 0x200).to_be_bytes());
    let e2 = file_be64(&f.img, l.l2_of_l1_entry0 + 16);
    file_write(
        &f.img,
        l.l2_of_l1_entry0 + 16,
        &((e2 + 0x200) | 1).to_be_bytes(),
    );

    let report = check_file(&f.img, &ro(), CheckFix::None);
    assert_message(&report, "Data cluster is not properly aligned");
    assert_message(&report, "Preallocated cluster is not properly aligned");
    assert_same_as_qemu(&report, &f.img);

    let report = check_file(&f.img, &rw(), CheckFix::All);
    assert_eq!(report.corruptions, 0, "{report:#?}");
    assert_eq!(
        report.leaks, 0,
        "the dropped clusters are freed: {report:#?}"
    );
    qemu_img_check(&f.img);
    qemu_io(
        &f.img,
        &[
            "read -P 0x11 0 64k",
            "read -P 0 64k 128k",
            "read -P 0x11 192k 64k",
        ],
    );
}

/// The image a QEMU with lazy refcounts leaves when it is killed: dirty bit set, refcounts
/// of everything allocated since open missing.
fn killed_lazy_refcounts_image() -> Fixture {
    let f = fixture("cluster_size=65536,lazy_refcounts=on", &[]);
    let out = run(Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .args(["-c", "write -P 0x11 0 3M"])
        .args(["-c", "write -P 0x22 32M 512k"])
        .args(["-c", "write -z 40M 1M"])
        .args(["-c", "flush"])
        .args(["-c", "sigraise 9"])
        .arg(&f.img));
    assert!(!out.status.success(), "qemu-io was supposed to die");
    assert_eq!(
        file_be64(&f.img, field::INCOMPATIBLE as u64) & 1,
        1,
        "the killed QEMU left the dirty bit"
    );
    f.keep_copy();
    f
}

#[test]
fn dirty_image_left_by_a_killed_qemu_checks_like_qemu_when_opened_read_only() {
    let f = killed_lazy_refcounts_image();
    let report = check_file(&f.img, &ro(), CheckFix::None);
    assert!(report.corruptions > 0, "{report:#?}");
    assert_same_as_qemu(&report, &f.img);
    assert_eq!(
        file_be64(&f.img, field::INCOMPATIBLE as u64) & 1,
        1,
        "a read-only open repairs nothing"
    );
}

#[test]
fn dirty_image_left_by_a_killed_qemu_is_repaired_on_read_write_open() {
    let f = killed_lazy_refcounts_image();
    let mut image = open_file(&f.img, &rw());
    assert_eq!(image.header().incompatible.bits() & 1, 0);
    // The repaired image takes writes at once.
    image.write(10 << 20, &[0x5a; 70000], None).unwrap();
    image.close().unwrap();
    assert_eq!(file_be64(&f.img, field::INCOMPATIBLE as u64) & 1, 0);
    qemu_img_check(&f.img);
    qemu_io(&f.img, &["read -P 0x5a 10M 70000", "write -P 0 10M 70000"]);
    f.assert_repaired_and_data_unchanged();
}

#[test]
fn dirty_bit_with_a_broken_refcount_is_repaired_on_read_write_open() {
    let f = fixture("cluster_size=65536", &["io:write -P 0x11 0 256k"]);
    let l = layout_of(&f.img);
    let data_cluster = (file_be64(&f.img, l.l2_of_l1_entry0 + 8) & 0x00ff_ffff_ffff_fe00) >> 16;
    set_refcount16(&f.img, &l, data_cluster, 0);
    let incompatible = file_be64(&f.img, field::INCOMPATIBLE as u64);
    file_write(
        &f.img,
        field::INCOMPATIBLE as u64,
        &(incompatible | 1).to_be_bytes(),
    );
    f.keep_copy();

    let image = open_file(&f.img, &rw());
    image.close().unwrap();
    assert_eq!(file_be64(&f.img, field::INCOMPATIBLE as u64) & 1, 0);
    f.assert_repaired_and_data_unchanged();
}

#[test]
fn check_of_a_read_only_image_repairs_nothing() {
    let f = fixture("cluster_size=65536", &["io:write -P 0x11 0 256k"]);
    let l = layout_of(&f.img);
    let data_cluster = (file_be64(&f.img, l.l2_of_l1_entry0) & 0x00ff_ffff_ffff_fe00) >> 16;
    set_refcount16(&f.img, &l, data_cluster, 0);
    let broken = std::fs::read(&f.img).unwrap();
    let report = check_file(&f.img, &ro(), CheckFix::All);
    assert!(report.corruptions > 0 && report.corruptions_fixed == 0);
    assert!(std::fs::read(&f.img).unwrap() == broken);
}

// ---------------------------------------------------------------------------------------
// In-memory images: the engine's own writes, and random damage.

#[test]
fn engine_written_image_checks_clean_and_stays_usable_after_repair() {
    let mut image = Image::open(
        MemStorage::new(build_image(9, 4 << 20, 3)),
        &OpenOptions::default(),
    )
    .unwrap();
    let mut rng = XorShift::new(11);
    for _ in 0..80 {
        let off = rng.below(4 << 20);
        let len = (1 + rng.below(20_000)).min((4 << 20) - off);
        image.write(off, &vec![0x3c; len as usize], None).unwrap();
        if rng.below(5) == 0 {
            image.discard(off, len).unwrap();
        }
    }
    let report = image.check(CheckFix::None).unwrap();
    assert_clean(&report, "after engine writes");
    let report = image.check(CheckFix::All).unwrap();
    assert_clean(&report, "repair of a clean image");
    image.write(12345, &[1; 5000], None).unwrap();
    assert_clean(&image.check(CheckFix::None).unwrap(), "after more writes");
}

#[test]
fn random_damage_never_panics_the_check_and_full_repair_leaves_it_consistent() {
    use qcow2b::engine::Storage;
    let mut image = Image::open(
        MemStorage::new(build_image(9, 2 << 20, 3)),
        &OpenOptions::default(),
    )
    .unwrap();
    let mut rng = XorShift::new(5);
    for _ in 0..40 {
        let off = rng.below(2 << 20);
        let len = (1 + rng.below(8_000)).min((2 << 20) - off);
        image.write(off, &vec![0x77; len as usize], None).unwrap();
    }
    image.flush().unwrap();
    let mut base = vec![0u8; image.storage().len().unwrap() as usize];
    image.storage().read_at(0, &mut base).unwrap();

    let mut repaired_clean = 0;
    for round in 0..1500 {
        let mut b = base.clone();
        for _ in 0..1 + rng.below(6) {
            let span = if round % 2 == 0 { 4096 } else { b.len() as u64 };
            let at = rng.below(span) as usize;
            b[at] = match rng.below(3) {
                0 => 0xff,
                1 => 0,
                _ => rng.next_u64() as u8,
            };
        }
        let read_only = round % 4 == 0;
        let opts = OpenOptions {
            read_only,
            ..Default::default()
        };
        let Ok(mut image) = Image::open(MemStorage::new(b), &opts) else {
            continue;
        };
        let fix = match round % 3 {
            0 => CheckFix::None,
            1 => CheckFix::Leaks,
            _ => CheckFix::All,
        };
        let Ok(report) = image.check(fix) else {
            continue;
        };
        if fix == CheckFix::All && !read_only && report.corruptions == 0 {
            // A full repair that reports nothing left must leave nothing for a second check.
            let again = image.check(CheckFix::None).unwrap();
            assert!(
                again.corruptions == 0 && again.leaks == 0,
                "round {round}: {report:#?} then {again:#?}"
            );
            repaired_clean += 1;
        }
    }
    assert!(
        repaired_clean > 100,
        "only {repaired_clean} repairs to verify"
    );
}

// ---------------------------------------------------------------------------------------
// The snapshot table.

#[test]
fn snapshot_table_agrees_with_qemu_img_snapshot_list_and_info() {
    let dir = tempfile::tempdir().unwrap();
    for compat in ["1.1", "0.10"] {
        let img = dir.path().join(format!("snap-{compat}.qcow2"));
        qemu_img_create_with(
            &img,
            &format!("compat={compat},cluster_size=65536"),
            "64M",
            None,
        );
        qemu_io(&img, &["write -P 0x11 0 1M"]);
        qemu_img(&["snapshot", "-c", "first", img.to_str().unwrap()]);
        // QEMU cannot resize a version 2 image with snapshots.
        let size_after = if compat == "1.1" { 96 << 20 } else { 64 << 20 };
        if compat == "1.1" {
            qemu_img(&["resize", "-q", img.to_str().unwrap(), "96M"]);
        }
        qemu_img(&["snapshot", "-c", "name with spaces", img.to_str().unwrap()]);
        qemu_img(&["snapshot", "-c", "third", img.to_str().unwrap()]);
        qemu_img(&["snapshot", "-d", "third", img.to_str().unwrap()]);
        qemu_img(&["snapshot", "-c", "fourth", img.to_str().unwrap()]);

        let image = open_file(&img, &ro());
        let ours = image.snapshots();
        let listed = qemu_img(&["snapshot", "-l", img.to_str().unwrap()]);
        // "ID  TAG  VM_SIZE  DATE  VM_CLOCK  ICOUNT": the id and the tag start each line.
        let rows: Vec<&str> = listed.lines().skip(2).collect();
        assert_eq!(rows.len(), ours.len(), "{listed}");
        for (row, s) in rows.iter().zip(ours) {
            assert!(
                row.starts_with(&format!(
                    "{:<8}{}",
                    display_name(&s.id),
                    display_name(&s.name)
                )),
                "{row:?} vs {s:?}"
            );
        }
        let info = qemu_img_info_json(&img);
        let theirs = info.get("snapshots").unwrap().array();
        assert_eq!(theirs.len(), ours.len());
        for (q, s) in theirs.iter().zip(ours) {
            assert_eq!(q.str_of("id"), Some(&*display_name(&s.id)));
            assert_eq!(q.str_of("name"), Some(&*display_name(&s.name)));
            assert_eq!(q.u64_or_0("date-sec"), u64::from(s.date_sec));
            assert_eq!(q.u64_or_0("date-nsec"), u64::from(s.date_nsec));
            assert_eq!(
                q.u64_or_0("vm-clock-sec") * 1_000_000_000 + q.u64_or_0("vm-clock-nsec"),
                s.vm_clock_nsec
            );
            assert_eq!(q.u64_or_0("vm-state-size"), s.vm_state_size);
            assert_eq!(q.u64_or_0("icount"), s.icount.unwrap_or(0));
        }
        let names: Vec<&[u8]> = ours.iter().map(|s| s.name.as_slice()).collect();
        assert_eq!(names, [&b"first"[..], b"name with spaces", b"fourth"]);
        assert_eq!(ours[0].disk_size, 64 << 20, "taken before the resize");
        assert_eq!(ours[1].disk_size, size_after);
        assert!(ours
            .iter()
            .all(|s| s.l1_size_entries > 0 && s.extra_data_size >= 16));
        assert_eq!(ours[0].extra_data().len(), ours[0].extra_data_size as usize);
    }
}

#[test]
fn engine_writes_on_an_image_with_snapshots_leave_the_snapshots_intact() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    qemu_img_create_with(&img, "cluster_size=65536", "16M", None);
    qemu_io(&img, &["write -P 0x11 0 2M", "write -P 0x12 8M 64k"]);
    qemu_img(&["snapshot", "-c", "base", img.to_str().unwrap()]);
    let at_snapshot = dir.path().join("at-snapshot.raw");
    let expected = qemu_img_to_raw(&img, &at_snapshot);

    let mut image = open_file(&img, &rw());
    assert_eq!(image.snapshots().len(), 1);
    image.write(4096, &[0xee; 100_000], None).unwrap();
    image.write_zeroes(1 << 20, 1 << 20, true, None).unwrap();
    image.write(8 << 20, &[0xdd; 512], None).unwrap();
    assert_clean(&image.check(CheckFix::None).unwrap(), "after writes");
    image.close().unwrap();
    qemu_img_check(&img);

    // The snapshot still reads as it was taken.
    let snap_raw = dir.path().join("snap.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        "-l",
        "snapshot.name=base",
        img.to_str().unwrap(),
        snap_raw.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&snap_raw).unwrap() == expected);
}

#[test]
fn data_write_never_lands_on_a_snapshot_l1_table() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    qemu_img_create_with(&img, "cluster_size=65536", "16M", None);
    qemu_io(&img, &["write -P 0x11 0 128k"]);
    qemu_img(&["snapshot", "-c", "s", img.to_str().unwrap()]);
    let snap_l1 = open_file(&img, &ro()).snapshots()[0].l1_table_offset;
    // Make guest cluster 0 claim the snapshot's L1 table as a data cluster of its own (L1
    // and L2 entries with COPIED, so a write would go in place).
    let l = layout_of(&img);
    let l1_entry = file_be64(&img, l.l1_offset);
    file_write(&img, l.l1_offset, &(l1_entry | (1 << 63)).to_be_bytes());
    file_write(
        &img,
        l.l2_of_l1_entry0,
        &(snap_l1 | (1 << 63)).to_be_bytes(),
    );
    let before = std::fs::read(&img).unwrap();

    let mut image = open_file(&img, &rw());
    match image.write(0, &[0xab; 512], None) {
        Err(Error::Corrupt(m)) => assert!(m.contains("snapshot L1 table"), "{m}"),
        other => panic!("write over a snapshot L1 table: {other:?}"),
    }
    drop(image);
    assert!(
        std::fs::read(&img).unwrap() == before,
        "nothing was written"
    );
}

/// An image from `build_image` (header, refcount table, refcount block, L1 table at
/// clusters 0..4 of 64 KiB) with a snapshot table in cluster 4 holding `entries`.
fn image_with_snapshot_table(nb_snapshots: u32, entries: &[u8]) -> Vec<u8> {
    let mut b = build_image(16, 1 << 30, 3);
    let table_at = b.len();
    b.resize(table_at + 65536 * 2, 0);
    b[table_at..table_at + entries.len()].copy_from_slice(entries);
    put32(&mut b, 60, nb_snapshots);
    put64(&mut b, 64, table_at as u64);
    // Refcounts of the two new clusters.
    b[2 * 65536 + 2 * 4 + 1] = 1;
    b[2 * 65536 + 2 * 5 + 1] = 1;
    b
}

/// One entry: L1 table at `l1_offset` with `l1_size` entries, the given extra data size
/// (zero-filled), id "1" and name "snap".
fn snapshot_entry(l1_offset: u64, l1_size: u32, extra_data_size: u32) -> Vec<u8> {
    let mut e = vec![0u8; 40];
    put64(&mut e, 0, l1_offset);
    put32(&mut e, 8, l1_size);
    e[12..14].copy_from_slice(&1u16.to_be_bytes());
    e[14..16].copy_from_slice(&4u16.to_be_bytes());
    put32(&mut e, 36, extra_data_size);
    e.extend(std::iter::repeat_n(0u8, extra_data_size.min(4096) as usize));
    e.extend_from_slice(b"1snap");
    e.resize(e.len().next_multiple_of(8), 0);
    e
}

#[track_caller]
fn assert_invalid(bytes: Vec<u8>, needles: &[&str]) {
    match Image::open(MemStorage::new(bytes), &ro()) {
        Err(Error::Invalid(m)) => {
            for needle in needles {
                assert!(m.contains(needle), "{m:?} lacks {needle:?}");
            }
        }
        Err(other) => panic!("expected Invalid mentioning {needles:?}, got {other}"),
        Ok(_) => panic!("expected Invalid mentioning {needles:?}, the image opened"),
    }
}

/// A snapshot table over QEMU's limits: refused (EFBIG) with QEMU's message and hint.
fn assert_over_limits(bytes: Vec<u8>, starts: &str) {
    match Image::open(MemStorage::new(bytes), &ro()) {
        Err(Error::Refused { errno, msg }) => {
            assert_eq!(errno, libc::EFBIG, "{msg}");
            assert!(
                msg.starts_with(starts),
                "{msg:?} does not start with {starts:?}"
            );
        }
        Err(other) => panic!("expected the refusal {starts:?}, got {other}"),
        Ok(_) => panic!("expected the refusal {starts:?}, the image opened"),
    }
}

#[test]
fn well_formed_crafted_snapshot_table_parses() {
    // The snapshot's L1 table is cluster 5 (the second cluster after the table).
    let entry = snapshot_entry(5 * 65536, 1, 24);
    let image = Image::open(MemStorage::new(image_with_snapshot_table(1, &entry)), &ro()).unwrap();
    let s = &image.snapshots()[0];
    assert_eq!(
        (s.id.as_slice(), s.name.as_slice()),
        (&b"1"[..], &b"snap"[..])
    );
    assert_eq!((s.l1_table_offset, s.l1_size_entries), (5 * 65536, 1));
    assert_eq!(s.raw.len(), 40 + 24 + 5);
}

#[test]
fn hostile_snapshot_tables_are_invalid_naming_the_snapshot_and_field() {
    let good = snapshot_entry(5 * 65536, 1, 24);

    // More snapshots than QEMU allows: QEMU's refusal and hint (`check -r all` repairs it).
    assert_over_limits(
        image_with_snapshot_table(65537, &good),
        "Snapshot table too large",
    );
    // A count far larger than the table: parsing stops at the entry that runs past the end
    // of the file, having allocated no more than the file holds.
    let no_l1 = snapshot_entry(0, 0, 24);
    let mut many = Vec::new();
    for _ in 0..1500 {
        many.extend_from_slice(&no_l1);
    }
    assert_invalid(
        image_with_snapshot_table(60000, &many),
        &["snapshot 2", "past the end"],
    );
    // An entry whose id and name run past the end of the file.
    let mut long_name = good.clone();
    long_name[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    let mut b = image_with_snapshot_table(1, &long_name);
    b.truncate(4 * 65536 + 1000);
    assert_invalid(b, &["snapshot 0", "past the end"]);
    // Extra data beyond QEMU's limit, within the file or running past its end: QEMU's
    // refusal and hint, before anything past the fixed part is read.
    for extra_data_size in [2000, u32::MAX] {
        let mut big_extra = good.clone();
        put32(&mut big_extra, 36, extra_data_size);
        assert_over_limits(
            image_with_snapshot_table(1, &big_extra),
            "Too much extra metadata in snapshot table entry 0\nYou can force-remove",
        );
    }
    // The snapshot's L1 table past the end of the file, misaligned, too large, or on top of
    // the refcount table.
    let past_eof = snapshot_entry(1 << 40, 1, 24);
    assert_invalid(
        image_with_snapshot_table(1, &past_eof),
        &["snapshot 0", "l1_table_offset", "beyond the end"],
    );
    let misaligned = snapshot_entry(5 * 65536 + 512, 1, 24);
    assert_invalid(
        image_with_snapshot_table(1, &misaligned),
        &["snapshot 0", "l1_table_offset", "aligned"],
    );
    let too_large = snapshot_entry(5 * 65536, 1 << 23, 24);
    assert_invalid(
        image_with_snapshot_table(1, &too_large),
        &["snapshot 0", "l1_size"],
    );
    let on_reftable = snapshot_entry(65536, 1, 24);
    assert_invalid(
        image_with_snapshot_table(1, &on_reftable),
        &["snapshot 0", "refcount table"],
    );
    let on_table = snapshot_entry(4 * 65536, 1, 24);
    assert_invalid(
        image_with_snapshot_table(1, &on_table),
        &["snapshot 0", "snapshot table"],
    );
    // The second of two entries is the bad one: the message names it.
    let mut two = good.clone();
    two.extend_from_slice(&misaligned);
    assert_invalid(
        image_with_snapshot_table(2, &two),
        &["snapshot 1", "l1_table_offset"],
    );
    // The table itself on top of the L1 table.
    let mut b = image_with_snapshot_table(1, &good);
    put64(&mut b, 64, 3 * 65536);
    assert_invalid(b, &["snapshot table", "overlaps"]);
}

/// Snapshot ids and names that are not UTF-8 are kept as the bytes they are, as the backing
/// file name is (QEMU keeps both as bytes): nothing is replaced by U+FFFD.
#[test]
fn snapshot_name_that_is_not_utf8_is_kept_as_bytes() {
    let mut entry = snapshot_entry(5 * 65536, 1, 24);
    let name_at = 40 + 24 + 1;
    entry[name_at..name_at + 4].copy_from_slice(b"s\xffn\xc3");
    let image = Image::open(MemStorage::new(image_with_snapshot_table(1, &entry)), &ro()).unwrap();
    let s = &image.snapshots()[0];
    assert_eq!(s.name, b"s\xffn\xc3");
    assert_eq!(display_name(&s.name), "s\u{fffd}n\u{fffd}");
}

/// Random damage of a snapshot table: open refuses it with an Invalid (or Unsupported)
/// error naming the table, or a check runs; a full repair that reports nothing left leaves
/// nothing for a second check. Both outcomes occur.
#[test]
fn random_snapshot_table_damage_is_refused_or_checked() {
    let mut table = snapshot_entry(5 * 65536, 1, 24);
    table.extend_from_slice(&snapshot_entry(5 * 65536, 1, 16));
    let base = image_with_snapshot_table(2, &table);
    let table_at = 4 * 65536;
    let mut rng = XorShift::new(99);
    let (mut refused, mut checked) = (0, 0);
    for round in 0..3000 {
        let mut b = base.clone();
        for _ in 0..1 + rng.below(4) {
            let at = table_at + rng.below(table.len() as u64 + 8) as usize;
            b[at] = rng.next_u64() as u8;
        }
        if round % 10 == 0 {
            put32(&mut b, 60, rng.next_u64() as u32 % 70000);
        }
        let read_only = round % 2 == 0;
        let opts = if read_only { ro() } else { rw() };
        let mut image = match Image::open(MemStorage::new(b), &opts) {
            Ok(image) => image,
            Err(e) => {
                let over_limits = matches!(e, Error::Refused { errno, .. } if errno == libc::EFBIG);
                assert!(
                    matches!(e, Error::Invalid(_) | Error::Unsupported(_)) || over_limits,
                    "round {round}: {e}"
                );
                assert!(
                    e.to_string().to_lowercase().contains("snapshot"),
                    "round {round}: {e}"
                );
                refused += 1;
                continue;
            }
        };
        let report = image.check(CheckFix::All).unwrap();
        checked += 1;
        if !read_only && report.corruptions == 0 {
            let again = image.check(CheckFix::None).unwrap();
            assert_eq!(
                again.corruptions, 0,
                "round {round}: {report:?} then {again:?}"
            );
        }
    }
    assert!(
        refused > 100 && checked > 100,
        "refused {refused}, checked {checked}"
    );
}

/// Storage that loses every write after the first `budget` (as if the machine stopped
/// there): for checking what a repair leaves on disk at each point.
struct CrashAfter {
    inner: MemStorage,
    budget: std::cell::Cell<u64>,
}

impl qcow2b::engine::Storage for CrashAfter {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        if self.budget.get() == 0 {
            return Err(std::io::Error::other("crashed"));
        }
        self.budget.set(self.budget.get() - 1);
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
}

/// An in-memory image with 4 KiB clusters and data written by the engine.
fn engine_written_4k_image() -> Vec<u8> {
    let mut image = Image::open(
        MemStorage::new(build_image(12, 8 << 20, 3)),
        &OpenOptions::default(),
    )
    .unwrap();
    let mut rng = XorShift::new(3);
    for _ in 0..50 {
        let off = rng.below(8 << 20);
        let len = (1 + rng.below(30_000)).min((8 << 20) - off);
        image.write(off, &vec![0x42; len as usize], None).unwrap();
    }
    image.close_and_keep_bytes()
}

trait CloseAndKeep {
    fn close_and_keep_bytes(self) -> Vec<u8>;
}

impl CloseAndKeep for Image<MemStorage> {
    fn close_and_keep_bytes(mut self) -> Vec<u8> {
        use qcow2b::engine::Storage;
        self.flush().unwrap();
        let storage = self.storage();
        let mut bytes = vec![0u8; storage.len().unwrap() as usize];
        storage.read_at(0, &mut bytes).unwrap();
        bytes
    }
}

#[test]
fn a_crash_at_any_point_of_a_rebuild_leaves_the_old_or_the_new_refcount_structure() {
    let mut broken = engine_written_4k_image();
    // Refcount block 0 goes missing from the refcount table (at cluster 1): only a rebuild
    // repairs that.
    put64(&mut broken, 4096, 0);
    let before = Image::open(MemStorage::new(broken.clone()), &ro())
        .unwrap()
        .check(CheckFix::None)
        .unwrap();
    assert!(before.corruptions > 0, "{before:#?}");

    let mut saw_old = false;
    let mut saw_new = false;
    for budget in 0..40 {
        let storage = CrashAfter {
            inner: MemStorage::new(broken.clone()),
            budget: std::cell::Cell::new(budget),
        };
        let mut image = Image::open(storage, &OpenOptions::default()).unwrap();
        let finished = image.check(CheckFix::All).is_ok();
        let after = image.storage().inner.bytes_after_crash();
        let report = Image::open(MemStorage::new(after.clone()), &ro())
            .unwrap()
            .check(CheckFix::None)
            .unwrap();
        if report.is_clean() {
            saw_new = true;
        } else {
            // The old structure is still in force, and nothing it covers was touched.
            assert_eq!(report.corruptions, before.corruptions, "budget {budget}");
            assert!(after[..broken.len()] == broken[..], "budget {budget}");
            saw_old = true;
        }
        if finished {
            assert!(report.is_clean(), "budget {budget}: {report:#?}");
            break;
        }
    }
    assert!(saw_old && saw_new);
}

trait BytesAfterCrash {
    fn bytes_after_crash(&self) -> Vec<u8>;
}

impl BytesAfterCrash for MemStorage {
    fn bytes_after_crash(&self) -> Vec<u8> {
        use qcow2b::engine::Storage;
        let mut bytes = vec![0u8; self.len().unwrap() as usize];
        self.read_at(0, &mut bytes).unwrap();
        bytes
    }
}

#[test]
fn rebuild_works_at_every_refcount_width_with_small_clusters() {
    for refcount_bits in [1, 2, 8, 16, 64] {
        let f = fixture(
            &format!("cluster_size=512,refcount_bits={refcount_bits}"),
            &["writes"],
        );
        let l = layout_of(&f.img);
        // Refcount block 0 goes missing.
        file_write(&f.img, l.reftable_offset, &0u64.to_be_bytes());
        f.keep_copy();
        let report = check_file(&f.img, &ro(), CheckFix::None);
        assert!(report.corruptions > 0);
        assert_same_as_qemu(&report, &f.img);

        let report = check_file(&f.img, &rw(), CheckFix::All);
        assert!(report.rebuilt_refcounts, "{refcount_bits} bits");
        assert!(report.is_clean(), "{refcount_bits} bits: {report:#?}");
        f.assert_repaired_and_data_unchanged();
    }
}

/// Extended L2 entries (16 bytes: a descriptor, then the subcluster bitmap): a clean image
/// checks with QEMU's figures; invalid bitmaps (a subcluster allocated and reading as zeros,
/// allocated subclusters in an entry without a host cluster) and misaligned host offsets are
/// counted as QEMU's check counts them; a compressed cluster's non-zero bitmap is a
/// corruption too (QEMU then leaves its data uncounted, so it also reports a leak; here it
/// stays counted). Full repair drops a misaligned entry (its allocated subclusters read as
/// zeros, the others as they were, as QEMU repairs an entry without data), clears the
/// compressed cluster's bitmap, and QEMU then finds the image clean.
#[test]
fn extended_l2_entries_are_counted_and_repaired_as_qemu_does() {
    let f = fixture(
        "cluster_size=65536,extended_l2=on",
        &[
            "io:write -c -P 0x44 768k 64k",
            "io:write -P 0x11 0 256k",
            "io:write -z 300k 4k",
            "io:write -P 0x22 514k 2k",
            "io:write -P 0x33 640k 64k",
            "io:write -z 640k 64k",
        ],
    );
    let report = check_file(&f.img, &ro(), CheckFix::None);
    assert_clean(&report, "as QEMU left it");
    assert_same_as_qemu(&report, &f.img);
    let l2 = layout_of(&f.img).l2_of_l1_entry0;
    let entry = |cluster: u64| l2 + 16 * cluster;
    let bitmap = |cluster: u64| l2 + 16 * cluster + 8;

    // Guest cluster 1's subcluster 0 also reads as zeros; guest cluster 6 (no host cluster)
    // has an allocated subcluster.
    let b1 = file_be64(&f.img, bitmap(1));
    file_write(&f.img, bitmap(1), &(b1 | 1 << 32).to_be_bytes());
    file_write(&f.img, bitmap(6), &1u64.to_be_bytes());
    let report = check_file(&f.img, &ro(), CheckFix::None);
    assert_message(
        &report,
        "Allocated cluster has corrupted subcluster allocation bitmap",
    );
    assert_message(
        &report,
        "Unallocated cluster has non-zero subcluster allocation map",
    );
    assert_eq!(report.corruptions, 2, "{report:#?}");
    assert_same_as_qemu(&report, &f.img);
    file_write(&f.img, bitmap(1), &b1.to_be_bytes());
    file_write(&f.img, bitmap(6), &0u64.to_be_bytes());

    // The compressed cluster (guest cluster 12) with a bitmap.
    file_write(&f.img, bitmap(12), &0x1_8000_0000u64.to_be_bytes());
    let report = check_file(&f.img, &ro(), CheckFix::None);
    assert_message(&report, "with non-zero subcluster allocation bitmap");
    let (_, q) = qemu_img_check_json(&f.img);
    assert_eq!((report.corruptions, report.leaks), (1, 0), "{report:#?}");
    assert_eq!(q.u64_or_0("corruptions"), 1);
    assert!(
        q.u64_or_0("leaks") > 0,
        "QEMU's check leaves the data uncounted"
    );

    // Guest cluster 8: data in its subcluster 1, at a misaligned offset; guest cluster 10:
    // a host cluster all of whose subclusters read as zeros, misaligned.
    let e8 = file_be64(&f.img, entry(8));
    file_write(&f.img, entry(8), &(e8 + 0x200).to_be_bytes());
    let e10 = file_be64(&f.img, entry(10));
    file_write(&f.img, entry(10), &(e10 + 0x200).to_be_bytes());
    file_write(&f.img, bitmap(12), &0u64.to_be_bytes());
    let report = check_file(&f.img, &ro(), CheckFix::None);
    assert_message(&report, "Data cluster is not properly aligned");
    assert_message(&report, "Preallocated cluster is not properly aligned");
    assert_same_as_qemu(&report, &f.img);

    file_write(&f.img, bitmap(12), &0x1_8000_0000u64.to_be_bytes());
    let report = check_file(&f.img, &rw(), CheckFix::All);
    assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:#?}");
    qemu_img_check(&f.img);
    assert_eq!(file_be64(&f.img, entry(8)), 0);
    assert_eq!(
        file_be64(&f.img, bitmap(8)),
        1 << 33,
        "subcluster 1 reads as zeros"
    );
    assert_eq!(file_be64(&f.img, bitmap(12)), 0);
    qemu_io(
        &f.img,
        &[
            "read -P 0x11 0 256k",
            "read -P 0 512k 192k",
            "read -P 0x44 768k 64k",
        ],
    );
}
