//! The ordering layer: how a barrier ("everything written before is ordered before everything
//! written after; no durability promise") is kept on the host.
//!
//! - [`BarrierMode`]: the driver option `barrier=auto|barrierfs|ordered|flush|txg`;
//! - [`primitive`]: the host barrier primitive of a protocol node (BarrierFS's
//!   `fdatabarrier(2)`, an injected primitive for tests, or `fdatasync` when none is set up),
//!   which QEMU's file-posix calls for `bdrv_co_barrier`;
//! - [`epochs`]: the `ordered` mode's epoch buffer, which holds the guest's writes in epochs
//!   separated by barriers and hands them out for write-back one durable epoch at a time.
//!
//! Pure Rust, no QEMU types: the glue runs it inside QEMU's coroutines and thread pool.

pub mod epochs;
pub mod primitive;

use std::fmt;
use std::time::Duration;

use crate::engine::TxgOptions;

/// How qcow2b keeps its ordering points and the guest's barriers on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarrierMode {
    /// A barrier is an `fdatasync`: the safe comparison mode (stock QEMU's cost).
    Flush,
    /// A barrier is BarrierFS's `fdatabarrier(fd)`, system call number `syscall`: ordered,
    /// not durable, returns once the writes are dispatched in order.
    BarrierFs { syscall: i64 },
    /// As `BarrierFs`, but through an injected primitive that records the barrier and calls
    /// nothing: for tests and for the benchmark's "ideal barrier" bound, never for real data
    /// (a stock kernel keeps no order without a sync).
    Injected,
    /// Order-preserving write-back in user space: writes are grouped into epochs separated by
    /// barriers, and an epoch reaches the file only after the one before it is durable.
    Ordered { buffer_bytes: u64 },
    /// Transaction groups (`engine::image::txg`): barriers cost nothing; a group commits
    /// with two syncs at a guest flush, or at its bounds (the engine's own type, with its
    /// defaults: one type and one set of defaults for the mode and the engine).
    Txg(TxgOptions),
}

/// The options of [`BarrierMode::from_options`], as the user gave them.
#[derive(Clone, Copy, Debug, Default)]
pub struct BarrierOptions<'a> {
    pub mode: Option<&'a str>,
    pub syscall: Option<i64>,
    pub inject: bool,
    pub buffer_bytes: Option<u64>,
    pub txg_max_bytes: Option<u64>,
    pub txg_max_age_ms: Option<u64>,
}

/// The default bound of the `ordered` mode's buffer.
pub const DEFAULT_BUFFER_BYTES: u64 = 16 << 20;

/// Why a set of barrier options was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct BadBarrierOption(pub String);

impl fmt::Display for BadBarrierOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl BarrierMode {
    /// The mode for the driver options `barrier`, `barrierfs-syscall`, `x-barrierfs-inject`
    /// and `buffer-size`.
    ///
    /// `auto` is `barrierfs` when a system call number is given (the user said the host is
    /// BarrierFS) and `ordered` otherwise. Nothing is ever called to find out: on mainline
    /// kernels the BarrierFS numbers 314 and 315 are sched_setattr and sched_getattr.
    pub fn from_options(o: BarrierOptions) -> Result<BarrierMode, BadBarrierOption> {
        let BarrierOptions {
            mode,
            syscall,
            inject,
            buffer_bytes,
            txg_max_bytes,
            txg_max_age_ms,
        } = o;
        let bad = |msg: String| Err(BadBarrierOption(msg));
        let mode = match (mode.unwrap_or("auto"), syscall, inject) {
            (_, Some(_), true) => {
                return bad("barrierfs-syscall and x-barrierfs-inject exclude each other".into())
            }
            ("auto", None, false) | ("ordered", None, false) => BarrierMode::Ordered {
                buffer_bytes: buffer_bytes.unwrap_or(DEFAULT_BUFFER_BYTES),
            },
            ("auto" | "barrierfs", Some(n), false) => {
                if !(1..=4096).contains(&n) {
                    return bad(format!("barrierfs-syscall {n} is not a system call number"));
                }
                BarrierMode::BarrierFs { syscall: n }
            }
            ("auto" | "barrierfs", None, true) => BarrierMode::Injected,
            ("barrierfs", None, false) => {
                return bad(
                    "barrier=barrierfs needs barrierfs-syscall=N, the number of BarrierFS's \
                     fdatabarrier on this host (315 on the x86_64 BarrierFS kernels); qcow2b \
                     never guesses it, because on mainline kernels that number is another \
                     system call"
                        .into(),
                )
            }
            ("flush", None, false) => BarrierMode::Flush,
            ("txg", None, false) => {
                let defaults = TxgOptions::default();
                BarrierMode::Txg(TxgOptions {
                    max_group_bytes: txg_max_bytes.unwrap_or(defaults.max_group_bytes),
                    max_group_age: txg_max_age_ms
                        .map_or(defaults.max_group_age, Duration::from_millis),
                })
            }
            ("ordered" | "flush" | "txg", _, _) => {
                return bad(
                    "barrierfs-syscall and x-barrierfs-inject apply to barrier=barrierfs only"
                        .into(),
                )
            }
            (other, _, _) => {
                return bad(format!(
                    "barrier={other}: expected auto, barrierfs, ordered, flush or txg"
                ))
            }
        };
        if buffer_bytes.is_some() && !matches!(mode, BarrierMode::Ordered { .. }) {
            return bad("buffer-size applies to barrier=ordered only".into());
        }
        if (txg_max_bytes.is_some() || txg_max_age_ms.is_some())
            && !matches!(mode, BarrierMode::Txg(_))
        {
            return bad("txg-max-bytes and txg-max-age-ms apply to barrier=txg only".into());
        }
        if let BarrierMode::Txg(txg) = mode {
            let (max_bytes, max_age_ms) = (txg.max_group_bytes, txg.max_group_age.as_millis());
            if max_bytes < 1 << 20 {
                return bad(format!("txg-max-bytes {max_bytes} is below 1 MiB"));
            }
            if !(1..=3_600_000).contains(&max_age_ms) {
                return bad(format!(
                    "txg-max-age-ms {max_age_ms} is outside 1 to 3600000 (one hour)"
                ));
            }
        }
        if let BarrierMode::Ordered { buffer_bytes } = mode {
            if buffer_bytes < 1 << 20 {
                return bad(format!("buffer-size {buffer_bytes} is below 1 MiB"));
            }
        }
        Ok(mode)
    }

    /// The name shown in counters and `qemu-img info`.
    pub fn name(self) -> &'static str {
        match self {
            BarrierMode::Flush => "flush",
            BarrierMode::BarrierFs { .. } => "barrierfs",
            BarrierMode::Injected => "barrierfs (injected primitive)",
            BarrierMode::Ordered { .. } => "ordered",
            BarrierMode::Txg(_) => "txg",
        }
    }

    /// The mode as the driver options that select it, with every bound spelled out.
    pub fn describe(self) -> String {
        match self {
            BarrierMode::Flush => "barrier=flush".into(),
            BarrierMode::BarrierFs { syscall } => {
                format!("barrier=barrierfs,barrierfs-syscall={syscall}")
            }
            BarrierMode::Injected => "barrier=barrierfs,x-barrierfs-inject=on".into(),
            BarrierMode::Ordered { buffer_bytes } => {
                format!("barrier=ordered,buffer-size={buffer_bytes}")
            }
            BarrierMode::Txg(txg) => format!(
                "barrier=txg,txg-max-bytes={},txg-max-age-ms={}",
                txg.max_group_bytes,
                txg.max_group_age.as_millis()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mode for these options (the txg bounds at their defaults).
    fn m(
        mode: Option<&str>,
        syscall: Option<i64>,
        inject: bool,
        buffer_bytes: Option<u64>,
    ) -> Result<BarrierMode, BadBarrierOption> {
        BarrierMode::from_options(BarrierOptions {
            mode,
            syscall,
            inject,
            buffer_bytes,
            ..Default::default()
        })
    }

    #[test]
    fn auto_is_ordered_unless_the_user_names_the_barrierfs_syscall() {
        assert_eq!(
            m(None, None, false, None),
            Ok(BarrierMode::Ordered {
                buffer_bytes: DEFAULT_BUFFER_BYTES
            })
        );
        assert_eq!(
            m(Some("auto"), Some(315), false, None),
            Ok(BarrierMode::BarrierFs { syscall: 315 })
        );
        assert_eq!(
            m(Some("barrierfs"), None, true, None),
            Ok(BarrierMode::Injected)
        );
        assert_eq!(m(Some("flush"), None, false, None), Ok(BarrierMode::Flush));
        assert_eq!(
            m(Some("ordered"), None, false, Some(8 << 20)),
            Ok(BarrierMode::Ordered {
                buffer_bytes: 8 << 20
            })
        );
    }

    #[test]
    fn barrierfs_without_a_syscall_number_is_refused_and_says_why() {
        let err = m(Some("barrierfs"), None, false, None).unwrap_err();
        assert!(err.0.contains("barrierfs-syscall=N"), "{err}");
        assert!(m(Some("flush"), Some(315), false, None).is_err());
        assert!(m(Some("barrierfs"), Some(0), false, None).is_err());
        assert!(m(Some("flush"), None, false, Some(1 << 30)).is_err());
        assert!(m(Some("ordered"), None, false, Some(4096)).is_err());
        assert!(m(Some("fast"), None, false, None).is_err());
    }

    #[test]
    fn txg_takes_its_bounds_and_only_its_own_options() {
        let txg = |bytes, age| {
            BarrierMode::from_options(BarrierOptions {
                mode: Some("txg"),
                txg_max_bytes: bytes,
                txg_max_age_ms: age,
                ..Default::default()
            })
        };
        assert_eq!(txg(None, None), Ok(BarrierMode::Txg(TxgOptions::default())));
        assert_eq!(
            txg(Some(8 << 20), Some(100)),
            Ok(BarrierMode::Txg(TxgOptions {
                max_group_bytes: 8 << 20,
                max_group_age: Duration::from_millis(100)
            }))
        );
        assert!(txg(Some(4096), None).is_err());
        assert!(txg(None, Some(0)).is_err());
        let ordered_with_txg_bound = BarrierMode::from_options(BarrierOptions {
            mode: Some("ordered"),
            txg_max_age_ms: Some(100),
            ..Default::default()
        });
        assert!(ordered_with_txg_bound.is_err());
        let txg_with_buffer = BarrierMode::from_options(BarrierOptions {
            mode: Some("txg"),
            buffer_bytes: Some(8 << 20),
            ..Default::default()
        });
        assert!(txg_with_buffer.is_err());
    }
}
