"""The journal under faults below it (issue 4's kernel tests, DESIGN §1.6).

* dm-flakey power cuts: a pool whose data and journal devices are dm-flakey
  devices; a writer process writes and requests group snapshots; then the
  power goes: the process dies (SIGKILL) and at once both devices drop every
  write (drop_writes), so whatever the kernel had not written yet (thin
  metadata not committed, records in flight, the thin pool's final commit
  when its stack is torn down) never reaches the disks. The devices come
  back, a fresh Manager rebuilds the stack from disk and replays the journal:
  every acknowledged write and marker is there, each marker exactly one
  snapshot equal to the model at it.
* dm-log-writes under the flusher: a classic pool on a log-writes device;
  just before each snapshot is made (the flusher has synced every earlier
  write), a log mark names the marker. Replaying the log to each mark gives
  each volume's extent exactly as the model at that marker.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from faultdev import FaultDevice, cut_power, remove_pool_stack, sectors_of
from jmodel import (
    LOG_END_MARK,
    LogWritesLog,
    Mask,
    Model,
    first_difference,
    pattern,
    read_direct,
)
from test_journal import run_writers, wait_done

from dmsnap.dm import Role, make_uuid
from dmsnap.dm import status as st
from dmsnap.dm import targets as t
from dmsnap.dm.targets import Table
from dmsnap.storage.manager import Manager

MiB = 1 << 20
VOL = 8 * MiB
SECTOR = 512
HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))


# -- dm-flakey power cuts ----------------------------------------------------------------

CHILD = r"""
import json, os, random, sys, threading, time
sys.path[:0] = [os.path.dirname(os.path.abspath(sys.argv[1]))]
from jmodel import pattern
from dmsnap.storage.manager import Manager

state, pool = sys.argv[2], sys.argv[3]
seed, span, max_snaps = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
m = Manager(state)
report = m.assemble()
vols = {v.name: v.id for v in m.catalog.volumes(pool)}
io = {vid: m.open_volume(pool, n) for n, vid in vols.items()}
out_lock = threading.Lock()

def say(obj):
    with out_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

real_materialize = m._materialize

def materialize(pool_id, marker_id, request):
    result = real_materialize(pool_id, marker_id, request)
    say({"made": marker_id})  # the snapshot exists and the catalog says so
    return result

m._materialize = materialize
say({"ready": report["pools"]})

def writer(n):
    rng = random.Random(seed * 100 + n)
    try:
        for i in range(10**6):
            vid = rng.choice(sorted(vols.values()))
            length = rng.choice([512, 1536, 4096, 4096, 65536])
            off = rng.randrange(0, (span - length) // 512 + 1) * 512
            wid = seed * 10**8 + n * 10**6 + i
            say({"intent": wid, "vol": vid, "off": off, "len": length})
            seq = io[vid].write(off, pattern(wid, length))
            say({"ack": wid, "seq": seq})
    except BaseException as e:
        say({"error": f"writer {n}: {e!r}"})

for n in range(3):
    threading.Thread(target=writer, args=(n,), daemon=True).start()
for k in range(max_snaps):
    name = f"k{k}"
    try:
        r = m.snapshot_create([[pool, "a"], [pool, "b"]], name)
    except Exception as e:
        say({"error": f"snapshot {name}: {e!r}"})
        break
    say({"marker": r["marker"], "seq": r["seq"], "name": name})
    time.sleep(0.01)
while True:
    time.sleep(1)
"""


class Events:
    """What the writer child reported: intents, acknowledgements, markers."""

    def __init__(self) -> None:
        self.intents: dict[int, tuple[int, int, int]] = {}
        self.acked: dict[int, int] = {}  # write id -> seq
        self.markers: list[tuple[int, int, str]] = []  # marker id, seq, name
        self.errors: list[str] = []
        self.made: list[int] = []  # markers whose snapshot was made
        self.ready: dict | None = None

    def take(self, line: str) -> None:
        if not line.endswith("}"):
            return  # a line cut short by SIGKILL
        ev = json.loads(line)
        if "intent" in ev:
            self.intents[ev["intent"]] = (ev["vol"], ev["off"], ev["len"])
        elif "ack" in ev:
            self.acked[ev["ack"]] = ev["seq"]
        elif "marker" in ev:
            self.markers.append((ev["marker"], ev["seq"], ev["name"]))
        elif "made" in ev:
            self.made.append(ev["made"])
        elif "error" in ev:
            self.errors.append(ev["error"])
        elif "ready" in ev:
            self.ready = ev["ready"]


def run_child_until_power_cut(tmp_path, state, pool, dm, flakeys, *, seed, span, max_snaps):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    err_path = tmp_path / "child.err"
    ev = Events()
    lines: queue.Queue[str | None] = queue.Queue()
    with open(err_path, "w") as err:
        child = subprocess.Popen(
            [sys.executable, str(script), HERE, state, pool, str(seed), str(span), str(max_snaps)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, "PYTHONPATH": REPO},
        )
    assert child.stdout is not None

    def pump() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    rng = random.Random(seed)
    cut_after = rng.uniform(0.3, 2.0)  # after the first acknowledgement
    first_ack = None
    deadline = time.monotonic() + 90  # Python's start-up is slow in the VM
    try:
        while True:
            now = time.monotonic()
            if (
                first_ack is not None
                and now - first_ack > cut_after
                and len(ev.markers) >= 2
                and ev.made  # a snapshot the replay then writes over
            ):
                break
            assert now < deadline, (
                f"no cut point: {len(ev.acked)} acks, {len(ev.markers)} markers, "
                f"{len(ev.made)} made, errors {ev.errors}"
            )
            try:
                line = lines.get(timeout=0.05)
            except queue.Empty:
                continue
            assert line is not None, "child exited: " + err_path.read_text()[-2000:]
            ev.take(line)
            if first_ack is None and ev.acked:
                first_ack = time.monotonic()
    finally:
        # The power cut: the process dies, and before the kernel can write
        # anything more on its behalf both devices stop taking writes.
        child.send_signal(signal.SIGKILL)
        try:
            cut_power(dm, flakeys)
        finally:
            child.wait()
            reader.join(30)
    while (line := lines.get()) is not None:  # printed before SIGKILL: acknowledged before the cut
        ev.take(line)
    return ev


@pytest.mark.parametrize("backend", ["thin", "classic"])
def test_power_cut_of_journal_and_data_devices_loses_nothing_acknowledged(
    dm, loopdev, tmp_path, backend
):
    pool = "pf"
    state = str(tmp_path / "state")
    # classic: each snapshot's 4 MiB COW area must hold what the writers change
    span = VOL if backend == "thin" else 2 * MiB
    max_snaps = 10 if backend == "thin" else 6
    data_lo, journal_lo = loopdev(128 * MiB), loopdev(16 * MiB)
    flakeys: list[FaultDevice] = []
    m: Manager | None = None
    try:
        flakeys.append(FaultDevice(dm, "jfault-data", data_lo))
        flakeys.append(FaultDevice(dm, "jfault-journal", journal_lo))
        data, journal = flakeys
        first = Manager(state)
        try:
            first.pool_create(pool, backend=backend, data=data.path, journal=journal.path)
            for name in ("a", "b"):
                first.volume_create(pool, name, VOL)
            vols = {v.name: v.id for v in first.catalog.volumes(pool)}
        finally:
            first.close(drain=True)

        ev = run_child_until_power_cut(
            tmp_path, state, pool, dm, flakeys, seed=7, span=span, max_snaps=max_snaps
        )
        assert ev.ready == {pool: "ok"} and not ev.errors, (ev.ready, ev.errors)
        # the model: acknowledged writes by seq; the sectors of writes issued
        # but not acknowledged are unknown (they may or may not have landed)
        model = Model({vid: VOL for vid in vols.values()})
        mask = Mask({vid: VOL for vid in vols.values()})
        for wid, (vid, off, length) in ev.intents.items():
            if wid in ev.acked:
                model.record(ev.acked[wid], vid, off, pattern(wid, length))
            else:
                mask.add(vid, off, length)

        def same(got: bytes, want: bytes | bytearray, vid: int, what: str) -> None:
            g, w = mask.apply(vid, got), mask.apply(vid, want)
            assert g == w, f"{what}: " + first_difference(g, w)

        # The stack goes down while writes are still dropped: the thin pool's
        # commit on removal never reaches the disk.
        removed = remove_pool_stack(dm, pool)
        assert f"dmsnap-{pool}-a" in removed and f"dmsnap-{pool}-b" in removed, removed
        for d in flakeys:
            d.switch(d.up)

        m = Manager(state)
        done_before = {mk.id for mk in m.catalog.markers(m.catalog.pool(pool).id, "done")}
        report = m.assemble()
        assert report["pools"][pool] == "ok", report
        pj = m.journals.by_pool[m.catalog.pool(pool).id]
        recovered = pj.stats().recovered_records
        print(
            f"\n{backend}: {len(ev.acked)} of {len(ev.intents)} writes and "
            f"{len(ev.markers)} markers acknowledged before the cut; {len(done_before)} "
            f"snapshots made before it; {recovered} journal records replayed; "
            f"recovery: {[(r['kind'], r['result']) for r in report['recovered']]}"
        )
        assert len(ev.acked) > 20 and len(ev.markers) >= 2, (len(ev.acked), len(ev.markers))

        # every acknowledged marker: done, exactly one snapshot group of both volumes
        deadline = time.monotonic() + 120
        for mk, _, name in ev.markers:
            while (r := m.snapshot_request(pool, marker=mk))["state"] == "pending":
                assert time.monotonic() < deadline, f"marker {mk} ({name}) never made: {r}"
                time.sleep(0.05)
            assert r["state"] == "done", r
            assert r["name"] == name and sorted(s["volume"] for s in r["snapshots"]) == [
                "a",
                "b",
            ], r
        groups = dict(
            m.catalog.db.execute(
                "SELECT marker, COUNT(*) FROM snap_groups WHERE marker IS NOT NULL GROUP BY marker"
            ).fetchall()
        )
        assert all(groups.get(mk) == 1 for mk, _, _ in ev.markers), groups
        assert all(n == 1 for n in groups.values()), groups
        for mk in ev.made:  # made before the cut: still there
            assert m.snapshot_request(pool, marker=mk)["state"] == "done", mk

        for vname, vid in vols.items():
            same(m.open_volume(pool, vname).read(0, VOL), model.state(vid), vid, f"{vname} now")
        for mk, seq, name in ev.markers:
            for vname, vid in vols.items():
                act = m.snapshot_activate(pool, vname, name)
                try:
                    got = read_direct(act["path"], 0, VOL)
                finally:
                    m.snapshot_deactivate(pool, vname, name)
                same(got, model.state(vid, seq), vid, f"{vname}@{name} (marker {mk}, seq {seq})")

        # the pool goes on: a new snapshot after recovery is made and is right
        r = m.snapshot_create([[pool, "a"], [pool, "b"]], "after", wait=True, timeout=120)
        assert r["state"] == "done", r
        for vname, vid in vols.items():
            act = m.snapshot_activate(pool, vname, "after")
            try:
                got = read_direct(act["path"], 0, VOL)
            finally:
                m.snapshot_deactivate(pool, vname, "after")
            same(got, m.open_volume(pool, vname).read(0, VOL), vid, f"{vname}@after")
        show = m.pool_show(pool)
        assert show["health"] == [], show["health"]
        stuck = [mk.name for mk in m.catalog.markers(m.catalog.pool(pool).id, "pending")]
        assert not stuck, f"markers left pending after recovery: {stuck}"
    finally:
        if m is not None:
            try:
                m.pool_destroy(pool, force=True)
            finally:
                m.close(drain=False)
        remove_pool_stack(dm, pool)
        for d in reversed(flakeys):
            d.remove()


# -- dm-log-writes under the flusher ------------------------------------------------------


def test_log_writes_replayed_to_each_snapshot_mark_equals_the_model(dm, loopdev, tmp_path):
    """Every write the flusher put on the data device before a marker is on
    it (completed and flushed) when the snapshot is made, and nothing after
    the marker is: the log, replayed up to the mark set just before the
    snapshot, holds each volume's extent exactly as the model at the
    marker."""
    pool = "lw"
    data_lo, log_lo = loopdev(128 * MiB), loopdev(256 * MiB)
    lw_name = "jfault-logwrites"
    n = sectors_of(data_lo.path)
    dm.create(
        lw_name,
        make_uuid(Role.TEST, lw_name),
        Table.single(n, t.LogWrites(data_lo.devno, log_lo.devno)),
    )
    mgr = Manager(str(tmp_path / "state"))
    try:
        mgr.pool_create(
            pool, backend="classic", data=f"/dev/mapper/{lw_name}", journal_size=8 * MiB
        )
        for name in ("a", "b"):
            mgr.volume_create(pool, name, VOL)
        vols = {v.name: v.id for v in mgr.catalog.volumes(pool)}
        extents = {v.id: v.extent_start * SECTOR for v in mgr.catalog.volumes(pool)}
        io = {vid: mgr.open_volume(pool, name) for name, vid in vols.items()}
        model = Model({vid: VOL for vid in vols.values()})

        real = mgr._materialize
        marked: list[int] = []

        def mark_then_materialize(pool_id, marker_id, request):
            # Called with the Manager's lock held, the flusher standing at the
            # marker with every earlier write completed and fdatasync()ed.
            mk = mgr.catalog.marker(marker_id)
            if mk is not None and mk.state == "pending":  # made once; a repeat is a no-op
                mgr.dm.message(lw_name, f"mark m{marker_id}")
                marked.append(marker_id)
            return real(pool_id, marker_id, request)

        mgr._materialize = mark_then_materialize
        ts, errors = run_writers(
            io, model, list(vols.values()), threads=4, writes=250, seed=21, span=2 * MiB
        )
        snaps: list[tuple[str, int, int]] = []  # name, marker id, marker seq
        while any(th.is_alive() for th in ts) and len(snaps) < 8:  # 4 MiB COW per snapshot
            r = mgr.snapshot_create([[pool, "a"], [pool, "b"]], f"s{len(snaps)}")
            snaps.append((r["name"], r["marker"], r["seq"]))
            time.sleep(0.02)
        for th in ts:
            th.join()
        assert not errors, errors
        wait_done(mgr, pool, [mk for _, mk, _ in snaps])
        assert len(snaps) >= 3, "writers finished before snapshots could interleave"
        assert sorted(marked) == sorted(mk for _, mk, _ in snaps), marked
        for vid in vols.values():
            assert io[vid].read(0, VOL) == model.state(vid)
        s = dm.status(lw_name)[0].status
        assert isinstance(s, st.LogWritesStatus) and not s.logging_disabled, s
        mgr.pool_destroy(pool, force=True)  # drains the journal onto the volumes first
    finally:
        with contextlib.suppress(Exception):
            if pool in {p.name for p in mgr.catalog.pools()}:
                mgr.pool_destroy(pool, force=True)
        mgr.close(drain=False)
        remove_pool_stack(dm, pool)
        # the destructor logs the writes no flush covered yet, then its end mark
        if dm.exists(lw_name):
            dm.remove(lw_name)

    # the backing file, not /dev/loopN: that node's page cache may hold what
    # udev read before the target wrote underneath it
    log = LogWritesLog(log_lo.backing_file)
    seq_of = {f"m{mk}": (name, mk, seq) for name, mk, seq in snaps}
    replay_path = str(tmp_path / "replay.img")
    fd = os.open(replay_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, n * SECTOR)
        seen: list[str] = []
        for e in log.replay(fd):
            seen.append(e.mark or "")
            if e.mark not in seq_of:
                continue
            name, _, seq = seq_of[e.mark]
            for vname, vid in vols.items():
                got = os.pread(fd, VOL, extents[vid])
                want = model.state(vid, seq)
                assert got == want, (
                    f"log replayed to mark {e.mark} (entry {e.index}): {vname} is not the model "
                    f"at {name} (marker seq {seq}): " + first_difference(got, want)
                )
        # every snapshot's mark once, in marker order, and the log's own end last
        assert seen == [f"m{mk}" for _, mk, _ in sorted(snaps, key=lambda x: x[2])] + [
            LOG_END_MARK
        ], seen
        # the replayer's self-check: the whole log gives the data device as it is
        for off in range(0, n * SECTOR, VOL):
            length = min(VOL, n * SECTOR - off)
            got, want = os.pread(fd, length, off), read_direct(data_lo.path, off, length)
            assert got == want, f"replayed log vs data device at {off}: " + first_difference(
                got, want
            )
        # and the volumes' final content is the model with every write
        for vid in vols.values():
            assert os.pread(fd, VOL, extents[vid]) == model.state(vid)
    finally:
        os.close(fd)
