"""What one export is at run time: a LIO user backstore, its TCMU ring
(served in C against the pool's journal), the SPC/SBC emulator for the rest,
and the in-band snapshot command wired to the Manager."""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

from dmsnap import errors as E
from dmsnap.scsi import DEFAULT_WORKER_NICE, lio
from dmsnap.scsi import snapcmd as SC
from dmsnap.scsi.emulation import Emulator, Limits, Lun, TokenBucket, naa_from_serial
from dmsnap.scsi.tcmu import Command, Reply, TcmuDevice, uio_for

log = logging.getLogger("dmsnap.scsi")

BLOCK = 512
MAX_UNMAP_BLOCKS = 1 << 20
# In-band snapshot commands one export path takes: a burst (a schedule's
# CREATE, a few LIST pages and DELETEs), then a steady rate; beyond it the
# rate sense (docs/scsi-snapshot-command.md). Each command takes the
# Manager's lock and may write the catalog: an initiator looping on it
# must not starve the storage system's control operations.
INBAND_RATE = 5.0  # a second
INBAND_BURST = 32


class VolumeLun:
    """A journaled volume as the emulator sees it. Unmap is a journal
    DISCARD: ordered with writes and markers, the range reads zeros at once,
    and the flusher gives the space back (thin: whole thin blocks; the
    unaligned rest and a classic volume get zeros)."""

    block_size = BLOCK
    read_only = False

    def __init__(self, io: Any, wce: bool, serial: str) -> None:
        self.io, self.size, self.wce, self.serial = io, io.size, wce, serial
        self.naa = naa_from_serial(serial)

    def read(self, offset: int, length: int) -> bytes:
        return self.io.read(offset, length)

    def write(self, offset: int, data: bytes, *, fua: bool) -> None:
        self.io.write(offset, data, fua=fua)

    def flush(self) -> None:
        self.io.flush()

    def unmap(self, offset: int, length: int) -> None:
        self.io.discard(offset, length)


class SnapshotDeviceLun:
    """An activated snapshot, read-only, read from its dm device."""

    block_size = BLOCK
    read_only = True
    wce = False

    def __init__(self, path: str, size: int, serial: str) -> None:
        self.path, self.size, self.serial = path, size, serial
        self.naa = naa_from_serial(serial)

    def read(self, offset: int, length: int) -> bytes:
        buf = mmap.mmap(-1, length)
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        try:
            os.preadv(fd, [buf], offset)
            return bytes(buf)
        finally:
            os.close(fd)

    def write(self, offset: int, data: bytes, *, fua: bool) -> None:
        raise OSError(errno.EROFS, "read-only snapshot")

    def flush(self) -> None:
        return None

    def unmap(self, offset: int, length: int) -> None:
        raise OSError(errno.EROFS, "read-only snapshot")


_KIND = {
    E.InvalidArgument: SC.ErrorKind.INVALID_NAME,
    E.AlreadyExists: SC.ErrorKind.INVALID_NAME,
    E.NoSpace: SC.ErrorKind.NO_SPACE,
    E.Unavailable: SC.ErrorKind.NOT_READY,
    E.NotFound: SC.ErrorKind.FAILED,
}


class InbandSnapshots:
    """The vendor command's target side: a request token is the Manager's
    request token (hex). What one export's initiators reach is its pool's
    volumes *visible* to them (:meth:`_visible`): GROUP cuts those, LIST
    and STATUS show the requests that cut one of them (and of a group's
    snapshots, those)."""

    def __init__(self, manager: Any, pool: str, vol: str, wait_timeout: float = 30.0) -> None:
        self.m, self.pool, self.vol, self.wait_timeout = manager, pool, vol, wait_timeout

    def _visible(self) -> dict[int, str]:
        """Volume id -> name of the pool's volumes that every initiator able
        to send the command here may snapshot through an export of its own:
        TCMU does not say which initiator sent it, so the whole set of
        senders of this path must hold the right (an ``--allow-any``
        export's senders are everyone). This volume always."""
        from dmsnap.storage.exports import snapshot_senders

        exports = [e for e in self.m.catalog.exports(self.pool) if e.snapshot is None]
        mine = next((e for e in exports if e.volume == self.vol), None)
        out: dict[int, str] = {}
        if mine is not None:
            senders = snapshot_senders(mine)
            for e in exports:
                theirs = snapshot_senders(e)
                if theirs is None or (senders and theirs is not None and senders <= theirs):
                    out[e.volume_id] = e.volume
        own = self.m.catalog.volume(self.pool, self.vol)
        out[own.id] = own.name
        return out

    def create(self, lun: Lun, request: SC.CreateRequest) -> None:
        with self.m.lock:
            p = self.m.catalog.pool(self.pool)
            earlier = self.m.catalog.marker_by_token(p.id, request.token.hex())
        if earlier is not None and earlier.state == "failed":  # a retry is not a new request
            why = earlier.error or "failed"
            raise SC.SnapshotError(SC.ErrorKind.FAILED, why, marker=earlier.id)
        if earlier is not None and earlier.state == "done":
            return  # made already (and maybe deleted since): a retry makes nothing new
        if request.group:
            with self.m.lock:
                refs = [[self.pool, n] for n in sorted(self._visible().values())]
        else:
            refs = [[self.pool, self.vol]]
        try:
            r = self.m.snapshot_create(
                refs,
                request.name,
                labels=request.labels or None,
                token=request.token.hex(),
                wait=request.wait,
                timeout=self.wait_timeout,
            )
        except E.UserError as e:
            if isinstance(e, E.Unavailable) and "not made within" in e.message:
                raise SC.SnapshotError(SC.ErrorKind.IN_PROGRESS, e.message) from None
            kind = next((k for t, k in _KIND.items() if isinstance(e, t)), SC.ErrorKind.FAILED)
            raise SC.SnapshotError(kind, e.message) from None
        if r.get("state") == "failed":
            raise SC.SnapshotError(SC.ErrorKind.FAILED, r.get("error") or "snapshot failed")

    def _groups(self) -> dict[int, list[Any]]:
        """The pool's snapshots by group (a request's group_id)."""
        out: dict[int, list[Any]] = {}
        for s in self.m.catalog.snapshots(self.pool):
            out.setdefault(s.group_id, []).append(s)
        return out

    def _entry(
        self, mk: Any, groups: dict[int, list[Any]], visible: dict[int, str]
    ) -> SC.SnapEntry:
        state = {"pending": SC.State.PENDING, "done": SC.State.DONE}.get(mk.state, SC.State.FAILED)
        members = groups.get(mk.group_id, []) if mk.group_id is not None else []
        members = [s for s in members if s.volume_id in visible]
        snaps = tuple(f"{s.pool}/{s.volume}@{s.name}" for s in members)
        error = mk.error or ""
        if state is SC.State.DONE and not members:  # every snapshot it made is gone
            state = SC.State.DELETED
        elif state is SC.State.DONE:
            # made, but a classic COW area overflowed since: its content is lost
            bad = [s for s in members if self.m.snapshot_state(s) == "invalid"]
            if bad:
                state = SC.State.FAILED
                error = f"snapshot {bad[0].pool}/{bad[0].volume}@{bad[0].name} is invalid"
        try:
            token = bytes.fromhex(mk.token or "")
        except ValueError:
            token = b""
        return SC.SnapEntry(
            token=token if len(token) == SC.TOKEN_LEN else bytes(SC.TOKEN_LEN),
            name=mk.name,
            state=state,
            group=len(mk.request.get("volumes", [])) > 1,
            marker=mk.id,
            requested=int(mk.created),
            snapshots=snaps,
            labels=mk.request.get("labels") or {},
            error=error,
        )

    def _markers(self, visible: dict[int, str]) -> list[Any]:
        """The pool's requests, newest first, that cut a visible volume."""
        with self.m.lock:
            p = self.m.catalog.pool(self.pool)
            return [
                mk
                for mk in reversed(self.m.catalog.markers(p.id))
                if any(v in visible for v in mk.request.get("volumes", []))
            ]

    def status(self, lun: Lun, handle: bytes) -> Sequence[SC.SnapEntry]:
        suffix = handle.hex()
        with self.m.lock:
            groups, visible = self._groups(), self._visible()
            return [
                self._entry(mk, groups, visible)
                for mk in self._markers(visible)
                if (mk.token or "").endswith(suffix)
            ]

    def list(self, lun: Lun, skip: int = 0) -> Sequence[SC.SnapEntry]:
        # Deleted requests are left out (STATUS still reports them), so the
        # window holds what exists: a long-running `schedule --keep` stays in it.
        with self.m.lock:
            groups, visible = self._groups(), self._visible()
            live = (self._entry(mk, groups, visible) for mk in self._markers(visible))
            kept = (e for e in live if e.state is not SC.State.DELETED)
            return list(islice(kept, skip, skip + SC.LIST_MAX))

    def delete(self, lun: Lun, token: bytes) -> None:
        with self.m.lock:
            p = self.m.catalog.pool(self.pool)
            mk = self.m.catalog.marker_by_token(p.id, token.hex())
            if mk is None or mk.state == "failed":
                raise SC.SnapshotError(SC.ErrorKind.UNKNOWN, f"no snapshot made by {token.hex()}")
            if mk.state == "pending":
                raise SC.SnapshotError(SC.ErrorKind.IN_PROGRESS, marker=mk.id)
            vol_id = self.m.catalog.volume(self.pool, self.vol).id
            if vol_id not in mk.request.get("volumes", []):  # another volume's request
                raise SC.SnapshotError(SC.ErrorKind.UNKNOWN, f"{token.hex()}: not {self.vol}")
            groups = self._groups() if mk.group_id is not None else {}
            mine = [s for s in groups.get(mk.group_id, []) if s.volume_id == vol_id]
            if not mine:
                return  # deleted already: a retry changes nothing
        try:
            self.m.snapshot_delete(self.pool, self.vol, mine[0].name)
        except E.NotFound:
            return  # deleted meanwhile
        except E.UserError as e:
            kind = {E.Busy: SC.ErrorKind.IN_USE, E.Unavailable: SC.ErrorKind.NOT_READY}.get(
                type(e), SC.ErrorKind.FAILED
            )
            raise SC.SnapshotError(kind, e.message, marker=mk.id) from None


@dataclass
class LunPath:
    """One user backstore of an export with its ring and emulator. An export
    whose initiators have different snapshot rights has two over the same
    volume: one takes the snapshot command, one refuses it (ACCESS DENIED);
    each initiator's ACL maps its LUN 0 to one of them."""

    backstore: lio.Backstore
    device: TcmuDevice
    emulator: Emulator
    may_snapshot: bool


@dataclass
class Running:
    """One export at work: its paths (the first takes the snapshot command
    when anyone may) and its fabric."""

    paths: list[LunPath]
    fabric_id: str  # tcm_loop WWN or iSCSI IQN
    source: Any = None  # what the paths serve (storage.exports.PathSource)

    @property
    def backstore(self) -> lio.Backstore:
        return self.paths[0].backstore

    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for p in self.paths:
            for k, v in p.device.stats().items():
                total[k] = total.get(k, 0) + v
        return total

    def stop(self) -> None:
        for p in self.paths:
            p.device.close()


def make_emulator(
    lun: Any,
    snapshots: Any,
    *,
    snapshot_allowed: Callable[[str], bool],
    limits: Limits | None = None,
) -> Emulator:
    """The emulator of one export path, with its bound on in-band requests."""
    return Emulator(
        lun,
        snapshots,
        snapshot_allowed=snapshot_allowed,
        limits=limits,
        inband_rate=TokenBucket(INBAND_RATE, INBAND_BURST),
    )


def start_device(
    bs: lio.Backstore,
    lun: Any,
    *,
    journal: Any | None,
    vol_id: int,
    snapshots: InbandSnapshots | None,
    snapshot_allowed: Callable[[str], bool],
    initiator: str,
    unmap_granularity: int = Limits.unmap_granularity,
    worker_nice: int = DEFAULT_WORKER_NICE,
) -> tuple[TcmuDevice, Emulator]:
    # 1 MiB: what the ring accepts per command (lio.MAX_SECTORS). UNMAP runs
    # here (a journal DISCARD per descriptor, one slow-path thread): at most
    # 1 Mi blocks per command, the bound libiscsi's conformance suite calls
    # sane. unmap_granularity: the thin pool's block size (only whole thin
    # blocks are given back), the optimal granularity elsewhere.
    limits = Limits(
        max_transfer=lio.MAX_SECTORS * BLOCK,
        max_unmap=MAX_UNMAP_BLOCKS * BLOCK,
        unmap_granularity=unmap_granularity,
    )
    emu = make_emulator(lun, snapshots, snapshot_allowed=snapshot_allowed, limits=limits)
    lock = threading.Lock()
    holder: dict[str, TcmuDevice] = {}

    def handle(cmd: Command) -> Reply:
        r = emu.execute(
            cmd.cdb, cmd.data_out or None, initiator=initiator, data_in_len=cmd.data_len
        )
        dev = holder.get("dev")
        if dev is not None and cmd.cdb[0] in (0x15, 0x55):  # MODE SELECT: D_SENSE may change
            with lock:
                dev.set_descriptor_sense(emu.descriptor_sense)
        return Reply(r.status, r.data, r.sense)

    uio, size = uio_for(bs.hba, bs.name)
    # A process that died with commands in flight (kill -9) left them in the
    # ring, but the entries between cmd_tail and cmd_head are not those
    # commands: every answer is written over the entry at the tail (out-of-
    # order completion), so once one command outlived a later one, that window
    # holds commands already completed (their data area since reused) and
    # misses some still pending. Taking them again would write stale data and
    # answer unknown ids, which makes the kernel mark the ring broken (every
    # later command: LOGICAL UNIT COMMUNICATION FAILURE). So hold new commands
    # and let the kernel fail what the ring holds with BUSY (initiators retry
    # it); the ring starts empty.
    _reset_ring(bs)
    dev = TcmuDevice(
        uio,
        size,
        handle,
        journal=journal,
        vol=vol_id,
        size=lun.size,
        read_only=lun.read_only,
        worker_nice=worker_nice,
    )
    holder["dev"] = dev
    try:
        lio.control(bs, "block_dev", 0)
    except OSError as e:
        log.warning("%s: could not let commands through (block_dev 0): %s", bs.name, e)
    return dev, emu


def _reset_ring(bs: lio.Backstore) -> None:
    try:
        lio.control(bs, "block_dev", 1)
        lio.control(bs, "reset_ring", 1)
    except OSError as e:  # not this kernel's TCMU: take the ring as it is
        log.warning("%s: could not reset the TCMU ring: %s", bs.name, e)
