"""The metrics endpoint: ``prometheus_client``'s HTTP server on ADDR:PORT,
serving one registry that holds only dmsnap's collector (no process or
platform collectors of the library's default registry: what is scraped is
what docs/metrics.md lists, plus ``process_*`` which we add on purpose)."""

from __future__ import annotations

import ipaddress
import logging
import threading
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.process_collector import ProcessCollector

from dmsnap import errors as E

log = logging.getLogger("dmsnap.metrics")

DEFAULT_ADDRESS = "127.0.0.1:9723"  # loopback only: a safe default, opened on purpose


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (all addresses) -> (host,
    port; 0: a free one, logged); a one-line UserError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise E.UserError(f"--metrics {text!r}: expected ADDR:PORT (e.g. {DEFAULT_ADDRESS})")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise E.UserError(f"--metrics {text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise E.UserError(f"--metrics {text!r}: write an IPv6 address in brackets, [::1]:PORT")
    return host or "0.0.0.0", int(port)


class MetricsServer:
    def __init__(self, collector: Any, address: str = DEFAULT_ADDRESS) -> None:
        self.host, self.port = parse_address(address)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self.registry.register(ProcessCollector(registry=None))
        self._httpd: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve in a thread; a UserError (one line) if the address
        cannot be bound."""
        try:
            self._httpd, self._thread = start_http_server(
                self.port, addr=self.host, registry=self.registry
            )
        except OSError as e:
            raise E.UserError(
                f"metrics endpoint {self.host}:{self.port}: {e.strerror or e}"
                " (choose another with --metrics ADDR:PORT, or --no-metrics)"
            ) from None
        self.port = self._httpd.server_address[1]  # the real one when 0 was asked
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
