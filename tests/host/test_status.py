"""Parsed dm status: every real line from the 6.1 VM, plus malformed input."""

from __future__ import annotations

import pytest
from status_lines import rows

from dmsnap.dm import status as s
from dmsnap.dm.status import StatusParseError, parse_status

STATUS_ROWS = rows("status")


def _wc(
    total: int, free: int, reads: int, read_hits: int, writes: int, around: int, alloc: int
) -> s.WritecacheStatus:
    return s.WritecacheStatus(
        error=0,
        total_blocks=total,
        free_blocks=free,
        writeback_blocks=0,
        reads=reads,
        read_hits=read_hits,
        writes=writes,
        write_hits_uncommitted=0,
        write_hits_committed=0,
        writes_around=around,
        writes_allocate=alloc,
        writes_blocked_on_freelist=0,
        flushes=0,
        discards=0,
    )


def _pool(
    txid: int,
    meta: tuple[int, int],
    data: tuple[int, int],
    held: int | None = None,
    mode: str = "rw",
    discard: str = "passdown",
    no_space: str = "queue",
    needs_check: bool = False,
) -> s.ThinPoolStatus:
    return s.ThinPoolStatus(
        txid,
        *meta,
        *data,
        held,
        mode,
        discard,
        no_space,
        needs_check,
        1024,  # type: ignore[arg-type]
    )


# What each real line must parse to, keyed by (label, target type).
EXPECTED: dict[tuple[str, str], list[s.TargetStatus]] = {
    ("linear.single", "linear"): [s.LinearStatus()],
    ("linear.multi", "linear"): [s.LinearStatus(), s.LinearStatus()],
    ("linear.multi", "zero"): [s.ZeroStatus()],
    ("linear.multi", "error"): [s.ErrorStatus()],
    ("zero", "zero"): [s.ZeroStatus()],
    ("error", "error"): [s.ErrorStatus()],
    ("writecache.s.defaults", "writecache"): [_wc(4080, 4080, 261, 0, 0, 0, 0)],
    ("writecache.s.after_writes", "writecache"): [_wc(4080, 3824, 522, 129, 256, 0, 256)],
    ("writecache.s.after_reads", "writecache"): [_wc(4080, 3824, 586, 193, 256, 0, 256)],
    # start_sector 16 costs two 4 KiB blocks of the 16 MiB cache
    ("writecache.s.all_options", "writecache"): [_wc(4078, 4078, 261, 0, 0, 0, 0)],
    # cleaner mode: every write goes around the cache
    ("writecache.s.all_options.after_writes", "writecache"): [_wc(4078, 4078, 522, 0, 50, 50, 0)],
    ("writecache.s.some_options", "writecache"): [_wc(31774, 31774, 2088, 0, 0, 0, 0)],
    ("writecache.s.some_options.after_writes", "writecache"): [
        _wc(31774, 30974, 4176, 800, 800, 0, 800)
    ],
    ("writecache.p.defaults", "writecache"): [_wc(32640, 32640, 261, 0, 0, 0, 0)],
    ("writecache.p.after_writes", "writecache"): [_wc(32640, 32340, 522, 130, 300, 0, 300)],
    ("writecache.p.all_options", "writecache"): [_wc(32640, 32640, 261, 0, 0, 0, 0)],
    ("writecache.p.fua_cleaner", "writecache"): [_wc(32640, 32640, 261, 0, 0, 0, 0)],
    ("writecache.p.fua_cleaner.after_writes", "writecache"): [_wc(32640, 32640, 522, 0, 10, 10, 0)],
    ("thin-pool.fresh", "thin-pool"): [_pool(0, (418, 4096), (0, 4096))],
    ("thin-pool.one_thin", "thin-pool"): [_pool(1, (419, 4096), (0, 4096))],
    ("thin-pool.after_writes", "thin-pool"): [_pool(1, (419, 4096), (64, 4096))],
    ("thin-pool.held_root", "thin-pool"): [_pool(1, (420, 4096), (64, 4096), held=36)],
    ("thin-pool.read_only", "thin-pool"): [_pool(1, (420, 4096), (74, 4096), mode="ro")],
    ("thin-pool.features", "thin-pool"): [
        _pool(0, (418, 4096), (0, 32), discard="no_passdown", no_space="error")
    ],
    ("thin-pool.out_of_data_space", "thin-pool"): [
        _pool(
            0,
            (419, 4096),
            (32, 32),
            mode="out_of_data_space",
            discard="no_passdown",
            no_space="error",
        )
    ],
    # 1 GiB blocks on a 64 MiB data device: not one whole block
    ("thin-pool.max_block_size", "thin-pool"): [_pool(0, (417, 4096), (0, 0), discard="ignore")],
    ("thin-pool.ignore_discard", "thin-pool"): [_pool(0, (418, 4096), (0, 128), discard="ignore")],
    # metadata restored with the needs_check flag: the kernel opens it read-only
    ("thin-pool.needs_check", "thin-pool"): [
        _pool(5, (420, 4096), (2, 1024), mode="ro", needs_check=True)
    ],
    ("thin-pool.metadata_error", "thin-pool"): [s.ThinPoolFailed("Fail")],
    ("thin-pool.metadata_error.first_run", "thin-pool"): [s.ThinPoolFailed("Error")],
    ("thin-pool.metadata_error2", "thin-pool"): [s.ThinPoolFailed("Fail")],
    ("thin.fresh", "thin"): [s.ThinStatus(0, None)],
    ("thin.after_writes", "thin"): [s.ThinStatus(8192, 8191)],
    ("thin.snapshot", "thin"): [s.ThinStatus(8192, 8191)],
    ("thin.external_origin", "thin"): [s.ThinStatus(0, None)],
    # 10 x 64 KiB written at 192 KiB: blocks 3..12 of 64 KiB
    ("thin.external_origin.after_writes", "thin"): [s.ThinStatus(1280, 1663)],
    ("thin.small", "thin"): [s.ThinStatus(0, None)],
    ("thin.full", "thin"): [s.ThinStatus(8192, 8191)],
    ("thin.needs_check_pool", "thin"): [s.ThinStatus(256, 255)],
    ("thin.metadata_error", "thin"): [s.ThinFailed("Fail")],
    ("snapshot-origin", "snapshot-origin"): [s.SnapshotOriginStatus()],
    ("snapshot-origin.with_snap", "snapshot-origin"): [s.SnapshotOriginStatus()],
    ("snapshot.P.fresh", "snapshot"): [s.SnapshotStatus(32, 65536, 32)],
    ("snapshot.P.after_origin_writes", "snapshot"): [s.SnapshotStatus(832, 65536, 32)],
    ("snapshot.P.after_snap_writes", "snapshot"): [s.SnapshotStatus(2112, 65536, 32)],
    ("snapshot.P.before_merge", "snapshot"): [s.SnapshotStatus(45712, 65536, 112)],
    ("snapshot.N", "snapshot"): [s.SnapshotStatus(0, 16384, 0)],
    ("snapshot.N.after_origin_writes", "snapshot"): [s.SnapshotStatus(5120, 16384, 0)],
    ("snapshot.PO.fresh", "snapshot"): [s.SnapshotStatus(64, 2048, 64)],
    ("snapshot.PO.overflow", "snapshot"): [s.SnapshotOverflow()],
    # origin writes past a full COW invalidate even a PO snapshot
    ("snapshot.PO.overflow.after_origin_writes", "snapshot"): [s.SnapshotInvalid()],
    ("snapshot.P.small", "snapshot"): [s.SnapshotStatus(16, 2048, 16)],
    ("snapshot.P.invalid", "snapshot"): [s.SnapshotInvalid()],
    ("snapshot-merge.started", "snapshot-merge"): [s.SnapshotMergeStatus(32, 65536, 32)],
    ("snapshot-merge.progress", "snapshot-merge"): [s.SnapshotMergeStatus(32, 65536, 32)],
    ("snapshot-merge.done", "snapshot-merge"): [s.SnapshotMergeStatus(32, 65536, 32)],
    ("log-writes.fresh", "log-writes"): [s.LogWritesStatus(0, 0)],
    ("log-writes.after_writes", "log-writes"): [s.LogWritesStatus(21, 181)],
    ("log-writes.after_mark", "log-writes"): [s.LogWritesStatus(22, 182)],
    ("flakey.nofeatures", "flakey"): [s.FlakeyStatus()],
    ("flakey.drop_writes", "flakey"): [s.FlakeyStatus()],
    ("flakey.error_writes", "flakey"): [s.FlakeyStatus()],
    ("flakey.corrupt_read", "flakey"): [s.FlakeyStatus()],
    ("flakey.corrupt_write", "flakey"): [s.FlakeyStatus()],
    ("flakey.drop_corrupt_read", "flakey"): [s.FlakeyStatus()],
    ("flakey.explicit_zero_features", "flakey"): [s.FlakeyStatus()],
}


def test_every_real_status_line_has_an_expectation() -> None:
    seen: dict[tuple[str, str], int] = {}
    for r in STATUS_ROWS:
        seen[(r.label, r.target_type)] = seen.get((r.label, r.target_type), 0) + 1
    assert seen == {k: len(v) for k, v in EXPECTED.items()}


@pytest.mark.parametrize(
    ("key", "want"),
    list(EXPECTED.items()),
    ids=[f"{label}:{tt}" for label, tt in EXPECTED],
)
def test_real_status_line(key: tuple[str, str], want: list[s.TargetStatus]) -> None:
    got = [
        parse_status(r.target_type, r.params)
        for r in STATUS_ROWS
        if (r.label, r.target_type) == key
    ]
    assert got == want
    for g, w in zip(got, want, strict=True):
        assert type(g) is type(w)


def _status(label: str) -> s.TargetStatus:
    (row,) = [r for r in STATUS_ROWS if r.label == label]
    return parse_status(row.target_type, row.params)


def test_thin_pool_derived_values() -> None:
    fresh = _status("thin-pool.fresh")
    assert isinstance(fresh, s.ThinPoolStatus)
    assert fresh.discard_passdown
    assert fresh.held_root is None
    assert fresh.metadata_used_fraction == pytest.approx(418 / 4096)
    assert fresh.data_used_fraction == 0.0
    assert fresh.free_data_blocks == 4096
    full = _status("thin-pool.out_of_data_space")
    assert isinstance(full, s.ThinPoolStatus)
    assert full.data_used_fraction == 1.0
    assert full.free_data_blocks == 0
    assert not full.discard_passdown
    empty = _status("thin-pool.max_block_size")
    assert isinstance(empty, s.ThinPoolStatus)
    assert empty.data_used_fraction == 0.0  # 0/0 must not divide by zero


def test_writecache_derived_values() -> None:
    wc = _status("writecache.s.after_writes")
    assert isinstance(wc, s.WritecacheStatus)
    assert wc.dirty_blocks == 256
    assert wc.used_fraction == pytest.approx(256 / 4080)
    assert not wc.has_error


def test_snapshot_derived_values() -> None:
    snap = _status("snapshot.P.after_snap_writes")
    assert isinstance(snap, s.SnapshotStatus)
    assert snap.free_sectors == 65536 - 2112
    assert snap.used_fraction == pytest.approx(2112 / 65536)
    done = _status("snapshot-merge.done")
    assert isinstance(done, s.SnapshotMergeStatus)
    assert done.merge_complete
    assert not s.SnapshotMergeStatus(1000, 65536, 32).merge_complete


# -- other renderings the kernel can produce ----------------------------------------------------


def test_older_and_rarer_formats() -> None:
    # writecache before 1.5 printed only four fields
    old = parse_status("writecache", "-5 100 40 10")
    assert old == s.WritecacheStatus(-5, 100, 40, 10)
    assert old.has_error and old.reads is None and old.dirty_blocks == 60
    # thin-pool before 4.19 had no metadata low watermark
    pool = parse_status("thin-pool", "3 10/20 5/50 - rw no_discard_passdown queue_if_no_space -")
    assert isinstance(pool, s.ThinPoolStatus)
    assert pool.metadata_low_watermark is None and pool.discard == "no_passdown"
    assert parse_status("log-writes", "5 99 logging_disabled") == s.LogWritesStatus(5, 99, True)
    assert parse_status("thin", "Error") == s.ThinFailed("Error")
    assert parse_status("thin", "-") == s.ThinFailed("-")
    assert parse_status("snapshot", "Merge failed") == s.SnapshotMergeFailed()
    assert parse_status("snapshot-merge", "Invalid") == s.SnapshotInvalid()
    assert parse_status("snapshot", "Unknown") == s.SnapshotUnknown()
    assert parse_status("snapshot", " 8/16 8 ") == s.SnapshotStatus(8, 16, 8)


def test_unknown_target_is_raw() -> None:
    got = parse_status("cache", "8 27/2048 128 0/1024 0 0 0 0 0 0 0 1 writeback")
    assert got == s.RawStatus("cache", "8 27/2048 128 0/1024 0 0 0 0 0 0 0 1 writeback")


MALFORMED = [
    ("writecache", "0 4080 4080", "writecache status"),
    ("writecache", "0 4080 4080 0 1 2 3", "expected 4 or 14 fields"),
    ("writecache", "x 1 1 0", "error 'x'"),
    ("writecache", "0 10 20 0", "more free blocks than blocks"),
    ("writecache", "0 -1 0 0", "is not a decimal number"),
    ("thin-pool", "0 418/4096 0/4096 - rw", "expected 8 or 9 fields"),
    ("thin-pool", "0 418 0/4096 - rw discard_passdown queue_if_no_space - 1024", "used/total"),
    ("thin-pool", "0 418/4096 0/4096 - rx discard_passdown queue_if_no_space - 1024", "mode"),
    ("thin-pool", "0 418/4096 0/4096 - rw discard queue_if_no_space - 1024", "discard mode"),
    ("thin-pool", "0 418/4096 0/4096 - rw discard_passdown queue - 1024", "no-space"),
    ("thin-pool", "0 418/4096 0/4096 - rw discard_passdown queue_if_no_space ? 1024", "check"),
    ("thin-pool", "+1 418/4096 0/4096 - rw discard_passdown queue_if_no_space - 1024", "'+1'"),
    ("thin-pool", "1_0 418/4096 0/4096 - rw discard_passdown queue_if_no_space - 1024", "1_0"),
    ("thin-pool", "0 418/4096 0/4096 x rw discard_passdown queue_if_no_space - 1024", "held root"),
    ("thin-pool", "Failed", "expected 8 or 9 fields"),
    ("thin", "8192", "expected 2 fields"),
    ("thin", "8192 x", "highest mapped sector 'x'"),
    ("snapshot", "32 65536 32", "expected 'allocated/total metadata'"),
    ("snapshot", "32 1", "sectors '32' is not used/total"),
    ("snapshot", "32/65536", "expected 'allocated/total metadata'"),
    ("snapshot", "Overflowed", "expected"),
    ("snapshot-merge", "a/b 1", "snapshot-merge status"),
    ("log-writes", "1", "expected 'entries sector"),
    ("log-writes", "1 2 logging_enabled", "expected 'entries sector"),
    ("linear", "7:0 0", "expected no status"),
    ("flakey", "x", "flakey status 'x': expected no status"),
    ("zero", "1", "zero status"),
]


@pytest.mark.parametrize(("target_type", "params", "message"), MALFORMED)
def test_malformed_status_raises(target_type: str, params: str, message: str) -> None:
    with pytest.raises(StatusParseError) as exc:
        parse_status(target_type, params)
    assert message in str(exc.value)
    assert str(exc.value).startswith(f"{target_type} status ")
    assert exc.value.target_type == target_type
    assert isinstance(exc.value, ValueError)
