"""NetconfWorker: one thread, results and errors cross to trio, cancellation waits."""

import threading
import time

import pytest
import trio

from netconf import NetconfWorker
from netconf._nl import netlink


def test_calls_run_on_one_dedicated_thread():
    seen = []

    async def main():
        async with NetconfWorker() as w:
            for _ in range(20):
                seen.append(await w.run(threading.get_ident))
            assert await w.run(lambda a, b=0: a + b, 2, b=3) == 5

    trio.run(main)
    assert len(set(seen)) == 1 and seen[0] != threading.get_ident()


def test_netlink_socket_is_per_thread_and_reused():
    with NetconfWorker() as w:
        a = w.call(lambda: id(netlink()))
        b = w.call(lambda: id(netlink()))
    assert a == b


def test_exceptions_propagate():
    async def main():
        async with NetconfWorker() as w:
            with pytest.raises(ZeroDivisionError):
                await w.run(lambda: 1 / 0)
            assert await w.run(lambda: "still alive") == "still alive"

    trio.run(main)


def test_cancelled_caller_still_waits_for_the_call_to_finish():
    finished = []

    def slow():
        time.sleep(0.2)
        finished.append(True)
        return "done"

    async def main():
        async with NetconfWorker() as w:
            result = None
            with trio.move_on_after(0.01) as cs:
                result = await w.run(slow)
                await trio.sleep(0)  # the pending cancellation lands here
            assert cs.cancelled_caught
            assert finished == [True] and result == "done"

    trio.run(main)


def test_run_before_start_is_an_error():
    async def main():
        with pytest.raises(RuntimeError):
            await NetconfWorker().run(lambda: None)

    trio.run(main)
