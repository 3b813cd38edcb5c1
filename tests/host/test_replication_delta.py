"""The changed blocks between two thin devices, read from dm-thin metadata
built on the host with thin_restore (no kernel): what replication sends."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmsnap.replication.delta import (
    Change,
    Delta,
    DeltaError,
    Extent,
    parse_delta,
    thin_delta,
    thin_map,
)

pytestmark = pytest.mark.skipif(
    shutil.which("thin_restore", path="/usr/sbin:/sbin:/usr/bin") is None,
    reason="needs thin-provisioning-tools",
)

BLOCK_SECTORS = 128  # 64 KiB pool blocks
NR_DATA = 4096


def restore(tmp: Path, devices: dict[int, dict[int, int]]) -> str:
    """Metadata holding each device's mappings {virtual block: data block}."""
    xml = [
        f'<superblock uuid="" time="1" transaction="1" version="2" '
        f'data_block_size="{BLOCK_SECTORS}" nr_data_blocks="{NR_DATA}">'
    ]
    for dev, maps in devices.items():
        xml.append(
            f'<device dev_id="{dev}" mapped_blocks="{len(maps)}" transaction="0" '
            f'creation_time="0" snap_time="1">'
        )
        for v, d in sorted(maps.items()):
            xml.append(f'<single_mapping origin_block="{v}" data_block="{d}" time="0"/>')
        xml.append("</device>")
    xml.append("</superblock>")
    (tmp / "m.xml").write_text("\n".join(xml))
    meta = tmp / "meta"
    meta.unlink(missing_ok=True)
    with open(meta, "wb") as f:
        f.truncate(8 << 20)
    tool = shutil.which("thin_restore", path="/usr/sbin:/sbin:/usr/bin")
    assert tool
    subprocess.run([tool, "-q", "-i", str(tmp / "m.xml"), "-o", str(meta)], check=True)
    return str(meta)


def expected(base: dict[int, int], target: dict[int, int]) -> dict[int, Change]:
    out: dict[int, Change] = {}
    for v in base.keys() | target.keys():
        if v not in target:
            out[v] = Change.DISCARD
        elif base.get(v) != target[v]:
            out[v] = Change.DATA
    return out


def per_block(delta: Delta) -> dict[int, Change]:
    return {b: e.change for e in delta.extents for b in range(e.begin, e.end)}


@st.composite
def snapshot_pairs(draw) -> tuple[dict[int, int], dict[int, int]]:
    """A base and a later snapshot of it: blocks kept (shared), rewritten
    (a new data block), discarded, and written for the first time."""
    vblocks = draw(st.lists(st.integers(0, 300), unique=True, max_size=60))
    free = iter(range(NR_DATA))
    base = {v: next(free) for v in vblocks}
    target: dict[int, int] = {}
    for v, d in base.items():
        fate = draw(st.sampled_from(["keep", "keep", "rewrite", "discard"]))
        if fate == "keep":
            target[v] = d
        elif fate == "rewrite":
            target[v] = next(free)
    for v in draw(st.lists(st.integers(0, 300), unique=True, max_size=30)):
        target.setdefault(v, next(free))
    return base, target


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(snapshot_pairs())
def test_delta_is_exactly_the_blocks_that_differ(tmp_path: Path, pair) -> None:
    base, target = pair
    meta = restore(tmp_path, {1: base, 2: target})
    d = thin_delta(meta, 1, 2, metadata_snap=False)
    assert d.block_size == BLOCK_SECTORS * 512
    assert per_block(d) == expected(base, target)
    # extents are sorted, disjoint and merged where they touch
    for a, b in zip(d.extents, d.extents[1:], strict=False):
        assert a.end < b.begin or (a.end == b.begin and a.change is not b.change)
    # a full send of the target: exactly its mapped blocks
    full = thin_map(meta, 2, metadata_snap=False)
    assert per_block(full) == dict.fromkeys(target, Change.DATA)
    assert full.data_bytes == len(target) * d.block_size


def test_unmapped_in_the_new_snapshot_is_sent_as_a_discard(tmp_path: Path) -> None:
    meta = restore(tmp_path, {1: {0: 0, 1: 1, 2: 2, 7: 7}, 2: {0: 0, 1: 9, 5: 10}})
    d = thin_delta(meta, 1, 2, metadata_snap=False)
    assert d.extents == (
        Extent(1, 1, Change.DATA),
        Extent(2, 1, Change.DISCARD),
        Extent(5, 1, Change.DATA),
        Extent(7, 1, Change.DISCARD),
    )
    assert d.data_bytes == 2 * 64 * 1024


def test_byte_ranges_stop_at_the_volume_end() -> None:
    d = Delta(65536, (Extent(0, 2, Change.DATA), Extent(3, 1, Change.DATA)))
    # a 3.5-block volume: the last block is half inside
    assert list(d.byte_ranges(Change.DATA, 3 * 65536 + 32768)) == [
        (0, 131072),
        (196608, 32768),
    ]
    assert list(d.byte_ranges(Change.DISCARD, 1 << 30)) == []


def test_a_missing_device_is_a_clear_error(tmp_path: Path) -> None:
    meta = restore(tmp_path, {1: {0: 0}})
    with pytest.raises(DeltaError, match=r"^thin_delta failed: .*snap2 \(9\)$"):
        thin_delta(meta, 1, 9, metadata_snap=False)
    with pytest.raises(DeltaError, match="thin_dump: thin metadata has no device 9"):
        thin_map(meta, 9, metadata_snap=False)


def test_an_answer_cut_short_or_for_other_devices_is_refused() -> None:
    good = (
        b'<superblock uuid="" time="1" transaction="2" data_block_size="128" '
        b'nr_data_blocks="1000"><diff left="1" right="2">'
        b'<different begin="2" length="1"/></diff></superblock>'
    )
    assert parse_delta(io.BytesIO(good), 1, 2).extents == (Extent(2, 1, Change.DATA),)
    with pytest.raises(DeltaError, match="not 1 and 3"):
        parse_delta(io.BytesIO(good), 1, 3)
    from xml.etree.ElementTree import ParseError

    with pytest.raises(ParseError):
        parse_delta(io.BytesIO(good[:-20]), 1, 2)
    odd = good.replace(b"different", b"strange")
    with pytest.raises(DeltaError, match="unknown element <strange>"):
        parse_delta(io.BytesIO(odd), 1, 2)
