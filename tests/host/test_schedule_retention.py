"""Which snapshots a schedule keeps (dmsnap.schedule.retention), over
simulated years of timestamps (docs/schedules.md, "Retention")."""

from __future__ import annotations

import datetime as dt
import random
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmsnap.schedule.retention import CLASSES, Cut, Policy, _period, prune, reasons, space_order
from dmsnap.schedule.spec import Schedule

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Pacific/Chatham"]
T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC).timestamp()
YEAR = 365 * 86400


@st.composite
def cuts_strategy(draw: st.DrawFn) -> list[Cut]:
    """Up to a few hundred cuts over up to three years: gaps from seconds
    to weeks (runs, downtime), some not made by the schedule, some held."""
    n = draw(st.integers(0, 250))
    gaps = draw(
        st.lists(
            st.one_of(st.integers(1, 3600), st.integers(3600, 86400), st.integers(1, 30 * 86400)),
            min_size=n,
            max_size=n,
        )
    )
    t = T0 + draw(st.integers(0, YEAR))
    out = []
    for i, g in enumerate(gaps):
        t += g
        owned = draw(st.booleans()) if i % 7 == 3 else True
        held = draw(st.booleans()) if i % 11 == 5 else False
        out.append(Cut(i, float(t), owned=owned, held=held))
    return out


policies = st.builds(
    Policy,
    hourly=st.integers(0, 48),
    daily=st.integers(0, 14),
    weekly=st.integers(0, 8),
    monthly=st.integers(0, 24),
    yearly=st.integers(0, 5),
    keep=st.integers(0, 20),
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def kept_of(cuts: list[Cut], policy: Policy, tz: ZoneInfo) -> set[int]:
    gone = set(prune(cuts, policy, tz))
    return {c.key for c in cuts if c.key not in gone}


def expected_firsts(cuts: list[Cut], cls: str, n: int, tz: ZoneInfo) -> list[int]:
    """The spec written the slow way: per period of the class, the earliest
    of the schedule's cuts; the newest n periods."""
    period = _period(cls, tz)
    by: dict[tuple[int, ...], list[Cut]] = {}
    for c in cuts:
        if c.owned:
            by.setdefault(period(c.created), []).append(c)
    newest = sorted(by)[-n:] if n else []
    return [min(by[p], key=lambda c: (c.created, repr(c.key))).key for p in newest]


@SETTINGS
@given(cuts=cuts_strategy(), policy=policies, tz=st.sampled_from(ZONES))
def test_never_prunes_what_it_did_not_make_or_what_is_held(
    cuts: list[Cut], policy: Policy, tz: str
) -> None:
    gone = set(prune(cuts, policy, ZoneInfo(tz)))
    for c in cuts:
        if not c.owned or c.held:
            assert c.key not in gone


@SETTINGS
@given(cuts=cuts_strategy(), policy=policies, tz=st.sampled_from(ZONES))
def test_first_of_each_of_the_newest_periods_is_kept(
    cuts: list[Cut], policy: Policy, tz: str
) -> None:
    z = ZoneInfo(tz)
    kept = kept_of(cuts, policy, z)
    for cls in CLASSES:
        for key in expected_firsts(cuts, cls, getattr(policy, cls), z):
            assert key in kept, (cls, key)


@SETTINGS
@given(cuts=cuts_strategy(), policy=policies, tz=st.sampled_from(ZONES))
def test_kept_set_is_exactly_what_the_limits_ask_for(
    cuts: list[Cut], policy: Policy, tz: str
) -> None:
    """Each limit keeps at most its count, and nothing the schedule made is
    kept without a reason (or a hold): the kept set satisfies each limit."""
    z = ZoneInfo(tz)
    why = reasons(cuts, policy, z)
    for cls in (*CLASSES, "keep"):
        n = sum(1 for r in why.values() if cls in r)
        assert n <= getattr(policy, cls)
    assert sum(1 for r in why.values() if "newest" in r) == (1 if any(c.owned for c in cuts) else 0)
    kept = kept_of(cuts, policy, z)
    mine = [c for c in cuts if c.owned]
    if not policy.limits:
        assert kept == {c.key for c in cuts}
        return
    for c in mine:
        assert (c.key in kept) == (c.key in why or c.held)
    newest_k = (
        sorted(mine, key=lambda c: (c.created, repr(c.key)))[-policy.keep :] if policy.keep else []
    )
    assert {c.key for c in newest_k} <= kept
    if mine:
        assert max(mine, key=lambda c: (c.created, repr(c.key))).key in kept


@SETTINGS
@given(cuts=cuts_strategy(), policy=policies, tz=st.sampled_from(ZONES), seed=st.integers())
def test_idempotent_and_independent_of_input_order(
    cuts: list[Cut], policy: Policy, tz: str, seed: int
) -> None:
    z = ZoneInfo(tz)
    gone = prune(cuts, policy, z)
    shuffled = cuts[:]
    random.Random(seed).shuffle(shuffled)
    assert prune(shuffled, policy, z) == gone
    left = [c for c in cuts if c.key not in set(gone)]
    assert prune(left, policy, z) == []  # running the decision again prunes nothing more


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=cuts_strategy(), policy=policies, tz=st.sampled_from(ZONES))
def test_pruning_after_every_run_keeps_what_pruning_once_keeps(
    cuts: list[Cut], policy: Policy, tz: str
) -> None:
    """The daemon prunes after each run; the result is the same as deciding
    once over the whole history (nothing pruned early that the end keeps)."""
    z = ZoneInfo(tz)
    alive: list[Cut] = []
    for c in sorted(cuts, key=lambda c: c.created):
        alive.append(c)
        gone = set(prune(alive, policy, z))
        alive = [a for a in alive if a.key not in gone]
    assert {c.key for c in alive} == kept_of(cuts, policy, z)


def test_no_limits_prunes_nothing() -> None:
    cuts = [Cut(i, T0 + i * 3600) for i in range(100)]
    assert prune(cuts, Policy(), ZoneInfo("UTC")) == []
    assert prune(cuts, Policy(min_free=10), ZoneInfo("UTC")) == []


def test_keeps_the_first_of_the_hour_not_the_last() -> None:
    # every 10 minutes for 5 hours, keep 3 hourly: the :00 snapshots of the
    # newest three hours, and the newest one
    cuts = [Cut(i, T0 + i * 600) for i in range(30)]
    kept = kept_of(cuts, Policy(hourly=3), ZoneInfo("UTC"))
    assert kept == {12, 18, 24, 29}


@SETTINGS
@given(cuts=cuts_strategy())
def test_space_order_is_oldest_first_never_the_newest_or_held_or_others(cuts: list[Cut]) -> None:
    order = space_order(cuts)
    mine = sorted((c for c in cuts if c.owned), key=lambda c: (c.created, repr(c.key)))
    by = {c.key: c for c in cuts}
    assert [by[k].created for k in order] == sorted(by[k].created for k in order)
    for k in order:
        assert by[k].owned and not by[k].held
    if mine:
        assert mine[-1].key not in order
    assert set(order) == {c.key for c in mine[:-1] if not c.held}


@pytest.mark.parametrize("tz", ["UTC", "Europe/Berlin", "America/New_York"])
def test_two_simulated_years_of_an_hourly_schedule(tz: str) -> None:
    """An hourly calendar schedule run for two years (with a week of
    downtime), pruned after every run: the survivors are the snapper
    timeline, period by period, in the schedule's zone."""
    z = ZoneInfo(tz)
    s = Schedule.make(every=None, calendar="hourly", tz=tz)
    policy = Policy(hourly=24, daily=7, weekly=4, monthly=12, yearly=3)
    t = T0
    alive: list[Cut] = []
    made = 0
    down = (T0 + 200 * 86400, T0 + 207 * 86400)
    end = T0 + 2 * YEAR
    while True:
        nxt = s.next_after(t)
        assert nxt is not None
        if nxt > end:
            break
        t = nxt
        if down[0] <= t < down[1]:
            continue
        alive.append(Cut(made, t + 2.5))  # the cut lands a moment after its slot
        made += 1
        gone = set(prune(alive, policy, z))
        alive = [c for c in alive if c.key not in gone]
    assert made > 17000
    period = {cls: _period(cls, z) for cls in CLASSES}
    # the newest 24 hours, 7 days... each have their first cut
    for cls in CLASSES:
        periods = sorted({period[cls](c.created) for c in alive}, reverse=True)
        assert len(periods) >= getattr(policy, cls) or cls == "yearly"
    assert len(alive) <= 24 + 7 + 4 + 12 + 3 + 1
    hours = sorted({period["hourly"](c.created) for c in alive})
    assert len(alive) >= 24  # at least the hourlies
    for c in alive:  # each survivor is the first of a period it stands for
        assert (
            any(
                min(
                    (o for o in alive if period[cls](o.created) == period[cls](c.created)),
                    key=lambda o: o.created,
                )
                is c
                for cls in CLASSES
            )
            or c is alive[-1]
        )
    assert hours[-1] == period["hourly"](alive[-1].created)
