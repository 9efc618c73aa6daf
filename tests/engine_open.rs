//! Opening and validating images: each malformed or unsupported header gives the right error
//! variant with a message naming the field or feature, and never a panic.

#[path = "engine_support.rs"]
mod support;

use qcow2b::engine::format::header::Header;
use qcow2b::engine::{DiscardPolicy, Error, Image, Mapping, MemStorage, OpenOptions};
use support::*;

const RW: OpenOptions = OpenOptions {
    read_only: false,
    l2_cache_bytes: None,
    refcount_cache_bytes: None,
    cache_bytes: None,
    for_check: false,
    txg: None,
    test_skip_stage3_ordering: false,
    test_skip_txg_first_sync: false,
    test_txg_overwrite_after_barrier: false,
    test_discard_early: false,
    test_skip_snapshot_ordering: false,
    test_skip_bitmap_ordering: false,
    test_skip_amend_ordering: false,
    discard: DiscardPolicy::DEFAULT,
};
const RO: OpenOptions = OpenOptions {
    read_only: true,
    l2_cache_bytes: None,
    refcount_cache_bytes: None,
    cache_bytes: None,
    for_check: false,
    txg: None,
    test_skip_stage3_ordering: false,
    test_skip_txg_first_sync: false,
    test_txg_overwrite_after_barrier: false,
    test_discard_early: false,
    test_skip_snapshot_ordering: false,
    test_skip_bitmap_ordering: false,
    test_skip_amend_ordering: false,
    discard: DiscardPolicy::DEFAULT,
};

fn open(bytes: Vec<u8>, opts: &OpenOptions) -> Result<Image<MemStorage>, Error> {
    Image::open(MemStorage::new(bytes), opts)
}

fn valid() -> Vec<u8> {
    build_image(16, 1 << 30, 3)
}

/// Asserts the error variant and that the message mentions `needle`.
#[track_caller]
fn assert_err(result: Result<Image<MemStorage>, Error>, variant: &str, needle: &str) {
    let err = match result {
        Ok(_) => panic!("expected a {variant} error mentioning {needle:?}, the image opened"),
        Err(e) => e,
    };
    let got = match &err {
        Error::Invalid(_) => "Invalid",
        Error::Unsupported(_) => "Unsupported",
        Error::Corrupt(_) => "Corrupt",
        Error::Io { .. } => "Io",
        Error::ReadOnly => "ReadOnly",
        Error::OutOfRange { .. } => "OutOfRange",
        Error::BadOption(_) => "BadOption",
        Error::Refused { .. } => "Refused",
    };
    assert_eq!(got, variant, "{err}");
    assert!(
        err.to_string().contains(needle),
        "message {:?} lacks {needle:?}",
        err.to_string()
    );
}

#[test]
fn valid_images_open_v3_and_v2_at_every_cluster_size() {
    for bits in 9..=21 {
        for version in [2, 3] {
            let image = open(build_image(bits, 100 << 20, version), &RW).unwrap();
            assert_eq!(image.cluster_size(), 1 << bits);
            assert_eq!(image.virtual_size(), 100 << 20);
            image.close().unwrap();
        }
    }
}

#[test]
fn bad_magic_is_invalid() {
    let mut b = valid();
    b[0] = b'X';
    assert_err(open(b, &RO), "Invalid", "magic");
}

#[test]
fn versions_1_and_4_are_unsupported() {
    for v in [1, 4] {
        let mut b = valid();
        put32(&mut b, field::VERSION, v);
        assert_err(open(b, &RO), "Unsupported", &format!("version {v}"));
    }
}

#[test]
fn cluster_bits_8_and_22_are_invalid() {
    for bits in [8, 22, 0, u32::MAX] {
        let mut b = valid();
        put32(&mut b, field::CLUSTER_BITS, bits);
        assert_err(open(b, &RO), "Invalid", "cluster_bits");
    }
}

#[test]
fn refcount_order_7_is_invalid() {
    let mut b = valid();
    put32(&mut b, field::REFCOUNT_ORDER, 7);
    assert_err(open(b, &RO), "Invalid", "refcount_order");
}

#[test]
fn every_refcount_order_up_to_6_opens() {
    for order in 0..=6 {
        let mut b = valid();
        put32(&mut b, field::REFCOUNT_ORDER, order);
        assert!(open(b, &RO).is_ok(), "refcount_order {order}");
    }
}

#[test]
fn file_shorter_than_a_header_is_invalid() {
    assert_err(open(vec![0; 10], &RO), "Invalid", "too short");
    assert_err(open(Vec::new(), &RO), "Invalid", "too short");
}

#[test]
fn l1_table_beyond_eof_is_invalid() {
    let mut b = valid();
    put64(&mut b, field::L1_OFFSET, 1 << 40);
    assert_err(open(b, &RO), "Invalid", "L1 table");
}

#[test]
fn l1_table_misaligned_or_at_zero_is_invalid() {
    let mut b = valid();
    put64(&mut b, field::L1_OFFSET, 3 * 65536 + 8);
    assert_err(open(b, &RO), "Invalid", "L1 table offset");
    let mut b = valid();
    put64(&mut b, field::L1_OFFSET, 0);
    assert_err(open(b, &RO), "Invalid", "L1 table offset is 0");
}

#[test]
fn overlapping_tables_are_invalid() {
    let mut b = valid();
    put64(&mut b, field::L1_OFFSET, 65536); // the refcount table's cluster
    assert_err(open(b, &RO), "Invalid", "overlaps");
}

#[test]
fn huge_l1_size_is_invalid_without_allocating_it() {
    let mut b = valid();
    put32(&mut b, field::L1_SIZE, u32::MAX);
    assert_err(open(b, &RO), "Invalid", "l1_size");
}

#[test]
fn l1_size_too_small_for_the_virtual_size_is_invalid() {
    let mut b = valid();
    put64(&mut b, field::SIZE, 1 << 50);
    assert_err(open(b, &RO), "Invalid", "l1_size");
}

#[test]
fn refcount_table_checks() {
    let mut b = valid();
    put32(&mut b, field::REFTABLE_CLUSTERS, 0);
    assert_err(open(b, &RO), "Invalid", "refcount_table_clusters");
    let mut b = valid();
    put32(&mut b, field::REFTABLE_CLUSTERS, 1 << 20);
    assert_err(open(b, &RO), "Invalid", "refcount_table_clusters");
    let mut b = valid();
    put64(&mut b, field::REFTABLE_OFFSET, 100);
    assert_err(open(b, &RO), "Invalid", "refcount table");
    let mut b = valid();
    put32(&mut b, field::REFTABLE_CLUSTERS, 3); // runs past the end of the file
    assert_err(open(b, &RO), "Invalid", "refcount table");
}

#[test]
fn header_length_checks() {
    for len in [96, 108, 1 << 20] {
        let mut b = valid();
        put32(&mut b, field::HEADER_LENGTH, len);
        assert_err(open(b, &RO), "Invalid", "header_length");
    }
}

#[test]
fn header_extension_overflowing_is_invalid() {
    let mut b = valid();
    put32(&mut b, field::EXTENSIONS, 0x1234_5678);
    put32(&mut b, field::EXTENSIONS + 4, 0xffff_fff0);
    assert_err(open(b, &RO), "Invalid", "header extension");
    // An area filled to its end with extensions of one kind: refused for the repeat (an
    // area filled to its end is accepted, see below).
    let mut b = build_image(9, 1 << 20, 3);
    for at in (field::EXTENSIONS..512).step_by(8) {
        put32(&mut b, at, 0x1111_1111);
        put32(&mut b, at + 4, 0);
    }
    assert_err(open(b, &RO), "Invalid", "header extension");
}

#[test]
fn encryption_methods_other_than_aes_and_luks_are_unsupported_and_named() {
    for method in [1, 2] {
        let mut b = valid();
        put32(&mut b, field::CRYPT_METHOD, method);
        open(b, &RO).unwrap();
    }
    let mut b = valid();
    put32(&mut b, field::CRYPT_METHOD, 3);
    assert_err(open(b, &RO), "Unsupported", "encryption method 3");
}

#[test]
fn unknown_incompatible_bit_is_unsupported_and_named() {
    let mut b = valid();
    put64(&mut b, field::INCOMPATIBLE, 1 << 5);
    assert_err(open(b, &RO), "Unsupported", "bit 5");

    // With a feature name table, the image's own name for the bit is used.
    let mut b = valid();
    put64(&mut b, field::INCOMPATIBLE, 1 << 9);
    let mut entry = [0u8; 48];
    entry[1] = 9;
    entry[2..2 + 11].copy_from_slice(b"time travel");
    put_extension(&mut b, field::EXTENSIONS, 0x6803_f857, &entry);
    assert_err(open(b, &RO), "Unsupported", "time travel");
}

#[test]
fn external_data_file_is_unsupported_and_named() {
    let mut b = valid();
    put64(&mut b, field::INCOMPATIBLE, 1 << 2);
    assert_err(open(b, &RO), "Unsupported", "external data file");
}

#[test]
fn extended_l2_needs_subclusters_of_512_bytes_at_least() {
    // 16 KiB clusters: 32 subclusters of 512 bytes (an empty 1 MiB image: one L1 entry for
    // either entry width).
    let mut b = build_image(14, 1 << 20, 3);
    put64(&mut b, field::INCOMPATIBLE, 1 << 4);
    let image = open(b, &RO).unwrap();
    assert_eq!(image.subcluster_size(), 512);
    assert!(image.has_subclusters());
    // 8 KiB clusters would have subclusters of 256 bytes.
    let mut b = build_image(13, 1 << 20, 3);
    put64(&mut b, field::INCOMPATIBLE, 1 << 4);
    assert_err(open(b, &RO), "Invalid", "subclusters of 256 bytes");
}

#[test]
fn compression_type_field_must_match_its_bit() {
    let mut b = valid();
    put64(&mut b, field::INCOMPATIBLE, 1 << 3);
    assert_err(open(b, &RO), "Invalid", "compression");
    let mut b = valid();
    put64(&mut b, field::INCOMPATIBLE, 1 << 3);
    b[104] = 1; // zstd
    assert!(open(b, &RO).is_ok());
    let mut b = valid();
    b[104] = 1; // zstd without the bit
    assert_err(open(b, &RO), "Invalid", "compression_type");
    let mut b = valid();
    put64(&mut b, field::INCOMPATIBLE, 1 << 3);
    b[104] = 7;
    assert_err(open(b, &RO), "Unsupported", "compression type 7");
}

#[test]
fn corrupt_bit_refuses_read_write_but_allows_read_only() {
    let mut b = valid();
    put64(&mut b, field::INCOMPATIBLE, 1 << 1);
    assert_err(open(b.clone(), &RW), "Corrupt", "marked corrupt");
    let mut image = open(b, &RO).unwrap();
    let mut buf = [1u8; 512];
    image.read(0, &mut buf, None).unwrap();
    assert_eq!(buf, [0u8; 512]);
    assert!(matches!(image.write(0, &buf, None), Err(Error::ReadOnly)));
}

#[test]
fn dirty_image_is_repaired_and_marked_clean_on_read_write_open_but_not_read_only() {
    let mut b = valid();
    put64(&mut b, field::INCOMPATIBLE, 1);
    // Read-only: opens as it is, dirty bit and all, and writes nothing.
    let image = open(b.clone(), &RO).unwrap();
    assert_eq!(image.storage().bytes_copy(), b);
    // Read-write: the refcounts are checked and repaired, then the bit is cleared on disk
    // before the open returns.
    let image = open(b, &RW).unwrap();
    let header = Header::parse(&image.storage().bytes_copy()[..65536]).unwrap();
    assert_eq!(
        header.incompatible.bits() & 1,
        0,
        "dirty bit cleared on disk"
    );
    assert_eq!(image.header().incompatible.bits() & 1, 0);
    image.close().unwrap();
}

#[test]
fn clean_lazy_refcounts_image_opens_read_write() {
    let mut b = valid();
    put64(&mut b, field::COMPATIBLE, 1);
    let mut image = open(b, &RW).unwrap();
    image.write(0, &[7u8; 1000], None).unwrap();
    image.close().unwrap();
}

#[test]
fn backing_file_name_and_format_are_read() {
    let mut b = valid();
    let end = put_extension(&mut b, field::EXTENSIONS, 0xe279_2aca, b"qcow2");
    let name_at = end + 8;
    b[name_at..name_at + 8].copy_from_slice(b"base.img");
    put64(&mut b, field::BACKING_OFFSET, name_at as u64);
    put32(&mut b, field::BACKING_SIZE, 8);
    let image = open(b, &RO).unwrap();
    assert_eq!(image.backing_file(), Some(&b"base.img"[..]));
    assert_eq!(image.backing_format(), Some(&b"qcow2"[..]));
}

/// QEMU's qcow2 opens an image whose header_length is the cluster size (no room for an
/// extension, nor an end marker); so does qcow2b, and writes to it (a header rewrite omits
/// the end marker it has no room for).
#[test]
fn header_length_of_a_whole_cluster_opens_and_is_written() {
    let mut b = build_image(9, 1 << 20, 3);
    put32(&mut b, field::HEADER_LENGTH, 512);
    let mut image = open(b, &RW).unwrap();
    assert_eq!(image.header().header_length, 512);
    image.write(1000, &[0x42; 3000], None).unwrap();
    let encoded = image.header().encode().unwrap();
    assert_eq!(Header::parse(&encoded).unwrap(), *image.header());
    let bytes = image.close().unwrap().into_inner();
    let mut image = open(bytes, &RO).unwrap();
    let mut buf = [0u8; 3000];
    image.read(1000, &mut buf, None).unwrap();
    assert_eq!(buf, [0x42; 3000]);
    // Negative control: 8 bytes short of the cluster, the area holds an extension header,
    // and one whose data would run past the cluster is still refused.
    let mut b = build_image(9, 1 << 20, 3);
    put32(&mut b, field::HEADER_LENGTH, 504);
    put32(&mut b, 504, 0x1234_5678);
    put32(&mut b, 508, 8);
    assert_err(open(b, &RO), "Invalid", "header extension");
}

/// Names have no encoding in qcow2: a backing file name that is not UTF-8 is kept as the
/// bytes it is (QEMU's rule, and the snapshot names' rule), not refused or replaced.
#[test]
fn backing_file_name_that_is_not_utf8_is_kept_as_bytes() {
    let mut b = valid();
    let name: &[u8] = b"base\xff\xfe.img";
    let name_at = field::EXTENSIONS + 8;
    b[name_at..name_at + name.len()].copy_from_slice(name);
    put64(&mut b, field::BACKING_OFFSET, name_at as u64);
    put32(&mut b, field::BACKING_SIZE, name.len() as u32);
    let image = open(b, &RO).unwrap();
    assert_eq!(image.backing_file(), Some(name));
}

#[test]
fn backing_file_name_outside_the_first_cluster_is_invalid() {
    let mut b = valid();
    put64(&mut b, field::BACKING_OFFSET, 65530);
    put32(&mut b, field::BACKING_SIZE, 100);
    assert_err(open(b, &RO), "Invalid", "backing file name");
    let mut b = valid();
    put64(&mut b, field::BACKING_OFFSET, 1024);
    put32(&mut b, field::BACKING_SIZE, 5000);
    assert_err(open(b, &RO), "Invalid", "backing_file_size");
}

#[test]
fn unknown_extensions_survive_the_autoclear_header_rewrite() {
    let mut b = valid();
    let end = put_extension(&mut b, field::EXTENSIONS, 0x0bad_cafe, b"keep me!!");
    put_extension(&mut b, end, 0xe279_2aca, b"raw");
    put64(&mut b, field::AUTOCLEAR, 1 << 7);
    let image = open(b, &RW).unwrap();
    let bytes = image.storage().bytes_copy();
    image.close().unwrap();
    let header = Header::parse(&bytes[..65536]).unwrap();
    assert_eq!(
        header.autoclear.bits(),
        0,
        "autoclear bits are cleared before writing"
    );
    assert_eq!(header.extensions[0].kind, 0x0bad_cafe);
    assert_eq!(header.extensions[0].data, b"keep me!!");
    assert_eq!(header.backing_format.as_deref(), Some(&b"raw"[..]));
}

/// Reads the whole storage (a test-only convenience on MemStorage).
trait CopyOut {
    fn bytes_copy(&self) -> Vec<u8>;
}

impl CopyOut for MemStorage {
    fn bytes_copy(&self) -> Vec<u8> {
        use qcow2b::engine::Storage;
        let mut v = vec![0u8; self.len().unwrap() as usize];
        self.read_at(0, &mut v).unwrap();
        v
    }
}

// Entries found bad while running are Corrupt errors, not panics.

fn image_with_l1_entry(entry: u64) -> Image<MemStorage> {
    let mut b = valid();
    put64(&mut b, 3 * 65536, entry);
    open(b, &RW).unwrap()
}

#[test]
fn l1_entry_beyond_eof_is_corrupt() {
    let mut image = image_with_l1_entry((1 << 40) | (1 << 63));
    let mut buf = [0u8; 512];
    assert!(
        matches!(image.read(0, &mut buf, None), Err(Error::Corrupt(m)) if m.contains("beyond the end"))
    );
    assert!(matches!(image.write(0, &buf, None), Err(Error::Corrupt(_))));
}

#[test]
fn l1_entry_with_reserved_bits_or_misaligned_is_corrupt() {
    let mut buf = [0u8; 512];
    let mut image = image_with_l1_entry((4 * 65536) | (1 << 60));
    assert!(
        matches!(image.read(0, &mut buf, None), Err(Error::Corrupt(m)) if m.contains("reserved"))
    );
    let mut image = image_with_l1_entry((65536 + 512) | (1 << 63));
    assert!(
        matches!(image.read(0, &mut buf, None), Err(Error::Corrupt(m)) if m.contains("aligned"))
    );
}

fn image_with_l2_entry(entry: u64) -> Image<MemStorage> {
    let mut b = valid();
    let l2_at = b.len();
    b.resize(l2_at + 65536, 0);
    put64(&mut b, 3 * 65536, l2_at as u64 | (1 << 63));
    put64(&mut b, l2_at, entry);
    b[2 * 65536 + 2 * 4 + 1] = 1; // the L2 table's refcount
    open(b, &RW).unwrap()
}

#[test]
fn l2_entry_pointing_at_offset_0_or_the_header_is_corrupt() {
    let mut buf = [0u8; 512];
    for (entry, needle) in [
        (1u64 << 63, "host offset 0"),
        (512 | (1 << 63), "aligned"),
        ((1 << 62) | 100, "header"),
    ] {
        let mut image = image_with_l2_entry(entry);
        match image.read(0, &mut buf, None) {
            Err(Error::Corrupt(m)) => assert!(m.contains(needle), "{m}"),
            other => panic!("entry {entry:#x}: {other:?}"),
        }
    }
}

#[test]
fn a_data_cluster_past_the_end_of_the_file_reads_as_zeros_and_is_written_only_if_counted() {
    // iotest 102: a file cut short outside of QEMU. QEMU's qcow2 reads such a cluster as
    // zeros and writes it in place.
    let mut buf = [0xffu8; 512];
    let past = (1u64 << 30) | (1 << 63);
    let mut image = image_with_l2_entry(past);
    image.read(0, &mut buf, None).unwrap();
    assert_eq!(buf, [0u8; 512]);
    // Not counted by any refcount: an allocation could hand it out, so no write goes there.
    match image.write(0, &[7u8; 512], None) {
        Err(Error::Corrupt(m)) => assert!(
            m.contains("beyond the end") && m.contains("refcount 0"),
            "{m}"
        ),
        other => panic!("{other:?}"),
    }

    // Counted (the refcount says so, the file is shorter): written in place, and the file
    // ends after it; a new allocation does not land on it.
    let mut b = valid();
    let l2_at = b.len();
    let data_at = l2_at + 2 * 65536; // one cluster of gap, then the cut-off data cluster
    b.resize(l2_at + 65536, 0);
    put64(&mut b, 3 * 65536, l2_at as u64 | (1 << 63));
    put64(&mut b, l2_at, data_at as u64 | (1 << 63));
    b[2 * 65536 + 2 * (l2_at / 65536) + 1] = 1;
    b[2 * 65536 + 2 * (data_at / 65536) + 1] = 1;
    let mut image = open(b, &RW).unwrap();
    image.read(0, &mut buf, None).unwrap();
    assert_eq!(buf, [0u8; 512]);
    image.write(512, &[7u8; 512], None).unwrap();
    image.write(65536, &[9u8; 512], None).unwrap();
    image.flush().unwrap();
    image.read(512, &mut buf, None).unwrap();
    assert_eq!(buf, [7u8; 512]);
    match image.map(65536, 65536).unwrap().0 {
        Mapping::Data { host_offset } => assert_ne!(host_offset, data_at as u64),
        other => panic!("{other:?}"),
    }
    image.read(65536, &mut buf, None).unwrap();
    assert_eq!(buf, [9u8; 512]);
}

#[test]
fn requests_beyond_the_virtual_size_are_out_of_range() {
    let mut image = open(build_image(16, 1 << 20, 3), &RW).unwrap();
    let mut buf = [0u8; 512];
    assert!(matches!(
        image.read((1 << 20) - 100, &mut buf, None),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        image.write(u64::MAX - 10, &buf, None),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        image.map(1 << 20, 1),
        Err(Error::OutOfRange { .. })
    ));
}

/// Whether an error is one a damaged image may give: the image's fault (invalid, corrupt,
/// unsupported), or a write refused on a read-only open; never an I/O error (the in-memory
/// file cannot fail) or an internal one.
fn damage_error(e: &Error) -> bool {
    // A snapshot table over QEMU's limits is refused with QEMU's own short message (EFBIG).
    let over_limits = matches!(e, Error::Refused { errno, .. } if *errno == libc::EFBIG);
    (matches!(
        e,
        Error::Invalid(_) | Error::Corrupt(_) | Error::Unsupported(_) | Error::ReadOnly
    ) && e.to_string().len() > 20)
        || over_limits
}

/// Opens a damaged image: `None` (counted as refused) when open says it is damaged; the
/// image (counted as served) otherwise.
fn open_or_refused(
    bytes: Vec<u8>,
    opts: &OpenOptions,
    round: u32,
    (refused, served): (&mut u32, &mut u32),
) -> Option<Image<MemStorage>> {
    match open(bytes, opts) {
        Ok(image) => {
            *served += 1;
            Some(image)
        }
        Err(e) => {
            assert!(damage_error(&e), "round {round}: open: {e}");
            *refused += 1;
            None
        }
    }
}

/// What a write followed by a read of the same range gave: written bytes read back.
fn write_then_read(image: &mut Image<MemStorage>, off: u64, len: usize, fill: u8) {
    let data = vec![fill; len];
    let wrote = image.write(off, &data, None);
    if let Err(e) = &wrote {
        assert!(damage_error(e), "write: {e}");
    }
    let mut back = vec![0u8; len];
    match image.read(off, &mut back, None) {
        Ok(()) if wrote.is_ok() => {
            assert!(back == data, "a write that succeeded reads back otherwise")
        }
        Ok(()) => {}
        Err(e) => assert!(damage_error(&e), "read: {e}"),
    }
}

/// Random corruption of the header cluster and tables: open refuses with an error that says
/// the image is damaged, or the image serves requests: each fails with such an error or
/// works, and a write that worked reads back. Both outcomes occur.
#[test]
fn random_header_and_table_corruption_is_refused_or_served_consistently() {
    let mut rng = XorShift::new(42);
    let base = build_image(9, 1 << 20, 3);
    let (mut refused, mut served) = (0, 0);
    for round in 0..3000 {
        let mut b = base.clone();
        for _ in 0..1 + rng.below(4) {
            let at = if round % 2 == 0 {
                rng.below(128)
            } else {
                rng.below(b.len() as u64)
            } as usize;
            b[at] = rng.next_u64() as u8;
        }
        let opts = if round % 3 == 0 { RO } else { RW };
        let Some(mut image) = open_or_refused(b, &opts, round, (&mut refused, &mut served)) else {
            continue;
        };
        let size = image.virtual_size();
        let off = rng.below(size.max(1));
        let len = (size - off).min(4096) as usize;
        write_then_read(&mut image, off, len, 0xa5);
        if let Err(e) = image.map(off, (len as u64).max(1)) {
            assert!(damage_error(&e), "round {round}: map: {e}");
        }
        if let Err(e) = image.flush() {
            assert!(damage_error(&e), "round {round}: flush: {e}");
        }
    }
    assert!(
        refused > 100 && served > 100,
        "refused {refused}, served {served}"
    );
}

/// An image with data, L2 tables and several refcount blocks, then random corruption
/// anywhere in the file (tables included): every operation works or fails with an error that
/// says the image is damaged (or out of range, for a growth past QEMU's limits), a write that
/// worked reads back, and images both refused and served occur.
#[test]
fn random_metadata_corruption_gives_errors_or_consistent_answers() {
    use qcow2b::engine::Storage;
    let mut image = open(build_image(9, 4 << 20, 3), &RW).unwrap();
    let mut rng = XorShift::new(7);
    for _ in 0..60 {
        let off = rng.below(4 << 20);
        let len = (1 + rng.below(20_000)).min((4 << 20) - off);
        image.write(off, &vec![0x5a; len as usize], None).unwrap();
    }
    image.flush().unwrap();
    let storage = image.storage();
    let mut base = vec![0u8; storage.len().unwrap() as usize];
    storage.read_at(0, &mut base).unwrap();

    let (mut refused, mut served) = (0, 0);
    for round in 0..4000 {
        let mut b = base.clone();
        for _ in 0..1 + rng.below(8) {
            // Half the rounds hit the first clusters (header, refcount table and block, L1).
            let span = if round % 2 == 0 { 2048 } else { b.len() as u64 };
            let at = rng.below(span) as usize;
            b[at] = match rng.below(3) {
                0 => 0xff,
                1 => 0,
                _ => rng.next_u64() as u8,
            };
        }
        let opts = OpenOptions {
            read_only: round % 5 == 0,
            l2_cache_bytes: Some(1024),
            ..Default::default()
        };
        let Some(mut image) = open_or_refused(b, &opts, round, (&mut refused, &mut served)) else {
            continue;
        };
        let size = image.virtual_size();
        if size == 0 {
            continue;
        }
        for _ in 0..6 {
            let off = rng.below(size);
            let len = (1 + rng.below(3000)).min(size - off);
            let result = match rng.below(6) {
                0 => {
                    write_then_read(&mut image, off, len as usize, 0x3c);
                    Ok(())
                }
                1 => image.read(off, &mut vec![0u8; len as usize], None),
                2 => image.write_zeroes(off, len, rng.below(2) == 0, None),
                3 => image.discard(off, len),
                4 => image.map(off, len).map(|_| ()),
                _ => image.truncate(size + rng.below(1 << 20)),
            };
            if let Err(e) = result {
                assert!(damage_error(&e), "round {round}: {e}");
            }
        }
        if let Err(e) = image.flush() {
            assert!(damage_error(&e), "round {round}: flush: {e}");
        }
    }
    assert!(
        refused > 100 && served > 100,
        "refused {refused}, served {served}"
    );
}
