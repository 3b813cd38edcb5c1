"""Recovery tells a torn tail from damage in the middle of the log (issue
17, item 5). A torn tail (records of commits in flight at a crash) is
dropped, counted and logged; a damaged record that had been durable (later
records were appended after it was) makes the open refuse, changing
nothing, until ``Journal.repair`` drops it and everything after it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from test_journal_support import (
    VOL,
    WRITE,
    hold_marker,
    make_record,
    parse_journal,
    pattern,
    write_ring,
)

from dmsnap.journal import Journal, JournalCorrupt, JournalError

KiB = 1024


def _journal_with_writes(jpath: Path, vol1: Path, n: int = 6) -> list:
    """A marker (seq 1) holding the flusher, then n acknowledged 4 KiB
    writes (seq 2..n+1), one after the other; crash (no drain)."""
    j = Journal.open(str(jpath))
    j.attach(1, str(vol1), VOL)
    j.start()
    hold_marker(j, 1)
    for i in range(n):
        j.write(1, i * 4 * KiB, pattern(100 + i, 4 * KiB))
    j.close(drain=False)
    _, recs = parse_journal(jpath)
    assert [r.seq for r in recs] == list(range(1, n + 2))
    return recs


def _damage(jpath: Path, rec) -> None:
    """Flip data bytes of a record (media damage, not a torn write)."""
    write_ring(jpath, rec.pos + 512 + 100, os.urandom(16))


def test_damaged_record_in_the_middle_refuses_the_open(jpath: Path, vol1: Path) -> None:
    recs = _journal_with_writes(jpath, vol1)
    before = jpath.read_bytes()
    _damage(jpath, recs[2])  # seq 3, acknowledged; seq 4..7 written after it was durable
    damaged = jpath.read_bytes()
    with pytest.raises(JournalCorrupt) as ei:
        Journal.open(str(jpath))
    assert ei.value.errno == errno.EUCLEAN and ei.value.seq == 3
    assert "record 3 is damaged" in str(ei.value) and "\n" not in str(ei.value)
    assert jpath.read_bytes() == damaged  # nothing changed, not even the generation
    assert before != damaged

    # the way forward: drop record 3 and everything after it, explicitly
    with pytest.raises(JournalError) as ei2:
        Journal.repair(str(jpath), 5)  # past the damage: refused
    assert ei2.value.errno == errno.ERANGE and "record 3 is damaged" in str(ei2.value)
    rep = Journal.repair(str(jpath), 3)
    assert rep.end_seq == 3 and rep.dropped == 5 and rep.last_seq == 7
    with Journal.open(str(jpath)) as j:
        assert j.stats().recovered_records == 2  # the marker and seq 2
        assert j.recovery.dropped == 0
        j.attach(1, str(vol1), VOL)
        assert j.read(1, 0, 8 * KiB) == pattern(100, 4 * KiB) + bytes(4 * KiB)
        j.start()
        m = j.next_marker(5)
        assert m is not None
        j.marker_done(m.id)
        j.write(1, 8 * KiB, pattern(7, 4 * KiB))  # the journal takes writes again
        j.sync()
    assert vol1.read_bytes()[: 12 * KiB] == pattern(100, 4 * KiB) + bytes(4 * KiB) + pattern(
        7, 4 * KiB
    )
    with Journal.open(str(jpath)) as j:  # and opens cleanly afterwards
        assert j.recovery.dropped == 0
        j.close(drain=False)


def test_torn_tail_is_recovered_and_counted(jpath: Path, vol1: Path) -> None:
    recs = _journal_with_writes(jpath, vol1)
    _damage(jpath, recs[-1])  # the last record: torn at the crash
    with Journal.open(str(jpath)) as j:
        st = j.stats()
        assert st.recovered_records == 6 and st.recovery_end_seq == 7
        assert j.recovery.dropped == 1 and st.recovery_dropped == 1
        j.attach(1, str(vol1), VOL)
        assert j.read(1, 16 * KiB, 4 * KiB) == pattern(104, 4 * KiB)
        assert j.read(1, 20 * KiB, 4 * KiB) == bytes(4 * KiB)
        j.close(drain=False)


def test_in_flight_records_after_a_torn_one_are_a_tail(jpath: Path, vol1: Path) -> None:
    """Group commit has several batches in flight: a crash can tear one and
    leave a later one whole. Records appended before the torn one was
    durable (their ack_lag says so) were never acknowledged: a tail."""
    recs = _journal_with_writes(jpath, vol1)
    sb, _ = parse_journal(jpath)
    last = recs[-1]
    gen = last.generation
    pos = last.pos + last.size
    # seq 8 torn (garbage), seq 9 whole, appended while 7 was the durable end
    write_ring(jpath, pos, os.urandom(512))
    rec9 = make_record(
        journal_id=sb.journal_id,
        generation=gen,
        seq=9,
        type=WRITE,
        vol=1,
        offset=0,
        data=pattern(9, 512),
        align=sb.align,
        ack_lag=9 + 1 - 8,  # durable up to 8 (not including it)
    )
    write_ring(jpath, pos + 1024, rec9)
    with Journal.open(str(jpath)) as j:
        assert j.stats().recovered_records == 7 and j.recovery.dropped == 1
        assert j.recovery.last_seq == 9
        j.close(drain=False)
    # the same record claiming seq 8 was durable before it: damage, refused
    rec9 = make_record(
        journal_id=sb.journal_id,
        generation=gen,
        seq=9,
        type=WRITE,
        vol=1,
        offset=0,
        data=pattern(9, 512),
        align=sb.align,
        ack_lag=1,
    )
    write_ring(jpath, pos + 1024, rec9)
    with pytest.raises(JournalCorrupt) as ei:
        Journal.open(str(jpath))
    assert ei.value.seq == 8


def test_repair_below_the_checkpoint_is_refused(jpath: Path, vol1: Path) -> None:
    with Journal.open(str(jpath)) as j:
        j.attach(1, str(vol1), VOL)
        j.start()
        j.write(1, 0, pattern(1, 4 * KiB))
        j.sync()
    with pytest.raises(JournalError) as ei:
        Journal.repair(str(jpath), 1)
    assert ei.value.errno == errno.EINVAL and "on the volumes already" in str(ei.value)
