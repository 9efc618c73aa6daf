//! Refcount block entries: `1 << refcount_order` bits each (1 to 64), packed into a
//! cluster-sized block. Sub-byte entries count bit 0 as the least significant bit of a byte;
//! entries of 8 bits or more are big-endian.

use crate::engine::error::{Error, Result};
use crate::engine::format::bytes::BeBytes;

/// The geometry of refcounts in one image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefcountGeometry {
    pub refcount_order: u32,
    pub cluster_bits: u32,
}

impl RefcountGeometry {
    pub fn refcount_bits(self) -> u32 {
        1 << self.refcount_order
    }

    /// The largest refcount an entry can hold.
    pub fn max_refcount(self) -> u64 {
        if self.refcount_bits() == 64 {
            u64::MAX
        } else {
            (1u64 << self.refcount_bits()) - 1
        }
    }

    /// log2 of the number of entries in one refcount block.
    pub fn entries_per_block_bits(self) -> u32 {
        self.cluster_bits + 3 - self.refcount_order
    }

    pub fn entries_per_block(self) -> u64 {
        1u64 << self.entries_per_block_bits()
    }

    /// (refcount table index, index inside the block) of a host cluster.
    pub fn locate(self, host_cluster: u64) -> (u64, u64) {
        let bits = self.entries_per_block_bits();
        (host_cluster >> bits, host_cluster & ((1u64 << bits) - 1))
    }

    /// Reads entry `index` of `block`; an index outside the block is an error (callers
    /// pass indices from [`Self::locate`], so it would be a bug, reported with context).
    pub fn get(self, block: &[u8], index: u64) -> Result<u64> {
        let bits = u64::from(self.refcount_bits());
        let (at, width) = self.byte_range(block, index)?;
        let bytes = BeBytes::new("a refcount block", block).slice(at, width)?;
        if bits < 8 {
            let shift = (index * bits) % 8;
            Ok((u64::from(bytes[0]) >> shift) & ((1u64 << bits) - 1))
        } else {
            Ok(bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
        }
    }

    /// Writes entry `index` of `block`; `value` must not exceed [`Self::max_refcount`].
    pub fn set(self, block: &mut [u8], index: u64, value: u64) -> Result<()> {
        let bits = u64::from(self.refcount_bits());
        let (at, width) = self.byte_range(block, index)?;
        let bytes = &mut block[at..at + width];
        if bits < 8 {
            let shift = (index * bits) % 8;
            let mask = (((1u64 << bits) - 1) << shift) as u8;
            bytes[0] = (bytes[0] & !mask) | (((value << shift) as u8) & mask);
        } else {
            bytes.copy_from_slice(&value.to_be_bytes()[8 - width..]);
        }
        Ok(())
    }

    /// The bytes that hold entry `index` of `block`, checked to lie inside it.
    fn byte_range(self, block: &[u8], index: u64) -> Result<(usize, usize)> {
        let bits = u64::from(self.refcount_bits());
        let width = bits.div_ceil(8) as usize;
        let at = usize::try_from(index.saturating_mul(bits) / 8).unwrap_or(usize::MAX);
        if at.checked_add(width).is_none_or(|end| end > block.len()) {
            return Err(Error::Invalid(format!(
                "refcount entry {index} lies past the end of its block ({} bytes)",
                block.len()
            )));
        }
        Ok((at, width))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips_without_touching_neighbours() {
        for order in 0..=6 {
            let g = RefcountGeometry {
                refcount_order: order,
                cluster_bits: 9,
            };
            let mut block = vec![0u8; 512];
            let n = g.entries_per_block();
            for i in 0..n {
                g.set(&mut block, i, i % (g.max_refcount().min(1000) + 1))
                    .unwrap();
            }
            for i in 0..n {
                assert_eq!(
                    g.get(&block, i).unwrap(),
                    i % (g.max_refcount().min(1000) + 1),
                    "order {order}"
                );
            }
            g.set(&mut block, 3, g.max_refcount()).unwrap();
            assert_eq!(g.get(&block, 3).unwrap(), g.max_refcount());
            assert!(g.get(&block, n).is_err() && g.set(&mut block, n, 1).is_err());
            assert_eq!(
                g.get(&block, 2).unwrap(),
                2 % (g.max_refcount().min(1000) + 1)
            );
        }
    }

    #[test]
    fn sixteen_bit_is_big_endian() {
        let g = RefcountGeometry {
            refcount_order: 4,
            cluster_bits: 9,
        };
        let mut block = vec![0u8; 512];
        g.set(&mut block, 1, 0x0102).unwrap();
        assert_eq!(&block[..4], &[0, 0, 1, 2]);
        assert_eq!(g.locate(256 + 5), (1, 5));
    }
}
