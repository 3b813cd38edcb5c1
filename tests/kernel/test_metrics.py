"""dmsnapd's metrics endpoint as an administrator sees it (docs/metrics.md):
a real dmsnapd on its default address, a journaled volume exported as a
local SCSI disk, writes through that disk, and the scraped figures move by
what was done: bytes written by exactly what was written, the journal
holding the writes (fill, lag in bytes and seconds) while the volume's
device is suspended, the pool's used space once they land, the snapshot
and in-band request counts. Witnesses: ``promtool check metrics`` on the
real scrape, and a real Prometheus server scraping dmsnapd, queried."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from scsi_util import MiB, pwrite_direct, run

from dmsnap.scsi import lio
from dmsnap.storage import names

pytestmark = pytest.mark.kernel

URL = "http://127.0.0.1:9723/metrics"  # dmsnapd's default (loopback only)
WRITTEN = 4 * MiB


def scrape() -> tuple[str, dict[tuple[str, frozenset], float]]:
    with urllib.request.urlopen(URL, timeout=30) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return text, out


def value(m: dict, name: str, **labels: str) -> float:
    return m.get((name, frozenset(labels.items())), 0.0)


def until(what: str, cond, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        _, m = scrape()
        if cond(m):
            return m
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.5)


@pytest.fixture
def exported(tmp_path):
    if (why := lio.available()) is not None:
        pytest.fail(why)
    from test_cli_e2e import Daemon

    d = Daemon(tmp_path)
    d.start()  # no --metrics: the default endpoint
    try:
        d.cli("pool", "create", "p", "--size", "256M")
        d.cli("volume", "create", "p/v", "--size", "64M")
        d.cli("export", "p/v", "--local")
        disk = os.path.realpath("/dev/dmsnap/p/v")
        assert disk.startswith("/dev/sd"), disk
        yield d, disk
    finally:
        run("dmsetup", "resume", names.dm_volume("p", "v"), check=False)
        d.cli("pool", "destroy", "p", "--force", "--yes", check=False)
        d.stop(teardown=True)


def test_scraped_figures_follow_writes_snapshots_and_the_journal(exported, tmp_path):
    d, disk = exported
    ex = {"pool": "p", "volume": "v", "snapshot": "", "kind": "local"}
    text, m0 = scrape()
    assert value(m0, "dmsnap_export_up", **ex) == 1
    assert value(m0, "dmsnap_pool_mode", pool="p", mode="rw") == 1
    used0 = value(m0, "dmsnap_pool_data_used_bytes", pool="p")
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing (tools/setup installs Debian's prometheus)"
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

    # The volume's private device suspended: acknowledged writes wait in the journal.
    dev = names.dm_volume("p", "v")
    run("dmsetup", "suspend", dev)
    pwrite_direct(disk, 0, os.urandom(WRITTEN))
    time.sleep(3)
    _, m1 = scrape()
    wrote = value(m1, "dmsnap_export_written_bytes_total", **ex) - value(
        m0, "dmsnap_export_written_bytes_total", **ex
    )
    assert wrote == WRITTEN
    writes = value(m1, "dmsnap_export_writes_total", **ex) - value(
        m0, "dmsnap_export_writes_total", **ex
    )
    assert writes >= 1
    hist = "dmsnap_export_write_latency_seconds_count"
    assert value(m1, hist, **ex) - value(m0, hist, **ex) == writes
    assert value(m1, "dmsnap_journal_lag_bytes", pool="p") >= WRITTEN
    assert value(m1, "dmsnap_journal_used_bytes", pool="p") >= WRITTEN
    assert value(m1, "dmsnap_journal_fill_ratio", pool="p") > 0
    assert value(m1, "dmsnap_journal_lag_seconds", pool="p") >= 2  # waited since the write

    run("dmsetup", "resume", dev)
    m2 = until(
        "the journal drained onto the volume",
        lambda m: value(m, "dmsnap_journal_lag_records", pool="p") == 0,
    )
    assert value(m2, "dmsnap_journal_lag_seconds", pool="p") == 0
    assert value(m2, "dmsnap_pool_data_used_bytes", pool="p") - used0 >= WRITTEN

    d.cli("snapshot", "create", "p/v", "s1", "--wait")
    assert d.cli("initiator", "snapshot", disk, "ib1", "--wait").returncode == 0
    _, m3 = scrape()
    assert value(m3, "dmsnap_snapshots", pool="p", state="valid") == 2
    assert value(m3, "dmsnap_inband_requests_total", pool="p", result="accepted") == 1
    # both were journaled requests: two markers, each made into its snapshot
    assert value(m3, "dmsnap_snapshot_marker_latency_seconds_count", pool="p") == 2

    # A real Prometheus server scrapes dmsnapd; its query answers the bytes written.
    prom = shutil.which("prometheus")
    assert prom, "prometheus missing (tools/setup installs it)"
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: dmsnap\n"
        "    static_configs: [{targets: ['127.0.0.1:9723']}]\n"
    )
    p = subprocess.Popen(
        [
            prom,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            "--web.listen-address=127.0.0.1:9790",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "w"),  # noqa: SIM115 - owned by the process
    )
    try:
        q = urllib.parse.quote('dmsnap_export_written_bytes_total{pool="p",volume="v"}')
        deadline, got = time.monotonic() + 90, None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:9790/api/v1/query?query={q}", timeout=10
                ) as r:
                    res = json.load(r)["data"]["result"]
                if res:
                    got = float(res[0]["value"][1])
                    break
            except OSError:
                pass  # not listening yet
            time.sleep(1)
        log = Path(tmp_path / "prometheus.log").read_text()[-2000:]
        assert got is not None, f"Prometheus never had the series:\n{log}"
        assert got == value(m3, "dmsnap_export_written_bytes_total", **ex) >= WRITTEN
    finally:
        p.terminate()
        p.wait(timeout=30)
