"""dmsnapd's control protocol and daemon lifecycle, without a kernel.

The real server runs (in a thread, or as a real process) in front of a fake
Manager that records its calls: what is under test here is the protocol, the
access checks, the locking and the systemd notifications. The storage stack
itself is tested end to end in the VM (tests/kernel).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmsnap.client import Client
from dmsnap.daemon import protocol as proto
from dmsnap.daemon.lock import LOCK_NAME, AlreadyRunning, acquire_state_lock
from dmsnap.daemon.main import _JournalFormatter, run_daemon
from dmsnap.daemon.notify import Notifier
from dmsnap.daemon.server import PeerPolicy, Server
from dmsnap.errors import (
    AlreadyExists,
    Busy,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
    UserError,
)
from dmsnap.storage.names import BadName

REPO = Path(__file__).resolve().parents[2]
ME = frozenset({os.getuid()})


class FakeManager:
    """Records every call; answers like the Manager's docstring says."""

    def __init__(self, state_dir: str = "") -> None:
        self.state_dir = state_dir
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.delay = 0.0
        self.fail: BaseException | None = None
        self.pools = ["p"]

    def _record(self, name: str, *args: Any, **kwargs: Any) -> None:
        with self.lock:
            self.calls.append((name, args, kwargs))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                time.sleep(self.delay)
            if self.fail is not None:
                raise self.fail
        finally:
            with self.lock:
                self.active -= 1

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def assemble(self) -> dict[str, Any]:
        self._record("assemble")
        return {"pools": len(self.pools)}

    def pool_create(
        self,
        name,
        *,
        data=None,
        cache=None,
        backend="thin",
        size=None,
        cache_size=None,
        journal=None,
        journal_size=None,
        journal_mode="nv",
        journal_memory=None,
        sparse=False,
    ):
        self._record(
            "pool_create",
            name,
            data=data,
            cache=cache,
            backend=backend,
            size=size,
            cache_size=cache_size,
            journal=journal,
            journal_size=journal_size,
            journal_mode=journal_mode,
            journal_memory=journal_memory,
            sparse=sparse,
        )
        return {"name": name, "backend": backend, "size": size}

    def pool_list(self):
        # Not recorded: the server calls it for STATUS= on its own.
        return [{"name": n} for n in self.pools]

    def pool_show(self, name):
        self._record("pool_show", name)
        return {"name": name}

    def pool_extend_metadata(self, name, size):
        self._record("pool_extend_metadata", name, size)
        return {"name": name}

    def pool_set(
        self,
        name,
        *,
        cow_autoextend_threshold=None,
        cow_autoextend_percent=None,
        journal_memory=None,
    ):
        self._record(
            "pool_set",
            name,
            cow_autoextend_threshold=cow_autoextend_threshold,
            cow_autoextend_percent=cow_autoextend_percent,
            journal_memory=journal_memory,
        )
        return {"name": name}

    def pool_destroy(self, name, *, force=False):
        self._record("pool_destroy", name, force=force)

    def pool_repair(self, name, discard_after):
        self._record("pool_repair", name, discard_after)
        return {"pool": name, "dropped": 3, "state": "ok"}

    def volume_create(self, pool, vol, size):
        self._record("volume_create", pool, vol, size)
        return {"pool": pool, "name": vol, "size": size}

    def volume_list(self, pool=None):
        self._record("volume_list", pool)
        return []

    def volume_show(self, pool, vol):
        self._record("volume_show", pool, vol)
        return {"pool": pool, "name": vol}

    def volume_delete(self, pool, vol, *, force=False):
        self._record("volume_delete", pool, vol, force=force)

    def snapshot_create(
        self, refs, name, *, labels=None, token=None, wait=False, timeout=60.0, cow_size=None
    ):
        self._record(
            "snapshot_create",
            refs,
            name,
            labels=labels,
            token=token,
            wait=wait,
            timeout=timeout,
            cow_size=cow_size,
        )
        return {"name": name, "refs": refs}

    def snapshot_request(self, pool, *, marker=None, token=None):
        self._record("snapshot_request", pool, marker=marker, token=token)
        return {"marker": marker or 1, "state": "pending"}

    def volume_write(self, pool, vol, offset, content, *, fua=False):
        self._record("volume_write", pool, vol, offset, content, fua=fua)
        return {"written": len(content)}

    def volume_read(self, pool, vol, offset, length):
        self._record("volume_read", pool, vol, offset, length)
        return bytes(range(256)) * (length // 256)

    def volume_flush(self, pool, vol):
        self._record("volume_flush", pool, vol)

    def volume_discard(self, pool, vol, offset=0, size=None):
        self._record("volume_discard", pool, vol, offset, size)
        return {"discarded": size, "offset": offset, "seq": 1}

    def export_create(
        self,
        pool,
        vol,
        *,
        snap=None,
        kind="local",
        iqn=None,
        portal=None,
        allow=None,
        allow_any=False,
        chap=None,
        snapshot_allow=None,
    ):
        self._record(
            "export_create",
            pool,
            vol,
            snap=snap,
            kind=kind,
            iqn=iqn,
            portal=portal,
            allow=allow,
            allow_any=allow_any,
            chap=chap,
            snapshot_allow=snapshot_allow,
        )
        return {"ref": f"{pool}/{vol}", "kind": kind}

    def export_update(self, pool, vol, *, snap=None, allow=None, snapshot_allow=None):
        self._record(
            "export_update", pool, vol, snap=snap, allow=allow, snapshot_allow=snapshot_allow
        )
        return {"ref": f"{pool}/{vol}"}

    def export_list(self, pool=None):
        self._record("export_list", pool)
        return []

    def export_delete(self, pool, vol, *, snap=None):
        self._record("export_delete", pool, vol, snap=snap)

    def snapshot_list(self, pool=None, vol=None):
        self._record("snapshot_list", pool, vol)
        return []

    def snapshot_delete(self, pool, vol, name, *, force=False):
        self._record("snapshot_delete", pool, vol, name, force=force)

    def snapshot_activate(self, pool, vol, name):
        self._record("snapshot_activate", pool, vol, name)
        return {"path": f"/dev/dmsnap/{pool}/{vol}@{name}"}

    def snapshot_deactivate(self, pool, vol, name):
        self._record("snapshot_deactivate", pool, vol, name)

    def snapshot_restore(self, pool, vol, name):
        self._record("snapshot_restore", pool, vol, name)

    def status(self):
        self._record("status")
        return {"pools": [], "volumes": 0, "snapshots": 0}

    def teardown(self):
        self._record("teardown")

    def close(self):
        self._record("close")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="dmsnap-t"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Daemon:
    def __init__(self, path: Path, server: Server, fake: FakeManager) -> None:
        self.path = path
        self.server = server
        self.fake = fake
        self.thread = threading.Thread(target=server.serve, args=(fake,), daemon=True)

    def client(self, **kw: Any) -> Client:
        kw.setdefault("timeout", 10)  # a bug must fail the test, not hang it
        return Client(str(self.path), **kw)

    def raw(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(self.path))
        return s


def start_daemon(path: Path, policy: PeerPolicy | None = None, **kw: Any) -> Daemon:
    server = Server(str(path), policy=policy or PeerPolicy(ME), **kw)
    server.bind()
    d = Daemon(path, server, FakeManager())
    d.thread.start()
    return d


def stop_daemon(d: Daemon) -> None:
    d.server.request_stop()
    d.thread.join(timeout=10)
    d.server.close()
    assert not d.thread.is_alive()


@pytest.fixture
def daemon(short_dir: Path) -> Iterator[Daemon]:
    d = start_daemon(short_dir / "d.sock")
    yield d
    stop_daemon(d)


def exchange(s: socket.socket, data: bytes) -> dict[str, Any]:
    s.sendall(data)
    f = s.makefile("rb")
    return json.loads(f.readline())


# ------------------------------------------------------------ round trips

ROUND_TRIPS = [
    (
        "pool.create",
        {"name": "p1"},
        ("pool_create", ("p1",), {"data": None, "cache": None, "backend": "thin"}),
    ),
    (
        "pool.create",
        {
            "name": "p2",
            "data": "/dev/sdb",
            "cache": "/dev/nvme0n1",
            "backend": "classic",
            "size": "1G",
            "cache_size": 1 << 20,
        },
        (
            "pool_create",
            ("p2",),
            {
                "data": "/dev/sdb",
                "cache": "/dev/nvme0n1",
                "backend": "classic",
                "size": 1 << 30,
                "cache_size": 1 << 20,
            },
        ),
    ),
    ("pool.show", {"name": "p"}, ("pool_show", ("p",), {})),
    (
        "pool.extend_metadata",
        {"name": "p", "size": "64M"},
        ("pool_extend_metadata", ("p", 64 << 20), {}),
    ),
    (
        "pool.set",
        {"name": "p", "cow_autoextend_threshold": 80, "cow_autoextend_percent": 20},
        ("pool_set", ("p",), {"cow_autoextend_threshold": 80, "cow_autoextend_percent": 20}),
    ),
    (
        "pool.set",
        {"name": "p", "journal_memory": "64M"},
        ("pool_set", ("p",), {"journal_memory": 64 << 20}),
    ),
    (
        "pool.create",
        {"name": "p5", "journal": "/dev/nvme1n1", "journal_memory": "1G"},
        ("pool_create", ("p5",), {"journal": "/dev/nvme1n1", "journal_memory": 1 << 30}),
    ),
    (
        "pool.create",
        {"name": "p3", "size": "1G", "sparse": True},
        ("pool_create", ("p3",), {"size": 1 << 30, "sparse": True}),
    ),
    ("pool.destroy", {"name": "p"}, ("pool_destroy", ("p",), {"force": False})),
    ("pool.repair", {"name": "p", "discard_after": 42}, ("pool_repair", ("p", 42), {})),
    ("pool.destroy", {"name": "p", "force": True}, ("pool_destroy", ("p",), {"force": True})),
    (
        "volume.create",
        {"pool": "p", "vol": "v", "size": 4096},
        ("volume_create", ("p", "v", 4096), {}),
    ),
    ("volume.list", {}, ("volume_list", (None,), {})),
    ("volume.list", {"pool": "p"}, ("volume_list", ("p",), {})),
    ("volume.show", {"pool": "p", "vol": "v"}, ("volume_show", ("p", "v"), {})),
    ("volume.delete", {"pool": "p", "vol": "v"}, ("volume_delete", ("p", "v"), {})),
    (
        "volume.delete",
        {"pool": "p", "vol": "v", "force": True},
        ("volume_delete", ("p", "v"), {"force": True}),
    ),
    (
        "snapshot.create",
        {"refs": [["p", "a"], ["p", "b"]], "name": "s", "labels": {"k": "v"}},
        ("snapshot_create", ([["p", "a"], ["p", "b"]], "s"), {"labels": {"k": "v"}, "token": None}),
    ),
    ("snapshot.list", {}, ("snapshot_list", (None, None), {})),
    ("snapshot.list", {"pool": "p"}, ("snapshot_list", ("p", None), {})),
    ("snapshot.list", {"pool": "p", "vol": "v"}, ("snapshot_list", ("p", "v"), {})),
    *[
        (
            f"snapshot.{op}",
            {"pool": "p", "vol": "v", "name": "s"},
            (f"snapshot_{op}", ("p", "v", "s"), {}),
        )
        for op in ("delete", "activate", "deactivate", "restore")
    ],
    (
        "snapshot.delete",
        {"pool": "p", "vol": "v", "name": "s", "force": True},
        ("snapshot_delete", ("p", "v", "s"), {"force": True}),
    ),
    (
        "pool.create",
        {"name": "p3", "journal": "/dev/nvme1n1", "journal_mode": "nv"},
        ("pool_create", ("p3",), {"journal": "/dev/nvme1n1", "journal_mode": "nv"}),
    ),
    (
        "pool.create",
        {"name": "p4", "journal_mode": "ram", "journal_size": "16M"},
        ("pool_create", ("p4",), {"journal_mode": "ram", "journal_size": 16 << 20}),
    ),
    (
        "snapshot.create",
        {"refs": [["p", "a"]], "name": "s", "wait": True, "timeout": 5},
        ("snapshot_create", ([["p", "a"]], "s"), {"wait": True, "timeout": 5.0}),
    ),
    (
        "snapshot.create",
        {"refs": [["p", "a"]], "name": "s", "cow_size": "64M"},
        ("snapshot_create", ([["p", "a"]], "s"), {"cow_size": 64 << 20}),
    ),
    (
        "snapshot.request",
        {"pool": "p", "token": "t-1"},
        ("snapshot_request", ("p",), {"token": "t-1", "marker": None}),
    ),
    (
        "volume.write",
        {"pool": "p", "vol": "v", "offset": 512, "content": "AAAA", "fua": True},
        ("volume_write", ("p", "v", 512, b"\0\0\0"), {"fua": True}),
    ),
    (
        "volume.read",
        {"pool": "p", "vol": "v", "offset": 0, "length": 512},
        ("volume_read", ("p", "v", 0, 512), {}),
    ),
    ("volume.flush", {"pool": "p", "vol": "v"}, ("volume_flush", ("p", "v"), {})),
    (
        "volume.discard",
        {"pool": "p", "vol": "v", "offset": 4096, "size": 8192},
        ("volume_discard", ("p", "v", 4096, 8192), {}),
    ),
    (
        "export.create",
        {
            "pool": "p",
            "vol": "v",
            "kind": "iscsi",
            "allow": ["iqn.2026-11.x:a"],
            "chap": [["iqn.2026-11.x:a", "u", "s3cret-s3cret"]],
        },
        ("export_create", ("p", "v"), {"kind": "iscsi", "allow": ["iqn.2026-11.x:a"]}),
    ),
    (
        "export.create",
        {"pool": "p", "vol": "v", "kind": "iscsi", "snapshot_allow": []},
        ("export_create", ("p", "v"), {"kind": "iscsi", "snapshot_allow": []}),
    ),
    (
        "export.update",
        {"pool": "p", "vol": "v", "snapshot_allow": []},
        ("export_update", ("p", "v"), {"snapshot_allow": []}),
    ),
    ("export.list", {}, ("export_list", (None,), {})),
    (
        "export.delete",
        {"pool": "p", "vol": "v", "snap": "s"},
        ("export_delete", ("p", "v"), {"snap": "s"}),
    ),
    ("status", {}, ("status", (), {})),
]


@pytest.mark.parametrize(("op", "args", "expected"), ROUND_TRIPS, ids=[r[0] for r in ROUND_TRIPS])
def test_round_trip_maps_to_manager(daemon: Daemon, op, args, expected) -> None:
    with daemon.client() as c:
        result = c.call(op, **args)
    name, pos, kw = expected
    assert len(daemon.fake.calls) == 1
    got_name, got_pos, got_kw = daemon.fake.calls[0]
    assert (got_name, got_pos) == (name, pos)
    for k, v in kw.items():
        assert got_kw.get(k) == v, k
    if op == "snapshot.activate":
        assert result == {"path": "/dev/dmsnap/p/v@s"}
    if op == "volume.read":  # bytes travel as base64
        assert base64.b64decode(result["content"]) == bytes(range(256)) * 2


@pytest.mark.parametrize(
    ("op", "args", "words"),
    [
        ("volume.write", {"pool": "p", "vol": "v", "offset": 0, "content": "!!"}, "base64"),
        ("volume.write", {"pool": "p", "vol": "v", "offset": -1, "content": "AAAA"}, "offset"),
        ("volume.read", {"pool": "p", "vol": "v", "offset": 0, "length": 1 << 30}, "bytes"),
        ("pool.create", {"name": "p", "journal_mode": "disk"}, "nv, ram, none"),
        ("pool.create", {"name": "p", "journal": "relative/dev"}, "absolute"),
        ("snapshot.request", {"pool": "p", "marker": 0}, "marker id"),
        ("snapshot.create", {"refs": [["p", "v"]], "name": "s", "timeout": -3}, "seconds"),
    ],
)
def test_bad_data_and_journal_args_refused_before_the_manager(
    daemon: Daemon, op, args, words
) -> None:
    with daemon.client() as c, pytest.raises(UserError) as ei:
        c.call(op, **args)
    assert words in str(ei.value)
    assert daemon.fake.calls == []


class FakeSchedules:
    """The schedules service (dmsnap.schedule.runner.Scheduler) as the server sees it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, method: str) -> Any:
        def call(*a: Any, **kw: Any) -> dict[str, Any]:
            self.calls.append((method, a, kw))
            return {"method": method}

        return call


SCHEDULE_ROUND_TRIPS = [
    (
        "schedule.create",
        {"name": "n", "refs": [["p", "a"], ["p", "b"]], "every": 300, "keep_daily": 7},
        ("create", ("n", [["p", "a"], ["p", "b"]]), {"every": 300, "keep_daily": 7}),
    ),
    (
        "schedule.create",
        {"name": "n", "refs": [["p", "a"]], "calendar": "Mon..Fri 08..18:00", "tz": "UTC"},
        ("create", ("n", [["p", "a"]]), {"calendar": "Mon..Fri 08..18:00", "tz": "UTC"}),
    ),
    ("schedule.list", {}, ("list", (), {})),
    ("schedule.show", {"name": "n"}, ("show", ("n",), {})),
    ("schedule.pause", {"name": "n"}, ("pause", ("n",), {})),
    ("schedule.resume", {"name": "n"}, ("resume", ("n",), {})),
    ("schedule.delete", {"name": "n"}, ("delete", ("n",), {})),
]


@pytest.mark.parametrize(
    ("op", "args", "expected"), SCHEDULE_ROUND_TRIPS, ids=[r[0] for r in SCHEDULE_ROUND_TRIPS]
)
def test_schedule_ops_reach_the_schedules_service(daemon: Daemon, op, args, expected) -> None:
    with daemon.client() as c, pytest.raises(UserError, match="runs no schedules"):
        c.call(op, **args)  # a dmsnapd without the service says so, in one line
    fake = daemon.server.services["schedules"] = FakeSchedules()
    with daemon.client() as c:
        assert c.call(op, **args) == {"method": expected[0]}
    assert fake.calls == [expected] and daemon.fake.calls == []


def test_every_op_is_covered_by_a_round_trip() -> None:
    tested = {r[0] for r in ROUND_TRIPS} | {"pool.list", "daemon.ping", "daemon.stop"}
    tested |= {"op.progress"}  # tests/host/test_progress.py
    tested |= {r[0] for r in SCHEDULE_ROUND_TRIPS}
    assert tested == set(proto.OPS) - {o for o in proto.OPS if o.startswith("replication.")}


def test_many_requests_on_one_connection(daemon: Daemon) -> None:
    with daemon.client() as c:
        for i in range(20):
            assert c.call("pool.list") == [{"name": "p"}]
            assert c.call("volume.create", pool="p", vol=f"v{i}", size=1)["name"] == f"v{i}"


def test_ping(daemon: Daemon) -> None:
    with daemon.client() as c:
        r = c.call("daemon.ping")
    assert r["protocol"] == proto.VERSION and r["pid"] == os.getpid()
    assert daemon.fake.calls == []


# --------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json\n", proto.E_BAD_REQUEST),
        (b"\xff\xfe\n", proto.E_BAD_REQUEST),
        (b"[1, 2]\n", proto.E_BAD_REQUEST),
        (b'{"v": 1, "id": true, "op": "status"}\n', proto.E_BAD_REQUEST),
        (b'{"v": 1, "id": 5, "op": 3}\n', proto.E_BAD_REQUEST),
        (b'{"v": 1, "id": 5, "op": "status", "args": [1]}\n', proto.E_BAD_REQUEST),
        (b'{"v": 2, "id": 5, "op": "status"}\n', proto.E_BAD_VERSION),
        (b'{"id": 5, "op": "status"}\n', proto.E_BAD_VERSION),
        (b'{"v": 1, "id": 5, "op": "pool.explode"}\n', proto.E_UNKNOWN_OP),
    ],
)
def test_bad_request_gets_error_and_connection_survives(daemon: Daemon, line, code) -> None:
    with daemon.raw() as s:
        f = s.makefile("rb")
        s.sendall(line)
        r = json.loads(f.readline())
        assert r["v"] == proto.VERSION and r["ok"] is False
        assert r["error"]["code"] == code, r
        if b'"id": 5' in line:
            assert r["id"] == 5
        # Same connection, next request: still served.
        s.sendall(proto.request(9, "daemon.ping", {}))
        r2 = json.loads(f.readline())
        assert r2["ok"] and r2["id"] == 9
    assert daemon.fake.calls == []


def test_oversized_line_is_refused_without_crash(daemon: Daemon) -> None:
    with daemon.raw() as s:
        big = b'{"v":1,"id":1,"op":"status","args":{"x":"' + b"a" * proto.MAX_REQUEST + b'"}}\n'
        with contextlib.suppress(OSError):  # the daemon may hang up before reading it all
            s.sendall(big)
        r = json.loads(s.makefile("rb").readline())
        assert r["ok"] is False and r["error"]["code"] == proto.E_BAD_REQUEST
        assert "longer than" in r["error"]["message"]
    with daemon.client() as c:  # the daemon is fine
        assert c.call("daemon.ping")["protocol"] == proto.VERSION
    assert daemon.fake.calls == []


@pytest.mark.parametrize(
    ("op", "args", "fragment"),
    [
        ("pool.create", {"name": "bad name"}, "may only contain"),
        ("pool.create", {"name": "_x"}, "must not start"),
        ("pool.create", {"name": "x" * 49}, "longer than 48"),
        ("pool.create", {"name": "p", "backend": "zfs"}, "expected one of thin, classic"),
        ("pool.create", {"name": "p", "data": "relative/dev"}, "absolute device path"),
        ("pool.create", {"name": "p", "size": 0}, "must be positive"),
        ("pool.create", {"name": "p", "size": "12X"}, "expected a number"),
        ("pool.create", {"name": "p", "size": True}, "size in bytes"),
        ("pool.create", {"name": "p", "color": "red"}, "unknown argument(s) color"),
        ("pool.show", {}, "missing argument name"),
        ("pool.destroy", {"name": "p", "force": "yes"}, "true or false"),
        ("pool.repair", {"name": "p"}, "missing argument discard_after"),
        ("pool.repair", {"name": "p", "discard_after": 0}, "journal record number"),
        ("volume.create", {"pool": "p", "vol": "v"}, "missing argument size"),
        ("volume.create", {"pool": "p", "vol": "a/b", "size": 1}, "volume name"),
        ("snapshot.create", {"refs": [], "name": "s"}, "non-empty list"),
        ("snapshot.create", {"refs": [["p", "v"], ["p", "v"]], "name": "s"}, "named twice"),
        ("snapshot.create", {"refs": [["p", "v"]], "name": "s@x"}, "snapshot name"),
        ("snapshot.create", {"refs": [["p", "v"]], "name": "s", "labels": {"": "x"}}, "label"),
        ("snapshot.list", {"vol": "v"}, "vol needs pool"),
        ("daemon.stop", {"teardown": 1}, "true or false"),
    ],
)
def test_arguments_are_checked_in_the_daemon(daemon: Daemon, op, args, fragment) -> None:
    with daemon.client() as c, pytest.raises(InvalidArgument) as ei:
        c.call(op, **args)
    assert fragment in str(ei.value)
    assert ei.value.exit_code == 2
    assert daemon.fake.calls == []


# ---------------------------------------------------------- error mapping


@pytest.mark.parametrize("exc", [NotFound, AlreadyExists, Busy, InvalidArgument, UserError])
def test_user_errors_keep_their_class_and_message(daemon: Daemon, exc) -> None:
    daemon.fake.fail = exc("pool 'p' says no")
    with daemon.client() as c, pytest.raises(exc) as ei:
        c.call("pool.show", name="p")
    assert type(ei.value) is exc
    assert ei.value.message == "pool 'p' says no"
    assert ei.value.code == exc.code


def test_name_error_from_manager_is_invalid(daemon: Daemon) -> None:
    daemon.fake.fail = BadName("volume name 'x' is odd")
    with daemon.client() as c, pytest.raises(InvalidArgument, match="is odd"):
        c.call("volume.show", pool="p", vol="x")


def test_unexpected_exception_is_internal_and_daemon_survives(daemon: Daemon) -> None:
    daemon.fake.fail = RuntimeError("boom")
    with daemon.client() as c:
        with pytest.raises(UserError) as ei:
            c.call("status")
        assert ei.value.code == proto.E_INTERNAL and ei.value.exit_code == 70
        assert "boom" in ei.value.message
        daemon.fake.fail = None
        assert c.call("status")["pools"] == []


def test_missing_socket_is_unavailable(short_dir: Path) -> None:
    path = short_dir / "none.sock"
    with pytest.raises(Unavailable) as ei:
        Client(str(path)).call("daemon.ping")
    assert str(ei.value) == (
        f"dmsnapd is not running (no socket at {path}); start it with: systemctl start dmsnapd"
    )


def test_refused_connection_is_unavailable(short_dir: Path) -> None:
    path = short_dir / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the node stays, nobody listens: ECONNREFUSED
    with pytest.raises(Unavailable, match="dmsnapd is not running"):
        Client(str(path)).call("daemon.ping")


# ------------------------------------------------------------ concurrency


def test_concurrent_clients_are_not_held_behind_each_other(daemon: Daemon) -> None:
    """The server adds no lock of its own: the Manager's one control lock,
    taken inside each operation, serialises what must be (and is released
    while a --wait snapshot waits; tests/kernel/test_control_lock.py)."""
    daemon.fake.delay = 0.2
    errors: list[BaseException] = []
    results: list[Any] = []

    def worker(i: int) -> None:
        try:
            with daemon.client() as c:
                for j in range(3):
                    results.append(c.call("volume.create", pool="p", vol=f"v{i}-{j}", size=1))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    with daemon.client() as c:
        assert c.call("daemon.ping")
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert len(results) == 24 and len(daemon.fake.calls) == 24
    assert daemon.fake.max_active > 1


# ------------------------------------------------------------------ access


def test_socket_is_0660(daemon: Daemon) -> None:
    st = os.stat(daemon.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660


def test_peer_not_allowed_is_denied(short_dir: Path) -> None:
    d = start_daemon(short_dir / "d.sock", PeerPolicy(frozenset({4242424}), None))
    try:
        with d.client() as c, pytest.raises(PermissionDenied) as ei:
            c.call("pool.create", name="p")
        assert "only root may use dmsnapd" in ei.value.message
        assert ei.value.exit_code == 13
        # Even a malformed first line gets "denied", not a parse error.
        with d.raw() as s:
            r = exchange(s, b"garbage\n")
            assert r["error"]["code"] == "denied"
    finally:
        stop_daemon(d)
    assert d.fake.calls == []


def test_peer_policy_group_membership() -> None:
    me = os.getpid()
    pol = PeerPolicy(frozenset(), 31337, "dmsnap")
    assert pol.allows(me, 5000, 31337)  # primary group
    assert not pol.allows(me, 5000, 5000) or 31337 in os.getgroups()
    assert PeerPolicy(frozenset({0}), None).allows(me, 0, 0)
    assert not PeerPolicy(frozenset({0}), None).allows(me, 1000, 1000)
    # Supplementary groups come from /proc/PID/status.
    groups = [g for g in os.getgroups() if g != os.getgid()]
    if groups:
        assert PeerPolicy(frozenset(), groups[0]).allows(me, 5000, 5000)


def test_stale_socket_is_replaced_live_one_is_not(short_dir: Path) -> None:
    path = short_dir / "d.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    d = start_daemon(path)  # stale: replaced
    try:
        other = Server(str(path), policy=PeerPolicy(ME))
        with pytest.raises(Busy, match="in use by another dmsnapd"):
            other.bind()
        other.close()
        with d.client() as c:  # and the live one was left alone
            assert c.call("daemon.ping")
    finally:
        stop_daemon(d)
    assert not path.exists()


def test_regular_file_at_socket_path_is_not_replaced(short_dir: Path) -> None:
    path = short_dir / "d.sock"
    path.write_text("precious")
    with pytest.raises(UserError, match="not a socket"):
        Server(str(path)).bind()
    assert path.read_text() == "precious"


# -------------------------------------------------------------- state lock


def test_state_lock_is_exclusive_and_names_the_holder(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with acquire_state_lock(str(state)):
        assert (state / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(AlreadyRunning) as ei:
            acquire_state_lock(str(state))
        assert str(ei.value) == f"another dmsnapd is running on {state} (pid {os.getpid()})"
    with acquire_state_lock(str(state)):  # released with the fd
        pass


def test_second_daemon_on_same_state_dir_exits_1_and_changes_nothing(
    tmp_path: Path, short_dir: Path
) -> None:
    state = tmp_path / "state"
    sock = short_dir / "d.sock"
    with acquire_state_lock(str(state)):
        before = {p.name: p.read_bytes() for p in state.iterdir()}
        r = subprocess.run(
            [sys.executable, "-m", "dmsnap.daemon.main", "--state-dir", str(state)],
            env={**os.environ, "DMSNAP_SOCKET": str(sock)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        after = {p.name: p.read_bytes() for p in state.iterdir()}
    assert r.returncode == 1, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].endswith(f"another dmsnapd is running on {state} (pid {os.getpid()})")
    assert before == after
    assert not sock.exists()


def test_dmsnapd_console_script_refuses_too(tmp_path: Path, short_dir: Path) -> None:
    exe = Path(sys.executable).with_name("dmsnapd")
    if not exe.exists():
        pytest.skip("dmsnapd console script not installed in this environment")
    state = tmp_path / "state"
    with acquire_state_lock(str(state)):
        r = subprocess.run(
            [str(exe), "--state-dir", str(state), "--socket", str(short_dir / "d.sock")],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 1
    assert "another dmsnapd is running on" in r.stderr


# ------------------------------------------------------- lifecycle, notify


class NotifyListener:
    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def collect(self, until: str, timeout: float = 10) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(until in m for m in self.messages):
                return self.messages
            with contextlib.suppress(TimeoutError):
                self.messages.append(self.sock.recv(4096).decode())
        raise AssertionError(f"no {until!r} in {self.messages}")

    def close(self) -> None:
        self.sock.close()


def _run_in_thread(
    state: Path, sock: Path, notifier: Notifier, factory: Any = FakeManager
) -> tuple[threading.Thread, list[Any], list[int]]:
    managers: list[Any] = []
    rc: list[int] = []

    def make(state_dir: str) -> Any:
        m = factory(state_dir)
        managers.append(m)
        return m

    def target() -> None:
        rc.append(
            run_daemon(
                str(state),
                str(sock),
                manager_factory=make,
                notifier=notifier,
                policy=PeerPolicy(ME),
                install_signals=False,
            )
        )

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, managers, rc


def _wait_for(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_lifecycle(tmp_path: Path, short_dir: Path, abstract: bool) -> None:
    if abstract:
        name = f"dmsnap-test-{os.getpid()}-{time.monotonic_ns()}"
        listener = NotifyListener(b"\0" + name.encode())
        env = {"NOTIFY_SOCKET": "@" + name}
    else:
        listener = NotifyListener(str(short_dir / "notify"))
        env = {"NOTIFY_SOCKET": str(short_dir / "notify")}
    env["WATCHDOG_USEC"] = "100000"  # 0.1 s: pings every 50 ms
    sock = short_dir / "d.sock"
    try:
        t, managers, rc = _run_in_thread(tmp_path / "state", sock, Notifier(env))
        listener.collect("READY=1")
        listener.collect("WATCHDOG=1")
        with Client(str(sock), timeout=10) as c:
            assert c.call("daemon.stop") == {"stopping": True, "teardown": False}
        t.join(timeout=10)
        msgs = listener.collect("STOPPING=1")
    finally:
        listener.close()
    assert rc == [0]
    assert msgs[0] == "STATUS=assembling"
    ready = next(m for m in msgs if "READY=1" in m)
    assert "STATUS=serving 1 pool" in ready
    assert msgs.index(ready) < next(i for i, m in enumerate(msgs) if "STOPPING=1" in m)
    # A plain stop keeps the devices: no teardown, but the manager is closed.
    assert managers[0].names() == ["assemble", "close"]
    assert not sock.exists()


def test_daemon_stop_with_teardown(tmp_path: Path, short_dir: Path) -> None:
    sock = short_dir / "d.sock"
    t, managers, rc = _run_in_thread(tmp_path / "state", sock, Notifier({}))
    _wait_for(sock)
    with Client(str(sock), timeout=10) as c:
        c.call("daemon.ping")  # serving (the socket exists before assembly)
        assert c.call("daemon.stop", teardown=True)["teardown"] is True
    t.join(timeout=10)
    assert rc == [0]
    assert managers[0].names() == ["assemble", "teardown", "close"]
    assert not sock.exists()


def test_assembly_user_error_keeps_serving(tmp_path: Path, short_dir: Path) -> None:
    class Degraded(FakeManager):
        def assemble(self) -> dict[str, Any]:
            raise Unavailable("pool p: data device /dev/sdz is missing")

    listener = NotifyListener(str(short_dir / "notify"))
    sock = short_dir / "d.sock"
    try:
        t, _, rc = _run_in_thread(
            tmp_path / "state",
            sock,
            Notifier({"NOTIFY_SOCKET": str(short_dir / "notify")}),
            Degraded,
        )
        msgs = listener.collect("READY=1")
        assert "assembly incomplete: pool p: data device /dev/sdz is missing" in msgs[-1]
        with Client(str(sock), timeout=10) as c:
            assert c.call("status")
            c.call("daemon.stop")
        t.join(timeout=10)
    finally:
        listener.close()
    assert rc == [0]


def test_manager_that_cannot_open_exits_1_and_removes_socket(
    tmp_path: Path, short_dir: Path
) -> None:
    def broken(state_dir: str) -> Any:
        raise UserError("catalog is from a newer dmsnap")

    sock = short_dir / "d.sock"
    t, _, rc = _run_in_thread(tmp_path / "state", sock, Notifier({}), broken)
    t.join(timeout=10)
    assert rc == [1]
    assert not sock.exists()


SIGTERM_SCRIPT = """
import sys, time
from dmsnap.daemon.main import run_daemon, setup_logging
from dmsnap.daemon.server import PeerPolicy

state, sock, log = sys.argv[1:4]

class Fake:
    def __init__(self, state_dir):
        pass
    def _note(self, what):
        with open(log, "a") as f:
            f.write(what + "\\n")
    def assemble(self):
        self._note("assemble")
    def pool_list(self):
        return []
    def status(self):
        self._note("status-start")
        time.sleep(1.0)
        self._note("status-end")
        return {"slow": True}
    def teardown(self):
        self._note("teardown")
    def close(self):
        self._note("close")

setup_logging("debug")
sys.exit(run_daemon(state, sock, manager_factory=Fake, policy=PeerPolicy(frozenset({0, %d}))))
"""


def test_sigterm_finishes_in_flight_request_and_keeps_devices(
    tmp_path: Path, short_dir: Path
) -> None:
    script = tmp_path / "fake_daemon.py"
    script.write_text(textwrap.dedent(SIGTERM_SCRIPT % os.getuid()))
    sock = short_dir / "d.sock"
    log = tmp_path / "calls"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("JOURNAL_STREAM", None)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "state"), str(sock), str(log)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (log.exists() and "assemble" in log.read_text()):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.02)
        _wait_for(sock)
        result: list[Any] = []
        c = Client(str(sock))
        worker = threading.Thread(target=lambda: result.append(c.call("status")))
        worker.start()
        while "status-start" not in log.read_text():
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        worker.join(timeout=10)
        c.close()
        assert result == [{"slow": True}]  # answered although SIGTERM came mid-request
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr = proc.stderr.read() if proc.stderr else ""
    assert log.read_text().split() == ["assemble", "status-start", "status-end", "close"]
    assert not sock.exists()
    assert "stopping" in stderr and "Traceback" not in stderr


def test_journald_format_has_priority_and_no_timestamp() -> None:
    import logging

    fmt = _JournalFormatter("%(message)s")
    rec = logging.LogRecord("dmsnapd", logging.ERROR, __file__, 1, "disk %s gone", ("sdb",), None)
    assert fmt.format(rec) == "<3>disk sdb gone"
    rec = logging.LogRecord("dmsnapd", logging.INFO, __file__, 1, "a\nb", (), None)
    assert fmt.format(rec) == "<6>a\n<6>b"


def test_notifier_without_socket_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled and n.send("READY=1") is False
    n.start_watchdog()  # no thread without NOTIFY_SOCKET
    assert n._thread is None


def test_watchdog_pid_for_someone_else_is_ignored() -> None:
    n = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert n.watchdog_usec == (1000 if os.getpid() == 1 else 0)


def test_worker_nice_option_validates_and_reads_the_environment(monkeypatch, capsys):
    from dmsnap.daemon.main import parse_args

    monkeypatch.delenv("DMSNAP_WORKER_NICE", raising=False)
    assert parse_args([]).worker_nice == 5
    assert parse_args(["--worker-nice", "0"]).worker_nice == 0
    monkeypatch.setenv("DMSNAP_WORKER_NICE", "12")
    assert parse_args([]).worker_nice == 12
    for bad in ("20", "-1", "five"):
        with pytest.raises(SystemExit) as e:
            parse_args(["--worker-nice", bad])
        assert e.value.code == 2
        assert "--worker-nice" in capsys.readouterr().err
    monkeypatch.setenv("DMSNAP_WORKER_NICE", "x")
    with pytest.raises(SystemExit):
        parse_args([])
    assert "from 0 to 19" in capsys.readouterr().err


class FakeReplication:
    """The replication service (dmsnap.replication.service.Replication) as
    the server sees it: send writes to the passed descriptor, receive reads
    from it, so a test sees the bytes cross the way the CLI's do."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, method: str) -> Any:
        def call(*a: Any, **kw: Any) -> dict[str, Any]:
            fd = kw.pop("fd", None)
            self.calls.append((method, a, kw))
            out: dict[str, Any] = {"method": method}
            if method == "send":
                os.write(fd, b"stream of " + "/".join(a).encode())
            elif method == "receive":
                out["got"] = os.read(fd, 100).decode()
            return out

        return call


REPLICATION_ROUND_TRIPS = [
    (
        "replication.send",
        {"pool": "p", "vol": "v", "snap": "s", "base": "b"},
        ("send", ("p", "v", "s"), {"base": "b"}),
    ),
    (
        "replication.receive",
        {"pool": "p", "vol": "v", "force": True},
        ("receive", ("p", "v"), {"force": True}),
    ),
    ("replication.state", {"pool": "p", "vol": "v"}, ("state", ("p", "v"), {})),
    ("replication.abort", {"pool": "p", "vol": "v"}, ("abort", ("p", "v"), {})),
    (
        "replication.hold",
        {"pool": "p", "vol": "v", "snap": "s", "target": "t"},
        ("hold", ("p", "v", "s", "t"), {}),
    ),
    (
        "replication.release",
        {"pool": "p", "vol": "v", "target": "t"},
        ("release", ("p", "v", "t"), {}),
    ),
    ("replication.holds", {"pool": "p", "vol": "v"}, ("holds", ("p", "v"), {})),
]


def test_every_replication_op_is_covered() -> None:
    tested = {r[0] for r in ROUND_TRIPS} | {"pool.list", "daemon.ping", "daemon.stop"}
    tested |= {r[0] for r in SCHEDULE_ROUND_TRIPS} | {r[0] for r in REPLICATION_ROUND_TRIPS}
    tested |= {"op.progress"}  # tests/host/test_progress.py
    assert tested == set(proto.OPS)


@pytest.mark.parametrize(
    ("op", "args", "expected"),
    REPLICATION_ROUND_TRIPS,
    ids=[r[0] for r in REPLICATION_ROUND_TRIPS],
)
def test_replication_ops_reach_the_service_with_their_stream(
    daemon: Daemon, op, args, expected
) -> None:
    fake = daemon.server.services["replication"] = FakeReplication()
    r, w = os.pipe()
    try:
        if op == "replication.receive":
            os.write(w, b"a stream")
            os.close(w)
            w = -1
        fds = [w if op == "replication.send" else r] if proto.OPS[op].fd else None
        with daemon.client() as c:
            result = c.call(op, fds=fds, **args)
        assert fake.calls == [expected] and daemon.fake.calls == []
        if op == "replication.send":
            os.close(w)
            w = -1
            assert os.read(r, 100) == b"stream of p/v/s"
        if op == "replication.receive":
            assert result["got"] == "a stream"
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)


def test_a_stream_op_without_its_descriptor_is_refused(daemon: Daemon) -> None:
    fake = daemon.server.services["replication"] = FakeReplication()
    with daemon.client() as c, pytest.raises(UserError, match="file descriptor"):
        c.call("replication.receive", pool="p", vol="v")
    with daemon.client() as c, pytest.raises(UserError, match="fd"):
        c.call("replication.send", pool="p", vol="v", snap="s", fd=1)
    assert fake.calls == []


def test_descriptors_passed_with_another_op_are_closed(daemon: Daemon) -> None:
    """A client cannot make dmsnapd keep descriptors: those that came with
    a request are closed once it is answered (the pipe's write end then has
    no holder left, so its reader sees the end)."""
    r, w = os.pipe()
    try:
        with daemon.client() as c:
            c.call("status", fds=[w, w])
        os.close(w)
        w = -1
        assert os.read(r, 10) == b""
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
