"""Shared pieces of the journal host tests (no tests in here).

* A "dm device" is a sparse regular file; the test backend (:class:`Controller`)
  materialises a marker by copying the volume files, as the real controller
  has device-mapper take a snapshot.
* :func:`parse_journal` reads the on-disk layout documented at the top of
  ``csrc/journal.c`` independently of the C code, and :func:`make_record`
  builds records by hand, so tests can tear, garble and forge them.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dmsnap._hotpath import lib
from dmsnap.journal import Journal, Marker

SB_FMT = "<QIIQQQQQQQII"  # magic version align journal_id generation capacity ckpt_seq ckpt_pos
# sb_seq min_gen crc zero
REC_FMT = "<QQQQQQIIIIII"  # magic journal_id gen seq offset marker_id type vol len crc ack_lag
# hcrc
SB_MAGIC = 0x3142534A4E534D44
REC_MAGIC = 0x3143524A4E534D44
RING_START = 8192
VOL = 16 << 20  # the unit tests' volume file (fixture vol1 in conftest.py)
HDR = 512
WRITE, MARKER, PAD, DISCARD, FORGET = 1, 2, 3, 4, 5

assert struct.calcsize(SB_FMT) == 80 and struct.calcsize(REC_FMT) == 72


def crc32c(data: bytes) -> int:
    return lib.jr_crc32c(data, len(data))


def make_volume(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def pattern(tag: int, length: int) -> bytes:
    """Unique, recognisable data: every 512-byte sector carries the tag and
    its index, so a sector in the wrong place or from the wrong write shows."""
    out = bytearray()
    for i in range(length // 512):
        out += struct.pack("<QQ", tag, i) * 32
    return bytes(out)


def sector_tag(sector: bytes) -> tuple[int, int] | None:
    """(tag, index) of a sector written by :func:`pattern`, None for zeros."""
    if sector == bytes(512):
        return None
    tag, idx = struct.unpack_from("<QQ", sector)
    assert sector == struct.pack("<QQ", tag, idx) * 32, "torn or foreign sector"
    return tag, idx


@dataclass
class Super:
    magic: int
    version: int
    align: int
    journal_id: int
    generation: int
    capacity: int
    ckpt_seq: int
    ckpt_pos: int
    sb_seq: int
    min_gen: int
    crc: int
    slot: int

    @property
    def valid(self) -> bool:
        raw = struct.pack(SB_FMT, *self.fields()[:-2], 0, 0)[:72]
        return self.magic == SB_MAGIC and self.crc == crc32c(raw)

    def fields(self) -> tuple[int, ...]:
        return (
            self.magic,
            self.version,
            self.align,
            self.journal_id,
            self.generation,
            self.capacity,
            self.ckpt_seq,
            self.ckpt_pos,
            self.sb_seq,
            self.min_gen,
            self.crc,
            0,
        )


@dataclass
class Record:
    pos: int  # ring position
    size: int
    journal_id: int
    generation: int
    seq: int
    offset: int
    marker_id: int
    type: int
    vol: int
    length: int
    data: bytes = field(repr=False)
    ack_lag: int = 0


def read_supers(path: Path) -> list[Super]:
    raw = Path(path).read_bytes()[:RING_START]
    out = []
    for slot in (0, 1):
        f = struct.unpack_from(SB_FMT, raw, slot * 4096)
        out.append(Super(*f[:11], slot=slot))
    return out


def current_super(path: Path) -> Super:
    valid = [s for s in read_supers(path) if s.valid]
    assert valid, "no valid superblock"
    return max(valid, key=lambda s: s.sb_seq)


def rec_size(length: int, align: int) -> int:
    body = HDR + (length + 511) // 512 * 512
    return (body + align - 1) // align * align


def parse_journal(path: Path, generation_now: int | None = None) -> tuple[Super, list[Record]]:
    """Walk the valid log from the checkpoint with the documented rules."""
    sb = current_super(path)
    ring = Path(path).read_bytes()[RING_START : RING_START + sb.capacity]
    cap = sb.capacity
    gen_limit = generation_now if generation_now is not None else sb.generation + 1
    pos, seq, prev_gen, walked = sb.ckpt_pos, sb.ckpt_seq, sb.min_gen, 0
    recs: list[Record] = []
    while walked < cap:
        f = struct.unpack_from(REC_FMT, ring, pos)
        magic, jid, gen, rseq, off, mid, typ, vol, ln, dcrc, ack_lag, hcrc = f
        if magic != REC_MAGIC or jid != sb.journal_id or rseq != seq:
            break
        if hcrc != crc32c(ring[pos : pos + 68]) or not (prev_gen <= gen < gen_limit):
            break
        if typ == PAD:
            if ln != cap - pos:
                break
            size, data = ln, b""
        elif typ == DISCARD:  # no data; the length is in marker_id
            if ln or dcrc or not vol or not mid or mid % 512 or off % 512:
                break
            size, data = rec_size(0, sb.align), b""
        elif typ == FORGET:  # no data; the bound (first seq kept) is in offset
            if ln or dcrc or not vol or mid or off > rseq:
                break
            size, data = rec_size(0, sb.align), b""
        elif typ in (WRITE, MARKER):
            size = rec_size(ln, sb.align)
            if size > cap - pos:
                break
            data = ring[pos + HDR : pos + HDR + ln]
            if crc32c(data) != dcrc:
                break
        else:
            break
        if walked + size > cap:
            break
        recs.append(Record(pos, size, jid, gen, rseq, off, mid, typ, vol, ln, data, ack_lag))
        prev_gen, seq, walked = gen, seq + 1, walked + size
        pos = (pos + size) % cap
    return sb, recs


def make_record(
    *,
    journal_id: int,
    generation: int,
    seq: int,
    type: int = WRITE,
    vol: int = 0,
    offset: int = 0,
    marker_id: int = 0,
    data: bytes = b"",
    align: int = 512,
    ack_lag: int = 0,
) -> bytes:
    """A complete record (header sector + data + padding) as on disk."""
    ln = len(data)
    head = struct.pack(
        REC_FMT,
        REC_MAGIC,
        journal_id,
        generation,
        seq,
        offset,
        marker_id,
        type,
        vol,
        ln,
        crc32c(data),
        ack_lag,
        0,
    )[:68]
    head += struct.pack("<I", crc32c(head))
    rec = head.ljust(HDR, b"\0") + data
    return rec.ljust(rec_size(ln, align), b"\0")


def write_ring(path: Path, pos: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(RING_START + pos)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class Controller:
    """Test backend: materialises each marker by copying the volume files.

    ``done_ids`` plays the catalog: a marker already in it is acknowledged
    without a second copy (exactly once across restarts). ``hold`` keeps
    the flusher standing at the marker until released."""

    def __init__(
        self,
        journal: Journal,
        volumes: dict[int, Path],
        snapdir: Path | None = None,
        done_ids: set[int] | None = None,
    ) -> None:
        self.j = journal
        self.volumes = volumes
        self.snapdir = snapdir
        self.snaps: dict[int, tuple[int, dict[int, bytes]]] = {}
        self.order: list[int] = []
        self.delivered: list[Marker] = []
        self.done_ids = done_ids if done_ids is not None else set()
        self.hold = threading.Event()
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Controller:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self.hold.clear()
        self._t.join(10)
        if self.errors:
            raise self.errors[0]

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    m = self.j.next_marker(0.05)
                except OSError:
                    return
                if m is None:
                    continue
                while self.hold.is_set() and not self._stop.is_set():
                    time.sleep(0.005)
                if self._stop.is_set():
                    return
                self.delivered.append(m)
                if m.id not in self.done_ids:
                    copies = {v: Path(p).read_bytes() for v, p in self.volumes.items()}
                    self.snaps[m.id] = (m.seq, copies)
                    self.order.append(m.id)
                    self.done_ids.add(m.id)
                self.j.marker_done(m.id)
        except BaseException as e:  # surfaced by stop()
            self.errors.append(e)


def apply(state: dict[int, bytearray], vol: int, offset: int, data: bytes) -> None:
    state[vol][offset : offset + len(data)] = data


def hold_marker(j: Journal, marker_id: int = 99) -> None:
    """Append a marker and wait until the flusher stands at it."""
    j.marker(marker_id, b"hold")
    m = j.next_marker(5)
    assert m is not None and m.id == marker_id


def test_every_c_function_in_the_headers_reaches_python() -> None:
    """The cffi declarations are read from csrc/*.h (csrc/build.py): a
    prototype the header reader dropped would be missing here."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    names: set[str] = set()
    for header in ("journal.h", "tcmu.h"):
        text = re.sub(r"/\*.*?\*/", "", (root / "csrc" / header).read_text(), flags=re.S)
        names |= set(re.findall(r"\b((?:jr|tc)_\w+)\s*\(", text))
    assert len(names) > 25
    assert sorted(n for n in names if not hasattr(lib, n)) == []
