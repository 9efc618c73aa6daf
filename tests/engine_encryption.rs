//! Encrypted images in the engine (`src/engine/image/encryption.rs`): what reaches the file
//! is ciphertext, with the IV offset the method says (guest for AES, host for LUKS);
//! copy-on-write decrypts at the old cluster and encrypts at the new one; zero and
//! unallocated clusters read as zeros without the cipher; requests are whole sectors; a new
//! cluster's data is ordered before the entry naming it; the LUKS header's clusters are
//! counted, protected and named by the header only once written.
//!
//! The cipher here is [`ToyCipher`], a TEST DOUBLE that stands in for QEMU's crypto layer
//! (which the glue uses): it makes every byte depend on the IV offset, so that a wrong
//! offset or a missing decryption shows, and protects nothing.

#[path = "engine_support.rs"]
mod support;

use std::cell::Cell;
use std::rc::Rc;

use qcow2b::engine::format::header::{ext, CryptMethod, Header};
use qcow2b::engine::{
    begin_create, create, measure, Backing, CreateEncryption, CreateOptions, DataCipher, Error,
    Image, Mapping, MemStorage, OpenOptions, Storage, TxgOptions, ENCRYPTION_SECTOR_BYTES,
};
use support::*;

const CLUSTER: u64 = 65536;
const SECTOR: u64 = ENCRYPTION_SECTOR_BYTES;

/// TEST DOUBLE, NOT A CIPHER: XORs each byte with a keystream of the key, the sector number
/// (`iv_offset / 512` plus the sector's index in the buffer) and the byte's place in the
/// sector. It stands in for QEMU's crypto layer so that the tests can check what the engine
/// encrypts and with which IV offset; it protects nothing. Like QEMU's, it takes whole
/// sectors only.
struct ToyCipher {
    key: u64,
    /// Sectors decrypted so far.
    decrypted_sectors: Cell<u64>,
}

impl ToyCipher {
    fn new(key: u64) -> Rc<ToyCipher> {
        Rc::new(ToyCipher {
            key,
            decrypted_sectors: Cell::new(0),
        })
    }

    fn apply(&self, iv_offset: u64, buf: &mut [u8]) -> qcow2b::engine::Result<()> {
        if !iv_offset.is_multiple_of(SECTOR) || !(buf.len() as u64).is_multiple_of(SECTOR) {
            return Err(Error::Invalid(format!(
                "toy cipher: {} bytes at {iv_offset} are not whole sectors",
                buf.len()
            )));
        }
        for (i, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
            let number = iv_offset / SECTOR + i as u64;
            let mut state = self.key ^ number.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            for byte in sector.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *byte ^= state as u8;
            }
        }
        Ok(())
    }
}

impl DataCipher for ToyCipher {
    fn encrypt(&self, iv_offset: u64, buf: &mut [u8]) -> qcow2b::engine::Result<()> {
        self.apply(iv_offset, buf)
    }

    fn decrypt(&self, iv_offset: u64, buf: &mut [u8]) -> qcow2b::engine::Result<()> {
        self.decrypted_sectors
            .set(self.decrypted_sectors.get() + buf.len() as u64 / SECTOR);
        self.apply(iv_offset, buf)
    }
}

fn create_options(size: u64, encryption: Option<CreateEncryption>) -> CreateOptions {
    let mut o = CreateOptions::new(size);
    o.encryption = encryption;
    o
}

const LUKS: Option<CreateEncryption> = Some(CreateEncryption::Luks {
    header_bytes: 3 * CLUSTER + 100,
});
const AES: Option<CreateEncryption> = Some(CreateEncryption::Aes);

/// A new image in memory, open read-write.
fn new_image(encryption: Option<CreateEncryption>, opts: &OpenOptions) -> Image<MemStorage> {
    let storage = MemStorage::default();
    create(&storage, &create_options(64 << 20, encryption)).unwrap();
    Image::open(storage, opts).unwrap()
}

/// A new encrypted image with `cipher`.
fn keyed_image(encryption: Option<CreateEncryption>, cipher: &Rc<ToyCipher>) -> Image<MemStorage> {
    let mut image = new_image(encryption, &OpenOptions::default());
    image.set_cipher(cipher.clone()).unwrap();
    image
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    XorShift::new(seed).fill(&mut bytes);
    bytes
}

fn read(image: &mut Image<MemStorage>, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    image.read(offset, &mut buf, None).unwrap();
    buf
}

fn host_offset(image: &mut Image<MemStorage>, guest_offset: u64) -> u64 {
    match image.map(guest_offset, SECTOR).unwrap().0 {
        Mapping::Data { host_offset } => host_offset,
        other => panic!("guest {guest_offset:#x} is {other:?}"),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The file holds ciphertext only: the plaintext appears nowhere in it. The control
/// (an image without encryption, the same writes) finds it, so the search can fail.
#[test]
fn guest_data_never_reaches_the_file_unencrypted() {
    let data = pattern(3 * CLUSTER as usize + 4096, 1);
    for encryption in [LUKS, AES] {
        let cipher = ToyCipher::new(7);
        let mut image = keyed_image(encryption, &cipher);
        image.write(CLUSTER - 4096, &data, None).unwrap();
        image.write(10 * CLUSTER, &data[..4096], None).unwrap();
        image.flush().unwrap();
        assert_eq!(read(&mut image, CLUSTER - 4096, data.len()), data);
        let file = image.close().unwrap().into_inner();
        for needle in [
            &data[..512],
            &data[CLUSTER as usize..CLUSTER as usize + 512],
        ] {
            assert!(
                !contains(&file, needle),
                "{encryption:?}: plaintext in the file"
            );
        }
    }
    let mut plain = new_image(None, &OpenOptions::default());
    plain.write(CLUSTER - 4096, &data, None).unwrap();
    let file = plain.close().unwrap().into_inner();
    assert!(
        contains(&file, &data[..512]),
        "control: the search finds plaintext"
    );
}

/// Method 1 derives IVs from the guest offset, method 2 from the host offset: the bytes at
/// a cluster's host offset decrypt with that offset only.
#[test]
fn ivs_come_from_the_guest_offset_for_aes_and_the_host_offset_for_luks() {
    let data = pattern(8192, 2);
    let guest = 20 * CLUSTER + 8192;
    for (encryption, method) in [(AES, CryptMethod::Aes), (LUKS, CryptMethod::Luks)] {
        let cipher = ToyCipher::new(11);
        let mut image = keyed_image(encryption, &cipher);
        assert_eq!(image.encryption().unwrap().method, method);
        image.write(guest, &data, None).unwrap();
        let host = host_offset(&mut image, guest);
        assert_ne!(host, guest, "the test needs the two offsets to differ");
        let mut raw = vec![0u8; data.len()];
        image.storage().read_at(host, &mut raw).unwrap();
        let (right, wrong) = match method {
            CryptMethod::Aes => (guest, host),
            CryptMethod::Luks => (host, guest),
        };
        let mut plain = raw.clone();
        cipher.apply(right, &mut plain).unwrap();
        assert_eq!(plain, data, "{method:?}: decrypts at {right:#x}");
        let mut other = raw;
        cipher.apply(wrong, &mut other).unwrap();
        assert_ne!(other, data, "{method:?}: not at {wrong:#x}");
    }
}

/// A backing file of plain bytes, as the block layer hands a backing node's data up.
struct PlainBacking(Vec<u8>);

impl Backing for PlainBacking {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let start = (offset as usize).min(self.0.len());
        let end = (start + buf.len()).min(self.0.len());
        buf[..end - start].copy_from_slice(&self.0[start..end]);
        buf[end - start..].fill(0);
        Ok(())
    }
}

/// Copy-on-write over a backing file: the backing file's plain bytes around the request are
/// encrypted with the request into the new cluster.
#[test]
fn copy_on_write_from_a_backing_file_encrypts_the_fills() {
    let base = pattern(4 * CLUSTER as usize, 3);
    let backing = PlainBacking(base.clone());
    let storage = MemStorage::default();
    let mut o = create_options(4 * CLUSTER, LUKS);
    o.backing_file = Some(b"base.raw".to_vec());
    create(&storage, &o).unwrap();
    let mut image = Image::open(storage, &OpenOptions::default()).unwrap();
    let cipher = ToyCipher::new(3);
    image.set_cipher(cipher.clone()).unwrap();
    let new = pattern(1024, 4);
    image.write(CLUSTER + 2048, &new, Some(&backing)).unwrap();
    let mut expected = base[CLUSTER as usize..2 * CLUSTER as usize].to_vec();
    expected[2048..3072].copy_from_slice(&new);
    let mut got = vec![0u8; CLUSTER as usize];
    image.read(CLUSTER, &mut got, Some(&backing)).unwrap();
    assert_eq!(got, expected);
    let host = host_offset(&mut image, CLUSTER);
    let mut raw = vec![0u8; CLUSTER as usize];
    image.storage().read_at(host, &mut raw).unwrap();
    cipher.apply(host, &mut raw).unwrap();
    assert_eq!(
        raw, expected,
        "the whole cluster is ciphertext at its host offset"
    );
}

/// In a transaction group a write to an allocated cluster goes to a new host cluster: the
/// part it does not cover is decrypted at the old cluster's host offset and encrypted at the
/// new one's (LUKS), so both reads and the raw bytes agree afterwards.
#[test]
fn copy_on_write_to_another_host_cluster_decrypts_and_encrypts_again() {
    let opts = OpenOptions {
        txg: Some(TxgOptions::default()),
        ..OpenOptions::default()
    };
    for encryption in [LUKS, AES] {
        let cipher = ToyCipher::new(5);
        let mut image = new_image(encryption, &opts);
        image.set_cipher(cipher.clone()).unwrap();
        let old = pattern(CLUSTER as usize, 5);
        image.write(2 * CLUSTER, &old, None).unwrap();
        image.flush().unwrap();
        let old_host = host_offset(&mut image, 2 * CLUSTER);
        // A write, then a barrier: the group that opens copies what it changes.
        image.write(0, &[1u8; 512], None).unwrap();
        image.barrier().unwrap();
        let new = pattern(4096, 6);
        image.write(2 * CLUSTER + 8192, &new, None).unwrap();
        let new_host = host_offset(&mut image, 2 * CLUSTER);
        assert_ne!(new_host, old_host, "the group wrote a copy");
        let mut expected = old.clone();
        expected[8192..8192 + 4096].copy_from_slice(&new);
        assert_eq!(read(&mut image, 2 * CLUSTER, CLUSTER as usize), expected);
        image.flush().unwrap();
        let storage = image.close().unwrap();
        let mut reopened = Image::open(storage, &OpenOptions::default()).unwrap();
        reopened.set_cipher(cipher.clone()).unwrap();
        assert_eq!(
            read(&mut reopened, 2 * CLUSTER, CLUSTER as usize),
            expected,
            "{encryption:?}"
        );
    }
}

/// A write into part of a fresh cluster: the zeros around it are written as ciphertext too
/// (a hole decrypts to noise), so the cluster reads back as zeros and the write.
#[test]
fn fills_of_zeros_in_a_fresh_cluster_are_written_encrypted() {
    let cipher = ToyCipher::new(9);
    let mut image = keyed_image(LUKS, &cipher);
    let data = pattern(1024, 9);
    image.write(7 * CLUSTER + 4096, &data, None).unwrap();
    let mut expected = vec![0u8; CLUSTER as usize];
    expected[4096..5120].copy_from_slice(&data);
    assert_eq!(read(&mut image, 7 * CLUSTER, CLUSTER as usize), expected);
    image.flush().unwrap();
    let storage = image.close().unwrap();
    let mut reopened = Image::open(storage, &OpenOptions::default()).unwrap();
    reopened.set_cipher(cipher).unwrap();
    assert_eq!(read(&mut reopened, 7 * CLUSTER, CLUSTER as usize), expected);
}

/// Zero clusters and unallocated clusters read as zeros without the cipher.
#[test]
fn zero_and_unallocated_clusters_read_as_zeros_without_decryption() {
    let cipher = ToyCipher::new(13);
    let mut image = keyed_image(LUKS, &cipher);
    image
        .write(0, &pattern(2 * CLUSTER as usize, 13), None)
        .unwrap();
    image.write_zeroes(0, CLUSTER, false, None).unwrap();
    let before = cipher.decrypted_sectors.get();
    assert_eq!(
        read(&mut image, 0, CLUSTER as usize),
        vec![0u8; CLUSTER as usize]
    );
    assert_eq!(
        read(&mut image, 9 * CLUSTER, CLUSTER as usize),
        vec![0u8; CLUSTER as usize]
    );
    assert_eq!(cipher.decrypted_sectors.get(), before, "no decryption");
    // The control: a data cluster is decrypted.
    read(&mut image, CLUSTER, 4096);
    assert_eq!(cipher.decrypted_sectors.get(), before + 8);
}

/// Requests on an encrypted image are whole sectors; an image without encryption takes any.
#[test]
fn requests_on_an_encrypted_image_are_whole_sectors() {
    let cipher = ToyCipher::new(1);
    let mut image = keyed_image(AES, &cipher);
    for (offset, len) in [(100u64, 512usize), (512, 100), (1, 1)] {
        let err = image.write(offset, &vec![1u8; len], None).unwrap_err();
        assert!(
            matches!(&err, Error::Invalid(m) if m.contains("sectors")),
            "write at {offset} of {len}: {err}"
        );
        let mut buf = vec![0u8; len];
        assert!(matches!(
            image.read(offset, &mut buf, None),
            Err(Error::Invalid(_))
        ));
    }
    let mut plain = new_image(None, &OpenOptions::default());
    plain.write(100, &[1u8; 100], None).unwrap();
    let mut buf = [0u8; 3];
    plain.read(99, &mut buf, None).unwrap();
    assert_eq!(buf, [0, 1, 1]);
}

/// Without its key an encrypted image serves metadata only: guest data is refused, before
/// anything is allocated for a write.
#[test]
fn guest_data_needs_the_key() {
    let cipher = ToyCipher::new(4);
    let mut image = keyed_image(LUKS, &cipher);
    image.write(0, &[7u8; 4096], None).unwrap();
    let storage = image.close().unwrap();
    let mut image = Image::open(storage, &OpenOptions::default()).unwrap();
    let end = image.storage().len().unwrap();
    let err = image.write(CLUSTER, &[1u8; 512], None).unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported(m) if m.contains("key")),
        "{err}"
    );
    let mut buf = [0u8; 512];
    assert!(matches!(
        image.read(0, &mut buf, None),
        Err(Error::Unsupported(_))
    ));
    // An unallocated cluster needs no key.
    image.read(3 * CLUSTER, &mut buf, None).unwrap();
    assert_eq!(image.map(CLUSTER, 512).unwrap().0, Mapping::Unallocated);
    image.flush().unwrap();
    assert_eq!(image.storage().len().unwrap(), end, "nothing was allocated");
    let mut plain = new_image(None, &OpenOptions::default());
    assert!(matches!(plain.set_cipher(cipher), Err(Error::BadOption(_))));
}

/// A new cluster of an encrypted image never reads as the zeros it replaces until its data
/// is written, so appends cost an ordering point before their L2 entries (rule (a) of
/// `writeback.rs`). The control: the same appends without encryption cost none.
#[test]
fn appends_to_an_encrypted_image_order_their_data_before_the_entries() {
    let data = vec![0x5au8; CLUSTER as usize];
    let barriers = |encryption| {
        let cipher = ToyCipher::new(2);
        let mut image = match encryption {
            None => new_image(None, &OpenOptions::default()),
            Some(_) => keyed_image(encryption, &cipher),
        };
        let (flushes, barriers) = (
            image.storage().flushes.get(),
            image.storage().barriers.get(),
        );
        for i in 0..20u64 {
            image.write(i * CLUSTER, &data, None).unwrap();
            image.flush().unwrap();
        }
        assert_eq!(image.storage().flushes.get() - flushes, 20);
        image.storage().barriers.get() - barriers
    };
    let plain = barriers(None);
    let encrypted = barriers(LUKS);
    assert!(plain <= 3, "{plain} barriers without encryption");
    assert!(encrypted >= 20, "{encrypted} barriers with encryption");
}

/// The LUKS header's clusters: counted when created (check is clean), zeros until the
/// caller writes the header, written only inside them, named by the header, and never
/// given to data. The control: a header cluster with refcount 0 is a corruption to check.
#[test]
fn the_luks_header_is_counted_protected_and_named_once_written() {
    let header_bytes = 3 * CLUSTER + 100;
    let storage = MemStorage::default();
    let opts = create_options(64 << 20, LUKS);
    let new = begin_create(&storage, None, &opts).unwrap();
    let extent = new.encryption_header().unwrap();
    assert_eq!(extent.length_bytes, header_bytes);
    assert_eq!(extent.offset % CLUSTER, 0);
    // Not an image yet: no header.
    assert!(Image::open(MemStorage::new(storage.snapshot()), &OpenOptions::default()).is_err());
    let luks = pattern(header_bytes as usize, 21);
    assert!(new
        .write_encryption_header(&storage, 1, &luks)
        .is_err_and(|e| e.to_string().contains("LUKS header")));
    new.write_encryption_header(&storage, 0, &luks).unwrap();
    let flushes_before = storage.flushes.get();
    new.finish(&storage).unwrap();
    assert_eq!(
        storage.flushes.get(),
        flushes_before + 2,
        "ordering point, then durability"
    );

    let bytes = storage.snapshot();
    let header = Header::parse(&bytes[..CLUSTER as usize]).unwrap();
    assert_eq!(header.crypt_method(), Some(CryptMethod::Luks));
    assert_eq!(header.encryption_header, Some(extent));
    let at = extent.offset as usize;
    assert_eq!(&bytes[at..at + luks.len()], &luks[..]);
    let cluster_end = at + 4 * CLUSTER as usize;
    assert!(bytes[at + luks.len()..cluster_end].iter().all(|&b| b == 0));

    let mut image = Image::open(MemStorage::new(bytes.clone()), &OpenOptions::default()).unwrap();
    let report = image.check(qcow2b::engine::CheckFix::None).unwrap();
    assert_eq!(
        (report.corruptions, report.leaks),
        (0, 0),
        "{:?}",
        report.messages
    );
    // Data goes elsewhere.
    let cipher = ToyCipher::new(8);
    image.set_cipher(cipher).unwrap();
    image
        .write(0, &pattern(8 * CLUSTER as usize, 22), None)
        .unwrap();
    for g in 0..8 {
        let host = host_offset(&mut image, g * CLUSTER);
        assert!(host + CLUSTER <= extent.offset || host >= cluster_end as u64);
    }
    let file = image.close().unwrap().into_inner();
    assert_eq!(
        &file[at..at + luks.len()],
        &luks[..],
        "the LUKS header is intact"
    );

    // The control: its last cluster not counted.
    let mut damaged = bytes;
    let refblock = u64::from_be_bytes(
        damaged[CLUSTER as usize..CLUSTER as usize + 8]
            .try_into()
            .unwrap(),
    );
    let last = (extent.offset / CLUSTER + 3) as usize;
    let entry = refblock as usize + 2 * last;
    assert_eq!(&damaged[entry..entry + 2], &[0, 1]);
    damaged[entry + 1] = 0;
    let mut image = Image::open(MemStorage::new(damaged), &OpenOptions::default()).unwrap();
    let report = image.check(qcow2b::engine::CheckFix::None).unwrap();
    assert_eq!(report.corruptions, 1, "{:?}", report.messages);
}

/// An AES image: the method in the header, no extension, no extra clusters.
#[test]
fn an_aes_image_holds_only_its_method() {
    let storage = MemStorage::default();
    create(&storage, &create_options(1 << 20, AES)).unwrap();
    let plain = MemStorage::default();
    create(&plain, &create_options(1 << 20, None)).unwrap();
    let (bytes, plain) = (storage.into_inner(), plain.into_inner());
    assert_eq!(bytes.len(), plain.len());
    let header = Header::parse(&bytes[..CLUSTER as usize]).unwrap();
    assert_eq!(header.crypt_method(), Some(CryptMethod::Aes));
    assert_eq!(header.encryption_header, None);
    assert!(!header
        .extensions
        .iter()
        .any(|e| e.kind == ext::FULL_DISK_ENCRYPTION));
}

/// measure counts the LUKS header's clusters in both sizes, as QEMU does.
#[test]
fn measure_adds_the_luks_header_clusters() {
    let plain = measure(&create_options(1 << 30, None), None).unwrap();
    let luks = measure(&create_options(1 << 30, LUKS), None).unwrap();
    assert_eq!(luks.required, plain.required + 4 * CLUSTER);
    assert_eq!(luks.fully_allocated, plain.fully_allocated + 4 * CLUSTER);
    assert_eq!(measure(&create_options(1 << 30, AES), None).unwrap(), plain);
}

/// The extension's checks, with QEMU's messages: only with LUKS, 16 bytes, cluster-aligned;
/// its clusters inside the file and clear of the tables; an unknown method is refused.
#[test]
fn bad_encryption_headers_are_refused() {
    let storage = MemStorage::default();
    create(&storage, &create_options(1 << 20, LUKS)).unwrap();
    let good = storage.into_inner();
    let header = Header::parse(&good[..CLUSTER as usize]).unwrap();
    let extent = header.encryption_header.unwrap();
    let ext_at = 112
        + good[112..CLUSTER as usize]
            .windows(4)
            .position(|w| w == ext::FULL_DISK_ENCRYPTION.to_be_bytes())
            .unwrap();
    let open = |bytes: Vec<u8>| Image::open(MemStorage::new(bytes), &OpenOptions::default());
    open(good.clone()).unwrap();

    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(Damage, &str)> = vec![
        (
            Box::new(|b| put32(b, field::CRYPT_METHOD, 1)),
            "only expected with LUKS",
        ),
        (
            Box::new(|b| put32(b, field::CRYPT_METHOD, 3)),
            "encryption method 3",
        ),
        (Box::new(move |b| put32(b, ext_at + 4, 8)), "size 8"),
        (
            Box::new(move |b| put64(b, ext_at + 8, extent.offset + 512)),
            "not a multiple of cluster size",
        ),
        (
            Box::new(move |b| put64(b, ext_at + 16, 1 << 40)),
            "beyond the end of the file",
        ),
        (
            Box::new(move |b| put64(b, ext_at + 8, 3 * CLUSTER)),
            "overlaps",
        ),
    ];
    for (damage, message) in cases {
        let mut bytes = good.clone();
        damage(&mut bytes);
        match open(bytes) {
            Err(e) => assert!(e.to_string().contains(message), "{e} lacks {message:?}"),
            Ok(_) => panic!("accepted, expected {message:?}"),
        }
    }
    // Method 2 without the extension opens (QEMU opens it without I/O); the glue refuses
    // it when guest data is wanted.
    let mut bytes = good;
    put32(&mut bytes, ext_at, 0x1234_5678);
    let image = open(bytes).unwrap();
    assert_eq!(image.encryption().unwrap().method, CryptMethod::Luks);
    assert_eq!(image.header().encryption_header, None);
}
