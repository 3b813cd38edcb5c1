"""The ``classic`` backend: dm-snapshot (snapshot-origin + snapshot + COW).

Each volume is a linear extent of the pool's base device (``_VOL.real``)
under a ``snapshot-origin``. Each snapshot has its own COW extent and a
persistent ``snapshot`` device that must stay loaded for the origin to copy
old data on write: so every write to a volume costs one copy per snapshot
(bench/ shows it). Activation puts a read-only linear device on top.

Restore merges the snapshot back into the volume (``snapshot-merge``), which
consumes the snapshot, as LVM does.

A COW area that fills up invalidates its snapshot (the kernel drops it).
The COW device is a dm linear over one or more extents, so it can grow: the
daemon calls ``autoextend`` every second and adds an extent from the pool's
free space once an area is ``cow_autoextend_threshold`` % full (pool policy,
as LVM's ``snapshot_autoextend_threshold``/``_percent``); dm-snapshot reads
the COW device's size at every allocation, so a table reload is enough.
"""

from __future__ import annotations

import mmap
import os
import time
from typing import Any

from dmsnap import progress
from dmsnap.dm import DmError
from dmsnap.dm import status as st
from dmsnap.dm import targets as t
from dmsnap.dm.targets import Table
from dmsnap.errors import Busy, NoSpace, Unavailable
from dmsnap.storage import loop
from dmsnap.storage.backend import Backend
from dmsnap.storage.catalog import Snapshot, Volume
from dmsnap.storage.layers import Layer, ensure, remove
from dmsnap.units import Bytes, Sectors

MiB = 1 << 20
ALIGN = Sectors.of(MiB)  # extents start on MiB boundaries
CHUNK_SECTORS = 8  # 4 KiB COW chunks: the smallest copy per first write
MIN_COW = 4 * MiB
MERGE_TIMEOUT = 600.0
COW_MAGIC = (0x70416E53).to_bytes(4, "little")  # dm-snap-persistent.c SNAP_MAGIC


# Grow a COW area by 100 % of its size once it is 50 % full. LVM's defaults
# (100, i.e. off, and 20) suit a daemon that checks every 10 s on real disks;
# ours checks every second and a classic snapshot that overflows is lost, so
# grow early and by much: the space is taken only as the area grows.
DEFAULT_AUTOEXTEND = {"cow_autoextend_threshold": 50, "cow_autoextend_percent": 100}


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class ClassicBackend(Backend):
    kind = "classic"
    snapshot_areas = True
    restores_in_place = True

    @staticmethod
    def plan_layout(base_sectors: int, metadata_size: int | None = None) -> dict[str, Any]:
        if base_sectors < 8 * ALIGN:
            raise NoSpace(f"{Bytes.of(base_sectors) // MiB} MiB is too small for a pool")
        return {
            "data_sectors": base_sectors // ALIGN * ALIGN,
            "cow_fraction": 0.25,
            **DEFAULT_AUTOEXTEND,
        }

    # -- space -----------------------------------------------------------------------

    def _extents(self) -> list[tuple[int, int]]:
        used = [
            (v.extent_start, _round_up(Sectors.of(v.size), ALIGN))
            for v in self.catalog.volumes(self.pool.name)
            if v.extent_start is not None
        ]
        extra = self.catalog.cow_extents(self.pool.name)
        for s in self.catalog.snapshots(self.pool.name):
            if s.cow_start is None or s.cow_size is None:
                continue
            more = extra.get(s.id, [])
            first = Sectors.of(s.cow_size) - sum(n for _, n in more)
            used.append((s.cow_start, _round_up(first, ALIGN)))
            used += more
        return sorted(used)

    def _allocate(self, sectors: int, taken: list[tuple[int, int]]) -> int | None:
        sectors = _round_up(sectors, ALIGN)
        pos = 0
        for start, length in sorted(taken):
            if start - pos >= sectors:
                return pos
            pos = max(pos, start + length)
        if int(self.pool.config["data_sectors"]) - pos >= sectors:
            return pos
        return None

    def free_bytes(self) -> int:
        used = sum(length for _, length in self._extents())
        return Bytes.of(int(self.pool.config["data_sectors"]) - used)

    def check_room(self, what: str, size: int = 0) -> None:
        if size and self._allocate(Sectors.of(size), self._extents()) is None:
            raise NoSpace(
                f"cannot create {what}: needs {size // MiB} MiB contiguous, pool "
                f"{self.pool.name} has {self.free_bytes() // MiB} MiB free"
            )

    def cow_size(self, vol: Volume, requested: int | None = None) -> int:
        if requested is not None:
            return max(MIN_COW, _round_up(requested, MiB))
        frac = float(self.pool.config.get("cow_fraction", 0.25))
        return max(MIN_COW, _round_up(int(vol.size * frac), MiB))

    def policy(self) -> dict[str, int]:
        return {k: int(self.pool.config.get(k, v)) for k, v in DEFAULT_AUTOEXTEND.items()}

    # -- layers ------------------------------------------------------------------------

    def _real(self, vol_name: str) -> tuple[str, str]:
        return self.internal(f"{vol_name}.real")

    def _cow(self, snap: Snapshot) -> tuple[str, str]:
        return self.internal(f"{snap.volume}@{snap.name}.cow")

    def _snapdev(self, snap: Snapshot) -> tuple[str, str]:
        return self.internal(f"{snap.volume}@{snap.name}.snap")

    def pool_layers(self) -> list[Layer]:
        return []

    def _real_layer(self, vol: Volume) -> Layer:
        name, uuid = self._real(vol.name)
        assert vol.extent_start is not None
        return Layer(
            name,
            uuid,
            Table.single(Sectors.of(vol.size), t.Linear(self.base.devno, vol.extent_start)),
        )

    def volume_layers(self, vol: Volume) -> list[Layer]:
        real = self._real_layer(vol)
        real_dev = ensure(self.dm, real)
        top = Layer(
            self.vol_name(vol),
            self.vol_uuid(vol),
            Table.single(Sectors.of(vol.size), t.SnapshotOrigin(real_dev)),
        )
        return [real, top]

    def _cow_layer(self, snap: Snapshot, extra: list[tuple[int, int]] | None = None) -> Layer:
        """The COW device: its first extent, then those added as it grew."""
        name, uuid = self._cow(snap)
        assert snap.cow_start is not None and snap.cow_size is not None
        if extra is None:
            extra = self.catalog.cow_extents(self.pool.name).get(snap.id, []) if snap.id else []
        first = Sectors.of(snap.cow_size) - sum(n for _, n in extra)
        pieces = [(first, t.Linear(self.base.devno, snap.cow_start))]
        pieces += [(n, t.Linear(self.base.devno, start)) for start, n in extra]
        return Layer(name, uuid, Table.of(pieces))

    def _snap_layer(self, snap: Snapshot, vol: Volume) -> Layer:
        name, uuid = self._snapdev(snap)
        real = self.dm.info(self._real(vol.name)[0]).devno
        cow = self.dm.info(self._cow(snap)[0]).devno
        return Layer(
            name,
            uuid,
            Table.single(Sectors.of(vol.size), t.Snapshot(real, cow, "P", CHUNK_SECTORS)),
        )

    def snapshot_layers(self, snap: Snapshot, *, active: bool) -> list[Layer]:
        vol = self.catalog.volume(snap.pool, snap.volume)
        cow = self._cow_layer(snap)
        ensure(self.dm, cow)
        layers = [cow, self._snap_layer(snap, vol)]
        if active:
            ensure(self.dm, layers[1])
            layers.append(
                Layer(
                    self.snap_name(snap),
                    self.snap_uuid(snap),
                    Table.single(
                        Sectors.of(vol.size), t.Linear(self.dm.info(layers[1].name).devno, 0)
                    ),
                    read_only=True,
                )
            )
        return layers

    # -- operations ------------------------------------------------------------------------

    def format(self) -> None:
        pass  # no pool-wide metadata: every COW header is zeroed when allocated

    def txn(self) -> dict[str, Any]:
        return {}

    def plan_volume(self, size: int) -> dict[str, Any]:
        self.check_room(f"volume of {size // MiB} MiB", size)
        start = self._allocate(Sectors.of(size), self._extents())
        assert start is not None
        return {"extent_start": start}

    def create_volume(self, plan: dict[str, Any], size: int) -> None:
        # The layers are the volume (ensure() builds them); its extent may
        # have been a deleted volume's: a new volume reads zeros, never a
        # predecessor's data (thin gets this from dm-thin's block zeroing).
        self._zero_extent(plan["extent_start"], size)

    def _zero_extent(self, start: int, size: int) -> None:
        try:
            loop.zero_range(self.base.path, Bytes.of(start), size)
        except OSError as e:
            raise Unavailable(
                f"cannot zero the new volume's extent on {self.base.path}: "
                f"{e.strerror or e}; the volume was not created"
            ) from None

    def delete_volume(self, vol: Volume) -> None:
        remove(self.dm, self.vol_name(vol))
        remove(self.dm, self._real(vol.name)[0])

    def plan_snapshots(
        self, members: list[Volume], cow_size: int | None = None
    ) -> list[dict[str, Any]]:
        taken = self._extents()
        plans = []
        for vol in members:
            size = self.cow_size(vol, cow_size)
            start = self._allocate(Sectors.of(size), taken)
            if start is None:
                raise NoSpace(
                    f"cannot snapshot {vol.pool}/{vol.name}: its COW area needs {size // MiB} MiB,"
                    f" pool {self.pool.name} has {self.free_bytes() // MiB} MiB free"
                )
            taken.append((start, _round_up(Sectors.of(size), ALIGN)))
            plans.append({"cow_start": start, "cow_size": size})
        return plans

    def _zero_header(self, path: str) -> None:
        # A reused extent may hold an old COW header; "P" would load its
        # stale exceptions instead of starting empty. The first exception
        # area (the next chunk) too: dm-snapshot writes its new header and
        # zeroes that area with two plain writes, and a crash that keeps the
        # header and loses the zeroing would load the old area's exceptions.
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        try:
            os.pwritev(fd, [mmap.mmap(-1, Bytes.of(2 * CHUNK_SECTORS))], 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def create_snapshots(self, members: list[Volume], plans: list[dict[str, Any]]) -> None:
        """``plans`` carry the snapshot ``name`` (added by the Manager)."""
        snaps = [
            Snapshot(
                0, v.id, 0, v.pool, v.name, p["name"], None, p["cow_start"], p["cow_size"], False, 0
            )
            for v, p in zip(members, plans, strict=True)
        ]
        for snap in snaps:
            cow = self._cow_layer(snap)
            ensure(self.dm, cow)
            self._zero_header(cow.path)
        # The origin must be quiet while the exception store registers with it.
        with self.suspended([self.vol_name(v) for v in members]):
            for vol, snap in zip(members, snaps, strict=True):
                ensure(self.dm, self._snap_layer(snap, vol))

    def after_assembly(self, volumes: list[Volume]) -> None:
        """dm-snapshot-origin learns how to split writes into its snapshots'
        chunks only when it is resumed. After a reboot the origin is loaded
        before its snapshots, so without one more suspend/resume a write
        spanning chunks copies only its first chunk into the snapshots
        (found by the power-cut test). Cheap: nothing is in flight yet."""
        have = {s.volume_id for s in self.catalog.snapshots(self.pool.name)}
        for vol in volumes:
            if vol.id in have and self.dm.exists(self.vol_name(vol)):
                self.dm.suspend(self.vol_name(vol))
                self.dm.resume(self.vol_name(vol))

    def delete_snapshot(self, snap: Snapshot) -> None:
        remove(self.dm, self.snap_name(snap))
        remove(self.dm, self._snapdev(snap)[0])
        remove(self.dm, self._cow(snap)[0])

    def plan_restore(self, vol: Volume, snap: Snapshot) -> dict[str, Any]:
        return {}

    def restore(self, vol: Volume, snap: Snapshot, plan: dict[str, Any]) -> None:
        # Nothing to prepare: the merge itself is the point of no return,
        # and finish_restore starts (or resumes, after a crash) it.
        return None

    def record_restore_done(self, payload: dict[str, Any]) -> None:
        self.catalog.remove_snapshot(payload["snapshot_id"])

    def _cow_data(self, snap: Snapshot) -> int | None:
        """Bytes of data in the snapshot's COW (what a merge copies back),
        from its snapshot device's status; None if that is not loaded."""
        name = self._snapdev(snap)[0]
        try:
            if self.dm.exists(name):
                s = self.dm.status(name)[0].status
                if isinstance(s, st.SnapshotStatus):
                    return Bytes.of(s.allocated_sectors - s.metadata_sectors)
        except DmError:
            pass
        return None

    def finish_restore(self, vol: Volume, snap: Snapshot, plan: dict[str, Any]) -> None:
        top = self.vol_name(vol)
        # Measured before the merge starts (it runs from the resume on):
        # the merge's progress is this much less what its status has left.
        task = progress.task("merging the snapshot", total=self._cow_data(snap))
        remove(self.dm, self.snap_name(snap))
        real = ensure(self.dm, self._real_layer(vol))
        cow = ensure(self.dm, self._cow_layer(snap))
        merge = Table.single(Sectors.of(vol.size), t.SnapshotMerge(real, cow, "P", CHUNK_SECTORS))
        if not self.dm.exists(top):
            self.dm.create(top, self.vol_uuid(vol), merge)
        elif self.dm.table(top) != merge:
            self.dm.suspend(top)
            # The snapshot device and the merge must not both own the COW.
            remove(self.dm, self._snapdev(snap)[0])
            self.dm.load(top, merge)
            self.dm.resume(top)
        remove(self.dm, self._snapdev(snap)[0])
        deadline = time.monotonic() + MERGE_TIMEOUT
        # The kernel frees merged chunks: what is left to merge is the COW's
        # data (allocated beyond its metadata), which shrinks to nothing.
        while True:
            s = self.dm.status(top)[0].status
            if isinstance(s, st.SnapshotMergeStatus):
                left = Bytes.of(s.allocated_sectors - s.metadata_sectors)
                total = left if task.total is None else max(task.total, left)
                task.update(total - left, total)
            if isinstance(s, st.SnapshotMergeStatus) and s.allocated_sectors == s.metadata_sectors:
                break
            if not isinstance(s, st.SnapshotMergeStatus):
                raise Busy(f"merge of {snap.pool}/{snap.volume}@{snap.name} failed: {s}")
            if time.monotonic() > deadline:
                raise Busy(f"merge of {snap.pool}/{snap.volume}@{snap.name} still running")
            time.sleep(0.05)
        ensure(
            self.dm,
            Layer(
                top, self.vol_uuid(vol), Table.single(Sectors.of(vol.size), t.SnapshotOrigin(real))
            ),
        )
        remove(self.dm, self._cow(snap)[0])

    def usage(self) -> dict[str, Any]:
        data = Bytes.of(int(self.pool.config["data_sectors"]))
        free = self.free_bytes()
        out: dict[str, Any] = {
            "backend": "classic",
            "size": data,
            "used": data - free,
            "free": free,
            "data_used_fraction": (data - free) / data,
            "health": [],
            "snapshots": {},
            "cow_autoextend": {
                "threshold": self.policy()["cow_autoextend_threshold"],
                "percent": self.policy()["cow_autoextend_percent"],
            },
        }
        for snap in self.catalog.snapshots(self.pool.name):
            key = f"{snap.volume}@{snap.name}"
            ref = f"{self.pool.name}/{key}"  # as the CLI names it
            try:
                s = self.dm.status(self._snapdev(snap)[0])[0].status
            except DmError:
                out["snapshots"][key] = {"state": "missing"}
                out["health"].append(f"snapshot {ref} is not loaded")
                continue
            if isinstance(s, st.SnapshotStatus):
                frac = s.used_fraction
                out["snapshots"][key] = {
                    "state": "valid",
                    "cow_used_fraction": frac,
                    "cow_size": snap.cow_size,
                }
                if frac >= 0.9:
                    out["health"].append(
                        f"snapshot {ref} COW area {frac:.0%} full: it becomes invalid when full"
                    )
            elif isinstance(s, st.SnapshotInvalid):
                out["snapshots"][key] = {"state": "invalid"}
                out["health"].append(
                    f"snapshot {ref} is INVALID: its COW area overflowed (or failed), "
                    "its contents are lost; delete it"
                )
            else:
                state = type(s).__name__.removeprefix("Snapshot").lower()
                out["snapshots"][key] = {"state": state}
                out["health"].append(f"snapshot {ref} is in state {state}")
        return out

    def snapshot_state(self, snap: Snapshot) -> str:
        """ "valid", "invalid" (its COW area overflowed or failed: the kernel
        dropped it, its contents are lost), or "missing" (not loaded)."""
        try:
            s = self.dm.status(self._snapdev(snap)[0])[0].status
        except DmError:
            return "missing"
        if isinstance(s, st.SnapshotStatus):
            return "valid"
        if isinstance(s, st.SnapshotInvalid):
            return "invalid"
        return type(s).__name__.removeprefix("Snapshot").lower()

    def autoextend(self) -> list[str]:
        """Grow every valid COW area at or past the pool's threshold by its
        percentage, from the pool's free space (any free extents: the COW
        device is a linear over several). Returns what it did or could not
        do, one line each, for the log. Threshold 100: off."""
        pol = self.policy()
        threshold, percent = pol["cow_autoextend_threshold"], pol["cow_autoextend_percent"]
        if threshold >= 100 or percent <= 0:
            return []
        out = []
        for snap in self.catalog.snapshots(self.pool.name):
            try:
                s = self.dm.status(self._snapdev(snap)[0])[0].status
            except DmError:
                continue
            if not isinstance(s, st.SnapshotStatus) or s.used_fraction * 100 < threshold:
                continue
            assert snap.cow_size is not None
            ref = f"{self.pool.name}/{snap.volume}@{snap.name}"
            want = _round_up(Sectors.of(max(MiB, snap.cow_size * percent // 100)), ALIGN)
            got = self._grow_cow(snap, want)
            if got:
                out.append(
                    f"snapshot {ref}: COW area {s.used_fraction:.0%} full, grown by "
                    f"{Bytes.of(got) // MiB} MiB to {(snap.cow_size + Bytes.of(got)) // MiB} MiB"
                )
            else:
                out.append(
                    f"snapshot {ref}: COW area {s.used_fraction:.0%} full and pool "
                    f"{self.pool.name} has no free space to grow it: it becomes invalid when full"
                )
        return out

    def _grow_cow(self, snap: Snapshot, sectors: int) -> int:
        """Add up to ``sectors`` (whole MiB extents, the largest free run
        first) to the snapshot's COW device; returns the sectors added. The
        catalog records the extent first: a crash in between leaves the
        extent reserved, and the next load of the table includes it (a COW
        device loaded smaller than what its snapshot used would lose it)."""
        taken = sorted(self._extents())
        pos, best = 0, (0, 0)
        for start, length in [*taken, (int(self.pool.config["data_sectors"]), 0)]:
            if start - pos > best[1]:
                best = (pos, start - pos)
            pos = max(pos, start + length)
        start, length = best[0], min(best[1], sectors) // ALIGN * ALIGN
        if length <= 0:
            return 0
        self.catalog.add_cow_extent(snap.id, start, length)
        grown = self.catalog.snapshot(snap.pool, snap.volume, snap.name)
        ensure(self.dm, self._cow_layer(grown))  # load, suspend, resume: the new size is live
        return length

    def recover(self, kind: str, payload: dict[str, Any]) -> str:
        if kind == "volume.create":  # the zeroing may not have finished: again
            try:
                self._zero_extent(payload["extent_start"], payload["size"])
            except Unavailable:
                return "back"  # never made: its extent stays free
        if kind != "snapshot.create":
            return "forward"  # volume create/delete, snapshot delete, restore: idempotent
        # The cut happened iff the snapshot target initialised its COW
        # header, in an extent we zeroed before: that survives a reboot,
        # unlike the device.
        vols = {v.name: v for v in self.catalog.volumes(self.pool.name)}
        done = True
        for plan in payload["plans"]:
            snap = Snapshot(
                0,
                0,
                0,
                self.pool.name,
                plan["volume"],
                payload["name"],
                None,
                plan["cow_start"],
                plan["cow_size"],
                False,
                0,
            )
            cow = self._cow_layer(snap)
            ensure(self.dm, cow)
            with open(cow.path, "rb") as f:
                done = done and f.read(4) == COW_MAGIC and plan["volume"] in vols
        if done:
            return "forward"
        for plan in payload["plans"]:
            remove(self.dm, self.internal(f"{plan['volume']}@{payload['name']}.snap")[0])
            remove(self.dm, self.internal(f"{plan['volume']}@{payload['name']}.cow")[0])
        return "back"
