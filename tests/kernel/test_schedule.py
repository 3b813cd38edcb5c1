"""Target-side schedules on real snapshots (issue 21, docs/schedules.md).

A real dmsnapd runs a schedule every 3 seconds over two journaled volumes
while a writer keeps writing both: each run is ONE cut (one group, one
marker: the two snapshots hold the same generation or the write between),
retention prunes only what the schedule made (a snapshot made by hand
survives), pause stops it, and after dmsnapd was down for many slots it
catches up with exactly one snapshot. The CLI runs in-process against the
real daemon (see test_cli_e2e.py for why).
"""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import re
import struct
import threading
import time

from test_cli_e2e import daemon  # noqa: F401  (the fixture)
from test_storage import read

from dmsnap.client import Client
from dmsnap.errors import UserError

EVERY = 3
BLOCK = 4096  # O_DIRECT reads: whole logical blocks


def gen_block(n: int) -> bytes:
    return struct.pack("<Q", n) * (BLOCK // 8)


def gen_of(data: bytes) -> int:
    (n,) = struct.unpack_from("<Q", data)
    assert data == gen_block(n), "a torn or foreign block"
    return n


def mine(d, name: str = "every3") -> dict[int, list[dict]]:
    groups: dict[int, list[dict]] = {}
    for s in d.json("snapshot", "list", "s"):
        if s["labels"].get("dmsnap.target-schedule") == name:
            groups.setdefault(s["group"], []).append(s)
    return groups


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_schedule_creates_groups_prunes_and_catches_up(daemon, tmp_path):  # noqa: F811
    d = daemon
    d.cli("pool", "create", "s", "--size", "128M", "--journal-size", "8M")
    d.cli("volume", "create", "s/a", "--size", "4M")
    d.cli("volume", "create", "s/b", "--size", "4M")

    # A writer: generation n goes to a, then to b, in order through the
    # journal. One cut sees b at a's generation or one behind. (Its own
    # client: the in-process CLI redirects stdout, which is not per thread.)
    stop = threading.Event()

    def writer() -> None:
        n = 0
        with Client(d.sock, timeout=60) as c:
            while not stop.is_set():
                n += 1
                content = base64.b64encode(gen_block(n)).decode()
                for vol in ("a", "b"):
                    try:
                        c.call("volume.write", pool="s", vol=vol, offset=0, content=content)
                    except UserError:
                        return

    w = threading.Thread(target=writer, daemon=True)
    w.start()
    d.cli("snapshot", "create", "s/a,s/b", "by-hand", "--wait")
    made = d.json(
        "schedule", "create", "every3", "--volumes", "s/a,s/b", "--every", f"{EVERY}s",
        "--keep", "2",
    )  # fmt: skip
    assert made["volumes"] == ["s/a", "s/b"] and made["keeps"] == "newest 2"
    bad = d.cli(
        "schedule", "create", "x", "--volumes", "s/a", "--calendar", "Feb..Mon", check=False
    )
    assert bad.returncode == 2 and bad.stderr.startswith("dmsnap: weekday")

    shown = wait_for(
        lambda: (s := d.json("schedule", "show", "every3"))["runs"] >= 4 and s, 90, "4 runs"
    )
    stop.set()
    w.join(timeout=30)
    assert shown["failures"] == 0, shown["last_error"]

    # pause: no run for two intervals, nothing pruned (a run already under
    # way when the pause came finishes first)
    d.cli("schedule", "pause", "every3")
    time.sleep(EVERY + 2)
    runs = d.json("schedule", "show", "every3")["runs"]
    groups = mine(d)
    time.sleep(2 * EVERY + 1)
    assert d.json("schedule", "show", "every3")["runs"] == runs
    assert mine(d) == groups
    listed = d.json("schedule", "list")
    assert [(s["name"], s["paused"]) for s in listed] == [("every3", True)]

    # pruned to the newest two (a third may exist between a run and its prune)
    assert 2 <= len(groups) <= 3 and runs > len(groups), (runs, groups)
    for gid, members in groups.items():
        assert sorted(m["volume"] for m in members) == ["a", "b"], gid  # one group, both
        assert len({m["name"] for m in members}) == 1
    # the cut itself: both members at one point of the writer's order
    seen_gens = []
    for members in groups.values():
        name = members[0]["name"]
        gens = {}
        for vol in ("a", "b"):
            path = d.json("snapshot", "activate", f"s/{vol}@{name}")["path"]
            gens[vol] = gen_of(read(path, 0, BLOCK))
            d.cli("snapshot", "deactivate", f"s/{vol}@{name}")
        assert gens["a"] - gens["b"] in (0, 1), (name, gens)
        seen_gens.append(gens["a"])
    assert max(seen_gens) >= 2, seen_gens  # the writer was at work across the cuts
    names = {s["name"] for s in d.json("snapshot", "list", "s")}
    assert "by-hand" in names  # never pruned: the schedule did not make it
    d.cli("schedule", "resume", "every3")
    wait_for(lambda: d.json("schedule", "show", "every3")["runs"] > runs, 30, "a run after resume")

    # dmsnapd down for many slots: one catch-up snapshot for the latest, not a burst
    d.stop()
    down = time.time()
    time.sleep(4 * EVERY)
    seen = len(d.log.read_text())
    d.start()
    made_re = r"schedule every3: snapshot every3-(\d{8}T\d{6})Z"
    wait_for(lambda: len(re.findall(made_re, d.log.read_text()[seen:])) >= 2, 60, "catch-up")
    log = d.log.read_text()[seen:]
    made = re.findall(made_re, log)
    slots = [
        dt.datetime.strptime(m, "%Y%m%dT%H%M%S").replace(tzinfo=dt.UTC).timestamp() for m in made
    ]
    assert slots and slots[0] >= down + 3 * EVERY, (down, made)  # the latest missed slot
    assert all(b - a >= EVERY for a, b in itertools.pairwise(slots)), made
    assert re.search(r"schedule every3: (\d+) slot\(s\) missed", log), log

    out = d.json("schedule", "delete", "every3")
    assert out["deleted"] and out["snapshots_kept"] >= 1
    assert d.json("schedule", "list") == []
    left = mine(d)
    time.sleep(EVERY + 1)
    assert mine(d) == left  # nothing made or pruned once deleted
    assert "by-hand" in {s["name"] for s in d.json("snapshot", "list", "s")}
