//! `qemu-img amend`: changing an existing image's options in place, as QEMU's qcow2 amends
//! them (QEMU 7.2): the version (compat=0.10 and 1.1), lazy refcounts, the refcount width,
//! the external data file's name and raw flag, the virtual size; a backing file named again
//! as it is (any other is refused: that is `qemu-img rebase`).
//!
//! The steps run in QEMU's order, each refusal before the step that needs it: an upgrade
//! first (what follows may need version 3), the refcount width, the header fields, the
//! backing file comparison, lazy refcounts, the size, and a downgrade last (so that what
//! version 2 cannot hold was removed first). A step refused leaves the steps before it done,
//! as QEMU's leave them.
//!
//! Write order, one rule per kind of step (each keeps the invariants of `writeback.rs`):
//! - header fields alone (version up, lazy refcounts, data file name and raw flag): all dirty
//!   metadata written back and made durable, then the header cluster in one write, then a
//!   sync ([`Image::rewrite_header`]);
//! - a downgrade: zero clusters expanded first, data zeros before the L2 entries that name
//!   them (rule (a)), new clusters counted before (rule (b)), durable; only then the version 2
//!   header. A crash before it leaves a version 3 image whose zero clusters became clusters
//!   of zeros: the same guest content;
//! - the refcount width: `refcount_order.rs`.

use crate::engine::error::{Error, Result};
use crate::engine::format::bytes;
use crate::engine::format::entry::{Cluster, EntryFlags, L2Entry, OFFSET_MASK};
use crate::engine::format::header::{
    ext, AutoclearFeatures, CompatibleFeatures, CompressionType, Header, IncompatibleFeatures,
    RawExtension, V2_HEADER_LEN,
};
use crate::engine::format::snapshot::V3_MIN_EXTRA_DATA_BYTES;
use crate::engine::image::Image;
use crate::engine::storage::{Backing, Storage};

/// Header length QEMU writes for version 3: the 104-byte header, the compression type byte
/// and its padding.
const V3_HEADER_LEN: u32 = 112;

/// What `qemu-img amend -o` asks to change; `None` leaves a setting as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Amendment {
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: Option<u32>,
    pub lazy_refcounts: Option<bool>,
    /// A power of two from 1 to 64 (checked by the caller, which parses the option).
    pub refcount_bits: Option<u32>,
    /// A new virtual size (grown or shrunk, unallocated where new).
    pub size: Option<u64>,
    /// The backing file as the user names it: only the current name is accepted.
    pub backing_file: Option<Vec<u8>>,
    pub backing_format: Option<Vec<u8>>,
    /// The external data file's name to record (empty: record none).
    pub data_file: Option<Vec<u8>>,
    pub data_file_raw: Option<bool>,
}

/// A refusal with QEMU's own message (qemu-img prints it as it is).
fn refused(msg: &str) -> Error {
    Error::BadOption(msg.into())
}

impl<S: Storage> Image<S> {
    /// Amends the image as `amendment` says (module comment: the order of the steps and of
    /// their writes). `backing` serves zero clusters a downgrade must turn into data.
    pub fn amend(&mut self, amendment: &Amendment, backing: Option<&dyn Backing>) -> Result<()> {
        self.amend_with_progress(amendment, backing, &mut |_, _| {})
    }

    /// [`Image::amend`], telling `progress` (done, total) as QEMU's qcow2 tells its status
    /// callback: an upgrade in 2 steps, a downgrade per L1 entry of the active table and the
    /// snapshots' tables.
    pub fn amend_with_progress(
        &mut self,
        amendment: &Amendment,
        backing: Option<&dyn Backing>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        // A transaction group commits first; every step writes in place, in order.
        self.outside_group(|image| image.amend_in_place(amendment, backing, progress))
    }

    fn amend_in_place(
        &mut self,
        a: &Amendment,
        backing: Option<&dyn Backing>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        if a.data_file.is_some() && !self.header.has_data_file() {
            return Err(refused(
                "data-file can only be set for images that use an external data file",
            ));
        }
        if a.data_file_raw == Some(true) && !self.header.data_file_raw() {
            return Err(refused("data-file-raw cannot be set on existing images"));
        }
        let old_version = self.header.version;
        let new_version = a.version.unwrap_or(old_version);
        let new_refcount_bits = a.refcount_bits.filter(|&b| b != self.rc.refcount_bits());
        // The steps that take time and report progress, each an equal share of the whole, as
        // QEMU's qcow2 shares it.
        let mut steps = StepProgress {
            progress,
            index: 0,
            count: u64::from(new_version > old_version)
                + u64::from(new_refcount_bits.is_some())
                + u64::from(new_version < old_version),
        };
        if new_version > old_version {
            self.upgrade(&mut |done, total| steps.report(done, total))?;
            steps.index += 1;
        }
        if let Some(bits) = new_refcount_bits {
            if new_version < 3 && bits != 16 {
                return Err(refused(
                    "Refcount widths other than 16 bits require compatibility level 1.1 or \
                     above (use compat=1.1 or greater)",
                ));
            }
            self.change_refcount_order(bits.trailing_zeros(), &mut |done, total| {
                steps.report(done, total)
            })?;
            steps.index += 1;
        }
        let mut header = self.header.clone();
        if a.data_file_raw == Some(false) {
            header
                .autoclear
                .remove(AutoclearFeatures::RAW_EXTERNAL_DATA);
        }
        if let Some(name) = &a.data_file {
            set_data_file_name(&mut header, name);
        }
        if header != self.header {
            self.rewrite_header(header, "rewriting the header with the amended options")?;
        }
        if a.backing_file.is_some() || a.backing_format.is_some() {
            let same = a.backing_file.as_deref() == self.header.backing_file.as_deref()
                && a.backing_format.as_deref() == self.header.backing_format.as_deref();
            if !same {
                // QEMU's message and its hint, as qemu-img prints them.
                return Err(refused(
                    "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.",
                ));
            }
        }
        let lazy = self
            .header
            .compatible
            .contains(CompatibleFeatures::LAZY_REFCOUNTS);
        if let Some(wanted) = a.lazy_refcounts.filter(|&w| w != lazy) {
            if wanted && new_version < 3 {
                return Err(refused(
                    "Lazy refcounts only supported with compatibility level 1.1 and above \
                     (use compat=1.1 or greater)",
                ));
            }
            // Off: the image is clean already (a dirty one was repaired at its open, and this
            // engine never sets the dirty bit), so only the bit goes.
            let mut header = self.header.clone();
            header
                .compatible
                .set(CompatibleFeatures::LAZY_REFCOUNTS, wanted);
            self.rewrite_header(header, "rewriting the header's lazy refcounts bit")?;
        }
        if let Some(size) = a.size.filter(|&s| s != 0) {
            self.resize_for_amend(size, backing)?;
        }
        if new_version < old_version {
            self.downgrade(backing, &mut |done, total| steps.report(done, total))?;
        }
        Ok(())
    }

    /// The new size, as QEMU's amend asks for it (exact, without preallocation): grown
    /// unallocated, or shrunk.
    fn resize_for_amend(&mut self, size: u64, backing: Option<&dyn Backing>) -> Result<()> {
        use std::cmp::Ordering;
        match size.cmp(&self.header.virtual_size) {
            Ordering::Less => self.shrink(size),
            Ordering::Greater => self.grow(size, crate::engine::Growth::default(), backing),
            Ordering::Equal => Ok(()),
        }
    }

    /// The refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        self.rc.refcount_bits()
    }

    /// Version 2 to 3: the snapshot table written again if an entry lacks the version 3
    /// extra data, then the header (the longer header QEMU writes, and its feature name
    /// table on clusters above 4 KiB).
    fn upgrade(&mut self, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        progress(0, 2);
        if self
            .snapshots
            .iter()
            .any(|s| s.extra_data_size < V3_MIN_EXTRA_DATA_BYTES)
        {
            // Version 3 wants every snapshot's VM state and disk size in its extra data: the
            // table is written again with them first (`snapshots.rs`: the new table before
            // the header names it), made durable before the version changes.
            self.switch_snapshot_table(self.snapshots.clone())?;
            self.flush_metadata_and_sync(false)?;
        }
        let mut header = self.header.clone();
        header.version = 3;
        header.header_length = V3_HEADER_LEN;
        header.additional_fields = vec![0; (V3_HEADER_LEN - 104) as usize];
        header.refcount_order = self.rc.refcount_order;
        if header.cluster_size() > 4096
            && !header
                .extensions
                .iter()
                .any(|e| e.kind == ext::FEATURE_NAME_TABLE)
        {
            let names = crate::engine::create::qemu_feature_names();
            // QEMU's order: after the backing format, data file and encryption extensions.
            let at = header
                .extensions
                .iter()
                .take_while(|e| {
                    matches!(
                        e.kind,
                        ext::BACKING_FORMAT | ext::EXTERNAL_DATA_FILE | ext::FULL_DISK_ENCRYPTION
                    )
                })
                .count();
            header.extensions.insert(
                at,
                RawExtension {
                    kind: ext::FEATURE_NAME_TABLE,
                    data: crate::engine::create::encode_feature_names(&names),
                },
            );
            header.feature_names = names;
        }
        progress(1, 2);
        self.rewrite_header(header, "rewriting the header as version 3")?;
        progress(2, 2);
        Ok(())
    }

    /// Version 3 to 2, refusing what version 2 cannot hold with QEMU's messages; zero
    /// clusters become clusters of zeros (or unallocated, without a backing file) in every L2
    /// table, the snapshots' included; then the version 2 header (module comment: order).
    fn downgrade(
        &mut self,
        backing: Option<&dyn Backing>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        if self.rc.refcount_order != 4 {
            return Err(refused("compat=0.10 requires refcount_bits=16"));
        }
        if self.header.has_data_file() {
            return Err(refused("Cannot downgrade an image with a data file"));
        }
        let size = self.header.virtual_size;
        if self
            .snapshots
            .iter()
            .any(|s| s.vm_state_size > u64::from(u32::MAX) || s.disk_size != size)
        {
            return Err(refused("Internal snapshots prevent downgrade of image"));
        }
        let incompatible = self.header.incompatible - IncompatibleFeatures::COMPRESSION_TYPE;
        if !incompatible.is_empty() {
            return Err(refused(&format!(
                "Cannot downgrade an image with incompatible features {:#x} set",
                incompatible.bits()
            )));
        }
        if self.encryption.is_some() {
            // Zeros expanded into an encrypted cluster would decrypt to noise.
            return Err(Error::Unsupported(
                "downgrading an encrypted image (its zero clusters would need encrypting)".into(),
            ));
        }
        let zstd = self.header.compression_type == CompressionType::Zstd;
        if zstd && self.has_compressed_clusters()? {
            return Err(refused(
                "Cannot downgrade an image with zstd compression type and existing compressed \
                 clusters",
            ));
        }
        self.expand_zero_clusters(backing, progress)?;
        let mut header = self.header.clone();
        header.version = 2;
        header.header_length = V2_HEADER_LEN;
        header.additional_fields.clear();
        header.incompatible = IncompatibleFeatures::empty();
        header.compatible = CompatibleFeatures::empty();
        header.autoclear = AutoclearFeatures::empty();
        header.compression_type = CompressionType::Zlib;
        header
            .extensions
            .retain(|e| e.kind != ext::FEATURE_NAME_TABLE);
        header.feature_names.clear();
        self.rewrite_header(header, "rewriting the header as version 2")
    }

    /// Whether an active L2 entry names a compressed cluster.
    fn has_compressed_clusters(&mut self) -> Result<bool> {
        let per_table = 1u64 << self.l2_bits();
        for l1_index in 0..self.l1.len() as u64 {
            let first = l1_index * per_table;
            if self.l2_offset_for(first)?.2 == 0 {
                continue;
            }
            for guest_cluster in first..first + per_table {
                if matches!(self.cluster_at(guest_cluster)?, Cluster::Compressed { .. }) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Turns every zero cluster into one version 2 can read: without a backing file a zero
    /// cluster without a host cluster becomes unallocated (it reads as zeros so too); else
    /// it gets a new cluster of zeros, counted once per table naming it (a table shared with
    /// snapshots is changed in place, as QEMU's qcow2 does: every sharer reads the same
    /// zeros); a preallocated one gets its zeros written and loses the flag. Active tables
    /// first, through the cache and `write_back`; then the snapshots' tables, read and
    /// written directly (a table the active one shares has no zero entry left by then).
    fn expand_zero_clusters(
        &mut self,
        backing: Option<&dyn Backing>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let has_backing = backing.is_some() || self.header.backing_file.is_some();
        let cluster_size = self.cluster_size();
        let zeros = vec![0u8; cluster_size as usize];
        let total = self.l1.len() as u64
            + self
                .snapshots
                .iter()
                .map(|s| u64::from(s.l1_size_entries))
                .sum::<u64>();
        let mut visited = 0;
        for l1_index in 0..self.l1.len() {
            visited += 1;
            // Validated (a misaligned or overlapping table is refused, as at any lookup).
            let first = (l1_index as u64) << self.l2_bits();
            let l2_offset = self.l2_offset_for(first)?.2;
            if l2_offset == 0 {
                progress(visited, total);
                continue;
            }
            self.load_l2(l2_offset)?;
            let table = self
                .l2_cache
                .peek(l2_offset)
                .map(bytes::decode_table)
                .unwrap_or_default();
            let new = self.expanded_entries(&table, l2_offset, first, has_backing, &zeros)?;
            for (l2_index, entry) in new {
                self.set_l2_entry(l2_offset, l2_index, entry)?;
            }
            progress(visited, total);
        }
        // (a) and (b): data and counts before the entries (stages 1 to 3 of the write-back).
        self.write_back()?;
        self.storage_flush()?;

        let mut tables = Vec::new();
        for s in &self.snapshots {
            tables.extend(bytes::read_table(
                &self.storage,
                s.l1_table_offset,
                u64::from(s.l1_size_entries),
                "a snapshot's L1 table",
            )?);
        }
        for (index, raw) in tables.into_iter().enumerate() {
            visited += 1;
            let l1_index = index as u64;
            let l2_offset =
                crate::engine::format::entry::L1Entry(raw).l2_offset(cluster_size, l1_index)?;
            if l2_offset != 0 {
                self.check_host_offset(l2_offset, || {
                    format!("L2 table of a snapshot's L1 entry {l1_index}")
                })?;
            }
            if l2_offset == 0 {
                progress(visited, total);
                continue;
            }
            let mut raw = vec![0u8; cluster_size as usize];
            self.storage
                .read_at(l2_offset, &mut raw)
                .map_err(|e| Error::io(format!("reading the L2 table at {l2_offset:#x}"), e))?;
            let mut table = bytes::decode_table(&raw);
            let new = self.expanded_entries(&table, l2_offset, 0, has_backing, &zeros)?;
            if new.is_empty() {
                progress(visited, total);
                continue;
            }
            for (l2_index, entry) in new {
                table[l2_index] = entry.0;
            }
            // (a), (b): the zeros and the new counts ordered before the table naming them.
            self.write_refcount_structures()?;
            self.ordering_point()?;
            self.write_metadata(
                l2_offset,
                &bytes::encode_table(&table),
                "writing a snapshot's L2 table",
            )?;
            self.storage_flush()?;
            progress(visited, total);
        }
        Ok(())
    }

    /// The entries of the L2 table at `l2_offset` (`table`, standard entries) that a downgrade
    /// changes, and what they become; the zeros of the clusters they name are written here.
    fn expanded_entries(
        &mut self,
        table: &[u64],
        l2_offset: u64,
        first_guest_cluster: u64,
        has_backing: bool,
        zeros: &[u8],
    ) -> Result<Vec<(usize, L2Entry)>> {
        let table_refcount = self.refcount(l2_offset >> self.cluster_bits)?;
        let mut new = Vec::new();
        for (l2_index, &raw) in table.iter().enumerate() {
            if raw & EntryFlags::ZERO.bits() == 0 || raw & EntryFlags::COMPRESSED.bits() != 0 {
                continue;
            }
            // Validated as a lookup validates it (a misaligned cluster is refused).
            let guest_cluster = first_guest_cluster + l2_index as u64;
            self.decode_l2(
                raw,
                crate::engine::format::entry::SubclusterBitmap::EMPTY,
                guest_cluster,
            )?;
            let host_offset = raw & OFFSET_MASK;
            let entry = if host_offset == 0 && !has_backing {
                L2Entry::UNALLOCATED
            } else if host_offset == 0 {
                let host_offset = self.alloc_cluster()?;
                if table_refcount > 1 {
                    self.set_refcount(host_offset >> self.cluster_bits, table_refcount)?;
                }
                self.write_zeros_for_expansion(host_offset, zeros)?;
                if table_refcount == 1 {
                    L2Entry::data_copied(host_offset)
                } else {
                    L2Entry(host_offset)
                }
            } else {
                self.check_data_target(host_offset)?;
                self.write_zeros_for_expansion(host_offset, zeros)?;
                L2Entry(raw & !EntryFlags::ZERO.bits())
            };
            new.push((l2_index, entry));
        }
        Ok(new)
    }

    /// Zeros of an expanded cluster: guest data for rule (a), ordered before its entry.
    fn write_zeros_for_expansion(&mut self, host_offset: u64, zeros: &[u8]) -> Result<()> {
        self.storage
            .write_at(host_offset, zeros)
            .map_err(|e| Error::io(format!("writing zeros at {host_offset:#x}"), e))?;
        self.unordered.data = true;
        self.unbarriered_writes = true;
        self.unflushed_writes = true;
        Ok(())
    }

    /// Writes `header` in place of the current one: everything before made durable first,
    /// then the header cluster in one write, then a sync. Refused before anything is written
    /// if it does not encode.
    pub(in crate::engine) fn rewrite_header(&mut self, header: Header, what: &str) -> Result<()> {
        header.encode()?;
        self.write_back()?;
        self.storage_flush()?;
        // From the header as the flush left it (its table fields are the current ones).
        let header = Header {
            l1_table_offset: self.header.l1_table_offset,
            l1_size_entries: self.header.l1_size_entries,
            refcount_table_offset: self.header.refcount_table_offset,
            refcount_table_clusters: self.header.refcount_table_clusters,
            virtual_size: self.header.virtual_size,
            ..header
        };
        let bytes = header.encode()?;
        let parsed = Header::parse(&bytes)?;
        self.write_metadata(0, &bytes, what)?;
        self.storage_flush()?;
        self.header = parsed;
        Ok(())
    }
}

/// Records `name` as the external data file's (empty: none), where QEMU puts the
/// extension: after the backing format's.
fn set_data_file_name(header: &mut Header, name: &[u8]) {
    header
        .extensions
        .retain(|e| e.kind != ext::EXTERNAL_DATA_FILE);
    if name.is_empty() {
        return;
    }
    let at = header
        .extensions
        .iter()
        .take_while(|e| e.kind == ext::BACKING_FORMAT)
        .count();
    header.extensions.insert(
        at,
        RawExtension {
            kind: ext::EXTERNAL_DATA_FILE,
            data: name.to_vec(),
        },
    );
}

/// One of `count` steps of an amend: its own (done, total) told as a share of the whole.
struct StepProgress<'a> {
    progress: &'a mut dyn FnMut(u64, u64),
    index: u64,
    count: u64,
}

impl StepProgress<'_> {
    fn report(&mut self, done: u64, total: u64) {
        let count = self.count.max(1);
        (self.progress)(self.index * total + done.min(total), count * total);
    }
}
