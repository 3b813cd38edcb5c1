"""Ids are never reused within a pool's life (issue 17, item 1).

The journal keys unflushed records by volume id. A volume deleted while its
records could not reach its device (a failing disk, a full pool) leaves them
in the journal; if the next volume got the same id, a crash would replay the
deleted volume's data into it: one tenant's data on another's disk.
"""

from __future__ import annotations

from jmodel import pattern
from test_journal_errors import Flakey, wait_for

from dmsnap.storage.manager import Manager

MiB = 1 << 20


def test_deleted_volume_records_never_reach_its_successor(tmp_path, dm, loopdev):
    fl = Flakey(dm, loopdev(192 * MiB), "dmsnap-test-idreuse")
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
        m.volume_create("r", "tenant-b", 8 * MiB)
        new = m.catalog.volume("r", "tenant-b").id

        m.close(drain=False)  # a crash: the journal keeps what it held
        fl.fail_writes(False)  # the disk is repaired
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
