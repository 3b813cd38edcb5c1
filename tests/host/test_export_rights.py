"""Who may send the in-band snapshot command, per export, without a kernel:
the checks on what the user asks for, the catalog that keeps it (and the
migration of catalogs written before it), and the two emulators an export
with mixed rights serves over one volume. The LIO side (two backstores, an
ACL per initiator) is tested in the VM (tests/kernel/test_scsi_iscsi.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from test_scsi_support import FakeLun, FakeSnapshots, inquiry, sense_of

from dmsnap import errors as E
from dmsnap.scsi import sense as S
from dmsnap.scsi import snapcmd as SC
from dmsnap.scsi.emulation import Emulator
from dmsnap.scsi.sense import Key
from dmsnap.storage.catalog import SCHEMA_VERSION, Catalog, Export
from dmsnap.storage.exports import export_paths, snapshot_rights

A = "iqn.2026-11.org.example:a"
B = "iqn.2026-11.org.example:b"

# -- what the user may ask for ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "snap", "allow", "asked", "rights"),
    [
        ("iscsi", None, [A, B], None, None),  # the default: every initiator (as before)
        ("iscsi", None, [], None, None),
        ("iscsi", None, [A, B], ["all"], None),
        ("iscsi", None, [A, B], [], ()),  # --no-snapshot
        ("iscsi", None, [A, B], [A], (A,)),
        ("iscsi", None, [A, B], [B, A], (B, A)),
        ("local", None, [], None, None),
        ("local", None, [], ["all"], None),
        ("local", None, [], [], ()),
        ("local", "s", [], None, ()),  # a snapshot export never takes the command
        ("iscsi", "s", [A], [], ()),
        ("iscsi", "s", [A], ["all"], ()),
    ],
)
def test_rights_kept_as_asked(kind, snap, allow, asked, rights) -> None:
    assert snapshot_rights(kind, snap, allow, asked) == rights


@pytest.mark.parametrize(
    ("kind", "snap", "allow", "asked", "fragment"),
    [
        ("iscsi", None, [A, B], ["iqn.bad name"], "is not an iSCSI name"),
        ("iscsi", None, [A, B], ["ALL"], "is not an iSCSI name"),
        ("iscsi", None, [A, B], ["all", A], "--snapshot-allow all stands alone"),
        ("iscsi", None, [A, B], [A, A], "names an initiator twice"),
        ("iscsi", None, [A], [B], f"--snapshot-allow {B}: not among the --allow"),
        ("iscsi", None, [], [A], "needs --allow"),
        ("local", None, [], [A], "a local export has one initiator"),
        ("iscsi", "s", [A], [A], "a snapshot export is read-only"),
    ],
)
def test_bad_rights_are_clear_errors(kind, snap, allow, asked, fragment) -> None:
    with pytest.raises(E.InvalidArgument) as ei:
        snapshot_rights(kind, snap, allow, asked)
    assert fragment in ei.value.message


def _export(kind: str, snap: str | None, allow: list[str], rights) -> Export:
    return Export(
        1,
        1,
        "p",
        1,
        "v",
        None if snap is None else 1,
        snap,
        kind,
        "ser",
        {"allow": allow},
        0.0,
        rights,
    )


@pytest.mark.parametrize(
    ("kind", "snap", "allow", "rights", "paths"),
    [
        ("iscsi", None, [A, B], None, [True]),
        ("iscsi", None, [A, B], (), [False]),
        ("iscsi", None, [A, B], (A, B), [True]),  # everyone named: one backstore
        ("iscsi", None, [A, B], (A,), [True, False]),  # mixed: a second one refusing
        ("local", None, [], None, [True]),
        ("local", None, [], (), [False]),
        ("iscsi", "s", [A], (), [False]),
    ],
)
def test_backstores_per_export(kind, snap, allow, rights, paths) -> None:
    """Which backstores serve an export (the first one keeps the name it
    always had, dmsnap-<serial>, so exports made before keep theirs)."""
    assert export_paths(_export(kind, snap, allow, rights)) == paths


# -- the catalog -------------------------------------------------------------------------


def _pool_and_volume(c: Catalog):
    p = c.add_pool(
        "p", "thin", data_dev=None, cache_dev=None, size=1 << 30, cache_size=None, config={}
    )
    v = c.add_volume(p, "v", 1 << 20)
    return p, v


def test_catalog_keeps_rights(tmp_path: Path) -> None:
    c = Catalog(str(tmp_path / "catalog.db"))
    p, v = _pool_and_volume(c)
    c.add_export(p.id, v.id, None, "iscsi", "ser1", {"allow": [A, B]}, snapshot_allow=[A])
    c.close()
    c = Catalog(str(tmp_path / "catalog.db"))  # a daemon restart reads it back
    (ex,) = c.exports()
    assert ex.snapshot_allow == (A,) and ex.config == {"allow": [A, B]}
    c.remove_export(ex.id)
    c.add_export(p.id, v.id, None, "local", "ser2", {}, snapshot_allow=())
    c.add_export(p.id, v.id, None, "local", "ser3", {})
    assert [e.snapshot_allow for e in c.exports()] == [(), None]
    c.close()


SCHEMA_3_EXPORTS = """
CREATE TABLE exports_v3 (
    id INTEGER PRIMARY KEY,
    pool_id INTEGER NOT NULL REFERENCES pools (id) ON DELETE CASCADE,
    volume_id INTEGER NOT NULL REFERENCES volumes (id) ON DELETE CASCADE,
    snapshot_id INTEGER REFERENCES snapshots (id) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('local', 'iscsi')),
    serial TEXT NOT NULL UNIQUE,
    config TEXT NOT NULL,
    created REAL NOT NULL
);
INSERT INTO exports_v3 SELECT id, pool_id, volume_id, snapshot_id, kind, serial, config, created
    FROM exports;
DROP TABLE exports;
ALTER TABLE exports_v3 RENAME TO exports;
UPDATE meta SET value='3' WHERE key='schema';
"""


def test_catalog_before_rights_migrates_to_every_initiator(tmp_path: Path) -> None:
    """A schema-3 catalog (exports without snapshot_allow) opens, gains the
    column, and its exports keep today's rights: every initiator."""
    path = str(tmp_path / "catalog.db")
    c = Catalog(path)
    p, v = _pool_and_volume(c)
    c.add_export(p.id, v.id, None, "iscsi", "ser1", {"allow": []})
    c.close()
    db = sqlite3.connect(path)  # back to schema 3: the table as it was then
    db.executescript(SCHEMA_3_EXPORTS)
    db.close()

    db = sqlite3.connect(path)
    assert "snapshot_allow" not in {r[1] for r in db.execute("PRAGMA table_info(exports)")}
    db.close()

    c = Catalog(path)
    (ex,) = c.exports()
    assert ex.snapshot_allow is None and ex.serial == "ser1"
    c.add_export(p.id, v.id, None, "local", "ser2", {}, snapshot_allow=[])
    assert [e.snapshot_allow for e in c.exports()] == [None, ()]
    schema = c.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0]
    assert int(schema) == SCHEMA_VERSION == 7
    c.close()
    Catalog(path).close()  # opening it again changes nothing


# -- the two emulators of an export with mixed rights -------------------------------------


def _paths() -> tuple[FakeLun, FakeSnapshots, Emulator, Emulator]:
    """As dmsnap.scsi.target.start_device builds them: one LUN object (the
    volume), the snapshot service on both, one path refusing it."""
    lun, snaps = FakeLun(), FakeSnapshots()
    taking = Emulator(lun, snaps, snapshot_allowed=lambda _i: True)
    refusing = Emulator(lun, snaps, snapshot_allowed=lambda _i: False)
    return lun, snaps, taking, refusing


def test_refusing_path_answers_access_denied_with_a_clear_message() -> None:
    _, snaps, taking, refusing = _paths()
    token = SC.new_token()
    cdb, params = SC.create_command(SC.CreateRequest(token, "nightly"))
    r = refusing.execute(cdb, params, initiator="x")
    # ILLEGAL REQUEST, ACCESS DENIED - NO ACCESS RIGHTS (20h/02h): the command
    # is known (not INVALID COMMAND OPERATION CODE), this path may not use it
    assert sense_of(r) == (Key.ILLEGAL_REQUEST, 0x20, 0x02)
    why = SC.explain(S.decode(r.sense))
    assert why == "this initiator is not allowed to request snapshots of this volume"
    for cdb2 in (SC.status_cdb(token), SC.list_cdb()):
        assert sense_of(refusing.execute(cdb2, None)) == (Key.ILLEGAL_REQUEST, 0x20, 0x02)
    assert snaps.created == []
    assert taking.execute(cdb, params, initiator="x").ok
    assert [r.name for r in snaps.created] == ["nightly"]


def test_both_paths_are_one_disk() -> None:
    """Same INQUIRY, unit serial (VPD 0x80) and NAA (VPD 0x83): multipath and
    udev see one disk whichever path an initiator has; a write through one
    is read through the other."""
    _, _, taking, refusing = _paths()
    for page in (None, 0x80, 0x83):
        a, b = taking.execute(inquiry(page)), refusing.execute(inquiry(page))
        assert a.ok and a.data == b.data
    data = bytes(range(256)) * 2
    w = refusing.execute(bytes([0x2A, 0, 0, 0, 0, 8, 0, 0, 1, 0]), data)
    assert w.ok
    r = taking.execute(bytes([0x28, 0, 0, 0, 0, 8, 0, 0, 1, 0]))
    assert r.ok and r.data == data
