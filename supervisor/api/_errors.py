"""The one table of error answers, and the error answer itself.

Error answers are always ``{"error": "<one line>", "field": <dotted field or null>, "code": "<slug>"}``.
Every one of them is built from :class:`ErrorKind` -- the situation, its HTTP status and its
``code`` -- and so is the OpenAPI ``Error`` schema's ``code`` enum (``_openapi.ERROR``): the server
cannot send a code the schema does not list.

Of the core's exceptions, only those in :data:`ERROR_TABLE` -- ones the node raises on purpose,
whose message is meant for the caller -- become 4xx answers.  Anything else is a bug: the app
answers 500 ``internal`` and logs the traceback (see ``_asgi._Outer``).  A catch-all that turned
every failure into a 4xx would hide bugs from the API fuzz tests, which can only see 5xx.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from starlette.responses import JSONResponse

from .._errors import FieldError
from .._hotplug import DiskChangeFailed, DiskConflict
from .._instance import StartError
from .._migration import MigrationError
from .._nicplug import NicChangeFailed, NicConflict
from .._node import Conflict, NotFound
from .._spec import SpecError
from .._upgrade import UpgradeConflict, UpgradeError


class ErrorKind(enum.Enum):
    """Every error answer the API sends: (HTTP status, ``code``, text put before the message)."""

    BAD_REQUEST = 400, "bad_request"  # malformed JSON, not an object, wrong content type, bad query parameter
    UNAUTHORIZED = 401, "unauthorized"  # the TCP listener without the right bearer token
    FORBIDDEN = 403, "forbidden"  # the caller's role may not make this request (api/_authz.py)
    NOT_FOUND = 404, "not_found"  # unknown instance or route
    METHOD_NOT_ALLOWED = 405, "method_not_allowed"  # (with ``Allow``)
    TIMEOUT = 408, "timeout"  # the body did not arrive within BODY_TIMEOUT
    CONFLICT = 409, "conflict"  # the name is taken by a live instance; a migration refused
    TOO_LARGE = 413, "too_large"  # body over MAX_BODY
    INVALID_SPEC = 422, "invalid_spec"  # the spec (or a body) failed validation, incl. host checks
    START_FAILED = 422, "start_failed", "start failed (rolled back): "  # valid, but QEMU/netconf failed
    CHANGE_FAILED = 422, "change_failed"  # a live change QEMU refused (undone) or the guest did not allow
    INTERNAL = 500, "internal"  # a bug: logged with its traceback
    UNAVAILABLE = 503, "unavailable"  # the daemon is shutting down
    BUSY = 503, "busy"  # over http_max_requests / http_max_followers (with Retry-After)

    def __init__(self, status: int, code: str, prefix: str = "") -> None:
        self.status = status
        self.code = code
        self.prefix = prefix

    @classmethod
    def for_status(cls, status: int) -> ErrorKind:
        """The kind for an HTTP status Starlette raised itself (404, 405); a 4xx the table lacks is
        ``bad_request``, anything else ``internal``."""
        for kind in cls:
            if kind.status == status:
                return kind
        return cls.BAD_REQUEST if 400 <= status < 500 else cls.INTERNAL


#: The core's *known* errors, by class (looked up along the MRO), and how each is answered.  Their
#: messages already name the field (``nics[0].link: ...``) and ``.field`` carries it.
ERROR_TABLE: dict[type[BaseException], ErrorKind] = {
    SpecError: ErrorKind.INVALID_SPEC,
    Conflict: ErrorKind.CONFLICT,
    NotFound: ErrorKind.NOT_FOUND,
    StartError: ErrorKind.START_FAILED,
    MigrationError: ErrorKind.CONFLICT,
    DiskConflict: ErrorKind.CONFLICT,
    DiskChangeFailed: ErrorKind.CHANGE_FAILED,
    UpgradeConflict: ErrorKind.CONFLICT,
    UpgradeError: ErrorKind.CHANGE_FAILED,
    NicConflict: ErrorKind.CONFLICT,
    NicChangeFailed: ErrorKind.CHANGE_FAILED,
}


class HttpError(FieldError):
    """An error answer: one-line message, the offending field (or None), its :class:`ErrorKind`.

    (The CLI's client has its own exception for the answers it *receives*; this one is raised
    by the server to *send* one.)
    """

    field_in_text = False  # the answer carries the field apart

    def __init__(self, message: str, field: str | None = None, *, kind: ErrorKind,
                 headers: Mapping[str, str] | None = None):
        super().__init__(one_line(message), field)
        self.kind = kind
        self.headers = headers

    @property
    def status(self) -> int:
        return self.kind.status

    @property
    def code(self) -> str:
        return self.kind.code

    def response(self) -> JSONResponse:
        """The answer; the one place an error body is built."""
        return JSONResponse({"error": self.message, "field": self.field, "code": self.kind.code}, self.kind.status,
                            headers=self.headers)


def one_line(text: str, limit: int = 1000) -> str:
    s = " | ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def kind_for(exc: BaseException) -> ErrorKind | None:
    """``exc``'s row of :data:`ERROR_TABLE` (along its MRO), None if it is not a known error."""
    for cls in type(exc).__mro__:
        kind = ERROR_TABLE.get(cls)
        if kind is not None:
            return kind
    return None


def internal_error(exc: BaseException) -> HttpError:
    """500 ``internal`` for a bug: its type only (the traceback goes to the log, not the client)."""
    return HttpError(f"internal error: {type(exc).__name__}", kind=ErrorKind.INTERNAL)


def http_error(exc: BaseException, *, field_prefix: str = "") -> HttpError:
    """The answer for ``exc``: its table entry, or 500 ``internal`` for anything not in it.

    ``field_prefix`` places the field inside the request body (``spec`` for a nested spec).
    """
    if isinstance(exc, HttpError):
        return exc
    kind = kind_for(exc)
    if kind is None:
        return internal_error(exc)
    field = exc.field if isinstance(exc, FieldError) else None
    message = str(exc)
    if field_prefix:
        message = f"{field_prefix}.{message}" if field else f"{field_prefix}: {message}"
        field = f"{field_prefix}.{field}" if field else field_prefix
    return HttpError(kind.prefix + message, field, kind=kind)
