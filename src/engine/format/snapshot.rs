//! The internal snapshot table: `nb_snapshots` variable-length entries at `snapshots_offset`,
//! parsed and validated once at open.
//!
//! On-disk entry (all big-endian), each one starting at an 8-byte boundary:
//! - bytes 0..8 `l1_table_offset`, 8..12 `l1_size` (entries), 12..14 `id_str_size`,
//!   14..16 `name_size`, 16..20 `date_sec`, 20..24 `date_nsec`, 24..32 `vm_clock_nsec`,
//!   32..36 `vm_state_size`, 36..40 `extra_data_size`;
//! - `extra_data_size` bytes of extra data: `vm_state_size_large` (8), `disk_size` (8),
//!   `icount` (8), then anything a later version adds;
//! - the id string, then the name string (neither NUL-terminated);
//! - padding up to the next multiple of 8.
//!
//! Everything is checked against QEMU's limits and the file length before it is used, and
//! reading is bounded by the file length, so a hostile table costs at most the file's size in
//! memory. A malformed table is [`Error::Invalid`] naming the snapshot and the field.

use crate::engine::error::{Error, Result};
use crate::engine::format::bytes::BeBytes;
use crate::engine::format::header::Header;
use crate::engine::format::layout::{Region, MAX_L1_BYTES, MAX_SNAPSHOTS};
use crate::engine::storage::Storage;

/// QEMU's `QCOW_MAX_SNAPSHOTS_SIZE`: the whole table, at most 64 MiB.
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
/// QEMU's `QCOW_MAX_SNAPSHOT_EXTRA_DATA`.
pub const MAX_SNAPSHOT_EXTRA_DATA_BYTES: u32 = 1024;
/// Length of the fixed part of an entry.
pub const SNAPSHOT_FIXED_BYTES: u64 = 40;
/// Extra data every version 3 entry must have: `vm_state_size_large` and `disk_size`.
pub const V3_MIN_EXTRA_DATA_BYTES: u32 = 16;

/// The name of the metadata region of each snapshot's L1 table.
pub const SNAPSHOT_L1_REGION: &str = "snapshot L1 table";
/// The name of the metadata region of the snapshot table.
pub const SNAPSHOT_TABLE_REGION: &str = "snapshot table";

/// One internal snapshot, as its table entry describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The unique id string (QEMU numbers them "1", "2", ...), as stored: names have no
    /// encoding in qcow2, so they are bytes, as QEMU keeps them (shown with
    /// [`crate::engine::format::header::display_name`]), the same rule as for the backing
    /// file name.
    pub id: Vec<u8>,
    /// The user-given name (tag), as stored.
    pub name: Vec<u8>,
    pub date_sec: u32,
    pub date_nsec: u32,
    /// Guest clock at the time of the snapshot, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Bytes of saved VM state (the 64-bit field from the extra data when present).
    pub vm_state_size: u64,
    /// Virtual disk size at the time of the snapshot (from the extra data, else the image's).
    pub disk_size: u64,
    /// Instruction count at the time of the snapshot, when recorded.
    pub icount: Option<u64>,
    pub l1_table_offset: u64,
    pub l1_size_entries: u32,
    /// Extra data bytes the entry has (QEMU requires at least 16 in version 3 images).
    pub extra_data_size: u32,
    /// Where the entry starts in the file.
    pub entry_offset: u64,
    /// The entry exactly as stored, without its padding: fixed part, extra data (known and
    /// unknown), id and name. A writer re-emits unknown extra data from here.
    pub raw: Vec<u8>,
}

impl Snapshot {
    /// The extra data bytes that follow the fixed part, as stored.
    pub fn extra_data(&self) -> &[u8] {
        let start = SNAPSHOT_FIXED_BYTES as usize;
        self.raw
            .get(start..start + self.extra_data_size as usize)
            .unwrap_or(&[])
    }
}

fn invalid(index: usize, msg: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("snapshot {index}: {msg}"))
}

/// Reads `len` bytes at `offset`; the caller checked the range against the file length.
fn read_bytes<S: Storage>(storage: &S, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut bytes = vec![0u8; len as usize];
    storage
        .read_at(offset, &mut bytes)
        .map_err(|e| Error::io(format!("reading the snapshot table at {offset:#x}"), e))?;
    Ok(bytes)
}

/// The bytes the table occupies from `snapshots_offset`: every entry padded to 8 bytes except
/// the last (QEMU's `snapshots_size`).
pub fn table_bytes(header: &Header, snapshots: &[Snapshot]) -> u64 {
    snapshots
        .last()
        .map(|s| s.entry_offset + s.raw.len() as u64 - header.snapshots_offset)
        .unwrap_or(0)
}

/// What QEMU's limits cut from a snapshot table read for `qemu-img check` (QEMU's qcow2 reads
/// such a table in part then, and its `check -r all` writes the part back): an entry's extra
/// data past [`MAX_SNAPSHOT_EXTRA_DATA_BYTES`], and the snapshots past [`MAX_SNAPSHOTS`] or
/// past [`MAX_SNAPSHOT_TABLE_BYTES`] of table. Any other open refuses the table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableOverLimits {
    /// Entries (index, extra data bytes on disk) whose extra data was cut to the limit.
    pub extra_data_cut: Vec<(usize, u32)>,
    /// Snapshots dropped from the end of the table.
    pub overhanging: u32,
    /// They were dropped because the table grew past its byte limit (else: their count).
    pub table_too_big: bool,
}

impl TableOverLimits {
    /// Why an open refuses the table (QEMU's message, with its hint where QEMU gives one).
    pub fn open_refusal(&self) -> String {
        if let Some(&(index, _)) = self.extra_data_cut.first() {
            format!(
                "Too much extra metadata in snapshot table entry {index}\nYou can \
                 force-remove this extra metadata with qemu-img check -r all"
            )
        } else if self.table_too_big {
            format!(
                "Snapshot table is too big\nYou can force-remove all {} overhanging snapshots \
                 with qemu-img check -r all",
                self.overhanging
            )
        } else {
            "Snapshot table too large".into()
        }
    }

    /// Why a check that may not repair errors stops (QEMU's lines).
    pub fn check_refusal(&self) -> String {
        if self.extra_data_cut.is_empty() && !self.table_too_big {
            format!(
                "ERROR snapshot table too large\nYou can force-remove all {} overhanging \
                 snapshots with qemu-img check -r all",
                self.overhanging
            )
        } else {
            format!(
                "ERROR failed to read the snapshot table: {}",
                self.open_refusal()
            )
        }
    }

    /// The corruptions a repair fixes, as QEMU counts them: each entry cut and each
    /// snapshot dropped.
    pub fn corruptions(&self) -> u64 {
        self.extra_data_cut.len() as u64 + u64::from(self.overhanging)
    }

    /// What `check -r all` reports it discarded, one line per repair.
    pub fn repairs(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .extra_data_cut
            .iter()
            .map(|(index, bytes)| {
                format!(
                    "Discarding too much extra metadata in snapshot table entry {index} \
                     ({bytes} > {MAX_SNAPSHOT_EXTRA_DATA_BYTES})"
                )
            })
            .collect();
        if self.overhanging > 0 {
            lines.push(if self.table_too_big {
                format!(
                    "Discarding {} overhanging snapshots (snapshot table is too big)",
                    self.overhanging
                )
            } else {
                format!("Discarding {} overhanging snapshots", self.overhanging)
            });
        }
        lines
    }
}

/// Parses and validates the snapshot table named by the header. `regions` holds the header,
/// L1 table and refcount table regions (validated by `layout`); the snapshot table and every
/// snapshot's L1 table are checked against them and then added to it.
///
/// A table over QEMU's limits is refused, unless `for_check`: then it is read in part and
/// what was cut is returned (see [`TableOverLimits`]).
pub fn read_table<S: Storage>(
    storage: &S,
    header: &Header,
    file_len: u64,
    regions: &mut Vec<Region>,
    for_check: bool,
) -> Result<(Vec<Snapshot>, Option<TableOverLimits>)> {
    let mut over = TableOverLimits::default();
    let refuse = |over: &TableOverLimits| Error::Refused {
        errno: libc::EFBIG,
        msg: over.open_refusal(),
    };
    let count = header.nb_snapshots;
    if count == 0 {
        return Ok((Vec::new(), None));
    }
    let count = if count > MAX_SNAPSHOTS {
        over.overhanging = count - MAX_SNAPSHOTS;
        if !for_check {
            return Err(refuse(&over));
        }
        MAX_SNAPSHOTS
    } else {
        count
    };
    let cluster_size = header.cluster_size();
    let table_start = header.snapshots_offset;
    if table_start == 0 || !table_start.is_multiple_of(cluster_size) {
        return Err(Error::Invalid(format!(
            "snapshot table offset {table_start:#x} is 0 or not cluster aligned"
        )));
    }

    let mut snapshots = Vec::new();
    let mut offset = table_start;
    for index in 0..count as usize {
        offset = offset.next_multiple_of(8);
        let (snapshot, disk_len, disk_extra_data_size) =
            read_entry(storage, header, file_len, index, offset, for_check)?;
        if disk_extra_data_size > snapshot.extra_data_size {
            over.extra_data_cut.push((index, disk_extra_data_size));
            if !for_check {
                return Err(refuse(&over));
            }
        }
        // The limit holds for the table as it is on disk, as QEMU counts it.
        let entry_end = offset + disk_len;
        if entry_end - table_start > MAX_SNAPSHOT_TABLE_BYTES {
            over.table_too_big = true;
            over.overhanging = count - index as u32;
            if !for_check {
                return Err(refuse(&over));
            }
            break;
        }
        offset = entry_end;
        snapshots.push(snapshot);
    }

    let table_region = Region {
        name: SNAPSHOT_TABLE_REGION,
        start: table_start,
        end: offset.next_multiple_of(cluster_size),
    };
    if let Some(r) = regions
        .iter()
        .find(|r| r.overlaps(table_region.start, table_region.end))
    {
        return Err(Error::Invalid(format!(
            "snapshot table ({:#x}..{:#x}) overlaps the {} ({:#x}..{:#x})",
            table_region.start, table_region.end, r.name, r.start, r.end
        )));
    }
    regions.push(table_region);
    let fixed_regions = regions.len();

    for (index, s) in snapshots.iter().enumerate() {
        if let Some(region) = l1_region(s, index, cluster_size, file_len)? {
            if let Some(r) = regions
                .get(..fixed_regions)
                .unwrap_or(&[])
                .iter()
                .find(|r| r.overlaps(region.start, region.end))
            {
                return Err(invalid(
                    index,
                    format!(
                        "l1_table_offset {:#x} ({} entries) overlaps the {} ({:#x}..{:#x})",
                        s.l1_table_offset, s.l1_size_entries, r.name, r.start, r.end
                    ),
                ));
            }
            regions.push(region);
        }
    }
    let over = (over != TableOverLimits::default()).then_some(over);
    Ok((snapshots, over))
}

/// Reads and checks the entry starting at `offset` (8-byte aligned), and returns it with its
/// length and its extra data size on disk.
///
/// Extra data past QEMU's limit is left out of the entry read (its fields are in the first
/// bytes), so its length is then shorter than on disk: only when reading `for_check`, which
/// also reads what such an entry has past the end of the file as zeros, as QEMU's qcow2
/// reads it (its id and name, at most 128 KiB), so that a repair can write the entry back.
/// Any other open refuses the entry before reading more than its fixed part.
fn read_entry<S: Storage>(
    storage: &S,
    header: &Header,
    file_len: u64,
    index: usize,
    offset: u64,
    for_check: bool,
) -> Result<(Snapshot, u64, u32)> {
    let past_eof = |what: &str, end: u64| {
        invalid(
            index,
            format!(
                "{what} at {offset:#x} runs to {end:#x}, past the end of the file ({file_len} \
                 bytes)"
            ),
        )
    };
    let fixed_end = offset
        .checked_add(SNAPSHOT_FIXED_BYTES)
        .ok_or_else(|| past_eof("entry", u64::MAX))?;
    if fixed_end > file_len {
        return Err(past_eof("entry", fixed_end));
    }
    let fixed = read_bytes(storage, offset, SNAPSHOT_FIXED_BYTES)?;
    let what = format!("snapshot {index}");
    let f = BeBytes::new(&what, &fixed);
    let l1_table_offset = f.u64(0)?;
    let l1_size_entries = f.u32(8)?;
    let id_size = u64::from(f.u16(12)?);
    let name_size = u64::from(f.u16(14)?);
    let disk_extra_data_size = f.u32(36)?;
    let extra_data_size = disk_extra_data_size.min(MAX_SNAPSHOT_EXTRA_DATA_BYTES);
    let cut = extra_data_size < disk_extra_data_size;
    if cut && !for_check {
        let over = TableOverLimits {
            extra_data_cut: vec![(index, disk_extra_data_size)],
            ..Default::default()
        };
        return Err(Error::Refused {
            errno: libc::EFBIG,
            msg: over.open_refusal(),
        });
    }
    let rest = u64::from(disk_extra_data_size) + id_size + name_size;
    let entry_end = fixed_end + rest;
    if entry_end > file_len && !cut {
        return Err(past_eof("entry (with extra data, id and name)", entry_end));
    }
    // Within the file, except for a cut entry read for a check (see above).
    let read = |at: u64, len: u64| -> Result<Vec<u8>> {
        let inside = file_len.saturating_sub(at).min(len);
        let mut bytes = if inside > 0 {
            read_bytes(storage, at, inside)?
        } else {
            Vec::new()
        };
        bytes.resize(len as usize, 0);
        Ok(bytes)
    };
    let mut raw = fixed;
    raw[36..40].copy_from_slice(&extra_data_size.to_be_bytes());
    raw.extend_from_slice(&read(fixed_end, u64::from(extra_data_size))?);
    let names_start = fixed_end + u64::from(disk_extra_data_size);
    raw.extend_from_slice(&read(names_start, id_size + name_size)?);

    let entry = BeBytes::new(&what, &raw);
    let extra_start = SNAPSHOT_FIXED_BYTES as usize;
    let extra = BeBytes::new(&what, entry.slice(extra_start, extra_data_size as usize)?);
    // An extra data field is there when the extra data is long enough to hold it.
    let extra_field = |at: usize| {
        if extra.len() >= at + 8 {
            extra.u64(at).map(Some)
        } else {
            Ok(None)
        }
    };
    let vm_state_size = match extra_field(0)? {
        Some(large) => large,
        None => u64::from(entry.u32(32)?),
    };
    let disk_size = extra_field(8)?.unwrap_or(header.virtual_size);
    let icount = extra_field(16)?;
    let id_start = extra_start + extra_data_size as usize;
    let name_start = id_start + id_size as usize;
    let snapshot = Snapshot {
        id: entry.slice(id_start, id_size as usize)?.to_vec(),
        name: entry.slice(name_start, name_size as usize)?.to_vec(),
        date_sec: entry.u32(16)?,
        date_nsec: entry.u32(20)?,
        vm_clock_nsec: entry.u64(24)?,
        vm_state_size,
        disk_size,
        icount,
        l1_table_offset,
        l1_size_entries,
        extra_data_size,
        entry_offset: offset,
        raw,
    };
    Ok((snapshot, entry_end - offset, disk_extra_data_size))
}

/// The region a snapshot's L1 table occupies (None for an empty table), checked against
/// QEMU's size limit, the cluster alignment and the file length.
fn l1_region(
    s: &Snapshot,
    index: usize,
    cluster_size: u64,
    file_len: u64,
) -> Result<Option<Region>> {
    let bytes = u64::from(s.l1_size_entries) * 8;
    if bytes > MAX_L1_BYTES {
        return Err(invalid(
            index,
            format!(
                "l1_size {} too large ({bytes} bytes, limit {MAX_L1_BYTES})",
                s.l1_size_entries
            ),
        ));
    }
    if !s.l1_table_offset.is_multiple_of(cluster_size) {
        return Err(invalid(
            index,
            format!(
                "l1_table_offset {:#x} not cluster aligned",
                s.l1_table_offset
            ),
        ));
    }
    if bytes == 0 {
        return Ok(None);
    }
    if s.l1_table_offset == 0 {
        return Err(invalid(index, "l1_table_offset is 0 (inside the header)"));
    }
    let end = s
        .l1_table_offset
        .checked_add(bytes)
        .filter(|&e| e <= file_len);
    let Some(end) = end else {
        return Err(invalid(
            index,
            format!(
                "l1_table_offset {:#x} with {} entries extends beyond the end of the file ({} \
                 bytes)",
                s.l1_table_offset, s.l1_size_entries, file_len
            ),
        ));
    };
    Ok(Some(Region {
        name: SNAPSHOT_L1_REGION,
        start: s.l1_table_offset,
        end: end.next_multiple_of(cluster_size),
    }))
}

/// The known extra data QEMU writes after the fixed part of every entry:
/// `vm_state_size_large`, `disk_size` and `icount`.
pub const WRITTEN_EXTRA_DATA_BYTES: u32 = 24;

impl Snapshot {
    /// Rebuilds `raw` from the fields, as QEMU's qcow2 writes an entry: the 32-bit VM state
    /// size only when it fits (0 otherwise, so that an older reader takes the snapshot as
    /// disk only rather than cut its state), at least the 24 bytes of known extra data, the
    /// unknown extra data a later version wrote kept after them, `icount` all ones when none
    /// was recorded.
    pub fn encode(&mut self) {
        let unknown = self
            .extra_data()
            .get(WRITTEN_EXTRA_DATA_BYTES as usize..)
            .unwrap_or(&[])
            .to_vec();
        let extra_data_size = WRITTEN_EXTRA_DATA_BYTES + unknown.len() as u32;
        let mut raw = Vec::with_capacity(
            SNAPSHOT_FIXED_BYTES as usize
                + extra_data_size as usize
                + self.id.len()
                + self.name.len(),
        );
        raw.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        raw.extend_from_slice(&self.l1_size_entries.to_be_bytes());
        raw.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
        raw.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        raw.extend_from_slice(&self.date_sec.to_be_bytes());
        raw.extend_from_slice(&self.date_nsec.to_be_bytes());
        raw.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        let small_vm_state = u32::try_from(self.vm_state_size).unwrap_or(0);
        raw.extend_from_slice(&small_vm_state.to_be_bytes());
        raw.extend_from_slice(&extra_data_size.to_be_bytes());
        raw.extend_from_slice(&self.vm_state_size.to_be_bytes());
        raw.extend_from_slice(&self.disk_size.to_be_bytes());
        raw.extend_from_slice(&self.icount.unwrap_or(u64::MAX).to_be_bytes());
        raw.extend_from_slice(&unknown);
        raw.extend_from_slice(&self.id);
        raw.extend_from_slice(&self.name);
        self.extra_data_size = extra_data_size;
        self.raw = raw;
    }
}

/// Lays `snapshots` out as a table starting at `table_start` (each entry encoded anew and
/// starting at an 8-byte boundary, its `entry_offset` set) and returns the table's bytes,
/// without padding after the last entry. Refuses a table above QEMU's 64 MiB limit
/// (`EFBIG`, as QEMU's qcow2).
pub fn encode_table(table_start: u64, snapshots: &mut [Snapshot]) -> Result<Vec<u8>> {
    let mut table = Vec::new();
    for s in snapshots.iter_mut() {
        s.encode();
        table.resize(table.len().next_multiple_of(8), 0);
        s.entry_offset = table_start + table.len() as u64;
        table.extend_from_slice(&s.raw);
        if table.len() as u64 > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(Error::Refused {
                errno: libc::EFBIG,
                msg: format!("the snapshot table would grow past {MAX_SNAPSHOT_TABLE_BYTES} bytes"),
            });
        }
    }
    Ok(table)
}
