"""The ASGI side of the HTTP API: the Starlette app, its exception handlers, and the outermost layer
(the caller's role and the one access check, bearer auth on TCP, request limits, access log and
metrics, the events fast path, a last-resort 500).

:func:`create_app` is what the daemon serves on its unix socket (and TCP listener);
:func:`create_metrics_app` serves ``/metrics`` and ``/v1/health`` alone (``metrics_listen``).
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass

import structlog
from starlette.applications import Starlette
from starlette.datastructures import State as AppState
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from ._authz import CERT_KEY, OPERATOR, ROLE_KEY, Role, role_for_certificate
from ._errors import ERROR_TABLE, ErrorKind, HttpError, http_error, internal_error
from ._events import EventStream, _LineCache
from ._metrics import Metrics
from ._request import query_bool, query_int
from ._routes import AUTHORIZER, ROUTES, openapi

log = structlog.get_logger("qsup.api")

_METRICS_ROUTES = [r for r in ROUTES if r.path in ("/metrics", "/v1/health")]


# -- errors, auth, logging ---------------------------------------------------------------------

async def _known_error(request: Request, exc: Exception) -> Response:
    return http_error(exc).response()


async def _http_exception(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, HTTPException):  # registered for HTTPException only
        return await _internal(request, exc)
    msg = {404: f"no route {request.url.path[:200]}", 405: f"method {request.method[:20]} not allowed here"}
    return HttpError(msg.get(exc.status_code, exc.detail), kind=ErrorKind.for_status(exc.status_code),
                     headers=exc.headers).response()


async def _internal(request: Request, exc: Exception) -> Response:
    # Starlette re-raises after this answer; _Outer logs the traceback.
    return internal_error(exc).response()


_KNOWN_METHODS = frozenset(("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"))


@dataclass(frozen=True)
class HttpLimits:
    """Per listener: requests served at once, and live event followers (the config's ``http_max_*``)."""

    max_requests: int = 256
    max_followers: int = 64


@dataclass
class _Started:
    """A response's status and seconds to its start (0 and 0.0 until it starts)."""

    status: int = 0
    seconds: float = 0.0


class _Outer:
    """Outermost ASGI layer: the caller's role (``scope["qsup.role"]``) and the one access check
    (``_routes.AUTHORIZER``), bearer auth (TCP only), access log + metrics, and a last-resort 500.

    The role: a verified client certificate's name (``scope["qsup.cert_name"]``, put there by the
    TLS listener's layer) decides -- a declared peer, a name in ``operators``, or no role; without
    one, the bearer token is the operator (401 without it); a listener without a token (the unix
    socket) serves the operator.  Non-HTTP scopes (websocket) are refused outright.
    """

    state: AppState  # the inner app's, set by create_app / create_metrics_app

    def __init__(self, app, metrics: Metrics, token: str | None, *, events: bool = True,
                 limits: HttpLimits | None = None, peers: frozenset[str] = frozenset(),
                 operators: frozenset[str] = frozenset()):
        self.app = app
        self.metrics = metrics
        self.token = token.encode() if token else None
        self.events = events  # serve GET /v1/events (the fast path)
        self.limits = limits or HttpLimits()
        self.peers = peers  # the config's [peers] names: their certificates are peers
        self.operators = operators  # the config's operators: their certificates are operators
        self.active = 0  # requests being served now
        self.followers = 0  # of which live event streams

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":  # websocket (or anything newer): the API has none
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
            return
        t0 = time.perf_counter()
        started = _Started()

        async def send_(message):
            if message["type"] == "http.response.start":
                started.status = message["status"]
                started.seconds = time.perf_counter() - t0
            await send(message)

        self.active += 1
        role = None
        try:
            role = self._role(scope)
            refusal = None if role is None else AUTHORIZER.refusal(role, scope, self.app.state.node)
            if self.active > self.limits.max_requests:
                await HttpError(f"over {self.limits.max_requests} requests at once; retry", kind=ErrorKind.BUSY,
                                headers={"retry-after": "1"}).response()(scope, receive, send_)
            elif role is None:
                await HttpError("missing or wrong bearer token", kind=ErrorKind.UNAUTHORIZED,
                                headers={"www-authenticate": "Bearer"}).response()(scope, receive, send_)
            elif refusal is not None:
                await refusal.response()(scope, receive, send_)
            elif self.events and scope.get("path") == "/v1/events" and scope.get("method") == "GET":
                await self._events(scope, receive, send, send_, started, t0)
            else:
                await self.app(scope, receive, send_)
        except Exception as e:  # noqa: BLE001 -- logged; the client got (or gets) a JSON 500
            log.error("request failed", method=scope.get("method", "")[:20], path=scope.get("path", "")[:200],
                      error=repr(e), exc_info=True)
            if started.status == 0:
                await internal_error(e).response()(scope, receive, send_)
        finally:
            self.active -= 1
            method = scope.get("method", "")
            method = method if method in _KNOWN_METHODS else "other"
            route = scope.get("route")
            path = getattr(route, "path", None) or ("/v1/events" if self.events and scope.get("path") == "/v1/events"
                                                   else "unmatched")
            self.metrics.observe_request(method, path, started.status, started.seconds or time.perf_counter() - t0)
            if started.status >= 400 or scope.get("path", "").startswith("/v1/instances") and method != "GET":
                log.info("request", method=method, path=scope.get("path", "")[:200], status=started.status,
                         role=str(role) if role else None, ms=round((time.perf_counter() - t0) * 1000, 2))

    async def _events(self, scope, receive, send, send_, started: _Started, t0: float) -> None:
        """``GET /v1/events`` straight to the stream, past Starlette's middleware.

        Each of the three middleware layers wraps ``send`` in another coroutine; one event goes
        out once per follower, so on this route those layers are most of the per-send cost that
        is not the server's own.  Same validation and errors as every other route.
        """
        request = Request(scope, receive)
        try:
            since = query_int(request, "since", 0)
            follow = query_bool(request, "follow", False)
        except HttpError as e:
            await e.response()(scope, receive, send_)
            return
        if follow and self.followers >= self.limits.max_followers:
            await HttpError(f"over {self.limits.max_followers} event followers; retry", kind=ErrorKind.BUSY,
                            headers={"retry-after": "5"}).response()(scope, receive, send_)
            return
        started.status = 200
        started.seconds = time.perf_counter() - t0  # a followed stream lasts: its latency is to the headers
        self.followers += follow
        try:
            await EventStream(self.app.state, since, follow)(scope, receive, send)
        finally:
            self.followers -= follow

    def _role(self, scope) -> Role | None:
        """The caller's role, also put into ``scope["qsup.role"]``; None: no credentials (401)."""
        cert = scope.get(CERT_KEY)
        if cert is not None:  # a verified certificate decides, whatever Authorization says
            role = role_for_certificate(cert, self.peers, self.operators)
        elif self.token is None or self._authorized(scope):
            role = OPERATOR
        else:
            return None
        scope[ROLE_KEY] = role
        return role

    def _authorized(self, scope) -> bool:
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                scheme, _, cred = v.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(cred.strip(), self.token)
        return False


def _starlette(routes, node, events, metrics: Metrics, reattached, doc: dict | None) -> Starlette:
    handlers = {cls: _known_error for cls in ERROR_TABLE}
    handlers.update({HttpError: _known_error, HTTPException: _http_exception, Exception: _internal})
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.node = node
    app.state.events = events
    app.state.metrics = metrics
    app.state.reattached = list(reattached or [])
    app.state.lines = _LineCache()
    app.state.openapi = doc
    app.state.stopping = False
    return app


def _default_metrics(node, events) -> Metrics:
    metrics = Metrics()
    metrics.observe_node(node)
    metrics.watch(events)
    return metrics


def create_app(node, events, metrics: Metrics | None = None, *, token: str | None = None,
               reattached: list[str] | None = None, limits: HttpLimits | None = None):
    """The ASGI app for ``node``.  ``token`` set (the TCP listener): every request needs
    ``Authorization: Bearer`` or a client certificate (``scope["qsup.cert_name"]``), which is a
    peer's (``node.cfg.peers``), an operator's (``node.cfg.operators``) or nobody's.

    Set ``app.state.stopping = True`` when the daemon begins to shut down: health answers 503
    and no new instance or migration is started.
    """
    metrics = metrics or _default_metrics(node, events)
    app = _starlette(ROUTES, node, events, metrics, reattached, openapi(authenticated=token is not None))
    cfg = getattr(node, "cfg", None)
    outer = _Outer(app, metrics, token, limits=limits, peers=frozenset(getattr(cfg, "peers", None) or ()),
                   operators=frozenset(getattr(cfg, "operators", None) or ()))
    outer.state = app.state  # so callers can update e.g. reattached, stopping
    return outer


def create_metrics_app(node, events, metrics: Metrics | None = None, *, reattached: list[str] | None = None):
    """``/metrics`` and ``/v1/health`` only, without authentication (the ``metrics_listen`` listener)."""
    metrics = metrics or _default_metrics(node, events)
    app = _starlette(_METRICS_ROUTES, node, events, metrics, reattached, None)
    outer = _Outer(app, metrics, None, events=False)
    outer.state = app.state
    return outer
