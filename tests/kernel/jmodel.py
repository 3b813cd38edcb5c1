"""The test oracle of DESIGN §1 for kernel tests: a reference model keyed by
journal sequence numbers, and the direct-I/O helpers that read devices.

A snapshot whose marker has seq M must equal every write with seq < M
applied in seq order, and nothing else.
"""

from __future__ import annotations

import mmap
import os
import random
import threading

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
