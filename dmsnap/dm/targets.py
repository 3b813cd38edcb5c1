"""Typed device-mapper target tables.

Each target is a frozen dataclass whose fields are validated at construction,
so a bad table is refused with a clear :class:`TableError` before any ioctl.
``params()`` renders the parameter string exactly as the kernel renders its
own STATUSTYPE_TABLE (what ``dmsetup table`` shows, trailing spaces
included), so a live table can be compared with a wanted one as text, and
``from_params()`` parses that rendering back.

The reference kernel is Debian's 6.1 (real lines in
tests/host/data/status_lines.txt). The flakey features only newer kernels
know (error_reads, random_{read,write}_corrupt) are typed too, and rendered
the way those kernels render them.
"""

from __future__ import annotations

import os
import re
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, Self, get_args

__all__ = [
    "CorruptBioByte",
    "Error",
    "Flakey",
    "Linear",
    "LogWrites",
    "Snapshot",
    "SnapshotMerge",
    "SnapshotOrigin",
    "Table",
    "TableError",
    "TableLine",
    "Target",
    "Thin",
    "ThinPool",
    "Writecache",
    "Zero",
    "devno",
    "target_class",
    "target_types",
]

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
_DIGITS = re.compile(r"[0-9]+")
_DEVNO = re.compile(r"[0-9]+:[0-9]+")


class TableError(ValueError):
    """A table or target parameter is invalid; raised before any ioctl."""


def _err(where: str, fld: str, value: object, problem: str) -> TableError:
    return TableError(f"{where}: {fld} {value} {problem}")


# -- field checks ------------------------------------------------------------------------


def _check_int(where: str, fld: str, value: object, lo: int = 0, hi: int = U64_MAX) -> None:
    # bool is an int subclass; True as a sector count is always a bug.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _err(where, fld, repr(value), "is not an integer")
    if not lo <= value <= hi:
        raise _err(where, fld, value, f"is out of range {lo}..{hi}")


def _check_opt_int(where: str, fld: str, value: object, lo: int = 0, hi: int = U64_MAX) -> None:
    if value is not None:
        _check_int(where, fld, value, lo, hi)


def _check_bool(where: str, fld: str, value: object) -> None:
    if not isinstance(value, bool):
        raise _err(where, fld, repr(value), "is not a bool")


def _check_dev(where: str, fld: str, value: object) -> None:
    # The kernel takes "MAJ:MIN" or a path; anything else (a bare "loop0", a
    # name with spaces) would be misparsed or fail late inside dm_get_device.
    if not isinstance(value, str) or not (_DEVNO.fullmatch(value) or value.startswith("/")):
        raise _err(where, fld, repr(value), 'is not a "MAJ:MIN" device number or a path')
    if any(c.isspace() for c in value):
        raise _err(where, fld, repr(value), "contains whitespace")


def _check_choice(where: str, fld: str, value: object, choices: Iterable[str]) -> None:
    allowed = tuple(choices)
    if value not in allowed:
        raise _err(where, fld, repr(value), f"is not one of {', '.join(allowed)}")


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def devno(path_or_devno: str) -> str:
    """``"/dev/loop0"`` -> ``"7:0"``; a ``"MAJ:MIN"`` string passes through."""
    if _DEVNO.fullmatch(path_or_devno):
        return path_or_devno
    try:
        st = os.stat(path_or_devno)
    except OSError as e:
        raise TableError(f"device {path_or_devno}: {e.strerror}") from e
    if not stat.S_ISBLK(st.st_mode):
        raise TableError(f"device {path_or_devno} is not a block device")
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


# -- parsing helper ----------------------------------------------------------------------


class _Args:
    """Cursor over a parameter string's words; errors name the target and field."""

    def __init__(self, where: str, params: str) -> None:
        self.where = where
        self.words = params.split()
        self.pos = 0

    def left(self) -> int:
        return len(self.words) - self.pos

    def word(self, fld: str) -> str:
        if self.pos >= len(self.words):
            raise TableError(f"{self.where}: missing {fld}")
        w = self.words[self.pos]
        self.pos += 1
        return w

    def num(self, fld: str, lo: int = 0, hi: int = U64_MAX) -> int:
        w = self.word(fld)
        # int() would also take "+1", "-0" and "1_000"; the kernel's %u/%llu would not.
        if not _DIGITS.fullmatch(w):
            raise _err(self.where, fld, repr(w), "is not a decimal number")
        v = int(w)
        if not lo <= v <= hi:
            raise _err(self.where, fld, v, f"is out of range {lo}..{hi}")
        return v

    def count(self, fld: str) -> int:
        n = self.num(fld, 0, U32_MAX)
        if n > self.left():
            raise _err(self.where, fld, n, f"exceeds the {self.left()} words that follow")
        return n

    def end(self) -> None:
        if self.pos != len(self.words):
            extra = " ".join(self.words[self.pos :])
            raise TableError(f"{self.where}: unexpected trailing parameters {extra!r}")


# -- targets -----------------------------------------------------------------------------

_REGISTRY: dict[str, type[Target]] = {}


class Target(ABC):
    """One target's type and parameters (what follows ``start length`` on a line)."""

    target_type: ClassVar[str]
    # thin-pool must be the only target in its table (DM_TARGET_SINGLETON).
    singleton: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        tt = cls.__dict__.get("target_type")
        if isinstance(tt, str):
            _REGISTRY[tt] = cls

    @abstractmethod
    def params(self) -> str:
        """The kernel's parameter string for this target."""

    @classmethod
    @abstractmethod
    def from_params(cls, params: str) -> Self:
        """Parse the kernel's own rendering (``dmsetup table``)."""


def target_class(target_type: str) -> type[Target]:
    try:
        return _REGISTRY[target_type]
    except KeyError:
        raise TableError(f"unknown target type {target_type!r}") from None


def target_types() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


@dataclass(frozen=True)
class Linear(Target):
    target_type: ClassVar[str] = "linear"
    device: str
    offset: int = 0

    def __post_init__(self) -> None:
        _check_dev(self.target_type, "device", self.device)
        _check_int(self.target_type, "offset", self.offset)

    def params(self) -> str:
        return f"{self.device} {self.offset}"

    @classmethod
    def from_params(cls, params: str) -> Self:
        a = _Args(cls.target_type, params)
        obj = cls(a.word("device"), a.num("offset"))
        a.end()
        return obj


class _NoParams(Target):
    """Targets that take and print no parameters."""

    def params(self) -> str:
        return ""

    @classmethod
    def from_params(cls, params: str) -> Self:
        _Args(cls.target_type, params).end()
        return cls()


@dataclass(frozen=True)
class Zero(_NoParams):
    target_type: ClassVar[str] = "zero"


@dataclass(frozen=True)
class Error(_NoParams):
    target_type: ClassVar[str] = "error"


# writecache --------------------------------------------------------------------------------

WritecacheMode = Literal["p", "s"]
_WC_PAGE_SIZE = 4096  # the kernel caps block_size at PAGE_SIZE; 4 KiB on x86-64
_WC_DEFAULT_HIGH = 50  # used to check high >= low when only one watermark is given
_WC_DEFAULT_LOW = 45
# Optional arguments that take a value, with the kernel's upper bound
# (the times are milliseconds).
_WC_VALUED: dict[str, int] = {
    "start_sector": U64_MAX,
    "high_watermark": 100,
    "low_watermark": 100,
    "writeback_jobs": U32_MAX,
    "autocommit_blocks": U32_MAX,
    "autocommit_time": 3_600_000,
    "max_age": 86_400_000,
    "pause_writeback": 60_000,
}


@dataclass(frozen=True)
class Writecache(Target):
    """dm-writecache. Times are milliseconds, as on the table line.

    ``None`` means "not given" (the kernel default applies and nothing is
    rendered); ``fua`` is ``True`` for "fua", ``False`` for "nofua".
    """

    target_type: ClassVar[str] = "writecache"
    mode: WritecacheMode
    origin: str
    cache: str
    block_size: int = 4096
    start_sector: int | None = None
    high_watermark: int | None = None
    low_watermark: int | None = None
    writeback_jobs: int | None = None
    autocommit_blocks: int | None = None
    autocommit_time: int | None = None
    max_age: int | None = None
    cleaner: bool = False
    fua: bool | None = None
    metadata_only: bool = False
    pause_writeback: int | None = None

    def __post_init__(self) -> None:
        w = self.target_type
        _check_choice(w, "mode", self.mode, get_args(WritecacheMode))
        _check_dev(w, "origin", self.origin)
        _check_dev(w, "cache", self.cache)
        bs = self.block_size
        if (
            not isinstance(bs, int)
            or isinstance(bs, bool)
            or not _is_pow2(bs)
            or not 512 <= bs <= _WC_PAGE_SIZE
        ):
            raise _err(
                w, "block_size", bs, f"is not a power of two between 512 and {_WC_PAGE_SIZE}"
            )
        for name, hi in _WC_VALUED.items():
            _check_opt_int(w, name, getattr(self, name), 0, hi)
        for name in ("cleaner", "metadata_only"):
            _check_bool(w, name, getattr(self, name))
        if self.fua is not None:
            _check_bool(w, "fua", self.fua)
            if self.mode != "p":
                raise TableError(f"{w}: {'fua' if self.fua else 'nofua'} is only valid in p mode")
        if self.pause_writeback is not None and self.mode != "s":
            raise TableError(f"{w}: pause_writeback is only valid in s mode")
        high = _WC_DEFAULT_HIGH if self.high_watermark is None else self.high_watermark
        low = _WC_DEFAULT_LOW if self.low_watermark is None else self.low_watermark
        if high < low:
            raise TableError(
                f"{w}: high_watermark {high} is below low_watermark {low}"
                " (defaults are high 50, low 45)"
            )

    def _option_words(self) -> list[str]:
        # Same order as writecache_status() STATUSTYPE_TABLE.
        out: list[str] = []
        for name in (
            "start_sector",
            "high_watermark",
            "low_watermark",
            "writeback_jobs",
            "autocommit_blocks",
            "autocommit_time",
            "max_age",
        ):
            v = getattr(self, name)
            if v is not None:
                out += [name, str(v)]
        if self.cleaner:
            out.append("cleaner")
        if self.fua is not None:
            out.append("fua" if self.fua else "nofua")
        if self.metadata_only:
            out.append("metadata_only")
        if self.pause_writeback is not None:
            out += ["pause_writeback", str(self.pause_writeback)]
        return out

    def params(self) -> str:
        opts = self._option_words()
        head = f"{self.mode} {self.origin} {self.cache} {self.block_size} {len(opts)}"
        return " ".join([head, *opts])

    @classmethod
    def from_params(cls, params: str) -> Self:
        w = cls.target_type
        a = _Args(w, params)
        mode = a.word("mode").lower()
        _check_choice(w, "mode", mode, get_args(WritecacheMode))
        origin, cache = a.word("origin"), a.word("cache")
        block_size = a.num("block_size", 0, U32_MAX)
        n = a.count("optional argument count")
        stop = a.pos + n
        kw: dict[str, object] = {}

        def put(key: str, value: object, word: str) -> None:
            if key in kw:
                raise TableError(f"{w}: option {word} given twice")
            kw[key] = value

        while a.pos < stop:
            word = a.word("option").lower()
            if word in _WC_VALUED:
                if a.pos >= stop:
                    raise TableError(f"{w}: option {word} is missing its value")
                put(word, a.num(word, 0, _WC_VALUED[word]), word)
            elif word in ("cleaner", "metadata_only"):
                put(word, True, word)
            elif word in ("fua", "nofua"):
                put("fua", word == "fua", word)
            else:
                raise TableError(f"{w}: unknown option {word!r}")
        a.end()
        return cls(mode, origin, cache, block_size, **kw)  # type: ignore[arg-type]


# thin-pool / thin --------------------------------------------------------------------------

THIN_MIN_BLOCK = 128  # sectors (64 KiB)
THIN_MAX_BLOCK = 2_097_152  # sectors (1 GiB)
THIN_MAX_DEV_ID = 2**24 - 1
# Kernel's emit_flags() order.
_POOL_FEATURES = (
    "skip_block_zeroing",
    "ignore_discard",
    "no_discard_passdown",
    "read_only",
    "error_if_no_space",
)


@dataclass(frozen=True)
class ThinPool(Target):
    """dm-thin pool. ``data_block_size`` in sectors, ``low_water_mark`` in blocks."""

    target_type: ClassVar[str] = "thin-pool"
    singleton: ClassVar[bool] = True
    metadata_dev: str
    data_dev: str
    data_block_size: int
    low_water_mark: int = 0
    skip_block_zeroing: bool = False
    ignore_discard: bool = False
    no_discard_passdown: bool = False
    read_only: bool = False
    error_if_no_space: bool = False

    def __post_init__(self) -> None:
        w = self.target_type
        _check_dev(w, "metadata_dev", self.metadata_dev)
        _check_dev(w, "data_dev", self.data_dev)
        bs = self.data_block_size
        if (
            not isinstance(bs, int)
            or isinstance(bs, bool)
            or not THIN_MIN_BLOCK <= bs <= THIN_MAX_BLOCK
            or bs % THIN_MIN_BLOCK
        ):
            raise _err(
                w,
                "data_block_size",
                bs,
                f"is not a multiple of {THIN_MIN_BLOCK} sectors between "
                f"{THIN_MIN_BLOCK} and {THIN_MAX_BLOCK}",
            )
        _check_int(w, "low_water_mark", self.low_water_mark)
        for name in _POOL_FEATURES:
            _check_bool(w, name, getattr(self, name))

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(f for f in _POOL_FEATURES if getattr(self, f))

    def params(self) -> str:
        # The kernel ends every word with a space, so its line ends in one.
        feats = self.features
        head = f"{self.metadata_dev} {self.data_dev} {self.data_block_size} {self.low_water_mark}"
        return f"{head} {len(feats)} " + "".join(f"{f} " for f in feats)

    @classmethod
    def from_params(cls, params: str) -> Self:
        w = cls.target_type
        a = _Args(w, params)
        meta, data = a.word("metadata_dev"), a.word("data_dev")
        bs = a.num("data_block_size")
        lwm = a.num("low_water_mark")
        flags: dict[str, bool] = {}
        for _ in range(a.count("feature count")):
            word = a.word("feature").lower()
            if word not in _POOL_FEATURES:
                raise TableError(f"{w}: unknown feature {word!r}")
            if word in flags:
                raise TableError(f"{w}: feature {word} given twice")
            flags[word] = True
        a.end()
        return cls(meta, data, bs, lwm, **flags)


@dataclass(frozen=True)
class Thin(Target):
    target_type: ClassVar[str] = "thin"
    pool_dev: str
    dev_id: int
    external_origin: str | None = None

    def __post_init__(self) -> None:
        w = self.target_type
        _check_dev(w, "pool_dev", self.pool_dev)
        _check_int(w, "dev_id", self.dev_id, 0, THIN_MAX_DEV_ID)
        if self.external_origin is not None:
            _check_dev(w, "external_origin", self.external_origin)

    def params(self) -> str:
        s = f"{self.pool_dev} {self.dev_id}"
        return f"{s} {self.external_origin}" if self.external_origin else s

    @classmethod
    def from_params(cls, params: str) -> Self:
        w = cls.target_type
        if params.strip() in ("Fail", "Error", "-"):
            # thin_status() prints these instead of the table when the pool has
            # failed; there is no table to recover from them.
            raise TableError(f"{w}: kernel reported {params.strip()!r} instead of a table")
        a = _Args(w, params)
        pool, dev_id = a.word("pool_dev"), a.num("dev_id")
        origin = a.word("external_origin") if a.left() else None
        a.end()
        return cls(pool, dev_id, origin)


# snapshots ---------------------------------------------------------------------------------

Persistence = Literal["P", "N", "PO"]
SNAP_MAX_CHUNK = 2**21  # largest power of two under the kernel's INT_MAX >> SECTOR_SHIFT


@dataclass(frozen=True)
class SnapshotOrigin(Target):
    target_type: ClassVar[str] = "snapshot-origin"
    origin: str

    def __post_init__(self) -> None:
        _check_dev(self.target_type, "origin", self.origin)

    def params(self) -> str:
        return self.origin

    @classmethod
    def from_params(cls, params: str) -> Self:
        a = _Args(cls.target_type, params)
        obj = cls(a.word("origin"))
        a.end()
        return obj


@dataclass(frozen=True)
class Snapshot(Target):
    """``persistent``: P (persistent), N (transient), PO (persistent, overflow-aware)."""

    target_type: ClassVar[str] = "snapshot"
    origin: str
    cow: str
    persistent: Persistence
    chunk_size: int  # sectors

    def __post_init__(self) -> None:
        w = self.target_type
        _check_dev(w, "origin", self.origin)
        _check_dev(w, "cow", self.cow)
        _check_choice(w, "persistent", self.persistent, get_args(Persistence))
        cs = self.chunk_size
        if (
            not isinstance(cs, int)
            or isinstance(cs, bool)
            or not _is_pow2(cs)
            or cs > SNAP_MAX_CHUNK
        ):
            raise _err(w, "chunk_size", cs, f"is not a power of two between 1 and {SNAP_MAX_CHUNK}")

    def params(self) -> str:
        return f"{self.origin} {self.cow} {self.persistent} {self.chunk_size}"

    @classmethod
    def from_params(cls, params: str) -> Self:
        a = _Args(cls.target_type, params)
        origin, cow = a.word("origin"), a.word("cow")
        # The kernel upper-cases the store type letter.
        persistent = a.word("persistent").upper()
        _check_choice(cls.target_type, "persistent", persistent, get_args(Persistence))
        chunk = a.num("chunk_size", 0, U32_MAX)
        a.end()
        return cls(origin, cow, persistent, chunk)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SnapshotMerge(Snapshot):
    target_type: ClassVar[str] = "snapshot-merge"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.persistent == "N":
            # The transient store has no merge methods: the kernel accepts the
            # table and then refuses to merge.
            raise TableError(f"{self.target_type}: persistent N cannot be merged (transient store)")


# test targets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogWrites(Target):
    target_type: ClassVar[str] = "log-writes"
    dev: str
    log_dev: str

    def __post_init__(self) -> None:
        _check_dev(self.target_type, "dev", self.dev)
        _check_dev(self.target_type, "log_dev", self.log_dev)

    def params(self) -> str:
        return f"{self.dev} {self.log_dev}"

    @classmethod
    def from_params(cls, params: str) -> Self:
        a = _Args(cls.target_type, params)
        obj = cls(a.word("dev"), a.word("log_dev"))
        a.end()
        return obj


CorruptDirection = Literal["r", "w"]
FLAKEY_PROBABILITY_BASE = 1_000_000_000  # random_*_corrupt is per 10^9 bios


@dataclass(frozen=True)
class CorruptBioByte:
    """flakey ``corrupt_bio_byte <nth_byte> <r|w> <value> <flags>``."""

    nth_byte: int  # 1-based
    direction: CorruptDirection
    value: int
    flags: int = 0  # only bios with all these bi_opf bits; 0 = all

    def __post_init__(self) -> None:
        w = "flakey"
        _check_int(w, "corrupt_bio_byte nth_byte", self.nth_byte, 1, U32_MAX)
        _check_choice(w, "corrupt_bio_byte direction", self.direction, get_args(CorruptDirection))
        _check_int(w, "corrupt_bio_byte value", self.value, 0, 255)
        _check_int(w, "corrupt_bio_byte flags", self.flags, 0, U32_MAX)

    def words(self) -> list[str]:
        return [
            "corrupt_bio_byte",
            str(self.nth_byte),
            self.direction,
            str(self.value),
            str(self.flags),
        ]


@dataclass(frozen=True)
class Flakey(Target):
    """dm-flakey. Intervals in seconds.

    6.1 knows drop_writes, error_writes and corrupt_bio_byte; error_reads and
    random_{read,write}_corrupt exist only in newer kernels (6.1 refuses them).
    """

    target_type: ClassVar[str] = "flakey"
    dev: str
    offset: int
    up_interval: int
    down_interval: int
    drop_writes: bool = False
    error_writes: bool = False
    error_reads: bool = False
    corrupt_bio_byte: CorruptBioByte | None = None
    random_read_corrupt: int | None = None
    random_write_corrupt: int | None = None

    def __post_init__(self) -> None:
        w = self.target_type
        _check_dev(w, "dev", self.dev)
        _check_int(w, "offset", self.offset)
        _check_int(w, "up_interval", self.up_interval, 0, U32_MAX)
        _check_int(w, "down_interval", self.down_interval, 0, U32_MAX)
        total = self.up_interval + self.down_interval
        if total == 0:
            raise TableError(f"{w}: up_interval + down_interval is zero")
        if total > U32_MAX:
            raise TableError(f"{w}: up_interval + down_interval {total} overflows 32 bits")
        for name in ("drop_writes", "error_writes", "error_reads"):
            _check_bool(w, name, getattr(self, name))
        if self.corrupt_bio_byte is not None and not isinstance(
            self.corrupt_bio_byte, CorruptBioByte
        ):
            raise _err(
                w, "corrupt_bio_byte", repr(self.corrupt_bio_byte), "is not a CorruptBioByte"
            )
        for name in ("random_read_corrupt", "random_write_corrupt"):
            # 0 would mean "off" and not be rendered back; say None instead.
            _check_opt_int(w, name, getattr(self, name), 1, FLAKEY_PROBABILITY_BASE)
        if self.drop_writes and self.error_writes:
            raise TableError(f"{w}: drop_writes conflicts with error_writes")
        cbb = self.corrupt_bio_byte
        corrupts_writes = (cbb is not None and cbb.direction == "w") or bool(
            self.random_write_corrupt
        )
        corrupts_reads = (cbb is not None and cbb.direction == "r") or bool(
            self.random_read_corrupt
        )
        for name in ("drop_writes", "error_writes"):
            if getattr(self, name) and corrupts_writes:
                raise TableError(f"{w}: {name} is incompatible with corrupting writes")
        if self.error_reads and corrupts_reads:
            raise TableError(f"{w}: error_reads is incompatible with corrupting reads")

    def _feature_words(self) -> list[str]:
        # flakey_status() order: error_reads, drop/error_writes, corrupt_bio_byte,
        # random_read_corrupt, random_write_corrupt.
        out: list[str] = []
        if self.error_reads:
            out.append("error_reads")
        if self.drop_writes:
            out.append("drop_writes")
        elif self.error_writes:
            out.append("error_writes")
        if self.corrupt_bio_byte is not None:
            out += self.corrupt_bio_byte.words()
        if self.random_read_corrupt is not None:
            out += ["random_read_corrupt", str(self.random_read_corrupt)]
        if self.random_write_corrupt is not None:
            out += ["random_write_corrupt", str(self.random_write_corrupt)]
        return out

    def params(self) -> str:
        # 6.1 ends every word with a space (newer kernels dropped the trailing one).
        words = self._feature_words()
        head = f"{self.dev} {self.offset} {self.up_interval} {self.down_interval} {len(words)} "
        return head + "".join(f"{x} " for x in words)

    @classmethod
    def from_params(cls, params: str) -> Self:
        w = cls.target_type
        a = _Args(w, params)
        dev, offset = a.word("dev"), a.num("offset")
        up = a.num("up_interval", 0, U32_MAX)
        down = a.num("down_interval", 0, U32_MAX)
        kw: dict[str, object] = {}

        def put(key: str, value: object) -> None:
            if key in kw:
                raise TableError(f"{w}: feature {key} given twice")
            kw[key] = value

        # The feature group is optional on input; the kernel always prints it.
        n = a.count("feature count") if a.left() else 0
        stop = a.pos + n
        while a.pos < stop:
            word = a.word("feature").lower()
            if word in ("drop_writes", "error_writes", "error_reads"):
                put(word, True)
            elif word == "corrupt_bio_byte":
                if stop - a.pos < 4:
                    raise TableError(f"{w}: corrupt_bio_byte needs 4 parameters")
                nth = a.num("corrupt_bio_byte nth_byte", 1, U32_MAX)
                direction = a.word("corrupt_bio_byte direction").lower()
                _check_choice(
                    w, "corrupt_bio_byte direction", direction, get_args(CorruptDirection)
                )
                value = a.num("corrupt_bio_byte value", 0, 255)
                flags = a.num("corrupt_bio_byte flags", 0, U32_MAX)
                put(word, CorruptBioByte(nth, direction, value, flags))  # type: ignore[arg-type]
            elif word in ("random_read_corrupt", "random_write_corrupt"):
                if a.pos >= stop:
                    raise TableError(f"{w}: {word} is missing its value")
                put(word, a.num(word, 0, FLAKEY_PROBABILITY_BASE))
            else:
                raise TableError(f"{w}: unknown feature {word!r}")
        a.end()
        return cls(dev, offset, up, down, **kw)  # type: ignore[arg-type]


# -- tables ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableLine:
    start: int  # sectors
    length: int  # sectors
    target: Target

    def __post_init__(self) -> None:
        if not isinstance(self.target, Target):
            raise TableError(f"table line: target {self.target!r} is not a Target")
        w = self.target.target_type
        _check_int(w, "start", self.start)
        _check_int(w, "length", self.length, -U64_MAX)
        if self.length <= 0:
            raise _err(w, "length", self.length, "is not positive")

    def render(self) -> str:
        p = self.target.params()
        head = f"{self.start} {self.length} {self.target.target_type}"
        return f"{head} {p}" if p else head

    @classmethod
    def parse(cls, line: str) -> Self:
        parts = line.strip("\n").lstrip().split(maxsplit=3)
        if len(parts) < 3:
            raise TableError(f"table line {line!r}: need 'start length type [params]'")
        start_s, length_s, ttype = parts[:3]
        for name, s in (("start", start_s), ("length", length_s)):
            if not _DIGITS.fullmatch(s):
                raise _err(ttype, name, repr(s), "is not a decimal number")
        target = target_class(ttype).from_params(parts[3] if len(parts) > 3 else "")
        return cls(int(start_s), int(length_s), target)


@dataclass(frozen=True)
class Table:
    lines: tuple[TableLine, ...]

    def __post_init__(self) -> None:
        lines = tuple(self.lines)  # accept any sequence, store a tuple
        object.__setattr__(self, "lines", lines)
        if not lines:
            raise TableError("table: needs at least one line")
        expect = 0
        for i, ln in enumerate(lines, 1):
            if not isinstance(ln, TableLine):
                raise TableError(f"table: line {i} {ln!r} is not a TableLine")
            w = ln.target.target_type
            if ln.start != expect:
                kind = "a gap" if ln.start > expect else "an overlap"
                raise TableError(
                    f"{w}: start {ln.start} on table line {i} leaves {kind}; expected {expect}"
                )
            expect = ln.start + ln.length
            if ln.target.singleton and len(lines) > 1:
                raise TableError(f"{w}: must be the only target in its table")

    def render(self) -> str:
        return "\n".join(ln.render() for ln in self.lines)

    @classmethod
    def parse(cls, text: str) -> Self:
        return cls(tuple(TableLine.parse(s) for s in text.splitlines() if s.strip()))

    @property
    def size(self) -> int:
        return sum(ln.length for ln in self.lines)

    @classmethod
    def single(cls, length: int, target: Target) -> Self:
        return cls((TableLine(0, length, target),))

    @classmethod
    def of(cls, lines: Sequence[tuple[int, Target]]) -> Self:
        """Contiguous lines from ``(length, target)`` pairs, starting at 0."""
        out: list[TableLine] = []
        start = 0
        for length, target in lines:
            out.append(TableLine(start, length, target))
            start += length
        return cls(tuple(out))
