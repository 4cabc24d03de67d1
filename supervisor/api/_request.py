"""Request helpers for the HTTP API, and the one table that maps errors to HTTP answers.

``_api.py`` (instances, events, health) and ``_migration_api.py`` (migration routes) both build on
this module and never import each other.

Error answers are always ``{"error": "<one line>", "field": <dotted field or null>, "code": "<slug>"}``.
Only the errors in :data:`ERROR_TABLE` -- ones the node raises on purpose, whose message is meant
for the caller -- become 4xx answers.  Anything else is a bug: the app answers 500 ``internal``
and logs the traceback (see ``_api._Outer``).  A catch-all that turned every failure into a 4xx
would hide bugs from the API fuzz tests, which can only see 5xx.

Routes are :class:`ApiRoute`: one per path, listing all of its methods, so that a 405 carries
the right ``Allow`` header; each method carries its own OpenAPI operation, so ``/openapi.json``
is generated from the route list and cannot drift from it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import trio
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._instance import StartError
from ._migration import MigrationError
from ._node import Conflict, NotFound
from ._spec import NAME_RE, SpecError, _loc, _message, valid_name

#: seconds a client has to send a body (at most MAX_BODY bytes): a trickled body can't hold a handler
BODY_TIMEOUT = 30.0
MAX_BODY = 64 * 1024
MAX_SEQ = 2**63 - 1
NDJSON = "application/x-ndjson"

#: the ``code`` of an error answer when the raiser gave none
STATUS_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                408: "timeout", 409: "conflict", 413: "too_large", 422: "invalid_spec", 500: "internal",
                503: "unavailable"}


class HttpError(Exception):
    """An error answer: HTTP status, one-line message, the offending field (or None), a code slug.

    (The CLI's client has its own exception for the answers it *receives*; this one is raised
    by the server to *send* one.)
    """

    def __init__(self, status: int, message: str, field: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = one_line(message)
        self.field = field or None
        self.code = code or STATUS_CODES.get(status, "error")
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message, "field": self.field, "code": self.code}, self.status,
                            headers=self.headers)


def one_line(text: str, limit: int = 1000) -> str:
    s = " | ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def error_response(status: int, message: str, field: str | None = None, code: str | None = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    return HttpError(status, message, field, code, headers).response()


# -- the error table ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ErrorMapping:
    status: int
    code: str
    prefix: str = ""  # put before the exception's own message


#: The *known* errors, by class (looked up along the MRO), and how each is answered.  Their
#: messages already name the field (``nics[0].link: ...``) and ``.field`` carries it.
ERROR_TABLE: dict[type[BaseException], ErrorMapping] = {
    SpecError: ErrorMapping(422, "invalid_spec"),
    Conflict: ErrorMapping(409, "conflict"),
    NotFound: ErrorMapping(404, "not_found"),
    StartError: ErrorMapping(422, "start_failed", "start failed (rolled back): "),
    MigrationError: ErrorMapping(409, "conflict"),
}


def mapping_for(exc: BaseException) -> ErrorMapping | None:
    for cls in type(exc).__mro__:
        m = ERROR_TABLE.get(cls)
        if m is not None:
            return m
    return None


def http_error(exc: BaseException, *, field_prefix: str = "") -> HttpError:
    """The answer for ``exc``: its table entry, or 500 ``internal`` for anything not in it.

    ``field_prefix`` places the field inside the request body (``spec`` for a nested spec).
    """
    if isinstance(exc, HttpError):
        return exc
    m = mapping_for(exc)
    if m is None:
        return HttpError(500, f"internal error: {type(exc).__name__}", None, "internal")
    field: str | None
    if isinstance(exc, NotFound):
        field, message = "name", str(exc)
    else:
        field, message = getattr(exc, "field", None) or None, str(exc)
    if field_prefix:
        message = f"{field_prefix}.{message}" if field else f"{field_prefix}: {message}"
        field = f"{field_prefix}.{field}" if field else field_prefix
    return HttpError(m.status, m.prefix + message, field, m.code)


# -- request parsing ---------------------------------------------------------------------------

def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _number(text: str) -> float | int:
    """A JSON number with a fraction or exponent: an integral value is an int (``64.0`` is 64).

    JSON has one number type, and JSON Schema's ``integer`` is any number with a zero fraction;
    the models are strict (no "64" for 64, no 1.5 for an int), so the one place that decides what
    a number *is* is here, the same way for every body.
    """
    f = float(text)
    return int(f) if f.is_integer() and abs(f) < 2**63 else f


async def read_json(request: Request, *, required: bool = True) -> object | None:
    """The body as decoded JSON, enforcing size, content type and strict JSON; None if empty."""
    length = request.headers.get("content-length")
    if length is not None:
        if not (length.isascii() and length.isdigit()):
            raise HttpError(400, "invalid Content-Length")
        if int(length) > MAX_BODY:
            raise HttpError(413, f"request body over {MAX_BODY} bytes")
    body = bytearray()
    try:
        with trio.fail_after(BODY_TIMEOUT):
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY:
                    raise HttpError(413, f"request body over {MAX_BODY} bytes")
    except ClientDisconnect:
        raise HttpError(400, "client disconnected while sending the body") from None
    except trio.TooSlowError:
        raise HttpError(408, f"request body not received within {BODY_TIMEOUT:g}s") from None
    if not body:
        if required:
            raise HttpError(400, "a JSON request body is required")
        return None
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise HttpError(400, f"Content-Type must be application/json, not {media or 'missing'!r}")
    try:
        return json.loads(bytes(body).decode("utf-8"), parse_constant=_reject_constant, parse_float=_number)
    except UnicodeDecodeError:
        raise HttpError(400, "body is not UTF-8") from None
    except RecursionError:
        raise HttpError(400, "malformed JSON: nested too deeply") from None
    except ValueError as e:
        raise HttpError(400, f"malformed JSON: {e}") from None


def query_int(request: Request, key: str, default: int) -> int:
    raw = request.query_params.get(key)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) > MAX_SEQ:
        raise HttpError(400, f"{key} must be a non-negative integer, got {raw[:40]!r}", key)
    return int(raw)


def query_bool(request: Request, key: str, default: bool) -> bool:
    raw = request.query_params.get(key)
    if raw is None:
        return default
    v = raw.lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise HttpError(400, f"{key} must be true or false, got {raw[:40]!r}", key)


def validate_body(model: type[BaseModel], data: object, what: str = "the body"):
    """``data`` (decoded JSON) as a ``model``; 400 if not an object, 422 naming the field."""
    if not isinstance(data, dict):
        raise HttpError(400, f"{what} must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise HttpError(422, f"{_loc(err['loc'])}: {_message(err)}", _loc(err["loc"]), "invalid_spec") from None


def refuse_while_stopping(request: Request) -> None:
    """503 once the daemon has begun to shut down (``app.state.stopping``): start nothing new."""
    if getattr(request.app.state, "stopping", False):
        raise HttpError(503, "the daemon is shutting down", None, "unavailable")


def node(request: Request):
    return request.app.state.node


def instance(request: Request):
    """The instance named by the ``{name}`` path parameter; 404 if there is none."""
    name = request.path_params["name"]
    if not valid_name(name):
        raise HttpError(404, f"no instance named {name[:80]!r} (not a valid name)", "name")
    return node(request).get(name)  # NotFound -> 404 through the table


# -- routes that carry their OpenAPI operations ------------------------------------------------

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Op:
    """One method of one path: its handler and its OpenAPI operation object."""

    handler: Handler
    operation: dict = field(default_factory=dict)


class ApiRoute(Route):
    """One route per path, with every method it serves (so a 405's ``Allow`` is complete)."""

    def __init__(self, path: str, ops: dict[str, Op], *, parameters: list | None = None):
        self.ops = {m.upper(): op for m, op in ops.items()}
        self.parameters = parameters or []
        handlers = {m: op.handler for m, op in self.ops.items()}
        if "GET" in handlers:
            handlers.setdefault("HEAD", handlers["GET"])

        async def dispatch(request: Request) -> Response:
            return await handlers[request.method](request)

        dispatch.__name__ = "_".join(op.handler.__name__ for op in self.ops.values())
        super().__init__(path, dispatch, methods=list(self.ops))

    def path_item(self) -> dict:
        """This path's OpenAPI path item."""
        item: dict = {}
        if self.parameters:
            item["parameters"] = self.parameters
        for method, op in self.ops.items():
            item[method.lower()] = op.operation
        return item


# -- OpenAPI building blocks -------------------------------------------------------------------

def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def json_body(name: str, required: bool = True) -> dict:
    return {"required": required, "content": {"application/json": {"schema": ref(name)}}}


def ok(description: str, schema: dict, code: int = 200, media: str = "application/json",
       headers: dict | None = None, links: dict | None = None) -> dict:
    out = {"description": description, "content": {media: {"schema": schema}}}
    if headers:
        out["headers"] = headers
    if links:
        out["links"] = links
    return {str(code): out}


def links_by_name(*operation_ids: str) -> dict:
    """OpenAPI links from an answer that names an instance to the operations on it."""
    return {op: {"operationId": op, "parameters": {"name": "$response.body#/name"}} for op in operation_ids}


_ERROR_TEXT = {
    400: "Bad request: malformed JSON, not an object, wrong content type, bad query parameter",
    401: "Unauthorized: the TCP listener needs the bearer token (or a client certificate)",
    404: "Not found: no such instance",
    409: "Conflict: the name is taken, or the migration was refused",
    413: "Request body over 64 KiB",
    422: "Invalid (the field is named), or the start failed and was rolled back (code start_failed)",
    503: "The daemon is shutting down (code unavailable), or over http_max_requests / http_max_followers "
         "(code busy, with Retry-After)",
}


def errors(*codes: int) -> dict:
    """Error answers for an operation; 401 is on every operation (the TCP listener)."""
    return {str(c): {"description": _ERROR_TEXT[c], "content": {"application/json": {"schema": ref("Error")}}}
            for c in sorted({401, *codes})}


NAME_PARAM = {"name": "name", "in": "path", "required": True, "description": "The instance name",
              "schema": {"type": "string", "pattern": NAME_RE.pattern, "maxLength": 63}}
