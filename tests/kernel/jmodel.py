"""The test oracle of DESIGN §1 for kernel tests: a reference model keyed by
journal sequence numbers, and the direct-I/O helpers that read devices.

A snapshot whose marker has seq M must equal every write with seq < M
applied in seq order, and nothing else.
"""

from __future__ import annotations

import mmap
import os
import random
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

SECTOR = 512


def pattern(write_id: int, length: int) -> bytes:
    """Data of a write, reproducible from its id alone (a crashed child
    process only has to report ids)."""
    return random.Random(write_id).randbytes(length)


def read_direct(path: str, offset: int, length: int) -> bytes:
    buf = mmap.mmap(-1, length)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        got = os.preadv(fd, [buf], offset)
        assert got == length, f"short read of {path}: {got} of {length}"
        return bytes(buf)
    finally:
        os.close(fd)


class Model:
    def __init__(self, sizes: dict[int, int]) -> None:
        self.sizes = sizes  # volume id -> bytes
        self.writes: list[tuple[int, int, int, bytes]] = []  # (seq, vol, offset, data)
        self._lock = threading.Lock()

    def record(self, seq: int, vol: int, offset: int, data: bytes) -> None:
        with self._lock:
            self.writes.append((seq, vol, offset, data))

    def state(self, vol: int, before_seq: int | None = None) -> bytearray:
        """The volume after every write with seq < before_seq (all if None)."""
        img = bytearray(self.sizes[vol])
        with self._lock:
            writes = sorted(w for w in self.writes if w[1] == vol)
        for seq, _, off, data in writes:
            if before_seq is not None and seq >= before_seq:
                break
            img[off : off + len(data)] = data
        return img


def first_difference(a: bytes | bytearray, b: bytes | bytearray) -> str:
    """Where two images differ, for a readable assertion message."""
    if len(a) != len(b):
        return f"lengths {len(a)} != {len(b)}"
    for off in range(0, len(a), SECTOR):
        if a[off : off + SECTOR] != b[off : off + SECTOR]:
            n = sum(1 for o in range(0, len(a), SECTOR) if a[o : o + SECTOR] != b[o : o + SECTOR])
            return f"{n} sector(s) differ, the first at byte {off}"
    return "equal"


class Mask:
    """Sectors the oracle cannot know after a crash: those touched by writes
    that were issued but not acknowledged (they may or may not have landed,
    and may sit on either side of a marker). Comparisons zero them on both
    sides."""

    def __init__(self, sizes: dict[int, int]) -> None:
        self.bits = {vol: bytearray(size // SECTOR) for vol, size in sizes.items()}

    def add(self, vol: int, offset: int, length: int) -> None:
        first, n = offset // SECTOR, -(-length // SECTOR)
        self.bits[vol][first : first + n] = b"\x01" * n

    def sectors(self, vol: int) -> int:
        return sum(self.bits[vol])

    def apply(self, vol: int, img: bytes | bytearray) -> bytes:
        out = bytearray(img)
        bits = self.bits[vol]
        i = bits.find(1)
        while i >= 0:
            j = bits.find(0, i)
            j = len(bits) if j < 0 else j
            out[i * SECTOR : j * SECTOR] = bytes((j - i) * SECTOR)
            i = bits.find(1, j)
        return bytes(out)


# -- dm-log-writes ------------------------------------------------------------------
#
# The log device's format, from drivers/md/dm-log-writes.c (and
# Documentation/admin-guide/device-mapper/log-writes.rst): at byte 0 the
# super {le64 magic, le64 version, le64 nr_entries, le32 sectorsize}; from
# byte ``sectorsize`` on, nr_entries entries, each a header sector
# {le64 sector, le64 nr_sectors, le64 flags, le64 data_len} followed by
# nr_sectors * sectorsize bytes of data (none for a DISCARD). A MARK's
# label (data_len bytes) sits in its header sector right after the header.
# Sectors and nr_sectors count the data device's logical blocks
# (sectorsize bytes). The super's nr_entries is rewritten at every FUA and
# MARK entry; the target's destructor logs the remaining completed writes
# and a last mark "dm-log-writes-end".

LOG_WRITES_MAGIC = 0x6A736677736872
LOG_WRITES_VERSION = 1
LOG_FLUSH, LOG_FUA, LOG_DISCARD, LOG_MARK, LOG_METADATA = 1, 2, 4, 8, 16
LOG_END_MARK = "dm-log-writes-end"
_LW_SUPER = struct.Struct("<QQQI")
_LW_ENTRY = struct.Struct("<QQQQ")


@dataclass(frozen=True)
class LogEntry:
    index: int
    offset: int  # byte offset on the data device
    length: int  # bytes written (0 for a flush or mark)
    flags: int
    data_at: int  # byte offset of the data in the log
    mark: str | None


class LogWritesLog:
    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            magic, version, self.nr_entries, self.sectorsize = _LW_SUPER.unpack(
                f.read(_LW_SUPER.size)
            )
        assert magic == LOG_WRITES_MAGIC, f"{path}: no log-writes super (magic {magic:#x})"
        assert version == LOG_WRITES_VERSION, f"{path}: log-writes version {version}"
        assert self.sectorsize in (512, 1024, 2048, 4096), self.sectorsize

    def entries(self) -> Iterator[LogEntry]:
        ss = self.sectorsize
        with open(self.path, "rb") as f:
            pos = ss
            for i in range(self.nr_entries):
                f.seek(pos)
                head = f.read(ss)
                assert len(head) == ss, f"log ends inside entry {i} of {self.nr_entries}"
                sector, nr_sectors, flags, data_len = _LW_ENTRY.unpack_from(head)
                mark = None
                if flags & LOG_MARK:
                    assert data_len <= ss - _LW_ENTRY.size, f"entry {i}: mark of {data_len} bytes"
                    mark = head[_LW_ENTRY.size : _LW_ENTRY.size + data_len].decode()
                yield LogEntry(i, sector * ss, nr_sectors * ss, flags, pos + ss, mark)
                pos += ss
                if not flags & LOG_DISCARD:
                    pos += nr_sectors * ss

    def replay(self, dest_fd: int) -> Iterator[LogEntry]:
        """Apply the log in order to ``dest_fd`` (a file standing for the data
        device); yields every MARK once everything logged before it is
        applied (and before anything after it)."""
        with open(self.path, "rb") as f:
            for e in self.entries():
                if e.flags & LOG_DISCARD:
                    os.pwrite(dest_fd, bytes(e.length), e.offset)  # loop punches holes: zeros
                elif e.length:
                    f.seek(e.data_at)
                    data = f.read(e.length)
                    assert len(data) == e.length, f"entry {e.index}: short data"
                    os.pwrite(dest_fd, data, e.offset)
                if e.mark is not None:
                    yield e
