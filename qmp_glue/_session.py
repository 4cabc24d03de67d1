"""The asyncio half of a QMP connection: qemu.qmp, lightly adapted.

Everything in this module runs on the ``AsyncioThread``'s loop, never on the
trio thread. ``_client.py`` is the trio half and reaches this one only via
``AsyncioThread.run`` (calls) and via the two callbacks it passes in
(``on_event``, ``on_down``), which must be thread-safe because they are
invoked here, on the asyncio thread.

What we change in qemu.qmp, and why. qemu.qmp stays in charge of the
connection, the greeting, capabilities negotiation, the reader task, stream
errors and disconnection; we adapt it through the hooks its docs name as
extension points (``_on_message``, ``_cb_inbound``, ``_cb_outbound``) plus
its message writer (``_do_send``):

* **Commands** take a short path (``Session.submit``). ``QMPClient.execute``
  costs an asyncio task per call, a hop through the writer task's queue and a
  hop through a per-call reply queue: three extra loop iterations, on top of
  two thread hops. Here, ``submit`` runs as a plain loop callback, writes the
  message at once and registers a completion callback under the message id;
  the reader task's ``_on_message`` hands the reply straight to that
  callback, which wakes the trio caller. Measured effect: see
  ``integration/bench/qmp_rtt.py``. Ids are ``qg#N``, so a late reply to a
  cancelled call can never be mistaken for the reply to a later one.
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
from collections.abc import Callable, Mapping
from typing import Any

import outcome
from qemu.qmp import ConnectError, Message, Runstate
from qemu.qmp import QMPClient as _QemuQMPClient

from ._errors import QMPConnectionLost

# Prefix of the ids we give commands; qemu.qmp's own are "__qmp#NNNNN".
ID_PREFIX = "qg#"


class _GlueQMP(_QemuQMPClient):
    """qemu.qmp's client with events forwarded, our replies routed, lazy logging."""

    def __init__(self, name: str, on_event: Callable[[dict], None]) -> None:
        super().__init__(name)
        self._forward_event = on_event
        #: id -> (command, complete) for commands sent by Session.submit
        self.replies: dict[str, tuple[str, Callable[[outcome.Outcome], None]]] = {}

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

    def send_now(self, msg: Message) -> None:
        """Write ``msg`` at once, exactly as qemu.qmp's writer task would.

        qemu.qmp's ``_send`` is ``_do_send(_cb_outbound(msg))`` behind an
        ``async def``; the writer task that normally calls it costs a loop
        iteration per command. Writing from the caller keeps wire order (the
        loop is single-threaded) and qemu.qmp's stream and hooks.
        """
        self._do_send(self._cb_outbound(msg))

    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", str(msg))
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", str(msg))
        return msg


def _event_dict(msg: Message) -> dict:
    """A QMP event as a plain dict with the three documented keys always present."""
    return {
        "event": msg["event"],
        "data": msg.get("data", {}),
        "timestamp": msg.get("timestamp", {}),
    }


class Session:
    """One QMP connection on the asyncio loop. Created on the trio thread,
    used only on the loop thread (qemu.qmp objects create asyncio primitives
    lazily, so constructing it elsewhere is fine)."""

    def __init__(self, name: str, on_event: Callable[[dict], None],
                 on_down: Callable[[str], None]) -> None:
        self.name = name
        self.qmp = _GlueQMP(name, on_event)
        self._on_down = on_down
        self._watcher: asyncio.Task | None = None
        self._close_task: asyncio.Task | None = None
        self.down_reason = "connection closed"

    async def open(self, sock: socket.socket) -> None:
        """Greet and negotiate over an already connected socket (qemu.qmp owns it then)."""
        try:
            await self.qmp.connect(sock)
        except ConnectError as exc:
            raise QMPConnectionLost(f"QMP {self.name}: handshake failed: {exc}") from exc
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def submit(self, cmd: str, args: Mapping[str, Any] | None, msg_id: str,
               complete: Callable[[outcome.Outcome], None]) -> None:
        """Loop thread: send one command; ``complete(Value(reply_message))`` later.

        This is ``AsyncioThread.run_callback``'s ``start``: no asyncio task,
        no queue. If the connection goes down first, ``complete`` gets
        ``QMPConnectionLost`` (see ``_fail_pending``).
        """
        if self.qmp.runstate != Runstate.RUNNING:
            raise QMPConnectionLost(
                f"QMP {self.name}: cannot send {cmd!r}, connection is down "
                f"({self._reason_now()})")
        body: dict[str, Any] = {"execute": cmd, "id": msg_id}
        if args is not None:
            body["arguments"] = args
        msg = Message(body)  # serializes now: bad arguments raise here
        self.qmp.replies[msg_id] = (cmd, complete)
        self.qmp.send_now(msg)

    def forget(self, msg_id: str) -> None:
        """Loop thread: the caller gave up on ``msg_id``; a late reply is dropped."""
        self.qmp.replies.pop(msg_id, None)

    async def close(self) -> None:
        """Disconnect (idempotent, safe to call concurrently)."""
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self._disconnect())
        await asyncio.shield(self._close_task)

    # -- internals ----------------------------------------------------------

    async def _watch(self) -> None:
        while self.qmp.runstate == Runstate.RUNNING:
            await self.qmp.runstate_changed()
        reason = self._reason_now()
        self._on_down(reason)
        self._fail_pending(reason)
        await self.close()

    def _fail_pending(self, reason: str) -> None:
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
