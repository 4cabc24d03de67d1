"""The daemon's listeners (issue 16): a connection cap per listener, the TLS handshake within the
header timeout, ``metrics_listen`` on loopback unless an address is named.

A real hypercorn protocol behind the daemon's own accept loop (``_serve_http``), no root.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import trio

from supervisor._daemon import _serve_http, bind_tcp
from supervisor._eventlog import EventLog
from supervisor._node import Node
from supervisor._tls import TlsFiles
from supervisor.api import create_app
from test_api import make_cfg

MAKE_CA = Path(__file__).resolve().parent.parent / "contrib" / "make-test-ca"


def _serve(tmp_path, sock: socket.socket, body, **kw):
    """``body(app)`` while the node's API is served on ``sock`` by ``_serve_http(**kw)``."""
    cfg = make_cfg(tmp_path)

    async def main():
        events = EventLog(None)
        node = Node(cfg, events)
        async with node.running():
            app = create_app(node, events)
            async with trio.open_nursery() as n:
                await n.start(lambda task_status: _serve_http(app, sock, task_status=task_status, **kw))
                try:
                    return await body(app)
                finally:
                    n.cancel_scope.cancel()

    return trio.run(main)


def _closed_by_the_server(s: socket.socket, within: float) -> bool:
    """The server closed ``s`` (EOF or reset) within ``within`` seconds, having sent nothing."""
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_connections_over_the_cap_are_closed_at_once_and_a_slot_frees_when_one_leaves(tmp_path):
    path = str(tmp_path / "api.sock")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    sock.listen(16)

    async def body(app):
        held = []
        for _ in range(2):  # two idle connections fill the cap
            c = socket.socket(socket.AF_UNIX)
            c.connect(path)
            held.append(c)
        over = socket.socket(socket.AF_UNIX)
        over.connect(path)
        assert await trio.to_thread.run_sync(_closed_by_the_server, over, 5.0)
        over.close()
        for c in held:  # the two are still open: nothing to read, no EOF
            assert not await trio.to_thread.run_sync(_closed_by_the_server, c, 0.2)
        held.pop().close()  # its slot frees once hypercorn closes it (its idle timer: the header timeout)
        transport = httpx.AsyncHTTPTransport(uds=path)
        async with httpx.AsyncClient(transport=transport, base_url="http://qsup", timeout=5) as client:
            with trio.fail_after(10):
                while True:  # the server notices the close, then the slot is free
                    try:
                        r = await client.get("/v1/health")
                        break
                    except httpx.TransportError:
                        await trio.sleep(0.05)
            assert r.status_code == 200
        for c in held:
            c.close()

    _serve(tmp_path, sock, body, header_timeout=2, max_connections=2)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_a_silent_tls_client_is_cut_off_after_the_header_timeout(tmp_path):
    pki = tmp_path / "pki"
    subprocess.run([str(MAKE_CA), str(pki), "b=127.0.0.1"], check=True)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]

    async def body(app):
        silent = socket.create_connection(("127.0.0.1", port))  # connects, never starts the handshake
        t0 = time.monotonic()
        assert await trio.to_thread.run_sync(_closed_by_the_server, silent, 10.0)  # hypercorn's default: 60 s
        assert time.monotonic() - t0 < 5
        silent.close()
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))  # a real client still gets in
        async with httpx.AsyncClient(verify=ctx) as client:
            r = await client.get(f"https://127.0.0.1:{port}/v1/health")
            assert r.status_code == 200

    _serve(tmp_path, sock, body, header_timeout=0.5,
           tls=TlsFiles(pki / "ca.pem", pki / "b.pem", pki / "b-key.pem"))


def test_metrics_listen_without_an_address_is_loopback_and_listen_keeps_all_addresses():
    m = bind_tcp(":0", "metrics_listen", empty_host="127.0.0.1")
    try:
        assert m.getsockname()[0] == "127.0.0.1"
    finally:
        m.close()
    t = bind_tcp(":0", "listen")
    try:
        assert t.getsockname()[0] == "0.0.0.0"
    finally:
        t.close()
