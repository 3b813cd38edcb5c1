"""The one chokepoint for device-mapper ioctls.

Every call to the kernel goes through :meth:`Control.call`: it fills the
``struct dm_ioctl`` header (layout from ``<linux/dm-ioctl.h>`` via cffi),
sets the interface version, refuses flags the command does not accept,
grows the buffer and retries when the kernel answers ``DM_BUFFER_FULL_FLAG``,
and turns a failing errno into :class:`DmError` naming the operation and the
device. Payload encoding/decoding of the variable-length records lives here
too, so nothing else touches raw kernel memory.
"""

from __future__ import annotations

import enum
import os
import select
from dataclasses import dataclass

from dmsnap.dm._dmffi import ffi, lib
from dmsnap.dm.errors import DmError, DmUnavailable

CONTROL_PATH = "/dev/mapper/control"

_HDR = ffi.sizeof("struct dm_ioctl")
_SPEC = ffi.sizeof("struct dm_target_spec")
_INITIAL_BUFFER = 16 * 1024
# A listing of thousands of devices or a huge table still fits; past this a
# runaway retry loop is the more likely explanation.
_MAX_BUFFER = 64 * 1024 * 1024


def _align8(n: int) -> int:
    return (n + 7) & ~7


class Cmd(enum.Enum):
    """Device-mapper commands with their ioctl number, a verb for messages
    and the input flags each one accepts."""

    VERSION = (lib.DM_VERSION, "version", 0)
    REMOVE_ALL = (lib.DM_REMOVE_ALL, "remove all", lib.DM_DEFERRED_REMOVE)
    LIST_DEVICES = (lib.DM_LIST_DEVICES, "list devices", lib.DM_UUID_FLAG)
    DEV_CREATE = (lib.DM_DEV_CREATE, "create", lib.DM_PERSISTENT_DEV_FLAG)
    DEV_REMOVE = (lib.DM_DEV_REMOVE, "remove", lib.DM_DEFERRED_REMOVE)
    DEV_RENAME = (lib.DM_DEV_RENAME, "rename", lib.DM_UUID_FLAG)
    DEV_SUSPEND = (
        lib.DM_DEV_SUSPEND,
        "suspend",
        lib.DM_SUSPEND_FLAG | lib.DM_NOFLUSH_FLAG | lib.DM_SKIP_LOCKFS_FLAG,
    )
    DEV_STATUS = (lib.DM_DEV_STATUS, "info", 0)
    DEV_WAIT = (lib.DM_DEV_WAIT, "wait", lib.DM_QUERY_INACTIVE_TABLE_FLAG | lib.DM_NOFLUSH_FLAG)
    DEV_ARM_POLL = (lib.DM_DEV_ARM_POLL, "arm poll", 0)
    TABLE_LOAD = (lib.DM_TABLE_LOAD, "load", lib.DM_READONLY_FLAG | lib.DM_SECURE_DATA_FLAG)
    TABLE_CLEAR = (lib.DM_TABLE_CLEAR, "clear", 0)
    TABLE_DEPS = (lib.DM_TABLE_DEPS, "deps", lib.DM_QUERY_INACTIVE_TABLE_FLAG)
    TABLE_STATUS = (
        lib.DM_TABLE_STATUS,
        "status",
        lib.DM_STATUS_TABLE_FLAG | lib.DM_NOFLUSH_FLAG | lib.DM_QUERY_INACTIVE_TABLE_FLAG,
    )
    LIST_VERSIONS = (lib.DM_LIST_VERSIONS, "list target versions", 0)
    GET_TARGET_VERSION = (lib.DM_GET_TARGET_VERSION, "target version", 0)
    TARGET_MSG = (lib.DM_TARGET_MSG, "message", lib.DM_QUERY_INACTIVE_TABLE_FLAG)

    def __init__(self, number: int, verb: str, allowed: int) -> None:
        self.number = number
        self.verb = verb
        self.allowed = allowed


@dataclass(frozen=True)
class Reply:
    """The header fields the kernel returned, plus the data area."""

    version: tuple[int, int, int]
    name: str
    uuid: str
    flags: int
    event_nr: int
    dev: int
    open_count: int
    target_count: int
    data: bytes

    @property
    def major(self) -> int:
        return os.major(self.dev)

    @property
    def minor(self) -> int:
        return os.minor(self.dev)


def _cstr(buf: bytes, start: int = 0) -> str:
    end = buf.index(b"\0", start)
    return buf[start:end].decode()


class Control:
    """An open ``/dev/mapper/control``; thread-safe (each call has its own buffer)."""

    def __init__(self, path: str = CONTROL_PATH) -> None:
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise DmUnavailable(
                "open", path, 2, "device-mapper is not available: modprobe dm-mod"
            ) from None
        except PermissionError:
            raise DmUnavailable("open", path, 13, "device-mapper needs root") from None
        # How often a reply did not fit and was retried: observable so tests
        # can prove the retry path ran.
        self.buffer_full_retries = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def fd(self) -> int:
        return self._fd

    # -- the chokepoint ------------------------------------------------------

    def call(
        self,
        cmd: Cmd,
        *,
        name: str | None = None,
        uuid: str | None = None,
        flags: int = 0,
        event_nr: int = 0,
        dev: int = 0,
        payload: bytes = b"",
        target_count: int = 0,
        device: str | None = None,
    ) -> Reply:
        """Issue one device-mapper ioctl.

        ``device`` is only used to name the device in error messages when
        neither ``name`` nor ``uuid`` does (e.g. a rename's new name).
        """
        if flags & ~cmd.allowed:
            raise ValueError(f"{cmd.verb}: flags {flags & ~cmd.allowed:#x} not accepted")
        label = device or name or uuid
        if name is not None and len(name.encode()) >= lib.DM_NAME_LEN:
            raise DmError(cmd.verb, label, 0, f"name longer than {lib.DM_NAME_LEN - 1} bytes")
        if uuid is not None and len(uuid.encode()) >= lib.DM_UUID_LEN:
            raise DmError(cmd.verb, label, 0, f"uuid longer than {lib.DM_UUID_LEN - 1} bytes")

        size = max(_INITIAL_BUFFER, _align8(_HDR + len(payload) + 8))
        while True:
            buf = ffi.new("char[]", size)
            hdr = ffi.cast("struct dm_ioctl *", buf)
            hdr.version[0] = lib.DM_VERSION_MAJOR
            hdr.version[1] = lib.DM_VERSION_MINOR
            hdr.version[2] = lib.DM_VERSION_PATCHLEVEL
            hdr.data_size = size
            hdr.data_start = _HDR
            hdr.flags = flags
            hdr.event_nr = event_nr
            hdr.dev = dev
            hdr.target_count = target_count
            if name is not None:
                ffi.memmove(hdr.name, name.encode(), len(name.encode()))
            if uuid is not None:
                ffi.memmove(hdr.uuid, uuid.encode(), len(uuid.encode()))
            if payload:
                ffi.memmove(buf + _HDR, payload, len(payload))
            # cffi releases the GIL around this call, so a blocking DEV_WAIT
            # does not stall other threads.
            rc = lib.ioctl(self._fd, cmd.number, buf)
            if rc < 0:
                raise DmError(cmd.verb, label, ffi.errno)
            if hdr.flags & lib.DM_BUFFER_FULL_FLAG:
                if size >= _MAX_BUFFER:
                    raise DmError(cmd.verb, label, 0, "reply larger than 64 MiB")
                size *= 2
                self.buffer_full_retries += 1
                continue
            start, end = hdr.data_start, hdr.data_size
            data = bytes(ffi.buffer(buf, size))[start:end] if end > start else b""
            return Reply(
                version=(hdr.version[0], hdr.version[1], hdr.version[2]),
                name=ffi.string(hdr.name).decode(),
                uuid=ffi.string(hdr.uuid).decode(),
                flags=hdr.flags,
                event_nr=hdr.event_nr,
                dev=hdr.dev,
                open_count=hdr.open_count,
                target_count=hdr.target_count,
                data=data,
            )

    # -- event polling ---------------------------------------------------------

    def arm_poll(self) -> None:
        """Arm the control fd so :meth:`poll` wakes on the next dm event of any device."""
        self.call(Cmd.DEV_ARM_POLL)

    def poll(self, timeout: float | None) -> bool:
        """Wait until a dm event happened since :meth:`arm_poll`; False on timeout."""
        p = select.poll()
        p.register(self._fd, select.POLLIN)
        ms = None if timeout is None else int(timeout * 1000)
        return bool(p.poll(ms))


# -- payload codecs (all kernel record layouts decoded in one place) -------------


def encode_targets(lines: list[tuple[int, int, str, str]]) -> bytes:
    """Encode (start, length, type, params) as consecutive dm_target_spec records.

    On input the kernel reads ``next`` as the offset from this spec to the next.
    """
    out = bytearray()
    for i, (start, length, ttype, params) in enumerate(lines):
        if len(ttype.encode()) >= lib.DM_MAX_TYPE_NAME:
            raise ValueError(f"target type {ttype!r} too long")
        p = params.encode() + b"\0"
        rec_len = _align8(_SPEC + len(p))
        spec = ffi.new("struct dm_target_spec *")
        spec.sector_start = start
        spec.length = length
        spec.status = 0
        spec.next = rec_len if i < len(lines) - 1 else 0
        ffi.memmove(spec.target_type, ttype.encode(), len(ttype.encode()))
        rec = bytearray(ffi.buffer(spec))
        rec += p
        rec += b"\0" * (rec_len - len(rec))
        out += rec
    return bytes(out)


def decode_targets(data: bytes, count: int) -> list[tuple[int, int, str, str]]:
    """Decode a status/table reply; on output ``next`` is the offset from the
    start of the data area."""
    out = []
    off = 0
    for _ in range(count):
        spec = ffi.from_buffer("struct dm_target_spec *", data[off : off + _SPEC])
        params = _cstr(data, off + _SPEC)
        out.append((spec.sector_start, spec.length, ffi.string(spec.target_type).decode(), params))
        off = spec.next
    return out


@dataclass(frozen=True)
class NameEntry:
    name: str
    dev: int
    event_nr: int | None
    uuid: str | None


def decode_name_list(data: bytes) -> list[NameEntry]:
    name_off = ffi.offsetof("struct dm_name_list", "name")
    out: list[NameEntry] = []
    off = 0
    if len(data) < name_off:
        return out
    while True:
        rec = ffi.from_buffer("struct dm_name_list *", data[off : off + name_off])
        if rec.dev == 0:  # the kernel's way of saying "no devices"
            return out
        nstart = off + name_off
        name = _cstr(data, nstart)
        tail = _align8(nstart + len(name.encode()) + 1)
        event_nr = uuid = None
        nxt = rec.next
        limit = off + nxt if nxt else len(data)
        if tail + 8 <= limit:
            event_nr = int.from_bytes(data[tail : tail + 4], "little")
            nl_flags = int.from_bytes(data[tail + 4 : tail + 8], "little")
            if nl_flags & lib.DM_NAME_LIST_FLAG_HAS_UUID:
                uuid = _cstr(data, tail + 8)
            elif nl_flags & lib.DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID:
                uuid = ""
        out.append(NameEntry(name, rec.dev, event_nr, uuid))
        if not nxt:
            return out
        off += nxt


def decode_versions(data: bytes) -> list[tuple[str, tuple[int, int, int]]]:
    name_off = ffi.offsetof("struct dm_target_versions", "name")
    out = []
    off = 0
    while off + name_off <= len(data):
        rec = ffi.from_buffer("struct dm_target_versions *", data[off : off + name_off])
        out.append((_cstr(data, off + name_off), tuple(rec.version)))
        if not rec.next:
            break
        off += rec.next
    return out


def decode_deps(data: bytes) -> list[int]:
    head = ffi.from_buffer("struct dm_target_deps *", data[: ffi.sizeof("struct dm_target_deps")])
    base = ffi.offsetof("struct dm_target_deps", "dev")
    return [
        int.from_bytes(data[base + 8 * i : base + 8 * i + 8], "little") for i in range(head.count)
    ]


def encode_message(sector: int, message: str) -> bytes:
    msg_off = ffi.offsetof("struct dm_target_msg", "message")
    head = ffi.new("struct dm_target_msg *")
    head.sector = sector
    return bytes(ffi.buffer(head))[:msg_off] + message.encode() + b"\0"
