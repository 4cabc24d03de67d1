"""HTTP server limits: requests at once, event followers, and a header timeout for slow clients.

A real hypercorn (the daemon's own ``_serve_http``) on a unix socket, a real Node, no root.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import trio

from supervisor._daemon import _serve_http
from supervisor._eventlog import EventLog
from supervisor._node import Node
from supervisor.api import HttpLimits, create_app
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


#: the header timeout these tests configure: clearly apart from hypercorn's own default
#: (``keep_alive_timeout``, 5 s), so a server that ignored the setting would be caught
HEADER_TIMEOUT = 1.5


def test_hypercorns_own_default_is_not_the_configured_timeout():
    from hypercorn.config import Config

    assert abs(Config().keep_alive_timeout - HEADER_TIMEOUT) >= 2, Config().keep_alive_timeout


def test_a_client_that_stops_sending_headers_is_cut_off(tmp_path):
    async def body(path, app):
        s = trio.socket.socket(socket.AF_UNIX)
        await s.connect(path)
        await s.send(b"GET /v1/health HTTP/1.1\r\nHost: qsup\r\n")  # ... and never the blank line
        t = time.monotonic()
        got = b""
        with trio.fail_after(10):
            data = await s.recv(4096)
            while data:
                got += data
                data = await s.recv(4096)
        s.close()
        return time.monotonic() - t, got

    took, got = _serve(tmp_path, HttpLimits(), HEADER_TIMEOUT, body)
    assert got == b"", got  # no answer: the request never completed
    # cut off by *our* timeout: not before it, and well before hypercorn's default (5 s)
    assert HEADER_TIMEOUT - 0.2 <= took <= HEADER_TIMEOUT + 1.5, took


def test_a_follower_is_not_cut_off_by_the_header_timeout(tmp_path):
    async def body(path, app):
        async with _client(path) as c:
            async with c.stream("GET", "/v1/events?follow=true") as f:
                assert f.status_code == 200
                lines = f.aiter_lines()

                async def next_event(want: str) -> None:
                    """The next event on the stream must be ``want``; the stream must not end."""
                    with trio.fail_after(5):
                        async for line in lines:
                            if line.strip():
                                assert json.loads(line)["type"] == want, line
                                return
                    raise AssertionError(f"the follower's stream ended before {want}")

                await trio.sleep(2 * HEADER_TIMEOUT)  # well past the header timeout, sending nothing
                app.state.events.emit("test.ping")
                await next_event("test.ping")
                await trio.sleep(2 * HEADER_TIMEOUT)  # and again: still open, still delivering
                app.state.events.emit("test.pong")
                await next_event("test.pong")
                assert app.followers == 1
        return True

    assert _serve(tmp_path, HttpLimits(), HEADER_TIMEOUT, body) is True
