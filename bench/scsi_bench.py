"""SCSI target benchmarks (issue 5): dmsnap's TCMU backstore against LIO's
kernel iblock backstore on the same dm device. Run in the VM:

    tools/vm --timeout 1200 --memory 3G -- .venv/bin/python bench/scsi_bench.py
    make bench-scsi                        # the same
    ... bench/scsi_bench.py --quick        # smoke (a few minutes)

fio (O_DIRECT, libaio, one job) runs 4 KiB random writes and reads at queue
depth 1 and 32, and 1 MiB sequential writes and reads at QD8, against:

* dmsnap: a journaled (NV) thin pool served by a separate dmsnapd process
  (the way it is deployed: the C ring handler, the journal, the Python
  emulator for everything but READ/WRITE), one volume exported ``--local``
  (tcm_loop, /dev/sdX) and one ``--iscsi`` on 127.0.0.1 with open-iscsi
  logged in (/dev/sdY);
* iblock: LIO's kernel block backstore on each of those volumes' own dm
  device (the private ``jvol`` device under the journal), exported the same
  two ways, created with rtslib-fb (dmsnap.scsi.lio) and removed at the end;
* dmsnap, RAM journal: a pool with ``--journal-mode ram`` (acknowledged once
  in memory: no journal device write before the answer), tcm_loop only; it
  shows what the TCMU path itself costs.

A dmsnap write is acknowledged once its journal record is durable (NV) and
reaches the dm device later (the flusher); iblock writes the dm device and
nothing else. That journal append is the product, so the ratio states it.

Rounds interleave every configuration (the order rotates per round) so host
noise hits all of them; tables show the median over rounds. Before each
measurement the journals are drained (no flusher running behind the next
configuration). Devices: loop devices over files in the guest's /tmp
(tmpfs): the NV journal on a loop device, the pools' embedded (sparse) data
files. Everything made here is removed at the end. Prints Markdown tables;
``--json FILE`` also writes the raw figures. bench/README.md records results
and the command.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ktrace

from dmsnap.client import Client
from dmsnap.dm import DeviceMapper
from dmsnap.dm.udev import Role, role_of
from dmsnap.scsi import lio
from dmsnap.scsi.emulation import Emulator, naa_from_serial
from dmsnap.scsi.tcmu import Command, Reply, TcmuDevice, uio_for
from dmsnap.storage import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DMSNAPD = os.path.join(os.path.dirname(sys.executable), "dmsnapd")
KiB = 1 << 10
MiB = 1 << 20
POOL_NV, POOL_RAM = "sbn", "sbr"  # dmsnap-sb* dm devices are ours (leftovers removed)
PORTAL = ("127.0.0.1", 3260)
IQN = "iqn.2026-11.org.dmsnap.bench:"  # + dmsnap / iblock
IBLOCK = "sbench-"  # iblock backstore names
NULL_BS = "sbench-null-"  # --null: user backstore names
TICK = os.sysconf("SC_CLK_TCK")

# (label, fio rw, block size, queue depth)
CASES = [
    ("4k randwrite QD1", "randwrite", 4 * KiB, 1),
    ("4k randwrite QD32", "randwrite", 4 * KiB, 32),
    ("4k randread QD1", "randread", 4 * KiB, 1),
    ("4k randread QD32", "randread", 4 * KiB, 32),
    ("1M write QD8", "write", MiB, 8),
    ("1M read QD8", "read", MiB, 8),
]


@dataclass
class Config:
    key: str
    title: str
    kind: str  # dmsnap | iblock | null
    fabric: str  # loop | iscsi
    disk: str = ""
    pool: str = ""  # dmsnap: its pool (journal stats)
    ref: str = ""  # dmsnap: its export's POOL/VOL (ring stats)
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------- helpers


def sh(*cmd: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()[-2000:]}")
    return r


def make_loop(path: str, size: int) -> loop.LoopDevice:
    """A loop device over a fully allocated file (the journal overwrites it
    in a ring; its pages exist before anyone measures)."""
    with open(path, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)
    return loop.attach(path, direct_io=False)


def loop_schedulers() -> dict[str, str]:
    """Every attached loop device's I/O scheduler (the pool's data and
    metadata and the journal are loop devices here), for the record."""
    got = {}
    for q in sorted(glob.glob("/sys/block/loop*/queue/scheduler")):
        dev = q.split("/")[3]
        with open(q) as f:
            text = f.read()
        if "[" in text:  # a loop device that is attached
            got[dev] = text.split("[", 1)[1].split("]", 1)[0]
    return got


def cpu_busy() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def context_switches() -> int:
    """The machine's context switches since boot (/proc/stat ctxt)."""
    with open("/proc/stat") as f:
        for ln in f:
            if ln.startswith("ctxt "):
                return int(ln.split()[1])
    return 0


def cpu_each() -> list[tuple[int, int]]:
    """(busy, total) ticks of each CPU."""
    out = []
    with open("/proc/stat") as f:
        for ln in f:
            if ln.startswith("cpu") and ln[3].isdigit():
                v = [int(x) for x in ln.split()[1:]]
                out.append((sum(v) - v[3] - v[4], sum(v)))
    return out


def iscsi_thread_cpus() -> dict[str, str]:
    """The CPUs LIO's iSCSI connection threads may run on (LIO binds each
    connection's receive and transmit threads to one CPU), by thread."""
    out = {}
    for st in glob.glob("/proc/[0-9]*/status"):
        with contextlib.suppress(OSError), open(st) as f:
            txt = f.read()
        name = txt.split("\n", 1)[0].split("\t", 1)[1]
        if name.startswith(("iscsi_trx", "iscsi_ttx")):
            cpus = [
                ln.split("\t")[1] for ln in txt.splitlines() if ln.startswith("Cpus_allowed_list")
            ]
            out[f"{name}/{st.split('/')[2]}"] = cpus[0] if cpus else "?"
    return out


def pin_away(d: Daemon, out: dict[str, Any]) -> None:
    """Experiment (--pin-away): keep dmsnapd's threads off the CPU that LIO
    bound the first iSCSI connection's threads to (dmsnap NV's: it logs in
    first), so they do not compete with its receive, transmit, completion
    work and loopback softirqs. Meant for 2-CPU VMs."""
    assert d.proc is not None
    first = sorted(out["iscsi_threads"].items(), key=lambda kv: int(kv[0].split("/")[1]))[:2]
    used = {int(c) for _, cpus in first for c in cpus.split(",") if c.isdigit()}
    away = set(range(os.cpu_count() or 1)) - used
    if not used or not away:
        print(f"  --pin-away: nothing to do (iSCSI threads on {first})", file=sys.stderr)
        return
    for task in glob.glob(f"/proc/{d.proc.pid}/task/*"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(os.path.basename(task)), away)
    out["pinned"] = {"dmsnapd_cpus": sorted(away), "iscsi_conn_cpus": sorted(used)}
    print(f"  --pin-away: dmsnapd on CPUs {sorted(away)}, off {sorted(used)}", file=sys.stderr)


def workers_sched(how: str, out: dict[str, Any]) -> None:
    """Experiment (--workers-sched): change the scheduling of every
    ``tcmu-worker`` thread (dmsnapd's and the null backstore's): ``nice:N``
    or ``batch`` (SCHED_BATCH: a woken worker does not preempt the running
    task, such as LIO's pinned iSCSI threads)."""
    n = 0
    for comm in glob.glob("/proc/[0-9]*/task/[0-9]*/comm"):
        with contextlib.suppress(OSError), open(comm) as f:
            if not f.read().startswith("tcmu-worker"):
                continue
        tid = int(comm.split("/")[4])
        with contextlib.suppress(OSError):
            if how == "batch":
                os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
            elif how.startswith("nice:"):
                os.setpriority(os.PRIO_PROCESS, tid, int(how[5:]))
            else:
                sys.exit(f"scsi bench: --workers-sched {how!r}: nice:N or batch")
            n += 1
    out["workers_sched"] = {"how": how, "threads": n}
    print(f"  --workers-sched {how}: {n} tcmu-worker threads", file=sys.stderr)


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each thread of ``pid``, by
    ``name/tid`` (the C threads name themselves: tcmu-worker,
    jr-commit, jr-flush; Python's threads carry the process's name)."""
    out: dict[str, float] = {}
    for stat in glob.glob(f"/proc/{pid}/task/*/stat"):
        with contextlib.suppress(OSError), open(stat) as f:
            s = f.read()
        name = s[s.index("(") + 1 : s.rindex(")")]
        rest = s[s.rindex(")") + 2 :].split()
        tid = stat.split("/")[4]
        out[f"{name}/{tid}"] = (int(rest[11]) + int(rest[12])) / TICK
        out[f"{name}:sys/{tid}"] = int(rest[12]) / TICK  # the kernel's part, not in totals
    return out


def all_tasks_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds of every task (threads and kernel threads) by tid, with
    its name: who else burns the CPUs during a measurement."""
    out: dict[int, tuple[str, float]] = {}
    for stat in glob.glob("/proc/[0-9]*/task/*/stat"):
        try:
            with open(stat) as f:
                s = f.read()
        except OSError:
            continue
        name = s[s.index("(") + 1 : s.rindex(")")]
        rest = s[s.rindex(")") + 2 :].split()
        out[int(stat.split("/")[4])] = (name, (int(rest[11]) + int(rest[12])) / TICK)
    return out


def all_tasks_runs() -> dict[int, tuple[str, int]]:
    """How many times each task has been switched in (schedstat's third
    field), with its name: who the context switches per command are."""
    out: dict[int, tuple[str, int]] = {}
    for st in glob.glob("/proc/[0-9]*/task/*/schedstat"):
        try:
            with open(st) as f:
                runs = int(f.read().split()[2])
            with open(st[: -len("schedstat")] + "comm") as f:
                name = f.read().strip()
        except (OSError, IndexError, ValueError):
            continue
        out[int(st.split("/")[4])] = (name, runs)
    return out


def task_kind(name: str) -> str:
    """Kernel workers count together as "kworkers" (a kworker's name shows
    the work item it runs at the moment it is read); digits are dropped
    from other names (ksoftirqd/0 and /1 together)."""
    return "kworkers" if name.startswith("kworker") else name.rstrip("0123456789")


def runs_per_cmd(
    before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]], cmds: float
) -> dict[str, float]:
    """Switches-in per command by kind of task, the eight most."""
    by: dict[str, float] = {}
    for tid, (name, v) in after.items():
        k = task_kind(name)
        by[k] = by.get(k, 0.0) + (v - before.get(tid, (name, 0))[1]) / cmds
    return dict(sorted(by.items(), key=lambda kv: -kv[1])[:8])


def top_tasks(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], wall: float
) -> dict[str, float]:
    """CPUs busy per kind of task, the ten busiest. Kernel workers count
    together as "kworkers" (a kworker's name shows the work item it runs at
    the moment it is read, so per-workqueue figures would be guesses);
    digits are dropped from other names (ksoftirqd/0 and /1 together)."""
    by: dict[str, float] = {}
    for tid, (name, v) in after.items():
        d = v - before.get(tid, (name, 0.0))[1]
        kind = task_kind(name)
        by[kind] = by.get(kind, 0.0) + d / wall
    return dict(sorted(by.items(), key=lambda kv: -kv[1])[:10])


def group_cpu(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds per thread kind over an interval, and the busiest single
    thread's."""
    by: dict[str, float] = {}
    top = 0.0
    for k, v in after.items():
        d = v - before.get(k, 0.0)
        name = k.split("/")[0]
        sys_part = name.endswith(":sys")
        kind = name.removesuffix(":sys")
        kind = kind if kind.startswith(("tcmu-", "jr-")) else "python"
        if sys_part:
            by[kind + ":sys"] = by.get(kind + ":sys", 0.0) + d
            continue
        by[kind] = by.get(kind, 0.0) + d
        top = max(top, d)
    by["total"] = sum(v for k, v in by.items() if not k.endswith(":sys"))
    by["top_thread"] = top
    return by


def queue_info(disk: str) -> dict[str, Any]:
    """What the initiator side sees of a LUN (same for every configuration
    unless the target advertises differently)."""
    name = os.path.basename(disk)
    q = f"/sys/block/{name}/queue"
    out: dict[str, Any] = {"disk": disk}
    for k in ("max_sectors_kb", "max_hw_sectors_kb", "nr_requests", "scheduler", "write_cache"):
        with contextlib.suppress(OSError), open(f"{q}/{k}") as f:
            out[k] = f.read().strip()
    with contextlib.suppress(OSError), open(f"/sys/block/{name}/device/queue_depth") as f:
        out["queue_depth"] = int(f.read())
    return out


# --------------------------------------------------------------------- fio


def fio(
    dev: str, *, rw: str, bs: int, qd: int, size: int, runtime: float, ramp: float
) -> dict[str, Any]:
    cmd = [
        "fio",
        "--name=b",
        f"--filename={dev}",
        f"--rw={rw}",
        f"--bs={bs}",
        "--direct=1",
        "--ioengine=libaio",
        f"--iodepth={qd}",
        "--numjobs=1",
        f"--size={size}",
        "--norandommap",
        "--randrepeat=0",
        "--time_based",
        f"--runtime={runtime:g}",
        f"--ramp_time={ramp:g}",
        "--output-format=json",
    ]
    r = sh(*cmd, timeout=runtime + ramp + 120)
    job = json.loads(r.stdout[r.stdout.index("{") :])["jobs"][0]
    d = job["write" if "write" in rw else "read"]
    pct = d.get("clat_ns", {}).get("percentile", {})
    return {
        "iops": d["iops"],
        "bw": d["bw_bytes"],
        "ios": d["total_ios"],
        "clat_mean_us": d.get("clat_ns", {}).get("mean", 0) / 1000,
        "p50_us": pct.get("50.000000", 0) / 1000,
        "p99_us": pct.get("99.000000", 0) / 1000,
        "p999_us": pct.get("99.900000", 0) / 1000,
        "usr_cpu": job.get("usr_cpu", 0.0),
        "sys_cpu": job.get("sys_cpu", 0.0),
        "cmd": " ".join(cmd[1:]),
    }


def prefill(dev: str, size: int) -> None:
    """Every block written once (thin blocks provisioned, so neither side
    measures first-write allocation, and reads read data)."""
    sh(
        "fio", "--name=fill", f"--filename={dev}", "--rw=write", f"--bs={MiB}", "--direct=1",
        "--ioengine=libaio", "--iodepth=8", f"--size={size}", "--output-format=json",
        timeout=600,
    )  # fmt: skip


# --------------------------------------------------------------------- dmsnapd


class Daemon:
    """dmsnapd as its own process (as deployed), on a private socket."""

    def __init__(self, work: str) -> None:
        self.state = os.path.join(work, "state")
        self.sock = os.path.join(work, "dmsnapd.sock")
        self.log = os.path.join(work, "dmsnapd.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = Client(self.sock)

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=REPO)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [DMSNAPD, "--state-dir", self.state, "--socket", self.sock],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + 180  # a Python start over 9p is slow in the VM
        while True:
            try:
                self.call("daemon.ping")
                return
            except Exception:
                if self.proc.poll() is not None:
                    rc = self.proc.returncode
                    raise RuntimeError(f"dmsnapd exited {rc}: {self.tail()}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"dmsnapd did not come up: {self.tail()}") from None
                self.client.close()
                time.sleep(0.2)

    def tail(self) -> str:
        with contextlib.suppress(OSError), open(self.log) as f:
            return f.read()[-3000:]
        return ""

    def call(self, op: str, **args: Any) -> Any:
        return self.client.call(op, **args)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(Exception):
            self.call("daemon.stop", teardown=True)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.client.close()

    def journal(self, pool: str) -> dict[str, Any]:
        return self.call("pool.show", name=pool)["journal"]

    def ring_stats(self) -> dict[str, dict[str, int]]:
        return {e["ref"]: e.get("stats", {}) for e in self.call("export.list")}

    def drain(self, pools: list[str], timeout: float = 120) -> float:
        """Wait until no journal has unflushed records; seconds waited."""
        t0 = time.monotonic()
        while any(self.journal(p)["lag_bytes"] for p in pools):
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"journals not drained after {timeout:g} s")
            time.sleep(0.05)
        return time.monotonic() - t0


# --------------------------------------------------------------------- open-iscsi


def _iscsid_listening() -> bool:
    with open("/proc/net/unix") as f:
        return "@ISCSIADM_ABSTRACT_NAMESPACE" in f.read()


class OpenIscsi:
    """iscsi_tcp loaded and an iscsid running (started here if none is);
    sessions logged in here are logged out and forgotten by close()."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.sessions: list[str] = []
        sh("modprobe", "iscsi_tcp")
        if not _iscsid_listening():
            # its own session: a foreground iscsid signals its process group on SIGTERM
            self.proc = subprocess.Popen(
                ["iscsid", "-f"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            deadline = time.monotonic() + 30
            while not _iscsid_listening():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("iscsid did not come up")
                time.sleep(0.2)

    def login(self, iqn: str, serial: str) -> str:
        portal = f"{PORTAL[0]}:{PORTAL[1]}"
        sh("iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", portal)
        sh("iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "--login", timeout=60)
        self.sessions.append(iqn)
        disk = lio.scsi_disk_for(serial, timeout=60)
        if disk is None:
            raise RuntimeError(f"no SCSI disk with serial {serial} after the iSCSI login")
        return disk

    def close(self) -> None:
        portal = f"{PORTAL[0]}:{PORTAL[1]}"
        for iqn in reversed(self.sessions):
            sh("iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "--logout", check=False)
            sh("iscsiadm", "-m", "node", "-o", "delete", "-T", iqn, "-p", portal, check=False)
        self.sessions.clear()
        sh(
            "iscsiadm", "-m", "discoverydb", "-t", "sendtargets", "-p", portal, "-o", "delete",
            check=False,
        )  # fmt: skip
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


# --------------------------------------------------------------------- leftovers


def leftovers() -> list[str]:
    """What a run of this bench may leave behind (a killed one, on a native
    host; a fresh VM has none): dm devices, loop devices, LIO objects."""
    out = []
    dms = sh("dmsetup", "ls", check=False).stdout
    out += [ln.split()[0] for ln in dms.splitlines() if ln.startswith("dmsnap-sb")]
    out += [lo.path for lo in loop.attached() if "/sbench-" in lo.backing_file]
    out += glob.glob(f"{lio.CONFIGFS}/core/iblock_*/{IBLOCK}*")
    out += glob.glob(f"{lio.CONFIGFS}/core/user_*/dmsnap-dmsnap*")
    out += glob.glob(f"{lio.CONFIGFS}/core/user_*/{NULL_BS}*")
    out += glob.glob(f"{lio.CONFIGFS}/iscsi/{IQN}*")
    return out


def cleanup_leftovers() -> None:
    for path in glob.glob(f"{lio.CONFIGFS}/core/iblock_*/{IBLOCK}*"):
        hba = int(os.path.basename(os.path.dirname(path)).removeprefix("iblock_"))
        bs = lio.BlockBackstore(os.path.basename(path), hba, "", "")
        lio.remove_fabrics(bs)
        lio.delete_iblock(bs)
    for path in glob.glob(f"{lio.CONFIGFS}/core/user_*/{NULL_BS}*"):
        if (ubs := lio.find_backstore(os.path.basename(path))) is not None:
            lio.remove_fabrics(ubs)
            lio.delete_backstore(ubs)
    dms = sh("dmsetup", "ls", check=False).stdout
    names = [ln.split()[0] for ln in dms.splitlines() if ln.startswith("dmsnap-sb")]
    for n in sorted(names, key=lambda n: "-_" in n):  # volumes first, then pool layers
        sh("dmsetup", "remove", "--retry", n, check=False)
    for lo in loop.attached():
        if "/sbench-" in lo.backing_file:
            with contextlib.suppress(OSError):
                loop.detach(lo)


# --------------------------------------------------------------------- --null


@dataclass
class NullLun:
    """What the emulator needs of a volume, for a LUN with no storage."""

    serial: str
    size: int
    block_size: int = 512
    wce: bool = False
    read_only: bool = False
    naa: bytes = b""

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def write(self, offset: int, data: bytes, *, fua: bool) -> None:
        pass

    def flush(self) -> None:
        pass

    def unmap(self, offset: int, length: int) -> None:
        pass


class NullTarget:
    """A TCMU backstore served from this process by the same C ring handler
    as dmsnapd's, with READ/WRITE answered GOOD at once and no I/O (the
    handler's null_io): what the TCMU path itself costs and allows, the
    ceiling for any backstore built on it. The SPC emulator answers the
    rest, so the kernel attaches it like a dmsnap LUN."""

    def __init__(self, fabric: str, size: int) -> None:
        self.serial = f"sbenchnull{fabric}"
        self.bs = lio.create_backstore(NULL_BS + fabric, f"bench/null-{fabric}", size, self.serial)
        lun = NullLun(self.serial, size, naa=naa_from_serial(self.serial))
        emu = Emulator(lun, None, snapshot_allowed=lambda _initiator: False)

        def handle(cmd: Command) -> Reply:
            r = emu.execute(cmd.cdb, cmd.data_out or None, data_in_len=cmd.data_len)
            return Reply(r.status, r.data, r.sense)

        try:
            uio, msize = uio_for(self.bs.hba, self.bs.name)
            self.dev = TcmuDevice(uio, msize, handle, journal=None, vol=0, size=size, null_io=True)
        except Exception:
            lio.delete_backstore(self.bs)
            raise

    def close(self) -> None:
        lio.remove_fabrics(self.bs)
        self.dev.close()
        lio.delete_backstore(self.bs)


# --------------------------------------------------------------------- the run


def export_kernel(
    bs: lio.Backstore | lio.BlockBackstore,
    fabric: str,
    serial: str,
    name: str,
    iscsi: OpenIscsi | None,
) -> tuple[str, OpenIscsi | None]:
    """Export a backstore made here (not by dmsnapd) through tcm_loop or
    iSCSI (target IQN + name, logged in); its disk, and the initiator."""
    if fabric == "loop":
        lio.export_local(bs)
        disk = lio.scsi_disk_for(serial, timeout=30)
        if disk is None:
            raise RuntimeError(f"no tcm_loop disk for {bs.name}")
        return disk, iscsi
    lio.export_iscsi(bs, IQN + name, PORTAL, [], {}, allow_any=True)  # the bench: demo mode
    iscsi = iscsi or OpenIscsi()
    return iscsi.login(IQN + name, serial), iscsi


def jvol_device(d: Daemon, pool: str, vol: str) -> str:
    """The volume's own dm device under the journal (role jvol)."""
    name = d.call("volume.show", pool=pool, vol=vol)["dm_name"]
    info = DeviceMapper().info(name)
    if role_of(info.uuid) is not Role.JOURNALED:
        raise RuntimeError(f"{name}: uuid {info.uuid} is not a journaled volume's")
    return f"/dev/mapper/{name}"


def cell_log(args: argparse.Namespace, what: str) -> None:
    """One line per measurement cell's start ("-" at its end) for a sampler
    outside the guest (tools/vm-monitor --profile), which reads the file
    through the shared repo: no clock has to agree with the guest's."""
    if args.cell_log:
        with open(args.cell_log, "a") as f:
            f.write(what + "\n")


def measure(
    d: Daemon, cfg: Config, case: tuple[str, str, int, int], args: argparse.Namespace
) -> dict[str, Any]:
    _, rw, bs, qd = case
    pools = [POOL_NV] + ([POOL_RAM] if not args.no_ram else [])
    drained = d.drain(pools)
    assert d.proc is not None
    j0 = d.journal(cfg.pool) if cfg.pool else None
    r0 = d.ring_stats().get(cfg.ref, {}) if cfg.ref else {}
    c0, b0, a0, e0 = thread_cpu(d.proc.pid), cpu_busy(), all_tasks_cpu(), cpu_each()
    if args.trace:
        ktrace.start()
    mm0 = ktrace.mm_switches() if args.mm_armed else None
    cs0, rn0 = context_switches(), all_tasks_runs()
    graph = args.graph and cfg.kind == "dmsnap"
    if graph:
        tids = [int(k.split("/")[1]) for k in c0 if k.startswith("tcmu-worker/")]
        ktrace.graph_start(tids, 5 if args.graph_fn else 2, args.graph_fn)
    cell_log(args, f"{cfg.title} | {case[0]}")
    t0 = time.monotonic()
    res = fio(
        cfg.disk, rw=rw, bs=bs, qd=qd, size=args.volume_mib * MiB, runtime=args.seconds,
        ramp=args.ramp,
    )  # fmt: skip
    wall = time.monotonic() - t0
    cs1, rn1 = context_switches(), all_tasks_runs()
    cell_log(args, "-")
    # over the ramp too: per command of the whole fio run
    ramped = max(1.0, res["ios"] * (args.seconds + args.ramp) / args.seconds)
    res["ctxt_per_cmd"] = (cs1 - cs0) / ramped
    res["runs_per_cmd"] = runs_per_cmd(rn0, rn1, ramped)
    if mm0 is not None:
        res["mm_switches_per_cmd"] = (ktrace.mm_switches() - mm0) / ramped
    if args.trace:
        res["trace"] = ktrace.stop(cfg.disk)
    if graph:
        res["graph"] = ktrace.graph_stop()
    c1, b1, a1, e1 = thread_cpu(d.proc.pid), cpu_busy(), all_tasks_cpu(), cpu_each()
    res["cpu_each_busy"] = [
        (x[0] - y[0]) / max(1, x[1] - y[1]) for x, y in zip(e1, e0, strict=True)
    ]
    res["drain_s"] = drained
    res["tasks"] = top_tasks(a0, a1, wall)
    res["system_busy"] = (b1[0] - b0[0]) / max(1, b1[1] - b0[1])
    # all CPUs' busy time per command: what the whole stack (fio, initiator,
    # fabric, target, dm) spends on one, comparable across configurations
    res["machine_us_per_cmd"] = res["system_busy"] * len(e0) * wall / ramped * 1e6
    cpu = group_cpu(c0, c1)
    res["dmsnapd_cpu"] = {k: v / wall for k, v in cpu.items()}  # CPUs busy, by thread kind
    if cfg.ref:
        r1 = d.ring_stats().get(cfg.ref, {})
        keys = ("fetched", "slow", "busy", "errors", "kicks")
        rs = {k: r1.get(k, 0) - r0.get(k, 0) for k in keys}
        res["ring"] = rs
        res["dmsnapd_us_per_cmd"] = cpu["total"] / max(1, rs["fetched"]) * 1e6
    if j0 is not None:
        j1 = d.journal(cfg.pool)
        dj = {k: j1[k] - j0[k] for k in ("appends", "commits", "full_waits", "dm_writes")}
        dj["appends_per_commit"] = dj["appends"] / dj["commits"] if dj["commits"] else 0.0
        res["journal"] = dj
    return res


def run(work: str, args: argparse.Namespace, out: dict[str, Any]) -> None:
    vsize = args.volume_mib * MiB
    jdev = make_loop(os.path.join(work, "sbench-journal.img"), args.journal_mib * MiB)
    d = Daemon(work)
    iscsi: OpenIscsi | None = None
    iblocks: list[lio.BlockBackstore] = []
    nulls: list[NullTarget] = []
    try:
        d.start()
        print("  dmsnapd up", file=sys.stderr, flush=True)
        pools = [POOL_NV] + ([] if args.no_ram else [POOL_RAM])
        nvols = 2 if args.no_ram else 4
        d.call(
            "pool.create", name=POOL_NV, size=2 * vsize + 256 * MiB, journal=jdev.path,
            journal_mode="nv",
        )  # fmt: skip
        if not args.no_ram:
            d.call(
                "pool.create", name=POOL_RAM, size=2 * vsize + 256 * MiB,
                journal_size=args.journal_mib * MiB, journal_mode="ram",
            )  # fmt: skip
        for pool, vol in [(POOL_NV, "l"), (POOL_NV, "i"), (POOL_RAM, "l"), (POOL_RAM, "i")][:nvols]:
            d.call("volume.create", pool=pool, vol=vol, size=vsize)
        cfgs = [
            Config("dmsnap-loop", "dmsnap NV, tcm_loop", "dmsnap", "loop", pool=POOL_NV,
                   ref=f"{POOL_NV}/l"),
            Config("iblock-loop", "iblock, tcm_loop", "iblock", "loop"),
            Config("dmsnap-iscsi", "dmsnap NV, iSCSI", "dmsnap", "iscsi", pool=POOL_NV,
                   ref=f"{POOL_NV}/i"),
            Config("iblock-iscsi", "iblock, iSCSI", "iblock", "iscsi"),
        ]  # fmt: skip
        if not args.no_ram:
            cfgs += [
                Config("dmsnap-ram-loop", "dmsnap RAM, tcm_loop", "dmsnap", "loop",
                       pool=POOL_RAM, ref=f"{POOL_RAM}/l"),
                Config("dmsnap-ram-iscsi", "dmsnap RAM, iSCSI", "dmsnap", "iscsi",
                       pool=POOL_RAM, ref=f"{POOL_RAM}/i"),
            ]  # fmt: skip
        if args.null:
            cfgs += [
                Config("null-loop", "TCMU null, tcm_loop", "null", "loop"),
                Config("null-iscsi", "TCMU null, iSCSI", "null", "iscsi"),
            ]
        by = {c.key: c for c in cfgs}

        # dmsnap exports, through the daemon
        for c in cfgs:
            if c.kind != "dmsnap":
                continue
            pool, vol = c.ref.split("/")
            if c.fabric == "loop":
                ex = d.call("export.create", pool=pool, vol=vol, kind="local")
                c.disk = os.path.realpath(f"/dev/dmsnap/{pool}/{vol}")
                if not c.disk.startswith("/dev/sd"):
                    raise RuntimeError(f"{c.ref}: no local disk ({c.disk})")
            else:
                iqn = IQN + ("dmsnap" if pool == POOL_NV else "dmsnapram")
                ex = d.call(
                    "export.create", pool=pool, vol=vol, kind="iscsi", iqn=iqn, allow_any=True,
                    portal=f"{PORTAL[0]}:{PORTAL[1]}",
                )  # fmt: skip
                iscsi = iscsi or OpenIscsi()
                c.disk = iscsi.login(iqn, ex["serial"])
            c.info["serial"] = ex["serial"]
        # iblock on the same dm devices: one per volume (LIO holds it O_EXCL)
        for c, vol in ((by["iblock-loop"], "l"), (by["iblock-iscsi"], "i")):
            dev = jvol_device(d, POOL_NV, vol)
            serial = f"sbenchiblk{vol}"
            bs = lio.create_iblock(f"{IBLOCK}{vol}", dev, serial)
            iblocks.append(bs)
            c.disk, iscsi = export_kernel(bs, c.fabric, serial, "iblock", iscsi)
            c.info.update(dm_device=dev, serial=serial)
        for c in cfgs:
            if c.kind != "null":
                continue
            nt = NullTarget(c.fabric, vsize)
            nulls.append(nt)
            c.disk, iscsi = export_kernel(nt.bs, c.fabric, nt.serial, "null", iscsi)
            c.info["serial"] = nt.serial
        for c in cfgs:
            c.info.update(queue_info(c.disk))
        out["configs"] = {c.key: {"title": c.title, **c.info} for c in cfgs}
        nv = d.call("pool.show", name=POOL_NV)["journal"]
        out["journal_nv"] = {"path": jdev.path, "capacity": nv["capacity"],
                             "direct_io": nv["direct_io"]}  # fmt: skip
        print("  exports up: " + ", ".join(f"{c.key} {c.disk}" for c in cfgs), file=sys.stderr)
        out["iscsi_threads"] = iscsi_thread_cpus()
        if args.pin_away:
            pin_away(d, out)
        if args.workers_sched:
            workers_sched(args.workers_sched, out)
        out["loop_schedulers"] = loop_schedulers()

        t0 = time.monotonic()
        for c in cfgs:
            if c.kind == "dmsnap":
                prefill(c.disk, vsize)
        d.drain(pools)
        out["prefill_s"] = time.monotonic() - t0

        res: dict[str, dict[str, list[dict[str, Any]]]] = {c.key: {} for c in cfgs}
        out["results"] = res
        # kernel code is patched here and at the end only (ktrace.arm)
        args.mm_armed = ktrace.mm_switches_arm()
        if args.trace:
            ktrace.arm()
        for rnd in range(args.rounds):
            order = cfgs[rnd % len(cfgs) :] + cfgs[: rnd % len(cfgs)]
            for case in CASES:
                for c in order:
                    res[c.key].setdefault(case[0], []).append(measure(d, c, case, args))
            print(f"  round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        out["daemon_log_tail"] = d.tail()[-1500:]
    finally:
        if getattr(args, "mm_armed", False):
            ktrace.mm_switches_disarm()
        if args.trace:
            with contextlib.suppress(OSError):
                ktrace.disarm()
        if iscsi is not None:
            iscsi.close()
        for bs in iblocks:
            lio.remove_fabrics(bs)
            lio.delete_iblock(bs)
        for nt in nulls:
            nt.close()
        if d.proc is not None and d.proc.poll() is None:
            for p in (POOL_NV, POOL_RAM):
                with contextlib.suppress(Exception):
                    d.call("pool.destroy", name=p, force=True)
        d.stop()
        with contextlib.suppress(OSError):
            loop.detach(jdev)


# --------------------------------------------------------------------- report


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def dig(x: dict[str, Any], path: str) -> float:
    """x["a"]["b"] for "a.b"; 0 where missing."""
    for k in path.split("."):
        x = x.get(k, 0.0) if isinstance(x, dict) else 0.0
    return float(x)  # type: ignore[arg-type]


def unit(x: dict[str, Any], bs: int) -> str:
    return f"{x['bw'] / MiB:.0f} MiB/s" if bs >= MiB else f"{x['iops']:.0f}"


def print_trace(res: dict[str, Any], cfgs: dict[str, Any]) -> None:
    kinds = ("tcmu-worker", "kworker", "iscsi_trx", "iscsi_ttx", "fio")
    print(
        "\nWhere the latency goes (--trace; medians over the rounds of each run's p50, µs): "
        "backend residency is LIO's sequencer start to the backstore's completion; "
        "wake-up is a thread's sched_wakeup to running\n"
    )
    print("| configuration | case | fio clat p50 | to target p50 | backend residency p50 / p90 "
          "| from target p50 (to the initiator's SCSI done / then to block done) | "
          + " | ".join(f"wake-up {k}" for k in kinds) + " |")  # fmt: skip
    print("|---|---|---|---|---|---|" + "---|" * len(kinds))
    for key, c in cfgs.items():
        for label, xs in res[key].items():
            ts = [x["trace"] for x in xs if "trace" in x]
            if not ts:
                continue

            def m(f: Any, ts: list[dict[str, Any]] = ts) -> float:
                return med([f(t) for t in ts])

            wk = [f"{m(lambda t, k=k: t['wakeup'].get(k, {}).get('p50_us', 0)):.0f}" for k in kinds]
            print(
                f"| {c['title']} | {label} | {med([x['p50_us'] for x in xs]):.0f} | "
                f"{m(lambda t: t.get('to_target', {}).get('p50_us', 0)):.0f} | "
                f"{m(lambda t: t['residency']['p50_us']):.0f} / "
                f"{m(lambda t: t['residency']['p90_us']):.0f} | "
                f"{m(lambda t: t.get('from_target', {}).get('p50_us', 0)):.0f} "
                f"({m(lambda t: t.get('to_initiator', {}).get('p50_us', 0)):.0f} / "
                f"{m(lambda t: t.get('in_initiator', {}).get('p50_us', 0)):.0f}) | "
                + " | ".join(wk)
                + " |"
            )
    print("\nWork items, queued to running (p50 / p90 µs, count), the busiest functions:\n")
    for key, c in cfgs.items():
        for label, xs in res[key].items():
            ts = [x["trace"] for x in xs if "trace" in x and x["trace"].get("work")]
            if not ts:
                continue
            t = ts[0]  # the first round's: functions differ between rounds
            items = ", ".join(
                f"{fn} {w['p50_us']:.0f} / {w['p90_us']:.0f} ({w['n']})"
                for fn, w in t["work"].items()
            )
            print(f"* {c['title']}, {label}: {items}")
    print("\nWhat ran on iscsi_ttx's CPU while it waited to run (µs per wake-up, first round):\n")
    for key, c in cfgs.items():
        for label, xs in res[key].items():
            ts = [x["trace"] for x in xs if x.get("trace", {}).get("ttx_blocked_by")]
            if ts:
                by = ", ".join(f"{k} {v:.0f}" for k, v in ts[0]["ttx_blocked_by"].items())
                print(f"* {c['title']}, {label}: {by}")
    print("\nLock contentions (lock:contention_begin) per thread kind, per command:\n")
    for key, c in cfgs.items():
        for label, xs in res[key].items():
            tr = [(x["trace"], x["ios"]) for x in xs if "trace" in x]
            if not tr or not any(t.get("lock_contentions") for t, _ in tr):
                continue
            t, ios = tr[0]
            per = ", ".join(
                f"{k} {n / max(1, ios):.2f}"
                for k, n in sorted(t["lock_contentions"].items(), key=lambda kv: -kv[1])
            )
            print(f"* {c['title']}, {label}: {per}")


def print_graph(res: dict[str, Any], cfgs: dict[str, Any]) -> None:
    print(
        "\nThe workers' kernel time per command (--graph: function_graph on the tcmu-worker "
        "threads, sleeping excluded; µs per command over the rounds, calls per command; "
        "[n]: call depth below the traced entry)\n"
    )
    for key, c in cfgs.items():
        for label, xs in res[key].items():
            gs = [x for x in xs if "graph" in x]
            if not gs:
                continue
            cmds = sum(x.get("ring", {}).get("fetched", 0) for x in gs) or 1
            tot: dict[str, list[float]] = {}
            for x in gs:
                for fn, e in x["graph"].items():
                    t = tot.setdefault(fn, [0.0, 0.0])
                    t[0] += e["calls"]
                    t[1] += e["us"]
            top = sorted(tot.items(), key=lambda kv: -kv[1][1])[:24]
            body = ", ".join(
                f"{fn.strip()}[{(len(fn) - len(fn.lstrip())) // 2}] "
                f"{us / cmds:.0f} µs ({calls / cmds:.1f}x)"
                for fn, (calls, us) in top
            )
            print(f"* {c['title']}, {label}: {body}")


def per_cpu(xs: list[dict[str, Any]]) -> str:
    each = [x["cpu_each_busy"] for x in xs if x.get("cpu_each_busy")]
    if not each:
        return "-"
    return " / ".join(f"{med([e[i] for e in each]) * 100:.0f}" for i in range(len(each[0])))


def ksh(xs: list[dict[str, Any]]) -> str:
    """The share of the workers' CPU spent in the kernel (system calls:
    the dm device's I/O, LIO's completion on the kick, the UIO device)."""
    w = sum(dig(x, "dmsnapd_cpu.tcmu-worker") for x in xs)
    k = sum(dig(x, "dmsnapd_cpu.tcmu-worker:sys") for x in xs)
    return f"{k / w * 100:.0f}%" if w else "-"


def task_table(
    res: dict[str, Any], cfgs: dict[str, Any], key: str, labels: tuple[str, ...], heading: str
) -> None:
    """One row per configuration and case: the six largest of a per-task
    figure (measure()'s ``key``, by kind of task), averaged over the rounds."""
    print(f"\n{heading}:\n")
    print("| configuration | case | tasks |")
    print("|---|---|---|")
    for k, c in cfgs.items():
        for label in labels:
            xs = res[k].get(label, [])
            tot: dict[str, float] = {}
            for x in xs:
                for kind, v in x.get(key, {}).items():
                    tot[kind] = tot.get(kind, 0.0) + v / len(xs)
            top = sorted(tot.items(), key=lambda kv: -kv[1])[:6]
            if top:
                print(
                    f"| {c['title']} | {label} | "
                    + ", ".join(f"{n} {v:.2f}" for n, v in top)
                    + " |"
                )


def report(out: dict[str, Any], args: argparse.Namespace) -> None:
    res, cfgs = out["results"], out["configs"]
    jn = out["journal_nv"]
    print(
        f"\n## dmsnap (TCMU, dmsnapd) vs LIO iblock on the same dm device: "
        f"{out['rounds']} rounds of {args.seconds:g} s (+{args.ramp:g} s ramp) per cell, "
        f"volumes of {args.volume_mib} MiB; NV journal on {jn['path']} "
        f"({jn['capacity'] // MiB} MiB, O_DIRECT {jn['direct_io']})\n"
    )

    def cell(key: str, label: str, bs: int) -> str:
        xs = res.get(key, {}).get(label, [])
        return unit({"iops": med([x["iops"] for x in xs]), "bw": med([x["bw"] for x in xs])}, bs)

    def ratio(a: str, b: str, label: str) -> tuple[float, float, float]:
        """Median and range of the per-round ratio a/b."""
        xa, xb = res[a].get(label, []), res[b].get(label, [])
        rs = [x["iops"] / y["iops"] for x, y in zip(xa, xb, strict=True) if y["iops"]]
        return (med(rs), min(rs), max(rs)) if rs else (0.0, 0.0, 0.0)

    def rtext(a: str, b: str, label: str) -> str:
        m, lo, hi = ratio(a, b, label)
        return f"**{m:.2f}x** ({lo:.2f}-{hi:.2f})"

    ram, null = "dmsnap-ram-loop" in res, "null-loop" in res
    hdr = (
        "| case | dmsnap NV tcm_loop | iblock tcm_loop | ratio | dmsnap NV iSCSI | iblock iSCSI "
        "| ratio |"
        + (" dmsnap RAM tcm_loop | ratio | dmsnap RAM iSCSI | ratio |" if ram else "")
        + (" TCMU null tcm_loop | ratio | TCMU null iSCSI | ratio |" if null else "")
    )
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for label, _, bs, _ in CASES:
        row = [
            cell("dmsnap-loop", label, bs),
            cell("iblock-loop", label, bs),
            rtext("dmsnap-loop", "iblock-loop", label),
            cell("dmsnap-iscsi", label, bs),
            cell("iblock-iscsi", label, bs),
            rtext("dmsnap-iscsi", "iblock-iscsi", label),
        ]
        for on, key in ((ram, "dmsnap-ram"), (null, "null")):
            for fab in ("loop", "iscsi") if on else ():
                row.append(cell(f"{key}-{fab}", label, bs))
                row.append(rtext(f"{key}-{fab}", f"iblock-{fab}", label))
        print(f"| {label} | " + " | ".join(row) + " |")
    print(
        "\n4 KiB cells in IOPS, 1 MiB cells in MiB/s; medians over the rounds. Ratio: dmsnap / "
        "iblock of the same round, median and range over the rounds. A dmsnap NV write is "
        "acknowledged once its journal record is durable on the journal device (and is "
        "written to the dm device later by the flusher); iblock writes the dm device only."
        + (
            " TCMU null: the same ring handler answering READ/WRITE with no I/O at all, "
            "the ceiling of any TCMU backstore on this machine."
            if null
            else ""
        )
    )
    print(
        "\n| configuration | case | clat p50 / p99 µs | system CPU busy (each CPU) "
        "| machine CPU µs per command | context switches per command "
        "| address-space switches per command | dmsnapd CPUs "
        "(workers / commit / flush / python) | dmsnapd µs CPU per command "
        "| workers' CPU in the kernel "
        "| busiest thread | appends per commit | full waits | BUSY | kicks per command |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, c in cfgs.items():
        for label, *_ in CASES:
            xs = res[key].get(label, [])
            if not xs:
                continue

            def m(path: str, xs: list[dict[str, Any]] = xs) -> float:
                return med([dig(x, path) for x in xs])

            line = (
                f"| {c['title']} | {label} | {m('p50_us'):.0f} / {m('p99_us'):.0f} | "
                f"{m('system_busy') * 100:.0f}% ({per_cpu(xs)}) | "
                f"{m('machine_us_per_cmd'):.0f} | {m('ctxt_per_cmd'):.1f} | "
                f"{m('mm_switches_per_cmd'):.2f} | "
            )
            if c["title"].startswith("dmsnap"):
                line += (
                    f"{m('dmsnapd_cpu.total'):.2f} ("
                    f"{m('dmsnapd_cpu.tcmu-worker'):.2f} / {m('dmsnapd_cpu.jr-commit'):.2f} / "
                    f"{m('dmsnapd_cpu.jr-flush'):.2f} / {m('dmsnapd_cpu.python'):.2f}) | "
                    f"{m('dmsnapd_us_per_cmd'):.0f} | "
                    f"{ksh(xs)} | {m('dmsnapd_cpu.top_thread') * 100:.0f}% | "
                )
                j = [x.get("journal") for x in xs if x.get("journal")]
                line += (
                    f"{med([y['appends_per_commit'] for y in j]):.1f} | "
                    f"{sum(y['full_waits'] for y in j)} | "
                    if j and "write" in label
                    else "- | - | "
                )
                line += f"{sum(x.get('ring', {}).get('busy', 0) for x in xs)} | "
                kicks = sum(x.get("ring", {}).get("kicks", 0) for x in xs)
                cmds = sum(x.get("ring", {}).get("fetched", 0) for x in xs)
                line += f"{kicks / max(1, cmds):.2f} |"
            else:
                line += "- | - | - | - | - | - | - | - |"
            print(line)
    task_table(
        res, cfgs, "tasks", ("4k randwrite QD32", "4k randread QD32", "1M write QD8"),
        "Where the CPUs go (CPUs busy per task, mean over the rounds, the six busiest)",
    )  # fmt: skip
    task_table(
        res, cfgs, "runs_per_cmd", ("4k randwrite QD32", "4k randread QD32"),
        "Who is switched in (times per command, mean over the rounds, the six most)",
    )  # fmt: skip
    if any("trace" in x for r in res.values() for xs in r.values() for x in xs):
        print_trace(res, cfgs)
    if any("graph" in x for r in res.values() for xs in r.values() for x in xs):
        print_graph(res, cfgs)
    print("\nLUNs as the initiator sees them:\n")
    print("| configuration | disk | max_sectors_kb | queue_depth | nr_requests | scheduler "
          "| write_cache |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for c in cfgs.values():
        print(
            f"| {c['title']} | {c['disk']} | {c.get('max_sectors_kb')} | {c.get('queue_depth')} "
            f"| {c.get('nr_requests')} | {c.get('scheduler')} | {c.get('write_cache')} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs (smoke)")
    ap.add_argument("--seconds", type=float, help="fio runtime per cell (default 3; --quick 1)")
    ap.add_argument("--ramp", type=float, help="fio ramp time (default 0.5; --quick 0.3)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick 1)")
    ap.add_argument("--volume-mib", type=int, help="volume size (default 128; --quick 64)")
    ap.add_argument("--journal-mib", type=int, default=128, help="NV journal device / RAM journal")
    ap.add_argument("--no-ram", action="store_true", help="skip the RAM-journal column")
    ap.add_argument("--workdir", default=None, help="where the backing files go (/tmp)")
    ap.add_argument("--json", help="also write the raw figures here")
    ap.add_argument(
        "--pin-away", action="store_true",
        help="experiment: dmsnapd off the CPU LIO bound dmsnap NV's iSCSI connection to",
    )  # fmt: skip
    ap.add_argument(
        "--workers-sched", default="", metavar="nice:N|batch",
        help="experiment: scheduling of the tcmu-worker threads",
    )  # fmt: skip
    ap.add_argument(
        "--graph", action="store_true",
        help="the workers' kernel time per system call (function_graph); costs CPU",
    )  # fmt: skip
    ap.add_argument(
        "--graph-fn", default="", metavar="FUNCTION",
        help="with --graph: only inside this kernel function, 5 calls deep",
    )  # fmt: skip
    ap.add_argument(
        "--trace", action="store_true",
        help="split latency with kernel tracepoints (backend residency, wake-ups); costs CPU",
    )  # fmt: skip
    ap.add_argument(
        "--null", action="store_true",
        help="also a TCMU backstore that answers READ/WRITE with no I/O (TCMU's own ceiling)",
    )  # fmt: skip
    ap.add_argument(
        "--cell-log", metavar="FILE",
        help="append each cell's name as it starts (for tools/vm-monitor --profile)",
    )  # fmt: skip
    ap.add_argument(
        "--cases", default="",
        help="only the cases whose label contains this (e.g. QD32; default: all)",
    )  # fmt: skip
    args = ap.parse_args()
    CASES[:] = [c for c in CASES if args.cases.lower() in c[0].lower()]
    if not CASES:
        sys.exit(f"scsi bench: no case matches --cases {args.cases!r}")
    if args.seconds is None:
        args.seconds = 1.0 if args.quick else 3.0
    if args.ramp is None:
        args.ramp = 0.3 if args.quick else 0.5
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.volume_mib is None:
        args.volume_mib = 64 if args.quick else 128
    if (why := lio.available()) is not None:
        sys.exit(f"scsi bench: {why}")
    if (args.trace or args.graph) and (why := ktrace.available()) is not None:
        sys.exit(f"scsi bench: --trace: {why}")
    for tool in ("fio", "iscsiadm", "iscsid"):
        if shutil.which(tool) is None:
            sys.exit(f"scsi bench: {tool} is not installed (tools/setup installs it)")

    started = time.perf_counter()
    cleanup_leftovers()
    work = tempfile.mkdtemp(prefix="sbench-", dir=args.workdir)
    out: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "argv": sys.argv[1:],
        "rounds": args.rounds,
        "seconds": args.seconds,
        "ramp": args.ramp,
        "volume_mib": args.volume_mib,
        "journal_mib": args.journal_mib,
        "cases": CASES,
    }
    print(
        f"# scsi bench {out['date']}, kernel {out['kernel']}, {out['cpus']} CPUs, "
        f"args {' '.join(sys.argv[1:]) or '(defaults)'}",
        flush=True,
    )
    try:
        run(work, args, out)
        if args.json:  # before printing: a report bug must not lose a run
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        report(out, args)
    finally:
        cleanup_leftovers()
        left = leftovers()
        shutil.rmtree(work, ignore_errors=True)
        print(
            f"\ncleanup: {'left ' + ', '.join(left) if left else 'no dm, loop or LIO objects left'}"
            f"; total {time.perf_counter() - started:.0f} s"
        )


if __name__ == "__main__":
    main()
