"""Every target dmsnap types, built on real loop devices, witnessed by dmsetup."""

from __future__ import annotations

import errno
import os
import time

import pytest
from test_dm import MiB, assert_witness_agrees, pattern, pread, pwrite, sectors

from dmsnap.dm import DmError, Role, make_uuid
from dmsnap.dm import status as st
from dmsnap.dm import targets as t
from dmsnap.dm.targets import Table


def _uuid(name: str) -> str:
    return make_uuid(Role.TEST, name)


@pytest.fixture
def made(dm):
    """Creates devices and removes them top-down after the test."""
    names: list[str] = []

    def create(name: str, table: Table, **kw: object):
        info = dm.create(name, _uuid(name), table, **kw)
        names.append(name)
        return info

    yield create
    for name in reversed(names):
        if dm.exists(name):
            dm.remove(name)


def test_writecache_flush_message_writes_back(dm, loopdev, made):
    data, cache = loopdev(32 * MiB), loopdev(8 * MiB)
    table = Table.single(
        sectors(data.path),
        t.Writecache(
            "s",
            data.devno,
            cache.devno,
            4096,
            high_watermark=90,
            low_watermark=80,
            writeback_jobs=64,
            autocommit_blocks=128,
            autocommit_time=1000,
            max_age=60000,
        ),
    )
    info = made("dmsnap-test-wc", table)
    assert_witness_agrees(dm, "dmsnap-test-wc", table)
    pwrite(info.path, 8 * 4096, pattern(0x5C, 16 * 4096))
    s = dm.status("dmsnap-test-wc")[0].status
    assert isinstance(s, st.WritecacheStatus) and s.error == 0
    assert s.free_blocks < s.total_blocks  # the write sits in the cache
    assert dm.message("dmsnap-test-wc", "flush") is None
    s = dm.status("dmsnap-test-wc")[0].status
    assert s.writeback_blocks == 0
    assert pread(data.path, 8 * 4096, 16 * 4096) == pattern(0x5C, 16 * 4096)


def test_thin_create_snap_delete(dm, loopdev, made):
    meta, data = loopdev(8 * MiB), loopdev(64 * MiB)
    pool_table = Table.single(
        sectors(data.path),
        t.ThinPool(
            meta.devno, data.devno, 128, 32, error_if_no_space=True, skip_block_zeroing=False
        ),
    )
    pool = made("dmsnap-test-tpool", pool_table)
    assert_witness_agrees(dm, "dmsnap-test-tpool", pool_table)
    dm.message("dmsnap-test-tpool", "create_thin 0")
    vol_table = Table.single(32 * MiB // 512, t.Thin(pool.devno, 0))
    vol = made("dmsnap-test-thin", vol_table)
    assert_witness_agrees(dm, "dmsnap-test-thin", vol_table)
    pwrite(vol.path, 0, pattern(1, 64 * 1024))

    dm.suspend("dmsnap-test-thin")
    dm.message("dmsnap-test-tpool", "create_snap 1 0")
    dm.message("dmsnap-test-tpool", "set_transaction_id 0 1")
    dm.resume("dmsnap-test-thin")
    pwrite(vol.path, 0, pattern(2, 64 * 1024))
    snap = made(
        "dmsnap-test-thinsnap", Table.single(32 * MiB // 512, t.Thin(pool.devno, 1)), read_only=True
    )
    assert dm.info("dmsnap-test-thinsnap").read_only
    assert pread(snap.path, 0, 64 * 1024) == pattern(1, 64 * 1024)
    assert pread(vol.path, 0, 64 * 1024) == pattern(2, 64 * 1024)

    ps = dm.status("dmsnap-test-tpool")[0].status
    assert isinstance(ps, st.ThinPoolStatus)
    assert ps.transaction_id == 1 and ps.mode == "rw" and ps.no_space == "error"
    assert ps.used_data_blocks >= 2  # the origin block and its broken-sharing copy
    ts = dm.status("dmsnap-test-thin")[0].status
    assert isinstance(ts, st.ThinStatus) and ts.mapped_sectors >= 128

    # An active thin device cannot be deleted; an inactive one can.
    with pytest.raises(DmError) as e:
        dm.message("dmsnap-test-tpool", "delete 1")
    assert e.value.errno == errno.EBUSY
    dm.remove("dmsnap-test-thinsnap")
    dm.message("dmsnap-test-tpool", "delete 1")
    with pytest.raises(DmError):
        dm.message("dmsnap-test-tpool", "delete 1")  # gone


def _classic(dm, loopdev, made):
    base, cow = loopdev(16 * MiB), loopdev(4 * MiB)
    n = sectors(base.path)
    real = made("dmsnap-test-real", Table.single(n, t.Linear(base.devno, 0)))
    pwrite(real.path, 0, pattern(0x0A, 64 * 1024))
    cowdev = made("dmsnap-test-cow", Table.single(sectors(cow.path), t.Linear(cow.devno, 0)))
    origin_table = Table.single(n, t.SnapshotOrigin(real.devno))
    origin = made("dmsnap-test-origin", origin_table)
    dm.suspend("dmsnap-test-origin")
    snap_table = Table.single(n, t.Snapshot(real.devno, cowdev.devno, "P", 8))
    snap = made("dmsnap-test-snap", snap_table)
    dm.resume("dmsnap-test-origin")
    return real, cowdev, origin, origin_table, snap, snap_table


def test_classic_snapshot_keeps_old_data(dm, loopdev, made):
    _real, _cowdev, origin, origin_table, snap, snap_table = _classic(dm, loopdev, made)
    assert_witness_agrees(dm, "dmsnap-test-origin", origin_table)
    assert_witness_agrees(dm, "dmsnap-test-snap", snap_table)
    pwrite(origin.path, 0, pattern(0x0B, 64 * 1024))
    assert pread(origin.path, 0, 64 * 1024) == pattern(0x0B, 64 * 1024)
    assert pread(snap.path, 0, 64 * 1024) == pattern(0x0A, 64 * 1024)
    s = dm.status("dmsnap-test-snap")[0].status
    assert isinstance(s, st.SnapshotStatus) and s.allocated_sectors > 0


def test_classic_snapshot_overflow_invalidates(dm, loopdev, made):
    _, _, origin, _, _, _ = _classic(dm, loopdev, made)
    # 8 MiB of new origin data cannot fit in a 4 MiB COW. Origin writes
    # keep succeeding; the snapshot is what gives up.
    for off in range(0, 8 * MiB, MiB):
        pwrite(origin.path, off, pattern(0x77, MiB))
    assert pread(origin.path, 7 * MiB, 4096) == pattern(0x77, 4096)
    s = dm.status("dmsnap-test-snap")[0].status
    assert isinstance(s, st.SnapshotInvalid)


def test_snapshot_merge_restores_origin(dm, loopdev, made):
    real, cowdev, origin, _, _, _ = _classic(dm, loopdev, made)
    pwrite(origin.path, 0, pattern(0x0C, 64 * 1024))
    # Merge: the snapshot device goes, the origin takes the merge table.
    dm.suspend("dmsnap-test-origin")
    dm.remove("dmsnap-test-snap")
    merge = Table.single(sectors(real.path), t.SnapshotMerge(real.devno, cowdev.devno, "P", 8))
    dm.load("dmsnap-test-origin", merge)
    dm.resume("dmsnap-test-origin")
    deadline = time.monotonic() + 60
    while True:
        s = dm.status("dmsnap-test-origin")[0].status
        assert isinstance(s, st.SnapshotMergeStatus)
        if s.allocated_sectors == s.metadata_sectors:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert_witness_agrees(dm, "dmsnap-test-origin", merge)
    assert pread(origin.path, 0, 64 * 1024) == pattern(0x0A, 64 * 1024)


def test_log_writes_records_and_marks(dm, loopdev, made):
    data, log = loopdev(8 * MiB), loopdev(8 * MiB)
    table = Table.single(sectors(data.path), t.LogWrites(data.devno, log.devno))
    info = made("dmsnap-test-lw", table)
    assert_witness_agrees(dm, "dmsnap-test-lw", table)
    pwrite(info.path, 0, pattern(3, 8192))
    dm.message("dmsnap-test-lw", "mark snap1")
    s = dm.status("dmsnap-test-lw")[0].status
    assert isinstance(s, st.LogWritesStatus)
    assert s.logged_entries >= 2 and not s.logging_disabled


def test_flakey_drop_and_error_writes(dm, loopdev, made):
    data = loopdev(8 * MiB)
    n = sectors(data.path)
    pwrite(data.path, 0, pattern(0x11, 4096))
    drop = Table.single(n, t.Flakey(data.devno, 0, 0, 3600, drop_writes=True))
    info = made("dmsnap-test-flakey", drop)
    assert_witness_agrees(dm, "dmsnap-test-flakey", drop)
    pwrite(info.path, 0, pattern(0x22, 4096))  # "succeeds", silently dropped
    assert pread(data.path, 0, 4096) == pattern(0x11, 4096)

    errw = Table.single(n, t.Flakey(data.devno, 0, 0, 3600, error_writes=True))
    dm.load("dmsnap-test-flakey", errw)
    dm.suspend("dmsnap-test-flakey")
    dm.resume("dmsnap-test-flakey")
    assert_witness_agrees(dm, "dmsnap-test-flakey", errw)
    with pytest.raises(OSError) as e:
        pwrite(info.path, 0, pattern(0x33, 4096))
    assert e.value.errno == errno.EIO
    assert isinstance(dm.status("dmsnap-test-flakey")[0].status, st.FlakeyStatus)


def test_wait_event_and_poll(dm, loopdev, made):
    """A thin pool crossing its low-water mark raises a dm event: DEV_WAIT
    returns a new event counter and the armed control fd becomes readable."""
    import threading

    meta, data = loopdev(8 * MiB), loopdev(16 * MiB)
    blocks = 16 * MiB // (128 * 512)
    pool = made(
        "dmsnap-test-evpool",
        Table.single(sectors(data.path), t.ThinPool(meta.devno, data.devno, 128, blocks - 4)),
    )
    dm.message("dmsnap-test-evpool", "create_thin 0")
    vol = made("dmsnap-test-evthin", Table.single(8 * MiB // 512, t.Thin(pool.devno, 0)))
    before = dm.info("dmsnap-test-evpool").event_nr
    got: list[int] = []
    waiter = threading.Thread(
        target=lambda: got.append(dm.wait_event("dmsnap-test-evpool", before))
    )
    waiter.start()
    dm.ctl.arm_poll()
    pwrite(vol.path, 0, pattern(9, MiB))  # 16 blocks: below the low-water mark
    waiter.join(timeout=30)
    assert got and got[0] > before
    assert dm.ctl.poll(5.0)


def test_udev_flags_make_internal_layers_private(dm, loopdev):
    """The cookie flags reach udev: an internal layer is hidden from
    blkid/systemd (DM_UDEV_DISABLE_OTHER_RULES_FLAG in the udev db)."""
    import pyudev

    data = loopdev(8 * MiB)
    name = "dmsnap-test-private"
    info = dm.create(
        name,
        make_uuid(Role.INTERNAL, name),
        Table.single(sectors(data.path), t.Linear(data.devno, 0)),
    )
    try:
        dev = pyudev.Devices.from_name(pyudev.Context(), "block", info.kernel_name)
        props = dict(dev.properties)
        assert props.get("DM_UDEV_DISABLE_OTHER_RULES_FLAG") == "1"
        assert props.get("DM_UDEV_DISABLE_DISK_RULES_FLAG") == "1"
        assert props.get("DM_UDEV_PRIMARY_SOURCE_FLAG") == "1"
        assert os.path.exists(f"/dev/mapper/{name}")
    finally:
        dm.remove(name)
