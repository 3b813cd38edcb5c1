"""One dmsnapd per state directory.

An exclusive ``flock`` on ``STATE_DIR/dmsnapd.lock``, taken before anything
else: the kernel drops it when the process dies (even on kill -9), so there is
no stale-lock cleanup, and the file is never removed (removing a lock file
races with the next holder). The holder writes its pid into it only to name
itself in the refusal message.
"""

from __future__ import annotations

import errno
import fcntl
import os

from dmsnap.errors import Busy, UserError

LOCK_NAME = "dmsnapd.lock"


class AlreadyRunning(Busy):
    def __init__(self, state_dir: str, pid: int | None) -> None:
        who = f"pid {pid}" if pid else "pid unknown"
        super().__init__(f"another dmsnapd is running on {state_dir} ({who})")
        self.pid = pid


class StateLock:
    """Holds the lock for as long as the object (its fd) lives."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last fd drops the flock
            self.fd = -1

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def acquire_state_lock(state_dir: str) -> StateLock:
    """Take the daemon lock on ``state_dir`` or raise :class:`AlreadyRunning`.

    Creates the state directory (0700) and the lock file if missing; when
    another daemon holds the lock, nothing is written.
    """
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create state directory {state_dir}: {e.strerror}") from None
    path = os.path.join(state_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise UserError(f"cannot open {path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        pid = _read_pid(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise AlreadyRunning(state_dir, pid) from None
        raise UserError(f"cannot lock {path}: {e.strerror}") from None
    # Ours now: record who we are (truncate first: a shorter pid must not
    # leave digits of the previous holder's behind).
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return StateLock(path, fd)
