"""dmsnap.storage.devices on the host: the state directory check and holds."""

from __future__ import annotations

import os

import pytest

from dmsnap import errors as E
from dmsnap.storage import devices


def test_state_dir_writable_by_group_or_others_is_refused(tmp_path):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    devices.check_private_dir(str(d))
    for mode in (0o770, 0o707, 0o775):
        os.chmod(d, mode)
        with pytest.raises(E.Unavailable, match=f"writable by group or others.*chmod go-w {d}"):
            devices.check_private_dir(str(d))
    os.chmod(d, 0o755)
    devices.check_private_dir(str(d))  # readable is fine: nobody else can change it


def test_state_dir_of_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    os.chown(d, 12345, -1)
    with pytest.raises(E.Unavailable, match="belongs to uid 12345"):
        devices.check_private_dir(str(d))


def test_hold_of_a_regular_file_holds_nothing_and_a_missing_device_is_refused(tmp_path):
    f = tmp_path / "journal.img"
    f.write_bytes(b"")
    h = devices.Holds()
    assert h.hold("j", str(f), "journal") is None and "j" not in h
    with pytest.raises(E.NotFound, match="does not exist"):
        h.hold("x", str(tmp_path / "nope"), "journal")
    assert devices.rdev_of(str(f)) is None
