/* libFuzzer target: the journal's recovery (jr_open_ex on a journal image).
 *
 * The input is a compact journal image:
 *   byte 0        flags (below)
 *   bytes 1..80   superblock slot 0 (the 80 bytes of struct sb_disk)
 *   bytes 81..160 superblock slot 1 (FL_SLOT1 only)
 *   the rest      the ring from its start; the ring is zero beyond it and is
 *                 at least JR_MIN_CAPACITY bytes (a bigger capacity in a
 *                 superblock that FL_FIXSB leaves alone is just refused)
 * Checksums would stop a blind mutator at the first field it touches, so the
 * flags let the harness repair what it must to reach the deeper checks:
 *   FL_FIXSB    sanitize the superblock's numbers and recompute its crc
 *   FL_FIXREC   every ring block that starts with the record magic gets the
 *               superblock's journal id and right checksums (header, and data
 *               where its length fits in the ring)
 *   FL_DISCARD  open with discard_from (the repair) = a value from the input
 * Every open result is accepted (it is hostile input); what must not happen is
 * a crash or a sanitizer report. Three invariants are checked: a journal that
 * opens reopens with the same log (recovery is idempotent), also with a
 * memory window smaller than the ring (built with JR_MEM_MIN lowered to 64
 * KiB: recovery then streams the ring and leaves a backlog, and must find
 * the same log), and the file is never grown or shrunk. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "journal.h"

#define SB_MAGIC 0x3142534a4e534d44ULL
#define REC_MAGIC 0x3143524a4e534d44ULL
#define SB_LEN 80
#define RING_START 8192
#define MIN_CAP 65536u
#define MAX_CAP (1u << 20)
/* jr_open refuses a superblock whose sb_seq or generation reached this
 * (JR_COUNTER_MAX / 2 in csrc/journal.c: counters count up from 1 by one a
 * write or an open, so it is damage); an open of a journal just below it
 * writes one at it, and the next open then refuses, as documented. */
#define COUNTER_LIMIT (1ULL << 61)

enum { FL_FIXSB = 1, FL_FIXREC = 2, FL_DISCARD = 4, FL_SLOT1 = 8 };

struct sb_disk {
    uint64_t magic;
    uint32_t version, align;
    uint64_t journal_id, generation, capacity, ckpt_seq, ckpt_pos, sb_seq, min_gen;
    uint32_t crc, zero;
};
_Static_assert(sizeof(struct sb_disk) == SB_LEN, "superblock layout (csrc/journal.c)");

struct rec_disk {
    uint64_t magic, journal_id, generation, seq, offset, marker_id;
    uint32_t type, vol, len, data_crc, ack_lag, hdr_crc;
};
_Static_assert(sizeof(struct rec_disk) == 72, "record header layout (csrc/journal.c)");

static int fd = -1;
static char path[64];
static uint8_t *img;

static void fix_sb(struct sb_disk *sb, uint64_t cap)
{
    sb->magic = SB_MAGIC;
    if (sb->version < 1 || sb->version > 3)
        sb->version = 3;
    sb->align = 512u << (sb->align % 4);
    if (sb->capacity < MIN_CAP || sb->capacity > cap || sb->capacity % sb->align)
        sb->capacity = cap;
    sb->ckpt_pos = sb->ckpt_pos % sb->capacity / sb->align * sb->align;
    if (!sb->ckpt_seq)
        sb->ckpt_seq = 1;
    if (!sb->min_gen || sb->min_gen > sb->generation + 1)
        sb->min_gen = 1;
    sb->crc = jr_crc32c(sb, offsetof(struct sb_disk, crc));
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    fd = memfd_create("journal-fuzz", 0);
    if (fd < 0)
        abort();
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    img = malloc(RING_START + MAX_CAP);
    if (!img)
        abort();
    return 0;
}

static int open_once(uint64_t mem, uint64_t discard_from, struct jr_recovery *info,
                     struct jr_stats *st)
{
    jr_t *j = NULL;
    int rc = jr_open_ex(path, JR_NV, 0, mem, discard_from, info, &j);
    if (rc == 0) {
        uint32_t vols[8];
        jr_pending_volumes(j, vols, 8);
        jr_get_stats(j, st);
        jr_close(j, 0, 0);
    }
    return rc;
}

/* A superblock on file has a counter at the limit: the next open refuses. */
static int exhausted(void)
{
    struct sb_disk w[2];
    if (pread(fd, &w[0], sizeof w[0], 0) != sizeof w[0] ||
        pread(fd, &w[1], sizeof w[1], 4096) != sizeof w[1])
        abort();
    int out = 0;
    for (int i = 0; i < 2; i++)
        out |= w[i].magic == SB_MAGIC &&
               (w[i].sb_seq >= COUNTER_LIMIT || w[i].generation >= COUNTER_LIMIT);
    return out;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1 + SB_LEN)
        return 0;
    uint8_t flags = data[0];
    size_t at = 1 + SB_LEN * ((flags & FL_SLOT1) ? 2 : 1);
    if (size < at)
        return 0;
    size_t ring_len = size - at;
    if (ring_len > MAX_CAP)
        ring_len = MAX_CAP;
    uint64_t cap = ring_len < MIN_CAP ? MIN_CAP : (ring_len + 4095) / 4096 * 4096;
    /* only what the input covers is written: the file is zero elsewhere */
    memset(img, 0, RING_START + ring_len);
    memcpy(img, data + 1, SB_LEN);
    if (flags & FL_SLOT1)
        memcpy(img + 4096, data + 1 + SB_LEN, SB_LEN);
    memcpy(img + RING_START, data + at, ring_len);
    struct sb_disk *sb0 = (struct sb_disk *)img, *sb1 = (struct sb_disk *)(img + 4096);
    if (flags & FL_FIXSB) {
        fix_sb(sb0, cap);
        if (flags & FL_SLOT1)
            fix_sb(sb1, cap);
    }
    if (flags & FL_FIXREC) {
        uint8_t *ring = img + RING_START;
        for (uint64_t p = 0; p + 512 <= ring_len; p += 512) {
            struct rec_disk h;
            memcpy(&h, ring + p, sizeof h);
            if (h.magic != REC_MAGIC)
                continue;
            h.journal_id = sb0->journal_id;
            if ((h.type == 1 || h.type == 2) && h.len <= ring_len - p - 512)
                h.data_crc = jr_crc32c(ring + p + 512, h.len);
            h.hdr_crc = jr_crc32c(&h, offsetof(struct rec_disk, hdr_crc));
            memcpy(ring + p, &h, sizeof h);
        }
    }
    uint64_t discard_from = 0;
    if (flags & FL_DISCARD) /* near the checkpoint, where the repair means something */
        discard_from = sb0->ckpt_seq + (flags >> 4);
    uint64_t fsize = RING_START + cap;
    if (ftruncate(fd, 0) || ftruncate(fd, (off_t)fsize) ||
        pwrite(fd, img, RING_START + ring_len, 0) != (ssize_t)(RING_START + ring_len))
        abort();

    struct jr_recovery r1, r2;
    struct jr_stats s1, s2;
    memset(&s1, 0, sizeof s1);
    memset(&s2, 0, sizeof s2);
    int rc = open_once(0, discard_from, &r1, &s1);
    struct stat stt;
    if (fstat(fd, &stt) || (uint64_t)stt.st_size != fsize) {
        fprintf(stderr, "journal-fuzz: jr_open changed the file's size\n");
        abort();
    }
    if (rc == 0) {
        /* Reopened (no repair this time: it is done) the log must be the same. */
        int rc2 = open_once(0, 0, &r2, &s2);
        if (rc2 == -EBADMSG && exhausted())
            return 0;
        if (rc2 != 0 || r2.end_seq != r1.end_seq || s2.recovered_records != s1.recovered_records ||
            s2.unflushed_records != s1.unflushed_records) {
            fprintf(stderr,
                    "journal-fuzz: reopen differs: rc %d end %llu/%llu recovered %llu/%llu "
                    "unflushed %llu/%llu\n",
                    rc2, (unsigned long long)r1.end_seq, (unsigned long long)r2.end_seq,
                    (unsigned long long)s1.recovered_records,
                    (unsigned long long)s2.recovered_records,
                    (unsigned long long)s1.unflushed_records,
                    (unsigned long long)s2.unflushed_records);
            abort();
        }
        /* the smallest window: only its part of the log is read into memory */
        struct jr_recovery r3;
        struct jr_stats s3;
        memset(&s3, 0, sizeof s3);
        int rc3 = open_once(JR_MEM_MIN, 0, &r3, &s3);
        if (rc3 == -EBADMSG && exhausted())
            return 0;
        if (rc3 != 0 || r3.end_seq != r1.end_seq || s3.recovered_records != s1.recovered_records ||
            r3.dropped != r2.dropped || s3.markers_pending != s2.markers_pending ||
            (!s3.backlog_bytes && s3.unflushed_records != s1.unflushed_records) ||
            s3.unflushed_records > s1.unflushed_records) {
            fprintf(stderr,
                    "journal-fuzz: small window differs: rc %d end %llu/%llu recovered %llu/%llu "
                    "dropped %llu/%llu backlog %llu\n",
                    rc3, (unsigned long long)r1.end_seq, (unsigned long long)r3.end_seq,
                    (unsigned long long)s1.recovered_records,
                    (unsigned long long)s3.recovered_records, (unsigned long long)r2.dropped,
                    (unsigned long long)r3.dropped, (unsigned long long)s3.backlog_bytes);
            abort();
        }
    }
    return 0;
}
