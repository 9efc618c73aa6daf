#!/usr/bin/env python3
"""Makes the seed corpus in fuzz/corpus/ from small real images made by the system's qemu-img
with the options of the engine's compatibility matrix (compat 0.10 and 1.1, small and large
clusters, refcount widths 1 and 64, zlib and zstd compressed clusters, a backing file,
internal snapshots, lazy refcounts, metadata preallocation, extended L2 entries). The corpus is
committed; run this again to regenerate it, or with seed names to add or remake only those
(`make-corpus.py v3-extl2 ...`: the rest of the corpus stays as it is)."""

import os
import shutil
import sys
import struct
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
QEMU_IMG, QEMU_IO = "/usr/bin/qemu-img", "/usr/bin/qemu-io"

IMAGES = [
    # name, create options, size, qemu-io commands, extra step
    ("v3-512", "cluster_size=512", "256K", ["write -P 1 0 3k", "write -z 8k 4k", "write -P 2 100k 700"], None),
    ("v2-512", "compat=0.10,cluster_size=512", "256K", ["write -P 3 0 5k", "write -P 4 200k 1k"], None),
    ("v3-4k-refcount1", "cluster_size=4096,refcount_bits=1", "512K", ["write -P 5 0 40k"], None),
    ("v3-4k-refcount64", "cluster_size=4096,refcount_bits=64", "512K", ["write -P 6 8k 20k"], None),
    ("v3-2m-empty", "cluster_size=2M", "4M", [], None),
    ("v3-lazy", "cluster_size=512,lazy_refcounts=on", "256K", ["write -P 7 0 2k"], None),
    ("v3-prealloc", "cluster_size=512,preallocation=metadata", "64K", [], None),
    ("v3-snapshots", "cluster_size=512", "128K", ["write -P 8 0 4k"], "snapshot"),
    ("v3-backing", "cluster_size=512", "128K", ["write -P 9 1k 1k"], "backing"),
    ("v3-zlib", "cluster_size=4096", "128K", ["write -P 10 0 16k"], "compress-zlib"),
    ("v3-zstd", "cluster_size=4096", "128K", ["write -P 11 0 16k"], "compress-zstd"),
    # Extended L2 entries (16 KiB clusters: subclusters of 512 bytes): partial subclusters,
    # zero subclusters, a discard, preallocated clusters, a backing file, compressed clusters.
    ("v3-extl2", "cluster_size=16k,extended_l2=on", "512K",
     ["write -P 13 1k 3k", "write -z 20k 4k", "write -P 14 100k 40k", "write -z -u 128k 16k",
      "discard 160k 32k"], None),
    ("v3-extl2-prealloc", "cluster_size=16k,extended_l2=on,preallocation=metadata", "256K",
     ["write -P 15 2k 1k"], None),
    ("v3-extl2-backing", "cluster_size=16k,extended_l2=on", "256K", ["write -P 16 1k 1k"], "backing"),
    ("v3-extl2-zlib", "cluster_size=16k,extended_l2=on", "256K", ["write -P 17 0 64k"], "compress-zlib"),
]


def run(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def make(work, name, opts, size, cmds, extra):
    img = os.path.join(work, name + ".qcow2")
    if extra == "backing":
        base = os.path.join(work, "base.raw")
        run(QEMU_IMG, "create", "-q", "-f", "raw", base, size)
        run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.raw", "-F", "raw", img, size)
    else:
        run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", opts, img, size)
    for c in cmds:
        run(QEMU_IO, "-f", "qcow2", "-c", c, img)
    if extra == "snapshot":
        run(QEMU_IMG, "snapshot", "-c", "one", img)
        run(QEMU_IO, "-f", "qcow2", "-c", "write -P 12 0 1k", img)
        run(QEMU_IMG, "snapshot", "-c", "two", img)
    if extra and extra.startswith("compress-"):
        out = os.path.join(work, name + ".c.qcow2")
        run(QEMU_IMG, "convert", "-c", "-O", "qcow2", "-o",
            f"{opts},compression_type={extra.split('-')[1]}", img, out)
        img = out
    with open(img, "rb") as f:
        return f.read()


def compressed_seed(image):
    """(kind byte, cluster bits byte, descriptor, payload) from an image's first compressed
    cluster, in the compressed target's input format."""
    cluster_bits = struct.unpack_from(">I", image, 20)[0]
    l1 = struct.unpack_from(">Q", image, 40)[0]
    l2 = struct.unpack_from(">Q", image, l1)[0] & 0x00FFFFFFFFFFFE00
    entry = struct.unpack_from(">Q", image, l2)[0]
    x = 62 - (cluster_bits - 8)
    offset = entry & ((1 << x) - 1)
    sectors = ((entry >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
    payload = image[offset:offset + sectors * 512]
    zstd = struct.unpack_from(">Q", image, 72)[0] & 8 != 0
    raw = (sectors - 1) << 54  # the target rebuilds the descriptor for 64 KiB clusters
    return bytes([1 if zstd else 0, cluster_bits - 9]) + struct.pack("<II", raw & 0xFFFFFFFF, raw >> 32) + payload


def main(only):
    unknown = set(only) - {name for name, *_ in IMAGES}
    if unknown:
        sys.exit(f"no such seed: {', '.join(sorted(unknown))}")
    if not only and os.path.isdir(CORPUS):
        shutil.rmtree(CORPUS)
    for target in ("header", "tables", "snapshots", "compressed", "whole"):
        os.makedirs(os.path.join(CORPUS, target), exist_ok=True)
    work = tempfile.mkdtemp()
    try:
        for name, opts, size, cmds, extra in IMAGES:
            if only and name not in only:
                continue
            image = make(work, name, opts, size, cmds, extra)
            cluster = 1 << struct.unpack_from(">I", image, 20)[0]
            def put(target, data, suffix=""):
                with open(os.path.join(CORPUS, target, name + suffix), "wb") as f:
                    f.write(data)
            if cluster <= 65536:
                put("header", image[:min(cluster, len(image))])
            if len(image) <= 1 << 20:
                put("tables", image)
                # whole: the image, then a short script (write, read, flush, reopen, read).
                script = bytes([0]) + struct.pack("<II", 100, 3000) + b"\x42"
                script += bytes([2]) + struct.pack("<II", 90, 4000)
                script += bytes([5]) + struct.pack("<II", 0, 0)
                script += bytes([8]) + struct.pack("<II", 0, 0)
                script += bytes([2]) + struct.pack("<II", 0, 8000)
                put("whole", struct.pack("<I", len(image)) + image + script)
            if extra == "snapshot":
                count = struct.unpack_from(">I", image, 60)[0]
                table = struct.unpack_from(">Q", image, 64)[0]
                put("snapshots", struct.pack("<I", count) + bytes([6]) + image[table:table + 4096])
            if extra and extra.startswith("compress-"):
                put("compressed", compressed_seed(image))
    finally:
        shutil.rmtree(work)
    total = sum(len(fs) for _, _, fs in os.walk(CORPUS))
    print(f"{total} seed files in {CORPUS}")


main(sys.argv[1:])
