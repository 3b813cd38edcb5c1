"""The crash-state generator of tools/torture crash on a synthetic
dm-log-writes log (the kernel part runs in the VM; this checks, without it,
that each kind of state takes only what it may)."""

from __future__ import annotations

import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "torture"), os.path.join(HERE, "..", "kernel")]

import crashlib as cl  # noqa: E402
from jmodel import LOG_FLUSH, LOG_FUA, LOG_MARK, LOG_WRITES_MAGIC  # noqa: E402

S = 512


def write_log(path: str, entries: list[tuple[int, int, int, bytes | str]]) -> None:
    """entries: (sector, nr_sectors, flags, data or mark label)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<QQQI", LOG_WRITES_MAGIC, 1, len(entries), S).ljust(S, b"\0"))
        for sector, n, flags, payload in entries:
            if flags & LOG_MARK:
                label = str(payload).encode()
                f.write((struct.pack("<QQQQ", 0, 0, flags, len(label)) + label).ljust(S, b"\0"))
            else:
                assert isinstance(payload, bytes) and len(payload) == n * S
                f.write(struct.pack("<QQQQ", sector, n, flags, n * S).ljust(S, b"\0"))
                f.write(payload)


def mark(k: int) -> tuple[int, int, int, str]:
    return (0, 0, LOG_MARK, f"c{k}")


def w(sector: int, n: int, flags: int = 0, byte: int = 1) -> tuple[int, int, int, bytes]:
    return (sector, n, flags, bytes([byte]) * (n * S))


def recording(tmp_path, logs: dict[str, list]) -> cl.Recording:
    paths = {}
    for d, es in logs.items():
        paths[d] = str(tmp_path / f"{d}.log")
        write_log(paths[d], es)
    events = [["pool", "tc"], ["vol+", "a", 1, 4096]]
    return cl.Recording(str(tmp_path), "thin", 1, events, [0, 2, 2], paths)


def test_states_take_only_what_they_may(tmp_path) -> None:
    ring = cl.JOURNAL_RING // S
    logs = {
        # journal: after c1 two ring records, then a superblock, then a third
        "journal": [
            mark(0),
            mark(1),
            w(ring, 2, LOG_FUA),
            w(ring + 2, 1, LOG_FUA),
            w(0, 8, LOG_FUA),
            w(ring + 3, 1, LOG_FUA),
            mark(2),
        ],
        # data: two plain writes and a flush after c1; a FUA after c1 too
        "data": [
            mark(0),
            mark(1),
            w(10, 4),
            w(20, 1),
            (0, 0, LOG_FLUSH, b""),
            w(30, 1, LOG_FUA),
            mark(2),
        ],
        "state": [mark(0), mark(1), mark(2)],  # quiet: dext states allowed
    }
    lg = cl.Logs(recording(tmp_path, logs))
    states = cl.generate(lg, 7)
    kinds = {s.kind for s in states}
    assert {"mark", "jext", "jtorn", "dvol", "dext"} <= kinds, kinds
    jl, dl = lg.entries["journal"], lg.entries["data"]
    for s in states:
        ex = dict(s.extra)
        for i, n in ex.get("journal", ()):
            # never the superblock write (entry 4) nor anything after it
            assert jl[i].offset >= cl.JOURNAL_RING and i < 4, s
            assert n is None or 0 < n < jl[i].length // S, s
        if s.kind == "dvol":
            assert all(dl[i].flags == 0 for i, _ in ex["data"]), s  # plain writes only
        if s.kind == "dext":
            idx = [i for i, _ in ex["data"]]
            assert idx == list(range(idx[0], idx[-1] + 1)) and dl[idx[-1]].flags, s
    assert sum(1 for s in states if s.kind == "jext") == 2  # stops at the superblock
    # entries after c1 were issued before c2: the oracle masks writes issued
    # up to there (a record in the state may be of a write issued after c1)
    assert all(s.horizon == (2 if s.extra else s.cut) for s in states), states
    # the cut before the pool was acknowledged yields nothing
    assert all(s.cut >= 1 for s in states)


def test_images_replay_prefix_and_extra_entries(tmp_path) -> None:
    logs = {
        "journal": [mark(0), mark(1), w(cl.JOURNAL_RING // S, 2, LOG_FUA, 5), mark(2)],
        "data": [mark(0), w(0, 1, 0, 9), (0, 0, LOG_FLUSH, b""), mark(1), w(1, 2, 0, 7), mark(2)],
        "state": [mark(0), mark(1), mark(2)],
    }
    lg = cl.Logs(recording(tmp_path, logs))
    imgs = cl.Images(lg, str(tmp_path))
    try:
        st = cl.State(0, "dvol", 1, (("data", ((4, 1),)),))  # torn to one sector
        paths = imgs.materialize(st)
        with open(paths["data"], "rb") as f:
            got = f.read(4 * S)
        assert got == bytes([9]) * S + bytes([7]) * S + bytes(2 * S)
        with open(paths["journal"], "rb") as f:
            f.seek(cl.JOURNAL_RING)
            assert f.read(S) == bytes(S)  # the journal's record is after c1
    finally:
        imgs.close()


def test_expect_masks_unacknowledged_writes() -> None:
    events = [
        ["pool", "tc"],
        ["vol+", "a", 1, 4096],
        ["intent", 10, 1, 0, 512, "write"],
        ["ack", 10, 5],
        ["intent", 11, 1, 512, 1024, "write"],
        ["intent", 12, 1, 2048, 512, "discard"],
        ["ack", 12, 7],
        ["marker", 3, 6, "s0", [["a", 1]]],
    ]
    ex = cl.expect(events, len(events))
    assert ex.volumes == {1: "a"} and ex.mask.sectors(1) == 2
    img = ex.model.state(1)
    assert img[:512] == cl.pattern(10, 512) and img[2048:2560] == bytes(512)
    assert ex.markers == [(3, 6, "s0", [("a", 1)])]
    assert cl.expect(events, 2).mask.sectors(1) == 0  # not issued yet: nothing unknown
    issued = cl.expect(events, 3)  # issued, not acknowledged: unknown, not expected
    assert issued.mask.sectors(1) == 1 and issued.model.state(1) == bytes(4096)


def test_expect_ram_journal_needs_a_completed_flush() -> None:
    # RAM journal: a write is durable once a FLUSH called after its
    # acknowledgement has returned; until then the volume may lack it, but a
    # snapshot acknowledged after it must hold it
    events = [
        ["pool", "tc", "ram", False],
        ["vol+", "a", 1, 4096],
        ["intent", 10, 1, 0, 512, "write"],
        ["ack", 10, 5],
        ["flush", 11],
        ["intent", 12, 1, 512, 512, "write"],
        ["ack", 12, 6],
        ["flushed", 11],
        ["intent", 13, 1, 1024, 512, "write"],
        ["ack", 13, 7],
        ["marker", 3, 8, "s0", [["a", 1]]],
    ]
    ex = cl.expect(events, len(events))
    assert ex.vmask is not None
    assert ex.mask.sectors(1) == 0  # every write acknowledged
    # 10 flushed; 12 acknowledged after the flush was called; 13 after it
    assert ex.vmask.sectors(1) == 2
    vm = ex.vmask.apply(1, bytes(ex.model.state(1)))
    assert vm[:512] == cl.pattern(10, 512) and vm[512:1536] == bytes(1024)
    assert ex.model.state(1, 8)[1024:1536] == cl.pattern(13, 512)  # the snapshot has it
    before_flush = cl.expect(events, 7)  # the flush had not returned
    assert before_flush.vmask is not None and before_flush.vmask.sectors(1) == 2
    nv = cl.expect([["pool", "tc", "nv", False], *events[1:]], len(events))
    assert nv.vmask is not None and nv.vmask.sectors(1) == 0  # NV: acknowledged is durable


def test_expect_snapshot_deletions() -> None:
    events = [
        ["pool", "tc", "nv", False],
        ["vol+", "a", 1, 4096],
        ["vol+", "b", 2, 4096],
        ["marker", 3, 6, "s0", [["a", 1], ["b", 2]]],
        ["snap-intent", "s0", "a"],
        ["snap-", "s0", "a"],
        ["snap-intent", "s0", "b"],
    ]
    ex = cl.expect(events, len(events))
    assert ex.snap_gone == {("s0", "a")} and ex.snap_maybe == {("s0", "b")}
    assert cl.expect(events, 4).snap_gone == set()


def test_cache_device_states_only_while_the_others_are_quiet(tmp_path) -> None:
    logs = {
        "data": [mark(0), mark(1), mark(2), w(5, 1), (0, 0, LOG_FLUSH, b""), mark(3)],
        "state": [mark(0), mark(1), mark(2), mark(3)],
        "cache": [
            mark(0),
            mark(1),
            w(1, 2),
            w(4, 1),
            (0, 0, LOG_FLUSH, b""),
            mark(2),
            w(8, 1, LOG_FUA),
            mark(3),
        ],
    }
    r = recording(tmp_path, logs)
    r.cuts = [0, 2, 2, 2]
    lg = cl.Logs(r)
    assert lg.devs == ("data", "state", "cache")
    states = cl.generate(lg, 3)
    cl_ = lg.entries["cache"]
    cvol = [s for s in states if s.kind == "cvol"]
    assert cvol and all(cl_[i].flags == 0 for s in cvol for i, _ in dict(s.extra)["cache"])
    # cext at c1 (data and state quiet), not at c2 (the data device wrote)
    assert {s.cut for s in states if s.kind == "cext"} == {1}
    # and no dext: at c2 the data device's flush came while the cache wrote
    assert not any(s.kind == "dext" for s in states)


def test_host_check_reads_thin_dump_and_a_classic_cow_store(tmp_path) -> None:
    import hostcheck as hc

    xml = """<superblock uuid="" time="1" transaction="3" data_block_size="128">
  <device dev_id="1" mapped_blocks="3" transaction="0">
    <single_mapping origin_block="0" data_block="7" time="0"/>
    <range_mapping origin_begin="4" data_begin="20" length="2" time="0"/>
  </device>
  <device dev_id="2" mapped_blocks="0" transaction="1">
  </device>
</superblock>"""
    assert hc.parse_thin_dump(xml) == {1: {0: 7, 4: 20, 5: 21}, 2: {}}
    # a COW area of 4 KiB chunks: header, one metadata area whose two
    # exceptions put old chunks 1 and 3 in new chunks 2 and 3, then the end
    cs = 4096
    cow = bytearray(8 * cs)
    cow[:16] = struct.pack("<IIII", hc.COW_MAGIC, 1, 1, cs // S)
    cow[cs : cs + 48] = struct.pack("<QQQQQQ", 1, 2, 3, 3, 0, 0)
    cow[2 * cs : 3 * cs] = b"\x11" * cs
    cow[3 * cs : 4 * cs] = b"\x33" * cs
    data = tmp_path / "data.img"
    data.write_bytes(bytes(16 * cs) + bytes(cow))  # the COW area at chunk 16
    vols = hc.Volumes.__new__(hc.Volumes)
    vols.data_img = str(data)

    class Snap:
        volume, name, cow_start, cow_size = "a", "s", 16 * cs // S, len(cow)

    origin = b"\xee" * (5 * cs)
    got = vols.read_classic_snap(Snap, origin, [])
    assert got == b"\xee" * cs + b"\x11" * cs + b"\xee" * cs + b"\x33" * cs + b"\xee" * cs
    cow[:4] = bytes(4)  # never initialised: the origin itself
    data.write_bytes(bytes(16 * cs) + bytes(cow))
    assert vols.read_classic_snap(Snap, origin, []) == origin
