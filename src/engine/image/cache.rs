//! A write-back cache of cluster-sized metadata tables (L2 tables, refcount blocks), keyed by
//! the table's host offset, with least-recently-used eviction.
//!
//! The cache only holds bytes and dirty marks; it never does I/O. Loading, writing back and
//! the order of write-back belong to [`crate::engine::image`] (see `Image::write_back`), so the
//! ordering rules live in one place. A dirty table is never dropped: the image writes the
//! caches back before evicting one (see [`TableCache::victim`]).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes cluster offsets (the only keys here) with one multiplication: they are distinct
/// multiples of the cluster size, so a Fibonacci hash spreads them well, at a fraction of the
/// default hasher's cost (this runs on every guest request).
#[derive(Default)]
struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (v >> 9).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type OffsetMap = HashMap<u64, usize, BuildHasherDefault<OffsetHasher>>;

#[derive(Debug)]
struct Slot {
    host_offset: u64,
    bytes: Vec<u8>,
    dirty: bool,
    last_used: u64,
}

#[derive(Debug)]
pub struct TableCache {
    capacity_tables: usize,
    slots: Vec<Slot>,
    by_offset: OffsetMap,
    clock: u64,
    /// The clock at the last [`Self::drop_unused`]: tables not used since are idle.
    cleaned_at: u64,
}

impl TableCache {
    /// A cache holding at most `capacity_tables` tables (at least 2).
    pub fn new(capacity_tables: usize) -> TableCache {
        TableCache {
            capacity_tables: capacity_tables.max(2),
            slots: Vec::new(),
            by_offset: OffsetMap::default(),
            clock: 0,
            cleaned_at: 0,
        }
    }

    /// Holds at most `capacity_tables` tables (at least 2) from now on; the least recently
    /// used clean tables beyond it are dropped. Dirty ones stay until written back (the
    /// caller writes back first to shrink below them).
    pub fn set_capacity(&mut self, capacity_tables: usize) {
        self.capacity_tables = capacity_tables.max(2);
        while self.slots.len() > self.capacity_tables {
            let Some(oldest_clean) = self
                .slots
                .iter()
                .filter(|s| !s.dirty)
                .min_by_key(|s| s.last_used)
                .map(|s| s.host_offset)
            else {
                break;
            };
            self.evict(oldest_clean);
        }
        self.slots.shrink_to_fit();
    }

    /// Drops the clean tables not used since the previous call and gives their memory back
    /// (QEMU's `cache-clean-interval`: called once per interval). Returns how many went.
    pub fn drop_unused(&mut self) -> usize {
        let idle: Vec<u64> = self
            .slots
            .iter()
            .filter(|s| !s.dirty && s.last_used <= self.cleaned_at)
            .map(|s| s.host_offset)
            .collect();
        for &host_offset in &idle {
            self.evict(host_offset);
        }
        if !idle.is_empty() {
            self.slots.shrink_to_fit();
        }
        self.cleaned_at = self.clock;
        idle.len()
    }

    /// Tables held now.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn capacity_tables(&self) -> usize {
        self.capacity_tables
    }

    pub fn contains(&self, host_offset: u64) -> bool {
        self.by_offset.contains_key(&host_offset)
    }

    fn touch(&mut self, index: usize) -> Option<&mut Slot> {
        self.clock += 1;
        let clock = self.clock;
        let slot = self.slots.get_mut(index)?;
        slot.last_used = clock;
        Some(slot)
    }

    /// The table at `host_offset`, if cached.
    pub fn get(&mut self, host_offset: u64) -> Option<&[u8]> {
        let index = *self.by_offset.get(&host_offset)?;
        self.touch(index).map(|s| &s.bytes[..])
    }

    /// The table at `host_offset` for modification; marks it dirty.
    pub fn get_mut(&mut self, host_offset: u64) -> Option<&mut [u8]> {
        let index = *self.by_offset.get(&host_offset)?;
        let slot = self.touch(index)?;
        slot.dirty = true;
        Some(&mut slot.bytes[..])
    }

    /// Whether inserting a new table needs an eviction, and if so whether the table to evict
    /// is dirty (the caller must write back first).
    pub fn victim(&self) -> Option<(u64, bool)> {
        if self.slots.len() < self.capacity_tables {
            return None;
        }
        self.slots
            .iter()
            .min_by_key(|s| s.last_used)
            .map(|s| (s.host_offset, s.dirty))
    }

    /// Drops a table, dirty or not, and returns its bytes: for a caller that moves the
    /// content to another cluster (a transaction group taking over a table, `txg.rs`).
    pub fn take(&mut self, host_offset: u64) -> Option<Vec<u8>> {
        let index = self.by_offset.remove(&host_offset)?;
        let slot = self.slots.swap_remove(index);
        if let Some(moved) = self.slots.get(index) {
            self.by_offset.insert(moved.host_offset, index);
        }
        Some(slot.bytes)
    }

    /// Drops a clean table. Refuses (returns false) for a dirty one.
    pub fn evict(&mut self, host_offset: u64) -> bool {
        let Some(&index) = self.by_offset.get(&host_offset) else {
            return true;
        };
        if self.slots.get(index).is_some_and(|s| s.dirty) {
            return false;
        }
        self.by_offset.remove(&host_offset);
        self.slots.swap_remove(index);
        if let Some(moved) = self.slots.get(index) {
            self.by_offset.insert(moved.host_offset, index);
        }
        true
    }

    /// Adds a table (after the caller made room with [`Self::victim`]/[`Self::evict`]).
    pub fn insert(&mut self, host_offset: u64, bytes: Vec<u8>, dirty: bool) {
        self.clock += 1;
        if let Some(&index) = self.by_offset.get(&host_offset) {
            if let Some(slot) = self.slots.get_mut(index) {
                *slot = Slot {
                    host_offset,
                    bytes,
                    dirty,
                    last_used: self.clock,
                };
            }
            return;
        }
        self.by_offset.insert(host_offset, self.slots.len());
        self.slots.push(Slot {
            host_offset,
            bytes,
            dirty,
            last_used: self.clock,
        });
    }

    /// Drops every clean table (after the tables in use changed wholesale: a snapshot
    /// applied or deleted, whose freed tables must not stay cached). Returns how many went.
    pub fn evict_clean(&mut self) -> usize {
        let clean: Vec<u64> = self
            .slots
            .iter()
            .filter(|s| !s.dirty)
            .map(|s| s.host_offset)
            .collect();
        clean.iter().filter(|&&o| self.evict(o)).count()
    }

    /// Host offsets of the dirty tables, in ascending order (so write-back is sequential).
    pub fn dirty_offsets(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .slots
            .iter()
            .filter(|s| s.dirty)
            .map(|s| s.host_offset)
            .collect();
        v.sort_unstable();
        v
    }

    pub fn has_dirty(&self) -> bool {
        self.slots.iter().any(|s| s.dirty)
    }

    /// The bytes of a dirty table to write back; the caller calls [`Self::mark_clean`] once
    /// the write succeeded.
    pub fn peek(&self, host_offset: u64) -> Option<&[u8]> {
        let index = *self.by_offset.get(&host_offset)?;
        self.slots.get(index).map(|s| &s.bytes[..])
    }

    pub fn mark_clean(&mut self, host_offset: u64) {
        if let Some(&index) = self.by_offset.get(&host_offset) {
            if let Some(slot) = self.slots.get_mut(index) {
                slot.dirty = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_is_the_victim_and_dirty_tables_are_not_dropped() {
        let mut c = TableCache::new(2);
        c.insert(512, vec![1], false);
        c.insert(1024, vec![2], true);
        assert!(c.get(512).is_some());
        assert_eq!(c.victim(), Some((1024, true)));
        assert!(!c.evict(1024));
        c.mark_clean(1024);
        assert!(c.evict(1024));
        assert_eq!(c.victim(), None);
        assert_eq!(c.get(512), Some(&[1u8][..]));
    }

    #[test]
    fn a_clean_drops_only_clean_tables_unused_since_the_previous_clean() {
        let mut c = TableCache::new(8);
        c.insert(512, vec![1], false);
        c.insert(1024, vec![2], true);
        c.insert(1536, vec![3], false);
        // The first clean after use drops nothing: every table was used since "the start".
        assert_eq!(c.drop_unused(), 0);
        assert!(c.get(1536).is_some());
        // 512 was idle for a whole interval; 1024 too, but it is dirty; 1536 was used.
        assert_eq!(c.drop_unused(), 1);
        assert!(!c.contains(512));
        assert!(c.contains(1024) && c.contains(1536));
        c.mark_clean(1024);
        assert_eq!(c.drop_unused(), 2);
        assert!(c.is_empty());
    }

    #[test]
    fn shrinking_the_capacity_drops_the_least_recently_used_clean_tables() {
        let mut c = TableCache::new(4);
        for (i, offset) in [512u64, 1024, 1536, 2048].into_iter().enumerate() {
            c.insert(offset, vec![i as u8], offset == 1024);
        }
        c.get(512);
        c.set_capacity(2);
        // 1024 is dirty and stays; of the clean ones 512 was used last.
        assert_eq!(c.len(), 2);
        assert!(c.contains(512) && c.contains(1024));
        assert_eq!(c.capacity_tables(), 2);
    }
}
