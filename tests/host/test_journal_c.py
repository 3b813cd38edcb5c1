"""The C journal under sanitizers: a stand-alone driver (no Python) compiled
with csrc/journal.c and -fsanitize=address,undefined (leaks included), and
with -fsanitize=thread, exercising writers, discards, overlay reads, markers, sync,
full-ring waits, forget/detach, close without drain + recovery, RAM mode, and
an NV journal whose memory limit is smaller than its ring (the driver lowers
JR_MEM_MIN), reopened with a still smaller one: the mirror gives pages back
behind the tail, and recovery replays the log in pieces (a held marker, a
forgotten volume and a discard in it); and confirmation (jr_set_confirm)
under a prober that confirms and now and then rewinds (no space)."""

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
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define VOLSZ (1u << 20)
#define NTHR 4
#define STRIPE (VOLSZ / NTHR)
#define CHECK(c) do { if (!(c)) { fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, #c); \
    exit(1); } } while (0)

static char vpath[2][512], jpath[512];
static jr_t *J;
static _Atomic int ctl_stop;
static unsigned char model[2][VOLSZ];

static void fill(unsigned char *p, uint32_t len, uint32_t tag)
{
    for (uint32_t i = 0; i < len; i += 4)
        memcpy(p + i, &tag, 4), tag = tag * 1103515245u + 12345u;
}

static void *controller(void *arg)
{
    (void)arg;
    unsigned char payload[JR_MAX_PAYLOAD];
    while (!ctl_stop) {
        uint64_t id, seq;
        uint32_t len;
        int rc = jr_next_marker(J, 20, &id, &seq, payload, &len);
        if (rc == -ETIMEDOUT)
            continue;
        if (rc == -ESHUTDOWN)
            break;
        CHECK(rc == 0);
        CHECK(len == 8 && memcmp(payload, &id, 8) == 0);
        CHECK(jr_marker_done(J, id) == 0);
    }
    return NULL;
}

static void *writer(void *arg)
{
    int t = (int)(intptr_t)arg;
    unsigned char *buf = malloc(65536), *rb = malloc(65536);
    unsigned seed = (unsigned)t * 7919u + 1;
    for (int i = 0; i < 400; i++) {
        int vol = 1 + (int)(rand_r(&seed) % 2);
        uint32_t len = (1 + rand_r(&seed) % 32) * 512;
        uint64_t off = t * STRIPE + (rand_r(&seed) % ((STRIPE - len) / 512)) * 512;
        if (i % 7 == 3) { /* a discard, up to 64 KiB: zeros in the model */
            len = (1 + rand_r(&seed) % 128) * 512;
            off = t * STRIPE + (rand_r(&seed) % ((STRIPE - len) / 512)) * 512;
            CHECK(jr_discard(J, (uint32_t)vol, off, len, (i % 5 == 0) ? JR_FUA : 0, 30000) > 0);
            memset(&model[vol - 1][off], 0, len);
        } else {
            fill(buf, len, rand_r(&seed));
            int64_t seq = jr_write(J, (uint32_t)vol, off, buf, len, (i % 50 == 0) ? JR_FUA : 0,
                                   30000);
            CHECK(seq > 0);
            memcpy(&model[vol - 1][off], buf, len);
        }
        if (i % 3 == 0) {
            uint64_t roff = t * STRIPE + (rand_r(&seed) % ((STRIPE - 65536) / 512)) * 512;
            CHECK(jr_read(J, (uint32_t)vol, roff, rb + (i % 2), 65536 - 512) == 0);
            CHECK(memcmp(rb + (i % 2), &model[vol - 1][roff], 65536 - 512) == 0);
        }
        if (t == 0 && i % 40 == 0) {
            uint64_t id = (uint64_t)i + 1000;
            CHECK(jr_marker(J, id, &id, 8, 30000) > 0);
        }
        if (t == 1 && i % 100 == 0)
            CHECK(jr_sync(J, 30000) == 0);
        if (i % 64 == 0) {
            struct jr_stats st;
            jr_get_stats(J, &st);
            CHECK(st.used <= st.mem_limit && st.mem_limit <= st.capacity);
            CHECK(st.journal_error == 0);
        }
    }
    free(buf);
    free(rb);
    return NULL;
}

static void attach_all(void)
{
    for (int v = 0; v < 2; v++)
        CHECK(jr_attach(J, (uint32_t)v + 1, vpath[v], VOLSZ) == 0);
}

static void verify(void)
{
    unsigned char *rb = malloc(VOLSZ);
    for (int v = 0; v < 2; v++) {
        CHECK(jr_read(J, (uint32_t)v + 1, 0, rb, VOLSZ) == 0);
        CHECK(memcmp(rb, model[v], VOLSZ) == 0);
    }
    free(rb);
}

/* mem: 0, or the NV memory limit (the reopen takes half of it) */
static void run(int mode, uint64_t mem)
{
    pthread_t ctl, w[NTHR];
    if (mode == JR_NV) {
        CHECK(jr_format(jpath, 8192 + 384 * 1024, 0, 0) == 0);
        CHECK(jr_open_ex(jpath, JR_NV, 0, mem, 0, NULL, &J) == 0);
    } else {
        CHECK(jr_open(NULL, JR_RAM, 384 * 1024, &J) == 0);
    }
    attach_all();
    CHECK(jr_start(J) == 0);
    ctl_stop = 0;
    pthread_create(&ctl, NULL, controller, NULL);
    for (int t = 0; t < NTHR; t++)
        pthread_create(&w[t], NULL, writer, (void *)(intptr_t)t);
    for (int t = 0; t < NTHR; t++)
        pthread_join(w[t], NULL);
    CHECK(jr_sync(J, 30000) == 0);
    verify();
    /* forget + detach of a volume with unflushed records behind a held marker */
    ctl_stop = 1;
    pthread_join(ctl, NULL);
    uint64_t hold = 77, id, seq;
    uint32_t len;
    unsigned char pl[JR_MAX_PAYLOAD], b[4096];
    CHECK(jr_marker(J, hold, &hold, 8, 30000) > 0);
    CHECK(jr_next_marker(J, 5000, &id, &seq, pl, &len) == 0 && id == hold);
    memset(b, 0xab, sizeof b);
    CHECK(jr_write(J, 2, 0, b, sizeof b, 0, 30000) > 0);
    CHECK(jr_detach(J, 2, 50) == -ETIMEDOUT);
    CHECK(jr_forget(J, 2, 5000) == 0);
    CHECK(jr_detach(J, 2, 1000) == 0);
    CHECK(jr_write(J, 2, 0, b, sizeof b, 0, 1000) == -ENXIO);
    CHECK(jr_discard(J, 2, 0, 512, 0, 1000) == -ENXIO);
    /* a discard behind the held marker: recovered (NV) or applied later (RAM) */
    CHECK(jr_discard(J, 1, 8192, 3 * 65536, 0, 30000) > 0);
    memset(&model[0][8192], 0, 3 * 65536);
    /* fill the ring: writers time out */
    int64_t r = 0;
    for (int i = 0; i < 200 && r >= 0; i++) {
        r = jr_write(J, 1, (uint64_t)i * 4096 % VOLSZ, b, sizeof b, 0, 100);
        if (r >= 0)
            memcpy(&model[0][(uint64_t)i * 4096 % VOLSZ], b, sizeof b);
    }
    if (mode == JR_NV) {
        /* crash-like close: records stay; reopen recovers them */
        CHECK(r == -ETIMEDOUT);
        CHECK(jr_close(J, 0, 0) == 0);
        CHECK(jr_open_ex(jpath, JR_NV, 0, mem / 2, 0, NULL, &J) == 0);
        struct jr_stats st;
        jr_get_stats(J, &st);
        CHECK(st.recovered_records > 0 && st.generation == 2);
        /* a log longer than the memory limit: the rest waits on disk */
        CHECK(!mem || (st.mem_limit == mem / 2 && st.backlog_bytes > 0));
        uint32_t pv[8];
        /* the forget is in the journal: volume 2's records stay dropped */
        CHECK(jr_pending_volumes(J, pv, 8) == 1 && pv[0] == 1);
        CHECK(jr_forget(J, 2, 5000) == 0); /* before jr_start: written at once */
        CHECK(jr_pending_volumes(J, pv, 8) == 1 && pv[0] == 1);
        attach_all();
        CHECK(jr_start(J) == 0);
        ctl_stop = 0;
        pthread_create(&ctl, NULL, controller, NULL);
        CHECK(jr_sync(J, 30000) == 0);
        verify();
        jr_get_stats(J, &st);
        CHECK(st.backlog_bytes == 0 && st.journal_error == 0);
        ctl_stop = 1;
        pthread_join(ctl, NULL);
        CHECK(jr_close(J, 1, 10000) == 0);
    } else {
        CHECK(r == -ETIMEDOUT);
        CHECK(jr_marker_done(J, hold) == 0);
        CHECK(jr_sync(J, 30000) == 0);
        CHECK(jr_attach(J, 2, vpath[1], VOLSZ) == 0);
        verify();
        CHECK(jr_close(J, 1, 10000) == 0);
    }
}

/* Confirmation (jr_set_confirm) under a prober that confirms, and now and
 * then says the pool has no space (a rewind to the confirmed position) while
 * the writers go on: reads through the overlay stay right, every record is
 * written again, counted once, and checkpointed once confirmed. */
static _Atomic int prb_stop;

static void *prober(void *arg)
{
    (void)arg;
    for (int i = 0; !prb_stop; i++) {
        uint64_t tok = jr_confirm_mark(J);
        usleep(2000);
        if (i % 25 == 24) {
            jr_set_no_space(J, -ENOSPC);
            usleep(5000);
            jr_set_no_space(J, 0);
        } else {
            int rc = jr_confirm(J, tok);
            CHECK(rc == 0 || rc == -ESTALE);
        }
    }
    return NULL;
}

static void run_confirm(void)
{
    pthread_t ctl, prb, w[NTHR];
    CHECK(jr_format(jpath, 8192 + 384 * 1024, 0, 0) == 0);
    CHECK(jr_open_ex(jpath, JR_NV, 0, 0, 0, NULL, &J) == 0);
    attach_all();
    jr_set_confirm(J, 1);
    CHECK(jr_start(J) == 0);
    ctl_stop = 0;
    prb_stop = 0;
    pthread_create(&ctl, NULL, controller, NULL);
    pthread_create(&prb, NULL, prober, NULL);
    for (int t = 0; t < NTHR; t++)
        pthread_create(&w[t], NULL, writer, (void *)(intptr_t)t);
    for (int t = 0; t < NTHR; t++)
        pthread_join(w[t], NULL);
    prb_stop = 1;
    pthread_join(prb, NULL);
    CHECK(jr_sync(J, 30000) == 0);
    struct jr_stats st;
    for (int i = 0; i < 500; i++) { /* the last looks confirm it all */
        int rc = jr_confirm(J, jr_confirm_mark(J));
        CHECK(rc == 0 || rc == -ESTALE);
        jr_get_stats(J, &st);
        if (st.checkpoint_seq >= st.head_seq)
            break;
        usleep(10000);
    }
    CHECK(st.checkpoint_seq >= st.head_seq && st.unflushed_records == 0);
    CHECK(st.confirm_rewinds > 0 && st.journal_error == 0);
    verify();
    ctl_stop = 1;
    pthread_join(ctl, NULL);
    CHECK(jr_close(J, 1, 10000) == 0);
}

int main(int argc, char **argv)
{
    CHECK(argc == 2);
    snprintf(jpath, sizeof jpath, "%s/journal", argv[1]);
    for (int v = 0; v < 2; v++) {
        snprintf(vpath[v], sizeof vpath[v], "%s/vol%d", argv[1], v + 1);
        int fd = open(vpath[v], O_RDWR | O_CREAT | O_TRUNC, 0600);
        CHECK(fd >= 0 && ftruncate(fd, VOLSZ) == 0);
        close(fd);
    }
    uint64_t mems[] = {0, 0, 128 * 1024};
    for (int r = 0; r < 3; r++) {
        memset(model, 0, sizeof model);
        for (int v = 0; v < 2; v++)
            CHECK(truncate(vpath[v], 0) == 0 && truncate(vpath[v], VOLSZ) == 0);
        run(r == 1 ? JR_RAM : JR_NV, mems[r]);
    }
    memset(model, 0, sizeof model);
    for (int v = 0; v < 2; v++)
        CHECK(truncate(vpath[v], 0) == 0 && truncate(vpath[v], VOLSZ) == 0);
    run_confirm();
    CHECK(jr_crc32c("123456789", 9) == 0xe3069283u);
    puts("OK");
    return 0;
}
"""

SANITIZERS = {
    "asan-ubsan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    "tsan": ["-fsanitize=thread"],
}


@pytest.mark.parametrize("san", sorted(SANITIZERS))
def test_c_journal_under_sanitizer(tmp_path: Path, san: str) -> None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        pytest.skip("no C compiler")
    src = tmp_path / "driver.c"
    src.write_text(DRIVER)
    exe = tmp_path / "driver"
    cmd = [
        cc, "-std=c11", "-O1", "-g", "-fno-omit-frame-pointer", "-Wall", "-Wextra", "-Werror",
        "-pthread", *SANITIZERS[san], "-DJR_MEM_MIN=65536", f"-I{ROOT / 'csrc'}",
        str(ROOT / "csrc" / "journal.c"), str(ROOT / "csrc" / "crc32c.c"),
        str(src), "-o", str(exe),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode and "sanitize" in res.stderr and "cannot find" in res.stderr:
        pytest.skip(f"{san} runtime not installed: {res.stderr[-300:]}")
    assert res.returncode == 0, res.stderr
    data = tmp_path / "data"
    data.mkdir()
    env = dict(
        os.environ,
        ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
        TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1",
    )
    run = subprocess.run(
        [str(exe), str(data)], capture_output=True, text=True, env=env, timeout=300
    )
    if run.returncode and "unexpected memory mapping" in run.stderr:
        pytest.skip(f"{san} cannot run on this kernel's memory layout")
    assert run.returncode == 0, run.stderr[-6000:]
    assert run.stdout.strip() == "OK"
