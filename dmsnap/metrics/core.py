"""The storage core as the metrics see it (:class:`~dmsnap.metrics.collector.StorageView`),
over the Manager's public face: ``status``, ``snapshot_list``,
``export_list`` (each takes the control lock itself), and for the lag
clock the running journals (``catalog.pools`` + ``journal_of``, as the
exports read them). Duck-typed: this package does not import the core."""

from __future__ import annotations

from typing import Any

Json = dict[str, Any]


class ManagerView:
    def __init__(self, manager: Any) -> None:
        self._m = manager
        self._journals: dict[str, Any] = {}

    def status(self) -> Json:
        return self._m.status()

    def snapshot_list(self) -> list[Json]:
        return self._m.snapshot_list()

    def export_list(self) -> list[Json]:
        return self._m.export_list()

    def journal_stats(self) -> dict[str, Any]:
        """Pool name -> its running journal's counters. Which journals run
        is re-read when the control lock is free at once; while a long
        operation holds it, the last list serves (a journal's counters
        stay readable after it stops)."""
        lock = self._m.lock
        if lock.acquire(blocking=False):
            try:
                found = {p.name: self._m.journal_of(p) for p in self._m.catalog.pools()}
                self._journals = {k: v for k, v in found.items() if v is not None}
            finally:
                lock.release()
        return {name: pj.stats() for name, pj in self._journals.items()}
