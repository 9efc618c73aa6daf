"""Guest-level truth: what the guest sent (the recorder above the format node), and what a
crash image must show for it.

Every guest sector read back from a crash image is classified: the initial content of that
sector (before the workload), or the data of a guest request that covered it (writes carry
data unique per request and sector: stamped source files or a pattern byte per request;
write_zeroes and discard leave zeros). Then, at crash point c:
- *no foreign data*: every sector holds its initial content or the data of a guest request
  that wrote that sector (never data written elsewhere, nor a freed cluster's old content);
- *flushed data*: every write that completed before a guest flush that completed before c
  is *intact*: each of its sectors holds it, or a write to that sector that is not strictly
  earlier (one that did not complete before it was issued);
- *barrier order*: if any sector of a guest write W2 is visible, every write ordered before
  W2 by a guest barrier (bare barrier, barrier write or flush completed before W2 was issued;
  the writes completed before that barrier was issued, and a barrier write itself) is intact;
- *size*: the virtual size is the initial one or one the guest set, at least any size set
  before a completed flush.
Discards promise nothing about content: never required, zeros allowed.
"""

from reclog import BARRIER, DISCARD, FLUSH, REQ_BARRIER, TRUNCATE, WRITE, ZEROES

SECTOR = 512
INIT = -1
ZERO_SECTOR = bytes(SECTOR)
CHUNK = 64 * 1024


class GuestModel:
    def __init__(self, ops, initial, initial_size):
        self.ops = ops
        self.initial = bytes(initial)
        self.initial_size = initial_size
        bad = [o for o in ops if not o.ok]
        if bad:
            raise ValueError("guest request failed in the workload: " + bad[0].describe())
        self.writes = [o for o in ops if o.kind in (WRITE, ZEROES, DISCARD)]
        for w in self.writes:
            if w.offset % SECTOR or w.length % SECTOR:
                raise ValueError(f"guest request not sector-aligned: {w.describe()}")
        self.truncates = [o for o in ops if o.kind == TRUNCATE]
        # Ordering events: (issue, completion, the barrier write itself or None).
        self.order = []
        for o in ops:
            if o.kind in (FLUSH, BARRIER):
                self.order.append((o.iseq, o.cseq, None))
            elif o.kind in (WRITE, ZEROES) and o.flags & REQ_BARRIER:
                self.order.append((o.iseq, o.cseq, o))
        self.flushes = [o for o in ops if o.kind == FLUSH]
        for w in self.writes:
            before = [e for e in self.order if e[1] < w.iseq]
            w.barrier_threshold = max((e[0] for e in before), default=-1)
            w.barrier_extras = [e[2] for e in before if e[2] is not None]
        # Per touched sector: content -> set of sources.
        self.candidates = {}
        self.touched_chunks = set()
        for w in self.writes:
            content = w.content()
            for i in range(w.length // SECTOR):
                s = w.offset // SECTOR + i
                piece = content[i * SECTOR:(i + 1) * SECTOR]
                self.candidates.setdefault(s, {}).setdefault(piece, set()).add(w.index)
                self.touched_chunks.add(s * SECTOR // CHUNK)
        for s, cands in self.candidates.items():
            cands.setdefault(self.initial_sector(s), set()).add(INIT)
        self.by_index = {o.index: o for o in ops}

    def initial_sector(self, s):
        piece = self.initial[s * SECTOR:(s + 1) * SECTOR]
        return piece if len(piece) == SECTOR else ZERO_SECTOR

    # -- per image ---------------------------------------------------------------------------
    def classify(self, raw):
        """What a read-back image shows: {size, foreign: [(sector, why)], foreign_count,
        visible: {write index: sector}, lost: {write index: (sector, shown)}}."""
        size = len(raw)
        nsec = size // SECTOR
        foreign, foreign_count = [], 0
        shown = {}  # touched sector -> set of sources
        init = self.initial
        for chunk in range((size + CHUNK - 1) // CHUNK):
            lo, hi = chunk * CHUNK, min(size, (chunk + 1) * CHUNK)
            if chunk not in self.touched_chunks:
                if raw[lo:hi] == init[lo:hi] or (lo >= len(init) and raw[lo:hi] == bytes(hi - lo)):
                    continue
            for s in range(lo // SECTOR, hi // SECTOR):
                piece = raw[s * SECTOR:(s + 1) * SECTOR]
                cands = self.candidates.get(s)
                if cands is None:
                    if piece != self.initial_sector(s):
                        foreign_count += 1
                        if len(foreign) < 4:
                            foreign.append((s, describe_sector(piece), self.expected(s)))
                    continue
                src = cands.get(piece)
                if src is None:
                    foreign_count += 1
                    if len(foreign) < 4:
                        foreign.append((s, describe_sector(piece), self.expected(s)))
                    src = set()
                shown[s] = src
        visible = {}
        lost = {}
        for w in self.writes:
            first = w.offset // SECTOR
            for s in range(first, first + w.length // SECTOR):
                src = shown.get(s) if s < nsec else None
                if src is not None and src == {w.index} and w.index not in visible:
                    visible[w.index] = s
                if w.kind == DISCARD or w.index in lost:
                    continue
                if s >= nsec:
                    lost[w.index] = (s, "beyond the disk's end")
                    continue
                if not src or not any(x == w.index or (x != INIT and
                                      not self.strictly_earlier(x, w)) for x in src):
                    lost[w.index] = (s, self.describe_sources(src))
        return {"size": size, "foreign": foreign, "foreign_count": foreign_count,
                "visible": visible, "lost": lost}

    def expected(self, s):
        """What sector s may hold, in words."""
        init = describe_sector(self.initial_sector(s))
        others = sorted(x for srcs in self.candidates.get(s, {}).values() for x in srcs
                        if x != INIT)
        return " or ".join([f"its initial content ({init})"] +
                           [f"the data of guest {self.by_index[x].describe()}"
                            for x in others])

    def strictly_earlier(self, x, w):
        """Whether guest request x completed before w was issued."""
        return self.by_index[x].cseq < w.iseq

    def describe_sources(self, src):
        if not src:
            return "foreign data"
        names = []
        for x in sorted(src):
            names.append("its initial content" if x == INIT else f"guest #{x}")
        return " or ".join(names)

    # -- per state ---------------------------------------------------------------------------
    def signature(self, c):
        """What the guest was promised by crash point c (equal signatures, equal checks)."""
        return (self.flushed_before(c), sum(1 for e in self.order if e[1] < c),
                sum(1 for w in self.writes if w.iseq < c))

    def flushed_before(self, c):
        return max((f.iseq for f in self.flushes if f.cseq < c), default=-1)

    def check(self, c, result):
        """The guest-level failures of an image read back at crash point c: [(kind, text)]."""
        failures = []
        if result["foreign_count"]:
            s, what, expected = result["foreign"][0]
            failures.append(("foreign", f"{result['foreign_count']} sector(s) hold data the "
                             f"guest never wrote there; first: sector {s} "
                             f"(offset {s * SECTOR:#x}) holds {what}, expected {expected}"))
        gf = self.flushed_before(c)
        sizes = {self.initial_size} | {t.offset for t in self.truncates if t.iseq < c}
        need = max([self.initial_size] + [t.offset for t in self.truncates if t.cseq < gf])
        if result["size"] not in sizes or result["size"] < need:
            failures.append(("size", f"virtual size {result['size']:#x}, expected one of "
                             f"{sorted(hex(s) for s in sizes)} and at least {need:#x}"))
        lost = result["lost"]
        for w in self.writes:
            if w.iseq >= c:
                break
            if w.cseq is not None and w.cseq < gf and w.index in lost:
                s, shows = lost[w.index]
                failures.append(("flushed", f"guest {w.describe()} completed before a "
                                 f"completed flush, but sector {s} (offset {s * SECTOR:#x}) "
                                 f"shows {shows}"))
                break
        for v, vs in sorted(result["visible"].items()):
            g2 = self.by_index[v]
            for w in self.writes:
                if w.index in lost and (w.cseq is not None and w.cseq < g2.barrier_threshold
                                        or w in g2.barrier_extras):
                    s, shows = lost[w.index]
                    failures.append(("order", f"guest {g2.describe()} is visible (sector "
                                     f"{vs}), but {w.describe()}, ordered before it by a "
                                     f"barrier, is not: sector {s} (offset {s * SECTOR:#x}) "
                                     f"shows {shows}"))
                    break
            else:
                continue
            break
        return failures


def describe_sector(piece):
    """What an unexpected sector holds, in words (stamps are decoded)."""
    from workloads import decode_stamp

    stamp = decode_stamp(piece)
    if stamp is not None:
        return f"the stamp of write id {stamp[0]} for sector {stamp[1]}"
    if piece == ZERO_SECTOR:
        return "zeros"
    if piece.count(piece[0]) == len(piece):
        return f"pattern byte {piece[0]:#x}"
    return f"unrecognised bytes {piece[:16].hex()}..."
