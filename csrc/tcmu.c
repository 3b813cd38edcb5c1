/* dmsnap TCMU ring handler; see tcmu.h. */
#define _GNU_SOURCE
#include "tcmu.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

/* <linux/target_core_user.h> pulls in <linux/uio.h>, whose struct iovec
 * clashes with glibc's (same layout); keep glibc's. */
#include <sys/uio.h>
#define __LINUX_UIO_H
#include <linux/target_core_user.h>

#define ST_GOOD 0x00
#define ST_CHECK 0x02
#define ST_BUSY 0x08

#define DEFAULT_WORKERS 16
/* A read whose buffer is at most this many pieces of the data area is read
 * piece by piece into it; more pieces cost more system calls than the
 * bounce buffer's one copy. */
#ifndef DIRECT_READ_PIECES
#define DIRECT_READ_PIECES 8
#endif
#define MAX_WORKERS 64

struct tc_cmd {
    uint16_t cmd_id;
    uint8_t cdb[TC_MAX_CDB];
    uint32_t cdb_len;
    uint32_t iov_cnt;
    struct iovec *iov; /* pointers into the mapping */
    uint64_t data_len;
    struct tc_cmd *next;
};

struct tc_dev {
    int fd;
    uint8_t *map;
    uint64_t map_size;
    struct tcmu_mailbox *mb;
    jr_t *j;
    struct tc_config cfg;
    int desc_sense;

    pthread_mutex_t mu;
    pthread_cond_t cv_work, cv_slow, cv_idle;
    uint32_t fetched; /* ring offset up to which commands were taken */
    struct tc_cmd *work_head, *work_tail, *slow_head, *slow_tail;
    struct tc_cmd *inflight[65536]; /* by cmd_id: fetched, not completed */
    int stop;

    uint64_t kick_req; /* completions that asked for a kick (st.kicks: made) */
    int kicking;       /* a thread is in kick()'s write */

    int polling;        /* a worker sleeps in poll() on the UIO device */
    int idle;           /* workers waiting on cv_work */
    int no_direct_read; /* reads into the data area failed with EFAULT: bounce */
    pthread_t workers[MAX_WORKERS];
    int nworkers;
    struct tc_stats st;

    /* The pool is out of data space (the journal's flusher got ENOSPC):
     * cached, refreshed at most every FULL_CHECK_NS (the journal's stats
     * take its lock). */
    int pool_full;
    uint64_t full_checked_ns;
};

#define FULL_CHECK_NS 50000000ull

/* -- sense ------------------------------------------------------------------- */

static uint32_t make_sense(int desc, uint8_t key, uint8_t asc, uint8_t ascq, uint8_t *s)
{
    memset(s, 0, TCMU_SENSE_BUFFERSIZE);
    if (desc) {
        s[0] = 0x72;
        s[1] = key;
        s[2] = asc;
        s[3] = ascq;
        return 8;
    }
    s[0] = 0x70;
    s[2] = key;
    s[7] = 10; /* additional length */
    s[12] = asc;
    s[13] = ascq;
    return 18;
}

/* -- the ring ---------------------------------------------------------------- */

static inline struct tcmu_cmd_entry *entry_at(tc_dev_t *d, uint32_t off)
{
    return (struct tcmu_cmd_entry *)(d->map + d->mb->cmdr_off + off);
}

static inline uint32_t ring_add(tc_dev_t *d, uint32_t off, uint32_t len)
{
    return (off + len) % d->mb->cmdr_size;
}

/* Skip non-command entries at the tail (PAD, unknown ops) that are already
 * fetched; the caller holds mu. */
static void sweep_tail(tc_dev_t *d)
{
    uint32_t tail = d->mb->cmd_tail;
    while (tail != d->fetched) {
        struct tcmu_cmd_entry *e = entry_at(d, tail);
        if (tcmu_hdr_get_op(e->hdr.len_op) == TCMU_OP_CMD)
            break;
        tail = ring_add(d, tail, tcmu_hdr_get_len(e->hdr.len_op));
    }
    __atomic_store_n(&d->mb->cmd_tail, tail, __ATOMIC_RELEASE);
}

/* Tell the kernel to reap completions. One kick reaps every response
 * written before it, so concurrent completers share kicks: whoever finds a
 * kick under way only counts its request, and the kicker kicks again if
 * requests arrived meanwhile (seq_cst orders the count against the flag, so
 * no response is left unreaped). Each kick is a system call into LIO. */
static void kick(tc_dev_t *d)
{
    __atomic_add_fetch(&d->kick_req, 1, __ATOMIC_SEQ_CST);
    while (!__atomic_exchange_n(&d->kicking, 1, __ATOMIC_SEQ_CST)) {
        uint64_t seen = __atomic_load_n(&d->kick_req, __ATOMIC_SEQ_CST);
        uint32_t one = 0;
        ssize_t n = write(d->fd, &one, sizeof one);
        (void)n; /* a failed kick is retried by the next completion */
        __atomic_add_fetch(&d->st.kicks, 1, __ATOMIC_RELAXED);
        __atomic_store_n(&d->kicking, 0, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&d->kick_req, __ATOMIC_SEQ_CST) == seen)
            break;
    }
}

/* Write a response into the entry at cmd_tail (stealing it, as out-of-order
 * completion requires) and move the tail past it; the caller holds mu. */
static void respond(tc_dev_t *d, struct tc_cmd *c, uint8_t status, const uint8_t *sense,
                    uint32_t sense_len, int64_t read_len)
{
    sweep_tail(d);
    uint32_t tail = d->mb->cmd_tail;
    struct tcmu_cmd_entry *e = entry_at(d, tail);
    e->hdr.cmd_id = c->cmd_id;
    e->hdr.uflags = 0;
    e->rsp.scsi_status = status;
    memset(e->rsp.sense_buffer, 0, TCMU_SENSE_BUFFERSIZE);
    if (sense && sense_len)
        memcpy(e->rsp.sense_buffer, sense,
               sense_len < TCMU_SENSE_BUFFERSIZE ? sense_len : TCMU_SENSE_BUFFERSIZE);
    if (read_len >= 0 && (d->mb->flags & TCMU_MAILBOX_FLAG_CAP_READ_LEN)) {
        e->hdr.uflags |= TCMU_UFLAG_READ_LEN;
        e->rsp.read_len = (uint32_t)read_len;
    }
    __atomic_store_n(&d->mb->cmd_tail, ring_add(d, tail, tcmu_hdr_get_len(e->hdr.len_op)),
                     __ATOMIC_RELEASE);
    sweep_tail(d);
    d->inflight[c->cmd_id] = NULL;
    d->st.inflight--;
    if (!d->st.inflight)
        pthread_cond_broadcast(&d->cv_idle);
}

static void finish(tc_dev_t *d, struct tc_cmd *c, uint8_t status, const uint8_t *sense,
                   uint32_t sense_len, int64_t read_len)
{
    pthread_mutex_lock(&d->mu);
    respond(d, c, status, sense, sense_len, read_len);
    pthread_mutex_unlock(&d->mu);
    kick(d);
    free(c->iov);
    free(c);
}

static uint32_t cdb_size(uint8_t op)
{
    static const uint8_t by_group[8] = {6, 10, 10, 0, 16, 12, 10, 10};
    return by_group[op >> 5];
}

/* READ/WRITE 6/10/12/16 with every field well-formed: (is_write, lba,
 * blocks, fua); 0 if the slow path should see it (it answers with sense). */
static int fast_rw(const tc_dev_t *d, const struct tc_cmd *c, int *w, uint64_t *lba,
                   uint32_t *n, int *fua)
{
    const uint8_t *b = c->cdb;
    uint8_t prot = 0;
    switch (b[0]) {
    case 0x08: case 0x0a: /* READ(6) / WRITE(6) */
        *w = b[0] == 0x0a;
        *lba = ((uint64_t)(b[1] & 0x1f) << 16) | ((uint64_t)b[2] << 8) | b[3];
        *n = b[4] ? b[4] : 256;
        *fua = 0;
        if (b[5])
            return 0;
        break;
    case 0x28: case 0x2a: /* READ(10) / WRITE(10) */
        *w = b[0] == 0x2a;
        *lba = ((uint64_t)b[2] << 24) | ((uint64_t)b[3] << 16) | ((uint64_t)b[4] << 8) | b[5];
        *n = ((uint32_t)b[7] << 8) | b[8];
        prot = b[1] >> 5;
        *fua = !!(b[1] & 0x08);
        if (b[9] || (b[1] & 0x06) || b[6])
            return 0;
        break;
    case 0xa8: case 0xaa: /* READ(12) / WRITE(12) */
        *w = b[0] == 0xaa;
        *lba = ((uint64_t)b[2] << 24) | ((uint64_t)b[3] << 16) | ((uint64_t)b[4] << 8) | b[5];
        *n = ((uint32_t)b[6] << 24) | ((uint32_t)b[7] << 16) | ((uint32_t)b[8] << 8) | b[9];
        prot = b[1] >> 5;
        *fua = !!(b[1] & 0x08);
        if (b[11] || (b[1] & 0x06) || b[10])
            return 0;
        break;
    case 0x88: case 0x8a: /* READ(16) / WRITE(16) */
        *w = b[0] == 0x8a;
        *lba = 0;
        for (int i = 2; i < 10; i++)
            *lba = (*lba << 8) | b[i];
        *n = ((uint32_t)b[10] << 24) | ((uint32_t)b[11] << 16) | ((uint32_t)b[12] << 8) | b[13];
        prot = b[1] >> 5;
        *fua = !!(b[1] & 0x08);
        if (b[15] || (b[1] & 0x06) || b[14])
            return 0;
        break;
    default:
        return 0;
    }
    uint64_t blocks = d->cfg.size / d->cfg.block_size;
    if (prot || *n == 0 || *lba >= blocks || *n > blocks - *lba)
        return 0;
    if ((uint64_t)*n * d->cfg.block_size != c->data_len || c->data_len > JR_MAX_IO)
        return 0;
    if (*w && d->cfg.read_only)
        return 0;
    return 1;
}

/* -- fast path ----------------------------------------------------------- */

static int64_t read_bounced(tc_dev_t *d, struct tc_cmd *c, uint8_t *bounce, uint64_t off,
                            uint32_t len)
{
    int64_t rc = jr_read(d->j, d->cfg.vol, off, bounce, len);
    if (rc >= 0) {
        uint32_t at = 0;
        for (uint32_t i = 0; i < c->iov_cnt && at < len; i++) {
            uint32_t k = c->iov[i].iov_len < len - at ? (uint32_t)c->iov[i].iov_len : len - at;
            memcpy(c->iov[i].iov_base, bounce + at, k);
            at += k;
        }
    }
    return rc;
}

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

/* Whether the pool behind the journal is known to be out of space: the
 * flusher's last dm write failed with ENOSPC (a thin pool with
 * error_if_no_space), or the daemon said so (jr_set_no_space: a thin pool
 * out of metadata space, read-only, whose writes fail with EIO). The
 * journal is per pool, so one volume's failure stands for all of them.
 * Cleared by the flusher's next successful write, once space is freed, or
 * by the daemon once the pool is writable again. */
static int pool_full(tc_dev_t *d)
{
    uint64_t now = now_ns();
    uint64_t last = __atomic_load_n(&d->full_checked_ns, __ATOMIC_RELAXED);
    if (now - last > FULL_CHECK_NS &&
        __atomic_compare_exchange_n(&d->full_checked_ns, &last, now, 0, __ATOMIC_RELAXED,
                                    __ATOMIC_RELAXED)) {
        struct jr_stats js;
        jr_get_stats(d->j, &js);
        __atomic_store_n(&d->pool_full, js.flush_error == -ENOSPC || js.no_space,
                         __ATOMIC_RELAXED);
    }
    return __atomic_load_n(&d->pool_full, __ATOMIC_RELAXED);
}

/* Serve one fast-path command; 1 if it completed GOOD. */
static int serve_fast(tc_dev_t *d, struct tc_cmd *c, uint8_t *bounce)
{
    int w, fua;
    uint64_t lba;
    uint32_t n;
    uint8_t sense[TCMU_SENSE_BUFFERSIZE];
    fast_rw(d, c, &w, &lba, &n, &fua);
    if (d->cfg.null_io) { /* the ring's own cost, measured by bench/scsi_bench.py --null */
        __atomic_add_fetch(w ? &d->st.fast_writes : &d->st.fast_reads, 1, __ATOMIC_RELAXED);
        finish(d, c, ST_GOOD, NULL, 0, -1);
        return 1;
    }
    uint64_t off = lba * d->cfg.block_size;
    uint32_t len = n * d->cfg.block_size;
    int64_t rc;
    if (w && pool_full(d)) {
        /* A write now could only wait in the journal behind the record the
         * flusher cannot place, fill it and end as BUSY until the
         * initiator gives up: refuse it at once, as a full thin LUN does
         * (SBC: DATA PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT).
         * Writes acknowledged before stay in the journal and land when
         * space is freed. */
        rc = -ENOSPC;
        __atomic_add_fetch(&d->st.fast_writes, 1, __ATOMIC_RELAXED);
    } else if (w) {
        /* journalled straight from the ring's data area (fast_rw checked
         * that the buffers hold exactly len bytes) */
        rc = jr_writev(d->j, d->cfg.vol, off, c->iov, (int)c->iov_cnt, fua ? JR_FUA : 0,
                       d->cfg.timeout_ms);
        __atomic_add_fetch(&d->st.fast_writes, 1, __ATOMIC_RELAXED);
    } else if (c->iov_cnt <= DIRECT_READ_PIECES &&
               !__atomic_load_n(&d->no_direct_read, __ATOMIC_RELAXED)) {
        /* a few pieces of the data area: read each straight into it
         * (O_DIRECT from the dm device where aligned) instead of copying
         * the whole through the bounce buffer; if the kernel cannot pin the
         * mapping's pages for that, use the bounce buffer from then on */
        rc = 0;
        uint32_t at = 0;
        for (uint32_t i = 0; i < c->iov_cnt && at < len && rc >= 0; i++) {
            uint32_t k = c->iov[i].iov_len < len - at ? (uint32_t)c->iov[i].iov_len : len - at;
            rc = jr_read(d->j, d->cfg.vol, off + at, c->iov[i].iov_base, k);
            at += k;
        }
        if (rc == -EFAULT) {
            __atomic_store_n(&d->no_direct_read, 1, __ATOMIC_RELAXED);
            rc = read_bounced(d, c, bounce, off, len);
        }
        __atomic_add_fetch(&d->st.fast_reads, 1, __ATOMIC_RELAXED);
    } else {
        rc = read_bounced(d, c, bounce, off, len);
        __atomic_add_fetch(&d->st.fast_reads, 1, __ATOMIC_RELAXED);
    }
    if (rc >= 0) {
        finish(d, c, ST_GOOD, NULL, 0, -1);
        return 1;
    }
    if (w && rc == -ETIMEDOUT && pool_full(d))
        rc = -ENOSPC; /* waited for journal space that a full pool never frees */
    if (rc == -ETIMEDOUT || rc == -ESHUTDOWN || rc == -EAGAIN || rc == -ENXIO) {
        /* journal full, stopping, volume detached for a moment: retry later */
        __atomic_add_fetch(&d->st.busy, 1, __ATOMIC_RELAXED);
        finish(d, c, ST_BUSY, NULL, 0, -1);
        return 0;
    }
    __atomic_add_fetch(&d->st.errors, 1, __ATOMIC_RELAXED);
    uint32_t sl;
    if (rc == -ENOSPC) /* SPACE ALLOCATION FAILED WRITE PROTECT */
        sl = make_sense(d->desc_sense, 0x07, 0x27, 0x07, sense);
    else if (w) /* WRITE ERROR */
        sl = make_sense(d->desc_sense, 0x03, 0x0c, 0x00, sense);
    else /* UNRECOVERED READ ERROR */
        sl = make_sense(d->desc_sense, 0x03, 0x11, 0x00, sense);
    finish(d, c, ST_CHECK, sense, sl, -1);
    return 0;
}

/* The monitoring counters of one completed fast-path command: relaxed
 * atomic adds only (no lock), so the hot path pays a few cycles. */
static void count_io(tc_dev_t *d, int w, uint64_t good_bytes, uint64_t ns)
{
    uint64_t us = ns / 1000;
    int i = 0;
    while (i < TC_LAT_BUCKETS - 1 && us > ((uint64_t)TC_LAT_FIRST_US << i))
        i++;
    __atomic_add_fetch(w ? &d->st.write_bytes : &d->st.read_bytes, good_bytes, __ATOMIC_RELAXED);
    __atomic_add_fetch(w ? &d->st.write_ns : &d->st.read_ns, ns, __ATOMIC_RELAXED);
    __atomic_add_fetch(w ? &d->st.write_lat[i] : &d->st.read_lat[i], 1, __ATOMIC_RELAXED);
}

static void run_fast(tc_dev_t *d, struct tc_cmd *c, uint8_t *bounce)
{
    int w, fua;
    uint64_t lba;
    uint32_t n;
    fast_rw(d, c, &w, &lba, &n, &fua);
    uint64_t len = (uint64_t)n * d->cfg.block_size;
    uint64_t t0 = now_ns();
    int good = serve_fast(d, c, bounce); /* frees c */
    count_io(d, w, good ? len : 0, now_ns() - t0);
}

/* -- fetching ----------------------------------------------------------------- */

static void enqueue(struct tc_cmd **head, struct tc_cmd **tail, struct tc_cmd *c)
{
    c->next = NULL;
    if (*tail)
        (*tail)->next = c;
    else
        *head = c;
    *tail = c;
}

/* A command entry whose contents cannot be taken (its CDB or iovec array
 * outside the mapping or the entry): answered at once with CHECK CONDITION,
 * HARDWARE ERROR / INTERNAL TARGET FAILURE, so the initiator sees an error
 * rather than a timeout; the caller holds mu. */
static void reject(tc_dev_t *d, struct tc_cmd *c)
{
    uint8_t sense[TCMU_SENSE_BUFFERSIZE];
    uint32_t sl = make_sense(d->desc_sense, 0x04, 0x44, 0x00, sense);
    d->st.errors++;
    respond(d, c, ST_CHECK, sense, sl, -1);
    free(c->iov);
    free(c);
}

/* Take every command the kernel has posted; the caller holds mu. The ring
 * is shared memory: every offset, length and count in it is checked before
 * it is followed (tests/torture/fuzz/tcmu_fuzz.c feeds corrupt rings). An
 * entry whose header is wrong (beyond the ring, straddling its end, too
 * short, a command id already in flight) stops the taking there, as the
 * kernel never writes one: its commands time out. Returns 1 if it took any. */
static int fetch(tc_dev_t *d)
{
    int got = 0, kicked = 0;
    uint32_t size = d->mb->cmdr_size;
    uint32_t head = __atomic_load_n(&d->mb->cmd_head, __ATOMIC_ACQUIRE);
    if (size < sizeof(struct tcmu_cmd_entry) || d->mb->cmdr_off > d->map_size ||
        size > d->map_size - d->mb->cmdr_off || head >= size)
        return 0;
    while (d->fetched != head) {
        if (d->fetched >= size || size - d->fetched < sizeof(struct tcmu_cmd_entry_hdr))
            break; /* a corrupt ring: stop taking, the kernel will time out */
        struct tcmu_cmd_entry *e = entry_at(d, d->fetched);
        uint32_t len = tcmu_hdr_get_len(e->hdr.len_op);
        uint32_t op = tcmu_hdr_get_op(e->hdr.len_op);
        /* an entry never passes the head (one as long as the ring would
         * bring fetched back where it was, for ever) */
        uint32_t posted = (head + size - d->fetched) % size;
        if (!len || len % TCMU_OP_ALIGN_SIZE || len > size - d->fetched || len > posted)
            break;
        if (op == TCMU_OP_CMD) {
            /* the response is written over the entry: it must hold one */
            if (len < sizeof(struct tcmu_cmd_entry) || d->inflight[e->hdr.cmd_id])
                break;
            uint64_t cnt = (uint64_t)e->req.iov_cnt + e->req.iov_bidi_cnt;
            int bad = offsetof(struct tcmu_cmd_entry, req.iov) + cnt * sizeof(struct iovec) > len;
            struct tc_cmd *c = calloc(1, sizeof *c);
            if (!c || (cnt && !bad && !(c->iov = calloc(cnt, sizeof *c->iov)))) {
                free(c);
                break; /* out of memory: leave it for the next pass */
            }
            c->cmd_id = e->hdr.cmd_id;
            d->inflight[c->cmd_id] = c;
            d->st.inflight++;
            d->st.fetched++;
            uint64_t cdb_off = e->req.cdb_off;
            if (bad || cdb_off >= d->map_size) {
                /* past it first: respond() sweeps the tail up to fetched */
                d->fetched = ring_add(d, d->fetched, len);
                got = kicked = 1;
                reject(d, c);
                continue;
            }
            /* the CDB as far as the mapping goes; zeros beyond */
            uint64_t room = d->map_size - cdb_off;
            memcpy(c->cdb, d->map + cdb_off, room < TC_MAX_CDB ? room : TC_MAX_CDB);
            uint32_t cl = cdb_size(c->cdb[0]);
            if (c->cdb[0] == 0x7f) /* variable length */
                cl = 8 + c->cdb[7];
            if (!cl)
                cl = 16;
            c->cdb_len = cl < TC_MAX_CDB ? cl : TC_MAX_CDB;
            memset(c->cdb + c->cdb_len, 0, TC_MAX_CDB - c->cdb_len);
            c->iov_cnt = (uint32_t)cnt;
            for (uint32_t i = 0; i < cnt; i++) {
                uintptr_t base = (uintptr_t)e->req.iov[i].iov_base;
                size_t l = e->req.iov[i].iov_len;
                if (base > d->map_size || l > d->map_size - base) {
                    c->iov_cnt = i; /* never touch memory outside the map */
                    break;
                }
                c->iov[i].iov_base = d->map + base;
                c->iov[i].iov_len = l;
                c->data_len += l;
            }
            int w, fua;
            uint64_t lba;
            uint32_t n;
            if ((d->j || d->cfg.null_io) && fast_rw(d, c, &w, &lba, &n, &fua)) {
                enqueue(&d->work_head, &d->work_tail, c);
            } else {
                d->st.slow++;
                enqueue(&d->slow_head, &d->slow_tail, c);
                pthread_cond_signal(&d->cv_slow);
            }
        } else if (op != TCMU_OP_PAD) {
            e->hdr.uflags |= TCMU_UFLAG_UNKNOWN_OP;
        }
        d->fetched = ring_add(d, d->fetched, len);
        got = 1;
    }
    sweep_tail(d);
    if (kicked) {
        /* kick() takes no lock, but needs none of ours either */
        kick(d);
    }
    return got;
}

/* -- the workers ------------------------------------------------------------ */

/* Every worker fetches commands itself: the ring's head is in shared memory,
 * so a worker that finishes a command takes the next ones without a system
 * call or a hand-off. Only when nothing is left does one worker (the
 * poller) sleep in poll() on the UIO device for the kernel's next event;
 * the others wait on cv_work. A worker that takes a command and leaves work
 * behind, or leaves nobody polling, wakes one idle worker: under load the
 * wake-ups go down to what sleeping requires. The UIO event is consumed
 * (read) before the ring is looked at, so a command posted after the look
 * raises an event the next poll() sees. */
static void *worker_main(void *arg)
{
    tc_dev_t *d = arg;
    pthread_setname_np(pthread_self(), "tcmu-worker"); /* for top -H, /proc/PID/task */
    if (d->cfg.worker_nice) {
        /* Linux keeps a nice value per thread (who 0: this one). When the
         * CPUs are short, the kernel threads that feed and drain the ring
         * (LIO's iSCSI receive/transmit threads, bound to one CPU each, and
         * its completion work) then win against a worker taking more work,
         * and commands already answered reach the initiator sooner. */
        errno = 0;
        int cur = getpriority(PRIO_PROCESS, 0);
        if (!errno) {
            int n = cur + d->cfg.worker_nice;
            (void)setpriority(PRIO_PROCESS, 0, n > 19 ? 19 : n < -20 ? -20 : n);
        }
    }
    uint8_t *bounce = NULL;
    if (d->j && posix_memalign((void **)&bounce, 4096, JR_MAX_IO))
        return NULL;
    struct pollfd p = {.fd = d->fd, .events = POLLIN};
    pthread_mutex_lock(&d->mu);
    for (;;) {
        if (!d->stop)
            fetch(d);
        if (d->work_head) {
            struct tc_cmd *c = d->work_head;
            d->work_head = c->next;
            if (!d->work_head)
                d->work_tail = NULL;
            if ((d->work_head || !d->polling) && d->idle)
                pthread_cond_signal(&d->cv_work);
            pthread_mutex_unlock(&d->mu);
            run_fast(d, c, bounce);
            pthread_mutex_lock(&d->mu);
            continue;
        }
        if (d->stop)
            break;
        if (!d->polling) {
            d->polling = 1;
            pthread_mutex_unlock(&d->mu);
            int r = poll(&p, 1, 100);
            if (r > 0 && (p.revents & POLLIN)) {
                uint32_t cnt;
                ssize_t n = read(d->fd, &cnt, sizeof cnt); /* consumes the UIO event */
                (void)n;
            }
            pthread_mutex_lock(&d->mu);
            d->polling = 0;
            continue;
        }
        d->idle++;
        pthread_cond_wait(&d->cv_work, &d->mu);
        d->idle--;
    }
    pthread_mutex_unlock(&d->mu);
    free(bounce);
    return NULL;
}

/* -- the controller's side ----------------------------------------------- */

int tc_next_slow(tc_dev_t *d, uint32_t timeout_ms, struct tc_slow *out)
{
    struct timespec dl;
    clock_gettime(CLOCK_MONOTONIC, &dl);
    dl.tv_sec += timeout_ms / 1000;
    dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (dl.tv_nsec >= 1000000000L) {
        dl.tv_sec++;
        dl.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&d->mu);
    while (!d->slow_head && !d->stop) {
        if (pthread_cond_timedwait(&d->cv_slow, &d->mu, &dl) == ETIMEDOUT)
            break;
    }
    struct tc_cmd *c = d->slow_head;
    if (!c) {
        int rc = d->stop ? -ESHUTDOWN : -ETIMEDOUT;
        pthread_mutex_unlock(&d->mu);
        return rc;
    }
    d->slow_head = c->next;
    if (!d->slow_head)
        d->slow_tail = NULL;
    out->cmd_id = c->cmd_id;
    memcpy(out->cdb, c->cdb, TC_MAX_CDB);
    out->cdb_len = c->cdb_len;
    out->data_len = (uint32_t)c->data_len;
    pthread_mutex_unlock(&d->mu);
    return 0;
}

int tc_data_out(tc_dev_t *d, uint16_t cmd_id, void *buf, uint32_t len)
{
    pthread_mutex_lock(&d->mu);
    struct tc_cmd *c = d->inflight[cmd_id];
    pthread_mutex_unlock(&d->mu);
    if (!c)
        return -ENOENT;
    uint32_t at = 0;
    for (uint32_t i = 0; i < c->iov_cnt && at < len; i++) {
        uint32_t k = c->iov[i].iov_len < len - at ? (uint32_t)c->iov[i].iov_len : len - at;
        memcpy((uint8_t *)buf + at, c->iov[i].iov_base, k);
        at += k;
    }
    return (int)at;
}

int tc_complete(tc_dev_t *d, uint16_t cmd_id, uint8_t status, const void *data_in,
                uint32_t data_len, const void *sense, uint32_t sense_len)
{
    pthread_mutex_lock(&d->mu);
    struct tc_cmd *c = d->inflight[cmd_id];
    pthread_mutex_unlock(&d->mu);
    if (!c)
        return -ENOENT;
    int64_t read_len = -1;
    if (data_in && data_len) {
        uint32_t at = 0;
        for (uint32_t i = 0; i < c->iov_cnt && at < data_len; i++) {
            uint32_t k =
                c->iov[i].iov_len < data_len - at ? (uint32_t)c->iov[i].iov_len : data_len - at;
            memcpy(c->iov[i].iov_base, (const uint8_t *)data_in + at, k);
            at += k;
        }
        if (at < c->data_len)
            read_len = at;
    }
    finish(d, c, status, sense, sense_len, read_len);
    return 0;
}

void tc_set_desc_sense(tc_dev_t *d, int on)
{
    __atomic_store_n(&d->desc_sense, on ? 1 : 0, __ATOMIC_RELAXED);
}

void tc_get_stats(tc_dev_t *d, struct tc_stats *st)
{
    pthread_mutex_lock(&d->mu);
    *st = d->st;
    st->fast_reads = __atomic_load_n(&d->st.fast_reads, __ATOMIC_RELAXED);
    st->fast_writes = __atomic_load_n(&d->st.fast_writes, __ATOMIC_RELAXED);
    st->flags = d->mb->flags;
    st->kicks = __atomic_load_n(&d->st.kicks, __ATOMIC_RELAXED);
    st->read_bytes = __atomic_load_n(&d->st.read_bytes, __ATOMIC_RELAXED);
    st->write_bytes = __atomic_load_n(&d->st.write_bytes, __ATOMIC_RELAXED);
    st->read_ns = __atomic_load_n(&d->st.read_ns, __ATOMIC_RELAXED);
    st->write_ns = __atomic_load_n(&d->st.write_ns, __ATOMIC_RELAXED);
    for (int i = 0; i < TC_LAT_BUCKETS; i++) {
        st->read_lat[i] = __atomic_load_n(&d->st.read_lat[i], __ATOMIC_RELAXED);
        st->write_lat[i] = __atomic_load_n(&d->st.write_lat[i], __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&d->mu);
}

/* -- life cycle -------------------------------------------------------------- */

int tc_open(const char *uio_path, uint64_t map_size, jr_t *j, const struct tc_config *cfg,
            tc_dev_t **out)
{
    if (!cfg || !cfg->block_size || cfg->size % cfg->block_size || (j && !cfg->vol) ||
        (j && cfg->null_io))
        return -EINVAL;
    tc_dev_t *d = calloc(1, sizeof *d);
    if (!d)
        return -ENOMEM;
    d->fd = open(uio_path, O_RDWR | O_CLOEXEC);
    if (d->fd < 0) {
        int e = errno;
        free(d);
        return -e;
    }
    d->map = mmap(NULL, map_size, PROT_READ | PROT_WRITE, MAP_SHARED, d->fd, 0);
    if (d->map == MAP_FAILED) {
        int e = errno;
        close(d->fd);
        free(d);
        return -e;
    }
    d->map_size = map_size;
    d->mb = (struct tcmu_mailbox *)d->map;
    if (d->mb->version != TCMU_MAILBOX_VERSION || !(d->mb->flags & TCMU_MAILBOX_FLAG_CAP_OOOC) ||
        d->mb->cmdr_off >= map_size || d->mb->cmdr_size > map_size - d->mb->cmdr_off) {
        munmap(d->map, map_size);
        close(d->fd);
        free(d);
        return -EPROTO;
    }
    d->j = j;
    d->cfg = *cfg;
    if (!d->cfg.timeout_ms)
        d->cfg.timeout_ms = 10000;
    d->nworkers = cfg->workers > 0 ? cfg->workers : DEFAULT_WORKERS;
    if (d->nworkers > MAX_WORKERS)
        d->nworkers = MAX_WORKERS;
    pthread_mutex_init(&d->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&d->cv_work, &ca);
    pthread_cond_init(&d->cv_slow, &ca);
    pthread_cond_init(&d->cv_idle, &ca);
    pthread_condattr_destroy(&ca);
    /* Entries between tail and head were posted before we (re)started: a
     * restarted daemon takes them again (the kernel still waits for them). */
    d->fetched = d->mb->cmd_tail;
    /* Without a journal every command is the controller's: one worker
     * fetches them. */
    int want = j || cfg->null_io ? d->nworkers : 1, started = 0;
    for (int i = 0; i < want; i++) {
        if (pthread_create(&d->workers[i], NULL, worker_main, d))
            break;
        started++;
    }
    d->nworkers = started;
    if (!started) {
        munmap(d->map, map_size);
        close(d->fd);
        free(d);
        return -EAGAIN;
    }
    *out = d;
    return 0;
}

void tc_close(tc_dev_t *d)
{
    pthread_mutex_lock(&d->mu);
    d->stop = 1;
    pthread_cond_broadcast(&d->cv_work);
    pthread_cond_broadcast(&d->cv_slow);
    pthread_mutex_unlock(&d->mu);
    for (int i = 0; i < d->nworkers; i++)
        pthread_join(d->workers[i], NULL); /* they finish the queue first */
    /* What the controller never completed, and what was posted meanwhile:
     * BUSY, so initiators retry. */
    pthread_mutex_lock(&d->mu);
    fetch(d);
    for (uint32_t id = 0; id < 65536; id++) {
        struct tc_cmd *c = d->inflight[id];
        if (!c)
            continue;
        respond(d, c, ST_BUSY, NULL, 0, -1);
        free(c->iov);
        free(c);
    }
    pthread_mutex_unlock(&d->mu);
    kick(d);
    munmap(d->map, d->map_size);
    close(d->fd);
    pthread_mutex_destroy(&d->mu);
    pthread_cond_destroy(&d->cv_work);
    pthread_cond_destroy(&d->cv_slow);
    pthread_cond_destroy(&d->cv_idle);
    free(d);
}
