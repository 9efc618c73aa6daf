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
