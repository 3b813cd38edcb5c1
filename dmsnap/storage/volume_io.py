"""The data path of one journaled volume: what a local writer (the CLI's
``volume write``, tests, bench) and the SCSI target's LUNs use.

No control lock here: the journal is safe for many threads, and a write
must never wait for a control operation.
"""

from __future__ import annotations

from dmsnap import errors as E
from dmsnap.journal.journal import JournalError
from dmsnap.journal.service import PoolJournal
from dmsnap.rules import SECTOR
from dmsnap.storage._common import journal_error


class VolumeIO:
    """A handle on one journaled volume. Offsets and lengths in bytes,
    multiples of 512; reads see every acknowledged write."""

    def __init__(self, pj: PoolJournal, vol_id: int, size: int, ref: str) -> None:
        self._pj, self.vol_id, self.size, self.ref = pj, vol_id, size, ref

    def _check(self, offset: int, length: int) -> None:
        if offset % SECTOR or length % SECTOR or offset < 0 or length <= 0:
            raise E.InvalidArgument(
                f"{self.ref}: offset {offset} and length {length} must be positive multiples of 512"
            )
        if offset + length > self.size:
            raise E.InvalidArgument(
                f"{self.ref}: {length} bytes at {offset} go beyond the volume's {self.size} bytes"
            )

    def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> int:
        self._check(offset, len(data))
        try:
            return self._pj.write(self.vol_id, offset, data, fua=fua)
        except JournalError as e:
            raise journal_error(e) from None

    def to_end(self, offset: int) -> int:
        """The length from ``offset`` to the volume's end."""
        if offset >= self.size:
            raise E.InvalidArgument(
                f"{self.ref}: offset {offset} is not inside the volume ({self.size} bytes)"
            )
        return self.size - offset

    def discard(self, offset: int, length: int) -> int:
        """The range reads zeros from now on; its space goes back to the pool
        (thin: whole thin blocks) once the journal's flusher reaches it, in
        order with the writes and snapshots around it."""
        self._check(offset, length)
        try:
            return self._pj.discard(self.vol_id, offset, length)
        except JournalError as e:
            raise journal_error(e) from None

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        try:
            return self._pj.read(self.vol_id, offset, length)
        except JournalError as e:
            raise journal_error(e) from None

    def flush(self) -> None:
        try:
            self._pj.flush()
        except JournalError as e:
            raise journal_error(e) from None
