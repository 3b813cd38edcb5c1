"""DISCARD records on the host: the "dm device" is a sparse file, so an
applied discard is a punched hole (fewer allocated blocks, zeros)."""

from __future__ import annotations

import errno
import os
import struct
import time
from pathlib import Path

import pytest
from test_journal_support import (
    DISCARD,
    SB_FMT,
    VOL,
    Controller,
    crc32c,
    hold_marker,
    parse_journal,
    pattern,
)

from dmsnap.journal import Journal, JournalError

KiB, MiB = 1024, 1 << 20


def allocated(p: Path) -> int:
    return os.stat(p).st_blocks * 512


def test_overlay_zeros_partial_overlaps_then_holes_on_dm(nv: Journal, vol1: Path) -> None:
    hold_marker(nv)  # everything below stays unflushed: the overlay answers
    nv.write(1, 0, pattern(1, 64 * KiB))
    nv.discard(1, 4 * KiB + 512, 40 * KiB)  # starts and ends inside index blocks
    nv.write(1, 8 * KiB, pattern(2, 1024))  # newer: over part of the discard
    nv.write(1, 60 * KiB, pattern(3, 8 * KiB))  # straddles the discard's end
    want = bytearray(pattern(1, 64 * KiB) + bytes(4 * KiB))
    want[4 * KiB + 512 : 44 * KiB + 512] = bytes(40 * KiB)
    want[8 * KiB : 9 * KiB] = pattern(2, 1024)
    want[60 * KiB : 68 * KiB] = pattern(3, 8 * KiB)
    assert nv.read(1, 0, 68 * KiB) == want
    assert nv.read(1, 20 * KiB, 4 * KiB) == bytes(4 * KiB)  # wholly inside
    st = nv.stats()
    assert st.discards == 1 and st.dm_discards == 0 and st.unflushed_records == 4
    assert vol1.read_bytes()[: 68 * KiB] == bytes(68 * KiB)  # nothing on dm yet

    nv.marker_done(99)
    nv.sync()
    assert nv.read(1, 0, 68 * KiB) == want
    assert vol1.read_bytes()[: 68 * KiB] == want
    st = nv.stats()
    assert st.dm_discards == 1 and st.unflushed_records == 0


def test_discard_gives_space_back(nv: Journal, vol1: Path) -> None:
    for i in range(4):
        nv.write(1, i * MiB, pattern(1 + i, MiB))
    nv.sync()
    before = allocated(vol1)
    assert before >= 4 * MiB
    nv.discard(1, 0, 3 * MiB)
    nv.sync()
    assert before - allocated(vol1) >= 3 * MiB - 64 * KiB
    assert vol1.read_bytes()[: 3 * MiB] == bytes(3 * MiB)
    assert vol1.read_bytes()[3 * MiB : 4 * MiB] == pattern(4, MiB)


def test_marker_after_a_discard_sees_it_applied(tmp_path: Path, jpath: Path, vol1: Path) -> None:
    j = Journal.open(str(jpath))
    j.attach(1, str(vol1), VOL)
    j.start()
    with Controller(j, {1: vol1}) as ctl:
        j.write(1, 0, pattern(1, 64 * KiB))
        s1 = j.marker(1, b"before")
        j.discard(1, 0, 32 * KiB)
        s2 = j.marker(2, b"after")
        j.write(1, 0, pattern(2, 4 * KiB))  # after both markers
        j.sync()
    j.close()
    assert ctl.order == [1, 2]
    assert ctl.snaps[1] == (s1, {1: pattern(1, 64 * KiB) + bytes(VOL - 64 * KiB)})
    after = bytes(32 * KiB) + pattern(1, 64 * KiB)[32 * KiB :] + bytes(VOL - 64 * KiB)
    assert ctl.snaps[2] == (s2, {1: after})
    assert vol1.read_bytes() == pattern(2, 4 * KiB) + after[4 * KiB :]


def test_writes_around_a_discard_are_not_coalesced_across_it(nv: Journal, vol1: Path) -> None:
    hold_marker(nv)
    nv.write(1, 0, pattern(1, 8 * KiB))
    nv.discard(1, 0, 16 * KiB)  # over the write before it
    nv.write(1, 8 * KiB, pattern(2, 8 * KiB))  # adjacent to the first write
    nv.marker_done(99)
    nv.sync()
    want = bytes(8 * KiB) + pattern(2, 8 * KiB)
    assert vol1.read_bytes()[: 16 * KiB] == want
    assert nv.stats().dm_writes == 2  # two pwrites: the discard sits between them


def test_recovery_replays_a_discard(jpath: Path, vol1: Path) -> None:
    j = Journal.open(str(jpath))
    j.attach(1, str(vol1), VOL)
    j.start()
    j.write(1, 0, pattern(1, 64 * KiB))
    j.sync()  # on dm
    hold_marker(j, 1)
    j.discard(1, 4 * KiB, 32 * KiB)
    j.write(1, 8 * KiB, pattern(2, 512))
    j.close(drain=False)  # like a crash: the discard stays in the journal
    assert vol1.read_bytes()[4 * KiB : 8 * KiB] == pattern(1, 64 * KiB)[4 * KiB : 8 * KiB]

    _sb, recs = parse_journal(jpath)
    d = [r for r in recs if r.type == DISCARD]
    assert len(d) == 1 and (d[0].vol, d[0].offset, d[0].marker_id) == (1, 4 * KiB, 32 * KiB)

    j = Journal.open(str(jpath))
    assert j.stats().recovered_records == 3
    assert j.pending_volumes() == {1}
    j.attach(1, str(vol1), VOL)
    want = bytearray(pattern(1, 64 * KiB))
    want[4 * KiB : 36 * KiB] = bytes(32 * KiB)
    want[8 * KiB : 8 * KiB + 512] = pattern(2, 512)
    assert j.read(1, 0, 64 * KiB) == want  # the overlay, before the flusher runs
    j.start()
    m = j.next_marker(2)
    assert m is not None and m.id == 1
    j.marker_done(1)
    j.sync()
    assert vol1.read_bytes()[: 64 * KiB] == want
    j.close()


def test_forget_drops_unflushed_discards(nv: Journal, vol1: Path) -> None:
    nv.write(1, 0, pattern(1, 8 * KiB))
    nv.sync()
    hold_marker(nv)
    nv.discard(1, 0, 8 * KiB)
    nv.forget(1)
    assert nv.read(1, 0, 8 * KiB) == pattern(1, 8 * KiB)  # the dm file again
    nv.marker_done(99)
    nv.sync()
    assert vol1.read_bytes()[: 8 * KiB] == pattern(1, 8 * KiB)
    assert nv.stats().unflushed_records == 0


def test_ram_mode_discard_fua(vol1: Path) -> None:
    j = Journal.open(mode="ram", ram_size=1 * MiB)
    j.attach(1, str(vol1), VOL)
    j.start()
    j.write(1, 0, pattern(1, 64 * KiB), fua=True)
    j.discard(1, 0, 64 * KiB, fua=True)
    assert vol1.read_bytes()[: 64 * KiB] == bytes(64 * KiB)
    j.close()


def test_discards_do_not_fill_the_ring_with_data(tmp_path: Path, vol1: Path) -> None:
    jp = tmp_path / "small"
    Journal.format(str(jp), 8192 + 128 * KiB)
    with Journal.open(str(jp)) as j:
        j.attach(1, str(vol1), VOL)
        j.start()
        for i in range(2000):  # 2000 headers through a 128 KiB ring: wraps, reclaims
            j.discard(1, (i % 64) * 256 * KiB, 256 * KiB)
        j.sync()
        assert j.stats().dm_discards == 2000


def test_bad_discards(nv: Journal) -> None:
    for vol, off, ln in [(1, 1, 512), (1, 0, 100), (1, 0, 0), (1, VOL, 512), (1, 0, VOL + 512)]:
        with pytest.raises(JournalError) as ei:
            nv.discard(vol, off, ln)
        assert ei.value.errno == errno.EINVAL, (vol, off, ln)
    with pytest.raises(JournalError) as ei:
        nv.discard(7, 0, 512)
    assert ei.value.errno == errno.ENXIO
    assert nv.stats().discards == 0


def _rewrite_super(path: Path, **changes: int) -> None:
    raw = bytearray(path.read_bytes()[:8192])
    for slot in (0, 1):
        f = list(struct.unpack_from(SB_FMT, raw, slot * 4096))
        if f[0] == 0:
            continue
        if "version" in changes:
            f[1] = changes["version"]
        body = struct.pack(SB_FMT, *f[:-2], 0, 0)[:72]
        f[-2] = crc32c(body)
        struct.pack_into(SB_FMT, raw, slot * 4096, *f)
    with open(path, "r+b") as fh:
        fh.write(raw)


@pytest.mark.parametrize("old", [1, 2])
def test_earlier_version_journal_is_read_and_upgraded(jpath: Path, vol1: Path, old: int) -> None:
    j = Journal.open(str(jpath))
    j.attach(1, str(vol1), VOL)
    j.start()
    hold_marker(j, 1)
    j.write(1, 0, pattern(1, 4 * KiB))
    j.close(drain=False)
    _rewrite_super(jpath, version=old)  # as an earlier release left it
    j = Journal.open(str(jpath))
    assert j.stats().recovered_records == 2
    sb, _ = parse_journal(jpath)
    assert sb.version == 3
    j.attach(1, str(vol1), VOL)
    assert j.read(1, 0, 4 * KiB) == pattern(1, 4 * KiB)
    j.close(drain=False)


def test_later_format_is_refused_with_a_clear_error(jpath: Path) -> None:
    _rewrite_super(jpath, version=4)
    with pytest.raises(JournalError) as ei:
        Journal.open(str(jpath))
    assert ei.value.errno == errno.EPROTONOSUPPORT
    assert "later on-disk format" in str(ei.value)


def test_no_space_keeps_a_discard_in_the_journal_until_cleared(nv: Journal, vol1: Path) -> None:
    """A read-only thin pool (out of metadata space) answers a discard with
    success and unmaps nothing: while the daemon says the pool has no space
    (jr_set_no_space), the flusher keeps the discard, the overlay reads
    zeros, and it is applied once the pool has room again."""
    nv.write(1, 0, pattern(1, 64 * KiB))
    nv.sync()
    nv.set_no_space(-errno.ENOSPC)
    nv.discard(1, 0, 64 * KiB)
    deadline = time.monotonic() + 5
    while nv.stats().flush_error != -errno.ENOSPC and time.monotonic() < deadline:
        time.sleep(0.05)
    st = nv.stats()
    assert st.no_space == -errno.ENOSPC and st.flush_error == -errno.ENOSPC, st
    assert st.dm_discards == 0 and st.unflushed_records == 1, st
    assert nv.read(1, 0, 64 * KiB) == bytes(64 * KiB)  # the journal answers zeros
    assert vol1.read_bytes()[: 64 * KiB] == pattern(1, 64 * KiB)  # not applied below
    nv.set_no_space(0)
    nv.sync(10.0)
    st = nv.stats()
    assert st.dm_discards == 1 and st.unflushed_records == 0 and st.flush_error == 0, st
    assert vol1.read_bytes()[: 64 * KiB] == bytes(64 * KiB)
