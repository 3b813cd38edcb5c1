"""Shared fixtures: the journal unit tests' (test_journal.py,
test_journal_discard.py) and a device-less Manager (test_chap.py,
test_export_access.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_journal_support import VOL, make_volume

from dmsnap.journal import Journal
from dmsnap.storage.manager import Manager


@pytest.fixture
def jpath(tmp_path: Path) -> Path:
    """A formatted 4 MiB journal file."""
    p = tmp_path / "journal"
    Journal.format(str(p), 4 << 20)
    return p


@pytest.fixture
def vol1(tmp_path: Path) -> Path:
    return make_volume(tmp_path / "vol1", VOL)


@pytest.fixture
def nv(jpath: Path, vol1: Path) -> Iterator[Journal]:
    """An NV journal on jpath, started, with vol1 attached as volume 1."""
    j = Journal.open(str(jpath))
    j.attach(1, str(vol1), VOL)
    j.start()
    yield j
    j.close(drain=False)


class _NoDm:
    """The Manager's dm control device, never asked: the checks come first."""

    def close(self) -> None:
        pass


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    """A Manager on a catalog with pool p (thin, NV journal) and its 1 MiB
    volume v, without device-mapper: for the checks that come before the
    kernel is asked anything (exports, access, CHAP)."""
    m = Manager(str(tmp_path / "state"), dm=_NoDm())  # type: ignore[arg-type]
    p = m.catalog.add_pool(
        "p",
        "thin",
        data_dev=None,
        cache_dev=None,
        size=1 << 30,
        cache_size=None,
        config={"journal": {"mode": "nv"}},
    )
    m.catalog.add_volume(p, "v", 1 << 20, dev_id=1)
    yield m
    m.catalog.close()
