"""CDB field decoding: operation codes, lengths, and the block-command layouts.

Everything here is pure and raises :class:`~dmsnap.scsi.sense.SenseError`
(with a field pointer) for a malformed field, so callers can let it propagate
to :meth:`dmsnap.scsi.emulation.Emulator.execute`.
"""

from __future__ import annotations

from dataclasses import dataclass

from dmsnap.scsi import sense as S

# -- operation codes (SPC-4 / SBC-3) -------------------------------------------------------

TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
READ_6 = 0x08
WRITE_6 = 0x0A
INQUIRY = 0x12
MODE_SELECT_6 = 0x15
MODE_SENSE_6 = 0x1A
START_STOP_UNIT = 0x1B
READ_CAPACITY_10 = 0x25
READ_10 = 0x28
WRITE_10 = 0x2A
WRITE_AND_VERIFY_10 = 0x2E
VERIFY_10 = 0x2F
SYNCHRONIZE_CACHE_10 = 0x35
WRITE_SAME_10 = 0x41
UNMAP = 0x42
MODE_SELECT_10 = 0x55
MODE_SENSE_10 = 0x5A
VARIABLE_LENGTH = 0x7F
READ_16 = 0x88
WRITE_16 = 0x8A
WRITE_AND_VERIFY_16 = 0x8E
VERIFY_16 = 0x8F
SYNCHRONIZE_CACHE_16 = 0x91
WRITE_SAME_16 = 0x93
SERVICE_ACTION_IN_16 = 0x9E
SAI_READ_CAPACITY_16 = 0x10
REPORT_LUNS = 0xA0
MAINTENANCE_IN = 0xA3
MI_REPORT_SUPPORTED_OPCODES = 0x0C
READ_12 = 0xA8
WRITE_12 = 0xAA
WRITE_AND_VERIFY_12 = 0xAE
VERIFY_12 = 0xAF

_GROUP_LEN = (6, 10, 10, 0, 16, 12, 10, 10)  # group 3 (0x60-0x7f) is reserved/variable


def cdb_length(opcode: int) -> int:
    """CDB length from the group code, as the kernel computes it (vendor groups 6/7: 10).

    Returns 0 for group 3 (reserved; 0x7F is variable length)."""
    return _GROUP_LEN[(opcode >> 5) & 7]


def be(buf: bytes, start: int, n: int) -> int:
    return int.from_bytes(buf[start : start + n], "big")


def naca(cdb: bytes) -> bool:
    """NACA bit of the CONTROL byte (the last byte of the CDB)."""
    return bool(cdb[-1] & 0x04)


@dataclass(frozen=True)
class Rw:
    """The addressing fields of a block command, with where they sit in the CDB."""

    lba: int
    blocks: int
    flags: int  # byte 1 (0 for the 6-byte commands)
    lba_byte: int  # field pointers, for sense data
    lba_bit: int
    len_byte: int

    @property
    def protect(self) -> int:
        """RDPROTECT / WRPROTECT / VRPROTECT (bits 7-5 of byte 1)."""
        return self.flags >> 5

    @property
    def dpo(self) -> bool:
        return bool(self.flags & 0x10)

    @property
    def fua(self) -> bool:
        return bool(self.flags & 0x08)

    @property
    def bytchk(self) -> int:
        """VERIFY / WRITE AND VERIFY: BYTCHK (bits 2-1 of byte 1, SBC-4)."""
        return (self.flags >> 1) & 0x3


def rw_fields(cdb: bytes) -> Rw:
    """LBA and transfer length of READ/WRITE/VERIFY/WRITE AND VERIFY/WRITE SAME/
    SYNCHRONIZE CACHE in their 6/10/12/16-byte forms (by CDB length).

    The 6-byte forms mean 256 blocks by a length of 0; the caller decides what
    a length of 0 means for the others."""
    n = len(cdb)
    if n == 6:
        lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
        blocks = cdb[4] or 256
        return Rw(lba, blocks, 0, 1, 4, 4)
    if n == 10:
        return Rw(be(cdb, 2, 4), be(cdb, 7, 2), cdb[1], 2, 7, 7)
    if n == 12:
        return Rw(be(cdb, 2, 4), be(cdb, 6, 4), cdb[1], 2, 7, 6)
    if n == 16:
        return Rw(be(cdb, 2, 8), be(cdb, 10, 4), cdb[1], 2, 7, 10)
    raise S.bad_cdb(0, 7)


def allocation_length(cdb: bytes) -> int:
    """The ALLOCATION LENGTH of the Data-In commands dmsnap answers."""
    op = cdb[0]
    if op in (INQUIRY,):
        return be(cdb, 3, 2)
    if op in (REQUEST_SENSE, MODE_SENSE_6):
        return cdb[4]
    if op == MODE_SENSE_10:
        return be(cdb, 7, 2)
    if op == READ_CAPACITY_10:
        return 8
    if op == SERVICE_ACTION_IN_16:
        return be(cdb, 10, 4)
    if op == MAINTENANCE_IN:
        return be(cdb, 6, 4)
    return 0
