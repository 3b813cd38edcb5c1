"""Journal DISCARD records on real device-mapper: a discard through the
daemon's path (VolumeIO.discard, and UNMAP from ``blkdiscard`` on the
tcm_loop LUN) reads zeros at once, is ordered with the snapshots around it,
and gives thin pool space back once no snapshot shares the blocks."""

from __future__ import annotations

import os
import subprocess

import pytest
from jmodel import pattern, read_direct

from dmsnap.dm import status as st
from dmsnap.scsi import lio
from dmsnap.storage import names
from dmsnap.storage.manager import Manager

KiB, MiB = 1024, 1 << 20
VOL = 16 * MiB
DATA = 8 * MiB
THIN_BLOCK = 64 * KiB


@pytest.fixture
def mgr(tmp_path):
    m = Manager(str(tmp_path / "state"))
    yield m
    for p in m.catalog.pools():
        m.pool_destroy(p.name, force=True)
    m.close()


def used_blocks(m: Manager, pool: str) -> int:
    s = m.stack.backend(m.catalog.pool(pool)).pool_status()
    assert isinstance(s, st.ThinPoolStatus), s
    return s.used_data_blocks


def queue_attr(dev_path: str, name: str) -> int:
    rdev = os.stat(dev_path).st_rdev
    with open(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/queue/{name}") as f:
        return int(f.read())


def write_data(io, length: int) -> bytes:
    data = b"".join(pattern(i + 1, MiB) for i in range(length // MiB))
    for i in range(length // MiB):
        io.write(i * MiB, data[i * MiB : (i + 1) * MiB])
    return data


def snapshot_read(m: Manager, pool: str, vol: str, name: str, length: int) -> bytes:
    act = m.snapshot_activate(pool, vol, name)
    try:
        return read_direct(act["path"], 0, length)
    finally:
        m.snapshot_deactivate(pool, vol, name)


def test_thin_discard_reads_zeros_keeps_snapshot_and_frees_blocks(mgr):
    mgr.pool_create("d", backend="thin", size=256 * MiB, journal_mode="nv", journal_size=8 * MiB)
    mgr.volume_create("d", "a", VOL)
    io = mgr.open_volume("d", "a")
    dm = f"/dev/mapper/{names.dm_volume('d', 'a')}"
    # what the flusher relies on: dm-thin discards whole thin blocks
    assert queue_attr(dm, "discard_max_bytes") > 0
    assert queue_attr(dm, "discard_granularity") == THIN_BLOCK

    data = write_data(io, DATA)
    mgr.snapshot_create([("d", "a")], "before", wait=True)  # the data is on dm now
    used_before = used_blocks(mgr, "d")
    assert used_before >= DATA // THIN_BLOCK

    # unaligned on purpose: the head and tail thin blocks are zeroed, not unmapped
    off, length = 1 * MiB + 512, 6 * MiB - 1024
    io.discard(off, length)
    want = bytearray(data)
    want[off : off + length] = bytes(length)
    assert io.read(0, DATA) == want  # at once, from the journal's overlay

    mgr.snapshot_create([("d", "a")], "after", wait=True)  # a marker after the discard
    assert read_direct(dm, 0, DATA) == want
    assert snapshot_read(mgr, "d", "a", "after", DATA) == want
    assert snapshot_read(mgr, "d", "a", "before", DATA) == data  # the snapshot keeps it

    mgr.snapshot_delete("d", "a", "before")
    freed = used_before - used_blocks(mgr, "d")
    aligned = (off + length) // THIN_BLOCK - (off + THIN_BLOCK - 1) // THIN_BLOCK
    assert aligned - 2 <= freed <= aligned + 2, (used_before, freed, aligned)
    assert io.read(0, DATA) == want
    assert snapshot_read(mgr, "d", "a", "after", DATA) == want


def test_classic_discard_reads_zeros_and_keeps_snapshot(mgr):
    mgr.pool_create("c", backend="classic", size=256 * MiB, journal_mode="nv", journal_size=8 * MiB)
    mgr.volume_create("c", "a", VOL)
    io = mgr.open_volume("c", "a")
    dm = f"/dev/mapper/{names.dm_volume('c', 'a')}"
    data = write_data(io, 2 * MiB)
    mgr.snapshot_create([("c", "a")], "before", wait=True)
    off, length = 64 * KiB + 512, MiB
    io.discard(off, length)
    want = bytearray(data)
    want[off : off + length] = bytes(length)
    assert io.read(0, 2 * MiB) == want
    mgr.snapshot_create([("c", "a")], "after", wait=True)
    assert read_direct(dm, 0, 2 * MiB) == want
    assert snapshot_read(mgr, "c", "a", "before", 2 * MiB) == data
    assert snapshot_read(mgr, "c", "a", "after", 2 * MiB) == want


def test_blkdiscard_on_the_scsi_disk_frees_thin_blocks(mgr):
    if (why := lio.available()) is not None:
        pytest.fail(why)
    mgr.pool_create("s", backend="thin", size=256 * MiB, journal_size=8 * MiB)
    mgr.volume_create("s", "v", VOL)
    mgr.export_create("s", "v", kind="local")
    disk = os.path.realpath("/dev/dmsnap/s/v")
    assert disk.startswith("/dev/sd"), disk
    name = os.path.basename(disk)
    with open(f"/sys/block/{name}/queue/discard_granularity") as f:
        assert int(f.read()) == THIN_BLOCK  # VPD B0: the thin block size
    io = mgr.open_volume("s", "v")
    data = write_data(io, DATA)
    mgr.snapshot_create([("s", "v")], "keep", wait=True)
    used_before = used_blocks(mgr, "s")
    subprocess.run(
        ["blkdiscard", "-o", str(MiB), "-l", str(4 * MiB), disk],
        check=True,
        capture_output=True,
        timeout=60,
    )
    want = bytearray(data)
    want[MiB : 5 * MiB] = bytes(4 * MiB)
    assert read_direct(disk, 0, DATA) == want
    mgr.snapshot_create([("s", "v")], "after", wait=True)
    assert snapshot_read(mgr, "s", "v", "keep", DATA) == data
    assert snapshot_read(mgr, "s", "v", "after", DATA) == want
    mgr.snapshot_delete("s", "v", "keep")
    freed = used_before - used_blocks(mgr, "s")
    assert 4 * MiB // THIN_BLOCK - 2 <= freed <= 4 * MiB // THIN_BLOCK + 2, (used_before, freed)
