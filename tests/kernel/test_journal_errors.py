"""Device errors under the journal (dm-flakey with error_writes): a failing
volume device makes the flusher keep and retry its records; a failing journal
device makes writes fail with a clear error. Nothing acknowledged is lost."""

from __future__ import annotations

import os
import time

import pytest
from faultdev import FaultDevice
from jmodel import pattern, read_direct

from dmsnap import errors as E
from dmsnap.storage.journals import dm_path
from dmsnap.storage.manager import Manager

MiB = 1 << 20
SECTOR = 512


def wait_for(cond, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (v := cond()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return v


def test_volume_device_errors_keep_records_until_it_works_again(tmp_path, dm, loopdev):
    fl = FaultDevice(dm, "dmsnap-test-edata", loopdev(192 * MiB))
    m = Manager(str(tmp_path / "state"))
    try:
        # classic: a failed write to a thin pool's own metadata would put the
        # pool in fail mode, which is dm-thin's business, not the journal's
        m.pool_create("e", data=fl.path, backend="classic", journal_size=16 * MiB)
        m.volume_create("e", "v", 8 * MiB)
        io = m.open_volume("e", "v")
        io.write(0, pattern(1, MiB))
        assert m.snapshot_create([["e", "v"]], "before", wait=True)["state"] == "done"

        fl.fail_writes(True)
        io.write(MiB, pattern(2, MiB))  # acknowledged: durable in the journal
        health = wait_for(
            lambda: [h for h in m.pool_show("e")["health"] if "flush error" in h],
            "the flusher's write error is not reported",
        )
        assert "EIO" in health[0]
        assert io.read(MiB, MiB) == pattern(2, MiB)  # served from the journal
        assert m.pool_show("e")["journal"]["lag_records"] > 0

        fl.fail_writes(False)  # the flusher's retry gets through, in order
        wait_for(lambda: m.pool_show("e")["journal"]["lag_records"] == 0, "never drained")
        assert not [h for h in m.pool_show("e")["health"] if "flush error" in h]
        r = m.snapshot_create([["e", "v"]], "after", wait=True)
        path = m.snapshot_activate("e", "v", "after")["path"]
        try:
            assert read_direct(path, 0, MiB) == pattern(1, MiB)
            assert read_direct(path, MiB, MiB) == pattern(2, MiB)
        finally:
            m.snapshot_deactivate("e", "v", "after")
        assert r["state"] == "done"
    finally:
        for p in m.catalog.pools():
            m.pool_destroy(p.name, force=True)
        m.close()
        fl.remove()


def test_journal_device_error_fails_writes_clearly_and_loses_nothing(tmp_path, dm, loopdev):
    fl = FaultDevice(dm, "dmsnap-test-ejournal", loopdev(16 * MiB))
    state = str(tmp_path / "state")
    m = Manager(state)
    try:
        m.pool_create("k", size=128 * MiB, journal=fl.path)
        # shown as the node it resolved to at create (docs/storage.md)
        assert os.stat(m.pool_show("k")["journal"]["path"]).st_rdev == os.stat(fl.path).st_rdev
        m.volume_create("k", "v", 8 * MiB)
        io = m.open_volume("k", "v")
        io.write(0, pattern(1, MiB))
        marker = m.snapshot_create([["k", "v"]], "s1")["marker"]  # durable

        fl.fail_writes(True)
        with pytest.raises(E.UserError) as ei:
            io.write(MiB, pattern(2, MiB))
        assert "I/O error" in str(ei.value) or "EIO" in str(ei.value), str(ei.value)
        with pytest.raises(E.UserError):  # sticky: the journal is not trusted again
            io.write(2 * MiB, pattern(3, 4096))
        assert io.read(0, MiB) == pattern(1, MiB)  # reads still work
        health = m.pool_show("k")["health"]
        # one clear line, said once (it read "journal journal error: ...")
        assert [h for h in health if h.startswith("journal error: ")], health

        # replace/repair the device, restart: the journal replays from its
        # last good checkpoint; the acknowledged write and marker are there
        fl.fail_writes(False)
        m.close(drain=False)
        m = Manager(state)
        assert m.assemble()["pools"]["k"] == "ok"
        wait_for(lambda: m.snapshot_request("k", marker=marker)["state"] == "done", "s1 not made")
        assert len([s for s in m.snapshot_list("k", "v") if s["name"] == "s1"]) == 1
        io = m.open_volume("k", "v")
        assert io.read(0, MiB) == pattern(1, MiB)
        io.write(MiB, pattern(4, MiB))  # and it takes writes again
        assert io.read(MiB, MiB) == pattern(4, MiB)
        path = m.snapshot_activate("k", "v", "s1")["path"]
        try:
            assert read_direct(path, 0, MiB) == pattern(1, MiB)
            assert read_direct(path, MiB, MiB) == bytes(MiB)
        finally:
            m.snapshot_deactivate("k", "v", "s1")
    finally:
        for p in m.catalog.pools():
            m.pool_destroy(p.name, force=True)
        m.close()
        fl.remove()


def test_failed_fdatasync_is_rewritten_not_checkpointed_past(tmp_path, dm):
    """Issue 17, item 4. After a writeback error Linux marks the pages
    clean and reports the error to one fdatasync only: a retried fdatasync
    succeeds although the data never reached the disk. The data device has
    4 KiB logical blocks (a 4Kn disk), so the flusher's 512-byte writes go
    through the page cache; its writes fail underneath (dm-flakey), so the
    fdatasync after them fails. Once the device works again the records
    must be written again from the journal before the checkpoint passes
    them: on the device (read around the page cache) is the acknowledged
    data, and meanwhile readers see it from the journal."""
    from dmsnap.storage import loop

    img = str(tmp_path / "data4k.img")
    loop.make_sparse(img, 192 * MiB)
    dev = loop.attach(img, block_size=4096)
    fl = FaultDevice(dm, "dmsnap-test-esync", dev)
    m = Manager(str(tmp_path / "state"))
    try:
        m.pool_create("s", data=fl.path, backend="classic", journal_size=16 * MiB)
        m.volume_create("s", "v", 8 * MiB)
        io = m.open_volume("s", "v")
        pj = next(iter(m.journals.by_pool.values()))
        io.write(16384, pattern(3, 4096))  # on the disk before the fault
        pj.sync()

        fl.fail_writes(True)
        io.write(512, pattern(1, 512))  # a part of a 4 KiB block: buffered
        io.write(8192, pattern(2, 4096))
        health = wait_for(
            lambda: [h for h in m.pool_show("s")["health"] if "flush error" in h],
            "the failed fdatasync is not reported",
        )
        assert "EIO" in health[0]
        time.sleep(2.5)  # a few retries while the device still fails
        st = pj.stats()
        assert st.checkpoint_seq < st.head_seq, "checkpoint passed a failed sync"
        assert io.read(512, 512) == pattern(1, 512)  # readers: from the journal
        assert io.read(8192, 4096) == pattern(2, 4096)

        fl.fail_writes(False)
        wait_for(lambda: pj.stats().checkpoint_seq == pj.stats().head_seq, "never checkpointed")
        disk = read_direct(dm_path("s", "v"), 0, 5 * 4096)
        assert disk[512:1024] == pattern(1, 512), "acknowledged write lost below the journal"
        assert disk[8192:12288] == pattern(2, 4096), "acknowledged write lost below the journal"
        assert disk[16384:20480] == pattern(3, 4096)
        assert not [h for h in m.pool_show("s")["health"] if "flush error" in h]
    finally:
        for p in m.catalog.pools():
            m.pool_destroy(p.name, force=True)
        m.close()
        fl.remove()
        loop.detach(dev)


def test_damaged_journal_refuses_the_pool_until_repaired(tmp_path):
    """Issue 17, item 5, through the Manager: a journal whose acknowledged
    record in the middle is damaged keeps its pool down with a one-line
    message naming the record and the way forward; `pool repair` drops
    that record and the later ones and brings the pool up."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))
    from test_journal_support import WRITE, current_super, make_record, rec_size, write_ring

    state = str(tmp_path / "state")
    m = Manager(state)
    try:
        m.pool_create("r", size=128 * MiB, journal_size=16 * MiB)
        m.volume_create("r", "v", 8 * MiB)
        vid = m.catalog.volume("r", "v").id
        jpath = Path(m.pool_show("r")["journal"]["path"])
        m.close()  # drained: the log is empty after the checkpoint

        # three acknowledged writes after the checkpoint, the middle one damaged
        sb = current_super(jpath)
        seq, pos, size = sb.ckpt_seq, sb.ckpt_pos, rec_size(4096, sb.align)
        assert pos + 3 * size <= sb.capacity
        for k in range(3):
            rec = make_record(
                journal_id=sb.journal_id,
                generation=sb.generation,
                seq=seq + k,
                type=WRITE,
                vol=vid,
                offset=k * 4096,
                data=pattern(10 + k, 4096),
                align=sb.align,
                ack_lag=1,  # every earlier record was durable when it was appended
            )
            write_ring(jpath, pos + k * size, rec)
        write_ring(jpath, pos + size + 1024, b"\xff" * 512)

        m = Manager(state)
        msg = m.assemble()["pools"]["r"]
        assert f"record {seq + 1} is damaged" in msg and "\n" not in msg, msg
        assert f"dmsnap pool repair r --discard-after {seq + 1}" in msg, msg
        assert msg in m.pool_show("r")["health"]
        with pytest.raises(E.UserError):
            m.open_volume("r", "v")

        with pytest.raises(E.InvalidArgument):  # past the damage: refused
            m.pool_repair("r", seq + 2)
        r = m.pool_repair("r", seq + 1)
        assert r == {"pool": "r", "dropped": 2, "state": "ok"}
        io = m.open_volume("r", "v")
        assert io.read(0, 4096) == pattern(10, 4096)  # replayed
        assert io.read(4096, 8192) == bytes(8192)  # dropped, as asked
        io.write(4096, pattern(20, 4096))
        assert io.read(4096, 4096) == pattern(20, 4096)
        assert not m.pool_show("r")["health"]
    finally:
        for p in m.catalog.pools():
            m.pool_destroy(p.name, force=True)
        m.close()
