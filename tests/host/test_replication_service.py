"""Replication's host-side pieces (no kernel): the resume token, and the
catalog's replication tables and identities (schema 7)."""

from __future__ import annotations

import sqlite3
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmsnap.errors import InvalidArgument
from dmsnap.replication.service import Token
from dmsnap.storage import catalog as C
from dmsnap.storage.catalog import Catalog

hexes = st.uuids().map(lambda u: u.hex)


@given(target=hexes, base=st.none() | hexes, cursor=st.integers(0, 1 << 50).map(lambda n: n * 512))
def test_a_token_reads_back_as_written(target: str, base: str | None, cursor: int) -> None:
    assert Token.parse(Token(target, base, cursor).text()) == Token(target, base, cursor)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        f"2-{uuid.uuid4().hex}-0-0",  # another token version
        f"1-{uuid.uuid4().hex}-0-513",  # not a whole sector
        f"1-{uuid.uuid4().hex}-0--512",
        "1-nothex-0-0",
        f"1-{uuid.uuid4().hex}-{uuid.uuid4().hex}",
    ],
)
def test_a_token_that_is_not_one_is_refused_in_one_line(text: str) -> None:
    with pytest.raises(InvalidArgument) as ei:
        Token.parse(text)
    assert "resume token" in ei.value.message and "\n" not in ei.value.message


def _pool(cat: Catalog) -> C.Pool:
    return cat.add_pool(
        "p", "thin", data_dev=None, cache_dev=None, size=1 << 30, cache_size=None, config={}
    )


def test_volumes_and_snapshots_have_their_own_uuids_unless_given(tmp_path) -> None:
    cat = Catalog(str(tmp_path / "catalog.db"))
    p = _pool(cat)
    a = cat.add_volume(p, "a", 1 << 20, dev_id=1)
    b = cat.add_volume(p, "b", 1 << 20, dev_id=2, uuid="ab" * 16)
    cat.add_group(p, "s", [(a, {"dev_id": 3}), (b, {"dev_id": 4, "uuid": "cd" * 16})])
    assert len(a.uuid) == 32 and b.uuid == "ab" * 16
    sa, sb = cat.snapshot("p", "a", "s"), cat.snapshot("p", "b", "s")
    assert len({a.uuid, sa.uuid, sb.uuid}) == 3 and sb.uuid == "cd" * 16


def test_a_schema_6_catalog_gets_uuids_and_the_replication_tables(tmp_path) -> None:
    path = str(tmp_path / "catalog.db")
    db = sqlite3.connect(path, isolation_level=None)
    schema6 = C.SCHEMA.replace("    uuid TEXT,", "    uuid_unused TEXT,")
    for stmt in schema6.split(";"):
        if stmt.strip() and "receives" not in stmt and "holds" not in stmt:
            db.execute(stmt)
    db.execute("INSERT INTO meta VALUES ('schema', '6')")
    db.execute(
        "INSERT INTO pools (id, name, uuid, backend, embedded, size, config, created)"
        " VALUES (1, 'p', 'u1', 'thin', 1, 1073741824, '{}', 0)"
    )
    for vid in (1, 2):
        db.execute(
            "INSERT INTO volumes (id, pool_id, name, size, created) VALUES (?, 1, ?, 1048576, 0)",
            (vid, f"v{vid}"),
        )
    db.execute("INSERT INTO snap_groups (id, pool_id, name, created) VALUES (1, 1, 's', 0)")
    db.execute(
        "INSERT INTO snapshots (id, volume_id, group_id, name, created) VALUES (1, 1, 1, 's', 0)"
    )
    db.close()
    cat = Catalog(path)
    uuids = [v.uuid for v in cat.volumes()] + [cat.snapshot("p", "v1", "s").uuid]
    assert all(len(u) == 32 for u in uuids) and len(set(uuids)) == 3
    assert cat.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == "7"
    assert cat.receives(1) == [] and cat.holds(1) == []


def test_a_hold_is_one_per_target_and_volume_and_goes_with_its_snapshot(tmp_path) -> None:
    cat = Catalog(str(tmp_path / "catalog.db"))
    p = _pool(cat)
    v = cat.add_volume(p, "a", 1 << 20, dev_id=1)
    for i, name in enumerate(("s1", "s2"), 2):
        cat.add_group(p, name, [(v, {"dev_id": i})])
    s1, s2 = cat.snapshot("p", "a", "s1"), cat.snapshot("p", "a", "s2")
    cat.set_hold(v.id, s1.id, "east")
    cat.set_hold(v.id, s1.id, "west")
    cat.set_hold(v.id, s2.id, "east")  # east moves on; west still needs s1
    assert cat.holds(s1.id) == ["west"] and cat.holds(s2.id) == ["east"]
    assert cat.remove_hold(v.id, "west") == 1 and cat.holds(s1.id) == []
    cat.remove_snapshot(s2.id)
    assert cat.db.execute("SELECT COUNT(*) FROM holds").fetchone()[0] == 0


def test_a_receive_keeps_its_cursor(tmp_path) -> None:
    cat = Catalog(str(tmp_path / "catalog.db"))
    p = _pool(cat)
    fields = {
        "volume_uuid": "a" * 32,
        "base_uuid": None,
        "target_uuid": "b" * 32,
        "target_name": "s1",
        "size": 1 << 20,
        "dev_id": 7,
    }
    r = cat.add_receive(p.id, "v", fields)
    cat.set_receive_cursor(r.id, 4096)
    got = cat.receive(p.id, "v")
    assert got is not None and got.cursor == 4096 and got.dev_id == 7
    cat.remove_pool(p.id)
    assert cat.db.execute("SELECT COUNT(*) FROM receives").fetchone()[0] == 0
