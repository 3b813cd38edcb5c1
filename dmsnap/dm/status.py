"""Parsed device-mapper STATUSTYPE_INFO status (what ``dmsetup status`` shows).

:func:`parse_status` turns one target's status text into a typed frozen
dataclass. Targets report failure states as bare words ("Fail", "Invalid",
...), so those get types of their own and callers can ``isinstance`` on the
healthy type. Unknown target types come back as :class:`RawStatus`; text that
does not fit the known format raises :class:`StatusParseError`.

Formats follow the 6.1 kernel; real lines are in tests/host/data/status_lines.txt.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

__all__ = [
    "ErrorStatus",
    "FlakeyStatus",
    "LinearStatus",
    "LogWritesStatus",
    "RawStatus",
    "SnapshotInvalid",
    "SnapshotMergeFailed",
    "SnapshotMergeStatus",
    "SnapshotOriginStatus",
    "SnapshotOverflow",
    "SnapshotStatus",
    "SnapshotUnknown",
    "StatusParseError",
    "TargetStatus",
    "ThinFailed",
    "ThinPoolFailed",
    "ThinPoolStatus",
    "ThinStatus",
    "WritecacheStatus",
    "ZeroStatus",
    "parse_status",
]

_UINT = re.compile(r"[0-9]+")
_INT = re.compile(r"-?[0-9]+")


class StatusParseError(ValueError):
    """A status line does not have the format its target type prints."""

    def __init__(self, target_type: str, params: str, problem: str) -> None:
        self.target_type = target_type
        self.params = params
        super().__init__(f"{target_type} status {params!r}: {problem}")


class TargetStatus:
    """Base of every parsed status."""

    __slots__ = ()


def _uint(tt: str, params: str, word: str, what: str) -> int:
    # int() alone would also accept "+1", " 1" and "1_0".
    if not _UINT.fullmatch(word):
        raise StatusParseError(tt, params, f"{what} {word!r} is not a decimal number")
    return int(word)


def _ratio(tt: str, params: str, word: str, what: str) -> tuple[int, int]:
    used, sep, total = word.partition("/")
    if not sep:
        raise StatusParseError(tt, params, f"{what} {word!r} is not used/total")
    return _uint(tt, params, used, f"used {what}"), _uint(tt, params, total, f"total {what}")


def _fraction(used: int, total: int) -> float:
    # A pool whose data device is smaller than one block reports 0/0.
    return used / total if total else 0.0


# -- targets without info status ----------------------------------------------------------


@dataclass(frozen=True)
class LinearStatus(TargetStatus):
    target_type: ClassVar[str] = "linear"


@dataclass(frozen=True)
class ZeroStatus(TargetStatus):
    target_type: ClassVar[str] = "zero"


@dataclass(frozen=True)
class ErrorStatus(TargetStatus):
    target_type: ClassVar[str] = "error"


@dataclass(frozen=True)
class SnapshotOriginStatus(TargetStatus):
    target_type: ClassVar[str] = "snapshot-origin"


@dataclass(frozen=True)
class FlakeyStatus(TargetStatus):
    target_type: ClassVar[str] = "flakey"


_EMPTY: dict[str, type[TargetStatus]] = {
    c.target_type: c
    for c in (LinearStatus, ZeroStatus, ErrorStatus, SnapshotOriginStatus, FlakeyStatus)
}


# -- writecache ----------------------------------------------------------------------------

_WC_COUNTERS = (
    "reads",
    "read_hits",
    "writes",
    "write_hits_uncommitted",
    "write_hits_committed",
    "writes_around",
    "writes_allocate",
    "writes_blocked_on_freelist",
    "flushes",
    "discards",
)


@dataclass(frozen=True)
class WritecacheStatus(TargetStatus):
    """Blocks are cache blocks (the table's block_size). The counters exist
    since writecache 1.5 (5.15); older kernels print only the first four."""

    target_type: ClassVar[str] = "writecache"
    error: int  # 0, or the negative errno the cache has latched
    total_blocks: int
    free_blocks: int
    writeback_blocks: int
    reads: int | None = None
    read_hits: int | None = None
    writes: int | None = None
    write_hits_uncommitted: int | None = None
    write_hits_committed: int | None = None
    writes_around: int | None = None
    writes_allocate: int | None = None
    writes_blocked_on_freelist: int | None = None
    flushes: int | None = None
    discards: int | None = None

    @property
    def has_error(self) -> bool:
        return self.error != 0

    @property
    def dirty_blocks(self) -> int:
        """Blocks holding data not yet written back (including those in flight)."""
        return self.total_blocks - self.free_blocks

    @property
    def used_fraction(self) -> float:
        return _fraction(self.dirty_blocks, self.total_blocks)


def _writecache(params: str) -> WritecacheStatus:
    tt = "writecache"
    w = params.split()
    if len(w) not in (4, 4 + len(_WC_COUNTERS)):
        raise StatusParseError(tt, params, f"expected 4 or 14 fields, got {len(w)}")
    if not _INT.fullmatch(w[0]):
        raise StatusParseError(tt, params, f"error {w[0]!r} is not a number")
    nums = [_uint(tt, params, x, "field") for x in w[1:]]
    counters = dict(zip(_WC_COUNTERS, nums[3:], strict=False))
    s = WritecacheStatus(int(w[0]), nums[0], nums[1], nums[2], **counters)
    if s.free_blocks > s.total_blocks:
        raise StatusParseError(tt, params, "more free blocks than blocks")
    return s


# -- thin-pool / thin ----------------------------------------------------------------------

PoolMode = Literal["rw", "ro", "out_of_data_space"]
DiscardMode = Literal["passdown", "no_passdown", "ignore"]
NoSpacePolicy = Literal["error", "queue"]
_DISCARD: dict[str, DiscardMode] = {
    "discard_passdown": "passdown",
    "no_discard_passdown": "no_passdown",
    "ignore_discard": "ignore",
}
_NO_SPACE: dict[str, NoSpacePolicy] = {
    "error_if_no_space": "error",
    "queue_if_no_space": "queue",
}
_POOL_MODES: tuple[PoolMode, ...] = ("rw", "ro", "out_of_data_space")


@dataclass(frozen=True)
class ThinPoolStatus(TargetStatus):
    """Metadata blocks are 4 KiB; data blocks are the pool's data_block_size."""

    target_type: ClassVar[str] = "thin-pool"
    transaction_id: int
    used_metadata_blocks: int
    total_metadata_blocks: int
    used_data_blocks: int
    total_data_blocks: int
    held_root: int | None  # metadata snapshot root, None when none is held
    mode: PoolMode
    discard: DiscardMode
    no_space: NoSpacePolicy
    needs_check: bool
    metadata_low_watermark: int | None = None  # blocks; printed since 4.19

    @property
    def discard_passdown(self) -> bool:
        return self.discard == "passdown"

    @property
    def free_data_blocks(self) -> int:
        return self.total_data_blocks - self.used_data_blocks

    @property
    def data_used_fraction(self) -> float:
        return _fraction(self.used_data_blocks, self.total_data_blocks)

    @property
    def metadata_used_fraction(self) -> float:
        return _fraction(self.used_metadata_blocks, self.total_metadata_blocks)


@dataclass(frozen=True)
class ThinPoolFailed(TargetStatus):
    """``Fail``: the pool is in fail mode. ``Error``: reading the metadata
    for the status itself failed (seen just before a pool fails)."""

    target_type: ClassVar[str] = "thin-pool"
    reason: Literal["Fail", "Error"]


def _thin_pool(params: str) -> TargetStatus:
    tt = "thin-pool"
    w = params.split()
    if len(w) == 1 and w[0] in ("Fail", "Error"):
        return ThinPoolFailed(w[0])  # type: ignore[arg-type]
    if len(w) not in (8, 9):
        raise StatusParseError(tt, params, f"expected 8 or 9 fields, got {len(w)}")
    txid = _uint(tt, params, w[0], "transaction id")
    used_meta, total_meta = _ratio(tt, params, w[1], "metadata blocks")
    used_data, total_data = _ratio(tt, params, w[2], "data blocks")
    held = None if w[3] == "-" else _uint(tt, params, w[3], "held root")
    if w[4] not in _POOL_MODES:
        raise StatusParseError(tt, params, f"unknown mode {w[4]!r}")
    if w[5] not in _DISCARD:
        raise StatusParseError(tt, params, f"unknown discard mode {w[5]!r}")
    if w[6] not in _NO_SPACE:
        raise StatusParseError(tt, params, f"unknown no-space policy {w[6]!r}")
    if w[7] not in ("-", "needs_check"):
        raise StatusParseError(tt, params, f"unknown check flag {w[7]!r}")
    lwm = _uint(tt, params, w[8], "metadata low watermark") if len(w) == 9 else None
    return ThinPoolStatus(
        txid,
        used_meta,
        total_meta,
        used_data,
        total_data,
        held,
        w[4],  # type: ignore[arg-type]
        _DISCARD[w[5]],
        _NO_SPACE[w[6]],
        w[7] == "needs_check",
        lwm,
    )


@dataclass(frozen=True)
class ThinStatus(TargetStatus):
    target_type: ClassVar[str] = "thin"
    mapped_sectors: int
    highest_mapped_sector: int | None  # None when nothing is mapped


@dataclass(frozen=True)
class ThinFailed(TargetStatus):
    """``Fail``: the pool has failed; ``Error``: metadata lookup failed;
    ``-``: the thin device has no metadata handle."""

    target_type: ClassVar[str] = "thin"
    reason: Literal["Fail", "Error", "-"]


def _thin(params: str) -> TargetStatus:
    tt = "thin"
    w = params.split()
    if len(w) == 1 and w[0] in ("Fail", "Error", "-"):
        return ThinFailed(w[0])  # type: ignore[arg-type]
    if len(w) != 2:
        raise StatusParseError(tt, params, f"expected 2 fields, got {len(w)}")
    mapped = _uint(tt, params, w[0], "mapped sectors")
    highest = None if w[1] == "-" else _uint(tt, params, w[1], "highest mapped sector")
    return ThinStatus(mapped, highest)


# -- snapshots -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotStatus(TargetStatus):
    """Sectors of the COW device: allocated includes the metadata."""

    target_type: ClassVar[str] = "snapshot"
    allocated_sectors: int
    total_sectors: int
    metadata_sectors: int

    @property
    def free_sectors(self) -> int:
        return self.total_sectors - self.allocated_sectors

    @property
    def used_fraction(self) -> float:
        return _fraction(self.allocated_sectors, self.total_sectors)


@dataclass(frozen=True)
class SnapshotMergeStatus(SnapshotStatus):
    target_type: ClassVar[str] = "snapshot-merge"

    @property
    def merge_complete(self) -> bool:
        # Merged chunks are freed; when only metadata is left, merging is done.
        return self.allocated_sectors == self.metadata_sectors


@dataclass(frozen=True)
class SnapshotInvalid(TargetStatus):
    """The snapshot was dropped (e.g. its COW filled up from origin writes)."""


@dataclass(frozen=True)
class SnapshotOverflow(TargetStatus):
    """A PO snapshot refused a write to itself because its COW is full;
    the snapshot's existing contents are still valid."""


@dataclass(frozen=True)
class SnapshotMergeFailed(TargetStatus):
    pass


@dataclass(frozen=True)
class SnapshotUnknown(TargetStatus):
    """The exception store cannot report usage."""


_SNAP_WORDS: dict[str, Callable[[], TargetStatus]] = {
    "Invalid": SnapshotInvalid,
    "Overflow": SnapshotOverflow,
    "Merge failed": SnapshotMergeFailed,
    "Unknown": SnapshotUnknown,
}


def _snapshot_of(cls: type[SnapshotStatus]) -> Callable[[str], TargetStatus]:
    def parse(params: str) -> TargetStatus:
        tt = cls.target_type
        text = " ".join(params.split())
        if text in _SNAP_WORDS:
            return _SNAP_WORDS[text]()
        w = text.split()
        if len(w) != 2:
            raise StatusParseError(tt, params, "expected 'allocated/total metadata'")
        alloc, total = _ratio(tt, params, w[0], "sectors")
        return cls(alloc, total, _uint(tt, params, w[1], "metadata sectors"))

    return parse


# -- log-writes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LogWritesStatus(TargetStatus):
    target_type: ClassVar[str] = "log-writes"
    logged_entries: int
    highest_allocated_sector: int  # on the log device
    logging_disabled: bool = False  # set after a log write failed


def _log_writes(params: str) -> LogWritesStatus:
    tt = "log-writes"
    w = params.split()
    if len(w) not in (2, 3) or (len(w) == 3 and w[2] != "logging_disabled"):
        raise StatusParseError(tt, params, "expected 'entries sector [logging_disabled]'")
    entries = _uint(tt, params, w[0], "logged entries")
    # next_sector - 1 is printed unsigned, so a fresh log shows 0, never -1.
    return LogWritesStatus(entries, _uint(tt, params, w[1], "highest sector"), len(w) == 3)


# -- dispatch ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawStatus(TargetStatus):
    """A target type this module does not know."""

    target_type: str
    params: str


_PARSERS: dict[str, Callable[[str], TargetStatus]] = {
    "writecache": _writecache,
    "thin-pool": _thin_pool,
    "thin": _thin,
    "snapshot": _snapshot_of(SnapshotStatus),
    "snapshot-merge": _snapshot_of(SnapshotMergeStatus),
    "log-writes": _log_writes,
}


def parse_status(target_type: str, params: str) -> TargetStatus:
    """Parse one target's INFO status text (what follows the type)."""
    empty = _EMPTY.get(target_type)
    if empty is not None:
        if params.strip():
            raise StatusParseError(target_type, params, "expected no status")
        return empty()
    parser = _PARSERS.get(target_type)
    if parser is None:
        return RawStatus(target_type, params)
    return parser(params)
