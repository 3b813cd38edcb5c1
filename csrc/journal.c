/* dmsnap ordered journal: implementation of csrc/journal.h.
 *
 * ON-DISK LAYOUT (NV mode; host byte order = little-endian on x86-64)
 * -------------------------------------------------------------------
 *   [0, 4096)      superblock slot 0
 *   [4096, 8192)   superblock slot 1
 *   [8192, 8192 + capacity)   the ring (capacity: multiple of align)
 *
 * Superblock (first 80 bytes of a slot, rest zero):
 *     0 u64 magic        "DMSNJSB1" (JR_SB_MAGIC)
 *     8 u32 version      3 (1: before DISCARD records, 2: before FORGET records;
 *                        both opened and rewritten as 3)
 *    12 u32 align        512 or the device's logical block size (<= 4096)
 *    16 u64 journal_id
 *    24 u64 generation   bumped and written at every jr_open
 *    32 u64 capacity     ring bytes
 *    40 u64 ckpt_seq     first record not yet durable on the dm devices
 *    48 u64 ckpt_pos     its byte position in the ring (0 .. capacity-1)
 *    56 u64 sb_seq       the slot written last holds the highest; slot = sb_seq & 1
 *    64 u64 min_gen      lowest generation a record at the checkpoint may have: that
 *                        record's own generation, or (no record there when the
 *                        superblock was written) the generation writing it. Without
 *                        it a stale record that one recovery rejected (generation
 *                        going down) could be accepted by the next, once the
 *                        checkpoint has moved onto its position.
 *    72 u32 crc          crc32c of bytes 0..71
 *    76 u32 zero
 *
 * Record: a 512-byte header sector, then the data (WRITE) or payload
 * (MARKER; DISCARD has none), then zero padding up to a multiple of 512 and
 * of align. A record never wraps: a PAD record (header only, length = bytes
 * to the end of the ring) fills the tail of the ring instead. Every record, PAD
 * included, takes one sequence number.
 *     0 u64 magic        "DMSNJRC1" (JR_REC_MAGIC)
 *     8 u64 journal_id
 *    16 u64 generation   of the jr_open that wrote it
 *    24 u64 seq
 *    32 u64 offset       WRITE, DISCARD: byte offset in the volume;
 *                        FORGET: the bound (records of vol with a lower seq are dropped)
 *    40 u64 marker_id    MARKER; DISCARD: bytes discarded (> 0, multiple of 512)
 *    48 u32 type         1 WRITE, 2 MARKER, 3 PAD, 4 DISCARD, 5 FORGET
 *    52 u32 vol          WRITE, DISCARD, FORGET: volume id (> 0)
 *    56 u32 len          WRITE: data bytes; MARKER: payload bytes; PAD: record bytes;
 *                        DISCARD, FORGET: 0
 *    60 u32 data_crc     crc32c of the data / payload (0 for PAD, DISCARD, FORGET)
 *    64 u32 ack_lag      seq - (the journal's durable seq when the record was appended)
 *                        + 1: every record below seq + 1 - ack_lag was durable before
 *                        this one existed. 0 in records of versions 1 and 2 (unknown).
 *    68 u32 hdr_crc      crc32c of bytes 0..67
 *    72..511             zero
 *   size(WRITE/MARKER/DISCARD) = roundup(512 + roundup(len, 512), align)
 *
 * Version 2 added DISCARD, version 3 FORGET (jr_forget: a deleted
 * volume's end, honoured by recovery). An earlier journal is read as it is
 * (its records are valid version-3 records) and its superblock is
 * rewritten as version 3 at open; an older program refuses a later
 * superblock instead of ending its recovery at the first record type it
 * does not know and dropping the acknowledged records after it.
 *
 * Recovery starts at (ckpt_seq, ckpt_pos) of the valid superblock with the
 * highest sb_seq and accepts records while: magic and journal_id match,
 * hdr_crc is right, seq is exactly the next one, generation < the new
 * generation and >= that of the previous record (the first: >= min_gen), the type
 * is known, the record fits before the end of the ring (a PAD exactly
 * reaches it), the walk stays within one lap of the ring, and data_crc is
 * right. The first record that fails ends the log; the next append goes
 * there. jr_format zeroes the first ring block, so records of an earlier
 * format never chain on.
 *
 * IN MEMORY
 * ---------
 * The ring is mirrored in RAM at the same offsets as on disk (a 4 KiB-aligned
 * mmap of the ring's size), so a group commit is one pwrite (two when it
 * wraps) from the mirror, up to JR_COMMIT_DEPTH of them in flight with
 * durability acknowledged in order, and the flusher and overlay reads never
 * touch the journal device. Positions are logical byte counters (lpos) that
 * only grow; phys = lpos % capacity.
 *     tail_lpos <= ckpt_lpos <= synced_lpos <= flush_lpos <= durable_lpos <= head_lpos
 * (RAM mode: tail = synced, no checkpoint).
 * Only the live window [tail, head) of the mirror is needed, and it is kept
 * at most j->window bytes (the memory limit; appends wait for room as for a
 * full ring). When the window is smaller than the ring, the mapping is
 * MAP_NORESERVE and the pages behind the tail are given back as the tail
 * moves (set_tail), so resident memory follows the window, not the ring.
 * Recovery reads the ring through a bounded buffer (the scans) or the
 * mirror's own window (the walk), and brings at most one window of the
 * recovered log into memory; the rest, [load_lpos, rec_end_lpos), is the
 * backlog that the flusher loads as the checkpoint makes room (load_more):
 * until it is in, reads wait (the overlay index does not cover it yet) and
 * appends wait for room. The records in [synced, flush)
 * are on their dm devices but not fdatasync()ed yet: kept, since a failed
 * sync has them written again (rewind_flush). Appends reserve space and copy
 * under j->mu. The overlay index is a hash keyed by (vol, 4 KiB block)
 * whose node holds, per 512-byte sector, the seq and data lpos of the
 * newest unflushed record covering it; an entry leaves when that record's
 * dm write completes. A sector absent from the index is therefore current
 * on the dm device, which is what makes jr_read race-free: it copies the
 * covered sectors from the mirror under the lock, then preads the others.
 * An unflushed DISCARD is not in the index (a huge range would need a node
 * per 4 KiB) but in a FIFO list of ranges; appending it clears the index
 * entries in its range (all older), so an entry still present is newer than
 * every listed discard covering it, and a sector with no entry but inside a
 * listed discard reads zeros. A discard leaves the list when the flusher has
 * applied it.
 */
#define _GNU_SOURCE
#include "journal.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* Commits in flight at once (NV). One at a time caps a deep queue at one
 * device round trip per batch; a few overlapping ones let the device work
 * in parallel as it does for fio at the same depth. */
#ifndef JR_COMMIT_DEPTH
#define JR_COMMIT_DEPTH 4
#endif
/* ...but a commit only overlaps another with at least this much to write:
 * smaller bits wait for the one in flight and join the next batch, which
 * costs one round trip instead of a syscall each. */
#ifndef JR_PIPELINE_MIN
#define JR_PIPELINE_MIN (32u << 10)
#endif
/* A writer that finds no commit in flight commits its record itself. */
#ifndef JR_INLINE_COMMIT
#define JR_INLINE_COMMIT 1
#endif

#define JR_SB_MAGIC 0x3142534a4e534d44ULL  /* "DMSNJSB1" */
#define JR_REC_MAGIC 0x3143524a4e534d44ULL /* "DMSNJRC1" */
#define JR_VERSION 3
#define JR_VERSION_MIN 1 /* oldest on-disk version opened (and rewritten as JR_VERSION) */
#define JR_SB_SLOT 4096
#define JR_RING_START 8192
#define JR_HDR 512
#define JR_MIN_CAPACITY 65536
/* sb_seq, generation and seqs only count up from 1: a superblock holding a
 * value near 2^64 is damage (the fuzzer's sb_seq of 2^64-1 made the next
 * superblock written wrap to 0 and lose to the stale slot). A slot at or
 * above JR_COUNTER_MAX is not valid; jr_open refuses to start from one at or
 * above half of it, so that everything it writes stays valid. */
#define JR_COUNTER_MAX (1ULL << 62)

#define REC_WRITE 1
#define REC_MARKER 2
#define REC_PAD 3
#define REC_DISCARD 4
#define REC_FORGET 5

#define BATCH_BYTES (4u << 20) /* coalesce dm writes up to this size */
#define ZERO_BYTES (1u << 20)  /* zero writes of a discard, per pwrite */
#define BATCH_IOV 256
#define IDLE_CKPT_MS 50
#define FORGET_RESERVE 8 /* ring blocks only FORGET records may take (NV) */
#define SCAN_BYTES (1u << 20) /* recovery reads the ring in pieces of this size */
#define PAGE 4096u
#define RETRY_MS 1000

struct sb_disk {
    uint64_t magic;
    uint32_t version;
    uint32_t align;
    uint64_t journal_id;
    uint64_t generation;
    uint64_t capacity;
    uint64_t ckpt_seq;
    uint64_t ckpt_pos;
    uint64_t sb_seq;
    uint64_t min_gen;
    uint32_t crc;
    uint32_t zero;
};
_Static_assert(sizeof(struct sb_disk) == 80, "superblock layout");
_Static_assert(offsetof(struct sb_disk, crc) == 72, "superblock layout");

struct rec_disk {
    uint64_t magic;
    uint64_t journal_id;
    uint64_t generation;
    uint64_t seq;
    uint64_t offset;
    uint64_t marker_id;
    uint32_t type;
    uint32_t vol;
    uint32_t len;
    uint32_t data_crc;
    uint32_t ack_lag;
    uint32_t hdr_crc;
};
_Static_assert(sizeof(struct rec_disk) == 72, "record header layout");
_Static_assert(offsetof(struct rec_disk, hdr_crc) == 68, "record header layout");

/* ------------------------------------------------------------ types */

struct vol {
    uint32_t id;
    int attached;
    int detaching;
    int dfd;        /* O_DIRECT fd or -1 */
    int bfd;        /* buffered fd */
    int use_direct; /* writes/reads through dfd */
    uint64_t size;
    uint64_t forget_seq; /* records of this volume below it are dropped */
    int redo;     /* an fdatasync failed: rewrite its records before redo_end */
    int redo_new; /* it failed just now: rewind_flush() re-indexes all of them */
    uint64_t unflushed;
    uint64_t unflushed_bytes;
    int dirty; /* written since its last fdatasync */
    int busy;  /* fds in use outside the lock */
    int is_blk;     /* a block device (else a regular file: discard punches a hole) */
    uint64_t dgran; /* discard granularity in bytes; 0: no discard (write zeros) */
    uint64_t rec_last; /* recovery: seq of its last WRITE/DISCARD in the log (0: none) */
    /* detached at this head seq: its records before it are never written
     * again by a no-space rewind (the volume was deleted or replaced) */
    uint64_t rewind_floor;
};

/* An unflushed DISCARD (see IN MEMORY above). */
struct dnode {
    struct dnode *next;
    uint64_t seq, off, len;
    uint32_t vol;
};

#define IX_SECT 8 /* sectors per index node: one 4 KiB block */

struct ixnode {
    struct ixnode *next;
    uint64_t blk;
    uint32_t vol;
    uint32_t mask;
    uint64_t seq[IX_SECT];
    uint64_t lpos[IX_SECT];
};

struct jr {
    int mode;
    int fd; /* journal device (NV) */
    int direct;
    uint32_t align;
    uint64_t cap;
    uint64_t journal_id;
    uint64_t generation;
    uint64_t sb_seq;
    uint64_t min_gen; /* of the superblock read at open */
    unsigned char *ring;
    size_t ring_map;
    int is_reg;      /* NV: the journal is a regular file (recovery skips its holes) */
    uint64_t window; /* most bytes [tail, head) may span: the memory limit (<= cap) */
    /* Recovery's backlog (see IN MEMORY): the records in [load_lpos,
     * rec_end_lpos) are not in the mirror yet; load_seq is the first of
     * them, load_gen its generation (the superblock needs it when the
     * checkpoint stands there). load_lpos == rec_end_lpos: no backlog. */
    uint64_t load_lpos, load_seq, load_gen;
    unsigned char *sbbuf; /* JR_SB_SLOT bytes, aligned */

    pthread_mutex_t mu;
    pthread_cond_t cv_commit;   /* committer: records to commit, stop */
    pthread_cond_t cv_flush;    /* flusher: work, marker done, attach, stop */
    pthread_cond_t cv_marker;   /* controller: marker ready, stop */
    pthread_cond_t cv_progress; /* flushed/synced/checkpoint/space/busy moved */
    pthread_t committer[JR_COMMIT_DEPTH], flusher;
    int started, committers_on, flusher_on;
    int draining, drain_req, stopping, stopped;
    int users;

    uint64_t head_seq, head_lpos;
    uint64_t durable_seq, durable_lpos;
    /* Commits in flight (NV): [durable_lpos, submit_lpos) is being written by
     * up to JR_COMMIT_DEPTH committers at once, oldest first in cq[]; durable
     * only moves through the completed prefix, so a write is acknowledged
     * only once every record before it is durable too. */
    uint64_t submit_lpos;
    struct {
        uint64_t end_lpos, end_seq;
        int done;
        /* writers whose record is in this commit (or, for the slot the
         * next commit takes, not submitted yet): woken when durability
         * passes it, so a commit wakes its own writers and not every
         * writer waiting on the journal (a context switch each) */
        pthread_cond_t cv;
    } cq[JR_COMMIT_DEPTH];
    int cq_head, cq_n;
    uint64_t flush_seq, flush_lpos; /* next record for the flusher */
    uint64_t tail_lpos;             /* space before it is free */
    uint64_t synced_seq;            /* records < this are fdatasync()ed on dm */
    uint64_t synced_lpos;           /* ...and its position */
    /* After a failed fdatasync the flusher goes back to synced_seq and
     * writes the records before redo_end again, those of the volumes whose
     * sync failed (v->redo); the others are on their devices already. */
    uint64_t redo_end;
    uint64_t rewinds;
    /* Confirmation (jr_set_confirm): the device below may acknowledge what
     * it then loses (a thin pool that went read-only answers a discard with
     * success and unmaps nothing, and a failed commit rolls its metadata
     * back), so a synced record is durable only once the controller has
     * seen the pool healthy after the sync (jr_confirm_mark, jr_confirm).
     * The checkpoint (NV) and the tail (RAM) never pass conf; a no-space
     * transition (jr_set_no_space) rewinds the flusher to it. Without
     * confirm_on conf follows synced. */
    int confirm_on;
    uint64_t conf_seq, conf_lpos;
    uint64_t mark_seq, mark_lpos, mark_epoch, epoch;
    int rewind_req;
    uint64_t conf_rewinds;
    int sync_now; /* jr_detach: sync what is flushed, wherever the flusher stands */
    uint64_t ckpt_seq, ckpt_lpos;
    uint64_t sync_req;

    int marker_ready;
    uint64_t m_id, m_seq;
    uint32_t m_len;
    unsigned char m_payload[JR_MAX_PAYLOAD];

    uint64_t unflushed_records, unflushed_bytes, markers_pending, recovered_records;
    /* recovery: where the log ended, the generation of its last record, and
     * what was found after it (struct jr_recovery) */
    uint64_t rec_end_lpos, rec_prev_gen;
    struct jr_recovery rec;
    uint64_t appends, commits, dm_writes, full_waits, flush_errors;
    int journal_error, flush_error;
    int no_space; /* jr_set_no_space: the pool below cannot allocate */
    uint32_t flush_error_volume, waiting_volume;
    int full_waiters;

    struct vol **vols;
    int nvols, vols_cap;

    struct ixnode **ixb;
    size_t ixn; /* buckets, power of two */
    size_t ixcount;

    struct dnode *dhead, **dtail; /* unflushed discards, in seq order */
    uint64_t discards, dm_discards;
    unsigned char *zeros; /* ZERO_BYTES of zeros, aligned (flusher only) */
};

/* ------------------------------------------------------------ helpers */

/* Every writer waiting for durability (errors, stop). */
static void wake_durable_all(jr_t *j)
{
    for (int i = 0; i < JR_COMMIT_DEPTH; i++)
        pthread_cond_broadcast(&j->cq[i].cv);
}

static uint64_t round_up(uint64_t x, uint64_t a)
{
    return (x + a - 1) / a * a;
}

static void deadline_in(struct timespec *ts, uint32_t ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

static int deadline_passed(const struct timespec *dl)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec > dl->tv_sec || (now.tv_sec == dl->tv_sec && now.tv_nsec >= dl->tv_nsec);
}

/* Wait on cv until signalled or dl; returns ETIMEDOUT once dl has passed. */
static int wait_until(pthread_cond_t *cv, pthread_mutex_t *mu, const struct timespec *dl)
{
    int rc = pthread_cond_timedwait(cv, mu, dl);
    if (rc == ETIMEDOUT || deadline_passed(dl))
        return ETIMEDOUT;
    return 0;
}

static int cond_init(pthread_cond_t *cv)
{
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    int rc = pthread_cond_init(cv, &a);
    pthread_condattr_destroy(&a);
    return rc;
}

static uint64_t rec_size(const jr_t *j, uint32_t len)
{
    return round_up(JR_HDR + round_up(len, 512), j->align);
}

static struct rec_disk *hdr_at(const jr_t *j, uint64_t lpos)
{
    return (struct rec_disk *)(j->ring + lpos % j->cap);
}

static uint64_t hdr_size(const jr_t *j, const struct rec_disk *h)
{
    return h->type == REC_PAD ? h->len : rec_size(j, h->len);
}

/* Give back the mirror's pages that lie wholly inside the ring bytes of
 * [from, to) (to - from <= cap): their contents are dead. The last page of
 * the mapping ends at ring_map, past cap, so a range reaching the ring's end
 * takes it whole. */
static void ring_release(jr_t *j, uint64_t from, uint64_t to)
{
    while (from < to) {
        uint64_t pa = from % j->cap, pb = pa + (to - from);
        if (pb > j->cap)
            pb = j->cap;
        uint64_t a = round_up(pa, PAGE), b = pb == j->cap ? j->ring_map : pb / PAGE * PAGE;
        if (a < b)
            madvise(j->ring + a, b - a, MADV_DONTNEED);
        from += pb - pa;
    }
}

/* Space before lpos is free (locked; the flusher). When the window is
 * smaller than the ring, the mirror's pages behind the new tail go back to
 * the system here, before anyone can append into them, so that resident
 * memory follows the live window instead of growing to the whole ring. */
static void set_tail(jr_t *j, uint64_t lpos)
{
    uint64_t old = j->tail_lpos;
    j->tail_lpos = lpos;
    if (j->window >= j->cap || lpos <= old)
        return;
    /* the bytes from old's page start are dead too, unless the head has come
     * round the ring to them (a ring filled to the last block) */
    uint64_t k = old % j->cap % PAGE;
    ring_release(j, j->head_lpos + k <= old + j->cap ? old - k : old, lpos);
}

/* Recovered records not in the mirror yet (see IN MEMORY). */
static int backlog(const jr_t *j)
{
    return j->load_lpos < j->rec_end_lpos;
}

/* Records before this seq are in the mirror and may be flushed. */
static uint64_t loaded_seq(const jr_t *j)
{
    return backlog(j) ? j->load_seq : j->durable_seq;
}

static int pwrite_all(int fd, const void *buf, size_t len, uint64_t off)
{
    const unsigned char *p = buf;
    while (len) {
        ssize_t n = pwrite(fd, p, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

static int pread_all(int fd, void *buf, size_t len, uint64_t off)
{
    unsigned char *p = buf;
    while (len) {
        ssize_t n = pread(fd, p, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0) { /* beyond the end of a file: zeros, like a sparse device */
            memset(p, 0, len);
            return 0;
        }
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

static int pwritev_all(int fd, struct iovec *iov, int n, uint64_t off)
{
    while (n > 0) {
        ssize_t w = pwritev(fd, iov, n, (off_t)off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (w == 0)
            return -EIO;
        off += (uint64_t)w;
        while (n > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

/* ------------------------------------------------------------ volumes */

static struct vol *vol_find(const jr_t *j, uint32_t id)
{
    for (int i = 0; i < j->nvols; i++)
        if (j->vols[i]->id == id)
            return j->vols[i];
    return NULL;
}

static struct vol *vol_get(jr_t *j, uint32_t id)
{
    struct vol *v = vol_find(j, id);
    if (v)
        return v;
    if (j->nvols == j->vols_cap) {
        int nc = j->vols_cap ? j->vols_cap * 2 : 16;
        struct vol **nv = realloc(j->vols, (size_t)nc * sizeof *nv);
        if (!nv)
            return NULL;
        j->vols = nv;
        j->vols_cap = nc;
    }
    v = calloc(1, sizeof *v);
    if (!v)
        return NULL;
    v->id = id;
    v->dfd = v->bfd = -1;
    j->vols[j->nvols++] = v;
    return v;
}

static void vol_close_fds(struct vol *v)
{
    if (v->dfd >= 0)
        close(v->dfd);
    if (v->bfd >= 0)
        close(v->bfd);
    v->dfd = v->bfd = -1;
}

/* ------------------------------------------------------------ overlay index */

static size_t ix_hash(const jr_t *j, uint32_t vol, uint64_t blk)
{
    uint64_t x = blk ^ ((uint64_t)vol << 40) ^ vol;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return (size_t)x & (j->ixn - 1);
}

static struct ixnode *ix_find(const jr_t *j, uint32_t vol, uint64_t blk)
{
    for (struct ixnode *n = j->ixb[ix_hash(j, vol, blk)]; n; n = n->next)
        if (n->blk == blk && n->vol == vol)
            return n;
    return NULL;
}

static int ix_grow(jr_t *j)
{
    size_t nn = j->ixn * 2;
    struct ixnode **nb = calloc(nn, sizeof *nb);
    if (!nb)
        return -ENOMEM;
    struct ixnode **ob = j->ixb;
    size_t on = j->ixn;
    j->ixb = nb;
    j->ixn = nn;
    for (size_t i = 0; i < on; i++) {
        struct ixnode *n = ob[i];
        while (n) {
            struct ixnode *next = n->next;
            size_t h = ix_hash(j, n->vol, n->blk);
            n->next = nb[h];
            nb[h] = n;
            n = next;
        }
    }
    free(ob);
    return 0;
}

/* Sectors [off, off+len) of vol now read from the record (seq) whose data
 * starts at data_lpos. */
static int ix_insert(jr_t *j, uint32_t vol, uint64_t off, uint32_t len, uint64_t seq,
                     uint64_t data_lpos)
{
    uint64_t s = off / 512, e = (off + len) / 512;
    while (s < e) {
        uint64_t blk = s / IX_SECT;
        struct ixnode *n = ix_find(j, vol, blk);
        if (!n) {
            if (j->ixcount >= j->ixn * 2 && ix_grow(j) < 0)
                return -ENOMEM;
            n = calloc(1, sizeof *n);
            if (!n)
                return -ENOMEM;
            n->vol = vol;
            n->blk = blk;
            size_t h = ix_hash(j, vol, blk);
            n->next = j->ixb[h];
            j->ixb[h] = n;
            j->ixcount++;
        }
        for (; s < e && s / IX_SECT == blk; s++) {
            unsigned i = (unsigned)(s % IX_SECT);
            n->seq[i] = seq;
            n->lpos[i] = data_lpos + (s * 512 - off);
            n->mask |= 1u << i;
        }
    }
    return 0;
}

static void ix_unlink(jr_t *j, struct ixnode *n)
{
    struct ixnode **pp = &j->ixb[ix_hash(j, n->vol, n->blk)];
    while (*pp != n)
        pp = &(*pp)->next;
    *pp = n->next;
    free(n);
    j->ixcount--;
}

/* The record seq has completed on dm: drop the entries still pointing at it. */
static void ix_remove(jr_t *j, uint32_t vol, uint64_t off, uint32_t len, uint64_t seq)
{
    uint64_t s = off / 512, e = (off + len) / 512;
    while (s < e) {
        uint64_t blk = s / IX_SECT;
        struct ixnode *n = ix_find(j, vol, blk);
        for (; s < e && s / IX_SECT == blk; s++) {
            unsigned i = (unsigned)(s % IX_SECT);
            if (n && (n->mask & (1u << i)) && n->seq[i] == seq)
                n->mask &= ~(1u << i);
        }
        if (n && !n->mask)
            ix_unlink(j, n);
    }
}

static void ix_drop_vol(jr_t *j, uint32_t vol)
{
    for (size_t i = 0; i < j->ixn; i++) {
        struct ixnode **pp = &j->ixb[i];
        while (*pp) {
            struct ixnode *n = *pp;
            if (n->vol == vol) {
                *pp = n->next;
                free(n);
                j->ixcount--;
            } else {
                pp = &n->next;
            }
        }
    }
}

/* The sectors of block blk inside [s0, e0), as an index node mask. */
static uint32_t ix_mask(uint64_t blk, uint64_t s0, uint64_t e0)
{
    uint64_t a = blk * IX_SECT, b = a + IX_SECT;
    if (a < s0)
        a = s0;
    if (b > e0)
        b = e0;
    if (a >= b)
        return 0;
    return ((1u << (b - a)) - 1) << (a - blk * IX_SECT);
}

/* Drop the entries of vol in [off, off+len) older than seq (below). */
static void ix_clear_below(jr_t *j, uint32_t vol, uint64_t off, uint64_t len, uint64_t below);

/* A discard of [off, off+len) of vol is being appended: every entry in the
 * range is older than it, so drop them (the discard list answers there). */
static void ix_clear(jr_t *j, uint32_t vol, uint64_t off, uint64_t len)
{
    ix_clear_below(j, vol, off, len, UINT64_MAX);
}

/* The entries of node n in mask older than below, as a mask. */
static uint32_t ix_older(const struct ixnode *n, uint32_t mask, uint64_t below)
{
    uint32_t out = 0;
    for (unsigned i = 0; i < IX_SECT; i++)
        if ((mask & (1u << i)) && n->seq[i] < below)
            out |= 1u << i;
    return out;
}

static void ix_clear_below(jr_t *j, uint32_t vol, uint64_t off, uint64_t len, uint64_t below)
{
    if (!j->ixcount)
        return;
    uint64_t s0 = off / 512, e0 = (off + len) / 512;
    uint64_t b0 = s0 / IX_SECT, b1 = (e0 + IX_SECT - 1) / IX_SECT;
    if (b1 - b0 > j->ixn) { /* a large range: walk the nodes, not the blocks */
        for (size_t i = 0; i < j->ixn; i++) {
            struct ixnode **pp = &j->ixb[i];
            while (*pp) {
                struct ixnode *n = *pp;
                if (n->vol == vol)
                    n->mask &= ~ix_older(n, n->mask & ix_mask(n->blk, s0, e0), below);
                if (!n->mask) {
                    *pp = n->next;
                    free(n);
                    j->ixcount--;
                } else {
                    pp = &n->next;
                }
            }
        }
        return;
    }
    for (uint64_t b = b0; b < b1; b++) {
        struct ixnode *n = ix_find(j, vol, b);
        if (!n)
            continue;
        n->mask &= ~ix_older(n, n->mask & ix_mask(b, s0, e0), below);
        if (!n->mask)
            ix_unlink(j, n);
    }
}

/* ------------------------------------------------------------ discard list */

static void dl_unlink(jr_t *j, struct dnode **pp)
{
    struct dnode *d = *pp;
    *pp = d->next;
    if (j->dtail == &d->next)
        j->dtail = pp;
    free(d);
}

static void dl_remove(jr_t *j, uint64_t seq)
{
    for (struct dnode **pp = &j->dhead; *pp; pp = &(*pp)->next)
        if ((*pp)->seq == seq) {
            dl_unlink(j, pp);
            return;
        }
}

static void dl_drop_vol(jr_t *j, uint32_t vol)
{
    struct dnode **pp = &j->dhead;
    while (*pp) {
        if ((*pp)->vol == vol)
            dl_unlink(j, pp);
        else
            pp = &(*pp)->next;
    }
}

/* Record a discard (locked; after its space is reserved, before put_record). */
static int dl_add(jr_t *j, uint32_t vol, uint64_t off, uint64_t len, uint64_t seq)
{
    struct dnode *d = calloc(1, sizeof *d);
    if (!d)
        return -ENOMEM;
    d->vol = vol;
    d->off = off;
    d->len = len;
    d->seq = seq;
    ix_clear(j, vol, off, len);
    *j->dtail = d;
    j->dtail = &d->next;
    return 0;
}

static void ix_free(jr_t *j)
{
    if (!j->ixb)
        return;
    for (size_t i = 0; i < j->ixn; i++) {
        struct ixnode *n = j->ixb[i];
        while (n) {
            struct ixnode *next = n->next;
            free(n);
            n = next;
        }
    }
    free(j->ixb);
    j->ixb = NULL;
}

/* ------------------------------------------------------------ superblock */

static void sb_fill(unsigned char *buf, uint32_t align, uint64_t journal_id, uint64_t generation,
                    uint64_t cap, uint64_t ckpt_seq, uint64_t ckpt_pos, uint64_t sb_seq,
                    uint64_t min_gen)
{
    struct sb_disk sb = {
        .magic = JR_SB_MAGIC,
        .version = JR_VERSION,
        .align = align,
        .journal_id = journal_id,
        .generation = generation,
        .capacity = cap,
        .ckpt_seq = ckpt_seq,
        .ckpt_pos = ckpt_pos,
        .sb_seq = sb_seq,
        .min_gen = min_gen,
    };
    sb.crc = jr_crc32c(&sb, offsetof(struct sb_disk, crc));
    memset(buf, 0, JR_SB_SLOT);
    memcpy(buf, &sb, sizeof sb);
}

static int sb_valid(const struct sb_disk *sb)
{
    return sb->magic == JR_SB_MAGIC && sb->version >= JR_VERSION_MIN && sb->version <= JR_VERSION &&
           sb->crc == jr_crc32c(sb, offsetof(struct sb_disk, crc)) && sb->align >= 512 &&
           sb->align <= 4096 && !(sb->align & (sb->align - 1)) && sb->capacity >= JR_MIN_CAPACITY &&
           sb->capacity % sb->align == 0 && sb->ckpt_pos < sb->capacity &&
           sb->ckpt_pos % sb->align == 0 && sb->ckpt_seq >= 1 && sb->min_gen >= 1 &&
           sb->min_gen <= sb->generation + 1 && sb->sb_seq < JR_COUNTER_MAX &&
           sb->generation < JR_COUNTER_MAX && sb->ckpt_seq < JR_COUNTER_MAX;
}

/* Write the superblock with checkpoint (seq, lpos) to the next slot. Called
 * by jr_open before the threads run, then only by the flusher; drops the
 * lock around the write when locked. */
static int sb_write(jr_t *j, uint64_t seq, uint64_t lpos, int locked)
{
    uint64_t sbs = j->sb_seq + 1;
    /* the record at the checkpoint (appended, so its header is in the
     * mirror, unless it is the first of the recovery's backlog) or, if none
     * yet, the next one: written by this generation */
    uint64_t min_gen = seq >= j->head_seq             ? j->generation
                       : backlog(j) && lpos == j->load_lpos ? j->load_gen
                                                          : hdr_at(j, lpos)->generation;
    sb_fill(j->sbbuf, j->align, j->journal_id, j->generation, j->cap, seq, lpos % j->cap, sbs,
            min_gen);
    if (locked)
        pthread_mutex_unlock(&j->mu);
    int rc = pwrite_all(j->fd, j->sbbuf, JR_SB_SLOT, (sbs & 1) * JR_SB_SLOT);
    if (locked)
        pthread_mutex_lock(&j->mu);
    if (rc < 0) {
        if (!j->journal_error)
            j->journal_error = rc;
        wake_durable_all(j);
        pthread_cond_broadcast(&j->cv_progress);
        return rc;
    }
    j->sb_seq = sbs;
    return 0;
}

/* ------------------------------------------------------------ format */

static int dev_geometry(int fd, uint64_t *size, uint32_t *lbs, int *is_blk)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    *is_blk = S_ISBLK(st.st_mode);
    if (*is_blk) {
        int ss = 512;
        if (ioctl(fd, BLKGETSIZE64, size) < 0)
            return -errno;
        if (ioctl(fd, BLKSSZGET, &ss) < 0)
            return -errno;
        *lbs = (uint32_t)ss;
    } else if (S_ISREG(st.st_mode)) {
        *size = (uint64_t)st.st_size;
        *lbs = 512;
    } else {
        return -EINVAL;
    }
    return 0;
}

int jr_format(const char *path, uint64_t size, uint32_t align, uint64_t journal_id)
{
    if (!path)
        return -EINVAL;
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
        return -errno;
    uint64_t dsize = 0;
    uint32_t lbs = 512;
    int is_blk = 0, rc = dev_geometry(fd, &dsize, &lbs, &is_blk);
    unsigned char *buf = NULL;
    if (rc < 0)
        goto out;
    if (!align)
        align = lbs;
    rc = -EINVAL;
    if (align < 512 || align > 4096 || (align & (align - 1)) || align < lbs)
        goto out;
    if (!size)
        size = dsize;
    if (is_blk && size > dsize)
        goto out;
    if (size < JR_RING_START + JR_MIN_CAPACITY)
        goto out;
    if (!is_blk && dsize < size && ftruncate(fd, (off_t)size) < 0) {
        rc = -errno;
        goto out;
    }
    uint64_t cap = (size - JR_RING_START) / align * align;
    if (!journal_id) {
        while (!journal_id)
            if (getrandom(&journal_id, sizeof journal_id, 0) != sizeof journal_id) {
                rc = -EIO;
                goto out;
            }
    }
    if (posix_memalign((void **)&buf, 4096, JR_RING_START + 4096)) {
        buf = NULL;
        rc = -ENOMEM;
        goto out;
    }
    memset(buf, 0, JR_RING_START + 4096);
    sb_fill(buf, align, journal_id, 0, cap, 1, 0, 1, 1);
    /* slot 1 stays zero (invalid), whatever an earlier format left there */
    /* both slots plus the first ring block (zeroed: no earlier log chains on) */
    rc = pwrite_all(fd, buf, JR_RING_START + 4096, 0);
    if (rc == 0 && fsync(fd) < 0)
        rc = -errno;
out:
    free(buf);
    close(fd);
    return rc;
}

/* ------------------------------------------------------------ open / recovery */

static void jr_free_all(jr_t *j)
{
    ix_free(j);
    while (j->dhead)
        dl_unlink(j, &j->dhead);
    if (j->zeros)
        munmap(j->zeros, ZERO_BYTES);
    for (int i = 0; i < j->nvols; i++) {
        vol_close_fds(j->vols[i]);
        free(j->vols[i]);
    }
    free(j->vols);
    if (j->ring)
        munmap(j->ring, j->ring_map);
    free(j->sbbuf);
    if (j->fd >= 0)
        close(j->fd);
    pthread_mutex_destroy(&j->mu);
    pthread_cond_destroy(&j->cv_commit);
    for (int i = 0; i < JR_COMMIT_DEPTH; i++)
        pthread_cond_destroy(&j->cq[i].cv);
    pthread_cond_destroy(&j->cv_flush);
    pthread_cond_destroy(&j->cv_marker);
    pthread_cond_destroy(&j->cv_progress);
    free(j);
}

static int ring_alloc(jr_t *j)
{
    j->ring_map = round_up(j->cap, PAGE);
    /* only the live window is ever resident (set_tail): reserve no swap or
     * commit charge for the rest of a large ring */
    int noreserve = j->window < j->cap ? MAP_NORESERVE : 0;
    void *p = mmap(NULL, j->ring_map, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | noreserve, -1, 0);
    if (p == MAP_FAILED) {
        j->ring = NULL;
        return -ENOMEM;
    }
    j->ring = p;
    return 0;
}

static int journal_open_fd(jr_t *j, const char *path)
{
    j->fd = open(path, O_RDWR | O_DIRECT | O_DSYNC | O_CLOEXEC);
    j->direct = 1;
    if (j->fd < 0 && errno == EINVAL) {
        j->fd = open(path, O_RDWR | O_DSYNC | O_CLOEXEC);
        j->direct = 0;
    }
    return j->fd < 0 ? -errno : 0;
}

/* O_DIRECT may be accepted by open and refused by the first I/O. */
static int journal_direct_fallback(jr_t *j, const char *path)
{
    close(j->fd);
    j->fd = open(path, O_RDWR | O_DSYNC | O_CLOEXEC);
    j->direct = 0;
    return j->fd < 0 ? -errno : 0;
}

/* Drop vol's unflushed records below bound (locked): they leave the
 * overlay and the flusher skips them. Every indexed record of vol is below
 * bound when called (at jr_forget: bound is the head; at recovery the
 * records at or after it are indexed later). */
static void forget_vol(jr_t *j, struct vol *v, uint64_t bound)
{
    if (bound > v->forget_seq)
        v->forget_seq = bound;
    /* its writes so far need not reach the device: no sync (jr_detach)
     * or rewrite waits for them */
    v->dirty = v->redo = v->redo_new = 0;
    ix_drop_vol(j, v->id);
    dl_drop_vol(j, v->id);
    j->unflushed_records -= v->unflushed;
    j->unflushed_bytes -= v->unflushed_bytes;
    v->unflushed = v->unflushed_bytes = 0;
}

/* The size of the record at lpos if its header continues the log there (see
 * the recovery rules at the top; the data's checksum is rec_data_ok's), else
 * 0. start: the walk's first position. */
static uint64_t rec_check(const jr_t *j, uint64_t lpos, uint64_t seq, uint64_t prev_gen,
                          uint64_t start)
{
    if (lpos - start >= j->cap)
        return 0;
    const struct rec_disk *h = hdr_at(j, lpos);
    uint64_t phys = lpos % j->cap, room = j->cap - phys, size;
    if (h->magic != JR_REC_MAGIC || h->journal_id != j->journal_id || h->seq != seq)
        return 0;
    if (h->hdr_crc != jr_crc32c(h, offsetof(struct rec_disk, hdr_crc)))
        return 0;
    if (h->generation < prev_gen || h->generation >= j->generation)
        return 0;
    if (h->type == REC_PAD) {
        if (h->len != room)
            return 0;
        size = room;
    } else if (h->type == REC_WRITE || h->type == REC_MARKER) {
        if (h->type == REC_WRITE &&
            (!h->vol || !h->len || h->len % 512 || h->len > JR_MAX_IO || h->offset % 512))
            return 0;
        if (h->type == REC_MARKER && (h->len > JR_MAX_PAYLOAD || !h->marker_id))
            return 0;
        size = rec_size(j, h->len);
    } else if (h->type == REC_DISCARD) {
        if (!h->vol || h->len || h->data_crc || !h->marker_id || h->marker_id % 512 ||
            h->offset % 512 || h->offset + h->marker_id < h->offset)
            return 0;
        size = rec_size(j, 0);
    } else if (h->type == REC_FORGET) {
        if (!h->vol || h->len || h->data_crc || h->marker_id || h->offset > h->seq)
            return 0;
        size = rec_size(j, 0);
    } else {
        return 0;
    }
    if (size > room || lpos + size - start > j->cap)
        return 0;
    return size;
}

/* The data (WRITE) or payload (MARKER) of a record rec_check accepted,
 * whole in the mirror, is intact. */
static int rec_data_ok(const struct rec_disk *h)
{
    if (h->type != REC_WRITE && h->type != REC_MARKER)
        return 1;
    return jr_crc32c((const unsigned char *)h + JR_HDR, h->len) == h->data_crc;
}

/* Recovery's walk: the mirror holds the ring's bytes up to upto, read from
 * *fill on in SCAN_BYTES pieces (never past stop: one lap from the start). */
static int ring_fill(jr_t *j, uint64_t *fill, uint64_t upto, uint64_t stop)
{
    while (*fill < upto && *fill < stop) {
        uint64_t phys = *fill % j->cap, n = SCAN_BYTES;
        if (n > j->cap - phys)
            n = j->cap - phys;
        if (n > stop - *fill)
            n = stop - *fill;
        int rc = pread_all(j->fd, j->ring + phys, n, JR_RING_START + phys);
        if (rc < 0)
            return rc;
        *fill += n;
    }
    return 0;
}

/* A recovered record, in the mirror at lpos, becomes an unflushed record
 * for the flusher and the overlay (unless its volume was forgotten after it). */
static int index_record(jr_t *j, const struct rec_disk *h, uint64_t lpos)
{
    if (h->type != REC_WRITE && h->type != REC_DISCARD)
        return 0;
    struct vol *v = vol_get(j, h->vol);
    if (!v)
        return -ENOMEM;
    if (h->seq < v->forget_seq)
        return 0; /* the volume was deleted after this record */
    int rc = h->type == REC_WRITE ? ix_insert(j, h->vol, h->offset, h->len, h->seq, lpos + JR_HDR)
                                  : dl_add(j, h->vol, h->offset, h->marker_id, h->seq);
    if (rc < 0)
        return rc;
    v->unflushed++;
    j->unflushed_records++;
    if (h->type == REC_WRITE) {
        v->unflushed_bytes += h->len;
        j->unflushed_bytes += h->len;
    }
    return 0;
}

static int recover(jr_t *j, uint64_t discard_from)
{
    uint64_t start = j->ckpt_lpos, lpos = start, seq = j->ckpt_seq, prev_gen = j->min_gen, size;
    /* the walk reads the ring into the mirror as it goes (fill); records
     * past the first window's worth are only checked, their pages given back
     * behind the walk (rel), and loaded again later by the flusher */
    uint64_t fill = start, stop = start + j->cap, rel = start;
    int in_window = 1, rc;
    j->load_lpos = start;
    j->load_seq = seq;
    /* first pass: the extent of the log, and where each forgotten volume
     * ends (a FORGET drops its volume's records before its bound, also
     * those earlier in this walk) */
    while (!discard_from || seq < discard_from) {
        if (lpos - start >= j->cap)
            break;
        if ((rc = ring_fill(j, &fill, lpos + JR_HDR, stop)) < 0)
            return rc;
        if (!(size = rec_check(j, lpos, seq, prev_gen, start)))
            break;
        if ((rc = ring_fill(j, &fill, lpos + size, stop)) < 0)
            return rc;
        const struct rec_disk *h = hdr_at(j, lpos);
        if (!rec_data_ok(h))
            break;
        if (h->type == REC_FORGET || h->type == REC_WRITE || h->type == REC_DISCARD) {
            struct vol *v = vol_get(j, h->vol);
            if (!v)
                return -ENOMEM;
            if (h->type != REC_FORGET)
                v->rec_last = h->seq;
            else if (h->offset > v->forget_seq)
                v->forget_seq = h->offset;
        } else if (h->type == REC_MARKER) {
            j->markers_pending++;
        }
        j->recovered_records++;
        prev_gen = h->generation;
        if (in_window && lpos + size - start > j->window) {
            in_window = 0; /* the backlog starts here */
            j->load_gen = h->generation;
        }
        lpos += size;
        seq++;
        if (in_window) {
            j->load_lpos = rel = lpos;
            j->load_seq = seq;
        } else if (lpos - rel >= SCAN_BYTES) {
            ring_release(j, rel, lpos);
            uint64_t pg = lpos - lpos % j->cap % PAGE; /* dead from its page's start */
            rel = pg > j->load_lpos ? pg : j->load_lpos;
        }
    }
    ring_release(j, rel, fill); /* what was read past the window or the end */
    uint64_t end = lpos;
    j->rec_end_lpos = end;
    j->rec_prev_gen = prev_gen;
    j->rec.end_seq = seq;
    /* second pass: index what is in the mirror for the flusher to replay */
    for (lpos = start; lpos < j->load_lpos; lpos += hdr_size(j, hdr_at(j, lpos)))
        if ((rc = index_record(j, hdr_at(j, lpos), lpos)) < 0)
            return rc;
    j->head_lpos = j->durable_lpos = j->submit_lpos = end;
    j->head_seq = j->durable_seq = seq;
    return 0;
}

/* The flusher has reached the backlog (locked): bring the next records into
 * the mirror, as many as the window has room for behind the tail, indexed as
 * at open. Returns 1 if some came in, 0 if the window is full (the
 * checkpoint must move first), or -errno (a read error, or the ring no
 * longer holds what recovery found there: the journal changed under us). */
static int load_more(jr_t *j)
{
    uint64_t from = j->load_lpos, end = j->rec_end_lpos;
    /* one block past the window: the next record's header, whose
     * generation the superblock needs if the checkpoint stops before it */
    uint64_t to = j->tail_lpos + j->window + j->align, fill = from;
    if (to < from + j->align) /* the window was lowered meanwhile */
        to = from + j->align;
    if (to > end)
        to = end;
    pthread_mutex_unlock(&j->mu); /* nobody else touches the ring past the load point */
    int rc = ring_fill(j, &fill, to, to);
    pthread_mutex_lock(&j->mu);
    if (rc < 0)
        return rc;
    int loaded = 0;
    while (j->load_lpos < end) {
        uint64_t lp = j->load_lpos, size = rec_check(j, lp, j->load_seq, j->load_gen, lp);
        const struct rec_disk *h = hdr_at(j, lp);
        if (!size || h->generation != j->load_gen)
            return -EIO;
        if (lp + size - j->tail_lpos > j->window)
            break;
        if (!rec_data_ok(h))
            return -EIO;
        if ((rc = index_record(j, h, lp)) < 0)
            return rc;
        j->load_lpos = lp + size;
        j->load_seq++;
        loaded = 1;
        if (j->load_lpos < end)
            j->load_gen = hdr_at(j, j->load_lpos)->generation;
    }
    if (!backlog(j))
        pthread_cond_broadcast(&j->cv_progress); /* readers wait for this */
    /* an empty window too small for the next record (the minimum limit
     * holds two of the largest): an error rather than a flusher spinning */
    if (!loaded && j->load_lpos == j->tail_lpos)
        return -EFBIG;
    return loaded;
}

/* Recovery's scans of the ring: every block in [from, to) (lpos, at most a
 * lap) that starts like a record header of this journal (magic, journal
 * id) goes to fn, read through buf (SCAN_BYTES) rather than the mirror, so
 * that a scan of the whole ring takes no more memory than that. A regular
 * file's holes hold no record and are skipped. */
typedef int (*scan_fn)(jr_t *j, const struct rec_disk *h, uint64_t lpos, void *ctx);

static int scan_ring(jr_t *j, unsigned char *buf, uint64_t from, uint64_t to, scan_fn fn, void *ctx)
{
    for (uint64_t p = from; p < to;) {
        uint64_t phys = p % j->cap, lim = j->cap - phys, n = SCAN_BYTES;
        if (lim > to - p)
            lim = to - p;
        if (j->is_reg) {
            off_t d = lseek(j->fd, (off_t)(JR_RING_START + phys), SEEK_DATA);
            uint64_t skip = lim; /* ENXIO: a hole to the end of the file */
            if (d >= 0)
                skip = ((uint64_t)d - JR_RING_START - phys) / j->align * j->align;
            if (d >= 0 || errno == ENXIO) {
                if (skip > lim)
                    skip = lim;
                if (skip) {
                    p += skip;
                    continue;
                }
            }
        }
        if (n > lim)
            n = lim;
        int rc = pread_all(j->fd, buf, n, JR_RING_START + phys);
        if (rc < 0)
            return rc;
        for (uint64_t o = 0; o < n; o += j->align) {
            const struct rec_disk *h = (const struct rec_disk *)(buf + o);
            if (h->magic == JR_REC_MAGIC && h->journal_id == j->journal_id &&
                (rc = fn(j, h, p + o, ctx)) < 0)
                return rc;
        }
        p += n;
    }
    return 0;
}

/* A record of this journal with a generation the superblock has not
 * reached (the newest superblock slot was lost and an older one won) was
 * written by an open whose superblock we cannot see: our generation goes
 * past it, or records of two opens would share one and a later recovery
 * would judge the ring differently from this one (the fuzzer's image opened
 * once and was refused -EUCLEAN at the next open). */
static int scan_generation(jr_t *j, const struct rec_disk *h, uint64_t lpos, void *ctx)
{
    (void)lpos;
    (void)ctx;
    if (h->generation >= j->generation && h->generation < JR_COUNTER_MAX / 2 &&
        h->hdr_crc == jr_crc32c(h, offsetof(struct rec_disk, hdr_crc)))
        j->generation = h->generation + 1;
    return 0;
}

struct after_end {
    int corrupt, zap;
};

static int scan_after(jr_t *j, const struct rec_disk *h, uint64_t lpos, void *ctx)
{
    struct after_end *a = ctx;
    uint64_t end_seq = j->rec.end_seq, max_recs = j->cap / j->align;
    if (h->seq < end_seq || h->seq - end_seq >= max_recs || h->generation < j->rec_prev_gen ||
        h->generation >= j->generation || h->type < REC_WRITE || h->type > REC_FORGET ||
        h->hdr_crc != jr_crc32c(h, offsetof(struct rec_disk, hdr_crc)))
        return 0;
    j->rec.dropped++;
    if (h->seq > j->rec.last_seq)
        j->rec.last_seq = h->seq;
    if (h->ack_lag && h->seq + 1 - h->ack_lag > end_seq)
        a->corrupt = 1;
    if (a->zap) /* past the log's end: not in the mirror's live part */
        return pwrite_all(j->fd, j->zeros, j->align, JR_RING_START + lpos % j->cap);
    return 0;
}

/* After recovery: the records of this journal after the log's end (same
 * journal id, header crc right, a known type, generation in range, a seq at
 * or after the end that the ring could hold). Counted in j->rec; one that
 * was appended when the end's record was durable already means that record
 * was acknowledged and is damaged: returns 1 (corruption in the middle of
 * the log), else 0 (a torn tail: records of commits in flight at a crash).
 * With zap, their headers are zeroed on disk so they never count again. */
static int scan_after_end(jr_t *j, unsigned char *buf, int zap)
{
    struct after_end a = {.corrupt = 0, .zap = zap};
    j->rec.dropped = j->rec.last_seq = 0;
    int rc = scan_ring(j, buf, j->rec_end_lpos, j->ckpt_lpos + j->cap, scan_after, &a);
    return rc < 0 ? rc : a.corrupt;
}

static jr_t *jr_alloc(void)
{
    jr_t *j = calloc(1, sizeof *j);
    if (!j)
        return NULL;
    j->fd = -1;
    pthread_mutex_init(&j->mu, NULL);
    cond_init(&j->cv_commit);
    for (int i = 0; i < JR_COMMIT_DEPTH; i++)
        cond_init(&j->cq[i].cv);
    cond_init(&j->cv_flush);
    cond_init(&j->cv_marker);
    cond_init(&j->cv_progress);
    j->ixn = 1024;
    j->ixb = calloc(j->ixn, sizeof *j->ixb);
    j->dtail = &j->dhead;
    if (posix_memalign((void **)&j->sbbuf, 4096, 2 * JR_SB_SLOT))
        j->sbbuf = NULL;
    /* an anonymous mapping is zero and page-aligned without touching 1 MiB
     * at every open (only pwrite reads it: the pages stay the shared zero page) */
    j->zeros = mmap(NULL, ZERO_BYTES, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (j->zeros == MAP_FAILED)
        j->zeros = NULL;
    if (!j->ixb || !j->sbbuf || !j->zeros) {
        jr_free_all(j);
        return NULL;
    }
    return j;
}

int jr_open(const char *path, int mode, uint64_t ram_size, jr_t **out)
{
    return jr_open_ex(path, mode, ram_size, 0, 0, NULL, out);
}

/* The live window a memory limit allows in a ring of cap bytes (the one
 * place the limit becomes a size). A ring that fits whole (with a page of
 * margin) is held whole; a smaller window stays two pages short of the ring,
 * so that set_tail's page rounding never reaches the head's next lap. */
static uint64_t window_for(uint64_t cap, uint32_t align, uint64_t mem_limit)
{
    if (!mem_limit)
        mem_limit = JR_MEM_DEFAULT;
    if (mem_limit + 2 * PAGE >= cap)
        return cap;
    return mem_limit / align * align;
}

int jr_open_ex(const char *path, int mode, uint64_t ram_size, uint64_t mem_limit,
               uint64_t discard_from, struct jr_recovery *info, jr_t **out)
{
    if (!out || (mode != JR_NV && mode != JR_RAM) || (discard_from && mode != JR_NV) ||
        (mode == JR_NV && mem_limit && mem_limit < JR_MEM_MIN))
        return -EINVAL;
    *out = NULL;
    if (info)
        memset(info, 0, sizeof *info);
    (void)jr_crc32c_impl(); /* choose the implementation now, not on a first write */
    if (mode == JR_RAM) {
        uint64_t cap = ram_size / 512 * 512;
        if (cap < JR_MIN_CAPACITY || path)
            return -EINVAL;
        jr_t *j = jr_alloc();
        if (!j)
            return -ENOMEM;
        j->mode = JR_RAM;
        j->align = 512;
        j->cap = cap;
        j->generation = 1;
        j->head_seq = j->durable_seq = j->flush_seq = j->synced_seq = j->ckpt_seq = 1;
        j->conf_seq = j->mark_seq = 1;
        j->window = cap; /* ram_size is the memory it was given */
        if (ring_alloc(j) < 0) {
            jr_free_all(j);
            return -ENOMEM;
        }
        *out = j;
        return 0;
    }
    if (!path)
        return -EINVAL;
    jr_t *j = jr_alloc();
    if (!j)
        return -ENOMEM;
    j->mode = JR_NV;
    unsigned char *scan = NULL; /* recovery's read buffer (SCAN_BYTES) */
    int rc = journal_open_fd(j, path);
    if (rc < 0)
        goto fail;
    rc = pread_all(j->fd, j->sbbuf, 2 * JR_SB_SLOT, 0);
    if (rc == -EINVAL && j->direct) {
        rc = journal_direct_fallback(j, path);
        if (rc == 0)
            rc = pread_all(j->fd, j->sbbuf, 2 * JR_SB_SLOT, 0);
    }
    if (rc < 0)
        goto fail;
    struct sb_disk s0, s1, *sb = NULL;
    memcpy(&s0, j->sbbuf, sizeof s0);
    memcpy(&s1, j->sbbuf + JR_SB_SLOT, sizeof s1);
    if (sb_valid(&s0))
        sb = &s0;
    if (sb_valid(&s1) && (!sb || s1.sb_seq > sb->sb_seq))
        sb = &s1;
    rc = -EBADMSG;
    if (!sb) {
        /* a superblock intact but of a later format: say so, not "no journal" */
        for (int i = 0; i < 2; i++) {
            const struct sb_disk *x = i ? &s1 : &s0;
            if (x->magic == JR_SB_MAGIC && x->version > JR_VERSION &&
                x->crc == jr_crc32c(x, offsetof(struct sb_disk, crc)))
                rc = -EPROTONOSUPPORT;
        }
        goto fail;
    }
    if (sb->sb_seq >= JR_COUNTER_MAX / 2 || sb->generation >= JR_COUNTER_MAX / 2 ||
        sb->ckpt_seq >= JR_COUNTER_MAX / 2)
        goto fail; /* -EBADMSG: damage, see JR_COUNTER_MAX */
    uint64_t dsize = 0;
    uint32_t lbs = 512;
    int is_blk = 0;
    rc = dev_geometry(j->fd, &dsize, &lbs, &is_blk);
    if (rc < 0)
        goto fail;
    rc = -EBADMSG;
    if (dsize < JR_RING_START + sb->capacity || sb->align < lbs)
        goto fail;
    j->align = sb->align;
    j->cap = sb->capacity;
    j->journal_id = sb->journal_id;
    j->generation = sb->generation + 1;
    j->sb_seq = sb->sb_seq;
    j->min_gen = sb->min_gen;
    j->ckpt_seq = j->synced_seq = j->flush_seq = sb->ckpt_seq;
    j->ckpt_lpos = j->tail_lpos = j->flush_lpos = j->synced_lpos = sb->ckpt_pos;
    j->conf_seq = j->mark_seq = sb->ckpt_seq; /* before the checkpoint: durable below */
    j->conf_lpos = j->mark_lpos = sb->ckpt_pos;
    j->window = window_for(j->cap, j->align, mem_limit);
    j->is_reg = !is_blk;
    rc = ring_alloc(j);
    if (rc < 0)
        goto fail;
    rc = -ENOMEM;
    scan = mmap(NULL, SCAN_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (scan == MAP_FAILED) {
        scan = NULL;
        goto fail;
    }
    rc = scan_ring(j, scan, 0, j->cap, scan_generation, NULL);
    if (rc < 0)
        goto fail;
    rc = -EINVAL;
    if (discard_from && discard_from < j->ckpt_seq) {
        if (info) /* the records before the checkpoint are on the volumes already */
            info->end_seq = j->ckpt_seq;
        goto fail;
    }
    rc = recover(j, discard_from);
    if (rc < 0)
        goto fail;
    int cut = discard_from && j->rec.end_seq == discard_from;
    rc = scan_after_end(j, scan, 0);
    if (rc == 1 && !cut) {
        /* acknowledged records follow a damaged one: never drop them
         * silently; jr_open_ex with discard_from drops them on request */
        j->rec.bad_seq = j->rec.end_seq;
        rc = discard_from ? -ERANGE : -EUCLEAN;
    } else if (rc >= 0 && discard_from) {
        rc = scan_after_end(j, scan, 1);
        if (rc == -EINVAL && j->direct) {
            rc = journal_direct_fallback(j, path);
            if (rc == 0)
                rc = scan_after_end(j, scan, 1);
        }
    }
    if (info)
        *info = j->rec;
    if (rc < 0)
        goto fail;
    /* the new generation is durable before any record carries it */
    rc = sb_write(j, j->ckpt_seq, j->ckpt_lpos, 0);
    if (rc == -EINVAL && j->direct) {
        rc = journal_direct_fallback(j, path);
        if (rc == 0)
            rc = sb_write(j, j->ckpt_seq, j->ckpt_lpos, 0);
    }
    if (rc < 0)
        goto fail;
    j->journal_error = 0;
    munmap(scan, SCAN_BYTES);
    *out = j;
    return 0;
fail:
    if (scan)
        munmap(scan, SCAN_BYTES);
    jr_free_all(j);
    return rc;
}

/* vol has records in the recovery's backlog (not counted in unflushed yet). */
static int vol_backlog(const jr_t *j, const struct vol *v)
{
    return backlog(j) && v->rec_last >= j->load_seq && v->rec_last >= v->forget_seq;
}

int jr_pending_volumes(jr_t *j, uint32_t *vols, int max)
{
    pthread_mutex_lock(&j->mu);
    int n = 0;
    for (int i = 0; i < j->nvols; i++) {
        if (!j->vols[i]->unflushed && !vol_backlog(j, j->vols[i]))
            continue;
        if (n < max && vols)
            vols[n] = j->vols[i]->id;
        n++;
    }
    pthread_mutex_unlock(&j->mu);
    return n;
}

/* ------------------------------------------------------------ entry/exit */

static int enter(jr_t *j)
{
    pthread_mutex_lock(&j->mu);
    if (j->stopping) {
        pthread_mutex_unlock(&j->mu);
        return -ESHUTDOWN;
    }
    j->users++;
    return 0;
}

static void leave(jr_t *j)
{
    if (--j->users == 0 && j->stopping)
        pthread_cond_broadcast(&j->cv_progress);
    pthread_mutex_unlock(&j->mu);
}

/* ------------------------------------------------------------ attach/detach */

/* A number from the block device's queue/ in sysfs (a partition: its
 * disk's), 0 if unreadable. */
static uint64_t queue_attr(dev_t rdev, const char *name)
{
    char path[128], buf[32];
    snprintf(path, sizeof path, "/sys/dev/block/%u:%u/queue/%s", major(rdev), minor(rdev), name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(path, sizeof path, "/sys/dev/block/%u:%u/../queue/%s", major(rdev), minor(rdev),
                 name);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return 0;
    }
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    return strtoull(buf, NULL, 10);
}

/* How a discard is applied to this device: is_blk, and the discard
 * granularity (0: the device does not discard, write zeros). */
static void discard_geometry(int fd, int *is_blk, uint64_t *gran)
{
    struct stat st;
    *is_blk = 0;
    *gran = 0;
    if (fstat(fd, &st) < 0 || !S_ISBLK(st.st_mode))
        return;
    *is_blk = 1;
    if (!queue_attr(st.st_rdev, "discard_max_bytes"))
        return;
    uint64_t g = queue_attr(st.st_rdev, "discard_granularity");
    *gran = g && g % 512 == 0 ? g : 0;
}

int jr_attach(jr_t *j, uint32_t vol, const char *dm_path, uint64_t size)
{
    if (!vol || !dm_path || size % 512)
        return -EINVAL;
    int bfd = open(dm_path, O_RDWR | O_CLOEXEC);
    if (bfd < 0)
        return -errno;
    int dfd = open(dm_path, O_RDWR | O_DIRECT | O_CLOEXEC);
    int is_blk;
    uint64_t dgran;
    discard_geometry(bfd, &is_blk, &dgran);
    int rc = enter(j);
    if (rc < 0)
        goto fail;
    struct vol *v = vol_get(j, vol);
    if (!v)
        rc = -ENOMEM;
    else if (v->attached || v->busy)
        rc = -EBUSY;
    if (rc < 0) {
        leave(j);
        goto fail;
    }
    v->attached = 1;
    v->detaching = 0;
    v->bfd = bfd;
    v->dfd = dfd;
    v->use_direct = dfd >= 0;
    v->size = size;
    v->dirty = 0;
    v->is_blk = is_blk;
    v->dgran = dgran;
    pthread_cond_signal(&j->cv_flush);
    leave(j);
    return 0;
fail:
    close(bfd);
    if (dfd >= 0)
        close(dfd);
    return rc;
}

int jr_detach(jr_t *j, uint32_t vol, uint32_t timeout_ms)
{
    int rc = enter(j);
    if (rc < 0)
        return rc;
    struct vol *v = vol_find(j, vol);
    if (!v || !v->attached || v->detaching) {
        leave(j);
        return -ENXIO;
    }
    struct timespec dl;
    deadline_in(&dl, timeout_ms);
    v->detaching = 1; /* new writes: -ENXIO */
    /* every record of vol on its device, and the device synced by the
     * flusher (not here: a failed fdatasync must make the flusher rewrite
     * the records, see rewind_flush; a failing device keeps us waiting) */
    while ((v->unflushed || vol_backlog(j, v) || v->busy || (v->dirty && j->started)) &&
           !j->stopping) {
        if (!v->unflushed && !vol_backlog(j, v) && !v->busy && !j->sync_now) {
            j->sync_now = 1;
            pthread_cond_signal(&j->cv_flush);
        }
        if (wait_until(&j->cv_progress, &j->mu, &dl) == ETIMEDOUT &&
            (v->unflushed || vol_backlog(j, v) || v->busy || v->dirty)) {
            rc = -ETIMEDOUT;
            break;
        }
    }
    if (!rc && j->stopping)
        rc = -ESHUTDOWN;
    if (!rc) {
        v->redo = 0; /* its records are on the device and synced */
        v->rewind_floor = j->head_seq;
    }
    if (rc) {
        v->detaching = 0; /* still attached; the caller may retry */
    } else {
        vol_close_fds(v);
        v->attached = 0;
        v->detaching = 0;
    }
    leave(j);
    return rc;
}

/* ------------------------------------------------------------ committer */

/* Write everything appended and not yet submitted as one commit, and
 * advance durability over the commits that are done, oldest first. Called
 * with mu held and a free slot; drops mu around the device write. */
static void commit_batch(jr_t *j)
{
    /* Take everything appended so far; records are aligned to the
     * device's block, so concurrent commits never share a block. */
    uint64_t start = j->submit_lpos, end = j->head_lpos;
    int slot = (j->cq_head + j->cq_n) % JR_COMMIT_DEPTH;
    j->cq[slot].end_lpos = end;
    j->cq[slot].end_seq = j->head_seq;
    j->cq[slot].done = 0;
    j->cq_n++;
    j->submit_lpos = end;
    pthread_mutex_unlock(&j->mu);
    int rc = 0;
    uint64_t p = start;
    while (p < end && !rc) {
        uint64_t phys = p % j->cap, n = end - p;
        if (n > j->cap - phys)
            n = j->cap - phys;
        rc = pwrite_all(j->fd, j->ring + phys, n, JR_RING_START + phys);
        p += n;
    }
    pthread_mutex_lock(&j->mu);
    if (rc) {
        /* Sticky: durable never passes this commit, so nothing after it
         * is acknowledged either. */
        if (!j->journal_error)
            j->journal_error = rc;
    } else {
        j->cq[slot].done = 1;
    }
    int moved = 0;
    while (j->cq_n && j->cq[j->cq_head].done) {
        j->durable_lpos = j->cq[j->cq_head].end_lpos;
        j->durable_seq = j->cq[j->cq_head].end_seq;
        pthread_cond_broadcast(&j->cq[j->cq_head].cv);
        j->commits++;
        j->cq_head = (j->cq_head + 1) % JR_COMMIT_DEPTH;
        j->cq_n--;
        moved = 1;
    }
    if (moved)
        pthread_cond_signal(&j->cv_flush);
    if (rc)
        wake_durable_all(j);
    /* a slot is free: one committer for what was appended meanwhile (waking
     * idle ones with nothing to do costs a context switch each) */
    if (j->stopping)
        pthread_cond_broadcast(&j->cv_commit);
    else if (j->submit_lpos != j->head_lpos)
        pthread_cond_signal(&j->cv_commit);
}

static void *committer_main(void *arg)
{
    jr_t *j = arg;
    pthread_setname_np(pthread_self(), "jr-commit"); /* for top -H, /proc/PID/task */
    pthread_mutex_lock(&j->mu);
    for (;;) {
        while ((j->submit_lpos == j->head_lpos || j->cq_n == JR_COMMIT_DEPTH ||
                (j->cq_n && j->head_lpos - j->submit_lpos < JR_PIPELINE_MIN) || j->journal_error) &&
               !j->stopping)
            pthread_cond_wait(&j->cv_commit, &j->mu);
        if (j->submit_lpos == j->head_lpos || j->journal_error)
            break; /* stopping, nothing (more) can be committed */
        if (j->cq_n == JR_COMMIT_DEPTH) { /* stopping: wait for a slot, then commit the rest */
            pthread_cond_wait(&j->cv_commit, &j->mu);
            continue;
        }
        commit_batch(j);
    }
    pthread_mutex_unlock(&j->mu);
    return NULL;
}

/* ------------------------------------------------------------ flusher */

static void flush_advance(jr_t *j, uint64_t seq, uint64_t lpos)
{
    j->flush_seq = seq;
    j->flush_lpos = lpos;
    j->waiting_volume = 0;
    pthread_cond_broadcast(&j->cv_progress);
}

static void flush_failed(jr_t *j, int err, uint32_t vol)
{
    j->flush_error = err;
    j->flush_error_volume = vol;
    j->flush_errors++;
}

/* Wait RETRY_MS (or until stopping) before retrying a failed dm I/O. */
static void backoff(jr_t *j)
{
    struct timespec dl;
    deadline_in(&dl, RETRY_MS);
    while (!j->stopping && wait_until(&j->cv_flush, &j->mu, &dl) != ETIMEDOUT)
        ;
}

/* Records synced become confirmed (conf follows synced) unless the
 * controller confirms them (confirm_on). Locked. */
static void set_synced(jr_t *j, uint64_t seq, uint64_t lpos)
{
    j->synced_seq = seq;
    j->synced_lpos = lpos;
    if (!j->confirm_on) {
        j->conf_seq = seq;
        j->conf_lpos = lpos;
    }
}

/* Move the checkpoint (NV) / the tail (RAM) up to conf. Flusher (NV: it
 * writes the superblock, dropping the lock). */
static int ckpt_to_conf(jr_t *j)
{
    uint64_t seq = j->conf_seq, lpos = j->conf_lpos;
    if (j->mode == JR_RAM) {
        if (lpos > j->tail_lpos)
            set_tail(j, lpos);
        return 0;
    }
    if (lpos == j->ckpt_lpos || seq <= j->ckpt_seq || j->journal_error)
        return 0;
    int rc = sb_write(j, seq, lpos, 1);
    if (rc < 0)
        return rc;
    j->ckpt_seq = seq;
    j->ckpt_lpos = lpos;
    set_tail(j, lpos);
    pthread_cond_broadcast(&j->cv_progress);
    return 0;
}

static int has_unsynced(const jr_t *j)
{
    if (j->flush_seq > j->synced_seq)
        return 1;
    if (j->mode == JR_NV && !j->confirm_on && j->flush_lpos != j->ckpt_lpos)
        return 1;
    for (int i = 0; i < j->nvols; i++)
        if (j->vols[i]->dirty && j->vols[i]->attached)
            return 1;
    return 0;
}

static int want_sync(const jr_t *j)
{
    if (!has_unsynced(j))
        return 0;
    if (j->sync_req > j->synced_seq && j->flush_seq >= j->sync_req)
        return 1;
    if (j->sync_now)
        return 1;
    if (j->drain_req && j->flush_seq == j->head_seq)
        return 1;
    /* space is reclaimed only behind synced records (both modes: a failed
     * sync rewrites them from the ring) */
    if (j->full_waiters && j->flush_lpos != j->synced_lpos)
        return 1;
    if (j->flush_lpos - j->synced_lpos >= j->window / 8)
        return 1;
    return 0;
}

/* A completed WRITE of vol goes back into the overlay (a failed sync):
 * the sectors of [off, off+len) where nothing newer answers, neither a
 * newer write nor a listed discard (see IN MEMORY above). */
static int ix_reinsert(jr_t *j, uint32_t vol, uint64_t off, uint32_t len, uint64_t seq,
                       uint64_t data_lpos)
{
    for (uint64_t s = off / 512, e = (off + len) / 512; s < e; s++) {
        struct ixnode *n = ix_find(j, vol, s / IX_SECT);
        unsigned i = (unsigned)(s % IX_SECT);
        if (n && (n->mask & (1u << i)) && n->seq[i] > seq)
            continue;
        int newer_discard = 0;
        for (const struct dnode *d = j->dhead; d && !newer_discard; d = d->next)
            newer_discard = d->vol == vol && d->seq > seq && d->off <= s * 512 &&
                            s * 512 < d->off + d->len;
        if (newer_discard)
            continue;
        int rc = ix_insert(j, vol, s * 512, 512, seq, data_lpos + (s * 512 - off));
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* A completed DISCARD goes back into the list, in seq order. */
static int dl_reinsert(jr_t *j, uint32_t vol, uint64_t off, uint64_t len, uint64_t seq)
{
    struct dnode *d = calloc(1, sizeof *d);
    if (!d)
        return -ENOMEM;
    d->vol = vol;
    d->off = off;
    d->len = len;
    d->seq = seq;
    ix_clear_below(j, vol, off, len, seq);
    struct dnode **pp = &j->dhead;
    while (*pp && (*pp)->seq < seq)
        pp = &(*pp)->next;
    d->next = *pp;
    *pp = d;
    if (j->dtail == pp)
        j->dtail = &d->next;
    return 0;
}

/* Records of v that a rewind writes again from the ring: v is known, the
 * record is not forgotten and not before v's last detach (a deleted or
 * restored volume's old records are not its content any more). */
static int rewind_keeps(const struct vol *v, uint64_t seq)
{
    return v && seq >= v->forget_seq && seq >= v->rewind_floor;
}

/* An fdatasync failed (the volumes marked redo_new). Linux reports a
 * writeback error once and leaves the pages clean, so a second fdatasync
 * would succeed over data that never reached the device: instead the
 * flusher goes back to the last good sync and writes those volumes'
 * records again from the ring (space is reclaimed only behind synced
 * records, so they are all there); the other volumes' records in between
 * are on their devices already and are passed. Until rewritten, the
 * records answer reads from the overlay again. Flusher thread, locked. */
static void rewind_flush(jr_t *j)
{
    uint64_t end = j->redo_end > j->flush_seq ? j->redo_end : j->flush_seq;
    uint64_t lpos = j->synced_lpos;
    for (uint64_t seq = j->synced_seq; seq < end; seq++) {
        const struct rec_disk *h = hdr_at(j, lpos);
        uint64_t size = hdr_size(j, h);
        struct vol *v = h->type == REC_WRITE || h->type == REC_DISCARD ? vol_find(j, h->vol) : NULL;
        /* a volume that failed before has its records after flush_seq
         * still in the overlay; one failing now has none there */
        if (rewind_keeps(v, h->seq) && (v->redo_new || (v->redo && seq < j->flush_seq))) {
            int rc = h->type == REC_WRITE
                         ? ix_reinsert(j, h->vol, h->offset, h->len, h->seq, lpos + JR_HDR)
                         : dl_reinsert(j, h->vol, h->offset, h->marker_id, h->seq);
            if (rc < 0) { /* never serve a half-indexed volume: stop the journal */
                ix_drop_vol(j, h->vol);
                j->journal_error = rc;
                wake_durable_all(j);
                break;
            }
            v->unflushed++;
            j->unflushed_records++;
            if (h->type == REC_WRITE) {
                v->unflushed_bytes += h->len;
                j->unflushed_bytes += h->len;
            }
        }
        lpos += size;
    }
    for (int i = 0; i < j->nvols; i++) {
        struct vol *v = j->vols[i];
        if (v->redo_new) {
            v->redo = 1;
            v->redo_new = 0;
        }
    }
    j->redo_end = end;
    j->rewinds++;
    j->flush_seq = j->synced_seq;
    j->flush_lpos = j->synced_lpos;
    pthread_cond_broadcast(&j->cv_progress);
}

/* The pool below turned out unable to keep what it acknowledged (a thin
 * pool out of metadata space: read-only, discards answered without
 * unmapping, uncommitted metadata rolled back): every record after the last
 * confirmation may be lost there. Like rewind_flush for a failed sync, but
 * for every volume and from conf: the records go back into the overlay (the
 * readers see them again) and the flusher writes them again in order, once
 * the pool can take them (the discards wait while no_space is set). Markers
 * among them were served already and are passed. Flusher thread, locked. */
static void rewind_to_conf(jr_t *j)
{
    j->rewind_req = 0;
    uint64_t end = j->redo_end > j->flush_seq ? j->redo_end : j->flush_seq;
    if (j->conf_seq >= end)
        return; /* nothing applied since the last confirmation */
    uint64_t lpos = j->conf_lpos;
    for (uint64_t seq = j->conf_seq; seq < end; seq++) {
        const struct rec_disk *h = hdr_at(j, lpos);
        uint64_t size = hdr_size(j, h);
        struct vol *v = h->type == REC_WRITE || h->type == REC_DISCARD ? vol_find(j, h->vol) : NULL;
        /* records in [flush, redo_end) of a volume being rewritten after a
         * failed sync are still in the overlay; every other one left it */
        if (rewind_keeps(v, h->seq) && !(seq >= j->flush_seq && v->redo)) {
            int rc = h->type == REC_WRITE
                         ? ix_reinsert(j, h->vol, h->offset, h->len, h->seq, lpos + JR_HDR)
                         : dl_reinsert(j, h->vol, h->offset, h->marker_id, h->seq);
            if (rc < 0) { /* never serve a half-indexed volume: stop the journal */
                ix_drop_vol(j, h->vol);
                j->journal_error = rc;
                wake_durable_all(j);
                break;
            }
            v->unflushed++;
            j->unflushed_records++;
            if (h->type == REC_WRITE) {
                v->unflushed_bytes += h->len;
                j->unflushed_bytes += h->len;
            }
        }
        lpos += size;
    }
    for (int i = 0; i < j->nvols; i++) {
        j->vols[i]->redo = 1;
        j->vols[i]->redo_new = 0;
    }
    j->redo_end = end;
    j->conf_rewinds++;
    j->synced_seq = j->flush_seq = j->conf_seq;
    j->synced_lpos = j->flush_lpos = j->conf_lpos;
    pthread_cond_broadcast(&j->cv_progress);
}

/* Every record before flush_seq has completed on dm: fdatasync the dm
 * devices written since their last sync, then (NV) checkpoint there (up to
 * what is confirmed). */
static int sync_ckpt(jr_t *j)
{
    uint64_t tseq = j->flush_seq, tlpos = j->flush_lpos;
    int n = 0, rc = 0;
    uint32_t bad = 0;
    struct vol **list = NULL;
    j->sync_now = 0;
    if (j->nvols) {
        list = malloc((size_t)j->nvols * sizeof *list);
        if (!list)
            return -ENOMEM;
    }
    for (int i = 0; i < j->nvols; i++) {
        struct vol *v = j->vols[i];
        if (v->dirty && v->attached) {
            v->dirty = 0;
            v->busy++;
            list[n++] = v;
        }
    }
    if (n) {
        int *fds = malloc((size_t)n * sizeof *fds);
        int *res = calloc((size_t)n, sizeof *res);
        if (!fds || !res) {
            free(fds);
            free(res);
            for (int i = 0; i < n; i++) {
                list[i]->busy--;
                list[i]->dirty = 1;
            }
            free(list);
            return -ENOMEM;
        }
        for (int i = 0; i < n; i++)
            fds[i] = list[i]->bfd;
        pthread_mutex_unlock(&j->mu);
        for (int i = 0; i < n; i++)
            if (fdatasync(fds[i]) < 0 && errno != EINVAL && errno != EROFS)
                res[i] = -errno;
        pthread_mutex_lock(&j->mu);
        for (int i = 0; i < n; i++) {
            list[i]->busy--;
            if (res[i]) {
                list[i]->dirty = 1;
                list[i]->redo_new = 1;
                rc = res[i];
                bad = list[i]->id;
            }
        }
        free(fds);
        free(res);
        pthread_cond_broadcast(&j->cv_progress);
    }
    free(list);
    if (rc) {
        flush_failed(j, rc, bad);
        rewind_flush(j);
        return rc;
    }
    if (tseq > j->synced_seq)
        set_synced(j, tseq, tlpos);
    if (j->redo_end && tseq >= j->redo_end) { /* every rewritten record is synced */
        for (int i = 0; i < j->nvols; i++)
            j->vols[i]->redo = 0;
        j->redo_end = 0;
        j->flush_error = 0;
        j->flush_error_volume = 0;
    }
    rc = ckpt_to_conf(j);
    if (rc < 0)
        return rc;
    pthread_cond_broadcast(&j->cv_progress);
    return 0;
}

static void flush_marker(jr_t *j, const struct rec_disk *h)
{
    uint64_t seq = h->seq, lpos = j->flush_lpos, size = rec_size(j, h->len);
    if (j->synced_seq < seq || (j->mode == JR_NV && !j->confirm_on && j->ckpt_lpos != lpos)) {
        if (sync_ckpt(j) < 0) {
            backoff(j);
            return;
        }
    }
    j->marker_ready = 1;
    j->m_id = h->marker_id;
    j->m_seq = seq;
    j->m_len = h->len;
    memcpy(j->m_payload, (const unsigned char *)h + JR_HDR, h->len);
    pthread_cond_broadcast(&j->cv_marker);
    while (j->marker_ready && !j->stopping)
        pthread_cond_wait(&j->cv_flush, &j->mu);
    if (j->marker_ready)
        return; /* stopping: the marker stays in the journal */
    j->markers_pending--;
    flush_advance(j, seq + 1, lpos + size);
    if (j->synced_seq == seq) /* no dm write since the sync above (nor a rewind) */
        set_synced(j, seq + 1, lpos + size);
    ckpt_to_conf(j);
    pthread_cond_broadcast(&j->cv_progress);
}

static void flush_writes(jr_t *j, struct vol *v)
{
    struct iovec iov[BATCH_IOV];
    int n = 0;
    uint64_t lp = j->flush_lpos, s = j->flush_seq, off0 = hdr_at(j, lp)->offset, total = 0;
    uint64_t lim = loaded_seq(j);
    while (s < lim && n < BATCH_IOV) {
        const struct rec_disk *h = hdr_at(j, lp);
        if (h->type == REC_PAD) {
            lp += h->len;
            s++;
            continue;
        }
        if (h->type != REC_WRITE || h->vol != v->id || h->seq < v->forget_seq)
            break;
        if (n && (h->offset != off0 + total || total + h->len > BATCH_BYTES))
            break;
        iov[n].iov_base = (unsigned char *)h + JR_HDR;
        iov[n].iov_len = h->len;
        n++;
        total += h->len;
        lp += rec_size(j, h->len);
        s++;
    }
    int fd = v->use_direct ? v->dfd : v->bfd;
    v->busy++;
    pthread_mutex_unlock(&j->mu);
    int rc = pwritev_all(fd, iov, n, off0);
    pthread_mutex_lock(&j->mu);
    v->busy--;
    pthread_cond_broadcast(&j->cv_progress);
    if (rc == -EINVAL && fd == v->dfd) {
        v->use_direct = 0; /* O_DIRECT refused (alignment, file system): buffered */
        return;
    }
    if (rc) {
        flush_failed(j, rc, v->id);
        backoff(j);
        return;
    }
    /* completed: every record in [flush_seq, s) */
    for (uint64_t l = j->flush_lpos, q = j->flush_seq; q < s; q++) {
        const struct rec_disk *h = hdr_at(j, l);
        if (h->type == REC_WRITE) {
            ix_remove(j, h->vol, h->offset, h->len, h->seq);
            if (h->seq >= v->forget_seq) {
                v->unflushed--;
                v->unflushed_bytes -= h->len;
                j->unflushed_records--;
                j->unflushed_bytes -= h->len;
            }
        }
        l += hdr_size(j, h);
    }
    v->dirty = 1;
    j->dm_writes++;
    if (!j->redo_end) { /* else the failed sync's error stands until the redo is synced */
        j->flush_error = 0;
        j->flush_error_volume = 0;
    }
    flush_advance(j, s, lp);
}

/* Zeros over [off, off+len) of v (unlocked, flusher). */
static int zero_range(jr_t *j, struct vol *v, uint64_t off, uint64_t len)
{
    while (len) {
        uint32_t n = len < ZERO_BYTES ? (uint32_t)len : ZERO_BYTES;
        int direct = v->use_direct && v->dfd >= 0;
        int rc = pwrite_all(direct ? v->dfd : v->bfd, j->zeros, n, off);
        if (rc == -EINVAL && direct)
            rc = pwrite_all(v->bfd, j->zeros, n, off);
        if (rc)
            return rc;
        off += n;
        len -= n;
    }
    return 0;
}

/* Make [off, off+len) of v read zeros, giving the space back where the
 * device can (unlocked, flusher). A block device discards the part aligned
 * to its discard granularity (dm-thin: whole thin blocks, which it unmaps)
 * and gets zeros written over the unaligned head and tail; a device without
 * discard gets zeros, a regular file a hole. A failed discard falls back to
 * zeros: the range must read zeros either way. */
static int vol_discard(jr_t *j, struct vol *v, uint64_t off, uint64_t len)
{
    uint64_t end = off + len;
    if (!v->is_blk) {
        if (fallocate(v->bfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
                      (off_t)len) == 0)
            return 0;
        return errno == EOPNOTSUPP ? zero_range(j, v, off, len) : -errno;
    }
    uint64_t g = v->dgran;
    uint64_t a = g ? round_up(off, g) : end, b = g ? end / g * g : end;
    if (a >= b)
        return zero_range(j, v, off, len);
    uint64_t r[2] = {a, b - a};
    if (ioctl(v->bfd, BLKDISCARD, r) < 0)
        return zero_range(j, v, off, len);
    int rc = zero_range(j, v, off, a - off);
    return rc ? rc : zero_range(j, v, b, end - b);
}

/* Apply the DISCARD at flush_lpos to v, alone and in its place. */
static void flush_discard(jr_t *j, struct vol *v, const struct rec_disk *h)
{
    uint64_t seq = h->seq, off = h->offset, len = h->marker_id;
    uint64_t next = j->flush_lpos + rec_size(j, 0);
    if (j->no_space) {
        /* a read-only thin pool "completes" a discard without unmapping:
         * keep it (the overlay reads zeros) until the pool can take it */
        flush_failed(j, j->no_space, v->id);
        backoff(j);
        return;
    }
    v->busy++;
    pthread_mutex_unlock(&j->mu);
    int rc = vol_discard(j, v, off, len);
    pthread_mutex_lock(&j->mu);
    v->busy--;
    pthread_cond_broadcast(&j->cv_progress);
    if (rc) {
        flush_failed(j, rc, v->id);
        backoff(j);
        return;
    }
    dl_remove(j, seq); /* gone already if the volume was forgotten meanwhile */
    if (seq >= v->forget_seq) {
        v->unflushed--;
        j->unflushed_records--;
    }
    v->dirty = 1;
    j->dm_discards++;
    if (!j->redo_end) {
        j->flush_error = 0;
        j->flush_error_volume = 0;
    }
    flush_advance(j, seq + 1, next);
}

static void *flusher_main(void *arg)
{
    jr_t *j = arg;
    pthread_setname_np(pthread_self(), "jr-flush");
    pthread_mutex_lock(&j->mu);
    while (!j->stopping) {
        if (j->rewind_req) {
            rewind_to_conf(j);
            continue;
        }
        if (j->mode == JR_NV && j->conf_seq > j->ckpt_seq && !j->journal_error) {
            if (ckpt_to_conf(j) < 0)
                backoff(j);
            continue;
        }
        if (want_sync(j)) {
            if (sync_ckpt(j) < 0)
                backoff(j);
            continue;
        }
        if (backlog(j) && j->flush_lpos == j->load_lpos) {
            /* the recovered log goes on past what is in memory */
            if (j->journal_error) {
                pthread_cond_wait(&j->cv_flush, &j->mu);
                continue;
            }
            int rc = load_more(j);
            if (rc < 0) { /* sticky, as for any journal device error */
                j->journal_error = rc;
                wake_durable_all(j);
                pthread_cond_broadcast(&j->cv_progress);
            } else if (rc == 0 && sync_ckpt(j) < 0) { /* room comes behind the checkpoint */
                backoff(j);
            } else if (rc == 0 && j->confirm_on && j->conf_seq < j->synced_seq) {
                /* ...once the controller confirms what is synced */
                struct timespec dl;
                deadline_in(&dl, RETRY_MS);
                wait_until(&j->cv_flush, &j->mu, &dl);
            }
            continue;
        }
        if (j->flush_seq < j->durable_seq) {
            const struct rec_disk *h = hdr_at(j, j->flush_lpos);
            if (h->type == REC_PAD) {
                flush_advance(j, j->flush_seq + 1, j->flush_lpos + h->len);
                continue;
            }
            if (h->type == REC_FORGET) { /* applied when appended */
                flush_advance(j, j->flush_seq + 1, j->flush_lpos + rec_size(j, 0));
                continue;
            }
            if (h->type == REC_MARKER && h->seq < j->redo_end) {
                /* served before a rewind (rewind_to_conf): its snapshot exists */
                flush_advance(j, j->flush_seq + 1, j->flush_lpos + rec_size(j, h->len));
                continue;
            }
            if (h->type == REC_MARKER) {
                flush_marker(j, h);
                continue;
            }
            struct vol *v = vol_find(j, h->vol);
            if ((v && h->seq < v->forget_seq) ||
                (h->seq < j->redo_end && (!v || !v->redo || !rewind_keeps(v, h->seq)))) {
                /* deleted; or (rewriting after a failed sync) on its device already */
                flush_advance(j, j->flush_seq + 1, j->flush_lpos + rec_size(j, h->len));
                continue;
            }
            if (!v || !v->attached) {
                j->waiting_volume = h->vol;
                pthread_cond_wait(&j->cv_flush, &j->mu);
                continue;
            }
            j->waiting_volume = 0;
            if (h->type == REC_DISCARD)
                flush_discard(j, v, h);
            else
                flush_writes(j, v);
            continue;
        }
        if (has_unsynced(j) && !j->journal_error) {
            struct timespec dl;
            deadline_in(&dl, IDLE_CKPT_MS);
            if (wait_until(&j->cv_flush, &j->mu, &dl) == ETIMEDOUT && !j->stopping &&
                j->flush_seq == j->durable_seq && sync_ckpt(j) < 0)
                backoff(j);
        } else {
            pthread_cond_wait(&j->cv_flush, &j->mu);
        }
    }
    /* leaving: checkpoint what is already on dm, so the next open replays less */
    if (j->mode == JR_NV && !j->journal_error && has_unsynced(j))
        sync_ckpt(j);
    pthread_mutex_unlock(&j->mu);
    return NULL;
}

int jr_start(jr_t *j)
{
    int rc = enter(j);
    if (rc < 0)
        return rc;
    if (j->started) {
        leave(j);
        return -EBUSY;
    }
    j->submit_lpos = j->durable_lpos;
    j->cq_head = j->cq_n = 0;
    for (int i = 0; j->mode == JR_NV && i < JR_COMMIT_DEPTH && !rc; i++) {
        rc = -pthread_create(&j->committer[i], NULL, committer_main, j);
        if (!rc)
            j->committers_on++;
    }
    if (!rc)
        rc = -pthread_create(&j->flusher, NULL, flusher_main, j);
    if (rc) {
        j->stopping = 1;
        pthread_cond_broadcast(&j->cv_commit);
        pthread_mutex_unlock(&j->mu);
        for (int i = 0; i < j->committers_on; i++)
            pthread_join(j->committer[i], NULL);
        pthread_mutex_lock(&j->mu);
        j->committers_on = 0;
        j->stopping = 0;
        leave(j);
        return rc;
    }
    j->flusher_on = 1;
    j->started = 1;
    leave(j);
    return 0;
}

/* ------------------------------------------------------------ append */

static void put_record(jr_t *j, uint32_t type, uint32_t vol, uint64_t off, uint64_t marker_id,
                       const struct iovec *src, int nsrc, uint32_t len, uint32_t data_crc,
                       uint64_t size)
{
    unsigned char *p = j->ring + j->head_lpos % j->cap;
    struct rec_disk h = {
        .magic = JR_REC_MAGIC,
        .journal_id = j->journal_id,
        .generation = j->generation,
        .seq = j->head_seq,
        .offset = off,
        .marker_id = marker_id,
        .type = type,
        .vol = vol,
        .len = type == REC_PAD ? (uint32_t)size : len,
        .data_crc = data_crc,
        /* lets recovery tell a torn tail from a damaged acknowledged record */
        .ack_lag = j->head_seq - j->durable_seq + 1 < UINT32_MAX
                       ? (uint32_t)(j->head_seq - j->durable_seq + 1)
                       : UINT32_MAX,
    };
    h.hdr_crc = jr_crc32c(&h, offsetof(struct rec_disk, hdr_crc));
    memcpy(p, &h, sizeof h);
    memset(p + sizeof h, 0, JR_HDR - sizeof h);
    if (type != REC_PAD) {
        size_t at = 0;
        for (int i = 0; i < nsrc && at < len; i++) {
            size_t k = src[i].iov_len < len - at ? src[i].iov_len : len - at;
            memcpy(p + JR_HDR + at, src[i].iov_base, k);
            at += k;
        }
        memset(p + JR_HDR + len, 0, size - JR_HDR - len);
    }
    j->head_seq++;
    j->head_lpos += size;
    if (j->mode == JR_RAM) {
        j->durable_seq = j->head_seq;
        j->durable_lpos = j->head_lpos;
        pthread_cond_signal(&j->cv_flush);
    }
}

/* NV, after an append (mu held): get the new records committed. With no
 * commit in flight the appending thread writes the batch itself (its own
 * record and any appended before it): at low queue depth a write then costs
 * no hand-off to a committer thread and back. Otherwise a committer takes
 * it, joining what arrives meanwhile into the next batch. */
static void commit_soon(jr_t *j)
{
    if (j->mode != JR_NV)
        return;
    if (JR_INLINE_COMMIT && j->cq_n == 0 && j->submit_lpos != j->head_lpos && j->committers_on &&
        !j->journal_error && !j->stopping)
        commit_batch(j);
    else
        pthread_cond_signal(&j->cv_commit);
}

static int append_ok(jr_t *j, uint32_t type, uint32_t vol, uint64_t off, uint64_t len,
                     struct vol **vp)
{
    if (j->draining || j->stopping)
        return -ESHUTDOWN;
    if (j->journal_error)
        return j->journal_error;
    if (!j->started)
        return -EAGAIN;
    if (type == REC_WRITE || type == REC_DISCARD) {
        struct vol *v = vol_find(j, vol);
        if (!v || !v->attached || v->detaching)
            return -ENXIO;
        if (off > v->size || len > v->size - off)
            return -EINVAL;
        *vp = v;
    }
    return 0;
}

/* Reserve space and append one record (locked). Returns its seq or -errno. */
static int64_t append(jr_t *j, uint32_t type, uint32_t vol, uint64_t off, uint64_t marker_id,
                      const struct iovec *src, int nsrc, uint32_t len, uint32_t data_crc,
                      const struct timespec *dl)
{
    uint64_t size = rec_size(j, len);
    uint64_t ext = type == REC_DISCARD ? marker_id : len; /* bytes of the volume touched */
    /* room kept for FORGET records: a volume delete must be able to record
     * its end while writers have filled the ring behind a stuck flusher */
    uint64_t reserve = j->mode == JR_NV && type != REC_FORGET ? FORGET_RESERVE * j->align : 0;
    struct vol *v = NULL;
    int waited = 0, rc;
    if (size + reserve > j->window)
        return -EINVAL;
    for (;;) {
        rc = append_ok(j, type, vol, off, ext, &v);
        if (rc)
            return rc;
        /* the window, not only the ring, bounds what is live: the memory */
        uint64_t used = j->head_lpos - j->tail_lpos + reserve;
        uint64_t avail = used < j->window ? j->window - used : 0;
        uint64_t to_end = j->cap - j->head_lpos % j->cap;
        if (size > to_end) {
            if (to_end <= avail) {
                put_record(j, REC_PAD, 0, 0, 0, NULL, 0, 0, 0, to_end);
                if (j->mode == JR_NV)
                    pthread_cond_signal(&j->cv_commit);
                continue;
            }
        } else if (size <= avail) {
            break;
        }
        if (!waited) {
            waited = 1;
            j->full_waits++;
        }
        j->full_waiters++;
        pthread_cond_signal(&j->cv_flush);
        rc = wait_until(&j->cv_progress, &j->mu, dl);
        j->full_waiters--;
        if (rc == ETIMEDOUT) {
            /* one last look: the space may have come with the timeout */
            used = j->head_lpos - j->tail_lpos + reserve;
            avail = used < j->window ? j->window - used : 0;
            to_end = j->cap - j->head_lpos % j->cap;
            if (append_ok(j, type, vol, off, ext, &v) || size > to_end || size > avail)
                return -ETIMEDOUT;
        }
    }
    int64_t seq = (int64_t)j->head_seq;
    uint64_t lpos = j->head_lpos;
    if (type == REC_WRITE) {
        rc = ix_insert(j, vol, off, len, (uint64_t)seq, lpos + JR_HDR);
        if (rc < 0) {
            ix_drop_vol(j, vol); /* never serve a half-indexed record */
            j->journal_error = rc;
            return rc;
        }
        v->unflushed++;
        v->unflushed_bytes += len;
        j->unflushed_records++;
        j->unflushed_bytes += len;
        j->appends++;
    } else if (type == REC_DISCARD) {
        rc = dl_add(j, vol, off, ext, (uint64_t)seq);
        if (rc < 0)
            return rc; /* nothing appended */
        v->unflushed++;
        j->unflushed_records++;
        j->discards++;
    } else if (type == REC_MARKER) {
        j->markers_pending++;
    }
    put_record(j, type, vol, off, marker_id, src, nsrc, len, data_crc, size);
    commit_soon(j);
    return seq;
}

/* NV: wait until seq is durable in the journal. */
static int wait_durable(jr_t *j, int64_t seq, const struct timespec *dl)
{
    while (j->durable_seq <= (uint64_t)seq) {
        if (j->journal_error)
            return j->journal_error;
        if (!j->committers_on)
            return -ESHUTDOWN;
        /* the commit holding seq, or the slot the next commit takes (which
         * will hold it: a commit takes everything appended); with every
         * slot busy that is the oldest, and its end wakes us to look again */
        int k = (j->cq_head + j->cq_n) % JR_COMMIT_DEPTH;
        for (int i = 0; i < j->cq_n; i++) {
            int slot = (j->cq_head + i) % JR_COMMIT_DEPTH;
            if (j->cq[slot].end_seq > (uint64_t)seq) {
                k = slot;
                break;
            }
        }
        if (wait_until(&j->cq[k].cv, &j->mu, dl) == ETIMEDOUT && j->durable_seq <= (uint64_t)seq)
            return -ETIMEDOUT;
    }
    return 0;
}

/* Before jr_start (no committer yet): append the FORGET record and write
 * it at once, as a commit would. */
static int forget_record_unstarted(jr_t *j, uint32_t vol, uint64_t bound)
{
    uint64_t size = rec_size(j, 0); /* == align: always fits before the ring's end */
    if (j->journal_error)
        return j->journal_error;
    if (size > j->cap - (j->head_lpos - j->tail_lpos))
        return -ENOSPC;
    put_record(j, REC_FORGET, vol, bound, 0, NULL, 0, 0, 0, size);
    commit_batch(j);
    return j->journal_error;
}

int jr_forget(jr_t *j, uint32_t vol, uint32_t timeout_ms)
{
    if (!vol)
        return -EINVAL;
    struct timespec dl;
    deadline_in(&dl, timeout_ms);
    int rc = enter(j);
    if (rc < 0)
        return rc;
    struct vol *v = vol_get(j, vol);
    if (!v) {
        leave(j);
        return -ENOMEM;
    }
    uint64_t bound = j->head_seq;
    forget_vol(j, v, bound);
    pthread_cond_signal(&j->cv_flush);
    pthread_cond_broadcast(&j->cv_progress);
    /* NV: the volume's end goes into the log, so that recovery after a
     * crash drops the same records (a RAM journal has nothing to recover) */
    if (j->mode == JR_NV) {
        if (!j->started) {
            rc = forget_record_unstarted(j, vol, bound);
        } else {
            int64_t seq = append(j, REC_FORGET, vol, bound, 0, NULL, 0, 0, 0, &dl);
            rc = seq < 0 ? (int)seq : wait_durable(j, seq, &dl);
        }
    }
    leave(j);
    return rc;
}

/* Wait until every record < target is on the dm devices and synced. */
static int wait_synced(jr_t *j, uint64_t target, const struct timespec *dl)
{
    if (j->synced_seq >= target)
        return 0;
    if (target > j->sync_req) {
        j->sync_req = target;
        pthread_cond_signal(&j->cv_flush);
    }
    while (j->synced_seq < target) {
        if (j->stopping)
            return -ESHUTDOWN;
        if (j->journal_error)
            return j->journal_error;
        if (wait_until(&j->cv_progress, &j->mu, dl) == ETIMEDOUT && j->synced_seq < target)
            return -ETIMEDOUT;
    }
    return 0;
}

int64_t jr_writev(jr_t *j, uint32_t vol, uint64_t offset, const struct iovec *iov, int iovcnt,
                  uint32_t flags, uint32_t timeout_ms)
{
    if (!vol || !iov || iovcnt <= 0 || offset % 512)
        return -EINVAL;
    uint64_t len = 0;
    uint32_t crc = ~0u;
    for (int i = 0; i < iovcnt; i++) {
        if (!iov[i].iov_base && iov[i].iov_len)
            return -EINVAL;
        len += iov[i].iov_len;
        if (len > JR_MAX_IO)
            return -EINVAL;
        crc = jr_crc32c_update(crc, iov[i].iov_base, iov[i].iov_len);
    }
    if (!len || len % 512)
        return -EINVAL;
    crc = ~crc;
    struct timespec dl;
    deadline_in(&dl, timeout_ms);
    int rc = enter(j);
    if (rc < 0)
        return rc;
    int64_t seq = append(j, REC_WRITE, vol, offset, 0, iov, iovcnt, (uint32_t)len, crc, &dl);
    if (seq >= 0 && j->mode == JR_NV)
        rc = wait_durable(j, seq, &dl);
    else if (seq >= 0 && (flags & JR_FUA))
        rc = wait_synced(j, (uint64_t)seq + 1, &dl);
    leave(j);
    return rc < 0 ? rc : seq;
}

int64_t jr_write(jr_t *j, uint32_t vol, uint64_t offset, const void *buf, uint32_t len,
                 uint32_t flags, uint32_t timeout_ms)
{
    /* jr_writev refuses a NULL buffer, an empty write and partial sectors */
    struct iovec one = {.iov_base = (void *)buf, .iov_len = len};
    return jr_writev(j, vol, offset, &one, 1, flags, timeout_ms);
}

int64_t jr_discard(jr_t *j, uint32_t vol, uint64_t offset, uint64_t length, uint32_t flags,
                   uint32_t timeout_ms)
{
    if (!vol || !length || length % 512 || offset % 512 || offset + length < offset)
        return -EINVAL;
    struct timespec dl;
    deadline_in(&dl, timeout_ms);
    int rc = enter(j);
    if (rc < 0)
        return rc;
    /* the length travels in the header's marker_id field; no data, crc 0 */
    int64_t seq = append(j, REC_DISCARD, vol, offset, length, NULL, 0, 0, 0, &dl);
    if (seq >= 0 && j->mode == JR_NV)
        rc = wait_durable(j, seq, &dl);
    else if (seq >= 0 && (flags & JR_FUA))
        rc = wait_synced(j, (uint64_t)seq + 1, &dl);
    leave(j);
    return rc < 0 ? rc : seq;
}

int64_t jr_marker(jr_t *j, uint64_t marker_id, const void *payload, uint32_t len,
                  uint32_t timeout_ms)
{
    if (!marker_id || len > JR_MAX_PAYLOAD || (len && !payload))
        return -EINVAL;
    uint32_t crc = jr_crc32c(payload ? payload : "", len);
    struct timespec dl;
    deadline_in(&dl, timeout_ms);
    int rc = enter(j);
    if (rc < 0)
        return rc;
    struct iovec pl = {.iov_base = (void *)payload, .iov_len = len};
    int64_t seq = append(j, REC_MARKER, 0, 0, marker_id, &pl, 1, len, crc, &dl);
    if (seq >= 0 && j->mode == JR_NV)
        rc = wait_durable(j, seq, &dl);
    leave(j);
    return rc < 0 ? rc : seq;
}

int jr_sync(jr_t *j, uint32_t timeout_ms)
{
    struct timespec dl;
    deadline_in(&dl, timeout_ms);
    int rc = enter(j);
    if (rc < 0)
        return rc;
    if (!j->started && j->synced_seq < j->head_seq)
        rc = -EAGAIN;
    else
        rc = wait_synced(j, j->head_seq, &dl);
    leave(j);
    return rc;
}

/* ------------------------------------------------------------ read */

static int vol_pread(jr_t *j, struct vol *v, void *buf, uint32_t len, uint64_t off)
{
    int direct = v->use_direct && v->dfd >= 0;
    void *bounce = NULL;
    int rc;
    if (direct && ((uintptr_t)buf % 512)) {
        if (posix_memalign(&bounce, 4096, len))
            return -ENOMEM;
    }
    rc = pread_all(direct ? v->dfd : v->bfd, bounce ? bounce : buf, len, off);
    if (rc == -EINVAL && direct)
        rc = pread_all(v->bfd, bounce ? bounce : buf, len, off);
    if (!rc && bounce)
        memcpy(buf, bounce, len);
    free(bounce);
    (void)j;
    return rc;
}

int jr_read(jr_t *j, uint32_t vol, uint64_t offset, void *buf, uint32_t len)
{
    if (!vol || !buf || len % 512 || offset % 512 || len > JR_MAX_IO)
        return -EINVAL;
    if (!len)
        return 0;
    uint32_t nsec = len / 512;
    unsigned char *covered = calloc(nsec, 1);
    if (!covered)
        return -ENOMEM;
    int rc = enter(j);
    if (rc < 0) {
        free(covered);
        return rc;
    }
    struct vol *v = vol_find(j, vol);
    if (!v || !v->attached || v->detaching) {
        rc = -ENXIO;
    } else if (offset > v->size || len > v->size - offset) {
        rc = -EINVAL;
    }
    /* the overlay does not cover the recovery's backlog until it is in
     * memory: wait for the flusher to bring it in */
    while (!rc && backlog(j)) {
        if (j->stopping)
            rc = -ESHUTDOWN;
        else if (j->journal_error)
            rc = j->journal_error;
        else if (!j->started)
            rc = -EAGAIN;
        else
            pthread_cond_wait(&j->cv_progress, &j->mu);
    }
    if (rc) {
        leave(j);
        free(covered);
        return rc;
    }
    /* the newest unflushed data, copied under the lock */
    uint32_t ncov = 0;
    uint64_t s0 = offset / 512;
    for (uint32_t i = 0; i < nsec;) {
        uint64_t blk = (s0 + i) / IX_SECT;
        struct ixnode *n = j->ixcount ? ix_find(j, vol, blk) : NULL;
        for (; i < nsec && (s0 + i) / IX_SECT == blk; i++) {
            unsigned k = (unsigned)((s0 + i) % IX_SECT);
            if (n && (n->mask & (1u << k))) {
                memcpy((unsigned char *)buf + (size_t)i * 512, j->ring + n->lpos[k] % j->cap, 512);
                covered[i] = 1;
                ncov++;
            }
        }
    }
    /* unflushed discards: zeros where no newer write covers (see IN MEMORY) */
    for (struct dnode *d = j->dhead; d && ncov < nsec; d = d->next) {
        if (d->vol != vol || d->off >= offset + len || d->off + d->len <= offset)
            continue;
        uint64_t a = d->off > offset ? d->off : offset;
        uint64_t b = d->off + d->len < offset + len ? d->off + d->len : offset + len;
        for (uint64_t i = (a - offset) / 512; i < (b - offset) / 512; i++) {
            if (!covered[i]) {
                memset((unsigned char *)buf + i * 512, 0, 512);
                covered[i] = 1;
                ncov++;
            }
        }
    }
    if (ncov == nsec) {
        leave(j);
        free(covered);
        return 0;
    }
    /* the rest is current on the dm device: a sector leaves the index only
     * once its newest record has completed there */
    v->busy++;
    pthread_mutex_unlock(&j->mu);
    if (!ncov) {
        rc = vol_pread(j, v, buf, len, offset);
    } else {
        for (uint32_t i = 0; i < nsec && !rc;) {
            if (covered[i]) {
                i++;
                continue;
            }
            uint32_t e = i;
            while (e < nsec && !covered[e])
                e++;
            rc = vol_pread(j, v, (unsigned char *)buf + (size_t)i * 512, (e - i) * 512,
                           offset + (uint64_t)i * 512);
            i = e;
        }
    }
    pthread_mutex_lock(&j->mu);
    v->busy--;
    pthread_cond_broadcast(&j->cv_progress);
    leave(j);
    free(covered);
    return rc;
}

/* ------------------------------------------------------------ markers */

int jr_next_marker(jr_t *j, uint32_t timeout_ms, uint64_t *marker_id, uint64_t *seq,
                   void *payload, uint32_t *len)
{
    struct timespec dl;
    deadline_in(&dl, timeout_ms);
    int rc = enter(j);
    if (rc < 0)
        return rc;
    while (!j->marker_ready && !j->stopping) {
        if (wait_until(&j->cv_marker, &j->mu, &dl) == ETIMEDOUT && !j->marker_ready) {
            rc = -ETIMEDOUT;
            break;
        }
    }
    if (j->stopping) {
        rc = -ESHUTDOWN;
    } else if (!rc) {
        if (marker_id)
            *marker_id = j->m_id;
        if (seq)
            *seq = j->m_seq;
        if (payload)
            memcpy(payload, j->m_payload, j->m_len);
        if (len)
            *len = j->m_len;
    }
    leave(j);
    return rc;
}

int jr_marker_done(jr_t *j, uint64_t marker_id)
{
    int rc = enter(j);
    if (rc < 0)
        return rc;
    if (!j->marker_ready || j->m_id != marker_id) {
        rc = -EINVAL;
    } else {
        j->marker_ready = 0;
        pthread_cond_signal(&j->cv_flush);
    }
    leave(j);
    return rc;
}

/* ------------------------------------------------------------ stats, close */

void jr_get_stats(jr_t *j, struct jr_stats *st)
{
    pthread_mutex_lock(&j->mu);
    memset(st, 0, sizeof *st);
    st->mode = j->mode;
    st->align = j->align;
    st->capacity = j->cap;
    st->used = j->head_lpos - j->tail_lpos;
    st->generation = j->generation;
    st->head_seq = j->head_seq;
    st->durable_seq = j->durable_seq;
    st->flushed_seq = j->flush_seq;
    st->checkpoint_seq = j->mode == JR_NV ? j->ckpt_seq : j->conf_seq;
    st->synced_seq = j->synced_seq;
    st->unflushed_records = j->unflushed_records;
    st->unflushed_bytes = j->unflushed_bytes;
    st->markers_pending = j->markers_pending;
    st->recovered_records = j->recovered_records;
    st->appends = j->appends;
    st->commits = j->commits;
    st->dm_writes = j->dm_writes;
    st->full_waits = j->full_waits;
    st->flush_errors = j->flush_errors;
    st->journal_error = j->journal_error;
    st->flush_error = j->flush_error;
    st->flush_error_volume = j->flush_error_volume;
    st->waiting_volume = j->waiting_volume;
    st->direct_io = j->mode == JR_NV ? j->direct : 0;
    st->marker_waiting = j->marker_ready ? 1 : 0;
    st->discards = j->discards;
    st->dm_discards = j->dm_discards;
    st->recovery_end_seq = j->rec.end_seq;
    st->sync_rewinds = j->rewinds;
    st->recovery_dropped = j->rec.dropped;
    st->mem_limit = j->window;
    st->backlog_bytes = j->rec_end_lpos - j->load_lpos;
    st->no_space = j->no_space;
    st->confirmed_seq = j->conf_seq;
    st->confirm_rewinds = j->conf_rewinds;
    pthread_mutex_unlock(&j->mu);
}

void jr_set_no_space(jr_t *j, int err)
{
    pthread_mutex_lock(&j->mu);
    if (err && !j->no_space && j->confirm_on) {
        /* what was applied since the last confirmation may be lost below */
        j->rewind_req = 1;
        j->epoch++; /* a look begun before this one confirms nothing */
        pthread_cond_signal(&j->cv_flush);
    }
    j->no_space = err;
    pthread_mutex_unlock(&j->mu);
}

void jr_set_confirm(jr_t *j, int on)
{
    pthread_mutex_lock(&j->mu);
    j->confirm_on = on != 0;
    if (!j->confirm_on) {
        j->conf_seq = j->synced_seq;
        j->conf_lpos = j->synced_lpos;
        pthread_cond_signal(&j->cv_flush);
    }
    pthread_mutex_unlock(&j->mu);
}

uint64_t jr_confirm_mark(jr_t *j)
{
    pthread_mutex_lock(&j->mu);
    j->mark_seq = j->synced_seq;
    j->mark_lpos = j->synced_lpos;
    j->mark_epoch = j->epoch;
    uint64_t token = j->mark_seq;
    pthread_mutex_unlock(&j->mu);
    return token;
}

int jr_confirm(jr_t *j, uint64_t token)
{
    int rc = 0;
    pthread_mutex_lock(&j->mu);
    if (j->no_space || j->rewind_req || j->mark_epoch != j->epoch || token != j->mark_seq ||
        token > j->synced_seq) {
        rc = -ESTALE; /* a rewind since the mark, or not the latest mark */
    } else if (token > j->conf_seq) {
        j->conf_seq = token;
        j->conf_lpos = j->mark_lpos;
        if (j->mode == JR_RAM)
            set_tail(j, j->conf_lpos);
        pthread_cond_signal(&j->cv_flush); /* NV: the checkpoint may move */
        pthread_cond_broadcast(&j->cv_progress);
    }
    pthread_mutex_unlock(&j->mu);
    return rc;
}

int jr_set_mem_limit(jr_t *j, uint64_t mem_limit)
{
    if (j->mode != JR_NV || (mem_limit && mem_limit < JR_MEM_MIN))
        return -EINVAL;
    int rc = enter(j);
    if (rc < 0)
        return rc;
    /* a ring held whole until now gives its pages back as the tail passes
     * them from here on (set_tail), so within one lap */
    j->window = window_for(j->cap, j->align, mem_limit);
    /* a larger window: writers waiting for room may go on; a smaller one:
     * the flusher's sync threshold (window / 8) changed */
    pthread_cond_broadcast(&j->cv_progress);
    pthread_cond_signal(&j->cv_flush);
    leave(j);
    return 0;
}

int jr_stop(jr_t *j, int drain, uint32_t timeout_ms)
{
    struct timespec dl;
    deadline_in(&dl, timeout_ms);
    int rc = 0;
    pthread_mutex_lock(&j->mu);
    if (j->stopped) {
        pthread_mutex_unlock(&j->mu);
        return 0;
    }
    j->draining = 1; /* appends: -ESHUTDOWN */
    pthread_cond_broadcast(&j->cv_progress);
    if (drain) {
        j->drain_req = 1;
        pthread_cond_signal(&j->cv_flush);
        for (;;) {
            uint64_t done = j->mode == JR_NV ? j->ckpt_seq : j->conf_seq;
            if (done >= j->head_seq)
                break;
            if (!j->started || j->journal_error) {
                rc = j->journal_error ? j->journal_error : -ETIMEDOUT;
                break;
            }
            if (wait_until(&j->cv_progress, &j->mu, &dl) == ETIMEDOUT) {
                done = j->mode == JR_NV ? j->ckpt_seq : j->conf_seq;
                if (done < j->head_seq)
                    rc = -ETIMEDOUT;
                break;
            }
        }
    }
    j->stopping = 1;
    pthread_cond_broadcast(&j->cv_commit);
    wake_durable_all(j);
    pthread_cond_broadcast(&j->cv_flush);
    pthread_cond_broadcast(&j->cv_marker);
    pthread_cond_broadcast(&j->cv_progress);
    pthread_mutex_unlock(&j->mu);
    for (int i = 0; i < j->committers_on; i++)
        pthread_join(j->committer[i], NULL);
    if (j->flusher_on)
        pthread_join(j->flusher, NULL);
    pthread_mutex_lock(&j->mu);
    j->committers_on = j->flusher_on = 0;
    j->stopped = 1;
    wake_durable_all(j);
    pthread_cond_broadcast(&j->cv_progress);
    pthread_mutex_unlock(&j->mu);
    return rc;
}

int jr_close(jr_t *j, int drain, uint32_t timeout_ms)
{
    if (!j)
        return 0;
    int rc = jr_stop(j, drain, timeout_ms);
    pthread_mutex_lock(&j->mu);
    while (j->users)
        pthread_cond_wait(&j->cv_progress, &j->mu);
    pthread_mutex_unlock(&j->mu);
    jr_free_all(j);
    return rc;
}
