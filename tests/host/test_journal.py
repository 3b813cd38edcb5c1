"""Journal unit tests on the host: a "dm device" is a sparse file."""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from pathlib import Path

import pytest
from test_journal_support import VOL, Controller, hold_marker, make_volume, pattern

from dmsnap._hotpath import ffi, lib
from dmsnap.journal import Journal, JournalError

MiB = 1 << 20


def test_crc32c_known_vectors() -> None:
    assert lib.jr_crc32c(b"123456789", 9) == 0xE3069283
    assert lib.jr_crc32c(b"", 0) == 0
    rnd = random.Random(1)
    for n in (1, 7, 8, 9, 63, 512, 4099):
        data = rnd.randbytes(n)
        assert lib.jr_crc32c(data, n) == lib.jr_crc32c_table(data, n)
        # every implementation, at every alignment of the buffer's start
        for skew in range(8):
            buf = ffi.from_buffer(b"\0" * skew + data)
            want = lib.jr_crc32c_variant(0, buf + skew, n)
            assert lib.jr_crc32c_variant(1, buf + skew, n) == want
            assert lib.jr_crc32c_variant(2, buf + skew, n) == want
    assert ffi.string(lib.jr_crc32c_impl()) in (b"sse4.2", b"slice8")


def test_format_open_close_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "j"
    Journal.format(str(p), 2 * MiB, journal_id=0x1234)
    assert p.stat().st_size == 2 * MiB
    for gen in (1, 2, 3):
        with Journal.open(str(p)) as j:
            st = j.stats()
            assert st.generation == gen
            assert st.capacity == 2 * MiB - 8192
            assert st.align == 512
            assert (st.head_seq, st.checkpoint_seq, st.used) == (1, 1, 0)
            assert st.mode_name == "nv"
    # a file that is not a journal
    bad = tmp_path / "bad"
    bad.write_bytes(os.urandom(1 * MiB))
    with pytest.raises(JournalError) as e:
        Journal.open(str(bad))
    assert e.value.errno == errno.EBADMSG
    assert "superblock" in str(e.value)
    with pytest.raises(JournalError) as e:
        Journal.format(str(tmp_path / "tiny"), 16384)
    assert e.value.errno == errno.EINVAL


def test_write_read_and_reach_the_dm_file(nv: Journal, vol1: Path) -> None:
    a, b = pattern(1, 8192), pattern(2, 4096)
    s1 = nv.write(1, 0, a)
    s2 = nv.write(1, 1 * MiB, bytearray(b))
    assert s2 > s1 >= 1
    assert nv.read(1, 0, 8192) == a
    assert nv.read(1, 1 * MiB, 4096) == b
    assert nv.read(1, 2 * MiB, 4096) == bytes(4096)
    nv.sync()
    data = vol1.read_bytes()
    assert data[:8192] == a and data[MiB : MiB + 4096] == b
    st = nv.stats()
    assert st.appends == 2 and st.unflushed_records == 0 and st.synced_seq == st.head_seq
    # memoryview input, read_into
    mv = memoryview(pattern(3, 1024))
    nv.write(1, 512, mv)
    out = bytearray(2048)
    nv.read_into(1, 0, out)
    assert bytes(out) == a[:512] + bytes(mv) + a[1536:2048]


def test_partial_overlaps_newest_wins(nv: Journal, vol1: Path) -> None:
    rnd = random.Random(5)
    model = bytearray(64 * 1024)
    base = pattern(10, 64 * 1024)
    nv.write(1, 0, base)
    model[:] = base
    nv.sync()  # flushed: on the dm file
    hold_marker(nv)  # nothing after this reaches the dm file
    tag = 11
    for _ in range(40):
        off = rnd.randrange(0, 120) * 512
        ln = rnd.randrange(1, 9) * 512
        data = pattern(tag, ln)
        tag += 1
        nv.write(1, off, data)
        model[off : off + ln] = data
    st = nv.stats()
    assert st.unflushed_records == 40 and st.marker_waiting == 1
    # reads spanning flushed + unflushed + several overlapping records
    for off, ln in [(0, 64 * 1024), (512, 4096), (3 * 512, 7 * 512), (60 * 1024, 4096)]:
        assert nv.read(1, off, ln) == bytes(model[off : off + ln])
    assert vol1.read_bytes()[: 64 * 1024] == base  # really not flushed
    nv.marker_done(99)
    nv.sync()
    assert vol1.read_bytes()[: 64 * 1024] == model
    assert nv.read(1, 0, 64 * 1024) == model


def test_bad_arguments(nv: Journal) -> None:
    def err(fn, *a, **kw) -> JournalError:  # type: ignore[no-untyped-def]
        with pytest.raises(JournalError) as e:
            fn(*a, **kw)
        return e.value

    assert err(nv.write, 1, 100, bytes(512)).errno == errno.EINVAL
    assert err(nv.write, 1, 0, bytes(500)).errno == errno.EINVAL
    assert err(nv.write, 1, 0, b"").errno == errno.EINVAL
    e = err(nv.write, 1, VOL - 512, bytes(1024))
    assert e.errno == errno.EINVAL and "within the volume" in str(e)
    assert err(nv.write, 1, 0, bytes(Journal.MAX_IO + 512)).errno == errno.EINVAL
    # larger than this 4 MiB journal can ever hold
    assert err(nv.write, 1, 0, bytes(Journal.MAX_IO)).errno == errno.EINVAL
    assert err(nv.read, 1, 0, 100).errno == errno.EINVAL
    assert err(nv.read, 1, VOL, 512).errno == errno.EINVAL
    e = err(nv.write, 3, 0, bytes(512))
    assert e.errno == errno.ENXIO and "volume 3 not attached" in str(e)
    assert err(nv.read, 3, 0, 512).errno == errno.ENXIO
    assert err(nv.marker, 0, b"x").errno == errno.EINVAL
    assert err(nv.marker, 1, bytes(Journal.MAX_PAYLOAD + 1)).errno == errno.EINVAL
    assert err(nv.marker_done, 12345).errno == errno.EINVAL
    assert err(nv.attach, 1, "/nonexistent/x", VOL).errno == errno.ENOENT
    assert err(nv.attach, 0, "/dev/null", VOL).errno == errno.EINVAL
    assert err(nv.start).errno == errno.EBUSY
    # nothing of that reached the journal
    assert nv.stats().appends == 0


def test_unstarted_and_closed_journal(jpath: Path, vol1: Path) -> None:
    j = Journal.open(str(jpath))
    j.attach(1, str(vol1), VOL)
    with pytest.raises(JournalError) as e:
        j.write(1, 0, bytes(512))
    assert e.value.errno == errno.EAGAIN
    assert j.read(1, 0, 512) == bytes(512)  # reads work before start
    j.close()
    j.close()  # idempotent
    with pytest.raises(JournalError) as e:
        j.write(1, 0, bytes(512))
    assert e.value.errno == errno.ESHUTDOWN
    assert j.stats().generation == 1  # last stats survive close


@pytest.mark.parametrize("size", [0, 1, 100, 3584])
def test_marker_payload_round_trip(nv: Journal, size: int) -> None:
    payload = os.urandom(size)
    seq = nv.marker(7 + size, payload)
    m = nv.next_marker(5)
    assert m is not None
    assert (m.id, m.seq, m.payload) == (7 + size, seq, payload)
    assert nv.next_marker(0.1) == m  # the same until done
    nv.marker_done(m.id)
    assert nv.next_marker(0.05) is None


def test_stats_lag_while_controller_holds_a_marker(nv: Journal) -> None:
    nv.write(1, 0, pattern(1, 4096))
    hold_marker(nv, 5)
    st0 = nv.stats()
    assert st0.markers_pending == 1 and st0.marker_waiting == 1
    assert st0.checkpoint_seq == st0.flushed_seq == st0.head_seq - 1  # at the marker
    for i in range(50):
        nv.write(1, i * 4096, pattern(100 + i, 4096))
    st1 = nv.stats()
    assert st1.lag_records == 50 and st1.lag_bytes == 50 * 4096
    assert st1.used > st0.used and 0 < st1.fill < 1
    assert st1.flushed_seq == st0.flushed_seq and st1.durable_seq == st1.head_seq
    assert st1.commits >= 1 and st1.appends == 51
    time.sleep(0.2)
    assert nv.stats().lag_records == 50  # the flusher really waits
    nv.marker_done(5)
    nv.sync()
    st2 = nv.stats()
    assert st2.lag_records == 0 and st2.markers_pending == 0 and st2.marker_waiting == 0
    assert st2.flushed_seq == st2.head_seq and st2.dm_writes < 50  # coalesced


def test_ram_mode_fua_and_sync_reach_the_dm_file(vol1: Path) -> None:
    with Journal.open(mode="ram", ram_size=4 * MiB) as j:
        j.attach(1, str(vol1), VOL)
        j.start()
        assert j.stats().mode_name == "ram" and j.stats().direct_io == 0
        for i in range(20):
            data = pattern(i, 256 * 1024)
            j.write(1, 0, data, fua=True)
            with open(vol1, "rb") as f:
                assert f.read(256 * 1024) == data
        big = pattern(77, 1 * MiB)
        j.write(1, 2 * MiB, big)
        j.sync()
        with open(vol1, "rb") as f:
            f.seek(2 * MiB)
            assert f.read(MiB) == big
        # FUA must also wait for a marker in between to be passed
        j.marker(1, b"")
        done = threading.Event()

        def fua() -> None:
            j.write(1, 0, pattern(500, 4096), fua=True)
            done.set()

        t = threading.Thread(target=fua)
        t.start()
        m = j.next_marker(5)
        assert m is not None
        time.sleep(0.1)
        assert not done.is_set()
        j.marker_done(m.id)
        t.join(5)
        assert done.is_set()


def test_journal_full_writers_wait_then_time_out_then_continue(tmp_path: Path, vol1: Path) -> None:
    jp = tmp_path / "small"
    Journal.format(str(jp), 8192 + 256 * 1024)  # 256 KiB ring
    j = Journal.open(str(jp))
    j.attach(1, str(vol1), VOL)
    j.start()
    model = bytearray(VOL)
    hold_marker(j)
    n = 0
    t0 = time.monotonic()
    with pytest.raises(JournalError) as e:
        while True:
            data = pattern(n, 4096)
            j.write(1, n * 4096, data, timeout=0.3)
            model[n * 4096 : (n + 1) * 4096] = data
            n += 1
    assert e.value.errno == errno.ETIMEDOUT and "journal full" in str(e.value)
    assert time.monotonic() - t0 >= 0.3
    assert 50 < n < 64  # 256 KiB ring of 4.5 KiB records
    st = j.stats()
    assert st.full_waits >= 1 and st.fill > 0.9
    # blocked writers continue once the controller releases the marker
    results: list[int] = []

    def writer(k: int) -> None:
        data = pattern(1000 + k, 4096)
        results.append(j.write(1, (200 + k) * 4096, data, timeout=20))
        model[(200 + k) * 4096 : (201 + k) * 4096] = data

    ts = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    time.sleep(0.3)
    assert not results
    j.marker_done(99)
    for t in ts:
        t.join(20)
    assert len(results) == 4
    j.sync()
    assert vol1.read_bytes() == model
    j.close()


@pytest.mark.parametrize("mode", ["nv", "ram"])
def test_ring_wraps_many_times(tmp_path: Path, vol1: Path, mode: str) -> None:
    rnd = random.Random(7)
    area = 2 * MiB
    model = bytearray(area)
    if mode == "nv":
        jp = tmp_path / "wrap"
        Journal.format(str(jp), 8192 + 300 * 1024)
        j = Journal.open(str(jp))
    else:
        j = Journal.open(mode="ram", ram_size=300 * 1024)
    j.attach(1, str(vol1), VOL)
    j.start()
    total = 0
    tag = 1
    with Controller(j, {1: vol1}) as ctl:
        while total < 24 * MiB:  # > 80 laps of the ring
            ln = rnd.choice([512, 4096, 8192, 32768, 65536, 3 * 512])
            off = rnd.randrange(0, (area - ln) // 512) * 512
            data = pattern(tag, ln)
            j.write(1, off, data)
            model[off : off + ln] = data
            total += ln
            tag += 1
            if tag % 97 == 0:
                j.marker(tag, b"m")
            if tag % 50 == 0:
                off = rnd.randrange(0, area // 512 - 16) * 512
                assert j.read(1, off, 8192) == model[off : off + 8192]
        j.sync()
    assert ctl.order  # markers went through
    st = j.stats()
    assert st.head_seq > 2 * (24 * MiB) // (st.capacity + 1)
    assert j.read(1, 0, area) == model
    assert vol1.read_bytes()[:area] == model
    j.close()
    if mode == "nv":
        with Journal.open(str(tmp_path / "wrap")) as j2:
            assert j2.stats().recovered_records == 0  # drained at close


def test_forget_and_detach(tmp_path: Path, nv: Journal, vol1: Path) -> None:
    vol2 = make_volume(tmp_path / "vol2", VOL)
    nv.attach(2, str(vol2), VOL)
    hold_marker(nv)
    nv.write(2, 0, pattern(1, 8192))
    nv.write(1, 0, pattern(2, 4096))
    assert nv.pending_volumes() == {1, 2}
    with pytest.raises(JournalError) as e:
        nv.detach(2, timeout=0.2)
    assert e.value.errno == errno.ETIMEDOUT
    nv.write(2, 8192, pattern(3, 512))  # still attached after the failed detach
    nv.forget(2)
    assert nv.pending_volumes() == {1}
    assert nv.read(2, 0, 512) == bytes(512)  # forgotten records left the overlay
    nv.detach(2, timeout=1)  # nothing unflushed any more
    with pytest.raises(JournalError) as e:
        nv.write(2, 0, bytes(512))
    assert e.value.errno == errno.ENXIO
    nv.marker_done(99)
    nv.sync()
    assert vol2.read_bytes() == bytes(VOL)  # the flusher skipped them
    assert vol1.read_bytes()[:4096] == pattern(2, 4096)
    # a volume can be re-attached under the same id; new writes do flush
    nv.attach(2, str(vol2), VOL)
    nv.write(2, 0, pattern(4, 512))
    nv.detach(2)
    assert vol2.read_bytes()[:512] == pattern(4, 512)


def test_recovery_replays_writes_and_markers_into_late_attached_volume(
    jpath: Path, vol1: Path
) -> None:
    j = Journal.open(str(jpath))
    j.attach(1, str(vol1), VOL)
    j.start()
    hold_marker(j, 1)
    j.write(1, 0, pattern(1, 4096))
    j.marker(2, b"second")
    j.write(1, 4096, pattern(2, 4096))
    j.close(drain=False)  # like a crash: records stay in the journal
    assert vol1.read_bytes()[:8192] == bytes(8192)

    j = Journal.open(str(jpath))
    st = j.stats()
    assert st.generation == 2 and st.recovered_records == 4
    assert j.pending_volumes() == {1}
    j.start()
    m = j.next_marker(2)  # recovered markers come again, in order
    assert m is not None and (m.id, m.payload) == (1, b"hold")
    j.marker_done(1)
    time.sleep(0.2)
    assert j.stats().waiting_volume == 1  # the volume is not attached yet
    j.attach(1, str(vol1), VOL)
    m = j.next_marker(5)
    assert m is not None and (m.id, m.payload) == (2, b"second")
    assert vol1.read_bytes()[:4096] == pattern(1, 4096)  # before the marker: on dm
    assert vol1.read_bytes()[4096:8192] == bytes(4096)
    j.marker_done(2)
    j.sync()
    assert vol1.read_bytes()[:8192] == pattern(1, 4096) + pattern(2, 4096)
    assert j.stats().waiting_volume == 0
    j.close()


def test_dm_write_error_is_reported_retried_and_forgettable(tmp_path: Path) -> None:
    jp = tmp_path / "j"
    Journal.format(str(jp), 2 * MiB)
    with Journal.open(str(jp)) as j:
        j.attach(5, "/dev/full", VOL)  # every write: ENOSPC
        j.start()
        data = pattern(9, 4096)
        j.write(5, 0, data)  # writers do not wait for the flusher
        deadline = time.monotonic() + 5
        while j.stats().flush_error == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        st = j.stats()
        assert st.flush_error == -errno.ENOSPC and st.flush_error_volume == 5
        j.write(5, 4096, data)
        assert j.read(5, 0, 4096) == data  # served from the journal
        assert j.stats().unflushed_records == 2
        j.forget(5)
        j.detach(5, timeout=2)
        j.sync(timeout=5)


def test_close_with_drain_puts_everything_on_dm(jpath: Path, vol1: Path) -> None:
    j = Journal.open(str(jpath))
    j.attach(1, str(vol1), VOL)
    j.start()
    for i in range(100):
        j.write(1, i * 4096, pattern(i, 4096))
    j.close(drain=True)
    assert vol1.read_bytes()[: 100 * 4096] == b"".join(pattern(i, 4096) for i in range(100))
    with Journal.open(str(jpath)) as j2:
        assert j2.stats().recovered_records == 0


def test_close_drain_times_out_while_a_marker_is_held(jpath: Path, vol1: Path) -> None:
    j = Journal.open(str(jpath))
    j.attach(1, str(vol1), VOL)
    j.start()
    hold_marker(j)
    j.write(1, 0, pattern(1, 512))
    with pytest.raises(JournalError) as e:
        j.close(drain=True, timeout=0.3)
    assert e.value.errno == errno.ETIMEDOUT and "records stay" in str(e.value)
    with Journal.open(str(jpath)) as j2:
        assert j2.stats().recovered_records == 2  # marker + write, for the next open
        j2.close(drain=False)


def test_blocked_calls_release_the_gil(tmp_path: Path, vol1: Path) -> None:
    """Two Python threads blocked in jr_write at once: both wait out their
    timeouts together, so the C call does not hold the GIL."""
    jp = tmp_path / "small"
    Journal.format(str(jp), 8192 + 128 * 1024)
    with Journal.open(str(jp)) as j:
        j.attach(1, str(vol1), VOL)
        j.start()
        hold_marker(j)
        with pytest.raises(JournalError):
            for i in range(1000):
                j.write(1, i * 4096, bytes(4096), timeout=0.05)
        errs: list[int] = []

        def blocked() -> None:
            try:
                j.write(1, 0, bytes(4096), timeout=1.0)
            except JournalError as e:
                errs.append(e.errno)

        ticks = 0
        t0 = time.monotonic()
        ts = [threading.Thread(target=blocked) for _ in range(2)]
        for t in ts:
            t.start()
        while any(t.is_alive() for t in ts):
            ticks += 1  # this thread runs Python meanwhile
            time.sleep(0.01)
        elapsed = time.monotonic() - t0
        assert errs == [errno.ETIMEDOUT] * 2
        assert elapsed < 1.8, f"calls serialised: {elapsed:.2f} s"
        assert ticks > 20
        j.marker_done(99)
        j.close(drain=False)


def test_concurrency_smoke_group_commit(tmp_path: Path) -> None:
    """8 threads x 2000 4 KiB writes on an NV file journal: group commit
    batches them (commits << appends) and every write lands."""
    vol = make_volume(tmp_path / "v", 64 * MiB)
    jp = tmp_path / "j"
    Journal.format(str(jp), 32 * MiB)
    threads, per = 8, 2000
    with Journal.open(str(jp)) as j:
        j.attach(1, str(vol), 64 * MiB)
        j.start()

        def worker(t: int) -> None:
            for i in range(per):
                j.write(1, (t * per + i) * 4096, pattern(t * per + i, 4096))

        t0 = time.monotonic()
        ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        elapsed = time.monotonic() - t0
        st = j.stats()
        j.sync()
        assert st.appends == threads * per
        ratio = st.appends / st.commits
        print(
            f"\n{threads * per} x 4 KiB in {elapsed:.2f} s: "
            f"{threads * per * 4096 / elapsed / 1e6:.1f} MB/s, "
            f"{st.appends} appends / {st.commits} commits = {ratio:.1f}, "
            f"{st.dm_writes} dm writes, direct_io={st.direct_io}"
        )
        assert ratio > 2, "group commit does not batch"
        for k in random.Random(3).sample(range(threads * per), 200):
            assert j.read(1, k * 4096, 4096) == pattern(k, 4096)
    data = vol.read_bytes()
    for k in random.Random(4).sample(range(threads * per), 500):
        assert data[k * 4096 : (k + 1) * 4096] == pattern(k, 4096)


def test_writev_gathers_like_one_write(jpath: Path, vol1: Path) -> None:
    """jr_writev (the ring handler's path: data straight from the ring's
    buffers) journals the concatenation, with a checksum recovery accepts."""
    parts = [pattern(7, 512), pattern(8, 4096), pattern(9, 1536)]
    whole = b"".join(parts)
    j = Journal.open(str(jpath))
    j.attach(1, str(vol1), VOL)
    j.start()
    keep = [ffi.from_buffer(p) for p in parts]
    iov = ffi.new("struct iovec[]", len(parts))
    for i, b in enumerate(keep):
        iov[i].iov_base = b
        iov[i].iov_len = len(parts[i])
    assert lib.jr_writev(j.c_handle, 1, 8192, iov, len(parts), 0, 5000) >= 1
    assert j.read(1, 8192, len(whole)) == whole
    # bad shapes change nothing: a total that is not whole sectors, no buffers
    iov[2].iov_len = 1000
    assert lib.jr_writev(j.c_handle, 1, 0, iov, len(parts), 0, 5000) == -errno.EINVAL
    assert lib.jr_writev(j.c_handle, 1, 0, iov, 0, 0, 5000) == -errno.EINVAL
    assert j.stats().appends == 1
    j.close(drain=False)  # the record stays in the journal, unflushed or not
    with Journal.open(str(jpath)) as j2:
        j2.attach(1, str(vol1), VOL)
        j2.start()
        assert j2.read(1, 8192, len(whole)) == whole
