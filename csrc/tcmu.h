/* dmsnap TCMU ring handler: one LIO user backstore (a UIO device) served
 * from a pool's journal (DESIGN.md sections 2 and 3).
 *
 * Worker threads fetch commands from the TCMU command ring themselves (the
 * ring's head is in shared memory: a worker that finishes a command takes
 * the next ones without a system call or a hand-off; one idle worker sleeps
 * in poll() on the UIO device for the kernel's next event), copying each
 * one's CDB and iovecs out of the ring entry (completions may steal that
 * entry, see below). READ and WRITE (6/10/12/16) whose fields are all
 * well-formed are the fast path: the workers run them against the journal
 * (jr_writev / jr_read, FUA honoured) straight from and into the ring's
 * data area (a read spread over more than a few pieces of it goes through
 * a bounce buffer), so many are in flight at once and a NV journal's group
 * commit batches them. Everything else (and any READ/WRITE with a field that needs
 * sense data) is handed to the controller (Python: tc_next_slow /
 * tc_complete), which emulates SPC/SBC and the vendor command.
 *
 * Completion is out of order (TCMU_MAILBOX_FLAG_CAP_OOOC, required): the
 * response is written into the entry at cmd_tail with the completed
 * command's cmd_id, and cmd_tail moves past it; the kernel matches by id.
 *
 * Thread-safe; blocking calls release the GIL (cffi). Errors: -errno.
 */
#ifndef DMSNAP_TCMU_H
#define DMSNAP_TCMU_H

#include <stdint.h>

#include "journal.h"

typedef struct tc_dev tc_dev_t;

#define TC_MAX_CDB 32

struct tc_config {
    uint32_t vol;        /* journal volume id */
    uint64_t size;       /* bytes exported */
    uint32_t block_size; /* 512 */
    int32_t read_only;   /* writes go to the slow path (DATA PROTECT there) */
    int32_t workers;     /* fast-path threads (0: a default) */
    uint32_t timeout_ms; /* journal wait bound before BUSY */
    int32_t null_io;     /* bench only (j NULL): READ/WRITE answered GOOD with no I/O */
    int32_t worker_nice; /* fast-path threads this much nicer than their creator (0: same) */
};

/* A command for the controller. data_len is the total length of the
 * command's data buffer (Data-Out content or Data-In room). */
struct tc_slow {
    uint16_t cmd_id;
    uint8_t cdb[TC_MAX_CDB];
    uint32_t cdb_len;
    uint32_t data_len;
};

/* Fast-path latency histogram (time from a worker taking a READ/WRITE to
 * its completion, in the target): bucket i counts commands that took at
 * most TC_LAT_FIRST_US << i microseconds and more than the bucket before;
 * the last bucket counts the rest (+Inf). Not cumulative. */
#define TC_LAT_BUCKETS 20
#define TC_LAT_FIRST_US 16

struct tc_stats {
    uint64_t fetched;    /* commands taken from the ring */
    uint64_t fast_reads;
    uint64_t fast_writes;
    uint64_t slow;       /* handed to the controller */
    uint64_t errors;     /* fast-path commands completed with an error status */
    uint64_t busy;       /* completed BUSY (journal full / stopping) */
    uint32_t inflight;
    uint32_t flags;      /* mailbox flags as the kernel set them */
    uint64_t kicks;      /* completion system calls (concurrent completions share one) */
    /* per-I/O counters for monitoring: relaxed atomics, no lock */
    uint64_t read_bytes;  /* fast-path READs completed GOOD: their bytes */
    uint64_t write_bytes; /* fast-path WRITEs completed GOOD: their bytes */
    uint64_t read_ns;     /* sum of the fast-path READs' latencies */
    uint64_t write_ns;    /* sum of the fast-path WRITEs' latencies */
    uint64_t read_lat[TC_LAT_BUCKETS];
    uint64_t write_lat[TC_LAT_BUCKETS];
};

/* Map the UIO device (map_size from /sys/class/uio/uioN/maps/map0/size),
 * check the mailbox (version 2, out-of-order completion), start threads.
 * j may be NULL for a device with no journal (every command slow). */
int tc_open(const char *uio_path, uint64_t map_size, jr_t *j, const struct tc_config *cfg,
            tc_dev_t **out);

/* Next command for the controller: 0 and *out filled, or -ETIMEDOUT /
 * -ESHUTDOWN. */
int tc_next_slow(tc_dev_t *d, uint32_t timeout_ms, struct tc_slow *out);
/* Copy up to len bytes of a pending command's data buffer (its Data-Out). */
int tc_data_out(tc_dev_t *d, uint16_t cmd_id, void *buf, uint32_t len);
/* Complete a controller command: status, Data-In (copied into the
 * command's buffer; a shorter one is reported as a residual), sense. */
int tc_complete(tc_dev_t *d, uint16_t cmd_id, uint8_t status, const void *data_in,
                uint32_t data_len, const void *sense, uint32_t sense_len);

/* Sense format of fast-path errors: descriptor (the initiator set D_SENSE
 * in the control mode page) or fixed. */
void tc_set_desc_sense(tc_dev_t *d, int on);

void tc_get_stats(tc_dev_t *d, struct tc_stats *st);

/* Stop: commands not yet complete are completed BUSY (initiators retry),
 * threads joined, the ring unmapped. */
void tc_close(tc_dev_t *d);

#endif
