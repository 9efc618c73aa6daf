//! The fuzz targets' bodies (fuzz/fuzz_targets/ wraps each in libFuzzer, with an allocator
//! that stops any allocation out of proportion to the input), here so that every input that
//! ever broke one replays as a named test (tests/fuzz_regressions.rs). Not part of the
//! engine's interface.
#![allow(clippy::missing_panics_doc)]

use crate::engine::MemStorage;

/// An in-memory image file of `bytes`.
fn storage(bytes: &[u8]) -> MemStorage {
    MemStorage::new(bytes.to_vec())
}

/// A little reader over the fuzz input, for targets driven by it.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn u32(&mut self) -> Option<u32> {
        let bytes = self.0.get(..4)?;
        let v = u32::from_le_bytes(bytes.try_into().ok()?);
        self.0 = &self.0[4..];
        Some(v)
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
}

pub mod header {
    //! header: the fuzz target's body.

    use crate::engine::format::header::Header;

    /// The header and its extensions: any bytes parse to a header or an error, never a panic or
    /// an allocation out of proportion; a header that parses and encodes parses again to the same
    /// fields (what a rewrite of the header keeps).
    pub fn run(data: &[u8]) {
        let Ok(header) = Header::parse(data) else {
            return;
        };
        let Ok(encoded) = header.encode() else {
            return;
        };
        let again = Header::parse(&encoded).expect("an encoded header parses");
        assert_eq!(again.version, header.version);
        assert_eq!(again.cluster_bits, header.cluster_bits);
        assert_eq!(again.virtual_size, header.virtual_size);
        assert_eq!(again.l1_table_offset, header.l1_table_offset);
        assert_eq!(again.l1_size_entries, header.l1_size_entries);
        assert_eq!(again.refcount_table_offset, header.refcount_table_offset);
        assert_eq!(
            again.refcount_table_clusters,
            header.refcount_table_clusters
        );
        assert_eq!(again.incompatible, header.incompatible);
        assert_eq!(again.compatible, header.compatible);
        assert_eq!(again.autoclear, header.autoclear);
        assert_eq!(again.refcount_order, header.refcount_order);
        assert_eq!(again.compression_type, header.compression_type);
        assert_eq!(again.backing_file, header.backing_file);
        assert_eq!(again.backing_format, header.backing_format);
        assert_eq!(again.extensions, header.extensions);
    }
}

pub mod tables {
    //! tables: the fuzz target's body.

    use super::*;
    use crate::engine::{CheckFix, Image, OpenOptions};

    /// L1, L2 and refcount tables: an image file of any bytes either fails to open with an error
    /// or opens read-only and answers lookups, reads and a check without panicking, allocating
    /// out of proportion or reading out of bounds.
    pub fn run(data: &[u8]) {
        let opts = OpenOptions {
            read_only: true,
            l2_cache_bytes: Some(1 << 20),
            ..Default::default()
        };
        let Ok(mut image) = Image::open(storage(data), &opts) else {
            return;
        };
        let size = image.virtual_size();
        let cluster = image.cluster_size();
        // Map the first clusters (and the last one), and read what the map says is there.
        let mut offset = 0;
        let mut steps = 0;
        while offset < size && steps < 256 {
            let Ok((_, len)) = image.map(offset, (64 * cluster).min(size - offset)) else {
                break;
            };
            let mut buf = vec![0u8; len.min(4 * cluster) as usize];
            let _ = image.read(offset, &mut buf, None);
            offset += len.max(1);
            steps += 1;
        }
        if size > 0 {
            let mut buf = [0u8; 512];
            let last = size.saturating_sub(512);
            let _ = image.read(last, &mut buf[..(size - last) as usize], None);
        }
        let _ = image.check(CheckFix::None);
    }
}

pub mod snapshots {
    //! snapshots: the fuzz target's body.

    use super::*;
    use crate::engine::{CheckFix, Image, OpenOptions};

    /// A 64 KiB-cluster image with its snapshot table at cluster 6 and room for snapshot L1
    /// tables after it; the fuzz input fills the snapshot area and sets the header's snapshot
    /// count and offset.
    fn image_with(data: &[u8]) -> Vec<u8> {
        let mut input = Input(data);
        let count = input.u32().unwrap_or(1) % 70_000;
        let offset_cluster = u64::from(input.byte().unwrap_or(6));
        let mut img = base_image();
        img[60..64].copy_from_slice(&count.to_be_bytes());
        img[64..72].copy_from_slice(&(offset_cluster * 65536).to_be_bytes());
        let area = 6 * 65536;
        let rest = input.take(3 * 65536);
        img[area..area + rest.len()].copy_from_slice(rest);
        img
    }

    /// The base image, made once.
    fn base_image() -> Vec<u8> {
        static BASE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        BASE.get_or_init(make_base_image).clone()
    }

    fn make_base_image() -> Vec<u8> {
        let storage = crate::engine::MemStorage::new(Vec::new());
        let opts = crate::engine::CreateOptions::new(16 << 20);
        crate::engine::create(&storage, &opts).expect("a fresh image");
        let mut img = storage.into_inner();
        img.resize(10 * 65536, 0);
        // Count the snapshot area's clusters (6..10) in the refcount block (cluster 2), so a
        // valid table there is also a consistent image.
        for c in 6..10 {
            img[2 * 65536 + 2 * c + 1] = 1;
        }
        img
    }

    /// The snapshot table: an image whose snapshot table (and what it points at) holds any bytes
    /// is refused with an error or listed, and a check walks every snapshot's L1 and L2 tables,
    /// never panicking or allocating out of proportion.
    ///
    /// The input is spliced into a small valid image with two snapshots (made here with the
    /// engine and QEMU's layout rules): its snapshot table and snapshot L1 table are replaced by
    /// the input's bytes, so the fuzzer spends its time inside the table, not in the header.
    pub fn run(data: &[u8]) {
        let img = image_with(data);
        for read_only in [true, false] {
            let opts = OpenOptions {
                read_only,
                ..Default::default()
            };
            let Ok(mut image) = Image::open(storage(&img), &opts) else {
                continue;
            };
            for s in image.snapshots() {
                let _ = (&s.id, &s.name, s.l1_size_entries, s.extra_data());
            }
            let _ = image.check(if read_only {
                CheckFix::None
            } else {
                CheckFix::All
            });
        }
    }
}

pub mod compressed {
    //! compressed: the fuzz target's body.

    use super::*;
    use crate::engine::format::compress::decompress_cluster;
    use crate::engine::format::header::CompressionType;
    use crate::engine::{CreateOptions, Image, MemStorage, OpenOptions};

    const CLUSTER: usize = 65536;

    fn image_with(kind: CompressionType, descriptor: u64, payload: &[u8]) -> Vec<u8> {
        let storage = MemStorage::new(Vec::new());
        let mut opts = CreateOptions::new(8 << 20);
        opts.compression_type = kind;
        crate::engine::create(&storage, &opts).expect("a fresh image");
        let mut img = storage.into_inner();
        // Cluster 4: an L2 table for the first 512 MiB, named by the L1 entry; clusters 5..8
        // hold the payload. All counted, so the image is consistent but for what the input adds.
        let l1 = u64::from_be_bytes(img[40..48].try_into().unwrap()) as usize;
        img.resize(8 * CLUSTER, 0);
        img[l1..l1 + 8].copy_from_slice(&((4 * CLUSTER) as u64 | 1 << 63).to_be_bytes());
        img[4 * CLUSTER..4 * CLUSTER + 8].copy_from_slice(&descriptor.to_be_bytes());
        img[5 * CLUSTER..5 * CLUSTER + payload.len()].copy_from_slice(payload);
        for c in 4..8 {
            img[2 * CLUSTER + 2 * c + 1] = 1;
        }
        img
    }

    /// Compressed cluster descriptors and data: a valid image whose first L2 entry is a
    /// compressed descriptor taken from the input, pointing at bytes taken from the input, reads
    /// that cluster (deflate or zstd, per the input) or fails with an error; a write into it
    /// copies it or fails; never a panic, a read past the file, or an allocation out of
    /// proportion. The decoder itself is fuzzed directly too.
    pub fn run(data: &[u8]) {
        let mut input = Input(data);
        let kind = if input.byte().unwrap_or(0) & 1 == 0 {
            CompressionType::Zlib
        } else {
            CompressionType::Zstd
        };
        // The decoder on its own, at a cluster size from the input.
        let bits = 9 + u32::from(input.byte().unwrap_or(7)) % 13;
        let mut out = vec![0u8; 1 << bits];
        let _ = decompress_cluster(kind, input.0, &mut out);

        // In an image: with 64 KiB clusters a descriptor holds the byte offset in bits 0..54 and
        // the count of additional 512-byte sectors in bits 54..62. The offset mostly lands in
        // the payload (clusters 5..8), sometimes anywhere the input says.
        let raw = u64::from(input.u32().unwrap_or(0)) | (u64::from(input.u32().unwrap_or(0)) << 32);
        let sectors = (raw >> 54) & 0xff;
        let offset = if raw >> 63 == 1 {
            raw & ((1 << 54) - 1)
        } else {
            (5 * CLUSTER) as u64 + (raw & 0x3_ffff)
        };
        let descriptor = 1 << 62 | sectors << 54 | offset;
        let payload = input.take(3 * CLUSTER);
        let img = image_with(kind, descriptor, payload);
        let Ok(mut image) = Image::open(MemStorage::new(img), &OpenOptions::default()) else {
            return;
        };
        let mut buf = vec![0u8; CLUSTER];
        let _ = image.read(0, &mut buf, None);
        let _ = image.write(4096, &[7u8; 512], None);
        let _ = image.flush();
    }
}

pub mod whole {
    //! whole: the fuzz target's body.

    use super::*;
    use crate::engine::{CheckFix, Image, Mapping, MemStorage, OpenOptions};

    /// Disks above this are not modelled byte for byte (the other checks still run).
    const MODEL_LIMIT: u64 = 32 << 20;

    fn open(bytes: Vec<u8>) -> Option<Image<MemStorage>> {
        let opts = OpenOptions {
            l2_cache_bytes: Some(256 << 10),
            ..Default::default()
        };
        Image::open(MemStorage::new(bytes), &opts).ok()
    }

    fn is_clean(image: &mut Image<MemStorage>) -> bool {
        image
            .check(CheckFix::None)
            .is_ok_and(|r| r.corruptions == 0 && r.check_errors == 0)
    }

    /// The whole engine on an in-memory file, driven by the input: an image (its bytes from the
    /// input) opened read-write, then a script of reads, writes, compressed writes, zeroes,
    /// discards, flushes, barriers, reopens, growth and checks.
    ///
    /// Always: no panic, no allocation out of proportion, no input running long. When the image
    /// the input starts from checks clean (the seed corpus are real images from qemu-img, and
    /// most mutations touch the script), also: every read returns what a byte model of the disk
    /// says, and after a close the image reopens and checks clean (leaks aside) with the same
    /// content.
    ///
    /// Input: u32 image length (little endian), the image bytes, then operations.
    pub fn run(data: &[u8]) {
        let mut input = Input(data);
        let len = input.u32().unwrap_or(0) as usize % (1 << 20);
        let img = input.take(len).to_vec();
        let Some(mut image) = open(img) else {
            return;
        };
        let mut size = image.virtual_size();
        let cluster = image.cluster_size();
        let clean = size <= MODEL_LIMIT && is_clean(&mut image);
        // The model: the disk as the engine reads it now (no backing file here: unallocated
        // clusters read as zeros).
        let mut model = if clean {
            let mut m = vec![0u8; size as usize];
            if image.read(0, &mut m, None).is_err() {
                return;
            }
            Some(m)
        } else {
            None
        };

        let mut steps = 0;
        while let Some(op) = input.byte() {
            steps += 1;
            if steps > 64 || size == 0 {
                break;
            }
            let at = u64::from(input.u32().unwrap_or(0)) % size;
            let n = (u64::from(input.u32().unwrap_or(0)) % (4 * cluster + 1)).clamp(1, size - at);
            let range = at as usize..(at + n) as usize;
            match op % 9 {
                1 if op & 0x10 != 0 => {
                    // A compressed write of the whole clusters the range starts in, where
                    // none names a host cluster yet (compression never overwrites).
                    let first = at / cluster * cluster;
                    let len = (n + at - first).next_multiple_of(cluster).min(size - first);
                    let mut free = true;
                    let mut c = first;
                    while c < first + len && free {
                        free = matches!(
                            image.map(c, cluster),
                            Ok((
                                Mapping::Unallocated | Mapping::Zero { host_offset: None },
                                _
                            ))
                        );
                        c += cluster;
                    }
                    if !free {
                        continue;
                    }
                    let byte = input.byte().unwrap_or(0x5a);
                    let data: Vec<u8> = (0..len)
                        .map(|i| if i % 509 == 0 { (i / 509) as u8 } else { byte })
                        .collect();
                    let ok = image.write_compressed(first, &data, None).is_ok();
                    if let (true, Some(m)) = (ok, model.as_mut()) {
                        m[first as usize..(first + len) as usize].copy_from_slice(&data);
                    } else if !ok {
                        model = None;
                    }
                }
                0 | 1 => {
                    let byte = input.byte().unwrap_or(0x5a) | 1;
                    let ok = image.write(at, &vec![byte; n as usize], None).is_ok();
                    if let (true, Some(m)) = (ok, model.as_mut()) {
                        m[range].fill(byte);
                    } else if !ok {
                        model = None;
                    }
                }
                2 => {
                    let mut buf = vec![0u8; n as usize];
                    let ok = image.read(at, &mut buf, None).is_ok();
                    if let (true, Some(m)) = (ok, model.as_ref()) {
                        assert!(
                            buf == m[range],
                            "read at {at} of {n} differs from the model"
                        );
                    }
                }
                3 => {
                    let unmap = input.byte().unwrap_or(0) & 1 == 1;
                    let ok = image.write_zeroes(at, n, unmap, None).is_ok();
                    if let (true, Some(m)) = (ok, model.as_mut()) {
                        m[range].fill(0);
                    } else if !ok {
                        model = None;
                    }
                }
                4 => {
                    // Whole clusters inside the range read as zeros afterwards.
                    let ok = image.discard(at, n).is_ok();
                    if let (true, Some(m)) = (ok, model.as_mut()) {
                        let first = at.div_ceil(cluster) * cluster;
                        let end = if at + n == size {
                            size
                        } else {
                            (at + n) / cluster * cluster
                        };
                        if first < end {
                            m[first as usize..end as usize].fill(0);
                        }
                    } else if !ok {
                        model = None;
                    }
                }
                5 => {
                    if image.flush().is_err() {
                        model = None;
                    }
                }
                6 => {
                    if image.barrier().is_err() {
                        model = None;
                    }
                }
                7 => {
                    let grow = u64::from(input.byte().unwrap_or(1)) * cluster;
                    if size + grow <= MODEL_LIMIT && image.truncate(size + grow).is_ok() {
                        size += grow;
                        if let Some(m) = model.as_mut() {
                            m.resize(size as usize, 0);
                        }
                    }
                }
                _ => {
                    // Close and reopen: what was written is on the file.
                    let Ok(storage) = image.close() else { return };
                    let Some(reopened) = open(storage.into_inner()) else {
                        assert!(model.is_none(), "a clean image does not reopen after close");
                        return;
                    };
                    image = reopened;
                }
            }
        }
        let Ok(storage) = image.close() else { return };
        let Some(mut image) = open(storage.into_inner()) else {
            assert!(model.is_none(), "a clean image does not reopen after close");
            return;
        };
        if let Some(m) = model {
            let report = image.check(CheckFix::None).expect("check runs");
            // With internal snapshots, an entry left alone on a cluster the active table named
            // twice keeps refcount 1 without COPIED, as QEMU's qcow2 leaves it (write-back's
            // stage 6 restores the flag only without snapshots); harmless: the next write to
            // it copies the cluster once more.
            let copied_only = report
                .messages
                .iter()
                .filter(|m| m.contains("OFLAG_COPIED data cluster") && m.ends_with("refcount=1"))
                .count() as u64;
            let tolerated = if image.header().nb_snapshots > 0 && report.messages_dropped == 0 {
                copied_only
            } else {
                0
            };
            assert!(
                report.corruptions == tolerated && report.check_errors == 0,
                "a clean image checks corrupt after the script: {report:?}"
            );
            let mut buf = vec![0u8; size as usize];
            image.read(0, &mut buf, None).expect("reads back");
            assert!(buf == m, "content after reopen differs from the model");
        }
    }
}
