//! The administrator's switch: qcow2b serves the format name `qcow2`.
//!
//! VM platforms name the format themselves (libvirt's `<driver type='qcow2'/>` becomes
//! `-blockdev {"driver":"qcow2",...}`; Proxmox and OpenStack write `qcow2` into every command
//! line and QMP call), so qcow2b reaches their VMs only if it answers to that name. With the
//! switch on, a second copy of qcow2b's driver table is registered under the name `qcow2`
//! after every other block driver, and QEMU's own qcow2 is no longer found by name
//! (`bdrv_find_format` returns the driver registered last) nor by probing (the copy scores
//! above it). With the switch off nothing is registered: QEMU's qcow2 serves `qcow2`.
//!
//! Why a configuration file, read once when the block layer starts (`bdrv_init`, so every
//! tool: qemu-system, qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon):
//! - libvirt starts QEMU with a scrubbed environment (libvirt 9.0's `qemuProcessLaunch`
//!   clears it and passes on only a few variables: `LC_ALL`, `PATH`, `HOME`, the XDG
//!   folders, ...), so an environment variable set for a host service never reaches the
//!   emulator; Proxmox and OpenStack (through libvirt) are alike. A file in QEMU's
//!   configuration folder (`<sysconfdir>/qemu/qcow2b.conf`, next to `bridge.conf`) is seen by
//!   every QEMU process on the host, whoever starts it;
//! - `BlockdevOptionsQcow2` has no barrier members (management tools could not pass them
//!   anyway), so the file also carries the barrier settings of the nodes served this way;
//! - once at start: a node's behaviour never changes under a running VM, and a bad file stops
//!   the process at start with a message naming the file and the line, never a silent
//!   fallback to QEMU's qcow2.
//!
//! `QCOW2B_CONF=FILE` in the environment names another file (tests, or a per-VM choice
//! through libvirt's `<qemu:env>`); a file named that way must exist. An empty file (only
//! comments) leaves the switch off.
//!
//! The served nodes are qcow2b nodes in every respect but the name: the same callbacks, the
//! same runtime options (every member of QEMU 7.2's `BlockdevOptionsQcow2`, see
//! `runtime_opts.rs`), qcow2's image information (`query-block`, `qemu-img info`: format
//! `qcow2`, the qcow2 format-specific block) and qcow2b's statistics under their own name
//! (`query-blockstats` `driver-specific` with `"driver": "qcow2b"`, qemu-io's `info`). The
//! barrier options are refused on a served node: its settings are the file's.

use std::ffi::{c_char, c_int, CStr, CString, OsString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::bindings::{self, BDRVReopenState, BlockDriver, BlockReopenQueue, QDict};
use super::ffi::entries;
use crate::engine::format::header::looks_like_qcow2;
use crate::engine::Error;
use crate::ordering::{BarrierMode, BarrierOptions};

/// The variable that names the configuration file instead of the default one.
pub const CONF_VARIABLE: &str = "QCOW2B_CONF";
/// The file's name in QEMU's configuration folder.
pub const CONF_FILE_NAME: &str = "qcow2b.conf";

/// The settings the file may hold; the barrier ones are spelled as qcow2b's driver options.
const SERVE: &str = "serve-qcow2";
const BARRIER_KEYS: [&str; 5] = [
    "barrier",
    "barrierfs-syscall",
    "buffer-size",
    "txg-max-bytes",
    "txg-max-age-ms",
];
/// qcow2b's options that choose the barrier behaviour of a node: a served node takes them
/// from the file only.
const NODE_BARRIER_OPTIONS: [&CStr; 7] = [
    c"barrier",
    c"barrierfs-syscall",
    c"x-barrierfs-inject",
    c"buffer-size",
    c"txg-max-bytes",
    c"txg-max-age-ms",
    c"x-test-skip-ordering",
];

/// What the configuration file says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeConfig {
    /// Where it was read from (for messages).
    pub path: PathBuf,
    /// Whether qcow2b serves the format name `qcow2`.
    pub serve_qcow2: bool,
    /// The barrier mode of the served nodes, with its bounds.
    pub mode: BarrierMode,
}

impl ServeConfig {
    /// The driver options that give a node [`ServeConfig::mode`], as `(key, value)`.
    fn node_options(&self) -> Vec<(CString, CString)> {
        self.mode
            .describe()
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((CString::new(k).ok()?, CString::new(v).ok()?)))
            .collect()
    }
}

/// Which file to read: `QCOW2B_CONF` if set (then it must exist), else `qcow2b.conf` in
/// QEMU's configuration folder (its absence leaves the switch off).
pub fn config_path(confdir: &Path, variable: Option<OsString>) -> (PathBuf, bool) {
    match variable {
        Some(named) => (PathBuf::from(named), true),
        None => (confdir.join(CONF_FILE_NAME), false),
    }
}

/// A size as QEMU's options write one: bytes, or a number with a K, M, G or T suffix
/// (powers of 1024).
fn parse_size(value: &str) -> Option<u64> {
    let (digits, shift) = match value.as_bytes().last()? {
        b'k' | b'K' => (&value[..value.len() - 1], 10),
        b'm' | b'M' => (&value[..value.len() - 1], 20),
        b'g' | b'G' => (&value[..value.len() - 1], 30),
        b't' | b'T' => (&value[..value.len() - 1], 40),
        _ => (value, 0),
    };
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1u64 << shift)
}

/// Reads the configuration file's text. `path` is named in every message.
///
/// The format: one `key = value` a line, `#` starts a comment, blank lines are ignored.
/// Keys: `serve-qcow2` (`on` or `off`, required unless the file holds no setting at all),
/// and the barrier settings of qcow2b's driver options (`barrier`, `barrierfs-syscall`,
/// `buffer-size`, `txg-max-bytes`, `txg-max-age-ms`) with their meaning and checks.
pub fn parse_config(text: &str, path: &Path) -> Result<ServeConfig, String> {
    let at = |line: usize, what: String| {
        format!(
            "qcow2b configuration {}, line {line}: {what}",
            path.display()
        )
    };
    let mut serve_qcow2 = None;
    let mut barrier: Vec<(&str, String, usize)> = Vec::new();
    let mut settings = 0;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let Some((key, value)) = content.split_once('=') else {
            return Err(at(
                line,
                format!("expected 'key = value', found '{content}'"),
            ));
        };
        let (key, value) = (key.trim(), value.trim());
        if value.is_empty() {
            return Err(at(line, format!("'{key}' has no value")));
        }
        settings += 1;
        if key == SERVE {
            if serve_qcow2.is_some() {
                return Err(at(line, format!("'{SERVE}' is set twice")));
            }
            serve_qcow2 = Some(match value {
                "on" => true,
                "off" => false,
                other => {
                    return Err(at(
                        line,
                        format!("'{SERVE}' is 'on' or 'off', not '{other}'"),
                    ))
                }
            });
        } else if let Some(&known) = BARRIER_KEYS.iter().find(|&&k| k == key) {
            if barrier.iter().any(|(k, _, _)| *k == known) {
                return Err(at(line, format!("'{known}' is set twice")));
            }
            barrier.push((known, value.to_string(), line));
        } else {
            return Err(at(
                line,
                format!(
                    "unknown setting '{key}' (known: {SERVE}, {})",
                    BARRIER_KEYS.join(", ")
                ),
            ));
        }
    }
    let number = |key: &str, size: bool| -> Result<Option<u64>, String> {
        let Some((_, value, line)) = barrier.iter().find(|(k, _, _)| *k == key) else {
            return Ok(None);
        };
        let parsed = if size {
            parse_size(value)
        } else {
            value.parse().ok()
        };
        match parsed {
            Some(n) => Ok(Some(n)),
            None if size => Err(at(
                *line,
                format!("'{key}' is a size (bytes, or with K, M, G, T), not '{value}'"),
            )),
            None => Err(at(*line, format!("'{key}' is a number, not '{value}'"))),
        }
    };
    let syscall = number("barrierfs-syscall", false)?;
    let mode = BarrierMode::from_options(BarrierOptions {
        mode: barrier
            .iter()
            .find(|(k, _, _)| *k == "barrier")
            .map(|(_, v, _)| v.as_str()),
        syscall: match syscall {
            Some(n) => Some(i64::try_from(n).map_err(|_| {
                format!(
                    "qcow2b configuration {}: barrierfs-syscall {n} is not a system call number",
                    path.display()
                )
            })?),
            None => None,
        },
        inject: false,
        buffer_bytes: number("buffer-size", true)?,
        txg_max_bytes: number("txg-max-bytes", true)?,
        txg_max_age_ms: number("txg-max-age-ms", false)?,
    })
    .map_err(|e| format!("qcow2b configuration {}: {e}", path.display()))?;
    let serve_qcow2 = match (serve_qcow2, settings) {
        (Some(on), _) => on,
        // A file without any setting (empty, or only comments) leaves the switch off.
        (None, 0) => false,
        (None, _) => {
            return Err(format!(
                "qcow2b configuration {}: '{SERVE} = on' or '{SERVE} = off' is missing",
                path.display()
            ))
        }
    };
    Ok(ServeConfig {
        path: path.to_path_buf(),
        serve_qcow2,
        mode,
    })
}

/// Reads the file [`config_path`] chooses: `None` when it is the default one and absent.
pub fn read_config(
    confdir: &Path,
    variable: Option<OsString>,
) -> Result<Option<ServeConfig>, String> {
    let (path, required) = config_path(confdir, variable);
    match std::fs::read_to_string(&path) {
        Ok(text) => parse_config(&text, &path).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(None),
        Err(e) => Err(format!(
            "qcow2b configuration {}{}: {e}",
            path.display(),
            if required {
                format!(" (named by {CONF_VARIABLE})")
            } else {
                String::new()
            }
        )),
    }
}

/// What the served table needs at run time: the file's settings and qcow2b's own entries.
struct Served {
    config: ServeConfig,
    open: unsafe extern "C" fn(
        *mut bindings::BlockDriverState,
        *mut QDict,
        c_int,
        *mut *mut bindings::Error,
    ) -> c_int,
    reopen_prepare: unsafe extern "C" fn(
        *mut BDRVReopenState,
        *mut BlockReopenQueue,
        *mut *mut bindings::Error,
    ) -> c_int,
}

/// The qcow2b table as `qcow2b_register` registered it (an address: the table is leaked and
/// never changed after registration).
static QCOW2B_TABLE: OnceLock<usize> = OnceLock::new();
/// Set once, when the switch is on.
static SERVED: OnceLock<Served> = OnceLock::new();

/// What the served table's entries stand on (set before the table is registered).
fn served() -> Result<&'static Served, Error> {
    SERVED
        .get()
        .ok_or_else(|| Error::BadOption("qcow2b does not serve qcow2 in this process".into()))
}

/// Called by `qcow2b_register` with the table it registered.
pub fn remember_qcow2b_table(drv: &'static BlockDriver) {
    let _ = QCOW2B_TABLE.set(drv as *const BlockDriver as usize);
}

static SERVED_NAME: &CStr = c"qcow2";

/// Refuses the barrier options on a served node and adds the file's.
///
/// # Safety
/// `options` is a valid QDict.
unsafe fn apply_config(options: *mut QDict, served: &Served) -> Result<(), Error> {
    for key in NODE_BARRIER_OPTIONS {
        // SAFETY: per the caller; the key is NUL-terminated.
        if unsafe { bindings::qdict_haskey(options, key.as_ptr()) } != 0 {
            return Err(Error::BadOption(format!(
                "'{}' is not an option of format 'qcow2' served by qcow2b: its barrier \
                 settings come from {} ({}); name driver=qcow2b to choose them per node",
                key.to_string_lossy(),
                served.config.path.display(),
                served.config.mode.describe()
            )));
        }
    }
    for (key, value) in served.config.node_options() {
        // SAFETY: per the caller; both strings are NUL-terminated and copied by QEMU.
        unsafe { bindings::qdict_put_str(options, key.as_ptr(), value.as_ptr()) };
    }
    Ok(())
}

entries! {
/// `bdrv_open` of the served table: qcow2b's, with the file's barrier settings.
fn served_open(
    bs: *mut bindings::BlockDriverState,
    options: *mut QDict,
    flags: c_int,
    errp: *mut *mut bindings::Error,
) -> Result<c_int, Error>, errp = errp {
    let served = served()?;
    // SAFETY: QEMU passes a valid node, options and errp, as qcow2b's open expects them.
    unsafe {
        apply_config(options, served)?;
        Ok((served.open)(bs, options, flags, errp))
    }
}

/// `bdrv_reopen_prepare` of the served table: qcow2b's, with the file's barrier settings
/// (so a reopen keeps the node's mode).
fn served_reopen_prepare(
    state: *mut BDRVReopenState,
    queue: *mut BlockReopenQueue,
    errp: *mut *mut bindings::Error,
) -> Result<c_int, Error>, errp = errp {
    let served = served()?;
    // SAFETY: QEMU passes a valid reopen state with its options, and errp.
    unsafe {
        apply_config((*state).options, served)?;
        Ok((served.reopen_prepare)(state, queue, errp))
    }
}

/// Probing of the served table: a qcow2 header scores above QEMU's qcow2 (100), so a qcow2
/// image opened without a format name is served by qcow2b.
fn served_probe(buf: *const u8, buf_size: c_int, _filename: *const c_char) -> c_int {
    if buf.is_null() || buf_size < 8 {
        return 0;
    }
    // SAFETY: QEMU passes buf_size readable bytes (checked above: at least 8).
    let head = unsafe { std::slice::from_raw_parts(buf, 8) };
    if looks_like_qcow2(head) {
        101
    } else {
        0
    }
}

/// Called once from `bdrv_init` (qemu-patches/0020), after every block driver registered:
/// reads the configuration file and, if it says `serve-qcow2 = on`, registers qcow2b's table
/// under the name `qcow2`. Returns 0, or -EINVAL with `errp` set for a bad file (the caller
/// stops the process).
#[no_mangle]
pub fn qcow2b_serve_formats(
    confdir: *const c_char,
    errp: *mut *mut bindings::Error,
) -> Result<c_int, Error>, errp = errp {
    let confdir = if confdir.is_null() {
        PathBuf::new()
    } else {
        // SAFETY: C passes a NUL-terminated path.
        PathBuf::from(unsafe { CStr::from_ptr(confdir) }.to_string_lossy().into_owned())
    };
    let Some(config) =
        read_config(&confdir, std::env::var_os(CONF_VARIABLE)).map_err(Error::BadOption)?
    else {
        return Ok(0);
    };
    if !config.serve_qcow2 {
        return Ok(0);
    }
    let &table = QCOW2B_TABLE
        .get()
        .ok_or_else(|| Error::BadOption("the qcow2b driver is not registered".into()))?;
    // SAFETY: the table qcow2b_register leaked; it is never written after registration.
    let qcow2b = unsafe { &*(table as *const BlockDriver) };
    let (Some(open), Some(reopen_prepare)) = (qcow2b.bdrv_open, qcow2b.bdrv_reopen_prepare) else {
        return Err(Error::BadOption("the qcow2b table has no open or reopen".into()));
    };
    if SERVED
        .set(Served {
            config,
            open,
            reopen_prepare,
        })
        .is_err()
    {
        return Err(Error::BadOption("qcow2b already serves qcow2 in this process".into()));
    }
    let drv = BlockDriver {
        format_name: SERVED_NAME.as_ptr(),
        bdrv_probe: Some(served_probe),
        bdrv_open: Some(served_open),
        bdrv_reopen_prepare: Some(served_reopen_prepare),
        // The list link is bdrv_register's to set.
        list: Default::default(),
        // SAFETY: a bitwise copy of a table of plain pointers and flags that lives for the
        // whole process; the copy shares its static option lists and strings.
        ..unsafe { std::ptr::read(qcow2b) }
    };
    let drv: &'static mut BlockDriver = Box::leak(Box::new(drv));
    // SAFETY: drv is a fully initialised driver table that is never freed. Registered last,
    // it is the first bdrv_find_format("qcow2") finds.
    unsafe { bindings::bdrv_register(drv) };
    Ok(0)
}
}

#[cfg(all(test, feature = "glue-tests"))]
mod tests {
    use super::*;
    use crate::engine::TxgOptions;
    use std::time::Duration;

    fn parse(text: &str) -> Result<ServeConfig, String> {
        parse_config(text, Path::new("/etc/qemu/qcow2b.conf"))
    }

    #[test]
    fn an_empty_file_leaves_the_switch_off() {
        let c = parse("# nothing here\n\n   # still nothing\n").unwrap();
        assert!(!c.serve_qcow2);
        assert_eq!(
            c.mode,
            BarrierMode::Ordered {
                buffer_bytes: 16 << 20
            }
        );
    }

    #[test]
    fn serve_with_txg_bounds() {
        let c = parse(
            "serve-qcow2 = on   # the switch\nbarrier=txg\ntxg-max-bytes = 8M\ntxg-max-age-ms=250\n",
        )
        .unwrap();
        assert!(c.serve_qcow2);
        assert_eq!(
            c.mode,
            BarrierMode::Txg(TxgOptions {
                max_group_bytes: 8 << 20,
                max_group_age: Duration::from_millis(250),
            })
        );
        let opts: Vec<_> = c
            .node_options()
            .into_iter()
            .map(|(k, v)| format!("{}={}", k.to_str().unwrap(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            opts,
            ["barrier=txg", "txg-max-bytes=8388608", "txg-max-age-ms=250"]
        );
    }

    #[test]
    fn settings_without_the_switch_are_refused() {
        let e = parse("barrier=flush\n").unwrap_err();
        assert!(
            e.contains("'serve-qcow2 = on' or 'serve-qcow2 = off' is missing"),
            "{e}"
        );
    }

    #[test]
    fn bad_lines_name_the_file_and_the_line() {
        for (text, want) in [
            (
                "serve-qcow2 = yes\n",
                "line 1: 'serve-qcow2' is 'on' or 'off', not 'yes'",
            ),
            (
                "serve-qcow2 = on\nbariier = txg\n",
                "line 2: unknown setting 'bariier'",
            ),
            (
                "serve-qcow2 = on\nserve-qcow2 = off\n",
                "line 2: 'serve-qcow2' is set twice",
            ),
            ("serve-qcow2 on\n", "line 1: expected 'key = value'"),
            ("serve-qcow2 =\n", "line 1: 'serve-qcow2' has no value"),
            (
                "serve-qcow2=on\nbarrier=txg\ntxg-max-bytes=lots\n",
                "line 3: 'txg-max-bytes' is a size",
            ),
            (
                "serve-qcow2=on\nbarrier=sometimes\n",
                "barrier=sometimes: expected auto",
            ),
            (
                "serve-qcow2=on\nbarrier=flush\nbuffer-size=32M\n",
                "buffer-size applies to barrier=ordered only",
            ),
            (
                "serve-qcow2=on\nbarrier=barrierfs\n",
                "barrier=barrierfs needs barrierfs-syscall",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(
                e.starts_with("qcow2b configuration /etc/qemu/qcow2b.conf"),
                "{e}"
            );
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn the_variable_names_a_file_that_must_exist() {
        let dir = std::env::temp_dir().join(format!("qcow2b-serve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // No file in the folder: off, silently.
        assert_eq!(read_config(&dir, None).unwrap(), None);
        // A named file that is missing: an error naming the variable.
        let missing = dir.join("missing.conf");
        let e = read_config(&dir, Some(missing.clone().into())).unwrap_err();
        assert!(e.contains("(named by QCOW2B_CONF)"), "{e}");
        // The file in the folder is read.
        std::fs::write(dir.join(CONF_FILE_NAME), "serve-qcow2 = on\n").unwrap();
        let c = read_config(&dir, None).unwrap().unwrap();
        assert!(c.serve_qcow2);
        assert_eq!(c.path, dir.join(CONF_FILE_NAME));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sizes_as_qemu_writes_them() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("16M"), Some(16 << 20));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }
}
