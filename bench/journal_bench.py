"""Journal benchmarks (issue 4: the ordered journal). Run in the VM:

    tools/vm --timeout 590 --memory 3G -- .venv/bin/python bench/journal_bench.py
    make bench-journal                     # the same
    ... bench/journal_bench.py --quick     # smoke (about a minute)

1. Journal append (NV): 4 KiB writes at queue depth 1 and 32 (32 writer
   threads), 1 MiB writes at QD1, against fio on the same journal device in
   the same run. fio runs O_DIRECT with O_DSYNC (``--direct=1
   --sync=dsync``: what the journal opens its device with), and, for
   reference, O_DIRECT + fdatasync() after every write. Measured twice: on
   the C journal alone (dmsnap.journal.journal.Journal, a scratch volume
   device attached) and through Manager.open_volume (the local writer's
   full path, a thin pool behind it).
2. Write latency of a steady writer (4 KiB random writes, paced) with a
   snapshot every second vs none: on a journaled (NV) thin pool through
   Manager.open_volume, and on a pool without a journal, where a snapshot
   is suspend (with flush) / create_snap / resume and the writer writes
   O_DIRECT to the volume's dm device.

Devices: loop devices over files in the guest's /tmp (tmpfs; the loop
device does buffered I/O into it, direct I/O off). Every pool, journal and
loop device made here is removed at the end. Prints Markdown tables;
``--json FILE`` also writes the raw figures. bench/README.md records
results and the command.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dmsnap.journal.journal import Journal, JournalStats
from dmsnap.storage import loop
from dmsnap.storage.manager import Manager

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
SLOW = 0.010  # a write slower than this is attributed to what overlapped it
POOL_PREFIX = "jb"  # every pool made here is jb*; leftovers of a killed run are removed


# --------------------------------------------------------------------- devices


def make_loop(path: str, size: int) -> loop.LoopDevice:
    """A loop device over a fully allocated file (tmpfs pages exist before
    anyone measures: fio and the journal both overwrite)."""
    with open(path, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)
    return loop.attach(path, direct_io=False)


def loop_dio(dev: loop.LoopDevice) -> str:
    try:
        with open(f"/sys/block/{os.path.basename(dev.path)}/loop/dio") as f:
            return "on" if f.read().strip() == "1" else "off"
    except OSError:
        return "?"


ZERO_DM = "jbench-zero"


def make_zero(size: int) -> str:
    """A dm "zero" device: writes complete at once and are dropped. As the
    journal's scratch volume it takes the flusher's destination cost out of
    the picture (the append path alone)."""
    subprocess.run(
        ["dmsetup", "create", ZERO_DM, "--table", f"0 {size // 512} zero"],
        check=True,
        capture_output=True,
    )
    subprocess.run(["udevadm", "settle", "--timeout=10"], capture_output=True)
    return f"/dev/mapper/{ZERO_DM}"


def fs_type(path: str) -> str:
    best, typ = "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, typ = mnt, parts[2]
    return typ


def cleanup_leftovers(state: str | None = None) -> None:
    """dm devices of jb* pools and loop devices over bench files of an
    earlier, killed run (a fresh VM has none; a native host might)."""
    out = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True).stdout
    names = [
        ln.split()[0]
        for ln in out.splitlines()
        if ln.startswith((f"dmsnap-{POOL_PREFIX}", ZERO_DM))
    ]
    # volumes and snapshots first, then the pool layers (internal names have "-_")
    for n in sorted(names, key=lambda n: "-_" in n):
        subprocess.run(["dmsetup", "remove", "--retry", n], capture_output=True)
    for lo in loop.attached():
        if "/jbench-" in lo.backing_file:
            with contextlib.suppress(OSError):
                loop.detach(lo)


# --------------------------------------------------------------------- fio


def fio(
    dev: str,
    *,
    bs: int,
    qd: int,
    jobs: int,
    engine: str,
    sync: str,
    runtime: float,
    region: int,
) -> dict[str, Any]:
    """Sequential O_DIRECT writes on ``dev``; sync "dsync" (O_DSYNC) or
    "fdatasync" (an fdatasync after every write)."""
    per_job = region // jobs // bs * bs
    cmd = [
        "fio",
        "--name=j",
        f"--filename={dev}",
        "--rw=write",
        f"--bs={bs}",
        "--direct=1",
        f"--ioengine={engine}",
        f"--iodepth={qd}",
        f"--numjobs={jobs}",
        "--thread",
        "--group_reporting",
        f"--size={per_job}",
        "--offset=8192",
        f"--offset_increment={per_job}",
        "--time_based",
        f"--runtime={runtime:g}",
        "--ramp_time=500ms",
        "--output-format=json",
    ]
    cmd += ["--sync=dsync"] if sync == "dsync" else ["--fdatasync=1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    w = json.loads(out[out.index("{") :])["jobs"][0]["write"]
    pct = w.get("clat_ns", {}).get("percentile", {})
    return {
        "iops": w["iops"],
        "bw": w["bw_bytes"],
        "p50_us": pct.get("50.000000", 0) / 1000,
        "p99_us": pct.get("99.000000", 0) / 1000,
        "cmd": " ".join(cmd[1:]),
    }


# --------------------------------------------------------------------- append rate


def copy_and_crc_cost() -> dict[str, float]:
    """ms per MiB for the CPU work an append adds to a device write: the
    copy into the ring and the crc32c of the data (emulated CPUs are slow
    at both)."""
    from dmsnap._hotpath import ffi, lib

    src = ffi.new("char[]", MiB)
    dst = ffi.new("char[]", MiB)
    n = 20
    t0 = time.perf_counter()
    for _ in range(n):
        lib.jr_crc32c(src, MiB)
    t1 = time.perf_counter()
    for _ in range(n):
        ffi.memmove(dst, src, MiB)
    t2 = time.perf_counter()
    for _ in range(n):
        lib.jr_crc32c_table(src, MiB)
    t3 = time.perf_counter()
    return {
        "crc32c_ms_per_mib": (t1 - t0) / n * 1e3,
        "memcpy_ms_per_mib": (t2 - t1) / n * 1e3,
        "crc32c_table_ms_per_mib": (t3 - t2) / n * 1e3,
    }


def cpu_busy() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def append_rate(
    write: Callable[[int, Any], Any],
    stats: Callable[[], JournalStats],
    *,
    threads: int,
    bs: int,
    region: int,
    seconds: float,
    warm: float = 0.5,
) -> dict[str, Any]:
    """``threads`` writers, each writing ``bs`` sequentially through its own
    slice of ``region`` (wrapping), as fast as they can; counts the writes
    completed in a window of ``seconds`` after ``warm`` seconds."""
    per = region // threads // bs * bs
    counts = [0] * threads
    errors: list[BaseException] = []
    stop = threading.Event()
    go = threading.Barrier(threads + 1)

    def worker(i: int) -> None:
        buf = mmap.mmap(-1, bs)
        buf.write(os.urandom(min(bs, 4096)) * (bs // min(bs, 4096)))
        base, n, slots = i * per, 0, per // bs
        go.wait()
        try:
            while not stop.is_set():
                write(base + (n % slots) * bs, buf)
                n += 1
                counts[i] = n
        except BaseException as e:
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in ts:
        t.start()
    go.wait()
    time.sleep(warm)
    s0, c0, b0, t0 = stats(), sum(counts), cpu_busy(), time.perf_counter()
    time.sleep(seconds)
    s1, c1, b1, t1 = stats(), sum(counts), cpu_busy(), time.perf_counter()
    stop.set()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    appends, commits = s1.appends - s0.appends, s1.commits - s0.commits
    return {
        "iops": (c1 - c0) / (t1 - t0),
        "bw": (c1 - c0) * bs / (t1 - t0),
        "appends_per_commit": appends / commits if commits else 0.0,
        "commits_per_s": commits / (t1 - t0),
        "full_waits": s1.full_waits - s0.full_waits,
        "dm_writes_per_s": (s1.dm_writes - s0.dm_writes) / (t1 - t0),
        "cpu": (b1[0] - b0[0]) / max(1, b1[1] - b0[1]),
        "lag_mib": s1.unflushed_bytes / MiB,
    }


# The append path without Python: writer threads in C calling jr_write
# (bench/c/jr_append.c with csrc/journal.c, compiled into the work directory).
C_DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "c", "jr_append.c")


# A paced QD1 writer in C, called through ctypes (the GIL is released for
# the whole run): either jr_write on a live journal handle, the way the TCMU
# ring handler writes, or pwrite on a file descriptor. Latency as in
# steady_writer.
C_PACED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "c", "paced.c")


class CPaced:
    """ctypes face of C_PACED (compiled into the work directory)."""

    def __init__(self, work: str) -> None:
        import ctypes

        so = os.path.join(work, "paced.so")
        cc = shutil.which("cc") or shutil.which("gcc") or "cc"
        subprocess.run([cc, "-O2", "-shared", "-fPIC", C_PACED, "-o", so], check=True)
        self._ct = ctypes
        self._fn = ctypes.CDLL(so).paced
        d = ctypes.POINTER(ctypes.c_double)
        self._fn.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint64,
            ctypes.c_double,
            ctypes.c_double,
            ctypes.c_uint64,
            d,
            d,
            d,
            ctypes.c_long,
        ]
        self._fn.restype = ctypes.c_long

    def writer(self, *, journal: Any = None, vol: int = 0, fd: int = -1) -> Callable[..., Any]:
        """A steady_writer-compatible function running the loop in C."""
        from dmsnap._hotpath import ffi, lib

        fn = int(ffi.cast("uintptr_t", ffi.addressof(lib, "jr_write"))) if journal else None
        jp = int(ffi.cast("uintptr_t", journal)) if journal else None

        def run(*, rate: float, seconds: float, size: int, seed: int) -> dict[str, Any]:
            ct = self._ct
            cap = int(rate * seconds) + 16
            lat, svc, iss = ((ct.c_double * cap)() for _ in range(3))
            t0 = time.perf_counter()
            n = self._fn(fn, jp, vol, fd, size, rate, seconds, seed, lat, svc, iss, cap)
            wall = time.perf_counter() - t0
            if n < 0:
                raise OSError(-n, f"C paced writer: {os.strerror(-n)}")
            # CLOCK_MONOTONIC is perf_counter's clock on Linux: the issue
            # times line up with the snapshot windows measured in Python.
            slow = [(iss[i], iss[i] + svc[i]) for i in range(n) if svc[i] > SLOW]
            return {"lat": lat[:n], "svc": svc[:n], "slow": slow, "wall": wall}

        return run


def build_c_driver(work: str, cflags: list[str]) -> str | None:
    """Compile the C driver (``cflags``: e.g. -DJR_COMMIT_DEPTH=1 to compare
    tunings in one run); None when there is no compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    exe = os.path.join(work, "jr_append")
    csrc = os.path.join(REPO, "csrc")
    subprocess.run(
        [
            cc,
            "-O2",
            "-pthread",
            *cflags,
            "-I",
            csrc,
            f"{csrc}/journal.c",
            f"{csrc}/crc32c.c",
            C_DRIVER,
            "-o",
            exe,
        ],
        check=True,
    )
    return exe


def c_append_rate(
    exe: str,
    mode: str,
    jpath: str,
    vpath: str,
    vsize: int,
    *,
    threads: int,
    bs: int,
    seconds: float,
) -> dict[str, Any]:
    b0 = cpu_busy()
    out = subprocess.run(
        [exe, mode, jpath, vpath, str(vsize), str(threads), str(bs), str(seconds), "0.5"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    b1 = cpu_busy()
    r = json.loads(out)
    if r["err"]:
        raise OSError(-r["err"], f"jr_write in the C driver: {os.strerror(-r['err'])}")
    wall = r["wall"]
    return {
        "iops": r["writes"] / wall,
        "bw": r["writes"] * bs / wall,
        "appends_per_commit": r["appends"] / r["commits"] if r["commits"] else 0.0,
        "commits_per_s": r["commits"] / wall,
        "full_waits": r["full_waits"],
        "dm_writes_per_s": r["dm_writes"] / wall,
        "cpu": (b1[0] - b0[0]) / max(1, b1[1] - b0[1]),  # whole run, start-up included
        "direct_io": r["direct_io"],
    }


FIO_CASES = {  # append case -> fio runs (label, iodepth, jobs, engine); baseline = the best
    "4k QD1": [("psync", 1, 1, "psync")],
    "4k QD32": [("libaio QD32", 32, 1, "libaio"), ("32 psync threads", 1, 32, "psync")],
    "1M QD1": [("psync", 1, 1, "psync")],
}

APPEND_CASES = [  # name, bs, writer threads (= queue depth)
    ("4k QD1", 4 * KiB, 1),
    ("4k QD32", 4 * KiB, 32),
    ("1M QD1", 1 * MiB, 1),
]

PATHS = [  # key, scratch volume device, column title
    ("c_zero", "zero", "C writers, append only"),
    ("c_loop", "loop", "C writers, + flusher"),
    ("py_zero", "zero", "Python Journal.write"),
    ("manager", None, "Manager.open_volume"),
]


def bench_append(work: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every round measures fio and then each path right after it, case by
    case; a path's ratio is taken against the fio run of its own round, so
    a noisy neighbour on the host hits both sides of a ratio alike."""
    jsize = args.journal_mib * MiB
    vsize = args.volume_mib * MiB
    jdev = make_loop(os.path.join(work, "jbench-journal.img"), jsize)
    vdev = make_loop(os.path.join(work, "jbench-scratch.img"), vsize)
    zdev = make_zero(vsize)
    scratch = {"loop": vdev.path, "zero": zdev}
    res: dict[str, Any] = {
        "journal_device": {
            "path": jdev.path,
            "size": jsize,
            "backing": f"{jdev.backing_file} ({fs_type(work)})",
            "loop_dio": loop_dio(jdev),
        },
        "cpu_cost": copy_and_crc_cost(),
        "rounds": args.rounds,
        "seconds": args.seconds,
        "fio": {},  # "case label sync" -> [per round]
        "paths": {},  # path -> case -> [per round]
    }
    rt = args.seconds
    cases = {name: (bs, th) for name, bs, th in APPEND_CASES}
    # fio leaves the two superblock slots alone: the Manager's journal stays
    # open on this device (idle, drained) while fio runs between its rounds.
    region = jsize - 8 * KiB

    chosen: dict[str, str] = {}  # case -> the fio variant that won its first run

    def run_fio(name: str, sync: str) -> float:
        """The case's baseline: the best of its fio variants; after the first
        O_DSYNC round only the variant that won it runs (saves time)."""
        bs = cases[name][0]
        best, best_label = 0.0, ""
        for label, qd, jobs, engine in FIO_CASES[name]:
            if sync == "dsync" and chosen.get(name, label) != label:
                continue
            x = fio(
                jdev.path,
                bs=bs,
                qd=qd,
                jobs=jobs,
                engine=engine,
                sync=sync,
                runtime=rt,
                region=region,
            )
            res["fio"].setdefault(f"{name} {label} {sync}", []).append(x)
            if x["iops"] > best:
                best, best_label = x["iops"], label
        if sync == "dsync":
            chosen.setdefault(name, best_label)
        return best

    def keep(path: str, name: str, x: dict[str, Any], base: float) -> None:
        x["ratio"] = x["iops"] / base
        res["paths"].setdefault(path, {}).setdefault(name, []).append(x)

    def py_journal(mode: str, dev: str, name: str) -> dict[str, Any]:
        bs, th = cases[name]
        if mode == "nv":
            Journal.format(jdev.path, 0)
            j = Journal.open(jdev.path, mode="nv")
        else:
            j = Journal.open(None, mode="ram", ram_size=256 * MiB)
        try:
            j.attach(1, scratch[dev], vsize)
            j.start()
            res["direct_io"] = res.get("direct_io") or j.stats().direct_io
            return append_rate(
                functools.partial(j.write, 1),
                j.stats,
                threads=th,
                bs=bs,
                region=vsize,
                seconds=rt,
            )
        finally:
            j.close(drain=True, timeout=120)

    exe = build_c_driver(work, args.driver_cflags.split())
    try:
        for rnd in range(args.rounds):
            for name, bs, th in APPEND_CASES:
                base = run_fio(name, "dsync")
                if exe is not None:
                    for path, dev in (("c_zero", "zero"), ("c_loop", "loop")):
                        x = c_append_rate(
                            exe,
                            "nv",
                            jdev.path,
                            scratch[dev],
                            vsize,
                            threads=th,
                            bs=bs,
                            seconds=rt,
                        )
                        keep(path, name, x, base)
                keep("py_zero", name, py_journal("nv", "zero", name), base)
            print(f"  append round {rnd + 1}: fio, C, Python", file=sys.stderr, flush=True)

        # The local writer's full path: Manager.open_volume on a thin pool
        # whose journal is the same device; fio in between (journal drained).
        m = Manager(os.path.join(work, "state-append"))
        try:
            m.pool_create(f"{POOL_PREFIX}a", size=vsize + 256 * MiB, journal=jdev.path)
            m.volume_create(f"{POOL_PREFIX}a", "v", vsize)
            io = m.open_volume(f"{POOL_PREFIX}a", "v")
            prefill_journaled(io, vsize)  # thin blocks provisioned
            pj = io._pj
            for rnd in range(args.rounds):
                for name, bs, th in APPEND_CASES:
                    pj.sync(120)
                    base = run_fio(name, "dsync")
                    x = append_rate(io.write, pj.stats, threads=th, bs=bs, region=vsize, seconds=rt)
                    keep("manager", name, x, base)
                print(f"  append round {rnd + 1}: fio, Manager", file=sys.stderr, flush=True)
            pj.sync(120)
        finally:
            with contextlib.suppress(Exception):
                m.pool_destroy(f"{POOL_PREFIX}a", force=True)
            m.close()

        # References, once: fio with fdatasync after each write, and the
        # software ceiling (a RAM journal: no journal I/O; flusher to dm-zero).
        for name, *_ in APPEND_CASES:
            run_fio(name, "fdatasync")
        res["ceiling"] = {}
        for name, bs, th in APPEND_CASES[:2]:
            if exe is not None:
                res["ceiling"][f"C writers {name}"] = c_append_rate(
                    exe, "ram", jdev.path, zdev, vsize, threads=th, bs=bs, seconds=rt
                )
            res["ceiling"][f"Python writers {name}"] = py_journal("ram", "zero", name)
        print("  append references done", file=sys.stderr, flush=True)
    finally:
        subprocess.run(["dmsetup", "remove", "--retry", ZERO_DM], capture_output=True)
        for d in (jdev, vdev):
            with contextlib.suppress(OSError):
                loop.detach(d)
            with contextlib.suppress(OSError):
                os.unlink(d.backing_file)  # tmpfs: RAM
    return res


def prefill_journaled(io: Any, size: int) -> None:
    """Write the whole volume once and let the flusher put it on the dm
    device, so the measured writes overwrite provisioned thin blocks."""
    buf = mmap.mmap(-1, MiB)
    for off in range(0, size, MiB):
        io.write(off, buf)
    io._pj.sync(120)


# --------------------------------------------------------------------- latency


def pct(sorted_vals: list[float], p: float) -> float:
    if not sorted_vals:
        return 0.0
    k = min(len(sorted_vals) - 1, max(0, round(p / 100 * len(sorted_vals) + 0.5) - 1))
    return sorted_vals[k]


def steady_writer(
    write: Callable[[int, Any], Any],
    *,
    rate: float,
    seconds: float,
    size: int,
    seed: int,
) -> dict[str, Any]:
    """4 KiB random writes at ``rate`` per second (QD1, paced) for
    ``seconds``. A write's latency runs from its scheduled start when the
    writer was behind schedule (it queued behind a slow write: no
    coordinated omission), else from its actual start (so sleep overshoot
    is not counted)."""
    rng = random.Random(seed)
    buf = mmap.mmap(-1, 4096)
    buf.write(os.urandom(4096))
    blocks = size // 4096
    period = 1.0 / rate
    lat: list[float] = []
    svc: list[float] = []
    slow: list[tuple[float, float]] = []
    t_next = time.perf_counter()
    end = t_next + seconds
    prev_done = t_next
    while t_next < end:  # stops at the end even when behind schedule
        now = time.perf_counter()
        if now > end:
            break
        if now < t_next:
            time.sleep(t_next - now)
        off = rng.randrange(blocks) * 4096
        t_issue = time.perf_counter()
        write(off, buf)
        t_done = time.perf_counter()
        lat.append(t_done - (t_next if prev_done > t_next else t_issue))
        svc.append(t_done - t_issue)
        if t_done - t_issue > SLOW:
            slow.append((t_issue, t_done))
        prev_done = t_done
        t_next += period
    return {"lat": lat, "svc": svc, "slow": slow, "wall": time.perf_counter() - (end - seconds)}


def summarize(lat: list[float]) -> dict[str, float]:
    s = sorted(lat)
    return {
        "n": len(s),
        "p50_ms": pct(s, 50) * 1e3,
        "p99_ms": pct(s, 99) * 1e3,
        "p999_ms": pct(s, 99.9) * 1e3,
        "max_ms": (s[-1] if s else 0.0) * 1e3,
    }


def run_latency(
    m: Manager,
    pool: str,
    runner: Callable[..., dict[str, Any]],
    *,
    snapshots: bool,
    seconds: float,
    args: argparse.Namespace,
    seed: int,
    tag: str,
    mat_calls: list[tuple[float, float]],
    settle: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """The steady writer in this thread; with ``snapshots`` another thread
    calls Manager.snapshot_create every second meanwhile. ``settle`` runs
    after the writer stops (a journaled pool: every marker made). Returns
    the raw samples (merged over rounds by :func:`merge_latency`)."""
    stop = threading.Event()
    snap_calls: list[tuple[float, float]] = []  # (start, end) of snapshot_create
    snap_errors: list[BaseException] = []
    names: list[str] = []

    def snapper() -> None:
        i = 0
        nxt = time.perf_counter() + 0.5
        while not stop.is_set():
            d = nxt - time.perf_counter()
            if d > 0 and stop.wait(d):
                return
            t0 = time.perf_counter()
            try:
                m.snapshot_create([[pool, "v"]], f"{tag}-{i}")
            except BaseException as e:
                snap_errors.append(e)
                return
            snap_calls.append((t0, time.perf_counter()))
            names.append(f"{tag}-{i}")
            i += 1
            nxt += 1.0

    th = threading.Thread(target=snapper, daemon=True) if snapshots else None
    i0 = len(mat_calls)
    b0 = cpu_busy()
    if th is not None:
        th.start()
    try:
        w = runner(rate=args.rate, seconds=seconds, size=args.latency_mib * MiB, seed=seed)
    finally:
        stop.set()
        if th is not None:
            th.join()
        b1 = cpu_busy()
    if snap_errors:
        raise snap_errors[0]
    if settle is not None:
        settle()
    mats = mat_calls[i0:]
    # Count what was made, then delete it (untimed): the thin pool would
    # fill up with broken-shared blocks otherwise, and every row starts alike.
    existing = {s["name"] for s in m.snapshot_list(pool, "v")}
    made = sum(n in existing for n in names)
    for n in names:
        if n in existing:
            m.snapshot_delete(pool, "v", n)

    def overlaps(win: tuple[float, float], spans: list[tuple[float, float]]) -> bool:
        return any(b < win[1] and win[0] < e for b, e in spans)

    return {
        "lat": w["lat"],
        "svc": w["svc"],
        "wall": w["wall"],
        "busy": (b1[0] - b0[0], b1[1] - b0[1]),
        "snap_calls": [e - b for b, e in snap_calls],
        "materialize": [e - b for b, e in mats],
        "slow": len(w["slow"]),
        "slow_in_snap_call": sum(overlaps(x, snap_calls) for x in w["slow"]),
        "slow_in_materialize": sum(overlaps(x, mats) for x in w["slow"]),
        "made": made,
    }


def merge_latency(rows: list[dict[str, Any]]) -> dict[str, Any]:
    lat = [v for r in rows for v in r["lat"]]
    svc = [v for r in rows for v in r["svc"]]
    snaps = sorted(v for r in rows for v in r["snap_calls"])
    mats = sorted(v for r in rows for v in r["materialize"])
    out: dict[str, Any] = {
        "lat": summarize(lat),
        "svc": summarize(svc),
        "per_round_p999_ms": [summarize(r["lat"])["p999_ms"] for r in rows],
        "snapshots": len(snaps),
        "made": sum(r["made"] for r in rows),
        "achieved_rate": len(lat) / sum(r["wall"] for r in rows),
        "cpu": sum(r["busy"][0] for r in rows) / max(1, sum(r["busy"][1] for r in rows)),
        "slow": {
            "n": sum(r["slow"] for r in rows),
            "during_snapshot_call": sum(r["slow_in_snap_call"] for r in rows),
            "during_materialize": sum(r["slow_in_materialize"] for r in rows),
        },
    }
    if snaps:
        out["snapshot_call_ms"] = {"p50": pct(snaps, 50) * 1e3, "max": snaps[-1] * 1e3}
    if mats:
        out["materialize_ms"] = {"n": len(mats), "p50": pct(mats, 50) * 1e3, "max": mats[-1] * 1e3}
    return out


def bench_latency(work: str, args: argparse.Namespace) -> dict[str, Any]:
    """Both pools side by side; each round runs the four configurations one
    after the other (journal without/with snapshots, no journal
    without/with), so host noise spreads over all four alike."""
    vsize = args.latency_mib * MiB
    jdev = make_loop(os.path.join(work, "jbench-ljournal.img"), 256 * MiB)
    m = Manager(os.path.join(work, "state-latency"))
    mat_calls: list[tuple[float, float]] = []
    real_mat = m._materialize

    def timed_mat(*a: Any, **kw: Any) -> Any:  # instrumentation: times the marker thread's work
        t0 = time.perf_counter()
        try:
            return real_mat(*a, **kw)
        finally:
            mat_calls.append((t0, time.perf_counter()))

    m._materialize = timed_mat  # type: ignore[method-assign]
    fd = -1
    rows: dict[str, list[dict[str, Any]]] = {}
    res: dict[str, Any] = {"rounds": args.rounds, "seconds_per_row": args.latency_seconds}
    try:
        # Journaled (NV) thin pool, writer through Manager.open_volume.
        jpool, xpool = f"{POOL_PREFIX}j", f"{POOL_PREFIX}x"
        m.pool_create(jpool, size=vsize * 4 + 256 * MiB, journal=jdev.path)
        m.volume_create(jpool, "v", vsize)
        io = m.open_volume(jpool, "v")
        prefill_journaled(io, vsize)
        # No journal: the writer hits the dm device; a snapshot suspends it.
        m.pool_create(xpool, size=vsize * 4 + 256 * MiB, journal_mode="none")
        path = m.volume_create(xpool, "v", vsize)["path"]
        fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        big = mmap.mmap(-1, MiB)
        for off in range(0, vsize, MiB):
            os.pwrite(fd, big, off)
        os.fsync(fd)

        def direct_write(off: int, b: Any) -> None:
            os.pwrite(fd, b, off)

        def py(write: Callable[[int, Any], Any]) -> Callable[..., dict[str, Any]]:
            return functools.partial(steady_writer, write)

        def settle() -> None:
            io._pj.sync(120)

        configs = [
            ("journal nv, Python writer", jpool, py(io.write), settle),
            ("no journal (suspend), Python writer", xpool, py(direct_write), None),
        ]
        if not args.no_c_writer and shutil.which("cc"):
            cp = CPaced(work)
            configs[1:1] = [
                (
                    "journal nv, C writer",
                    jpool,
                    cp.writer(journal=io._pj.journal.c_handle, vol=io.vol_id),
                    settle,
                )
            ]
            configs.append(("no journal (suspend), C writer", xpool, cp.writer(fd=fd), None))
        per_row = args.latency_seconds / args.rounds
        for rnd in range(args.rounds):
            for ci, (kind, pool, write, settle) in enumerate(configs):
                for snaps in (False, True):
                    key = f"{kind}, {'snapshots' if snaps else 'no snapshots'}"
                    rows.setdefault(key, []).append(
                        run_latency(
                            m,
                            pool,
                            write,
                            snapshots=snaps,
                            seconds=per_row,
                            args=args,
                            seed=rnd,
                            tag=f"r{rnd}c{ci}",
                            mat_calls=mat_calls,
                            settle=settle,
                        )
                    )
            print(f"  latency round {rnd + 1} done", file=sys.stderr, flush=True)
        for key, rs in rows.items():
            res[key] = merge_latency(rs)
        res["kinds"] = [k for k, *_ in configs]
    finally:
        if fd >= 0:
            os.close(fd)
        for p in m.catalog.pools():
            with contextlib.suppress(Exception):
                m.pool_destroy(p.name, force=True)
        m.close()
        with contextlib.suppress(OSError):
            loop.detach(jdev)
    return res


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def report_append(r: dict[str, Any]) -> None:
    d = r["journal_device"]
    print(
        f"\n## Journal append (NV): {d['path']} = loop over {d['backing']}, "
        f"{d['size'] // MiB} MiB, loop direct I/O {d['loop_dio']}; "
        f"journal opened O_DIRECT: {bool(r.get('direct_io'))}; "
        f"{r['rounds']} rounds of {r['seconds']:g} s per measurement\n"
    )
    f = r["fio"]

    def unit(iops: float, bs: int) -> str:
        return f"{iops * bs / MiB:.0f} MiB/s" if bs >= MiB else f"{iops:.0f}"

    def fio_cell(name: str, bs: int, sync: str) -> str:
        return " / ".join(
            unit(med([x["iops"] for x in f.get(f"{name} {label} {sync}", [])]), bs)
            for label, *_ in FIO_CASES[name]
        )

    paths = [(k, t) for k, _, t in PATHS if k in r["paths"]]
    print("| case | fio O_DSYNC | fio fdatasync | " + " | ".join(t for _, t in paths) + " |")
    print("|---|---|---|" + "---|" * len(paths))
    for name, bs, _ in APPEND_CASES:
        cells = [fio_cell(name, bs, "dsync"), fio_cell(name, bs, "fdatasync")]
        for k, _ in paths:
            xs = r["paths"][k].get(name, [])
            ratios = [x["ratio"] for x in xs]
            cells.append(
                f"{unit(med([x['iops'] for x in xs]), bs)} (**{med(ratios):.2f}x**, "
                f"{min(ratios):.2f}-{max(ratios):.2f})"
            )
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(
        "\nMedians over the rounds; 4 KiB figures in IOPS. Ratio: against the fio O_DSYNC run "
        "of the same round, median and range over the rounds. 4k QD32 fio: libaio iodepth 32 "
        "/ 32 psync threads; both run in the first round, the better one in the others."
    )
    c = r["cpu_cost"]
    print(
        f"\nCPU cost per MiB appended: crc32c {c['crc32c_ms_per_mib']:.2f} ms, "
        f"copy into the ring {c['memcpy_ms_per_mib']:.2f} ms (crc32c by table, "
        f"for comparison: {c['crc32c_table_ms_per_mib']:.2f} ms)."
    )
    if r.get("ceiling"):
        print(
            "Software ceiling (RAM journal: no journal I/O, flusher to dm-zero), IOPS: "
            + ", ".join(f"{k} {x['iops']:.0f}" for k, x in r["ceiling"].items())
            + "."
        )
    print(
        "\n| path | case | appends/commit | commits/s | full waits | flusher dm writes/s "
        "| system CPU busy |"
    )
    print("|---|---|---|---|---|---|---|")
    for k, t in paths:
        for name, xs in r["paths"][k].items():
            print(
                f"| {t} | {name} | {med([x['appends_per_commit'] for x in xs]):.2f} | "
                f"{med([x['commits_per_s'] for x in xs]):.0f} | "
                f"{sum(x['full_waits'] for x in xs)} | "
                f"{med([x['dm_writes_per_s'] for x in xs]):.0f} | "
                f"{med([x['cpu'] for x in xs]) * 100:.0f}% |"
            )


def report_latency(r: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\n## Steady writer: 4 KiB random writes at {args.rate:g}/s (QD1) over "
        f"{args.latency_mib} MiB, {args.latency_seconds:g} s per configuration in "
        f"{r['rounds']} rounds; latency in ms\n"
    )
    print(
        "| configuration | snapshots | writes | p50 | p99 | p99.9 | max | p99.9 vs no snaps |"
        " snapshot call p50 / max |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for kind in r["kinds"]:
        base = r[f"{kind}, no snapshots"]["lat"]["p999_ms"]
        for snaps in ("no snapshots", "snapshots"):
            x = r[f"{kind}, {snaps}"]
            lat, sc = x["lat"], x.get("snapshot_call_ms")
            n_snaps = f"{x['snapshots']} ({x['made']} made)" if snaps == "snapshots" else "-"
            print(
                f"| {kind} | {n_snaps} | {lat['n']} | "
                f"{lat['p50_ms']:.2f} | {lat['p99_ms']:.2f} | {lat['p999_ms']:.2f} | "
                f"{lat['max_ms']:.2f} | **{lat['p999_ms'] / base:.2f}x** | "
                + (f"{sc['p50']:.0f} / {sc['max']:.0f}" if sc else "-")
                + " |"
            )
    print(
        f"\n| configuration | achieved rate | CPU busy | writes > {SLOW * 1e3:.0f} ms "
        "| of which during a snapshot call / a materialisation | materialise p50 / max ms "
        "| p99.9 per round | service time p99.9 / max |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kind in r["kinds"]:
        for snaps in ("no snapshots", "snapshots"):
            key = f"{kind}, {snaps}"
            x = r[key]
            sl, mt = x["slow"], x.get("materialize_ms")
            print(
                f"| {key} | {x['achieved_rate']:.0f}/s | {x['cpu'] * 100:.0f}% | {sl['n']} | "
                f"{sl['during_snapshot_call']} / {sl['during_materialize']} | "
                + (f"{mt['p50']:.0f} / {mt['max']:.0f}" if mt else "-")
                + " | "
                + ", ".join(f"{v:.1f}" for v in x["per_round_p999_ms"])
                + f" | {x['svc']['p999_ms']:.1f} / {x['svc']['max_ms']:.1f} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs (smoke)")
    ap.add_argument("--only", choices=("append", "latency"), help="run one section")
    ap.add_argument("--seconds", type=float, help="window per append measurement (default 1.5)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick 1)")
    ap.add_argument("--rate", type=float, default=100, help="steady writer rate, writes/s")
    ap.add_argument(
        "--latency-seconds",
        type=float,
        help="per latency configuration, over all rounds (default 24)",
    )
    ap.add_argument("--latency-mib", type=int, default=64, help="writer's volume size")
    ap.add_argument("--journal-mib", type=int, default=512, help="journal device size")
    ap.add_argument("--volume-mib", type=int, default=128, help="scratch volume size")
    ap.add_argument("--workdir", default=None, help="where the backing files go (/tmp)")
    ap.add_argument("--json", help="also write the raw figures here")
    ap.add_argument("--driver-cflags", default="", help="extra cc flags for the C append driver")
    ap.add_argument("--no-c-writer", action="store_true", help="latency: only the Python writers")
    ap.add_argument(
        "--switch-interval", type=float, help="sys.setswitchinterval (s) for the GIL; default 0.005"
    )
    args = ap.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    if args.seconds is None:
        args.seconds = 1.0 if args.quick else 1.5
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.latency_seconds is None:
        args.latency_seconds = 4.0 if args.quick else 24.0
    if args.quick:
        args.journal_mib = min(args.journal_mib, 256)

    started = time.perf_counter()
    cleanup_leftovers()
    work = tempfile.mkdtemp(prefix="jbench-", dir=args.workdir)
    out: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "argv": sys.argv[1:],
        "switch_interval": sys.getswitchinterval(),
    }
    print(
        f"# journal bench {out['date']}, kernel {out['kernel']}, {out['cpus']} CPUs, "
        f"args {' '.join(sys.argv[1:]) or '(defaults)'}"
    )

    def save() -> None:  # before printing: a report bug must not lose a run
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    try:
        if args.only in (None, "append"):
            out["append"] = bench_append(work, args)
            save()
            report_append(out["append"])
        if args.only in (None, "latency"):
            out["latency"] = bench_latency(work, args)
            save()
            report_latency(out["latency"], args)
    finally:
        cleanup_leftovers()
        shutil.rmtree(work, ignore_errors=True)
        left = [lo.path for lo in loop.attached() if "/jbench-" in lo.backing_file]
        dms = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True).stdout
        left += [
            ln.split()[0]
            for ln in dms.splitlines()
            if ln.startswith((f"dmsnap-{POOL_PREFIX}", ZERO_DM))
        ]
        print(
            f"\ncleanup: {'left ' + ', '.join(left) if left else 'no dm or loop devices left'}; "
            f"total {time.perf_counter() - started:.0f} s"
        )


if __name__ == "__main__":
    main()
