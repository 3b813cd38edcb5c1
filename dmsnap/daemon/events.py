"""Health watching: device-mapper events → log lines (and `dmsnap status`).

Targets raise dm events when something needs attention: a thin pool
crossing its low-water mark or running out of space, a classic snapshot
overflowing, a writecache latching an error. The watcher waits on the
control fd (DM_DEV_ARM_POLL + poll), re-reads health through the Manager
(serialised with requests) and logs what appeared or cleared. A slow
periodic re-check covers state that changes without an event.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from dmsnap.dm import Control, DmError

log = logging.getLogger("dmsnap.events")

RECHECK_SECONDS = 30.0


class HealthWatcher:
    def __init__(self, health: Callable[[], list[str]]) -> None:
        """``health`` returns the current health problems (Manager.health,
        wrapped so it runs under the daemon's request lock)."""
        self._health = health
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.known: set[str] = set()

    def start(self) -> None:
        self.known = set(self._check())
        for h in sorted(self.known):
            log.warning("health: %s", h)
        self._thread = threading.Thread(target=self._run, name="dm-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _check(self) -> list[str]:
        try:
            return self._health()
        except Exception as e:  # never let monitoring kill the daemon
            log.error("health check failed: %s", e)
            return sorted(self.known)

    def _run(self) -> None:
        try:
            ctl = Control()
        except DmError as e:
            log.error("dm event monitoring unavailable: %s", e)
            return
        with ctl:
            while not self._stop.is_set():
                ctl.arm_poll()
                # Short polls so stop() is prompt; a re-check every RECHECK.
                waited = 0.0
                while not self._stop.is_set() and waited < RECHECK_SECONDS:
                    if ctl.poll(1.0):
                        break
                    waited += 1.0
                if self._stop.is_set():
                    return
                self.update(self._check())

    def update(self, now: list[str]) -> None:
        current = set(now)
        for h in sorted(current - self.known):
            log.warning("health: %s", h)
        for h in sorted(self.known - current):
            log.info("health recovered: %s", h)
        self.known = current
