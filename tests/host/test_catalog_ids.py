"""Catalog ids are never reused within a pool's life (issue 17, item 1):
the journal keys records by volume id and SCSI serials are made of ids."""

from __future__ import annotations

import sqlite3

from dmsnap.storage import catalog as C
from dmsnap.storage.catalog import Catalog


def _pool(cat: Catalog, name: str = "p") -> C.Pool:
    return cat.add_pool(
        name, "thin", data_dev=None, cache_dev=None, size=1 << 30, cache_size=None, config={}
    )


def test_every_id_is_new_after_a_delete(tmp_path):
    cat = Catalog(str(tmp_path / "catalog.db"))
    p = _pool(cat)
    v1 = cat.add_volume(p, "a", 1 << 20, dev_id=1)
    g1 = cat.add_group(p, "s", [(v1, {"dev_id": 2})])
    s1 = cat.snapshot("p", "a", "s")
    e1 = cat.add_export(p.id, v1.id, None, "local", "serial1", {}).id
    pend1 = cat.begin_pending(p.id, "volume.create", {})

    cat.end_pending(pend1)
    cat.remove_export(e1)
    cat.remove_snapshot(s1.id)
    cat.remove_volume(v1.id)  # the newest of each kind is gone: the case SQLite reuses

    v2 = cat.add_volume(p, "b", 1 << 20, dev_id=3)
    g2 = cat.add_group(p, "s", [(v2, {"dev_id": 4})])
    s2 = cat.snapshot("p", "b", "s")
    e2 = cat.add_export(p.id, v2.id, None, "local", "serial2", {}).id
    pend2 = cat.begin_pending(p.id, "volume.create", {})
    assert v2.id != v1.id
    assert g2 != g1
    assert s2.id != s1.id
    assert e2 != e1
    assert pend2 != pend1

    cat.remove_pool(p.id)
    assert _pool(cat, "q").id != p.id


def test_ids_survive_a_restart(tmp_path):
    path = str(tmp_path / "catalog.db")
    cat = Catalog(path)
    p = _pool(cat)
    v1 = cat.add_volume(p, "a", 1 << 20)
    cat.remove_volume(v1.id)
    cat.close()
    cat = Catalog(path)
    assert cat.add_volume(cat.pool("p"), "b", 1 << 20).id != v1.id


def test_an_old_catalog_is_upgraded_and_stops_reusing(tmp_path):
    """A schema-4 catalog (plain INTEGER PRIMARY KEY) keeps its rows and
    references, and from then on never reuses an id."""
    path = str(tmp_path / "catalog.db")
    old_schema = C.SCHEMA.replace("PRIMARY KEY AUTOINCREMENT", "PRIMARY KEY")
    db = sqlite3.connect(path, isolation_level=None)
    for stmt in old_schema.split(";"):
        if stmt.strip():
            db.execute(stmt)
    db.execute("INSERT INTO meta VALUES ('schema', '4')")
    db.execute(
        "INSERT INTO pools (id, name, uuid, backend, embedded, size, config, created)"
        " VALUES (1, 'p', 'u1', 'thin', 1, 1073741824, '{}', 0)"
    )
    for vid, name in ((1, "a"), (2, "b")):
        db.execute(
            "INSERT INTO volumes (id, pool_id, name, size, created) VALUES (?, 1, ?, 1048576, 0)",
            (vid, name),
        )
    db.execute("INSERT INTO snap_groups (id, pool_id, name, created) VALUES (1, 1, 's', 0)")
    db.execute(
        "INSERT INTO snapshots (id, volume_id, group_id, name, created) VALUES (1, 1, 1, 's', 0)"
    )
    db.close()

    cat = Catalog(path)
    assert [v.name for v in cat.volumes("p")] == ["a", "b"]
    assert cat.snapshot("p", "a", "s").group_id == 1
    for table in C._NEVER_REUSED:
        sql = cat.db.execute("SELECT sql FROM sqlite_master WHERE name=?", (table,)).fetchone()[0]
        assert "AUTOINCREMENT" in sql.upper(), table
    assert cat.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == "7"
    assert cat.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    # the cascade still works after the rebuild
    cat.remove_volume(2)
    assert cat.add_volume(cat.pool("p"), "c", 1 << 20).id == 3
    cat.remove_pool(1)
    assert cat.counts()["snapshots"] == 0
