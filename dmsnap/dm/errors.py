"""Errors raised by the device-mapper layer."""

from __future__ import annotations

import errno as _errno
import os


class DmError(Exception):
    """A device-mapper operation failed in the kernel.

    The message names the operation and the device, e.g.
    ``suspend dmsnap-p-v: No such device or address``, because an
    administrator reading a log needs both to act on it.
    """

    def __init__(self, op: str, device: str | None, err: int, detail: str = "") -> None:
        self.op = op
        self.device = device
        self.errno = err
        self.detail = detail
        where = f"{op} {device}" if device else op
        msg = f"{where}: {os.strerror(err)}" if err else where
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)

    @property
    def not_found(self) -> bool:
        return self.errno == _errno.ENXIO or self.errno == _errno.ENODEV

    @property
    def busy(self) -> bool:
        return self.errno == _errno.EBUSY


class DmUnavailable(DmError):
    """/dev/mapper/control is missing or not accessible (no dm-mod, not root)."""
