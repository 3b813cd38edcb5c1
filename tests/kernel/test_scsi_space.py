"""A full thin pool seen by a SCSI initiator (tcm_loop, the ring's C fast
path into the journal).

What an initiator must see (SBC-4 4.7.3.6, thin provisioning): once the pool
has no data space, a write is answered at once with CHECK CONDITION, DATA
PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT (27h/07h), which Linux's sd
turns into ENOSPC, never BUSY until the initiator's timeout. Writes already
acknowledged (into the journal) are never lost: they wait in the journal and
land once space is freed (here: deleting another volume); writes are
accepted again from then on.
"""

from __future__ import annotations

import errno
import os
import struct
import time

import pytest
from scsi_util import pread_direct, pwrite_direct

from dmsnap import errors as E
from dmsnap.scsi import lio, sgio
from dmsnap.scsi import sense as S
from dmsnap.storage.manager import Manager

MiB = 1 << 20
CHUNK = 256 << 10  # one WRITE(16); SG_IO through sd takes this much unaligned
PROMPT = 1.0  # seconds: "at once", against the 10 s journal wait behind BUSY


def write16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0, lba, blocks, 0, 0)


def chunk(off: int) -> bytes:
    """Content that names its own offset: a misplaced chunk is caught."""
    return struct.pack(">Q", off) * (CHUNK // 8)


def sense_of(r: sgio.SgResult) -> tuple[int, int, int]:
    if not r.sense:
        return (0, 0, 0)
    s = S.decode(r.sense)
    return int(s.key), s.asc, s.ascq


@pytest.fixture
def full_pool(tmp_path):
    if (why := lio.available()) is not None:
        pytest.fail(why)
    m = Manager(str(tmp_path / "state"))
    try:
        m.pool_create("f", size=64 * MiB, journal_size=16 * MiB)
        data = m.pool_show("f")["data_size"]
        # b takes 24 MiB of the pool (deleted later to free it); a is as
        # large as the pool, so filling a overflows it by more than the
        # journal holds (16 MiB): today's BUSY cannot hide behind the journal.
        m.volume_create("f", "b", 24 * MiB)
        for off in range(0, 24 * MiB, CHUNK):
            m.volume_write("f", "b", off, b"\xbb" * CHUNK)
        m.volume_create("f", "a", data)
        m.export_create("f", "a", kind="local")
        disk = os.path.realpath("/dev/dmsnap/f/a")
        assert disk.startswith("/dev/sd"), disk
        yield m, disk, data
    finally:
        for p in m.catalog.pools():
            m.pool_destroy(p.name, force=True)
        m.close()


def test_full_thin_pool_refuses_writes_at_once_and_keeps_acknowledged_ones(full_pool):
    m, disk, data = full_pool
    acked: list[int] = []
    refused: tuple[int, sgio.SgResult, float] | None = None
    for off in range(0, data, CHUNK):
        t0 = time.monotonic()
        r = sgio.sg_io(disk, write16(off // 512, CHUNK // 512), data_out=chunk(off))
        took = time.monotonic() - t0
        if r.good:
            acked.append(off)
            continue
        refused = (off, r, took)
        break
    assert refused is not None, f"all {len(acked)} MiB acknowledged although the pool is full"
    off, r, took = refused
    assert r.status == 2 and sense_of(r) == (7, 0x27, 0x07), (
        f"write at {off // MiB} MiB: status {r.status:#x} sense {r.sense.hex()} after {took:.1f} s"
    )
    assert took < PROMPT, f"refused only after {took:.1f} s"
    # 24 MiB of b + what was acknowledged is at least the data space: a was
    # refused because the pool is full, not anywhere earlier.
    assert 24 * MiB + len(acked) * CHUNK >= data, (len(acked), data)
    print(f"\nrefused at {off // MiB} MiB of a after {took * 1000:.0f} ms ({len(acked)} acked)")

    # Still full: every new write is refused at once, also through sd (ENOSPC).
    for later in (off + CHUNK, data - CHUNK):
        t0 = time.monotonic()
        r = sgio.sg_io(disk, write16(later // 512, CHUNK // 512), data_out=chunk(later))
        assert r.status == 2 and sense_of(r) == (7, 0x27, 0x07), r
        assert time.monotonic() - t0 < PROMPT
    t0 = time.monotonic()
    with pytest.raises(OSError) as exc:
        pwrite_direct(disk, off, chunk(off))
    assert exc.value.errno == errno.ENOSPC, exc.value
    assert time.monotonic() - t0 < PROMPT
    # Acknowledged writes read back (from the journal's overlay while stuck).
    for a in acked[-4:]:
        assert pread_direct(disk, a, CHUNK) == chunk(a), a
    pool = m.pool_show("f")
    assert any("flush error: ENOSPC" in h for h in pool["health"]), pool["health"]

    # Free space: the acknowledged writes land, new writes are taken again.
    m.volume_delete("f", "b")
    pj = m.journals.by_pool[m.catalog.pool("f").id]
    deadline = time.monotonic() + 60
    while pj.stats().unflushed_records and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pj.stats().unflushed_records == 0, pj.stats()
    assert pj.stats().flush_error == 0
    time.sleep(0.1)  # past the ring's cached "pool full" (50 ms)
    pwrite_direct(disk, off, chunk(off))
    for a in [*acked, off]:
        assert pread_direct(disk, a, CHUNK) == chunk(a), f"acknowledged write at {a} lost"


def test_full_pool_can_be_destroyed_with_force(tmp_path):
    """A pool whose flusher is stuck on a full thin pool still goes with
    `pool destroy --force` (its records go with it), promptly and cleanly,
    instead of waiting for a drain that cannot happen."""
    m = Manager(str(tmp_path / "state"))
    try:
        m.pool_create("f", size=64 * MiB, journal_size=16 * MiB)
        data = m.pool_show("f")["data_size"]
        m.volume_create("f", "a", data)
        m.volume_create("f", "b", data)
        with pytest.raises(E.NoSpace):  # refused once the flusher meets the full pool
            for vol in ("a", "b"):
                for off in range(0, data, MiB):
                    m.volume_write("f", vol, off, b"\xaa" * MiB)
        assert m.pool_show("f")["journal"]["lag_records"] > 0
        t0 = time.monotonic()
        m.pool_destroy("f", force=True)
        took = time.monotonic() - t0
        assert m.catalog.pools() == []
        assert took < 30, f"destroy took {took:.0f} s"
    finally:
        for p in m.catalog.pools():
            m.pool_destroy(p.name, force=True)
        m.close()
