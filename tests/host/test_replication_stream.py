"""The replication stream codec: what is written is read back exactly, and
a damaged, truncated or inconsistent stream is refused before any record of
it that is wrong is handed out."""

from __future__ import annotations

import io
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmsnap.replication import stream as S

U = [uuid.UUID(int=i + 1) for i in range(4)]
SIZE = 1 << 20


def header(data_bytes: int, *, base: bool = True, start: int = 0) -> S.Header:
    return S.Header(
        volume_size=SIZE,
        block_size=65536,
        data_bytes=data_bytes,
        pool_uuid=U[0],
        volume_uuid=U[1],
        base_uuid=U[2] if base else None,
        target_uuid=U[3],
        base_name="monday" if base else None,
        target_name="tuesday",
        start=start,
    )


@st.composite
def plans(draw) -> list[tuple[str, int, int]]:
    """Increasing, sector-aligned records: data, zero ranges and cursors."""
    out: list[tuple[str, int, int]] = []
    pos = 0
    for _ in range(draw(st.integers(0, 12))):
        gap = draw(st.integers(0, 8)) * 512
        kind = draw(st.sampled_from(["data", "zero", "cursor"]))
        n = draw(st.integers(1, 16)) * 512
        if pos + gap + n > SIZE:
            break
        pos += gap
        if kind == "cursor":
            out.append(("cursor", pos, 0))
        else:
            out.append((kind, pos, n))
            pos += n
    return out


def write(plan: list[tuple[str, int, int]], *, base: bool = True) -> bytes:
    buf = io.BytesIO()
    total = sum(n for k, _, n in plan if k == "data")
    w = S.Writer(buf, header(total, base=base))
    for kind, off, n in plan:
        if kind == "data":
            w.data(off, bytes([off // 512 % 251]) * n)
        elif kind == "zero":
            w.zero(off, n)
        else:
            w.cursor(off)
    w.end()
    return buf.getvalue()


def read_all(blob: bytes) -> tuple[S.Header, list]:
    r = S.Reader(io.BytesIO(blob))
    recs = list(r)
    assert r.end is not None
    return r.header, recs


@settings(max_examples=300, deadline=None)
@given(plans(), st.booleans())
def test_round_trip(plan, base) -> None:
    h, recs = read_all(write(plan, base=base))
    assert h == header(sum(n for k, _, n in plan if k == "data"), base=base)
    want = []
    for kind, off, n in plan:
        if kind == "data":
            want.append(S.Data(off, bytes([off // 512 % 251]) * n))
        elif kind == "zero":
            want.append(S.Zero(off, n))
        else:
            want.append(S.Cursor(off))
    assert recs == want


@settings(max_examples=500, deadline=None)
@given(plans(), st.data())
def test_any_flipped_bit_is_refused_and_never_handed_out(plan, data) -> None:
    blob = bytearray(write(plan))
    i = data.draw(st.integers(0, len(blob) - 1))
    blob[i] ^= 1 << data.draw(st.integers(0, 7))
    good = read_all(write(plan))[1]
    got = []
    with pytest.raises(S.StreamError):
        r = S.Reader(io.BytesIO(bytes(blob)))
        for rec in r:
            got.append(rec)
    # what came out before the damage is exactly the stream's own records
    assert got == good[: len(got)]


@settings(max_examples=300, deadline=None)
@given(plans(), st.data())
def test_a_cut_stream_is_truncated_not_complete(plan, data) -> None:
    blob = write(plan)
    cut = data.draw(st.integers(0, len(blob) - 1))
    got = []
    with pytest.raises(S.Truncated):
        for rec in S.Reader(io.BytesIO(blob[:cut])):
            got.append(rec)
    assert got == read_all(blob)[1][: len(got)]


def test_unknown_optional_records_are_skipped_others_refused() -> None:
    blob = write([("data", 0, 512)])
    end_at = blob.rindex(S._frame(S.T_END, S._END.pack(512, 0, 1)))
    extra = S._frame(S.OPTIONAL | 7, b"future")
    opt = blob[:end_at] + extra + S._frame(S.T_END, S._END.pack(512, 0, 2))
    r = S.Reader(io.BytesIO(opt))
    assert list(r) == [S.Data(0, bytes(512))]
    assert r.skipped == 1
    bad = blob[:end_at] + S._frame(7, b"future") + S._frame(S.T_END, S._END.pack(512, 0, 2))
    with pytest.raises(S.StreamError, match="unknown record type 7"):
        list(S.Reader(io.BytesIO(bad)))


def test_a_newer_format_is_refused_by_name() -> None:
    h = S.Header(**{**header(0).__dict__, "version": 2})
    blob = S.PREAMBLE + S._frame(S.T_HEADER, h.encode())
    with pytest.raises(S.StreamError, match="format version 2; this dmsnap reads version 1"):
        S.Reader(io.BytesIO(blob))


def test_totals_must_match_the_header() -> None:
    buf = io.BytesIO()
    w = S.Writer(buf, header(1024))
    w.data(0, bytes(512))
    with pytest.raises(ValueError, match="promised 1024 data bytes, 512"):
        w.end()
    # a forged END that agrees with itself but not with the header
    blob = buf.getvalue() + S._frame(S.T_END, S._END.pack(512, 0, 1))
    with pytest.raises(S.StreamError, match="totals do not match"):
        list(S.Reader(io.BytesIO(blob)))


def test_writer_refuses_ranges_the_reader_would_refuse() -> None:
    w = S.Writer(io.BytesIO(), header(0))
    with pytest.raises(ValueError):
        w.data(100, b"x" * 512)  # not aligned
    w.zero(4096, 512)
    with pytest.raises(ValueError):
        w.zero(0, 512)  # backwards
    with pytest.raises(ValueError):
        w.zero(SIZE, 512)  # past the volume
    with pytest.raises(ValueError):
        w.cursor(0)


def test_not_a_stream() -> None:
    with pytest.raises(S.StreamError, match="bad preamble"):
        S.Reader(io.BytesIO(b"\x00" * 64))
    with pytest.raises(S.Truncated, match="empty"):
        S.Reader(io.BytesIO(b""))
