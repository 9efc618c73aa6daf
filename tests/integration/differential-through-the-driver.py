#!/usr/bin/env python3
"""Differential test through the driver: seeded random sequences of writes (many sizes and
alignments), write_zeroes (with and without unmap), cluster-aligned discards and flushes,
applied with the built qemu-io through qcow2b to a qcow2 image and through raw to a raw file.
After every sequence: `qemu-img compare` says equal, and `qemu-img check` (system and built)
exits 0. Cluster sizes 512 B, 4 KiB and 64 KiB, with and without a backing file.

Usage: differential-through-the-driver.py [SEEDS_PER_CASE]   (default 6)
A failure prints the seed and case; `QCOW2B_SEED=N` replays one seed."""

import os
import random
import sys

from qemu_tools import (QEMU_IMG, QEMU_IO, SYS_QEMU_IMG, SYS_QEMU_IO, Failure, Scratch,
                        check_clean, main, qemu_io, run)


def random_sequence(rng, size, cluster, count):
    """qemu-io commands for qcow2b, and the same for raw (discards differ: qcow2 drops whole
    clusters only, so the generator only discards whole clusters)."""
    cmds = []
    for _ in range(count):
        kind = rng.randrange(14)
        align = rng.choice([1, 512, cluster, 4096])
        offset = rng.randrange(0, size // align) * align
        length = rng.choice([1 + rng.randrange(32), 512, cluster, cluster + 1 + rng.randrange(cluster),
                             1 + rng.randrange(4 * cluster), 3 * cluster + 7, 65536])
        length = max(1, min(length, size - offset))
        if kind == 0:
            cmds.append(f"write -z {offset} {length}")
        elif kind == 1:
            cmds.append(f"write -z -u {offset} {length}")
        elif kind == 2:
            first = offset // cluster
            n = 1 + rng.randrange(4)
            end = min(size, (first + n) * cluster)
            if first * cluster < end and end % cluster == 0:
                cmds.append(f"discard {first * cluster} {end - first * cluster}")
        elif kind == 3:
            cmds.append("flush")
        else:
            cmds.append(f"write -P {rng.randrange(1, 256)} {offset} {length}")
    return cmds


def one_case(scratch, cluster, with_backing, seed, sessions=3, per_session=60):
    size = {512: 2 << 20, 4096: 8 << 20}.get(cluster, 16 << 20) + 7 * 512
    img, raw = scratch.path(f"img-{seed}.qcow2"), scratch.path(f"model-{seed}.raw")
    base = scratch.path(f"base-{seed}.qcow2")
    for f in (img, raw, base):
        if os.path.exists(f):
            os.unlink(f)
    if with_backing:
        base_size = size * 3 // 4 // 512 * 512
        run(SYS_QEMU_IMG, "create", "-q", "-f", "qcow2", base, str(base_size))
        qemu_io(SYS_QEMU_IO, "qcow2", base, ["write -P 0x11 0 100k", f"write -P 0x22 {cluster * 5 + 512} 300k",
                                             f"write -P 0x33 {base_size - 65536} 64k"])
        run(SYS_QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", "-b", base,
            "-F", "qcow2", img, str(size))
        # The model starts as the overlay reads: the base, zeros past its end.
        run(SYS_QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", img, raw)
    else:
        run(SYS_QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", img, str(size))
        run(SYS_QEMU_IMG, "create", "-q", "-f", "raw", raw, str(size))
    rng = random.Random(seed)
    for session in range(sessions):
        cmds = random_sequence(rng, size, cluster, per_session)
        try:
            qemu_io(QEMU_IO, "qcow2b", img, cmds)
            qemu_io(QEMU_IO, "raw", raw, cmds)
            status, out = run(SYS_QEMU_IMG, "compare", "-f", "qcow2", "-F", "raw", img, raw, check=False)
            if status != 0:
                raise Failure(f"qemu-img compare: {out}")
            check_clean(img)
        except Failure as e:
            raise Failure(f"cluster {cluster}, backing {with_backing}, seed {seed}, session {session}: {e}\n"
                          f"commands: {cmds}")


def body():
    seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    replay = os.environ.get("QCOW2B_SEED")
    cases = 0
    with Scratch() as scratch:
        for cluster in (512, 4096, 65536):
            for with_backing in (False, True):
                for i in range(seeds):
                    seed = int(replay) if replay else cluster * 1000 + with_backing * 100 + i
                    one_case(scratch, cluster, with_backing, seed)
                    cases += 1
    print(f"{cases} sequences equal to raw, images clean")


main(body)
