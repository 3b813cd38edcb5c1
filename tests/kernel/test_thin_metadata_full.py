"""A thin pool whose *metadata* device fills (issue 17, item 6).

The pool is made with 2 MiB of metadata (`--metadata-size`), a volume is
mapped block by block (4 KiB each: dm-thin zeroes the rest), then rounds of
a snapshot and scattered 4 KiB writes (each first write to a btree leaf
after a snapshot copies the leaf) until dm-thin has no free metadata block
and switches the pool to out-of-metadata-space mode (status `ro`). dmsnap
refuses snapshots from 95 % metadata use on, so the last rounds are writes
only: each round writes to a quarter of the leaves, so after the last
snapshot the other leaves are still there to be copied (more than the 5 %
of the metadata that is left).

What a storage administrator is promised then, each pinned below:

* no acknowledged write is lost: what the journal acknowledged before the
  pool went read-only stays in the journal (and reads back from it) until
  the pool can take it, across a daemon restart;
* new writes are refused at once, not after the journal filled and the
  initiator timed out: the local writer with ENOSPC, SCSI with DATA
  PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT (27h/07h), as for a full
  data device;
* snapshot creation (CLI/Manager and in-band) is refused with one line;
* health warns from 80 % metadata use and, once full, says so and how to
  get out (`dmsnap pool extend-metadata`);
* `pool extend-metadata` gives the pool room: dm-thin switches back to
  write mode, the journal drains, every acknowledged write reads back;
* what the flusher applied between dm-thin's switch and the journal's look
  (a discard dm-thin answered without unmapping) is applied again, never
  checkpointed past (the last test, on a pool of its own).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from scsi_util import pread_direct

from dmsnap import errors as E
from dmsnap.dm import DmError, Role, make_uuid
from dmsnap.dm import status as st
from dmsnap.dm import targets as t
from dmsnap.dm.targets import Table
from dmsnap.journal.service import HOLD_PROBE_ENV, PoolJournal
from dmsnap.scsi import initiator, lio, sgio
from dmsnap.scsi import sense as S
from dmsnap.storage.manager import Manager
from dmsnap.storage.thin import ThinBackend

MiB = 1 << 20
KiB = 1 << 10
BLOCK = 64 * KiB  # the pool's thin block
VOL = 768 * MiB  # 12288 mappings: ~48 btree leaves of ~250 mappings (~16 MiB) each
LEAF = 16 * MiB
STRIDE = 4 * LEAF  # a round writes to every 4th leaf, the next round to the next ones
PROMPT = 1.0  # seconds: "at once"


def pattern(off: int, gen: int) -> bytes:
    """4 KiB naming its offset and generation: a lost or misplaced write shows."""
    return struct.pack(">QQ", off, gen) * (4 * KiB // 16)


@dataclass
class Full:
    m: Manager
    state: str
    expect: dict[int, bytes] = field(default_factory=dict)  # offset -> last acknowledged
    warned_at_80: list[str] | None = None  # health seen between 80 % and 95 % use
    rounds: int = 0

    def status(self) -> st.ThinPoolStatus:
        s = self.m.stack.backend(self.m.catalog.pool("m")).pool_status()
        assert isinstance(s, st.ThinPoolStatus), s
        return s

    def journal(self) -> PoolJournal:
        return self.m.journals.by_pool[self.m.catalog.pool("m").id]

    def write(self, off: int, gen: int) -> None:
        data = pattern(off, gen)
        self.m.volume_write("m", "v", off, data)
        self.expect[off] = data  # acknowledged: durable in the journal


def _settle(full: Full) -> None:
    """Until the flusher has placed everything or is stuck on an error."""
    pj = full.journal()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        s = pj.stats()
        if s.unflushed_records == 0 or s.flush_error:
            return
        time.sleep(0.1)


@pytest.fixture(scope="module")
def full(module_tmp) -> Iterator[Full]:
    if (why := lio.available()) is not None:
        pytest.fail(why)
    state = str(module_tmp / "state")
    f = Full(Manager(state), state)
    try:
        # sparse: the guest's /tmp is smaller than the pool, which stays
        # mostly holes (4 KiB written per 64 KiB block)
        f.m.pool_create(
            "m", size=1024 * MiB, journal_size=16 * MiB, metadata_size=2 * MiB, sparse=True
        )
        f.m.volume_create("m", "v", VOL)
        # Map every block of v with 4 KiB (dm-thin zeroes the rest of each
        # block): many mappings, little data.
        t0 = time.monotonic()
        for off in range(0, VOL, BLOCK):
            f.write(off, 0)
        _settle(f)
        print(f"\nmapped {VOL // BLOCK} blocks in {time.monotonic() - t0:.0f} s: {f.status()}")
        gen = 0
        while f.status().mode == "rw" and gen < 100:
            gen += 1
            # refused from 95 % metadata use on; writes alone fill the rest
            with contextlib.suppress(E.NoSpace):
                f.m.snapshot_create([("m", "v")], f"s{gen}", wait=True)
            shift = (gen % 4) * LEAF + (gen * 5 % 64) * BLOCK
            for off in range(shift, VOL, STRIDE):
                try:
                    f.write(off, gen)
                except E.NoSpace:
                    break
            _settle(f)
            s = f.status()
            frac = s.metadata_used_fraction
            print(
                f"round {gen}: metadata {s.used_metadata_blocks}/{s.total_metadata_blocks} {s.mode}"
            )
            if 0.8 <= frac < 0.95 and f.warned_at_80 is None:
                f.warned_at_80 = f.m.pool_show("m")["health"]
        f.rounds = gen
        time.sleep(1)  # the journal's look at the pool (every 0.25 s)
        s = f.status()
        assert s.mode == "ro", f"metadata never filled in {gen} rounds: {s}"
        assert s.used_metadata_blocks == s.total_metadata_blocks, s
        yield f
    finally:
        for p in f.m.catalog.pools():
            f.m.pool_destroy(p.name, force=True)
        f.m.close()


def test_health_warns_from_80_percent_metadata_use(full: Full) -> None:
    assert full.warned_at_80 is not None, "metadata use jumped past 80-95 %"
    warn = [h for h in full.warned_at_80 if "metadata" in h]
    assert warn and "extend-metadata" in warn[0], full.warned_at_80


def test_acknowledged_writes_stay_in_the_journal_and_read_back(full: Full) -> None:
    pj = full.journal()
    s = pj.stats()
    assert s.unflushed_records > 0, "the burst that filled the metadata left nothing behind?"
    assert s.flush_error, s
    for off, data in full.expect.items():
        assert full.m.volume_read("m", "v", off, len(data)) == data, f"write at {off} lost"


def test_health_says_metadata_full_and_the_way_forward(full: Full) -> None:
    health = full.m.pool_show("m")["health"]
    line = [h for h in health if "OUT OF METADATA SPACE" in h]
    assert line, health
    assert "dmsnap pool extend-metadata m" in line[0], line[0]


def test_local_writer_is_refused_at_once(full: Full) -> None:
    t0 = time.monotonic()
    with pytest.raises(E.NoSpace) as exc:
        for off in range(2 * KiB * 16, VOL, STRIDE):  # any of these needs a new block
            full.write(off + 8 * KiB, 99)
    took = time.monotonic() - t0
    assert "metadata" in str(exc.value) and "\n" not in str(exc.value), exc.value
    assert took < PROMPT, f"refused after {took:.1f} s"


def test_snapshot_create_is_refused_in_one_line(full: Full) -> None:
    before = full.m.snapshot_list("m", "v")
    with pytest.raises(E.NoSpace) as exc:
        full.m.snapshot_create([("m", "v")], "after-full")
    msg = str(exc.value)
    assert "out of thin metadata space" in msg and "\n" not in msg, msg
    assert full.m.snapshot_list("m", "v") == before


def test_scsi_writes_are_refused_at_once_with_27_07_and_inband_snapshots_too(full: Full) -> None:
    full.m.export_create("m", "v", kind="local")
    try:
        disk = os.path.realpath("/dev/dmsnap/m/v")
        assert disk.startswith("/dev/sd"), disk
        off = 12 * KiB  # in a block shared with the snapshots: needs a new one
        cdb = struct.pack(">BBQIBB", 0x8A, 0, off // 512, 8, 0, 0)
        t0 = time.monotonic()
        r = sgio.sg_io(disk, cdb, data_out=pattern(off, 98))
        took = time.monotonic() - t0
        if r.good:
            full.expect[off] = pattern(off, 98)  # acknowledged: must not be lost
        got = S.decode(r.sense) if r.sense else None
        key = (int(got.key), got.asc, got.ascq) if got else None
        assert r.status == 2 and key == (7, 0x27, 0x07), (
            f"status {r.status:#x} sense {r.sense.hex()} after {took:.1f} s"
        )
        assert took < PROMPT, f"refused after {took:.1f} s"
        # Reads still work, from the journal where it holds the block.
        for o in list(full.expect)[-3:]:
            assert pread_direct(disk, o - o % 4096, 4096) == full.expect[o]
        t0 = time.monotonic()
        with pytest.raises(initiator.InitiatorError) as exc:
            initiator.snapshot(disk, "inband-after-full")
        assert time.monotonic() - t0 < 5
        sense = exc.value.sense
        assert sense is not None and sense.code == S.INSUFFICIENT_RESOURCES, exc.value
    finally:
        full.m.export_delete("m", "v")


def test_daemon_restart_keeps_the_records_and_the_refusal(full: Full) -> None:
    lag = full.journal().stats().unflushed_records
    full.m.close(drain=False)
    full.m = Manager(full.state)
    full.m.assemble()
    pj = full.journal()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not pj.stats().no_space:
        time.sleep(0.1)
    # Recovery replays from the last confirmed record: those the pool still
    # takes land again (overwrites), the rest wait as before the restart.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and pj.stats().unflushed_records != lag:
        time.sleep(0.1)
    assert pj.stats().unflushed_records == lag, (pj.stats(), lag)
    with pytest.raises(E.NoSpace):
        full.write(20 * KiB, 97)
    for off, data in full.expect.items():
        assert full.m.volume_read("m", "v", off, len(data)) == data, f"write at {off} lost"
    assert any("OUT OF METADATA SPACE" in h for h in full.m.pool_show("m")["health"])


@pytest.mark.allow_leftovers("the extension's loop device belongs to the module's pool")
def test_extend_metadata_lands_every_acknowledged_write(full: Full) -> None:
    with pytest.raises(E.InvalidArgument):
        full.m.pool_extend_metadata("m", 3 * MiB + 1)
    full.m.pool_extend_metadata("m", 8 * MiB)
    s = full.status()
    assert s.mode == "rw" and s.total_metadata_blocks == 10 * MiB // 4096, s
    pj = full.journal()
    deadline = time.monotonic() + 60
    while pj.stats().unflushed_records and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pj.stats().unflushed_records == 0, pj.stats()
    for off, data in full.expect.items():
        assert full.m.volume_read("m", "v", off, len(data)) == data, f"write at {off} lost"
    full.write(24 * KiB, 96)
    full.m.snapshot_create([("m", "v")], "after-extend", wait=True)
    health = full.m.pool_show("m")["health"]
    assert not any("METADATA" in h for h in health), health
    # The extension is part of the pool: a restart reassembles it.
    full.m.close()
    full.m = Manager(full.state)
    full.m.assemble()
    assert full.status().total_metadata_blocks == 10 * MiB // 4096
    for off, data in full.expect.items():
        assert full.m.volume_read("m", "v", off, len(data)) == data, f"write at {off} lost"


# -- the window between dm-thin's switch to read-only and the journal's look ------


def _direct_write(path: str, off: int, data: bytes) -> None:
    buf = mmap.mmap(-1, len(data))  # page-aligned, as O_DIRECT wants
    buf[:] = data
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        os.pwritev(fd, [buf], off)
    finally:
        os.close(fd)
        buf.close()


def _fill_metadata_from_outside(b: ThinBackend, name: str) -> list[int]:
    """Fill the pool's metadata through a thin device of its own (not a
    dmsnap volume, so the journal's flusher stays idle and nothing of it is
    stuck behind a failing write): map a 256 MiB thin block by block, then
    rounds of a snapshot and a 4 KiB write per MiB (every btree leaf copied)
    until dm-thin switches the pool to read-only. Returns the thin ids made."""
    dm, tpool = b.dm, b.tpool[0]
    ids = [t.THIN_MAX_DEV_ID]
    dm.message(tpool, f"create_thin {ids[0]}")
    size = 256 * MiB
    dm.create(
        name, make_uuid(Role.TEST, name), Table.single(size // 512, t.Thin(b.pool_devno(), ids[0]))
    )
    path = f"/dev/mapper/{name}"
    for off in range(0, size, BLOCK):
        _direct_write(path, off, pattern(off, 0))
    for gen in range(1, 200):
        s = b.pool_status()
        assert isinstance(s, st.ThinPoolStatus), s
        if s.mode == "ro":
            assert not s.needs_check, f"a failed metadata operation, not out of space: {s}"
            return ids
        snap = t.THIN_MAX_DEV_ID - gen
        with contextlib.suppress(DmError):  # it may be the snapshot that fills it
            dm.suspend(name)
            try:
                dm.message(tpool, f"create_snap {snap} {ids[0]}")
                ids.append(snap)
            finally:
                dm.resume(name)
        try:
            for off in range((gen * 5 % 16) * BLOCK, size, MiB):
                _direct_write(path, off, pattern(off, gen))
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # a commit: dm-thin looks at its free metadata there
            finally:
                os.close(fd)
        except OSError:
            pass  # the write or commit that found no room: the pool is read-only now
    raise AssertionError(f"metadata never filled: {b.pool_status()}")


@pytest.mark.allow_leftovers("the extension's loop device is removed with the pool")
def test_discard_and_writes_acked_as_metadata_fills_survive_extend_and_restart(
    tmp_path, monkeypatch
) -> None:
    """dm-thin switches a pool to read-only (out of metadata space) on its
    own; the journal learns it at its next look (~0.25 s). A DISCARD the
    flusher applies meanwhile is answered success by dm-thin, which unmaps
    nothing. Before the fix the checkpoint then passed it, the record left
    the journal, and the range read its old data again, for good.

    The window is held open on purpose (the test-only DMSNAP_TEST_HOLD_SPACE_PROBE
    file: no look while it exists) rather than hoped for, and the metadata
    is filled from outside the journal, so that its flusher is idle when the
    pool switches. Acknowledged in the window: a discard of 1 MiB of data, an
    overwrite of a mapped block (dm-thin still takes it) and a write that
    needs a new block (refused below; it waits in the journal)."""
    hold = tmp_path / "hold-probe"
    monkeypatch.setenv(HOLD_PROBE_ENV, str(hold))
    state = str(tmp_path / "state")
    m = Manager(state)
    foreign = "dmsnap-test-foreign-thin"
    ids: list[int] = []
    try:
        m.pool_create(
            "w", size=1024 * MiB, journal_size=16 * MiB, metadata_size=2 * MiB, sparse=True
        )
        m.volume_create("w", "v", 64 * MiB)
        expect: dict[int, bytes] = {}
        for off in range(0, 4 * MiB, BLOCK):  # mapped, never snapshotted: unshared
            m.volume_write("w", "v", off, pattern(off, 1))
            expect[off] = pattern(off, 1)
        pj = m.journals.by_pool[m.catalog.pool("w").id]
        pj.sync(60.0)  # on the volume, and confirmed where the fix confirms
        b = m.stack.backend(m.catalog.pool("w"))
        assert isinstance(b, ThinBackend)

        hold.touch()  # from here the journal does not look at the pool
        ids = _fill_metadata_from_outside(b, foreign)
        assert pj.no_space_reason is None  # the window: dm-thin read-only, the journal unaware

        m.volume_discard("w", "v", 0, MiB)  # 16 whole thin blocks
        for off in range(0, MiB, BLOCK):
            expect[off] = bytes(4 * KiB)
        w_ok = m.volume_write("w", "v", 2 * MiB, pattern(2 * MiB, 2))["seq"]
        expect[2 * MiB] = pattern(2 * MiB, 2)
        deadline = time.monotonic() + 20
        while pj.stats().synced_seq <= w_ok and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pj.stats().synced_seq > w_ok, pj.stats()  # applied and fdatasynced below
        m.volume_write("w", "v", 40 * MiB, pattern(40 * MiB, 2))  # needs a new block
        expect[40 * MiB] = pattern(40 * MiB, 2)

        hold.unlink()  # the journal's next look finds the pool read-only
        deadline = time.monotonic() + 5
        while pj.no_space_reason is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pj.no_space_reason and "metadata" in pj.no_space_reason

        m.pool_extend_metadata("w", 8 * MiB)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            s = pj.stats()
            if s.unflushed_records == 0 and s.checkpoint_seq >= s.head_seq:
                break
            time.sleep(0.2)
        assert pj.stats().unflushed_records == 0, pj.stats()

        def check(when: str) -> None:
            for off, data in sorted(expect.items()):
                got = m.volume_read("w", "v", off, len(data))
                what = "discarded" if data == bytes(len(data)) else "written"
                assert got == data, f"{when}: acknowledged {what} block at {off} reads old data"

        check("after extend-metadata")
        m.close()
        m = Manager(state)
        m.assemble()
        check("after a daemon restart")
    finally:
        hold.unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            b = m.stack.backend(m.catalog.pool("w"))
            if b.dm.exists(foreign):
                b.dm.remove(foreign)
            for i in ids:
                b.dm.message(b.tpool[0], f"delete {i}")
        for p in m.catalog.pools():
            m.pool_destroy(p.name, force=True)
        m.close()
