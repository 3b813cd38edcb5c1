"""The replication stream: what `dmsnap send` writes and `dmsnap receive`
reads (docs/replication.md describes it byte by byte).

A stream is the preamble (8 bytes, ``DMSNAPRS``) and then records, each

    u16 type | u16 flags | u32 crc32c | u64 payload length | payload

all big-endian; the crc32c covers the 16-byte header (with its crc field
zero) and the payload, so a damaged length, type or byte of data is found
before anything of the record is used. The first record is the HEADER, the
last the END; nothing may follow END. Types with bit 15 set are optional: a
reader that does not know one skips it; an unknown type without that bit
is refused (it could change what the stream means).

The reader checks more than checksums, since a stream is only applied if it
is the one meant: offsets are 512-byte aligned, inside the volume and never
go backwards (a CURSOR promises that everything below it has been sent);
the DATA payload adds up to exactly the header's ``data_bytes``; END's
totals match what was read. A record is yielded only after all of that.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from dmsnap.journal.journal import crc32c
from dmsnap.rules import SECTOR

PREAMBLE = b"DMSNAPRS"
VERSION = 1
MAX_PAYLOAD = 16 << 20  # a DATA record's bytes; bounds a reader's memory
MAX_NAME = 255

_REC = struct.Struct(">HHIQ")
_HEADER = struct.Struct(">HHIQQQ16s16s16s16s")
_U64 = struct.Struct(">Q")
_ZERO = struct.Struct(">QQ")
_END = struct.Struct(">QQQ")

T_HEADER = 1
T_DATA = 2
T_ZERO = 3
T_CURSOR = 4
T_END = 5
OPTIONAL = 0x8000


class StreamError(Exception):
    """The stream is damaged, truncated or not what it claims: nothing of
    the record that failed has been used."""


class Truncated(StreamError):
    """The stream ended before its END record (a transfer cut short: resume
    from the receiver's cursor)."""


@dataclass(frozen=True)
class Header:
    """Which snapshot this stream turns into what, and how much follows."""

    volume_size: int
    block_size: int
    data_bytes: int  # exact DATA payload bytes in this stream
    pool_uuid: uuid.UUID
    volume_uuid: uuid.UUID
    base_uuid: uuid.UUID | None  # None: a full stream
    target_uuid: uuid.UUID
    base_name: str | None
    target_name: str
    start: int = 0  # resumed from this cursor (0: from the start)
    version: int = VERSION

    def encode(self) -> bytes:
        names = b""
        for n in (self.base_name or "", self.target_name):
            raw = n.encode()
            if len(raw) > MAX_NAME:
                raise ValueError(f"snapshot name longer than {MAX_NAME} bytes")
            names += struct.pack(">H", len(raw)) + raw
        return (
            _HEADER.pack(
                self.version,
                0,
                self.block_size,
                self.volume_size,
                self.data_bytes,
                self.start,
                self.pool_uuid.bytes,
                self.volume_uuid.bytes,
                (self.base_uuid or uuid.UUID(int=0)).bytes,
                self.target_uuid.bytes,
            )
            + names
        )

    @classmethod
    def decode(cls, p: bytes) -> Header:
        if len(p) < 2:
            raise StreamError("stream header is too short")
        (version,) = struct.unpack_from(">H", p)
        if version != VERSION:
            raise StreamError(
                f"stream format version {version}; this dmsnap reads version {VERSION}"
            )
        if len(p) < _HEADER.size + 4:
            raise StreamError("stream header is too short")
        v, _, bs, size, data, start, pool, vol, base, target = _HEADER.unpack_from(p)
        names: list[str] = []
        pos = _HEADER.size
        for _ in range(2):
            if pos + 2 > len(p):
                raise StreamError("stream header is too short")
            (n,) = struct.unpack_from(">H", p, pos)
            if n > MAX_NAME or pos + 2 + n > len(p):
                raise StreamError("stream header has a bad snapshot name length")
            try:
                names.append(p[pos + 2 : pos + 2 + n].decode())
            except UnicodeDecodeError as exc:
                raise StreamError("stream header has a snapshot name that is not UTF-8") from exc
            pos += 2 + n
        if pos != len(p):
            raise StreamError("stream header has trailing bytes")
        if bs == 0 or bs % SECTOR or size % SECTOR or start % SECTOR or start > size:
            raise StreamError("stream header has a bad size, block size or start")
        no_base = base == bytes(16)
        if no_base != (names[0] == ""):
            raise StreamError("stream header names a base without its UUID, or the reverse")
        return cls(
            volume_size=size,
            block_size=bs,
            data_bytes=data,
            pool_uuid=uuid.UUID(bytes=pool),
            volume_uuid=uuid.UUID(bytes=vol),
            base_uuid=None if no_base else uuid.UUID(bytes=base),
            target_uuid=uuid.UUID(bytes=target),
            base_name=names[0] or None,
            target_name=names[1],
            start=start,
            version=v,
        )


@dataclass(frozen=True)
class Data:
    offset: int
    data: bytes


@dataclass(frozen=True)
class Zero:
    """[offset, offset + length) must read zeros afterwards (unmapped on
    the source, or all zeros there)."""

    offset: int
    length: int


@dataclass(frozen=True)
class Cursor:
    """Everything below offset has been sent: a receiver that has applied
    and synced the records before this one may resume from here."""

    offset: int


@dataclass(frozen=True)
class End:
    data_bytes: int
    zero_bytes: int
    records: int  # records between HEADER and END


Record = Data | Zero | Cursor


def _bad_range(pos: int, offset: int, length: int, volume_size: int) -> str | None:
    """Why a record's range breaks the stream's rules (None: it does not):
    the writer refuses to write what the reader would refuse to read."""
    if offset % SECTOR or length % SECTOR or length <= 0:
        return f"range {offset}+{length} is not whole sectors"
    if offset < pos or offset + length > volume_size:
        return f"range {offset}+{length} goes backwards or past the volume"
    return None


def _bad_cursor(pos: int, offset: int, volume_size: int) -> str | None:
    if offset < pos or offset > volume_size or offset % SECTOR:
        return f"cursor {offset} is behind what was sent or past the volume"
    return None


def _frame(rtype: int, payload: bytes | memoryview) -> bytes:
    head = _REC.pack(rtype, 0, 0, len(payload))
    crc = crc32c(head + bytes(payload))
    return _REC.pack(rtype, 0, crc, len(payload)) + bytes(payload)


class Writer:
    """Writes one stream; refuses to write one the reader would refuse."""

    def __init__(self, out: IO[bytes], header: Header) -> None:
        self.out = out
        self.header = header
        self.pos = header.start  # the lowest offset the next record may touch
        self.data_bytes = 0
        self.zero_bytes = 0
        self.records = 0
        self.ended = False
        out.write(PREAMBLE + _frame(T_HEADER, header.encode()))

    def _range(self, offset: int, length: int) -> None:
        if self.ended:
            raise ValueError("the stream has ended")
        if why := _bad_range(self.pos, offset, length, self.header.volume_size):
            raise ValueError(why)
        self.pos = offset + length

    def data(self, offset: int, data: bytes | memoryview) -> None:
        for i in range(0, len(data), MAX_PAYLOAD):
            part = data[i : i + MAX_PAYLOAD]
            self._range(offset + i, len(part))
            self.out.write(_frame(T_DATA, _U64.pack(offset + i) + bytes(part)))
            self.data_bytes += len(part)
            self.records += 1

    def zero(self, offset: int, length: int) -> None:
        self._range(offset, length)
        self.out.write(_frame(T_ZERO, _ZERO.pack(offset, length)))
        self.zero_bytes += length
        self.records += 1

    def cursor(self, offset: int) -> None:
        if why := _bad_cursor(self.pos, offset, self.header.volume_size):
            raise ValueError(why)
        self.pos = offset
        self.out.write(_frame(T_CURSOR, _U64.pack(offset)))
        self.records += 1

    def end(self) -> End:
        if self.data_bytes != self.header.data_bytes:
            raise ValueError(
                f"the header promised {self.header.data_bytes} data bytes, "
                f"{self.data_bytes} were written"
            )
        end = End(self.data_bytes, self.zero_bytes, self.records)
        self.out.write(_frame(T_END, _END.pack(end.data_bytes, end.zero_bytes, end.records)))
        self.ended = True
        return end


def _read_exact(src: IO[bytes], n: int, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = src.read(n - len(buf))
        if not chunk:
            raise Truncated(f"stream ends inside {what} ({len(buf)} of {n} bytes)")
        buf += chunk
    return bytes(buf)


class Reader:
    """Reads one stream: ``header`` at once, then iterate for the records;
    ``end`` is set once END has been read and checked."""

    def __init__(self, src: IO[bytes]) -> None:
        self.src = src
        first = src.read(len(PREAMBLE))
        if first != PREAMBLE:
            if not first:
                raise Truncated("the stream is empty")
            if PREAMBLE.startswith(first):
                raise Truncated("stream ends inside its preamble")
            raise StreamError("not a dmsnap replication stream (bad preamble)")
        rtype, payload = self._record()
        if rtype != T_HEADER:
            raise StreamError(f"stream starts with record type {rtype}, not a header")
        self.header = Header.decode(payload)
        self.end: End | None = None
        self.pos = self.header.start
        self.data_bytes = 0
        self.zero_bytes = 0
        self.records = 0
        self.skipped = 0

    def _record(self) -> tuple[int, bytes]:
        head = self.src.read(_REC.size)
        if len(head) < _REC.size:
            if not head:
                raise Truncated("stream ends before its END record")
            head += _read_exact(self.src, _REC.size - len(head), "a record header")
        rtype, flags, crc, length = _REC.unpack(head)
        if length > MAX_PAYLOAD + _U64.size or flags:
            raise StreamError(f"damaged record header (type {rtype}, length {length})")
        payload = _read_exact(self.src, length, f"a record of type {rtype}")
        if crc32c(_REC.pack(rtype, flags, 0, length) + payload) != crc:
            raise StreamError(f"record of type {rtype} is damaged (checksum mismatch)")
        return rtype, payload

    def _range(self, offset: int, length: int) -> None:
        if why := _bad_range(self.pos, offset, length, self.header.volume_size):
            raise StreamError(why)
        self.pos = offset + length

    def __iter__(self) -> Iterator[Record]:
        while self.end is None:
            rtype, p = self._record()
            if rtype == T_END:
                if len(p) != _END.size:
                    raise StreamError("END record has the wrong length")
                end = End(*_END.unpack(p))
                mine = End(self.data_bytes, self.zero_bytes, self.records)
                if end != mine or self.data_bytes != self.header.data_bytes:
                    raise StreamError(
                        f"stream totals do not match: END says {end}, read {mine}, "
                        f"header promised {self.header.data_bytes} data bytes"
                    )
                if self.src.read(1):
                    raise StreamError("bytes follow the stream's END record")
                self.end = end
                return
            self.records += 1
            if rtype == T_DATA:
                if len(p) <= _U64.size:
                    raise StreamError("DATA record without data")
                (off,) = _U64.unpack_from(p)
                n = len(p) - _U64.size
                if self.data_bytes + n > self.header.data_bytes:
                    raise StreamError("stream carries more data than its header promised")
                self._range(off, n)
                self.data_bytes += n
                yield Data(off, p[_U64.size :])
            elif rtype == T_ZERO:
                if len(p) != _ZERO.size:
                    raise StreamError("ZERO record has the wrong length")
                off, n = _ZERO.unpack(p)
                self._range(off, n)
                self.zero_bytes += n
                yield Zero(off, n)
            elif rtype == T_CURSOR:
                if len(p) != _U64.size:
                    raise StreamError("CURSOR record has the wrong length")
                (off,) = _U64.unpack(p)
                if why := _bad_cursor(self.pos, off, self.header.volume_size):
                    raise StreamError(why)
                self.pos = off
                yield Cursor(off)
            elif rtype & OPTIONAL:
                self.skipped += 1
            else:
                raise StreamError(f"unknown record type {rtype} (a newer dmsnap's stream?)")
