"""``pool create --metadata-size``: a thin pool's metadata device sized by
the administrator (as lvcreate's --poolmetadatasize), checked before
anything is made."""

from __future__ import annotations

import pytest

from dmsnap import errors as E
from dmsnap.storage.thin import BLOCK_SECTORS, ThinBackend

MiB = 1 << 20
SECTOR = 512


def test_default_layout_is_sized_from_the_pool() -> None:
    lay = ThinBackend.plan_layout(1024 * MiB // SECTOR)
    assert lay["meta_sectors"] == 8 * MiB // SECTOR  # at least 8 MiB


def test_given_metadata_size_is_used_and_data_follows_it() -> None:
    lay = ThinBackend.plan_layout(256 * MiB // SECTOR, 2 * MiB)
    assert lay["meta_sectors"] == 2 * MiB // SECTOR
    assert lay["data_sectors"] == (254 * MiB // SECTOR) // BLOCK_SECTORS * BLOCK_SECTORS


@pytest.mark.parametrize(
    ("size", "fragment"),
    [
        (1 * MiB, "must be 2M to 15G"),
        (16 * 1024 * MiB, "must be 2M to 15G"),
        (3 * MiB + 512, "not a whole number of MiB"),
        (256 * MiB, "leaves too little of the pool's 256 MiB for data"),
    ],
)
def test_bad_metadata_sizes_are_refused_in_one_line(size: int, fragment: str) -> None:
    with pytest.raises(E.InvalidArgument) as exc:
        ThinBackend.plan_layout(256 * MiB // SECTOR, size)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)
