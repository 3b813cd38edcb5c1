"""Replication on one storage system (issue 20): `dmsnap send` and
`dmsnap receive` between two thin pools of one dmsnapd, on real dm-thin.

The streams go through pipes whose ends are passed to dmsnapd the way the
CLI passes its stdin and stdout (the CLI itself is in-process: every Python
start in the VM costs 15-30 s; one real `dmsnap send | dmsnap receive`
shell pipe runs too). The independent witnesses: `sha256sum` of the source
and the received snapshot devices, `dmsetup status` for the pool's held
metadata root.
"""

from __future__ import annotations

import base64
import os
import random
import subprocess
import threading
from pathlib import Path

import pytest
from test_cli_e2e import DMSNAP, Daemon
from test_storage import MiB, read, write

from dmsnap.client import Client
from dmsnap.errors import UserError

SIZE = 96 * MiB  # > 64 MiB of data: a full stream carries a cursor mid-way


def _pipe_out(d: Daemon, op: str, **args: object) -> tuple[bytes, dict]:
    """Run a stream op whose output goes to a pipe; the stream and its answer."""
    r, w = os.pipe()
    got: list[bytes] = []

    def drain() -> None:
        with open(r, "rb") as f:
            got.append(f.read())

    t = threading.Thread(target=drain)
    t.start()
    try:
        with Client(d.sock) as c:
            result = c.call(op, fds=[w], **args)
    finally:
        os.close(w)
        t.join()
    return got[0], result


def send(d: Daemon, ref: str, base: str | None = None, resume: str | None = None):
    pool, rest = ref.split("/")
    vol, snap = rest.split("@")
    stream, result = _pipe_out(
        d, "replication.send", pool=pool, vol=vol, snap=snap, base=base, resume=resume
    )
    assert held_root("src") == "-"  # the metadata snapshot was released
    assert result["stream_bytes"] == len(stream)
    return stream, result


def receive(d: Daemon, ref: str, stream: bytes, force: bool = False) -> dict:
    pool, vol = ref.split("/")
    r, w = os.pipe()

    def feed() -> None:  # a refusing receiver stops reading: the rest is not wanted
        view = memoryview(stream)
        try:
            while view:
                view = view[os.write(w, view[: 1 << 20]) :]
        except BrokenPipeError:
            pass
        finally:
            os.close(w)

    t = threading.Thread(target=feed)
    t.start()
    try:
        with Client(d.sock) as c:
            return c.call("replication.receive", fds=[r], pool=pool, vol=vol, force=force or None)
    finally:
        os.close(r)
        t.join()


def refused(d: Daemon, ref: str, stream: bytes, words: str, force: bool = False) -> str:
    with pytest.raises(UserError) as ei:
        receive(d, ref, stream, force)
    assert words in ei.value.message, ei.value.message
    assert "\n" not in ei.value.message
    return ei.value.message


def held_root(pool: str) -> str:
    out = subprocess.run(
        ["dmsetup", "status", f"dmsnap-{pool}-_tpool"], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[6]  # start len thin-pool txid meta data HELD-ROOT mode ...


def sha(path: str) -> str:
    out = subprocess.run(["sha256sum", path], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def snap_sha(d: Daemon, ref: str) -> str:
    path = d.json("snapshot", "activate", ref)["path"]
    try:
        return sha(path)
    finally:
        d.cli("snapshot", "deactivate", ref)


def snapshots(d: Daemon, pool: str, vol: str) -> list[str]:
    return [s["name"] for s in d.json("snapshot", "list", f"{pool}/{vol}")]


@pytest.fixture(scope="module")
def rig(module_tmp: Path):
    """One dmsnapd; pool src (thin, no journal: its volumes are written
    directly) with src/v written and snapshotted as s1; pool dst (thin,
    the default NV journal) to receive into."""
    d = Daemon(module_tmp)
    d.start()
    try:
        d.cli("pool", "create", "src", "--size", "512M", "--journal-mode", "none")
        d.cli("pool", "create", "dst", "--size", "512M")
        d.cli("volume", "create", "src/v", "--size", str(SIZE))
        rnd = random.Random(20)
        write("/dev/dmsnap/src/v", 0, rnd.randbytes(80 * MiB))
        d.cli("snapshot", "create", "src/v", "s1")
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            for p in d.json("pool", "list"):
                d.cli("pool", "destroy", p["name"], "--force", "--yes")
            d.stop(teardown=True)


@pytest.mark.allow_leftovers("the module's pools stay to its end")
def test_full_then_incrementals_are_byte_identical(rig: Daemon) -> None:
    d = rig
    v = "/dev/dmsnap/src/v"
    full, r = send(d, "src/v@s1")
    assert r["data_bytes"] == 80 * MiB  # the mapped blocks only, not the volume
    assert receive(d, "dst/v", full)["snapshot"] == "s1"
    assert snapshots(d, "dst", "v") == ["s1"]
    assert snap_sha(d, "src/v@s1") == snap_sha(d, "dst/v@s1")

    # s2: a rewrite, a discard (must arrive as zeros), a new block past the data
    rnd = random.Random(2)
    write(v, 10 * MiB, rnd.randbytes(MiB))
    subprocess.run(["blkdiscard", "-o", str(20 * MiB), "-l", str(4 * MiB), v], check=True)
    write(v, 90 * MiB, rnd.randbytes(MiB))
    d.cli("snapshot", "create", "src/v", "s2")
    inc, r = send(d, "src/v@s2", base="s1")
    assert len(inc) < len(full) // 10  # the changed blocks, not the volume
    assert r["zero_bytes"] == 4 * MiB and r["data_bytes"] == 2 * MiB
    receive(d, "dst/v", inc)
    assert snapshots(d, "dst", "v") == ["s1", "s2"]
    assert snap_sha(d, "src/v@s2") == snap_sha(d, "dst/v@s2")
    path = d.json("snapshot", "activate", "dst/v@s2")["path"]
    assert read(path, 20 * MiB, 4 * MiB) == bytes(4 * MiB)
    d.cli("snapshot", "deactivate", "dst/v@s2")

    # s3 through a flipped byte (refused, nothing visible), then the good stream
    write(v, 40 * MiB, rnd.randbytes(64 << 10))
    d.cli("snapshot", "create", "src/v", "s3")
    inc3, _ = send(d, "src/v@s3", base="s2")
    bad = bytearray(inc3)
    bad[len(bad) // 2] ^= 0x10
    refused(d, "dst/v", bytes(bad), "damaged")
    assert snapshots(d, "dst", "v") == ["s1", "s2"]
    assert d.json("receive", "dst/v", "--token")["receiving"]
    # the real CLI in a shell pipe; the receive's own stream restarts at 0
    sock = d.sock
    out = subprocess.run(
        f"{DMSNAP} --socket {sock} send src/v@s3 --from s2 | {DMSNAP} --socket {sock} "
        "receive dst/v",
        shell=True,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "received dst/v@s3"
    assert snap_sha(d, "src/v@s3") == snap_sha(d, "dst/v@s3")
    assert not d.json("receive", "dst/v", "--token")["receiving"]

    # a wrong base: s1 -> s4 into a target whose newest is s3
    write(v, 50 * MiB, rnd.randbytes(64 << 10))
    d.cli("snapshot", "create", "src/v", "s4")
    wrong, _ = send(d, "src/v@s4", base="s1")
    refused(d, "dst/v", wrong, "wrong base")
    assert snapshots(d, "dst", "v") == ["s1", "s2", "s3"]

    # another volume's stream is never applied here
    d.cli("volume", "create", "src/w", "--size", str(SIZE))
    d.cli("snapshot", "create", "src/w", "w1")
    write("/dev/dmsnap/src/w", 0, rnd.randbytes(MiB))
    d.cli("snapshot", "create", "src/w", "w2")
    other, _ = send(d, "src/w@w2", base="w1")
    refused(d, "dst/v", other, "another volume")

    # the target written since its base: refused, then --force rolls it back
    inc4, _ = send(d, "src/v@s4", base="s3")
    with Client(d.sock) as c:
        c.call(
            "volume.write",
            pool="dst",
            vol="v",
            offset=0,
            content=base64.b64encode(b"x" * 4096).decode(),
        )
    refused(d, "dst/v", inc4, "written since")
    assert snapshots(d, "dst", "v") == ["s1", "s2", "s3"]
    receive(d, "dst/v", inc4, force=True)
    assert snap_sha(d, "src/v@s4") == snap_sha(d, "dst/v@s4")
    with Client(d.sock) as c:  # the volume reads as the received snapshot
        got = c.call("volume.read", pool="dst", vol="v", offset=0, length=4096)
    assert base64.b64decode(got["content"]) == read(v, 0, 4096) != b"x" * 4096

    # holds: the last snapshot the target received stays
    d.cli("replication", "hold", "src/v@s3", "--target", "dst")
    d.cli("replication", "hold", "src/v@s4", "--target", "dst")  # moves the hold
    r = d.cli("snapshot", "delete", "src/v@s4", check=False)
    assert r.returncode != 0 and "held by replication target(s) dst" in r.stderr
    assert "s4" in snapshots(d, "src", "v")
    d.cli("snapshot", "delete", "src/v@s3")  # no longer held
    d.cli("snapshot", "delete", "src/v@s4", "--force")
    assert snapshots(d, "src", "v") == ["s1", "s2"]


@pytest.mark.allow_leftovers("the module's pools stay to its end")
def test_interrupted_receive_resumes_from_its_cursor(rig: Daemon) -> None:
    d = rig
    full, _ = send(d, "src/v@s1")
    cut = full[: len(full) * 9 // 10]
    msg = refused(d, "dst/r", cut, "cut short")
    assert "--resume" in msg
    assert "r" not in [v["name"] for v in d.json("volume", "list", "dst")]  # not visible
    state = d.json("receive", "dst/r", "--token")
    assert state["receiving"] and state["cursor"] == 64 * MiB
    token = d.cli("receive", "dst/r", "--token").stdout.strip()
    # a token is for its own stream only
    d.cli("snapshot", "create", "src/v", "t2")
    with pytest.raises(UserError, match="another stream"):
        send(d, "src/v@t2", resume=token)
    assert held_root("src") == "-"
    rest, r = send(d, "src/v@s1", resume=token)
    assert r["start"] == 64 * MiB and len(rest) < len(full) - 60 * MiB
    receive(d, "dst/r", rest)
    assert snap_sha(d, "src/v@s1") == snap_sha(d, "dst/r@s1")

    # a receive cut again can be discarded
    refused(d, "dst/q", cut, "cut short")
    d.cli("receive", "dst/q", "--abort")
    assert not d.json("receive", "dst/q", "--token")["receiving"]
    assert "q" not in [v["name"] for v in d.json("volume", "list", "dst")]


@pytest.mark.allow_leftovers("the module's pools stay to its end")
def test_a_classic_pool_sends_full_streams(rig: Daemon) -> None:
    d = rig
    d.cli(
        "pool", "create", "cl", "--backend", "classic", "--size", "128M", "--journal-mode", "none"
    )
    d.cli("volume", "create", "cl/c", "--size", "8M")
    write("/dev/dmsnap/cl/c", 0, random.Random(3).randbytes(8 * MiB))
    d.cli("snapshot", "create", "cl/c", "c1")
    d.cli("snapshot", "create", "cl/c", "c2")
    with pytest.raises(UserError, match="full stream"):
        send_classic(d, "cl/c@c2", base="c1")
    stream, r = send_classic(d, "cl/c@c1")
    assert r["data_bytes"] == 8 * MiB
    receive(d, "dst/c", stream)
    assert snap_sha(d, "cl/c@c1") == snap_sha(d, "dst/c@c1")
    # a classic snapshot is activated only for the send
    assert not next(s for s in d.json("snapshot", "list", "cl/c") if s["name"] == "c1")["active"]
    d.cli("pool", "destroy", "cl", "--force", "--yes")


def send_classic(d: Daemon, ref: str, base: str | None = None):
    pool, rest = ref.split("/")
    vol, snap = rest.split("@")
    return _pipe_out(d, "replication.send", pool=pool, vol=vol, snap=snap, base=base)


def test_a_metadata_snapshot_left_reserved_is_released_at_start(tmp_path: Path) -> None:
    """A crash during a send leaves the pool's metadata snapshot reserved:
    the next start releases it (after_assembly)."""
    from dmsnap.storage.manager import Manager

    m = Manager(str(tmp_path / "state"))
    try:
        m.pool_create("m", size=256 * MiB, journal_mode="none")
        subprocess.run(
            ["dmsetup", "message", "dmsnap-m-_tpool", "0", "reserve_metadata_snap"], check=True
        )
        assert held_root("m") != "-"
        m.close()
        m = Manager(str(tmp_path / "state"))
        m.assemble()
        assert held_root("m") == "-"
    finally:
        m.pool_destroy("m", force=True)
        m.close()
