"""dmsnapd's metrics (docs/metrics.md) on the host: the collector over a
storage core's answers, served by the real endpoint and read back as
Prometheus reads it (its text parser, and ``promtool check metrics`` from
Debian's prometheus package as an independent witness); the lag clock; the
daemon's ``--metrics`` option, its safe default and a taken port."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dmsnap.daemon.main import parse_args, run_daemon
from dmsnap.daemon.notify import Notifier
from dmsnap.daemon.server import PeerPolicy
from dmsnap.errors import UserError
from dmsnap.metrics.collector import Collector, DaemonInfo, LagClock
from dmsnap.metrics.server import MetricsServer, parse_address
from dmsnap.scsi.tcmu import LATENCY_BOUNDS

ME = frozenset({os.getuid()})


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="dmsnap-t"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _pool(name: str = "tank", **over: Any) -> dict[str, Any]:
    p = {
        "name": name,
        "backend": "thin",
        "size": 1 << 30,
        "data_size": 1 << 30,
        "used": 64 << 20,
        "free": (1 << 30) - (64 << 20),
        "metadata_size": 4 << 20,
        "metadata_used_fraction": 0.25,
        "mode": "rw",
        "volumes": 2,
        "snapshots": 3,
        "health": [],
        "journal": {
            "mode": "nv",
            "running": True,
            "capacity": 8 << 20,
            "used": 2 << 20,
            "lag_records": 5,
            "lag_bytes": 20480,
            "markers_pending": 0,
            "appends": 100,
            "commits": 40,
            "full_waits": 0,
            "dm_writes": 95,
            "sync_rewinds": 0,
            "journal_error": None,
            "flush_error": None,
            "no_space": None,
            "flusher_waiting_volume": None,
        },
    }
    p.update(over)
    return p


class FakeCore:
    """A storage core's answers as the Manager gives them (views.py's JSON)."""

    def __init__(self) -> None:
        self.pools = [_pool()]
        self.snaps = [
            {"pool": "tank", "volume": "db", "name": "a", "state": "valid", "created": 1000.0},
            {"pool": "tank", "volume": "db", "name": "b", "state": "valid", "created": 4000.0},
            {"pool": "tank", "volume": "db", "name": "c", "state": "invalid", "created": 5000.0},
        ]
        write_lat = [0] * (len(LATENCY_BOUNDS) + 1)
        write_lat[3], write_lat[-1] = 7, 1  # 7 at <= 128 us, 1 beyond the last bound
        self.exports = [
            {
                "pool": "tank",
                "volume": "db",
                "snapshot": None,
                "kind": "local",
                "running": True,
                "stats": {
                    "fast_reads": 2,
                    "fast_writes": 8,
                    "read_bytes": 8192,
                    "write_bytes": 1 << 20,
                    "read_ns": 0,
                    "write_ns": 6_000_000_000,
                    "slow": 11,
                    "errors": 0,
                    "busy": 1,
                    "inflight": 0,
                    "read_latency": [0] * 3 + [2] + [0] * (len(LATENCY_BOUNDS) - 3),
                    "write_latency": write_lat,
                },
            },
            {"pool": "tank", "volume": "logs", "snapshot": None, "kind": "iscsi", "running": False},
        ]
        self.stats = {"tank": SimpleNamespace(head_seq=110, flushed_seq=105, marker_waiting=0)}

    def status(self) -> dict[str, Any]:
        return {"pools": self.pools, "health": [h for p in self.pools for h in p["health"]]}

    def snapshot_list(self) -> list[dict[str, Any]]:
        return self.snaps

    def export_list(self) -> list[dict[str, Any]]:
        return self.exports

    def journal_stats(self) -> dict[str, Any]:
        return self.stats


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _get(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def served():
    core = FakeCore()
    schedules = [
        {"name": "hourly", "pool": "tank", "runs": 4, "failures": 1, "last_run": 1234.5,
         "next_run": 5000.0, "paused": False, "last_error": "x", "snapshot_count": 3},
    ]  # fmt: skip
    info = DaemonInfo(
        version="9.9",
        started=100.0,
        starts=3,
        errors=lambda: 2,
        schedules=lambda: schedules,
        inband=lambda: {("tank", "accepted"): 5, ("tank", "denied"): 1},
        markers=lambda: {"tank": ([0, 2, 1], 0.4)},
        marker_bounds=(0.1, 1.0),
    )
    lag = LagClock(core.journal_stats)
    col = Collector(core, info, LATENCY_BOUNDS, lag=lag, clock=lambda: 6000.0)
    srv = MetricsServer(col, "127.0.0.1:0")
    srv.start()
    yield core, lag, f"http://127.0.0.1:{srv.port}/metrics"
    srv.stop()


def test_a_scrape_reports_pools_journals_exports_snapshots_schedules(served) -> None:
    _core, lag, url = served
    lag.sample(now=time.monotonic() - 7)  # head 110 seen 7 s ago: seq 105 has waited >= 7 s
    s = _samples(_scrape(url))
    assert _get(s, "dmsnap_pool_data_size_bytes", pool="tank") == 1 << 30
    assert _get(s, "dmsnap_pool_data_used_bytes", pool="tank") == 64 << 20
    assert _get(s, "dmsnap_pool_metadata_used_bytes", pool="tank") == 1 << 20
    assert _get(s, "dmsnap_pool_mode", pool="tank", mode="rw") == 1
    assert _get(s, "dmsnap_pool_mode", pool="tank", mode="needs_check") == 0
    assert _get(s, "dmsnap_journal_fill_ratio", pool="tank") == 0.25
    assert _get(s, "dmsnap_journal_lag_bytes", pool="tank") == 20480
    assert _get(s, "dmsnap_journal_lag_records", pool="tank") == 5
    assert 7 <= _get(s, "dmsnap_journal_lag_seconds", pool="tank") < 9
    assert _get(s, "dmsnap_journal_flusher_state", pool="tank", state="running") == 1
    assert _get(s, "dmsnap_journal_appends_total", pool="tank") == 100
    ex = {"pool": "tank", "volume": "db", "snapshot": "", "kind": "local"}
    assert _get(s, "dmsnap_export_writes_total", **ex) == 8
    assert _get(s, "dmsnap_export_written_bytes_total", **ex) == 1 << 20
    assert _get(s, "dmsnap_export_write_latency_seconds_count", **ex) == 8
    assert _get(s, "dmsnap_export_write_latency_seconds_sum", **ex) == 6.0
    # cumulative buckets: 7 at 128 us and above, all 8 only at +Inf
    assert _get(s, "dmsnap_export_write_latency_seconds_bucket", le="0.000128", **ex) == 7
    assert _get(s, "dmsnap_export_write_latency_seconds_bucket", le="4.194304", **ex) == 7
    assert _get(s, "dmsnap_export_write_latency_seconds_bucket", le="+Inf", **ex) == 8
    assert _get(s, "dmsnap_export_up", pool="tank", volume="logs", snapshot="", kind="iscsi") == 0
    assert _get(s, "dmsnap_snapshots", pool="tank", state="valid") == 2
    assert _get(s, "dmsnap_snapshots", pool="tank", state="invalid") == 1
    assert _get(s, "dmsnap_snapshot_oldest_age_seconds", pool="tank") == 5000.0
    sl = {"schedule": "hourly", "pool": "tank"}
    assert _get(s, "dmsnap_schedule_runs_total", **sl) == 4
    assert _get(s, "dmsnap_schedule_failures_total", **sl) == 1
    assert _get(s, "dmsnap_schedule_last_success_timestamp_seconds", **sl) == 1234.5
    assert _get(s, "dmsnap_inband_requests_total", pool="tank", result="accepted") == 5
    assert _get(s, "dmsnap_snapshot_marker_latency_seconds_bucket", pool="tank", le="1.0") == 2
    assert _get(s, "dmsnap_snapshot_marker_latency_seconds_count", pool="tank") == 3
    assert _get(s, "dmsnap_snapshot_marker_latency_seconds_sum", pool="tank") == 0.4
    assert _get(s, "dmsnap_daemon_starts_total") == 3
    assert _get(s, "dmsnap_daemon_errors_total") == 2
    assert _get(s, "dmsnap_health_problems") == 0
    assert _get(s, "dmsnap_daemon_info", version="9.9") == 1


def test_a_degraded_pool_shows_its_mode_and_problems(served) -> None:
    core, _lag, url = served
    core.pools = [
        _pool(
            mode="ro",
            health=["thin pool metadata needs check (read-only): thin_check/thin_repair"],
            journal={**_pool()["journal"], "flush_error": "EIO: Input/output error"},
        )
    ]
    s = _samples(_scrape(url))
    assert _get(s, "dmsnap_pool_mode", pool="tank", mode="needs_check") == 1
    assert _get(s, "dmsnap_pool_mode", pool="tank", mode="rw") == 0
    assert _get(s, "dmsnap_pool_health_problems", pool="tank") == 1
    assert _get(s, "dmsnap_health_problems") == 1
    assert _get(s, "dmsnap_journal_flusher_state", pool="tank", state="error") == 1


def test_a_failing_part_is_counted_and_the_rest_still_served(served) -> None:
    core, _lag, url = served

    def broken() -> list:
        raise OSError("gone")

    core.export_list = broken
    s = _samples(_scrape(url))
    assert _get(s, "dmsnap_scrape_errors_total", part="exports") == 1
    assert _get(s, "dmsnap_pool_data_used_bytes", pool="tank") == 64 << 20


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool (Debian: prometheus) missing")
def test_promtool_accepts_a_real_scrape(served) -> None:
    _core, _lag, url = served
    r = subprocess.run(
        ["promtool", "check", "metrics"], input=_scrape(url), capture_output=True, text=True
    )
    # promtool exits non-zero on errors and lint problems (names, units, _total, help)
    assert r.returncode == 0, r.stdout + r.stderr


def test_lag_clock() -> None:
    stats = {"p": SimpleNamespace(head_seq=10, flushed_seq=10)}
    lag = LagClock(lambda: stats)
    lag.sample(now=100.0)  # 10 records appended, all flushed
    stats["p"].head_seq = 15
    lag.sample(now=101.0)  # 5 more: the oldest unflushed (seq 10) appended by t=101
    lag.sample(now=102.0)  # nothing new: no new sample
    assert lag.seconds("p", 10, 15, now=105.0) == 4.0
    assert lag.seconds("p", 15, 15, now=105.0) == 0.0  # caught up
    stats["p"].head_seq = 3  # reopened: a new sequence, old samples dropped
    lag.sample(now=106.0)
    assert lag.seconds("p", 1, 3, now=107.0) == 1.0
    del stats["p"]
    lag.sample(now=108.0)
    assert lag.seconds("p", 1, 3, now=109.0) == 0.0


def test_metrics_address_parsing() -> None:
    assert parse_address("127.0.0.1:9723") == ("127.0.0.1", 9723)
    assert parse_address("[::1]:9723") == ("::1", 9723)
    assert parse_address(":9723") == ("0.0.0.0", 9723)
    for bad in ("9723", "host:", "1.2.3.4:99999", "::1:9723", "[nope]:1"):
        with pytest.raises(UserError) as e:
            parse_address(bad)
        assert "\n" not in e.value.message


def test_the_default_listens_on_loopback_only() -> None:
    args = parse_args([])
    assert args.metrics == "127.0.0.1:9723" and not args.no_metrics
    assert parse_args(["--no-metrics"]).no_metrics


class _Fake:
    def __init__(self, state_dir: str) -> None:
        pass

    def assemble(self) -> dict[str, Any]:
        return {}

    def pool_list(self) -> list[Any]:
        return []

    def close(self) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_once(state: Path, sock: Path, port: int) -> dict:
    """Run the daemon (a fake core) with metrics on PORT, scrape once, stop."""
    rc: list[int] = []
    served = threading.Event()
    servers: list[Any] = []

    def on_serving(srv: Any) -> None:
        servers.append(srv)
        served.set()

    t = threading.Thread(
        target=lambda: rc.append(
            run_daemon(
                str(state),
                str(sock),
                manager_factory=_Fake,
                notifier=Notifier(env={}),
                policy=PeerPolicy(ME),
                install_signals=False,
                on_serving=on_serving,
                metrics=f"127.0.0.1:{port}",
            )
        ),
        daemon=True,
    )
    t.start()
    assert served.wait(20)
    s = _samples(_scrape(f"http://127.0.0.1:{port}/metrics"))
    servers[0].request_stop()
    t.join(20)
    assert rc == [0]
    return s


def test_daemon_serves_metrics_and_counts_its_starts(tmp_path: Path, short_dir: Path) -> None:
    port = _free_port()
    for start in (1, 2):
        s = _serve_once(tmp_path / "state", short_dir / "s.sock", port)
        assert _get(s, "dmsnap_daemon_starts_total") == start
        assert ("process_cpu_seconds_total", ()) in s


def test_a_taken_metrics_port_does_not_keep_the_storage_down(
    tmp_path: Path, short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Storage first: a port someone else took costs the metrics, not the
    # pools (initiators' commands would time out while dmsnapd stays down).
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        made: list[str] = []
        run_daemon(
            str(tmp_path / "state"),
            str(short_dir / "s.sock"),
            manager_factory=lambda state: made.append(state),
            notifier=Notifier(env={}),
            policy=PeerPolicy(ME),
            install_signals=False,
            metrics=f"127.0.0.1:{port}",
        )
    assert made  # the storage core was started
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    taken_lines = [m for m in lines if f"127.0.0.1:{port}" in m]
    assert len(taken_lines) == 1 and "serving storage without metrics" in taken_lines[0]


def test_a_malformed_metrics_address_stops_the_daemon_in_one_line(
    tmp_path: Path, short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    made: list[str] = []
    rc = run_daemon(
        str(tmp_path / "state"),
        str(short_dir / "s.sock"),
        manager_factory=lambda state: made.append(state),
        notifier=Notifier(env={}),
        policy=PeerPolicy(ME),
        install_signals=False,
        metrics="localhost",
    )
    assert rc == 1 and made == []
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(lines) == 1 and "expected ADDR:PORT" in lines[0]


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool (Debian: prometheus) missing")
def test_the_alert_rules_load_and_name_only_our_series() -> None:
    rules = Path(__file__).resolve().parents[2] / "contrib" / "prometheus" / "dmsnap-alerts.yml"
    r = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # every dmsnap_ series a rule uses is one the collector serves (docs/metrics.md)
    doc = (rules.parents[2] / "docs" / "metrics.md").read_text()
    used = set(re.findall(r"dmsnap_[a-z_]+", rules.read_text()))
    assert used and all(f"`{n}" in doc or f"{n}`" in doc or f"{n}{{" in doc for n in used), used
