//! Growing the virtual disk over entries that lie past its end. An image may hold L1 and L2
//! entries beyond its virtual size (another writer's leftovers after a shrink, or a crafted
//! image; the fuzzer found one): nothing reads them while they lie past the end, and growth
//! must not expose them. The new range reads as zeros; the clusters they named leak at worst.

#[path = "engine_support.rs"]
mod support;

use qcow2b::engine::{CheckFix, Image, MemStorage, OpenOptions, Storage};
use support::*;

const CLUSTER: u64 = 512;

/// A 512-byte-cluster image of 200 KiB whose L2 entries for 200..256 KiB name data (0x77):
/// L1 entry 7 (224..256 KiB) lies wholly past the end, L1 entry 6 straddles it.
fn image_with_entries_past_the_end() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, CLUSTER, 256 << 10, None);
    qemu_io(&path, &["write -P 0x11 0 4k", "write -P 0x77 200k 56k"]);
    let mut bytes = std::fs::read(&path).unwrap();
    put64(&mut bytes, 24, 200 << 10);
    bytes
}

fn grow_and_read(new_size: u64) {
    let mut image = Image::open(
        MemStorage::new(image_with_entries_past_the_end()),
        &OpenOptions::default(),
    )
    .unwrap();
    let report = image.check(CheckFix::None).unwrap();
    assert_eq!(report.corruptions, 0, "{:?}", report.messages);
    image.truncate(new_size).unwrap();
    let mut grown = vec![0xffu8; (new_size - (200 << 10)) as usize];
    image.read(200 << 10, &mut grown, None).unwrap();
    assert!(
        grown.iter().all(|&b| b == 0),
        "the new range shows old entries"
    );
    let mut head = vec![0u8; 4096];
    image.read(0, &mut head, None).unwrap();
    assert!(head.iter().all(|&b| b == 0x11));
    let bytes = image.close().unwrap().into_inner();

    // Reopened: the same, and clean (leaks aside) for qcow2b and QEMU alike.
    let mut image = Image::open(MemStorage::new(bytes.clone()), &OpenOptions::default()).unwrap();
    assert_eq!(image.virtual_size(), new_size);
    let mut again = vec![0xffu8; grown.len()];
    image.read(200 << 10, &mut again, None).unwrap();
    assert!(again.iter().all(|&b| b == 0));
    let report = image.check(CheckFix::None).unwrap();
    assert_eq!(report.corruptions, 0, "{:?}", report.messages);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grown.qcow2");
    std::fs::write(&path, bytes).unwrap();
    let (code, _) = qemu_img_check_json(&path);
    assert!(code == 0 || code == 3, "qemu-img check exited {code}");
    let raw = qemu_img_to_raw(&path, &dir.path().join("grown.raw"));
    assert!(
        raw[200 << 10..].iter().all(|&b| b == 0),
        "QEMU reads old entries"
    );
}

#[test]
fn growth_within_the_l1_table_reads_zeros() {
    grow_and_read(256 << 10);
}

#[test]
fn growth_past_the_l1_table_reads_zeros() {
    grow_and_read(512 << 10);
}

/// A backing file of 128 KiB of 0x01 under a 31 KiB image with 64 KiB clusters (iotest 125's
/// case), as bytes of both.
fn image_over_a_longer_backing_file() -> (tempfile::TempDir, Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img_create(&base, 65536, 128 << 10, None);
    qemu_io(&base, &["write -P 1 0 128k"]);
    qemu_img_create_with(&top, "", "31k", Some(&base));
    let base_bytes = std::fs::read(&base).unwrap();
    let top_bytes = std::fs::read(&top).unwrap();
    (dir, base_bytes, top_bytes)
}

#[test]
fn growth_asked_to_zero_hides_a_longer_backing_file_and_keeps_what_it_showed() {
    use qcow2b::engine::{Growth, Preallocation};
    use std::cell::RefCell;
    for preallocation in [
        Preallocation::Off,
        Preallocation::Metadata,
        Preallocation::Falloc,
        Preallocation::Full,
    ] {
        for zero in [true, false] {
            let (_dir, base, top) = image_over_a_longer_backing_file();
            let backing = ImageBacking(RefCell::new(
                Image::open(MemStorage::new(base), &OpenOptions::default()).unwrap(),
            ));
            let mut image = Image::open(MemStorage::new(top), &OpenOptions::default()).unwrap();
            image
                .grow(
                    96 << 10,
                    Growth {
                        preallocation,
                        zero,
                    },
                    Some(&backing),
                )
                .unwrap();
            let mut buf = vec![0xffu8; 96 << 10];
            image.read(0, &mut buf, Some(&backing)).unwrap();
            let what = format!("{preallocation:?}, zero {zero}");
            assert!(
                buf[..31 << 10].iter().all(|&b| b == 1),
                "{what}: the old part"
            );
            // Without the zeroing asked, the backing file shows through where the image
            // leaves the new area unallocated (the block layer asks whenever it is longer).
            let expect_new = if zero || preallocation != Preallocation::Off {
                0
            } else {
                1
            };
            assert!(
                buf[31 << 10..].iter().all(|&b| b == expect_new),
                "{what}: the new area"
            );
            // Preallocated: writing the new area allocates nothing more.
            if preallocation != Preallocation::Off {
                let before = image.storage().len().unwrap();
                image.write(64 << 10, &[7u8; 32 << 10], None).unwrap();
                assert_eq!(image.storage().len().unwrap(), before, "{what}");
            }
            let bytes = image.close().unwrap().into_inner();
            let reopened = Image::open(MemStorage::new(bytes), &OpenOptions::default()).unwrap();
            assert_eq!(reopened.virtual_size(), 96 << 10, "{what}");
        }
    }
}

#[test]
fn a_failed_growth_leaves_the_old_size_on_disk_and_in_memory() {
    use qcow2b::engine::{Growth, Preallocation};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, 65536, 1 << 20, None);
    let bytes = std::fs::read(&path).unwrap();
    // A storage that refuses to grow past 1 MiB of file: the preallocation fails.
    let mut image = Image::open(
        LimitedStorage::new(MemStorage::new(bytes), 1 << 20),
        &OpenOptions::default(),
    )
    .unwrap();
    let result = image.grow(
        64 << 20,
        Growth {
            preallocation: Preallocation::Full,
            zero: false,
        },
        None,
    );
    assert!(result.is_err());
    assert_eq!(image.virtual_size(), 1 << 20);
    let bytes = image.storage().inner.snapshot();
    assert_eq!(
        u64::from_be_bytes(bytes[24..32].try_into().unwrap()),
        1 << 20
    );
}

/// MemStorage on which writes (and growth) past `limit` bytes fail with ENOSPC.
struct LimitedStorage {
    inner: MemStorage,
    limit: u64,
}

impl LimitedStorage {
    fn new(inner: MemStorage, limit: u64) -> LimitedStorage {
        LimitedStorage { inner, limit }
    }

    fn refuse(&self, end: u64) -> std::io::Result<()> {
        if end > self.limit {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }
}

impl qcow2b::engine::Storage for LimitedStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        self.refuse(offset + buf.len() as u64)?;
        self.inner.write_at(offset, buf)
    }

    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }

    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.refuse(len)?;
        self.inner.set_len(len)
    }
}

/// iotest 298: a preallocating growth right after appending writes puts the new area where
/// the data ends, as QEMU's qcow2 does, and not past the unused zero reserve (a gap that a
/// preallocating file layer below keeps allocated).
#[test]
fn preallocated_growth_starts_where_the_data_ends_not_past_the_zero_reserve() {
    use qcow2b::engine::{Growth, Mapping, Preallocation};
    const MIB: u64 = 1 << 20;
    for preallocation in [
        Preallocation::Metadata,
        Preallocation::Falloc,
        Preallocation::Full,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.qcow2");
        qemu_img_create(&path, 64 << 10, 10 * MIB, None);
        let storage = MemStorage::new(std::fs::read(&path).unwrap());
        let mut image = Image::open(storage, &OpenOptions::default()).unwrap();
        image
            .write(0, &vec![0x5a; 10 * MIB as usize], None)
            .unwrap();
        let host_of = |image: &mut Image<MemStorage>, guest: u64| match image.map(guest, 1) {
            Ok((Mapping::Data { host_offset }, _)) => host_offset,
            Ok((
                Mapping::Zero {
                    host_offset: Some(host_offset),
                },
                _,
            )) => host_offset,
            other => panic!("guest offset {guest}: {other:?}"),
        };
        let data_end = host_of(&mut image, 10 * MIB - 1) + 1;
        let growth = Growth {
            preallocation,
            zero: false,
        };
        image.grow(50 * MIB, growth, None).unwrap();
        let what = format!("{preallocation:?}");
        assert_eq!(host_of(&mut image, 10 * MIB), data_end, "{what}");
        assert_eq!(
            host_of(&mut image, 50 * MIB - 1) + 1,
            data_end + 40 * MIB,
            "{what}"
        );
        let report = image.check(CheckFix::None).unwrap();
        assert_eq!(report.corruptions, 0, "{what}: {:?}", report.messages);
        let bytes = image.close().unwrap().into_inner();
        assert_eq!(
            bytes.len() as u64,
            data_end + 40 * MIB,
            "{what}: the file ends there"
        );
        std::fs::write(&path, bytes).unwrap();
        qemu_img_check(&path);
    }
}
