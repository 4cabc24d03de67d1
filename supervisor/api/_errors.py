"""The one table that maps errors to HTTP answers, and the error answer itself.

Error answers are always ``{"error": "<one line>", "field": <dotted field or null>, "code": "<slug>"}``.
Only the errors in :data:`ERROR_TABLE` -- ones the node raises on purpose, whose message is meant
for the caller -- become 4xx answers.  Anything else is a bug: the app answers 500 ``internal``
and logs the traceback (see ``_asgi._Outer``).  A catch-all that turned every failure into a 4xx
would hide bugs from the API fuzz tests, which can only see 5xx.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from starlette.responses import JSONResponse

from .._instance import StartError
from .._migration import MigrationError
from .._node import Conflict, NotFound
from .._spec import SpecError

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
