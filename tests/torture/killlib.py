"""What the process-fault campaigns share (issue 18 §2): a real dmsnapd
process, a time-and-sequence model of what it acknowledged, and the checks
of a running daemon against the model and against the kernel.

The model (``Ledger``): writers each own a disjoint region of a volume and
have one write in flight at a time, so a region's history is one ordered
list. A write is *in* a point in time when it was acknowledged before the
point was asked for (or, where both carry journal sequence numbers, when
its number is below the marker's), *out* when it was issued after the
point was acknowledged (or, unacknowledged, after the kill), and unknown
otherwise: unknown sectors are masked on both sides of a comparison
(jmodel's ``Mask`` idea), and a later known write over them makes them
known again.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from jmodel import SECTOR, first_difference, pattern

from dmsnap.cli_progress import Trials
from dmsnap.client import Client
from dmsnap.dm import DeviceMapper
from dmsnap.dm import targets as t
from dmsnap.errors import UserError
from dmsnap.scsi import lio
from dmsnap.storage import names

MiB = 1 << 20
CHUNK = 256 << 10  # volume.read answers at most this much; a write request is < 1 MiB
DMSNAPD = os.path.join(os.path.dirname(sys.executable), "dmsnapd")


class Violation(Exception):
    pass


# -- the daemon ------------------------------------------------------------------------


class Daemon:
    """dmsnapd as a real process on its own state directory and socket."""

    def __init__(self, work: str, env: dict[str, str] | None = None) -> None:
        self.state = os.path.join(work, "state")
        self.sock = os.path.join(work, "dmsnapd.sock")
        self.log = os.path.join(work, "dmsnapd.log")
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def client(self, timeout: float | None = 120) -> Client:
        return Client(self.sock, timeout=timeout)

    def call(self, op: str, timeout: float | None = 300, **args: object) -> object:
        with self.client(timeout) as c:
            return c.call(op, **args)

    def start(self, timeout: float = 180) -> float:
        """Start and wait until it answers; returns the seconds that took."""
        t0 = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [DMSNAPD, "--state-dir", self.state, "--socket", self.sock],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, **self.env},
            )
        while True:
            try:
                self.call("daemon.ping", timeout=10)
                return time.monotonic() - t0
            except UserError:
                pass
            if self.proc.poll() is not None:
                raise Violation(f"dmsnapd exited {self.proc.returncode} at start: {self.tail()}")
            if time.monotonic() - t0 > timeout:
                raise Violation(f"dmsnapd did not answer within {timeout:.0f}s: {self.tail()}")
            time.sleep(0.1)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, teardown: bool = False) -> None:
        if not self.alive():
            return
        with contextlib.suppress(UserError):
            self.call("daemon.stop", teardown=teardown)
        assert self.proc is not None
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.kill9()

    def tail(self, n: int = 3000) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log) - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def write(self, pool: str, vol: str, off: int, data: bytes) -> None:
        for o in range(0, len(data), CHUNK):
            content = base64.b64encode(data[o : o + CHUNK]).decode()
            self.call("volume.write", pool=pool, vol=vol, offset=off + o, content=content)

    def read(self, pool: str, vol: str, size: int) -> bytes:
        out = []
        for off in range(0, size, CHUNK):
            n = min(CHUNK, size - off)
            r = self.call("volume.read", pool=pool, vol=vol, offset=off, length=n)
            out.append(base64.b64decode(r["content"]))  # type: ignore[index]
        return b"".join(out)

    def db(self) -> sqlite3.Connection:
        """The catalog, read-only (WAL: readers never block the daemon)."""
        path = os.path.join(self.state, "catalog.db")
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)


# -- the model -------------------------------------------------------------------------


@dataclass
class Write:
    vol: str
    off: int
    length: int
    wid: int
    t0: float  # issued
    t1: float | None = None  # acknowledged (None: failed, or in flight at the end)
    seq: int | None = None  # journal sequence number (local writer)
    error: str | None = None

    def data(self) -> bytes:
        return pattern(self.wid, self.length)


@dataclass
class Point:
    """A snapshot request: its window and, once known, its marker's seq."""

    name: str
    vols: list[str]
    t_req: float
    t_ack: float | None = None
    seq: int | None = None
    t_kill: float | None = None  # the daemon died before it was acknowledged

    def end(self) -> float:
        if self.t_ack is not None:
            return self.t_ack
        assert self.t_kill is not None, self
        return self.t_kill


@dataclass
class Ledger:
    """Per volume, its known image at the trial's start plus the trial's
    writes in each writer's issue order."""

    base: dict[str, bytearray]
    unknown: dict[str, bytearray]  # per sector, 1 = unknown
    writes: dict[int, list[Write]] = field(default_factory=dict)  # by writer
    lock: threading.Lock = field(default_factory=threading.Lock)
    # settled images: the next trial's base (reset), never this trial's
    settled: dict[str, bytearray] = field(default_factory=dict)

    def add(self, writer: int, w: Write) -> None:
        with self.lock:
            self.writes.setdefault(writer, []).append(w)

    def image(self, vol: str, side) -> tuple[bytearray, bytearray]:
        """The volume's image and unknown sectors, each write put by ``side(w)``
        "in", "out" or "?" (unknown)."""
        return self._image(vol, side)

    def _image(self, vol: str, side) -> tuple[bytearray, bytearray]:
        img, unk = bytearray(self.base[vol]), bytearray(self.unknown[vol])
        with self.lock:
            lists = [list(ws) for ws in self.writes.values()]
        for ws in lists:
            for w in ws:
                if w.vol != vol:
                    continue
                s0, n = w.off // SECTOR, w.length // SECTOR
                where = side(w)
                if where == "in":
                    img[w.off : w.off + w.length] = w.data()
                    unk[s0 : s0 + n] = bytes(n)
                elif where == "?":
                    unk[s0 : s0 + n] = b"\x01" * n
        return img, unk

    def now(self, vol: str) -> tuple[bytearray, bytearray]:
        return self._image(vol, lambda w: "in" if w.t1 is not None else "?")

    def at(self, vol: str, p: Point) -> tuple[bytearray, bytearray]:
        def side(w: Write) -> str:
            if w.seq is not None and p.seq is not None:
                return "in" if w.seq < p.seq else "out"
            if w.t1 is not None and w.t1 < p.t_req:
                return "in"
            if w.t0 > p.end():
                return "out"
            return "?"

        return self._image(vol, side)

    def settle(self, vol: str, got: bytes) -> None:
        """After a check: what the volume holds now is the next trial's
        known base (from reset on; this trial's points still start from
        the base it began with)."""
        self.settled[vol] = bytearray(got)

    def reset(self) -> None:
        with self.lock:
            self.writes = {}
        for vol, img in self.settled.items():
            self.base[vol] = img
            self.unknown[vol] = bytearray(len(img) // SECTOR)
        self.settled = {}


def masked(img: bytes | bytearray, unk: bytearray) -> bytes:
    out = bytearray(img)
    i = unk.find(1)
    while i >= 0:
        j = unk.find(0, i)
        j = len(unk) if j < 0 else j
        out[i * SECTOR : j * SECTOR] = bytes((j - i) * SECTOR)
        i = unk.find(1, j)
    return bytes(out)


def compare(what: str, got: bytes, want: tuple[bytearray, bytearray]) -> None:
    img, unk = want
    g, w = masked(got, unk), masked(img, unk)
    if g != w:
        raise Violation(f"{what}: " + first_difference(g, w))


# -- the kernel against the catalog ----------------------------------------------------


def check_kernel(d: Daemon, dm: DeviceMapper, pool: str) -> str:
    """The catalog and the kernel agree: every volume's dm device exists (a
    thin one maps the catalog's thin device id), every dm device of the
    pool's public namespace is a catalog volume or an active snapshot, and
    the LIO backstores of the pool are exactly its catalog exports."""
    db = d.db()
    try:
        (pid,) = db.execute("SELECT id FROM pools WHERE name = ?", (pool,)).fetchone()
        q = "SELECT name, dev_id FROM volumes WHERE pool_id = ?"
        vols = dict(db.execute(q, (pid,)).fetchall())
        active = {
            f"{v}@{s}"
            for v, s in db.execute(
                "SELECT v.name, s.name FROM snapshots s JOIN volumes v ON v.id = s.volume_id "
                "WHERE v.pool_id = ? AND s.active",
                (pid,),
            )
        }
        # every pool's: LIO's backstores are the daemon's, not the pool's
        serials = {s for (s,) in db.execute("SELECT serial FROM exports")}
        backend = db.execute("SELECT backend FROM pools WHERE id = ?", (pid,)).fetchone()[0]
    finally:
        db.close()
    prefix = f"dmsnap-{pool}-"
    public = {
        e.name[len(prefix) :]
        for e in dm.list_devices()
        if e.name.startswith(prefix) and not e.name[len(prefix) :].startswith("_")
    }
    for v, dev_id in vols.items():
        if v not in public:
            raise Violation(f"volume {pool}/{v} is in the catalog, its dm device is not")
        if backend == "thin":
            tl = dm.table(names.dm_volume(pool, v)).lines
            target = tl[0].target if tl else None
            if not isinstance(target, t.Thin) or target.dev_id != dev_id:
                raise Violation(
                    f"volume {pool}/{v}: catalog thin id {dev_id}, the kernel maps {target}"
                )
    extra = public - set(vols) - active
    if extra:
        raise Violation(f"dm devices the catalog does not know: {sorted(extra)}")
    missing = {s for s in active if s not in public}
    if missing:
        raise Violation(f"active snapshots without a dm device: {sorted(missing)}")
    found = set()
    for s in serials:
        if lio.find_backstore(f"dmsnap-{s}") is None:
            raise Violation(f"export {s} is in the catalog, its LIO backstore is not")
        found.add(s)
    stray = lio_backstores() - {f"dmsnap-{s}" for s in serials}
    if stray:
        raise Violation(f"LIO backstores the catalog does not know: {sorted(stray)}")
    return f"{len(vols)} volumes, {len(active)} active snapshots, {len(found)} exports"


def lio_backstores() -> set[str]:
    import glob

    return {os.path.basename(p) for p in glob.glob(f"{lio.CONFIGFS}/core/user_*/dmsnap-*")}


def wait_markers(d: Daemon, timeout: float = 120) -> None:
    """No snapshot request left pending: an unacknowledged one whose marker
    became durable is made by the replay after a restart, later."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.closing(d.db()) as db:
            (n,) = db.execute("SELECT COUNT(*) FROM markers WHERE state = 'pending'").fetchone()
        if not n:
            return
        if time.monotonic() > deadline:
            raise Violation(f"{n} snapshot request(s) still pending {timeout:.0f}s after start")
        time.sleep(0.2)


def wait_settled(d: Daemon, timeout: float = 120) -> dict:
    """Every interrupted operation settled (the catalog's pending list empty)."""
    deadline = time.monotonic() + timeout
    while (s := d.call("status"))["pending"]:
        if time.monotonic() > deadline:
            raise Violation(f"{s['pending']} operation(s) still pending {timeout:.0f}s after start")
        time.sleep(0.2)
    return s


class Campaign(Protocol):
    """What a campaign's context gives the driver."""

    d: Daemon

    def setup(self) -> None: ...

    def close(self) -> None: ...


def run_campaign(
    name: str,
    a: argparse.Namespace,
    ctx: Campaign,
    pick: Callable[[int, int], str],
    trial: Callable[[int, str], str],
    *,
    replay: str,
    stop_if_dead: bool = False,
    counted: Callable[[], str] = lambda: "",
    after: Callable[[], str] = lambda: "",
) -> int:
    """Trials one after another until ``a.trials`` or ``a.budget``:
    ``pick(i, seed)`` names what trial ``i`` does, ``trial(seed, what)``
    does it and says how it went (a ``Violation``, or any other exception:
    the checker's, counts as one and the campaign goes on, unless
    ``stop_if_dead`` and the daemon died). Prints a line a trial, the
    daemon's log tail after a violation, a summary (``counted``: more in
    the parenthesis after the counts, ``after``: more behind it) and the
    command replaying each violation (``replay`` names the option that
    picks what). Returns the exit code: 1 if anything was violated."""
    t_start = time.monotonic()
    bad: list[tuple[int, str, str]] = []
    counts: collections.Counter[str] = collections.Counter()
    progress = Trials(name, a.trials, a.budget)  # a line a trial, on a terminal
    try:
        ctx.setup()
        for i in range(a.trials):
            if a.budget and time.monotonic() - t_start > a.budget:
                print(f"{name}: budget spent after {i} trial(s)", flush=True)
                break
            seed = a.seed + i
            what = pick(i, seed)
            ts = time.monotonic()
            try:
                outcome = trial(seed, what)
            except Violation as e:
                outcome = f"VIOLATION: {e}"
            except Exception:
                outcome = "VIOLATION: checker error\n" + traceback.format_exc()
            counts[what] += 1
            print(f"  trial {i} seed {seed} {what}: {outcome} [{time.monotonic() - ts:.1f}s]",
                  flush=True)  # fmt: skip
            progress.step(i + 1)
            if outcome.startswith("VIOLATION"):
                bad.append((seed, what, outcome))
                print("  dmsnapd log tail:\n" + ctx.d.tail(2000), flush=True)
                if stop_if_dead and not ctx.d.alive():
                    break
    finally:
        ctx.close()
    el = time.monotonic() - t_start
    n = sum(counts.values())
    print(f"{name}: {n} trials in {el:.0f}s ({dict(counts)}{counted()}){after()}; "
          f"{len(bad)} violation(s); seed {a.seed}")  # fmt: skip
    for seed, what, msg in bad:
        print(f"VIOLATION seed {seed} ({what}): {msg.splitlines()[0]}")
        print(f"  replay: tools/torture {name} --seed {seed} --trials 1 {replay} {what} "
              f"--backend {a.backend}")  # fmt: skip
    return 1 if bad else 0
