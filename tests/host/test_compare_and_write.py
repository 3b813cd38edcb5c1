"""COMPARE AND WRITE (SBC-3) on the host: the journal's atomic primitive
(jr_compare_and_write) and the emulator's command (CDB fields, MISCOMPARE
sense with the offset, VPD B0, REPORT SUPPORTED OPERATION CODES)."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from test_journal_support import hold_marker, pattern
from test_scsi_support import BS, FakeLun, emulator, inquiry, rsoc, sense_of

from dmsnap.journal import Journal
from dmsnap.journal.journal import Miscompare
from dmsnap.scsi.emulation import Limits
from dmsnap.scsi.sense import Key

KiB = 1024
MISCOMPARE = (Key.MISCOMPARE, 0x1D, 0x00)


# -- the journal -----------------------------------------------------------------------


def test_match_writes_an_ordinary_record(nv: Journal, vol1: Path) -> None:
    nv.write(1, 8 * KiB, pattern(1, 4 * KiB))
    before = nv.stats().appends
    seq = nv.compare_and_write(1, 8 * KiB, pattern(1, 4 * KiB), pattern(2, 4 * KiB))
    assert seq >= 0
    assert nv.read(1, 8 * KiB, 4 * KiB) == pattern(2, 4 * KiB)
    assert nv.stats().appends == before + 1  # one write record, in its place in the order
    nv.sync()
    assert vol1.read_bytes()[8 * KiB : 12 * KiB] == pattern(2, 4 * KiB)


def test_ordered_with_snapshot_markers(nv: Journal, vol1: Path) -> None:
    """A snapshot marker after a compare-and-write contains it; one before
    it does not (the flusher stands at the marker with every earlier record,
    and only those, on the dm device)."""
    a, b, c = pattern(1, 4 * KiB), pattern(2, 4 * KiB), pattern(3, 4 * KiB)
    nv.write(1, 0, a)
    nv.compare_and_write(1, 0, a, c)
    nv.marker(7, b"snap")
    m = nv.next_marker(5)
    assert m is not None and m.id == 7
    nv.compare_and_write(1, 0, c, b)  # after the marker
    assert vol1.read_bytes()[: 4 * KiB] == c  # what the snapshot gets
    assert nv.read(1, 0, 4 * KiB) == b
    nv.marker_done(7)
    nv.sync()
    assert vol1.read_bytes()[: 4 * KiB] == b


def test_mismatch_writes_nothing_and_says_where(nv: Journal) -> None:
    hold_marker(nv)  # the data stays in the overlay: compared from there
    nv.write(1, 0, pattern(1, 2 * KiB))
    stale = bytearray(pattern(1, 2 * KiB))
    stale[1500] ^= 0xFF
    stale[1900] ^= 0xFF
    before = nv.stats().appends
    with pytest.raises(Miscompare) as e:
        nv.compare_and_write(1, 0, bytes(stale), pattern(3, 2 * KiB))
    assert e.value.offset == 1500
    assert nv.read(1, 0, 2 * KiB) == pattern(1, 2 * KiB)
    assert nv.stats().appends == before


def test_compares_against_the_device_and_discards(nv: Journal) -> None:
    nv.write(1, 0, pattern(4, 4 * KiB))
    nv.sync()  # on the "dm device" now, not in the overlay
    nv.compare_and_write(1, 0, pattern(4, 4 * KiB), pattern(5, 4 * KiB))
    nv.discard(1, 64 * KiB, 64 * KiB)
    nv.compare_and_write(1, 64 * KiB, bytes(512), pattern(6, 512))
    assert nv.read(1, 0, 4 * KiB) == pattern(5, 4 * KiB)
    assert nv.read(1, 64 * KiB, 512) == pattern(6, 512)


@pytest.mark.parametrize("bad", [(1, 100, 512), (1, 0, 0), (1, 0, 700), (9, 0, 512)])
def test_refused_arguments_change_nothing(nv: Journal, bad: tuple[int, int, int]) -> None:
    vol, off, n = bad
    with pytest.raises(OSError) as e:
        nv.compare_and_write(vol, off, bytes(n), bytes(n))
    assert not isinstance(e.value, Miscompare)
    assert nv.stats().appends == 0


def test_counter_from_many_threads_loses_no_increment(nv: Journal) -> None:
    """The ATS pattern: threads read a counter and compare-and-write it + 1,
    retrying on a miscompare, while other threads write the blocks around
    it: every increment is there at the end (a write between another's
    compare and its write would lose one)."""
    nv.write(1, 4096, bytes(512))
    threads, rounds = 6, 150
    stop = threading.Event()

    def bump() -> None:
        done = 0
        while done < rounds:
            cur = nv.read(1, 4096, 512)
            n = int.from_bytes(cur[:8], "big")
            try:
                nv.compare_and_write(1, 4096, cur, (n + 1).to_bytes(8, "big") + bytes(504))
                done += 1
            except Miscompare:
                pass

    def around() -> None:  # the sectors before and after it: no wait, no harm
        i = 0
        while not stop.is_set():
            nv.write(1, 4096 + 512 * (1 + i % 3), pattern(i, 512))
            nv.write(1, 0, pattern(i, 4096))
            i += 1

    ws = [threading.Thread(target=around) for _ in range(2)]
    ts = [threading.Thread(target=bump) for _ in range(threads)]
    for t in ws + ts:
        t.start()
    for t in ts:
        t.join()
    stop.set()
    for t in ws:
        t.join()
    assert int.from_bytes(nv.read(1, 4096, 512)[:8], "big") == threads * rounds


def test_an_overlapping_write_lands_before_or_after_never_between(nv: Journal) -> None:
    """Writes of a whole 4 KiB range A or B race compare-and-writes that
    swap A for C: a compare-and-write either matched (the range was A, is
    now C) or reports a miscompare, and the range is always one of A, B, C,
    never a mix; neither side starves the other."""
    a, b, c = pattern(1, 4096), pattern(2, 4096), pattern(3, 4096)
    nv.write(1, 0, a)
    stop = threading.Event()
    writes = [0]
    bad: list[bytes] = []

    def writer() -> None:
        while not stop.is_set():
            nv.write(1, 0, a if writes[0] % 2 else b)
            writes[0] += 1

    w = threading.Thread(target=writer)
    w.start()
    matched = missed = 0
    deadline = time.monotonic() + 20
    try:
        while (writes[0] < 200 or matched < 20) and time.monotonic() < deadline:
            try:
                nv.compare_and_write(1, 0, a, c)
                matched += 1
            except Miscompare as e:
                assert 0 <= e.offset < 4096
                missed += 1
            got = nv.read(1, 0, 4096)
            if got not in (a, b, c):
                bad.append(got)
    finally:
        stop.set()
        w.join()
    assert not bad
    assert writes[0] >= 200 and matched >= 20, (writes, matched, missed)


# -- the emulator ----------------------------------------------------------------------


def caw(lba: int, n: int, flags: int = 0) -> bytes:
    return bytes((0x89, flags)) + lba.to_bytes(8, "big") + bytes(3) + bytes((n, 0, 0))


def test_emulator_match_writes_mismatch_reports_offset() -> None:
    lun = FakeLun()
    emu = emulator(lun)
    old, new = pattern(1, 2 * BS), pattern(2, 2 * BS)
    lun.buf[10 * BS : 12 * BS] = old
    r = emu.execute(caw(10, 2), old + new)
    assert r.ok, r
    assert bytes(lun.buf[10 * BS : 12 * BS]) == new
    r = emu.execute(caw(10, 2), old + pattern(3, 2 * BS))
    assert sense_of(r) == MISCOMPARE
    s = r.decoded_sense()
    assert s is not None and s.information == _first_diff(new, old)
    assert bytes(lun.buf[10 * BS : 12 * BS]) == new


def _first_diff(x: bytes, y: bytes) -> int:
    return next(i for i in range(len(x)) if x[i] != y[i])


def test_emulator_fields() -> None:
    lun = FakeLun()
    emu = emulator(lun)
    blocks = lun.size // BS
    assert emu.execute(caw(0, 0), b"").ok  # no blocks: nothing, GOOD
    assert not lun.calls
    assert sense_of(emu.execute(caw(blocks - 1, 2), bytes(4 * BS)))[1:] == (0x21, 0x00)
    assert sense_of(emu.execute(caw(0, 1, flags=0x20), bytes(2 * BS)))[1:] == (0x24, 0x00)
    assert sense_of(emu.execute(caw(0, 1), bytes(3 * BS)))[1:] == (0x0E, 0x03)
    too_many = Limits().max_compare_and_write // BS + 1
    if too_many <= 255:
        r = emu.execute(caw(0, too_many), bytes(2 * too_many * BS))
        assert sense_of(r)[1:] == (0x24, 0x00)
    assert emu.execute(caw(0, 1, flags=0x08), bytes(2 * BS)).ok  # FUA
    assert lun.calls[-1][-1] is True


def test_emulator_read_only_lun_is_data_protect() -> None:
    lun = FakeLun(read_only=True)
    r = emulator(lun).execute(caw(0, 1), bytes(2 * BS))
    assert sense_of(r) == (Key.DATA_PROTECT, 0x27, 0x00)


def test_vpd_b0_and_rsoc_advertise_it() -> None:
    emu = emulator()
    d = emu.execute(inquiry(0xB0)).data
    assert d[5] == min(255, Limits().max_compare_and_write // BS) > 0
    r = emu.execute(rsoc(opts=1, op=0x89))
    assert r.ok and r.data[1] & 0x07 == 0x03, r  # supported, as the standard says


# -- the C primitive without the GIL ---------------------------------------------------

CAW_DRIVER = r"""
#define _GNU_SOURCE
#include "journal.h"
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, #c); \
    exit(1); } } while (0)
#define ROUNDS 3000
#define BUMPERS 3

static jr_t *J;
static _Atomic int stop;
static _Atomic long regressions;

static uint64_t get(uint64_t off) {
    unsigned char b[512];
    CHECK(jr_read(J, 1, off, b, 512) == 0);
    uint64_t v;
    memcpy(&v, b, 8);
    return v;
}

/* compare-and-write increments of the counter at 0 */
static void *bump(void *arg) {
    (void)arg;
    for (int done = 0; done < ROUNDS;) {
        unsigned char cur[512], next[512];
        CHECK(jr_read(J, 1, 0, cur, 512) == 0);
        memcpy(next, cur, 512);
        uint64_t v;
        memcpy(&v, cur, 8);
        v++;
        memcpy(next, &v, 8);
        uint32_t at = 0;
        int64_t r = jr_compare_and_write(J, 1, 0, cur, next, 512, 0, 10000, &at);
        CHECK(r >= 0 || r == -EILSEQ);
        done += r >= 0;
    }
    return NULL;
}

/* plain writes of 1, 2, 3... at 4096; compare-and-writes that mark the value
 * they read (same value, a flag byte) must never bring back an older one */
static void *writer(void *arg) {
    (void)arg;
    unsigned char b[512] = {0};
    for (uint64_t v = 1; !stop; v++) {
        memcpy(b, &v, 8);
        CHECK(jr_write(J, 1, 4096, b, 512, 0, 10000) >= 0);
        if (get(4096) < v)
            regressions++;
    }
    return NULL;
}

static void *marker(void *arg) {
    (void)arg;
    while (!stop) {
        unsigned char cur[512], next[512];
        CHECK(jr_read(J, 1, 4096, cur, 512) == 0);
        memcpy(next, cur, 512);
        next[100]++;
        uint32_t at = 0;
        int64_t r = jr_compare_and_write(J, 1, 4096, cur, next, 512, 0, 10000, &at);
        CHECK(r >= 0 || r == -EILSEQ);
    }
    return NULL;
}

int main(int argc, char **argv) {
    CHECK(argc == 2);
    int fd = open(argv[1], O_RDWR | O_CREAT | O_TRUNC, 0600);
    CHECK(fd >= 0 && ftruncate(fd, 1 << 20) == 0);
    close(fd);
    CHECK(jr_open(NULL, JR_RAM, 16 << 20, &J) == 0);
    CHECK(jr_attach(J, 1, argv[1], 1 << 20) == 0);
    CHECK(jr_start(J) == 0);
    pthread_t b[BUMPERS], w, m[2];
    pthread_create(&w, NULL, writer, NULL);
    for (int i = 0; i < 2; i++)
        pthread_create(&m[i], NULL, marker, NULL);
    for (int i = 0; i < BUMPERS; i++)
        pthread_create(&b[i], NULL, bump, NULL);
    for (int i = 0; i < BUMPERS; i++)
        pthread_join(b[i], NULL);
    stop = 1;
    pthread_join(w, NULL);
    for (int i = 0; i < 2; i++)
        pthread_join(m[i], NULL);
    printf("%llu %ld\n", (unsigned long long)get(0), (long)regressions);
    CHECK(jr_close(J, 1, 10000) == 0);
    return 0;
}
"""


def test_c_compare_and_write_is_atomic_under_threads(tmp_path: Path) -> None:
    """Threads in C (no GIL to serialise them): three add 1 to a counter by
    compare-and-write, 3000 times each, and none is lost; a thread writes
    1, 2, 3... to another block while two compare-and-write it with what
    they read (plus a flag): a value once written and read back is never
    replaced by an older one (a write between another's compare and write
    would be undone)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        pytest.skip("no C compiler")
    root = Path(__file__).resolve().parents[2]
    src, exe = tmp_path / "caw.c", tmp_path / "caw"
    src.write_text(CAW_DRIVER)
    cmd = [
        cc, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread",
        f"-I{root / 'csrc'}", str(root / "csrc" / "journal.c"), str(root / "csrc" / "crc32c.c"),
        str(src), "-o", str(exe),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    run = subprocess.run([str(exe), str(tmp_path / "vol")], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    counter, regressions = (int(x) for x in run.stdout.split())
    assert (counter, regressions) == (3 * 3000, 0)
