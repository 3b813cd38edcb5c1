"""Names users give (CLI, control protocol, in-band snapshot command) and
the kernel names derived from them: a name is checked whole (no trailing
newline slips through ``$``), and every derived dm name, dm UUID and link
fits the kernel's limits before anything is promised: the request is
refused with a one-line error (in-band: a sense answer), nothing recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_scsi_support import FakeLun, FakeSnapshots, emulator, sense_of

from dmsnap import errors as E
from dmsnap.daemon import protocol as proto
from dmsnap.dm._dmffi import lib as dmlib
from dmsnap.scsi import sense as S
from dmsnap.scsi import snapcmd as SC
from dmsnap.scsi.sense import FieldPointer
from dmsnap.storage import exports, names
from dmsnap.storage.inband import InbandSnapshots
from dmsnap.storage.manager import Manager

TOKEN = bytes(range(1, 17))
IQN = "iqn.2026-11.org.example:a"

ok_names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,47}\Z")


# -- a name is checked whole --------------------------------------------------------------


@pytest.mark.parametrize("bad", ["tank\n", "tank\r\n", "ta\nnk", "\ntank"])
def test_storage_names_refuse_newlines(bad: str) -> None:
    with pytest.raises(names.BadName):
        names.check_name("pool", bad)


def test_iscsi_names_refuse_a_trailing_newline() -> None:
    with pytest.raises(E.InvalidArgument, match="not an iSCSI name"):
        exports._check_iqn(IQN + "\n")
    assert exports._check_iqn(IQN) == IQN


def test_label_keys_refuse_a_trailing_newline() -> None:
    with pytest.raises(E.InvalidArgument):
        proto.check_label("owner\n", "x")
    assert SC.check_label("owner\n", "x") is not None


def test_inband_name_with_a_trailing_newline_is_refused_with_a_field_pointer() -> None:
    assert SC.check_name("nightly\n") is not None
    params = bytearray(SC.encode_create(SC.CreateRequest(TOKEN, "nightly")))
    # the same request with the name "nightly\n" (length 8)
    params[SC.OFF_NAME_LEN] = 8
    params[SC.OFF_NAME : SC.OFF_NAME + 7] = b"nightly"
    params.insert(SC.OFF_NAME + 7, 0x0A)
    snaps = FakeSnapshots()
    emu = emulator(FakeLun(), snaps)
    r = emu.execute(SC.create_cdb(len(params)), bytes(params))
    assert sense_of(r) == (S.Key.ILLEGAL_REQUEST, *S.INVALID_FIELD_IN_PARAMETER_LIST)
    sense = r.decoded_sense()
    assert sense is not None and sense.field == FieldPointer(SC.OFF_NAME, 7, cdb=False)
    assert not snaps.created


@given(ok_names, st.sampled_from(["\n", "\r", "\x00", " "]))
def test_any_name_with_a_control_tail_is_refused_everywhere(name: str, tail: str) -> None:
    with pytest.raises(names.BadName):
        names.check_name("volume", name + tail)
    assert SC.check_name(name + tail) is not None


# -- derived names fit the kernel ---------------------------------------------------------


def _derived_fit(pool: str, vol: str, snap: str | None) -> bool:
    """Every dm name / UUID dmsnap would make for this snapshot (or volume),
    on any backend, within DM_NAME_LEN / DM_UUID_LEN (NUL included)."""
    short = "0123abcd" * 4
    dm_names = [names.dm_volume(pool, vol), names.dm_internal(pool, f"{vol}.real")]
    uuids = [
        names.uuid_volume(short, pool, vol, journaled=True),
        names.uuid_internal(short, pool, f"{vol}.real"),
    ]
    if snap is not None:
        dm_names += [
            names.dm_snapshot(pool, vol, snap),
            names.dm_internal(pool, f"{vol}@{snap}.cow"),
            names.dm_internal(pool, f"{vol}@{snap}.snap"),
        ]
        uuids += [
            names.uuid_snapshot(short, pool, vol, snap),
            names.uuid_internal(short, pool, f"{vol}@{snap}.snap"),
        ]
    return all(len(n.encode()) < dmlib.DM_NAME_LEN for n in dm_names) and all(
        len(u.encode()) < dmlib.DM_UUID_LEN for u in uuids
    )


@given(ok_names, ok_names, ok_names)
def test_every_accepted_snapshot_name_has_derived_names_that_fit(pool, vol, snap) -> None:
    try:
        names.check_snapshot_ref(pool, vol, snap)
    except names.BadName as e:
        assert "\n" not in str(e) and "too long" in str(e)
        assert not _derived_fit(pool, vol, snap)
    else:
        assert _derived_fit(pool, vol, snap)


@given(ok_names, ok_names)
def test_every_accepted_volume_name_has_derived_names_that_fit(pool, vol) -> None:
    try:
        names.check_volume_ref(pool, vol)
    except names.BadName:
        assert not _derived_fit(pool, vol, None)
    else:
        assert _derived_fit(pool, vol, None)


class _NoDm:
    """The Manager's dm control device, never asked: the checks come first."""

    def close(self) -> None:
        pass


@pytest.fixture
def manager(tmp_path: Path):
    m = Manager(str(tmp_path), dm=_NoDm())  # type: ignore[arg-type]
    yield m
    m.catalog.close()


POOL, VOL, LONG = "p" * 40, "v" * 40, "s" * 40  # each acceptable; together too long


def _add(m: Manager) -> None:
    p = m.catalog.add_pool(
        POOL,
        "thin",
        data_dev=None,
        cache_dev=None,
        size=1 << 30,
        cache_size=None,
        config={"journal": {"mode": "nv"}},
    )
    m.catalog.add_volume(p, VOL, 1 << 20, dev_id=1)


def test_snapshot_create_refuses_names_too_long_for_the_kernel(manager: Manager) -> None:
    _add(manager)
    with pytest.raises(E.InvalidArgument) as ei:
        manager.snapshot_create([[POOL, VOL]], LONG)
    msg = ei.value.message
    assert "too long" in msg and "\n" not in msg
    p = manager.catalog.pool(POOL)
    assert manager.catalog.markers(p.id) == [] and manager.catalog.snapshots(POOL) == []


def test_inband_create_of_a_name_too_long_for_the_kernel_is_a_sense_not_good(
    manager: Manager,
) -> None:
    _add(manager)
    svc = InbandSnapshots(manager, POOL, VOL)
    emu = emulator(FakeLun(), svc)
    cdb, params = SC.create_command(SC.CreateRequest(TOKEN, LONG))
    r = emu.execute(cdb, params)
    assert sense_of(r) == (S.Key.ILLEGAL_REQUEST, *S.INVALID_FIELD_IN_PARAMETER_LIST)
    sense = r.decoded_sense()
    assert sense is not None and sense.field == FieldPointer(SC.OFF_NAME, 7, cdb=False)
    assert manager.catalog.markers(manager.catalog.pool(POOL).id) == []


@pytest.mark.parametrize(
    "bad",
    [
        "iqn.2026-12.test:client",  # one-label naming authority: LIO refuses it
        "iqn.2026-12.org.example:host_1",  # RFC 3722: no underscore
        "iqn.2026-12.org.example:Host",  # iSCSI names are lower case
        "iqn.2026-13.org.example:a",  # no 13th month
    ],
)
def test_iscsi_names_lio_would_refuse_are_refused_in_one_line(bad: str) -> None:
    # before: accepted here, then rtslib-fb refused it inside export.create
    # and the user saw "internal error in export.create: RTSLibError"
    with pytest.raises(E.InvalidArgument, match="not an iSCSI name"):
        exports._check_iqn(bad)


def test_iscsi_names_lio_accepts_pass() -> None:
    from rtslib_fb.utils import normalize_wwn

    for good in [IQN, "iqn.1994-05.com.redhat:3f1a2b", "iqn.2026-11.org.dmsnap:p.v.s1"]:
        assert exports._check_iqn(good) == good
        assert normalize_wwn(["iqn"], good) == (good, "iqn")


def test_default_iqn_of_any_storage_name_is_an_iscsi_name() -> None:
    # pool and volume names may hold capitals and underscores
    iqn = exports.default_iqn("Tank_1", "db.Main", "before_upgrade")
    assert iqn == "iqn.2026-11.org.dmsnap:tank-1.db.main.before-upgrade"
    assert exports._check_iqn(iqn) == iqn
