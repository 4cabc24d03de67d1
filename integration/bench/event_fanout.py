#!/usr/bin/env python3
"""Bench: EventLog fan-out latency to many trio followers, and the cost of emit().

What it does, on a temporary SQLite file (WAL, synchronous=NORMAL, like the daemon):

1. ``emit()`` cost alone: N emits back to back with no reader (goal: < 100 us typical).
2. Fan-out: READERS concurrent ``follow()`` readers in one trio process; one task emits EVENTS
   events paced at RATE Hz. For each event and each reader, latency = reader's receipt time minus
   the time just before ``emit()`` was called (both ``time.perf_counter()``). p50/p99 are over all
   reader-deliveries (READERS x EVENTS samples). Goal: p99 <= 10 ms.

This measures the core only; the HTTP layer adds its own overhead on top.

Run: ``.venv/bin/python integration/bench/event_fanout.py [--readers 50] [--events 2000]``.
The last line of output is one JSON object, for tooling.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import statistics
import sys
import tempfile
import time

import trio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from supervisor._eventlog import EventLog  # noqa: E402


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def bench_emit_alone(path: pathlib.Path, n: int) -> list[float]:
    """Seconds per emit() with no followers, on a fresh file."""
    durations = []
    with EventLog(path) as log:
        for i in range(n):
            t = time.perf_counter()
            log.emit("state", "vm-bench", state="running", previous="starting", i=i)
            durations.append(time.perf_counter() - t)
    return durations


async def bench_fanout(log: EventLog, readers: int, events: int, rate: float):
    """Return (delivery latencies in s, emit durations in s, per-reader counts)."""
    base = log.last_seq
    last = base + events
    emitted_at: dict[int, float] = {}
    latencies: list[float] = []
    counts = [0] * readers
    emit_durations: list[float] = []
    started = trio.Event()
    ready = 0

    async def reader(k: int) -> None:
        nonlocal ready
        async with contextlib.aclosing(log.follow(base)) as stream:
            ready += 1
            if ready == readers:
                started.set()
            async for ev in stream:
                now = time.perf_counter()
                latencies.append(now - emitted_at[ev["seq"]])
                counts[k] += 1
                if ev["seq"] >= last:
                    return

    async def emitter() -> None:
        await started.wait()
        await trio.sleep(0.05)  # every reader parked on the live wake-up
        t0 = trio.current_time()
        for i in range(events):
            await trio.sleep_until(t0 + i / rate)
            t = time.perf_counter()
            emitted_at[log.last_seq + 1] = t
            log.emit("state", "vm-bench", state="running", i=i)
            emit_durations.append(time.perf_counter() - t)

    async with trio.open_nursery() as nursery:
        for k in range(readers):
            nursery.start_soon(reader, k)
        nursery.start_soon(emitter)
    return latencies, emit_durations, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readers", type=int, default=50)
    ap.add_argument("--events", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=1000.0, help="emits per second")
    ap.add_argument("--emit-alone", type=int, default=5000, help="emits for the cost test")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="qsup-event-bench-") as tmp:
        tmpdir = pathlib.Path(tmp)
        alone = bench_emit_alone(tmpdir / "alone.db", args.emit_alone)
        print(
            f"emit() alone: n={len(alone)} p50={pct(alone, 50) * 1e6:.1f} us "
            f"p99={pct(alone, 99) * 1e6:.1f} us mean={statistics.fmean(alone) * 1e6:.1f} us"
        )

        with EventLog(tmpdir / "fanout.db") as log:
            wall = time.perf_counter()
            latencies, emit_d, counts = trio.run(
                bench_fanout, log, args.readers, args.events, args.rate
            )
            wall = time.perf_counter() - wall
        expected = args.readers * args.events
        complete = all(c == args.events for c in counts)
        print(
            f"fan-out: {args.readers} readers x {args.events} events at {args.rate:.0f} Hz "
            f"in {wall:.2f} s; deliveries {len(latencies)}/{expected} "
            f"({'all complete' if complete else 'INCOMPLETE'})"
        )
        print(
            f"emit() with {args.readers} followers: p50={pct(emit_d, 50) * 1e6:.1f} us "
            f"p99={pct(emit_d, 99) * 1e6:.1f} us"
        )
        p50, p99 = pct(latencies, 50) * 1e3, pct(latencies, 99) * 1e3
        print(
            f"emit -> reader latency: p50={p50:.3f} ms p99={p99:.3f} ms "
            f"max={max(latencies) * 1e3:.3f} ms (goal p99 <= 10 ms: "
            f"{'met' if p99 <= 10 else 'NOT met'})"
        )
    print(
        json.dumps(
            {
                "bench": "event_fanout",
                "readers": args.readers,
                "events": args.events,
                "complete": complete,
                "emit_alone_p50_us": round(pct(alone, 50) * 1e6, 1),
                "emit_alone_p99_us": round(pct(alone, 99) * 1e6, 1),
                "p50_ms": round(p50, 3),
                "p99_ms": round(p99, 3),
            }
        )
    )
    if not complete:
        sys.exit(1)


if __name__ == "__main__":
    main()
