"""Faults below the stack, for the kernel tests and tools/torture: one dm
device over a backing device whose table a test switches between passing
everything through and misbehaving (dm-flakey's error_writes, drop_writes
and corrupt_bio_byte; bad sectors; the whole device gone), and what the
power-cut tests share. The one place these helpers live (issue 18)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

from dmsnap.dm import DmError, Role, make_uuid
from dmsnap.dm import targets as t
from dmsnap.dm.targets import Table

SECTOR = 512
FOREVER = 3600  # flakey intervals, seconds: "always" for a test's span


def sectors_of(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END) // SECTOR
    finally:
        os.close(fd)


class FaultDevice:
    """A dm device over ``dev`` (anything with ``devno`` and ``path``) that
    passes everything through until the test switches it.

    dm-dust is not built in Debian's 6.1 kernel (CONFIG_DM_DUST is off), so
    bad sectors are a table of linear segments with ``error`` segments at
    the bad ranges: reads and writes there fail with EIO (dm-dust fails
    reads only, and a write clears its bad block: ours stay bad)."""

    def __init__(self, dm, name: str, dev) -> None:
        self.dm, self.name, self.dev = dm, name, dev
        self.sectors = sectors_of(dev.path)
        # up_interval FOREVER / down 0: always up; 0 / FOREVER: always down.
        self.up = Table.single(self.sectors, t.Flakey(dev.devno, 0, FOREVER, 0))
        self.down = self.flakey(drop_writes=True)  # a power cut (see cut_power)
        dm.create(name, make_uuid(Role.TEST, name), self.up)

    @property
    def path(self) -> str:
        return f"/dev/mapper/{self.name}"

    def flakey(self, **features: object) -> Table:
        """A table in which the device is always "down" with ``features``."""
        return Table.single(
            self.sectors,
            t.Flakey(self.dev.devno, 0, 0, FOREVER, **features),  # type: ignore[arg-type]
        )

    def switch(self, table: Table) -> None:
        """The new table at once: in-flight I/O completes, queued I/O goes
        to the new one."""
        self.dm.load(self.name, table)
        self.dm.suspend(self.name, lockfs=False)
        self.dm.resume(self.name)

    def pass_through(self) -> None:
        self.switch(self.up)

    def fail_writes(self, on: bool = True) -> None:
        self.switch(self.flakey(error_writes=True) if on else self.up)

    def drop_writes(self) -> None:
        """Writes are acknowledged and thrown away (a lying cache)."""
        self.switch(self.down)

    def corrupt_reads(self, nth_byte: int = 1, value: int = 0xA5) -> None:
        """Every read comes back with byte ``nth_byte`` of each bio set to
        ``value``: the device returns garbage."""
        self.switch(self.flakey(corrupt_bio_byte=t.CorruptBioByte(nth_byte, "r", value)))

    def bad_sectors(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Sectors ``[start, start + count)`` fail every read and write."""
        lines: list[tuple[int, t.Target]] = []
        at = 0
        for start, count in sorted(ranges):
            if start > at:
                lines.append((start - at, t.Linear(self.dev.devno, at)))
            lines.append((count, t.Error()))
            at = start + count
        if at < self.sectors:
            lines.append((self.sectors - at, t.Linear(self.dev.devno, at)))
        self.switch(Table.of(lines))

    def vanish(self) -> None:
        """The device is gone: what ``dmsetup remove --force`` does to a
        device that is held open (its table becomes ``error``: every I/O
        fails, as for a pulled disk), which a journal or thin pool on it
        always does."""
        self.switch(Table.single(self.sectors, t.Error()))

    def remove(self) -> None:
        with contextlib.suppress(DmError):
            if self.dm.exists(self.name):
                self.dm.remove(self.name)


def cut_power(dm, devices: list[FaultDevice]) -> None:
    """The devices start dropping writes at one instant: suspend them all
    (new writes queue; data first, so the flusher cannot complete a write
    whose record the journal then checkpoints), then resume them all with
    drop_writes (the queued writes are dropped too)."""
    for d in devices:
        dm.load(d.name, d.down)
    for d in devices:
        dm.suspend(d.name, lockfs=False)
    for d in devices:
        dm.resume(d.name)
    for d in devices:
        tbl = dm.table(d.name)
        assert tbl == d.down, f"{d.name} is not dropping writes: {tbl}"


def remove_unheld(dm, prefixes: tuple[str, ...]) -> list[str]:
    """Remove every dm device whose name starts with one of ``prefixes``,
    top-down: repeatedly the ones nothing holds open. Returns the names
    removed; raises if some stay held."""
    left = {e.name for e in dm.list_devices() if e.name.startswith(prefixes)}
    removed = []
    while left:
        progress = False
        for name in sorted(left):
            try:
                if dm.info(name).open_count:
                    continue
                dm.remove(name)
            except DmError as e:
                if not e.not_found:
                    raise
            left.discard(name)
            removed.append(name)
            progress = True
        if not progress:
            raise RuntimeError(f"devices still held open: {sorted(left)}")
    return removed


def remove_pool_stack(dm, pool: str) -> list[str]:
    """Remove every dm device of ``pool`` (names ``dmsnap-POOL-*``)."""
    return remove_unheld(dm, (f"dmsnap-{pool}-",))
