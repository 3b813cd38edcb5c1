"""The dmsnap label on a file standing in for a device (docs/storage.md)."""

from __future__ import annotations

import os
import uuid

import pytest

from dmsnap.storage import label

MiB = 1 << 20


@pytest.fixture
def dev(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    fd = os.open(path, os.O_RDWR)
    yield fd
    os.close(fd)


POOL = uuid.uuid4().hex


@pytest.mark.parametrize("role", ["data", "cache", "journal"])
def test_written_label_matches_only_its_pool_role_and_generation(dev, role):
    assert label.matches(dev, POOL, role, 1) == "carries no dmsnap label"
    lab = label.write_fd(dev, POOL, role, 1)
    assert lab.offset == (0 if role == "cache" else 64 * MiB - 4096)
    assert label.matches(dev, POOL, role, 1) is None
    other = uuid.uuid4().hex
    assert label.matches(dev, other, role, 1) == f"carries the {role} label of pool {POOL}"
    assert "generation 1, not 2" in (label.matches(dev, POOL, role, 2) or "")
    wrong_role = "journal" if role != "journal" else "data"
    assert label.matches(dev, POOL, wrong_role, 1) == f"carries the {role} label of pool {POOL}"
    label.wipe_fd(dev, role)
    assert label.matches(dev, POOL, role, 1) == "carries no dmsnap label"


def test_label_is_outside_what_the_pool_uses():
    size = 128 * MiB + 12345 * 512
    for role in ("data", "journal"):
        assert label.usable_size(role, size) <= label.offset_for(role, size)
        assert label.offset_for(role, size) + label.SIZE <= size
        assert label.offset_for(role, size) % 4096 == 0
    assert label.offset_for("cache", size) + label.SIZE == label.CACHE_START_SECTORS * 512


def test_damaged_or_foreign_version_label_is_reported_not_trusted(dev):
    lab = label.write_fd(dev, POOL, "data", 1)
    block = bytearray(os.pread(dev, label.SIZE, lab.offset))
    block[20] ^= 0xFF  # a bit of the pool UUID
    os.pwrite(dev, bytes(block), lab.offset)
    assert label.matches(dev, POOL, "data", 1) == "carries a damaged dmsnap label (bad checksum)"
    enc = bytearray(label.encode(label.Label(POOL, "data", 1, 64 * MiB, lab.offset)))
    enc[8] = 9  # version 9, CRC made right
    import struct
    import zlib

    enc[60:64] = struct.pack("<I", zlib.crc32(bytes(enc[:60])))
    os.pwrite(dev, bytes(enc), lab.offset)
    assert "version 9" in (label.matches(dev, POOL, "data", 1) or "")


def test_a_label_copy_away_from_its_place_does_not_count(dev):
    # A label's bytes inside a volume's data (a tenant could write them)
    # sit at another offset than the one they record.
    enc = label.encode(label.Label(POOL, "data", 1, 64 * MiB, 64 * MiB - 4096))
    os.pwrite(dev, enc, 0)
    assert label.read_fd(dev) == {}
    assert label.matches(dev, POOL, "data", 1) == "carries no dmsnap label"
