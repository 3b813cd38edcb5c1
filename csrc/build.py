"""cffi API-mode builder for the C hot path: the journal (csrc/journal.c) and
the TCMU ring handler (csrc/tcmu.c), one module ``dmsnap._hotpath`` because
the ring handler calls the journal directly.

The C side owns the threads (group committer, flusher) and never calls back
into Python; cffi releases the GIL around every call, so Python threads
blocked in ``jr_write`` / ``jr_next_marker`` do not hold each other up.

``DMSNAP_JOURNAL_SANITIZE=1`` builds with AddressSanitizer + UBSan (load the
result with ``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``);
``tests/host/test_journal_c.py`` also compiles the C file with sanitizers
into a stand-alone driver.
"""

import os
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parents[1]
# Paths relative to the repository root when built from there (setuptools
# runs the builders with the root as working directory), absolute otherwise.
_rel = Path.cwd().resolve() == ROOT
CSRC = "csrc" if _rel else str(ROOT / "csrc")

CDEF = r"""
#define JR_NV ...
#define JR_RAM ...
#define JR_FUA ...
#define JR_MAX_PAYLOAD ...
#define JR_MAX_IO ...

typedef struct jr jr_t;
struct iovec { void *iov_base; size_t iov_len; ...; };

struct jr_stats {
    int32_t mode;
    uint32_t align;
    uint64_t capacity;
    uint64_t used;
    uint64_t generation;
    uint64_t head_seq;
    uint64_t durable_seq;
    uint64_t flushed_seq;
    uint64_t checkpoint_seq;
    uint64_t unflushed_records;
    uint64_t unflushed_bytes;
    uint64_t markers_pending;
    uint64_t recovered_records;
    uint64_t appends;
    uint64_t commits;
    uint64_t dm_writes;
    uint64_t full_waits;
    int32_t journal_error;
    int32_t flush_error;
    uint32_t flush_error_volume;
    uint32_t waiting_volume;
    uint64_t synced_seq;
    uint64_t flush_errors;
    int32_t direct_io;
    int32_t marker_waiting;
    uint64_t discards;
    uint64_t dm_discards;
    ...;
};

int jr_format(const char *path, uint64_t size, uint32_t align, uint64_t journal_id);
int jr_open(const char *path, int mode, uint64_t ram_size, jr_t **out);
int jr_pending_volumes(jr_t *j, uint32_t *vols, int max);
int jr_attach(jr_t *j, uint32_t vol, const char *dm_path, uint64_t size);
int jr_detach(jr_t *j, uint32_t vol, uint32_t timeout_ms);
int jr_forget(jr_t *j, uint32_t vol);
int jr_start(jr_t *j);
int64_t jr_write(jr_t *j, uint32_t vol, uint64_t offset, const void *buf, uint32_t len,
                 uint32_t flags, uint32_t timeout_ms);
int64_t jr_writev(jr_t *j, uint32_t vol, uint64_t offset, const struct iovec *iov, int iovcnt,
                  uint32_t flags, uint32_t timeout_ms);
int64_t jr_discard(jr_t *j, uint32_t vol, uint64_t offset, uint64_t length, uint32_t flags,
                   uint32_t timeout_ms);
int jr_read(jr_t *j, uint32_t vol, uint64_t offset, void *buf, uint32_t len);
int64_t jr_marker(jr_t *j, uint64_t marker_id, const void *payload, uint32_t len,
                  uint32_t timeout_ms);
int jr_sync(jr_t *j, uint32_t timeout_ms);
int jr_next_marker(jr_t *j, uint32_t timeout_ms, uint64_t *marker_id, uint64_t *seq,
                   void *payload, uint32_t *len);
int jr_marker_done(jr_t *j, uint64_t marker_id);
void jr_get_stats(jr_t *j, struct jr_stats *st);
int jr_stop(jr_t *j, int drain, uint32_t timeout_ms);
int jr_close(jr_t *j, int drain, uint32_t timeout_ms);
uint32_t jr_crc32c(const void *buf, size_t len);
uint32_t jr_crc32c_table(const void *buf, size_t len);
uint32_t jr_crc32c_variant(int which, const void *buf, size_t len);
const char *jr_crc32c_impl(void);

#define TC_MAX_CDB ...
typedef struct tc_dev tc_dev_t;
struct tc_config {
    uint32_t vol;
    uint64_t size;
    uint32_t block_size;
    int32_t read_only;
    int32_t workers;
    uint32_t timeout_ms;
    int32_t null_io;
    int32_t worker_nice;
};
struct tc_slow {
    uint16_t cmd_id;
    uint8_t cdb[...];
    uint32_t cdb_len;
    uint32_t data_len;
};
struct tc_stats {
    uint64_t fetched;
    uint64_t fast_reads;
    uint64_t fast_writes;
    uint64_t slow;
    uint64_t errors;
    uint64_t busy;
    uint32_t inflight;
    uint32_t flags;
    uint64_t kicks;
};
int tc_open(const char *uio_path, uint64_t map_size, jr_t *j, const struct tc_config *cfg,
            tc_dev_t **out);
int tc_next_slow(tc_dev_t *d, uint32_t timeout_ms, struct tc_slow *out);
int tc_data_out(tc_dev_t *d, uint16_t cmd_id, void *buf, uint32_t len);
int tc_complete(tc_dev_t *d, uint16_t cmd_id, uint8_t status, const void *data_in,
                uint32_t data_len, const void *sense, uint32_t sense_len);
void tc_set_desc_sense(tc_dev_t *d, int on);
void tc_get_stats(tc_dev_t *d, struct tc_stats *st);
void tc_close(tc_dev_t *d);
"""

_cflags = ["-O2", "-Wall", "-Wextra", "-Werror", "-pthread"]
_ldflags: list[str] = []
if os.environ.get("DMSNAP_JOURNAL_SANITIZE") == "1":
    _san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
    _cflags = [*_cflags[1:], "-O1", *_san]
    _ldflags = _san

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "dmsnap._hotpath",
    '#include "journal.h"\n#include "tcmu.h"',
    sources=[f"{CSRC}/journal.c", f"{CSRC}/tcmu.c"],
    include_dirs=[CSRC],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
    libraries=["pthread"],
)

if __name__ == "__main__":
    # In-place build: python csrc/build.py
    os.chdir(ROOT)
    ffibuilder.compile(tmpdir=".", verbose=False)
