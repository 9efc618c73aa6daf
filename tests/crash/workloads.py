"""The workloads: a setup made with the system's QEMU tools (image, backing file, snapshot,
compressed clusters, initial data), then one qemu-io script run through the driver under
test. Every guest write is identifiable per 512-byte sector: synchronous writes come from a
source file whose every sector is stamped with the write's id and the guest sector number;
aio writes (qemu-io's aio_write has no source file) each use a pattern byte of their own.

No workload writes the last 64 KiB of the disk: the checks write there on a copy of each
crash image to see that it opens read-write and allocates.
"""

import os
import struct
import subprocess

SYS_QEMU_IMG = "/usr/bin/qemu-img"
SYS_QEMU_IO = "/usr/bin/qemu-io"

K = 1024
M = 1024 * 1024
SECTOR = 512
_STAMP = struct.Struct("<8sQQ")
_MAGIC = b"QCRASH\x00\x01"
_FILL = bytes(range(251)) * 3


def stamp(write_id, offset, length):
    """Bytes for a write of `length` at guest `offset`: every sector names the write and the
    guest sector it belongs to, and differs from every other (write, sector)."""
    out = bytearray()
    for s in range(offset // SECTOR, (offset + length) // SECTOR):
        head = _STAMP.pack(_MAGIC, write_id, s)
        start = (write_id * 131 + s * 17) % 251
        out += head + _FILL[start:start + SECTOR - len(head)]
    return bytes(out)


def decode_stamp(piece):
    """(write id, guest sector) of a stamped sector, or None."""
    if len(piece) != SECTOR or piece[:8] != _MAGIC:
        return None
    _, write_id, s = _STAMP.unpack_from(piece)
    return write_id, s


def run(*args):
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = p.stdout.decode(errors="replace")
    if p.returncode != 0 or "error" in out.lower() or "failed" in out.lower():
        raise RuntimeError(f"setup: {' '.join(args)} exited {p.returncode}:\n{out}")
    return out


class Script:
    """A qemu-io script under construction, and the source files of its writes."""

    def __init__(self, directory, first_id):
        self.dir = directory
        self.commands = []
        self.next_id = first_id
        self.next_pattern = 1
        # Options of the format node the workload needs (generic or qcow2's, so that every
        # mode, QEMU's qcow2 among them, takes them).
        self.driver_options = []

    def _source(self, offset, length):
        wid = self.next_id
        self.next_id += 1
        path = os.path.join(self.dir, f"src-{wid}.bin")
        with open(path, "wb") as f:
            f.write(stamp(wid, offset, length))
        return path

    def write(self, offset, length, barrier=False, compressed=False):
        flags = ("-B " if barrier else "") + ("-c " if compressed else "")
        self.commands.append(f"write -q {flags}-s {self._source(offset, length)} "
                             f"{offset} {length}")

    def aio_write(self, offset, length, barrier=False):
        pattern = self.next_pattern
        self.next_pattern += 1
        assert pattern < 256, "too many aio writes for distinct pattern bytes"
        self.commands.append(f"aio_write -q {'-B ' if barrier else ''}-P {pattern} "
                             f"{offset} {length}")

    def zeroes(self, offset, length, unmap=False):
        self.commands.append(f"write -q -z {'-u ' if unmap else ''}{offset} {length}")

    def discard(self, offset, length):
        self.commands.append(f"discard -q {offset} {length}")

    def barrier(self):
        self.commands.append("barrier")

    def flush(self):
        self.commands.append("flush")

    def aio_flush(self):
        self.commands.append("aio_flush")

    def flushes_as_barriers(self):
        """Every flush becomes a bare barrier, as a device with guest-flush=barrier sends it
        (an aio_flush a synchronous barrier: qemu-io has no aio barrier)."""
        self.commands = ["barrier" if c in ("flush", "aio_flush") else c
                         for c in self.commands]

    def truncate(self, size):
        self.commands.append(f"truncate {size}")

    def snapshot(self, op, name):
        """An internal snapshot taken ("c"), applied ("a") or deleted ("d") between the
        guest's requests (qemu-io's snapshot command, qemu-patches 0017)."""
        self.commands.append(f"snapshot -{op} {name}")

    def amend(self, options):
        """The format node amended as qemu-img amend -o amends it, between the guest's
        requests (qemu-io's amend command, qemu-patches 0019)."""
        self.commands.append(f"amend -o {options}")

    def reopen(self, read_only):
        """A reopen read-only (the driver stores its persistent bitmaps) or read-write (it
        marks them in use again)."""
        self.commands.append("reopen -r" if read_only else "reopen -w")

    def args(self):
        out = []
        for c in self.commands:
            out += ["-c", c]
        return out


class Setup:
    """The starting image, made with the system's tools."""

    def __init__(self, directory):
        self.dir = directory
        self.image = os.path.join(directory, "img.qcow2")
        self.base = os.path.join(directory, "base.qcow2")
        self.setup_id = 1_000_000

    def create(self, size, cluster=64 * K, refcount_bits=16, backing=False, extended_l2=False):
        opts = f"cluster_size={cluster},refcount_bits={refcount_bits},compat=1.1"
        if extended_l2:
            opts += ",extended_l2=on"
        args = [SYS_QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", opts]
        if backing:
            # Relative: crash images are built next to it, and a kept run moves as a whole.
            args += ["-b", os.path.basename(self.base), "-F", "qcow2"]
        run(*args, self.image, str(size))

    def create_base(self, size, cluster=64 * K):
        run(SYS_QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}",
            self.base, str(size))

    def writes(self, image, extents, compressed=False):
        """Stamped writes with the system's qemu-io (ids from 1,000,000: setup data)."""
        args = [SYS_QEMU_IO, "-f", "qcow2"]
        for offset, length in extents:
            path = os.path.join(self.dir, f"setup-{self.setup_id}.bin")
            with open(path, "wb") as f:
                f.write(stamp(self.setup_id, offset, length))
            self.setup_id += 1
            args += ["-c", f"write -q {'-c ' if compressed else ''}-s {path} {offset} {length}"]
        run(*args, image)

    def snapshot(self, name):
        run(SYS_QEMU_IMG, "snapshot", "-c", name, self.image)

    def bitmap(self, name, granularity=64 * K, disabled=False):
        """A persistent dirty bitmap added with the system's qemu-img."""
        run(SYS_QEMU_IMG, "bitmap", "--add", "-g", str(granularity), "-f", "qcow2",
            *(["--disable"] if disabled else []), self.image, name)


# --- the workloads -------------------------------------------------------------------------
# Each takes (setup, script) and returns nothing; they run in the order listed.

def allocating_writes(setup, s):
    setup.create(4 * M)
    s.write(0, 64 * K)
    s.write(64 * K, 64 * K, barrier=True)
    s.write(256 * K, 4 * K)
    s.write(260 * K, 4 * K, barrier=True)
    s.flush()
    s.write(512 * K, 128 * K)
    s.barrier()
    s.write(1 * M, 8 * K)
    s.write(2 * M, 64 * K, barrier=True)
    s.write(3 * M, 4 * K)
    s.flush()
    s.write(1536 * K, 4 * K, barrier=True)
    s.write(3 * M + 64 * K, 64 * K)


def overwrites(setup, s):
    setup.create(4 * M)
    setup.writes(setup.image, [(0, 512 * K), (1 * M, 256 * K)])
    s.write(0, 4 * K)
    s.write(64 * K, 64 * K, barrier=True)
    s.write(128 * K + 512, 1 * K)
    s.barrier()
    s.write(0, 4 * K)
    s.flush()
    s.write(256 * K, 128 * K, barrier=True)
    s.write(1 * M + 4 * K, 4 * K)
    s.write(4 * K, 4 * K, barrier=True)
    s.write(1 * M + 4 * K, 8 * K)


def backing_partial(setup, s):
    setup.create_base(4 * M)
    setup.writes(setup.base, [(0, 4 * M - 64 * K)])
    setup.create(4 * M, backing=True)
    s.write(4 * K, 4 * K)
    s.write(96 * K, 8 * K, barrier=True)
    s.write(200 * K, 512)
    s.barrier()
    s.write(1 * M + 60 * K, 8 * K)
    s.flush()
    s.write(2 * M, 64 * K, barrier=True)
    s.write(3 * M + 512, 1 * K)
    s.write(3 * M + 8 * K, 4 * K, barrier=True)
    s.write(200 * K + 512, 512)


def new_l2_regions(setup, s):
    # 4 KiB clusters: one L2 table maps 2 MiB.
    setup.create(16 * M, cluster=4 * K)
    s.write(0, 4 * K)
    s.write(2 * M, 4 * K, barrier=True)
    s.write(4 * M + 4 * K, 8 * K)
    s.barrier()
    s.write(6 * M, 4 * K, barrier=True)
    s.flush()
    s.write(8 * M, 4 * K)
    s.write(10 * M, 16 * K, barrier=True)
    s.write(12 * M, 4 * K)
    s.write(14 * M + 512, 1 * K, barrier=True)


def refcount_block_allocation(setup, s):
    # 1 KiB clusters, 64-bit refcounts: one refcount block counts 128 clusters (128 KiB).
    setup.create(4 * M, cluster=1 * K, refcount_bits=64)
    for i in range(24):
        s.write(i * 96 * K, 8 * K, barrier=(i % 4 == 3))
        if i == 11:
            s.flush()


def refcount_table_growth(setup, s):
    # 512-byte clusters, 64-bit refcounts: a refcount block counts 64 clusters (32 KiB of
    # file), the one-cluster refcount table 64 blocks (2 MiB of file): writing 2.5 MiB
    # grows the table.
    setup.create(4 * M, cluster=512, refcount_bits=64)
    s.write(0, 1 * M, barrier=True)
    for i in range(6):
        s.write(1 * M + i * 256 * K, 256 * K, barrier=(i % 2 == 1))
    s.flush()
    s.write(3 * M, 64 * K, barrier=True)


def zeroes_discard_reuse(setup, s):
    setup.create(4 * M)
    setup.writes(setup.image, [(0, 1 * M)])
    s.zeroes(0, 128 * K)
    s.discard(128 * K, 128 * K)
    s.flush()
    s.write(2 * M, 64 * K)
    s.write(2 * M + 64 * K, 64 * K, barrier=True)
    s.zeroes(512 * K, 64 * K, unmap=True)
    s.barrier()
    s.flush()
    s.write(3 * M, 128 * K, barrier=True)
    s.write(256 * K + 4 * K, 4 * K)
    s.write(130 * K, 2 * K, barrier=True)
    s.write(3 * M + 256 * K, 64 * K)


def discard_passthrough(setup, s):
    # discard=unmap (so pass-discard-request is on, as a platform's thin disk has it): the
    # clusters a guest discard frees are discarded on the file once the free is durable,
    # before anything reuses them. Discards, then writes that reuse the freed clusters right
    # after the flush that released them, between barriers. pass-discard-other=on discards
    # the old L1 table a resize replaces too (4 KiB clusters: an L1 entry maps 2 MiB, so
    # growing to 8 MiB needs a larger table): discarded before the header switch is durable,
    # it would leave the header naming zeros, which every mode must show.
    s.driver_options += ["discard=unmap", "pass-discard-other=on"]
    setup.create(4 * M, cluster=4 * K)
    setup.writes(setup.image, [(0, 2 * M)])
    s.discard(256 * K, 512 * K)
    s.write(1 * M, 64 * K, barrier=True)
    s.flush()
    s.write(3 * M, 256 * K, barrier=True)
    s.zeroes(1 * M + 512 * K, 256 * K, unmap=True)
    s.write(2 * M + 64 * K, 4 * K, barrier=True)
    s.flush()
    s.write(3 * M + 256 * K, 256 * K)
    s.discard(0, 128 * K)
    s.barrier()
    s.write(256 * K + 4 * K, 8 * K, barrier=True)
    s.flush()
    s.write(64 * K, 64 * K)
    s.truncate(8 * M)
    s.write(6 * M, 64 * K, barrier=True)
    s.write(1 * M + 4 * K, 8 * K)
    s.flush()
    s.write(6 * M + 128 * K, 16 * K)


def resize(setup, s):
    # 512-byte clusters: an L1 entry maps 32 KiB, one L1 cluster 2 MiB; 4 MiB needs a
    # larger L1 table.
    setup.create(1 * M, cluster=512)
    setup.writes(setup.image, [(0, 64 * K)])
    s.write(4 * K, 4 * K, barrier=True)
    s.truncate(1536 * K)
    s.write(1 * M + 256 * K, 8 * K, barrier=True)
    s.flush()
    s.truncate(4 * M)
    s.write(3 * M, 8 * K, barrier=True)
    s.write(2 * M + 4 * K, 4 * K)
    s.flush()
    s.write(8 * K, 4 * K, barrier=True)
    s.write(3 * M + 512 * K, 4 * K)


def snapshot_cow(setup, s):
    setup.create(4 * M)
    setup.writes(setup.image, [(0, 512 * K)])
    setup.snapshot("before")
    s.write(0, 4 * K)
    s.write(64 * K, 64 * K, barrier=True)
    s.write(128 * K + 4 * K, 4 * K)
    s.barrier()
    s.flush()
    s.write(192 * K, 8 * K, barrier=True)
    s.write(0, 4 * K)
    s.write(320 * K + 512, 512, barrier=True)
    s.write(256 * K, 64 * K)


def shrink(setup, s):
    # Shrinking between the guest's writes (512-byte clusters: the shrinks free L2 tables
    # and clear L1 entries, and leave refcount blocks counting nothing, which go too): the
    # clusters past the new end unallocated and freed, the size after them, the file cut.
    # Never grown back: a later growth reads zeros where the model knows older data.
    setup.create(4 * M, cluster=512)
    setup.writes(setup.image, [(0, 256 * K), (2 * M, 256 * K), (3 * M + 512 * K, 128 * K)])
    s.write(4 * K, 4 * K, barrier=True)
    s.write(3 * M + 512 * K, 8 * K)
    s.flush()
    s.truncate(3 * M + 256 * K)
    s.write(2 * M + 64 * K, 8 * K, barrier=True)
    s.aio_write(128 * K, 4 * K)
    s.truncate(2 * M + 128 * K)
    s.write(8 * K, 4 * K, barrier=True)
    s.flush()
    s.write(2 * M + 4 * K, 4 * K)
    s.truncate(1 * M)
    s.write(12 * K, 4 * K, barrier=True)


def snapshot_operations(setup, s):
    # Snapshots taken, applied and deleted between the guest's writes, with aio writes in
    # flight when each starts (the operation drains them first). The guest model knows
    # nothing of snapshots, so the guest's truth must stay what its writes made it: taking
    # and deleting a snapshot change no guest byte, and the snapshot applied ("now", taken
    # just before) holds what the disk holds. What the crash states test is the metadata:
    # the copied L1 table, the raised and lowered refcounts, the snapshot table and the
    # header that names it, COPIED given back, the old tables freed.
    setup.create(4 * M)
    setup.writes(setup.image, [(0, 256 * K), (1 * M, 64 * K)])
    setup.snapshot("setup")
    s.write(0, 4 * K)
    s.aio_write(64 * K, 64 * K)
    s.snapshot("c", "one")
    s.write(4 * K, 4 * K, barrier=True)
    s.write(128 * K, 64 * K)
    s.aio_write(2 * M, 8 * K)
    s.barrier()
    s.snapshot("c", "two")
    s.write(1 * M + 4 * K, 4 * K, barrier=True)
    s.snapshot("d", "setup")
    s.write(192 * K, 8 * K)
    s.flush()
    s.snapshot("c", "now")
    s.snapshot("a", "now")
    s.write(0, 8 * K, barrier=True)
    s.aio_write(3 * M, 4 * K)
    s.snapshot("d", "one")
    s.write(64 * K + 512, 512)
    s.snapshot("d", "now")
    s.write(2 * M + 64 * K, 4 * K, barrier=True)


def amend_operations(setup, s):
    # qemu-img amend's operations between the guest's writes, with aio writes in flight when
    # each starts (the amend drains them first): the refcount width changed (new table and
    # blocks past everything counted, the header switched, the old ones freed), the version
    # 2 downgrade (zero clusters, the snapshot's too, made unallocated or written as zeros,
    # then the version 2 header), the upgrade back (the snapshot table written again with
    # version 3's extra data, then the header) and the lazy refcounts bit. No amend changes
    # a guest byte, so the guest's truth stays what its writes made it; what the crash
    # states test is each metadata rewrite and its order.
    setup.create(4 * M, cluster=4 * K)
    setup.writes(setup.image, [(0, 256 * K), (1 * M, 64 * K)])
    setup.snapshot("setup")
    s.write(0, 4 * K)
    s.zeroes(64 * K, 16 * K)
    s.aio_write(2 * M, 8 * K)
    s.amend("refcount_bits=64")
    s.write(4 * K, 4 * K, barrier=True)
    s.write(128 * K, 16 * K)
    s.aio_write(3 * M, 4 * K)
    s.amend("compat=0.10,refcount_bits=16")
    s.write(1 * M + 4 * K, 4 * K, barrier=True)
    s.flush()
    s.write(192 * K, 8 * K)
    s.amend("compat=1.1")
    s.write(8 * K, 4 * K, barrier=True)
    s.amend("lazy_refcounts=on")
    s.write(2 * M + 64 * K, 4 * K)
    s.amend("refcount_bits=2")
    s.write(12 * K, 4 * K, barrier=True)


def compressed_overwrite(setup, s):
    setup.create(4 * M)
    setup.writes(setup.image, [(0, 512 * K)], compressed=True)
    s.write(4 * K, 4 * K)
    s.write(64 * K + 8 * K, 4 * K, barrier=True)
    s.write(128 * K, 64 * K)
    s.barrier()
    s.flush()
    s.write(256 * K + 512, 1 * K, barrier=True)
    s.write(320 * K, 4 * K)
    s.write(4 * K, 4 * K, barrier=True)
    s.write(448 * K + 60 * K, 4 * K)


def small_epochs(setup, s):
    setup.create(4 * M, cluster=4 * K)
    setup.writes(setup.image, [(0, 256 * K)])
    for i in range(36):
        if i % 3 == 0:
            offset = (i * 12 % 64) * 4 * K           # overwrite of setup data
        else:
            offset = 512 * K + i * 20 * K            # allocating
        s.write(offset, 4 * K, barrier=(i % 4 != 3))
        if i % 9 == 8:
            s.barrier()
        if i == 20:
            s.flush()


def concurrent_requests(setup, s):
    # Over a backing file, so that partial-cluster writes copy on write (their data must be
    # ordered before their L2 entries); aio writes stay in flight together, barrier writes
    # among them.
    setup.create_base(4 * M)
    setup.writes(setup.base, [(0, 4 * M - 64 * K)])
    setup.create(4 * M, backing=True)
    setup.writes(setup.image, [(0, 256 * K)])
    for i in range(6):
        s.aio_write(1 * M + i * 64 * K, 64 * K, barrier=(i == 2))
        s.aio_write(1 * M + 512 * K + i * 64 * K + 4 * K, 4 * K)
    s.aio_write(2 * M, 4 * K)
    s.aio_write(2 * M + 4 * K, 4 * K)     # the same new cluster, in flight together
    s.aio_write(8 * K, 8 * K, barrier=True)
    s.aio_write(2 * M + 8 * K, 4 * K)
    s.aio_flush()
    s.flush()
    for i in range(4):
        s.aio_write(3 * M + i * 32 * K + 4 * K, 16 * K, barrier=(i == 1))
        s.aio_write(2 * M + 256 * K + i * 64 * K + 8 * K, 8 * K)
    s.aio_write(64 * K, 4 * K)
    s.aio_write(2 * M + 60 * K, 4 * K)
    s.aio_flush()
    s.aio_write(3 * M + 128 * K, 64 * K, barrier=True)
    s.aio_write(3 * M + 256 * K + 512, 4 * K)
    s.aio_flush()


def subclusters(setup, s):
    # Extended L2 entries (64 KiB clusters: 32 subclusters of 2 KiB) over a backing file. A
    # partial write into a new cluster copies only its partial subclusters; later writes
    # into the cluster's other subclusters allocate them in place (their data ordered before
    # the bitmap that names them, over stale bytes); zeroes and discards change bitmaps.
    setup.create_base(4 * M)
    setup.writes(setup.base, [(0, 4 * M - 64 * K)])
    setup.create(4 * M, backing=True, extended_l2=True)
    setup.writes(setup.image, [(0, 128 * K), (1 * M + 6 * K, 2 * K)])
    s.write(256 * K + 3 * K, 1 * K)
    s.write(256 * K + 8 * K, 4 * K, barrier=True)
    s.write(1 * M + 10 * K, 2 * K)
    s.barrier()
    s.zeroes(16 * K, 4 * K)
    s.write(1 * M + 30 * K + 512, 1 * K, barrier=True)
    s.flush()
    s.zeroes(2 * M + 2 * K, 2 * K)
    s.write(2 * M, 2 * K, barrier=True)
    s.zeroes(64 * K, 64 * K, unmap=True)
    s.discard(256 * K, 64 * K)
    s.write(3 * M + 1 * K, 62 * K, barrier=True)
    s.write(20 * K, 2 * K)
    s.flush()
    s.write(256 * K + 40 * K, 2 * K, barrier=True)
    s.write(1 * M + 12 * K, 6 * K)
    s.write(3 * M + 64 * K + 512, 512, barrier=True)
    s.zeroes(1 * M + 7 * K, 1 * K)


def compressed_writes(setup, s):
    # Compressed writes through the driver under test (qemu-io write -c: whole 64 KiB
    # clusters of stamped sectors, which compress to a few KiB), among ordinary writes,
    # barriers and flushes: consecutive compressed clusters share host clusters (each one
    # counted per compressed cluster touching it), a later epoch packs more into a host
    # cluster an earlier one filled in part, an ordinary write over a compressed cluster
    # copies it out and frees its share, a discard frees another. (qemu-io refuses -B with
    # -c: bare barriers order them.)
    setup.create(4 * M)
    setup.writes(setup.image, [(1 * M, 256 * K)])
    s.write(0, 128 * K, compressed=True)
    s.write(1 * M + 4 * K, 4 * K)
    s.write(128 * K, 64 * K, compressed=True)
    s.barrier()
    s.write(2 * M, 64 * K, barrier=True)
    s.write(192 * K, 192 * K, compressed=True)
    s.flush()
    s.write(512 * K, 64 * K, compressed=True)
    s.write(1 * M + 128 * K, 8 * K, barrier=True)
    s.write(576 * K, 128 * K, compressed=True)
    s.write(2 * M + 512, 1 * K)
    s.barrier()
    s.flush()
    s.write(64 * K + 4 * K, 4 * K, barrier=True)
    s.write(768 * K, 64 * K, compressed=True)
    s.discard(0, 64 * K)
    s.barrier()
    s.write(832 * K, 64 * K, compressed=True)
    s.write(3 * M, 64 * K)


def persistent_bitmaps(setup, s):
    # Persistent dirty bitmaps kept across the run: the open marks them in use, each
    # "reopen -r" stores them (data clusters, tables, a new directory, the header), each
    # "reopen -w" marks them in use again, and the close stores them. What the crash states
    # test (harness.py, bitmap_failures): a bitmap is absent, in use, or consistent with a
    # bit set for every guest write the image shows; never consistent and missing one.
    setup.create(4 * M)
    setup.writes(setup.image, [(0, 256 * K)])
    setup.bitmap("b0")
    setup.bitmap("fine", granularity=4 * K)
    setup.bitmap("frozen", disabled=True)
    s.write(0, 4 * K)
    s.write(1 * M, 64 * K, barrier=True)
    s.flush()
    s.reopen(read_only=True)
    s.reopen(read_only=False)
    s.write(2 * M, 8 * K)
    s.barrier()
    s.write(3 * M + 4 * K, 4 * K)
    s.zeroes(128 * K, 64 * K)
    s.flush()
    s.reopen(read_only=True)
    s.reopen(read_only=False)
    s.write(512 * K, 64 * K, barrier=True)
    s.discard(1 * M, 64 * K)
    s.write(3 * M + 512 * K, 4 * K)


WORKLOADS = {
    "alloc": allocating_writes,
    "overwrite": overwrites,
    "backing-partial": backing_partial,
    "new-l2": new_l2_regions,
    "refblock-alloc": refcount_block_allocation,
    "reftable-grow": refcount_table_growth,
    "zero-discard-reuse": zeroes_discard_reuse,
    "discard-passthrough": discard_passthrough,
    "resize": resize,
    "shrink": shrink,
    "snapshot-cow": snapshot_cow,
    "snapshots": snapshot_operations,
    "amend": amend_operations,
    "compressed": compressed_overwrite,
    "compressed-writes": compressed_writes,
    "small-epochs": small_epochs,
    "concurrent": concurrent_requests,
    "subclusters": subclusters,
    "bitmaps": persistent_bitmaps,
}
