//! Every input that ever broke a fuzz target (fuzz/regressions/<target>/) replays through the
//! target's body, whose own checks (model reads, clean after close, no panic) must hold. A
//! target's folder exists once it has an input (no empty placeholders): each folder must name
//! a target and hold at least one input, and every input must replay.

use std::path::Path;

type Target = (&'static str, fn(&[u8]));

const TARGETS: [Target; 5] = [
    ("header", qcow2b::fuzzing::header::run),
    ("tables", qcow2b::fuzzing::tables::run),
    ("snapshots", qcow2b::fuzzing::snapshots::run),
    ("compressed", qcow2b::fuzzing::compressed::run),
    ("whole", qcow2b::fuzzing::whole::run),
];

/// The inputs of one folder, each replayed; their names.
fn replay(dir: &Path, run: fn(&[u8])) -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| run(&data));
        assert!(result.is_ok(), "{} fails again", path.display());
        names.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    names
}

#[test]
fn every_regression_input_replays_through_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut replayed = Vec::new();
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_dir() {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let (_, run) = TARGETS
            .iter()
            .find(|(t, _)| *t == name)
            .unwrap_or_else(|| panic!("fuzz/regressions/{name} is not a fuzz target"));
        let inputs = replay(&path, *run);
        assert!(!inputs.is_empty(), "fuzz/regressions/{name} holds no input");
        replayed.extend(inputs.into_iter().map(|i| format!("{name}/{i}")));
    }
    // The findings the README names are among them.
    for finding in [
        "whole/shared-cluster-left-without-copied",
        "whole/table-shared-with-data-left-without-copied",
        "whole/reference-past-eof-after-script",
        "whole/growth-exposes-entries-past-the-end",
    ] {
        assert!(
            replayed.iter().any(|r| r == finding),
            "{finding} is gone: {replayed:?}"
        );
    }
}

#[test]
fn the_seed_corpus_runs_clean_through_every_target() {
    // The seeds are real images: the targets' checks (model reads, clean after close) hold.
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, run) in TARGETS {
        let seeds = replay(&corpus.join(target), run);
        assert!(!seeds.is_empty(), "no seeds for {target}");
    }
}

/// The seed corpus holds images with extended L2 entries (incompatible feature bit 4), and
/// the targets take them in: each opens (before subclusters, every such image was refused at
/// open, and the targets stopped there) and answers with subclusters.
#[test]
fn the_targets_open_the_extended_l2_seeds() {
    use qcow2b::engine::{Image, MemStorage, OpenOptions};
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let extended = |image: &[u8]| image.get(79).is_some_and(|b| b & 1 << 4 != 0);
    let mut opened = Vec::new();
    for (target, header_at) in [("tables", 0), ("whole", 4)] {
        for entry in std::fs::read_dir(corpus.join(target)).unwrap() {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let image = &data[header_at..];
            if !extended(image) {
                continue;
            }
            let opts = OpenOptions {
                read_only: true,
                ..OpenOptions::default()
            };
            let len = if header_at == 0 {
                image.len()
            } else {
                u32::from_le_bytes(data[..4].try_into().unwrap()) as usize
            };
            let opened_image = Image::open(MemStorage::new(image[..len].to_vec()), &opts)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(opened_image.has_subclusters(), "{}", path.display());
            opened.push(format!(
                "{target}/{}",
                path.file_name().unwrap().to_string_lossy()
            ));
        }
    }
    for seed in [
        "tables/v3-extl2",
        "tables/v3-extl2-zlib",
        "whole/v3-extl2-prealloc",
    ] {
        assert!(
            opened.iter().any(|o| o == seed),
            "{seed} missing: {opened:?}"
        );
    }
}
