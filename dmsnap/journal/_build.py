"""cffi API-mode builder for the journal's C hot path (csrc/journal.c).

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

ROOT = Path(__file__).resolve().parents[2]
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
    "dmsnap.journal._jrffi",
    '#include "journal.h"',
    sources=[f"{CSRC}/journal.c"],
    include_dirs=[CSRC],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
    libraries=["pthread"],
)

if __name__ == "__main__":
    # In-place build: python dmsnap/journal/_build.py (from the repository root)
    os.chdir(ROOT)
    ffibuilder.compile(tmpdir=".", verbose=False)
