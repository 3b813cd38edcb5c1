"""A thin pool whose metadata needs check (issue 17, item 6): the manual
steps of docs/storage.md ("needs_check"), run as written, on a pool that
dm-thin itself put in that state.

dm-thin sets ``needs_check`` when a metadata operation fails outright: here
a commit, whose writes to the metadata device fail (dm-flakey's
error_writes under the pool's ``_tmeta``). It then rolls its metadata back
to the last commit, so writes and a discard that were acknowledged and
already applied are gone from the pool; it stays read-only until
thin_check has cleared the flag. What a storage administrator is promised:
dmsnap refuses new writes with a line that names the steps, the journal
keeps (and serves) everything it acknowledged, and after the steps the pool
serves again with every acknowledged write and discard."""

from __future__ import annotations

import struct
import subprocess
import time

import pytest

from dmsnap import errors as E
from dmsnap.dm import status as st
from dmsnap.dm import targets as t
from dmsnap.dm.targets import Table, TableLine
from dmsnap.storage.manager import Manager

MiB = 1 << 20
KiB = 1 << 10
BLOCK = 64 * KiB
FOREVER = 3600  # flakey intervals: "always"


def pattern(off: int, gen: int) -> bytes:
    return struct.pack(">QQ", off, gen) * (4 * KiB // 16)


def _flakey(orig: Table, *, error_writes: bool) -> Table:
    """The metadata device's linear lines as dm-flakey over the same extents:
    passing everything, or failing every write."""
    lines = []
    for ln in orig.lines:
        assert isinstance(ln.target, t.Linear), orig.render()
        up, down = (0, FOREVER) if error_writes else (FOREVER, 0)
        lines.append(
            TableLine(
                ln.start,
                ln.length,
                t.Flakey(ln.target.device, ln.target.offset, up, down, error_writes=error_writes),
            )
        )
    return Table(tuple(lines))


def _run(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(cmd)}: {r.returncode}\n{r.stdout}{r.stderr}"
    return r.stdout + r.stderr


def _wait(cond, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_needs_check_steps_bring_the_pool_back_with_every_acknowledged_write(tmp_path) -> None:
    state = str(tmp_path / "state")
    m = Manager(state)
    try:
        m.pool_create("n", size=256 * MiB, journal_size=16 * MiB, sparse=True)
        m.volume_create("n", "v", 32 * MiB)
        expect: dict[int, bytes] = {}
        for off in range(0, 2 * MiB, BLOCK):
            m.volume_write("n", "v", off, pattern(off, 1))
            expect[off] = pattern(off, 1)
        pool = m.catalog.pool("n")
        pj = m.journals.by_pool[pool.id]
        pj.sync(60.0)  # committed in the pool's metadata
        b = m.stack.backend(pool)
        meta = b.internal("tmeta")[0]
        orig = b.dm.table(meta)

        def switch(table: Table) -> None:
            b.dm.load(meta, table)
            b.dm.suspend(meta, lockfs=False)
            b.dm.resume(meta)

        switch(_flakey(orig, error_writes=True))  # metadata writes fail from here
        # Acknowledged while the next commit will fail: new blocks (their
        # mappings are rolled back), overwrites of mapped blocks, a discard.
        for off in range(8 * MiB, 10 * MiB, BLOCK):
            m.volume_write("n", "v", off, pattern(off, 2))
            expect[off] = pattern(off, 2)
        for off in range(0, MiB, BLOCK):
            m.volume_write("n", "v", off, pattern(off, 2))
            expect[off] = pattern(off, 2)
        m.volume_discard("n", "v", MiB, MiB)
        for off in range(MiB, 2 * MiB, BLOCK):
            expect[off] = bytes(4 * KiB)

        def needs_check() -> bool:
            s = b.pool_status()
            return isinstance(s, st.ThinPoolStatus) and s.needs_check

        _wait(needs_check, f"the failed commit never set needs_check: {b.pool_status()}")
        switch(_flakey(orig, error_writes=False))
        switch(orig)  # the device works again; dm-thin stays read-only
        _wait(lambda: pj.no_space_reason is not None, "the journal never saw it")
        assert "needs check" in pj.no_space_reason, pj.no_space_reason
        with pytest.raises(E.NoSpace) as exc:
            m.volume_write("n", "v", 12 * MiB, pattern(12 * MiB, 3))
        assert "thin_check" in str(exc.value) and "\n" not in str(exc.value), exc.value
        health = m.pool_show("n")["health"]
        assert any("needs check" in h and "docs/storage.md" in h for h in health), health
        for off, data in expect.items():  # the journal serves what the pool lost
            assert m.volume_read("n", "v", off, len(data)) == data, f"block at {off}"

        # The steps of docs/storage.md, as written there.
        m.close(drain=False)  # 1. dmsnap daemon stop: devices stay up
        _run("dmsetup", "remove", "--retry", "dmsnap-n-v")  # 2. the volumes, then the pool
        _run("dmsetup", "remove", "--retry", "dmsnap-n-_tpool")
        tmeta = "/dev/mapper/dmsnap-n-_tmeta"
        head = _run("thin_dump", tmeta).splitlines()[0]
        assert 'flags="1"' in head, f"needs_check not on disk: {head}"
        _run("thin_check", tmeta)  # 3. it passes: the metadata is the last commit
        _run("thin_check", "--clear-needs-check-flag", tmeta)
        assert 'flags="0"' in _run("thin_dump", tmeta).splitlines()[0]
        m = Manager(state)  # 4. start dmsnapd: assembly, then the journal's replay
        m.assemble()
        s = m.stack.backend(m.catalog.pool("n")).pool_status()
        assert isinstance(s, st.ThinPoolStatus) and s.mode == "rw" and not s.needs_check, s
        pj = m.journals.by_pool[m.catalog.pool("n").id]
        pj.sync(60.0)
        for off, data in expect.items():
            assert m.volume_read("n", "v", off, len(data)) == data, f"block at {off} lost"
        assert not any("needs check" in h for h in m.pool_show("n")["health"])
        m.volume_write("n", "v", 12 * MiB, pattern(12 * MiB, 3))  # serves again
        m.close()
        m = Manager(state)  # and it is all on the pool, not only in the journal
        m.assemble()
        for off, data in expect.items():
            assert m.volume_read("n", "v", off, len(data)) == data, f"block at {off} lost"
    finally:
        try:
            pools = m.catalog.pools()
        except Exception:  # closed at step 1: a new one tears the pool down
            m = Manager(state)
            m.assemble()
            pools = m.catalog.pools()
        for p in pools:
            m.pool_destroy(p.name, force=True)
        m.close()
