"""The ordered journal (cache): FIFO of writes and markers, flusher, recovery.

The hot path is C (``csrc/journal.c``, cffi module ``dmsnap._hotpath``, built by ``csrc/build.py``);
:class:`Journal` is its thin Python face; ``service.PoolJournal`` runs one
pool's journal (volumes, the marker thread). Below the storage core: it
imports nothing of dmsnap's but its C module; what a marker does and the
exclusive holds on the volumes are handed in by the storage core.
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
