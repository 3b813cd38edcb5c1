"""Fixtures for kernel tests (run as root in the VM via tools/vm).

``check_no_leftovers`` (autouse) fails any test that leaves device-mapper
devices or bound loop devices behind. It asks ``dmsetup`` and ``losetup``
(plus sysfs) rather than dmsnap's own code, so it also witnesses our cleanup.
Mark a test ``@pytest.mark.allow_leftovers("why")`` to exempt it. A session
level check catches leaks from module/session scoped fixtures too.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
import warnings
from collections.abc import Iterator

import pytest

# Loop devices with LO_FLAGS_AUTOCLEAR detach when their last user closes
# them, which can trail the close slightly; give them this long to go.
SETTLE_SECONDS = 3.0


def _run(*cmd: str) -> str:
    if shutil.which(cmd[0]) is None:
        pytest.fail(f"{cmd[0]} not installed (run tools/setup)", pytrace=False)
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed: {res.stderr.strip()}", pytrace=False)
    return res.stdout


def dm_devices() -> set[str]:
    """Names of all dm devices, per ``dmsetup ls``."""
    out = _run("dmsetup", "ls")
    names = set()
    for line in out.splitlines():
        # "name\t(253:0)"; "No devices found" when there are none.
        if not line.strip() or line.startswith("No devices found"):
            continue
        names.add(line.split("\t")[0].rsplit(" (", 1)[0].strip())
    return names


def loop_devices() -> set[str]:
    """Bound loop devices as "/dev/loopN -> backing file", per losetup and sysfs."""
    out = _run("losetup", "--list", "--noheadings", "--raw", "--output", "NAME,BACK-FILE")
    found = set()
    for line in out.splitlines():
        name, _, back = line.partition(" ")
        if name:
            found.add(f"{name} -> {back}")
    # sysfs too: a device whose backing file is being torn down can be
    # missing from losetup's list but still be bound.
    for path in glob.glob("/sys/block/loop*/loop/backing_file"):
        name = "/dev/" + path.split("/")[3]
        try:
            with open(path) as f:
                back = f.read().strip()
        except OSError:
            continue  # unbound meanwhile
        if not any(e.startswith(name + " ") for e in found):
            found.add(f"{name} -> {back}")
    return found


def _snapshot() -> tuple[set[str], set[str]]:
    return dm_devices(), loop_devices()


def _leftovers(before: tuple[set[str], set[str]], ignore: set[str]) -> tuple[list[str], list[str]]:
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        dm_now, loop_now = _snapshot()
        dm_new = sorted(dm_now - before[0] - ignore)
        loop_new = sorted(loop_now - before[1] - ignore)
        if not (dm_new or loop_new) or time.monotonic() >= deadline:
            return dm_new, loop_new
        time.sleep(0.1)


def _describe(dm_new: list[str], loop_new: list[str]) -> str:
    parts = []
    if dm_new:
        parts.append("dm devices: " + ", ".join(dm_new))
    if loop_new:
        parts.append("loop devices: " + ", ".join(loop_new))
    return "; ".join(parts)


# Leftovers already blamed on a test, so the session check does not blame
# them twice.
_reported: set[str] = set()


@pytest.fixture(scope="session", autouse=True)
def _check_no_leftovers_session() -> Iterator[None]:
    if os.geteuid() != 0 or not os.path.exists("/dev/mapper/control"):
        # tests/conftest.py skips (or fails) every kernel test here.
        yield
        return
    before = _snapshot()
    yield
    dm_new, loop_new = _leftovers(before, _reported)
    if dm_new or loop_new:
        pytest.fail(
            "kernel test session left behind " + _describe(dm_new, loop_new),
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def check_no_leftovers(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves new dm or loop devices behind."""
    before = _snapshot()
    yield
    marker = request.node.get_closest_marker("allow_leftovers")
    dm_new, loop_new = _leftovers(before, set())
    if marker is not None:
        _reported.update(dm_new, loop_new)
        return
    if dm_new or loop_new:
        _reported.update(dm_new, loop_new)
        pytest.fail("test left behind " + _describe(dm_new, loop_new), pytrace=False)


# -- device fixtures -------------------------------------------------------------


@pytest.fixture
def dm() -> Iterator[object]:
    """dmsnap's DeviceMapper on the real /dev/mapper/control."""
    from dmsnap.dm import DeviceMapper

    with DeviceMapper() as d:
        yield d


@pytest.fixture
def loopdev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Factory: ``loopdev(size_bytes)`` → a loop device over a sparse file,
    attached with dmsnap's own loop ioctls and detached after the test."""
    from dmsnap.storage import loop

    made: list[loop.LoopDevice] = []
    d = tmp_path_factory.mktemp("loop")

    def make(size: int) -> loop.LoopDevice:
        path = str(d / f"dev{len(made)}.img")
        loop.make_sparse(path, size)
        dev = loop.attach(path)
        made.append(dev)
        return dev

    yield make
    for dev in reversed(made):
        loop.detach(dev)
    # the guest's /tmp is RAM: a factory directory outlives the test unless
    # removed here (pytest's retention policy covers tmp_path only)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory, request) -> Iterator[object]:
    """A directory for a module-scoped fixture, removed with the module: the
    guest's /tmp is RAM, and factory directories otherwise stay to the end."""
    d = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def _tmp_space_guard(request) -> Iterator[None]:
    """Name the test that leaves a lot behind in the guest's RAM /tmp, before
    a later test fails with "disk is full" far from the cause."""

    def used() -> int:
        st = os.statvfs("/tmp")
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    before = used()
    yield
    grown = used() - before
    if grown > 64 * 2**20:
        # a warning, not a print: pytest shows it in the summary of a passed run
        warnings.warn(f"/tmp grew by {grown >> 20} MiB during {request.node.nodeid}", stacklevel=1)
