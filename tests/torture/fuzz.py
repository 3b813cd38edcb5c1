"""tools/torture fuzz: hostile input (issue 18, section 3).

Targets:
  journal   libFuzzer: the journal's recovery (jr_open_ex on crafted images)
  tcmu      libFuzzer: the TCMU ring handler's command fetch, fast and slow path
  scsi      atheris (libFuzzer's engine for Python): the SCSI emulator and the
            vendor-command codec, command sequences on one LUN
            (tests/torture/fuzz/scsi_fuzz.py; the same checks as the
            hypothesis properties of tests/host/test_scsi_fuzz.py)
  control   the daemon's control socket: garbage from many clients at once
            (a hypothesis property), silent, trickling and non-reading
            clients beyond the connection cap (tests/host/test_control_hostile.py)

  tools/torture fuzz --quick                 every target, a few seconds each (CI)
  tools/torture fuzz --target journal --runs 1000000
  tools/torture fuzz --target scsi --runs 1000000

The C targets are built with clang -fsanitize=fuzzer,address,undefined into
build/fuzz/; every target starts from tests/torture/corpus/TARGET/ (read only: the
corpus grown by a run goes to build/fuzz/corpus-TARGET/) and write what crashes
to build/fuzz/crash-TARGET/. Crashing inputs, once fixed, are kept in
tests/torture/regress/TARGET/ (tests/host/test_fuzz_regress.py replays them).
Exit status: 0 if no target found anything.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "tests" / "torture"
BUILD = ROOT / "build" / "fuzz"
C_TARGETS = {
    "journal": ["tests/torture/fuzz/journal_fuzz.c", "csrc/journal.c", "csrc/crc32c.c"],
    "tcmu": ["tests/torture/fuzz/tcmu_fuzz.c", "csrc/journal.c", "csrc/crc32c.c"],
}
QUICK_RUNS = {"journal": 20000, "tcmu": 10000, "scsi": 30000, "control": 50}
PY = sys.executable


def build(target: str) -> Path:
    clang = shutil.which("clang")
    if not clang:
        sys.exit("fuzz: clang is missing (tools/setup installs it)")
    BUILD.mkdir(parents=True, exist_ok=True)
    exe = BUILD / f"{target}_fuzz"
    srcs = [ROOT / s for s in C_TARGETS[target]]
    if (
        not exe.exists()
        or any(s.stat().st_mtime > exe.stat().st_mtime for s in srcs)
        or any(
            (ROOT / "csrc" / h).stat().st_mtime > exe.stat().st_mtime
            for h in ("journal.h", "tcmu.h")
        )
    ):
        cmd = [
            clang, "-g", "-O2", "-fsanitize=fuzzer,address,undefined",
            "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-pthread",
            "-DJR_MEM_MIN=65536",  # the journal target pages through small rings
            f"-I{ROOT / 'csrc'}", *map(str, srcs), "-o", str(exe),
        ]  # fmt: skip
        subprocess.run(cmd, check=True)
    return exe


def run_libfuzzer(target: str, runs: int, seed: int, max_total_time: int) -> bool:
    """A C target (clang's libFuzzer) or the Python one (atheris): same
    options, same statistics, same corpus and crash directories."""
    if target in C_TARGETS:
        engine = [str(build(target))]
    else:
        engine = [PY, str(HERE / "fuzz" / f"{target}_fuzz.py")]
    corpus = BUILD / f"corpus-{target}"
    crashes = BUILD / f"crash-{target}"
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(exist_ok=True)
    cmd = [
        *engine, f"-runs={runs}", f"-seed={seed}", "-timeout=10", "-rss_limit_mb=2048",
        "-print_final_stats=1", f"-artifact_prefix={crashes}/",
        str(corpus), str(HERE / "corpus" / target),
    ]  # fmt: skip
    if max_total_time:
        cmd.insert(len(engine), f"-max_total_time={max_total_time}")
    print(f"fuzz: {target}: {' '.join(cmd)}", flush=True)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1", UBSAN_OPTIONS="print_stacktrace=1")
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    dt = time.monotonic() - t0
    execs = re.search(r"stat::number_of_executed_units:\s*(\d+)", r.stderr)
    n = int(execs.group(1)) if execs else 0
    found = r.returncode != 0
    print(
        f"fuzz: {target}: {n} executions in {dt:.0f} s ({n / max(dt, 1e-9):.0f}/s), "
        f"{'FOUND A CRASH (see ' + str(crashes) + ')' if found else '0 crashes'}",
        flush=True,
    )
    if found:
        print(r.stderr[-6000:], file=sys.stderr)
    return not found


def run_control(runs: int, seed: int) -> bool:
    """runs: examples of the garbage property (each up to 16 clients at once)."""
    env = dict(os.environ, DMSNAP_FUZZ_EXAMPLES_EACH=str(runs))
    cmd = [
        PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--hypothesis-seed={seed}",
        "tests/host/test_control_hostile.py",
    ]  # fmt: skip
    print(f"fuzz: control: DMSNAP_FUZZ_EXAMPLES_EACH={runs} {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, env=env)
    dt = time.monotonic() - t0
    print(f"fuzz: control: {runs} examples in {dt:.0f} s, rc {r.returncode}", flush=True)
    return r.returncode == 0


def main() -> int:
    ap = argparse.ArgumentParser(prog="tools/torture fuzz", description=__doc__.split("\n")[0])
    names = ["journal", "tcmu", "scsi", "control", "all"]
    ap.add_argument("--target", choices=names, default="all")
    ap.add_argument(
        "--runs", type=int, help="executions (journal, tcmu, scsi) / examples (control)"
    )
    ap.add_argument("--quick", action="store_true", help="a few seconds per target (CI)")
    ap.add_argument("--seed", type=int, help="random seed (default: from the clock, printed)")
    ap.add_argument("--max-time", type=int, default=0, help="stop a target after N seconds")
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else int(time.time()) % 100000
    print(f"fuzz: seed {seed}", flush=True)
    targets = ["journal", "tcmu", "scsi", "control"] if a.target == "all" else [a.target]
    ok = True
    for t in targets:
        runs = a.runs or (QUICK_RUNS[t] if a.quick else 1_000_000)
        if t != "control":
            ok &= run_libfuzzer(t, runs, seed, a.max_time or (60 if a.quick else 0))
        else:
            ok &= run_control(runs, seed)
    print("fuzz: " + ("ok" if ok else "FAILED"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
