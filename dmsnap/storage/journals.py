"""The running journals of the pools (:mod:`dmsnap.journal.service`): start
(with replay), stop (with drain), and a volume taken out of its journal
while a control operation works on its dm device.

What a marker does when the flusher reaches it is not decided here: the
storage core hands each journal its ``materialize`` function.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from dmsnap import errors as E
from dmsnap.dm import DeviceMapper
from dmsnap.journal.journal import Journal, JournalCorrupt, JournalError
from dmsnap.journal.service import PoolJournal
from dmsnap.storage import devices, names
from dmsnap.storage.backend import Backend, journal_mode
from dmsnap.storage.catalog import Catalog, MarkerState, Pool, Volume
from dmsnap.storage.catalog import NotFound as CatNotFound
from dmsnap.storage.identity import PoolDisks

log = logging.getLogger("dmsnap.storage")

# materialize(pool id, marker id, request) -> the snapshot group's JSON
Materialize = Callable[[int, int, dict[str, Any]], dict[str, Any]]


def dm_path(pool: str, vol: str) -> str:
    return f"/dev/mapper/{names.dm_volume(pool, vol)}"


class PoolJournals:
    def __init__(
        self,
        dm: DeviceMapper,
        catalog: Catalog,
        disks: PoolDisks,
        holds: devices.Holds,
        lock: threading.RLock,
        materialize: Materialize,
        pool_errors: dict[str, str],
        backends: dict[int, Backend],
    ) -> None:
        self.dm, self.catalog, self._disks, self._holds = dm, catalog, disks, holds
        self._lock, self._materialize, self._pool_errors = lock, materialize, pool_errors
        # the active backends (PoolStack.backends): a journal asks its pool's
        # whether it can take new blocks, from the marker thread, unlocked
        self._backends = backends
        self.by_pool: dict[int, PoolJournal] = {}  # pool id -> its running journal

    def start(self, pool: Pool) -> None:
        mode = journal_mode(pool)
        if mode == "none" or pool.id in self.by_pool:
            return
        cfg = pool.config["journal"]
        hold = ("journal", pool.id)
        jpath = cfg.get("path")
        if mode == "nv" and not cfg.get("embedded"):
            jpath = self._disks.hold_journal(pool, cfg["path"])
        try:
            if mode == "nv":
                j = Journal.open(jpath, mode="nv", mem_limit=cfg.get("memory") or 0)
            else:
                j = Journal.open(None, mode="ram", ram_size=cfg["size"])
        except JournalCorrupt as e:
            raise E.Unavailable(
                f"pool {pool.name}: {e}; to drop record {e.seq} and every later one: "
                f"dmsnap pool repair {pool.name} --discard-after {e.seq}"
            ) from None
        except JournalError as e:
            self._holds.release(hold)
            where = cfg.get("path") or "in RAM"
            raise E.Unavailable(f"pool {pool.name}: journal {where}: {e}") from None
        pid = pool.id

        def space_probe() -> tuple[str | None, bool]:
            b = self._backends.get(pid)
            return b.space_state() if b is not None else (None, False)

        b = self._backends.get(pid)

        pj = PoolJournal(
            pool.name,
            j,
            mode,
            lambda mid, req: self._materialize(pid, mid, req),
            self._lock,
            devices.Holds(),  # the volumes' dm devices, held while attached
            space_probe=space_probe,
            confirm=b is not None and b.confirms_durability,
        )
        vols = {v.id: (dm_path(pool.name, v.name), v.size) for v in self.catalog.volumes(pool.name)}
        try:
            pj.start(vols)
        except BaseException:
            j.close(drain=False)
            pj.release_all()
            self._holds.release(hold)
            raise
        self.by_pool[pid] = pj
        pending = MarkerState.PENDING
        if mode == "ram":  # a RAM journal starts empty: earlier requests are gone
            for mk in self.catalog.markers(pid, pending):
                self.catalog.finish_marker(
                    mk.id, error="lost: dmsnapd stopped before the flusher reached it (RAM journal)"
                )
        elif stale := [mk.id for mk in self.catalog.markers(pid, pending)]:
            # A request recorded in the catalog whose marker never became
            # durable (a crash between the two) was never acknowledged; once
            # the replay has served every recovered marker, say so.
            def settle() -> None:
                for mid in stale:
                    mk = self.catalog.marker(mid)
                    if mk is not None and mk.state == pending:
                        self.catalog.finish_marker(
                            mid, error="lost: dmsnapd stopped before the request was durable"
                        )
                        log.warning("pool %s: snapshot request %d was lost", pool.name, mid)

            pj.when_replayed(settle)

    def stop(self, pool_id: int, *, drain: bool = True, stall: float | None = None) -> None:
        pj = self.by_pool.pop(pool_id, None)
        if pj is None:
            return
        # A RAM journal's records exist nowhere else: it always drains, for
        # as long as it takes (up to the journal's own bound).
        stall = None if pj.mode == "ram" else stall
        try:
            pj.close(drain=drain or pj.mode == "ram", stall=stall)
        except (JournalError, TimeoutError) as e:
            kept = " (its records stay in the journal for the next start)" * (pj.mode == "nv")
            log.error("pool %s: journal did not drain: %s%s", pj.pool, e, kept)
        finally:
            self._holds.release(("journal", pool_id))

    def stop_all(self, *, drain: bool = True, stall: float | None = None) -> None:
        for pid in list(self.by_pool):
            self.stop(pid, drain=drain, stall=stall)

    def repair(self, pool: Pool, discard_after: int) -> int:
        """Drop record ``discard_after`` and every later one from the pool's
        NV journal, which is not running (its opening was refused, naming
        the record: ``Journal.repair``). Returns how many were dropped."""
        if journal_mode(pool) != "nv":
            raise E.InvalidArgument(f"pool {pool.name} has no NV journal: nothing to repair")
        if pool.id in self.by_pool:
            raise E.Busy(f"pool {pool.name}: its journal opened and is running: nothing to repair")
        try:
            rep = Journal.repair(pool.config["journal"]["path"], discard_after)
        except JournalError as e:
            raise E.InvalidArgument(f"pool {pool.name}: {e}") from None
        log.warning(
            "pool %s: journal repaired: %d record(s) from %d on dropped (up to %d)",
            pool.name,
            rep.dropped,
            discard_after,
            rep.last_seq,
        )
        return rep.dropped

    def abandon(self, pool: Pool) -> None:
        """Stop a pool's journal that is being destroyed with the pool: the
        markers requested before are made if the flusher gets there soon; a
        flusher stuck (a full thin pool, a failing device) never does, and
        the pool goes with its records anyway."""
        pj = self.by_pool.pop(pool.id, None)
        if pj is not None:
            try:
                pj.sync(timeout=5.0 if pj.stats().flush_error else 120.0)
            except TimeoutError as e:
                log.warning("pool %s: destroyed with records not on its volumes: %s", pool.name, e)
            pj.close(drain=False)
        self._holds.release(("journal", pool.id))

    def of(self, pool: Pool) -> PoolJournal | None:
        """The pool's running journal; None for a pool without one."""
        if journal_mode(pool) == "none":
            return None
        pj = self.by_pool.get(pool.id)
        if pj is None:
            raise E.Unavailable(
                f"pool {pool.name}: its journal is not running"
                + (f" ({self._pool_errors[pool.name]})" if pool.name in self._pool_errors else "")
            )
        return pj

    @contextlib.contextmanager
    def detached(self, pool: Pool, vol: Volume, *, markers_first: bool = False) -> Iterator[None]:
        """The volume with its journal records on the dm device and no
        journal writes to it meanwhile; attached again afterwards if it
        still exists (delete and restore work on the dm device itself).
        With ``markers_first`` every marker requested so far is made before
        (a restore must not change what an earlier request snapshots). A
        delete does not wait for them: it may be what frees a full pool."""
        pj = self.of(pool)
        if pj is None:
            yield
            return
        if markers_first:
            pj.sync()
            pj.detach(vol.id)
        else:
            try:
                pj.detach(vol.id, timeout=10.0)
            except TimeoutError:
                # The flusher is stuck before this volume's records (a full
                # pool, a failing device). The volume is being deleted: its
                # records can go, and the delete may be what unsticks it.
                log.warning("pool %s: dropping unflushed records of %s", pool.name, vol.name)
                pj.forget(vol.id)
                pj.detach(vol.id, timeout=10.0)
        try:
            yield
        finally:
            with contextlib.suppress(CatNotFound):
                v = self.catalog.volume(pool.name, vol.name)
                if v.id == vol.id and self.dm.exists(names.dm_volume(pool.name, vol.name)):
                    pj.attach(v.id, dm_path(pool.name, vol.name), v.size)
