//! Refcount block entries: `1 << refcount_order` bits each (1 to 64), packed into a
//! cluster-sized block. Sub-byte entries count bit 0 as the least significant bit of a byte;
//! entries of 8 bits or more are big-endian.

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

    /// Reads entry `index` of `block`. An index outside the block reads as 0 (callers only
    /// pass indices from [`Self::locate`]).
    pub fn get(self, block: &[u8], index: u64) -> u64 {
        let bits = self.refcount_bits() as u64;
        if bits < 8 {
            let bit_pos = index * bits;
            let byte = block.get((bit_pos / 8) as usize).copied().unwrap_or(0);
            let shift = bit_pos % 8;
            (u64::from(byte) >> shift) & ((1u64 << bits) - 1)
        } else {
            let width = (bits / 8) as usize;
            let start = index as usize * width;
            let Some(bytes) = block.get(start..start + width) else {
                return 0;
            };
            bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
        }
    }

    /// Writes entry `index` of `block`; `value` must not exceed [`Self::max_refcount`].
    pub fn set(self, block: &mut [u8], index: u64, value: u64) {
        let bits = self.refcount_bits() as u64;
        if bits < 8 {
            let bit_pos = index * bits;
            let shift = bit_pos % 8;
            let mask = (((1u64 << bits) - 1) << shift) as u8;
            if let Some(byte) = block.get_mut((bit_pos / 8) as usize) {
                *byte = (*byte & !mask) | (((value << shift) as u8) & mask);
            }
        } else {
            let width = (bits / 8) as usize;
            let start = index as usize * width;
            if let Some(bytes) = block.get_mut(start..start + width) {
                let be = value.to_be_bytes();
                bytes.copy_from_slice(&be[8 - width..]);
            }
        }
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
                g.set(&mut block, i, i % (g.max_refcount().min(1000) + 1));
            }
            for i in 0..n {
                assert_eq!(
                    g.get(&block, i),
                    i % (g.max_refcount().min(1000) + 1),
                    "order {order}"
                );
            }
            g.set(&mut block, 3, g.max_refcount());
            assert_eq!(g.get(&block, 3), g.max_refcount());
            assert_eq!(g.get(&block, 2), 2 % (g.max_refcount().min(1000) + 1));
        }
    }

    #[test]
    fn sixteen_bit_is_big_endian() {
        let g = RefcountGeometry {
            refcount_order: 4,
            cluster_bits: 9,
        };
        let mut block = vec![0u8; 512];
        g.set(&mut block, 1, 0x0102);
        assert_eq!(&block[..4], &[0, 0, 1, 2]);
        assert_eq!(g.locate(256 + 5), (1, 5));
    }
}
