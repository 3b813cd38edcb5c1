"""Volumes over SCSI on the real kernel: a journaled volume exported through
LIO (TCMU user backstore served by dmsnapd's ring handler) as a local disk;
sg3-utils decode our answers; the in-band snapshot command, sent over SG_IO
as an initiator would, makes a snapshot holding exactly the writes completed
before it."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading

import pytest
from jmodel import Model, first_difference, read_direct
from scsi_util import pwrite_direct

from dmsnap import errors as E
from dmsnap.scsi import initiator, lio, sgio, target
from dmsnap.scsi import snapcmd as SC
from dmsnap.storage.manager import Manager

MiB = 1 << 20
VOL = 16 * MiB


def run(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(cmd)}: {r.returncode} {r.stderr}"
    return r.stdout


@pytest.fixture
def exported(tmp_path):
    if (why := lio.available()) is not None:
        pytest.fail(why)
    m = Manager(str(tmp_path / "state"))
    try:
        m.pool_create("s", size=256 * MiB, journal_size=16 * MiB)
        m.volume_create("s", "v", VOL)
        ex = m.export_create("s", "v", kind="local")
        disk = os.path.realpath("/dev/dmsnap/s/v")
        assert disk.startswith("/dev/sd"), disk
        yield m, disk, ex
    finally:
        for p in m.catalog.pools():
            m.pool_destroy(p.name, force=True)
        m.close()


def test_sg3_utils_decode_our_answers(exported):
    m, disk, ex = exported
    inq = run("sg_inq", disk)
    assert "DMSNAP" in inq and "dmsnap volume" in inq
    assert ex["serial"] in run("sg_vpd", "-p", "0x80", disk)
    vpd83 = run("sg_vpd", "-p", "0x83", disk)
    assert "designator type: NAA" in vpd83 and "0x6" in vpd83  # NAA 6 (registered extended)
    cap = run("sg_readcap", "-l", disk)
    assert f"Last LBA={VOL // 512 - 1}" in cap and "Logical block length=512" in cap
    assert "lbpme=1" in cap  # thin provisioning advertised
    lbp = run("sg_vpd", "-p", "lbpv", disk)
    assert "Unmap command supported (LBPU): 1" in lbp
    modes = run("sg_modes", "-p", "0x08", disk)
    assert "Caching" in modes
    run("sg_turs", disk)
    ops = run("sg_opcodes", disk)
    assert "Read(16)" in ops and "Write(16)" in ops
    bad = subprocess.run(["sg_raw", disk, "e7", "00", "00", "00", "00", "00"], capture_output=True)
    assert bad.returncode != 0  # an opcode we do not know: CHECK CONDITION, not a hang
    # a second export of the same volume is refused and changes nothing
    before = m.catalog.counts()
    with pytest.raises(E.AlreadyExists):
        m.export_create("s", "v", kind="local")
    with pytest.raises(E.Busy):
        m.volume_delete("s", "v")
    assert m.catalog.counts() == before


def test_inband_snapshot_holds_exactly_the_completed_writes(exported):
    """Writers on the SCSI disk (O_DIRECT, several threads); snapshots asked
    in-band between their writes; each equals the model of the writes that
    had completed when the command was sent, and none of the later ones.
    (No write is in flight while the command is: the initiator cannot know
    the order of commands that overlap, so neither can the model.)"""
    m, disk, _ = exported
    vid = m.catalog.volume("s", "v").id
    model = Model({vid: VOL})
    order = threading.Lock()
    seq = [0]  # completion order stands in for the journal's seq
    stop = threading.Event()
    errors: list[BaseException] = []
    in_flight = [threading.Lock() for _ in range(4)]

    def writer(n: int) -> None:
        rng = random.Random(n)
        try:
            while not stop.is_set():
                length = rng.choice([4096, 8192, 65536])
                # each writer its own quarter: two writes in flight together
                # never overlap, so the order they are recorded in is moot
                region = VOL // 4
                off = n * region + rng.randrange(0, (region - length) // 4096) * 4096
                data = rng.randbytes(length)
                with in_flight[n]:
                    pwrite_direct(disk, off, data)
                    with order:
                        seq[0] += 1
                        model.record(seq[0], vid, off, data)
        except BaseException as e:
            errors.append(e)

    ts = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in ts:
        t.start()
    snaps: list[tuple[str, int, int]] = []
    try:
        for i in range(4):
            threading.Event().wait(0.3)
            for lk in in_flight:  # every write so far has completed and is recorded
                lk.acquire()
            try:
                before = seq[0]
                c = initiator.snapshot(disk, f"ib{i}", wait=True)
            finally:
                for lk in in_flight:
                    lk.release()
            assert c.entry is not None and c.entry.state.name == "DONE", c
            snaps.append((f"ib{i}", before + 1, c.entry.marker))
    finally:
        stop.set()
        for t in ts:
            t.join()
    assert not errors, errors[:3]
    # a retry with the same token makes nothing new
    again = initiator.snapshot(disk, "ib0", token=initiator.status(disk, c.token)[0].token)
    assert again.entry is not None and again.entry.marker == snaps[-1][2]
    assert len([r for r in initiator.list_requests(disk) if r.name.startswith("ib")]) == 4
    # LIST pages: SKIP passes over the newest requests
    everything = initiator.list_requests(disk)
    r = sgio.sg_io(disk, SC.list_cdb(skip=2), data_in_len=SC.MAX_RESPONSE)
    assert SC.decode_entries(r.data).entries == everything[2 : 2 + SC.LIST_MAX]
    for name, upto, _ in snaps:
        act = m.snapshot_activate("s", "v", name)
        try:
            got = read_direct(act["path"], 0, VOL)
        finally:
            m.snapshot_deactivate("s", "v", name)
        want = model.state(vid, upto)
        assert got == want, f"{name}: " + first_difference(got, want)
    # the whole disk, read back through SCSI, is the model's final state
    assert read_direct(disk, 0, VOL) == model.state(vid)


def dmsnap_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it on the initiator host (a separate process)."""
    code = "import sys; from dmsnap import cli; sys.exit(cli.run(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300
    )


def test_schedule_keep_prunes_only_its_own_snapshots(exported):
    m, disk, _ = exported
    # a user's snapshots named like the schedule's: one in-band, one on the storage system
    initiator.snapshot(disk, "auto-19990101-000000", wait=True)
    m.snapshot_create([["s", "v"]], "auto-19990101-000001", wait=True)
    p = dmsnap_cli("initiator", "schedule", disk, "--every", "1s", "--count", "5", "--keep", "2")
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""  # no failed request, no failed delete
    made = [ln.split(":")[0] for ln in p.stdout.splitlines() if ": requested" in ln]
    assert len(made) == 5 and all(n.startswith("auto-") for n in made)
    assert p.stdout.count(": deleted (keeping the newest 2)") == 3
    left = sorted(s["name"] for s in m.snapshot_list("s", "v"))
    assert left == sorted(["auto-19990101-000000", "auto-19990101-000001", *made[-2:]])
    listed = [e.name for e in initiator.list_requests(disk)]
    assert set(made[:3]).isdisjoint(listed)  # LIST shows what exists
    gone = [e for e in initiator.list_requests(disk) if e.name == made[-1]]
    assert gone and gone[0].labels.get(initiator.SCHEDULE_LABEL, "").startswith("auto@")


def test_initiator_delete_through_the_lun(exported):
    m, disk, _ = exported
    a = initiator.snapshot(disk, "keep-a", wait=True)
    b = initiator.snapshot(disk, "keep-b", wait=True)
    p = dmsnap_cli("initiator", "delete", disk, "keep-a")
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"deleted snapshot keep-a (token {a.token.hex()})\n"
    assert [s["name"] for s in m.snapshot_list("s", "v")] == ["keep-b"]
    p = dmsnap_cli("initiator", "delete", disk, "--token", a.token.hex())
    assert p.returncode == 0, p.stderr  # a retry of a delete: idempotent
    (st,) = initiator.status(disk, a.token)
    assert st.state.name == "DELETED" and st.snapshots == ()
    # an exported snapshot: refused, nothing changes
    snap_ex = m.export_create("s", "v", snap="keep-b", kind="local")
    before = m.catalog.counts()
    p = dmsnap_cli("initiator", "delete", disk, "keep-b")
    assert p.returncode == 8
    assert "in use on the storage system (exported or open); nothing was deleted" in p.stderr
    assert m.catalog.counts() == before
    # the snapshot's own (read-only) LUN does not take the command at all
    sdisk = lio.scsi_disk_for(snap_ex["serial"], timeout=30)
    assert sdisk is not None
    p = dmsnap_cli("initiator", "delete", sdisk, "--token", b.token.hex())
    assert p.returncode == 8 and "does not accept the dmsnap snapshot command" in p.stderr
    m.export_delete("s", "v", snap="keep-b")
    p = dmsnap_cli("initiator", "delete", disk, "--token", b.token.hex())
    assert p.returncode == 0, p.stderr
    assert m.snapshot_list("s", "v") == []
    p = dmsnap_cli("initiator", "delete", disk, "--token", "ee" * 16)
    assert p.returncode == 8 and "no snapshot of this volume" in p.stderr
    # a retried CREATE of a deleted request makes nothing new
    again = initiator.snapshot(disk, "keep-a", token=a.token, wait=True)
    assert again.entry is not None and again.entry.state.name == "DELETED"
    assert m.snapshot_list("s", "v") == []


def test_inband_group_and_list_reach_only_exported_volumes(exported):
    """Through the local disk, GROUP cuts the pool's volumes this host may
    snapshot in-band (those exported to it), not a volume that is not
    exported; LIST and STATUS do not show a request that cut only that
    other volume, and a burst of commands beyond the rate is answered (the
    initiator waits as asked) without an error."""
    m, disk, _ = exported
    m.volume_create("s", "other", VOL)
    hidden = m.snapshot_create([["s", "other"]], "admins-only", token="ab" * 16, wait=True)
    assert hidden["state"] == "done", hidden
    c = initiator.snapshot(disk, "g1", group=True, wait=True)
    assert c.entry is not None and c.entry.snapshots == ("s/v@g1",), c.entry
    made = {(s["volume"], s["name"]) for s in m.snapshot_list("s")}
    assert made == {("other", "admins-only"), ("v", "g1")}, made
    names_ = [e.name for e in initiator.list_requests(disk)]
    assert names_ == ["g1"], names_
    assert initiator.status(disk, bytes.fromhex("ab" * 16)) == []
    for _ in range(target.INBAND_BURST + 8):  # the rate sense, waited out
        initiator.list_requests(disk)
