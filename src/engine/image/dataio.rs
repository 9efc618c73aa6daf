//! The data step of a request (see [`crate::engine::image::request`]): moves guest bytes as a plan says,
//! without touching metadata, so it runs without the metadata lock.
//!
//! The request's own buffer is reached through [`ReadTarget`] and [`WriteSource`], so the QEMU
//! glue can hand the file child its I/O vector directly (no copy), while the engine's own
//! [`super::Image::read`] and [`super::Image::write`] use plain slices. Copy-on-write fills and
//! compressed clusters go through small buffers of their own, read with [`Storage`] and
//! [`Backing`].
//!
//! On an encrypted image (`encryption.rs`) guest data goes through bounce buffers instead:
//! read from the file and decrypted, or assembled, encrypted and written, in chunks of at
//! most [`ENCRYPTED_CHUNK_BYTES`], and every copy-on-write fill from an old cluster is
//! decrypted at that cluster's offsets before it is encrypted at the new one's.

use std::io;

use crate::engine::debug_event::DebugEvent;
use crate::engine::error::{Error, Result};
use crate::engine::format::compress::decompress_cluster;
use crate::engine::format::entry::{SubclusterBitmap, SubclusterState, SUBCLUSTER_SHIFT};
use crate::engine::format::header::CompressionType;
use crate::engine::image::encryption::Encryption;
use crate::engine::image::request::{
    CowFill, CowSource, ReadPlan, ReadSource, WritePiece, WritePlan,
};
use crate::engine::storage::{Backing, Storage};

/// The buffer of a guest read: bytes `[at, at + len)` of the request.
pub trait ReadTarget {
    /// Reads the image file at `host_offset` into request bytes `[at, at + len)`.
    fn read_file(&mut self, host_offset: u64, at: usize, len: usize) -> io::Result<()>;
    /// Reads the backing file at `guest_offset` (zeros past its end, zeros if there is none).
    fn read_backing(&mut self, guest_offset: u64, at: usize, len: usize) -> io::Result<()>;
    fn fill_zero(&mut self, at: usize, len: usize);
    fn copy_from(&mut self, at: usize, src: &[u8]);
}

/// The buffer of a guest write.
pub trait WriteSource {
    /// Writes `head`, request bytes `[at, at + len)` and `tail` contiguously at `host_offset`.
    fn write_file(
        &mut self,
        host_offset: u64,
        head: &[u8],
        at: usize,
        len: usize,
        tail: &[u8],
    ) -> io::Result<()>;
    /// Copies request bytes `[at, at + dst.len())` into `dst` (the bounce buffer an
    /// encrypted write is encrypted in).
    fn copy_request(&mut self, at: usize, dst: &mut [u8]) -> io::Result<()>;
}

/// The most guest data an encrypted request moves through one bounce buffer: a large
/// request is read, decrypted, encrypted and written a chunk at a time (a multiple of the
/// sector).
pub const ENCRYPTED_CHUNK_BYTES: usize = 1 << 20;

/// What the data step reads besides the request's buffer.
pub struct DataContext<'a, S: Storage> {
    pub storage: &'a S,
    pub backing: Option<&'a dyn Backing>,
    pub compression: CompressionType,
    pub cluster_size: u64,
    /// How guest data is encrypted (`None`: it is not).
    pub encryption: Option<&'a Encryption>,
}

/// An I/O error with what was being done; the context is only built on failure (the data
/// step is the hot path).
fn io_error(context: impl FnOnce() -> String) -> impl FnOnce(io::Error) -> Error {
    move |e| Error::io(context(), e)
}

impl<S: Storage> DataContext<'_, S> {
    /// Decompresses a whole compressed cluster.
    fn decompress(&self, host_offset: u64, read_len: u64) -> Result<Vec<u8>> {
        let mut input = vec![0u8; read_len as usize];
        self.storage.debug_event(DebugEvent::ReadCompressed);
        self.storage
            .read_at(host_offset, &mut input)
            .map_err(io_error(|| {
                format!("reading compressed cluster at {host_offset:#x}")
            }))?;
        let mut out = vec![0u8; self.cluster_size as usize];
        decompress_cluster(self.compression, &input, &mut out)?;
        Ok(out)
    }

    /// The data step of a read.
    pub fn read(&self, plan: &ReadPlan, target: &mut dyn ReadTarget) -> Result<()> {
        let mut at = 0usize;
        for piece in &plan.pieces {
            let len = piece.len as usize;
            match piece.source {
                ReadSource::Zeros => target.fill_zero(at, len),
                ReadSource::Backing { guest_offset } => {
                    self.storage.debug_event(DebugEvent::ReadBackingAio);
                    target
                        .read_backing(guest_offset, at, len)
                        .map_err(io_error(|| {
                            format!("reading the backing file at {guest_offset:#x}")
                        }))?
                }
                ReadSource::Data { host_offset } => {
                    self.storage.debug_event(DebugEvent::ReadAio);
                    match self.encryption {
                        None => target
                            .read_file(host_offset, at, len)
                            .map_err(io_error(|| {
                                format!("reading guest data at host offset {host_offset:#x}")
                            }))?,
                        Some(encryption) => {
                            let guest_offset = plan.guest_offset + at as u64;
                            self.read_decrypted(
                                encryption,
                                host_offset,
                                guest_offset,
                                at,
                                len,
                                target,
                            )?
                        }
                    }
                }
                ReadSource::Compressed {
                    host_offset,
                    read_len,
                    offset_in_cluster,
                } => {
                    let whole = self.decompress(host_offset, read_len)?;
                    let start = offset_in_cluster as usize;
                    let part = whole.get(start..start + len).ok_or_else(|| {
                        Error::Corrupt("compressed read past the end of its cluster".into())
                    })?;
                    target.copy_from(at, part);
                }
            }
            at += len;
        }
        Ok(())
    }

    /// Reads `len` encrypted bytes at `host_offset` (guest `guest_offset`) into request bytes
    /// `[at, at + len)`, decrypted, a chunk at a time.
    fn read_decrypted(
        &self,
        encryption: &Encryption,
        host_offset: u64,
        guest_offset: u64,
        at: usize,
        len: usize,
        target: &mut dyn ReadTarget,
    ) -> Result<()> {
        let mut buf = vec![0u8; len.min(ENCRYPTED_CHUNK_BYTES)];
        let mut done = 0;
        while done < len {
            let chunk = &mut buf[..(len - done).min(ENCRYPTED_CHUNK_BYTES)];
            let host = host_offset + done as u64;
            self.storage.read_at(host, chunk).map_err(io_error(|| {
                format!("reading guest data at host offset {host:#x}")
            }))?;
            encryption.decrypt(host, guest_offset + done as u64, chunk)?;
            target.copy_from(at + done, chunk);
            done += chunk.len();
        }
        Ok(())
    }

    /// Whether a fill's old content is zeros (without reading it).
    fn reads_zeros(&self, fill: CowFill) -> bool {
        match fill.source {
            CowSource::Zeros => true,
            CowSource::Backing { .. } => self.backing.is_none(),
            CowSource::Data { .. }
            | CowSource::Compressed { .. }
            | CowSource::Subclusters { .. } => false,
        }
    }

    /// The old content a copy-on-write fill takes, as the guest sees it, into `bytes` (its
    /// `fill.len` bytes zeros on entry): `guest_offset` is the fill's first byte (for an old
    /// encrypted cluster's IVs).
    fn cow_into(&self, fill: CowFill, guest_offset: u64, bytes: &mut [u8]) -> Result<()> {
        if fill.len == 0 {
            return Ok(());
        }
        match fill.source {
            CowSource::Zeros => {}
            // Without a backing file the old content is zeros, as `bytes` already is.
            CowSource::Backing { guest_offset } => {
                if let Some(b) = self.backing {
                    self.storage.debug_event(DebugEvent::CowRead);
                    b.read_at(guest_offset, bytes).map_err(io_error(|| {
                        format!("reading the backing file at {guest_offset:#x} to copy it")
                    }))?;
                }
            }
            CowSource::Data { host_offset } => {
                self.storage.debug_event(DebugEvent::CowRead);
                self.storage
                    .read_at(host_offset, bytes)
                    .map_err(io_error(|| {
                        format!("reading cluster data at {host_offset:#x} to copy it")
                    }))?;
                // Decrypted at the old cluster's offsets; the write encrypts it at the new
                // one's.
                if let Some(encryption) = self.encryption {
                    encryption.decrypt(host_offset, guest_offset, bytes)?;
                }
            }
            // Compressed clusters are not encrypted (QEMU's qcow2 neither writes nor
            // decrypts encrypted compressed data).
            CowSource::Compressed {
                host_offset,
                read_len,
                offset_in_cluster,
            } => {
                let whole = self.decompress(host_offset, read_len)?;
                let start = offset_in_cluster as usize;
                let part = whole.get(start..start + fill.len).ok_or_else(|| {
                    Error::Corrupt("copy-on-write past the end of a compressed cluster".into())
                })?;
                bytes.copy_from_slice(part);
            }
            CowSource::Subclusters {
                guest_offset,
                host_offset,
                bitmap,
            } => self.subclusters_into(guest_offset, host_offset, bitmap, bytes)?,
        }
        Ok(())
    }

    /// The old content of a head fill and a tail fill (either may be left out), each with
    /// its first guest byte, side by side in one buffer.
    fn cow_fills(
        &self,
        head: Option<(CowFill, u64)>,
        tail: Option<(CowFill, u64)>,
    ) -> Result<CowFills> {
        let head_len = head.map_or(0, |(f, _)| f.len);
        let tail_len = tail.map_or(0, |(f, _)| f.len);
        let mut bytes = vec![0u8; head_len + tail_len];
        let (head_bytes, tail_bytes) = bytes.split_at_mut(head_len);
        if let Some((fill, guest_offset)) = head {
            self.cow_into(fill, guest_offset, head_bytes)?;
        }
        if let Some((fill, guest_offset)) = tail {
            self.cow_into(fill, guest_offset, tail_bytes)?;
        }
        Ok(CowFills {
            bytes,
            head_len,
            tail: head_len..head_len + tail_len,
        })
    }

    /// The old content of `bytes.len()` bytes from `guest_offset` of a cluster with extended
    /// L2 entries, subcluster by subcluster as `bitmap` says (`host_offset`: where the first
    /// byte lies in its host cluster).
    fn subclusters_into(
        &self,
        guest_offset: u64,
        host_offset: u64,
        bitmap: SubclusterBitmap,
        bytes: &mut [u8],
    ) -> Result<()> {
        let subcluster_bits = self.cluster_size.trailing_zeros() - SUBCLUSTER_SHIFT;
        let mut done = 0usize;
        while done < bytes.len() {
            let in_cluster = (guest_offset + done as u64) & (self.cluster_size - 1);
            let first = (in_cluster >> subcluster_bits) as u32;
            let (state, count) = bitmap.run(first);
            let run_end = u64::from(first + count) << subcluster_bits;
            let n = ((run_end - in_cluster) as usize).min(bytes.len() - done);
            let part = &mut bytes[done..done + n];
            let at = done as u64;
            match state {
                SubclusterState::Zero => {}
                SubclusterState::Allocated => {
                    self.storage.debug_event(DebugEvent::CowRead);
                    self.storage
                        .read_at(host_offset + at, part)
                        .map_err(io_error(|| {
                            format!("reading cluster data at {:#x} to copy it", host_offset + at)
                        }))?
                }
                SubclusterState::Unallocated => {
                    if let Some(b) = self.backing {
                        self.storage.debug_event(DebugEvent::CowRead);
                        b.read_at(guest_offset + at, part).map_err(io_error(|| {
                            format!(
                                "reading the backing file at {:#x} to copy it",
                                guest_offset + at
                            )
                        }))?;
                    }
                }
            }
            done += n;
        }
        Ok(())
    }

    /// The old content of both fills of a new cluster, around `len` bytes of the request;
    /// the head starts at guest `guest_offset`.
    /// Where the two lie in one source one after the other (the backing file, or the old
    /// cluster), one read of the whole span serves both and the request's part of it is
    /// dropped: a 4 KiB write into the middle of a cluster over a backing file costs one
    /// read of the cluster instead of two (each a round trip to the file's thread pool).
    /// Only within one cluster: the fills of a run of clusters lie a whole request apart
    /// (up to 2 GiB, past what one read may carry: iotest 270).
    fn cow_pair(
        &self,
        head: CowFill,
        len: usize,
        tail: CowFill,
        guest_offset: u64,
    ) -> Result<CowFills> {
        let gap = (head.len + len) as u64;
        let one_cluster = (gap + tail.len as u64) <= self.cluster_size;
        let tail_guest_offset = guest_offset + gap;
        let joined = match (head.source, tail.source) {
            (CowSource::Backing { guest_offset: h }, CowSource::Backing { guest_offset: t }) => {
                h.checked_add(gap) == Some(t)
            }
            (CowSource::Data { host_offset: h }, CowSource::Data { host_offset: t }) => {
                h.checked_add(gap) == Some(t)
            }
            _ => false,
        };
        if !joined || !one_cluster || head.len == 0 || tail.len == 0 {
            return self.cow_fills(Some((head, guest_offset)), Some((tail, tail_guest_offset)));
        }
        let span = CowFill {
            len: head.len + len + tail.len,
            ..head
        };
        // The request's part of the span stays in the buffer, unused: no copy of the tail.
        let mut bytes = vec![0u8; span.len];
        self.cow_into(span, guest_offset, &mut bytes)?;
        Ok(CowFills {
            bytes,
            head_len: head.len,
            tail: head.len + len..span.len,
        })
    }

    /// The data step of a write: every piece's bytes reach the file (new clusters whole, with
    /// their copy-on-write fills) before the plan is finished.
    pub fn write(&self, plan: &WritePlan, source: &mut dyn WriteSource) -> Result<()> {
        for piece in &plan.pieces {
            let (host_offset, guest_offset, fills, req_at, len) = match *piece {
                WritePiece::InPlace {
                    host_offset,
                    req_at,
                    len,
                } => {
                    let guest_offset = plan.guest_offset + req_at as u64;
                    (host_offset, guest_offset, CowFills::default(), req_at, len)
                }
                WritePiece::Allocate {
                    host_offset,
                    head_start,
                    guest_cluster,
                    req_at,
                    len,
                    head,
                    tail,
                    ..
                } => {
                    // A fill of zeros over a hole is left out: the write starts after the
                    // head, or ends before the tail (never on an encrypted image, whose
                    // plans mark no fill over a hole).
                    let written = |fill: CowFill| {
                        !(fill.over_hole && self.reads_zeros(fill) && self.encryption.is_none())
                    };
                    // With extended L2 entries the head starts at `head_start` in the
                    // cluster; the subclusters before it are not written.
                    let skipped_head =
                        head_start as u64 + if written(head) { 0 } else { head.len as u64 };
                    let cluster_guest = guest_cluster * self.cluster_size;
                    let head_guest = cluster_guest + head_start as u64;
                    let fills = match (written(head), written(tail)) {
                        (true, true) => self.cow_pair(head, len, tail, head_guest)?,
                        (true, false) => self.cow_fills(Some((head, head_guest)), None)?,
                        (false, true) => {
                            let tail_guest_offset = head_guest + (head.len + len) as u64;
                            self.cow_fills(None, Some((tail, tail_guest_offset)))?
                        }
                        (false, false) => CowFills::default(),
                    };
                    (
                        host_offset + skipped_head,
                        cluster_guest + skipped_head,
                        fills,
                        req_at,
                        len,
                    )
                }
            };
            let (head, tail) = (fills.head(), fills.tail());
            if !head.is_empty() || !tail.is_empty() {
                self.storage.debug_event(DebugEvent::CowWrite);
            }
            self.storage.debug_event(DebugEvent::WriteAio);
            let context = || format!("writing guest data at host offset {host_offset:#x}");
            match self.encryption {
                None => source
                    .write_file(host_offset, head, req_at, len, tail)
                    .map_err(io_error(context))?,
                Some(encryption) => {
                    let parts = [
                        Part::Bytes(head),
                        Part::Request { at: req_at, len },
                        Part::Bytes(tail),
                    ];
                    self.write_encrypted(encryption, host_offset, guest_offset, &parts, source)?
                }
            }
        }
        Ok(())
    }

    /// Writes `parts` one after the other at `host_offset` (guest `guest_offset`),
    /// encrypted, a chunk at a time through a bounce buffer (the request's own buffer is
    /// never changed).
    fn write_encrypted(
        &self,
        encryption: &Encryption,
        host_offset: u64,
        guest_offset: u64,
        parts: &[Part<'_>],
        source: &mut dyn WriteSource,
    ) -> Result<()> {
        let total: usize = parts.iter().map(Part::len).sum();
        let mut buf = vec![0u8; total.min(ENCRYPTED_CHUNK_BYTES)];
        let mut done = 0;
        while done < total {
            let chunk = &mut buf[..(total - done).min(ENCRYPTED_CHUNK_BYTES)];
            let host = host_offset + done as u64;
            let context = || format!("writing guest data at host offset {host:#x}");
            // Gather bytes [done, done + chunk.len()) of the parts.
            let (mut part_start, mut filled) = (0, 0);
            for part in parts {
                let part_end = part_start + part.len();
                let from = done + filled;
                if from < part_end && filled < chunk.len() {
                    let n = (part_end - from).min(chunk.len() - filled);
                    let dst = &mut chunk[filled..filled + n];
                    match *part {
                        Part::Bytes(bytes) => {
                            dst.copy_from_slice(&bytes[from - part_start..from - part_start + n])
                        }
                        Part::Request { at, .. } => source
                            .copy_request(at + (from - part_start), dst)
                            .map_err(io_error(context))?,
                    }
                    filled += n;
                }
                part_start = part_end;
            }
            encryption.encrypt(host, guest_offset + done as u64, chunk)?;
            self.storage
                .write_at(host, chunk)
                .map_err(io_error(context))?;
            done += chunk.len();
        }
        Ok(())
    }
}

/// The copy-on-write fills of a new cluster, in one buffer: the head at its start, the tail
/// at `tail` (after the request's part where one read served both, `cow_pair`).
#[derive(Default)]
struct CowFills {
    bytes: Vec<u8>,
    head_len: usize,
    tail: std::ops::Range<usize>,
}

impl CowFills {
    fn head(&self) -> &[u8] {
        &self.bytes[..self.head_len]
    }

    fn tail(&self) -> &[u8] {
        &self.bytes[self.tail.clone()]
    }
}

/// A part of what an encrypted write puts at one place: bytes of the data step's own (a
/// copy-on-write fill), or request bytes `[at, at + len)`.
enum Part<'a> {
    Bytes(&'a [u8]),
    Request { at: usize, len: usize },
}

impl Part<'_> {
    fn len(&self) -> usize {
        match self {
            Part::Bytes(bytes) => bytes.len(),
            Part::Request { len, .. } => *len,
        }
    }
}

/// A read into a byte slice (the engine's own [`super::Image::read`]).
pub struct SliceTarget<'a, S: Storage> {
    pub buf: &'a mut [u8],
    pub storage: &'a S,
    pub backing: Option<&'a dyn Backing>,
}

fn out_of_buffer() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

impl<S: Storage> ReadTarget for SliceTarget<'_, S> {
    fn read_file(&mut self, host_offset: u64, at: usize, len: usize) -> io::Result<()> {
        let dst = self.buf.get_mut(at..at + len).ok_or_else(out_of_buffer)?;
        self.storage.read_at(host_offset, dst)
    }

    fn read_backing(&mut self, guest_offset: u64, at: usize, len: usize) -> io::Result<()> {
        let dst = self.buf.get_mut(at..at + len).ok_or_else(out_of_buffer)?;
        match self.backing {
            Some(b) => b.read_at(guest_offset, dst),
            None => {
                dst.fill(0);
                Ok(())
            }
        }
    }

    fn fill_zero(&mut self, at: usize, len: usize) {
        if let Some(dst) = self.buf.get_mut(at..at + len) {
            dst.fill(0);
        }
    }

    fn copy_from(&mut self, at: usize, src: &[u8]) {
        if let Some(dst) = self.buf.get_mut(at..at + src.len()) {
            dst.copy_from_slice(src);
        }
    }
}

/// A write from a byte slice (the engine's own [`super::Image::write`]).
pub struct SliceSource<'a, S: Storage> {
    pub buf: &'a [u8],
    pub storage: &'a S,
}

impl<S: Storage> WriteSource for SliceSource<'_, S> {
    fn write_file(
        &mut self,
        host_offset: u64,
        head: &[u8],
        at: usize,
        len: usize,
        tail: &[u8],
    ) -> io::Result<()> {
        let data = self.buf.get(at..at + len).ok_or_else(out_of_buffer)?;
        if head.is_empty() && tail.is_empty() {
            return self.storage.write_at(host_offset, data);
        }
        let mut whole = Vec::with_capacity(head.len() + len + tail.len());
        whole.extend_from_slice(head);
        whole.extend_from_slice(data);
        whole.extend_from_slice(tail);
        self.storage.write_at(host_offset, &whole)
    }

    fn copy_request(&mut self, at: usize, dst: &mut [u8]) -> io::Result<()> {
        let src = self.buf.get(at..at + dst.len()).ok_or_else(out_of_buffer)?;
        dst.copy_from_slice(src);
        Ok(())
    }
}
