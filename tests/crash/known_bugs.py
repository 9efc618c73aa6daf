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


# Fixed, with an engine or glue test each:
# - KB1 (counted clusters past the end of the file refused allocation):
#   tests/engine_crash_regressions.rs, kb1_*;
# - KB2 (refcount table entries of new blocks written unordered):
#   tests/engine_crash_regressions.rs, kb2_*;
# - KB3 (ordered mode: a direct write in flight across the writer's sync stayed unsynced):
#   src/glue/file.rs, `direct_in_flight`; the concurrent workload in every quick run.
KNOWN_BUGS = []


def explain(kind, text, image, state):
    """The id of the known bug that explains this failure, or None. `image`: the results of
    the image's checks; `state`: {"mode", "unsynced_across_flush": [writes]}."""
    for bug in KNOWN_BUGS:
        if bug["match"](kind, text, image, state):
            return bug["id"]
    return None
