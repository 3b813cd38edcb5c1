"""The storage model an administrator uses: pools, volumes, snapshots.

:class:`Manager` is the only actor on the device-mapper stack. dmsnapd owns
one and serialises calls to it; the control protocol maps requests 1:1 onto
its public methods. A method either completes or raises a
:class:`dmsnap.errors.UserError`; user errors are raised before anything is
changed. Results are plain JSON-able dicts (the wire format and ``--json``).

This class is the table of contents: each public operation checks its
arguments, takes the control lock and composes the parts beside it, which
never call back into it:

* :mod:`dmsnap.storage.stack`: a pool's disks, files and dm layers, built
  and torn down;
* :mod:`dmsnap.storage.pending`: every kernel change bracketed by a pending
  record in the catalog, rolled forward or back after a crash;
* :mod:`dmsnap.storage.assembly`: every pool brought up at a start;
* :mod:`dmsnap.storage.journals`: the pools' running journals, repaired;
* :mod:`dmsnap.storage.policy`: a pool's policy (``pool set``, autoextend);
* :mod:`dmsnap.storage.snapshots`: a snapshot request, the cut, the wait;
* :mod:`dmsnap.storage.views`: the JSON answers;
* :mod:`dmsnap.storage.volume_io`: a journaled volume's data path;
* :mod:`dmsnap.storage.exports` (``self.exports``): SCSI exports, through a
  narrow interface to this class; :mod:`dmsnap.storage.inband`, the in-band
  snapshot command, through its public methods only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any

from dmsnap import errors as E
from dmsnap import rules
from dmsnap.dm import DeviceMapper, DmUnavailable
from dmsnap.journal.service import PoolJournal
from dmsnap.rules import MiB
from dmsnap.scsi import DEFAULT_WORKER_NICE
from dmsnap.storage import devices, names
from dmsnap.storage._common import Json, locked, locked_user_errors, user_errors
from dmsnap.storage.assembly import Assembly
from dmsnap.storage.catalog import Catalog, Pool, Snapshot
from dmsnap.storage.catalog import NotFound as CatNotFound
from dmsnap.storage.exports import Exports
from dmsnap.storage.identity import PoolDisks
from dmsnap.storage.inband import RequestView
from dmsnap.storage.journals import PoolJournals, dm_path
from dmsnap.storage.layers import ensure
from dmsnap.storage.pending import PendingOps
from dmsnap.storage.policy import PoolPolicy
from dmsnap.storage.snapshots import SnapshotCuts, WaitFor
from dmsnap.storage.stack import PoolStack
from dmsnap.storage.views import Views, link
from dmsnap.storage.volume_io import VolumeIO

log = logging.getLogger("dmsnap.storage")

# A stop drains an NV journal while its flusher makes progress, and gives up
# after this long without any (a failing disk): what is left stays durable in
# the journal. A RAM journal always drains: its records are nowhere else.
NV_STOP_STALL_S = 10.0


class Manager:
    def __init__(
        self,
        state_dir: str,
        dm: DeviceMapper | None = None,
        *,
        worker_nice: int = DEFAULT_WORKER_NICE,
    ) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.worker_nice = worker_nice  # exports' fast-path threads (dmsnapd --worker-nice)
        os.makedirs(os.path.join(self.state_dir, "pools"), mode=0o700, exist_ok=True)
        devices.check_private_dir(self.state_dir)
        devices.check_private_dir(os.path.join(self.state_dir, "pools"))
        catalog_path = os.path.join(self.state_dir, "catalog.db")
        self.catalog = Catalog(catalog_path)
        os.chmod(catalog_path, 0o600)  # whatever the umask: paths of disks we write
        try:
            self.dm = dm or DeviceMapper()
        except DmUnavailable as e:
            raise E.Unavailable(str(e)) from None
        self.pool_errors: dict[str, str] = {}  # pool name -> why it is not assembled
        # The one control lock (docs/design.md, "Locks"): every public
        # operation takes it itself, for as long as it reads or changes the
        # catalog, the dm control fd or LIO, and every marker's snapshot is
        # made under it. Callers (server, SCSI target) never wrap calls in
        # it. Nothing waits for a snapshot under it: a --wait snapshot
        # releases it first. Re-entrant: a thread that holds it and must wait
        # for the flusher (a delete, a restore, a drain) serves markers
        # itself. The data path (read/write) never takes it.
        self.lock = threading.RLock()
        # O_EXCL descriptors on the journal devices of running journals
        # (docs/storage.md: nothing else may claim them meanwhile).
        self._holds = devices.Holds()
        # which disk is which pool's: the dmsnap labels (identity.py)
        self._disks = PoolDisks(self.catalog, self._holds, self.state_dir)
        self.stack = PoolStack(self.dm, self.catalog, self._disks, self.state_dir)
        self.pending = PendingOps(self.catalog, self.stack)
        self.journals = PoolJournals(
            self.dm,
            self.catalog,
            self._disks,
            self._holds,
            self.lock,
            lambda pid, mid, req: self._materialize(pid, mid, req),
            self.pool_errors,
            self.stack.backends,
        )
        self.assembly = Assembly(
            self.dm, self.catalog, self.stack, self.pending, self.journals, self.pool_errors
        )
        self.policy = PoolPolicy(self.catalog, self.stack, self.journals, self.pool_errors)
        self.views = Views(self.dm, self.catalog, self.stack, self.journals, self.pool_errors)
        # Set when the daemon stops: requests waiting for a snapshot answer.
        self._interrupted = threading.Event()
        self.snapshots = SnapshotCuts(
            self.catalog,
            self.stack,
            self.journals,
            self.pending,
            self.views,
            self.lock,
            self._interrupted,
        )
        self.exports = Exports(self)

    def interrupt_waits(self) -> None:
        """Make every request waiting for a snapshot answer now (daemon stop).
        Takes no lock: safe from a signal handler."""
        self._interrupted.set()

    def close(self, *, drain: bool = True) -> None:
        """Stop the journals (with drain: every record onto its dm device
        first), then let go of the catalog and the control device."""
        self.interrupt_waits()
        with self.lock:
            self.exports.stop_all(keep=True)
            # A stalled NV pool must not hold the stop: its records are
            # durable in the journal and replayed at the next start.
            self.journals.stop_all(drain=drain, stall=NV_STOP_STALL_S)
            self._holds.release_all()
            self.catalog.close()
            self.dm.close()

    # -- assembly ---------------------------------------------------------------------------

    @locked
    def assemble(self) -> Json:
        """Bring every pool, volume and active snapshot up as the catalog says,
        settle what a crash interrupted, start the journals, then the
        exports. Idempotent: existing devices are checked and kept."""
        report = self.assembly.run()
        self.exports.start_all(skip=set(self.pool_errors))
        return report

    # -- pools ------------------------------------------------------------------------------

    @locked_user_errors
    def pool_create(
        self,
        name: str,
        *,
        data: str | None = None,
        cache: str | None = None,
        backend: str = rules.DEFAULT_BACKEND,
        size: int | None = None,
        cache_size: int | None = None,
        journal: str | None = None,
        journal_size: int | None = None,
        journal_mode: str = rules.DEFAULT_JOURNAL_MODE,
        journal_memory: int | None = None,
        sparse: bool = False,
        metadata_size: int | None = None,
    ) -> Json:
        """``metadata_size``: a thin pool's metadata device (default: sized
        from the pool, ~64 bytes per 64 KiB block, at least 8 MiB).
        ``sparse``: create an embedded pool's loop files even if the host
        file system cannot hold them (they are sparse either way; the journal
        file is always reserved). ``journal_memory``: RAM an NV journal's
        unflushed records may take (default ``Journal.MEM_DEFAULT``)."""
        names.check_name("pool", name)
        new = self.stack.plan(
            name,
            data=data,
            cache=cache,
            backend=backend,
            size=size,
            cache_size=cache_size,
            journal=journal,
            journal_size=journal_size,
            journal_mode=journal_mode,
            journal_memory=journal_memory,
            sparse=sparse,
            metadata_size=metadata_size,
        )
        with self.stack.creating(new) as pool:
            self.journals.start(pool)
        log.info("pool %s created (%s, %d MiB)", name, new.backend, new.data_bytes // MiB)
        return self.pool_show(name)

    @locked_user_errors
    def pool_set(
        self,
        name: str,
        *,
        cow_autoextend_threshold: int | None = None,
        cow_autoextend_percent: int | None = None,
        journal_memory: int | None = None,
    ) -> Json:
        """Change a pool's policy: COW autoextend (threshold 100: off), for
        a backend whose snapshots have COW areas of their own; the RAM its
        NV journal's unflushed records may take, at once."""
        changes = self.policy.set(
            self.catalog.pool(names.check_name("pool", name)),
            cow_autoextend_threshold=cow_autoextend_threshold,
            cow_autoextend_percent=cow_autoextend_percent,
            journal_memory=journal_memory,
        )
        log.info("pool %s: %s", name, ", ".join(f"{k}={v}" for k, v in sorted(changes.items())))
        return self.pool_show(name)

    @locked_user_errors
    def pool_extend_metadata(self, name: str, size: int) -> Json:
        """Give a thin pool ``size`` more metadata: a new file in the pool's
        state directory (reserved, so the host file system cannot fail it),
        appended to the metadata device. dm-thin grows its metadata when the
        pool resumes and leaves out-of-metadata-space mode; writes the
        journal held land, new writes and snapshots are taken again. Works
        for every thin pool (the data device is used to its end, so the
        extension cannot go there). A pool whose metadata needs check is
        refused: dm-thin will not grow it before thin_check/thin_repair."""
        p, backend = self.stack.pool(names.check_name("pool", name))
        pj = self.journals.by_pool.get(p.id)
        if pj is not None:
            # A pool that went read-only since the journal's last look must be
            # seen so before the resume makes it writable: that look rewinds
            # the journal to what was confirmed, which the pool may have lost.
            pj.check_space()
        path = self.stack.extend_metadata(p, backend, size)
        log.info("pool %s: thin metadata extended by %d MiB (%s)", name, size // MiB, path)
        if pj is not None:
            pj.check_space()  # take writes again now, not at the marker thread's next look
        return self.pool_show(name)

    @locked
    def autoextend(self) -> None:
        """Grow COW areas that passed their pool's threshold (the daemon
        calls this every second). Logs each growth, and once per snapshot
        that it cannot grow."""
        self.policy.autoextend()

    @locked_user_errors
    def pool_list(self) -> list[Json]:
        return [self.views.pool(p) for p in self.catalog.pools()]

    @locked_user_errors
    def pool_show(self, name: str) -> Json:
        names.check_name("pool", name)
        pool = self.catalog.pool(name)
        out = self.views.pool(pool, detail=True)
        out["devices"] = sorted(self.stack.pool_devices(pool.name, pool.uuid[:8]))
        # which of its disks carry a dmsnap label (None: embedded, or made before labels)
        out["labels"] = pool.config.get("labels")
        return out

    @locked_user_errors
    def pool_repair(self, name: str, discard_after: int) -> Json:
        """The way forward when a pool's journal is damaged in the middle
        (its assembly was refused, naming the record): drop record
        ``discard_after`` and every later one (``Journal.repair``), then
        start the pool's journal and exports."""
        pool = self.catalog.pool(names.check_name("pool", name))
        dropped = self.journals.repair(pool, discard_after)
        state = self.assembly.restart(pool)
        if state == "ok":
            self.exports.start_all(name)
        return {"pool": name, "dropped": dropped, "state": state}

    @locked_user_errors
    def pool_destroy(self, name: str, *, force: bool = False) -> None:
        names.check_name("pool", name)
        pool = self.catalog.pool(name)
        vols = self.catalog.volumes(name)
        if vols and not force:
            raise E.Busy(f"pool {name} still has {len(vols)} volume(s); delete them or use --force")
        self.exports.remove_pool(name, force=force)
        # the journal holds its volumes open; it stops (abandoned) below
        held = {names.dm_volume(name, v.name) for v in vols} if self.journal_of(pool) else set()
        devs = self.stack.check_unused(pool, held)
        self.journals.abandon(pool)
        self.stack.destroy(pool, devs)
        self.pool_errors.pop(name, None)
        log.info("pool %s destroyed", name)

    # -- volumes -------------------------------------------------------------------------------

    @locked_user_errors
    def volume_create(self, pool: str, vol: str, size: int) -> Json:
        names.check_volume_ref(pool, vol)  # and every kernel name made from it fits
        if size <= 0:
            raise E.InvalidArgument("volume size must be positive")
        size = (size + MiB - 1) // MiB * MiB  # whole MiB: extent and block aligned
        p, backend = self.stack.pool(pool)
        with contextlib.suppress(CatNotFound):
            self.catalog.volume(pool, vol)
            raise E.AlreadyExists(f"volume {pool}/{vol} already exists")
        backend.check_volume_room(f"volume {pool}/{vol}", size)
        v = self.pending.create_volume(p, backend, vol, size)
        pj = self.journal_of(p)
        if pj is not None:
            pj.attach(v.id, dm_path(pool, vol), v.size)
        log.info("volume %s/%s created (%d MiB)", pool, vol, size // MiB)
        return self.views.volume(v)

    @locked_user_errors
    def volume_list(self, pool: str | None = None) -> list[Json]:
        if pool is not None:
            names.check_name("pool", pool)
        return [self.views.volume(v) for v in self.catalog.volumes(pool)]

    @locked_user_errors
    def volume_show(self, pool: str, vol: str) -> Json:
        names.check_name("pool", pool)
        names.check_name("volume", vol)
        return self.views.volume(self.catalog.volume(pool, vol))

    @locked_user_errors
    def volume_delete(self, pool: str, vol: str, *, force: bool = False) -> None:
        names.check_name("pool", pool)
        names.check_name("volume", vol)
        v = self.catalog.volume(pool, vol)
        p, backend = self.stack.pool(pool)
        self.exports.check_not_exported(pool, vol)
        snaps = self.catalog.snapshots(pool, vol)
        if snaps and not force:
            raise E.Busy(
                f"volume {pool}/{vol} has {len(snaps)} snapshot(s); "
                "delete them first or use --force"
            )
        for s in snaps:
            self.stack.check_not_open(
                names.dm_snapshot(pool, vol, s.name), f"snapshot {vol}@{s.name}"
            )
        with self.journals.detached(p, v):
            self.stack.check_not_open(names.dm_volume(pool, vol), f"volume {pool}/{vol}")
            for s in snaps:
                self.snapshot_delete(pool, vol, s.name)
            self.pending.delete_volume(p, backend, v)
        pj = self.journals.by_pool.get(p.id)
        if pj is not None:
            pj.forget(v.id)
        log.info("volume %s/%s deleted", pool, vol)

    # -- snapshots ---------------------------------------------------------------------------

    def snapshot_state(self, s: Snapshot) -> str:
        """ "valid", or why the snapshot cannot be trusted (classic:
        "invalid" once its COW area overflowed; "missing"; "inactive" when
        its pool is not assembled)."""
        return self.views.snapshot_state(s)

    def check_snapshot_valid(self, s: Snapshot) -> None:
        """Refuse to show an invalid snapshot's content as if it were one."""
        self.views.check_valid(s)

    @user_errors
    def snapshot_create(
        self,
        refs: list[list[str]] | list[tuple[str, str]],
        name: str,
        *,
        labels: dict[str, str] | None = None,
        token: str | None = None,
        wait: bool = False,
        timeout: float = 60.0,
        cow_size: int | None = None,
    ) -> Json:
        """One snapshot group of ``refs`` (volumes of one pool). ``cow_size``:
        each member's COW area (classic; default the pool's fraction of the
        volume), which autoextend grows from there.

        Journaled pool: a MARKER goes into the journal and this returns once
        it is durable (state "pending"); the flusher makes the snapshot when
        it gets there. With ``wait`` (always, for a RAM journal) it returns
        once the snapshot exists, having waited without the control lock.
        Direct pool: suspend, snapshot, resume."""
        with self.lock:
            r = self.snapshots.submit(
                refs, name, labels=labels, token=token, wait=wait, cow_size=cow_size
            )
        if not isinstance(r, WaitFor):
            return r
        return {**self.snapshots.wait(r.pj, r.marker, timeout), **r.extra}

    def _materialize(self, pool_id: int, marker_id: int, request: Json) -> Json:
        """What a pool's journal does at a marker (SnapshotCuts.materialize)."""
        return self.snapshots.materialize(pool_id, marker_id, request)

    @locked_user_errors
    def snapshot_request(
        self, pool: str, *, marker: int | None = None, token: str | None = None
    ) -> Json:
        """Where a journaled snapshot request stands (by marker id or token)."""
        p = self.catalog.pool(names.check_name("pool", pool))
        return self.views.request(p, marker=marker, token=token)

    @locked_user_errors
    def request_view(self, pool: str, vol: str, *, token: str | None = None) -> RequestView:
        """The pool's snapshot requests as the in-band command sees them from
        POOL/VOL's export, in one consistent read (:mod:`dmsnap.storage.inband`);
        with ``token``, only the latest request carrying it."""
        return self.views.request_view(pool, vol, token, self.exports.visible(pool, vol))

    @locked_user_errors
    def snapshot_list(self, pool: str | None = None, vol: str | None = None) -> list[Json]:
        if pool is not None:
            names.check_name("pool", pool)
        if vol is not None:
            names.check_name("volume", vol)
        return [self.views.snapshot(s) for s in self.catalog.snapshots(pool, vol)]

    def _snap(self, pool: str, vol: str, name: str) -> Snapshot:
        names.check_name("pool", pool)
        names.check_name("volume", vol)
        names.check_name("snapshot", name)
        return self.catalog.snapshot(pool, vol, name)

    @locked_user_errors
    def snapshot_activate(self, pool: str, vol: str, name: str) -> Json:
        s = self._snap(pool, vol, name)
        _, backend = self.stack.pool(pool)
        self.check_snapshot_valid(s)
        for layer in backend.snapshot_layers(s, active=True):
            ensure(self.dm, layer)
        self.catalog.set_snapshot_active(s.id, True)
        return self.views.snapshot(self.catalog.snapshot(pool, vol, name))

    @locked_user_errors
    def snapshot_deactivate(self, pool: str, vol: str, name: str) -> None:
        s = self._snap(pool, vol, name)
        self.exports.check_not_exported(pool, vol, name)
        dm_name = names.dm_snapshot(pool, vol, name)
        self.stack.check_not_open(dm_name, f"snapshot {pool}/{vol}@{name}")
        self.stack.remove(dm_name)
        self.catalog.set_snapshot_active(s.id, False)

    @locked_user_errors
    def snapshot_delete(self, pool: str, vol: str, name: str) -> None:
        s = self._snap(pool, vol, name)
        self.exports.check_not_exported(pool, vol, name)
        p, backend = self.stack.pool(pool)
        dm_name = names.dm_snapshot(pool, vol, name)
        self.stack.check_not_open(dm_name, f"snapshot {pool}/{vol}@{name}")
        self.pending.delete_snapshot(p, backend, s)
        log.info("snapshot %s/%s@%s deleted", pool, vol, name)

    @locked_user_errors
    def snapshot_restore(self, pool: str, vol: str, name: str) -> None:
        s = self._snap(pool, vol, name)
        v = self.catalog.volume(pool, vol)
        p, backend = self.stack.pool(pool)
        self.exports.check_not_exported(pool, vol)
        # Markers requested before the restore are made from the volume as
        # it was; writes arriving meanwhile fail (ENXIO) until it is back.
        with self.journals.detached(p, v, markers_first=True):
            self.stack.check_not_open(names.dm_volume(pool, vol), f"volume {pool}/{vol}")
            if backend.restores_in_place:  # the snapshot is merged away
                self.stack.check_not_open(
                    names.dm_snapshot(pool, vol, name), f"snapshot {vol}@{name}"
                )
            self.pending.restore(p, backend, v, s)
        log.info("volume %s/%s restored from %s", pool, vol, name)

    # -- the data path: a local writer's way to a journaled volume -------------------------------
    #
    # No control lock beyond finding the volume: a write must never wait
    # for a control operation (dmsnap.storage.volume_io).

    def open_volume(self, pool: str, vol: str) -> VolumeIO:
        with self.lock:
            p = self.catalog.pool(names.check_name("pool", pool))
            v = self.catalog.volume(pool, names.check_name("volume", vol))
            pj = self.journal_of(p)
            if pj is None:
                raise E.InvalidArgument(
                    f"pool {pool} has no journal; write to {link(pool, vol)} directly"
                )
            return VolumeIO(pj, v.id, v.size, f"{pool}/{vol}")

    @user_errors
    def volume_write(
        self, pool: str, vol: str, offset: int, content: bytes, *, fua: bool = False
    ) -> Json:
        seq = self.open_volume(pool, vol).write(offset, content, fua=fua)
        return {"written": len(content), "seq": seq}

    @user_errors
    def volume_read(self, pool: str, vol: str, offset: int, length: int) -> bytes:
        return self.open_volume(pool, vol).read(offset, length)

    @user_errors
    def volume_discard(self, pool: str, vol: str, offset: int = 0, size: int | None = None) -> Json:
        """The range (default: from offset to the end) reads zeros from now
        on, in order with the writes and snapshots around it; thin space
        goes back once the flusher gets there (docs/journal.md)."""
        io = self.open_volume(pool, vol)
        size = io.to_end(offset) if size is None else size
        seq = io.discard(offset, size)
        return {"discarded": size, "offset": offset, "seq": seq}

    @user_errors
    def volume_flush(self, pool: str, vol: str) -> None:
        self.open_volume(pool, vol).flush()

    # -- exports (dmsnap.storage.exports) -----------------------------------------------------

    def export_create(self, pool: str, vol: str, **kw: Any) -> Json:
        return self.exports.create(pool, vol, **kw)

    def export_update(self, pool: str, vol: str, **kw: Any) -> Json:
        return self.exports.update(pool, vol, **kw)

    def export_list(self, pool: str | None = None) -> list[Json]:
        return self.exports.list(pool)

    def export_delete(self, pool: str, vol: str, *, snap: str | None = None) -> None:
        self.exports.delete(pool, vol, snap=snap)

    # -- what the exports use of the core (exports.StorageCore) -----------------------------------

    def journal_of(self, pool: Pool) -> PoolJournal | None:
        """The pool's running journal; None for a pool without one."""
        return self.journals.of(pool)

    @staticmethod
    def link(pool: str, vol: str, snap: str | None = None) -> str:
        return link(pool, vol, snap)

    def unmap_granularity(self, pool: Pool) -> int | None:
        return self.stack.backend(pool).unmap_granularity()

    # -- status ----------------------------------------------------------------------------------

    @locked_user_errors
    def status(self) -> Json:
        return self.views.status()

    @locked
    def health(self) -> list[str]:
        """One line per problem, naming its pool (what the daemon logs on dm
        events; the same lines as ``status()["health"]``, without the cost
        of querying every volume)."""
        return self.views.health([self.views.pool(p) for p in self.catalog.pools()])

    @locked
    def teardown(self) -> None:
        """Deactivate every device of every pool (not done on a plain stop);
        exports are taken down, journals drained onto their volumes first."""
        self.exports.stop_all(keep=False)
        self.journals.stop_all(drain=True)
        for pool in self.catalog.pools():
            self.stack.teardown(pool)
        self.stack.backends.clear()
