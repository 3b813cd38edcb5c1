"""The schedules at work in dmsnapd: a timer thread, and the control
operations ``schedule.*`` of the protocol.

The runner talks to the storage core only through :class:`Storage`, a
subset of the Manager's public operations; each takes the one control lock
itself and the runner never holds it (docs/journal.md, the lock
discipline): a run is ``snapshot_create(..., wait=True)``, which waits for
a journaled snapshot without the lock, like any client's ``--wait``.

A run (docs/schedules.md):

1. the due slot (:func:`dmsnap.schedule.spec.due`), its snapshot name
   ``SCHEDULE-YYYYmmddTHHMMSSZ`` (the slot, UTC) and its request token
   ``dmsnap-schedule-ID-SLOT`` are fixed; the token is stored first
   (``pending_token``);
2. one ``snapshot_create`` of all the schedule's volumes: one group, one
   marker, one cut; a retried token returns the snapshot already made,
   so a crash between the snapshot and step 3 never makes a second one;
3. in one catalog transaction: the group is recorded as the schedule's,
   the slot as run;
4. retention: what the schedule made and no rule keeps is deleted
   (:mod:`dmsnap.schedule.retention`), then the pool's free space is
   checked against ``min_free``.

A failed run records its error and is tried again RETRY_S later (the same
token while the slot stands, so never twice); the slot advances only when
a snapshot exists.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Protocol

from dmsnap import errors as E
from dmsnap.schedule import retention, spec
from dmsnap.schedule.store import Exists, Missing, Row, Store
from dmsnap.storage import names

log = logging.getLogger("dmsnap.schedule")

Json = dict[str, Any]

LABEL = (
    "dmsnap.target-schedule"  # value: the schedule's name (for people; ownership is the catalog's)
)
MAX_NAME = 31  # + "-YYYYmmddTHHMMSSZ" (17) = a snapshot name of at most 48
RETRY_S = 30.0  # a failed run is tried again after this long
MAX_SLEEP_S = 30.0  # a clock step is noticed within this long
RUN_TIMEOUT_S = 120.0  # how long a run waits for its journaled snapshot
PENDING_POLL_S = 2.0  # how often a run whose wait gave up is looked up


class Storage(Protocol):
    """What the runner needs of the storage core (Manager's public API)."""

    def snapshot_create(
        self,
        refs: list[list[str]],
        name: str,
        *,
        labels: dict[str, str] | None = ...,
        token: str | None = ...,
        wait: bool = ...,
        timeout: float = ...,
    ) -> Json: ...

    def snapshot_request(
        self, pool: str, *, marker: int | None = ..., token: str | None = ...
    ) -> Json: ...

    def snapshot_list(self, pool: str | None = ..., vol: str | None = ...) -> list[Json]: ...

    def snapshot_delete(self, pool: str, vol: str, name: str) -> None: ...

    def pool_show(self, name: str) -> Json: ...

    def volume_show(self, pool: str, vol: str) -> Json: ...


def snapshot_name(schedule: str, slot: float) -> str:
    return f"{schedule}-{dt.datetime.fromtimestamp(slot, dt.UTC):%Y%m%dT%H%M%SZ}"


def token_for(sid: int, slot: float) -> str:
    return f"dmsnap-schedule-{sid}-{int(slot)}"


def _when(row: Row) -> spec.Schedule:
    # --every slots are whole multiples of the interval since the epoch (UTC):
    # every 1h runs on the hour, every 1d at 00:00 UTC, whenever it was made
    return spec.Schedule.make(every=row.every, calendar=row.calendar, tz=row.tz)


def _iso(t: float | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t, dt.UTC).isoformat()


def cuts(snaps: list[Json], owned: set[int]) -> dict[int, tuple[retention.Cut, list[Json]]]:
    """The pool's snapshot groups as retention sees them, with their members.
    A group is held while any member is activated (in use) or held by a
    replication target (the base of its next incremental)."""
    groups: dict[int, list[Json]] = defaultdict(list)
    for s in snaps:
        groups[int(s["group"])].append(s)
    return {
        gid: (
            retention.Cut(
                gid,
                min(float(m["created"]) for m in members),
                owned=gid in owned,
                held=any(m.get("active") or m.get("holds") for m in members),
            ),
            members,
        )
        for gid, members in groups.items()
    }


class Scheduler:
    def __init__(
        self,
        storage: Storage,
        catalog_path: str,
        *,
        clock: Callable[[], float] = time.time,
        run_timeout: float = RUN_TIMEOUT_S,
    ) -> None:
        self.storage = storage
        self.store = Store(catalog_path)
        self.clock = clock
        self.run_timeout = run_timeout
        self._retry_at: dict[int, float] = {}
        self._retained: set[int] = set()  # schedules whose retention ran since start
        self._kick = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._tick_lock = threading.Lock()  # one tick at a time (thread or a test)

    # -- the thread ------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="schedules", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._kick.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.store.close()

    def _loop(self) -> None:
        while not self._stopping:
            try:
                self.tick()
            except Exception:  # never let a schedule kill the daemon
                log.exception("schedules: tick failed")
            self._kick.wait(self._sleep_for())
            self._kick.clear()

    def _sleep_for(self) -> float:
        now = self.clock()
        wake = now + MAX_SLEEP_S
        for row in self.store.all():
            if row.paused:
                continue
            if row.pending_token is not None:  # its snapshot is being made: look again soon
                wake = min(wake, now + PENDING_POLL_S)
                continue
            nxt = _when(row).next_after(row.last_slot)
            if nxt is not None:
                wake = min(wake, max(nxt, self._retry_at.get(row.id, 0.0)))
        return min(max(wake - now, 0.05), MAX_SLEEP_S)

    # -- one tick ----------------------------------------------------------------------

    def tick(self, now: float | None = None) -> list[Json]:
        """Run what is due; prune. Returns what each schedule did (tests, logs)."""
        out = []
        with self._tick_lock:
            for row in self.store.all():
                if self._stopping:
                    break
                try:
                    out.append(self._tick_one(row, self.clock() if now is None else now))
                except Exception as e:
                    log.exception("schedule %s: tick failed", row.name)
                    out.append({"schedule": row.name, "error": str(e)})
        return out

    def _tick_one(self, row: Row, now: float) -> Json:
        did: Json = {"schedule": row.name}
        if row.pending_token is not None and not self._settle_pending(row):
            did["waiting"] = row.pending_token
            return did
        row = self.store.get(row.name)
        if row.paused:  # neither runs nor prunes
            return did
        if now >= self._retry_at.get(row.id, 0.0):
            slot = spec.due(_when(row), row.last_slot, now)
            if slot is not None:
                did["run"] = self._run(row, slot)
                row = self.store.get(row.name)
        # Retention after a run, at the first tick (dmsnapd started, the
        # policy may have changed) and, with min_free, at every tick (space
        # runs out between runs too).
        if "run" in did or row.id not in self._retained or row.retention.get("min_free"):
            self._retained.add(row.id)
            did["pruned"] = self._retain(row)
        return did

    def _settle_pending(self, row: Row) -> bool:
        """A run in flight when dmsnapd stopped or the wait gave up: if its
        snapshot exists, it is the schedule's. False: still being made."""
        assert row.pending_token is not None and row.pending_slot is not None
        try:
            r = self.storage.snapshot_request(row.pool, token=row.pending_token)
        except E.NotFound:
            self.store.clear_pending(row.id)  # never made (refused before the marker)
            return True
        except E.UserError as e:
            log.warning("schedule %s: cannot look up its last run: %s", row.name, e.message)
            return False
        if r.get("state") == "pending":
            return False
        if r.get("group") is not None and r.get("snapshots"):
            created = min(float(s["created"]) for s in r["snapshots"])
            self.store.finish_run(row.id, int(r["group"]), row.pending_slot, created)
            log.info("schedule %s: snapshot %s of its last run recorded", row.name, r.get("name"))
        else:
            self.store.clear_pending(row.id)
        return True

    def _run(self, row: Row, slot: float) -> Json:
        name = snapshot_name(row.name, slot)
        token = token_for(row.id, slot)
        n_missed = spec.missed(_when(row), row.last_slot, slot)
        if n_missed:
            log.warning(
                "schedule %s: %d slot(s) missed (dmsnapd was down or the clock stepped "
                "forward); one snapshot stands for them",
                row.name,
                n_missed,
            )
        self.store.begin_run(row.id, token, slot)
        try:
            r = self.storage.snapshot_create(
                [[row.pool, v] for v in row.volumes],
                name,
                labels={LABEL: row.name},
                token=token,
                wait=True,
                timeout=self.run_timeout,
            )
        except E.UserError as e:
            self._retry_at[row.id] = self.clock() + RETRY_S
            self.store.fail(row.id, f"{name}: {e.message}")
            log.error("schedule %s: snapshot %s failed: %s", row.name, name, e.message)
            return {"name": name, "error": e.message}
        self._retry_at.pop(row.id, None)
        snaps = r.get("snapshots") or []
        created = min((float(s["created"]) for s in snaps), default=self.clock())
        self.store.finish_run(row.id, int(r["group"]), slot, created)
        log.info(
            "schedule %s: snapshot %s of %s (group %s)",
            row.name,
            r.get("name") or name,
            ", ".join(f"{row.pool}/{v}" for v in row.volumes),
            r["group"],
        )
        return {"name": r.get("name") or name, "group": r["group"], "missed": n_missed}

    def _retain(self, row: Row) -> list[str]:
        """Prune by the policy, then by free space. Returns what was deleted."""
        policy = retention.Policy.from_json(row.retention)
        owned = self.store.owned(row.id)
        if not owned:
            return []
        try:
            groups = cuts(self.storage.snapshot_list(row.pool), owned)
        except E.UserError as e:
            log.warning("schedule %s: cannot list snapshots: %s", row.name, e.message)
            return []
        self.store.forget(row.id, owned - set(groups))
        tz = spec.zone(row.tz)
        deleted: list[str] = []
        problems: list[str] = []
        for gid in retention.prune([c for c, _ in groups.values()], policy, tz):
            if self._delete(row, groups[gid][1], deleted, problems, "retention"):
                del groups[gid]
        if policy.min_free is not None:
            low = self._low_space(row.pool, policy.min_free)
            for gid in retention.space_order([c for c, _ in groups.values()]):
                if low is None:
                    break
                if self._delete(row, groups[gid][1], deleted, problems, low):
                    del groups[gid]
                low = self._low_space(row.pool, policy.min_free)
            if low is not None:
                problems.append(f"{low}, and nothing more this schedule may delete")
        self.store.forget(row.id, {g for g in owned if g not in groups})
        if problems:
            self.store.note(row.id, "; ".join(problems))
        return deleted

    def _delete(
        self, row: Row, members: list[Json], deleted: list[str], problems: list[str], why: str
    ) -> bool:
        """Delete one cut (every member); True when none is left."""
        left = 0
        for m in members:
            ref = f"{m['pool']}/{m['volume']}@{m['name']}"
            try:
                self.storage.snapshot_delete(m["pool"], m["volume"], m["name"])
            except E.NotFound:
                continue
            except E.UserError as e:  # busy, exported: left for a later run
                left += 1
                problems.append(f"{ref} not pruned: {e.message}")
                log.warning("schedule %s: %s not pruned: %s", row.name, ref, e.message)
                continue
            deleted.append(ref)
            log.info("schedule %s: pruned %s (%s)", row.name, ref, why)
        return left == 0

    def _low_space(self, pool: str, min_free: int) -> str | None:
        """Why the pool is below ``min_free`` percent free, or None."""
        try:
            p = self.storage.pool_show(pool)
        except E.UserError:
            return None
        for what in ("data", "metadata"):
            frac = p.get(f"{what}_used_fraction")
            if isinstance(frac, (int, float)) and (1 - frac) * 100 < min_free:
                return f"pool {pool} {what} {100 - frac * 100:.1f}% free, below {min_free}%"
        return None

    # -- control operations (protocol schedule.*) ----------------------------------------

    def _json(self, row: Row, detail: bool = False) -> Json:
        when = _when(row)
        policy = retention.Policy.from_json(row.retention)
        nxt = None if row.paused else when.next_after(row.last_slot)
        owned = self.store.owned(row.id)
        out: Json = {
            "name": row.name,
            "pool": row.pool,
            "volumes": [f"{row.pool}/{v}" for v in row.volumes],
            "every": row.every,
            "calendar": row.calendar,
            "tz": row.tz,
            "when": when.describe(),
            "retention": policy.to_json(),
            "keeps": policy.describe(),
            "paused": row.paused,
            "last_run": row.last_run,
            "last_slot": _iso(row.last_slot) if row.runs else None,
            "next_run": nxt,
            "next_run_utc": _iso(nxt),
            "runs": row.runs,
            "failures": row.failures,
            "last_error": row.last_error,
            "created": row.created,
        }
        if detail:
            snaps: list[Json] = []
            try:
                groups = cuts(self.storage.snapshot_list(row.pool), owned)
            except E.UserError:
                groups = {}
            why = retention.reasons([c for c, _ in groups.values()], policy, spec.zone(row.tz))
            for gid, (c, members) in sorted(groups.items(), key=lambda kv: kv[1][0].created):
                if c.owned:
                    snaps.append(
                        {
                            "group": gid,
                            "name": members[0]["name"],
                            "created": c.created,
                            "held": c.held,
                            "kept_by": why.get(gid, []),
                        }
                    )
            out["snapshots"] = snaps
        else:
            out["snapshot_count"] = len(owned)
        return out

    def create(
        self,
        name: str,
        refs: list[list[str]],
        *,
        every: str | int | None = None,
        calendar: str | None = None,
        tz: str = "UTC",
        keep_hourly: int | None = None,
        keep_daily: int | None = None,
        keep_weekly: int | None = None,
        keep_monthly: int | None = None,
        keep_yearly: int | None = None,
        keep: int | None = None,
        min_free: int | None = None,
    ) -> Json:
        try:
            names.check_name("schedule", name)
        except ValueError as e:
            raise E.InvalidArgument(str(e)) from None
        if len(name) > MAX_NAME:
            raise E.InvalidArgument(
                f"schedule name {name!r} is longer than {MAX_NAME} characters "
                "(its snapshots are named NAME-YYYYmmddTHHMMSSZ)"
            )
        if not refs:
            raise E.InvalidArgument("name at least one POOL/VOLUME (--volumes)")
        pools = {p for p, _ in refs}
        if len(pools) != 1:
            raise E.InvalidArgument(
                "a schedule's volumes must be in one pool (one journal, one cut); got "
                + ", ".join(sorted(pools))
            )
        counts = {
            "hourly": keep_hourly,
            "daily": keep_daily,
            "weekly": keep_weekly,
            "monthly": keep_monthly,
            "yearly": keep_yearly,
            "keep": keep,
        }
        for k, v in counts.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                opt = "--keep" if k == "keep" else f"--keep-{k}"
                raise E.InvalidArgument(f"{opt} {v!r}: expected a count >= 1 (omit it for none)")
        now = self.clock()
        try:
            when = spec.Schedule.make(every=every, calendar=calendar, tz=tz)
            policy = retention.Policy(
                **{k: v for k, v in counts.items() if v is not None}, min_free=min_free
            )
        except (spec.SpecError, ValueError) as e:
            raise E.InvalidArgument(str(e)) from None
        if when.next_after(now) is None:
            raise E.InvalidArgument(f"--calendar {calendar!r} never fires after now")
        pool = pools.pop()
        sample = snapshot_name(name, now)
        for p, v in refs:
            try:
                names.check_snapshot_ref(p, v, sample)
            except ValueError as e:
                raise E.InvalidArgument(str(e)) from None
            self.storage.volume_show(p, v)  # NotFound: one clear line, nothing stored
        try:
            row = self.store.add(
                name,
                pool,
                [v for _, v in refs],
                every=when.every,
                calendar=when.calendar.text if when.calendar else None,
                tz=when.tz.key,
                retention=policy.to_json(),
                now=float(int(now)),
            )
        except Exists as e:
            raise E.AlreadyExists(str(e)) from None
        except Missing as e:
            raise E.NotFound(str(e)) from None
        log.info("schedule %s created: %s, keeps %s", name, when.describe(), policy.describe())
        self._kick.set()
        return self._json(row)

    def _get(self, name: str) -> Row:
        try:
            return self.store.get(name)
        except Missing as e:
            raise E.NotFound(str(e)) from None

    def list(self) -> list[Json]:
        return [self._json(r) for r in self.store.all()]

    def show(self, name: str) -> Json:
        return self._json(self._get(name), detail=True)

    def pause(self, name: str) -> Json:
        self._get(name)
        row = self.store.set_paused(name, True, self.clock())
        log.info("schedule %s paused", name)
        return self._json(row)

    def resume(self, name: str) -> Json:
        self._get(name)
        row = self.store.set_paused(name, False, self.clock())
        log.info("schedule %s resumed", name)
        self._kick.set()
        return self._json(row)

    def delete(self, name: str) -> Json:
        """Forget the schedule; its snapshots stay (they become ordinary
        snapshots: nothing prunes them any more)."""
        row = self._get(name)
        kept = len(self.store.owned(row.id))
        try:
            self.store.remove(name)
        except Missing as e:
            raise E.NotFound(str(e)) from None
        log.info("schedule %s deleted (%d of its snapshots kept)", name, kept)
        return {"name": name, "deleted": True, "snapshots_kept": kept}
