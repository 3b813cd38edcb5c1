"""The ordered journal (cache): FIFO of writes and markers, flusher, recovery.

The hot path is C (``csrc/journal.c``, cffi module ``dmsnap._hotpath``, built by ``csrc/build.py``);
:class:`Journal` is its thin Python face; ``service.PoolJournal`` runs one
pool's journal (volumes, the marker thread). Below the storage core: it
imports only ``errors`` and ``storage.devices`` (the O_EXCL holds); what a
marker does is handed in by the storage core.
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
