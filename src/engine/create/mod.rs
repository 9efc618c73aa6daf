//! Creating new images (what `qemu-img create -f qcow2 -o ...` does) and measuring them (what
//! `qemu-img measure -O qcow2` reports).
//!
//! Unlike QEMU, which writes a minimal image, opens it and grows it through its normal
//! allocation paths, creation here computes the whole layout first and then writes every
//! table with a few large sequential writes:
//!
//! ```text
//! cluster 0        header, header extensions, backing file name
//! reftable         refcount table (enough clusters to name every refcount block)
//! refblocks        refcount blocks covering every cluster below, all counts 1
//! L1 table         l1_size entries, rounded up to whole clusters
//! L2 tables        preallocation only: one per L1 entry, every entry COPIED data
//! data area        preallocation only: guest cluster n at data_offset + n * cluster_size
//! ```
//!
//! For the common case (no preallocation, one refcount block is enough) this is exactly
//! QEMU's layout: header, refcount table, refcount block, L1 table. With preallocation the
//! number of refcount blocks and table clusters is the same fixed point that
//! `qcow2_calc_prealloc_size` computes, so the file is exactly as long as `qemu-img measure`
//! says a fully allocated image is.
//!
//! Write order: everything but the header first, an ordering point (storage flush), then the
//! header, then a flush for durability. A crash before the header write leaves a file that is
//! not a qcow2 image at all (the storage is truncated first), never one whose header names
//! tables that are not written yet.

use crate::engine::error::{Error, Result};
use crate::engine::format::entry::EntryFlags;
use crate::engine::format::header::{
    display_name, ext, AutoclearFeatures, CompatibleFeatures, CompressionType, FeatureName, Header,
    IncompatibleFeatures, RawExtension, MAX_BACKING_FILE_NAME_BYTES, MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS, V2_HEADER_LEN,
};
use crate::engine::format::layout::{bytes_per_l1_entry, MAX_L1_BYTES, MAX_REFTABLE_BYTES};
use crate::engine::format::refcount::RefcountGeometry;
use crate::engine::storage::Storage;

/// QEMU's default cluster size (64 KiB).
pub const DEFAULT_CLUSTER_SIZE_BYTES: u64 = 64 << 10;
/// QEMU's default refcount width.
pub const DEFAULT_REFCOUNT_BITS: u32 = 16;
/// Length of the version 3 header QEMU writes: the 104 mandatory bytes, the compression_type
/// byte and 7 bytes of padding.
const V3_HEADER_LEN: u32 = 112;
/// Host offsets must fit in bits 9..=55 of L1/L2/refcount table entries.
const MAX_HOST_OFFSET_BYTES: u64 = 1 << 56;
/// Largest guest size QEMU accepts (`qemu-img`: "Image size must be less than 8 EiB!").
const MAX_SIZE_BYTES: u64 = i64::MAX as u64;
/// Size of the buffer that turns table generation into large sequential writes.
const WRITE_CHUNK_BYTES: usize = 4 << 20;

/// The compatibility level (`compat=`): which header version to write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compat {
    /// "0.10": version 2.
    V2,
    /// "1.1": version 3 (QEMU's default).
    #[default]
    V3,
}

impl Compat {
    /// The header version number.
    pub fn version(self) -> u32 {
        match self {
            Compat::V2 => 2,
            Compat::V3 => 3,
        }
    }

    /// The name `qemu-img info` shows ("0.10" or "1.1").
    pub fn as_str(self) -> &'static str {
        match self {
            Compat::V2 => "0.10",
            Compat::V3 => "1.1",
        }
    }
}

/// How much of the image to allocate at creation (`preallocation=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Preallocation {
    /// Only the header and the empty tables.
    #[default]
    Off,
    /// Every guest cluster gets an L2 entry and a host cluster; the file is sparse, so the
    /// clusters read as zeros without taking space.
    Metadata,
    /// Like `Metadata`, with the data area allocated in the file system
    /// ([`Storage::allocate`]).
    Falloc,
    /// Like `Metadata`, with the data area written with zeros.
    Full,
}

impl Preallocation {
    pub fn as_str(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}

/// What to create: `qemu-img create -f qcow2 -o ...`'s options.
///
/// Build it with [`CreateOptions::new`] (QEMU's defaults) and set fields. QEMU's `-o` syntax
/// is the glue's to read (`glue/create.rs` fills this from QEMU's typed option values).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual disk size. Rounded up to a multiple of 512 bytes, as `qemu-img create` does.
    pub size_bytes: u64,
    /// A power of two from 512 bytes to 2 MiB. Default 64 KiB.
    pub cluster_size_bytes: u64,
    /// Default [`Compat::V3`].
    pub compat: Compat,
    /// Stored verbatim in the header; not opened or checked here. Bytes: qcow2 names have no
    /// encoding.
    pub backing_file: Option<Vec<u8>>,
    /// The backing file's format name, in the backing format header extension.
    pub backing_format: Option<Vec<u8>>,
    /// Width of a refcount: a power of two from 1 to 64. Default 16, the only width version
    /// 2 has.
    pub refcount_bits: u32,
    /// Sets the lazy refcounts compatible feature bit (version 3 only).
    pub lazy_refcounts: bool,
    /// zstd needs version 3 and sets incompatible feature bit 3.
    pub compression_type: CompressionType,
    pub preallocation: Preallocation,
    /// Refused: an encryption format ("aes", "luks") if one was asked for.
    pub encryption: Option<String>,
    /// Refused: an external data file.
    pub data_file: Option<String>,
    /// Refused: the external data file is a raw image.
    pub data_file_raw: bool,
    /// Refused: 128-bit L2 entries with subclusters.
    pub extended_l2: bool,
}

impl CreateOptions {
    /// QEMU's defaults for an image of `size_bytes`.
    pub fn new(size_bytes: u64) -> CreateOptions {
        CreateOptions {
            size_bytes,
            cluster_size_bytes: DEFAULT_CLUSTER_SIZE_BYTES,
            compat: Compat::V3,
            backing_file: None,
            backing_format: None,
            refcount_bits: DEFAULT_REFCOUNT_BITS,
            lazy_refcounts: false,
            compression_type: CompressionType::Zlib,
            preallocation: Preallocation::Off,
            encryption: None,
            data_file: None,
            data_file_raw: false,
            extended_l2: false,
        }
    }

    /// Checks the options and their combinations, with QEMU's messages (as of 10.0) where it
    /// has one. Options this engine cannot create are refused with [`Error::Unsupported`],
    /// naming them.
    pub fn validate(&self) -> Result<()> {
        self.check_supported()?;
        let cluster_bits = self.cluster_bits()?;
        if self.backing_file.is_some() && self.preallocation != Preallocation::Off {
            return Err(Error::BadOption(
                "Backing file and preallocation can only be used at the same time if \
                 extended_l2 is on"
                    .into(),
            ));
        }
        if self.backing_format.is_some() && self.backing_file.is_none() {
            return Err(Error::BadOption(
                "Backing format cannot be used without backing file".into(),
            ));
        }
        if self.compat == Compat::V2 && self.lazy_refcounts {
            return Err(Error::BadOption(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use \
                 version=v3 or greater)"
                    .into(),
            ));
        }
        self.refcount_order()?;
        if self.compat == Compat::V2 && self.compression_type != CompressionType::Zlib {
            return Err(Error::BadOption(
                "Non-zlib compression type is only supported with compatibility level 1.1 \
                 and above (use version=v3 or greater)"
                    .into(),
            ));
        }
        if let Some(name) = &self.backing_file {
            if name.is_empty() || name.contains(&0) {
                return Err(Error::BadOption(format!(
                    "Invalid backing file name '{}'",
                    display_name(name).escape_debug()
                )));
            }
            if name.len() > MAX_BACKING_FILE_NAME_BYTES as usize {
                return Err(Error::BadOption(format!(
                    "Backing file name of {} bytes is longer than the {} bytes qcow2 allows",
                    name.len(),
                    MAX_BACKING_FILE_NAME_BYTES
                )));
            }
        }
        if let Some(format) = &self.backing_format {
            if format.is_empty() || format.contains(&0) {
                return Err(Error::BadOption(format!(
                    "Invalid backing format '{}'",
                    display_name(format).escape_debug()
                )));
            }
        }
        let size = self.rounded_size()?;
        l1_entries_for(size, cluster_bits)?;
        Ok(())
    }

    /// Refuses what this engine does not create, naming every such option asked for.
    fn check_supported(&self) -> Result<()> {
        let mut refused = Vec::new();
        if let Some(format) = &self.encryption {
            refused.push(format!("encryption (encrypt.format={format})"));
        }
        if let Some(path) = &self.data_file {
            refused.push(format!("an external data file (data_file={path})"));
        }
        if self.data_file_raw {
            refused.push("a raw external data file (data_file_raw=on)".to_owned());
        }
        if self.extended_l2 {
            refused.push("extended L2 entries (extended_l2=on)".to_owned());
        }
        if refused.is_empty() {
            return Ok(());
        }
        Err(Error::Unsupported(format!(
            "creating an image with {}",
            refused.join(", ")
        )))
    }

    fn cluster_bits(&self) -> Result<u32> {
        let size = self.cluster_size_bytes;
        let bits = size.trailing_zeros();
        if !size.is_power_of_two() || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(Error::BadOption(format!(
                "Cluster size must be a power of two between {} and {}k",
                1u32 << MIN_CLUSTER_BITS,
                1u32 << (MAX_CLUSTER_BITS - 10)
            )));
        }
        Ok(bits)
    }

    fn refcount_order(&self) -> Result<u32> {
        let bits = self.refcount_bits;
        if bits > 64 || !bits.is_power_of_two() {
            return Err(Error::BadOption(
                "Refcount width must be a power of two and may not exceed 64 bits".into(),
            ));
        }
        if self.compat == Compat::V2 && bits != 16 {
            return Err(Error::BadOption(
                "Different refcount widths than 16 bits require compatibility level 1.1 or \
                 above (use version=v3 or greater)"
                    .into(),
            ));
        }
        Ok(bits.trailing_zeros())
    }

    /// The virtual size the header gets: rounded up to 512 bytes (`qemu-img create` rounds
    /// silently; QEMU's blockdev-create refuses such sizes instead).
    pub fn rounded_size(&self) -> Result<u64> {
        self.size_bytes
            .checked_next_multiple_of(512)
            .filter(|&s| s <= MAX_SIZE_BYTES)
            .ok_or_else(|| Error::BadOption("Image size must be less than 8 EiB!".into()))
    }
}

/// The L1 size (entries) QEMU gives an image of `size` bytes, refused above QEMU's L1 limit.
fn l1_entries_for(size: u64, cluster_bits: u32) -> Result<u64> {
    let entries = size.div_ceil(bytes_per_l1_entry(cluster_bits));
    if entries * 8 > MAX_L1_BYTES {
        return Err(Error::BadOption(
            "The image size is too large for file format 'qcow2' (try using a larger cluster \
             size)"
                .into(),
        ));
    }
    Ok(entries)
}

/// Refcount blocks and refcount table clusters needed so that `other_clusters` clusters plus
/// the refcount blocks and table themselves are all counted: the smallest fixed point, as
/// QEMU's `qcow2_refcount_metadata_size` finds it. Returns (blocks, table clusters).
fn refcount_structure_clusters(other_clusters: u64, rc: RefcountGeometry) -> (u64, u64) {
    let entries_per_block = rc.entries_per_block();
    let blocks_per_table_cluster = 1u64 << (rc.cluster_bits - 3);
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let next_blocks = (other_clusters + blocks + table).div_ceil(entries_per_block);
        let next_table = next_blocks.div_ceil(blocks_per_table_cluster);
        // Both only grow, so the pair settles once neither changes.
        if (next_blocks, next_table) == (blocks, table) {
            return (blocks, table);
        }
        (blocks, table) = (next_blocks, next_table);
    }
}

/// Where every table of a new image goes (offsets in bytes, counts in clusters unless said).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    rc: RefcountGeometry,
    reftable_offset: u64,
    reftable_clusters: u64,
    refblocks_offset: u64,
    refblock_count: u64,
    l1_offset: u64,
    l1_entries: u64,
    l1_clusters: u64,
    l2_offset: u64,
    l2_count: u64,
    data_offset: u64,
    data_clusters: u64,
    /// Every cluster below this one is in use (refcount 1).
    clusters_in_use: u64,
    /// Length of the finished file: the end of the L1 entries without preallocation (as
    /// QEMU leaves it), the end of the data area with.
    file_len: u64,
}

impl Layout {
    fn cluster_size(&self) -> u64 {
        1u64 << self.rc.cluster_bits
    }

    fn new(size: u64, rc: RefcountGeometry, preallocate: bool) -> Result<Layout> {
        let cluster_bits = rc.cluster_bits;
        let cluster_size = 1u64 << cluster_bits;
        let l1_entries = l1_entries_for(size, cluster_bits)?;
        let l1_clusters = (l1_entries * 8).div_ceil(cluster_size);
        let (l2_count, data_clusters) = if preallocate {
            (l1_entries, size.div_ceil(cluster_size))
        } else {
            (0, 0)
        };
        let other_clusters = 1 + l1_clusters + l2_count + data_clusters;
        let (refblock_count, reftable_clusters) = refcount_structure_clusters(other_clusters, rc);
        if reftable_clusters << cluster_bits > MAX_REFTABLE_BYTES {
            return Err(Error::BadOption(format!(
                "The image needs a refcount table of {} bytes, above the {MAX_REFTABLE_BYTES} \
                 bytes QEMU accepts (use a larger cluster size or fewer refcount bits)",
                reftable_clusters << cluster_bits
            )));
        }
        let clusters_in_use = other_clusters + refblock_count + reftable_clusters;
        if clusters_in_use > MAX_HOST_OFFSET_BYTES >> cluster_bits {
            return Err(Error::Unsupported(format!(
                "preallocating {clusters_in_use} clusters: host offsets above 2^56 bytes"
            )));
        }

        let reftable_offset = cluster_size;
        let refblocks_offset = reftable_offset + (reftable_clusters << cluster_bits);
        let l1_offset = refblocks_offset + (refblock_count << cluster_bits);
        let l2_offset = l1_offset + (l1_clusters << cluster_bits);
        let data_offset = l2_offset + (l2_count << cluster_bits);
        let file_len = if preallocate || l1_entries == 0 {
            clusters_in_use << cluster_bits
        } else {
            l1_offset + l1_entries * 8
        };
        Ok(Layout {
            rc,
            reftable_offset,
            reftable_clusters,
            refblocks_offset,
            refblock_count,
            // QEMU leaves the L1 offset at 0 when the table is empty.
            l1_offset: if l1_entries == 0 { 0 } else { l1_offset },
            l1_entries,
            l1_clusters,
            l2_offset,
            l2_count,
            data_offset,
            data_clusters,
            clusters_in_use,
            file_len,
        })
    }
}

/// The feature name table QEMU writes (QEMU 10.0, `qcow2_update_header`).
fn qemu_feature_names() -> Vec<FeatureName> {
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
fn encode_feature_names(names: &[FeatureName]) -> Vec<u8> {
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
/// then (version 3 with clusters above 4 KiB only, as QEMU does to leave room for the
/// backing file name in small clusters) the feature name table, the end marker and the
/// backing file name.
fn new_header(opts: &CreateOptions, size: u64, layout: &Layout) -> Header {
    let version = opts.compat.version();
    let mut incompatible = IncompatibleFeatures::empty();
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
    let mut feature_names = Vec::new();
    if version >= 3 && layout.cluster_size() > 4096 {
        feature_names = qemu_feature_names();
        extensions.push(RawExtension {
            kind: ext::FEATURE_NAME_TABLE,
            data: encode_feature_names(&feature_names),
        });
    }
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
        crypt_method: 0,
        l1_size_entries: layout.l1_entries as u32,
        l1_table_offset: layout.l1_offset,
        refcount_table_offset: layout.reftable_offset,
        refcount_table_clusters: layout.reftable_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible,
        compatible,
        autoclear: AutoclearFeatures::empty(),
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
fn full_refblock(rc: RefcountGeometry) -> Result<Vec<u8>> {
    // Eight bytes hold a whole number of entries of any width; repeat that pattern.
    let mut unit = [0u8; 8];
    for index in 0..64 / u64::from(rc.refcount_bits()) {
        rc.set(&mut unit, index, 1)?;
    }
    Ok(unit.repeat(1usize << (rc.cluster_bits - 3)))
}

/// Writes the refcount table, the refcount blocks, the L1 table and the L2 tables, in file
/// order, starting right after the header cluster.
fn write_tables<S: Storage>(storage: &S, layout: &Layout, preallocate: bool) -> Result<()> {
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

    if layout.l1_entries == 0 {
        return w.finish().map(|_| ());
    }
    // L1 table: with preallocation, entry j names L2 table j (refcount 1: COPIED).
    for j in 0..layout.l1_entries {
        let entry = if preallocate {
            (layout.l2_offset + j * cluster_size) | EntryFlags::COPIED.bits()
        } else {
            0
        };
        w.push(&entry.to_be_bytes())?;
    }
    if !preallocate {
        // Like QEMU, the file ends with the last L1 entry.
        return w.finish().map(|_| ());
    }
    w.pad_to(layout.l2_offset)?;

    // L2 tables: guest cluster g maps to data cluster g (refcount 1: COPIED).
    let entries_per_l2 = cluster_size / 8;
    let mut table = vec![0u8; cluster_size as usize];
    for j in 0..layout.l2_count {
        for (k, slot) in table.chunks_exact_mut(8).enumerate() {
            let guest_cluster = j * entries_per_l2 + k as u64;
            let entry = if guest_cluster < layout.data_clusters {
                (layout.data_offset + guest_cluster * cluster_size) | EntryFlags::COPIED.bits()
            } else {
                0
            };
            slot.copy_from_slice(&entry.to_be_bytes());
        }
        w.push(&table)?;
    }
    let end = w.finish()?;
    debug_assert_eq!(end, layout.data_offset);
    Ok(())
}

/// Allocates a data area of `len` bytes at `offset` as `preallocation` asks: nothing for
/// `off` and `metadata` (the area reads as zeros, sparse), reserved space for `falloc`,
/// zeros written for `full`. For a new image and for a resize's new area alike.
pub(super) fn allocate_data_area<S: Storage>(
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
fn allocate_new_data_area<S: Storage>(
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

/// Everything `create` writes, computed and checked before the first write.
struct Plan {
    layout: Layout,
    header_cluster: Vec<u8>,
}

fn plan(opts: &CreateOptions) -> Result<Plan> {
    opts.validate()?;
    let size = opts.rounded_size()?;
    let rc = RefcountGeometry {
        refcount_order: opts.refcount_order()?,
        cluster_bits: opts.cluster_bits()?,
    };
    let layout = Layout::new(size, rc, opts.preallocation != Preallocation::Off)?;
    let header = new_header(opts, size, &layout);
    let header_cluster = header.encode().map_err(|e| match e {
        Error::Unsupported(msg) => Error::BadOption(format!(
            "the backing file name and header extensions do not fit in one {} byte cluster \
             ({msg}); use a larger cluster size or a shorter backing file name",
            layout.cluster_size()
        )),
        other => other,
    })?;
    // What was encoded must be what the engine itself accepts at open.
    Header::parse(&header_cluster)?;
    Ok(Plan {
        layout,
        header_cluster,
    })
}

/// Creates a qcow2 image in `storage`, replacing whatever it held: `qemu-img create -f qcow2`
/// with `opts`. Every cluster in use is counted exactly once; with preallocation every guest
/// cluster is mapped to a host cluster of its own.
///
/// Everything is checked before the first write: invalid options leave the storage as it was.
pub fn create<S: Storage>(storage: &S, opts: &CreateOptions) -> Result<()> {
    let Plan {
        layout,
        header_cluster,
    } = plan(opts)?;
    let preallocate = opts.preallocation != Preallocation::Off;

    if !storage
        .is_empty()
        .map_err(|e| Error::io("getting the length of the storage", e))?
    {
        storage
            .set_len(0)
            .map_err(|e| Error::io("truncating the storage", e))?;
    }
    write_tables(storage, &layout, preallocate)?;
    allocate_new_data_area(storage, &layout, opts.preallocation)?;
    // Ordering point: the tables the header names are on disk before the header is.
    storage
        .flush()
        .map_err(|e| Error::io("flushing the new image's tables", e))?;
    storage
        .write_at(0, &header_cluster)
        .map_err(|e| Error::io("writing the new image's header", e))?;
    storage
        .flush()
        .map_err(|e| Error::io("flushing the new image's header", e))
}

/// What `qemu-img measure -O qcow2` reports, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Measure {
    /// File size needed for the image holding the given guest data (all metadata of a
    /// fully allocated image included, as QEMU counts it).
    pub required: u64,
    /// File size of the image with every guest cluster allocated.
    pub fully_allocated: u64,
}

/// Measures an image created with `opts`: `qemu-img measure -O qcow2 --size N` when
/// `allocated_guest_bytes` is `None`; for converting an existing image, pass the bytes of
/// guest data it holds, counted in whole clusters of the new image as QEMU does (each
/// allocated, non-zero extent rounded out to cluster boundaries; the whole virtual size if
/// the new image gets a backing file).
///
/// Only the options `qemu-img measure` looks at matter: the cluster size, the compatibility
/// level and refcount width, and full or falloc preallocation (which require the whole
/// virtual size). Like QEMU, the virtual size is rounded up to whole clusters. Encryption is
/// refused, as by [`create`].
pub fn measure(opts: &CreateOptions, allocated_guest_bytes: Option<u64>) -> Result<Measure> {
    if let Some(format) = &opts.encryption {
        return Err(Error::Unsupported(format!(
            "measuring an encrypted image (encrypt.format={format})"
        )));
    }
    let cluster_bits = opts.cluster_bits()?;
    let rc = RefcountGeometry {
        refcount_order: opts.refcount_order()?,
        cluster_bits,
    };
    let cluster_size = 1u64 << cluster_bits;
    let virtual_size = opts
        .size_bytes
        .checked_next_multiple_of(cluster_size)
        .filter(|&s| s <= MAX_SIZE_BYTES)
        .ok_or_else(|| Error::BadOption("Image size must be less than 8 EiB!".into()))?;
    let l2_tables = (virtual_size >> cluster_bits).div_ceil(cluster_size / 8);
    if l2_tables * 8 > MAX_L1_BYTES {
        return Err(Error::BadOption(
            "The image size is too large (try using a larger cluster size)".into(),
        ));
    }

    // A fully allocated image: header, L2 tables, L1 table (whole clusters), data, and the
    // refcount structures counting all of them and themselves.
    let l1_clusters = l2_tables.div_ceil(cluster_size / 8);
    let data_clusters = virtual_size >> cluster_bits;
    let other_clusters = 1 + l2_tables + l1_clusters + data_clusters;
    let (blocks, table) = refcount_structure_clusters(other_clusters, rc);
    let fully_allocated = (other_clusters + blocks + table) << cluster_bits;

    let data_bytes = match opts.preallocation {
        Preallocation::Full | Preallocation::Falloc => virtual_size,
        Preallocation::Off | Preallocation::Metadata => allocated_guest_bytes
            .unwrap_or(0)
            .div_ceil(cluster_size)
            .saturating_mul(cluster_size)
            .min(virtual_size),
    };
    Ok(Measure {
        required: fully_allocated - virtual_size + data_bytes,
        fully_allocated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::MemStorage;

    fn geometry(cluster_bits: u32, refcount_order: u32) -> RefcountGeometry {
        RefcountGeometry {
            refcount_order,
            cluster_bits,
        }
    }

    /// The fixed point counts everything: blocks cover all clusters, the table names all
    /// blocks, and one block fewer would not do.
    #[test]
    fn refcount_structures_are_the_smallest_that_count_themselves() {
        for cluster_bits in [9, 12, 16] {
            for order in 0..=6 {
                let rc = geometry(cluster_bits, order);
                for other in [1, 2, 63, 64, 65, 4095, 4096, 100_000, 3_000_000] {
                    let (blocks, table) = refcount_structure_clusters(other, rc);
                    let total = other + blocks + table;
                    assert!(blocks * rc.entries_per_block() >= total);
                    assert!(table << (cluster_bits - 3) >= blocks);
                    assert!((blocks - 1) * rc.entries_per_block() < total);
                }
            }
        }
    }

    #[test]
    fn full_refblock_counts_one_everywhere() {
        for order in 0..=6 {
            let rc = geometry(9, order);
            let block = full_refblock(rc).unwrap();
            assert_eq!(block.len(), 512);
            for i in 0..rc.entries_per_block() {
                assert_eq!(rc.get(&block, i).unwrap(), 1, "order {order} entry {i}");
            }
        }
    }

    #[test]
    fn default_layout_is_qemus_header_reftable_refblock_l1() {
        let rc = geometry(16, 4);
        let layout = Layout::new(1 << 30, rc, false).unwrap();
        assert_eq!(layout.reftable_offset, 0x1_0000);
        assert_eq!(layout.refblocks_offset, 0x2_0000);
        assert_eq!(layout.l1_offset, 0x3_0000);
        assert_eq!(layout.l1_entries, 2);
        assert_eq!(layout.clusters_in_use, 4);
        assert_eq!(layout.file_len, 0x3_0000 + 16);
    }

    #[test]
    fn created_image_opens_in_the_engine() {
        let storage = MemStorage::new(b"old content".to_vec());
        let mut opts = CreateOptions::new(3 << 20);
        opts.preallocation = Preallocation::Metadata;
        opts.cluster_size_bytes = 4096;
        create(&storage, &opts).unwrap();
        let mut image = crate::engine::Image::open(storage, &Default::default()).unwrap();
        let (mapping, len) = image.map(0, 3 << 20).unwrap();
        assert!(matches!(mapping, crate::engine::Mapping::Data { .. }));
        assert_eq!(len, 3 << 20);
        image.write(4000, b"hello", None).unwrap();
        let mut buf = [0u8; 9];
        image.read(3998, &mut buf, None).unwrap();
        assert_eq!(&buf, b"\0\0hello\0\0");
        image.close().unwrap();
    }

    #[test]
    fn invalid_options_leave_the_storage_alone() {
        let storage = MemStorage::new(b"keep me".to_vec());
        let mut opts = CreateOptions::new(1 << 20);
        opts.cluster_size_bytes = 1000;
        assert!(matches!(create(&storage, &opts), Err(Error::BadOption(_))));
        assert_eq!(storage.into_inner(), b"keep me");
    }
}
