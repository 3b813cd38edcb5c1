"""Making snapshots: a request checked and recorded, the cut itself, and
the wait for a marker's snapshot.

A journaled pool's request becomes a MARKER in its journal: durable, it is
answered "pending", and the snapshot is made when the flusher stands at it
(:meth:`SnapshotCuts.materialize`, every earlier write on the volumes).
A pool without a journal is cut at once, its volumes suspended with flush
(:meth:`dmsnap.storage.backend.Backend.create_snapshots`). Either way the
cut goes through the pending-operation engine.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass

from dmsnap import errors as E
from dmsnap import rules
from dmsnap.journal.journal import JournalError
from dmsnap.journal.service import PoolJournal
from dmsnap.storage import names
from dmsnap.storage._common import Json, journal_error
from dmsnap.storage.backend import Backend
from dmsnap.storage.catalog import Catalog, MarkerState, Pool, Volume
from dmsnap.storage.catalog import NotFound as CatNotFound
from dmsnap.storage.journals import PoolJournals
from dmsnap.storage.pending import PendingOps
from dmsnap.storage.stack import PoolStack
from dmsnap.storage.views import Views

log = logging.getLogger("dmsnap.storage")

# How long a journaled pool's snapshot request took from its marker being
# recorded to its snapshot made (the flusher reaching the marker, then the
# cut), per pool: bucket counts (upper bounds in seconds, then +Inf) and
# the sum. Read by the metrics (dmsnap_snapshot_marker_latency_seconds); one
# update per snapshot, on the control path.
MARKER_BOUNDS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_marker_lat: dict[str, tuple[list[int], float]] = {}
_marker_mu = threading.Lock()


def marker_latencies() -> dict[str, tuple[list[int], float]]:
    """Pool -> (count per bucket of MARKER_BOUNDS then +Inf, sum of seconds)."""
    with _marker_mu:
        return {pool: (list(c), s) for pool, (c, s) in _marker_lat.items()}


def _observe_marker(pool: str, seconds: float) -> None:
    i = next((k for k, b in enumerate(MARKER_BOUNDS) if seconds <= b), len(MARKER_BOUNDS))
    with _marker_mu:
        counts, total = _marker_lat.get(pool) or ([0] * (len(MARKER_BOUNDS) + 1), 0.0)
        counts[i] += 1
        _marker_lat[pool] = (counts, total + seconds)


@dataclass(frozen=True)
class WaitFor:
    """snapshot_create's answer is a marker's snapshot: wait (unlocked)."""

    pj: PoolJournal
    marker: int
    extra: Json


class SnapshotCuts:
    def __init__(
        self,
        catalog: Catalog,
        stack: PoolStack,
        journals: PoolJournals,
        pending: PendingOps,
        views: Views,
        lock: threading.RLock,
        interrupted: threading.Event,
    ) -> None:
        self.catalog, self.stack, self.journals = catalog, stack, journals
        self.pending, self.views, self.lock = pending, views, lock
        self._interrupted = interrupted

    def submit(
        self,
        refs: list[list[str]] | list[tuple[str, str]],
        name: str,
        *,
        labels: dict[str, str] | None,
        token: str | None,
        wait: bool,
        cow_size: int | None,
    ) -> Json | WaitFor:
        """The part of ``Manager.snapshot_create`` under the control lock:
        checks, the catalog, the marker appended (or, without a journal, the
        cut itself). Returns the answer, or what to wait for."""
        names.check_name("snapshot", name)
        if not refs:
            raise E.InvalidArgument("name at least one POOL/VOLUME to snapshot")
        pairs = [(names.check_name("pool", p), names.check_name("volume", v)) for p, v in refs]
        pools = {p for p, _ in pairs}
        if len(pools) != 1:
            raise E.InvalidArgument(
                "a snapshot group must stay within one pool (one journal, one cut); got "
                + ", ".join(sorted(pools))
            )
        if len(set(pairs)) != len(pairs):
            raise E.InvalidArgument("a volume is named twice")
        for p_, v_ in pairs:  # before anything is promised (in-band: before GOOD)
            names.check_snapshot_ref(p_, v_, name)
        for k, val in (labels or {}).items():
            if (why := rules.label_problem(k, val)) is not None:
                raise E.InvalidArgument(why)
        pool_name = pools.pop()
        p, backend = self.stack.pool(pool_name)
        pj = self.journals.of(p)
        if token:
            gid = self.catalog.group_by_token(p.id, token)
            if gid is not None:  # a retried request: the snapshot already exists
                return {**self.views.group(gid), "retried": True}
            mk = self.catalog.marker_by_token(p.id, token)
            if pj is not None and mk is not None and mk.state == MarkerState.PENDING:
                if wait:
                    return WaitFor(pj, mk.id, {"retried": True})
                return {**self.views.marker(mk), "retried": True}
        if cow_size is not None and not backend.snapshot_areas:
            raise E.InvalidArgument("--cow-size is for classic pools (thin shares the pool)")
        members = [self.catalog.volume(pool_name, v) for _, v in pairs]
        if cow_size is not None:
            backend.check_room(f"snapshot {name}", cow_size * len(members))
        for m in members:
            with contextlib.suppress(CatNotFound):
                self.catalog.snapshot(pool_name, m.name, name)
                raise E.AlreadyExists(f"snapshot {pool_name}/{m.name}@{name} already exists")
        request = {
            "name": name,
            "volumes": [m.id for m in members],
            "labels": labels or {},
            "token": token,
        }
        if cow_size is not None:
            request["cow_size"] = cow_size
        if pj is None:
            backend.check_room(f"snapshot {name}")
            gid = self.cut(p, backend, members, name, request, None)
            log.info("snapshot %s of %s created", name, ", ".join(f"{a}/{b}" for a, b in pairs))
            return self.views.group(gid)
        ids = set(request["volumes"])
        for mk in self.catalog.markers(p.id, MarkerState.PENDING):
            if mk.name == name and ids & set(mk.request.get("volumes", [])):
                raise E.AlreadyExists(f"snapshot {name} is already requested (marker {mk.id})")
        backend.check_room(f"snapshot {name}")
        mid = self.catalog.add_marker(p.id, name, token, request)
        try:
            seq = pj.request(mid, request)
        except (JournalError, ValueError) as e:
            self.catalog.finish_marker(mid, error=f"not appended to the journal: {e}")
            if isinstance(e, JournalError):
                raise journal_error(e) from None
            raise E.InvalidArgument(str(e)) from None
        log.info(
            "snapshot %s of %s requested (marker %d)",
            name,
            ", ".join(f"{a}/{b}" for a, b in pairs),
            mid,
        )
        # seq: the marker's place in the journal (tests build their model on it)
        if wait or pj.mode == "ram":
            return WaitFor(pj, mid, {"seq": seq})
        mk2 = self.catalog.marker(mid)
        assert mk2 is not None
        return {**self.views.marker(mk2), "seq": seq}

    def cut(
        self,
        pool: Pool,
        backend: Backend,
        members: list[Volume],
        name: str,
        request: Json,
        marker: int | None,
    ) -> int:
        """The cut itself, through a pending record: every member's snapshot
        at the same point. The caller guarantees that point (suspend with
        flush, or the flusher standing at ``marker``)."""
        plans = backend.plan_snapshots(members, request.get("cow_size"))
        for m, plan in zip(members, plans, strict=True):
            plan.update(volume_id=m.id, volume=m.name, name=name)
        payload = {
            "name": name,
            "plans": plans,
            "labels": request.get("labels") or {},
            "token": request.get("token"),
            "marker": marker,
            **backend.txn(),
        }
        return int(
            self.pending.run(
                pool,
                backend,
                "snapshot.create",
                payload,
                lambda: backend.create_snapshots(members, plans),
            )
        )

    def wait(self, pj: PoolJournal, marker_id: int, timeout: float) -> Json:
        """Wait for a marker's snapshot WITHOUT the control lock (the marker
        thread needs it to make the snapshot; other clients need it too)."""
        durable = "is durable" if pj.mode == "nv" else "is in the RAM journal"
        try:
            res = pj.wait(marker_id, timeout, cancel=self._interrupted)
        except TimeoutError:
            raise E.Unavailable(
                f"snapshot requested (marker {marker_id} {durable}) but not made within "
                f"{timeout:.0f} s: the flusher is behind or stalled; see `dmsnap status`"
            ) from None
        except InterruptedError:
            later = (
                "it is made when the flusher reaches it after the next start"
                if pj.mode == "nv"
                else "a RAM journal keeps it only if it drains before the stop"
            )
            raise E.Unavailable(
                f"dmsnapd is stopping: snapshot requested (marker {marker_id} {durable}) "
                f"but not made yet; {later}; see `dmsnap snapshot request {pj.pool} "
                f"--marker {marker_id}`"
            ) from None
        with self.lock:
            mk = self.catalog.marker(marker_id)
        return {**res, "marker": marker_id, "token": mk.token if mk else None}

    def materialize(self, pool_id: int, marker_id: int, request: Json) -> Json:
        """The flusher stands at a marker: every earlier write is on the dm
        devices and synced. Make the snapshot group, exactly once per marker
        (a replay after a crash delivers it again)."""
        mk = self.catalog.marker(marker_id)
        if mk is None or mk.pool_id != pool_id:
            raise E.NotFound(f"marker {marker_id} is not in the catalog; no snapshot made")
        if mk.state == MarkerState.DONE:
            return self.views.group(mk.group_id)
        if mk.state == MarkerState.FAILED:
            raise E.UserError(f"snapshot {mk.name} failed earlier: {mk.error}")
        try:
            pool = self.catalog.pool_by_id(pool_id)
            backend = self.stack.backend(pool)
            vols = {v.id: v for v in self.catalog.volumes(pool.name)}
            members = [vols[i] for i in request["volumes"] if i in vols]
            if not members:
                raise E.NotFound("its volumes were deleted before the flusher reached it")
            for m in members:
                with contextlib.suppress(CatNotFound):
                    self.catalog.snapshot(pool.name, m.name, mk.name)
                    raise E.AlreadyExists(f"snapshot {pool.name}/{m.name}@{mk.name} exists")
            gid = self.cut(pool, backend, members, mk.name, request, marker_id)
        except Exception as e:
            self.catalog.finish_marker(marker_id, error=getattr(e, "message", None) or str(e))
            raise
        _observe_marker(pool.name, max(0.0, time.time() - mk.created))
        return self.views.group(gid)
