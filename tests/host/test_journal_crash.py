"""Crash and recovery: kill -9 a writer process at random points, tear the
journal's tail, recover, and check against what was acknowledged.

The child (a small script) writes and discards from several threads and
appends markers to an NV journal file, and reports on stdout *after* each
acknowledgement ("A tag seq" / "MA id seq"), announcing each write before
issuing it ("I tag vol off len", "D tag vol off len" for a discard). Its
test backend materialises markers by copying the volume files and records
the marker id in ``done.log`` (fsynced before ``marker_done``), like the
catalog. Several rounds (each a new journal
generation) are killed; between rounds the tail after the last
acknowledged or materialised record may be torn: random garbage, a partly
written record, or a forged record of an older generation with the right
seq at the right place. Then the parent recovers with its own backend.

Oracle, per 512-byte sector (every write's sectors carry its unique tag):
* final state: the newest acknowledged write covering the sector (zero if
  none or if it is a discard), or a write or discard that was never
  acknowledged (in flight at the kill);
* every acknowledged marker is materialised exactly once (child + parent),
  and each snapshot obeys the same rule restricted to seqs below its marker.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_journal_support import (
    WRITE,
    Controller,
    make_record,
    make_volume,
    parse_journal,
    pattern,
    sector_tag,
    write_ring,
)

from dmsnap.journal import Journal, JournalError

KiB, MiB = 1024, 1 << 20
VOL = 1 * MiB
STALE_TAG = 0x5757_5757

CHILD = textwrap.dedent(
    r"""
    import os, random, struct, sys, threading
    from dmsnap.journal import Journal

    jpath, workdir, seed, rnd_round = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    vols = {1: os.path.join(workdir, "v1"), 2: os.path.join(workdir, "v2")}
    VOL = 1 << 20
    out_lock = threading.Lock()

    def say(line):
        with out_lock:
            os.write(1, (line + "\n").encode())

    def pattern(tag, length):
        return b"".join(struct.pack("<QQ", tag, i) * 32 for i in range(length // 512))

    done_path = os.path.join(workdir, "done.log")
    done = set()
    if os.path.exists(done_path):
        for line in open(done_path):
            done.add(int(line.split()[0]))

    j = Journal.open(jpath)
    for v, p in vols.items():
        j.attach(v, p, VOL)
    j.start()

    def controller():
        while True:
            m = j.next_marker(0.05)
            if m is None:
                continue
            if m.id not in done:
                for v, p in vols.items():
                    data = open(p, "rb").read()
                    tmp = os.path.join(workdir, f"snaps/{m.id}.{v}.tmp")
                    with open(tmp, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.rename(tmp, os.path.join(workdir, f"snaps/{m.id}.{v}"))
                with open(done_path, "a") as f:
                    f.write(f"{m.id} {m.seq}\n")
                    f.flush()
                    os.fsync(f.fileno())
                done.add(m.id)
            j.marker_done(m.id)

    def writer(t):
        rnd = random.Random(seed * 100 + t)
        n = 0
        while True:
            n += 1
            if t == 0 and n % 15 == 0:
                mid = rnd_round * 1_000_000 + n
                say(f"MI {mid}")
                seq = j.marker(mid, b"snap %d" % mid)
                say(f"MA {mid} {seq}")
                continue
            tag = (rnd_round * 16 + t) * 1_000_000 + n
            vol = rnd.choice([1, 2])
            ln = rnd.choice([512, 1024, 4096, 4096, 8192, 16384, 3 * 512])
            off = rnd.randrange(0, (VOL - ln) // 512 + 1) * 512
            if rnd.random() < 0.2:
                ln = rnd.choice([512, 8192, 65536, 5 * 4096 + 1024])
                off = rnd.randrange(0, (VOL - ln) // 512 + 1) * 512
                say(f"D {tag} {vol} {off} {ln}")
                seq = j.discard(vol, off, ln)
            else:
                say(f"I {tag} {vol} {off} {ln}")
                seq = j.write(vol, off, pattern(tag, ln))
            say(f"A {tag} {seq}")

    threading.Thread(target=controller, daemon=True).start()
    for t in range(3):
        threading.Thread(target=writer, args=(t,), daemon=True).start()
    threading.Event().wait()
    """
)


@dataclass
class Wr:
    tag: int
    vol: int
    off: int
    ln: int
    seq: int | None = None
    discard: bool = False


class History:
    def __init__(self) -> None:
        self.writes: dict[int, Wr] = {}
        self.markers: dict[int, int] = {}  # acknowledged marker id -> seq
        self.marker_intents: set[int] = set()

    def feed(self, line: str) -> None:
        f = line.split()
        if not f:
            return
        if f[0] in ("I", "D"):
            tag, vol, off, ln = map(int, f[1:])
            self.writes[tag] = Wr(tag, vol, off, ln, discard=f[0] == "D")
        elif f[0] == "A":
            self.writes[int(f[1])].seq = int(f[2])
        elif f[0] == "MI":
            self.marker_intents.add(int(f[1]))
        elif f[0] == "MA":
            self.markers[int(f[1])] = int(f[2])

    def last_acked_seq(self) -> int:
        seqs = [w.seq for w in self.writes.values() if w.seq is not None]
        return max([0, *seqs, *self.markers.values()])

    def check_state(self, vols: dict[int, bytes], limit: int | None, what: str) -> None:
        """Every sector: the newest acknowledged write below limit covering
        it (or zero: none, or a discard), or a never-acknowledged write or
        discard covering it."""
        newest: dict[tuple[int, int], Wr] = {}
        maybe: dict[tuple[int, int], set[int]] = {}
        for w in sorted(self.writes.values(), key=lambda w: w.seq or 0):
            for s in range(w.off // 512, (w.off + w.ln) // 512):
                if w.seq is None:
                    maybe.setdefault((w.vol, s), set()).add(w.tag)
                elif limit is None or w.seq < limit:
                    newest[(w.vol, s)] = w
        for vol, data in vols.items():
            for s in range(len(data) // 512):
                got = sector_tag(data[s * 512 : (s + 1) * 512])
                w = newest.get((vol, s))
                want = (w.tag, s - w.off // 512) if w and not w.discard else None
                if got == want:
                    continue
                inflight = maybe.get((vol, s), set())
                if got is None:
                    ok = any(self.writes[t].discard for t in inflight)
                else:
                    ok = got[0] in inflight and not self.writes[got[0]].discard
                if ok and got is not None:
                    wu = self.writes[got[0]]
                    ok = got[1] == s - wu.off // 512
                assert ok, f"{what}: volume {vol} sector {s}: found {got}, expected {want}"


def run_child(
    jpath: Path, work: Path, seed: int, rnd_round: int, lines: int, hist: History
) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(jpath), str(work), str(seed), str(rnd_round)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert p.stdout is not None and p.stderr is not None
    got = 0
    try:
        while got < lines:
            line = p.stdout.readline()
            if not line:
                pytest.fail(f"child died: {p.stderr.read().decode()[-2000:]}")
            hist.feed(line.decode())
            got += 1
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    # what the child reported before it died was acknowledged
    for line in p.stdout.read().decode().splitlines(keepends=True):
        if line.endswith("\n"):
            hist.feed(line)
    p.stdout.close()
    p.stderr.close()


def tear_tail(jpath: Path, work: Path, hist: History, rnd: random.Random) -> str:
    """Damage the journal after everything acknowledged or materialised."""
    done_seqs = [int(x.split()[1]) for x in (work / "done.log").read_text().split("\n") if x]
    sb, recs = parse_journal(jpath)
    # A power cut cannot tear what was durable. The child's reports lag its
    # acknowledgements (killed between the two), so the records' own ack_lag
    # (how far the log was durable when each was appended) bounds it too.
    durable = [r.seq - r.ack_lag for r in recs if r.ack_lag]
    keep = max([hist.last_acked_seq(), *done_seqs, *durable])
    cap = sb.capacity
    after = [r for r in recs if r.seq > keep]
    kept = [r for r in recs if r.seq <= keep]
    if after:
        pos, seq = after[0].pos, after[0].seq
    elif recs:
        pos, seq = (recs[-1].pos + recs[-1].size) % cap, recs[-1].seq + 1
    else:
        pos, seq = sb.ckpt_pos, sb.ckpt_seq
    # only the ring's free space and the unacknowledged records may be hit:
    # never past the ring's end, nor (wrapping) into the live log's start
    room = min(cap - pos, (sb.ckpt_pos - pos) % cap or (0 if kept else cap))
    mode = rnd.choice(["none", "garbage", "partial", "stale"])
    if mode == "stale":
        prev_gen = kept[-1].generation if kept else 0
        if prev_gen >= 2 and room >= 1024:
            rec = make_record(
                journal_id=sb.journal_id,
                generation=prev_gen - 1,
                seq=seq,
                type=WRITE,
                vol=1,
                offset=0,
                data=pattern(STALE_TAG, 512),
                align=sb.align,
            )
            write_ring(jpath, pos, rec)
            return f"stale gen {prev_gen - 1} seq {seq} @{pos}"
        mode = "garbage"
    if mode == "partial" and after:
        # the log's last record: a torn tail. A damaged record with records
        # appended after it had become durable is no tail: recovery refuses
        # that journal (tests/host/test_journal_recovery.py)
        r = after[-1]
        cut = r.pos + r.size - 512
        if cut > r.pos:
            write_ring(jpath, cut, os.urandom(512))
            return f"partial seq {r.seq} @{r.pos}"
        mode = "garbage"
    if mode in ("garbage", "partial"):
        n = min(rnd.randrange(1, 33) * 512, room)
        if not n:
            return "none (ring full)"
        write_ring(jpath, pos, os.urandom(n))
        return f"garbage {n} @{pos}"
    return "none"


@pytest.mark.parametrize("seed", range(4))
def test_kill9_rounds_then_recover(tmp_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    work = tmp_path
    (work / "snaps").mkdir()
    (work / "done.log").write_text("")
    vols = {1: make_volume(work / "v1", VOL), 2: make_volume(work / "v2", VOL)}
    jpath = work / "journal"
    Journal.format(str(jpath), 8192 + 512 * KiB)  # wraps within a round
    hist = History()
    tears = []
    for r in range(1, 4):
        run_child(jpath, work, seed, r, rnd.randrange(60, 900), hist)
        tears.append(tear_tail(jpath, work, hist, rnd))

    # recovery with a new controller; done.log plays the catalog
    done_lines = (work / "done.log").read_text().split("\n")
    child_done = [tuple(map(int, x.split())) for x in done_lines if x]
    done_ids = {i for i, _ in child_done}
    assert len(done_ids) == len(child_done), "child materialised a marker twice"
    j = Journal.open(str(jpath))
    st0 = j.stats()
    assert st0.generation == 4
    for v, p in vols.items():
        j.attach(v, str(p), VOL)
    j.start()
    with Controller(j, vols, done_ids=set(done_ids)) as ctl:
        j.sync(timeout=30)
    j.close()
    with Journal.open(str(jpath)) as j:
        assert j.stats().recovered_records == 0  # drained

    # markers: every acknowledged one materialised exactly once
    materialised = [i for i, _ in child_done] + ctl.order
    assert len(materialised) == len(set(materialised)), (materialised, tears)
    missing = set(hist.markers) - set(materialised)
    assert not missing, f"acknowledged markers lost: {missing} ({tears})"
    assert set(materialised) <= hist.marker_intents

    final = {v: p.read_bytes() for v, p in vols.items()}
    hist.check_state(final, None, f"final state ({tears})")
    for v in final:
        for s in range(len(final[v]) // 512):
            assert struct.unpack_from("<Q", final[v], s * 512)[0] != STALE_TAG

    # snapshots: the child's files and the parent's copies
    seq_of = dict(child_done)
    seq_of.update({m.id: m.seq for m in ctl.delivered})
    for mid, _ in child_done:
        copies = {v: (work / "snaps" / f"{mid}.{v}").read_bytes() for v in vols}
        hist.check_state(copies, seq_of[mid], f"snapshot {mid} ({tears})")
    for mid, (mseq, copies) in ctl.snaps.items():
        hist.check_state(copies, mseq, f"recovered snapshot {mid} ({tears})")
    for mid, seq in hist.markers.items():
        assert seq_of[mid] == seq, f"marker {mid} materialised at seq {seq_of[mid]} != acked {seq}"


def test_stale_record_of_an_earlier_generation_is_rejected(tmp_path: Path) -> None:
    """Hand-built with the documented layout: after a gen-2 record at seq 2,
    a valid-looking gen-1 record with seq 3 at exactly the next position
    (left over from a torn batch) must end the log."""
    vol = make_volume(tmp_path / "v", VOL)
    jp = tmp_path / "j"
    Journal.format(str(jp), 8192 + 256 * KiB)
    j = Journal.open(str(jp))  # generation 1
    j.attach(1, str(vol), VOL)
    j.start()
    j.marker(1, b"hold")
    assert j.next_marker(5) is not None  # hold the flusher: nothing reaches dm
    j.write(1, 0, pattern(0xA, 4096))  # seq 2
    j.write(1, 4096, pattern(0xB, 4096))  # seq 3
    j.close(drain=False)

    sb, recs = parse_journal(jp)
    assert [(r.seq, r.generation, r.type) for r in recs] == [(1, 1, 2), (2, 1, 1), (3, 1, 1)]
    a = recs[1]
    # control: as written, all three records are recovered
    with Journal.open(str(jp)) as j2:  # generation 2
        assert j2.stats().recovered_records == 3
        j2.close(drain=False)
    # generation 2 rewrote seq 2 in place (same size), then crashed before
    # writing its seq 3: the gen-1 seq 3 after it is stale
    forged = make_record(
        journal_id=sb.journal_id,
        generation=2,
        seq=2,
        type=WRITE,
        vol=1,
        offset=0,
        data=pattern(0xC, 4096),
        align=sb.align,
    )
    assert len(forged) == a.size
    write_ring(jp, a.pos, forged)
    with Journal.open(str(jp)) as j3:  # generation 3
        st = j3.stats()
        assert st.generation == 3 and st.recovered_records == 2 and st.head_seq == 3
        j3.attach(1, str(vol), VOL)
        j3.start()
        m = j3.next_marker(5)
        assert m is not None and m.id == 1
        j3.marker_done(1)
        j3.sync()
        assert j3.read(1, 0, 8192) == pattern(0xC, 4096) + bytes(4096)
    assert vol.read_bytes()[:8192] == pattern(0xC, 4096) + bytes(4096)


def test_torn_superblock_falls_back_to_the_other_slot(tmp_path: Path) -> None:
    vol = make_volume(tmp_path / "v", VOL)
    jp = tmp_path / "j"
    Journal.format(str(jp), 8192 + 256 * KiB)
    with Journal.open(str(jp)) as j:
        j.attach(1, str(vol), VOL)
        j.start()
        j.write(1, 0, pattern(1, 4096))
        j.marker(1, b"hold")
        assert j.next_marker(5) is not None
        j.write(1, 4096, pattern(2, 4096))
        j.close(drain=False)
    from test_journal_support import read_supers

    supers = read_supers(jp)
    newest = max((s for s in supers if s.valid), key=lambda s: s.sb_seq)
    with open(jp, "r+b") as f:  # tear the newest slot
        f.seek(newest.slot * 4096 + 40)
        f.write(os.urandom(16))
    with Journal.open(str(jp)) as j:
        st = j.stats()
        # the older checkpoint replays more, which is harmless: the write
        # before the marker is on the volume already and is written again
        assert st.recovered_records >= 3
        j.attach(1, str(vol), VOL)
        j.start()
        m = j.next_marker(5)
        assert m is not None and m.id == 1
        j.marker_done(1)
        j.sync()
    assert vol.read_bytes()[:8192] == pattern(1, 4096) + pattern(2, 4096)
    # both slots garbled: not a journal any more
    with open(jp, "r+b") as f:
        f.write(os.urandom(8192))
    with pytest.raises(JournalError):
        Journal.open(str(jp))


def test_log_after_each_kill_holds_every_acknowledged_record(tmp_path: Path) -> None:
    """Short lives, killed during heavy group commit: the on-disk log (parsed
    independently of the C code) is a gap-free chain from the checkpoint that
    holds every acknowledged record."""
    work = tmp_path
    (work / "snaps").mkdir()
    (work / "done.log").write_text("")
    make_volume(work / "v1", VOL)
    make_volume(work / "v2", VOL)
    jpath = work / "journal"
    Journal.format(str(jpath), 8192 + 256 * KiB)
    hist = History()
    for r in range(1, 6):
        run_child(jpath, work, 99, r, 40 * r, hist)
        sb, recs = parse_journal(jpath)
        seqs = [rec.seq for rec in recs]
        assert seqs == list(range(sb.ckpt_seq, sb.ckpt_seq + len(seqs)))
        acked = hist.last_acked_seq()
        if acked >= sb.ckpt_seq:  # every acknowledged record after the checkpoint is there
            assert recs and recs[-1].seq >= acked
