"""Storage benchmarks (issue: pools, volumes, snapshots). Run in the VM:

    tools/vm -- .venv/bin/python bench/storage_bench.py [--quick]

1. Write cost of snapshots: fio 4 KiB random writes (O_DIRECT, QD16) over
   a fresh region of a volume with 0, 1, 4, 16 snapshots, thin vs classic,
   reported as a ratio to 0 snapshots in the same run.
2. Control path: snapshot create / list / delete latency with 1, 100, 1000
   snapshots in the pool, and daemon start (reassembly) time with 100
   active snapshots, after a "reboot" (all devices removed).

The pools have no journal (``journal_mode="none"``): this measures the
device-mapper stack, which fio writes directly; the journal has its own
benchmark (bench/journal_bench.py).

Prints a Markdown table; bench/README.md records results and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dmsnap.storage.manager import Manager

MiB = 1 << 20


def fio_write(path: str, offset: int, size: int) -> float:
    """IOPS of one pass of 4 KiB random writes over [offset, offset+size)."""
    out = subprocess.run(
        [
            "fio",
            "--name=w",
            f"--filename={path}",
            "--rw=randwrite",
            "--bs=4k",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=16",
            f"--offset={offset}",
            f"--size={size}",
            "--randrepeat=0",
            "--norandommap=0",
            "--output-format=json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)["jobs"][0]["write"]["iops"]


def snapshot_write_cost(state: str, backend: str, counts: list[int], region: int) -> dict:
    m = Manager(state)
    vol_size = region * (len(counts) + 1)
    m.pool_create("b", backend=backend, size=vol_size * 8 + 256 * MiB, journal_mode="none")
    path = m.volume_create("b", "v", vol_size)["path"]
    # a journaled volume has no path: fio would write a file named "None" here
    assert path, "the bench volume has no block device"
    # Populate everything once so 0 snapshots measures overwrite, not allocation.
    subprocess.run(
        [
            "fio",
            "--name=fill",
            f"--filename={path}",
            "--rw=write",
            "--bs=1M",
            "--direct=1",
            f"--size={vol_size}",
            "--output-format=json",
        ],
        capture_output=True,
        check=True,
    )
    res = {}
    made = 0
    for i, n in enumerate(counts):
        while made < n:
            m.snapshot_create([["b", "v"]], f"s{made}")
            made += 1
        # A fresh region per measurement: every first write pays the COW.
        res[n] = fio_write(path, i * region, region)
    m.pool_destroy("b", force=True)
    m.close()
    return res


def control_latency(state: str, sizes: list[int]) -> dict:
    m = Manager(state)
    m.pool_create("c", size=512 * MiB, journal_mode="none")
    m.volume_create("c", "v", 16 * MiB)
    out = {}
    have = 0
    for n in sizes:
        while have < n:
            m.snapshot_create([["c", "v"]], f"s{have}")
            have += 1
        t0 = time.perf_counter()
        m.snapshot_create([["c", "v"]], "probe")
        create = time.perf_counter() - t0
        lists = []
        for _ in range(5):
            t0 = time.perf_counter()
            listed = m.snapshot_list("c")
            lists.append(time.perf_counter() - t0)
        assert len(listed) == n + 1
        t0 = time.perf_counter()
        m.snapshot_delete("c", "v", "probe")
        delete = time.perf_counter() - t0
        out[n] = {"create": create, "list": statistics.median(lists), "delete": delete}
    m.pool_destroy("c", force=True)
    m.close()
    return out


def reassembly(state: str, n: int) -> dict:
    m = Manager(state)
    m.pool_create("r", size=512 * MiB, journal_mode="none")
    m.volume_create("r", "v", 16 * MiB)
    for i in range(n):
        m.snapshot_create([["r", "v"]], f"s{i}")
        m.snapshot_activate("r", "v", f"s{i}")
    m.teardown()
    m.close()
    t0 = time.perf_counter()
    m = Manager(state)
    m.assemble()
    cold = time.perf_counter() - t0
    m.close()
    t0 = time.perf_counter()
    m = Manager(state)
    m.assemble()
    warm = time.perf_counter() - t0
    m.pool_destroy("r", force=True)
    m.close()
    return {"devices": n + 5, "cold": cold, "warm": warm}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    args = ap.parse_args()
    region = 4 * MiB if args.quick else 16 * MiB
    counts = [0, 1, 4] if args.quick else [0, 1, 4, 16]
    with tempfile.TemporaryDirectory() as d:
        print("## Write IOPS vs number of snapshots (ratio to 0 snapshots)\n")
        print("| backend | " + " | ".join(f"{n} snaps" for n in counts) + " |")
        print("|---|" + "---|" * len(counts))
        for backend in ("thin", "classic"):
            r = snapshot_write_cost(os.path.join(d, backend), backend, counts, region)
            cells = [f"{r[n]:.0f} IOPS ({r[n] / r[0]:.2f}x)" for n in counts]
            print(f"| {backend} | " + " | ".join(cells) + " |", flush=True)
        sizes = [1, 100] if args.quick else [1, 100, 1000]
        print("\n## Snapshot control-path latency (thin, seconds)\n")
        print("| snapshots | create | list | delete |\n|---|---|---|---|")
        for n, v in control_latency(os.path.join(d, "lat"), sizes).items():
            print(f"| {n} | {v['create']:.3f} | {v['list']:.4f} | {v['delete']:.3f} |", flush=True)
        r = reassembly(os.path.join(d, "re"), 20 if args.quick else 100)
        print("\n## Reassembly\n")
        print(
            f"{r['devices']} dm devices: after reboot {r['cold']:.2f} s, "
            f"already up {r['warm']:.2f} s"
        )


if __name__ == "__main__":
    main()
