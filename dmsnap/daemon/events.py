"""Health watching: device-mapper events → log lines (and `dmsnap status`).

Targets raise dm events when something needs attention: a thin pool
crossing its low-water mark or running out of data space, a classic
snapshot invalidated because its COW area overflowed, a writecache latching
an error. The watcher waits on the control fd (DM_DEV_ARM_POLL + poll),
re-reads health through the Manager (serialised with requests) and logs what
appeared or cleared, one line per problem naming its pool (and snapshot). A
slow periodic re-check covers state that changes without an event (a COW
area filling up, which dm-snapshot only reports once it overflows). A
``tick`` runs every second: the classic COW autoextend, which must act
before an area fills and gets no event for it.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable

from dmsnap.dm import Control, DmError

log = logging.getLogger("dmsnap.events")

RECHECK_SECONDS = 30.0
POLL_SECONDS = 1.0  # how promptly stop() is noticed

_PERCENT = re.compile(r"\d+(?:\.\d+)?%")


def problem_key(problem: str) -> str:
    """A problem's identity: its text without percentages. "data 91% full"
    becoming "data 92% full" is the same problem still there, not a new one
    plus a recovery (which would log two lines per percent)."""
    return _PERCENT.sub("%", problem)


class HealthWatcher:
    def __init__(
        self,
        health: Callable[[], list[str]],
        tick: Callable[[], None] | None = None,
        on_change: Callable[[str, str], None] | None = None,
    ) -> None:
        """``health`` returns the current health problems (Manager.health,
        which takes the control lock itself); ``tick`` runs every
        POLL_SECONDS (Manager.autoextend, likewise); ``on_change(event,
        line)`` hears each problem that appears ("problem") or clears
        ("recovered")."""
        self._health = health
        self._tick = tick
        self._on_change = on_change
        self._poked = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.known: dict[str, str] = {}  # problem_key -> text as last logged

    def start(self) -> None:
        self.update(self._check())
        self._thread = threading.Thread(target=self._run, name="dm-events", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Re-check now (within POLL_SECONDS), not at the next dm event or
        periodic re-check: something changed that dm raises no event for
        (a device under a pool went away)."""
        self._poked.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _check(self) -> list[str]:
        try:
            return self._health()
        except Exception as e:  # never let monitoring kill the daemon
            log.error("health check failed: %s", e)
            return list(self.known.values())

    def _run(self) -> None:
        try:
            ctl = Control()
        except DmError as e:
            log.error("dm event monitoring unavailable: %s", e)
            return
        with ctl:
            while not self._stop.is_set():
                # Arm before reading health: an event that fires while we
                # read then still wakes the next poll instead of waiting for
                # the periodic re-check.
                ctl.arm_poll()
                self._poked.clear()
                self.update(self._check())
                waited = 0.0
                while not self._stop.is_set() and waited < RECHECK_SECONDS:
                    self.tick()
                    if ctl.poll(POLL_SECONDS) or self._poked.is_set():
                        break
                    waited += POLL_SECONDS

    def tick(self) -> None:
        if self._tick is None:
            return
        try:
            self._tick()
        except Exception as e:  # never let monitoring kill the daemon
            log.error("autoextend failed: %s", e)

    def update(self, now: list[str]) -> None:
        current = {problem_key(h): h for h in now}
        for key in sorted(current.keys() - self.known.keys()):
            log.warning("health: %s", current[key])
            self._tell("problem", current[key])
        for key in sorted(self.known.keys() - current.keys()):
            log.info("health recovered: %s", self.known[key])
            self._tell("recovered", self.known[key])
        for key in sorted(current.keys() & self.known.keys()):
            if current[key] != self.known[key]:
                log.debug("health: %s", current[key])
        self.known = current

    def _tell(self, event: str, line: str) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(event, line)
        except Exception as e:  # never let monitoring kill the daemon
            log.error("event hook failed: %s", e)
