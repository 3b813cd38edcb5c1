"""The kernel-test harness itself: what tools/vm-guest-init promises.

If one of these fails, every other kernel test result is suspect.
"""

from __future__ import annotations

import os
import subprocess

import pytest

CONFIGFS = "/sys/kernel/config"

# Kernel modules (as named in /sys/module) the test suite relies on.
MODULES = [
    "loop",
    "dm_mod",
    "dm_snapshot",
    "dm_thin_pool",
    "dm_writecache",
    "dm_log_writes",
    "dm_flakey",
    "target_core_mod",
    "target_core_user",
    "tcm_loop",
    "iscsi_target_mod",
]

# dm targets those modules register, as the kernel reports them to dmsetup.
DM_TARGETS = [
    "linear",
    "snapshot",
    "snapshot-origin",
    "snapshot-merge",
    "thin-pool",
    "thin",
    "writecache",
    "log-writes",
    "flakey",
]

IFF_UP = 0x1


def test_runs_as_root() -> None:
    assert os.geteuid() == 0


def test_device_mapper_control_node() -> None:
    assert os.path.exists("/dev/mapper/control")
    # dmsetup (an independent witness) can talk to the kernel driver.
    out = subprocess.run(["dmsetup", "version"], capture_output=True, text=True, check=True).stdout
    assert "Driver version" in out


@pytest.mark.parametrize("module", MODULES)
def test_module_loaded(module: str) -> None:
    assert os.path.isdir(f"/sys/module/{module}"), f"module {module} not loaded"


def test_dm_targets_registered() -> None:
    out = subprocess.run(["dmsetup", "targets"], capture_output=True, text=True, check=True).stdout
    have = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert set(DM_TARGETS) <= have, f"missing dm targets: {sorted(set(DM_TARGETS) - have)}"


def test_configfs_mounted_with_lio_dbroot() -> None:
    with open("/proc/mounts") as f:
        mounts = [line.split() for line in f]
    assert any(m[1] == CONFIGFS and m[2] == "configfs" for m in mounts), "configfs not mounted"
    with open(f"{CONFIGFS}/target/dbroot") as f:
        dbroot = f.read().strip()
    assert dbroot, "LIO dbroot is empty"
    assert os.path.isdir(dbroot), f"LIO dbroot {dbroot} is not an existing directory"


def test_loopback_interface_up() -> None:
    with open("/sys/class/net/lo/flags") as f:
        flags = int(f.read().strip(), 16)
    assert flags & IFF_UP, "lo is down"


def test_loop_control_available() -> None:
    # New loop devices are allocated through /dev/loop-control.
    assert os.path.exists("/dev/loop-control")
