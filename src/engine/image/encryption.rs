//! Encrypted images (crypt_method 1, AES, and 2, LUKS): guest data clusters hold ciphertext
//! in 512-byte sectors; everything else (header, tables, zero and unallocated clusters,
//! compressed clusters) is plain, as in QEMU's qcow2.
//!
//! The engine does not encrypt: a [`DataCipher`] does (in qcow2b, QEMU's own crypto layer,
//! which the glue opens with the image's key; in tests, a toy). The engine decides what is
//! encrypted and with which IV offset:
//! - method 1 (AES): the guest offset of each sector, so a cluster's ciphertext stays valid
//!   wherever the cluster moves;
//! - method 2 (LUKS): the host offset of each sector, so a copy-on-write must decrypt the old
//!   cluster at its offset and encrypt the new one at its own (the data step does it for
//!   every fill, `dataio.rs`).
//!
//! Requests on an encrypted image are whole sectors (the glue sets the block layer's
//! request alignment to the cipher's sector; the engine refuses anything else), so every
//! fill and every piece of a plan starts and ends on a sector too.
//!
//! Ordering (`writeback.rs`, rule (a)): a new cluster of an encrypted image never reads as
//! zeros before its data is written (the hole decrypts to noise), so its data is always
//! ordered before the L2 entry naming it, and a fill of zeros over a hole is written like
//! any other (the zero reserve's two exceptions do not apply, `request.rs`).

use std::rc::Rc;

use crate::engine::error::{Error, Result};
use crate::engine::format::header::CryptMethod;
use crate::engine::image::Image;
use crate::engine::storage::Storage;

/// The sector size of both methods' ciphers (QEMU's `QCRYPTO_BLOCK_QCOW_SECTOR_SIZE` and
/// `QCRYPTO_BLOCK_LUKS_SECTOR_SIZE`): the unit of every encrypted request.
pub const ENCRYPTION_SECTOR_BYTES: u64 = 512;

/// Encrypts and decrypts guest data in place, in whole sectors of
/// [`ENCRYPTION_SECTOR_BYTES`].
///
/// `iv_offset` is the byte offset of the buffer's first sector that its IVs derive from;
/// the engine passes the guest or the host offset as the image's method says, always a
/// multiple of the sector size, with a buffer of whole sectors.
pub trait DataCipher {
    fn encrypt(&self, iv_offset: u64, buf: &mut [u8]) -> Result<()>;
    fn decrypt(&self, iv_offset: u64, buf: &mut [u8]) -> Result<()>;
}

/// The encryption of an open image: its method, and the cipher once the key is known.
#[derive(Clone)]
pub struct Encryption {
    pub method: CryptMethod,
    /// `None` until [`Image::set_cipher`]: an image opened without its key (QEMU's
    /// `BDRV_O_NO_IO`, `qemu-img info`) reads and writes metadata, never guest data.
    pub cipher: Option<Rc<dyn DataCipher>>,
}

impl std::fmt::Debug for Encryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encryption")
            .field("method", &self.method)
            .field("cipher", &self.cipher.is_some())
            .finish()
    }
}

/// Refuses a range that is not whole sectors (what the cipher takes).
pub(in crate::engine) fn check_sectors(what: &str, offset: u64, len: u64) -> Result<()> {
    if offset.is_multiple_of(ENCRYPTION_SECTOR_BYTES) && len.is_multiple_of(ENCRYPTION_SECTOR_BYTES)
    {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "{what} at {offset:#x} of {len} bytes is not whole {ENCRYPTION_SECTOR_BYTES}-byte \
         sectors, which an encrypted image needs"
    )))
}

impl Encryption {
    /// The offset the IVs of a sector at `host_offset` (guest `guest_offset`) derive from.
    pub fn iv_offset(&self, host_offset: u64, guest_offset: u64) -> u64 {
        match self.method {
            CryptMethod::Aes => guest_offset,
            CryptMethod::Luks => host_offset,
        }
    }

    fn cipher(&self) -> Result<&dyn DataCipher> {
        self.cipher.as_deref().ok_or_else(|| {
            Error::Unsupported(
                "guest data of an encrypted image opened without its key (encrypt.key-secret)"
                    .into(),
            )
        })
    }

    /// Refuses up front what the data step could not do: any guest data without the key.
    pub(in crate::engine) fn check_key(&self) -> Result<()> {
        self.cipher().map(|_| ())
    }

    /// Encrypts `buf`, which is to be written at `host_offset` for guest `guest_offset`.
    pub fn encrypt(&self, host_offset: u64, guest_offset: u64, buf: &mut [u8]) -> Result<()> {
        let iv_offset = self.iv_offset(host_offset, guest_offset);
        check_sectors("encrypted data", iv_offset, buf.len() as u64)?;
        self.cipher()?.encrypt(iv_offset, buf)
    }

    /// Decrypts `buf`, read at `host_offset` for guest `guest_offset`.
    pub fn decrypt(&self, host_offset: u64, guest_offset: u64, buf: &mut [u8]) -> Result<()> {
        let iv_offset = self.iv_offset(host_offset, guest_offset);
        check_sectors("encrypted data", iv_offset, buf.len() as u64)?;
        self.cipher()?.decrypt(iv_offset, buf)
    }
}

impl<S: Storage> Image<S> {
    /// How guest data is encrypted, if it is.
    pub fn encryption(&self) -> Option<&Encryption> {
        self.encryption.as_ref()
    }

    /// Gives an encrypted image the cipher of its key: guest data can be read and written
    /// from now on. Refused for an image without encryption.
    pub fn set_cipher(&mut self, cipher: Rc<dyn DataCipher>) -> Result<()> {
        match &mut self.encryption {
            Some(encryption) => {
                encryption.cipher = Some(cipher);
                Ok(())
            }
            None => Err(Error::BadOption(
                "a cipher for an image without encryption".into(),
            )),
        }
    }

    /// Refuses a guest request an encrypted image cannot serve: one that is not whole
    /// sectors. Nothing for an image without encryption.
    pub(in crate::engine) fn check_encrypted_request(
        &self,
        guest_offset: u64,
        len: u64,
    ) -> Result<()> {
        if self.encryption.is_some() {
            check_sectors("request", guest_offset, len)?;
        }
        Ok(())
    }
}
