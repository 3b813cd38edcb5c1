"""One TCMU device (a LIO user backstore's UIO ring) served by dmsnapd.

The ring loop and READ/WRITE run in C (``csrc/tcmu.c``) against the pool's
journal; every other command comes here, to :class:`TcmuDevice`'s controller
thread, which hands it to ``handler`` (the SPC/SBC emulator) and completes it.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dmsnap._hotpath import ffi, lib
from dmsnap.scsi import DEFAULT_WORKER_NICE

log = logging.getLogger("dmsnap.scsi")

GOOD = 0x00
CHECK_CONDITION = 0x02
BUSY = 0x08

# Upper bounds (seconds) of the fast path's latency buckets (csrc/tcmu.h,
# TC_LAT_*); a last bucket, +Inf, follows.
LATENCY_BOUNDS: tuple[float, ...] = tuple(
    (lib.TC_LAT_FIRST_US << i) / 1e6 for i in range(lib.TC_LAT_BUCKETS - 1)
)


@dataclass(frozen=True)
class Command:
    """A command the fast path left to the controller."""

    cmd_id: int
    cdb: bytes
    data_len: int  # room for Data-In, or the length of Data-Out
    data_out: bytes  # the buffer's content (meaningful for Data-Out commands)


@dataclass(frozen=True)
class Reply:
    status: int
    data: bytes = b""
    sense: bytes = b""


Handler = Callable[[Command], Reply]


class TcmuError(OSError):
    pass


def uio_for(hba: int, name: str) -> tuple[str, int]:
    """The UIO device of the user backstore ``user_<hba>/<name>`` and the
    size of its map (sysfs, as the TCMU design document describes)."""
    want = f"tcm-user/{hba}/{name}/"
    for uio in sorted(os.listdir("/sys/class/uio")):
        with open(f"/sys/class/uio/{uio}/name") as f:
            if not f.read().startswith(want):
                continue
        with open(f"/sys/class/uio/{uio}/maps/map0/size") as f:
            return f"/dev/{uio}", int(f.read().strip(), 0)
    raise TcmuError(errno.ENODEV, f"no UIO device for user_{hba}/{name}")


class TcmuDevice:
    def __init__(
        self,
        uio: str,
        map_size: int,
        handler: Handler,
        *,
        journal: Any | None,
        vol: int,
        size: int,
        block_size: int = 512,
        read_only: bool = False,
        workers: int = 16,
        worker_nice: int = DEFAULT_WORKER_NICE,
        null_io: bool = False,
    ) -> None:
        """``worker_nice``: the fast-path threads run this much nicer than
        the thread that opens the device (see DEFAULT_WORKER_NICE).
        ``null_io`` (bench only, no journal): READ/WRITE are answered GOOD
        at once with no I/O, so a benchmark sees what the ring itself costs."""
        if not 0 <= worker_nice <= 19:
            raise ValueError(f"worker_nice {worker_nice}: must be 0..19")
        self.uio = uio
        self._handler = handler
        cfg = ffi.new(
            "struct tc_config *",
            {
                "vol": vol,
                "size": size,
                "block_size": block_size,
                "read_only": int(read_only),
                "workers": workers,
                "timeout_ms": 10000,
                "null_io": int(null_io),
                "worker_nice": worker_nice,
            },
        )
        out = ffi.new("tc_dev_t **")
        jh = journal.c_handle if journal is not None else ffi.NULL
        rc = lib.tc_open(os.fsencode(uio), map_size, jh, cfg, out)
        if rc < 0:
            why = "not a ring version dmsnap speaks" if rc == -errno.EPROTO else ""
            raise TcmuError(-rc, f"open {uio}: {why or os.strerror(-rc)}")
        self._d = out[0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"tcmu-{uio}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        slow = ffi.new("struct tc_slow *")
        while not self._stop.is_set():
            rc = lib.tc_next_slow(self._d, 200, slow)
            if rc == -errno.ETIMEDOUT:
                continue
            if rc < 0:
                return
            cdb = bytes(ffi.buffer(slow.cdb, slow.cdb_len))
            n = slow.data_len
            data = b""
            if n:
                buf = ffi.new("uint8_t[]", n)
                got = lib.tc_data_out(self._d, slow.cmd_id, buf, n)
                data = bytes(ffi.buffer(buf, max(got, 0)))
            cmd = Command(slow.cmd_id, cdb, n, data)
            try:
                reply = self._handler(cmd)
            except Exception:  # the emulator answers everything; this is a bug
                log.exception("%s: command %s failed", self.uio, cdb.hex())
                # HARDWARE ERROR, INTERNAL TARGET FAILURE (fixed format)
                sense = bytes([0x70, 0, 0x04, 0, 0, 0, 0, 10] + [0] * 4 + [0x44, 0] + [0] * 4)
                reply = Reply(CHECK_CONDITION, b"", sense)
            lib.tc_complete(
                self._d,
                slow.cmd_id,
                reply.status,
                reply.data,
                len(reply.data),
                reply.sense,
                len(reply.sense),
            )

    def set_descriptor_sense(self, on: bool) -> None:
        lib.tc_set_desc_sense(self._d, 1 if on else 0)

    def stats(self) -> dict[str, Any]:
        """The ring's counters; ``read_latency``/``write_latency``: the
        fast path's latency histogram, one count per bucket of
        :data:`LATENCY_BOUNDS` (not cumulative; the last bucket is +Inf)."""
        st = ffi.new("struct tc_stats *")
        lib.tc_get_stats(self._d, st)
        out: dict[str, Any] = {
            k: int(getattr(st, k))
            for k in (
                *("fetched", "fast_reads", "fast_writes", "slow", "errors", "busy", "inflight"),
                *("kicks", "read_bytes", "write_bytes", "read_ns", "write_ns"),
            )
        }
        out["read_latency"] = [int(x) for x in st.read_lat]
        out["write_latency"] = [int(x) for x in st.write_lat]
        return out

    def close(self) -> None:
        """Stop; commands not complete are answered BUSY (initiators retry)."""
        if self._d == ffi.NULL:
            return
        self._stop.set()
        self._thread.join()
        lib.tc_close(self._d)
        self._d = ffi.NULL
