"""Typed dm target tables: round trips, the kernel's own rendering, validation."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from status_lines import Row, rows

from dmsnap.dm import targets as t
from dmsnap.dm.targets import Table, TableError, TableLine

TABLE_ROWS = rows("table")
# thin_status() prints "Fail" in place of the table once the pool has failed.
FAILED_TABLE_ROWS = [r for r in TABLE_ROWS if r.params.strip() == "Fail"]
GOOD_TABLE_ROWS = [r for r in TABLE_ROWS if r not in FAILED_TABLE_ROWS]


# -- every target, every option ---------------------------------------------------------------

EXAMPLES: list[t.Target] = [
    t.Linear("7:0", 0),
    t.Linear("/dev/loop0", 2048),
    t.Zero(),
    t.Error(),
    t.Writecache("s", "7:3", "7:4", 4096),
    t.Writecache(
        "s",
        "7:5",
        "7:6",
        4096,
        start_sector=16,
        high_watermark=60,
        low_watermark=40,
        writeback_jobs=512,
        autocommit_blocks=128,
        autocommit_time=1001,
        max_age=30000,
        cleaner=True,
        metadata_only=True,
        pause_writeback=1500,
    ),
    t.Writecache(
        "p",
        "7:11",
        "259:0",
        512,
        start_sector=0,
        high_watermark=80,
        low_watermark=70,
        writeback_jobs=64,
        autocommit_blocks=1000,
        autocommit_time=2000,
        max_age=5000,
        cleaner=True,
        fua=False,
        metadata_only=True,
    ),
    t.Writecache("p", "7:11", "259:0", 1024, fua=True),
    t.ThinPool("7:12", "7:13", 128, 1024),
    t.ThinPool(
        "7:14",
        "7:15",
        2097152,
        0,
        skip_block_zeroing=True,
        ignore_discard=True,
        no_discard_passdown=True,
        read_only=True,
        error_if_no_space=True,
    ),
    t.Thin("254:0", 0),
    t.Thin("254:0", 2**24 - 1, "7:2"),
    t.SnapshotOrigin("254:0"),
    t.Snapshot("254:0", "7:23", "P", 16),
    t.Snapshot("254:0", "7:24", "N", 1),
    t.Snapshot("254:0", "7:25", "PO", 2**21),
    t.SnapshotMerge("254:0", "7:23", "P", 16),
    t.SnapshotMerge("254:0", "7:23", "PO", 8),
    t.LogWrites("7:27", "7:28"),
    t.Flakey("7:29", 0, 60, 0),
    t.Flakey("7:29", 8, 5, 3, drop_writes=True),
    t.Flakey("7:29", 0, 1, 1, error_writes=True),
    t.Flakey("7:29", 0, 10, 5, corrupt_bio_byte=t.CorruptBioByte(224, "w", 255, 4096)),
    t.Flakey("7:29", 0, 10, 5, drop_writes=True, corrupt_bio_byte=t.CorruptBioByte(1, "r", 0, 0)),
    # newer-kernel features (6.1 refuses them, but the types cover them)
    t.Flakey("7:29", 0, 0, 5, error_reads=True, error_writes=True),
    t.Flakey(
        "7:29",
        0,
        10,
        5,
        corrupt_bio_byte=t.CorruptBioByte(7, "w", 1, 0),
        random_read_corrupt=1,
        random_write_corrupt=1_000_000_000,
    ),
]


def _id(x: Any) -> str:
    return x.target_type if isinstance(x, t.Target) else str(x)


@pytest.mark.parametrize("target", EXAMPLES, ids=_id)
def test_params_round_trip(target: t.Target) -> None:
    assert type(target).from_params(target.params()) == target
    assert t.target_class(target.target_type).from_params(target.params()) == target


@pytest.mark.parametrize("target", EXAMPLES, ids=_id)
def test_table_line_round_trip(target: t.Target) -> None:
    line = TableLine(4096, 8192, target)
    assert TableLine.parse(line.render()) == line
    assert line.render().startswith(f"4096 8192 {target.target_type}")


def test_every_registered_type_has_an_example() -> None:
    assert {x.target_type for x in EXAMPLES} == set(t.target_types())
    assert set(t.target_types()) == {
        "linear",
        "zero",
        "error",
        "writecache",
        "thin-pool",
        "thin",
        "snapshot-origin",
        "snapshot",
        "snapshot-merge",
        "log-writes",
        "flakey",
    }


def test_snapshot_and_merge_are_distinct() -> None:
    a = t.Snapshot("254:0", "7:23", "P", 16)
    b = t.SnapshotMerge("254:0", "7:23", "P", 16)
    assert a.params() == b.params()
    assert a != b
    assert TableLine.parse("0 8 snapshot-merge 254:0 7:23 P 16").target == b


# -- the kernel's own rendering ---------------------------------------------------------------


def test_data_file_has_every_target_type() -> None:
    assert {r.target_type for r in TABLE_ROWS} == set(t.target_types())
    assert {r.target_type for r in rows("status")} == set(t.target_types())


@pytest.mark.parametrize("row", GOOD_TABLE_ROWS, ids=lambda r: f"{r.label}:{r.target_type}")
def test_real_table_line_renders_identically(row: Row) -> None:
    line = TableLine.parse(row.line)
    assert line.target.target_type == row.target_type
    # byte for byte, trailing spaces included
    assert line.target.params() == row.params
    # dmsetup prints a space after the type even when params are empty
    assert line.render() == (row.line if row.params else row.line.rstrip(" "))
    assert TableLine.parse(line.render()) == line


@pytest.mark.parametrize("row", FAILED_TABLE_ROWS, ids=lambda r: r.label)
def test_failed_thin_table_is_refused(row: Row) -> None:
    with pytest.raises(TableError, match="thin: kernel reported 'Fail'"):
        TableLine.parse(row.line)


def _real(label: str, target_type: str | None = None) -> t.Target:
    for r in GOOD_TABLE_ROWS:
        if r.label == label and (target_type is None or r.target_type == target_type):
            return TableLine.parse(r.line).target
    raise LookupError(label)


def test_real_values() -> None:
    assert _real("writecache.s.all_options") == EXAMPLES[5]
    p = _real("writecache.p.fua_cleaner")
    assert isinstance(p, t.Writecache)
    assert (p.mode, p.cache, p.fua, p.cleaner) == ("p", "259:0", True, True)
    pool = _real("thin-pool.features")
    assert pool == t.ThinPool(
        "7:14",
        "7:15",
        256,
        0,
        skip_block_zeroing=True,
        no_discard_passdown=True,
        error_if_no_space=True,
    )
    assert pool.features == ("skip_block_zeroing", "no_discard_passdown", "error_if_no_space")
    assert _real("thin-pool.read_only") == t.ThinPool("7:12", "7:13", 128, 1024, read_only=True)
    assert _real("thin.external_origin") == t.Thin("254:0", 2, "7:2")
    assert _real("snapshot.PO.fresh") == t.Snapshot("254:0", "7:25", "PO", 32)
    assert _real("snapshot-merge.done") == t.SnapshotMerge("254:0", "7:23", "P", 16)
    assert _real("log-writes.fresh") == t.LogWrites("7:27", "7:28")
    assert _real("flakey.drop_corrupt_read") == t.Flakey(
        "7:29", 0, 10, 5, drop_writes=True, corrupt_bio_byte=t.CorruptBioByte(1, "r", 0, 0)
    )
    assert _real("flakey.explicit_zero_features") == t.Flakey("7:29", 0, 10, 5)
    assert _real("linear.multi", "zero") == t.Zero()


def test_real_multi_line_table() -> None:
    text = "\n".join(r.line for r in GOOD_TABLE_ROWS if r.label == "linear.multi")
    table = Table.parse(text)
    assert table.size == 3600
    assert [type(ln.target) for ln in table.lines] == [t.Linear, t.Linear, t.Zero, t.Error]
    assert table.lines[1] == TableLine(1000, 2000, t.Linear("7:1", 4096))
    assert Table.parse(table.render()) == table


def test_kernel_renders_options_in_its_own_order() -> None:
    # Given as "fua cleaner", printed as "cleaner fua" (writecache.p.fua_cleaner).
    wc = t.Writecache.from_params("p 7:11 259:0 4096 2 fua cleaner")
    assert wc.params() == "p 7:11 259:0 4096 2 cleaner fua"
    fl = t.Flakey.from_params("7:29 0 10 5 6 corrupt_bio_byte 1 r 0 0 drop_writes")
    assert fl.params() == "7:29 0 10 5 6 drop_writes corrupt_bio_byte 1 r 0 0 "
    pool = t.ThinPool.from_params("7:1 7:2 128 0 2 error_if_no_space skip_block_zeroing")
    assert pool.params() == "7:1 7:2 128 0 2 skip_block_zeroing error_if_no_space "


def test_newer_kernel_renderings_parse() -> None:
    # Newer flakey drops the trailing space and prints "error_reads error_writes"
    # for a table given no features.
    fl = t.Flakey.from_params("7:0 0 1 0 2 error_reads error_writes")
    assert fl == t.Flakey("7:0", 0, 1, 0, error_reads=True, error_writes=True)
    assert t.Flakey.from_params("7:0 0 1 0") == t.Flakey("7:0", 0, 1, 0)
    assert t.Writecache.from_params("S 7:0 7:1 4096 0").mode == "s"
    assert t.Snapshot.from_params("7:0 7:1 po 8").persistent == "PO"


# -- property tests ----------------------------------------------------------------------------

_devs = st.builds(
    lambda a, b: f"{a}:{b}", st.integers(0, 4095), st.integers(0, 2**20 - 1)
) | st.sampled_from(["/dev/loop0", "/dev/mapper/x-y", "/dev/pmem0"])


@st.composite
def writecaches(draw: st.DrawFn) -> t.Writecache:
    mode = draw(st.sampled_from(["p", "s"]))
    kw: dict[str, Any] = {}

    def maybe(name: str, strat: st.SearchStrategy[Any]) -> None:
        if draw(st.booleans()):
            kw[name] = draw(strat)

    maybe("start_sector", st.integers(0, 2**64 - 1))
    maybe("high_watermark", st.integers(0, 100))
    maybe("low_watermark", st.integers(0, 100))
    high, low = kw.get("high_watermark", 50), kw.get("low_watermark", 45)
    if high < low:  # the kernel refuses this; pin both so high >= low
        kw["high_watermark"], kw["low_watermark"] = low, high
    maybe("writeback_jobs", st.integers(0, 2**32 - 1))
    maybe("autocommit_blocks", st.integers(0, 2**32 - 1))
    maybe("autocommit_time", st.integers(0, 3_600_000))
    maybe("max_age", st.integers(0, 86_400_000))
    maybe("cleaner", st.booleans())
    maybe("metadata_only", st.booleans())
    if mode == "p":
        maybe("fua", st.booleans())
    else:
        maybe("pause_writeback", st.integers(0, 60_000))
    block_size = draw(st.sampled_from([512, 1024, 2048, 4096]))
    return t.Writecache(mode, draw(_devs), draw(_devs), block_size, **kw)


@given(writecaches(), st.randoms(use_true_random=False))
def test_writecache_options_round_trip(wc: t.Writecache, rnd: random.Random) -> None:
    p = wc.params()
    assert t.Writecache.from_params(p) == wc
    words = p.split()
    assert int(words[4]) == len(words) - 5  # the count is of option words
    # Options parse back in any order.
    groups: list[list[str]] = []
    rest = words[5:]
    while rest:
        n = 1 if rest[0] in ("cleaner", "fua", "nofua", "metadata_only") else 2
        groups.append(rest[:n])
        rest = rest[n:]
    rnd.shuffle(groups)
    shuffled = " ".join(words[:5] + [w for g in groups for w in g])
    assert t.Writecache.from_params(shuffled) == wc
    line = TableLine(0, 8, wc)
    assert TableLine.parse(line.render()) == line


_POOL_FEATURES = (
    "skip_block_zeroing",
    "ignore_discard",
    "no_discard_passdown",
    "read_only",
    "error_if_no_space",
)


@given(
    st.fixed_dictionaries({f: st.booleans() for f in _POOL_FEATURES}),
    st.integers(1, 2097152 // 128).map(lambda n: n * 128),
    st.integers(0, 2**64 - 1),
    _devs,
    _devs,
    st.randoms(use_true_random=False),
)
def test_thin_pool_features_round_trip(
    feats: dict[str, bool], bs: int, lwm: int, meta: str, data: str, rnd: random.Random
) -> None:
    pool = t.ThinPool(meta, data, bs, lwm, **feats)
    p = pool.params()
    assert p.endswith(" ")  # like the kernel
    assert t.ThinPool.from_params(p) == pool
    on = [f for f in _POOL_FEATURES if feats[f]]
    assert pool.features == tuple(on)
    rnd.shuffle(on)
    given_order = f"{meta} {data} {bs} {lwm} {len(on)} {' '.join(on)}"
    assert t.ThinPool.from_params(given_order) == pool


@given(
    st.sampled_from([None, "drop_writes", "error_writes"]),
    st.booleans(),
    st.one_of(
        st.none(),
        st.builds(
            t.CorruptBioByte,
            st.integers(1, 2**32 - 1),
            st.sampled_from(["r", "w"]),
            st.integers(0, 255),
            st.integers(0, 2**32 - 1),
        ),
    ),
    st.integers(0, 2**31 - 1),
    st.integers(1, 2**31),
)
def test_flakey_round_trip(
    writes: str | None, error_reads: bool, cbb: t.CorruptBioByte | None, up: int, down: int
) -> None:
    kw: dict[str, Any] = {}
    if writes:
        kw[writes] = True
    if cbb is not None and not (writes and cbb.direction == "w"):
        kw["corrupt_bio_byte"] = cbb
    if error_reads and not (cbb is not None and cbb.direction == "r"):
        kw["error_reads"] = True
    fl = t.Flakey("7:0", 0, up, down, **kw)
    assert t.Flakey.from_params(fl.params()) == fl


# -- validation --------------------------------------------------------------------------------

BAD: list[tuple[str, Any, str]] = [
    (
        "writecache block size",
        lambda: t.Writecache("s", "7:0", "7:1", 3000),
        "writecache: block_size 3000 is not a power of two between 512 and 4096",
    ),
    (
        "writecache block size too big",
        lambda: t.Writecache("s", "7:0", "7:1", 8192),
        "writecache: block_size 8192",
    ),
    (
        "writecache block size parsed",
        lambda: t.Writecache.from_params("s 7:0 7:1 256 0"),
        "writecache: block_size 256",
    ),
    ("writecache mode", lambda: t.Writecache("x", "7:0", "7:1"), "writecache: mode 'x'"),
    (
        "writecache watermark",
        lambda: t.Writecache("s", "7:0", "7:1", high_watermark=101),
        "writecache: high_watermark 101",
    ),
    (
        "writecache watermark order",
        lambda: t.Writecache("s", "7:0", "7:1", high_watermark=30),
        "writecache: high_watermark 30 is below low_watermark 45",
    ),
    (
        "writecache fua in s mode",
        lambda: t.Writecache("s", "7:0", "7:1", fua=True),
        "writecache: fua is only valid in p mode",
    ),
    (
        "writecache pause in p mode",
        lambda: t.Writecache("p", "7:0", "7:1", pause_writeback=100),
        "writecache: pause_writeback is only valid in s mode",
    ),
    (
        "writecache autocommit_time",
        lambda: t.Writecache("s", "7:0", "7:1", autocommit_time=3_600_001),
        "writecache: autocommit_time 3600001",
    ),
    (
        "writecache unknown option",
        lambda: t.Writecache.from_params("s 7:0 7:1 4096 1 turbo"),
        "writecache: unknown option 'turbo'",
    ),
    (
        "writecache option count",
        lambda: t.Writecache.from_params("s 7:0 7:1 4096 17 cleaner"),
        "writecache: optional argument count 17",
    ),
    (
        "writecache option value missing",
        lambda: t.Writecache.from_params("s 7:0 7:1 4096 1 max_age 5"),
        "writecache: option max_age is missing its value",
    ),
    (
        "writecache duplicate",
        lambda: t.Writecache.from_params("p 7:0 7:1 4096 2 fua nofua"),
        "writecache: option nofua given twice",
    ),
    (
        "writecache non-number",
        lambda: t.Writecache.from_params("s 7:0 7:1 4096 2 max_age 1_000"),
        "writecache: max_age '1_000' is not a decimal number",
    ),
    (
        "thin-pool block size",
        lambda: t.ThinPool("7:0", "7:1", 100, 0),
        "thin-pool: data_block_size 100 is not a multiple of 128",
    ),
    (
        "thin-pool block size too big",
        lambda: t.ThinPool("7:0", "7:1", 2097152 + 128, 0),
        "thin-pool: data_block_size 2097280",
    ),
    (
        "thin-pool unknown feature",
        lambda: t.ThinPool.from_params("7:0 7:1 128 0 1 turbo"),
        "thin-pool: unknown feature 'turbo'",
    ),
    (
        "thin-pool feature count",
        lambda: t.ThinPool.from_params("7:0 7:1 128 0 2 read_only"),
        "thin-pool: feature count 2",
    ),
    (
        "thin-pool feature type",
        lambda: t.ThinPool("7:0", "7:1", 128, 0, read_only=1),
        "thin-pool: read_only 1 is not a bool",
    ),
    (
        "thin-pool negative low water",
        lambda: t.ThinPool("7:0", "7:1", 128, -1),
        "thin-pool: low_water_mark -1",
    ),
    ("thin dev_id", lambda: t.Thin("254:0", 2**24), "thin: dev_id 16777216 is out of range"),
    ("thin dev_id negative", lambda: t.Thin("254:0", -1), "thin: dev_id -1"),
    ("thin device", lambda: t.Thin("pool", 1), "thin: pool_dev 'pool'"),
    ("thin trailing", lambda: t.Thin.from_params("254:0 1 7:2 7:3"), "thin: unexpected trailing"),
    (
        "snapshot chunk",
        lambda: t.Snapshot("7:0", "7:1", "P", 12),
        "snapshot: chunk_size 12 is not a power of two",
    ),
    ("snapshot chunk 0", lambda: t.Snapshot("7:0", "7:1", "N", 0), "snapshot: chunk_size 0"),
    ("snapshot store", lambda: t.Snapshot("7:0", "7:1", "X", 8), "snapshot: persistent 'X'"),
    (
        "snapshot-merge chunk",
        lambda: t.SnapshotMerge("7:0", "7:1", "P", 3),
        "snapshot-merge: chunk_size 3",
    ),
    (
        "snapshot-merge transient",
        lambda: t.SnapshotMerge("7:0", "7:1", "N", 8),
        "snapshot-merge: persistent N",
    ),
    ("linear offset", lambda: t.Linear("7:0", -5), "linear: offset -5"),
    ("linear device", lambda: t.Linear("loop0", 0), "linear: device 'loop0'"),
    ("linear device space", lambda: t.Linear("/dev/a b", 0), "linear: device '/dev/a b'"),
    ("linear missing", lambda: t.Linear.from_params("7:0"), "linear: missing offset"),
    ("zero params", lambda: t.Zero.from_params("7:0"), "zero: unexpected trailing"),
    ("log-writes", lambda: t.LogWrites("7:0", ""), "log-writes: log_dev ''"),
    ("flakey interval", lambda: t.Flakey("7:0", 0, 0, 0), "flakey: up_interval + down_interval"),
    (
        "flakey interval overflow",
        lambda: t.Flakey("7:0", 0, 2**32 - 1, 1),
        "flakey: up_interval + down_interval 4294967296 overflows",
    ),
    (
        "flakey drop+error",
        lambda: t.Flakey("7:0", 0, 1, 1, drop_writes=True, error_writes=True),
        "flakey: drop_writes conflicts with error_writes",
    ),
    (
        "flakey drop+corrupt w",
        lambda: t.Flakey.from_params("7:0 0 1 1 6 drop_writes corrupt_bio_byte 1 w 0 0"),
        "flakey: drop_writes is incompatible with corrupting writes",
    ),
    (
        "flakey error_reads+corrupt r",
        lambda: t.Flakey("7:0", 0, 1, 1, error_reads=True, random_read_corrupt=5),
        "flakey: error_reads is incompatible with corrupting reads",
    ),
    (
        "flakey corrupt value",
        lambda: t.CorruptBioByte(1, "r", 256),
        "flakey: corrupt_bio_byte value 256",
    ),
    (
        "flakey corrupt byte 0",
        lambda: t.CorruptBioByte(0, "r", 1),
        "flakey: corrupt_bio_byte nth_byte 0",
    ),
    (
        "flakey direction",
        lambda: t.Flakey.from_params("7:0 0 1 1 5 corrupt_bio_byte 1 x 0 0"),
        "flakey: corrupt_bio_byte direction 'x'",
    ),
    (
        "flakey unknown feature",
        lambda: t.Flakey.from_params("7:0 0 1 1 1 sometimes"),
        "flakey: unknown feature 'sometimes'",
    ),
    (
        "flakey random 0",
        lambda: t.Flakey("7:0", 0, 1, 1, random_read_corrupt=0),
        "flakey: random_read_corrupt 0",
    ),
    (
        "table line negative length",
        lambda: TableLine(0, -8, t.Zero()),
        "zero: length -8 is not positive",
    ),
    ("table line zero length", lambda: TableLine(0, 0, t.Zero()), "zero: length 0 is not positive"),
    (
        "table line bad start",
        lambda: TableLine.parse("x 8 linear 7:0 0"),
        "linear: start 'x' is not a decimal number",
    ),
    ("table line short", lambda: TableLine.parse("0 8"), "need 'start length type"),
    ("unknown type", lambda: TableLine.parse("0 8 raid 1 2 3"), "unknown target type 'raid'"),
]


@pytest.mark.parametrize(("fn", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_parameters_raise_table_error(fn: Any, message: str) -> None:
    with pytest.raises(TableError) as exc:
        fn()
    assert message in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_table_validation() -> None:
    lin = t.Linear("7:0", 0)
    with pytest.raises(TableError, match="at least one line"):
        Table(())
    with pytest.raises(
        TableError, match=r"linear: start 8 on table line 1 leaves a gap; expected 0"
    ):
        Table((TableLine(8, 8, lin),))
    with pytest.raises(TableError, match=r"zero: start 20 on table line 2 leaves a gap"):
        Table((TableLine(0, 10, lin), TableLine(20, 10, t.Zero())))
    with pytest.raises(TableError, match=r"error: start 5 on table line 2 leaves an overlap"):
        Table((TableLine(0, 10, lin), TableLine(5, 10, t.Error())))
    with pytest.raises(TableError, match="gap"):
        Table.parse("0 10 zero\n11 10 zero")
    pool = t.ThinPool("7:0", "7:1", 128, 0)
    with pytest.raises(TableError, match="thin-pool: must be the only target"):
        Table((TableLine(0, 10, pool), TableLine(10, 10, t.Zero())))


def test_table_helpers() -> None:
    single = Table.single(2048, t.Zero())
    assert single.lines == (TableLine(0, 2048, t.Zero()),)
    assert single.size == 2048
    assert single.render() == "0 2048 zero"
    table = Table.of([(100, t.Linear("7:0", 0)), (50, t.Error())])
    assert table.render() == "0 100 linear 7:0 0\n100 50 error"
    assert table.size == 150
    assert Table([TableLine(0, 1, t.Zero())]).lines == (TableLine(0, 1, t.Zero()),)
    assert Table.parse(table.render() + "\n\n") == table


def test_targets_are_frozen() -> None:
    lin = t.Linear("7:0", 0)
    with pytest.raises(AttributeError):
        lin.offset = 5  # type: ignore[misc]
    assert hash(lin) == hash(t.Linear("7:0", 0))


def test_target_class() -> None:
    assert t.target_class("thin-pool") is t.ThinPool
    assert t.target_class("snapshot-merge") is t.SnapshotMerge
    with pytest.raises(TableError, match="unknown target type 'cache'"):
        t.target_class("cache")


# -- devno -------------------------------------------------------------------------------------


def test_devno_passes_maj_min_through() -> None:
    assert t.devno("7:0") == "7:0"
    assert t.devno("254:12") == "254:12"


def test_devno_of_block_device(monkeypatch: pytest.MonkeyPatch) -> None:
    real_stat = os.stat

    def fake_stat(path: Any, *a: Any, **kw: Any) -> os.stat_result:
        if path == "/dev/fakeloop0":
            fields = [stat.S_IFBLK | 0o660, 0, 0, 1, 0, 0, 0, 0, 0, 0]
            res = os.stat_result(fields, {"st_rdev": os.makedev(7, 3)})
            return res
        return real_stat(path, *a, **kw)

    monkeypatch.setattr(os, "stat", fake_stat)
    assert t.devno("/dev/fakeloop0") == "7:3"


def test_devno_rejects_non_block(tmp_path: Path) -> None:
    f = tmp_path / "plain"
    f.write_bytes(b"")
    with pytest.raises(TableError, match="is not a block device"):
        t.devno(str(f))
    with pytest.raises(TableError, match="No such file"):
        t.devno(str(tmp_path / "missing"))
