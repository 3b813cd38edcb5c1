"""Block devices by identity, and holding them exclusively.

A device is the same device when its ``st_rdev`` is the same, whatever path
names it (``/dev/sdb``, ``/dev/disk/by-id/...``, a symlink). A device the
daemon writes itself (a journal device, a journaled volume's private dm
device) is held with an ``O_EXCL`` descriptor for as long as it is in use,
so ``mkfs``, ``mount``, another pool or device-mapper table cannot claim it
meanwhile (the kernel answers ``EBUSY``). Data and cache devices need no
descriptor of ours: the dm tables built on them claim them the same way.
See docs/storage.md.
"""

from __future__ import annotations

import errno
import os
import stat

from dmsnap import errors as E


def rdev_of(path: str) -> int | None:
    """The device number of the block device ``path`` names (symlinks
    followed: this is the name an administrator gave), or None when it is
    missing or not a block device."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def resolve(path: str) -> str:
    """The device node a given name leads to (``/dev/disk/by-id/...``, a
    symlink anywhere -> ``/dev/sdb``), resolved once: what is checked,
    labelled and recorded is then that node, which only root and the kernel
    can change, not a link someone may re-point meanwhile. Anything that is
    not a block device comes back as given, for the caller's message."""
    real = os.path.realpath(path)
    return real if rdev_of(real) is not None else path


def devno(rdev: int) -> str:
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def present(devno_: str) -> bool:
    """Whether the block device MAJ:MIN is still there: the kernel removes
    its /sys/dev/block entry when the disk goes (unplugged, deleted, its
    path lost), even while a dm table or a descriptor still refers to it."""
    return os.path.exists(f"/sys/dev/block/{devno_}")


def open_exclusive(path: str, what: str, flags: int = os.O_RDWR) -> int:
    """An ``O_EXCL`` descriptor on the block device ``path``; a clear
    :class:`dmsnap.errors.Busy` when something else holds it."""
    try:
        fd = os.open(path, flags | os.O_EXCL | os.O_CLOEXEC)
    except FileNotFoundError:
        raise E.NotFound(f"{what} device {path} does not exist") from None
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise E.Busy(
                f"{what} device {path} is in use (mounted, or held by another device or pool)"
            ) from None
        raise E.InvalidArgument(f"{what} device {path}: {e.strerror}") from None
    if not stat.S_ISBLK(os.fstat(fd).st_mode):
        os.close(fd)
        raise E.InvalidArgument(f"{what} device {path} is not a block device")
    return fd


class Holds:
    """``O_EXCL`` descriptors kept open, by key (a pool's journal device, a
    volume's dm device). Closing one lets the device go."""

    def __init__(self) -> None:
        self._fds: dict[object, int] = {}

    def hold(self, key: object, path: str, what: str) -> int | None:
        """Hold the block device ``path`` under ``key`` (already held: kept
        as it is). A regular file (an embedded journal, a test's volume
        file) has no exclusive open: None, nothing held."""
        if key in self._fds:
            return self._fds[key]
        if rdev_of(path) is None and os.path.isfile(path):
            return None
        fd = open_exclusive(path, what)
        self._fds[key] = fd
        return fd

    def release(self, key: object) -> None:
        fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)

    def release_all(self) -> None:
        for key in list(self._fds):
            self.release(key)

    def __contains__(self, key: object) -> bool:
        return key in self._fds

    def rdev(self, key: object) -> int | None:
        """The device number of what ``key`` holds (None: nothing held)."""
        fd = self._fds.get(key)
        return None if fd is None else os.fstat(fd).st_rdev


def check_private_dir(path: str) -> None:
    """The state directory names the disks the daemon writes: refuse one
    that someone other than us could change (not ours, or writable by group
    or others) with a one-line :class:`dmsnap.errors.Unavailable`."""
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise E.Unavailable(f"state directory {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise E.Unavailable(
            f"state directory {path} belongs to uid {st.st_uid}, not to dmsnapd's "
            f"({os.geteuid()}); chown it"
        )
    if st.st_mode & 0o022:
        raise E.Unavailable(
            f"state directory {path} is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod go-w {path}"
        )
