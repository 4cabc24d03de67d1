"""Roles on every route (issue 16, finding 1): the operator, a declared peer, an unknown certificate.

The table (``_routes.ACCESS``) covers every operation and the OpenAPI document states it; a real
node (fake QEMU, no root) behind the TCP app, the client certificate's name put into the scope as
the TLS listener's layer (``supervisor._daemon.PeerAuth``) does.  integration/test_authz.py makes
the same calls with real certificates against real daemons.
"""

from __future__ import annotations

import httpx
import pytest
import trio

from core_harness import Bench, spec, wait_for
from supervisor._config import load_config
from supervisor._records import read_json
from supervisor._spec import SpecError
from supervisor.api import create_app, openapi
from supervisor.api._authz import Access
from supervisor.api._routes import ACCESS, ROUTES

TOKEN = "authz-token-0123456789abcdef"
PEERS = {"node-b": "unix:/nonexistent/b.sock", "node-c": "unix:/nonexistent/c.sock"}


def _operations() -> dict[str, tuple[str, str]]:
    """operationId -> (METHOD, path) of every route."""
    return {op.operation["operationId"]: (method, r.path) for r in ROUTES for method, op in r.ops.items()}


# -- the table ------------------------------------------------------------------------------------

def test_every_operation_has_a_role_entry_and_the_table_nothing_else():
    assert set(ACCESS) == set(_operations())
    assert all(isinstance(a, Access) for a in ACCESS.values())


def test_the_openapi_document_states_who_may_call_each_operation():
    doc = openapi(authenticated=True)
    ops = {op["operationId"]: op for item in doc["paths"].values() for k, op in item.items() if k != "parameters"}
    assert set(ops) == set(ACCESS)
    for op_id, op in ops.items():
        assert op["x-qsup-roles"] == ACCESS[op_id].roles, op_id
        assert "Roles:" in op["description"], op_id
        assert "403" in op["responses"], op_id
    assert "forbidden" in doc["components"]["schemas"]["Error"]["properties"]["code"]["enum"]
    # a peer may only take part in migrations to this node
    assert {i for i, a in ACCESS.items() if a is not Access.OPERATOR} == {
        "prepare_incoming", "abort_incoming", "recover_postcopy", "confirm_release", "show_instance"}
    # the route definitions are not changed by building the document
    assert not any("x-qsup-roles" in op.operation for r in ROUTES for op in r.ops.values())


# -- the config -----------------------------------------------------------------------------------

def test_operators_key_default_names_and_no_overlap_with_peers():
    assert load_config(None).operators == [] and load_config(None).http_max_connections == 512
    assert load_config(None, operators=["admin", "ops.team-1"]).operators == ["admin", "ops.team-1"]
    with pytest.raises(SpecError) as e:
        load_config(None, operators=["bad name"])
    assert e.value.field.startswith("operators")
    with pytest.raises(SpecError) as e:
        load_config(None, operators=["node-b"], peers=PEERS)
    assert e.value.field == "operators" and "node-b" in str(e.value)
    with pytest.raises(SpecError) as e:
        load_config(None, http_max_connections=0)
    assert e.value.field == "http_max_connections"


# -- a node behind the TCP app ---------------------------------------------------------------------

def _with_node(tmp_path, body, **cfg):
    """``body(call, b)`` against node "b" (fake QEMU) behind the TCP app; ``call(cert, method, path,
    json=None, token=None)`` makes one request as the certificate ``cert`` (None: no certificate)."""
    b = Bench(tmp_path, "b", peers=PEERS, operators=["admin"], **cfg)

    async def main():
        async with b.running():
            app = create_app(b.node, b.events, token=TOKEN)
            cert: list[str | None] = [None]

            async def listener(scope, receive, send):  # what PeerAuth does on the TLS listener
                if scope["type"] == "http" and cert[0] is not None:
                    scope = {**scope, "qsup.cert_name": cert[0]}
                await app(scope, receive, send)

            transport = httpx.ASGITransport(app=listener)
            async with httpx.AsyncClient(transport=transport, base_url="https://qsup") as client:

                async def call(who, method, path, json=None, token=None):
                    cert[0] = who
                    headers = {"authorization": f"Bearer {token}"} if token else {}
                    return await client.request(method, path, json=json, headers=headers)

                try:
                    await body(call, b)
                finally:
                    await b.node.stop_all(timeout=1)

    trio.run(main)
    return b


def _path(path: str) -> str:
    return path.replace("{name}", "vm1")


def test_a_peer_gets_403_on_every_operator_route_naming_itself_and_the_route(tmp_path):
    async def body(call, b):
        await b.node.prepare_incoming(spec(tmp_path, "vm1"), source="node-b")  # even on its own incoming
        for op_id, (method, path) in _operations().items():
            if ACCESS[op_id] is not Access.OPERATOR:
                continue
            r = await call("node-b", method, _path(path), json={} if method == "POST" else None)
            assert r.status_code == 403, (op_id, r.status_code, r.text)
            assert r.json() == {"error": f"peer node-b may not {method} {_path(path)}", "field": None,
                                "code": "forbidden"}, op_id
        r = await call("node-b", "DELETE", "/v1/instances/x")  # the example, word for word
        assert r.json() == {"error": "peer node-b may not DELETE /v1/instances/x", "field": None, "code": "forbidden"}
        assert (await call("node-b", "GET", "/nope")).status_code == 403  # no route: still not the operator's
        # a peer's certificate with the bearer token is still the peer: the certificate decides
        assert (await call("node-b", "GET", "/v1/instances", token=TOKEN)).status_code == 403
        assert b.node.instances["vm1"].state.value == "migrating"  # nothing happened

    _with_node(tmp_path, body)


def test_a_peer_drives_only_the_incomings_it_prepared(tmp_path):
    async def body(call, b):
        # node-c prepares one through the API (from itself: no source named)
        r = await call("node-c", "POST", "/v1/migrations/incoming", {"spec": {"name": "vm1", "memory": 64,
                                                                              "kernel": str(tmp_path / "vmlinuz")}})
        assert r.status_code == 201, r.text
        assert b.node.instances["vm1"].migration.source == "node-c"
        for method, path in (("GET", "/v1/instances/vm1"), ("POST", "/v1/migrations/incoming/vm1/abort"),
                             ("POST", "/v1/migrations/incoming/vm1/released"),
                             ("POST", "/v1/migrations/incoming/vm1/recover")):
            r = await call("node-b", method, path)
            assert r.status_code == 403 and r.json()["code"] == "forbidden", (path, r.text)
            assert r.json()["error"] == f"peer node-b may not {method} {path} (not an incoming migration it prepared)"
        for method, path in (("GET", "/v1/instances/nothing"), ("POST", "/v1/migrations/incoming/nothing/abort")):
            assert (await call("node-b", method, path)).status_code == 403  # absent: no answer tells it apart
        # node-b may not prepare one naming another source; nothing is prepared
        r = await call("node-b", "POST", "/v1/migrations/incoming",
                       {"spec": {"name": "vm2", "memory": 64, "kernel": str(tmp_path / "vmlinuz")}, "source": "node-c"})
        assert r.status_code == 403 and r.json()["field"] == "source", r.text
        assert "vm2" not in b.node.instances
        # the owner: sees it, confirms the release, aborts it; may not delete it
        r = await call("node-c", "GET", "/v1/instances/vm1")
        assert r.status_code == 200 and r.json()["migration"]["source"] == "node-c"
        assert (await call("node-c", "POST", "/v1/migrations/incoming/vm1/released")).status_code == 200
        assert (await call("node-c", "DELETE", "/v1/instances/vm1")).status_code == 403
        r = await call("node-c", "POST", "/v1/migrations/incoming/vm1/abort")
        assert r.status_code == 200, r.text
        await wait_for(lambda: b.node.instances["vm1"].state.is_final)
        # the operator (token, or a certificate in operators) may do all of it
        assert (await call("admin", "GET", "/v1/instances")).status_code == 200
        assert (await call(None, "GET", "/v1/instances/vm1", token=TOKEN)).status_code == 200
        assert (await call(None, "GET", "/v1/instances")).status_code == 401
        # the operator may prepare for a declared peer, not for anybody
        r = await call(None, "POST", "/v1/migrations/incoming", {"spec": {"name": "vm3", "memory": 64,
                                                                          "kernel": str(tmp_path / "vmlinuz")},
                                                                 "source": "nobody"}, token=TOKEN)
        assert r.status_code == 422 and r.json()["field"] == "source", r.text

    spec(tmp_path)  # the kernel file
    _with_node(tmp_path, body)


def test_the_preparing_peer_survives_a_daemon_restart(tmp_path):
    b = Bench(tmp_path, "b", peers=PEERS)

    async def first():
        async with b.running():
            await b.node.prepare_incoming(spec(tmp_path, "vm1"), source="node-b")
        assert read_json(b.node.layout.record_path("vm1"))["migration"]["source"] == "node-b"

    async def second():
        async with b.running():
            inst = b.node.instances["vm1"]
            assert inst.migration.source == "node-b" and inst.view()["migration"]["source"] == "node-b"
            await inst.abort_incoming()
            await wait_for(lambda: inst.state.is_final)

    trio.run(first)
    trio.run(second)
    assert b.state_left() == []


def test_an_unknown_certificate_gets_403_everywhere(tmp_path):
    async def body(call, b):
        for op_id, (method, path) in _operations().items():
            r = await call("stranger", method, _path(path), token=TOKEN)  # the token does not help
            assert r.status_code == 403, (op_id, r.text)
            assert r.json()["error"] == (f"certificate 'stranger' (neither a declared peer nor in operators) "
                                         f"may not {method} {_path(path)}")
        assert (await call("stranger", "GET", "/nope")).status_code == 403

    _with_node(tmp_path, body)


def test_websocket_and_other_scopes_are_refused_outright(tmp_path):
    async def body(call, b):
        app = create_app(b.node, b.events, token=TOKEN)
        sent = []

        async def receive():
            return {"type": "websocket.connect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "websocket", "path": "/v1/events", "headers": [(b"authorization", f"Bearer {TOKEN}".encode())],
                 "query_string": b"", "root_path": ""}
        await app(scope, receive, send)
        assert sent == [{"type": "websocket.close", "code": 1008}]
        sent.clear()
        await app({"type": "something-new"}, receive, send)
        assert sent == []

    _with_node(tmp_path, body)
