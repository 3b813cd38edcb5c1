"""The control socket of dmsnapd.

A thread per connection reads request lines (see :mod:`.protocol`) and
answers them in order; every Manager call goes through one lock, because the
Manager is the only actor on the stack and its operations (suspend, load,
resume, catalog transaction) must not interleave. The accept loop runs in the
caller's thread (the daemon's main thread, where signals land).

Access: the socket is 0660 root:dmsnap (root only if that group does not
exist), and each connection's peer credentials (SO_PEERCRED) are checked
again, so a socket path or mode changed by mistake does not open the stack.
"""

from __future__ import annotations

import array
import contextlib
import errno
import grp
import json
import logging
import os
import pwd
import selectors
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from dmsnap import __version__
from dmsnap.daemon import protocol as proto
from dmsnap.daemon.notify import Heartbeat, Notifier
from dmsnap.daemon.progress import Registry
from dmsnap.errors import Busy, InvalidArgument, PermissionDenied, Unavailable, UserError
from dmsnap.storage.names import BadName

log = logging.getLogger("dmsnapd")

DEFAULT_SOCKET = proto.DEFAULT_SOCKET
DEFAULT_GROUP = "dmsnap"
MAX_CONNECTIONS = 64
# Hostile or broken clients must not hold the daemon (tests/host/
# test_control_hostile.py): a request line, once begun, must be complete within
# REQUEST_TIMEOUT; an answer the client does not read within SEND_TIMEOUT ends
# its connection; and when every slot is taken, the connection idle (between
# requests) the longest, for at least EVICT_IDLE_AFTER, gives its slot to the
# newcomer (its client sees the connection closed, as after a daemon restart).
REQUEST_TIMEOUT = 30.0
SEND_TIMEOUT = 30.0
EVICT_IDLE_AFTER = 10.0
# On stop, how long an in-flight request may take to finish before the
# remaining connections are cut (systemd's TimeoutStopSec is larger).
DRAIN_TIMEOUT = 60.0
# The serve loop wakes at least this often, to refresh the watchdog heartbeat.
TICK = 1.0
# File descriptors a request may carry (SCM_RIGHTS): a stream's stdin or
# stdout for replication.send/receive. More are closed unread.
MAX_FDS = 4

_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


def group_gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected, from the kernel."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def _supplementary_groups(pid: int) -> set[int]:
    # SO_PEERCRED carries only the primary gid; the kernel's view of the
    # peer's other groups is in /proc (same pid namespace: the socket is local).
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:] if g.isdigit()}
    except OSError:
        pass
    return set()


@dataclass(frozen=True)
class PeerPolicy:
    """Who may talk to the daemon: these uids, or members of ``gid``."""

    uids: frozenset[int] = frozenset({0})
    gid: int | None = None
    group_name: str = DEFAULT_GROUP

    @classmethod
    def default(cls, group: str = DEFAULT_GROUP) -> PeerPolicy:
        return cls(frozenset({0}), group_gid(group), group)

    def allows(self, pid: int, uid: int, gid: int) -> bool:
        if uid in self.uids:
            return True
        if self.gid is None:
            return False
        if gid == self.gid or self.gid in _supplementary_groups(pid):
            return True
        try:  # membership as configured, for a peer whose /proc we cannot read
            return pwd.getpwuid(uid).pw_name in grp.getgrgid(self.gid).gr_mem
        except KeyError:
            return False

    def describe(self) -> str:
        if self.gid is None:
            return "only root may use dmsnapd"
        return f"only root and members of group {self.group_name} may use dmsnapd"


@dataclass(eq=False)  # identity: kept in a set
class _Conn:
    sock: socket.socket
    pid: int = 0
    uid: int = -1
    gid: int = -1
    thread: threading.Thread | None = field(default=None, repr=False)
    # monotonic time since when it waits for a request with nothing read (None:
    # reading or serving one); under the server's lock
    idle_since: float | None = None
    # file descriptors passed (SCM_RIGHTS) with the request being read
    fds: list[int] = field(default_factory=list)

    def who(self) -> str:
        return f"pid {self.pid} uid {self.uid}"


class Server:
    """Bind with :meth:`bind`, run with :meth:`serve`, stop from any thread or
    a signal handler with :meth:`request_stop`, clean up with :meth:`close`."""

    def __init__(
        self,
        socket_path: str = DEFAULT_SOCKET,
        *,
        policy: PeerPolicy | None = None,
        notifier: Notifier | None = None,
        group: str = DEFAULT_GROUP,
        max_connections: int = MAX_CONNECTIONS,
        drain_timeout: float = DRAIN_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
        send_timeout: float = SEND_TIMEOUT,
        evict_idle_after: float = EVICT_IDLE_AFTER,
    ) -> None:
        self.socket_path = socket_path
        self.group = group
        self.policy = policy if policy is not None else PeerPolicy.default(group)
        self.notifier = notifier or Notifier({})
        self.max_connections = max_connections
        self.drain_timeout = drain_timeout
        self.request_timeout = request_timeout
        self.send_timeout = send_timeout
        self.evict_idle_after = evict_idle_after
        self.heartbeat = Heartbeat(max_age=30 * TICK)
        self.manager: Any = None
        # capabilities of their own packages that answer ops (protocol Op.service)
        self.services: dict[str, Any] = {}
        # long requests' progress, read by op.progress without any other lock
        self.progress = Registry()
        self.started = time.monotonic()
        self._listener: socket.socket | None = None
        # Self-pipe: the only thing a signal handler does is set a flag and
        # write here (no locks, so it cannot deadlock the thread it interrupts).
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop_requested = False
        self._teardown = False
        self._cond = threading.Condition()
        self._stopping = False
        self._inflight = 0
        self._conns: set[_Conn] = set()

    # ------------------------------------------------------------ lifecycle

    def bind(self) -> None:
        """Create the socket (0660, group dmsnap if it exists). A socket left
        by a dead daemon is replaced; one a live daemon answers on is not."""
        path = self.socket_path
        sock_dir = os.path.dirname(os.path.abspath(path))
        created = not os.path.isdir(sock_dir)
        if created:
            try:
                os.makedirs(sock_dir, mode=0o750)
            except OSError as e:
                raise UserError(f"cannot create {sock_dir}: {e.strerror}") from None
        self._remove_stale(path)
        gid = group_gid(self.group)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # bind() creates the node with 0777 & ~umask: tighten the umask so
        # there is no window in which the socket is more open than 0660.
        old = os.umask(0o117)
        try:
            listener.bind(path)
        except OSError as e:
            listener.close()
            raise UserError(f"cannot bind {path}: {e.strerror}") from None
        finally:
            os.umask(old)
        os.chmod(path, 0o660)
        if gid is not None:
            try:
                os.chown(path, -1, gid)
                self._share_dir(sock_dir, gid, created)
            except OSError as e:
                log.warning("cannot give group %s access to %s: %s", self.group, path, e)
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        log.info(
            "listening on %s (%s)",
            path,
            f"root and group {self.group}" if gid is not None else "root only",
        )

    @staticmethod
    def _share_dir(sock_dir: str, gid: int, created: bool) -> None:
        # Group members must be able to traverse the directory (systemd's
        # RuntimeDirectory is root:root 0750). Only touch a directory that is
        # ours alone, never a shared one such as /tmp.
        st = os.stat(sock_dir)
        if created or (st.st_uid == os.geteuid() and not st.st_mode & 0o007):
            if st.st_gid != gid:
                os.chown(sock_dir, -1, gid)
            if not st.st_mode & 0o010:
                os.chmod(sock_dir, stat.S_IMODE(st.st_mode) | 0o050)

    @staticmethod
    def _remove_stale(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise UserError(f"{path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(2)
        try:
            probe.connect(path)
        except OSError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise UserError(f"cannot check existing socket {path}: {e.strerror}") from None
        else:
            raise Busy(f"socket {path} is in use by another dmsnapd (another state directory?)")
        finally:
            probe.close()
        # We hold the state-dir lock, so this is a socket whose daemon died.
        log.info("removing stale socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def request_stop(self, teardown: bool = False) -> None:
        """Stop serving soon. Safe from a signal handler and any thread."""
        if teardown:
            self._teardown = True
        self._stop_requested = True
        # Requests waiting for a snapshot answer now (the Event is lock-free,
        # so this is safe in a signal handler too).
        interrupt = getattr(self.manager, "interrupt_waits", None)
        if interrupt is not None:
            interrupt()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def serve(self, manager: Any) -> bool:
        """Serve until :meth:`request_stop`; then stop accepting, let the
        in-flight requests finish, cut idle connections and return whether a
        teardown was asked for (the caller does it, and closes the manager)."""
        if self._listener is None:
            raise RuntimeError("serve() before bind()")
        self.manager = manager
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stop_requested:
                self.heartbeat.beat()
                for key, _ in sel.select(timeout=TICK):
                    if key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    else:
                        try:
                            self._accept()
                        except Exception:  # e.g. EMFILE: log, keep serving
                            log.exception("accepting a connection failed")
                            time.sleep(0.1)
        finally:
            sel.close()
            self._drain()
        return self._teardown

    def close(self) -> None:
        """Close the listener and remove the socket (idempotent)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        for s in (self._wake_r, self._wake_w):
            s.close()

    def _drain(self) -> None:
        with self._cond:
            self._stopping = True
        log.info("stopping%s", " (teardown requested)" if self._teardown else "")
        self.notifier.stopping("stopping")
        # Stop accepting first: new clients get "not running", not a hang.
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        deadline = time.monotonic() + self.drain_timeout
        with self._cond:
            # In slices, so the watchdog still sees us alive while we wait.
            while self._inflight and time.monotonic() < deadline:
                self._cond.wait(timeout=TICK)
                self.heartbeat.beat()
            if self._inflight:
                log.warning("%d request(s) still running; cutting them off", self._inflight)
            conns = list(self._conns)
        for c in conns:  # wakes their threads out of recv() with EOF
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RDWR)
        for c in conns:
            if c.thread:
                c.thread.join(timeout=5)

    # ---------------------------------------------------------- connections

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        sock.setblocking(True)
        conn = _Conn(sock)
        victim = None
        with self._cond:
            full = len(self._conns) >= self.max_connections
            if full:
                now = time.monotonic()
                idle = [
                    c
                    for c in self._conns
                    if c.idle_since is not None and now - c.idle_since >= self.evict_idle_after
                ]
                if idle:
                    victim = min(idle, key=lambda c: c.idle_since or 0.0)
                    self._conns.discard(victim)
                    full = False
            if not full:
                self._conns.add(conn)
        if victim is not None:
            log.warning(
                "%d connections open: closing the one idle longest (%s)",
                self.max_connections,
                victim.who(),
            )
            with contextlib.suppress(OSError):  # its thread sees EOF and ends
                victim.sock.shutdown(socket.SHUT_RDWR)
        if full:
            log.warning("refusing connection: %d connections open", self.max_connections)
            with contextlib.suppress(OSError):
                sock.sendall(proto.error(None, Busy.code, "dmsnapd has too many connections"))
            sock.close()
            return
        conn.thread = threading.Thread(target=self._connection, args=(conn,), daemon=True)
        conn.thread.name = f"conn-{conn.thread.name}"
        conn.thread.start()

    def _connection(self, conn: _Conn) -> None:
        try:
            conn.pid, conn.uid, conn.gid = peer_credentials(conn.sock)
            allowed = self.policy.allows(conn.pid, conn.uid, conn.gid)
            buf = bytearray()
            while True:
                try:
                    line = self._read_line(conn, buf)
                except TimeoutError:
                    log.warning(
                        "%s: request not complete within %g s", conn.who(), self.request_timeout
                    )
                    msg = f"request not complete within {self.request_timeout:g} s"
                    self._send(conn, proto.error(None, proto.E_BAD_REQUEST, msg))
                    break
                except OSError:
                    break
                if not line:
                    break
                if len(line) > proto.MAX_REQUEST:
                    # We cannot find the next request boundary without reading
                    # the rest, so answer and hang up.
                    log.warning("%s: request longer than %d bytes", conn.who(), proto.MAX_REQUEST)
                    self._send(
                        conn,
                        proto.error(
                            None,
                            proto.E_BAD_REQUEST,
                            f"request longer than {proto.MAX_REQUEST} bytes",
                        ),
                    )
                    break
                if not line.strip():
                    continue
                if not allowed:
                    log.warning("denied %s (%s)", conn.who(), self.policy.describe())
                    msg = f"permission denied: {self.policy.describe()}"
                    self._send(conn, proto.error(_peek_id(line), PermissionDenied.code, msg))
                    break
                if not self._request(conn, line):
                    break
        except Exception:  # a connection must never take the daemon down
            log.exception("connection %s failed", conn.who())
        finally:
            with self._cond:
                self._conns.discard(conn)
            conn.sock.close()

    def _request(self, conn: _Conn, line: bytes) -> bool:
        """Answer one request; False when the connection should end."""
        with self._cond:
            if self._stopping:
                self._send(
                    conn, proto.error(_peek_id(line), Unavailable.code, "dmsnapd is stopping")
                )
                return False
            self._inflight += 1
        fds, conn.fds = conn.fds, []
        try:
            return self._send(conn, self.handle_line(line, conn.who(), fds))
        finally:
            _close_fds(fds)  # the daemon's copies: the client keeps its own
            with self._cond:
                self._inflight -= 1
                self._cond.notify_all()

    def _read_line(self, conn: _Conn, buf: bytearray) -> bytes:
        """The next request line with its newline (longer than MAX_REQUEST
        if it is: the caller refuses it), what is left at EOF (b"" if
        nothing), or TimeoutError if a begun line is not complete in time."""
        deadline = None
        while True:
            i = buf.find(b"\n", 0, proto.MAX_REQUEST + 1)
            if i >= 0 or len(buf) > proto.MAX_REQUEST:
                n = i + 1 if i >= 0 else proto.MAX_REQUEST + 1
                line = bytes(buf[:n])
                del buf[:n]
                return line
            now = time.monotonic()
            if buf and deadline is None:
                deadline = now + self.request_timeout
            with self._cond:
                conn.idle_since = None if buf else now
            if deadline is not None and deadline <= now:
                raise TimeoutError
            conn.sock.settimeout(None if deadline is None else deadline - now)
            data = self._recv(conn)
            with self._cond:
                conn.idle_since = None
            if not data:
                line = bytes(buf)
                buf.clear()
                return line
            buf += data

    @staticmethod
    def _recv(conn: _Conn) -> bytes:
        """Bytes of the request stream, and any file descriptors sent with
        them (kept for the request they came with, closed if unused)."""
        data, anc, flags, _ = conn.sock.recvmsg(
            1 << 16, socket.CMSG_SPACE(MAX_FDS * _FD.itemsize), socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(cdata[: len(cdata) - len(cdata) % got.itemsize])
                conn.fds.extend(got)
        if flags & socket.MSG_CTRUNC:
            log.warning("%s: more than %d file descriptors passed; dropped", conn.who(), MAX_FDS)
        return data

    def _send(self, conn: _Conn, data: bytes) -> bool:
        try:
            conn.sock.settimeout(self.send_timeout)
            conn.sock.sendall(data)
            return True
        except OSError as e:  # the client went away; its loss
            log.debug("%s: send failed: %s", conn.who(), e)
            return False

    # ------------------------------------------------------------- requests

    def handle_line(self, line: bytes, who: str = "local", fds: list[int] | None = None) -> bytes:
        """One request line in (with the file descriptors passed with it),
        one response line out; never raises."""
        t0 = time.monotonic()
        req_id: Any = None
        op = "?"
        try:
            req = proto.parse_request(line)
            req_id, op = req.id, req.op
            if req.progress is not None and op != "op.progress":
                with self.progress.track(req.progress, op):
                    result = self._dispatch(req, fds or [])
            else:
                result = self._dispatch(req, fds or [])
            out = proto.ok(req_id, result)
        except proto.ProtocolError as e:
            req_id = e.req_id
            log.info("%s: bad request: %s", who, e.message)
            return proto.error(req_id, e.code, e.message)
        except UserError as e:
            log.info("%s: %s failed: %s: %s", who, op, e.code, e.message)
            return proto.error(req_id, e.code, e.message)
        except BadName as e:  # the Manager checks names too
            log.info("%s: %s failed: %s", who, op, e)
            return proto.error(req_id, InvalidArgument.code, str(e))
        except Exception as e:
            log.exception("%s: %s: internal error", who, op)
            return proto.error(
                req_id,
                proto.E_INTERNAL,
                f"internal error in {op}: {type(e).__name__}: {e} (details in the dmsnapd log)",
            )
        spec = proto.OPS[op]
        log.log(
            logging.INFO if spec.mutating else logging.DEBUG,
            "%s: %s%s ok (%.0f ms)",
            who,
            op,
            _summary(req.args),
            (time.monotonic() - t0) * 1000,
        )
        return out

    def _dispatch(self, req: proto.Request, fds: list[int] | None = None) -> Any:
        if req.op == "daemon.ping":
            return {
                "version": __version__,
                "protocol": proto.VERSION,
                "pid": os.getpid(),
                "uptime": round(time.monotonic() - self.started, 3),
            }
        if req.op == "op.progress":
            return self.progress.get(req.args["token"])
        if req.op == "daemon.stop":
            teardown = bool(req.args.get("teardown", False))
            # The answer goes out before the stop begins: serve() waits for
            # in-flight requests, and this one is in flight until sent.
            self.request_stop(teardown=teardown)
            return {"stopping": True, "teardown": teardown}
        # No lock here: the Manager's one control lock is taken by each of its
        # operations, for as long as they change state and never while they
        # wait for I/O (a --wait snapshot waits outside it). A second lock
        # here would hold every other client behind such a wait.
        spec = proto.OPS[req.op]
        target = self.manager if spec.service == "manager" else self.services.get(spec.service)
        if target is None:
            raise Unavailable(f"{req.op}: this dmsnapd runs no {spec.service}")
        fd = None
        if spec.fd:
            if len(fds or []) != 1:
                raise InvalidArgument(
                    f"{req.op} needs one file descriptor passed with the request (SCM_RIGHTS)"
                )
            fd = (fds or [])[0]
        result = proto.call_manager(target, req.op, req.args, fd)
        if req.op in ("pool.create", "pool.destroy"):
            self.notifier.status(serving_status(self.manager))
        return result


_FD = array.array("i")


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def serving_status(manager: Any) -> str:
    try:
        n = len(manager.pool_list())
    except Exception:  # STATUS= is cosmetic; never fail a request for it
        return "serving"
    return f"serving {n} pool{'' if n == 1 else 's'}"


def _peek_id(line: bytes) -> Any:
    """The request id, if the line is parseable enough to have one."""
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    req_id = msg.get("id") if isinstance(msg, dict) else None
    return req_id if isinstance(req_id, (int, str)) and not isinstance(req_id, bool) else None


def _summary(args: dict[str, Any]) -> str:
    # Enough to read the log, not a dump of labels.
    parts = []
    for k, v in args.items():
        if k == "refs":
            v = ",".join("/".join(r) for r in v)
        elif k == "labels":
            v = f"{len(v)} label(s)"
        elif k == "content":
            v = f"{len(v)} bytes"
        elif k in proto.SECRET_ARGS:  # never a secret in the log
            v = f"<{len(v) if isinstance(v, list) else 1} hidden>"
        parts.append(f"{k}={v}")
    return "".join(f" {p}" for p in parts)
