"""LIO configuration through rtslib-fb: the user backstore of each exported
volume, and its fabric (tcm_loop for a local disk, iSCSI for initiators on
the network). One place for every configfs write dmsnap makes.

Backstores are named ``dmsnap-<pool>-<vol>`` (``...@<snap>`` for a snapshot)
and carry ``dev_config=dmsnap/<pool>/<vol>``: the subtype ``dmsnap`` marks
them as ours (other TCMU handlers leave them alone) and names the volume.
An export whose initiators have different snapshot rights has a second
backstore over the same volume, ``...-nosnap``, with the same unit serial.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import subprocess
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("dmsnap.scsi")

CONFIGFS = "/sys/kernel/config/target"
SUBTYPE = "dmsnap"
# The ring: 64 MiB of data area (the kernel's default is 1 GiB per device)
# and 1 MiB per command (not 64 KiB): room for ~64 commands of 1 MiB or
# thousands of 4 KiB ones in flight.
DATA_AREA_MB = 64
MAX_SECTORS = 2048
# TCMU's timeouts (seconds; docs/scsi.md "Timeouts"). cmd_time_out: how long
# a command may sit in the ring unanswered before the kernel fails it
# (CHECK CONDITION: an I/O error at the initiator). While dmsnapd restarts,
# commands wait in the ring; the restarted daemon answers them BUSY, which
# initiators retry. So it must outlast a restart with its reassembly (the
# kernel's default, 30 s, is what a large installation may take), and still
# end: a daemon that never comes back must not hang initiators forever (0
# would). qfull_time_out: how long a command waits for room in the ring
# before the kernel answers TASK SET FULL, which initiators retry after
# backing off: well below an initiator's command timeout (Linux sd: 30 s),
# so it comes back to be retried instead of being aborted.
CMD_TIME_OUT = 120
QFULL_TIME_OUT = 20
# LIO's dbroot: where the kernel writes persistent-reservation state
# (pr/aptpl_<unit serial>) and ALUA state (alua/). rtslib-fb and targetcli
# move it here while no device exists; the kernel's own default is
# /var/target.
DBROOT = "/etc/target"


class LioError(Exception):
    pass


def _rtslib():
    try:
        import rtslib_fb
    except ImportError as e:  # pragma: no cover - an install problem
        raise LioError("rtslib-fb is not installed (pip install 'dmsnap[scsi]')") from e
    return rtslib_fb


def available() -> str | None:
    """None if LIO can be used, else why not."""
    if not os.path.isdir(CONFIGFS):
        return f"{CONFIGFS} missing: load target_core_mod and mount configfs"
    if not os.path.isdir("/sys/module/target_core_user"):
        return "the target_core_user module is not loaded"
    return None


def ensure_dbroot() -> str:
    """LIO's dbroot exists with its ``pr/`` and ``alua/`` directories; returns it.

    Without ``pr/`` every PERSISTENT RESERVE OUT fails (NOT READY, LOGICAL
    UNIT COMMUNICATION FAILURE): the kernel rewrites ``pr/aptpl_SERIAL`` at
    each one, APTPL or not. The dbroot can only change while LIO has no
    device, so: make ``/etc/target`` (rtslib-fb insists on it and moves the
    dbroot there while it still can), point an unused LIO at it, then make
    the directories in whatever dbroot the kernel holds (a dbroot an
    administrator chose is kept). A failure is logged, not raised: exports
    work without it, only PROUT does not."""
    path = f"{CONFIGFS}/dbroot"
    try:
        with open(path) as f:
            cur = f.read().strip()
    except OSError:
        return ""  # no LIO: available() says so
    try:
        os.makedirs(DBROOT, mode=0o755, exist_ok=True)
        if cur != DBROOT and not glob.glob(f"{CONFIGFS}/core/*_*/*/"):
            with contextlib.suppress(OSError), open(path, "w") as f:
                f.write(DBROOT)  # the kernel refuses once a device exists
            with open(path) as f:
                cur = f.read().strip()
        for sub in ("", "pr", "alua"):
            os.makedirs(os.path.join(cur, sub), mode=0o755, exist_ok=True)
    except OSError as e:
        log.error(
            "LIO dbroot %s: %s; persistent reservations will fail (LOGICAL UNIT "
            "COMMUNICATION FAILURE) until %s/pr exists",
            cur,
            e,
            cur,
        )
    return cur


@dataclass(frozen=True)
class Backstore:
    name: str
    hba: int  # user_<hba>
    wwn: str  # T10 unit serial


def create_backstore(name: str, config: str, size: int, wwn: str) -> Backstore:
    """A user backstore for ``config`` (``pool/vol``); returns it with its
    HBA number (the UIO device's name carries it)."""
    rts = _rtslib()
    # before rtslib-fb reads the dbroot: it gives a backstore made again (LIO
    # lost it: a reboot) its APTPL reservations back from dbroot/pr
    ensure_dbroot()
    so = rts.UserBackedStorageObject(
        name,
        config=f"{SUBTYPE}/{config}",
        size=size,
        wwn=wwn,
        hw_max_sectors=MAX_SECTORS,
        control=f"max_data_area_mb={DATA_AREA_MB},nl_reply_supported=-1",
    )
    # .../core/user_<N>/<name>
    hba = int(os.path.basename(os.path.dirname(so.path)).removeprefix("user_"))
    with contextlib.suppress(Exception):
        so.set_attribute("emulate_write_cache", "0")  # WCE is ours to report
    # Before any LUN maps it: the kernel refuses cmd_time_out on an exported device.
    so.set_attribute("cmd_time_out", str(CMD_TIME_OUT))
    so.set_attribute("qfull_time_out", str(QFULL_TIME_OUT))
    return Backstore(name, hba, wwn)


def timeouts(bs: Backstore) -> dict[str, int]:
    """The TCMU timeouts the kernel holds for ``bs`` (seconds)."""
    so = _storage_object(bs)
    return {a: int(so.get_attribute(a)) for a in ("cmd_time_out", "qfull_time_out")}


@dataclass(frozen=True)
class BlockBackstore:
    """A kernel ``iblock`` backstore: LIO serves a block device itself, no
    daemon in the path. dmsnap exports never use one; bench/scsi_bench.py
    measures the user backstore against it on the same dm device."""

    name: str
    hba: int  # iblock_<hba>
    dev: str
    wwn: str  # T10 unit serial


def create_iblock(name: str, dev: str, wwn: str, *, thin: bool = False) -> BlockBackstore:
    """``thin``: LIO advertises logical block provisioning (UNMAP, WRITE
    SAME with UNMAP) for a device that discards, as a dmsnap export does."""
    rts = _rtslib()
    ensure_dbroot()
    # LIO opens the device O_EXCL; a journal's plain opens of it still work
    so = rts.BlockStorageObject(name, dev=dev, wwn=wwn)
    if thin:
        so.set_attribute("emulate_tpu", "1")
        so.set_attribute("emulate_tpws", "1")
    hba = int(os.path.basename(os.path.dirname(so.path)).removeprefix("iblock_"))
    return BlockBackstore(name, hba, dev, wwn)


def delete_iblock(bs: BlockBackstore) -> None:
    with contextlib.suppress(Exception):
        _storage_object(bs).delete()


def find_backstore(name: str) -> Backstore | None:
    for path in glob.glob(f"{CONFIGFS}/core/user_*/{name}"):
        hba = int(os.path.basename(os.path.dirname(path)).removeprefix("user_"))
        try:
            with open(f"{path}/wwn/vpd_unit_serial") as f:
                wwn = f.read().split(":", 1)[-1].strip()
        except OSError:
            wwn = ""
        return Backstore(name, hba, wwn)
    return None


def _storage_object(bs: Backstore | BlockBackstore):
    rts = _rtslib()
    if isinstance(bs, BlockBackstore):
        return rts.BlockStorageObject(bs.name, index=bs.hba)
    return rts.UserBackedStorageObject(bs.name, index=bs.hba)


def control(bs: Backstore, action: str, value: int) -> None:
    """The TCMU actions on a backstore: ``block_dev`` 1/0 holds/lets go of
    new commands (across a daemon restart), ``reset_ring`` 1 retries (or 2
    fails) what is in the ring."""
    path = f"{CONFIGFS}/core/user_{bs.hba}/{bs.name}/action/{action}"
    with open(path, "w") as f:
        f.write(str(value))


def delete_backstore(bs: Backstore) -> None:
    with contextlib.suppress(Exception):
        so = _storage_object(bs)
        for t in _targets_of(bs):  # a LUN still on it: unlinked in a child (below)
            _unlink_target(t, so.path)
        so.delete()


# -- LUN links: calls that wait for our own ring ------------------------------------
#
# Linking a backstore into a TPG as a LUN (a configfs symlink) and unlinking
# it can make the kernel wait for the backstore's ring inside that system
# call: on tcm_loop the link scans the new SCSI disk there and then (INQUIRY,
# VPD pages: scsi_add_device) and the unlink removes it (a SYNCHRONIZE CACHE
# for a write-back disk, its dirty pages); any LUN's unlink waits for the
# LUN's commands in flight. dmsnapd answers that ring itself. A task of
# dmsnapd asleep there (uninterruptibly) when dmsnapd is killed cannot exit,
# so the process cannot finish dying: it keeps every other export's ring and
# the daemon's lock until the commands time out (cmd_time_out, then the SCSI
# error handler's retries: minutes), no new dmsnapd can start, and the other
# exports' initiators get I/O errors. So a short-lived child (coreutils) makes
# those two calls and dmsnapd only waits for it, which a kill ends at once;
# the next dmsnapd serves the ring again and the child's call completes
# (docs/scsi.md, "A kill while the kernel waits for dmsnapd itself").

LUN_LINK = "dmsnap"  # the LUN's link name: fixed, so a link made twice is seen as one


def _in_child(*argv: str) -> subprocess.CompletedProcess[str]:
    # close_fds (the default): the child must not hold our rings or lock
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def _link_lun(so_path: str, lun_dir: str) -> None:
    """``lun_dir`` (a TPG's LUN, made) serves the storage object at
    ``so_path``. The same link made before (a killed daemon's child, still
    finishing) counts as made: ours waits for it on the directory's lock."""
    link = f"{lun_dir}/{LUN_LINK}"
    r = _in_child("ln", "-sT", so_path, link)  # -T: never a link inside the backstore
    if r.returncode != 0 and not (
        os.path.islink(link) and os.path.realpath(link) == os.path.realpath(so_path)
    ):
        raise LioError(f"cannot link {so_path} as {lun_dir}: {r.stderr.strip()}")


def _unlink(link: str) -> None:
    r = _in_child("unlink", link)
    if r.returncode != 0 and os.path.lexists(link):
        raise LioError(f"cannot unlink {link}: {r.stderr.strip()}")


def _unlink_lun(lun: Any) -> None:
    """A TPG LUN (rtslib) let go of its backstore, the ACLs' mappings of it
    first as rtslib does; its directory stays for rtslib to remove (that
    waits for nothing)."""
    with contextlib.suppress(Exception):  # a LUN without a link has no mappings
        for mlun in lun.mapped_luns:
            mlun.delete()
    for link in glob.glob(f"{lun.path}/*"):
        if os.path.islink(link):
            _unlink(link)


def _unlink_target(target: Any, so_path: str | None = None) -> None:
    """Every LUN of ``target`` (those serving ``so_path``, or all) let go
    of its backstore."""
    want = os.path.realpath(so_path) if so_path is not None else None
    for tpg in target.tpgs:
        for lun in tpg.luns:
            links = [x for x in glob.glob(f"{lun.path}/*") if os.path.islink(x)]
            if want is None or any(os.path.realpath(x) == want for x in links):
                _unlink_lun(lun)


# -- fabrics ----------------------------------------------------------------------


def _local_wwn(bs: Backstore | BlockBackstore) -> str:
    """The tcm_loop target's WWN for a backstore: derived from its name, so
    a daemon started after one killed while making the target finds it."""
    return "naa.5001405" + hashlib.sha256(bs.name.encode()).hexdigest()[:9]


def export_local(bs: Backstore | BlockBackstore) -> str:
    """A tcm_loop target with the backstore as LUN 0; returns its naa WWN.
    Completes one a killed daemon left half made (each step is made only
    if missing)."""
    rts = _rtslib()
    so = _storage_object(bs)
    target = rts.Target(rts.FabricModule("loopback"), _local_wwn(bs))
    tpg = rts.TPG(target, 1)  # with its nexus (tcm_loop's initiator side)
    lun_dir = f"{tpg.path}/lun/lun_0"
    with contextlib.suppress(FileExistsError):
        os.mkdir(lun_dir)  # the LUN item alone: nothing reaches the ring yet
    _link_lun(so.path, lun_dir)
    return target.wwn


def unexport_local(wwn: str) -> None:
    rts = _rtslib()
    with contextlib.suppress(Exception):
        target = rts.Target(rts.FabricModule("loopback"), wwn, mode="lookup")
        _unlink_target(target)
        target.delete()


def export_iscsi(
    bs: Backstore | BlockBackstore,
    iqn: str,
    portal: tuple[str, int],
    allow: list[str],
    chap: Mapping[str, Any],
    *,
    allow_any: bool = False,
    refusing: Backstore | None = None,
    refusing_for: Collection[str] = (),
) -> None:
    """An iSCSI target serving ``bs`` as LUN 0 to the ``allow`` initiators,
    or to every initiator (demo mode) with ``allow_any`` and no ``allow``.
    ``chap``: initiator IQN -> its credentials (scsi.chap.ChapCreds; ``*``:
    every initiator of an ``allow_any`` target); when there are any, every
    login must authenticate (an initiator without them cannot log in).
    ``refusing``: the volume's backstore that refuses the snapshot command;
    it becomes the TPG's LUN 1 and the initiators in ``refusing_for`` see
    it, not ``bs``, as their LUN 0."""
    if bool(allow) == allow_any:  # closed by default: never demo mode by omission
        raise LioError("an iSCSI target admits the listed initiators, or any with allow_any")
    rts = _rtslib()
    fm = rts.FabricModule("iscsi")
    target = rts.Target(fm, iqn)
    try:
        tpg = rts.TPG(target, 1)
        rts.LUN(tpg, 0, _storage_object(bs))
        other = rts.LUN(tpg, 1, _storage_object(refusing)) if refusing is not None else None
        if other is not None and not allow:  # demo mode would show both LUNs to everyone
            raise LioError("per-initiator snapshot rights need an ACL per initiator")
        rts.NetworkPortal(tpg, portal[0], portal[1])
        if allow:
            tpg.set_attribute("generate_node_acls", "0")
            _map_acls(tpg, allow, chap, refusing_for)
        else:  # demo mode: any initiator may log in
            tpg.set_attribute("generate_node_acls", "1")
            tpg.set_attribute("demo_mode_write_protect", "0")
            tpg.set_attribute("cache_dynamic_acls", "1")
        tpg.set_attribute("authentication", "1" if chap else "0")
        if allow_any and "*" in chap:  # demo mode: the TPG's credentials for everyone
            _set_chap(tpg, chap["*"])
        tpg.enable = True
    except Exception:
        with contextlib.suppress(Exception):
            target.delete()
        raise


def _tpg(iqn: str):
    rts = _rtslib()
    return rts.TPG(rts.Target(rts.FabricModule("iscsi"), iqn, mode="lookup"), 1, mode="lookup")


def _lun0(acl) -> Any:
    """The ACL's mapping of its LUN 0, or None."""
    return next((m for m in acl.mapped_luns if m.mapped_lun == 0), None)


def iscsi_acls(iqn: str) -> dict[str, tuple[int, bool]]:
    """The initiators an iSCSI export's ACLs admit: for each, the TPG LUN
    its LUN 0 maps to (0 takes the snapshot command, 1 refuses it; -1 none)
    and whether it is logged in now."""
    out = {}
    for acl in _tpg(iqn).node_acls:
        m = _lun0(acl)
        out[acl.node_wwn] = (m.tpg_lun.lun if m is not None else -1, acl.session is not None)
    return out


def _set_chap(obj: Any, creds: Any) -> None:
    """A node ACL's (or a demo-mode TPG's) CHAP: the initiator's user and
    secret and, for mutual CHAP, the target's own."""
    obj.chap_userid = creds.userid
    obj.chap_password = creds.secret
    if creds.mutual:
        obj.chap_mutual_userid = creds.mutual_userid
        obj.chap_mutual_password = creds.mutual_secret


def _map_acls(
    tpg: Any, allow: list[str], chap: Mapping[str, Any], refusing_for: Collection[str]
) -> None:
    """The TPG's ACLs admit exactly ``allow``, each initiator's LUN 0 mapped
    to TPG LUN 0, or to LUN 1 (the backstore refusing the snapshot command)
    for those in ``refusing_for``. An ACL that goes takes its initiator's
    session with it (LIO logs it out); a mapping that changes is made anew,
    so the caller makes sure its initiator is not logged in."""
    rts = _rtslib()
    luns = {lun.lun: lun for lun in tpg.luns}
    acls = {acl.node_wwn: acl for acl in tpg.node_acls}
    for name, acl in acls.items():
        if name not in allow:
            acl.delete()
    for initiator in allow:
        want = luns[1 if initiator in refusing_for else 0]
        acl = acls.get(initiator)
        if acl is None:
            acl = rts.NodeACL(tpg, initiator)
            if initiator in chap:
                _set_chap(acl, chap[initiator])
        elif (m := _lun0(acl)) is not None:
            if m.tpg_lun.lun == want.lun:
                continue
            m.delete()
        rts.MappedLUN(acl, 0, want)


def update_iscsi_acls(
    iqn: str,
    allow: list[str],
    chap: Mapping[str, Any],
    refusing_for: Collection[str] = (),
) -> None:
    """A running export's ACLs for a new ``allow`` list (not empty: a target
    in demo mode has no ACLs to edit), mapped as :func:`_map_acls` says."""
    _map_acls(_tpg(iqn), allow, chap, refusing_for)


def add_iscsi_lun(iqn: str, index: int, bs: Backstore) -> None:
    """A TPG LUN serving ``bs`` (no initiator sees it until an ACL maps it)."""
    _rtslib().LUN(_tpg(iqn), index, _storage_object(bs))


def remove_iscsi_lun(iqn: str, index: int) -> None:
    """Drop a TPG LUN (and any ACL mapping of it)."""
    for lun in _tpg(iqn).luns:
        if lun.lun == index:
            _unlink_lun(lun)
            lun.delete()


def unexport_iscsi(iqn: str) -> None:
    rts = _rtslib()
    with contextlib.suppress(Exception):
        target = rts.Target(rts.FabricModule("iscsi"), iqn, mode="lookup")
        _unlink_target(target)
        target.delete()


def scsi_disks_with_serial(serial: str) -> list[tuple[str, str]]:
    """(sysfs SCSI device, /dev/sdX) of every probed disk whose unit serial
    (VPD 0x80) is ``serial``: one per path (session) to the LUN."""
    out = []
    for dev in glob.glob("/sys/bus/scsi/devices/*:*:*:*"):
        try:
            with open(f"{dev}/vpd_pg80", "rb") as f:
                page = f.read()
        except OSError:
            continue
        if page[4:].rstrip(b"\0 ").decode(errors="replace") != serial:
            continue
        blocks = glob.glob(f"{dev}/block/*")
        if blocks:
            out.append((dev, "/dev/" + os.path.basename(blocks[0])))
    return out


def scsi_disk_for(serial: str, timeout: float = 30.0) -> str | None:
    """The /dev/sdX whose unit serial (VPD 0x80) is ``serial`` (a local
    export's disk appears once the kernel has probed it)."""
    deadline = time.monotonic() + timeout
    while True:
        found = scsi_disks_with_serial(serial)
        if found:
            return found[0][1]
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


def _targets_of(bs: Backstore | BlockBackstore):
    """The fabric targets with a LUN on this backstore."""
    so = _storage_object(bs)
    seen = {}
    for lun in so.attached_luns:
        t = lun.parent_tpg.parent_target
        seen[t.path] = t
    return list(seen.values())


def find_local(bs: Backstore) -> str | None:
    """The tcm_loop target already serving this backstore (a daemon restart)."""
    wwn = _local_wwn(bs)
    target = f"{CONFIGFS}/loopback/{wwn}"
    if os.path.isdir(target):
        # Only this target's LUN is looked at: another export's LUN whose
        # link a killed daemon's child is still making stays locked until
        # that export's ring is served again, which may come after ours.
        link = f"{target}/tpgt_1/lun/lun_0/{LUN_LINK}"
        with contextlib.suppress(Exception):
            so = _storage_object(bs).path
            if os.path.islink(link) and os.path.realpath(link) == os.path.realpath(so):
                return wwn
        return None  # half made: export_local completes it
    # made by an older dmsnap, with a random WWN
    with contextlib.suppress(Exception):
        for t in _targets_of(bs):
            if t.fabric_module.name == "loopback":
                return t.wwn
    return None


def iscsi_exists(iqn: str) -> bool:
    return os.path.isdir(f"{CONFIGFS}/iscsi/{iqn}")


def remove_fabrics(bs: Backstore | BlockBackstore) -> None:
    """Every target exporting this backstore goes (each serves one volume),
    also its tcm_loop target left without its LUN by a killed daemon."""
    with contextlib.suppress(Exception):
        for t in _targets_of(bs):
            _unlink_target(t)
            t.delete()
    unexport_local(_local_wwn(bs))
