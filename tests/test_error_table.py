"""One table of error answers (``supervisor/api/_errors.py``): every status and ``code`` the server
sends comes from :class:`ErrorKind`, and the OpenAPI ``Error`` schema's ``code`` enum is built from it.

Checked three ways: the enum is exactly the table's codes; no module of the API builds an error body
or an :class:`HttpError` except through the table (``ast``); and the answers the outer layer makes
itself (503 ``busy``, 401, Starlette's 404/405, 400 on the events fast path) and the body
timeout (408 ``timeout``) are valid ``Error`` objects.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from types import SimpleNamespace

import jsonschema_rs
import pytest
import trio
from starlette.requests import Request

from supervisor.api import HttpLimits, Metrics, create_app, openapi
from supervisor.api import _request as request_mod
from supervisor.api._errors import ERROR_TABLE, ErrorKind, HttpError, http_error

API = Path(__file__).resolve().parent.parent / "supervisor" / "api"
DOC = openapi()
ERROR = jsonschema_rs.Draft202012Validator({"$ref": "#/components/schemas/Error", "components": DOC["components"]})


def test_the_schema_enum_is_the_table():
    enum = DOC["components"]["schemas"]["Error"]["properties"]["code"]["enum"]
    assert enum == sorted({k.code for k in ErrorKind})
    assert {"busy", "timeout"} <= set(enum)  # the two the schema used to lack
    assert all(isinstance(k, ErrorKind) for k in ERROR_TABLE.values())
    assert openapi(authenticated=True)["components"]["schemas"]["Error"] == DOC["components"]["schemas"]["Error"]


def test_kinds_are_distinct_and_statuses_are_errors():
    assert len({k.code for k in ErrorKind}) == len(ErrorKind)
    assert all(400 <= k.status < 600 for k in ErrorKind)
    # what Starlette raises itself, and a status the table lacks (still a code from the table)
    assert ErrorKind.for_status(404) is ErrorKind.NOT_FOUND
    assert ErrorKind.for_status(405) is ErrorKind.METHOD_NOT_ALLOWED
    assert ErrorKind.for_status(418) is ErrorKind.BAD_REQUEST and ErrorKind.for_status(502) is ErrorKind.INTERNAL


@pytest.mark.parametrize("exc_type", list(ERROR_TABLE), ids=lambda t: t.__name__)
def test_every_known_error_answers_from_the_table(exc_type):
    exc = exc_type("vm1") if exc_type.__name__ == "NotFound" else exc_type("bad", "name")
    e = http_error(exc)
    assert e.kind is ERROR_TABLE[exc_type] and ERROR.is_valid(json.loads(e.response().body))


def _api_modules() -> list[Path]:
    mods = sorted(API.glob("*.py"))
    assert {"_errors.py", "_asgi.py", "_request.py", "_routes.py", "_migration_routes.py"} <= {p.name for p in mods}
    return mods


def _is_kind(node: ast.expr) -> bool:
    """``ErrorKind.X``, ``ErrorKind.for_status(...)``, or a table row (``kind`` in _errors.py)."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ErrorKind":
        return node.attr in ErrorKind.__members__
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return isinstance(node.func.value, ast.Name) and node.func.value.id == "ErrorKind"
    return isinstance(node, ast.Name) and node.id == "kind"


def test_every_error_answer_is_built_from_the_table():
    bodies, raised = [], 0
    for path in _api_modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Dict):  # an error body; not a schema's properties (dicts as values)
                items = {k.value: v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)}
                if "code" in items and "error" in items and not isinstance(items["code"], ast.Dict):
                    bodies.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "HttpError":
                kinds = [kw.value for kw in node.keywords if kw.arg == "kind"]
                assert len(kinds) == 1 and _is_kind(kinds[0]), f"{path.name}:{node.lineno}: HttpError without a kind"
                raised += 1
    assert bodies == [f"_errors.py:{_response_line()}"], bodies  # HttpError.response, nowhere else
    assert raised >= 20, raised


def _response_line() -> int:
    tree = ast.parse((API / "_errors.py").read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "response")
    return next(n.lineno for n in ast.walk(fn) if isinstance(n, ast.Dict))


async def _call(app, method: str, path: str, query: bytes = b"", headers=()) -> tuple[int, dict]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": query,
             "headers": list(headers), "root_path": "", "scheme": "http", "server": ("qsup", 80),
             "client": ("127.0.0.1", 1), "http_version": "1.1", "asgi": {"version": "3.0"}}
    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


def _app(**kw):
    return create_app(SimpleNamespace(), SimpleNamespace(), Metrics(), **kw)


@pytest.mark.parametrize("case", [
    ("busy", dict(limits=HttpLimits(max_requests=0)), "GET", "/v1/health", b"", 503),
    ("followers", dict(limits=HttpLimits(max_followers=0)), "GET", "/v1/events", b"follow=true", 503),
    ("unauthorized", dict(token="s3cret"), "GET", "/v1/health", b"", 401),
    ("no-route", {}, "GET", "/nope", b"", 404),
    ("method", {}, "PUT", "/v1/instances", b"", 405),
    ("bad-query", {}, "GET", "/v1/events", b"since=x", 400),
], ids=lambda c: c[0])
def test_answers_the_outer_layer_makes_itself_are_valid_errors(case):
    _, kw, method, path, query, status = case
    got, body = trio.run(_call, _app(**kw), method, path, query)
    assert got == status and ERROR.is_valid(body), (got, body)
    assert body["code"] in {k.code for k in ErrorKind if k.status == status}


def test_a_body_that_does_not_arrive_in_time_is_a_valid_timeout(monkeypatch):
    monkeypatch.setattr(request_mod, "BODY_TIMEOUT", 0.01)

    async def receive():
        await trio.sleep(1)
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def go() -> HttpError:
        req = Request({"type": "http", "method": "POST", "path": "/", "query_string": b"",
                       "headers": [(b"content-type", b"application/json")]}, receive)
        with pytest.raises(HttpError) as e:
            await request_mod.read_json(req)
        return e.value

    e = trio.run(go)
    body = json.loads(e.response().body)
    assert (e.status, body["code"]) == (408, "timeout") and ERROR.is_valid(body), body
