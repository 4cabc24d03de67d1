"""An in-process QMP server for unit tests: enough of QEMU's monitor to test against.

It speaks the real wire protocol on a real unix socket -- greeting,
``qmp_capabilities``, line-delimited JSON commands with ids, events -- so the
glue under test runs its real code (qemu.qmp included), only QEMU is fake.

Like QEMU it handles one command at a time, in order, unless
``concurrent=True`` (then each command runs in its own task and replies may
come out of order, which a correct client must route by id).

Out-of-band: the greeting offers ``oob``, as QEMU's does; an ``exec-oob`` command (once the
client enabled it) runs at once, in its own task, even while ``main_loop_blocked`` is set --
which holds every in-band command, as a QEMU main thread stuck on a post-copy page fault does.

Handlers: ``peer.handlers[name] = fn`` where ``fn(args)`` (sync or async)
returns the ``return`` value, raises ``PeerError`` for an error reply, or
returns ``NO_REPLY``. Built in: ``query-status``, ``echo`` (returns its
arguments), ``sleep`` (``{"seconds": s, "tag": ...}``, replies after s),
``hang`` (never replies), ``quit`` (replies -- unless ``reply_to_quit`` is
False -- then closes the connection).
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import trio

NO_REPLY = object()


class PeerError(Exception):
    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


class QMPPeer:
    def __init__(self, path: str | None, *, concurrent: bool = False, fd: int | None = None) -> None:
        self.path = path
        self.fd = fd  # an inherited listening socket (QEMU's ``-chardev socket,fd=N``) instead of a path
        self.concurrent = concurrent
        self.received: list[tuple[str, Any]] = []  # (command, arguments), in order
        self.events_on_negotiate: list[tuple[str, dict | None]] = []
        self.handlers: dict[str, Callable[[dict], Any]] = {
            "query-status": lambda a: {"status": "prelaunch", "running": False},
            "echo": lambda a: a,
            "sleep": self._sleep,
            "hang": self._hang,
        }
        self._conns: list[_Conn] = []
        self._listener: trio.SocketListener | None = None
        self.connections = 0
        self.reply_to_quit = True  # False: close the connection without replying
        self.close_on_quit = True  # False: reply, but keep the connection open
        self.main_loop_blocked = False  # True: in-band commands wait; exec-oob still answers

    # -- control from tests --------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        if self.fd is not None:
            sock = trio.socket.fromfd(self.fd, socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await sock.bind(self.path)
            sock.listen(4)
        self._listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    stream = await self._listener.accept()
                    nursery.start_soon(self._serve_conn, stream)
        finally:
            with trio.CancelScope(shield=True):
                await self._listener.aclose()
            if self.path and os.path.exists(self.path):
                os.unlink(self.path)

    async def emit(self, event: str, data: dict | None = None) -> None:
        """Send an event to every negotiated connection."""
        for conn in list(self._conns):
            if conn.negotiated:
                await conn.send(_event(event, data))

    async def drop(self) -> None:
        """Close every connection abruptly, as if QEMU had been killed."""
        for conn in list(self._conns):
            await conn.close()

    async def wait_received(self, n: int) -> None:
        while len(self.received) < n:
            await trio.sleep(0.005)

    # -- protocol ------------------------------------------------------------

    async def _serve_conn(self, stream: trio.SocketStream) -> None:
        conn = _Conn(stream)
        self._conns.append(conn)
        self.connections += 1
        try:
            with conn.scope:
                await conn.send({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                                     "package": "qmp_peer"},
                                         "capabilities": ["oob"]}})
                in_band_send, in_band_recv = trio.open_memory_channel[dict](1)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._in_order, conn, in_band_recv)
                    async with in_band_send:
                        async for msg in conn.lines():
                            if "exec-oob" in msg or self.concurrent:
                                nursery.start_soon(self._dispatch, conn, msg)
                            else:  # one at a time, in order; the reader goes on (for exec-oob)
                                await in_band_send.send(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._conns.remove(conn)
            await conn.close()

    async def _in_order(self, conn: _Conn, queue: trio.MemoryReceiveChannel[dict]) -> None:
        async for msg in queue:
            await self._dispatch(conn, msg)

    async def _dispatch(self, conn: _Conn, msg: dict) -> None:
        oob = "exec-oob" in msg
        cmd, args, msg_id = msg.get("exec-oob" if oob else "execute"), msg.get("arguments", {}), msg.get("id")
        reply: dict[str, Any]
        while self.main_loop_blocked and not oob and cmd != "qmp_capabilities":
            await trio.sleep(0.01)
        if oob and not conn.oob:
            await conn.send(_with_id({"error": {"class": "GenericError",
                                                "desc": "Please enable out-of-band first for the session during"
                                                        " capabilities negotiation"}}, msg_id))
            return
        if cmd == "qmp_capabilities":
            conn.oob = "oob" in args.get("enable", [])
            conn.negotiated = True  # emit() now queues behind the lock taken below
            async with conn.send_lock:  # reply + early events, nothing in between
                await conn.send_unlocked(_with_id({"return": {}}, msg_id))
                for event, data in self.events_on_negotiate:
                    await conn.send_unlocked(_event(event, data))
            return
        self.received.append((cmd, args))
        if not conn.negotiated:
            reply = {"error": {"class": "CommandNotFound",
                               "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
        elif cmd == "quit":
            if self.reply_to_quit:
                await conn.send(_with_id({"return": {}}, msg_id))
            if self.close_on_quit:
                await conn.close()
            return
        elif cmd not in self.handlers:
            reply = {"error": {"class": "CommandNotFound", "desc": f"The command {cmd} has not been found"}}
        else:
            try:
                result = self.handlers[cmd](args)
                if inspect.isawaitable(result):
                    result = await result
            except PeerError as exc:
                reply = {"error": {"class": exc.error_class, "desc": exc.desc}}
            else:
                if result is NO_REPLY:
                    return
                reply = {"return": result}
        await conn.send(_with_id(reply, msg_id))

    @staticmethod
    async def _sleep(args: dict) -> dict:
        await trio.sleep(args.get("seconds", 0))
        return {"slept": args.get("seconds", 0), "tag": args.get("tag")}

    @staticmethod
    async def _hang(args: dict) -> object:
        await trio.sleep_forever()
        return NO_REPLY


class _Conn:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.negotiated = False
        self.oob = False  # the client enabled the oob capability
        self.scope = trio.CancelScope()
        self.send_lock = trio.Lock()
        self._closed = False

    async def send(self, obj: dict) -> None:
        async with self.send_lock:
            await self.send_unlocked(obj)

    async def send_unlocked(self, obj: dict) -> None:
        await self.stream.send_all(json.dumps(obj).encode() + b"\r\n")

    async def lines(self):
        """Messages as QEMU parses them: a stream of JSON objects, newlines optional."""
        decoder = json.JSONDecoder()
        buf = ""
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                return
            buf += data.decode()
            while True:
                buf = buf.lstrip()
                try:
                    obj, end = decoder.raw_decode(buf)
                except json.JSONDecodeError:
                    break  # incomplete: wait for more bytes
                buf = buf[end:]
                yield obj

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.scope.cancel()
            with trio.CancelScope(shield=True):
                await self.stream.aclose()


def _with_id(reply: dict, msg_id: object) -> dict:
    if msg_id is not None:
        reply["id"] = msg_id
    return reply


def _event(event: str, data: dict | None) -> dict:
    now = time.time()
    msg: dict[str, Any] = {"event": event,
                           "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}}
    if data is not None:
        msg["data"] = data
    return msg
