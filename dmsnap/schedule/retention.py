"""Which of a schedule's snapshots it keeps. Pure logic, no I/O.

A schedule's snapshot is one *cut* (a snapshot group: every volume of the
schedule at one point in time); retention decides per cut. The rules
(docs/schedules.md, "Retention"):

* Timeline limits (``hourly``, ``daily``, ``weekly``, ``monthly``,
  ``yearly``: N each): among the cuts this schedule made, take the periods
  that hold at least one, newest first; in each of the newest N such
  periods the FIRST cut (the earliest) is kept. Periods are wall-clock
  periods in the schedule's time zone (weeks start on Monday).
* ``keep`` N: the newest N cuts are kept.
* The newest cut this schedule made is always kept.
* Every other cut the schedule made is pruned, unless it is *held* (in
  use: activated or exported); a held cut is never pruned and stays a
  candidate for later runs.
* No limit at all (no timeline limit and no ``keep``): nothing is pruned.
* Cuts the schedule did not make are never pruned and play no part.
* ``min_free``: when the pool's free data or metadata space is below the
  given percent, the runner deletes this schedule's cuts oldest first
  (:func:`space_order`), one at a time while it stays below, never the
  newest and never a held one.

The decision depends only on the set of cuts (not their order in the
input), and applying it twice prunes nothing more.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

CLASSES = ("hourly", "daily", "weekly", "monthly", "yearly")


@dataclass(frozen=True)
class Cut:
    """One snapshot group, as retention sees it."""

    key: Any  # the group id
    created: float  # UTC instant of the cut
    owned: bool = True  # made by this schedule
    held: bool = False  # in use: never pruned


@dataclass(frozen=True)
class Policy:
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    keep: int = 0  # the newest N
    min_free: int | None = None  # percent of the pool's data and metadata

    def __post_init__(self) -> None:
        for name in (*CLASSES, "keep"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 100000:
                raise ValueError(f"--keep-{name}: expected a count from 1 to 100000")
        if self.min_free is not None and not 1 <= self.min_free <= 99:
            raise ValueError("--min-free: expected a percent from 1 to 99")

    @property
    def limits(self) -> bool:
        return any(getattr(self, c) for c in CLASSES) or self.keep > 0

    def to_json(self) -> dict[str, int | None]:
        return {
            **{c: getattr(self, c) for c in CLASSES},
            "keep": self.keep,
            "min_free": self.min_free,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Policy:
        return cls(**{k: d[k] for k in (*CLASSES, "keep", "min_free") if k in d})

    def describe(self) -> str:
        parts = [f"{c} {getattr(self, c)}" for c in CLASSES if getattr(self, c)]
        if self.keep:
            parts.append(f"newest {self.keep}")
        text = ", ".join(parts) if parts else "every snapshot (no limits)"
        if self.min_free is not None:
            text += f"; oldest go first below {self.min_free}% free"
        return text


def _period(cls: str, tz: ZoneInfo) -> Callable[[float], tuple[int, ...]]:
    def key(t: float) -> tuple[int, ...]:
        w = dt.datetime.fromtimestamp(t, tz)
        if cls == "hourly":
            return (w.year, w.month, w.day, w.hour)
        if cls == "daily":
            return (w.year, w.month, w.day)
        if cls == "weekly":
            iso = w.isocalendar()
            return (iso.year, iso.week)
        if cls == "monthly":
            return (w.year, w.month)
        return (w.year,)

    return key


def _order(c: Cut) -> tuple[float, str]:
    # created, then key: a total order, so ties never depend on input order
    return (c.created, repr(c.key))


def reasons(cuts: Iterable[Cut], policy: Policy, tz: ZoneInfo) -> dict[Any, list[str]]:
    """Why each kept cut of this schedule is kept (``{key: ["daily", ...]}``);
    a cut it made that is not in here is not kept by any rule."""
    mine = sorted((c for c in cuts if c.owned), key=_order)
    out: dict[Any, list[str]] = {}
    if not mine:
        return out
    out.setdefault(mine[-1].key, []).append("newest")
    if policy.keep:
        for c in mine[-policy.keep :]:
            out.setdefault(c.key, []).append("keep")
    for cls in CLASSES:
        n = getattr(policy, cls)
        if not n:
            continue
        period = _period(cls, tz)
        firsts: dict[tuple[int, ...], Cut] = {}
        for c in mine:  # oldest first: the first seen of a period is its first
            firsts.setdefault(period(c.created), c)
        for p in sorted(firsts, reverse=True)[:n]:
            out.setdefault(firsts[p].key, []).append(cls)
    return out


def prune(cuts: Iterable[Cut], policy: Policy, tz: ZoneInfo) -> list[Any]:
    """The keys of the cuts to delete, oldest first."""
    cuts = list(cuts)
    if not policy.limits:
        return []
    kept = reasons(cuts, policy, tz)
    return [c.key for c in sorted(cuts, key=_order) if c.owned and not c.held and c.key not in kept]


def space_order(cuts: Iterable[Cut]) -> list[Any]:
    """Below the minimum free space: the keys to delete, oldest first, one
    at a time while the pool stays below it (never the newest, never held)."""
    mine = sorted((c for c in cuts if c.owned), key=_order)
    return [c.key for c in mine[:-1] if not c.held]
