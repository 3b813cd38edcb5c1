"""CHAP credentials of an iSCSI export, per initiator: one-way (the target
checks the initiator) or mutual (the initiator checks the target too).

Secrets never come from argv (``ps``, shell history), never go into a log
(the values' repr hides them) and never into the catalog: the CLI reads
them from a root-only file or standard input (:func:`read_file`,
:func:`parse`), sends them over the control socket, and dmsnapd keeps them
in a file of mode 0600 under its state directory (storage.exports).

The file: one initiator a line, ``#`` comments and blank lines ignored::

    # IQN                              USER   SECRET          [MUTUAL_USER MUTUAL_SECRET]
    iqn.2026-11.com.example:app1       app1   s3cret-app1-xx
    iqn.2026-11.com.example:backup     bkp    s3cret-bkp-xxx  tgt  s3cret-tgt-xxx

``*`` for the IQN (alone in the file) gives every initiator of an
``--allow-any`` export the same credentials (LIO's TPG-level CHAP).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

ANY = "*"
# RFC 7143 asks for at least 96 bits; LIO stores up to 255 bytes
MIN_SECRET = 12
MAX_SECRET = 255
MAX_USER = 255
# one token of a whitespace-separated line: printable ASCII, no spaces
_TOKEN = re.compile(r"[\x21-\x7e]+")


class ChapError(ValueError):
    """Credentials that cannot be used (the message never holds a secret)."""


@dataclass(frozen=True)
class ChapCreds:
    initiator: str  # IQN, or ANY
    userid: str
    secret: str = field(repr=False)
    mutual_userid: str | None = None
    mutual_secret: str | None = field(default=None, repr=False)

    @property
    def mutual(self) -> bool:
        return self.mutual_userid is not None

    @property
    def mode(self) -> str:
        return "mutual" if self.mutual else "one-way"

    def to_wire(self) -> list[str]:
        out = [self.initiator, self.userid, self.secret]
        if self.mutual_userid is not None and self.mutual_secret is not None:
            out += [self.mutual_userid, self.mutual_secret]
        return out


def check(fields: Sequence[str], where: str) -> ChapCreds:
    """One entry (IQN, USER, SECRET [, MUTUAL_USER, MUTUAL_SECRET]), checked."""
    if len(fields) not in (3, 5):
        raise ChapError(
            f"{where}: expected IQN USER SECRET [MUTUAL_USER MUTUAL_SECRET], "
            f"got {len(fields)} fields"
        )
    if not all(isinstance(f, str) and _TOKEN.fullmatch(f) for f in fields):
        raise ChapError(f"{where}: fields are printable ASCII without spaces")
    initiator, user, secret = fields[:3]
    for u in (user, *fields[3:4]):
        if len(u) > MAX_USER:
            raise ChapError(f"{where}: a CHAP user name is at most {MAX_USER} characters")
    for what, s in (("secret", secret), ("mutual secret", fields[4] if len(fields) == 5 else "")):
        if s and not MIN_SECRET <= len(s) <= MAX_SECRET:
            raise ChapError(
                f"{where}: the CHAP {what} must be {MIN_SECRET} to {MAX_SECRET} characters"
            )
    if len(fields) == 5:
        if fields[4] == secret:
            # RFC 7143 12.1.3: the target's secret is not the initiator's (a
            # reflection would let anyone answer the target's challenge)
            raise ChapError(f"{where}: the mutual secret must differ from the secret")
        return ChapCreds(initiator, user, secret, fields[3], fields[4])
    return ChapCreds(initiator, user, secret)


def parse(text: str, source: str) -> list[ChapCreds]:
    """The entries of a CHAP file; an error names the line, never a secret."""
    out: list[ChapCreds] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out.append(check(line.split(), f"{source} line {n}"))
    if not out:
        raise ChapError(f"{source}: no CHAP entry (IQN USER SECRET [MUTUAL_USER MUTUAL_SECRET])")
    return out


def from_wire(value: Iterable[Sequence[str]]) -> list[ChapCreds]:
    out = [check(list(e), f"CHAP entry {i}") for i, e in enumerate(value, 1)]
    seen = [c.initiator for c in out]
    if len(set(seen)) != len(seen):
        raise ChapError("the CHAP entries name an initiator twice")
    return out


def read_file(path: str) -> str:
    """A CHAP file's text, if only its owner (root or the caller) can read
    or change it: a secret others can read is not a secret. Opened without
    following a symlink, checked on the open descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise ChapError(f"--chap-file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ChapError(f"--chap-file {path}: not a regular file")
        if st.st_uid not in (0, os.geteuid()):
            raise ChapError(f"--chap-file {path}: owned by uid {st.st_uid}, not root or you")
        if st.st_mode & 0o077:
            raise ChapError(
                f"--chap-file {path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read "
                "or change it (chmod 600)"
            )
        with os.fdopen(fd, encoding="utf-8", errors="strict") as f:
            fd = -1
            return f.read(1 << 20)
    except UnicodeDecodeError:
        raise ChapError(f"--chap-file {path}: not text") from None
    finally:
        if fd >= 0:
            os.close(fd)
