"""The dmsnap label: which pool a backing device belongs to, in which role.

One 4 KiB block on every external device of a pool (``--data``, ``--cache``,
``--journal``), written at ``pool create``:

* data and journal devices: the last 4 KiB block of the device. The pool (or
  the journal's ring) ends before it: nothing dm-thin, the classic extents
  or the journal writes can reach it.
* cache device: the first 4 KiB block; dm-writecache starts after it
  (its ``start_sector`` option), since it uses the device to its end.

Layout (little-endian; the rest of the block is zero)::

     0  8s  magic        b"DMSNAPLB"
     8  u32 version      1
    12  u32 role         1 data, 2 cache, 3 journal
    16  16s pool uuid    the catalog's pools.uuid (128 bits)
    32  u64 generation   the catalog's config["labels"]["generation"]
    40  u64 device size  in bytes, when labelled
    48  u64 offset       of this block on the device
    56  u32 zero
    60  u32 crc          zlib.crc32 of bytes 0..59

Assembly (:func:`locate`) opens the recorded path once, reads the label
through that descriptor and uses the device number of that descriptor; if
the label is not this pool's, it looks for the device that carries it among
the system's block devices. See docs/storage.md.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
import uuid as uuidlib
import zlib
from dataclasses import dataclass

from dmsnap.units import Sectors

MAGIC = b"DMSNAPLB"
VERSION = 1
SIZE = 4096
ROLES = {"data": 1, "cache": 2, "journal": 3}
_ROLE_NAMES = {v: k for k, v in ROLES.items()}
_FMT = struct.Struct("<8sII16sQQQI")  # up to the crc
assert _FMT.size == 60
CACHE_START_SECTORS = Sectors.of(SIZE)  # dm-writecache's start_sector on a labelled cache


@dataclass(frozen=True)
class Label:
    pool_uuid: str  # hex, as in the catalog
    role: str
    generation: int
    device_size: int
    offset: int

    def describe(self) -> str:
        return f"the {self.role} label of pool {self.pool_uuid}"


def offset_for(role: str, device_size: int) -> int:
    """Where ``role``'s label lives on a device of ``device_size`` bytes."""
    if role == "cache":
        return 0
    return (device_size // SIZE - 1) * SIZE


def usable_size(role: str, device_size: int) -> int:
    """Bytes at the start of a data or journal device the pool may use."""
    return offset_for(role, device_size) if role != "cache" else device_size


def encode(label: Label) -> bytes:
    head = _FMT.pack(
        MAGIC,
        VERSION,
        ROLES[label.role],
        uuidlib.UUID(hex=label.pool_uuid).bytes,
        label.generation,
        label.device_size,
        label.offset,
        0,
    )
    return (head + struct.pack("<I", zlib.crc32(head))).ljust(SIZE, b"\0")


def decode(block: bytes) -> Label | str | None:
    """The label in ``block``; None when there is none (no magic); a reason
    (str) when the magic is there but the rest is not right."""
    if block[:8] != MAGIC:
        return None
    head = block[: _FMT.size]
    (crc,) = struct.unpack_from("<I", block, _FMT.size)
    if zlib.crc32(head) != crc:
        return "a damaged dmsnap label (bad checksum)"
    _, version, role, pool, gen, size, offset, _ = _FMT.unpack(head)
    if version != VERSION:
        return f"a dmsnap label of version {version} (this dmsnap reads {VERSION})"
    if role not in _ROLE_NAMES:
        return f"a dmsnap label with an unknown role {role}"
    return Label(uuidlib.UUID(bytes=pool).hex, _ROLE_NAMES[role], gen, size, offset)


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def _pread_block(fd: int, offset: int) -> bytes:
    """One block, bypassing the page cache when the device allows: after a
    disk changed under a name, a cached block of the old one must not count."""
    buf = mmap.mmap(-1, SIZE)
    try:
        dfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return os.pread(fd, SIZE, offset)
    try:
        if os.fstat(dfd).st_rdev != os.fstat(fd).st_rdev:  # cannot happen; be sure
            raise OSError("descriptor changed")
        n = os.preadv(dfd, [buf], offset)
        return bytes(buf[:n])
    except OSError:
        return os.pread(fd, SIZE, offset)
    finally:
        os.close(dfd)


def read_fd(fd: int) -> dict[str, Label | str]:
    """Labels found on the device open at ``fd``: by place ("start", "end"),
    a :class:`Label` or a reason it is unreadable. Empty: no label."""
    size = _device_size(fd)
    out: dict[str, Label | str] = {}
    if size < 2 * SIZE:
        return out
    for where, off in (("start", 0), ("end", offset_for("data", size))):
        got = decode(_pread_block(fd, off))
        if got is None:
            continue
        if isinstance(got, Label) and got.offset != off:
            continue  # a label's copy inside someone's data, not at its place
        out[where] = got
    return out


def matches(fd: int, pool_uuid: str, role: str, generation: int) -> str | None:
    """None when the device at ``fd`` carries ``pool_uuid``'s label for
    ``role`` (of ``generation``), else what it carries instead, as the end of
    a sentence ("carries no dmsnap label", ...)."""
    found = read_fd(fd)
    want = "start" if role == "cache" else "end"
    got = found.get(want)
    if isinstance(got, Label) and got.pool_uuid == pool_uuid and got.role == role:
        if got.generation != generation:
            return (
                f"carries this pool's {role} label of generation {got.generation}, "
                f"not {generation} (an old copy of the disk?)"
            )
        return None
    others = [g for g in found.values() if isinstance(g, Label)]
    if others:
        return f"carries {others[0].describe()}"
    damaged = [g for g in found.values() if isinstance(g, str)]
    if damaged:
        return f"carries {damaged[0]}"
    return "carries no dmsnap label"


def write_fd(fd: int, pool_uuid: str, role: str, generation: int) -> Label:
    """Write ``role``'s label for ``pool_uuid`` on the device open (read-write)
    at ``fd`` and make it durable."""
    size = _device_size(fd)
    lab = Label(pool_uuid, role, generation, size, offset_for(role, size))
    os.pwrite(fd, encode(lab), lab.offset)
    os.fsync(fd)
    return lab


def wipe_fd(fd: int, role: str) -> None:
    """Zero ``role``'s label block (a destroyed pool's disk carries none)."""
    os.pwrite(fd, bytes(SIZE), offset_for(role, _device_size(fd)))
    os.fsync(fd)


# -- finding a pool's device among the system's block devices -------------------


@dataclass(frozen=True)
class Found:
    path: str
    rdev: int


def _candidates(exclude_dirs: tuple[str, ...]) -> list[str]:
    """Block device nodes a pool's disk may be: every one udev knows, except
    dmsnap's own dm devices (their contents are tenants' data, which could
    hold a copy of a label) and loop devices over files in ``exclude_dirs``
    (embedded pools: the same)."""
    import pyudev

    out = []
    for dev in pyudev.Context().list_devices(subsystem="block"):
        node = dev.device_node
        if not node:
            continue
        if (dev.properties.get("DM_UUID") or "").startswith("DMSNAP-"):
            continue
        name = dev.sys_name
        if name.startswith("dm-"):
            try:
                with open(f"/sys/block/{name}/dm/uuid") as f:
                    if f.read().startswith("DMSNAP-"):
                        continue
            except OSError:
                pass
        if name.startswith("loop"):
            try:
                with open(f"/sys/block/{name}/loop/backing_file") as f:
                    back = f.read().strip()
            except OSError:
                continue  # unbound
            if any(back.startswith(d.rstrip("/") + "/") for d in exclude_dirs):
                continue
        out.append(node)
    return out


def scan(pool_uuid: str, role: str, exclude_dirs: tuple[str, ...] = ()) -> list[Found]:
    """Every block device that carries ``pool_uuid``'s ``role`` label."""
    out = []
    for node in _candidates(exclude_dirs):
        try:
            fd = os.open(node, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISBLK(st.st_mode):
                continue
            want = "start" if role == "cache" else "end"
            got = read_fd(fd).get(want)
            if isinstance(got, Label) and got.pool_uuid == pool_uuid and got.role == role:
                out.append(Found(node, st.st_rdev))
        except OSError:
            continue
        finally:
            os.close(fd)
    return out
