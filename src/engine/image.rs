//! [`Image`]: an open qcow2 image and the guest-facing operations (read, write, map, flush).
//!
//! Each guest request is cut into runs that one metadata answer covers; the metadata step
//! (`metadata.rs`) says where the bytes are or allocates a cluster for them, then the data
//! step moves bytes with a plain [`Storage`] call. Dirty metadata stays in the caches until
//! `write_back` (`writeback.rs`) writes it in the order the format's crash consistency
//! needs.

use std::collections::BTreeSet;

use super::cache::TableCache;
use super::compress::decompress_cluster;
use super::counters::Counters;
use super::entry::{Cluster, L2Entry};
use super::error::{Error, Result};
use super::header::{AutoclearFeatures, Header, IncompatibleFeatures, MAX_CLUSTER_BITS};
use super::layout::{self, Region};
use super::refcount::RefcountGeometry;
use super::snapshot::{self, Snapshot};
use super::storage::{Backing, Storage};
use super::{Mapping, OpenOptions};

/// QEMU 7.2's default upper bound for the L2 cache on Linux.
const DEFAULT_L2_CACHE_MAX_BYTES: u64 = 32 << 20;
/// QEMU 7.2's default (and minimum) refcount cache, in clusters.
const DEFAULT_REFCOUNT_CACHE_CLUSTERS: u64 = 4;
const MIN_REFCOUNT_CACHE_CLUSTERS: u64 = 4;

/// An open qcow2 image over a [`Storage`].
///
/// Call [`Image::close`] (or [`Image::flush`]) before dropping it: dropping an image loses the
/// metadata still in its caches.
pub struct Image<S: Storage> {
    pub(super) storage: S,
    pub(super) header: Header,
    pub(super) read_only: bool,
    pub(super) cluster_bits: u32,
    pub(super) rc: RefcountGeometry,
    /// The header cluster, L1 table and refcount table: never a target of data writes.
    pub(super) metadata_regions: Vec<Region>,
    /// The active L1 table (raw entries), fully in memory.
    pub(super) l1: Vec<u64>,
    /// L1 indices changed since the last write-back.
    pub(super) l1_dirty: BTreeSet<usize>,
    /// The refcount table (raw entries), fully in memory.
    pub(super) reftable: Vec<u64>,
    /// Refcount table indices changed since the last write-back.
    pub(super) reftable_dirty: BTreeSet<usize>,
    pub(super) l2_cache: TableCache,
    pub(super) refblock_cache: TableCache,
    /// Host clusters whose refcount must drop by one once the L2/L1 entries that stopped
    /// referencing them are written (applied by `write_back`).
    pub(super) pending_frees: Vec<u64>,
    /// Host clusters freed since the last guest flush: not reused before it.
    pub(super) quarantine: BTreeSet<u64>,
    /// Where the allocator starts looking for a free host cluster.
    pub(super) free_cluster_hint: u64,
    /// End of the host file as the engine knows it: the file length at open or the end of the
    /// last cluster allocated since, whichever is larger.
    pub(super) host_end: u64,
    /// Some write was issued since the last ordering point or storage flush.
    pub(super) unordered_writes: bool,
    /// Some write was issued since the last storage flush.
    pub(super) unflushed_writes: bool,
    pub(super) counters: Counters,
    /// The internal snapshot table, parsed and validated at open (`snapshot.rs`).
    pub(super) snapshots: Vec<Snapshot>,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |e| Error::io(context, e)
}

/// Reads an array of big-endian u64 table entries; the caller checked the range against the
/// file length.
fn read_table<S: Storage>(
    storage: &S,
    offset: u64,
    entries: usize,
    what: &str,
) -> Result<Vec<u64>> {
    let mut bytes = vec![0u8; entries * 8];
    storage
        .read_at(offset, &mut bytes)
        .map_err(io(format!("reading the {what}")))?;
    Ok(bytes
        .chunks_exact(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_be_bytes(b)
        })
        .collect())
}

impl<S: Storage> Image<S> {
    /// Opens and validates an image. Refuses what this engine cannot handle safely, with an
    /// error naming the field or feature.
    pub fn open(storage: S, opts: &OpenOptions) -> Result<Self> {
        let file_len = storage.len().map_err(io("getting the image file length"))?;
        if file_len < 72 {
            return Err(Error::Invalid(format!(
                "file of {file_len} bytes is too short for a qcow2 header"
            )));
        }
        let mut first = vec![0u8; 512];
        storage
            .read_at(0, &mut first)
            .map_err(io("reading the header"))?;
        let cluster_bits = u32::from_be_bytes([first[20], first[21], first[22], first[23]]);
        if cluster_bits <= MAX_CLUSTER_BITS && cluster_bits > 9 {
            first = vec![0u8; 1usize << cluster_bits];
            storage
                .read_at(0, &mut first)
                .map_err(io("reading the header"))?;
        }
        let header = Header::parse(&first)?;
        let mut metadata_regions = layout::validate(&header, file_len)?;
        let snapshots = snapshot::read_table(&storage, &header, file_len, &mut metadata_regions)?;

        let read_only = opts.read_only;
        if !read_only && header.incompatible.contains(IncompatibleFeatures::CORRUPT) {
            return Err(Error::Corrupt(
                "the image is marked corrupt (incompatible feature bit 1) and cannot be opened \
                 read-write; open it read-only, or repair it with `qemu-img check -r all`"
                    .into(),
            ));
        }

        let cluster_bits = header.cluster_bits;
        let cluster_size = header.cluster_size();
        let l1 = read_table(
            &storage,
            header.l1_table_offset,
            header.l1_size_entries as usize,
            "L1 table",
        )?;
        let reftable_entries = (u64::from(header.refcount_table_clusters) << cluster_bits) / 8;
        let reftable = read_table(
            &storage,
            header.refcount_table_offset,
            reftable_entries as usize,
            "refcount table",
        )?;

        let max_l2_bytes = header
            .virtual_size
            .div_ceil(layout::bytes_per_l1_entry(cluster_bits))
            .saturating_mul(cluster_size)
            .min(DEFAULT_L2_CACHE_MAX_BYTES);
        let l2_tables = opts.l2_cache_bytes.unwrap_or(max_l2_bytes) / cluster_size;
        let refblocks = (opts
            .refcount_cache_bytes
            .unwrap_or(DEFAULT_REFCOUNT_CACHE_CLUSTERS * cluster_size)
            / cluster_size)
            .max(MIN_REFCOUNT_CACHE_CLUSTERS);

        let mut image = Image {
            rc: RefcountGeometry {
                refcount_order: header.refcount_order,
                cluster_bits,
            },
            storage,
            read_only,
            cluster_bits,
            metadata_regions,
            l1,
            l1_dirty: BTreeSet::new(),
            reftable,
            reftable_dirty: BTreeSet::new(),
            l2_cache: TableCache::new(usize::try_from(l2_tables).unwrap_or(usize::MAX)),
            refblock_cache: TableCache::new(usize::try_from(refblocks).unwrap_or(usize::MAX)),
            pending_frees: Vec::new(),
            quarantine: BTreeSet::new(),
            free_cluster_hint: 0,
            host_end: file_len,
            unordered_writes: false,
            unflushed_writes: false,
            counters: Counters::default(),
            snapshots,
            header,
        };
        if !read_only
            && image
                .header
                .incompatible
                .contains(IncompatibleFeatures::DIRTY)
        {
            image.repair_dirty_image()?;
        }
        if !read_only && image.header.autoclear.0 != 0 {
            image.clear_autoclear_features()?;
        }
        Ok(image)
    }

    /// This engine maintains none of the autoclear features (bitmaps are not updated on
    /// write), so before the first write it clears them, as the spec requires.
    fn clear_autoclear_features(&mut self) -> Result<()> {
        self.header.autoclear = AutoclearFeatures(0);
        let bytes = self.header.encode()?;
        self.write_metadata(0, &bytes, "rewriting the header")?;
        self.storage.flush().map_err(io("flushing the header"))?;
        self.counters.storage_flushes += 1;
        self.unflushed_writes = false;
        self.unordered_writes = false;
        Ok(())
    }

    pub fn virtual_size(&self) -> u64 {
        self.header.virtual_size
    }

    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    pub fn backing_file(&self) -> Option<&str> {
        self.header.backing_file.as_deref()
    }

    pub fn backing_format(&self) -> Option<&str> {
        self.header.backing_format.as_deref()
    }

    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The L2 and refcount block cache capacities, in tables.
    pub fn cache_capacity_tables(&self) -> (usize, usize) {
        (
            self.l2_cache.capacity_tables(),
            self.refblock_cache.capacity_tables(),
        )
    }

    fn check_range(&self, guest_offset: u64, len: u64) -> Result<()> {
        let size = self.header.virtual_size;
        match guest_offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange {
                offset: guest_offset,
                len,
                size,
            }),
        }
    }

    /// Guest bytes into `buf`. Unallocated clusters read from `backing` (zeros past its end,
    /// zeros if there is none).
    pub fn read(
        &mut self,
        guest_offset: u64,
        buf: &mut [u8],
        backing: Option<&dyn Backing>,
    ) -> Result<()> {
        self.check_range(guest_offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let offset = guest_offset + done as u64;
            let (cluster, run_bytes) = self.lookup_run(offset, (buf.len() - done) as u64)?;
            let end = done + run_bytes as usize;
            let Some(chunk) = buf.get_mut(done..end) else {
                return Err(Error::Corrupt(
                    "lookup returned a run past the request".into(),
                ));
            };
            self.read_run(cluster, offset, chunk, backing)?;
            done = end;
        }
        Ok(())
    }

    /// The data step of a read: moves bytes for one run that `lookup_run` described.
    fn read_run(
        &mut self,
        cluster: Cluster,
        guest_offset: u64,
        chunk: &mut [u8],
        backing: Option<&dyn Backing>,
    ) -> Result<()> {
        let in_cluster = guest_offset & (self.cluster_size() - 1);
        match cluster {
            Cluster::Unallocated => read_backing(backing, guest_offset, chunk),
            Cluster::Zero { .. } => {
                chunk.fill(0);
                Ok(())
            }
            Cluster::Data { host_offset, .. } => self
                .storage
                .read_at(host_offset + in_cluster, chunk)
                .map_err(io(format!(
                    "reading guest data at host offset {host_offset:#x}"
                ))),
            Cluster::Compressed { .. } => {
                let whole = self.read_compressed(cluster)?;
                let start = in_cluster as usize;
                let src = whole
                    .get(start..start + chunk.len())
                    .ok_or_else(|| Error::Corrupt("compressed run past the cluster".into()))?;
                chunk.copy_from_slice(src);
                Ok(())
            }
        }
    }

    /// Decompresses a whole compressed cluster.
    pub(super) fn read_compressed(&mut self, cluster: Cluster) -> Result<Vec<u8>> {
        let Cluster::Compressed {
            host_offset,
            max_len_bytes,
        } = cluster
        else {
            return Err(Error::Corrupt("not a compressed cluster".into()));
        };
        // The descriptor may claim more sectors than the file holds; never read past the end.
        let available = self.host_end.saturating_sub(host_offset);
        let len = max_len_bytes
            .min(available)
            .min(2 * self.cluster_size() + 512);
        let mut input = vec![0u8; len as usize];
        self.storage
            .read_at(host_offset, &mut input)
            .map_err(io(format!(
                "reading compressed cluster at {host_offset:#x}"
            )))?;
        let mut out = vec![0u8; self.cluster_size() as usize];
        decompress_cluster(self.header.compression_type, &input, &mut out)?;
        Ok(out)
    }

    /// Writes guest bytes at any offset, length and alignment inside the virtual size.
    pub fn write(
        &mut self,
        guest_offset: u64,
        buf: &[u8],
        backing: Option<&dyn Backing>,
    ) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_range(guest_offset, buf.len() as u64)?;
        let cluster_size = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let offset = guest_offset + done as u64;
            let in_cluster = offset & (cluster_size - 1);
            let n = ((cluster_size - in_cluster) as usize).min(buf.len() - done);
            let Some(chunk) = buf.get(done..done + n) else {
                return Err(Error::Corrupt("write chunk out of bounds".into()));
            };
            self.write_in_cluster(offset, chunk, backing)?;
            done += n;
        }
        Ok(())
    }

    /// Writes `data` (inside one guest cluster) at `guest_offset`.
    fn write_in_cluster(
        &mut self,
        guest_offset: u64,
        data: &[u8],
        backing: Option<&dyn Backing>,
    ) -> Result<()> {
        let cluster_size = self.cluster_size();
        let guest_cluster = guest_offset >> self.cluster_bits;
        let in_cluster = (guest_offset & (cluster_size - 1)) as usize;

        // Metadata: find (or make, or copy) a writable L2 table and read the entry.
        let (l2_offset, l2_index) = self.l2_table_for_write(guest_cluster)?;
        let cluster = self.l2_entry(l2_offset, l2_index, guest_cluster)?;

        if let Cluster::Data {
            host_offset,
            copied: true,
        } = cluster
        {
            // In place: the cluster is ours alone and already referenced, so no metadata
            // changes and no ordering are needed.
            self.check_data_target(host_offset)?;
            return self.write_data(host_offset + in_cluster as u64, data, false);
        }

        // Everything else gets a whole new cluster: the old content (backing file, zeros, a
        // shared or compressed cluster) with `data` on top.
        let mut whole = vec![0u8; cluster_size as usize];
        if data.len() as u64 != cluster_size {
            self.read_cluster_content(
                cluster,
                guest_cluster << self.cluster_bits,
                &mut whole,
                backing,
            )?;
        }
        if let Some(dst) = whole.get_mut(in_cluster..in_cluster + data.len()) {
            dst.copy_from_slice(data);
        }

        let (host_offset, old_clusters) = match cluster {
            // A preallocated zero cluster that is ours alone is reused as it is.
            Cluster::Zero {
                host_offset,
                copied: true,
            } if host_offset != 0 => {
                self.check_data_target(host_offset)?;
                (host_offset, Vec::new())
            }
            other => (self.alloc_cluster()?, self.host_clusters_of(other)),
        };
        // Data step: the whole cluster goes to its new place before any metadata names it.
        self.write_data(host_offset, &whole, true)?;
        // (a) The L2 entry stays in the cache; write_back writes it only after an ordering
        // point that follows this data write.
        self.set_l2_entry(l2_offset, l2_index, L2Entry::data_copied(host_offset))?;
        // The old clusters lose this reference once the new L2 entry is on disk (write_back
        // stage 5).
        self.pending_frees.extend(old_clusters);
        Ok(())
    }

    /// The current content of a guest cluster, for a partial write.
    fn read_cluster_content(
        &mut self,
        cluster: Cluster,
        guest_cluster_offset: u64,
        out: &mut [u8],
        backing: Option<&dyn Backing>,
    ) -> Result<()> {
        match cluster {
            Cluster::Unallocated => read_backing(backing, guest_cluster_offset, out),
            Cluster::Zero { .. } => {
                out.fill(0);
                Ok(())
            }
            Cluster::Data { host_offset, .. } => self
                .storage
                .read_at(host_offset, out)
                .map_err(io(format!("reading cluster {host_offset:#x} to copy it"))),
            Cluster::Compressed { .. } => {
                let whole = self.read_compressed(cluster)?;
                out.copy_from_slice(whole.get(..out.len()).unwrap_or(&whole));
                Ok(())
            }
        }
    }

    /// Refuses a data write that would land on the header or a table.
    fn check_data_target(&self, host_offset: u64) -> Result<()> {
        let end = host_offset + self.cluster_size();
        if let Some(r) = self
            .metadata_regions
            .iter()
            .find(|r| r.overlaps(host_offset, end))
        {
            return Err(Error::Corrupt(format!(
                "data cluster at {host_offset:#x} overlaps the {}",
                r.name
            )));
        }
        Ok(())
    }

    /// The data step of a write. `allocating` marks a write to a newly allocated cluster,
    /// which metadata written later depends on (ordering rule (a) in `write_back`).
    fn write_data(&mut self, host_offset: u64, data: &[u8], allocating: bool) -> Result<()> {
        self.storage
            .write_at(host_offset, data)
            .map_err(io(format!(
                "writing guest data at host offset {host_offset:#x}"
            )))?;
        self.counters.data_writes += 1;
        self.unflushed_writes = true;
        if allocating {
            self.unordered_writes = true;
        }
        Ok(())
    }

    /// Writes all dirty metadata back (in order, see `write_back`), then makes everything
    /// durable with one storage flush, skipped if nothing was written since the last one.
    pub fn flush(&mut self) -> Result<()> {
        self.counters.guest_flushes += 1;
        self.write_back()?;
        if self.unflushed_writes {
            self.storage_flush()?;
        }
        // (d) Clusters freed before this flush may be reused from now on.
        if let Some(&lowest) = self.quarantine.first() {
            self.free_cluster_hint = self.free_cluster_hint.min(lowest);
        }
        self.quarantine.clear();
        Ok(())
    }

    /// Flushes and leaves the image clean. (This engine never sets the dirty bit, so there is
    /// nothing more to clear.)
    pub fn close(mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.flush()
    }

    /// What backs `guest_offset`, and for how many bytes (at least 1, at most `len`) the same
    /// answer holds contiguously (with contiguous host offsets for [`Mapping::Data`]).
    pub fn map(&mut self, guest_offset: u64, len: u64) -> Result<(Mapping, u64)> {
        let size = self.header.virtual_size;
        if len == 0 || guest_offset >= size {
            return Err(Error::OutOfRange {
                offset: guest_offset,
                len,
                size,
            });
        }
        let len = len.min(size - guest_offset);
        let (cluster, run_bytes) = self.lookup_run(guest_offset, len)?;
        let in_cluster = guest_offset & (self.cluster_size() - 1);
        let mapping = match cluster {
            Cluster::Unallocated => Mapping::Unallocated,
            Cluster::Zero { .. } => Mapping::Zero,
            Cluster::Data { host_offset, .. } => Mapping::Data {
                host_offset: host_offset + in_cluster,
            },
            Cluster::Compressed { .. } => Mapping::Compressed,
        };
        Ok((mapping, run_bytes))
    }
}

/// Reads from the backing file, or zeros without one.
fn read_backing(backing: Option<&dyn Backing>, guest_offset: u64, out: &mut [u8]) -> Result<()> {
    match backing {
        Some(b) => b
            .read_at(guest_offset, out)
            .map_err(io(format!("reading the backing file at {guest_offset:#x}"))),
        None => {
            out.fill(0);
            Ok(())
        }
    }
}
