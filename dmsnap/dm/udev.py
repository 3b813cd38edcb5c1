"""udev cooperation for device-mapper devices.

Two separate concerns, each in one place:

* **Policy** (:func:`flags_for`): which udev rules may act on a device. The
  flags travel in the ``event_nr`` field of resume/remove/rename ioctls as a
  *flags-only cookie* (libdevmapper's ``DM_UDEV_*`` bits in the upper 16 bits,
  zero semaphore base). The distribution's dm rules decode it with
  ``dmsetup udevflags``; ``dmsetup udevcomplete`` treats a zero base as "no
  notification wanted", so no SysV semaphore is involved.
* **Synchronisation** (:class:`UdevSync`): after an ioctl that generated a
  uevent (``DM_UEVENT_GENERATED_FLAG``), wait for udev to finish processing
  that event (pyudev monitor on the "udev" source) — never a sleep or
  ``udevadm settle``. Without a running udev we create and remove the
  ``/dev/mapper`` nodes ourselves.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import pyudev

from dmsnap.dm.errors import DmError

MAPPER_DIR = "/dev/mapper"
# Where udev/61-dmsnap.rules links volumes and snapshots (see link_for).
LINK_DIR = "/dev/dmsnap"
UDEV_CONTROL = "/run/udev/control"
UUID_PREFIX = "DMSNAP-"

_FLAGS_SHIFT = 16


class UdevFlag(enum.IntFlag):
    """libdevmapper's DM_UDEV_* rule-control flags (libdevmapper.h; not kernel ABI)."""

    DISABLE_DM_RULES = 0x0001
    DISABLE_SUBSYSTEM_RULES = 0x0002
    DISABLE_DISK_RULES = 0x0004
    DISABLE_OTHER_RULES = 0x0008
    LOW_PRIORITY = 0x0010
    DISABLE_LIBRARY_FALLBACK = 0x0020
    PRIMARY_SOURCE = 0x0040
    NONE = 0


class Role(enum.Enum):
    """What a dmsnap device is to the administrator; encoded in its dm UUID
    (``DMSNAP-<role>-<id>``) so that udev rules and :func:`flags_for` agree."""

    VOLUME = "vol"  # a volume users put data on
    # A volume of a journaled pool: every write must go through the pool's
    # journal (dmsnapd), so the dm device itself is private like a layer.
    JOURNALED = "jvol"
    SNAPSHOT = "snap"  # an activated snapshot: visible, but never preferred
    INTERNAL = "int"  # a layer of the stack (writecache, thin-pool, cow...): private
    TEST = "test"  # created by tests/demos; treated like a volume


def make_uuid(role: Role, ident: str) -> str:
    return f"{UUID_PREFIX}{role.value}-{ident}"


def role_of(uuid: str | None) -> Role | None:
    """The role a dm UUID declares, or None for a device that is not ours."""
    if not uuid or not uuid.startswith(UUID_PREFIX):
        return None
    head = uuid[len(UUID_PREFIX) :].split("-", 1)[0]
    try:
        return Role(head)
    except ValueError:
        return None


def flags_for(uuid: str | None) -> UdevFlag:
    """The udev policy for a device, decided from its UUID alone.

    Internal layers keep their ``/dev/mapper`` node (we open them by it) but
    are hidden from blkid, systemd and other rules, as lvm2 does for its
    private layers. Snapshots get low link priority so that a filesystem UUID
    shared with the origin resolves to the origin.
    """
    flags = UdevFlag.PRIMARY_SOURCE
    role = role_of(uuid)
    if role in (Role.INTERNAL, Role.JOURNALED):
        flags |= (
            UdevFlag.DISABLE_SUBSYSTEM_RULES
            | UdevFlag.DISABLE_DISK_RULES
            | UdevFlag.DISABLE_OTHER_RULES
        )
    elif role is Role.SNAPSHOT:
        flags |= UdevFlag.LOW_PRIORITY
    return flags


def cookie(flags: UdevFlag) -> int:
    """A flags-only cookie for the ioctl's event_nr field."""
    return int(flags) << _FLAGS_SHIFT


def udev_running() -> bool:
    # The same test libudev uses (udev_queue_get_udev_is_active).
    return os.path.exists(UDEV_CONTROL)


def mapper_path(name: str) -> str:
    return os.path.join(MAPPER_DIR, name)


RULES_NAME = "61-dmsnap.rules"
RULES_DIRS = (
    "/etc/udev/rules.d",
    "/run/udev/rules.d",
    "/usr/lib/udev/rules.d",
    "/lib/udev/rules.d",
)


def link_for(uuid: str | None) -> str | None:
    """The /dev link udev/61-dmsnap.rules gives a device: volumes and
    snapshots get /dev/dmsnap/POOL/VOL[@SNAP], computed from the UUID
    ``DMSNAP-ROLE-ID-POOL:OBJ`` exactly as the rule's helper
    (udev/dmsnap-udev-name) does; None for every other device."""
    if role_of(uuid) not in (Role.VOLUME, Role.SNAPSHOT):
        return None
    assert uuid is not None
    parts = uuid[len(UUID_PREFIX) :].split("-", 2)  # ROLE, ID, POOL:OBJ
    if len(parts) < 3 or not parts[1] or ":" not in parts[2]:
        return None
    pool, obj = parts[2].split(":", 1)
    if not pool or not obj or "/" in pool + obj or ".." in pool + obj:
        return None
    return os.path.join(LINK_DIR, pool, obj)


def rules_installed() -> bool:
    """Whether dmsnap's udev rules are installed (tools/setup): only then
    does a volume or snapshot get its /dev/dmsnap link."""
    return any(os.path.exists(os.path.join(d, RULES_NAME)) for d in RULES_DIRS)


class UdevSync:
    """Waits for udev to finish the uevent an ioctl generated.

    Use :meth:`expect` around the ioctl: the monitor must be listening
    before the kernel emits the event.
    """

    def __init__(self, timeout: float = 60.0, use_udev: bool | None = None) -> None:
        self.timeout = timeout
        self.use_udev = udev_running() if use_udev is None else use_udev
        self._context = pyudev.Context() if self.use_udev else None

    @contextmanager
    def expect(self) -> Iterator[_Expectation]:
        exp = _Expectation(self)
        try:
            yield exp
        finally:
            exp.close()


class _Expectation:
    def __init__(self, sync: UdevSync) -> None:
        self._sync = sync
        self._monitor: pyudev.Monitor | None = None
        if sync.use_udev:
            mon = pyudev.Monitor.from_netlink(sync._context, source="udev")
            mon.filter_by("block")
            mon.start()
            self._monitor = mon

    def close(self) -> None:
        self._monitor = None  # the socket closes with the object

    def settled(
        self, *, action: str, name: str, dev: int, generated: bool, uuid: str | None = None
    ) -> None:
        """Block until the uevent for ``dev`` (``action``: change/remove) was
        processed, then check that /dev/mapper and, where our rules give the
        device one (``uuid``), its /dev/dmsnap link agree; without udev, do
        udev's job for /dev/mapper."""
        path = mapper_path(name)
        if self._monitor is None:
            _fallback_node(action, path, dev)
            return
        if generated:
            self._wait(action, f"dm-{os.minor(dev)}", name)
        link = link_for(uuid)
        paths = [path] + ([link] if link and rules_installed() else [])
        deadline = time.monotonic() + self._sync.timeout
        # The event has been processed, so the links are normally already
        # there. The loop covers rules that run asynchronously, and a return
        # from _wait that came too early: once seen under load, the
        # /dev/mapper node was there and the /dev/dmsnap link not yet.
        want = action != "remove"
        while True:
            wrong = [p for p in paths if os.path.lexists(p) != want]
            if not wrong:
                return
            if time.monotonic() > deadline:
                state = "did not appear" if want else "still exists"
                raise DmError("udev", name, errno.ETIMEDOUT, f"{wrong[0]} {state}")
            time.sleep(0.01)

    def _wait(self, action: str, kernel_name: str, name: str) -> None:
        assert self._monitor is not None
        deadline = time.monotonic() + self._sync.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                detail = f"no processed '{action}' event for {kernel_name}"
                raise DmError("udev", name, errno.ETIMEDOUT, detail)
            device = self._monitor.poll(timeout=left)
            if device is None:
                continue
            if device.sys_name == kernel_name and device.action == action:
                return


def _fallback_node(action: str, path: str, dev: int) -> None:
    """Create/remove /dev/mapper nodes when no udev runs (containers, early boot)."""
    if action == "remove":
        with suppress(FileNotFoundError):
            os.unlink(path)
        return
    try:
        st = os.lstat(path)
        if stat.S_ISBLK(st.st_mode) and st.st_rdev == dev:
            return
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.makedirs(MAPPER_DIR, exist_ok=True)
    os.mknod(path, 0o600 | stat.S_IFBLK, dev)
