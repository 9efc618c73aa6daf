//! The glue tested from Rust: the exported driver table, registered through
//! `qcow2b_register`, called as QEMU calls it, with QEMU's side played by the test doubles
//! of `qemu_stubs.rs` (feature `glue-tests`; `scripts/test.sh` runs these after the build,
//! since the bindings need the configured QEMU tree).

use std::ffi::c_int;
use std::ptr;

use super::bindings::{self, BlockDriver, BlockDriverState, QEMUIOVector};
use super::driver::qcow2b_register;
use super::ffi::{run_entry, Outcome};
use super::qemu_stubs::{self, FakeDict};
use crate::engine::{create, CheckFix, CreateOptions, Error, Image, MemStorage, OpenOptions};

/// The registered qcow2b driver.
fn qcow2b() -> *mut BlockDriver {
    static REGISTER: std::sync::Once = std::sync::Once::new();
    // SAFETY: called once, as QEMU's block_init does.
    REGISTER.call_once(|| unsafe { qcow2b_register() });
    let drv = qemu_stubs::driver("qcow2b");
    assert!(
        !drv.is_null(),
        "qcow2b_register registered no qcow2b driver"
    );
    drv
}

/// A fresh qcow2 image of `size` bytes, made by the engine.
fn new_image(size: u64) -> Vec<u8> {
    let storage = MemStorage::new(Vec::new());
    create(&storage, &CreateOptions::new(size)).unwrap();
    storage.into_inner()
}

/// A node of the driver, as the block layer allocates one.
struct TestNode {
    drv: *mut BlockDriver,
    bs: Box<BlockDriverState>,
}

impl TestNode {
    fn new(drv: *mut BlockDriver) -> TestNode {
        let mut bs = Box::new(BlockDriverState::default());
        bs.drv = drv;
        // SAFETY: the table's instance_size, zeroed, as QEMU allocates bs->opaque.
        bs.opaque = unsafe { libc::calloc(1, (*drv).instance_size as usize) };
        TestNode { drv, bs }
    }

    fn table(&self) -> &BlockDriver {
        // SAFETY: registered and never freed.
        unsafe { &*self.drv }
    }

    fn bs(&mut self) -> *mut BlockDriverState {
        &mut *self.bs
    }

    /// `bdrv_open` of `image` with `options`; the result and errp's message, if any.
    fn open(&mut self, image: Vec<u8>, options: &[(&str, &str)]) -> (c_int, Option<String>) {
        qemu_stubs::set_next_file(image);
        let mut dict = FakeDict::new(options);
        let mut errp: *mut bindings::Error = ptr::null_mut();
        qemu_stubs::set_in_coroutine(false);
        let open = self.table().bdrv_open.unwrap();
        // SAFETY: a node allocated as the block layer does, a QDict (the doubles' kind) and
        // an errp, outside a coroutine as QEMU opens.
        let ret = unsafe {
            open(
                self.bs(),
                (&mut *dict as *mut FakeDict).cast(),
                bindings::BDRV_O_RDWR as c_int,
                &mut errp,
            )
        };
        let message = qemu_stubs::messages()
            .into_iter()
            .find(|(kind, _)| *kind == 2)
            .map(|(_, text)| text);
        assert_eq!(
            errp.is_null(),
            message.is_none(),
            "errp set without a message"
        );
        (ret, message)
    }

    fn file(&self) -> *mut BlockDriverState {
        // SAFETY: attached by bdrv_open_file_child at open.
        unsafe { (*self.bs.file).bs }
    }

    fn write(&mut self, offset: i64, data: &mut [u8]) -> c_int {
        let write = self.table().bdrv_co_pwritev_part.unwrap();
        // SAFETY: an open node, the request's qiov (`request`).
        self.request(data, |bs, len, qiov| unsafe {
            write(bs, offset, len, qiov, 0, 0)
        })
    }

    /// A compressed write (`bdrv_co_pwritev_compressed_part`), as `qemu-img convert -c`
    /// sends it.
    fn write_compressed(&mut self, offset: i64, data: &mut [u8]) -> c_int {
        let write = self.table().bdrv_co_pwritev_compressed_part.unwrap();
        // SAFETY: an open node, the request's qiov (`request`).
        self.request(data, |bs, len, qiov| unsafe {
            write(bs, offset, len, qiov, 0)
        })
    }

    fn read(&mut self, offset: i64, out: &mut [u8]) -> c_int {
        let read = self.table().bdrv_co_preadv_part.unwrap();
        // SAFETY: an open node, the request's qiov (`request`).
        self.request(out, |bs, len, qiov| unsafe {
            read(bs, offset, len, qiov, 0, 0)
        })
    }

    /// A request of the table over `buf`: `callback` gets the node, the length and a qiov
    /// over `buf`, in "coroutine context".
    fn request(
        &mut self,
        buf: &mut [u8],
        callback: impl FnOnce(*mut BlockDriverState, i64, *mut QEMUIOVector) -> c_int,
    ) -> c_int {
        let mut iov = bindings::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut qiov = QEMUIOVector {
            iov: &mut iov,
            niov: 1,
            ..Default::default()
        };
        qemu_stubs::set_in_coroutine(true);
        let ret = callback(self.bs(), buf.len() as i64, &mut qiov);
        qemu_stubs::set_in_coroutine(false);
        ret
    }

    /// A flush as QEMU's block layer runs it: flush_to_os, then flush_to_disk.
    fn flush(&mut self) -> c_int {
        qemu_stubs::set_in_coroutine(true);
        let to_os = self.table().bdrv_co_flush_to_os.unwrap();
        let to_disk = self.table().bdrv_co_flush_to_disk.unwrap();
        // SAFETY: an open node, in "coroutine context".
        let mut ret = unsafe { to_os(self.bs()) };
        if ret == 0 {
            // SAFETY: as above.
            ret = unsafe { to_disk(self.bs()) };
        }
        qemu_stubs::set_in_coroutine(false);
        ret
    }

    /// Closes the node; returns the image file's bytes.
    fn close(mut self) -> Vec<u8> {
        let file = self.file();
        let close = self.table().bdrv_close.unwrap();
        // SAFETY: an open node, outside a coroutine, nothing in flight.
        unsafe { close(self.bs()) };
        // SAFETY: allocated with calloc in `new`.
        unsafe { libc::free(self.bs.opaque) };
        qemu_stubs::file_of(file)
    }
}

/// The image `bytes`, opened by the engine: reads `len` bytes at `offset` and checks it.
fn engine_view(bytes: Vec<u8>, offset: u64, len: usize) -> (Vec<u8>, crate::engine::CheckReport) {
    let opts = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let mut image = Image::open(MemStorage::new(bytes), &opts).unwrap();
    let mut buf = vec![0u8; len];
    image.read(offset, &mut buf, None).unwrap();
    (buf, image.check(CheckFix::None).unwrap())
}

/// Open, write, read, flush and close through the driver table, in each barrier mode that
/// needs no timer: the data reads back through the table, a flush reaches the file as a sync,
/// the close leaves an image the engine reads the same and checks clean, and no coroutine is
/// left counted as a request.
#[test]
fn open_write_read_flush_close_through_the_driver_table() {
    for barrier in ["ordered", "flush", "barrierfs"] {
        let mut node = TestNode::new(qcow2b());
        let mut options = vec![("barrier", barrier)];
        if barrier == "barrierfs" {
            options.push(("x-barrierfs-inject", "on"));
        }
        let (ret, message) = node.open(new_image(8 << 20), &options);
        assert_eq!((ret, message), (0, None), "{barrier}");
        let mut data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(node.write(65_536 + 512, &mut data), 0, "{barrier}");
        let mut back = vec![0u8; data.len()];
        assert_eq!(node.read(65_536 + 512, &mut back), 0, "{barrier}");
        assert!(back == data, "{barrier}: read back differs");
        let syncs = qemu_stubs::flushes_of(node.file());
        assert_eq!(node.flush(), 0, "{barrier}");
        assert!(
            qemu_stubs::flushes_of(node.file()) > syncs,
            "{barrier}: flush synced nothing"
        );
        let bytes = node.close();
        assert_eq!(qemu_stubs::in_flight(), 0, "{barrier}");
        let (seen, report) = engine_view(bytes, 65_536 + 512, data.len());
        assert!(seen == data, "{barrier}: the closed image reads otherwise");
        assert_eq!(
            (report.corruptions, report.leaks),
            (0, 0),
            "{barrier}: {report:?}"
        );
        assert!(qemu_stubs::messages().is_empty(), "{barrier}");
    }
}

/// Compressed writes through the table's `bdrv_co_pwritev_compressed_part`, as `qemu-img
/// convert -c` sends them: whole clusters (three that compress, one of noise written as an
/// ordinary cluster), then the 0-byte end of the stream; a partial cluster is -EINVAL. The
/// data reads back through the table and from the closed image, which holds three compressed
/// clusters and checks clean.
#[test]
fn compressed_writes_through_the_driver_table() {
    let mut node = TestNode::new(qcow2b());
    assert_eq!(node.open(new_image(8 << 20), &[]), (0, None));
    let cluster = 65_536usize;
    let mut data: Vec<u8> = (0..3 * cluster).map(|i| (i / 1000 % 7) as u8).collect();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    data.extend((0..cluster).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    }));
    assert_eq!(node.write_compressed(131_072, &mut data), 0);
    assert_eq!(node.write_compressed(0, &mut data[..512]), -libc::EINVAL);
    assert_eq!(node.write_compressed(0, &mut []), 0);
    let mut back = vec![0u8; data.len()];
    assert_eq!(node.read(131_072, &mut back), 0);
    assert!(back == data, "read back differs");
    let bytes = node.close();
    assert_eq!(qemu_stubs::in_flight(), 0);
    let (seen, report) = engine_view(bytes, 131_072, data.len());
    assert!(seen == data, "the closed image reads otherwise");
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.fragmentation.compressed_clusters, 3);
    assert!(qemu_stubs::messages().is_empty());
}

/// Errors cross to C as -errno with the message in errp: a bad magic number is refused at
/// open with -EINVAL and says why; a bad option value too.
#[test]
fn open_errors_are_errno_and_an_errp_message() {
    let mut node = TestNode::new(qcow2b());
    let mut image = new_image(1 << 20);
    image[..4].copy_from_slice(b"QFI\0");
    let (ret, message) = node.open(image, &[]);
    assert_eq!(ret, -libc::EINVAL);
    let message = message.expect("an errp message");
    assert!(message.contains("bad magic"), "{message}");

    let mut node = TestNode::new(qcow2b());
    let (ret, message) = node.open(new_image(1 << 20), &[("barrier", "fast")]);
    assert_eq!(ret, -libc::EINVAL);
    assert!(message.unwrap().contains("barrier=fast"));
}

/// The guard: a panic in an entry's body becomes -EIO (NULL for a pointer) and a report,
/// through errp where the entry has one, else through the log to QEMU's error_report.
#[test]
fn a_panic_in_an_entry_is_reported_and_becomes_eio() {
    crate::glue::logger::install();
    let ret = run_entry::<Result<c_int, Error>>("test_entry", None, || panic!("boom"));
    assert_eq!(ret, -libc::EIO);
    let reported = qemu_stubs::messages();
    assert!(
        reported
            .iter()
            .any(|(kind, text)| *kind == 0 && text.contains("internal error in test_entry: boom")),
        "{reported:?}"
    );
    let mut errp: *mut bindings::Error = ptr::null_mut();
    let null = run_entry::<*mut u8>("ptr_entry", Some(&mut errp), || panic!("bang"));
    assert!(null.is_null() && !errp.is_null());
    assert!(qemu_stubs::messages()
        .iter()
        .any(|(kind, text)| *kind == 2 && text.contains("ptr_entry: bang")));
    // Negative control: a body that returns is passed through untouched.
    assert_eq!(
        <Result<c_int, Error> as Outcome>::into_c(Ok(7), "x", None),
        run_entry::<Result<c_int, Error>>("ok_entry", None, || Ok(7))
    );
    assert!(qemu_stubs::messages().is_empty());
}
