"""Property test: concurrent writers and markers against a model oracle.

Several threads issue random writes and discards (shared volume 1: any
thread anywhere; volume 2: each thread its own stripe, which it also reads
back) and random markers. A discard is, to the model, a write of zeros (the
volume files are regular files: the flusher punches holes). The test
backend copies the volume files at every marker. Oracle:

* the journal order is consistent with real time: a write acknowledged
  before a marker call began has a smaller seq than the marker, a write
  started after the marker returned a larger one (and likewise between
  writes);
* each snapshot equals the model that applies, in seq order, exactly the
  writes with seq < the marker's seq (so a write concurrent with the marker
  is in or out as a whole, as the journal ordered it);
* a read of a thread's private stripe equals that thread's own model;
* at the end, the volume files equal the model of all writes.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_journal_support import Controller, make_volume, pattern

from dmsnap.journal import Journal

settings.register_profile(
    "journal",
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

KiB = 1024
VOL = 256 * KiB
THREADS = 3
STRIPE = VOL // THREADS // 512 * 512

op = st.one_of(
    st.tuples(
        st.just("w"),
        st.sampled_from([1, 2]),
        st.integers(0, 400),  # sector (folded into range)
        st.integers(1, 24),  # sectors
    ),
    st.tuples(
        st.just("d"),
        st.sampled_from([1, 2]),
        st.integers(0, 400),
        st.integers(1, 64),  # up to 32 KiB: over several index blocks and writes
    ),
    st.tuples(st.just("m"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("r"), st.just(2), st.integers(0, 400), st.integers(1, 24)),
)
program = st.lists(st.lists(op, max_size=25), min_size=THREADS, max_size=THREADS)


@dataclass
class W:
    seq: int
    vol: int
    off: int
    data: bytes
    start: int  # logical clock at the call
    end: int  # logical clock at the acknowledgement


@dataclass
class M:
    id: int
    seq: int
    start: int
    end: int


def model_at(writes: list[W], limit: int | None) -> dict[int, bytearray]:
    state = {1: bytearray(VOL), 2: bytearray(VOL)}
    for w in sorted(writes, key=lambda w: w.seq):
        if limit is not None and w.seq >= limit:
            break
        state[w.vol][w.off : w.off + len(w.data)] = w.data
    return state


def run_program(tmp: Path, mode: str, prog: list[list[tuple[str, int, int, int]]]) -> None:
    vols = {1: make_volume(tmp / "v1", VOL), 2: make_volume(tmp / "v2", VOL)}
    if mode == "nv":
        Journal.format(str(tmp / "j"), 8192 + 96 * KiB)  # small: wraps and fills
        j = Journal.open(str(tmp / "j"))
    else:
        j = Journal.open(mode="ram", ram_size=96 * KiB)
    for v, p in vols.items():
        j.attach(v, str(p), VOL)
    j.start()
    clock = itertools.count()
    clock_lock = threading.Lock()
    writes: list[W] = []
    markers: list[M] = []
    failures: list[str] = []
    tags = itertools.count(1)
    ids = itertools.count(1)

    def tick() -> int:
        with clock_lock:
            return next(clock)

    def worker(t: int, ops: list[tuple[str, int, int, int]]) -> None:
        own = bytearray(STRIPE)  # this thread's stripe of volume 2
        base = t * STRIPE
        try:
            for kind, vol, sector, nsec in ops:
                if kind == "m":
                    mid = next(ids)
                    s = tick()
                    seq = j.marker(mid, f"marker {mid}".encode())
                    markers.append(M(mid, seq, s, tick()))
                    continue
                ln = min(nsec * 512, STRIPE if vol == 2 else VOL)
                span = (STRIPE if vol == 2 else VOL) - ln
                off = (sector * 512) % (span + 512) // 512 * 512
                if vol == 2:
                    off += base
                if kind == "r":
                    got = j.read(2, off, ln)
                    if got != bytes(own[off - base : off - base + ln]):
                        failures.append(f"thread {t}: read vol 2 @{off}+{ln} != own model")
                    continue
                if kind == "d":
                    data = bytes(ln)
                    s = tick()
                    seq = j.discard(vol, off, ln)
                else:
                    data = pattern(next(tags), ln)
                    s = tick()
                    seq = j.write(vol, off, data)
                writes.append(W(seq, vol, off, data, s, tick()))
                if vol == 2:
                    own[off - base : off - base + ln] = data
        except Exception as e:  # pragma: no cover - reported below
            failures.append(f"thread {t}: {e!r}")

    with Controller(j, vols) as ctl:
        ts = [threading.Thread(target=worker, args=(t, ops)) for t, ops in enumerate(prog)]
        for th in ts:
            th.start()
        for th in ts:
            th.join(60)
        j.sync(timeout=30)  # every marker passed, everything on the files
    j.close()
    assert not failures, failures

    # journal order respects real time
    seqs = [w.seq for w in writes] + [m.seq for m in markers]
    assert len(set(seqs)) == len(seqs)
    events = [(w.seq, w.start, w.end) for w in writes] + [(m.seq, m.start, m.end) for m in markers]
    for a_seq, _a_start, a_end in events:
        for b_seq, b_start, _b_end in events:
            if a_end < b_start:
                assert a_seq < b_seq, "an acknowledged record ordered after a later call"

    # every marker materialised once, in order, equal to the model at it
    assert sorted(ctl.order) == sorted(m.id for m in markers)
    by_id = {m.id: m for m in markers}
    assert [by_id[i].seq for i in ctl.order] == sorted(m.seq for m in markers)
    for mid, (mseq, copies) in ctl.snaps.items():
        assert mseq == by_id[mid].seq
        want = model_at(writes, mseq)
        for v in (1, 2):
            assert copies[v] == want[v], f"snapshot of marker {mid} volume {v} != model"

    final = model_at(writes, None)
    for v, p in vols.items():
        assert p.read_bytes() == final[v], f"volume {v} != model after sync"


@settings(settings.get_profile("journal"))
@given(prog=program)
def test_model_nv(tmp_path_factory, prog) -> None:  # type: ignore[no-untyped-def]
    run_program(tmp_path_factory.mktemp("nv"), "nv", prog)


@settings(settings.get_profile("journal"))
@given(prog=program)
def test_model_ram(tmp_path_factory, prog) -> None:  # type: ignore[no-untyped-def]
    run_program(tmp_path_factory.mktemp("ram"), "ram", prog)
