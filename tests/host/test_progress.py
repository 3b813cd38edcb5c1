"""Progress of long work (docs/cli.md, "Progress"), without a kernel.

The real server runs in front of a fake Manager whose pool creation reports
through dmsnap.progress, as the storage core does, and holds a lock the
whole time, as the Manager's control lock is held through a classic merge:
the progress is read over the socket while it runs. The CLI is run as a
process with its stderr on a pseudo-terminal (a bar), a pipe (nothing), or
a pipe with --progress (lines), and its --json stdout is checked to be
JSON alone. The real storage core's reports are checked in the VM
(tests/kernel/test_progress.py).
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmsnap import cli_progress, progress
from dmsnap.client import Client
from dmsnap.daemon import protocol as proto
from dmsnap.daemon.progress import Registry
from dmsnap.daemon.server import PeerPolicy, Server
from dmsnap.errors import Busy, InvalidArgument, NotFound

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]


class SlowManager:
    """pool_create zeroes ``pieces`` MiB, one per ``step`` seconds, holding
    its lock throughout; ``gate`` (if set) must open before it starts."""

    def __init__(self, pieces: int = 8, step: float = 0.05) -> None:
        self.lock = threading.RLock()
        self.pieces, self.step = pieces, step
        self.gate: threading.Event | None = None
        self.started = threading.Event()

    def pool_create(self, name: str, **kw: Any) -> dict[str, Any]:
        with self.lock:
            self.started.set()
            if self.gate is not None:
                assert self.gate.wait(10)
            steps = progress.task("building the pool", total=2, unit="steps")
            task = progress.task("zeroing", total=self.pieces * MiB)
            for i in range(self.pieces):
                time.sleep(self.step)
                task.update((i + 1) * MiB)
            steps.advance(2)
        return {"name": name, "backend": "thin", "size": 64 * MiB, "journal": {"mode": "nv"}}

    def pool_destroy(self, name: str, *, force: bool = False) -> None:
        raise Busy(f"pool {name} still has 1 volume(s); delete them or use --force")

    def pool_list(self) -> list[dict[str, Any]]:
        return []


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="dmsnap-p"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def served(short_dir: Path) -> Iterator[tuple[Path, SlowManager]]:
    path = short_dir / "d.sock"
    server = Server(str(path), policy=PeerPolicy(frozenset({os.getuid()})))
    server.bind()
    mgr = SlowManager()
    t = threading.Thread(target=server.serve, args=(mgr,), daemon=True)
    t.start()
    yield path, mgr
    server.request_stop()
    t.join(timeout=10)
    server.close()


# ----------------------------------------------------------------- the interface


def test_reports_without_a_listener_cost_nothing_and_go_nowhere() -> None:
    assert not progress.listening()
    t = progress.task("zeroing", total=10)
    t.advance(10)  # no sink: nothing to fail
    progress.report("x", 1, 2)


def test_a_sink_gets_the_phases_and_the_end_even_when_rate_limited() -> None:
    seen: list[tuple[str, int, int | None, str]] = []
    with progress.reporting_to(lambda *a: seen.append(a)):
        t = progress.task("zeroing", total=1000)
        for _ in range(1000):
            t.advance()  # far faster than MIN_INTERVAL: most are not sent
        s = progress.task("steps", total=3, unit="steps")
        s.advance()
        s.advance()
    assert seen[0] == ("zeroing", 0, 1000, "bytes")
    assert ("zeroing", 1000, 1000, "bytes") in seen
    assert len([x for x in seen if x[0] == "zeroing"]) < 100
    assert seen[-3:] == [("steps", n, 3, "steps") for n in (0, 1, 2)]
    with pytest.raises(ValueError, match="progress unit"):
        progress.task("x", unit="furlongs")


def test_bind_carries_the_sink_into_another_thread() -> None:
    seen: list[Any] = []
    with progress.reporting_to(lambda *a: seen.append(a)):
        t = threading.Thread(target=progress.bind(lambda: progress.report("sending", 5, 9)))
    t.start()
    t.join()
    assert seen == [("sending", 5, 9, "bytes")]


def test_registry_entries_end_done_or_failed_and_expire() -> None:
    reg = Registry(keep_done=0.2, max_done=2)
    with reg.track("a", "pool.create"):
        progress.report("zeroing", 3, 8)
        assert reg.get("a")["state"] == "running"
        with pytest.raises(Busy, match="already in use"), reg.track("a", "pool.create"):
            pass
    a = reg.get("a")
    assert (a["state"], a["phase"], a["done"], a["total"], a["op"]) == (
        "done",
        "zeroing",
        3,
        8,
        "pool.create",
    )
    with pytest.raises(RuntimeError), reg.track("b", "snapshot.restore"):
        raise RuntimeError("boom")
    assert reg.get("b")["state"] == "failed"
    for tok in "cde":  # beyond max_done: the oldest go
        with reg.track(tok, "pool.destroy"):
            pass
    with pytest.raises(NotFound, match="progress token 'a'"):
        reg.get("a")
    time.sleep(0.3)
    with pytest.raises(NotFound):
        reg.get("e")


def test_a_bad_progress_token_is_refused_before_the_manager() -> None:
    line = proto.encode({"v": 1, "id": 1, "op": "pool.list", "args": {}, "progress": 7})
    with pytest.raises(proto.ProtocolError, match="progress: expected a string") as e:
        proto.parse_request(line)
    assert e.value.code == InvalidArgument.code
    line = proto.request(1, "pool.create", {"name": "p"}, progress="tok")
    assert proto.parse_request(line).progress == "tok"


# -------------------------------------------------------------- over the socket


def test_progress_is_read_on_another_connection_while_the_request_runs(
    served: tuple[Path, SlowManager],
) -> None:
    path, mgr = served
    mgr.gate = threading.Event()
    done: dict[str, Any] = {}

    def long() -> None:
        with Client(str(path), timeout=20) as c:
            done["r"] = c._call("pool.create", {"name": "p"}, progress="tok1")

    t = threading.Thread(target=long)
    t.start()
    assert mgr.started.wait(5)
    seen = []
    with Client(str(path), timeout=5) as c:
        # the request holds the manager's lock and has not reported yet
        p = c.call("op.progress", token="tok1")
        assert (p["state"], p["op"], p["done"], p["total"]) == ("running", "pool.create", 0, None)
        mgr.gate.set()
        while True:
            p = c.call("op.progress", token="tok1")
            seen.append(p)
            if p["state"] != "running":
                break
            time.sleep(0.02)
    t.join(10)
    assert done["r"]["name"] == "p"
    zeroing = [(p["done"], p["total"]) for p in seen if p["phase"] == "zeroing"]
    assert len(zeroing) >= 3, seen  # seen while it ran, more than once
    assert [d for d, _ in zeroing] == sorted(d for d, _ in zeroing)
    assert all(total == 8 * MiB for _, total in zeroing)
    assert 0 < zeroing[0][0] < 8 * MiB or zeroing[1][0] < 8 * MiB
    last = seen[-1]
    assert (last["state"], last["phase"], last["done"], last["total"], last["unit"]) == (
        "done",
        "building the pool",
        2,
        2,
        "steps",
    )


def test_call_watched_reports_while_running_and_the_end(
    served: tuple[Path, SlowManager],
) -> None:
    path, _ = served
    seen: list[dict[str, Any]] = []
    with Client(str(path), timeout=20) as c:
        r = c.call_watched("pool.create", seen.append, interval=0.02, name="p")
    assert r["name"] == "p"
    assert sum(1 for p in seen if p["state"] == "running") >= 3
    assert seen[-1]["state"] == "done" and seen[-1]["done"] == seen[-1]["total"]


# ------------------------------------------------------------------------ the CLI


def _dmsnap(
    path: Path, *args: str, tty: bool, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run the CLI; stderr on a pseudo-terminal or a pipe."""
    e = {k: v for k, v in os.environ.items() if k != "DMSNAP_PROGRESS"}
    e.update({"DMSNAP_SOCKET": str(path), "COLUMNS": "120", **(env or {})})
    cmd = [sys.executable, "-c", "from dmsnap.cli import main; main()", *args]
    if not tty:
        p = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=60, cwd=REPO)
        return p.returncode, p.stdout, p.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        cmd, env=e, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, cwd=REPO
    )
    os.close(slave)
    err = bytearray()
    while True:
        r, _, _ = select.select([master], [], [], 30)
        if not r:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        err += chunk
    out = proc.stdout.read().decode() if proc.stdout else ""
    rc = proc.wait(30)
    os.close(master)
    return rc, out, err.decode(errors="replace")


def test_cli_on_a_terminal_shows_a_bar_with_rate_and_the_end(
    served: tuple[Path, SlowManager],
) -> None:
    path, mgr = served
    mgr.pieces, mgr.step = 10, 0.1
    rc, out, err = _dmsnap(path, "pool", "create", "p", tty=True)
    assert rc == 0, err
    assert out.startswith("created pool p")
    assert "pool create p: zeroing" in err
    assert "10M/10M" in err  # it ended at its total
    assert "/s" in err  # a rate
    assert "\x1b[" in err  # drawn for a terminal


def test_cli_in_a_script_is_quiet(served: tuple[Path, SlowManager]) -> None:
    path, _ = served
    rc, out, err = _dmsnap(path, "pool", "create", "p", tty=False)
    assert (rc, err) == (0, "")
    assert out.startswith("created pool p")


def test_cli_no_progress_and_json_keep_a_terminal_quiet(
    served: tuple[Path, SlowManager],
) -> None:
    path, _ = served
    rc, out, err = _dmsnap(path, "--no-progress", "pool", "create", "p", tty=True)
    assert (rc, err) == (0, "")
    rc, out, err = _dmsnap(path, "pool", "create", "p", "--json", tty=True)
    assert (rc, err) == (0, "")
    assert json.loads(out)["name"] == "p"
    rc, out, err = _dmsnap(path, "pool", "create", "p", tty=True, env={"DMSNAP_PROGRESS": "0"})
    assert (rc, err) == (0, "")


def test_cli_progress_forced_in_a_log_writes_lines_and_json_stays_alone(
    served: tuple[Path, SlowManager],
) -> None:
    path, _ = served
    rc, out, err = _dmsnap(path, "--progress", "pool", "create", "p", "--json", tty=False)
    assert rc == 0, err
    assert json.loads(out)["name"] == "p"  # stdout: the JSON document and nothing else
    lines = err.splitlines()
    assert all(x.startswith("dmsnap: pool create p: ") for x in lines), lines
    zeroing = [x for x in lines if ": zeroing " in x]
    assert zeroing[-1] == "dmsnap: pool create p: zeroing 8M/8M (100%)", lines
    assert len(zeroing) == len(set(zeroing))  # no line twice
    assert "\x1b[" not in err
    assert lines[-1] == "dmsnap: pool create p: building the pool 2/2 steps (100%)"


def test_cli_failed_long_request_is_still_one_line(served: tuple[Path, SlowManager]) -> None:
    path, _ = served
    rc, _, err = _dmsnap(path, "pool", "destroy", "p", "--yes", tty=False)
    assert rc == Busy.exit_code
    assert err == "dmsnap: pool p still has 1 volume(s); delete them or use --force\n"


def test_line_view_limits_its_rate_and_keeps_the_last() -> None:
    class Buf:
        def __init__(self) -> None:
            self.text = ""

        def write(self, s: str) -> None:
            self.text += s

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return False

    buf = Buf()
    view = cli_progress.choose("restore p/v@s", True, False, buf)  # type: ignore[arg-type]
    assert isinstance(view, cli_progress.LineView)
    with view:
        for d in range(0, 101):
            view.update({"phase": "merging", "done": d * MiB, "total": 100 * MiB, "unit": "bytes"})
    lines = buf.text.splitlines()
    assert lines[0] == "dmsnap: restore p/v@s: merging 0B/100M (0%)"
    assert lines[-1] == "dmsnap: restore p/v@s: merging 100M/100M (100%)"
    assert len(lines) < 10
    assert type(cli_progress.choose("x", None, False, buf)) is cli_progress.View  # type: ignore[arg-type]


def test_trials_line_says_where_a_campaign_is_and_how_long_it_may_take() -> None:
    t = cli_progress.Trials("kill", 20)
    assert t.line(0, now=t.t0 + 1) == "kill: 0/20 trials (0%), 1s elapsed"
    assert t.line(5, now=t.t0 + 75) == "kill: 5/20 trials (25%), 1m15s elapsed, about 3m45s left"
    b = cli_progress.Trials("crash", 4, budget=100)
    assert b.line(1, now=b.t0 + 90).endswith("about 10s left")  # the budget ends it first
