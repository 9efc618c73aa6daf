"""Block-level replays of what a guest file system sends to its virtio-blk disk, for the
paper benchmark (bench/paper-bench.py): the workloads of Kim, Oh and Won's Figures 3-5 (GNU
dd, Mobibench, filebench varmail) reduced to the requests ext4 puts on the disk.

Two guests are modelled for every workload:

STOCK: ext4 (data=ordered, barrier=1, jbd2 with an internal journal) on Linux's virtio-blk,
which offers a volatile write cache and no FUA. One fsync()/fdatasync() (or one O_DSYNC
write) that needs a journal commit sends, in this order, each request waiting for the
previous ones to complete:

  1. the file's dirty data blocks (ext4_sync_file -> filemap_write_and_wait_range; in
     ordered mode the data must be on the disk before the commit that exposes it);
  2. the journal's log blocks: one descriptor block and a copy of each metadata block the
     transaction changed, contiguous in the journal, merged into one write
     (jbd2_journal_commit_transaction phase 2, then waited for in phase 3);
  3. the commit block, submitted as REQ_PREFLUSH | REQ_FUA (journal_submit_commit_record).
     Without FUA the block layer's flush machinery sends it as FLUSH, WRITE, FLUSH: the
     preflush makes the data and the log durable before the commit block is written, the
     post-flush makes the commit block durable.

  So: WRITE data; WRITE log; FLUSH; WRITE commit; FLUSH. Two flushes per fsync: what a real
  guest shows (FACTS.md: 2.0 host fdatasync per dsync write on a raw image).
  An fdatasync that needs no commit (an overwrite inside the file: only the timestamps
  changed, which fdatasync does not wait for) sends WRITE data; FLUSH (ext4_sync_file's
  blkdev_issue_flush).

BARRIER: BarrierFS's dual-mode journaling (Won et al., FAST 2018) on a virtio-blk that
carries the barrier flag (qcow2b's legacy virtio-blk barrier=on). The ordering that stock
ext4 gets by transfer-and-flush is asked for with barrier writes, and one flush remains
where the application asks for durability:

  WRITE data (barrier); WRITE log (barrier); WRITE commit (barrier); FLUSH

  and for an fdatasync without a commit: WRITE data; FLUSH (there is nothing to order).
  fsync() stays durable in BarrierFS; only fbarrier()/fdatabarrier() would drop the flush,
  and the paper's workloads call fsync/fdatasync.

Both guests share the journal checkpoint: when the journal wraps, jbd2 writes the metadata
blocks it logged back to their home locations, flushes, and rewrites the journal superblock
(REQ_PREFLUSH | REQ_FUA: FLUSH, WRITE, FLUSH). A stock guest never sends barriers, so its
requests are the same on every host configuration.

The disk layout (4 KiB blocks, fixed places, so that qcow2 allocation behaves as under a
real file system): block 0 the superblock, block 1 the group descriptors, block bitmaps from
1 MiB, inode bitmaps from 1.5 MiB, the inode table from 2 MiB (256-byte inodes, 16 a block),
directory blocks from 64 MiB, file data from 128 MiB, and a 64 MiB journal at 4 GiB (mke2fs
puts the journal in the middle of the file system). mke2fs writes these metadata areas and
zeroes the journal when it makes the file system, so the "mkfs" step of every workload
writes them first: journal writes are overwrites of allocated clusters from the start, and
file data that goes to new places allocates clusters (64 KiB records, cluster-aligned, as in
the paper: one new cluster per appending record). The real-guest run (bench/guest/) checks
the model: 3.1 host fdatasyncs per dsync write on QEMU's qcow2 there, 3 in this model.

Not modelled: the periodic 5-second commit of timestamp-only changes (a handful per run),
extent-tree blocks (a 64 KiB-record file stays in the inode's four extents up to 512 MiB),
and the guest's page cache for reads (varmail's reads go to the disk: an upper bound on read
traffic; filebench's varmail would mostly read from memory).

A workload is a list of "groups"; a group is one guest operation (what one fsync waits for,
with the requests that precede it) and the unit of the latency percentiles. A request is a
tuple (op, offset_bytes, length_bytes, barrier) with op in write, read, flush, barrier (a bare
barrier).

What the guest asks of its fsync, four ways (`GUESTS`, `requests_for`):
- "stock": stock ext4, every fsync durable (flushes);
- "barrierfs": BarrierFS with durable fsync: barrier writes, one flush per fsync;
- "barrierfs-relaxed": BarrierFS with relaxed durability (fbarrier/fdatabarrier, the paper's
  AllB setup): barrier writes, and the flush a bare barrier;
- "stock-barrier": the stock guest on a device with guest-flush=barrier (qemu-patches 0013):
  the stock sequence, each flush reaching the driver as a bare barrier. (qemu-io's `barrier`
  is that barrier without the BDRV_REQ_GUEST_FLUSH hint, which only a counter reads.)"""

import random

BLOCK = 4096
CLUSTER = 65536
KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

SUPERBLOCK = 0
GROUP_DESC = 1
BLOCK_BITMAPS = MIB // BLOCK          # one block per block group (128 MiB of data each)
INODE_BITMAPS = 3 * MIB // 2 // BLOCK
INODE_TABLE = 2 * MIB // BLOCK
DIR_BLOCKS = 64 * MIB // BLOCK
DATA = 128 * MIB // BLOCK
JOURNAL = 4 * GIB // BLOCK
JOURNAL_BLOCKS = 64 * MIB // BLOCK
GROUP_BLOCKS = 32768                  # blocks per block group
INODES_PER_BLOCK = 16
DISK_BYTES = 8 * GIB

WRITE, READ, FLUSH, BARRIER = "write", "read", "flush", "barrier"
GUESTS = ("stock", "barrierfs", "barrierfs-relaxed", "stock-barrier")


def write(block, nblocks, barrier=False):
    return (WRITE, block * BLOCK, nblocks * BLOCK, barrier)


def read(block, nblocks):
    return (READ, block * BLOCK, nblocks * BLOCK, False)


def flush():
    return (FLUSH, 0, 0, False)


class Ext4:
    """The journal of one ext4 file system and what an fsync sends to the disk, for a stock
    guest (`barrier_guest=False`) or a BarrierFS guest (`barrier_guest=True`)."""

    def __init__(self, barrier_guest):
        self.barrier_guest = barrier_guest
        self.head = 1                  # journal block 0 is the journal superblock
        self.logged = set()            # home blocks logged since the last checkpoint

    def fsync(self, data, metadata):
        """The requests of one fsync: `data` the data writes [(block, nblocks)], `metadata`
        the home blocks of the metadata the transaction changed (empty: no commit needed)."""
        b = self.barrier_guest
        reqs = []
        for blk, n in data:
            # A BarrierFS guest orders its data before the journal with a barrier write;
            # without a commit there is nothing to order, the flush alone follows.
            reqs.append(write(blk, n, barrier=b and bool(metadata)))
        if not metadata:
            return reqs + [flush()]
        log = 1 + len(metadata)          # descriptor block + one copy per metadata block
        if self.head + log + 1 > JOURNAL_BLOCKS:
            reqs += self.checkpoint()
        reqs.append(write(JOURNAL + self.head, log, barrier=b))
        commit = JOURNAL + self.head + log
        self.head += log + 1
        self.logged.update(metadata)
        if b:
            return reqs + [write(commit, 1, barrier=True), flush()]
        return reqs + [flush(), write(commit, 1), flush()]

    def checkpoint(self):
        """Metadata back home, then the journal superblock marks the log empty."""
        reqs = [write(blk, 1) for blk in sorted(self.logged)]
        reqs += [flush(), write(JOURNAL, 1), flush()]
        self.logged.clear()
        self.head = 1
        return reqs


def mkfs():
    """What mke2fs writes before any workload: superblock and group descriptors, the bitmaps,
    the start of the inode table, the first directory blocks and the whole journal, in large
    writes (untimed)."""
    reqs = [write(SUPERBLOCK, 2), write(BLOCK_BITMAPS, 64), write(INODE_BITMAPS, 64),
            write(INODE_TABLE, 256), write(DIR_BLOCKS, 16)]
    step = 256  # 1 MiB writes
    for blk in range(JOURNAL, JOURNAL + JOURNAL_BLOCKS, step):
        reqs.append(write(blk, step))
    return reqs + [flush()]


def inode_block(ino):
    return INODE_TABLE + ino // INODES_PER_BLOCK


def block_bitmap(blk):
    return BLOCK_BITMAPS + (blk - DATA) // GROUP_BLOCKS


RECORD_BLOCKS = 64 * KIB // BLOCK


def dd(n, overwrite, barrier_guest, records=None):
    """GNU dd if=/dev/zero of=F bs=64k count=N oflag=dsync.

    Append (a new file): every record allocates blocks, so every dsync write commits the
    inode (size, extent), the block bitmap and the group descriptor: WRITE data 64 KiB;
    WRITE log (descriptor + 3 blocks, 16 KiB); FLUSH; WRITE commit; FLUSH.
    Overwrite (conv=notrunc over the file written before): only timestamps change, which
    O_DSYNC does not wait for: WRITE data; FLUSH.
    Returns (prepare, groups): what exists before the timed part, and the timed groups."""
    fs = Ext4(barrier_guest)
    ino = 12
    prepare = mkfs()
    if overwrite:
        # The file exists with its data (written once, in 1 MiB writes).
        total = n * RECORD_BLOCKS
        for blk in range(DATA, DATA + total, 256):
            prepare.append(write(blk, min(256, DATA + total - blk)))
        prepare.append(flush())
    order = records if records is not None else range(n)
    groups = []
    for i in order:
        blk = DATA + i * RECORD_BLOCKS
        meta = [] if overwrite else sorted({inode_block(ino), block_bitmap(blk), GROUP_DESC})
        groups.append(fs.fsync([(blk, RECORD_BLOCKS)], meta))
    return prepare, groups


def mobibench(n, overwrite, barrier_guest, seed=1):
    """Mobibench -r 64 -y fdatasync: 64 KiB records, each write() followed by fdatasync().

    Append (sequential writes to a new file): at the block level the same as dd's dsync
    append (an O_DSYNC write and write + fdatasync send the same requests), kept as its own
    figure as in the paper. Overwrite: Mobibench's random-write mode over the existing file
    (records in a shuffled order): WRITE data; FLUSH per record, at scattered offsets."""
    if not overwrite:
        return dd(n, False, barrier_guest)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return dd(n, True, barrier_guest, records=order)


SLOT_BLOCKS = 256  # each varmail file has 1 MiB of data blocks near its inode's goal


def varmail(loops, barrier_guest, nfiles=None, seed=1):
    """filebench varmail (single directory, the paper's 64 KiB I/O size): each loop is

      deletefile; createfile + appendfilerand + fsync; closefile;
      openfile + readwholefile + appendfilerand + fsync; closefile;
      openfile + readwholefile; closefile

    on a fileset of NFILES files (80% exist at the start, sizes 4-64 KiB). At the block
    level a loop is two fsync groups and two whole-file reads:

      group 1: the delete and the create share the running transaction, so the fsync of
        the new file commits the directory block(s), both inodes' table blocks, the inode
        bitmap, the block bitmap and the group descriptor (descriptor + about 6 blocks):
        WRITE data (the new file, 4-64 KiB); WRITE log; FLUSH; WRITE commit; FLUSH;
      group 2: READ the whole of another file; its append allocates blocks at the file's
        end: WRITE data; WRITE log (inode, block bitmap, descriptor); FLUSH; WRITE commit;
        FLUSH;
      then READ the whole of a third file (counted in group 2's successor: the next loop's
        first group, as it precedes that fsync).

    File data lives in a 1 MiB slot per file (ext4 puts a file's blocks near its inode's
    goal); a deleted file's blocks are reused by the next file created in its slot, so most
    data writes land on clusters already allocated in the image and the appends that reach
    new space allocate."""
    nfiles = nfiles or max(50, loops)
    rng = random.Random(seed)
    fs = Ext4(barrier_guest)
    sizes = {}                            # file index -> size in blocks, for existing files
    prepare = mkfs()
    for f in range(nfiles):
        if rng.random() < 0.8:
            sizes[f] = rng.randint(1, 16)
            prepare.append(write(DATA + f * SLOT_BLOCKS, sizes[f]))
    prepare.append(flush())

    def ino(f):
        return 12 + f

    def dir_block(f):
        return DIR_BLOCKS + f // 64

    groups = []
    pending_reads = []
    for _ in range(loops):
        existing = sorted(sizes)
        # deletefile
        victim = rng.choice(existing)
        del sizes[victim]
        freed_from = DATA + victim * SLOT_BLOCKS
        # createfile + appendfilerand + fsync
        absent = [f for f in range(nfiles) if f not in sizes]
        new = rng.choice(absent)
        size = rng.randint(1, RECORD_BLOCKS)
        sizes[new] = size
        blk = DATA + new * SLOT_BLOCKS
        meta = sorted({dir_block(victim), dir_block(new), inode_block(ino(victim)),
                       inode_block(ino(new)), INODE_BITMAPS, block_bitmap(freed_from),
                       block_bitmap(blk), GROUP_DESC})
        groups.append(pending_reads + fs.fsync([(blk, size)], meta))
        # openfile + readwholefile + appendfilerand + fsync
        f = rng.choice(sorted(sizes))
        reads = [read(DATA + f * SLOT_BLOCKS, sizes[f])]
        grow = min(rng.randint(1, RECORD_BLOCKS), SLOT_BLOCKS - sizes[f])
        if grow > 0:
            at = DATA + f * SLOT_BLOCKS + sizes[f]
            sizes[f] += grow
            meta = sorted({inode_block(ino(f)), block_bitmap(at), GROUP_DESC})
            groups.append(reads + fs.fsync([(at, grow)], meta))
        else:
            groups.append(reads + fs.fsync([], []))
        # openfile + readwholefile (before the next loop's fsync)
        g = rng.choice(sorted(sizes))
        pending_reads = [read(DATA + g * SLOT_BLOCKS, sizes[g])]
    return prepare, groups


WORKLOADS = {
    # name: (generator(n, barrier_guest) -> (prepare, groups), application bytes written per
    # group: throughput in MiB/s; None: throughput in guest operations (fsyncs) per second)
    "dd append": (lambda n, b: dd(n, False, b), 64 * KIB),
    "dd overwrite": (lambda n, b: dd(n, True, b), 64 * KIB),
    "Mobibench append": (lambda n, b: mobibench(n, False, b), 64 * KIB),
    "Mobibench overwrite": (lambda n, b: mobibench(n, True, b), 64 * KIB),
    "varmail": (lambda n, b: varmail(max(1, n // 2), b), None),
}


def requests_for(guest, workload, n):
    """(prepare, groups) of `workload` as `guest` (one of GUESTS) sends it."""
    gen, _ = WORKLOADS[workload]
    prepare, groups = gen(n, guest.startswith("barrierfs"))
    if guest in ("barrierfs-relaxed", "stock-barrier"):
        groups = [[(BARRIER, 0, 0, False) if r[0] == FLUSH else r for r in g] for g in groups]
    return prepare, groups


def qemu_io_commands(requests, pattern=0x5a):
    """qemu-io command lines for requests (writes carry a pattern, barrier writes -B)."""
    out = []
    for op, off, length, barrier in requests:
        if op == WRITE:
            out.append(f"write -q {'-B ' if barrier else ''}-P {pattern} {off} {length}")
        elif op == READ:
            out.append(f"read -q {off} {length}")
        elif op == FLUSH:
            out.append("flush")
        elif op == BARRIER:
            out.append("barrier")
        else:
            raise ValueError(op)
    return out


def summary(groups):
    """Counts per group of each request kind, for documentation and tests."""
    n = len(groups)
    flat = [r for g in groups for r in g]
    return {
        "groups": n,
        "writes": sum(1 for r in flat if r[0] == WRITE and not r[3]) / n,
        "barrier_writes": sum(1 for r in flat if r[0] == WRITE and r[3]) / n,
        "reads": sum(1 for r in flat if r[0] == READ) / n,
        "flushes": sum(1 for r in flat if r[0] == FLUSH) / n,
        "barriers": sum(1 for r in flat if r[0] == BARRIER) / n,
    }
