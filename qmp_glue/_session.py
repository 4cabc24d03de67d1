"""The asyncio half of a QMP connection: qemu.qmp, lightly adapted.

Everything in this module runs on the ``AsyncioThread``'s loop, never on the
trio thread. ``_client.py`` is the trio half and reaches this one only via
``AsyncioThread.run`` (calls) and via the two callbacks it passes in
(``on_event``, ``on_down``), which must be thread-safe because they are
invoked here, on the asyncio thread.

What we change in qemu.qmp, and why (all through hooks its docs name as
extension points -- ``_on_message``, ``_cb_inbound``, ``_cb_outbound``):

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
trio side is told at once (so the event iterator ends promptly), then the
session is reaped with ``disconnect()``. qemu.qmp itself fails every pending
``execute`` with ``ExecInterruptedError``, which we turn into
``QMPConnectionLost``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from qemu.qmp import (
    ConnectError,
    ExecInterruptedError,
    ExecuteError,
    Message,
    Runstate,
    StateError,
)
from qemu.qmp import QMPClient as _QemuQMPClient

from ._errors import QMPConnectionLost, QMPError

# Connection errors that mean "QEMU has not created / is not listening on the
# socket yet": connect() retries on these until its timeout.
_NOT_YET = (FileNotFoundError, ConnectionRefusedError)


class NotYetListening(Exception):
    """The socket does not accept connections yet; worth retrying."""


class _GlueQMP(_QemuQMPClient):
    """qemu.qmp's client with events forwarded and lazy message logging."""

    def __init__(self, name: str, on_event: Callable[[dict], None]) -> None:
        super().__init__(name)
        self._forward_event = on_event

    async def _on_message(self, msg: Message) -> None:
        if "event" in msg:
            self._forward_event(_event_dict(msg))
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

    async def open(self, path: str) -> None:
        """Connect and negotiate once; raise NotYetListening if worth retrying."""
        try:
            await self.qmp.connect(path)
        except ConnectError as exc:
            if isinstance(exc.exc, _NOT_YET):
                raise NotYetListening(str(exc)) from exc
            raise QMPConnectionLost(f"QMP {self.name}: cannot open {path}: {exc}") from exc
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def execute(self, cmd: str, args: Mapping[str, Any] | None) -> object:
        try:
            return await self.qmp.execute(cmd, args)
        except ExecuteError as exc:
            raise QMPError(exc.error_class, str(exc), cmd) from exc
        except ExecInterruptedError as exc:
            raise QMPConnectionLost(
                f"QMP {self.name}: connection lost while {cmd!r} was pending "
                f"({self._reason_now()}); whether it took effect is unknown"
            ) from exc
        except StateError as exc:
            raise QMPConnectionLost(
                f"QMP {self.name}: cannot send {cmd!r}, connection is down "
                f"({self._reason_now()})"
            ) from exc

    async def close(self) -> None:
        """Disconnect (idempotent, safe to call concurrently)."""
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self._disconnect())
        await asyncio.shield(self._close_task)

    # -- internals ----------------------------------------------------------

    async def _watch(self) -> None:
        while self.qmp.runstate == Runstate.RUNNING:
            await self.qmp.runstate_changed()
        self._on_down(self._reason_now())
        await self.close()

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
