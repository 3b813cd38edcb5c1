"""Showing the progress of long work: a bar on a terminal, quiet in scripts.

:func:`choose` decides from the ``--progress/--no-progress`` choice
(``DMSNAP_PROGRESS=1/0``), ``--json`` and whether stderr is a terminal:

* stderr a terminal, no ``--json``, no ``--no-progress``: a rich progress
  bar on stderr (phase, bar, done/total, rate, time left);
* ``--progress`` where stderr is no terminal (a log): a plain line on
  stderr when the phase changes and at most every :data:`LINE_EVERY` s;
* otherwise nothing. Progress never goes to stdout, so ``--json`` output
  stays one JSON document even with ``--progress``.

A view is called with what ``op.progress`` answers (a dict with ``phase``,
``done``, ``total``, ``unit``, ``state``; :mod:`dmsnap.daemon.progress`).
"""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from dmsnap.sizes import format_size

LINE_EVERY = 2.0
ENV = "DMSNAP_PROGRESS"


def env_choice() -> bool | None:
    """DMSNAP_PROGRESS: 1 (on) or 0 (off); unset or anything else: auto."""
    v = os.environ.get(ENV, "").strip().lower()
    if v in ("1", "yes", "true", "on"):
        return True
    if v in ("0", "no", "false", "off"):
        return False
    return None


def amount(n: float, unit: str) -> str:
    if unit == "bytes":
        return format_size(int(n))
    return f"{int(n)}"


def _of(done: float, total: float | None, unit: str) -> str:
    word = "" if unit == "bytes" else f" {unit}"
    if total is None:
        return f"{amount(done, unit)}{word}"
    return f"{amount(done, unit)}/{amount(total, unit)}{word}"


class _Amount(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(_of(task.completed, task.total, task.fields.get("unit", "steps")))


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("")
        unit = task.fields.get("unit", "steps")
        if unit == "bytes":
            return Text(f"{format_size(int(speed))}/s")
        return Text(f"{speed:.1f} {unit}/s")


class View:
    """Base: shows nothing."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> View:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(ok=t is None)

    def update(self, p: dict[str, Any]) -> None:
        pass

    def close(self, ok: bool) -> None:
        pass


class BarView(View):
    """A rich progress bar on a terminal; one task per phase."""

    def __init__(self, what: str, stream: TextIO) -> None:
        super().__init__(what)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            _Amount(),
            _Rate(),
            TimeRemainingColumn(),
            console=Console(file=stream, force_terminal=True),
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {}  # a row per phase, kept as it ended

    def __enter__(self) -> View:
        self.progress.start()
        return self

    def update(self, p: dict[str, Any]) -> None:
        for phase, done, total, unit in _phases(p):
            if phase not in self.tasks:
                self.tasks[phase] = self.progress.add_task(
                    f"{self.what}: {phase}", total=total, completed=0, unit=unit
                )
            self.progress.update(self.tasks[phase], total=total, completed=done, unit=unit)

    def close(self, ok: bool) -> None:
        self.progress.stop()


class LineView(View):
    """Plain lines (stderr is a log, and progress was asked for)."""

    def __init__(self, what: str, stream: TextIO) -> None:
        super().__init__(what)
        self.stream = stream
        self.phase: str | None = None
        self.last = 0.0
        self.pending: str | None = None
        self.written: str | None = None
        self.seen: dict[str, tuple[int, int | None]] = {}

    def update(self, p: dict[str, Any]) -> None:
        phases = _phases(p)
        if not phases:
            return
        cur = _current(p) if p.get("phase") else phases[-1]
        for phase, done, total, unit in phases:
            if phase != cur[0] and self.seen.get(phase) != (done, total):
                # a phase that moved on since the last read: how far it got
                self._write(self._line(phase, done, total, unit))
            self.seen[phase] = (done, total)
        phase, done, total, unit = cur
        line = self._line(phase, done, total, unit)
        now = time.monotonic()
        end = total is not None and done >= total
        if phase != self.phase or end or now - self.last >= LINE_EVERY:
            if line != self.written:
                self._write(line)
            self.phase, self.last = phase, now
        else:
            self.pending = line

    def _line(self, phase: str, done: int, total: int | None, unit: str) -> str:
        line = f"dmsnap: {self.what}: {phase} {_of(done, total, unit)}"
        if total:
            line += f" ({100 * done // total}%)"
        return line

    def _write(self, line: str) -> None:
        self.pending = None
        self.written = line
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self, ok: bool) -> None:
        if self.pending is not None and self.pending != self.written:
            self._write(self.pending)


def _current(p: dict[str, Any]) -> tuple[str, int, int | None, str]:
    return (
        str(p.get("phase") or ""),
        int(p.get("done") or 0),
        p.get("total"),
        str(p.get("unit") or "steps"),
    )


def _phases(p: dict[str, Any]) -> list[tuple[str, int, int | None, str]]:
    """Every phase reported so far, the current one last-updated; nothing
    if the work has reported nothing yet."""
    out = [
        (str(x["phase"]), int(x["done"]), x.get("total"), str(x.get("unit") or "steps"))
        for x in p.get("phases") or []
    ]
    if not out and p.get("phase"):
        out = [_current(p)]
    return out


def choose(what: str, choice: bool | None, json_out: bool, stream: TextIO | None = None) -> View:
    """The view for one long command (see the module's docstring)."""
    stream = stream or sys.stderr
    if choice is None:
        choice = env_choice()
    tty = stream.isatty()
    if choice is False or (choice is None and (json_out or not tty)):
        return View(what)
    return BarView(what, stream) if tty else LineView(what, stream)


class Trials:
    """A campaign's progress line after each trial (tools/torture): where it
    is, how long it has run and how long it may still take. Printed only on
    a terminal or with DMSNAP_PROGRESS=1 (tools/torture sets it when its
    stderr is a terminal: the guest's is not)."""

    def __init__(self, name: str, total: int, budget: float | None = None) -> None:
        self.name, self.total, self.budget = name, total, budget
        self.t0 = time.monotonic()
        choice = env_choice()
        self.on = choice if choice is not None else sys.stderr.isatty()

    def line(self, done: int, now: float | None = None) -> str:
        el = (now if now is not None else time.monotonic()) - self.t0
        left = el / done * (self.total - done) if done else None
        if self.budget is not None:
            rest = max(0.0, self.budget - el)
            left = rest if left is None else min(left, rest)
        pct = 100 * done // max(self.total, 1)
        eta = "" if left is None else f", about {_duration(left)} left"
        return f"{self.name}: {done}/{self.total} trials ({pct}%), {_duration(el)} elapsed{eta}"

    def step(self, done: int) -> None:
        if self.on:
            sys.stderr.write(self.line(done) + "\n")
            sys.stderr.flush()


def _duration(secs: float) -> str:
    s = round(secs)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
