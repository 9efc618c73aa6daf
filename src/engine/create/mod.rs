//! Creating new images (what `qemu-img create -f qcow2 -o ...` does) and measuring them (what
//! `qemu-img measure -O qcow2` reports).
//!
//! - this file: the options ([`CreateOptions`], typed: QEMU's `-o` syntax is the glue's to
//!   read), their checks, and [`create()`] itself;
//! - `layout`: where every table goes, computed before anything is written;
//! - `write`: the header as QEMU writes it, the tables, the data area;
//! - `measure`: [`measure`], the sizes an image would need.
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
//! LUKS header      encrypt.format=luks only: the clusters the LUKS header takes
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
//!
//! An encrypted image is made in two steps ([`begin_create`], then [`NewImage::finish`]),
//! because its LUKS header comes from the caller's crypto layer once the layout is known:
//! the LUKS header's clusters are counted in the refcount blocks and zero-filled with the
//! tables; the caller writes the LUKS header into them
//! ([`NewImage::write_encryption_header`]); the ordering point of `finish` puts both before
//! the header that names them (crypt_method 2 and the full disk encryption header
//! extension), so no crash leaves a header naming a LUKS header that is not on disk.

use crate::engine::error::{Error, Result};
use crate::engine::format::entry::{L2Width, MIN_EXTENDED_L2_CLUSTER_BITS};
use crate::engine::format::header::{
    display_name, CompressionType, CryptMethod, EncryptionHeaderExtent, Header,
    MAX_BACKING_FILE_NAME_BYTES, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS,
};
use crate::engine::format::refcount::RefcountGeometry;
use crate::engine::storage::Storage;

mod layout;
mod measure;
mod write;

use layout::{l1_entries_for, Layout};
pub use measure::{measure, Measure};
pub(in crate::engine) use write::allocate_data_area;
use write::{allocate_new_data_area, new_header, write_tables};
pub(in crate::engine) use write::{encode_feature_names, qemu_feature_names};

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

/// How a new image's guest data is encrypted (`encrypt.format=`, or `encryption=on` for
/// `aes`). The key and the cipher are the caller's: the engine lays out and writes the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateEncryption {
    /// `aes` (crypt_method 1): the header says so, nothing else is stored.
    Aes,
    /// `luks` (crypt_method 2): `header_bytes` of LUKS header, in whole clusters of their
    /// own that the caller fills ([`NewImage::write_encryption_header`]).
    Luks { header_bytes: u64 },
}

impl CreateEncryption {
    pub fn method(self) -> CryptMethod {
        match self {
            CreateEncryption::Aes => CryptMethod::Aes,
            CreateEncryption::Luks { .. } => CryptMethod::Luks,
        }
    }

    /// Bytes of LUKS header the image holds (0 for `aes`).
    pub(super) fn header_bytes(self) -> u64 {
        match self {
            CreateEncryption::Aes => 0,
            CreateEncryption::Luks { header_bytes } => header_bytes,
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
    /// Encryption of guest data, if any.
    pub encryption: Option<CreateEncryption>,
    /// The external data file's name, as the header records it (guest clusters live there;
    /// create it with [`create_with_data_file`]).
    pub data_file: Option<String>,
    /// The external data file is kept a consistent raw image (autoclear bit 1); the image
    /// is then preallocated (`metadata` at least) so that every guest cluster has its entry.
    pub data_file_raw: bool,
    /// 128-bit L2 entries: each cluster in 32 subclusters allocated one by one (version 3,
    /// clusters of 16 KiB at least).
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
        if self.extended_l2 && self.compat == Compat::V2 {
            return Err(Error::BadOption(
                "Extended L2 entries are only supported with compatibility level 1.1 and \
                 above (use version=v3 or greater)"
                    .into(),
            ));
        }
        let cluster_bits = self.cluster_bits()?;
        if self.backing_file.is_some()
            && self.preallocation != Preallocation::Off
            && !self.extended_l2
        {
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
        if self.data_file_raw && self.data_file.is_none() {
            return Err(Error::BadOption("data-file-raw requires data-file".into()));
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return Err(Error::BadOption(
                "Backing file and data-file-raw cannot be used at the same time".into(),
            ));
        }
        if self.data_file.is_some() && self.compat == Compat::V2 {
            return Err(Error::BadOption(
                "External data files are only supported with compatibility level 1.1 and \
                 above (use version=v3 or greater)"
                    .into(),
            ));
        }
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
        l1_entries_for(size, cluster_bits, self.l2_width())?;
        Ok(())
    }

    /// Refuses what this engine does not create, naming every such option asked for.
    fn check_supported(&self) -> Result<()> {
        let mut refused = Vec::new();
        if self.extended_l2 && self.data_file.is_some() {
            refused.push("extended L2 entries with an external data file".to_owned());
        }
        if self.extended_l2 && self.encryption.is_some() {
            refused.push("extended L2 entries with encryption".to_owned());
        }
        if refused.is_empty() {
            return Ok(());
        }
        Err(Error::Unsupported(format!(
            "creating an image with {}",
            refused.join(", ")
        )))
    }

    /// log2 of the cluster size, checked as QEMU checks it (a power of two in its range;
    /// with extended L2 entries, room for 32 subclusters of 512 bytes).
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
        if self.extended_l2 && bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(Error::BadOption(format!(
                "Extended L2 entries are only supported with cluster sizes of at least {} bytes",
                1u32 << MIN_EXTENDED_L2_CLUSTER_BITS
            )));
        }
        Ok(bits)
    }

    /// The L2 entry width the options ask for.
    pub fn l2_width(&self) -> L2Width {
        if self.extended_l2 {
            L2Width::Extended
        } else {
            L2Width::Standard
        }
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

    /// The preallocation done: as asked, but `metadata` at least for a raw data file (every
    /// guest cluster's entry names its place there, so the raw image is the disk, as QEMU's
    /// qcow2 does).
    pub fn effective_preallocation(&self) -> Preallocation {
        if self.data_file_raw && self.preallocation == Preallocation::Off {
            Preallocation::Metadata
        } else {
            self.preallocation
        }
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
    let encryption_header_bytes = opts.encryption.map_or(0, CreateEncryption::header_bytes);
    if opts
        .encryption
        .is_some_and(|e| e.method() == CryptMethod::Luks)
        && encryption_header_bytes == 0
    {
        return Err(Error::BadOption("a LUKS header of 0 bytes".into()));
    }
    let layout = Layout::new(
        size,
        rc,
        opts.l2_width(),
        opts.effective_preallocation() != Preallocation::Off,
        opts.data_file.is_some(),
        encryption_header_bytes,
    )?;
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
/// cluster is mapped to a host cluster of its own. (With LUKS encryption the LUKS header's
/// clusters stay zeros: use [`begin_create`] to write it before the header names it.)
///
/// Everything is checked before the first write: invalid options leave the storage as it was.
pub fn create<S: Storage>(storage: &S, opts: &CreateOptions) -> Result<()> {
    opts.validate()?;
    if opts.data_file.is_some() {
        return Err(Error::Invalid(
            "an image with an external data file is created with create_with_data_file".into(),
        ));
    }
    begin_create(storage, None, opts)?.finish(storage)
}

/// Creates an image whose guest clusters live in the external data file `data` (already
/// created, empty or not: what it holds is kept, and with `data_file_raw` becomes the disk's
/// data): the image file as [`create`] writes it, with the data file's name in the header,
/// and the data file at least as long as the disk, preallocated as asked past its end. The
/// data file is ready before the image's header names it.
pub fn create_with_data_file<S: Storage>(
    storage: &S,
    data: &S,
    opts: &CreateOptions,
) -> Result<()> {
    if opts.data_file.is_none() {
        return Err(Error::Invalid(
            "create_with_data_file needs the data file's name in the options".into(),
        ));
    }
    begin_create(storage, Some(data), opts)?.finish(storage)
}

/// A new image whose tables are written and whose header is not yet.
#[derive(Debug)]
pub struct NewImage {
    header_cluster: Vec<u8>,
    encryption_header: Option<EncryptionHeaderExtent>,
}

/// Writes everything of a new image but its header (see [`create`]): the external data
/// file (`data`, when the options name one), the tables, the data area, and the LUKS
/// header's clusters as zeros, each counted. [`NewImage::finish`] writes the header.
pub fn begin_create<S: Storage>(
    storage: &S,
    data: Option<&S>,
    opts: &CreateOptions,
) -> Result<NewImage> {
    if opts.data_file.is_some() != data.is_some() {
        return Err(Error::Invalid(
            "an external data file needs both its name in the options and its storage".into(),
        ));
    }
    let Plan {
        layout,
        header_cluster,
    } = plan(opts)?;
    let preallocation = opts.effective_preallocation();
    let preallocate = preallocation != Preallocation::Off;
    if let Some(data) = data {
        let size = opts.rounded_size()?;
        let what = |e| Error::io("sizing the new image's external data file", e);
        // What the data file holds is kept, as QEMU's qcow2 keeps it (making a file empty is
        // the protocol layer's creation, which `qemu-img create` runs first): an existing
        // raw image becomes the data of a `data_file_raw` image (iotest 244). Allocated past
        // its end (falloc extends it so), then as long as the disk.
        let len = data.len().map_err(what)?;
        if len < size {
            allocate_data_area(data, len, size - len, preallocation)?;
        }
        if data.len().map_err(what)? < size {
            data.set_len(size).map_err(what)?;
        }
        data.flush()
            .map_err(|e| Error::io("flushing the new image's external data file", e))?;
    }

    if !storage
        .is_empty()
        .map_err(|e| Error::io("getting the length of the storage", e))?
    {
        storage
            .set_len(0)
            .map_err(|e| Error::io("truncating the storage", e))?;
    }
    write_tables(storage, &layout, preallocate)?;
    allocate_new_data_area(storage, &layout, preallocation)?;
    let encryption_header = match opts.encryption {
        Some(CreateEncryption::Luks { header_bytes }) => Some(EncryptionHeaderExtent {
            offset: layout.encryption_header_offset,
            length_bytes: header_bytes,
        }),
        Some(CreateEncryption::Aes) | None => None,
    };
    Ok(NewImage {
        header_cluster,
        encryption_header,
    })
}

impl NewImage {
    /// Where the LUKS header goes (`encrypt.format=luks` only).
    pub fn encryption_header(&self) -> Option<EncryptionHeaderExtent> {
        self.encryption_header
    }

    /// Writes `bytes` at `offset` of the LUKS header, inside its clusters.
    pub fn write_encryption_header<S: Storage>(
        &self,
        storage: &S,
        offset: u64,
        bytes: &[u8],
    ) -> Result<()> {
        let Some(extent) = self.encryption_header else {
            return Err(Error::BadOption(
                "a LUKS header for an image without LUKS encryption".into(),
            ));
        };
        let end = offset.checked_add(bytes.len() as u64);
        if end.is_none_or(|end| end > extent.length_bytes) {
            return Err(Error::BadOption(format!(
                "{} bytes at {offset} of the LUKS header, which is {} bytes",
                bytes.len(),
                extent.length_bytes
            )));
        }
        storage
            .write_at(extent.offset + offset, bytes)
            .map_err(|e| Error::io("writing the LUKS header", e))
    }

    /// Writes the header, once the tables and the LUKS header are there.
    pub fn finish<S: Storage>(self, storage: &S) -> Result<()> {
        // Ordering point: the tables, the refcounts and the LUKS header the header names are
        // on disk before the header is.
        storage
            .flush()
            .map_err(|e| Error::io("flushing the new image's tables", e))?;
        storage
            .write_at(0, &self.header_cluster)
            .map_err(|e| Error::io("writing the new image's header", e))?;
        storage
            .flush()
            .map_err(|e| Error::io("flushing the new image's header", e))
    }
}

#[cfg(test)]
mod tests {
    use super::layout::refcount_structure_clusters;
    use super::write::full_refblock;
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
        let layout = Layout::new(1 << 30, rc, L2Width::Standard, false, false, 0).unwrap();
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
