"""tools/torture crash: crash states from dm-log-writes recordings (issue 18 §1).

One boot: per backend and trial, record a seeded workload once (data,
journal and catalog devices under dm-log-writes), derive its crash states
(crashlib's docstring lists the kinds), replay each onto fresh devices,
start a Manager on them and check it against what was acknowledged before
the cut. A failing state prints the command that replays it; the trial's
logs are kept under .torture/ for that.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(REPO, "tests", "kernel"), REPO]

import crashlib as cl  # noqa: E402

from dmsnap.cli_progress import Trials  # noqa: E402
from dmsnap.dm import DeviceMapper  # noqa: E402

WORK = "/tmp/torture-crash"
KEEP = os.path.join(REPO, ".torture")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/torture crash", description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, help="first trial's seed (default: random, printed)")
    p.add_argument("--trials", type=int, default=1, help="recorded workloads per backend")
    p.add_argument("--backend", choices=("thin", "classic", "both"), default="both")
    p.add_argument("--states", type=int, help="states checked per trial (default: all)")
    p.add_argument("--state", help="check only these states of the trial (K or K,K,...)")
    p.add_argument(
        "--logs", help="replay kept recordings (.torture/ directories; --host: DIR,DIR,...)"
    )
    p.add_argument(
        "--host",
        action="store_true",
        help="check the states of kept recordings (--logs) on the host (hostcheck.py)",
    )
    p.add_argument("--writes", type=int, default=40, help="writes per writer thread")
    p.add_argument("--budget", type=float, help="seconds of checking, split between trials")
    p.add_argument(
        "--journal", choices=("nv", "ram", "mix"), default="nv", help="mix: chosen by seed"
    )
    p.add_argument(
        "--cache", choices=("on", "off", "mix"), default="off", help="a writecache; mix: by seed"
    )
    p.add_argument("--quick", action="store_true", help="a few dozen states (CI)")
    p.add_argument("--keep", action="store_true", help="keep every recording in .torture/")
    p.add_argument("--profile", help="cProfile the checks into this file")
    p.add_argument("--kinds", help="check only states of these kinds (mark,dvol,...)")
    p.add_argument("--udev", action="store_true", help="keep udev running in the guest")
    a = p.parse_args(argv)
    if a.quick:
        a.states = a.states or 15
        a.writes = min(a.writes, 20)
        a.journal, a.cache = "mix", "mix"
    if a.seed is None:
        a.seed = random.SystemRandom().randrange(1, 10**6)
    if a.host:
        if not a.logs:
            p.error("--host checks kept recordings: give --logs DIR[,DIR...]")
        return a
    if (a.state is not None or a.logs) and a.backend == "both":
        if a.logs:
            a.backend = cl.Recording.load(a.logs).backend
        else:
            p.error("--state needs --backend (thin or classic)")
    return a


def trial(dm: DeviceMapper, a: argparse.Namespace, backend: str, seed: int, budget: float | None):
    work = os.path.join(WORK, f"{backend}-{seed}")
    mnt = os.path.join(WORK, "mnt")
    os.makedirs(work, exist_ok=True)  # a replay (--logs) records nothing
    os.makedirs(mnt, exist_ok=True)
    t0 = time.monotonic()
    if a.logs:
        rec = cl.Recording.load(a.logs)
        seed = rec.seed
    else:
        span = 2 * cl.MiB if backend == "thin" else cl.MiB  # classic: COW space
        # mix: by seed; --trials 4 with both backends gives each backend
        # all four variants (its seeds go up by 2)
        journal = a.journal if a.journal != "mix" else ("nv", "ram")[seed // 2 % 2]
        cache = a.cache == "on" if a.cache != "mix" else bool(seed // 4 % 2)
        w = cl.Workload(backend, seed, writes=a.writes, span=span, journal=journal, cache=cache)
        rec = cl.record(dm, work, mnt, w)
        if a.keep:
            keep = cl.keep_failure(rec, os.path.join(KEEP, f"crash-{backend}-{seed}"))
            print(f"crash: recording kept in {os.path.relpath(keep, REPO)}", flush=True)
    t_rec = time.monotonic() - t0
    lg = cl.Logs(rec)
    states = cl.generate(lg, seed)
    kinds = collections.Counter(s.kind for s in states)
    pool_ev = next(ev for ev in rec.events if ev[0] == "pool")
    variant = (
        f"{pool_ev[2]} journal, writecache {'on' if pool_ev[3] else 'off'}"
        if len(pool_ev) > 3
        else "nv journal, writecache off"
    )
    nev = sum(1 for ev in rec.events if ev[0] == "ack")
    nmk = sum(1 for ev in rec.events if ev[0] == "marker")
    print(
        f"crash: {backend} seed {seed} ({variant}): recorded {nev} acknowledged writes/discards, "
        f"{nmk} markers, "
        f"{lg.ncuts} cuts, log entries "
        + ", ".join(f"{d} {len(lg.entries[d])}" for d in lg.devs)
        + f" in {t_rec:.0f}s; {sum(st.real for st in states)} crash states ({dict(kinds)})",
        flush=True,
    )
    pool = [s for s in states if s.real]
    if a.kinds:
        pool = [s for s in pool if s.kind in a.kinds.split(",")]
    if a.state is not None:
        chosen = [states[int(k)] for k in a.state.split(",")]
    elif a.states is not None and a.states < len(pool):
        chosen = sorted(random.Random(seed).sample(pool, a.states), key=lambda s: s.index)
    else:
        chosen = list(pool)
    chosen.sort(key=lambda s: (s.cut, s.index))
    imgs = cl.Images(lg, work)
    ov = cl.Overlay(imgs, dm)
    prof = None
    if a.profile:
        import cProfile

        prof = cProfile.Profile()
    done, bad = collections.Counter(), []
    t1 = time.monotonic()
    try:
        for st in chosen:
            if budget is not None and time.monotonic() - t1 > budget:
                print(f"crash: {backend} seed {seed}: budget spent", flush=True)
                break
            ts = time.monotonic()
            ex = cl.expect(rec.events, rec.cuts[st.cut], rec.cuts[st.horizon])
            try:
                if prof is not None:
                    prof.enable()
                outcome = cl.check(dm, ov, st, mnt, ex)
                if prof is not None:
                    prof.disable()
            except cl.Violation as e:
                outcome = f"VIOLATION: {e}"
                bad.append((st, str(e)))
            except Exception as e:
                outcome = f"VIOLATION: checker error: {e!r}\n" + traceback.format_exc()
                bad.append((st, f"checker error: {e!r}"))
            done[st.kind] += 1
            if outcome.startswith("VIOLATION") or a.state is not None or len(chosen) <= 40:
                print(f"  {st.describe()}: {outcome} [{time.monotonic() - ts:.1f}s]", flush=True)
            elif sum(done.values()) % 25 == 0:
                el = time.monotonic() - t1
                n = sum(done.values())
                print(f"  {n} states, {el:.0f}s, {len(bad)} violations", flush=True)
    finally:
        ov.close()
        imgs.close()
        if prof is not None:
            prof.dump_stats(a.profile)
    el = time.monotonic() - t1
    n = sum(done.values())
    print(
        f"crash: {backend} seed {seed}: {n} states checked in {el:.0f}s "
        f"({el / max(n, 1):.1f}s each; {dict(done)}), {len(bad)} violation(s)",
        flush=True,
    )
    if bad:
        keep = a.logs or cl.keep_failure(rec, os.path.join(KEEP, f"crash-{backend}-{seed}"))
        rel = os.path.relpath(keep, REPO)
        for st, msg in bad:
            print(f"VIOLATION {backend} seed {seed} {st.describe()}: {msg.splitlines()[0]}")
            print(
                f"  replay: tools/torture crash --seed {seed} --backend {backend} "
                f"--state {st.index} --logs {rel}"
            )
    return n, len(bad)


def host_trial(a: argparse.Namespace, logdir: str, budget: float | None) -> tuple[int, int]:
    import hostcheck

    rec = cl.Recording.load(logdir)
    rel = os.path.relpath(os.path.abspath(logdir), REPO)
    pool_ev = next(ev for ev in rec.events if ev[0] == "pool")
    if len(pool_ev) > 3 and pool_ev[3]:
        print(f"crash --host: {rel}: a writecache pool, VM only; skipped", flush=True)
        return 0, 0
    lg = cl.Logs(rec)
    states = cl.generate(lg, rec.seed)
    pool = [s for s in states if s.real and (not a.kinds or s.kind in a.kinds.split(","))]
    if a.state is not None:
        chosen = [states[int(k)] for k in a.state.split(",")]
    elif a.states is not None and a.states < len(pool):
        chosen = random.Random(rec.seed).sample(pool, a.states)
    else:
        chosen = list(pool)
    chosen.sort(key=lambda s: (s.cut, s.index))
    variant = f"{pool_ev[2]} journal" if len(pool_ev) > 2 else "nv journal"
    print(
        f"crash --host: {rec.backend} seed {rec.seed} ({variant}, {rel}): "
        f"{sum(st.real for st in states)} states, checking {len(chosen)}",
        flush=True,
    )
    ch = hostcheck.Checker(lg)
    done: collections.Counter = collections.Counter()
    skipped: collections.Counter = collections.Counter()
    objects = 0
    bad: list[tuple[cl.State, str]] = []
    t1 = time.monotonic()
    try:
        for st in chosen:
            if budget is not None and time.monotonic() - t1 > budget:
                print("crash --host: budget spent", flush=True)
                break
            ex = cl.expect(rec.events, rec.cuts[st.cut], rec.cuts[st.horizon])
            try:
                o = ch.check(st, ex)
                objects += len(o.checked)
                for sk in o.skipped:
                    skipped[sk.split(": ", 1)[1]] += 1
            except cl.Violation as e:
                bad.append((st, str(e)))
                print(f"  {st.describe()}: VIOLATION: {e}", flush=True)
            except Exception as e:
                bad.append((st, f"checker error: {e!r}"))
                print(f"  {st.describe()}: VIOLATION: checker error\n{traceback.format_exc()}")
            done[st.kind] += 1
            if (n := sum(done.values())) % 100 == 0:
                el = time.monotonic() - t1
                print(f"  {n} states, {el:.0f}s, {len(bad)} violations", flush=True)
    finally:
        ch.close()
    n = sum(done.values())
    el = time.monotonic() - t1
    print(
        f"crash --host: {rec.backend} seed {rec.seed}: {n} states checked in {el:.0f}s "
        f"({dict(done)}); {objects} volume/snapshot contents compared; not on the host: "
        f"{dict(skipped)}; {len(bad)} violation(s)",
        flush=True,
    )
    for st, msg in bad:
        print(f"VIOLATION {rec.backend} seed {rec.seed} {st.describe()}: {msg.splitlines()[0]}")
        print(f"  replay: tools/torture crash --host --state {st.index} --logs {rel}")
        print(
            f"  in the VM: tools/torture crash --seed {rec.seed} --backend {rec.backend} "
            f"--state {st.index} --logs {rel}"
        )
    return n, len(bad)


def host_main(a: argparse.Namespace) -> int:
    dirs = a.logs.split(",")
    total = viol = 0
    budget = a.budget / len(dirs) if a.budget else None
    for d in dirs:
        n, v = host_trial(a, d, budget)
        total, viol = total + n, viol + v
    print(f"crash --host: {total} crash states checked, {viol} violation(s)")
    return 1 if viol else 0


def main(argv: list[str]) -> int:
    a = parse(argv)
    if a.host:
        return host_main(a)
    backends = ("thin", "classic") if a.backend == "both" else (a.backend,)
    trials = 1 if (a.logs or a.state is not None) else a.trials
    bs = ", ".join(backends)
    print(f"crash: seed {a.seed}, backends {bs}, {trials} trial(s) each", flush=True)
    os.makedirs(WORK, exist_ok=True)
    total = viol = 0
    budget = a.budget / (len(backends) * trials) if a.budget else None
    # Our own devices only (the Manager has its own): udev sometimes never
    # reports a log-writes device's removal under emulation; no need to wait
    # a minute for it.
    if os.environ.get("DMSNAP_IN_VM") == "1" and not a.udev:
        # The throwaway guest: no udev (crashlib.USE_UDEV says why).
        subprocess.run(["udevadm", "control", "--exit"], check=False)
        cl.USE_UDEV = False
    progress = Trials("crash", trials * len(backends), a.budget)
    with cl.new_dm(timeout=5.0) as dm:
        cl.cleanup_devices(dm, os.path.join(WORK, "mnt"))
        for i in range(trials):
            for j, b in enumerate(backends):
                # each trial its own seed (and, mixed, its own variant)
                n, v = trial(dm, a, b, a.seed + i * len(backends) + j, budget)
                total, viol = total + n, viol + v
                progress.step(i * len(backends) + j + 1)
    print(f"crash: {total} crash states checked, {viol} violation(s); seed {a.seed}")
    return 1 if viol else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
