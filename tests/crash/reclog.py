"""Reads the logs of the qcow2b-recorder filter (src/glue/recorder.rs, format version 1).

A log is the magic b"QRECLOG1", then issue records
    b"I" seq:u64 op:u8 flags:u32 offset:u64 len:u64 [len bytes if op == b"W"]
and completion records
    b"C" seq:u64 issue_seq:u64 ret:i32
all little-endian. `seq` is one counter shared by every recorder of the process, so the log
above a format node (the guest's requests) and the one below it (what reached the image
file) interleave into one order.
"""

import struct

MAGIC = b"QRECLOG1"
_ISSUE = struct.Struct("<QBIQQ")
_COMPLETE = struct.Struct("<QQi")

# BdrvRequestFlags (include/block/block-common.h; BDRV_REQ_BARRIER from qemu-patches/0004).
REQ_FUA = 0x10
REQ_BARRIER = 0x800

WRITE, ZEROES, DISCARD, FLUSH, BARRIER, TRUNCATE = "W", "Z", "D", "F", "B", "T"


class Op:
    """One recorded request: its kind, issue and completion numbers, and what it did."""


    def __init__(self, index, kind, iseq, flags, offset, length, data):
        self.index = index
        self.kind = kind
        self.iseq = iseq
        self.cseq = None  # no completion record: still in flight when the log ended
        self.flags = flags
        self.offset = offset
        self.length = length
        self.data = data
        self.ret = None

    @property
    def ok(self):
        return self.ret is not None and self.ret >= 0

    @property
    def end(self):
        return self.offset + self.length

    def is_write(self):
        return self.kind in (WRITE, ZEROES, DISCARD)

    def content(self):
        """The bytes the request leaves in its range (a discard: zeros, one of its outcomes)."""
        if self.kind == WRITE:
            return self.data
        return bytes(self.length)

    def describe(self):
        what = {WRITE: "write", ZEROES: "write_zeroes", DISCARD: "discard", FLUSH: "flush",
                BARRIER: "barrier", TRUNCATE: "truncate"}[self.kind]
        extra = ""
        if self.is_write():
            extra = f" {self.offset:#x}+{self.length:#x}"
        elif self.kind == TRUNCATE:
            extra = f" to {self.offset:#x}"
        if self.flags & REQ_BARRIER:
            extra += " (barrier flag)"
        if self.flags & REQ_FUA:
            extra += " (FUA)"
        done = "never completed" if self.cseq is None else f"done@{self.cseq}"
        return f"#{self.index} {what}{extra} issued@{self.iseq} {done}"


def read_log(path):
    """The requests of one log, in issue order."""
    with open(path, "rb") as f:
        buf = f.read()
    if buf[:8] != MAGIC:
        raise ValueError(f"{path}: not a qcow2b-recorder log")
    ops, by_seq, pos = [], {}, 8
    while pos < len(buf):
        tag = buf[pos:pos + 1]
        pos += 1
        if tag == b"I":
            if pos + _ISSUE.size > len(buf):
                raise ValueError(f"{path}: truncated issue record at {pos}")
            seq, code, flags, offset, length = _ISSUE.unpack_from(buf, pos)
            pos += _ISSUE.size
            data = None
            kind = chr(code)
            if kind == WRITE:
                data = buf[pos:pos + length]
                if len(data) != length:
                    raise ValueError(f"{path}: truncated write data at {pos}")
                pos += length
            op = Op(len(ops), kind, seq, flags, offset, length, data)
            ops.append(op)
            by_seq[seq] = op
        elif tag == b"C":
            if pos + _COMPLETE.size > len(buf):
                raise ValueError(f"{path}: truncated completion record at {pos}")
            seq, issue_seq, ret = _COMPLETE.unpack_from(buf, pos)
            pos += _COMPLETE.size
            op = by_seq.get(issue_seq)
            if op is None:
                raise ValueError(f"{path}: completion of unknown request {issue_seq}")
            op.cseq, op.ret = seq, ret
        else:
            raise ValueError(f"{path}: unknown record tag {tag!r} at {pos - 1}")
    return ops
