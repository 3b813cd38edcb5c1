"""The storage core's side of replication (docs/replication.md): what
:mod:`dmsnap.replication` needs of pools, volumes and snapshots, and
nothing of streams. Composed as ``Manager.replicas``; it never calls back
into the Manager, and takes the one control lock itself for each step
(never while a stream moves: a ``send | receive`` pipe into the same
dmsnapd must not wait on itself).

* sender: a snapshot (and its base) resolved and its device opened for
  reading; a frozen copy of a thin pool's metadata for ``thin_delta``
  (``reserve_metadata_snap``, always released);
* receiver: the rules of an incoming stream, its staging device (a thin
  snapshot of the base, or a new thin device for a full stream: no
  snapshot of the catalog's until complete), its cursor, and the switch
  that makes it a snapshot and the volume's content in one transaction;
* holds: the snapshot each target received last, which delete refuses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dmsnap import errors as E
from dmsnap.dm import DeviceMapper, DmError
from dmsnap.storage import loop, names
from dmsnap.storage._common import user_errors
from dmsnap.storage.backend import Backend
from dmsnap.storage.catalog import Catalog, Pool, Receive, Snapshot, Volume
from dmsnap.storage.catalog import NotFound as CatNotFound
from dmsnap.storage.journals import PoolJournals, dm_path
from dmsnap.storage.layers import ensure
from dmsnap.storage.pending import PendingOps
from dmsnap.storage.stack import PoolStack

log = logging.getLogger("dmsnap.storage")

# (metadata device, thin dev id A, thin dev id B) -> whether their blocks differ
Changed = Callable[[str, int, int], bool]

ZERO_CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """A snapshot being sent: opened for reading until :meth:`Replicas.close_source`."""

    pool: Pool
    volume: Volume
    snap: Snapshot
    base: Snapshot | None
    incremental: bool  # the pool's metadata gives the delta (else: all blocks)
    path: str
    activated: bool  # activated for the send: deactivated after


@dataclass(frozen=True)
class Incoming:
    """What an incoming stream's header says, as the storage core needs it."""

    volume_uuid: str
    base_uuid: str | None
    target_uuid: str
    target_name: str
    base_name: str | None
    size: int
    start: int


class Staging:
    """The writable device a stream is applied to (a ``transfer.Target``):
    data written, zero ranges discarded (whole pool blocks: unmapped, read
    zeros) or written as zeros (the unaligned ends), synced at cursors."""

    def __init__(self, receive: Receive, path: str, granularity: int) -> None:
        self.receive = receive
        self.path = path
        self.granularity = granularity
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._zeros = bytes(ZERO_CHUNK)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def _write_zeros(self, offset: int, length: int) -> None:
        for pos in range(offset, offset + length, ZERO_CHUNK):
            self.write(pos, self._zeros[: min(ZERO_CHUNK, offset + length - pos)])

    def zero(self, offset: int, length: int) -> None:
        g = self.granularity
        lo = -(-offset // g) * g
        hi = (offset + length) // g * g
        if lo >= hi:
            self._write_zeros(offset, length)
            return
        self._write_zeros(offset, lo - offset)
        loop.discard_fd(self.fd, lo, hi - lo, self.path)
        self._write_zeros(hi, offset + length - hi)

    def sync(self) -> None:
        os.fdatasync(self.fd)


class Replicas:
    def __init__(
        self,
        dm: DeviceMapper,
        catalog: Catalog,
        stack: PoolStack,
        pending: PendingOps,
        journals: PoolJournals,
        lock: threading.RLock,
    ) -> None:
        self.dm, self.catalog, self.stack = dm, catalog, stack
        self.pending, self.journals, self.lock = pending, journals, lock
        self._meta_locks: dict[str, threading.Lock] = {}
        # snapshot ids being sent or received onto: delete refuses them
        self._busy: dict[int, int] = {}

    # -- snapshots in use, holds -------------------------------------------------------

    def check_deletable(self, s: Snapshot, force: bool) -> None:
        """Called by snapshot delete (under the lock): a snapshot a send
        reads, or a receive builds on, is never deleted; one a target holds
        only with force."""
        if self._busy.get(s.id):
            raise E.Busy(
                f"snapshot {s.pool}/{s.volume}@{s.name} is being sent or received onto; "
                "try again when that is done"
            )
        holds = self.catalog.holds(s.id)
        if holds and not force:
            raise E.Busy(
                f"snapshot {s.pool}/{s.volume}@{s.name} is held by replication target(s) "
                f"{', '.join(holds)} (the base of their next incremental); "
                "--force deletes it (their next sync is then a full one)"
            )

    def _use(self, snaps: list[Snapshot], delta: int) -> None:
        for s in snaps:
            n = self._busy.get(s.id, 0) + delta
            if n:
                self._busy[s.id] = n
            else:
                self._busy.pop(s.id, None)

    @user_errors
    def hold(self, pool: str, vol: str, snap: str, target: str) -> dict[str, object]:
        with self.lock:
            s = self.catalog.snapshot(pool, vol, snap)
            self.catalog.set_hold(s.volume_id, s.id, target)
            log.info("snapshot %s/%s@%s held for target %s", pool, vol, snap, target)
            return {"pool": pool, "volume": vol, "snapshot": snap, "target": target}

    @user_errors
    def release(self, pool: str, vol: str, target: str) -> dict[str, object]:
        with self.lock:
            v = self.catalog.volume(pool, vol)
            n = self.catalog.remove_hold(v.id, target)
            if not n:
                raise E.NotFound(f"target {target} holds no snapshot of {pool}/{vol}")
            return {"pool": pool, "volume": vol, "target": target, "released": n}

    @user_errors
    def holds(self, pool: str, vol: str) -> list[dict[str, object]]:
        with self.lock:
            return [
                {"snapshot": s.name, "uuid": s.uuid, "target": t}
                for s in self.catalog.snapshots(pool, vol)
                for t in self.catalog.holds(s.id)
            ]

    # -- sender --------------------------------------------------------------------------

    @user_errors
    def open_source(self, pool: str, vol: str, snap: str, base: str | None) -> Source:
        """The snapshot to send, activated for reading (and its base, which
        must be an older snapshot of the same volume); both stay in use
        (undeletable) until :meth:`close_source`."""
        with self.lock:
            p, backend = self.stack.pool(pool)
            v = self.catalog.volume(pool, vol)
            s = self.catalog.snapshot(pool, vol, snap)
            b = None
            if base is not None:
                if base == snap:
                    raise E.InvalidArgument(f"--from {base} is the snapshot being sent")
                b = self.catalog.snapshot(pool, vol, base)
                if (b.created, b.id) > (s.created, s.id):
                    raise E.InvalidArgument(
                        f"--from {base} is newer than {snap}: an incremental goes forward"
                    )
            for x in (s, b):
                if x is not None and (state := backend.snapshot_state(x)) != "valid":
                    raise E.Unavailable(f"snapshot {pool}/{vol}@{x.name} is {state}")
            activated = False
            if not s.active:
                for layer in backend.snapshot_layers(s, active=True):
                    ensure(self.dm, layer)
                self.catalog.set_snapshot_active(s.id, True)
                activated = True
            self._use([x for x in (s, b) if x is not None], +1)
            return Source(
                p,
                v,
                s,
                b,
                backend.incremental_send,
                f"/dev/mapper/{names.dm_snapshot(pool, vol, snap)}",
                activated,
            )

    def close_source(self, src: Source) -> None:
        with self.lock:
            self._use([x for x in (src.snap, src.base) if x is not None], -1)
            if src.activated:
                try:
                    name = names.dm_snapshot(src.pool.name, src.volume.name, src.snap.name)
                    if self.stack.open_count(name, grace=1.0) == 0:
                        self.dm.remove(name)
                        self.catalog.set_snapshot_active(src.snap.id, False)
                except (DmError, CatNotFound, E.UserError) as e:
                    log.warning("snapshot %s stays active after its send: %s", src.snap.name, e)

    @contextlib.contextmanager
    def metadata(self, pool: str) -> Iterator[str]:
        """A frozen copy of a thin pool's mappings for ``thin_delta -m``,
        released whatever happens; one at a time per pool (the kernel holds
        one). Reserving and releasing are one message each to the pool
        device, serialised by the pool's own lock and not the control lock:
        a receiver holding the control lock may wait here for a send from
        the same pool, which never waits for the control lock meanwhile."""
        with self.lock:
            _, backend = self.stack.pool(pool)
            meta_lock = self._meta_locks.setdefault(pool, threading.Lock())
        with meta_lock:
            cm = backend.metadata_snapshot()
            try:
                path = cm.__enter__()
            except DmError as e:
                raise E.Unavailable(
                    f"pool {pool}: cannot reserve its metadata snapshot ({e}); another "
                    "tool may hold one (`dmsetup status` shows a held root)"
                ) from None
            try:
                yield path
            finally:
                cm.__exit__(None, None, None)

    # -- receiver ----------------------------------------------------------------------

    @user_errors
    def interrupted(self, pool: str, vol: str) -> Receive | None:
        with self.lock:
            p = self.catalog.pool(pool)
            return self.catalog.receive(p.id, vol)

    def _newest(self, pool: str, vol: str) -> Snapshot | None:
        snaps = self.catalog.snapshots(pool, vol)
        return snaps[-1] if snaps else None

    def _written(self, p: Pool, v: Volume, newest: Snapshot, changed: Changed) -> bool:
        """Whether the volume differs from its newest snapshot (its journal
        records flushed first, by the caller's ``detached``)."""
        assert v.dev_id is not None and newest.dev_id is not None
        with self.metadata(p.name) as meta:
            return changed(meta, newest.dev_id, v.dev_id)

    def _check_base(
        self, p: Pool, v: Volume, inc: Incoming, force: bool, changed: Changed
    ) -> Snapshot:
        """The receiver's rules for an incremental into an existing volume."""
        ref = f"{p.name}/{v.name}"
        if v.uuid != inc.volume_uuid:
            raise E.InvalidArgument(
                f"the stream is for another volume (uuid {inc.volume_uuid}), not {ref} "
                f"(uuid {v.uuid}); nothing applied"
            )
        newest = self._newest(p.name, v.name)
        if any(s.uuid == inc.target_uuid for s in self.catalog.snapshots(p.name, v.name)):
            raise E.AlreadyExists(f"{ref} already has snapshot {inc.target_name} (same uuid)")
        if newest is None or newest.uuid != inc.base_uuid:
            have = "no snapshot" if newest is None else f"{newest.name} ({newest.uuid})"
            raise E.InvalidArgument(
                f"wrong base: the stream goes from {inc.base_name} ({inc.base_uuid}), "
                f"{ref}'s newest snapshot is {have}; nothing applied"
            )
        if not force:
            with self.journals.detached(p, v):
                if self._written(p, v, newest, changed):
                    raise E.Busy(
                        f"{ref} was written since snapshot {newest.name}; --force rolls it "
                        "back to it (losing those writes) before receiving"
                    )
        return newest

    @user_errors
    def begin_receive(
        self, pool: str, vol: str, inc: Incoming, *, force: bool, changed: Changed
    ) -> Staging:
        """Check an incoming stream against the receiver's rules (before
        anything changes) and open its staging device: a new one, or the
        interrupted receive's, which it resumes."""
        with self.lock:
            p, backend = self.stack.pool(pool)
            if not backend.receives_streams:
                backend.plan_stage()  # raises the backend's reason
            ref = f"{pool}/{vol}"
            try:
                v: Volume | None = self.catalog.volume(pool, vol)
            except CatNotFound:
                v = None
            base: Snapshot | None = None
            if inc.base_uuid is None:
                if v is not None:
                    raise E.AlreadyExists(
                        f"volume {ref} exists: a full stream creates its volume "
                        "(receive into a new name, or send an incremental)"
                    )
            elif v is None:
                raise E.NotFound(
                    f"no volume {ref}: an incremental stream needs it with its base "
                    f"snapshot {inc.base_name}; send a full stream first"
                )
            else:
                if v.size != inc.size:
                    raise E.InvalidArgument(
                        f"the stream's volume has {inc.size} bytes, {ref} has {v.size}"
                    )
                base = self._check_base(p, v, inc, force, changed)
            rec = self.catalog.receive(p.id, vol)
            if rec is not None:
                same = (
                    rec.target_uuid == inc.target_uuid
                    and rec.base_uuid == inc.base_uuid
                    and rec.volume_uuid == inc.volume_uuid
                )
                if not same:
                    raise E.Busy(
                        f"{ref} has an interrupted receive of {rec.target_name} (cursor "
                        f"{rec.cursor}): resume it, or discard it with "
                        f"`dmsnap receive {ref} --abort`"
                    )
                if inc.start > rec.cursor:
                    raise E.InvalidArgument(
                        f"the stream resumes at {inc.start}, but {ref}'s receive of "
                        f"{rec.target_name} has everything only below {rec.cursor}"
                    )
            else:
                if inc.start:
                    raise E.InvalidArgument(
                        f"the stream resumes at {inc.start}, but {ref} has no interrupted "
                        f"receive of {inc.target_name}; send it from the start"
                    )
                names.check_snapshot_ref(pool, vol, inc.target_name)
                backend.check_room(f"the received snapshot {inc.target_name}")
                plan = backend.plan_stage()
                payload = {
                    "volume": vol,
                    "volume_uuid": inc.volume_uuid,
                    "base_uuid": inc.base_uuid,
                    "target_uuid": inc.target_uuid,
                    "target_name": inc.target_name,
                    "size": inc.size,
                    **plan,
                    **backend.txn(),
                }
                self.pending.run(
                    p,
                    backend,
                    "receive.stage",
                    payload,
                    lambda: backend.create_stage(plan, base),
                )
                backend.refresh()
                rec = self.catalog.receive(p.id, vol)
                assert rec is not None
            if base is not None:
                self._use([base], +1)
            layer = self._stage_layer(p, backend, rec)
            ensure(self.dm, layer)
            granularity = backend.unmap_granularity() or 512
            return Staging(rec, f"/dev/mapper/{layer.name}", granularity)

    def _stage_layer(self, p: Pool, backend: Backend, rec: Receive):  # type: ignore[no-untyped-def]
        name = names.dm_internal(p.name, f"recv{rec.id}")
        uuid = names.uuid_internal(p.uuid, p.name, f"recv{rec.id}")
        return backend.stage_layer(name, uuid, rec.dev_id, rec.size)

    def record_cursor(self, staging: Staging, cursor: int) -> None:
        """Everything below ``cursor`` is applied and synced (the caller
        synced first): a resumed stream may start here."""
        with self.lock:
            self.catalog.set_receive_cursor(staging.receive.id, cursor)

    def end_staging(self, staging: Staging, base_uuid: str | None) -> None:
        """The stream stopped (done, cut or refused): its device closed and
        removed; the staging thin device and cursor stay for a resume."""
        staging.close()
        with self.lock:
            if base_uuid is not None:
                with contextlib.suppress(CatNotFound):
                    v = self.catalog.volume(
                        self.catalog.pool_by_id(staging.receive.pool_id).name,
                        staging.receive.volume,
                    )
                    self._use(
                        [s for s in self.catalog.snapshots(v.pool, v.name) if s.uuid == base_uuid],
                        -1,
                    )
            name = staging.path.rsplit("/", 1)[-1]
            with contextlib.suppress(DmError):
                if self.dm.exists(name):
                    self.dm.remove(name)

    @user_errors
    def finish_receive(
        self, pool: str, vol: str, *, force: bool, changed: Changed
    ) -> dict[str, object]:
        """The whole stream is applied and checked: the staging device
        becomes snapshot TARGET of the volume and the volume's content (a
        clone of it), in one catalog transaction; a first sync creates the
        volume. An incremental's volume written meanwhile is refused
        (unless ``force``): the staging stays, complete, for a retry."""
        with self.lock:
            p, backend = self.stack.pool(pool)
            rec = self.catalog.receive(p.id, vol)
            if rec is None:
                raise E.NotFound(f"no receive into {pool}/{vol} to finish")
            try:
                v: Volume | None = self.catalog.volume(pool, vol)
            except CatNotFound:
                v = None
            if v is None:
                self._switch(p, backend, rec, None)
            else:
                with self.journals.detached(p, v):
                    self.stack.check_not_open(names.dm_volume(pool, vol), f"volume {pool}/{vol}")
                    newest = self._newest(pool, vol)
                    if newest is None or newest.uuid != rec.base_uuid:
                        raise E.Busy(
                            f"{pool}/{vol}'s snapshots changed during the receive: its newest is "
                            f"no longer the stream's base; discard with "
                            f"`dmsnap receive {pool}/{vol} --abort`"
                        )
                    if not force and self._written(p, v, newest, changed):
                        raise E.Busy(
                            f"{pool}/{vol} was written during the receive; the received "
                            f"{rec.target_name} is kept complete: resume with --force to roll "
                            "the volume back and finish"
                        )
                    self._switch(p, backend, rec, v)
            log.info("received %s/%s@%s", pool, vol, rec.target_name)
            return {"pool": pool, "volume": vol, "snapshot": rec.target_name}

    def _switch(self, p: Pool, backend: Backend, rec: Receive, v: Volume | None) -> None:
        plan = backend.plan_stage()  # the volume's new device: a clone of the snapshot
        payload = {
            "receive_id": rec.id,
            "name": rec.volume,
            "size": rec.size,
            "volume_id": None if v is None else v.id,
            "volume_uuid": rec.volume_uuid,
            "old_dev_id": None if v is None else v.dev_id,
            "stage_dev_id": rec.dev_id,
            "target_name": rec.target_name,
            "target_uuid": rec.target_uuid,
            **plan,
            **backend.txn(),
        }
        self.pending.run(
            p,
            backend,
            "receive.finish",
            payload,
            lambda: backend.clone_device(plan, rec.dev_id),
        )
        backend.refresh()
        nv = self.catalog.volume(p.name, rec.volume)
        for layer in backend.volume_layers(nv):
            ensure(self.dm, layer)  # a live volume's table switches to the clone
        if v is not None and v.dev_id is not None:
            try:
                backend.delete_devices([v.dev_id])
            except DmError as e:  # space, not data: said, not fatal
                log.warning("pool %s: old device of %s not deleted: %s", p.name, v.name, e)
            backend.refresh()
        else:
            pj = self.journals.of(p)
            if pj is not None:
                pj.attach(nv.id, dm_path(p.name, nv.name), nv.size)

    @user_errors
    def abort_receive(self, pool: str, vol: str) -> dict[str, object]:
        """Discard an interrupted receive: its staging device goes."""
        with self.lock:
            p, backend = self.stack.pool(pool)
            rec = self.catalog.receive(p.id, vol)
            if rec is None:
                raise E.NotFound(f"no interrupted receive into {pool}/{vol}")
            name = self._stage_layer(p, backend, rec).name
            self.stack.check_not_open(name, f"the receive into {pool}/{vol}")
            with contextlib.suppress(DmError):
                if self.dm.exists(name):
                    self.dm.remove(name)
            # no transaction id: a delete goes forward whatever the kernel did
            payload = {"receive_id": rec.id, "stage_dev_id": rec.dev_id}
            self.pending.run(
                p, backend, "receive.abort", payload, lambda: backend.delete_devices([rec.dev_id])
            )
            backend.refresh()
            return {"pool": pool, "volume": vol, "aborted": rec.target_name}
