"""Talk to dmsnapd over its control socket (see :mod:`dmsnap.daemon.protocol`).

::

    with Client() as c:
        c.call("volume.create", pool="p", vol="v", size=1 << 30)

Errors come back as the :class:`dmsnap.errors.UserError` subclass the daemon
raised (same code, same message), so the CLI prints them unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import secrets
import socket
import threading
from collections.abc import Callable
from typing import Any

from dmsnap.daemon import protocol as proto
from dmsnap.errors import BY_CODE, NotFound, PermissionDenied, Unavailable, UserError

DEFAULT_SOCKET = proto.DEFAULT_SOCKET


def default_socket() -> str:
    return os.environ.get("DMSNAP_SOCKET") or DEFAULT_SOCKET


def error_from(code: str, message: str) -> UserError:
    """The exception for a wire error; unknown codes keep their code."""
    cls = BY_CODE.get(code)
    if cls is not None:
        return cls(message)
    err = UserError(message)
    err.code = code
    if code == proto.E_INTERNAL:
        err.exit_code = 70  # EX_SOFTWARE: a bug in dmsnapd, not the user's doing
    return err


class Client:
    """One connection, opened on the first call, reused for the next ones.

    ``timeout`` (seconds) bounds each call; None (the default) waits as long
    as the daemon works, since creating a pool may legitimately take time.
    """

    def __init__(self, socket_path: str | None = None, *, timeout: float | None = None) -> None:
        self.socket_path = socket_path or default_socket()
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._rfile: Any = None
        self._ids = itertools.count(1)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._rfile is not None:
            self._rfile.close()
            self._rfile = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _not_running(self) -> Unavailable:
        return Unavailable(
            f"dmsnapd is not running (no socket at {self.socket_path}); "
            "start it with: systemctl start dmsnapd"
        )

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(self.timeout)
        try:
            s.connect(self.socket_path)
        except OSError as e:
            s.close()
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR):
                raise self._not_running() from None
            if e.errno in (errno.EACCES, errno.EPERM):
                raise PermissionDenied(
                    f"permission denied on {self.socket_path}: "
                    "run as root or as a member of group dmsnap"
                ) from None
            if isinstance(e, TimeoutError):
                raise Unavailable(f"dmsnapd at {self.socket_path} does not answer") from None
            raise Unavailable(f"cannot connect to dmsnapd at {self.socket_path}: {e}") from None
        self._sock = s
        self._rfile = s.makefile("rb")
        return s

    def call(self, op: str, *, fds: list[int] | None = None, **args: Any) -> Any:
        """Send one request and return its result, or raise its error.
        ``fds``: file descriptors passed with it (SCM_RIGHTS), for the ops
        that read or write a stream there (replication.send/receive)."""
        return self._call(op, args, fds=fds)

    def call_watched(
        self,
        op: str,
        watch: Callable[[dict[str, Any]], None],
        *,
        interval: float = 0.25,
        **args: Any,
    ) -> Any:
        """:meth:`call`, and meanwhile every ``interval`` s ``watch(progress)``
        with what ``op.progress`` says of it (read on a second connection, in
        a thread; see :mod:`dmsnap.daemon.progress` for the fields), and once
        more when it has succeeded. A progress read that fails only stops the
        watching: the request itself is not affected."""
        token = secrets.token_hex(16)
        stop = threading.Event()
        guard = threading.Lock()  # no report after the last one

        def read(c: Client) -> bool:
            try:
                p = c.call("op.progress", token=token)
            except NotFound:  # not begun yet
                return True
            except UserError:
                return False
            with guard:
                if not stop.is_set():
                    watch(p)
            return True

        def poll() -> None:
            with Client(self.socket_path, timeout=10.0) as c:
                while not stop.wait(interval) and read(c):
                    pass

        poller = threading.Thread(target=poll, name="progress", daemon=True)
        poller.start()
        try:
            result = self._call(op, args, progress=token)
        finally:
            with guard:
                stop.set()
        poller.join(timeout=1.0)
        # the end as the daemon saw it (a failure to read it changes nothing)
        with Client(self.socket_path, timeout=10.0) as c, contextlib.suppress(UserError):
            watch(c.call("op.progress", token=token))
        return result

    def _call(
        self,
        op: str,
        args: dict[str, Any],
        *,
        progress: str | None = None,
        fds: list[int] | None = None,
    ) -> Any:
        req_id = next(self._ids)
        args = {k: v for k, v in args.items() if v is not None}
        sock = self._connect()
        try:
            data = proto.request(req_id, op, args, progress=progress)
            if fds:
                # the descriptors ride with the first byte; the rest follows
                n = socket.send_fds(sock, [data], fds)
                data = data[n:]
            sock.sendall(data)
            line = self._rfile.readline(proto.MAX_RESPONSE + 1)
        except TimeoutError:
            self.close()
            raise Unavailable(f"dmsnapd did not answer {op} within {self.timeout:g}s") from None
        except OSError as e:
            self.close()
            raise Unavailable(f"lost the connection to dmsnapd during {op}: {e}") from None
        if not line:
            self.close()
            raise Unavailable(f"dmsnapd closed the connection during {op} (is it stopping?)")
        if len(line) > proto.MAX_RESPONSE:
            self.close()
            raise UserError(f"response to {op} longer than {proto.MAX_RESPONSE} bytes")
        try:
            msg = proto.parse_response(line)
        except proto.ProtocolError:
            self.close()
            raise
        # A null id answers a request the daemon could not read (or refused
        # before reading): it is the answer to ours.
        if msg.get("id") not in (req_id, None):
            self.close()
            raise UserError(f"dmsnapd answered request {msg.get('id')!r}, expected {req_id}")
        if msg["ok"]:
            return msg.get("result")
        err = msg["error"]
        raise error_from(str(err.get("code", "error")), err["message"])


def call(op: str, socket_path: str | None = None, **args: Any) -> Any:
    """One-shot convenience: connect, call, close."""
    with Client(socket_path) as c:
        return c.call(op, **args)
