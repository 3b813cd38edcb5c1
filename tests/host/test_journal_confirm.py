"""Confirmation (jr_set_confirm): a record synced on the device below is
durable only once the controller has seen that device healthy afterwards.

On the host the "dm device" is a file, which never lies; a thin pool that
went read-only does (it answers a discard with success and unmaps nothing,
tests/kernel/test_thin_metadata_full.py). Here the lie is played by hand:
the file is given its old bytes back after the flusher applied a discard."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from test_journal_support import VOL, pattern

from dmsnap.journal import Journal

KiB = 1024


def _until(cond, what: str, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _synced_past(j: Journal, seq: int) -> None:
    _until(lambda: j.stats().synced_seq > seq, f"record {seq} never synced")


def test_checkpoint_waits_for_confirmation_and_no_space_rewinds(jpath: Path, vol1: Path) -> None:
    j = Journal.open(str(jpath))
    j.attach(1, str(vol1), VOL)
    j.set_confirm(True)
    j.start()
    try:
        old = pattern(1, 64 * KiB)
        j.write(1, 0, old)
        w2 = j.write(1, 128 * KiB, pattern(2, 4 * KiB))
        _synced_past(j, w2)
        token = j.confirm_mark()
        assert j.confirm(token)
        _until(lambda: j.stats().checkpoint_seq > w2, "a confirmed record not checkpointed")

        d = j.discard(1, 0, 64 * KiB)
        w3 = j.write(1, 132 * KiB, pattern(3, 4 * KiB))
        _synced_past(j, w3)
        st = j.stats()
        assert st.checkpoint_seq <= d and st.confirmed_seq <= d, st  # synced, not confirmed
        # The device below lies: the discard "succeeded" and kept the data.
        fd = os.open(vol1, os.O_WRONLY)
        try:
            os.pwrite(fd, old, 0)
            os.pwrite(fd, bytes(4 * KiB), 132 * KiB)  # and w3's block rolled back
            os.fsync(fd)
        finally:
            os.close(fd)
        token = j.confirm_mark()
        j.set_no_space(-errno.ENOSPC)  # the look that follows finds it read-only
        assert not j.confirm(token)  # a look begun before confirms nothing
        _until(lambda: j.stats().confirm_rewinds == 1, "no rewind")
        # The overlay answers again: zeros for the discard, w3's data.
        assert j.read(1, 0, 64 * KiB) == bytes(64 * KiB)
        assert j.read(1, 132 * KiB, 4 * KiB) == pattern(3, 4 * KiB)
        st = j.stats()
        assert st.unflushed_records == 2 and st.checkpoint_seq <= d, st

        # Room again: both written again, then confirmed and checkpointed.
        j.set_no_space(0)
        _synced_past(j, w3)
        assert j.confirm(j.confirm_mark())
        _until(lambda: j.stats().checkpoint_seq > w3, "never checkpointed after the rewind")
        data = vol1.read_bytes()
        assert data[: 64 * KiB] == bytes(64 * KiB)
        assert data[132 * KiB : 136 * KiB] == pattern(3, 4 * KiB)
        assert data[128 * KiB : 132 * KiB] == pattern(2, 4 * KiB)
    finally:
        j.close(drain=False)


def test_unconfirmed_records_are_replayed_after_a_crash(jpath: Path, vol1: Path) -> None:
    j = Journal.open(str(jpath))
    j.attach(1, str(vol1), VOL)
    j.set_confirm(True)
    j.start()
    j.write(1, 0, pattern(1, 64 * KiB))
    d = j.discard(1, 0, 64 * KiB)
    _synced_past(j, d)
    j.close(drain=False)  # a crash before any look at the pool
    fd = os.open(vol1, os.O_WRONLY)
    try:
        os.pwrite(fd, pattern(1, 64 * KiB), 0)  # the discard did not stick below
    finally:
        os.close(fd)
    j = Journal.open(str(jpath))
    try:
        assert j.stats().recovered_records >= 2
        j.attach(1, str(vol1), VOL)
        j.start()
        j.sync(10.0)
        assert vol1.read_bytes()[: 64 * KiB] == bytes(64 * KiB)
    finally:
        j.close(drain=False)


def test_without_confirmation_the_checkpoint_follows_the_sync(nv: Journal) -> None:
    w = nv.write(1, 0, pattern(1, 4 * KiB))
    nv.sync()
    _until(lambda: nv.stats().checkpoint_seq > w, "checkpoint did not follow the sync")
