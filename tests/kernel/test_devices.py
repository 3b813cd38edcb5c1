"""Device identity and exclusivity of a pool's backing devices (docs/storage.md).

A pool's devices are recognised by what they are (st_rdev, the dmsnap
label), never by the path string they were given under, and nothing else
can claim them while the pool is assembled: ``mkfs`` and a second pool are
refused, and the data written before is read back intact.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from dmsnap import errors as E
from dmsnap.storage.manager import Manager

MiB = 1 << 20


def block(tag: int, n: int = 4096) -> bytes:
    return bytes([tag]) * n


@pytest.fixture
def mgr(tmp_path):
    m = Manager(str(tmp_path / "state"))
    yield m
    for p in m.catalog.pools():
        m.pool_destroy(p.name, force=True)
    m.close()


def mkfs(path: str) -> subprocess.CompletedProcess[str]:
    # -F once: "not a block special device"/"contains a file system" prompts
    # are skipped, but a device in use is still refused (that needs -F -F).
    return subprocess.run(
        ["mkfs.ext4", "-q", "-F", path], capture_output=True, text=True, check=False
    )


def exclusive_open_fails(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL)
    except OSError as e:
        return e.errno == 16  # EBUSY
    os.close(fd)
    return False


def test_second_pool_on_journal_device_under_another_name_is_refused(mgr, loopdev, tmp_path):
    data, jdev = loopdev(128 * MiB), loopdev(16 * MiB)
    mgr.pool_create("a", data=data.path, journal=jdev.path, backend="classic")
    mgr.volume_create("a", "v", 8 * MiB)
    mgr.volume_write("a", "v", 0, block(0xA1))
    link = tmp_path / "other-name"
    link.symlink_to(jdev.path)
    before = mgr.catalog.counts()
    with pytest.raises(E.Busy, match="pool a"):
        mgr.pool_create("b", size=128 * MiB, journal=str(link))
    dlink = tmp_path / "data-name"
    dlink.symlink_to(data.path)
    with pytest.raises(E.Busy):
        mgr.pool_create("c", data=str(dlink), journal_mode="none")
    assert mgr.catalog.counts() == before
    assert [p.name for p in mgr.catalog.pools()] == ["a"]
    assert mgr.volume_read("a", "v", 0, 4096) == block(0xA1)


def test_mkfs_on_devices_of_an_assembled_pool_fails(tmp_path, loopdev):
    data, cache, jdev = loopdev(128 * MiB), loopdev(16 * MiB), loopdev(16 * MiB)
    state = str(tmp_path / "state")
    m = Manager(state)
    try:
        m.pool_create("a", data=data.path, cache=cache.path, journal=jdev.path)
        m.volume_create("a", "v", 8 * MiB)
        m.volume_write("a", "v", 0, block(0xB2), fua=True)
        private = "/dev/mapper/dmsnap-a-v"  # the journaled volume's dm device
        for path in (jdev.path, data.path, cache.path, private):
            res = mkfs(path)
            assert res.returncode != 0, f"mkfs.ext4 {path} succeeded on a device of pool a"
            assert exclusive_open_fails(path), f"{path} can be opened exclusively"
        assert m.volume_read("a", "v", 0, 4096) == block(0xB2)
        # The acknowledged record is still in the journal: a restart replays it.
        m.close(drain=False)
        m = Manager(state)
        assert m.assemble()["pools"] == {"a": "ok"}
        assert m.volume_read("a", "v", 0, 4096) == block(0xB2)
        m.pool_destroy("a", force=True)
        # The pool is gone: its devices are free again (no claim leaks).
        for path in (jdev.path, data.path, cache.path):
            assert not exclusive_open_fails(path), f"{path} is still held"
    finally:
        for p in m.catalog.pools():
            m.pool_destroy(p.name, force=True)
        m.close()
