//! The host barrier primitive of each protocol node.
//!
//! QEMU's file-posix answers `bdrv_co_barrier` by calling [`host_barrier`] in a worker thread
//! (qemu-patches/0005). What a barrier is on that file depends on the qcow2b node above it,
//! so a qcow2b node in `barrierfs` mode registers its primitive for the protocol node under it
//! ([`register`]) and removes it at close. A node with nothing registered gets `fdatasync`:
//! ordered, because durable, and what QEMU's block layer does for every other driver.
//!
//! The registry is keyed by the protocol node's address (an opaque number here); it is
//! process-wide because QEMU's nodes are, and guarded by a mutex because the primitive runs
//! in QEMU's thread pool.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// What a barrier on one protocol node does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Primitive {
    /// BarrierFS's `fdatabarrier(fd)`, by system call number.
    FdataBarrier { syscall: i64 },
    /// Records the barrier ([`injected_barriers`]) and calls nothing.
    Injected,
}

fn registry() -> &'static Mutex<HashMap<usize, Primitive>> {
    static REGISTRY: OnceLock<Mutex<HashMap<usize, Primitive>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

static INJECTED: AtomicU64 = AtomicU64::new(0);

/// Barriers taken by the injected primitive in this process.
pub fn injected_barriers() -> u64 {
    INJECTED.load(Ordering::Relaxed)
}

/// Sets the primitive of protocol node `node` (replacing any other).
pub fn register(node: usize, primitive: Primitive) {
    if let Ok(mut r) = registry().lock() {
        r.insert(node, primitive);
    }
}

/// Removes the primitive of protocol node `node`: barriers there become `fdatasync` again.
pub fn unregister(node: usize) {
    if let Ok(mut r) = registry().lock() {
        r.remove(&node);
    }
}

/// The primitive registered for `node`, if any.
pub fn registered(node: usize) -> Option<Primitive> {
    registry().lock().ok().and_then(|r| r.get(&node).copied())
}

/// A barrier on file descriptor `fd` of protocol node `node`. Blocking (fdatasync can take
/// milliseconds): callers run it in a worker thread.
pub fn host_barrier(node: usize, fd: i32) -> io::Result<()> {
    let ret = match registered(node) {
        Some(Primitive::Injected) => {
            INJECTED.fetch_add(1, Ordering::Relaxed);
            0
        }
        // SAFETY: the user named this system call as fdatabarrier(unsigned int fd) on this
        // host (BarrierFS); it takes one integer and touches no memory of this process.
        Some(Primitive::FdataBarrier { syscall }) => unsafe {
            libc::syscall(syscall as libc::c_long, fd as libc::c_uint) as i32
        },
        // SAFETY: fdatasync takes a descriptor and touches no memory of this process.
        None => unsafe { libc::fdatasync(fd) },
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn unregistered_nodes_sync_and_injected_ones_only_count() {
        let file = tempfile::tempfile().unwrap();
        let fd = file.as_raw_fd();
        host_barrier(0x1000, fd).unwrap();
        register(0x2000, Primitive::Injected);
        let before = injected_barriers();
        host_barrier(0x2000, fd).unwrap();
        assert_eq!(injected_barriers(), before + 1);
        unregister(0x2000);
        assert_eq!(registered(0x2000), None);
        // A bad descriptor is an error, not a crash.
        assert!(host_barrier(0x1000, -1).is_err());
    }
}
