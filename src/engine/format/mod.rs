//! The qcow2 format as it is on disk: what an image file says, parsed and validated before
//! anything else trusts it. Everything here reads untrusted bytes, and it is what the fuzz
//! targets drive (`crate::fuzzing`); nothing here does I/O beyond reading the structures it
//! parses.
//!
//! - [`bytes`]: the one big-endian reader and writer of on-disk structures;
//! - [`header`]: header fields, feature bits, header extensions (parse, validate, encode);
//! - [`layout`]: table offsets and sizes checked against the file and each other;
//! - [`entry`]: L1, L2 and refcount table entries and their flag bits;
//! - [`refcount`]: refcount block entries of 1 to 64 bits;
//! - [`snapshot`]: the internal snapshot table;
//! - [`compress`]: compressed cluster decoding (raw deflate, zstd);
//! - [`bitmap`]: persistent dirty bitmaps: the bitmap directory and bitmap table entries.

pub mod bitmap;
pub mod bytes;
pub mod compress;
pub mod entry;
pub mod header;
pub mod layout;
pub mod refcount;
pub mod snapshot;
