//! Where the image's metadata lives, so that nothing an untrusted image says can make the
//! engine write guest data over metadata, use a table as another kind of table, or free a
//! cluster that holds metadata (QEMU's qcow2 "overlap check", here always on and cheap).
//!
//! Three kinds of metadata:
//! - fixed regions: the header cluster, the active L1 table, the refcount table, the snapshot
//!   table and each snapshot's L1 table (validated at open, moved by resize and refcount
//!   table growth);
//! - refcount blocks, as the refcount table names them;
//! - active L2 tables, as the active L1 table names them.
//!
//! The image keeps the map current where it changes those tables (`metadata.rs`,
//! `writeback.rs`, `resize.rs`, `rebuild.rs`) and asks it:
//! - before using a table an entry names (an L2 table must not be a fixed region or a
//!   refcount block; a refcount block must not be a fixed region or an L2 table);
//! - before guest data is read from or written to a host cluster (none of the three);
//! - before a host cluster's refcount drops (none of the three).

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};

use crate::engine::format::entry::{L1Entry, ReftableEntry};
use crate::engine::format::layout::Region;

#[derive(Debug)]
pub(in crate::engine) struct MetadataMap {
    cluster_size: u64,
    /// Fixed regions by start offset; never overlapping (overlapping ones are merged).
    regions: BTreeMap<u64, Region>,
    /// Offsets of refcount blocks.
    refblocks: BTreeSet<u64>,
    /// Offsets of active L2 tables, with how many L1 entries name each (a damaged image may
    /// name one twice).
    l2_tables: BTreeMap<u64, u32>,
    /// Offsets of the L2 tables the snapshots' L1 tables name (QEMU's "inactive L2" overlap
    /// check, which qcow2 runs with overlap-check=all): guest data is never written over
    /// one in place, though a damaged entry may still be read from it.
    inactive_l2_tables: BTreeSet<u64>,
    /// The last L2 table offset [`Self::l2_table_conflict`] found clear: every lookup of a
    /// guest cluster asks about the same few tables, and only a fixed region or a refcount
    /// block added since can change the answer. INVARIANT: cleared wherever one is added
    /// (`insert_region`, `add_refblock`, `reload_tables`); removals cannot make a clear
    /// table overlap anything.
    l2_table_clear: Cell<Option<u64>>,
    /// A stretch of the file [`Self::metadata_at`] last found to hold no metadata, from the
    /// end of what lies before it to the start of what follows: guest clusters sit side by
    /// side, so most checks fall inside the last one. INVARIANT: cleared wherever metadata
    /// is added, as `l2_table_clear` is (`add_l2_table` too).
    clear_gap: Cell<Option<(u64, u64)>>,
}

/// Whether a one-cluster table at some offset in `set` overlaps `[start, end)`.
fn any_table_in<V>(
    set: impl Fn(std::ops::Range<u64>) -> Option<V>,
    cluster_size: u64,
    start: u64,
    end: u64,
) -> bool {
    // A table at t covers [t, t + cluster_size): it overlaps iff start - cluster_size < t < end.
    let from = start.saturating_sub(cluster_size - 1);
    from < end && set(from..end).is_some()
}

impl MetadataMap {
    pub fn new(regions: Vec<Region>, cluster_size: u64) -> MetadataMap {
        let mut map = MetadataMap {
            cluster_size,
            regions: BTreeMap::new(),
            refblocks: BTreeSet::new(),
            l2_tables: BTreeMap::new(),
            inactive_l2_tables: BTreeSet::new(),
            l2_table_clear: Cell::new(None),
            clear_gap: Cell::new(None),
        };
        for r in regions {
            map.insert_region(r);
        }
        map
    }

    /// Adds a region, merging it with any region it overlaps.
    fn insert_region(&mut self, mut r: Region) {
        self.forget_clear();
        while let Some((&start, &other)) = self.regions.range(..r.end).next_back() {
            if other.end <= r.start {
                break;
            }
            self.regions.remove(&start);
            r = Region {
                name: if other.start <= r.start {
                    other.name
                } else {
                    r.name
                },
                start: r.start.min(other.start),
                end: r.end.max(other.end),
            };
        }
        self.regions.insert(r.start, r);
    }

    /// Metadata was added: what was found clear must be looked at again.
    fn forget_clear(&mut self) {
        self.l2_table_clear.set(None);
        self.clear_gap.set(None);
    }

    /// The fixed regions, in file order.
    pub fn regions(&self) -> impl Iterator<Item = &Region> {
        self.regions.values()
    }

    /// Moves the region called `name` (the L1 table after a resize, the refcount table after
    /// it grew or was rebuilt).
    pub fn move_region(&mut self, name: &'static str, start: u64, end: u64) {
        self.regions.retain(|_, r| r.name != name);
        self.insert_region(Region { name, start, end });
    }

    /// Replaces every region called `name` with `regions` (each snapshot's L1 table, after
    /// the snapshot table changed).
    pub fn replace_regions(
        &mut self,
        name: &'static str,
        regions: impl IntoIterator<Item = Region>,
    ) {
        self.regions.retain(|_, r| r.name != name);
        for r in regions {
            self.insert_region(r);
        }
    }

    /// Removes the region called `name` (the snapshot table, once no snapshot is left).
    pub fn remove_region(&mut self, name: &'static str) {
        self.regions.retain(|_, r| r.name != name);
    }

    /// Replaces the refcount blocks and active L2 tables with what `reftable` and `l1` name
    /// (entries that do not decode are left out: using them fails anyway).
    pub fn reload_tables(&mut self, l1: &[u64], reftable: &[u64]) {
        self.forget_clear();
        self.refblocks.clear();
        self.l2_tables.clear();
        for (i, &raw) in reftable.iter().enumerate() {
            if let Ok(offset @ 1..) =
                ReftableEntry(raw).refblock_offset(self.cluster_size, i as u64)
            {
                self.refblocks.insert(offset);
            }
        }
        for (i, &raw) in l1.iter().enumerate() {
            if let Ok(offset @ 1..) = L1Entry(raw).l2_offset(self.cluster_size, i as u64) {
                self.add_l2_table(offset);
            }
        }
    }

    pub fn add_refblock(&mut self, offset: u64) {
        self.forget_clear();
        self.refblocks.insert(offset);
    }

    pub fn remove_refblock(&mut self, offset: u64) {
        self.refblocks.remove(&offset);
    }

    pub fn add_l2_table(&mut self, offset: u64) {
        self.clear_gap.set(None);
        *self.l2_tables.entry(offset).or_insert(0) += 1;
    }

    pub fn remove_l2_table(&mut self, offset: u64) {
        if let Some(n) = self.l2_tables.get_mut(&offset) {
            *n -= 1;
            if *n == 0 {
                self.l2_tables.remove(&offset);
            }
        }
    }

    /// Replaces the snapshots' L2 tables with `offsets`.
    pub fn set_inactive_l2_tables(&mut self, offsets: BTreeSet<u64>) {
        self.inactive_l2_tables = offsets;
    }

    /// Whether a snapshot's L2 table overlaps `[start, end)`.
    pub fn inactive_l2_table_at(&self, start: u64, end: u64) -> bool {
        any_table_in(
            |r| self.inactive_l2_tables.range(r).next().copied(),
            self.cluster_size,
            start,
            end,
        )
    }

    /// The fixed region overlapping `[start, end)`, if any.
    pub fn fixed_region_at(&self, start: u64, end: u64) -> Option<&'static str> {
        let (_, r) = self.regions.range(..end).next_back()?;
        (r.end > start).then_some(r.name)
    }

    /// What an L2 table at `offset` would overlap that it must not: a fixed region or a
    /// refcount block (an L2 table may be named twice by a damaged L1 table: its readers
    /// cope).
    pub fn l2_table_conflict(&self, offset: u64) -> Option<&'static str> {
        if self.l2_table_clear.get() == Some(offset) {
            return None;
        }
        let end = offset + self.cluster_size;
        let conflict = self
            .fixed_region_at(offset, end)
            .or_else(|| self.refblock_at(offset, end).then_some("a refcount block"));
        if conflict.is_none() {
            self.l2_table_clear.set(Some(offset));
        }
        conflict
    }

    pub fn refblock_at(&self, start: u64, end: u64) -> bool {
        any_table_in(
            |r| self.refblocks.range(r).next().copied(),
            self.cluster_size,
            start,
            end,
        )
    }

    pub fn l2_table_at(&self, start: u64, end: u64) -> bool {
        any_table_in(
            |r| self.l2_tables.range(r).next().map(|(&k, _)| k),
            self.cluster_size,
            start,
            end,
        )
    }

    /// `name` as the object of "overlaps": fixed regions take "the", the tables found by
    /// [`Self::metadata_at`] carry their own article ("a refcount block", "an L2 table").
    pub fn definite(name: &str) -> std::borrow::Cow<'_, str> {
        if name.starts_with("a ") || name.starts_with("an ") {
            name.into()
        } else {
            format!("the {name}").into()
        }
    }

    /// What metadata overlaps `[start, end)`, if any: where guest data must never be.
    pub fn metadata_at(&self, start: u64, end: u64) -> Option<&'static str> {
        if self
            .clear_gap
            .get()
            .is_some_and(|(from, to)| from <= start && end <= to)
        {
            return None;
        }
        let found = self
            .fixed_region_at(start, end)
            .or_else(|| self.refblock_at(start, end).then_some("a refcount block"))
            .or_else(|| self.l2_table_at(start, end).then_some("an L2 table"));
        if found.is_none() {
            self.clear_gap.set(Some(self.gap_around(start, end)));
        }
        found
    }

    /// The stretch around `[start, end)`, which holds no metadata, up to the metadata on
    /// either side of it.
    fn gap_around(&self, start: u64, end: u64) -> (u64, u64) {
        let cs = self.cluster_size;
        let tables_before = [
            self.refblocks.range(..end).next_back().copied(),
            self.l2_tables.range(..end).next_back().map(|(&t, _)| t),
        ];
        let tables_after = [
            self.refblocks.range(end..).next().copied(),
            self.l2_tables.range(end..).next().map(|(&t, _)| t),
        ];
        let from = tables_before
            .into_iter()
            .flatten()
            .map(|t| t.saturating_add(cs))
            .chain(self.regions.range(..end).next_back().map(|(_, r)| r.end))
            .fold(0, u64::max);
        let to = tables_after
            .into_iter()
            .flatten()
            .chain(self.regions.range(end..).next().map(|(&s, _)| s))
            .fold(u64::MAX, u64::min);
        (from.min(start), to.max(end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = 0x10000;

    fn map() -> MetadataMap {
        let mut m = MetadataMap::new(
            vec![
                Region {
                    name: "header",
                    start: 0,
                    end: CS,
                },
                Region {
                    name: "L1 table",
                    start: 3 * CS,
                    end: 4 * CS,
                },
                Region {
                    name: "snapshot L1 table",
                    start: 10 * CS,
                    end: 12 * CS,
                },
                Region {
                    name: "snapshot L1 table",
                    start: 11 * CS,
                    end: 13 * CS,
                },
            ],
            CS,
        );
        m.add_refblock(2 * CS);
        m.add_l2_table(5 * CS);
        m
    }

    #[test]
    fn every_kind_is_found_at_any_overlap_and_nothing_beside_it() {
        let m = map();
        assert_eq!(m.metadata_at(100, 200), Some("header"));
        assert_eq!(
            m.metadata_at(2 * CS + 8, 2 * CS + 16),
            Some("a refcount block")
        );
        assert_eq!(m.metadata_at(CS, 3 * CS), Some("a refcount block"));
        assert_eq!(m.metadata_at(4 * CS - 1, 4 * CS), Some("L1 table"));
        assert_eq!(m.metadata_at(5 * CS, 6 * CS), Some("an L2 table"));
        assert_eq!(m.metadata_at(6 * CS - 1, 7 * CS), Some("an L2 table"));
        assert_eq!(m.metadata_at(4 * CS, 5 * CS), None);
        assert_eq!(m.metadata_at(6 * CS, 10 * CS), None);
        assert_eq!(
            m.metadata_at(12 * CS + 5, 12 * CS + 6),
            Some("snapshot L1 table")
        );
        assert_eq!(m.metadata_at(13 * CS, 14 * CS), None);
    }

    #[test]
    fn moved_regions_and_tables_follow() {
        let mut m = map();
        m.move_region("L1 table", 20 * CS, 21 * CS);
        assert_eq!(m.metadata_at(3 * CS, 4 * CS), None);
        assert_eq!(m.metadata_at(20 * CS, 20 * CS + 1), Some("L1 table"));
        m.add_l2_table(5 * CS);
        m.remove_l2_table(5 * CS);
        assert!(
            m.l2_table_at(5 * CS, 6 * CS),
            "still named by another L1 entry"
        );
        m.remove_l2_table(5 * CS);
        assert!(!m.l2_table_at(5 * CS, 6 * CS));
    }

    /// An L2 table found clear is remembered, and whatever is placed over it since is still
    /// found: a refcount block, a moved region, tables reloaded from another L1.
    #[test]
    fn an_l2_table_found_clear_is_asked_again_after_metadata_lands_on_it() {
        let mut m = map();
        assert_eq!(m.l2_table_conflict(6 * CS), None);
        assert_eq!(m.l2_table_conflict(6 * CS), None, "remembered");
        m.add_refblock(6 * CS);
        assert_eq!(m.l2_table_conflict(6 * CS), Some("a refcount block"));
        assert_eq!(m.l2_table_conflict(7 * CS), None);
        m.move_region("L1 table", 7 * CS, 8 * CS);
        assert_eq!(m.l2_table_conflict(7 * CS), Some("L1 table"));
        assert_eq!(m.l2_table_conflict(8 * CS), None);
        m.reload_tables(&[], &[8 * CS]);
        assert_eq!(m.l2_table_conflict(8 * CS), Some("a refcount block"));
        assert_eq!(m.l2_table_conflict(CS / 2), Some("header"));
    }

    /// A stretch found clear is remembered, and metadata placed in it since is still found.
    #[test]
    fn metadata_placed_where_guest_data_was_found_clear_is_found() {
        let mut m = map();
        assert_eq!(m.metadata_at(7 * CS, 8 * CS), None);
        assert_eq!(m.clear_gap.get(), Some((6 * CS, 10 * CS)));
        assert_eq!(
            m.metadata_at(9 * CS, 10 * CS),
            None,
            "inside the remembered stretch"
        );
        m.add_l2_table(8 * CS);
        assert_eq!(m.metadata_at(8 * CS + 1, 8 * CS + 2), Some("an L2 table"));
        assert_eq!(m.metadata_at(9 * CS, 10 * CS), None);
        m.add_refblock(9 * CS);
        assert_eq!(m.metadata_at(9 * CS, 10 * CS), Some("a refcount block"));
        assert_eq!(m.metadata_at(13 * CS, 14 * CS), None);
        m.move_region("L1 table", 20 * CS, 21 * CS);
        assert_eq!(m.metadata_at(20 * CS, 20 * CS + 1), Some("L1 table"));
        assert_eq!(m.metadata_at(40 * CS, 41 * CS), None);
        m.reload_tables(&[41 * CS], &[]);
        assert_eq!(m.metadata_at(40 * CS, 41 * CS + 1), Some("an L2 table"));
    }
}
