"""NetconfWorker: one dedicated OS thread for all netlink work, awaited from trio.

Why one thread: the netlink socket (and pyroute2's objects) must not be
shared between threads, and pyroute2 0.9's synchronous ``IPRoute`` keeps an
asyncio loop per thread -- calling it from trio's thread cache would
rebuild loops on every call.  A single long-lived thread keeps one socket
(see :func:`netconf._nl.netlink`, which is per thread) and serialises the
host changes, which is what we want anyway: two NICs' plans never
interleave.

``await worker.run(fn, *args)`` queues ``fn`` for the thread and sleeps;
the thread wakes the trio task through the trio token when ``fn`` returns.

Cancellation: a submitted call always runs to completion -- a netlink step
is short, and abandoning it halfway would leave the journal and the host in
a state nobody is waiting for.  If the awaiting task is cancelled meanwhile,
``run`` still waits (shielded) for the result and then returns it (or
raises its exception); the pending cancellation is delivered at the task's
next checkpoint.  So the caller never loses the outcome of an apply.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import trio

from ._nl import close_thread_netlink

P = ParamSpec("P")
T = TypeVar("T")

#: ``done(ok, value)``: the call's result (``ok``) or the exception it raised
_Done = Callable[[bool, Any], None]
#: a queued call: ``(fn, args, kwargs, done)``; ``None`` stops the thread
_Job = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], _Done]


class NetconfWorker:
    def __init__(self, name: str = "netconf") -> None:
        self._name = name
        self._q: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> "NetconfWorker":
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Finish queued calls, close the thread's netlink socket, join the thread."""
        if self._thread is not None:
            self._q.put(None)
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "NetconfWorker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> "NetconfWorker":
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        await trio.to_thread.run_sync(self.close)

    def _main(self) -> None:
        try:
            while True:
                job = self._q.get()
                if job is None:
                    return
                fn, args, kw, done = job
                try:
                    done(True, fn(*args, **kw))
                except BaseException as e:  # noqa: BLE001 - delivered to the awaiting task
                    done(False, e)
        finally:
            close_thread_netlink()

    def call(self, fn: Callable[P, T], *args: P.args, **kw: P.kwargs) -> T:
        """Blocking variant for non-trio callers (tests, CLI tools)."""
        if self._thread is None:
            raise RuntimeError("NetconfWorker is not started")
        box: dict[str, Any] = {}
        ev = threading.Event()

        def done(ok: bool, value: Any) -> None:
            box["ok"], box["value"] = ok, value
            ev.set()

        self._q.put((fn, args, kw, done))
        ev.wait()
        if box["ok"]:
            value: T = box["value"]
            return value
        raise box["value"]

    async def run(self, fn: Callable[P, T], *args: P.args, **kw: P.kwargs) -> T:
        """Run ``fn(*args, **kw)`` on the worker thread and return its result."""
        if self._thread is None:
            raise RuntimeError("NetconfWorker is not started")
        token = trio.lowlevel.current_trio_token()
        event = trio.Event()
        box: dict[str, Any] = {}

        def done(ok: bool, value: Any) -> None:
            box["ok"], box["value"] = ok, value
            try:
                token.run_sync_soon(event.set)
            except trio.RunFinishedError:
                pass

        self._q.put((fn, args, kw, done))
        with trio.CancelScope(shield=True):
            await event.wait()
        if box["ok"]:
            value: T = box["value"]
            return value
        raise box["value"]
