"""The storage model an administrator uses: pools, volumes, snapshots.

:class:`Manager` is the only actor on the device-mapper stack. dmsnapd owns
one and serialises calls to it; the control protocol maps requests 1:1 onto
its public methods. A method either completes or raises a
:class:`dmsnap.errors.UserError`; user errors are raised before anything is
changed. Results are plain JSON-able dicts (the wire format and ``--json``).

Every kernel change is bracketed by a pending record in the catalog (see
:mod:`dmsnap.storage.catalog`); :meth:`Manager.assemble` settles leftovers.
The export operations (SCSI, through LIO) are in :mod:`dmsnap.storage.exports`.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import mmap
import os
import shutil
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any

from dmsnap import errors as E
from dmsnap.dm import DeviceMapper, DmError, DmUnavailable
from dmsnap.dm import status as st
from dmsnap.dm import targets as t
from dmsnap.dm.targets import Table
from dmsnap.dm.udev import LINK_DIR
from dmsnap.journal.journal import Journal, JournalCorrupt, JournalError
from dmsnap.journal.service import PoolJournal, status_json
from dmsnap.scsi import DEFAULT_WORKER_NICE
from dmsnap.storage import devices, label, loop, names
from dmsnap.storage._common import (
    Json,
    _errors_to_user,
    _journal_error,
    _locked,
    _user_errors,
)
from dmsnap.storage.backend import Backend, Base, journal_mode, planned_dev_ids
from dmsnap.storage.catalog import Catalog, Pool, Snapshot, Volume
from dmsnap.storage.catalog import Exists as CatExists
from dmsnap.storage.catalog import NotFound as CatNotFound
from dmsnap.storage.classic import ClassicBackend
from dmsnap.storage.exports import ExportsMixin, export_paths, snapshot_rights  # noqa: F401

# export_paths, snapshot_rights: moved to exports.py, still importable from here
from dmsnap.storage.identity import PoolDisks
from dmsnap.storage.layers import SECTOR, Layer, ensure
from dmsnap.storage.thin import MAX_METADATA, ThinBackend, check_metadata_size

log = logging.getLogger("dmsnap.storage")

MiB = 1 << 20
GiB = 1 << 30
DEFAULT_EMBEDDED_SIZE = 4 * GiB
WRITECACHE_BLOCK = 4096
JOURNAL_MODES = ("nv", "ram", "none")
DEFAULT_JOURNAL_SIZE = 64 * MiB
MIN_JOURNAL_SIZE = 4 * MiB
# A stop drains an NV journal while its flusher makes progress, and gives up
# after this long without any (a failing disk): what is left stays durable in
# the journal. A RAM journal always drains: its records are nowhere else.
NV_STOP_STALL_S = 10.0
BACKENDS: dict[str, type[Backend]] = {"thin": ThinBackend, "classic": ClassicBackend}


def _check_journal_memory(memory: int | None, mode: str) -> None:
    """A journal memory setting is for an NV journal (a RAM journal's memory
    is its size) and holds at least two of the largest writes."""
    if memory is None:
        return
    if mode != "nv":
        raise E.InvalidArgument(
            "--journal-memory is for an NV journal (a RAM journal's memory is --journal-size)"
        )
    if memory < Journal.MEM_MIN:
        raise E.InvalidArgument(f"--journal-memory must be at least {Journal.MEM_MIN // MiB}M")


def _check_free_device(path: str, what: str) -> tuple[str, int]:
    """A device given by the administrator: must exist, be a block device, and
    not be in use (O_EXCL fails while mounted or held by another device)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise E.NotFound(f"{what} device {path} does not exist") from None
    if not stat.S_ISBLK(mode):
        raise E.InvalidArgument(f"{what} device {path} is not a block device")
    fd = devices.open_exclusive(path, what)
    try:
        return devices.devno(os.fstat(fd).st_rdev), os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _reserve(path: str, length: int) -> None:
    """Allocate a file's blocks now (a journal file must never meet a full
    file system on a write it is about to acknowledge)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, length)
    except OSError as e:
        raise E.NoSpace(f"cannot reserve {length // MiB} MiB for {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _zero(path: str, length: int, offset: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        os.pwritev(fd, [mmap.mmap(-1, length)], offset)
        os.fsync(fd)
    finally:
        os.close(fd)


class Manager(ExportsMixin):
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
        self._backends: dict[int, Backend] = {}
        self._journals: dict[int, PoolJournal] = {}
        self._exports: dict[int, Any] = {}  # export id -> dmsnap.scsi.target.Running
        self.pool_errors: dict[str, str] = {}
        self.export_errors: dict[int, str] = {}
        self._cannot_grow: set[str] = set()  # COW areas logged as not growable
        # The one control lock (docs/design-locking in docs/journal.md): every
        # public operation takes it itself, for as long as it reads or changes
        # the catalog, the dm control fd or LIO, and every marker's snapshot
        # is made under it. Callers (server, SCSI target) never wrap calls in
        # it. Nothing waits for a snapshot under it: a --wait snapshot
        # releases it first. Re-entrant: a thread that holds it and must wait
        # for the flusher (a delete, a restore, a drain) serves markers
        # itself. The data path (read/write) never takes it.
        # O_EXCL descriptors on the journal devices of running journals
        # (docs/storage.md: nothing else may claim them meanwhile).
        self._holds = devices.Holds()
        # which disk is which pool's: the dmsnap labels (identity.py)
        self._disks = PoolDisks(self.catalog, self._holds, self.state_dir)
        self.lock = threading.RLock()
        # Set when the daemon stops: requests waiting for a snapshot answer.
        self._interrupted = threading.Event()

    def interrupt_waits(self) -> None:
        """Make every request waiting for a snapshot answer now (daemon stop).
        Takes no lock: safe from a signal handler."""
        self._interrupted.set()

    def close(self, *, drain: bool = True) -> None:
        """Stop the journals (with drain: every record onto its dm device
        first), then let go of the catalog and the control device."""
        self.interrupt_waits()
        with self.lock:
            for eid in list(self._exports):
                self._stop_export(eid, keep=True)
            for pid in list(self._journals):
                # A stalled NV pool must not hold the stop: its records are
                # durable in the journal and replayed at the next start.
                self._stop_journal(pid, drain=drain, stall=NV_STOP_STALL_S)
            self._holds.release_all()
            self.catalog.close()
            self.dm.close()

    # -- pool plumbing -----------------------------------------------------------------

    def _pool_dir(self, name: str) -> str:
        return os.path.join(self.state_dir, "pools", name)

    def _embedded_files(self, name: str) -> tuple[str, str]:
        d = self._pool_dir(name)
        return os.path.join(d, "data.img"), os.path.join(d, "cache.img")

    def _meta_ext_file(self, name: str, n: int) -> str:
        """The ``n``-th (from 1) metadata extension of a thin pool."""
        return os.path.join(self._pool_dir(name), f"metadata-{n}.img")

    def _detach_loops(self, name: str) -> None:
        """Detach the loop devices of a pool's files (embedded data and
        cache, metadata extensions), if attached."""
        exts = sorted(glob.glob(os.path.join(glob.escape(self._pool_dir(name)), "metadata-*.img")))
        for f in [*self._embedded_files(name), *exts]:
            dev = loop.find(f)
            if dev:
                loop.detach(dev)

    def _loop_for(self, path: str) -> loop.LoopDevice:
        return loop.find(path) or loop.attach(path)

    def _devices(self, pool: Pool) -> tuple[tuple[str, str], tuple[str, str] | None]:
        """(MAJ:MIN, path) of the data and cache devices, attaching loop files
        as needed."""
        data_file, cache_file = self._embedded_files(pool.name)
        if pool.embedded:
            lo = self._loop_for(data_file)
            data = (lo.devno, lo.path)
        else:
            assert pool.data_dev is not None
            data = self._disks.identify(pool, "data", pool.data_dev)
        cache = None
        if pool.cache_dev:
            cache = self._disks.identify(pool, "cache", pool.cache_dev)
        elif pool.cache_size:
            lo = self._loop_for(cache_file)
            cache = (lo.devno, lo.path)
        return data, cache

    def _recorded_devices(self, pool: Pool) -> dict[str, str]:
        """role -> path of the block devices a pool writes (an embedded
        pool's loop devices while attached; a journal device, not file)."""
        out: dict[str, str] = {}
        data_file, cache_file = self._embedded_files(pool.name)
        if pool.data_dev:
            out["data"] = pool.data_dev
        elif lo := loop.find(data_file):
            out["data"] = lo.path
        if pool.cache_dev:
            out["cache"] = pool.cache_dev
        elif pool.cache_size and (lo := loop.find(cache_file)):
            out["cache"] = lo.path
        jcfg = pool.config.get("journal", {})
        if jcfg.get("mode") == "nv" and not jcfg.get("embedded") and jcfg.get("path"):
            out["journal"] = jcfg["path"]
        return out

    def _check_unowned(self, given: dict[str, str | None]) -> None:
        """Refuse devices that are one another or another pool's, by device
        number: a symlink or a /dev/disk/by-id name is the same disk."""
        ids: dict[int, tuple[str, str]] = {}
        for role, path in given.items():
            rdev = devices.rdev_of(path) if path else None
            if path is None or rdev is None:
                continue  # missing or not a block device: _check_free_device says so
            if rdev in ids:
                raise E.InvalidArgument(
                    f"the {ids[rdev][0]} device {ids[rdev][1]} and the {role} device {path} "
                    "are the same device; they must all differ"
                )
            ids[rdev] = (role, path)
        for p in self.catalog.pools():
            for role, path in self._recorded_devices(p).items():
                rdev = devices.rdev_of(path)
                if rdev in ids:
                    raise E.Busy(
                        f"device {ids[rdev][1]} is {path}, the {role} device of pool {p.name}"
                    )

    def _wc_layer(self, pool: Pool, data: str, cache: str) -> Layer:
        name, uuid = (
            names.dm_internal(pool.name, "wc"),
            names.uuid_internal(pool.uuid, pool.name, "wc"),
        )
        return Layer(
            name,
            uuid,
            Table.single(
                pool.size // SECTOR,
                t.Writecache(
                    "s",
                    data,
                    cache,
                    WRITECACHE_BLOCK,
                    start_sector=label.CACHE_START_SECTORS
                    if self._disks.labelled(pool, "cache")
                    else None,
                ),
            ),
        )

    def _base(self, pool: Pool) -> Base:
        data, cache = self._devices(pool)
        if cache is None:
            return Base(data[0], pool.size // SECTOR, data[1])
        layer = self._wc_layer(pool, data[0], cache[0])
        return Base(ensure(self.dm, layer), pool.size // SECTOR, layer.path)

    def _backend(self, pool: Pool) -> Backend:
        b = self._backends.get(pool.id)
        if b is None:
            b = BACKENDS[pool.backend](self.dm, self.catalog, pool, self._base(pool))
            if isinstance(b, ThinBackend):
                b.meta_ext_devnos = [
                    self._loop_for(self._meta_ext_file(pool.name, i)).devno
                    for i in range(1, len(b.meta_ext_sectors) + 1)
                ]
            for layer in b.pool_layers():
                ensure(self.dm, layer)
            self._backends[pool.id] = b
        b.refresh()
        return b

    def _pool(self, name: str) -> tuple[Pool, Backend]:
        pool = self.catalog.pool(name)
        try:
            return pool, self._backend(pool)
        except E.UserError:
            raise
        except (DmError, OSError) as e:
            raise E.Unavailable(f"pool {name} cannot be activated: {e}") from None

    def _pool_devices(self, name: str, short_id: str | None = None) -> list[str]:
        """Every dm device of pool ``name`` (of the pool with ``short_id``,
        when given), found by its UUID."""
        out = []
        for e in self.dm.list_devices():
            parts = names.parse_uuid(e.uuid)
            if parts and parts[2] == name and short_id in (None, parts[1]):
                out.append(e.name)
        return out

    def _teardown_devices(self, devs: list[str]) -> None:
        """Remove devices top-down: repeatedly those nothing holds."""
        left = list(devs)
        while left:
            progress = False
            for name in list(left):
                try:
                    info = self.dm.info(name)
                except DmError as e:
                    if e.not_found:
                        left.remove(name)
                        progress = True
                        continue
                    raise
                if info.open_count == 0:
                    self.dm.remove(name)
                    left.remove(name)
                    progress = True
            if not progress:
                raise E.Busy(f"devices still in use: {', '.join(sorted(left))}")

    def _open_count(self, dm_name: str, grace: float = 2.0) -> int:
        """Open count, allowing ``grace`` seconds for transient openers: udev
        re-probes (blkid) a device right after a resume or a writer's close."""
        deadline = time.monotonic() + grace
        while True:
            try:
                count = self.dm.info(dm_name).open_count
            except DmError as e:
                if e.not_found:
                    return 0
                raise
            if count == 0 or time.monotonic() >= deadline:
                return count
            time.sleep(0.05)

    def _check_not_open(self, dm_name: str, what: str) -> None:
        count = self._open_count(dm_name)
        if count:
            raise E.Busy(f"{what} is in use (open {count} time(s)); unmount or stop using it first")

    # -- journals --------------------------------------------------------------------------

    def _start_journal(self, pool: Pool) -> None:
        mode = journal_mode(pool)
        if mode == "none" or pool.id in self._journals:
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

        def space_probe() -> str | None:
            # the marker thread's, without the lock: the backend as assembled
            b = self._backends.get(pid)
            return b.no_space_reason() if isinstance(b, ThinBackend) else None

        pj = PoolJournal(
            pool.name,
            j,
            mode,
            lambda mid, req: self._materialize(pid, mid, req),
            self.lock,
            space_probe=space_probe,
        )
        vols = {
            v.id: (self._dm_path(pool.name, v.name), v.size)
            for v in self.catalog.volumes(pool.name)
        }
        try:
            pj.start(vols)
        except BaseException:
            j.close(drain=False)
            pj.release_all()
            self._holds.release(hold)
            raise
        self._journals[pid] = pj
        if mode == "ram":  # a RAM journal starts empty: earlier requests are gone
            for mk in self.catalog.markers(pid, "pending"):
                self.catalog.finish_marker(
                    mk.id, error="lost: dmsnapd stopped before the flusher reached it (RAM journal)"
                )
        elif stale := [mk.id for mk in self.catalog.markers(pid, "pending")]:
            # A request recorded in the catalog whose marker never became
            # durable (a crash between the two) was never acknowledged; once
            # the replay has served every recovered marker, say so.
            def settle() -> None:
                for mid in stale:
                    mk = self.catalog.marker(mid)
                    if mk is not None and mk.state == "pending":
                        self.catalog.finish_marker(
                            mid, error="lost: dmsnapd stopped before the request was durable"
                        )
                        log.warning("pool %s: snapshot request %d was lost", pool.name, mid)

            pj.when_replayed(settle)

    def _stop_journal(
        self, pool_id: int, *, drain: bool = True, stall: float | None = None
    ) -> None:
        pj = self._journals.pop(pool_id, None)
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

    def _journal(self, pool: Pool) -> PoolJournal | None:
        if journal_mode(pool) == "none":
            return None
        pj = self._journals.get(pool.id)
        if pj is None:
            raise E.Unavailable(
                f"pool {pool.name}: its journal is not running"
                + (f" ({self.pool_errors[pool.name]})" if pool.name in self.pool_errors else "")
            )
        return pj

    @staticmethod
    def _dm_path(pool: str, vol: str) -> str:
        return f"/dev/mapper/{names.dm_volume(pool, vol)}"

    def _materialize(self, pool_id: int, marker_id: int, request: Json) -> Json:
        """The flusher stands at a marker: every earlier write is on the dm
        devices and synced. Make the snapshot group, exactly once per marker
        (a replay after a crash delivers it again)."""
        mk = self.catalog.marker(marker_id)
        if mk is None or mk.pool_id != pool_id:
            raise E.NotFound(f"marker {marker_id} is not in the catalog; no snapshot made")
        if mk.state == "done":
            return self._group_json(mk.group_id)
        if mk.state == "failed":
            raise E.UserError(f"snapshot {mk.name} failed earlier: {mk.error}")
        try:
            pool = self.catalog.pool_by_id(pool_id)
            backend = self._backend(pool)
            vols = {v.id: v for v in self.catalog.volumes(pool.name)}
            members = [vols[i] for i in request["volumes"] if i in vols]
            if not members:
                raise E.NotFound("its volumes were deleted before the flusher reached it")
            for m in members:
                with contextlib.suppress(CatNotFound):
                    self.catalog.snapshot(pool.name, m.name, mk.name)
                    raise E.AlreadyExists(f"snapshot {pool.name}/{m.name}@{mk.name} exists")
            gid = self._snapshot_group(pool, backend, members, mk.name, request, marker_id)
        except Exception as e:
            self.catalog.finish_marker(marker_id, error=getattr(e, "message", None) or str(e))
            raise
        return self._group_json(gid)

    def _group_json(self, gid: int | None) -> Json:
        snaps = [s for s in self.catalog.snapshots() if s.group_id == gid]
        return {
            "group": gid,
            "name": snaps[0].name if snaps else None,
            "state": "done",
            "snapshots": [self._snapshot_json(s) for s in snaps],
        }

    # -- pending operations ---------------------------------------------------------------

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

    def _forward(self, pool: Pool, kind: str, payload: Json, pending_id: int) -> Any:
        """Apply the catalog side of a kernel change and drop its pending
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
                if pool.backend == "thin":
                    self.catalog.set_volume_dev(payload["volume_id"], payload["dev_id"])
                else:
                    self.catalog.remove_snapshot(payload["snapshot_id"])
            else:
                raise ValueError(f"unknown pending kind {kind}")
            self._advance(pool, payload)
            self.catalog.end_pending(pending_id)
        return result

    def _settle_back(self, pool: Pool, payload: Json, pending_id: int) -> None:
        """Drop a rolled-back operation. Its planned device ids may have
        reached the kernel (a crash between create and commit), so they are
        never handed out again: ids are plentiful, a collision is not."""
        ids = planned_dev_ids(payload)
        with self.catalog.tx():
            if ids:
                current = self.catalog.pool_by_id(pool.id).next_dev_id
                self.catalog.update_pool(pool.id, next_dev_id=max(current, max(ids) + 1))
            self.catalog.end_pending(pending_id)

    def _run(self, pool: Pool, backend: Backend, kind: str, payload: Json, kernel) -> Any:
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
                return self._forward(pool, kind, payload, pending_id)
            self._settle_back(pool, payload, pending_id)
            raise
        return self._forward(pool, kind, payload, pending_id)

    def recover_pending(self) -> list[Json]:
        """Settle operations interrupted by a crash (called by assemble)."""
        report = []
        for p in self.catalog.pending():
            entry: Json = {"kind": p.kind, "payload": p.payload}
            try:
                if p.kind == "pool.create" or p.pool_id is None:
                    self._undo_pool_create(p.payload)
                    self.catalog.end_pending(p.id)
                    entry["result"] = "back"
                else:
                    pool = self.catalog.pool_by_id(p.pool_id)
                    backend = self._backend(pool)
                    direction = backend.recover(p.kind, p.payload)
                    if direction == "forward":
                        self._forward(pool, p.kind, p.payload, p.id)
                        if p.kind == "volume.restore":
                            self._finish_restore(pool, backend, p.payload)
                    else:
                        self._settle_back(pool, p.payload, p.id)
                    entry["result"] = direction
            except Exception as e:  # leave it for the next start, loudly
                log.error("recovery of %s failed: %s", p.kind, e)
                entry["result"] = f"failed: {e}"
            log.info("recovered %s: %s", p.kind, entry["result"])
            report.append(entry)
        return report

    # -- assembly -----------------------------------------------------------------------------

    @_locked
    def assemble(self) -> Json:
        """Bring every pool, volume and active snapshot up as the catalog says.
        Idempotent: existing devices are checked and kept."""
        report: Json = {"pools": {}, "recovered": []}
        self._backends.clear()
        for pool in self.catalog.pools():
            try:
                self._assemble_pool(pool)
                report["pools"][pool.name] = "ok"
                self.pool_errors.pop(pool.name, None)
            except (E.UserError, DmError, OSError) as e:
                msg = getattr(e, "message", None) or str(e)
                log.error("pool %s not assembled: %s", pool.name, msg)
                report["pools"][pool.name] = msg
                self.pool_errors[pool.name] = msg
        report["recovered"] = self.recover_pending()
        if any(r["result"] == "forward" for r in report["recovered"]):
            # Recovery recorded what the kernel had done before the crash (a
            # volume, a classic snapshot): bring it up too, before the
            # journals start. A journal attaches every volume of its pool
            # (a missing one refused the pool), and an origin copies old
            # data only into the snapshots loaded under it (one left out
            # would later show the data written after it).
            for pool in self.catalog.pools():
                if pool.name in self.pool_errors:
                    continue
                try:
                    self._assemble_pool(pool)
                except (E.UserError, DmError, OSError) as e:
                    msg = getattr(e, "message", None) or str(e)
                    log.error("pool %s not assembled after recovery: %s", pool.name, msg)
                    report["pools"][pool.name] = msg
                    self.pool_errors[pool.name] = msg
        # Journals start after recovery: a replayed marker then sees the
        # catalog as it is, and its snapshot is made exactly once.
        for pool in self.catalog.pools():
            if pool.name in self.pool_errors:
                continue
            try:
                self._start_journal(pool)
            except (E.UserError, DmError, OSError) as e:
                msg = getattr(e, "message", None) or str(e)
                log.error("pool %s: journal not started: %s", pool.name, msg)
                report["pools"][pool.name] = msg
                self.pool_errors[pool.name] = msg
        for ex in self.catalog.exports():
            if ex.pool in self.pool_errors:
                continue
            try:
                self._start_export(ex)
            except Exception as e:  # the rest of the pool keeps working
                msg = getattr(e, "message", None) or str(e)
                log.error("export of %s not started: %s", ex.ref, msg)
                self.export_errors[ex.id] = msg
        return report

    def _assemble_pool(self, pool: Pool) -> None:
        backend = self._backend(pool)
        pending = self.catalog.pending()
        pending_restores = {
            p.payload.get("volume_id") for p in pending if p.kind == "volume.restore"
        }
        # A deletion the kernel may have done before a crash (the catalog
        # commit lost): recovery finishes it; loading the deleted device
        # first would fail (a deleted thin device: ENODATA, the pool refused).
        deleting = {p.payload.get("volume_id") for p in pending if p.kind == "volume.delete"}
        deleting_snaps = {
            p.payload.get("snapshot_id") for p in pending if p.kind == "snapshot.delete"
        }
        for vol in self.catalog.volumes(pool.name):
            if vol.id in pending_restores and pool.backend == "classic":
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
                if v.id not in pending_restores and v.id not in deleting
            ]
        )

    # -- pools ------------------------------------------------------------------------------

    @_user_errors
    def pool_create(
        self,
        name: str,
        *,
        data: str | None = None,
        cache: str | None = None,
        backend: str = "thin",
        size: int | None = None,
        cache_size: int | None = None,
        journal: str | None = None,
        journal_size: int | None = None,
        journal_mode: str = "nv",
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
        data, cache, journal = (devices.resolve(d) if d else d for d in (data, cache, journal))
        if backend not in BACKENDS:
            raise E.InvalidArgument(
                f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}"
            )
        if journal_mode not in JOURNAL_MODES:
            raise E.InvalidArgument(
                f"journal mode must be one of {', '.join(JOURNAL_MODES)}, not {journal_mode!r}"
            )
        if journal is not None and journal_mode != "nv":
            raise E.InvalidArgument("--journal DEV is for --journal-mode nv")
        if journal is not None and journal_size is not None:
            raise E.InvalidArgument("--journal-size is for an embedded or RAM journal")
        if journal_mode == "none" and journal_size is not None:
            raise E.InvalidArgument("--journal-size needs a journal (mode nv or ram)")
        if metadata_size is not None:
            if backend != "thin":
                raise E.InvalidArgument("--metadata-size is for thin pools")
            check_metadata_size(metadata_size)
        _check_journal_memory(journal_memory, journal_mode)
        jsize = journal_size or DEFAULT_JOURNAL_SIZE
        if journal_mode != "none" and journal is None and jsize < MIN_JOURNAL_SIZE:
            raise E.InvalidArgument(f"a journal needs at least {MIN_JOURNAL_SIZE // MiB}M")
        with contextlib.suppress(CatNotFound):
            self.catalog.pool(name)
            raise E.AlreadyExists(f"pool {name!r} already exists")
        if data is not None and size is not None:
            raise E.InvalidArgument(
                "--size is for embedded pools; a --data device has its own size"
            )
        if cache is not None and cache_size is not None:
            raise E.InvalidArgument(
                "--cache-size is for an embedded cache; --cache has its own size"
            )
        external = {"data": data, "cache": cache, "journal": journal}
        self._check_unowned(external)
        self._disks.check_new(external)
        if journal is not None:
            _, jdev_bytes = _check_free_device(journal, "journal")
            jsize = label.usable_size("journal", jdev_bytes)
            if jsize < MIN_JOURNAL_SIZE:
                raise E.InvalidArgument(
                    f"journal device {journal} has {jsize} bytes; it needs at least "
                    f"{MIN_JOURNAL_SIZE // MiB}M"
                )
        if data is not None:
            _, data_bytes = _check_free_device(data, "data")
            data_bytes = label.usable_size("data", data_bytes)
        else:
            data_bytes = size or DEFAULT_EMBEDDED_SIZE
            if data_bytes < 64 * MiB:
                raise E.InvalidArgument("a pool needs at least 64M")
        self._check_host_space(
            data_bytes=0 if data is not None else data_bytes,
            cache_bytes=cache_size if cache is None and cache_size else 0,
            journal_bytes=jsize if journal is None and journal_mode == "nv" else 0,
            sparse=sparse,
        )
        cache_bytes = None
        if cache is not None:
            _, cache_bytes = _check_free_device(cache, "cache")
            cache_bytes -= label.SIZE
        elif cache_size is not None:
            cache_bytes = cache_size
        if cache_bytes is not None and cache_bytes < 4 * MiB:
            raise E.InvalidArgument("a writecache device needs at least 4M")
        data_bytes = data_bytes // MiB * MiB
        if metadata_size is not None:
            layout = ThinBackend.plan_layout(data_bytes // SECTOR, metadata_size)
        else:
            layout = BACKENDS[backend].plan_layout(data_bytes // SECTOR)  # type: ignore[attr-defined]
        layout["journal"] = {
            "mode": journal_mode,
            "path": None
            if journal_mode != "nv"
            else journal or os.path.join(self._pool_dir(name), "journal.img"),
            "size": 0 if journal_mode == "none" else jsize,
            "embedded": journal is None and journal_mode == "nv",
        }
        if journal_memory is not None:
            layout["journal"]["memory"] = journal_memory
        labelled = {r: p for r, p in external.items() if p is not None}
        if labelled:
            layout["labels"] = {
                "version": label.VERSION,
                "generation": 1,
                "roles": sorted(labelled),
            }

        pending_id = self.catalog.begin_pending(None, "pool.create", {"name": name})
        pool: Pool | None = None
        try:
            if data is None or (cache is None and cache_size is not None) or journal_mode == "nv":
                os.makedirs(self._pool_dir(name), mode=0o700, exist_ok=True)
                data_file, cache_file = self._embedded_files(name)
                if data is None:
                    loop.make_sparse(data_file, data_bytes)
                if cache is None and cache_size is not None:
                    loop.make_sparse(cache_file, cache_size)
            with self.catalog.tx():
                pool = self.catalog.add_pool(
                    name,
                    backend,
                    data_dev=data,
                    cache_dev=cache,
                    size=data_bytes,
                    cache_size=cache_bytes,
                    config=layout,
                )
                # The pool row commits only together with the kernel work
                # below (same transaction); a crash leaves the pending record.
                self._disks.write(pool, labelled)
                _, cachedev = self._devices(pool)
                if cachedev is not None:
                    # writecache formats only a zeroed superblock (after the label)
                    _zero(cachedev[1], MiB, label.SIZE if cache else 0)
                base = self._base(pool)
                b = BACKENDS[backend](self.dm, self.catalog, pool, base)
                if isinstance(b, ThinBackend):
                    _zero(base.path, MiB)  # dm-thin formats only a zeroed superblock
                for layer in b.pool_layers():
                    ensure(self.dm, layer)
                jcfg = layout["journal"]
                if jcfg["mode"] == "nv":
                    try:
                        Journal.format(jcfg["path"], jcfg["size"])
                    except JournalError as e:
                        raise E.Unavailable(f"journal {jcfg['path']}: {e}") from None
                    if not journal:
                        _reserve(jcfg["path"], jcfg["size"])
                self.catalog.end_pending(pending_id)
            self._backends[pool.id] = b
            self._start_journal(pool)
        except BaseException:
            with contextlib.suppress(Exception):
                self._undo_pool_create({"name": name})
            with contextlib.suppress(Exception):
                self.catalog.end_pending(pending_id)
            raise
        log.info("pool %s created (%s, %d MiB)", name, backend, data_bytes // MiB)
        return self.pool_show(name)

    @_user_errors
    def pool_set(
        self,
        name: str,
        *,
        cow_autoextend_threshold: int | None = None,
        cow_autoextend_percent: int | None = None,
        journal_memory: int | None = None,
    ) -> Json:
        """Change a pool's policy: classic COW autoextend (threshold 100: off);
        the RAM its NV journal's unflushed records may take, at once."""
        p = self.catalog.pool(names.check_name("pool", name))
        changes = {
            k: v
            for k, v in (
                ("cow_autoextend_threshold", cow_autoextend_threshold),
                ("cow_autoextend_percent", cow_autoextend_percent),
            )
            if v is not None
        }
        if not changes and journal_memory is None:
            raise E.InvalidArgument("nothing to set")
        if journal_memory is not None:
            _check_journal_memory(journal_memory, journal_mode(p))
        if changes and p.backend != "classic":
            raise E.InvalidArgument(f"pool {name} is thin: COW autoextend is for classic pools")
        t = changes.get("cow_autoextend_threshold")
        if t is not None and not 50 <= t <= 100:
            raise E.InvalidArgument("--cow-autoextend-threshold is a percentage, 50 to 100 (off)")
        pc = changes.get("cow_autoextend_percent")
        if pc is not None and not 1 <= pc <= 1000:
            raise E.InvalidArgument("--cow-autoextend-percent is 1 to 1000")
        config = {**p.config, **changes}
        if journal_memory is not None:
            pj = self._journals.get(p.id)
            if pj is not None:  # a lower limit makes writers wait for the flusher
                pj.journal.set_mem_limit(journal_memory)
            config["journal"] = {**p.config["journal"], "memory": journal_memory}
            changes["journal_memory"] = journal_memory
        self.catalog.update_pool(p.id, config=config)
        log.info("pool %s: %s", name, ", ".join(f"{k}={v}" for k, v in sorted(changes.items())))
        return self.pool_show(name)

    @_user_errors
    def pool_extend_metadata(self, name: str, size: int) -> Json:
        """Give a thin pool ``size`` more metadata: a new file in the pool's
        state directory (reserved, so the host file system cannot fail it),
        appended to the metadata device. dm-thin grows its metadata when the
        pool resumes and leaves out-of-metadata-space mode; writes the
        journal held land, new writes and snapshots are taken again. Works
        for every thin pool (the data device is used to its end, so the
        extension cannot go there). A pool whose metadata needs check is
        refused: dm-thin will not grow it before thin_check/thin_repair."""
        p, backend = self._pool(names.check_name("pool", name))
        if not isinstance(backend, ThinBackend):
            raise E.InvalidArgument(f"pool {name} is {p.backend}: only thin pools have metadata")
        if size % MiB or size <= 0:
            raise E.InvalidArgument(f"--size {size} is not a whole, positive number of MiB")
        total = (backend.meta_sectors + sum(backend.meta_ext_sectors)) * SECTOR + size
        if total > MAX_METADATA:
            raise E.InvalidArgument(
                f"pool {name} would have {total // MiB} MiB of metadata; dm-thin uses at most "
                f"{MAX_METADATA // MiB} MiB"
            )
        s = backend.pool_status()
        if isinstance(s, st.ThinPoolStatus) and s.needs_check:
            raise E.Busy(
                f"pool {name}'s thin metadata needs check: dm-thin does not grow it before "
                "thin_check/thin_repair (docs/storage.md, 'Thin metadata full')"
            )
        n = len(backend.meta_ext_sectors) + 1
        path = self._meta_ext_file(name, n)
        os.makedirs(self._pool_dir(name), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        lo = None
        try:
            _reserve(path, size)
            lo = self._loop_for(path)
            old = p.config
            self.catalog.update_pool(
                p.id, config={**old, "meta_ext": [*backend.meta_ext_sectors, size // SECTOR]}
            )
            backend.refresh()
            try:
                backend.extend_metadata(lo.devno, size // SECTOR)
            except BaseException:
                self.catalog.update_pool(p.id, config=old)
                backend.refresh()
                backend.meta_ext_devnos = backend.meta_ext_devnos[:-1]
                with contextlib.suppress(Exception):
                    for layer in backend.pool_layers()[:1]:
                        ensure(self.dm, layer)
                raise
        except BaseException:
            if lo is not None:
                with contextlib.suppress(Exception):
                    loop.detach(lo)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        log.info("pool %s: thin metadata extended by %d MiB (%s)", name, size // MiB, path)
        pj = self._journals.get(p.id)
        if pj is not None:
            pj.check_space()  # take writes again now, not at the marker thread's next look
        return self.pool_show(name)

    @_locked
    def autoextend(self) -> None:
        """Grow classic COW areas that passed their pool's threshold (the
        daemon calls this every second). Logs each growth, and once per
        snapshot that it cannot grow."""
        with self.lock:
            self._autoextend()

    def _autoextend(self) -> None:
        for p in self.catalog.pools():
            if p.backend != "classic" or p.name in self.pool_errors:
                continue
            try:
                lines = self._backend(p).autoextend()
            except (E.UserError, DmError, OSError) as e:
                log.error("pool %s: COW autoextend failed: %s", p.name, getattr(e, "message", e))
                continue
            for line in lines:
                key = line.split(":", 1)[0]
                if "grown by" in line:
                    self._cannot_grow.discard(key)
                    log.info("pool %s: %s", p.name, line)
                elif key not in self._cannot_grow:
                    self._cannot_grow.add(key)
                    log.warning("pool %s: %s", p.name, line)

    def _check_host_space(
        self, *, data_bytes: int, cache_bytes: int, journal_bytes: int, sparse: bool
    ) -> None:
        """An embedded pool's files live on the state directory's file
        system. The journal file is reserved (it must never fail a write it
        acknowledged); the loop files are sparse, so unless ``sparse`` the
        file system must have room for them too, or the pool's writes would
        fail once it fills."""
        if not (data_bytes or cache_bytes or journal_bytes):
            return
        free = shutil.disk_usage(self.state_dir).free
        if journal_bytes > free:
            raise E.NoSpace(
                f"the journal file needs {journal_bytes // MiB} MiB on {self.state_dir}, which "
                f"has {free // MiB} MiB free"
            )
        files = data_bytes + cache_bytes
        if not sparse and files + journal_bytes > free:
            raise E.NoSpace(
                f"an embedded pool of {(files + journal_bytes) // MiB} MiB (with its journal) "
                f"does not fit on {self.state_dir}: {free // MiB} MiB free; --sparse creates "
                "it anyway (its writes fail once that file system fills)"
            )
        if files > 64 * free:  # sparse, but not absurdly overcommitted
            raise E.NoSpace(
                f"embedded pool of {files // MiB} MiB on {self.state_dir} with only "
                f"{free // MiB} MiB free"
            )

    def _host_space(self, pool: Pool) -> Json | None:
        """Embedded pool: the host file system under its files, and how much
        more of it the sparse loop files may still take."""
        files = [f for f in self._embedded_files(pool.name) if os.path.exists(f)]
        if not pool.embedded or not files:
            return None
        du = shutil.disk_usage(self._pool_dir(pool.name))
        unallocated = 0
        for f in files:
            st = os.stat(f)
            unallocated += max(0, st.st_size - st.st_blocks * 512)
        return {"path": self._pool_dir(pool.name), "free": du.free, "unallocated": unallocated}

    def _undo_pool_create(self, payload: Json) -> None:
        """Remove what a pool creation that never committed left behind."""
        name = payload["name"]
        with contextlib.suppress(CatNotFound):
            self.catalog.pool(name)
            return  # committed: the row and the pending record end together
        self._teardown_devices(self._pool_devices(name))
        self._detach_loops(name)
        shutil.rmtree(self._pool_dir(name), ignore_errors=True)

    def _pool_json(self, pool: Pool, detail: bool = False) -> Json:
        out: Json = {
            "name": pool.name,
            "uuid": pool.uuid,
            "backend": pool.backend,
            "embedded": pool.embedded,
            "data_device": pool.data_dev or self._embedded_files(pool.name)[0],
            "cache_device": pool.cache_dev
            or (self._embedded_files(pool.name)[1] if pool.cache_size else None),
            "size": pool.size,
            "volumes": len(self.catalog.volumes(pool.name)),
            "snapshots": len(self.catalog.snapshots(pool.name)),
            "health": [],
            "writecache": None,
        }
        with contextlib.suppress(OSError):
            host = out["host_fs"] = self._host_space(pool)
            if host is not None and host["unallocated"] > host["free"]:
                out["health"].append(
                    f"host file system {host['path']} has {host['free'] // MiB} MiB free, less "
                    f"than the pool's sparse files may still take "
                    f"({host['unallocated'] // MiB} MiB): its writes fail once it fills"
                )
        if pool.name in self.pool_errors:
            out["health"].append(self.pool_errors[pool.name])
            return out
        try:
            backend = self._backend(pool)
        except (E.UserError, DmError, OSError) as e:
            out["health"].append(f"not active: {getattr(e, 'message', e)}")
            return out
        usage = backend.usage()
        out["health"] += usage.pop("health", [])
        if not detail:
            usage.pop("snapshots", None)
        out.update({k: v for k, v in usage.items() if k not in ("backend", "size")})
        out["data_size"] = usage.get("size")
        out["journal"] = {"mode": "none"}
        if journal_mode(pool) != "none":
            pj = self._journals.get(pool.id)
            jcfg = pool.config["journal"]
            # the setting (NV): what the live window may take in RAM
            memory = jcfg.get("memory") or Journal.MEM_DEFAULT if jcfg["mode"] == "nv" else None
            out["journal"] = {
                "mode": jcfg["mode"],
                "path": jcfg.get("path"),
                "memory": memory,
                "running": False,
            }
            if pj is not None:
                j = out["journal"] = {
                    "path": jcfg.get("path"),
                    "memory": memory,
                    "running": True,
                    **status_json(pj),
                }
                for key, what in (
                    ("journal_error", "journal error"),
                    ("flush_error", "journal flush error"),
                    ("last_marker_error", "journal last marker error"),
                ):
                    if j[key]:
                        out["health"].append(f"{what}: {j[key]}")
                if j["flusher_waiting_volume"]:
                    out["health"].append(
                        f"journal flusher waits for volume id {j['flusher_waiting_volume']}"
                    )
            else:
                out["health"].append("journal not running")
        if pool.cache_dev or pool.cache_size:
            out["writecache"] = self._writecache_json(pool)
            if out["writecache"].get("error"):
                out["health"].append(f"writecache error {out['writecache']['error']}")
        overcommit = sum(v.size for v in self.catalog.volumes(pool.name))
        if pool.backend == "thin" and usage.get("size") and overcommit > usage["size"]:
            out["overcommitted"] = overcommit / usage["size"]
        return out

    def _writecache_json(self, pool: Pool) -> Json:
        name = names.dm_internal(pool.name, "wc")
        try:
            s = self.dm.status(name, noflush=True)[0].status
        except DmError as e:
            return {"state": f"missing ({e})"}
        if not isinstance(s, st.WritecacheStatus):
            return {"state": type(s).__name__}
        return {
            "state": "error" if s.error else "ok",
            "error": s.error,
            "total_blocks": s.total_blocks,
            "free_blocks": s.free_blocks,
            "writeback_blocks": s.writeback_blocks,
            "block_size": WRITECACHE_BLOCK,
        }

    @_user_errors
    def pool_list(self) -> list[Json]:
        return [self._pool_json(p) for p in self.catalog.pools()]

    @_user_errors
    def pool_show(self, name: str) -> Json:
        names.check_name("pool", name)
        pool = self.catalog.pool(name)
        out = self._pool_json(pool, detail=True)
        out["devices"] = sorted(self._pool_devices(pool.name, pool.uuid[:8]))
        # which of its disks carry a dmsnap label (None: embedded, or made before labels)
        out["labels"] = pool.config.get("labels")
        return out

    @_user_errors
    def pool_repair(self, name: str, discard_after: int) -> Json:
        """The way forward when a pool's journal is damaged in the middle
        (its assembly was refused, naming the record): drop record
        ``discard_after`` and every later one (``Journal.repair``), then
        start the pool's journal and exports."""
        names.check_name("pool", name)
        pool = self.catalog.pool(name)
        if journal_mode(pool) != "nv":
            raise E.InvalidArgument(f"pool {name} has no NV journal: nothing to repair")
        if pool.id in self._journals:
            raise E.Busy(f"pool {name}: its journal opened and is running: nothing to repair")
        try:
            rep = Journal.repair(pool.config["journal"]["path"], discard_after)
        except JournalError as e:
            raise E.InvalidArgument(f"pool {name}: {e}") from None
        log.warning(
            "pool %s: journal repaired: %d record(s) from %d on dropped (up to %d)",
            name,
            rep.dropped,
            discard_after,
            rep.last_seq,
        )
        self.pool_errors.pop(name, None)
        state = "ok"
        try:  # as assemble() does for this pool
            self._assemble_pool(pool)
            self._start_journal(pool)
        except (E.UserError, DmError, OSError) as e:
            state = self.pool_errors[name] = getattr(e, "message", None) or str(e)
        for ex in self.catalog.exports():
            if state == "ok" and ex.pool == name and ex.id not in self._exports:
                try:
                    self._start_export(ex)
                except Exception as e:  # the rest of the pool keeps working
                    self.export_errors[ex.id] = getattr(e, "message", None) or str(e)
        return {"pool": name, "dropped": rep.dropped, "state": state}

    @_user_errors
    def pool_destroy(self, name: str, *, force: bool = False) -> None:
        names.check_name("pool", name)
        pool = self.catalog.pool(name)
        vols = self.catalog.volumes(name)
        if vols and not force:
            raise E.Busy(f"pool {name} still has {len(vols)} volume(s); delete them or use --force")
        for ex in self.catalog.exports(name):
            if not force:
                raise E.Busy(f"{ex.ref} is exported; unexport it first or use --force")
            self._stop_export(ex.id, keep=False)
            self.catalog.remove_export(ex.id)
            self._drop_chap(ex.serial)  # its secrets go with it
        devs = self._pool_devices(pool.name, pool.uuid[:8])
        journaled = {names.dm_volume(name, v.name) for v in vols} if self._journal(pool) else set()
        for d in devs:
            if d.startswith(names.dm_internal(name, "")) or d in journaled:
                continue  # the journal holds its volumes open; it stops below
            if self._open_count(d):
                raise E.Busy(f"/dev/mapper/{d} is in use; unmount or stop using it first")
        pj = self._journals.pop(pool.id, None)
        if pj is not None:
            try:
                # markers requested before the destroy are not left hanging; a
                # flusher stuck (a full thin pool, a failing device) never gets
                # there, and the pool goes with its records anyway
                pj.sync(timeout=5.0 if pj.stats().flush_error else 120.0)
            except TimeoutError as e:
                log.warning("pool %s: destroyed with records not on its volumes: %s", name, e)
            pj.close(drain=False)
        self._holds.release(("journal", pool.id))
        self._teardown_devices(devs)
        jcfg = pool.config.get("journal", {})
        if "labels" in pool.config:
            self._disks.wipe(self.catalog.pool_by_id(pool.id))
        elif jcfg.get("mode") == "nv" and not jcfg.get("embedded"):
            with contextlib.suppress(OSError):  # never mistaken for a live journal later
                _zero(jcfg["path"], 2 * 4096)
        self._backends.pop(pool.id, None)
        self._detach_loops(name)
        self.catalog.remove_pool(pool.id)
        shutil.rmtree(self._pool_dir(name), ignore_errors=True)
        self.pool_errors.pop(name, None)
        log.info("pool %s destroyed", name)

    # -- volumes -------------------------------------------------------------------------------

    def _link(self, pool: str, vol: str, snap: str | None = None) -> str:
        link = os.path.join(LINK_DIR, pool, vol if snap is None else f"{vol}@{snap}")
        if os.path.exists(link):
            return link
        dm_name = names.dm_volume(pool, vol) if snap is None else names.dm_snapshot(pool, vol, snap)
        return f"/dev/mapper/{dm_name}"

    def _volume_json(self, vol: Volume, backend: Backend | None = None) -> Json:
        dm_name = names.dm_volume(vol.pool, vol.name)
        journaled = (
            vol.pool_id in self._journals
            or journal_mode(self.catalog.pool_by_id(vol.pool_id)) != "none"
        )
        out: Json = {
            "pool": vol.pool,
            "name": vol.name,
            "size": vol.size,
            # A journaled volume is reached through dmsnapd (its dm device is
            # private): no path until it is exported.
            "path": None if journaled else self._link(vol.pool, vol.name),
            "journaled": journaled,
            "dm_name": dm_name,
            "snapshots": len(self.catalog.snapshots(vol.pool, vol.name)),
            "created": vol.created,
            "active": False,
        }
        try:
            info = self.dm.info(dm_name)
            out["active"] = True
            out["open_count"] = info.open_count
            s = self.dm.status(dm_name, noflush=True)[0].status
            if isinstance(s, st.ThinStatus):
                out["mapped"] = s.mapped_sectors * SECTOR
        except DmError:
            pass
        return out

    @_user_errors
    def volume_create(self, pool: str, vol: str, size: int) -> Json:
        names.check_volume_ref(pool, vol)  # and every kernel name made from it fits
        if size <= 0:
            raise E.InvalidArgument("volume size must be positive")
        size = (size + MiB - 1) // MiB * MiB  # whole MiB: extent and block aligned
        p, backend = self._pool(pool)
        with contextlib.suppress(CatNotFound):
            self.catalog.volume(pool, vol)
            raise E.AlreadyExists(f"volume {pool}/{vol} already exists")
        backend.check_room(f"volume {pool}/{vol}", size if p.backend == "classic" else 0)
        plan = backend.plan_volume(size)
        payload = {"name": vol, "size": size, **plan, **backend.txn()}
        self._run(p, backend, "volume.create", payload, lambda: backend.create_volume(plan, size))
        v = self.catalog.volume(pool, vol)
        backend.refresh()
        for layer in backend.volume_layers(v):
            ensure(self.dm, layer)
        pj = self._journal(p)
        if pj is not None:
            pj.attach(v.id, self._dm_path(pool, vol), v.size)
        log.info("volume %s/%s created (%d MiB)", pool, vol, size // MiB)
        return self._volume_json(v)

    @_user_errors
    def volume_list(self, pool: str | None = None) -> list[Json]:
        if pool is not None:
            names.check_name("pool", pool)
        return [self._volume_json(v) for v in self.catalog.volumes(pool)]

    @_user_errors
    def volume_show(self, pool: str, vol: str) -> Json:
        names.check_name("pool", pool)
        names.check_name("volume", vol)
        return self._volume_json(self.catalog.volume(pool, vol))

    @_user_errors
    def volume_delete(self, pool: str, vol: str, *, force: bool = False) -> None:
        names.check_name("pool", pool)
        names.check_name("volume", vol)
        v = self.catalog.volume(pool, vol)
        p, backend = self._pool(pool)
        self._check_not_exported(pool, vol)
        snaps = self.catalog.snapshots(pool, vol)
        if snaps and not force:
            raise E.Busy(
                f"volume {pool}/{vol} has {len(snaps)} snapshot(s); "
                "delete them first or use --force"
            )
        for s in snaps:
            self._check_not_open(names.dm_snapshot(pool, vol, s.name), f"snapshot {vol}@{s.name}")
        with self._detached(p, v):
            self._check_not_open(names.dm_volume(pool, vol), f"volume {pool}/{vol}")
            for s in snaps:
                self.snapshot_delete(pool, vol, s.name)
            self._delete_volume(p, backend, v)
        pj = self._journals.get(p.id)
        if pj is not None:
            pj.forget(v.id)
        log.info("volume %s/%s deleted", pool, vol)

    @contextlib.contextmanager
    def _detached(self, pool: Pool, vol: Volume, *, markers_first: bool = False) -> Any:
        """The volume with its journal records on the dm device and no
        journal writes to it meanwhile; attached again afterwards if it
        still exists (delete and restore work on the dm device itself).
        With ``markers_first`` every marker requested so far is made before
        (a restore must not change what an earlier request snapshots). A
        delete does not wait for them: it may be what frees a full pool."""
        pj = self._journal(pool)
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
                    pj.attach(v.id, self._dm_path(pool.name, vol.name), v.size)

    def _delete_volume(self, p: Pool, backend: Backend, v: Volume) -> None:
        pool, vol = p.name, v.name
        payload = {"volume_id": v.id, "name": vol, **backend.txn()}

        def kernel() -> None:
            with contextlib.suppress(DmError):
                self.dm.remove(names.dm_volume(pool, vol))
            backend.delete_volume(v)

        self._run(p, backend, "volume.delete", payload, kernel)

    # -- snapshots ---------------------------------------------------------------------------

    def snapshot_state(self, s: Snapshot) -> str:
        """ "valid", or why the snapshot cannot be trusted (classic:
        "invalid" once its COW area overflowed; "missing"; "inactive" when
        its pool is not assembled)."""
        try:
            _, backend = self._pool(s.pool)
            return backend.snapshot_state(s)
        except (E.UserError, DmError, OSError):
            return "inactive"

    def _check_snapshot_valid(self, s: Snapshot) -> None:
        """Refuse to show an invalid snapshot's content as if it were one."""
        state = self.snapshot_state(s)
        if state == "invalid":
            raise E.Unavailable(
                f"snapshot {s.pool}/{s.volume}@{s.name} is invalid: its COW area overflowed "
                "and its contents are lost; delete it"
            )
        if state != "valid":
            raise E.Unavailable(f"snapshot {s.pool}/{s.volume}@{s.name} is {state}")

    def _snapshot_json(self, s: Snapshot) -> Json:
        return {
            "pool": s.pool,
            "volume": s.volume,
            "name": s.name,
            "state": self.snapshot_state(s),
            "cow_size": s.cow_size,
            "group": s.group_id,
            "created": s.created,
            "active": s.active,
            "path": self._link(s.pool, s.volume, s.name) if s.active else None,
            "labels": s.labels,
        }

    @_errors_to_user
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
            r = self._snapshot_submit(
                refs, name, labels=labels, token=token, wait=wait, cow_size=cow_size
            )
        if not isinstance(r, _WaitFor):
            return r
        return {**self._wait_marker(r.pj, r.marker, timeout), **r.extra}

    def _snapshot_submit(
        self,
        refs: list[list[str]] | list[tuple[str, str]],
        name: str,
        *,
        labels: dict[str, str] | None,
        token: str | None,
        wait: bool,
        cow_size: int | None,
    ) -> Json | _WaitFor:
        """The part of snapshot_create under the lock: checks, the catalog,
        the marker appended. Returns the answer, or what to wait for."""
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
            if not k or "=" in k or len(k) > 64 or len(val) > 256:
                raise E.InvalidArgument(f"bad label {k!r}={val!r}")
        pool_name = pools.pop()
        p, backend = self._pool(pool_name)
        pj = self._journal(p)
        if token:
            gid = self.catalog.group_by_token(p.id, token)
            if gid is not None:  # a retried request: the snapshot already exists
                return {**self._group_json(gid), "retried": True}
            mk = self.catalog.marker_by_token(p.id, token)
            if pj is not None and mk is not None and mk.state == "pending":
                if wait:
                    return _WaitFor(pj, mk.id, {"retried": True})
                return {**self._marker_json(mk), "retried": True}
        if cow_size is not None and p.backend != "classic":
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
            gid = self._snapshot_group(p, backend, members, name, request, None)
            log.info("snapshot %s of %s created", name, ", ".join(f"{a}/{b}" for a, b in pairs))
            return self._group_json(gid)
        ids = set(request["volumes"])
        for mk in self.catalog.markers(p.id, "pending"):
            if mk.name == name and ids & set(mk.request.get("volumes", [])):
                raise E.AlreadyExists(f"snapshot {name} is already requested (marker {mk.id})")
        backend.check_room(f"snapshot {name}")
        mid = self.catalog.add_marker(p.id, name, token, request)
        try:
            seq = pj.request(mid, request)
        except (JournalError, ValueError) as e:
            self.catalog.finish_marker(mid, error=f"not appended to the journal: {e}")
            if isinstance(e, JournalError):
                raise _journal_error(e) from None
            raise E.InvalidArgument(str(e)) from None
        log.info(
            "snapshot %s of %s requested (marker %d)",
            name,
            ", ".join(f"{a}/{b}" for a, b in pairs),
            mid,
        )
        # seq: the marker's place in the journal (tests build their model on it)
        if wait or pj.mode == "ram":
            return _WaitFor(pj, mid, {"seq": seq})
        mk2 = self.catalog.marker(mid)
        assert mk2 is not None
        return {**self._marker_json(mk2), "seq": seq}

    def _snapshot_group(
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
            self._run(
                pool,
                backend,
                "snapshot.create",
                payload,
                lambda: backend.create_snapshots(members, plans),
            )
        )

    def _marker_json(self, mk: Any) -> Json:
        out: Json = {
            "marker": mk.id,
            "name": mk.name,
            "state": mk.state,
            "token": mk.token,
            "requested": mk.created,
        }
        if mk.state == "done":
            out.update(self._group_json(mk.group_id))
        if mk.error:
            out["error"] = mk.error
        return out

    def _wait_marker(self, pj: PoolJournal, marker_id: int, timeout: float) -> Json:
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

    @_user_errors
    def snapshot_request(
        self, pool: str, *, marker: int | None = None, token: str | None = None
    ) -> Json:
        """Where a journaled snapshot request stands (by marker id or token)."""
        names.check_name("pool", pool)
        p = self.catalog.pool(pool)
        if (marker is None) == (token is None):
            raise E.InvalidArgument("name either a marker id or a request token")
        mk = self.catalog.marker(marker) if marker is not None else None
        if token is not None:
            mk = self.catalog.marker_by_token(p.id, token)
            if mk is None:
                gid = self.catalog.group_by_token(p.id, token)
                if gid is not None:  # made by a direct (unjournaled) request
                    return {**self._group_json(gid), "token": token}
        if mk is None or mk.pool_id != p.id:
            raise E.NotFound(f"no snapshot request {marker or token!r} in pool {pool}")
        return self._marker_json(mk)

    @_user_errors
    def snapshot_list(self, pool: str | None = None, vol: str | None = None) -> list[Json]:
        if pool is not None:
            names.check_name("pool", pool)
        if vol is not None:
            names.check_name("volume", vol)
        return [self._snapshot_json(s) for s in self.catalog.snapshots(pool, vol)]

    def _snap(self, pool: str, vol: str, name: str) -> Snapshot:
        names.check_name("pool", pool)
        names.check_name("volume", vol)
        names.check_name("snapshot", name)
        return self.catalog.snapshot(pool, vol, name)

    @_user_errors
    def snapshot_activate(self, pool: str, vol: str, name: str) -> Json:
        s = self._snap(pool, vol, name)
        _, backend = self._pool(pool)
        self._check_snapshot_valid(s)
        for layer in backend.snapshot_layers(s, active=True):
            ensure(self.dm, layer)
        self.catalog.set_snapshot_active(s.id, True)
        return self._snapshot_json(self.catalog.snapshot(pool, vol, name))

    @_user_errors
    def snapshot_deactivate(self, pool: str, vol: str, name: str) -> None:
        s = self._snap(pool, vol, name)
        self._check_not_exported(pool, vol, name)
        dm_name = names.dm_snapshot(pool, vol, name)
        self._check_not_open(dm_name, f"snapshot {pool}/{vol}@{name}")
        with contextlib.suppress(DmError):
            if self.dm.exists(dm_name):
                self.dm.remove(dm_name)
        self.catalog.set_snapshot_active(s.id, False)

    @_user_errors
    def snapshot_delete(self, pool: str, vol: str, name: str) -> None:
        s = self._snap(pool, vol, name)
        self._check_not_exported(pool, vol, name)
        p, backend = self._pool(pool)
        self._check_not_open(names.dm_snapshot(pool, vol, name), f"snapshot {pool}/{vol}@{name}")
        payload = {"snapshot_id": s.id, "name": name, "volume": vol, **backend.txn()}

        def kernel() -> None:
            with contextlib.suppress(DmError):
                if self.dm.exists(names.dm_snapshot(pool, vol, name)):
                    self.dm.remove(names.dm_snapshot(pool, vol, name))
            backend.delete_snapshot(s)

        self._run(p, backend, "snapshot.delete", payload, kernel)
        log.info("snapshot %s/%s@%s deleted", pool, vol, name)

    @_user_errors
    def snapshot_restore(self, pool: str, vol: str, name: str) -> None:
        s = self._snap(pool, vol, name)
        v = self.catalog.volume(pool, vol)
        p, backend = self._pool(pool)
        self._check_not_exported(pool, vol)
        # Markers requested before the restore are made from the volume as
        # it was; writes arriving meanwhile fail (ENXIO) until it is back.
        with self._detached(p, v, markers_first=True):
            self._restore(p, backend, v, s)
        log.info("volume %s/%s restored from %s", pool, vol, name)

    def _restore(self, p: Pool, backend: Backend, v: Volume, s: Snapshot) -> None:
        pool, vol, name = p.name, v.name, s.name
        self._check_not_open(names.dm_volume(pool, vol), f"volume {pool}/{vol}")
        if p.backend == "classic":
            self._check_not_open(names.dm_snapshot(pool, vol, name), f"snapshot {vol}@{name}")
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
        # Past the point of no return: the catalog follows, then the kernel
        # finishes (both idempotent, so a crash here rolls forward).
        with self.catalog.tx():
            if p.backend == "thin":
                self.catalog.set_volume_dev(v.id, plan["dev_id"])
            self._advance(p, payload)
        self._finish_restore(p, backend, payload)
        with self.catalog.tx():
            if p.backend == "classic":
                self.catalog.remove_snapshot(s.id)
            self.catalog.end_pending(pending_id)

    def _finish_restore(self, pool: Pool, backend: Backend, payload: Json) -> None:
        backend.refresh()
        vol = next(v for v in self.catalog.volumes(pool.name) if v.id == payload["volume_id"])
        snap = next(
            (s for s in self.catalog.snapshots(pool.name) if s.id == payload["snapshot_id"]), None
        )
        if snap is None:
            return  # classic: already merged and consumed
        backend.finish_restore(vol, snap, payload)

    # -- the data path: a local writer's way to a journaled volume -------------------------------
    #
    # No Manager lock here: the journal is safe for many threads, and a
    # write must never wait for a control operation.

    def open_volume(self, pool: str, vol: str) -> VolumeIO:
        with self.lock:
            p = self.catalog.pool(names.check_name("pool", pool))
            v = self.catalog.volume(pool, names.check_name("volume", vol))
            pj = self._journal(p)
            if pj is None:
                raise E.InvalidArgument(
                    f"pool {pool} has no journal; write to {self._link(pool, vol)} directly"
                )
            return VolumeIO(pj, v.id, v.size, f"{pool}/{vol}")

    @_errors_to_user
    def volume_write(
        self, pool: str, vol: str, offset: int, content: bytes, *, fua: bool = False
    ) -> Json:
        seq = self.open_volume(pool, vol).write(offset, content, fua=fua)
        return {"written": len(content), "seq": seq}

    @_errors_to_user
    def volume_read(self, pool: str, vol: str, offset: int, length: int) -> bytes:
        return self.open_volume(pool, vol).read(offset, length)

    @_errors_to_user
    def volume_discard(self, pool: str, vol: str, offset: int = 0, size: int | None = None) -> Json:
        """The range (default: from offset to the end) reads zeros from now
        on, in order with the writes and snapshots around it; thin space
        goes back once the flusher gets there (docs/journal.md)."""
        io = self.open_volume(pool, vol)
        if size is None:
            if offset >= io.size:
                raise E.InvalidArgument(
                    f"{io.ref}: offset {offset} is not inside the volume ({io.size} bytes)"
                )
            size = io.size - offset
        seq = io.discard(offset, size)
        return {"discarded": size, "offset": offset, "seq": seq}

    @_errors_to_user
    def volume_flush(self, pool: str, vol: str) -> None:
        self.open_volume(pool, vol).flush()

    # -- status ----------------------------------------------------------------------------------

    @_user_errors
    def status(self) -> Json:
        pools = [self._pool_json(p) for p in self.catalog.pools()]
        return {
            "pools": pools,
            "volumes": [self._volume_json(v) for v in self.catalog.volumes()],
            "snapshots": len(self.catalog.snapshots()),
            "pending": len(self.catalog.pending()),
            "health": [f"pool {p['name']}: {h}" for p in pools for h in p["health"]],
        }

    @_locked
    def health(self) -> list[str]:
        """One line per problem, naming its pool (what the daemon logs on dm
        events; the same lines as ``status()["health"]``, without the cost
        of querying every volume)."""
        pools = [self._pool_json(p) for p in self.catalog.pools()]
        return [f"pool {p['name']}: {h}" for p in pools for h in p["health"]]

    @_locked
    def teardown(self) -> None:
        """Deactivate every device of every pool (not done on a plain stop);
        exports are taken down, journals drained onto their volumes first."""
        for eid in list(self._exports):
            self._stop_export(eid, keep=False)
        for pid in list(self._journals):
            self._stop_journal(pid, drain=True)
        for pool in self.catalog.pools():
            self._teardown_devices(self._pool_devices(pool.name, pool.uuid[:8]))
            self._detach_loops(pool.name)
        self._backends.clear()


@dataclass(frozen=True)
class _WaitFor:
    """snapshot_create's answer is a marker's snapshot: wait (unlocked)."""

    pj: PoolJournal
    marker: int
    extra: Json


class VolumeIO:
    """A handle on one journaled volume: what a local writer (tests, bench,
    the SCSI target later) uses. Offsets and lengths in bytes, multiples of
    512; reads see every acknowledged write."""

    def __init__(self, pj: PoolJournal, vol_id: int, size: int, ref: str) -> None:
        self._pj, self.vol_id, self.size, self.ref = pj, vol_id, size, ref

    def _check(self, offset: int, length: int) -> None:
        if offset % SECTOR or length % SECTOR or offset < 0 or length <= 0:
            raise E.InvalidArgument(
                f"{self.ref}: offset {offset} and length {length} must be positive multiples of 512"
            )
        if offset + length > self.size:
            raise E.InvalidArgument(
                f"{self.ref}: {length} bytes at {offset} go beyond the volume's {self.size} bytes"
            )

    def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> int:
        self._check(offset, len(data))
        try:
            return self._pj.write(self.vol_id, offset, data, fua=fua)
        except JournalError as e:
            raise _journal_error(e) from None

    def discard(self, offset: int, length: int) -> int:
        """The range reads zeros from now on; its space goes back to the pool
        (thin: whole thin blocks) once the journal's flusher reaches it, in
        order with the writes and snapshots around it."""
        self._check(offset, length)
        try:
            return self._pj.discard(self.vol_id, offset, length)
        except JournalError as e:
            raise _journal_error(e) from None

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        try:
            return self._pj.read(self.vol_id, offset, length)
        except JournalError as e:
            raise _journal_error(e) from None

    def flush(self) -> None:
        try:
            self._pj.flush()
        except JournalError as e:
            raise _journal_error(e) from None
