"""Units as types where bugs hide: lengths and offsets in 512-byte sectors
(what device-mapper tables, dm-thin and the classic extents count in) and in
bytes (what users, the catalog and the journal count in). devicemapper-rs's
``Sectors``/``Bytes`` are the model: a conversion is named, never a
hand-written ``* 512`` or ``// 512``.

Both are ``int``: a kernel table or a catalog row takes them as they are.
"""

from __future__ import annotations

from dmsnap.rules import SECTOR


class Sectors(int):
    """A length or offset in 512-byte sectors."""

    __slots__ = ()

    @classmethod
    def of(cls, nbytes: int) -> Sectors:
        """The whole sectors in ``nbytes`` (rounded down, as a table's length)."""
        return cls(nbytes // SECTOR)

    def bytes(self) -> Bytes:
        return Bytes(int(self) * SECTOR)


class Bytes(int):
    """A length or offset in bytes."""

    __slots__ = ()

    @classmethod
    def of(cls, nsectors: int) -> Bytes:
        """``nsectors`` sectors, in bytes."""
        return cls(nsectors * SECTOR)

    def sectors(self) -> Sectors:
        return Sectors(int(self) // SECTOR)
