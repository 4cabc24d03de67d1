"""The node's HTTP API (Starlette), served by the daemon on a unix socket (and optionally TCP).

Routes (all JSON unless noted; see :func:`openapi` for the schema served at ``/openapi.json``)::

    GET    /v1/health                      200 {"status": "ok", ...}
    GET    /metrics                        200 Prometheus text
    POST   /v1/instances                   201 view   (body: an instance spec; waits until running)
    GET    /v1/instances                   200 {"instances": [view, ...]}
    GET    /v1/instances/{name}            200 view
    POST   /v1/instances/{name}/stop       200 final view (body optional: {"force", "timeout"})
    DELETE /v1/instances/{name}            200 final view (force-stops if still alive, then forgets)
    GET    /v1/events?since=SEQ&follow=B   200 NDJSON, one event per line

Errors are always ``{"error": "<one line>", "field": <dotted field or null>, "code": "<slug>"}``:

    400 bad_request      malformed JSON, not an object, wrong content type, bad query parameter
    401 unauthorized     TCP listener without the right bearer token
    404 not_found        unknown instance or route
    405 method_not_allowed
    409 conflict         the name is taken by a live instance
    413 too_large        body over 64 KiB
    422 invalid_spec     the spec (or stop options) failed validation, incl. host checks
    422 start_failed     valid spec, but QEMU/netconf failed; everything was rolled back

Why validate everything *before* calling the node: a request with bad input must change
nothing -- no instance entry, no record, no event.  So the spec is parsed and the host facts
(bridge exists, table known) are checked here first; only a request that passed those reaches
:meth:`Node.start`, whose own failures are rolled back by the instance and reported as 422
``start_failed`` with QEMU's reason (the start did emit its ``instance.starting``/``failed``
events: something really was attempted).  Rejected requests are not events; they are logged and
counted in ``qsup_http_requests_total{status=...}``.

No handler lets an exception escape as a bare traceback: the outer middleware turns anything
unexpected into a JSON 500 (and logs it), so the API's contract holds even for bugs.

``DELETE`` is "make it gone": a live instance is force-stopped (SIGTERM to QEMU, netconf undone)
and then dropped from the table; an instance that already ended is just dropped.  ``stop`` of
an instance that already ended answers 200 with its final view.

``GET /v1/events`` is answered by the outer layer directly (:class:`EventStream`), past
Starlette's middleware, because its cost per follower per event is what fan-out latency is made
of; the route is also registered with Starlette so the routing table stays complete.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import time

import structlog
import trio
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._instance import StartError, build_nics, check_host
from ._metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ._metrics import Metrics
from ._node import Conflict, NotFound
from ._spec import NAME_RE, InstanceSpec, SpecError, _loc, _message, parse_spec

log = structlog.get_logger("qsup.api")

MAX_BODY = 64 * 1024
MAX_SEQ = 2**63 - 1
NDJSON = "application/x-ndjson"
_EVENT_PAGE = 1000
_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                 409: "conflict", 413: "too_large", 422: "invalid_spec", 500: "internal"}


class ApiError(Exception):
    """An error answer: HTTP status, one-line message, the offending field (or None)."""

    def __init__(self, status: int, message: str, field: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = one_line(message)
        self.field = field or None
        self.code = code or _STATUS_CODES.get(status, "error")


def one_line(text: str, limit: int = 1000) -> str:
    s = " | ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def error_response(status: int, message: str, field: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    e = ApiError(status, message, field, code)
    return JSONResponse({"error": e.message, "field": e.field, "code": e.code}, status, headers=headers)


# -- request parsing ---------------------------------------------------------------------------

def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, *, required: bool = True) -> object | None:
    """The body as decoded JSON, enforcing size, content type and strict JSON; None if empty."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "invalid Content-Length")
        if int(length) > MAX_BODY:
            raise ApiError(413, f"request body over {MAX_BODY} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise ApiError(413, f"request body over {MAX_BODY} bytes")
    except ClientDisconnect:
        raise ApiError(400, "client disconnected while sending the body") from None
    if not body:
        if required:
            raise ApiError(400, "a JSON request body is required")
        return None
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise ApiError(400, f"Content-Type must be application/json, not {media or 'missing'!r}")
    try:
        return json.loads(bytes(body).decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "body is not UTF-8") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply") from None
    except ValueError as e:
        raise ApiError(400, f"malformed JSON: {e}") from None


def _query_int(request: Request, key: str, default: int) -> int:
    raw = request.query_params.get(key)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) > MAX_SEQ:
        raise ApiError(400, f"{key} must be a non-negative integer, got {raw[:40]!r}", key)
    return int(raw)


def _query_bool(request: Request, key: str, default: bool) -> bool:
    raw = request.query_params.get(key)
    if raw is None:
        return default
    v = raw.lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise ApiError(400, f"{key} must be true or false, got {raw[:40]!r}", key)


class StopOptions(BaseModel):
    """Body of ``POST /v1/instances/{name}/stop`` (optional)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    force: bool = False
    timeout: float | None = Field(default=None, ge=0, le=3600, allow_inf_nan=False)


def validate_body(model, data: object, what: str = "the body"):
    """``data`` (decoded JSON) as a ``model``; 400 if not an object, 422 naming the field."""
    if not isinstance(data, dict):
        raise ApiError(400, f"{what} must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise ApiError(422, f"{_loc(err['loc'])}: {_message(err)}", _loc(err["loc"]), "invalid_spec") from None


def _stop_options(data: object) -> StopOptions:
    return StopOptions() if data is None else validate_body(StopOptions, data, "stop options")


# -- handlers ----------------------------------------------------------------------------------

def _node(request: Request):
    return request.app.state.node


def _instance(request: Request):
    name = request.path_params["name"]
    if not NAME_RE.match(name) or name.strip(".") == "":
        raise ApiError(404, f"no instance named {name[:80]!r} (not a valid name)", "name")
    try:
        return _node(request).get(name)
    except NotFound as e:
        raise ApiError(404, str(e), "name") from None


async def health(request: Request) -> Response:
    node = _node(request)
    return JSONResponse({
        "status": "ok",
        "node": node.cfg.node_name,
        "instances": len(node.list()),
        "last_seq": request.app.state.events.last_seq,
        "reattached": request.app.state.reattached,
    })


async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=METRICS_CONTENT_TYPE)


async def openapi_json(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi)


async def list_instances(request: Request) -> Response:
    return JSONResponse({"instances": [i.view() for i in _node(request).list()]})


async def show_instance(request: Request) -> Response:
    return JSONResponse(_instance(request).view())


async def create_instance(request: Request) -> Response:
    node = _node(request)
    data = await read_json(request)
    if not isinstance(data, dict):
        raise ApiError(400, "the instance spec must be a JSON object")
    try:
        spec = parse_spec(data)
        node.check_free(spec.name)  # before the host checks: a duplicate is a 409
        # Host facts (bridge/OVS bridge/table exist).  check_link may run ovs-vsctl: off-thread.
        await trio.to_thread.run_sync(check_host, build_nics(spec))
        inst = await node.start(spec)
    except SpecError as e:
        raise ApiError(422, str(e), e.field, "invalid_spec") from None
    except Conflict as e:
        raise ApiError(409, str(e), e.field, "conflict") from None
    except StartError as e:
        raise ApiError(422, f"start failed (rolled back): {e}", e.field, "start_failed") from None
    except Exception as e:  # noqa: BLE001 -- a start failure is the request's answer, not a 5xx
        log.warning("start failed", instance=data.get("name"), error=repr(e))
        raise ApiError(422, f"start failed (rolled back): {type(e).__name__}: {e}", None, "start_failed") from None
    return JSONResponse(inst.view(), 201, headers={"location": f"/v1/instances/{inst.name}"})


async def stop_instance(request: Request) -> Response:
    inst = _instance(request)
    opts = _stop_options(await read_json(request, required=False))
    await _node(request).stop(inst.name, force=opts.force, timeout=opts.timeout)
    return JSONResponse(inst.view())


async def delete_instance(request: Request) -> Response:
    inst = _instance(request)
    node = _node(request)
    if not inst.state.is_final:
        await node.stop(inst.name, force=True)
    try:
        if node.instances.get(inst.name) is inst:
            node.forget(inst.name)
    except Conflict as e:
        raise ApiError(409, str(e), e.field, "conflict") from None
    return JSONResponse(inst.view())


async def events(request: Request) -> Response:
    since = _query_int(request, "since", 0)
    follow = _query_bool(request, "follow", False)
    return EventStream(request.app.state, since, follow)


class _LineCache:
    """Encoded NDJSON lines by seq, shared by every reader of one app.

    A live event goes to every follower; encoding it once instead of once per follower matters
    at 50 followers.  Safe because an event never changes once it has a seq.
    """

    def __init__(self, size: int = 8192):
        self._lines: dict[int, bytes] = {}
        self._size = size

    def line(self, ev: dict) -> bytes:
        seq = ev["seq"]
        b = self._lines.get(seq)
        if b is None:
            b = (json.dumps(ev, separators=(",", ":")) + "\n").encode()
            if len(self._lines) >= self._size:
                for k in list(self._lines)[: self._size // 4]:
                    del self._lines[k]
            self._lines[seq] = b
        return b


class EventStream:
    """``GET /v1/events`` as a raw ASGI response: NDJSON, batched, ends when the client leaves.

    Why not Starlette's StreamingResponse: every ``send`` through the server costs ~60-90 us, and
    one event goes to every follower, so the number of sends per event is what fan-out latency is
    made of.  Here a follower drains everything that is already emitted (a burst: a QMP event
    and the state change it causes are emitted back to back) into *one* send: while the event it
    just got is older than ``EventLog.last_seq``, the next one is available and
    :meth:`EventLog.follow` hands it over without blocking, so batching never waits.

    The follower ends when the client disconnects (``http.disconnect`` cancels it), when the
    event log closes, or when the daemon shuts down (the server cancels it).
    """

    def __init__(self, state, since: int, follow: bool):
        self.log = state.events
        self.metrics: Metrics = state.metrics
        self.lines: _LineCache = state.lines
        self.since = since
        self.follow = follow

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", NDJSON.encode()), (b"cache-control", b"no-store")]})
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._until_disconnect, receive, nursery.cancel_scope)
                if self.follow:
                    await self._live(send)
                else:
                    await self._backlog(send)
                nursery.cancel_scope.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away mid-send

    @staticmethod
    async def _until_disconnect(receive, cancel_scope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                cancel_scope.cancel()
                return

    async def _backlog(self, send) -> None:
        cursor = self.since
        while True:
            batch = self.log.since(cursor, _EVENT_PAGE)
            if not batch:
                return
            cursor = batch[-1]["seq"]
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"".join(self.lines.line(ev) for ev in batch)})

    async def _live(self, send) -> None:
        self.metrics.followers += 1
        chunk: list[bytes] = []
        try:
            async with contextlib.aclosing(self.log.follow(self.since, follow=True)) as stream:
                async for ev in stream:
                    chunk.append(self.lines.line(ev))
                    # More already emitted?  Then follow() yields it without blocking: keep going,
                    # so a burst becomes one send.  Otherwise send now -- never wait to batch.
                    if ev["seq"] < self.log.last_seq and len(chunk) < _EVENT_PAGE:
                        continue
                    body, chunk = b"".join(chunk), []
                    await send({"type": "http.response.body", "body": body, "more_body": True})
        finally:
            self.metrics.followers -= 1


ROUTES = [
    Route("/openapi.json", openapi_json, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/v1/health", health, methods=["GET"]),
    Route("/v1/instances", list_instances, methods=["GET"]),
    Route("/v1/instances", create_instance, methods=["POST"]),
    Route("/v1/instances/{name}", show_instance, methods=["GET"]),
    Route("/v1/instances/{name}", delete_instance, methods=["DELETE"]),
    Route("/v1/instances/{name}/stop", stop_instance, methods=["POST"]),
    Route("/v1/events", events, methods=["GET"]),
]


# -- errors, auth, logging ---------------------------------------------------------------------

async def _api_error(request: Request, exc: ApiError) -> Response:
    return error_response(exc.status, exc.message, exc.field, exc.code)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    msg = {404: f"no route {request.url.path[:200]}", 405: f"method {request.method[:20]} not allowed here"}
    return error_response(exc.status_code, msg.get(exc.status_code, exc.detail), None, None, exc.headers)


async def _internal(request: Request, exc: Exception) -> Response:
    return error_response(500, f"internal error: {type(exc).__name__}", None, "internal")


_KNOWN_METHODS = frozenset(("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"))


class _Outer:
    """Outermost ASGI layer: bearer auth (TCP only), access log + metrics, and a last-resort 500."""

    def __init__(self, app, metrics: Metrics, token: str | None):
        self.app = app
        self.metrics = metrics
        self.token = token.encode() if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [0]

        async def send_(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.token is not None and not self._authorized(scope):
                await error_response(401, "missing or wrong bearer token", None, "unauthorized",
                                     {"www-authenticate": "Bearer"})(scope, receive, send_)
            elif scope.get("path") == "/v1/events" and scope.get("method") == "GET":
                await self._events(scope, receive, send, send_, status)
            else:
                await self.app(scope, receive, send_)
        except Exception as e:  # noqa: BLE001 -- logged; the client got (or gets) a JSON 500
            log.error("request failed", path=scope.get("path"), error=repr(e), exc_info=True)
            if status[0] == 0:
                await error_response(500, f"internal error: {type(e).__name__}", None, "internal")(
                    scope, receive, send_)
        finally:
            method = scope.get("method", "")
            self.metrics.requests.labels(method if method in _KNOWN_METHODS else "other", str(status[0])).inc()
            if status[0] >= 400 or scope.get("path", "").startswith("/v1/instances") and method != "GET":
                log.info("request", method=method[:20], path=scope.get("path", "")[:200], status=status[0],
                         ms=round((time.perf_counter() - t0) * 1000, 2))

    async def _events(self, scope, receive, send, send_, status) -> None:
        """``GET /v1/events`` straight to the stream, past Starlette's middleware.

        Each of the three middleware layers wraps ``send`` in another coroutine; one event goes
        out once per follower, so on this route those layers are most of the per-send cost that
        is not the server's own.  Same validation and errors as every other route.
        """
        request = Request(scope, receive)
        try:
            since = _query_int(request, "since", 0)
            follow = _query_bool(request, "follow", False)
        except ApiError as e:
            await error_response(e.status, e.message, e.field, e.code)(scope, receive, send_)
            return
        status[0] = 200
        await EventStream(self.app.state, since, follow)(scope, receive, send)

    def _authorized(self, scope) -> bool:
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                scheme, _, cred = v.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(cred.strip(), self.token)
        return False


def create_app(node, events, metrics: Metrics | None = None, *, token: str | None = None,
               reattached: list[str] | None = None):
    """The ASGI app for ``node``.  ``token`` set: every request needs ``Authorization: Bearer``."""
    if metrics is None:
        metrics = Metrics()
        metrics.observe_node(node)
        metrics.watch(events)
    from ._migration_api import ROUTES as MIGRATION_ROUTES  # it imports this module

    app = Starlette(routes=ROUTES + MIGRATION_ROUTES, exception_handlers={
        ApiError: _api_error, HTTPException: _http_error, Exception: _internal})
    app.state.node = node
    app.state.events = events
    app.state.metrics = metrics
    app.state.reattached = list(reattached or [])
    app.state.lines = _LineCache()
    app.state.openapi = openapi()
    outer = _Outer(app, metrics, token)
    outer.state = app.state  # so callers can update e.g. reattached
    return outer


# -- OpenAPI -----------------------------------------------------------------------------------

def _spec_schemas() -> dict:
    """Instance spec JSON schema from the pydantic models, tightened with the validators' rules."""
    s = InstanceSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = s.pop("$defs", {})
    s["properties"]["name"]["pattern"] = NAME_RE.pattern
    for key in ("kernel", "initrd", "disk"):
        s["properties"][key] = {"anyOf": [{"type": "string", "pattern": "^/[^,\\x00]*$"}, {"type": "null"}],
                                "default": None}
    nic = defs.get("NicSpec", {})
    if nic:
        nic["properties"]["mac"] = {"anyOf": [{"type": "string", "pattern": "^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$"},
                                              {"type": "null"}], "default": None}
    defs["InstanceSpec"] = s
    return defs


_ERROR = {"type": "object", "required": ["error", "field"],
          "properties": {"error": {"type": "string"}, "field": {"type": ["string", "null"]},
                         "code": {"type": "string"}}}
_VIEW = {"type": "object", "required": ["name", "state", "nics"],
         "properties": {"name": {"type": "string"},
                        "state": {"enum": ["starting", "running", "paused", "migrating", "stopping",
                                           "stopped", "crashed", "failed"]},
                        "pid": {"type": ["integer", "null"]}, "nics": {"type": "array"},
                        "qmp_operator": {"type": "string"}, "error": {"type": ["string", "null"]}}}
_NAME_PARAM = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}


def _err(*codes: int) -> dict:
    text = {400: "Bad request", 401: "Unauthorized", 404: "Not found", 405: "Method not allowed",
            409: "Conflict", 413: "Body too large", 422: "Invalid spec, or start failed and was rolled back"}
    return {str(c): {"description": text[c],
                     "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            for c in codes}


def _ok(desc: str, schema: dict, code: int = 200, media: str = "application/json") -> dict:
    return {str(code): {"description": desc, "content": {media: {"schema": schema}}}}


def openapi() -> dict:
    from . import _migration_api  # it imports this module

    view = {"$ref": "#/components/schemas/InstanceView"}
    json_body = lambda ref, required: {"required": required, "content": {  # noqa: E731
        "application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "qsup node API", "version": "1"},
        "paths": {
            "/v1/health": {"get": {"summary": "Liveness and basic facts", "responses": {
                **_ok("OK", {"type": "object", "required": ["status"]})}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                **_ok("Prometheus text exposition", {"type": "string"}, media="text/plain")}}},
            "/v1/instances": {
                "get": {"summary": "List instances", "responses": {
                    **_ok("Instances", {"type": "object", "required": ["instances"],
                                        "properties": {"instances": {"type": "array", "items": view}}})}},
                "post": {"summary": "Create and start an instance; returns once it runs",
                         "requestBody": json_body("InstanceSpec", True),
                         "responses": {**_ok("Running", view, 201), **_err(400, 409, 413, 422)}},
            },
            "/v1/instances/{name}": {
                "parameters": [_NAME_PARAM],
                "get": {"summary": "One instance", "responses": {**_ok("The instance", view), **_err(404)}},
                "delete": {"summary": "Force-stop if alive, then forget", "responses": {
                    **_ok("Final view", view), **_err(404, 409)}},
            },
            "/v1/instances/{name}/stop": {
                "parameters": [_NAME_PARAM],
                "post": {"summary": "Stop (powerdown, then quit; force: SIGTERM)",
                         "requestBody": json_body("StopOptions", False),
                         "responses": {**_ok("Final view", view), **_err(400, 404, 413, 422)}},
            },
            "/v1/events": {"get": {
                "summary": "Events as NDJSON; follow keeps the stream open",
                "parameters": [
                    {"name": "since", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 0, "maximum": MAX_SEQ}},
                    {"name": "follow", "in": "query", "required": False,
                     "schema": {"type": "boolean"}}],
                "responses": {**_ok("One event object per line", {"type": "string"}, media=NDJSON),
                              **_err(400)}}},
        },
        "components": {"schemas": {
            **_spec_schemas(),
            "StopOptions": StopOptions.model_json_schema(),
            "InstanceView": _VIEW,
            "Error": _ERROR,
        }},
    }
    doc["paths"].update(_migration_api.openapi_paths(view, json_body, _ok, _err, _NAME_PARAM))
    doc["components"]["schemas"].update(_migration_api.openapi_schemas())
    return doc
