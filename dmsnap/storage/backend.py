"""The snapshot backend interface: small on purpose (cf. snapper's Filesystem.h).

A backend knows how one pool turns volumes and snapshots into device-mapper
layers above the pool's base device (the writecache, or the data device).
The Manager does names, the catalog, validation and crash bookkeeping; the
backend does kernel work only.

``create_snapshots`` is *the cut*. Its caller guarantees that every write
that belongs in the snapshot has completed on the volume devices (today: the
Manager suspends with flush; with the journal: the flusher at a marker). The
backend suspends origins only as the kernel target requires, and only for as
long as it takes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from dmsnap.dm import DeviceMapper
from dmsnap.storage import names
from dmsnap.storage.catalog import Catalog, Pool, Snapshot, Volume
from dmsnap.storage.layers import Layer


def planned_dev_ids(payload: dict[str, Any]) -> list[int]:
    """Thin device ids an operation's plan allocated: one per snapshot plan,
    plus a new volume's (or a restore clone's) ``dev_id``."""
    ids = [p["dev_id"] for p in payload.get("plans", []) if p.get("dev_id") is not None]
    if payload.get("dev_id") is not None:
        ids.append(payload["dev_id"])
    return ids


def journal_mode(pool: Pool) -> str:
    """'nv', 'ram', or 'none' (a pool written straight to its dm devices)."""
    return str(pool.config.get("journal", {}).get("mode", "none"))


@dataclass(frozen=True)
class Base:
    """The device a backend builds on."""

    devno: str
    sectors: int
    path: str


class Backend(ABC):
    kind: str

    def __init__(self, dm: DeviceMapper, catalog: Catalog, pool: Pool, base: Base) -> None:
        self.dm = dm
        self.catalog = catalog
        self.pool = pool
        self.base = base

    def refresh(self) -> None:
        self.pool = self.catalog.pool_by_id(self.pool.id)

    # -- naming helpers shared by backends ----------------------------------------

    def vol_name(self, vol: Volume) -> str:
        return names.dm_volume(self.pool.name, vol.name)

    def vol_uuid(self, vol: Volume) -> str:
        return names.uuid_volume(
            self.pool.uuid, self.pool.name, vol.name, journaled=journal_mode(self.pool) != "none"
        )

    def snap_name(self, snap: Snapshot) -> str:
        return names.dm_snapshot(self.pool.name, snap.volume, snap.name)

    def snap_uuid(self, snap: Snapshot) -> str:
        return names.uuid_snapshot(self.pool.uuid, self.pool.name, snap.volume, snap.name)

    def internal(self, layer: str) -> tuple[str, str]:
        return (
            names.dm_internal(self.pool.name, layer),
            names.uuid_internal(self.pool.uuid, self.pool.name, layer),
        )

    # -- what should exist ----------------------------------------------------------

    @abstractmethod
    def pool_layers(self) -> list[Layer]:
        """Internal layers of the pool above the base, bottom-up."""

    @abstractmethod
    def volume_layers(self, vol: Volume) -> list[Layer]:
        """Layers of a volume, bottom-up; the last one is the volume device."""

    @abstractmethod
    def snapshot_layers(self, snap: Snapshot, *, active: bool) -> list[Layer]:
        """Layers of a snapshot; with ``active`` the last one is the
        read-only public device."""

    # -- operations -----------------------------------------------------------------
    #
    # Each change is planned first (ids, extents: JSON-able), the plan goes
    # into the catalog's pending record, then the kernel work runs from the
    # plan alone, so recovery after a crash can finish or undo it.

    @abstractmethod
    def format(self) -> None:
        """Prepare fresh pool metadata on a new pool's base (destroys data)."""

    @abstractmethod
    def txn(self) -> dict[str, Any]:
        """Fields a pending record needs to settle a crash (e.g. transaction ids)."""

    @abstractmethod
    def check_room(self, what: str, size: int = 0) -> None:
        """Raise NoSpace if ``what`` (needing ``size`` bytes up front) cannot fit."""

    @abstractmethod
    def plan_volume(self, size: int) -> dict[str, Any]:
        """Catalog fields of a new volume (dev_id / extent_start)."""

    @abstractmethod
    def create_volume(self, plan: dict[str, Any], size: int) -> None: ...

    @abstractmethod
    def delete_volume(self, vol: Volume) -> None: ...

    @abstractmethod
    def plan_snapshots(
        self, members: list[Volume], cow_size: int | None = None
    ) -> list[dict[str, Any]]:
        """Catalog fields of each member's new snapshot (``cow_size``: the
        COW area asked for, classic only)."""

    @abstractmethod
    def create_snapshots(self, members: list[Volume], plans: list[dict[str, Any]]) -> None:
        """The cut: one snapshot of each member, all at the same point."""

    @abstractmethod
    def delete_snapshot(self, snap: Snapshot) -> None: ...

    @abstractmethod
    def plan_restore(self, vol: Volume, snap: Snapshot) -> dict[str, Any]: ...

    @abstractmethod
    def restore(self, vol: Volume, snap: Snapshot, plan: dict[str, Any]) -> None:
        """Kernel work up to the point of no return."""

    @abstractmethod
    def finish_restore(self, vol: Volume, snap: Snapshot, plan: dict[str, Any]) -> None:
        """Idempotent completion once the catalog records the restore
        (``vol`` already carries the planned fields)."""

    def after_assembly(self, volumes: list[Volume]) -> None:
        """Called once a pool's volumes and snapshots are all loaded (after
        a reboot or a daemon start); for fix-ups a target needs."""
        return None

    def snapshot_state(self, snap: Snapshot) -> str:
        """ "valid", or why the snapshot's content cannot be trusted
        ("invalid": the kernel dropped it; "missing": not loaded)."""
        return "valid"

    def autoextend(self) -> list[str]:
        """Grow what would otherwise overflow (classic COW areas); one log
        line per action."""
        return []

    @abstractmethod
    def usage(self) -> dict[str, Any]:
        """Space and health of the pool's layers (JSON-able)."""

    @abstractmethod
    def recover(self, kind: str, payload: dict[str, Any]) -> str:
        """Settle an operation interrupted by a crash: 'forward' or 'back'
        (having undone the kernel part for 'back')."""
