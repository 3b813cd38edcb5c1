"""Known-answer tests of the SPC/SBC emulator, field by field (SPC-4, SBC-3)."""

from __future__ import annotations

import errno

import pytest
from test_scsi_support import (
    BS,
    FakeLun,
    FakeSnapshots,
    emulator,
    inquiry,
    mode_select6,
    mode_select10,
    mode_sense6,
    mode_sense10,
    read_capacity16,
    rsoc,
    rw6,
    rw10,
    rw12,
    rw16,
    sense_of,
    unmap_cdb,
    unmap_params,
)

from dmsnap.scsi import sense as S
from dmsnap.scsi.emulation import Emulator, Limits, naa_from_serial
from dmsnap.scsi.sense import FieldPointer, Key, Sense

ILLEGAL = Key.ILLEGAL_REQUEST
INVALID_CDB = (ILLEGAL, 0x24, 0x00)
INVALID_PARAM = (ILLEGAL, 0x26, 0x00)
PLL_ERROR = (ILLEGAL, 0x1A, 0x00)
LBA_OOB = (ILLEGAL, 0x21, 0x00)
BAD_OPCODE = (ILLEGAL, 0x20, 0x00)
BAD_IU = (ILLEGAL, 0x0E, 0x03)
WRITE_PROTECTED = (Key.DATA_PROTECT, 0x27, 0x00)
MISCOMPARE = (Key.MISCOMPARE, 0x1D, 0x00)

BLOCKS = FakeLun().size // BS


def field(r) -> FieldPointer | None:
    s = r.decoded_sense()
    assert s is not None
    return s.field


class CapLun:
    """A LUN with only a size (for capacity reporting of huge LUNs)."""

    block_size = BS
    wce = False
    read_only = False
    serial = "cap"
    naa = b""

    def __init__(self, size: int) -> None:
        self.size = size


def cap_emulator(size: int) -> Emulator:
    return Emulator(CapLun(size), None, snapshot_allowed=lambda _i: False)  # type: ignore[arg-type]


# -- INQUIRY ------------------------------------------------------------------------------


def test_standard_inquiry_fields():
    r = emulator().execute(inquiry(alloc=255))
    d = r.data
    assert r.status == S.GOOD and not r.sense
    assert len(d) == 96
    assert d[0] == 0x00  # peripheral qualifier 000b, device type 0 (disk)
    assert d[1] & 0x80 == 0  # not removable
    assert d[2] == 0x06  # SPC-4
    assert d[3] & 0x0F == 2  # response data format 2
    assert d[4] == 91  # additional length = 96 - 5
    assert d[7] & 0x02  # CMDQUE
    assert d[8:16] == b"DMSNAP  "
    assert d[16:32] == b"dmsnap volume   "
    assert d[32:36] == b"0001"
    assert [int.from_bytes(d[i : i + 2], "big") for i in range(58, 64, 2)] == [
        0x00A0,
        0x0460,
        0x04C0,
    ]


def test_inquiry_allocation_length_truncates_but_keeps_additional_length():
    r = emulator().execute(inquiry(alloc=5))
    assert r.data == bytes((0, 0, 6, 2, 91))
    assert emulator().execute(inquiry(alloc=0)).data == b""
    assert len(emulator().execute(inquiry(alloc=255), data_in_len=36).data) == 36


def test_inquiry_page_code_without_evpd_and_cmddt_are_invalid_fields():
    r = emulator().execute(bytes((0x12, 0, 0x80, 0, 255, 0)))
    assert sense_of(r) == INVALID_CDB
    assert field(r) == FieldPointer(2, 7, cdb=True)
    r = emulator().execute(bytes((0x12, 0x02, 0, 0, 255, 0)))
    assert sense_of(r) == INVALID_CDB and field(r) == FieldPointer(1, 1)


def test_vpd_supported_pages_and_serial():
    e = emulator()
    d = e.execute(inquiry(0x00)).data
    assert d[:4] == bytes((0, 0, 0, 6)) and list(d[4:]) == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    d = e.execute(inquiry(0x80)).data
    assert d[1] == 0x80 and d[4:] == b"dmsnap-0123456789abcdef"
    assert int.from_bytes(d[2:4], "big") == len(d) - 4


def test_vpd_device_identification_naa_and_t10_designators():
    lun = FakeLun()
    d = emulator(lun).execute(inquiry(0x83)).data
    assert d[1] == 0x83 and int.from_bytes(d[2:4], "big") == len(d) - 4
    des = d[4:]
    # NAA: protocol 0 / code set 1 (binary); PIV 0, association 00 (LU), type 3 (NAA)
    assert des[0] == 0x01 and des[1] == 0x03 and des[3] == 16
    assert des[4:20] == lun.naa and des[4] >> 4 == 6
    t10 = des[20:]
    assert t10[0] == 0x02 and t10[1] == 0x01  # ASCII, T10 vendor id
    assert t10[4 : 4 + t10[3]] == b"DMSNAP  dmsnap-0123456789abcdef"


def test_vpd_83_is_stable_and_falls_back_to_a_serial_derived_naa():
    lun = FakeLun(naa=b"\x12\x34")  # not a valid NAA designator
    d1 = emulator(lun).execute(inquiry(0x83)).data
    d2 = emulator(lun).execute(inquiry(0x83)).data
    assert d1 == d2
    assert d1[8:24] == naa_from_serial(lun.serial)


def test_naa_from_serial_follows_the_lio_derivation():
    naa = naa_from_serial("3a1b-c0ff-ee")
    # NAA 6, company id 0x001405, then the serial's hex digits 3 a 1 b c 0 f f e e as nibbles
    assert naa.hex() == "6001405" + "3a1bc0ffee" + "0" * 15
    assert len(naa_from_serial("f" * 64)) == 16
    assert naa_from_serial("f" * 64).hex() == "6001405" + "f" * 25


def test_vpd_block_limits():
    d = emulator(limits=Limits()).execute(inquiry(0xB0)).data
    assert d[1] == 0xB0 and int.from_bytes(d[2:4], "big") == 0x3C and len(d) == 64
    be = lambda a, n: int.from_bytes(d[a : a + n], "big")  # noqa: E731
    assert d[4] & 0x01  # WSNZ
    assert be(6, 2) == 8  # optimal transfer length granularity (4 KiB)
    assert be(8, 4) == 8 * 1024 * 1024 // BS  # max transfer length
    assert be(20, 4) == 1024**3 // BS  # max unmap LBA count
    assert be(24, 4) == 256  # max unmap block descriptor count
    assert be(28, 4) == 128  # optimal unmap granularity (64 KiB)
    assert be(32, 4) == 0x80000000  # UGAVALID, alignment 0
    assert be(36, 8) == 16 * 1024 * 1024 // BS  # max write same length


def test_vpd_block_characteristics_and_provisioning():
    e = emulator()
    d = e.execute(inquiry(0xB1)).data
    assert d[1] == 0xB1 and int.from_bytes(d[2:4], "big") == 0x3C
    assert int.from_bytes(d[4:6], "big") == 1  # non-rotating
    d = e.execute(inquiry(0xB2)).data
    assert d[1] == 0xB2 and int.from_bytes(d[2:4], "big") == 4
    assert d[5] & 0x80 and d[5] & 0x40 and d[5] & 0x20  # LBPU, LBPWS, LBPWS10
    assert (d[5] >> 2) & 0x7 == 1  # LBPRZ
    assert d[5] & 0x03 == 0  # no ANC_SUP, no provisioning group descriptor
    assert d[6] & 0x07 == 2  # thin provisioned


def test_unknown_vpd_page():
    r = emulator().execute(inquiry(0x89))
    assert sense_of(r) == INVALID_CDB and field(r) == FieldPointer(2, 7)


# -- READ CAPACITY ------------------------------------------------------------------------


def test_read_capacity_10():
    r = emulator().execute(bytes((0x25,)) + bytes(9))
    assert r.data == (BLOCKS - 1).to_bytes(4, "big") + BS.to_bytes(4, "big")


@pytest.mark.parametrize(
    ("blocks", "reported"),
    [(0xFFFFFFFF, 0xFFFFFFFE), (0x100000000, 0xFFFFFFFF), (0x300000000, 0xFFFFFFFF)],
)
def test_read_capacity_10_caps_large_luns(blocks, reported):
    r = cap_emulator(blocks * BS).execute(bytes((0x25,)) + bytes(9))
    assert int.from_bytes(r.data[:4], "big") == reported
    r16 = cap_emulator(blocks * BS).execute(read_capacity16())
    assert int.from_bytes(r16.data[:8], "big") == blocks - 1


def test_read_capacity_10_lba_without_pmi_is_invalid():
    r = emulator().execute(bytes((0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0)))
    assert sense_of(r) == INVALID_CDB and field(r) == FieldPointer(2, 7)
    assert emulator().execute(bytes((0x25, 0, 0, 0, 0, 1, 0, 0, 1, 0))).ok


def test_read_capacity_16():
    d = emulator().execute(read_capacity16()).data
    assert len(d) == 32
    assert int.from_bytes(d[0:8], "big") == BLOCKS - 1
    assert int.from_bytes(d[8:12], "big") == BS
    assert d[12] == 0  # no protection
    assert d[13] == 0  # 1 logical block per physical block
    assert d[14] & 0x80 and d[14] & 0x40  # LBPME, LBPRZ
    assert d[14] & 0x3F == 0 and d[15] == 0  # lowest aligned LBA 0
    assert emulator().execute(read_capacity16(alloc=12)).data == d[:12]


def test_service_action_in_other_than_read_capacity_16():
    cdb = bytearray(read_capacity16())
    cdb[1] = 0x12  # GET LBA STATUS: not supported
    r = emulator().execute(bytes(cdb))
    assert sense_of(r) == INVALID_CDB and field(r) == FieldPointer(1, 4)


# -- MODE SENSE / MODE SELECT -------------------------------------------------------------


@pytest.mark.parametrize("wce", [True, False])
def test_mode_sense_6_caching_page(wce):
    r = emulator(FakeLun(wce=wce)).execute(mode_sense6(0x08))
    d = r.data
    assert d[0] == len(d) - 1  # mode data length
    assert d[1] == 0  # medium type
    assert d[2] == 0x10  # WP 0, DPOFUA 1
    assert d[3] == 8  # block descriptor length
    assert int.from_bytes(d[4:8], "big") == BLOCKS and int.from_bytes(d[9:12], "big") == BS
    page = d[12:]
    assert page[0] == 0x08 and page[1] == 0x12 and len(page) == 20
    assert bool(page[2] & 0x04) == wce  # WCE
    assert page[2] & 0x01 == 0  # RCD 0: read cache on


def test_mode_sense_dbd_and_all_pages_and_control():
    d = emulator().execute(mode_sense6(0x3F, dbd=True)).data
    assert d[3] == 0
    assert d[4] == 0x08 and d[4 + 20] == 0x0A  # ascending page codes
    ctl = d[24:]
    assert ctl[1] == 0x0A and len(ctl) == 12
    assert ctl[2] & 0x04 == 0  # D_SENSE off by default
    assert ctl[3] >> 4 == 1  # QAM: unrestricted reordering
    assert d[0] == len(d) - 1


def test_mode_sense_changeable_default_saved():
    e = emulator()
    d = e.execute(mode_sense6(0x3F, pc=1, dbd=True)).data
    cach, ctl = d[4:24], d[24:36]
    assert cach[:2] == b"\x08\x12" and not any(cach[2:])  # WCE not changeable
    assert ctl[:2] == b"\x0a\x0a" and ctl[2] == 0x04 and not any(ctl[3:])  # only D_SENSE
    dflt = e.execute(mode_sense6(0x0A, pc=2, dbd=True)).data
    assert dflt[4:] == e.execute(mode_sense6(0x0A, pc=0, dbd=True)).data[4:]
    r = e.execute(mode_sense6(0x08, pc=3))
    assert sense_of(r) == (ILLEGAL, 0x39, 0x00)


def test_mode_sense_bad_page_and_subpage():
    r = emulator().execute(mode_sense6(0x01))
    assert sense_of(r) == INVALID_CDB and field(r) == FieldPointer(2, 5)
    r = emulator().execute(mode_sense6(0x08, sub=0x01))
    assert sense_of(r) == INVALID_CDB and field(r) == FieldPointer(3, 7)
    assert emulator().execute(mode_sense6(0x3F, sub=0xFF)).ok


def test_mode_sense_write_protect_bit_for_read_only_luns():
    d = emulator(FakeLun(read_only=True)).execute(mode_sense6(0x08)).data
    assert d[2] & 0x80
    d = emulator(FakeLun(read_only=True)).execute(mode_sense10(0x08)).data
    assert d[3] & 0x80


def test_mode_sense_10_short_and_long_block_descriptors():
    d = emulator().execute(mode_sense10(0x08)).data
    assert int.from_bytes(d[0:2], "big") == len(d) - 2
    assert d[3] == 0x10 and d[4] & 0x01 == 0 and int.from_bytes(d[6:8], "big") == 8
    d = emulator().execute(mode_sense10(0x08, llbaa=True)).data
    assert d[4] & 0x01  # LONGLBA
    assert int.from_bytes(d[6:8], "big") == 16
    assert int.from_bytes(d[8:16], "big") == BLOCKS and int.from_bytes(d[20:24], "big") == BS
    assert d[24] == 0x08


def test_mode_sense_6_allocation_length_keeps_mode_data_length():
    full = emulator().execute(mode_sense6(0x3F)).data
    cut = emulator().execute(mode_sense6(0x3F, alloc=4)).data
    assert cut == full[:4] and cut[0] == len(full) - 1


def test_mode_select_caching_page_unchanged_is_accepted_and_wce_change_refused():
    e = emulator(FakeLun(wce=True))
    cur = e.execute(mode_sense6(0x08)).data
    params = bytes((0,)) + cur[1:]  # MODE DATA LENGTH is reserved in MODE SELECT
    assert e.execute(mode_select6(len(params)), params).ok
    flipped = bytearray(params)
    flipped[4 + 8 + 2] &= ~0x04  # WCE off
    r = e.execute(mode_select6(len(flipped)), bytes(flipped))
    assert sense_of(r) == INVALID_PARAM
    assert field(r) == FieldPointer(4 + 8 + 2, 2, cdb=False)
    assert e.execute(mode_sense6(0x08)).data[12 + 2] & 0x04  # still on


def test_mode_select_d_sense_switches_sense_format():
    e = emulator()
    ctl = e.execute(mode_sense10(0x0A, dbd=True)).data
    params = bytearray(bytes(2) + ctl[2:])
    params[8 + 2] |= 0x04  # D_SENSE
    assert e.execute(mode_select10(len(params)), bytes(params)).ok
    assert e.descriptor_sense
    assert e.execute(mode_sense6(0x0A, dbd=True)).data[4 + 2] & 0x04
    r = e.execute(bytes((0x01, 0, 0, 0, 0, 0)))  # unsupported opcode
    assert r.sense[0] == 0x72 and sense_of(r) == BAD_OPCODE
    params[8 + 2] &= ~0x04
    assert e.execute(mode_select10(len(params)), bytes(params)).ok
    assert e.execute(bytes((0x01, 0, 0, 0, 0, 0))).sense[0] == 0x70


def test_mode_select_errors():
    e = emulator()
    ctl = e.execute(mode_sense6(0x0A, dbd=True)).data
    params = bytes((0,)) + ctl[1:]
    assert e.execute(mode_select6(0), None).ok  # nothing to transfer
    r = e.execute(mode_select6(len(params), sp=True), params)
    assert sense_of(r) == INVALID_CDB and field(r) == FieldPointer(1, 0)
    r = e.execute(mode_select6(len(params), pf=False), params)
    assert sense_of(r) == INVALID_CDB and field(r) == FieldPointer(1, 4)
    r = e.execute(mode_select6(len(params) - 3), params[:-3])  # page cut short
    assert sense_of(r) == PLL_ERROR
    r = e.execute(mode_select6(3), params[:3])  # not even a header
    assert sense_of(r) == PLL_ERROR
    r = e.execute(mode_select6(len(params)), params[:-1])  # Data-Out shorter than the list
    assert sense_of(r) == INVALID_CDB and field(r) == FieldPointer(4, 7)
    bad = bytearray(params)
    bad[4] = 0x1C  # informational exceptions page: not ours
    r = e.execute(mode_select6(len(bad)), bytes(bad))
    assert sense_of(r) == INVALID_PARAM and field(r) == FieldPointer(4, 5, cdb=False)
    bad = bytearray(params)
    bad[5] = 0x0B  # wrong page length
    r = e.execute(mode_select6(len(bad)), bytes(bad))
    assert sense_of(r) == INVALID_PARAM and field(r) == FieldPointer(5, 7, cdb=False)
    bad = bytearray(params)
    bad[4 + 3] ^= 0x10  # QAM is not changeable
    r = e.execute(mode_select6(len(bad)), bytes(bad))
    assert sense_of(r) == INVALID_PARAM and field(r) == FieldPointer(7, 4, cdb=False)


def test_mode_select_block_descriptor_checked():
    e = emulator()
    cur = bytearray(e.execute(mode_sense6(0x08)).data)
    cur[0] = 0
    assert e.execute(mode_select6(len(cur)), bytes(cur)).ok
    zero_blocks = bytearray(cur)
    zero_blocks[4:8] = bytes(4)  # 0 = keep the capacity
    assert e.execute(mode_select6(len(zero_blocks)), bytes(zero_blocks)).ok
    bad = bytearray(cur)
    bad[9:12] = (4096).to_bytes(3, "big")
    r = e.execute(mode_select6(len(bad)), bytes(bad))
    assert sense_of(r) == INVALID_PARAM and field(r) == FieldPointer(9, 7, cdb=False)


# -- TEST UNIT READY, REQUEST SENSE, START STOP UNIT, deferred errors ----------------------


def test_test_unit_ready():
    r = emulator().execute(bytes(6))
    assert r.status == S.GOOD and r.data == b"" and r.sense == b""


def test_request_sense_no_sense_fixed_and_descriptor():
    e = emulator()
    d = e.execute(bytes((0x03, 0, 0, 0, 252, 0))).data
    assert len(d) == 18 and d[0] == 0x70 and d[2] & 0x0F == 0 and d[7] == 10
    assert d[12] == 0 and d[13] == 0
    d = e.execute(bytes((0x03, 1, 0, 0, 252, 0))).data
    assert d == bytes((0x72, 0, 0, 0, 0, 0, 0, 0))
    assert e.execute(bytes((0x03, 0, 0, 0, 8, 0))).data == bytes((0x70, 0, 0, 0, 0, 0, 0, 10))


def test_deferred_error_reported_once_on_the_next_command():
    e = emulator()
    e.post_deferred_error(Sense.of(Key.MEDIUM_ERROR, S.WRITE_ERROR))
    assert e.execute(inquiry()).ok  # INQUIRY does not consume it
    r = e.execute(bytes(6))
    assert r.status == S.CHECK_CONDITION and r.sense[0] == 0x71
    assert sense_of(r) == (Key.MEDIUM_ERROR, 0x0C, 0x00)
    assert e.execute(bytes(6)).ok
    e.post_deferred_error(Sense.of(Key.MEDIUM_ERROR, S.WRITE_ERROR))
    d = e.execute(bytes((0x03, 1, 0, 0, 252, 0))).data  # REQUEST SENSE returns and clears it
    assert d[0] == 0x73 and d[1] == Key.MEDIUM_ERROR
    assert e.execute(bytes(6)).ok


def test_start_stop_unit():
    lun = FakeLun()
    e = emulator(lun)
    assert e.execute(bytes((0x1B, 0, 0, 0, 0x01, 0))).ok  # start
    assert e.execute(bytes((0x1B, 1, 0, 0, 0x00, 0))).ok  # stop: cache written back
    assert ("flush",) in lun.calls
    assert e.execute(bytes(6)).ok  # still ready
    r = e.execute(bytes((0x1B, 1, 0, 0, 0x02, 0)))  # LOEJ, eject: not removable
    assert sense_of(r) == INVALID_CDB and field(r) == FieldPointer(4, 1)
    r = e.execute(bytes((0x1B, 0, 0, 0, 0x50, 0)))  # reserved power condition
    assert sense_of(r) == INVALID_CDB
    assert e.execute(bytes((0x1B, 0, 0, 0, 0x30, 0))).ok  # STANDBY: accepted


# -- READ / WRITE -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "rd", "wr"),
    [(rw10, 0x28, 0x2A), (rw12, 0xA8, 0xAA), (rw16, 0x88, 0x8A)],
)
def test_write_then_read_back(build, rd, wr):
    lun = FakeLun()
    e = emulator(lun)
    data = bytes(range(256)) * (3 * BS // 256)
    assert e.execute(build(wr, 10, 3), data).ok
    assert lun.calls[-1] == ("write", 10 * BS, 3 * BS, False)
    assert e.execute(build(rd, 10, 3)).data == data
    assert e.execute(build(wr, 20, 1, flags=0x08), data[:BS]).ok  # FUA
    assert lun.calls[-1] == ("write", 20 * BS, BS, True)
    assert e.execute(build(wr, 21, 1, flags=0x10), data[:BS]).ok  # DPO: ignored
    assert lun.calls[-1] == ("write", 21 * BS, BS, False)


def test_six_byte_read_write_and_256_blocks():
    lun = FakeLun()
    e = emulator(lun)
    data = bytes([7]) * (256 * BS)
    assert e.execute(rw6(0x0A, 0x10, 0), data).ok  # length 0 means 256
    assert lun.calls[-1] == ("write", 0x10 * BS, 256 * BS, False)
    assert e.execute(rw6(0x08, 0x10, 0)).data == data
    assert e.execute(rw6(0x08, 0x1FFFFF, 1)).status == S.CHECK_CONDITION  # beyond 16 MiB


def test_zero_length_transfers_do_nothing():
    lun = FakeLun()
    e = emulator(lun)
    for cdb in (rw10(0x2A, 5, 0), rw12(0xAA, 5, 0), rw16(0x8A, 5, 0), rw10(0x28, BLOCKS, 0)):
        r = e.execute(cdb)
        assert r.ok and r.data == b""
    assert lun.calls == []


@pytest.mark.parametrize("build", [rw10, rw12, rw16])
@pytest.mark.parametrize(
    ("lba", "n"),
    [(BLOCKS, 1), (BLOCKS - 1, 2), (BLOCKS + 1, 0), (0x80000000, 0), (0xFFFFFFFF, 1)],
)
def test_lba_out_of_range(build, lba, n):
    lun = FakeLun()
    e = emulator(lun)
    assert (
        sense_of(
            e.execute(build(0x28 if build is rw10 else (0xA8 if build is rw12 else 0x88), lba, n))
        )
        == LBA_OOB
    )
    wr = {rw10: 0x2A, rw12: 0xAA, rw16: 0x8A}[build]
    assert sense_of(e.execute(build(wr, lba, n), bytes(n * BS))) == LBA_OOB
    assert lun.calls == []


def test_lba_out_of_range_64bit_wrap():
    r = emulator().execute(rw16(0x8A, 2**64 - 1, 2), bytes(2 * BS))
    assert sense_of(r) == LBA_OOB
    assert emulator().execute(rw16(0x88, BLOCKS - 1, 1)).ok


def test_protect_fields_refused():
    for cdb in (rw10(0x28, 0, 1, 0x20), rw16(0x8A, 0, 1, 0xE0), rw12(0xAF, 0, 1, 0x40)):
        r = emulator().execute(cdb, bytes(BS))
        assert sense_of(r) == INVALID_CDB and field(r) == FieldPointer(1, 7)


def test_write_data_length_must_match_transfer_length():
    lun = FakeLun()
    e = emulator(lun)
    for data in (b"", bytes(BS - 1), bytes(BS + 1), bytes(2 * BS)):
        assert sense_of(e.execute(rw10(0x2A, 0, 1), data)) == BAD_IU
    assert sense_of(e.execute(rw10(0x2A, 0, 0), bytes(BS))) == BAD_IU
    assert lun.calls == []


def test_read_only_lun_refuses_every_write():
    lun = FakeLun(read_only=True)
    e = emulator(lun)
    one = bytes(BS)
    cmds = [
        (rw6(0x0A, 0, 1), one),
        (rw10(0x2A, 0, 1), one),
        (rw12(0xAA, 0, 1), one),
        (rw16(0x8A, 0, 1), one),
        (rw10(0x2E, 0, 1), one),
        (rw16(0x8E, 0, 1), one),
        (bytes((0x41, 0, 0, 0, 0, 0, 0, 0, 1, 0)), one),
        (rw16(0x93, 0, 1, 0x08), one),
        (unmap_cdb(24), unmap_params([(0, 1)])),
    ]
    for cdb, data in cmds:
        assert sense_of(e.execute(cdb, data)) == WRITE_PROTECTED, cdb.hex()
    assert e.execute(rw10(0x28, 0, 1)).ok
    assert e.execute(rw10(0x2F, 0, 1)).ok
    assert e.execute(bytes((0x35,)) + bytes(9)).ok
    assert lun.writes() == []


def test_max_transfer_length_enforced():
    e = emulator(limits=Limits(max_transfer=64 * 1024))
    r = e.execute(rw10(0x28, 0, 129))
    assert sense_of(r) == INVALID_CDB and field(r) == FieldPointer(7, 7)
    r = e.execute(rw16(0x8A, 0, 129), bytes(129 * BS))
    assert sense_of(r) == INVALID_CDB and field(r) == FieldPointer(10, 7)
    assert e.execute(rw10(0x28, 0, 128)).ok


def test_read_cut_to_the_data_in_buffer():
    lun = FakeLun()
    lun.buf[0 : 2 * BS] = bytes([1]) * BS + bytes([2]) * BS
    e = emulator(lun)
    assert (
        e.execute(rw10(0x28, 0, 4), data_in_len=BS + 10).data == bytes([1]) * BS + bytes([2]) * 10
    )
    assert e.execute(rw10(0x28, 0, 4), data_in_len=0).data == b""


# -- VERIFY / WRITE AND VERIFY ------------------------------------------------------------


def test_write_and_verify_is_fua_and_compares():
    lun = FakeLun()
    e = emulator(lun)
    data = bytes([9]) * (2 * BS)
    assert e.execute(rw10(0x2E, 4, 2, 0x02), data).ok  # BYTCHK 1
    assert ("write", 4 * BS, 2 * BS, True) in lun.calls
    assert e.execute(rw12(0xAE, 4, 2), data).ok
    r = e.execute(rw16(0x8E, 4, 2, 0x04), data)  # BYTCHK 10b: reserved
    assert sense_of(r) == INVALID_CDB and field(r) == FieldPointer(1, 2)


def test_verify_bytchk_modes():
    lun = FakeLun()
    lun.buf[BS : 3 * BS] = bytes([5]) * (2 * BS)
    e = emulator(lun)
    assert e.execute(rw10(0x2F, 1, 2), b"ignored").ok  # BYTCHK 0: no data compared
    assert e.execute(rw10(0x2F, 1, 2, 0x02), bytes([5]) * (2 * BS)).ok
    bad = bytearray([5]) * (2 * BS)
    bad[BS + 7] = 6
    r = e.execute(rw12(0xAF, 1, 2, 0x02), bytes(bad))
    assert sense_of(r) == MISCOMPARE
    assert r.decoded_sense().information == BS + 7
    assert e.execute(rw16(0x8F, 1, 2, 0x06), bytes([5]) * BS).ok  # BYTCHK 11b: one block
    r = e.execute(rw16(0x8F, 0, 2, 0x06), bytes([5]) * BS)
    assert sense_of(r) == MISCOMPARE and r.decoded_sense().information == 0
    r = e.execute(rw10(0x2F, 1, 2, 0x04))  # BYTCHK 10b
    assert sense_of(r) == INVALID_CDB
    assert sense_of(e.execute(rw10(0x2F, BLOCKS, 1))) == LBA_OOB
    assert lun.writes() == []


# -- SYNCHRONIZE CACHE --------------------------------------------------------------------


def test_synchronize_cache():
    lun = FakeLun()
    e = emulator(lun)
    assert e.execute(bytes((0x35,)) + bytes(9)).ok
    assert e.execute(bytes((0x35, 0x02, 0, 0, 0, 0, 0, 0, 8, 0))).ok  # IMMED
    assert e.execute(bytes((0x91, 0)) + (BLOCKS - 1).to_bytes(8, "big") + bytes(6)).ok
    assert lun.calls.count(("flush",)) == 3
    r = e.execute(bytes((0x91, 0)) + BLOCKS.to_bytes(8, "big") + (1).to_bytes(4, "big") + bytes(2))
    assert sense_of(r) == LBA_OOB


# -- WRITE SAME / UNMAP -------------------------------------------------------------------


def ws10(lba: int, n: int, flags: int = 0) -> bytes:
    return bytes((0x41, flags)) + lba.to_bytes(4, "big") + b"\0" + n.to_bytes(2, "big") + b"\0"


def test_write_same_writes_the_block_everywhere():
    lun = FakeLun()
    e = emulator(lun)
    blk = bytes(range(256)) * 2
    assert e.execute(ws10(100, 3000), blk).ok
    assert lun.buf[100 * BS : 3100 * BS] == blk * 3000
    assert lun.buf[99 * BS : 100 * BS] == bytes(BS) and lun.buf[3100 * BS : 3101 * BS] == bytes(BS)
    assert e.execute(rw16(0x93, 5, 2), bytes([3]) * BS).ok
    assert lun.buf[5 * BS : 7 * BS] == bytes([3]) * (2 * BS)


def test_write_same_unmap():
    lun = FakeLun()
    lun.buf[:] = bytes([1]) * lun.size
    e = emulator(lun)
    assert e.execute(ws10(8, 16, 0x08), bytes(BS)).ok
    assert lun.calls[-1] == ("unmap", 8 * BS, 16 * BS)
    assert e.execute(rw16(0x93, 64, 8, 0x08 | 0x01)).ok  # NDOB: no data, zeros
    assert lun.calls[-1] == ("unmap", 64 * BS, 8 * BS)
    assert e.execute(ws10(200, 2, 0x08), bytes([4]) * BS).ok  # not zeros: written
    assert lun.calls[-1][0] == "write"
    assert lun.buf[200 * BS : 202 * BS] == bytes([4]) * (2 * BS)


def test_write_same_field_errors():
    e = emulator(limits=Limits(max_write_same=1024 * BS))
    assert sense_of(e.execute(ws10(BLOCKS + 1, 0), bytes(BS))) == LBA_OOB  # range first
    r = e.execute(ws10(0, 0), bytes(BS))  # WSNZ
    assert sense_of(r) == INVALID_CDB and field(r) == FieldPointer(7, 7)
    r = e.execute(ws10(0, 1025), bytes(BS))
    assert sense_of(r) == INVALID_CDB and field(r) == FieldPointer(7, 7)
    r = e.execute(ws10(0, 1, 0x10), bytes(BS))  # ANCHOR
    assert sense_of(r) == INVALID_CDB and field(r) == FieldPointer(1, 4)
    r = e.execute(ws10(0, 1, 0x01), bytes(BS))  # NDOB only in WRITE SAME(16)
    assert sense_of(r) == INVALID_CDB and field(r) == FieldPointer(1, 0)
    r = e.execute(ws10(0, 1, 0x02), bytes(BS))  # LBDATA
    assert sense_of(r) == INVALID_CDB
    assert sense_of(e.execute(ws10(0, 1), bytes(2 * BS))) == BAD_IU


def test_unmap_descriptors():
    lun = FakeLun()
    e = emulator(lun)
    p = unmap_params([(0, 8), (100, 0), (200, 16)])
    assert e.execute(unmap_cdb(len(p)), p).ok
    assert lun.calls == [("unmap", 0, 8 * BS), ("unmap", 200 * BS, 16 * BS)]
    assert p[:2] == (len(p) - 2).to_bytes(2, "big") and p[2:4] == (len(p) - 8).to_bytes(2, "big")


def test_unmap_errors_change_nothing():
    lun = FakeLun()
    e = emulator(lun, limits=Limits(max_unmap=64 * BS, max_unmap_descriptors=2))
    assert e.execute(unmap_cdb(0)).ok
    for n in range(1, 8):
        assert sense_of(e.execute(unmap_cdb(n), bytes(n))) == PLL_ERROR
    p = unmap_params([(0, 8), (BLOCKS - 1, 2)])
    assert sense_of(e.execute(unmap_cdb(len(p)), p)) == LBA_OOB
    p = unmap_params([(0, 1), (2, 1), (4, 1)])
    r = e.execute(unmap_cdb(len(p)), p)
    assert sense_of(r) == INVALID_PARAM and field(r) == FieldPointer(2, 7, cdb=False)
    p = unmap_params([(0, 40), (100, 40)])
    r = e.execute(unmap_cdb(len(p)), p)
    assert sense_of(r) == INVALID_PARAM and field(r) == FieldPointer(8 + 16 + 8, 7, cdb=False)
    p = unmap_params([(0, 1)])
    r = e.execute(unmap_cdb(len(p)), p[:-1])
    assert sense_of(r) == INVALID_CDB and field(r) == FieldPointer(7, 7)
    r = e.execute(bytes((0x42, 0x01)) + unmap_cdb(len(p))[2:], p)
    assert sense_of(r) == INVALID_CDB and field(r) == FieldPointer(1, 0)
    assert lun.calls == []


def test_unmap_block_descriptor_length_is_cut_to_the_parameter_list():
    lun = FakeLun()
    e = emulator(lun)
    p = bytearray(unmap_params([(0, 8), (64, 8)]))
    p[2:4] = (4096).to_bytes(2, "big")  # claims more than was sent
    assert e.execute(unmap_cdb(len(p) - 16), bytes(p[:-16])).ok
    assert lun.calls == [("unmap", 0, 8 * BS)]


# -- REPORT SUPPORTED OPERATION CODES -----------------------------------------------------


def all_commands(e: Emulator, rctd: bool = False) -> list[tuple[int, int | None, int, bytes]]:
    d = e.execute(rsoc(rctd=rctd)).data
    n = int.from_bytes(d[:4], "big")
    assert n == len(d) - 4
    out, pos = [], 4
    while pos < len(d):
        op, sa, flags, cdblen = (
            d[pos],
            int.from_bytes(d[pos + 2 : pos + 4], "big"),
            d[pos + 5],
            int.from_bytes(d[pos + 6 : pos + 8], "big"),
        )
        assert bool(flags & 0x02) == rctd
        step = 20 if rctd else 8
        if rctd:
            assert d[pos + 8 : pos + 10] == b"\x00\x0a"
            assert int.from_bytes(d[pos + 16 : pos + 20], "big") > 0
        out.append((op, sa if flags & 0x01 else None, cdblen, d[pos : pos + step]))
        if not flags & 0x01:
            assert sa == 0
        pos += step
    return out


def test_rsoc_all_commands_lists_what_is_answered():
    e = emulator(snaps=FakeSnapshots())
    cmds = all_commands(e)
    listed = {(op, sa) for op, sa, _, _ in cmds}
    assert (0x9E, 0x10) in listed and (0xA3, 0x0C) in listed and (0x28, None) in listed
    assert {(0xC0, 1), (0xC0, 2), (0xC0, 3)} <= listed
    assert listed == {(op, sa) for op, sa, _ in e.supported_commands()}
    assert all_commands(e, rctd=True)
    no_snap = {(op, sa) for op, sa, _, _ in all_commands(emulator())}
    assert not any(op == 0xC0 for op, _ in no_snap)


def test_rsoc_one_command_is_consistent_with_the_list():
    e = emulator(snaps=FakeSnapshots())
    for op, sa, cdblen, _ in all_commands(e):
        opts = 2 if sa is not None else 1
        d = e.execute(rsoc(opts, op, sa or 0)).data
        assert d[1] & 0x07 in (0x03, 0x05)
        assert (d[1] & 0x07 == 0x05) == (op == 0xC0)
        assert int.from_bytes(d[2:4], "big") == cdblen == len(d) - 4
        usage = d[4:]
        assert usage[0] == op
        if sa is not None:
            assert usage[1] & 0x1F == sa
        # the wrong reporting option for this opcode is an invalid field
        r = e.execute(rsoc(3 - opts, op, sa or 0))
        assert sense_of(r) == INVALID_CDB and field(r) == FieldPointer(2, 2)
        d3 = e.execute(rsoc(3, op, sa or 0, rctd=True)).data
        assert d3[1] & 0x80 and len(d3) == 4 + cdblen + 12


def test_rsoc_unsupported_and_bad_options():
    e = emulator()
    assert e.execute(rsoc(1, 0x4D)).data == bytes((0, 1, 0, 0))  # LOG SENSE: not supported
    assert e.execute(rsoc(2, 0x9E, 0x12)).data == bytes((0, 1, 0, 0))
    assert e.execute(rsoc(1, 0xC0)).data == bytes((0, 1, 0, 0))  # no snapshot service
    r = e.execute(rsoc(5))
    assert sense_of(r) == INVALID_CDB and field(r) == FieldPointer(2, 2)
    assert len(e.execute(rsoc(alloc=10)).data) == 10


# -- everything else ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "op", [0x01, 0x04, 0x07, 0x1D, 0x1E, 0x37, 0x4D, 0x5E, 0x7F, 0x8B, 0xA0, 0xC1, 0xD0, 0xFF]
)
def test_unsupported_opcodes(op):
    n = {0: 6, 1: 10, 2: 10, 3: 10, 4: 16, 5: 12, 6: 10, 7: 10}[op >> 5]
    r = emulator().execute(bytes((op,)) + bytes(n - 1))
    assert sense_of(r) == BAD_OPCODE and field(r) == FieldPointer(0, 7)


def test_vendor_command_without_snapshot_service_is_an_unsupported_opcode():
    r = emulator().execute(bytes((0xC0, 3, 0, 0, 0, 0, 0, 0, 64, 0)))
    assert sense_of(r) == BAD_OPCODE


def test_naca_refused_and_short_cdb():
    r = emulator().execute(bytes((0, 0, 0, 0, 0, 0x04)))
    assert sense_of(r) == INVALID_CDB and field(r) == FieldPointer(5, 2)
    assert sense_of(emulator().execute(bytes((0x28, 0, 0)))) == INVALID_CDB
    assert sense_of(emulator().execute(b"")) == INVALID_CDB


def test_extra_cdb_bytes_are_ignored():
    assert emulator().execute(bytes(6) + b"\xff" * 10).ok


@pytest.mark.parametrize(
    ("exc", "expect"),
    [
        (OSError(errno.EIO, "io"), (Key.MEDIUM_ERROR, 0x0C, 0x00)),
        (OSError(errno.ENOSPC, "full"), (Key.DATA_PROTECT, 0x27, 0x07)),
        (OSError(errno.ENXIO, "restoring"), (Key.NOT_READY, 0x04, 0x07)),
        (RuntimeError("bug"), (Key.HARDWARE_ERROR, 0x44, 0x00)),
    ],
)
def test_lun_errors_become_sense(exc, expect):
    lun = FakeLun()
    e = emulator(lun)
    lun.fail = exc
    assert sense_of(e.execute(rw10(0x2A, 0, 1), bytes(BS))) == expect


def test_lun_read_errors_and_busy():
    lun = FakeLun()
    e = emulator(lun)
    lun.fail = OSError(errno.EIO, "io")
    assert sense_of(e.execute(rw10(0x28, 0, 1))) == (Key.MEDIUM_ERROR, 0x11, 0x00)
    lun.fail = OSError(errno.ETIMEDOUT, "journal full")
    r = e.execute(rw10(0x2A, 0, 1), bytes(BS))
    assert r.status == S.BUSY and r.sense == b""
    lun.fail = None
    assert e.execute(rw10(0x2A, 0, 1), bytes(BS)).ok


def test_short_read_from_the_lun_is_a_target_failure():
    class ShortLun(FakeLun):
        def read(self, offset: int, length: int) -> bytes:
            return b"x"

    assert sense_of(emulator(ShortLun()).execute(rw10(0x28, 0, 1))) == (Key.HARDWARE_ERROR, 0x44, 0)


def test_check_condition_helper_follows_d_sense():
    e = emulator()
    s = Sense.of(Key.MEDIUM_ERROR, S.UNRECOVERED_READ_ERROR)
    assert e.check_condition(s).sense[0] == 0x70
    e._d_sense = True
    assert e.check_condition(s).sense[0] == 0x72


# -- sense data codec ---------------------------------------------------------------------


def test_fixed_sense_layout_with_field_pointer():
    b = Sense.of(ILLEGAL, S.INVALID_FIELD_IN_CDB, field=FieldPointer(2, 5)).encode()
    assert b == bytes((0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0xCD, 0, 2))
    b = Sense.of(
        ILLEGAL, S.INVALID_FIELD_IN_PARAMETER_LIST, field=FieldPointer(300, cdb=False)
    ).encode()
    assert b[15:18] == bytes((0x80, 0x01, 0x2C))


def test_descriptor_sense_layout():
    b = Sense.of(Key.MISCOMPARE, S.MISCOMPARE_DURING_VERIFY, information=517).encode(True)
    assert b[:8] == bytes((0x72, 0x0E, 0x1D, 0, 0, 0, 0, 12))
    assert b[8:12] == bytes((0, 0x0A, 0x80, 0)) and int.from_bytes(b[12:20], "big") == 517
    b = Sense.of(ILLEGAL, S.INVALID_FIELD_IN_CDB, field=FieldPointer(1, 7)).encode(True)
    assert b == bytes((0x72, 5, 0x24, 0, 0, 0, 0, 8, 2, 6, 0, 0, 0xCF, 0, 1, 0))


def test_sense_describe():
    s = Sense.of(ILLEGAL, S.INVALID_FIELD_IN_CDB, field=FieldPointer(2, 5))
    assert s.describe() == "ILLEGAL REQUEST: invalid field in CDB (CDB byte 2 bit 5)"
    with pytest.raises(S.SenseDecodeError):
        S.decode(b"\x01\x02\x03")


def test_execute_never_raises_even_on_nonsense_arguments():
    e = emulator()
    for cdb, data in ((None, None), ("x", "y"), (bytes(6), object())):
        r = e.execute(cdb, data)  # type: ignore[arg-type]
        assert r.status == S.CHECK_CONDITION
        assert sense_of(r) == (Key.HARDWARE_ERROR, 0x44, 0x00)
