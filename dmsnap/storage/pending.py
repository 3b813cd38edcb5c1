"""The pending-operation engine: every kernel change is bracketed by a
record in the catalog, so that a crash at any point is settled at the next
start, forward or back.

An operation is planned first (ids, extents: JSON-able, by the backend),
the plan is recorded (``pending``), the kernel work runs from the plan
alone, then the catalog's side commits and the record ends in one
transaction. Recovery asks the backend which way an interrupted one goes
(:meth:`dmsnap.storage.backend.Backend.recover`) and finishes it here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from dmsnap.storage import names
from dmsnap.storage.backend import Backend, planned_dev_ids
from dmsnap.storage.catalog import Catalog, Pool, Snapshot, Volume
from dmsnap.storage.catalog import Exists as CatExists
from dmsnap.storage.layers import ensure
from dmsnap.storage.stack import PoolStack

log = logging.getLogger("dmsnap.storage")

Json = dict[str, Any]


class PendingOps:
    def __init__(self, catalog: Catalog, stack: PoolStack) -> None:
        self.catalog, self.stack = catalog, stack

    def _advance(self, pool: Pool, payload: Json) -> None:
        """Catalog part shared by every committed change: pool counters."""
        fields: Json = {}
        if "new_txid" in payload:
            fields["transaction_id"] = payload["new_txid"]
        ids = planned_dev_ids(payload)
        if ids:
            fields["next_dev_id"] = max(pool.next_dev_id, max(ids) + 1)
        if fields:
            self.catalog.update_pool(pool.id, **fields)

    def roll_forward(
        self, pool: Pool, backend: Backend, kind: str, payload: Json, pending_id: int
    ) -> Any:
        """Apply the catalog side of a kernel change and end its pending
        record, in one transaction. Idempotent (recovery re-runs it)."""
        result: Any = None
        with self.catalog.tx():
            if kind == "volume.create":
                with contextlib.suppress(CatExists):
                    result = self.catalog.add_volume(
                        pool,
                        payload["name"],
                        payload["size"],
                        dev_id=payload.get("dev_id"),
                        extent_start=payload.get("extent_start"),
                    )
            elif kind == "snapshot.create":
                vols = {v.id: v for v in self.catalog.volumes(pool.name)}
                members = [
                    (vols[p["volume_id"]], p) for p in payload["plans"] if p["volume_id"] in vols
                ]
                with contextlib.suppress(CatExists):
                    result = self.catalog.add_group(
                        pool,
                        payload["name"],
                        members,
                        token=payload.get("token"),
                        labels=payload.get("labels"),
                        marker=payload.get("marker"),
                    )
                    if payload.get("marker"):
                        self.catalog.finish_marker(payload["marker"], group_id=result)
            elif kind == "snapshot.delete":
                self.catalog.remove_snapshot(payload["snapshot_id"])
            elif kind == "volume.delete":
                self.catalog.remove_volume(payload["volume_id"])
            elif kind == "volume.restore":
                backend.record_restore_switch(payload)
                backend.record_restore_done(payload)
            else:
                raise ValueError(f"unknown pending kind {kind}")
            self._advance(pool, payload)
            self.catalog.end_pending(pending_id)
        return result

    def roll_back(self, pool: Pool, payload: Json, pending_id: int) -> None:
        """End a rolled-back operation's record. Its planned device ids may
        have reached the kernel (a crash between create and commit), so they
        are never handed out again: ids are plentiful, a collision is not."""
        ids = planned_dev_ids(payload)
        with self.catalog.tx():
            if ids:
                current = self.catalog.pool_by_id(pool.id).next_dev_id
                self.catalog.update_pool(pool.id, next_dev_id=max(current, max(ids) + 1))
            self.catalog.end_pending(pending_id)

    def run(
        self,
        pool: Pool,
        backend: Backend,
        kind: str,
        payload: Json,
        kernel: Callable[[], None],
    ) -> Any:
        """pending → kernel work → catalog commit. A kernel failure is undone
        through the backend's recovery before the error is reported."""
        pending_id = self.catalog.begin_pending(pool.id, kind, payload)
        try:
            kernel()
        except BaseException as exc:
            try:
                backend.refresh()
                direction = backend.recover(kind, payload)
            except Exception:
                log.exception("%s: undo after failure failed; left for recovery", kind)
                raise exc from None
            if direction == "forward":
                return self.roll_forward(pool, backend, kind, payload, pending_id)
            self.roll_back(pool, payload, pending_id)
            raise
        return self.roll_forward(pool, backend, kind, payload, pending_id)

    def create_volume(self, p: Pool, backend: Backend, name: str, size: int) -> Volume:
        """A new volume of ``size`` bytes, its dm device up."""
        plan = backend.plan_volume(size)
        payload = {"name": name, "size": size, **plan, **backend.txn()}
        self.run(p, backend, "volume.create", payload, lambda: backend.create_volume(plan, size))
        v = self.catalog.volume(p.name, name)
        backend.refresh()
        for layer in backend.volume_layers(v):
            ensure(self.stack.dm, layer)
        return v

    def delete_volume(self, p: Pool, backend: Backend, v: Volume) -> None:
        """The volume's dm device and its backend storage gone (it has no
        snapshots left)."""
        payload = {"volume_id": v.id, "name": v.name, **backend.txn()}

        def kernel() -> None:
            self.stack.remove(names.dm_volume(p.name, v.name))
            backend.delete_volume(v)

        self.run(p, backend, "volume.delete", payload, kernel)

    def delete_snapshot(self, p: Pool, backend: Backend, s: Snapshot) -> None:
        payload = {"snapshot_id": s.id, "name": s.name, "volume": s.volume, **backend.txn()}

        def kernel() -> None:
            self.stack.remove(names.dm_snapshot(p.name, s.volume, s.name))
            backend.delete_snapshot(s)

        self.run(p, backend, "snapshot.delete", payload, kernel)

    def restore(self, p: Pool, backend: Backend, v: Volume, s: Snapshot) -> None:
        """A volume back to a snapshot's content: past the backend's point of
        no return the catalog follows, then the kernel finishes (both
        idempotent, so a crash here rolls forward)."""
        plan = backend.plan_restore(v, s)
        payload = {"volume_id": v.id, "snapshot_id": s.id, **plan, **backend.txn()}
        pending_id = self.catalog.begin_pending(p.id, "volume.restore", payload)
        try:
            backend.restore(v, s, plan)
        except BaseException:
            backend.refresh()
            if backend.recover("volume.restore", payload) == "back":
                self.catalog.end_pending(pending_id)
                raise
        with self.catalog.tx():
            backend.record_restore_switch(payload)
            self._advance(p, payload)
        self.finish_restore(p, backend, payload)
        with self.catalog.tx():
            backend.record_restore_done(payload)
            self.catalog.end_pending(pending_id)

    def finish_restore(self, pool: Pool, backend: Backend, payload: Json) -> None:
        backend.refresh()
        vol = next(v for v in self.catalog.volumes(pool.name) if v.id == payload["volume_id"])
        snap = next(
            (s for s in self.catalog.snapshots(pool.name) if s.id == payload["snapshot_id"]), None
        )
        if snap is None:
            return  # merged in place: already consumed
        backend.finish_restore(vol, snap, payload)

    def recover(self) -> list[Json]:
        """Settle operations interrupted by a crash (at assembly)."""
        report = []
        for p in self.catalog.pending():
            entry: Json = {"kind": p.kind, "payload": p.payload}
            try:
                if p.kind == "pool.create" or p.pool_id is None:
                    self.stack.undo_create(p.payload["name"])
                    self.catalog.end_pending(p.id)
                    entry["result"] = "back"
                else:
                    pool = self.catalog.pool_by_id(p.pool_id)
                    backend = self.stack.backend(pool)
                    direction = backend.recover(p.kind, p.payload)
                    if direction == "forward":
                        self.roll_forward(pool, backend, p.kind, p.payload, p.id)
                        if p.kind == "volume.restore":
                            self.finish_restore(pool, backend, p.payload)
                    else:
                        self.roll_back(pool, p.payload, p.id)
                    entry["result"] = direction
            except Exception as e:  # leave it for the next start, loudly
                log.error("recovery of %s failed: %s", p.kind, e)
                entry["result"] = f"failed: {e}"
            log.info("recovered %s: %s", p.kind, entry["result"])
            report.append(entry)
        return report
