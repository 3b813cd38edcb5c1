"""SG_IO: the initiator side's one way to send a SCSI command
(``struct sg_io_hdr`` from <scsi/sg.h> through cffi). Works on /dev/sdX and
/dev/sgN alike."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from dmsnap.scsi._sgffi import ffi, lib

SENSE_MAX = 96
DEFAULT_TIMEOUT_MS = 60_000


class SgError(OSError):
    """The command never got a SCSI status (no device, not SCSI, transport)."""


@dataclass(frozen=True)
class SgResult:
    status: int  # SCSI status: 0 GOOD, 2 CHECK CONDITION, 8 BUSY...
    data: bytes  # Data-In actually transferred
    sense: bytes
    host_status: int
    driver_status: int

    @property
    def good(self) -> bool:
        return self.status == 0 and not self.host_status and not (self.driver_status & 0x0F)


def sg_io(
    device: str,
    cdb: bytes,
    *,
    data_out: bytes | None = None,
    data_in_len: int = 0,
    timeout_ms: int = DEFAULT_TIMEOUT_MS,
) -> SgResult:
    if data_out is not None and data_in_len:
        raise ValueError("one data direction per command")
    try:
        try:
            fd = os.open(device, os.O_RDWR | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.EROFS:
                raise
            # a write-protected disk (an exported snapshot) opens read-only;
            # SG_IO still sends any command to it (CAP_SYS_RAWIO decides)
            fd = os.open(device, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise SgError(e.errno, f"{device}: {e.strerror}") from None
    try:
        hdr = ffi.new("sg_io_hdr_t *")
        cmd = ffi.new("unsigned char[]", cdb)
        sense = ffi.new("unsigned char[]", SENSE_MAX)
        hdr.interface_id = ord("S")
        hdr.cmd_len = len(cdb)
        hdr.cmdp = cmd
        hdr.mx_sb_len = SENSE_MAX
        hdr.sbp = sense
        hdr.timeout = timeout_ms
        buf = ffi.NULL
        if data_out is not None:
            buf = ffi.new("unsigned char[]", data_out or b"\0")
            hdr.dxfer_direction = lib.SG_DXFER_TO_DEV
            hdr.dxfer_len = len(data_out)
        elif data_in_len:
            buf = ffi.new("unsigned char[]", data_in_len)
            hdr.dxfer_direction = lib.SG_DXFER_FROM_DEV
            hdr.dxfer_len = data_in_len
        else:
            hdr.dxfer_direction = lib.SG_DXFER_NONE
        hdr.dxferp = buf
        if lib.ioctl(fd, lib.SG_IO, hdr) < 0:
            err = ffi.errno
            why = "not a SCSI device" if err in (errno.ENOTTY, errno.EINVAL) else os.strerror(err)
            raise SgError(err, f"{device}: SG_IO: {why}")
        got = max(0, hdr.dxfer_len - hdr.resid) if data_in_len else 0
        return SgResult(
            status=hdr.status,
            data=bytes(ffi.buffer(buf, got)) if got else b"",
            sense=bytes(ffi.buffer(sense, hdr.sb_len_wr)),
            host_status=hdr.host_status,
            driver_status=hdr.driver_status,
        )
    finally:
        os.close(fd)
