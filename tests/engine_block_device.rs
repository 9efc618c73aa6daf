//! An image on a block device (an LVM volume, a loop device): the storage has a fixed length,
//! a write past its end fails with ENOSPC, and its free clusters hold old bytes. qcow2b once
//! failed every allocating write and every flush there: its zero reserve extends the file
//! past its end (and relies on the clusters it adds reading as zeros). Now storage that is not
//! growable gets no reserve: clusters come from free space inside, with the ordering points
//! that clusters of old bytes need.

#[path = "engine_support.rs"]
mod support;

use std::io;

use qcow2b::engine::{Image, MemStorage, OpenOptions, Storage};
use support::*;

const DEVICE_BYTES: u64 = 64 << 20;

/// A block device: fixed length, old bytes where nothing was written.
struct Device(MemStorage);

impl Storage for Device {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if offset + buf.len() as u64 > DEVICE_BYTES {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.0.write_at(offset, buf)
    }

    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }

    fn barrier(&self) -> io::Result<()> {
        self.0.barrier()
    }

    fn is_growable(&self) -> bool {
        false
    }

    fn len(&self) -> io::Result<u64> {
        Ok(DEVICE_BYTES)
    }

    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    }
}

#[test]
fn writes_flushes_and_l1_growth_work_on_a_block_device_full_of_old_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, 65536, 8 << 30, None);
    let mut bytes = std::fs::read(&path).unwrap();
    // What the device held before: anything but zeros.
    bytes.resize(DEVICE_BYTES as usize, 0xaa);
    let mut image = Image::open(Device(MemStorage::new(bytes)), &OpenOptions::default()).unwrap();

    image.write(0, &vec![0x11; 1 << 20], None).unwrap();
    image.flush().unwrap();
    for region in 1..8u64 {
        image
            .write(region << 30, &[0x20 + region as u8; 4096], None)
            .unwrap();
    }
    image.flush().unwrap();
    // A larger L1 table: contiguous clusters from the free space inside.
    image.truncate(1 << 40).unwrap();
    image.write(900 << 30, &[0x33; 65536], None).unwrap();
    image.flush().unwrap();

    let bytes = image.close().unwrap().0.into_inner();
    assert_eq!(bytes.len() as u64, DEVICE_BYTES, "the device did not grow");
    std::fs::write(&path, bytes).unwrap();
    qemu_img_check(&path);
    let mut reads = vec![
        "read -P 0x11 0 1M".to_string(),
        "read -P 0x33 900G 64k".to_string(),
    ];
    for region in 1..8u64 {
        reads.push(format!("read -P {} {region}G 4k", 0x20 + region));
        // The rest of the new L2 table's range reads as zeros, not as the old bytes.
        reads.push(format!("read -P 0 {} 60k", (region << 30) + 4096));
    }
    let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
    qemu_io(&path, &reads);
}
