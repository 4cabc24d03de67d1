"""The asyncio half of a QMP connection: qemu.qmp, lightly adapted.

qemu.qmp's objects live on the ``AsyncioThread``'s loop. ``_client.py`` (the
trio half) reaches them through ``AsyncioThread.run`` (``open``, ``close``)
and through three small thread-safe methods it calls directly from the trio
thread: ``register``/``forget`` (the reply routing table, guarded by a lock)
and ``outbound`` (serialization). The two callbacks the trio half passes in
(``on_event``, ``on_down``) are invoked here, on the loop thread.

What we change in qemu.qmp, and why. qemu.qmp stays in charge of the
connection, the greeting, capabilities negotiation, the reader task, stream
errors and disconnection; we adapt it through the hooks its docs name as
extension points (``_on_message``, ``_cb_inbound``, ``_cb_outbound``) plus
``Message`` serialization for writing:

* **Commands** take a short path. qemu.qmp's ``execute`` costs an asyncio
  task per call, a hop through the writer task's queue and a hop through a
  per-call reply queue (three loop iterations), plus a thread hop to get
  there. Instead the trio side registers a completion callback under the
  message id (``Session.register``) and writes the command itself
  (``_wire.py``); the reader task's ``_on_message`` hands the reply straight
  to that callback, which wakes the trio caller: one thread hop per call.
  Measured effect: ``integration/bench/qmp_rtt.py``. Ids are ``qg#N``, so a
  late reply to a cancelled call can never be mistaken for the reply to a
  later one.
* **Events** bypass qemu.qmp's default ``EventListener``. That listener
  keeps every event ever received in an unbounded queue *and* a history list
  -- a memory leak for a supervisor that runs for months. We forward each
  event straight to trio instead, from the reader task, so they are buffered
  (on the trio side) from the moment the session is established and arrive in
  wire order.
* **Logging** of every message: qemu.qmp formats ``str(msg)`` (an indented
  ``json.dumps``) for its debug log even when debug logging is off. That is
  two pretty-printings per command on the hot path; we only format when the
  logger will actually emit.

Connection loss is detected by watching qemu.qmp's ``runstate``: when it
leaves ``RUNNING`` (reader hit EOF, socket error, or we disconnected), the
trio side is told at once (so the event iterator ends promptly), every
pending command fails with ``QMPConnectionLost``, then the session is reaped
with ``disconnect()``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from typing import cast

import outcome
from qemu.qmp import ConnectError, Message, Runstate
from qemu.qmp import QMPClient as _QemuQMPClient

from ._errors import QMPConnectionLost
from ._types import QMPEvent

#: where a command's reply goes: ``complete(Value(reply))`` or ``complete(Error(exc))``
Complete = Callable[[outcome.Outcome[Message]], None]

# Prefix of the ids we give commands; qemu.qmp's own are "__qmp#NNNNN".
ID_PREFIX = "qg#"


class _GlueQMP(_QemuQMPClient):
    """qemu.qmp's client with events forwarded, our replies routed, lazy logging."""

    def __init__(self, name: str, on_event: Callable[[QMPEvent], None]) -> None:
        super().__init__(name)
        self._forward_event = on_event
        #: id -> (command, complete) for commands registered by Session.register
        self.replies: dict[str, tuple[str, Complete]] = {}

    async def _on_message(self, msg: Message) -> None:
        if "event" in msg:
            self._forward_event(_event_dict(msg))
            return
        msg_id = msg.get("id")
        if isinstance(msg_id, str) and msg_id.startswith(ID_PREFIX):
            waiter = self.replies.pop(msg_id, None)
            if waiter is not None:
                waiter[1](outcome.Value(msg))
            else:  # its caller was cancelled or timed out: drop it, quietly
                self.logger.debug("Late reply to %s dropped", msg_id)
            return
        await super()._on_message(msg)

    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", str(msg))
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", str(msg))
        return msg


# asyncio's socket transports read with recv(256 KiB). A buffer that size is
# above glibc's mmap threshold, so *every* read -- every QMP reply -- costs
# mmap + mremap + munmap and fresh page faults (seen with strace). 64 KiB
# stays on the heap; a bigger message (query-qmp-schema) simply takes a few
# reads.
_READ_SIZE = 64 * 1024


def _shrink_read_size(qmp: _QemuQMPClient) -> None:
    writer = qmp._writer  # noqa: SLF001 - qemu.qmp's stream, set once connected
    transport = writer.transport if writer is not None else None
    if transport is not None and getattr(transport, "max_size", 0) > _READ_SIZE:
        # an asyncio detail (not in WriteTransport's type); harmless if it goes away
        transport.max_size = _READ_SIZE  # type: ignore[attr-defined]


def _event_dict(msg: Message) -> QMPEvent:
    """A QMP event as a plain dict with the three documented keys always present."""
    return cast(QMPEvent, {  # parsed JSON, as QMP documents it
        "event": msg["event"],
        "data": msg.get("data", {}),
        "timestamp": msg.get("timestamp", {}),
    })


class Session:
    """One QMP connection on the asyncio loop. Created on the trio thread,
    used only on the loop thread (qemu.qmp objects create asyncio primitives
    lazily, so constructing it elsewhere is fine)."""

    def __init__(self, name: str, on_event: Callable[[QMPEvent], None],
                 on_down: Callable[[str], None]) -> None:
        self.name = name
        self.qmp = _GlueQMP(name, on_event)
        self._on_down = on_down
        self._watcher: asyncio.Task[None] | None = None
        self._close_task: asyncio.Task[None] | None = None
        # Guards registering a reply route against failing them all at once;
        # the trio thread registers, the loop thread fails (see register()).
        self._lock = threading.Lock()
        self._down = False
        self.down_reason = "connection closed"

    async def open(self, sock: socket.socket) -> None:
        """Greet and negotiate over an already connected socket (qemu.qmp owns it then)."""
        try:
            await self.qmp.connect(sock)
        except ConnectError as exc:
            raise QMPConnectionLost(f"QMP {self.name}: handshake failed: {exc}") from exc
        _shrink_read_size(self.qmp)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def register(self, msg_id: str, cmd: str, complete: Complete) -> None:
        """Any thread: route the reply to ``msg_id`` to ``complete(Value(msg))``.

        Called by the trio side *before* it writes the command, so the reply
        cannot arrive unrouted. Raises ``QMPConnectionLost`` if the connection
        is already down; otherwise ``complete`` is guaranteed to be called,
        with the reply or with ``QMPConnectionLost`` (see ``_fail_pending``).
        """
        with self._lock:
            if self._down:
                raise QMPConnectionLost(
                    f"QMP {self.name}: cannot send {cmd!r}, connection is down "
                    f"({self._reason_now()})")
            self.qmp.replies[msg_id] = (cmd, complete)

    def forget(self, msg_id: str) -> None:
        """Any thread: the caller gave up on ``msg_id``; a late reply is dropped."""
        self.qmp.replies.pop(msg_id, None)

    def outbound(self, msg: Message) -> bytes:
        """The wire bytes of ``msg``, through qemu.qmp's outbound hook (logging)."""
        return bytes(self.qmp._cb_outbound(msg))  # noqa: SLF001 - documented hook

    async def close(self) -> None:
        """Disconnect (idempotent, safe to call concurrently)."""
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self._disconnect())
        await asyncio.shield(self._close_task)

    # -- internals ----------------------------------------------------------

    async def _watch(self) -> None:
        reason = "the asyncio thread is shutting down"
        try:
            while self.qmp.runstate == Runstate.RUNNING:
                await self.qmp.runstate_changed()
            reason = self._reason_now()
        finally:  # also when cancelled: no caller may be left waiting
            self._on_down(reason)
            self._fail_pending(reason)
        await self.close()

    def _fail_pending(self, reason: str) -> None:
        with self._lock:
            self._down = True
            replies, self.qmp.replies = self.qmp.replies, {}
        for cmd, complete in replies.values():
            complete(outcome.Error(QMPConnectionLost(
                f"QMP {self.name}: connection lost while {cmd!r} was pending "
                f"({reason}); whether it took effect is unknown")))

    async def _disconnect(self) -> None:
        try:
            await self.qmp.disconnect()
        except EOFError:
            self.down_reason = "QEMU closed the connection (EOF)"
        except Exception as exc:  # noqa: BLE001 - the reason is all we need
            self.down_reason = f"{type(exc).__name__}: {exc}"

    def _reason_now(self) -> str:
        """Best description of why the connection went down, available early.

        ``disconnect()`` reports the reader's error only at the end; peek at
        the finished reader task to name it as soon as it is known.
        """
        reader = self.qmp._reader_task  # noqa: SLF001 - diagnostics only
        if reader is not None and reader.done() and not reader.cancelled():
            exc = reader.exception()
            if isinstance(exc, EOFError):
                return "QEMU closed the connection (EOF)"
            if exc is not None:
                return f"{type(exc).__name__}: {exc}"
        return self.down_reason
