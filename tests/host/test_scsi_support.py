"""Shared pieces of the SCSI host tests (no tests in here).

* :class:`FakeLun` (a bytearray volume that records every call and refuses
  out-of-range I/O loudly) and :class:`FakeSnapshots` (an in-memory
  SnapshotService with the token semantics the daemon must have).
* CDB builders, so tests read like the commands they send.
* :class:`FakeSgDevice`: a path that sg3-utils tools open as if it were a
  SCSI device. An LD_PRELOAD shim (built here with cc) answers their SG_IO
  ioctls by forwarding CDB + Data-Out over a Unix socket to an Emulator in
  this process, so ``sg_readcap``, ``sg_modes``, ``sg_opcodes``, ``sg_raw``...
  judge our answers exactly as they would judge a disk's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dmsnap.scsi import snapcmd as SC
from dmsnap.scsi.emulation import Emulator, Limits, Response

BS = 512


class OutOfRange(AssertionError):
    pass


@dataclass
class FakeLun:
    size: int = 16 * 1024 * 1024
    block_size: int = BS
    wce: bool = True
    read_only: bool = False
    serial: str = "dmsnap-0123456789abcdef"
    naa: bytes = bytes.fromhex("6001405" + "0123456789abcdef" + "000000000")
    calls: list[tuple] = field(default_factory=list)
    fail: BaseException | None = None

    def __post_init__(self) -> None:
        self.buf = bytearray(self.size)

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRange(f"I/O outside the LUN: {offset}+{length} > {self.size}")
        if offset % self.block_size or length % self.block_size:
            raise OutOfRange(f"unaligned I/O {offset}+{length}")
        if self.fail is not None:
            raise self.fail

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        self.calls.append(("read", offset, length))
        return bytes(self.buf[offset : offset + length])

    def write(self, offset: int, data: bytes, *, fua: bool) -> None:
        self._check(offset, len(data))
        if self.read_only:
            raise OutOfRange("write to a read-only LUN reached the LUN")
        self.calls.append(("write", offset, len(data), fua))
        self.buf[offset : offset + len(data)] = data

    def compare_and_write(
        self, offset: int, compare: bytes, data: bytes, *, fua: bool
    ) -> int | None:
        self._check(offset, len(data))
        if self.read_only:
            raise OutOfRange("write to a read-only LUN reached the LUN")
        have = bytes(self.buf[offset : offset + len(data)])
        if have != compare:
            self.calls.append(("compare", offset, len(data)))
            return next(i for i in range(len(have)) if have[i] != compare[i])
        self.calls.append(("write", offset, len(data), fua))
        self.buf[offset : offset + len(data)] = data
        return None

    def flush(self) -> None:
        if self.fail is not None:
            raise self.fail
        self.calls.append(("flush",))

    def unmap(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if self.read_only:
            raise OutOfRange("unmap of a read-only LUN reached the LUN")
        self.calls.append(("unmap", offset, length))
        self.buf[offset : offset + length] = bytes(length)

    def writes(self) -> list[tuple]:
        return [c for c in self.calls if c[0] in ("write", "unmap")]


class FakeSnapshots:
    """Token-idempotent requests, unique names, newest first; errors on demand."""

    def __init__(self) -> None:
        self.entries: list[SC.SnapEntry] = []  # newest first
        self.created: list[SC.CreateRequest] = []
        self.deleted: list[bytes] = []  # tokens whose snapshot DELETE removed
        self.in_use: set[str] = set()  # names of snapshots that are exported/open
        self.raise_next: SC.SnapshotError | None = None
        self.clock = 1_700_000_000
        self.lock = threading.Lock()

    def create(self, lun: object, request: SC.CreateRequest) -> None:
        with self.lock:
            if self.raise_next is not None:
                err, self.raise_next = self.raise_next, None
                raise err
            for e in self.entries:
                if e.token == request.token:
                    if e.state is SC.State.FAILED:
                        raise SC.SnapshotError(SC.ErrorKind.FAILED, e.error, marker=e.marker)
                    return
            if any(e.name == request.name and e.state != SC.State.DELETED for e in self.entries):
                raise SC.SnapshotError(SC.ErrorKind.INVALID_NAME, "name in use")
            self.created.append(request)
            self.clock += 1
            marker = len(self.created)
            vols = ("db", "logs") if request.group else ("db",)
            self.entries.insert(
                0,
                SC.SnapEntry(
                    token=request.token,
                    name=request.name,
                    state=SC.State.DONE if request.wait else SC.State.PENDING,
                    group=request.group,
                    marker=marker,
                    requested=self.clock,
                    snapshots=tuple(f"tank/{v}@{request.name}" for v in vols)
                    if request.wait
                    else (),
                    labels=dict(request.labels),
                ),
            )

    def status(self, lun: object, handle: bytes) -> list[SC.SnapEntry]:
        return [e for e in self.entries if e.token.endswith(handle)]

    def list(self, lun: object, skip: int = 0) -> list[SC.SnapEntry]:
        live = [e for e in self.entries if e.state is not SC.State.DELETED]
        return live[skip : skip + SC.LIST_MAX]

    def delete(self, lun: object, token: bytes) -> None:
        with self.lock:
            if self.raise_next is not None:
                err, self.raise_next = self.raise_next, None
                raise err
            for i, e in enumerate(self.entries):
                if e.token != token:
                    continue
                if e.state is SC.State.FAILED:
                    break
                if e.state is SC.State.PENDING:
                    raise SC.SnapshotError(SC.ErrorKind.IN_PROGRESS, marker=e.marker)
                if e.state is SC.State.DONE:
                    if e.name in self.in_use:
                        raise SC.SnapshotError(SC.ErrorKind.IN_USE, "exported")
                    self.entries[i] = dataclasses.replace(e, state=SC.State.DELETED, snapshots=())
                    self.deleted.append(token)
                return  # DELETED already: a retry
            raise SC.SnapshotError(SC.ErrorKind.UNKNOWN, "no such request")


def emulator(
    lun: FakeLun | None = None,
    snaps: FakeSnapshots | None = None,
    *,
    allowed: bool = True,
    limits: Limits | None = None,
) -> Emulator:
    return Emulator(
        lun or FakeLun(),
        snaps,
        snapshot_allowed=lambda _i: allowed,
        limits=limits,
    )


# -- CDB builders -------------------------------------------------------------------------


def inquiry(page: int | None = None, alloc: int = 255) -> bytes:
    return bytes((0x12, 0 if page is None else 1, page or 0)) + alloc.to_bytes(2, "big") + b"\0"


def rw10(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return bytes((op, flags)) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"


def rw12(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return bytes((op, flags)) + lba.to_bytes(4, "big") + blocks.to_bytes(4, "big") + b"\0\0"


def rw16(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return bytes((op, flags)) + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + b"\0\0"


def rw6(op: int, lba: int, blocks: int) -> bytes:
    return bytes((op, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, blocks & 0xFF, 0))


def mode_sense6(page: int, pc: int = 0, dbd: bool = False, alloc: int = 255, sub: int = 0) -> bytes:
    return bytes((0x1A, 0x08 if dbd else 0, (pc << 6) | page, sub, alloc, 0))


def mode_sense10(
    page: int, pc: int = 0, dbd: bool = False, llbaa: bool = False, alloc: int = 4096
) -> bytes:
    b1 = (0x08 if dbd else 0) | (0x10 if llbaa else 0)
    return bytes((0x5A, b1, (pc << 6) | page, 0, 0, 0, 0)) + alloc.to_bytes(2, "big") + b"\0"


def mode_select6(plen: int, pf: bool = True, sp: bool = False) -> bytes:
    return bytes((0x15, (0x10 if pf else 0) | (0x01 if sp else 0), 0, 0, plen, 0))


def mode_select10(plen: int, pf: bool = True, sp: bool = False) -> bytes:
    b1 = (0x10 if pf else 0) | (0x01 if sp else 0)
    return bytes((0x55, b1, 0, 0, 0, 0, 0)) + plen.to_bytes(2, "big") + b"\0"


def read_capacity16(alloc: int = 32) -> bytes:
    return bytes((0x9E, 0x10)) + bytes(8) + alloc.to_bytes(4, "big") + b"\0\0"


def rsoc(opts: int = 0, op: int = 0, sa: int = 0, alloc: int = 8192, rctd: bool = False) -> bytes:
    b2 = (0x80 if rctd else 0) | opts
    return bytes((0xA3, 0x0C, b2, op)) + sa.to_bytes(2, "big") + alloc.to_bytes(4, "big") + b"\0\0"


def unmap_cdb(plen: int) -> bytes:
    return bytes((0x42, 0, 0, 0, 0, 0, 0)) + plen.to_bytes(2, "big") + b"\0"


def unmap_params(ranges: list[tuple[int, int]]) -> bytes:
    body = b"".join(lba.to_bytes(8, "big") + n.to_bytes(4, "big") + bytes(4) for lba, n in ranges)
    return (len(body) + 6).to_bytes(2, "big") + len(body).to_bytes(2, "big") + bytes(4) + body


def sense_of(r: Response) -> tuple[int, int, int]:
    s = r.decoded_sense()
    assert s is not None, r
    return (s.key, s.asc, s.ascq)


# -- sg3-utils through a fake SG_IO device --------------------------------------------------

SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <scsi/sg.h>

#define MAXFD 4096
static char fake[MAXFD];

static int wanted(const char *path) {
    const char *dev = getenv("DMSNAP_FAKE_SG_DEV");
    return dev && path && strcmp(dev, path) == 0;
}

static int connect_fake(void) {
    const char *path = getenv("DMSNAP_FAKE_SG_SOCKET");
    struct sockaddr_un sa;
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0 || !path) return -1;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    strncpy(sa.sun_path, path, sizeof sa.sun_path - 1);
    if (connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) { close(s); return -1; }
    if (s < MAXFD) fake[s] = 1;
    return s;
}

#define OPENER(NAME)                                                          \
int NAME(const char *path, int flags, ...) {                                  \
    static int (*real)(const char *, int, ...);                               \
    va_list ap; mode_t mode;                                                  \
    va_start(ap, flags); mode = va_arg(ap, int); va_end(ap);                  \
    if (wanted(path)) return connect_fake();                                  \
    if (!real) real = dlsym(RTLD_NEXT, #NAME);                                \
    return real(path, flags, mode);                                           \
}
OPENER(open)
OPENER(open64)

#define OPEN2(NAME)                                                           \
int NAME(const char *path, int flags) {                                       \
    static int (*real)(const char *, int);                                    \
    if (wanted(path)) return connect_fake();                                  \
    if (!real) real = dlsym(RTLD_NEXT, #NAME);                                \
    return real(path, flags);                                                 \
}
OPEN2(__open_2)
OPEN2(__open64_2)

#define OPENAT(NAME)                                                          \
int NAME(int dirfd, const char *path, int flags, ...) {                       \
    static int (*real)(int, const char *, int, ...);                          \
    va_list ap; mode_t mode;                                                  \
    va_start(ap, flags); mode = va_arg(ap, int); va_end(ap);                  \
    if (wanted(path)) return connect_fake();                                  \
    if (!real) real = dlsym(RTLD_NEXT, #NAME);                                \
    return real(dirfd, path, flags, mode);                                    \
}
OPENAT(openat)
OPENAT(openat64)

int close(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "close");
    if (fd >= 0 && fd < MAXFD) fake[fd] = 0;
    return real(fd);
}

static int xfer(int fd, void *buf, size_t n, int out) {
    char *p = buf;
    while (n) {
        ssize_t r = out ? write(fd, p, n) : read(fd, p, n);
        if (r <= 0) { if (r < 0 && errno == EINTR) continue; return -1; }
        p += r; n -= (size_t)r;
    }
    return 0;
}

static int do_sg_io(int fd, sg_io_hdr_t *h) {
    uint8_t head[1 + 255 + 12];
    uint32_t dout = h->dxfer_direction == SG_DXFER_TO_DEV ? h->dxfer_len : 0;
    uint32_t din = h->dxfer_direction == SG_DXFER_FROM_DEV ? h->dxfer_len : 0;
    int32_t dir = h->dxfer_direction;
    uint8_t st[2], sense[256];
    uint32_t dlen;
    size_t k = 0;
    if (h->interface_id != 'S' || h->iovec_count) { errno = EINVAL; return -1; }
    head[k++] = h->cmd_len;
    memcpy(head + k, h->cmdp, h->cmd_len); k += h->cmd_len;
    memcpy(head + k, &dir, 4); k += 4;
    memcpy(head + k, &din, 4); k += 4;
    memcpy(head + k, &dout, 4); k += 4;
    if (xfer(fd, head, k, 1) || (dout && xfer(fd, h->dxferp, dout, 1))) { errno = EIO; return -1; }
    if (xfer(fd, st, 2, 0) || xfer(fd, sense, st[1], 0) || xfer(fd, &dlen, 4, 0)) {
        errno = EIO; return -1;
    }
    if (dlen > din) { errno = EIO; return -1; }
    if (dlen && xfer(fd, h->dxferp, dlen, 0)) { errno = EIO; return -1; }
    h->status = st[0];
    h->masked_status = (st[0] >> 1) & 0x7f;
    h->msg_status = 0;
    h->host_status = 0;
    h->driver_status = st[1] ? 0x08 : 0; /* DRIVER_SENSE */
    h->sb_len_wr = st[1] < h->mx_sb_len ? st[1] : h->mx_sb_len;
    if (h->sb_len_wr && h->sbp) memcpy(h->sbp, sense, h->sb_len_wr);
    h->resid = (int)(din - dlen);
    h->duration = 0;
    h->info = st[0] ? SG_INFO_CHECK : 0;
    return 0;
}

int ioctl(int fd, unsigned long req, ...) {
    static int (*real)(int, unsigned long, ...);
    va_list ap; void *arg;
    va_start(ap, req); arg = va_arg(ap, void *); va_end(ap);
    if (fd >= 0 && fd < MAXFD && fake[fd]) {
        if (req == SG_IO) return do_sg_io(fd, arg);
        if (req == SG_GET_VERSION_NUM) { *(int *)arg = 30536; return 0; }
        errno = ENOTTY;
        return -1;
    }
    if (!real) real = dlsym(RTLD_NEXT, "ioctl");
    return real(fd, req, arg);
}
"""


def build_shim(dest: Path) -> Path | None:
    """Compile the SG_IO shim; None when there is no C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src = dest / "fakesg.c"
    so = dest / "fakesg.so"
    src.write_text(SHIM_C)
    subprocess.run(
        [cc, "-shared", "-fPIC", "-O1", "-o", str(so), str(src), "-ldl"],
        check=True,
        capture_output=True,
    )
    return so


class FakeSgDevice:
    """Serve an Emulator on a Unix socket for sg3-utils run under the shim."""

    def __init__(self, emu: Emulator, shim: Path, workdir: Path) -> None:
        self.emu = emu
        self.shim = shim
        self.dev = str(workdir / "fake-sg-device")
        self.sock_path = str(workdir / "fake-sg.sock")
        self.log: list[tuple[bytes, Response]] = []
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(self.sock_path)
        self._srv.listen(8)
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            LD_PRELOAD=str(self.shim),
            DMSNAP_FAKE_SG_DEV=self.dev,
            DMSNAP_FAKE_SG_SOCKET=self.sock_path,
        )
        return env

    def run(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run an sg3-utils tool against the fake device ('DEV' in args is replaced)."""
        argv = [self.dev if a == "DEV" else a for a in args]
        p = subprocess.run(
            argv, env=self.env(), capture_output=True, timeout=60, input=input, check=False
        )
        return subprocess.CompletedProcess(
            p.args, p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode("latin-1")
        )

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self._srv.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self._srv.close()
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _recv(conn: socket.socket, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = conn.recv(n - len(out))
            if not chunk:
                raise EOFError
            out += chunk
        return bytes(out)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    n = self._recv(conn, 1)[0]
                    cdb = self._recv(conn, n)
                    direction, din, dout = struct.unpack("=iII", self._recv(conn, 12))
                    data_out = self._recv(conn, dout) if dout else None
                    rsp = self.emu.execute(
                        cdb,
                        data_out,
                        initiator="sg3-utils",
                        data_in_len=din if direction == -3 else 0,
                    )
                    self.log.append((cdb, rsp))
                    data = rsp.data[:din]
                    conn.sendall(
                        bytes((rsp.status, len(rsp.sense)))
                        + rsp.sense
                        + struct.pack("=I", len(data))
                        + data
                    )
            except (EOFError, OSError):
                return


def wait_for(pred, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()
