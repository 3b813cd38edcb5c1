"""A failed fdatasync under the flusher (issue 17, item 4), on the host.

The C journal is compiled with a stand-in for fdatasync(2) that fails on
request the way Linux does after a writeback error: the data written since
the volume's last good sync is not on the device (the stand-in puts the
file back as it was then) and only that one call reports it; the next one
succeeds. The journal must write those records again from the ring before
its checkpoint passes them, serve them to readers meanwhile, and report
the error. Before the fix the retried fdatasync succeeded, the checkpoint
moved on and the volume kept the old data."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

DRIVER = r"""
#define _GNU_SOURCE
#include "journal.h"
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define VOLSZ (1u << 20)
#define CHECK(c) do { if (!(c)) { fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, #c); \
    exit(1); } } while (0)

static char vpath[512], jpath[512];
static ino_t vino;
static pthread_mutex_t fmu = PTHREAD_MUTEX_INITIALIZER;
static int fail_left;
static unsigned char shadow[VOLSZ], model[VOLSZ], buf[VOLSZ];

/* fdatasync(2) as the journal sees it (-Dfdatasync=jr_test_fdatasync) */
int jr_test_fdatasync(int fd)
{
    struct stat st;
    CHECK(fstat(fd, &st) == 0);
    if (st.st_ino != vino)
        return (int)syscall(SYS_fdatasync, fd);
    pthread_mutex_lock(&fmu);
    int fail = fail_left > 0;
    if (fail) {
        fail_left--;
        /* writeback failed: the device has what it had at the last good sync */
        CHECK(pwrite(fd, shadow, VOLSZ, 0) == VOLSZ);
    } else {
        CHECK(syscall(SYS_fdatasync, fd) == 0);
        CHECK(pread(fd, shadow, VOLSZ, 0) == VOLSZ);
    }
    pthread_mutex_unlock(&fmu);
    if (fail) {
        errno = EIO;
        return -1;
    }
    return 0;
}

static void fill(unsigned char *p, uint32_t len, uint32_t tag)
{
    for (uint32_t i = 0; i < len; i += 4)
        memcpy(p + i, &tag, 4), tag = tag * 1103515245u + 12345u;
}

static void put(jr_t *j, uint64_t off, uint32_t len, uint32_t tag)
{
    unsigned char *b = malloc(len);
    fill(b, len, tag);
    CHECK(jr_write(j, 1, off, b, len, 0, 10000) > 0);
    memcpy(model + off, b, len);
    free(b);
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void run(int mode)
{
    jr_t *j;
    struct jr_stats st;
    if (mode == JR_NV) {
        CHECK(jr_format(jpath, 8192 + (4u << 20), 0, 0) == 0);
        CHECK(jr_open(jpath, JR_NV, 0, &j) == 0);
    } else {
        CHECK(jr_open(NULL, JR_RAM, 4u << 20, &j) == 0);
    }
    CHECK(jr_attach(j, 1, vpath, VOLSZ) == 0);
    CHECK(jr_start(j) == 0);
    put(j, 0, 8192, 1);
    put(j, 65536, 8192, 2);
    CHECK(jr_sync(j, 10000) == 0);

    pthread_mutex_lock(&fmu);
    fail_left = 3;
    pthread_mutex_unlock(&fmu);
    put(j, 4096, 4096, 3);                          /* over the second half of tag 1 */
    CHECK(jr_discard(j, 1, 65536, 16384, 0, 10000) > 0); /* tag 2 and beyond */
    memset(model + 65536, 0, 16384);
    put(j, 69632, 512, 4);                          /* newer than the discard */
    put(j, 200704, 12288, 5);
    /* the flusher writes them and its fdatasync fails */
    for (int i = 0; i < 500; i++) {
        jr_get_stats(j, &st);
        if (st.flush_errors >= 2)
            break;
        sleep_ms(10);
    }
    jr_get_stats(j, &st);
    CHECK(st.flush_errors >= 2 && st.flush_error == -EIO && st.flush_error_volume == 1);
    CHECK(st.checkpoint_seq < st.head_seq); /* never past the failed sync */
    CHECK(jr_read(j, 1, 0, buf, VOLSZ) == 0);
    CHECK(memcmp(buf, model, VOLSZ) == 0); /* readers see every acknowledged write */

    CHECK(jr_sync(j, 20000) == 0); /* the device works again */
    jr_get_stats(j, &st);
    CHECK(st.sync_rewinds >= 1 && st.flush_error == 0 && st.unflushed_records == 0);
    for (int i = 0; i < 200 && st.checkpoint_seq != st.head_seq; i++) {
        sleep_ms(10); /* the superblock is written just after the sync */
        jr_get_stats(j, &st);
    }
    CHECK(st.checkpoint_seq == st.head_seq);
    int fd = open(vpath, O_RDONLY);
    CHECK(fd >= 0 && pread(fd, buf, VOLSZ, 0) == VOLSZ);
    close(fd);
    CHECK(memcmp(buf, model, VOLSZ) == 0); /* on the device, as acknowledged */
    CHECK(jr_close(j, 1, 10000) == 0);
}

int main(int argc, char **argv)
{
    CHECK(argc == 2);
    snprintf(jpath, sizeof jpath, "%s/journal", argv[1]);
    snprintf(vpath, sizeof vpath, "%s/vol1", argv[1]);
    for (int mode = JR_NV; mode <= JR_RAM; mode++) {
        int fd = open(vpath, O_RDWR | O_CREAT | O_TRUNC, 0600);
        CHECK(fd >= 0 && ftruncate(fd, VOLSZ) == 0);
        struct stat st;
        CHECK(fstat(fd, &st) == 0);
        vino = st.st_ino;
        close(fd);
        memset(model, 0, sizeof model);
        memset(shadow, 0, sizeof shadow);
        run(mode);
    }
    puts("OK");
    return 0;
}
"""


def test_failed_fdatasync_is_rewritten_from_the_journal(tmp_path: Path) -> None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        pytest.skip("no C compiler")
    src = tmp_path / "driver.c"
    src.write_text(DRIVER)
    exe = tmp_path / "driver"
    cmd = [
        cc, "-std=c11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-pthread",
        "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
        "-Dfdatasync=jr_test_fdatasync", f"-I{ROOT / 'csrc'}",
        str(ROOT / "csrc" / "journal.c"), str(ROOT / "csrc" / "crc32c.c"), str(src), "-o", str(exe),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode and "sanitize" in res.stderr and "cannot find" in res.stderr:
        pytest.skip(f"sanitizer runtime not installed: {res.stderr[-300:]}")
    assert res.returncode == 0, res.stderr
    data = tmp_path / "data"
    data.mkdir()
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1", UBSAN_OPTIONS="halt_on_error=1")
    run = subprocess.run(
        [str(exe), str(data)], capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.strip() == "OK"
