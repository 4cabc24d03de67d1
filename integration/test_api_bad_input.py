"""Schemathesis over the live daemon's own /openapi.json, on its unix socket: never a 5xx.

The daemon runs `qsup serve` in a fresh namespace.  Its ``qemu`` is ``/bin/false``: a spec that
passes validation is really started (taps opened, "QEMU" spawned) and then fails and is rolled
back -- so fuzzed specs exercise the whole start path, yet no fuzzed disk or kernel path is ever
booted.  Checks: no server error, status codes and content types as documented, response bodies
matching the documented schemas.  Bounded: ~12 examples per operation (positive and negative),
derandomized, well under 2 minutes.
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from requests.adapters import HTTPAdapter
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

from supervisor.api import openapi
from topo import Netns, QsupDaemon

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


class _UnixConnection(HTTPConnection):
    def __init__(self, path: str, **kw):
        super().__init__("localhost", **kw)
        self._unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(self._unix_path)
        self.sock = s


class _UnixPool(HTTPConnectionPool):
    def __init__(self, path: str):
        super().__init__("localhost")
        self._unix_path = path

    def _new_conn(self):
        return _UnixConnection(self._unix_path)


class UnixAdapter(HTTPAdapter):
    """requests over a unix socket (what schemathesis' transport speaks)."""

    def __init__(self, path: str):
        super().__init__()
        self._pool = _UnixPool(path)

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        return self._pool

    def get_connection(self, url, proxies=None):
        return self._pool


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    ns = Netns()
    dm = None
    try:
        dm = QsupDaemon(ns, tmp_path_factory.mktemp("fuzz"), extra_config='qemu = "/bin/false"\nqemu_user = ""\n')
        yield dm
    finally:
        leaked = dm.close() if dm else []
        ns.close()
        assert not leaked


@pytest.fixture(scope="module")
def session(live):
    s = requests.Session()
    s.mount("http://qsup/", UnixAdapter(str(live.socket)))
    yield s
    s.close()


# The schema is built in-process (the lazy from_fixture loader does not work with pytest 9);
# test_the_daemon_serves_this_schema checks it is exactly what the daemon serves.
schema = schemathesis.openapi.from_dict(openapi())


def test_the_daemon_serves_this_schema(live):
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(live.socket)), base_url="http://qsup") as c:
        assert c.get("/openapi.json").json() == json.loads(json.dumps(openapi()))


@schema.parametrize()
@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_input_gets_a_server_error(case, session, live):
    if case.path == "/v1/events" and str((case.query or {}).get("follow", "")).lower() in ("true", "1", "yes"):
        case.query["follow"] = "false"  # a followed stream never ends; following is tested elsewhere
    resp = case.call(session=session, base_url="http://qsup", timeout=60)
    case.validate_response(resp, checks=CHECKS)


def test_after_fuzzing_nothing_is_left(live, session):
    """Runs after the fuzz cases (file order): no instance, record or tap survived them."""
    r = session.get("http://qsup/v1/instances")
    assert r.status_code == 200
    assert all(v["state"] in ("stopped", "crashed", "failed") for v in r.json()["instances"])
    inst = live.state_dir / "instances"
    assert not inst.exists() or not any(inst.iterdir())
    assert not [l for l in live.ns.links() if l.startswith("qs")], live.ns.links()
    assert session.get("http://qsup/v1/health").json()["status"] == "ok"
