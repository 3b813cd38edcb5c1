"""Ids are never reused within a pool's life (issue 17, item 1).

The journal keys unflushed records by volume id. A volume deleted while its
records could not reach its device (a failing disk, a full pool) leaves them
in the journal; if the next volume got the same id, a crash would replay the
deleted volume's data into it: one tenant's data on another's disk.
"""

from __future__ import annotations

import pytest
from faultdev import FaultDevice
from jmodel import pattern, read_direct
from test_journal_errors import wait_for
from test_storage import write

from dmsnap import errors as E
from dmsnap.storage.manager import Manager

MiB = 1 << 20


def test_deleted_volume_records_never_reach_its_successor(tmp_path, dm, loopdev):
    fl = FaultDevice(dm, "dmsnap-test-idreuse", loopdev(192 * MiB))
    state = str(tmp_path / "state")
    m = Manager(state)
    try:
        m.pool_create("r", data=fl.path, backend="classic", journal_size=16 * MiB)
        m.volume_create("r", "keep", 8 * MiB)
        m.volume_create("r", "tenant-a", 8 * MiB)
        old = m.catalog.volume("r", "tenant-a").id
        fl.fail_writes(True)  # the flusher cannot put records on the pool's disk
        # keep's record holds the journal's checkpoint before tenant-a's
        m.open_volume("r", "keep").write(0, pattern(1, 4096))
        m.open_volume("r", "tenant-a").write(0, pattern(7, MiB))  # acknowledged
        wait_for(lambda: m.pool_show("r")["journal"]["lag_records"] >= 2, "records not stuck")
        m.volume_delete("r", "tenant-a")  # drops tenant-a's unflushed records
        # a classic extent is zeroed durably first: not on a disk failing writes
        with pytest.raises(E.UserError):
            m.volume_create("r", "tenant-b", 8 * MiB)
        fl.fail_writes(False)
        m.volume_create("r", "tenant-b", 8 * MiB)
        new = m.catalog.volume("r", "tenant-b").id

        m.close(drain=False)  # a crash: the journal keeps what it held
        m = Manager(state)
        m.assemble()
        assert m.open_volume("r", "keep").read(0, 4096) == pattern(1, 4096)
        data = m.open_volume("r", "tenant-b").read(0, MiB)
        assert data == bytes(MiB), "tenant-a's data replayed into tenant-b"
        assert new != old, "a deleted volume's id was handed to the next one"
    finally:
        for p in m.catalog.pools():
            m.pool_destroy(p.name, force=True)
        m.close()
        fl.remove()


@pytest.mark.parametrize("mode", ["nv", "none"])
def test_a_new_classic_volume_never_shows_a_deleted_ones_data(tmp_path, mode):
    """A classic volume is an extent of the pool's disk; the next volume may
    get the same extent. Found by `tools/torture crash` (classic states
    1353, 1415, 1425: a re-created volume read its predecessor's sector)."""
    m = Manager(str(tmp_path / "state"))
    try:
        m.pool_create("c", size=128 * MiB, backend="classic", journal_mode=mode)
        m.volume_create("c", "tenant-a", 8 * MiB)
        if mode == "nv":
            m.open_volume("c", "tenant-a").write(0, pattern(9, 8 * MiB))
        else:
            write(m.volume_show("c", "tenant-a")["path"], 0, pattern(9, 8 * MiB))
        m.volume_delete("c", "tenant-a")
        m.volume_create("c", "tenant-b", 8 * MiB)
        if mode == "nv":
            data = m.open_volume("c", "tenant-b").read(0, 8 * MiB)
        else:
            data = read_direct(m.volume_show("c", "tenant-b")["path"], 0, 8 * MiB)
        assert data == bytes(8 * MiB), "tenant-a's data shows in tenant-b"
    finally:
        for p in m.catalog.pools():
            m.pool_destroy(p.name, force=True)
        m.close()
