"""End to end: the `dmsnap` CLI against a running `dmsnapd`, on real dm.

`dmsnapd` is a real process on a real socket. CLI commands run through
`dmsnap.cli.run` (the console script's own entry) in-process: in the test VM
every Python start re-reads its imports over the shared 9p filesystem
(15-30 s each under emulation), which would make a hundred CLI calls take an
hour. `test_console_scripts` runs the installed scripts as subprocesses to
cover that last step. `dmsetup` and `udevadm` are the witnesses.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_storage import MiB, block, dm_names, read, write

from dmsnap import cli

BIN = Path(sys.executable).parent
DMSNAP = str(BIN / "dmsnap")
DMSNAPD = str(BIN / "dmsnapd")


class Daemon:
    def __init__(self, tmp: Path) -> None:
        self.state = tmp / "state"
        self.sock = str(tmp / "dmsnapd.sock")
        self.log = tmp / "dmsnapd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra: list[str] = []  # more dmsnapd arguments

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [DMSNAPD, "--state-dir", str(self.state), "--socket", self.sock, *self.extra],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "ab"),  # noqa: SIM115 - owned by the process
        )
        deadline = time.monotonic() + 60
        while self.cli("daemon", "ping", check=False).returncode != 0:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "dmsnapd did not come up"
            time.sleep(0.1)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, teardown: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        args = ["daemon", "stop"] + (["--teardown"] if teardown else [])
        self.cli(*args)
        self.proc.wait(timeout=60)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = ["--socket", self.sock, *args]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.run(argv)
        r = subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())
        if check and r.returncode != 0:
            raise AssertionError(f"dmsnap {' '.join(args)} -> {r.returncode}: {r.stderr}")
        return r

    def json(self, *args: str) -> object:
        return json.loads(self.cli(*args, "--json").stdout)


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    d.start()
    yield d
    if d.proc is not None and d.proc.poll() is not None:
        d.start()  # a test killed it: bring it back to clean up
    for p in d.json("pool", "list"):
        d.cli("pool", "destroy", p["name"], "--force", "--yes")
    d.stop(teardown=True)


@pytest.mark.parametrize("backend", ["thin", "classic"])
def test_cli_pool_volume_snapshot_lifecycle(daemon, backend):
    d = daemon
    pool = d.json(
        "pool", "create", "p", "--backend", backend, "--size", "256M", "--journal-mode", "none"
    )
    assert pool["backend"] == backend and pool["embedded"]
    d.cli("volume", "create", "p/a", "--size", "32M")
    d.cli("volume", "create", "p/b", "--size", "16M")
    a, b = "/dev/dmsnap/p/a", "/dev/dmsnap/p/b"
    write(a, 0, block(0xA1))
    write(b, 0, block(0xB1))
    d.cli("snapshot", "create", "p/a", "one", "--label", "op=nightly-sync")
    d.cli("snapshot", "create", "p/a,p/b", "grp")  # one cut across both
    write(a, 0, block(0xA2))
    write(b, 0, block(0xB2))

    snaps = d.json("snapshot", "list", "p")
    assert {(s["volume"], s["name"]) for s in snaps} == {("a", "one"), ("a", "grp"), ("b", "grp")}
    assert len({s["group"] for s in snaps if s["name"] == "grp"}) == 1
    assert next(s for s in snaps if s["name"] == "one")["labels"] == {"op": "nightly-sync"}

    act = d.json("snapshot", "activate", "p/b@grp")
    assert act["path"] == "/dev/dmsnap/p/b@grp" and read(act["path"], 0, 4096) == block(0xB1)
    d.cli("snapshot", "deactivate", "p/b@grp")
    assert not os.path.exists("/dev/dmsnap/p/b@grp")

    d.cli("snapshot", "restore", "p/a@one")
    assert read(a, 0, 4096) == block(0xA1)
    human = d.cli("snapshot", "list").stdout.splitlines()
    assert human[0].split()[:3] == ["POOL", "VOLUME", "NAME"]
    status = d.json("status")
    assert status["pools"][0]["name"] == "p" and status["pools"][0]["health"] == []
    assert "p" in d.cli("status").stdout
    d.cli("snapshot", "delete", "p/b@grp")
    r = d.cli("volume", "delete", "p/a", check=False)
    if backend == "thin":  # thin keeps "one" after restore; classic merged it away
        assert r.returncode == 5 and "snapshot" in r.stderr
        d.cli("volume", "delete", "p/a", "--force")
    d.cli("pool", "destroy", "p", "--force", "--yes")
    assert not [n for n in dm_names() if n.startswith("dmsnap-p-")]


def test_cli_pool_on_devices_with_writecache(daemon, loopdev):
    d = daemon
    data, cache = loopdev(256 * MiB), loopdev(32 * MiB)
    pool = d.json(
        "pool",
        "create",
        "dev",
        "--data",
        data.path,
        "--cache",
        cache.path,
        "--journal-mode",
        "none",
    )
    assert pool["writecache"]["state"] == "ok"
    d.cli("volume", "create", "dev/v", "--size", "64M")
    write("/dev/dmsnap/dev/v", 4096, block(0x3C))
    d.cli("snapshot", "create", "dev/v", "s")
    shown = d.json("pool", "show", "dev")
    assert shown["snapshots"] == 1 and shown["data_device"] == data.path
    d.cli("pool", "destroy", "dev", "--force", "--yes")


def test_cli_bad_input_is_one_line_and_changes_nothing(daemon, loopdev):
    d = daemon
    d.cli("pool", "create", "ok", "--size", "128M")
    d.cli("volume", "create", "ok/v", "--size", "8M")
    before = (
        dm_names(),
        d.cli("snapshot", "list", "--json").stdout,
        d.cli("volume", "list", "--json").stdout,
    )
    held = loopdev(64 * MiB)
    fd = os.open(held.path, os.O_RDONLY | os.O_EXCL)
    try:
        cases = [
            (2, ["pool", "create", "bad name"]),
            (2, ["volume", "create", "ok/v!", "--size", "8M"]),
            (2, ["volume", "create", "ok/w", "--size", "lots"]),
            (3, ["volume", "create", "nope/v", "--size", "8M"]),
            (3, ["snapshot", "delete", "ok/v@missing"]),
            (3, ["snapshot", "activate", "ok/nope@x"]),
            (4, ["pool", "create", "ok"]),
            (4, ["volume", "create", "ok/v", "--size", "8M"]),
            (6, ["volume", "create", "ok/huge", "--size", "100G"]),
            (3, ["pool", "create", "p2", "--data", "/dev/nonexistent"]),
            (5, ["pool", "create", "p3", "--data", held.path]),
            (5, ["pool", "destroy", "ok", "--yes"]),
        ]
        for code, args in cases:
            r = d.cli(*args, check=False)
            assert r.returncode == code, (args, r.returncode, r.stderr)
            err = r.stderr.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("dmsnap: "), (args, r.stderr)
            assert "Traceback" not in r.stderr
    finally:
        os.close(fd)
    after = (
        dm_names(),
        d.cli("snapshot", "list", "--json").stdout,
        d.cli("volume", "list", "--json").stdout,
    )
    assert after == before


def test_second_daemon_on_same_state_dir_is_refused(daemon):
    r = subprocess.run(
        [DMSNAPD, "--state-dir", str(daemon.state), "--socket", daemon.sock + ".2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "another dmsnapd is running" in r.stderr
    daemon.cli("daemon", "ping")  # the first one is unaffected


def test_udev_links_and_private_layers(daemon):
    d = daemon
    d.cli("pool", "create", "u", "--size", "128M", "--cache-size", "8M", "--journal-mode", "none")
    d.cli("volume", "create", "u/v", "--size", "8M")
    assert os.path.islink("/dev/dmsnap/u/v")
    for layer in ("dmsnap-u-_tpool", "dmsnap-u-_wc", "dmsnap-u-_tmeta"):
        props = subprocess.run(
            ["udevadm", "info", "--query=property", f"/dev/mapper/{layer}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "DM_UDEV_DISABLE_OTHER_RULES_FLAG=1" in props, layer
        assert "DM_UDEV_DISABLE_DISK_RULES_FLAG=1" in props, layer
        assert "SYSTEMD_READY=0" in props, layer
        assert "ID_FS_TYPE" not in props, layer  # never scanned by blkid
    d.cli("snapshot", "create", "u/v", "s")
    d.cli("snapshot", "activate", "u/v@s")
    assert os.path.islink("/dev/dmsnap/u/v@s")
    d.cli("snapshot", "deactivate", "u/v@s")
    d.cli("volume", "delete", "u/v", "--force")
    assert not os.path.lexists("/dev/dmsnap/u/v")


def test_kill9_restart_and_reboot_bring_everything_back(daemon):
    d = daemon
    d.cli("pool", "create", "k", "--size", "256M", "--cache-size", "16M", "--journal-mode", "none")
    d.cli(
        "pool", "create", "kc", "--size", "256M", "--backend", "classic", "--journal-mode", "none"
    )
    for pool in ("k", "kc"):
        d.cli("volume", "create", f"{pool}/v", "--size", "16M")
        write(f"/dev/dmsnap/{pool}/v", 0, block(0x61))
        d.cli("snapshot", "create", f"{pool}/v", "base")
        d.cli("snapshot", "activate", f"{pool}/v@base")
        write(f"/dev/dmsnap/{pool}/v", 0, block(0x62))

    # kill -9 in the middle of snapshot creations, several times.
    rng = random.Random(7)
    for i in range(3):
        # A client thread sends the request; the daemon dies under it.
        bg = threading.Thread(
            target=d.cli, args=("snapshot", "create", "k/v", f"x{i}"), kwargs={"check": False}
        )
        bg.start()
        time.sleep(rng.uniform(0.0, 0.4))
        d.kill9()
        bg.join(timeout=60)
        d.start()
        names = {s["name"] for s in d.json("snapshot", "list", "k/v")}
        assert "base" in names
        assert d.json("status")["pending"] == 0  # every interrupted operation settled
        if f"x{i}" in names:  # it happened: it must be a real, usable snapshot
            p = d.json("snapshot", "activate", f"k/v@x{i}")["path"]
            assert read(p, 0, 4096) == block(0x62)
            d.cli("snapshot", "deactivate", f"k/v@x{i}")
    d.cli("snapshot", "create", "k/v", "after-crashes")  # ids still line up

    # "Reboot": daemon stops without teardown; every dm device and loop
    # device disappears; the next start rebuilds all from the catalog.
    d.stop()
    subprocess.run(["dmsetup", "remove_all"], check=True)
    subprocess.run(["losetup", "-D"], check=True)
    assert not [n for n in dm_names() if n.startswith("dmsnap-")]
    d.start()
    for pool in ("k", "kc"):
        assert read(f"/dev/dmsnap/{pool}/v", 0, 4096) == block(0x62)
        assert read(f"/dev/dmsnap/{pool}/v@base", 0, 4096) == block(0x61)
    assert all(p["health"] == [] for p in d.json("pool", "list"))


def test_console_scripts(daemon):
    """The installed entry points, as an administrator types them."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DMSNAP, "--socket", daemon.sock, *args], capture_output=True, text=True, timeout=300
        )

    ok = run("pool", "create", "cs", "--size", "128M", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["name"] == "cs"
    bad = run("volume", "create", "cs/x", "--size", "1T")
    assert bad.returncode == 6
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("dmsnap: ")
    gone = subprocess.run(
        [DMSNAP, "--socket", daemon.sock + ".none", "status"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert gone.returncode == 7 and "dmsnapd is not running" in gone.stderr


def test_journaled_pool_end_to_end(daemon, tmp_path):
    """The default pool is journaled: volumes are written and read through
    dmsnapd, a snapshot request returns once its marker is durable, the
    snapshot holds exactly the writes before it, and all of it survives a
    daemon restart."""
    d = daemon
    pool = d.json("pool", "create", "j", "--size", "256M", "--journal-size", "16M")
    assert pool["journal"]["mode"] == "nv" and pool["journal"]["running"]
    vol = d.json("volume", "create", "j/v", "--size", "8M")
    assert vol["journaled"] and vol["path"] is None
    assert not os.path.lexists("/dev/dmsnap/j/v")  # private: only through the journal
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(random.Random(1).randbytes(MiB))
    b.write_bytes(random.Random(2).randbytes(MiB))
    d.cli("volume", "write", "j/v", str(a), "--offset", "1M")
    s1 = d.json("snapshot", "create", "j/v", "s1")
    assert s1["state"] in ("pending", "done") and s1["marker"] >= 1
    d.cli("volume", "write", "j/v", str(b), "--offset", "1M")
    s2 = d.json("snapshot", "create", "j/v", "s2", "--wait")
    assert s2["state"] == "done" and [s["name"] for s in s2["snapshots"]] == ["s2"]
    d.cli("volume", "write", "j/v", str(a), "--offset", "1M")  # after s2: in neither

    out = tmp_path / "out"
    d.cli("volume", "read", "j/v", "--offset", "1M", "--length", "1M", "-o", str(out))
    assert out.read_bytes() == a.read_bytes()
    for name, want in (("s1", a), ("s2", b)):
        path = d.json("snapshot", "activate", f"j/v@{name}")["path"]
        assert path == f"/dev/dmsnap/j/v@{name}"
        assert read(path, MiB, MiB) == want.read_bytes(), name
        assert read(path, 0, MiB) == bytes(MiB)
        d.cli("snapshot", "deactivate", f"j/v@{name}")
    shown = d.cli("pool", "show", "j").stdout
    assert "journal" in shown and "nv on " in shown and "marker(s) pending" in shown

    bad = d.cli("volume", "write", "j/v", str(tmp_path / "odd"), check=False)
    assert bad.returncode != 0 and bad.stderr.startswith("dmsnap: ")
    (tmp_path / "odd").write_bytes(b"x" * 100)
    bad = d.cli("volume", "write", "j/v", str(tmp_path / "odd"), check=False)
    assert bad.returncode == 2 and "512-byte sector" in bad.stderr

    d.stop()  # a clean stop drains the journal; a start replays nothing twice
    d.start()
    d.cli("volume", "read", "j/v", "--offset", "1M", "--length", "1M", "-o", str(out))
    assert out.read_bytes() == a.read_bytes()
    names = sorted(s["name"] for s in d.json("snapshot", "list", "j/v"))
    assert names == ["s1", "s2"]

    # a discard reads zeros at once; the snapshots keep their data
    half = MiB // 2
    r = d.cli("volume", "discard", "j/v", "--offset", "1M", "--length", "512K", "--yes")
    assert r.stdout.strip() == f"discarded {half} bytes of j/v at {MiB}"
    d.cli("volume", "read", "j/v", "--offset", "1M", "--length", "1M", "-o", str(out))
    assert out.read_bytes() == bytes(half) + a.read_bytes()[half:]
    path = d.json("snapshot", "activate", "j/v@s2")["path"]
    assert read(path, MiB, MiB) == b.read_bytes()
    d.cli("snapshot", "deactivate", "j/v@s2")
    bad = d.cli("volume", "discard", "j/v", "--offset", "8M", "--yes", check=False)
    assert bad.returncode == 2 and "offset 8388608 is not inside the volume" in bad.stderr, bad
    bad = d.cli("volume", "discard", "j/v", "--offset", "7M", "--length", "2M", "-y", check=False)
    assert bad.returncode == 2 and "beyond the volume" in bad.stderr, bad
    d.cli("volume", "discard", "j/v", "--offset", "4M", "--yes")  # to the end
    d.cli("volume", "read", "j/v", "--offset", "4M", "--length", "4M", "-o", str(out))
    assert out.read_bytes() == bytes(4 * MiB)
