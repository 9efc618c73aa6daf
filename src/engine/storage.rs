//! The storage under an image: the image file itself (through QEMU's `file` child in the
//! glue, a plain [`std::fs::File`] in tests) and, optionally, a backing image.
//!
//! The engine does every metadata and data access through these traits, so the format code
//! never sees a file descriptor or a QEMU type.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use super::debug_event::DebugEvent;

/// The file that holds the qcow2 image.
///
/// Methods take `&self`: the glue's implementation forwards to QEMU's block layer, which
/// serialises nothing itself; the engine decides what may run concurrently.
pub trait Storage {
    /// Reads exactly `buf.len()` bytes at `offset`. Bytes past the end of the file read as
    /// zeros.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the file if needed.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync).
    fn flush(&self) -> io::Result<()>;
    /// Orders every completed write before every write issued after this call, without
    /// waiting for durability. The default is a flush: durable, hence ordered.
    fn barrier(&self) -> io::Result<()> {
        self.flush()
    }
    /// Announces the I/O that follows (a metadata or ordering point, see [`DebugEvent`]), for
    /// error injection and debugging. Nothing by default.
    fn debug_event(&self, _event: DebugEvent) {}
    /// Whether writes past the end extend the file (a regular file) rather than fail (a block
    /// device, whose length is fixed and whose free space holds old bytes). The zero reserve
    /// (`reserve.rs`) needs the former; without it, clusters come from free space inside.
    fn is_growable(&self) -> bool {
        true
    }
    /// Current length of the file in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Gives the space of `offset..offset + len` back to the host (advisory: the bytes read
    /// as zeros or as before afterwards). Only for clusters nothing names any more
    /// (`discard.rs`). A storage that cannot says so (the default: unsupported).
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Reserves space for `offset..offset + len` (growing the file if it ends before), so
    /// later writes there cannot fail for lack of space (`preallocation=falloc`). Bytes past
    /// the old end of the file read as zeros afterwards; bytes before it may be zeroed. The
    /// default writes zeros; [`File`] uses `posix_fallocate`.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK_BYTES: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK_BYTES.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK_BYTES.min(len - done) as usize;
            self.write_at(offset + done, &zeros[..n])?;
            done += n as u64;
        }
        Ok(())
    }
}

/// What an unallocated guest cluster reads through to.
pub trait Backing {
    /// Reads `buf.len()` bytes at guest `offset` of the backing image; bytes past its end read
    /// as zeros.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl Storage for File {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match FileExt::read_at(self, &mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let too_big = || io::Error::from_raw_os_error(libc::EFBIG);
        let start = libc::off_t::try_from(offset).map_err(|_| too_big())?;
        let count = libc::off_t::try_from(len).map_err(|_| too_big())?;
        // SAFETY: the descriptor is open for as long as `self` is borrowed; fallocate reads
        // or writes no memory of this process.
        let ret = unsafe {
            libc::fallocate(
                self.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                start,
                count,
            )
        };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let too_big = || io::Error::from_raw_os_error(libc::EFBIG);
        let start = libc::off_t::try_from(offset).map_err(|_| too_big())?;
        let count = libc::off_t::try_from(len).map_err(|_| too_big())?;
        if count == 0 {
            return Ok(());
        }
        // SAFETY: the descriptor is open for as long as `self` is borrowed, and
        // posix_fallocate reads or writes no memory of this process. (glibc emulates it on
        // file systems without fallocate.)
        match unsafe { libc::posix_fallocate(self.as_raw_fd(), start, count) } {
            0 => Ok(()),
            err => Err(io::Error::from_raw_os_error(err)),
        }
    }
}

/// An image file held in memory: for fuzzing and for tests that inspect every byte.
#[derive(Debug, Default)]
pub struct MemStorage {
    bytes: RefCell<Vec<u8>>,
    /// Number of [`Storage::flush`] calls, so tests can count syncs.
    pub flushes: std::cell::Cell<u64>,
    /// Number of [`Storage::barrier`] calls.
    pub barriers: std::cell::Cell<u64>,
    /// Every [`Storage::debug_event`], in order.
    pub events: RefCell<Vec<DebugEvent>>,
    /// Every [`Storage::discard`] as (offset, length, flushes before it), in order.
    pub discards: RefCell<Vec<(u64, u64, u64)>>,
}

impl MemStorage {
    pub fn new(bytes: Vec<u8>) -> Self {
        MemStorage {
            bytes: RefCell::new(bytes),
            flushes: Default::default(),
            barriers: Default::default(),
            events: Default::default(),
            discards: Default::default(),
        }
    }

    pub fn into_inner(self) -> Vec<u8> {
        self.bytes.into_inner()
    }

    /// A copy of the bytes as they are now.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.borrow().clone()
    }
}

impl Storage for MemStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let bytes = self.bytes.borrow();
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let end = start.saturating_add(buf.len()).min(bytes.len());
        let n = end - start;
        buf[..n].copy_from_slice(&bytes[start..end]);
        buf[n..].fill(0);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let start =
            usize::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let end = start
            .checked_add(buf.len())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        let mut bytes = self.bytes.borrow_mut();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.flushes.set(self.flushes.get() + 1);
        Ok(())
    }

    fn barrier(&self) -> io::Result<()> {
        self.barriers.set(self.barriers.get() + 1);
        Ok(())
    }

    fn debug_event(&self, event: DebugEvent) {
        self.events.borrow_mut().push(event);
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.borrow().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        self.bytes.borrow_mut().resize(len, 0);
        Ok(())
    }

    /// Zeroes the range (as a punched hole reads), within the file's length.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.discards
            .borrow_mut()
            .push((offset, len, self.flushes.get()));
        let mut bytes = self.bytes.borrow_mut();
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let end = usize::try_from(offset.saturating_add(len))
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        bytes[start..end].fill(0);
        Ok(())
    }
}
