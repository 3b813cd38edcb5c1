"""The ``thin`` backend: dm-thin-pool with thin volumes and thin snapshots.

Layout on the base device: thin metadata first, data after it. Every kernel
metadata change ends with ``set_transaction_id old new``; the kernel stores
the id atomically with the thin metadata, which is how a crash is settled
(Docker's devmapper does the same).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from typing import Any

from dmsnap.dm import DmError
from dmsnap.dm import status as st
from dmsnap.dm import targets as t
from dmsnap.dm.targets import Table
from dmsnap.errors import Busy, InvalidArgument, NoSpace
from dmsnap.storage.backend import Backend, planned_dev_ids
from dmsnap.storage.catalog import Snapshot, Volume
from dmsnap.storage.layers import Layer, ensure
from dmsnap.units import Bytes, Sectors

MiB = 1 << 20
BLOCK_SECTORS = 128  # 64 KiB thin blocks: small snapshot COW cost, modest metadata
MAX_DEV_ID = (1 << 24) - 1
# Refuse new snapshots/volumes above this data use: past it, a full pool is
# one burst of writes away, and full pools error writes (error_if_no_space).
FULL_FRACTION = 0.95
# Health warns from this metadata use on, while there is time to extend it
# (dm-thin's own metadata low-water event comes at 75 % of a small device).
METADATA_WARN = 0.8
METADATA_BLOCK = 4096


# An administrator's --metadata-size: LVM's bounds for --poolmetadatasize
# (2 MiB; dm-thin uses at most ~15.9 GiB of a metadata device).
MIN_METADATA = 2 * MiB
MAX_METADATA = 15 * 1024 * MiB


def metadata_sectors(base_sectors: int) -> int:
    """Room for the mapping btrees: ~64 bytes per data block, at least 8 MiB,
    at most the kernel's limit (~16 GiB), rounded to MiB."""
    blocks = base_sectors // BLOCK_SECTORS
    size = max(8 * MiB, blocks * 64)
    size = min(size, MAX_METADATA)
    return (size + MiB - 1) // MiB * Sectors.of(MiB)


def check_metadata_size(size: int) -> None:
    """A metadata size the administrator asked for: whole MiB, within LVM's
    bounds (the layout is in MiB; dm-thin cannot use more)."""
    if size % MiB:
        raise InvalidArgument(f"--metadata-size {size} is not a whole number of MiB")
    if not MIN_METADATA <= size <= MAX_METADATA:
        raise InvalidArgument(
            f"--metadata-size must be {MIN_METADATA // MiB}M to {MAX_METADATA // MiB // 1024}G"
        )


class ThinBackend(Backend):
    kind = "thin"
    thin_provisioned = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # MAJ:MIN of each metadata extension, in order (the Manager attaches them)
        self.meta_ext_devnos: list[str] = []

    # -- layout -----------------------------------------------------------------------

    @property
    def meta_sectors(self) -> int:
        return int(self.pool.config["meta_sectors"])

    @property
    def data_sectors(self) -> int:
        return int(self.pool.config["data_sectors"])

    @staticmethod
    def plan_layout(base_sectors: int, metadata_size: int | None = None) -> dict[str, int]:
        """``metadata_size``: the administrator's (checked), else sized from the pool."""
        if metadata_size is not None:
            check_metadata_size(metadata_size)
            meta = Sectors.of(metadata_size)
        else:
            meta = metadata_sectors(base_sectors)
        data = (base_sectors - meta) // BLOCK_SECTORS * BLOCK_SECTORS
        if data < 16 * BLOCK_SECTORS:
            if metadata_size is not None:
                raise InvalidArgument(
                    f"--metadata-size {metadata_size // MiB}M leaves too little of the pool's "
                    f"{Bytes.of(base_sectors) // MiB} MiB for data"
                )
            raise NoSpace(f"{Bytes.of(base_sectors) // MiB} MiB is too small for a thin pool")
        return {"meta_sectors": meta, "data_sectors": data, "block_sectors": BLOCK_SECTORS}

    @property
    def tpool(self) -> tuple[str, str]:
        return self.internal("tpool")

    @property
    def meta_ext_sectors(self) -> list[int]:
        """Sizes of the metadata extensions (`pool extend-metadata`), in order."""
        return [int(n) for n in self.pool.config.get("meta_ext", [])]

    def meta_table(self) -> Table:
        """The metadata device: its first part on the base device, then each
        extension (a device of its own: the data follows the first part)."""
        lines = [t.TableLine(0, self.meta_sectors, t.Linear(self.base.devno, 0))]
        at = self.meta_sectors
        for devno, n in zip(self.meta_ext_devnos, self.meta_ext_sectors, strict=True):
            lines.append(t.TableLine(at, n, t.Linear(devno, 0)))
            at += n
        return Table(tuple(lines))

    def pool_layers(self) -> list[Layer]:
        meta_name, meta_uuid = self.internal("tmeta")
        data_name, data_uuid = self.internal("tdata")
        pool_name, pool_uuid = self.tpool
        meta = Layer(meta_name, meta_uuid, self.meta_table())
        data = Layer(
            data_name,
            data_uuid,
            Table.single(self.data_sectors, t.Linear(self.base.devno, self.meta_sectors)),
        )
        blocks = self.data_sectors // BLOCK_SECTORS
        pool = Layer(
            pool_name,
            pool_uuid,
            Table.single(
                self.data_sectors,
                t.ThinPool(
                    ensure(self.dm, meta),  # lower layers first: the pool table names them
                    ensure(self.dm, data),
                    BLOCK_SECTORS,
                    max(1, blocks // 10),  # low-water event at 90% use
                    error_if_no_space=True,
                ),
            ),
        )
        return [meta, data, pool]

    def pool_devno(self) -> str:
        return self.dm.info(self.tpool[0]).devno

    def volume_layers(self, vol: Volume) -> list[Layer]:
        assert vol.dev_id is not None
        return [
            Layer(
                self.vol_name(vol),
                self.vol_uuid(vol),
                Table.single(Sectors.of(vol.size), t.Thin(self.pool_devno(), vol.dev_id)),
            )
        ]

    def snapshot_layers(self, snap: Snapshot, *, active: bool) -> list[Layer]:
        if not active:
            return []
        assert snap.dev_id is not None
        vol = self.catalog.volume(snap.pool, snap.volume)
        return [
            Layer(
                self.snap_name(snap),
                self.snap_uuid(snap),
                Table.single(Sectors.of(vol.size), t.Thin(self.pool_devno(), snap.dev_id)),
                read_only=True,
            )
        ]

    # -- kernel metadata ----------------------------------------------------------------

    def _msg(self, text: str) -> None:
        self.dm.message(self.tpool[0], text)

    def pool_status(self) -> st.TargetStatus:
        return self.dm.status(self.tpool[0], noflush=True)[0].status

    def kernel_txid(self) -> int:
        s = self.pool_status()
        if not isinstance(s, st.ThinPoolStatus):
            raise DmError("status", self.tpool[0], errno.EIO, f"thin pool failed: {s}")
        return s.transaction_id

    def txn(self) -> dict[str, Any]:
        return {"old_txid": self.pool.transaction_id, "new_txid": self.pool.transaction_id + 1}

    def _commit_txid(self) -> None:
        old = self.pool.transaction_id
        if self.kernel_txid() == old + 1:  # already committed (recovery re-run)
            return
        self._msg(f"set_transaction_id {old} {old + 1}")

    def next_ids(self, n: int) -> list[int]:
        first = self.pool.next_dev_id
        if first + n - 1 > MAX_DEV_ID:
            raise NoSpace("thin device ids exhausted in this pool")
        return list(range(first, first + n))

    def _extend_hint(self) -> str:
        return f"`dmsnap pool extend-metadata {self.pool.name} --size SIZE` gives it more"

    def _read_only_why(self, s: st.ThinPoolStatus) -> str | None:
        """Why a pool in mode ``ro`` is: dmsnap never asks for read-only, so
        it is dm-thin's out-of-metadata-space mode, or (needs_check) a failed
        metadata operation that only thin_check/thin_repair clears."""
        if s.mode != "ro":
            return None
        if s.needs_check:
            return (
                f"pool {self.pool.name}'s thin metadata is read-only and needs check: "
                "thin_check/thin_repair (docs/storage.md, 'Thin metadata full')"
            )
        return (
            f"pool {self.pool.name} is out of thin metadata space (read-only); "
            + self._extend_hint()
        )

    def no_space_reason(self) -> str | None:
        """For the journal (no Manager lock): why the pool cannot take new
        blocks now, or None. Data space is the flusher's ENOSPC's business."""
        return self.space_state()[0]

    # dm-thin acknowledges what a read-only pool then does not keep (a
    # discard), and rolls uncommitted metadata back when a commit fails:
    # the journal keeps what it synced until a look here confirms it.
    confirms_durability = True

    def space_state(self) -> tuple[str | None, bool]:
        """(no_space_reason, healthy) from one status: healthy when the pool
        is writable (``rw``, or ``out_of_data_space``, which still unmaps on
        discard and commits) and needs no check, so what the journal synced
        before this look is in committed metadata."""
        try:
            s = self.pool_status()
        except DmError:
            return None, False  # gone or going (destroy, teardown): nothing to say
        if not isinstance(s, st.ThinPoolStatus):
            why = f"pool {self.pool.name}'s thin pool has failed (needs thin_check/thin_repair)"
            return why, False
        why = self._read_only_why(s)
        healthy = why is None and s.mode in ("rw", "out_of_data_space") and not s.needs_check
        return why, healthy

    def check_room(self, what: str, size: int = 0) -> None:
        s = self.pool_status()
        if not isinstance(s, st.ThinPoolStatus):
            raise NoSpace(f"cannot create {what}: thin pool has failed")
        if s.mode == "out_of_data_space":
            raise NoSpace(
                f"cannot create {what}: pool {self.pool.name} is out of data space; "
                "delete snapshots or volumes to free some"
            )
        if why := self._read_only_why(s):
            raise NoSpace(f"cannot create {what}: {why}")
        if s.mode != "rw":
            raise NoSpace(f"cannot create {what}: pool {self.pool.name} is read-only ({s.mode})")
        if s.data_used_fraction >= FULL_FRACTION:
            raise NoSpace(
                f"cannot create {what}: pool {self.pool.name} data is "
                f"{s.data_used_fraction:.0%} full"
            )
        if s.metadata_used_fraction >= FULL_FRACTION:
            raise NoSpace(
                f"cannot create {what}: pool {self.pool.name} thin metadata is "
                f"{s.metadata_used_fraction:.0%} full; " + self._extend_hint()
            )

    # -- operations -----------------------------------------------------------------------

    def format(self) -> None:
        # dm-thin formats fresh metadata only when the superblock is zeroed;
        # a reused device may carry an old pool's superblock. The metadata
        # starts the base (pool_layers), and the pool is not loaded yet.
        fd = os.open(self.base.path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        try:
            buf = mmap.mmap(-1, MiB)
            os.pwritev(fd, [buf], 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def plan_volume(self, size: int) -> dict[str, Any]:
        if size > Bytes.of(self.data_sectors):
            raise NoSpace(
                f"a volume of {size // MiB} MiB is larger than pool {self.pool.name}'s "
                f"{Bytes.of(self.data_sectors) // MiB} MiB of data space"
            )
        return {"dev_id": self.next_ids(1)[0]}

    def create_volume(self, plan: dict[str, Any], size: int) -> None:
        self._msg(f"create_thin {plan['dev_id']}")
        self._commit_txid()

    def delete_volume(self, vol: Volume) -> None:
        self._delete_ids([vol.dev_id] if vol.dev_id is not None else [])

    def _delete_ids(self, ids: list[int]) -> None:
        for dev_id in ids:
            try:
                self._msg(f"delete {dev_id}")
            except DmError as e:
                # ENODATA: already gone (a retried or recovered delete).
                if e.errno not in (errno.ENODATA, errno.EINVAL):
                    raise
        self._commit_txid()

    def plan_snapshots(
        self, members: list[Volume], cow_size: int | None = None
    ) -> list[dict[str, Any]]:
        return [{"dev_id": i} for i in self.next_ids(len(members))]

    def create_snapshots(self, members: list[Volume], plans: list[dict[str, Any]]) -> None:
        """dm-thin's create_snap needs its origin suspended; suspending every
        member first also makes a group one cut."""
        ids = [p["dev_id"] for p in plans]
        with self.suspended([self.vol_name(v) for v in members]):
            for vol, new in zip(members, ids, strict=True):
                self._msg(f"create_snap {new} {vol.dev_id}")
            self._commit_txid()

    def delete_snapshot(self, snap: Snapshot) -> None:
        self._delete_ids([snap.dev_id] if snap.dev_id is not None else [])

    def plan_restore(self, vol: Volume, snap: Snapshot) -> dict[str, Any]:
        return {"dev_id": self.next_ids(1)[0], "old_dev_id": vol.dev_id}

    def restore(self, vol: Volume, snap: Snapshot, plan: dict[str, Any]) -> None:
        """The volume becomes a new thin device cloned from the snapshot; the
        transaction id commits before the old device is deleted, so a crash
        in between rolls forward."""
        snap_dev = self.snap_name(snap)
        snap_active = self.dm.exists(snap_dev)
        if snap_active:
            self.dm.suspend(snap_dev)
        try:
            self._msg(f"create_snap {plan['dev_id']} {snap.dev_id}")
        finally:
            if snap_active:
                self.dm.resume(snap_dev)
        self._commit_txid()

    def record_restore_switch(self, payload: dict[str, Any]) -> None:
        self.catalog.set_volume_dev(payload["volume_id"], payload["dev_id"])

    def unmap_granularity(self) -> int | None:
        return Bytes.of(int(self.pool.config.get("block_sectors", BLOCK_SECTORS)))

    def finish_restore(self, vol: Volume, snap: Snapshot, plan: dict[str, Any]) -> None:
        """After the catalog points at the new device: swap the table, drop the old one."""
        for layer in self.volume_layers(vol):
            ensure(self.dm, layer)
        try:
            self._msg(f"delete {plan['old_dev_id']}")
        except DmError as e:
            if e.errno not in (errno.ENODATA, errno.EINVAL):
                raise

    def usage(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": "thin", "health": []}
        try:
            s = self.pool_status()
        except DmError as e:
            out["health"].append(f"thin pool not active: {e}")
            return out
        if not isinstance(s, st.ThinPoolStatus):
            out["health"].append("thin pool has FAILED (needs thin_check/thin_repair)")
            return out
        bsz = Bytes.of(BLOCK_SECTORS)
        out.update(
            size=s.total_data_blocks * bsz,
            used=s.used_data_blocks * bsz,
            free=(s.total_data_blocks - s.used_data_blocks) * bsz,
            data_used_fraction=s.data_used_fraction,
            metadata_used_fraction=s.metadata_used_fraction,
            metadata_size=s.total_metadata_blocks * METADATA_BLOCK,
            mode=s.mode,
            transaction_id=s.transaction_id,
        )
        if s.mode == "out_of_data_space":
            out["health"].append(
                "thin pool is OUT OF DATA SPACE: writes that need new blocks fail; "
                "delete snapshots or volumes to free space"
            )
        elif s.mode == "ro" and not s.needs_check:
            out["health"].append(
                "thin pool is OUT OF METADATA SPACE (dm-thin made it read-only): new writes "
                "and snapshots are refused, acknowledged writes wait in the journal; "
                f"`dmsnap pool extend-metadata {self.pool.name} --size SIZE` gives it more"
            )
        elif s.mode != "rw":
            out["health"].append(f"thin pool is {s.mode}")
        if s.needs_check:
            out["health"].append(
                "thin pool metadata needs check (read-only): thin_check/thin_repair, "
                "steps in docs/storage.md, 'Thin metadata full'"
            )
        frac = s.data_used_fraction
        if frac >= 0.9:
            out["health"].append(f"thin pool data {frac:.0%} full (low water)")
        mfrac = s.metadata_used_fraction
        if s.mode == "rw" and mfrac >= METADATA_WARN:
            out["health"].append(
                f"thin pool metadata {mfrac:.0%} full (warning from {METADATA_WARN:.0%}; "
                f"snapshots refused from {FULL_FRACTION:.0%}): "
                f"`dmsnap pool extend-metadata {self.pool.name} --size SIZE` before it fills"
            )
        return out

    @staticmethod
    def check_layout_options(metadata_size: int | None) -> None:
        if metadata_size is not None:
            check_metadata_size(metadata_size)

    def extension_count(self) -> int:
        return len(self.meta_ext_sectors)

    def set_extension_devnos(self, devnos: list[str]) -> None:
        self.meta_ext_devnos = devnos

    def check_metadata_extension(self, size: int) -> None:
        """Whole MiB, within dm-thin's limit, and not while the metadata
        needs check (dm-thin will not grow it before thin_check/thin_repair)."""
        name = self.pool.name
        if size % MiB or size <= 0:
            raise InvalidArgument(f"--size {size} is not a whole, positive number of MiB")
        total = Bytes.of(self.meta_sectors + sum(self.meta_ext_sectors)) + size
        if total > MAX_METADATA:
            raise InvalidArgument(
                f"pool {name} would have {total // MiB} MiB of metadata; dm-thin uses at most "
                f"{MAX_METADATA // MiB} MiB"
            )
        s = self.pool_status()
        if isinstance(s, st.ThinPoolStatus) and s.needs_check:
            raise Busy(
                f"pool {name}'s thin metadata needs check: dm-thin does not grow it before "
                "thin_check/thin_repair (docs/storage.md, 'Thin metadata full')"
            )

    def add_metadata_extension(self, devno: str, size: int) -> None:
        old = self.pool.config
        self.catalog.update_pool(
            self.pool.id, config={**old, "meta_ext": [*self.meta_ext_sectors, Sectors.of(size)]}
        )
        self.refresh()
        try:
            self.extend_metadata(devno, Sectors.of(size))
        except BaseException:
            self.catalog.update_pool(self.pool.id, config=old)
            self.refresh()
            self.meta_ext_devnos = self.meta_ext_devnos[:-1]
            with contextlib.suppress(Exception):
                for layer in self.pool_layers()[:1]:
                    ensure(self.dm, layer)
            raise

    def extend_metadata(self, devno: str, sectors: int) -> None:
        """Append an extension to the metadata device and have dm-thin use
        it: it grows its metadata space map when the pool resumes, and
        leaves out-of-metadata-space mode for write mode."""
        self.meta_ext_devnos = [*self.meta_ext_devnos, devno]
        name, uuid = self.internal("tmeta")
        ensure(self.dm, Layer(name, uuid, self.meta_table()))
        self.dm.suspend(self.tpool[0])
        self.dm.resume(self.tpool[0])

    def recover(self, kind: str, payload: dict[str, Any]) -> str:
        """Creates and restores roll forward only if the kernel committed the
        transaction id; deletes always roll forward (they are idempotent and
        what the user asked for)."""
        if kind in ("volume.delete", "snapshot.delete"):
            return "forward"
        txid = self.kernel_txid()
        if txid == payload["new_txid"]:
            return "forward"
        if txid != payload["old_txid"]:
            raise Busy(
                f"pool {self.pool.name}: kernel transaction id {txid} matches neither "
                f"{payload['old_txid']} nor {payload['new_txid']}; refusing to guess"
            )
        # Not committed: undo whatever part of the create reached the kernel.
        for dev_id in planned_dev_ids(payload):
            with contextlib.suppress(DmError):  # ENODATA: never created
                self._msg(f"delete {dev_id}")
        return "back"
