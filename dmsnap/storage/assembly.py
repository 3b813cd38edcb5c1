"""Bringing the pools up as the catalog says, at every start: each pool's
volumes and active snapshots, crash recovery (the pending-operation
engine), then the journals (with replay).

A pool that cannot come up is recorded in ``pool_errors`` (the health
lines and every operation on it name the reason) and the others come up
anyway. Exports start after this, in the storage core.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from dmsnap import errors as E
from dmsnap.dm import DeviceMapper, DmError
from dmsnap.storage._common import Json
from dmsnap.storage.catalog import Catalog, Pool
from dmsnap.storage.journals import PoolJournals
from dmsnap.storage.layers import ensure
from dmsnap.storage.pending import PendingOps
from dmsnap.storage.stack import PoolStack

log = logging.getLogger("dmsnap.storage")


class Assembly:
    def __init__(
        self,
        dm: DeviceMapper,
        catalog: Catalog,
        stack: PoolStack,
        pending: PendingOps,
        journals: PoolJournals,
        pool_errors: dict[str, str],
    ) -> None:
        self.dm, self.catalog, self.stack = dm, catalog, stack
        self.pending, self.journals, self.pool_errors = pending, journals, pool_errors

    def _attempt(self, pool: Pool, report: Json, what: str, step: Callable[[Pool], None]) -> None:
        """One step for one pool; a failure is the pool's error, not the run's
        (``what`` ends the log line's "pool NAME" part)."""
        try:
            step(pool)
        except (E.UserError, DmError, OSError) as e:
            msg = getattr(e, "message", None) or str(e)
            log.error("pool %s%s: %s", pool.name, what, msg)
            report["pools"][pool.name] = self.pool_errors[pool.name] = msg

    def run(self) -> Json:
        """Every pool up; idempotent (existing devices are checked and kept).
        Returns each pool's state and what recovery settled."""
        report: Json = {"pools": {}, "recovered": []}
        self.stack.backends.clear()
        for pool in self.catalog.pools():
            self.pool_errors.pop(pool.name, None)
            report["pools"][pool.name] = "ok"
            self._attempt(pool, report, " not assembled", self.pool)
        report["recovered"] = self.pending.recover()
        if any(r["result"] == "forward" for r in report["recovered"]):
            # Recovery recorded what the kernel had done before the crash (a
            # volume, a classic snapshot): bring it up too, before the
            # journals start. A journal attaches every volume of its pool
            # (a missing one refused the pool), and an origin copies old
            # data only into the snapshots loaded under it (one left out
            # would later show the data written after it).
            for pool in self._healthy():
                self._attempt(pool, report, " not assembled after recovery", self.pool)
        # Journals start after recovery: a replayed marker then sees the
        # catalog as it is, and its snapshot is made exactly once.
        for pool in self._healthy():
            self._attempt(pool, report, ": journal not started", self.journals.start)
        return report

    def _healthy(self) -> list[Pool]:
        return [p for p in self.catalog.pools() if p.name not in self.pool_errors]

    def restart(self, pool: Pool) -> str:
        """One pool up again, as :meth:`run` brings it (after a journal
        repair): "ok", or why not (also recorded in ``pool_errors``)."""
        self.pool_errors.pop(pool.name, None)
        report: Json = {"pools": {pool.name: "ok"}}
        self._attempt(pool, report, " not assembled", self.pool)
        if pool.name not in self.pool_errors:
            self._attempt(pool, report, ": journal not started", self.journals.start)
        return str(report["pools"][pool.name])

    def pool(self, pool: Pool) -> None:
        """The pool's volumes and active snapshots on their dm devices, but
        those an interrupted operation is still working on."""
        backend = self.stack.backend(pool)
        pending = self.catalog.pending()
        restoring = {p.payload.get("volume_id") for p in pending if p.kind == "volume.restore"}
        # A deletion the kernel may have done before a crash (the catalog
        # commit lost): recovery finishes it; loading the deleted device
        # first would fail (a deleted thin device: ENODATA, the pool refused).
        deleting = {p.payload.get("volume_id") for p in pending if p.kind == "volume.delete"}
        deleting_snaps = {
            p.payload.get("snapshot_id") for p in pending if p.kind == "snapshot.delete"
        }
        for vol in self.catalog.volumes(pool.name):
            if vol.id in restoring and backend.restores_in_place:
                continue  # recovery resumes the merge on this volume
            if vol.id in deleting:
                continue
            for layer in backend.volume_layers(vol):
                ensure(self.dm, layer)
        for snap in self.catalog.snapshots(pool.name):
            if snap.id in deleting_snaps or snap.volume_id in deleting:
                continue
            for layer in backend.snapshot_layers(snap, active=snap.active):
                ensure(self.dm, layer)
        backend.after_assembly(
            [
                v
                for v in self.catalog.volumes(pool.name)
                if v.id not in restoring and v.id not in deleting
            ]
        )
