//! A metadata write that fails is written again by the next write-back: a flush that failed
//! acknowledges nothing, and the flush after it must then make everything durable, as it
//! says. (Found by the qcow2b-blkdebug-events iotest: an L1 or refcount table entry whose
//! write failed left the dirty set for good, so a later successful flush acknowledged data
//! whose L1 entry never reached the file, or clusters counted in a refcount block no refcount
//! table entry named: refcount 0 under live data.)

#[path = "engine_support.rs"]
mod support;

use std::cell::Cell;
use std::io;
use std::ops::Range;

use qcow2b::engine::{DebugEvent, Image, MemStorage, OpenOptions, Storage};
use support::*;

/// MemStorage whose next write into `fail_next` fails with ENOSPC, once.
#[derive(Default)]
struct FailOnce {
    inner: MemStorage,
    fail_next: Cell<Option<Range<u64>>>,
    failed: Cell<u64>,
}

impl Storage for FailOnce {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if let Some(range) = self.fail_next.take() {
            if range.contains(&offset) {
                self.failed.set(self.failed.get() + 1);
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            self.fail_next.set(Some(range));
        }
        self.inner.write_at(offset, buf)
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn barrier(&self) -> io::Result<()> {
        self.inner.barrier()
    }

    fn debug_event(&self, event: DebugEvent) {
        self.inner.debug_event(event)
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}

fn open(cluster_size: u64, size: u64) -> Image<FailOnce> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, cluster_size, size, None);
    let storage = FailOnce {
        inner: MemStorage::new(std::fs::read(&path).unwrap()),
        ..Default::default()
    };
    Image::open(storage, &OpenOptions::default()).unwrap()
}

/// Closes the image and runs QEMU's check and reads on what it left. Leaked clusters are
/// allowed (clusters counted for the request that failed), corruption is not.
fn close_check_and_read(image: Image<FailOnce>, reads: &[&str]) {
    let bytes = image.close().unwrap().inner.into_inner();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("closed.qcow2");
    std::fs::write(&path, bytes).unwrap();
    let out = run(std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&path));
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "qemu-img check exited {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout)
    );
    qemu_io(&path, reads);
}

#[test]
fn an_l1_entry_whose_write_failed_is_written_by_the_next_flush() {
    let mut image = open(65536, 1 << 30);
    image.write(0, &[0x5a; 65536], None).unwrap();
    image.write(512 << 20, &[0x5b; 65536], None).unwrap();
    let l1 = image.header().l1_table_offset;
    image.storage().fail_next.set(Some(l1..l1 + 65536));
    assert!(image.flush().is_err());
    assert_eq!(image.storage().failed.get(), 1);
    image.flush().unwrap();
    close_check_and_read(image, &["read -P 0x5a 0 64k", "read -P 0x5b 512M 64k"]);
}

#[test]
fn a_refcount_table_entry_whose_write_failed_is_written_by_the_next_flush() {
    // 512-byte clusters: a refcount block covers 128 KiB, so 1 MiB of data needs new ones.
    // (The zero reserve counts its clusters, new blocks included, while the write is planned:
    // the write is what fails, and the guest writes again.)
    let mut image = open(512, 64 << 20);
    let reftable = image.header().refcount_table_offset;
    image
        .storage()
        .fail_next
        .set(Some(reftable..reftable + 512));
    let data = vec![0x6c; 1 << 20];
    assert!(image.write(0, &data, None).is_err());
    assert_eq!(image.storage().failed.get(), 1);
    image.write(0, &data, None).unwrap();
    image.flush().unwrap();
    close_check_and_read(image, &["read -P 0x6c 0 1M"]);
}
