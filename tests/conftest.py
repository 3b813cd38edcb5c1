"""Test-suite wiring shared by host and kernel tests.

* Everything under ``tests/kernel`` is marked ``kernel`` automatically, so
  ``pytest -m "not kernel"`` (host) and ``pytest -m kernel`` (in the VM, via
  ``tools/vm``) split the suite without anyone having to remember a marker.
  Kernel tests live there only: the VM session collects just that directory,
  so a ``kernel`` mark elsewhere is a usage error.
* A kernel test needs root and device-mapper. Without them it is skipped,
  unless ``DMSNAP_REQUIRE_KERNEL=1`` (set by ``tools/run-tests`` for the VM
  session): then it fails, so a broken VM can never pass as "all skipped".
* Every test has a time limit (``DMSNAP_TEST_TIMEOUT`` seconds, default 900,
  0 = none; ``@pytest.mark.time_limit(s)`` per test). A kernel test that hangs
  would otherwise hold the one VM boot until tools/vm's global timeout and
  leave no trace of which test it was. At the limit the test fails with the
  stacks of all threads; if it cannot be interrupted (stuck in the kernel),
  a watchdog dumps the stacks and ends the session a minute later.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

KERNEL_DIR = Path(__file__).resolve().parent / "kernel"
DEFAULT_TIME_LIMIT = 900
WATCHDOG_GRACE = 60


def kernel_unavailable_reason() -> str | None:
    """Why kernel tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "kernel tests need root"
    if not os.path.exists("/dev/mapper/control"):
        return "kernel tests need device-mapper (/dev/mapper/control is missing)"
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "allow_leftovers(reason): the test may leave dm/loop devices behind "
        "(tests/kernel/conftest.py does not fail it for that)",
    )
    config.addinivalue_line(
        "markers", "time_limit(seconds): this test's time limit (default DMSNAP_TEST_TIMEOUT)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    misplaced = []
    for item in items:
        if KERNEL_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.kernel)
        elif item.get_closest_marker("kernel") is not None:
            misplaced.append(item.nodeid)
    if misplaced:
        # The VM session collects tests/kernel only; a kernel test elsewhere
        # would be deselected on the host and never run at all.
        where = ", ".join(misplaced)
        raise pytest.UsageError(f"kernel tests must live under tests/kernel: {where}")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is None:
        return
    reason = kernel_unavailable_reason()
    if reason is None:
        return
    howto = "run them with `make test-kernel` (tools/vm)"
    if os.environ.get("DMSNAP_REQUIRE_KERNEL") == "1":
        pytest.fail(f"DMSNAP_REQUIRE_KERNEL=1 but {reason}", pytrace=False)
    pytest.skip(f"{reason}; {howto}")


def _time_limit(item: pytest.Item) -> int:
    marker = item.get_closest_marker("time_limit")
    if marker is not None and marker.args:
        return int(marker.args[0])
    return int(os.environ.get("DMSNAP_TEST_TIMEOUT", DEFAULT_TIME_LIMIT))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    limit = _time_limit(item)
    if limit <= 0 or threading.current_thread() is not threading.main_thread():
        return (yield)

    def on_alarm(signum: int, frame: object) -> None:
        sys.stderr.write(f"\n*** {item.nodeid}: time limit of {limit}s exceeded; stacks:\n")
        faulthandler.dump_traceback(all_threads=True)
        pytest.fail(
            f"time limit of {limit}s exceeded (DMSNAP_TEST_TIMEOUT / time_limit marker)",
            pytrace=True,
        )

    done = threading.Event()

    def watchdog() -> None:
        # The alarm only interrupts Python code; a thread stuck in the
        # kernel (D state) never gets back to it. End the session instead.
        if done.wait(limit + WATCHDOG_GRACE):
            return
        # pytest is capturing fd 2 into a file that os._exit would discard.
        capman = item.config.pluginmanager.getplugin("capturemanager")
        if capman is not None:
            capman.suspend_global_capture(in_=False)
        err = sys.__stderr__
        err.write(
            f"\n*** {item.nodeid}: still running {WATCHDOG_GRACE}s after its {limit}s "
            "time limit; stacks follow, then the test session is aborted\n"
        )
        err.flush()
        faulthandler.dump_traceback(file=err, all_threads=True)
        os._exit(3)

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(limit)
    threading.Thread(target=watchdog, name="test-watchdog", daemon=True).start()
    try:
        return (yield)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        done.set()
