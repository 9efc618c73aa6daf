//! Writing a new image: the header as QEMU writes it, the tables in file order with large
//! sequential writes, and the data area as preallocation asks.

use crate::engine::error::{Error, Result};
use crate::engine::format::entry::{EntryFlags, L2Width};
use crate::engine::format::header::{
    ext, AutoclearFeatures, CompatibleFeatures, CompressionType, EncryptionHeaderExtent,
    FeatureName, Header, IncompatibleFeatures, RawExtension, V2_HEADER_LEN,
};
use crate::engine::format::refcount::RefcountGeometry;
use crate::engine::storage::Storage;

use super::layout::Layout;
use super::{CreateEncryption, CreateOptions, Preallocation, V3_HEADER_LEN, WRITE_CHUNK_BYTES};

/// The feature name table QEMU writes (QEMU 10.0, `qcow2_update_header`).
pub(in crate::engine) fn qemu_feature_names() -> Vec<FeatureName> {
    let entry = |kind: u8, bit: u8, name: &str| FeatureName {
        kind,
        bit,
        name: name.to_owned(),
    };
    vec![
        entry(0, 0, "dirty bit"),
        entry(0, 1, "corrupt bit"),
        entry(0, 2, "external data file"),
        entry(0, 3, "compression type"),
        entry(0, 4, "extended L2 entries"),
        entry(1, 0, "lazy refcounts"),
        entry(2, 0, "bitmaps"),
        entry(2, 1, "raw external data"),
    ]
}

/// Encodes the feature name table extension: 48 bytes per entry (type, bit, name padded
/// with zeros to 46 bytes).
pub(in crate::engine) fn encode_feature_names(names: &[FeatureName]) -> Vec<u8> {
    let mut data = Vec::with_capacity(names.len() * 48);
    for n in names {
        let start = data.len();
        data.push(n.kind);
        data.push(n.bit);
        data.extend_from_slice(n.name.as_bytes());
        data.resize(start + 48, 0);
    }
    data
}

/// The header of the new image, laid out as QEMU writes it: the backing format extension,
/// the full disk encryption header extension (LUKS), then (version 3 with clusters above
/// 4 KiB only, as QEMU does to leave room for the backing file name in small clusters) the
/// feature name table, the end marker and the backing file name.
pub(super) fn new_header(opts: &CreateOptions, size: u64, layout: &Layout) -> Header {
    let version = opts.compat.version();
    let mut incompatible = IncompatibleFeatures::empty();
    if layout.width == L2Width::Extended {
        incompatible |= IncompatibleFeatures::EXTENDED_L2;
    }
    let mut additional_fields = Vec::new();
    if version >= 3 {
        let compression_byte = match opts.compression_type {
            CompressionType::Zlib => 0,
            CompressionType::Zstd => {
                incompatible |= IncompatibleFeatures::COMPRESSION_TYPE;
                1
            }
        };
        additional_fields = vec![0u8; (V3_HEADER_LEN - 104) as usize];
        additional_fields[0] = compression_byte;
    }
    let mut extensions = Vec::new();
    if let Some(format) = &opts.backing_format {
        extensions.push(RawExtension {
            kind: ext::BACKING_FORMAT,
            data: format.clone(),
        });
    }
    // QEMU's order: backing format, external data file, full disk encryption header, feature
    // names.
    if let Some(name) = &opts.data_file {
        incompatible |= IncompatibleFeatures::EXTERNAL_DATA_FILE;
        extensions.push(RawExtension {
            kind: ext::EXTERNAL_DATA_FILE,
            data: name.as_bytes().to_vec(),
        });
    }
    let encryption_header = match opts.encryption {
        Some(CreateEncryption::Luks { header_bytes }) => Some(EncryptionHeaderExtent {
            offset: layout.encryption_header_offset,
            length_bytes: header_bytes,
        }),
        Some(CreateEncryption::Aes) | None => None,
    };
    if let Some(extent) = encryption_header {
        extensions.push(RawExtension {
            kind: ext::FULL_DISK_ENCRYPTION,
            data: extent.encode(),
        });
    }
    let mut feature_names = Vec::new();
    if version >= 3 && layout.cluster_size() > 4096 {
        feature_names = qemu_feature_names();
        extensions.push(RawExtension {
            kind: ext::FEATURE_NAME_TABLE,
            data: encode_feature_names(&feature_names),
        });
    }
    let autoclear = if opts.data_file_raw {
        AutoclearFeatures::RAW_EXTERNAL_DATA
    } else {
        AutoclearFeatures::empty()
    };
    let compatible = if opts.lazy_refcounts {
        CompatibleFeatures::LAZY_REFCOUNTS
    } else {
        CompatibleFeatures::empty()
    };
    Header {
        version,
        backing_file_offset: 0,
        backing_file_size_bytes: opts.backing_file.as_ref().map_or(0, |n| n.len() as u32),
        cluster_bits: layout.rc.cluster_bits,
        virtual_size: size,
        crypt_method: opts.encryption.map_or(0, |e| e.method().field()),
        l1_size_entries: layout.l1_entries as u32,
        l1_table_offset: layout.l1_offset,
        refcount_table_offset: layout.reftable_offset,
        refcount_table_clusters: layout.reftable_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible,
        compatible,
        autoclear,
        refcount_order: layout.rc.refcount_order,
        header_length: if version >= 3 {
            V3_HEADER_LEN
        } else {
            V2_HEADER_LEN
        },
        compression_type: opts.compression_type,
        additional_fields,
        extensions,
        backing_file: opts.backing_file.clone(),
        backing_format: opts.backing_format.clone(),
        feature_names,
        bitmaps: None,
        encryption_header,
    }
}

/// Buffers consecutive bytes and writes them in large chunks, so generated tables reach the
/// storage as a few big sequential writes.
struct SequentialWriter<'a, S: Storage> {
    storage: &'a S,
    /// File offset of `buf[0]`.
    buf_offset: u64,
    buf: Vec<u8>,
}

impl<'a, S: Storage> SequentialWriter<'a, S> {
    fn new(storage: &'a S, offset: u64) -> Self {
        SequentialWriter {
            storage,
            buf_offset: offset,
            buf: Vec::with_capacity(WRITE_CHUNK_BYTES),
        }
    }

    /// File offset of the next byte pushed.
    fn position(&self) -> u64 {
        self.buf_offset + self.buf.len() as u64
    }

    fn push(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let room = WRITE_CHUNK_BYTES - self.buf.len();
            let (now, later) = bytes.split_at(room.min(bytes.len()));
            self.buf.extend_from_slice(now);
            bytes = later;
            if self.buf.len() == WRITE_CHUNK_BYTES {
                self.write_out()?;
            }
        }
        Ok(())
    }

    fn push_zeros(&mut self, mut len: u64) -> Result<()> {
        while len > 0 {
            let room = (WRITE_CHUNK_BYTES - self.buf.len()) as u64;
            let n = room.min(len);
            self.buf.resize(self.buf.len() + n as usize, 0);
            len -= n;
            if self.buf.len() == WRITE_CHUNK_BYTES {
                self.write_out()?;
            }
        }
        Ok(())
    }

    /// Zeros up to file offset `offset` (the end of the current table's last cluster).
    fn pad_to(&mut self, offset: u64) -> Result<()> {
        let len = offset.checked_sub(self.position()).ok_or_else(|| {
            Error::Corrupt(format!(
                "image layout: table overruns its clusters ({:#x} past {offset:#x})",
                self.position()
            ))
        })?;
        self.push_zeros(len)
    }

    fn write_out(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.storage
            .write_at(self.buf_offset, &self.buf)
            .map_err(|e| {
                Error::io(
                    format!("writing the new image's tables at {:#x}", self.buf_offset),
                    e,
                )
            })?;
        self.buf_offset += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    fn finish(mut self) -> Result<u64> {
        self.write_out()?;
        Ok(self.buf_offset)
    }
}

/// A refcount block with every entry 1.
pub(super) fn full_refblock(rc: RefcountGeometry) -> Result<Vec<u8>> {
    // Eight bytes hold a whole number of entries of any width; repeat that pattern.
    let mut unit = [0u8; 8];
    for index in 0..64 / u64::from(rc.refcount_bits()) {
        rc.set(&mut unit, index, 1)?;
    }
    Ok(unit.repeat(1usize << (rc.cluster_bits - 3)))
}

/// Writes the refcount table, the refcount blocks, the L1 table, the LUKS header's clusters
/// (zeros: what the LUKS header leaves unwritten, unused key slots among it, reads as zeros,
/// as in QEMU's qcow2) and the L2 tables, in file order, starting right after the header
/// cluster.
pub(super) fn write_tables<S: Storage>(
    storage: &S,
    layout: &Layout,
    preallocate: bool,
) -> Result<()> {
    let cluster_size = layout.cluster_size();
    let mut w = SequentialWriter::new(storage, layout.reftable_offset);

    // Refcount table: one entry per refcount block, in order.
    for i in 0..layout.refblock_count {
        w.push(&(layout.refblocks_offset + i * cluster_size).to_be_bytes())?;
    }
    w.pad_to(layout.refblocks_offset)?;

    // Refcount blocks: every cluster in use counts 1; only the last block is partial.
    let rc = layout.rc;
    let full = full_refblock(rc)?;
    for i in 0..layout.refblock_count {
        let first_cluster = i * rc.entries_per_block();
        let counted = (layout.clusters_in_use - first_cluster).min(rc.entries_per_block());
        if counted == rc.entries_per_block() {
            w.push(&full)?;
        } else {
            let mut block = vec![0u8; cluster_size as usize];
            let whole_bytes = (counted * u64::from(rc.refcount_bits()) / 8) as usize;
            block[..whole_bytes].copy_from_slice(&full[..whole_bytes]);
            let first_unset = whole_bytes as u64 * 8 / u64::from(rc.refcount_bits());
            for index in first_unset..counted {
                rc.set(&mut block, index, 1)?;
            }
            w.push(&block)?;
        }
    }

    // L1 table: with preallocation, entry j names L2 table j (refcount 1: COPIED).
    if layout.l1_entries > 0 {
        w.pad_to(layout.l1_offset)?;
    }
    for j in 0..layout.l1_entries {
        let entry = if preallocate {
            (layout.l2_offset + j * cluster_size) | EntryFlags::COPIED.bits()
        } else {
            0
        };
        w.push(&entry.to_be_bytes())?;
    }
    if layout.encryption_header_clusters > 0 {
        w.pad_to(layout.encryption_header_offset)?;
        w.push_zeros(layout.encryption_header_clusters << layout.rc.cluster_bits)?;
    }
    if !preallocate || layout.l1_entries == 0 {
        // Like QEMU, the file ends with the last L1 entry (or the LUKS header's clusters).
        return w.finish().map(|_| ());
    }
    w.pad_to(layout.l2_offset)?;

    // L2 tables: guest cluster g maps to data cluster g (refcount 1: COPIED), in the data
    // area or at its guest offset in an external data file (`data_offset` 0 then). An
    // extended entry's bitmap stays 0: every subcluster unallocated, reading as zeros or
    // from the backing file until written (QEMU's preallocation of images with subclusters).
    let entry_bytes = layout.width.entry_bytes() as usize;
    let entries_per_l2 = cluster_size / entry_bytes as u64;
    let mut table = vec![0u8; cluster_size as usize];
    for j in 0..layout.l2_count {
        for (k, slot) in table.chunks_exact_mut(entry_bytes).enumerate() {
            let guest_cluster = j * entries_per_l2 + k as u64;
            let entry = if guest_cluster < layout.named_clusters {
                (layout.data_offset + guest_cluster * cluster_size) | EntryFlags::COPIED.bits()
            } else {
                0
            };
            slot[..8].copy_from_slice(&entry.to_be_bytes());
        }
        w.push(&table)?;
    }
    let end = w.finish()?;
    debug_assert!(layout.data_clusters == 0 || end == layout.data_offset);
    Ok(())
}

/// Allocates a data area of `len` bytes at `offset` as `preallocation` asks: nothing for
/// `off` and `metadata` (the area reads as zeros, sparse), reserved space for `falloc`,
/// zeros written for `full`. For a new image and for a resize's new area alike.
pub(in crate::engine) fn allocate_data_area<S: Storage>(
    storage: &S,
    offset: u64,
    len: u64,
    preallocation: Preallocation,
) -> Result<()> {
    match preallocation {
        Preallocation::Off | Preallocation::Metadata => {}
        Preallocation::Falloc if len > 0 => storage
            .allocate(offset, len)
            .map_err(|e| Error::io("allocating the data area", e))?,
        Preallocation::Falloc => {}
        Preallocation::Full => {
            let zeros = vec![0u8; (WRITE_CHUNK_BYTES as u64).min(len) as usize];
            let end = offset + len;
            let mut at = offset;
            while at < end {
                let n = (end - at).min(zeros.len() as u64) as usize;
                storage
                    .write_at(at, &zeros[..n])
                    .map_err(|e| Error::io(format!("writing zeros at {at:#x}"), e))?;
                at += n as u64;
            }
        }
    }
    Ok(())
}

/// Allocates the new image's data area as `preallocation` asks and sets the file's final
/// length.
pub(super) fn allocate_new_data_area<S: Storage>(
    storage: &S,
    layout: &Layout,
    preallocation: Preallocation,
) -> Result<()> {
    let data_len = layout.data_clusters << layout.rc.cluster_bits;
    allocate_data_area(storage, layout.data_offset, data_len, preallocation)?;
    storage.set_len(layout.file_len).map_err(|e| {
        Error::io(
            format!("setting the new image's length to {}", layout.file_len),
            e,
        )
    })
}
