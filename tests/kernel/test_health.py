"""Space and health on real device-mapper, as an administrator sees them.

A small thin pool is filled through its volumes until the kernel refuses
writes; a classic snapshot's COW area is overflowed by writes to its
origin. What is checked is what a user notices: writes fail promptly
(``error_if_no_space``: never queued), ``dmsnap status`` says why, the
running dmsnapd logs one line naming the pool or snapshot as the kernel's
dm event arrives (and another when the problem clears), creations that
cannot fit are refused with exit code 6 and change nothing, and everything
still tears down.

dmsnapd runs as a real process (test_cli_e2e.Daemon); its stderr, where it
logs, goes to a file that the tests read. Pools are made without a journal (see NO_JOURNAL).
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import threading
import time

import pytest
from test_cli_e2e import Daemon
from test_storage import MiB, block, dm_names, read, write

# Event → log line should take a second or two; the watcher's periodic
# re-check is 30 s, so a deadline below that shows the dm event did it.
LOG_DEADLINE = 25.0
# dm-thin queues writes for 60 s (no_space_timeout) when it is not told to
# error them: a failing write must come back well before that.
WRITE_ERROR_DEADLINE = 10.0
CHUNK = MiB
# Writes go straight to the volumes' dm devices: what is under test is how
# the kernel targets fail and how dmsnap reports it. (With a journal in
# front, a write is acknowledged from the journal and the flusher meets the
# full pool instead.)
NO_JOURNAL = ("--journal-mode", "none")


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


def wait_for_log(d: Daemon, pattern: str, since: int, t0: float) -> tuple[str, float]:
    """The first dmsnapd log line after byte ``since`` matching ``pattern``,
    and how long after ``t0`` it was seen. Polls the file with a deadline."""
    rx = re.compile(pattern)
    deadline = t0 + LOG_DEADLINE
    while True:
        text = d.log.read_bytes()[since:].decode(errors="replace")
        for line in text.splitlines():
            if rx.search(line):
                return line, time.monotonic() - t0
        if time.monotonic() > deadline:
            pytest.fail(
                f"no dmsnapd log line matching {pattern!r} within {LOG_DEADLINE:.0f} s; "
                f"log since then:\n{text}"
            )
        time.sleep(0.1)


def log_size(d: Daemon) -> int:
    return d.log.stat().st_size


class Filler:
    """Writes ``CHUNK``-sized O_DIRECT writes in a thread (so a write the
    kernel queues forever cannot hang the test) until ``stop`` or the first
    error; records how long the failing write took."""

    def __init__(self, path: str, start: int, stop: int, tag: int) -> None:
        self.path, self.start, self.stop, self.tag = path, start, stop, tag
        self.written = 0
        self.error: OSError | None = None
        self.error_seconds: float | None = None
        self.crash: BaseException | None = None  # anything but the write failing
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self._fill()
        except BaseException as e:
            self.crash = e

    def _fill(self) -> None:
        buf = mmap.mmap(-1, CHUNK)
        buf.write(bytes([self.tag]) * CHUNK)
        fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT)
        try:
            for off in range(self.start, self.stop, CHUNK):
                t = time.monotonic()
                try:
                    os.pwritev(fd, [buf], off)
                except OSError as e:
                    self.error, self.error_seconds = e, time.monotonic() - t
                    return
                self.written += CHUNK
        finally:
            os.close(fd)

    def run(self, deadline: float) -> Filler:
        self._thread.start()
        self._thread.join(timeout=deadline)
        assert not self._thread.is_alive(), (
            f"a write to {self.path} did not return within {deadline:.0f} s "
            "(queued instead of failing?)"
        )
        if self.crash is not None:
            raise self.crash
        return self


def catalog_and_kernel(d: Daemon) -> tuple[object, ...]:
    return (
        dm_names(),
        d.cli("volume", "list", "--json").stdout,
        d.cli("snapshot", "list", "--json").stdout,
        d.json("status")["pending"],
    )


def test_thin_pool_low_water_then_full_then_freed(daemon):
    d = daemon
    d.cli("pool", "create", "full", "--size", "64M", *NO_JOURNAL)
    data = d.json("pool", "show", "full")["data_size"]  # thin data space, bytes
    assert data and data % MiB == 0
    # Two volumes as large as the pool: overcommitted 2x, which thin allows.
    for v in ("a", "b"):
        d.cli("volume", "create", f"full/{v}", "--size", f"{data // MiB}M")
    assert d.json("pool", "show", "full")["overcommitted"] == pytest.approx(2.0)
    a, b = "/dev/dmsnap/full/a", "/dev/dmsnap/full/b"

    # 1. Past the low-water mark (90%), below the 95% creation limit.
    low = (int(data * 0.92) + MiB - 1) // MiB * MiB
    mark, t0 = log_size(d), time.monotonic()
    f = Filler(a, 0, low, 0xA1).run(deadline=300)
    assert f.error is None, f.error
    line, low_s = wait_for_log(d, r"WARNING: health: pool full: thin pool data \d+% full", mark, t0)
    pool = d.json("pool", "show", "full")
    assert pool["mode"] == "rw" and 0.9 <= pool["data_used_fraction"] < 0.95
    assert any("low water" in h for h in pool["health"])
    status = d.cli("status")
    assert re.search(r"^warning: pool full: thin pool data 9\d% full", status.stdout, re.M)
    print(f"\nlow water: {pool['data_used_fraction']:.1%} used; logged after {low_s:.1f} s: {line}")

    # 2. Fill b until the pool runs out: the write that needs a block that
    # is not there fails at once, with ENOSPC (or EIO), not a hang.
    mark, t0 = log_size(d), time.monotonic()
    f = Filler(b, 0, data, 0xB1).run(deadline=300)
    assert f.error is not None, "filled the whole volume b although the pool is smaller"
    assert f.error.errno in (errno.ENOSPC, errno.EIO), f.error
    assert f.error_seconds is not None and f.error_seconds < WRITE_ERROR_DEADLINE
    assert low + f.written <= data  # it stopped because the pool is full ...
    assert data - (low + f.written) <= CHUNK  # ... not anywhere earlier
    # Still out of space: the next new block fails promptly too.
    again = Filler(b, f.written + CHUNK, f.written + 2 * CHUNK, 0xB2).run(deadline=60)
    assert again.error is not None and again.error_seconds < WRITE_ERROR_DEADLINE
    # Blocks already allocated can still be overwritten, and data is intact.
    write(a, 0, block(0xA2))
    assert read(a, 0, 4096) == block(0xA2)
    assert read(a, low - 4096, 4096) == block(0xA1)
    assert read(b, 0, 4096) == block(0xB1)

    line, full_s = wait_for_log(
        d, r"WARNING: health: pool full: thin pool is OUT OF DATA SPACE", mark, t0
    )
    pool = d.json("pool", "show", "full")
    assert pool["mode"] == "out_of_data_space"
    assert pool["free"] == 0 and pool["data_used_fraction"] == 1.0
    st = d.json("status")
    assert any(h.startswith("pool full: thin pool is OUT OF DATA SPACE") for h in st["health"]), st[
        "health"
    ]
    human = d.cli("status").stdout
    assert "warning: pool full: thin pool is OUT OF DATA SPACE" in human
    # The low-water problem was logged once, when it appeared; use going
    # from 91% to 100% is the same problem, not a new one plus a "recovery".
    log = d.log.read_text()
    assert len(re.findall(r"health: pool full: thin pool data \d+% full", log)) == 1, log
    assert "health recovered: pool full: thin pool data" not in log, log
    print(
        f"out of space after {(low + f.written) // MiB} MiB of {data // MiB} MiB: "
        f"{errno.errorcode[f.error.errno]} in {f.error_seconds * 1000:.1f} ms "
        f"(again {again.error_seconds * 1000:.1f} ms); logged after {full_s:.1f} s: {line}"
    )
    print("status:\n" + human)

    # 3. Nothing new can be created, with a clear one-line error, exit 6,
    # and nothing changes (catalog, kernel devices, thin transaction id).
    before = catalog_and_kernel(d)
    txid = d.json("pool", "show", "full")["transaction_id"]
    for args in (
        ["volume", "create", "full/c", "--size", "8M"],
        ["snapshot", "create", "full/a", "s"],
        ["snapshot", "create", "full/a,full/b", "g"],
    ):
        r = d.cli(*args, check=False)
        assert r.returncode == 6, (args, r.returncode, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("dmsnap: ")
        assert "pool full is out of data space" in r.stderr, r.stderr
        print(f"dmsnap {' '.join(args)} -> {r.returncode}: {r.stderr.strip()}")
    assert catalog_and_kernel(d) == before
    assert d.json("pool", "show", "full")["transaction_id"] == txid

    # 4. Deleting a volume frees its blocks: the pool leaves out-of-space
    # mode by itself, the daemon logs the recovery, writes work again.
    mark, t0 = log_size(d), time.monotonic()
    d.cli("volume", "delete", "full/b")
    line, rec_s = wait_for_log(
        d, r"INFO: health recovered: pool full: thin pool is OUT OF DATA SPACE", mark, t0
    )
    pool = d.json("pool", "show", "full")
    assert pool["mode"] == "rw" and pool["free"] > 0
    assert not any("OUT OF DATA SPACE" in h for h in pool["health"])
    write(a, low, block(0xA3))
    assert read(a, low, 4096) == block(0xA3)
    print(f"after deleting b: mode {pool['mode']}; logged after {rec_s:.1f} s: {line}")

    # 5. ... and the pool tears down cleanly (the fixture's leftover check
    # witnesses loop devices too).
    d.cli("pool", "destroy", "full", "--force", "--yes")
    assert not [n for n in dm_names() if n.startswith("dmsnap-full-")]
    assert d.json("pool", "list") == []


def test_classic_snapshot_cow_overflow_is_reported_and_logged(daemon):
    d = daemon
    d.cli("pool", "create", "cow", "--backend", "classic", "--size", "128M", *NO_JOURNAL)
    # Overflow on purpose: without autoextend (tests/kernel/test_cow_autoextend.py has it on)
    d.cli("pool", "set", "cow", "--cow-autoextend-threshold", "100")
    d.cli("volume", "create", "cow/v", "--size", "16M")
    v = "/dev/dmsnap/cow/v"
    Filler(v, 0, 16 * MiB, 0x11).run(deadline=300)
    d.cli("snapshot", "create", "cow/v", "s")
    snap = d.json("snapshot", "activate", "cow/v@s")["path"]
    assert read(snap, 0, 4096) == block(0x11)

    # Overwrite the origin a quarter at a time: each first write copies a
    # 4 KiB chunk into the snapshot's COW area, which holds 25% of the
    # volume (4 MiB) minus its own metadata.
    first = Filler(v, 0, 3 * MiB, 0x22).run(deadline=300)
    assert first.error is None
    usage = d.json("pool", "show", "cow")["snapshots"]["v@s"]
    assert usage["state"] == "valid" and 0.7 < usage["cow_used_fraction"] < 0.9
    assert d.json("status")["health"] == []

    # Past 90%: status warns (no dm event for that: the periodic re-check logs it).
    extra = 3 * MiB + 11 * 64 * 1024  # ~949 of 1024 COW chunks in use
    fd = os.open(v, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 64 * 1024)
        buf.write(bytes([0x22]) * len(buf))
        for off in range(3 * MiB, extra, len(buf)):
            os.pwritev(fd, [buf], off)
    finally:
        os.close(fd)
    usage = d.json("pool", "show", "cow")["snapshots"]["v@s"]
    assert 0.9 <= usage["cow_used_fraction"] < 1.0, usage
    health = d.json("status")["health"]
    assert any(re.match(r"pool cow: snapshot cow/v@s COW area 9\d% full", h) for h in health), (
        health
    )

    # Overflow: origin writes still succeed; the snapshot is dropped by the
    # kernel (reads fail), the daemon logs it as the dm event arrives.
    mark, t0 = log_size(d), time.monotonic()
    rest = Filler(v, extra - extra % MiB, 16 * MiB, 0x33).run(deadline=300)
    assert rest.error is None, rest.error
    line, inv_s = wait_for_log(
        d, r"WARNING: health: pool cow: snapshot cow/v@s is INVALID", mark, t0
    )
    assert read(v, 15 * MiB, 4096) == block(0x33)
    with pytest.raises(OSError) as exc:
        read(snap, 0, 4096)
    assert exc.value.errno == errno.EIO
    shown = d.json("pool", "show", "cow")
    assert shown["snapshots"]["v@s"] == {"state": "invalid"}
    human = d.cli("status").stdout
    assert "warning: pool cow: snapshot cow/v@s is INVALID" in human
    print(f"\ninvalid: logged after {inv_s:.1f} s: {line}")
    print("status:\n" + human)

    # Deleting the dead snapshot clears the problem (logged), and the pool
    # tears down cleanly.
    mark, t0 = log_size(d), time.monotonic()
    d.cli("snapshot", "delete", "cow/v@s")
    line, rec_s = wait_for_log(
        d, r"INFO: health recovered: pool cow: snapshot cow/v@s is INVALID", mark, t0
    )
    assert d.json("status")["health"] == []
    print(f"recovered: logged after {rec_s:.1f} s: {line}")
    d.cli("pool", "destroy", "cow", "--force", "--yes")
    assert not [n for n in dm_names() if n.startswith("dmsnap-cow-")]
