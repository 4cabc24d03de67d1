"""qmp_glue against a real QEMU (``-accel tcg -S``, no guest needed).

Each test starts its own qemu-system-x86_64 and kills it by pid in the
fixture's ``finally``, whatever happens.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest
import trio

from qmp_glue import AsyncioThread, QMPConnectionLost, QMPError, connect

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

QEMU = os.environ.get("QSUP_QEMU", "qemu-system-x86_64")


@pytest.fixture
def qemu():
    """A paused QEMU with a QMP unix socket; yields (Popen, socket path)."""
    d = tempfile.mkdtemp(prefix="qgi", dir="/tmp")
    path = os.path.join(d, "qmp.sock")
    argv = [QEMU, "-accel", "tcg", "-S", "-display", "none", "-nodefaults",
            "-qmp", f"unix:{path},server=on,wait=off"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        yield proc, path
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def aio():
    with AsyncioThread() as loop:
        yield loop


def test_query_status_events_and_quit(qemu, aio):
    proc, path = qemu

    async def main():
        client = await connect(path, loop=aio, timeout=10, name="real")
        try:
            status = await client.execute("query-status")
            assert status["status"] == "prelaunch" and status["running"] is False
            with pytest.raises(QMPError) as info:
                await client.execute("device_del", {"id": "nope"})
            assert info.value.error_class == "DeviceNotFound"

            await client.execute("cont")
            await client.execute("stop")
            seen = []
            with trio.fail_after(10):
                async for ev in client.events():
                    seen.append(ev["event"])
                    if ev["event"] == "STOP":
                        break
            assert seen == ["RESUME", "STOP"]
            assert (await client.execute("query-status"))["status"] == "paused"

            await client.quit()  # the EOF after quit is normal: no exception
            assert not client.is_connected
            rest = [ev["event"] async for ev in client.events()]
            assert set(rest) <= {"SHUTDOWN"}  # QEMU may announce it before closing
        finally:
            await client.aclose()

    trio.run(main)
    assert proc.wait(timeout=10) == 0


def test_sigkill_fails_pending_call_and_ends_events_promptly(qemu, aio):
    proc, path = qemu

    async def main():
        client = await connect(path, loop=aio, timeout=10, name="victim")
        try:
            await client.execute("query-status")
            ended_after = []
            lost = []

            async def follow_events():
                async for _ in client.events():
                    pass
                ended_after.append(time.monotonic() - killed_at[0])

            async def pending_call():
                # "human-monitor-command" with a QEMU-side sleep isn't portable;
                # instead keep calls flowing so one is in flight at the kill.
                with pytest.raises(QMPConnectionLost) as info:
                    while True:
                        await client.execute("query-status", timeout=5)
                lost.append(str(info.value))

            killed_at = [0.0]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow_events)
                nursery.start_soon(pending_call)
                await trio.sleep(0.2)
                killed_at[0] = time.monotonic()
                os.kill(proc.pid, signal.SIGKILL)
            assert ended_after and ended_after[0] < 1.0
            assert "connection" in lost[0] and "QMP victim" in lost[0]
            assert not client.is_connected
            with pytest.raises(QMPConnectionLost):
                await client.execute("query-status")
        finally:
            await client.aclose()

    trio.run(main)
    assert proc.wait(timeout=10) == -signal.SIGKILL


def test_sigkill_during_a_blocked_call(qemu, aio):
    """A call that is certainly pending (QEMU stopped with SIGSTOP) fails on SIGKILL."""
    proc, path = qemu

    async def main():
        client = await connect(path, loop=aio, timeout=10, name="frozen")
        try:
            os.kill(proc.pid, signal.SIGSTOP)
            async with trio.open_nursery() as nursery:
                async def kill_soon():
                    await trio.sleep(0.3)
                    os.kill(proc.pid, signal.SIGKILL)

                nursery.start_soon(kill_soon)
                t0 = trio.current_time()
                with pytest.raises(QMPConnectionLost, match="'query-status' was pending"):
                    await client.execute("query-status", timeout=10)
                assert trio.current_time() - t0 < 1.5
            assert [ev async for ev in client.events()] == []
        finally:
            await client.aclose()

    trio.run(main)
