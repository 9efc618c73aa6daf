//! Helpers shared by the engine tests (included with `#[path]`): a small PRNG, a builder of
//! minimal qcow2 images in memory, and wrappers around the system's `qemu-img`/`qemu-io`.
#![allow(dead_code)]

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::path::Path;
use std::process::Command;

use qcow2b::engine::{Backing, Image, MemStorage, OpenOptions, Storage};

/// xorshift64*: deterministic, seedable, good enough for test inputs.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

pub fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

pub fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Byte offsets of header fields used by the tests.
pub mod field {
    pub const VERSION: usize = 4;
    pub const BACKING_OFFSET: usize = 8;
    pub const BACKING_SIZE: usize = 16;
    pub const CLUSTER_BITS: usize = 20;
    pub const SIZE: usize = 24;
    pub const CRYPT_METHOD: usize = 32;
    pub const L1_SIZE: usize = 36;
    pub const L1_OFFSET: usize = 40;
    pub const REFTABLE_OFFSET: usize = 48;
    pub const REFTABLE_CLUSTERS: usize = 56;
    pub const INCOMPATIBLE: usize = 72;
    pub const COMPATIBLE: usize = 80;
    pub const AUTOCLEAR: usize = 88;
    pub const REFCOUNT_ORDER: usize = 96;
    pub const HEADER_LENGTH: usize = 100;
    pub const EXTENSIONS: usize = 112;
}

/// A minimal, consistent, empty image: header (cluster 0), refcount table (1), refcount block
/// (2), L1 table (3..). Version 3 (header_length 112) or 2.
pub fn build_image(cluster_bits: u32, virtual_size: u64, version: u32) -> Vec<u8> {
    let cs = 1usize << cluster_bits;
    let l1_entries = virtual_size.div_ceil((cs as u64) * (cs as u64) / 8);
    let l1_clusters = ((l1_entries * 8) as usize).div_ceil(cs).max(1);
    let total_clusters = 3 + l1_clusters;
    let mut img = vec![0u8; total_clusters * cs];
    img[0..4].copy_from_slice(b"QFI\xfb");
    put32(&mut img, field::VERSION, version);
    put32(&mut img, field::CLUSTER_BITS, cluster_bits);
    put64(&mut img, field::SIZE, virtual_size);
    put32(&mut img, field::L1_SIZE, l1_entries as u32);
    put64(&mut img, field::L1_OFFSET, 3 * cs as u64);
    put64(&mut img, field::REFTABLE_OFFSET, cs as u64);
    put32(&mut img, field::REFTABLE_CLUSTERS, 1);
    if version >= 3 {
        put32(&mut img, field::REFCOUNT_ORDER, 4);
        put32(&mut img, field::HEADER_LENGTH, 112);
    }
    put64(&mut img, cs, 2 * cs as u64);
    for c in 0..total_clusters {
        img[2 * cs + 2 * c + 1] = 1;
    }
    img
}

/// Appends a header extension at `at` (8-aligned) and returns the offset after it.
pub fn put_extension(img: &mut [u8], at: usize, kind: u32, data: &[u8]) -> usize {
    put32(img, at, kind);
    put32(img, at + 4, data.len() as u32);
    img[at + 8..at + 8 + data.len()].copy_from_slice(data);
    (at + 8 + data.len()).next_multiple_of(8)
}

pub fn run(cmd: &mut Command) -> std::process::Output {
    cmd.output().expect("running a qemu tool")
}

/// Runs a command and panics with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

pub fn qemu_img_create(path: &Path, cluster_size: u64, size: u64, backing: Option<&Path>) {
    qemu_img_create_with(
        path,
        &format!("cluster_size={cluster_size}"),
        &size.to_string(),
        backing,
    );
}

/// `qemu-img create -f qcow2` with creation options (`-o`, none when empty), a size in
/// qemu-img's syntax (empty: the backing file's) and a qcow2 backing file; panics with
/// qemu-img's output if it fails.
pub fn qemu_img_create_with(path: &Path, options: &str, size: &str, backing: Option<&Path>) {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if !options.is_empty() {
        cmd.arg("-o").arg(options);
    }
    if let Some(b) = backing {
        cmd.arg("-b").arg(b).args(["-F", "qcow2"]);
    }
    cmd.arg(path);
    if !size.is_empty() {
        cmd.arg(size);
    }
    run_ok(&mut cmd);
}

pub fn qemu_io(path: &Path, commands: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(path);
    let text = run_ok(&mut cmd);
    assert!(!text.contains("failed"), "qemu-io {commands:?}: {text}");
    text
}

/// `qemu-img check`: asserts exit code 0 (no corruption, no leak).
pub fn qemu_img_check(path: &Path) {
    let out = run(Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path));
    assert!(
        out.status.success(),
        "qemu-img check {} exited {:?}: {}{}",
        path.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img compare` of the qcow2 image against a raw file.
pub fn qemu_img_compare_raw(img: &Path, raw: &Path) {
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-q", "-f", "qcow2", "-F", "raw"])
            .arg(img)
            .arg(raw),
    );
}

/// The guest content of an image as QEMU reads it.
pub fn qemu_img_to_raw(img: &Path, raw: &Path) -> Vec<u8> {
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(img)
            .arg(raw),
    );
    std::fs::read(raw).unwrap()
}

pub fn open_file(path: &Path, opts: &OpenOptions) -> Image<File> {
    let file = File::options()
        .read(true)
        .write(!opts.read_only)
        .open(path)
        .unwrap();
    Image::open(file, opts).unwrap()
}

/// A qcow2 image opened read-only, used as the backing file of another.
pub struct ImageBacking<S: Storage>(pub RefCell<Image<S>>);

impl<S: Storage> Backing for ImageBacking<S> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut image = self.0.borrow_mut();
        let size = image.virtual_size();
        buf.fill(0);
        if offset >= size {
            return Ok(());
        }
        let n = (size - offset).min(buf.len() as u64) as usize;
        image
            .read(offset, &mut buf[..n], None)
            .map_err(|e| io::Error::other(e.to_string()))
    }
}

/// A JSON value, enough to read what `qemu-img ... --output=json` prints.
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    /// Numbers are kept as written.
    Number(String),
    Str(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    pub fn parse(text: &str) -> Json {
        let bytes = text.as_bytes();
        let mut at = 0;
        let value = Self::value(bytes, &mut at);
        Self::skip_ws(bytes, &mut at);
        assert_eq!(at, bytes.len(), "trailing bytes after JSON: {text}");
        value
    }

    /// The member `key` of an object (None if absent or not an object).
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The number member `key`, 0 when absent (qemu-img leaves out zero counts).
    pub fn u64_or_0(&self, key: &str) -> u64 {
        match self.get(key) {
            None => 0,
            Some(Json::Number(n)) => n.parse().unwrap_or_else(|_| panic!("{key}: {n}")),
            Some(other) => panic!("{key} is not a number: {other:?}"),
        }
    }

    pub fn str_of(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Json::Str(s)) => Some(s),
            _ => None,
        }
    }

    pub fn array(&self) -> &[Json] {
        match self {
            Json::Array(items) => items,
            _ => &[],
        }
    }

    fn skip_ws(b: &[u8], at: &mut usize) {
        while *at < b.len() && b[*at].is_ascii_whitespace() {
            *at += 1;
        }
    }

    fn value(b: &[u8], at: &mut usize) -> Json {
        Self::skip_ws(b, at);
        match b[*at] {
            b'{' => {
                *at += 1;
                let mut members = Vec::new();
                loop {
                    Self::skip_ws(b, at);
                    if b[*at] == b'}' {
                        *at += 1;
                        return Json::Object(members);
                    }
                    let Json::Str(key) = Self::value(b, at) else {
                        panic!("object key expected at {at}");
                    };
                    Self::skip_ws(b, at);
                    assert_eq!(b[*at], b':');
                    *at += 1;
                    members.push((key, Self::value(b, at)));
                    Self::skip_ws(b, at);
                    if b[*at] == b',' {
                        *at += 1;
                    }
                }
            }
            b'[' => {
                *at += 1;
                let mut items = Vec::new();
                loop {
                    Self::skip_ws(b, at);
                    if b[*at] == b']' {
                        *at += 1;
                        return Json::Array(items);
                    }
                    items.push(Self::value(b, at));
                    Self::skip_ws(b, at);
                    if b[*at] == b',' {
                        *at += 1;
                    }
                }
            }
            b'"' => {
                *at += 1;
                let mut s = Vec::new();
                while b[*at] != b'"' {
                    if b[*at] == b'\\' {
                        *at += 1;
                        s.push(match b[*at] {
                            b'n' => b'\n',
                            b't' => b'\t',
                            other => other,
                        });
                    } else {
                        s.push(b[*at]);
                    }
                    *at += 1;
                }
                *at += 1;
                Json::Str(String::from_utf8(s).unwrap())
            }
            b't' => {
                *at += 4;
                Json::Bool(true)
            }
            b'f' => {
                *at += 5;
                Json::Bool(false)
            }
            b'n' => {
                *at += 4;
                Json::Null
            }
            _ => {
                let start = *at;
                while *at < b.len()
                    && (b[*at] == b'-' || b[*at] == b'.' || b[*at].is_ascii_alphanumeric())
                {
                    *at += 1;
                }
                Json::Number(String::from_utf8(b[start..*at].to_vec()).unwrap())
            }
        }
    }
}

/// `qemu-img check --output=json` of an image: its exit code and its report.
pub fn qemu_img_check_json(path: &Path) -> (i32, Json) {
    let out = run(Command::new("qemu-img")
        .args(["check", "-f", "qcow2", "--output=json"])
        .arg(path));
    let text = String::from_utf8_lossy(&out.stdout);
    (out.status.code().unwrap_or(-1), Json::parse(&text))
}

/// `qemu-img info --output=json` of an image.
pub fn qemu_img_info_json(path: &Path) -> Json {
    let text = run_ok(
        Command::new("qemu-img")
            .args(["info", "-f", "qcow2", "--output=json"])
            .arg(path),
    );
    // run_ok appends stderr; info prints nothing there on success.
    Json::parse(&text)
}

/// Reads a big-endian u64 at `at` of a file.
pub fn file_be64(path: &Path, at: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 8];
    File::open(path).unwrap().read_exact_at(&mut b, at).unwrap();
    u64::from_be_bytes(b)
}

/// Writes bytes at `at` of a file.
pub fn file_write(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(bytes, at)
        .unwrap();
}

/// What a [`LogStorage`] saw, in order.
pub enum LogEvent {
    Write(u64, Vec<u8>),
    /// A barrier or a flush: everything before it is ordered before everything after.
    Barrier,
}

/// An in-memory file that logs writes and ordering points (flushes count as barriers), for
/// tests that replay the order in which metadata reached the file.
#[derive(Default)]
pub struct LogStorage {
    pub inner: MemStorage,
    pub events: RefCell<Vec<LogEvent>>,
}

impl LogStorage {
    pub fn new(bytes: Vec<u8>) -> LogStorage {
        LogStorage {
            inner: MemStorage::new(bytes),
            ..Default::default()
        }
    }
}

impl Storage for LogStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.events
            .borrow_mut()
            .push(LogEvent::Write(offset, buf.to_vec()));
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> io::Result<()> {
        self.events.borrow_mut().push(LogEvent::Barrier);
        self.inner.flush()
    }
    fn barrier(&self) -> io::Result<()> {
        self.events.borrow_mut().push(LogEvent::Barrier);
        self.inner.barrier()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}
