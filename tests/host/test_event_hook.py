"""dmsnapd --on-event: the administrator's command hears every health
problem that appears or clears, in order, with the event in its
environment; a failing or missing command is logged, never fatal."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from dmsnap.daemon import main as daemon_main
from dmsnap.daemon.devwatch import EventHook
from dmsnap.daemon.events import HealthWatcher


def _wait_lines(path: Path, n: int) -> list[str]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if path.exists() and len(lines := path.read_text().splitlines()) >= n:
            return lines
        time.sleep(0.05)
    raise AssertionError(f"{path}: fewer than {n} lines")


def test_problems_and_recoveries_reach_the_hook_in_order(tmp_path: Path) -> None:
    out = tmp_path / "events"
    script = tmp_path / "hook.sh"
    script.write_text(f'#!/bin/sh\necho "$1|$DMSNAP_EVENT|$DMSNAP_POOL|$DMSNAP_MESSAGE" >> {out}\n')
    script.chmod(0o755)
    hook = EventHook(f"'{script}' arg1")
    w = HealthWatcher(lambda: [], on_change=hook)
    w.update(["pool p: data 91% full", "pool q: journal not running"])
    w.update(["pool p: data 92% full"])  # same problem, new figure: no event
    w.update([])
    assert _wait_lines(out, 4) == [
        "arg1|problem|p|pool p: data 91% full",
        "arg1|problem|q|pool q: journal not running",
        "arg1|recovered|q|pool q: journal not running",
        "arg1|recovered|p|pool p: data 92% full",
    ]


def test_a_failing_hook_is_logged_and_the_watcher_goes_on(tmp_path: Path, caplog) -> None:
    hook = EventHook(str(tmp_path / "missing-command"))
    w = HealthWatcher(lambda: [], on_change=hook)
    with caplog.at_level(logging.ERROR, logger="dmsnap.events"):
        w.update(["pool p: journal not running"])
        deadline = time.monotonic() + 10
        while "event hook" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "event hook" in caplog.text and "missing-command" in caplog.text
    assert w.known  # the problem is still tracked


def test_an_empty_on_event_is_refused_at_start_in_one_line(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.ERROR):
        rc = daemon_main.run_daemon(
            str(tmp_path / "state"), str(tmp_path / "s.sock"), on_event="  "
        )
    assert rc == 2 and "--on-event: empty command" in caplog.text
