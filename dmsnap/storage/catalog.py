"""The catalog: dmsnap's names and layout, in SQLite in the state directory.

The kernel holds the devices and the journal holds the data; the catalog is
the source of truth for *names*: pools, volumes, snapshots, snapshot groups,
and the operations in flight. Every change is one transaction.

Crash safety follows Docker's devmapper ``processPendingTransaction``: an
operation that changes the kernel first writes a *pending* record (in its own
transaction), then changes the kernel, then commits the catalog change and
deletes the pending record in one transaction. On start, each pending record
is compared with the kernel's state (for thin pools, the pool's transaction
id, which the kernel stores atomically with its metadata) and rolled forward
or back.
"""

from __future__ import annotations

import enum
import json
import os
import sqlite3
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from dmsnap.units import Bytes

SCHEMA_VERSION = 6  # 2: markers, 3: exports, 4: exports.snapshot_allow, 5: AUTOINCREMENT,
# 6: schedules, schedule_snapshots

# Ids are never handed out twice (AUTOINCREMENT: SQLite keeps the largest id
# ever used in sqlite_sequence). The journal keys records by volume id and a
# SCSI serial is made of ids: a reused id could replay a deleted volume's data
# into its successor, or show an initiator a new disk under an old identity.
_NEVER_REUSED = (
    "pools",
    "volumes",
    "snap_groups",
    "snapshots",
    "exports",
    "pending",
    "schedules",
)

# Statements are split on ';', so comments in here must not contain one.
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pools (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    uuid TEXT NOT NULL UNIQUE,
    backend TEXT NOT NULL CHECK (backend IN ('thin', 'classic')),
    data_dev TEXT,            -- NULL for the embedded default (loop file)
    cache_dev TEXT,           -- NULL: no writecache
    embedded INTEGER NOT NULL,
    size INTEGER NOT NULL,    -- bytes of the data device
    cache_size INTEGER,       -- bytes of the cache device
    config TEXT NOT NULL,     -- JSON: layout decisions (metadata size, block sizes...)
    transaction_id INTEGER NOT NULL DEFAULT 0,
    next_dev_id INTEGER NOT NULL DEFAULT 1,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS volumes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pool_id INTEGER NOT NULL REFERENCES pools (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,    -- bytes
    dev_id INTEGER,           -- thin device id (thin backend)
    extent_start INTEGER,     -- sectors on the pool data device (classic backend)
    created REAL NOT NULL,
    UNIQUE (pool_id, name)
);
CREATE TABLE IF NOT EXISTS snap_groups (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pool_id INTEGER NOT NULL REFERENCES pools (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    token TEXT,               -- initiator's request token (in-band requests)
    labels TEXT NOT NULL DEFAULT '{}',
    marker INTEGER,           -- journal marker that produced it (journal issue)
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    volume_id INTEGER NOT NULL REFERENCES volumes (id) ON DELETE CASCADE,
    group_id INTEGER NOT NULL REFERENCES snap_groups (id),
    name TEXT NOT NULL,
    dev_id INTEGER,           -- thin device id of the snapshot
    cow_start INTEGER,        -- classic: COW extent on the pool data device (sectors)
    cow_size INTEGER,         -- classic: bytes
    active INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    UNIQUE (volume_id, name)
);
CREATE INDEX IF NOT EXISTS snapshots_group ON snapshots (group_id);
-- A snapshot request that went into a pool's journal as a MARKER record.
-- Its id is the marker id in the journal, state 'pending' until the flusher
-- reaches it, then 'done' (group_id set, same transaction as the group) or
-- 'failed' (error says why). Replay after a crash delivers a marker again,
-- a 'done' or 'failed' one is never acted on twice.
CREATE TABLE IF NOT EXISTS markers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pool_id INTEGER NOT NULL REFERENCES pools (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    token TEXT,
    request TEXT NOT NULL,    -- JSON: volumes, labels (also in the journal record)
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'failed')),
    group_id INTEGER,
    error TEXT,
    created REAL NOT NULL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS markers_state ON markers (pool_id, state);
-- A volume (or snapshot) served over SCSI: a LIO user backstore + fabric.
-- serial is the LUN's unit serial and the seed of its NAA id, stable for
-- as long as the export exists (initiators' multipath keys on it).
CREATE TABLE IF NOT EXISTS exports (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pool_id INTEGER NOT NULL REFERENCES pools (id) ON DELETE CASCADE,
    volume_id INTEGER NOT NULL REFERENCES volumes (id) ON DELETE CASCADE,
    snapshot_id INTEGER REFERENCES snapshots (id) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('local', 'iscsi')),
    serial TEXT NOT NULL UNIQUE,
    config TEXT NOT NULL,     -- JSON: iqn, portal, allow, chap
    created REAL NOT NULL,
    -- who may send the in-band snapshot command: NULL every initiator that
    -- reaches the LUN (what exports before schema 4 did), else a JSON list
    -- of initiator IQNs (an empty list: nobody, a local export: this host).
    snapshot_allow TEXT
);
-- classic: extents added to a snapshot's COW area when it grew (autoextend),
-- in order after its first extent (snapshots.cow_start), snapshots.cow_size
-- is the total.
CREATE TABLE IF NOT EXISTS cow_extents (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots (id) ON DELETE CASCADE,
    start INTEGER NOT NULL,   -- sectors on the pool data device
    sectors INTEGER NOT NULL
);
-- Target-side schedules (dmsnap/schedule, docs/schedules.md): their rows
-- are read and written by dmsnap.schedule.store only. last_slot is the UTC
-- instant of the slot the last run stood for (at first: when the schedule
-- was created or resumed), pending_token the run in flight.
CREATE TABLE IF NOT EXISTS schedules (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    pool_id INTEGER NOT NULL REFERENCES pools (id) ON DELETE CASCADE,
    volumes TEXT NOT NULL,    -- JSON: volume names in the pool (one cut)
    every INTEGER,            -- seconds (NULL: calendar)
    calendar TEXT,            -- the spec as given (NULL: every)
    tz TEXT NOT NULL,         -- IANA zone of the calendar and of retention periods
    retention TEXT NOT NULL,  -- JSON: hourly daily weekly monthly yearly keep min_free
    paused INTEGER NOT NULL DEFAULT 0,
    last_slot REAL NOT NULL,
    last_run REAL,
    last_error TEXT,
    runs INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    pending_token TEXT,
    pending_slot REAL,
    created REAL NOT NULL
);
-- Which snapshot groups a schedule made: the only ones it may prune. A row
-- is written in the transaction that records the run, and one whose group is
-- gone (deleted by hand) is dropped by the schedule.
CREATE TABLE IF NOT EXISTS schedule_snapshots (
    schedule_id INTEGER NOT NULL REFERENCES schedules (id) ON DELETE CASCADE,
    group_id INTEGER NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (schedule_id, group_id)
);
CREATE TABLE IF NOT EXISTS pending (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pool_id INTEGER,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    created REAL NOT NULL
);
"""


class CatalogError(Exception):
    pass


class NotFound(CatalogError):
    pass


class Exists(CatalogError):
    pass


@dataclass(frozen=True)
class Pool:
    id: int
    name: str
    uuid: str
    backend: str
    data_dev: str | None
    cache_dev: str | None
    embedded: bool
    size: int
    cache_size: int | None
    config: dict[str, Any]
    transaction_id: int
    next_dev_id: int
    created: float


@dataclass(frozen=True)
class Volume:
    id: int
    pool_id: int
    pool: str
    name: str
    size: int
    dev_id: int | None
    extent_start: int | None
    created: float


@dataclass(frozen=True)
class Snapshot:
    id: int
    volume_id: int
    group_id: int
    pool: str
    volume: str
    name: str
    dev_id: int | None
    cow_start: int | None
    cow_size: int | None
    active: bool
    created: float
    labels: dict[str, str] = field(default_factory=dict)


class MarkerState(enum.StrEnum):
    """Where a snapshot request (a journal marker) stands."""

    PENDING = "pending"  # durable in the journal; the flusher has not reached it
    DONE = "done"  # its snapshot group exists (group_id)
    FAILED = "failed"  # no snapshot; error says why


@dataclass(frozen=True)
class Marker:
    id: int
    pool_id: int
    name: str
    token: str | None
    request: dict[str, Any]
    state: MarkerState
    group_id: int | None
    error: str | None
    created: float
    finished: float | None


@dataclass(frozen=True)
class Export:
    id: int
    pool_id: int
    pool: str
    volume_id: int
    volume: str
    snapshot_id: int | None
    snapshot: str | None
    kind: str
    serial: str
    config: dict[str, Any]
    created: float
    # None: every initiator that reaches the LUN may snapshot; else these IQNs
    # (empty: nobody; for a local export, empty is off and anything else on).
    snapshot_allow: tuple[str, ...] | None = None

    @property
    def ref(self) -> str:
        return f"{self.pool}/{self.volume}" + (f"@{self.snapshot}" if self.snapshot else "")


@dataclass(frozen=True)
class Pending:
    id: int
    pool_id: int | None
    kind: str
    payload: dict[str, Any]
    created: float


class Catalog:
    """One SQLite database; use from one thread at a time (the daemon
    serialises control operations)."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        # isolation_level=None: we issue BEGIN/COMMIT ourselves so that a
        # "transaction" in this module is exactly one SQLite transaction.
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA foreign_keys = ON")
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = FULL")
        self._rebuild_for_autoincrement()
        with self.tx():
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    self.db.execute(stmt)
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise CatalogError(
                    f"catalog {path} has schema {row[0]}, newer than this dmsnap "
                    f"({SCHEMA_VERSION}); upgrade dmsnap"
                )
            elif int(row[0]) < SCHEMA_VERSION:
                # 2 added the markers table, 3 the exports table (created above),
                # 4 the exports' snapshot_allow column (NULL: every initiator, as
                # before), 5 AUTOINCREMENT ids (_rebuild_for_autoincrement), 6 the
                # schedules and schedule_snapshots tables (created above, empty).
                cols = {r[1] for r in self.db.execute("PRAGMA table_info(exports)")}
                if "snapshot_allow" not in cols:
                    self.db.execute("ALTER TABLE exports ADD COLUMN snapshot_allow TEXT")
                self.db.execute(
                    "UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),)
                )

    def _rebuild_for_autoincrement(self) -> None:
        """Schema 5: catalogs made before it have plain ``INTEGER PRIMARY KEY``
        ids, which SQLite reuses after a delete. SQLite cannot add
        AUTOINCREMENT to a table, so each table is rebuilt (SQLite's documented
        12-step procedure: foreign keys off, copy, drop, rename, check). The
        copied rows seed sqlite_sequence with the largest id in use."""
        db = self.db
        have = {
            r[0]: r[1] or ""
            for r in db.execute("SELECT name, sql FROM sqlite_master WHERE type='table'")
        }
        old = [t for t in _NEVER_REUSED if t in have and "AUTOINCREMENT" not in have[t].upper()]
        if not old:
            return
        creates = {}
        for stmt in SCHEMA.split(";"):
            body = "\n".join(ln for ln in stmt.splitlines() if not ln.startswith("--")).strip()
            if body.startswith("CREATE TABLE"):
                creates[body.split("EXISTS", 1)[1].split("(", 1)[0].strip()] = body
        db.execute("PRAGMA foreign_keys = OFF")  # no effect inside a transaction
        try:
            with self.tx():
                for t in old:
                    cols = [r[1] for r in db.execute(f"PRAGMA table_info({t})")]
                    db.execute(creates[t].replace(f"EXISTS {t} (", f"EXISTS {t}__new (", 1))
                    keep = [c for c in cols if c in _columns(db, f"{t}__new")]
                    names_ = ", ".join(keep)
                    db.execute(f"INSERT INTO {t}__new ({names_}) SELECT {names_} FROM {t}")
                    db.execute(f"DROP TABLE {t}")
                    db.execute(f"ALTER TABLE {t}__new RENAME TO {t}")
                bad = db.execute("PRAGMA foreign_key_check").fetchall()
                if bad:
                    raise CatalogError(
                        f"catalog {self.path}: {len(bad)} broken references found while "
                        "upgrading to schema 5; nothing was changed"
                    )
        finally:
            db.execute("PRAGMA foreign_keys = ON")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        if self.db.in_transaction:  # nested: part of the outer transaction
            yield self.db
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- pools -------------------------------------------------------------------

    def add_pool(
        self,
        name: str,
        backend: str,
        *,
        data_dev: str | None,
        cache_dev: str | None,
        size: int,
        cache_size: int | None,
        config: dict[str, Any],
    ) -> Pool:
        with self.tx() as db:
            if db.execute("SELECT 1 FROM pools WHERE name=?", (name,)).fetchone():
                raise Exists(f"pool {name!r} already exists")
            db.execute(
                "INSERT INTO pools (name, uuid, backend, data_dev, cache_dev, embedded, size,"
                " cache_size, config, created) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    name,
                    uuidlib.uuid4().hex,
                    backend,
                    data_dev,
                    cache_dev,
                    int(data_dev is None),
                    size,
                    cache_size,
                    json.dumps(config, sort_keys=True),
                    time.time(),
                ),
            )
            return self.pool(name)

    def pool(self, name: str) -> Pool:
        row = self.db.execute("SELECT * FROM pools WHERE name=?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no pool {name!r}")
        return _from_row(Pool, row)

    def pool_by_id(self, pool_id: int) -> Pool:
        row = self.db.execute("SELECT * FROM pools WHERE id=?", (pool_id,)).fetchone()
        if row is None:
            raise NotFound(f"no pool with id {pool_id}")
        return _from_row(Pool, row)

    def pools(self) -> list[Pool]:
        return [_from_row(Pool, r) for r in self.db.execute("SELECT * FROM pools ORDER BY name")]

    def update_pool(self, pool_id: int, **fields: Any) -> None:
        allowed = {"transaction_id", "next_dev_id", "config", "data_dev", "cache_dev"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"cannot update pool fields {sorted(set(fields) - allowed)}")
        if "config" in fields:
            fields["config"] = json.dumps(fields["config"], sort_keys=True)
        cols = ", ".join(f"{k}=?" for k in fields)
        with self.tx() as db:
            db.execute(f"UPDATE pools SET {cols} WHERE id=?", (*fields.values(), pool_id))

    def remove_pool(self, pool_id: int) -> None:
        with self.tx() as db:
            db.execute(
                "DELETE FROM snapshots WHERE volume_id IN (SELECT id FROM volumes WHERE pool_id=?)",
                (pool_id,),
            )
            db.execute("DELETE FROM snap_groups WHERE pool_id=?", (pool_id,))
            db.execute("DELETE FROM volumes WHERE pool_id=?", (pool_id,))
            db.execute("DELETE FROM pending WHERE pool_id=?", (pool_id,))
            db.execute("DELETE FROM markers WHERE pool_id=?", (pool_id,))
            db.execute("DELETE FROM exports WHERE pool_id=?", (pool_id,))
            db.execute("DELETE FROM pools WHERE id=?", (pool_id,))

    # -- volumes -----------------------------------------------------------------

    def add_volume(
        self,
        pool: Pool,
        name: str,
        size: int,
        *,
        dev_id: int | None = None,
        extent_start: int | None = None,
    ) -> Volume:
        with self.tx() as db:
            if db.execute(
                "SELECT 1 FROM volumes WHERE pool_id=? AND name=?", (pool.id, name)
            ).fetchone():
                raise Exists(f"volume {pool.name}/{name} already exists")
            db.execute(
                "INSERT INTO volumes (pool_id, name, size, dev_id, extent_start, created)"
                " VALUES (?,?,?,?,?,?)",
                (pool.id, name, size, dev_id, extent_start, time.time()),
            )
            return self.volume(pool.name, name)

    def volume(self, pool: str, name: str) -> Volume:
        row = self.db.execute(
            "SELECT v.*, p.name AS pool FROM volumes v JOIN pools p ON p.id = v.pool_id"
            " WHERE p.name=? AND v.name=?",
            (pool, name),
        ).fetchone()
        if row is None:
            self.pool(pool)  # a missing pool is the clearer error
            raise NotFound(f"no volume {pool}/{name}")
        return _from_row(Volume, row)

    def volumes(self, pool: str | None = None) -> list[Volume]:
        q = "SELECT v.*, p.name AS pool FROM volumes v JOIN pools p ON p.id = v.pool_id"
        args: tuple[Any, ...] = ()
        if pool is not None:
            self.pool(pool)
            q += " WHERE p.name=?"
            args = (pool,)
        return [_from_row(Volume, r) for r in self.db.execute(q + " ORDER BY p.name, v.name", args)]

    def set_volume_dev(self, volume_id: int, dev_id: int) -> None:
        with self.tx() as db:
            db.execute("UPDATE volumes SET dev_id=? WHERE id=?", (dev_id, volume_id))

    def remove_volume(self, volume_id: int) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM snapshots WHERE volume_id=?", (volume_id,))
            db.execute("DELETE FROM volumes WHERE id=?", (volume_id,))
            db.execute("DELETE FROM snap_groups WHERE id NOT IN (SELECT group_id FROM snapshots)")

    # -- snapshots -----------------------------------------------------------------

    def add_group(
        self,
        pool: Pool,
        name: str,
        members: list[tuple[Volume, dict[str, Any]]],
        *,
        token: str | None = None,
        labels: dict[str, str] | None = None,
        marker: int | None = None,
    ) -> int:
        """Record one snapshot group: one name, one cut, several volumes.
        ``members`` pairs each volume with its snapshot's backend fields."""
        with self.tx() as db:
            for vol, _ in members:
                if db.execute(
                    "SELECT 1 FROM snapshots WHERE volume_id=? AND name=?", (vol.id, name)
                ).fetchone():
                    raise Exists(f"snapshot {vol.pool}/{vol.name}@{name} already exists")
            cur = db.execute(
                "INSERT INTO snap_groups (pool_id, name, token, labels, marker, created)"
                " VALUES (?,?,?,?,?,?)",
                (pool.id, name, token, json.dumps(labels or {}), marker, time.time()),
            )
            gid = int(cur.lastrowid or 0)
            for vol, fields in members:
                db.execute(
                    "INSERT INTO snapshots (volume_id, group_id, name, dev_id, cow_start,"
                    " cow_size, created) VALUES (?,?,?,?,?,?,?)",
                    (
                        vol.id,
                        gid,
                        name,
                        fields.get("dev_id"),
                        fields.get("cow_start"),
                        fields.get("cow_size"),
                        time.time(),
                    ),
                )
            return gid

    _SNAP_Q = (
        "SELECT s.*, v.name AS volume, p.name AS pool, g.labels AS labels FROM snapshots s"
        " JOIN volumes v ON v.id = s.volume_id JOIN pools p ON p.id = v.pool_id"
        " JOIN snap_groups g ON g.id = s.group_id"
    )

    def snapshot(self, pool: str, vol: str, name: str) -> Snapshot:
        row = self.db.execute(
            self._SNAP_Q + " WHERE p.name=? AND v.name=? AND s.name=?", (pool, vol, name)
        ).fetchone()
        if row is None:
            self.volume(pool, vol)
            raise NotFound(f"no snapshot {pool}/{vol}@{name}")
        return _from_row(Snapshot, row)

    def snapshots(self, pool: str | None = None, vol: str | None = None) -> list[Snapshot]:
        q, args = self._SNAP_Q, []
        conds = []
        if pool is not None:
            self.pool(pool)
            conds.append("p.name=?")
            args.append(pool)
        if vol is not None:
            assert pool is not None
            self.volume(pool, vol)
            conds.append("v.name=?")
            args.append(vol)
        if conds:
            q += " WHERE " + " AND ".join(conds)
        q += " ORDER BY p.name, v.name, s.created, s.id"
        return [_from_row(Snapshot, r) for r in self.db.execute(q, args)]

    def set_snapshot_active(self, snap_id: int, active: bool) -> None:
        with self.tx() as db:
            db.execute("UPDATE snapshots SET active=? WHERE id=?", (int(active), snap_id))

    def remove_snapshot(self, snap_id: int) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM snapshots WHERE id=?", (snap_id,))
            db.execute("DELETE FROM snap_groups WHERE id NOT IN (SELECT group_id FROM snapshots)")

    def cow_extents(self, pool: str) -> dict[int, list[tuple[int, int]]]:
        """Classic: every snapshot's added COW extents (start, sectors), in order."""
        out: dict[int, list[tuple[int, int]]] = {}
        rows = self.db.execute(
            "SELECT c.snapshot_id, c.start, c.sectors FROM cow_extents c"
            " JOIN snapshots s ON s.id = c.snapshot_id JOIN volumes v ON v.id = s.volume_id"
            " JOIN pools p ON p.id = v.pool_id WHERE p.name=? ORDER BY c.rowid",
            (pool,),
        )
        for sid, start, sectors in rows:
            out.setdefault(sid, []).append((start, sectors))
        return out

    def add_cow_extent(self, snap_id: int, start: int, sectors: int) -> None:
        """Grow a classic snapshot's COW area by one extent (one transaction)."""
        with self.tx() as db:
            db.execute(
                "INSERT INTO cow_extents (snapshot_id, start, sectors) VALUES (?, ?, ?)",
                (snap_id, start, sectors),
            )
            db.execute(
                "UPDATE snapshots SET cow_size = cow_size + ? WHERE id=?",
                (Bytes.of(sectors), snap_id),
            )

    def group_by_token(self, pool_id: int, token: str) -> int | None:
        row = self.db.execute(
            "SELECT id FROM snap_groups WHERE pool_id=? AND token=?", (pool_id, token)
        ).fetchone()
        return None if row is None else int(row[0])

    # -- journal markers -------------------------------------------------------------

    def add_marker(
        self, pool_id: int, name: str, token: str | None, request: dict[str, Any]
    ) -> int:
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO markers (pool_id, name, token, request, created) VALUES (?,?,?,?,?)",
                (pool_id, name, token, json.dumps(request, sort_keys=True), time.time()),
            )
            return int(cur.lastrowid or 0)

    def marker(self, marker_id: int) -> Marker | None:
        row = self.db.execute("SELECT * FROM markers WHERE id=?", (marker_id,)).fetchone()
        return None if row is None else _from_row(Marker, row)

    def markers(self, pool_id: int, state: MarkerState | None = None) -> list[Marker]:
        q, args = "SELECT * FROM markers WHERE pool_id=?", [pool_id]
        if state is not None:
            q += " AND state=?"
            args.append(state)
        return [_from_row(Marker, r) for r in self.db.execute(q + " ORDER BY id", args)]

    def marker_by_token(self, pool_id: int, token: str) -> Marker | None:
        row = self.db.execute(
            "SELECT * FROM markers WHERE pool_id=? AND token=? ORDER BY id DESC LIMIT 1",
            (pool_id, token),
        ).fetchone()
        return None if row is None else _from_row(Marker, row)

    def finish_marker(
        self, marker_id: int, *, group_id: int | None = None, error: str | None = None
    ) -> None:
        state = MarkerState.FAILED if error is not None else MarkerState.DONE
        with self.tx() as db:
            db.execute(
                "UPDATE markers SET state=?, group_id=?, error=?, finished=? WHERE id=?",
                (state, group_id, error, time.time(), marker_id),
            )

    # -- exports ----------------------------------------------------------------------

    _EXPORT_Q = (
        "SELECT e.*, p.name AS pool, v.name AS volume, s.name AS snapshot FROM exports e"
        " JOIN pools p ON p.id = e.pool_id JOIN volumes v ON v.id = e.volume_id"
        " LEFT JOIN snapshots s ON s.id = e.snapshot_id"
    )

    def add_export(
        self,
        pool_id: int,
        volume_id: int,
        snapshot_id: int | None,
        kind: str,
        serial: str,
        config: dict[str, Any],
        snapshot_allow: list[str] | tuple[str, ...] | None = None,
    ) -> Export:
        allow = None if snapshot_allow is None else json.dumps(list(snapshot_allow))
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO exports (pool_id, volume_id, snapshot_id, kind, serial, config,"
                " created, snapshot_allow) VALUES (?,?,?,?,?,?,?,?)",
                (
                    pool_id,
                    volume_id,
                    snapshot_id,
                    kind,
                    serial,
                    json.dumps(config, sort_keys=True),
                    time.time(),
                    allow,
                ),
            )
            eid = int(cur.lastrowid or 0)
        return next(e for e in self.exports() if e.id == eid)

    def exports(self, pool: str | None = None) -> list[Export]:
        q, args = self._EXPORT_Q, []
        if pool is not None:
            q += " WHERE p.name=?"
            args.append(pool)
        return [_from_row(Export, r) for r in self.db.execute(q + " ORDER BY e.id", args)]

    def update_export(
        self,
        export_id: int,
        config: dict[str, Any],
        snapshot_allow: list[str] | tuple[str, ...] | None,
    ) -> Export:
        allow = None if snapshot_allow is None else json.dumps(list(snapshot_allow))
        with self.tx() as db:
            db.execute(
                "UPDATE exports SET config=?, snapshot_allow=? WHERE id=?",
                (json.dumps(config, sort_keys=True), allow, export_id),
            )
        return next(e for e in self.exports() if e.id == export_id)

    def remove_export(self, export_id: int) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM exports WHERE id=?", (export_id,))

    # -- pending operations ----------------------------------------------------------

    def begin_pending(self, pool_id: int | None, kind: str, payload: dict[str, Any]) -> int:
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO pending (pool_id, kind, payload, created) VALUES (?,?,?,?)",
                (pool_id, kind, json.dumps(payload, sort_keys=True), time.time()),
            )
            return int(cur.lastrowid or 0)

    def end_pending(self, pending_id: int) -> None:
        """Drop a pending record; call inside the transaction that commits its effect."""
        with self.tx() as db:
            db.execute("DELETE FROM pending WHERE id=?", (pending_id,))

    def pending(self) -> list[Pending]:
        return [_from_row(Pending, r) for r in self.db.execute("SELECT * FROM pending ORDER BY id")]

    def counts(self) -> dict[str, int]:
        return {
            t: int(self.db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])
            for t in (
                "pools",
                "volumes",
                "snap_groups",
                "snapshots",
                "markers",
                "exports",
                "pending",
            )
        }


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in db.execute(f"PRAGMA table_info({table})")}


def _json_tuple(a: str | None) -> tuple[str, ...] | None:
    return None if a is None else tuple(json.loads(a))


# How a column is stored when it is not the Python value itself; the same
# column name means the same encoding in every table.
_DECODE: dict[str, Callable[[Any], Any]] = {
    "config": json.loads,
    "request": json.loads,
    "payload": json.loads,
    "labels": lambda s: json.loads(s or "{}"),
    "embedded": bool,
    "active": bool,
    "snapshot_allow": _json_tuple,
    "state": MarkerState,
}

_Row = TypeVar("_Row")


def _from_row(cls: type[_Row], r: sqlite3.Row) -> _Row:
    """A catalog row as its dataclass: every field from the column of its name."""
    values = {}
    for f in fields(cls):  # type: ignore[arg-type]
        decode = _DECODE.get(f.name)
        values[f.name] = decode(r[f.name]) if decode else r[f.name]
    return cls(**values)
