"""The dmsnap CLI against a real dmsnapd server with a fake Manager behind it.

Local checks (names, sizes, refs) must fail before any socket is touched:
those tests point --socket at a path that does not exist and assert the
error is the name error, not "dmsnapd is not running".
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmsnap import cli
from dmsnap.daemon.server import PeerPolicy, Server
from dmsnap.errors import Busy, NotFound

GiB = 1 << 30

POOLS = [
    {
        "name": "fast",
        "backend": "thin",
        "size": 10 * GiB,
        "used": 2 * GiB,
        "free": 8 * GiB,
        "data_used_fraction": 0.2,
        "metadata_used_fraction": 0.015,
        "writecache": {"state": "ok"},
        "health": [],
        "volumes": 2,
        "snapshots": 3,
        "embedded": False,
        "devices": [{"role": "data", "path": "/dev/sdb"}, {"role": "cache", "path": "/dev/nvme0"}],
        "journal": {
            "mode": "nv",
            "path": "/dev/nvme1",
            "running": True,
            "capacity": 64 * GiB,
            "fill": 0.001,
            "lag_records": 3,
            "lag_bytes": 12288,
            "markers_pending": 0,
            "memory": 256 << 20,
            "memory_limit": 256 << 20,
            "backlog_bytes": 0,
        },
    },
    {
        "name": "embedded-default",
        "backend": "classic",
        "size": 4 * GiB,
        "used": 512 << 20,
        "free": 3584 << 20,
        "writecache": None,
        "health": ["snapshot v@s1 is invalid (COW full)"],
        "volumes": 1,
        "snapshots": 1,
        "embedded": True,
        "devices": [],
    },
]
VOLUMES = [
    {
        "pool": "fast",
        "name": "db",
        "size": GiB,
        "path": "/dev/dmsnap/fast/db",
        "snapshots": 2,
        "created": "2024-05-01T10:00:00",
    },
    {"pool": "fast", "name": "logs", "size": 512 << 20, "path": "/dev/dmsnap/fast/logs"},
]
SNAPSHOTS = [
    {
        "pool": "fast",
        "volume": "db",
        "name": "nightly",
        "group": "nightly",
        "created": 1714557600,
        "active": True,
        "path": "/dev/dmsnap/fast/db@nightly",
        "labels": {"by": "cron"},
    },
    {
        "pool": "fast",
        "volume": "db",
        "name": "before-upgrade-with-a-long-name",
        "group": None,
        "created": None,
        "active": False,
        "path": None,
        "labels": {},
    },
]
EXPORTS = [
    {"ref": "fast/db", "kind": "iscsi", "serial": "s1", "iqn": "iqn.t:db", "running": True,
     "allow": ["iqn.2026-11.org.example:a", "iqn.2026-11.org.example:b"],
     "snapshot_allow": ["iqn.2026-11.org.example:a", "iqn.2026-11.org.example:b"]},
    {"ref": "fast/logs", "kind": "local", "serial": "s2", "running": True,
     "snapshot_allow": "all"},
    {"ref": "fast/db@nightly", "kind": "local", "serial": "s3", "running": False,
     "snapshot_allow": []},
    {"ref": "fast/demo", "kind": "iscsi", "serial": "s4", "iqn": "iqn.t:demo", "running": True,
     "allow": [], "allow_any": True, "snapshot_allow": "all"},
]  # fmt: skip


class FakeManager:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        def method(*args: Any, **kwargs: Any) -> Any:
            if name != "pool_list":  # the server's own STATUS= refresh calls it too
                self.calls.append((name, args, kwargs))
            return self.answer(name, *args, **kwargs)

        return method

    def answer(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "pool_list":
            return POOLS
        if name == "pool_show":
            for p in POOLS:
                if p["name"] == args[0]:
                    return p
            raise NotFound(f"pool {args[0]!r} not found")
        if name == "pool_create":
            return {"name": args[0], "backend": kwargs.get("backend"), "size": kwargs.get("size")}
        if name == "pool_repair":
            return {"pool": args[0], "dropped": 5, "state": "ok"}
        if name == "pool_destroy":
            if not kwargs.get("force"):
                raise Busy(f"pool {args[0]!r} has volumes; use --force")
            return None
        if name == "volume_list":
            pool = args[0] if args else None  # trailing absent args are not sent
            return [v for v in VOLUMES if pool in (None, v["pool"])]
        if name == "volume_show":
            return VOLUMES[0]
        if name == "volume_create":
            return {"pool": args[0], "name": args[1], "size": args[2], "path": "/dev/x"}
        if name == "snapshot_list":
            return SNAPSHOTS
        if name == "snapshot_create":
            return {"name": args[1], "volumes": args[0]}
        if name == "snapshot_activate":
            return {"path": f"/dev/dmsnap/{args[0]}/{args[1]}@{args[2]}"}
        if name == "export_list":
            return EXPORTS
        if name == "volume_discard":
            return {"discarded": args[3] if len(args) > 3 else 1 << 20}
        if name == "export_update":
            return {
                "ref": f"{args[0]}/{args[1]}",
                "allow": kwargs.get("allow") or [],
                "snapshot_allow": "all" if kwargs.get("snapshot_allow") == ["all"] else [],
            }
        if name == "export_create":
            return {"ref": f"{args[0]}/{args[1]}", "iqn": kwargs.get("iqn") or "iqn.x"}
        if name == "status":
            return {"pools": POOLS, "volumes": 3, "snapshots": 4, "active_snapshots": 1}
        if name == "volume_delete" and args[1] == "boom":
            raise RuntimeError("a bug")
        return None


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, FakeManager]]:
    d = tempfile.mkdtemp(prefix="dmsnap-cli")
    path = os.path.join(d, "d.sock")
    server = Server(path, policy=PeerPolicy(frozenset({os.getuid()})))
    server.bind()
    fake = FakeManager()
    t = threading.Thread(target=server.serve, args=(fake,), daemon=True)
    t.start()
    monkeypatch.setenv("DMSNAP_SOCKET", path)
    yield path, fake
    server.request_stop()
    t.join(timeout=10)
    server.close()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def nosock(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    path = str(tmp_path / "no-such.sock")
    monkeypatch.setenv("DMSNAP_SOCKET", path)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.run(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dmsnap: ")
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------- checked before the socket


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["pool", "create", "bad name"], "pool name 'bad name' may only contain"),
        (["pool", "create", "-x"], "No such option"),
        (["pool", "create", "_x"], "must not start with"),
        (["pool", "create", "p" * 49], "longer than 48"),
        (["pool", "create", "p", "--size", "12X"], "--size '12X': expected a number"),
        (["pool", "create", "p", "--size", "0"], "must be positive"),
        (["pool", "create", "p", "--cache-size", "1Q"], "--cache-size '1Q'"),
        (["pool", "create", "p", "--backend", "zfs"], "--backend"),
        (["pool", "show", "a/b"], "pool name 'a/b'"),
        (["pool", "destroy", "a b", "--yes"], "pool name 'a b'"),
        (["volume", "create", "p", "--size", "1G"], "expected POOL/VOLUME"),
        (["volume", "create", "p/v", "--size", "-1"], "--size '-1'"),
        (["volume", "create", "p/v@s", "--size", "1G"], "no @SNAPSHOT here"),
        (["volume", "create", "p/v"], "Missing option '--size'"),
        (["volume", "list", "p/v"], "pool name 'p/v'"),
        (["volume", "show", "p/.v"], "volume name '.v'"),
        (["volume", "delete", "p"], "expected POOL/VOLUME"),
        (["snapshot", "create", "p/v", "bad@name"], "snapshot name 'bad@name'"),
        (["snapshot", "create", "p/v,p/v", "s"], "volume p/v is named twice"),
        (["snapshot", "create", "p/v,q", "s"], "'q': expected POOL/VOLUME"),
        (["snapshot", "create", "p/v", "s", "--label", "novalue"], "expected KEY=VALUE"),
        (["snapshot", "create", "p/v", "s", "--label", "=v"], "label key ''"),
        (["snapshot", "create", "p/v", "s", "-l", "a=1", "-l", "a=2"], "given twice"),
        (["snapshot", "list", "p/v@s"], "no @SNAPSHOT here"),
        (["snapshot", "list", "-p"], "No such option"),
        (["snapshot", "delete", "p/v"], "expected POOL/VOLUME@SNAPSHOT"),
        (["snapshot", "activate", "p/v@"], "snapshot name must not be empty"),
        (["snapshot", "deactivate", "p/v@-s"], "snapshot name '-s'"),
        (["snapshot", "restore", "p@s"], "expected POOL/VOLUME@SNAPSHOT"),
        (["pool", "create"], "Missing argument 'NAME'"),
        (
            ["export", "p/v", "--iscsi", "--no-snapshot", "--snapshot-allow", "all"],
            "--no-snapshot or --snapshot-allow, not both",
        ),
        (
            ["export", "p/v", "--update", "--iscsi", "--allow", "iqn.2026-11.x:a"],
            "--update changes --allow and the snapshot rights only",
        ),
        (
            ["export", "p/v", "--update", "--no-snapshot", "--snapshot-allow", "all"],
            "--no-snapshot or --snapshot-allow, not both",
        ),
    ],
)
def test_bad_input_rejected_before_contacting_daemon(capsys, nosock, argv, fragment) -> None:
    rc, out, err = run(capsys, *argv)
    line = one_line(err)
    assert rc == 2, err
    assert fragment in line
    assert "not running" not in line
    assert out == ""


def test_daemon_not_running(capsys, nosock) -> None:
    rc, _, err = run(capsys, "pool", "list")
    assert rc == 7
    assert one_line(err) == (
        f"dmsnap: dmsnapd is not running (no socket at {nosock}); "
        "start it with: systemctl start dmsnapd"
    )


def test_socket_option_beats_environment(capsys, nosock, tmp_path) -> None:
    other = str(tmp_path / "other.sock")
    rc, _, err = run(capsys, "--socket", other, "status")
    assert rc == 7 and other in err


# ------------------------------------------------------------- with a daemon


def test_pool_list_table_is_aligned(capsys, daemon) -> None:
    rc, out, err = run(capsys, "pool", "list")
    assert rc == 0, err
    lines = out.splitlines()
    header = lines[0]
    assert header.split() == [
        "NAME", "BACKEND", "SIZE", "USED", "FREE", "DATA", "META", "CACHE",
        "JOURNAL", "VOLS", "SNAPS", "HEALTH",
    ]  # fmt: skip
    # Every column starts where its header does.
    for col in ("BACKEND", "SIZE", "DATA", "CACHE", "HEALTH"):
        start = header.index(col)
        for row in lines[1:]:
            assert row[start - 2 : start] == "  " and row[start] != " ", (col, row)
    fast = next(ln for ln in lines if ln.startswith("fast "))
    assert "10G" in fast and "20.0%" in fast and "1.5%" in fast and " ok" in fast
    emb = next(ln for ln in lines if ln.startswith("embedded-default"))
    assert "3.5G" in emb and "COW full" in emb
    # Keys the daemon did not send render as "-".
    assert emb.split()[5:7] == ["-", "-"]


@pytest.mark.parametrize(
    "argv",
    [
        ["pool", "list"],
        ["pool", "show", "fast"],
        ["pool", "create", "new", "--size", "2G"],
        ["volume", "list"],
        ["volume", "show", "fast/db"],
        ["volume", "create", "fast/new", "--size", "512M"],
        ["snapshot", "list"],
        ["snapshot", "list", "fast/db"],
        ["snapshot", "create", "fast/db,fast/logs", "s1", "--label", "k=v"],
        ["snapshot", "activate", "fast/db@nightly"],
        ["status"],
        ["daemon", "ping"],
    ],
)
def test_json_output_parses(capsys, daemon, argv) -> None:
    rc, out, err = run(capsys, *argv, "--json")
    assert rc == 0, err
    json.loads(out)


def test_create_sends_checked_values(capsys, daemon, monkeypatch, tmp_path) -> None:
    _, fake = daemon
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(
        capsys, "pool", "create", "p", "--data", "disk", "--backend", "classic", "--size", "1.5G"
    )
    assert rc == 0, err
    assert out.strip() == "created pool p (classic, 1.5G, journal nv)"
    name, args, kwargs = fake.calls[-1]
    assert name == "pool_create" and args == ("p",)
    assert kwargs["journal_mode"] == "nv" and "journal" not in kwargs
    assert kwargs["data"] == str(tmp_path / "disk")  # absolute: the daemon has another cwd
    assert kwargs["backend"] == "classic" and kwargs["size"] == 3 * GiB // 2
    rc, out, err = run(capsys, "snapshot", "create", "fast/db,fast/logs", "s1", "-l", "by=me")
    assert rc == 0, err
    assert fake.calls[-1] == (
        "snapshot_create",
        ([["fast", "db"], ["fast", "logs"]], "s1"),
        {"labels": {"by": "me"}},
    )
    assert out.strip() == "created snapshot s1 of fast/db, fast/logs"
    rc, out, err = run(capsys, "volume", "delete", "fast/logs", "--force")
    assert rc == 0, err
    assert fake.calls[-1] == ("volume_delete", ("fast", "logs"), {"force": True})
    assert out.strip() == "deleted volume fast/logs"


def test_export_snapshot_rights(capsys, daemon) -> None:
    _, fake = daemon
    a, b = "iqn.2026-11.org.example:a", "iqn.2026-11.org.example:b"
    argv = ["export", "fast/db", "--iscsi", "--allow", a, "--allow", b]
    rc, _, err = run(capsys, *argv, "--snapshot-allow", a)
    assert rc == 0, err
    assert fake.calls[-1][2]["snapshot_allow"] == [a] and fake.calls[-1][2]["allow"] == [a, b]
    rc, _, err = run(capsys, *argv, "--no-snapshot")
    assert rc == 0, err
    assert fake.calls[-1][2]["snapshot_allow"] == []
    rc, _, err = run(capsys, *argv, "--snapshot-allow", "all")
    assert rc == 0, err
    assert fake.calls[-1][2]["snapshot_allow"] == ["all"]
    rc, _, err = run(capsys, *argv)
    assert rc == 0, err
    assert "snapshot_allow" not in fake.calls[-1][2]  # the daemon's default: every initiator
    rc, out, _ = run(capsys, "export", "list")
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["REF", "KIND", "SERIAL", "TARGET", "ALLOW", "SNAPSHOT-ALLOW", "RUNNING"]
    # local disks have no login; an --allow-any export says so loud
    assert [r[4] for r in rows[1:]] == [f"{a},{b}", "-", "-", "ANY(demo)"]
    assert rows[1][5] == f"{a},{b}" and rows[2][5] == "all" and rows[3][5] == "none"


def test_export_list_is_a_command_of_its_own(capsys, daemon) -> None:
    """`export list` is a command (its own help and options), not a word in
    export's POOL/VOL place (issue 19); misuse is one line, exit 2."""
    fake = daemon[1]
    rc, out, _ = run(capsys, "export", "list", "--help")
    assert rc == 0 and "dmsnap export list [OPTIONS]" in out
    assert "--json" in out and "--local" not in out and "POOL/VOL" not in out
    rc, out, _ = run(capsys, "export", "--help")
    assert rc == 0 and "dmsnap export [OPTIONS] {POOL/VOL[@SNAP]}" in out and "| list" not in out
    rc, _, err = run(capsys, "export", "list", "--local")
    assert rc == 2 and err.splitlines() == [
        "dmsnap: No such option: --local (see 'dmsnap export list --help')"
    ]
    rc, _, err = run(capsys, "export", "lsit", "--local")
    assert rc == 2 and err.splitlines() == [
        "dmsnap: export: 'lsit' is not POOL/VOL[@SNAP] ('dmsnap export list' lists the exports)"
    ]
    n = len(fake.calls)
    rc, out, err = run(capsys, "export", "list", "--json")
    assert rc == 0, err
    assert [c[0] for c in fake.calls[n:]] == ["export_list"]


def test_export_allow_any_is_explicit_and_warned(capsys, daemon) -> None:
    _, fake = daemon
    rc, _, err = run(capsys, "export", "fast/db", "--iscsi", "--allow-any")
    assert rc == 0, err
    assert fake.calls[-1][0] == "export_create" and fake.calls[-1][2]["allow_any"] is True
    assert "warning: fast/db is open to every initiator" in err
    rc, _, err = run(capsys, "export", "fast/db", "--iscsi", "--allow", "iqn.2026-11.x:a")
    assert rc == 0, err
    assert "allow_any" not in fake.calls[-1][2] and "warning" not in err


def test_export_update(capsys, daemon) -> None:
    _, fake = daemon
    a = "iqn.2026-11.org.example:a"
    rc, out, err = run(capsys, "export", "fast/db", "--update", "--allow", a, "--no-snapshot")
    assert rc == 0, err
    name, args, kwargs = fake.calls[-1]
    assert (name, args) == ("export_update", ("fast", "db"))
    assert kwargs == {"allow": [a], "snapshot_allow": []}
    assert out.strip() == f"updated fast/db: snapshot command from none; initiators {a}"
    rc, _, err = run(capsys, "export", "fast/db", "--update", "--snapshot-allow", "all")
    assert rc == 0, err
    assert fake.calls[-1][2] == {"snapshot_allow": ["all"]}


def test_volume_discard_asks_unless_yes(capsys, daemon, monkeypatch) -> None:
    _, fake = daemon
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    rc, _, err = run(capsys, "volume", "discard", "fast/db", "--length", "1M")
    assert rc == 1 and "not discarding fast/db without --yes" in one_line(err)
    assert not [c for c in fake.calls if c[0] == "volume_discard"]
    rc, out, err = run(capsys, "volume", "discard", "fast/db", "--offset", "4K", "--yes")
    assert rc == 0, err
    assert out.strip() == "discarded 1048576 bytes of fast/db at 4096"
    assert fake.calls[-1][:2] == ("volume_discard", ("fast", "db", 4096))
    rc, _, err = run(capsys, "volume", "discard", "fast/db", "--length", "1M", "-y")
    assert rc == 0, err
    assert fake.calls[-1][:2] == ("volume_discard", ("fast", "db", 0, 1 << 20))


def test_human_output(capsys, daemon) -> None:
    rc, out, _ = run(capsys, "pool", "show", "fast")
    assert rc == 0
    assert "writecache:" in out and "ok" in out and "/dev/sdb" in out
    rc, out, _ = run(capsys, "volume", "list", "fast")
    assert rc == 0 and out.splitlines()[0].split()[:3] == ["POOL", "NAME", "SIZE"]
    assert "2024-05-01 10:00:00" in out
    rc, out, _ = run(capsys, "snapshot", "list")
    assert rc == 0 and "by=cron" in out and "before-upgrade-with-a-long-name" in out
    rc, out, _ = run(capsys, "snapshot", "activate", "fast/db@nightly")
    assert out.strip() == "/dev/dmsnap/fast/db@nightly"
    rc, out, _ = run(capsys, "status")
    assert rc == 0
    assert "2 pools, 3 volumes, 4 snapshots (1 active)" in out
    assert "warning: embedded-default: snapshot v@s1 is invalid (COW full)" in out
    rc, out, _ = run(capsys, "daemon", "ping")
    assert rc == 0 and "is running on" in out


def test_journal_memory_is_sent_and_shown(capsys, daemon) -> None:
    _, fake = daemon
    rc, _, err = run(capsys, "pool", "create", "p", "--journal-memory", "1G")
    assert rc == 0, err
    assert fake.calls[-1][2]["journal_memory"] == GiB
    rc, out, err = run(capsys, "pool", "set", "p", "--journal-memory", "64M")
    assert rc == 0, err
    assert fake.calls[-1] == ("pool_set", ("p",), {"journal_memory": 64 << 20})
    rc, _, err = run(capsys, "pool", "set", "p", "--journal-memory", "lots")
    assert rc != 0 and "--journal-memory" in one_line(err)
    rc, out, _ = run(capsys, "pool", "show", "fast")
    assert rc == 0 and "memory 256M (window 256M)" in out
    rc, out, _ = run(capsys, "pool", "create", "--help")
    assert "--journal-memory" in out


def test_daemon_errors_are_one_line_with_their_exit_code(capsys, daemon) -> None:
    rc, _, err = run(capsys, "pool", "show", "nope")
    assert rc == 3
    assert one_line(err) == "dmsnap: pool 'nope' not found"
    rc, _, err = run(capsys, "pool", "destroy", "fast", "--yes")
    assert rc == 5 and "use --force" in one_line(err)
    rc, _, err = run(capsys, "volume", "delete", "fast/boom")
    assert rc == 70 and "internal error" in one_line(err)


def test_destroy_needs_yes_without_a_terminal(capsys, daemon, monkeypatch) -> None:
    _, fake = daemon
    monkeypatch.setattr("sys.stdin.isatty", lambda: False, raising=False)
    rc, _, err = run(capsys, "pool", "destroy", "fast", "--force")
    assert rc == 1 and "without --yes" in one_line(err)
    assert not any(c[0] == "pool_destroy" for c in fake.calls)
    rc, out, err = run(capsys, "pool", "destroy", "fast", "--force", "--yes")
    assert rc == 0 and out.strip() == "destroyed pool fast"
    assert fake.calls[-1] == ("pool_destroy", ("fast",), {"force": True})


def test_pool_repair_asks_and_sends_the_seq(capsys, daemon, monkeypatch) -> None:
    _, fake = daemon
    monkeypatch.setattr("sys.stdin.isatty", lambda: False, raising=False)
    rc, _, err = run(capsys, "pool", "repair", "fast", "--discard-after", "17")
    assert rc == 1 and "without --yes" in one_line(err)
    assert not any(c[0] == "pool_repair" for c in fake.calls)
    rc, out, _ = run(capsys, "pool", "repair", "fast", "--discard-after", "17", "--yes")
    assert rc == 0
    assert out.strip() == "pool fast: dropped 5 journal record(s) from 17 on; assembly: ok"
    assert fake.calls[-1] == ("pool_repair", ("fast", 17), {})


def test_daemon_stop(capsys, daemon) -> None:
    rc, out, _ = run(capsys, "daemon", "stop")
    assert rc == 0 and "devices stay up" in out


# ----------------------------------------------------------------- completion


def test_completion_script_generation(capsys, monkeypatch) -> None:
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    for shell in ("bash", "zsh", "fish"):
        rc, out, err = run(capsys, "--show-completion", shell)
        assert rc == 0, err
        assert "_DMSNAP_COMPLETE" in out


def _complete(capsys, monkeypatch, words: str) -> list[str]:
    monkeypatch.setenv("_DMSNAP_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", words)
    monkeypatch.setenv("COMP_CWORD", str(len(words.split(" ")) - 1))
    rc, out, err = run(capsys)
    assert rc == 0, err
    assert err == ""
    return out.split()


def test_completion_queries_daemon(capsys, monkeypatch, daemon) -> None:
    assert _complete(capsys, monkeypatch, "dmsnap pool show ") == ["fast", "embedded-default"]
    assert _complete(capsys, monkeypatch, "dmsnap pool show e") == ["embedded-default"]
    assert _complete(capsys, monkeypatch, "dmsnap volume show fast/l") == ["fast/logs"]
    assert _complete(capsys, monkeypatch, "dmsnap snapshot create fast/db,") == [
        "fast/db,fast/logs"
    ]
    assert _complete(capsys, monkeypatch, "dmsnap snapshot delete fast/db@n") == ["fast/db@nightly"]
    assert "pool" in _complete(capsys, monkeypatch, "dmsnap p")
    # export's REF, beside its list command
    assert _complete(capsys, monkeypatch, "dmsnap export fast/l") == ["fast/logs"]
    assert _complete(capsys, monkeypatch, "dmsnap export fast/db --iscsi --a") == [
        "--allow",
        "--allow-any",
    ]
    assert "list" in _complete(capsys, monkeypatch, "dmsnap export l")


def test_completion_without_daemon_is_silent(capsys, monkeypatch, nosock) -> None:
    assert _complete(capsys, monkeypatch, "dmsnap pool show ") == []


# ------------------------------------------------------------ the rest still works


def test_dm_subapp_and_version_still_there(capsys) -> None:
    rc, out, _ = run(capsys, "dm", "--help")
    assert rc == 0 and "list" in out
    rc, out, _ = run(capsys, "version")
    assert rc == 0 and out.startswith("dmsnap ")


def test_help_and_no_args(capsys) -> None:
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "snapshot" in out
    rc, out, err = run(capsys, "pool")
    assert rc == 2 and "create" in out + err  # the group's help, as click does


def test_status_says_first_whether_degraded_and_why(capsys, daemon) -> None:
    rc, out, err = run(capsys, "status")
    assert rc == 0, err
    lines = out.splitlines()
    # the pool's problem and the export that does not serve: two, each with its why
    assert lines[0] == "health: DEGRADED, 2 problems"
    assert "warning: embedded-default: snapshot v@s1 is invalid (COW full)" in lines
    assert "warning: export fast/db@nightly: not serving: not running" in lines
    rc, out, err = run(capsys, "status", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["degraded"] is True and len(doc["problems"]) == 2
    assert doc["volumes"] == 3  # the daemon's own answer is all there


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["snapshot", "delete", "fast/db@nightly"], {"deleted": "snapshot", "snapshot": "nightly"}),
        (["snapshot", "restore", "fast/db@nightly"], {"restored": "snapshot", "volume": "db"}),
        (["snapshot", "deactivate", "fast/db@nightly"], {"deactivated": "snapshot"}),
        (["volume", "delete", "fast/logs"], {"deleted": "volume", "volume": "logs"}),
        (["pool", "destroy", "fast", "--force", "--yes"], {"destroyed": "pool", "pool": "fast"}),
        (["unexport", "fast/db"], {"unexported": "fast/db", "snapshot": None}),
        (["volume", "discard", "fast/db", "--yes"], {"discarded": 1 << 20, "offset": 0}),
        (["daemon", "stop"], {"stopping": True, "teardown": False}),
    ],
)
def test_mutating_commands_answer_json(capsys, daemon, argv, want) -> None:
    rc, out, err = run(capsys, *argv, "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert want.items() <= doc.items(), doc
