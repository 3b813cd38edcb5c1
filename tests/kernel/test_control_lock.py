"""One control lock, and no waiting for I/O under it (issue 17, item 7).

A `snapshot create --wait` on a pool whose flusher is stalled (its disk
fails every write) waits for a snapshot that cannot be made yet. Meanwhile
every other control operation must go on: `status`, another pool's
snapshot, and a clean `daemon stop`, which answers the waiting client
clearly instead of hanging.
"""

from __future__ import annotations

import threading
import time
from base64 import b64encode

from faultdev import FaultDevice
from test_cli_e2e import Daemon
from test_journal_errors import wait_for

from dmsnap import client
from dmsnap import errors as E

MiB = 1 << 20


def test_waiting_snapshot_blocks_no_other_control_operation(tmp_path, dm, loopdev):
    fl = FaultDevice(dm, "dmsnap-test-stall", loopdev(192 * MiB))
    d = Daemon(tmp_path)
    d.start()
    waiter: threading.Thread | None = None
    try:
        d.cli("pool", "create", "stalled", "--data", fl.path, "--backend", "classic",
              "--journal-size", "16M")  # fmt: skip
        d.cli("volume", "create", "stalled/v", "--size", "8M")
        d.cli("pool", "create", "other", "--size", "128M")
        d.cli("volume", "create", "other/w", "--size", "8M")
        fl.fail_writes(True)
        c = client.Client(d.sock)
        c.call(
            "volume.write",
            pool="stalled",
            vol="v",
            offset=0,
            content=b64encode(b"x" * 4096).decode(),
        )
        wait_for(
            lambda: d.json("pool", "show", "stalled")["journal"]["lag_records"] > 0, "not stalled"
        )

        answer: dict[str, object] = {}

        def wait_snapshot() -> None:
            with client.Client(d.sock) as wc:
                try:
                    answer["ok"] = wc.call(
                        "snapshot.create", refs=[["stalled", "v"]], name="s", wait=True,
                        timeout=3600,
                    )  # fmt: skip
                except E.UserError as e:
                    answer["error"] = e

        waiter = threading.Thread(target=wait_snapshot, daemon=True)
        waiter.start()
        time.sleep(2)  # the request is in and waiting
        assert waiter.is_alive() and not answer

        # bounded clients: before the fix each of these hung behind the wait
        t0 = time.monotonic()
        client.Client(d.sock, timeout=20).call("status")
        assert time.monotonic() - t0 < 10, "status waited behind the waiting snapshot"
        r = client.Client(d.sock, timeout=60).call(
            "snapshot.create", refs=[["other", "w"]], name="s2", wait=True
        )
        assert r["state"] == "done", r

        t0 = time.monotonic()
        client.Client(d.sock, timeout=20).call("daemon.stop")
        assert d.proc is not None
        d.proc.wait(timeout=60)
        assert time.monotonic() - t0 < 45, "daemon stop waited behind the waiting snapshot"
        waiter.join(timeout=30)
        assert not waiter.is_alive(), "the waiting client got no answer"
        err = answer.get("error")
        assert isinstance(err, E.UserError), answer
        assert "stopping" in err.message and "marker" in err.message, err.message
    finally:
        fl.fail_writes(False)
        if d.proc is None or d.proc.poll() is not None:
            d.start()
        for p in d.json("pool", "list"):
            d.cli("pool", "destroy", p["name"], "--force", "--yes")
        d.stop(teardown=True)
        fl.remove()
