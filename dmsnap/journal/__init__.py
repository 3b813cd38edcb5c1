"""The ordered journal (cache): FIFO of writes and markers, flusher, recovery.

The hot path is C (``csrc/journal.c``, cffi module ``dmsnap._hotpath``, built by ``csrc/build.py``);
:class:`Journal` is its thin Python face.
"""

from dmsnap.journal.journal import (
    Journal,
    JournalCorrupt,
    JournalError,
    JournalStats,
    Marker,
    Recovery,
)

__all__ = ["Journal", "JournalCorrupt", "JournalError", "JournalStats", "Marker", "Recovery"]
