"""cffi API-mode builder for the C hot path: the journal (csrc/journal.c,
with its checksum csrc/crc32c.c) and the TCMU ring handler (csrc/tcmu.c),
one module ``dmsnap._hotpath`` because the ring handler calls the journal
directly.

The C side owns the threads (group committer, flusher) and never calls back
into Python; cffi releases the GIL around every call, so Python threads
blocked in ``jr_write`` / ``jr_next_marker`` do not hold each other up.

``DMSNAP_JOURNAL_SANITIZE=1`` builds with AddressSanitizer + UBSan (load the
result with ``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``);
``tests/host/test_journal_c.py`` also compiles the C file with sanitizers
into a stand-alone driver.
"""

import os
import re
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parents[1]
# Paths relative to the repository root when built from there (setuptools
# runs the builders with the root as working directory), absolute otherwise.
_rel = Path.cwd().resolve() == ROOT
CSRC = "csrc" if _rel else str(ROOT / "csrc")

HEADERS = ("crc32c.h", "journal.h", "tcmu.h")  # the C API, in include order

# What the headers take from the system headers they include.
_SYSTEM = "struct iovec { void *iov_base; size_t iov_len; ...; };\n"


def cdef_from_headers(headers: tuple[str, ...] = HEADERS) -> str:
    """The cffi declarations, read from the C headers themselves so the
    Python side can never drift from them: comments and the preprocessor
    lines cffi does not take (guards, includes) go. A constant that is a
    plain number stays (array sizes use it; cffi checks it against the
    compiler), any other is left for the compiler to supply (``...``)."""
    out = [_SYSTEM]
    for name in headers:
        text = (ROOT / "csrc" / name).read_text()
        text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
        text = re.sub(r"//[^\n]*", "", text)
        for line in text.splitlines():
            if m := re.match(r"\s*#\s*define\s+(\w+)\s+(\S.*?)\s*$", line):
                value = m.group(2) if m.group(2).isdigit() else "..."
                out.append(f"#define {m.group(1)} {value}")
            elif not line.lstrip().startswith("#"):
                out.append(line)
    return "\n".join(out)


CDEF = cdef_from_headers()

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
    sources=[f"{CSRC}/crc32c.c", f"{CSRC}/journal.c", f"{CSRC}/tcmu.c"],
    include_dirs=[CSRC],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
    libraries=["pthread"],
)

if __name__ == "__main__":
    # In-place build: python csrc/build.py
    os.chdir(ROOT)
    ffibuilder.compile(tmpdir=".", verbose=False)
