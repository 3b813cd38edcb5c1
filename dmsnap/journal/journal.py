"""Thin Python face of the C journal (csrc/journal.h).

Every call goes straight to C with the GIL released (cffi API mode), and
buffers are passed without copies (``ffi.from_buffer``). Errors come back as
:class:`JournalError`, an ``OSError`` whose ``errno`` is the C function's and
whose message names the operation.
"""

from __future__ import annotations

import errno as _errno
import os
import threading
from dataclasses import dataclass, fields
from typing import Any

from dmsnap._hotpath import ffi, lib


def crc32c_impl() -> str:
    """The record checksum's implementation, chosen by timing at start:
    "sse4.2" (the CPU instruction) or "slice8" (tables; faster where the
    instruction is emulated, as under QEMU TCG)."""
    return ffi.string(lib.jr_crc32c_impl()).decode()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """crc32c (Castagnoli) of data: the journal's implementation, for other
    on-the-wire checksums (the replication stream)."""
    return lib.jr_crc32c(ffi.from_buffer(data), len(data))


_MS_MAX = 0xFFFF_FFFF


def _ms(timeout: float) -> int:
    if timeout < 0:
        raise ValueError("timeout must be >= 0")
    return min(int(timeout * 1000), _MS_MAX)


class JournalError(OSError):
    """A journal operation failed; ``errno`` is the C side's errno."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)

    def __str__(self) -> str:
        return f"{self.strerror} [{_errno.errorcode.get(self.errno, self.errno)}]"


_REASONS = {
    _errno.ETIMEDOUT: "timed out",
    _errno.ESHUTDOWN: "journal is closing",
    _errno.ENXIO: "volume not attached",
    _errno.EINVAL: "invalid argument",
    _errno.EBADMSG: "no valid journal superblock",
    _errno.EPROTONOSUPPORT: "the journal has a later on-disk format than this dmsnap reads",
    _errno.EAGAIN: "journal not started",
    _errno.EBUSY: "busy",
}


def _check(rc: int, what: str, reason: str | None = None) -> int:
    if rc >= 0:
        return rc
    err = -rc
    why = reason or _REASONS.get(err) or os.strerror(err)
    raise JournalError(err, f"{what}: {why}")


@dataclass(frozen=True)
class JournalStats:
    """A snapshot of ``struct jr_stats``."""

    mode: int
    align: int
    capacity: int
    used: int
    generation: int
    head_seq: int
    durable_seq: int
    flushed_seq: int
    checkpoint_seq: int
    unflushed_records: int
    unflushed_bytes: int
    markers_pending: int
    recovered_records: int
    appends: int
    commits: int
    dm_writes: int
    full_waits: int
    journal_error: int
    flush_error: int
    flush_error_volume: int
    waiting_volume: int
    synced_seq: int
    flush_errors: int
    direct_io: int
    marker_waiting: int
    discards: int
    dm_discards: int
    recovery_end_seq: int
    recovery_dropped: int
    sync_rewinds: int
    mem_limit: int
    backlog_bytes: int
    no_space: int
    confirmed_seq: int
    confirm_rewinds: int

    @property
    def fill(self) -> float:
        """Fraction of the ring not yet reclaimable (0.0 .. 1.0)."""
        return self.used / self.capacity if self.capacity else 0.0

    @property
    def lag_records(self) -> int:
        return self.unflushed_records

    @property
    def lag_bytes(self) -> int:
        return self.unflushed_bytes

    @property
    def mode_name(self) -> str:
        return "nv" if self.mode == lib.JR_NV else "ram"

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        d["mode"] = self.mode_name
        d["fill"] = self.fill
        return d


_STAT_FIELDS = [f.name for f in fields(JournalStats)]


@dataclass(frozen=True)
class Recovery:
    """What the open found after the end of the log (``struct jr_recovery``)."""

    end_seq: int  # the first record not replayed
    dropped: int  # records of this journal found after it, not replayed
    last_seq: int  # the highest seq among them (0: none)


class JournalCorrupt(JournalError):
    """A record in the middle of the log is damaged although it was durable
    (records appended after it say so): the open changes nothing. ``seq``
    names it; :meth:`Journal.repair` with it drops it and every later record."""

    def __init__(self, path: str, seq: int, later: int) -> None:
        super().__init__(
            _errno.EUCLEAN,
            f"open journal {path}: record {seq} is damaged and {later} record(s) after it "
            "were written once it was durable; nothing was replayed or changed",
        )
        self.seq = seq
        self.later = later


def _recovery(info: Any) -> Recovery:
    return Recovery(int(info.end_seq), int(info.dropped), int(info.last_seq))


@dataclass(frozen=True)
class Marker:
    id: int
    seq: int
    payload: bytes


class Journal:
    """One pool's ordered journal. Create with :meth:`open`."""

    MAX_PAYLOAD: int = lib.JR_MAX_PAYLOAD
    MAX_IO: int = lib.JR_MAX_IO
    # NV: RAM the live window may take (csrc/journal.h, the one default)
    MEM_DEFAULT: int = lib.JR_MEM_DEFAULT
    MEM_MIN: int = lib.JR_MEM_MIN

    def __init__(self, handle: Any, mode: str, path: str | None) -> None:
        self._j = handle
        self.mode = mode
        self.path = path
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._calls = 0
        self._closing = False
        self._closed = False
        self._last_stats: JournalStats | None = None
        self.recovery = Recovery(0, 0, 0)

    # ------------------------------------------------------------ lifecycle

    @staticmethod
    def format(path: str, size: int = 0, *, journal_id: int | None = None, align: int = 0) -> None:
        """Write an empty journal to ``path`` (device or file; a file is
        created/extended to ``size``; 0 = its whole size)."""
        rc = lib.jr_format(os.fsencode(path), size, align, journal_id or 0)
        _check(rc, f"format journal {path}")

    @classmethod
    def open(
        cls, path: str | None = None, *, mode: str = "nv", ram_size: int = 0, mem_limit: int = 0
    ) -> Journal:
        """Open (and recover) a journal; threads start with :meth:`start`.
        ``mem_limit`` (NV; 0: :attr:`MEM_DEFAULT`): RAM the records not yet
        checkpointed may take; recovery keeps no more than that in memory
        either, and replays a longer log in pieces before reads are served."""
        if mode not in ("nv", "ram"):
            raise ValueError(f"journal mode must be 'nv' or 'ram', not {mode!r}")
        out = ffi.new("jr_t **")
        info = ffi.new("struct jr_recovery *")
        if mode == "nv":
            if not path:
                raise ValueError("an NV journal needs a path")
            rc = lib.jr_open_ex(os.fsencode(path), lib.JR_NV, 0, mem_limit, 0, info, out)
            if rc == -_errno.EUCLEAN:
                raise JournalCorrupt(path, int(info.bad_seq), int(info.dropped))
            reason = None
            if rc == -_errno.EINVAL and 0 < mem_limit < cls.MEM_MIN:
                reason = f"memory limit of {mem_limit} bytes is below {cls.MEM_MIN}"
            _check(rc, f"open journal {path}", reason)
        else:
            if path:
                raise ValueError("a RAM journal has no path")
            rc = lib.jr_open(ffi.NULL, lib.JR_RAM, ram_size, out)
            _check(rc, f"open RAM journal of {ram_size} bytes")
        j = cls(out[0], mode, path)
        j.recovery = _recovery(info)
        return j

    @staticmethod
    def repair(path: str, discard_from: int) -> Recovery:
        """Drop record ``discard_from`` and every later one from the NV
        journal at ``path`` (their headers are zeroed on disk), so that it
        opens again after :class:`JournalCorrupt`. Returns what was dropped.
        Refused (``EINVAL``) below the checkpoint, whose records are on the
        volumes already, and (``ERANGE``) past a damaged record, since the
        records after it cannot be replayed in order."""
        out = ffi.new("jr_t **")
        info = ffi.new("struct jr_recovery *")
        rc = lib.jr_open_ex(os.fsencode(path), lib.JR_NV, 0, 0, discard_from, info, out)
        what = f"repair journal {path} from record {discard_from}"
        if rc == -_errno.EINVAL and info.end_seq:
            _check(rc, what, f"records before {info.end_seq} are on the volumes already")
        if rc == -_errno.ERANGE:
            _check(rc, what, f"record {info.bad_seq} is damaged: drop from it or before")
        _check(rc, what)
        lib.jr_close(out[0], 0, 0)
        return _recovery(info)

    @property
    def c_handle(self) -> Any:
        """The ``jr_t *`` for other C code in the hot path (the TCMU ring
        handler calls the journal directly). Whoever takes it stops using it
        before :meth:`close`."""
        if self._closed:
            raise JournalError(_errno.ESHUTDOWN, "journal is closed")
        return self._j

    def _enter(self) -> Any:
        with self._lock:
            if self._closed:
                raise JournalError(_errno.ESHUTDOWN, "journal is closed")
            self._calls += 1
            return self._j

    def _leave(self) -> None:
        with self._lock:
            self._calls -= 1
            if not self._calls:
                self._idle.notify_all()

    def close(self, *, drain: bool = True, timeout: float = 60.0) -> None:
        """Stop the threads and free the journal. With ``drain``, first wait
        until every record is on the dm devices (markers still need the
        controller meanwhile). Raises ``JournalError(ETIMEDOUT)`` when the
        drain did not finish (NV: the records stay for the next open; RAM:
        they are lost). Idempotent."""
        with self._lock:
            if self._closing or self._closed:
                return
            self._closing = True
            self._calls += 1
        try:
            rc = lib.jr_stop(self._j, 1 if drain else 0, _ms(timeout))
        finally:
            with self._lock:
                self._calls -= 1
                self._closed = True
                while self._calls:
                    self._idle.wait()
            self._last_stats = self._stats_locked()
            lib.jr_close(self._j, 0, 0)
            self._j = ffi.NULL
        lost = "records stay in the journal" if self.mode == "nv" else "unflushed records are LOST"
        _check(rc, "close journal (drain)", f"drain did not finish in {timeout:g} s; {lost}")

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(drain=exc[0] is None)

    def __del__(self) -> None:
        try:
            if not self._closed and self._j != ffi.NULL:
                self.close(drain=False)
        except Exception:
            pass

    def start(self) -> None:
        j = self._enter()
        try:
            _check(lib.jr_start(j), "start journal")
        finally:
            self._leave()

    def set_mem_limit(self, mem_limit: int) -> None:
        """Change an NV journal's memory limit (0: :attr:`MEM_DEFAULT`); a
        lower one makes writers wait until the flusher has shrunk the live
        window under it."""
        j = self._enter()
        try:
            rc = lib.jr_set_mem_limit(j, mem_limit)
        finally:
            self._leave()
        reason = None
        if rc == -_errno.EINVAL:
            reason = (
                "a RAM journal's memory is its size"
                if self.mode == "ram"
                else f"memory limit must be at least {self.MEM_MIN} bytes"
            )
        _check(rc, f"set the journal's memory limit to {mem_limit}", reason)

    # ------------------------------------------------------------ volumes

    def pending_volumes(self) -> set[int]:
        """Volume ids with records not yet flushed (after open: recovered)."""
        j = self._enter()
        try:
            n = 64
            while True:
                buf = ffi.new("uint32_t[]", n)
                got = _check(lib.jr_pending_volumes(j, buf, n), "list pending volumes")
                if got <= n:
                    return {buf[i] for i in range(got)}
                n = got
        finally:
            self._leave()

    def attach(self, vol: int, dm_path: str, size: int) -> None:
        j = self._enter()
        try:
            rc = lib.jr_attach(j, vol, os.fsencode(dm_path), size)
            reason = {
                _errno.EBUSY: "already attached",
                _errno.EINVAL: "volume id must be > 0 and size a multiple of 512",
            }.get(-rc)
            _check(rc, f"attach volume {vol} ({dm_path})", reason)
        finally:
            self._leave()

    def detach(self, vol: int, timeout: float = 60.0) -> None:
        j = self._enter()
        try:
            rc = lib.jr_detach(j, vol, _ms(timeout))
            reason = {
                _errno.ETIMEDOUT: f"records still unflushed after {timeout:g} s",
                _errno.ENXIO: "not attached",
            }.get(-rc)
            _check(rc, f"detach volume {vol}", reason)
        finally:
            self._leave()

    def forget(self, vol: int, timeout: float = 30.0) -> None:
        """Drop every unflushed record of ``vol`` (the volume was deleted).
        NV: returns once the volume's end is durable in the journal, so a
        replay after a crash drops the same records. The records are dropped
        from memory even when this raises (the end is then not recorded)."""
        j = self._enter()
        try:
            rc = lib.jr_forget(j, vol, _ms(timeout))
        finally:
            self._leave()
        reason = {
            _errno.ETIMEDOUT: f"no room in the journal or not durable within {timeout:g} s",
            _errno.ENOSPC: "the journal is full",
        }.get(-rc)
        _check(rc, f"record the end of volume {vol} in the journal", reason)

    # ------------------------------------------------------------ data path

    def write(
        self,
        vol: int,
        offset: int,
        data: bytes | bytearray | memoryview,
        *,
        fua: bool = False,
        timeout: float = 30.0,
    ) -> int:
        """Append a write; returns its seq once durable (NV) / copied (RAM;
        with ``fua`` once on the dm device and synced)."""
        buf = ffi.from_buffer(data)
        n = len(buf)
        j = self._enter()
        try:
            rc = lib.jr_write(j, vol, offset, buf, n, lib.JR_FUA if fua else 0, _ms(timeout))
        finally:
            self._leave()
        if rc < 0:
            what = f"write volume {vol} offset {offset} length {n}"
            reason = {
                _errno.ETIMEDOUT: f"journal full or not durable within {timeout:g} s",
                _errno.EINVAL: "offset and length must be multiples of 512, "
                f"length 1..{self.MAX_IO}, within the volume and the journal",
                _errno.ENXIO: f"volume {vol} not attached",
            }.get(-rc)
            _check(rc, what, reason)
        return rc

    def discard(
        self, vol: int, offset: int, length: int, *, fua: bool = False, timeout: float = 30.0
    ) -> int:
        """Append a discard of ``length`` bytes at ``offset``: the range
        reads zeros from now on (until written again) and the flusher gives
        the space back in its place in the order. Returns its seq once
        durable (NV) / appended (RAM; with ``fua`` once applied and synced)."""
        j = self._enter()
        try:
            rc = lib.jr_discard(j, vol, offset, length, lib.JR_FUA if fua else 0, _ms(timeout))
        finally:
            self._leave()
        if rc < 0:
            reason = {
                _errno.ETIMEDOUT: f"journal full or not durable within {timeout:g} s",
                _errno.EINVAL: "offset and length must be multiples of 512, "
                "length > 0, within the volume",
                _errno.ENXIO: f"volume {vol} not attached",
            }.get(-rc)
            _check(rc, f"discard volume {vol} offset {offset} length {length}", reason)
        return rc

    def read(self, vol: int, offset: int, length: int) -> bytes:
        """The newest data: unflushed records over the dm device."""
        out = bytearray(length)
        self.read_into(vol, offset, out)
        return bytes(out)

    def read_into(self, vol: int, offset: int, buf: bytearray | memoryview) -> None:
        cbuf = ffi.from_buffer(buf, require_writable=True)
        n = len(cbuf)
        j = self._enter()
        try:
            rc = lib.jr_read(j, vol, offset, cbuf, n)
        finally:
            self._leave()
        if rc < 0:
            reason = {
                _errno.EINVAL: "offset and length must be multiples of 512, "
                f"at most {self.MAX_IO}, within the volume",
                _errno.ENXIO: f"volume {vol} not attached",
            }.get(-rc)
            _check(rc, f"read volume {vol} offset {offset} length {n}", reason)

    def marker(self, marker_id: int, payload: bytes, *, timeout: float = 30.0) -> int:
        """Append a snapshot marker; returns its seq once durable (NV) /
        appended (RAM)."""
        if len(payload) > self.MAX_PAYLOAD:
            raise JournalError(
                _errno.EINVAL,
                f"marker {marker_id}: payload of {len(payload)} bytes > {self.MAX_PAYLOAD}",
            )
        buf = ffi.from_buffer(payload) if payload else ffi.NULL
        j = self._enter()
        try:
            rc = lib.jr_marker(j, marker_id, buf, len(payload), _ms(timeout))
        finally:
            self._leave()
        if rc < 0:
            reason = {
                _errno.ETIMEDOUT: f"journal full or not durable within {timeout:g} s",
                _errno.EINVAL: "marker id must be non-zero",
            }.get(-rc)
            _check(rc, f"marker {marker_id}", reason)
        return rc

    def sync(self, timeout: float = 60.0) -> None:
        """Every record appended so far is on the dm devices and synced."""
        j = self._enter()
        try:
            rc = lib.jr_sync(j, _ms(timeout))
        finally:
            self._leave()
        reason = None
        if rc == -_errno.ETIMEDOUT:
            reason = f"records not on the dm devices within {timeout:g} s"
        _check(rc, "sync journal", reason)

    # ------------------------------------------------------------ controller

    def next_marker(self, timeout: float = 0.5) -> Marker | None:
        """The marker the flusher stands at (all earlier writes on dm and
        synced), or None on timeout. The same marker comes back until
        :meth:`marker_done`."""
        mid = ffi.new("uint64_t *")
        seq = ffi.new("uint64_t *")
        ln = ffi.new("uint32_t *")
        payload = ffi.new("unsigned char[]", self.MAX_PAYLOAD)
        j = self._enter()
        try:
            rc = lib.jr_next_marker(j, _ms(timeout), mid, seq, payload, ln)
        finally:
            self._leave()
        if rc == -_errno.ETIMEDOUT:
            return None
        _check(rc, "wait for marker")
        return Marker(int(mid[0]), int(seq[0]), bytes(ffi.buffer(payload, ln[0])))

    def set_no_space(self, err: int) -> None:
        """The pool below cannot take new blocks (-errno) or can again (0):
        see jr_set_no_space."""
        j = self._enter()
        try:
            lib.jr_set_no_space(j, err)
        finally:
            self._leave()

    def set_confirm(self, on: bool) -> None:
        """Whether synced records wait for :meth:`confirm` before the
        checkpoint passes them: see jr_set_confirm."""
        j = self._enter()
        try:
            lib.jr_set_confirm(j, 1 if on else 0)
        finally:
            self._leave()

    def confirm_mark(self) -> int:
        """Before a look at the devices below: a token for :meth:`confirm`
        (what is synced now)."""
        j = self._enter()
        try:
            return int(lib.jr_confirm_mark(j))
        finally:
            self._leave()

    def confirm(self, token: int) -> bool:
        """The look begun with ``token`` found the devices below healthy:
        what was synced before it is durable. False if a no-space transition
        came in between (the look confirms nothing)."""
        j = self._enter()
        try:
            rc = lib.jr_confirm(j, token)
        finally:
            self._leave()
        if rc == -_errno.ESTALE:
            return False
        _check(rc, "confirm")
        return True

    def marker_done(self, marker_id: int) -> None:
        j = self._enter()
        try:
            rc = lib.jr_marker_done(j, marker_id)
        finally:
            self._leave()
        reason = "the flusher does not stand at this marker" if rc == -_errno.EINVAL else None
        _check(rc, f"marker {marker_id} done", reason)

    # ------------------------------------------------------------ stats

    def _stats_locked(self) -> JournalStats:
        st = ffi.new("struct jr_stats *")
        lib.jr_get_stats(self._j, st)
        return JournalStats(**{name: int(getattr(st, name)) for name in _STAT_FIELDS})

    def stats(self) -> JournalStats:
        """Counters and positions (after close: the last ones)."""
        with self._lock:
            if self._closed and self._last_stats is not None:
                return self._last_stats
        j = self._enter()
        try:
            st = ffi.new("struct jr_stats *")
            lib.jr_get_stats(j, st)
            return JournalStats(**{name: int(getattr(st, name)) for name in _STAT_FIELDS})
        finally:
            self._leave()

    @property
    def closed(self) -> bool:
        return self._closed
