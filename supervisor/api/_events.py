"""``GET /v1/events``: the event log as NDJSON, backlog or followed, straight to ASGI.

Used by the route (``_routes.events``) and, past Starlette's middleware, by the outer layer's fast
path (``_asgi._Outer``), because its cost per follower per event is what fan-out latency is made of.
"""

from __future__ import annotations

import contextlib
import json

import trio
from starlette.responses import Response

from ._metrics import Metrics
from ._request import NDJSON

_EVENT_PAGE = 1000


class _LineCache:
    """Encoded NDJSON lines by seq, shared by every reader of one app.

    A live event goes to every follower; encoding it once instead of once per follower matters
    at 50 followers.  Safe because an event never changes once it has a seq.
    """

    def __init__(self, size: int = 8192):
        self._lines: dict[int, bytes] = {}
        self._size = size

    def line(self, ev: dict) -> bytes:
        seq = ev["seq"]
        b = self._lines.get(seq)
        if b is None:
            b = (json.dumps(ev, separators=(",", ":")) + "\n").encode()
            if len(self._lines) >= self._size:
                for k in list(self._lines)[: self._size // 4]:
                    del self._lines[k]
            self._lines[seq] = b
        return b


class EventStream(Response):
    """``GET /v1/events`` as a raw ASGI response: NDJSON, batched, ends when the client leaves.

    A :class:`Response` so that it is what a route handler returns; Starlette only calls it (as
    an ASGI app), and :meth:`__call__` does all of it: ``Response.__init__`` is not run.

    Why not Starlette's StreamingResponse: every ``send`` through the server costs ~60-90 us, and
    one event goes to every follower, so the number of sends per event is what fan-out latency is
    made of.  Here a follower drains everything that is already emitted (a burst: a QMP event
    and the state change it causes are emitted back to back) into *one* send: while the event it
    just got is older than ``EventLog.last_seq``, the next one is available and
    :meth:`EventLog.follow` hands it over without blocking, so batching never waits.

    The follower ends when the client disconnects (``http.disconnect`` cancels it), when the
    event log closes, or when the daemon shuts down (the server cancels it).
    """

    def __init__(self, state, since: int, follow: bool):
        self.log = state.events
        self.metrics: Metrics = state.metrics
        self.lines: _LineCache = state.lines
        self.since = since
        self.follow = follow

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", NDJSON.encode()), (b"cache-control", b"no-store")]})
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._until_disconnect, receive, nursery.cancel_scope)
                if self.follow:
                    await self._live(send)
                else:
                    await self._backlog(send)
                nursery.cancel_scope.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away mid-send

    @staticmethod
    async def _until_disconnect(receive, cancel_scope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                cancel_scope.cancel()
                return

    async def _backlog(self, send) -> None:
        cursor = self.since
        while True:
            batch = self.log.since(cursor, _EVENT_PAGE)
            if not batch:
                return
            cursor = batch[-1]["seq"]
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"".join(self.lines.line(ev) for ev in batch)})

    async def _live(self, send) -> None:
        self.metrics.followers += 1
        chunk: list[bytes] = []
        try:
            async with contextlib.aclosing(self.log.follow(self.since, follow=True)) as stream:
                async for ev in stream:
                    chunk.append(self.lines.line(ev))
                    # More already emitted?  Then follow() yields it without blocking: keep going,
                    # so a burst becomes one send.  Otherwise send now -- never wait to batch.
                    if ev["seq"] < self.log.last_seq and len(chunk) < _EVENT_PAGE:
                        continue
                    body, chunk = b"".join(chunk), []
                    await send({"type": "http.response.body", "body": body, "more_body": True})
        finally:
            self.metrics.followers -= 1
