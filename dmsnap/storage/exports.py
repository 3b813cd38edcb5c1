"""Exports: journaled volumes and snapshots served over SCSI through LIO,
as a local disk (tcm_loop) or an iSCSI target.

:class:`Exports` is composed into the storage core (``Manager.exports``)
and reaches it only through :class:`StorageCore`, a narrow interface: the
catalog, the lock, a pool's journal, a volume's data path, a snapshot's
activation. The control protocol's ``export.*`` requests go to the
Manager's ``export_*`` methods, which hand them on here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import stat
import threading
from typing import Any, Protocol

from dmsnap import errors as E
from dmsnap.dm.udev import LINK_DIR
from dmsnap.journal.service import PoolJournal
from dmsnap.scsi import chap as chap_mod
from dmsnap.storage import names
from dmsnap.storage._common import Json, locked_user_errors
from dmsnap.storage.catalog import Catalog, Pool
from dmsnap.storage.inband import InbandSnapshots, SnapshotCore
from dmsnap.storage.volume_io import VolumeIO

log = logging.getLogger("dmsnap.storage")


# RFC 3720/3722 as LIO (rtslib-fb) takes them: a reversed domain of two
# labels or more, lower case, no underscore; anything laxer reached rtslib
# and failed inside export.create. fullmatch: ``$`` would let "\n" through.
_IQN_RE = re.compile(r"iqn\.[0-9]{4}-(0[1-9]|1[0-2])\.[a-z0-9-]+(\.[a-z0-9-]+)+(:[a-z0-9.:-]+)?")


def _check_iqn(iqn: str) -> str:
    if not _IQN_RE.fullmatch(iqn) or len(iqn) > 223:
        raise E.InvalidArgument(
            f"{iqn!r} is not an iSCSI name (iqn.YYYY-MM.reversed.domain[:name],"
            " lower case, no underscore)"
        )
    return iqn


def default_iqn(pool: str, vol: str, snap: str | None) -> str:
    """The target name of an export made without ``--iqn``. Storage names may
    hold capitals and underscores, iSCSI names may not: lower-cased, with
    ``_`` as ``-`` (names differing only so share a default IQN; ``--iqn``
    tells them apart)."""
    tail = ".".join(n for n in (pool, vol, snap) if n is not None)
    return "iqn.2026-11.org.dmsnap:" + tail.lower().replace("_", "-")


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


LOCAL_HOST = "(this host)"  # the one initiator of a local (tcm_loop) export


def snapshot_senders(ex: Any) -> frozenset[str] | None:
    """Who can send the in-band snapshot command to this export and have it
    taken (its first backstore): None for every initiator (an iSCSI export
    open to all, --allow-any), else their names (:data:`LOCAL_HOST` for a
    local export); empty: nobody."""
    if ex.snapshot is not None or ex.snapshot_allow == ():
        return frozenset()
    if ex.kind == "local":
        return frozenset({LOCAL_HOST})
    allow = ex.config.get("allow") or []
    if ex.config.get("allow_any") or not allow:
        return None if ex.snapshot_allow is None else frozenset()
    if ex.snapshot_allow is None:
        return frozenset(allow)
    return frozenset(allow) & frozenset(ex.snapshot_allow)


def _check_chap(
    chap: list[list[str]], allow: list[str] | None, allow_any: bool
) -> list[chap_mod.ChapCreds]:
    """The CHAP entries of a new iSCSI export, checked against who may log
    in: with --allow, one entry for each of them (every login authenticates,
    so an initiator without one could not log in); without --allow, the
    entries name the initiators; with --allow-any, one entry for ``*``."""
    try:
        creds = chap_mod.from_wire(chap)
    except chap_mod.ChapError as e:
        raise E.InvalidArgument(str(e)) from None
    named = [c.initiator for c in creds]
    if allow_any:
        if named != [chap_mod.ANY]:
            raise E.InvalidArgument(
                "with --allow-any the CHAP file has one line, for '*' (every initiator)"
            )
        return creds
    if chap_mod.ANY in named:
        raise E.InvalidArgument("'*' in the CHAP file is for --allow-any: name each initiator")
    for i in named:
        _check_iqn(i)
    if allow:
        if stray := [i for i in named if i not in allow]:
            raise E.InvalidArgument(f"{stray[0]} has a CHAP line but is not in --allow")
        if missing := [i for i in allow if i not in named]:
            raise E.InvalidArgument(
                f"{missing[0]} is in --allow but has no CHAP line (with CHAP every "
                "initiator logs in with its own secret)"
            )
    return creds


def _chap_modes(ex: Any) -> dict[str, str]:
    """Initiator -> "one-way" or "mutual", as export list shows CHAP."""
    modes = ex.config.get("chap")
    if isinstance(modes, list):  # an older catalog's one shared secret, not moved yet
        return dict.fromkeys(ex.config.get("allow") or [chap_mod.ANY], "one-way")
    return dict(modes or {})


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


class StorageCore(SnapshotCore, Protocol):
    """What the exports use of the storage core (the Manager)."""

    catalog: Catalog
    lock: threading.RLock
    state_dir: str
    worker_nice: int  # the fast-path threads' nice (dmsnapd --worker-nice)

    def journal_of(self, pool: Pool) -> PoolJournal | None: ...

    def link(self, pool: str, vol: str, snap: str | None = None) -> str: ...

    def open_volume(self, pool: str, vol: str) -> VolumeIO: ...

    def snapshot_activate(self, pool: str, vol: str, name: str) -> Json: ...

    def check_snapshot_valid(self, s: Any) -> None: ...

    def unmap_granularity(self, pool: Pool) -> int | None: ...


class Exports:
    """The export operations. An export serves a volume through its pool's
    journal; volume and snapshot operations refuse while one is exported
    (:meth:`check_not_exported`)."""

    def __init__(self, core: StorageCore) -> None:
        self.core = core
        self.catalog = core.catalog
        self.lock = core.lock  # the core's one control lock (@locked_user_errors)
        self.state_dir = core.state_dir
        self.running: dict[int, Any] = {}  # export id -> dmsnap.scsi.target.Running
        self.errors: dict[int, str] = {}  # export id -> why it is not running

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
            # who logs in with CHAP and how; the secrets stay in their file
            "chap": _chap_modes(ex),
            # who may send the snapshot command: "all" or a list (empty: nobody)
            "snapshot_allow": "all" if ex.snapshot_allow is None else list(ex.snapshot_allow),
            "running": ex.id in self.running,
        }
        if ex.id in self.errors:
            out["error"] = self.errors[ex.id]
        if ex.id in self.running:
            out["stats"] = self.running[ex.id].stats()
        return out

    def _find_export(self, pool: str, vol: str, snap: str | None) -> Any:
        for ex in self.catalog.exports(pool):
            if ex.volume == vol and ex.snapshot == snap:
                return ex
        return None

    def _check_iqn_free(self, iqn: str) -> None:
        """An iSCSI target serves one export (one LUN): refuse an IQN that an
        export has, or that LIO has for a target dmsnap did not make.
        (Accepted before, the second export was listed as running with no
        LUN, and unexporting the first deleted the target under it.)"""
        from dmsnap.scsi import lio

        for ex in self.catalog.exports():
            if ex.kind == "iscsi" and ex.config.get("iqn") == iqn:
                raise E.AlreadyExists(
                    f"iSCSI target {iqn} already serves {ex.ref}: a target has one "
                    "LUN; choose another --iqn"
                )
        if lio.available() is None and lio.iscsi_exists(iqn):
            raise E.AlreadyExists(
                f"iSCSI target {iqn} exists in LIO and is not a dmsnap export; choose another --iqn"
            )

    @locked_user_errors
    def create(
        self,
        pool: str,
        vol: str,
        *,
        snap: str | None = None,
        kind: str = "local",
        iqn: str | None = None,
        portal: str | None = None,
        allow: list[str] | None = None,
        allow_any: bool = False,
        chap: list[list[str]] | None = None,
        snapshot_allow: list[str] | None = None,
    ) -> Json:
        """Serve POOL/VOL (or a snapshot of it, read-only) over SCSI: a local
        disk through tcm_loop, or an iSCSI target. An iSCSI target admits
        the ``allow`` initiators (an ACL each), or, only when ``allow_any``
        says so, every initiator (demo mode; a warning). ``snapshot_allow``:
        who may send the in-band snapshot command (:func:`snapshot_rights`)."""
        from dmsnap.scsi import lio

        names.check_name("pool", pool)
        names.check_name("volume", vol)
        if snap is not None:
            names.check_name("snapshot", snap)
        if kind not in ("local", "iscsi"):
            raise E.InvalidArgument(f"export kind must be local or iscsi, not {kind!r}")
        if kind == "local" and (iqn or portal or allow or allow_any or chap):
            raise E.InvalidArgument(
                "--iqn, --portal, --allow, --allow-any and --chap are for --iscsi"
            )
        creds: list[chap_mod.ChapCreds] = []
        if kind == "iscsi" and chap is not None:
            creds = _check_chap(chap, allow, allow_any)
            allow = allow or ([] if allow_any else [c.initiator for c in creds])
        if kind == "iscsi":
            # closed by default, as targetcli: an ACL per initiator
            if allow and allow_any:
                raise E.InvalidArgument("--allow-any or --allow INITIATOR_IQN, not both")
            if not allow and not allow_any:
                raise E.InvalidArgument(
                    "an iSCSI export admits only the initiators named with --allow "
                    "INITIATOR_IQN (repeat); --allow-any opens it to every initiator "
                    "(demo mode: read-write, no ACL)"
                )
        if kind == "iscsi" and iqn:
            self._check_iqn_free(_check_iqn(iqn))
        p = self.catalog.pool(pool)
        v = self.catalog.volume(pool, vol)
        s = self.catalog.snapshot(pool, vol, snap) if snap is not None else None
        if snap is None and self.core.journal_of(p) is None:
            raise E.InvalidArgument(
                f"pool {pool} has no journal: its volumes are block devices already "
                f"({self.core.link(pool, vol)}); exports serve journaled volumes"
            )
        if s is not None:
            self.core.check_snapshot_valid(s)  # an overflowed snapshot's content is not its own
        if self._find_export(pool, vol, snap) is not None:
            ref = f"{pool}/{vol}" + (f"@{snap}" if snap else "")
            raise E.AlreadyExists(f"{ref} is already exported")
        if (why := lio.available()) is not None:
            raise E.Unavailable(f"cannot export: {why}")
        config: Json = {}
        if kind == "iscsi":
            config["iqn"] = _check_iqn(iqn or default_iqn(pool, vol, snap))
            self._check_iqn_free(config["iqn"])  # also a default one
            config["portal"] = _check_portal(portal or "0.0.0.0:3260")
            config["allow"] = [_check_iqn(a) for a in (allow or [])]
            if len(set(config["allow"])) != len(config["allow"]):
                raise E.InvalidArgument("--allow names an initiator twice")
            if allow_any:
                config["allow_any"] = True
            if creds:
                # who logs in how; the secrets go to a root-only file
                config["chap"] = {c.initiator: c.mode for c in creds}
        rights = snapshot_rights(kind, snap, config.get("allow", []), snapshot_allow)
        serial = f"dmsnap{p.uuid[:6]}{v.id:04x}" + (f"s{s.id:04x}" if s else "")
        if creds:
            self._save_chap(serial, creds)
        try:
            ex = self.catalog.add_export(
                p.id, v.id, s.id if s else None, kind, serial, config, snapshot_allow=rights
            )
        except BaseException:
            self.drop_chap(serial)
            raise
        try:
            if s is not None and not s.active:
                self.core.snapshot_activate(pool, vol, snap)
            self.start(ex)
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop(ex.id, keep=False)
            self.catalog.remove_export(ex.id)
            self.drop_chap(serial)
            raise
        log.info("exported %s (%s)", ex.ref, kind)
        if allow_any:
            log.warning(
                "%s is open to every initiator on %s, read-write, without ACLs (--allow-any)",
                ex.ref,
                config["portal"],
            )
        return self._export_json(ex)

    # -- CHAP secrets: a root-only file per export, never the catalog --------------------

    def _chap_path(self, serial: str) -> str:
        return os.path.join(self.state_dir, "secrets", f"chap-{serial}.json")

    def _save_chap(self, serial: str, creds: list[chap_mod.ChapCreds]) -> str:
        """Write the export's CHAP secrets, mode 0600 in a 0700 directory,
        whole or not at all (a new file renamed over the old, synced)."""
        d = os.path.dirname(self._chap_path(serial))
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)
        path = self._chap_path(serial)
        tmp = f"{path}.{os.getpid()}.new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, json.dumps([c.to_wire() for c in creds]).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return path

    def _load_chap(self, serial: str) -> dict[str, chap_mod.ChapCreds]:
        """The export's CHAP secrets, if their file is still ours alone."""
        path = self._chap_path(serial)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise E.Unavailable(
                f"the CHAP secrets ({path}) cannot be read: {e.strerror}; "
                "unexport and export again with --chap-file"
            ) from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise E.Unavailable(
                    f"{path}: not a file of ours with mode 0600: its CHAP secrets are not used"
                )
            data = f.read(1 << 20)
        try:
            return {c.initiator: c for c in chap_mod.from_wire(json.loads(data))}
        except (ValueError, TypeError) as e:
            raise E.Unavailable(f"{path}: not a dmsnap CHAP file ({e})") from None

    def drop_chap(self, serial: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._chap_path(serial))

    def _chap_of(self, ex: Any) -> tuple[Any, dict[str, chap_mod.ChapCreds]]:
        """The export (as the catalog now has it) and its CHAP credentials by
        initiator. An older catalog kept one shared secret in clear,
        ``[user, secret]``: it moves to the secrets file (for each allowed
        initiator, or ``*`` for an export open to all) and leaves the catalog."""
        modes = ex.config.get("chap")
        if not modes:
            return ex, {}
        if isinstance(modes, list):
            user, secret = modes
            who = ex.config.get("allow") or [chap_mod.ANY]
            creds = [chap_mod.ChapCreds(i, user, secret) for i in who]
            path = self._save_chap(ex.serial, creds)
            config = {**ex.config, "chap": {c.initiator: c.mode for c in creds}}
            ex = self.catalog.update_export(ex.id, config, ex.snapshot_allow)
            log.warning(
                "%s: its CHAP secret was kept in clear in the catalog (and shown in older "
                "dmsnap's log and on its command line): moved to %s (mode 0600); "
                "consider changing it",
                ex.ref,
                path,
            )
            return ex, {c.initiator: c for c in creds}
        creds = self._load_chap(ex.serial)
        if set(creds) != set(modes):
            raise E.Unavailable(
                f"{ex.ref}: the CHAP secrets in {self._chap_path(ex.serial)} are not for its "
                "initiators; unexport and export again with --chap-file"
            )
        return ex, creds

    def _restore_legacy_open(self, ex: Any) -> Any:
        """An iSCSI export written before ACLs were required, with no
        --allow, was open to every initiator. It stays so (its initiators
        keep working after the upgrade), but as an explicit --allow-any,
        recorded in the catalog, shown by export list and warned about."""
        if ex.kind != "iscsi" or ex.config.get("allow") or ex.config.get("allow_any"):
            return ex
        config = {**ex.config, "allow_any": True}
        ex = self.catalog.update_export(ex.id, config, ex.snapshot_allow)
        log.warning(
            "%s was exported to every initiator (no --allow, before ACLs were required): "
            "kept as --allow-any; to close it, unexport it and export it again with --allow",
            ex.ref,
        )
        return ex

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
        pj = self.core.journal_of(p)
        assert pj is not None
        io = self.core.open_volume(ex.pool, ex.volume)
        # one LUN object for every path: the same identity (serial, NAA from
        # the volume), the same journal (writes from any path are ordered in
        # it, so a marker follows every completed write)
        lun = target.VolumeLun(io, wce=pj.mode == "ram", serial=ex.serial)
        service = InbandSnapshots(self.core, ex.pool, ex.volume)
        # UNMAP gives space back in the backend's units (thin: whole thin
        # blocks); where any range gets zeros, the optimal granularity
        unmap_gran = self.core.unmap_granularity(p) or target.Limits.optimal_granularity
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
            worker_nice=self.core.worker_nice,
        )
        return target.LunPath(bs, device, emu, may)

    def start(self, ex: Any) -> None:
        from dmsnap.scsi import lio, target

        ex = self._restore_legacy_open(ex)
        if isinstance(ex.config.get("chap"), list):
            # an older catalog's secret in clear leaves it at every start,
            # also when LIO still has the target (a daemon restart)
            ex, _ = self._chap_of(ex)
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
                    ex, chap = self._chap_of(ex)
                    lio.export_iscsi(
                        paths[0].backstore,
                        fabric,
                        (host, int(port)),
                        ex.config["allow"],
                        chap,
                        allow_any=bool(ex.config.get("allow_any")),
                        refusing=paths[1].backstore if len(paths) > 1 else None,
                        refusing_for=refusing_initiators(ex),
                    )
        except BaseException:
            for pa in paths:
                pa.device.close()
            raise
        self.running[ex.id] = target.Running(paths, fabric, source=src)
        self.errors.pop(ex.id, None)
        if ex.kind == "local" and ex.snapshot is None:
            disk = lio.scsi_disk_for(ex.serial, timeout=30)
            if disk:
                link = os.path.join(LINK_DIR, ex.pool, ex.volume)
                os.makedirs(os.path.dirname(link), exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(link)
                os.symlink(disk, link)

    def stop(self, export_id: int, *, keep: bool) -> None:
        """keep: a daemon stop (LIO holds new commands until we are back);
        else the export goes away (unexport, teardown)."""
        from dmsnap.scsi import lio

        run = self.running.pop(export_id, None)
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

    @locked_user_errors
    def update(
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
        :meth:`create`; None keeps the rights, less initiators that
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
        run = self.running.get(ex.id)
        if run is None:
            why = self.errors.get(ex.id, "not started")
            raise E.Unavailable(f"{ref} is not running ({why}): nothing to change live")
        config = dict(ex.config)
        if allow is not None:
            if ex.kind != "iscsi":
                raise E.InvalidArgument("--allow is for iSCSI exports")
            wanted = [_check_iqn(a) for a in allow]
            if len(set(wanted)) != len(wanted):
                raise E.InvalidArgument("--allow names an initiator twice")
            if ex.config.get("allow_any"):
                raise E.InvalidArgument(
                    f"{ref} is open to every initiator (--allow-any): LIO cannot switch "
                    "that live (unexport and export again with --allow)"
                )
            if not wanted:
                raise E.InvalidArgument(
                    f"{ref}: --allow needs at least one initiator (to admit none, unexport it)"
                )
            modes = _chap_modes(ex)
            if modes and (new_ := [i for i in wanted if i not in modes]):
                raise E.InvalidArgument(
                    f"{ref} logs in with CHAP and {new_[0]} has no secret: unexport and "
                    "export again with a --chap-file that names it"
                )
            config["allow"] = wanted
            if modes:
                config["chap"] = {i: modes[i] for i in wanted}
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
        if config.get("chap") != ex.config.get("chap"):  # an initiator left: its secret too
            _, creds = self._chap_of(ex)
            self._save_chap(ex.serial, [creds[i] for i in config["chap"]])
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
        _, chap = self._chap_of(ex)
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

    @locked_user_errors
    def list(self, pool: str | None = None) -> list[Json]:
        if pool is not None:
            names.check_name("pool", pool)
            self.catalog.pool(pool)
        return [self._export_json(ex) for ex in self.catalog.exports(pool)]

    @locked_user_errors
    def delete(self, pool: str, vol: str, *, snap: str | None = None) -> None:
        names.check_name("pool", pool)
        names.check_name("volume", vol)
        ex = self._find_export(pool, vol, snap)
        if ex is None:
            ref = f"{pool}/{vol}" + (f"@{snap}" if snap else "")
            raise E.NotFound(f"{ref} is not exported")
        self.stop(ex.id, keep=False)
        self.catalog.remove_export(ex.id)
        self.drop_chap(ex.serial)
        self.errors.pop(ex.id, None)
        log.info("unexported %s", ex.ref)

    def check_not_exported(self, pool: str, vol: str, snap: str | None = None) -> None:
        for ex in self.catalog.exports(pool):
            if ex.volume == vol and (snap is None or ex.snapshot == snap):
                raise E.Busy(f"{ex.ref} is exported; unexport it first")

    # -- what the storage core asks of its exports ----------------------------------------

    def visible(self, pool: str, vol: str) -> dict[int, str]:
        """Volume id -> name of the pool's volumes that every initiator able
        to send the in-band command to POOL/VOL's export may snapshot
        through an export of its own: TCMU does not say which initiator
        sent it, so the whole set of senders of this path must hold the
        right (an ``--allow-any`` export's senders are everyone). This
        volume always."""
        exports = [e for e in self.catalog.exports(pool) if e.snapshot is None]
        mine = next((e for e in exports if e.volume == vol), None)
        out: dict[int, str] = {}
        if mine is not None:
            senders = snapshot_senders(mine)
            for e in exports:
                theirs = snapshot_senders(e)
                if theirs is None or (senders and theirs is not None and senders <= theirs):
                    out[e.volume_id] = e.volume
        own = self.catalog.volume(pool, vol)
        out[own.id] = own.name
        return out

    def start_all(self, pool: str | None = None, *, skip: Any = ()) -> None:
        """Start the catalog's exports (not those of the pools in ``skip``;
        with ``pool``, those of that pool not running yet); one that fails
        is recorded in :attr:`errors` and the rest of its pool keeps working."""
        for ex in self.catalog.exports():
            if ex.pool in skip:
                continue
            if pool is not None and (ex.pool != pool or ex.id in self.running):
                continue
            try:
                self.start(ex)
            except Exception as e:
                msg = getattr(e, "message", None) or str(e)
                log.error("export of %s not started: %s", ex.ref, msg)
                self.errors[ex.id] = msg

    def stop_all(self, *, keep: bool) -> None:
        for eid in list(self.running):
            self.stop(eid, keep=keep)

    def remove_pool(self, pool: str, *, force: bool) -> None:
        """A pool being destroyed: its exports go (with ``force``; else the
        first one refuses the destroy), their CHAP secrets with them."""
        for ex in self.catalog.exports(pool):
            if not force:
                raise E.Busy(f"{ex.ref} is exported; unexport it first or use --force")
            self.stop(ex.id, keep=False)
            self.catalog.remove_export(ex.id)
            self.drop_chap(ex.serial)  # its secrets go with it
