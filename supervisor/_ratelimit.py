"""How many QMP events one instance may put into the event log: a token bucket.

A guest chooses what QEMU reports about it: writing pvpanic's crashloaded bit in a loop (which,
unlike a panic, does not stop the guest), changing its RTC, triggering its watchdog... Each event
used to become one event-log row, an SQLite write on the trio thread, with no bound.  Now each
instance's events are *logged* at most ``rate`` per second after a ``burst``; the instance's
state handling still sees every one of them (the caller runs it whatever :meth:`admit` says).

The events the state machine lives by -- ``MIGRATION``, ``STOP``, ``RESUME``, ``SHUTDOWN``,
``GUEST_PANICKED`` -- are logged even from an empty bucket the first time each appears in it,
so a flood never hides the one that changed the instance's state.  What is dropped is counted;
the caller logs ``qmp.dropped`` with the count when :meth:`admit` reports it (at most once a
second, before the next event logged) and whatever is still :attr:`pending` when the stream ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: QMP events logged at least once per empty-bucket spell (their handlers always run anyway)
STATE_EVENTS = frozenset({"MIGRATION", "STOP", "RESUME", "SHUTDOWN", "GUEST_PANICKED"})
RATE = 200.0
BURST = 400
REPORT_EVERY_S = 1.0


class EventBudget:
    """One instance's allowance of logged QMP events (not thread-safe: the instance's task)."""

    def __init__(self, rate: float = RATE, burst: int = BURST, *,
                 clock: Callable[[], float] = time.monotonic, always_first: frozenset[str] = STATE_EVENTS):
        self.rate, self.burst = rate, burst
        self._clock = clock
        self._always_first = always_first
        self._tokens = float(burst)
        self._at = clock()
        self._kept: set[str] = set()  # state events logged from the empty bucket, this spell
        self._reported_at = float("-inf")
        #: dropped and not yet reported / dropped since the instance's QMP was connected
        self.pending = 0
        self.total_dropped = 0

    def admit(self, name: str) -> tuple[bool, int]:
        """(log this event?, how many dropped events to report now, before it; 0: none)."""
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            self._kept.clear()
        elif name in self._always_first and name not in self._kept:
            self._kept.add(name)
        else:
            self.pending += 1
            self.total_dropped += 1
            return False, 0
        if self.pending and now - self._reported_at >= REPORT_EVERY_S:
            report, self.pending, self._reported_at = self.pending, 0, now
            return True, report
        return True, 0

    def flush(self) -> int:
        """What is still to report (the stream ended); resets it."""
        report, self.pending = self.pending, 0
        return report
