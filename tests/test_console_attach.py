"""``qsup console NAME --attach``: the pump's hub, the full-duplex route, the client and the CLI.

No root: QEMU is tests/fake_qemu.py, whose console echoes what is typed (as a tty would).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import trio

from core_harness import Bench, spec, wait_for
from supervisor._client import Client, ConsoleSession, RequestFailed
from supervisor._console import (
    ATTACH_TAIL,
    ConsoleBusy,
    TerminalFilter,
    console_hub,
    pump_console,
    read_console,
)
from supervisor._state import State
from supervisor.api import openapi
from supervisor.api._console_routes import FRAMES, frame
from supervisor.api._routes import ACCESS

# -- the hub, against a plain socket server ----------------------------------------------------


class OneClientQemu:
    """Listens like QEMU's socket chardev: the one client is the pump; records what it gets."""

    def __init__(self, path):
        self.path = str(path)
        self.got = bytearray()
        self.conn: trio.SocketStream | None = None

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(self.path)
        sock.listen(1)
        task_status.started()
        async with trio.SocketListener(sock) as listener:
            while True:
                self.conn = await listener.accept()
                async with self.conn:
                    try:
                        while data := await self.conn.receive_some(4096):
                            self.got += data
                    except trio.BrokenResourceError:
                        pass


def test_hub_fans_out_writes_one_writer_and_takes_over(tmp_path):
    sock, log = tmp_path / "console.sock", tmp_path / "vm.console"
    log.write_bytes(b"x" * 10000 + b"login: ")  # an older log: the attach starts with its tail

    async def main():
        qemu = OneClientQemu(sock)
        async with trio.open_nursery() as n:
            await n.start(qemu.serve)
            assert await n.start(lambda task_status: pump_console(sock, log, 1 << 20, task_status=task_status))
            await wait_for(lambda: qemu.conn is not None)
            hub = console_hub(sock)
            assert hub is not None
            first = hub.attach("vm")
            tail = await first.receive()
            assert tail == (b"x" * 10000 + b"login: ")[-ATTACH_TAIL:]
            with pytest.raises(ConsoleBusy, match="'vm'"):
                hub.attach("vm")
            await first.send(b"root\n")
            await wait_for(lambda: bytes(qemu.got) == b"root\n")
            await qemu.conn.send_all(b"# ")  # the guest answers: log and client both get it
            assert await first.receive() == b"# "
            assert read_console(log).endswith(b"login: # ")
            second = hub.attach("vm", force=True)
            assert first.ended == "taken over by another client" and await first.receive() == b""
            await first.send(b"ignored\n")  # the old client's input goes nowhere
            await second.send(b"uname\n")
            await wait_for(lambda: bytes(qemu.got) == b"root\nuname\n")
            assert (await second.receive()).endswith(b"login: # ")
            second.detach()
            assert hub.attached is None and second.ended == "detached"
            third = hub.attach("vm", tail=0)
            n.cancel_scope.cancel()
        assert third.ended is not None and "stopped" in third.ended
        assert console_hub(sock) is None  # the pump is gone: nothing to attach to

    trio.run(main)


def test_a_lagging_client_loses_output_not_the_log(tmp_path):
    sock, log = tmp_path / "console.sock", tmp_path / "vm.console"

    async def main():
        qemu = OneClientQemu(sock)
        async with trio.open_nursery() as n:
            await n.start(qemu.serve)
            await n.start(lambda task_status: pump_console(sock, log, 1 << 24, task_status=task_status))
            await wait_for(lambda: qemu.conn is not None)
            a = console_hub(sock).attach("vm", tail=0)
            a.cap = 1000
            await qemu.conn.send_all(b"y" * 5000)
            await wait_for(lambda: len(read_console(log)) == 5000)
            assert await a.receive() == b"y" * 1000 and a.dropped == 4000
            n.cancel_scope.cancel()

    trio.run(main)


def test_interactive_filter_keeps_line_editing_drops_the_rest():
    f = TerminalFilter(interactive=True)
    out = f.feed(b"$ ls\b\b\x1b[K\x1b[1;31mred\x1b[0m\r\n\x1b]0;title\x07\x1b[6n\x1b[?1049h\x1b]52;c;eA==\x07ok\r\n")
    assert out == b"$ ls\b\b\x1b[K\x1b[1;31mred\x1b[0m\r\nok\r\n"
    assert TerminalFilter().feed(b"a\b\x1b[Kb\r\n") == b"ab\n"  # the log viewer: unchanged


def test_the_route_is_in_the_document_for_the_operator_only():
    op = openapi()["paths"]["/v1/instances/{name}/console/attach"]["post"]
    assert op["operationId"] == "attach_console" and ACCESS["attach_console"].value == "operator"
    assert op["x-qsup-roles"] == ["operator"] and FRAMES in op["responses"]["200"]["content"]
    assert "409" in op["responses"]


# -- through the API, with the fake QEMU --------------------------------------------------------


def frames_until(session: ConsoleSession, pred, timeout: float = 10.0) -> bytes:
    """Output frames until ``pred(output so far)``; the output."""
    got = b""
    deadline = time.monotonic() + timeout
    while not pred(got):
        f = session.receive(timeout=max(0.0, deadline - time.monotonic()))
        assert f is not None, f"timed out; got {got!r}"
        kind, value = f
        assert kind == "output", (kind, value, got)
        got += value
    return got


def end_of(session: ConsoleSession, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        f = session.receive(timeout=max(0.0, deadline - time.monotonic()))
        assert f is not None, "no end frame"
        if f[0] == "end":
            return f[1]


def test_attach_types_into_the_guest_and_the_log_keeps_recording(tmp_path):
    b = Bench(tmp_path)

    async def main():
        async with b.running(api=True):
            inst = await b.node.start(spec(tmp_path))
            log = inst.view()["console"]
            await wait_for(lambda: b"booting" in read_console(log))

            def client_side():
                with Client(b.socket) as c:
                    first = c.attach_console("vm")
                    assert b"fake guest: booting" in frames_until(first, lambda g: b"booting\r\n" in g)
                    first.send(b"hello from the operator\n")
                    assert frames_until(first, lambda g: b"operator\n" in g) == b"hello from the operator\n"
                    with pytest.raises(RequestFailed) as e:
                        c.attach_console("vm")
                    assert e.value.status == 409 and "'vm'" in str(e.value) and e.value.code == "conflict"
                    second = c.attach_console("vm", force=True, tail=0)
                    assert end_of(first)["reason"] == "taken over by another client"
                    first.close()
                    second.send(b"from the second\n")
                    assert frames_until(second, lambda g: b"second\n" in g) == b"from the second\n"
                    second.detach()
                    assert end_of(second)["reason"] == "detached"
                    second.close()
                    third = c.attach_console("vm", tail=0)  # free again after a detach
                    third.close()  # a client that just goes: detached as well
                    with pytest.raises(RequestFailed) as e:
                        c.attach_console("nosuch")
                    assert e.value.status == 404
                    with pytest.raises(RequestFailed) as e:
                        ConsoleSession.open(str(b.socket), "/v1/instances/vm/console/attach?tail=x", 5)
                    assert e.value.status == 400 and e.value.field == "tail"

            await trio.to_thread.run_sync(client_side)
            kept = read_console(log)
            assert b"hello from the operator\n" in kept and b"from the second\n" in kept
            assert inst.state == State.RUNNING
            hub = console_hub(inst.ctx.layout.console_socket_path("vm"))
            await wait_for(lambda: hub.attached is None)  # the third went away: detached

            def attached_then_stopped():
                with Client(b.socket) as c:
                    s = c.attach_console("vm", tail=0)
                    return s

            s = await trio.to_thread.run_sync(attached_then_stopped)
            await inst.stop(force=True)
            end = await trio.to_thread.run_sync(end_of, s)
            s.close()
            assert "stopped" in end["reason"]

            def after_stop():
                with Client(b.socket) as c, pytest.raises(RequestFailed) as e:
                    c.attach_console("vm")
                assert e.value.status == 409 and "'vm'" in str(e.value)

            await trio.to_thread.run_sync(after_stop)

    trio.run(main)


def test_cli_attach_piped_stdin_sends_lines_and_detaches(tmp_path):
    b = Bench(tmp_path)

    async def main():
        async with b.running(api=True):
            await b.node.start(spec(tmp_path))

            def cli(stdin: bytes, *args: str) -> subprocess.CompletedProcess:
                return subprocess.run([sys.executable, "-m", "supervisor._cli", "console", "vm", "--attach",
                                       "--socket", str(b.socket), "--linger", "0.5", *args],
                                      input=stdin, capture_output=True, timeout=60,
                                      env={**os.environ, "PYTHONPATH": os.getcwd()})

            r = await trio.to_thread.run_sync(cli, b"echo piped\n")
            assert r.returncode == 0, r.stderr
            assert b"fake guest: booting" in r.stdout and b"echo piped\n" in r.stdout
            # the escape byte detaches at once, and what follows it is not typed
            r = await trio.to_thread.run_sync(cli, b"before\x1dafter\n")
            assert r.returncode == 0, r.stderr
            log = b.node.get("vm").view()["console"]
            await wait_for(lambda: b"before" in read_console(log))  # typed (its echo may come after the detach)
            await trio.sleep(0.3)
            assert b"after" not in read_console(log) and b"after" not in r.stdout
            r = await trio.to_thread.run_sync(lambda: subprocess.run(
                [sys.executable, "-m", "supervisor._cli", "console", "vm", "--force", "--socket", str(b.socket)],
                capture_output=True, timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()}))
            assert r.returncode == 2 and b"--force: only with --attach" in r.stderr

    trio.run(main)


def test_frames_decode_across_chunk_boundaries():
    """The client's de-chunking and framing, fed one byte at a time."""
    body = frame(b"o", b"abc") + frame(b"n", json.dumps({"dropped": 5}).encode()) + \
        frame(b"e", json.dumps({"reason": "detached"}).encode())
    raw = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7)) + b"0\r\n\r\n"
    s = ConsoleSession(None, "test")
    got = []
    for i in range(len(raw)):
        s._raw += raw[i:i + 1]
        s._dechunk()
        while (f := s._frame()) is not None:
            got.append(f)
    assert got == [("output", b"abc"), ("notice", {"dropped": 5}), ("end", {"reason": "detached"})]
