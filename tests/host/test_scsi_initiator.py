"""`dmsnap initiator delete` and `initiator schedule --keep`, run as a user
would (the CLI in a subprocess) against the emulator behind a fake SG_IO
device (the LD_PRELOAD shim of test_scsi_support), with the fake snapshot
service standing in for the daemon. Argument errors are checked without a
device."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_scsi_support import FakeLun, FakeSgDevice, FakeSnapshots, build_shim, emulator

from dmsnap import cli
from dmsnap.scsi import initiator
from dmsnap.scsi import snapcmd as SC

CLI = "import sys; from dmsnap import cli; sys.exit(cli.run(sys.argv[1:]))"
SERIAL = "dmsnap-0123456789abcdef"  # FakeLun's unit serial


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["initiator", "delete", "/dev/null"], "NAME or --token"),
        (["initiator", "delete", "/dev/null", "s", "--token", "00" * 16], "one of them"),
        (["initiator", "delete", "/dev/null", "--token", "abc"], "32 hex digits"),
        (["initiator", "delete", "/dev/null", "-bad"], "No such option"),
        (["initiator", "delete", "/dev/null", ".bad"], "must not start with"),
        (["initiator", "schedule", "/dev/null", "--every", "1s", "--keep", "-1"], "--keep must"),
        (["initiator", "schedule", "/dev/null", "--every", "1s", "--count", "-1"], "--count"),
        (["initiator", "schedule", "/dev/null", "--every", "0s"], "at least 1s"),
        (["initiator", "schedule", "/dev/null", "--every", "1s", "--prefix", "a b"], "--prefix"),
        (["initiator", "schedule", "/dev/null", "--every", "1s", "--prefix", "p" * 40], "longer"),
    ],
)
def test_argument_errors_are_one_line_before_any_command(capsys, argv, fragment) -> None:
    rc = cli.run(argv)
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("dmsnap: ") and fragment in err
    assert out == ""


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> Path:
    so = build_shim(tmp_path_factory.mktemp("shim"))
    if so is None:
        pytest.skip("no C compiler for the SG_IO shim")
    return so


@pytest.fixture
def dev(shim, tmp_path) -> Iterator[FakeSgDevice]:
    d = FakeSgDevice(emulator(FakeLun(), FakeSnapshots()), shim, tmp_path)
    yield d
    d.close()


def dmsnap(d: FakeSgDevice, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [d.dev if a == "DEV" else a for a in args]
    p = subprocess.run(
        [sys.executable, "-c", CLI, *argv],
        env=d.env(),
        capture_output=True,
        timeout=120,
        check=False,
    )
    return subprocess.CompletedProcess(
        p.args, p.returncode, p.stdout.decode(), p.stderr.decode(errors="replace")
    )


def snaps_of(d: FakeSgDevice) -> FakeSnapshots:
    return d.emu.snapshots  # type: ignore[return-value]


def test_delete_by_name_and_token_with_clear_refusals(dev) -> None:
    s = snaps_of(dev)
    a, b = SC.new_token(), SC.new_token()
    s.create(None, SC.CreateRequest(a, "nightly", wait=True))
    s.create(None, SC.CreateRequest(b, "exported", wait=True))
    s.in_use.add("exported")
    p = dmsnap(dev, "initiator", "delete", "DEV", "nightly")
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"deleted snapshot nightly (token {a.hex()})\n"
    assert s.deleted == [a]
    p = dmsnap(dev, "initiator", "delete", "DEV", "--token", a.hex())
    assert p.returncode == 0, p.stderr  # a retry: idempotent
    p = dmsnap(dev, "initiator", "delete", "DEV", "nightly")  # gone from LIST now
    assert p.returncode == 8 and "no snapshot 'nightly'" in p.stderr
    p = dmsnap(dev, "initiator", "delete", "DEV", "exported")
    assert p.returncode == 8
    assert p.stderr.strip().endswith("in use on the storage system (exported or open); "
                                      "nothing was deleted")  # fmt: skip
    p = dmsnap(dev, "initiator", "delete", "DEV", "--token", "ee" * 16)
    assert p.returncode == 8 and "no snapshot of this volume" in p.stderr
    assert s.deleted == [a]
    p = dmsnap(dev, "initiator", "status", "DEV", a.hex())
    assert p.stdout.startswith("nightly: deleted")


def test_schedule_keeps_the_newest_of_its_own(dev) -> None:
    s = snaps_of(dev)
    mine = SC.new_token()  # a user's snapshot named like the schedule's
    s.create(None, SC.CreateRequest(mine, "auto-19990101-000000", wait=True))
    other = SC.new_token()  # another LUN's schedule with the same prefix
    label = {initiator.SCHEDULE_LABEL: "auto@another-serial"}
    s.create(None, SC.CreateRequest(other, "auto-19990101-000001", label, wait=True))
    p = dmsnap(dev, "initiator", "schedule", "DEV", "--every", "1s", "--count", "4", "--keep", "2")
    assert p.returncode == 0, p.stderr
    made = [r for r in s.created if r.labels.get(initiator.SCHEDULE_LABEL) == f"auto@{SERIAL}"]
    assert len(made) == 4
    # the fake leaves a request pending until asked with WAIT, so make them
    # "done" to let pruning through, as the flusher would: run it again.
    for i, e in enumerate(s.entries):
        if e.state is SC.State.PENDING:
            s.entries[i] = SC.SnapEntry(e.token, e.name, SC.State.DONE, e.group, e.marker,
                                        e.requested, (f"tank/db@{e.name}",), e.labels)  # fmt: skip
    time.sleep(1.1)  # names have a resolution of one second
    p = dmsnap(dev, "initiator", "schedule", "DEV", "--every", "1s", "--count", "1", "--keep", "2")
    assert p.returncode == 0, p.stderr
    made = [r for r in s.created if r.labels.get(initiator.SCHEDULE_LABEL) == f"auto@{SERIAL}"]
    assert len(made) == 5
    live = {e.name for e in s.entries if e.state is not SC.State.DELETED}
    assert live == {made[-1].name, made[-2].name, "auto-19990101-000000", "auto-19990101-000001"}
    assert sorted(s.deleted) == sorted(r.token for r in made[:3])
    assert p.stdout.count(": deleted (keeping the newest 2)") == 3


def test_schedule_reports_a_failed_delete_and_goes_on(dev) -> None:
    s = snaps_of(dev)
    label = {initiator.SCHEDULE_LABEL: f"auto@{SERIAL}"}
    old = SC.new_token()
    s.create(None, SC.CreateRequest(old, "auto-20000101-000000", label, wait=True))
    s.in_use.add("auto-20000101-000000")
    p = dmsnap(dev, "initiator", "schedule", "DEV", "--every", "1s", "--count", "2", "--keep", "1")
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("not deleted: auto-20000101-000000:") == 2  # each round, retried
    assert len(s.created) == 3 and s.deleted == []


def done(s: FakeSnapshots, name: str, labels: dict[str, str] | None = None) -> bytes:
    """A finished request made through the fake service (as the flusher would)."""
    token = SC.new_token()
    s.create(None, SC.CreateRequest(token, name, dict(labels or {}), wait=True))
    return token


def test_list_and_keep_see_past_one_list_page(dev) -> None:
    """LIST answers 64 requests a page; the initiator pages with SKIP, so
    `initiator list` shows every request and `schedule --keep` prunes its
    old snapshots even when more than a page of newer ones hide them."""
    s = snaps_of(dev)
    label = {initiator.SCHEDULE_LABEL: f"auto@{SERIAL}"}
    ours = [done(s, f"auto-20000101-{i:06d}", label) for i in range(80)]
    others = [done(s, f"other-{i}") for i in range(70)]  # newer: they fill page one
    p = dmsnap(dev, "initiator", "list", "DEV", "--json")
    assert p.returncode == 0, p.stderr
    listed = json.loads(p.stdout)
    assert len(listed) == 150
    assert [e["name"] for e in listed[:2]] == ["other-69", "other-68"]  # newest first
    assert {e["token"] for e in listed} == {t.hex() for t in ours + others}
    p = dmsnap(dev, "initiator", "schedule", "DEV", "--every", "1s", "--count", "1", "--keep", "70")
    assert p.returncode == 0, p.stderr
    made = [r for r in s.created if r.labels == label and r.token not in ours]
    assert len(made) == 1
    # 81 of its own now (the new one counts, pending or not): the 70 newest stay
    assert sorted(s.deleted) == sorted(ours[:11])
    assert p.stdout.count(": deleted (keeping the newest 70)") == 11
    assert not set(s.deleted) & set(others)


def test_initiator_waits_when_the_target_bounds_the_rate(shim, tmp_path) -> None:
    """Commands faster than the target takes: the initiator waits the time
    the rate sense asks for, and every request goes through, once."""
    from dmsnap.scsi.emulation import Emulator, TokenBucket

    snaps = FakeSnapshots()
    emu = Emulator(
        FakeLun(),
        snaps,
        snapshot_allowed=lambda _i: True,
        inband_rate=TokenBucket(rate=0.5, burst=1),
    )
    d = FakeSgDevice(emu, shim, tmp_path)
    try:
        p = dmsnap(d, "initiator", "snapshot", "DEV", "r0")  # CREATE, then STATUS
        assert p.returncode == 0, p.stderr
        p = dmsnap(d, "initiator", "list", "DEV")
        assert p.returncode == 0, p.stderr
        assert "r0" in p.stdout
        assert [r.name for r in snaps.created] == ["r0"]
    finally:
        d.close()
