//! Transaction groups (`barrier=txg`, src/engine/txg.rs): what a group costs in syncs, that a
//! crash at any point leaves a clean image holding exactly one committed group, that space is
//! reused, and that snapshots, backing files, compressed clusters, discard, write_zeroes,
//! resize and check keep working.

#[path = "engine_support.rs"]
mod support;

use std::cell::{Cell, RefCell};
use std::io;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use qcow2b::engine::{
    CheckFix, CommitReason, GroupExposure, Image, MemStorage, OpenOptions, Storage, TxgOptions,
};
use support::*;

const CLUSTER: u64 = 65536;

fn txg_options(max_group_bytes: u64) -> OpenOptions {
    OpenOptions {
        txg: Some(TxgOptions {
            max_group_bytes,
            max_group_age: Duration::from_secs(3600),
        }),
        ..Default::default()
    }
}

fn created(cluster_size: u64, size: u64) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_img_create(&path, cluster_size, size, None);
    std::fs::read(&path).unwrap()
}

fn open_txg<S: Storage>(storage: S) -> Image<S> {
    Image::open(storage, &txg_options(u64::MAX)).unwrap()
}

fn syncs(image: &Image<MemStorage>) -> u64 {
    image.storage().flushes.get()
}

/// Writes the bytes to a file and asserts that the system's `qemu-img check` finds nothing,
/// not even a leak.
fn system_check(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.qcow2");
    std::fs::write(&path, bytes).unwrap();
    qemu_img_check(&path);
}

/// What a crash may leave: the system's `qemu-img check` finds no corruption and no check
/// error; leaked clusters are allowed (exit 3: the zero reserve of an interval of one epoch,
/// counted and not yet named, "One epoch" in `txg.rs`).
fn system_check_crash_state(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.qcow2");
    std::fs::write(&path, bytes).unwrap();
    let (code, report) = qemu_img_check_json(&path);
    assert!(
        code == 0 || (code == 3 && report.u64_or_0("leaks") > 0),
        "qemu-img check of a crash state exited {code}"
    );
    assert_eq!(report.u64_or_0("corruptions"), 0);
    assert_eq!(report.u64_or_0("check-errors"), 0);
}

/// The engine's check of a crash state: no corruption and no check error (leaks allowed, as
/// in [`system_check_crash_state`]).
fn engine_check_crash_state(bytes: Vec<u8>) -> Result<(), Vec<String>> {
    let mut image = Image::open(
        MemStorage::new(bytes),
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let report = image.check(CheckFix::None).unwrap();
    if report.corruptions == 0 && report.check_errors == 0 {
        Ok(())
    } else {
        Err(report.messages)
    }
}

/// The whole guest disk, read by the engine opened read-only.
fn guest_bytes(bytes: Vec<u8>) -> Vec<u8> {
    let mut image = Image::open(
        MemStorage::new(bytes),
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut out = vec![0u8; image.virtual_size() as usize];
    image.read(0, &mut out, None).unwrap();
    out
}

#[test]
fn barriers_cost_nothing_and_a_group_commits_with_two_syncs() {
    let mut image = open_txg(MemStorage::new(created(CLUSTER, 1 << 30)));
    let data = vec![0x5au8; CLUSTER as usize];
    for i in 0..1000u64 {
        image.write(i * CLUSTER, &data, None).unwrap();
        image.barrier().unwrap();
        assert!(
            image.group_open(),
            "the first barrier after a write opens the group"
        );
    }
    assert_eq!(syncs(&image), 0, "barriers sync nothing");
    // Not even the first, which opened the group: it took the interval's tables over
    // instead of writing them back (its new cluster came from a reserve counted just then).
    assert_eq!(image.storage().barriers.get(), 0);
    image.flush().unwrap();
    assert!(!image.group_open(), "a commit closes the group");
    assert_eq!(syncs(&image), 2, "one commit: two syncs");
    assert_eq!(image.groups_committed(), 1);
    image.flush().unwrap();
    assert_eq!(syncs(&image), 2, "a flush with nothing new costs nothing");

    // The overwrite variant: every write after the first barrier copies its cluster, still
    // two syncs per group.
    for i in 0..1000u64 {
        image.write(i * CLUSTER, &data, None).unwrap();
        image.barrier().unwrap();
    }
    image.flush().unwrap();
    assert_eq!(syncs(&image), 4);
    assert_eq!(image.storage().barriers.get(), 0);
    assert_eq!(image.counters().groups_committed, 2);
    system_check(&image.close().unwrap().into_inner());
}

/// One step of a guest that never sends a barrier.
#[derive(Clone, Copy, Debug)]
enum Step {
    Write(u64, u64, u8),
    Zero(u64, u64),
    Discard(u64, u64),
}

fn apply_step<S: Storage>(image: &mut Image<S>, step: Step) {
    match step {
        Step::Write(at, len, fill) => image.write(at, &vec![fill; len as usize], None),
        Step::Zero(at, len) => image.write_zeroes(at, len, false, None),
        Step::Discard(at, len) => image.discard(at, len),
    }
    .unwrap();
}

#[test]
fn without_barriers_a_flush_costs_what_it_costs_outside_groups() {
    // Appends, overwrites, writes over a backing file's absence into new L2 ranges, zeroes
    // and discards, each followed by a flush: the txg image and an image outside groups make
    // the same syncs and ordering points at every step, and the txg image never switches
    // its header (no group opens: "One epoch" in txg.rs).
    let mut steps = Vec::new();
    for i in 0..24u64 {
        steps.push(Step::Write(i * CLUSTER, CLUSTER, i as u8 + 1));
    }
    for i in 0..24u64 {
        steps.push(Step::Write(i * CLUSTER + 4096, 4096, 0x40 + i as u8));
    }
    for i in 0..4u64 {
        steps.push(Step::Write(
            (i + 1) * (512 << 20) + 8192,
            4096,
            0x80 + i as u8,
        ));
    }
    for i in 0..4u64 {
        steps.push(Step::Zero(i * CLUSTER, CLUSTER));
        steps.push(Step::Discard((i + 8) * CLUSTER, CLUSTER));
    }
    let start = created(CLUSTER, 4 << 30);
    let mut txg = open_txg(MemStorage::new(start.clone()));
    let mut plain = Image::open(MemStorage::new(start), &OpenOptions::default()).unwrap();
    let header = txg.storage().snapshot()[..512].to_vec();
    for step in steps {
        apply_step(&mut txg, step);
        apply_step(&mut plain, step);
        txg.flush().unwrap();
        plain.flush().unwrap();
        assert!(!txg.group_open());
        assert_eq!(
            (syncs(&txg), txg.storage().barriers.get()),
            (syncs(&plain), plain.storage().barriers.get()),
            "{step:?}: syncs and ordering points"
        );
    }
    assert_eq!(syncs(&txg), 24 + 24 + 4 + 8, "one sync per flush");
    assert_eq!(
        txg.storage().snapshot()[..512],
        header[..],
        "no header switch"
    );
    assert_eq!(
        txg.groups_committed(),
        60,
        "each flush made its interval durable"
    );

    // A barrier after a write opens a group: from then on it copies, and commits as before.
    let before = (syncs(&txg), txg.storage().barriers.get());
    txg.write(20 * CLUSTER, &[0x77; 4096], None).unwrap();
    txg.barrier().unwrap();
    assert!(txg.group_open());
    txg.write(21 * CLUSTER, &[0x78; 4096], None).unwrap();
    txg.flush().unwrap();
    assert_eq!(
        (syncs(&txg), txg.storage().barriers.get()),
        (before.0 + 2, before.1),
        "a group of two epochs: two syncs, and an overwrite before it needs no ordering point"
    );
    assert_ne!(txg.storage().snapshot()[..512], header[..], "switched");

    let bytes = txg.close().unwrap().into_inner();
    system_check(&bytes);
    let guest = guest_bytes(bytes);
    let plain_guest = guest_bytes(plain.close().unwrap().into_inner());
    let at = |cluster: u64| (cluster * CLUSTER) as usize;
    assert!(guest[at(20)..at(20) + 4096].iter().all(|&b| b == 0x77));
    assert!(guest[at(21)..at(21) + 4096].iter().all(|&b| b == 0x78));
    assert_eq!(guest[..at(20)], plain_guest[..at(20)]);
    assert_eq!(guest[at(22)..], plain_guest[at(22)..]);
}

#[test]
fn the_size_bound_commits_on_its_own() {
    let mut image = Image::open(
        MemStorage::new(created(CLUSTER, 1 << 30)),
        &txg_options(4 * CLUSTER),
    )
    .unwrap();
    let data = vec![1u8; CLUSTER as usize];
    let mut commits = 0;
    for i in 0..16u64 {
        image.write(i * CLUSTER, &data, None).unwrap();
        if image.group_is_due() {
            assert!(image.group_open());
            image.request_commit();
            assert!(image.commit_pending());
            image.commit().unwrap();
            assert!(!image.commit_pending());
            commits += 1;
        } else {
            image.barrier().unwrap();
        }
    }
    assert_eq!(commits, 4);
    assert_eq!(image.groups_committed(), 4);
    assert_eq!(syncs(&image), 8);

    // Without barriers no group opens, and the bound makes the interval durable in place.
    for i in 16..20u64 {
        image.write(i * CLUSTER, &data, None).unwrap();
    }
    assert_eq!(image.group_due_reason(), Some(CommitReason::Size));
    image.commit().unwrap();
    assert_eq!(syncs(&image), 9);
    assert_eq!(image.groups_committed(), 5);
    assert_eq!(image.counters().groups_committed_by_size, 5);

    // The glue's committer does not sync under the image: it has the interval written back
    // and syncs the file itself, with the image unlocked.
    for i in 20..24u64 {
        image.write(i * CLUSTER, &data, None).unwrap();
    }
    assert_eq!(image.group_due_reason(), Some(CommitReason::Size));
    assert!(
        image.write_back_interval_for_bound().unwrap(),
        "a sync is due"
    );
    assert_eq!(syncs(&image), 9, "the caller syncs, not the image");
    assert_eq!(image.group_due_reason(), None, "the window starts again");
    assert_eq!(image.groups_committed(), 6);
    let written_back = guest_bytes(image.storage().snapshot());
    assert!(
        written_back[20 * CLUSTER as usize..24 * CLUSTER as usize]
            .iter()
            .all(|&b| b == 1),
        "what the file holds names the interval's writes"
    );
    image.flush().unwrap();
    assert_eq!(syncs(&image), 10, "the image still syncs at the next flush");
    let bytes = image.storage().snapshot();
    // What the durable image holds is the 24 writes.
    let guest = guest_bytes(bytes);
    assert!(guest[..24 * CLUSTER as usize].iter().all(|&b| b == 1));
}

#[test]
fn commits_are_counted_by_what_made_them_and_the_exposure_is_what_is_not_durable() {
    let mut image = Image::open(
        MemStorage::new(created(CLUSTER, 1 << 30)),
        &OpenOptions {
            txg: Some(TxgOptions {
                max_group_bytes: 4 * CLUSTER,
                max_group_age: Duration::from_millis(30),
            }),
            ..Default::default()
        },
    )
    .unwrap();
    let data = vec![7u8; CLUSTER as usize];
    assert_eq!(
        image.group_exposure(),
        Some(GroupExposure {
            bytes: 0,
            age: None
        }),
        "nothing written, nothing exposed"
    );

    // The size bound: four clusters.
    for i in 0..4u64 {
        image.write(i * CLUSTER, &data, None).unwrap();
    }
    assert_eq!(image.group_exposure().unwrap().bytes, 4 * CLUSTER);
    assert_eq!(image.group_due_reason(), Some(CommitReason::Size));
    image.commit().unwrap();
    assert_eq!(image.group_exposure().unwrap().bytes, 0);

    // The age bound: one cluster, then the group grows old.
    image.write(4 * CLUSTER, &data, None).unwrap();
    assert_eq!(image.group_due_reason(), None);
    std::thread::sleep(Duration::from_millis(40));
    assert!(image.group_exposure().unwrap().age.unwrap() >= Duration::from_millis(30));
    assert_eq!(image.group_due_reason(), Some(CommitReason::Age));
    image.commit().unwrap();

    // A durability point: a flush.
    image.write(5 * CLUSTER, &data, None).unwrap();
    image.flush().unwrap();

    let c = image.counters();
    assert_eq!(
        (
            c.groups_committed,
            c.groups_committed_by_size,
            c.groups_committed_by_age,
            c.groups_committed_for_durability
        ),
        (3, 1, 1, 1)
    );
    assert_eq!(c.peak_group_bytes, 4 * CLUSTER);
    assert!(
        c.peak_group_age_ms >= 30,
        "the aged group: {} ms",
        c.peak_group_age_ms
    );
    system_check(&image.close().unwrap().into_inner());
}

#[test]
fn a_write_plan_in_flight_holds_the_commit_back() {
    let mut image = open_txg(MemStorage::new(created(CLUSTER, 1 << 30)));
    image.write(0, &[1; 4096], None).unwrap();
    image.barrier().unwrap();
    let plan = image.plan_write(0, 4096).unwrap().unwrap();
    image.request_commit();
    assert!(
        image.plan_write(CLUSTER, 4096).unwrap().is_none(),
        "new plans wait"
    );
    assert!(
        image.commit().is_err(),
        "no commit while a plan is in flight"
    );
    image.abort_write(plan);
    image.commit().unwrap();
    assert!(image.plan_write(CLUSTER, 4096).unwrap().is_some());
}

/// A file that logs every write, sync and length change, so that the states a crash may leave
/// can be built afterwards.
#[derive(Default)]
struct Recorder {
    now: RefCell<Vec<u8>>,
    log: RefCell<Vec<Event>>,
    syncs: Cell<u64>,
}

#[derive(Clone)]
enum Event {
    Write(u64, Vec<u8>),
    SetLen(u64),
    Sync,
}

impl Storage for Recorder {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let now = self.now.borrow();
        buf.fill(0);
        let start = (offset as usize).min(now.len());
        let end = (start + buf.len()).min(now.len());
        buf[..end - start].copy_from_slice(&now[start..end]);
        Ok(())
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        apply(&mut self.now.borrow_mut(), offset, buf);
        self.log
            .borrow_mut()
            .push(Event::Write(offset, buf.to_vec()));
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.syncs.set(self.syncs.get() + 1);
        self.log.borrow_mut().push(Event::Sync);
        Ok(())
    }
    fn barrier(&self) -> io::Result<()> {
        // Not used by groups; a barrier would order like a sync here.
        self.flush()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.now.borrow().len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.now.borrow_mut().resize(len as usize, 0);
        self.log.borrow_mut().push(Event::SetLen(len));
        Ok(())
    }
}

fn apply(bytes: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset as usize + data.len();
    if bytes.len() < end {
        bytes.resize(end, 0);
    }
    bytes[offset as usize..end].copy_from_slice(data);
}

/// The guest content at a guest flush, keyed by the number of syncs done when it returned,
/// and the writes of the first epoch of the interval that this flush ended (before the
/// interval's first barrier): a group may show them before it commits ("One epoch" in
/// `txg.rs`), each sector old or new.
#[derive(Clone)]
struct Flushed {
    syncs: u64,
    model: Vec<u8>,
    first_epoch: Vec<(u64, Vec<u8>)>,
}

/// Whether every 512-byte sector of `guest` is that sector of one of `states`.
fn each_sector_from(guest: &[u8], states: &[&Vec<u8>]) -> bool {
    (0..guest.len()).step_by(512).all(|at| {
        states
            .iter()
            .any(|s| s[at..at + 512] == guest[at..at + 512])
    })
}

/// The recorder's log, the starting image, and the guest content at each guest flush.
type Workload = (Vec<Event>, Vec<u8>, Vec<Flushed>);

/// Whether `guest` holds, in every sector, what `before` held there or what one of the
/// first epoch's writes put there.
fn shows_first_epoch_in_part(guest: &[u8], before: &[u8], first_epoch: &[(u64, Vec<u8>)]) -> bool {
    (0..guest.len()).step_by(512).all(|at| {
        let sector = &guest[at..at + 512];
        sector == &before[at..at + 512]
            || first_epoch.iter().any(|(offset, data)| {
                let (start, end) = (*offset as usize, *offset as usize + data.len());
                start <= at && at + 512 <= end && sector == &data[at - start..at - start + 512]
            })
    })
}

/// A random workload over a small disk, in transaction groups, with the guest content kept in
/// a model. Returns the recorder's log, the image the workload started from, and the model at
/// every guest flush, keyed by the number of syncs done when that flush returned.
fn run_workload(seed: u64, cluster_size: u64, disk: u64, ops: usize) -> Workload {
    run_workload_with(seed, cluster_size, disk, ops, txg_options(u64::MAX))
}

fn run_workload_with(
    seed: u64,
    cluster_size: u64,
    disk: u64,
    ops: usize,
    options: OpenOptions,
) -> Workload {
    let start = created(cluster_size, disk);
    let mut image = Image::open(
        Recorder {
            now: RefCell::new(start.clone()),
            ..Default::default()
        },
        &options,
    )
    .unwrap();
    let mut rng = XorShift::new(seed);
    let mut model = vec![0u8; disk as usize];
    let mut flushed = vec![Flushed {
        syncs: 0,
        model: model.clone(),
        first_epoch: Vec::new(),
    }];
    // The writes of the interval before its first barrier, and whether one came (a barrier
    // before any write of the group leaves it in its first epoch).
    let mut first_epoch: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut wrote = false;
    let mut barrier_seen = false;
    for op in 0..ops {
        let offset = rng.below(disk / 512) * 512;
        let len = ((rng.below(4 * cluster_size / 512) + 1) * 512).min(disk - offset);
        match rng.below(10) {
            0 => {
                // Advisory: only whole clusters are dropped (and read as zeros).
                image.discard(offset, len).unwrap();
                let first = offset.div_ceil(cluster_size) * cluster_size;
                let end = (offset + len) / cluster_size * cluster_size;
                if first < end {
                    model[first as usize..end as usize].fill(0);
                    wrote = true;
                    if !barrier_seen {
                        first_epoch.push((first, vec![0; (end - first) as usize]));
                    }
                }
            }
            1 => {
                image
                    .write_zeroes(offset, len, rng.below(2) == 0, None)
                    .unwrap();
                model[offset as usize..(offset + len) as usize].fill(0);
                wrote = true;
                if !barrier_seen {
                    first_epoch.push((offset, vec![0; len as usize]));
                }
            }
            2 | 3 => {
                image.barrier().unwrap();
                barrier_seen |= wrote;
            }
            _ => {
                let mut data = vec![0u8; len as usize];
                data.fill((op % 251 + 1) as u8);
                image.write(offset, &data, None).unwrap();
                model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                wrote = true;
                if !barrier_seen {
                    first_epoch.push((offset, data));
                }
            }
        }
        if rng.below(8) == 0 {
            image.flush().unwrap();
            let mut live = vec![0u8; disk as usize];
            image.read(0, &mut live, None).unwrap();
            assert!(
                live == model,
                "seed {seed}: the image does not read as the model"
            );
            flushed.push(Flushed {
                syncs: image.storage().syncs.get(),
                model: model.clone(),
                first_epoch: std::mem::take(&mut first_epoch),
            });
            wrote = false;
            barrier_seen = false;
        }
    }
    image.flush().unwrap();
    flushed.push(Flushed {
        syncs: image.storage().syncs.get(),
        model: model.clone(),
        first_epoch,
    });
    let log = image.storage().log.borrow().clone();
    (log, start, flushed)
}

/// Every crash state of the log (sampled where there are many): the durable bytes at each
/// sync, plus a subset of the writes issued after it, torn at 512-byte sectors. Each must be a
/// consistent image (the engine's check, and the system's qemu-img on a sample; leaked
/// reserve clusters allowed) whose guest content is exactly the last committed group, or it
/// with (part of) the next one's first epoch, or the one being committed.
fn check_crash_states(seed: u64, log: &[Event], start: Vec<u8>, flushed: &[Flushed]) -> u64 {
    let mut rng = XorShift::new(seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut durable = start;
    let mut pending: Vec<&Event> = Vec::new();
    let mut sync_no = 0u64;
    let mut states = 0u64;
    for event in log {
        match event {
            Event::Sync => {
                // States between sync `sync_no` and the next one.
                let before = flushed.iter().rev().find(|f| f.syncs <= sync_no).unwrap();
                let after = flushed.iter().find(|f| f.syncs > sync_no).unwrap_or(before);
                let tries = if pending.len() <= 1 { 2 } else { 6 };
                for t in 0..tries {
                    let mut state = durable.clone();
                    for e in &pending {
                        match e {
                            Event::Write(offset, data) => {
                                for (i, sector) in data.chunks(512).enumerate() {
                                    let keep = match t {
                                        0 => false,
                                        1 => true,
                                        _ => rng.below(2) == 0,
                                    };
                                    if keep {
                                        apply(&mut state, offset + 512 * i as u64, sector);
                                    }
                                }
                            }
                            Event::SetLen(len) => state.resize(*len as usize, 0),
                            Event::Sync => unreachable!(),
                        }
                    }
                    let guest = guest_bytes(state.clone());
                    assert!(
                        guest == after.model
                            || shows_first_epoch_in_part(&guest, &before.model, &after.first_epoch),
                        "seed {seed}: after sync {sync_no}, try {t}: the guest sees neither \
                         the next committed group nor the last one with (part of) the next \
                         one's first epoch"
                    );
                    if let Err(messages) = engine_check_crash_state(state.clone()) {
                        panic!("seed {seed}: after sync {sync_no}, try {t}: {messages:?}");
                    }
                    if rng.below(8) == 0 {
                        system_check_crash_state(&state);
                    }
                    states += 1;
                }
                for e in pending.drain(..) {
                    match e {
                        Event::Write(offset, data) => apply(&mut durable, *offset, data),
                        Event::SetLen(len) => durable.resize(*len as usize, 0),
                        Event::Sync => unreachable!(),
                    }
                }
                sync_no += 1;
            }
            e => pending.push(e),
        }
    }
    states
}

#[test]
fn every_crash_state_is_a_consistent_image_of_a_prefix_of_the_epochs() {
    let mut states = 0;
    for seed in 1..=6u64 {
        // 512-byte clusters: new refcount blocks, refcount table growth and L2 tables all
        // the time. 64 KiB clusters: partial-cluster copy-on-write.
        let (cluster, disk) = if seed % 2 == 0 {
            (512, 256 << 10)
        } else {
            (CLUSTER, 8 << 20)
        };
        let (log, start, flushed) = run_workload(seed, cluster, disk, 300);
        states += check_crash_states(seed, &log, start, &flushed);
    }
    println!("{states} crash states checked");
    assert!(states > 100);
}

#[test]
fn the_crash_check_finds_an_overwrite_in_place_after_a_barrier() {
    // The proof can fail: a group that overwrites the durable image in place after a guest
    // barrier too lets a crash show a later epoch without an earlier one.
    let mut found = false;
    for seed in 1..=12u64 {
        let (cluster, disk) = if seed % 2 == 0 {
            (512, 256 << 10)
        } else {
            (CLUSTER, 8 << 20)
        };
        let options = OpenOptions {
            test_txg_overwrite_after_barrier: true,
            ..txg_options(u64::MAX)
        };
        let (log, start, flushed) = run_workload_with(seed, cluster, disk, 300, options);
        let outcome = std::panic::catch_unwind(|| check_crash_states(seed, &log, start, &flushed));
        if outcome.is_err() {
            found = true;
            break;
        }
    }
    assert!(
        found,
        "with overwrites in place after a barrier some crash state must be caught"
    );
}

#[test]
fn the_header_cluster_is_touched_only_by_the_root_fields() {
    // The switch from one group to the next is one 40-byte write (bytes 24..64: L1 and
    // refcount table offsets and sizes) inside the first sector, which a disk writes whole.
    // Nothing else a group writes shares the header's cluster, so no torn write of the header
    // sector's neighbours (header extensions, the rest of the cluster) can mix two groups.
    for seed in [1u64, 2] {
        let (cluster, disk) = if seed % 2 == 0 {
            (512, 256 << 10)
        } else {
            (CLUSTER, 8 << 20)
        };
        let (log, _, _) = run_workload(seed, cluster, disk, 300);
        let mut roots = 0;
        for e in &log {
            if let Event::Write(offset, data) = e {
                if *offset < cluster {
                    assert_eq!(
                        (*offset, data.len()),
                        (24, 40),
                        "seed {seed}: a write into the header cluster beyond the root fields"
                    );
                    roots += 1;
                }
            }
        }
        assert!(roots > 1, "seed {seed}: {roots} root switches");
    }
}

#[test]
fn the_crash_check_finds_a_commit_without_its_first_sync() {
    // The proof can fail: drop the first sync of every commit (merge the group's writes into
    // the interval of the header switch) and some crash state must show a torn tree.
    let mut found = false;
    for seed in 1..=6u64 {
        let (log, start, flushed) = run_workload(seed, 512, 256 << 10, 300);
        let mut merged = Vec::new();
        let mut seen_syncs = 0u64;
        let mut remap = Vec::new();
        for e in &log {
            if let Event::Sync = e {
                seen_syncs += 1;
                // The first of each commit's two syncs goes; the second stays.
                if flushed.iter().any(|f| f.syncs == seen_syncs + 1) {
                    continue;
                }
                remap.push(seen_syncs);
            }
            merged.push(e.clone());
        }
        let flushed: Vec<Flushed> = flushed
            .iter()
            .map(|f| Flushed {
                syncs: remap.iter().filter(|&&r| r <= f.syncs).count() as u64,
                ..f.clone()
            })
            .collect();
        let outcome =
            std::panic::catch_unwind(|| check_crash_states(seed, &merged, start, &flushed));
        if outcome.is_err() {
            found = true;
            break;
        }
    }
    assert!(
        found,
        "without the first sync some crash state must be caught"
    );
}

#[test]
fn sustained_overwrite_reuses_space() {
    let disk = 32 << 20;
    let mut image = open_txg(MemStorage::new(created(CLUSTER, disk)));
    let data = vec![7u8; 4 * CLUSTER as usize];
    let mut rng = XorShift::new(42);
    // Ten times the disk, a commit every 4 MiB.
    let mut written = 0;
    let mut max_len = 0;
    while written < 10 * disk {
        let offset = rng.below(disk / (4 * CLUSTER)) * 4 * CLUSTER;
        image.write(offset, &data, None).unwrap();
        // A barrier after every write: each interval is one write, the rest of it a group.
        image.barrier().unwrap();
        written += data.len() as u64;
        if written % (4 << 20) == 0 {
            image.flush().unwrap();
            max_len = max_len.max(image.storage().len().unwrap());
        }
    }
    let len = image.storage().len().unwrap();
    println!(
        "overwrite of 10x a {} MiB disk in 4 MiB groups: file {} MiB, at most {} MiB",
        disk >> 20,
        len >> 20,
        max_len >> 20
    );
    // The durable tree and one group's copies, plus metadata: never more.
    assert!(
        max_len <= disk + (4 << 20) + (2 << 20),
        "file grew to {max_len}"
    );
    system_check(&image.close().unwrap().into_inner());
}

fn with_file(f: impl FnOnce(&Path)) {
    let dir = tempfile::tempdir().unwrap();
    f(&dir.path().join("img.qcow2"));
}

#[test]
fn internal_snapshots_stay_intact() {
    with_file(|path| {
        qemu_img_create(path, CLUSTER, 4 << 20, None);
        qemu_io(path, &["write -P 0x11 0 4M"]);
        run_ok(
            std::process::Command::new("qemu-img")
                .args(["snapshot", "-c", "s1"])
                .arg(path),
        );
        let mut image = open_file(path, &txg_options(u64::MAX));
        image.write(100_000, &[0x22u8; 300_000], None).unwrap();
        image.barrier().unwrap();
        image.flush().unwrap();
        image.write(2 << 20, &[0x33u8; 65536], None).unwrap();
        image.close().unwrap();
        qemu_img_check(path);
        qemu_io(path, &["read -P 0x22 100000 300000", "read -P 0x33 2M 64k"]);
        run_ok(
            std::process::Command::new("qemu-img")
                .args(["snapshot", "-a", "s1"])
                .arg(path),
        );
        qemu_io(path, &["read -P 0x11 0 4M"]);
        qemu_img_check(path);
    });
}

#[test]
fn backing_files_compressed_clusters_discard_and_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let plain = dir.path().join("plain.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img_create(&plain, CLUSTER, 4 << 20, None);
    qemu_io(&plain, &["write -P 0x44 0 4M"]);
    run_ok(
        std::process::Command::new("qemu-img")
            .args(["convert", "-c", "-f", "qcow2", "-O", "qcow2"])
            .arg(&plain)
            .arg(&base),
    );
    // Compressed clusters in the image itself: overwrite parts of them.
    let mut image = open_file(&base, &txg_options(u64::MAX));
    image.write(70_000, &[0x55u8; 1000], None).unwrap();
    image.discard(CLUSTER * 10, CLUSTER * 2).unwrap();
    image.write_zeroes(CLUSTER * 20, 5000, false, None).unwrap();
    image.flush().unwrap();
    image.close().unwrap();
    qemu_img_check(&base);
    qemu_io(
        &base,
        &[
            "read -P 0x44 0 70000",
            "read -P 0x55 70000 1000",
            "read -P 0x44 71000 584360",
            "read -P 0 640k 128k",
            "read -P 0 1280k 5000",
            "read -P 0x44 1315720 2878584",
        ],
    );

    // A backing file under a group: partial clusters fill from it.
    qemu_img_create(&top, CLUSTER, 4 << 20, Some(&base));
    let backing = ImageBacking(RefCell::new(open_file(
        &base,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )));
    let mut image = open_file(&top, &txg_options(u64::MAX));
    image
        .write(3 << 20, &[0x66u8; 512], Some(&backing))
        .unwrap();
    image.barrier().unwrap();
    image
        .write(3 << 20, &[0x77u8; 256], Some(&backing))
        .unwrap();
    image.flush().unwrap();
    image.close().unwrap();
    qemu_img_check(&top);
    qemu_io(
        &top,
        &[
            "read -P 0x77 3M 256",
            "read -P 0x66 3145984 256",
            "read -P 0x44 3146240 64k",
        ],
    );
}

#[test]
fn resize_and_check_work_inside_groups() {
    let mut image = open_txg(MemStorage::new(created(512, 64 << 10)));
    image.write(0, &[9u8; 4096], None).unwrap();
    // Growing past the L1 table's reach commits the group and resizes in place.
    image.truncate(64 << 20).unwrap();
    assert_eq!(image.groups_committed(), 1);
    image.write(60 << 20, &[8u8; 4096], None).unwrap();
    let report = image.check(CheckFix::None).unwrap();
    assert!(report.is_clean(), "{:?}", report.messages);
    assert_eq!(image.groups_committed(), 2);
    image.write(61 << 20, &[7u8; 512], None).unwrap();
    image.flush().unwrap();
    let bytes = image.close().unwrap().into_inner();
    system_check(&bytes);
    let guest = guest_bytes(bytes);
    assert_eq!(guest.len(), 64 << 20);
    assert!(guest[..4096].iter().all(|&b| b == 9));
    assert!(guest[60 << 20..(60 << 20) + 4096].iter().all(|&b| b == 8));
    assert!(guest[61 << 20..(61 << 20) + 512].iter().all(|&b| b == 7));
}

#[test]
fn an_uncommitted_group_shows_at_most_its_first_epoch_and_the_image_stays_plain_qcow2() {
    with_file(|path| {
        qemu_img_create(path, CLUSTER, 8 << 20, None);
        let mut image = open_file(path, &txg_options(u64::MAX));
        image.write(0, &[1u8; 65536], None).unwrap();
        image.flush().unwrap();
        // The interval before the group overwrites the committed cluster in place ("One
        // epoch"); the barrier opens the group, which copies: its epochs appear only with a
        // commit.
        image.write(0, &[2u8; 65536], None).unwrap();
        image.barrier().unwrap();
        image.write(0, &[6u8; 4096], None).unwrap();
        image.write(65536, &[3u8; 65536], None).unwrap();
        // The process dies here: no flush, no close. The file holds the first group and the
        // first epoch of the second.
        std::mem::forget(image);
        let (code, report) = qemu_img_check_json(path);
        assert!(code == 0 || code == 3, "qemu-img check exited {code}");
        assert_eq!(report.u64_or_0("corruptions"), 0);
        // QEMU's qcow2 gives the unused reserve back.
        run_ok(
            Command::new("qemu-img")
                .args(["check", "-r", "leaks", "-f", "qcow2"])
                .arg(path),
        );
        qemu_img_check(path);
        qemu_io(path, &["read -P 2 0 64k", "read -P 0 64k 64k"]);
        // QEMU's qcow2 writes; the next txg open takes over from there.
        qemu_io(path, &["write -P 4 128k 64k"]);
        let mut image = open_file(path, &txg_options(u64::MAX));
        let mut buf = vec![0u8; 65536];
        image.read(128 << 10, &mut buf, None).unwrap();
        assert!(buf.iter().all(|&b| b == 4));
        image.write(0, &[5u8; 4096], None).unwrap();
        image.close().unwrap();
        qemu_img_check(path);
        qemu_io(
            path,
            &["read -P 5 0 4k", "read -P 2 4k 60k", "read -P 4 128k 64k"],
        );
    });
}

/// MemStorage whose next header switch (the 40-byte write at offset 24) or next sync fails
/// on request; a failed switch may still have reached the file ("landed").
#[derive(Default)]
struct Flaky {
    inner: MemStorage,
    fail_switch: Cell<Option<bool>>,
    fail_sync: Cell<bool>,
}

impl Storage for Flaky {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if offset == 24 && buf.len() == 40 {
            if let Some(landed) = self.fail_switch.take() {
                if landed {
                    self.inner.write_at(offset, buf)?;
                }
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> io::Result<()> {
        if self.fail_sync.take() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}

#[test]
fn a_failed_commit_is_retried_and_every_state_stays_clean() {
    for (case, landed) in [("sync", false), ("switch", false), ("switch", true)] {
        let mut image = open_txg(Flaky {
            inner: MemStorage::new(created(512, 1 << 20)),
            ..Default::default()
        });
        image.write(0, &[1u8; 8192], None).unwrap();
        image.flush().unwrap();
        let committed = guest_bytes(image.storage().inner.snapshot());

        // A group (a barrier after a write opens it) that writes after its barrier too, so
        // its commit copies and switches the header.
        image.write(4096, &[2u8; 8192], None).unwrap();
        image.barrier().unwrap();
        image.write(4096, &[2u8; 8192], None).unwrap();
        if case == "sync" {
            image.storage().fail_sync.set(true);
        } else {
            image.storage().fail_switch.set(Some(landed));
        }
        assert!(
            image.flush().is_err(),
            "{case}: the failure reaches the flush"
        );
        let attempted = {
            let mut m = committed.clone();
            m[4096..12288].fill(2);
            m
        };
        // A crash now: one of the two groups, clean; the group holds one epoch, whose
        // overwrites may show in part ("One epoch" in txg.rs).
        let now = image.storage().inner.snapshot();
        system_check_crash_state(&now);
        let guest = guest_bytes(now);
        assert!(
            guest == attempted || each_sector_from(&guest, &[&committed, &attempted]),
            "{case} landed={landed}"
        );

        // The group goes on and commits on the next try.
        image.write(20000, &[3u8; 3000], None).unwrap();
        let continued = {
            let mut m = attempted.clone();
            m[20000..23000].fill(3);
            m
        };
        let now = image.storage().inner.snapshot();
        system_check_crash_state(&now);
        let guest = guest_bytes(now);
        assert!(
            each_sector_from(&guest, &[&committed, &attempted, &continued]),
            "{case} landed={landed}"
        );
        image.flush().unwrap();
        let bytes = image.close().unwrap().inner.into_inner();
        system_check(&bytes);
        let guest = guest_bytes(bytes);
        assert!(guest[..4096].iter().all(|&b| b == 1));
        assert!(guest[4096..12288].iter().all(|&b| b == 2));
        assert!(guest[20000..23000].iter().all(|&b| b == 3));
    }
}

/// A stream job ends with `change_backing_file` (the image names no backing file any more);
/// in the txg mode its flush commits the open group, and the header it then wrote had been
/// encoded before that commit: it named the old L1 and refcount tables again, so the group
/// (the guest's writes, the streamed data) was gone, even after a clean close.
#[test]
fn changing_the_backing_file_keeps_the_group_its_flush_commits() {
    let mut image = open_txg(MemStorage::new(created(CLUSTER, 64 << 20)));
    let data = vec![0x5au8; CLUSTER as usize];
    image.write(0, &data, None).unwrap();
    image.write(5 * CLUSTER, &data, None).unwrap();
    image
        .change_backing_file(Some(b"base.qcow2"), Some(b"qcow2"))
        .unwrap();
    assert_eq!(
        image.header().backing_file.as_deref(),
        Some(&b"base.qcow2"[..])
    );

    // What the file says right away, before any close.
    let durable = guest_bytes(image.storage().snapshot());
    assert!(durable[..CLUSTER as usize].iter().all(|&b| b == 0x5a));
    assert!(durable[5 * CLUSTER as usize..6 * CLUSTER as usize]
        .iter()
        .all(|&b| b == 0x5a));

    image.change_backing_file(None, None).unwrap();
    let bytes = image.close().unwrap().into_inner();
    let guest = guest_bytes(bytes.clone());
    assert!(guest[..CLUSTER as usize].iter().all(|&b| b == 0x5a));
    system_check(&bytes);
}
