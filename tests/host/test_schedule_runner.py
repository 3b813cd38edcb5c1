"""The schedule runner's own logic on the host: what it asks the storage
core for, and what it records in the catalog (dmsnap.schedule.runner).

The storage core here is a small model of the Manager's public snapshot
operations (one group per request, a retried token returns the group it
made, a held snapshot refuses deletion), so that crashes and clocks can be
simulated; tests/kernel/test_schedule.py runs the same runner against the
real Manager and real snapshots."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from dmsnap import errors as E
from dmsnap.daemon import protocol as proto
from dmsnap.schedule.runner import LABEL, Scheduler, snapshot_name
from dmsnap.storage.catalog import SCHEMA_VERSION, Catalog

T0 = dt.datetime(2026, 12, 7, 10, 0, 1, tzinfo=dt.UTC).timestamp()


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Storage:
    """The Manager's snapshot operations, as the runner uses them."""

    def __init__(self, clock: Clock, pool: str = "p", vols: tuple[str, ...] = ("a", "b")) -> None:
        self.clock = clock
        self.pool = pool
        self.vols = set(vols)
        self.snaps: list[dict[str, Any]] = []
        self.tokens: dict[str, int] = {}
        self.next_group = 1
        self.creates: list[str] = []
        self.fail_next: E.UserError | None = None
        self.lose_answer = False  # the snapshot is made, the answer lost (a crash)
        self.used = 0.5

    def snapshot_create(self, refs, name, *, labels=None, token=None, wait=False, timeout=60.0):
        assert wait, "a run waits for its snapshot"
        if token in self.tokens:
            return {**self._group(self.tokens[token]), "retried": True}
        if self.fail_next is not None:
            e, self.fail_next = self.fail_next, None
            raise e
        pools = {p for p, _ in refs}
        assert pools == {self.pool} and len(refs) == len({v for _, v in refs})
        for _, v in refs:
            if v not in self.vols:
                raise E.NotFound(f"no volume {self.pool}/{v}")
            if any(s["volume"] == v and s["name"] == name for s in self.snaps):
                raise E.AlreadyExists(f"snapshot {self.pool}/{v}@{name} already exists")
        gid = self.next_group
        self.next_group += 1
        for _, v in refs:
            self.snaps.append(
                {
                    "pool": self.pool,
                    "volume": v,
                    "name": name,
                    "group": gid,
                    "created": self.clock(),
                    "active": False,
                    "labels": dict(labels or {}),
                }
            )
        self.creates.append(name)
        if token:
            self.tokens[token] = gid
        if self.lose_answer:
            self.lose_answer = False
            raise E.Unavailable("dmsnapd is stopping: snapshot requested but not made yet")
        return self._group(gid)

    def _group(self, gid: int) -> dict[str, Any]:
        members = [s for s in self.snaps if s["group"] == gid]
        return {
            "group": gid,
            "name": members[0]["name"] if members else None,
            "state": "done",
            "snapshots": members,
        }

    def snapshot_request(self, pool, *, marker=None, token=None):
        if token in self.tokens:
            return {**self._group(self.tokens[token]), "token": token}
        raise E.NotFound(f"no snapshot request {token!r} in pool {pool}")

    def snapshot_list(self, pool=None, vol=None):
        return [dict(s) for s in self.snaps]

    def snapshot_delete(self, pool, vol, name):
        for s in self.snaps:
            if s["volume"] == vol and s["name"] == name:
                if s["active"]:
                    raise E.Busy(f"snapshot {pool}/{vol}@{name} is in use")
                self.snaps.remove(s)
                return
        raise E.NotFound(f"no snapshot {pool}/{vol}@{name}")

    def pool_show(self, name):
        return {"name": name, "data_used_fraction": self.used, "metadata_used_fraction": 0.1}

    def volume_show(self, pool, vol):
        if pool != self.pool or vol not in self.vols:
            raise E.NotFound(f"no volume {pool}/{vol}")
        return {"pool": pool, "name": vol}

    # helpers
    def groups(self, schedule: str | None = None) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for s in self.snaps:
            if schedule is None or s["labels"].get(LABEL) == schedule:
                out.setdefault(s["group"], []).append(s["volume"])
        return out

    def hand(self, name: str) -> None:
        gid = self.next_group
        self.next_group += 1
        for v in sorted(self.vols):
            self.snaps.append(
                {
                    "pool": self.pool,
                    "volume": v,
                    "name": name,
                    "group": gid,
                    "created": self.clock(),
                    "active": False,
                    "labels": {},
                }
            )


@pytest.fixture
def env(tmp_path: Path):
    path = str(tmp_path / "catalog.db")
    cat = Catalog(path)
    cat.add_pool(
        "p", "thin", data_dev=None, cache_dev=None, size=1 << 30, cache_size=None, config={}
    )
    clock = Clock(T0)
    storage = Storage(clock)
    sched = Scheduler(storage, path, clock=clock)
    yield sched, storage, clock, cat
    sched.stop()
    cat.close()


def test_a_run_is_one_group_of_every_volume_labelled_and_recorded(env) -> None:
    sched, storage, clock, _ = env
    s = sched.create("hourly-ab", [["p", "a"], ["p", "b"]], every="1h", keep=3)
    assert s["next_run_utc"] == "2026-12-07T11:00:00+00:00" and s["volumes"] == ["p/a", "p/b"]
    assert sched.tick() == [{"schedule": "hourly-ab", "pruned": []}]  # nothing due yet
    clock.t += 3600
    (did,) = sched.tick()
    assert did["run"]["name"] == snapshot_name("hourly-ab", T0 - 1 + 3600)
    assert storage.snaps[0]["labels"] == {LABEL: "hourly-ab"}
    assert did["run"]["name"] == "hourly-ab-20261207T110000Z"
    assert storage.groups("hourly-ab") == {1: ["a", "b"]}  # one cut of both volumes
    shown = sched.show("hourly-ab")
    assert shown["runs"] == 1 and [x["group"] for x in shown["snapshots"]] == [1]


def test_keep_prunes_only_what_the_schedule_made(env) -> None:
    sched, storage, clock, _ = env
    sched.create("s", [["p", "a"], ["p", "b"]], every=60, keep=2)
    storage.hand("by-hand")  # a snapshot made by hand, before and among the schedule's
    for i in range(6):
        clock.t += 60
        sched.tick()
        if i == 2:
            storage.snaps.append({**storage.snaps[0], "name": "in-band", "group": 99})
    made = storage.groups("s")
    assert len(made) == 2 and sorted(made) == [6, 7]  # group 1 is by hand
    names = {s["name"] for s in storage.snaps}
    assert {"by-hand", "in-band"} <= names
    assert len(storage.creates) == 6


def test_a_held_snapshot_is_not_pruned_and_goes_when_released(env) -> None:
    sched, storage, clock, _ = env
    sched.create("s", [["p", "a"]], every=60, keep=1)
    clock.t += 60
    sched.tick()
    storage.snaps[0]["active"] = True  # activated: in use
    for _ in range(3):
        clock.t += 60
        sched.tick()
    assert sorted(storage.groups("s")) == [1, 4]
    storage.snaps[0]["active"] = False
    clock.t += 60
    sched.tick()
    assert sorted(storage.groups("s")) == [5]


def test_catch_up_after_downtime_is_one_snapshot(env) -> None:
    sched, storage, clock, _ = env
    sched.create("s", [["p", "a"]], every="10m")
    clock.t += 600
    sched.tick()
    clock.t += 5 * 3600 + 17  # down for five hours
    (did,) = sched.tick()
    assert did["run"]["missed"] == 29 and len(storage.creates) == 2
    (did,) = sched.tick()
    assert "run" not in did and len(storage.creates) == 2
    assert sched.show("s")["last_slot"] == "2026-12-07T15:10:00+00:00"


def test_a_clock_stepped_back_does_not_run_a_slot_again(env) -> None:
    sched, storage, clock, _ = env
    sched.create("s", [["p", "a"]], calendar="hourly", tz="Europe/Berlin")
    clock.t = T0 + 3600
    sched.tick()
    assert len(storage.creates) == 1
    clock.t -= 1800  # NTP steps the clock back half an hour
    sched.tick()
    clock.t += 1800
    sched.tick()
    assert len(storage.creates) == 1
    clock.t += 3600
    sched.tick()
    assert len(storage.creates) == 2


def test_a_run_whose_answer_was_lost_is_recorded_not_repeated(env) -> None:
    """dmsnapd stopped while a run waited: the snapshot was made; the next
    start finds it by its token, records it as the schedule's, and does not
    make a second one for the same slot."""
    sched, storage, clock, _ = env
    sched.create("s", [["p", "a"]], every=60, keep=1)
    clock.t += 60
    storage.lose_answer = True
    (did,) = sched.tick()
    assert "error" in did["run"] and len(storage.creates) == 1
    clock.t += 1  # the next tick (a restart) within the same slot
    sched.tick()
    assert len(storage.creates) == 1
    shown = sched.show("s")
    assert shown["runs"] == 1 and [x["group"] for x in shown["snapshots"]] == [1]
    clock.t += 60
    sched.tick()
    assert sorted(storage.groups("s")) == [2]  # and it prunes it like its own


def test_a_failed_run_is_retried_later_and_shown(env) -> None:
    sched, storage, clock, _ = env
    sched.create("s", [["p", "a"]], every=3600)
    storage.fail_next = E.NoSpace("thin pool p is 96% full: no new snapshots")
    clock.t += 3600
    sched.tick()
    shown = sched.show("s")
    assert shown["failures"] == 1 and "96% full" in shown["last_error"]
    clock.t += 5
    sched.tick()
    assert storage.creates == []  # not before RETRY_S
    clock.t += 30
    sched.tick()
    assert len(storage.creates) == 1 and sched.show("s")["last_error"] is None


def test_min_free_deletes_the_oldest_first_never_the_newest(env) -> None:
    sched, storage, clock, _ = env
    sched.create("s", [["p", "a"]], every=60, min_free=20)
    storage.hand("mine")
    for _ in range(5):
        clock.t += 60
        sched.tick()
    assert sorted(storage.groups("s")) == [2, 3, 4, 5, 6]
    storage.used = 0.9
    deleted = []
    real_delete = storage.snapshot_delete

    def delete(pool, vol, name):
        deleted.append(name)
        real_delete(pool, vol, name)
        if len(deleted) == 2:
            storage.used = 0.75  # two deletions free enough

    storage.snapshot_delete = delete
    clock.t += 1
    sched.tick()
    assert sorted(storage.groups("s")) == [4, 5, 6]
    assert deleted == ["s-20261207T100100Z", "s-20261207T100200Z"]
    storage.used = 0.99  # however full: never the newest, never another's
    clock.t += 1
    sched.tick()
    assert sorted(storage.groups("s")) == [6] and "mine" in {s["name"] for s in storage.snaps}
    assert "nothing more this schedule may delete" in sched.show("s")["last_error"]


def test_pause_resume_delete(env) -> None:
    sched, storage, clock, _ = env
    sched.create("s", [["p", "a"]], every=60, keep=1)
    sched.pause("s")
    clock.t += 600
    sched.tick()
    assert storage.creates == []
    sched.resume("s")  # from now: the paused slots are not caught up
    sched.tick()
    assert storage.creates == []
    clock.t += 60
    sched.tick()
    assert len(storage.creates) == 1
    out = sched.delete("s")
    assert out == {"name": "s", "deleted": True, "snapshots_kept": 1}
    clock.t += 600
    sched.tick()
    assert len(storage.creates) == 1 and len(storage.snaps) == 1
    with pytest.raises(E.NotFound):
        sched.show("s")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": "0s"}, "1s to 366d"),
        ({"calendar": "Feb..Mon"}, "weekday"),
        ({"calendar": "daily", "tz": "Nowhere/City"}, "unknown time zone"),
        ({"every": "1h", "calendar": "daily"}, "exactly one"),
        ({"every": "1h", "keep": 0}, "--keep 0"),
        ({"every": "1h", "min_free": 100}, "--min-free"),
        ({"calendar": "2020-01-01"}, "never fires"),
    ],
)
def test_bad_schedules_are_refused_and_nothing_is_stored(env, kwargs, message) -> None:
    sched, *_ = env
    with pytest.raises(E.InvalidArgument, match=message):
        sched.create("s", [["p", "a"]], **kwargs)
    assert sched.list() == []


def test_bad_targets_are_refused(env) -> None:
    sched, *_ = env
    with pytest.raises(E.NotFound, match="no volume p/zz"):
        sched.create("s", [["p", "zz"]], every="1h")
    with pytest.raises(E.InvalidArgument, match="one pool"):
        sched.create("s", [["p", "a"], ["q", "b"]], every="1h")
    with pytest.raises(E.InvalidArgument, match="longer than 31"):
        sched.create("s" * 32, [["p", "a"]], every="1h")
    sched.create("s", [["p", "a"]], every="1h")
    with pytest.raises(E.AlreadyExists):
        sched.create("s", [["p", "b"]], every="1h")
    assert [s["volumes"] for s in sched.list()] == [["p/a"]]


def test_protocol_ops_reach_the_scheduler() -> None:
    req = proto.parse_request(
        proto.request(1, "schedule.create", {"name": "n", "refs": [["p", "a"]], "every": 60})
    )
    assert req.args == {"name": "n", "refs": [["p", "a"]], "every": 60}
    assert proto.OPS["schedule.create"].service == "schedules"
    with pytest.raises(proto.ProtocolError, match="schedule name"):
        proto.parse_request(proto.request(1, "schedule.show", {"name": "-x"}))
    with pytest.raises(proto.ProtocolError, match="count"):
        proto.parse_request(
            proto.request(1, "schedule.create", {"name": "n", "refs": [["p", "a"]], "keep": 0})
        )


def test_a_schema_5_catalog_gains_the_schedule_tables(tmp_path: Path) -> None:
    path = str(tmp_path / "catalog.db")
    Catalog(path).close()
    db = sqlite3.connect(path)
    db.executescript(
        "DROP TABLE schedule_snapshots; DROP TABLE schedules;"
        " UPDATE meta SET value='5' WHERE key='schema';"
    )
    db.close()
    cat = Catalog(path)
    assert cat.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == str(
        SCHEMA_VERSION
    )
    tables = {r[0] for r in cat.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"schedules", "schedule_snapshots"} <= tables
    cat.close()


def test_the_thread_sleeps_until_the_next_slot_and_looks_up_a_pending_run_slowly(env) -> None:
    sched, _, clock, _ = env
    sched.create("s", [["p", "a"]], every="1h")
    assert sched._sleep_for() == 30.0  # the next slot is an hour away: wake to notice clock steps
    clock.t = T0 - 1 + 3600 - 7
    assert sched._sleep_for() == pytest.approx(7.0)
    row = sched.store.get("s")
    sched.store.begin_run(row.id, "dmsnap-schedule-1-0", T0)  # a run whose wait gave up
    clock.t += 100  # overdue, but its snapshot is being made: no busy loop
    assert sched._sleep_for() == 2.0
    sched.pause("s")
    assert sched._sleep_for() == 30.0


def test_a_snapshot_a_replication_target_holds_is_not_pruned(env) -> None:
    """The last snapshot a target received is the base of its next
    incremental: retention keeps it (docs/replication.md, "Holds")."""
    sched, storage, clock, _ = env
    sched.create("s", [["p", "a"]], every=60, keep=1)
    clock.t += 60
    sched.tick()
    storage.snaps[0]["holds"] = ["backup"]
    for _ in range(3):
        clock.t += 60
        sched.tick()
    assert sorted(storage.groups("s")) == [1, 4]
    storage.snaps[0]["holds"] = []
    clock.t += 60
    sched.tick()
    assert sorted(storage.groups("s")) == [5]
