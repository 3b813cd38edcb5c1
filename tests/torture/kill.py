"""tools/torture kill: kill -9 of dmsnapd at random points (issue 18 §2).

One boot, one dmsnapd, one journaled pool. Each trial (its own seed) runs
writers through the local writer (the control socket's volume.write, two
threads on volume ``a``) and through the SCSI path (O_DIRECT writes, two
threads, on volume ``s`` exported through tcm_loop), starts one operation
(a snapshot request, an in-band snapshot through ``s``'s LUN, a restore,
an export or unexport, or none) and kills dmsnapd with SIGKILL a seeded
random delay after starting it; then starts dmsnapd again and checks it
against the model (killlib): every acknowledged write is there, every
acknowledged snapshot exists and is exactly its point in time (an
unacknowledged one may exist, and then is a point in its window), the
operation is all or nothing, nothing is left pending, and the catalog
agrees with the kernel (dm tables, LIO). ``iscsi`` trials kill it under
fio --verify through an open-iscsi session instead: fio must see no error
and verify every block. A failing trial prints the command that replays it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import mmap
import os
import random
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(REPO, "tests", "kernel"), REPO]

import killlib as kl  # noqa: E402
from jmodel import SECTOR, pattern, read_direct  # noqa: E402

from dmsnap.dm import DeviceMapper  # noqa: E402
from dmsnap.errors import UserError  # noqa: E402
from dmsnap.scsi import initiator  # noqa: E402

MiB = kl.MiB
WORK = "/tmp/torture-kill"
POOL = "k"
VOL = 4 * MiB  # a and s: two writers each, 2 MiB regions
SMALL = 1 * MiB  # r and e
KINDS = {"snapshot": 3, "inband": 2, "restore": 2, "export": 2, "io": 1, "iscsi": 1}
# How long after its start an operation may be killed (seconds): a little
# more than it takes in the emulated VM, so that most kills land inside it.
# Measured there (seed 100): a snapshot request is acknowledged in 60-90 ms
# (made later by the flusher), a restore 0.6 s, an export 0.9-2.8 s.
SPAN = {"snapshot": 0.3, "inband": 0.6, "restore": 1.2, "export": 2.0, "io": 1.0}
ISCSI_IQN = "iqn.2026-11.org.dmsnap.test:torture-kill"
ISCSI_INITIATOR = "iqn.2026-11.org.dmsnap.test:torture-kill-client"
PORTAL = "127.0.0.1:3260"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/torture kill", description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, help="first trial's seed (default: random, printed)")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--backend", choices=("thin", "classic"), default="thin")
    p.add_argument("--kind", choices=sorted(KINDS), action="append", help="only these kinds")
    p.add_argument("--budget", type=float, help="stop starting trials after this many seconds")
    p.add_argument("--quick", action="store_true", help="a few trials of each kind (CI)")
    a = p.parse_args(argv)
    if a.seed is None:
        a.seed = random.SystemRandom().randrange(1, 10**6)
    if a.quick:
        a.trials = min(a.trials, 7)
    return a


class Ctx:
    def __init__(self, a: argparse.Namespace, dm: DeviceMapper) -> None:
        self.a, self.dm = a, dm
        os.makedirs(WORK, exist_ok=True)
        self.d = kl.Daemon(WORK)
        self.disk = ""  # s through tcm_loop
        self.ledger: kl.Ledger | None = None
        self.exported_e = False
        self.stack = contextlib.ExitStack()
        self.iscsi_disk: str | None = None
        self.starts: list[float] = []

    def setup(self) -> None:
        d = self.d
        d.start()
        for p in d.call("pool.list"):
            d.call("pool.destroy", name=p["name"], force=True)
        d.call(
            "pool.create", name=POOL, backend=self.a.backend, size=256 * MiB,
            journal_size=16 * MiB,
        )  # fmt: skip
        for v, size in (("a", VOL), ("s", VOL), ("r", SMALL), ("e", SMALL)):
            d.call("volume.create", pool=POOL, vol=v, size=size)
        d.call("export.create", pool=POOL, vol="s", kind="local")
        self.disk = scsi_disk("s")
        base = {v: bytearray(n) for v, n in (("a", VOL), ("s", VOL), ("r", SMALL), ("e", SMALL))}
        e = pattern(1, SMALL)
        write(d, "e", 0, e)
        base["e"][:] = e
        self.ledger = kl.Ledger(base, {v: bytearray(len(b) // SECTOR) for v, b in base.items()})

    def restart(self) -> float:
        took = self.d.start()
        self.starts.append(took)
        return took

    def iscsi(self) -> str:
        if self.iscsi_disk is None:
            from scsi_util import iscsi_sessions_as, open_iscsi

            self.d.call("volume.create", pool=POOL, vol="i", size=32 * MiB)
            ex = self.d.call(
                "export.create", pool=POOL, vol="i", kind="iscsi", iqn=ISCSI_IQN,
                portal=PORTAL, allow=[ISCSI_INITIATOR],
            )  # fmt: skip
            self.stack.enter_context(open_iscsi())
            s = self.stack.enter_context(
                iscsi_sessions_as(ISCSI_IQN, PORTAL, ex["serial"], [ISCSI_INITIATOR])
            )
            self.iscsi_disk = s[ISCSI_INITIATOR]
        return self.iscsi_disk

    def close(self) -> None:
        self.stack.close()
        if not self.d.alive():
            with contextlib.suppress(Exception):
                self.d.start()
        with contextlib.suppress(Exception):
            self.d.call("pool.destroy", name=POOL, force=True)
        self.d.stop(teardown=True)


def scsi_disk(vol: str, timeout: float = 60) -> str:
    """The /dev/sdX a local export of ``vol`` made (udev links it)."""
    deadline = time.monotonic() + timeout
    while not (disk := os.path.realpath(f"/dev/dmsnap/{POOL}/{vol}")).startswith("/dev/sd"):
        if time.monotonic() > deadline:
            raise kl.Violation(f"the local export of {POOL}/{vol} is not a SCSI disk: {disk}")
        time.sleep(0.2)
    return disk


def write(d: kl.Daemon, vol: str, off: int, data: bytes) -> None:
    d.write(POOL, vol, off, data)


def read(d: kl.Daemon, vol: str, size: int) -> bytes:
    return d.read(POOL, vol, size)


# -- writers ---------------------------------------------------------------------------


class Writers:
    """Two local writers on ``a`` and two SCSI writers on ``s``, each in its
    own half of its volume, one write in flight each."""

    def __init__(self, ctx: Ctx, seed: int) -> None:
        self.ctx, self.seed = ctx, seed
        self.stop = threading.Event()
        self.up = threading.Event()
        self.up.set()
        self.errors: list[str] = []
        self.threads = [
            threading.Thread(target=self._local, args=(0,)),
            threading.Thread(target=self._local, args=(1,)),
            threading.Thread(target=self._scsi, args=(2,)),
            threading.Thread(target=self._scsi, args=(3,)),
        ]

    def __enter__(self) -> Writers:
        for th in self.threads:
            th.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.up.set()
        for th in self.threads:
            th.join(timeout=300)
            if th.is_alive():
                self.errors.append(f"{th.name} still writing 300 s after the stop")

    def _one(self, n: int, rng: random.Random, i: int) -> tuple[int, int, int]:
        half = VOL // 2
        length = rng.choice([4096, 4096, 8192, 65536])
        off = (n % 2) * half + rng.randrange(0, (half - length) // 4096 + 1) * 4096
        return off, length, self.seed * 10**6 + n * 10**5 + i

    def _local(self, n: int) -> None:
        ledger = self.ctx.ledger
        assert ledger is not None
        rng = random.Random(self.seed * 10 + n)
        c = None
        i = 0
        while not self.stop.is_set():
            self.up.wait()
            off, length, wid = self._one(n, rng, i)
            i += 1
            w = kl.Write("a", off, length, wid, time.monotonic())
            ledger.add(n, w)
            try:
                if c is None:
                    c = self.ctx.d.client(timeout=120)
                import base64

                r = c.call(
                    "volume.write", pool=POOL, vol="a", offset=off,
                    content=base64.b64encode(w.data()).decode(),
                )  # fmt: skip
                w.seq, w.t1 = r["seq"], time.monotonic()
            except UserError as e:
                w.error = str(e)
                if c is not None:
                    c.close()
                c = None
                time.sleep(0.05)
        if c is not None:
            c.close()

    def _scsi(self, n: int) -> None:
        ledger = self.ctx.ledger
        assert ledger is not None
        rng = random.Random(self.seed * 10 + n)
        fd = os.open(self.ctx.disk, os.O_WRONLY | os.O_DIRECT)
        i = 0
        try:
            while not self.stop.is_set():
                off, length, wid = self._one(n, rng, i)
                i += 1
                w = kl.Write("s", off, length, wid, time.monotonic())
                buf = mmap.mmap(-1, length)
                buf.write(w.data())
                ledger.add(n, w)
                try:
                    if os.pwritev(fd, [buf], off) != length:
                        raise OSError("short write")
                    w.t1 = time.monotonic()
                except OSError as e:
                    w.error = str(e)
                    self.errors.append(f"SCSI writer {n}: {e} at {off}")
                    time.sleep(0.5)
        finally:
            os.close(fd)


# -- one trial -------------------------------------------------------------------------


class Op:
    """The operation the kill interrupts, run in a thread."""

    def __init__(self, fn, what: str) -> None:
        self.fn, self.what = fn, what
        self.result: object = None
        self.error: str | None = None
        self.t0 = self.t1 = 0.0
        self.th = threading.Thread(target=self._run)

    def _run(self) -> None:
        self.t0 = time.monotonic()
        try:
            self.result = self.fn()
            self.t1 = time.monotonic()
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"

    @property
    def done(self) -> bool:
        return self.error is None and self.t1 > 0


def trial(ctx: Ctx, seed: int, kind: str) -> str:
    d, ledger = ctx.d, ctx.ledger
    assert ledger is not None
    rng = random.Random(seed)
    if kind == "iscsi":
        return iscsi_trial(ctx, rng)
    ledger.reset()
    points: list[kl.Point] = []
    restore: tuple[str, bytes, bytes] | None = None
    token: bytes | None = None
    if kind == "restore":  # r: X, snapshot rN of it, then Y; restore rN
        x, y = pattern(seed * 7, SMALL), pattern(seed * 7 + 1, SMALL)
        write(d, "r", 0, x)
        d.call("snapshot.create", refs=[[POOL, "r"]], name=f"r{seed}", wait=True, timeout=120)
        write(d, "r", 0, y)
        restore = (f"r{seed}", x, y)
    with Writers(ctx, seed) as wr:
        time.sleep(rng.uniform(0.3, 1.0))
        name = f"t{seed}"
        if kind == "snapshot":
            vols = rng.choice([["a"], ["s"], ["a", "s"]])
            p = kl.Point(name, vols, 0.0)
            points.append(p)

            def fn():
                p.t_req = time.monotonic()
                r = d.call("snapshot.create", refs=[[POOL, v] for v in vols], name=name)
                p.t_ack, p.seq = time.monotonic(), r["seq"]
                return r
        elif kind == "inband":
            p = kl.Point(name, ["s"], 0.0)
            points.append(p)

            def fn():
                nonlocal token
                p.t_req = time.monotonic()
                # retries on BUSY with the same token: a request the dying
                # daemon took must not become two snapshots
                r = initiator.snapshot(ctx.disk, name, retries=10)
                p.t_ack = time.monotonic()
                token = r.token
                return r
        elif kind == "restore":
            assert restore is not None

            def fn():
                return d.call("snapshot.restore", pool=POOL, vol="r", name=restore[0])
        elif kind == "export":
            ctx.exported_e = any(e["volume"] == "e" for e in d.call("export.list", pool=POOL))
            if ctx.exported_e:

                def fn():
                    return d.call("export.delete", pool=POOL, vol="e")
            else:

                def fn():
                    return d.call("export.create", pool=POOL, vol="e", kind="local")
        else:

            def fn():
                return None

        op = Op(fn, kind)
        op.th.start()
        time.sleep(rng.uniform(0.0, SPAN[kind]))
        t_kill = time.monotonic()
        wr.up.clear()
        d.kill9()
        in_flight = not op.done
        for p in points:
            if p.t_ack is None or p.t_ack > t_kill:
                p.t_kill = t_kill
        back = ctx.restart()
        wr.up.set()
        time.sleep(rng.uniform(0.3, 1.0))
    op.th.join(timeout=300)
    if op.th.is_alive():
        raise kl.Violation(f"{kind} still running 300 s after the restart")
    for p in points:  # acknowledged after the kill (a retry reached the new daemon)
        if p.t_ack is not None and p.t_ack > t_kill:
            p.t_kill = None
    if wr.errors:
        raise kl.Violation("writers: " + "; ".join(wr.errors[:3]))
    # -- check
    kl.wait_settled(d)
    kl.wait_markers(d)
    kern = kl.check_kernel(d, ctx.dm, POOL)
    got_a = read(d, "a", VOL)
    got_s = read_direct(ctx.disk, 0, VOL)
    want_a, want_s = ledger.now("a"), ledger.now("s")
    # what the volumes hold now is the next trial's base, also after a
    # violation here (the next trials are checked on their own)
    ledger.settle("a", got_a)
    ledger.settle("s", got_s)
    kl.compare("volume a (local writer)", got_a, want_a)
    kl.compare("volume s (through its SCSI disk)", got_s, want_s)
    if read(d, "s", VOL) != got_s:
        raise kl.Violation("volume s reads differently through dmsnapd and through its disk")
    made = 0
    for p in points:
        made += check_point(ctx, p)
    if token is not None:  # one request (one token, resent): one marker, made
        with contextlib.closing(d.db()) as db:
            rows = db.execute("SELECT state FROM markers WHERE token = ?", (token.hex(),))
            states = [r[0] for r in rows]
        if states != ["done"]:
            raise kl.Violation(f"in-band request {token.hex()}: markers {states}")
    with contextlib.closing(d.db()) as db:
        twice = db.execute(
            "SELECT marker, COUNT(*) c FROM snap_groups WHERE marker IS NOT NULL "
            "GROUP BY marker HAVING c > 1"
        ).fetchall()
    if twice:
        raise kl.Violation(f"a marker made more than one snapshot group: {twice}")
    extra = ""
    if kind == "restore":
        assert restore is not None
        got = read(d, "r", SMALL)
        if got == restore[1]:
            extra = " restored"
        elif got == restore[2]:
            extra = " not restored"
            if op.done:
                raise kl.Violation("the restore was acknowledged but r is not the snapshot")
        else:
            raise kl.Violation("r is neither the snapshot nor what it was before the restore")
        with contextlib.suppress(UserError):
            d.call("snapshot.delete", pool=POOL, vol="r", name=restore[0])
    elif kind == "export":
        ex = [e for e in d.call("export.list", pool=POOL) if e["volume"] == "e"]
        want = not ctx.exported_e
        if op.done and bool(ex) != want:
            raise kl.Violation(f"export change acknowledged, export list says {ex}")
        if ex:
            if not ex[0]["running"]:
                raise kl.Violation(f"export of e listed but not running: {ex[0]}")
            disk = scsi_disk("e")
            kl.compare("volume e through its disk", read_direct(disk, 0, SMALL), ledger.now("e"))
        ctx.exported_e = bool(ex)
        extra = " exported" if ex else " not exported"
    acked = sum(1 for ws in ledger.writes.values() for w in ws if w.t1 is not None)
    lost = sum(1 for ws in ledger.writes.values() for w in ws if w.t1 is None)
    return (
        f"killed {'inside' if in_flight else 'after'} {kind} at "
        f"+{t_kill - op.t0:.2f}s; back in {back:.1f}s; {acked} writes acknowledged, "
        f"{lost} not; {made} snapshot(s) checked;{extra} {kern}"
    )


def check_point(ctx: Ctx, p: kl.Point) -> int:
    d, ledger = ctx.d, ctx.ledger
    assert ledger is not None
    deadline = time.monotonic() + 120

    def present() -> bool:
        return all(
            any(s["name"] == p.name for s in d.call("snapshot.list", pool=POOL, vol=v))
            for v in p.vols
        )

    have = present()
    if p.t_kill is None:  # acknowledged: its marker is durable, it must be made
        while not have:
            if time.monotonic() > deadline:
                raise kl.Violation(f"snapshot {p.name} (acknowledged) never made")
            time.sleep(0.2)
            have = present()
    if not have:
        for v in p.vols:  # none of it, then
            if any(s["name"] == p.name for s in d.call("snapshot.list", pool=POOL, vol=v)):
                raise kl.Violation(f"snapshot {p.name} made for some of {p.vols} only")
        return 0
    for v in p.vols:
        act = d.call("snapshot.activate", pool=POOL, vol=v, name=p.name)
        try:
            got = read_direct(act["path"], 0, VOL)  # type: ignore[index]
        finally:
            d.call("snapshot.deactivate", pool=POOL, vol=v, name=p.name)
        kl.compare(f"{v}@{p.name}", got, ledger.at(v, p))
        d.call("snapshot.delete", pool=POOL, vol=v, name=p.name)
    return 1


def iscsi_trial(ctx: Ctx, rng: random.Random) -> str:
    """kill -9 under fio --verify through open-iscsi: no error, all verified,
    back within TCMU's cmd_time_out."""
    from scsi_util import assert_fio_verified, fio_verify_args

    from dmsnap.scsi import lio

    disk = ctx.iscsi()
    args = fio_verify_args(disk, region=16 * MiB, jobs=2, bs="4k")
    seconds = 20
    ios = 8 * MiB // 4096
    cmd = ["fio", "--output-format=json", *args, f"--rate_iops={ios // seconds}"]
    import json
    import subprocess

    from scsi_util import FioResult

    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(rng.uniform(2.0, 12.0))
        t0 = time.monotonic()
        ctx.d.kill9()
        ctx.restart()
        back = time.monotonic() - t0
        out, err = p.communicate(timeout=400)
    finally:
        if p.poll() is None:
            p.kill()
    if "{" not in out:
        raise kl.Violation(f"fio exited {p.returncode} without a report: {err[-2000:]}")
    doc = json.loads(out[out.index("{") :])
    r = FioResult(p.returncode, doc["jobs"], err, 0.0)
    try:
        assert_fio_verified(r)
    except AssertionError as e:
        raise kl.Violation(f"fio --verify through iSCSI: {e}") from None
    if back >= lio.CMD_TIME_OUT:
        raise kl.Violation(f"back after {back:.0f}s, beyond TCMU's cmd_time_out")
    kl.wait_settled(ctx.d)
    kern = kl.check_kernel(ctx.d, ctx.dm, POOL)
    return f"killed under iSCSI fio; back in {back:.1f}s; {r.written // MiB} MiB verified; {kern}"


def main(argv: list[str]) -> int:
    a = parse(argv)
    kinds = a.kind or list(KINDS)
    print(f"kill: seed {a.seed}, {a.trials} trial(s), backend {a.backend}", flush=True)
    inside: collections.Counter[str] = collections.Counter()

    def pick(i: int, seed: int) -> str:
        if a.quick and len(kinds) == len(KINDS):
            return list(KINDS)[i % len(KINDS)]  # every kind once or more
        return random.Random(seed * 31).choices(kinds, weights=[KINDS[k] for k in kinds])[0]

    def run(seed: int, kind: str) -> str:
        outcome = trial(ctx, seed, kind)
        if outcome.startswith("killed inside"):
            inside[kind] += 1
        return outcome

    def restarts() -> str:
        starts = sorted(ctx.starts)
        return f"; restart median {starts[len(starts) // 2] if starts else 0.0:.1f}s"

    with DeviceMapper() as dm:
        ctx = Ctx(a, dm)
        return kl.run_campaign(
            "kill",
            a,
            ctx,
            pick,
            run,
            replay="--kind",
            stop_if_dead=True,
            counted=lambda: f"; killed inside the operation: {dict(inside)}",
            after=restarts,
        )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
