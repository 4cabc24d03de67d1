"""The interactive serial console: one full-duplex HTTP/1.1 exchange (part of ``_routes.ROUTES``).

::

    POST /v1/instances/{name}/console/attach?force=B&tail=N
        request body (chunked, streamed): the bytes typed on the console, as they are typed;
        its end detaches
        200 response body (streamed): frames (below) until the client detaches, another client
        takes over, the instance stops or the daemon does

Why not an ``Upgrade`` to a raw stream: hypercorn's HTTP/1.1 protocol upgrades to WebSocket or
h2c only (any other ``Upgrade`` is served as a plain request, and h11 would pause the connection
after a 101), and the API refuses WebSockets.  HTTP/1.1 lets a server answer while the request
body is still coming, so one POST carries both directions, through the same listener, role
check and limits as every other route.  The client must read while it writes (``supervisor/
_client.py``'s ``ConsoleSession``); a generic client that sends its whole body first just gets
the console's tail and what its input made the guest print, and is detached.

Frames, so the end's reason cannot be forged by the guest's output: a kind byte, a 4-byte
big-endian length, the payload:

* ``o`` -- console output (first the last ``tail`` bytes of the log, default 4096);
* ``n`` -- a notice, JSON: ``{"dropped": N}`` output the client lagged too far behind to get;
* ``e`` -- the end, JSON: ``{"reason": "detached" | "taken over by another client" | ...,
  "dropped": N, "unsent": N}``; nothing follows.

409 naming the instance: someone else is attached (``force=true`` takes over: the first client
gets its ``e`` frame and its response ends), or the instance has no console connection (not
running here).  The operator's only (``_routes.ACCESS``).
"""

from __future__ import annotations

import json
import struct

import trio
from starlette.requests import Request
from starlette.responses import Response

from .._console import ATTACH_TAIL, Attachment, ConsoleBusy, ConsoleUnavailable, console_hub
from ._errors import ErrorKind, HttpError
from ._openapi import NAME_PARAM, ApiRoute, Op, errors
from ._request import instance, query_bool, query_int, refuse_while_stopping

#: the media type of the frame stream: bytes (the frames are described in the operation's text;
#: a vendor type made generated clients drop the response: openapi-python-client knows octet-stream)
FRAMES = "application/octet-stream"
MAX_TAIL = 1 << 20
_HEADER = struct.Struct(">cI")


def frame(kind: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


class ConsoleStream(Response):
    """The attached client's exchange, as a raw ASGI app (``Response.__init__`` is not run)."""

    def __init__(self, attachment: Attachment):
        self.a = attachment

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", FRAMES.encode()), (b"cache-control", b"no-store")]})
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._input, receive)
                await self._output(send)
                nursery.cancel_scope.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away mid-send
        finally:
            self.a.detach("the client went away")

    async def _input(self, receive) -> None:
        """The request body into the console, until it ends (detach) or the client goes."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.a.detach("the client went away")
                return
            body = message.get("body", b"")
            if body:
                await self.a.send(body)
            if not message.get("more_body", False):
                self.a.detach("detached")
                return

    async def _output(self, send) -> None:
        dropped = 0
        while True:
            data = await self.a.receive()
            out = b""
            if self.a.dropped != dropped:
                dropped = self.a.dropped
                out += frame(b"n", json.dumps({"dropped": dropped}).encode())
            if not data:
                end = {"reason": self.a.ended, "dropped": self.a.dropped, "unsent": self.a.unsent}
                await send({"type": "http.response.body", "more_body": True,
                            "body": out + frame(b"e", json.dumps(end).encode())})
                return
            await send({"type": "http.response.body", "more_body": True, "body": out + frame(b"o", data)})


async def attach_console(request: Request) -> Response:
    inst = instance(request)
    force = query_bool(request, "force", False)
    tail = query_int(request, "tail", ATTACH_TAIL)
    if tail > MAX_TAIL:
        raise HttpError(f"tail must be at most {MAX_TAIL}, got {tail}", "tail", kind=ErrorKind.BAD_REQUEST)
    refuse_while_stopping(request)
    layout = getattr(getattr(inst, "ctx", None), "layout", None)
    hub = None if layout is None else console_hub(layout.console_socket_path(inst.name))
    state = getattr(getattr(inst, "state", None), "value", "unknown")
    if hub is None:
        raise HttpError(f"instance {inst.name!r} has no console connection ({state})", "name",
                        kind=ErrorKind.CONFLICT)
    try:
        a = hub.attach(inst.name, force=force, tail=tail)
    except (ConsoleBusy, ConsoleUnavailable) as e:
        raise HttpError(str(e), "name", kind=ErrorKind.CONFLICT) from None
    return ConsoleStream(a)


ROUTES = [
    ApiRoute("/v1/instances/{name}/console/attach", {"POST": Op(attach_console, {
        "operationId": "attach_console",
        "summary": "Attach to the serial console, two-way: the request body is what is typed (streamed; "
                   "its end detaches), the response streams frames of output (kind byte o/n/e, 4-byte "
                   "big-endian length, payload) while the capped log keeps recording. One client at a time",
        "parameters": [
            {"name": "force", "in": "query", "required": False,
             "description": "take over from an attached client (it is told and disconnected)",
             "schema": {"type": "boolean"}},
            {"name": "tail", "in": "query", "required": False,
             "description": f"start with the log's last N bytes (default {ATTACH_TAIL})",
             "schema": {"type": "integer", "minimum": 0, "maximum": MAX_TAIL}}],
        "description": "The request body (any media type, chunked) is not a document: it is streamed into "
                       "the console as it arrives, so it is not declared as a requestBody (no size limit, "
                       "never 413/422). A client must read the response while it sends; one that sends its "
                       "whole body first gets the log's tail and what its input made the guest print.",
        "responses": {"200": {"description": "Attached: frames until detached, taken over or stopped",
                              "content": {FRAMES: {"schema": {"type": "string", "format": "binary"}}}},
                      **errors(400, 404, 409, 503)}})},
        parameters=[NAME_PARAM]),
]

SCHEMAS: dict = {}
