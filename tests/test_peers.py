"""Declared peers (issue 9): ``migrate --to`` names a ``[peers]`` entry, and credentials go to peers only.

Runs a node in-process against the fake QEMU (tests/core_harness.py); no root.
"""

from __future__ import annotations

import functools

import httpx
import pytest
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve

from core_harness import Bench, spec
from supervisor._config import load_config
from supervisor._spec import SpecError

TOKEN = "s3cret-token-0123456789abcdef"


pytestmark = pytest.mark.usefixtures("no_fakes_left")


def _collector(seen: list):
    """An ASGI app that records every request's headers (a would-be token thief)."""
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                await send({"type": msg["type"] + ".complete"})
                if msg["type"] == "lifespan.shutdown":
                    return
        seen.append({k.decode(): v.decode() for k, v in scope["headers"]})
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
    return app


def _api(bench: Bench) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(bench.socket)), base_url="http://qsup")


@pytest.mark.parametrize("target", ["url", "socket"])
def test_migrate_to_an_undeclared_target_is_refused_and_no_token_leaves(tmp_path, target):
    """Before issue 9, ``to`` could be any URL or socket path and the node's token went there."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    a = Bench(tmp_path, "a", token_file=str(token_file))
    seen: list = []
    out = {}

    async def main():
        async with a.running(api=True), trio.open_nursery() as n:
            hc = HyperConfig()
            hc.loglevel = "WARNING"
            if target == "url":
                listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
                port = listeners[0].socket.getsockname()[1]
                for lst in listeners:
                    lst.socket.close()
                hc.bind = [f"127.0.0.1:{port}"]
                to = f"http://127.0.0.1:{port}"
            else:
                sock = tmp_path / "thief.sock"
                hc.bind = [f"unix:{sock}"]
                to = str(sock)
            await n.start(functools.partial(serve, _collector(seen), hc, shutdown_trigger=trio.sleep_forever))
            await a.node.start(spec(tmp_path))
            async with _api(a) as c:
                r = await c.post("/v1/instances/vm/migrate", json={"to": to})
                out["status"], out["body"] = r.status_code, r.json()
                await trio.sleep(0.3)  # a migration task would have called by now
                out["state"] = (await c.get("/v1/instances/vm")).json()["state"]
            await a.node.instances["vm"].stop(force=True)
            n.cancel_scope.cancel()

    trio.run(main)
    assert seen == [], f"the undeclared target was contacted: {seen}"
    assert out["status"] == 422 and out["body"]["field"] == "to", out
    assert out["state"] == "running"


# -- config ------------------------------------------------------------------------------------

TLS = {"tls_ca": "/etc/qsup/ca.pem", "tls_cert": "/etc/qsup/a.pem", "tls_key": "/etc/qsup/a-key.pem"}


def test_peers_string_and_table_forms():
    cfg = load_config(None, node_name="a", **TLS, peers={
        "b": "https://10.0.0.2:8420", "c": "unix:/run/qsup-c/qsup.sock", "d.example": "https://[fd00::4]:8420/",
        "e": {"api": "unix:/run/qsup-e/qsup.sock", "migration": "10.0.0.5"},
        "f": {"api": "https://f.example:8420", "migration": "fd00::6"}})
    p = cfg.peers
    assert (p["b"].target, p["b"].migration_host, p["b"].is_https) == ("https://10.0.0.2:8420", "10.0.0.2", True)
    assert (p["c"].target, p["c"].migration_host, p["c"].is_https) == ("/run/qsup-c/qsup.sock", "127.0.0.1", False)
    assert (p["d.example"].target, p["d.example"].migration_host) == ("https://[fd00::4]:8420", "fd00::4")
    assert (p["e"].target, p["e"].migration_host) == ("/run/qsup-e/qsup.sock", "10.0.0.5")
    assert p["f"].migration_host == "fd00::6"


@pytest.mark.parametrize("peers, field", [
    ({"b": "http://10.0.0.2:8420"}, "peers.b.api"),
    ({"b": "10.0.0.2:8420"}, "peers.b.api"),
    ({"b": "/run/qsup-b/qsup.sock"}, "peers.b.api"),
    ({"b": "unix:relative.sock"}, "peers.b.api"),
    ({"b": "https://10.0.0.2"}, "peers.b.api"),
    ({"b": "https://10.0.0.2:0"}, "peers.b.api"),
    ({"b": "https://10.0.0.2:70000"}, "peers.b.api"),
    ({"b": "https://user@10.0.0.2:8420"}, "peers.b.api"),
    ({"b": "https://10.0.0.2:8420/x"}, "peers.b.api"),
    ({"b": "https://10.0.0.2:8420\n"}, "peers.b.api"),
    ({"b": "https://bad_host!:8420"}, "peers.b.api"),
    ({"b": {"api": "unix:/x.sock", "migration": "exec:id"}}, "peers.b.migration"),
    ({"b": {"api": "unix:/x.sock", "migration": "10.0.0.2:4444"}}, "peers.b.migration"),
    ({"b": {"api": "unix:/x.sock", "uri": "tcp:1.2.3.4:5"}}, "peers.b.uri"),
    ({"-b": "unix:/x.sock"}, "peers"),
    ({"b\n": "unix:/x.sock"}, "peers"),
    ({"a/b": "unix:/x.sock"}, "peers"),
])
def test_bad_peers_are_refused_naming_the_key(peers, field):
    with pytest.raises(SpecError) as e:
        load_config(None, **TLS, peers=peers)
    assert e.value.field == field, str(e.value)


def test_https_peers_need_tls():
    with pytest.raises(SpecError) as e:
        load_config(None, peers={"b": "https://10.0.0.2:8420"})
    assert e.value.field == "peers.b"
    load_config(None, peers={"b": "unix:/run/b.sock"})  # a unix peer needs no TLS


def test_tls_files_go_together_and_are_absolute():
    with pytest.raises(SpecError) as e:
        load_config(None, tls_ca="/ca.pem", tls_cert="/a.pem")
    assert e.value.field == "tls_key"
    with pytest.raises(SpecError) as e:
        load_config(None, **{**TLS, "tls_ca": "ca.pem"})
    assert e.value.field == "tls_ca"


@pytest.mark.parametrize("listen, ok", [("127.0.0.1:8420", True), ("[::1]:8420", True), ("localhost:8420", True),
                                        ("127.0.0.2:8420", True), ("0.0.0.0:8420", False), (":8420", False),
                                        ("10.0.0.1:8420", False), ("[::]:8420", False), ("nodea:8420", False)])
def test_plain_listen_only_on_loopback(listen, ok):
    kw = {"listen": listen, "token_file": "/etc/qsup/token"}
    if ok:
        load_config(None, **kw)
    else:
        with pytest.raises(SpecError) as e:
            load_config(None, **kw)
        assert e.value.field == "listen" and "loopback" in str(e.value)
    load_config(None, **kw, **TLS)  # with TLS anywhere


@pytest.mark.parametrize("addr", ["10.0.0.1", "0.0.0.0", "fd00::1", "node-a.example"])
def test_plain_migration_off_loopback_needs_the_operators_opt_in(addr):
    """Without TLS the migration stream (guest RAM, device state) is plain TCP: off the host only
    with allow_plain_migration_network = true (issue 16)."""
    for loopback in ("127.0.0.1", "::1", "localhost"):
        load_config(None, migration_address=loopback)
    with pytest.raises(SpecError) as e:
        load_config(None, migration_address=addr)
    assert e.value.field == "migration_address" and "allow_plain_migration_network" in str(e.value)
    assert load_config(None, migration_address=addr, allow_plain_migration_network=True).migration_address
    load_config(None, migration_address=addr, **TLS)  # with TLS the stream is encrypted anywhere


def test_listen_with_tls_needs_no_token_file():
    assert load_config(None, listen="0.0.0.0:8420", **TLS).token_file is None
    with pytest.raises(SpecError) as e:
        load_config(None, listen="127.0.0.1:8420")
    assert e.value.field == "token_file"


# -- the source builds the URI -----------------------------------------------------------------

def test_source_builds_the_uri_from_the_peer_address_and_the_answers_port(tmp_path):
    """b answers a port (and a hostile uri, ignored); a connects to b's *declared* migration address."""
    from supervisor.api._migration_routes import MigrateBody, migrate_options

    a = Bench(tmp_path, "a", peers={"b": {"api": f"unix:{tmp_path / 'b' / 'qsup.sock'}", "migration": "127.0.0.1"}})
    b = Bench(tmp_path, "b")
    out = {}

    async def main():
        async with a.running(), b.running(api=True):
            inst = await a.node.start(spec(tmp_path))
            opts = migrate_options(a.cfg, MigrateBody(to="b"), qemu_pid=inst.proc.pid, name="vm")
            assert (opts.to, opts.peer, opts.migration_host, opts.qemu_tls, opts.api_tls, opts.token) == \
                (str(b.socket), "b", "127.0.0.1", None, None, None)
            await a.node.migrate("vm", opts)
            with trio.fail_after(20):
                while inst.state.value == "migrating":
                    await trio.sleep(0.02)
            out["uri"] = [e["uri"] for e in a.of("migration.uri")]
            out["prepared"] = [e["uri"] for e in b.of("migration.prepared")]
            out["view_to"] = inst.view()["migration"]["to"]
            await b.node.instances["vm"].stop(force=True)

    trio.run(main)
    port = int(out["prepared"][0].rsplit(":", 1)[1])
    assert out["uri"] == [f"tcp:127.0.0.1:{port}"]
    assert out["view_to"] == "b"


@pytest.mark.parametrize("body", [{"name": "vm"}, {"name": "vm", "port": "4444"}, {"name": "vm", "port": 0},
                                  {"name": "vm", "port": 65536}, {"name": "vm", "port": True},
                                  {"name": "vm", "port": 4444.0}, {"name": "vm", "uri": "tcp:10.0.0.2:4444"}])
def test_a_prepare_answer_carries_a_port_in_range(body):
    from supervisor._migration import MigrationError, PrepareAnswer, _peer_answer

    with pytest.raises(MigrationError) as e:
        _peer_answer(PrepareAnswer, body, "prepare answer")
    assert e.value.field == "to" and "port" in str(e.value)


def test_a_uri_in_the_prepare_answer_is_ignored():
    from supervisor._migration import PrepareAnswer, _peer_answer

    a = _peer_answer(PrepareAnswer, {"name": "vm", "port": 4444, "uri": "exec:touch /tmp/pwned"}, "prepare answer")
    assert (a.port, a.tls) == (4444, False) and not hasattr(a, "uri")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_a_token_file_others_can_read_is_refused_at_start(tmp_path, mode):
    """The bearer token is every right on ``listen``: a token file group or others can read
    is refused when the daemon starts, naming token_file (issue 16)."""
    from supervisor._daemon import DaemonError, read_token

    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    assert read_token(token) == TOKEN
    token.chmod(0o400)
    assert read_token(token) == TOKEN
    token.chmod(mode)
    with pytest.raises(DaemonError, match=r"^token_file: .*readable by (group|others)"):
        read_token(token)
