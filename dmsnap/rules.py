"""The rules of the system, in one place: which names, labels, backends,
journal modes and sizes dmsnap accepts.

Every layer that checks one of them asks here: the CLI, the daemon's
control protocol, the storage core, and the SCSI snapshot command's codec
(which the initiator side uses on client hosts, so this module imports
nothing of dmsnap's and no compiled extension). What only the kernel
decides (dm name and UUID lengths) stays with the code that builds those
names, :mod:`dmsnap.storage.names`.
"""

from __future__ import annotations

import re

# -- sizes -----------------------------------------------------------------------------

SECTOR = 512
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

DEFAULT_EMBEDDED_SIZE = 4 * GiB  # an embedded pool's data file without --size
MIN_POOL_SIZE = 64 * MiB
MIN_CACHE_SIZE = 4 * MiB  # a writecache device
DEFAULT_JOURNAL_SIZE = 64 * MiB
MIN_JOURNAL_SIZE = 4 * MiB

# -- names -----------------------------------------------------------------------------
#
# Pool, volume and snapshot names: ``[A-Za-z0-9._-]``, 1 to 48 characters,
# not starting with ``-``, ``.`` or ``_`` (so every link is a safe path
# component, and ``_`` stays free for dmsnap's internal layers). Checked
# with fullmatch: ``$`` would let a trailing newline through.

MAX_NAME = 48
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,47}")


def name_problem(kind: str, name: str) -> str | None:
    """Why ``name`` is not an acceptable ``kind`` name, or None."""
    if not name:
        return f"{kind} name must not be empty"
    if len(name) > MAX_NAME:
        return f"{kind} name {name!r} is longer than {MAX_NAME} characters"
    if not NAME_RE.fullmatch(name):
        return (
            f"{kind} name {name!r} may only contain letters, digits, '.', '_' and '-', "
            "and must not start with '-', '.' or '_'"
        )
    return None


# -- labels (on snapshot groups) -------------------------------------------------------
#
# For people and schedulers: short keys, one-line values.

MAX_LABEL_KEY = 63
MAX_LABEL_VALUE = 256  # characters
MAX_LABEL_VALUE_BYTES = 1024  # UTF-8, as the SCSI command carries it
MAX_LABELS = 16  # per in-band request (the CDB's parameter list is small)
LABEL_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")  # 1 + 62 = MAX_LABEL_KEY


def label_problem(key: str, value: str) -> str | None:
    """Why ``key=value`` is not an acceptable label, or None."""
    if not LABEL_KEY_RE.fullmatch(key):
        return (
            f"label key {key!r} may only contain letters, digits, '.', '_', '-', '/' "
            f"(at most {MAX_LABEL_KEY}, starting with a letter or digit)"
        )
    if len(value) > MAX_LABEL_VALUE or any(c in value for c in "\n\r\0"):
        return f"label {key!r}: value must be one line of at most {MAX_LABEL_VALUE} characters"
    if len(value.encode()) > MAX_LABEL_VALUE_BYTES:
        return f"label {key!r}: value longer than {MAX_LABEL_VALUE_BYTES} bytes"
    return None


# -- pools -----------------------------------------------------------------------------

BACKENDS = ("thin", "classic")  # dmsnap.storage.backend.BACKENDS implements each
DEFAULT_BACKEND = "thin"
JOURNAL_MODES = ("nv", "ram", "none")
DEFAULT_JOURNAL_MODE = "nv"  # the safe default: every acknowledged write survives a crash
EXPORT_KINDS = ("local", "iscsi")


def choice_problem(what: str, value: object, choices: tuple[str, ...]) -> str | None:
    if value in choices:
        return None
    return f"{what} must be one of {', '.join(choices)}, not {value!r}"
