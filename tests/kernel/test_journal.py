"""The journal on real device-mapper: writers never pause, and every
snapshot equals the reference model at its marker (DESIGN §1).

Writers go through the pool's journal (Manager.open_volume, the local
writer's path); snapshots are requested while they write; each snapshot is
then activated read-only and read back through its own dm device.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from jmodel import Model, first_difference, pattern, read_direct

from dmsnap import errors as E
from dmsnap.storage.manager import Manager

MiB = 1 << 20
VOL = 8 * MiB
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_writers(io, model, vol_ids, *, threads, writes, seed, stop=None, span=VOL, gate=None):
    """``threads`` writers x ``writes`` random writes of 512 B..64 KiB in
    the first ``span`` bytes of each volume; ``gate(i)``, if given, is
    called before each writer's i-th write and may hold it."""
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        try:
            for i in range(writes):
                if stop is not None and stop.is_set():
                    return
                if gate is not None:
                    gate(i)
                v = rng.choice(vol_ids)
                length = rng.choice([512, 4096, 4096, 8192, 65536, 1536])
                off = rng.randrange(0, (span - length) // 512) * 512
                data = pattern(seed * 10**7 + n * 10**5 + i, length)
                seq = io[v].write(off, data)
                model.record(seq, v, off, data)
        except BaseException as e:  # reported by the test
            errors.append(e)

    ts = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for t in ts:
        t.start()
    return ts, errors


def wait_done(mgr, pool, markers, timeout=120.0):
    deadline = time.monotonic() + timeout
    for mk in markers:
        while True:
            r = mgr.snapshot_request(pool, marker=mk)
            if r["state"] != "pending":
                assert r["state"] == "done", r
                break
            assert time.monotonic() < deadline, f"marker {mk} not reached: {r}"
            time.sleep(0.05)


@pytest.fixture
def mgr(tmp_path):
    m = Manager(str(tmp_path / "state"))
    yield m
    for p in m.catalog.pools():
        m.pool_destroy(p.name, force=True)
    m.close()


def check_snapshot(mgr, pool, vols, name, seq, model):
    for vname, vid in vols.items():
        act = mgr.snapshot_activate(pool, vname, name)
        try:
            got = read_direct(act["path"], 0, VOL)
        finally:
            mgr.snapshot_deactivate(pool, vname, name)
        want = model.state(vid, seq)
        assert got == want, f"{pool}/{vname}@{name} (marker seq {seq}): " + first_difference(
            got, want
        )


@pytest.mark.parametrize(("backend", "mode"), [("thin", "nv"), ("classic", "nv"), ("thin", "ram")])
def test_snapshots_under_concurrent_writers_equal_the_model(mgr, backend, mode):
    pool = mgr.pool_create(
        "j", backend=backend, size=256 * MiB, journal_mode=mode, journal_size=8 * MiB
    )
    assert pool["journal"]["mode"] == mode and pool["journal"]["running"]
    vols = {}
    for name in ("a", "b"):
        v = mgr.volume_create("j", name, VOL)
        assert v["journaled"] and v["path"] is None  # reached through the journal only
        vols[name] = mgr.catalog.volume("j", name).id
    io = {vid: mgr.open_volume("j", name) for name, vid in vols.items()}
    model = Model({vid: VOL for vid in vols.values()})

    # classic: keep each snapshot's copy-on-write within its 4 MiB COW area
    span = 2 * MiB if backend == "classic" else VOL
    snaps: list[tuple[str, int, int]] = []  # name, marker id, marker seq
    taken = threading.Condition()
    writes, checkpoints = 300, 4
    # write index -> k: writes 60, 120, 180, 240
    at = {k * writes // (checkpoints + 1): k for k in range(1, checkpoints + 1)}

    def gate(i: int) -> None:
        # At checkpoint k a writer waits until k snapshots exist, so fast
        # writers (RAM journal) cannot finish before snapshots interleave;
        # between checkpoints writers and snapshots run freely.
        k = at.get(i)
        if k:
            with taken:
                taken.wait_for(lambda: len(snaps) >= k, timeout=60)

    ts, errors = run_writers(
        io, model, list(vols.values()), threads=4, writes=writes, seed=1, span=span, gate=gate
    )
    i = 0
    while any(t.is_alive() for t in ts) and i < 8:  # classic: COW space per snapshot
        # one group: both volumes cut at the same marker
        r = mgr.snapshot_create([["j", "a"], ["j", "b"]], f"s{i}")
        assert r["state"] in ("pending", "done"), r
        with taken:
            snaps.append((f"s{i}", r["marker"], r["seq"]))
            taken.notify_all()
        i += 1
        time.sleep(0.02)
    for t in ts:
        t.join()
    assert not errors, errors
    wait_done(mgr, "j", [m for _, m, _ in snaps])
    assert len(snaps) >= checkpoints, "writers finished before snapshots could interleave"

    # reads through the journal see every acknowledged write
    for vid in vols.values():
        got = io[vid].read(0, VOL)
        assert got == model.state(vid), first_difference(got, model.state(vid))
    # each snapshot, through its own dm device, equals the model at its marker
    picked = snaps if len(snaps) <= 10 else random.Random(3).sample(snaps, 10)
    for name, _, seq in picked:
        check_snapshot(mgr, "j", vols, name, seq, model)
    st = mgr.pool_show("j")["journal"]
    assert st["markers_pending"] == 0 and st["journal_error"] is None and st["flush_error"] is None
    assert st["crc32c"] in ("sse4.2", "slice8")


def test_journal_full_writers_wait_then_continue(mgr):
    """A small journal fills while the flusher is held at a marker: writers
    wait (none fails), and everything lands once it moves on."""
    mgr.pool_create("f", size=128 * MiB, journal_size=4 * MiB)
    mgr.volume_create("f", "v", VOL)
    vid = mgr.catalog.volume("f", "v").id
    io = mgr.open_volume("f", "v")
    model = Model({vid: VOL})
    hold = threading.Event()
    real = mgr._materialize

    def slow(pool_id, marker_id, request):
        hold.wait(30)
        return real(pool_id, marker_id, request)

    mgr._materialize = slow  # the flusher now stands at the marker until we let go
    try:
        r = mgr.snapshot_create([["f", "v"]], "held")
        ts, errors = run_writers({vid: io}, model, [vid], threads=4, writes=200, seed=2)
        deadline = time.monotonic() + 60
        # the journal's own stats: the held marker holds the Manager's lock
        pj = mgr.journals.by_pool[mgr.catalog.pool("f").id]
        while (st := pj.stats()).used < 0.9 * st.capacity:
            assert time.monotonic() < deadline, f"journal never filled: {st} {errors}"
            time.sleep(0.05)
        assert any(t.is_alive() for t in ts), "writers should be waiting for space"
        time.sleep(0.5)
        assert any(t.is_alive() for t in ts) and not errors
    finally:
        hold.set()
    for t in ts:
        t.join(60)
    assert not errors, errors
    mgr._materialize = real
    wait_done(mgr, "f", [r["marker"]])
    assert io.read(0, VOL) == model.state(vid)
    check_snapshot(mgr, "f", {"v": vid}, "held", r["seq"], model)


def test_group_and_retry_by_token_and_refusals_change_nothing(mgr):
    mgr.pool_create("t", size=128 * MiB)
    mgr.volume_create("t", "a", VOL)
    io = mgr.open_volume("t", "a")
    io.write(0, b"\x11" * 4096)
    r1 = mgr.snapshot_create([["t", "a"]], "one", token="tok-1", wait=True)
    assert r1["state"] == "done" and [s["name"] for s in r1["snapshots"]] == ["one"]
    r2 = mgr.snapshot_create([["t", "a"]], "one", token="tok-1")
    assert r2.get("retried") and r2["group"] == r1["group"]  # nothing new
    before = mgr.catalog.counts()
    for exc, call in [
        (E.AlreadyExists, lambda: mgr.snapshot_create([["t", "a"]], "one")),
        (E.InvalidArgument, lambda: io.write(100, b"x" * 512)),  # unaligned
        (E.InvalidArgument, lambda: io.write(VOL, b"x" * 512)),  # beyond the end
        (E.InvalidArgument, lambda: mgr.pool_create("bad", journal_mode="disk")),
        (E.InvalidArgument, lambda: mgr.pool_create("bad", journal_size=1024)),
        (E.NotFound, lambda: mgr.pool_create("bad", journal="/dev/nonexistent")),
        (E.NotFound, lambda: mgr.snapshot_request("t", token="never")),
    ]:
        with pytest.raises(exc):
            call()
    assert mgr.catalog.counts() == before
    assert os.path.exists("/dev/mapper/dmsnap-t-a")
    assert not os.path.lexists("/dev/dmsnap/t/a")  # private: writes only through the journal


CHILD = r"""
import json, os, random, sys, threading, time
sys.path[:0] = [os.path.dirname(os.path.abspath(sys.argv[1]))]
from jmodel import pattern
from dmsnap.storage.manager import Manager

state, seed = sys.argv[2], int(sys.argv[3])
m = Manager(state)
m.assemble()
vols = {v.name: v.id for v in m.catalog.volumes("c")}
io = {vid: m.open_volume("c", n) for n, vid in vols.items()}
out_lock = threading.Lock()

def say(obj):
    with out_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

def writer(n):
    rng = random.Random(seed * 100 + n)
    for i in range(10**6):
        vid = rng.choice(list(vols.values()))
        length = rng.choice([512, 4096, 65536])
        off = rng.randrange(0, (8 << 20) // 512 - length // 512) * 512
        wid = seed * 10**8 + n * 10**6 + i
        say({"intent": wid, "vol": vid, "off": off, "len": length})
        seq = io[vid].write(off, pattern(wid, length))
        say({"ack": wid, "seq": seq})

for n in range(3):
    threading.Thread(target=writer, args=(n,), daemon=True).start()
k = 0
while True:
    r = m.snapshot_create([["c", "a"], ["c", "b"]], f"k{seed}-{k}")
    say({"marker": r["marker"], "seq": r["seq"], "name": f"k{seed}-{k}"})
    k += 1
    time.sleep(0.01)
"""


def test_kill9_under_io_recovers_every_acknowledged_write_and_marker(tmp_path):
    """dmsnap's process dies (SIGKILL) with writes and markers in flight, three
    times; each restart replays the journal: every acknowledged write is
    there, every acknowledged marker becomes exactly one snapshot, and each
    snapshot equals the model at its marker."""
    state = str(tmp_path / "state")
    first = Manager(state)
    try:
        first.pool_create("c", size=256 * MiB, journal_size=16 * MiB)
        for name in ("a", "b"):
            first.volume_create("c", name, VOL)
        vols = {v.name: v.id for v in first.catalog.volumes("c")}
    except BaseException:
        first.teardown()
        raise
    finally:
        first.close(drain=True)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    intents: dict[int, tuple[int, int, int]] = {}
    acked: dict[int, int] = {}  # write id -> seq
    markers: list[tuple[int, int, str]] = []
    rng = random.Random(11)
    here = os.path.abspath(__file__)
    for seed in (1, 2, 3):
        child = subprocess.Popen(
            [sys.executable, str(script), here, state, str(seed)],
            stdout=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(here))),
            },
        )
        assert child.stdout is not None
        start, seen = time.monotonic(), 0
        kill_after = rng.uniform(1.0, 3.0)
        for line in child.stdout:
            ev = json.loads(line)
            if "intent" in ev:
                intents[ev["intent"]] = (ev["vol"], ev["off"], ev["len"])
            elif "ack" in ev:
                acked[ev["ack"]] = ev["seq"]
                if seen == 0:
                    start = time.monotonic()  # the child's start-up is slow in the VM
                seen += 1
            elif "marker" in ev:
                markers.append((ev["marker"], ev["seq"], ev["name"]))
            if seen and time.monotonic() - start > kill_after:
                child.send_signal(signal.SIGKILL)
                break
        child.wait()
        rest = child.stdout.read()  # acknowledgements already in the pipe count too
        for line in rest.splitlines():
            if not line.endswith("}"):
                continue
            ev = json.loads(line)
            if "intent" in ev:
                intents[ev["intent"]] = (ev["vol"], ev["off"], ev["len"])
            elif "ack" in ev:
                acked[ev["ack"]] = ev["seq"]
            elif "marker" in ev:
                markers.append((ev["marker"], ev["seq"], ev["name"]))
    m = Manager(state)
    try:
        assert len(acked) > 50 and len(markers) > 3, (len(acked), len(markers))
        report = m.assemble()
        assert report["pools"]["c"] == "ok", report
        # every acknowledged marker: exactly one snapshot group
        deadline = time.monotonic() + 120
        for mk, _, _ in markers:
            while m.snapshot_request("c", marker=mk)["state"] == "pending":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            r = m.snapshot_request("c", marker=mk)
            assert r["state"] == "done", r
            assert sorted(s["volume"] for s in r["snapshots"]) == ["a", "b"], r
        groups = m.catalog.db.execute(
            "SELECT marker, COUNT(*) FROM snap_groups WHERE marker IS NOT NULL GROUP BY marker"
        ).fetchall()
        assert all(n == 1 for _, n in groups)
        # the model: acknowledged writes by seq; unacknowledged ones may or may
        # not have landed, so their sectors are left out of the comparison
        model = Model({vid: VOL for vid in vols.values()})
        masks = {vid: bytearray(VOL) for vid in vols.values()}
        for wid, (vid, off, length) in intents.items():
            if wid in acked:
                model.record(acked[wid], vid, off, pattern(wid, length))
            else:
                masks[vid][off : off + length] = b"\x01" * length

        def masked(img: bytes | bytearray, vid: int) -> bytes:
            b = bytearray(img)
            mask = masks[vid]
            for o in range(0, VOL, 512):
                if mask[o]:
                    b[o : o + 512] = bytes(512)
            return bytes(b)

        for vname, vid in vols.items():
            got = m.open_volume("c", vname).read(0, VOL)
            want = model.state(vid)
            assert masked(got, vid) == masked(want, vid), first_difference(
                masked(got, vid), masked(want, vid)
            )
        for mk, seq, name in random.Random(5).sample(markers, min(6, len(markers))):
            for vname, vid in vols.items():
                act = m.snapshot_activate("c", vname, name)
                try:
                    got = read_direct(act["path"], 0, VOL)
                finally:
                    m.snapshot_deactivate("c", vname, name)
                want = model.state(vid, seq)
                assert masked(got, vid) == masked(want, vid), (
                    f"{vname}@{name} marker {mk}: "
                    + first_difference(masked(got, vid), masked(want, vid))
                )
    finally:
        m.pool_destroy("c", force=True)
        m.close()


def test_full_thin_pool_refuses_new_writes_and_keeps_acknowledged_ones(mgr):
    """A journaled pool whose thin pool fills: the flusher's writes fail with
    ENOSPC, new writes are then refused with a clear no-space error (not
    acknowledged into a journal that cannot drain), acknowledged ones stay
    readable, and once a volume is deleted everything lands."""
    mgr.pool_create("n", size=64 * MiB, journal_size=16 * MiB)
    mgr.volume_create("n", "a", 56 * MiB)
    mgr.volume_create("n", "b", 56 * MiB)
    a, b = mgr.open_volume("n", "a"), mgr.open_volume("n", "b")
    for i in range(24):  # b takes 24 MiB and lands
        b.write(i * MiB, pattern(1000 + i, MiB))
    acked: dict[int, bytes] = {}
    refused = None
    deadline = time.monotonic() + 120
    for i in range(56):
        data = pattern(2000 + i, MiB)
        try:
            a.write(i * MiB, data)
        except E.NoSpace as e:
            refused = e
            break
        acked[i] = data
        assert time.monotonic() < deadline
    if refused is None:  # the journal absorbed them all; the flusher is failing now
        while True:
            try:
                a.write(0, pattern(1, 4096))
                acked[0] = pattern(1, 4096) + acked[0][4096:]
            except E.NoSpace as e:
                refused = e
                break
            assert time.monotonic() < deadline, "writes never refused on a full pool"
            time.sleep(0.2)
    assert "out of data space" in str(refused)
    st = mgr.pool_show("n")
    assert any("journal flush error" in h for h in st["health"]), st["health"]
    for i, data in acked.items():  # acknowledged data, from the journal's overlay
        assert a.read(i * MiB, MiB) == data, i
    mgr.volume_delete("n", "b")  # frees 24 MiB: the flusher's retry gets through
    deadline = time.monotonic() + 60
    while mgr.pool_show("n")["journal"]["lag_records"]:
        assert time.monotonic() < deadline, mgr.pool_show("n")["journal"]
        time.sleep(0.2)
    a.write(40 * MiB, pattern(3, 4096))  # accepted again
    r = mgr.snapshot_create([["n", "a"]], "after", wait=True)
    assert r["state"] == "done"
    act = mgr.snapshot_activate("n", "a", "after")
    try:
        for i, data in acked.items():
            assert read_direct(act["path"], i * MiB, MiB) == data, i
    finally:
        mgr.snapshot_deactivate("n", "a", "after")


MEM_CHILD = r"""
import os, sys, threading
sys.path[:0] = [os.path.dirname(os.path.abspath(sys.argv[1]))]
from jmodel import pattern
from dmsnap.storage.manager import Manager

MiB = 1 << 20
m = Manager(sys.argv[2])
m.assemble()
# the marker is never made here: the flusher stands at it, so every write
# after it stays unflushed in the journal when this process dies
# (which holds the Manager's lock: take what needs it first)
m._materialize = lambda *a: threading.Event().wait()
io = m.open_volume("mm", "v")
pj = m.journals.by_pool[m.catalog.pool("mm").id]
r = m.snapshot_create([["mm", "v"]], "held")
for i in range(int(sys.argv[3])):
    io.write(i * MiB, pattern(i, MiB))
print(r["marker"], pj.stats().unflushed_bytes, flush=True)
os._exit(0)
"""


def test_journal_memory_limit_and_a_longer_log_replayed_before_serving(tmp_path):
    """The pool's journal memory (create, show, set), and a log longer than
    the limit: 40 MiB of writes behind a held marker when the daemon dies,
    then the limit lowered to 16 MiB; the next start replays the log in
    pieces before the pool serves, makes the held snapshot on the way, and
    every acknowledged write is on the volume (docs/journal.md, "Memory")."""
    state, n = str(tmp_path / "state"), 40
    m = Manager(state)
    try:
        p = m.pool_create("mm", size=256 * MiB, journal_size=96 * MiB, journal_memory=64 * MiB)
        assert p["journal"]["memory"] == 64 * MiB and p["journal"]["memory_limit"] == 64 * MiB
        assert p["journal"]["capacity"] > 64 * MiB
        before = m.catalog.counts()
        for kw in ({"journal_memory": MiB}, {"journal_mode": "ram", "journal_memory": 64 * MiB}):
            with pytest.raises(E.InvalidArgument):
                m.pool_create("bad", **kw)
        with pytest.raises(E.InvalidArgument):
            m.pool_set("mm", journal_memory=MiB)
        assert m.catalog.counts() == before
        m.volume_create("mm", "v", 64 * MiB)
    finally:
        m.close(drain=True)
    script = tmp_path / "child.py"
    script.write_text(MEM_CHILD)
    here = os.path.abspath(__file__)
    out = subprocess.run(
        [sys.executable, str(script), here, state, str(n)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(here)))},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    marker, unflushed = map(int, out.stdout.split())
    assert unflushed == n * MiB

    m = Manager(state)
    try:
        m.pool_set("mm", journal_memory=16 * MiB)  # takes effect at the start below
        assert m.assemble()["pools"]["mm"] == "ok"
        j = m.pool_show("mm")["journal"]
        # replayed before serving: nothing left on disk only, the held snapshot made
        assert j["memory"] == 16 * MiB and j["memory_limit"] == 16 * MiB, j
        assert j["backlog_bytes"] == 0 and j["journal_error"] is None, j
        assert m.snapshot_request("mm", marker=marker)["state"] == "done"
        io = m.open_volume("mm", "v")
        for i in range(n):
            assert io.read(i * MiB, MiB) == pattern(i, MiB), f"write {i} lost"
        path = m.snapshot_activate("mm", "v", "held")["path"]
        try:
            assert read_direct(path, 0, n * MiB) == bytes(n * MiB)  # made before the writes
        finally:
            m.snapshot_deactivate("mm", "v", "held")
        m.pool_set("mm", journal_memory=32 * MiB)  # at once, on the running journal
        assert m.pool_show("mm")["journal"]["memory_limit"] == 32 * MiB
        io.write(0, pattern(99, MiB))
        assert io.read(0, MiB) == pattern(99, MiB)
    finally:
        for p in m.catalog.pools():
            m.pool_destroy(p.name, force=True)
        m.close()
