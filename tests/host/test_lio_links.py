"""The LUN link helpers of dmsnap/scsi/lio.py on a plain directory tree
(configfs itself is tests/kernel/test_daemon_kill.py): they run in a child
process that holds none of dmsnapd's files, a link made twice (a killed
daemon's child finished it) counts as made, and a link is never made inside
what is already there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dmsnap.scsi import lio


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path, Path]:
    so = tmp_path / "core" / "user_1" / "dmsnap-x"
    other = tmp_path / "core" / "user_1" / "dmsnap-y"
    lun = tmp_path / "loopback" / "naa.5001405000000000" / "tpgt_1" / "lun" / "lun_0"
    for d in (so, other, lun):
        d.mkdir(parents=True)
    return so, other, lun


def test_link_made_once_or_found_made(tree):
    so, _, lun = tree
    lio._link_lun(str(so), str(lun))
    link = lun / lio.LUN_LINK
    assert link.is_symlink() and link.resolve() == so
    lio._link_lun(str(so), str(lun))  # made already (by a killed daemon's child): fine
    assert sorted(os.listdir(lun)) == [lio.LUN_LINK]
    assert os.listdir(so) == []  # never a link inside the backstore's directory


def test_a_link_to_another_backstore_is_an_error(tree):
    so, other, lun = tree
    lio._link_lun(str(other), str(lun))
    with pytest.raises(lio.LioError, match="cannot link"):
        lio._link_lun(str(so), str(lun))
    assert (lun / lio.LUN_LINK).resolve() == other


def test_unlink_removes_the_link_and_a_missing_one_is_fine(tree):
    so, _, lun = tree
    lio._link_lun(str(so), str(lun))
    lio._unlink(str(lun / lio.LUN_LINK))
    assert not os.path.lexists(lun / lio.LUN_LINK) and so.is_dir()
    lio._unlink(str(lun / lio.LUN_LINK))  # gone already (a killed daemon's child): fine


def test_the_child_holds_none_of_our_files(tmp_path):
    """A child inherits no descriptor: were it to hold a ring's UIO device
    or the daemon's lock, a killed daemon's child would keep them."""
    opened = os.open(tmp_path / "lock", os.O_CREAT | os.O_RDWR)
    fd = os.dup2(opened, 200)  # above any the child opens itself
    os.close(opened)
    os.set_inheritable(fd, True)
    try:
        r = lio._in_child("ls", "/proc/self/fd")
        assert r.returncode == 0, r.stderr
        assert str(fd) not in r.stdout.split(), r.stdout
    finally:
        os.close(fd)


def test_the_local_target_wwn_is_stable_and_valid():
    a = lio.Backstore("dmsnap-dmsnapabc1230001", 1, "x")
    b = lio.Backstore("dmsnap-dmsnapabc1230002", 1, "x")
    assert lio._local_wwn(a) == lio._local_wwn(a) != lio._local_wwn(b)
    rtslib_fb = pytest.importorskip("rtslib_fb")
    assert rtslib_fb.utils.normalize_wwn(["naa"], lio._local_wwn(a))[0] == lio._local_wwn(a)
