"""Typed device-mapper operations: typed values in, typed values out.

:class:`DeviceMapper` is what the rest of dmsnap uses. It speaks
:class:`~dmsnap.dm.targets.Table` and parsed status types, cooperates with
udev on every operation that creates, renames or removes a node, and never
shells out.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import suppress
from dataclasses import dataclass

from dmsnap.dm import ioctl
from dmsnap.dm._dmffi import lib
from dmsnap.dm.errors import DmError
from dmsnap.dm.ioctl import Cmd, Control, NameEntry
from dmsnap.dm.status import TargetStatus, parse_status
from dmsnap.dm.targets import Table, TableLine, target_class
from dmsnap.dm.udev import UdevSync, cookie, flags_for, mapper_path

log = logging.getLogger("dmsnap.dm")


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    uuid: str
    dev: int
    open_count: int
    event_nr: int
    target_count: int
    suspended: bool
    read_only: bool
    live_table: bool
    inactive_table: bool

    @property
    def devno(self) -> str:
        """``MAJ:MIN`` as tables refer to devices."""
        return f"{os.major(self.dev)}:{os.minor(self.dev)}"

    @property
    def path(self) -> str:
        return mapper_path(self.name)

    @property
    def kernel_name(self) -> str:
        return f"dm-{os.minor(self.dev)}"


@dataclass(frozen=True)
class StatusLine:
    start: int
    length: int
    target_type: str
    status: TargetStatus
    params: str  # the kernel's raw text, kept for logs and witnesses


def _info(reply: ioctl.Reply) -> DeviceInfo:
    f = reply.flags
    return DeviceInfo(
        name=reply.name,
        uuid=reply.uuid,
        dev=reply.dev,
        open_count=reply.open_count,
        event_nr=reply.event_nr,
        target_count=reply.target_count,
        suspended=bool(f & lib.DM_SUSPEND_FLAG),
        read_only=bool(f & lib.DM_READONLY_FLAG),
        live_table=bool(f & lib.DM_ACTIVE_PRESENT_FLAG),
        inactive_table=bool(f & lib.DM_INACTIVE_PRESENT_FLAG),
    )


class DeviceMapper:
    """Device-mapper operations on one control fd."""

    def __init__(self, control: Control | None = None, udev: UdevSync | None = None) -> None:
        self.ctl = control or Control()
        self.udev = udev or UdevSync()

    def close(self) -> None:
        self.ctl.close()

    def __enter__(self) -> DeviceMapper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries ---------------------------------------------------------------

    def version(self) -> tuple[int, int, int]:
        return self.ctl.call(Cmd.VERSION).version

    def list_devices(self) -> list[NameEntry]:
        # DM_UUID_FLAG asks the kernel to append each device's UUID.
        r = self.ctl.call(Cmd.LIST_DEVICES, flags=lib.DM_UUID_FLAG)
        return ioctl.decode_name_list(r.data)

    def target_versions(self) -> dict[str, tuple[int, int, int]]:
        r = self.ctl.call(Cmd.LIST_VERSIONS)
        return dict(ioctl.decode_versions(r.data))

    def target_version(self, target_type: str) -> tuple[int, int, int]:
        """Loads the target's module if needed (the kernel does request_module)."""
        # The kernel reads the target's name from the header's name field.
        r = self.ctl.call(Cmd.GET_TARGET_VERSION, name=target_type)
        return ioctl.decode_versions(r.data)[0][1]

    def info(self, name: str) -> DeviceInfo:
        return _info(self.ctl.call(Cmd.DEV_STATUS, name=name))

    def info_by_uuid(self, uuid: str) -> DeviceInfo:
        return _info(self.ctl.call(Cmd.DEV_STATUS, uuid=uuid))

    def exists(self, name: str) -> bool:
        try:
            self.info(name)
        except DmError as e:
            if e.not_found:
                return False
            raise
        return True

    def table(self, name: str, *, inactive: bool = False) -> Table:
        flags = lib.DM_STATUS_TABLE_FLAG
        if inactive:
            flags |= lib.DM_QUERY_INACTIVE_TABLE_FLAG
        r = self.ctl.call(Cmd.TABLE_STATUS, name=name, flags=flags)
        lines = [
            TableLine(start, length, target_class(ttype).from_params(params))
            for start, length, ttype, params in ioctl.decode_targets(r.data, r.target_count)
        ]
        return Table(tuple(lines))

    def status(self, name: str, *, noflush: bool = False) -> list[StatusLine]:
        """Parsed status; ``noflush`` avoids committing thin-pool metadata
        just to report it."""
        flags = lib.DM_NOFLUSH_FLAG if noflush else 0
        r = self.ctl.call(Cmd.TABLE_STATUS, name=name, flags=flags)
        return [
            StatusLine(start, length, ttype, parse_status(ttype, params), params)
            for start, length, ttype, params in ioctl.decode_targets(r.data, r.target_count)
        ]

    def deps(self, name: str) -> list[int]:
        return ioctl.decode_deps(self.ctl.call(Cmd.TABLE_DEPS, name=name).data)

    # -- changes ---------------------------------------------------------------

    def create(
        self,
        name: str,
        uuid: str,
        table: Table | None = None,
        *,
        read_only: bool = False,
    ) -> DeviceInfo:
        """Create a device; with a table, also load and resume it so it is
        usable (and its /dev/mapper node present) on return. A failure after
        the create removes the half-made device again."""
        info = _info(self.ctl.call(Cmd.DEV_CREATE, name=name, uuid=uuid))
        if table is None:
            return info
        try:
            self.load(name, table, read_only=read_only)
            return self.resume(name)
        except BaseException:
            with suppress(DmError):  # the original error is the one to report
                self.remove(name)
            raise

    def load(self, name: str, table: Table, *, read_only: bool = False) -> None:
        """Load an inactive table; it goes live on the next resume."""
        payload = ioctl.encode_targets(
            [(ln.start, ln.length, ln.target.target_type, ln.target.params()) for ln in table.lines]
        )
        flags = lib.DM_READONLY_FLAG if read_only else 0
        self.ctl.call(
            Cmd.TABLE_LOAD, name=name, flags=flags, payload=payload, target_count=len(table.lines)
        )

    def clear(self, name: str) -> None:
        """Drop an inactive table that was loaded but not resumed."""
        self.ctl.call(Cmd.TABLE_CLEAR, name=name)

    def suspend(self, name: str, *, flush: bool = True, lockfs: bool = True) -> DeviceInfo:
        """Suspend. ``flush=False`` keeps in-flight I/O queued instead of
        completing it (DM_NOFLUSH); ``lockfs=False`` skips freezing a
        filesystem mounted on the device."""
        flags = lib.DM_SUSPEND_FLAG
        if not flush:
            flags |= lib.DM_NOFLUSH_FLAG
        if not lockfs:
            flags |= lib.DM_SKIP_LOCKFS_FLAG
        return _info(self.ctl.call(Cmd.DEV_SUSPEND, name=name, flags=flags))

    def resume(self, name: str) -> DeviceInfo:
        """Resume (activating a loaded table) and wait until udev is done
        with the device, so its node is usable on return."""
        before = self.info(name)
        # Lifting a suspend (same table, node present) creates nothing new for
        # udev to make; waiting for its refresh of the links would only add
        # latency to every snapshot. A new table or a missing node waits.
        lift_only = before.live_table and not before.inactive_table and os.path.exists(before.path)
        with self.udev.expect() as exp:
            r = self.ctl.call(Cmd.DEV_SUSPEND, name=name, event_nr=cookie(flags_for(before.uuid)))
            info = _info(r)
            if not lift_only:
                exp.settled(
                    action="change",
                    name=name,
                    dev=r.dev,
                    generated=bool(r.flags & lib.DM_UEVENT_GENERATED_FLAG),
                    uuid=before.uuid,
                )
        return info

    def remove(self, name: str, *, deferred: bool = False, busy_retry: float = 2.0) -> bool:
        """Remove a device. Returns False when ``deferred`` and the device is
        still open: the kernel removes it on last close.

        udev's watch rule re-probes a device after a writer closes it, which
        holds it open for a moment; like libdevmapper we retry EBUSY for up
        to ``busy_retry`` seconds. A device that stays busy raises DmError
        (EBUSY) and is left exactly as it was.
        """
        info = self.info(name)
        flags = lib.DM_DEFERRED_REMOVE if deferred else 0
        deadline = time.monotonic() + busy_retry
        with self.udev.expect() as exp:
            while True:
                try:
                    r = self.ctl.call(
                        Cmd.DEV_REMOVE,
                        name=name,
                        flags=flags,
                        event_nr=cookie(flags_for(info.uuid)),
                    )
                    break
                except DmError as e:
                    if not e.busy or deferred or time.monotonic() >= deadline:
                        raise
                    time.sleep(0.05)
            if deferred and self.exists(name):
                return False
            try:
                exp.settled(
                    action="remove",
                    name=name,
                    dev=info.dev,
                    generated=bool(r.flags & lib.DM_UEVENT_GENERATED_FLAG),
                    uuid=info.uuid,
                )
            except DmError as e:
                # The kernel device is gone; a backlogged udev only delays
                # the link's removal. Not worth failing the operation for.
                log.warning("%s", e)
        return True

    def rename(self, name: str, new_name: str) -> DeviceInfo:
        info = self.info(name)
        with self.udev.expect() as exp:
            r = self.ctl.call(
                Cmd.DEV_RENAME,
                name=name,
                payload=new_name.encode() + b"\0",
                event_nr=cookie(flags_for(info.uuid)),
            )
            generated = bool(r.flags & lib.DM_UEVENT_GENERATED_FLAG)
            if self.udev.use_udev:
                exp.settled(
                    action="change",
                    name=new_name,
                    dev=info.dev,
                    generated=generated,
                    uuid=info.uuid,
                )
            else:
                exp.settled(action="remove", name=name, dev=info.dev, generated=False)
                exp.settled(action="change", name=new_name, dev=info.dev, generated=False)
        return self.info(new_name)

    def message(self, name: str, message: str, *, sector: int = 0) -> str | None:
        """Send a target message; returns the target's reply text, if any."""
        r = self.ctl.call(
            Cmd.TARGET_MSG,
            name=name,
            payload=ioctl.encode_message(sector, message),
            device=f"{name} ({message.split()[0] if message else ''})",
        )
        if r.flags & lib.DM_DATA_OUT_FLAG and r.data:
            return r.data.split(b"\0", 1)[0].decode()
        return None

    def wait_event(self, name: str, event_nr: int) -> int:
        """Block until the device's event counter moves past ``event_nr``;
        returns the new counter. Runs without the GIL."""
        return self.ctl.call(Cmd.DEV_WAIT, name=name, event_nr=event_nr).event_nr

    def remove_tree(self, names: list[str]) -> None:
        """Remove devices top-down, ignoring ones already gone."""
        for n in names:
            try:
                self.remove(n)
            except DmError as e:
                if not e.not_found:
                    raise


__all__ = ["DeviceInfo", "DeviceMapper", "StatusLine"]
