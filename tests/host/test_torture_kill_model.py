"""The oracle of tools/torture kill and faults (killlib.Ledger): what a
volume and a snapshot must hold after a kill, given what was acknowledged
when. The kernel part runs in the VM; this checks, without it, that the
model puts each write on the right side of a point in time and masks
exactly what it cannot know."""

from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "torture"), os.path.join(HERE, "..", "kernel")]

import killlib as kl  # noqa: E402

S = 512
SIZE = 16 * S


def ledger() -> kl.Ledger:
    return kl.Ledger({"v": bytearray(SIZE)}, {"v": bytearray(SIZE // S)})


def w(off: int, wid: int, t0: float, t1: float | None, seq: int | None = None) -> kl.Write:
    return kl.Write("v", off * S, S, wid, t0, t1, seq)


def test_acknowledged_writes_are_known_unacknowledged_masked_until_rewritten():
    lg = ledger()
    lg.add(0, w(0, 1, 1.0, 2.0))
    lg.add(0, w(1, 2, 3.0, None))  # in flight at the kill
    lg.add(0, w(2, 3, 3.5, None))
    lg.add(0, w(2, 4, 4.0, 5.0))  # the same sector, acknowledged later
    img, unk = lg.now("v")
    assert img[0:S] == w(0, 1, 0, 0).data()
    assert list(unk[:3]) == [0, 1, 0] and img[2 * S : 3 * S] == w(0, 4, 0, 0).data()
    got = bytearray(img)
    got[S : 2 * S] = b"\xee" * S  # whatever the unknown write left: accepted
    kl.compare("v", bytes(got), (img, unk))
    got[0] ^= 1  # an acknowledged write changed: caught
    with pytest.raises(kl.Violation, match="1 sector"):
        kl.compare("v", bytes(got), (img, unk))


def test_point_in_time_by_window_and_by_sequence_number():
    lg = ledger()
    lg.add(0, w(0, 1, 1.0, 2.0))  # acknowledged before the request: in
    lg.add(0, w(1, 2, 2.5, 3.5))  # across the window: unknown
    lg.add(0, w(2, 3, 5.0, 6.0))  # issued after the acknowledgement: out
    lg.add(1, w(3, 4, 2.6, 3.0, seq=10))  # sequence numbers decide: in
    lg.add(1, w(4, 5, 2.7, 3.1, seq=12))  # out
    p = kl.Point("s", ["v"], t_req=2.2, t_ack=4.0, seq=11)
    img, unk = lg.at("v", p)
    assert img[0:S] == w(0, 1, 0, 0).data() and not unk[0]
    assert unk[1] == 1
    assert img[2 * S : 3 * S] == bytes(S) and not unk[2]
    assert img[3 * S : 4 * S] == w(0, 4, 0, 0).data()
    assert img[4 * S : 5 * S] == bytes(S) and not unk[4]


def test_an_unacknowledged_point_ends_at_the_kill():
    lg = ledger()
    lg.add(0, w(0, 1, 3.0, 3.2))  # after the request, before the kill: unknown
    lg.add(0, w(1, 2, 6.0, 7.0))  # after the kill: cannot be in it
    p = kl.Point("s", ["v"], t_req=2.0, t_kill=5.0)
    img, unk = lg.at("v", p)
    assert unk[0] == 1 and not unk[1] and img[S : 2 * S] == bytes(S)


def test_settle_makes_what_was_read_the_new_base():
    lg = ledger()
    lg.add(0, w(0, 1, 1.0, None))
    got = bytes([7]) * SIZE
    lg.settle("v", got)
    lg.reset()
    img, unk = lg.now("v")
    assert bytes(img) == got and not any(unk)


def test_a_point_checked_after_settle_starts_from_the_trials_base():
    """kill.py settles the volumes (what they hold after the restart) before
    it checks the trial's snapshots; a snapshot's image must still start
    from what the volume held when the trial began."""
    lg = ledger()
    lg.add(0, w(0, 1, 1.0, 2.0))  # before the snapshot
    lg.add(0, w(1, 2, 5.0, 6.0))  # after it
    p = kl.Point("s", ["v"], t_req=3.0, t_ack=4.0)
    now, _ = lg.now("v")
    lg.settle("v", bytes(now))
    img, unk = lg.at("v", p)
    assert img[S : 2 * S] == bytes(S) and not any(unk)
