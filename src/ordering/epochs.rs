//! The `ordered` barrier mode's epoch buffer: order-preserving write-back in user space.
//!
//! On an ordinary Linux host nothing keeps two writes in order short of an `fdatasync` between
//! them. The `ordered` mode therefore keeps the guest's writes in memory, grouped into
//! *epochs* separated by barriers, and writes them back one epoch at a time: the writes of
//! epoch N+1 are issued only once epoch N is written *and* synced. A guest write completes as
//! soon as it is in this buffer; a barrier costs nothing but closing the open epoch; a crash
//! leaves the file holding a prefix of whole epochs plus part of the one being written back,
//! which is exactly what a barrier promises.
//!
//! [`EpochBuffer`] is the data structure only: single-threaded (the glue serialises access
//! from its coroutines), no I/O, no QEMU. The glue takes [`Job`]s from it, issues their
//! writes (concurrently, they never overlap) and one `fdatasync`, and reports back with
//! [`EpochBuffer::complete`] or [`EpochBuffer::fail`].
//!
//! # Invariants (each is restated next to the code that keeps it)
//! - **E1, order.** Epochs are numbered 1, 2, 3, … with no gaps (an empty epoch is never
//!   made). They are handed out oldest first, at most one at a time, and an epoch leaves the
//!   buffer only through [`EpochBuffer::complete`], which the caller calls once every write of
//!   the job *and* the fdatasync after them succeeded. So epoch N+1's writes are issued only
//!   once epoch N is durable, and the completed epochs are always 1..=`epochs_completed()`.
//! - **E2, closed epochs are immutable.** Only the open epoch's bytes are ever modified; an
//!   epoch handed out in a [`Job`] is closed, so a job's data is exactly what the epoch holds,
//!   on every retry too.
//! - **E3, extents.** Within an epoch the buffered ranges ("extents") are disjoint and kept
//!   sorted by offset; together they cover exactly the union of the epoch's writes, each byte
//!   holding the newest value the epoch wrote there. A job's writes are those extents: sorted
//!   and non-overlapping, so they may be issued in any order or all at once.
//! - **E4, read index.** A map of disjoint segments over all buffered bytes (closed, in-flight
//!   and open epochs) names, for each buffered byte, the newest epoch that wrote it and its
//!   extent; no segment covers an unbuffered byte. Applying only the newest epoch's byte is the
//!   same as applying every epoch oldest first, and a read finds its bytes with one range query
//!   instead of a scan of the epochs.
//! - **E5, accounting.** `buffered_bytes()` is the sum of the lengths of all extents of all
//!   epochs: the payload bytes actually held. Rewriting bytes already in the open epoch costs
//!   nothing (they are overwritten in place).
//! - **E6, bound.** A write is refused ([`WriteError::Full`]) when the bytes it adds would take
//!   `buffered_bytes()` over the limit, except that a write adding no bytes is always taken
//!   and any write is taken when nothing is buffered. Hence `buffered_bytes()` never exceeds
//!   `max(limit, size of the write that was accepted into the empty buffer)`, and a waiting
//!   writer never waits forever.
//! - **E7, failure.** A failed job leaves its epoch buffered and first in line; the next job
//!   re-issues *every* write of the epoch, not just the sync: after a failed fdatasync Linux may
//!   have dropped the dirty pages and marked them clean, so a second sync alone could succeed
//!   over lost data. Meanwhile the file may hold some of the failed epoch's writes: still a
//!   prefix of whole epochs plus part of the next one. The first error is kept until
//!   [`EpochBuffer::take_error`].
//!
//! # Bound semantics
//! The limit counts payload bytes (E5), not the per-extent bookkeeping (an `Arc` header, a map
//! entry and a read-index segment: on the order of 100 bytes per extent), and not data kept
//! alive only by a [`Job`] or an [`Overlay`] the caller still holds. A write waits (the glue
//! retries it after a `complete`) only while the buffer is full; see E6 for the exceptions.
//!
//! # What the glue must do
//! - On [`WriteError::Full`]: make write-back progress even if the guest sends no barrier:
//!   if no job is in flight, `take_next(true)` (closing the open epoch is an extra barrier,
//!   always allowed), then retry the write after the next `complete`. Queue waiting writes in
//!   order and admit no new one while one waits, or small writes can starve a large one.
//! - Background write-back: `take_next(false)` whenever no job is in flight and an epoch was
//!   closed; `take_next(true)` when a write waits for space or a drain or flush needs it.
//! - Guest barrier: [`EpochBuffer::barrier`], then report [`EpochBuffer::take_error`].
//! - Guest flush: `let mark = barrier()`, drive write-back until `is_durable(mark)`, returning
//!   the error of `take_error` if one appears (a failed job stops the flush; the epoch stays
//!   buffered for the next attempt), and `take_error` once more at the end. The last epoch's
//!   fdatasync is the flush's final one; another is needed only if something reached the file
//!   outside the buffer, or nothing was buffered and the flush must still reach the host.
//!   Writes arriving during the flush go to later epochs and do not hold it up.
//! - Reads: take [`EpochBuffer::snapshot`] *before* reading the file, apply it after. An epoch
//!   may complete (and leave the buffer) while the file read is in flight, and the read may
//!   have missed its writes; the snapshot still holds them.
//! - Close, reopen, snapshot, drain and resize: `barrier()`, then drive `take_next(true)` and
//!   `complete` until [`EpochBuffer::is_empty`].

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The next [`JobId`], process-wide.
static NEXT_JOB_ID: AtomicU64 = AtomicU64::new(1);

/// Identifies one hand-out of an epoch (a retry gets a new one). Unique in the process, so a
/// job handed back to the wrong buffer is always recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct JobId(u64);

/// One write of a [`Job`]: `data` goes to `offset`. The data is shared with the buffer, not
/// copied, and may be sent to another thread.
#[derive(Clone, Debug)]
pub struct JobWrite {
    pub offset: u64,
    pub data: Arc<[u8]>,
}

impl JobWrite {
    /// The offset just past this write.
    pub fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }
}

/// The write-back of one epoch: its writes, then one fdatasync. Hand it back to
/// [`EpochBuffer::complete`] or [`EpochBuffer::fail`]; until then no other job is handed out.
#[derive(Debug)]
#[must_use = "a job not handed back to complete or fail stops all write-back"]
pub struct Job {
    id: JobId,
    epoch: u64,
    attempt: u32,
    writes: Vec<JobWrite>,
}

impl Job {
    pub fn id(&self) -> JobId {
        self.id
    }

    /// The epoch's sequence number (1 for the first epoch).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// 1 for the first hand-out of this epoch, 2 after one failure, and so on: the glue may
    /// back off before retrying a failing epoch.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The writes, sorted by offset and non-overlapping (E3): they may be issued concurrently.
    pub fn writes(&self) -> &[JobWrite] {
        &self.writes
    }

    /// The writes grouped into runs of adjacent ones (each run one vectored write).
    pub fn runs(&self) -> impl Iterator<Item = &[JobWrite]> {
        self.writes.chunk_by(|a, b| a.end() == b.offset)
    }

    /// Payload bytes the job writes.
    pub fn bytes(&self) -> u64 {
        self.writes.iter().map(|w| w.data.len() as u64).sum()
    }
}

/// Why [`EpochBuffer::write`] did not take a write. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteError {
    /// The write would add `needed_bytes` to the `buffered_bytes` already held, over
    /// `limit_bytes`. Retry after a `complete` frees space (and make sure write-back runs:
    /// `take_next(true)` if no job is in flight).
    Full {
        needed_bytes: u64,
        buffered_bytes: u64,
        limit_bytes: u64,
    },
    /// `offset + len` does not fit in a u64 (the glue's requests never do this).
    OutOfRange { offset: u64, len: u64 },
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::Full {
                needed_bytes,
                buffered_bytes,
                limit_bytes,
            } => write!(
                f,
                "epoch buffer full: {needed_bytes} more bytes over the {buffered_bytes} held \
                 exceed the {limit_bytes}-byte limit"
            ),
            WriteError::OutOfRange { offset, len } => {
                write!(f, "write of {len} bytes at {offset:#x} ends past 2^64")
            }
        }
    }
}

impl std::error::Error for WriteError {}

/// A job handed back that is not the one in flight (a glue bug: a job from another buffer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleJob(pub JobId);

impl fmt::Display for StaleJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "epoch write-back job {:?} is not the one in flight",
            self.0
        )
    }
}

impl std::error::Error for StaleJob {}

/// The buffered bytes over one range at one moment, held without copying: apply them to a
/// read of the file issued *after* the snapshot was taken (see the module docs).
#[derive(Debug, Default)]
pub struct Overlay {
    pieces: Vec<OverlayPiece>,
}

#[derive(Debug)]
struct OverlayPiece {
    /// Where in the read buffer the piece goes.
    buf_at: usize,
    data: Arc<[u8]>,
    data_at: usize,
    len: usize,
}

impl Overlay {
    /// Whether no byte of the range is buffered (the read goes to the file alone).
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Copies the buffered bytes onto `buf` (the range's bytes as read from the file); returns
    /// whether any byte came from the buffer. `buf` is the range the snapshot was taken for;
    /// a shorter one gets the part that fits.
    pub fn apply(&self, buf: &mut [u8]) -> bool {
        let mut any = false;
        for p in &self.pieces {
            let Some(dst) = buf.get_mut(p.buf_at..) else {
                continue;
            };
            let n = p.len.min(dst.len());
            dst[..n].copy_from_slice(&p.data[p.data_at..p.data_at + n]);
            any |= n > 0;
        }
        any
    }
}

/// One epoch: the writes between two barriers.
#[derive(Debug)]
struct Epoch {
    seq: u64,
    /// Start offset → bytes. E3: disjoint, never empty, sorted by the map. Open epoch: only
    /// this buffer holds these `Arc`s (a snapshot may hold one briefly), so they are written
    /// in place; closed epoch: never modified (E2). An extent is never split, trimmed or
    /// merged: every extent edge is an edge of one of the epoch's writes, so an epoch of w
    /// writes has fewer than 2w extents.
    extents: BTreeMap<u64, Arc<[u8]>>,
    /// Sum of the extents' lengths (E5).
    bytes: u64,
    /// Failed write-backs of this epoch so far.
    failures: u32,
}

impl Epoch {
    fn new(seq: u64) -> Self {
        Epoch {
            seq,
            extents: BTreeMap::new(),
            bytes: 0,
            failures: 0,
        }
    }

    /// The parts of `[start, end)`, in order: covered by an existing extent, or a gap.
    fn pieces(&self, start: u64, end: u64, out: &mut Vec<Piece>) {
        // E3: extents are disjoint, so the only one starting before `start` that can reach
        // into the range is the last one.
        let before = self
            .extents
            .range(..start)
            .next_back()
            .filter(|(&s, d)| s + d.len() as u64 > start);
        let mut cursor = start;
        for (&s, d) in before.into_iter().chain(self.extents.range(start..end)) {
            if s > cursor {
                out.push(Piece::Gap {
                    from: cursor,
                    to: s,
                });
            }
            let to = (s + d.len() as u64).min(end);
            out.push(Piece::Covered {
                extent_start: s,
                from: cursor.max(s),
                to,
            });
            cursor = to;
        }
        if cursor < end {
            out.push(Piece::Gap {
                from: cursor,
                to: end,
            });
        }
    }
}

/// A part of a write's range as the open epoch holds it.
#[derive(Debug, Clone, Copy)]
enum Piece {
    /// `[from, to)` lies in the open epoch's extent starting at `extent_start`.
    Covered {
        extent_start: u64,
        from: u64,
        to: u64,
    },
    /// `[from, to)` is not in the open epoch.
    Gap { from: u64, to: u64 },
}

/// A read-index segment (E4): `[start, end)` (start is its map key) reads from the extent of
/// epoch `epoch` that starts at `extent_start`, which contains the whole segment.
#[derive(Debug, Clone, Copy)]
struct Segment {
    end: u64,
    epoch: u64,
    extent_start: u64,
}

/// Buffered writes grouped into epochs, and their write-back jobs. See the module docs.
#[derive(Debug)]
pub struct EpochBuffer {
    limit_bytes: u64,
    /// Closed epochs not yet completed, oldest first; the in-flight one, if any, is the front.
    closed: VecDeque<Epoch>,
    /// The epoch taking writes; its seq is one past the last closed (or completed) epoch.
    open: Epoch,
    /// The read index (E4): start → segment, disjoint.
    index: BTreeMap<u64, Segment>,
    /// The job handed out and not yet completed or failed: (job, epoch).
    in_flight: Option<(JobId, u64)>,
    error: Option<io::Error>,
    buffered_bytes: u64,
    peak_bytes: u64,
    epochs_completed: u64,
    failures: u64,
    /// Reused by `write` to avoid an allocation per write.
    scratch: Vec<Piece>,
}

impl EpochBuffer {
    /// An empty buffer holding at most `limit_bytes` payload bytes (E6).
    pub fn new(limit_bytes: u64) -> Self {
        EpochBuffer {
            limit_bytes,
            closed: VecDeque::new(),
            open: Epoch::new(1),
            index: BTreeMap::new(),
            in_flight: None,
            error: None,
            buffered_bytes: 0,
            peak_bytes: 0,
            epochs_completed: 0,
            failures: 0,
            scratch: Vec::new(),
        }
    }

    /// Buffers a write in the open epoch; the guest's write is complete once this returns Ok.
    ///
    /// Within the open epoch a later write replaces the bytes of earlier ones it overlaps
    /// (partial overlaps included): the overlapped bytes are overwritten in place and only the
    /// uncovered parts of the range take new memory (rather than splitting the older entry:
    /// no surviving byte is copied, and the bytes held are exactly the union of the epoch's
    /// writes). Refused with [`WriteError::Full`] when
    /// those new bytes do not fit under the limit (E6), and nothing is changed.
    ///
    /// Cost: O(len + (k + 1) log n) for k extents of the open epoch overlapped, n segments.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), WriteError> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(WriteError::OutOfRange {
                offset,
                len: data.len() as u64,
            })?;
        let mut pieces = std::mem::take(&mut self.scratch);
        pieces.clear();
        self.open.pieces(offset, end, &mut pieces);
        let needed_bytes: u64 = pieces
            .iter()
            .map(|p| match *p {
                Piece::Gap { from, to } => to - from,
                Piece::Covered { .. } => 0,
            })
            .sum();
        // E6: a write that adds nothing, or one into an empty buffer, is always taken; so a
        // waiting writer can always get in once the buffer drains.
        if needed_bytes > 0
            && self.buffered_bytes > 0
            && self.buffered_bytes.saturating_add(needed_bytes) > self.limit_bytes
        {
            self.scratch = pieces;
            return Err(WriteError::Full {
                needed_bytes,
                buffered_bytes: self.buffered_bytes,
                limit_bytes: self.limit_bytes,
            });
        }

        let seq = self.open.seq;
        for piece in pieces.drain(..) {
            match piece {
                Piece::Covered {
                    extent_start,
                    from,
                    to,
                } => {
                    let src = &data[(from - offset) as usize..(to - offset) as usize];
                    let at = (from - extent_start) as usize;
                    // E3: the extent exists (we just found it). The index already names the
                    // open epoch for these bytes (E4: it is the newest), so only the bytes
                    // change. E2: this is the open epoch, never handed out in a job.
                    if let Some(extent) = self.open.extents.get_mut(&extent_start) {
                        match Arc::get_mut(extent) {
                            Some(bytes) => bytes[at..at + src.len()].copy_from_slice(src),
                            None => {
                                // A snapshot still holds the old bytes: leave them to it.
                                let mut bytes = extent.to_vec();
                                bytes[at..at + src.len()].copy_from_slice(src);
                                *extent = Arc::from(bytes);
                            }
                        }
                    }
                }
                Piece::Gap { from, to } => {
                    let src = &data[(from - offset) as usize..(to - offset) as usize];
                    // E3: the gap touches no extent of the open epoch, so they stay disjoint.
                    self.open.extents.insert(from, Arc::from(src));
                    // E4: the open epoch is now the newest writer of [from, to).
                    self.clear_index(from, to);
                    self.index.insert(
                        from,
                        Segment {
                            end: to,
                            epoch: seq,
                            extent_start: from,
                        },
                    );
                    // E5.
                    self.open.bytes += to - from;
                    self.buffered_bytes += to - from;
                }
            }
        }
        self.scratch = pieces;
        self.peak_bytes = self.peak_bytes.max(self.buffered_bytes);
        Ok(())
    }

    /// Closes the open epoch if it holds writes: later writes are ordered after it. A barrier
    /// with nothing written since the last one adds no epoch (E1: no empty epochs).
    ///
    /// Returns the durability mark of everything written so far: the sequence number of the
    /// last closed epoch (0 if none ever was). A flush waits until [`Self::is_durable`] holds
    /// for it. The kept error, if any, is left for [`Self::take_error`].
    pub fn barrier(&mut self) -> u64 {
        if !self.open.extents.is_empty() {
            let next = Epoch::new(self.open.seq + 1);
            let closed = std::mem::replace(&mut self.open, next);
            self.closed.push_back(closed);
        }
        self.open.seq - 1
    }

    /// Whether every epoch up to `mark` (from [`Self::barrier`]) is written and synced.
    pub fn is_durable(&self, mark: u64) -> bool {
        // E1: epochs complete in order, so the completed ones are 1..=epochs_completed.
        self.epochs_completed >= mark
    }

    /// Applies the buffered bytes over `[offset, offset + buf.len())` onto `buf` (which holds
    /// the file's bytes), as if every buffered epoch were applied oldest first, the epoch
    /// being written back included; returns whether any byte came from the buffer.
    ///
    /// Cost: O(log n) when nothing overlaps; O(log n + k log m + bytes copied) for k
    /// segments, m extents per epoch. Use [`Self::snapshot`] when the file read happens
    /// while write-back may complete (see the module docs).
    pub fn overlay(&self, offset: u64, buf: &mut [u8]) -> bool {
        let mut any = false;
        self.for_each_piece(offset, buf.len(), |buf_at, data, data_at, len| {
            buf[buf_at..buf_at + len].copy_from_slice(&data[data_at..data_at + len]);
            any = true;
        });
        any
    }

    /// The buffered bytes over `[offset, offset + len)` as they are now, without copying
    /// them: take it before reading the file, apply it to what the read returned.
    pub fn snapshot(&self, offset: u64, len: usize) -> Overlay {
        let mut pieces = Vec::new();
        self.for_each_piece(offset, len, |buf_at, data, data_at, len| {
            pieces.push(OverlayPiece {
                buf_at,
                data: Arc::clone(data),
                data_at,
                len,
            })
        });
        Overlay { pieces }
    }

    /// Whether any byte of `[offset, offset + len)` is buffered. O(log n).
    pub fn overlaps(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        len > 0 && self.first_segment(offset, end).is_some()
    }

    /// The next epoch to write back, if none is in flight (E1: never two at a time): the
    /// oldest closed epoch, or, with `include_open` and no closed epoch waiting, the open one
    /// (which this closes, like a barrier). After a failure, the failed epoch again (E7).
    ///
    /// Cost: O(m) for an epoch of m extents (the data is shared, not copied).
    pub fn take_next(&mut self, include_open: bool) -> Option<Job> {
        if self.in_flight.is_some() {
            return None;
        }
        if self.closed.is_empty() && include_open {
            self.barrier();
        }
        // E1: the front is the oldest epoch not yet completed (a failed one stays there).
        let epoch = self.closed.front()?;
        let id = JobId(NEXT_JOB_ID.fetch_add(1, Ordering::Relaxed));
        self.in_flight = Some((id, epoch.seq));
        Some(Job {
            id,
            epoch: epoch.seq,
            attempt: epoch.failures + 1,
            // E3: BTreeMap order, disjoint. E2: closed, so this is all the epoch will ever be.
            writes: epoch
                .extents
                .iter()
                .map(|(&offset, data)| JobWrite {
                    offset,
                    data: Arc::clone(data),
                })
                .collect(),
        })
    }

    /// The job's writes and the fdatasync after them all succeeded: its epoch leaves the
    /// buffer and its memory is freed (once the caller's clones of the data are dropped, as
    /// `job` is here).
    ///
    /// Cost: O(m log n + s) for m extents and s index segments in their ranges.
    pub fn complete(&mut self, job: Job) -> Result<(), StaleJob> {
        self.check_in_flight(&job)?;
        drop(job);
        self.in_flight = None;
        // E1: the job's epoch is the front (take_next hands out only the front, and nothing
        // is removed from the deque while it is in flight).
        let Some(epoch) = self.closed.pop_front() else {
            return Ok(());
        };
        // E4: drop the segments naming this epoch. A segment lies within its extent, so the
        // extent's range finds them all; segments of newer epochs there stay.
        let mut stale = Vec::new();
        for (&start, data) in &epoch.extents {
            let end = start + data.len() as u64;
            stale.extend(
                self.index
                    .range(start..end)
                    .filter(|(_, seg)| seg.epoch == epoch.seq)
                    .map(|(&s, _)| s),
            );
        }
        for s in stale {
            self.index.remove(&s);
        }
        // E5.
        self.buffered_bytes -= epoch.bytes;
        self.epochs_completed += 1;
        Ok(())
    }

    /// The job's write-back or sync failed: its epoch stays buffered and first in line, to be
    /// written again in full by the next job (E7). The first error is kept until
    /// [`Self::take_error`]; later ones before it are only counted ([`Self::failures`]).
    pub fn fail(&mut self, job: Job, error: io::Error) -> Result<(), StaleJob> {
        self.check_in_flight(&job)?;
        self.in_flight = None;
        if let Some(epoch) = self.closed.front_mut() {
            epoch.failures = epoch.failures.saturating_add(1);
        }
        self.failures += 1;
        self.error.get_or_insert(error);
        Ok(())
    }

    /// The kept write-back error, once: the next flush or barrier reports it to the guest.
    pub fn take_error(&mut self) -> Option<io::Error> {
        self.error.take()
    }

    /// Nothing buffered and nothing in flight.
    pub fn is_empty(&self) -> bool {
        // An in-flight epoch is buffered until complete, so this covers both.
        self.closed.is_empty() && self.open.extents.is_empty()
    }

    /// Payload bytes held now (E5).
    pub fn buffered_bytes(&self) -> u64 {
        self.buffered_bytes
    }

    /// Payload bytes held in the open epoch (not yet closed by a barrier).
    pub fn open_bytes(&self) -> u64 {
        self.open.bytes
    }

    /// The most payload bytes ever held at once.
    pub fn peak_bytes(&self) -> u64 {
        self.peak_bytes
    }

    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    /// Epochs written back and synced since the buffer was made.
    pub fn epochs_completed(&self) -> u64 {
        self.epochs_completed
    }

    /// Epochs buffered: closed ones (the in-flight one included) and the open one if it holds
    /// writes.
    pub fn epochs_buffered(&self) -> usize {
        self.closed.len() + usize::from(!self.open.extents.is_empty())
    }

    /// The epoch of the job in flight, if any.
    pub fn in_flight(&self) -> Option<u64> {
        self.in_flight.map(|(_, epoch)| epoch)
    }

    /// Failed jobs since the buffer was made.
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// Checks the invariants that the state alone shows (E1, E3, E4, E5) by brute force, for
    /// tests and debug builds: O(segments × extents of all epochs).
    pub fn verify(&self) -> Result<(), String> {
        // E1: dense numbering.
        let all_epochs = self.closed.iter().chain(std::iter::once(&self.open));
        for (expect_seq, epoch) in (self.epochs_completed + 1..).zip(all_epochs) {
            if epoch.seq != expect_seq {
                return Err(format!("epoch {} where {expect_seq} belongs", epoch.seq));
            }
        }
        if let Some(e) = self.closed.iter().find(|e| e.extents.is_empty()) {
            return Err(format!("closed epoch {} is empty", e.seq));
        }
        if let Some((_, seq)) = self.in_flight {
            if self.closed.front().map(|e| e.seq) != Some(seq) {
                return Err(format!("epoch {seq} in flight is not the oldest"));
            }
        }
        // E3 and E5.
        let mut total = 0;
        let mut all = Vec::new();
        for epoch in self.closed.iter().chain(std::iter::once(&self.open)) {
            let mut bytes = 0;
            let mut prev_end = 0;
            for (&s, d) in &epoch.extents {
                if d.is_empty() || s < prev_end {
                    return Err(format!(
                        "epoch {}: extent at {s:#x} empty or overlapping",
                        epoch.seq
                    ));
                }
                prev_end = s + d.len() as u64;
                bytes += d.len() as u64;
                all.push((s, prev_end, epoch.seq));
            }
            if bytes != epoch.bytes {
                return Err(format!(
                    "epoch {} counts {} bytes, holds {bytes}",
                    epoch.seq, epoch.bytes
                ));
            }
            total += bytes;
        }
        if total != self.buffered_bytes {
            return Err(format!(
                "buffered_bytes {} but {total} held",
                self.buffered_bytes
            ));
        }
        if self.buffered_bytes > self.peak_bytes {
            return Err("peak below the current bytes".into());
        }
        // E4: disjoint segments, each inside its extent, naming the newest writer, and
        // together covering exactly the union of all extents.
        let mut prev_end = 0;
        let mut covered = 0;
        for (&s, seg) in &self.index {
            if s >= seg.end || s < prev_end {
                return Err(format!("segment at {s:#x} empty or overlapping"));
            }
            prev_end = seg.end;
            covered += seg.end - s;
            let inside = self
                .epoch(seg.epoch)
                .and_then(|e| e.extents.get(&seg.extent_start))
                .is_some_and(|d| {
                    seg.extent_start <= s && seg.end <= seg.extent_start + d.len() as u64
                });
            if !inside {
                return Err(format!("segment at {s:#x} is not inside its extent"));
            }
            if let Some(&(es, ee, newer)) = all
                .iter()
                .find(|&&(es, ee, q)| q > seg.epoch && es < seg.end && s < ee)
            {
                return Err(format!(
                    "segment at {s:#x} names epoch {} but epoch {newer} wrote {es:#x}..{ee:#x}",
                    seg.epoch
                ));
            }
        }
        all.sort_unstable();
        let mut union = 0;
        let mut run: Option<(u64, u64)> = None;
        for &(s, e, _) in &all {
            run = match run {
                Some((rs, re)) if s <= re => Some((rs, re.max(e))),
                Some((rs, re)) => {
                    union += re - rs;
                    Some((s, e))
                }
                None => Some((s, e)),
            };
        }
        union += run.map_or(0, |(rs, re)| re - rs);
        if union != covered {
            return Err(format!(
                "index covers {covered} bytes, {union} are buffered"
            ));
        }
        Ok(())
    }

    fn check_in_flight(&self, job: &Job) -> Result<(), StaleJob> {
        match self.in_flight {
            Some((id, _)) if id == job.id => Ok(()),
            _ => Err(StaleJob(job.id)),
        }
    }

    /// The buffered epoch numbered `seq`.
    fn epoch(&self, seq: u64) -> Option<&Epoch> {
        if seq == self.open.seq {
            return Some(&self.open);
        }
        // E1: the closed epochs are numbered consecutively from the front.
        let first = self.closed.front()?.seq;
        self.closed
            .get(usize::try_from(seq.checked_sub(first)?).ok()?)
    }

    /// The first segment overlapping `[start, end)`, if any.
    fn first_segment(&self, start: u64, end: u64) -> Option<(u64, Segment)> {
        let before = self
            .index
            .range(..start)
            .next_back()
            .filter(|(_, seg)| seg.end > start);
        before
            .or_else(|| self.index.range(start..end).next())
            .map(|(&s, &seg)| (s, seg))
    }

    /// Calls `f(buf_at, data, data_at, len)` for each buffered piece of `[offset, offset +
    /// len)` (E4: each byte from its newest epoch).
    fn for_each_piece(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(usize, &Arc<[u8]>, usize, usize),
    ) {
        let end = offset.saturating_add(len as u64);
        let Some((first, _)) = self.first_segment(offset, end) else {
            return;
        };
        for (&s, seg) in self.index.range(first..end) {
            let from = s.max(offset);
            let to = seg.end.min(end);
            let data = self
                .epoch(seg.epoch)
                .and_then(|e| e.extents.get(&seg.extent_start));
            debug_assert!(data.is_some(), "segment at {s:#x} names no extent");
            if let Some(data) = data {
                f(
                    (from - offset) as usize,
                    data,
                    (from - seg.extent_start) as usize,
                    (to - from) as usize,
                );
            }
        }
    }

    /// Removes `[start, end)` from the read index, trimming or splitting the segments that
    /// straddle its edges (E4: they keep naming the same extent, which still contains them).
    fn clear_index(&mut self, start: u64, end: u64) {
        if let Some((_, seg)) = self.index.range_mut(..start).next_back() {
            if seg.end > start {
                let tail = (seg.end > end).then_some(Segment {
                    end: seg.end,
                    ..*seg
                });
                seg.end = start;
                if let Some(tail) = tail {
                    // One segment held the whole range: nothing else is in it.
                    self.index.insert(end, tail);
                    return;
                }
            }
        }
        while let Some((&s, &seg)) = self.index.range(start..end).next() {
            self.index.remove(&s);
            if seg.end > end {
                self.index.insert(end, seg);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// The job's writes as (offset, bytes).
    fn writes_of(job: &Job) -> Vec<(u64, Vec<u8>)> {
        job.writes()
            .iter()
            .map(|w| (w.offset, w.data.to_vec()))
            .collect()
    }

    fn read(buffer: &EpochBuffer, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        buffer.overlay(offset, &mut buf);
        buf
    }

    fn checked(buffer: &EpochBuffer) {
        if let Err(e) = buffer.verify() {
            panic!("invariant broken: {e}");
        }
    }

    #[test]
    fn overlapping_writes_in_one_epoch_coalesce() {
        let mut b = EpochBuffer::new(MIB);
        b.write(100, &[1; 100]).unwrap(); // [100, 200)
        b.write(150, &[2; 100]).unwrap(); // right overlap: [150, 250)
        b.write(50, &[3; 100]).unwrap(); // left overlap: [50, 150)
        b.write(120, &[4; 10]).unwrap(); // inside: [120, 130)
        checked(&b);
        // Held once: the union [50, 250), whatever the overlaps.
        assert_eq!(b.buffered_bytes(), 200);
        let mut expect = vec![0u8; 300];
        expect[100..200].fill(1);
        expect[150..250].fill(2);
        expect[50..150].fill(3);
        expect[120..130].fill(4);
        assert_eq!(read(&b, 0, 300), expect);

        let job = b.take_next(true).unwrap();
        let writes = job.writes();
        assert!(writes.windows(2).all(|w| w[0].end() <= w[1].offset));
        let mut disk = vec![0u8; 300];
        for w in writes {
            disk[w.offset as usize..w.end() as usize].copy_from_slice(&w.data);
        }
        assert_eq!(disk, expect);
        // The pieces are adjacent: one vectored write.
        assert_eq!(job.runs().count(), 1);
        assert_eq!(job.bytes(), 200);
    }

    #[test]
    fn rewriting_the_same_block_in_one_epoch_holds_it_once() {
        let mut b = EpochBuffer::new(MIB);
        for i in 0..1000u32 {
            b.write(4096, &[i as u8; 4096]).unwrap();
        }
        assert_eq!(b.buffered_bytes(), 4096);
        assert_eq!(b.peak_bytes(), 4096);
        assert_eq!(read(&b, 4096, 4096), vec![(999 % 256) as u8; 4096]);
    }

    #[test]
    fn a_write_across_gaps_adds_only_the_gaps() {
        let mut b = EpochBuffer::new(MIB);
        b.write(0, &[1; 10]).unwrap();
        b.write(20, &[1; 10]).unwrap();
        b.write(40, &[1; 10]).unwrap();
        b.write(5, &[2; 40]).unwrap(); // [5, 45): gaps [10, 20) and [30, 40)
        checked(&b);
        assert_eq!(b.buffered_bytes(), 50);
        let mut expect = vec![1u8; 50];
        expect[5..45].fill(2);
        assert_eq!(read(&b, 0, 50), expect);
    }

    #[test]
    fn writes_touching_an_extent_by_one_byte_or_just_adjacent_coalesce_exactly() {
        let mut b = EpochBuffer::new(MIB);
        b.write(10, &[1; 10]).unwrap(); // [10, 20)
        b.write(19, &[2; 5]).unwrap(); // one byte over the end
        b.write(6, &[3; 5]).unwrap(); // one byte over the start
        b.write(24, &[4; 2]).unwrap(); // adjacent at the end
        b.write(4, &[5; 2]).unwrap(); // adjacent at the start
        checked(&b);
        assert_eq!(b.buffered_bytes(), 22);
        let mut expect = vec![0u8; 30];
        expect[10..20].fill(1);
        expect[19..24].fill(2);
        expect[6..11].fill(3);
        expect[24..26].fill(4);
        expect[4..6].fill(5);
        assert_eq!(read(&b, 0, 30), expect);
        let job = b.take_next(true).unwrap();
        assert_eq!(job.runs().count(), 1);
        assert_eq!(job.writes().first().map(|w| w.offset), Some(4));
        assert_eq!(job.writes().last().map(|w| w.end()), Some(26));
    }

    #[test]
    fn thousands_of_one_write_epochs_read_newest_first_and_drain_in_order() {
        let mut b = EpochBuffer::new(64 * MIB);
        // A barrier after every 4 KiB write, over 64 blocks: each block rewritten ~30 times.
        let block_of = |i: u64| (i * 37) % 64;
        let epochs = 2000u64;
        for i in 0..epochs {
            b.write(block_of(i) * 4096, &[(i % 251) as u8; 4096])
                .unwrap();
            b.barrier();
        }
        assert_eq!(b.epochs_buffered(), epochs as usize);
        let newest = |from: u64, block: u64| (from..epochs).rev().find(|&i| block_of(i) == block);
        let mut disk = vec![0u8; 64 * 4096];
        for done in 0..epochs {
            if done % 250 == 0 {
                checked(&b);
                for block in 0..64 {
                    let mut buf = disk[block as usize * 4096..][..4096].to_vec();
                    b.overlay(block * 4096, &mut buf);
                    let expect = newest(0, block).map_or(0, |i| (i % 251) as u8);
                    assert_eq!(buf, vec![expect; 4096], "block {block} after {done} epochs");
                }
            }
            let job = b.take_next(false).unwrap();
            assert_eq!(job.epoch(), done + 1);
            for w in job.writes() {
                disk[w.offset as usize..w.end() as usize].copy_from_slice(&w.data);
            }
            b.complete(job).unwrap();
        }
        assert!(b.is_empty());
        assert_eq!(b.peak_bytes(), epochs * 4096);
        checked(&b);
    }

    #[test]
    fn overlapping_writes_in_different_epochs_are_both_kept_and_applied_in_order() {
        let mut b = EpochBuffer::new(MIB);
        b.write(0, &[1; 100]).unwrap();
        assert_eq!(b.barrier(), 1);
        b.write(50, &[2; 100]).unwrap();
        assert_eq!(b.barrier(), 2);
        checked(&b);
        assert_eq!(b.buffered_bytes(), 200);
        let mut expect = vec![1u8; 150];
        expect[50..].fill(2);
        assert_eq!(read(&b, 0, 150), expect);

        let first = b.take_next(false).unwrap();
        assert_eq!(first.epoch(), 1);
        assert_eq!(writes_of(&first), vec![(0, vec![1; 100])]);
        b.complete(first).unwrap();
        // The newer epoch still reads over the old one's range; the old one's own bytes are
        // on disk now, not in the buffer.
        assert_eq!(read(&b, 0, 150)[50..], expect[50..]);
        assert_eq!(read(&b, 0, 50), vec![0u8; 50]);
        let second = b.take_next(false).unwrap();
        assert_eq!(second.epoch(), 2);
        assert_eq!(writes_of(&second), vec![(50, vec![2; 100])]);
        b.complete(second).unwrap();
        assert!(b.is_empty());
        assert_eq!(b.buffered_bytes(), 0);
        assert_eq!(b.epochs_completed(), 2);
        checked(&b);
    }

    #[test]
    fn a_barrier_with_nothing_new_adds_no_epoch() {
        let mut b = EpochBuffer::new(MIB);
        assert_eq!(b.barrier(), 0);
        assert!(b.is_empty());
        b.write(0, &[1; 8]).unwrap();
        assert_eq!(b.barrier(), 1);
        assert_eq!(b.barrier(), 1);
        assert_eq!(b.barrier(), 1);
        assert_eq!(b.epochs_buffered(), 1);
        let job = b.take_next(false).unwrap();
        b.complete(job).unwrap();
        assert!(b.take_next(false).is_none());
        assert!(b.take_next(true).is_none());
        assert_eq!(b.barrier(), 1);
        assert!(b.is_durable(1));
        checked(&b);
    }

    #[test]
    fn full_when_over_the_limit_and_accepted_again_after_complete() {
        let mut b = EpochBuffer::new(1000);
        b.write(0, &[1; 600]).unwrap();
        b.barrier();
        let err = b.write(1000, &[2; 500]).unwrap_err();
        assert_eq!(
            err,
            WriteError::Full {
                needed_bytes: 500,
                buffered_bytes: 600,
                limit_bytes: 1000
            }
        );
        // Refused means untouched.
        assert_eq!(b.buffered_bytes(), 600);
        assert_eq!(read(&b, 1000, 500), vec![0u8; 500]);
        checked(&b);
        // Exactly at the limit fits.
        b.write(1000, &[2; 400]).unwrap();
        assert!(b.write(2000, &[3; 1]).is_err());
        let job = b.take_next(false).unwrap();
        b.complete(job).unwrap();
        assert_eq!(b.buffered_bytes(), 400);
        b.write(2000, &[3; 500]).unwrap();
        assert_eq!(b.peak_bytes(), 1000);
        checked(&b);
    }

    #[test]
    fn rewriting_buffered_bytes_is_accepted_even_when_full() {
        let mut b = EpochBuffer::new(100);
        b.write(0, &[1; 100]).unwrap();
        assert!(b.write(100, &[2; 1]).is_err());
        b.write(10, &[3; 50]).unwrap();
        assert_eq!(b.buffered_bytes(), 100);
        assert_eq!(read(&b, 10, 1), vec![3]);
    }

    #[test]
    fn oversize_write_on_an_empty_buffer_is_accepted() {
        let mut b = EpochBuffer::new(100);
        b.write(0, &[1; 1000]).unwrap();
        assert_eq!(b.buffered_bytes(), 1000);
        // Nothing else gets in until it is written back...
        assert!(b.write(5000, &[2; 1]).is_err());
        let job = b.take_next(true).unwrap();
        assert!(b.write(5000, &[2; 1]).is_err());
        b.complete(job).unwrap();
        // ...and an oversize write needs the buffer empty, not merely below the limit.
        b.write(0, &[2; 1]).unwrap();
        assert!(b.write(10, &[3; 1000]).is_err());
        checked(&b);
    }

    #[test]
    fn only_one_job_in_flight_at_a_time() {
        let mut b = EpochBuffer::new(MIB);
        for i in 0..3 {
            b.write(i * 10, &[i as u8; 10]).unwrap();
            b.barrier();
        }
        let job = b.take_next(false).unwrap();
        assert_eq!(b.in_flight(), Some(1));
        assert!(b.take_next(false).is_none());
        assert!(b.take_next(true).is_none());
        b.complete(job).unwrap();
        let job = b.take_next(true).unwrap();
        assert_eq!(job.epoch(), 2);
        assert!(b.take_next(true).is_none());
        b.complete(job).unwrap();
        assert_eq!(b.take_next(false).unwrap().epoch(), 3);
    }

    #[test]
    fn take_next_with_include_open_closes_the_open_epoch_only_when_nothing_older_waits() {
        let mut b = EpochBuffer::new(MIB);
        b.write(0, &[1; 10]).unwrap();
        b.barrier();
        b.write(0, &[2; 10]).unwrap();
        let job = b.take_next(true).unwrap();
        assert_eq!(job.epoch(), 1);
        assert_eq!(b.open_bytes(), 10);
        b.complete(job).unwrap();
        assert!(
            b.take_next(false).is_none(),
            "the open epoch waits for a barrier"
        );
        let job = b.take_next(true).unwrap();
        assert_eq!(job.epoch(), 2);
        assert_eq!(b.open_bytes(), 0);
        // Writes after the implicit barrier go to a new epoch.
        b.write(0, &[3; 10]).unwrap();
        assert_eq!(b.epochs_buffered(), 2);
        b.complete(job).unwrap();
        assert_eq!(read(&b, 0, 10), vec![3; 10]);
    }

    #[test]
    fn overlay_includes_the_in_flight_epoch() {
        let mut b = EpochBuffer::new(MIB);
        b.write(4096, &[7; 4096]).unwrap();
        let job = b.take_next(true).unwrap();
        // Not written yet (or only partly): the read must come from the buffer.
        assert!(b.overlaps(4096, 1));
        assert_eq!(read(&b, 4000, 200)[96..], [7u8; 104]);
        b.complete(job).unwrap();
        assert!(!b.overlaps(0, 1 << 20));
    }

    #[test]
    fn overlay_of_an_unbuffered_range_reports_nothing_and_leaves_the_buffer_alone() {
        let mut b = EpochBuffer::new(MIB);
        b.write(100, &[1; 100]).unwrap();
        let mut buf = [9u8; 100];
        assert!(!b.overlay(0, &mut buf));
        assert!(!b.overlay(200, &mut buf));
        assert_eq!(buf, [9u8; 100]);
        assert!(b.overlay(199, &mut buf));
        assert_eq!(buf[0], 1);
        assert_eq!(buf[1..], [9u8; 99]);
        assert!(b.snapshot(0, 100).is_empty());
        assert!(!b.overlay(u64::MAX - 10, &mut buf));
    }

    #[test]
    fn error_is_kept_until_taken_and_the_epoch_is_retried() {
        let mut b = EpochBuffer::new(MIB);
        b.write(0, &[1; 10]).unwrap();
        b.write(20, &[2; 10]).unwrap();
        b.barrier();
        b.write(0, &[3; 10]).unwrap();
        b.barrier();
        let job = b.take_next(false).unwrap();
        let first = writes_of(&job);
        assert_eq!(job.attempt(), 1);
        b.fail(job, io::Error::other("disk on fire")).unwrap();
        // Still buffered, still read.
        assert_eq!(b.buffered_bytes(), 30);
        assert_eq!(read(&b, 20, 10), vec![2; 10]);
        // A second failure is counted but the first error is the one reported.
        let job = b.take_next(false).unwrap();
        assert_eq!((job.epoch(), job.attempt()), (1, 2));
        assert_eq!(writes_of(&job), first, "the retry re-issues every write");
        b.fail(job, io::Error::other("still on fire")).unwrap();
        assert_eq!(b.failures(), 2);
        assert_eq!(b.take_error().unwrap().to_string(), "disk on fire");
        assert!(b.take_error().is_none(), "reported once");
        let job = b.take_next(true).unwrap();
        assert_eq!((job.epoch(), job.attempt()), (1, 3));
        b.complete(job).unwrap();
        assert_eq!(b.take_next(false).unwrap().epoch(), 2);
        checked(&b);
    }

    #[test]
    fn a_job_of_another_buffer_is_refused() {
        let mut b = EpochBuffer::new(MIB);
        let mut other = EpochBuffer::new(MIB);
        b.write(0, &[1; 10]).unwrap();
        other.write(0, &[2; 10]).unwrap();
        let mine = b.take_next(true).unwrap();
        let theirs = other.take_next(true).unwrap();
        let theirs_id = theirs.id();
        assert_eq!(b.complete(theirs).unwrap_err(), StaleJob(theirs_id));
        assert_eq!(b.in_flight(), Some(1));
        b.complete(mine).unwrap();
        assert!(b.is_empty());
    }

    #[test]
    fn a_snapshot_taken_before_the_file_read_survives_the_epoch_completing() {
        let mut b = EpochBuffer::new(MIB);
        let mut disk = vec![0u8; 100];
        b.write(0, &[5; 100]).unwrap();
        let job = b.take_next(true).unwrap();
        let snapshot = b.snapshot(0, 100);
        // The file read starts now and sees the old bytes; meanwhile the job lands.
        let mut read = disk.clone();
        for w in job.writes() {
            disk[w.offset as usize..w.end() as usize].copy_from_slice(&w.data);
        }
        b.complete(job).unwrap();
        assert!(snapshot.apply(&mut read));
        assert_eq!(read, vec![5; 100]);
    }

    #[test]
    fn a_snapshot_keeps_its_bytes_when_the_open_epoch_is_rewritten() {
        let mut b = EpochBuffer::new(MIB);
        b.write(0, &[1; 10]).unwrap();
        let snapshot = b.snapshot(0, 10);
        b.write(5, &[2; 2]).unwrap();
        let mut buf = [0u8; 10];
        snapshot.apply(&mut buf);
        assert_eq!(buf, [1; 10]);
        assert_eq!(read(&b, 0, 10), [1, 1, 1, 1, 1, 2, 2, 1, 1, 1]);
        assert_eq!(b.buffered_bytes(), 10);
        checked(&b);
    }

    #[test]
    fn a_flush_mark_is_durable_only_once_every_epoch_before_it_completed() {
        let mut b = EpochBuffer::new(MIB);
        b.write(0, &[1; 10]).unwrap();
        b.barrier();
        b.write(0, &[2; 10]).unwrap();
        let mark = b.barrier();
        assert_eq!(mark, 2);
        b.write(0, &[3; 10]).unwrap(); // after the flush began: not part of it
        let job = b.take_next(false).unwrap();
        b.complete(job).unwrap();
        assert!(!b.is_durable(mark));
        let job = b.take_next(false).unwrap();
        b.complete(job).unwrap();
        assert!(b.is_durable(mark));
        assert!(!b.is_empty());
    }

    #[test]
    fn writes_of_nothing_or_past_the_end_of_the_offset_space_change_nothing() {
        let mut b = EpochBuffer::new(MIB);
        b.write(5, &[]).unwrap();
        assert!(b.is_empty());
        assert_eq!(
            b.write(u64::MAX - 1, &[1; 4]).unwrap_err(),
            WriteError::OutOfRange {
                offset: u64::MAX - 1,
                len: 4
            }
        );
        b.write(u64::MAX - 4, &[1; 4]).unwrap();
        assert_eq!(read(&b, u64::MAX - 4, 4), vec![1; 4]);
        checked(&b);
    }

    /// Overlay cost with a barrier after every 4 KiB write (`cargo test -- --ignored
    /// --nocapture overlay_cost`).
    #[test]
    #[ignore]
    fn overlay_cost_with_ten_thousand_single_write_epochs() {
        let mut b = EpochBuffer::new(1 << 30);
        let block = [0xabu8; 4096];
        for i in 0..10_000u64 {
            b.write((i * 7919 % 20_000) * 4096, &block).unwrap();
            b.barrier();
        }
        let mut buf = vec![0u8; 4096];
        let reads = 100_000u64;
        let start = std::time::Instant::now();
        let mut hits = 0;
        for i in 0..reads {
            hits += u64::from(b.overlay((i * 104_729 % 20_000) * 4096, &mut buf));
        }
        let per_read = start.elapsed() / reads as u32;
        println!(
            "{} epochs buffered: {per_read:?} per 4 KiB overlay ({hits} of {reads} hit)",
            b.epochs_buffered()
        );
        let start = std::time::Instant::now();
        while let Some(job) = b.take_next(true) {
            b.complete(job).unwrap();
        }
        println!("drained in {:?}", start.elapsed());
    }
}
