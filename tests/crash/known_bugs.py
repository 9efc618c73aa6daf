"""qcow2b bugs this harness found and that are not fixed yet. A crash state whose every failure
one of these explains is counted and printed as "known", not as a failure (`--strict` counts
them as failures). Each match is narrow: it names the exact symptom, so that a new failure
(the mutation test's, or a new bug's) is never taken for a known one. Remove an entry once
its bug is fixed: the summary says when an entry matched nothing.
"""

import re
import struct

_ERROR = re.compile(r"^ERROR (.*)$", re.M)
_REFCOUNT_ZERO = re.compile(r"^cluster (\d+) refcount=0 reference=1$")


def refblocks_counted_zero(check_text, image_path):
    """Whether every error `qemu-img check` reported is "cluster N refcount=0 reference=1"
    for a cluster that holds a refcount block named by the refcount table (the symptom of
    KB2)."""
    errors = _ERROR.findall(check_text)
    if not errors:
        return False
    clusters = []
    for e in errors:
        m = _REFCOUNT_ZERO.match(e.strip())
        if not m:
            return False
        clusters.append(int(m.group(1)))
    with open(image_path, "rb") as f:
        head = f.read(72)
        cluster_bits = struct.unpack(">I", head[20:24])[0]
        table_offset, table_clusters = struct.unpack(">QI", head[48:60])
        f.seek(table_offset)
        table = f.read(table_clusters << cluster_bits)
    blocks = {struct.unpack_from(">Q", table, i)[0] >> cluster_bits
              for i in range(0, len(table) - 7, 8)}
    blocks.discard(0)
    return all(c in blocks for c in clusters)


KNOWN_BUGS = [
    {
        "id": "KB1-refcounts-past-eof",
        "summary": "after a crash that kept refcount increments of clusters past the end of "
                   "the file (the zero reserve's refcount block reached the file, the sector "
                   "that extends the file over the reserve did not; QEMU's qcow2 leaves such "
                   "images too), qcow2b's allocator refuses every allocating write: "
                   "'host cluster N past the end of the file has a refcount' (EIO); "
                   "qemu-img check finds nothing to repair",
        "match": lambda kind, text, image, state: kind == "open-rw"
        and text.startswith("qcow2b ")
        and "past the end of the file has a refcount" in text,
    },
    {
        "id": "KB2-reftable-entries-unordered",
        "summary": "write_back stage 2 writes the refcount table entries of several new "
                   "refcount blocks as separate 8-byte writes with no ordering point between "
                   "them, while the refcounts of those blocks' own clusters live in one of "
                   "them (the self-describing block allocated last); a crash that keeps the "
                   "entries naming the other blocks but not the entry naming that one leaves "
                   "referenced refcount blocks counted 0 (qemu-img check: "
                   "'ERROR cluster N refcount=0 reference=1', corruption)",
        "match": lambda kind, text, image, state: image.get("refblocks_counted_zero", False)
        and (kind == "corrupt" or (kind == "open-rw" and "refcount block" in text)),
    },
    {
        "id": "KB3-ordered-direct-write-in-flight",
        "summary": "ordered mode (src/glue/file.rs): a write that goes straight to the file "
                   "(nothing buffered) marks direct_unsynced when it is issued; when a barrier "
                   "makes the writer sync the direct writes, the writer clears the mark after "
                   "its fdatasync even if a direct write was still in flight when that sync "
                   "was issued. That write (e.g. a copy-on-write cluster of a request that "
                   "arrived after a barrier write) is then neither synced nor ordered: the "
                   "next ordering point (write_back stage 3, OrderedFile::barrier) finds "
                   "nothing unsynced and nothing buffered and does nothing, and the L2 entry "
                   "naming the cluster goes straight to the file in the same interval. A "
                   "crash keeps the entry and loses the data: the guest sees zeros in place "
                   "of backing (or old) data it never overwrote",
        "match": lambda kind, text, image, state: state["mode"] == "ordered"
        and kind in ("foreign", "flushed", "order") and bool(state["unsynced_across_flush"]),
    },
]


def explain(kind, text, image, state):
    """The id of the known bug that explains this failure, or None. `image`: the results of
    the image's checks; `state`: {"mode", "unsynced_across_flush": [writes]}."""
    for bug in KNOWN_BUGS:
        if bug["match"](kind, text, image, state):
            return bug["id"]
    return None
