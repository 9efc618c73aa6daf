//! Every input that ever broke a fuzz target (fuzz/regressions/<target>/) replays through the
//! target's body: no panic, and the target's own checks hold. A folder without inputs passes
//! trivially; the fuzz run itself is `fuzz/run.sh`.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("the regressions folder exists") {
        let path = entry.unwrap().path();
        if path.file_name().is_some_and(|n| n == ".keep") {
            continue;
        }
        let data = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| run(&data));
        assert!(result.is_ok(), "{} fails again", path.display());
        n += 1;
    }
    n
}

#[test]
fn header_regressions_replay() {
    replay("header", qcow2b::fuzzing::header::run);
}

#[test]
fn tables_regressions_replay() {
    replay("tables", qcow2b::fuzzing::tables::run);
}

#[test]
fn snapshots_regressions_replay() {
    replay("snapshots", qcow2b::fuzzing::snapshots::run);
}

#[test]
fn compressed_regressions_replay() {
    replay("compressed", qcow2b::fuzzing::compressed::run);
}

#[test]
fn whole_regressions_replay() {
    replay("whole", qcow2b::fuzzing::whole::run);
}

#[test]
fn the_seed_corpus_runs_clean_through_every_target() {
    // The seeds are real images: the targets' checks (model reads, clean after close) hold.
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    type Target = (&'static str, fn(&[u8]));
    let targets: [Target; 5] = [
        ("header", qcow2b::fuzzing::header::run),
        ("tables", qcow2b::fuzzing::tables::run),
        ("snapshots", qcow2b::fuzzing::snapshots::run),
        ("compressed", qcow2b::fuzzing::compressed::run),
        ("whole", qcow2b::fuzzing::whole::run),
    ];
    for (target, run) in targets {
        for entry in std::fs::read_dir(corpus.join(target)).unwrap() {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            run(&data);
        }
    }
}
