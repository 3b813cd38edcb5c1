"""What one export is at run time: a LIO user backstore, its TCMU ring
(served in C against the pool's journal) and the SPC/SBC emulator for the
rest. The in-band snapshot command's target side is the storage core's
(:mod:`dmsnap.storage.inband`); it reaches this module as ``snapshots``."""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dmsnap.scsi import DEFAULT_WORKER_NICE, lio
from dmsnap.scsi.emulation import Emulator, Limits, TokenBucket, naa_from_serial
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

    def stats(self) -> dict[str, Any]:
        """The paths' counters added up (histograms bucket by bucket)."""
        total: dict[str, Any] = {}
        for p in self.paths:
            for k, v in p.device.stats().items():
                if isinstance(v, list):
                    prev = total.get(k) or [0] * len(v)
                    total[k] = [a + b for a, b in zip(prev, v, strict=True)]
                else:
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
    snapshots: Any | None,  # dmsnap.storage.inband.InbandSnapshots
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
