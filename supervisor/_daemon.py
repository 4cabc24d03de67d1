"""``qsup serve``: the per-node daemon -- a Node, its event log and the HTTP API, in one trio run.

Start-up, in an order that matters:

1. **Lock the state dir** (``flock`` on ``<state_dir>/daemon.lock``) and **probe the socket**: if
   another daemon answers on ``cfg.socket`` we refuse to start, otherwise a stale socket file
   (left by a SIGKILLed daemon) is removed.  Two daemons on one state dir would fight over
   records and the event log's seq numbers.
2. Open the event log and the node (its threads and nursery).
3. **Reattach** the instances recorded in the state dir (``Node.reattach``): the QEMU processes
   outlived the previous daemon, and their monitors are unix socket paths, so they are found
   again, verified (pid + start time) and supervised; the ones that died meanwhile are cleaned up
   from their netconf journal.
4. Bind the API socket (mode 0660: access to the API is access to the socket file), the
   optional TCP listener and the optional ``metrics_listen`` listener (no token: it serves
   only ``GET /metrics`` and ``GET /v1/health``, for Prometheus and load balancers), and start
   hypercorn's HTTP/1.1 protocol on them, behind our own accept loop (at most
   ``http_max_connections`` open connections per listener).  The TCP listener is HTTPS when
   ``tls_*`` is set (supervisor/_tls.py): a caller presents a client certificate signed by
   ``tls_ca`` (its name goes into ``scope["qsup.cert_name"]``; the API makes it a peer's or an
   operator's role, or refuses it: supervisor/api/_authz.py) or the bearer token.  Without TLS
   it may bind a loopback address only (the config refuses anything else).
5. Tell systemd ``READY=1`` (``Type=notify``).  Only now: a unit ordered after qsup can rely on
   every surviving instance being supervised again.

Shutdown on SIGTERM/SIGINT: with ``on_shutdown = "leave"`` (the default) the daemon exits and
leaves the guests running -- cancelling an instance's supervision task does not touch QEMU, and a
later daemon reattaches.  With ``"stop"`` every instance is stopped cleanly first.  Either way
the API stops first, so no request starts something during shutdown.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import math
import os
import signal
import socket
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import trio

from ._config import Config
from ._faults import from_env as faults_from_env
from ._records import Layout, ensure_dir
from ._tls import PEER_NODE, TlsError, TlsFiles, check_node_files, check_qemu_reaches_run_dir, server_context
from .api import HttpLimits, Metrics, create_app, create_metrics_app

if TYPE_CHECKING:
    from hypercorn.config import Config as HConfig

log = structlog.get_logger("qsup.daemon")


class DaemonError(RuntimeError):
    """The daemon cannot start (another one runs, a socket cannot be bound...)."""


# -- systemd ---------------------------------------------------------------------------------

def sd_notify(message: str) -> bool:
    """Send ``message`` to systemd's $NOTIFY_SOCKET; False if not under systemd (or it fails)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    addr = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError as e:
        log.warning("sd_notify failed", error=str(e))
        return False


# -- the sockets -------------------------------------------------------------------------------

def lock_state_dir(state_dir: Path) -> int:
    """Hold an exclusive flock on the state dir for the daemon's life; the fd is the lock."""
    ensure_dir(state_dir)
    fd = os.open(state_dir / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise DaemonError(f"another qsup daemon holds {state_dir}") from None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def bind_unix(path: Path, mode: int = 0o660) -> socket.socket:
    """Bind the API socket: refuse if a daemon answers there, replace a stale file, chmod."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise DaemonError(f"{path} exists and is not a socket")
        if _answers(path):
            raise DaemonError(f"another daemon is answering on {path}")
        os.unlink(path)  # stale: its daemon died without cleaning up
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)  # no window in which the socket is wider than 0660
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(128)
    return sock


def bind_tcp(listen: str, key: str = "listen", *, empty_host: str = "0.0.0.0") -> socket.socket:
    """Bind ``host:port`` (``[v6]:port``; an empty host is ``empty_host``: all IPv4 addresses unless
    said otherwise -- ``metrics_listen`` says loopback); ``key`` names the config key."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise DaemonError(f"{key}: expected host:port, got {listen!r}")
    host = host.strip("[]") or empty_host
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, int(port)))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise DaemonError(f"{key}: cannot listen on {listen}: {e.strerror}") from None
    return sock


def read_token(path: Path) -> str:
    """The bearer token; refused unless only its owner may read the file (it is every right on
    ``listen``)."""
    try:
        with open(path) as f:
            mode = os.fstat(f.fileno()).st_mode
            token = f.read().strip()
    except OSError as e:
        raise DaemonError(f"token_file: cannot read {path}: {e.strerror}") from None
    if mode & 0o044:
        who = "group" if mode & 0o040 else "others"
        raise DaemonError(f"token_file: {path} is readable by {who} (mode {stat.S_IMODE(mode):04o}); "
                          f"chmod 600 it")
    if len(token) < 16:
        raise DaemonError(f"token_file: the token in {path} is shorter than 16 characters")
    return token


class PeerAuth:
    """ASGI layer of the TLS listener: the name a verified client certificate carries goes into
    ``scope["qsup.cert_name"]`` (absent: no certificate).

    The handshake already checked the certificate against ``tls_ca`` (an unknown one never gets
    here).  The name is not a right: the API's outer layer makes it a role -- a declared peer, an
    operator listed in ``operators``, or nobody (403 everywhere) -- and one check decides what
    that role may call (supervisor/api/_authz.py).  Without a certificate the bearer token is
    asked for; a certificate caller's ``Authorization`` header counts for nothing.
    """

    def __init__(self, app):
        self.app = app
        self.state = getattr(app, "state", None)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scope = {k: v for k, v in scope.items() if k != "qsup.cert_name"}
            name = PEER_NODE.get()
            if name is not None:
                scope["qsup.cert_name"] = name
        await self.app(scope, receive, send)


#: open connections per listener unless the config says (``http_max_connections``)
MAX_CONNECTIONS = 512


class ConnectionCap(trio.abc.Listener[trio.SocketStream]):
    """A listener that keeps at most ``limit`` connections open: over it, a connection is accepted
    and closed at once (before any TLS), so a flood of idle or trickling clients holds at most
    ``limit`` file descriptors and tasks, and the kernel's backlog keeps draining.

    A connection counts until its handler ends (:meth:`release`): for a client that left an idle
    connection, when hypercorn's idle timer closes it, at most ``http_header_timeout`` later.
    """

    def __init__(self, listener: trio.SocketListener, limit: int, key: str = ""):
        self.listener = listener
        self.limit = limit
        self.key = key
        self.open = 0
        self.refused = 0
        self._logged = -math.inf

    async def accept(self) -> trio.SocketStream:
        while True:
            stream = await self.listener.accept()
            if self.open < self.limit:
                self.open += 1
                return stream
            self.refused += 1
            await trio.aclose_forcefully(stream)
            if time.monotonic() - self._logged > 10:  # not one line per refused connection
                self._logged = time.monotonic()
                log.warning("connection refused: over http_max_connections", listener=self.key, limit=self.limit,
                            refused=self.refused)

    def release(self) -> None:
        self.open -= 1

    async def aclose(self) -> None:
        await self.listener.aclose()


def _hypercorn_config(header_timeout: float) -> HConfig:
    from hypercorn.config import Config as HConfig

    hc = HConfig()
    hc.accesslog = None
    hc.errorlog = None  # our own middleware logs
    hc.graceful_timeout = 1.0
    # hypercorn's idle timer runs until a request's header is complete: a client that
    # trickles its header (slowloris) is cut off after it.  (Not ``read_timeout``: that also
    # cuts an ``events --follow`` client, which rightly sends nothing for hours.)
    hc.keep_alive_timeout = header_timeout
    # and the TLS handshake before it (hypercorn's default: 60 s of a silent connection)
    hc.ssl_handshake_timeout = header_timeout
    return hc


async def _serve_http(app, sock: socket.socket, header_timeout: float, *, tls: TlsFiles | None = None,
                      max_connections: int = MAX_CONNECTIONS, key: str = "",
                      task_status=trio.TASK_STATUS_IGNORED) -> None:
    """hypercorn's HTTP/1.1 protocol (its ``TCPServer``, one per connection) on a socket we bound
    ourselves, behind our own accept loop: hypercorn's ``serve()`` accepts without a limit, so
    the loop is ours and :class:`ConnectionCap` caps it.  With ``tls`` the listener is HTTPS
    (``server_context``: client certificates optional, verified against ``tls_ca``; the peer's
    name recorded for :class:`PeerAuth`).  No ASGI lifespan: the apps have no start-up hooks.
    """
    from hypercorn.trio.tcp_server import TCPServer
    from hypercorn.trio.worker_context import WorkerContext
    from hypercorn.typing import ConnectionState
    from hypercorn.utils import wrap_app

    hc = _hypercorn_config(header_timeout)
    cap = ConnectionCap(trio.SocketListener(trio.socket.from_stdlib_socket(sock)), max_connections, key)
    listener: trio.abc.Listener = cap
    if tls is not None:
        listener = trio.SSLListener(cap, server_context(tls), https_compatible=True)
    asgi = wrap_app(app, hc.wsgi_max_body_size, "asgi")
    context = WorkerContext(None)

    async def connection(stream) -> None:
        try:
            await TCPServer(asgi, hc, context, ConnectionState({}), stream)
        finally:
            cap.release()

    async with trio.open_nursery() as handlers:
        try:
            task_status.started()
            await trio.serve_listeners(connection, [listener], handler_nursery=handlers)
        finally:
            await context.terminated.set()
            handlers.cancel_scope.deadline = trio.current_time() + hc.graceful_timeout


# -- the daemon --------------------------------------------------------------------------------

async def serve_daemon(cfg: Config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the daemon until SIGTERM/SIGINT.  ``task_status.started()`` once it is READY."""
    from ._eventlog import EventLog
    from ._node import Node

    lock_fd = lock_state_dir(cfg.state_dir)
    socks: list[socket.socket] = []
    events = None
    bound = False
    try:
        token = read_token(cfg.token_file) if cfg.listen and cfg.token_file else None
        if cfg.tls is not None:
            try:
                check_node_files(cfg.tls, cfg.node_name)
            except TlsError as e:
                raise DaemonError(str(e)) from None
            if cfg.listen and token is None:
                import secrets

                token = secrets.token_urlsafe(32)  # nobody knows it: certificates only
        socks.append(bind_unix(cfg.socket))
        bound = True
        tcp = bind_tcp(cfg.listen, "listen") if cfg.listen else None
        metrics_sock = (bind_tcp(cfg.metrics_listen, "metrics_listen", empty_host="127.0.0.1")
                        if cfg.metrics_listen else None)
        socks += [s for s in (tcp, metrics_sock) if s is not None]
        Layout(cfg.state_dir, cfg.run_dir).prepare()
        try:
            check_qemu_reaches_run_dir(cfg)  # QEMU reads a TLS migration's keys under it
        except TlsError as e:
            raise DaemonError(str(e)) from None
        events = EventLog(cfg.state_dir / "events.db", retention=cfg.event_retention)
        metrics = Metrics()
        metrics.watch(events)
        node = Node(cfg, events, faults=faults_from_env(os.environ))
        metrics.observe_node(node)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with node.running():
                t0 = time.perf_counter()
                reattached = await node.reattach()
                reattach_ms = round((time.perf_counter() - t0) * 1000, 1)
                log.info("reattached", instances=reattached, ms=reattach_ms)
                limits = HttpLimits(cfg.http_max_requests, cfg.http_max_followers)
                app = create_app(node, events, metrics, reattached=reattached, limits=limits)
                async with trio.open_nursery() as http:
                    apps = [app]
                    serve = functools.partial(_serve_http, max_connections=cfg.http_max_connections)
                    await http.start(functools.partial(serve, key="socket"), app, socks[0], cfg.http_header_timeout)
                    if tcp is not None:
                        tcp_app = create_app(node, events, metrics, token=token, reattached=reattached,
                                             limits=limits)
                        if cfg.tls is not None:
                            tcp_app = PeerAuth(tcp_app)
                        apps.append(tcp_app)
                        await http.start(functools.partial(serve, tls=cfg.tls, key="listen"), tcp_app, tcp,
                                         cfg.http_header_timeout)
                    if metrics_sock is not None:
                        metrics_app = create_metrics_app(node, events, metrics, reattached=reattached)
                        apps.append(metrics_app)
                        await http.start(functools.partial(serve, key="metrics_listen"), metrics_app, metrics_sock,
                                         cfg.http_header_timeout)
                    socks.clear()  # hypercorn owns them now
                    events.emit("daemon.ready", node=cfg.node_name, pid=os.getpid(), reattached=reattached,
                                reattach_ms=reattach_ms)
                    sd_notify("READY=1\nSTATUS=serving")
                    log.info("ready", socket=str(cfg.socket), listen=cfg.listen, tls=cfg.tls is not None,
                             peers=sorted(cfg.peers), metrics_listen=cfg.metrics_listen)
                    task_status.started()
                    async for sig in signals:
                        log.info("signal", signal=signal.Signals(sig).name, on_shutdown=cfg.on_shutdown)
                        break
                    sd_notify("STOPPING=1")
                    for a in apps:  # until the listeners close: health 503, nothing new started
                        a.state.stopping = True
                    events.emit("daemon.stopping", on_shutdown=cfg.on_shutdown)
                    http.cancel_scope.cancel()  # no new requests (and end every event stream)
                if cfg.on_shutdown == "stop":
                    await node.stop_all()
                left = [i.name for i in node.list() if not i.state.is_final]
                log.info("exiting", left_running=left)
                # leaving node.running() cancels the instance tasks; QEMU keeps running
    finally:
        for s in socks:
            s.close()
        if bound:
            with contextlib.suppress(OSError):
                os.unlink(cfg.socket)
        if events is not None:
            events.close()
        os.close(lock_fd)


def main(cfg: Config) -> int:
    """Entry point for ``qsup serve``: returns the exit status."""
    from . import _log

    _log.configure(cfg.log_level)
    try:
        trio.run(serve_daemon, cfg)
    except DaemonError as e:
        log.error("cannot start", error=str(e))
        raise
    return 0
