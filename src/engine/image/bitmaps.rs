//! Persistent dirty bitmaps: the directory loaded at open, a bitmap's bits read, bitmaps
//! written (stored), marked in use, removed. What a bitmap tracks is the caller's (QEMU's
//! block layer keeps the bits in memory and marks guest writes); the engine keeps the bits
//! on storage and the directory that names them, as QEMU's qcow2 does
//! (docs/interop/qcow2.txt, "Bitmaps").
//!
//! Trust: a bitmap flagged in use on storage is being changed by a writer, so its bits are
//! stale; one found in use at open (a crash, or a writer that never stored it) is
//! inconsistent and never read ([`Image::read_bitmap`] refuses it). A read-write open marks
//! every consistent bitmap in use before anything else is written ([`Image::make_writable`]);
//! storing a bitmap writes it consistent (no in-use flag) again. Between the two the image
//! always says which bits are current: a crash leaves each bitmap either as stored last or
//! in use, never a consistent bitmap that misses a guest write.
//!
//! Every operation changes the directory out of place, in the one order
//! [`Image::switch_bitmap_directory`] states, between two durability points (the txg mode
//! commits its group first, `Image::outside_group`): new clusters written and counted,
//! ordering point, the header names them, ordering point, the old clusters freed.

use std::collections::BTreeSet;

use crate::engine::error::{Error, Result};
use crate::engine::format::bitmap::{
    self, data_bytes, encode_directory, table_entries, table_entry_offset, BitmapEntry,
    BitmapFlags, BITMAP_DIRECTORY_REGION, BITMAP_TABLE_REGION, MAX_GRANULARITY_BITS,
    MAX_NAME_BYTES, MIN_GRANULARITY_BITS, TABLE_ENTRY_ALL_ONES, TYPE_DIRTY_TRACKING,
};
use crate::engine::format::bytes::{encode_table, read_table};
use crate::engine::format::header::{AutoclearFeatures, BitmapsExtension};
use crate::engine::format::layout::{
    Region, MAX_BITMAPS, MAX_BITMAP_BYTES, MAX_BITMAP_DIRECTORY_BYTES, MAX_BITMAP_TABLE_ENTRIES,
};
use crate::engine::image::discard::FreeKind;
use crate::engine::image::txg::CommitReason;
use crate::engine::image::Image;
use crate::engine::storage::Storage;

/// A bitmap to store: its bits as QEMU serializes them (bit `n` covers guest bytes
/// `[n << granularity_bits, (n + 1) << granularity_bits)`, bit `n % 8` of byte `n / 8`),
/// [`bitmap::data_bytes`] long for the image's virtual size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBitmap {
    pub name: Vec<u8>,
    pub granularity_bits: u8,
    /// Whether it tracks guest writes (the directory's AUTO flag; QEMU: enabled).
    pub enabled: bool,
    pub data: Vec<u8>,
}

/// Why a bitmap cannot be stored in this image (QEMU's `check_constraints_on_bitmap`), or
/// `None`. `virtual_size` is the disk the bitmap covers.
pub fn bitmap_constraints(
    name: &[u8],
    granularity_bits: u8,
    cluster_size: u64,
    virtual_size: u64,
) -> Option<String> {
    if granularity_bits > MAX_GRANULARITY_BITS {
        return Some(format!(
            "Granularity exceeds maximum ({} bytes)",
            1u64 << MAX_GRANULARITY_BITS
        ));
    }
    if granularity_bits < MIN_GRANULARITY_BITS {
        return Some(format!(
            "Granularity is under minimum ({} bytes)",
            1u64 << MIN_GRANULARITY_BITS
        ));
    }
    let bytes = virtual_size.div_ceil(1u64 << granularity_bits).div_ceil(8);
    if bytes > MAX_BITMAP_BYTES || bytes > MAX_BITMAP_TABLE_ENTRIES * cluster_size {
        return Some(
            "Too much space will be occupied by the bitmap. Use larger granularity".into(),
        );
    }
    if name.len() > MAX_NAME_BYTES {
        return Some(format!(
            "Name length exceeds maximum ({MAX_NAME_BYTES} characters)"
        ));
    }
    None
}

impl<S: Storage> Image<S> {
    /// The bitmap directory as on storage (empty when the image has no valid bitmaps).
    pub fn bitmaps(&self) -> &[BitmapEntry] {
        &self.bitmaps
    }

    /// Whether the image may hold persistent bitmaps (version 3: the autoclear bits).
    pub fn supports_bitmaps(&self) -> bool {
        self.header.version >= 3
    }

    /// Reads the bitmap directory at open, if the autoclear bit says the bitmaps are valid
    /// (QEMU considers the extension stale otherwise, its clusters leaked): every entry
    /// validated as QEMU validates it. Under `qemu-img check` a broken directory is left to
    /// the check, which reports it; elsewhere it fails the open, as in QEMU's qcow2.
    pub(super) fn load_bitmap_directory(&mut self) -> Result<()> {
        let Some(ext) = self.valid_bitmaps_extension() else {
            return Ok(());
        };
        match self.read_bitmap_directory(ext) {
            Ok(entries) => {
                self.bitmaps = entries;
                self.set_bitmap_regions(ext.directory_offset, ext.directory_size_bytes);
                Ok(())
            }
            Err(_) if self.for_check => Ok(()),
            // QEMU's messages, unprefixed (`qemu-img info` and iotest 242 show them).
            Err(Error::Invalid(msg)) | Err(Error::Unsupported(msg)) => Err(Error::Refused {
                errno: libc::EINVAL,
                msg,
            }),
            Err(e) => Err(e),
        }
    }

    /// The bitmaps extension, when the autoclear bit keeps it valid and it names bitmaps.
    fn valid_bitmaps_extension(&self) -> Option<BitmapsExtension> {
        let ext = self.header.bitmaps?;
        let valid = self.header.version >= 3
            && self.header.autoclear.contains(AutoclearFeatures::BITMAPS)
            && ext.nb_bitmaps > 0;
        valid.then_some(ext)
    }

    fn read_bitmap_directory(&self, ext: BitmapsExtension) -> Result<Vec<BitmapEntry>> {
        if ext.directory_size_bytes == 0 || ext.directory_size_bytes > MAX_BITMAP_DIRECTORY_BYTES {
            return Err(Error::Invalid(format!(
                "bitmap directory of {} bytes",
                ext.directory_size_bytes
            )));
        }
        // Inside the file (layout::validate) and within QEMU's limit: safe to allocate.
        let mut bytes = vec![0u8; ext.directory_size_bytes as usize];
        self.storage
            .read_at(ext.directory_offset, &mut bytes)
            .map_err(|e| Error::io("reading the bitmap directory", e))?;
        let entries = bitmap::parse_directory(&bytes, ext.nb_bitmaps)?;
        let cluster_size = self.cluster_size();
        for e in &entries {
            e.validate(cluster_size, self.header.virtual_size)?;
        }
        Ok(entries)
    }

    /// Tells the metadata map where the directory and the bitmap tables are.
    fn set_bitmap_regions(&mut self, directory_offset: u64, directory_bytes: u64) {
        let cluster_size = self.cluster_size();
        if directory_bytes == 0 {
            self.metadata.remove_region(BITMAP_DIRECTORY_REGION);
        } else {
            self.metadata.move_region(
                BITMAP_DIRECTORY_REGION,
                directory_offset,
                (directory_offset + directory_bytes).next_multiple_of(cluster_size),
            );
        }
        let tables: Vec<Region> = self
            .bitmaps
            .iter()
            .map(|e| Region {
                name: BITMAP_TABLE_REGION,
                start: e.table_offset,
                end: (e.table_offset + u64::from(e.table_size_entries) * 8)
                    .next_multiple_of(cluster_size),
            })
            .collect();
        self.metadata.replace_regions(BITMAP_TABLE_REGION, tables);
    }

    fn find_bitmap(&self, name: &[u8]) -> Option<usize> {
        self.bitmaps.iter().position(|e| e.name == name)
    }

    /// Whether the stored bits of the bitmap `name` are current: it is not in use, or this
    /// open marked it in use itself (and nothing was stored since that the caller did not
    /// load). A bitmap in use otherwise is inconsistent (QEMU: reported, never used).
    pub fn bitmap_consistent(&self, name: &[u8]) -> bool {
        self.find_bitmap(name)
            .is_some_and(|i| !self.bitmaps[i].in_use() || self.bitmaps_marked.contains(name))
    }

    /// The table of bitmap `index`, each entry checked.
    fn bitmap_table(&self, entry: &BitmapEntry) -> Result<Vec<u64>> {
        let table = read_table(
            &self.storage,
            entry.table_offset,
            u64::from(entry.table_size_entries),
            "a bitmap table",
        )?;
        let cluster_size = self.cluster_size();
        for &raw in &table {
            table_entry_offset(raw, cluster_size)
                .map_err(|e| Error::Invalid(format!("bitmap '{}': {e}", entry.display_name())))?;
        }
        Ok(table)
    }

    /// The bits of the bitmap `name` as stored ([`StoredBitmap::data`]'s layout), for the
    /// image's virtual size. Refuses an inconsistent bitmap (in use, not by this open) and a
    /// table that does not match the disk's size.
    pub fn read_bitmap(&self, name: &[u8]) -> Result<Vec<u8>> {
        let index = self.find_bitmap(name).ok_or_else(|| Error::Refused {
            errno: libc::ENOENT,
            msg: format!("no bitmap '{}'", String::from_utf8_lossy(name)),
        })?;
        let entry = &self.bitmaps[index];
        if !self.bitmap_consistent(name) {
            return Err(Error::Invalid(format!(
                "bitmap '{}' is inconsistent (in use): its bits cannot be trusted",
                entry.display_name()
            )));
        }
        let cluster_size = self.cluster_size();
        let len = data_bytes(self.header.virtual_size, entry.granularity_bits);
        if table_entries(len, cluster_size) != u64::from(entry.table_size_entries) {
            return Err(Error::Invalid(format!(
                "bitmap '{}': a table of {} entries for {len} bytes of bits",
                entry.display_name(),
                entry.table_size_entries
            )));
        }
        let table = self.bitmap_table(entry)?;
        // len is bounded by the entry's validation (MAX_BITMAP_BYTES).
        let mut data = vec![0u8; len as usize];
        for (i, &raw) in table.iter().enumerate() {
            let start = i * cluster_size as usize;
            let end = (start + cluster_size as usize).min(data.len());
            let chunk = &mut data[start..end];
            match table_entry_offset(raw, cluster_size)? {
                0 if raw & TABLE_ENTRY_ALL_ONES != 0 => chunk.fill(0xff),
                0 => {}
                offset => self.storage.read_at(offset, chunk).map_err(|e| {
                    Error::io(
                        format!("reading bitmap '{}' at {offset:#x}", entry.display_name()),
                        e,
                    )
                })?,
            }
        }
        Ok(data)
    }

    /// Marks every consistent bitmap in use (a read-write open, a reopen read-write), before
    /// anything else is written: from here on guest writes may change what the bitmaps
    /// should say. Write order: that of [`Self::switch_bitmap_directory`], then a durability
    /// point, so the in-use flags are on storage before any guest write can be.
    pub(super) fn mark_bitmaps_in_use(&mut self) -> Result<()> {
        if self.bitmaps.iter().all(BitmapEntry::in_use) {
            return Ok(());
        }
        let mut directory = self.bitmaps.clone();
        let mut marked = BTreeSet::new();
        for e in directory.iter_mut().filter(|e| !e.in_use()) {
            e.flags |= BitmapFlags::IN_USE;
            marked.insert(e.name.clone());
        }
        self.outside_group(|image| {
            image.durability_point(false, CommitReason::Durability)?;
            image.switch_bitmap_directory(directory, Vec::new())?;
            image.durability_point(false, CommitReason::Durability)
        })?;
        self.bitmaps_marked.extend(marked);
        Ok(())
    }

    /// Stores `bitmaps` (QEMU's `qcow2_store_persistent_dirty_bitmaps`): each replaces the
    /// bitmap of its name, which must be in use (one not in use is another writer's, or a
    /// read-only one: "already exists"), or is added. Bitmaps of the directory not listed
    /// stay as they are. Each is written consistent (not in use), AUTO when enabled.
    ///
    /// Write order (each step written before the next):
    /// 1. a durability point;
    /// 2. each bitmap's data clusters, in new clusters, all-zero clusters left out (table
    ///    entry 0); its bitmap table, in new clusters; the new directory, in new clusters;
    ///    write-back: the refcounts of all of them;
    /// 3. ordering point; the header names the new directory, with the autoclear bit set
    ///    (one header write);
    /// 4. ordering point; the old directory, and the tables and data clusters of the
    ///    bitmaps replaced, freed (write-back stage 5, rule (d)); a durability point.
    ///
    /// A crash before 3 leaves the old directory in force (every replaced bitmap in use,
    /// since this open marked it so) and the new clusters leaked; after 3, the new
    /// directory, the old clusters counted until 4 (leaks).
    pub fn store_bitmaps(&mut self, bitmaps: &[StoredBitmap]) -> Result<()> {
        if bitmaps.is_empty() {
            return Ok(());
        }
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if !self.supports_bitmaps() {
            return Err(Error::Unsupported(
                "Cannot store dirty bitmaps in qcow2 v2 files".into(),
            ));
        }
        let cluster_size = self.cluster_size();
        let size = self.header.virtual_size;
        let directory = self.bitmaps.clone();
        let mut replaced = Vec::new();
        for b in bitmaps {
            let name = String::from_utf8_lossy(&b.name);
            if let Some(why) = bitmap_constraints(&b.name, b.granularity_bits, cluster_size, size) {
                return Err(Error::BadOption(format!(
                    "Bitmap '{name}' doesn't satisfy the constraints: {why}"
                )));
            }
            let expected = data_bytes(size, b.granularity_bits);
            if b.data.len() as u64 != expected {
                return Err(Error::BadOption(format!(
                    "bitmap '{name}': {} bytes of bits given, {expected} expected",
                    b.data.len()
                )));
            }
            match directory.iter().position(|e| e.name == b.name) {
                Some(i) if !directory[i].in_use() => {
                    return Err(Error::BadOption(format!(
                        "Bitmap '{name}' already exists in the image"
                    )));
                }
                Some(i) => replaced.push(directory[i].clone()),
                None => {}
            }
            if bitmaps.iter().filter(|o| o.name == b.name).count() > 1 {
                return Err(Error::BadOption(format!("bitmap '{name}' given twice")));
            }
        }
        if directory.len() + bitmaps.len() - replaced.len() > MAX_BITMAPS as usize {
            return Err(Error::BadOption("Too many persistent bitmaps".into()));
        }
        self.outside_group(|image| image.store_bitmaps_in_place(directory, replaced, bitmaps))
    }

    fn store_bitmaps_in_place(
        &mut self,
        mut directory: Vec<BitmapEntry>,
        replaced: Vec<BitmapEntry>,
        bitmaps: &[StoredBitmap],
    ) -> Result<()> {
        // 1.
        self.durability_point(false, CommitReason::Durability)?;
        // What the replaced bitmaps hold, freed in 4. A table that does not read back is
        // left counted (a leak `qemu-img check -r leaks` gives back), never freed blind.
        let mut old_clusters = Vec::new();
        for e in &replaced {
            old_clusters.extend(self.bitmap_clusters(e).unwrap_or_default());
        }
        // 2. Data clusters and tables, in directory order (a replaced bitmap keeps its
        // place, new ones follow in the order given), as QEMU's qcow2 writes them.
        let mut order: Vec<(usize, &StoredBitmap)> = bitmaps
            .iter()
            .map(|b| match directory.iter().position(|e| e.name == b.name) {
                Some(i) => (i, b),
                None => (usize::MAX, b),
            })
            .collect();
        order.sort_by_key(|&(i, _)| i);
        for (place, b) in order {
            let (table_offset, table_size_entries) = self.write_bitmap_data(b)?;
            let entry = BitmapEntry {
                table_offset,
                table_size_entries,
                flags: if b.enabled {
                    BitmapFlags::AUTO
                } else {
                    BitmapFlags::empty()
                },
                bitmap_type: TYPE_DIRTY_TRACKING,
                granularity_bits: b.granularity_bits,
                name: b.name.clone(),
                extra_data: Vec::new(),
            };
            match directory.get_mut(place) {
                Some(slot) => *slot = entry,
                None => directory.push(entry),
            }
        }
        // 2 (directory) to 4.
        self.switch_bitmap_directory(directory, old_clusters)?;
        for b in bitmaps {
            self.bitmaps_marked.remove(&b.name);
        }
        self.durability_point(false, CommitReason::Durability)
    }

    /// Writes the bits of `b` to new clusters (all-zero clusters left out) and its table
    /// after them; nothing names them yet. Returns the table's offset and entries.
    fn write_bitmap_data(&mut self, b: &StoredBitmap) -> Result<(u64, u32)> {
        let cluster_size = self.cluster_size() as usize;
        let mut table = Vec::with_capacity(b.data.len().div_ceil(cluster_size));
        let mut cluster = vec![0u8; cluster_size];
        for chunk in b.data.chunks(cluster_size) {
            if chunk.iter().all(|&x| x == 0) {
                table.push(0u64);
                continue;
            }
            let offset = self.alloc_cluster()?;
            cluster[..chunk.len()].copy_from_slice(chunk);
            cluster[chunk.len()..].fill(0);
            self.write_metadata(offset, &cluster, "writing a bitmap's data cluster")?;
            table.push(offset);
        }
        let table_bytes = table.len() as u64 * 8;
        let clusters = table_bytes.div_ceil(cluster_size as u64);
        let table_offset = if clusters == 1 {
            self.alloc_cluster()?
        } else {
            self.alloc_contiguous(clusters)?
        };
        let mut raw = encode_table(&table);
        raw.resize((clusters as usize) * cluster_size, 0);
        self.write_metadata(table_offset, &raw, "writing a bitmap table")?;
        Ok((table_offset, table.len() as u32))
    }

    /// The host clusters a bitmap holds: its data clusters and its table's.
    fn bitmap_clusters(&self, entry: &BitmapEntry) -> Result<Vec<u64>> {
        let table = self.bitmap_table(entry)?;
        let cluster_size = self.cluster_size();
        let mut clusters = Vec::new();
        for raw in table {
            let offset = table_entry_offset(raw, cluster_size)?;
            if offset != 0 {
                clusters.push(offset >> self.cluster_bits);
            }
        }
        let first = entry.table_offset >> self.cluster_bits;
        let count = (u64::from(entry.table_size_entries) * 8).div_ceil(cluster_size);
        clusters.extend(first..first + count);
        Ok(clusters)
    }

    /// Removes the bitmap `name` from the image (QEMU's
    /// `qcow2_co_remove_persistent_dirty_bitmap`); one not there is no error (returns
    /// false), as in QEMU. Write order: a durability point, then that of
    /// [`Self::switch_bitmap_directory`] with the bitmap's table and data clusters freed
    /// after the header no longer names it, then a durability point. A crash before the
    /// header write leaves the bitmap; after it, the bitmap gone and its clusters counted
    /// until they are freed (leaks).
    pub fn remove_bitmap(&mut self, name: &[u8]) -> Result<bool> {
        let Some(index) = self.find_bitmap(name) else {
            return Ok(false);
        };
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.outside_group(|image| {
            image.durability_point(false, CommitReason::Durability)?;
            let mut directory = image.bitmaps.clone();
            let entry = directory.remove(index);
            let clusters = image.bitmap_clusters(&entry).unwrap_or_default();
            image.switch_bitmap_directory(directory, clusters)?;
            image.bitmaps_marked.remove(name);
            image.durability_point(false, CommitReason::Durability)
        })?;
        Ok(true)
    }

    /// Makes `directory` the bitmap directory and frees `old_clusters` (what the bitmaps it
    /// replaces held) after the header stops naming them.
    ///
    /// Write order:
    /// 1. the directory, in new clusters (everything it names was written before, in new
    ///    clusters too); write-back: the refcounts of all new clusters (stages 1 and 2);
    /// 2. ordering point: the data clusters, tables, directory and their counts before what
    ///    names them. Nothing names a new table or directory until the header does, so this
    ///    one point orders all of them before it (the crash harness's `bitmap-table`
    ///    mutation leaves it out and must be caught);
    /// 3. the header: the bitmaps extension naming the new directory and the autoclear bit
    ///    (set with bitmaps, cleared and the extension dropped without), one header write;
    /// 4. (d) the old directory and `old_clusters` freed at the next write-back, after its
    ///    ordering point (`unordered.entries`).
    pub(in crate::engine) fn switch_bitmap_directory(
        &mut self,
        directory: Vec<BitmapEntry>,
        old_clusters: Vec<u64>,
    ) -> Result<()> {
        let cluster_size = self.cluster_size();
        // 1.
        let (offset, bytes) = if directory.is_empty() {
            (0, 0)
        } else {
            let mut encoded = encode_directory(&directory)?;
            let bytes = encoded.len() as u64;
            let clusters = bytes.div_ceil(cluster_size);
            let offset = if clusters == 1 {
                self.alloc_cluster()?
            } else {
                self.alloc_contiguous(clusters)?
            };
            encoded.resize((clusters * cluster_size) as usize, 0);
            self.write_metadata(offset, &encoded, "writing the bitmap directory")?;
            (offset, bytes)
        };
        self.write_back()?;
        // 2.
        if !self.test_skip_bitmap_ordering {
            self.ordering_point()?;
        }
        // 3.
        let old = self
            .header
            .bitmaps
            .filter(|_| self.header.autoclear.contains(AutoclearFeatures::BITMAPS));
        let mut header = self.header.clone();
        if directory.is_empty() {
            header.autoclear.remove(AutoclearFeatures::BITMAPS);
            header.set_bitmaps_extension(None);
        } else {
            header.autoclear.insert(AutoclearFeatures::BITMAPS);
            header.set_bitmaps_extension(Some(BitmapsExtension {
                nb_bitmaps: directory.len() as u32,
                directory_size_bytes: bytes,
                directory_offset: offset,
            }));
        }
        let encoded = header.encode()?;
        self.write_metadata(
            0,
            &encoded,
            "switching the header to the new bitmap directory",
        )?;
        self.header = header;
        // 4.
        self.unordered.entries = true;
        if let Some(old) = old.filter(|o| o.directory_size_bytes > 0 && o.directory_offset > 0) {
            let first = old.directory_offset >> self.cluster_bits;
            let count = old.directory_size_bytes.div_ceil(cluster_size);
            self.free_later(first..first + count, FreeKind::Other);
        }
        self.free_later(old_clusters, FreeKind::Other);
        self.bitmaps = directory;
        self.set_bitmap_regions(offset, bytes);
        Ok(())
    }
}
