"""When a schedule runs: the calendar grammar, next/previous slots, DST,
clock steps and catch-up (dmsnap.schedule.spec; docs/schedules.md)."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmsnap.schedule.spec import (
    Schedule,
    SpecError,
    due,
    missed,
    parse_calendar,
    parse_duration,
)

UTC = dt.UTC
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]
SPECS = [
    "hourly",
    "daily",
    "weekly",
    "monthly",
    "yearly",
    "minutely",
    "*-*-* 02:00",
    "*-*-* 02:30",
    "Mon..Fri 08..18:00",
    "Sat,Sun 12:00",
    "*:0/15",
    "*-*-01,15 03:00:00",
    "*-02-29 00:00",
    "*:30",
]


def ts(*a: int, tz: str = "UTC") -> float:
    return dt.datetime(*a, tzinfo=ZoneInfo(tz)).timestamp()  # type: ignore[misc]


def wall(t: float, tz: str) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, ZoneInfo(tz))


def slots(s: Schedule, start: float, end: float) -> list[float]:
    out, t = [], start
    while True:
        nxt = s.next_after(t)
        if nxt is None or nxt > end:
            return out
        out.append(nxt)
        t = nxt


# ------------------------------------------------------------------ grammar


@pytest.mark.parametrize(
    ("text", "secs"),
    [("30s", 30), ("5m", 300), ("1h30m", 5400), ("2d", 172800), ("1w", 604800), ("90", 90)],
)
def test_durations(text: str, secs: int) -> None:
    assert parse_duration(text) == secs


@pytest.mark.parametrize("text", ["", "0", "0s", "5x", "m5", "1h 5", "367d", "-5m", "1.5h"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(SpecError):
        parse_duration(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Xyz",
        "Fri..Mon 10:00",
        "25:00",
        "*:60",
        "*-13-01",
        "*-02-30",
        "*-04-31 00:00",
        "2020-13-01",
        "*-*-* 1:2:3:4",
        "*:0/0",
        "*-*-* 02:00 extra",
        "1..x:00",
    ],
)
def test_bad_calendars_are_refused_in_one_line(text: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_calendar(text)
    assert "\n" not in str(e.value)


def test_calendar_fields() -> None:
    c = parse_calendar("Mon..Fri 08..18:00")
    assert c.weekdays == frozenset(range(5))
    assert c.hours == frozenset(range(8, 19)) and c.minutes == {0} and c.seconds == {0}
    c = parse_calendar("*:0/15")
    assert c.minutes == {0, 15, 30, 45} and c.hours == frozenset(range(24))
    c = parse_calendar("weekly")
    assert c.weekdays == {0} and c.hours == {0}
    c = parse_calendar("2027-*-1,15 3:04:05")
    assert (
        c.years == {2027}
        and c.days == {1, 15}
        and (c.hours, c.minutes, c.seconds)
        == (
            {3},
            {4},
            {5},
        )
    )


def test_exactly_one_of_every_or_calendar() -> None:
    with pytest.raises(SpecError):
        Schedule.make(every=None, calendar=None)
    with pytest.raises(SpecError):
        Schedule.make(every="5m", calendar="daily")
    with pytest.raises(SpecError, match="unknown time zone"):
        Schedule.make(every=None, calendar="daily", tz="Mars/Olympus")


# ----------------------------------------------------------------- next runs


def test_weekdays_office_hours_in_berlin() -> None:
    s = Schedule.make(every=None, calendar="Mon..Fri 08..18:00", tz="Europe/Berlin")
    # Saturday 2026-12-05 noon UTC: next is Monday 08:00 Berlin (07:00 UTC)
    got = slots(s, ts(2026, 12, 5, 12), ts(2026, 12, 8, 0))
    assert [wall(t, "Europe/Berlin").hour for t in got] == list(range(8, 19))
    assert wall(got[0], "Europe/Berlin").weekday() == 0
    assert got[0] == ts(2026, 12, 7, 7)


def test_every_counts_from_its_anchor_in_real_time() -> None:
    s = Schedule.make(every="7m", calendar=None, anchor=1000.4)
    assert s.anchor == 1000
    assert s.next_after(0) == 1000 and s.next_after(1000) == 1420
    assert s.at_or_before(1419.9) == 1000 and s.at_or_before(999) is None


def test_daily_at_a_time_that_dst_skips_runs_once_that_day() -> None:
    # Europe/Berlin 2026-03-29: 02:00 -> 03:00. 02:30 does not exist: the
    # run comes at the gap's end plus 30 min (03:30 CEST), once.
    s = Schedule.make(every=None, calendar="*-*-* 02:30", tz="Europe/Berlin")
    got = slots(s, ts(2026, 3, 27, 12), ts(2026, 3, 31, 12))
    days = [wall(t, "Europe/Berlin").date() for t in got]
    assert days == [dt.date(2026, 3, d) for d in (28, 29, 30, 31)]
    assert wall(got[1], "Europe/Berlin").strftime("%H:%M%z") == "03:30+0200"


def test_daily_at_a_time_that_dst_repeats_runs_once_that_day() -> None:
    # Europe/Berlin 2026-10-25: 03:00 -> 02:00, 02:30 happens twice: run at the first.
    s = Schedule.make(every=None, calendar="*-*-* 02:30", tz="Europe/Berlin")
    got = slots(s, ts(2026, 10, 23, 12), ts(2026, 10, 27, 12))
    assert [wall(t, "Europe/Berlin").day for t in got] == [24, 25, 26, 27]
    assert wall(got[1], "Europe/Berlin").strftime("%H:%M%z") == "02:30+0200"
    assert got[2] - got[1] == 25 * 3600  # that day is 25 hours long


def test_hourly_over_both_dst_changes_has_one_run_per_wall_hour() -> None:
    s = Schedule.make(every=None, calendar="hourly", tz="Europe/Berlin")
    spring = slots(s, ts(2026, 3, 28, 22), ts(2026, 3, 29, 6))
    assert [wall(t, "Europe/Berlin").hour for t in spring] == [0, 1, 3, 4, 5, 6, 7, 8]
    autumn = slots(s, ts(2026, 10, 24, 21), ts(2026, 10, 25, 5))
    hours = [wall(t, "Europe/Berlin").hour for t in autumn]
    assert hours == [0, 1, 2, 3, 4, 5, 6]  # 02:00 once, at its first occurrence


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=st.sampled_from(SPECS),
    tz=st.sampled_from(ZONES),
    start=st.integers(ts(2001, 1, 1), ts(2039, 1, 1)),
)
def test_slots_increase_match_and_never_repeat_a_wall_time(spec: str, tz: str, start: int) -> None:
    s = Schedule.make(every=None, calendar=spec, tz=tz)
    t, seen = float(start), set()
    z = ZoneInfo(tz)
    for _ in range(30):
        nxt = s.next_after(t)
        assert nxt is not None and nxt > t
        w = wall(nxt, tz)
        key = w.replace(tzinfo=None, fold=0)
        if not s.calendar.matches(key):  # type: ignore[union-attr]
            # only a wall time skipped by a DST gap is moved, and only forward
            assert z.utcoffset(key - dt.timedelta(hours=3)) != z.utcoffset(key), (spec, tz, w)
        assert key not in seen, f"{spec} in {tz}: {w} twice"
        seen.add(key)
        # no slot between t and nxt; the slot before nxt is nxt itself
        assert s.at_or_before(nxt) == nxt
        assert s.at_or_before(nxt - 1) is None or s.at_or_before(nxt - 1) <= t
        t = nxt


@settings(max_examples=40, deadline=None)
@given(
    tz=st.sampled_from(ZONES),
    year=st.integers(2020, 2035),
    spec=st.sampled_from(["*:0/15", "*:30", "hourly"]),
)
def test_every_existing_matching_wall_time_runs(tz: str, year: int, spec: str) -> None:
    """No skip: over a DST change, every minute whose wall time matches and
    is the first occurrence of that wall time is a slot."""
    s = Schedule.make(every=None, calendar=spec, tz=tz)
    z = ZoneInfo(tz)
    for month in (3, 4, 10, 11):
        start = ts(year, month, 1)
        end = start + 35 * 86400
        # find the transition in this window, if any, and look 6 h around it
        probe = start
        while probe < end and z.utcoffset(dt.datetime.fromtimestamp(probe, UTC)) == z.utcoffset(
            dt.datetime.fromtimestamp(start, UTC)
        ):
            probe += 3600
        lo, hi = probe - 6 * 3600, probe + 6 * 3600
        got = set(slots(s, lo, hi))
        for u in range(int(lo) + 60, int(hi) + 1, 60):
            w = wall(u, tz).replace(tzinfo=None)
            first = w.replace(tzinfo=z, fold=0).timestamp() == u
            if first and s.calendar.matches(w):  # type: ignore[union-attr]
                assert u in got, (spec, tz, w)


# ------------------------------------------------------ catch-up, clock steps


def test_catch_up_after_downtime_is_one_run_for_the_latest_slot() -> None:
    s = Schedule.make(every=None, calendar="hourly", tz="UTC")
    last = ts(2026, 12, 7, 2)
    now = ts(2026, 12, 7, 9, 13)  # down from 02:xx to 09:13
    slot = due(s, last, now)
    assert slot == ts(2026, 12, 7, 9)
    assert missed(s, last, slot) == 6  # 03:00 .. 08:00 stand behind it
    assert due(s, slot, now) is None  # and nothing more until 10:00
    assert due(s, slot, ts(2026, 12, 7, 10)) == ts(2026, 12, 7, 10)


def test_a_clock_stepped_back_does_not_repeat_a_slot() -> None:
    s = Schedule.make(every=None, calendar="*-*-* 02:00", tz="UTC")
    last = ts(2026, 12, 7, 2)  # ran at 02:00
    assert due(s, last, ts(2026, 12, 7, 1, 30)) is None  # stepped back to 01:30
    assert due(s, last, ts(2026, 12, 7, 2, 0, 5)) is None  # passes 02:00 again: no
    assert due(s, last, ts(2026, 12, 8, 2)) == ts(2026, 12, 8, 2)


@settings(max_examples=200, deadline=None)
@given(
    every=st.sampled_from([None, 60, 3600, 7 * 60]),
    spec=st.sampled_from(["*:0/10", "hourly", "*-*-* 02:30", "Mon..Fri 08..18:00"]),
    tz=st.sampled_from(ZONES),
    steps=st.lists(
        st.one_of(
            st.integers(1, 120),  # the timer waking
            st.integers(3600, 3 * 86400),  # downtime or a step forward
            st.integers(-7200, -1),  # a step back (NTP, a wrong RTC)
        ),
        min_size=5,
        max_size=80,
    ),
)
def test_simulated_clock_never_doubles_a_slot_and_runs_once_after_a_gap(
    every: int | None, spec: str, tz: str, steps: list[int]
) -> None:
    """A daemon's loop on a clock that jumps: every run is for a slot later
    than the last run's (so no wall-clock slot twice), a run never stands
    for a slot in the future, and after any jump the first tick that finds
    slots due makes exactly one run, after which nothing is due."""
    s = (
        Schedule.make(every=every, calendar=None, anchor=ts(2026, 1, 1))
        if every
        else Schedule.make(every=None, calendar=spec, tz=tz)
    )
    now = ts(2026, 3, 27)
    last = now
    runs: list[float] = []
    for step in steps:
        now += step
        slot = due(s, last, now)
        if slot is None:
            continue
        assert slot > last and slot <= now
        assert not runs or slot > runs[-1]
        runs.append(slot)
        last = slot
        assert due(s, last, now) is None  # one run, not a burst
    assert len(set(runs)) == len(runs)
