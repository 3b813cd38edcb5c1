"""Exports: journaled volumes and snapshots served over SCSI through LIO,
as a local disk (tcm_loop) or an iSCSI target.

The export operations are methods of :class:`dmsnap.storage.manager.Manager`
(the control protocol maps requests 1:1 onto its methods); they live here,
in :class:`ExportsMixin`, so that the file layout shows the export plumbing
apart from pools, volumes and snapshots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import threading
from typing import TYPE_CHECKING, Any

from dmsnap import errors as E
from dmsnap.dm.udev import LINK_DIR
from dmsnap.storage import names
from dmsnap.storage._common import Json, _user_errors
from dmsnap.storage.catalog import Catalog, Pool
from dmsnap.storage.layers import SECTOR
from dmsnap.storage.thin import BLOCK_SECTORS as THIN_BLOCK_SECTORS

if TYPE_CHECKING:  # annotations only: manager.py imports this module
    from dmsnap.journal.service import PoolJournal
    from dmsnap.storage.manager import VolumeIO

# the Manager's logger: export messages read as before the split
log = logging.getLogger("dmsnap.storage")


_IQN_RE = re.compile(r"^iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:[A-Za-z0-9.:_-]+)?$")


def _check_iqn(iqn: str) -> str:
    if not _IQN_RE.match(iqn) or len(iqn) > 223:
        raise E.InvalidArgument(f"{iqn!r} is not an iSCSI name (iqn.YYYY-MM.domain[:name])")
    return iqn


def snapshot_rights(
    kind: str, snap: str | None, allow: list[str], snapshot_allow: list[str] | None
) -> tuple[str, ...] | None:
    """Who may send the in-band snapshot command to a new export, as the
    catalog keeps it: None every initiator that reaches the LUN, else these
    IQNs (empty: nobody). ``snapshot_allow`` as the client sends it: None
    (the default: every initiator), ``["all"]``, ``[]`` (nobody) or IQNs.
    ``allow`` is the export's (checked) login list."""
    if snapshot_allow is None or snapshot_allow == ["all"]:
        # a snapshot export never takes the command (it is read-only): nobody
        return () if snap is not None else None
    if "all" in snapshot_allow:
        raise E.InvalidArgument("--snapshot-allow all stands alone (no initiator names with it)")
    if snap is not None:
        if snapshot_allow:
            raise E.InvalidArgument(
                "a snapshot export is read-only and never takes the snapshot command: "
                "no --snapshot-allow"
            )
        return ()
    if not snapshot_allow:
        return ()
    if kind == "local":
        raise E.InvalidArgument(
            "a local export has one initiator (this host): --snapshot-allow all or --no-snapshot"
        )
    wanted = [_check_iqn(i) for i in snapshot_allow]
    if len(set(wanted)) != len(wanted):
        raise E.InvalidArgument("--snapshot-allow names an initiator twice")
    if not allow:
        # Without node ACLs (any initiator may log in) LIO shows every LUN of
        # the target to everyone: no way to give initiators different rights.
        raise E.InvalidArgument(
            "--snapshot-allow INITIATOR needs --allow (the initiators that may log in): "
            "rights per initiator are given through their ACLs"
        )
    if stray := [i for i in wanted if i not in allow]:
        raise E.InvalidArgument(
            f"--snapshot-allow {stray[0]}: not among the --allow initiators (it could not log in)"
        )
    return tuple(wanted)


def export_paths(ex: Any) -> list[bool]:
    """The backstores an export needs, by whether each takes the snapshot
    command: one when every initiator has the same right, two (taking it,
    refusing it) when an iSCSI export's initiators differ. TCMU does not
    say which initiator sent a command, so rights go by backstore."""
    rights = ex.snapshot_allow
    if ex.snapshot is not None or rights == ():
        return [False]
    if rights is None or ex.kind == "local":
        return [True]
    if set(ex.config.get("allow", [])) <= set(rights):
        return [True]
    return [True, False]


def refusing_initiators(ex: Any) -> list[str]:
    """The allowed initiators whose LUN 0 is the backstore refusing the
    snapshot command: those without the right, where the export has that
    second backstore at all (:func:`export_paths`)."""
    if len(export_paths(ex)) < 2:
        return []
    return [i for i in ex.config.get("allow", []) if i not in (ex.snapshot_allow or ())]


@dataclasses.dataclass(frozen=True)
class PathSource:
    """What every backstore of one export serves, built once per start: a
    path added later (rights that come to differ between initiators) serves
    the same LUN object."""

    config: str  # the backstore's dev_config: POOL/VOL[@SNAP]
    size: int
    lun: Any  # target.VolumeLun or SnapshotDeviceLun
    service: Any  # target.InbandSnapshots, or None for a snapshot
    journal: Any
    vol_id: int
    unmap_gran: int


def _check_portal(portal: str) -> str:
    host, sep, port = portal.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise E.InvalidArgument(f"portal {portal!r}: expected ADDRESS:PORT")
    return portal


class ExportsMixin:
    """The Manager's export operations. A mixin, not a class of its own:
    they need the Manager's catalog, pools, journals and lock (an export
    serves a volume through its pool's journal, and volume and snapshot
    operations refuse while one is exported), so :class:`Manager` inherits
    them and callers keep calling ``manager.export_create(...)``."""

    # Set by Manager.__init__; declared here for readers and type checkers.
    catalog: Catalog
    lock: threading.RLock
    _exports: dict[int, Any]  # export id -> dmsnap.scsi.target.Running
    export_errors: dict[int, str]

    if TYPE_CHECKING:  # Manager methods the exports use

        def _journal(self, pool: Pool) -> PoolJournal | None: ...

        def _link(self, pool: str, vol: str, snap: str | None = None) -> str: ...

        def open_volume(self, pool: str, vol: str) -> VolumeIO: ...

        def snapshot_activate(self, pool: str, vol: str, name: str) -> Json: ...

        def _check_snapshot_valid(self, s: Any) -> None: ...

    def _export_json(self, ex: Any) -> Json:
        out: Json = {
            "pool": ex.pool,
            "volume": ex.volume,
            "snapshot": ex.snapshot,
            "ref": ex.ref,
            "kind": ex.kind,
            "serial": ex.serial,
            "created": ex.created,
            **{k: v for k, v in ex.config.items() if k != "chap"},
            "chap": bool(ex.config.get("chap")),
            # who may send the snapshot command: "all" or a list (empty: nobody)
            "snapshot_allow": "all" if ex.snapshot_allow is None else list(ex.snapshot_allow),
            "running": ex.id in self._exports,
        }
        if ex.id in self.export_errors:
            out["error"] = self.export_errors[ex.id]
        if ex.id in self._exports:
            out["stats"] = self._exports[ex.id].stats()
        return out

    def _find_export(self, pool: str, vol: str, snap: str | None) -> Any:
        for ex in self.catalog.exports(pool):
            if ex.volume == vol and ex.snapshot == snap:
                return ex
        return None

    @_user_errors
    def export_create(
        self,
        pool: str,
        vol: str,
        *,
        snap: str | None = None,
        kind: str = "local",
        iqn: str | None = None,
        portal: str | None = None,
        allow: list[str] | None = None,
        chap: str | None = None,
        snapshot_allow: list[str] | None = None,
    ) -> Json:
        """Serve POOL/VOL (or a snapshot of it, read-only) over SCSI: a local
        disk through tcm_loop, or an iSCSI target. ``snapshot_allow``: who
        may send the in-band snapshot command (see :func:`snapshot_rights`)."""
        from dmsnap.scsi import lio

        names.check_name("pool", pool)
        names.check_name("volume", vol)
        if snap is not None:
            names.check_name("snapshot", snap)
        if kind not in ("local", "iscsi"):
            raise E.InvalidArgument(f"export kind must be local or iscsi, not {kind!r}")
        if kind == "local" and (iqn or portal or allow or chap):
            raise E.InvalidArgument("--iqn, --portal, --allow and --chap are for --iscsi")
        p = self.catalog.pool(pool)
        v = self.catalog.volume(pool, vol)
        s = self.catalog.snapshot(pool, vol, snap) if snap is not None else None
        if snap is None and self._journal(p) is None:
            raise E.InvalidArgument(
                f"pool {pool} has no journal: its volumes are block devices already "
                f"({self._link(pool, vol)}); exports serve journaled volumes"
            )
        if s is not None:
            self._check_snapshot_valid(s)  # an overflowed snapshot's content is not its own
        if self._find_export(pool, vol, snap) is not None:
            ref = f"{pool}/{vol}" + (f"@{snap}" if snap else "")
            raise E.AlreadyExists(f"{ref} is already exported")
        if (why := lio.available()) is not None:
            raise E.Unavailable(f"cannot export: {why}")
        config: Json = {}
        if kind == "iscsi":
            config["iqn"] = _check_iqn(
                iqn or f"iqn.2026-11.org.dmsnap:{pool}.{vol}" + (f".{snap}" if snap else "")
            )
            config["portal"] = _check_portal(portal or "0.0.0.0:3260")
            config["allow"] = [_check_iqn(a) for a in (allow or [])]
            if chap:
                user, sep, secret = chap.partition(":")
                if not sep or not user or not 12 <= len(secret) <= 16:
                    raise E.InvalidArgument("--chap USER:SECRET, the secret 12 to 16 characters")
                config["chap"] = [user, secret]
        rights = snapshot_rights(kind, snap, config.get("allow", []), snapshot_allow)
        serial = f"dmsnap{p.uuid[:6]}{v.id:04x}" + (f"s{s.id:04x}" if s else "")
        ex = self.catalog.add_export(
            p.id, v.id, s.id if s else None, kind, serial, config, snapshot_allow=rights
        )
        try:
            if s is not None and not s.active:
                self.snapshot_activate(pool, vol, snap)
            self._start_export(ex)
        except BaseException:
            with contextlib.suppress(Exception):
                self._stop_export(ex.id, keep=False)
            self.catalog.remove_export(ex.id)
            raise
        log.info("exported %s (%s)", ex.ref, kind)
        return self._export_json(ex)

    def _backstore_name(self, ex: Any, second: bool = False) -> str:
        # second: the one refusing the snapshot command when rights are mixed
        return f"dmsnap-{ex.serial}" + ("-nosnap" if second else "")

    def _path_source(self, ex: Any) -> PathSource:
        from dmsnap.scsi import target

        p = self.catalog.pool_by_id(ex.pool_id)
        v = self.catalog.volume(ex.pool, ex.volume)
        config = f"{ex.pool}/{ex.volume}" + (f"@{ex.snapshot}" if ex.snapshot else "")
        if ex.snapshot is not None:
            path = f"/dev/mapper/{names.dm_snapshot(ex.pool, ex.volume, ex.snapshot)}"
            lun = target.SnapshotDeviceLun(path, v.size, ex.serial)
            return PathSource(config, v.size, lun, None, None, 0, target.Limits.unmap_granularity)
        pj = self._journal(p)
        assert pj is not None
        io = self.open_volume(ex.pool, ex.volume)
        # one LUN object for every path: the same identity (serial, NAA from
        # the volume), the same journal (writes from any path are ordered in
        # it, so a marker follows every completed write)
        lun = target.VolumeLun(io, wce=pj.mode == "ram", serial=ex.serial)
        service = target.InbandSnapshots(self, ex.pool, ex.volume)
        # UNMAP gives space back in whole thin blocks; a classic volume gets
        # zeros at any granularity
        if p.backend == "thin":
            unmap_gran = int(p.config.get("block_sectors", THIN_BLOCK_SECTORS)) * SECTOR
        else:
            unmap_gran = target.Limits.optimal_granularity
        return PathSource(config, v.size, lun, service, pj.journal, v.id, unmap_gran)

    def _open_path(self, ex: Any, src: PathSource, second: bool, may: bool) -> Any:
        """One backstore of the export with its ring served (target.LunPath)."""
        from dmsnap.scsi import lio, target

        name = self._backstore_name(ex, second=second)
        bs = lio.find_backstore(name) or lio.create_backstore(name, src.config, src.size, ex.serial)
        device, emu = target.start_device(
            bs,
            src.lun,
            journal=src.journal,
            vol_id=src.vol_id,
            snapshots=src.service,
            snapshot_allowed=(lambda _i, may=may: may),
            initiator=ex.ref,
            unmap_granularity=src.unmap_gran,
            worker_nice=self.worker_nice,
        )
        return target.LunPath(bs, device, emu, may)

    def _start_export(self, ex: Any) -> None:
        from dmsnap.scsi import lio, target

        src = self._path_source(ex)
        paths: list[target.LunPath] = []
        try:
            for i, may in enumerate(export_paths(ex)):
                paths.append(self._open_path(ex, src, i > 0, may))
            for pa in paths:
                with contextlib.suppress(OSError):  # let commands held over a restart through
                    lio.control(pa.backstore, "block_dev", 0)
            if ex.kind == "local":
                first = paths[0].backstore
                fabric = lio.find_local(first) or lio.export_local(first)
            else:
                fabric = ex.config["iqn"]
                if not lio.iscsi_exists(fabric):
                    host, _, port = ex.config["portal"].rpartition(":")
                    chap = tuple(ex.config["chap"]) if ex.config.get("chap") else None
                    lio.export_iscsi(
                        paths[0].backstore,
                        fabric,
                        (host, int(port)),
                        ex.config["allow"],
                        chap,
                        refusing=paths[1].backstore if len(paths) > 1 else None,
                        refusing_for=refusing_initiators(ex),
                    )
        except BaseException:
            for pa in paths:
                pa.device.close()
            raise
        self._exports[ex.id] = target.Running(paths, fabric, source=src)
        self.export_errors.pop(ex.id, None)
        if ex.kind == "local" and ex.snapshot is None:
            disk = lio.scsi_disk_for(ex.serial, timeout=30)
            if disk:
                link = os.path.join(LINK_DIR, ex.pool, ex.volume)
                os.makedirs(os.path.dirname(link), exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(link)
                os.symlink(disk, link)

    def _stop_export(self, export_id: int, *, keep: bool) -> None:
        """keep: a daemon stop (LIO holds new commands until we are back);
        else the export goes away (unexport, teardown)."""
        from dmsnap.scsi import lio

        run = self._exports.pop(export_id, None)
        ex = next((e for e in self.catalog.exports() if e.id == export_id), None)
        if run is None:
            if ex is not None and not keep:
                found = [lio.find_backstore(self._backstore_name(ex, i)) for i in (False, True)]
                for bs in found:
                    if bs is not None:
                        lio.remove_fabrics(bs)
                for bs in found:
                    if bs is not None:
                        lio.delete_backstore(bs)
            return
        if keep:
            for pa in run.paths:
                with contextlib.suppress(OSError):
                    lio.control(pa.backstore, "block_dev", 1)
            run.stop()
            return
        if ex is not None and ex.kind == "local":
            link = os.path.join(LINK_DIR, ex.pool, ex.volume)
            if os.path.islink(link):
                os.unlink(link)
        for pa in run.paths:
            lio.remove_fabrics(pa.backstore)
        run.stop()
        for pa in run.paths:
            lio.delete_backstore(pa.backstore)

    @_user_errors
    def export_update(
        self,
        pool: str,
        vol: str,
        *,
        snap: str | None = None,
        allow: list[str] | None = None,
        snapshot_allow: list[str] | None = None,
    ) -> Json:
        """Change a running export in place: ``allow`` (iSCSI: the new list of
        initiators that may log in) and ``snapshot_allow`` (as for
        :meth:`export_create`; None keeps the rights, less initiators that
        are no longer allowed). Sessions of initiators that stay, with the
        same rights, go on untouched; an initiator taken off the list is
        logged out. Refused, changing nothing, where LIO cannot follow live:
        opening a target to every initiator or closing one that was, or
        moving a logged-in initiator between the two backstores of an
        export whose initiators' rights differ (see :func:`export_paths`).
        A second backstore is added or taken away as the rights come to
        differ between initiators or stop differing."""
        from dmsnap.scsi import lio

        names.check_name("pool", pool)
        names.check_name("volume", vol)
        if snap is not None:
            names.check_name("snapshot", snap)
        ref = f"{pool}/{vol}" + (f"@{snap}" if snap else "")
        ex = self._find_export(pool, vol, snap)
        if ex is None:
            raise E.NotFound(f"{ref} is not exported")
        if allow is None and snapshot_allow is None:
            raise E.InvalidArgument(
                "nothing to change: give --allow, --snapshot-allow or --no-snapshot"
            )
        run = self._exports.get(ex.id)
        if run is None:
            why = self.export_errors.get(ex.id, "not started")
            raise E.Unavailable(f"{ref} is not running ({why}): nothing to change live")
        config = dict(ex.config)
        if allow is not None:
            if ex.kind != "iscsi":
                raise E.InvalidArgument("--allow is for iSCSI exports")
            wanted = [_check_iqn(a) for a in allow]
            if len(set(wanted)) != len(wanted):
                raise E.InvalidArgument("--allow names an initiator twice")
            if bool(wanted) != bool(ex.config.get("allow")):
                raise E.InvalidArgument(
                    f"{ref} is open to "
                    + ("these initiators only" if ex.config.get("allow") else "every initiator")
                    + ": LIO cannot switch that live (unexport and export again)"
                )
            config["allow"] = wanted
        if snapshot_allow is None:
            rights = ex.snapshot_allow
            if rights:
                rights = tuple(i for i in rights if i in config.get("allow", []))
        else:
            rights = snapshot_rights(ex.kind, ex.snapshot, config.get("allow", []), snapshot_allow)
        new = dataclasses.replace(ex, config=config, snapshot_allow=rights)
        paths = export_paths(new)
        gone = None
        if ex.kind == "iscsi" and config.get("allow"):
            gone = self._relayout_iscsi(ex, new, run)
        for pa, may in zip(run.paths, paths, strict=True):
            # the emulator asks this on every snapshot command: live
            pa.may_snapshot = may
            pa.emulator.snapshot_allowed = lambda _i, may=may: may
        ex = self.catalog.update_export(ex.id, config, rights)
        if gone is not None:
            # no ACL maps it any more: the export works without it whatever
            # happens here
            try:
                gone.device.close()
                lio.delete_backstore(gone.backstore)
            except Exception as e:  # reported; the update stands
                log.warning("%s: removing the unused backstore %s: %s", ref, gone.backstore.name, e)
        log.info("export %s updated", ex.ref)
        return self._export_json(ex)

    def _relayout_iscsi(self, ex: Any, new: Any, run: Any) -> Any:
        """An iSCSI export's ACLs and backstores going from ``ex`` to ``new``
        (the same export with new allow list and rights): a second backstore
        (refusing the snapshot command) added or taken away as
        :func:`export_paths` now says, each initiator's LUN 0 mapped to its
        backstore. Returns the path taken away (for the caller to close once
        the catalog says so) or None."""
        from dmsnap.scsi import lio

        iqn = ex.config["iqn"]
        allow = new.config["allow"]
        two = len(export_paths(new)) > 1
        now = refusing_initiators(new)
        moving = sorted(
            name
            for name, (tpg_lun, logged_in) in lio.iscsi_acls(iqn).items()
            if logged_in and name in allow and tpg_lun != (1 if name in now else 0)
        )
        if moving:
            raise E.Busy(
                f"{ex.ref}: {', '.join(moving)} would change backstore (its snapshot right) "
                "while logged in; log it out first"
            )
        chap = tuple(ex.config["chap"]) if ex.config.get("chap") else None
        added = None
        try:
            if two and len(run.paths) == 1:
                added = self._open_path(ex, run.source, True, False)
                lio.add_iscsi_lun(iqn, 1, added.backstore)
            lio.update_iscsi_acls(iqn, allow, chap, now)
        except Exception:
            # put back what the catalog still says, then report
            with contextlib.suppress(Exception):
                lio.update_iscsi_acls(iqn, ex.config["allow"], chap, refusing_initiators(ex))
            if added is not None:
                with contextlib.suppress(Exception):
                    lio.remove_iscsi_lun(iqn, 1)
                added.device.close()
                with contextlib.suppress(Exception):
                    lio.delete_backstore(added.backstore)
            raise
        if added is not None:
            run.paths.append(added)
        if not two and len(run.paths) > 1:
            gone = run.paths.pop()
            lio.remove_iscsi_lun(iqn, 1)
            return gone
        return None

    @_user_errors
    def export_list(self, pool: str | None = None) -> list[Json]:
        if pool is not None:
            names.check_name("pool", pool)
            self.catalog.pool(pool)
        return [self._export_json(ex) for ex in self.catalog.exports(pool)]

    @_user_errors
    def export_delete(self, pool: str, vol: str, *, snap: str | None = None) -> None:
        names.check_name("pool", pool)
        names.check_name("volume", vol)
        ex = self._find_export(pool, vol, snap)
        if ex is None:
            ref = f"{pool}/{vol}" + (f"@{snap}" if snap else "")
            raise E.NotFound(f"{ref} is not exported")
        self._stop_export(ex.id, keep=False)
        self.catalog.remove_export(ex.id)
        self.export_errors.pop(ex.id, None)
        log.info("unexported %s", ex.ref)

    def _check_not_exported(self, pool: str, vol: str, snap: str | None = None) -> None:
        for ex in self.catalog.exports(pool):
            if ex.volume == vol and (snap is None or ex.snapshot == snap):
                raise E.Busy(f"{ex.ref} is exported; unexport it first")
