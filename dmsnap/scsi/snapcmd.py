"""The in-band snapshot command (vendor opcode 0xC0): one codec for both ends.

The byte layout is specified in ``docs/scsi-snapshot-command.md``; this module
is its only implementation. The target (``Emulator`` → ``SnapshotService``)
uses :func:`decode_cdb`, :func:`decode_create`, :func:`encode_entries` and
:func:`error_sense`; the initiator (``dmsnap initiator``, over SG_IO) uses
:func:`create_cdb` / :func:`encode_create`, :func:`status_cdb`,
:func:`list_cdb`, :func:`delete_command`, :func:`decode_entries` and
:func:`explain`; the target decodes DELETE with :func:`decode_delete`.

CDB (10 bytes; the kernel passes only 10 CDB bytes for opcodes 0xC0-0xFF)::

    0     0xC0
    1     bits 4-0 SERVICE ACTION: 01h CREATE, 02h STATUS, 03h LIST, 04h DELETE (bits 7-5: 0)
    2     flags: bit 0 WAIT, bit 1 GROUP (CREATE only; other bits 0)
    3-6   STATUS: REQUEST HANDLE = bytes 12-15 of the request token;
          LIST: SKIP, the number of newest requests to pass over (a page; 0 first); else 0
    7-8   CREATE/DELETE: PARAMETER LIST LENGTH (Data-Out); STATUS/LIST: ALLOCATION LENGTH (Data-In)
    9     CONTROL

CREATE parameter list (Data-Out)::

    0-3   "DMSN"        4  VERSION (1)      5-7  reserved (0)
    8-23  REQUEST TOKEN (16 bytes, not all zero; chosen by the initiator)
    24    NAME LENGTH (1-48)    25..  NAME (ASCII, [A-Za-z0-9._-], not starting with - . _)
    then  LABEL COUNT (0-16), and per label: KEY LENGTH (1-63), KEY,
          VALUE LENGTH (2 bytes, 0-1024), VALUE (UTF-8, at most 256 characters)
    then  zero bytes up to the parameter list length (optional padding)

DELETE parameter list (Data-Out): bytes 0-23 as CREATE's (the REQUEST TOKEN
of the CREATE that made the snapshot), then zero padding.

STATUS / LIST data (Data-In): a 12-byte header ("DMSN", VERSION, SERVICE ACTION,
ENTRY COUNT (2), DATA LENGTH (4): bytes after the header in the complete
response) followed by entries, each starting with its own 2-byte length.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from dmsnap import rules
from dmsnap.rules import LABEL_KEY_RE, MAX_LABELS, MAX_NAME
from dmsnap.scsi import sense as S

OPCODE = 0xC0
CDB_LEN = 10

SA_CREATE = 0x01
SA_STATUS = 0x02
SA_LIST = 0x03
SA_DELETE = 0x04
SERVICE_ACTIONS = {SA_CREATE: "CREATE", SA_STATUS: "STATUS", SA_LIST: "LIST", SA_DELETE: "DELETE"}
DATA_OUT = frozenset((SA_CREATE, SA_DELETE))  # service actions that carry a parameter list

FLAG_WAIT = 0x01
FLAG_GROUP = 0x02

MAGIC = b"DMSN"
VERSION = 1
TOKEN_LEN = 16
HANDLE_LEN = 4
MAX_KEY = rules.MAX_LABEL_KEY
MAX_VALUE_BYTES = rules.MAX_LABEL_VALUE_BYTES
MAX_PARAM_LEN = 4096  # a CREATE parameter list longer than this is refused
MAX_RESPONSE = 0xFFFF  # the largest allocation length the CDB can carry
HEADER_LEN = 12
DELETE_LEN = 24  # magic, version, reserved, token
LIST_MAX = 64  # LIST reports at most this many requests (a page of the not deleted, newest first)
MAX_ERROR_BYTES = 1024

# offsets in the CREATE parameter list
OFF_MAGIC = 0
OFF_VERSION = 4
OFF_TOKEN = 8
OFF_NAME_LEN = 24
OFF_NAME = 25


class State(enum.IntEnum):
    PENDING = 1  # the marker is durable; the snapshot is not made yet
    DONE = 2  # the snapshot exists
    FAILED = 3  # the snapshot could not be made (see the entry's error)
    DELETED = 4  # made, then deleted (DELETE, or on the storage system)


@dataclass(frozen=True)
class SnapCdb:
    service_action: int
    wait: bool
    group: bool
    handle: bytes  # STATUS: 4 bytes; LIST: SKIP (big-endian); else b"\0\0\0\0"
    length: int  # parameter list length (CREATE) or allocation length (STATUS, LIST)

    @property
    def skip(self) -> int:
        """LIST: how many of the newest requests to pass over."""
        return int.from_bytes(self.handle, "big") if self.service_action == SA_LIST else 0


@dataclass(frozen=True)
class CreateRequest:
    token: bytes
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    wait: bool = False
    group: bool = False

    @property
    def handle(self) -> bytes:
        return handle_of(self.token)


@dataclass(frozen=True)
class SnapEntry:
    """One snapshot request as STATUS and LIST report it."""

    token: bytes
    name: str
    state: State
    group: bool = False
    marker: int = 0  # the journal marker id (0: none, e.g. an unjournaled pool)
    requested: int = 0  # Unix time (seconds) of the request, 0 if unknown
    snapshots: tuple[str, ...] = ()  # "POOL/VOL@SNAP" of every snapshot made
    labels: dict[str, str] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True)
class Entries:
    """A decoded STATUS/LIST response (what the initiator got)."""

    service_action: int
    entry_count: int  # entries in the complete response
    data_length: int  # bytes after the header in the complete response
    entries: list[SnapEntry]

    @property
    def truncated(self) -> bool:
        return len(self.entries) < self.entry_count

    @property
    def needed(self) -> int:
        """Allocation length that gets the complete response."""
        return HEADER_LEN + self.data_length


class ErrorKind(enum.Enum):
    """Why the target's SnapshotService refused or failed a request."""

    INVALID_NAME = "invalid_name"  # bad name or already in use
    INVALID_LABELS = "invalid_labels"
    DENIED = "denied"  # this initiator may not snapshot this LUN
    NOT_READY = "not_ready"  # journal stopped / failed: needs the operator
    BECOMING_READY = "becoming_ready"  # journal recovering / daemon starting
    IN_PROGRESS = "in_progress"  # WAIT ran out: the marker is durable, snapshot not made yet
    NO_SPACE = "no_space"  # no room for the snapshot
    FAILED = "failed"  # the snapshot could not be made (or deleted)
    UNKNOWN = "unknown"  # DELETE: no snapshot of this LUN's volume made by that token
    IN_USE = "in_use"  # DELETE: the snapshot is exported or open; nothing changed


class SnapshotError(Exception):
    """Raised by a SnapshotService; mapped to sense data by :func:`error_sense`."""

    def __init__(self, kind: ErrorKind, message: str = "", *, marker: int | None = None) -> None:
        super().__init__(message or kind.value)
        self.kind = kind
        self.marker = marker


# -- helpers ------------------------------------------------------------------------------


def new_token() -> bytes:
    while True:
        t = os.urandom(TOKEN_LEN)
        if any(t):
            return t


def handle_of(token: bytes) -> bytes:
    """The 4-byte REQUEST HANDLE that STATUS carries: the last 4 bytes of the token."""
    if len(token) != TOKEN_LEN:
        raise ValueError(f"a request token is {TOKEN_LEN} bytes, got {len(token)}")
    return bytes(token[TOKEN_LEN - HANDLE_LEN :])


def parse_token(text: str) -> bytes:
    """A token as people type it: 32 hex digits (dashes allowed, as in a UUID)."""
    h = text.strip().replace("-", "")
    try:
        tok = bytes.fromhex(h)
    except ValueError:
        raise ValueError(f"{text!r}: a request token is 32 hex digits") from None
    if len(tok) != TOKEN_LEN:
        raise ValueError(f"{text!r}: a request token is 32 hex digits")
    return tok


def check_name(name: str) -> str | None:
    """Why the snapshot name is not acceptable (:mod:`dmsnap.rules`), or None."""
    return rules.name_problem("snapshot", name)


def check_label(key: str, value: str) -> str | None:
    """Why ``key=value`` is not an acceptable label (:mod:`dmsnap.rules`), or None."""
    return rules.label_problem(key, value)


# -- CDBs (initiator) ---------------------------------------------------------------------


def _cdb(sa: int, flags: int, handle: bytes, length: int) -> bytes:
    if not 0 <= length <= 0xFFFF:
        raise ValueError(f"length {length} does not fit the CDB (0-65535)")
    return bytes((OPCODE, sa, flags)) + handle + length.to_bytes(2, "big") + b"\x00"


def create_cdb(param_len: int, *, wait: bool = False, group: bool = False) -> bytes:
    flags = (FLAG_WAIT if wait else 0) | (FLAG_GROUP if group else 0)
    return _cdb(SA_CREATE, flags, b"\0" * HANDLE_LEN, param_len)


def status_cdb(token_or_handle: bytes, alloc_len: int = MAX_RESPONSE) -> bytes:
    h = token_or_handle if len(token_or_handle) == HANDLE_LEN else handle_of(token_or_handle)
    return _cdb(SA_STATUS, 0, h, alloc_len)


def list_cdb(alloc_len: int = MAX_RESPONSE, skip: int = 0) -> bytes:
    if not 0 <= skip <= 0xFFFFFFFF:
        raise ValueError(f"skip {skip} does not fit the CDB (0-4294967295)")
    return _cdb(SA_LIST, 0, skip.to_bytes(HANDLE_LEN, "big"), alloc_len)


def create_command(req: CreateRequest) -> tuple[bytes, bytes]:
    """(CDB, parameter list) of a CREATE."""
    params = encode_create(req)
    return create_cdb(len(params), wait=req.wait, group=req.group), params


def delete_cdb(param_len: int = DELETE_LEN) -> bytes:
    return _cdb(SA_DELETE, 0, b"\0" * HANDLE_LEN, param_len)


def delete_command(token: bytes) -> tuple[bytes, bytes]:
    """(CDB, parameter list) of a DELETE of the snapshot that ``token``'s CREATE made."""
    params = encode_delete(token)
    return delete_cdb(len(params)), params


# -- CDB (target) -------------------------------------------------------------------------


def decode_cdb(cdb: bytes) -> SnapCdb:
    """Check and split the 10-byte CDB; a bad field raises SenseError (field pointer)."""
    if len(cdb) < CDB_LEN or cdb[0] != OPCODE:
        raise S.bad_cdb(0, 7)
    sa = cdb[1] & 0x1F
    if cdb[1] & 0xE0:
        raise S.bad_cdb(1, 7)
    if sa not in SERVICE_ACTIONS:
        raise S.bad_cdb(1, 4)
    flags = cdb[2]
    allowed = (FLAG_WAIT | FLAG_GROUP) if sa == SA_CREATE else 0
    if flags & ~allowed & 0xFF:
        bad = flags & ~allowed & 0xFF
        raise S.bad_cdb(2, bad.bit_length() - 1)
    handle = bytes(cdb[3:7])
    if sa not in (SA_STATUS, SA_LIST):  # reserved for the others
        for i in range(3, 7):
            if cdb[i]:
                raise S.bad_cdb(i, 7)
    return SnapCdb(
        sa,
        bool(flags & FLAG_WAIT),
        bool(flags & FLAG_GROUP),
        handle,
        int.from_bytes(cdb[7:9], "big"),
    )


# -- CREATE parameter list ----------------------------------------------------------------


def encode_create(req: CreateRequest) -> bytes:
    if len(req.token) != TOKEN_LEN or not any(req.token):
        raise ValueError(f"a request token is {TOKEN_LEN} bytes, not all zero")
    why = check_name(req.name)
    if why:
        raise ValueError(why)
    if len(req.labels) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels")
    out = bytearray(MAGIC + bytes((VERSION, 0, 0, 0)) + req.token)
    name = req.name.encode("ascii")
    out += bytes((len(name),)) + name
    out += bytes((len(req.labels),))
    for k, v in req.labels.items():
        why = check_label(k, v)
        if why:
            raise ValueError(why)
        kb, vb = k.encode("ascii"), v.encode()
        out += bytes((len(kb),)) + kb + len(vb).to_bytes(2, "big") + vb
    if len(out) > MAX_PARAM_LEN:
        raise ValueError(f"the request is longer than {MAX_PARAM_LEN} bytes")
    return bytes(out)


def decode_create(buf: bytes, *, wait: bool = False, group: bool = False) -> CreateRequest:
    """Parse a CREATE parameter list (exactly the parameter list length bytes).

    Raises SenseError: PARAMETER LIST LENGTH ERROR when it ends inside a
    field, INVALID FIELD IN PARAMETER LIST with a pointer at the bad field."""
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(buf):
            raise S.param_length_error()
        out = bytes(buf[pos : pos + n])
        pos += n
        return out

    if take(4) != MAGIC:
        raise S.bad_param(OFF_MAGIC, 7)
    if take(1)[0] != VERSION:
        raise S.bad_param(OFF_VERSION, 7)
    for i, b in enumerate(take(3)):
        if b:
            raise S.bad_param(5 + i, 7)
    token = take(TOKEN_LEN)
    if not any(token):
        raise S.bad_param(OFF_TOKEN, 7)
    n = take(1)[0]
    if not 1 <= n <= MAX_NAME:
        raise S.bad_param(OFF_NAME_LEN, 7)
    raw = take(n)
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise S.bad_param(OFF_NAME, 7) from None
    if check_name(name):
        raise S.bad_param(OFF_NAME, 7)
    count_at = pos
    count = take(1)[0]
    if count > MAX_LABELS:
        raise S.bad_param(count_at, 7)
    labels: dict[str, str] = {}
    for _ in range(count):
        klen_at = pos
        klen = take(1)[0]
        if not 1 <= klen <= MAX_KEY:
            raise S.bad_param(klen_at, 7)
        key_at = pos
        kraw = take(klen)
        vlen_at = pos
        vlen = int.from_bytes(take(2), "big")
        if vlen > MAX_VALUE_BYTES:
            raise S.bad_param(vlen_at, 7)
        val_at = pos
        vraw = take(vlen)
        try:
            key = kraw.decode("ascii")
        except UnicodeDecodeError:
            raise S.bad_param(key_at, 7) from None
        if not LABEL_KEY_RE.fullmatch(key) or key in labels:
            raise S.bad_param(key_at, 7)
        try:
            value = vraw.decode("utf-8")
        except UnicodeDecodeError:
            raise S.bad_param(val_at, 7) from None
        if check_label(key, value):
            raise S.bad_param(val_at, 7)
        labels[key] = value
    for i in range(pos, len(buf)):
        if buf[i]:
            raise S.bad_param(i, 7)
    return CreateRequest(token, name, labels, wait=wait, group=group)


# -- DELETE parameter list ----------------------------------------------------------------


def encode_delete(token: bytes) -> bytes:
    if len(token) != TOKEN_LEN or not any(token):
        raise ValueError(f"a request token is {TOKEN_LEN} bytes, not all zero")
    return MAGIC + bytes((VERSION, 0, 0, 0)) + token


def decode_delete(buf: bytes) -> bytes:
    """The request token of a DELETE parameter list (errors as decode_create's)."""
    if len(buf) < DELETE_LEN:
        raise S.param_length_error()
    if buf[0:4] != MAGIC:
        raise S.bad_param(OFF_MAGIC, 7)
    if buf[4] != VERSION:
        raise S.bad_param(OFF_VERSION, 7)
    for i in range(5, len(buf)):
        if buf[i] and not OFF_TOKEN <= i < OFF_TOKEN + TOKEN_LEN:
            raise S.bad_param(i, 7)  # reserved bytes and padding are zero
    token = bytes(buf[OFF_TOKEN : OFF_TOKEN + TOKEN_LEN])
    if not any(token):
        raise S.bad_param(OFF_TOKEN, 7)
    return token


# -- STATUS / LIST data -------------------------------------------------------------------


def _str8(s: str, limit: int = 255) -> bytes:
    b = s.encode()[:limit]
    return bytes((len(b),)) + b


def encode_entry(e: SnapEntry) -> bytes:
    if len(e.token) != TOKEN_LEN:
        raise ValueError("a request token is 16 bytes")
    body = bytearray(e.token)
    body += bytes((int(e.state), FLAG_GROUP if e.group else 0))
    body += (e.marker & (2**64 - 1)).to_bytes(8, "big")
    body += (max(0, e.requested) & (2**64 - 1)).to_bytes(8, "big")
    body += _str8(e.name)
    snaps = list(e.snapshots)[:255]
    body += bytes((len(snaps),))
    for s in snaps:
        body += _str8(s)
    labels = list(e.labels.items())[:255]
    body += bytes((len(labels),))
    for k, v in labels:
        vb = v.encode()[:MAX_VALUE_BYTES]
        body += _str8(k) + len(vb).to_bytes(2, "big") + vb
    err = e.error.encode()[:MAX_ERROR_BYTES]
    body += len(err).to_bytes(2, "big") + err
    return len(body).to_bytes(2, "big") + bytes(body)


def encode_entries(sa: int, entries: Iterable[SnapEntry], limit: int = MAX_RESPONSE) -> bytes:
    """The complete STATUS/LIST response: entries in the given order (newest
    first, by convention) while the whole fits in ``limit`` bytes (a response
    can always be fetched completely with the largest allocation length)."""
    body = bytearray()
    count = 0
    for e in entries:
        enc = encode_entry(e)
        if HEADER_LEN + len(body) + len(enc) > limit or count == 0xFFFF:
            break
        body += enc
        count += 1
    head = MAGIC + bytes((VERSION, sa)) + count.to_bytes(2, "big") + len(body).to_bytes(4, "big")
    return head + bytes(body)


class DecodeError(ValueError):
    """The Data-In bytes are not a dmsnap STATUS/LIST response."""


def decode_entries(buf: bytes) -> Entries:
    """Parse a STATUS/LIST response, possibly truncated by the allocation length
    (a partial trailing entry is dropped; see Entries.truncated / needed)."""
    if len(buf) < HEADER_LEN:
        raise DecodeError(f"response too short ({len(buf)} bytes)")
    if buf[0:4] != MAGIC:
        raise DecodeError("not a dmsnap response (bad magic)")
    if buf[4] != VERSION:
        raise DecodeError(f"unsupported response version {buf[4]}")
    sa = buf[5]
    count = int.from_bytes(buf[6:8], "big")
    dlen = int.from_bytes(buf[8:12], "big")
    end = min(len(buf), HEADER_LEN + dlen)
    pos = HEADER_LEN
    out: list[SnapEntry] = []
    while pos + 2 <= end and len(out) < count:
        elen = int.from_bytes(buf[pos : pos + 2], "big")
        if pos + 2 + elen > end:
            break  # cut by the allocation length
        out.append(_decode_entry(bytes(buf[pos + 2 : pos + 2 + elen])))
        pos += 2 + elen
    return Entries(sa, count, dlen, out)


def _decode_entry(b: bytes) -> SnapEntry:
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(b):
            raise DecodeError("entry ends inside a field")
        out = b[pos : pos + n]
        pos += n
        return out

    def str8() -> str:
        return take(take(1)[0]).decode("utf-8", "replace")

    token = take(TOKEN_LEN)
    st, flags = take(2)
    try:
        state = State(st)
    except ValueError:
        raise DecodeError(f"unknown request state {st}") from None
    marker = int.from_bytes(take(8), "big")
    requested = int.from_bytes(take(8), "big")
    name = str8()
    snaps = tuple(str8() for _ in range(take(1)[0]))
    labels: dict[str, str] = {}
    for _ in range(take(1)[0]):
        k = str8()
        labels[k] = take(int.from_bytes(take(2), "big")).decode("utf-8", "replace")
    error = take(int.from_bytes(take(2), "big")).decode("utf-8", "replace")
    return SnapEntry(
        token, name, state, bool(flags & FLAG_GROUP), marker, requested, snaps, labels, error
    )


# -- errors: service → sense (target), sense → words (initiator) ---------------------------

_KIND_SENSE: dict[ErrorKind, tuple[int, tuple[int, int], S.FieldPointer | None]] = {
    ErrorKind.INVALID_NAME: (
        S.Key.ILLEGAL_REQUEST,
        S.INVALID_FIELD_IN_PARAMETER_LIST,
        S.FieldPointer(OFF_NAME, 7, cdb=False),
    ),
    ErrorKind.INVALID_LABELS: (S.Key.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_PARAMETER_LIST, None),
    ErrorKind.DENIED: (S.Key.ILLEGAL_REQUEST, S.ACCESS_DENIED_NO_ACCESS_RIGHTS, None),
    ErrorKind.NOT_READY: (S.Key.NOT_READY, S.LUN_NOT_READY_MANUAL_INTERVENTION, None),
    ErrorKind.BECOMING_READY: (S.Key.NOT_READY, S.LUN_NOT_READY_BECOMING_READY, None),
    ErrorKind.IN_PROGRESS: (S.Key.NOT_READY, S.LUN_NOT_READY_OPERATION_IN_PROGRESS, None),
    ErrorKind.NO_SPACE: (S.Key.ILLEGAL_REQUEST, S.INSUFFICIENT_RESOURCES, None),
    ErrorKind.FAILED: (S.Key.HARDWARE_ERROR, S.INTERNAL_TARGET_FAILURE, None),
    ErrorKind.UNKNOWN: (
        S.Key.ILLEGAL_REQUEST,
        S.INVALID_FIELD_IN_PARAMETER_LIST,
        S.FieldPointer(OFF_TOKEN, 7, cdb=False),
    ),
    ErrorKind.IN_USE: (S.Key.ILLEGAL_REQUEST, S.COMMAND_SEQUENCE_ERROR, None),
}


# Too many in-band requests on this path (the target's token bucket is
# empty): ABORTED COMMAND (the initiator may retry) with a vendor-specific
# ASC/ASCQ (SPC reserves ASC 80h-FFh for vendors); INFORMATION holds the
# milliseconds until the target takes another.
INBAND_RATE_EXCEEDED = (0x80, 0x01)


def rate_sense(retry_ms: int) -> S.Sense:
    return S.Sense.of(S.Key.ABORTED_COMMAND, INBAND_RATE_EXCEEDED, information=retry_ms)


def error_sense(err: SnapshotError, *, labels_at: int | None = None) -> S.Sense:
    key, code, field_ptr = _KIND_SENSE[err.kind]
    if err.kind is ErrorKind.INVALID_LABELS and labels_at is not None:
        field_ptr = S.FieldPointer(labels_at, 7, cdb=False)
    return S.Sense(key, code[0], code[1], information=err.marker, field=field_ptr)


def explain(sense: S.Sense, service_action: int = SA_CREATE) -> str:
    """What a CHECK CONDITION on the snapshot command means, in words."""
    code = sense.code
    f = sense.field
    if sense.key == S.Key.ILLEGAL_REQUEST:
        if code == S.INVALID_COMMAND_OPERATION_CODE:
            return (
                "the device does not accept the dmsnap snapshot command (not a dmsnap "
                "volume, or snapshots are disabled for this export)"
            )
        if code == S.ACCESS_DENIED_NO_ACCESS_RIGHTS:
            return "this initiator is not allowed to request snapshots of this volume"
        if code == S.INSUFFICIENT_RESOURCES:
            return "the storage system has no room for the snapshot"
        if code == S.INVALID_FIELD_IN_PARAMETER_LIST and f is not None and not f.cdb:
            if f.byte == OFF_NAME:
                return "the snapshot name is not acceptable or already in use"
            if f.byte == OFF_TOKEN and service_action == SA_DELETE:
                return (
                    "no snapshot of this volume was made with that request token "
                    "(unknown token, or the request failed)"
                )
            if f.byte == OFF_TOKEN:
                return "the request token is not acceptable"
            if f.byte in (OFF_MAGIC, OFF_VERSION):
                return "the target does not understand this request format/version"
            return f"the request was refused: bad parameter at byte {f.byte} (labels?)"
        if code == S.INVALID_FIELD_IN_CDB:
            where = f" (CDB byte {f.byte})" if f is not None else ""
            return f"the target refused the command{where}: flags or service action not supported"
        if code == S.PARAMETER_LIST_LENGTH_ERROR:
            return "the request is truncated (parameter list length)"
        if code == S.COMMAND_SEQUENCE_ERROR:
            return (
                "the snapshot is in use on the storage system (exported or open); "
                "nothing was deleted"
            )
    if sense.key == S.Key.DATA_PROTECT and code == S.WRITE_PROTECTED:
        return "the device is read-only (an exported snapshot): it cannot delete snapshots"
    if sense.key == S.Key.NOT_READY:
        mk = f" (marker {sense.information})" if sense.information else ""
        if code == S.LUN_NOT_READY_OPERATION_IN_PROGRESS and service_action == SA_DELETE:
            return f"the snapshot is requested{mk} but not made yet; delete it later"
        if code == S.LUN_NOT_READY_OPERATION_IN_PROGRESS:
            return (
                f"the snapshot is requested and durable{mk} but not made yet; "
                "ask for its status later"
            )
        if code == S.LUN_NOT_READY_BECOMING_READY:
            return "the storage system is starting (journal recovery); try again shortly"
        if code == S.LUN_NOT_READY_MANUAL_INTERVENTION:
            return "snapshots are unavailable on the storage system (journal stopped or failed)"
    if sense.key == S.Key.ABORTED_COMMAND and code == INBAND_RATE_EXCEEDED:
        after = f" in {sense.information} ms" if sense.information else " later"
        return f"too many in-band requests from this initiator: nothing was done; try again{after}"
    if sense.key == S.Key.HARDWARE_ERROR and code == S.INTERNAL_TARGET_FAILURE:
        what = {
            SA_CREATE: "the snapshot could not be made",
            SA_DELETE: "the snapshot could not be deleted",
        }.get(service_action, "target error")
        return f"{what} (internal target failure; see the storage system's log)"
    return sense.describe()
