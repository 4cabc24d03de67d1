"""A trio <-> asyncio bridge built on one dedicated asyncio thread.

qemu.qmp is written for asyncio; the rest of qsup runs on trio. Two ways to
make them meet were considered:

* **trio-asyncio** runs an asyncio loop *inside* trio. It works, but it
  patches asyncio process-wide (every other asyncio user in the process,
  e.g. pyroute2's AsyncIPRoute, runs on the patched loop), it is measurably
  slower for QMP (measured: see BENCHMARKS.md) and it
  does not import on Python 3.14. A supervisor that must outlive a Python
  upgrade cannot depend on it.
* **A dedicated asyncio thread** (this module) leaves asyncio untouched: one
  ordinary ``asyncio`` loop runs forever in a daemon thread, and trio code
  sends it work. The price is cross-thread wake-ups, which this module keeps
  to one per direction at most, and the QMP client to a single one per
  command (see ``_wire.py``).

Three primitives, from general to fast:

* ``AsyncioThread.run(coro_fn, *args)`` runs a coroutine as an asyncio task.
  The trio side copies its ``contextvars`` context (so structlog's bound
  variables -- ``structlog.contextvars.bind_contextvars`` -- are visible to
  the asyncio code), queues the task's creation with
  ``loop.call_soon_threadsafe`` and sleeps in
  ``trio.lowlevel.wait_task_rescheduled``. The task hands its outcome back
  with ``TrioToken.run_sync_soon``: no ``concurrent.futures.Future``, no
  worker thread parked in ``fut.result()`` -- that is what made the naive
  bridge slow.
* ``AsyncioThread.run_callback(start, ...)`` runs a plain loop callback that
  later calls ``complete(outcome)``: no asyncio task at all.
* ``Completion`` is the wake-up itself: a trio task creates one, hands
  ``complete`` to code on the loop thread and ``wait()``s. The QMP client
  uses this: the trio thread writes the command, the loop thread's reader
  completes it.

Wake-ups sent from the loop thread are deferred to the moment the loop is
about to block (``_FlushingSelector``): the woken trio thread then finds the
GIL free instead of waking only to wait for it.

Cancellation, both ways:

* trio -> asyncio (``run``): when the trio task is cancelled, the abort
  callback asks the loop to ``task.cancel()`` the asyncio task and returns
  ``Abort.FAILED``: the trio task keeps sleeping until the asyncio task has
  really finished (its ``finally`` blocks have run). If it finished by being
  cancelled, the trio task gets ``trio.Cancelled``; if it managed to finish
  anyway, the trio task gets its real result (Trio's rule: an operation that
  completed is not undone).
* ``run_callback``/``Completion`` have nothing to wait for: cancellation is
  immediate, an ``on_cancel`` hook lets the owner forget the operation, and
  a completion arriving later is ignored.
* asyncio -> trio: if the asyncio task is cancelled for another reason
  (the loop is shutting down), the trio caller gets ``RuntimeError`` rather
  than hanging forever.

One ``AsyncioThread`` serves any number of clients and concurrent calls.
"""

from __future__ import annotations

import asyncio
import contextvars
import selectors
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar, TypeVarTuple

import outcome
import trio

T = TypeVar("T")
A = TypeVar("A")
Ts = TypeVarTuple("Ts")

_CANCELLED = object()  # sentinel outcome: the asyncio task was cancelled


class AsyncioThread:
    """One asyncio event loop running forever in a daemon thread.

    Use ``start()``/``close()`` or ``with AsyncioThread() as aio: ...``.
    ``close()`` cancels whatever is still running on the loop, waits for it
    and stops the thread; close your clients first.
    """

    def __init__(self, name: str = "qmp-asyncio") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._selector: _FlushingSelector | None = None

    # -- lifecycle --------------------------------------------------------

    def start(self) -> AsyncioThread:
        if self._thread is not None:
            raise RuntimeError("AsyncioThread already started")
        ready = threading.Event()
        self._selector = _FlushingSelector()
        loop = asyncio.SelectorEventLoop(self._selector)
        self._thread = threading.Thread(
            target=self._main, args=(loop, self._selector, ready), name=self._name,
            daemon=True
        )
        self._thread.start()
        ready.wait()
        self._loop = loop
        return self

    @staticmethod
    def _main(loop: asyncio.AbstractEventLoop, selector: _FlushingSelector,
              ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            # Calls queued just before close() have not started yet: let them
            # start, then cancel them too, so every trio caller is answered.
            loop.run_until_complete(_cancel_all_and_stop(stop=False))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            selector.flush()  # wake-ups queued in the very last iteration

    def close(self, timeout: float = 5.0) -> None:
        """Cancel leftover tasks, stop the loop and join the thread. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if threading.current_thread() is thread:
            raise RuntimeError("AsyncioThread.close() called from its own loop thread")
        self._loop = None
        if not loop.is_closed():
            asyncio.run_coroutine_threadsafe(_cancel_all_and_stop(), loop)
        thread.join(timeout)
        self._thread = None

    def __enter__(self) -> AsyncioThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop (for code that must schedule on it directly)."""
        if self._loop is None:
            raise RuntimeError("AsyncioThread is not running")
        return self._loop

    def to_trio(self, token: trio.lowlevel.TrioToken, fn: Callable[[A], None], arg: A) -> None:
        """From any thread: run ``fn(arg)`` in that trio run soon (``run_sync_soon``).

        From the loop thread the wake-up is sent when the loop is about to
        block (see ``_FlushingSelector``); order is FIFO either way. ``fn``
        runs outside any trio task and must not raise.
        """
        if self._selector is None:
            raise RuntimeError("AsyncioThread is not running")
        self._selector.to_trio(token, fn, arg)

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    # -- the bridge -------------------------------------------------------

    async def run(self, coro_fn: Callable[[*Ts], Awaitable[T]], *args: *Ts) -> T:
        """From trio: run ``coro_fn(*args)`` on the asyncio loop and return its result.

        The coroutine sees the caller's contextvars. Cancelling the trio
        caller cancels the asyncio task and waits until it has finished.
        """
        loop = self.loop
        selector = self._selector
        if selector is None:  # set before the loop, never cleared: not reached
            raise RuntimeError("AsyncioThread is not running")
        await trio.lowlevel.checkpoint_if_cancelled()
        call = _Call(loop, selector, coro_fn, args)
        loop.call_soon_threadsafe(call.start)
        result: T = await trio.lowlevel.wait_task_rescheduled(call.abort)  # the coroutine's outcome
        return result

    def completion(self) -> Completion[Any]:
        """From trio: a one-shot wake-up for the current task, completable from any thread.

        For work the trio task starts itself and that finishes on the loop
        thread (see ``Completion``).
        """
        if self._selector is None:
            raise RuntimeError("AsyncioThread is not running")
        return Completion(self._selector)

    async def run_callback(self, start: Callable[..., None], *args: Any,
                           cancel: Callable[[], None] | None = None) -> Any:
        """From trio: run ``start(*args, complete)`` on the loop, wait for ``complete``.

        For work that needs no asyncio task: ``start`` runs as a plain loop
        callback (in the caller's contextvars context) and arranges for
        ``complete(outcome)`` to be called later. Cancellation is immediate
        (see ``Completion.wait``); ``cancel()``, if given, is then queued on
        the loop so the operation can be forgotten. Exceptions raised by
        ``start`` itself go to the caller.
        """
        loop = self.loop
        await trio.lowlevel.checkpoint_if_cancelled()
        done: Completion[Any] = self.completion()
        loop.call_soon_threadsafe(done.start_on_loop, start, args,
                                  context=contextvars.copy_context())

        def on_cancel() -> None:
            if cancel is not None:
                try:
                    loop.call_soon_threadsafe(cancel)
                except RuntimeError:
                    pass  # loop closed: nothing left to forget

        return await done.wait(on_cancel)


class _Call:
    """State of one bridged call; methods are annotated with their thread."""

    __slots__ = ("loop", "selector", "coro_fn", "args", "ctx", "token", "trio_task",
                 "atask", "raise_cancel")

    def __init__(self, loop: asyncio.AbstractEventLoop, selector: _FlushingSelector,
                 coro_fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        self.loop = loop
        self.selector = selector
        self.coro_fn = coro_fn
        self.args = args
        self.ctx = contextvars.copy_context()
        self.token = trio.lowlevel.current_trio_token()
        self.trio_task = trio.lowlevel.current_task()
        # Strong reference: asyncio only keeps weak references to tasks.
        self.atask: asyncio.Task[None] | None = None
        self.raise_cancel: Callable[[], Any] | None = None

    # asyncio thread
    def start(self) -> None:
        self.atask = self.loop.create_task(self._runner(), context=self.ctx)

    # asyncio thread
    async def _runner(self) -> None:
        try:
            result: Any = outcome.Value(await self.coro_fn(*self.args))
        except asyncio.CancelledError:
            result = _CANCELLED
        except BaseException as exc:  # noqa: BLE001 - handed to the trio caller
            result = outcome.Error(exc)
        self.selector.to_trio(self.token, self._wake, result)

    # trio thread
    def abort(self, raise_cancel: Callable[[], Any]) -> trio.lowlevel.Abort:
        self.raise_cancel = raise_cancel
        try:
            self.loop.call_soon_threadsafe(self._cancel)
        except RuntimeError:
            # Loop already closed: its shutdown cancelled (and reported) the
            # task, or will never run it. Either way _wake comes or never will;
            # give up waiting only in the latter case.
            if self.atask is None:
                return trio.lowlevel.Abort.SUCCEEDED
        return trio.lowlevel.Abort.FAILED

    # asyncio thread
    def _cancel(self) -> None:
        if self.atask is not None:
            self.atask.cancel()

    # trio thread (run_sync_soon: must never raise)
    def _wake(self, result: Any) -> None:
        if result is _CANCELLED:
            if self.raise_cancel is not None:
                result = outcome.capture(self.raise_cancel)
            else:
                result = outcome.Error(
                    RuntimeError("asyncio task was cancelled (event loop shutting down?)")
                )
        trio.lowlevel.reschedule(self.trio_task, result)


class _FlushingSelector(selectors.DefaultSelector):
    """The loop's selector, which wakes trio only when the loop is about to sleep.

    Waking a trio task from the loop thread while this thread still has
    Python work to do (finish the reader task's step, start the next
    ``readline``, run the rest of the loop iteration) makes the woken trio
    thread wait for the GIL, and then be woken a second time when the GIL is
    released: two cross-CPU wake-ups where one would do. So wake-ups made on
    the loop thread are queued and sent in ``select()``, immediately before
    the loop blocks (and releases the GIL).
    The delay is at most one loop iteration; FIFO order is kept.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: list[tuple[trio.lowlevel.TrioToken, Callable[..., None], Any]] = []
        self._thread_id: int | None = None

    def to_trio(self, token: trio.lowlevel.TrioToken, fn: Callable[[A], None], arg: A) -> None:
        """Run ``fn(arg)`` on trio soon; from the loop thread, at its next select()."""
        if threading.get_ident() == self._thread_id:
            self._pending.append((token, fn, arg))
        else:
            _run_sync_soon(token, fn, arg)

    def flush(self) -> None:
        """Send the queued wake-ups now."""
        if self._pending:
            pending, self._pending = self._pending, []
            for token, fn, arg in pending:
                _run_sync_soon(token, fn, arg)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if self._thread_id is None:
            self._thread_id = threading.get_ident()
        self.flush()
        return super().select(timeout)


def _run_sync_soon(token: trio.lowlevel.TrioToken, fn: Callable[[A], None], arg: A) -> None:
    try:
        token.run_sync_soon(fn, arg)
    except trio.RunFinishedError:
        pass  # that trio run is over: nobody is waiting any more


class Completion(Generic[T]):
    """A one-shot wake-up of one trio task, fired from any thread.

    Created by (and for) the current trio task; ``complete(outcome)`` may be
    called from the loop thread or any other thread, once or more (only the
    first counts); the task sleeping in ``wait()`` then gets that outcome --
    ``outcome.Value(x)`` returns ``x``, ``outcome.Error(e)`` raises ``e``.
    From the loop thread the wake-up is sent when the loop is about to block
    (``_FlushingSelector``), so it costs the trio thread a single wake-up.
    """

    __slots__ = ("selector", "token", "trio_task", "finished", "waiting", "early")

    def __init__(self, selector: _FlushingSelector) -> None:
        self.selector = selector
        self.token = trio.lowlevel.current_trio_token()
        self.trio_task = trio.lowlevel.current_task()
        # Trio-thread-only state:
        self.finished = False  # completed, failed or cancelled: ignore what comes next
        self.waiting = False   # the task sleeps in wait()
        self.early: outcome.Outcome[T] | None = None  # completed before wait()

    async def wait(self, on_cancel: Callable[[], None] | None = None) -> T:
        """Trio: sleep until ``complete``. Cancellation is immediate: the task
        gets ``trio.Cancelled`` at once, ``on_cancel()`` runs (on the trio
        thread) and a later ``complete`` is ignored. A completion that came
        before ``wait()`` is returned at once."""
        if self.early is not None:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return self.early.unwrap()
        self.waiting = True

        def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
            self.finished = True
            if on_cancel is not None:
                on_cancel()
            return trio.lowlevel.Abort.SUCCEEDED

        result: T = await trio.lowlevel.wait_task_rescheduled(abort)  # what complete() was given
        return result

    # any thread
    def complete(self, result: outcome.Outcome[T]) -> None:
        self.selector.to_trio(self.token, self._wake, result)

    # asyncio thread, for run_callback
    def start_on_loop(self, start: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            start(*args, self.complete)
        except BaseException as exc:  # noqa: BLE001 - handed to the trio caller
            self.complete(outcome.Error(exc))

    # trio thread
    def fail(self, exc: BaseException) -> None:
        """Trio thread: complete with ``exc`` now (e.g. a timeout)."""
        self._wake(outcome.Error(exc))

    # trio thread (run_sync_soon: must never raise)
    def _wake(self, result: outcome.Outcome[T]) -> None:
        if self.finished:  # cancelled, timed out or already completed
            return
        self.finished = True
        if self.waiting:
            trio.lowlevel.reschedule(self.trio_task, result)
        else:
            self.early = result


async def _cancel_all_and_stop(stop: bool = True) -> None:
    """Runs on the loop: cancel every other task, wait for them, stop the loop."""
    await asyncio.sleep(0)  # let already-queued start() callbacks create their tasks
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    for t in tasks:
        t.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
    if stop:
        asyncio.get_running_loop().stop()
