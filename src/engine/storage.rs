//! The storage under an image: the image file itself (through QEMU's `file` child in the
//! glue, a plain [`std::fs::File`] in tests) and, optionally, a backing image.
//!
//! The engine does every metadata and data access through these traits, so the format code
//! never sees a file descriptor or a QEMU type.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

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
    /// Current length of the file in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
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
}

/// An image file held in memory: for fuzzing and for tests that inspect every byte.
#[derive(Debug, Default)]
pub struct MemStorage {
    bytes: RefCell<Vec<u8>>,
    /// Number of [`Storage::flush`] calls, so tests can count syncs.
    pub flushes: std::cell::Cell<u64>,
}

impl MemStorage {
    pub fn new(bytes: Vec<u8>) -> Self {
        MemStorage {
            bytes: RefCell::new(bytes),
            flushes: Default::default(),
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

    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.borrow().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        self.bytes.borrow_mut().resize(len, 0);
        Ok(())
    }
}
