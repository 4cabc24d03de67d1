"""What a guest can make qsup take in is bounded (issue 16, finding 4).

* QEMU's stderr (``<state_dir>/logs/<name>.log``): a guest that makes QEMU warn in a loop used
  to grow it without limit.  QEMU now writes into a FIFO qsup reads and caps like the console
  (``console_max_bytes``, rotated to ``.log.1``); ``_log_tail`` reads the end by seeking.
* QMP events: a guest that writes pvpanic's crashloaded bit in a loop floods them, each one an
  SQLite write on the trio thread.  Their logging is rate-limited per instance (a token
  bucket); the state handling still sees every event, and ``qmp.dropped`` says how many were
  not logged.
"""

from __future__ import annotations

import os
import tracemalloc

import pytest
import trio

from core_harness import Bench, fake_knobs, spec, wait_for
from supervisor._console import read_tail, rotated_path
from supervisor._instance import Instance
from supervisor._ratelimit import EventBudget
from supervisor._state import State

pytestmark = pytest.mark.usefixtures("no_fakes_left")
CAP = 64 * 1024


def _kept(log) -> bytes:
    return b"".join(p.read_bytes() for p in (rotated_path(log), log) if p.exists())


def test_qemu_log_never_exceeds_the_cap(tmp_path):
    a = Bench(tmp_path, "a", console_max_bytes=CAP)
    fake_knobs(tmp_path, stderr_flood=1 << 20)  # 1 MiB of warnings: 16 times the cap

    async def main():
        async with a.running():
            inst = await a.node.start(spec(tmp_path))
            log = a.node.layout.log_path("vm")
            await wait_for(lambda: b"flood done" in _kept(log), timeout=30)
            assert log.stat().st_size + rotated_path(log).stat().st_size <= CAP
            assert _kept(log).endswith(b"fake-qemu: flood done\n")  # the newest is what is kept
            assert log.stat().st_mode & 0o777 == 0o640
            await inst.stop(force=True)

    trio.run(main)


def test_qemu_log_is_followed_again_after_a_daemon_restart(tmp_path):
    fake_knobs(tmp_path, chatty=True)  # a stderr line per query-status: the reattach asks one
    a = Bench(tmp_path, "a", console_max_bytes=CAP)

    async def first():
        async with a.running():
            await a.node.start(spec(tmp_path))
        # the node leaves its guest running, as a daemon restart does

    async def second():
        async with a.running():
            assert a.reattached == ["vm"]
            log = a.node.layout.log_path("vm")
            await wait_for(lambda: b"fake-qemu: query-status" in _kept(log))
            await a.node.instances["vm"].stop(force=True)

    trio.run(first)
    trio.run(second)


def test_a_failed_start_still_reports_qemus_words_through_the_fifo(tmp_path):
    from supervisor._instance import StartError

    a = Bench(tmp_path, "a")
    fake_knobs(tmp_path, fail="could not open disk image: guest says hello")

    async def main():
        async with a.running():
            with pytest.raises(StartError, match="could not open disk image: guest says hello"):
                await a.node.start(spec(tmp_path))

    trio.run(main)


def test_log_tail_reads_only_the_end(tmp_path):
    a = Bench(tmp_path, "a")

    async def main():
        async with a.running():
            inst = Instance(spec(tmp_path), a.node.ctx)
            log = a.node.layout.log_path("vm")
            with open(log, "wb") as f:
                f.truncate(64 << 20)  # 64 MiB a guest made QEMU write (sparse here)
                f.seek(0, os.SEEK_END)
                f.write(b"\nqemu: one\nqemu: two\nqemu: three\n")
            tracemalloc.start()
            try:
                tail = inst._log_tail()
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert tail == "qemu: one | qemu: two | qemu: three"
            assert peak < 1 << 20, f"read {peak} bytes to show three lines"

    trio.run(main)


def test_read_tail_spans_the_rotation(tmp_path):
    log = tmp_path / "vm.log"
    rotated_path(log).write_bytes(b"a" * 10000 + b"old line\n")
    log.write_bytes(b"new\n")
    assert read_tail(log, 13) == b"old line\nnew\n"
    assert read_tail(log, 3) == b"ew\n"
    assert read_tail(tmp_path / "none.log", 10) == b""


def test_a_qmp_event_flood_is_rate_limited_and_counted(tmp_path):
    a = Bench(tmp_path, "a")
    fake_knobs(tmp_path, event_flood=5000)

    async def main():
        async with a.running():
            inst = await a.node.start(spec(tmp_path))
            t0 = trio.current_time()
            await wait_for(lambda: inst.state == State.PAUSED, timeout=60)  # the STOP after the flood
            elapsed = trio.current_time() - t0
            logged = len(a.of("qmp.GUEST_CRASHLOADED"))
            assert logged <= 400 + 200 * elapsed + 10, (logged, elapsed)
            assert a.of("qmp.STOP"), "a STOP is always logged, even in a flood"
            await inst.stop(force=True)
            dropped = a.of("qmp.dropped")
            assert dropped and sum(d["count"] for d in dropped) == 5000 - logged
            assert dropped[-1]["total"] == 5000 - logged == inst.qmp_dropped

    trio.run(main)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_event_budget_bursts_then_refills_keeps_the_first_state_events_and_reports():
    clock = Clock()
    b = EventBudget(rate=200, burst=400, clock=clock)
    assert all(b.admit("RTC_CHANGE") == (True, 0) for _ in range(400))  # the burst
    assert b.admit("RTC_CHANGE") == (False, 0)
    assert b.admit("STOP") == (True, 1)  # the first STOP of an empty bucket is logged, after "1 dropped"
    assert b.admit("STOP") == (False, 0)
    assert b.admit("GUEST_PANICKED") == (True, 0) and b.admit("MIGRATION") == (True, 0)
    assert b.admit("RESUME") == (True, 0) and b.admit("SHUTDOWN") == (True, 0)
    assert b.admit("GUEST_CRASHLOADED") == (False, 0)
    assert (b.pending, b.total_dropped) == (2, 3)
    clock.t += 0.006  # one token back; the last report was under a second ago: none yet
    assert b.admit("RTC_CHANGE") == (True, 0) and b.pending == 2
    assert b.admit("RTC_CHANGE") == (False, 0)
    clock.t += 1.0  # a second on: reported before the next event logged
    assert b.admit("RTC_CHANGE") == (True, 3)
    assert (b.pending, b.total_dropped) == (0, 4)
    assert b.flush() == 0
    clock.t += 3600  # refills to the burst, no more
    assert sum(b.admit("X")[0] for _ in range(1000)) == 400
