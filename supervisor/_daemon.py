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
   hypercorn's trio worker on them.  The TCP listener is HTTPS when ``tls_*`` is set
   (supervisor/_tls.py): a caller presents a client certificate signed by ``tls_ca`` (it is
   then the node its certificate names, ``scope["qsup.peer_node"]``) or the bearer token.
   Without TLS it may bind a loopback address only (the config refuses anything else).
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
import os
import signal
import socket
import stat
import time
from pathlib import Path

import structlog
import trio

from ._config import Config
from ._records import Layout, ensure_dir
from ._tls import PEER_NODE, TlsError, TlsFiles, check_node_files, check_qemu_reaches_run_dir
from .api import HttpLimits, Metrics, create_app, create_metrics_app

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


def bind_tcp(listen: str, key: str = "listen") -> socket.socket:
    """Bind ``host:port`` (``[v6]:port``; empty host: all IPv4 addresses); ``key`` names the config key."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise DaemonError(f"{key}: expected host:port, got {listen!r}")
    host = host.strip("[]") or "0.0.0.0"
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
    """ASGI layer of the TLS listener: a verified client certificate stands for the bearer token.

    The handshake already checked the certificate against ``tls_ca`` (an unknown one never
    gets here); its node name goes into ``scope["qsup.peer_node"]`` and the request is passed
    on as authorized.  Without a certificate the request goes on as it came: the inner app
    asks for the token.  (The inner app checks ``Authorization: Bearer``; a certificate caller
    gets the token put in by this layer, so one check serves both ways in.)
    """

    def __init__(self, app, token: str):
        self.app = app
        self.state = getattr(app, "state", None)
        self._auth = (b"authorization", f"Bearer {token}".encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            scope = dict(scope)
            peer = PEER_NODE.get()
            scope["qsup.peer_node"] = peer
            if peer is not None:
                scope["headers"] = [h for h in scope["headers"] if h[0] != b"authorization"] + [self._auth]
        await self.app(scope, receive, send)


def _hypercorn_config(tls: TlsFiles | None):
    from hypercorn.config import Config as HConfig

    if tls is None:
        return HConfig()
    files = tls

    class TlsConfig(HConfig):
        def create_ssl_context(self):
            from ._tls import server_context

            return server_context(files)

    hc = TlsConfig()
    # what hypercorn itself would use; our create_ssl_context builds the same plus the peer hook
    hc.certfile, hc.keyfile, hc.ca_certs = str(tls.cert), str(tls.key), str(tls.ca)
    import ssl as _ssl

    hc.verify_mode = _ssl.CERT_OPTIONAL
    return hc


async def _serve_http(app, sock: socket.socket, header_timeout: float, *, tls: TlsFiles | None = None,
                      task_status=trio.TASK_STATUS_IGNORED) -> None:
    """hypercorn's trio worker on a socket we bound ourselves (``fd://``: it takes the fd over)."""
    from hypercorn.trio import serve

    hc = _hypercorn_config(tls)
    hc.bind = [f"fd://{sock.detach()}"]
    hc.accesslog = None
    hc.errorlog = None  # our own middleware logs
    hc.graceful_timeout = 1.0
    # hypercorn's idle timer runs until a request's header is complete: a client that
    # trickles its header (slowloris) is cut off after it.  (Not ``read_timeout``: that also
    # cuts an ``events --follow`` client, which rightly sends nothing for hours.)
    hc.keep_alive_timeout = header_timeout
    await serve(app, hc, task_status=task_status, mode="asgi")


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
        metrics_sock = bind_tcp(cfg.metrics_listen, "metrics_listen") if cfg.metrics_listen else None
        socks += [s for s in (tcp, metrics_sock) if s is not None]
        Layout(cfg.state_dir, cfg.run_dir).prepare()
        try:
            check_qemu_reaches_run_dir(cfg)  # QEMU reads a TLS migration's keys under it
        except TlsError as e:
            raise DaemonError(str(e)) from None
        events = EventLog(cfg.state_dir / "events.db", retention=cfg.event_retention)
        metrics = Metrics()
        metrics.watch(events)
        node = Node(cfg, events)
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
                    await http.start(_serve_http, app, socks[0], cfg.http_header_timeout)
                    if tcp is not None:
                        tcp_app = create_app(node, events, metrics, token=token, reattached=reattached,
                                             limits=limits)
                        if cfg.tls is not None:
                            assert token is not None  # a TLS listener always has one (made up above)
                            tcp_app = PeerAuth(tcp_app, token)
                        apps.append(tcp_app)
                        await http.start(functools.partial(_serve_http, tls=cfg.tls), tcp_app, tcp,
                                         cfg.http_header_timeout)
                    if metrics_sock is not None:
                        metrics_app = create_metrics_app(node, events, metrics, reattached=reattached)
                        apps.append(metrics_app)
                        await http.start(_serve_http, metrics_app, metrics_sock, cfg.http_header_timeout)
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
