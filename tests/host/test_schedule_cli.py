"""``dmsnap schedule ...`` through a real dmsnapd server whose schedules
service is the real Scheduler over a real catalog (the storage core behind
it is test_schedule_runner's model of the Manager's snapshot operations)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator

import pytest
from test_cli import nosock, one_line, run  # noqa: F401  (nosock: a fixture)
from test_schedule_runner import T0, Clock, Storage

from dmsnap.daemon.server import PeerPolicy, Server
from dmsnap.schedule.runner import Scheduler
from dmsnap.storage.catalog import Catalog


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Scheduler, Storage, Clock]]:
    d = tempfile.mkdtemp(prefix="dmsnap-sched")
    path = os.path.join(d, "d.sock")
    catalog = os.path.join(d, "catalog.db")
    cat = Catalog(catalog)
    cat.add_pool(
        "p", "thin", data_dev=None, cache_dev=None, size=1 << 30, cache_size=None, config={}
    )
    cat.close()
    clock = Clock(T0)
    storage = Storage(clock)
    sched = Scheduler(storage, catalog, clock=clock)
    server = Server(path, policy=PeerPolicy(frozenset({os.getuid()})))
    server.bind()
    server.services["schedules"] = sched
    t = threading.Thread(target=server.serve, args=(storage,), daemon=True)
    t.start()
    monkeypatch.setenv("DMSNAP_SOCKET", path)
    yield sched, storage, clock
    server.request_stop()
    t.join(timeout=10)
    server.close()
    sched.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["schedule", "create", "s", "--volumes", "p/a"], "exactly one of --every"),
        (["schedule", "create", "s", "--volumes", "p/a", "--every", "5x"], "--every '5x'"),
        (["schedule", "create", "s", "--volumes", "p", "--every", "5m"], "expected POOL/VOLUME"),
        (["schedule", "create", "s", "--volumes", "p/a,p/a", "--every", "5m"], "named twice"),
        (["schedule", "create", "-s", "--volumes", "p/a", "--every", "5m"], "No such option"),
        (["schedule", "create", ".s", "--volumes", "p/a", "--every", "5m"], "schedule name '.s'"),
        (
            ["schedule", "create", "s", "--volumes", "p/a", "--calendar", "*-02-30"],
            "matches no date",
        ),
        (
            ["schedule", "create", "s", "--volumes", "p/a", "--calendar", "daily", "--tz", "X/Y"],
            "unknown time zone",
        ),
        (
            ["schedule", "create", "s", "--volumes", "p/a", "--every", "1h", "--keep-daily", "0"],
            "--keep-daily 0",
        ),
        (
            ["schedule", "create", "s", "--volumes", "p/a", "--every", "1h", "--min-free", "0"],
            "--min-free 0",
        ),
        (["schedule", "show", "a/b"], "schedule name 'a/b'"),
    ],
)
def test_bad_input_rejected_before_contacting_daemon(capsys, nosock, argv, fragment) -> None:  # noqa: F811
    rc, out, err = run(capsys, *argv)
    line = one_line(err)
    assert rc == 2, err
    assert fragment in line and "not running" not in line
    assert out == ""


def test_create_list_show_pause_resume_delete(capsys, served) -> None:
    sched, storage, clock = served
    rc, out, err = run(
        capsys,
        "schedule", "create", "db", "--volumes", "p/a,p/b", "--calendar", "hourly",
        "--tz", "Europe/Berlin", "--keep-hourly", "24", "--keep-daily", "7", "--min-free", "10",
    )  # fmt: skip
    assert rc == 0, err
    assert out.strip() == (
        "created schedule db: calendar hourly (Europe/Berlin) of p/a, p/b; keeps hourly 24, "
        "daily 7; oldest go first below 10% free; next run 2026-12-07 11:00:00Z"
    )
    rc, _, err = run(capsys, "schedule", "create", "db", "--volumes", "p/a", "--every", "1h")
    assert rc == 4 and "already exists" in one_line(err)
    rc, _, err = run(capsys, "schedule", "create", "x", "--volumes", "p/zz", "--every", "1h")
    assert rc == 3 and "no volume p/zz" in one_line(err)

    for _ in range(3):
        clock.t += 3600
        sched.tick()
    storage.hand("by-hand")
    rc, out, _ = run(capsys, "schedule", "list")
    header, row = out.splitlines()
    assert header.split()[:4] == ["NAME", "VOLUMES", "WHEN", "KEEPS"]
    assert row.startswith("db ") and "p/a,p/b" in row and "active" in row
    assert row.split()[-1] == "3"
    rc, out, _ = run(capsys, "schedule", "show", "db", "--json")
    shown = json.loads(out)
    assert shown["runs"] == 3 and len(shown["snapshots"]) == 3
    assert [x["kept_by"] for x in shown["snapshots"]] == [
        ["hourly", "daily"],
        ["hourly"],
        ["newest", "hourly"],
    ]
    rc, out, _ = run(capsys, "schedule", "show", "db")
    assert "db-20261207T130000Z" in out and "newest,hourly" in out

    assert run(capsys, "schedule", "pause", "db")[1].strip() == "paused schedule db"
    assert json.loads(run(capsys, "schedule", "list", "--json")[1])[0]["paused"] is True
    clock.t += 3 * 3600
    sched.tick()
    assert len(storage.creates) == 3
    assert run(capsys, "schedule", "resume", "db")[1].strip() == "resumed schedule db"
    rc, out, _ = run(capsys, "schedule", "delete", "db")
    assert out.strip() == "deleted schedule db (its 3 snapshot(s) stay, no longer pruned)"
    assert run(capsys, "schedule", "list")[1].strip() == "no schedules"
    rc, _, err = run(capsys, "schedule", "show", "db")
    assert rc == 3 and one_line(err) == "dmsnap: no schedule 'db'"
    assert len(storage.groups()) == 4
