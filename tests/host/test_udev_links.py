"""The /dev/dmsnap link a device gets: dmsnap.dm.udev.link_for (what
dmsnap waits for after an ioctl) must name exactly the link that udev's
helper udev/dmsnap-udev-name makes, for any UUID."""

from __future__ import annotations

import subprocess
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from dmsnap.dm import udev

HELPER = Path(__file__).resolve().parents[2] / "udev" / "dmsnap-udev-name"


def helper_link(uuid: str) -> str | None:
    out = subprocess.run(
        ["sh", str(HELPER), uuid], capture_output=True, text=True, check=True
    ).stdout
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return f"/dev/{env['DMSNAP_LINK']}" if "DMSNAP_LINK" in env else None


def test_volume_and_snapshot_links() -> None:
    vol = udev.make_uuid(udev.Role.VOLUME, "7-p1:v1")
    snap = udev.make_uuid(udev.Role.SNAPSHOT, "9-p1:v1@s1")
    assert udev.link_for(vol) == helper_link(vol) == "/dev/dmsnap/p1/v1"
    assert udev.link_for(snap) == helper_link(snap) == "/dev/dmsnap/p1/v1@s1"


def test_private_devices_get_no_link() -> None:
    for role in (udev.Role.JOURNALED, udev.Role.INTERNAL, udev.Role.TEST):
        uuid = udev.make_uuid(role, "3-p1:v1")
        assert udev.link_for(uuid) is None
    assert udev.link_for(None) is None
    assert udev.link_for("LVM-abc") is None


names = st.text(alphabet="abcXYZ019._-:@/", min_size=0, max_size=8)


@settings(max_examples=60, deadline=None)
@given(
    role=st.sampled_from(["vol", "snap", "jvol", "int", "test", "x"]),
    ident=st.text(alphabet="0123456789", max_size=3),
    pool=names,
    obj=names,
)
def test_agrees_with_the_udev_helper(role: str, ident: str, pool: str, obj: str) -> None:
    uuid = f"DMSNAP-{role}-{ident}-{pool}:{obj}"
    assert udev.link_for(uuid) == helper_link(uuid)
