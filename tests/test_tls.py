"""Mutual TLS (issue 9): the HTTPS listener, node-to-node name checks, QEMU's creds dir.

Certificates are made at test time (contrib/make-test-ca, openssl) into tmp_path.  No root.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import socket
import ssl
import stat
import subprocess
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from core_harness import Bench
from needs import require
from supervisor._daemon import PeerAuth, _serve_http
from supervisor._migration import MigrationError, PeerClient
from supervisor._tls import (
    PEER_NODE,
    MigrationKey,
    TlsError,
    TlsFiles,
    cert_node_name,
    check_node_files,
    drop_qemu_tls,
    file_cert_names,
    setup_qemu_tls,
    write_qemu_psk,
)
from supervisor.api import create_app

ROOT = Path(__file__).resolve().parent.parent
MAKE_CA = ROOT / "contrib" / "make-test-ca"
TOKEN = "t0ken-for-the-tls-tests-0123456789"

pytestmark = [pytest.mark.usefixtures("no_fakes_left")]


@pytest.fixture(autouse=True)
def _openssl():
    require(shutil.which("openssl"), "needs openssl")


def make_ca(d: Path, *names: str) -> Path:
    subprocess.run([str(MAKE_CA), str(d), *names], check=True)
    return d


def files(d: Path, name: str) -> TlsFiles:
    return TlsFiles(d / "ca.pem", d / f"{name}.pem", d / f"{name}-key.pem")


@pytest.fixture
def pki(tmp_path):
    return make_ca(tmp_path / "pki", "a", "b=127.0.0.1", "admin")


@pytest.fixture
def rogue(tmp_path):
    """Another CA, with certificates of the same names."""
    return make_ca(tmp_path / "rogue", "a", "b=127.0.0.1")




# -- names ---------------------------------------------------------------------------------------

def test_cert_names_cn_first_then_dns_sans(pki):
    assert file_cert_names(pki / "b.pem") == ["b"]
    assert cert_node_name({"subject": ((("commonName", "node-a"),),),
                           "subjectAltName": (("DNS", "x"), ("IP Address", "1.2.3.4"))}) == "node-a"
    assert cert_node_name({"subjectAltName": (("DNS", "x"),)}) == "x"
    assert cert_node_name(None) is None and cert_node_name({}) is None


def test_node_files_must_load_and_name_the_node(pki, rogue):
    check_node_files(files(pki, "a"), "a")
    with pytest.raises(TlsError) as e:
        check_node_files(files(pki, "a"), "b")
    assert e.value.field == "tls_cert" and "names ['a']" in str(e.value)
    with pytest.raises(TlsError) as e:  # key of another certificate
        check_node_files(TlsFiles(pki / "ca.pem", pki / "a.pem", rogue / "a-key.pem"), "a")
    assert e.value.field == "tls_cert"
    with pytest.raises(TlsError) as e:
        check_node_files(TlsFiles(pki / "nope.pem", pki / "a.pem", pki / "a-key.pem"), "a")
    assert e.value.field == "tls_ca"


# -- the HTTPS listener and PeerClient -----------------------------------------------------------

#: _serve_http's other knobs (header_timeout, from the HTTP limits work) when it has them
_SERVE_KW = {"header_timeout": 30.0} if "header_timeout" in inspect.signature(_serve_http).parameters else {}


def _listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s, s.getsockname()[1]


def _serve_b(tmp_path, pki, body):
    """Node "b" (fake QEMU, real API) behind the TLS listener with the token ``TOKEN``; runs ``body(port, seen)``.
    Certificate "a" is an operator here (``operators``): tests/test_authz.py has the roles."""
    b = Bench(tmp_path, "b", operators=["a"])
    seen: list = []

    async def main():
        async with b.running():
            app = create_app(b.node, b.events, token=TOKEN)

            async def spy(scope, receive, send):  # what the inner app is given
                if scope["type"] == "http":
                    seen.append(scope.get("qsup.cert_name"))
                await app(scope, receive, send)

            sock, port = _listener()
            async with trio.open_nursery() as n:
                await n.start(functools.partial(_serve_http, tls=files(pki, "b"), **_SERVE_KW), PeerAuth(spy),
                              sock)
                try:
                    await body(port, seen)
                finally:
                    n.cancel_scope.cancel()

    trio.run(main)
    return seen


def test_listener_accepts_a_ca_signed_client_cert_as_the_node_it_names(tmp_path, pki):
    async def body(port, seen):
        url = f"https://127.0.0.1:{port}"
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        ctx.load_cert_chain(str(pki / "a.pem"), str(pki / "a-key.pem"))
        async with httpx.AsyncClient(verify=ctx) as c:
            r = await c.get(url + "/v1/instances")
            assert r.status_code == 200, r.text
            # a certificate caller's own Authorization header changes nothing
            r = await c.get(url + "/v1/instances", headers={"authorization": "Bearer wrong"})
            assert r.status_code == 200
        assert seen[-2:] == ["a", "a"]
        plain = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        async with httpx.AsyncClient(verify=plain) as c:  # no certificate: the token, or 401
            assert (await c.get(url + "/v1/instances")).status_code == 401
            r = await c.get(url + "/v1/instances", headers={"authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200
        assert seen[-1] is None
        async with httpx.AsyncClient() as c:  # plain HTTP is not served
            with pytest.raises(httpx.HTTPError):
                await c.get(f"http://127.0.0.1:{port}/v1/instances")

    _serve_b(tmp_path, pki, body)


def test_listener_refuses_a_client_cert_of_another_ca(tmp_path, pki, rogue):
    async def body(port, seen):
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        ctx.load_cert_chain(str(rogue / "a.pem"), str(rogue / "a-key.pem"))
        async with httpx.AsyncClient(verify=ctx) as c:
            with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                r = await c.get(f"https://127.0.0.1:{port}/v1/instances",
                                headers={"authorization": f"Bearer {TOKEN}"})
                pytest.fail(f"answered {r.status_code}")
        assert seen == []

    _serve_b(tmp_path, pki, body)


def test_peer_client_checks_the_peer_certificate_names_the_declared_peer(tmp_path, pki, rogue):
    async def body(port, seen):
        url = f"https://127.0.0.1:{port}"
        good = PeerClient(url, tls=files(pki, "a"), server_name="b")
        try:
            with pytest.raises(MigrationError) as e:
                await good.show("nothing")
            assert "404" in str(e.value)  # it got an answer: TLS both ways, authenticated
        finally:
            await good.aclose()
        assert seen[-1] == "a"
        n = len(seen)
        # the same server declared under another name: its certificate does not name "c"
        wrong = PeerClient(url, tls=files(pki, "a"), server_name="c")
        try:
            with pytest.raises(MigrationError) as e:
                await wrong.show("nothing")
            assert "unreachable" in str(e.value) and e.value.field == "to"
        finally:
            await wrong.aclose()
        # a node of another CA does not trust "b"
        other = PeerClient(url, tls=files(rogue, "a"), server_name="b")
        try:
            with pytest.raises(MigrationError):
                await other.show("nothing")
        finally:
            await other.aclose()
        assert len(seen) == n

    _serve_b(tmp_path, pki, body)


def test_peer_client_refuses_plain_http_and_unix_prefixes():
    for to in ("http://10.0.0.2:8420", "unix:/run/x.sock", "relative.sock"):
        with pytest.raises(MigrationError) as e:
            PeerClient(to)
        assert e.value.field == "to"
    with pytest.raises(MigrationError):
        PeerClient("https://10.0.0.2:8420")  # no TLS files, no peer name


def test_peer_node_is_recorded_by_the_handshake_in_the_connection_context(tmp_path, pki):
    """The mechanism PeerAuth relies on: the handshake's task context carries the name."""
    async def main():
        from supervisor._tls import peer_context, server_context

        s_ctx, c_ctx = server_context(files(pki, "b")), peer_context(files(pki, "a"))
        left, right = trio.testing.memory_stream_pair()
        server = trio.SSLStream(left, s_ctx, server_side=True)
        client = trio.SSLStream(right, c_ctx, server_hostname="b")
        names = []

        async def serve():
            await server.do_handshake()
            names.append(PEER_NODE.get())

        async with trio.open_nursery() as n:
            n.start_soon(serve)
            await client.do_handshake()
        assert names == ["a"] and PEER_NODE.get() is None

    trio.run(main)


# -- QEMU's creds dir ----------------------------------------------------------------------------

def test_qemu_psk_dir_holds_only_this_migrations_key_and_is_private(tmp_path, pki):
    key = MigrationKey.new()
    d = write_qemu_psk(tmp_path / "run" / "tls" / "vm.client", key, os.getgid())
    assert sorted(os.listdir(d)) == ["dh-params.pem", "keys.psk"]
    assert stat.S_IMODE(d.stat().st_mode) == 0o750
    assert stat.S_IMODE(d.parent.stat().st_mode) == 0o711
    for f in os.listdir(d):
        st = (d / f).stat()
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == os.getgid()
    assert (d / "keys.psk").read_text() == f"qsup:{key.key}\n" and len(key.key) == 64
    node_key = (pki / "a-key.pem").read_bytes()
    assert all(node_key not in (d / f).read_bytes() for f in os.listdir(d))  # never the node's key
    assert MigrationKey.new().key != key.key
    # fixed DH parameters: without them QEMU generates 2048-bit ones at object-add (seconds)
    dh = subprocess.run(["openssl", "dhparam", "-in", str(d / "dh-params.pem"), "-noout", "-text"],
                        capture_output=True, text=True, check=True).stdout
    assert "ffdhe2048" in dh


class _Qmp:
    def __init__(self):
        self.calls = []
        self.dir_seen = None

    async def execute(self, cmd, args=None, **kw):
        import qmp_glue

        self.calls.append((cmd, args))
        if cmd == "object-del":
            raise qmp_glue.QMPError("GenericError", "object not found", cmd)
        if cmd == "object-add":
            self.dir_seen = sorted(os.listdir(args["dir"]))
        return {}


def test_setup_qemu_tls_adds_a_psk_object_sets_params_and_removes_the_files(tmp_path):
    q = _Qmp()
    d = tmp_path / "run" / "tls" / "vm.server"
    key = MigrationKey.new()
    oid = trio.run(functools.partial(setup_qemu_tls, q, key, d, endpoint="server", gid=None))
    cmds = [c for c, _ in q.calls]
    # a leftover of an earlier migration dropped first, then the object, then the parameters
    assert cmds == ["migrate-set-parameters", "object-del", "object-add", "migrate-set-parameters"]
    add = q.calls[2][1]
    assert add == {"qom-type": "tls-creds-psk", "id": oid, "dir": str(d), "endpoint": "server"}
    # GnuTLS reads a server's keys.psk at the handshake: it stays until the migration ends
    assert q.dir_seen == ["dh-params.pem", "keys.psk"] and d.exists()
    assert q.calls[3][1] == {"tls-creds": oid, "tls-hostname": ""}
    q = _Qmp()
    trio.run(functools.partial(drop_qemu_tls, q, "server", d))
    assert q.calls == [("migrate-set-parameters", {"tls-creds": ""}), ("object-del", {"id": "qsup-tls-server"})]
    assert not d.exists()
    # a client reads its key when the object is made: its files go at once
    q = _Qmp()
    c = tmp_path / "c"
    trio.run(functools.partial(setup_qemu_tls, q, key, c, endpoint="client", gid=None))
    assert q.calls[2][1]["endpoint"] == "client" and q.calls[2][1]["username"] == "qsup" and not c.exists()


def test_make_test_ca_keeps_the_ca_key_apart_from_the_node_keys(tmp_path):
    """The CA key signs every node: it is not in the directory the nodes' files are copied from
    but in DIR/ca/ (0700), with its serial file (issue 16).  An old DIR/ca-key.pem is moved there."""
    import stat as st_

    pki = make_ca(tmp_path / "pki", "a", "b=127.0.0.1")
    assert sorted(p.name for p in pki.iterdir()) == ["a-key.pem", "a.pem", "b-key.pem", "b.pem", "ca", "ca.pem"]
    ca = pki / "ca"
    assert st_.S_IMODE(ca.stat().st_mode) == 0o700
    assert st_.S_IMODE((ca / "ca-key.pem").stat().st_mode) == 0o600
    assert {p.name for p in ca.iterdir()} <= {"ca-key.pem", "ca.srl"}
    first = (pki / "ca.pem").read_bytes()
    make_ca(pki, "c")  # more nodes later: the same CA
    assert (pki / "ca.pem").read_bytes() == first and not (pki / "ca-key.pem").exists()
    r = subprocess.run(["openssl", "verify", "-CAfile", str(pki / "ca.pem"), str(pki / "c.pem")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    old = make_ca(tmp_path / "old", "a")  # a DIR made by the old script: the key beside the nodes'
    for f in list((old / "ca").iterdir()):
        os.replace(f, old / f.name)
    (old / "ca").rmdir()
    make_ca(old, "d")
    assert not (old / "ca-key.pem").exists() and (old / "ca" / "ca-key.pem").exists()
