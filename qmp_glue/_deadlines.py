"""Cheap per-call timeouts for trio: one timer task instead of a CancelScope per call.

``execute(timeout=30)`` needs a deadline on every call. The obvious
``with trio.fail_after(timeout)`` costs a CancelScope enter/exit per call --
a noticeable part of a whole QMP round trip, for a timer that almost never
fires. ``Deadlines`` keeps the timers in a heap served by one trio system
task instead:

* ``call_at(deadline, fn)`` is a heap push; ``Timer.cancel()`` sets a flag
  (the entry is dropped lazily). Nothing wakes the timer task unless the new
  deadline is earlier than the one it sleeps until -- rare, since calls with
  the same timeout have increasing deadlines.
* The task sleeps until the earliest deadline, fires what is due (``fn()`` is
  sync and must not raise) and drops cancelled entries; the heap is rebuilt
  when cancelled entries dominate, so memory stays proportional to the calls
  in flight.

The task is a system task (``trio.lowlevel.spawn_system_task``), started on
first use and ended by ``close()`` or by the end of the trio run.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable

import trio

_COMPACT_MIN = 1024  # never rebuild heaps smaller than this


class Timer:
    __slots__ = ("fn", "owner")

    def __init__(self, fn: Callable[[], None], owner: Deadlines) -> None:
        self.fn: Callable[[], None] | None = fn
        self.owner = owner

    def cancel(self) -> None:
        if self.fn is not None:
            self.fn = None
            self.owner._active -= 1  # noqa: SLF001


class Deadlines:
    """Trio-thread timers; see the module docstring."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._active = 0
        self._started = False
        self._closed = False
        self._sleep_until = math.inf
        self._wakeup = trio.Event()

    def call_at(self, deadline: float, fn: Callable[[], None]) -> Timer:
        timer = Timer(fn, self)
        heapq.heappush(self._heap, (deadline, next(self._seq), timer))
        self._active += 1
        if not self._started:
            self._started = True
            trio.lowlevel.spawn_system_task(self._run, name="qmp_glue.deadlines")
        elif deadline < self._sleep_until:
            self._wakeup.set()
        if len(self._heap) > _COMPACT_MIN and len(self._heap) > 4 * self._active:
            self._heap = [e for e in self._heap if e[2].fn is not None]
            heapq.heapify(self._heap)
        return timer

    def close(self) -> None:
        self._closed = True
        self._wakeup.set()

    async def _run(self) -> None:
        try:
            while not self._closed:
                self._fire_due(trio.current_time())
                self._sleep_until = self._heap[0][0] if self._heap else math.inf
                self._wakeup = trio.Event()
                with trio.move_on_at(self._sleep_until):
                    await self._wakeup.wait()
        except trio.Cancelled:
            pass  # the trio run is ending
        finally:
            self._sleep_until = -math.inf  # nobody to wake any more

    def _fire_due(self, now: float) -> None:
        heap = self._heap
        while heap and (heap[0][2].fn is None or heap[0][0] <= now):
            _, _, timer = heapq.heappop(heap)
            fn = timer.fn
            if fn is not None:
                timer.cancel()
                fn()
