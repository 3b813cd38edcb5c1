"""Loop devices through the kernel's loop ioctls (<linux/loop.h> via cffi).

Used for the embedded default pool (sparse files in the state directory)
and by tests. No ``losetup`` subprocess.
"""

from __future__ import annotations

import errno
import glob
import os
from dataclasses import dataclass

from dmsnap import progress
from dmsnap.storage._loopffi import ffi, lib
from dmsnap.units import Bytes

LOOP_CONTROL = "/dev/loop-control"
ZERO_PIECE = 64 << 20  # zero_range's step: one progress report each


class LoopError(OSError):
    pass


@dataclass(frozen=True)
class LoopDevice:
    path: str
    backing_file: str

    @property
    def number(self) -> int:
        return int(self.path.removeprefix("/dev/loop"))

    @property
    def devno(self) -> str:
        st = os.stat(self.path)
        return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"

    @property
    def size(self) -> int:
        with open(f"/sys/block/loop{self.number}/size") as f:
            return Bytes.of(int(f.read()))  # sysfs counts 512-byte sectors


def _ioctl(fd: int, req: int, arg: object, what: str) -> int:
    rc = lib.ioctl(fd, req, arg)
    if rc < 0:
        err = ffi.errno
        raise LoopError(err, f"{what}: {os.strerror(err)}")
    return rc


def supports_direct_io(path: str) -> bool:
    """Whether O_DIRECT reads of ``path`` really work. Some stacks (overlayfs
    over tmpfs) accept the open and the loop flag, then fail every I/O."""
    import mmap

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.preadv(fd, [mmap.mmap(-1, 4096)], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def attach(
    backing_file: str,
    *,
    read_only: bool = False,
    direct_io: bool = True,
    autoclear: bool = False,
    block_size: int = 512,
) -> LoopDevice:
    """Attach ``backing_file`` to a free loop device (LOOP_CONFIGURE, atomic).

    ``direct_io`` avoids double caching of the backing file in the page
    cache; the kernel silently falls back to buffered I/O where the backing
    filesystem cannot do it. ``autoclear`` detaches on last close.
    """
    backing_file = os.path.abspath(backing_file)
    direct_io = direct_io and supports_direct_io(backing_file)
    flags = os.O_RDONLY if read_only else os.O_RDWR
    try:
        bfd = os.open(backing_file, flags | os.O_CLOEXEC)
    except OSError as e:
        raise LoopError(e.errno, f"loop attach {backing_file}: {e.strerror}") from None
    try:
        ctl = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
        try:
            # Another process may grab the free device between GET_FREE and
            # CONFIGURE; the kernel then answers EBUSY and we try the next.
            for _ in range(64):
                n = _ioctl(ctl, lib.LOOP_CTL_GET_FREE, ffi.cast("long", 0), "loop get free")
                path = f"/dev/loop{n}"
                lfd = os.open(path, flags | os.O_CLOEXEC)
                try:
                    cfg = ffi.new("struct loop_config *")
                    cfg.fd = bfd
                    cfg.block_size = block_size
                    lo_flags = 0
                    if read_only:
                        lo_flags |= lib.LO_FLAGS_READ_ONLY
                    if autoclear:
                        lo_flags |= lib.LO_FLAGS_AUTOCLEAR
                    if direct_io:
                        lo_flags |= lib.LO_FLAGS_DIRECT_IO
                    cfg.info.lo_flags = lo_flags
                    name = backing_file.encode()[: lib.LO_NAME_SIZE - 1]
                    ffi.memmove(cfg.info.lo_file_name, name, len(name))
                    rc = lib.ioctl(lfd, lib.LOOP_CONFIGURE, cfg)
                    if rc < 0:
                        err = ffi.errno
                        if err == errno.EBUSY:
                            continue
                        if err == errno.EINVAL and direct_io:
                            # Backing filesystem refuses O_DIRECT (tmpfs).
                            direct_io = False
                            continue
                        raise LoopError(err, f"loop attach {backing_file}: {os.strerror(err)}")
                    return LoopDevice(path, backing_file)
                finally:
                    os.close(lfd)
            raise LoopError(errno.EBUSY, f"loop attach {backing_file}: no free loop device")
        finally:
            os.close(ctl)
    finally:
        os.close(bfd)


def detach(dev: LoopDevice | str) -> None:
    path = dev.path if isinstance(dev, LoopDevice) else dev
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        rc = lib.ioctl(fd, lib.LOOP_CLR_FD, ffi.cast("long", 0))
        if rc < 0 and ffi.errno != errno.ENXIO:  # ENXIO: already detached
            err = ffi.errno
            raise LoopError(err, f"loop detach {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def find(backing_file: str) -> LoopDevice | None:
    """The loop device currently backed by ``backing_file``, if any."""
    backing_file = os.path.abspath(backing_file)
    for bf in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(bf) as f:
                current = f.read().strip()
        except OSError:
            continue
        if current == backing_file:
            return LoopDevice("/dev/" + bf.split("/")[3], backing_file)
    return None


def attached() -> list[LoopDevice]:
    out = []
    for bf in sorted(glob.glob("/sys/block/loop*/loop/backing_file")):
        try:
            with open(bf) as f:
                out.append(LoopDevice("/dev/" + bf.split("/")[3], f.read().strip()))
        except OSError:
            continue
    return out


def make_sparse(path: str, size: int) -> None:
    """A sparse backing file of ``size`` bytes (no blocks allocated), 0600:
    it is a pool's disk. Never through a symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def discard_fd(fd: int, offset: int, length: int, what: str) -> None:
    """BLKDISCARD ``[offset, offset+length)`` of an open block device (on a
    thin device: whole pool blocks become unmapped and read zeros)."""
    rng = ffi.new("uint64_t[2]", [offset, length])
    _ioctl(fd, lib.BLKDISCARD, rng, f"discard {length} bytes at {offset} of {what}")


def zero_range(path: str, offset: int, length: int) -> None:
    """Make ``[offset, offset+length)`` of block device ``path`` read zeros
    (BLKZEROOUT: the device's WRITE ZEROES where it has one, a loop device's
    fallocate, else written zeros) and durable. A classic volume's extent is
    zeroed this way before the volume exists: it may be a deleted volume's."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        # In pieces, reporting each: written zeros on a large extent take
        # minutes (docs/cli.md, "Progress").
        task = progress.task("zeroing", total=length)
        done = 0
        while done < length:
            n = min(ZERO_PIECE, length - done)
            rng = ffi.new("uint64_t[2]", [offset + done, n])
            _ioctl(fd, lib.BLKZEROOUT, rng, f"zero {n} bytes at {offset + done} of {path}")
            done += n
            task.update(done)
        os.fsync(fd)
    finally:
        os.close(fd)
