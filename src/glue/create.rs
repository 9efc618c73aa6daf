//! Image creation (`qemu-img create -f qcow2b`) and measurement (`qemu-img measure -O
//! qcow2b`): QEMU's option lists in, the engine's `create`/`measure` out. The image is
//! standard qcow2, exactly as `-f qcow2` would make it; an encrypted one gets its key and
//! LUKS header from QEMU's crypto layer (`crypto.rs`).

use std::ffi::{c_char, c_int, CStr};
use std::ptr;

use super::bindings::{self, BlockDriver, BlockDriverState, QemuOpts};
use super::crypto::{self, CreateCrypto};
use super::ffi::{entries, set_error, to_c_errp};
use super::opts::{
    bool_opt, leak_list, number_opt, size_opt, string_opt, Opt, OptsListCell, OptsView,
};
use super::storage::BlkStorage;
use crate::engine::create::{Compat, Preallocation};
use crate::engine::format::header::CompressionType;
use crate::engine::{
    create, create_with_data_file, measure, CreateEncryption, CreateOptions, CryptMethod, Error,
};

const SIZE: &CStr = c"size";
const COMPAT: &CStr = c"compat";
const BACKING_FILE: &CStr = c"backing_file";
const BACKING_FMT: &CStr = c"backing_fmt";
const CLUSTER_SIZE: &CStr = c"cluster_size";
const PREALLOCATION: &CStr = c"preallocation";
const LAZY_REFCOUNTS: &CStr = c"lazy_refcounts";
const REFCOUNT_BITS: &CStr = c"refcount_bits";
const COMPRESSION_TYPE: &CStr = c"compression_type";
const ENCRYPTION: &CStr = c"encryption";
const ENCRYPT_FORMAT: &CStr = c"encrypt.format";
const ENCRYPT_KEY_SECRET: &CStr = c"encrypt.key-secret";
const ENCRYPT_CIPHER_ALG: &CStr = c"encrypt.cipher-alg";
const ENCRYPT_CIPHER_MODE: &CStr = c"encrypt.cipher-mode";
const ENCRYPT_IVGEN_ALG: &CStr = c"encrypt.ivgen-alg";
const ENCRYPT_IVGEN_HASH_ALG: &CStr = c"encrypt.ivgen-hash-alg";
const ENCRYPT_HASH_ALG: &CStr = c"encrypt.hash-alg";
const ENCRYPT_ITER_TIME: &CStr = c"encrypt.iter-time";
/// The crypto layer's own options (QEMU's `QCryptoBlockCreateOptions` after `encrypt.`),
/// read by QEMU's parser (`crypto::create_options`).
const ENCRYPT_LAYER_OPTS: [&CStr; 7] = [
    ENCRYPT_KEY_SECRET,
    ENCRYPT_CIPHER_ALG,
    ENCRYPT_CIPHER_MODE,
    ENCRYPT_IVGEN_ALG,
    ENCRYPT_IVGEN_HASH_ALG,
    ENCRYPT_HASH_ALG,
    ENCRYPT_ITER_TIME,
];
const DATA_FILE: &CStr = c"data_file";
const DATA_FILE_RAW: &CStr = c"data_file_raw";
const EXTENDED_L2: &CStr = c"extended_l2";

/// The creation options, named as for QEMU's qcow2.
const CREATE_OPTS: [Opt; 21] = [
    size_opt(SIZE, c"Virtual disk size"),
    string_opt(COMPAT, c"Compatibility level (v2 [0.10], v3 [1.1])"),
    string_opt(BACKING_FILE, c"File name of a base image"),
    string_opt(BACKING_FMT, c"Image format of the base image"),
    size_opt(CLUSTER_SIZE, c"qcow2 cluster size"),
    string_opt(
        PREALLOCATION,
        c"Preallocation mode (allowed values: off, metadata, falloc, full)",
    ),
    bool_opt(LAZY_REFCOUNTS, c"Postpone refcount updates"),
    number_opt(REFCOUNT_BITS, c"Width of a reference count entry in bits"),
    string_opt(
        COMPRESSION_TYPE,
        c"Compression method used for image cluster compression (zlib, zstd)",
    ),
    bool_opt(
        ENCRYPTION,
        c"Encrypt the image with format 'aes' (deprecated by QEMU: use encrypt.format=aes)",
    ),
    string_opt(
        ENCRYPT_FORMAT,
        c"Encrypt the image, format choices: 'aes', 'luks'",
    ),
    string_opt(
        ENCRYPT_KEY_SECRET,
        c"ID of the secret that provides the image's key",
    ),
    string_opt(
        ENCRYPT_CIPHER_ALG,
        c"LUKS: cipher algorithm of the data (default aes-256)",
    ),
    string_opt(
        ENCRYPT_CIPHER_MODE,
        c"LUKS: cipher mode of the data (default xts)",
    ),
    string_opt(
        ENCRYPT_IVGEN_ALG,
        c"LUKS: IV generator of each sector (default plain64)",
    ),
    string_opt(
        ENCRYPT_IVGEN_HASH_ALG,
        c"LUKS: hash of the IV generator (essiv)",
    ),
    string_opt(
        ENCRYPT_HASH_ALG,
        c"LUKS: hash of the key derivation and anti-forensic split (default sha256)",
    ),
    number_opt(
        ENCRYPT_ITER_TIME,
        c"LUKS: milliseconds to spend deriving a key (default 2000)",
    ),
    string_opt(DATA_FILE, c"File name of an external data file"),
    bool_opt(
        DATA_FILE_RAW,
        c"The external data file must stay valid as a raw image",
    ),
    bool_opt(EXTENDED_L2, c"Extended L2 tables"),
];

/// The option list for `BlockDriver.create_opts`, built once.
pub fn create_opts() -> *mut bindings::QemuOptsList {
    static LIST: OptsListCell = OptsListCell::new();
    LIST.get_or_init(|| leak_list::<22>(c"qcow2b-create-opts", &CREATE_OPTS))
}

/// A string option's value that must be one of `names`: its index there. The message is
/// QEMU's (`expected` adds what it says after it, as for compression_type).
fn one_of(key: &CStr, value: &[u8], names: &[&str], expected: &str) -> Result<usize, Error> {
    names
        .iter()
        .position(|n| n.as_bytes() == value)
        .ok_or_else(|| {
            Error::BadOption(format!(
                "Parameter '{}' does not accept value '{}'{expected}",
                key.to_string_lossy(),
                String::from_utf8_lossy(value),
            ))
        })
}

/// The engine's typed options from QEMU's (which QEMU has parsed: sizes, numbers and booleans
/// arrive as values); with `take`, they are removed from `opts`, leaving the protocol layer's
/// (as QEMU's qcow2 does before creating the file). The values of string options that name a
/// choice are matched here, with QEMU's spellings.
///
/// # Safety
/// `opts` is a live `QemuOpts` of (a superset of) the creation option list.
unsafe fn create_options(opts: *mut QemuOpts, take: bool) -> Result<CreateOptions, Error> {
    // SAFETY: per the caller.
    let o = unsafe { OptsView::new(opts, take) };
    let mut options = CreateOptions::new(o.size(SIZE).unwrap_or(0));
    if let Some(v) = o.string(COMPAT) {
        options.compat = match v.as_slice() {
            b"0.10" | b"v2" => Compat::V2,
            b"1.1" | b"v3" => Compat::V3,
            _ => {
                return Err(Error::BadOption(format!(
                    "Invalid compatibility level: '{}'",
                    String::from_utf8_lossy(&v)
                )))
            }
        };
    }
    options.backing_file = o.string(BACKING_FILE);
    options.backing_format = o.string(BACKING_FMT);
    if let Some(v) = o.size(CLUSTER_SIZE) {
        options.cluster_size_bytes = v;
    }
    if let Some(v) = o.string(PREALLOCATION) {
        const MODES: [Preallocation; 4] = [
            Preallocation::Off,
            Preallocation::Metadata,
            Preallocation::Falloc,
            Preallocation::Full,
        ];
        let names = MODES.map(Preallocation::as_str);
        options.preallocation = MODES[one_of(PREALLOCATION, &v, &names, "")?];
    }
    if let Some(v) = o.bool(LAZY_REFCOUNTS) {
        options.lazy_refcounts = v;
    }
    if let Some(v) = o.number(REFCOUNT_BITS) {
        // A width above u32 is refused by validate as any other bad width.
        options.refcount_bits = u32::try_from(v).unwrap_or(u32::MAX);
    }
    if let Some(v) = o.string(COMPRESSION_TYPE) {
        const TYPES: [CompressionType; 2] = [CompressionType::Zlib, CompressionType::Zstd];
        options.compression_type = TYPES[one_of(
            COMPRESSION_TYPE,
            &v,
            &["zlib", "zstd"],
            " (expected 'zlib' or 'zstd')",
        )?];
    }
    // As QEMU's qcow2: `encryption=on` is `encrypt.format=aes` (and `off` nothing); the two
    // together are refused. The crypto layer's options are QEMU's to parse: taken here only
    // so that they do not reach the protocol layer.
    let legacy = o.bool(ENCRYPTION);
    options.encryption = match (legacy, o.string(ENCRYPT_FORMAT)) {
        (Some(true), Some(_)) => {
            return Err(Error::BadOption(
                "'encrypt.format' and its alias 'encryption' can't be used at the same time".into(),
            ))
        }
        (Some(true), None) => Some(CreateEncryption::Aes),
        (_, Some(format)) => match format.as_slice() {
            b"aes" => Some(CreateEncryption::Aes),
            // The header's length comes from the crypto layer (crypto::create).
            b"luks" => Some(CreateEncryption::Luks { header_bytes: 0 }),
            _ => {
                return Err(Error::BadOption(format!(
                    "Parameter 'format' does not accept value '{}'",
                    String::from_utf8_lossy(&format)
                )))
            }
        },
        (_, None) => None,
    };
    for name in ENCRYPT_LAYER_OPTS {
        if o.string(name).is_some() && options.encryption.is_none() {
            return Err(Error::BadOption(
                "Parameter 'encrypt.format' is missing".into(),
            ));
        }
    }
    options.data_file = o
        .string(DATA_FILE)
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    options.data_file_raw = o.bool(DATA_FILE_RAW).unwrap_or(false);
    options.extended_l2 = o.bool(EXTENDED_L2).unwrap_or(false);
    Ok(options)
}

/// A creation from the typed options on, the one path both entries take (`qemu-img
/// create`'s option list and `blockdev-create`'s QAPI options are converted to
/// [`CreateOptions`] first): the options checked and the key made before anything is written,
/// so that a refused option or key leaves nothing on disk; then the image written.
struct Creation {
    options: CreateOptions,
    encrypted: bool,
    /// The LUKS header the key came with (LUKS only).
    luks_header: Option<Vec<u8>>,
}

impl Creation {
    /// Checks `options` (QEMU's messages; what qcow2b cannot create is refused, naming it)
    /// and makes the key `crypto` asks for.
    fn prepare(options: CreateOptions, crypto: Option<&CreateCrypto>) -> Result<Creation, Error> {
        options.validate()?;
        let luks_header = match crypto {
            Some(crypto) => crypto::make_key(crypto)?,
            None => None,
        };
        Ok(Creation {
            options,
            encrypted: crypto.is_some(),
            luks_header,
        })
    }

    /// Writes the image into `image`, its guest data into `data` when the options name an
    /// external data file (both already exist, as the protocol layer made them).
    fn write(self, image: &BlkStorage, data: Option<&BlkStorage>) -> Result<(), Error> {
        match (self.encrypted, data) {
            (true, _) => crypto::create(image, data, self.options, self.luks_header.as_deref()),
            (false, Some(data)) => create_with_data_file(image, data, &self.options),
            (false, None) => create(image, &self.options),
        }
    }
}

entries! {
pub fn qcow2b_co_create_opts(
    _drv: *mut BlockDriver,
    filename: *const c_char,
    opts: *mut QemuOpts,
    errp: *mut *mut bindings::Error,
) -> c_int, errp = errp {
    // SAFETY: QEMU passes a valid file name, options and errp; we run in a coroutine.
    unsafe {
        to_c_errp("create", errp, || {
            // The crypto layer's options first, with QEMU's parser and messages (they are
            // read from `opts` before create_options takes them).
            let crypto = match create_options(opts, false)?.encryption {
                Some(encryption) => {
                    match crypto::create_options(opts, encryption.method(), errp) {
                        Some(crypto) => Some(crypto),
                        // errp says why.
                        None => return Ok(-libc::EINVAL),
                    }
                }
                None => None,
            };
            let creation = Creation::prepare(create_options(opts, true)?, crypto.as_ref())?;
            // The protocol layer makes the file (it takes the options it knows, such as
            // preallocation for file-posix); the engine writes the image into it.
            let ret = bindings::bdrv_create_file(filename, opts, errp);
            if ret < 0 {
                return Ok(ret);
            }
            let Some(storage) = BlkStorage::open(filename, errp) else {
                return Ok(-libc::EIO);
            };
            // The external data file is a file of the protocol layer too (made with the
            // same options), ready before the image's header names it.
            let data = match &creation.options.data_file {
                None => None,
                Some(data_name) => {
                    let data_name = std::ffi::CString::new(data_name.as_bytes()).map_err(|_| {
                        Error::BadOption("the data file name holds a NUL byte".into())
                    })?;
                    let ret = bindings::bdrv_create_file(data_name.as_ptr(), opts, errp);
                    if ret < 0 {
                        return Ok(ret);
                    }
                    let Some(data) = BlkStorage::open(data_name.as_ptr(), errp) else {
                        return Ok(-libc::EIO);
                    };
                    Some(data)
                }
            };
            creation.write(&storage, data.as_ref())?;
            Ok(0)
        })
    }
}
}

/// A node `bdrv_open_blockdev_ref` opened (`blockdev-create`'s `file`, `data-file`): the
/// reference is given back on drop.
struct OpenedNode(*mut BlockDriverState);

impl OpenedNode {
    /// Opens (or finds, for a node name) the node `node` refers to; on failure `*errp` says
    /// why.
    ///
    /// # Safety
    /// `node` is a live `BlockdevRef`; `errp` NULL or valid.
    unsafe fn open(
        node: *mut bindings::BlockdevRef,
        errp: *mut *mut bindings::Error,
    ) -> Option<OpenedNode> {
        // SAFETY: per the caller.
        let bs = unsafe { bindings::bdrv_open_blockdev_ref(node, errp) };
        (!bs.is_null()).then_some(OpenedNode(bs))
    }

    /// The node's file name, as an image's header records its data file (QEMU's qcow2
    /// records `filename` too).
    fn filename(&self) -> String {
        // SAFETY: the node is open; its filename is a NUL-terminated array.
        unsafe { CStr::from_ptr((*self.0).filename.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for OpenedNode {
    fn drop(&mut self) {
        // SAFETY: the reference bdrv_open_blockdev_ref gave, given back once.
        unsafe { bindings::bdrv_unref(self.0) };
    }
}

/// QEMU's name of a block driver (`backing-fmt`), as the header's backing format records it.
fn driver_name(driver: bindings::BlockdevDriver) -> Result<Vec<u8>, Error> {
    let index = c_int::try_from(driver)
        .map_err(|_| Error::BadOption(format!("Invalid backing format {driver}")))?;
    // SAFETY: the generated lookup table of the enum, valid for every value the QAPI
    // visitor accepted (which `driver` is); qapi_enum_lookup asserts the range.
    let name = unsafe {
        bindings::qapi_enum_lookup(ptr::addr_of!(bindings::BlockdevDriver_lookup), index)
    };
    // SAFETY: the table's names are static C strings.
    Ok(unsafe { CStr::from_ptr(name) }.to_bytes().to_vec())
}

/// The engine's typed options from `blockdev-create`'s (qcow2's QAPI type, which qcow2b's
/// branch shares), with QEMU's messages for what the QAPI type allows and qcow2 refuses;
/// `data_file` is the name of the data file's node. The key's options are borrowed.
///
/// # Safety
/// `q` is the live options of a `blockdev-create` job, which outlive the returned crypto.
unsafe fn blockdev_create_options(
    q: &bindings::BlockdevCreateOptionsQcow2,
    data_file: Option<String>,
) -> Result<(CreateOptions, Option<CreateCrypto>), Error> {
    // QEMU's qcow2 (where qemu-img create rounds the size up).
    if !q.size.is_multiple_of(512) {
        return Err(Error::BadOption(
            "Image size must be a multiple of 512 bytes".into(),
        ));
    }
    let mut options = CreateOptions::new(q.size);
    if q.has_version {
        options.compat = match q.version {
            bindings::BLOCKDEV_QCOW2_VERSION_V2 => Compat::V2,
            _ => Compat::V3,
        };
    }
    if q.has_cluster_size {
        options.cluster_size_bytes = q.cluster_size;
    }
    options.extended_l2 = q.has_extended_l2 && q.extended_l2;
    if q.has_preallocation {
        options.preallocation = match q.preallocation {
            bindings::PREALLOC_MODE_OFF => Preallocation::Off,
            bindings::PREALLOC_MODE_METADATA => Preallocation::Metadata,
            bindings::PREALLOC_MODE_FALLOC => Preallocation::Falloc,
            bindings::PREALLOC_MODE_FULL => Preallocation::Full,
            mode => {
                return Err(Error::BadOption(format!(
                    "Unsupported preallocation mode {mode}"
                )))
            }
        };
    }
    if q.has_backing_file && !q.backing_file.is_null() {
        // SAFETY: a QAPI string, NUL-terminated, alive with the options.
        options.backing_file = Some(
            unsafe { CStr::from_ptr(q.backing_file) }
                .to_bytes()
                .to_vec(),
        );
    }
    if q.has_backing_fmt {
        options.backing_format = Some(driver_name(q.backing_fmt)?);
    }
    options.lazy_refcounts = q.has_lazy_refcounts && q.lazy_refcounts;
    if q.has_refcount_bits {
        // A negative width or one above u32 is refused by validate as any other bad width.
        options.refcount_bits = u32::try_from(q.refcount_bits).unwrap_or(u32::MAX);
    }
    if q.has_compression_type {
        options.compression_type = match q.compression_type {
            bindings::QCOW2_COMPRESSION_TYPE_ZLIB => CompressionType::Zlib,
            bindings::QCOW2_COMPRESSION_TYPE_ZSTD => CompressionType::Zstd,
            _ => return Err(Error::BadOption("Unknown compression type".into())),
        };
    }
    options.data_file = data_file;
    options.data_file_raw = q.has_data_file_raw && q.data_file_raw;
    let crypto = if q.has_encrypt && !q.encrypt.is_null() {
        // SAFETY: per the caller.
        let crypto = unsafe { CreateCrypto::borrowed(q.encrypt) };
        options.encryption = match crypto.method() {
            Some(CryptMethod::Aes) => Some(CreateEncryption::Aes),
            // The header's length comes with the key (Creation::prepare).
            Some(CryptMethod::Luks) => Some(CreateEncryption::Luks { header_bytes: 0 }),
            None => {
                return Err(Error::BadOption(
                    "Crypto format not supported in qcow2".into(),
                ))
            }
        };
        Some(crypto)
    } else {
        None
    };
    Ok((options, crypto))
}

/// `blockdev-create`'s size, checked where QEMU's qcow2 checks it, with its messages: after
/// every other option, by the truncate of the new image to its size (the block layer's
/// bounds, then qcow2's growth of the L1 table). `qemu-img create` checks it first, with
/// other messages (the engine's).
fn check_size_as_qcow2_truncates(options: &CreateOptions) -> Result<(), Error> {
    CreateOptions {
        size_bytes: 0,
        ..options.clone()
    }
    .validate()?;
    let size = options.size_bytes;
    let max_bytes = i64::MAX as u64 / u64::from(bindings::BDRV_MAX_ALIGNMENT)
        * u64::from(bindings::BDRV_MAX_ALIGNMENT);
    if i64::try_from(size).is_err() {
        return Err(Error::BadOption(
            "Could not resize image: Image size cannot be negative".into(),
        ));
    }
    if size > max_bytes {
        return Err(Error::BadOption(format!(
            "Could not resize image: offset({size}) exceeds maximum({max_bytes})"
        )));
    }
    // Every other option is valid (above) and the size within the block layer's bounds: what
    // is left to refuse is an L1 table larger than qcow2 allows.
    options.validate().map_err(|e| match e {
        Error::BadOption(_) => Error::BadOption(
            "Could not resize image: Failed to grow the L1 table: File too large".into(),
        ),
        e => e,
    })
}

entries! {
/// `blockdev-create` with `driver=qcow2b`, a job's coroutine: the image made on the `file`
/// node (and its guest data on the `data-file` node), as `qemu-img create -f qcow2b` makes
/// it on a file.
pub fn qcow2b_co_create(
    opts: *mut bindings::BlockdevCreateOptions,
    errp: *mut *mut bindings::Error,
) -> c_int, errp = errp {
    // SAFETY: QEMU passes the job's options, whose driver is qcow2b or qcow2 (the union's
    // branch of that name, qcow2's type for both), and its errp; they live until the job's run returns. We run in
    // the job's coroutine.
    unsafe {
        to_c_errp("create", errp, || {
            // driver=qcow2 when qcow2b serves that name (`serve_qcow2.rs`): both branches
            // have qcow2's type.
            let q = match (*opts).driver {
                bindings::BLOCKDEV_DRIVER_QCOW2B => &(*opts).u.qcow2b,
                bindings::BLOCKDEV_DRIVER_QCOW2 => &(*opts).u.qcow2,
                other => {
                    return Err(Error::Invalid(format!(
                        "blockdev-create for driver {other} reached qcow2b"
                    )))
                }
            };
            // The nodes first, as QEMU's qcow2 opens them; the options are checked before
            // anything is written on either.
            let Some(file) = OpenedNode::open(q.file, errp) else {
                return Ok(-libc::EIO);
            };
            let data_node = if q.has_data_file && !q.data_file.is_null() {
                let Some(node) = OpenedNode::open(q.data_file, errp) else {
                    return Ok(-libc::EIO);
                };
                Some(node)
            } else {
                None
            };
            let (options, crypto) =
                blockdev_create_options(q, data_node.as_ref().map(OpenedNode::filename))?;
            check_size_as_qcow2_truncates(&options)?;
            let creation = Creation::prepare(options, crypto.as_ref())?;
            let Some(image) = BlkStorage::on_node(file.0, errp) else {
                return Ok(-libc::EPERM);
            };
            let data = match &data_node {
                Some(node) => match BlkStorage::on_node(node.0, errp) {
                    Some(data) => Some(data),
                    None => return Ok(-libc::EPERM),
                },
                None => None,
            };
            creation.write(&image, data.as_ref())?;
            Ok(0)
        })
    }
}
}

/// Bytes of `in_bs` that hold data, counted in whole clusters of `cluster_size` as QEMU's
/// qcow2 measure counts them.
///
/// # Safety
/// `in_bs` is an open node.
unsafe fn allocated_bytes(in_bs: *mut BlockDriverState, cluster_size: u64) -> Result<u64, Error> {
    // SAFETY: per the caller.
    let size = unsafe { bindings::bdrv_getlength(in_bs) };
    let size = u64::try_from(size).map_err(|_| {
        Error::io(
            "getting the source image length",
            std::io::Error::from_raw_os_error(-(size as i32)),
        )
    })?;
    let mut required = 0u64;
    let mut offset = 0u64;
    while offset < size {
        let mut pnum = 0i64;
        // SAFETY: in_bs is open; NULL base, map and file are allowed.
        let ret = unsafe {
            bindings::bdrv_block_status_above(
                in_bs,
                std::ptr::null_mut(),
                offset as i64,
                (size - offset) as i64,
                &mut pnum,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        if ret < 0 {
            return Err(Error::io(
                format!("getting the allocation status of the source at {offset}"),
                std::io::Error::from_raw_os_error(-ret),
            ));
        }
        let mut len = u64::try_from(pnum).unwrap_or(0).max(1);
        let data = (bindings::BDRV_BLOCK_DATA | bindings::BDRV_BLOCK_ALLOCATED) as c_int;
        if ret & bindings::BDRV_BLOCK_ZERO as c_int == 0 && ret & data == data {
            // Whole clusters: the rest of the last one is skipped, the start of the first
            // one counted.
            len = (offset + len).next_multiple_of(cluster_size) - offset;
            required += offset % cluster_size + len;
        }
        offset += len;
    }
    Ok(required)
}

entries! {
pub fn qcow2b_measure(
    opts: *mut QemuOpts,
    in_bs: *mut BlockDriverState,
    errp: *mut *mut bindings::Error,
) -> *mut bindings::BlockMeasureInfo, errp = errp {
    let mut info = std::ptr::null_mut();
    // SAFETY: QEMU passes live options, a NULL or open source node, and errp.
    unsafe {
        to_c_errp("measure", errp, || {
            let mut options = create_options(opts, false)?;
            if let Some(CreateEncryption::Luks { .. }) = options.encryption {
                // As QEMU's qcow2: a trial creation tells how long the LUKS header is.
                let Some(crypto) = crypto::create_options(opts, crate::engine::CryptMethod::Luks, errp)
                else {
                    return Ok(-libc::EINVAL);
                };
                let Some(header_bytes) = crypto::luks_header_bytes(&crypto, errp) else {
                    return Ok(-libc::EINVAL);
                };
                options.encryption = Some(CreateEncryption::Luks { header_bytes });
            }
            let allocated = if in_bs.is_null() {
                None
            } else {
                let len = bindings::bdrv_getlength(in_bs);
                options.size_bytes = u64::try_from(len).unwrap_or(0);
                Some(allocated_bytes(in_bs, options.cluster_size_bytes)?)
            };
            let m = measure(&options, allocated)?;
            let out: *mut bindings::BlockMeasureInfo =
                bindings::g_malloc0(std::mem::size_of::<bindings::BlockMeasureInfo>() as u64)
                    .cast();
            (*out).required = m.required as i64;
            (*out).fully_allocated = m.fully_allocated as i64;
            info = out;
            Ok(0)
        });
    }
    if info.is_null() && !errp.is_null() {
        // SAFETY: guard_errp set *errp on every failure; this only covers a success that
        // produced nothing, which cannot happen, so the message is never shown.
        unsafe {
            if (*errp).is_null() {
                set_error(errp, "qcow2b: measure produced no result");
            }
        }
    }
    info
}
}
