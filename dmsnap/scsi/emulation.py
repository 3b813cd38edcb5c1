"""SPC-4 / SBC-3 emulation of one logical unit, and the vendor snapshot command.

The TCMU ring loop (C) serves fast-path READ/WRITE itself and hands every
other command to :meth:`Emulator.execute`, which never raises and never
blocks longer than the :class:`Lun` / :class:`SnapshotService` calls it makes:

    emu = Emulator(lun, snapshots, snapshot_allowed=policy)        # one per LUN
    rsp = emu.execute(cdb, data_out, initiator=..., data_in_len=...)
    # rsp.status: GOOD (0) or CHECK CONDITION (2); rsp.data: the Data-In bytes
    # (already cut to the allocation length and data_in_len); rsp.sense: the
    # sense data (empty unless CHECK CONDITION), fixed or descriptor format as
    # the initiator asked (D_SENSE in the control mode page).

``cdb``: the CDB bytes (at least the length implied by the opcode; extra
bytes are ignored). ``data_out``: the Data-Out buffer as the initiator sent
it (None/b"" when there is none). ``data_in_len``: the size of the
initiator's Data-In buffer when known (the response is cut to it).
``initiator``: who sent the command, passed to ``snapshot_allowed`` (TCMU
does not tell the backstore the I_T nexus: the daemon passes what it knows,
e.g. the export the backstore belongs to).

For errors the C fast path detects itself, :meth:`Emulator.check_condition`
builds a CHECK CONDITION response in the format the initiator asked for.
A failure noticed after the fact (a RAM-journal write that could not be
flushed) can be posted with :meth:`Emulator.post_deferred_error`: it is
reported (deferred sense, 0x71/0x73) on the next command and by REQUEST SENSE.

Commands (CDB layouts per SPC-4/SBC-3): TEST UNIT READY, REQUEST SENSE,
INQUIRY (standard; VPD 00 80 83 B0 B1 B2), MODE SENSE 6/10 (caching 08,
control 0A, all 3F), MODE SELECT 6/10 (control page D_SENSE is changeable,
everything else must equal the current value), START STOP UNIT, READ
CAPACITY 10/16, READ/WRITE 6/10/12/16, VERIFY and WRITE AND VERIFY 10/12/16,
SYNCHRONIZE CACHE 10/16, WRITE SAME 10/16, UNMAP, REPORT SUPPORTED OPERATION
CODES, COMPARE AND WRITE, and the dmsnap vendor command 0xC0 (``dmsnap.scsi.snapcmd``; only when
a SnapshotService is given). Everything else: ILLEGAL REQUEST, INVALID COMMAND
OPERATION CODE.

Contract of :class:`Lun`: offsets/lengths are bytes, multiples of
``block_size``, always inside ``size`` (checked here first); ``write`` with
``fua`` returns once the data is on stable storage; ``flush`` makes every
completed write stable; after ``unmap`` the range reads as zeros (the LUN
advertises LBPRZ=1); ``compare_and_write`` writes only if the range holds
``compare`` now, atomically with respect to every other write of the volume
(on every path), and returns None, or the offset of the first differing byte
(nothing written). Errors raised by the Lun become MEDIUM ERROR (OSError)
or HARDWARE ERROR (anything else).
"""

from __future__ import annotations

import errno
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from dmsnap.scsi import cdb as C
from dmsnap.scsi import sense as S
from dmsnap.scsi import snapcmd as SC
from dmsnap.scsi.sense import FieldPointer, Key, Sense, SenseError

log = logging.getLogger(__name__)
_T = TypeVar("_T")

GOOD = S.GOOD
CHECK_CONDITION = S.CHECK_CONDITION

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclass(frozen=True)
class Response:
    status: int
    data: bytes = b""
    sense: bytes = b""

    @property
    def ok(self) -> bool:
        return self.status == GOOD

    def decoded_sense(self) -> Sense | None:
        return S.decode(self.sense) if self.sense else None


class Lun(Protocol):
    """What the emulator needs from a volume (the daemon supplies it)."""

    size: int  # bytes
    block_size: int  # 512 or 4096
    wce: bool  # volatile write cache (RAM journal): SYNCHRONIZE CACHE / FUA matter
    read_only: bool  # exported snapshots
    serial: str  # unit serial number (VPD 0x80), stable across restarts
    naa: bytes  # NAA designator (VPD 0x83): 8 bytes (NAA 2/3/5) or 16 (NAA 6); see naa_from_serial

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes, *, fua: bool) -> None: ...

    def flush(self) -> None: ...

    def unmap(self, offset: int, length: int) -> None: ...

    def compare_and_write(
        self, offset: int, compare: bytes, data: bytes, *, fua: bool
    ) -> int | None: ...


class SnapshotService(Protocol):
    """The target side of the in-band snapshot command (errors: raise SnapshotError)."""

    def create(self, lun: Lun, request: SC.CreateRequest) -> None:
        """Return once the marker is durable (request.wait: once the snapshot
        exists; bounded: raise SnapshotError(IN_PROGRESS) when it takes too
        long). A token seen before must not create a second snapshot: answer
        from the earlier request's state (FAILED raises its error)."""
        ...

    def status(self, lun: Lun, handle: bytes) -> Sequence[SC.SnapEntry]:
        """Requests whose token ends with the 4-byte handle (normally one)."""
        ...

    def list(self, lun: Lun, skip: int = 0) -> Sequence[SC.SnapEntry]:
        """Up to SC.LIST_MAX requests of this LUN's pool, newest first, not
        the deleted ones, after passing over the ``skip`` newest."""
        ...

    def delete(self, lun: Lun, token: bytes) -> None:
        """Delete the snapshot of this LUN's volume that the request ``token``
        made. Already deleted: return (a retry). Unknown token or a failed
        request: UNKNOWN; not made yet: IN_PROGRESS; exported or open:
        IN_USE, nothing changed."""
        ...


@dataclass(frozen=True)
class Limits:
    """What VPD 0xB0 advertises and the emulator enforces (bytes)."""

    max_transfer: int = 8 * MiB  # READ/WRITE/VERIFY; the journal's JR_MAX_IO
    optimal_granularity: int = 4 * KiB
    optimal_transfer: int = 0  # 0: not reported
    max_unmap: int = 1 * GiB  # per UNMAP command (all descriptors)
    max_unmap_descriptors: int = 256  # libiscsi sends up to 256 (Unmap.0blocks)
    unmap_granularity: int = 64 * KiB  # the thin pool's block size
    # below 65536 blocks: libiscsi then expects a 65536-block WRITE SAME to be refused instead
    # of writing 32 MiB with one WRITE(16) beyond MAXIMUM TRANSFER LENGTH
    max_write_same: int = 16 * MiB
    # COMPARE AND WRITE: the blocks compared and written by one command (the
    # Data-Out is twice this). ESXi's ATS uses one block; LIO's iblock
    # offers one. 255 blocks is what the field can say.
    max_compare_and_write: int = 255 * 512


def naa_from_serial(serial: str, company_id: int = 0x001405) -> bytes:
    """A 16-byte NAA 6 (IEEE Registered Extended) designator derived from the
    unit serial the way LIO derives it for its own backstores (company id
    0x001405, then the serial's hex digits as nibbles), so a volume keeps
    the same identifier whichever LIO backstore serves it."""
    out = bytearray(16)
    out[0] = 0x60 | ((company_id >> 20) & 0xF)
    out[1] = (company_id >> 12) & 0xFF
    out[2] = (company_id >> 4) & 0xFF
    out[3] = (company_id & 0xF) << 4
    nibbles = [int(ch, 16) for ch in serial if ch in "0123456789abcdefABCDEF"]
    pos, high = 3, False  # byte 3 low nibble first, then whole bytes
    for v in nibbles:
        if pos >= 16:
            break
        if not high:
            out[pos] |= v
            pos += 1
            high = True
        else:
            out[pos] = v << 4
            high = False
    return bytes(out)


# -- the command table (RSOC reports exactly this) -----------------------------------------


@dataclass(frozen=True)
class _Op:
    opcode: int
    sa: int | None
    name: str
    usage: bytes  # CDB usage data (RSOC); its length is the CDB length
    handler: str
    timeout: int = 30  # recommended command timeout (s), RSOC with RCTD
    vendor: bool = False


def _u(*b: int) -> bytes:
    return bytes(b)


_FF4 = (0xFF,) * 4
_FF8 = (0xFF,) * 8
CTL = 0x04  # the CONTROL byte: NACA is evaluated (and refused)

_OPS: tuple[_Op, ...] = (
    _Op(0x00, None, "TEST UNIT READY", _u(0x00, 0, 0, 0, 0, CTL), "_tur"),
    _Op(0x03, None, "REQUEST SENSE", _u(0x03, 0x01, 0, 0, 0xFF, CTL), "_request_sense"),
    _Op(0x08, None, "READ(6)", _u(0x08, 0x1F, 0xFF, 0xFF, 0xFF, CTL), "_read"),
    _Op(0x0A, None, "WRITE(6)", _u(0x0A, 0x1F, 0xFF, 0xFF, 0xFF, CTL), "_write"),
    _Op(0x12, None, "INQUIRY", _u(0x12, 0x03, 0xFF, 0xFF, 0xFF, CTL), "_inquiry"),
    _Op(0x15, None, "MODE SELECT(6)", _u(0x15, 0x11, 0, 0, 0xFF, CTL), "_mode_select"),
    _Op(0x1A, None, "MODE SENSE(6)", _u(0x1A, 0x08, 0xFF, 0xFF, 0xFF, CTL), "_mode_sense"),
    _Op(0x1B, None, "START STOP UNIT", _u(0x1B, 0x01, 0, 0x0F, 0xF7, CTL), "_start_stop"),
    _Op(0x25, None, "READ CAPACITY(10)", _u(0x25, 0, *_FF4, 0, 0, 0x01, CTL), "_read_capacity10"),
    _Op(0x28, None, "READ(10)", _u(0x28, 0xF8, *_FF4, 0, 0xFF, 0xFF, CTL), "_read"),
    _Op(0x2A, None, "WRITE(10)", _u(0x2A, 0xF8, *_FF4, 0, 0xFF, 0xFF, CTL), "_write"),
    _Op(
        0x2E,
        None,
        "WRITE AND VERIFY(10)",
        _u(0x2E, 0xF6, *_FF4, 0, 0xFF, 0xFF, CTL),
        "_write_verify",
    ),
    _Op(0x2F, None, "VERIFY(10)", _u(0x2F, 0xF6, *_FF4, 0, 0xFF, 0xFF, CTL), "_verify"),
    _Op(
        0x35,
        None,
        "SYNCHRONIZE CACHE(10)",
        _u(0x35, 0x02, *_FF4, 0, 0xFF, 0xFF, CTL),
        "_sync_cache",
    ),
    _Op(
        0x41,
        None,
        "WRITE SAME(10)",
        _u(0x41, 0xFE, *_FF4, 0, 0xFF, 0xFF, CTL),
        "_write_same",
        timeout=60,
    ),
    _Op(0x42, None, "UNMAP", _u(0x42, 0x01, 0, 0, 0, 0, 0, 0xFF, 0xFF, CTL), "_unmap", timeout=60),
    _Op(
        0x55,
        None,
        "MODE SELECT(10)",
        _u(0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, CTL),
        "_mode_select",
    ),
    _Op(
        0x5A,
        None,
        "MODE SENSE(10)",
        _u(0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, CTL),
        "_mode_sense",
    ),
    _Op(0x88, None, "READ(16)", _u(0x88, 0xF8, *_FF8, *_FF4, 0, CTL), "_read"),
    _Op(
        0x89,
        None,
        "COMPARE AND WRITE",
        _u(0x89, 0xFA, *_FF8, 0, 0, 0, 0xFF, 0x1F, CTL),
        "_compare_and_write",
    ),
    _Op(0x8A, None, "WRITE(16)", _u(0x8A, 0xF8, *_FF8, *_FF4, 0, CTL), "_write"),
    _Op(0x8E, None, "WRITE AND VERIFY(16)", _u(0x8E, 0xF6, *_FF8, *_FF4, 0, CTL), "_write_verify"),
    _Op(0x8F, None, "VERIFY(16)", _u(0x8F, 0xF6, *_FF8, *_FF4, 0, CTL), "_verify"),
    _Op(0x91, None, "SYNCHRONIZE CACHE(16)", _u(0x91, 0x02, *_FF8, *_FF4, 0, CTL), "_sync_cache"),
    _Op(
        0x93,
        None,
        "WRITE SAME(16)",
        _u(0x93, 0xFF, *_FF8, *_FF4, 0, CTL),
        "_write_same",
        timeout=60,
    ),
    _Op(
        0x9E, 0x10, "READ CAPACITY(16)", _u(0x9E, 0x10, *_FF8, *_FF4, 0x01, CTL), "_read_capacity16"
    ),
    _Op(
        0xA3,
        0x0C,
        "REPORT SUPPORTED OPERATION CODES",
        _u(0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, *_FF4, 0, CTL),
        "_rsoc",
    ),
    _Op(0xA8, None, "READ(12)", _u(0xA8, 0xF8, *_FF4, *_FF4, 0, CTL), "_read"),
    _Op(0xAA, None, "WRITE(12)", _u(0xAA, 0xF8, *_FF4, *_FF4, 0, CTL), "_write"),
    _Op(0xAE, None, "WRITE AND VERIFY(12)", _u(0xAE, 0xF6, *_FF4, *_FF4, 0, CTL), "_write_verify"),
    _Op(0xAF, None, "VERIFY(12)", _u(0xAF, 0xF6, *_FF4, *_FF4, 0, CTL), "_verify"),
)

_SNAP_OPS: tuple[_Op, ...] = (
    _Op(
        SC.OPCODE,
        SC.SA_CREATE,
        "DMSNAP CREATE",
        _u(SC.OPCODE, SC.SA_CREATE, 0x03, 0, 0, 0, 0, 0xFF, 0xFF, CTL),
        "_dmsnap",
        timeout=60,
        vendor=True,
    ),
    _Op(
        SC.OPCODE,
        SC.SA_STATUS,
        "DMSNAP STATUS",
        _u(SC.OPCODE, SC.SA_STATUS, 0, *_FF4, 0xFF, 0xFF, CTL),
        "_dmsnap",
        vendor=True,
    ),
    _Op(
        SC.OPCODE,
        SC.SA_LIST,
        "DMSNAP LIST",
        _u(SC.OPCODE, SC.SA_LIST, 0, *_FF4, 0xFF, 0xFF, CTL),
        "_dmsnap",
        vendor=True,
    ),
    _Op(
        SC.OPCODE,
        SC.SA_DELETE,
        "DMSNAP DELETE",
        _u(SC.OPCODE, SC.SA_DELETE, 0, 0, 0, 0, 0, 0xFF, 0xFF, CTL),
        "_dmsnap",
        timeout=60,
        vendor=True,
    ),
)

COMPARE_AND_WRITE = 0x89

WRITE_OPS = frozenset(
    (
        C.WRITE_6, C.WRITE_10, C.WRITE_12, C.WRITE_16,
        C.WRITE_AND_VERIFY_10, C.WRITE_AND_VERIFY_12, C.WRITE_AND_VERIFY_16,
        C.WRITE_SAME_10, C.WRITE_SAME_16, C.UNMAP, COMPARE_AND_WRITE,
    )
)  # fmt: skip

VPD_PAGES = (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2)
VERSION_DESCRIPTORS = (0x00A0, 0x0460, 0x04C0)  # SAM-5, SPC-4, SBC-3

PAGE_CACHING = 0x08
PAGE_CONTROL = 0x0A
PAGE_ALL = 0x3F
PC_CURRENT, PC_CHANGEABLE, PC_DEFAULT, PC_SAVED = range(4)


class _Answer(Exception):
    """Ends a command with a ready-made response (BUSY, a mapped I/O error)."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


@dataclass
class _Cmd:
    cdb: bytes
    data_out: bytes
    initiator: str
    data_in_len: int | None
    op: _Op


class TokenBucket:
    """The rate of in-band snapshot commands one path takes: ``burst`` at
    once, then ``rate`` a second. Thread-safe."""

    def __init__(
        self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens = float(burst)
        self._at = clock()
        self._lock = threading.Lock()

    def take(self) -> float:
        """0.0 when a token was taken; else the seconds until one will be."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / self.rate


class Emulator:
    """One logical unit's SCSI personality (thread-safe; one per exported LUN)."""

    def __init__(
        self,
        lun: Lun,
        snapshots: SnapshotService | None = None,
        *,
        snapshot_allowed: Callable[[str], bool],
        limits: Limits | None = None,
        inband_rate: TokenBucket | None = None,
        vendor: str = "DMSNAP",
        product: str = "dmsnap volume",
        revision: str = "0001",
    ) -> None:
        self.lun = lun
        self.snapshots = snapshots
        self.snapshot_allowed = snapshot_allowed
        self.limits = limits or Limits()
        # None: unbounded (tests, tools); every export path has one (target.make_emulator)
        self.inband_rate = inband_rate
        self.vendor = vendor
        self.product = product
        self.revision = revision
        self._lock = threading.Lock()
        self._d_sense = False
        self._deferred: list[Sense] = []
        ops = _OPS + (_SNAP_OPS if snapshots is not None else ())
        self._ops: dict[tuple[int, int | None], _Op] = {(o.opcode, o.sa): o for o in ops}
        self._sa_opcodes = {o.opcode for o in ops if o.sa is not None}

    # -- public --------------------------------------------------------------------------

    @property
    def descriptor_sense(self) -> bool:
        """D_SENSE of the control mode page: the initiator wants descriptor-format sense."""
        return self._d_sense

    def check_condition(self, sense: Sense) -> Response:
        return Response(CHECK_CONDITION, b"", sense.encode(descriptor=self._d_sense))

    def post_deferred_error(self, sense: Sense) -> None:
        """Report an error of an already completed command on the next command."""
        d = Sense(
            sense.key,
            sense.asc,
            sense.ascq,
            sense.information,
            sense.field,
            sense.sks,
            deferred=True,
        )
        with self._lock:
            if len(self._deferred) < 16:
                self._deferred.append(d)

    def errno_response(self, err: int, *, write: bool) -> Response:
        """The answer to a command whose I/O failed with errno ``err`` (also for
        the C fast path): ENOSPC (thin pool full) → DATA PROTECT, SPACE
        ALLOCATION FAILED WRITE PROTECT; ETIMEDOUT/EAGAIN/EBUSY (journal full,
        daemon busy) → BUSY status (the initiator retries); ENXIO/ESHUTDOWN
        (volume being restored, daemon stopping) → NOT READY, OPERATION IN
        PROGRESS; anything else → MEDIUM ERROR, WRITE ERROR / UNRECOVERED READ
        ERROR."""
        if err == errno.ENOSPC and write:
            return self.check_condition(
                Sense.of(Key.DATA_PROTECT, S.SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
            )
        if err in (errno.ETIMEDOUT, errno.EAGAIN, errno.EBUSY):
            return Response(S.BUSY)
        if err in (errno.ENXIO, errno.ESHUTDOWN):
            return self.check_condition(
                Sense.of(Key.NOT_READY, S.LUN_NOT_READY_OPERATION_IN_PROGRESS)
            )
        code = S.WRITE_ERROR if write else S.UNRECOVERED_READ_ERROR
        return self.check_condition(Sense.of(Key.MEDIUM_ERROR, code))

    def supported_commands(self) -> list[tuple[int, int | None, str]]:
        """(opcode, service action, name) of every command this LUN answers."""
        return [(o.opcode, o.sa, o.name) for o in self._ops.values()]

    def execute(
        self,
        cdb: bytes,
        data_out: bytes | None = None,
        *,
        initiator: str = "",
        data_in_len: int | None = None,
    ) -> Response:
        try:
            return self._execute(bytes(cdb), bytes(data_out or b""), initiator, data_in_len)
        except SenseError as e:
            return self.check_condition(e.sense)
        except _Answer as a:
            return a.response
        except Exception:
            log.exception("SCSI command %s failed inside the emulator", _hex(cdb))
            return self.check_condition(Sense.of(Key.HARDWARE_ERROR, S.INTERNAL_TARGET_FAILURE))

    # -- dispatch ------------------------------------------------------------------------

    def _execute(
        self, cdb: bytes, data_out: bytes, initiator: str, data_in_len: int | None
    ) -> Response:
        if not cdb:
            raise S.illegal(S.INVALID_FIELD_IN_CDB)
        opcode = cdb[0]
        if opcode in self._sa_opcodes:
            if len(cdb) < 2:
                raise S.illegal(S.INVALID_FIELD_IN_CDB)
            op = self._ops.get((opcode, cdb[1] & 0x1F))
            if op is None:
                raise S.bad_cdb(1, 4)  # unsupported service action
        else:
            op = self._ops.get((opcode, None))
            if op is None:
                raise S.illegal(S.INVALID_COMMAND_OPERATION_CODE, FieldPointer(0, 7))
        n = len(op.usage)
        if len(cdb) < n:
            raise S.illegal(S.INVALID_FIELD_IN_CDB)
        cdb = cdb[:n]
        if C.naca(cdb):
            raise S.bad_cdb(n - 1, 2)
        if data_in_len is not None and data_in_len < 0:
            data_in_len = 0
        if opcode not in (C.INQUIRY, C.REQUEST_SENSE):
            with self._lock:
                pending = self._deferred.pop(0) if self._deferred else None
            if pending is not None:
                return self.check_condition(pending)
        handler: Callable[[_Cmd], Response] = getattr(self, op.handler)
        return handler(_Cmd(cdb, data_out, initiator, data_in_len, op))

    # -- helpers -------------------------------------------------------------------------

    @property
    def _bs(self) -> int:
        return self.lun.block_size

    @property
    def _blocks(self) -> int:
        return self.lun.size // self.lun.block_size

    def _data(self, c: _Cmd, data: bytes, alloc: int) -> Response:
        n = alloc if c.data_in_len is None else min(alloc, c.data_in_len)
        return Response(GOOD, data[:n])

    def _writable(self) -> None:
        if self.lun.read_only:
            raise SenseError(Sense.of(Key.DATA_PROTECT, S.WRITE_PROTECTED))

    def _range(self, lba: int, blocks: int) -> None:
        cap = self._blocks
        if lba > cap or blocks > cap - lba:
            raise S.lba_out_of_range()

    def _max_transfer(self, rw: C.Rw, blocks: int) -> None:
        if blocks * self._bs > self.limits.max_transfer:
            raise S.bad_cdb(rw.len_byte, 7)

    def _exact(self, c: _Cmd, n: int) -> bytes:
        """Block data of a data command: the Data-Out must be exactly n bytes
        (else nothing is done: INVALID FIELD IN COMMAND INFORMATION UNIT)."""
        if len(c.data_out) != n:
            raise S.illegal(S.INVALID_FIELD_IN_COMMAND_IU)
        return c.data_out

    def _params(self, c: _Cmd, plen: int, len_byte: int) -> bytes:
        """A parameter list of plen bytes (a shorter Data-Out: INVALID FIELD IN CDB)."""
        if len(c.data_out) < plen:
            raise S.bad_cdb(len_byte, 7)
        return c.data_out[:plen]

    def _io(self, fn: Callable[[], _T], *, write: bool) -> _T:
        try:
            return fn()
        except SenseError:
            raise
        except OSError as e:
            log.warning("LUN %s failed: %s", "write" if write else "read", e)
            raise _Answer(self.errno_response(e.errno or 0, write=write)) from None

    def _read_lun(self, offset: int, length: int) -> bytes:
        data = self._io(lambda: self.lun.read(offset, length), write=False)
        if data is None or len(data) != length:
            raise SenseError(Sense.of(Key.HARDWARE_ERROR, S.INTERNAL_TARGET_FAILURE))
        return bytes(data)

    def _write_lun(self, offset: int, data: bytes, fua: bool) -> None:
        self._io(lambda: self.lun.write(offset, data, fua=fua), write=True)

    def _miscompare(self, offset: int) -> SenseError:
        return SenseError(Sense.of(Key.MISCOMPARE, S.MISCOMPARE_DURING_VERIFY, information=offset))

    # -- SPC -----------------------------------------------------------------------------

    def _tur(self, c: _Cmd) -> Response:
        return Response(GOOD)

    def _request_sense(self, c: _Cmd) -> Response:
        if c.cdb[1] & 0xFE:
            raise S.bad_cdb(1, 7)
        desc = bool(c.cdb[1] & 0x01)
        with self._lock:
            pending = self._deferred.pop(0) if self._deferred else None
        s = pending or Sense(Key.NO_SENSE)
        return self._data(c, s.encode(descriptor=desc), c.cdb[4])

    def _inquiry(self, c: _Cmd) -> Response:
        cdb = c.cdb
        if cdb[1] & 0xFE:
            raise S.bad_cdb(1, (cdb[1] & 0xFE).bit_length() - 1)
        alloc = C.be(cdb, 3, 2)
        if not cdb[1] & 0x01:
            if cdb[2]:
                raise S.bad_cdb(2, 7)
            return self._data(c, self._std_inquiry(), alloc)
        page = cdb[2]
        builders = {
            0x00: self._vpd_supported,
            0x80: self._vpd_serial,
            0x83: self._vpd_devid,
            0xB0: self._vpd_block_limits,
            0xB1: self._vpd_block_chars,
            0xB2: self._vpd_lbp,
        }
        build = builders.get(page)
        if build is None:
            raise S.bad_cdb(2, 7)
        body = build()
        return self._data(c, bytes((0x00, page)) + len(body).to_bytes(2, "big") + body, alloc)

    @staticmethod
    def _ascii(s: str, n: int) -> bytes:
        b = "".join(ch if 0x20 <= ord(ch) < 0x7F else "?" for ch in s).encode("ascii")
        return b[:n].ljust(n, b" ")

    def _std_inquiry(self) -> bytes:
        d = bytearray(96)
        d[0] = 0x00  # peripheral qualifier 000b, device type 00h (direct access block)
        d[1] = 0x00  # RMB 0
        d[2] = 0x06  # VERSION: SPC-4
        d[3] = 0x02  # response data format 2 (NORMACA 0, HISUP 0)
        d[4] = len(d) - 5  # additional length
        d[5] = 0x00  # SCCS ACC TPGS 3PC PROTECT: none
        d[6] = 0x00
        d[7] = 0x02  # CMDQUE
        d[8:16] = self._ascii(self.vendor, 8)
        d[16:32] = self._ascii(self.product, 16)
        d[32:36] = self._ascii(self.revision, 4)
        for i, v in enumerate(VERSION_DESCRIPTORS):
            d[58 + 2 * i : 60 + 2 * i] = v.to_bytes(2, "big")
        return bytes(d)

    def _vpd_supported(self) -> bytes:
        return bytes(VPD_PAGES)

    def _serial(self) -> bytes:
        return self._ascii(self.lun.serial, 252).rstrip(b" ") or b" "

    def _vpd_serial(self) -> bytes:
        return self._serial()

    def _naa(self) -> bytes:
        naa = bytes(self.lun.naa)
        if (len(naa) == 8 and naa[0] >> 4 in (2, 3, 5)) or (len(naa) == 16 and naa[0] >> 4 == 6):
            return naa
        return naa_from_serial(self.lun.serial)

    def _vpd_devid(self) -> bytes:
        naa = self._naa()
        # NAA: code set 1 (binary), association 0 (logical unit), designator type 3
        out = bytes((0x01, 0x03, 0x00, len(naa))) + naa
        # T10 vendor ID: code set 2 (ASCII), association 0, designator type 1
        t10 = self._ascii(self.vendor, 8) + self._serial()[:240]
        out += bytes((0x02, 0x01, 0x00, len(t10))) + t10
        return out

    def _blocks_of(self, nbytes: int) -> int:
        return nbytes // self._bs

    def _vpd_block_limits(self) -> bytes:
        lim = self.limits
        d = bytearray(0x3C)  # page length 3Ch; offsets below are page offset - 4
        d[0] = 0x01  # WSNZ: WRITE SAME with 0 blocks is refused
        d[1] = min(255, self._blocks_of(lim.max_compare_and_write))  # MAXIMUM COMPARE AND WRITE
        d[2:4] = min(0xFFFF, self._blocks_of(lim.optimal_granularity)).to_bytes(2, "big")
        d[4:8] = min(0xFFFFFFFF, self._blocks_of(lim.max_transfer)).to_bytes(4, "big")
        d[8:12] = min(0xFFFFFFFF, self._blocks_of(lim.optimal_transfer)).to_bytes(4, "big")
        d[16:20] = min(0xFFFFFFFF, self._blocks_of(lim.max_unmap)).to_bytes(4, "big")
        d[20:24] = min(0xFFFFFFFF, lim.max_unmap_descriptors).to_bytes(4, "big")
        d[24:28] = min(0xFFFFFFFF, self._blocks_of(lim.unmap_granularity)).to_bytes(4, "big")
        d[28:32] = (0x80000000).to_bytes(4, "big")  # UGAVALID, alignment 0
        d[32:40] = self._blocks_of(lim.max_write_same).to_bytes(8, "big")
        return bytes(d)

    def _vpd_block_chars(self) -> bytes:
        d = bytearray(0x3C)
        d[0:2] = (0x0001).to_bytes(2, "big")  # MEDIUM ROTATION RATE: non-rotating
        return bytes(d)

    def _vpd_lbp(self) -> bytes:
        # LBPU (UNMAP), LBPWS (WRITE SAME 16 unmap), LBPWS10, LBPRZ=001b; DP 0
        flags = 0x80 | 0x40 | 0x20 | 0x04
        return bytes((0x00, flags, 0x02, 0x00))  # threshold exp 0; provisioning type: thin

    # -- mode pages ----------------------------------------------------------------------

    def _page(self, code: int, pc: int) -> bytes:
        if code == PAGE_CACHING:
            p = bytearray(20)
            p[0], p[1] = PAGE_CACHING, 0x12
            if pc != PC_CHANGEABLE and self.lun.wce:
                p[2] |= 0x04  # WCE
            return bytes(p)
        p = bytearray(12)  # PAGE_CONTROL
        p[0], p[1] = PAGE_CONTROL, 0x0A
        if pc == PC_CHANGEABLE:
            p[2] = 0x04  # D_SENSE is the one changeable bit
            return bytes(p)
        if pc == PC_CURRENT and self._d_sense:
            p[2] |= 0x04
        p[3] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering; QERR 0
        p[5] = 0x40  # TAS (LIO completes tasks aborted by other nexuses as TASK ABORTED)
        p[8:10] = b"\xff\xff"  # BUSY TIMEOUT PERIOD: unlimited
        return bytes(p)

    def _mode_sense(self, c: _Cmd) -> Response:
        cdb = c.cdb
        ten = cdb[0] == C.MODE_SENSE_10
        if cdb[1] & ~(0x18 if ten else 0x08) & 0xFF:
            raise S.bad_cdb(1, 7)
        dbd = bool(cdb[1] & 0x08)
        llbaa = ten and bool(cdb[1] & 0x10)
        pc, code, sub = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        alloc = C.be(cdb, 7, 2) if ten else cdb[4]
        if pc == PC_SAVED:
            raise S.illegal(S.SAVING_PARAMETERS_NOT_SUPPORTED, FieldPointer(2, 7))
        if code == PAGE_ALL:
            codes = [PAGE_CACHING, PAGE_CONTROL]
        elif code in (PAGE_CACHING, PAGE_CONTROL):
            codes = [code]
        else:
            raise S.bad_cdb(2, 5)
        if sub not in (0x00, 0xFF):
            raise S.bad_cdb(3, 7)
        pages = b"".join(self._page(p, pc) for p in codes)
        bd = b""
        if not dbd:
            blocks, bs = (0, 0) if pc == PC_CHANGEABLE else (self._blocks, self._bs)
            if llbaa:
                bd = blocks.to_bytes(8, "big") + bytes(4) + bs.to_bytes(4, "big")
            else:
                bd = min(blocks, 0xFFFFFFFF).to_bytes(4, "big") + b"\0" + bs.to_bytes(3, "big")
        dsp = (0x80 if self.lun.read_only else 0) | 0x10  # WP, DPOFUA
        if ten:
            total = 8 + len(bd) + len(pages)
            longlba = 0x01 if len(bd) == 16 else 0
            head = (total - 2).to_bytes(2, "big") + bytes((0, dsp, longlba, 0))
            head += len(bd).to_bytes(2, "big")
        else:
            total = 4 + len(bd) + len(pages)
            head = bytes((min(total - 1, 0xFF), 0, dsp, len(bd)))
        return self._data(c, head + bd + pages, alloc)

    def _mode_select(self, c: _Cmd) -> Response:
        cdb = c.cdb
        ten = cdb[0] == C.MODE_SELECT_10
        if cdb[1] & 0x01:
            raise S.bad_cdb(1, 0)  # SP: no saved pages
        if cdb[1] & ~0x11 & 0xFF:
            raise S.bad_cdb(1, 7)
        plen = C.be(cdb, 7, 2) if ten else cdb[4]
        len_byte = 7 if ten else 4
        if plen == 0:
            return Response(GOOD)
        if not cdb[1] & 0x10:
            raise S.bad_cdb(1, 4)  # PF=0: vendor-specific page format not supported
        buf = self._params(c, plen, len_byte)
        hlen = 8 if ten else 4
        if len(buf) < hlen:
            raise S.param_length_error()
        if ten:
            longlba = bool(buf[4] & 0x01)
            bdl = C.be(buf, 6, 2)
            bdl_at = 6
        else:
            longlba = False
            bdl = buf[3]
            bdl_at = 3
        want = 16 if longlba else 8
        if bdl not in (0, want):
            raise S.bad_param(bdl_at, 7)
        pos = hlen
        if bdl:
            if pos + bdl > len(buf):
                raise S.param_length_error()
            if longlba:
                nblocks, bs = C.be(buf, pos, 8), C.be(buf, pos + 12, 4)
                cur = self._blocks
                bs_at = pos + 12
            else:
                nblocks, bs = C.be(buf, pos, 4), C.be(buf, pos + 5, 3)
                cur = min(self._blocks, 0xFFFFFFFF)
                bs_at = pos + 5
            if nblocks not in (0, cur):
                raise S.bad_param(pos, 7)
            if bs != self._bs:
                raise S.bad_param(bs_at, 7)
            pos += bdl
        new_d_sense = self._d_sense
        while pos < len(buf):
            if pos + 2 > len(buf):
                raise S.param_length_error()
            code, spf = buf[pos] & 0x3F, bool(buf[pos] & 0x40)
            if spf:
                raise S.bad_param(pos, 6)  # dmsnap has no subpages
            if code not in (PAGE_CACHING, PAGE_CONTROL):
                raise S.bad_param(pos, 5)
            cur_page = bytearray(self._page(code, PC_CURRENT))
            if code == PAGE_CONTROL:
                cur_page[2] = (cur_page[2] & ~0x04) | (0x04 if new_d_sense else 0)
            mask = self._page(code, PC_CHANGEABLE)
            if buf[pos + 1] != cur_page[1]:
                raise S.bad_param(pos + 1, 7)
            if pos + len(cur_page) > len(buf):
                raise S.param_length_error()
            got = buf[pos : pos + len(cur_page)]
            for i in range(2, len(cur_page)):
                diff = (got[i] ^ cur_page[i]) & ~mask[i] & 0xFF
                if diff:
                    raise S.bad_param(pos + i, diff.bit_length() - 1)
            if code == PAGE_CONTROL:
                new_d_sense = bool(got[2] & 0x04)
            pos += len(cur_page)
        with self._lock:
            self._d_sense = new_d_sense
        return Response(GOOD)

    def _start_stop(self, c: _Cmd) -> Response:
        cdb = c.cdb
        if cdb[1] & 0xFE:
            raise S.bad_cdb(1, 7)
        power = cdb[4] >> 4
        if power not in (0x0, 0x1, 0x2, 0x3, 0x7, 0xA, 0xB):
            raise S.bad_cdb(4, 7)
        if cdb[4] & 0x08:
            raise S.bad_cdb(4, 3)
        if power == 0:
            if cdb[4] & 0x02:
                raise S.bad_cdb(4, 1)  # LOEJ: the medium is not removable
            if not cdb[4] & 0x01 and not cdb[4] & 0x04:
                self._io(lambda: self.lun.flush(), write=True)  # stop: write the cache back
        return Response(GOOD)

    # -- SBC: capacity -------------------------------------------------------------------

    def _read_capacity10(self, c: _Cmd) -> Response:
        cdb = c.cdb
        if not cdb[8] & 0x01 and C.be(cdb, 2, 4):
            raise S.bad_cdb(2, 7)  # LBA without PMI
        last = max(self._blocks, 1) - 1
        ret = 0xFFFFFFFF if last > 0xFFFFFFFE else last
        return self._data(c, ret.to_bytes(4, "big") + self._bs.to_bytes(4, "big"), 8)

    def _read_capacity16(self, c: _Cmd) -> Response:
        cdb = c.cdb
        if not cdb[14] & 0x01 and C.be(cdb, 2, 8):
            raise S.bad_cdb(2, 7)
        d = bytearray(32)
        d[0:8] = (max(self._blocks, 1) - 1).to_bytes(8, "big")
        d[8:12] = self._bs.to_bytes(4, "big")
        d[14] = 0x80 | 0x40  # LBPME (thin), LBPRZ (unmapped blocks read zeros)
        return self._data(c, bytes(d), C.be(cdb, 10, 4))

    # -- SBC: data -----------------------------------------------------------------------

    def _rw(self, c: _Cmd) -> tuple[C.Rw, int]:
        rw = C.rw_fields(c.cdb)
        if rw.protect:
            raise S.bad_cdb(1, 7)  # no protection information
        return rw, rw.blocks

    def _read(self, c: _Cmd) -> Response:
        rw, blocks = self._rw(c)
        self._max_transfer(rw, blocks)
        self._range(rw.lba, blocks)
        want = blocks * self._bs
        if c.data_in_len is not None and c.data_in_len < want:
            if c.data_in_len == 0:
                return Response(GOOD)
            nblk = -(-c.data_in_len // self._bs)
            data = self._read_lun(rw.lba * self._bs, nblk * self._bs)
            return Response(GOOD, data[: c.data_in_len])
        if not blocks:
            return Response(GOOD)
        return Response(GOOD, self._read_lun(rw.lba * self._bs, want))

    def _write(self, c: _Cmd) -> Response:
        rw, blocks = self._rw(c)
        self._writable()
        self._max_transfer(rw, blocks)
        self._range(rw.lba, blocks)
        data = self._exact(c, blocks * self._bs)
        if blocks:
            self._write_lun(rw.lba * self._bs, data, rw.fua)
        return Response(GOOD)

    def _write_verify(self, c: _Cmd) -> Response:
        rw, blocks = self._rw(c)
        if rw.bytchk & 0x2:
            raise S.bad_cdb(1, 2)  # BYTCHK 10b/11b reserved for WRITE AND VERIFY
        self._writable()
        self._max_transfer(rw, blocks)
        self._range(rw.lba, blocks)
        data = self._exact(c, blocks * self._bs)
        if blocks:
            off = rw.lba * self._bs
            self._write_lun(off, data, True)  # verified on the medium: stable first
            if rw.bytchk == 1:
                back = self._read_lun(off, len(data))
                if back != data:
                    raise self._miscompare(_first_diff(back, data))
        return Response(GOOD)

    def _verify(self, c: _Cmd) -> Response:
        rw, blocks = self._rw(c)
        if rw.bytchk == 2:
            raise S.bad_cdb(1, 2)
        self._max_transfer(rw, blocks)
        self._range(rw.lba, blocks)
        if rw.bytchk == 0 or not blocks:
            return Response(GOOD)  # medium verification: nothing can be found wrong here
        bs = self._bs
        off = rw.lba * bs
        if rw.bytchk == 1:
            data = self._exact(c, blocks * bs)
            have = self._read_lun(off, len(data))
            if have != data:
                raise self._miscompare(_first_diff(have, data))
            return Response(GOOD)
        one = self._exact(c, bs)  # BYTCHK 11b: one block compared with every block
        have = self._read_lun(off, blocks * bs)
        for i in range(blocks):
            blk = have[i * bs : (i + 1) * bs]
            if blk != one:
                raise self._miscompare(i * bs + _first_diff(blk, one))
        return Response(GOOD)

    def _compare_and_write(self, c: _Cmd) -> Response:
        """SBC-3 COMPARE AND WRITE: the first half of the Data-Out is compared
        with the blocks, the second written over them if equal, atomically
        with respect to every other write (the Lun's journal does both under
        one hold). A mismatch writes nothing: MISCOMPARE, MISCOMPARE DURING
        VERIFY OPERATION, INFORMATION = offset of the first differing byte."""
        cdb = c.cdb
        if cdb[1] & 0xE0:
            raise S.bad_cdb(1, 7)  # WRPROTECT: no protection information
        if cdb[1] & 0x05:  # reserved (FUA_NV, bit 1, is obsolete: ignored as LIO does)
            raise S.bad_cdb(1, (cdb[1] & 0x05).bit_length() - 1)
        if C.be(cdb, 10, 3):
            raise S.bad_cdb(10, 7)
        if cdb[14] & 0xE0:
            raise S.bad_cdb(14, 7)
        lba, blocks, fua = C.be(cdb, 2, 8), cdb[13], bool(cdb[1] & 0x08)
        self._writable()
        if blocks == 0:
            return Response(GOOD)  # SBC: no compare, no write, not an error
        if blocks > self._blocks_of(self.limits.max_compare_and_write):
            raise S.bad_cdb(13, 7)  # beyond MAXIMUM COMPARE AND WRITE LENGTH
        self._range(lba, blocks)
        n = blocks * self._bs
        data = self._exact(c, 2 * n)
        off = lba * self._bs
        fn = lambda: self.lun.compare_and_write(off, data[:n], data[n:], fua=fua)  # noqa: E731
        at = self._io(fn, write=True)
        if at is not None:
            raise self._miscompare(int(at))
        return Response(GOOD)

    def _sync_cache(self, c: _Cmd) -> Response:
        cdb = c.cdb
        if cdb[1] & ~0x06 & 0xFF:
            raise S.bad_cdb(1, 7)
        if len(cdb) == 10:
            lba, n = C.be(cdb, 2, 4), C.be(cdb, 7, 2)
        else:
            lba, n = C.be(cdb, 2, 8), C.be(cdb, 10, 4)
        self._range(lba, n)
        self._io(lambda: self.lun.flush(), write=True)
        return Response(GOOD)

    def _write_same(self, c: _Cmd) -> Response:
        cdb = c.cdb
        sixteen = len(cdb) == 16
        flags = cdb[1]
        if flags & 0xE0:
            raise S.bad_cdb(1, 7)  # WRPROTECT
        if flags & 0x10:
            raise S.bad_cdb(1, 4)  # ANCHOR: not supported (ANC_SUP 0)
        if flags & 0x06:
            raise S.bad_cdb(1, 2)  # PBDATA / LBDATA (obsolete)
        if flags & 0x01 and not sixteen:
            raise S.bad_cdb(1, 0)
        unmap, ndob = bool(flags & 0x08), bool(flags & 0x01)
        rw = C.rw_fields(cdb)
        self._writable()
        self._range(rw.lba, rw.blocks)
        if rw.blocks == 0 or rw.blocks * self._bs > self.limits.max_write_same:
            raise S.bad_cdb(rw.len_byte, 7)  # WSNZ=1 / MAXIMUM WRITE SAME LENGTH
        bs = self._bs
        pattern = bytes(bs) if ndob else self._exact(c, bs)
        off, length = rw.lba * bs, rw.blocks * bs
        if unmap and not any(pattern):
            self._io(lambda: self.lun.unmap(off, length), write=True)
            return Response(GOOD)
        chunk = max(bs, min(1 * MiB, self.limits.max_transfer) // bs * bs)
        buf = pattern * (chunk // bs)
        done = 0
        while done < length:
            n = min(chunk, length - done)
            self._write_lun(off + done, buf[:n], False)
            done += n
        return Response(GOOD)

    def _unmap(self, c: _Cmd) -> Response:
        cdb = c.cdb
        if cdb[1] & 0x01:
            raise S.bad_cdb(1, 0)  # ANCHOR
        if cdb[1] & 0xFE:
            raise S.bad_cdb(1, 7)
        self._writable()
        plen = C.be(cdb, 7, 2)
        if plen == 0:
            return Response(GOOD)
        if plen < 8:
            raise S.param_length_error()
        buf = self._params(c, plen, 7)
        bd_len = min(C.be(buf, 2, 2), plen - 8)
        count = bd_len // 16
        if count > self.limits.max_unmap_descriptors:
            raise S.bad_param(2, 7)
        ranges: list[tuple[int, int]] = []
        total = 0
        for i in range(count):
            at = 8 + 16 * i
            lba, n = C.be(buf, at, 8), C.be(buf, at + 8, 4)
            self._range(lba, n)
            total += n
            if total * self._bs > self.limits.max_unmap:
                raise S.bad_param(at + 8, 7)
            if n:
                ranges.append((lba, n))
        bs = self._bs
        for lba, n in ranges:
            self._io(lambda lba=lba, n=n: self.lun.unmap(lba * bs, n * bs), write=True)
        return Response(GOOD)

    # -- REPORT SUPPORTED OPERATION CODES ------------------------------------------------

    def _timeouts(self, op: _Op) -> bytes:
        return (10).to_bytes(2, "big") + bytes(2) + bytes(4) + op.timeout.to_bytes(4, "big")

    def _rsoc(self, c: _Cmd) -> Response:
        cdb = c.cdb
        rctd = bool(cdb[2] & 0x80)
        if cdb[2] & 0x78:
            raise S.bad_cdb(2, 6)
        opts = cdb[2] & 0x07
        req_op, req_sa = cdb[3], C.be(cdb, 4, 2)
        alloc = C.be(cdb, 6, 4)
        if opts == 0:
            body = bytearray()
            for op in sorted(self._ops.values(), key=lambda o: (o.opcode, o.sa or 0)):
                flags = (0x02 if rctd else 0) | (0x01 if op.sa is not None else 0)
                body += bytes((op.opcode, 0)) + (op.sa or 0).to_bytes(2, "big")
                body += bytes((0, flags)) + len(op.usage).to_bytes(2, "big")
                if rctd:
                    body += self._timeouts(op)
            return self._data(c, len(body).to_bytes(4, "big") + bytes(body), alloc)
        if opts not in (1, 2, 3):
            raise S.bad_cdb(2, 2)
        has_sa = req_op in self._sa_opcodes
        if opts == 1 and has_sa:
            raise S.bad_cdb(2, 2)
        if opts == 2 and not has_sa and (req_op, None) in self._ops:
            raise S.bad_cdb(2, 2)
        found = self._ops.get((req_op, req_sa if has_sa else None))
        if found is None:
            return self._data(c, bytes((0, 0x01, 0, 0)), alloc)  # SUPPORT 001b: not supported
        support = 0x05 if found.vendor else 0x03
        out = bytes((0, (0x80 if rctd else 0) | support)) + len(found.usage).to_bytes(2, "big")
        out += found.usage
        if rctd:
            out += self._timeouts(found)
        return self._data(c, out, alloc)

    # -- the vendor snapshot command (0xC0) ----------------------------------------------

    def _allowed(self, initiator: str) -> bool:
        try:
            return bool(self.snapshot_allowed(initiator))
        except Exception:
            log.exception("snapshot_allowed(%r) failed; refusing", initiator)
            return False

    def _dmsnap(self, c: _Cmd) -> Response:
        svc = self.snapshots
        if svc is None:  # not reachable: the opcode is not in the table then
            raise S.illegal(S.INVALID_COMMAND_OPERATION_CODE, FieldPointer(0, 7))
        sc = SC.decode_cdb(c.cdb)
        if not self._allowed(c.initiator):
            raise SenseError(Sense.of(Key.ILLEGAL_REQUEST, S.ACCESS_DENIED_NO_ACCESS_RIGHTS))
        if self.inband_rate is not None and (wait := self.inband_rate.take()) > 0:
            # before the parameter list is even read: nothing done, nothing changed
            raise SenseError(SC.rate_sense(math.ceil(wait * 1000)))
        params = b""
        if sc.service_action in SC.DATA_OUT:
            if sc.length == 0:
                raise S.param_length_error()
            if sc.length > SC.MAX_PARAM_LEN:
                raise S.bad_cdb(7, 7)
            params = self._params(c, sc.length, 7)
        if sc.service_action == SC.SA_DELETE:
            token = SC.decode_delete(params)
            if self.lun.read_only:  # an exported snapshot deletes nothing
                raise SenseError(Sense.of(Key.DATA_PROTECT, S.WRITE_PROTECTED))
            try:
                svc.delete(self.lun, token)
            except SC.SnapshotError as e:
                log.info("snapshot delete %s refused: %s", token.hex(), e)
                raise SenseError(SC.error_sense(e)) from None
            return Response(GOOD)
        if sc.service_action == SC.SA_CREATE:
            req = SC.decode_create(params, wait=sc.wait, group=sc.group)
            try:
                svc.create(self.lun, req)
            except SC.SnapshotError as e:
                log.info("snapshot request %s (%s) refused: %s", req.token.hex(), req.name, e)
                raise SenseError(SC.error_sense(e, labels_at=SC.OFF_NAME + len(req.name))) from None
            return Response(GOOD)
        try:
            if sc.service_action == SC.SA_STATUS:
                entries = [
                    e for e in svc.status(self.lun, sc.handle) if SC.handle_of(e.token) == sc.handle
                ]
            else:
                entries = list(svc.list(self.lun, sc.skip))
        except SC.SnapshotError as e:
            raise SenseError(SC.error_sense(e)) from None
        return self._data(c, SC.encode_entries(sc.service_action, entries), sc.length)


def _hex(cdb: object) -> str:
    try:
        return bytes(cdb[:16]).hex()  # type: ignore[index]
    except Exception:
        return repr(cdb)[:64]


def _first_diff(a: bytes, b: bytes) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))
