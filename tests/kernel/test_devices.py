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
from test_storage import block, read, write

from dmsnap import errors as E
from dmsnap.storage import loop
from dmsnap.storage.manager import Manager

MiB = 1 << 20


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


# -- 3. pools find their disks by label ------------------------------------------


def reattach(dev: loop.LoopDevice, backing_file: str) -> None:
    """Bind ``backing_file`` to the loop device ``dev`` names (it must be
    free): the same name, another disk, as after a reboot renames disks."""
    subprocess.run(["losetup", dev.path, backing_file], check=True)


@pytest.mark.parametrize("mode", ["none", "nv"])
def test_pools_follow_their_disks_when_loop_devices_swap(tmp_path, loopdev, mode):
    da, db = loopdev(128 * MiB), loopdev(128 * MiB)
    state = str(tmp_path / "state")
    m = Manager(state)
    try:
        m.pool_create("a", data=da.path, backend="classic", journal_mode=mode)
        m.pool_create("b", data=db.path, backend="classic", journal_mode=mode)
        for pool, tag in (("a", 0xAA), ("b", 0xBB)):
            m.volume_create(pool, "v", 16 * MiB)
            if mode == "none":
                write(f"/dev/dmsnap/{pool}/v", 0, block(tag))
            else:
                m.volume_write(pool, "v", 0, block(tag), fua=True)
        m.teardown()  # daemon stop --teardown: every device gone, journals drained
        m.close()
        loop.detach(da)
        loop.detach(db)
        reattach(da, db.backing_file)  # the names swap their disks
        reattach(db, da.backing_file)
        m = Manager(state)
        assert m.assemble()["pools"] == {"a": "ok", "b": "ok"}
        for pool, tag in (("a", 0xAA), ("b", 0xBB)):
            got = (
                read(f"/dev/mapper/dmsnap-{pool}-v", 0, 4096)
                if mode == "none"
                else m.volume_read(pool, "v", 0, 4096)
            )
            assert got == block(tag), f"pool {pool} serves the other pool's disk"
        # The catalog follows the disks it found.
        assert (m.catalog.pool("a").data_dev, m.catalog.pool("b").data_dev) == (db.path, da.path)
    finally:
        for p in m.catalog.pools():
            m.pool_destroy(p.name, force=True)
        m.close()


def test_a_stranger_disk_under_the_recorded_name_is_refused(tmp_path, loopdev):
    da = loopdev(128 * MiB)
    stranger = tmp_path / "stranger.img"
    loop.make_sparse(str(stranger), 128 * MiB)
    state = str(tmp_path / "state")
    m = Manager(state)
    try:
        m.pool_create("a", data=da.path, backend="classic", journal_mode="none")
        m.volume_create("a", "v", 16 * MiB)
        m.teardown()
        m.close()
        own = da.backing_file
        loop.detach(da)
        reattach(da, str(stranger))  # pool a's disk is gone; another one has its name
        m = Manager(state)
        rep = m.assemble()
        assert "a" in m.pool_errors
        assert "carries no dmsnap label" in rep["pools"]["a"], rep["pools"]["a"]
        assert "\n" not in rep["pools"]["a"]
        assert not [n for n in dm_names() if n.startswith("dmsnap-a-")]
        with open(stranger, "rb") as f:  # nothing was written to the stranger
            assert f.read() == bytes(128 * MiB)
        # Its own disk comes back (under a new name): the pool assembles on it.
        m.close()
        other = loopdev(4096)
        loop.detach(other)
        reattach(other, own)
        m = Manager(state)
        assert m.assemble()["pools"] == {"a": "ok"}
        assert m.catalog.pool("a").data_dev == other.path
    finally:
        for p in m.catalog.pools():
            m.pool_destroy(p.name, force=True)
        m.close()


def test_second_loop_device_of_a_pools_disk_is_refused(mgr, loopdev):
    da = loopdev(128 * MiB)
    mgr.pool_create("a", data=da.path, backend="classic", journal_mode="none")
    again = loop.attach(da.backing_file)  # the same disk, another device number
    try:
        with pytest.raises(E.Busy, match="pool a"):
            mgr.pool_create("b", data=again.path, backend="classic", journal_mode="none")
        assert [p.name for p in mgr.catalog.pools()] == ["a"]
    finally:
        loop.detach(again)


def dm_names() -> set[str]:
    out = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True, check=True).stdout
    return {ln.split()[0] for ln in out.splitlines() if ln and not ln.startswith("No devices")}


def test_pool_made_before_labels_assembles_by_path_with_a_warning(tmp_path, loopdev, caplog):
    da, jdev = loopdev(128 * MiB), loopdev(16 * MiB)
    state = str(tmp_path / "state")
    m = Manager(state)
    try:
        m.pool_create("old", data=da.path, journal=jdev.path, backend="classic")
        m.volume_create("old", "v", 8 * MiB)
        m.volume_write("old", "v", 0, block(0xC3), fua=True)
        # As a pool created before labels: no labels in its catalog entry.
        pool = m.catalog.pool("old")
        config = dict(pool.config)
        del config["labels"]
        m.catalog.update_pool(pool.id, config=config)
        m.close(drain=False)
        m = Manager(state)
        with caplog.at_level("WARNING", logger="dmsnap.storage"):
            assert m.assemble()["pools"] == {"old": "ok"}
        assert "pool old: its devices carry no dmsnap label" in caplog.text
        assert m.volume_read("old", "v", 0, 4096) == block(0xC3)
        assert m.pool_show("old")["labels"] is None
        assert exclusive_open_fails(jdev.path)  # held all the same
    finally:
        for p in m.catalog.pools():
            m.pool_destroy(p.name, force=True)
        m.close()


def test_data_cache_and_journal_devices_are_found_after_their_names_rotate(tmp_path, loopdev):
    dev = {"data": loopdev(128 * MiB), "cache": loopdev(16 * MiB), "journal": loopdev(16 * MiB)}
    files = {role: d.backing_file for role, d in dev.items()}
    state = str(tmp_path / "state")
    m = Manager(state)
    try:
        m.pool_create(
            "a", data=dev["data"].path, cache=dev["cache"].path, journal=dev["journal"].path
        )
        m.volume_create("a", "v", 8 * MiB)
        m.volume_write("a", "v", 0, block(0xD4), fua=True)
        m.teardown()
        m.close()
        for d in dev.values():
            loop.detach(d)
        # data's name now holds the cache disk, cache's the journal, journal's the data
        reattach(dev["data"], files["cache"])
        reattach(dev["cache"], files["journal"])
        reattach(dev["journal"], files["data"])
        m = Manager(state)
        assert m.assemble()["pools"] == {"a": "ok"}
        assert m.volume_read("a", "v", 0, 4096) == block(0xD4)
        pool = m.catalog.pool("a")
        assert (pool.data_dev, pool.cache_dev, pool.config["journal"]["path"]) == (
            dev["journal"].path,
            dev["data"].path,
            dev["cache"].path,
        )
        assert exclusive_open_fails(dev["cache"].path)  # the journal disk, held
        m.volume_write("a", "v", 4096, block(0xD5), fua=True)
        assert m.volume_read("a", "v", 0, 8192) == block(0xD4) + block(0xD5)
    finally:
        for p in m.catalog.pools():
            m.pool_destroy(p.name, force=True)
        m.close()
