"""Helpers for the SCSI kernel tests that drive real initiators: libiscsi's
``iscsi-test-cu`` (its CUnit output parsed per test), open-iscsi (``iscsid``
started for the test if none runs, login/logout on a portal), ``fio --verify``
(its JSON report checked), small O_DIRECT helpers, and the storage core
an export test starts from (``manager``)."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dmsnap.scsi import lio
from dmsnap.storage.manager import Manager

MiB = 1 << 20


def needs_lio() -> None:
    """Fail, not skip, where LIO cannot serve: these tests ask for it."""
    if (why := lio.available()) is not None:
        pytest.fail(why)


@contextlib.contextmanager
def manager(state: Path) -> Iterator[Manager]:
    """A storage core on ``state``; at the end every pool it has is
    destroyed (its exports with it) and the core closed."""
    m = Manager(str(state))
    try:
        yield m
    finally:
        try:
            for p in m.catalog.pools():
                m.pool_destroy(p.name, force=True)
        finally:
            m.close()


def run(
    *cmd: str, timeout: float = 120, check: bool = True, ok: tuple[int, ...] = (0,)
) -> subprocess.CompletedProcess[str]:
    if shutil.which(cmd[0]) is None:
        pytest.fail(f"{cmd[0]} is not installed (tools/setup installs it)", pytrace=False)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and r.returncode not in ok:
        raise AssertionError(
            f"{' '.join(cmd)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        )
    return r


# -- O_DIRECT I/O ---------------------------------------------------------------------


def pwrite_direct(path: str, offset: int, data: bytes) -> None:
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
    finally:
        os.close(fd)


def pread_direct(path: str, offset: int, length: int) -> bytes:
    buf = mmap.mmap(-1, length)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], offset) == length
    finally:
        os.close(fd)
    return bytes(buf)


def kernel_log() -> str:
    return run("dmesg").stdout


# -- libiscsi's iscsi-test-cu --------------------------------------------------------


@dataclass
class CuTest:
    """One CUnit test as iscsi-test-cu reported it."""

    suite: str
    name: str
    outcome: str = "unknown"  # passed | skipped (libiscsi's own [SKIPPED]) | failed
    why: str = ""  # the [SKIPPED] reason, or the failed assertions
    log: list[str] = field(default_factory=list)


_TEST = re.compile(r"^  Test: (\S+) \.\.\.(.*)$")
_SUMMARY = re.compile(r"^\s+tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)")


def parse_cunit(text: str) -> tuple[dict[tuple[str, str], CuTest], tuple[int, ...] | None]:
    """iscsi-test-cu's verbose output (CUnit's basic interface): every test
    with its outcome, and the summary's (total, ran, passed, failed, inactive)
    for tests. A test that libiscsi skipped itself passes in CUnit's eyes and
    logs "[SKIPPED] reason"; it is reported as skipped here."""
    tests: dict[tuple[str, str], CuTest] = {}
    suite = ""
    cur: CuTest | None = None
    summary = None
    for line in text.splitlines():
        if line.startswith("Suite: "):
            suite, cur = line[7:].strip(), None
            continue
        m = _TEST.match(line)
        if m:
            cur = tests[(suite, m.group(1))] = CuTest(suite, m.group(1))
            line = m.group(2)
        if (s := _SUMMARY.match(line)) is not None:
            summary = tuple(int(x) for x in s.groups())
            cur = None
            continue
        if line.startswith("Run Summary"):
            cur = None
        if cur is not None and line.strip():
            cur.log.append(line.strip())
    for t in tests.values():
        if "FAILED" in t.log:
            t.outcome = "failed"
            t.why = "; ".join(x for x in t.log if re.match(r"^\d+\. ", x))
        elif "passed" in t.log:
            skips = [x.split("[SKIPPED]", 1)[1].strip() for x in t.log if "[SKIPPED]" in x]
            t.outcome, t.why = ("skipped", skips[0]) if skips else ("passed", "")
    return tests, summary


def compare_to_reference(
    tests: dict[tuple[str, str], tuple[CuTest, CuTest]], known: Collection[tuple[str, str]]
) -> tuple[list[str], list[str]]:
    """(suite, test) -> (its result on the target, on the reference target):
    the defects (the target fails, or does not finish, a test the reference
    passes or skips; or skips one the reference passes: a command it does not
    offer) not in ``known``, and the ``known`` entries the target passes now."""
    defects, stale = [], []
    for (suite, name), (d, ref) in sorted(tests.items()):
        failed = d.outcome not in ("passed", "skipped")
        bad = (failed and ref.outcome in ("passed", "skipped")) or (
            d.outcome == "skipped" and ref.outcome == "passed"
        )
        if (suite, name) in known:
            if d.outcome == "passed":  # fixed: the entry must go
                stale.append(f"{suite}.{name}: listed as known, but it passes now")
        elif bad:
            defects.append(f"{suite}.{name}: {d.outcome} ({d.why}); reference {ref.outcome}")
    return defects, stale


# -- open-iscsi ----------------------------------------------------------------------


def _running(comm: str) -> bool:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == comm:
                    return True
    return False


def _iscsid_listening() -> bool:
    """iscsid's control socket (abstract, what iscsiadm connects to) exists."""
    with open("/proc/net/unix") as f:
        return "@ISCSIADM_ABSTRACT_NAMESPACE" in f.read()


@contextlib.contextmanager
def open_iscsi() -> Iterator[None]:
    """open-iscsi ready to log in: iscsi_tcp loaded and an iscsid running
    (started here, in the foreground, if there is none; stopped after)."""
    for tool in ("iscsiadm", "iscsid"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (open-iscsi)", pytrace=False)
    run("modprobe", "iscsi_tcp")
    proc = None
    if not _running("iscsid"):
        # its own session: on SIGTERM a foreground iscsid signals its whole
        # process group (it took pytest and the VM's init script with it)
        proc = subprocess.Popen(
            ["iscsid", "-f"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while not _iscsid_listening():
            assert proc.poll() is None, "iscsid exited"
            assert time.monotonic() < deadline, "iscsid did not come up"
            time.sleep(0.2)
    try:
        yield
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def iscsi_session(iqn: str, portal: str, serial: str) -> Iterator[str]:
    """Discover ``iqn`` on ``portal``, log in and yield the new /dev/sdX
    (found by its unit serial); log out and forget the node after."""
    run("iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", portal)
    run("iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "--login", timeout=60)
    try:
        disk = lio.scsi_disk_for(serial, timeout=60)
        assert disk is not None, f"no SCSI disk with serial {serial} after the iSCSI login"
        yield disk
    finally:
        run("iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "--logout", check=False)
        run("iscsiadm", "-m", "node", "-o", "delete", "-T", iqn, "-p", portal, check=False)
        run(
            "iscsiadm", "-m", "discoverydb", "-t", "sendtargets", "-p", portal, "-o", "delete",
            check=False,
        )  # fmt: skip


def _disks_with_serial(serial: str) -> dict[str, str]:
    """Initiator IQN -> /dev/sdX of every iSCSI disk whose unit serial is ``serial``."""
    out = {}
    for dev, disk in lio.scsi_disks_with_serial(serial):
        m = re.search(r"/(session\d+)/", os.path.realpath(dev))
        if m is None:
            continue
        with open(f"/sys/class/iscsi_session/{m.group(1)}/initiatorname") as f:
            out[f.read().strip()] = disk
    return out


@contextlib.contextmanager
def iscsi_sessions_as(
    iqn: str, portal: str, serial: str, initiators: list[str]
) -> Iterator[dict[str, str]]:
    """One open-iscsi session to ``iqn`` per initiator name (an iface each,
    with its ``iface.initiatorname``); yields initiator IQN -> /dev/sdX.
    Logs out and removes the node records and ifaces after."""
    # an iface per initiator name, so that sessions can be nested
    ifaces = [f"dmsnap-{re.sub(r'[^A-Za-z0-9]', '-', n)[-40:]}" for n in initiators]
    try:
        for iface, name in zip(ifaces, initiators, strict=True):
            run("iscsiadm", "-m", "iface", "-I", iface, "-o", "new")
            run("iscsiadm", "-m", "iface", "-I", iface, "-o", "update",
                "-n", "iface.initiatorname", "-v", name)  # fmt: skip
            run("iscsiadm", "-m", "node", "-o", "new", "-T", iqn, "-p", portal, "-I", iface)
            run("iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "-I", iface, "--login",
                timeout=60)  # fmt: skip
        deadline = time.monotonic() + 60
        while not set(initiators) <= set(disks := _disks_with_serial(serial)):
            assert time.monotonic() < deadline, f"disks after the iSCSI logins: {disks}"
            time.sleep(0.2)
        yield {name: disks[name] for name in initiators}
    finally:
        for iface in ifaces:
            run("iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "-I", iface, "--logout",
                check=False)  # fmt: skip
            run("iscsiadm", "-m", "node", "-o", "delete", "-T", iqn, "-p", portal, "-I", iface,
                check=False)  # fmt: skip
            run("iscsiadm", "-m", "iface", "-I", iface, "-o", "delete", check=False)


@contextlib.contextmanager
def iscsi_login_as(
    iqn: str, portal: str, serial: str, initiator: str, auth: dict[str, str] | None = None
) -> Iterator[str | None]:
    """One open-iscsi login to ``iqn`` as ``initiator`` (an iface of its
    own) with the node's ``node.session.auth.*`` settings (authmethod,
    username, password, username_in, password_in). Yields the /dev/sdX,
    or None when the login was refused. Logs out and cleans up after."""
    iface = f"dmsnap-{re.sub(r'[^A-Za-z0-9]', '-', initiator)[-40:]}"
    node = ("iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "-I", iface)
    try:
        run("iscsiadm", "-m", "iface", "-I", iface, "-o", "new")
        run("iscsiadm", "-m", "iface", "-I", iface, "-o", "update",
            "-n", "iface.initiatorname", "-v", initiator)  # fmt: skip
        run(*node, "-o", "new")
        # one try: a refused login is the answer, not a reason to retry
        settings = {"node.session.initial_login_retry_max": "1"}
        settings |= {f"node.session.auth.{k}": v for k, v in (auth or {}).items()}
        for k, v in settings.items():
            run(*node, "-o", "update", "-n", k, "-v", v)
        r = run(*node, "--login", timeout=120, check=False)
        if r.returncode != 0:
            yield None
            return
        deadline = time.monotonic() + 60
        while initiator not in (disks := _disks_with_serial(serial)):
            assert time.monotonic() < deadline, f"disks after the iSCSI login: {disks}"
            time.sleep(0.2)
        yield disks[initiator]
    finally:
        run(*node, "--logout", check=False)
        run(*node, "-o", "delete", check=False)
        run("iscsiadm", "-m", "iface", "-I", iface, "-o", "delete", check=False)


# -- fio -----------------------------------------------------------------------------


@dataclass
class FioResult:
    rc: int
    jobs: list[dict]
    stderr: str
    seconds: float

    @property
    def written(self) -> int:
        return sum(j["write"]["io_bytes"] for j in self.jobs)

    @property
    def verified(self) -> int:
        return sum(j["read"]["io_bytes"] for j in self.jobs)

    @property
    def errors(self) -> list[tuple[str, int]]:
        return [(j["jobname"], j["error"]) for j in self.jobs if j["error"]]


def fio(*args: str, timeout: float = 170) -> FioResult:
    """fio with a JSON report (``--output-format=json``)."""
    t0 = time.monotonic()
    r = run("fio", "--output-format=json", *args, timeout=timeout, check=False)
    took = time.monotonic() - t0
    try:
        doc = json.loads(r.stdout[r.stdout.index("{") :])
    except ValueError:
        msg = f"fio {' '.join(args)}: no JSON report\n{r.stdout}\n{r.stderr}"
        raise AssertionError(msg) from None
    return FioResult(r.returncode, doc["jobs"], r.stderr, took)


def fio_verify_args(
    dev: str, *, region: int, jobs: int = 4, base: int = 0, bs: str = "4k-64k"
) -> list[str]:
    """Several jobs of random writes (``bs``: 4-64 KiB, 16 in flight each), each in
    its own slice of ``region`` bytes from ``base`` (no two jobs write the same
    block, so each job's verify pass knows what every block must hold), then
    every written block read back and checked (crc32c)."""
    per = region // jobs // MiB * MiB
    return [
        f"--filename={dev}",
        "--direct=1",
        "--ioengine=libaio",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--name=rand",
        "--rw=randwrite",
        f"--bsrange={bs}" if "-" in bs else f"--bs={bs}",
        "--iodepth=16",
        f"--numjobs={jobs}",
        f"--offset={base}",
        f"--size={per}",
        f"--offset_increment={per}",
    ]


def assert_fio_verified(r: FioResult) -> None:
    assert r.rc == 0 and not r.errors, f"fio exited {r.rc}, errors {r.errors}\n{r.stderr[-3000:]}"
    for bad in ("verify failed", "bad magic", "bad header", "verify: bad"):
        assert bad not in r.stderr, r.stderr[-3000:]
    assert r.written > 0 and r.verified == r.written, (r.written, r.verified)
