"""The trio half of a QMP connection: what the supervisor calls.

``connect()`` returns a ``QMPClient``; every method is a trio coroutine. The
real protocol work is qemu.qmp's, running on an ``AsyncioThread`` (see
``_bridge.py`` for the thread hop, ``_session.py`` for the asyncio half).

Events are pushed from the asyncio thread into an unbounded trio memory
channel with ``AsyncioThread.to_trio`` (``TrioToken.run_sync_soon``; FIFO, so
wire order is kept). The
channel exists from before the handshake, so no event between ``connect()``
and the first ``async for`` is lost. There is **one** event stream per
client: several tasks iterating ``events()`` at once *share* it (each event
goes to exactly one of them). Fan out yourself if several consumers need
every event.

The event stream is unbounded on purpose: QEMU's event rate is low and a
slow consumer should see every event rather than stall the reader (which
would also stall command replies).
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import math
import os
import socket
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TypedDict, TypeVar, cast

import structlog
import trio
from qemu.qmp import Message

from ._bridge import AsyncioThread, Completion
from ._deadlines import Deadlines
from ._errors import QMPConnectionLost, QMPError, QMPTimeout
from ._session import ID_PREFIX, Session
from ._types import JSONArg, JSONValue, QMPEvent
from ._wire import CommandWriter

A = TypeVar("A")

#: ``method(command, seconds, outcome)``, see :func:`observe_calls`
CallObserver = Callable[[str, float, "str | None"], None]

log = structlog.get_logger("qmp_glue")

_RETRY_FIRST = 0.005   # first pause between connection attempts (seconds)
_RETRY_MAX = 0.1       # ... doubling up to this
_CLOSE_TIMEOUT = 5.0   # aclose() never waits longer than this for qemu.qmp


_observers: list[weakref.WeakMethod[CallObserver]] = []


def observe_calls(method: CallObserver) -> None:
    """Call ``method(command, seconds, outcome)`` after every ``execute()``, on the trio thread.

    ``outcome`` is None on success, else ``"qmp_error"``, ``"timeout"``, ``"connection_lost"``
    or ``"cancelled"``.  For metrics; must be cheap and must not raise.  ``method`` is a bound
    method, held weakly: it goes away with its object.
    """
    _observers.append(weakref.WeakMethod(method))


def _notify(cmd: str, t0: float, outcome: str | None) -> None:
    seconds = time.perf_counter() - t0
    for ref in list(_observers):
        fn = ref()
        if fn is None:
            _observers.remove(ref)
        else:
            fn(cmd, seconds, outcome)


class QMPClient:
    """A connected QMP monitor. Obtain one with ``connect()``."""

    def __init__(self, loop: AsyncioThread, name: str, path: str) -> None:
        self._aio = loop
        self.name = name
        self.path = path
        self._token = trio.lowlevel.current_trio_token()
        self._ev_send, self._ev_recv = trio.open_memory_channel[QMPEvent](math.inf)
        self._session = Session(name, self._event_from_aio, self._down_from_aio)
        self._writer: CommandWriter | None = None  # set once connected
        self._deadlines = Deadlines()  # execute() timeouts, see _deadlines.py
        self._down_reason: str | None = None  # set once the connection is gone
        self._down = trio.Event()
        self._closed = False
        self._quitting = False
        self._ids = itertools.count(1)
        # Logged from run_sync_soon callbacks, which run outside any task:
        # keep the creator's context so structlog's bound variables show up.
        self._log_ctx = contextvars.copy_context()

    # -- public API -----------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return not self._closed and self._down_reason is None

    async def execute(self, cmd: str, args: Mapping[str, JSONArg] | None = None, *,
                      timeout: float | None = 30.0, oob: bool = False,
                      fds: Sequence[int] = ()) -> JSONValue:
        """Run a QMP command and return its ``return`` value.

        ``fds``: descriptors passed with the command over SCM_RIGHTS, for the commands that take
        one (``add-fd``, ``getfd``); they go with the command's own bytes, so no other command
        can take them.  The caller keeps (and closes) its copies.

        ``oob``: send it out-of-band (``exec-oob``), for the few commands QEMU allows so
        (``migrate-recover``, ``migrate-pause``): QEMU runs them on the monitor's own thread,
        so they answer even while the main loop is blocked -- a post-copy destination whose
        main thread waits on a guest page that cannot arrive.  qemu.qmp enables the ``oob``
        capability whenever QEMU's greeting offers it.

        Raises ``QMPError`` if QEMU refuses it, ``QMPConnectionLost`` if the
        connection is (or goes) down, ``QMPTimeout`` after ``timeout`` seconds
        (``None``: wait forever). A reply that arrives after a timeout or
        cancellation is dropped; it never answers a later call.
        """
        t0 = time.perf_counter()
        outcome: str | None = "cancelled"
        try:
            self._check_usable(cmd)
            reply = await self._send(cmd, args, timeout, oob, fds)
            outcome = "qmp_error" if "error" in reply else None
        except QMPTimeout:
            outcome = "timeout"
            raise
        except QMPConnectionLost:
            outcome = "connection_lost"
            raise
        finally:
            if _observers:
                _notify(cmd, t0, outcome)
        if "error" in reply:
            err = cast(_ErrorBody, reply["error"])  # QMP: {"class": ..., "desc": ...}
            raise QMPError(err.get("class", "GenericError"), err.get("desc", str(err)), cmd)
        return cast(JSONValue, reply.get("return"))  # parsed JSON

    def events(self) -> AsyncIterator[QMPEvent]:
        """The stream of QMP events, ``{"event", "data", "timestamp"}`` dicts.

        Every event is delivered once, in order, including those that arrived
        before the first iteration. Iteration ends when the connection ends
        (QEMU exits, ``quit()``, ``aclose()``). Shared, not broadcast, between
        concurrent iterators.
        """
        return _EventIterator(self._ev_recv)

    async def quit(self, *, timeout: float = 10.0) -> None:
        """Ask QEMU to exit and wait until it closes the monitor.

        The EOF that follows ``quit`` is the expected outcome, not an error.
        Raises ``QMPTimeout`` if QEMU has not closed the connection within
        ``timeout`` (the client is closed either way).
        """
        self._quitting = True
        try:
            try:
                await self.execute("quit", timeout=timeout)
            except QMPConnectionLost:
                pass  # QEMU closed the socket before (or instead of) replying
            with trio.move_on_after(timeout) as scope:
                await self._down.wait()
            if scope.cancelled_caught:
                raise QMPTimeout(f"QMP {self.name}: QEMU did not close the monitor "
                                 f"within {timeout}s after 'quit'")
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Disconnect. Idempotent; completes even if the caller is cancelled."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(_CLOSE_TIMEOUT):
                try:
                    await self._aio.run(self._session.close)
                except RuntimeError:
                    pass  # the AsyncioThread is already closed: nothing to disconnect
        self._mark_down("closed by this client")
        self._deadlines.close()

    async def __aenter__(self) -> QMPClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "connected" if self.is_connected else f"down ({self._down_reason})"
        return f"<QMPClient {self.name} {self.path} {state}>"

    # -- internals ------------------------------------------------------------

    async def _send(self, cmd: str, args: Mapping[str, JSONArg] | None,
                    timeout: float | None, oob: bool = False, fds: Sequence[int] = ()) -> Message:
        """Write the command from this (trio) thread, wait for qemu.qmp's reader
        to route the reply back (see ``_wire.py`` for why)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        writer = self._writer
        if writer is None:  # set by connect() before it returns the client: not reached
            raise QMPConnectionLost(f"QMP {self.name}: cannot send {cmd!r}, not connected")
        msg_id = f"{ID_PREFIX}{next(self._ids)}"
        body: dict[str, JSONArg] = {"exec-oob" if oob else "execute": cmd, "id": msg_id}
        if args is not None:
            body["arguments"] = args
        data = self._session.outbound(Message(body))  # bad arguments raise here
        done: Completion[Message] = self._aio.completion()
        self._session.register(msg_id, cmd, done.complete)
        try:
            await writer.write(data, fds)
        except (OSError, trio.ClosedResourceError) as exc:
            self._session.forget(msg_id)
            raise QMPConnectionLost(
                f"QMP {self.name}: connection lost, cannot send {cmd!r} ({exc or 'closed'})") from exc
        except BaseException:
            self._session.forget(msg_id)
            raise
        timer = None
        if timeout is not None:  # armed only now: it may fire only while we wait below
            timer = self._deadlines.call_at(
                trio.current_time() + timeout,
                functools.partial(self._expire, done, msg_id, cmd, timeout))
        try:
            return await done.wait(functools.partial(self._session.forget, msg_id))
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self, done: Completion[Message], msg_id: str, cmd: str, timeout: float) -> None:
        """Trio thread, from the deadline task: give up on ``msg_id``."""
        self._session.forget(msg_id)
        done.fail(QMPTimeout(f"QMP {self.name}: {cmd!r} got no reply within {timeout}s"))

    def _check_usable(self, cmd: str) -> None:
        if self._closed:
            raise QMPConnectionLost(f"QMP {self.name}: cannot send {cmd!r}, client is closed")
        if self._down_reason is not None:
            raise QMPConnectionLost(
                f"QMP {self.name}: cannot send {cmd!r}, connection is down ({self._down_reason})")

    def _mark_down(self, reason: str) -> None:
        """Trio thread: the connection is gone; end the event stream."""
        if self._down_reason is None:
            self._down_reason = reason
            if not self._quitting and not self._closed:
                self._log_ctx.run(log.warning, "qmp.connection_lost",
                                  qmp=self.name, reason=reason)
        self._down.set()
        self._ev_send.close()
        if self._writer is not None:
            self._writer.close()

    def _push_event(self, event: QMPEvent) -> None:
        """Trio thread (via run_sync_soon: must never raise)."""
        try:
            self._ev_send.send_nowait(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # nobody will ever read it

    # The two callbacks below are called on the asyncio thread.

    def _event_from_aio(self, event: QMPEvent) -> None:
        self._to_trio(self._push_event, event)

    def _down_from_aio(self, reason: str) -> None:
        self._to_trio(self._mark_down, reason)

    def _to_trio(self, fn: Callable[[A], None], arg: A) -> None:
        self._aio.to_trio(self._token, fn, arg)


_ErrorBody = TypedDict("_ErrorBody", {"class": str, "desc": str}, total=False)


class _EventIterator:
    """Async iterator over the event channel that ends cleanly at EOF."""

    def __init__(self, recv: trio.MemoryReceiveChannel[QMPEvent]) -> None:
        self._recv = recv

    def __aiter__(self) -> _EventIterator:
        return self

    async def __anext__(self) -> QMPEvent:
        try:
            return await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None


async def connect(path: str | os.PathLike[str], *, loop: AsyncioThread,
                  timeout: float = 10.0, name: str | None = None) -> QMPClient:
    """Connect to QEMU's QMP unix socket at ``path`` and negotiate capabilities.

    Retries while the socket does not exist or refuses connections (QEMU may
    still be starting), until ``timeout`` seconds have passed: then raises
    ``QMPTimeout``. The same timeout covers the greeting and negotiation.
    Other failures (QEMU hung up during the handshake, ...) raise
    ``QMPConnectionLost`` at once. Events are buffered from here on.

    The socket is connected here, on the trio side, and handed to qemu.qmp
    already connected: the retries cost no thread hops and do not fill the
    log with qemu.qmp's "Failed to establish connection" errors.
    """
    path = os.fspath(path)
    client = QMPClient(loop, name or os.path.basename(path), path)
    try:
        with trio.fail_after(timeout):
            sock = await _connect_unix(path)
            # The trio side's own descriptor, for writing; set before the
            # session starts so that a connection lost at once closes it too.
            client._writer = CommandWriter(sock.dup())  # noqa: SLF001
            try:
                await loop.run(client._session.open, sock)  # noqa: SLF001
            except BaseException:
                sock.close()  # qemu.qmp normally closed it already: then a no-op
                raise
    except trio.TooSlowError:
        await client.aclose()
        raise QMPTimeout(f"QMP {client.name}: could not connect to {path} "
                         f"within {timeout}s") from None
    except BaseException:
        await client.aclose()
        raise
    log.debug("qmp.connected", qmp=client.name, path=path)
    return client


async def _connect_unix(path: str) -> socket.socket:
    """A connected AF_UNIX socket to ``path``, retrying while nobody listens yet."""
    delay = _RETRY_FIRST
    while True:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            await trio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX)
            continue
        except BaseException:
            sock.close()
            raise
        return socket.socket(fileno=sock.detach())
