"""Device-mapper layer against the real kernel (run in the VM).

``dmsetup`` is the independent witness: what it prints must agree with what
dmsnap rendered and parsed.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest

from dmsnap.dm import DeviceMapper, DmError, Role, make_uuid
from dmsnap.dm import status as st
from dmsnap.dm import targets as t
from dmsnap.dm.targets import Table, TableLine

MiB = 1024 * 1024
SECTOR = 512


def dmsetup(*args: str) -> str:
    return subprocess.run(
        ["dmsetup", *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def sectors(dev: str) -> int:
    fd = os.open(dev, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END) // SECTOR
    finally:
        os.close(fd)


def pwrite(dev: str, offset: int, data: bytes, *, sync: bool = True) -> None:
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT if len(data) % 4096 == 0 else os.O_WRONLY)
    try:
        buf = _aligned(data)
        os.pwrite(fd, buf, offset)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def pread(dev: str, offset: int, length: int) -> bytes:
    # O_DIRECT: read what the device holds, not a stale page cache.
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap

        m = mmap.mmap(-1, length)
        os.preadv(fd, [m], offset)
        return bytes(m)
    finally:
        os.close(fd)


def _aligned(data: bytes) -> memoryview | bytes:
    import mmap

    if len(data) % 4096:
        return data
    m = mmap.mmap(-1, len(data))
    m.write(data)
    return memoryview(m)


def pattern(tag: int, size: int = 4096) -> bytes:
    return bytes([tag & 0xFF]) * size


def witness_table(name: str) -> str:
    return dmsetup("table", name)


def witness_status(name: str) -> str:
    return dmsetup("status", name)


def assert_witness_agrees(dm: DeviceMapper, name: str, rendered: Table) -> None:
    """dmsetup's view of table and status equals ours."""
    ours = dm.table(name)
    assert ours == rendered
    # dmsetup strips the trailing space some targets (thin-pool, flakey) print.
    assert witness_table(name) == ours.render().rstrip()
    lines = dm.status(name)
    theirs = witness_status(name).splitlines()
    assert len(theirs) == len(lines)
    for ours_line, their_line in zip(lines, theirs, strict=True):
        start, length, ttype, *rest = their_line.split(" ", 3)
        params = rest[0] if rest else ""
        assert (int(start), int(length), ttype) == (
            ours_line.start,
            ours_line.length,
            ours_line.target_type,
        )
        assert params.strip() == ours_line.params.strip()
        assert st.parse_status(ttype, params) == ours_line.status


@pytest.fixture
def uuid():
    return lambda: make_uuid(Role.TEST, os.urandom(8).hex())


def test_version_and_targets(dm):
    major, minor, _ = dm.version()
    assert major == 4 and minor >= 27
    for ttype in ("linear", "thin-pool", "writecache", "snapshot", "flakey", "log-writes"):
        assert dm.target_version(ttype)[0] >= 1
    versions = dm.target_versions()
    assert {"linear", "thin-pool", "thin", "snapshot-origin", "snapshot"} <= set(versions)


def test_linear_lifecycle_and_udev_node(dm, loopdev, uuid):
    a = loopdev(8 * MiB)
    table = Table.single(sectors(a.path), t.Linear(a.devno, 0))
    name = "dmsnap-test-lin"
    info = dm.create(name, uuid(), table)
    assert os.path.exists(f"/dev/mapper/{name}")
    assert os.path.realpath(f"/dev/mapper/{name}") == f"/dev/{info.kernel_name}"
    assert_witness_agrees(dm, name, table)
    pwrite(info.path, 4096, pattern(0xA5))
    assert pread(a.path, 4096, 4096) == pattern(0xA5)

    dm.suspend(name)
    assert dm.info(name).suspended
    assert "SUSPENDED" in dmsetup("info", name).upper()
    dm.resume(name)
    assert not dm.info(name).suspended
    dm.suspend(name, flush=False, lockfs=False)
    assert dm.info(name).suspended
    dm.resume(name)

    # Reload a two-segment table (the device grows) through load + resume.
    b = loopdev(4 * MiB)
    two = Table(
        (
            TableLine(0, sectors(a.path), t.Linear(a.devno, 0)),
            TableLine(sectors(a.path), sectors(b.path), t.Linear(b.devno, 0)),
        )
    )
    dm.load(name, two)
    assert dm.info(name).inactive_table
    dm.suspend(name)
    dm.resume(name)
    assert sectors(info.path) == two.size
    assert_witness_agrees(dm, name, two)

    assert dm.remove(name)
    assert not os.path.lexists(f"/dev/mapper/{name}")
    assert not dm.exists(name)


def test_errors_name_device_and_operation(dm):
    with pytest.raises(DmError) as e:
        dm.suspend("dmsnap-test-missing")
    assert str(e.value).startswith("suspend dmsnap-test-missing: ")
    assert e.value.errno == errno.ENXIO
    with pytest.raises(DmError, match=r"^message dmsnap-test-missing"):
        dm.message("dmsnap-test-missing", "flush")


def test_duplicate_create_is_refused_and_changes_nothing(dm, loopdev, uuid):
    a = loopdev(4 * MiB)
    table = Table.single(sectors(a.path), t.Linear(a.devno, 0))
    dm.create("dmsnap-test-dup", uuid(), table)
    before = dmsetup("ls")
    with pytest.raises(DmError, match=r"^create dmsnap-test-dup: Device or resource busy"):
        dm.create("dmsnap-test-dup", uuid(), table)
    assert dmsetup("ls") == before
    dm.remove("dmsnap-test-dup")


def test_bad_table_rejected_by_kernel_leaves_nothing(dm, loopdev, uuid):
    a = loopdev(MiB)
    before = dmsetup("ls")
    # A table reaching past the end of its device: the kernel refuses the
    # load, and create removes the half-made device again.
    with pytest.raises(DmError, match=r"^load dmsnap-test-bad: Invalid argument"):
        dm.create("dmsnap-test-bad", uuid(), Table.single(4096, t.Linear(a.devno, 0)))
    assert dmsetup("ls") == before


def test_list_devices_retries_on_buffer_full(dm, uuid):
    n = 220
    names = [f"dmsnap-test-many-{i:03d}-{'x' * 40}" for i in range(n)]
    try:
        for name in names:
            dm.create(name, uuid())  # no table: no resume, cheap
        dm.ctl.buffer_full_retries = 0
        listed = {e.name: e for e in dm.list_devices()}
        assert dm.ctl.buffer_full_retries >= 1
        assert set(names) <= set(listed)
        assert all(listed[nm].uuid and listed[nm].uuid.startswith("DMSNAP-") for nm in names)
        witness = {line.split()[0] for line in dmsetup("ls").splitlines()}
        assert set(listed) == witness
    finally:
        for name in names:
            if dm.exists(name):
                dm.remove(name)


def test_zero_and_error_targets(dm, uuid):
    z = Table.single(8192, t.Zero())
    e = Table.single(8192, t.Error())
    zi = dm.create("dmsnap-test-zero", uuid(), z)
    ei = dm.create("dmsnap-test-err", uuid(), e)
    try:
        assert_witness_agrees(dm, "dmsnap-test-zero", z)
        assert_witness_agrees(dm, "dmsnap-test-err", e)
        assert pread(zi.path, 0, 4096) == bytes(4096)
        with pytest.raises(OSError) as exc:
            pread(ei.path, 0, 4096)
        assert exc.value.errno == errno.EIO
    finally:
        dm.remove("dmsnap-test-zero")
        dm.remove("dmsnap-test-err")


def test_busy_remove_fails_clearly_and_deferred_remove_works(dm, loopdev, uuid):
    a = loopdev(4 * MiB)
    name = "dmsnap-test-busy"
    info = dm.create(name, uuid(), Table.single(sectors(a.path), t.Linear(a.devno, 0)))
    fd = os.open(info.path, os.O_RDONLY)
    try:
        with pytest.raises(DmError) as e:
            dm.remove(name)
        assert e.value.errno == errno.EBUSY
        assert str(e.value) == f"remove {name}: Device or resource busy"
        assert dm.exists(name)  # unchanged
        assert dm.remove(name, deferred=True) is False
        assert dm.exists(name)
        assert "DEFERRED" in dmsetup("info", name).upper() or dm.exists(name)
    finally:
        os.close(fd)
    # Last close queues the removal (the kernel does it from a workqueue).
    deadline = time.monotonic() + 10
    while dm.exists(name):
        assert time.monotonic() < deadline, "deferred removal did not happen"
        time.sleep(0.05)


def test_without_udev_nodes_are_made_and_removed_by_us(loopdev, uuid, tmp_path, monkeypatch):
    """With no udev (containers, early boot) dmsnap makes the /dev/mapper
    node itself. The VM's real udev would race for /dev/mapper, so the
    fallback is pointed at a scratch directory."""
    from dmsnap.dm import udev as dm_udev
    from dmsnap.dm.udev import UdevSync

    monkeypatch.setattr(dm_udev, "MAPPER_DIR", str(tmp_path))
    a = loopdev(4 * MiB)
    with DeviceMapper(udev=UdevSync(use_udev=False)) as dm:
        info = dm.create(
            "dmsnap-test-noudev", uuid(), Table.single(sectors(a.path), t.Linear(a.devno, 0))
        )
        node = tmp_path / "dmsnap-test-noudev"
        st_ = os.stat(node)
        assert os.major(st_.st_rdev) == os.major(info.dev)
        assert os.minor(st_.st_rdev) == os.minor(info.dev)
        pwrite(str(node), 0, pattern(0x42))
        assert pread(a.path, 0, 4096) == pattern(0x42)
        dm.remove("dmsnap-test-noudev")
        assert not node.exists()
