"""What one scrape reports (the names, labels and meanings are in
docs/metrics.md; keep the two together).

The storage core is read through :class:`StorageView` only: its public
answers (``status``, ``snapshot_list``, ``export_list``: the same JSON the
CLI shows, each taken under the core's control lock by the core itself)
and, for the journals' lag in seconds, their counters (``journal_stats``,
C calls that take no control lock). A part that fails is left out of the
scrape and counted in ``dmsnap_scrape_errors_total{part}``; a scrape
never raises.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

log = logging.getLogger("dmsnap.metrics")

Json = dict[str, Any]

# A thin pool's modes as dm-thin reports them, plus ours for a pool that
# is not up: one series each, 1 for the current one.
POOL_MODES = ("rw", "ro", "out_of_data_space", "needs_check", "failed", "inactive")
FLUSHER_STATES = ("running", "marker_wait", "volume_wait", "error", "no_space", "stopped")
SAMPLE_SECONDS = 1.0  # the lag clock's resolution
SAMPLES_KEPT = 3600  # an hour of lag history per pool at 1 s


class StorageView(Protocol):
    """The read-only part of the storage core the metrics use."""

    def status(self) -> Json: ...

    def snapshot_list(self) -> list[Json]: ...

    def export_list(self) -> list[Json]: ...

    def journal_stats(self) -> Mapping[str, Any]:
        """Pool name -> its running journal's counters (an object with
        ``head_seq`` and ``flushed_seq``); no control lock."""
        ...


@dataclass
class DaemonInfo:
    """What the daemon itself reports: its version, when it started, how
    often it has started on this state directory, errors it logged, and the
    providers of the parts that are not the storage core's."""

    version: str
    started: float = field(default_factory=time.time)
    starts: int = 1
    errors: Callable[[], int] = lambda: 0
    schedules: Callable[[], list[Json]] | None = None
    inband: Callable[[], Mapping[tuple[str, str], int]] | None = None
    # pool -> (bucket counts: bounds then +Inf, sum of seconds), and the bounds
    markers: Callable[[], Mapping[str, tuple[Sequence[int], float]]] | None = None
    marker_bounds: Sequence[float] = ()


class LagClock:
    """How long the oldest record not yet on its volume has waited, per
    pool, to SAMPLE_SECONDS: a sampler thread notes (time, head_seq) every
    SAMPLE_SECONDS; the oldest unflushed record (seq = flushed_seq) was
    appended by the first sample whose head_seq passed it. The journal keeps
    no append times (its records are on-disk format), so this is measured
    beside it, at no cost to the I/O path."""

    def __init__(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        self._stats = stats
        self._samples: dict[str, collections.deque[tuple[float, int]]] = {}
        self._mu = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="metrics-lag", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            try:
                self.sample()
            except Exception as e:  # monitoring never takes the daemon down
                log.debug("lag sample failed: %s", e)

    def sample(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        current = self._stats()
        with self._mu:
            for pool in list(self._samples):
                if pool not in current:
                    del self._samples[pool]
            for pool, st in current.items():
                q = self._samples.setdefault(pool, collections.deque(maxlen=SAMPLES_KEPT))
                if q and st.head_seq < q[-1][1]:  # reopened: a new sequence
                    q.clear()
                if not q or st.head_seq != q[-1][1]:
                    q.append((now, int(st.head_seq)))

    def seconds(
        self, pool: str, flushed_seq: int, head_seq: int, now: float | None = None
    ) -> float:
        """Seconds the record at ``flushed_seq`` has waited (0 when none waits)."""
        if flushed_seq >= head_seq:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._mu:
            q = self._samples.get(pool) or ()
            for t, head in q:
                if head > flushed_seq:
                    return max(0.0, now - t)
        return 0.0  # appended since the last sample


def _g(name: str, doc: str, labels: Sequence[str], unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels), unit=unit)


def _c(name: str, doc: str, labels: Sequence[str], unit: str = "") -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels), unit=unit)


def _cumulative(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (last: +Inf) -> Prometheus' cumulative buckets."""
    out, total = [], 0
    for i, n in enumerate(counts):
        total += n
        le = repr(float(bounds[i])) if i < len(bounds) else "+Inf"
        out.append((le, float(total)))
    return out


class Collector:
    """A ``prometheus_client`` custom collector over a :class:`StorageView`."""

    def __init__(
        self,
        core: StorageView,
        daemon: DaemonInfo,
        latency_bounds: Sequence[float],
        lag: LagClock | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.core, self.daemon, self.bounds = core, daemon, tuple(latency_bounds)
        self.lag = lag
        self.clock = clock
        self.scrape_errors: collections.Counter[str] = collections.Counter()

    def describe(self) -> Iterable[Metric]:
        return []  # families are built per scrape (auto_describe off)

    def _part(self, part: str, fn: Callable[[], list[Metric]]) -> list[Metric]:
        try:
            return fn()
        except Exception as e:
            self.scrape_errors[part] += 1
            log.warning("metrics: %s not collected: %s", part, getattr(e, "message", e))
            return []

    def collect(self) -> Iterator[Metric]:
        status: Json = {}

        def take_status() -> list[Metric]:
            status.update(self.core.status())
            return self._pools(status)

        yield from self._part("pools", take_status)
        yield from self._part("snapshots", lambda: self._snapshots(status))
        yield from self._part("exports", self._exports)
        if self.daemon.schedules is not None:
            yield from self._part("schedules", self._schedules)
        if self.daemon.inband is not None:
            yield from self._part("inband", self._inband)
        if self.daemon.markers is not None:
            yield from self._part("markers", self._markers)
        yield from self._daemon(status)

    # -- pools and journals ---------------------------------------------------------------

    def _pools(self, status: Json) -> list[Metric]:
        pl = ["pool"]
        info = _g(
            "dmsnap_pool_info",
            "A pool (1), its backend and journal mode",
            [*pl, "backend", "journal_mode"],
        )
        data_size = _g("dmsnap_pool_data_size_bytes", "Data space of the pool", pl)
        data_used = _g("dmsnap_pool_data_used_bytes", "Data space in use", pl)
        meta_size = _g("dmsnap_pool_metadata_size_bytes", "Thin metadata space", pl)
        meta_used = _g("dmsnap_pool_metadata_used_bytes", "Thin metadata space in use", pl)
        mode = _g("dmsnap_pool_mode", "1 for the pool's current mode", [*pl, "mode"])
        problems = _g("dmsnap_pool_health_problems", "Health problems `dmsnap status` shows", pl)
        vols = _g("dmsnap_pool_volumes", "Volumes in the pool", pl)
        jl = ["pool"]
        jcap = _g("dmsnap_journal_capacity_bytes", "Ring size of the pool's journal", jl)
        jused = _g("dmsnap_journal_used_bytes", "Journal ring bytes not yet reclaimable", jl)
        jfill = _g("dmsnap_journal_fill_ratio", "Journal used / capacity (0..1)", jl)
        lrec = _g("dmsnap_journal_lag_records", "Writes journaled, not yet on their volume", jl)
        lbytes = _g("dmsnap_journal_lag_bytes", "Bytes of those writes", jl)
        lsec = _g(
            "dmsnap_journal_lag_seconds",
            "How long the oldest record not yet on its volume has waited (1 s resolution)",
            jl,
        )
        markers = _g("dmsnap_journal_markers_pending", "Snapshot markers not yet passed", jl)
        state = _g(
            "dmsnap_journal_flusher_state", "1 for the flusher's current state", [*jl, "state"]
        )
        appends = _c(
            "dmsnap_journal_appends", "Write records appended since the journal opened", jl
        )
        commits = _c("dmsnap_journal_commits", "Group commits since the journal opened (NV)", jl)
        waits = _c("dmsnap_journal_full_waits", "Appends that waited for ring space", jl)
        dmw = _c("dmsnap_journal_dm_writes", "Writes by the flusher to the volumes", jl)
        rew = _c("dmsnap_journal_sync_rewinds", "Failed volume syncs written again", jl)
        for p in status.get("pools") or []:
            name = p["name"]
            j = p.get("journal") or {}
            info.add_metric([name, p.get("backend", ""), j.get("mode", "")], 1)
            if p.get("data_size") is not None:
                data_size.add_metric([name], p["data_size"])
            if p.get("used") is not None:
                data_used.add_metric([name], p["used"])
            if p.get("metadata_size") is not None and p.get("metadata_used_fraction") is not None:
                meta_size.add_metric([name], p["metadata_size"])
                meta_used.add_metric(
                    [name], round(p["metadata_size"] * p["metadata_used_fraction"])
                )
            health = p.get("health") or []
            current = p.get("mode") or ("rw" if p.get("used") is not None else "inactive")
            if any("needs check" in h for h in health):
                current = "needs_check"
            elif any("FAILED" in h for h in health):
                current = "failed"
            for m in POOL_MODES:
                mode.add_metric([name, m], 1 if m == current else 0)
            problems.add_metric([name], len(health))
            vols.add_metric([name], p.get("volumes", 0))
            if not j.get("running"):
                if j.get("mode") not in (None, "none"):
                    for s in FLUSHER_STATES:
                        state.add_metric([name, s], 1 if s == "stopped" else 0)
                continue
            jcap.add_metric([name], j["capacity"])
            jused.add_metric([name], j["used"])
            jfill.add_metric([name], j["used"] / j["capacity"] if j["capacity"] else 0.0)
            lrec.add_metric([name], j["lag_records"])
            lbytes.add_metric([name], j["lag_bytes"])
            markers.add_metric([name], j["markers_pending"])
            seqs = self._seqs(name)
            if seqs is not None and self.lag is not None:
                lsec.add_metric([name], self.lag.seconds(name, seqs[0], seqs[1]))
            now_state = (
                "error"
                if j.get("journal_error") or j.get("flush_error")
                else "no_space"
                if j.get("no_space")
                else "volume_wait"
                if j.get("flusher_waiting_volume")
                else "marker_wait"
                if j.get("markers_pending") and seqs is not None and seqs[2]
                else "running"
            )
            for s in FLUSHER_STATES:
                state.add_metric([name, s], 1 if s == now_state else 0)
            appends.add_metric([name], j["appends"])
            commits.add_metric([name], j["commits"])
            waits.add_metric([name], j["full_waits"])
            dmw.add_metric([name], j["dm_writes"])
            rew.add_metric([name], j["sync_rewinds"])
        return [
            info, data_size, data_used, meta_size, meta_used, mode, problems, vols,
            jcap, jused, jfill, lrec, lbytes, lsec, markers, state,
            appends, commits, waits, dmw, rew,
        ]  # fmt: skip

    def _seqs(self, pool: str) -> tuple[int, int, int] | None:
        """(flushed_seq, head_seq, marker_waiting) of the pool's journal."""
        st = self.core.journal_stats().get(pool)
        if st is None:
            return None
        return int(st.flushed_seq), int(st.head_seq), int(getattr(st, "marker_waiting", 0))

    # -- snapshots --------------------------------------------------------------------------

    def _snapshots(self, status: Json) -> list[Metric]:
        snaps = self.core.snapshot_list()
        now = self.clock()
        count = _g("dmsnap_snapshots", "Snapshots, by pool and state", ["pool", "state"])
        oldest = _g(
            "dmsnap_snapshot_oldest_age_seconds", "Age of the pool's oldest snapshot", ["pool"]
        )
        by: collections.Counter[tuple[str, str]] = collections.Counter()
        first: dict[str, float] = {}
        for s in snaps:
            by[(s["pool"], s.get("state") or "valid")] += 1
            if s.get("created") is not None:
                first[s["pool"]] = min(first.get(s["pool"], s["created"]), s["created"])
        for p in status.get("pools") or []:  # a pool without snapshots says 0
            by.setdefault((p["name"], "valid"), 0)
        for (pool, state), n in sorted(by.items()):
            count.add_metric([pool, state], n)
        for pool, t in sorted(first.items()):
            oldest.add_metric([pool], max(0.0, now - t))
        return [count, oldest]

    # -- exports ----------------------------------------------------------------------------

    def _exports(self) -> list[Metric]:
        el = ["pool", "volume", "snapshot", "kind"]
        up = _g("dmsnap_export_up", "1 while the export serves I/O", el)
        reads = _c("dmsnap_export_reads", "READ commands on the fast path", el)
        writes = _c("dmsnap_export_writes", "WRITE commands on the fast path", el)
        rbytes = _c("dmsnap_export_read_bytes", "Bytes read (commands completed GOOD)", el)
        wbytes = _c("dmsnap_export_written_bytes", "Bytes written (commands completed GOOD)", el)
        slow = _c("dmsnap_export_other_commands", "Commands the controller emulated", el)
        errs = _c("dmsnap_export_errors", "Fast-path commands completed with an error", el)
        busy = _c("dmsnap_export_busy", "Fast-path commands answered BUSY", el)
        inflight = _g("dmsnap_export_inflight_commands", "Commands taken, not completed", el)
        rlat = HistogramMetricFamily(
            "dmsnap_export_read_latency_seconds", "Fast-path READ latency in the target", labels=el
        )
        wlat = HistogramMetricFamily(
            "dmsnap_export_write_latency_seconds",
            "Fast-path WRITE latency in the target (journal durable, NV)",
            labels=el,
        )
        for ex in self.core.export_list():
            labels = [ex["pool"], ex["volume"], ex.get("snapshot") or "", ex.get("kind", "")]
            up.add_metric(labels, 1 if ex.get("running") else 0)
            st = ex.get("stats")
            if not st:
                continue
            reads.add_metric(labels, st.get("fast_reads", 0))
            writes.add_metric(labels, st.get("fast_writes", 0))
            rbytes.add_metric(labels, st.get("read_bytes", 0))
            wbytes.add_metric(labels, st.get("write_bytes", 0))
            slow.add_metric(labels, st.get("slow", 0))
            errs.add_metric(labels, st.get("errors", 0))
            busy.add_metric(labels, st.get("busy", 0))
            inflight.add_metric(labels, st.get("inflight", 0))
            for fam, key, ns in (
                (rlat, "read_latency", "read_ns"),
                (wlat, "write_latency", "write_ns"),
            ):
                counts = st.get(key)
                if counts:
                    fam.add_metric(labels, _cumulative(self.bounds, counts), st.get(ns, 0) / 1e9)
        return [up, reads, writes, rbytes, wbytes, slow, errs, busy, inflight, rlat, wlat]

    # -- schedules, in-band requests, the daemon ---------------------------------------------

    def _schedules(self) -> list[Metric]:
        assert self.daemon.schedules is not None
        sl = ["schedule", "pool"]
        runs = _c("dmsnap_schedule_runs", "Snapshots the schedule made", sl)
        fails = _c("dmsnap_schedule_failures", "Runs that failed", sl)
        last = _g(
            "dmsnap_schedule_last_success_timestamp_seconds", "When the last run succeeded", sl
        )
        nxt = _g("dmsnap_schedule_next_run_timestamp_seconds", "When the next run is due", sl)
        paused = _g("dmsnap_schedule_paused", "1 while the schedule is paused", sl)
        erring = _g("dmsnap_schedule_error", "1 while the schedule's last attempt failed", sl)
        owned = _g("dmsnap_schedule_snapshots", "Snapshot groups the schedule keeps", sl)
        for s in self.daemon.schedules():
            labels = [s["name"], s["pool"]]
            runs.add_metric(labels, s.get("runs", 0))
            fails.add_metric(labels, s.get("failures", 0))
            if s.get("last_run") is not None:
                last.add_metric(labels, s["last_run"])
            if s.get("next_run") is not None:
                nxt.add_metric(labels, s["next_run"])
            paused.add_metric(labels, 1 if s.get("paused") else 0)
            erring.add_metric(labels, 1 if s.get("last_error") else 0)
            if s.get("snapshot_count") is not None:
                owned.add_metric(labels, s["snapshot_count"])
        return [runs, fails, last, nxt, paused, erring, owned]

    def _inband(self) -> list[Metric]:
        assert self.daemon.inband is not None
        reqs = _c(
            "dmsnap_inband_requests",
            "In-band snapshot requests (SCSI 0xC0 CREATE) since start, by result",
            ["pool", "result"],
        )
        for (pool, result), n in sorted(self.daemon.inband().items()):
            reqs.add_metric([pool, result], n)
        return [reqs]

    def _markers(self) -> list[Metric]:
        assert self.daemon.markers is not None
        fam = HistogramMetricFamily(
            "dmsnap_snapshot_marker_latency_seconds",
            "Journaled snapshot requests: marker recorded to snapshot made",
            labels=["pool"],
        )
        for pool, (counts, total) in sorted(self.daemon.markers().items()):
            fam.add_metric([pool], _cumulative(self.daemon.marker_bounds, counts), total)
        return [fam]

    def _daemon(self, status: Json) -> list[Metric]:
        info = _g("dmsnap_daemon_info", "dmsnapd's version (1)", ["version"])
        info.add_metric([self.daemon.version], 1)
        started = _g("dmsnap_daemon_start_time_seconds", "When dmsnapd started (Unix time)", [])
        started.add_metric([], self.daemon.started)
        starts = _c("dmsnap_daemon_starts", "Times dmsnapd started on this state directory", [])
        starts.add_metric([], self.daemon.starts)
        errors = _c("dmsnap_daemon_errors", "Errors dmsnapd logged since start", [])
        errors.add_metric([], self.daemon.errors())
        health = _g(
            "dmsnap_health_problems", "Health problems in all (0: healthy; `dmsnap status`)", []
        )
        if "health" in status:
            health.add_metric([], len(status["health"]))
        scrape = _c("dmsnap_scrape_errors", "Parts of a scrape that failed, by part", ["part"])
        for part in ("pools", "snapshots", "exports", "schedules", "inband", "markers"):
            scrape.add_metric([part], self.scrape_errors[part])
        return [info, started, starts, errors, health, scrape]
