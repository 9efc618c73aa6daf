//! Compressed clusters: raw deflate (compression type zlib, as QEMU writes it: no zlib
//! header, 4 KiB window) or a zstd frame. Decoding stops once a whole cluster has been
//! produced; the input may run on into the next compressed cluster's bytes. Encoding
//! ([`compress_cluster`]) follows QEMU 7.2's rule for what is worth storing compressed.

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

/// Compresses one guest cluster (`cluster`, the cluster's size, a short last cluster padded
/// with zeros by the caller) as QEMU's qcow2 does: raw deflate at the default level with a
/// 4 KiB window (`deflateInit2(-12)`), or a single zstd frame. `None` when the result would
/// not be smaller than the cluster (QEMU's rule: at most `cluster_size - 1` bytes, or the
/// cluster is written uncompressed).
pub fn compress_cluster(kind: CompressionType, cluster: &[u8]) -> Result<Option<Vec<u8>>> {
    let limit = cluster.len().saturating_sub(1);
    match kind {
        CompressionType::Zlib => deflate_raw(cluster, limit),
        CompressionType::Zstd => {
            // ruzstd's encoder (its one level, close to zstd's level 1): a standard frame, read
            // by libzstd as QEMU uses it (tests/engine_compressed.rs reads every kind of
            // cluster back with the system's QEMU and zstd tool).
            let frame = ruzstd::encoding::compress_to_vec(
                cluster,
                ruzstd::encoding::CompressionLevel::Fastest,
            );
            Ok((frame.len() <= limit).then_some(frame))
        }
    }
}

fn deflate_raw(cluster: &[u8], limit: usize) -> Result<Option<Vec<u8>>> {
    use flate2::{Compress, Compression, FlushCompress, Status};
    // Window bits 12, no zlib header: what QEMU's inflateInit2(-12) expects.
    let mut encoder = Compress::new_with_window_bits(Compression::default(), false, 12);
    let mut out = Vec::with_capacity(limit);
    match encoder.compress_vec(cluster, &mut out, FlushCompress::Finish) {
        // The whole stream fitted in `limit` bytes.
        Ok(Status::StreamEnd) if out.len() <= limit => Ok(Some(out)),
        // Out of room before the stream's end: not worth compressing.
        Ok(Status::StreamEnd | Status::Ok | Status::BufError) => Ok(None),
        Err(e) => Err(Error::Invalid(format!(
            "deflate of a cluster of {} bytes failed: {e}",
            cluster.len()
        ))),
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
    fn compressed_clusters_decode_to_the_cluster() {
        let cluster: Vec<u8> = (0..65536u32).map(|i| (i / 100 % 251) as u8).collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let packed = compress_cluster(kind, &cluster).unwrap().unwrap();
            assert!(
                packed.len() < cluster.len() / 4,
                "{kind:?}: {}",
                packed.len()
            );
            let mut out = vec![0u8; cluster.len()];
            decompress_cluster(kind, &packed, &mut out).unwrap();
            assert_eq!(out, cluster, "{kind:?}");
        }
    }

    #[test]
    fn incompressible_cluster_is_not_compressed() {
        // xorshift noise: neither encoder gets it below the cluster size.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let cluster: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            assert_eq!(compress_cluster(kind, &cluster).unwrap(), None, "{kind:?}");
        }
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
