//! An external data file (incompatible feature bit 2): the image file keeps only metadata,
//! and guest cluster `n` lives at offset `n * cluster_size` of the data file, which nothing
//! refcounts (the spec). So allocating a cluster is naming it: the L2 entry gets its guest
//! offset and COPIED (an entry of offset 0 with COPIED is guest cluster 0 there, not
//! unallocated), no refcount changes, nothing is ever freed, and no zero reserve is needed.
//! Compressed clusters and internal snapshots do not exist with a data file; transaction
//! groups are refused at open (a group never overwrites what the durable image names, and
//! here every cluster has one place).
//!
//! With the raw bit (autoclear bit 1) the data file must read as the guest's disk on its own,
//! so zeroing writes zeros there too, not only the zero flag.
//!
//! Ordering invariant (kept by `sync_data_file`, which `ordering_point` and `storage_flush`
//! call first): the data file's writes are made durable before any later write of the image
//! file that an ordering point separates from them, and before a flush returns. Data and the
//! L2 entries naming it live in two files, and no barrier of one file orders the other: the
//! rule "L2 entries after the data they name" of `writeback.rs` needs the data file's
//! fdatasync at the ordering point that precedes those entries.

use crate::engine::error::{Error, Result};
use crate::engine::format::entry::{Cluster, EntryFlags, L2Entry};
use crate::engine::image::request::{CowFill, InflightAlloc, WritePiece};
use crate::engine::image::Image;
use crate::engine::storage::Storage;

impl<S: Storage> Image<S> {
    /// Whether guest clusters live in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.data_file.is_some()
    }

    /// The external data file's storage, if the image has one.
    pub fn data_file(&self) -> Option<&S> {
        self.data_file.as_ref()
    }

    /// What L2 entry `raw` of `guest_cluster` says in an image with a data file: the entry
    /// decoded with the data file's rules, its offset checked against the guest's.
    pub(in crate::engine) fn decode_data_file_entry(
        &self,
        raw: u64,
        guest_cluster: u64,
    ) -> Result<Cluster> {
        let cluster = if raw == EntryFlags::COPIED.bits() {
            // Offset 0 is a valid place in the data file: COPIED tells it from unallocated.
            Cluster::Data {
                host_offset: 0,
                copied: true,
            }
        } else {
            L2Entry(raw).decode(self.cluster_bits, self.header.version, guest_cluster)?
        };
        let guest_offset = guest_cluster << self.cluster_bits;
        match cluster {
            Cluster::Compressed { .. } => Err(Error::Corrupt(format!(
                "compressed cluster entry for guest cluster {guest_cluster} in an image with an \
                 external data file"
            ))),
            Cluster::Data { host_offset, .. } | Cluster::Zero { host_offset, .. }
                if host_offset != 0 && host_offset != guest_offset =>
            {
                Err(Error::Corrupt(format!(
                    "external data file host cluster offset {host_offset:#x} does not match \
                     guest cluster offset {guest_offset:#x}"
                )))
            }
            Cluster::Data {
                host_offset: 0,
                copied,
            } if guest_offset != 0 => Err(Error::Corrupt(format!(
                "external data file host cluster offset 0 does not match guest cluster offset \
                 {guest_offset:#x} (copied {copied})"
            ))),
            other => Ok(other),
        }
    }

    /// The write of `[at, end)` into a run of guest clusters from `guest_cluster`, whose first
    /// state is `first_state` and which all need a cluster (unallocated or zero): their
    /// places in the data file, named by the L2 entries `finish_write` sets; the bytes of the
    /// first and last cluster the request does not cover are copied from what they read as
    /// now (the data file may hold anything there).
    pub(in crate::engine) fn plan_data_file_run(
        &mut self,
        guest_cluster: u64,
        first_state: Cluster,
        at: u64,
        end: u64,
        req_at: usize,
    ) -> Result<(WritePiece, u64)> {
        let cluster_size = self.cluster_size();
        let in_cluster = at & (cluster_size - 1);
        let last_cluster = (end - 1) >> self.cluster_bits;
        let mut clusters = 1;
        while guest_cluster + clusters <= last_cluster
            && !matches!(
                self.cluster_at(guest_cluster + clusters)?,
                Cluster::Data { .. }
            )
        {
            clusters += 1;
        }
        // The L2 table before anything else, as for any allocation.
        self.l2_table_for_write(guest_cluster)?;
        self.inflight_allocs.push(InflightAlloc {
            start: guest_cluster,
            end: guest_cluster + clusters,
        });
        let run_end = (guest_cluster + clusters) << self.cluster_bits;
        let stop = run_end.min(end);
        let head = self.cow_fill(first_state, guest_cluster, 0, in_cluster)?;
        let tail_len = run_end - stop;
        let tail = if tail_len == 0 {
            CowFill::NONE
        } else {
            let last = guest_cluster + clusters - 1;
            let last_state = if clusters == 1 {
                first_state
            } else {
                self.cluster_at(last)?
            };
            self.cow_fill(last_state, last, cluster_size - tail_len, tail_len)?
        };
        let piece = WritePiece::Allocate {
            host_offset: guest_cluster << self.cluster_bits,
            guest_cluster,
            clusters,
            head_start: 0,
            req_at,
            len: (stop - at) as usize,
            head,
            tail,
            // Nothing was allocated (nothing to give back if the write fails) and nothing is
            // freed: the clusters are the guest's own places.
            reused: true,
            needs_order: true,
        };
        Ok((piece, stop))
    }

    /// (The invariant of this module.) Makes the data file's writes durable, if there were
    /// any since the last time.
    pub(in crate::engine) fn sync_data_file(&mut self) -> Result<()> {
        if !self.data_unsynced {
            return Ok(());
        }
        if let Some(data) = &self.data_file {
            data.flush()
                .map_err(|e| Error::io("flushing the external data file", e))?;
            self.counters.storage_flushes += 1;
        }
        self.data_unsynced = false;
        Ok(())
    }

    /// With the raw bit, `[guest_offset, +len)` of the data file gets zeros written, so that
    /// the raw image reads what the guest reads after a write_zeroes or a discard that leaves
    /// zeros.
    pub(in crate::engine) fn zero_raw_data_file(
        &mut self,
        guest_offset: u64,
        len: u64,
    ) -> Result<()> {
        if !self.header.data_file_raw() {
            return Ok(());
        }
        let Some(data) = &self.data_file else {
            return Ok(());
        };
        const CHUNK_BYTES: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK_BYTES.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK_BYTES.min(len - done);
            data.write_at(guest_offset + done, &zeros[..n as usize])
                .map_err(|e| {
                    Error::io(
                        format!(
                            "writing zeros to the raw data file at {:#x}",
                            guest_offset + done
                        ),
                        e,
                    )
                })?;
            done += n;
        }
        self.data_unsynced = true;
        Ok(())
    }
}
