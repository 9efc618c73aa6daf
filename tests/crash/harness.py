#!/usr/bin/env python3
"""The crash-consistency harness: runs each workload through the real driver in qemu-io with
a qcow2b-recorder filter above the format node (what the guest sent) and one below it (what
reached the image file), builds the crash states the recorded barriers and flushes allow
(model.py), and checks each distinct resulting image (tools here, guest-level truth in
guest.py). Usage: see run.sh, or --help.
"""

import argparse
import hashlib
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import guest as guestmod  # noqa: E402
import known_bugs  # noqa: E402
import model as modelmod  # noqa: E402
import reclog  # noqa: E402
import workloads as wl  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(HERE))
BUILD_ROOT = os.environ.get("QCOW2B_BUILD_ROOT", os.path.join(ROOT, ".build"))
BIN = os.path.join(BUILD_ROOT, "bin")
QEMU_IMG = os.path.join(BIN, "qemu-img")
QEMU_IO = os.path.join(BIN, "qemu-io")
SYS_QEMU_IMG = wl.SYS_QEMU_IMG
SYS_QEMU_IO = wl.SYS_QEMU_IO

# mode -> (format driver, its options)
MODES = {
    "ordered": ("qcow2b", "barrier=ordered"),
    "flush": ("qcow2b", "barrier=flush"),
    "barrierfs": ("qcow2b", "barrier=barrierfs,x-barrierfs-inject=on"),
    "txg": ("qcow2b", "barrier=txg"),
    "ordered-gfb": ("qcow2b", "barrier=ordered"),
    "txg-gfb": ("qcow2b", "barrier=txg"),
    "qcow2": ("qcow2", ""),
}
QCOW2B_MODES = ("ordered", "flush", "barrierfs", "txg", "ordered-gfb", "txg-gfb")
# The "-gfb" modes run every workload as a guest whose device has guest-flush=barrier
# (qemu-patches 0013): each flush of the script reaches the driver as a bare barrier, so the
# guest-level checks ask for order only (a prefix of the flush epochs), never durability.
GUEST_FLUSH_BARRIER = ("ordered-gfb", "txg-gfb")
# The mutation switch per mode: one ordering point left out. The txg mode has no stage 3
# (a group writes nothing the durable image names); its commit loses its first sync.
MUTATION = {m: "x-test-skip-ordering=stage3" for m in ("ordered", "flush", "barrierfs",
                                                       "ordered-gfb")}
MUTATION["txg"] = MUTATION["txg-gfb"] = "x-test-skip-ordering=txg-first-sync"
# The mutation test: workloads whose allocations need the stage-3 ordering point (data
# copied from a backing file, a snapshot's shared cluster or a compressed cluster; data in
# subclusters of a cluster already allocated, over stale bytes; compressed data, which
# never reads as zeros when lost).
MUTATION_WORKLOADS = ("backing-partial", "snapshot-cow", "compressed", "subclusters",
                      "compressed-writes")
# A second mutation: freed clusters discarded on the file as soon as their refcount drops,
# before the free is durable (image/discard.rs's invariant broken). It must be caught where
# an ordering point is not a sync (ordered, txg and their guest-flush=barrier modes); in
# flush and barrierfs every ordering point before the drop orders the discard too.
DISCARD_MUTATION = "x-test-skip-ordering=discard-early"
DISCARD_MUTATION_WORKLOAD = "discard-passthrough"
DISCARD_MUTATION_MODES = ("ordered", "txg", "ordered-gfb", "txg-gfb")
# A third: the header names a new snapshot table before the table, the snapshot's L1 copy
# and their refcounts are ordered (image/snapshots.rs). Snapshot operations write in place
# with the ordinary rules in every mode (a transaction group commits first), so every mode
# must catch it.
SNAPSHOT_MUTATION = "x-test-skip-ordering=snapshot-table"
SNAPSHOT_MUTATION_WORKLOAD = "snapshots"
SNAPSHOT_MUTATION_MODES = QCOW2B_MODES
# A fourth: the header names a new bitmap directory before the bitmaps' data clusters,
# tables and the directory are ordered (image/bitmaps.rs, switch_bitmap_directory's one
# ordering point). Bitmap operations write in place in every mode, so every mode must catch
# it.
BITMAP_MUTATION = "x-test-skip-ordering=bitmap-table"
BITMAP_MUTATION_WORKLOAD = "bitmaps"
BITMAP_MUTATION_MODES = QCOW2B_MODES
# A fifth: a refcount width change names its new refcount table in the header before the
# new table and blocks are durable (image/refcount_order.rs). An amend writes in place with
# its own syncs in every mode, so every mode must catch it.
AMEND_MUTATION = "x-test-skip-ordering=amend-refcount"
AMEND_MUTATION_WORKLOAD = "amend"
AMEND_MUTATION_MODES = QCOW2B_MODES
# The switch each mutation workload runs with (the others: MUTATION, per mode).
MUTATION_BY_WORKLOAD = {DISCARD_MUTATION_WORKLOAD: DISCARD_MUTATION,
                        SNAPSHOT_MUTATION_WORKLOAD: SNAPSHOT_MUTATION,
                        BITMAP_MUTATION_WORKLOAD: BITMAP_MUTATION,
                        AMEND_MUTATION_WORKLOAD: AMEND_MUTATION}

# States in all (spread over the workloads and modes: see allocate), and per mutation run.
QUICK_STATES = 3000
FULL_STATES = 110_000
MUTATION_BUDGET = {"quick": 120, "full": 600}
# Mutations whose window is a few writes of a long run get more states: the snapshot
# mutation (one header write per snapshot taken or deleted: at 120 states the sampler missed
# it in the ordered mode, at 375 it found 16), the early discard (in the ordered mode 1
# of 120 states failed, 9 of 400) and the amend's (one header write per width change: 1 to 5
# of 120 states failed).
WORKLOAD_MUTATION_BUDGET = {SNAPSHOT_MUTATION_WORKLOAD: {"quick": 400, "full": 1200},
                            DISCARD_MUTATION_WORKLOAD: {"quick": 400, "full": 1200},
                            BITMAP_MUTATION_WORKLOAD: {"quick": 400, "full": 1200},
                            AMEND_MUTATION_WORKLOAD: {"quick": 400, "full": 1200}}


# --- tools ---------------------------------------------------------------------------------
def tool(*args, timeout=120):
    try:
        p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return -999, f"timed out after {timeout} s"
    return p.returncode, p.stdout.decode(errors="replace")


def qemu_img_check(binary, fmt, path):
    """(exit status, leaks, corruptions, text)."""
    rc, out = tool(binary, "check", "--output=json", "-f", fmt, path)
    leaks = corruptions = 0
    try:
        j = json.loads(out[out.index("{"):])
        leaks, corruptions = j.get("leaks", 0), j.get("corruptions", 0)
    except ValueError:
        pass
    return rc, leaks, corruptions, out


_CHECK_ERROR = re.compile(r"^ERROR (.*)$", re.M)
_COPIED_MISSING = re.compile(r"^OFLAG_COPIED (data|L2) cluster: l[12]_(entry|index)=.*\brefcount=1$")


def copied_missing_only(check_text):
    """Whether every error `qemu-img check` reported is COPIED missing on a cluster counted
    once ("OFLAG_COPIED ... refcount=1"): the state a crash leaves between a snapshot's flags
    and its counts (image/snapshots.rs). A write copies such a cluster first, so no data is
    at risk, and `check -r all` sets the flag. COPIED left on a cluster counted twice is not
    this (that one would let a write change a snapshot's data) and fails as any error."""
    errors = _CHECK_ERROR.findall(check_text)
    for e in errors:
        e = e.strip()
        if not _COPIED_MISSING.match(e) or (e.startswith("OFLAG_COPIED data")
                                             and not _copied_bit_clear(e)):
            return False
    return bool(errors)


def _copied_bit_clear(error):
    """Whether the L2 entry an OFLAG_COPIED data error shows lacks the COPIED bit."""
    m = re.search(r"l2_entry=([0-9a-f]+)", error)
    return bool(m) and not int(m.group(1), 16) >> 63


def bitmaps_of(path):
    """The persistent bitmaps of a qcow2 image, read from the file: [(name, in_use,
    granularity_bits, bits or None)]; [] when the autoclear bit says they are not valid.
    Raises ValueError on a directory or table that does not parse."""
    import struct
    with open(path, "rb") as f:
        img = f.read()
    if len(img) < 104 or struct.unpack(">I", img[4:8])[0] < 3:
        return []
    cluster_bits = struct.unpack(">I", img[20:24])[0]
    cs = 1 << cluster_bits
    size = struct.unpack(">Q", img[24:32])[0]
    autoclear = struct.unpack(">Q", img[88:96])[0]
    header_len = struct.unpack(">I", img[100:104])[0]
    if not autoclear & 1:
        return []
    at, ext = header_len, None
    while at + 8 <= cs:
        kind, n = struct.unpack(">II", img[at:at + 8])
        if kind == 0:
            break
        if kind == 0x23852875:
            ext = struct.unpack(">IIQQ", img[at + 8:at + 32])
        at += 8 + (n + 7) // 8 * 8
    if ext is None:
        return []
    nb, _, dir_size, dir_off = ext
    d = img[dir_off:dir_off + dir_size]
    if len(d) != dir_size:
        raise ValueError("bitmap directory beyond the file")
    out, at = [], 0
    for _ in range(nb):
        t_off, t_size, flags, _typ, gbits, name_size, extra = struct.unpack(
            ">QIIBBHI", d[at:at + 24])
        name = d[at + 24 + extra:at + 24 + extra + name_size].decode(errors="replace")
        at += (24 + extra + name_size + 7) // 8 * 8
        in_use = bool(flags & 1)
        bits = None
        if not in_use:
            nbytes = ((size + (1 << gbits) - 1) >> gbits) // 8 + 8
            bits = bytearray()
            for i in range(t_size):
                (e,) = struct.unpack(">Q", img[t_off + 8 * i:t_off + 8 * i + 8])
                off = e & 0x00fffffffffffe00
                if e & 0xff000000000001fe or (off and (e & 1)):
                    raise ValueError(f"bitmap {name}: invalid table entry {e:#x}")
                if off:
                    chunk = img[off:off + cs]
                    if len(chunk) != cs:
                        raise ValueError(f"bitmap {name}: data cluster beyond the file")
                    bits += chunk
                else:
                    bits += (b"\xff" if e & 1 else b"\0") * cs
            bits = bytes(bits[:nbytes])
        out.append((name, in_use, gbits, bits))
    return out


def bitmap_failures(r):
    """A consistent bitmap must have a bit for every guest write the image shows (an
    incremental backup made from it would miss the write otherwise)."""
    out = []
    bms = r.get("bitmaps")
    if isinstance(bms, str):
        return [("bitmap", f"the bitmaps do not read: {bms}")]
    if not bms or r.get("guest") is None or GUEST is None:
        return out
    for name, in_use, gbits, bits in bms:
        if in_use or name == "frozen":
            continue
        for index in r["guest"]["visible"]:
            w = GUEST.by_index[index]
            first, end = w.offset >> gbits, (w.offset + w.length - 1 >> gbits) + 1
            for bit in range(first, end):
                if bit // 8 >= len(bits) or not bits[bit // 8] >> (bit % 8) & 1:
                    out.append(("bitmap", f"bitmap '{name}' is consistent but has no bit for "
                                f"write #{index} ({w.offset:#x}+{w.length:#x}), which the "
                                "image shows"))
                    break
    return out[:4]


def open_read_write(binary, fmt, path, copy, offset):
    """Opens a copy read-write, writes 64 KiB near the end and reads it back."""
    shutil.copyfile(path, copy)
    rc, out = tool(binary, "-t", "writeback", "-f", fmt,
                   "-c", f"write -q -P 0xa5 {offset} 64k",
                   "-c", f"read -q -P 0xa5 {offset} 64k", copy)
    os.unlink(copy)
    bad = rc != 0 or any(w in out for w in ("failed", "error", "Error"))
    return (not bad), out.strip()


def worker_init():
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# The guest model of the combination being checked: set before the pool forks.
GUEST = None
# The snapshot names the checked run may show (load_models sets it, as GUEST).
SNAPSHOT_NAMES = set()


def check_image(path):
    """Every tool check of one crash image, and its guest-level classification."""
    r = {}
    rc, leaks, corr, out = qemu_img_check(SYS_QEMU_IMG, "qcow2", path)
    r["sys_check"] = (rc, leaks, corr, out[-600:])
    r["refblocks_counted_zero"] = rc == 2 and known_bugs.refblocks_counted_zero(out, path)
    r["sys_check_copied_only"] = rc == 2 and copied_missing_only(out)
    rc, leaks, corr, out = qemu_img_check(QEMU_IMG, "qcow2b", path)
    r["built_check"] = (rc, leaks, corr, out[-600:])
    r["built_check_copied_only"] = rc == 2 and copied_missing_only(out)
    raw = path + ".raw"
    rc, out = tool(SYS_QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", path, raw)
    if rc == 0:
        with open(raw, "rb") as f:
            data = f.read()
        os.unlink(raw)
        r["guest"] = GUEST.classify(data)
        size = len(data)
    else:
        r["guest"] = None
        r["read_error"] = out[-600:]
        size = GUEST.initial_size
    r["snapshots"] = snapshots_of(path)
    try:
        r["bitmaps"] = bitmaps_of(path)
    except (ValueError, IndexError, __import__("struct").error) as e:
        r["bitmaps"] = str(e) or type(e).__name__
    rc, out = tool(QEMU_IMG, "compare", "-f", "qcow2", "-F", "qcow2b", path, path)
    r["compare"] = (rc, out[-600:])
    offset = max(0, size - 64 * 1024)
    r["rw_qcow2b"] = open_read_write(QEMU_IO, "qcow2b", path, path + ".rw1", offset)
    r["rw_qcow2"] = open_read_write(SYS_QEMU_IO, "qcow2", path, path + ".rw2", offset)
    os.unlink(path)
    return r


def image_failures(r):
    """Failures of the tool checks of one image: [(kind, text)]."""
    out = []
    for name, key in (("system qemu-img check (qcow2)", "sys_check"),
                      ("built qemu-img check (qcow2b)", "built_check")):
        rc, leaks, corr, text = r[key]
        if rc == 2 and r.get(key + "_copied_only"):
            # COPIED missing on clusters counted once, nothing else: see copied_missing_only.
            continue
        if rc not in (0, 3):
            kind = "corrupt" if rc == 2 else "check"
            out.append((kind, f"{name} exited {rc} ({corr} corruptions, {leaks} leaks): "
                        f"{text.strip()[-300:]}"))
    if r["guest"] is None:
        out.append(("read", f"QEMU's qcow2 cannot read the image: {r['read_error'].strip()}"))
    # Every snapshot listed is one the run had or took, with an id: a snapshot table named
    # by the header before it was written shows entries of zeros (no id, no name).
    for sid, name in r.get("snapshots") or []:
        if not sid or name not in SNAPSHOT_NAMES:
            out.append(("snapshot", f"a snapshot the run never took: id {sid!r}, name "
                        f"{name!r} (taken: {sorted(SNAPSHOT_NAMES)})"))
    out += bitmap_failures(r)
    # The comparison and the read-write opens run only where the caller ran them
    # (check_image does; the real-guest harness, vm.py, does not).
    rc, text = r.get("compare", (0, ""))
    if rc != 0:
        out.append(("compare", f"qcow2b and QEMU's qcow2 read different data (compare "
                    f"exit {rc}): {text.strip()[-200:]}"))
    for name, key in (("qcow2b", "rw_qcow2b"), ("QEMU's qcow2", "rw_qcow2")):
        ok, text = r.get(key, (True, ""))
        if not ok:
            out.append(("open-rw", f"{name} cannot open it read-write and write: "
                        f"{text[-300:]}"))
    return out


# --- recording a run -------------------------------------------------------------------------
def format_options(mode, mutation, workload=None):
    fmt, opts = MODES[mode]
    opts = [o for o in opts.split(",") if o]
    if mutation:
        opts.append(MUTATION_BY_WORKLOAD.get(workload, MUTATION[mode]))
    return fmt, opts


def record(workload, mode, workdir, mutation=False):
    """Sets up and runs one workload; leaves start.img, initial.raw, guest.log, file.log,
    final.img in workdir. Returns the qemu-io output."""
    setup = wl.Setup(workdir)
    script = wl.Script(workdir, first_id=1)
    wl.WORKLOADS[workload](setup, script)
    if mode in GUEST_FLUSH_BARRIER:
        script.flushes_as_barriers()
    wl.run(SYS_QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", setup.image,
           os.path.join(workdir, "initial.raw"))
    shutil.copyfile(setup.image, os.path.join(workdir, "start.img"))
    fmt, opts = format_options(mode, mutation, workload)
    spec = ",".join(
        [f"driver=qcow2b-recorder,log={workdir}/guest.log,file.driver={fmt}"]
        + [f"file.{o}" for o in opts + script.driver_options]
        + ["file.file.driver=qcow2b-recorder", f"file.file.log={workdir}/file.log",
           f"file.file.file.filename={setup.image}"])
    args = [QEMU_IO, "-t", "writeback", "--image-opts", spec] + script.args()
    rc, out = tool(*args, timeout=600)
    if rc != 0 or any(w in out for w in ("failed", "error", "Error")):
        raise RuntimeError(f"workload {workload} ({mode}) failed (exit {rc}):\n{out[-2000:]}")
    shutil.copyfile(setup.image, os.path.join(workdir, "final.img"))
    with open(os.path.join(workdir, "meta.json"), "w") as f:
        json.dump({"workload": workload, "mode": mode, "mutation": mutation,
                   "commands": script.commands}, f, indent=1)
    return out


def snapshots_of(path):
    """[(id, name)] of the internal snapshots QEMU's qcow2 lists in an image, or None if it
    cannot open it."""
    rc, out = tool(SYS_QEMU_IMG, "info", "--output=json", "-f", "qcow2", "-U", path)
    if rc != 0:
        return None
    try:
        info = json.loads(out[out.index("{"):])
    except ValueError:
        return None
    return [(s.get("id", ""), s.get("name", "")) for s in info.get("snapshots", [])]


def snapshot_names(workdir):
    """The names a crash image's snapshots may have: those of the starting image and those
    the workload's script takes."""
    names = {name for _, name in snapshots_of(os.path.join(workdir, "start.img")) or []}
    with open(os.path.join(workdir, "meta.json")) as f:
        for c in json.load(f)["commands"]:
            if c.startswith("snapshot -c "):
                names.add(c.split(None, 2)[2])
    return names


def load_models(workdir):
    global SNAPSHOT_NAMES
    SNAPSHOT_NAMES = snapshot_names(workdir)
    with open(os.path.join(workdir, "start.img"), "rb") as f:
        start = f.read()
    with open(os.path.join(workdir, "initial.raw"), "rb") as f:
        initial = f.read()
    fm = modelmod.FileModel(reclog.read_log(os.path.join(workdir, "file.log")), start)
    gm = guestmod.GuestModel(reclog.read_log(os.path.join(workdir, "guest.log")), initial,
                             len(initial))
    return fm, gm


def self_check(fm, workdir):
    """The recorder's own check: replaying every recorded write and truncate onto the
    starting image gives the file the run left (bytes under discards excepted)."""
    with open(os.path.join(workdir, "final.img"), "rb") as f:
        final = bytearray(f.read())
    replay = fm.replay_all()
    for lo, hi in fm.discarded_ranges():
        hi = min(hi, len(final), len(replay))
        final[lo:hi] = replay[lo:hi]
    if bytes(replay) != bytes(final):
        n = min(len(replay), len(final))
        first = next((i for i in range(n) if replay[i] != final[i]), n)
        raise RuntimeError(f"{workdir}: replaying the file log does not give the final image "
                           f"(lengths {len(replay)} and {len(final)}, first difference at "
                           f"{first:#x}): the recorder missed something")


# --- states --------------------------------------------------------------------------------
def guest_point(c):
    """A crash point of the file model (positions doubled) in recorder sequence numbers."""
    return c / 2


def state_key(fm, c, present):
    items = tuple(sorted((w.index, -1 if m is modelmod.FULL else tuple(sorted(m)))
                         for w, m in present))
    return items, tuple(t.index for t in fm.truncates_before(c))


SMALL_GROUP = 64
EXACT_COUNT_LIMIT = 60_000  # model states enumerated to count the distinct ones
SAMPLE_IDS = 1_000_000  # state ids of sampled states start here


def states(fm, budget, seed, tag, everything, samples=None):
    """The states to check: (number enumerated or None if all, generator of (state id, c, r,
    present)). All of them if `everything`; else every state of the small groups if they
    fit in half the budget, then seeded samples of the other groups (`samples` draws, four
    per state of the budget unless said; duplicates are dropped by the caller). A state's id
    replays it (state_by_id, with the same `samples`)."""
    groups = fm.groups()
    if everything:
        return None, ((i, c, r, p) for i, (c, r, p) in
                      enumerate(fm.enumerate([(c, r) for c, r, _ in groups])))
    small = [(c, r) for c, r, n in groups if n <= SMALL_GROUP]
    large = [(c, r) for c, r, n in groups if n > SMALL_GROUP]
    n_small = sum(n for _, _, n in groups if n <= SMALL_GROUP)
    if n_small > budget // 2:
        small, large, n_small = [], [(c, r) for c, r, _ in groups], 0

    def gen():
        yield from ((i, c, r, p) for i, (c, r, p) in enumerate(fm.enumerate(small)))
        if not large:
            return
        for i in range(samples or budget * 4):
            rng = random.Random(f"{seed}:{tag}:{i}")
            c, r, p = fm.sample(rng, large)
            yield SAMPLE_IDS + i, c, r, p
    return n_small, gen()


def unique_states(fm, gm):
    """The number of distinct states of the whole model (what run_combination checks when it
    checks everything)."""
    groups = [(c, r) for c, r, _ in fm.groups()]
    return len({(state_key(fm, c, p), gm.signature(guest_point(c)))
                for c, _, p in fm.enumerate(groups)})


def state_by_id(fm, budget, seed, tag, everything, state_id, samples=None):
    _, gen = states(fm, budget, seed, tag, everything, samples)
    for i, c, r, p in gen:
        if i == state_id:
            return c, r, p
    raise SystemExit(f"no state {state_id}")


def describe_state(fm, c, r, present):
    pos = "end of run" if c == modelmod.INF else f"before event {c // 2}"
    parts = []
    for w, m in sorted(present, key=lambda x: x[0].index):
        if m is modelmod.FULL:
            continue
        parts.append(f"#{w.index} ({len(m)} of {len(w.effective)} changed sectors)")
    whole = sorted(w.index for w, m in present if m is modelmod.FULL)
    missing = sorted(w.index for w in fm.issued(c) if w.index not in {x.index for x, _ in present})
    partial = [w for w, m in present if m is not modelmod.FULL]
    absent = [w for w in fm.issued(c) if w.index in set(missing)]
    shown = "; ".join(w.describe() for w in (partial + absent)[:4])
    return (f"crash {pos}; threshold {'none' if r < 0 else r // 2}; whole: "
            f"{compress_ranges(whole)}; torn: {', '.join(parts) or 'none'}; "
            f"issued but absent: {compress_ranges(missing)}"
            + (f"\n       not whole: {shown}" if shown else ""))


def compress_ranges(xs):
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out) or "none"


# --- the checker's own test --------------------------------------------------------------------
def checker_self_test(workroot, jobs, seed, count=40):
    """States *outside* the crash model must make the guest-level checks fail: a write made
    durable by a completed flush dropped ("flushed" expected), a write ordered before a
    later one by a barrier dropped while the later one stays ("order" expected). Returns
    {kind of violation: {failure kind: states}}."""
    global GUEST
    workdir = os.path.join(workroot, "checker-self-test")
    os.makedirs(workdir)
    record("small-epochs", "barrierfs", workdir)
    fm, gm = load_models(workdir)
    GUEST = gm
    rng = random.Random(f"{seed}:checker-self-test")
    data = [w for w in fm.writes if w.kind == "W" and w.ok]
    violations = []
    flushed_points = [c for c in fm.points if fm.flushed_before(c) >= 0]
    for _ in range(count):
        c = rng.choice(flushed_points)
        durable = [w for w in data if w.ck < fm.flushed_before(c)]
        drop = rng.choice(durable)
        violations.append(("drop-durable", c, [(w, modelmod.FULL) for w in fm.issued(c)
                                               if w is not drop]))
    for _ in range(count):
        w2 = rng.choice([w for w in data if w.t >= 0])
        earlier = [w for w in data if w.ck < w2.t and w.ck > max(
            (i for i, _ in fm.durable if i < w2.t), default=-1)]
        if not earlier:
            continue
        drop = rng.choice(earlier)
        # Just after w2 completed: no flush after `drop` has completed yet unless one
        # completed before w2 was issued.
        c = w2.ck + 1
        if fm.flushed_before(c) > drop.ck:
            continue
        violations.append(("break-order", c, [(w, modelmod.FULL) for w in fm.issued(c)
                                              if w is not drop]))
    found = {}
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(jobs, initializer=worker_init) as pool:
        jobs_ = []
        for i, (kind, c, present) in enumerate(violations):
            path = os.path.join(workdir, f"v{i}.qcow2")
            with open(path, "wb") as f:
                f.write(fm.build(c, present))
            jobs_.append((kind, c, pool.apply_async(check_image, (path,))))
        for kind, c, job in jobs_:
            res = job.get()
            fails = image_failures(res)
            if res["guest"] is not None:
                fails += gm.check(guest_point(c), res["guest"])
            got = found.setdefault(kind, {"states": 0})
            got["states"] += 1
            for k in {k for k, _ in fails}:
                got[k] = got.get(k, 0) + 1
    shutil.rmtree(workdir, ignore_errors=True)
    return found


# --- one combination -------------------------------------------------------------------------
class Run:
    """One workload recorded in one mode."""

    def __init__(self, workload, mode, mutation, workroot):
        self.workload, self.mode, self.mutation = workload, mode, mutation
        self.tag = f"{workload}-{mode}" + ("-mutation" if mutation else "")
        self.workdir = os.path.join(workroot, self.tag)
        os.makedirs(self.workdir)
        t0 = time.time()
        record(workload, mode, self.workdir, mutation)
        fm, gm = load_models(self.workdir)
        self_check(fm, self.workdir)
        # The model's states: counted exactly where enumerating them is cheap, else an upper
        # bound (the same state shows at several crash points).
        self.model_states = sum(n for _, _, n in fm.groups())
        self.exact = self.model_states <= EXACT_COUNT_LIMIT
        if self.exact:
            self.model_states = unique_states(fm, gm)
        self.seconds = time.time() - t0


def allocate(runs, total):
    """Per-run budgets summing to about `total`: runs with fewer model states than an even
    share get all of them, the others share the rest evenly."""
    budgets, left = {}, total
    order = sorted(runs, key=lambda r: r.model_states)
    for i, run in enumerate(order):
        share = left // (len(order) - i)
        budgets[run.tag] = min(run.model_states, share)
        left -= budgets[run.tag]
    return budgets


def check_distinct_states(fm, gm, gen, budget, workdir, jobs, check):
    """Takes states from `gen` until `budget` distinct ones (by their writes and what the
    guest was promised), builds each distinct image once in `workdir` and runs `check(path)`
    on it in a pool of `jobs` forked workers (the caller sets what they read first). Returns
    ([(state id, c, r, present, image digest)], {image digest: check result})."""
    seen, by_hash, state_list = set(), {}, []
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(jobs, initializer=worker_init) as pool:
        pending = []
        for sid, c, r, present in gen:
            key = (state_key(fm, c, present), gm.signature(guest_point(c)))
            if key in seen:
                continue
            seen.add(key)
            img = fm.build(c, present)
            h = hashlib.sha1(img).hexdigest()
            if h not in by_hash:
                path = os.path.join(workdir, f"s{len(by_hash)}.qcow2")
                with open(path, "wb") as f:
                    f.write(img)
                by_hash[h] = pool.apply_async(check, (path,))
                pending.append(by_hash[h])
                if len(pending) > 4 * jobs:
                    pending.pop(0).wait()
            state_list.append((sid, c, r, present, h))
            if len(state_list) >= budget:
                break
        results = {h: a.get() for h, a in by_hash.items()}
    return state_list, results


# The first state of each known bug in this process: printed with its replay command.
KNOWN_EXAMPLES = {}


def run_combination(run, budget, seed, resultdir, jobs, strict):
    """Checks the crash states of one recorded run; returns the summary row."""
    global GUEST
    workload, mode, mutation, tag, workdir = (run.workload, run.mode, run.mutation, run.tag,
                                              run.workdir)
    t0 = time.time() - run.seconds
    fm, gm = load_models(workdir)
    GUEST = gm
    everything = run.exact and budget >= run.model_states
    enumerated, gen = states(fm, budget, seed, tag, everything)
    state_list, results = check_distinct_states(fm, gm, gen, budget, workdir, jobs, check_image)
    failures, known = [], {}  # failures: (kind, text, state id, c, r, present)
    failed_states, known_states = set(), set()
    new_examples = []
    image_fail = {h: image_failures(r) for h, r in results.items()}
    for sid, c, r, present, h in state_list:
        res = results[h]
        fails = list(image_fail[h])
        if res["guest"] is not None:
            fails += gm.check(guest_point(c), res["guest"])
        if not fails:
            continue
        info = {"mode": mode, "unsynced_across_flush": fm.unsynced_across_flush(c, present)}
        explained = [known_bugs.explain(kind, text, res, info) for kind, text in fails]
        if not strict and all(explained):
            known_states.add(sid)
            for bug in explained:
                known[bug] = known.get(bug, 0) + 1
                if bug not in KNOWN_EXAMPLES:
                    KNOWN_EXAMPLES[bug] = (fails[explained.index(bug)], sid, c, r, present)
                    new_examples.append(bug)
            continue
        failed_states.add(sid)
        for kind, text in fails:
            failures.append((kind, text, sid, c, r, present))
    row = {"workload": workload, "mode": mode, "mutation": mutation,
           "states": len(state_list), "images": len(results),
           "enumerated": (len(state_list) if enumerated is None
                          else sum(1 for st in state_list if st[0] < SAMPLE_IDS)),
           "leak_images": sum(1 for r in results.values() if r["sys_check"][1] > 0),
           "leak_clusters": sum(r["sys_check"][1] for r in results.values()),
           "failed_states": len(failed_states), "known_states": len(known_states),
           "known": known, "kinds": sorted({f[0] for f in failures}),
           "seconds": time.time() - t0, "file_requests": len(fm.ops),
           "model_states": run.model_states, "budget": budget,
           "guest_requests": len(gm.ops)}
    if failures or new_examples:
        keep = os.path.join(resultdir, tag)
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(workdir, keep, ignore=shutil.ignore_patterns("s*.qcow2*", "src-*",
                                                                     "setup-*"))
        meta_path = os.path.join(keep, "meta.json")
        with open(meta_path) as f:
            meta = json.load(f)
        meta.update({"seed": seed, "budget": budget, "tag": tag, "everything": everything})
        with open(meta_path, "w") as f:
            json.dump(meta, f, indent=1)
        row["kept"] = keep
        for bug in new_examples:
            (kind, text), sid, c, r, present = KNOWN_EXAMPLES[bug]
            print(f"  known bug {bug}, first seen here [{tag}] {kind}: {text[:300]}\n"
                  f"       seed {seed}, state {sid}: {describe_state(fm, c, r, present)}\n"
                  f"       replay: bash tests/crash/run.sh --replay {keep}:{sid}",
                  flush=True)
        shown = {}
        for kind, text, sid, c, r, present in failures:
            if shown.get(kind, 0) >= 2:
                continue
            shown[kind] = shown.get(kind, 0) + 1
            print(f"  FAIL [{tag}] {kind}: {text}\n"
                  f"       seed {seed}, state {sid}: {describe_state(fm, c, r, present)}\n"
                  f"       replay: bash tests/crash/run.sh --replay {keep}:{sid}",
                  flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    return row


def print_table(rows):
    head = (f"{'workload':<19} {'mode':<10} {'states':>7} {'enum':>6} {'images':>7} "
            f"{'leaky':>6} {'leaked':>7} {'failed':>7} {'known':>6}  failure kinds")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['workload']:<19} {r['mode']:<10} {r['states']:>7} {r['enumerated']:>6} "
              f"{r['images']:>7} {r['leak_images']:>6} {r['leak_clusters']:>7} "
              f"{r['failed_states']:>7} {r['known_states']:>6}  {','.join(r['kinds'])}")


def summarize(rows, label):
    n = lambda key: sum(r[key] for r in rows)  # noqa: E731
    known = {}
    for r in rows:
        for bug, k in r["known"].items():
            known[bug] = known.get(bug, 0) + k
    text = ", ".join(f"{bug} {k}" for bug, k in sorted(known.items())) or "none"
    print(f"{label}: {n('states')} states ({n('enumerated')} enumerated), {n('images')} "
          f"distinct images, {n('leak_images')} with leaks ({n('leak_clusters')} leaked "
          f"clusters), {n('failed_states')} failed states, {n('known_states')} states with "
          f"known bugs only ({text})")
    return n("failed_states")


def count_text(n):
    return f"{n:,}" if n < 10**9 else f"{n:.1e}"


def progress(row):
    m = row["mode"] + (" +mutation" if row["mutation"] else "")
    print(f"  {row['workload']:<19} {m:<20} {row['states']:>6} states ({row['enumerated']} "
          f"enumerated), {row['images']:>6} images, {row['leak_images']:>5} leaky, "
          f"{row['failed_states']:>5} failed, {row['known_states']:>5} known  "
          f"[{row['seconds']:.0f} s]", flush=True)


def main():
    # A terminated run still removes its scratch folder (the finally below). Only here:
    # the pool's workers die of SIGTERM as usual (worker_init), or Pool.terminate would wait
    # for a worker that never runs the handler.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help=f"about {QUICK_STATES} states over "
                    "all workloads and modes (the default), and the mutation test")
    ap.add_argument("--full", action="store_true", help=f"about {FULL_STATES} states, and "
                    "the mutation test")
    ap.add_argument("--budget", type=int, help="states per workload and mode instead")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workload", action="append", choices=sorted(wl.WORKLOADS))
    ap.add_argument("--mode", action="append", choices=sorted(MODES))
    ap.add_argument("--mutation", choices=("with", "only", "skip"), default="with",
                    help="the mutation test and the checker's self-test: with the rest "
                    "(default), only them, or skip them")
    ap.add_argument("--strict", action="store_true",
                    help="count failures of known bugs (known_bugs.py) as failures")
    ap.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--replay", metavar="DIR:STATE", help="rebuild and check one state of a "
                    "kept run (printed with every failure)")
    ap.add_argument("--results", default=os.path.join(ROOT, "results", "crash"),
                    help="where runs with failures are kept for --replay")
    ap.add_argument("--json", metavar="FILE", help="write the summary rows as JSON")
    args = ap.parse_args()
    for t in (QEMU_IMG, QEMU_IO, SYS_QEMU_IMG, SYS_QEMU_IO):
        if not os.access(t, os.X_OK):
            sys.exit(f"missing {t} (run scripts/build.sh; the system's qemu-utils)")
    if args.replay:
        return replay(args.replay)
    level = "full" if args.full else "quick"
    total = FULL_STATES if args.full else QUICK_STATES
    workloads = args.workload or list(wl.WORKLOADS)
    modes = args.mode or list(MODES)
    os.makedirs(args.results, exist_ok=True)
    workroot = tempfile.mkdtemp(prefix="qcow2b-crash.",
                                dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    how = f"{args.budget} states each" if args.budget else f"{total} states in all"
    print(f"crash harness ({level}): {len(workloads)} workloads x {len(modes)} modes, {how}, "
          f"seed {args.seed}, {args.jobs} jobs", flush=True)
    t0 = time.time()
    rows, mutation_rows = [], []
    try:
        if args.mutation != "only":
            runs = [Run(w, m, False, workroot) for w in workloads for m in modes]
            budgets = ({r.tag: args.budget for r in runs} if args.budget
                       else allocate(runs, total))
            print(f"  recorded {len(runs)} runs in {time.time() - t0:.0f} s; "
                  f"{count_text(sum(r.model_states for r in runs))} model states, "
                  f"{sum(budgets.values())} to check", flush=True)
            for run in runs:
                rows.append(run_combination(run, budgets[run.tag], args.seed, args.results,
                                            args.jobs, args.strict))
                progress(rows[-1])
                shutil.rmtree(run.workdir, ignore_errors=True)
        if args.mutation != "skip":
            self_test = checker_self_test(workroot, args.jobs, args.seed)
            mb = args.budget or MUTATION_BUDGET[level]
            plan = [(w, m) for w in MUTATION_WORKLOADS for m in QCOW2B_MODES]
            plan += [(DISCARD_MUTATION_WORKLOAD, m) for m in DISCARD_MUTATION_MODES]
            plan += [(SNAPSHOT_MUTATION_WORKLOAD, m) for m in SNAPSHOT_MUTATION_MODES]
            plan += [(BITMAP_MUTATION_WORKLOAD, m) for m in BITMAP_MUTATION_MODES]
            plan += [(AMEND_MUTATION_WORKLOAD, m) for m in AMEND_MUTATION_MODES]
            for w, m in plan:
                if args.mode and m not in args.mode:
                    continue
                if args.workload and w not in args.workload:
                    continue
                run = Run(w, m, True, workroot)
                budget = max(mb, WORKLOAD_MUTATION_BUDGET.get(w, {}).get(level, 0))
                mutation_rows.append(run_combination(run, budget, args.seed, args.results,
                                                     args.jobs, args.strict))
                progress(mutation_rows[-1])
                shutil.rmtree(run.workdir, ignore_errors=True)
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    print()
    ok = True
    if rows:
        print_table(rows)
        print()
        for m in modes:
            summarize([r for r in rows if r["mode"] == m], f"mode {m}")
        ours = [r for r in rows if r["mode"] in QCOW2B_MODES]
        theirs = [r for r in rows if r["mode"] == "qcow2"]
        failed = summarize(ours, "qcow2b, all modes") if ours else 0
        if theirs:
            summarize(theirs, "QEMU's qcow2 (for comparison; not a failure of this test)")
        summarize(rows, "total")
        hit = {bug for r in rows for bug in r["known"]}
        for bug in known_bugs.KNOWN_BUGS:
            state = "seen" if bug["id"] in hit else "not seen in this run"
            print(textwrap.fill(f"known bug {bug['id']} ({state}): {bug['summary']}",
                                width=100, subsequent_indent="    "))
        ok = failed == 0
    if args.mutation != "skip":
        print()
        print("checker self-test (states outside the crash model must fail):")
        for kind, want in (("drop-durable", "flushed"), ("break-order", "order")):
            got = self_test.get(kind, {"states": 0})
            detail = ", ".join(f"{k} {n}" for k, n in sorted(got.items()) if k != "states")
            print(f"  {kind}: {got['states']} states; failures by kind: {detail or 'none'}")
            if not got.get(want):
                print(f"FAIL: no '{want}' failure among the {kind} states")
                ok = False
    if mutation_rows:
        print()
        print("mutation test (x-test-skip-ordering: stage3, write_back's stage-3 ordering point "
              "removed; txg-first-sync, the commit's first sync removed; discard-early, freed "
              "clusters discarded before their free is durable; snapshot-table, the header "
              "naming a snapshot table not yet ordered; bitmap-table, the header naming a bitmap "
              "directory not yet ordered; amend-refcount, the header naming a refcount table of "
              "a new width not yet durable):")
        print_table(mutation_rows)
        for what, rows_of in (
                ("missing ordering point",
                 [r for r in mutation_rows if r["workload"] not in MUTATION_BY_WORKLOAD]),
                ("early discard",
                 [r for r in mutation_rows if r["workload"] == DISCARD_MUTATION_WORKLOAD]),
                ("snapshot table named early",
                 [r for r in mutation_rows if r["workload"] == SNAPSHOT_MUTATION_WORKLOAD]),
                ("bitmap directory named early",
                 [r for r in mutation_rows if r["workload"] == BITMAP_MUTATION_WORKLOAD]),
                ("refcount table of a new width named early",
                 [r for r in mutation_rows if r["workload"] == AMEND_MUTATION_WORKLOAD])):
            caught = {r["mode"] for r in rows_of if r["failed_states"] > 0}
            wanted = {r["mode"] for r in rows_of}
            print(f"mutation test, {what}: failures reported in modes {sorted(caught)} of "
                  f"{sorted(wanted)}")
            if caught != wanted:
                print(f"FAIL: the harness did not catch the {what} in every mode")
                ok = False
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "mutation_rows": mutation_rows, "seed": args.seed,
                       "states_in_all": total, "budget_each": args.budget,
                       "seconds": time.time() - t0}, f, indent=1)
    print(f"crash harness: {'PASS' if ok else 'FAIL'} ({time.time() - t0:.0f} s)")
    return 0 if ok else 1


def replay(spec):
    global GUEST
    keep, _, sid = spec.rpartition(":")
    with open(os.path.join(keep, "meta.json")) as f:
        meta = json.load(f)
    fm, gm = load_models(keep)
    GUEST = gm
    c, r, present = state_by_id(fm, meta["budget"], meta["seed"], meta["tag"],
                                meta.get("everything", False), int(sid))
    print(f"{meta['tag']}, seed {meta['seed']}, state {sid}:")
    print("  " + describe_state(fm, c, r, present))
    img = fm.build(c, present)
    path = os.path.join(keep, f"state-{sid}.qcow2")
    with open(path, "wb") as f:
        f.write(img)
    shutil.copyfile(path, path + ".kept")
    res = check_image(path)
    os.replace(path + ".kept", path)
    fails = image_failures(res)
    if res["guest"] is not None:
        fails += gm.check(guest_point(c), res["guest"])
    for name in ("sys_check", "built_check"):
        rc, leaks, corr, _ = res[name]
        print(f"  {name}: exit {rc}, {leaks} leaks, {corr} corruptions")
    info = {"mode": meta["mode"], "unsynced_across_flush": fm.unsynced_across_flush(c, present)}
    for w in info["unsynced_across_flush"]:
        print(f"  not whole although in flight across a completed flush: {w.describe()}")
    for kind, text in fails:
        bug = known_bugs.explain(kind, text, res, info)
        print(f"  FAIL {kind}{f' (known bug {bug})' if bug else ''}: {text}")
    print(f"  image kept: {path}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
