//! Generates the QEMU bindings for the glue (feature `qemu`).
//!
//! bindgen reads include/qcow2b-qemu.h with the same include paths and defines QEMU's own
//! build used for block/qcow2.c (taken from the build directory's compile_commands.json), so
//! the layouts match the C side exactly. Without the `qemu` feature nothing is generated and
//! the pure-Rust engine builds and tests on its own.

use std::env;
use std::path::{Path, PathBuf};

/// What bindgen may emit: the block-driver interface and the helpers the glue calls.
const ALLOW_TYPES: &[&str] = &[
    "BlockDriver",
    "BlockDriverState",
    "BdrvChild",
    "BdrvCheckResult",
    "BdrvCheckMode",
    "BlockDriverInfo",
    "QEMUSnapshotInfo",
    "BlockReopenQueue",
    "BDRVReopenState",
    "BdrvRequestFlags",
    "BdrvChildRole",
    "BdrvChildRoleBits",
    "CoMutex",
    "CoQueue",
    "QemuLockable",
    "QEMUIOVector",
    "QemuOpts",
    "QemuOptsList",
    "QemuOptDesc",
    "QemuOptType",
    "QDict",
    "Error",
    "BlockBackend",
    "BlockMeasureInfo",
    "ImageInfoSpecific",
    "ImageInfoSpecificQCow2",
    "BlockStatsSpecific",
    "BlockStatsSpecificQcow2b",
    "BlockdevDriver",
    "BlockdevCreateOptions",
    "Qcow2bCounters",
    "PreallocMode",
    "Qcow2CompressionType",
    "BlkdebugEvent",
    "QemuCoSleep",
    "QEMUClockType",
    "QEMUTimer",
    "AioContext",
    "QCryptoBlock",
    "QCryptoBlockOpenOptions",
    "QCryptoBlockCreateOptions",
    "QCryptoBlockInfo",
    "QCryptoBlockOpenFlags",
    "QCryptoBlockReadFunc",
    "QCryptoBlockInitFunc",
    "QCryptoBlockWriteFunc",
    "ImageInfoSpecificQCow2Encryption",
    "BlockdevQcow2EncryptionFormat",
    "BdrvDirtyBitmap",
    "Qcow2BitmapInfo",
    "Qcow2BitmapInfoList",
    "Qcow2BitmapInfoFlags",
    "Qcow2BitmapInfoFlagsList",
];
const ALLOW_FUNCTIONS: &[&str] = &[
    "bdrv_register",
    "bdrv_open_file_child",
    "bdrv_open_child",
    "bdrv_child_refresh_perms",
    "bdrv_open_backing_file",
    "bdrv_default_perms",
    "bdrv_co_preadv",
    "bdrv_co_preadv_part",
    "bdrv_co_pwritev",
    "bdrv_co_pwritev_part",
    "bdrv_co_flush",
    "bdrv_co_barrier",
    "bdrv_co_pwrite_zeroes",
    "bdrv_co_pdiscard",
    "bdrv_pdiscard",
    "bdrv_co_pread",
    "bdrv_co_pwrite",
    "bdrv_pread",
    "bdrv_pwrite",
    "bdrv_flush",
    "bdrv_getlength",
    "bdrv_get_allocated_file_size",
    "bdrv_co_truncate",
    "bdrv_truncate",
    "bdrv_is_read_only",
    "bdrv_get_aio_context",
    "qemu_co_mutex_init",
    "qemu_co_mutex_lock",
    "qemu_co_mutex_unlock",
    "qemu_in_coroutine",
    "qemu_co_queue_init",
    "qemu_co_queue_wait_impl",
    "qemu_co_queue_restart_all",
    "qemu_co_queue_empty",
    "qemu_iovec_add",
    "qemu_iovec_concat",
    "qemu_opts_create",
    "qemu_opts_absorb_qdict",
    "qemu_opts_del",
    "qemu_opt_get_size",
    "qemu_opt_get_bool_del",
    "qemu_opt_get_number_del",
    "g_free",
    "bdrv_create_file",
    "bdrv_open_blockdev_ref",
    "bdrv_unref",
    "blk_new_with_bs",
    "qapi_enum_lookup",
    "bdrv_block_status_above",
    "blk_new_open",
    "blk_unref",
    "blk_pread",
    "blk_pwrite",
    "blk_flush",
    "blk_co_barrier",
    "blk_barrier",
    "blk_getlength",
    "blk_truncate",
    "blk_set_allow_write_beyond_eof",
    "qemu_opt_get_bool",
    "qemu_opt_get_number",
    "g_malloc0",
    "bdrv_skip_filters",
    "bdrv_inc_in_flight",
    "bdrv_dec_in_flight",
    "aio_co_enter",
    "aio_poll",
    "qemu_coroutine_create",
    "qemu_co_queue_next",
    "g_strdup",
    "qemu_iovec_init",
    "qemu_iovec_destroy",
    "qemu_iovec_to_buf",
    "qemu_iovec_from_buf",
    "qemu_iovec_memset",
    "error_setg_internal",
    "error_report",
    "error_printf",
    "error_setg_errno_internal",
    "qdict_get_try_str",
    "qdict_del",
    "qdict_haskey",
    "qdict_join",
    "qemu_opt_get",
    "qemu_opt_get_size_del",
    "qemu_opt_get_del",
    "qemu_co_sleep_wake",
    "bdrv_debug_event",
    "bdrv_drained_begin",
    "bdrv_drained_end",
    "bdrv_co_pwrite_zeroes",
    "bdrv_co_pdiscard",
    "qemu_co_sleep_ns_wakeable",
    "timer_init_full",
    "timer_mod",
    "timer_del",
    "timer_deinit",
    "timer_pending",
    "qemu_clock_get_ns",
    "qcrypto_block_open",
    "qcrypto_block_create",
    "qcrypto_block_encrypt",
    "qcrypto_block_decrypt",
    "qcrypto_block_free",
    "qcrypto_block_get_sector_size",
    "qcrypto_block_get_info",
    "qcrypto_block_calculate_payload_offset",
    "block_crypto_open_opts_init",
    "block_crypto_create_opts_init",
    "qapi_free_QCryptoBlockOpenOptions",
    "qapi_free_QCryptoBlockCreateOptions",
    "qapi_free_QCryptoBlockInfo",
    "qdict_new",
    "qdict_put_str",
    "qdict_extract_subqdict",
    "qemu_opts_to_qdict",
    "qobject_destroy",
    "bdrv_uses_whitelist",
    "error_append_hint",
    "error_get_pretty",
    "error_free",
    "bdrv_create_dirty_bitmap",
    "bdrv_release_dirty_bitmap",
    "bdrv_find_dirty_bitmap",
    "bdrv_dirty_bitmap_first",
    "bdrv_dirty_bitmap_next",
    "bdrv_dirty_bitmap_name",
    "bdrv_dirty_bitmap_granularity",
    "bdrv_dirty_bitmap_size",
    "bdrv_dirty_bitmap_enabled",
    "bdrv_disable_dirty_bitmap",
    "bdrv_dirty_bitmap_get_persistence",
    "bdrv_dirty_bitmap_set_persistence",
    "bdrv_dirty_bitmap_inconsistent",
    "bdrv_dirty_bitmap_set_inconsistent",
    "bdrv_dirty_bitmap_readonly",
    "bdrv_dirty_bitmap_set_readonly",
    "bdrv_dirty_bitmap_serialization_size",
    "bdrv_dirty_bitmap_serialize_part",
    "bdrv_dirty_bitmap_deserialize_part",
    "bdrv_dirty_bitmap_deserialize_finish",
    "bdrv_get_device_or_node_name",
];
const ALLOW_VARS: &[&str] = &[
    "BDRV_.*",
    "BDRV_O_.*",
    "BDRV_REQ_.*",
    "BDRV_BLOCK_.*",
    "child_of_bds",
    "BlockdevDriver_lookup",
    "BLK_PERM_.*",
    "QCRYPTO_BLOCK_OPEN_.*",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=include/qcow2b-qemu.h");
    println!("cargo:rerun-if-env-changed=QCOW2B_QEMU_SRC");
    println!("cargo:rerun-if-env-changed=QCOW2B_QEMU_BUILD");
    if env::var_os("CARGO_FEATURE_QEMU").is_none() {
        return;
    }

    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let qemu_build = env::var_os("QCOW2B_QEMU_BUILD")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join(".build/qemu-build"));
    let commands = qemu_build.join("compile_commands.json");
    if !commands.is_file() {
        fail(&format!(
            "the `qemu` feature needs a configured QEMU tree, and {} does not exist.\n\
             Run `bash scripts/setup.sh` (or scripts/fetch-qemu.sh and scripts/build.sh), or set\n\
             QCOW2B_QEMU_BUILD to a configured QEMU 7.2 build directory.\n\
             The pure-Rust engine needs none of this: `cargo test` builds without the feature.",
            commands.display()
        ));
    }
    println!("cargo:rerun-if-changed={}", commands.display());
    // The patched tree's stamp (scripts/fetch-qemu.sh): a change of qemu-patches/ can change
    // the layout of what is bound here (a new BlockDriver callback, a new QAPI member), and
    // compile_commands.json does not change with it. The tree is QCOW2B_QEMU_SRC, or else
    // the build directory's sibling qemu-src (scripts/lib.sh's layout).
    let src = env::var_os("QCOW2B_QEMU_SRC")
        .map(PathBuf::from)
        .or_else(|| qemu_build.parent().map(|p| p.join("qemu-src")));
    if let Some(src) = src {
        let stamp = src.join(".qcow2b-patched");
        if stamp.is_file() {
            println!("cargo:rerun-if-changed={}", stamp.display());
        }
    }

    let flags = qemu_cflags(&qemu_build, &commands);
    let mut builder = bindgen::Builder::default()
        .header(manifest.join("include/qcow2b-qemu.h").to_string_lossy())
        .clang_args(&flags)
        .use_core()
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false)
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        .size_t_is_usize(true);
    for t in ALLOW_TYPES {
        builder = builder.allowlist_type(t);
    }
    for f in ALLOW_FUNCTIONS {
        builder = builder.allowlist_function(f);
    }
    for v in ALLOW_VARS {
        builder = builder.allowlist_var(v);
    }
    #[cfg(feature = "glue-tests")]
    compile_test_doubles(&manifest);
    let bindings = builder
        .generate()
        .unwrap_or_else(|e| fail(&format!("bindgen failed: {e}")));
    let out =
        PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("qemu_bindings.rs");
    bindings
        .write_to_file(&out)
        .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", out.display())));
}

/// The test doubles of QEMU's variadic reporting functions, for the glue's tests (Rust
/// cannot define a variadic function): they format the message and hand it to the Rust test
/// doubles (`src/glue/qemu_stubs.rs`).
#[cfg(feature = "glue-tests")]
fn compile_test_doubles(manifest: &Path) {
    println!("cargo:rerun-if-changed=src/glue/qemu_stubs.c");
    cc::Build::new()
        .file(manifest.join("src/glue/qemu_stubs.c"))
        .compile("qcow2b_qemu_stubs");
}

/// The include paths, defines and language flags QEMU compiles block/qcow2.c with.
fn qemu_cflags(build: &Path, commands: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(commands)
        .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", commands.display())));
    // compile_commands.json is a flat array of {directory, command, file}; find qcow2.c's entry
    // without a JSON parser: its "command" string is on the line before its "file".
    let marker = "block/qcow2.c\"";
    let pos = text
        .find(marker)
        .unwrap_or_else(|| fail("compile_commands.json has no entry for block/qcow2.c"));
    let entry_start = text[..pos].rfind('{').unwrap_or(0);
    let entry = &text[entry_start..pos];
    let cmd_key = "\"command\": \"";
    let cmd_start = entry
        .find(cmd_key)
        .map(|i| i + cmd_key.len())
        .unwrap_or_else(|| fail("compile_commands.json entry has no command"));
    let cmd_end = entry[cmd_start..]
        .find('"')
        .map(|i| cmd_start + i)
        .unwrap_or(entry.len());
    let words: Vec<&str> = entry[cmd_start..cmd_end].split_whitespace().collect();

    let abs = |p: &str| -> String {
        let path = Path::new(p);
        if path.is_absolute() {
            p.to_string()
        } else {
            build.join(path).to_string_lossy().into_owned()
        }
    };
    let mut flags = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let w = words[i];
        if let Some(dir) = w.strip_prefix("-I") {
            flags.push(format!("-I{}", abs(dir)));
        } else if w == "-isystem" || w == "-iquote" {
            if let Some(dir) = words.get(i + 1) {
                flags.push(w.to_string());
                flags.push(abs(dir));
                i += 1;
            }
        } else if w.starts_with("-D")
            || w.starts_with("-U")
            || w.starts_with("-std=")
            || w == "-pthread"
        {
            flags.push(w.to_string());
        }
        i += 1;
    }
    flags
}

fn fail(msg: &str) -> ! {
    eprintln!("\nqcow2b build: {msg}\n");
    std::process::exit(1);
}
