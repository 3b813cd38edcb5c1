"""Progress of long work from the real storage core (docs/cli.md,
"Progress of long work"): a real dmsnapd, a real classic merge, and its
progress read over the socket while the restore request runs and holds
the control lock."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import pytest
from test_cli_e2e import daemon  # noqa: F401 - the fixture
from test_storage import MiB, block, read, write

from dmsnap.client import Client
from dmsnap.daemon import protocol as proto

pytestmark = pytest.mark.kernel

DIRTY = 96 * MiB  # overwritten after the snapshot: the COW data the merge copies back


def test_classic_restore_reports_the_merge_while_it_runs(daemon) -> None:  # noqa: F811
    d = daemon
    with Client(d.sock, timeout=120) as c:
        # the other long ops report through the same path: their last words
        seen: list[dict[str, Any]] = []
        c.call_watched(
            "pool.create", seen.append, name="p", backend="classic", size=512 * MiB,
            journal_mode="none",
        )  # fmt: skip
        assert seen[-1]["state"] == "done" and seen[-1]["phase"] == "building the pool"
        assert (seen[-1]["done"], seen[-1]["total"], seen[-1]["unit"]) == (4, 4, "steps")
        seen.clear()
        c.call_watched("volume.create", seen.append, pool="p", vol="v", size=128 * MiB)
        zeroing = next(p for p in seen[-1]["phases"] if p["phase"] == "zeroing")
        assert (zeroing["done"], zeroing["total"]) == (128 * MiB, 128 * MiB)

    vol = "/dev/dmsnap/p/v"
    write(vol, 0, block(0xA1))
    # a COW that holds it all (the default, 32M, grows by autoextend once a
    # second: fast writes can overflow it first and invalidate the snapshot)
    d.cli("snapshot", "create", "p/v", "s", "--cow-size", "128M")
    for off in range(0, DIRTY, 8 * MiB):  # every chunk copied once into the COW
        write(vol, off, block(0xB2, 8 * MiB))

    answer: dict[str, Any] = {}

    def restore() -> None:
        # the request as the wire carries it: a progress token in the envelope
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(300)
            s.connect(d.sock)
            args = {"pool": "p", "vol": "v", "name": "s"}
            s.sendall(proto.request(1, "snapshot.restore", args, progress="merge-1"))
            answer.update(json.loads(s.makefile("rb").readline()))

    t = threading.Thread(target=restore)
    t.start()
    reads: list[dict[str, Any]] = []
    with Client(d.sock, timeout=10) as c:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                p = c.call("op.progress", token="merge-1")
            except Exception as e:  # not begun yet
                assert "no request with progress token" in str(e)
                time.sleep(0.01)
                continue
            reads.append(p)
            if p["state"] != "running":
                break
            time.sleep(0.02)
        # meanwhile the daemon answers others too (the merge holds the control
        # lock; a ping and a progress read do not need it)
    t.join(60)
    assert answer.get("ok") is True, answer
    merging = [p for p in reads if p["phase"] == "merging the snapshot"]
    running = [p for p in merging if p["state"] == "running"]
    print(f"{len(reads)} reads, {len(running)} while merging:", [p["done"] for p in running])
    # read while it ran, part-way, more than once; never going back; ending at the total
    assert len({p["done"] for p in running if 0 < p["done"] < p["total"]}) >= 2, reads
    dones = [p["done"] for p in merging]
    assert dones == sorted(dones)
    assert {p["total"] for p in merging} == {DIRTY}  # the COW's data, from the kernel's status
    last = reads[-1]
    assert (last["state"], last["phase"], last["done"], last["total"], last["unit"]) == (
        "done",
        "merging the snapshot",
        DIRTY,
        DIRTY,
        "bytes",
    )
    assert read(vol, 0, 4096) == block(0xA1)
    assert read(vol, 8 * MiB, 4096) == bytes(4096)  # zeros, as before the snapshot
