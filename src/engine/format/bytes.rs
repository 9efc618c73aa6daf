//! The one reader and writer of on-disk structures: qcow2 stores every field big-endian.
//!
//! [`BeBytes`] reads the fields of one structure (a header, a snapshot table entry, a bitmap
//! directory entry, a table) from a byte slice. Every read names the structure, and a read
//! that falls outside it is an [`Error::Invalid`] saying which structure, where and how long:
//! never a zero standing in for bytes that are not there. [`BeWriter`] builds a structure
//! field by field; [`read_table`], [`encode_table`], [`table_entry`] and [`set_table_entry`]
//! handle tables of 64-bit entries (L1, L2, refcount and bitmap tables).

use std::fmt;

use crate::engine::error::{Error, Result};
use crate::engine::storage::Storage;

/// A big-endian view of one on-disk structure, named for the errors it gives.
#[derive(Clone, Copy, Debug)]
pub struct BeBytes<'a> {
    what: &'a str,
    bytes: &'a [u8],
}

impl<'a> BeBytes<'a> {
    /// `bytes` hold the structure `what` ("the header", "snapshot 3", ...).
    pub fn new(what: &'a str, bytes: &'a [u8]) -> BeBytes<'a> {
        BeBytes { what, bytes }
    }

    /// Bytes the structure has.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the structure has no bytes.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// `len` bytes at `at`, or an error naming the structure when they are not all there.
    pub fn slice(&self, at: usize, len: usize) -> Result<&'a [u8]> {
        at.checked_add(len)
            .and_then(|end| self.bytes.get(at..end))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: {len} bytes at byte {at} lie past its end ({} bytes)",
                    self.what,
                    self.bytes.len()
                ))
            })
    }

    fn array<const N: usize>(&self, at: usize) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.slice(at, N)?);
        Ok(out)
    }

    pub fn u8(&self, at: usize) -> Result<u8> {
        Ok(self.array::<1>(at)?[0])
    }

    pub fn u16(&self, at: usize) -> Result<u16> {
        self.array(at).map(u16::from_be_bytes)
    }

    pub fn u32(&self, at: usize) -> Result<u32> {
        self.array(at).map(u32::from_be_bytes)
    }

    pub fn u64(&self, at: usize) -> Result<u64> {
        self.array(at).map(u64::from_be_bytes)
    }
}

/// Builds an on-disk structure field by field, big-endian.
#[derive(Debug, Default)]
pub struct BeWriter {
    bytes: Vec<u8>,
}

impl BeWriter {
    pub fn with_capacity(bytes: usize) -> BeWriter {
        BeWriter {
            bytes: Vec::with_capacity(bytes),
        }
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(v);
        self
    }

    /// Zeros up to the next multiple of `align` bytes.
    pub fn pad_to(&mut self, align: usize) -> &mut Self {
        self.bytes
            .resize(self.bytes.len().next_multiple_of(align), 0);
        self
    }

    /// Overwrites the 8 bytes at `at`, written before (a field whose value is known only
    /// once what follows it is laid out).
    pub fn set_u64(&mut self, at: usize, v: u64) -> Result<()> {
        put_u64("a structure being written", &mut self.bytes, at, v)
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// The bytes of a table of 64-bit entries.
pub fn encode_table(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_be_bytes()).collect()
}

/// The entries of a table held as bytes (a trailing partial entry is not one).
pub fn decode_table(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_be_bytes(b)
        })
        .collect()
}

/// Entry `index` of the table `what` held as bytes (an L2 table in the cache). `what` is
/// formatted only for an error: on the data path the name costs nothing (`format_args!`).
pub fn table_entry(what: &dyn fmt::Display, table: &[u8], index: usize) -> Result<u64> {
    let field = entry_bytes(table.len(), index)
        .and_then(|range| table.get(range))
        .ok_or_else(|| past_end(what, index, table.len()))?;
    let mut b = [0u8; 8];
    b.copy_from_slice(field);
    Ok(u64::from_be_bytes(b))
}

/// Sets entry `index` of the table `what` held as bytes (`what` as for [`table_entry`]).
pub fn set_table_entry(
    what: &dyn fmt::Display,
    table: &mut [u8],
    index: usize,
    value: u64,
) -> Result<()> {
    let len = table.len();
    let field = entry_bytes(len, index)
        .and_then(|range| table.get_mut(range))
        .ok_or_else(|| past_end(what, index, len))?;
    field.copy_from_slice(&value.to_be_bytes());
    Ok(())
}

/// The bytes of 64-bit entry `index`, if a table of `len` bytes holds it.
fn entry_bytes(len: usize, index: usize) -> Option<std::ops::Range<usize>> {
    let at = index.checked_mul(8)?;
    let end = at.checked_add(8)?;
    (end <= len).then_some(at..end)
}

fn past_end(what: &dyn fmt::Display, index: usize, len: usize) -> Error {
    Error::Invalid(format!(
        "{what}: entry {index} lies past its end ({len} bytes)"
    ))
}

/// Writes `v` into the 8 bytes at `at` of the structure `what`, which must hold them.
fn put_u64(what: &str, bytes: &mut [u8], at: usize, v: u64) -> Result<()> {
    let len = bytes.len();
    let field = at
        .checked_add(8)
        .and_then(|end| bytes.get_mut(at..end))
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{what}: 8 bytes at byte {at} lie past its end ({len} bytes)"
            ))
        })?;
    field.copy_from_slice(&v.to_be_bytes());
    Ok(())
}

/// Reads `entries` 64-bit entries of the table `what` at `offset` (bytes past the end of the
/// file read as zeros). The caller bounds `entries`: by the file length, and by QEMU's limit
/// for that kind of table.
pub fn read_table<S: Storage>(
    storage: &S,
    offset: u64,
    entries: u64,
    what: &str,
) -> Result<Vec<u64>> {
    let len = entries
        .checked_mul(8)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| Error::Invalid(format!("{what} of {entries} entries is too large")))?;
    let mut bytes = vec![0u8; len];
    storage
        .read_at(offset, &mut bytes)
        .map_err(|e| Error::io(format!("reading {what} at {offset:#x}"), e))?;
    Ok(decode_table(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_big_endian_and_a_read_past_the_end_names_the_structure() {
        let b = BeBytes::new("the test header", &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(b.u8(0).unwrap(), 1);
        assert_eq!(b.u16(0).unwrap(), 0x0102);
        assert_eq!(b.u32(1).unwrap(), 0x0203_0405);
        assert_eq!(b.u64(1).unwrap(), 0x0203_0405_0607_0809);
        let err = b.u64(2).unwrap_err();
        assert!(matches!(err, Error::Invalid(_)), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("the test header") && text.contains("byte 2") && text.contains("9 bytes"),
            "{text}"
        );
        assert!(b.slice(usize::MAX, 2).is_err());
        assert_eq!(b.slice(9, 0).unwrap(), &[] as &[u8]);
    }

    #[test]
    fn writer_and_tables_round_trip() {
        let mut w = BeWriter::default();
        w.u32(0x0102_0304).u64(7).bytes(b"ab").pad_to(8);
        assert_eq!(w.len(), 16);
        w.set_u64(4, 9).unwrap();
        assert!(w.set_u64(12, 1).is_err());
        let bytes = w.into_bytes();
        assert_eq!(&bytes[..4], &[1, 2, 3, 4]);
        assert_eq!(BeBytes::new("w", &bytes).u64(4).unwrap(), 9);

        let mut table = encode_table(&[1, u64::MAX, 3]);
        assert_eq!(decode_table(&table), vec![1, u64::MAX, 3]);
        set_table_entry(&"t", &mut table, 2, 5).unwrap();
        assert_eq!(table_entry(&"t", &table, 2).unwrap(), 5);
        assert!(table_entry(&"t", &table, 3).is_err());
        assert!(set_table_entry(&"t", &mut table, 3, 0).is_err());
        assert!(set_table_entry(&"t", &mut table, usize::MAX, 0).is_err());
    }
}
