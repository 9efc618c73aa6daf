//! Encrypted images through QEMU's own crypto layer (`crypto/block.c`), as QEMU's qcow2
//! uses it: the engine decides what is encrypted and with which IV offset
//! (`engine::image::encryption`); a [`QemuCrypto`] does the encrypting with the image's
//! `QCryptoBlock`.
//!
//! - Open: the runtime options `encrypt.format` and `encrypt.key-secret` (QEMU's
//!   `BlockdevQcow2Encryption`) become `QCryptoBlockOpenOptions` through
//!   `block_crypto_open_opts_init`; `qcrypto_block_open` reads a LUKS header from the
//!   clusters the full disk encryption header extension names. With `BDRV_O_NO_IO`
//!   (`qemu-img info`) the block is opened without the key and guest data stays refused.
//!   Method 1 (AES) is refused in system emulators, with QEMU's message.
//! - Create: the `encrypt.*` creation options become `QCryptoBlockCreateOptions` through
//!   `block_crypto_create_opts_init`; `qcrypto_block_create` makes the key and calls back
//!   with the LUKS header's length and bytes, kept in memory until the file exists (so a
//!   refused key leaves none); then the engine lays the image out with the header's clusters
//!   counted and zero-filled (`engine::begin_create`), the header's bytes are written into
//!   them, and only then the qcow2 header that names them (`NewImage::finish`).
//!
//! Everything runs in the node's AioContext (open and create outside a coroutine, requests
//! inside one); a `QCryptoBlock` is used by one thread at a time, so one cipher instance is
//! enough (`n_threads` 1).

use std::ffi::{c_int, c_void, CStr, CString};
use std::ptr;
use std::rc::Rc;

use super::bindings::{self, QCryptoBlock, QDict, QemuOpts};
use super::ffi::{entries, set_error, take_error};
use super::file::FileAccess;
use super::storage::BlkStorage;
use crate::engine::format::header::EncryptionHeaderExtent;
use crate::engine::{
    begin_create, CreateEncryption, CreateOptions, CryptMethod, DataCipher, Error, Image, Storage,
};

/// The prefix QEMU's qcow2 gives its crypto options (messages name `encrypt.key-secret`).
const OPTION_PREFIX: &CStr = c"encrypt.";

/// An image's `QCryptoBlock`, freed on drop.
pub struct QemuCrypto {
    block: *mut QCryptoBlock,
    /// Opened with the key (not `BDRV_O_NO_IO`): it can encrypt and decrypt.
    keyed: bool,
}

impl Drop for QemuCrypto {
    fn drop(&mut self) {
        // SAFETY: the block was opened or created by QEMU and is freed once, here.
        unsafe { bindings::qcrypto_block_free(self.block) };
    }
}

impl QemuCrypto {
    /// Whether it can encrypt and decrypt (opened with the key).
    pub fn keyed(&self) -> bool {
        self.keyed
    }

    /// The sector its cipher works in (512 for both of qcow2's formats).
    pub fn sector_size(&self) -> u64 {
        // SAFETY: the block is open.
        unsafe { bindings::qcrypto_block_get_sector_size(self.block) }
    }

    /// QEMU's description of the encryption (`qemu-img info`'s `encrypt`), or the error.
    pub fn info(&self) -> Result<*mut bindings::QCryptoBlockInfo, Error> {
        let mut err = ptr::null_mut();
        // SAFETY: the block is open; err is a local Error * taken below.
        let info = unsafe { bindings::qcrypto_block_get_info(self.block, &mut err) };
        if info.is_null() {
            // SAFETY: QEMU set err on failure.
            return Err(Error::BadOption(unsafe { take_error(err) }));
        }
        Ok(info)
    }

    fn crypt(
        &self,
        what: &str,
        iv_offset: u64,
        buf: &mut [u8],
        f: unsafe extern "C" fn(
            *mut QCryptoBlock,
            u64,
            *mut u8,
            usize,
            *mut *mut bindings::Error,
        ) -> c_int,
    ) -> Result<(), Error> {
        if !self.keyed {
            return Err(Error::Unsupported(format!(
                "{what} without the key (the image was opened for no I/O)"
            )));
        }
        // SAFETY: the block is open with its cipher; buf is valid for its length; the engine
        // passes whole sectors (checked in `Encryption::encrypt`/`decrypt`), which QEMU
        // asserts. As QEMU's qcow2, no Error is asked for: a failure is -EIO.
        let ret = unsafe {
            f(
                self.block,
                iv_offset,
                buf.as_mut_ptr(),
                buf.len(),
                ptr::null_mut(),
            )
        };
        if ret < 0 {
            return Err(Error::io(
                format!("{what} {} bytes at {iv_offset:#x}", buf.len()),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        Ok(())
    }
}

impl DataCipher for QemuCrypto {
    fn encrypt(&self, iv_offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.crypt(
            "encrypting",
            iv_offset,
            buf,
            bindings::qcrypto_block_encrypt,
        )
    }

    fn decrypt(&self, iv_offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.crypt(
            "decrypting",
            iv_offset,
            buf,
            bindings::qcrypto_block_decrypt,
        )
    }
}

/// A QDict the caller owns, released on drop (`qobject_unref`).
struct OwnedQDict(*mut QDict);

impl OwnedQDict {
    fn new() -> OwnedQDict {
        // SAFETY: a new, empty dictionary with one reference, ours.
        OwnedQDict(unsafe { bindings::qdict_new() })
    }

    fn put(&self, key: &CStr, value: &CStr) {
        // SAFETY: the dictionary is live; QEMU copies key and value.
        unsafe { bindings::qdict_put_str(self.0, key.as_ptr(), value.as_ptr()) };
    }
}

impl Drop for OwnedQDict {
    fn drop(&mut self) {
        if self.0.is_null() {
            return;
        }
        // SAFETY: qobject_unref, which is inline in C: the dictionary holds the reference
        // this value owns; the last one destroys it.
        unsafe {
            let base = &mut (*self.0).base;
            base.refcnt -= 1;
            if base.refcnt == 0 {
                bindings::qobject_destroy(self.0.cast());
            }
        }
    }
}

/// QEMU's name of a qcow2 method in its crypto layer's options.
fn crypto_format(method: CryptMethod) -> &'static CStr {
    match method {
        CryptMethod::Aes => c"qcow",
        CryptMethod::Luks => c"luks",
    }
}

/// Checks the runtime option `encrypt.format` against the image, with QEMU's messages (at
/// open and at every reopen).
pub fn check_format(method: Option<CryptMethod>, format: Option<&str>) -> Result<(), Error> {
    match (method, format) {
        (None, Some(format)) => Err(Error::BadOption(format!(
            "No encryption in image header, but options specified format '{format}'"
        ))),
        (Some(method), Some(format)) if format != method.name() => Err(Error::BadOption(format!(
            "Header reported '{}' encryption format but options specify '{format}'",
            method.name()
        ))),
        _ => Ok(()),
    }
}

/// Where `qcrypto_block_open` reads the LUKS header from (its read callback's opaque).
struct HeaderReader<'a> {
    file: &'a FileAccess,
    extent: EncryptionHeaderExtent,
}

entries! {
/// `QCryptoBlockReadFunc`: bytes of the LUKS header, inside the clusters the extension names.
fn read_luks_header(
    _block: *mut QCryptoBlock,
    offset: usize,
    buf: *mut u8,
    buflen: usize,
    opaque: *mut c_void,
    errp: *mut *mut bindings::Error,
) -> Result<c_int, Error>, errp = errp {
    // SAFETY: opaque is the HeaderReader `open` passed, alive for the whole
    // qcrypto_block_open; buf is valid for buflen bytes.
    let (reader, buf) = unsafe {
        (
            &*opaque.cast::<HeaderReader>(),
            std::slice::from_raw_parts_mut(buf, buflen),
        )
    };
    let inside = (offset as u64)
        .checked_add(buflen as u64)
        .is_some_and(|end| end <= reader.extent.length_bytes);
    if !inside {
        return Err(Error::BadOption(
            "Request for data outside of extension header".into(),
        ));
    }
    reader
        .file
        .read_at(reader.extent.offset + offset as u64, buf)
        .map(|()| 0)
        .map_err(|e| Error::io("Could not read encryption header", e))
}
}

/// Opens the crypto layer of an encrypted image, with the key the runtime options name
/// (`None` for an image without encryption). On failure `*errp` says why (QEMU's message)
/// and the errno is returned.
///
/// # Safety
/// `errp` is NULL or a valid `Error **` whose `*errp` is NULL; `image` reads through the
/// node's open file child.
pub unsafe fn open(
    image: &Image<FileAccess>,
    key_secret: Option<&str>,
    flags: c_int,
    errp: *mut *mut bindings::Error,
) -> Result<Option<Rc<QemuCrypto>>, c_int> {
    let Some(method) = image.header().crypt_method() else {
        return Ok(None);
    };
    // SAFETY: plain queries and error reporting into errp (caller's contract).
    unsafe {
        if method == CryptMethod::Aes && bindings::bdrv_uses_whitelist() {
            set_error(
                errp,
                "Use of AES-CBC encrypted qcow2 images is no longer supported in system \
                 emulators",
            );
            bindings::error_append_hint(
                errp,
                c"%s".as_ptr(),
                c"You can use 'qemu-img convert' to convert your image to an alternative supported format, such as unencrypted qcow2, or raw with the LUKS format instead.\n"
                    .as_ptr(),
            );
            return Err(-libc::ENOSYS);
        }
    }
    let no_io = flags & bindings::BDRV_O_NO_IO as c_int != 0;
    let extent = image.header().encryption_header;
    if method == CryptMethod::Luks && extent.is_none() {
        if no_io {
            // As QEMU's qcow2: nothing to open, and nothing will be read.
            return Ok(None);
        }
        // SAFETY: as above.
        unsafe { set_error(errp, "Missing CRYPTO header for crypt method 2") };
        return Err(-libc::EINVAL);
    }

    let options = OwnedQDict::new();
    options.put(c"format", crypto_format(method));
    if let Some(secret) = key_secret {
        let secret = CString::new(secret).map_err(|_| {
            // SAFETY: as above.
            unsafe { set_error(errp, "encrypt.key-secret holds a NUL byte") };
            -libc::EINVAL
        })?;
        options.put(c"key-secret", &secret);
    }
    // SAFETY: the dictionary is live; errp per the caller.
    let open_options = unsafe { bindings::block_crypto_open_opts_init(options.0, errp) };
    if open_options.is_null() {
        return Err(-libc::EINVAL);
    }
    let reader = HeaderReader {
        file: image.storage(),
        extent: extent.unwrap_or(EncryptionHeaderExtent {
            offset: 0,
            length_bytes: 0,
        }),
    };
    let (read_func, opaque): (bindings::QCryptoBlockReadFunc, *mut c_void) = match extent {
        Some(_) => (
            Some(read_luks_header),
            ptr::from_ref(&reader).cast_mut().cast(),
        ),
        None => (None, ptr::null_mut()),
    };
    let crypto_flags = if no_io {
        bindings::QCRYPTO_BLOCK_OPEN_NO_IO
    } else {
        0
    };
    // SAFETY: the options are live until freed below; the reader outlives the call, which
    // reads through it synchronously; errp per the caller.
    let block = unsafe {
        let block = bindings::qcrypto_block_open(
            open_options,
            OPTION_PREFIX.as_ptr(),
            read_func,
            opaque,
            crypto_flags,
            1,
            errp,
        );
        bindings::qapi_free_QCryptoBlockOpenOptions(open_options);
        block
    };
    if block.is_null() {
        return Err(-libc::EINVAL);
    }
    Ok(Some(Rc::new(QemuCrypto {
        block,
        keyed: !no_io,
    })))
}

/// Gives `image` the cipher of `crypto` when it has the key.
pub fn attach(image: &mut Image<FileAccess>, crypto: Option<&Rc<QemuCrypto>>) -> Result<(), Error> {
    match crypto {
        Some(crypto) if crypto.keyed() => image.set_cipher(crypto.clone()),
        _ => Ok(()),
    }
}

/// `QCryptoBlockCreateOptions`: made from creation options (owned, freed on drop), or those
/// of a `blockdev-create` command (borrowed: the job frees them).
pub struct CreateCrypto {
    options: *mut bindings::QCryptoBlockCreateOptions,
    owned: bool,
}

impl Drop for CreateCrypto {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: made by block_crypto_create_opts_init, freed once.
            unsafe { bindings::qapi_free_QCryptoBlockCreateOptions(self.options) };
        }
    }
}

impl CreateCrypto {
    /// The `encrypt` member of a `blockdev-create` command, borrowed.
    ///
    /// # Safety
    /// `options` is a live `QCryptoBlockCreateOptions` that outlives the returned value.
    pub unsafe fn borrowed(options: *mut bindings::QCryptoBlockCreateOptions) -> CreateCrypto {
        CreateCrypto {
            options,
            owned: false,
        }
    }

    /// The qcow2 method these options make, or `None` for a format qcow2 has no method for.
    pub fn method(&self) -> Option<CryptMethod> {
        // SAFETY: the options are live (constructors' contracts).
        match unsafe { (*self.options).format } {
            bindings::Q_CRYPTO_BLOCK_FORMAT_QCOW => Some(CryptMethod::Aes),
            bindings::Q_CRYPTO_BLOCK_FORMAT_LUKS => Some(CryptMethod::Luks),
            _ => None,
        }
    }
}

/// The crypto layer's creation options for `method` from the `encrypt.*` options in `opts`
/// (QEMU's parser and messages: an unknown or unexpected option is refused there). On
/// failure `*errp` says why.
///
/// # Safety
/// `opts` is a live `QemuOpts`; `errp` NULL or a valid `Error **` whose `*errp` is NULL.
pub unsafe fn create_options(
    opts: *mut QemuOpts,
    method: CryptMethod,
    errp: *mut *mut bindings::Error,
) -> Option<CreateCrypto> {
    // SAFETY: per the caller; qemu_opts_to_qdict makes a new dictionary (ours), and
    // qdict_extract_subqdict a new one of the `encrypt.` keys (ours too).
    unsafe {
        let all = OwnedQDict(bindings::qemu_opts_to_qdict(opts, ptr::null_mut()));
        let mut sub = ptr::null_mut();
        bindings::qdict_extract_subqdict(all.0, &mut sub, OPTION_PREFIX.as_ptr());
        let sub = OwnedQDict(sub);
        sub.put(c"format", crypto_format(method));
        let created = bindings::block_crypto_create_opts_init(sub.0, errp);
        (!created.is_null()).then_some(CreateCrypto {
            options: created,
            owned: true,
        })
    }
}

/// The LUKS header `qcrypto_block_create` makes, collected by its callbacks (their opaque).
#[derive(Default)]
struct LuksHeader {
    /// `None` until the init callback says how long it is.
    bytes: Option<Vec<u8>>,
}

entries! {
/// `QCryptoBlockInitFunc`: the LUKS header is `headerlen` bytes (zeros where it writes
/// nothing, unused key slots among them, as in QEMU's qcow2).
fn init_luks_header(
    _block: *mut QCryptoBlock,
    headerlen: usize,
    opaque: *mut c_void,
    _errp: *mut *mut bindings::Error,
) -> Result<c_int, Error> {
    // SAFETY: opaque is the LuksHeader `make_key` passed, alive and not otherwise borrowed
    // during qcrypto_block_create.
    let header = unsafe { &mut *opaque.cast::<LuksHeader>() };
    header.bytes = Some(vec![0u8; headerlen]);
    Ok(0)
}
}

entries! {
/// `QCryptoBlockWriteFunc`: bytes of the LUKS header, at `offset` in it.
fn write_luks_header(
    _block: *mut QCryptoBlock,
    offset: usize,
    buf: *const u8,
    buflen: usize,
    opaque: *mut c_void,
    errp: *mut *mut bindings::Error,
) -> Result<c_int, Error>, errp = errp {
    // SAFETY: as for the init callback; buf is valid for buflen bytes.
    let (header, bytes) = unsafe {
        (
            &mut *opaque.cast::<LuksHeader>(),
            std::slice::from_raw_parts(buf, buflen),
        )
    };
    let target = header
        .bytes
        .as_mut()
        .and_then(|h| h.get_mut(offset..offset.checked_add(buflen)?));
    match target {
        Some(target) => {
            target.copy_from_slice(bytes);
            Ok(0)
        }
        None => Err(Error::BadOption(
            "Request for data outside of extension header".into(),
        )),
    }
}
}

/// Makes the key of a new encrypted image with `qcrypto_block_create` (the secret, the
/// cipher and, for LUKS, the key slot and its header) before anything is written, so that a
/// missing secret or a cipher this build lacks leaves nothing behind. Returns the LUKS
/// header's bytes (`None` for AES, which stores nothing), or QEMU's crypto layer's message.
pub fn make_key(crypto: &CreateCrypto) -> Result<Option<Vec<u8>>, Error> {
    let mut header = LuksHeader::default();
    let mut err = ptr::null_mut();
    // SAFETY: the options are live (`CreateCrypto`'s constructors); the callbacks get
    // `header`, which outlives the synchronous call; err is a local Error * taken below.
    let block = unsafe {
        bindings::qcrypto_block_create(
            crypto.options,
            OPTION_PREFIX.as_ptr(),
            Some(init_luks_header),
            Some(write_luks_header),
            ptr::from_mut(&mut header).cast(),
            &mut err,
        )
    };
    if block.is_null() {
        // SAFETY: QEMU set err on failure.
        return Err(Error::BadOption(unsafe { take_error(err) }));
    }
    // The image needs the header only; the block goes.
    drop(QemuCrypto {
        block,
        keyed: false,
    });
    Ok(header.bytes)
}

/// Creates an encrypted image in `storage` (its guest data in `data`, when the options name
/// an external data file) as `options` say, with the LUKS header [`make_key`] made. Ordering: the engine counts and zero-fills the LUKS header's clusters
/// with the tables, the header's bytes are written into them, and only then is the qcow2
/// header that names them written (`NewImage::finish`: an ordering point before it).
pub fn create(
    storage: &BlkStorage,
    data: Option<&BlkStorage>,
    mut options: CreateOptions,
    luks_header: Option<&[u8]>,
) -> Result<(), Error> {
    if let Some(header) = luks_header {
        options.encryption = Some(CreateEncryption::Luks {
            header_bytes: header.len() as u64,
        });
    }
    let image = begin_create(storage, data, &options)?;
    if let Some(header) = luks_header {
        image.write_encryption_header(storage, 0, header)?;
    }
    image.finish(storage)
}

/// Bytes of LUKS header `crypto` makes (QEMU's trial creation, as for `qemu-img measure`).
///
/// # Safety
/// `errp` as for [`open`].
pub unsafe fn luks_header_bytes(
    crypto: &CreateCrypto,
    errp: *mut *mut bindings::Error,
) -> Option<u64> {
    let mut len = 0usize;
    // SAFETY: the options are live; len is a valid out-pointer; errp per the caller.
    let ok = unsafe {
        bindings::qcrypto_block_calculate_payload_offset(
            crypto.options,
            OPTION_PREFIX.as_ptr(),
            &mut len,
            errp,
        )
    };
    ok.then_some(len as u64)
}
