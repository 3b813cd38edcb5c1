"""When a schedule runs: ``--every DURATION`` and ``--calendar SPEC``.

Pure logic, no I/O and no clock: every function takes the instants it
needs (UTC, seconds since the epoch). The grammar, the time-zone rules and
catch-up are documented in docs/schedules.md; in short:

* ``--every``: slots are ``anchor + k * interval`` in real elapsed time
  (UTC); the time zone plays no part.
* ``--calendar``: slots are wall-clock times in the schedule's zone. A wall
  time that occurs twice (DST ends) runs at its first occurrence only; one
  that does not exist (DST starts) runs at the instant the gap ends (its
  ``fold=0`` reading, PEP 495). Each wall-clock slot runs at most once.
* :func:`due`: a slot runs only if it is later than the last run's slot,
  so a clock stepped back never repeats a period; after downtime (or a
  clock stepped forward) every missed slot together makes one run,
  attributed to the latest of them.
"""

from __future__ import annotations

import calendar as _cal
import datetime as dt
import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

UTC = dt.UTC
_UTC_ZONE = ZoneInfo("UTC")

MIN_EVERY = 1  # seconds
MAX_EVERY = 366 * 86400
# A calendar that matches nothing within this many years never matches
# (the longest real cycle is a weekday on 29 February: 28 years).
_HORIZON_YEARS = 30

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"(\d+)\s*([smhdw])")

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")

SHORTHANDS = {
    "minutely": "*-*-* *:*:00",
    "hourly": "*-*-* *:00:00",
    "daily": "*-*-* 00:00:00",
    "weekly": "Mon *-*-* 00:00:00",
    "monthly": "*-*-01 00:00:00",
    "yearly": "*-01-01 00:00:00",
    "annually": "*-01-01 00:00:00",
}


class SpecError(ValueError):
    """A schedule specification the user gave is not valid (one line)."""


def parse_duration(text: str) -> int:
    """``30s``, ``5m``, ``1h30m``, ``2d``, ``1w``, or plain seconds; whole
    seconds from 1 s to 366 days."""
    t = text.strip().lower()
    if t.isdigit():
        secs = int(t)
    else:
        pos, secs = 0, 0
        for m in _DURATION_RE.finditer(t):
            if m.start() != pos and t[pos : m.start()].strip():
                break
            secs += int(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos == 0 or t[pos:].strip():
            raise SpecError(f"--every {text!r}: expected a duration such as 30s, 5m, 1h30m, 1d, 1w")
    if not MIN_EVERY <= secs <= MAX_EVERY:
        raise SpecError(f"--every {text!r}: must be from 1s to 366d")
    return secs


def format_duration(secs: int) -> str:
    out = []
    for unit, n in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if secs >= n:
            out.append(f"{secs // n}{unit}")
            secs %= n
    return "".join(out) or "0s"


def zone(name: str) -> ZoneInfo:
    """An IANA time zone by name (``UTC``, ``Europe/Berlin``)."""
    if not name or name.startswith("/") or ".." in name:
        raise SpecError(f"--tz {name!r}: expected an IANA time zone such as UTC or Europe/Berlin")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise SpecError(
            f"--tz {name!r}: unknown time zone (expected an IANA name such as Europe/Berlin)"
        ) from None


# ----------------------------------------------------------------- calendar


def _values(text: str, lo: int, hi: int, what: str) -> frozenset[int]:
    """``*``, ``N``, ``N..M``, ``N/S``, ``N..M/S``, ``*/S``, comma-separated."""
    out: set[int] = set()
    for item in text.split(","):
        rng, slash, step_s = item.partition("/")
        step = 1
        if slash:
            if not step_s.isdigit() or int(step_s) < 1:
                raise SpecError(f"{what} {item!r}: the step after '/' must be a number >= 1")
            step = int(step_s)
        if rng == "*":
            a, b = lo, hi
        elif ".." in rng:
            a_s, _, b_s = rng.partition("..")
            if not (a_s.isdigit() and b_s.isdigit()):
                raise SpecError(f"{what} {item!r}: expected N..M")
            a, b = int(a_s), int(b_s)
        elif rng.isdigit():
            a = int(rng)
            b = hi if slash else a
        else:
            raise SpecError(f"{what} {item!r}: expected *, a number, N..M or N/STEP")
        if not (lo <= a <= hi and lo <= b <= hi) or a > b:
            raise SpecError(f"{what} {item!r}: out of range {lo}..{hi}")
        out.update(range(a, b + 1, step))
    return frozenset(out)


def _day(text: str) -> int:
    t = text.lower()
    if t in DAYS:
        return DAYS.index(t)
    if t in _FULL_DAYS:
        return _FULL_DAYS.index(t)
    raise SpecError(f"weekday {text!r}: expected Mon, Tue, Wed, Thu, Fri, Sat or Sun")


def _weekdays(text: str) -> frozenset[int]:
    out: set[int] = set()
    for item in text.split(","):
        a_s, dots, b_s = item.partition("..")
        a = _day(a_s)
        b = _day(b_s) if dots else a
        if a > b:
            raise SpecError(f"weekdays {item!r}: write ranges Monday first (Mon..Sun)")
        out.update(range(a, b + 1))
    return frozenset(out)


@dataclass(frozen=True)
class Calendar:
    """A parsed calendar spec: the sets of wall-clock values that match."""

    text: str
    weekdays: frozenset[int]  # 0 = Monday
    years: frozenset[int] | None  # None: every year
    months: frozenset[int]
    days: frozenset[int]
    hours: frozenset[int]
    minutes: frozenset[int]
    seconds: frozenset[int]

    def matches(self, w: dt.datetime) -> bool:
        return self._date_ok(w.date()) and (
            w.hour in self.hours and w.minute in self.minutes and w.second in self.seconds
        )

    def _date_ok(self, d: dt.date) -> bool:
        return (
            (self.years is None or d.year in self.years)
            and d.month in self.months
            and d.day in self.days
            and d.weekday() in self.weekdays
        )


def parse_calendar(text: str) -> Calendar:
    """Parse a systemd-calendar-like spec (the subset in docs/schedules.md):
    ``[WEEKDAYS] [[YEAR-]MONTH-DAY] [HOUR:MINUTE[:SECOND]]`` or a shorthand."""
    raw = " ".join(text.split())
    if not raw:
        raise SpecError("--calendar: empty specification")
    spec = SHORTHANDS.get(raw.lower(), raw)
    parts = spec.split(" ")
    weekdays = frozenset(range(7))
    if parts and parts[0][:1].isalpha():
        weekdays = _weekdays(parts.pop(0))
    date_s = time_s = None
    for p in parts:
        if ":" in p and time_s is None:
            time_s = p
        elif "-" in p and date_s is None and time_s is None:
            date_s = p
        else:
            raise SpecError(
                f"--calendar {text!r}: cannot read {p!r} "
                "(expected [WEEKDAYS] [[YEAR-]MONTH-DAY] [HOUR:MINUTE[:SECOND]])"
            )
    years: frozenset[int] | None = None
    months = frozenset(range(1, 13))
    days = frozenset(range(1, 32))
    if date_s is not None:
        dparts = date_s.split("-")
        if len(dparts) == 3:
            y = dparts.pop(0)
            if y != "*":
                years = _values(y, 1970, 9999, "year")
        if len(dparts) != 2:
            raise SpecError(f"--calendar date {date_s!r}: expected [YEAR-]MONTH-DAY")
        months = _values(dparts[0], 1, 12, "month")
        days = _values(dparts[1], 1, 31, "day")
    hours, minutes, seconds = frozenset({0}), frozenset({0}), frozenset({0})
    if time_s is not None:
        tparts = time_s.split(":")
        if len(tparts) not in (2, 3):
            raise SpecError(f"--calendar time {time_s!r}: expected HOUR:MINUTE[:SECOND]")
        hours = _values(tparts[0], 0, 23, "hour")
        minutes = _values(tparts[1], 0, 59, "minute")
        if len(tparts) == 3:
            seconds = _values(tparts[2], 0, 59, "second")
    cal = Calendar(raw, weekdays, years, months, days, hours, minutes, seconds)
    # every year in a 28-year cycle (weekdays and leap days repeat), or the years named
    check_years = sorted(years) if years is not None else range(2000, 2000 + _HORIZON_YEARS)
    if not any(
        cal._date_ok(dt.date(y, m, d))
        for y in check_years
        for m in months
        for d in days
        if d <= _cal.monthrange(y, m)[1]
    ):
        raise SpecError(f"--calendar {text!r}: matches no date")
    return cal


# ---------------------------------------------------------- stepping (wall clock)


def _next_in(values: frozenset[int], v: int) -> int | None:
    return min((x for x in values if x >= v), default=None)


def _prev_in(values: frozenset[int], v: int) -> int | None:
    return max((x for x in values if x <= v), default=None)


_ONE_S = dt.timedelta(seconds=1)


def _wall_forward(cal: Calendar, w: dt.datetime, limit: dt.date) -> dt.datetime | None:
    """The first matching naive wall time >= ``w`` (before ``limit``)."""
    while w.date() < limit:
        if not cal._date_ok(w.date()):
            w = dt.datetime.combine(w.date() + dt.timedelta(days=1), dt.time())
            continue
        h = _next_in(cal.hours, w.hour)
        if h is None:
            w = dt.datetime.combine(w.date() + dt.timedelta(days=1), dt.time())
            continue
        if h != w.hour:
            w = w.replace(hour=h, minute=0, second=0)
        m = _next_in(cal.minutes, w.minute)
        if m is None:
            w = w.replace(minute=0, second=0) + dt.timedelta(hours=1)
            continue
        if m != w.minute:
            w = w.replace(minute=m, second=0)
        s = _next_in(cal.seconds, w.second)
        if s is None:
            w = w.replace(second=0) + dt.timedelta(minutes=1)
            continue
        return w.replace(second=s)
    return None


def _wall_backward(cal: Calendar, w: dt.datetime, limit: dt.date) -> dt.datetime | None:
    """The last matching naive wall time <= ``w`` (after ``limit``)."""
    end_of_day = dt.time(23, 59, 59)
    while w.date() > limit:
        if not cal._date_ok(w.date()):
            w = dt.datetime.combine(w.date() - dt.timedelta(days=1), end_of_day)
            continue
        h = _prev_in(cal.hours, w.hour)
        if h is None:
            w = dt.datetime.combine(w.date() - dt.timedelta(days=1), end_of_day)
            continue
        if h != w.hour:
            w = w.replace(hour=h, minute=59, second=59)
        m = _prev_in(cal.minutes, w.minute)
        if m is None:
            w = w.replace(minute=59, second=59) - dt.timedelta(hours=1)
            continue
        if m != w.minute:
            w = w.replace(minute=m, second=59)
        s = _prev_in(cal.seconds, w.second)
        if s is None:
            w = w.replace(second=59) - dt.timedelta(minutes=1)
            continue
        return w.replace(second=s)
    return None


def _instant(w: dt.datetime, tz: ZoneInfo) -> float:
    """A wall time's instant: fold=0, i.e. the first occurrence of a repeated
    time, and for a time in a gap the instant the gap ends plus its offset
    into it (PEP 495)."""
    return w.replace(tzinfo=tz, fold=0).timestamp()


def _wall(t: float, tz: ZoneInfo) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, tz).replace(tzinfo=None, fold=0)


# ------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Schedule:
    """When: an interval from an anchor, or a calendar in a time zone."""

    every: int | None = None  # seconds
    anchor: float = 0.0  # UTC instant the --every slots count from
    calendar: Calendar | None = None
    tz: ZoneInfo = _UTC_ZONE

    @classmethod
    def make(
        cls, *, every: str | int | None, calendar: str | None, tz: str = "UTC", anchor: float = 0.0
    ) -> Schedule:
        if (every is None) == (calendar is None):
            raise SpecError("give exactly one of --every DURATION or --calendar SPEC")
        zi = zone(tz)
        if every is not None:
            secs = every if isinstance(every, int) else parse_duration(every)
            if not MIN_EVERY <= secs <= MAX_EVERY:
                raise SpecError("--every: must be from 1s to 366d")
            return cls(every=secs, anchor=float(int(anchor)), tz=zi)
        assert calendar is not None
        return cls(calendar=parse_calendar(calendar), tz=zi)

    def describe(self) -> str:
        if self.every is not None:
            return f"every {format_duration(self.every)}"
        assert self.calendar is not None
        return f"calendar {self.calendar.text} ({self.tz.key})"

    def next_after(self, t: float) -> float | None:
        """The first slot strictly after instant ``t``; None: never again."""
        if self.every is not None:
            k = (t - self.anchor) // self.every + 1
            return self.anchor + max(k, 0) * self.every
        cal = self.calendar
        assert cal is not None
        w = _wall(int(t), self.tz) + _ONE_S
        limit = dt.date(min(w.year + _HORIZON_YEARS, 9999), 1, 1)
        while True:
            found = _wall_forward(cal, w, limit)
            if found is None:
                return None
            u = _instant(found, self.tz)
            if u > t:
                return u
            # A repeated wall time whose first occurrence is already past
            # (t is in the second occurrence): it ran once; go on.
            w = found + _ONE_S

    def at_or_before(self, t: float) -> float | None:
        """The last slot at or before instant ``t``; None: none ever."""
        if self.every is not None:
            if t < self.anchor:
                return None
            return self.anchor + ((t - self.anchor) // self.every) * self.every
        cal = self.calendar
        assert cal is not None
        w = _wall(int(t), self.tz)
        limit = dt.date(max(w.year - _HORIZON_YEARS, 1), 1, 1)
        while True:
            found = _wall_backward(cal, w, limit)
            if found is None:
                return None
            u = _instant(found, self.tz)
            if u <= t:
                return u
            # a wall time in a gap whose instant lies after t: not yet
            w = found - _ONE_S


def due(sched: Schedule, last: float, now: float) -> float | None:
    """The slot to run now, or None. ``last`` is the slot of the last run
    (or the instant the schedule was created or resumed). Every slot in
    (last, now] is missed or due; together they make ONE run, attributed
    to the latest of them (catch-up without a burst). A clock stepped back
    before ``last`` runs nothing until it passes ``last`` again."""
    first = sched.next_after(last)
    if first is None or first > now:
        return None
    slot = sched.at_or_before(now)
    assert slot is not None and slot >= first
    return slot


def missed(sched: Schedule, last: float, slot: float, cap: int = 10000) -> int:
    """How many slots in (last, slot) a run at ``slot`` stands in for (for
    the log; counted up to ``cap``)."""
    n, t = 0, last
    while n < cap:
        nxt = sched.next_after(t)
        if nxt is None or nxt >= slot:
            return n
        n, t = n + 1, nxt
    return n
