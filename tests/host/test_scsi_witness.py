"""sg3-utils as independent witnesses of the emulator's answers.

Two ways in: the decoders that read bytes from a file (``sg_inq``/``sg_vpd
--inhex --raw``, ``sg_decode_sense``), and a fake SG_IO device (an LD_PRELOAD
shim, see test_scsi_support) through which the tools that only talk to a
device (``sg_readcap``, ``sg_modes``, ``sg_opcodes``, ``sg_turs``,
``sg_requests``, ``sg_unmap``, ``sg_write_same``, ``sg_verify``,
``sg_write_verify``, ``sg_sync``, ``sg_start``, ``sg_raw``) send their own
CDBs and parameter lists and decode our answers. The sg_raw example of
docs/scsi-snapshot-command.md is run verbatim.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_scsi_support import (
    BS,
    FakeLun,
    FakeSgDevice,
    FakeSnapshots,
    build_shim,
    emulator,
    inquiry,
)

from dmsnap.scsi import sense as S
from dmsnap.scsi import snapcmd as SC
from dmsnap.scsi.emulation import Emulator
from dmsnap.scsi.sense import FieldPointer, Key, Sense

DOC = Path(__file__).resolve().parents[2] / "docs" / "scsi-snapshot-command.md"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} (sg3-utils) is not installed")
    return path


def run(*argv: str, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    need(argv[0])
    p = subprocess.run(argv, capture_output=True, input=input, timeout=60, check=False)
    return subprocess.CompletedProcess(
        p.args, p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    )


def inhex(tool: str, data: bytes, tmp_path: Path, *args: str) -> str:
    f = tmp_path / "resp.bin"
    f.write_bytes(data)
    p = run(tool, "--raw", f"--inhex={f}", *args)
    assert p.returncode == 0, p.stderr
    return p.stdout


# -- decoders reading our bytes -------------------------------------------------------------


def test_sg_inq_decodes_standard_inquiry(tmp_path):
    out = inhex("sg_inq", emulator().execute(inquiry()).data, tmp_path, "--descriptors")
    assert "PQual=0" in out and "PDT=0" in out
    assert "version=0x06  [SPC-4]" in out
    assert "Resp_data_format=2" in out and "CmdQue=1" in out and "RMB=0" in out
    assert "Vendor identification: DMSNAP" in out
    assert "Product identification: dmsnap volume" in out
    assert "Product revision level: 0001" in out
    for std in ("SAM-5", "SPC-4", "SBC-3"):
        assert std in out


def vpd(tmp_path: Path, page: int, lun: FakeLun | None = None) -> str:
    data = emulator(lun).execute(inquiry(page)).data
    return inhex("sg_vpd", data, tmp_path)


def test_sg_vpd_decodes_every_page(tmp_path):
    out = vpd(tmp_path, 0x00)
    for name in ("Unit serial number", "Device identification", "Block limits",
                 "Block device characteristics", "Logical block provisioning"):  # fmt: skip
        assert name in out
    assert "Unit serial number: dmsnap-0123456789abcdef" in vpd(tmp_path, 0x80)
    lun = FakeLun()
    out = vpd(tmp_path, 0x83, lun)
    assert "Addressed logical unit" in out
    assert "designator type: NAA,  code set: Binary" in out
    assert "0x" + lun.naa.hex() in out
    assert "T10 vendor identification" in out and "vendor id: DMSNAP" in out
    out = vpd(tmp_path, 0xB0)
    assert "Write same non-zero (WSNZ): 1" in out
    assert "Maximum transfer length: 16384 blocks" in out
    assert "Optimal transfer length granularity: 8 blocks" in out
    assert "Maximum unmap LBA count: 2097152" in out
    assert "Maximum unmap block descriptor count: 256" in out
    assert "Optimal unmap granularity: 128 blocks" in out
    assert "Unmap granularity alignment valid: true" in out
    assert "Maximum write same length: 0x8000 blocks" in out
    assert "Non-rotating medium" in vpd(tmp_path, 0xB1)
    out = vpd(tmp_path, 0xB2)
    assert "(LBPU): 1" in out and "(LBPWS): 1" in out and "(LBPWS10): 1" in out
    assert "(LBPRZ): 1" in out and "(ANC_SUP): 0" in out
    assert "Provisioning type: 2 (thin provisioned)" in out


def decode_sense(sense: bytes) -> str:
    p = run("sg_decode_sense", *(f"{b:02x}" for b in sense))
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.mark.parametrize("descriptor", [False, True])
def test_sg_decode_sense_reads_our_field_pointers(descriptor):
    s = Sense.of(Key.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB, field=FieldPointer(2, 5))
    out = decode_sense(s.encode(descriptor))
    assert ("Descriptor format" if descriptor else "Fixed format") in out
    assert "Illegal Request" in out and "Invalid field in cdb" in out
    assert re.search(r"Field replaceable unit|Error in Command: byte 2 bit 5", out)
    assert "byte 2 bit 5" in out
    s = Sense.of(
        Key.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_PARAMETER_LIST, field=FieldPointer(25, cdb=False)
    )
    assert "Error in Data parameters: byte 25" in decode_sense(s.encode(descriptor))
    s = Sense.of(Key.MISCOMPARE, S.MISCOMPARE_DURING_VERIFY, information=0x207)
    out = decode_sense(s.encode(descriptor))
    assert "Miscompare during verify operation" in out
    assert re.search(r"(Information: |Info fld=)0x0*207\b", out)
    s = Sense(Key.MEDIUM_ERROR, 0x0C, 0x00, deferred=True)
    assert "deferred" in decode_sense(s.encode(descriptor)).lower()


def test_our_asc_names_agree_with_sg3_utils():
    for (asc, ascq), name in S.ASC_NAMES.items():
        if (asc, ascq) == S.NO_ADDITIONAL_SENSE:
            continue
        out = decode_sense(Sense(Key.ILLEGAL_REQUEST, asc, ascq).encode())
        line = next(ln for ln in out.splitlines() if "Additional sense" in ln)
        assert line.split(":", 1)[1].strip().lower() == name.lower(), (hex(asc), hex(ascq))


# -- tools talking to a (fake) device -------------------------------------------------------


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> Path:
    need("sg_raw")
    so = build_shim(tmp_path_factory.mktemp("shim"))
    if so is None:
        pytest.skip("no C compiler for the SG_IO shim")
    return so


@pytest.fixture
def device(shim, tmp_path) -> Iterator[FakeSgDevice]:
    dev = FakeSgDevice(emulator(FakeLun(), FakeSnapshots()), shim, tmp_path)
    yield dev
    dev.close()


def make_device(shim: Path, tmp_path: Path, emu: Emulator) -> FakeSgDevice:
    return FakeSgDevice(emu, shim, tmp_path)


def ok(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 0, (p.args, p.stdout, p.stderr)
    return p.stdout


def test_sg_turs_inq_requests(device):
    ok(device.run("sg_turs", "DEV"))
    assert "Vendor identification: DMSNAP" in ok(device.run("sg_inq", "DEV"))
    p = device.run("sg_requests", "DEV")
    out = ok(p) + p.stderr
    assert "Fixed format" in out and "No Sense" in out
    p = device.run("sg_requests", "--desc", "DEV")
    out = ok(p) + p.stderr
    assert "Descriptor format" in out and "No Sense" in out
    assert "Block limits" in ok(device.run("sg_vpd", "--page=bl", "DEV"))


def test_sg_readcap(device, shim, tmp_path):
    out = ok(device.run("sg_readcap", "DEV"))
    blocks = FakeLun().size // BS
    assert f"Last LBA={blocks - 1} " in out and "Logical block length=512 bytes" in out
    out = ok(device.run("sg_readcap", "--long", "DEV"))
    assert "lbpme=1, lbprz=1" in out and "prot_en=0" in out
    assert "Logical blocks per physical block exponent=0" in out


def test_sg_readcap_switches_to_16_for_a_huge_lun(shim, tmp_path):
    class Huge(FakeLun):
        def __post_init__(self) -> None:
            self.buf = bytearray(0)

    blocks = (1 << 33) + 5  # 4 TiB + 5 blocks
    dev = make_device(shim, tmp_path, emulator(Huge(size=blocks * BS)))
    try:
        out = ok(dev.run("sg_readcap", "DEV"))
        assert f"Last LBA={blocks - 1} " in out
        assert any(c[:1] == bytes((0x9E,)) for c, _ in dev.log)  # it had to ask RC16
    finally:
        dev.close()


def test_sg_modes(device, shim, tmp_path):
    out = ok(device.run("sg_modes", "--all", "DEV"))
    assert "WP=0, DpoFua=1" in out and "Block descriptor length=8" in out
    assert ">> Caching, page_control: current" in out and ">> Control, page_control: current" in out
    assert "08 12 04 00" in out  # caching page, WCE=1
    out = ok(device.run("sg_modes", "--six", "--page=ca", "DEV"))
    assert "MODE SENSE(6)" in out and "08 12 04" in out
    out = ok(device.run("sg_modes", "--control=1", "--page=co", "DEV"))
    assert "0a 0a 04 00 00 00" in out  # changeable: D_SENSE only
    p = device.run("sg_modes", "--verbose", "--control=3", "--page=ca", "DEV")
    assert p.returncode == 5
    assert "Saving parameters not supported" in p.stderr and "byte 2 bit 7" in p.stderr
    (tmp_path / "ro").mkdir()
    ro = make_device(shim, tmp_path / "ro", emulator(FakeLun(read_only=True, wce=False)))
    try:
        out = ok(ro.run("sg_modes", "--page=ca", "DEV"))
        assert "WP=1" in out and "08 12 00" in out
    finally:
        ro.close()


def test_sg_opcodes(device):
    out = ok(device.run("sg_opcodes", "DEV"))
    for name in ("Read capacity(16)", "Report supported operation codes", "Write same(16)",
                 "Unmap", "Synchronize cache(10)", "Verify(16)", "Mode select(10)"):  # fmt: skip
        assert name in out
    assert re.search(r"^ c0\s+1\s+10 ", out, re.M) and re.search(r"^ c0\s+3\s+10 ", out, re.M)
    assert re.search(r"^ c0\s+4\s+10 ", out, re.M)  # DELETE
    out = ok(device.run("sg_opcodes", "--opcode=0x28", "DEV"))
    assert "Command is supported [conforming to SCSI standard]" in out
    assert "Usage data: 28 f8 ff ff ff ff 00 ff ff 04" in out
    out = ok(device.run("sg_opcodes", "--opcode=0xc0", "--sa=1", "DEV"))
    assert "supported [in a vendor specific manner]" in out
    out = ok(device.run("sg_opcodes", "--opcode=0x4d", "DEV"))
    assert "Command is NOT supported" in out
    out = ok(device.run("sg_opcodes", "--rctd", "DEV"))
    assert "timeout" in out.lower()


def test_third_party_encoded_commands(device, tmp_path):
    lun: FakeLun = device.emu.lun  # type: ignore[assignment]
    lun.buf[:] = bytes([0xAB]) * lun.size
    ok(device.run("sg_unmap", "--force", "--lba=64", "--num=16", "DEV"))
    assert ("unmap", 64 * BS, 16 * BS) in lun.calls
    blk = tmp_path / "blk.bin"
    blk.write_bytes(bytes([0x5A]) * BS)
    ok(device.run("sg_write_same", f"--in={blk}", "--lba=100", "--num=4", "DEV"))
    assert lun.buf[100 * BS : 104 * BS] == bytes([0x5A]) * (4 * BS)
    ok(device.run("sg_write_same", "--16", "--unmap", "--lba=200", "--num=8", "--ff", "DEV"))
    assert lun.buf[200 * BS : 208 * BS] == bytes([0xFF]) * (8 * BS)  # not zeros: written
    ok(device.run("sg_write_same", "--16", "--unmap", "--lba=300", "--num=8", "--in=/dev/zero",
                  "DEV"))  # fmt: skip
    assert ("unmap", 300 * BS, 8 * BS) in lun.calls
    two = tmp_path / "two.bin"
    two.write_bytes(bytes(range(256)) * 4)
    ok(device.run("sg_write_verify", f"--in={two}", "--lba=10", "--num=2", "--bytchk=1", "DEV"))
    assert ("write", 10 * BS, 2 * BS, True) in lun.calls
    ok(device.run("sg_verify", "--lba=10", "--count=2", "--ndo=1024", f"--in={two}", "DEV"))
    assert ok(device.run("sg_verify", "--lba=10", "--count=2", "DEV")) == ""
    p = device.run("sg_verify", "--lba=100", "--count=2", "--ndo=1024", f"--in={two}", "DEV")
    assert p.returncode != 0 and "miscompare" in (p.stdout + p.stderr).lower()
    ok(device.run("sg_sync", "DEV"))
    ok(device.run("sg_sync", "--16", "--lba=5", "--count=5", "DEV"))
    assert ("flush",) in lun.calls
    ok(device.run("sg_start", "--start", "DEV"))
    ok(device.run("sg_start", "--stop", "DEV"))
    p = device.run("sg_start", "--eject", "DEV")
    assert p.returncode == 5  # illegal request: not a removable medium
    p = device.run("sg_unmap", "--force", f"--lba={lun.size // BS}", "--num=1", "DEV")
    assert p.returncode != 0 and "out of range" in (p.stdout + p.stderr).lower()


def test_unsupported_commands_are_answered_not_timed_out(device):
    p = device.run("sg_senddiag", "--selftest=1", "DEV")
    assert p.returncode == 9  # sg3-utils: invalid opcode
    assert "Invalid opcode" in p.stderr
    for op in ("c1", "ff"):
        p = device.run("sg_raw", "DEV", op, *(["00"] * 9))
        assert p.returncode == 9 and "Invalid command operation code" in p.stderr


def test_the_documented_sg_raw_one_liners(device, tmp_path):
    text = DOC.read_text()
    block = text.split("## Sending it with sg_raw", 1)[1].split("```sh\n", 1)[1].split("```")[0]
    script = block.replace("/dev/sdX", device.dev)
    p = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=device.env(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0, p.stderr.decode()
    snaps: FakeSnapshots = device.emu.snapshots  # type: ignore[assignment]
    token = (tmp_path / "token.bin").read_bytes()
    assert snaps.created == [SC.CreateRequest(token, "nightly", {"op": "sync"}, wait=True)]
    status = SC.decode_entries((tmp_path / "status.bin").read_bytes())
    assert [e.token for e in status.entries] == [token]
    assert status.entries[0].state is SC.State.DONE
    listed = SC.decode_entries((tmp_path / "list.bin").read_bytes())
    assert [e.name for e in listed.entries] == ["nightly"]
    assert snaps.deleted == [token]  # the DELETE at the end
    (gone,) = snaps.status(None, token[-4:])
    assert gone.state is SC.State.DELETED
    delete = "{" + script.split("# DELETE", 1)[1].split("{", 1)[1]
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", delete], cwd=tmp_path,
                       env=device.env(), capture_output=True, timeout=60, check=False)  # fmt: skip
    assert p.returncode == 0, p.stderr.decode()  # sent again: still GOOD
    assert snaps.deleted == [token]
    # the same CREATE again (same token.bin): a retry creates nothing new
    create = script.split("# STATUS")[0]
    create = create.replace("head -c 16 /dev/urandom > token.bin; ", "")
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", create], cwd=tmp_path,
                       env=device.env(), capture_output=True, timeout=60, check=False)  # fmt: skip
    assert p.returncode == 0, p.stderr.decode()
    assert len(snaps.created) == 1


def test_sg_raw_shows_refusals(shim, tmp_path):
    dev = make_device(
        shim, tmp_path, Emulator(FakeLun(), FakeSnapshots(), snapshot_allowed=lambda _i: False)
    )
    try:
        p = dev.run("sg_raw", "-r", "64", "DEV", *SC.list_cdb(64).hex(" ").split())
        assert p.returncode == 5
        assert "Access denied - no access rights" in p.stderr
        snaps = FakeSnapshots()
        dev.emu = Emulator(FakeLun(), snaps, snapshot_allowed=lambda _i: True)
        snaps.raise_next = SC.SnapshotError(SC.ErrorKind.IN_PROGRESS, marker=12)
        cdb, params = SC.create_command(SC.CreateRequest(SC.new_token(), "x", wait=True))
        f = tmp_path / "p.bin"
        f.write_bytes(params)
        p = dev.run("sg_raw", "-s", str(len(params)), "-i", str(f), "DEV", *cdb.hex(" ").split())
        assert p.returncode == 2  # not ready
        assert "operation in progress" in p.stderr.lower()
        tok = SC.new_token()
        snaps.create(None, SC.CreateRequest(tok, "ro", wait=True))
        dev.emu = emulator(FakeLun(read_only=True, wce=False), snaps)
        cdb, params = SC.delete_command(tok)
        f.write_bytes(params)
        p = dev.run("sg_raw", "-s", str(len(params)), "-i", str(f), "DEV", *cdb.hex(" ").split())
        assert p.returncode == 7  # data protect
        assert "Write protected" in p.stderr and snaps.deleted == []
        dev.emu = emulator(FakeLun(), snaps)
        snaps.in_use.add("ro")
        p = dev.run("sg_raw", "-s", str(len(params)), "-i", str(f), "DEV", *cdb.hex(" ").split())
        assert p.returncode == 5 and "Command sequence error" in p.stderr
    finally:
        dev.close()
