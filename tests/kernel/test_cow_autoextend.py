"""Classic snapshots whose COW area would overflow, tried as a new user would.

A 64 MiB classic volume (journaled, the default), 16 MiB written, a
snapshot, the same 16 MiB overwritten: the snapshot's COW area (25 % of the
volume, 16 MiB, less its metadata) cannot hold the old data. With the
pool's autoextend policy (default: at 50 % full, grow by 100 %) dmsnapd
grows the area from the pool's free space in time: the snapshot stays valid
and reads the data from before the overwrite. With autoextend off the
kernel invalidates it: `snapshot list` says so, and activating or exporting
it is refused with one clear line (its content is not the snapshot's), and
an initiator asking in-band (LIST) sees its request FAILED, not DONE.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
from test_cli_e2e import Daemon
from test_storage import MiB, read

from dmsnap.scsi import initiator

VOL = 64 * MiB
WRITTEN = 16 * MiB


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    d.start()
    yield d
    if d.proc is not None and d.proc.poll() is not None:
        d.start()
    for p in d.json("pool", "list"):
        d.cli("pool", "destroy", p["name"], "--force", "--yes")
    d.stop(teardown=True)


def drained(d: Daemon, pool: str, timeout: float = 180) -> None:
    """Wait until the journal's flusher has put every write on the volume."""
    deadline = time.monotonic() + timeout
    while d.json("pool", "show", pool)["journal"]["lag_records"]:
        assert time.monotonic() < deadline, "journal did not drain"
        time.sleep(0.5)


def overwrite_after_snapshot(d: Daemon, tmp: Path) -> bytes:
    """The scenario; returns the data the snapshot must hold."""
    d.cli("volume", "create", "cow/v", "--size", f"{VOL // MiB}M")
    old, new = tmp / "old", tmp / "new"
    old.write_bytes(random.Random(1).randbytes(WRITTEN))
    new.write_bytes(random.Random(2).randbytes(WRITTEN))
    d.cli("volume", "write", "cow/v", str(old))
    d.cli("snapshot", "create", "cow/v", "s", "--wait")
    assert d.json("pool", "show", "cow")["snapshots"]["v@s"]["cow_size"] == VOL // 4
    d.cli("volume", "write", "cow/v", str(new))
    drained(d, "cow")
    return old.read_bytes()


def test_cow_area_grows_before_it_overflows(daemon, tmp_path):
    d = daemon
    d.cli("pool", "create", "cow", "--backend", "classic", "--size", "256M")
    pool = d.json("pool", "show", "cow")
    assert pool["cow_autoextend"] == {"threshold": 50, "percent": 100}
    want = overwrite_after_snapshot(d, tmp_path)

    usage = d.json("pool", "show", "cow")["snapshots"]["v@s"]
    assert usage["state"] == "valid", usage
    assert usage["cow_size"] > VOL // 4, usage
    [snap] = d.json("snapshot", "list", "cow/v")
    assert snap["state"] == "valid"
    assert "grown by" in d.log.read_text()
    path = d.json("snapshot", "activate", "cow/v@s")["path"]
    assert read(path, 0, WRITTEN) == want
    d.cli("snapshot", "deactivate", "cow/v@s")
    print(f"\nCOW area grown to {usage['cow_size'] // MiB} MiB, {usage['cow_used_fraction']:.0%}")


def test_overflowed_snapshot_is_shown_invalid_and_refused(daemon, tmp_path):
    d = daemon
    d.cli("pool", "create", "cow", "--backend", "classic", "--size", "256M")
    r = d.cli("pool", "set", "cow", "--cow-autoextend-threshold", "100")
    assert "100%" in r.stdout
    overwrite_after_snapshot(d, tmp_path)

    [snap] = d.json("snapshot", "list", "cow/v")
    assert snap["state"] == "invalid"
    human = d.cli("snapshot", "list", "cow/v").stdout
    assert "STATE" in human and "invalid" in human, human
    r = d.cli("snapshot", "activate", "cow/v@s", check=False)
    assert r.returncode == 7, (r.returncode, r.stderr)
    assert r.stderr == (
        "dmsnap: snapshot cow/v@s is invalid: its COW area overflowed and its contents are "
        "lost; delete it\n"
    )
    assert not snap["active"] and not d.json("snapshot", "list", "cow/v")[0]["active"]
    r = d.cli("export", "cow/v@s", "--local", check=False)
    assert r.returncode == 7 and "is invalid" in r.stderr, (r.returncode, r.stderr)
    assert d.json("export", "list") == []
    # in-band: the request that made it is FAILED (and says why), not DONE
    d.cli("export", "cow/v", "--local")
    try:
        disk = os.path.realpath("/dev/dmsnap/cow/v")
        [entry] = [e for e in initiator.list_requests(disk) if e.name == "s"]
        assert entry.state.name == "FAILED" and "cow/v@s is invalid" in entry.error, entry
    finally:
        d.cli("unexport", "cow/v")
    print(f"\n{human}activate: {r.stderr.strip()}")
    d.cli("snapshot", "delete", "cow/v@s")
