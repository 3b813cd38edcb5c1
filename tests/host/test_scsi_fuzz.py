"""Fuzzing the emulator (hypothesis): any CDB, any Data-Out, any buffer size.

Properties of every answer: ``execute`` returns (never raises), the status is
GOOD or CHECK CONDITION, sense data is present exactly for CHECK CONDITION and
well-formed in the format the initiator asked for, a field pointer into the
CDB points inside it, Data-In never exceeds the allocation length or the
initiator's buffer, nothing inside failed (no INTERNAL TARGET FAILURE: the
fakes never fail, so that answer can only come from an exception in our
code), the LUN is only touched inside its size, and only by write commands.
"""

from __future__ import annotations

import os
import threading

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_scsi_support import (
    BS,
    FakeLun,
    FakeSnapshots,
    emulator,
    mode_select6,
    mode_select10,
    mode_sense6,
    mode_sense10,
    rw6,
    rw10,
    rw12,
    rw16,
    unmap_cdb,
    unmap_params,
)

from dmsnap.scsi import cdb as C
from dmsnap.scsi import sense as S
from dmsnap.scsi import snapcmd as SC
from dmsnap.scsi.emulation import WRITE_OPS, Emulator, Limits, Response

LUN_SIZE = 1024 * 1024  # small, so random LBAs hit the end often
LIMITS = Limits(max_transfer=64 * 1024, max_write_same=256 * 1024, max_unmap=512 * 1024)

SUPPORTED = sorted(
    {
        0x00,
        0x03,
        0x08,
        0x0A,
        0x12,
        0x15,
        0x1A,
        0x1B,
        0x25,
        0x28,
        0x2A,
        0x2E,
        0x2F,
        0x35,
        0x41,
        0x42,
        0x55,
        0x5A,
        0x88,
        0x89,
        0x8A,
        0x8E,
        0x8F,
        0x91,
        0x93,
        0x9E,
        0xA3,
        0xA8,
        0xAA,
        0xAE,
        0xAF,
        0xC0,
    }
)

# tools/torture fuzz --target scsi runs these properties with many more
# examples (DMSNAP_FUZZ_EXAMPLES_EACH) and no example database.
_CAMPAIGN = os.environ.get("DMSNAP_FUZZ_EXAMPLES_EACH")
FUZZ = settings(
    max_examples=int(_CAMPAIGN or 1500),
    **({"database": None} if _CAMPAIGN else {}),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def small_int(n: int) -> st.SearchStrategy[int]:
    """Field values: edges (0, 1, the LUN's end, all ones) and anything."""
    blocks = LUN_SIZE // BS
    edges = [0, 1, 2, blocks - 1, blocks, blocks + 1, 255, 256, (1 << (8 * n)) - 1]
    return st.one_of(
        st.sampled_from([e for e in edges if e < (1 << (8 * n))]),
        st.integers(0, (1 << (8 * n)) - 1),
    )


@st.composite
def cdbs(draw) -> bytes:
    op = draw(st.one_of(st.sampled_from(SUPPORTED), st.integers(0, 255)))
    natural = C.cdb_length(op) or 10
    if draw(st.integers(0, 19)) == 0:  # sometimes a CDB of any length at all
        return bytes((op,)) + draw(st.binary(max_size=16))
    body = bytearray(draw(st.binary(min_size=natural - 1, max_size=natural - 1)))
    if draw(st.booleans()) and natural >= 10:  # plausible LBA / length fields
        if natural == 10:
            body[1:5] = draw(small_int(4)).to_bytes(4, "big")
            body[6:8] = draw(small_int(2)).to_bytes(2, "big")
        elif natural == 12:
            body[1:5] = draw(small_int(4)).to_bytes(4, "big")
            body[5:9] = draw(small_int(4)).to_bytes(4, "big")
        else:
            body[1:9] = draw(small_int(8)).to_bytes(8, "big")
            body[9:13] = draw(small_int(4)).to_bytes(4, "big")
    if draw(st.booleans()):
        body[-1] = 0  # CONTROL: mostly no NACA, so commands get past it
    if op == 0xC0 and draw(st.booleans()):
        body[0] = draw(st.sampled_from([1, 2, 3, 4]))
    return bytes((op,)) + bytes(body)


@st.composite
def plausible(draw) -> tuple[bytes, bytes | None]:
    """A well-formed command (with the Data-Out it needs), sometimes with one bit
    flipped: reaches the success paths that random bytes rarely do."""
    blocks = LUN_SIZE // BS
    lba = draw(st.one_of(st.integers(0, blocks + 2), small_int(4)))
    n = draw(st.integers(0, 20))
    kind = draw(st.sampled_from(SUPPORTED))
    data: bytes | None = None
    flags = draw(st.sampled_from([0, 0, 0x08, 0x10, 0x02, 0x06, 0x04]))
    size = draw(st.sampled_from([10, 12, 16]))
    build = {10: rw10, 12: rw12, 16: rw16}[size]
    rd = {10: 0x28, 12: 0xA8, 16: 0x88}[size]
    wr = {10: 0x2A, 12: 0xAA, 16: 0x8A}[size]
    vf = {10: 0x2F, 12: 0xAF, 16: 0x8F}[size]
    wv = {10: 0x2E, 12: 0xAE, 16: 0x8E}[size]
    fill = bytes([draw(st.integers(0, 255))])
    if kind == 0x00:
        cdb = bytes(6)
    elif kind == 0x03:
        cdb = bytes((0x03, draw(st.integers(0, 1)), 0, 0, draw(st.integers(0, 255)), 0))
    elif kind in (0x08, 0x0A):
        cdb = rw6(kind, lba & 0x1FFFFF, n)
        data = fill * ((n or 256) * BS) if kind == 0x0A else None
    elif kind == 0x12:
        page = draw(st.sampled_from([None, 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2, 0x86]))
        cdb = bytes((0x12, 0 if page is None else 1, page or 0, 0, draw(st.integers(0, 255)), 0))
    elif kind in (0x1A, 0x5A):
        page = draw(st.sampled_from([0x08, 0x0A, 0x3F, 0x1C]))
        pc, dbd = draw(st.integers(0, 3)), draw(st.booleans())
        cdb = mode_sense6(page, pc, dbd) if kind == 0x1A else mode_sense10(page, pc, dbd)
    elif kind in (0x15, 0x55):
        cur = bytearray(emulator(FakeLun(size=LUN_SIZE)).execute(mode_sense6(0x3F)).data)
        cur[0] = 0
        if draw(st.booleans()):
            cur[4 + 8 + 20 + 2] |= 0x04  # D_SENSE on
        if kind == 0x55:
            cur = bytearray(bytes((0, 0, cur[1], cur[2], 0, 0, 0, cur[3]))) + cur[4:]
            cdb = mode_select10(len(cur))
        else:
            cdb = mode_select6(len(cur))
        data = bytes(cur)
    elif kind == 0x1B:
        cdb = bytes((0x1B, 0, 0, 0, draw(st.sampled_from([0, 1, 2, 3, 0x11, 0x31, 0x05])), 0))
    elif kind == 0x25:
        cdb = bytes(10)
        cdb = bytes((0x25,)) + cdb[1:]
    elif kind in (0x28, 0x88, 0xA8):
        cdb = build(rd, lba, n, flags & 0x18)
    elif kind in (0x2A, 0x8A, 0xAA):
        cdb = build(wr, lba, n, flags & 0x18)
        data = fill * (n * BS)
    elif kind in (0x2F, 0x8F, 0xAF):
        bytchk = draw(st.sampled_from([0, 1, 3]))
        cdb = build(vf, lba, n, bytchk << 1)
        data = fill * ((n if bytchk == 1 else 1) * BS) if bytchk else None
    elif kind in (0x2E, 0x8E, 0xAE):
        cdb = build(wv, lba, n, 0x02 if draw(st.booleans()) else 0)
        data = fill * (n * BS)
    elif kind == 0x89:  # COMPARE AND WRITE: zeros compare equal on a fresh LUN
        nb = n & 0xFF
        cdb = bytes((0x89, flags & 0x18)) + lba.to_bytes(8, "big") + bytes((0, 0, 0, nb, 0, 0))
        cmp = bytes(nb * BS) if draw(st.booleans()) else fill * (nb * BS)
        data = cmp + fill * (nb * BS)
    elif kind in (0x35, 0x91):
        cdb = bytes((0x35, 0)) + lba.to_bytes(4, "big") + bytes((0, 0, n, 0))
        if kind == 0x91:
            cdb = rw16(0x91, lba, n)
    elif kind in (0x41, 0x93):
        wflags = draw(st.sampled_from([0, 0x08, 0x09, 0x01]))
        if kind == 0x41:
            wflags &= 0x08
            cdb = bytes((0x41, wflags)) + lba.to_bytes(4, "big") + bytes((0, 0, n, 0))
        else:
            cdb = rw16(0x93, lba, n, wflags)
        data = None if wflags & 0x01 else (bytes(BS) if draw(st.booleans()) else fill * BS)
    elif kind == 0x42:
        data = unmap_params([(lba, n), (draw(st.integers(0, blocks)), draw(st.integers(0, 9)))])
        cdb = unmap_cdb(len(data))
    elif kind == 0x9E:
        cdb = (
            bytes((0x9E, 0x10)) + bytes(8) + draw(st.integers(0, 40)).to_bytes(4, "big") + bytes(2)
        )
    elif kind == 0xA3:
        opts = draw(st.integers(0, 3))
        op = draw(st.sampled_from([*SUPPORTED, 0x4D]))
        sa = draw(st.sampled_from([0, 1, 2, 3, 0x10, 0x0C]))
        rctd = 0x80 if draw(st.booleans()) else 0
        cdb = bytes((0xA3, 0x0C, rctd | opts, op)) + sa.to_bytes(2, "big")
        cdb += draw(st.integers(0, 2000)).to_bytes(4, "big") + bytes(2)
    else:  # 0xC0
        sa = draw(st.integers(1, 4))
        if sa == 1:
            req = SC.CreateRequest(
                draw(st.binary(min_size=16, max_size=16).filter(any)),
                draw(st.sampled_from(["a", "b", "nightly", "x.y-z"])),
                wait=draw(st.booleans()),
                group=draw(st.booleans()),
            )
            cdb, data = SC.create_command(req)
        elif sa == 4:
            cdb, data = SC.delete_command(draw(st.binary(min_size=16, max_size=16).filter(any)))
        elif sa == 2:
            cdb = SC.status_cdb(draw(st.binary(min_size=4, max_size=4)), draw(st.integers(0, 300)))
        else:
            cdb = SC.list_cdb(draw(st.integers(0, 300)))
    if draw(st.integers(0, 3)) == 0:  # one flipped bit anywhere in the CDB
        b = bytearray(cdb)
        b[draw(st.integers(0, len(b) - 1))] ^= 1 << draw(st.integers(0, 7))
        cdb = bytes(b)
    if data is not None and draw(st.integers(0, 5)) == 0:  # and sometimes the wrong length
        data = data[: draw(st.integers(0, len(data)))] + draw(st.binary(max_size=3))
    return cdb, data


data_outs = st.one_of(
    st.none(),
    st.binary(max_size=64),
    st.integers(0, 8).map(lambda n: bytes(n * BS)),
    st.integers(1, 4).map(lambda n: bytes(range(256)) * (2 * n)),
)
data_in_lens = st.one_of(st.none(), st.integers(0, 70000), st.sampled_from([0, 1, 4, 8, 36]))


def check_response(
    emu: Emulator, cdb: bytes, r: Response, data_in_len: int | None, descriptor: bool
) -> None:
    assert isinstance(r, Response)
    assert r.status in (S.GOOD, S.CHECK_CONDITION), r
    if r.status == S.GOOD:
        assert r.sense == b""
    else:
        assert r.data == b""
        assert 8 <= len(r.sense) <= S.MAX_SENSE
        code = r.sense[0] & 0x7F
        if descriptor:
            assert code in (0x72, 0x73)
            assert len(r.sense) == 8 + r.sense[7]
        else:
            assert code in (0x70, 0x71)
            assert len(r.sense) == 18 and r.sense[7] == 10
        s = S.decode(r.sense)
        assert 1 <= s.key <= 0xE
        assert s.code != S.INTERNAL_TARGET_FAILURE, (cdb.hex(), s.describe())
        if s.field is not None and s.field.cdb:
            assert s.field.byte < max(len(cdb), 1)
            assert s.field.bit is None or 0 <= s.field.bit <= 7
    if data_in_len is not None:
        assert len(r.data) <= data_in_len
    if r.data and cdb:
        op = cdb[0]
        if op in (0x12, 0x03, 0x1A, 0x5A, 0x25, 0x9E, 0xA3):
            assert len(r.data) <= C.allocation_length(cdb[: C.cdb_length(op)])
        elif op == 0xC0:
            assert len(r.data) <= int.from_bytes(cdb[7:9], "big")
        elif op in (0x08, 0x28, 0xA8, 0x88):
            rw = C.rw_fields(cdb[: C.cdb_length(op)])
            assert len(r.data) <= rw.blocks * BS
        else:
            raise AssertionError(f"Data-In from opcode {op:#x}")


def run_one(
    emu: Emulator, lun: FakeLun, cdb: bytes, data_out: bytes | None, data_in_len: int | None
) -> Response:
    before = len(lun.calls)
    descriptor = emu.descriptor_sense
    r = emu.execute(cdb, data_out, initiator="fuzz", data_in_len=data_in_len)
    check_response(emu, cdb, r, data_in_len, descriptor)
    touched = [c for c in lun.calls[before:] if c[0] in ("write", "unmap")]
    if touched:
        assert cdb[0] in WRITE_OPS, (cdb.hex(), touched)
        assert r.status == S.GOOD or cdb[0] in (0x2E, 0xAE, 0x8E)  # W&V: miscompare after write
    for c in touched:
        assert c[1] + c[2] <= lun.size
    if r.status != S.GOOD:
        assert not [c for c in lun.calls[before:] if c[0] == "unmap"]
    return r


@FUZZ
@given(cdbs(), data_outs, data_in_lens, st.booleans())
def test_any_cdb_gets_a_well_formed_answer(cdb, data_out, data_in_len, read_only):
    lun = FakeLun(size=LUN_SIZE, read_only=read_only)
    emu = emulator(lun, FakeSnapshots(), limits=LIMITS)
    run_one(emu, lun, cdb, data_out, data_in_len)
    if read_only:
        assert not lun.writes()


@FUZZ
@given(st.lists(st.tuples(plausible(), data_in_lens), min_size=1, max_size=8), st.booleans())
def test_plausible_commands(seq, read_only):
    lun = FakeLun(size=LUN_SIZE, read_only=read_only)
    emu = emulator(lun, FakeSnapshots(), limits=LIMITS)
    for (cdb, data_out), data_in_len in seq:
        run_one(emu, lun, cdb, data_out, data_in_len)
    if read_only:
        assert not lun.writes()


@FUZZ
@given(st.lists(st.tuples(cdbs(), data_outs, data_in_lens), min_size=2, max_size=12))
def test_command_sequences_on_one_lun(seq):
    """State carries over (D_SENSE via MODE SELECT, snapshot requests)."""
    lun = FakeLun(size=LUN_SIZE)
    emu = emulator(lun, FakeSnapshots(), limits=LIMITS)
    for cdb, data_out, data_in_len in seq:
        run_one(emu, lun, cdb, data_out, data_in_len)


# -- parameter lists ------------------------------------------------------------------------


@st.composite
def unmap_lists(draw) -> bytes:
    blocks = LUN_SIZE // BS
    ranges = draw(st.lists(st.tuples(small_int(8), small_int(4)), max_size=6))
    if draw(st.booleans()):
        ranges = [(lba % (blocks + 2), n % 300) for lba, n in ranges]
    p = bytearray(unmap_params(ranges))
    for _ in range(draw(st.integers(0, 3))):  # corrupt the lengths or anything else
        if p:
            p[draw(st.integers(0, len(p) - 1))] = draw(st.integers(0, 255))
    return bytes(p)


@FUZZ
@given(unmap_lists(), st.integers(0, 200), st.booleans())
def test_unmap_parameter_lists(params, plen_delta, short_data):
    lun = FakeLun(size=LUN_SIZE)
    lun.buf[:] = b"\x01" * LUN_SIZE
    emu = emulator(lun, limits=LIMITS)
    plen = max(0, len(params) - plen_delta) if plen_delta < 100 else len(params)
    data = params[: plen - 1] if short_data and plen else params
    r = run_one(emu, lun, unmap_cdb(plen), data, None)
    if r.status != S.GOOD:
        assert lun.calls == []
    total = sum(c[2] for c in lun.calls)
    assert total <= LIMITS.max_unmap


@st.composite
def mode_pages(draw) -> tuple[bool, bytes]:
    ten = draw(st.booleans())
    e = emulator(FakeLun(size=LUN_SIZE))
    dbd = draw(st.booleans())
    page = draw(st.sampled_from([0x08, 0x0A, 0x3F]))
    cur = bytearray(e.execute(mode_sense6(page, dbd=dbd)).data)
    cur[0] = 0
    if ten:  # turn the 6-byte header into the 10-byte one
        cur = bytearray(bytes((0, 0, cur[1], cur[2], 0, 0, 0, cur[3]))) + cur[4:]
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(cur) - 1))
        cur[i] ^= 1 << draw(st.integers(0, 7))
    if draw(st.integers(0, 4)) == 0:
        cur += draw(st.binary(max_size=24))
    if draw(st.integers(0, 4)) == 0:
        cur = cur[: draw(st.integers(0, len(cur)))]
    return ten, bytes(cur)


@FUZZ
@given(mode_pages(), st.booleans(), st.booleans())
def test_mode_select_parameter_lists(page, pf, sp):
    ten, params = page
    lun = FakeLun(size=LUN_SIZE, wce=True)
    emu = emulator(lun)
    cdb = (mode_select10 if ten else mode_select6)(
        len(params) & 0xFF if not ten else len(params), pf=pf, sp=sp
    )
    assume(ten or len(params) <= 0xFF)
    r = run_one(emu, lun, cdb, params, None)
    # whatever happened, WCE is still what the LUN says and nothing was written
    assert emu.execute(mode_sense6(0x08, dbd=True)).data[4 + 2] & 0x04
    assert lun.calls == []
    if r.status == S.GOOD and len(params) > 0 and pf and not sp:
        # an accepted control page leaves D_SENSE as sent
        pass


names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,47}\Z")


@st.composite
def create_lists(draw) -> bytes:
    req = SC.CreateRequest(
        draw(st.binary(min_size=16, max_size=16).filter(any)),
        draw(names),
        draw(
            st.dictionaries(
                st.from_regex(r"\A[a-z][a-z0-9./-]{0,10}\Z"), st.text(max_size=20), max_size=3
            )
        ),
    )
    try:
        p = bytearray(SC.encode_create(req))
    except ValueError:
        p = bytearray(SC.encode_create(SC.CreateRequest(req.token, req.name)))
    for _ in range(draw(st.integers(0, 3))):
        p[draw(st.integers(0, len(p) - 1))] = draw(st.integers(0, 255))
    if draw(st.integers(0, 4)) == 0:
        p = p[: draw(st.integers(0, len(p)))]
    if draw(st.integers(0, 4)) == 0:
        p += draw(st.binary(max_size=16))
    return bytes(p)


@FUZZ
@given(create_lists(), st.integers(0, 3), st.booleans())
def test_snapshot_create_parameter_lists(params, flags, allowed):
    snaps = FakeSnapshots()
    lun = FakeLun(size=LUN_SIZE)
    emu = emulator(lun, snaps, allowed=allowed)
    cdb = SC.create_cdb(len(params), wait=bool(flags & 1), group=bool(flags & 2))
    r = run_one(emu, lun, cdb, params, None)
    if r.status == S.GOOD:
        assert allowed
        assert len(snaps.created) == 1
        req = snaps.created[0]
        assert SC.decode_create(params, wait=bool(flags & 1), group=bool(flags & 2)) == req
        assert SC.check_name(req.name) is None and any(req.token)
        assert all(SC.check_label(k, v) is None for k, v in req.labels.items())
        assert run_one(emu, lun, cdb, params, None).status == S.GOOD  # retry
        assert len(snaps.created) == 1
    else:
        assert snaps.created == []
    assert lun.calls == []


TOKENS = (b"\x01" * 16, b"\x02" * 16)  # 0: a snapshot that exists, 1: one exported


@st.composite
def delete_lists(draw) -> bytes:
    p = bytearray(SC.encode_delete(draw(st.sampled_from([TOKENS[0], TOKENS[1], b"\xee" * 16]))))
    for _ in range(draw(st.integers(0, 2))):
        p[draw(st.integers(0, len(p) - 1))] = draw(st.integers(0, 255))
    if draw(st.integers(0, 4)) == 0:
        p = p[: draw(st.integers(0, len(p)))]
    if draw(st.integers(0, 4)) == 0:
        p += draw(st.binary(max_size=8))
    return bytes(p)


@FUZZ
@given(delete_lists(), st.booleans(), st.booleans(), st.integers(0, 3))
def test_snapshot_delete_parameter_lists(params, allowed, read_only, retries):
    snaps = FakeSnapshots()
    lun = FakeLun(size=LUN_SIZE, read_only=read_only)
    emu = emulator(lun, snaps, allowed=allowed)
    for tok, name in zip(TOKENS, ("kept", "exported"), strict=True):
        snaps.create(lun, SC.CreateRequest(tok, name, wait=True))
    snaps.in_use.add("exported")
    before = list(snaps.entries)
    cdb = SC.delete_cdb(len(params))
    r = run_one(emu, lun, cdb, params, None)
    if r.status == S.GOOD:
        assert allowed and not read_only
        assert snaps.deleted == [TOKENS[0]] and SC.decode_delete(params) == TOKENS[0]
        for _ in range(retries):  # a retry is GOOD and deletes nothing more
            assert run_one(emu, lun, cdb, params, None).status == S.GOOD
        assert snaps.deleted == [TOKENS[0]]
    else:
        assert snaps.deleted == [] and snaps.entries == before
    assert lun.calls == []


# -- data: every path agrees with a model -------------------------------------------------

BLOCKS = LUN_SIZE // BS

ops = st.one_of(
    st.tuples(
        st.just("write"),
        st.sampled_from([6, 10, 12, 16]),
        st.integers(0, BLOCKS - 1),
        st.integers(1, 16),
        st.integers(0, 255),
        st.booleans(),
    ),
    st.tuples(
        st.just("read"),
        st.sampled_from([6, 10, 12, 16]),
        st.integers(0, BLOCKS - 1),
        st.integers(1, 16),
    ),
    st.tuples(
        st.just("same"),
        st.sampled_from([10, 16]),
        st.integers(0, BLOCKS - 1),
        st.integers(1, 64),
        st.integers(0, 2),
        st.booleans(),
    ),
    st.tuples(st.just("unmap"), st.integers(0, BLOCKS - 1), st.integers(0, 64)),
    st.tuples(
        st.just("wv"),
        st.sampled_from([10, 12, 16]),
        st.integers(0, BLOCKS - 1),
        st.integers(1, 8),
        st.integers(0, 255),
    ),
)

BUILD = {6: rw6, 10: rw10, 12: rw12, 16: rw16}
READ = {6: 0x08, 10: 0x28, 12: 0xA8, 16: 0x88}
WRITE = {6: 0x0A, 10: 0x2A, 12: 0xAA, 16: 0x8A}
WV = {10: 0x2E, 12: 0xAE, 16: 0x8E}


def ws(size: int, lba: int, n: int, flags: int) -> bytes:
    if size == 10:
        return bytes((0x41, flags)) + lba.to_bytes(4, "big") + b"\0" + n.to_bytes(2, "big") + b"\0"
    return rw16(0x93, lba, n, flags)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, min_size=1, max_size=25))
def test_reads_see_every_write_path(seq):
    lun = FakeLun(size=LUN_SIZE)
    emu = emulator(lun, limits=LIMITS)
    model = bytearray(LUN_SIZE)
    for op in seq:
        kind = op[0]
        if kind == "write":
            _, size, lba, n, byte, fua = op
            if size == 6:
                lba, fua = min(lba, 0x1FFFFF), False
            data = bytes([byte]) * (n * BS)
            r = emu.execute(
                BUILD[size](WRITE[size], lba, n, *(() if size == 6 else (0x08 * fua,))), data
            )
            fits = lba + n <= BLOCKS
            assert r.ok == fits
            if fits:
                model[lba * BS : (lba + n) * BS] = data
        elif kind == "read":
            _, size, lba, n = op
            r = emu.execute(BUILD[size](READ[size], lba, n))
            if lba + n <= BLOCKS:
                assert r.data == model[lba * BS : (lba + n) * BS]
            else:
                assert S.decode(r.sense).code == S.LBA_OUT_OF_RANGE
        elif kind == "same":
            _, size, lba, n, pat, unmap = op
            blk = bytes(BS) if pat == 0 else bytes([pat]) * BS
            r = emu.execute(ws(size, lba, n, 0x08 if unmap else 0), blk)
            if lba + n <= BLOCKS:
                assert r.ok
                model[lba * BS : (lba + n) * BS] = blk * n
        elif kind == "unmap":
            _, lba, n = op
            p = unmap_params([(lba, n)])
            r = emu.execute(unmap_cdb(len(p)), p)
            if lba + n <= BLOCKS:
                assert r.ok
                model[lba * BS : (lba + n) * BS] = bytes(n * BS)
        else:
            _, size, lba, n, byte = op
            data = bytes([byte]) * (n * BS)
            r = emu.execute(BUILD[size](WV[size], lba, n, 0x02), data)
            if lba + n <= BLOCKS:
                assert r.ok
                model[lba * BS : (lba + n) * BS] = data
    assert lun.buf == model


def test_concurrent_execute_is_safe():
    lun = FakeLun(size=LUN_SIZE)
    emu = emulator(lun, FakeSnapshots(), limits=LIMITS)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(200):
                lba = (i * 200 + j) % BLOCKS
                assert emu.execute(rw10(0x2A, lba, 1), bytes([i]) * BS).ok
                assert emu.execute(rw10(0x28, lba, 1)).ok
                assert emu.execute(mode_sense6(0x3F)).ok
                ctl = emu.execute(mode_sense6(0x0A, dbd=True)).data
                p = bytearray(bytes(1) + ctl[1:])
                p[4 + 2] = (p[4 + 2] & ~0x04) | (0x04 if j % 2 else 0)
                assert emu.execute(mode_select6(len(p)), bytes(p)).ok
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
