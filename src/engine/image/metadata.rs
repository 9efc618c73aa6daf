//! The metadata side of the engine: guest cluster lookup through L1/L2, making L2 tables
//! writable (allocation and copy-on-write), refcounts and the cluster allocator.
//!
//! Every change here lands in memory (the L1 and refcount tables) or in the caches; nothing
//! is written to storage except through `writeback.rs` (cache evictions go there too).

use crate::engine::debug_event::DebugEvent;
use crate::engine::error::{Error, Result};
use crate::engine::format::bytes;
use crate::engine::format::entry::{
    Cluster, L1Entry, L2Entry, L2Width, ReftableEntry, Subcluster, SubclusterBitmap,
};
use crate::engine::image::discard::FreeKind;
use crate::engine::image::overlap::MetadataMap;
use crate::engine::image::Image;
use crate::engine::storage::Storage;

/// A table the caller just loaded is not in its cache: a bug, reported as damage.
pub(in crate::engine) fn not_cached(what: &str, offset: u64) -> Error {
    Error::Corrupt(format!("{what} {offset:#x} vanished from the cache"))
}

impl<S: Storage> Image<S> {
    /// Entry `l2_index` of the L2 table at `l2_offset` (which the caller loaded into the
    /// cache) as stored: the raw entry (descriptor) and, with extended L2 entries,
    /// its subcluster bitmap ([`SubclusterBitmap::EMPTY`] with standard ones).
    pub(in crate::engine) fn cached_l2_slot(
        &self,
        l2_offset: u64,
        l2_index: usize,
    ) -> Result<(u64, SubclusterBitmap)> {
        let table = self
            .l2_cache
            .peek(l2_offset)
            .ok_or_else(|| not_cached("L2 table", l2_offset))?;
        self.l2_slot_in(table, l2_offset, l2_index)
    }

    /// Entry `l2_index` of `table`, the bytes of the L2 table at `l2_offset` (cached or read
    /// for a walk): descriptor and bitmap, as [`Self::cached_l2_slot`] gives them.
    pub(in crate::engine) fn l2_slot_in(
        &self,
        table: &[u8],
        l2_offset: u64,
        l2_index: usize,
    ) -> Result<(u64, SubclusterBitmap)> {
        let what = format_args!("the L2 table at {l2_offset:#x}");
        let at = l2_index.saturating_mul(self.l2_width.words());
        let raw = bytes::table_entry(&what, table, at)?;
        let bitmap = match self.l2_width {
            L2Width::Standard => SubclusterBitmap::EMPTY,
            L2Width::Extended => {
                SubclusterBitmap(bytes::table_entry(&what, table, at.saturating_add(1))?)
            }
        };
        Ok((raw, bitmap))
    }

    /// log2 of the entries in one L2 table (a cluster of 8- or 16-byte entries).
    pub(in crate::engine) fn l2_bits(&self) -> u32 {
        self.cluster_bits - self.l2_width.entry_bits()
    }

    /// Decodes a raw entry (and, with extended L2 entries, its bitmap) of `guest_cluster`.
    pub(in crate::engine) fn decode_l2(
        &self,
        raw: u64,
        bitmap: SubclusterBitmap,
        guest_cluster: u64,
    ) -> Result<Cluster> {
        match self.l2_width {
            L2Width::Standard => {
                L2Entry(raw).decode(self.cluster_bits, self.header.version, guest_cluster)
            }
            L2Width::Extended => {
                L2Entry(raw).decode_extended(bitmap, self.cluster_bits, guest_cluster)
            }
        }
    }

    /// Refuses a host cluster offset (from an L1, L2 or refcount table entry) that points into
    /// the header or past the end of the file. `what` names it for the message (called only
    /// on failure: this runs on every lookup).
    pub(in crate::engine) fn check_host_offset(
        &self,
        host_offset: u64,
        what: impl FnOnce() -> String,
    ) -> Result<()> {
        if host_offset >= self.cluster_size() && host_offset < self.host_end {
            return Ok(());
        }
        let what = what();
        self.check_not_header(host_offset, || what.clone())?;
        if host_offset >= self.host_end {
            return Err(Error::Corrupt(format!(
                "{what} at {host_offset:#x} is beyond the end of the image file ({:#x})",
                self.host_end
            )));
        }
        Ok(())
    }

    /// Refuses a host cluster offset that points into the header (the first cluster).
    pub(in crate::engine) fn check_not_header(
        &self,
        host_offset: u64,
        what: impl FnOnce() -> String,
    ) -> Result<()> {
        if host_offset < self.cluster_size() {
            return Err(Error::Corrupt(format!(
                "{} at {host_offset:#x} points into the header",
                what()
            )));
        }
        Ok(())
    }

    /// The L2 table offset for guest cluster `guest_cluster` (0 if none), validated.
    pub(in crate::engine) fn l2_offset_for(
        &self,
        guest_cluster: u64,
    ) -> Result<(usize, L1Entry, u64)> {
        let l1_index = guest_cluster >> self.l2_bits();
        let raw = usize::try_from(l1_index)
            .ok()
            .and_then(|i| self.l1.get(i).map(|&e| (i, e)));
        let Some((i, raw)) = raw else {
            return Err(Error::Corrupt(format!(
                "guest cluster {guest_cluster} is beyond the L1 table ({} entries)",
                self.l1.len()
            )));
        };
        let entry = L1Entry(raw);
        let l2_offset = entry.l2_offset(self.cluster_size(), l1_index)?;
        if l2_offset != 0 {
            self.check_host_offset(l2_offset, || format!("L2 table of L1 entry {l1_index}"))?;
            if let Some(what) = self.metadata.l2_table_conflict(l2_offset) {
                return Err(Error::Corrupt(format!(
                    "the L2 table of L1 entry {l1_index} at {l2_offset:#x} overlaps {}",
                    MetadataMap::definite(what)
                )));
            }
        }
        Ok((i, entry, l2_offset))
    }

    /// Makes sure the L2 table at `l2_offset` is in the cache.
    pub(in crate::engine) fn load_l2(&mut self, l2_offset: u64) -> Result<()> {
        if self.l2_cache.contains(l2_offset) {
            return Ok(());
        }
        self.make_room_in_l2_cache()?;
        let mut bytes = vec![0u8; self.cluster_size() as usize];
        self.storage.debug_event(DebugEvent::L2Load);
        self.storage
            .read_at(l2_offset, &mut bytes)
            .map_err(|e| Error::io(format!("reading the L2 table at {l2_offset:#x}"), e))?;
        self.l2_cache.insert(l2_offset, bytes, false);
        Ok(())
    }

    /// Decodes and validates entry `l2_index` of the L2 table at `l2_offset`.
    pub(in crate::engine) fn l2_entry(
        &mut self,
        l2_offset: u64,
        l2_index: usize,
        guest_cluster: u64,
    ) -> Result<Cluster> {
        // A lookup counts as a use of the table for the cache's eviction order.
        if self.l2_cache.get(l2_offset).is_none() {
            self.load_l2(l2_offset)?;
        }
        let (raw, bitmap) = self.cached_l2_slot(l2_offset, l2_index)?;
        if self.data_file.is_some() {
            // Offsets name the data file: nothing here to check against the image file.
            return self.decode_data_file_entry(raw, guest_cluster);
        }
        let cluster = self.decode_l2(raw, bitmap, guest_cluster)?;
        let (host_offset, len, what) = match cluster {
            Cluster::Data { host_offset, .. } => (host_offset, self.cluster_size(), "data cluster"),
            Cluster::Zero { host_offset, .. } if host_offset != 0 => {
                (host_offset, self.cluster_size(), "preallocated cluster")
            }
            Cluster::Subclusters { host_offset, .. } if host_offset != 0 => {
                (host_offset, self.cluster_size(), "data cluster")
            }
            Cluster::Compressed {
                host_offset,
                max_len_bytes,
            } => (host_offset, max_len_bytes.max(1), "compressed data"),
            _ => return Ok(cluster),
        };
        let name = || format!("{what} of guest cluster {guest_cluster}");
        if matches!(cluster, Cluster::Compressed { .. }) {
            self.check_host_offset(host_offset, name)?;
        } else {
            self.check_not_header(host_offset, name)?;
        }
        // A data cluster past the end of the file (a file cut short outside of QEMU, iotest
        // 102) reads as zeros, as with QEMU's qcow2: the file child zero-fills reads past its
        // end. Writing into it needs its refcount (`check_data_target`).
        if let Some(holder) = self.metadata.metadata_at(host_offset, host_offset + len) {
            return Err(Error::Corrupt(format!(
                "the {what} of guest cluster {guest_cluster} at {host_offset:#x} overlaps {}",
                MetadataMap::definite(holder)
            )));
        }
        Ok(cluster)
    }

    /// Sets entry `l2_index` (of an extended entry: its descriptor) of the L2 table at
    /// `l2_offset`.
    pub(in crate::engine) fn set_l2_entry(
        &mut self,
        l2_offset: u64,
        l2_index: usize,
        entry: L2Entry,
    ) -> Result<()> {
        self.set_l2_word(l2_offset, l2_index, 0, entry.0)
    }

    /// Sets the subcluster bitmap of entry `l2_index` (an image with extended L2 entries;
    /// refused otherwise).
    pub(in crate::engine) fn set_l2_bitmap(
        &mut self,
        l2_offset: u64,
        l2_index: usize,
        bitmap: SubclusterBitmap,
    ) -> Result<()> {
        if self.l2_width != L2Width::Extended {
            return Err(Error::Invalid(
                "a subcluster bitmap in an image with standard L2 entries".into(),
            ));
        }
        self.set_l2_word(l2_offset, l2_index, 1, bitmap.0)
    }

    fn set_l2_word(&mut self, l2_offset: u64, l2_index: usize, word: usize, v: u64) -> Result<()> {
        self.load_l2(l2_offset)?;
        let at = l2_index
            .saturating_mul(self.l2_width.words())
            .saturating_add(word);
        let table = self
            .l2_cache
            .get_mut(l2_offset)
            .ok_or_else(|| not_cached("L2 table", l2_offset))?;
        bytes::set_table_entry(
            &format_args!("the L2 table at {l2_offset:#x}"),
            table,
            at,
            v,
        )
    }

    /// What backs guest cluster `guest_cluster`.
    pub(in crate::engine) fn cluster_at(&mut self, guest_cluster: u64) -> Result<Cluster> {
        let (_, _, l2_offset) = self.l2_offset_for(guest_cluster)?;
        if l2_offset == 0 {
            return Ok(Cluster::Unallocated);
        }
        let l2_index = (guest_cluster & ((1u64 << self.l2_bits()) - 1)) as usize;
        self.l2_entry(l2_offset, l2_index, guest_cluster)
    }

    /// What the bytes at `guest_offset` read from (the subcluster holding it, with extended
    /// L2 entries; the cluster otherwise), and how many bytes from there (at most `len`)
    /// share it: same kind, and for data, contiguous host clusters. A compressed run never
    /// extends past its cluster.
    pub(in crate::engine) fn lookup_run(
        &mut self,
        guest_offset: u64,
        len: u64,
    ) -> Result<(Subcluster, u64)> {
        let cluster_size = self.cluster_size();
        let first = guest_offset >> self.cluster_bits;
        let in_cluster = guest_offset & (cluster_size - 1);
        let (state, mut run) = self.cluster_at(first)?.at(in_cluster, self.cluster_bits);
        if !matches!(state, Subcluster::Compressed { .. }) {
            let mut next = first + 1;
            // A run continues into the next cluster only from the end of this one.
            while run < len && (guest_offset + run).is_multiple_of(cluster_size) {
                let (next_state, next_run) = self.cluster_at(next)?.at(0, self.cluster_bits);
                let same = match (state, next_state) {
                    (Subcluster::Unallocated, Subcluster::Unallocated) => true,
                    (Subcluster::Zero { host_offset: 0 }, Subcluster::Zero { host_offset: 0 }) => {
                        true
                    }
                    (Subcluster::Zero { host_offset: a }, Subcluster::Zero { host_offset: b }) => {
                        a != 0 && b == a + (next - first) * cluster_size
                    }
                    (Subcluster::Data { host_offset: a }, Subcluster::Data { host_offset: b }) => {
                        b == a + (next - first) * cluster_size
                    }
                    _ => false,
                };
                if !same {
                    break;
                }
                run += next_run;
                next += 1;
            }
        }
        Ok((state, run.min(len)))
    }

    /// The L2 table for `guest_cluster`, made writable: allocated if the L1 entry is empty,
    /// copied if it is shared (L1 entry without COPIED). Returns (table offset, entry index).
    pub(in crate::engine) fn l2_table_for_write(
        &mut self,
        guest_cluster: u64,
    ) -> Result<(u64, usize)> {
        let l2_index = (guest_cluster & ((1u64 << self.l2_bits()) - 1)) as usize;
        let (l1_index, l1_entry, old_offset) = self.l2_offset_for(guest_cluster)?;
        // In a transaction group a table of the durable image is copied too (`txg.rs`).
        if old_offset != 0 && l1_entry.copied() && self.may_overwrite(old_offset) {
            return Ok((old_offset, l2_index));
        }
        // A new table: zeros for a new L2 range, a copy of the shared one otherwise (its
        // entries keep their flags: the clusters they name were already counted once per
        // table referencing them when the snapshot was taken).
        let content = if old_offset == 0 {
            vec![0u8; self.cluster_size() as usize]
        } else {
            self.storage.debug_event(DebugEvent::L2AllocCowRead);
            self.load_l2(old_offset)?;
            self.l2_cache
                .get(old_offset)
                .map(|t| t.to_vec())
                .ok_or_else(|| not_cached("L2 table", old_offset))?
        };
        // A table for a range that had none reads as "all unallocated" while it is zeros, so a
        // reserved cluster needs no ordering before the L1 entry naming it (rule (c) of
        // writeback.rs); a copy of a shared table, or a table elsewhere, does.
        let from_reserve =
            old_offset == 0 && self.txg.is_none() && self.next_allocation_extends_file()?;
        let new_offset = if from_reserve {
            self.take_reserved(1)?.0
        } else {
            self.alloc_cluster()?
        };
        self.install_l2_table(
            l1_index,
            l1_entry,
            old_offset,
            new_offset,
            content,
            !from_reserve,
        )?;
        Ok((new_offset, l2_index))
    }

    /// A new, empty L2 table at `new_offset` (a cluster just allocated) for the range of
    /// `guest_cluster`, which has none: for callers that place tables themselves (a resize's
    /// preallocation puts each table before its clusters, as QEMU's qcow2 does).
    pub(in crate::engine) fn new_l2_table_at(
        &mut self,
        guest_cluster: u64,
        new_offset: u64,
    ) -> Result<()> {
        let (l1_index, l1_entry, old_offset) = self.l2_offset_for(guest_cluster)?;
        if old_offset != 0 {
            return Err(Error::Invalid(format!(
                "guest cluster {guest_cluster} has an L2 table already"
            )));
        }
        let content = vec![0u8; self.cluster_size() as usize];
        self.install_l2_table(l1_index, l1_entry, 0, new_offset, content, true)
    }

    /// Makes `content` the L2 table of L1 entry `l1_index` at `new_offset`, in place of the
    /// table at `old_offset` (0: none). `ordered`: the table must be written before the L1
    /// entry that names it, with an ordering point between (rule (c) of writeback.rs): a
    /// copy of a shared table, or a table that is not a zeroed reserve cluster.
    fn install_l2_table(
        &mut self,
        l1_index: usize,
        l1_entry: L1Entry,
        old_offset: u64,
        new_offset: u64,
        content: Vec<u8>,
        ordered: bool,
    ) -> Result<()> {
        if ordered {
            self.new_l2_tables_to_order.insert(new_offset);
        }
        self.make_room_in_l2_cache()?;
        // (c) The new table is only in the cache (dirty); write_back writes L2 tables before
        // L1 entries, with an ordering point between.
        self.l2_cache.insert(new_offset, content, true);
        if let Some(e) = self.l1.get_mut(l1_index) {
            *e = L1Entry::new_copied(new_offset).0;
        }
        self.l1_dirty.insert(l1_index);
        if old_offset != 0 {
            self.metadata.remove_l2_table(old_offset);
        }
        self.metadata.add_l2_table(new_offset);
        if old_offset != 0 {
            self.free_later([old_offset >> self.cluster_bits], FreeKind::Other);
            if l1_entry.copied() {
                // A transaction group's copy of the durable image's table (clean, as nothing
                // writes it): the old one is freed at the commit, so no cached copy outlives it.
                self.l2_cache.evict(old_offset);
            } else if self.header.nb_snapshots == 0 {
                // Without internal snapshots the other reference to a shared table is in the
                // active tables: write-back's stage 6 gives it COPIED once it is the last.
                self.copied_candidates.push(old_offset >> self.cluster_bits);
            }
        }
        Ok(())
    }

    /// The refcount block offset for refcount table index `rt_index` (0 if none).
    pub(in crate::engine) fn refblock_offset(&self, rt_index: u64) -> Result<Option<u64>> {
        let Some(&raw) = usize::try_from(rt_index)
            .ok()
            .and_then(|i| self.reftable.get(i))
        else {
            return Ok(None);
        };
        let offset = ReftableEntry(raw).refblock_offset(self.cluster_size(), rt_index)?;
        if offset != 0 {
            self.check_host_offset(offset, || format!("refcount block {rt_index}"))?;
            let end = offset + self.cluster_size();
            let other = self.metadata.fixed_region_at(offset, end).or_else(|| {
                self.metadata
                    .l2_table_at(offset, end)
                    .then_some("an L2 table")
            });
            if let Some(what) = other {
                return Err(Error::Corrupt(format!(
                    "refcount block {rt_index} at {offset:#x} overlaps {}",
                    MetadataMap::definite(what)
                )));
            }
        }
        Ok(Some(offset))
    }

    /// Makes sure the refcount block at `offset` is in the cache.
    pub(in crate::engine) fn load_refblock(&mut self, offset: u64) -> Result<()> {
        if self.refblock_cache.contains(offset) {
            return Ok(());
        }
        self.make_room_in_refblock_cache()?;
        let mut bytes = vec![0u8; self.cluster_size() as usize];
        self.storage.debug_event(DebugEvent::RefblockLoad);
        self.storage
            .read_at(offset, &mut bytes)
            .map_err(|e| Error::io(format!("reading the refcount block at {offset:#x}"), e))?;
        self.refblock_cache.insert(offset, bytes, false);
        Ok(())
    }

    /// The refcount of a host cluster (0 where no refcount block covers it).
    pub(in crate::engine) fn refcount(&mut self, host_cluster: u64) -> Result<u64> {
        let (rt_index, index) = self.rc.locate(host_cluster);
        match self.refblock_offset(rt_index)? {
            None | Some(0) => Ok(0),
            Some(offset) => {
                self.load_refblock(offset)?;
                let block = self
                    .refblock_cache
                    .get(offset)
                    .ok_or_else(|| not_cached("refcount block", offset))?;
                self.rc.get(block, index)
            }
        }
    }

    /// Sets the refcount of a host cluster whose refcount block exists.
    pub(in crate::engine) fn set_refcount(&mut self, host_cluster: u64, value: u64) -> Result<()> {
        let (rt_index, index) = self.rc.locate(host_cluster);
        let Some(offset) = self.refblock_offset(rt_index)?.filter(|&o| o != 0) else {
            return Err(Error::Corrupt(format!(
                "no refcount block for host cluster {host_cluster}"
            )));
        };
        if value > self.rc.max_refcount() {
            return Err(Error::Unsupported(format!(
                "refcount of host cluster {host_cluster} would overflow {} bits",
                self.rc.refcount_bits()
            )));
        }
        // In a transaction group a block of the durable image is copied first (`txg.rs`).
        // The cluster being counted is still free in that block: the copy must not take it.
        let offset = if self.may_overwrite(offset) {
            offset
        } else {
            let hold = !self.quarantine.contains_key(&host_cluster);
            if hold {
                self.quarantine.insert(host_cluster, u64::MAX);
            }
            let copied = self.cow_refblock(rt_index, offset);
            if hold {
                self.quarantine.remove(&host_cluster);
            }
            copied?
        };
        self.load_refblock(offset)?;
        let rc = self.rc;
        let block = self
            .refblock_cache
            .get_mut(offset)
            .ok_or_else(|| not_cached("refcount block", offset))?;
        rc.set(block, index, value)?;
        if value == 0 {
            // Free from now on: no compressed cluster may be packed into it any more.
            self.forget_compressed_tail_in(host_cluster);
        }
        Ok(())
    }

    /// The first host cluster at or after the hint that is free (refcount 0, not freed since
    /// the last flush). Clusters past the refcount table's reach count as free.
    pub(in crate::engine) fn find_free_cluster(&mut self) -> Result<u64> {
        let mut cluster = self.free_cluster_hint.max(1);
        loop {
            if self.quarantine.contains_key(&cluster) {
                cluster += 1;
                continue;
            }
            let (rt_index, first_index) = self.rc.locate(cluster);
            let offset = match self.refblock_offset(rt_index)? {
                None | Some(0) => return Ok(cluster),
                Some(offset) => offset,
            };
            self.load_refblock(offset)?;
            let per_block = self.rc.entries_per_block();
            let block_start = cluster - first_index;
            let rc = self.rc;
            let block = self
                .refblock_cache
                .get(offset)
                .ok_or_else(|| not_cached("refcount block", offset))?;
            let mut found = None;
            for i in first_index..per_block {
                if rc.get(block, i)? == 0 && !self.quarantine.contains_key(&(block_start + i)) {
                    found = Some(i);
                    break;
                }
            }
            match found {
                Some(i) => return Ok(block_start + i),
                None => cluster = block_start + per_block,
            }
        }
    }

    /// Allocates one host cluster (refcount 0 -> 1) and returns its offset. The refcount
    /// change stays in the cache: write_back writes it before any entry naming the cluster.
    pub(in crate::engine) fn alloc_cluster(&mut self) -> Result<u64> {
        self.storage.debug_event(DebugEvent::ClusterAlloc);
        let cluster_size = self.cluster_size();
        loop {
            let cluster = self.find_free_cluster()?;
            let host_offset = cluster
                .checked_mul(cluster_size)
                .filter(|&o| o & !crate::engine::format::entry::OFFSET_MASK == 0)
                .ok_or_else(|| Error::Unsupported("host offset beyond 2^56 bytes".into()))?;
            self.check_free_cluster_is_unused(host_offset)?;
            let (rt_index, index) = self.rc.locate(cluster);
            match self.refblock_offset(rt_index)? {
                None if self.txg.is_some() => {
                    // The group's refcount table is written whole at the commit.
                    self.grow_reftable_in_group(rt_index + 1);
                }
                None => {
                    // Past the refcount table's reach: every cluster from here on is free, so
                    // the new table and its blocks go here.
                    self.grow_reftable(rt_index + 1, cluster)?;
                }
                Some(0) => {
                    // No refcount block covers this cluster yet: the cluster becomes that block,
                    // inside the range it covers, and counts itself (the spec requires every
                    // used cluster, refcount blocks included, to be counted by some block).
                    self.storage.debug_event(DebugEvent::RefblockAlloc);
                    self.make_room_in_refblock_cache()?;
                    let mut block = vec![0u8; cluster_size as usize];
                    self.rc.set(&mut block, index, 1)?;
                    self.refblock_cache.insert(host_offset, block, true);
                    self.metadata.add_refblock(host_offset);
                    if let Some(e) = usize::try_from(rt_index)
                        .ok()
                        .and_then(|i| self.reftable.get_mut(i))
                    {
                        *e = host_offset;
                    }
                    self.reftable_dirty.insert(rt_index as usize);
                    self.note_allocated(cluster);
                }
                Some(_) => {
                    self.set_refcount(cluster, 1)?;
                    self.note_allocated(cluster);
                    return Ok(host_offset);
                }
            }
        }
    }

    /// Allocates up to `wanted` contiguous host clusters (at least one) and returns the
    /// offset of the first and how many were allocated. The run grows while the following
    /// clusters are free and counted by an existing refcount block.
    pub(in crate::engine) fn alloc_run(&mut self, wanted: u64) -> Result<(u64, u64)> {
        let first = self.alloc_cluster()?;
        let mut got = 1;
        while got < wanted && self.claim_if_free((first >> self.cluster_bits) + got)? {
            got += 1;
        }
        Ok((first, got))
    }

    /// Allocates host cluster `cluster` if it is free and an existing refcount block counts
    /// it; false otherwise (nothing changes).
    fn claim_if_free(&mut self, cluster: u64) -> Result<bool> {
        let Some(host_offset) = cluster
            .checked_mul(self.cluster_size())
            .filter(|&o| o & !crate::engine::format::entry::OFFSET_MASK == 0)
        else {
            return Ok(false);
        };
        if self.quarantine.contains_key(&cluster) {
            return Ok(false);
        }
        let (rt_index, _) = self.rc.locate(cluster);
        match self.refblock_offset(rt_index)? {
            None | Some(0) => Ok(false),
            Some(_) => {
                if self.refcount(cluster)? != 0
                    || self.check_free_cluster_is_unused(host_offset).is_err()
                {
                    return Ok(false);
                }
                self.set_refcount(cluster, 1)?;
                self.note_allocated(cluster);
                Ok(true)
            }
        }
    }

    /// (d) Makes freed host clusters reusable once a guest flush has ended the I/O epoch they
    /// were freed in, and no request planned in that epoch or earlier is still in flight (its
    /// data step may still touch them). Called only after a durability point; those that
    /// the discard policy passes stay until their discard was issued (`discard.rs`).
    pub(in crate::engine) fn release_quarantine(&mut self) {
        let limit = self.oldest_inflight_epoch().min(self.io_epoch);
        let mut quarantine = std::mem::take(&mut self.quarantine);
        let mut lowest = u64::MAX;
        quarantine.retain(|&cluster, &mut freed_in| {
            let keep = freed_in >= limit || self.held_for_discard(cluster);
            if !keep {
                lowest = lowest.min(cluster);
            }
            keep
        });
        self.quarantine = quarantine;
        self.free_cluster_hint = self.free_cluster_hint.min(lowest);
    }

    /// Allocates `count` contiguous host clusters past everything in use (for tables that
    /// must be contiguous) and returns the offset of the first.
    pub(in crate::engine) fn alloc_contiguous(&mut self, count: u64) -> Result<u64> {
        self.storage.debug_event(DebugEvent::ClusterAlloc);
        if !self.storage.is_growable() {
            return self.alloc_free_run(count);
        }
        let cluster_size = self.cluster_size();
        let mut start = self.host_end.div_ceil(cluster_size);
        let end = loop {
            let end = start
                .checked_add(count)
                .filter(|&e| {
                    e.checked_mul(cluster_size)
                        .is_some_and(|o| o & !crate::engine::format::entry::OFFSET_MASK == 0)
                })
                .ok_or_else(|| Error::Unsupported("host offset beyond 2^56 bytes".into()))?;
            // A crash may leave clusters past the end of the file counted (their refcount
            // reached the file, the write that extends it did not): leaked, never handed
            // out again; the range starts after them, as QEMU's qcow2 skips them too.
            let mut counted = None;
            for cluster in (start..end).rev() {
                if self.refcount(cluster)? != 0 {
                    counted = Some(cluster);
                    break;
                }
            }
            match counted {
                Some(cluster) => start = cluster + 1,
                None => break end,
            }
        };
        // Refcount blocks and tables this needs go after the range.
        self.host_end = end * cluster_size;
        self.free_cluster_hint = self.free_cluster_hint.max(end);
        for cluster in start..end {
            self.claim_cluster(cluster)?;
        }
        Ok(start * cluster_size)
    }

    /// `count` contiguous free host clusters on storage that cannot grow (a block device): the
    /// first free run long enough, below the end of the storage. Returns the first's offset.
    fn alloc_free_run(&mut self, count: u64) -> Result<u64> {
        let hint = self.free_cluster_hint;
        let end = self.host_end;
        let found = loop {
            let (first, got) = match self.alloc_run(count) {
                Ok(run) => run,
                Err(e) => break Err(e),
            };
            let first_cluster = first >> self.cluster_bits;
            if got == count && (first_cluster + count) << self.cluster_bits <= end {
                break Ok(first);
            }
            // Too short, or past the end: give it back (nothing names it) and look further.
            for cluster in first_cluster..first_cluster + got {
                self.set_refcount(cluster, 0)?;
            }
            if (first_cluster + got) << self.cluster_bits >= end {
                break Err(Error::io(
                    format!("finding {count} contiguous free clusters on a block device"),
                    std::io::Error::from_raw_os_error(libc::ENOSPC),
                ));
            }
            self.free_cluster_hint = first_cluster + got + 1;
        };
        self.free_cluster_hint = hint;
        found
    }

    /// Sets the refcount of a given free host cluster to 1, creating its refcount block (and
    /// growing the refcount table) elsewhere if needed.
    fn claim_cluster(&mut self, cluster: u64) -> Result<()> {
        loop {
            let (rt_index, _) = self.rc.locate(cluster);
            match self.refblock_offset(rt_index)? {
                Some(0) => {
                    self.storage.debug_event(DebugEvent::RefblockAlloc);
                    let block = self.alloc_cluster()?;
                    if self.refblock_offset(rt_index)? != Some(0) {
                        // Allocating made that very block (self-describing); give `block` back.
                        self.set_refcount(block >> self.cluster_bits, 0)?;
                        continue;
                    }
                    self.make_room_in_refblock_cache()?;
                    self.refblock_cache.insert(
                        block,
                        vec![0u8; self.cluster_size() as usize],
                        true,
                    );
                    if let Some(e) = usize::try_from(rt_index)
                        .ok()
                        .and_then(|i| self.reftable.get_mut(i))
                    {
                        *e = block;
                        self.metadata.add_refblock(block);
                    }
                    self.reftable_dirty.insert(rt_index as usize);
                }
                Some(_) => {
                    if self.refcount(cluster)? != 0 {
                        return Err(Error::Corrupt(format!(
                            "host cluster {cluster} past the end of the file has a refcount"
                        )));
                    }
                    self.set_refcount(cluster, 1)?;
                    self.note_owned(cluster);
                    return Ok(());
                }
                None if self.txg.is_some() => self.grow_reftable_in_group(rt_index + 1),
                None => {
                    let coverage_end =
                        (self.reftable.len() as u64) << self.rc.entries_per_block_bits();
                    let area = coverage_end.max(self.host_end.div_ceil(self.cluster_size()));
                    self.grow_reftable(rt_index + 1, area)?;
                }
            }
        }
    }

    /// A cluster with refcount 0 must not hold a table this image uses; if it does, the
    /// refcounts are corrupt and allocating it would overwrite metadata.
    fn check_free_cluster_is_unused(&self, host_offset: u64) -> Result<()> {
        let end = host_offset + self.cluster_size();
        let holder = self
            .metadata
            .metadata_at(host_offset, end)
            .or_else(|| self.l2_cache.contains(host_offset).then_some("an L2 table"))
            .or_else(|| {
                self.refblock_cache
                    .contains(host_offset)
                    .then_some("a refcount block")
            });
        match holder {
            Some(what) => Err(Error::Corrupt(format!(
                "host cluster at {host_offset:#x} has refcount 0 but holds {what}"
            ))),
            None => Ok(()),
        }
    }

    pub(in crate::engine) fn note_allocated(&mut self, cluster: u64) {
        self.note_owned(cluster);
        self.free_cluster_hint = self.free_cluster_hint.max(cluster + 1);
        self.host_end = self.host_end.max((cluster + 1) << self.cluster_bits);
    }

    /// Applies the deferred refcount decrements (write_back stage 5). Clusters reaching 0 go
    /// into quarantine (see `release_quarantine`).
    pub(in crate::engine) fn apply_pending_frees(&mut self) -> Result<()> {
        let frees = std::mem::take(&mut self.pending_frees);
        for (cluster, discard) in frees {
            let start = cluster << self.cluster_bits;
            let current = self.refcount(cluster)?;
            if current == 0 {
                return Err(Error::Corrupt(format!(
                    "host cluster {cluster} freed but its refcount is already 0"
                )));
            }
            // Down to zero only when no table of this image lives there (one it names twice
            // loses one reference at a time).
            if current == 1 {
                if let Some(what) = self
                    .metadata
                    .metadata_at(start, start + self.cluster_size())
                {
                    return Err(Error::Corrupt(format!(
                        "host cluster {cluster} would be freed, but it holds {}",
                        MetadataMap::definite(what)
                    )));
                }
            }
            self.set_refcount(cluster, current - 1)?;
            if current == 1 {
                self.quarantine.insert(cluster, self.io_epoch);
                if discard && self.test_discard_early {
                    // The mutation (test only): no wait for a durability point.
                    let _ = self.storage.discard(start, self.cluster_size());
                } else if discard {
                    self.discard.on_release.insert(cluster);
                }
            }
        }
        Ok(())
    }
}
