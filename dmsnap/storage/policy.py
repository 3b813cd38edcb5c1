"""A pool's policy, changed by ``pool set``: how COW areas grow (for a
backend whose snapshots have areas of their own) and how much RAM an NV
journal's unflushed records may take; and the daemon's autoextend tick
that applies the first.
"""

from __future__ import annotations

import logging
from typing import Any

from dmsnap import errors as E
from dmsnap.dm import DmError
from dmsnap.storage.backend import journal_mode
from dmsnap.storage.catalog import Catalog, Pool
from dmsnap.storage.journals import PoolJournals
from dmsnap.storage.stack import BACKENDS, PoolStack, check_journal_memory

log = logging.getLogger("dmsnap.storage")


class PoolPolicy:
    def __init__(
        self,
        catalog: Catalog,
        stack: PoolStack,
        journals: PoolJournals,
        pool_errors: dict[str, str],
    ) -> None:
        self.catalog, self.stack, self.journals = catalog, stack, journals
        self._pool_errors = pool_errors
        self._cannot_grow: set[str] = set()  # COW areas logged as not growable

    def set(
        self,
        p: Pool,
        *,
        cow_autoextend_threshold: int | None,
        cow_autoextend_percent: int | None,
        journal_memory: int | None,
    ) -> dict[str, Any]:
        """Check every change, then make them all (the journal's limit at
        once, the catalog's config). Returns what changed."""
        changes: dict[str, Any] = {
            k: v
            for k, v in (
                ("cow_autoextend_threshold", cow_autoextend_threshold),
                ("cow_autoextend_percent", cow_autoextend_percent),
            )
            if v is not None
        }
        if not changes and journal_memory is None:
            raise E.InvalidArgument("nothing to set")
        if journal_memory is not None:
            check_journal_memory(journal_memory, journal_mode(p))
        if changes and not BACKENDS[p.backend].snapshot_areas:
            raise E.InvalidArgument(
                f"pool {p.name} is {p.backend}: COW autoextend is for classic pools"
            )
        t = changes.get("cow_autoextend_threshold")
        if t is not None and not 50 <= t <= 100:
            raise E.InvalidArgument("--cow-autoextend-threshold is a percentage, 50 to 100 (off)")
        pc = changes.get("cow_autoextend_percent")
        if pc is not None and not 1 <= pc <= 1000:
            raise E.InvalidArgument("--cow-autoextend-percent is 1 to 1000")
        config = {**p.config, **changes}
        if journal_memory is not None:
            pj = self.journals.by_pool.get(p.id)
            if pj is not None:  # a lower limit makes writers wait for the flusher
                pj.journal.set_mem_limit(journal_memory)
            config["journal"] = {**p.config["journal"], "memory": journal_memory}
            changes["journal_memory"] = journal_memory
        self.catalog.update_pool(p.id, config=config)
        return changes

    def autoextend(self) -> None:
        """Grow COW areas that passed their pool's threshold. Logs each
        growth, and once per snapshot that it cannot grow."""
        for p in self.catalog.pools():
            if not BACKENDS[p.backend].snapshot_areas or p.name in self._pool_errors:
                continue
            try:
                lines = self.stack.backend(p).autoextend()
            except (E.UserError, DmError, OSError) as e:
                log.error("pool %s: COW autoextend failed: %s", p.name, getattr(e, "message", e))
                continue
            for line in lines:
                key = line.split(":", 1)[0]
                if "grown by" in line:
                    self._cannot_grow.discard(key)
                    log.info("pool %s: %s", p.name, line)
                elif key not in self._cannot_grow:
                    self._cannot_grow.add(key)
                    log.warning("pool %s: %s", p.name, line)
