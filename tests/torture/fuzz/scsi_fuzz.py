"""Coverage-guided fuzzing of the SCSI emulator and the vendor-command codec
(atheris, libFuzzer's engine for Python).

hypothesis drives the same properties in tests/host/test_scsi_fuzz.py, but at
100-500 examples a second its strategies, not the emulator (about 18,000
commands a second), are the cost; a million examples is a campaign of
minutes here instead of hours. The checks are the same code (run_one).

An input is one LUN's life: a flags byte, then up to MAX_COMMANDS commands,
each encoded as
    u8 cdb length, the CDB, u16 Data-Out length (0xFFFF: none), the Data-Out,
    u8 buffer selector (DATA_IN_LENS: none, or an initiator buffer size)
so state carries from command to command (D_SENSE through MODE SELECT, a
snapshot request and its STATUS/LIST/DELETE). The seed corpus
(tests/torture/corpus/scsi/, made by --make-corpus from the hypothesis
strategies) starts it on well-formed commands of every supported opcode.

  python tests/torture/fuzz/scsi_fuzz.py [libFuzzer options] [corpus dirs]
  python tests/torture/fuzz/scsi_fuzz.py --replay FILE...
  python tests/torture/fuzz/scsi_fuzz.py --make-corpus DIR [--count N]
"""

from __future__ import annotations

import hashlib
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT / "tests" / "host"), str(ROOT)]

MAX_COMMANDS = 8
DATA_IN_LENS = (None, 0, 1, 4, 8, 36, 252, 512, 4096, 65536, 70000)
TOKENS = (b"\x01" * 16, b"\x02" * 16)


def parse(data: bytes) -> tuple[int, list[tuple[bytes, bytes | None, int | None]]]:
    """The input's flags and commands; a truncated tail is dropped."""
    if not data:
        return 0, []
    flags, pos, cmds = data[0], 1, []
    while pos < len(data) and len(cmds) < MAX_COMMANDS:
        n = data[pos]
        cdb = data[pos + 1 : pos + 1 + n]
        pos += 1 + n
        if pos + 2 > len(data):
            cmds.append((cdb, None, None))
            break
        (dlen,) = struct.unpack_from(">H", data, pos)
        pos += 2
        out: bytes | None = None
        if dlen != 0xFFFF:
            out = data[pos : pos + dlen]
            pos += dlen
        sel = data[pos] if pos < len(data) else 0
        pos += 1
        cmds.append((cdb, out, DATA_IN_LENS[sel % len(DATA_IN_LENS)]))
    return flags, cmds


def encode(flags: int, cmds: list[tuple[bytes, bytes | None, int | None]]) -> bytes:
    b = bytearray((flags,))
    for cdb, out, din in cmds:
        b += bytes((len(cdb),)) + cdb
        b += struct.pack(">H", 0xFFFF if out is None else len(out)) + (out or b"")
        b.append(DATA_IN_LENS.index(din) if din in DATA_IN_LENS else 0)
    return bytes(b)


def one_input(data: bytes) -> None:
    """Any failed assertion or exception is a finding (atheris saves the input)."""
    from test_scsi_fuzz import LIMITS, LUN_SIZE, run_one
    from test_scsi_support import FakeLun, FakeSnapshots, emulator

    from dmsnap.scsi import snapcmd as SC
    from dmsnap.scsi.sense import GOOD

    flags, cmds = parse(data)
    read_only, allowed = bool(flags & 1), not flags & 2
    lun = FakeLun(size=LUN_SIZE, read_only=read_only, wce=bool(flags & 4))
    snaps = FakeSnapshots()
    emu = emulator(lun, snaps, allowed=allowed, limits=LIMITS)
    for cdb, out, din in cmds:
        before = len(snaps.created)
        r = run_one(emu, lun, cdb, out, din)
        if len(snaps.created) > before:
            # only an allowed initiator's well-formed request makes a snapshot
            assert allowed and r.status == GOOD, cdb.hex()
            req = snaps.created[-1]
            assert SC.check_name(req.name) is None and any(req.token), req
    if read_only:
        assert not lun.writes()


def make_corpus(out: Path, count: int) -> int:
    """Seed inputs from the hypothesis strategies: every supported opcode,
    well-formed parameter lists, short sequences."""
    from hypothesis import strategies as st
    from test_scsi_fuzz import (
        cdbs,
        create_lists,
        data_in_lens,
        data_outs,
        delete_lists,
        mode_pages,
        plausible,
        unmap_lists,
    )
    from test_scsi_support import mode_select6, mode_select10, unmap_cdb

    from dmsnap.scsi import snapcmd as SC

    def fixed(lst):
        return [(c, o, d if d in DATA_IN_LENS else None) for c, o, d in lst]

    def one_of_lists():
        seq = st.lists(st.tuples(plausible(), data_in_lens), min_size=1, max_size=6).map(
            lambda s: fixed([(c, o, d) for (c, o), d in s])
        )
        raw = st.lists(st.tuples(cdbs(), data_outs, data_in_lens), min_size=1, max_size=4).map(
            fixed
        )
        unmap = unmap_lists().map(lambda p: [(unmap_cdb(len(p)), p, None)])
        mode = mode_pages().map(
            lambda tp: [
                ((mode_select10 if tp[0] else mode_select6)(len(tp[1]) & 0xFF), tp[1], None)
            ]
        )
        create = st.tuples(create_lists(), st.integers(0, 3)).map(
            lambda a: [
                (SC.create_cdb(len(a[0]), wait=bool(a[1] & 1), group=bool(a[1] & 2)), a[0], None),
                (SC.list_cdb(4096), None, 4096),
            ]
        )
        delete = delete_lists().map(lambda p: [(SC.delete_cdb(len(p)), p, None)])
        return st.tuples(st.integers(0, 7), st.one_of(seq, seq, raw, unmap, mode, create, delete))

    out.mkdir(parents=True, exist_ok=True)
    strat = one_of_lists()
    seen = 0
    for _ in range(count):
        flags, cmds = strat.example()
        blob = encode(flags, cmds)
        (out / hashlib.sha1(blob).hexdigest()).write_bytes(blob)
        seen += 1
    return seen


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--replay"]:
        for f in args[1:]:
            one_input(Path(f).read_bytes())
            print(f"ok {f}")
        return
    if args[:1] == ["--make-corpus"]:
        count = int(args[args.index("--count") + 1]) if "--count" in args else 300
        print(f"{make_corpus(Path(args[1]), count)} seeds in {args[1]}")
        return
    import atheris

    with atheris.instrument_imports(include=["dmsnap.scsi"]):
        import dmsnap.scsi.cdb
        import dmsnap.scsi.emulation
        import dmsnap.scsi.sense
        import dmsnap.scsi.snapcmd  # noqa: F401
    atheris.Setup([sys.argv[0], *args], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
