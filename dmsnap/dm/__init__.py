"""dmsnap's device-mapper layer: ioctls, typed tables, parsed status, udev.

Re-exports what other packages need, so ``from dmsnap.dm import X``
is the one import site. Imports nothing of dmsnap's but ``errors``: every
layer above builds on it.
"""

from dmsnap.dm.device import DeviceInfo, DeviceMapper, StatusLine
from dmsnap.dm.errors import DmError, DmUnavailable
from dmsnap.dm.ioctl import Cmd, Control, NameEntry
from dmsnap.dm.udev import UUID_PREFIX, Role, UdevFlag, UdevSync, flags_for, make_uuid, role_of

__all__ = [
    "UUID_PREFIX",
    "Cmd",
    "Control",
    "DeviceInfo",
    "DeviceMapper",
    "DmError",
    "DmUnavailable",
    "NameEntry",
    "Role",
    "StatusLine",
    "UdevFlag",
    "UdevSync",
    "flags_for",
    "make_uuid",
    "role_of",
]
