"""The crash model: which states of the image file a crash may leave, given what the recorder
saw reach the file (writes, flushes, barriers, truncates, each issued and completed).

Definitions (every number is a position in the recorder's event order; a crash point `c`
means "every event before c happened, none after"):
- W1 is *ordered before* W2 by a barrier B iff W1 completed before B was issued and W2 was
  issued after B completed. A flush is a barrier too.
- A flush F makes *durable* every write that completed before F was issued, once F completes;
  a FUA write is durable once it completes. (A barrier-flag write reaching the file, which
  neither driver sends there, is taken as a barrier right after it completes.)
- A crash state at `c` is a set of writes issued before `c`, each present whole or torn (a
  subset of its 512-byte sectors, or of the caller's larger atomic unit), that holds every
  write made durable by a flush completed
  before `c`, and is closed under "ordered before": if any sector of W2 is present, all of W1
  is. Present writes are applied in completion order (later completion wins) to a copy of
  the starting image; truncates completed before `c` are applied in the same order.

Because "ordered before" relates W2 to every write that completed before the last barrier
issued before W2's issue, a state is: a threshold R (the issue of a barrier or flush), every
write completed before R whole, and any choice among the writes issued before `c` whose own
threshold is at most R (absent, whole or torn). With serial I/O this is the issue's
"prefix of whole epochs plus any subset of the next epoch, torn at sectors".

Tearing: a write's sectors that equal every other version of that sector (the starting image
and every other write there) cannot change the outcome; only its *effective* sectors are torn.
Enumerated states tear writes of 2 or 3 effective sectors every possible way and larger ones
in 4 fixed ways (each half, all but the last, the last alone); sampled states tear at random.

Which states are checked (harness.py): all of them when there are at most the budget; else
every state of each small (crash point, threshold) group (at most SMALL_GROUP states) while
those fit in half the budget, and seeded samples of the other groups for the rest.
"""

import itertools

from reclog import BARRIER, DISCARD, FLUSH, REQ_BARRIER, REQ_FUA, TRUNCATE

SECTOR = 512
INF = float("inf")
FULL = "whole"  # the mask of a write present whole
ABSENT = None


def _k(seq):
    """Positions are doubled so that a barrier write's own barrier fits just after it."""
    return INF if seq is None else 2 * seq


class FileModel:
    def __init__(self, ops, start, unit=SECTOR):
        """`unit`: the tearing unit, what the storage writes atomically (512 bytes unless the
        caller models a device with larger atomic writes)."""
        self.unit = unit
        self.ops = ops
        self.start = bytes(start)
        self.writes = [o for o in ops if o.is_write()]
        self.truncates = [o for o in ops if o.kind == TRUNCATE and o.ok]
        # Barrier-like events (issue, completion): barriers, flushes, barrier-flag writes
        # (the barrier taken once the write completed).
        order = []
        durable = []
        for o in ops:
            if o.kind in (FLUSH, BARRIER) and o.ok:
                order.append((_k(o.iseq), _k(o.cseq)))
            if o.kind == FLUSH and o.ok:
                durable.append((_k(o.iseq), _k(o.cseq)))
            if o.is_write() and o.ok and o.flags & REQ_BARRIER:
                order.append((_k(o.cseq) + 1, _k(o.cseq) + 1))
        order.sort(key=lambda e: e[1])
        self.order = order
        self.durable = sorted(durable, key=lambda e: e[1])
        for w in self.writes:
            w.t = max((i for i, c in order if c < _k(w.iseq)), default=-1)
            w.ck = _k(w.cseq) if w.ok else INF  # failed writes are never forced whole
            w.ik = _k(w.iseq)
        self.points = sorted({_k(o.iseq) for o in ops} |
                             {_k(o.cseq) for o in ops if o.cseq is not None}) + [INF]
        self._effective_sectors()

    # -- tearing -----------------------------------------------------------------------------
    def _effective_sectors(self):
        """For each write: its sectors (absolute numbers) that differ from another version."""
        versions = {}  # sector -> list of (write, content in that sector)
        for w in self.writes:
            content = w.content()
            unit = self.unit
            first, last = w.offset // unit, (w.end - 1) // unit
            for s in range(first, last + 1):
                lo, hi = max(w.offset, s * unit), min(w.end, (s + 1) * unit)
                versions.setdefault(s, []).append((w, lo, content[lo - w.offset:hi - w.offset]))
        for w in self.writes:
            w.sectors = list(range(w.offset // self.unit, (w.end - 1) // self.unit + 1))
            w.effective = []
        for s, vs in versions.items():
            for w, lo, piece in vs:
                hi = lo + len(piece)
                differs = self.start[lo:hi] != piece or len(self.start) < hi
                if not differs:
                    for w2, lo2, piece2 in vs:
                        if w2 is w:
                            continue
                        a, b = max(lo, lo2), min(hi, lo2 + len(piece2))
                        if a < b and piece[a - lo:b - lo] != piece2[a - lo2:b - lo2]:
                            differs = True
                            break
                        if a >= b:
                            # Another write leaves other bytes of this sector changed.
                            differs = True
                            break
                if differs:
                    w.effective.append(s)

    @staticmethod
    def tear_masks(w):
        """The torn variants an enumeration tries (masks over w's effective sectors)."""
        e = w.effective
        if len(e) < 2:
            return []
        if len(e) <= 3:
            masks = []
            for n in range(1, len(e)):
                masks.extend(frozenset(c) for c in itertools.combinations(e, n))
            return masks
        half = len(e) // 2
        return [frozenset(e[:half]), frozenset(e[half:]), frozenset(e[:-1]), frozenset(e[-1:])]

    # -- crash points ------------------------------------------------------------------------
    def issued(self, c):
        return [w for w in self.writes if w.ik < c]

    def flushed_before(self, c):
        """The issue of the last flush completed before c (-1 if none)."""
        return max((i for i, done in self.durable if done < c), default=-1)

    def thresholds(self, c):
        """The possible thresholds R at crash point c, and the writes issued before c."""
        issued = self.issued(c)
        fmax = self.flushed_before(c)
        # A FUA write is durable once complete; it forces what is ordered before it too.
        for w in self.fua_done(issued, c):
            fmax = max(fmax, w.t)
        rs = sorted({fmax} | {w.t for w in issued if w.t > fmax})
        return issued, rs

    @staticmethod
    def fua_done(issued, c):
        return [w for w in issued if w.ok and w.flags & REQ_FUA and w.ck < c]

    def split(self, issued, r, c):
        fua = self.fua_done(issued, c)
        whole = [w for w in issued if w.ck < r or w in fua]
        optional = [w for w in issued if not (w.ck < r or w in fua) and w.t <= r]
        return whole, optional

    def groups(self):
        """Every (crash point, threshold) pair with its number of enumerated states."""
        out = []
        for c in self.points:
            issued, rs = self.thresholds(c)
            for r in rs:
                _, optional = self.split(issued, r, c)
                n = 1
                for w in optional:
                    n *= 2 + len(self.tear_masks(w))
                out.append((c, r, n))
        return out

    def enumerate(self, groups):
        """Every enumerated state of the given (c, r) groups, in a fixed order: (c, r,
        present) with present a list of (write, mask)."""
        for c, r in groups:
            issued, _ = self.thresholds(c)
            whole, optional = self.split(issued, r, c)
            choices = [[ABSENT, FULL] + self.tear_masks(w) for w in optional]
            for combo in itertools.product(*choices):
                present = [(w, FULL) for w in whole]
                present += [(w, m) for w, m in zip(optional, combo) if m is not ABSENT]
                yield c, r, present

    def sample(self, rng, groups):
        """One random state of a random (c, r) group: (c, r, present)."""
        c, r = rng.choice(groups)
        issued, _ = self.thresholds(c)
        whole, optional = self.split(issued, r, c)
        present = [(w, FULL) for w in whole]
        p_absent = rng.choice((0.2, 0.5, 0.8))
        for w in optional:
            x = rng.random()
            if x < p_absent:
                continue
            if x < p_absent + (1 - p_absent) * 0.6 or len(w.effective) < 2:
                present.append((w, FULL))
                continue
            while True:
                mask = frozenset(s for s in w.effective if rng.random() < 0.5)
                if 0 < len(mask) < len(w.effective):
                    break
            present.append((w, mask))
        return c, r, present

    def unsynced_across_flush(self, c, present):
        """Writes of the state that are not whole although a flush completed before c was
        issued while they were in flight (issued before it, completed after its issue): the
        flush does not cover them, but a driver that counts them as synced would not order
        them again (the signature of known bug KB3)."""
        whole = {w.index for w, m in present if m is FULL}
        flushes = [(i, done) for i, done in self.durable if done < c]
        return [w for w in self.issued(c) if w.index not in whole and
                any(w.ik < i < w.ck for i, _ in flushes)]

    # -- building an image -------------------------------------------------------------------
    def truncates_before(self, c):
        return [t for t in self.truncates if _k(t.cseq) < c]

    def build(self, c, present):
        """The image file of a state."""
        events = [(w.ck if w.ck != INF else _k(w.iseq) + 0.5 + 1e9, 0, w, m) for w, m in present]
        events += [(_k(t.cseq), 1, t, None) for t in self.truncates_before(c)]
        events.sort(key=lambda e: (e[0], e[1]))
        buf = bytearray(self.start)
        for _, _, op, mask in events:
            if op.kind == TRUNCATE:
                n = op.offset
                if n < len(buf):
                    del buf[n:]
                else:
                    buf.extend(bytes(n - len(buf)))
                continue
            content = op.content()
            if op.kind == DISCARD and op.end > len(buf):
                # A discard past the end of the file does not extend it (file-posix punches
                # holes; QEMU's qcow2 discards freed clusters wherever they are).
                if op.offset >= len(buf):
                    continue
                content = content[:len(buf) - op.offset]
                op_end = len(buf)
            else:
                op_end = op.end
            if len(buf) < op_end:
                buf.extend(bytes(op_end - len(buf)))
            if mask is FULL:
                buf[op.offset:op_end] = content
            else:
                for s in op.sectors:
                    if s in mask or s not in op.effective:
                        lo, hi = max(op.offset, s * self.unit), min(op_end, (s + 1) * self.unit)
                        if lo >= hi:
                            continue
                        buf[lo:hi] = content[lo - op.offset:hi - op.offset]
        return buf

    def replay_all(self):
        """Every write and truncate applied: must equal the file after the run (the
        recorder's self-check). Discards are applied as zeros."""
        return self.build(INF, [(w, FULL) for w in self.writes if w.ok])

    def discarded_ranges(self):
        return [(w.offset, w.end) for w in self.writes if w.kind == DISCARD]
