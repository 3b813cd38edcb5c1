"""The blocks that differ between two thin devices, from dm-thin's metadata.

Replication must not read a whole volume to find what changed: dm-thin's
metadata already says which virtual blocks of a snapshot share their data
block with its base. Debian's thin-provisioning-tools read it: ``thin_delta``
compares two devices' mapping trees, ``thin_dump`` lists one device's
mappings (a full send). On a live pool both must read a metadata snapshot
(``-m``), reserved with the pool's ``reserve_metadata_snap`` message and
released after, since the kernel rewrites the live metadata under them.

Both tools answer in XML, in units of the pool's data block
(``data_block_size`` sectors). The answer here is a ``Delta``: the block size
in bytes and, in order, the extents to send as data and those to send as
discards (mapped in the base, unmapped in the target: the receiver must
unmap them, or its copy keeps data the source no longer has).
"""

from __future__ import annotations

import enum
import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from xml.etree import ElementTree

from dmsnap import errors as E
from dmsnap.units import Bytes


class DeltaError(Exception):
    """The metadata tools failed or answered something we do not understand:
    no delta, so nothing is sent."""


class Change(enum.Enum):
    DATA = "data"  # the target's blocks: read them from the target snapshot
    DISCARD = "discard"  # unmapped in the target: the receiver unmaps them


@dataclass(frozen=True, order=True)
class Extent:
    """Blocks [begin, begin + length) of the volume, in pool data blocks."""

    begin: int
    length: int
    change: Change

    @property
    def end(self) -> int:
        return self.begin + self.length


@dataclass(frozen=True)
class Delta:
    """What turns the base into the target (for a full send: into the
    target from an empty volume, which reads zeros)."""

    block_size: int  # bytes
    extents: tuple[Extent, ...]

    def blocks(self, change: Change) -> int:
        return sum(e.length for e in self.extents if e.change is change)

    @property
    def data_bytes(self) -> int:
        """Bytes the stream carries as data (before any zero elision)."""
        return self.blocks(Change.DATA) * self.block_size

    def byte_ranges(self, change: Change, volume_size: int) -> Iterator[tuple[int, int]]:
        """(offset, length) in bytes, clipped to the volume: the last pool
        block may reach past a volume whose size is not a whole number of
        blocks."""
        for e in self.extents:
            if e.change is not change:
                continue
            start = e.begin * self.block_size
            stop = min(e.end * self.block_size, volume_size)
            if start < stop:
                yield start, stop - start


def _coalesce(extents: Iterable[Extent]) -> tuple[Extent, ...]:
    out: list[Extent] = []
    for e in sorted(extents):
        if e.length <= 0:
            continue
        if out and out[-1].change is e.change and out[-1].end >= e.begin:
            last = out[-1]
            out[-1] = Extent(last.begin, max(last.end, e.end) - last.begin, e.change)
        elif out and out[-1].end > e.begin:
            raise DeltaError(f"thin metadata answer has overlapping extents at block {e.begin}")
        else:
            out.append(e)
    return tuple(out)


def _int(el: ElementTree.Element, name: str) -> int:
    v = el.get(name)
    if v is None or not v.isdigit():
        raise DeltaError(f"thin metadata answer: <{el.tag}> without a valid {name}")
    return int(v)


def _block_size(el: ElementTree.Element) -> int:
    sectors = _int(el, "data_block_size")
    if sectors == 0:
        raise DeltaError("thin metadata answer: data_block_size 0")
    return Bytes.of(sectors)


# thin_delta's diff elements: what the receiver does with each
_DIFF = {
    "same": None,
    "different": Change.DATA,
    "right_only": Change.DATA,
    "left_only": Change.DISCARD,
}


def parse_delta(source: IO[bytes] | IO[str], base: int, target: int) -> Delta:
    """thin_delta's answer (not --verbose) for --snap1 BASE --snap2 TARGET."""
    block_size = 0
    seen_diff = False
    extents: list[Extent] = []
    for _, el in ElementTree.iterparse(source, events=("start",)):
        if el.tag == "superblock":
            block_size = _block_size(el)
        elif el.tag == "diff":
            if (_int(el, "left"), _int(el, "right")) != (base, target):
                raise DeltaError(
                    f"thin_delta compared devices {el.get('left')} and {el.get('right')}, "
                    f"not {base} and {target}"
                )
            seen_diff = True
        elif el.tag in _DIFF:
            if not seen_diff:
                raise DeltaError(f"thin metadata answer: <{el.tag}> outside <diff>")
            change = _DIFF[el.tag]
            if change is not None:
                extents.append(Extent(_int(el, "begin"), _int(el, "length"), change))
        else:
            raise DeltaError(f"thin metadata answer: unknown element <{el.tag}>")
    if not block_size or not seen_diff:
        raise DeltaError("thin metadata answer is incomplete (no superblock or diff)")
    return Delta(block_size, _coalesce(extents))


def parse_dump(source: IO[bytes] | IO[str], dev_id: int) -> Delta:
    """thin_dump's answer for --dev-id DEV_ID: every mapped block is data."""
    block_size = 0
    found = False
    extents: list[Extent] = []
    for _, el in ElementTree.iterparse(source, events=("start",)):
        if el.tag == "superblock":
            block_size = _block_size(el)
        elif el.tag == "device":
            if _int(el, "dev_id") != dev_id:
                raise DeltaError(f"thin_dump listed device {el.get('dev_id')}, not {dev_id}")
            found = True
        elif el.tag == "range_mapping":
            extents.append(Extent(_int(el, "origin_begin"), _int(el, "length"), Change.DATA))
        elif el.tag == "single_mapping":
            extents.append(Extent(_int(el, "origin_block"), 1, Change.DATA))
        else:
            raise DeltaError(f"thin metadata answer: unknown element <{el.tag}>")
    if not block_size or not found:
        raise DeltaError(f"thin metadata has no device {dev_id}")
    return Delta(block_size, _coalesce(extents))


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if not path:
        raise E.Unavailable(f"{name} is missing (Debian package thin-provisioning-tools)")
    return path


def _run(cmd: list[str], parse: Callable[[IO[bytes]], Delta]) -> Delta:
    """Stream the tool's XML into the parser (a large volume's answer is
    large); its exit status and stderr decide whether the answer counts."""
    name = Path(cmd[0]).name
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        assert p.stdout is not None and p.stderr is not None
        failure: Exception | None = None
        try:
            delta = parse(p.stdout)
        except (ElementTree.ParseError, DeltaError) as exc:
            failure = exc
            p.kill()
        p.stdout.read()
        # the tools print their complaint first, then their usage
        err = [ln for ln in p.stderr.read().decode(errors="replace").splitlines() if ln.strip()]
        rc = p.wait()
        if rc != 0 and err:
            raise DeltaError(f"{name} failed: {err[0].strip()}") from failure
        if failure is not None:
            raise DeltaError(f"{name}: {failure}") from failure
        if rc != 0:
            raise DeltaError(f"{name} failed with exit status {rc}")
    return delta


def _snap_args(metadata_snap: int | bool) -> list[str]:
    if metadata_snap is True:
        return ["-m"]  # the block the superblock records
    if metadata_snap is False:
        return []
    return ["-m", str(metadata_snap)]


def thin_delta(metadata: str, base: int, target: int, *, metadata_snap: int | bool = True) -> Delta:
    """Blocks that differ from thin device BASE to TARGET. metadata_snap:
    True on a live pool (a reserved metadata snapshot), False for a metadata
    device no kernel has open (tests, an offline pool)."""
    cmd = [_tool("thin_delta"), *_snap_args(metadata_snap), "--snap1", str(base)]
    cmd += ["--snap2", str(target), metadata]
    return _run(cmd, lambda f: parse_delta(f, base, target))


def thin_map(metadata: str, dev_id: int, *, metadata_snap: int | bool = True) -> Delta:
    """Every mapped block of thin device DEV_ID (a full send)."""
    cmd = [_tool("thin_dump"), *_snap_args(metadata_snap), "--dev-id", str(dev_id), metadata]
    return _run(cmd, lambda f: parse_dump(f, dev_id))
