"""Which disk is a pool's: the dmsnap label at work (docs/storage.md).

:class:`PoolDisks` is what the Manager asks, in five calls: before
``pool create`` (:meth:`check_new`), while creating (:meth:`write`), at
assembly (:meth:`identify` for data and cache devices, :meth:`hold_journal`
for the journal device) and at ``pool destroy`` (:meth:`wipe`). The label's
format and the scan are in :mod:`dmsnap.storage.label`.
"""

from __future__ import annotations

import logging
import os
import stat

from dmsnap import errors as E
from dmsnap.storage import devices, label
from dmsnap.storage.catalog import Catalog, Pool

log = logging.getLogger("dmsnap.storage")


class PoolDisks:
    def __init__(self, catalog: Catalog, holds: devices.Holds, state_dir: str) -> None:
        self.catalog = catalog
        self.holds = holds  # the Manager's: the journal device's hold lives there
        self.state_dir = state_dir
        self._unlabelled_warned: set[int] = set()

    def _devno(self, path: str, role: str) -> str:
        try:
            rdev = os.stat(path).st_rdev
        except FileNotFoundError:
            raise E.NotFound(f"{role} device {path} is missing") from None
        return devices.devno(rdev)

    @staticmethod
    def labelled(pool: Pool, role: str) -> bool:
        return role in pool.config.get("labels", {}).get("roles", [])

    def identify(self, pool: Pool, role: str, recorded: str) -> tuple[str, str]:
        """(MAJ:MIN, path) of the pool's ``role`` device: the recorded path
        if the disk there carries this pool's label, else the one disk that
        does (the catalog then follows it). The path is opened once; the
        device number used is that descriptor's."""
        if not self.labelled(pool, role):
            self._warn_unlabelled(pool)
            return self._devno(recorded, role), recorded
        gen = int(pool.config["labels"]["generation"])
        try:
            fd = os.open(recorded, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            reason = "does not exist"
        except OSError as e:
            reason = f"cannot be opened ({e.strerror})"
        else:
            try:
                st_ = os.fstat(fd)
                if not stat.S_ISBLK(st_.st_mode):
                    reason = "is not a block device"
                elif (reason := label.matches(fd, pool.uuid, role, gen)) is None:
                    return devices.devno(st_.st_rdev), recorded
            finally:
                os.close(fd)
        found = self._find(pool, role, recorded, reason)
        return devices.devno(found.rdev), found.path

    def _find(self, pool: Pool, role: str, recorded: str, reason: str) -> label.Found:
        """The one block device with ``pool``'s ``role`` label, recorded in
        the catalog; else a one-line refusal saying what is at ``recorded``."""
        found = label.scan(pool.uuid, role, exclude_dirs=(self.state_dir,))
        if len(found) > 1:
            raise E.Unavailable(
                f"pool {pool.name}: {len(found)} devices carry its {role} label "
                f"({', '.join(f.path for f in found)}); detach the copies and restart dmsnapd"
            )
        if not found:
            raise E.Unavailable(
                f"pool {pool.name}: its {role} device {recorded} {reason}, and no other "
                f"device carries this pool's {role} label; attach its disk and restart dmsnapd"
            )
        f = found[0]
        log.warning(
            "pool %s: %s device found at %s (%s %s); catalog updated",
            pool.name,
            role,
            f.path,
            recorded,
            reason,
        )
        self._record(pool, role, f.path)
        return f

    def _record(self, pool: Pool, role: str, path: str) -> None:
        if role == "data":
            self.catalog.update_pool(pool.id, data_dev=path)
        elif role == "cache":
            self.catalog.update_pool(pool.id, cache_dev=path)
        else:
            config = self.catalog.pool_by_id(pool.id).config
            config["journal"]["path"] = path
            self.catalog.update_pool(pool.id, config=config)

    def _warn_unlabelled(self, pool: Pool) -> None:
        if pool.id not in self._unlabelled_warned:
            self._unlabelled_warned.add(pool.id)
            log.warning(
                "pool %s: its devices carry no dmsnap label (created before labels); "
                "they are trusted by path (docs/storage.md)",
                pool.name,
            )

    def held_journal(self, pool: Pool) -> str | None:
        """MAJ:MIN of the journal device held for ``pool`` (None: a file, or
        not running)."""
        rdev = self.holds.rdev(("journal", pool.id))
        return None if rdev is None else devices.devno(rdev)

    def hold_journal(self, pool: Pool, path: str) -> str:
        """Hold the journal device O_EXCL and check its label through that
        descriptor; the journal then opens that very device (by descriptor)."""
        key = ("journal", pool.id)
        if not self.labelled(pool, "journal"):
            self._warn_unlabelled(pool)
            fd = self.holds.hold(key, path, f"pool {pool.name}: journal")
            return path if fd is None else f"/proc/self/fd/{fd}"
        gen = int(pool.config["labels"]["generation"])
        reason: str | None
        try:
            fd = self.holds.hold(key, path, f"pool {pool.name}: journal")
        except E.UserError as e:
            reason, fd = f"cannot be held ({e.message})", None
        else:
            reason = (
                "is not a block device"
                if fd is None
                else label.matches(fd, pool.uuid, "journal", gen)
            )
        if reason is None and fd is not None:
            return f"/proc/self/fd/{fd}"
        self.holds.release(key)
        found = self._find(pool, "journal", path, reason or "")
        fd = self.holds.hold(key, found.path, f"pool {pool.name}: journal")
        assert fd is not None
        if (again := label.matches(fd, pool.uuid, "journal", gen)) is not None:
            self.holds.release(key)
            raise E.Unavailable(f"pool {pool.name}: journal device {found.path} {again}")
        return f"/proc/self/fd/{fd}"

    def check_new(self, given: dict[str, str | None]) -> None:
        """Refuse a device carrying a label of a pool of this catalog (a
        second loop device over its file, a copy of its disk)."""
        pools = {p.uuid: p.name for p in self.catalog.pools()}
        for role, path in given.items():
            if path is None:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue  # _check_free_device says why
            try:
                found = label.read_fd(fd) if stat.S_ISBLK(os.fstat(fd).st_mode) else {}
            finally:
                os.close(fd)
            for lab in found.values():
                if isinstance(lab, label.Label):
                    if lab.pool_uuid in pools:
                        raise E.Busy(
                            f"{role} device {path} carries the {lab.role} label of pool "
                            f"{pools[lab.pool_uuid]}: it is that pool's disk"
                        )
                    log.warning("%s device %s: overwriting %s", role, path, lab.describe())

    def write(self, pool: Pool, given: dict[str, str]) -> None:
        if not given:
            return  # embedded: nothing to label
        gen = int(pool.config["labels"]["generation"])
        for role, path in given.items():
            fd = devices.open_exclusive(path, role)
            try:
                label.write_fd(fd, pool.uuid, role, gen)
            finally:
                os.close(fd)

    def wipe(self, pool: Pool) -> None:
        """A destroyed pool's disks carry no label of it (and its journal no
        superblock), checked through the descriptor that wipes them."""
        gen = int(pool.config["labels"]["generation"])
        jcfg = pool.config.get("journal", {})
        paths = {"data": pool.data_dev, "cache": pool.cache_dev, "journal": jcfg.get("path")}
        for role in pool.config["labels"]["roles"]:
            path = paths.get(role)
            if not path:
                continue
            try:
                fd = devices.open_exclusive(path, role)
            except E.UserError as e:
                log.warning("pool %s: %s label not wiped: %s", pool.name, role, e.message)
                continue
            try:
                if (reason := label.matches(fd, pool.uuid, role, gen)) is not None:
                    log.warning(
                        "pool %s: %s device %s %s; left as it is", pool.name, role, path, reason
                    )
                    continue
                if role == "journal":
                    os.pwrite(fd, bytes(2 * 4096), 0)  # never mistaken for a live journal
                label.wipe_fd(fd, role)
            except OSError as e:
                log.warning("pool %s: %s label not wiped: %s", pool.name, role, e.strerror)
            finally:
                os.close(fd)
