#!/usr/bin/env python3
"""Hostile images: crafted qcow2 files (bad magic and version, absurd sizes, tables beyond the
end of the file, unaligned and overlapping tables, entries pointing at metadata, truncated
files, garbage compressed descriptors, header extensions that overflow, hostile snapshot
tables). Each goes through the built `qemu-img info -f qcow2b`, `qemu-img check -f qcow2b` and
`qemu-io -f qcow2b` reads and writes:
- no tool dies of a signal or runs past its timeout;
- where qcow2b refuses the image at open, the tool exits 1 with a message saying why;
- where the damage is found later (an entry pointing at metadata), the request fails with an
  error and qcow2b says why on stderr, and nothing outside the guest's clusters is written.
For comparison the system's QEMU (its own qcow2) runs on every image too; the images where it
dies of a signal are listed (not asserted: that is QEMU's behaviour, not ours)."""

import os
import struct
import subprocess

from qemu_tools import (QEMU_IMG, QEMU_IO, SYS_QEMU_IMG, SYS_QEMU_IO, Failure, Scratch, main, qemu_io,
                        run)

CLUSTER = 65536


class Image:
    """A small valid image made by the system's qemu-img, to be damaged."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            self.bytes = bytearray(f.read())

    def u32(self, at):
        return struct.unpack_from(">I", self.bytes, at)[0]

    def u64(self, at):
        return struct.unpack_from(">Q", self.bytes, at)[0]

    def put32(self, at, v):
        struct.pack_into(">I", self.bytes, at, v & 0xFFFFFFFF)

    def put64(self, at, v):
        struct.pack_into(">Q", self.bytes, at, v & 0xFFFFFFFFFFFFFFFF)

    @property
    def l1_offset(self):
        return self.u64(40)

    @property
    def reftable_offset(self):
        return self.u64(48)

    def l2_offset(self):
        return self.u64(self.l1_offset) & 0x00FFFFFFFFFFFE00

    def save(self, path, truncate=None):
        with open(path, "wb") as f:
            f.write(self.bytes if truncate is None else self.bytes[:truncate])
        if getattr(self, "extend_to", 0) > len(self.bytes):
            os.truncate(path, self.extend_to)  # sparse: a file as large as it claims

    def extension(self, kind):
        """The offset of the data of header extension `kind` (the area starts at
        header_length)."""
        at = self.u32(100)
        while True:
            k, length = self.u32(at), self.u32(at + 4)
            if k == 0:
                raise Failure(f"no header extension {kind:#x}")
            if k == kind:
                return at + 8
            at += 8 + (length + 7) // 8 * 8


def base_image(scratch):
    path = scratch.path("base.qcow2")
    run(SYS_QEMU_IMG, "create", "-q", "-f", "qcow2", path, "8M")
    qemu_io(SYS_QEMU_IO, "qcow2", path, ["write -P 0x5a 0 256k", "write -P 0x6b 4M 64k"])
    return path


def bitmap_image(scratch):
    """An image with a persistent bitmap (the bitmaps extension, its autoclear bit set)."""
    path = scratch.path("bitmap.qcow2")
    run(SYS_QEMU_IMG, "create", "-q", "-f", "qcow2", path, "8M")
    run(SYS_QEMU_IMG, "bitmap", "--add", path, "b0")
    return path


BITMAPS_EXTENSION = 0x23852875
MIB = 1 << 20
# Images whose damage claims a size to allocate: qemu-img check's peak RSS must stay under
# this (before the bounds, each made it allocate and read the claimed size: 64 and 128 MiB).
BOUNDED_RSS_MIB = 48


def big_bitmap_directory(img):
    """The bitmap directory claims one byte over QEMU's limit (1024 x 65535), in a sparse
    file long enough to hold it."""
    ext = img.extension(BITMAPS_EXTENSION)
    size = 1024 * 65535 + 8
    img.put64(ext + 8, size)
    img.extend_to = img.u64(ext + 16) + size + CLUSTER


def big_bitmap_table(img):
    """The bitmap's table claims 2^24 entries (128 MiB; QEMU's limit is 512 MiB of bitmap,
    8192 entries at 64 KiB clusters), in a sparse file long enough to hold it."""
    ext = img.extension(BITMAPS_EXTENSION)
    directory = img.u64(ext + 16)
    img.put32(directory + 8, 1 << 24)
    img.extend_to = img.u64(directory) + (8 << 24) + CLUSTER


def compressed_image(scratch):
    plain, path = scratch.path("plain.qcow2"), scratch.path("compressed.qcow2")
    run(SYS_QEMU_IMG, "create", "-q", "-f", "qcow2", plain, "8M")
    qemu_io(SYS_QEMU_IO, "qcow2", plain, ["write -P 0x5a 0 256k"])
    run(SYS_QEMU_IMG, "convert", "-c", "-f", "qcow2", "-O", "qcow2", plain, path)
    return path


def snapshot_image(scratch):
    path = scratch.path("snap.qcow2")
    run(SYS_QEMU_IMG, "create", "-q", "-f", "qcow2", path, "8M")
    qemu_io(SYS_QEMU_IO, "qcow2", path, ["write -P 0x5a 0 256k"])
    run(SYS_QEMU_IMG, "snapshot", "-c", "s1", path)
    return path


# Each case: name, which base, how to damage it (a function of Image returning an optional
# truncation length), and where the damage must show: "open" (refused at open), "access"
# (reads and writes fail), "write" (writes fail; reads need no refcounts), "read" (reads fail;
# a write of whole clusters needs no old content), "tolerated" (the damage is within what the
# format allows: anything but a signal).
def cases():
    def header(field_at, value, width=32):
        def damage(img):
            (img.put32 if width == 32 else img.put64)(field_at, value)
        return damage

    def l1_entry(value):
        return lambda img: img.put64(img.l1_offset, value)

    def l2_entry(index, value):
        return lambda img: img.put64(img.l2_offset() + 8 * index, value)

    def reftable_entry(value):
        return lambda img: img.put64(img.reftable_offset, value)

    def extension(kind, length):
        def damage(img):
            img.put32(104 + 8, kind)   # the first extension after a 112-byte header
            img.put32(104 + 12, length)
        return damage

    def snapshots(count, offset):
        def damage(img):
            img.put32(60, count)
            img.put64(64, offset)
        return damage

    yield "bad magic", base_image, header(0, 0x12345678), "open"
    yield "version 1", base_image, header(4, 1), "open"
    yield "version 4", base_image, header(4, 4), "open"
    yield "cluster_bits 8", base_image, header(20, 8), "open"
    yield "cluster_bits 63", base_image, header(20, 63), "open"
    yield "virtual size 2^63", base_image, header(24, 1 << 63, 64), "open"
    yield "virtual size 2^62 with a tiny L1", base_image, header(24, 1 << 62, 64), "open"
    yield "l1_size 2^31-1", base_image, header(36, 0x7FFFFFFF), "open"
    yield "L1 table beyond the end of the file", base_image, header(40, 1 << 40, 64), "open"
    yield "L1 table unaligned", base_image, header(40, 3 * CLUSTER + 8, 64), "open"
    yield "L1 table on the header", base_image, header(40, 0, 64), "open"
    yield "refcount table beyond the end of the file", base_image, header(48, 1 << 40, 64), "open"
    yield "refcount table unaligned", base_image, header(48, CLUSTER + 512, 64), "open"
    yield "refcount table of 2^31 clusters", base_image, header(56, 0x80000000), "open"
    yield "refcount table on the L1 table", base_image, lambda img: img.put64(48, img.l1_offset), "open"
    yield "refcount_order 7", base_image, header(96, 7), "open"
    yield "header_length 8", base_image, header(100, 8), "open"
    yield "header_length beyond the cluster", base_image, header(100, 2 * CLUSTER), "open"
    yield "unknown incompatible feature", base_image, header(72, 1 << 40, 64), "open"
    yield "external data file bit", base_image, header(72, 1 << 2, 64), "open"
    yield "encryption method 3", base_image, header(32, 3), "open"
    yield "header extension longer than the cluster", base_image, extension(0x12345678, 0x7FFFFFF0), "open"
    yield "backing file name beyond the cluster", base_image, \
        lambda img: (img.put64(8, CLUSTER - 4), img.put32(16, 1000)), "open"
    yield "backing file name longer than 1023", base_image, \
        lambda img: (img.put64(8, 512), img.put32(16, 60000)), "open"
    yield "2^20 snapshots", snapshot_image, snapshots(1 << 20, 0), "open"
    yield "snapshot table beyond the end of the file", snapshot_image, snapshots(1, 1 << 40), "open"
    yield "snapshot table unaligned", snapshot_image, lambda img: img.put64(64, img.u64(64) + 4), "open"
    yield "header truncated at 50 bytes", base_image, lambda img: 50, "open"
    yield "file cut before the L1 table", base_image, lambda img: img.l1_offset - 512, "open"
    yield "L1 entry beyond the end of the file", base_image, l1_entry((1 << 40) | (1 << 63)), "access"
    yield "L1 entry with reserved bits", base_image, lambda img: img.put64(img.l1_offset, img.u64(img.l1_offset) | 1), "access"
    yield "L1 entry pointing at the refcount table", base_image, \
        lambda img: img.put64(img.l1_offset, img.reftable_offset | (1 << 63)), "access"
    yield "L2 entry pointing at the header", base_image, l2_entry(0, (1 << 63) | 0), "access"
    yield "L2 entry pointing at the L1 table", base_image, lambda img: img.put64(img.l2_offset(), img.l1_offset | (1 << 63)), "access"
    yield "L2 entry beyond the end of the file (read as zeros, as QEMU does; not counted, so not written)", base_image, \
        l2_entry(1, (1 << 63) | (1 << 40)), "write"
    yield "L2 entry unaligned", base_image, l2_entry(2, (1 << 63) | (5 * CLUSTER + 512)), "access"
    yield "L2 entry with reserved bits", base_image, lambda img: img.put64(img.l2_offset(), img.u64(img.l2_offset()) | 2), "access"
    yield "L2 entry pointing at its own L2 table", base_image, lambda img: img.put64(img.l2_offset() + 8, img.l2_offset() | (1 << 63)), "access"
    yield "refcount table entry beyond the end of the file", base_image, reftable_entry(1 << 40), "write"
    yield "refcount table entry unaligned", base_image, reftable_entry(2 * CLUSTER + 8), "write"
    yield "refcount table entry pointing at the L1 table", base_image, \
        lambda img: img.put64(img.reftable_offset, img.l1_offset), "write"
    # As with QEMU: the cut part of the table reads as zeros (unallocated), the data clusters
    # past the new end read as zeros and, being counted, are written in place.
    yield "file cut inside the L2 table", base_image, lambda img: img.l2_offset() + 100, "tolerated"
    yield "compressed descriptor beyond the end of the file", compressed_image, \
        l2_entry(0, (1 << 62) | (1 << 40)), "access"
    yield "compressed descriptor with a huge length", compressed_image, \
        lambda img: img.put64(img.l2_offset(), img.u64(img.l2_offset()) | (0xFF << 54)), "tolerated"
    yield "compressed data garbage", compressed_image, \
        lambda img: img.bytes.__setitem__(slice(img.u64(img.l2_offset()) & ((1 << 54) - 1),
                                                 (img.u64(img.l2_offset()) & ((1 << 54) - 1)) + 64), b"\xff" * 64), "read"
    yield "compressed descriptor pointing at the L1 table", compressed_image, \
        lambda img: img.put64(img.l2_offset(), (1 << 62) | img.l1_offset), "access"
    yield "bitmap directory above QEMU's limit", bitmap_image, big_bitmap_directory, "open"
    # Check reports the table as a corruption without reading it; reads and writes need
    # no bitmap.
    yield "bitmap table above QEMU's limits", bitmap_image, big_bitmap_table, "tolerated"


BOUNDED = {"bitmap directory above QEMU's limit", "bitmap table above QEMU's limits"}


def peak_rss_mib(cmd):
    """Runs cmd; its peak RSS in MiB."""
    with open(os.devnull, "wb") as null:
        proc = subprocess.Popen(cmd, stdout=null, stderr=null)
        _, _, rusage = os.wait4(proc.pid, 0)
    return rusage.ru_maxrss / 1024


def tool_runs(img):
    """(what, command) for every tool run against a damaged image."""
    return [
        ("info", [QEMU_IMG, "info", "-f", "qcow2b", img]),
        ("check", [QEMU_IMG, "check", "-f", "qcow2b", img]),
        ("read", [QEMU_IO, "-f", "qcow2b", "-c", "read 0 8M", img]),
        ("write", [QEMU_IO, "-f", "qcow2b", "-c", "write -P 0x11 0 8M", "-c", "flush", img]),
        ("write_zeroes", [QEMU_IO, "-f", "qcow2b", "-c", "write -z 0 8M", img]),
    ]


def system_qemu_dies(path):
    """Whether QEMU's own qcow2 (the system's tools) dies of a signal on this image."""
    died = []
    for cmd in ([SYS_QEMU_IMG, "info", "-f", "qcow2", path],
                [SYS_QEMU_IO, "-f", "qcow2", "-c", "read 0 8M", "-c", "write -P 1 0 8M", path]):
        p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        if p.returncode < 0:
            died.append(f"{os.path.basename(cmd[0])}: signal {-p.returncode}")
    return died


def body():
    qemu_died = []
    n = 0
    with Scratch() as scratch:
        for name, make_base, damage, when in cases():
            n += 1
            img = Image(make_base(scratch))
            truncate = damage(img)
            target = scratch.path(f"hostile{n}.qcow2")
            img.save(target, truncate if isinstance(truncate, int) else None)
            # The damaged image: its bytes, and its length (a sparse tail past them, where the
            # damage claims a large structure, is not read into this process: its memory would
            # count in the children's peak RSS, which a fork inherits).
            length = os.path.getsize(target)
            with open(target, "rb") as f:
                damaged = f.read(len(img.bytes))

            def restore():
                with open(target, "wb") as f:
                    f.write(damaged)
                os.truncate(target, length)

            for what, cmd in tool_runs(target):
                # Every tool starts from the same damaged image.
                restore()
                try:
                    status, out = run(*cmd, check=False, timeout=60)
                except subprocess.TimeoutExpired:
                    raise Failure(f"{name}: {what} ran past 60 s")
                except Failure as e:
                    raise Failure(f"{name}: {what}: {e}")
                if when == "open" and what != "check":
                    if status != 1:
                        raise Failure(f"{name}: {what} exited {status}, expected 1 (refused at open):\n{out}")
                    if "qcow2" not in out:
                        raise Failure(f"{name}: {what}: the message does not say what is wrong:\n{out}")
                    with open(target, "rb") as f:
                        if f.read(len(damaged)) != damaged or os.path.getsize(target) != length:
                            raise Failure(f"{name}: {what} modified an image it refused")
                must_fail = {"access": ("read", "write"), "read": ("read",), "write": ("write",)}
                if what in must_fail.get(when, ()):
                    if status == 0:
                        raise Failure(f"{name}: {what} succeeded on damaged metadata:\n{out}")
                    if "qcow2b:" not in out:
                        raise Failure(f"{name}: {what}: no qcow2b message says why it failed:\n{out}")
                if what == "check" and status not in (0, 1, 2, 3, 63):
                    raise Failure(f"{name}: check exited {status}:\n{out}")
            restore()
            if name in BOUNDED:
                rss = peak_rss_mib([QEMU_IMG, "check", "-f", "qcow2b", target])
                if rss > BOUNDED_RSS_MIB:
                    raise Failure(f"{name}: qemu-img check peaked at {rss:.0f} MiB of RSS "
                                  f"(bound {BOUNDED_RSS_MIB} MiB)")
            qemu_died += [f"{name} ({d})" for d in system_qemu_dies(target)]
            print(f"ok  {name}")
    print(f"{n} hostile images: qcow2b gave an error every time, never a signal")
    if qemu_died:
        print("QEMU's own qcow2 (system) died of a signal on: " + "; ".join(qemu_died))


main(body)
