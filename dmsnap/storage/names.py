"""Names users give, and the kernel/udev names derived from them.

User names are ``[A-Za-z0-9._-]``, 1 to 48 characters, not starting with
``-``, ``.`` or ``_``, so every derived dm name fits DM_NAME_LEN and every
link is a safe path component. dm UUIDs carry the pool's short id (so two
pools created under the same name over time never share a UUID) and join the
names with ``:`` and ``@``, which names cannot contain, so the udev helper
splits them without ambiguity:

* volume:    name ``dmsnap-POOL-VOL``       uuid ``DMSNAP-vol-ID-POOL:VOL``
* snapshot:  name ``dmsnap-POOL-VOL@SNAP``  uuid ``DMSNAP-snap-ID-POOL:VOL@SNAP``
* internal:  name ``dmsnap-POOL-_LAYER``    uuid ``DMSNAP-int-ID-POOL:_LAYER``
  (internal layer names start with ``_``, which a volume name cannot, so a
  volume called ``wc`` never collides with the writecache layer)
"""

from __future__ import annotations

import re

from dmsnap.dm.udev import Role, make_uuid

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,47}$")
MAX_NAME = 48


class NameError_(ValueError):
    """A user-supplied name is not acceptable (checked before any change)."""


def check_name(kind: str, name: str) -> str:
    if not name:
        raise NameError_(f"{kind} name must not be empty")
    if len(name) > MAX_NAME:
        raise NameError_(f"{kind} name {name!r} is longer than {MAX_NAME} characters")
    if not NAME_RE.match(name) or name.startswith("_"):
        raise NameError_(
            f"{kind} name {name!r} may only contain letters, digits, '.', '_' and '-', "
            "and must not start with '-', '.' or '_'"
        )
    return name


def dm_volume(pool: str, vol: str) -> str:
    return f"dmsnap-{pool}-{vol}"


def dm_snapshot(pool: str, vol: str, snap: str) -> str:
    return f"dmsnap-{pool}-{vol}@{snap}"


def dm_internal(pool: str, layer: str) -> str:
    return f"dmsnap-{pool}-_{layer}"


def uuid_volume(pool_uuid: str, pool: str, vol: str, *, journaled: bool = False) -> str:
    role = Role.JOURNALED if journaled else Role.VOLUME
    return make_uuid(role, f"{pool_uuid[:8]}-{pool}:{vol}")


def uuid_snapshot(pool_uuid: str, pool: str, vol: str, snap: str) -> str:
    return make_uuid(Role.SNAPSHOT, f"{pool_uuid[:8]}-{pool}:{vol}@{snap}")


def uuid_internal(pool_uuid: str, pool: str, layer: str) -> str:
    return make_uuid(Role.INTERNAL, f"{pool_uuid[:8]}-{pool}:_{layer}")


def parse_ref(ref: str, *, snapshot: bool | None = None) -> tuple[str, str, str | None]:
    """``POOL/VOL`` or ``POOL/VOL@SNAP`` → (pool, vol, snap), checked."""
    pool, sep, rest = ref.partition("/")
    if not sep:
        raise NameError_(f"{ref!r}: expected POOL/VOLUME" + ("@SNAPSHOT" if snapshot else ""))
    vol, at, snap = rest.partition("@")
    check_name("pool", pool)
    check_name("volume", vol)
    if at:
        check_name("snapshot", snap)
    if snapshot is True and not at:
        raise NameError_(f"{ref!r}: expected POOL/VOLUME@SNAPSHOT")
    if snapshot is False and at:
        raise NameError_(f"{ref!r}: expected POOL/VOLUME (no @SNAPSHOT here)")
    return pool, vol, (snap if at else None)


def parse_uuid(uuid: str | None) -> tuple[str, str, str, str] | None:
    """``DMSNAP-ROLE-ID-POOL:REST`` → (role, id, pool, rest); None if not ours."""
    if not uuid or not uuid.startswith("DMSNAP-"):
        return None
    try:
        role, short_id, tail = uuid[len("DMSNAP-") :].split("-", 2)
        pool, rest = tail.split(":", 1)
    except ValueError:
        return None
    return role, short_id, pool, rest
