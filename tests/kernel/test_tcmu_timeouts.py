"""TCMU's timeouts on every user backstore dmsnap creates, as the kernel
holds them (configfs, read directly): cmd_time_out outlasts a daemon
restart, qfull_time_out sends a command back for retry before an
initiator's own timeout (docs/scsi.md, "Timeouts")."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest

from dmsnap.scsi import lio
from dmsnap.storage.manager import Manager

MiB = 1 << 20


def test_user_backstores_carry_dmsnap_timeouts(tmp_path):
    if (why := lio.available()) is not None:
        pytest.fail(why)
    m = Manager(str(tmp_path / "state"))
    try:
        m.pool_create("t", size=64 * MiB, journal_size=16 * MiB)
        m.volume_create("t", "v", 8 * MiB)
        ex = m.export_create("t", "v", kind="local")
        dirs = glob.glob(f"{lio.CONFIGFS}/core/user_*/dmsnap-{ex['serial']}*")
        assert dirs, ex
        for d in dirs:
            got = {
                a: Path(d, "attrib", a).read_text().strip()
                for a in ("cmd_time_out", "qfull_time_out")
            }
            assert got == {"cmd_time_out": "120", "qfull_time_out": "20"}, (d, got)
    finally:
        for p in m.catalog.pools():
            m.pool_destroy(p.name, force=True)
        m.close()
