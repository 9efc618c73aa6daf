//! The `ordered` mode's epoch buffer against a model, with a simulated background writer.
//!
//! Each seed runs a random mix of guest writes (1 B to 256 KiB, overlapping), barriers,
//! flushes and reads, while a simulated writer takes jobs, lands their writes on a simulated
//! disk one by one in random order, and completes them or fails them (at any point). After
//! every step:
//! 1. the disk read through the buffer equals what the guest wrote (the model);
//! 2. the disk holds a prefix of whole epochs plus some writes of the next one, each of which
//!    carries exactly the bytes that epoch left there (checked against a model of the epochs
//!    built from the guest's own writes and barriers, not from the buffer);
//! 3. (at the end) after a full drain the disk equals the model;
//! 4. `buffered_bytes` stays under the limit but for one write accepted into an empty buffer,
//!    and is 0 exactly when the buffer is empty;
//! 5. a failed epoch is handed out again, whole and first, and its error is reported once, by
//!    the next barrier or flush.
//!
//! `EPOCHS_SEEDS=n` runs n seeds (default 96); `EPOCHS_SEED=s` runs seed s alone. A failure
//! prints its seed.

use qcow2b::ordering::epochs::{EpochBuffer, Job, WriteError};
use std::collections::VecDeque;
use std::io;

const DISK_BYTES: usize = 1 << 20;
const STEPS: usize = 400;

/// SplitMix64: small, seedable, good enough to pick test actions.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in `[lo, hi]`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent` / 100.
    fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The guest's writes of one epoch, in the order it sent them.
struct ModelEpoch {
    seq: u64,
    writes: Vec<(usize, Vec<u8>)>,
    /// The writes of the last failed job of this epoch, to compare with the retry.
    failed_job: Option<Vec<(u64, Vec<u8>)>>,
}

/// The job the simulated writer is working on.
struct Running {
    job: Job,
    /// Indices of its writes not landed yet, in the order they will land.
    to_land: Vec<usize>,
    /// The disk once the epoch is fully applied (durable state plus the epoch's writes).
    epoch_final: Vec<u8>,
}

struct Sim {
    rng: Rng,
    /// Random bytes that writes and the initial disk are cut from (copying a slice keeps the
    /// unoptimised test build fast).
    noise: Vec<u8>,
    buf: EpochBuffer,
    limit: u64,
    /// What the guest has written and had acknowledged.
    guest: Vec<u8>,
    /// The simulated disk.
    disk: Vec<u8>,
    /// The disk with exactly the completed epochs applied.
    durable: Vec<u8>,
    /// What the disk may hold now: `durable` plus the landed writes of the head epoch.
    expected_disk: Vec<u8>,
    /// Closed epochs not completed, oldest first.
    epochs: VecDeque<ModelEpoch>,
    open: ModelEpoch,
    running: Option<Running>,
    /// A guest write refused as full, waiting for space.
    waiting: Option<(usize, Vec<u8>)>,
    /// The error the next barrier or flush must report.
    unreported_error: Option<String>,
    failures_injected: u64,
    /// How far `buffered_bytes` may go (invariant 4).
    allowance: u64,
    completed: u64,
    /// Scratch for the whole-disk read of `check`.
    view: Vec<u8>,
    /// Starts and ends of recent writes: new writes start or end near them (±1 byte) now and
    /// then, to hit the edge cases of partial overlaps.
    edges: VecDeque<usize>,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = Rng(seed);
        let limit = [16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20][rng.below(5) as usize];
        let noise: Vec<u8> = (0..(DISK_BYTES + (256 << 10)) / 8)
            .flat_map(|_| rng.next().to_le_bytes())
            .collect();
        let initial = noise[..DISK_BYTES].to_vec();
        Sim {
            rng,
            noise,
            buf: EpochBuffer::new(limit),
            limit,
            guest: initial.clone(),
            disk: initial.clone(),
            durable: initial.clone(),
            expected_disk: initial,
            epochs: VecDeque::new(),
            open: ModelEpoch {
                seq: 1,
                writes: Vec::new(),
                failed_job: None,
            },
            running: None,
            waiting: None,
            unreported_error: None,
            failures_injected: 0,
            allowance: limit,
            completed: 0,
            view: Vec::new(),
            edges: VecDeque::new(),
        }
    }

    fn random_write(&mut self) -> (usize, Vec<u8>) {
        let r = &mut self.rng;
        let len = match r.below(10) {
            0..=3 => r.between(1, 4096),
            4..=6 => r.between(1, 16) * 4096,
            _ => r.between(1, 256 << 10),
        } as usize;
        let mut offset = r.below((DISK_BYTES - len) as u64 + 1) as usize;
        match r.below(10) {
            0..=4 => offset &= !4095,
            5..=7 if !self.edges.is_empty() => {
                // Start or end at, one before or one after a recent write's edge.
                let edge = self.edges[r.below(self.edges.len() as u64) as usize];
                let edge = (edge + r.below(3) as usize).saturating_sub(1);
                offset = if r.percent(50) {
                    edge
                } else {
                    edge.saturating_sub(len)
                };
                offset = offset.min(DISK_BYTES - len);
            }
            _ => {}
        }
        for edge in [offset, offset + len] {
            if self.edges.len() == 32 {
                self.edges.pop_front();
            }
            self.edges.push_back(edge);
        }
        // Random bytes, so a misplaced or stale copy shows.
        let from = r.below((self.noise.len() - len) as u64 + 1) as usize;
        (offset, self.noise[from..from + len].to_vec())
    }

    fn write(&mut self) {
        let (offset, data) = match self.waiting.take() {
            Some(w) => w,
            None => self.random_write(),
        };
        let was_empty = self.buf.buffered_bytes() == 0;
        match self.buf.write(offset as u64, &data) {
            Ok(()) => {
                if was_empty {
                    self.allowance = self.limit.max(data.len() as u64);
                }
                self.guest[offset..offset + data.len()].copy_from_slice(&data);
                self.open.writes.push((offset, data));
            }
            Err(WriteError::Full {
                needed_bytes,
                buffered_bytes,
                limit_bytes,
            }) => {
                assert!(needed_bytes > 0 && buffered_bytes > 0);
                assert_eq!(buffered_bytes, self.buf.buffered_bytes());
                assert!(buffered_bytes + needed_bytes > limit_bytes);
                self.waiting = Some((offset, data));
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// The model's side of closing the open epoch (a barrier, a flush, or take_next(true)).
    fn close_model_epoch(&mut self) {
        if !self.open.writes.is_empty() {
            let next = ModelEpoch {
                seq: self.open.seq + 1,
                writes: Vec::new(),
                failed_job: None,
            };
            self.epochs
                .push_back(std::mem::replace(&mut self.open, next));
        }
    }

    /// A guest barrier: closes the epoch and reports a kept error.
    fn barrier(&mut self) {
        let mark = self.buf.barrier();
        self.close_model_epoch();
        assert_eq!(mark, self.open.seq - 1);
        self.check_error_reported();
    }

    fn check_error_reported(&mut self) {
        let got = self.buf.take_error().map(|e| e.to_string());
        assert_eq!(got, self.unreported_error.take(), "error reporting");
        assert!(self.buf.take_error().is_none(), "an error is reported once");
    }

    /// Starts a job if none runs. Returns whether one runs now.
    fn start_job(&mut self, include_open: bool) -> bool {
        if self.running.is_some() {
            // Never two in flight.
            assert!(self.buf.take_next(true).is_none());
            return true;
        }
        let had_closed = !self.epochs.is_empty();
        let Some(job) = self.buf.take_next(include_open) else {
            assert!(
                self.epochs.is_empty() && (!include_open || self.open.writes.is_empty()),
                "no job although an epoch waits"
            );
            return false;
        };
        if !had_closed {
            assert!(include_open);
            self.close_model_epoch();
        }
        let epoch = self.epochs.front().expect("a job with no model epoch");
        assert_eq!(job.epoch(), epoch.seq, "the job is not the oldest epoch");
        assert_eq!(self.buf.in_flight(), Some(epoch.seq));
        let writes: Vec<(u64, Vec<u8>)> = job
            .writes()
            .iter()
            .map(|w| (w.offset, w.data.to_vec()))
            .collect();
        // Invariant 5: a retry hands out the same writes.
        if let Some(failed) = &epoch.failed_job {
            assert_eq!(&writes, failed, "the retry differs from the failed job");
            assert!(job.attempt() > 1);
        } else {
            assert_eq!(job.attempt(), 1);
        }
        // The epoch's final bytes, from the guest's writes in order.
        let mut epoch_final = self.durable.clone();
        for (offset, data) in &epoch.writes {
            epoch_final[*offset..*offset + data.len()].copy_from_slice(data);
        }
        // The job writes exactly the epoch's bytes, sorted and non-overlapping.
        let mut prev_end = 0;
        for (offset, data) in &writes {
            let (start, end) = (*offset as usize, *offset as usize + data.len());
            assert!(!data.is_empty() && start >= prev_end, "job writes overlap");
            prev_end = end;
            assert!(
                epoch_final[start..end] == data[..],
                "job write at {start:#x} carries the wrong bytes"
            );
        }
        let job_ranges = writes
            .iter()
            .map(|(o, d)| (*o as usize, *o as usize + d.len()));
        let epoch_ranges = epoch.writes.iter().map(|(o, d)| (*o, *o + d.len()));
        assert_eq!(
            union(job_ranges),
            union(epoch_ranges),
            "the job does not cover the epoch's writes"
        );
        let mut to_land: Vec<usize> = (0..writes.len()).collect();
        for i in (1..to_land.len()).rev() {
            let j = self.rng.below(i as u64 + 1) as usize;
            to_land.swap(i, j);
        }
        self.running = Some(Running {
            job,
            to_land,
            epoch_final,
        });
        true
    }

    /// Lands up to `n` writes of the running job on the disk.
    fn land(&mut self, n: usize) {
        let Some(run) = &mut self.running else { return };
        for _ in 0..n {
            let Some(i) = run.to_land.pop() else { break };
            let w = &run.job.writes()[i];
            let (start, end) = (w.offset as usize, w.end() as usize);
            self.disk[start..end].copy_from_slice(&w.data);
            self.expected_disk[start..end].copy_from_slice(&run.epoch_final[start..end]);
        }
    }

    /// Ends the running job: complete if all its writes landed and `fail` is false.
    fn finish(&mut self, fail: bool) {
        let Some(run) = self.running.take() else {
            return;
        };
        if fail || !run.to_land.is_empty() {
            self.failures_injected += 1;
            let message = format!("injected failure {}", self.failures_injected);
            let writes = run
                .job
                .writes()
                .iter()
                .map(|w| (w.offset, w.data.to_vec()))
                .collect();
            self.epochs[0].failed_job = Some(writes);
            self.unreported_error.get_or_insert(message.clone());
            self.buf.fail(run.job, io::Error::other(message)).unwrap();
            assert_eq!(self.buf.in_flight(), None);
            // The disk keeps what landed: still a prefix plus part of the head epoch.
        } else {
            self.buf.complete(run.job).unwrap();
            self.epochs.pop_front();
            self.completed += 1;
            self.durable = run.epoch_final;
            assert!(
                self.disk == self.durable,
                "a completed epoch is not on disk"
            );
            assert_eq!(self.buf.epochs_completed(), self.completed);
        }
    }

    /// One step of the background writer.
    fn writer_step(&mut self) {
        if self.running.is_none() {
            let include_open = self.waiting.is_some() || self.rng.percent(25);
            self.start_job(include_open);
            return;
        }
        let n = self.rng.between(1, 4) as usize;
        self.land(n);
        let all_landed = self.running.as_ref().is_some_and(|r| r.to_land.is_empty());
        let roll = self.rng.below(100);
        if all_landed && roll < 60 {
            // Writes done; the sync fails now and then.
            self.finish(roll < 6);
        } else if !all_landed && roll < 3 {
            // A write fails mid-job.
            self.finish(true);
        }
    }

    /// A guest flush: barrier, then write-back until the mark is durable or an error.
    fn flush(&mut self) {
        let mark = self.buf.barrier();
        self.close_model_epoch();
        let mut failed = false;
        while !self.buf.is_durable(mark) {
            if !self.start_job(true) {
                panic!("flush: nothing to write back but mark {mark} not durable");
            }
            self.land(usize::MAX);
            let fail = self.rng.percent(5);
            self.finish(fail);
            if fail {
                failed = true;
                break;
            }
        }
        self.check_error_reported();
        if !failed {
            // Everything the guest wrote before the flush (here: everything) is durable.
            assert!(self.durable == self.guest, "a flushed write is not durable");
        }
    }

    /// A guest read of a random range, sometimes through a snapshot taken before the file
    /// read while the writer moves on (the glue's order for reads).
    fn read(&mut self) {
        let len = self.rng.between(1, 300 << 10).min(DISK_BYTES as u64) as usize;
        let offset = self.rng.below((DISK_BYTES - len) as u64 + 1) as usize;
        let mut got;
        if self.rng.percent(50) {
            got = self.disk[offset..offset + len].to_vec();
            self.buf.overlay(offset as u64, &mut got);
        } else {
            let snapshot = self.buf.snapshot(offset as u64, len);
            for _ in 0..self.rng.below(4) {
                self.writer_step();
            }
            got = self.disk[offset..offset + len].to_vec();
            snapshot.apply(&mut got);
        }
        let expect = &self.guest[offset..offset + len];
        assert!(
            got == expect,
            "read of {len} bytes at {offset:#x} differs from what the guest wrote"
        );
    }

    /// The invariants that hold after every step.
    fn check(&mut self) {
        if let Err(e) = self.buf.verify() {
            panic!("buffer invariant: {e}");
        }
        // 1: the disk read through the buffer is what the guest wrote.
        self.view.clone_from(&self.disk);
        self.buf.overlay(0, &mut self.view);
        assert!(
            self.view == self.guest,
            "the disk through the buffer differs from the guest's writes"
        );
        // 2: prefix of whole epochs plus landed writes of the head epoch.
        assert!(
            self.disk == self.expected_disk,
            "the disk is not an ordered prefix"
        );
        // 4: the bound.
        let buffered = self.buf.buffered_bytes();
        assert!(
            buffered <= self.allowance,
            "{buffered} bytes buffered, limit {} (allowance {})",
            self.limit,
            self.allowance
        );
        assert_eq!(buffered == 0, self.buf.is_empty());
        if buffered == 0 {
            self.allowance = self.limit;
        }
        assert_eq!(
            self.buf.epochs_buffered(),
            self.epochs.len() + usize::from(!self.open.writes.is_empty())
        );
    }

    fn step(&mut self) {
        match self.rng.below(100) {
            0..=34 => self.write(),
            35..=44 => self.barrier(),
            45..=59 => self.read(),
            60..=96 => self.writer_step(),
            _ => self.flush(),
        }
        self.check();
    }

    /// 3: drain everything (retrying failures, letting a waiting write in) and compare.
    fn drain(&mut self) {
        loop {
            if self.waiting.is_some() {
                self.write();
            }
            if !self.start_job(true) {
                if self.waiting.is_none() {
                    break;
                }
                continue;
            }
            self.land(usize::MAX);
            self.finish(false);
            self.check();
        }
        if self.unreported_error.is_some() {
            self.check_error_reported();
        }
        assert!(self.buf.is_empty());
        assert_eq!(self.buf.buffered_bytes(), 0);
        assert!(
            self.disk == self.guest,
            "after a full drain the disk differs from the model"
        );
    }
}

/// The union of `ranges` as sorted, disjoint, non-adjacent ranges.
fn union(ranges: impl Iterator<Item = (usize, usize)>) -> Vec<(usize, usize)> {
    let mut ranges: Vec<_> = ranges.collect();
    ranges.sort_unstable();
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (start, end) in ranges {
        match out.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

/// Prints the seed if the test panics while it is alive.
struct SeedReporter(u64);

impl Drop for SeedReporter {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("epoch buffer model test failed with EPOCHS_SEED={}", self.0);
        }
    }
}

/// Runs one seed; returns (epochs completed, failures, whether an oversize write was taken).
fn run_seed(seed: u64) -> (u64, u64, bool) {
    let _reporter = SeedReporter(seed);
    let mut sim = Sim::new(seed);
    for _ in 0..STEPS {
        sim.step();
    }
    sim.drain();
    (
        sim.buf.epochs_completed(),
        sim.buf.failures(),
        sim.buf.peak_bytes() > sim.limit,
    )
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn epoch_buffer_matches_the_model_under_random_writes_barriers_reads_and_failures() {
    let seeds: Vec<u64> = match env_u64("EPOCHS_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("EPOCHS_SEEDS").unwrap_or(96))
            .map(|i| 0x5eed_0000 + i)
            .collect(),
    };
    let seed_count = seeds.len();
    let (mut epochs, mut failures, mut oversize) = (0, 0, 0);
    for seed in seeds {
        let (e, f, over) = run_seed(seed);
        epochs += e;
        failures += f;
        oversize += u64::from(over);
    }
    if seed_count < 32 {
        return;
    }
    // The mix must actually exercise write-back, failures and the oversize case.
    assert!(epochs > 100, "only {epochs} epochs completed");
    assert!(failures > 10, "only {failures} failures injected");
    assert!(oversize > 0, "no oversize write was ever accepted");
}
