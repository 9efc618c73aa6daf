//! Decoding of compressed clusters: raw deflate (compression type zlib, as QEMU writes it:
//! no zlib header, 4 KiB window) or a zstd frame. Decoding stops once a whole cluster has been
//! produced; the input may run on into the next compressed cluster's bytes.

use std::io::Read;

use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

use crate::engine::error::{Error, Result};
use crate::engine::format::header::CompressionType;

/// Decompresses one cluster from `input` (the bytes the L2 descriptor covers) into `out`,
/// which has the cluster's size. Anything short of a full cluster is corrupt.
pub fn decompress_cluster(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        CompressionType::Zlib => inflate_raw(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

fn inflate_raw(input: &[u8], out: &mut [u8]) -> Result<()> {
    let mut state = Box::<DecompressorOxide>::default();
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, _read, written) = decompress(&mut state, input, out, 0, flags);
    match status {
        TINFLStatus::Done | TINFLStatus::HasMoreOutput if written == out.len() => Ok(()),
        _ => Err(Error::Corrupt(format!(
            "deflate data of a compressed cluster does not decode to a cluster ({status:?}, \
             {written} of {} bytes)",
            out.len()
        ))),
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<()> {
    let corrupt = |e: &dyn std::fmt::Display| {
        Error::Corrupt(format!(
            "zstd data of a compressed cluster does not decode: {e}"
        ))
    };
    let mut decoder = ruzstd::decoding::StreamingDecoder::new(input).map_err(|e| corrupt(&e))?;
    decoder.read_exact(out).map_err(|e| corrupt(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_deflate_with_trailing_bytes_decodes_one_cluster() {
        let cluster: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        let mut input = miniz_oxide::deflate::compress_to_vec(&cluster, 6);
        input.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        let mut out = vec![0u8; 4096];
        decompress_cluster(CompressionType::Zlib, &input, &mut out).unwrap();
        assert_eq!(out, cluster);
    }

    #[test]
    fn garbage_is_corrupt_not_a_panic() {
        let mut out = vec![0u8; 4096];
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            assert!(matches!(
                decompress_cluster(kind, &[0xff; 100], &mut out),
                Err(Error::Corrupt(_))
            ));
            assert!(decompress_cluster(kind, &[], &mut out).is_err());
        }
    }
}
