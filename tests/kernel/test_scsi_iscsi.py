"""Volumes over SCSI with real initiators, on the real kernel: ``fio --verify``
through an open-iscsi session and through the local (tcm_loop) disk; an ext4
file system under load snapshotted in-band, its snapshot clean after journal
recovery and holding every file committed before the command; and a dmsnapd
process stopped, or killed, under I/O: the initiator sees retries, never an
error, and the data is intact.

libiscsi's conformance suite (every family, against dmsnap and against
LIO's iblock) is tests/kernel/test_libiscsi.py. libiscsi 1.19 has no
SYNCHRONIZE CACHE suite: ``sg_sync`` and ``sg_sync --16`` through the iSCSI
session stand in.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
from scsi_util import (
    MiB,
    assert_fio_verified,
    fio,
    fio_verify_args,
    iscsi_sessions_as,
    kernel_log,
    manager,
    needs_lio,
    open_iscsi,
    pread_direct,
    pwrite_direct,
    run,
)

from dmsnap import cli
from dmsnap.scsi import lio
from dmsnap.storage.manager import Manager

IQN = "iqn.2026-11.org.dmsnap.test:iscsi"
PORTAL = "127.0.0.1:3260"
OPEN_ISCSI = "iqn.2026-11.org.dmsnap.test:open-iscsi"
ISCSI_VOL = 32 * MiB


@pytest.fixture(scope="module")
def iscsi_export(module_tmp):
    """A journaled volume exported over iSCSI on 127.0.0.1 to open-iscsi's
    initiator name (an ACL: an export is closed by default)."""
    needs_lio()
    with manager(module_tmp / "state") as m:
        # its own pool name: the module's pool lives beside the tests' own
        m.pool_create("isc", size=256 * MiB, journal_size=16 * MiB)
        m.volume_create("isc", "v", ISCSI_VOL)
        allow = [OPEN_ISCSI]
        ex = m.export_create("isc", "v", kind="iscsi", iqn=IQN, portal=PORTAL, allow=allow)
        assert ex["iqn"] == IQN and ex["portal"] == PORTAL and ex["allow"] == allow
        yield m, ex


@pytest.fixture
def local_export(tmp_path):
    """Factory: a journaled volume of ``size`` exported through tcm_loop;
    returns (manager, /dev/sdX)."""
    needs_lio()
    with manager(tmp_path / "state") as m:

        def make(size: int) -> tuple[Manager, str]:
            m.pool_create("s", size=256 * MiB, journal_size=16 * MiB)
            m.volume_create("s", "v", size)
            m.export_create("s", "v", kind="local")
            disk = os.path.realpath("/dev/dmsnap/s/v")
            assert disk.startswith("/dev/sd"), disk
            return m, disk

        yield make


# -- 2. fio --verify ------------------------------------------------------------------


def test_fio_verify_through_iscsi(iscsi_export):
    """open-iscsi logs in on 127.0.0.1; fio's random writes from four jobs
    (16 in flight each) then a sequential 1 MiB job all read back equal;
    SYNCHRONIZE CACHE 10 and 16 (no libiscsi suite for them) answer GOOD."""
    m, ex = iscsi_export
    with open_iscsi(), iscsi_sessions_as(IQN, PORTAL, ex["serial"], [OPEN_ISCSI]) as disks:
        disk = disks[OPEN_ISCSI]
        assert "DMSNAP" in run("sg_inq", disk).stdout
        with open(f"/sys/block/{os.path.basename(disk)}/size") as f:
            assert int(f.read()) * 512 == ISCSI_VOL
        r = fio(*fio_verify_args(disk, region=ISCSI_VOL * 3 // 4))
        assert_fio_verified(r)
        seq = fio(
            f"--filename={disk}", "--direct=1", "--ioengine=libaio", "--verify=crc32c",
            "--verify_fatal=1", "--name=seq", "--rw=write", "--bs=1M", "--iodepth=4",
            f"--offset={ISCSI_VOL * 3 // 4}", f"--size={ISCSI_VOL // 4}",
        )  # fmt: skip
        assert_fio_verified(seq)
        run("sg_sync", disk)
        run("sg_sync", "--16", disk)
        print(
            f"iSCSI fio: {r.written // MiB} MiB random in {r.seconds:.1f} s, "
            f"{seq.written // MiB} MiB sequential in {seq.seconds:.1f} s (both verified)"
        )
    st = m.export_list("isc")[0]["stats"]
    assert st["fast_writes"] > 0 and st["errors"] == 0, st


def test_fio_verify_through_local_lun(local_export):
    _, disk = local_export(64 * MiB)
    r = fio(*fio_verify_args(disk, region=48 * MiB))
    assert_fio_verified(r)
    seq = fio(
        f"--filename={disk}", "--direct=1", "--ioengine=libaio", "--verify=crc32c",
        "--verify_fatal=1", "--name=seq", "--rw=write", "--bs=1M", "--iodepth=8",
        f"--offset={48 * MiB}", f"--size={16 * MiB}",
    )  # fmt: skip
    assert_fio_verified(seq)
    print(
        f"local fio: {r.written // MiB} MiB random in {r.seconds:.1f} s, "
        f"{seq.written // MiB} MiB sequential in {seq.seconds:.1f} s (both verified)"
    )


# -- 3. a file system under load, snapshotted in-band ---------------------------------


class FsWriters:
    """Threads writing files on a mounted file system. Each file is written
    once: content, fsync, rename into place, fsync of the directory; then it
    is recorded as committed (its name and digest), so a snapshot requested
    after that must hold it. Around them: unsynced appends and deletes."""

    def __init__(self, root: Path, n: int = 3) -> None:
        self.root, self.stop = root, threading.Event()
        self.committed: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]

    def _run(self, i: int) -> None:
        rng = random.Random(i)
        d = self.root / f"w{i}"
        try:
            d.mkdir()
            dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                k = 0
                while not self.stop.is_set():
                    data = rng.randbytes(rng.choice([4096, 20000, 65536, 200000]))
                    tmp, final = d / f".f{k}.tmp", d / f"f{k}"
                    with open(tmp, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.rename(tmp, final)
                    os.fsync(dfd)
                    with self.lock:
                        self.committed.append((f"/w{i}/f{k}", hashlib.sha256(data).hexdigest()))
                    with open(d / "log", "ab") as f:  # never synced
                        f.write(rng.randbytes(8192))
                    if k % 5 == 4:
                        scratch = d / f"s{k}"
                        scratch.write_bytes(rng.randbytes(30000))
                        scratch.unlink()
                    k += 1
            finally:
                os.close(dfd)
        except BaseException as e:
            self.errors.append(e)

    def __enter__(self) -> FsWriters:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)

    def count(self) -> int:
        with self.lock:
            return len(self.committed)


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.run(list(args))
    return rc, out.getvalue(), err.getvalue()


def test_filesystem_under_load_snapshotted_inband(local_export, tmp_path):
    """ext4 on the local LUN, written by three threads; `dmsnap initiator
    snapshot DEV fs1 --wait` while they write; the snapshot, copied to a
    scratch file, needs at most a journal replay (e2fsck -fy: 0 or 1), is then
    clean (e2fsck -fn: 0), and holds every file committed before the command
    with its content."""
    m, disk = local_export(64 * MiB)
    run("mkfs.ext4", "-q", "-F", "-b", "4096", disk, timeout=170)  # discards (UNMAP) the LUN
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", "-t", "ext4", disk, str(mnt))
    try:
        with FsWriters(mnt) as w:
            deadline = time.monotonic() + 60
            while w.count() < 20 and not w.errors:
                assert time.monotonic() < deadline, "the writers made no progress"
                time.sleep(0.1)
            before = w.count()  # all of these were durable before the command was sent
            t0 = time.monotonic()
            rc, out, err = _cli("initiator", "snapshot", disk, "fs1", "--wait", "--json")
            took = time.monotonic() - t0
            assert rc == 0, err
            reply = json.loads(out)
            assert reply["state"] == "done" and reply["snapshots"] == ["s/v@fs1"], reply
            time.sleep(1)  # and the load goes on after it
        assert not w.errors, w.errors[:3]
        after = w.count()
        committed = list(w.committed[:before])
    finally:
        run("umount", str(mnt))
    assert after > before, "no writes after the snapshot: the test saw no load"
    act = m.snapshot_activate("s", "v", "fs1")
    copy = tmp_path / "fs1.img"
    try:
        run("dd", f"if={act['path']}", f"of={copy}", "bs=1M", "iflag=direct", "status=none")
    finally:
        m.snapshot_deactivate("s", "v", "fs1")
    fix = run("e2fsck", "-fy", str(copy), ok=(0, 1), timeout=170)
    check = run("e2fsck", "-fn", str(copy), check=False, timeout=170)
    assert check.returncode == 0, check.stdout + check.stderr
    # every committed file, read straight from the image (debugfs, no mount)
    sample = random.Random(7).sample(committed, min(12, len(committed)))
    for path, digest in sample:
        got = subprocess.run(
            ["debugfs", "-R", f"cat {path}", str(copy)], capture_output=True, timeout=60
        )
        assert got.returncode == 0 and hashlib.sha256(got.stdout).hexdigest() == digest, path
    names = run("debugfs", "-R", "ls -p /w0", str(copy)).stdout
    have = {ln.split("/")[5] for ln in names.splitlines() if ln.count("/") >= 6}
    for path, _ in committed:
        if path.startswith("/w0/"):
            assert path.split("/")[2] in have, path
    replayed = "recovering journal" in fix.stdout.lower()
    print(
        f"fs snapshot: {before} files committed before it, {after} by the end; "
        f"in-band snapshot {took:.1f} s; journal replayed: {replayed}; "
        f"e2fsck -fy {fix.returncode}, -fn {check.returncode}"
    )


# -- 4. dmsnapd stopped or killed under I/O ---------------------------------------------


@pytest.fixture
def daemon_export(tmp_path):
    """A real dmsnapd; pool p, volume p/v (64 MiB) exported --local through
    the CLI; yields (daemon, /dev/sdX)."""
    needs_lio()
    from test_cli_e2e import Daemon

    d = Daemon(tmp_path)
    d.start()
    try:
        d.cli("pool", "create", "p", "--size", "256M")
        d.cli("volume", "create", "p/v", "--size", "64M")
        d.cli("export", "p/v", "--local")
        disk = os.path.realpath("/dev/dmsnap/p/v")
        assert disk.startswith("/dev/sd"), disk
        yield d, disk
    finally:
        if d.proc is not None and d.proc.poll() is not None:
            d.start()  # a test killed it: bring it back to clean up
        d.cli("pool", "destroy", "p", "--force", "--yes", check=False)
        d.stop(teardown=True)


def _background_fio(disk: str, seconds: float) -> tuple[subprocess.Popen[str], list[str]]:
    """Random 4 KiB writes (2 jobs, 16 in flight each) on the first 16 MiB,
    paced to last about ``seconds``, then verified."""
    args = fio_verify_args(disk, region=16 * MiB, jobs=2, bs="4k")
    ios = 8 * MiB // 4096  # per job
    cmd = ["fio", "--output-format=json", *args, f"--rate_iops={max(1, int(ios / seconds))}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), cmd


def _fio_result(p: subprocess.Popen[str], timeout: float = 170):
    from scsi_util import FioResult

    out, err = p.communicate(timeout=timeout)
    assert "{" in out, f"fio exited {p.returncode} without a report: {err[-3000:]}"
    doc = json.loads(out[out.index("{") :])
    return FioResult(p.returncode, doc["jobs"], err, 0.0)


def _broken_rings(log: str) -> int:
    return len(re.findall(r"ring is broken", log))


def _worker_nices(pid: int) -> list[int]:
    """The nice value of each of ``pid``'s tcmu-worker threads."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{task}/stat") as f:
            stat = f.read()
        if "(tcmu-worker)" in stat:
            out.append(int(stat.rsplit(")", 1)[1].split()[16]))  # field 19: nice
    return out


def test_worker_threads_run_nicer_than_dmsnapd(daemon_export, monkeypatch):
    """The export's fast-path threads run 5 nicer than dmsnapd by default
    (so LIO's fabric threads win a short CPU); --worker-nice /
    DMSNAP_WORKER_NICE sets it, and an export restored at start gets it."""
    d, disk = daemon_export
    assert d.proc is not None
    base = os.getpriority(os.PRIO_PROCESS, d.proc.pid)
    nices = _worker_nices(d.proc.pid)
    assert nices and set(nices) == {min(19, base + 5)}, nices
    d.stop()
    monkeypatch.setenv("DMSNAP_WORKER_NICE", "0")
    d.start()
    assert d.json("export", "list")[0]["running"]
    nices = _worker_nices(d.proc.pid)
    assert nices and set(nices) == {os.getpriority(os.PRIO_PROCESS, d.proc.pid)}, nices
    assert pread_direct(disk, 0, 4096) == bytes(4096)  # and it serves I/O


def test_daemon_restart_under_io(daemon_export):
    """`dmsnap daemon stop` while fio writes: the export stays, LIO holds new
    commands (block_dev) and the stopping daemon answers what it holds BUSY;
    the initiator retries until dmsnapd is back; fio sees no error and every
    block verifies."""
    d, disk = daemon_export
    p, _ = _background_fio(disk, seconds=25)
    try:
        time.sleep(4)
        t0 = time.monotonic()
        d.stop()
        stopped = time.monotonic() - t0
        time.sleep(2)  # the LUN is held: commands wait in the initiator's retries
        d.start()
        back = time.monotonic() - t0
        exports = d.json("export", "list")
        assert exports[0]["running"], exports
        r = _fio_result(p)
    finally:
        if p.poll() is None:
            p.kill()
    assert_fio_verified(r)
    print(
        f"restart under fio: stop {stopped:.1f} s, back after {back:.1f} s; "
        f"{r.written // MiB} MiB verified"
    )


def test_daemon_killed_under_io(daemon_export):
    """kill -9 of dmsnapd while fio writes and a long command (an UNMAP of
    32 MiB, executed on the slow path as zero writes) is in flight, so that
    later writes complete before it: the ring then holds a stale window. The
    new daemon has the kernel fail what the ring holds with BUSY (reset_ring)
    and the initiator retries: fio sees no error and verifies, the discard
    succeeds and reads back as zeros, and the kernel never marks the ring
    broken. (Commands stay in the ring until the new daemon resets it: it must
    be back within TCMU's cmd_time_out, lio.CMD_TIME_OUT.)"""
    d, disk = daemon_export
    pwrite_direct(disk, 32 * MiB, random.Random(3).randbytes(32 * MiB))
    broken = _broken_rings(kernel_log())
    p, _ = _background_fio(disk, seconds=25)
    discard: list[tuple[int, str, float]] = []

    def blkdiscard() -> None:
        t = time.monotonic()
        r = subprocess.run(
            ["blkdiscard", "-o", str(32 * MiB), "-l", str(32 * MiB), disk],
            capture_output=True,
            text=True,
            timeout=170,
        )
        discard.append((r.returncode, r.stderr, time.monotonic() - t))

    t = threading.Thread(target=blkdiscard)
    try:
        time.sleep(4)
        t.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        d.kill9()
        in_flight = not discard
        d.start()
        back = time.monotonic() - t0
        t.join(timeout=170)
        r = _fio_result(p)
    finally:
        if p.poll() is None:
            p.kill()
        t.join(timeout=170)
    assert_fio_verified(r)
    assert discard and discard[0][0] == 0, discard
    assert pread_direct(disk, 32 * MiB, 32 * MiB) == bytes(32 * MiB)
    assert _broken_rings(kernel_log()) == broken
    print(
        f"kill -9 under fio: back after {back:.1f} s; UNMAP in flight at the kill: {in_flight} "
        f"(took {discard[0][2]:.1f} s); {r.written // MiB} MiB verified"
    )


RESTART_IQN = "iqn.2026-11.org.dmsnap.test:restart"
RESTART_INITIATOR = "iqn.2026-11.org.dmsnap.test:restart-client"
IDLE_VOLUMES = 50


def test_daemon_killed_under_iscsi_io_reassembles_50_volumes(tmp_path):
    """kill -9 of dmsnapd while fio writes through an open-iscsi session;
    before it starts again the dm devices of 50 other volumes of the pool
    are removed, so the new daemon reassembles them (as after a reboot)
    before it serves the ring again. It must be back within TCMU's
    cmd_time_out (what the initiator's commands wait in the ring meanwhile);
    fio sees no error and every block verifies."""
    needs_lio()
    from test_cli_e2e import Daemon

    d = Daemon(tmp_path)
    d.start()
    try:
        with open_iscsi():
            d.cli("pool", "create", "r", "--size", "1G", "--journal-size", "16M", "--sparse")
            for i in range(IDLE_VOLUMES):
                d.cli("volume", "create", f"r/idle{i:02d}", "--size", "4M")
            d.cli("volume", "create", "r/io", "--size", "64M")
            d.cli(
                "export", "r/io", "--iscsi", "--iqn", RESTART_IQN, "--portal", PORTAL,
                "--allow", RESTART_INITIATOR,
            )  # fmt: skip
            [ex] = d.json("export", "list")
            with iscsi_sessions_as(RESTART_IQN, PORTAL, ex["serial"], [RESTART_INITIATOR]) as s:
                disk = s[RESTART_INITIATOR]
                idle = [f"dmsnap-r-idle{i:02d}" for i in range(IDLE_VOLUMES)]
                present = set(run("dmsetup", "ls").stdout.split())
                assert set(idle) <= present, sorted(set(idle) - present)[:3]
                p, _ = _background_fio(disk, seconds=40)
                try:
                    time.sleep(4)
                    t0 = time.monotonic()
                    d.kill9()
                    for name in idle:
                        run("dmsetup", "remove", name)
                    d.start()
                    back = time.monotonic() - t0
                    r = _fio_result(p, timeout=400)
                finally:
                    if p.poll() is None:
                        p.kill()
                present = set(run("dmsetup", "ls").stdout.split())
                assert set(idle) <= present, sorted(set(idle) - present)[:3]
                assert d.json("export", "list")[0]["running"]
            assert back < lio.CMD_TIME_OUT, back
            assert_fio_verified(r)
            print(
                f"\nkill -9 under iSCSI fio, {IDLE_VOLUMES} volumes reassembled: back after "
                f"{back:.1f} s (cmd_time_out {lio.CMD_TIME_OUT} s); {r.written // MiB} MiB verified"
            )
    finally:
        if d.proc is None or d.proc.poll() is not None:
            d.start()
        d.cli("pool", "destroy", "r", "--force", "--yes", check=False)
        d.stop(teardown=True)


# -- 5. who may snapshot, per initiator ---------------------------------------------------

RIGHTS_IQN = "iqn.2026-11.org.dmsnap.test:rights"
MAY = "iqn.2026-11.org.dmsnap.test:may"
MAY_NOT = "iqn.2026-11.org.dmsnap.test:maynot"


def _identity(disk: str) -> tuple[bytes, bytes, str]:
    """What multipath and udev key on: VPD 0x80, VPD 0x83 and the kernel's wwid."""
    dev = f"/sys/block/{os.path.basename(disk)}/device"
    with (
        open(f"{dev}/vpd_pg80", "rb") as a,
        open(f"{dev}/vpd_pg83", "rb") as b,
        open(f"{dev}/wwid") as c,
    ):
        return a.read(), b.read(), c.read().strip()


def test_snapshot_rights_per_initiator(tmp_path):
    """Two initiators log in to one iSCSI export; only one may snapshot. Both
    see one disk (serial, NAA, data); the other's `dmsnap initiator snapshot`
    is refused with a clear message and makes nothing; the snapshot made
    through the first holds the writes completed through both; the rights
    survive a daemon restart; a bad IQN is refused and changes nothing."""
    needs_lio()
    from test_cli_e2e import Daemon

    d = Daemon(tmp_path)
    d.start()
    try:
        d.cli("pool", "create", "r", "--size", "256M")
        d.cli("volume", "create", "r/v", "--size", "32M")
        base = ["export", "r/v", "--iscsi", "--iqn", RIGHTS_IQN, "--portal", PORTAL]
        base += ["--allow", MAY, "--allow", MAY_NOT]
        bad = d.cli(*base, "--snapshot-allow", "iqn.2026-11.bad name", check=False)
        assert bad.returncode != 0 and "is not an iSCSI name" in bad.stderr, bad
        assert d.json("export", "list") == [] and not lio.iscsi_exists(RIGHTS_IQN)

        d.cli(*base, "--snapshot-allow", MAY)
        (ex,) = d.json("export", "list")
        assert ex["snapshot_allow"] == [MAY] and ex["running"], ex
        serial = ex["serial"]
        # the volume behind two backstores: one takes the command, one refuses it
        assert lio.find_backstore(f"dmsnap-{serial}") is not None
        assert lio.find_backstore(f"dmsnap-{serial}-nosnap") is not None
        row = d.cli("export", "list").stdout.splitlines()[1].split()
        assert row[0] == "r/v" and row[4] == f"{MAY},{MAY_NOT}" and row[5] == MAY, row

        with open_iscsi(), iscsi_sessions_as(RIGHTS_IQN, PORTAL, serial, [MAY, MAY_NOT]) as disks:
            may, may_not = disks[MAY], disks[MAY_NOT]
            assert may != may_not
            assert _identity(may) == _identity(may_not)
            assert _identity(may)[2].startswith("naa."), _identity(may)
            # a write through one path is read through the other
            a, b = os.urandom(4096), os.urandom(4096)
            pwrite_direct(may_not, 0, a)
            pwrite_direct(may, 4096, b)
            assert pread_direct(may, 0, 4096) == a
            assert pread_direct(may_not, 4096, 4096) == b

            def refused(name: str) -> None:
                r = d.cli("initiator", "snapshot", may_not, name, check=False)
                assert r.returncode == 8, r
                assert r.stderr.strip() == (
                    f"dmsnap: {may_not}: this initiator is not allowed to request "
                    "snapshots of this volume"
                ), r.stderr

            refused("nope")
            d.cli("initiator", "snapshot", may, "s1", "--wait")
            snaps = [s["name"] for s in d.json("snapshot", "list", "r/v")]
            assert snaps == ["s1"], snaps
            # the marker follows the writes completed through both paths
            path = d.cli("snapshot", "activate", "r/v@s1").stdout.strip()
            assert pread_direct(path, 0, 8192) == a + b
            d.cli("snapshot", "deactivate", "r/v@s1")

            d.stop()
            d.start()  # exports are reassembled with their rights
            (ex,) = d.json("export", "list")
            assert ex["snapshot_allow"] == [MAY] and ex["running"], ex
            refused("nope2")
            d.cli("initiator", "snapshot", may, "s2", "--wait")
            pwrite_direct(may_not, 8192, a)
            assert pread_direct(may, 8192, 4096) == a
            snaps = sorted(s["name"] for s in d.json("snapshot", "list", "r/v"))
            assert snaps == ["s1", "s2"], snaps
        d.cli("unexport", "r/v")
        assert lio.find_backstore(f"dmsnap-{serial}-nosnap") is None
        assert not lio.iscsi_exists(RIGHTS_IQN)
    finally:
        if d.proc is None or d.proc.poll() is not None:
            d.start()
        d.cli("pool", "destroy", "r", "--force", "--yes", check=False)
        d.stop(teardown=True)


THIRD = "iqn.2026-11.org.dmsnap.test:third"


def test_export_update_live(tmp_path):
    """`dmsnap export --update` changes a running export's initiators and
    snapshot rights while an initiator stays logged in and keeps working: a
    third initiator is admitted and given the right; one taken off the list
    can no longer log in; when the rights stop differing between initiators
    the refusing backstore goes, and comes back when they differ again. A
    change that would move the logged-in initiator to the other backstore is
    refused and changes nothing. A local export's right is switched off and
    on, as the initiator sees it; the rights survive a daemon restart."""
    needs_lio()
    from test_cli_e2e import Daemon

    d = Daemon(tmp_path)
    d.start()

    def update(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        return d.cli("export", "r/v", "--update", *args, check=ok)

    def rights() -> tuple[list[str], object]:
        (ex,) = [e for e in d.json("export", "list") if e["ref"] == "r/v"]
        assert ex["running"], ex
        return ex["allow"], ex["snapshot_allow"]

    def refused(disk: str) -> None:
        r = d.cli("initiator", "snapshot", disk, "nope", check=False)
        assert r.returncode == 8 and "not allowed to request snapshots" in r.stderr, r

    try:
        d.cli("pool", "create", "r", "--size", "256M")
        d.cli("volume", "create", "r/v", "--size", "32M")
        d.cli("volume", "create", "r/l", "--size", "16M")
        d.cli("export", "r/v", "--iscsi", "--iqn", RIGHTS_IQN, "--portal", PORTAL,
              "--allow", MAY, "--allow", MAY_NOT, "--snapshot-allow", MAY)  # fmt: skip
        serial = d.json("export", "list")[0]["serial"]
        nosnap = f"dmsnap-{serial}-nosnap"
        with open_iscsi(), iscsi_sessions_as(RIGHTS_IQN, PORTAL, serial, [MAY]) as disks:
            may = disks[MAY]
            a = os.urandom(4096)
            pwrite_direct(may, 0, a)

            # admit a third initiator: the logged-in one is not disturbed
            r = update("--allow", MAY, "--allow", MAY_NOT, "--allow", THIRD)
            assert "updated r/v" in r.stdout, r
            assert rights() == ([MAY, MAY_NOT, THIRD], [MAY])
            assert set(lio.iscsi_acls(RIGHTS_IQN)) == {MAY, MAY_NOT, THIRD}
            assert pread_direct(may, 0, 4096) == a

            # refused, nothing changed: MAY would change backstore while logged in
            r = update("--snapshot-allow", MAY_NOT, ok=False)
            assert r.returncode == 5, r
            assert f"{MAY} would change backstore" in r.stderr and "log it out first" in r.stderr
            # refused: the kind, IQN and portal are not changed live
            r = update("--portal", "127.0.0.1:3261", ok=False)
            assert r.returncode == 2 and "--update changes --allow" in r.stderr, r
            assert rights() == ([MAY, MAY_NOT, THIRD], [MAY])

            # the third (not logged in) may snapshot from now on
            update("--snapshot-allow", MAY, "--snapshot-allow", THIRD)
            assert rights() == ([MAY, MAY_NOT, THIRD], [MAY, THIRD])
            with iscsi_sessions_as(RIGHTS_IQN, PORTAL, serial, [THIRD]) as more:
                third = more[THIRD]
                assert pread_direct(third, 0, 4096) == a
                d.cli("initiator", "snapshot", third, "by-third", "--wait")
            assert [s["name"] for s in d.json("snapshot", "list", "r/v")] == ["by-third"]

            # MAY_NOT goes: everyone left may snapshot, one backstore is enough
            update("--allow", MAY, "--allow", THIRD)
            assert rights() == ([MAY, THIRD], [MAY, THIRD])
            row = d.cli("export", "list").stdout.splitlines()[1].split()
            assert row[4] == row[5] == f"{MAY},{THIRD}", row
            assert lio.find_backstore(nosnap) is None
            assert set(lio.iscsi_acls(RIGHTS_IQN)) == {MAY, THIRD}
            with (
                pytest.raises(AssertionError, match="--login"),
                iscsi_sessions_as(RIGHTS_IQN, PORTAL, serial, [MAY_NOT]),
            ):
                pass
            assert pread_direct(may, 0, 4096) == a
            d.cli("initiator", "snapshot", may, "by-may", "--wait")

            # MAY_NOT comes back without the right: the refusing backstore too
            update("--allow", MAY, "--allow", THIRD, "--allow", MAY_NOT)
            assert rights() == ([MAY, THIRD, MAY_NOT], [MAY, THIRD])
            assert lio.find_backstore(nosnap) is not None
            with iscsi_sessions_as(RIGHTS_IQN, PORTAL, serial, [MAY_NOT]) as more:
                b = os.urandom(4096)
                pwrite_direct(more[MAY_NOT], 4096, b)
                refused(more[MAY_NOT])
                assert pread_direct(may, 0, 8192) == a + b

            d.stop()
            d.start()  # kept in the catalog
            assert rights() == ([MAY, THIRD, MAY_NOT], [MAY, THIRD])
            assert pread_direct(may, 0, 8192) == a + b
            snaps = sorted(s["name"] for s in d.json("snapshot", "list", "r/v"))
            assert snaps == ["by-may", "by-third"], snaps

        # a local export: the snapshot right off, then on again
        d.cli("export", "r/l", "--local")
        disk = "/dev/dmsnap/r/l"
        r = d.cli("export", "r/l", "--update", "--no-snapshot")
        assert "snapshot command from none" in r.stdout, r
        refused(disk)
        r = d.cli("export", "r/l", "--update", "--allow", MAY, check=False)
        assert r.returncode == 2 and "--allow is for iSCSI exports" in r.stderr, r
        d.cli("export", "r/l", "--update", "--snapshot-allow", "all")
        d.cli("initiator", "snapshot", disk, "yes", "--wait")
        assert [s["name"] for s in d.json("snapshot", "list", "r/l")] == ["yes"]
        r = d.cli("export", "r/nope", "--update", "--no-snapshot", check=False)
        assert r.returncode == 3 and "r/nope is not exported" in r.stderr, r
    finally:
        if d.proc is None or d.proc.poll() is not None:
            d.start()
        d.cli("pool", "destroy", "r", "--force", "--yes", check=False)
        d.stop(teardown=True)


CHAP_IQN = "iqn.2026-11.org.dmsnap.test:chap"
ONE_WAY = "iqn.2026-11.org.dmsnap.test:chap-one"
MUTUAL = "iqn.2026-11.org.dmsnap.test:chap-mutual"
STRANGER = "iqn.2026-11.org.dmsnap.test:stranger"
S_ONE, S_MUT, S_TGT = "one-secret-0123", "mut-secret-4567", "tgt-secret-89ab"


def test_chap_logins(tmp_path):
    """open-iscsi against an export with per-initiator CHAP from a
    --chap-file: the right secret logs in, a wrong one or none is refused,
    an initiator not in the file (so not allowed) is refused even with a
    valid secret; mutual CHAP logs in when the initiator checks the
    target's secret and is refused by the initiator when that is wrong.
    The secrets are in a 0600 file, not in the catalog or the daemon's log,
    and serve again when LIO lost the target (a reboot)."""
    needs_lio()
    from scsi_util import iscsi_login_as
    from test_cli_e2e import Daemon

    d = Daemon(tmp_path)
    d.start()
    try:
        d.cli("pool", "create", "c", "--size", "256M")
        d.cli("volume", "create", "c/v", "--size", "32M")
        f = tmp_path / "chap"
        f.write_text(f"{ONE_WAY} one {S_ONE}\n{MUTUAL} mut {S_MUT} tgt {S_TGT}\n")
        f.chmod(0o644)
        base = ["export", "c/v", "--iscsi", "--iqn", CHAP_IQN, "--portal", PORTAL]
        r = d.cli(*base, "--chap-file", str(f), check=False)
        assert r.returncode == 2 and "chmod 600" in r.stderr, r
        r = d.cli(*base, check=False)  # closed by default
        assert r.returncode == 2 and "--allow-any" in r.stderr, r
        assert d.json("export", "list") == []
        f.chmod(0o600)
        d.cli(*base, "--chap-file", str(f))
        (ex,) = d.json("export", "list")
        assert ex["allow"] == [ONE_WAY, MUTUAL] and ex["running"], ex
        assert ex["chap"] == {ONE_WAY: "one-way", MUTUAL: "mutual"}, ex
        serial = ex["serial"]
        secrets = d.state / "secrets" / f"chap-{serial}.json"
        assert secrets.stat().st_mode & 0o777 == 0o600
        stored = b"".join(p.read_bytes() for p in d.state.glob("catalog.db*"))
        for s in (S_ONE, S_MUT, S_TGT):
            assert s.encode() not in stored

        one = {"authmethod": "CHAP", "username": "one", "password": S_ONE}
        mut = {"authmethod": "CHAP", "username": "mut", "password": S_MUT,
               "username_in": "tgt", "password_in": S_TGT}  # fmt: skip

        def login(initiator: str, auth: dict[str, str] | None) -> bool:
            with iscsi_login_as(CHAP_IQN, PORTAL, serial, initiator, auth) as disk:
                if disk is None:
                    return False
                data = os.urandom(4096)
                pwrite_direct(disk, 0, data)
                assert pread_direct(disk, 0, 4096) == data
                return True

        with open_iscsi():
            assert login(ONE_WAY, one)
            assert not login(ONE_WAY, {**one, "password": "wrong-secret-00"})
            assert not login(ONE_WAY, None)
            assert not login(STRANGER, one)  # not in the file: no ACL
            assert login(MUTUAL, mut)
            assert not login(MUTUAL, {**mut, "password_in": "not-the-target1"})
            assert not login(MUTUAL, {**mut, "password": S_ONE})
            # LIO loses its configuration (a reboot): dmsnapd builds the
            # target again, with the secrets from their file
            d.stop()
            lio.unexport_iscsi(CHAP_IQN)
            d.start()
            assert d.json("export", "list")[0]["running"]
            assert login(ONE_WAY, one) and login(MUTUAL, mut)
            assert not login(ONE_WAY, {**one, "password": "wrong-secret-00"})
        d.cli("unexport", "c/v")
        assert not secrets.exists()
        log = d.log.read_text()
        assert "export.create" in log
        for s in (S_ONE, S_MUT, S_TGT):
            assert s not in log
    finally:
        if d.proc is None or d.proc.poll() is not None:
            d.start()
        d.cli("pool", "destroy", "c", "--force", "--yes", check=False)
        d.stop(teardown=True)
