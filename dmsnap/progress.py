"""Progress of long work, reported by the code that does it.

The storage core, the journal and replication report through this one
narrow interface and know nothing of who listens: in dmsnapd the server
installs a sink per request that carries a progress token (the registry
:mod:`dmsnap.daemon.progress`, read by ``op.progress``); elsewhere (a test,
a tool) the sink may be anything, or nothing, and a report costs a context
variable lookup.

Reporting from new code (replication send/receive, for instance)::

    from dmsnap import progress

    task = progress.task("sending", total=nbytes, unit="bytes")
    for chunk in ...:
        ...
        task.advance(len(chunk))

``task`` and :func:`report` are safe to call whether or not anybody
listens, from the thread serving the request (the sink is per thread:
a context variable). Work done in another thread reports there with
:func:`bind`: ``threading.Thread(target=progress.bind(fn))``.

This module imports nothing of dmsnap: every layer may use it.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

UNITS = ("bytes", "steps", "records")


class Sink(Protocol):
    """Where reports go: the phase, how much of ``total`` is done (``total``
    None: not known yet), in ``unit``."""

    def __call__(self, phase: str, done: int, total: int | None, unit: str) -> None: ...


_sink: contextvars.ContextVar[Sink | None] = contextvars.ContextVar("dmsnap_progress", default=None)


def report(phase: str, done: int, total: int | None = None, unit: str = "bytes") -> None:
    """Say how far the current work is; a no-op when nobody listens."""
    sink = _sink.get()
    if sink is not None:
        sink(phase, done, total, unit)


def listening() -> bool:
    """Whether anybody listens (to skip computing a costly total)."""
    return _sink.get() is not None


@contextlib.contextmanager
def reporting_to(sink: Sink | None) -> Iterator[None]:
    """Reports made in this thread inside the block go to ``sink``."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)


def bind(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` reporting to the current sink, wherever (whichever thread) it runs."""
    ctx = contextvars.copy_context()
    return lambda *a, **kw: ctx.run(fn, *a, **kw)


class Task:
    """One phase of work: ``done`` out of ``total`` ``unit``. Reports in
    bytes and records are rate-limited (at most every :attr:`MIN_INTERVAL`
    s, plus the first and the last), so a caller may advance it per chunk."""

    MIN_INTERVAL = 0.05

    def __init__(self, phase: str, total: int | None, unit: str) -> None:
        if unit not in UNITS:
            raise ValueError(f"progress unit {unit!r}: expected one of {', '.join(UNITS)}")
        self.phase, self.total, self.unit = phase, total, unit
        self.done = 0
        self._sink = _sink.get()
        self._last = 0.0
        self._emit(force=True)

    def _emit(self, force: bool = False) -> None:
        if self._sink is None:
            return
        now = time.monotonic()
        end = self.total is not None and self.done >= self.total
        # steps are coarse: each is shown; bytes and records at a bounded rate
        if force or end or self.unit == "steps" or now - self._last >= self.MIN_INTERVAL:
            self._last = now
            self._sink(self.phase, self.done, self.total, self.unit)

    def update(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        self.done = done
        self._emit()

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n)


def task(phase: str, total: int | None = None, unit: str = "bytes") -> Task:
    """A new phase of the current work (reported at once, at 0)."""
    return Task(phase, total, unit)
