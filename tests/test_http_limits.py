"""HTTP server limits: requests at once, event followers, and a header timeout for slow clients.

A real hypercorn (the daemon's own ``_serve_http``) on a unix socket, a real Node, no root.
"""

from __future__ import annotations

import socket
import time

import httpx
import trio

from supervisor._api import HttpLimits, create_app
from supervisor._daemon import _serve_http
from supervisor._eventlog import EventLog
from supervisor._node import Node
from test_api import make_cfg


def _serve(tmp_path, limits: HttpLimits, header_timeout: float, body):
    cfg = make_cfg(tmp_path)
    path = str(tmp_path / "api.sock")

    async def main():
        events = EventLog(None)
        node = Node(cfg, events)
        async with node.running():
            app = create_app(node, events, limits=limits)
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(path)
            sock.listen(16)
            async with trio.open_nursery() as n:
                await n.start(_serve_http, app, sock, header_timeout)
                try:
                    return await body(path, app)
                finally:
                    n.cancel_scope.cancel()

    return trio.run(main)


def _client(path) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=path), base_url="http://qsup", timeout=10)


async def _until_zero(count) -> None:
    """Until ``count()`` (one of the app's request counters) is back to 0."""
    with trio.fail_after(5):
        while count():
            await trio.sleep(0.01)


def test_followers_over_the_cap_get_503_and_a_slot_frees_when_one_leaves(tmp_path):
    async def body(path, app):
        async with _client(path) as c:
            async with c.stream("GET", "/v1/events?follow=true") as first:
                assert first.status_code == 200
                async with c.stream("GET", "/v1/events?follow=true") as second:
                    assert second.status_code == 200
                    third = await c.get("/v1/events?follow=true")
                    assert third.status_code == 503 and third.json()["code"] == "busy"
                    assert third.headers["retry-after"]
                    assert (await c.get("/v1/events")).status_code == 200  # a backlog read is no follower
            await _until_zero(lambda: app.followers)
            async with c.stream("GET", "/v1/events?follow=true") as again:
                assert again.status_code == 200

    _serve(tmp_path, HttpLimits(max_requests=50, max_followers=2), 30, body)


def test_requests_over_the_cap_get_503(tmp_path):
    async def body(path, app):
        async with _client(path) as c:
            async with c.stream("GET", "/v1/events?follow=true") as held:  # occupies the one slot
                assert held.status_code == 200
                r = await c.get("/v1/health")
                assert r.status_code == 503 and "requests at once" in r.json()["error"]
            await _until_zero(lambda: app.active)
            assert (await c.get("/v1/health")).status_code == 200

    _serve(tmp_path, HttpLimits(max_requests=1, max_followers=5), 30, body)


def test_a_client_that_stops_sending_headers_is_cut_off(tmp_path):
    async def body(path, app):
        s = trio.socket.socket(socket.AF_UNIX)
        await s.connect(path)
        await s.send(b"GET /v1/health HTTP/1.1\r\nHost: qsup\r\n")  # ... and never the blank line
        t = time.monotonic()
        with trio.fail_after(10):
            data = await s.recv(4096)
            while data:
                data = await s.recv(4096)
        s.close()
        return time.monotonic() - t

    took = _serve(tmp_path, HttpLimits(), 1.0, body)
    assert took < 5, took


def test_a_follower_is_not_cut_off_by_the_header_timeout(tmp_path):
    async def body(path, app):
        async with _client(path) as c:
            async with c.stream("GET", "/v1/events?follow=true") as f:
                assert f.status_code == 200
                await trio.sleep(2.5)  # well past the header timeout, sending nothing
                app.state.events.emit("test.ping")
                with trio.fail_after(5):
                    async for line in f.aiter_lines():
                        assert "test.ping" in line
                        return

    _serve(tmp_path, HttpLimits(), 1.0, body)
