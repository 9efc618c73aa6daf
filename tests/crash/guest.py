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
- *size*: the virtual size is the one the last resize completed before the last completed
  flush set (the initial one if none), or one a later resize set (growth or shrinking);
  a write's sectors a later shrink cut off are not required.
Discards promise nothing about content: never required, zeros allowed.
"""

import hashlib

from reclog import BARRIER, DISCARD, FLUSH, REQ_BARRIER, TRUNCATE, WRITE, ZEROES

SECTOR = 512
INIT = -1
CHUNK_CACHE_ENTRIES = 20_000  # at most a few hundred MiB of small dicts, then it starts over
WRITE_CACHE_ENTRIES = 500_000
ZERO_SECTOR = bytes(SECTOR)
CHUNK = 64 * 1024
ZERO_CHUNK = bytes(CHUNK)


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
        # Per write: the sources a sector of it may show without losing it (itself, or a
        # write there that is not strictly earlier: one that did not complete before it was
        # issued).
        for w in self.writes:
            ok = {w.index}
            first = w.offset // SECTOR
            for s in range(first, first + w.length // SECTOR):
                for srcs in self.candidates.get(s, {}).values():
                    ok.update(x for x in srcs if x != INIT and x not in ok
                              and not self.strictly_earlier(x, w))
            w.keeps = frozenset(ok)
            w.chunks = range(w.offset // CHUNK, (w.end + CHUNK - 1) // CHUNK) if w.length \
                else range(0)
        # Chunk classifications already made, by content (a run's crash images share most of
        # their chunks): (chunk, digest) -> (foreign count, foreign examples, shown).
        self._chunk_cache = {}
        self._write_cache = {}  # (write, disk size, keys of its chunks) -> its verdict

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
        chunk_keys = {}  # touched chunk -> its key in the cache
        for chunk in range((size + CHUNK - 1) // CHUNK):
            lo, hi = chunk * CHUNK, min(size, (chunk + 1) * CHUNK)
            data = bytes(raw[lo:hi])
            if chunk not in self.touched_chunks:
                if lo >= len(init):
                    if data == (ZERO_CHUNK if hi - lo == CHUNK else bytes(hi - lo)):
                        continue
                elif data == init[lo:hi]:
                    continue
            key = (chunk, hashlib.blake2b(data, digest_size=16).digest())
            chunk_keys[chunk] = key
            got = self._chunk_cache.get(key)
            if got is None:
                got = self._classify_chunk(lo, data)
                if len(self._chunk_cache) > CHUNK_CACHE_ENTRIES:
                    self._chunk_cache.clear()
                self._chunk_cache[key] = got
            n, examples, chunk_shown = got
            foreign_count += n
            foreign.extend(examples[:4 - len(foreign)])
            shown.update(chunk_shown)
        visible = {}
        lost = {}
        for w in self.writes:
            # A write's verdict depends only on the chunks it covers (and the disk's size).
            key = (w.index, nsec, tuple(chunk_keys.get(c) for c in w.chunks))
            got = self._write_cache.get(key)
            if got is None:
                got = self._classify_write(w, shown, nsec)
                if len(self._write_cache) > WRITE_CACHE_ENTRIES:
                    self._write_cache.clear()
                self._write_cache[key] = got
            seen, gone = got
            if seen is not None:
                visible[w.index] = seen
            if gone is not None:
                lost[w.index] = gone
        return {"size": size, "foreign": foreign, "foreign_count": foreign_count,
                "visible": visible, "lost": lost}

    def _classify_write(self, w, shown, nsec):
        """(the first sector showing only w or None, (sector, what it shows) if w is lost)."""
        seen = gone = None
        first = w.offset // SECTOR
        for s in range(first, first + w.length // SECTOR):
            src = shown.get(s) if s < nsec else None
            if seen is None and src is not None and len(src) == 1 and w.index in src:
                seen = s
            if w.kind == DISCARD or gone is not None:
                if seen is not None:
                    break
                continue
            if s >= nsec:
                gone = (s, "beyond the disk's end")
            elif not src or src.isdisjoint(w.keeps):
                gone = (s, self.describe_sources(src))
        return seen, gone

    def _classify_chunk(self, lo, data):
        """(foreign sectors, the first few of them, {sector: sources shown}) of one chunk."""
        count, examples, shown = 0, [], {}
        first = lo // SECTOR
        for i in range(len(data) // SECTOR):
            s = first + i
            piece = data[i * SECTOR:(i + 1) * SECTOR]
            cands = self.candidates.get(s)
            if cands is None:
                if piece != self.initial_sector(s):
                    count += 1
                    if len(examples) < 4:
                        examples.append((s, describe_sector(piece), self.expected(s)))
                continue
            src = cands.get(piece)
            if src is None:
                count += 1
                if len(examples) < 4:
                    examples.append((s, describe_sector(piece), self.expected(s)))
                src = set()
            shown[s] = src
        return count, examples, shown

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

    def not_cut_off(self, lost, c):
        """`lost` without the writes whose missing sector lies past the disk's end because a
        shrink issued after the write (and before c) cut it off: the guest asked for that."""
        out = {}
        for index, (s, shows) in lost.items():
            w = self.by_index[index]
            cut = shows == "beyond the disk's end" and any(
                t.offset <= s * SECTOR and t.iseq > w.iseq and t.iseq < c
                for t in self.truncates)
            if not cut:
                out[index] = (s, shows)
        return out

    def check(self, c, result):
        """The guest-level failures of an image read back at crash point c: [(kind, text)]."""
        failures = []
        if result["foreign_count"]:
            s, what, expected = result["foreign"][0]
            failures.append(("foreign", f"{result['foreign_count']} sector(s) hold data the "
                             f"guest never wrote there; first: sector {s} "
                             f"(offset {s * SECTOR:#x}) holds {what}, expected {expected}"))
        gf = self.flushed_before(c)
        # The size the last resize completed before that flush set (durable), or one a
        # resize issued after it set: growth and shrinking alike.
        durable = [t for t in self.truncates if t.cseq is not None and t.cseq < gf]
        base = max(durable, key=lambda t: t.cseq).offset if durable else self.initial_size
        sizes = {base} | {t.offset for t in self.truncates
                          if t.iseq < c and t not in durable}
        if result["size"] not in sizes:
            failures.append(("size", f"virtual size {result['size']:#x}, expected one of "
                             f"{sorted(hex(s) for s in sizes)}"))
        lost = self.not_cut_off(result["lost"], c)
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
