//! The qcow2 header (the first cluster of the image): fixed fields, feature bits and header
//! extensions, parsed and validated once at open, and encoded again when a field changes.
//!
//! Validation here covers what the header says about itself (magic, version, cluster size,
//! feature bits, extension area). Checks of table offsets against the file length and against
//! each other are in [`crate::engine::format::layout`], which needs the file length too.

use bitflags::bitflags;

use crate::engine::error::{Error, Result};
use crate::engine::format::bytes::{BeBytes, BeWriter};
use crate::engine::format::entry::{L2Width, MIN_EXTENDED_L2_CLUSTER_BITS};
use crate::engine::format::layout::{MAX_BITMAPS, MAX_BITMAP_DIRECTORY_BYTES};

/// "QFI\xfb".
pub const QCOW_MAGIC: u32 = 0x5146_49fb;
/// Smallest cluster size qcow2 allows (512 bytes).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// QEMU's implementation limit (2 MiB clusters).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// refcount_bits = 1 << refcount_order; 64 bits at most.
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// Length of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Smallest version 3 header (through header_length).
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// Offset of the compression_type byte in a version 3 header.
const COMPRESSION_TYPE_OFFSET: usize = 104;
/// The spec limits the backing file name to 1023 bytes.
pub const MAX_BACKING_FILE_NAME_BYTES: u32 = 1023;

/// Header extension type codes.
pub mod ext {
    pub const END: u32 = 0x0000_0000;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_NAME_TABLE: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
    pub const EXTERNAL_DATA_FILE: u32 = 0x4441_5441;
}

bitflags! {
    /// The incompatible_features bitmask (header bytes 72..80). An implementation must refuse
    /// an image with a bit it does not know; unknown bits are kept (`from_bits_retain`) so
    /// that the refusal can name them.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct IncompatibleFeatures: u64 {
        /// Refcounts may be inconsistent: they must be rebuilt before use.
        const DIRTY = 1 << 0;
        /// Some metadata is known to be corrupt: no writes.
        const CORRUPT = 1 << 1;
        /// Guest clusters live in an external data file.
        const EXTERNAL_DATA_FILE = 1 << 2;
        /// compression_type is present and not zlib.
        const COMPRESSION_TYPE = 1 << 3;
        /// 128-bit L2 entries with subcluster bitmaps.
        const EXTENDED_L2 = 1 << 4;
    }
}

impl IncompatibleFeatures {
    /// The bits this engine does not know the meaning of.
    pub fn unknown(self) -> u64 {
        self.bits() & !Self::all().bits()
    }
}

bitflags! {
    /// The compatible_features bitmask (header bytes 80..88); unknown bits may be ignored,
    /// and are kept as they are.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct CompatibleFeatures: u64 {
        /// Refcount updates may be postponed (with the dirty bit set meanwhile). This engine
        /// opens such images but always keeps refcounts exact.
        const LAZY_REFCOUNTS = 1 << 0;
    }
}

bitflags! {
    /// The autoclear_features bitmask (header bytes 88..96). A writer that does not maintain
    /// what a bit promises must clear it before writing.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct AutoclearFeatures: u64 {
        /// The bitmaps extension is consistent.
        const BITMAPS = 1 << 0;
        /// The external data file is a consistent raw image.
        const RAW_EXTERNAL_DATA = 1 << 1;
    }
}

/// How compressed clusters are compressed (header byte 104, version 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    Zlib,
    Zstd,
}

/// One entry of the feature name table extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    pub bit: u8,
    pub name: String,
}

/// The bitmaps extension's fields. The bitmaps themselves are not interpreted by this engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExtension {
    pub nb_bitmaps: u32,
    pub directory_size_bytes: u64,
    pub directory_offset: u64,
}

/// How guest data is encrypted (the header's crypt_method, 1 or 2; 0 is none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CryptMethod {
    /// 1: AES-CBC ("qcow" encryption in QEMU's crypto layer), each 512-byte sector's IV
    /// from its guest offset. QEMU refuses it in system emulators.
    Aes,
    /// 2: LUKS: the LUKS header lies in image clusters named by the full disk encryption
    /// header extension; each 512-byte sector's IV comes from its host offset.
    Luks,
}

impl CryptMethod {
    /// The header's crypt_method field.
    pub fn field(self) -> u32 {
        match self {
            CryptMethod::Aes => 1,
            CryptMethod::Luks => 2,
        }
    }

    /// The name QEMU's options give the format (`encrypt.format`).
    pub fn name(self) -> &'static str {
        match self {
            CryptMethod::Aes => "aes",
            CryptMethod::Luks => "luks",
        }
    }
}

/// The full disk encryption header extension: where the LUKS header lies in the image file
/// (cluster-aligned; whole clusters, counted like any metadata).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncryptionHeaderExtent {
    pub offset: u64,
    pub length_bytes: u64,
}

/// Length of the full disk encryption header extension's data: two 64-bit fields.
pub const ENCRYPTION_HEADER_EXTENSION_BYTES: usize = 16;

impl EncryptionHeaderExtent {
    /// The extension's data as stored.
    pub fn encode(&self) -> Vec<u8> {
        let mut data = Vec::with_capacity(ENCRYPTION_HEADER_EXTENSION_BYTES);
        data.extend_from_slice(&self.offset.to_be_bytes());
        data.extend_from_slice(&self.length_bytes.to_be_bytes());
        data
    }
}

/// A header extension as found on disk, kept verbatim so a header rewrite preserves the ones
/// this engine does not understand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawExtension {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// The parsed header of a qcow2 image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size_bytes: u32,
    pub cluster_bits: u32,
    pub virtual_size: u64,
    pub crypt_method: u32,
    pub l1_size_entries: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: IncompatibleFeatures,
    pub compatible: CompatibleFeatures,
    pub autoclear: AutoclearFeatures,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: CompressionType,
    /// Header bytes from 104 up to header_length (compression_type, padding and fields from
    /// future versions), preserved on rewrite.
    pub additional_fields: Vec<u8>,
    /// Every extension in on-disk order, including the ones parsed below.
    pub extensions: Vec<RawExtension>,
    /// The backing file name, as stored (see [`display_name`]).
    pub backing_file: Option<Vec<u8>>,
    /// The backing format extension, as stored.
    pub backing_format: Option<Vec<u8>>,
    pub feature_names: Vec<FeatureName>,
    pub bitmaps: Option<BitmapsExtension>,
    /// The full disk encryption header extension (LUKS images only).
    pub encryption_header: Option<EncryptionHeaderExtent>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}

/// A name stored in the image (backing file, backing format, snapshot id and name), for a
/// message: the spec gives names no encoding, so they are kept as the bytes they are (as QEMU
/// keeps them) and shown with anything that is not UTF-8 replaced.
pub fn display_name(name: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(name)
}

/// Whether `head` (at least the first 8 bytes of a file) starts like a qcow2 header of a
/// version this engine reads: the magic, and version 2 or 3 (format probing).
pub fn looks_like_qcow2(head: &[u8]) -> bool {
    let h = BeBytes::new("the probed header", head);
    matches!((h.u32(0), h.u32(4)), (Ok(QCOW_MAGIC), Ok(2..=3)))
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Whether guest clusters live in an external data file (incompatible bit 2): at the
    /// guest's own offset there, not refcounted, never compressed.
    pub fn has_data_file(&self) -> bool {
        self.incompatible
            .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE)
    }

    /// Whether the external data file is kept a consistent raw image (autoclear bit 1).
    pub fn data_file_raw(&self) -> bool {
        self.autoclear
            .contains(AutoclearFeatures::RAW_EXTERNAL_DATA)
    }

    /// The external data file's name as the header records it (the extension is optional:
    /// the user may name the file at open instead).
    pub fn data_file_name(&self) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|e| e.kind == ext::EXTERNAL_DATA_FILE)
            .map(|e| e.data.as_slice())
    }

    /// How guest data is encrypted (`None`: it is not). Methods other than 1 and 2 are
    /// refused at parse.
    pub fn crypt_method(&self) -> Option<CryptMethod> {
        match self.crypt_method {
            1 => Some(CryptMethod::Aes),
            2 => Some(CryptMethod::Luks),
            _ => None,
        }
    }

    /// Parses and validates the header from the start of the image. `first_cluster` holds at
    /// least the first cluster of the file (or the whole file if it is shorter; missing bytes
    /// are zeros). Feature bits are checked here; whether the image may be opened read-write
    /// is decided by the caller.
    pub fn parse(first_cluster: &[u8]) -> Result<Header> {
        if first_cluster.len() < V2_HEADER_LEN as usize {
            return Err(invalid("file too short for a qcow2 header"));
        }
        let first = BeBytes::new("the header", first_cluster);
        let magic = first.u32(0)?;
        if magic != QCOW_MAGIC {
            return Err(invalid(format!(
                "bad magic {magic:#010x}, not a qcow2 image"
            )));
        }
        let version = first.u32(4)?;
        if version != 2 && version != 3 {
            return Err(Error::Unsupported(format!(
                "qcow2 version {version} (only 2 and 3)"
            )));
        }
        let cluster_bits = first.u32(20)?;
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(invalid(format!(
                "cluster_bits {cluster_bits} outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
            )));
        }
        let cluster_size = 1usize << cluster_bits;
        if first_cluster.len() < cluster_size {
            return Err(invalid("header buffer shorter than one cluster"));
        }
        let header = &first_cluster[..cluster_size];
        let fields = BeBytes::new("the header", header);

        let (incompatible, compatible, autoclear, refcount_order, header_length) = if version == 2 {
            (0, 0, 0, 4, V2_HEADER_LEN)
        } else {
            (
                fields.u64(72)?,
                fields.u64(80)?,
                fields.u64(88)?,
                fields.u32(96)?,
                fields.u32(100)?,
            )
        };
        if refcount_order > MAX_REFCOUNT_ORDER {
            return Err(invalid(format!(
                "refcount_order {refcount_order} above {MAX_REFCOUNT_ORDER}"
            )));
        }
        if version == 3 {
            if header_length < V3_MIN_HEADER_LEN {
                return Err(invalid(format!("header_length {header_length} below 104")));
            }
            if header_length % 8 != 0 {
                return Err(invalid(format!(
                    "header_length {header_length} not a multiple of 8"
                )));
            }
            if header_length as usize > cluster_size {
                return Err(invalid(format!(
                    "header_length {header_length} larger than the cluster size {cluster_size}"
                )));
            }
        }
        let additional_fields = header
            .get(V3_MIN_HEADER_LEN as usize..header_length as usize)
            .unwrap_or(&[])
            .to_vec();

        let incompatible = IncompatibleFeatures::from_bits_retain(incompatible);
        let compression_byte = additional_fields.first().copied().unwrap_or(0);
        let compression_type = if incompatible.contains(IncompatibleFeatures::COMPRESSION_TYPE) {
            if header_length as usize <= COMPRESSION_TYPE_OFFSET {
                return Err(invalid(
                    "compression type feature bit set but compression_type field absent",
                ));
            }
            match compression_byte {
                0 => {
                    return Err(invalid(
                        "compression type feature bit set but compression_type is zlib (0)",
                    ))
                }
                1 => CompressionType::Zstd,
                other => return Err(Error::Unsupported(format!("compression type {other}"))),
            }
        } else {
            if compression_byte != 0 {
                return Err(invalid(format!(
                    "compression_type {compression_byte} without the compression type feature bit"
                )));
            }
            CompressionType::Zlib
        };

        let mut h = Header {
            version,
            backing_file_offset: fields.u64(8)?,
            backing_file_size_bytes: fields.u32(16)?,
            cluster_bits,
            virtual_size: fields.u64(24)?,
            crypt_method: fields.u32(32)?,
            l1_size_entries: fields.u32(36)?,
            l1_table_offset: fields.u64(40)?,
            refcount_table_offset: fields.u64(48)?,
            refcount_table_clusters: fields.u32(56)?,
            nb_snapshots: fields.u32(60)?,
            snapshots_offset: fields.u64(64)?,
            incompatible,
            compatible: CompatibleFeatures::from_bits_retain(compatible),
            autoclear: AutoclearFeatures::from_bits_retain(autoclear),
            refcount_order,
            header_length,
            compression_type,
            additional_fields,
            extensions: Vec::new(),
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
            bitmaps: None,
            encryption_header: None,
        };
        h.check_features()?;
        h.parse_backing_file_name(header)?;
        h.parse_extensions(header)?;
        Ok(h)
    }

    /// Refuses encryption methods other than AES (1) and LUKS (2), and the incompatible
    /// features this engine does not implement, naming each (from the image's own feature
    /// name table for bits unknown to the engine).
    fn check_features(&self) -> Result<()> {
        if self.crypt_method > 2 {
            return Err(Error::Unsupported(format!(
                "encryption method {} (crypt_method; QEMU knows 1, AES, and 2, LUKS)",
                self.crypt_method
            )));
        }
        if self.data_file_raw() && !self.has_data_file() {
            // QEMU's qcow2 refuses it the same way (the raw bit needs the data file bit).
            return Err(Error::Invalid(
                "data-file-raw requires a data file (autoclear bit 1 without incompatible \
                 bit 2)"
                    .into(),
            ));
        }
        if self.l2_width() == L2Width::Extended && self.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS
        {
            // 32 subclusters of at least 512 bytes each (QEMU: "Unsupported subcluster size").
            return Err(invalid(format!(
                "extended L2 entries (incompatible bit 4) with {}-byte clusters: subclusters \
                 of {} bytes, below 512",
                1u64 << self.cluster_bits,
                1u64 << L2Width::Extended.subcluster_bits(self.cluster_bits)
            )));
        }
        if self.l2_width() == L2Width::Extended && self.has_data_file() {
            return Err(Error::Unsupported(
                "extended L2 entries (incompatible bit 4) with an external data file \
                 (incompatible bit 2)"
                    .into(),
            ));
        }
        if self.l2_width() == L2Width::Extended && self.crypt_method != 0 {
            // The subcluster paths move data without the cipher; refused until they use it.
            return Err(Error::Unsupported(
                "extended L2 entries (incompatible bit 4) with encryption".into(),
            ));
        }
        Ok(())
    }

    /// How wide the L2 entries are (incompatible feature bit 4).
    pub fn l2_width(&self) -> L2Width {
        if self
            .incompatible
            .contains(IncompatibleFeatures::EXTENDED_L2)
        {
            L2Width::Extended
        } else {
            L2Width::Standard
        }
    }

    /// Names an incompatible feature bit, from the image's feature name table if it has one.
    fn incompatible_feature_name(&self, bit: u32) -> String {
        self.feature_names
            .iter()
            .find(|f| f.kind == 0 && u32::from(f.bit) == bit)
            .map(|f| format!("incompatible feature bit {bit} ({})", f.name))
            .unwrap_or_else(|| format!("unknown incompatible feature bit {bit}"))
    }

    fn check_unknown_incompatible(&self) -> Result<()> {
        let unknown = self.incompatible.unknown();
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|bit| unknown & (1u64 << bit) != 0)
                .map(|bit| self.incompatible_feature_name(bit))
                .collect();
            return Err(Error::Unsupported(names.join(", ")));
        }
        Ok(())
    }

    fn parse_backing_file_name(&mut self, header: &[u8]) -> Result<()> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        if self.backing_file_size_bytes > MAX_BACKING_FILE_NAME_BYTES {
            return Err(invalid(format!(
                "backing_file_size {} above {MAX_BACKING_FILE_NAME_BYTES}",
                self.backing_file_size_bytes
            )));
        }
        let start = usize::try_from(self.backing_file_offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(self.backing_file_size_bytes as usize);
        if start < self.header_length as usize {
            return Err(invalid(format!(
                "backing_file_offset {} inside the header",
                self.backing_file_offset
            )));
        }
        let name = header.get(start..end).ok_or_else(|| {
            invalid(format!(
                "backing file name at {} of {} bytes beyond the first cluster",
                self.backing_file_offset, self.backing_file_size_bytes
            ))
        })?;
        self.backing_file = Some(name.to_vec());
        Ok(())
    }

    /// Walks the extension area, from header_length up to the end of the first cluster (or to
    /// the backing file name, which follows the extensions).
    fn parse_extensions(&mut self, header: &[u8]) -> Result<()> {
        let mut at = self.header_length as usize;
        let area_end = if self.backing_file_offset != 0 {
            usize::try_from(self.backing_file_offset)
                .unwrap_or(usize::MAX)
                .min(header.len())
        } else {
            header.len()
        };
        let area = BeBytes::new(
            "the header extension area",
            header.get(..area_end).unwrap_or(&[]),
        );
        // Extensions fill the area up to its end or to an end marker. An area filled to its
        // end (header_length as large as the cluster, or extensions right up to the backing
        // file name) has no room for a marker and needs none, as QEMU reads it.
        while at < area_end {
            if area_end - at < 8 {
                return Err(invalid(format!(
                    "header extension at byte {at} overflows the header area ({area_end} bytes)"
                )));
            }
            let kind = area.u32(at)?;
            let len = area.u32(at + 4)? as usize;
            if kind == ext::END {
                break;
            }
            let data_start = at + 8;
            let data_end = data_start.checked_add(len).filter(|&e| e <= area_end);
            let padded_end = data_end.and_then(|e| e.checked_next_multiple_of(8));
            let (Some(data_end), Some(padded_end)) = (data_end, padded_end) else {
                return Err(invalid(format!(
                    "header extension {kind:#010x} at byte {at} of {len} bytes overflows the \
                     header area ({area_end} bytes)"
                )));
            };
            let data = area.slice(data_start, data_end - data_start)?;
            if self.extensions.iter().any(|e| e.kind == kind) {
                return Err(invalid(format!(
                    "header extension {kind:#010x} appears twice"
                )));
            }
            self.parse_known_extension(kind, data)?;
            self.extensions.push(RawExtension {
                kind,
                data: data.to_vec(),
            });
            at = padded_end.min(area_end);
        }
        // Unknown incompatible bits are reported after the feature name table is known, so
        // the message can name them.
        self.check_unknown_incompatible()
    }

    fn parse_known_extension(&mut self, kind: u32, data: &[u8]) -> Result<()> {
        match kind {
            ext::BACKING_FORMAT => {
                self.backing_format = Some(data.to_vec());
            }
            ext::FEATURE_NAME_TABLE => {
                for entry in data.chunks_exact(48) {
                    let name_bytes = entry.get(2..).unwrap_or(&[]);
                    let len = name_bytes
                        .iter()
                        .position(|&b| b == 0)
                        .unwrap_or(name_bytes.len());
                    let name = String::from_utf8_lossy(name_bytes.get(..len).unwrap_or(&[]));
                    self.feature_names.push(FeatureName {
                        kind: entry.first().copied().unwrap_or(0),
                        bit: entry.get(1).copied().unwrap_or(0),
                        name: name.into_owned(),
                    });
                }
            }
            ext::BITMAPS => {
                if data.len() < 24 {
                    return Err(invalid(format!(
                        "bitmaps extension of {} bytes, expected 24",
                        data.len()
                    )));
                }
                let fields = BeBytes::new("the bitmaps extension", data);
                let bitmaps = BitmapsExtension {
                    nb_bitmaps: fields.u32(0)?,
                    directory_size_bytes: fields.u64(8)?,
                    directory_offset: fields.u64(16)?,
                };
                // As QEMU: the limits hold for bitmaps in use (the autoclear bit set); a stale
                // extension is never read (`check/bitmaps.rs`).
                if self.autoclear.contains(AutoclearFeatures::BITMAPS) {
                    if bitmaps.nb_bitmaps > MAX_BITMAPS {
                        return Err(invalid(format!(
                            "{} bitmaps, above QEMU's limit of {MAX_BITMAPS}",
                            bitmaps.nb_bitmaps
                        )));
                    }
                    if bitmaps.directory_size_bytes > MAX_BITMAP_DIRECTORY_BYTES {
                        return Err(invalid(format!(
                            "bitmap directory of {} bytes, above QEMU's limit of \
                             {MAX_BITMAP_DIRECTORY_BYTES}",
                            bitmaps.directory_size_bytes
                        )));
                    }
                }
                if !bitmaps.directory_offset.is_multiple_of(self.cluster_size()) {
                    return Err(invalid(format!(
                        "bitmap_directory_offset {:#x} not cluster aligned",
                        bitmaps.directory_offset
                    )));
                }
                self.bitmaps = Some(bitmaps);
            }
            ext::FULL_DISK_ENCRYPTION if self.crypt_method == 0 => {
                return Err(invalid("full disk encryption extension without encryption"));
            }
            ext::FULL_DISK_ENCRYPTION => {
                // QEMU's messages.
                if self.crypt_method() != Some(CryptMethod::Luks) {
                    return Err(invalid(
                        "CRYPTO header extension only expected with LUKS encryption method",
                    ));
                }
                if data.len() != ENCRYPTION_HEADER_EXTENSION_BYTES {
                    return Err(invalid(format!(
                        "CRYPTO header extension size {}, but expected size \
                         {ENCRYPTION_HEADER_EXTENSION_BYTES}",
                        data.len()
                    )));
                }
                let fields = BeBytes::new("the full disk encryption header extension", data);
                let extent = EncryptionHeaderExtent {
                    offset: fields.u64(0)?,
                    length_bytes: fields.u64(8)?,
                };
                if !extent.offset.is_multiple_of(self.cluster_size()) {
                    return Err(invalid(format!(
                        "Encryption header offset '{}' is not a multiple of cluster size '{}'",
                        extent.offset,
                        self.cluster_size()
                    )));
                }
                // Its place in the file (inside it, clear of the other tables) is checked
                // with them (`layout.rs`).
                self.encryption_header = Some(extent);
            }
            _ => {}
        }
        Ok(())
    }

    /// Sets (or, with `None`, removes) the bitmaps extension, in place if the header has one
    /// and after the others if not; the autoclear bit is the caller's.
    pub fn set_bitmaps_extension(&mut self, bitmaps: Option<BitmapsExtension>) {
        self.bitmaps = bitmaps;
        let Some(b) = bitmaps else {
            self.extensions.retain(|e| e.kind != ext::BITMAPS);
            return;
        };
        let mut data = Vec::with_capacity(24);
        data.extend_from_slice(&b.nb_bitmaps.to_be_bytes());
        data.extend_from_slice(&0u32.to_be_bytes());
        data.extend_from_slice(&b.directory_size_bytes.to_be_bytes());
        data.extend_from_slice(&b.directory_offset.to_be_bytes());
        match self.extensions.iter_mut().find(|e| e.kind == ext::BITMAPS) {
            Some(e) => e.data = data,
            None => self.extensions.push(RawExtension {
                kind: ext::BITMAPS,
                data,
            }),
        }
    }

    /// Encodes the header, its extensions (in their original order, unknown ones verbatim)
    /// and the backing file name into one cluster. The extensions end with an end marker
    /// where there is room for one (an area filled to its end needs none, see `parse`).
    /// Fails if they no longer fit.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let cluster_size = 1usize << self.cluster_bits;
        let mut out = BeWriter::with_capacity(cluster_size);
        let backing_len = self.backing_file.as_ref().map_or(0, |n| n.len());
        out.u32(QCOW_MAGIC).u32(self.version);
        // The backing file offset is set below, once the extensions are laid out.
        out.u64(0)
            .u32(backing_len as u32)
            .u32(self.cluster_bits)
            .u64(self.virtual_size)
            .u32(self.crypt_method)
            .u32(self.l1_size_entries)
            .u64(self.l1_table_offset)
            .u64(self.refcount_table_offset)
            .u32(self.refcount_table_clusters)
            .u32(self.nb_snapshots)
            .u64(self.snapshots_offset);
        if self.version >= 3 {
            out.u64(self.incompatible.bits())
                .u64(self.compatible.bits())
                .u64(self.autoclear.bits())
                .u32(self.refcount_order)
                .u32(self.header_length)
                .bytes(&self.additional_fields);
        }
        for e in &self.extensions {
            out.u32(e.kind)
                .u32(e.data.len() as u32)
                .bytes(&e.data)
                .pad_to(8);
        }
        if out.len() + 8 + backing_len <= cluster_size {
            out.u64(0);
        }
        if let Some(name) = &self.backing_file {
            let offset = out.len() as u64;
            out.set_u64(8, offset)?;
            out.bytes(name);
        }
        let mut out = out.into_bytes();
        if out.len() > cluster_size {
            return Err(Error::Unsupported(format!(
                "header and extensions ({} bytes) no longer fit in one cluster",
                out.len()
            )));
        }
        out.resize(cluster_size, 0);
        Ok(out)
    }
}
