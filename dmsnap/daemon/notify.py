"""sd_notify(3) without libsystemd: one datagram per message to $NOTIFY_SOCKET.

Only what dmsnapd needs: READY=1, STATUS=..., STOPPING=1 and a WATCHDOG=1
keep-alive. Outside systemd (no $NOTIFY_SOCKET) every call is a no-op, so the
daemon runs the same by hand.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("dmsnapd")


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        # '@' is systemd's spelling of the Linux abstract namespace.
        self.address: str | bytes | None = None
        if path.startswith("@"):
            self.address = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self.address = path
        self.watchdog_usec = 0
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process the watchdog is meant for; a child
        # that inherited the environment must not feed it.
        if usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(usec)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send ``lines`` as one message; False (logged) if it could not go."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError as e:
            # Never fatal: systemd may be gone while we shut down.
            log.debug("sd_notify %s: %s", lines, e)
            return False

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def stopping(self, status: str | None = None) -> None:
        self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def start_watchdog(self, alive: Callable[[], bool] = lambda: True) -> None:
        """Send WATCHDOG=1 at half the interval systemd asked for, while
        ``alive()`` says the daemon still makes progress: a wedged serve loop
        then stops the pings and systemd restarts us."""
        if not (self.enabled and self.watchdog_usec) or self._thread:
            return
        interval = self.watchdog_usec / 2e6

        def loop() -> None:
            while not self._stop.wait(interval):
                if alive():
                    self.send("WATCHDOG=1")
                else:
                    log.error("serve loop is not making progress; not feeding the watchdog")

        self._thread = threading.Thread(target=loop, name="watchdog", daemon=True)
        self._thread.start()

    def stop_watchdog(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
            self._thread = None


class Heartbeat:
    """A monotonic timestamp the serve loop refreshes; the watchdog reads it."""

    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        self.last = time.monotonic()

    def beat(self) -> None:
        self.last = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.last < self.max_age
