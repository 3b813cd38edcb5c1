"""The snapshot backend interface: small on purpose (cf. snapper's Filesystem.h).

A backend knows how one pool turns volumes and snapshots into device-mapper
layers above the pool's base device (the writecache, or the data device).
The storage core does names, the catalog, validation and crash bookkeeping
(:mod:`dmsnap.storage.pending`); the backend does kernel work, and only the
catalog changes that differ by backend (a restore's: ``record_restore_*``,
inside the caller's transaction). Callers never ask which backend a pool
has: what differs is a method here or a capability of :class:`Backend`.

``create_snapshots`` is *the cut*. Its caller guarantees that every write
that belongs in the snapshot has completed on the volume devices (a pool
without a journal: the backend suspends its volumes with flush; with the
journal: the flusher stands at a marker). The backend suspends origins only
as the kernel target requires (:meth:`Backend.suspended`), and only for as
long as it takes.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dmsnap.dm import DeviceMapper
from dmsnap.errors import InvalidArgument
from dmsnap.storage import names
from dmsnap.storage.catalog import Catalog, Pool, Snapshot, Volume
from dmsnap.storage.layers import Layer
from dmsnap.units import Sectors


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
    sectors: Sectors
    path: str


class Backend(ABC):
    """Callers never ask which backend a pool has (no ``pool.backend ==``
    outside the backends): what differs is a method here or one of these
    capabilities."""

    kind: str
    # each snapshot has a COW area of its own: sized at creation
    # (--cow-size), grown by autoextend
    snapshot_areas = False
    # volumes take pool space as they are written: they may add up to more
    # than the pool (overcommit); a new volume reserves nothing up front
    thin_provisioned = False
    # a restore merges the snapshot into the volume's own device (the
    # snapshot is consumed, and recovery resumes the merge), rather than
    # switching the volume to a clone of it
    restores_in_place = False

    def __init__(self, dm: DeviceMapper, catalog: Catalog, pool: Pool, base: Base) -> None:
        self.dm = dm
        self.catalog = catalog
        self.pool = pool
        self.base = base

    def refresh(self) -> None:
        self.pool = self.catalog.pool_by_id(self.pool.id)

    @staticmethod
    @abstractmethod
    def plan_layout(base_sectors: int, metadata_size: int | None = None) -> dict[str, Any]:
        """The pool config of a new pool on a base of ``base_sectors``
        (raises NoSpace if it is too small); ``metadata_size`` as
        :meth:`check_layout_options` took it."""

    @staticmethod
    def check_layout_options(metadata_size: int | None) -> None:
        """Refuse a layout option this backend does not have, or a value it
        cannot take, before anything changes."""
        if metadata_size is not None:
            raise InvalidArgument("--metadata-size is for thin pools")

    @contextlib.contextmanager
    def suspended(self, names_: list[str]) -> Iterator[None]:
        """Suspend every device named (with flush), in order; resume those
        suspended, whatever happens. Suspending all members of a group
        before touching any makes the group one cut."""
        done: list[str] = []
        try:
            for n in names_:
                self.dm.suspend(n)
                done.append(n)
            yield
        finally:
            for n in done:
                self.dm.resume(n)

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
        """Prepare a new pool's base for its first :meth:`pool_layers`
        (destroys what it held): called once, by pool creation."""

    @abstractmethod
    def txn(self) -> dict[str, Any]:
        """Fields a pending record needs to settle a crash (e.g. transaction ids)."""

    @abstractmethod
    def check_room(self, what: str, size: int = 0) -> None:
        """Raise NoSpace if ``what`` (needing ``size`` bytes up front) cannot fit."""

    def check_volume_room(self, what: str, size: int) -> None:
        """Raise NoSpace if a new volume of ``size`` bytes cannot fit."""
        self.check_room(what, 0 if self.thin_provisioned else size)

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

    def record_restore_switch(self, payload: dict[str, Any]) -> None:
        """The catalog's part of a restore at its point of no return (in
        the caller's transaction): a clone becomes the volume's device."""
        return None

    def record_restore_done(self, payload: dict[str, Any]) -> None:
        """The catalog's part of a finished restore (in the caller's
        transaction): a snapshot merged in place is gone."""
        return None

    # -- extension devices (thin: metadata extensions), attached by the stack --

    def extension_count(self) -> int:
        """How many extension devices the pool's layers are built on."""
        return 0

    def set_extension_devnos(self, devnos: list[str]) -> None:
        """MAJ:MIN of each extension device, in order (before pool_layers)."""
        return None

    def check_metadata_extension(self, size: int) -> None:
        """Refuse an extension of ``size`` bytes of pool metadata that this
        pool cannot take (before anything changes)."""
        raise InvalidArgument(
            f"pool {self.pool.name} is {self.kind}: only thin pools have metadata"
        )

    def add_metadata_extension(self, devno: str, size: int) -> None:
        """Record the extension device ``devno`` (``size`` bytes) in the pool's
        config and have the kernel use it; undone on failure."""
        raise InvalidArgument(
            f"pool {self.pool.name} is {self.kind}: only thin pools have metadata"
        )

    def no_space_reason(self) -> str | None:
        """For the journal (no control lock): why the pool cannot take new
        blocks now, or None."""
        return None

    # Whether what the journal synced onto this backend's devices may still
    # be lost below (so it waits for space_state() to confirm it).
    confirms_durability = False

    def space_state(self) -> tuple[str | None, bool]:
        """For the journal (no control lock): (no_space_reason(), whether
        the pool was seen healthy, so what was synced before is durable)."""
        return self.no_space_reason(), True

    def unmap_granularity(self) -> int | None:
        """Bytes in which a discard gives space back (None: any)."""
        return None

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
