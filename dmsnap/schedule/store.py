"""Where schedules are kept: the catalog's ``schedules`` and
``schedule_snapshots`` tables (schema 6, :mod:`dmsnap.storage.catalog`).

The store opens its own connection to the catalog database through
:class:`~dmsnap.storage.catalog.Catalog` (so the schema and its upgrade
path are the catalog's), and uses it only for these two tables and to read
pool names. SQLite serialises the writers of the two connections
(``BEGIN IMMEDIATE``); a lock here serialises this store's own threads.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from dmsnap.storage.catalog import Catalog


@dataclass(frozen=True)
class Row:
    id: int
    name: str
    pool: str
    volumes: tuple[str, ...]
    every: int | None
    calendar: str | None
    tz: str
    retention: dict[str, Any]
    paused: bool
    last_slot: float
    last_run: float | None
    last_error: str | None
    runs: int
    failures: int
    pending_token: str | None
    pending_slot: float | None
    created: float


class Exists(Exception):
    pass


class Missing(Exception):
    pass


_Q = "SELECT s.*, p.name AS pool FROM schedules s JOIN pools p ON p.id = s.pool_id"


def _row(r: Any) -> Row:
    return Row(
        id=r["id"],
        name=r["name"],
        pool=r["pool"],
        volumes=tuple(json.loads(r["volumes"])),
        every=r["every"],
        calendar=r["calendar"],
        tz=r["tz"],
        retention=json.loads(r["retention"]),
        paused=bool(r["paused"]),
        last_slot=r["last_slot"],
        last_run=r["last_run"],
        last_error=r["last_error"],
        runs=r["runs"],
        failures=r["failures"],
        pending_token=r["pending_token"],
        pending_slot=r["pending_slot"],
        created=r["created"],
    )


class Store:
    def __init__(self, catalog_path: str) -> None:
        self._cat = Catalog(catalog_path)
        self._cat.db.execute("PRAGMA busy_timeout = 30000")
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._cat.close()

    def add(
        self,
        name: str,
        pool: str,
        volumes: list[str],
        *,
        every: int | None,
        calendar: str | None,
        tz: str,
        retention: dict[str, Any],
        now: float,
    ) -> Row:
        with self._lock, self._cat.tx() as db:
            if db.execute("SELECT 1 FROM schedules WHERE name=?", (name,)).fetchone():
                raise Exists(f"schedule {name!r} already exists")
            p = db.execute("SELECT id FROM pools WHERE name=?", (pool,)).fetchone()
            if p is None:
                raise Missing(f"no pool {pool!r}")
            db.execute(
                "INSERT INTO schedules (name, pool_id, volumes, every, calendar, tz, retention,"
                " last_slot, created) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    name,
                    p[0],
                    json.dumps(volumes),
                    every,
                    calendar,
                    tz,
                    json.dumps(retention, sort_keys=True),
                    now,
                    now,
                ),
            )
        return self.get(name)

    def get(self, name: str) -> Row:
        with self._lock:
            r = self._cat.db.execute(_Q + " WHERE s.name=?", (name,)).fetchone()
        if r is None:
            raise Missing(f"no schedule {name!r}")
        return _row(r)

    def all(self) -> list[Row]:
        with self._lock:
            return [_row(r) for r in self._cat.db.execute(_Q + " ORDER BY s.name")]

    def remove(self, name: str) -> None:
        with self._lock, self._cat.tx() as db:
            if db.execute("DELETE FROM schedules WHERE name=?", (name,)).rowcount == 0:
                raise Missing(f"no schedule {name!r}")

    def set_paused(self, name: str, paused: bool, now: float) -> Row:
        with self._lock, self._cat.tx() as db:
            if paused:
                n = db.execute("UPDATE schedules SET paused=1 WHERE name=?", (name,)).rowcount
            else:
                # Resuming starts from now: slots missed while paused are not
                # caught up (a pause is the administrator's choice).
                n = db.execute(
                    "UPDATE schedules SET paused=0, last_slot=? WHERE name=? AND paused=1",
                    (now, name),
                ).rowcount
                n = n or db.execute("SELECT 1 FROM schedules WHERE name=?", (name,)).fetchone()
            if not n:
                raise Missing(f"no schedule {name!r}")
        return self.get(name)

    def begin_run(self, sid: int, token: str, slot: float) -> None:
        """Before the snapshot is asked for: which token stands for which slot."""
        with self._lock, self._cat.tx() as db:
            db.execute(
                "UPDATE schedules SET pending_token=?, pending_slot=? WHERE id=?",
                (token, slot, sid),
            )

    def finish_run(self, sid: int, group: int, slot: float, created: float) -> None:
        """The run's snapshot exists: record it as this schedule's, and the
        slot as run (one transaction)."""
        with self._lock, self._cat.tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO schedule_snapshots (schedule_id, group_id, created)"
                " VALUES (?,?,?)",
                (sid, group, created),
            )
            db.execute(
                "UPDATE schedules SET last_slot=MAX(last_slot, ?), last_run=?, last_error=NULL,"
                " runs=runs+1, pending_token=NULL, pending_slot=NULL WHERE id=?",
                (slot, time.time(), sid),
            )

    def clear_pending(self, sid: int) -> None:
        with self._lock, self._cat.tx() as db:
            db.execute(
                "UPDATE schedules SET pending_token=NULL, pending_slot=NULL WHERE id=?", (sid,)
            )

    def fail(self, sid: int, error: str) -> None:
        with self._lock, self._cat.tx() as db:
            db.execute(
                "UPDATE schedules SET last_error=?, failures=failures+1 WHERE id=?", (error, sid)
            )

    def note(self, sid: int, error: str | None) -> None:
        """A problem that is not a failed run (a prune refused), or None."""
        with self._lock, self._cat.tx() as db:
            db.execute("UPDATE schedules SET last_error=? WHERE id=?", (error, sid))

    def owned(self, sid: int) -> set[int]:
        with self._lock:
            return {
                int(r[0])
                for r in self._cat.db.execute(
                    "SELECT group_id FROM schedule_snapshots WHERE schedule_id=?", (sid,)
                )
            }

    def forget(self, sid: int, groups: set[int]) -> None:
        """Groups that no longer exist (deleted by hand or pruned)."""
        if not groups:
            return
        with self._lock, self._cat.tx() as db:
            db.executemany(
                "DELETE FROM schedule_snapshots WHERE schedule_id=? AND group_id=?",
                [(sid, g) for g in groups],
            )
