"""Device events: udev tells when a block device goes away or changes; the
health watcher then re-checks at once (device-mapper raises no event when a
disk under a pool disappears: the pool's I/O just starts failing), so the
pool shows degraded in ``dmsnap status``, the log and the event hook within
a second or two, not at the next periodic re-check.

And the event hook: ``dmsnapd --on-event COMMAND`` runs COMMAND (split like
a shell would, not run by one) for every health problem that appears or
clears, with the event in its environment; it never blocks the watcher.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import threading
from collections.abc import Callable

log = logging.getLogger("dmsnap.events")

HOOK_TIMEOUT = 60.0  # seconds a hook may run before it is killed
_POOL = re.compile(r"pool (\S+?):")


class DeviceWatcher:
    """pyudev's monitor on block devices; ``changed()`` on every remove or
    change event (the health check decides what it means for which pool)."""

    def __init__(self, changed: Callable[[], None]) -> None:
        self._changed = changed
        self._observer = None

    def start(self) -> None:
        import pyudev

        mon = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
        mon.filter_by("block")

        def on_event(action: str, device: object) -> None:
            if action in ("remove", "change", "offline"):
                self._changed()

        self._observer = pyudev.MonitorObserver(mon, on_event, name="dev-events")
        self._observer.start()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.send_stop()


class EventHook:
    """Runs the administrator's ``--on-event`` command, one at a time, in
    order, on its own thread. Environment: DMSNAP_EVENT (``problem`` or
    ``recovered``), DMSNAP_POOL (when the line names one), DMSNAP_MESSAGE
    (the health line as logged)."""

    def __init__(self, command: str) -> None:
        self.argv = shlex.split(command)
        if not self.argv:
            raise ValueError("--on-event: empty command")
        self._lock = threading.Lock()

    def __call__(self, event: str, line: str) -> None:
        threading.Thread(
            target=self._run, args=(event, line), name="event-hook", daemon=True
        ).start()

    def _run(self, event: str, line: str) -> None:
        env = dict(os.environ, DMSNAP_EVENT=event, DMSNAP_MESSAGE=line)
        if m := _POOL.match(line):
            env["DMSNAP_POOL"] = m.group(1)
        with self._lock:  # in order: "problem" before its "recovered"
            try:
                r = subprocess.run(
                    self.argv,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=HOOK_TIMEOUT,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as e:
                log.error("event hook %s: %s", self.argv[0], e)
                return
            if r.returncode != 0:
                err = r.stderr.decode(errors="replace").strip().splitlines()
                log.error(
                    "event hook %s exited %d%s",
                    self.argv[0],
                    r.returncode,
                    f": {err[-1]}" if err else "",
                )
