"""Names users give, and the kernel/udev names derived from them.

User names follow :mod:`dmsnap.rules` (``[A-Za-z0-9._-]``, 1 to 48
characters, not starting with ``-``, ``.`` or ``_``). Three names of 48
make a dm name or UUID longer than the kernel takes: :func:`check_volume_ref`
and :func:`check_snapshot_ref` check every derived name before a volume or snapshot is promised.

dm UUIDs carry the pool's short id (so two pools created under the same
name over time never share a UUID) and join the names with ``:`` and
``@``, which names cannot contain, so the udev helper splits them without
ambiguity:

* volume:    name ``dmsnap-POOL-VOL``       uuid ``DMSNAP-vol-ID-POOL:VOL``
* snapshot:  name ``dmsnap-POOL-VOL@SNAP``  uuid ``DMSNAP-snap-ID-POOL:VOL@SNAP``
* internal:  name ``dmsnap-POOL-_LAYER``    uuid ``DMSNAP-int-ID-POOL:_LAYER``
  (internal layer names start with ``_``, which a volume name cannot, so a
  volume called ``wc`` never collides with the writecache layer)
"""

from __future__ import annotations

from dmsnap.dm._dmffi import lib as _dm
from dmsnap.dm.udev import Role, make_uuid
from dmsnap.rules import name_problem

# the kernel's limits (include/uapi/linux/dm-ioctl.h), NUL included
DM_NAME_MAX = _dm.DM_NAME_LEN - 1
DM_UUID_MAX = _dm.DM_UUID_LEN - 1
# every pool's UUID is a uuid4 hex: its first 8 characters go into dm UUIDs
_SHORT_ID = "0" * 8


class BadName(ValueError):
    """A user-supplied name is not acceptable (checked before any change)."""


def check_name(kind: str, name: str) -> str:
    """``name`` if it is an acceptable ``kind`` name (:mod:`dmsnap.rules`)."""
    if (why := name_problem(kind, name)) is not None:
        raise BadName(why)
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


def _derived(pool: str, vol: str, snap: str | None) -> list[tuple[str, str, int]]:
    """(what, derived name, limit) of every kernel name dmsnap may make for
    POOL/VOL (or POOL/VOL@SNAP) on any backend: the dm device, its UUID and
    the internal layers (classic: ``VOL.real``, ``VOL@SNAP.cow``/``.snap``)."""
    layers = [f"{vol}.real"] if snap is None else [f"{vol}@{snap}.cow", f"{vol}@{snap}.snap"]
    out = []
    if snap is None:
        out += [
            ("dm name", dm_volume(pool, vol), DM_NAME_MAX),
            ("dm UUID", uuid_volume(_SHORT_ID, pool, vol, journaled=True), DM_UUID_MAX),
        ]
    else:
        out += [
            ("dm name", dm_snapshot(pool, vol, snap), DM_NAME_MAX),
            ("dm UUID", uuid_snapshot(_SHORT_ID, pool, vol, snap), DM_UUID_MAX),
        ]
    for layer in layers:
        out += [
            ("dm name", dm_internal(pool, layer), DM_NAME_MAX),
            ("dm UUID", uuid_internal(_SHORT_ID, pool, layer), DM_UUID_MAX),
        ]
    return out


def _check_derived(pool: str, vol: str, snap: str | None) -> None:
    ref = f"{pool}/{vol}" + (f"@{snap}" if snap is not None else "")
    for what, derived, limit in _derived(pool, vol, snap):
        n = len(derived.encode())
        if n > limit:
            # the longest derived name is a classic snapshot's internal
            # layer's UUID: 28 bytes of dmsnap's own plus the three names
            budget = DM_UUID_MAX - 28
            raise BadName(
                f"{ref}: names too long for the kernel: its {what} would be {n} bytes, "
                f"the limit is {limit} (pool, volume and snapshot names together at most "
                f"{budget} characters)"
            )


def check_volume_ref(pool: str, vol: str) -> tuple[str, str]:
    """POOL/VOL checked, and every kernel name derived from it fits."""
    check_name("pool", pool)
    check_name("volume", vol)
    _check_derived(pool, vol, None)
    return pool, vol


def check_snapshot_ref(pool: str, vol: str, snap: str) -> tuple[str, str, str]:
    """POOL/VOL@SNAP checked, and every kernel name derived from it fits:
    called before a snapshot is promised (CLI, control protocol, in-band)."""
    check_name("pool", pool)
    check_name("volume", vol)
    check_name("snapshot", snap)
    _check_derived(pool, vol, snap)
    return pool, vol, snap


def parse_ref(ref: str, *, snapshot: bool | None = None) -> tuple[str, str, str | None]:
    """``POOL/VOL`` or ``POOL/VOL@SNAP`` → (pool, vol, snap), checked."""
    pool, sep, rest = ref.partition("/")
    if not sep:
        raise BadName(f"{ref!r}: expected POOL/VOLUME" + ("@SNAPSHOT" if snapshot else ""))
    vol, at, snap = rest.partition("@")
    check_name("pool", pool)
    check_name("volume", vol)
    if at:
        check_name("snapshot", snap)
    if snapshot is True and not at:
        raise BadName(f"{ref!r}: expected POOL/VOLUME@SNAPSHOT")
    if snapshot is False and at:
        raise BadName(f"{ref!r}: expected POOL/VOLUME (no @SNAPSHOT here)")
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
