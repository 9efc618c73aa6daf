//! `qemu-img measure -O qcow2`: the file sizes an image would need.

use crate::engine::error::{Error, Result};
use crate::engine::format::layout::MAX_L1_BYTES;
use crate::engine::format::refcount::RefcountGeometry;

use super::layout::refcount_structure_clusters;
use super::{CreateOptions, Preallocation, MAX_SIZE_BYTES};

/// What `qemu-img measure -O qcow2` reports, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Measure {
    /// File size needed for the image holding the given guest data (all metadata of a
    /// fully allocated image included, as QEMU counts it).
    pub required: u64,
    /// File size of the image with every guest cluster allocated.
    pub fully_allocated: u64,
}

/// Measures an image created with `opts`: `qemu-img measure -O qcow2 --size N` when
/// `allocated_guest_bytes` is `None`; for converting an existing image, pass the bytes of
/// guest data it holds, counted in whole clusters of the new image as QEMU does (each
/// allocated, non-zero extent rounded out to cluster boundaries; the whole virtual size if
/// the new image gets a backing file).
///
/// Only the options `qemu-img measure` looks at matter: the cluster size, the compatibility
/// level and refcount width, full or falloc preallocation (which require the whole virtual
/// size), and a LUKS header (its whole clusters, in both sizes). Like QEMU, the virtual size
/// is rounded up to whole clusters.
pub fn measure(opts: &CreateOptions, allocated_guest_bytes: Option<u64>) -> Result<Measure> {
    let cluster_bits = opts.cluster_bits()?;
    let rc = RefcountGeometry {
        refcount_order: opts.refcount_order()?,
        cluster_bits,
    };
    let cluster_size = 1u64 << cluster_bits;
    let virtual_size = opts
        .size_bytes
        .checked_next_multiple_of(cluster_size)
        .filter(|&s| s <= MAX_SIZE_BYTES)
        .ok_or_else(|| Error::BadOption("Image size must be less than 8 EiB!".into()))?;
    // L2 tables of 8- or 16-byte entries; each named by an 8-byte L1 entry.
    let entry_bytes = opts.l2_width().entry_bytes();
    let l2_tables = (virtual_size >> cluster_bits).div_ceil(cluster_size / entry_bytes);
    if l2_tables * 8 > MAX_L1_BYTES {
        return Err(Error::BadOption(
            "The image size is too large (try using a larger cluster size)".into(),
        ));
    }

    // A fully allocated image: header, L2 tables, L1 table (whole clusters), data, and the
    // refcount structures counting all of them and themselves.
    let l1_clusters = l2_tables.div_ceil(cluster_size / 8);
    let data_clusters = virtual_size >> cluster_bits;
    let other_clusters = 1 + l2_tables + l1_clusters + data_clusters;
    let (blocks, table) = refcount_structure_clusters(other_clusters, rc);
    let fully_allocated = (other_clusters + blocks + table) << cluster_bits;

    let data_bytes = match opts.preallocation {
        Preallocation::Full | Preallocation::Falloc => virtual_size,
        Preallocation::Off | Preallocation::Metadata => allocated_guest_bytes
            .unwrap_or(0)
            .div_ceil(cluster_size)
            .saturating_mul(cluster_size)
            .min(virtual_size),
    };
    // As QEMU: the LUKS header's clusters on top, not counted by the refcount estimate.
    let luks_bytes = opts
        .encryption
        .map_or(0, |e| e.header_bytes().next_multiple_of(cluster_size));
    Ok(Measure {
        required: fully_allocated - virtual_size + data_bytes + luks_bytes,
        fully_allocated: fully_allocated + luks_bytes,
    })
}
