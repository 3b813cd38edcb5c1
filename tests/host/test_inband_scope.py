"""What an initiator reaches through the in-band snapshot command: GROUP
cuts, and LIST/STATUS show, only the volumes exported to every initiator
that can send the command on that path, with snapshot rights; and the
command's rate per path is bounded (a clear sense when exceeded). The
Manager and catalog are real; only the snapshot machinery below
``snapshot_create`` (the journal, dm) is replaced by a recorder, since the
choice of volumes is what is tested."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_scsi_support import FakeLun, FakeSnapshots, emulator, sense_of

from dmsnap.scsi import sense as S
from dmsnap.scsi import snapcmd as SC
from dmsnap.scsi.emulation import Emulator
from dmsnap.scsi.sense import Key
from dmsnap.storage.inband import InbandSnapshots
from dmsnap.storage.manager import Manager

A = "iqn.2026-11.org.example:a"
B = "iqn.2026-11.org.example:b"


class _NoDm:
    def close(self) -> None:
        pass


class _Recording(Manager):
    """The real Manager, with the snapshot itself (journal marker) recorded."""

    made: list[list[list[str]]]

    def snapshot_create(self, refs: Any, name: str, **kw: Any) -> dict[str, Any]:
        self.made.append([list(r) for r in refs])
        return {"state": "pending"}


@pytest.fixture
def m(tmp_path: Path):
    mgr = _Recording(str(tmp_path), dm=_NoDm())  # type: ignore[arg-type]
    mgr.made = []
    cat = mgr.catalog
    p = cat.add_pool(
        "p",
        "thin",
        data_dev=None,
        cache_dev=None,
        size=1 << 30,
        cache_size=None,
        config={"journal": {"mode": "nv"}},
    )
    vols = {n: cat.add_volume(p, n, 1 << 20, dev_id=i) for i, n in enumerate("abcdef", 1)}

    def iscsi(vol: str, allow: list[str], rights: tuple[str, ...] | None) -> None:
        cfg = {"iqn": f"iqn.2026-11.x:{vol}", "portal": "0.0.0.0:3260", "allow": allow}
        cat.add_export(p.id, vols[vol].id, None, "iscsi", f"s{vol}", cfg, snapshot_allow=rights)

    iscsi("a", [A, B], (A,))  # only A may snapshot a (B reaches it read-write)
    iscsi("b", [A], None)  # A may snapshot b
    iscsi("c", [B], None)  # B's alone
    iscsi("d", [A, B], ())  # nobody may snapshot d
    # e: not exported; f: exported locally (this host, not A)
    cat.add_export(p.id, vols["f"].id, None, "local", "sf", {}, snapshot_allow=None)
    mgr.vols = vols  # type: ignore[attr-defined]
    yield mgr
    cat.close()


def _create(svc: InbandSnapshots, name: str, *, group: bool) -> None:
    token = bytes([len(name)]) * 15 + b"\x01"
    svc.create(FakeLun(), SC.CreateRequest(token, name, group=group))


def test_group_cuts_only_volumes_the_sender_may_snapshot(m: _Recording) -> None:
    _create(InbandSnapshots(m, "p", "a"), "g1", group=True)
    # from a's snapshot path (A only): a and b (A may snapshot both), not c
    # (B's), d (nobody), e (not exported) or f (a local disk)
    assert m.made[-1] == [["p", "a"], ["p", "b"]]
    _create(InbandSnapshots(m, "p", "c"), "g2", group=True)
    assert m.made[-1] == [["p", "c"]]  # B may snapshot c only (a's right is A's)
    _create(InbandSnapshots(m, "p", "f"), "g3", group=True)
    assert m.made[-1] == [["p", "f"]]  # the local host: its local exports
    _create(InbandSnapshots(m, "p", "b"), "one", group=False)
    assert m.made[-1] == [["p", "b"]]


def test_list_and_status_show_only_requests_of_visible_volumes(m: _Recording) -> None:
    cat, v = m.catalog, m.vols  # type: ignore[attr-defined]
    pid = cat.pool("p").id
    tok = {n: bytes([i]) * 16 for i, n in enumerate(("ra", "rc", "rac", "re"), 1)}
    cat.add_marker(pid, "ra", tok["ra"].hex(), {"volumes": [v["a"].id], "labels": {}})
    cat.add_marker(pid, "rc", tok["rc"].hex(), {"volumes": [v["c"].id], "labels": {"t": "B"}})
    cat.add_marker(pid, "rac", tok["rac"].hex(), {"volumes": [v["a"].id, v["c"].id]})
    cat.add_marker(pid, "re", tok["re"].hex(), {"volumes": [v["e"].id]})
    svc = InbandSnapshots(m, "p", "a")
    assert [e.name for e in svc.list(FakeLun())] == ["rac", "ra"]  # newest first
    assert svc.status(FakeLun(), SC.handle_of(tok["rc"])) == []
    assert svc.status(FakeLun(), SC.handle_of(tok["re"])) == []
    assert [e.name for e in svc.status(FakeLun(), SC.handle_of(tok["ra"]))] == ["ra"]
    # B's side sees its own volume's requests (and the group that cut c)
    assert [e.name for e in InbandSnapshots(m, "p", "c").list(FakeLun())] == ["rac", "rc"]


def test_a_group_snapshot_shows_only_the_visible_members(m: _Recording) -> None:
    cat, v = m.catalog, m.vols  # type: ignore[attr-defined]
    p = cat.pool("p")
    mid = cat.add_marker(p.id, "both", (b"\x07" * 16).hex(), {"volumes": [v["a"].id, v["c"].id]})
    gid = cat.add_group(p, "both", [(v["a"], {"dev_id": 7}), (v["c"], {"dev_id": 8})], marker=mid)
    cat.finish_marker(mid, group_id=gid)
    (e,) = InbandSnapshots(m, "p", "a").list(FakeLun())
    assert e.snapshots == ("p/a@both",)  # c's snapshot is B's business


# -- the rate of in-band requests --------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_requests_beyond_the_rate_get_a_documented_sense_and_change_nothing() -> None:
    from dmsnap.scsi.emulation import TokenBucket

    clock = Clock()
    snaps = FakeSnapshots()
    emu = Emulator(
        FakeLun(),
        snaps,
        snapshot_allowed=lambda _i: True,
        inband_rate=TokenBucket(rate=2.0, burst=3, clock=clock),
    )
    for _ in range(3):
        assert emu.execute(SC.list_cdb()).status == 0
    cdb, params = SC.create_command(SC.CreateRequest(bytes(range(1, 17)), "x"))
    r = emu.execute(cdb, params)
    assert sense_of(r) == (Key.ABORTED_COMMAND, *SC.INBAND_RATE_EXCEEDED)
    sense = r.decoded_sense()
    assert sense is not None and sense.information == 500  # ms until the next token
    assert not snaps.created
    assert "too many in-band requests" in SC.explain(sense)
    clock.t += 0.5
    assert emu.execute(cdb, params).status == 0 and len(snaps.created) == 1
    # ordinary I/O is never counted
    assert emu.execute(bytes((0x00, 0, 0, 0, 0, 0))).status == 0


def test_every_export_path_bounds_the_rate() -> None:
    """The emulator an export path serves with (target.make_emulator)
    answers a burst of LISTs with the rate sense after its burst size."""
    from dmsnap.scsi import target

    emu = target.make_emulator(FakeLun(), FakeSnapshots(), snapshot_allowed=lambda _i: True)
    answers = [emu.execute(SC.list_cdb()) for _ in range(target.INBAND_BURST + 5)]
    refused = [r for r in answers if r.status != 0]
    assert len(refused) >= 5
    assert all(sense_of(r) == (Key.ABORTED_COMMAND, *SC.INBAND_RATE_EXCEEDED) for r in refused)


def test_the_plain_emulator_is_unchanged() -> None:
    emu = emulator(FakeLun(), FakeSnapshots())
    assert all(emu.execute(SC.list_cdb()).status == 0 for _ in range(100))
    assert S.Key.ABORTED_COMMAND == 0xB
