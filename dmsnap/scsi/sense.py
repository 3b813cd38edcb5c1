"""SCSI status codes and sense data (SPC-4 4.5), both directions.

The target builds sense with :class:`Sense` (``Sense(...).encode(descriptor=...)``);
the initiator decodes what it receives with :func:`decode` and prints
:meth:`Sense.describe`. Inside the emulator a command ends early by raising
:class:`SenseError`; ``execute`` turns it into CHECK CONDITION.

Fixed format (response code 0x70 current, 0x71 deferred), 18 bytes::

    0  VALID(7) | response code        8-11 command-specific information
    2  sense key (bits 3-0)            12 ASC   13 ASCQ   14 FRU
    3-6 INFORMATION                    15-17 sense-key specific (SKSV = byte 15 bit 7)
    7  additional sense length (10)

Descriptor format (0x72 / 0x73): byte 1 sense key, 2 ASC, 3 ASCQ, 7 additional
length, then descriptors: INFORMATION (type 0x00, 12 bytes) and sense-key
specific (type 0x02, 8 bytes).

The sense-key specific field of ILLEGAL REQUEST is a *field pointer*:
SKSV=1, C/D (1: the CDB, 0: the parameter list), BPV + bit pointer (the most
significant bit of the field), and the byte of the field (its most significant
byte when it spans several).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# -- status byte ----------------------------------------------------------------------------

GOOD = 0x00
CHECK_CONDITION = 0x02
CONDITION_MET = 0x04
BUSY = 0x08
RESERVATION_CONFLICT = 0x18
TASK_SET_FULL = 0x28
ACA_ACTIVE = 0x30
TASK_ABORTED = 0x40

STATUS_NAMES = {
    GOOD: "GOOD",
    CHECK_CONDITION: "CHECK CONDITION",
    CONDITION_MET: "CONDITION MET",
    BUSY: "BUSY",
    RESERVATION_CONFLICT: "RESERVATION CONFLICT",
    TASK_SET_FULL: "TASK SET FULL",
    ACA_ACTIVE: "ACA ACTIVE",
    TASK_ABORTED: "TASK ABORTED",
}

FIXED_LEN = 18
MAX_SENSE = 96  # TCMU_SENSE_BUFFERSIZE; SPC allows up to 252


class Key(enum.IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    VENDOR_SPECIFIC = 0x9
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    RESERVED_C = 0xC
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE
    COMPLETED = 0xF


# -- additional sense codes (ASC, ASCQ) that dmsnap uses, with their SPC names -------------

NO_ADDITIONAL_SENSE = (0x00, 0x00)
LUN_NOT_READY_BECOMING_READY = (0x04, 0x01)
LUN_NOT_READY_MANUAL_INTERVENTION = (0x04, 0x03)
LUN_NOT_READY_OPERATION_IN_PROGRESS = (0x04, 0x07)
WRITE_ERROR = (0x0C, 0x00)
INVALID_FIELD_IN_COMMAND_IU = (0x0E, 0x03)
UNRECOVERED_READ_ERROR = (0x11, 0x00)
PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
MISCOMPARE_DURING_VERIFY = (0x1D, 0x00)
INVALID_COMMAND_OPERATION_CODE = (0x20, 0x00)
ACCESS_DENIED_NO_ACCESS_RIGHTS = (0x20, 0x02)
LBA_OUT_OF_RANGE = (0x21, 0x00)
INVALID_FIELD_IN_CDB = (0x24, 0x00)
LOGICAL_UNIT_NOT_SUPPORTED = (0x25, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
PARAMETER_NOT_SUPPORTED = (0x26, 0x01)
PARAMETER_VALUE_INVALID = (0x26, 0x02)
WRITE_PROTECTED = (0x27, 0x00)
SPACE_ALLOCATION_FAILED_WRITE_PROTECT = (0x27, 0x07)
MODE_PARAMETERS_CHANGED = (0x2A, 0x01)
COMMAND_SEQUENCE_ERROR = (0x2C, 0x00)
SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00)
INTERNAL_TARGET_FAILURE = (0x44, 0x00)
INSUFFICIENT_RESOURCES = (0x55, 0x03)

ASC_NAMES: dict[tuple[int, int], str] = {
    NO_ADDITIONAL_SENSE: "no additional sense information",
    LUN_NOT_READY_BECOMING_READY: "logical unit is in process of becoming ready",
    LUN_NOT_READY_MANUAL_INTERVENTION: "logical unit not ready, manual intervention required",
    LUN_NOT_READY_OPERATION_IN_PROGRESS: "logical unit not ready, operation in progress",
    WRITE_ERROR: "write error",
    INVALID_FIELD_IN_COMMAND_IU: "invalid field in command information unit",
    UNRECOVERED_READ_ERROR: "unrecovered read error",
    PARAMETER_LIST_LENGTH_ERROR: "parameter list length error",
    MISCOMPARE_DURING_VERIFY: "miscompare during verify operation",
    INVALID_COMMAND_OPERATION_CODE: "invalid command operation code",
    ACCESS_DENIED_NO_ACCESS_RIGHTS: "access denied - no access rights",
    LBA_OUT_OF_RANGE: "logical block address out of range",
    INVALID_FIELD_IN_CDB: "invalid field in CDB",
    LOGICAL_UNIT_NOT_SUPPORTED: "logical unit not supported",
    INVALID_FIELD_IN_PARAMETER_LIST: "invalid field in parameter list",
    PARAMETER_NOT_SUPPORTED: "parameter not supported",
    PARAMETER_VALUE_INVALID: "parameter value invalid",
    WRITE_PROTECTED: "write protected",
    SPACE_ALLOCATION_FAILED_WRITE_PROTECT: "space allocation failed write protect",
    MODE_PARAMETERS_CHANGED: "mode parameters changed",
    COMMAND_SEQUENCE_ERROR: "command sequence error",
    SAVING_PARAMETERS_NOT_SUPPORTED: "saving parameters not supported",
    INTERNAL_TARGET_FAILURE: "internal target failure",
    INSUFFICIENT_RESOURCES: "insufficient resources",
}


def asc_name(asc: int, ascq: int) -> str:
    name = ASC_NAMES.get((asc, ascq))
    if name:
        return name
    if asc >= 0x80 or ascq >= 0x80:
        return f"vendor specific ASC/ASCQ 0x{asc:02x}/0x{ascq:02x}"
    return f"ASC/ASCQ 0x{asc:02x}/0x{ascq:02x}"


@dataclass(frozen=True)
class FieldPointer:
    """Where the bad field is: byte (and bit) in the CDB or the parameter list."""

    byte: int
    bit: int | None = None  # most significant bit of the field, None: not given
    cdb: bool = True  # C/D: True = the CDB, False = the parameter list

    def encode(self) -> bytes:
        b0 = 0x80 | (0x40 if self.cdb else 0)
        if self.bit is not None:
            b0 |= 0x08 | (self.bit & 0x7)
        return bytes((b0,)) + (self.byte & 0xFFFF).to_bytes(2, "big")


@dataclass(frozen=True)
class Sense:
    key: int
    asc: int = 0
    ascq: int = 0
    information: int | None = None  # INFORMATION field (e.g. a miscompare offset)
    field: FieldPointer | None = None  # ILLEGAL REQUEST field pointer
    sks: bytes | None = None  # other sense-key specific bytes (3), when field is None
    deferred: bool = False

    @classmethod
    def of(cls, key: int, code: tuple[int, int], **kw: object) -> Sense:
        return cls(key, code[0], code[1], **kw)  # type: ignore[arg-type]

    @property
    def code(self) -> tuple[int, int]:
        return (self.asc, self.ascq)

    def _sks(self) -> bytes | None:
        if self.field is not None:
            return self.field.encode()
        if self.sks is not None and len(self.sks) == 3 and self.sks[0] & 0x80:
            return self.sks
        return None

    def encode(self, descriptor: bool = False) -> bytes:
        sks = self._sks()
        if descriptor:
            body = bytearray()
            if self.information is not None:
                body += bytes((0x00, 0x0A, 0x80, 0x00))
                body += (self.information & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big")
            if sks is not None:
                body += bytes((0x02, 0x06, 0x00, 0x00)) + sks + b"\x00"
            head = bytes(
                (
                    0x73 if self.deferred else 0x72,
                    self.key & 0x0F,
                    self.asc & 0xFF,
                    self.ascq & 0xFF,
                    0,
                    0,
                    0,
                    len(body),
                )
            )
            return head + bytes(body)
        out = bytearray(FIXED_LEN)
        out[0] = 0x71 if self.deferred else 0x70
        if self.information is not None and 0 <= self.information <= 0xFFFFFFFF:
            out[0] |= 0x80
            out[3:7] = self.information.to_bytes(4, "big")
        out[2] = self.key & 0x0F
        out[7] = FIXED_LEN - 8
        out[12] = self.asc & 0xFF
        out[13] = self.ascq & 0xFF
        if sks is not None:
            out[15:18] = sks
        return bytes(out)

    def describe(self) -> str:
        """One line for people: 'ILLEGAL REQUEST: invalid field in CDB (byte 2 bit 5)'."""
        try:
            key = Key(self.key).name.replace("_", " ")
        except ValueError:
            key = f"sense key 0x{self.key:x}"
        text = f"{key}: {asc_name(self.asc, self.ascq)}"
        if self.field is not None:
            where = "CDB" if self.field.cdb else "parameter list"
            bit = f" bit {self.field.bit}" if self.field.bit is not None else ""
            text += f" ({where} byte {self.field.byte}{bit})"
        if self.information is not None:
            text += f" [information 0x{self.information:x}]"
        if self.deferred:
            text = "deferred error: " + text
        return text


class SenseError(Exception):
    """Raised inside command handlers: the command ends with CHECK CONDITION."""

    def __init__(self, sense: Sense, message: str = "") -> None:
        super().__init__(message or sense.describe())
        self.sense = sense


class SenseDecodeError(ValueError):
    """The bytes are not sense data this module understands."""


def decode(buf: bytes) -> Sense:
    """Parse fixed or descriptor format sense data (as an initiator receives it)."""
    if len(buf) < 2:
        raise SenseDecodeError(f"sense data too short ({len(buf)} bytes)")
    code = buf[0] & 0x7F
    if code in (0x70, 0x71):
        if len(buf) < 8:
            raise SenseDecodeError(f"fixed sense data too short ({len(buf)} bytes)")
        key = buf[2] & 0x0F
        asc = buf[12] if len(buf) > 12 else 0
        ascq = buf[13] if len(buf) > 13 else 0
        info = int.from_bytes(buf[3:7], "big") if buf[0] & 0x80 else None
        field = None
        sks = None
        if len(buf) >= 18 and buf[15] & 0x80:
            sks = bytes(buf[15:18])
            if key == Key.ILLEGAL_REQUEST:
                field = _field_from(sks)
                sks = None
        return Sense(key, asc, ascq, info, field, sks, deferred=code == 0x71)
    if code in (0x72, 0x73):
        if len(buf) < 8:
            raise SenseDecodeError(f"descriptor sense data too short ({len(buf)} bytes)")
        key = buf[1] & 0x0F
        asc, ascq = buf[2], buf[3]
        end = min(len(buf), 8 + buf[7])
        info = None
        field = None
        sks = None
        pos = 8
        while pos + 2 <= end:
            dtype, dlen = buf[pos], buf[pos + 1]
            d = bytes(buf[pos + 2 : pos + 2 + dlen])
            if dtype == 0x00 and dlen >= 0x0A and d[0] & 0x80:
                info = int.from_bytes(d[2:10], "big")
            elif dtype == 0x02 and dlen >= 0x06 and d[2] & 0x80:
                sks = d[2:5]
                if key == Key.ILLEGAL_REQUEST:
                    field = _field_from(sks)
                    sks = None
            pos += 2 + dlen
        return Sense(key, asc, ascq, info, field, sks, deferred=code == 0x73)
    raise SenseDecodeError(f"unknown sense response code 0x{buf[0]:02x}")


def _field_from(sks: bytes) -> FieldPointer:
    bit = sks[0] & 0x07 if sks[0] & 0x08 else None
    return FieldPointer(int.from_bytes(sks[1:3], "big"), bit, cdb=bool(sks[0] & 0x40))


# -- shorthands for the emulator --------------------------------------------------------------


def illegal(code: tuple[int, int], field: FieldPointer | None = None) -> SenseError:
    return SenseError(Sense.of(Key.ILLEGAL_REQUEST, code, field=field))


def bad_cdb(byte: int, bit: int | None = None) -> SenseError:
    """ILLEGAL REQUEST, INVALID FIELD IN CDB, pointing at byte/bit of the CDB."""
    return illegal(INVALID_FIELD_IN_CDB, FieldPointer(byte, bit, cdb=True))


def bad_param(byte: int, bit: int | None = None) -> SenseError:
    """ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST, pointing into the parameter list."""
    return illegal(INVALID_FIELD_IN_PARAMETER_LIST, FieldPointer(byte, bit, cdb=False))


def param_length_error() -> SenseError:
    return illegal(PARAMETER_LIST_LENGTH_ERROR)


def lba_out_of_range() -> SenseError:
    return illegal(LBA_OUT_OF_RANGE)
