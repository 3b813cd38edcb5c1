"""Where a SCSI command's latency goes, from the kernel's own tracepoints.

Used by ``scsi_bench.py --trace`` (and ``--graph``, the function_graph
helpers at the end). Per fio run:

* **backend residency**: from ``target:target_sequencer_start`` (LIO hands
  the command to the backstore: iblock submits a bio, TCMU posts it to the
  ring) to ``target:target_cmd_complete`` (the backstore completed it). What
  an initiator waits beyond that is the fabric's (iSCSI, tcm_loop) and the
  initiator's own time.
* **wake-up latency** per thread kind: from ``sched:sched_wakeup`` of a
  thread to the ``sched:sched_switch`` that runs it. Under software
  emulation a wake-up is costly, and a command's path is a chain of them.
* the **phases** around the backstore, matched by LBA with the initiator's
  ``block_rq_issue`` and ``block_rq_complete``; **work items** from
  queueing to running; **lock contentions** per thread kind.

Tracing costs CPU too, so these runs are for the split, not for IOPS.
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import subprocess
from typing import Any

TRACEFS = "/sys/kernel/tracing"
# thread kinds whose wake-ups are timed (sched_switch's next_comm)
KINDS = ("tcmu-worker", "iscsi_ttx", "iscsi_trx", "kworker", "jr-commit", "jr-flush", "fio")

# "<task>-<pid> [cpu] <flags> <secs>.<usecs>: <event>: <fields>"
_LINE = re.compile(
    r"^\s*(?P<task>.+?)-(?P<pid>\d+)\s+\[(?P<cpu>\d+)\]\s+\S+\s+"
    r"(?P<ts>\d+\.\d+): (?P<ev>\w+): (?P<rest>.*)$"
)
_TAG = re.compile(r"tag (0x[0-9a-f]+|\d+)")
_CDB = re.compile(r"CDB ((?:[0-9a-f]{2} ?){16})")
_WQ_QUEUE = re.compile(r"work struct=(?P<w>\S+) function=(?P<fn>\S+) ")
_WQ_START = re.compile(r"work struct (?P<w>\S+): function (?P<fn>\S+)")
_RQ = re.compile(r"^(?P<dev>\d+,\d+) \S+ (?:\d+ )?\(.*?\) (?P<sector>\d+) \+ \d+")
_SCSI_LBA = re.compile(r"cmnd=\((?:READ|WRITE)_(?:10|16) lba=(\d+) ")
_WAKEUP = re.compile(r"comm=(?P<comm>.+?) pid=(?P<pid>\d+) .*target_cpu=(?P<cpu>\d+)")
_SWITCH = re.compile(
    r"prev_comm=(?P<prev>.+?) prev_pid=.*==> next_comm=(?P<comm>.+?) next_pid=(?P<pid>\d+) "
)


def _w(path: str, value: str) -> None:
    with open(os.path.join(TRACEFS, path), "w") as f:
        f.write(value)


def available() -> str | None:
    """None if tracing works here, else why not."""
    if not os.path.isdir(os.path.join(TRACEFS, "events")):
        mount = ["mount", "-t", "tracefs", "nodev", TRACEFS]
        subprocess.run(mount, check=False, capture_output=True)
    for ev in ("target/target_sequencer_start", "target/target_cmd_complete", "sched/sched_switch"):
        if not os.path.isdir(os.path.join(TRACEFS, "events", ev)):
            return f"no tracepoint {ev} under {TRACEFS}"
    return None


# Address-space switches: x86's tlb_flush tracepoint with reason 0 ("flush
# on task switch") fires each time a CPU loads another process's page
# tables. Counted in the kernel (a hist trigger), so it costs next to
# nothing and needs no trace buffer. Software emulation (QEMU TCG) throws
# away its whole emulated TLB on every one; see bench/ctxswitch.c.
_MM_HIST = "hist:keys=reason:vals=hitcount"
_MM_EVENT = "events/tlb/tlb_flush"


def mm_switches_arm() -> bool:
    """Start counting, once per run; False where this kernel has no such
    tracepoint. See arm() for why not once per measurement."""
    if available() is not None or not os.path.isdir(os.path.join(TRACEFS, _MM_EVENT)):
        return False
    try:
        _w(f"{_MM_EVENT}/trigger", _MM_HIST)
    except OSError:
        return False
    return True


def mm_switches() -> int:
    """Address-space switches since mm_switches_arm (all CPUs): take the
    difference of two readings."""
    with open(os.path.join(TRACEFS, _MM_EVENT, "hist")) as f:
        text = f.read()
    m = re.search(r"\{ reason:\s+0 \} hitcount:\s+(\d+)", text)
    return int(m.group(1)) if m else 0


def mm_switches_disarm() -> None:
    with contextlib.suppress(OSError):
        _w(f"{_MM_EVENT}/trigger", "!" + _MM_HIST)


# every tracepoint start() enables and stop() disables (lock: 5.19+ only)
EVENTS = (
    "target/target_sequencer_start",
    "target/target_cmd_complete",
    "sched/sched_wakeup",
    "sched/sched_switch",
    "block/block_rq_issue",
    "block/block_rq_complete",
    "scsi/scsi_dispatch_cmd_done",
    "workqueue/workqueue_queue_work",
    "workqueue/workqueue_execute_start",
    "lock/contention_begin",
)
BUFFER_KB = "16384"  # the newest 16 MiB per CPU: enough, and quick to parse


def _events(on: bool) -> None:
    for ev in EVENTS:
        if os.path.isdir(os.path.join(TRACEFS, "events", ev)):
            _w(f"events/{ev}/enable", "1" if on else "0")


def arm() -> None:
    """Enable the tracepoints, once per run, with tracing off. Enabling or
    disabling a tracepoint rewrites kernel code on live CPUs (a jump label,
    patched through int3 breakpoints; enabling any event also hooks
    sched_switch to record task names, a site inside __schedule). Under QEMU
    TCG that wedged the guest now and then (both vCPUs stuck with
    interrupts off: one taking the int3 in __schedule over and over, the
    other spinning on a lock; tools/vm-monitor), so start() and stop() only
    switch tracing_on."""
    _w("tracing_on", "0")
    _w("buffer_size_kb", BUFFER_KB)
    _events(True)


def disarm() -> None:
    _w("tracing_on", "0")
    _events(False)
    _w("trace", "")


def start() -> None:
    """Trace the target's command events, wake-ups, the initiator's block
    requests (to split a command's life into phases), work items and lock
    contentions (after arm())."""
    _w("tracing_on", "0")
    _w("trace", "")  # clears the buffer
    _w("tracing_on", "1")


def stop(disk: str) -> dict[str, Any]:
    """Stop tracing; the split of the run on ``disk`` (the initiator's
    /dev/sdX), in microseconds (p50, p90)."""
    _w("tracing_on", "0")
    with open(os.path.join(TRACEFS, "trace")) as f:
        text = f.read()
    _w("trace", "")
    rdev = os.stat(disk).st_rdev
    return summarize(text.splitlines(), f"{os.major(rdev)},{os.minor(rdev)}")


def kind_of(comm: str) -> str | None:
    for k in KINDS:
        if comm.startswith(k):
            return k
    return None


def _lba(rest: str) -> int | None:
    """The LBA of a READ/WRITE 10/16 in a target event's CDB."""
    m = _CDB.search(rest)
    if not m:
        return None
    b = bytes.fromhex(m[1].replace(" ", ""))
    if b[0] in (0x28, 0x2A):
        return int.from_bytes(b[2:6], "big")
    if b[0] in (0x88, 0x8A):
        return int.from_bytes(b[2:10], "big")
    return None


def summarize(lines: list[str], dev: str = "") -> dict[str, Any]:
    """Phases of a command, matched by LBA (512-byte blocks on both sides):
    ``to_target`` from the initiator's block_rq_issue to LIO's sequencer
    start (initiator's transport, network, target receive), ``residency``
    in the backstore, ``from_target`` from the backstore's completion to the
    initiator's block_rq_complete (response send, network, initiator)."""
    started: dict[str, float] = {}
    residency: list[float] = []
    issued: dict[int, float] = {}
    done: dict[int, float] = {}
    to_target: list[float] = []
    from_target: list[float] = []
    answered: dict[int, float] = {}  # lba -> the initiator's SCSI completion
    to_initiator: list[float] = []
    in_initiator: list[float] = []
    contended: dict[str, int] = {}  # thread kind -> lock contentions
    queued: dict[str, float] = {}  # work struct -> queued at
    work: dict[str, list[float]] = {}  # function -> queue-to-start delays
    woken: dict[str, tuple[float, str]] = {}  # pid -> (time, kind)
    wake: dict[str, list[float]] = {}
    # what ran on iscsi_ttx's CPU between its wake-up and its running
    ttx_wait: dict[int, tuple[str, float]] = {}  # cpu -> (pid, woken at)
    last_switch: dict[int, float] = {}
    ttx_blocked: dict[str, float] = {}
    ttx_wakeups = 0
    lost = 0
    for ln in lines:
        if ln.startswith("#"):
            continue
        if "LOST" in ln and "EVENTS" in ln:
            lost += 1
            continue
        m = _LINE.match(ln)
        if not m:
            continue
        ts, ev, rest = float(m["ts"]), m["ev"], m["rest"]
        if ev == "target_sequencer_start":
            t = _TAG.search(rest)
            if t:
                started[t[1]] = ts
            lba = _lba(rest)
            if lba is not None and lba in issued:
                to_target.append(ts - issued.pop(lba))
        elif ev == "target_cmd_complete":
            t = _TAG.search(rest)
            if t and t[1] in started:
                residency.append(ts - started.pop(t[1]))
            lba = _lba(rest)
            if lba is not None:
                done[lba] = ts
        elif ev == "scsi_dispatch_cmd_done":
            q = _SCSI_LBA.search(rest)
            if q and int(q[1]) in done:
                answered[int(q[1])] = ts
                to_initiator.append(ts - done[int(q[1])])
        elif ev == "contention_begin":
            k = kind_of(m["task"].strip()) or "other"
            contended[k] = contended.get(k, 0) + 1
        elif ev == "workqueue_queue_work":
            q = _WQ_QUEUE.search(rest + " ")
            if q:
                queued[q["w"]] = ts
        elif ev == "workqueue_execute_start":
            q = _WQ_START.search(rest)
            if q and q["w"] in queued:
                work.setdefault(q["fn"], []).append(ts - queued.pop(q["w"]))
        elif ev in ("block_rq_issue", "block_rq_complete"):
            r = _RQ.match(rest)
            if not r or r["dev"] != dev:
                continue
            sector = int(r["sector"])
            if ev == "block_rq_issue":
                issued[sector] = ts
            elif sector in done:
                from_target.append(ts - done.pop(sector))
                if sector in answered:
                    in_initiator.append(ts - answered.pop(sector))
        elif ev == "sched_wakeup":
            w = _WAKEUP.search(rest + " ")
            if w and (k := kind_of(w["comm"])):
                woken[w["pid"]] = (ts, k)
                if k == "iscsi_ttx":
                    ttx_wait[int(w["cpu"])] = (w["pid"], ts)
                    ttx_wakeups += 1
        elif ev == "sched_switch":
            s = _SWITCH.search(rest + " ")
            cpu = int(m["cpu"])
            if s and cpu in ttx_wait:
                pid, t0 = ttx_wait[cpu]
                prev = kind_of(s["prev"]) or s["prev"].split("/")[0]
                since = max(t0, last_switch.get(cpu, t0))
                ttx_blocked[prev] = ttx_blocked.get(prev, 0.0) + ts - since
                if s["pid"] == pid:
                    del ttx_wait[cpu]
            last_switch[cpu] = ts
            if s and s["pid"] in woken:
                t0, k = woken.pop(s["pid"])
                wake.setdefault(k, []).append(ts - t0)

    def pct(xs: list[float]) -> dict[str, float]:
        if not xs:
            return {"n": 0, "p50_us": 0.0, "p90_us": 0.0}
        q = statistics.quantiles(xs, n=10) if len(xs) > 1 else [xs[0]] * 9
        return {"n": len(xs), "p50_us": statistics.median(xs) * 1e6, "p90_us": q[8] * 1e6}

    return {
        "lost_buffers": lost,
        "to_target": pct(to_target),
        "residency": pct(residency),
        "from_target": pct(from_target),
        # from_target split at the initiator's SCSI completion (scsi_done):
        # LIO's completion, the response's send and the network; then the
        # initiator's block completion on the submitting CPU
        "to_initiator": pct(to_initiator),
        "in_initiator": pct(in_initiator),
        "wakeup": {k: pct(v) for k, v in sorted(wake.items())},
        "lock_contentions": contended,
        # µs per ttx wake-up that each kind of task ran on its CPU first
        "ttx_blocked_by": {
            k: v * 1e6 / max(1, ttx_wakeups)
            for k, v in sorted(ttx_blocked.items(), key=lambda kv: -kv[1])[:6]
        },
        # work items' wait from queueing to running, the busiest functions
        "work": {k: pct(v) for k, v in sorted(work.items(), key=lambda kv: -len(kv[1]))[:8]},
    }


# ------------------------------------------------------------ function graph

_GRAPH = re.compile(
    r"^\s*\d+\)\s+(?:[!#*@+$&-]\s*)?(?P<dur>[\d.]+) us\s+\|\s(?P<ind>\s*)(?P<fn>[\w.]+)\(\);"
)
_CLOSE = re.compile(
    r"^\s*\d+\)\s+(?:[!#*@+$&-]\s*)?(?P<dur>[\d.]+) us\s+\|\s(?P<ind>\s*)\}\s*"
    r"(?:/\* (?P<fn>[\w.]+) \*/)?"
)


def graph_start(tids: list[int], depth: int = 2, fn: str = "") -> None:
    """Kernel time of these threads per function, ``depth`` calls deep from
    the kernel entry (2: each system call's handler), sleeping excluded;
    with ``fn`` (e.g. __x64_sys_pread64), only inside that function.
    Switching the tracer patches every function's entry on live CPUs, which
    can wedge a TCG guest (see arm()): a diagnostic, not for long runs."""
    _w("tracing_on", "0")
    _w("current_tracer", "nop")
    _w("trace", "")
    _w("buffer_size_kb", BUFFER_KB)
    _w("set_ftrace_pid", " ".join(str(t) for t in tids))
    _w("max_graph_depth", str(depth))
    _w("set_graph_function", fn)
    _w("options/sleep-time", "0")
    _w("options/funcgraph-tail", "1")  # closing braces name their function
    _w("current_tracer", "function_graph")
    _w("tracing_on", "1")


def graph_stop() -> dict[str, dict[str, float]]:
    """{function: {"calls": n, "us": total}} at the depth below the entry."""
    _w("tracing_on", "0")
    with open(os.path.join(TRACEFS, "trace")) as f:
        lines = f.read().splitlines()
    _w("current_tracer", "nop")
    _w("set_ftrace_pid", "")
    _w("set_graph_function", "")
    _w("trace", "")
    out: dict[str, dict[str, float]] = {}
    for ln in lines:
        m = _GRAPH.match(ln) or _CLOSE.match(ln)
        if not m or not m["fn"]:
            continue
        level = len(m["ind"]) // 2
        key = f"{'  ' * level}{m['fn']}"
        e = out.setdefault(key, {"calls": 0, "us": 0.0})
        e["calls"] += 1
        e["us"] += float(m["dur"])
    return out
