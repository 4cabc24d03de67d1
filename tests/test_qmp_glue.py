"""qmp_glue against an in-process QMP peer (tests/qmp_peer.py): fast, no root, no QEMU."""

from __future__ import annotations

import asyncio
import contextvars
import math
import os
import shutil
import tempfile
import threading
import time
from contextlib import asynccontextmanager

import outcome
import pytest
import structlog
import trio

from qmp_glue import (
    AsyncioThread,
    QMPClient,
    QMPConnectionLost,
    QMPError,
    QMPTimeout,
    connect,
)
from qmp_peer import PeerError, QMPPeer

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def aio():
    with AsyncioThread() as loop:
        yield loop


@pytest.fixture
def sock_path():
    # Short path: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path is long.
    d = tempfile.mkdtemp(prefix="qg", dir="/tmp")
    try:
        yield os.path.join(d, "qmp.sock")
    finally:
        shutil.rmtree(d, ignore_errors=True)


@asynccontextmanager
async def peer_and_client(aio: AsyncioThread, path: str, **peer_kw):
    peer = QMPPeer(path, **peer_kw)
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.serve)
        client = await connect(path, loop=aio, timeout=5, name="vm")
        try:
            yield peer, client
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- the bridge


def test_run_returns_value_and_raises_in_trio(aio):
    async def add(a, b):
        await asyncio.sleep(0)
        assert threading.current_thread() is not threading.main_thread()
        return a + b

    async def boom():
        raise KeyError("nope")

    async def main():
        assert await aio.run(add, 2, 3) == 5
        with pytest.raises(KeyError, match="nope"):
            await aio.run(boom)

    trio.run(main)


def test_run_propagates_contextvars_including_structlog(aio):
    var = contextvars.ContextVar("var", default="unset")

    async def read_context():
        return var.get(), structlog.contextvars.get_contextvars()

    async def main():
        var.set("from-trio")
        structlog.contextvars.bind_contextvars(instance="vm1")
        try:
            assert await aio.run(read_context) == ("from-trio", {"instance": "vm1"})
        finally:
            structlog.contextvars.clear_contextvars()

    trio.run(main)


def test_trio_cancel_cancels_asyncio_task_and_waits_for_its_cleanup(aio):
    log: list[str] = []

    async def slow():
        try:
            log.append("started")
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            log.append("cancelled")
            await asyncio.sleep(0.2)  # cleanup that takes time
            log.append("cleaned up")
            raise

    async def main():
        t0 = time.monotonic()
        with trio.move_on_after(0.1) as scope:
            await aio.run(slow)
        assert scope.cancelled_caught
        # run() returned only after the asyncio task had finished its cleanup.
        assert log == ["started", "cancelled", "cleaned up"]
        assert 0.25 < time.monotonic() - t0 < 5

    trio.run(main)


def test_asyncio_task_that_finishes_despite_cancel_returns_its_result(aio):
    saw_cancel = []

    async def stubborn():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            saw_cancel.append(True)
            return "finished anyway"

    async def main():
        got = []
        with trio.move_on_after(0.05) as scope:
            got.append(await aio.run(stubborn))
        # Checked outside the cancelled scope: had run() raised Cancelled instead of
        # returning, an assert inside the scope would never have run.
        assert saw_cancel == [True], "the asyncio task was never cancelled"
        assert got == ["finished anyway"]
        assert not scope.cancelled_caught

    trio.run(main)


def test_closing_the_thread_answers_pending_callers(aio):
    async def forever():
        await asyncio.sleep(3600)

    async def main():
        async with trio.open_nursery() as nursery:
            result = []

            async def caller():
                result.append(await outcome.acapture(aio.run, forever))

            nursery.start_soon(caller)
            await trio.sleep(0.05)
            aio.close()
        assert isinstance(result[0].error, RuntimeError)
        with pytest.raises(RuntimeError, match="not running"):
            await aio.run(forever)

    trio.run(main)


def test_run_callback_cancel_is_immediate_and_calls_cancel_on_loop(aio):
    cancelled = threading.Event()
    completes = []
    cancel_threads = []

    def start(complete):
        completes.append(complete)  # never completes by itself

    def cancel():
        # Runs on the asyncio thread: an assert here would be lost there, so record
        # what we want to check and assert it on the trio side.
        cancel_threads.append(aio.in_loop_thread())
        cancelled.set()

    async def main():
        t0 = trio.current_time()
        with trio.move_on_after(0.05) as scope:
            await aio.run_callback(start, cancel=cancel)
        assert scope.cancelled_caught
        assert trio.current_time() - t0 < 1, "cancellation was not immediate"
        assert await trio.to_thread.run_sync(cancelled.wait, 5), "cancel() was never called"
        assert cancel_threads == [True], "cancel() did not run on the loop thread"
        completes[0](outcome.Value("too late"))  # must be ignored, not crash trio
        await trio.sleep(0.05)

    trio.run(main)


# ------------------------------------------------------------ connect


def test_connect_retries_until_the_socket_appears(aio, sock_path):
    async def main():
        peer = QMPPeer(sock_path)
        async with trio.open_nursery() as nursery:
            async def late_server():
                await trio.sleep(0.3)
                await nursery.start(peer.serve)

            nursery.start_soon(late_server)
            t0 = trio.current_time()
            client = await connect(sock_path, loop=aio, timeout=5)
            assert trio.current_time() - t0 >= 0.3
            assert client.is_connected
            assert await client.execute("query-status") == {"status": "prelaunch", "running": False}
            await client.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_connect_times_out_with_qmptimeout(aio, sock_path):
    async def main():
        t0 = trio.current_time()
        with pytest.raises(QMPTimeout, match="could not connect") as info:
            await connect(sock_path, loop=aio, timeout=0.3)
        assert isinstance(info.value, trio.TooSlowError)
        assert 0.3 <= trio.current_time() - t0 < 2

    trio.run(main)


def test_connect_times_out_when_nobody_greets(aio, sock_path):
    async def main():
        # A listening socket that never speaks: the handshake must time out too.
        sock = trio.socket.socket(trio.socket.AF_UNIX)
        await sock.bind(sock_path)
        sock.listen(1)
        with sock, pytest.raises(QMPTimeout):
            await connect(sock_path, loop=aio, timeout=0.3)

    trio.run(main)


# ------------------------------------------------------------ execute


def test_execute_returns_value_and_qemu_errors_raise_qmperror(aio, sock_path):
    async def main():
        async with peer_and_client(aio, sock_path) as (peer, client):
            assert await client.execute("echo", {"a": [1, 2]}) == {"a": [1, 2]}

            def refuse(args):
                raise PeerError("DeviceNotFound", "Device 'net0' not found")

            peer.handlers["device_del"] = refuse
            with pytest.raises(QMPError) as info:
                await client.execute("device_del", {"id": "net0"})
            assert (info.value.error_class, info.value.desc, info.value.command) == (
                "DeviceNotFound", "Device 'net0' not found", "device_del")
            with pytest.raises(QMPError, match="CommandNotFound"):
                await client.execute("no-such-command")
            assert client.is_connected
            assert peer.received[0] == ("echo", {"a": [1, 2]})

    trio.run(main)


def test_unserializable_arguments_raise_and_leave_the_connection_usable(aio, sock_path):
    async def main():
        async with peer_and_client(aio, sock_path) as (peer, client):
            with pytest.raises(TypeError):
                await client.execute("echo", {"x": object()})
            assert await client.execute("echo", {"x": 1}) == {"x": 1}

    trio.run(main)


def test_out_of_band_command_answers_while_in_band_ones_are_held(aio, sock_path):
    """A post-copy destination's main loop can block on a page that cannot arrive: only
    ``exec-oob`` commands (``migrate-recover``) still answer.  The glue sends them as such,
    on a session where qemu.qmp enabled the ``oob`` capability QEMU offered."""
    async def main():
        async with peer_and_client(aio, sock_path) as (peer, client):
            peer.main_loop_blocked = True
            with pytest.raises(QMPTimeout):
                await client.execute("echo", {"band": "in"}, timeout=0.2)
            assert await client.execute("echo", {"band": "out"}, timeout=2, oob=True) == {"band": "out"}
            peer.main_loop_blocked = False
            assert await client.execute("echo", {"band": "in"}, timeout=2) == {"band": "in"}

    trio.run(main)


def test_timeout_then_late_reply_does_not_poison_the_next_call(aio, sock_path):
    async def main():
        async with peer_and_client(aio, sock_path) as (peer, client):
            with pytest.raises(QMPTimeout, match="'sleep' got no reply within 0.05s"):
                await client.execute("sleep", {"seconds": 0.3, "tag": "slow"}, timeout=0.05)
            # The peer (like QEMU) answers in order: the late reply to "sleep"
            # arrives while this call waits, and must not be taken for its own.
            assert await client.execute("echo", {"tag": "next"}) == {"tag": "next"}
            assert [c for c, _ in peer.received] == ["sleep", "echo"]
            assert await client.execute("echo", {"tag": "after"}) == {"tag": "after"}

    trio.run(main)


def test_trio_cancellation_of_execute(aio, sock_path):
    async def main():
        async with peer_and_client(aio, sock_path) as (peer, client):
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.execute, "sleep", {"seconds": 0.3})
                    await peer.wait_received(1)
                    scope.cancel()
            assert scope.cancelled_caught
            assert await client.execute("echo", {"n": 2}) == {"n": 2}
            # A call cancelled before it starts never reaches the peer.
            with trio.CancelScope() as scope:
                scope.cancel()
                await client.execute("echo", {"n": 3})
            assert await client.execute("echo", {"n": 4}) == {"n": 4}
            assert [a for _, a in peer.received] == [{"seconds": 0.3}, {"n": 2}, {"n": 4}]

    trio.run(main)


@pytest.mark.parametrize("concurrent_peer", [False, True])
def test_many_concurrent_executes_from_different_tasks(aio, sock_path, concurrent_peer):
    async def main():
        async with peer_and_client(aio, sock_path, concurrent=concurrent_peer) as (peer, client):
            results = {}

            async def one(i):
                # With a concurrent peer, replies come back out of order.
                delay = (i * 7 % 5) / 1000 if concurrent_peer else 0
                await trio.sleep(0)
                results[i] = await client.execute("sleep", {"seconds": delay, "tag": i})

            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(one, i)
            assert {i: r["tag"] for i, r in results.items()} == {i: i for i in range(200)}

    trio.run(main)


# ------------------------------------------------------------ events


def test_events_are_buffered_from_connect_delivered_once_in_order(aio, sock_path):
    async def main():
        peer = QMPPeer(sock_path)
        peer.events_on_negotiate = [("EARLY1", {"n": 1}), ("EARLY2", None)]
        async with trio.open_nursery() as nursery:
            await nursery.start(peer.serve)
            client = await connect(sock_path, loop=aio, timeout=5)
            await peer.emit("LATER", {"n": 3})
            await trio.sleep(0.2)  # nobody iterates yet: events must wait for us
            await client.execute("query-status")
            await peer.emit("LAST", {"n": 4})
            await client.execute("query-status")
            got = []
            async for ev in client.events():
                got.append(ev)
                if ev["event"] == "LAST":
                    break
            assert [e["event"] for e in got] == ["EARLY1", "EARLY2", "LATER", "LAST"]
            assert got[0]["data"] == {"n": 1}
            assert got[1]["data"] == {}  # no "data" on the wire: normalized
            assert set(got[0]["timestamp"]) == {"seconds", "microseconds"}
            # A second iterator continues the same stream: nothing is replayed.
            await peer.emit("AGAIN")
            async for ev in client.events():
                assert ev["event"] == "AGAIN"
                break
            await client.aclose()
            # After aclose the iterator ends instead of blocking.
            assert [e async for e in client.events()] == []
            nursery.cancel_scope.cancel()

    trio.run(main)


# ------------------------------------------------------------ connection loss


def test_qemu_going_away_fails_pending_calls_and_ends_events(aio, sock_path):
    async def main():
        async with peer_and_client(aio, sock_path) as (peer, client):
            await peer.emit("BEFORE")
            errors = []
            events = []

            async def pending(cmd):
                with pytest.raises(QMPConnectionLost) as info:
                    await client.execute(cmd, timeout=10)
                errors.append(str(info.value))

            async def follow():
                async for ev in client.events():
                    events.append(ev["event"])
                events.append("<end>")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                nursery.start_soon(pending, "hang")
                await peer.wait_received(1)
                t0 = trio.current_time()
                await peer.drop()
            assert trio.current_time() - t0 < 1
            assert events == ["BEFORE", "<end>"]
            assert len(errors) == 1
            assert "connection lost while 'hang' was pending" in errors[0]
            assert "EOF" in errors[0]
            assert not client.is_connected
            with pytest.raises(QMPConnectionLost, match="connection is down"):
                await client.execute("query-status")

    trio.run(main)


def test_quit_treats_the_following_eof_as_normal(aio, sock_path):
    async def main():
        async with peer_and_client(aio, sock_path) as (peer, client):
            await client.quit()
            assert not client.is_connected
            assert [e async for e in client.events()] == []
            assert peer.received[-1][0] == "quit"
            await client.quit()  # already down: still no error
            await client.aclose()

    trio.run(main)


def test_quit_when_qemu_closes_without_replying(aio, sock_path):
    async def main():
        async with peer_and_client(aio, sock_path) as (peer, client):
            peer.reply_to_quit = False
            await client.quit()
            assert not client.is_connected

    trio.run(main)


def test_quit_times_out_if_qemu_keeps_the_monitor_open(aio, sock_path):
    async def main():
        async with peer_and_client(aio, sock_path) as (peer, client):
            peer.close_on_quit = False
            with pytest.raises(QMPTimeout, match="did not close the monitor"):
                await client.quit(timeout=0.2)
            assert not client.is_connected  # closed either way

    trio.run(main)


def test_aclose_is_idempotent_and_later_calls_fail_clearly(aio, sock_path):
    async def main():
        async with peer_and_client(aio, sock_path) as (peer, client):
            await client.aclose()
            await client.aclose()
            assert not client.is_connected
            with pytest.raises(QMPConnectionLost, match="client is closed"):
                await client.execute("query-status")

    trio.run(main)


def test_several_clients_share_one_asyncio_thread(aio, sock_path):
    async def main():
        path2 = sock_path + "2"
        async with peer_and_client(aio, sock_path) as (_, c1):
            async with peer_and_client(aio, path2) as (peer2, c2):
                assert isinstance(c1, QMPClient)
                async with trio.open_nursery() as nursery:
                    for i in range(20):
                        nursery.start_soon(c1.execute, "echo", {"i": i})
                        nursery.start_soon(c2.execute, "echo", {"i": i})
                await peer2.drop()
                with pytest.raises(QMPConnectionLost):
                    await c2.execute("hang")
                assert await c1.execute("echo", {"still": "fine"}) == {"still": "fine"}

    trio.run(main)


def test_client_is_an_async_context_manager(aio, sock_path):
    async def main():
        peer = QMPPeer(sock_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(peer.serve)
            async with await connect(sock_path, loop=aio) as client:
                assert client.is_connected
            assert not client.is_connected
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_execute_timeout_none_waits(aio, sock_path):
    async def main():
        async with peer_and_client(aio, sock_path) as (peer, client):
            r = await client.execute("sleep", {"seconds": 0.1, "tag": "t"}, timeout=None)
            assert r == {"slept": 0.1, "tag": "t"}
            assert math.isclose(r["slept"], 0.1)

    trio.run(main)


# ------------------------------------------------------------ internals worth pinning down


def test_short_timeout_behind_a_long_one_fires_on_time(aio, sock_path):
    async def main():
        async with peer_and_client(aio, sock_path, concurrent=True) as (peer, client):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.execute, "hang", None)  # timeout 30 s
                await peer.wait_received(1)
                t0 = trio.current_time()
                with pytest.raises(QMPTimeout):
                    await client.execute("hang", timeout=0.1)
                assert 0.1 <= trio.current_time() - t0 < 0.5
                nursery.cancel_scope.cancel()
            assert await client.execute("echo", {"ok": 1}) == {"ok": 1}

    trio.run(main)


def test_deadlines_fire_in_order_skip_cancelled_and_compact():
    from qmp_glue._deadlines import Deadlines

    async def main():
        dl = Deadlines()
        fired = []
        now = trio.current_time()
        keep = [dl.call_at(now + 0.05 * (i + 1), lambda i=i: fired.append(i)) for i in range(3)]
        keep[1].cancel()
        for _ in range(5000):  # like calls that complete long before their timeout
            dl.call_at(now + 60, lambda: fired.append("stale")).cancel()
        assert len(dl._heap) < 5000  # rebuilt: memory follows the live timers
        await trio.sleep(0.3)
        assert fired == [0, 2]
        dl.close()

    trio.run(main)


def test_command_writer_never_interleaves_partial_writes():
    import socket

    from qmp_glue._wire import CommandWriter

    async def main():
        a, b = socket.socketpair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        writer = CommandWriter(a)
        big1, big2 = b"1" * 300_000 + b"\n", b"2" * 300_000 + b"\n"
        rx = trio.socket.from_stdlib_socket(b)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.write, big1)
            await trio.sleep(0.05)  # big1 is only partly written: the buffer is full
            nursery.start_soon(writer.write, big2)
            got = b""
            while len(got) < len(big1) + len(big2):
                got += await rx.recv(65536)
        assert got == big1 + big2
        writer.close()
        rx.close()

    trio.run(main)


def test_closing_the_asyncio_thread_under_a_client_fails_its_calls(sock_path):
    async def main():
        aio = AsyncioThread().start()
        peer = QMPPeer(sock_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(peer.serve)
            client = await connect(sock_path, loop=aio)
            async with trio.open_nursery() as inner:
                async def pending():
                    with pytest.raises(QMPConnectionLost, match="shutting down"):
                        await client.execute("hang")

                inner.start_soon(pending)
                await peer.wait_received(1)
                aio.close()
            assert [e async for e in client.events()] == []
            await client.aclose()  # still fine: nothing left to close
            nursery.cancel_scope.cancel()

    trio.run(main)
