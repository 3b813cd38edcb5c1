"""Sending a delta and receiving it: the receiver's copy becomes the target
snapshot byte for byte; a cut transfer resumes from the receiver's cursor; a
damaged stream leaves only whole, checked records applied; the rate limit
is smooth. Metadata from thin_restore, devices as files (no kernel)."""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_replication_delta import BLOCK_SECTORS, restore, snapshot_pairs

from dmsnap.replication import stream as S
from dmsnap.replication import transfer as T
from dmsnap.replication.delta import thin_delta, thin_map

BS = BLOCK_SECTORS * 512
NBLOCKS = 301
SIZE = NBLOCKS * BS - 8192  # the last pool block is partly past the volume


def content(data_block: int) -> bytes:
    """A data block's bytes: shared blocks are equal in both snapshots."""
    return hashlib.sha256(str(data_block).encode()).digest() * (BS // 32)


def image(path: Path, maps: dict[int, int]) -> Path:
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for v, d in maps.items():
            f.seek(v * BS)
            f.write(content(d)[: max(0, min(BS, SIZE - v * BS))])
    return path


def header(delta, start: int = 0, base: bool = True) -> S.Header:
    return S.Header(
        volume_size=SIZE,
        block_size=delta.block_size,
        data_bytes=T.data_bytes(delta, SIZE, start),
        pool_uuid=uuid.UUID(int=1),
        volume_uuid=uuid.UUID(int=2),
        base_uuid=uuid.UUID(int=3) if base else None,
        target_uuid=uuid.UUID(int=4),
        base_name="a" if base else None,
        target_name="b",
        start=start,
    )


def send_bytes(delta, src: Path, start: int = 0, base: bool = True, **kw) -> bytes:
    out = io.BytesIO()
    fd = os.open(src, os.O_RDONLY)
    try:
        T.send(out, header(delta, start, base), delta, T.FdSource(fd), **kw)
    finally:
        os.close(fd)
    return out.getvalue()


def apply(blob: bytes, dst: Path, cursors: list[int], start: int = 0) -> S.End:
    def check(h: S.Header) -> None:
        if h.start != start:
            raise ValueError(f"stream starts at {h.start}, receiver is at {start}")

    fd = os.open(dst, os.O_RDWR)
    try:
        return T.receive(io.BytesIO(blob), T.FileTarget(fd), check=check, on_cursor=cursors.append)
    finally:
        os.close(fd)


SETTINGS = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(snapshot_pairs())
def test_incremental_and_full_make_the_target_exactly(tmp_path: Path, pair) -> None:
    base, target = pair
    meta = restore(tmp_path, {1: base, 2: target})
    src = image(tmp_path / "target.img", target)
    want = src.read_bytes()
    # incremental onto a copy of the base
    dst = image(tmp_path / "replica.img", base)
    d = thin_delta(meta, 1, 2, metadata_snap=False)
    end = apply(send_bytes(d, src), dst, [])
    assert dst.read_bytes() == want
    assert end.data_bytes == T.data_bytes(d, SIZE)
    # full onto an empty volume
    full = tmp_path / "full.img"
    with open(full, "wb") as f:
        f.truncate(SIZE)
    apply(send_bytes(thin_map(meta, 2, metadata_snap=False), src, base=False), full, [])
    assert full.read_bytes() == want


@SETTINGS
@given(snapshot_pairs(), st.floats(0.05, 0.95))
def test_a_cut_transfer_resumes_from_the_cursor(tmp_path: Path, pair, where) -> None:
    base, target = pair
    meta = restore(tmp_path, {1: base, 2: target})
    src = image(tmp_path / "target.img", target)
    dst = image(tmp_path / "replica.img", base)
    d = thin_delta(meta, 1, 2, metadata_snap=False)
    whole = send_bytes(d, src, cursor_every=4 * BS)
    cursors: list[int] = []
    with pytest.raises(S.Truncated):
        apply(whole[: int(len(whole) * where)], dst, cursors)
    start = cursors[-1] if cursors else 0
    rest = send_bytes(d, src, start=start, cursor_every=4 * BS)
    apply(rest, dst, [], start=start)
    assert dst.read_bytes() == src.read_bytes()
    if start:
        assert len(rest) < len(whole)  # not from scratch


@SETTINGS
@given(snapshot_pairs(), st.data())
def test_a_damaged_stream_applies_only_whole_records(tmp_path: Path, pair, data) -> None:
    base, target = pair
    meta = restore(tmp_path, {1: base, 2: target})
    src = image(tmp_path / "target.img", target)
    dst = image(tmp_path / "replica.img", base)
    before = dst.read_bytes()
    blob = bytearray(send_bytes(thin_delta(meta, 1, 2, metadata_snap=False), src))
    i = data.draw(st.integers(len(S.PREAMBLE), len(blob) - 1))
    blob[i] ^= 0x40
    with pytest.raises(S.StreamError):
        apply(bytes(blob), dst, [])
    after, want = dst.read_bytes(), src.read_bytes()
    for off in range(0, SIZE, 512):  # every sector is the base's or the target's
        sec = after[off : off + 512]
        assert sec in (before[off : off + 512], want[off : off + 512]), off


def test_the_rate_limit_is_smooth() -> None:
    now = [0.0]
    sent: list[tuple[float, int]] = []

    def sleep(s: float) -> None:
        now[0] += s

    lim = T.RateLimiter(1_000_000, clock=lambda: now[0], sleep=sleep)
    for _ in range(400):
        n = lim.chunk()
        lim.take(n)
        sent.append((now[0], n))
    total = sum(n for _, n in sent)
    assert total / now[0] == pytest.approx(1_000_000, rel=0.15)
    # no window of 0.2 s carries more than 0.2 s of rate plus one burst
    for t0, _ in sent:
        window = sum(n for t, n in sent if t0 <= t < t0 + 0.2)
        assert window <= 0.2 * 1_000_000 + lim.burst + lim.chunk()


def test_header_must_match_the_delta(tmp_path: Path) -> None:
    meta = restore(tmp_path, {1: {0: 0}, 2: {0: 1}})
    src = image(tmp_path / "t.img", {0: 1})
    d = thin_delta(meta, 1, 2, metadata_snap=False)
    bad = S.Header(**{**header(d).__dict__, "data_bytes": 1})
    fd = os.open(src, os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match="promises 1 data bytes"):
            T.send(io.BytesIO(), bad, d, T.FdSource(fd))
    finally:
        os.close(fd)


def test_the_receiver_refuses_a_stream_before_writing(tmp_path: Path) -> None:
    meta = restore(tmp_path, {1: {0: 0}, 2: {0: 1}})
    src = image(tmp_path / "t.img", {0: 1})
    dst = image(tmp_path / "r.img", {0: 0})
    before = dst.read_bytes()
    blob = send_bytes(thin_delta(meta, 1, 2, metadata_snap=False), src, start=0)
    with pytest.raises(ValueError, match="receiver is at 4096"):
        apply(blob, dst, [], start=4096)
    assert dst.read_bytes() == before
