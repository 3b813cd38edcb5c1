"""Device-stack plumbing: a pool's disks and files, and the dm layers built
on them, up to its backend.

Bottom-up: the data device (a disk, or an embedded pool's sparse loop
file), an optional dm-writecache over a cache device, then the backend's
own layers (:mod:`dmsnap.storage.thin`, :mod:`dmsnap.storage.classic`).
:class:`PoolStack` builds them (a new pool, an activation after a restart)
and takes them down; it knows the catalog and the disk labels, and nothing
of the operations above it (it never calls back into the Manager).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import mmap
import os
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dmsnap import errors as E
from dmsnap import progress, rules
from dmsnap.dm import DeviceMapper, DmError
from dmsnap.dm import status as st
from dmsnap.dm import targets as t
from dmsnap.dm.targets import Table
from dmsnap.journal.journal import Journal, JournalError
from dmsnap.rules import MiB
from dmsnap.storage import devices, label, loop, names
from dmsnap.storage.backend import Backend, Base
from dmsnap.storage.catalog import Catalog, Pool
from dmsnap.storage.catalog import NotFound as CatNotFound
from dmsnap.storage.classic import ClassicBackend
from dmsnap.storage.identity import PoolDisks
from dmsnap.storage.layers import Layer, ensure
from dmsnap.storage.thin import ThinBackend
from dmsnap.units import Bytes, Sectors

log = logging.getLogger("dmsnap.storage")

WRITECACHE_BLOCK = 4096
# the backend of each name in rules.BACKENDS
BACKENDS: dict[str, type[Backend]] = {"thin": ThinBackend, "classic": ClassicBackend}
assert tuple(BACKENDS) == rules.BACKENDS


def check_free_device(path: str, what: str) -> tuple[str, int]:
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


def reserve(path: str, length: int) -> None:
    """Allocate a file's blocks now (a journal file must never meet a full
    file system on a write it is about to acknowledge)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, length)
    except OSError as e:
        raise E.NoSpace(f"cannot reserve {length // MiB} MiB for {path}: {e.strerror}") from None
    finally:
        os.close(fd)


ZERO_PIECE = 4 * MiB


def zero(path: str, length: int, offset: int = 0) -> None:
    """Write zeros (O_DIRECT: on the disk, not in the page cache), in
    pieces, each reported (:mod:`dmsnap.progress`)."""
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        buf = mmap.mmap(-1, min(length, ZERO_PIECE))
        task = progress.task("zeroing", total=length)
        done = 0
        while done < length:
            n = min(len(buf), length - done)
            written = os.pwritev(fd, [memoryview(buf)[:n]], offset + done)
            if written <= 0:
                raise OSError(errno.EIO, f"short write zeroing {path}")
            done += written
            task.update(done)
        os.fsync(fd)
    finally:
        os.close(fd)


def check_journal_memory(memory: int | None, mode: str) -> None:
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


@dataclass(frozen=True)
class NewPool:
    """A pool creation, checked and planned; nothing changed yet."""

    name: str
    backend: str
    data: str | None  # device, or None: an embedded loop file
    cache: str | None
    data_bytes: int
    cache_size: int | None  # an embedded cache file's size
    cache_bytes: int | None
    layout: dict[str, Any]  # the pool's config
    labelled: dict[str, str]  # role -> device that gets a dmsnap label


class PoolStack:
    def __init__(
        self, dm: DeviceMapper, catalog: Catalog, disks: PoolDisks, state_dir: str
    ) -> None:
        self.dm, self.catalog, self.disks, self.state_dir = dm, catalog, disks, state_dir
        self.backends: dict[int, Backend] = {}  # pool id -> its active backend
        # pool id -> role -> (MAJ:MIN, path) of the data and cache devices
        # its layers were built on (health: is each still there?)
        self.under: dict[int, dict[str, tuple[str, str]]] = {}

    def _recorded(self, name: str) -> bool:
        try:
            self.catalog.pool(name)
        except CatNotFound:
            return False
        return True

    # -- files and devices -----------------------------------------------------------

    def pool_dir(self, name: str) -> str:
        return os.path.join(self.state_dir, "pools", name)

    def embedded_files(self, name: str) -> tuple[str, str]:
        d = self.pool_dir(name)
        return os.path.join(d, "data.img"), os.path.join(d, "cache.img")

    def meta_ext_file(self, name: str, n: int) -> str:
        """The ``n``-th (from 1) metadata extension of a pool."""
        return os.path.join(self.pool_dir(name), f"metadata-{n}.img")

    def detach_loops(self, name: str) -> None:
        """Detach the loop devices of a pool's files (embedded data and
        cache, metadata extensions), if attached."""
        exts = sorted(glob.glob(os.path.join(glob.escape(self.pool_dir(name)), "metadata-*.img")))
        for f in [*self.embedded_files(name), *exts]:
            dev = loop.find(f)
            if dev:
                loop.detach(dev)

    @staticmethod
    def _loop_for(path: str) -> loop.LoopDevice:
        return loop.find(path) or loop.attach(path)

    def devices(self, pool: Pool) -> tuple[tuple[str, str], tuple[str, str] | None]:
        """(MAJ:MIN, path) of the data and cache devices, attaching loop files
        as needed."""
        data_file, cache_file = self.embedded_files(pool.name)
        if pool.embedded:
            lo = self._loop_for(data_file)
            data = (lo.devno, lo.path)
        else:
            assert pool.data_dev is not None
            data = self.disks.identify(pool, "data", pool.data_dev)
        cache = None
        if pool.cache_dev:
            cache = self.disks.identify(pool, "cache", pool.cache_dev)
        elif pool.cache_size:
            lo = self._loop_for(cache_file)
            cache = (lo.devno, lo.path)
        return data, cache

    def recorded_devices(self, pool: Pool) -> dict[str, str]:
        """role -> path of the block devices a pool writes (an embedded
        pool's loop devices while attached; a journal device, not file)."""
        out: dict[str, str] = {}
        data_file, cache_file = self.embedded_files(pool.name)
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

    def check_unowned(self, given: dict[str, str | None]) -> None:
        """Refuse devices that are one another or another pool's, by device
        number: a symlink or a /dev/disk/by-id name is the same disk."""
        ids: dict[int, tuple[str, str]] = {}
        for role, path in given.items():
            rdev = devices.rdev_of(path) if path else None
            if path is None or rdev is None:
                continue  # missing or not a block device: check_free_device says so
            if rdev in ids:
                raise E.InvalidArgument(
                    f"the {ids[rdev][0]} device {ids[rdev][1]} and the {role} device {path} "
                    "are the same device; they must all differ"
                )
            ids[rdev] = (role, path)
        for p in self.catalog.pools():
            for role, path in self.recorded_devices(p).items():
                rdev = devices.rdev_of(path)
                if rdev in ids:
                    raise E.Busy(
                        f"device {ids[rdev][1]} is {path}, the {role} device of pool {p.name}"
                    )

    # -- layers ------------------------------------------------------------------------

    def _wc_layer(self, pool: Pool, data: str, cache: str) -> Layer:
        name, uuid = (
            names.dm_internal(pool.name, "wc"),
            names.uuid_internal(pool.uuid, pool.name, "wc"),
        )
        return Layer(
            name,
            uuid,
            Table.single(
                Sectors.of(pool.size),
                t.Writecache(
                    "s",
                    data,
                    cache,
                    WRITECACHE_BLOCK,
                    start_sector=label.CACHE_START_SECTORS
                    if self.disks.labelled(pool, "cache")
                    else None,
                ),
            ),
        )

    def base(self, pool: Pool) -> Base:
        data, cache = self.devices(pool)
        self.under[pool.id] = {"data": data} | ({"cache": cache} if cache else {})
        if cache is None:
            return Base(data[0], Sectors.of(pool.size), data[1])
        layer = self._wc_layer(pool, data[0], cache[0])
        return Base(ensure(self.dm, layer), Sectors.of(pool.size), layer.path)

    def backend(self, pool: Pool) -> Backend:
        """The pool's backend, its layers up (activated on first use)."""
        b = self.backends.get(pool.id)
        if b is None:
            b = BACKENDS[pool.backend](self.dm, self.catalog, pool, self.base(pool))
            b.set_extension_devnos(
                [
                    self._loop_for(self.meta_ext_file(pool.name, i)).devno
                    for i in range(1, b.extension_count() + 1)
                ]
            )
            for layer in b.pool_layers():
                ensure(self.dm, layer)
            self.backends[pool.id] = b
        b.refresh()
        return b

    def pool(self, name: str) -> tuple[Pool, Backend]:
        """Pool ``name`` from the catalog and its active backend."""
        pool = self.catalog.pool(name)
        try:
            return pool, self.backend(pool)
        except E.UserError:
            raise
        except (DmError, OSError) as e:
            raise E.Unavailable(f"pool {name} cannot be activated: {e}") from None

    def pool_devices(self, name: str, short_id: str | None = None) -> list[str]:
        """Every dm device of pool ``name`` (of the pool with ``short_id``,
        when given), found by its UUID."""
        out = []
        for e in self.dm.list_devices():
            parts = names.parse_uuid(e.uuid)
            if parts and parts[2] == name and short_id in (None, parts[1]):
                out.append(e.name)
        return out

    def teardown_devices(self, devs: list[str]) -> None:
        """Remove devices top-down: repeatedly those nothing holds."""
        left = list(devs)
        task = progress.task("removing devices", total=len(left), unit="steps")
        while left:
            task.update(len(devs) - len(left))
            moved = False
            for name in list(left):
                try:
                    info = self.dm.info(name)
                except DmError as e:
                    if e.not_found:
                        left.remove(name)
                        moved = True
                        continue
                    raise
                if info.open_count == 0:
                    self.dm.remove(name)
                    left.remove(name)
                    moved = True
            if not moved:
                raise E.Busy(f"devices still in use: {', '.join(sorted(left))}")
        task.update(len(devs))

    def teardown(self, pool: Pool) -> None:
        """Every dm device of the pool gone, its loop files detached."""
        self.teardown_devices(self.pool_devices(pool.name, pool.uuid[:8]))
        self.detach_loops(pool.name)
        self.backends.pop(pool.id, None)
        self.under.pop(pool.id, None)

    def gone(self, pool: Pool) -> list[str]:
        """One line per device under the assembled pool that is no longer
        there (its I/O fails until the device is back): data, cache,
        journal."""
        under = dict(self.under.get(pool.id, {}))
        if (j := self.disks.held_journal(pool)) is not None:
            under["journal"] = (j, pool.config.get("journal", {}).get("path", j))
        return [
            f"{role} device {path} ({devno}) is gone: the pool is degraded, "
            "its I/O fails until the device is back"
            for role, (devno, path) in sorted(under.items())
            if not devices.present(devno)
        ]

    def open_count(self, dm_name: str, grace: float = 2.0) -> int:
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

    def remove(self, dm_name: str) -> None:
        """The device gone, whether it was there or not."""
        with contextlib.suppress(DmError):
            if self.dm.exists(dm_name):
                self.dm.remove(dm_name)

    def check_not_open(self, dm_name: str, what: str) -> None:
        count = self.open_count(dm_name)
        if count:
            raise E.Busy(f"{what} is in use (open {count} time(s)); unmount or stop using it first")

    def writecache_json(self, pool: Pool) -> dict[str, Any]:
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

    # -- host file system under an embedded pool -------------------------------------------

    def check_host_space(
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

    def host_space(self, pool: Pool) -> dict[str, Any] | None:
        """Embedded pool: the host file system under its files, and how much
        more of it the sparse loop files may still take."""
        files = [f for f in self.embedded_files(pool.name) if os.path.exists(f)]
        if not pool.embedded or not files:
            return None
        du = shutil.disk_usage(self.pool_dir(pool.name))
        unallocated = 0
        for f in files:
            s = os.stat(f)
            unallocated += max(0, s.st_size - Bytes.of(s.st_blocks))  # st_blocks: 512 B units
        return {"path": self.pool_dir(pool.name), "free": du.free, "unallocated": unallocated}

    # -- a new pool ----------------------------------------------------------------------

    def plan(
        self,
        name: str,
        *,
        data: str | None,
        cache: str | None,
        backend: str,
        size: int | None,
        cache_size: int | None,
        journal: str | None,
        journal_size: int | None,
        journal_mode: str,
        journal_memory: int | None,
        sparse: bool,
        metadata_size: int | None = None,
    ) -> NewPool:
        """Check a pool creation against the rules, the devices and the host
        (raising before anything changes) and plan its layout."""
        data, cache, journal = (devices.resolve(d) if d else d for d in (data, cache, journal))
        for what, value, choices in (
            ("backend", backend, rules.BACKENDS),
            ("journal mode", journal_mode, rules.JOURNAL_MODES),
        ):
            if (why := rules.choice_problem(what, value, choices)) is not None:
                raise E.InvalidArgument(why)
        if journal is not None and journal_mode != "nv":
            raise E.InvalidArgument("--journal DEV is for --journal-mode nv")
        if journal is not None and journal_size is not None:
            raise E.InvalidArgument("--journal-size is for an embedded or RAM journal")
        if journal_mode == "none" and journal_size is not None:
            raise E.InvalidArgument("--journal-size needs a journal (mode nv or ram)")
        BACKENDS[backend].check_layout_options(metadata_size)
        check_journal_memory(journal_memory, journal_mode)
        jsize = journal_size or rules.DEFAULT_JOURNAL_SIZE
        if journal_mode != "none" and journal is None and jsize < rules.MIN_JOURNAL_SIZE:
            raise E.InvalidArgument(f"a journal needs at least {rules.MIN_JOURNAL_SIZE // MiB}M")
        if self._recorded(name):
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
        self.check_unowned(external)
        self.disks.check_new(external)
        if journal is not None:
            _, jdev_bytes = check_free_device(journal, "journal")
            jsize = label.usable_size("journal", jdev_bytes)
            if jsize < rules.MIN_JOURNAL_SIZE:
                raise E.InvalidArgument(
                    f"journal device {journal} has {jsize} bytes; it needs at least "
                    f"{rules.MIN_JOURNAL_SIZE // MiB}M"
                )
        if data is not None:
            _, data_bytes = check_free_device(data, "data")
            data_bytes = label.usable_size("data", data_bytes)
        else:
            data_bytes = size or rules.DEFAULT_EMBEDDED_SIZE
            if data_bytes < rules.MIN_POOL_SIZE:
                raise E.InvalidArgument(f"a pool needs at least {rules.MIN_POOL_SIZE // MiB}M")
        self.check_host_space(
            data_bytes=0 if data is not None else data_bytes,
            cache_bytes=cache_size if cache is None and cache_size else 0,
            journal_bytes=jsize if journal is None and journal_mode == "nv" else 0,
            sparse=sparse,
        )
        cache_bytes = None
        if cache is not None:
            _, cache_bytes = check_free_device(cache, "cache")
            cache_bytes -= label.SIZE
        elif cache_size is not None:
            cache_bytes = cache_size
        if cache_bytes is not None and cache_bytes < rules.MIN_CACHE_SIZE:
            raise E.InvalidArgument(
                f"a writecache device needs at least {rules.MIN_CACHE_SIZE // MiB}M"
            )
        data_bytes = data_bytes // MiB * MiB
        layout = BACKENDS[backend].plan_layout(Sectors.of(data_bytes), metadata_size)
        layout["journal"] = {
            "mode": journal_mode,
            "path": None
            if journal_mode != "nv"
            else journal or os.path.join(self.pool_dir(name), "journal.img"),
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
        return NewPool(
            name, backend, data, cache, data_bytes, cache_size, cache_bytes, layout, labelled
        )

    def create_files(self, new: NewPool) -> None:
        """An embedded pool's sparse loop files (and its directory)."""
        jcfg = new.layout["journal"]
        if (
            new.data is None
            or (new.cache is None and new.cache_size is not None)
            or (jcfg["mode"] == "nv")
        ):
            os.makedirs(self.pool_dir(new.name), mode=0o700, exist_ok=True)
            data_file, cache_file = self.embedded_files(new.name)
            if new.data is None:
                loop.make_sparse(data_file, new.data_bytes)
            if new.cache is None and new.cache_size is not None:
                loop.make_sparse(cache_file, new.cache_size)

    def build(self, pool: Pool, new: NewPool) -> Backend:
        """Label the disks, format the layers and the journal of the pool the
        catalog just recorded (in the caller's transaction: the row commits
        only with this work)."""
        jcfg = new.layout["journal"]
        steps = progress.task("building the pool", total=4 + (jcfg["mode"] == "nv"), unit="steps")
        self.disks.write(pool, new.labelled)
        steps.advance()
        _, cachedev = self.devices(pool)
        if cachedev is not None:
            # writecache formats only a zeroed superblock (after the label)
            zero(cachedev[1], MiB, label.SIZE if new.cache else 0)
        steps.advance()
        b = BACKENDS[pool.backend](self.dm, self.catalog, pool, self.base(pool))
        b.format()
        steps.advance()
        for layer in b.pool_layers():
            ensure(self.dm, layer)
        steps.advance()
        if jcfg["mode"] == "nv":
            try:
                Journal.format(jcfg["path"], jcfg["size"])
            except JournalError as e:
                raise E.Unavailable(f"journal {jcfg['path']}: {e}") from None
            if jcfg["embedded"]:
                reserve(jcfg["path"], jcfg["size"])
            steps.advance()
        return b

    def extend_metadata(self, pool: Pool, backend: Backend, size: int) -> str:
        """Give the pool ``size`` more metadata: a new file in its state
        directory (reserved, so the host file system cannot fail it), on a
        loop device, appended by the backend. Returns the file's path."""
        backend.check_metadata_extension(size)
        n = backend.extension_count() + 1
        path = self.meta_ext_file(pool.name, n)
        os.makedirs(self.pool_dir(pool.name), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        lo = None
        try:
            reserve(path, size)
            lo = self._loop_for(path)
            backend.add_metadata_extension(lo.devno, size)
        except BaseException:
            if lo is not None:
                with contextlib.suppress(Exception):
                    loop.detach(lo)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return path

    @contextlib.contextmanager
    def creating(self, new: NewPool) -> Iterator[Pool]:
        """Make the pool ``new`` plans: its files, then its catalog row with
        its labels and layers in one transaction (a crash leaves the pending
        record, and the row commits only with the kernel work). What the
        body does with the new pool (start its journal) is part of the
        creation: if anything fails, everything is undone."""
        pending_id = self.catalog.begin_pending(None, "pool.create", {"name": new.name})
        try:
            self.create_files(new)
            with self.catalog.tx():
                pool = self.catalog.add_pool(
                    new.name,
                    new.backend,
                    data_dev=new.data,
                    cache_dev=new.cache,
                    size=new.data_bytes,
                    cache_size=new.cache_bytes,
                    config=new.layout,
                )
                b = self.build(pool, new)
                self.catalog.end_pending(pending_id)
            self.backends[pool.id] = b
            yield pool
        except BaseException:
            with contextlib.suppress(Exception):
                self.undo_create(new.name)
            with contextlib.suppress(Exception):
                self.catalog.end_pending(pending_id)
            raise

    def undo_create(self, name: str) -> None:
        """Remove what a pool creation that never committed left behind."""
        if self._recorded(name):
            return  # committed: the row and the pending record end together
        self.teardown_devices(self.pool_devices(name))
        self.detach_loops(name)
        shutil.rmtree(self.pool_dir(name), ignore_errors=True)

    def check_unused(self, pool: Pool, held: set[str]) -> list[str]:
        """The pool's dm devices, refused if anything but the pool itself
        (its internal layers, ``held``: what the journal holds) has one open."""
        devs = self.pool_devices(pool.name, pool.uuid[:8])
        for d in devs:
            if d.startswith(names.dm_internal(pool.name, "")) or d in held:
                continue
            if self.open_count(d):
                raise E.Busy(f"/dev/mapper/{d} is in use; unmount or stop using it first")
        return devs

    def destroy(self, pool: Pool, devs: list[str]) -> None:
        """The pool gone: its devices (``check_unused``'s), its disks' labels
        (or an NV journal's superblock: never mistaken for a live journal
        later), its loop files, its catalog rows, its directory."""
        self.teardown_devices(devs)
        jcfg = pool.config.get("journal", {})
        if "labels" in pool.config:
            self.disks.wipe(self.catalog.pool_by_id(pool.id))
        elif jcfg.get("mode") == "nv" and not jcfg.get("embedded"):
            with contextlib.suppress(OSError):
                zero(jcfg["path"], 2 * 4096)
        self.backends.pop(pool.id, None)
        self.detach_loops(pool.name)
        self.catalog.remove_pool(pool.id)
        shutil.rmtree(self.pool_dir(pool.name), ignore_errors=True)
