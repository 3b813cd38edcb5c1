"""A deleted volume's end is recorded in the journal (issue 17, item 1):
``forget`` appends a durable FORGET record, and recovery honours it, so a
crash after a volume delete can never replay that volume's records into a
volume that later gets the same id."""

from __future__ import annotations

from pathlib import Path

from test_journal_support import FORGET, VOL, hold_marker, make_volume, parse_journal, pattern

from dmsnap.journal import Journal

KiB = 1024


def test_forget_is_durable_across_a_crash(jpath: Path, vol1: Path, tmp_path: Path) -> None:
    vol5 = make_volume(tmp_path / "vol5", VOL)
    j = Journal.open(str(jpath))
    j.attach(1, str(vol1), VOL)
    j.attach(5, str(vol5), VOL)
    j.start()
    hold_marker(j)  # the flusher stands still: nothing reaches the volumes
    j.write(5, 0, pattern(0x55, 8 * KiB))
    j.discard(5, 64 * KiB, 64 * KiB)
    j.write(1, 0, pattern(0x11, 4 * KiB))
    j.forget(5)  # volume 5 deleted
    j.close(drain=False)  # crash: every record stays in the journal

    j = Journal.open(str(jpath))
    try:
        # volume 5's records do not come back; volume 1's do
        assert j.pending_volumes() == {1}
        _, recs = parse_journal(jpath)
        assert [r.vol for r in recs if r.type == FORGET] == [5]
        # a new volume with the same id sees none of them
        new5 = make_volume(tmp_path / "new5", VOL)
        j.attach(5, str(new5), VOL)
        j.attach(1, str(vol1), VOL)
        assert j.read(5, 0, 8 * KiB) == bytes(8 * KiB)
        j.start()
        m = j.next_marker(5)
        assert m is not None
        j.marker_done(m.id)
        j.write(5, 4 * KiB, pattern(0x66, 4 * KiB))
        j.sync()
        assert new5.read_bytes()[: 8 * KiB] == bytes(4 * KiB) + pattern(0x66, 4 * KiB)
        assert vol1.read_bytes()[: 4 * KiB] == pattern(0x11, 4 * KiB)
    finally:
        j.close()


def test_records_after_the_forget_are_kept(jpath: Path, vol1: Path, tmp_path: Path) -> None:
    """The bound is the forget's place in the log: the volume's later
    records (the id attached again) are replayed."""
    vol5 = make_volume(tmp_path / "vol5", VOL)
    j = Journal.open(str(jpath))
    j.attach(5, str(vol5), VOL)
    j.start()
    hold_marker(j)
    j.write(5, 0, pattern(1, 4 * KiB))
    j.forget(5)
    j.write(5, 4 * KiB, pattern(2, 4 * KiB))
    j.close(drain=False)

    j = Journal.open(str(jpath))
    try:
        assert j.pending_volumes() == {5}
        j.attach(5, str(vol5), VOL)
        assert j.read(5, 0, 8 * KiB) == bytes(4 * KiB) + pattern(2, 4 * KiB)
        assert j.stats().unflushed_records == 1
    finally:
        j.close(drain=False)


def test_forget_before_start_is_durable(jpath: Path, vol1: Path) -> None:
    """The controller forgets recovered records of deleted volumes before
    jr_start; that too is recorded, so the next start does not see them."""
    j = Journal.open(str(jpath))
    j.attach(7, str(vol1), VOL)
    j.start()
    hold_marker(j)
    j.write(7, 0, pattern(7, 4 * KiB))
    j.close(drain=False)
    j = Journal.open(str(jpath))
    assert j.pending_volumes() == {7}
    j.forget(7)
    j.close(drain=False)
    j = Journal.open(str(jpath))
    try:
        assert j.pending_volumes() == set()
    finally:
        j.close(drain=False)
