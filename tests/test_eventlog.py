"""EventLog: seq persistence, since(), trio followers (backlog + live, slow readers), retention.

Everything runs against a real SQLite file in tmp_path; trio code runs via ``trio.run``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import signal
import sqlite3
import stat
import subprocess
import sys
import time

import pytest
import trio

from supervisor import _eventlog
from supervisor._eventlog import SEQ_SKIP_AFTER_HOST_CRASH, EventLog


@pytest.fixture
def db(tmp_path):
    return tmp_path / "events.db"


def run(fn, timeout=20):
    """trio.run with a deadline, so a lost wake-up fails the test instead of hanging it."""

    async def bounded():
        with trio.fail_after(timeout):
            return await fn()

    return trio.run(bounded)


def crash(log):
    """Leave the file as SIGKILL or a host crash would: never close()d, still marked open."""
    log._checkpointer.stop()
    log._db.close()


def seqs(events):
    return [e["seq"] for e in events]


async def collect(log, since, n, *, delay=0.0):
    """Follow ``log`` from ``since`` until ``n`` events arrived, sleeping ``delay`` per event."""
    got = []
    async with contextlib.aclosing(log.follow(since)) as events:
        async for ev in events:
            got.append(ev)
            if delay:
                await trio.sleep(delay)
            if len(got) == n:
                break
    return got


# -- seq and persistence -------------------------------------------------------------------


def test_seq_strictly_increasing_and_event_shape(db):
    with EventLog(db) as log:
        assert log.last_seq == 0
        evs = [log.emit("state", "vm1", state="running", n=i) for i in range(5)]
        assert seqs(evs) == [1, 2, 3, 4, 5]
        assert log.last_seq == 5
        assert list(evs[0])[:4] == ["seq", "ts", "instance", "type"]
        assert evs[0]["instance"] == "vm1" and evs[0]["type"] == "state"
        assert evs[0]["state"] == "running" and evs[0]["n"] == 0
        assert all(isinstance(e["ts"], float) for e in evs)
        assert [e["ts"] for e in evs] == sorted(e["ts"] for e in evs)
        assert log.emit("daemon.started")["instance"] is None


def test_seq_persists_across_clean_reopen(db):
    with EventLog(db) as log:
        for _ in range(7):
            log.emit("x")
    with EventLog(db) as log:
        assert log.last_seq == 7
        assert log.emit("y")["seq"] == 8
        assert seqs(log.since(0)) == list(range(1, 9))


def test_daemon_sigkilled_loses_nothing_and_continues_without_jump(db):
    """A real SIGKILL mid-stream: every emitted event is there and seq continues at last + 1."""
    child = (
        "import os, signal, sys\n"
        "from supervisor._eventlog import EventLog\n"
        "log = EventLog(sys.argv[1])\n"
        "for i in range(250):\n"
        "    log.emit('x', i=i)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", child, str(db)], cwd=root, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    with EventLog(db) as log:
        assert seqs(log.since(0)) == list(range(1, 251))
        assert log.emit("y")["seq"] == 251


def test_unclean_close_then_reboot_jumps_seq(db, tmp_path, monkeypatch):
    boot = tmp_path / "boot_id"
    boot.write_text("boot-A\n")
    monkeypatch.setattr(_eventlog, "_BOOT_ID_PATH", str(boot))
    log = EventLog(db)
    for _ in range(3):
        log.emit("x")
    crash(log)  # host crash
    boot.write_text("boot-B\n")
    with EventLog(db) as log2:
        ev = log2.emit("after-crash")
        assert ev["seq"] == 3 + SEQ_SKIP_AFTER_HOST_CRASH + 1
        assert seqs(log2.since(0)) == [1, 2, 3, ev["seq"]]
    # A clean close before the "reboot" means nothing could be lost: no jump.
    boot.write_text("boot-C\n")
    with EventLog(db) as log3:
        assert log3.emit("z")["seq"] == ev["seq"] + 1


def test_in_memory_log_has_seq_and_since():
    with EventLog(None) as log:
        log.emit("a")
        log.emit("b")
        assert seqs(log.since(0)) == [1, 2]
        assert log.last_seq == 2


# -- data encoding -------------------------------------------------------------------------


def test_returned_event_equals_stored_event(db):
    with EventLog(db) as log:
        ev = log.emit("t", "vm", path=pathlib.Path("/x/y"), tup=(1, 2), nested={"k": [1.5]})
        assert ev["path"] == "/x/y"  # not JSON-able -> str()
        assert ev["tup"] == [1, 2]
        assert log.since(0) == [ev]


def test_nan_becomes_null_and_stored_json_is_strict(db):
    with EventLog(db) as log:
        ev = log.emit("t", v=math.nan, inner={"w": math.inf}, ok=1.0)
        assert ev["v"] is None and ev["inner"]["w"] is None and ev["ok"] == 1.0
    body = sqlite3.connect(db).execute("SELECT body FROM events").fetchone()[0]
    json.loads(body, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))


def test_reserved_keys_refused(db):
    with EventLog(db) as log:
        with pytest.raises(TypeError, match="seq"):
            log.emit("t", seq=5)
        with pytest.raises(TypeError, match="ts"):
            log.emit("t", ts=5)
        assert log.last_seq == 0


def test_returned_event_mutation_does_not_leak(db):
    with EventLog(db) as log:
        ev = log.emit("t", a=1)
        ev["a"] = 2

        async def main():
            (got,) = await collect(log, 0, 1)
            assert got["a"] == 1

        run(main)


# -- since -----------------------------------------------------------------------------------


def test_since_is_exclusive_ordered_and_limited(db):
    with EventLog(db) as log:
        for i in range(20):
            log.emit("x", i=i)
        assert seqs(log.since(0)) == list(range(1, 21))
        assert seqs(log.since(15)) == [16, 17, 18, 19, 20]
        assert seqs(log.since(5, limit=3)) == [6, 7, 8]
        assert log.since(20) == []
        assert log.since(1000) == []


# -- follow ----------------------------------------------------------------------------------


def test_follow_false_returns_backlog_then_ends(db):
    with EventLog(db) as log:
        for _ in range(5):
            log.emit("x")

        async def main():
            got = [ev async for ev in log.follow(2, follow=False)]
            assert seqs(got) == [3, 4, 5]
            assert [ev async for ev in log.follow(5, follow=False)] == []

        run(main)


def test_follow_backlog_then_live_with_interleaved_emits(db):
    """Emits happen while the reader is still in its backlog: no gap, no duplicate."""
    total = 3000

    with EventLog(db, live_buffer=64) as log:
        for i in range(500):  # backlog bigger than the ring, so it comes from SQLite
            log.emit("x", i=i)

        async def emitter():
            for i in range(500, total):
                log.emit("x", i=i)
                if i % 7 == 0:
                    await trio.sleep(0)

        async def main():
            result = {}

            async def reader():
                result["got"] = await collect(log, 0, total)

            with trio.fail_after(20):
                async with trio.open_nursery() as n:
                    n.start_soon(reader)
                    n.start_soon(emitter)
            assert seqs(result["got"]) == list(range(1, total + 1))
            assert [e["i"] for e in result["got"]] == list(range(total))

        run(main)


def test_slow_follower_with_tiny_buffer_gets_everything_and_never_blocks_emit(db):
    total = 200
    with EventLog(db, live_buffer=4) as log:

        async def main():
            got = []
            read_when_emits_done = []

            async def reader():
                async with contextlib.aclosing(log.follow(0)) as events:
                    async for ev in events:
                        got.append(ev)
                        await trio.sleep(0.001)
                        if len(got) == total:
                            break

            async def emitter():
                await trio.sleep(0.01)  # the reader is parked waiting for live events
                for i in range(total):
                    log.emit("x", i=i)
                    if i % 50 == 0:
                        await trio.sleep(0)  # let the slow reader take a few from the ring
                read_when_emits_done.append(len(got))

            async with trio.open_nursery() as n:
                n.start_soon(reader)
                n.start_soon(emitter)
            # All emits finished while the reader was more than the ring behind: emit never
            # waited for it, and the reader had to catch up from SQLite.
            assert read_when_emits_done[0] < total - 4
            assert seqs(got) == list(range(1, total + 1))

        run(main)


def test_many_concurrent_readers_each_get_exact_sequence(db):
    total = 400
    with EventLog(db, live_buffer=16) as log:
        for _ in range(50):
            log.emit("pre")

        async def main():
            results = {}

            async def reader(k, since, delay):
                results[k] = (since, await collect(log, since, total - since, delay=delay))

            async def emitter():
                for i in range(50, total):
                    log.emit("live", i=i)
                    if i % 3 == 0:
                        await trio.sleep(0)
                    if i % 100 == 0:
                        await trio.sleep(0.005)

            with trio.fail_after(30):
                async with trio.open_nursery() as n:
                    for k in range(12):
                        since = (k * 37) % 60  # inside the backlog, some beyond the last seq
                        n.start_soon(reader, k, since, 0.0005 if k % 4 == 0 else 0.0)
                    n.start_soon(emitter)
            assert len(results) == 12
            for since, got in results.values():
                assert seqs(got) == list(range(since + 1, total + 1))

        run(main)


def test_follow_from_beyond_last_seq_waits_for_it(db):
    with EventLog(db) as log:
        log.emit("x")

        async def main():
            async with trio.open_nursery() as n:
                got = []

                async def reader():
                    got.extend(await collect(log, 3, 2))

                n.start_soon(reader)
                await trio.sleep(0.01)
                for _ in range(5):
                    log.emit("x")
            assert seqs(got) == [4, 5]

        run(main)


def test_follow_ends_when_log_closes(db):
    log = EventLog(db)
    log.emit("x")

    async def main():
        got = []

        async def reader():
            async for ev in log.follow(0):
                got.append(ev)

        with trio.fail_after(5):
            async with trio.open_nursery() as n:
                n.start_soon(reader)
                await trio.sleep(0.01)
                log.emit("y")
                await trio.sleep(0.01)
                log.close()
        assert seqs(got) == [1, 2]

    run(main)
    with pytest.raises(RuntimeError):
        log.emit("z")


def test_follow_resumes_after_reopen_without_gap_or_duplicate(db):
    with EventLog(db) as log:
        for _ in range(10):
            log.emit("a")

        async def first():
            return await collect(log, 0, 6)

        seen = run(first)
    cursor = seen[-1]["seq"]
    with EventLog(db) as log:
        for _ in range(3):
            log.emit("b")

        async def second():
            return [ev async for ev in log.follow(cursor, follow=False)]

        rest = run(second)
    assert seqs(seen + rest) == list(range(1, 14))


def test_follow_in_memory_log():
    with EventLog(None, live_buffer=2) as log:
        for _ in range(10):
            log.emit("x")

        async def main():
            return [ev async for ev in log.follow(3, follow=False)]

        assert seqs(run(main)) == list(range(4, 11))


# -- retention -------------------------------------------------------------------------------


def count_rows(db):
    with contextlib.closing(sqlite3.connect(db)) as c:
        return c.execute("SELECT count(*), min(seq) FROM events").fetchone()


def test_retention_prunes_in_batches_but_seq_continues(db):
    with EventLog(db, retention=100) as log:  # batch of 10
        for _ in range(1000):
            log.emit("x")
        rows, oldest = count_rows(db)
        assert 100 <= rows <= 110
        assert seqs(log.since(0))[-1] == 1000
        assert log.since(0)[0]["seq"] == oldest > 1
    with EventLog(db, retention=100) as log:
        assert log.emit("y")["seq"] == 1001


def test_retention_counts_rows_not_seq_numbers_across_a_jump(db, tmp_path, monkeypatch):
    boot = tmp_path / "boot_id"
    boot.write_text("boot-A\n")
    monkeypatch.setattr(_eventlog, "_BOOT_ID_PATH", str(boot))
    log = EventLog(db, retention=5)
    for _ in range(4):
        log.emit("x")
    crash(log)
    boot.write_text("boot-B\n")
    with EventLog(db, retention=5) as log:
        new = [log.emit("y")["seq"] for _ in range(3)]
        assert seqs(log.since(0)) == [3, 4] + new


def test_seq_survives_an_emptied_table(db):
    with EventLog(db) as log:
        for _ in range(5):
            log.emit("x")
    with contextlib.closing(sqlite3.connect(db)) as c:
        c.execute("DELETE FROM events")
        c.commit()
    with EventLog(db) as log:
        assert log.emit("y")["seq"] == 6


def test_follower_behind_pruned_events_resumes_at_oldest_kept(db):
    with EventLog(db, retention=10, live_buffer=2) as log:
        for _ in range(100):
            log.emit("x")

        async def main():
            return [ev async for ev in log.follow(0, follow=False)]

        got = seqs(run(main))
        assert got == list(range(got[0], 101)) and got[0] > 80


# -- sinks, file ---------------------------------------------------------------------------


def test_sinks_see_every_event_and_a_failing_sink_is_contained(db, caplog):
    seen = []

    def bad(ev):
        raise RuntimeError("boom")

    with EventLog(db) as log:
        log.subscribe_sink(bad)
        log.subscribe_sink(seen.append)
        a = log.emit("a", x=1)
        b = log.emit("b")
    assert seen == [a, b]
    assert "boom" in caplog.text


def test_files_are_private(db, tmp_path):
    old = os.umask(0o022)
    try:
        with EventLog(db) as log:
            log.emit("x")
            for p in (db, tmp_path / "events.db-wal", tmp_path / "events.db-shm"):
                assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
        loose = tmp_path / "loose.db"
        loose.touch(mode=0o644)
        os.chmod(loose, 0o644)
        EventLog(loose).close()
        assert stat.S_IMODE(os.stat(loose).st_mode) == 0o600
    finally:
        os.umask(old)


def test_wal_is_checkpointed_in_the_background_and_emptied_on_close(db, tmp_path):
    wal = tmp_path / "events.db-wal"
    with EventLog(db) as log:
        log.emit("x")
        empty_size = os.path.getsize(db)
        for i in range(3 * _eventlog._CHECKPOINT_EVERY):
            log.emit("x", pad="p" * 200, i=i)
        deadline = time.monotonic() + 5  # the writer's own autocheckpoint is at 20000 pages
        while os.path.getsize(db) <= empty_size and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.path.getsize(db) > empty_size, "no background checkpoint copied pages"
    assert not wal.exists() or os.path.getsize(wal) == 0


def test_invalid_arguments():
    with pytest.raises(ValueError):
        EventLog(None, retention=0)
    with pytest.raises(ValueError):
        EventLog(None, live_buffer=0)


def test_memory_levels_off_once_the_live_ring_and_line_cache_are_full():
    """The soak saw RSS grow for 200 migrations: the live ring (4096 events) and the API's
    encoded-line cache (8192 lines) filling.  Past both, memory must stay flat."""
    import tracemalloc

    from supervisor.api._events import _LineCache

    log, cache = EventLog(None), _LineCache()
    sample = {"data": {"status": "active"}, "qmp_ts": 1795989425.048116, "reason": "migration activated"}
    tracemalloc.start()
    try:
        def emit(n):
            for _ in range(n):
                cache.line(log.emit("qmp.MIGRATION", instance="soak-1", **sample))
            return tracemalloc.get_traced_memory()[0]

        full = emit(15000)  # both caches full (the line cache then evicts a quarter at a time)
        later = max(emit(5000) for _ in range(3))
    finally:
        tracemalloc.stop()
        log.close()
    assert later < 1.1 * full, (full, later)
