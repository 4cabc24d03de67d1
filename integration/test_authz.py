"""Issue 16, finding 1, on two real nodes: a hostile caller with a certificate signed by ``tls_ca``.

Node-a and node-b run ``qsup serve`` with TLS (migtopo.TwoNodes.start_daemons(tls=True)); node-a
also declares node-c, a peer that exists only as a certificate, and both list ``admin`` in
``operators``.  With curl and real certificates against node-a's ``listen``:

* node-b's certificate gets 403 on every route but its own migrations -- ``DELETE
  /v1/instances/X`` and ``POST /v1/instances`` included, and nothing happens;
* node-b may not show, abort, confirm or recover an incoming that node-c prepared, nor prepare
  one naming node-c as its source; it may drive the one it prepared itself;
* a CA-signed certificate that names no peer and no operator gets 403 on every route;
* and a live migration between the declared peers still completes over TLS with no route
  overlap and a whole guest -- after which node-a may read, but not delete, the guest it sent.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from migtopo import API_PORT, BUSY, MAKE_CA, MigrationWatch, TwoNodes, assert_guest_whole, close_nodes
from supervisor.api._authz import Access
from supervisor.api._routes import ACCESS, ROUTES
from topo import guest_spec

IP, MAC = "10.99.0.2", "52:54:00:99:00:02"
A_URL, B_URL = f"https://10.200.0.1:{API_PORT}", f"https://10.200.0.2:{API_PORT}"


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    work = tmp_path_factory.mktemp("authz")
    pki = work / "pki"
    # start_daemons keeps an existing CA: the two nodes' certificates, node-c, an operator, a stranger
    subprocess.run([str(MAKE_CA), str(pki), "node-a=10.200.0.1", "node-b=10.200.0.2", "node-c", "admin",
                    "stranger"], check=True)
    t = TwoNodes(work, prefix="qtl")
    try:
        a, b = t.start_daemons('operators = ["admin"]\n', tls=True)
        a.kill()  # node-a also declares node-c ([peers] is the config's last table)
        a.config.write_text(a.config.read_text() + f'"node-c" = "https://10.200.0.3:{API_PORT}"\n')
        a.start()
        yield t, a, b, pki
    finally:
        leaked = close_nodes(t)
        assert not leaked, f"qemu pids left: {leaked}"


def curl(ns, pki, cert: str | None, method: str, url: str, body: dict | None = None) -> tuple[int, object]:
    """One request with ``cert`` (``pki/<cert>.pem``; None: no certificate) from namespace ``ns``."""
    argv = ["ip", "netns", "exec", ns.name, "curl", "-sS", "--max-time", "30", "--cacert", str(pki / "ca.pem"),
            "-o", "-", "-w", "\n%{http_code}", "-X", method]
    if cert:
        argv += ["--cert", str(pki / f"{cert}.pem"), "--key", str(pki / f"{cert}-key.pem")]
    if body is not None:
        argv += ["-H", "content-type: application/json", "--data", json.dumps(body)]
    r = subprocess.run([*argv, url], capture_output=True, text=True, timeout=60)
    out, _, code = r.stdout.rpartition("\n")
    assert code.isdigit(), (r.stdout, r.stderr)
    return int(code), (json.loads(out) if out.strip() else None)


def _operations(name: str) -> list[tuple[str, str, Access]]:
    """Every route with its path parameters filled in: ``{name}`` with ``name``, any other (a
    disk's ``{id}``, a NIC's ``{mac}``) with a plain value (curl would glob a ``{...}``)."""
    def fill(path: str) -> str:
        return re.sub(r"\{(\w+)\}", lambda m: name if m.group(1) == "name" else f"{m.group(1)}1", path)

    return [(m, fill(r.path), ACCESS[op.operation["operationId"]]) for r in ROUTES for m, op in r.ops.items()]


def _incoming(name: str, ip: str, mac: str, **kw) -> dict:
    return {"spec": guest_spec(name, [{"mode": "routed", "mac": mac, "ip": ip}]), **kw}


def test_a_peer_gets_403_on_every_non_migration_route(nodes):
    t, a, b, pki = nodes
    # the must-show: node-b's certificate, node-a's listener
    code, body = curl(t.b, pki, "node-b", "DELETE", f"{A_URL}/v1/instances/X")
    assert (code, body) == (403, {"error": "peer node-b may not DELETE /v1/instances/X", "field": None,
                                  "code": "forbidden"})
    code, body = curl(t.b, pki, "node-b", "POST", f"{A_URL}/v1/instances",
                      guest_spec("X", [{"mode": "routed", "mac": "52:54:00:99:00:09", "ip": "10.99.0.9"}]))
    assert (code, body) == (403, {"error": "peer node-b may not POST /v1/instances", "field": None,
                                  "code": "forbidden"})
    assert a.cli_json("ls") == []  # nothing was started
    for method, path, access in _operations("X"):
        if access is Access.OPERATOR:  # every route but the destination's migration routes
            code, body = curl(t.b, pki, "node-b", method, A_URL + path, {} if method == "POST" else None)
            assert code == 403 and body["code"] == "forbidden", (method, path, code, body)
            assert body["error"] == f"peer node-b may not {method} {path}"
    assert a.cli_json("ls") == []


def test_a_peer_drives_only_the_incomings_it_prepared(nodes):
    t, a, b, pki = nodes
    code, body = curl(t.b, pki, "node-c", "POST", f"{A_URL}/v1/migrations/incoming",
                      _incoming("c1", "10.99.0.31", "52:54:00:99:00:31"))
    assert code == 201, body  # node-c prepares from itself
    for method, path in (("GET", "/v1/instances/c1"), ("POST", "/v1/migrations/incoming/c1/abort"),
                         ("POST", "/v1/migrations/incoming/c1/released"),
                         ("POST", "/v1/migrations/incoming/c1/recover")):
        code, body = curl(t.b, pki, "node-b", method, A_URL + path)
        assert code == 403, (path, body)
        assert body["error"] == f"peer node-b may not {method} {path} (not an incoming migration it prepared)"
    code, body = curl(t.b, pki, "node-b", "POST", f"{A_URL}/v1/migrations/incoming",
                      _incoming("b2", "10.99.0.32", "52:54:00:99:00:32", source="node-c"))
    assert code == 403 and body["field"] == "source", body
    assert not [e for e in a.events() if e.get("instance") == "b2"]  # nothing was prepared
    # node-b's own incoming: it may read and abort it, not delete it
    code, body = curl(t.b, pki, "node-b", "POST", f"{A_URL}/v1/migrations/incoming",
                      _incoming("b1", "10.99.0.33", "52:54:00:99:00:33"))
    assert code == 201, body
    code, view = curl(t.b, pki, "node-b", "GET", f"{A_URL}/v1/instances/b1")
    assert code == 200 and view["migration"]["source"] == "node-b", view
    assert curl(t.b, pki, "node-b", "DELETE", f"{A_URL}/v1/instances/b1")[0] == 403
    for owner, name in (("node-b", "b1"), ("node-c", "c1")):
        code, body = curl(t.b, pki, owner, "POST", f"{A_URL}/v1/migrations/incoming/{name}/abort")
        assert code == 200, body
    states = {v["name"]: v["state"] for v in a.cli_json("ls")}
    assert states["c1"] in ("stopped", "failed") and states["b1"] in ("stopped", "failed"), states


def test_an_undeclared_certificate_gets_403_everywhere(nodes):
    t, a, b, pki = nodes
    for method, path, _ in [*_operations("X"), ("GET", "/nope", None)]:
        code, body = curl(t.b, pki, "stranger", method, A_URL + path, {} if method == "POST" else None)
        assert code == 403, (method, path, code, body)
        assert body["error"] == (f"certificate 'stranger' (neither a declared peer nor in operators) "
                                 f"may not {method} {path}")
    code, body = curl(t.b, pki, "admin", "GET", f"{A_URL}/v1/instances")  # a listed operator
    assert code == 200 and isinstance(body, dict), body
    assert curl(t.b, pki, None, "GET", f"{A_URL}/v1/instances")[0] == 401  # no certificate, no token


def test_a_live_migration_between_the_declared_peers_still_completes(nodes, tmp_path):
    t, a, b, pki = nodes
    a.start_instance(guest_spec("t1", [{"mode": "routed", "mac": MAC, "ip": IP}],
                                append=f"guest.ip0={IP}/32 {BUSY}"))
    a.wait_console("t1")
    assert curl(t.b, pki, "node-b", "POST", f"{A_URL}/v1/instances/t1/stop", {"force": True})[0] == 403
    assert curl(t.b, pki, "node-b", "DELETE", f"{A_URL}/v1/instances/t1")[0] == 403
    assert a.cli_json("show", "t1")["state"] == "running"
    with MigrationWatch(t, t.a, t.b, IP, tmp_path, tag="ab") as watch:
        watch.ping.wait_replies(20)
        r = a.cli("migrate", "t1", "--to", "node-b", "--json", timeout=300, check=False)
        watch.ping.wait_replies(50, timeout=10)
        w = watch.result()
    summary = json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else None
    assert summary and summary["result"] == "completed", (summary, r.stderr)
    assert w["overlap_ms"] == 0.0, w
    assert w["dst_has_route"] and not w["src_has_route"], w
    assert_guest_whole(t, b, "t1", IP, busy=True)
    # node-b recorded who prepared it; node-a (the source) may read it there, not delete it
    code, view = curl(t.a, pki, "node-a", "GET", f"{B_URL}/v1/instances/t1")
    assert code == 200 and view["state"] == "running" and view["migration"]["source"] == "node-a", view
    assert curl(t.a, pki, "node-a", "DELETE", f"{B_URL}/v1/instances/t1")[0] == 403
    assert curl(t.a, pki, "node-a", "GET", f"{B_URL}/v1/instances")[0] == 403
    assert b.cli_json("show", "t1")["state"] == "running"
