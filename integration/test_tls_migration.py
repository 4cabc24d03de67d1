"""Issue 9 on real hardware (namespaces, real qemu, a real guest): TLS between nodes.

* a routed guest migrates A -> B -> A with every node-to-node call over mutual TLS
  (https peers on the migration link) and the migration stream over QEMU's TLS, under ping,
  with zero route overlap;
* the stream really is TLS: QEMU on both ends holds a tls-creds-x509 object and uses it
  (``query-migrate-parameters``), and nothing of the node's key stays in the run dir;
* a client certificate from another CA is refused by the listener, and a caller without
  certificate and token gets 401;
* a peer that names a node the certificate does not (a wrong ``[peers]`` entry) is refused
  before any migration starts: the guest stays where it is.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from migtopo import API_PORT, BUSY, MAKE_CA, MigrationWatch, TwoNodes, assert_guest_whole
from topo import VENV_BIN, guest_spec, qmp

IP = "10.99.0.2"
MAC = "52:54:00:99:00:02"


@pytest.fixture
def tls_nodes(tmp_path):
    t = TwoNodes(tmp_path, prefix="qtl")
    try:
        a, b = t.start_daemons(tls=True)
        yield t, a, b
    finally:
        leaked = t.close()
        assert not leaked, f"qemu pids left: {leaked}"


def _spec(name):
    return guest_spec(name, [{"mode": "routed", "mac": MAC, "ip": IP}], append=f"guest.ip0={IP}/32 {BUSY}")


def _migrate(src, dst, name, *extra, check=True):
    r = src.cli("migrate", name, "--to", dst.node_name, "--json", *extra, timeout=300, check=check)
    return r, (json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else None)


def has_route_on(ns) -> bool:
    return IP in ns.run("ip", "route", "show", IP)


def _no_key_left(d, name) -> bool:
    """The QEMU that runs ``name`` on ``d`` holds no TLS creds object or parameter, and no creds
    dir is left in the node's run dir (a finished migration's key is forgotten)."""
    v = d.cli_json("show", name, check=False)
    if v.get("pid"):
        deadline = time.monotonic() + 10  # the destination drops its object just after completed
        while True:
            objects = {o["name"] for o in qmp(v["qmp_operator"], "qom-list", {"path": "/objects"})}
            params = _tls_params(d, name)
            if not {o for o in objects if o.startswith("qsup-tls")} and not params["tls-creds"]:
                break
            assert time.monotonic() < deadline, (objects, params)
            time.sleep(0.1)
    tls_dir = d.run_dir / "tls"
    return not (tls_dir.exists() and list(tls_dir.iterdir()))


def _tls_params(d, name) -> dict:
    p = qmp(d.cli_json("show", name)["qmp_operator"], "query-migrate-parameters")
    return {k: p.get(k) for k in ("tls-creds", "tls-hostname")}


def test_tls_migration_there_and_back_under_ping(tls_nodes, tmp_path):
    t, a, b = tls_nodes
    a.start_instance(_spec("t1"))
    a.wait_console("t1")
    assert t.client.ping(IP)
    with MigrationWatch(t, t.a, t.b, IP, tmp_path, tag="ab") as watch:
        watch.ping.wait_replies(20)
        r, summary = _migrate(a, b, "t1")
        watch.ping.wait_replies(50, timeout=10)
        w = watch.result()
    assert summary["result"] == "completed", (summary, r.stderr)
    # the route really moved (sampled on both nodes), and was never on both
    assert w["src_routes"] and w["src_routes"][0][1] and not w["src_has_route"], w["src_routes"]
    assert w["dst_has_route"] and not w["dst_routes"][0][1], w["dst_routes"]
    assert w["overlap_ms"] == 0.0, w["overlap_ms"]
    assert_guest_whole(t, b, "t1", IP, busy=True)
    # the stream was TLS with this migration's own key, and afterwards neither QEMU holds a key:
    # no tls-creds object, no parameter naming one, no creds file (QEMU never held the node key)
    started = [e for e in a.events() if e["type"] == "migration.started" and e.get("instance") == "t1"]
    assert started[-1]["tls"] is True
    for node in (a, b):
        assert _no_key_left(node, "t1"), node.node_name
    assert started[-1]["to"] == "node-b"
    uri = [e for e in a.events() if e["type"] == "migration.uri"][-1]["uri"]
    assert uri.startswith("tcp:10.200.0.2:"), uri  # built by A from B's declared address
    for node in (a, b):  # the creds dirs QEMU loaded from are gone again
        assert not list((node.run_dir / "tls").glob("*")) if (node.run_dir / "tls").exists() else True
    # and back: the guest that arrived as a TLS server leaves as a TLS client
    r, summary = _migrate(b, a, "t1")
    assert summary["result"] == "completed", (summary, r.stderr)
    assert _no_key_left(a, "t1")
    assert_guest_whole(t, a, "t1", IP, busy=True)
    assert has_route_on(t.a) and not has_route_on(t.b)


def _curl(ns, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns.name, "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                           "--max-time", "10", *args], capture_output=True, text=True)


def test_listener_refuses_foreign_certificates_and_anonymous_callers(tls_nodes, tmp_path):
    t, a, b = tls_nodes
    rogue = tmp_path / "rogue"
    subprocess.run([str(MAKE_CA), str(rogue), "node-a"], check=True)
    pki = t.workdir / "pki"
    url = f"https://10.200.0.2:{API_PORT}/v1/instances"
    qsup = str(VENV_BIN / "qsup")
    base = ["ip", "netns", "exec", t.a.name, qsup, "ls", "--json", "--url", f"https://10.200.0.2:{API_PORT}",
            "--cacert", str(pki / "ca.pem")]
    ok = subprocess.run([*base, "--cert", str(pki / "node-a.pem"), "--key", str(pki / "node-a-key.pem")],
                        capture_output=True, text=True, timeout=60)
    # accepted as peer node-a, which may not list B's instances (integration/test_authz.py has the roles)
    assert ok.returncode == 1 and "peer node-a may not GET /v1/instances" in ok.stderr, ok.stderr
    foreign = subprocess.run([*base, "--cert", str(rogue / "node-a.pem"), "--key", str(rogue / "node-a-key.pem")],
                             capture_output=True, text=True, timeout=60)
    assert foreign.returncode == 3, foreign.stderr  # the handshake fails: nobody answered
    anonymous = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert anonymous.returncode == 1 and "bearer token" in anonymous.stderr
    plain = _curl(t.a, f"http://10.200.0.2:{API_PORT}/v1/instances")
    assert plain.stdout in ("000", "400"), plain  # no plain HTTP on the TLS listener
    assert _curl(t.a, "--cacert", str(pki / "ca.pem"), url).stdout == "401"


def test_a_peer_whose_certificate_names_another_node_is_refused(tls_nodes):
    """A's [peers] says "node-b" is at B's address, but B's certificate names node-b only:
    declare B's address under the name "node-c" and the call fails the name check."""
    t, a, b = tls_nodes
    a.kill()
    cfg = a.config.read_text().replace('"node-b" = ', '"node-c" = ')
    a.config.write_text(cfg)
    a.start()
    a.start_instance(_spec("t3"))
    a.wait_console("t3")
    r = a.cli("migrate", "t3", "--to", "node-c", "--json", timeout=120, check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    failed = [e for e in a.events() if e["type"] == "migration.failed"]
    assert failed and "unreachable" in failed[-1]["error"] and "certificate" in failed[-1]["error"].lower(), failed
    assert a.cli_json("show", "t3")["state"] == "running"
    assert_guest_whole(t, a, "t3", IP, busy=True)
    assert not [e for e in b.events() if e["type"] == "migration.prepared"]  # B was never asked
