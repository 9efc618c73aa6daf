#!/usr/bin/env python3
"""Compatibility matrix: images that the system's qemu-img makes (compat 0.10 and 1.1, cluster
sizes 512 B and 2 MiB, refcount_bits 1 and 64, compressed with zlib and zstd, with a backing
file, with internal snapshots, lazy_refcounts, preallocation=metadata and full), filled by the
system's qemu-io. For each:
- qcow2b reads exactly what QEMU's qcow2 reads (the whole disk, converted to raw);
- after qcow2b writes to it (allocating, in place, partial clusters, into compressed and
  snapshot-shared clusters, zeroes), QEMU's qcow2 reads the new data and qemu-img check
  (system and built) is clean;
- internal snapshots stay intact: `qemu-img snapshot -a` afterwards gives the snapshot's data."""

import os
import shutil
import struct

from qemu_tools import (QEMU_IMG, QEMU_IO, SYS_QEMU_IMG, SYS_QEMU_IO, Failure, Scratch,
                        check_clean, main, qemu_io, run, to_raw)

SIZE = 8 << 20

# What the system's qemu-io writes before qcow2b sees the image (offsets inside SIZE).
FILL = ["write -P 0x11 0 300k", "write -P 0x22 1M 64k", "write -P 0x33 3000k 7k",
        "write -z 5M 128k", "write -P 0x44 7M 1M"]

# What qcow2b then writes: partial and whole clusters, over data, holes, zeros and the end.
CHANGES = ["write -P 0x55 10k 3k", "write -P 0x66 1000k 200k", "write -P 0x77 5M 4k",
           "write -P 0x88 8388096 512", "write -z 7M 64k", "write -P 0x99 2M 2M"]

CASES = [
    ("compat=0.10", {"opts": "compat=0.10"}),
    ("compat=1.1", {"opts": "compat=1.1"}),
    ("cluster_size=512", {"opts": "cluster_size=512"}),
    ("cluster_size=2M", {"opts": "cluster_size=2M"}),
    ("refcount_bits=1", {"opts": "refcount_bits=1"}),
    ("refcount_bits=64", {"opts": "refcount_bits=64"}),
    ("compressed zlib", {"compress": "zlib"}),
    ("compressed zstd", {"compress": "zstd"}),
    ("backing file", {"backing": True}),
    ("internal snapshots", {"snapshots": True}),
    ("lazy_refcounts", {"opts": "lazy_refcounts=on"}),
    ("preallocation=metadata", {"opts": "preallocation=metadata"}),
    ("preallocation=full", {"opts": "preallocation=full"}),
    ("compat=0.10 cluster_size=512 snapshots", {"opts": "compat=0.10,cluster_size=512", "snapshots": True}),
    # header_length = the cluster size: the header's own fields fill the cluster, no room for
    # an extension or an end marker (QEMU's qcow2 opens it; so must qcow2b).
    ("header_length = cluster size", {"header_length_cluster": True}),
]


def make_image(scratch, name, case):
    img = scratch.path(f"{name}.qcow2")
    opts = case.get("opts")
    if "compress" in case:
        # qemu-img convert -c: every written cluster compressed.
        plain = scratch.path(f"{name}.plain.qcow2")
        run(SYS_QEMU_IMG, "create", "-q", "-f", "qcow2", plain, str(SIZE))
        qemu_io(SYS_QEMU_IO, "qcow2", plain, FILL)
        run(SYS_QEMU_IMG, "convert", "-c", "-f", "qcow2", "-O", "qcow2", "-o",
            f"compression_type={case['compress']}", plain, img)
        return img, []
    args = [SYS_QEMU_IMG, "create", "-q", "-f", "qcow2"] + (["-o", opts] if opts else [])
    if case.get("backing"):
        base = scratch.path(f"{name}.base.qcow2")
        run(SYS_QEMU_IMG, "create", "-q", "-f", "qcow2", base, str(SIZE))
        qemu_io(SYS_QEMU_IO, "qcow2", base, ["write -P 0xb0 0 8M"])
        args += ["-b", base, "-F", "qcow2"]
    run(*args, img, str(SIZE))
    qemu_io(SYS_QEMU_IO, "qcow2", img, FILL)
    if case.get("header_length_cluster"):
        with open(img, "r+b") as f:
            f.seek(20)
            cluster_size = 1 << struct.unpack(">I", f.read(4))[0]
            f.seek(100)
            f.write(struct.pack(">I", cluster_size))
    snapshots = []
    if case.get("snapshots"):
        # Two snapshots with different content, then more writes on top.
        run(SYS_QEMU_IMG, "snapshot", "-c", "first", img)
        snapshots.append(("first", to_raw(SYS_QEMU_IMG, "qcow2", img, scratch.path("s1.raw"))))
        qemu_io(SYS_QEMU_IO, "qcow2", img, ["write -P 0xa1 0 100k", "write -P 0xa2 1M 2M"])
        run(SYS_QEMU_IMG, "snapshot", "-c", "second", img)
        snapshots.append(("second", to_raw(SYS_QEMU_IMG, "qcow2", img, scratch.path("s2.raw"))))
        qemu_io(SYS_QEMU_IO, "qcow2", img, ["write -P 0xa3 200k 100k"])
    return img, snapshots


def one_case(scratch, name, case):
    img, snapshots = make_image(scratch, name, case)
    before = to_raw(SYS_QEMU_IMG, "qcow2", img, scratch.path("before-qemu.raw"))
    through_qcow2b = to_raw(QEMU_IMG, "qcow2b", img, scratch.path("before-qcow2b.raw"))
    if before != through_qcow2b:
        raise Failure(f"{name}: qcow2b reads differently from QEMU's qcow2 (first difference at "
                      f"{next(i for i, (a, b) in enumerate(zip(before, through_qcow2b)) if a != b)})")

    # The same changes through qcow2b on the image and through raw on a copy of its content.
    model = scratch.path("model.raw")
    with open(model, "wb") as f:
        f.write(before)
    qemu_io(QEMU_IO, "qcow2b", img, CHANGES)
    qemu_io(QEMU_IO, "raw", model, CHANGES)
    after = to_raw(SYS_QEMU_IMG, "qcow2", img, scratch.path("after.raw"))
    with open(model, "rb") as f:
        if after != f.read():
            raise Failure(f"{name}: after qcow2b wrote, QEMU's qcow2 does not read the new data")
    check_clean(img)

    for snap, content in snapshots:
        copy = scratch.path("applied.qcow2")
        shutil.copy(img, copy)
        run(SYS_QEMU_IMG, "snapshot", "-a", snap, copy)
        if to_raw(SYS_QEMU_IMG, "qcow2", copy, scratch.path("applied.raw")) != content:
            raise Failure(f"{name}: snapshot {snap} no longer gives its data after qcow2b wrote")
        check_clean(copy)
        os.unlink(copy)


def body():
    with Scratch() as scratch:
        for i, (name, case) in enumerate(CASES):
            one_case(scratch, f"case{i}", case)
            print(f"ok  {name}")
    print(f"{len(CASES)} image kinds: qcow2b reads and writes them as QEMU's qcow2 does")


main(body)
