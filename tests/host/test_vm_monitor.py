"""tools/vm-monitor: the parsing under its wedge sampler and its profiler,
against QEMU's monitor output format (x86 register dump, ``x /Ngx``)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import socket
import types
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "vm-monitor"

DUMP = """info registers -a
CPU#0
RAX=0000000000000000 RBX=ffffffff82a13940 RCX=0000000000000000 RDX=0000000000000001
RSI=0000000000000083 RDI=000000000003b0f4 RBP=ffffffff82a13940 RSP=ffffc90000003e80
RIP=ffffffff81a6d6fb RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
CPU#1
RAX=0000000000000001 RBX=0000000000000002 RCX=0000000000000003 RDX=0000000000000004
RSI=0000000000000005 RDI=0000000000000006 RBP=00007ffd5c1e0000 RSP=00007ffd5c1dff00
RIP=0000556a1b2c3d4e RFL=00000202 [-------] CPL=3 II=0 A20=1 SMM=0 HLT=0
(qemu) """


@pytest.fixture(scope="module")
def vmmon() -> types.ModuleType:  # a script without .py, loaded as a module
    loader = importlib.machinery.SourceFileLoader("vm_monitor", str(TOOL))
    spec = importlib.util.spec_from_loader("vm_monitor", loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def answered(reply: str) -> tuple[socket.socket, socket.socket]:
    """A socket whose peer has already sent reply (the monitor's answer)."""
    ours, theirs = socket.socketpair()
    ours.settimeout(0.5)
    theirs.sendall(reply.encode())
    return ours, theirs


def test_registers_per_cpu_with_halt_and_stack_pointer(vmmon: types.ModuleType) -> None:
    ours, theirs = answered(DUMP)
    with ours, theirs:
        regs = vmmon.registers(ours)
        assert theirs.recv(100) == b"info registers -a\n"
    assert regs == [
        (0, 0xFFFFFFFF81A6D6FB, 0x246, True, 0xFFFFC90000003E80),
        (1, 0x0000556A1B2C3D4E, 0x202, False, 0x00007FFD5C1DFF00),
    ]


def test_monitor_gone_is_reported_not_sampled_as_empty(vmmon: types.ModuleType) -> None:
    ours, theirs = socket.socketpair()
    theirs.close()
    with ours, pytest.raises((EOFError, OSError)):
        vmmon.registers(ours)


def test_stack_scan_names_callers_outward(vmmon: types.ModuleType, tmp_path: Path) -> None:
    syms = tmp_path / "kallsyms"
    syms.write_text(
        "ffffffff81000000 T _stext\n"
        "ffffffff81100000 T native_queued_spin_lock_slowpath\n"
        "ffffffff81100100 T _raw_spin_lock_irqsave\n"
        "ffffffff81200000 T try_to_wake_up\n"
        "ffffffff81300000 T __queue_work\n"
        "ffffffff81400000 T tcmu_handle_completions [target_core_user]\n"
        "ffffffff81500000 T vfs_write\n"
    )
    addrs, names = vmmon.load_syms(str(syms))
    out = (
        "ffffc90000003e80: 0xffffffff81100010 0x0000000000000010\n"
        "ffffc90000003e90: 0xffffffff81100140 0xffffffff81200040\n"
        "ffffc90000003ea0: 0xffff888003a1c000 0xffffffff81300020\n"
        "ffffc90000003eb0: 0xffffffff81200050 0xffffffff81400010\n"
        "ffffc90000003ec0: 0xffffffff81500010 0x0000000000000000\n"
        "(qemu) "
    )
    ours, theirs = answered(out)
    with ours, theirs:
        words = vmmon.stack_words(ours, 0xFFFFC90000003E80, 10)
    assert len(words) == 10
    chain = vmmon.callers(addrs, names, words, "native_queued_spin_lock_slowpath")
    # the function itself, lock wrappers, repeats and data words are skipped
    assert chain == "try_to_wake_up < __queue_work < tcmu_handle_completions < vfs_write"


@pytest.mark.parametrize(
    ("fn", "want"),
    [
        ("try_to_wake_up", "scheduler, wake-ups"),
        ("native_queued_spin_lock_slowpath", "futex, locks"),
        ("tcmu_handle_completions", "LIO (iSCSI target, target core, TCMU)"),
        ("iscsit_xmit_pdu", "LIO (iSCSI target, target core, TCMU)"),
        ("thin_endio", "dm / dm-thin"),
        ("blk_mq_submit_bio", "block layer, SCSI"),
        ("tcp_sendmsg_locked", "TCP, network"),
        ("read_hpet", "clock reads"),
        ("xas_load", "other kernel functions"),
    ],
)
def test_profile_layers(vmmon: types.ModuleType, fn: str, want: str) -> None:
    assert vmmon.layer(fn) == want
