"""Fixtures of the journal unit tests (test_journal.py, test_journal_discard.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_journal_support import VOL, make_volume

from dmsnap.journal import Journal


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
