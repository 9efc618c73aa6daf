//! Every function C calls runs inside the FFI guard: the only way to write one is the
//! `entries!` macro of `src/glue/ffi.rs`, which makes the trampoline around the guard. This
//! test reads the sources and fails when an `extern "C" fn` is written by hand anywhere else,
//! so an entry cannot be added without the guard. (The glue's test doubles of QEMU's own
//! functions, `src/glue/qemu_stubs.rs`, are QEMU's side of the edge, called from Rust.)

use std::path::{Path, PathBuf};

/// The `extern "C" fn` definitions written in `text`, by name (declarations in `extern "C"`
/// blocks are not definitions and are not listed; nor is the macro's `$name` pattern).
fn hand_written_entries(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("extern \"C\"") {
            rest = &rest[at + "extern \"C\"".len()..];
            let after = rest.trim_start();
            let Some(after_fn) = after.strip_prefix("fn") else {
                continue;
            };
            let name: String = after_fn
                .trim_start()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push(name);
            }
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_extern_c_fn_is_written_outside_the_guard_macro() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 20, "the sources were not found");
    let mut offenders = Vec::new();
    for file in files {
        if file.ends_with("glue/qemu_stubs.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for name in hand_written_entries(&text) {
            offenders.push(format!("{}: {name}", file.display()));
        }
    }
    assert!(
        offenders.is_empty(),
        "extern \"C\" functions written by hand, outside ffi::entries! (the guard): {offenders:#?}"
    );
}

#[test]
fn every_callback_of_the_driver_table_is_made_by_the_macro() {
    let glue = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/glue/driver.rs");
    let text = std::fs::read_to_string(glue).unwrap();
    let callbacks: Vec<&str> = text
        .split("Some(qcow2b_")
        .skip(1)
        .map(|rest| rest.split(')').next().unwrap())
        .collect();
    assert!(callbacks.len() >= 25, "{callbacks:?}");
    for name in callbacks {
        // Defined as `fn qcow2b_NAME(` inside an `entries!` block: the only other way to
        // write it, `extern "C" fn`, is what the test above forbids.
        assert!(
            text.contains(&format!("\nfn qcow2b_{name}(")),
            "qcow2b_{name} is not made by entries!"
        );
    }
}

/// Negative control: the scan finds a hand-written entry, in any of its spellings, and
/// passes over declarations and comments.
#[test]
fn the_scan_finds_a_hand_written_entry() {
    let text = r#"
        unsafe extern "C" fn qcow2b_new_callback(bs: *mut BlockDriverState) -> c_int { 0 }
        pub extern "C" fn exported() {}
        extern "C" { fn declared_elsewhere(); }
        // unsafe extern "C" fn in_a_comment() {}
        $vis unsafe extern "C" fn $name($($arg: $ty),*)
    "#;
    assert_eq!(
        hand_written_entries(text),
        vec!["qcow2b_new_callback".to_string(), "exported".to_string()]
    );
}
