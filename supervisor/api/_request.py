"""Request helpers for the HTTP API: the body (size, time, strict JSON), query parameters, the node.

Every route module (``_routes.py``, ``_migration_routes.py``) builds on this module; what goes
wrong here is an :class:`~._errors.HttpError`.
"""

from __future__ import annotations

import json

import trio
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from .._spec import _loc, _message, valid_name
from ._errors import ErrorKind, HttpError

#: seconds a client has to send a body (at most MAX_BODY bytes): a trickled body can't hold a handler
BODY_TIMEOUT = 30.0
MAX_BODY = 64 * 1024
MAX_SEQ = 2**63 - 1
NDJSON = "application/x-ndjson"


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
            raise HttpError("invalid Content-Length", kind=ErrorKind.BAD_REQUEST)
        if int(length) > MAX_BODY:
            raise HttpError(f"request body over {MAX_BODY} bytes", kind=ErrorKind.TOO_LARGE)
    body = bytearray()
    try:
        with trio.fail_after(BODY_TIMEOUT):
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY:
                    raise HttpError(f"request body over {MAX_BODY} bytes", kind=ErrorKind.TOO_LARGE)
    except ClientDisconnect:
        raise HttpError("client disconnected while sending the body", kind=ErrorKind.BAD_REQUEST) from None
    except trio.TooSlowError:
        raise HttpError(f"request body not received within {BODY_TIMEOUT:g}s", kind=ErrorKind.TIMEOUT) from None
    if not body:
        if required:
            raise HttpError("a JSON request body is required", kind=ErrorKind.BAD_REQUEST)
        return None
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise HttpError(f"Content-Type must be application/json, not {media or 'missing'!r}",
                        kind=ErrorKind.BAD_REQUEST)
    try:
        value = json.loads(bytes(body).decode("utf-8"), parse_constant=_reject_constant, parse_float=_number)
    except UnicodeDecodeError:
        raise HttpError("body is not UTF-8", kind=ErrorKind.BAD_REQUEST) from None
    except RecursionError:
        raise HttpError("malformed JSON: nested too deeply", kind=ErrorKind.BAD_REQUEST) from None
    except ValueError as e:
        raise HttpError(f"malformed JSON: {e}", kind=ErrorKind.BAD_REQUEST) from None
    if value is None:  # a body of ``null`` is not "no body": None means absent to the caller
        raise HttpError("the body must be a JSON object, not null", kind=ErrorKind.BAD_REQUEST)
    return value


def query_int(request: Request, key: str, default: int) -> int:
    raw = request.query_params.get(key)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) > MAX_SEQ:
        raise HttpError(f"{key} must be a non-negative integer, got {raw[:40]!r}", key, kind=ErrorKind.BAD_REQUEST)
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
    raise HttpError(f"{key} must be true or false, got {raw[:40]!r}", key, kind=ErrorKind.BAD_REQUEST)


def validate_body(model: type[BaseModel], data: object, what: str = "the body"):
    """``data`` (decoded JSON) as a ``model``; 400 if not an object, 422 naming the field."""
    if not isinstance(data, dict):
        raise HttpError(f"{what} must be a JSON object", kind=ErrorKind.BAD_REQUEST)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise HttpError(f"{_loc(err['loc'])}: {_message(err)}", _loc(err["loc"]), kind=ErrorKind.INVALID_SPEC) from None


def refuse_while_stopping(request: Request) -> None:
    """503 once the daemon has begun to shut down (``app.state.stopping``): start nothing new."""
    if getattr(request.app.state, "stopping", False):
        raise HttpError("the daemon is shutting down", kind=ErrorKind.UNAVAILABLE)


def node(request: Request):
    return request.app.state.node


def instance(request: Request):
    """The instance named by the ``{name}`` path parameter; 404 if there is none."""
    name = request.path_params["name"]
    if not valid_name(name):
        raise HttpError(f"no instance named {name[:80]!r} (not a valid name)", "name", kind=ErrorKind.NOT_FOUND)
    return node(request).get(name)  # NotFound -> 404 through the table
