"""The journal's memory is bounded, whatever the journal's size.

A journal far larger than its memory cap (a sparse file of several GiB) is
written, the writer dies without draining (its flusher held at a marker, so
every record is still unflushed), and a fresh process recovers it. The
recovering process's peak resident memory (VmHWM, reset through
/proc/self/clear_refs right before the open) must stay under the cap plus a
small constant, every acknowledged record must read back, and the replay
must put every record on the volume. Under sustained writes through a ring
larger than the cap, resident memory must stay bounded too (the mirror
follows the live window; appends wait when it reaches the cap).

Each measurement runs in its own child process, so the test runner's own
memory does not count.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from test_journal_support import make_volume

from dmsnap._hotpath import lib
from dmsnap.journal import Journal

MiB, GiB = 1 << 20, 1 << 30
CHUNK = 1 * MiB  # one write
SLACK = 24 * MiB  # index, scan buffer, Python's own allocations while verifying

COMMON = textwrap.dedent(
    r"""
    import json, os, struct, sys, time
    from dmsnap.journal import Journal

    MiB = 1 << 20
    CHUNK = 1 * MiB

    def rss_kib(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(field)

    def reset_peak():
        # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def data(i):
        return struct.pack("<QQ", 0xD5A9_0000 + i, i) * (CHUNK // 16)

    def open_kw(limit):
        return {"mem_limit": limit} if limit else {}
    """
)

WRITER = COMMON + textwrap.dedent(
    r"""
    jpath, vpath = sys.argv[1], sys.argv[2]
    vsize, n, limit = (int(a) for a in sys.argv[3:6])
    j = Journal.open(jpath, **open_kw(limit))
    j.attach(1, vpath, vsize)
    j.start()
    # the flusher stops at this marker until the controller passes it, which
    # never happens here: every write below stays unflushed in the journal
    j.marker(99, b"hold")
    assert j.next_marker(10).id == 99
    for i in range(n):
        j.write(1, i * CHUNK, data(i))
    print(json.dumps({"acked": n, "unflushed": j.stats().unflushed_bytes}), flush=True)
    os._exit(0)  # a crash: no drain, no close
    """
)

READER = COMMON + textwrap.dedent(
    r"""
    jpath, vpath = sys.argv[1], sys.argv[2]
    vsize, n, limit = (int(a) for a in sys.argv[3:6])
    reset_peak()
    base = rss_kib("VmRSS")
    j = Journal.open(jpath, **open_kw(limit))
    opened = rss_kib("VmHWM") - base
    st = j.stats()
    j.attach(1, vpath, vsize)
    j.start()
    m = j.next_marker(30)
    assert m is not None and m.id == 99, m
    j.marker_done(99)
    bad = [i for i in range(n) if j.read(1, i * CHUNK, CHUNK) != data(i)]
    j.close(drain=True, timeout=300)
    with open(vpath, "rb") as f:
        on_volume = [i for i in range(n) if f.read(CHUNK) != data(i)]
    print(json.dumps({
        "open_growth": opened * 1024,
        "peak_growth": (rss_kib("VmHWM") - base) * 1024,
        "recovered_records": st.recovered_records,
        "bad": bad,
        "not_on_volume": on_volume,
    }), flush=True)
    """
)


def _child(script: str, *args: object) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _crash_and_recover(
    tmp_path: Path, journal_size: int, n: int, write_limit: int, read_limit: int
) -> dict:
    jpath, vpath = tmp_path / "journal", tmp_path / "vol"
    Journal.format(str(jpath), journal_size)  # sparse: only what is written takes space
    vsize = n * CHUNK
    make_volume(vpath, vsize)
    w = _child(WRITER, jpath, vpath, vsize, n, write_limit)
    assert w == {"acked": n, "unflushed": n * CHUNK}
    r = _child(READER, jpath, vpath, vsize, n, read_limit)
    assert r["recovered_records"] == n + 1  # the writes and the marker
    assert r["bad"] == [], "acknowledged records read back wrong after recovery"
    assert r["not_on_volume"] == [], "the replay did not put every record on the volume"
    return r


def test_recovery_memory_follows_the_log_not_the_journal_size(tmp_path: Path) -> None:
    """A 4 GiB journal holding 64 MiB of unflushed records, recovered with
    the default memory cap: the recovering process grows by about the
    64 MiB it must hold, not by the journal's size (before: the whole ring
    was read into RAM, 4 GiB)."""
    n = 64
    r = _crash_and_recover(tmp_path, 4 * GiB, n, 0, 0)
    assert r["open_growth"] < n * CHUNK + SLACK, r
    assert r["peak_growth"] < n * CHUNK + SLACK, r


def test_a_log_longer_than_the_cap_is_replayed_in_pieces(tmp_path: Path) -> None:
    """96 MiB of unflushed records (written under a larger limit), recovered
    with a 32 MiB cap: recovery keeps at most the cap in memory and the
    flusher replays the rest in pieces before reads are served; every
    acknowledged record reads back and reaches the volume."""
    n, cap = 96, 32 * MiB
    r = _crash_and_recover(tmp_path, 2 * GiB, n, 512 * MiB, cap)
    assert r["open_growth"] < cap + SLACK, r
    assert r["peak_growth"] < cap + SLACK, r


STEADY = COMMON + textwrap.dedent(
    r"""
    jpath, vpath = sys.argv[1], sys.argv[2]
    vsize, total, limit = (int(a) for a in sys.argv[3:6])
    reset_peak()
    base = rss_kib("VmRSS")
    j = Journal.open(jpath, **open_kw(limit))
    j.attach(1, vpath, vsize)
    j.start()
    most = 0
    for i in range(total // CHUNK):
        j.write(1, i * CHUNK % vsize, data(i))
        most = max(most, j.stats().used)
    st = j.stats()
    j.close(drain=True, timeout=300)
    print(json.dumps({
        "peak_growth": (rss_kib("VmHWM") - base) * 1024,
        "most_used": most, "mem_limit": st.mem_limit, "capacity": st.capacity,
    }), flush=True)
    """
)


def test_sustained_writes_keep_memory_at_the_cap(tmp_path: Path) -> None:
    """Two laps of a 256 MiB ring with a 16 MiB cap: the live window never
    exceeds the cap (appends wait for the flusher, as for a full ring) and
    the process's resident memory stays near it (before: the mirror of the
    whole ring became resident, 256 MiB)."""
    jpath, vpath = tmp_path / "journal", tmp_path / "vol"
    ring, cap, vsize = 256 * MiB, Journal.MEM_MIN, 64 * MiB
    Journal.format(str(jpath), ring)
    make_volume(vpath, vsize)
    r = _child(STEADY, jpath, vpath, vsize, 2 * ring, cap)
    assert r["mem_limit"] == cap and r["capacity"] > 15 * cap, r
    assert r["most_used"] <= cap, r
    assert r["peak_growth"] < cap + SLACK, r


def test_memory_limit_is_checked_and_changed_live(tmp_path: Path) -> None:
    jpath = tmp_path / "journal"
    Journal.format(str(jpath), 64 * MiB)
    try:
        Journal.open(str(jpath), mem_limit=Journal.MEM_MIN - 1)
    except OSError as e:
        assert "below" in str(e)
    else:
        raise AssertionError("a memory limit below the minimum was taken")
    j = Journal.open(str(jpath))
    try:
        # a ring that fits the default is held whole
        assert j.stats().mem_limit == j.stats().capacity
        j.set_mem_limit(Journal.MEM_MIN)
        assert j.stats().mem_limit == Journal.MEM_MIN
        assert lib.JR_MEM_DEFAULT == Journal.MEM_DEFAULT > Journal.MEM_MIN
    finally:
        j.close(drain=False)
