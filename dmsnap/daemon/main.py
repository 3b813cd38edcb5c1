"""``dmsnapd``: lock the state directory, bind the control socket, assemble
every pool from the catalog, serve until SIGTERM or ``daemon.stop``.

Startup order matters: the state-directory lock comes first, so a second
daemon exits before it changes anything (not even the socket); the socket is
bound before the Manager exists, so a socket conflict is found before any
device is touched; READY=1 is sent only once assembly is done.

A clean stop leaves every device in place (a restart reassembles them
idempotently); only ``dmsnap daemon stop --teardown`` deactivates them.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from dmsnap import __version__
from dmsnap.daemon.devwatch import DeviceWatcher, EventHook
from dmsnap.daemon.events import HealthWatcher
from dmsnap.daemon.lock import acquire_state_lock
from dmsnap.daemon.notify import Notifier
from dmsnap.daemon.server import DEFAULT_SOCKET, PeerPolicy, Server, serving_status
from dmsnap.errors import UserError
from dmsnap.scsi import DEFAULT_WORKER_NICE

log = logging.getLogger("dmsnapd")

DEFAULT_STATE_DIR = "/var/lib/dmsnap"
DEFAULT_METRICS = "127.0.0.1:9723"  # loopback only: exposing it is the operator's choice
LOG_LEVELS = ("debug", "info", "warning", "error")

# syslog priorities for journald's "<N>" line prefix.
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def _under_journald() -> bool:
    """True when stderr is the journal stream systemd set up for us (not
    merely an inherited $JOURNAL_STREAM after a redirect)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


class _JournalFormatter(logging.Formatter):
    """``<prio>message``: journald stores the level and its own timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        # Continuation lines (tracebacks) carry the priority too.
        return "\n".join(f"<{prio}>{ln}" for ln in text.splitlines())


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if _under_journald():
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s dmsnapd[{os.getpid()}] %(levelname)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _real_manager(state_dir: str, worker_nice: int = DEFAULT_WORKER_NICE) -> Any:
    # Imported here: the lock and socket checks must not depend on the
    # storage stack (or its kernel bindings) even loading.
    from dmsnap.storage.manager import Manager

    return Manager(state_dir, worker_nice=worker_nice)


class _ErrorCount(logging.Handler):
    """Counts the errors dmsnapd logs (dmsnap_daemon_errors_total)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def _count_start(state_dir: str) -> int:
    """How often dmsnapd has started on this state directory, this start
    included (dmsnap_daemon_starts_total: restarts show as its increase).
    Kept in a small file beside the catalog, under the state lock."""
    path = os.path.join(state_dir, "daemon.starts")
    try:
        with open(path) as f:
            n = int(f.read().strip() or 0)
    except (OSError, ValueError):
        n = 0
    n += 1
    try:
        with open(path + ".new", "w") as f:
            f.write(f"{n}\n")
        os.replace(path + ".new", path)
    except OSError as e:
        log.warning("cannot record the start count in %s: %s", path, e.strerror)
    return n


class _Metrics:
    """The metrics endpoint (dmsnap.metrics), bound before the Manager
    exists (a port conflict is found before any device is touched) and
    given the storage core once it is assembled."""

    def __init__(self, address: str, state_dir: str) -> None:
        from dmsnap.metrics.collector import Collector, DaemonInfo, LagClock
        from dmsnap.metrics.core import ManagerView
        from dmsnap.metrics.server import MetricsServer
        from dmsnap.scsi.tcmu import LATENCY_BOUNDS

        self._view_type, self._lag_type = ManagerView, LagClock
        self.errors = _ErrorCount()
        logging.getLogger().addHandler(self.errors)
        self.info = DaemonInfo(
            version=__version__, starts=_count_start(state_dir), errors=lambda: self.errors.count
        )
        self.collector = Collector(_NoCore(), self.info, LATENCY_BOUNDS)
        self.server = MetricsServer(self.collector, address)
        self.lag: Any = None

    def start(self) -> None:
        self.server.start()

    def attach(self, manager: Any, schedules: Any) -> None:
        view = self._view_type(manager)
        self.lag = self._lag_type(view.journal_stats)
        self.lag.start()
        self.collector.lag = self.lag
        self.collector.core = view
        if schedules is not None:
            self.info.schedules = schedules.list
        from dmsnap.storage.inband import request_counts
        from dmsnap.storage.snapshots import MARKER_BOUNDS, marker_latencies

        self.info.inband = request_counts
        self.info.markers, self.info.marker_bounds = marker_latencies, MARKER_BOUNDS

    def stop(self) -> None:
        if self.lag is not None:
            self.lag.stop()
        self.server.stop()
        logging.getLogger().removeHandler(self.errors)


class _NoCore:
    """The storage core before assembly: nothing to report yet."""

    def status(self) -> dict[str, Any]:
        return {}

    def snapshot_list(self) -> list[Any]:
        return []

    def export_list(self) -> list[Any]:
        return []

    def journal_stats(self) -> dict[str, Any]:
        return {}


def run_daemon(
    state_dir: str,
    socket_path: str,
    *,
    manager_factory: Callable[[str], Any] | None = None,
    notifier: Notifier | None = None,
    policy: PeerPolicy | None = None,
    install_signals: bool = True,
    on_serving: Callable[[Server], None] | None = None,
    metrics: str | None = None,
    on_event: str | None = None,
) -> int:
    """Run the daemon to completion; return its exit code.

    ``manager_factory`` (default: the real Manager) and ``notifier`` are
    parameters so the daemon's own logic can be exercised without a kernel.
    ``metrics``: the metrics endpoint's ADDR:PORT (None: none).
    """
    state_dir = os.path.abspath(state_dir)
    try:
        hook = EventHook(on_event) if on_event else None
    except ValueError as e:
        log.error("%s", e)
        return 2
    try:
        lock = acquire_state_lock(state_dir)
    except UserError as e:
        log.error("%s", e.message)
        return 1
    with lock:
        exporter = None
        if metrics is not None:
            try:
                exporter = _Metrics(metrics, state_dir)
            except UserError as e:  # a malformed --metrics: the administrator's to fix
                log.error("%s", e.message)
                return 1
            try:
                exporter.start()
            except UserError as e:
                # A port someone else took must not keep the storage down
                # (initiators' commands time out in the ring meanwhile);
                # Prometheus sees the target down and alerts.
                log.error("%s; serving storage without metrics", e.message)
                exporter.stop()
                exporter = None
        try:
            return _run_locked(
                state_dir, socket_path, manager_factory, notifier, policy, install_signals,
                on_serving, exporter, hook,
            )  # fmt: skip
        finally:
            if exporter is not None:
                exporter.stop()


def _run_locked(
    state_dir: str,
    socket_path: str,
    manager_factory: Callable[[str], Any] | None,
    notifier: Notifier | None,
    policy: PeerPolicy | None,
    install_signals: bool,
    on_serving: Callable[[Server], None] | None,
    exporter: _Metrics | None,
    hook: EventHook | None,
) -> int:
    notifier = notifier if notifier is not None else Notifier()
    server = Server(socket_path, policy=policy, notifier=notifier)
    if install_signals and threading.current_thread() is threading.main_thread():

        def on_signal(signum: int, _frame: object) -> None:
            server.request_stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        # Socket peers that vanish must not kill us.
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        server.bind()
    except UserError as e:
        log.error("%s", e.message)
        server.close()
        return 1
    try:
        return _run_manager(
            state_dir, server, notifier, manager_factory, on_serving, exporter, hook
        )
    finally:
        server.close()


def _run_manager(
    state_dir: str,
    server: Server,
    notifier: Notifier,
    manager_factory: Callable[[str], Any] | None,
    on_serving: Callable[[Server], None] | None,
    exporter: _Metrics | None = None,
    on_event: EventHook | None = None,
) -> int:
    notifier.status("assembling")
    try:
        manager = (manager_factory or _real_manager)(state_dir)
    except UserError as e:
        log.error("%s", e.message)
        notifier.stopping(f"failed: {e.message}")
        return 1
    except Exception:
        log.exception("cannot open the state in %s", state_dir)
        notifier.stopping("failed")
        return 1
    teardown = False
    try:
        degraded = ""
        try:
            summary = manager.assemble()
            log.info("assembled: %s", _short(summary))
        except UserError as e:
            # Keep serving: the operator needs the CLI to see and fix what
            # did not come up (status shows it; the pools that did come up work).
            log.error("assembly incomplete: %s", e.message)
            degraded = f" (assembly incomplete: {e.message})"
        status = serving_status(manager) + degraded
        log.info("%s on %s", status, server.socket_path)
        notifier.ready(status)
        notifier.start_watchdog(server.heartbeat.alive)
        if on_serving:
            on_serving(server)
        schedules = _start_schedules(manager, state_dir)
        if schedules is not None:
            server.services["schedules"] = schedules
        if exporter is not None and callable(getattr(manager, "status", None)):
            exporter.attach(manager, schedules)
        watcher = devwatch = None
        if callable(getattr(manager, "health", None)):
            tick = getattr(manager, "autoextend", None)
            watcher = HealthWatcher(manager.health, tick if callable(tick) else None, on_event)
            watcher.start()
            devwatch = DeviceWatcher(watcher.poke)
            try:
                devwatch.start()
            except Exception as e:  # no udev: dm events and re-checks still run
                log.warning("device events unavailable: %s", e)
                devwatch = None
        try:
            teardown = server.serve(manager)
        finally:
            if devwatch is not None:
                devwatch.stop()
            if schedules is not None:
                schedules.stop()  # before the manager closes: no run may start after
            if watcher is not None:
                watcher.stop()
        # STOPPING=1 is out; what follows is bounded by TimeoutStopSec.
        notifier.stop_watchdog()
        if teardown:
            notifier.status("tearing down")
            log.info("tearing down every device (daemon.stop with teardown)")
            manager.teardown()
        return 0
    except Exception:
        log.exception("dmsnapd failed")
        notifier.stopping("failed")
        return 1
    finally:
        notifier.stop_watchdog()
        try:
            manager.close()
        except Exception:
            log.exception("closing the manager failed")
        log.info("stopped")


def _start_schedules(manager: Any, state_dir: str) -> Any:
    """The schedules' timer thread (dmsnap.schedule), for a real Manager
    (one with a catalog in the state directory)."""
    catalog = os.path.join(state_dir, "catalog.db")
    if not (callable(getattr(manager, "snapshot_create", None)) and os.path.exists(catalog)):
        return None
    from dmsnap.schedule.runner import Scheduler

    try:
        scheduler = Scheduler(manager, catalog)
    except Exception:  # schedules must not keep the storage from being served
        log.exception("schedules not started")
        return None
    scheduler.start()
    return scheduler


def _short(summary: Any) -> str:
    if isinstance(summary, dict):
        return ", ".join(
            f"{k}={len(v) if isinstance(v, (list, dict)) else v}" for k, v in summary.items()
        )
    return "done" if summary is None else str(summary)


def _worker_nice(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= 19:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number from 0 to 19")
    return n


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dmsnapd",
        description="dmsnap daemon: owns the storage stack and serves the dmsnap CLI.",
    )
    p.add_argument(
        "--state-dir",
        default=os.environ.get("DMSNAP_STATE_DIR") or DEFAULT_STATE_DIR,
        help="catalog, lock and embedded pool files (env DMSNAP_STATE_DIR; default %(default)s)",
    )
    p.add_argument(
        "--socket",
        default=os.environ.get("DMSNAP_SOCKET") or DEFAULT_SOCKET,
        help="control socket (env DMSNAP_SOCKET; default %(default)s)",
    )
    p.add_argument(
        "--log-level",
        default=(os.environ.get("DMSNAP_LOG_LEVEL") or "info").lower(),
        choices=LOG_LEVELS,
        help="(env DMSNAP_LOG_LEVEL; default %(default)s)",
    )
    p.add_argument(
        "--foreground",
        action="store_true",
        help="accepted for clarity: dmsnapd always runs in the foreground (systemd Type=notify)",
    )
    p.add_argument(
        "--worker-nice",
        type=_worker_nice,
        default=os.environ.get("DMSNAP_WORKER_NICE") or str(DEFAULT_WORKER_NICE),
        metavar="0..19",
        help="run exports' fast-path I/O threads this much nicer than dmsnapd, so that "
        "the kernel's SCSI fabric threads win a short CPU (0: same; "
        "env DMSNAP_WORKER_NICE; default %(default)s)",
    )
    p.add_argument(
        "--on-event",
        default=os.environ.get("DMSNAP_ON_EVENT") or None,
        metavar="COMMAND",
        help="run COMMAND (split as a shell would, not run by one) for every health "
        "problem that appears or clears: a device under a pool gone, a pool or journal "
        "full or failing, a snapshot invalidated; environment DMSNAP_EVENT "
        "(problem|recovered), DMSNAP_POOL, DMSNAP_MESSAGE (env DMSNAP_ON_EVENT)",
    )
    p.add_argument(
        "--metrics",
        default=os.environ.get("DMSNAP_METRICS") or DEFAULT_METRICS,
        metavar="ADDR:PORT",
        help="serve Prometheus metrics on http://ADDR:PORT/metrics (docs/metrics.md); "
        "loopback only by default, ':PORT' listens on every address "
        "(env DMSNAP_METRICS; default %(default)s)",
    )
    p.add_argument("--no-metrics", action="store_true", help="serve no metrics endpoint")
    p.add_argument("--version", action="version", version=f"dmsnapd {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.log_level)
    notifier = Notifier()
    # Children (none today) must not talk to systemd on our behalf.
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(var, None)
    factory = functools.partial(_real_manager, worker_nice=args.worker_nice)
    metrics = None if args.no_metrics else args.metrics
    sys.exit(
        run_daemon(
            args.state_dir,
            args.socket,
            notifier=notifier,
            manager_factory=factory,
            metrics=metrics,
            on_event=args.on_event,
        )
    )


if __name__ == "__main__":
    main()
