"""A device in the stack as data: name, UUID, table, read-only.

The pool, the backends and reassembly all describe what *should* exist as a
list of :class:`Layer`, bottom-up; :func:`ensure` makes the kernel match it
(create, or reload when the table differs, or just resume), so assembling
is the same code whether the devices survived (daemon restart) or not
(reboot).
"""

from __future__ import annotations

from dataclasses import dataclass

from dmsnap.dm import DeviceMapper, DmError
from dmsnap.dm.targets import Table


@dataclass(frozen=True)
class Layer:
    name: str
    uuid: str
    table: Table
    read_only: bool = False

    @property
    def path(self) -> str:
        return f"/dev/mapper/{self.name}"


def ensure(dm: DeviceMapper, layer: Layer) -> str:
    """Make ``layer`` exist with its table, live. Returns its MAJ:MIN."""
    try:
        info = dm.info(layer.name)
    except DmError as e:
        if not e.not_found:
            raise
        return dm.create(layer.name, layer.uuid, layer.table, read_only=layer.read_only).devno
    if info.uuid != layer.uuid:
        raise DmError(
            "assemble", layer.name, 0, f"a device with this name but UUID {info.uuid!r} exists"
        )
    if not info.live_table:
        dm.load(layer.name, layer.table, read_only=layer.read_only)
        return dm.resume(layer.name).devno
    if dm.table(layer.name) != layer.table or info.read_only != layer.read_only:
        dm.load(layer.name, layer.table, read_only=layer.read_only)
        dm.suspend(layer.name)
        return dm.resume(layer.name).devno
    if info.suspended:
        return dm.resume(layer.name).devno
    return info.devno


def remove(dm: DeviceMapper, name: str) -> None:
    """Remove if present; a busy device raises (callers check open counts first)."""
    try:
        dm.remove(name)
    except DmError as e:
        if not e.not_found:
            raise
