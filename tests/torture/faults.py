"""tools/torture faults: device faults below a running dmsnapd (issue 18 §2).

One boot, one dmsnapd with two pools: ``h`` (healthy, embedded) and, per
trial, ``f`` on a data device and a journal device that are each a
faultdev.FaultDevice over a loop device. Writers write ``f/v`` through the
local writer; at a seeded random time one fault starts under the journal
or the data device (error_writes, drop_writes, bad sectors, the device
gone, garbage on reads); then the trial checks the behaviour
docs/reliability.md defines for it ("Device faults"): the daemon stays up
and answers, pool ``h`` works, every failed write fails with a one-line
error that is not an internal one, the fault shows in ``pool show``, and
once the device works again (after a restart where the journal is
concerned) every acknowledged write is there, unchanged.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import random
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(REPO, "tests", "kernel"), REPO]

import killlib as kl  # noqa: E402
from faultdev import FaultDevice  # noqa: E402
from jmodel import SECTOR, pattern  # noqa: E402

from dmsnap.daemon import protocol as proto  # noqa: E402
from dmsnap.dm import DeviceMapper  # noqa: E402
from dmsnap.errors import InvalidArgument, Unavailable, UserError  # noqa: E402
from dmsnap.storage import loop  # noqa: E402

MiB = kl.MiB
WORK = "/tmp/torture-faults"
VOL = 4 * MiB
JOURNAL_RING = 8192  # bytes: the superblock slots are below
# (fault, device): the fault kinds and where they go
FAULTS = [
    (f, d)
    for d in ("journal", "data")
    for f in ("error_writes", "drop_writes", "bad_sectors", "vanish")
] + [("corrupt_reads", "journal")]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/torture faults", description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, help="first trial's seed (default: random, printed)")
    p.add_argument("--trials", type=int, default=len(FAULTS))
    p.add_argument("--backend", choices=("thin", "classic"), default="classic")
    p.add_argument("--fault", action="append", help="only FAULT:DEVICE (e.g. vanish:journal)")
    p.add_argument("--budget", type=float, help="stop starting trials after this many seconds")
    p.add_argument("--quick", action="store_true", help="each fault once (CI)")
    a = p.parse_args(argv)
    if a.seed is None:
        a.seed = random.SystemRandom().randrange(1, 10**6)
    if a.quick:
        a.trials = min(a.trials, len(FAULTS))
    a.faults = [tuple(f.split(":", 1)) for f in a.fault] if a.fault else FAULTS
    for f in a.faults:
        if f not in FAULTS:
            p.error(
                f"unknown fault {':'.join(f)} (one of {', '.join(':'.join(x) for x in FAULTS)})"
            )
    return a


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Writers:
    """Two local writers on f/v, each in its half; a failed write is noted
    with its error, and the writer goes on (a few times a second)."""

    def __init__(self, d: kl.Daemon, ledger: kl.Ledger, seed: int) -> None:
        self.d, self.ledger, self.seed = d, ledger, seed
        self.stop = threading.Event()
        self.go = threading.Event()  # cleared: the writers pause
        self.go.set()
        self.failures: list[UserError] = []
        self.threads = [threading.Thread(target=self._run, args=(n,)) for n in range(2)]

    def __enter__(self) -> Writers:
        for th in self.threads:
            th.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(timeout=120)

    def _run(self, n: int) -> None:
        rng = random.Random(self.seed * 10 + n)
        half = VOL // 2
        with self.d.client(timeout=90) as c:
            for i in range(10**6):
                if self.stop.is_set():
                    return
                self.go.wait()
                length = rng.choice([4096, 8192, 65536])
                off = n * half + rng.randrange(0, (half - length) // 4096 + 1) * 4096
                w = kl.Write("v", off, length, self.seed * 10**6 + n * 10**5 + i, time.monotonic())
                self.ledger.add(n, w)
                try:
                    r = c.call("volume.write", pool="f", vol="v", offset=off, content=b64(w.data()))
                    w.seq, w.t1 = r["seq"], time.monotonic()
                    time.sleep(0.02)
                except UserError as e:
                    w.error = f"{e.code}: {e}"
                    self.failures.append(e)
                    time.sleep(0.3)


class Ctx:
    def __init__(self, a: argparse.Namespace, dm: DeviceMapper) -> None:
        self.a, self.dm = a, dm
        os.makedirs(WORK, exist_ok=True)
        self.d = kl.Daemon(WORK)
        self.hseq = 0

    def setup(self) -> None:
        self.d.start()
        for p in self.d.call("pool.list"):
            self.d.call("pool.destroy", name=p["name"], force=True)
        self.d.call("pool.create", name="h", size=128 * MiB, journal_size=8 * MiB)
        self.d.call("volume.create", pool="h", vol="v", size=MiB)

    def healthy(self, why: str) -> None:
        """The daemon is up and pool h works: a write, its read, a snapshot."""
        if not self.d.alive():
            raise kl.Violation(f"dmsnapd died ({why}): {self.d.tail(1500)}")
        self.hseq += 1
        data = pattern(10**9 + self.hseq, 4096)
        try:
            self.d.call("daemon.ping", timeout=30)
            self.d.call("volume.write", pool="h", vol="v", offset=0, content=b64(data), timeout=60)
            r = self.d.call("volume.read", pool="h", vol="v", offset=0, length=4096, timeout=60)
            got = base64.b64decode(r["content"])  # type: ignore[index]
            name = f"h{self.hseq}"
            s = self.d.call("snapshot.create", refs=[["h", "v"]], name=name, wait=True, timeout=60)
            self.d.call("snapshot.delete", pool="h", vol="v", name=name, timeout=60)
        except UserError as e:
            raise kl.Violation(f"pool h does not work ({why}): {e}") from None
        if got != data or s["state"] != "done":  # type: ignore[index]
            raise kl.Violation(f"pool h ({why}): read back wrong or snapshot {s}")

    def close(self) -> None:
        if not self.d.alive():
            with contextlib.suppress(Exception):
                self.d.start()
        for p in ("f", "h"):
            with contextlib.suppress(Exception):
                self.d.call("pool.destroy", name=p, force=True)
        self.d.stop(teardown=True)


def pool_health(d: kl.Daemon) -> list[str]:
    show = d.call("pool.show", name="f", timeout=60)
    return list(show["health"])  # type: ignore[index]


def wait_drained(d: kl.Daemon, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while d.call("pool.show", name="f")["journal"]["lag_records"]:  # type: ignore[index]
        if time.monotonic() > deadline:
            raise kl.Violation(f"the flusher did not catch up within {timeout:.0f}s")
        time.sleep(0.1)


def apply(
    fd: FaultDevice, fault: str, rng: random.Random, device: str, extent: int | None = None
) -> str:
    if fault == "error_writes":
        fd.fail_writes(True)
    elif fault == "drop_writes":
        fd.drop_writes()
    elif fault == "vanish":
        fd.vanish()
    elif fault == "corrupt_reads":
        n = rng.randrange(1, 4097)
        fd.corrupt_reads(n, rng.randrange(256))
        return f"byte {n} of every read bio"
    elif fault == "bad_sectors":
        # a bad 4 KiB spot every 64 KiB where the writes go: the ring's first
        # 4 MiB (journal), the volume's extent (classic) or the first 32 MiB
        lo, n = JOURNAL_RING // SECTOR, 4 * MiB // SECTOR
        if device == "data":
            lo, n = extent or 0, (VOL if extent else 32 * MiB) // SECTOR
        step = 65536 // SECTOR
        ranges = [(lo + k + rng.randrange(0, step - 8) // 8 * 8, 8) for k in range(0, n, step)]
        fd.bad_sectors(ranges)
        return f"{len(ranges)} bad 4 KiB spots"
    return ""


def trial(ctx: Ctx, seed: int, fault: str, device: str) -> str:
    d, dm, a = ctx.d, ctx.dm, ctx.a
    rng = random.Random(seed)
    work = os.path.join(WORK, "dev")
    os.makedirs(work, exist_ok=True)
    loops: list[loop.LoopDevice] = []
    fds: dict[str, FaultDevice] = {}
    notes: list[str] = []
    try:
        for dev, size in (("data", 128 * MiB), ("journal", 16 * MiB)):
            img = os.path.join(work, f"{dev}.img")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(img)
            loop.make_sparse(img, size)
            lo = loop.attach(img)
            loops.append(lo)
            fds[dev] = FaultDevice(dm, f"tfault-{dev}", lo)
        d.call(
            "pool.create", name="f", backend=a.backend, data=fds["data"].path,
            journal=fds["journal"].path, timeout=300,
        )  # fmt: skip
        d.call("volume.create", pool="f", vol="v", size=VOL)
        with contextlib.closing(d.db()) as db:
            (extent,) = db.execute(
                "SELECT v.extent_start FROM volumes v JOIN pools p ON p.id = v.pool_id "
                "WHERE p.name = 'f' AND v.name = 'v'"
            ).fetchone()
        ledger = kl.Ledger({"v": bytearray(VOL)}, {"v": bytearray(VOL // SECTOR)})
        fd = fds[device]
        with Writers(d, ledger, seed) as wr:
            time.sleep(rng.uniform(0.5, 3.0))
            if fault == "drop_writes" and device == "data":
                # what the flusher has put on the device before the drop is
                # what must survive it: let it catch up first
                wr.go.clear()
                time.sleep(0.2)
                wait_drained(d)
            t_fault = time.monotonic()
            notes.append(apply(fd, fault, rng, device, extent) if fault != "corrupt_reads" else "")
            wr.go.set()
            time.sleep(rng.uniform(2.0, 5.0))
            ctx.healthy(f"{fault} under the {device} device")
            health = pool_health(d)
        failed = list(wr.failures)
        internal = [e for e in failed if e.code == proto.E_INTERNAL]
        if internal:
            raise kl.Violation(f"a write failed with an internal error: {internal[0]}")
        many = [e for e in failed if "\n" in str(e)]
        if many:
            raise kl.Violation(f"an error of more than one line: {many[0]!r}")
        acked_after = sum(1 for ws in ledger.writes.values() for w in ws if w.t0 > t_fault and w.t1)
        errors = fault in ("error_writes", "bad_sectors", "vanish")
        if errors and device == "journal" and not failed:
            raise kl.Violation(f"the journal device failing ({fault}): no write failed")
        if errors and not health:
            raise kl.Violation(f"{fault} under the {device} device, pool show health is empty")
        notes.append(f"{len(failed)} writes failed, {acked_after} acknowledged during the fault")
        if failed:
            notes.append(f"first error: {failed[0].code}: {failed[0]}")
        if health:
            notes.append(f"health: {health[0][:160]}")

        if fault == "corrupt_reads":
            # the journal reads its ring at open only: a kill leaves records
            # after the checkpoint, and the restart reads them as garbage.
            # It must refuse the pool with one line, or (garbage where the
            # journal keeps nothing) open it with nothing acknowledged lost.
            d.kill9()
            notes[0] = apply(fd, fault, rng, device)
            d.start()
            ctx.healthy("after a restart on a journal that reads garbage")
            health = pool_health(d)
            if health:
                if any("\n" in h for h in health):
                    raise kl.Violation(f"refused in more than one line: {health}")
                notes.append(f"refused at start: {health[0][:200]}")
            else:
                kl.compare("f/v opened on a journal that reads garbage", d.read("f", "v", VOL),
                           ledger.now("v"))  # fmt: skip
                notes.append("opened (the garbage fell where the journal keeps nothing)")
            d.stop()
            fd.pass_through()
            d.start()
        else:
            fd.pass_through()
            if device == "journal" or fault == "drop_writes":
                # a journal error is sticky (the journal is not trusted until
                # a restart); after a drop, a clean stop must drain it all
                d.stop()
                d.start()
        ctx.healthy("after the device works again")
        health = pool_health(d)
        if fault == "drop_writes" and device == "data":
            # dropped below the flusher: lost without a trace (see docs);
            # what was acknowledged and flushed before the fault is intact
            def side(w: kl.Write) -> str:
                return "in" if w.t1 is not None and w.t1 < t_fault else "?"

            want = ledger.image("v", side)
        else:
            want = ledger.now("v")
        deadline = time.monotonic() + 120
        while True:
            try:
                got = d.read("f", "v", VOL)
                break
            except (Unavailable, UserError) as e:
                if isinstance(e, InvalidArgument) or time.monotonic() > deadline:
                    raise kl.Violation(
                        f"pool f unreadable after the device came back: {e}"
                    ) from None
                time.sleep(1)
        kl.compare(f"f/v after {fault} under the {device} device", got, want)
        # and the pool goes on: a write and a snapshot
        d.call("volume.write", pool="f", vol="v", offset=0, content=b64(pattern(seed, 4096)))
        s = d.call("snapshot.create", refs=[["f", "v"]], name="after", wait=True, timeout=120)
        if s["state"] != "done":  # type: ignore[index]
            raise kl.Violation(f"snapshot after recovery: {s}")
        n_ack = sum(1 for ws in ledger.writes.values() for w in ws if w.t1)
        notes.append(f"{n_ack} acknowledged writes checked")
        return "ok: " + "; ".join(x for x in notes if x)
    finally:
        for f in fds.values():
            with contextlib.suppress(Exception):
                f.pass_through()
        if not d.alive():
            with contextlib.suppress(Exception):
                d.start()
        with contextlib.suppress(Exception):
            d.call("pool.destroy", name="f", force=True, timeout=300)
        for f in fds.values():
            f.remove()
        for lo in loops:
            with contextlib.suppress(Exception):
                loop.detach(lo)


def main(argv: list[str]) -> int:
    a = parse(argv)
    print(f"faults: seed {a.seed}, {a.trials} trial(s), backend {a.backend}", flush=True)

    def pick(i: int, seed: int) -> str:
        if a.quick or len(a.faults) == 1:
            fault, device = a.faults[i % len(a.faults)]
        else:
            fault, device = random.Random(seed * 31).choice(a.faults)
        return f"{fault}:{device}"

    with DeviceMapper() as dm:
        ctx = Ctx(a, dm)
        return kl.run_campaign(
            "faults",
            a,
            ctx,
            pick,
            lambda seed, what: trial(ctx, seed, *what.split(":", 1)),
            replay="--fault",
        )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
