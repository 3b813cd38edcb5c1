"""dmsnapd killed while the kernel waits for dmsnapd itself (issue 18, the
kill campaign's seed 1003).

A local export's LUN is made by a configfs symlink on tcm_loop whose kernel
side scans the new SCSI disk at once: INQUIRY and the VPD pages go into the
export's own TCMU ring and wait for dmsnapd to answer them. A task of
dmsnapd inside that symlink when dmsnapd is SIGKILLed cannot leave the
kernel, so the process cannot finish dying: it keeps every other export's
ring (and the daemon's lock) until the scan's commands time out (TCMU's
cmd_time_out, then the SCSI error handler's retries: minutes), no new
dmsnapd can take over, and the other exports' initiators get I/O errors.

The test catches dmsnapd while a task (of it or of a child of it) is inside
that symlink waiting for the scan, SIGSTOPs it there (so the scan cannot
finish meanwhile), SIGKILLs it, and asserts what a user would notice.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from scsi_util import MiB, pread_direct, pwrite_direct

from dmsnap.client import Client
from dmsnap.scsi import lio

BLOCK = 4096
REGION = 8 * MiB  # the writer's share of the other export
DIES_WITHIN = 10.0  # seconds from SIGKILL to a gone process
ATTEMPTS = 25


def _needs_lio() -> None:
    if (why := lio.available()) is not None:
        pytest.fail(why)


def _tasks(pid: int) -> list[int]:
    """The threads of ``pid`` and of its children."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            out.append(int(tid))
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                for child in f.read().split():
                    with contextlib.suppress(OSError):
                        out += [int(t) for t in os.listdir(f"/proc/{child}/task")]
    return out


def _stack(tid: int) -> str:
    try:
        with open(f"/proc/{tid}/stack") as f:
            return f.read()
    except OSError:
        return ""


# the configfs call of each change, and what the kernel does in it then
IN_CALL = {"create": "configfs_symlink", "delete": "configfs_unlink"}


def _in_lun_scsi(pid: int, op: str) -> list[tuple[int, str]]:
    """(tid, kernel stack) of the tasks of ``pid`` (or its children) inside a
    LUN's configfs symlink (``create``: scanning the new disk) or unlink
    (``delete``: removing it), waiting on a SCSI command."""
    out = []
    for tid in _tasks(pid):
        st = _stack(tid)
        if IN_CALL[op] in st and "scsi" in st:
            out.append((tid, st))
    return out


class Writer(threading.Thread):
    """O_DIRECT 4 KiB writes round the first REGION of a disk, each block's
    content unique; remembers what each acknowledged write put where."""

    def __init__(self, disk: str) -> None:
        super().__init__(daemon=True)
        self.disk = disk
        self.stop = threading.Event()
        self.acked: dict[int, bytes] = {}
        self.count = 0
        self.errors: list[str] = []
        self.last_ok = time.monotonic()

    def run(self) -> None:
        buf = mmap.mmap(-1, BLOCK)
        fd = os.open(self.disk, os.O_WRONLY | os.O_DIRECT)
        try:
            n = 0
            while not self.stop.is_set():
                off = (n * BLOCK) % REGION
                data = (f"{n:016d}".encode() * (BLOCK // 16))[:BLOCK]
                buf.seek(0)
                buf.write(data)
                try:
                    os.pwritev(fd, [buf], off)
                except OSError as e:
                    self.errors.append(f"write {n} at {off}: {e}")
                    return
                self.acked[off] = data
                self.count += 1
                self.last_ok = time.monotonic()
                n += 1
        finally:
            os.close(fd)

    def verify(self) -> None:
        got = pread_direct(self.disk, 0, REGION)
        bad = [off for off, data in self.acked.items() if got[off : off + BLOCK] != data]
        assert not bad, f"{len(bad)} acknowledged writes do not read back, first at {bad[0]}"


def _wait_gone(pid: int, proc, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return True
        time.sleep(0.05)
    return False


def _unstick(proc) -> None:
    """After a failed check: have the kernel fail whatever waits in the
    rings (reset_ring 2), so a process stuck in the scan can die and the
    cleanup can go on (without it: minutes)."""
    deadline = time.monotonic() + 420
    while proc.poll() is None and time.monotonic() < deadline:
        for path in Path(lio.CONFIGFS, "core").glob("user_*/dmsnap-*/action/reset_ring"):
            with contextlib.suppress(OSError):
                path.write_text("2")
        time.sleep(1)
    proc.wait(timeout=1)


@pytest.fixture
def daemon(tmp_path):
    _needs_lio()
    from test_cli_e2e import Daemon

    d = Daemon(tmp_path)
    d.start()
    try:
        yield d
    finally:
        if d.proc is None or d.proc.poll() is not None:
            d.start()  # a test killed it: bring it back to clean up
        d.cli("pool", "destroy", "p", "--force", "--yes", check=False)
        d.stop(teardown=True)


@pytest.mark.parametrize("op", ["create", "delete"])
def test_daemon_killed_inside_a_local_exports_scan(daemon, op):
    """SIGKILL while the kernel scans a new local export's disk (``create``:
    a task in the LUN's configfs symlink, waiting on INQUIRY in the export's
    ring) or removes it at unexport (``delete``: in the unlink, waiting on
    the SYNCHRONIZE CACHE that sd sends a write-back disk, as a RAM journal's
    LUN is): the process is gone within seconds, a new dmsnapd starts and serves
    well within cmd_time_out, a writer on another export of the same
    daemon sees no I/O error and reads back every acknowledged write, and
    the interrupted export is wholly there (listed, running, one disk
    with its serial, reading and writing) or wholly absent (not listed, no
    backstore, no disk)."""
    d = daemon
    # a RAM journal: its LUN is write-back (WCE), so removing its disk syncs it
    mode = ["--journal-mode", "ram"] if op == "delete" else []
    d.cli("pool", "create", "p", "--size", "256M", *mode)
    d.cli("volume", "create", "p/s", "--size", "16M")
    d.cli("volume", "create", "p/e", "--size", "16M")
    d.cli("export", "p/s", "--local")
    disk_s = os.path.realpath("/dev/dmsnap/p/s")
    assert disk_s.startswith("/dev/sd"), disk_s
    if op == "delete":
        d.cli("export", "p/e", "--local")
    writer = Writer(disk_s)
    writer.start()

    caught: list[tuple[int, str]] = []
    attempts = 0
    while not caught and attempts < ATTEMPTS:
        attempts += 1
        pid = d.proc.pid
        result: list[object] = []

        def change(result=result) -> None:
            args = {"kind": "local"} if op == "create" else {}
            try:
                with Client(d.sock, timeout=600) as c:
                    result.append(c.call(f"export.{op}", pool="p", vol="e", **args))
            except Exception as e:  # the daemon killed under it
                result.append(e)

        th = threading.Thread(target=change, daemon=True)
        th.start()
        while th.is_alive() and not caught:
            if _in_lun_scsi(pid, op):
                os.kill(pid, signal.SIGSTOP)
                caught = _in_lun_scsi(pid, op)  # still there with dmsnapd stopped: it stays
                if not caught:
                    os.kill(pid, signal.SIGCONT)
        if not caught:
            th.join(timeout=120)
            assert result and not isinstance(result[0], Exception), result
            # undo it for the next attempt
            d.cli(*(["unexport", "p/e"] if op == "create" else ["export", "p/e", "--local"]))
    assert caught, f"no task of dmsnapd seen in the LUN's {IN_CALL[op]} in {attempts} attempts"
    assert not writer.errors, writer.errors

    t_kill = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    if not _wait_gone(pid, d.proc, DIES_WITHIN):
        stuck = "\n".join(f"task {tid}:\n{st}" for tid, st in _in_lun_scsi(pid, op))
        _unstick(d.proc)
        pytest.fail(
            f"dmsnapd (pid {pid}) still alive {DIES_WITHIN:.0f} s after SIGKILL in export.{op}, "
            f"inside the LUN's {IN_CALL[op]} (attempt {attempts}):\n{stuck}",
            pytrace=False,
        )
    gone = time.monotonic() - t_kill
    d.start()
    back = time.monotonic() - t_kill
    assert back < lio.CMD_TIME_OUT / 2, f"dmsnapd back only after {back:.1f} s"
    # the writer goes on through the new daemon
    count = writer.count
    deadline = time.monotonic() + 60
    while writer.count < count + 100 and not writer.errors and time.monotonic() < deadline:
        time.sleep(0.1)
    writer.stop.set()
    writer.join(timeout=150)
    assert not writer.is_alive(), "the writer on the other export is stuck"
    assert not writer.errors, f"the other export's writer: {writer.errors}"
    assert writer.count >= count + 100, "the other export's writer did not go on"
    writer.verify()

    # the interrupted export: wholly there or wholly absent
    deadline = time.monotonic() + 90
    while True:
        listed: list[dict] = d.json("export", "list")  # type: ignore[assignment]
        exports = {e["volume"]: e for e in listed if e["pool"] == "p"}
        e = exports.get("e")
        disks = lio.scsi_disks_with_serial(e["serial"]) if e else []
        if e is None or (e["running"] and len(disks) == 1 and os.path.exists("/dev/dmsnap/p/e")):
            break
        assert time.monotonic() < deadline, f"export of p/e half there: {e}, disks {disks}"
        time.sleep(0.5)
    if e is not None:
        disk_e = os.path.realpath("/dev/dmsnap/p/e")
        assert disks[0][1] == disk_e, (disks, disk_e)
        data = os.urandom(BLOCK)
        pwrite_direct(disk_e, 0, data)
        assert pread_direct(disk_e, 0, BLOCK) == data
        state = "exported"
    else:
        # nothing of it in LIO: only p/s's backstore and its one tcm_loop target
        ours = {p.name for p in Path(lio.CONFIGFS, "core").glob("user_*/dmsnap-*")}
        assert ours == {f"dmsnap-{exports['s']['serial']}"}, ours
        targets = list(Path(lio.CONFIGFS, "loopback").glob("naa.*"))
        assert len(targets) == 1, targets
        state = "not exported"
    print(
        f"killed in export.{op}'s {IN_CALL[op]} on attempt {attempts}: gone after "
        f"{gone:.1f} s, back after {back:.1f} s; other export: {writer.count} writes, "
        f"none failed; p/e {state}"
    )
