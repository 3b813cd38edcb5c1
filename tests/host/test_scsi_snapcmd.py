"""The in-band snapshot command (0xC0): codec round trips, field pointers for
every malformed field, and the target side through the emulator with a fake
SnapshotService (token retries, WAIT/GROUP, STATUS by handle, LIST, refusals)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_scsi_support import FakeLun, FakeSnapshots, emulator, sense_of

from dmsnap.scsi import sense as S
from dmsnap.scsi import snapcmd as SC
from dmsnap.scsi.sense import FieldPointer, Key, SenseError

TOKEN = bytes(range(1, 17))

names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,47}\Z")
keys = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._/-]{0,62}\Z")
values = st.text(
    st.characters(blacklist_characters="\n\r\0", blacklist_categories=("Cs",)), max_size=256
).filter(lambda v: len(v.encode()) <= SC.MAX_VALUE_BYTES)
tokens = st.binary(min_size=16, max_size=16).filter(any)
labels = st.dictionaries(keys, values, max_size=4)
requests = st.builds(
    SC.CreateRequest, tokens, names, labels, wait=st.booleans(), group=st.booleans()
)
entries = st.builds(
    SC.SnapEntry,
    token=st.binary(min_size=16, max_size=16),
    name=names,
    state=st.sampled_from(list(SC.State)),
    group=st.booleans(),
    marker=st.integers(0, 2**64 - 1),
    requested=st.integers(0, 2**63),
    snapshots=st.lists(names.map(lambda n: f"tank/vol@{n}"), max_size=3).map(tuple),
    labels=labels,
    error=st.text(max_size=50),
)


def field_of(exc: pytest.ExceptionInfo[SenseError]) -> tuple[tuple[int, int], FieldPointer | None]:
    return exc.value.sense.code, exc.value.sense.field


# -- codec ----------------------------------------------------------------------------------


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(requests)
def test_create_round_trip(req):
    cdb, params = SC.create_command(req)
    c = SC.decode_cdb(cdb)
    assert (c.service_action, c.wait, c.group, c.length) == (
        SC.SA_CREATE,
        req.wait,
        req.group,
        len(params),
    )
    assert SC.decode_create(params, wait=c.wait, group=c.group) == req
    # zero padding after the request is allowed (e.g. a parameter file padded to a block)
    assert SC.decode_create(params + bytes(512), wait=req.wait, group=req.group) == req


def test_create_parameter_list_layout():
    req = SC.CreateRequest(TOKEN, "nightly", {"op": "sync"}, wait=True)
    cdb, p = SC.create_command(req)
    assert cdb == bytes((0xC0, 0x01, 0x01, 0, 0, 0, 0, 0, len(p), 0))
    assert p[:8] == b"DMSN\x01\x00\x00\x00"
    assert p[8:24] == TOKEN
    assert p[24] == 7 and p[25:32] == b"nightly"
    assert p[32] == 1 and p[33] == 2 and p[34:36] == b"op"
    assert p[36:38] == b"\x00\x04" and p[38:] == b"sync"


@given(tokens, st.integers(0, 0xFFFF))
def test_status_and_list_cdbs(token, alloc):
    c = SC.decode_cdb(SC.status_cdb(token, alloc))
    assert (c.service_action, c.handle, c.length) == (SC.SA_STATUS, token[12:], alloc)
    assert SC.status_cdb(token[12:], alloc) == SC.status_cdb(token, alloc)
    c = SC.decode_cdb(SC.list_cdb(alloc))
    assert (c.service_action, c.length, c.wait, c.group) == (SC.SA_LIST, alloc, False, False)
    assert c.skip == 0
    skip = int.from_bytes(token[:4], "big")
    c = SC.decode_cdb(SC.list_cdb(alloc, skip=skip))
    assert (c.service_action, c.skip, c.length) == (SC.SA_LIST, skip, alloc)
    assert SC.decode_cdb(SC.status_cdb(token, alloc)).skip == 0  # STATUS: a handle, no skip


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(entries, max_size=6), st.sampled_from([SC.SA_STATUS, SC.SA_LIST]))
def test_entries_round_trip_and_truncation(es, sa):
    data = SC.encode_entries(sa, es)
    got = SC.decode_entries(data)
    assert got.service_action == sa and got.entry_count == len(es) and not got.truncated
    assert got.needed == len(data)
    assert got.entries == es
    for cut in (12, len(data) // 2, len(data) - 1):
        if cut < 12:
            continue
        part = SC.decode_entries(data[:cut])
        assert part.entries == es[: len(part.entries)]
        assert part.entry_count == len(es) and part.needed == len(data)


def test_entries_layout():
    e = SC.SnapEntry(
        TOKEN,
        "n1",
        SC.State.DONE,
        group=True,
        marker=7,
        requested=99,
        snapshots=("tank/db@n1",),
        labels={"k": "v"},
        error="",
    )
    d = SC.encode_entries(SC.SA_LIST, [e])
    assert d[:12] == b"DMSN" + bytes((1, 3, 0, 1)) + (len(d) - 12).to_bytes(4, "big")
    body = d[12:]
    assert int.from_bytes(body[:2], "big") == len(body) - 2
    assert body[2:18] == TOKEN and body[18] == 2 and body[19] == 0x02
    assert int.from_bytes(body[20:28], "big") == 7 and int.from_bytes(body[28:36], "big") == 99
    assert body[36] == 2 and body[37:39] == b"n1"
    assert body[39] == 1 and body[40] == 10 and body[41:51] == b"tank/db@n1"


def test_a_full_list_always_fits_the_largest_allocation_length():
    many = [
        SC.SnapEntry(TOKEN, f"s{i}", SC.State.DONE, labels={"k": "v" * 200}) for i in range(500)
    ]
    d = SC.encode_entries(SC.SA_LIST, many)
    assert len(d) <= 0xFFFF
    got = SC.decode_entries(d)
    assert 0 < got.entry_count < 500 and len(got.entries) == got.entry_count
    assert [e.name for e in got.entries] == [f"s{i}" for i in range(got.entry_count)]


def test_decode_entries_rejects_garbage():
    with pytest.raises(SC.DecodeError):
        SC.decode_entries(b"short")
    with pytest.raises(SC.DecodeError):
        SC.decode_entries(b"XXXX" + bytes(8))
    with pytest.raises(SC.DecodeError):
        SC.decode_entries(b"DMSN\x02" + bytes(7))


def _valid() -> bytearray:
    return bytearray(SC.encode_create(SC.CreateRequest(TOKEN, "snap", {"ab": "cd"})))


def _mutated(at: int, value: int) -> bytes:
    b = _valid()
    b[at] = value
    return bytes(b)


@pytest.mark.parametrize(
    ("params", "pointer"),
    [
        (_mutated(0, ord("X")), 0),  # magic
        (_mutated(4, 2), 4),  # version
        (_mutated(6, 1), 6),  # reserved
        (bytes(_valid()[:8]) + bytes(16) + bytes(_valid()[24:]), 8),  # all-zero token
        (_mutated(24, 0), 24),  # name length 0
        (_mutated(24, 49), 24),  # name length > 48
        (_mutated(25, ord("-")), 25),  # name may not start with '-'
        (_mutated(26, ord("/")), 25),  # bad character
        (_mutated(26, 0xC3), 25),  # not ASCII
        (_mutated(29, 17), 29),  # 17 labels
        (_mutated(30, 0), 30),  # key length 0
        (_mutated(30, 64), 30),  # key length > 63
        (_mutated(31, ord("=")), 31),  # bad key character
        (_mutated(33, 0x04), 33),  # value length > 1024
        (_mutated(35, 0xFF), 35),  # value not UTF-8
        (_mutated(35, ord("\n")), 35),  # value with a newline
        (bytes(_valid()) + b"\x00\x01", len(_valid()) + 1),  # non-zero trailing byte
    ],
)
def test_create_field_pointers(params, pointer):
    with pytest.raises(SenseError) as exc:
        SC.decode_create(params)
    assert field_of(exc) == (S.INVALID_FIELD_IN_PARAMETER_LIST, FieldPointer(pointer, 7, cdb=False))


def test_create_duplicate_key_and_long_value():
    dup = bytes(_valid()) + b""
    dup = bytearray(dup)
    dup[29] = 2
    dup += bytes((2,)) + b"ab" + b"\x00\x01" + b"x"
    with pytest.raises(SenseError) as exc:
        SC.decode_create(bytes(dup))
    assert field_of(exc)[1] == FieldPointer(len(_valid()) + 1, 7, cdb=False)
    long_value = SC.encode_create(SC.CreateRequest(TOKEN, "s", {}))[:-1]
    long_value += bytes((1, 1)) + b"k" + (257).to_bytes(2, "big") + b"v" * 257
    with pytest.raises(SenseError) as exc:
        SC.decode_create(bytes(long_value))
    assert field_of(exc)[0] == S.INVALID_FIELD_IN_PARAMETER_LIST


@pytest.mark.parametrize("cut", [1, 4, 8, 23, 24, 25, 28, 29, 30, 33, 34, 36])
def test_truncated_create_is_a_parameter_list_length_error(cut):
    with pytest.raises(SenseError) as exc:
        SC.decode_create(bytes(_valid()[:cut]))
    assert field_of(exc) == (S.PARAMETER_LIST_LENGTH_ERROR, None)


@pytest.mark.parametrize(
    ("cdb", "pointer"),
    [
        (bytes((0xC0, 0x05, 0, 0, 0, 0, 0, 0, 10, 0)), (1, 4)),  # unknown service action
        (bytes((0xC0, 0x04, 0x01, 0, 0, 0, 0, 0, 24, 0)), (2, 0)),  # WAIT on DELETE
        (bytes((0xC0, 0x04, 0, 0, 0, 0, 7, 0, 24, 0)), (6, 7)),  # DELETE: no handle
        (bytes((0xC0, 0x21, 0, 0, 0, 0, 0, 0, 10, 0)), (1, 7)),  # reserved bits
        (bytes((0xC0, 0x01, 0x04, 0, 0, 0, 0, 0, 10, 0)), (2, 2)),  # unknown flag
        (bytes((0xC0, 0x02, 0x01, 0, 0, 0, 0, 0, 10, 0)), (2, 0)),  # WAIT on STATUS
        (bytes((0xC0, 0x03, 0x02, 0, 0, 0, 0, 0, 10, 0)), (2, 1)),  # GROUP on LIST
        (bytes((0xC0, 0x01, 0, 0, 0, 1, 0, 0, 10, 0)), (5, 7)),  # reserved byte
        (bytes((0xC0, 0x01, 0, 9, 0, 0, 0, 0, 10, 0)), (3, 7)),  # CREATE: no handle/skip
    ],
)
def test_cdb_field_pointers(cdb, pointer):
    with pytest.raises(SenseError) as exc:
        SC.decode_cdb(cdb)
    assert field_of(exc) == (S.INVALID_FIELD_IN_CDB, FieldPointer(*pointer))


@given(st.text(max_size=60))
def test_name_rule_matches_the_storage_layer(name):
    from dmsnap.storage.names import BadName, check_name

    try:
        check_name("snapshot", name)
        ok = True
    except BadName:
        ok = False
    assert (SC.check_name(name) is None) == ok


@given(keys, values)
def test_label_rule_matches_the_protocol(key, value):
    from dmsnap.daemon.protocol import check_label
    from dmsnap.errors import InvalidArgument

    try:
        check_label(key, value)
        ok = True
    except InvalidArgument:
        ok = False
    assert (SC.check_label(key, value) is None) == ok


def test_tokens():
    t = SC.new_token()
    assert len(t) == 16 and any(t)
    assert SC.parse_token(t.hex()) == t
    import uuid

    u = uuid.UUID(bytes=t)
    assert SC.parse_token(str(u)) == t
    for bad in ("", "xyz", "00" * 15):
        with pytest.raises(ValueError):
            SC.parse_token(bad)
    with pytest.raises(ValueError):
        SC.encode_create(SC.CreateRequest(bytes(16), "s"))
    with pytest.raises(ValueError):
        SC.encode_create(SC.CreateRequest(TOKEN, "_s"))


# -- through the emulator -------------------------------------------------------------------


def run(e, req: SC.CreateRequest, **kw):
    cdb, params = SC.create_command(req)
    return e.execute(cdb, params, **kw)


def test_create_then_retry_with_the_same_token_creates_one_snapshot():
    snaps = FakeSnapshots()
    lun = FakeLun()
    e = emulator(lun, snaps)
    req = SC.CreateRequest(TOKEN, "before-sync", {"op": "sync"}, wait=True, group=True)
    assert run(e, req).ok
    assert run(e, req).ok  # the initiator did not see the first GOOD and retries
    assert snaps.created == [req]
    d = SC.decode_entries(e.execute(SC.status_cdb(TOKEN)).data)
    assert [x.token for x in d.entries] == [TOKEN]
    x = d.entries[0]
    assert x.state is SC.State.DONE and x.group and x.labels == {"op": "sync"}
    assert x.snapshots == ("tank/db@before-sync", "tank/logs@before-sync")
    assert lun.calls == []  # the emulator never touched the volume


def test_status_of_an_unknown_handle_is_empty_and_list_is_newest_first():
    snaps = FakeSnapshots()
    e = emulator(snaps=snaps)
    toks = [SC.new_token() for _ in range(3)]
    for i, t in enumerate(toks):
        assert run(e, SC.CreateRequest(t, f"s{i}")).ok
    d = SC.decode_entries(e.execute(SC.status_cdb(b"\xee" * 16)).data)
    assert d.entry_count == 0 and d.entries == []
    lst = SC.decode_entries(e.execute(SC.list_cdb()).data)
    assert [x.name for x in lst.entries] == ["s2", "s1", "s0"]
    assert all(x.state is SC.State.PENDING for x in lst.entries)
    cut = SC.decode_entries(e.execute(SC.list_cdb(40)).data)
    assert cut.truncated and cut.needed > 40
    assert SC.decode_entries(e.execute(SC.list_cdb(cut.needed)).data).entries == lst.entries
    assert e.execute(SC.list_cdb(0)).data == b""


def test_status_filters_what_the_service_returns():
    class Sloppy(FakeSnapshots):
        def status(self, lun, handle):
            return self.entries  # everything

    snaps = Sloppy()
    e = emulator(snaps=snaps)
    a, b = SC.new_token(), SC.new_token()
    run(e, SC.CreateRequest(a, "a"))
    run(e, SC.CreateRequest(b, "b"))
    d = SC.decode_entries(e.execute(SC.status_cdb(a)).data)
    assert [x.name for x in d.entries] == ["a"]


def test_initiators_not_allowed_are_refused_before_the_service():
    snaps = FakeSnapshots()
    seen = []

    def policy(initiator: str) -> bool:
        seen.append(initiator)
        return initiator == "iqn.ok"

    from dmsnap.scsi.emulation import Emulator

    e = Emulator(FakeLun(), snaps, snapshot_allowed=policy)
    req = SC.CreateRequest(TOKEN, "s")
    for cdb, data in (SC.create_command(req), (SC.status_cdb(TOKEN), None), (SC.list_cdb(), None)):
        r = e.execute(cdb, data, initiator="iqn.other")
        assert sense_of(r) == (Key.ILLEGAL_REQUEST, 0x20, 0x02)
    assert snaps.created == [] and set(seen) == {"iqn.other"}
    assert run(e, req, initiator="iqn.ok").ok

    def broken(_i: str) -> bool:
        raise RuntimeError("policy store down")

    e2 = Emulator(FakeLun(), snaps, snapshot_allowed=broken)
    assert sense_of(e2.execute(SC.list_cdb())) == (Key.ILLEGAL_REQUEST, 0x20, 0x02)


@pytest.mark.parametrize(
    ("kind", "expect"),
    [
        (SC.ErrorKind.INVALID_NAME, (Key.ILLEGAL_REQUEST, 0x26, 0x00)),
        (SC.ErrorKind.INVALID_LABELS, (Key.ILLEGAL_REQUEST, 0x26, 0x00)),
        (SC.ErrorKind.DENIED, (Key.ILLEGAL_REQUEST, 0x20, 0x02)),
        (SC.ErrorKind.NOT_READY, (Key.NOT_READY, 0x04, 0x03)),
        (SC.ErrorKind.BECOMING_READY, (Key.NOT_READY, 0x04, 0x01)),
        (SC.ErrorKind.IN_PROGRESS, (Key.NOT_READY, 0x04, 0x07)),
        (SC.ErrorKind.NO_SPACE, (Key.ILLEGAL_REQUEST, 0x55, 0x03)),
        (SC.ErrorKind.FAILED, (Key.HARDWARE_ERROR, 0x44, 0x00)),
    ],
)
def test_service_errors_become_documented_sense(kind, expect):
    snaps = FakeSnapshots()
    e = emulator(snaps=snaps)
    snaps.raise_next = SC.SnapshotError(kind, "no", marker=42)
    r = run(e, SC.CreateRequest(TOKEN, "snap", {"k": "v"}))
    assert sense_of(r) == expect
    s = r.decoded_sense()
    assert s.information == 42
    if kind is SC.ErrorKind.INVALID_NAME:
        assert s.field == FieldPointer(SC.OFF_NAME, 7, cdb=False)
    if kind is SC.ErrorKind.INVALID_LABELS:
        assert s.field == FieldPointer(SC.OFF_NAME + 4, 7, cdb=False)  # the label count
    assert SC.explain(s) != s.describe() or kind is SC.ErrorKind.INVALID_LABELS


def test_name_in_use_and_failed_retry():
    snaps = FakeSnapshots()
    e = emulator(snaps=snaps)
    assert run(e, SC.CreateRequest(TOKEN, "dup")).ok
    r = run(e, SC.CreateRequest(SC.new_token(), "dup"))
    assert sense_of(r) == (Key.ILLEGAL_REQUEST, 0x26, 0x00)
    assert "name" in SC.explain(r.decoded_sense())
    snaps.entries[0] = SC.SnapEntry(TOKEN, "dup", SC.State.FAILED, marker=1, error="no COW space")
    assert sense_of(run(e, SC.CreateRequest(TOKEN, "dup"))) == (Key.HARDWARE_ERROR, 0x44, 0x00)


def test_create_length_errors():
    e = emulator(snaps=FakeSnapshots())
    _, p = SC.create_command(SC.CreateRequest(TOKEN, "s"))
    assert sense_of(e.execute(SC.create_cdb(0), b"")) == (Key.ILLEGAL_REQUEST, 0x1A, 0x00)
    r = e.execute(SC.create_cdb(5000), bytes(5000))
    assert sense_of(r) == (Key.ILLEGAL_REQUEST, 0x24, 0) and r.decoded_sense().field.byte == 7
    r = e.execute(SC.create_cdb(len(p)), p[:-1])  # Data-Out shorter than the list
    assert sense_of(r) == (Key.ILLEGAL_REQUEST, 0x24, 0) and r.decoded_sense().field.byte == 7
    r = e.execute(SC.create_cdb(len(p) - 1), p)  # list cut short by its length
    assert sense_of(r) == (Key.ILLEGAL_REQUEST, 0x1A, 0x00)
    assert e.execute(SC.create_cdb(len(p)), p + bytes(100)).ok  # longer Data-Out: prefix used


@pytest.mark.parametrize("op", range(0xC1, 0x100))
def test_other_vendor_opcodes_are_answered(op):
    r = emulator(snaps=FakeSnapshots()).execute(bytes((op,)) + bytes(9))
    assert sense_of(r) == (Key.ILLEGAL_REQUEST, 0x20, 0x00)


def test_explain_messages():
    def msg(key, code, **kw):
        return SC.explain(S.Sense.of(key, code, **kw))

    assert "not allowed" in msg(Key.ILLEGAL_REQUEST, S.ACCESS_DENIED_NO_ACCESS_RIGHTS)
    assert "does not accept" in msg(Key.ILLEGAL_REQUEST, S.INVALID_COMMAND_OPERATION_CODE)
    assert "marker 9" in msg(Key.NOT_READY, S.LUN_NOT_READY_OPERATION_IN_PROGRESS, information=9)
    assert "no room" in msg(Key.ILLEGAL_REQUEST, S.INSUFFICIENT_RESOURCES)
    f = FieldPointer(SC.OFF_TOKEN, 7, cdb=False)
    assert "token" in msg(Key.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_PARAMETER_LIST, field=f)
    assert "could not be made" in msg(Key.HARDWARE_ERROR, S.INTERNAL_TARGET_FAILURE)
    assert msg(Key.MEDIUM_ERROR, S.WRITE_ERROR) == "MEDIUM ERROR: write error"


# -- DELETE -----------------------------------------------------------------------------------


def delete(e, token: bytes, **kw):
    cdb, params = SC.delete_command(token)
    return e.execute(cdb, params, **kw)


def test_delete_layout_and_round_trip():
    cdb, params = SC.delete_command(TOKEN)
    assert cdb == bytes((0xC0, 0x04, 0, 0, 0, 0, 0, 0, 24, 0))
    assert params == b"DMSN\x01\x00\x00\x00" + TOKEN
    assert SC.decode_delete(params) == TOKEN
    assert SC.decode_delete(params + bytes(8)) == TOKEN  # zero padding
    with pytest.raises(ValueError):
        SC.encode_delete(bytes(16))


@pytest.mark.parametrize(
    ("params", "pointer"),
    [
        (b"DMSX\x01\x00\x00\x00" + TOKEN, 0),
        (b"DMSN\x02\x00\x00\x00" + TOKEN, 4),
        (b"DMSN\x01\x00\x01\x00" + TOKEN, 6),
        (b"DMSN\x01\x00\x00\x00" + bytes(16), 8),
        (b"DMSN\x01\x00\x00\x00" + TOKEN + b"\x00\x05", 25),
    ],
)
def test_delete_field_pointers(params, pointer):
    with pytest.raises(SenseError) as exc:
        SC.decode_delete(params)
    assert field_of(exc) == (
        S.INVALID_FIELD_IN_PARAMETER_LIST,
        FieldPointer(pointer, 7, cdb=False),
    )
    with pytest.raises(SenseError) as exc:
        SC.decode_delete(params[:23])
    assert field_of(exc) == (S.PARAMETER_LIST_LENGTH_ERROR, None)


def test_delete_then_retry_and_the_entry_says_deleted():
    snaps = FakeSnapshots()
    e = emulator(snaps=snaps)
    assert run(e, SC.CreateRequest(TOKEN, "old", wait=True)).ok
    assert delete(e, TOKEN).ok
    assert delete(e, TOKEN).ok  # a retry after a lost answer: idempotent
    assert snaps.deleted == [TOKEN]
    (x,) = SC.decode_entries(e.execute(SC.status_cdb(TOKEN)).data).entries
    assert x.state is SC.State.DELETED and x.snapshots == ()
    assert SC.decode_entries(e.execute(SC.list_cdb()).data).entries == []  # LIST: what exists
    assert run(e, SC.CreateRequest(SC.new_token(), "old")).ok  # the name is free again


def test_delete_refusals_are_sense_and_change_nothing():
    snaps = FakeSnapshots()
    e = emulator(snaps=snaps)
    r = delete(e, TOKEN)  # never requested
    assert sense_of(r) == (Key.ILLEGAL_REQUEST, 0x26, 0x00)
    assert r.decoded_sense().field == FieldPointer(SC.OFF_TOKEN, 7, cdb=False)
    assert "no snapshot" in SC.explain(r.decoded_sense(), SC.SA_DELETE)
    assert run(e, SC.CreateRequest(TOKEN, "pending")).ok  # no WAIT: the fake leaves it pending
    r = delete(e, TOKEN)
    assert sense_of(r) == (Key.NOT_READY, 0x04, 0x07)
    assert "delete it later" in SC.explain(r.decoded_sense(), SC.SA_DELETE)
    t2 = SC.new_token()
    assert run(e, SC.CreateRequest(t2, "exported", wait=True)).ok
    snaps.in_use.add("exported")
    r = delete(e, t2)
    assert sense_of(r) == (Key.ILLEGAL_REQUEST, 0x2C, 0x00)
    assert "in use" in SC.explain(r.decoded_sense(), SC.SA_DELETE)
    assert snaps.deleted == []
    assert [x.state for x in SC.decode_entries(e.execute(SC.list_cdb()).data).entries] == [
        SC.State.DONE,
        SC.State.PENDING,
    ]
    from dmsnap.scsi.emulation import Emulator

    denied = Emulator(FakeLun(), snaps, snapshot_allowed=lambda _i: False)
    assert sense_of(delete(denied, t2)) == (Key.ILLEGAL_REQUEST, 0x20, 0x02)
    ro = emulator(FakeLun(read_only=True, wce=False), snaps)
    r = delete(ro, t2)
    assert sense_of(r) == (Key.DATA_PROTECT, 0x27, 0x00)
    assert "read-only" in SC.explain(r.decoded_sense(), SC.SA_DELETE)
    assert snaps.deleted == []
    assert sense_of(e.execute(SC.delete_cdb(0), b"")) == (Key.ILLEGAL_REQUEST, 0x1A, 0x00)
    r = e.execute(SC.delete_cdb(24), b"DMSN")  # Data-Out shorter than the length
    assert sense_of(r) == (Key.ILLEGAL_REQUEST, 0x24, 0x00)
