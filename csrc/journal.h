/* dmsnap ordered journal: the write cache of one pool (DESIGN.md section 1).
 *
 * A FIFO of checksummed records in a ring. Writes are appended in order;
 * a MARKER record is a snapshot request and its position is the point in
 * time. A flusher thread drains records to the volumes' dm devices strictly
 * in ring order (coalescing adjacent writes where order allows; a DISCARD
 * record is applied alone, in its place). When it
 * reaches a MARKER it waits until every earlier write has completed,
 * fdatasync()s the dm devices it wrote, and then stops there until the
 * controller (Python: jr_next_marker / jr_marker_done) has created the
 * snapshot. Reads overlay unflushed records on the dm device.
 *
 * Modes:
 *   JR_NV   the ring lives on a device or file (O_DIRECT|O_DSYNC where the
 *           file system allows, else buffered + O_DSYNC); a write returns
 *           once its record is durable. One committer thread writes every
 *           record appended meanwhile in one go (group commit). The live
 *           part of the ring (records not yet checkpointed) is mirrored in
 *           RAM, so overlay reads and the flusher never read the journal
 *           device; that part is bounded by the journal's memory limit
 *           (jr_open_ex, jr_set_mem_limit), not by the ring's size.
 *   JR_RAM  the ring is in RAM only; a write returns once copied. JR_FUA
 *           and jr_sync() wait until the data is on the dm device and the
 *           device has been fdatasync()ed.
 *
 * On-disk layout (NV): two 4 KiB superblock slots at 0 and 4096, the ring
 * from 8192 to the end. The superblock (magic, version, journal_id,
 * generation, capacity, alignment, checkpoint seq+position, sb_seq, crc32c)
 * is written alternately to the two slots; the valid slot with the highest
 * sb_seq wins. generation is incremented and written at every jr_open, and
 * every record carries the generation it was written in: records left over
 * from a torn batch of an earlier generation can never be taken for new
 * ones. A record is one 512-byte header sector (magic, type, generation,
 * seq, volume, offset, length, marker id, data crc32c, header crc32c)
 * followed by its data (write) or payload (marker), padded to the ring
 * alignment (512 or the device's logical block size). A PAD record fills
 * the space left at the end of the ring before wrapping. Recovery walks the
 * ring from the checkpoint and accepts records while magic, journal_id,
 * seq (exactly the next), generation (non-decreasing, <= current) and both
 * checksums are right; the first bad record ends the log. Each record also
 * says how far the journal was durable when it was appended, so that
 * recovery can tell a torn tail (dropped, counted) from a damaged record
 * that was acknowledged (jr_open refuses; see jr_open_ex).
 *
 * The checkpoint only moves past records that are durable on the dm device
 * (written, then fdatasync()ed). Ring space is reclaimed only behind the
 * checkpoint (NV) or behind synced records (RAM). When the ring is full,
 * writers wait (up to their timeout) and never overwrite unflushed records.
 * A failed fdatasync is never retried over the same pages (Linux marks
 * them clean after a writeback error, so the retry would succeed over data
 * that never reached the device): the flusher goes back to the last good
 * sync and writes the failed volumes' records again from the ring, serving
 * reads of them from the overlay meanwhile; flush_error reports it.
 *
 * All functions are thread-safe and may block; they never call back into
 * Python (cffi releases the GIL around them). Errors are negative errnos:
 *   -EINVAL   bad argument (alignment, range beyond the volume, size);
 *   -ENXIO    volume not attached;
 *   -ETIMEDOUT the wait ran out (journal full, marker not reached...);
 *   -EIO      (or the device's errno) the journal device failed; sticky;
 *   -ESHUTDOWN the journal is closing;
 *   -EBADMSG  jr_open: no valid superblock (not a journal / wrong size);
 *   -EUCLEAN  jr_open: a damaged record in the middle of the log (jr_open_ex);
 *   -EPROTONOSUPPORT jr_open: a journal of a later on-disk format;
 *   -EAGAIN   jr_write/jr_marker/jr_sync before jr_start;
 *   -EBUSY    jr_attach of an attached volume, jr_start twice.
 * The exact byte layout is written down at the top of csrc/journal.c.
 * Every record (PAD included) takes one seq, so the seqs returned to
 * writers grow strictly but may skip numbers.
 */
#ifndef DMSNAP_JOURNAL_H
#define DMSNAP_JOURNAL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "crc32c.h" /* the checksum of superblocks and records */

typedef struct jr jr_t;

#define JR_NV 1
#define JR_RAM 2

#define JR_FUA 1 /* jr_write flag: return only once durable on the dm device (RAM mode) */

#define JR_MAX_PAYLOAD 3584 /* bytes of marker payload (stored after the header: a marker <= 4 KiB) */
#define JR_MAX_IO (8u << 20) /* largest single write */

/* NV: the most RAM the mirror of the live window (records appended and not
 * yet checkpointed) may take. Appends wait, as for a full ring, when the
 * window would grow past it; recovery streams the ring and keeps at most this
 * much of the recovered log in memory, the flusher bringing in the rest as
 * the checkpoint frees room. A ring no larger than the limit is simply held
 * whole. The one default (0 passed to jr_open_ex means it); the minimum holds
 * two of the largest records. */
#define JR_MEM_DEFAULT (256ull << 20)
#ifndef JR_MEM_MIN /* the sanitizer driver lowers it to page through a small ring */
#define JR_MEM_MIN (16ull << 20)
#endif

struct jr_stats {
    int32_t mode;
    uint32_t align;
    uint64_t capacity;          /* ring bytes */
    uint64_t used;              /* ring bytes not yet reclaimable */
    uint64_t generation;
    uint64_t head_seq;          /* next sequence number to be appended */
    uint64_t durable_seq;       /* records < this are durable in the journal */
    uint64_t flushed_seq;       /* records < this have completed on their dm device */
    uint64_t checkpoint_seq;    /* records < this are durable on the dm devices (and,
                                   with jr_set_confirm, confirmed; RAM: confirmed_seq) */
    uint64_t unflushed_records; /* write records appended, not yet completed on dm */
    uint64_t unflushed_bytes;   /* their data bytes */
    uint64_t markers_pending;   /* markers appended, not yet passed by the flusher */
    uint64_t recovered_records; /* records found after the checkpoint at open */
    uint64_t appends;           /* write records appended since open */
    uint64_t commits;           /* group commits (NV) */
    uint64_t dm_writes;         /* pwritev calls by the flusher (after coalescing) */
    uint64_t full_waits;        /* times a writer waited for ring space */
    int32_t journal_error;      /* sticky -errno of the journal device, or 0 */
    int32_t flush_error;        /* last -errno of a dm device write/sync, or 0 */
    uint32_t flush_error_volume;
    uint32_t waiting_volume;    /* flusher stalled on a record of an unattached volume (0: none) */
    /* added by the implementation: */
    uint64_t synced_seq;        /* records < this are on the dm devices and fdatasync()ed */
    uint64_t flush_errors;      /* dm write/sync failures since open (each retried) */
    int32_t direct_io;          /* NV: 1 if the journal device is written O_DIRECT */
    int32_t marker_waiting;     /* 1 while the flusher stands at a marker (jr_next_marker) */
    uint64_t discards;          /* discard records appended since open */
    uint64_t dm_discards;       /* discard records applied by the flusher */
    uint64_t recovery_end_seq;  /* NV: the first seq after the log recovered at open */
    uint64_t recovery_dropped;  /* NV: records found after it at open, not replayed */
    uint64_t sync_rewinds;      /* failed fdatasyncs whose records were written again */
    uint64_t mem_limit;         /* NV: bytes the live window may take in RAM (<= capacity) */
    uint64_t backlog_bytes;     /* NV: recovered log not yet brought into RAM (0: all in) */
    int32_t no_space;           /* -errno set by jr_set_no_space, or 0 */
    uint64_t confirmed_seq;     /* records < this are synced and confirmed (jr_confirm) */
    uint64_t confirm_rewinds;   /* no-space transitions that rewound to it */
};

/* What recovery found after the end of the log (jr_open_ex). */
struct jr_recovery {
    uint64_t end_seq;  /* the first seq not replayed: the log's end */
    uint64_t bad_seq;  /* != 0: the record at end_seq is damaged although it was
                          durable (records appended after it say so) */
    uint64_t dropped;  /* records of this journal found after the end, not replayed */
    uint64_t last_seq; /* the highest seq among them (0: none) */
};

/* Create a fresh, empty journal on path (NV). size: bytes to use (a
 * regular file is created/extended to it; 0 = the whole block device or
 * existing file). align: 0 = choose (512, or the device's logical block
 * size). journal_id identifies this journal in every record. */
int jr_format(const char *path, uint64_t size, uint32_t align, uint64_t journal_id);

/* Open and recover. NV: path of a formatted journal, ram_size ignored,
 * memory limit JR_MEM_DEFAULT. RAM: path NULL, ring of ram_size bytes (that
 * is its memory). Threads are not started yet: attach volumes first
 * (recovered records name them), then jr_start. */
int jr_open(const char *path, int mode, uint64_t ram_size, jr_t **out);

/* jr_open with a memory limit (NV: mem_limit bytes, see JR_MEM_DEFAULT; 0:
 * the default; below JR_MEM_MIN: -EINVAL; ignored in RAM mode), saying what
 * recovery found after the log's end (info may be NULL). Recovery reads the
 * ring through a bounded buffer and keeps at most mem_limit bytes of the
 * recovered log in memory; a longer log (an older journal, a lowered limit)
 * is replayed by the flusher in pieces of that size: until it is all in
 * memory (jr_stats.backlog_bytes 0) reads wait and appends wait for room. The log ends at the first record that is not a valid continuation.
 * Records of this journal found after it are normally the torn tail of a
 * crash (commits that were in flight, never acknowledged): dropped,
 * counted in info->dropped. But if one of them was appended when the
 * record at the end was durable already, that record was acknowledged and
 * is damaged: jr_open refuses with -EUCLEAN (info->bad_seq names it) and
 * changes nothing. discard_from (NV, != 0): the repair; the log is cut
 * before seq discard_from (>= the checkpoint, else -EINVAL with
 * info->end_seq = the checkpoint) and every record of this journal from
 * there on is dropped, its header zeroed on disk, counted in
 * info->dropped; -ERANGE (info->bad_seq) if the log is damaged before
 * discard_from (the records after the damage cannot be replayed). */
int jr_open_ex(const char *path, int mode, uint64_t ram_size, uint64_t mem_limit,
               uint64_t discard_from, struct jr_recovery *info, jr_t **out);

/* Change an open NV journal's memory limit (as jr_open_ex's mem_limit; 0:
 * the default). Lowering it below the live window makes appends wait until
 * the flusher has shrunk the window under it. RAM mode: -EINVAL. */
int jr_set_mem_limit(jr_t *j, uint64_t mem_limit);

/* Volume ids (> 0) with records after the checkpoint; returns the number
 * found (at most max written to vols). */
int jr_pending_volumes(jr_t *j, uint32_t *vols, int max);

/* Attach a volume: dm_path is opened O_DIRECT (buffered if refused),
 * size in bytes bounds writes and reads. */
int jr_attach(jr_t *j, uint32_t vol, const char *dm_path, uint64_t size);
/* Wait (up to timeout_ms) until no record of vol is unflushed and the
 * flusher has fdatasync()ed its device (a failing sync keeps it waiting:
 * the records are written again), then close the device. New writes to
 * vol fail with -ENXIO from the call on. On
 * -ETIMEDOUT the volume stays attached (writes work again; retry later):
 * a marker held by the controller holds the volume's later records too. */
int jr_detach(jr_t *j, uint32_t vol, uint32_t timeout_ms);
/* Drop every unflushed record of vol (a volume that was deleted); the
 * flusher skips them and they leave the overlay at once. Records appended
 * after the call are kept. NV: the volume's end is recorded in the journal
 * (a FORGET record naming vol and the bound: the head seq at the call) and
 * the call returns once that record is durable, so recovery after a crash
 * drops the same records. Works before jr_start (the controller forgets
 * recovered records of volumes deleted meanwhile; written at once) and on
 * attached volumes. The in-memory part always happens; the return says
 * whether the end is durable: 0, or -ETIMEDOUT (no room or not durable in
 * timeout_ms; FORGET records have a reserve of ring space writers cannot
 * take), -ENOSPC (before jr_start: a full ring), or the journal error. */
int jr_forget(jr_t *j, uint32_t vol, uint32_t timeout_ms);

int jr_start(jr_t *j);

/* Append a write; offset and len multiples of 512, len <= JR_MAX_IO (and
 * the record must fit the ring: -EINVAL otherwise). NV ignores JR_FUA
 * (the journal is the stable storage). On -ETIMEDOUT after the append the
 * write may still become durable (like a SCSI command that timed out).
 * Returns once durable (NV) / copied (RAM; with JR_FUA once on the dm
 * device and synced). Returns the record's seq (>= 0) or -errno. */
int64_t jr_write(jr_t *j, uint32_t vol, uint64_t offset, const void *buf, uint32_t len,
                 uint32_t flags, uint32_t timeout_ms);

/* jr_write gathering the data from iovcnt buffers (their total length is
 * the write's: a multiple of 512, <= JR_MAX_IO): the TCMU ring handler
 * journals straight out of the ring's data area, without a bounce copy. */
int64_t jr_writev(jr_t *j, uint32_t vol, uint64_t offset, const struct iovec *iov, int iovcnt,
                  uint32_t flags, uint32_t timeout_ms);

/* Append a discard of [offset, offset + length) (multiples of 512, within
 * the volume, length > 0; no data in the journal, so any length fits).
 * Ordered like a write: reads of the range return zeros from the call on
 * (until a later write), and the flusher applies it in its place: on a
 * block device BLKDISCARD for the part aligned to the device's discard
 * granularity and zero writes for the unaligned head and tail (zeros for
 * everything if the device has no discard), on a regular file a punched
 * hole. Afterwards the range reads zeros on the dm device, provided a
 * discarded aligned range reads zeros there: true of dm-thin (the block is
 * unmapped) and of devices without discard (zero writes); a device whose
 * discard leaves old data would show it. Returns like jr_write (NV: once
 * durable; JR_FUA in RAM mode: once applied and synced). */
int64_t jr_discard(jr_t *j, uint32_t vol, uint64_t offset, uint64_t length, uint32_t flags,
                   uint32_t timeout_ms);

/* Read through the overlay: the newest data, unflushed records over the
 * dm device, partial overlaps at 512-byte granularity. */
int jr_read(jr_t *j, uint32_t vol, uint64_t offset, void *buf, uint32_t len);

/* Append a marker (marker_id != 0, chosen by the controller) carrying an
 * opaque payload (<= JR_MAX_PAYLOAD). Returns its seq once durable (NV) /
 * appended (RAM), or -errno. */
int64_t jr_marker(jr_t *j, uint64_t marker_id, const void *payload, uint32_t len,
                  uint32_t timeout_ms);

/* Every record appended before the call is on the dm devices and they
 * have been fdatasync()ed (a writer's FLUSH). Markers in between must be
 * passed by the controller meanwhile. */
int jr_sync(jr_t *j, uint32_t timeout_ms);

/* The controller's side of a marker: wait until the flusher stands at a
 * marker with every earlier write completed and synced on the dm devices.
 * Fills *marker_id, *seq, payload (buffer of JR_MAX_PAYLOAD) and *len;
 * returns 0, or -ETIMEDOUT / -ESHUTDOWN. The same marker is returned again
 * until jr_marker_done(). Markers recovered at open come through here too,
 * in order. */
int jr_next_marker(jr_t *j, uint32_t timeout_ms, uint64_t *marker_id, uint64_t *seq,
                   void *payload, uint32_t *len);
/* Let the flusher pass the marker it stands at (-EINVAL if it is another). */
int jr_marker_done(jr_t *j, uint64_t marker_id);

void jr_get_stats(jr_t *j, struct jr_stats *st);

/* The daemon's word that the devices below cannot take new blocks (a thin
 * pool out of metadata space, hence read-only): -errno (-ENOSPC), or 0 when
 * they can again. While set, the flusher applies no DISCARD (a read-only
 * thin pool answers one with success and unmaps nothing, so the range would
 * read its old data): it stays in the journal, read as zeros, until cleared.
 * Writers (the SCSI fast path, the Python writer) read it in jr_stats and
 * refuse new writes. */
void jr_set_no_space(jr_t *j, int err);

/* Confirmation, for devices below that may acknowledge what they then lose:
 * a thin pool that goes read-only (out of metadata space) answers a discard
 * with success and unmaps nothing, and a commit that fails rolls its
 * metadata back to the last one. With jr_set_confirm(j, 1) a record synced
 * on the dm device is not yet taken as durable: the checkpoint (NV) and the
 * space behind it (RAM: the ring's tail) stop at the confirmed position, and
 * jr_stats.checkpoint_seq says where that is. The controller confirms by
 * looking at the devices below: jr_confirm_mark() first (it returns a token:
 * what is synced now), then its look (a thin pool's status), and if that
 * shows the pool healthy (writable, its metadata committing), jr_confirm(j,
 * token): the records synced before the mark are durable. A no-space
 * transition (jr_set_no_space(j, -errno) after 0) rewinds the flusher to the
 * confirmed position: those records go back into the overlay and are
 * written again in order once the pool can take them (discards wait while
 * no_space is set), as after a failed fdatasync; markers among them were
 * served and are passed. A look begun before that transition confirms
 * nothing (-ESTALE), nor does one while no_space is set. A record of a volume
 * detached since (deleted, restored) is not written again. Off by default:
 * conf follows the sync. */
void jr_set_confirm(jr_t *j, int on);
uint64_t jr_confirm_mark(jr_t *j);
int jr_confirm(jr_t *j, uint64_t token);

/* The first part of jr_close without freeing: refuse new appends (-ESHUTDOWN),
 * drain as below, stop the threads and wake every waiter (they return
 * -ESHUTDOWN). j stays valid (jr_get_stats works) until jr_close(); a
 * wrapper calls this, waits for its own callers to leave, then jr_close.
 * Idempotent (later calls return 0). */
int jr_stop(jr_t *j, int drain, uint32_t timeout_ms);

/* Stop. With drain, first wait (up to timeout_ms) until every record is
 * flushed and checkpointed (markers still need the controller). Frees j
 * in all cases; returns -ETIMEDOUT if the drain did not finish (NV: the
 * records stay in the journal for the next open; RAM: they are lost and
 * the caller must say so). */
int jr_close(jr_t *j, int drain, uint32_t timeout_ms);

#endif
