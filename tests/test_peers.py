"""Declared peers (issue 9): ``migrate --to`` names a ``[peers]`` entry, and credentials go to peers only.

Runs a node in-process against the fake QEMU (tests/core_harness.py); no root.
"""

from __future__ import annotations

import functools
import signal

import httpx
import pytest
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve

from core_harness import Bench, fakes_alive, spec

TOKEN = "s3cret-token-0123456789abcdef"


@pytest.fixture(autouse=True)
def _no_fakes_left(tmp_path):
    yield
    left = fakes_alive(tmp_path)
    for pid in left:
        import os
        os.kill(pid, signal.SIGKILL)
    assert not left, f"fake qemu processes left running: {left}"


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
