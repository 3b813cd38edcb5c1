/* libFuzzer target: the TCMU ring handler's command parsing (csrc/tcmu.c).
 *
 * tcmu.c is included whole so that fetch() (takes the commands the kernel
 * posted: entry, CDB, iovecs) and the fast path run on a fake mapping in
 * memory, without a UIO device or threads: the harness plays the worker
 * (fetch, run_fast) and the controller (tc_next_slow, tc_data_out,
 * tc_complete), as worker_main and Python do.
 *
 * Input: byte 0 selects the mode, byte 1 the device.
 *   mode & 1 == 0  structured: the rest is a list of commands
 *                  [cdb_len u8][cdb][iov_cnt u8][iov_cnt x (off u16, len u16)]
 *                  written into the ring the way the kernel writes them (a
 *                  PAD entry at the wrap), so CDBs and iovecs are hostile but
 *                  the ring itself is well-formed; every command must be
 *                  answered (cmd_tail reaches cmd_head, nothing in flight)
 *   mode & 1 == 1  raw: the rest is the mailbox's cmd_head/cmd_tail/
 *                  cmdr_size and the bytes of the ring and data area as they
 *                  come: a corrupt ring, which must not make the handler
 *                  touch memory outside the mapping
 *   device: bit 0 a journal (RAM, one volume of DEV_SIZE) behind the fast
 *           path, else null_io (the fast path answers GOOD) or, bit 1, no
 *           fast path at all; bit 2 read-only; bit 3 descriptor sense;
 *           bit 4 the kernel reports READ_LEN.
 * The mapping is malloc'd at its exact size: AddressSanitizer catches any
 * access past it. */
#define _GNU_SOURCE
#include "../../../csrc/tcmu.c"

#include <stdio.h>

#define MAP_SIZE (64u << 10)
#define CMDR_OFF ((uint32_t)sizeof(struct tcmu_mailbox)) /* as the kernel places it */
#define DEV_SIZE (1u << 20)

static jr_t *J;
static tc_dev_t D;
static uint8_t *bounce;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    int vfd = memfd_create("tcmu-fuzz-vol", 0);
    char vpath[64];
    snprintf(vpath, sizeof vpath, "/proc/self/fd/%d", vfd);
    if (vfd < 0 || ftruncate(vfd, DEV_SIZE) || jr_open(NULL, JR_RAM, 4u << 20, &J) ||
        jr_attach(J, 1, vpath, DEV_SIZE) || jr_start(J) ||
        posix_memalign((void **)&bounce, 4096, JR_MAX_IO))
        abort();
    pthread_mutex_init(&D.mu, NULL);
    pthread_cond_init(&D.cv_work, NULL);
    pthread_cond_init(&D.cv_slow, NULL);
    pthread_cond_init(&D.cv_idle, NULL);
    return 0;
}

static uint16_t get16(const uint8_t **p, const uint8_t *end)
{
    uint16_t v = 0;
    for (int i = 0; i < 2 && *p < end; i++)
        v = (uint16_t)(v << 8 | *(*p)++);
    return v;
}

static uint32_t get32(const uint8_t **p, const uint8_t *end)
{
    return (uint32_t)get16(p, end) << 16 | get16(p, end);
}

/* Post the commands of a structured input; returns how many. */
static int post_structured(uint8_t *map, struct tcmu_mailbox *mb, const uint8_t *p,
                           const uint8_t *end)
{
    uint32_t head = mb->cmd_head, used = 0, data_size = MAP_SIZE - CMDR_OFF - mb->cmdr_size;
    uint8_t *data = map + CMDR_OFF + mb->cmdr_size;
    int n = 0;
    uint16_t id = 1;
    while (p < end && n < 64) {
        uint8_t cl = *p++ % (TC_MAX_CDB + 1);
        const uint8_t *cdb = p;
        p += cl;
        if (p > end)
            break;
        uint32_t iovs = p < end ? *p++ % 9 : 0;
        uint32_t len = sizeof(struct tcmu_cmd_entry) + iovs * sizeof(struct iovec) + TC_MAX_CDB;
        len = (len + TCMU_OP_ALIGN_SIZE - 1) & ~(TCMU_OP_ALIGN_SIZE - 1);
        uint32_t pad_len = head + len > mb->cmdr_size ? mb->cmdr_size - head : 0;
        if (used + pad_len + len >= mb->cmdr_size)
            break; /* full: head may never catch up with the tail */
        used += pad_len + len;
        if (pad_len) { /* the kernel pads to the wrap */
            struct tcmu_cmd_entry_hdr *pad = (void *)(map + CMDR_OFF + head);
            if (mb->cmdr_size - head < sizeof *pad)
                break;
            uint32_t lo = mb->cmdr_size - head;
            tcmu_hdr_set_op(&lo, TCMU_OP_PAD);
            pad->len_op = lo;
            head = 0;
        }
        struct tcmu_cmd_entry *e = (void *)(map + CMDR_OFF + head);
        memset(e, 0, len);
        uint32_t lo = len;
        tcmu_hdr_set_op(&lo, TCMU_OP_CMD);
        e->hdr.len_op = lo;
        e->hdr.cmd_id = id++;
        e->req.iov_cnt = iovs;
        uint8_t *cdb_at = (uint8_t *)&e->req.iov[iovs];
        memset(cdb_at, 0, TC_MAX_CDB);
        memcpy(cdb_at, cdb, cl);
        e->req.cdb_off = (uint64_t)(cdb_at - map);
        for (uint32_t i = 0; i < iovs; i++) {
            /* iovecs inside the data area, as the kernel gives them */
            uint32_t off = get16(&p, end) % data_size, l = get16(&p, end) % (data_size - off + 1);
            if (l > 4096 && (l & 1))
                l = data_size - off; /* now and then a big one */
            e->req.iov[i].iov_base = (void *)(uintptr_t)(data - map + off);
            e->req.iov[i].iov_len = l;
        }
        head = (head + len) % mb->cmdr_size;
        n++;
    }
    __atomic_store_n(&mb->cmd_head, head, __ATOMIC_RELEASE);
    return n;
}

static void drain(tc_dev_t *d, const uint8_t *p, const uint8_t *end)
{
    for (int round = 0; round < 4; round++) {
        pthread_mutex_lock(&d->mu);
        fetch(d);
        struct tc_cmd *c;
        while ((c = d->work_head)) {
            d->work_head = c->next;
            if (!d->work_head)
                d->work_tail = NULL;
            pthread_mutex_unlock(&d->mu);
            run_fast(d, c, bounce);
            pthread_mutex_lock(&d->mu);
        }
        pthread_mutex_unlock(&d->mu);
        struct tc_slow s;
        static uint8_t buf[MAP_SIZE], sense[TCMU_SENSE_BUFFERSIZE + 16];
        while (tc_next_slow(d, 0, &s) == 0) {
            /* the controller: reads Data-Out, answers with some Data-In
             * (any length, also longer than the buffer) and sense */
            uint32_t want = get32(&p, end) % (MAP_SIZE + 1);
            if (tc_data_out(d, s.cmd_id, buf, want) < 0)
                abort(); /* it is in flight: it must be found */
            uint32_t in = get32(&p, end) % (MAP_SIZE + 1);
            uint32_t sl = get16(&p, end) % sizeof sense;
            if (tc_complete(d, s.cmd_id, p < end ? *p : 0, buf, in, sense, sl))
                abort();
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    uint8_t mode = data[0], dev = data[1];
    const uint8_t *p = data + 2, *end = data + size;
    uint8_t *map = calloc(1, MAP_SIZE);
    struct tcmu_mailbox *mb = (void *)map;
    mb->version = TCMU_MAILBOX_VERSION;
    mb->flags = TCMU_MAILBOX_FLAG_CAP_OOOC | ((dev & 16) ? TCMU_MAILBOX_FLAG_CAP_READ_LEN : 0);
    mb->cmdr_off = CMDR_OFF;
    int structured = !(mode & 1);
    if (structured) {
        mb->cmdr_size = 1024u << (mode >> 1 & 3); /* 1..8 KiB: wraps come often */
        mb->cmd_tail = mb->cmd_head = (uint32_t)(mode >> 3) * 64 % mb->cmdr_size;
    } else {
        mb->cmdr_size = get32(&p, end);
        if (mb->cmdr_size > MAP_SIZE - CMDR_OFF) /* tc_open refuses it */
            mb->cmdr_size %= MAP_SIZE - CMDR_OFF + 1;
        mb->cmd_head = get32(&p, end);
        mb->cmd_tail = get32(&p, end);
        size_t n = (size_t)(end - p) < MAP_SIZE - CMDR_OFF ? (size_t)(end - p) : MAP_SIZE - CMDR_OFF;
        memcpy(map + CMDR_OFF, p, n);
        p += n;
    }
    tc_dev_t *d = &D;
    d->fd = -1; /* kick() writes fail, as on a closed device */
    d->map = map;
    d->map_size = MAP_SIZE;
    d->mb = mb;
    d->j = (dev & 1) ? J : NULL;
    memset(&d->cfg, 0, sizeof d->cfg);
    d->cfg.vol = 1;
    d->cfg.size = DEV_SIZE;
    d->cfg.block_size = 512;
    d->cfg.read_only = !!(dev & 4);
    d->cfg.timeout_ms = 100;
    d->cfg.null_io = !(dev & 1) && !(dev & 2);
    d->desc_sense = !!(dev & 8);
    d->fetched = mb->cmd_tail;
    d->work_head = d->work_tail = d->slow_head = d->slow_tail = NULL;
    d->stop = 0;
    memset(&d->st, 0, sizeof d->st);
    int posted = structured ? post_structured(map, mb, p, end) : 0;
    drain(d, p, end);
    if (structured && (d->st.inflight || d->st.fetched != (uint64_t)posted ||
                       mb->cmd_tail != mb->cmd_head)) {
        fprintf(stderr, "tcmu-fuzz: %d posted, %llu fetched, %u in flight, tail %u head %u\n",
                posted, (unsigned long long)d->st.fetched, d->st.inflight, mb->cmd_tail,
                mb->cmd_head);
        abort();
    }
    /* what a corrupt ring left in flight: free it as tc_close does */
    for (uint32_t id = 0; id < 65536 && d->st.inflight; id++) {
        struct tc_cmd *c = d->inflight[id];
        if (c) {
            d->inflight[id] = NULL;
            d->st.inflight--;
            free(c->iov);
            free(c);
        }
    }
    free(map);
    return 0;
}
