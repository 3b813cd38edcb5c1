"""dmsnapd's progress registry: how far each long request is.

A client that wants to show progress sends a token of its choosing with the
request (the envelope's ``progress`` field, see :mod:`.protocol`); while the
request runs, the work it does reports through :mod:`dmsnap.progress` into
an entry under that token, and ``op.progress TOKEN`` (on another
connection) reads it. The registry has its own small lock and never takes
the Manager's control lock, so a progress read is answered while the
request holds it (a classic merge does).

Bounded: an entry is live while its request runs (at most one per
connection, and connections are bounded), and kept :data:`KEEP_DONE`
seconds after it ends (so the last poll sees the end), at most
:data:`MAX_DONE` of those.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from dmsnap import progress
from dmsnap.errors import Busy, NotFound

KEEP_DONE = 60.0
MAX_DONE = 256
MAX_PHASES = 32  # per request: the phases a work reports are few and fixed


@dataclass
class Entry:
    op: str
    state: str = "running"  # running, done, failed
    phase: str = ""
    done: int = 0
    total: int | None = None
    unit: str = "steps"
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    # every phase as last reported, in the order begun: a phase that ended
    # between two reads still shows how far it got
    phases: dict[str, tuple[int, int | None, str]] = field(default_factory=dict)

    def as_json(self, token: str) -> dict[str, Any]:
        d = asdict(self)
        now = self.ended if self.ended is not None else time.monotonic()
        d["elapsed"] = round(now - d.pop("started"), 3)
        d.pop("ended")
        d["token"] = token
        d["phases"] = [
            {"phase": ph, "done": done, "total": total, "unit": unit}
            for ph, (done, total, unit) in self.phases.items()
        ]
        return d


class Registry:
    def __init__(self, keep_done: float = KEEP_DONE, max_done: int = MAX_DONE) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, Entry] = {}
        self._done: OrderedDict[str, Entry] = OrderedDict()
        self.keep_done, self.max_done = keep_done, max_done

    @contextlib.contextmanager
    def track(self, token: str, op: str) -> Iterator[Entry]:
        """The request under ``token``: its work's reports land in the entry
        (in this thread) until the block ends, then it is done or failed."""
        entry = Entry(op)
        with self._lock:
            if token in self._running:
                raise Busy(f"progress token {token!r} is already in use by a running request")
            self._done.pop(token, None)
            self._running[token] = entry

        def sink(phase: str, done: int, total: int | None, unit: str) -> None:
            # Plain stores under the lock: a reader sees one report whole.
            with self._lock:
                entry.phase, entry.done, entry.total, entry.unit = phase, done, total, unit
                if phase in entry.phases or len(entry.phases) < MAX_PHASES:
                    entry.phases[phase] = (done, total, unit)

        ok = False
        try:
            with progress.reporting_to(sink):
                yield entry
            ok = True
        finally:
            with self._lock:
                entry.state = "done" if ok else "failed"
                entry.ended = time.monotonic()
                del self._running[token]
                self._done[token] = entry
                self._expire()

    def _expire(self) -> None:
        now = time.monotonic()
        while self._done:
            token, e = next(iter(self._done.items()))
            if len(self._done) > self.max_done or now - (e.ended or now) > self.keep_done:
                del self._done[token]
            else:
                break

    def get(self, token: str) -> dict[str, Any]:
        with self._lock:
            self._expire()
            entry = self._running.get(token) or self._done.get(token)
            if entry is None:
                raise NotFound(
                    f"no request with progress token {token!r} (not begun, or long done)"
                )
            return entry.as_json(token)
