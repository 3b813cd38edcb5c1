"""A disk under a pool disappears: the pool shows degraded at once.

device-mapper raises no event when a device under a table goes away; the
pool's I/O just starts failing. dmsnapd watches udev's block events
(pyudev), re-checks health on each, and within seconds `pool show` and
`status` say which device is gone, the log says it, and the
administrator's `--on-event` command runs with the event in its
environment. The disk is a real SCSI disk (scsi_debug) deleted the way a
hot-unplug or a lost path deletes it (docs/cli.md, dmsnapd).
"""

from __future__ import annotations

import glob
import os
import subprocess
import time
from pathlib import Path

import pytest
from test_cli_e2e import Daemon

pytestmark = pytest.mark.kernel


def _scsi_debug_disk() -> str:
    subprocess.run(["modprobe", "scsi_debug", "dev_size_mb=192"], check=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = glob.glob("/sys/bus/pseudo/drivers/scsi_debug/adapter*/host*/target*/*/block/*")
        if found and os.path.exists(f"/dev/{os.path.basename(found[0])}"):
            return f"/dev/{os.path.basename(found[0])}"
        time.sleep(0.2)
    raise AssertionError("scsi_debug made no disk")


def _wait(what: str, cond, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        if v := cond():
            return v
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.2)


def test_a_data_disk_that_disappears_marks_its_pool_degraded_at_once(tmp_path: Path) -> None:
    disk = _scsi_debug_disk()
    name = os.path.basename(disk)
    devno = Path(f"/sys/block/{name}/dev").read_text().strip()
    events = tmp_path / "events"
    hook = tmp_path / "hook.sh"
    hook.write_text(f'#!/bin/sh\necho "$DMSNAP_EVENT|$DMSNAP_POOL|$DMSNAP_MESSAGE" >> {events}\n')
    hook.chmod(0o755)
    d = Daemon(tmp_path)
    d.extra = ["--on-event", f"{hook} --from-test"]
    d.start()
    try:
        d.cli("pool", "create", "dv", "--data", disk, "--journal-mode", "none")
        d.cli("volume", "create", "dv/v", "--size", "16M")
        assert d.json("pool", "show", "dv")["health"] == []

        # what a hot-unplug or a lost last path does to a SCSI disk
        Path(f"/sys/block/{name}/device/delete").write_text("1")
        t0 = time.monotonic()
        gone = f"data device {disk} ({devno}) is gone"
        health = _wait(
            "pool show names the gone disk",
            lambda: [h for h in d.json("pool", "show", "dv")["health"] if gone in h],
            timeout=10,
        )
        took = time.monotonic() - t0
        assert "degraded" in health[0], health
        # the periodic re-check is every 30 s: this came from the udev event
        assert took < 10, took
        status = d.json("status")
        assert any(gone in h for h in status["health"]), status["health"]
        line = _wait("the hook ran", lambda: events.exists() and events.read_text().strip())
        event, pool, message = line.splitlines()[0].split("|", 2)
        assert (event, pool) == ("problem", "dv") and gone in message, line
        assert f"health: pool dv: {gone}" in d.log.read_text()
    finally:
        d.cli("pool", "destroy", "dv", "--force", "--yes", check=False)
        d.stop(teardown=True)
        subprocess.run(["rmmod", "scsi_debug"], check=False)
