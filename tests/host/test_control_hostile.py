"""Hostile clients on the control socket (issue 18, section 3): malformed,
oversized, slow, silent and too many clients, against a real Server with the
fake manager of test_daemon_protocol. Whatever they do, the daemon stays up
and answers a well-behaved client within seconds.
`tools/torture fuzz --target control` runs the garbage property with many
more examples (DMSNAP_FUZZ_EXAMPLES_EACH)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_daemon_protocol import Daemon, short_dir, start_daemon, stop_daemon  # noqa: F401

from dmsnap.daemon import protocol as proto

CAP = 8
EACH = int(os.environ.get("DMSNAP_FUZZ_EXAMPLES_EACH") or 300)


@pytest.fixture
def small(short_dir: Path) -> Iterator[Daemon]:  # noqa: F811
    """A daemon with a small connection cap and short timeouts."""
    d = start_daemon(
        short_dir / "h.sock",
        max_connections=CAP,
        request_timeout=1.0,
        send_timeout=1.0,
        evict_idle_after=0.5,
    )
    yield d
    stop_daemon(d)


def ping(d: Daemon, timeout: float = 10) -> None:
    """A well-behaved client gets its answer."""
    with d.client(timeout=timeout) as c:
        assert c.call("daemon.ping")["protocol"] == proto.VERSION


def test_silent_clients_beyond_the_cap_do_not_lock_out_others(small: Daemon) -> None:
    silent = [small.raw() for _ in range(3 * CAP)]
    try:
        time.sleep(1.0)  # they have been idle longer than evict_idle_after
        t0 = time.monotonic()
        ping(small)
        assert time.monotonic() - t0 < 5
    finally:
        for s in silent:
            s.close()


def test_trickling_client_is_cut_and_others_served(small: Daemon) -> None:
    s = small.raw()
    f = s.makefile("rb")
    t0 = time.monotonic()
    answer = b""
    with contextlib.suppress(OSError):
        for b in b'{"v": 1, "id": 1, "op": "daemon.ping", "args": {}}':
            s.sendall(bytes([b]))  # one byte every 0.2 s: never a whole line in time
            ping(small)
            time.sleep(0.2)
            if time.monotonic() - t0 > 6:
                break
        answer = f.readline()
    s.close()
    assert time.monotonic() - t0 < 6, "a trickling request was never cut"
    if answer:  # the daemon says why before hanging up
        r = json.loads(answer)
        assert r["ok"] is False and r["error"]["code"] == proto.E_BAD_REQUEST
    ping(small)


def test_clients_that_never_read_do_not_hold_the_daemon(small: Daemon) -> None:
    socks = []
    req = proto.request(1, "daemon.ping", {}) * 2000
    for _ in range(2 * CAP):
        s = small.raw()
        s.setblocking(False)
        with contextlib.suppress(OSError):
            s.send(req)  # answers pile up unread
        socks.append(s)
    try:
        time.sleep(2.5)  # longer than send_timeout
        ping(small)
    finally:
        for s in socks:
            s.close()


def _garbage_client(d: Daemon, lines: list[bytes]) -> None:
    with contextlib.suppress(OSError), d.raw() as s:
        s.settimeout(5)
        f = s.makefile("rb")
        for line in lines:
            s.sendall(line + b"\n")
            if not line.strip():
                continue  # blank lines are skipped, not answered
            r = f.readline()
            if not r:
                return  # hung up (oversized): allowed
            doc = json.loads(r)
            assert doc["v"] == proto.VERSION and isinstance(doc["ok"], bool)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids),
    max_leaves=10,
)
# every op but daemon.stop, which an allowed client may send (and the daemon obeys)
OPS = sorted(set(proto.OPS) - {"daemon.stop"})
requests = (
    st.fixed_dictionaries(
        {},
        optional={
            "v": st.sampled_from([1, 2, "1", None]),
            "id": json_values,
            "op": st.sampled_from(OPS) | st.text(max_size=12) | json_values,
            "args": json_values,
        },
    )
    .filter(lambda d: d.get("op") != "daemon.stop")
    .map(lambda d: json.dumps(d).encode())
)
lines = st.binary(max_size=200).map(lambda b: b.replace(b"\n", b" ")) | requests


@settings(
    max_examples=EACH,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(st.lists(lines, min_size=1, max_size=6), min_size=1, max_size=CAP * 2))
def test_garbage_from_many_clients_at_once(small: Daemon, clients: list[list[bytes]]) -> None:
    errors: list[BaseException] = []

    def run(ls: list[bytes]) -> None:
        try:
            _garbage_client(small, ls)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(ls,)) for ls in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[0]
    assert small.thread.is_alive()
    ping(small)


def test_oversized_and_binary_lines_then_others_served(small: Daemon) -> None:
    with contextlib.suppress(OSError), small.raw() as s:
        s.sendall(b"\x00" * (proto.MAX_REQUEST + 10) + b"\n")
    with contextlib.suppress(OSError), small.raw() as s:
        s.sendall(os.urandom(4096))
    ping(small)
