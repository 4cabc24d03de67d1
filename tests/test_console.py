"""The capped console: a fake QEMU (a unix socket server) writes, qsup's pump keeps the log."""

from __future__ import annotations

import os
import socket

import pytest
import trio

from supervisor._console import (
    ConsoleLog,
    console_chardev_args,
    follow_console,
    pump_console,
    read_console,
    rotated_path,
)
from supervisor._qemuopt import qemu_opt_value


def disk_use(log) -> int:
    return sum(p.stat().st_size for p in (log, rotated_path(log)) if p.exists())


# --- ConsoleLog ------------------------------------------------------------------------------


def test_log_never_exceeds_the_cap_and_keeps_the_newest(tmp_path):
    log = tmp_path / "vm.console"
    with ConsoleLog(log, 1000) as c:
        for i in range(2000):
            c.write(b"line %05d\n" % i)  # 11 bytes each: 22 KB in all
            assert disk_use(log) <= 1000
    assert os.stat(log).st_mode & 0o777 == 0o600
    kept = read_console(log)
    assert kept.endswith(b"line 01999\n") and 900 <= len(kept) <= 1000, len(kept)
    assert b"line 00000" not in kept


def test_one_big_write_is_split_across_rotations(tmp_path):
    log = tmp_path / "vm.console"
    with ConsoleLog(log, 100) as c:
        c.write(bytes(range(256)) * 10)
    data = bytes(range(256)) * 10
    assert disk_use(log) <= 100
    kept = read_console(log)
    assert 50 <= len(kept) <= 100 and data.endswith(kept), len(kept)


def test_reopened_log_continues_under_the_same_cap(tmp_path):
    """A restarted daemon appends to the existing log; it must not start a fresh budget."""
    log = tmp_path / "vm.console"
    with ConsoleLog(log, 100) as c:
        c.write(b"a" * 45)
    with ConsoleLog(log, 100) as c:
        c.write(b"b" * 45)
        assert disk_use(log) <= 100
        c.write(b"c" * 45)
    assert disk_use(log) <= 100
    assert read_console(log) == b"b" * 40 + b"c" * 45
    with ConsoleLog(log, 20) as c:  # a lowered cap applies at once
        c.write(b"d")
    assert disk_use(log) <= 20 + 50  # the old .1 is replaced at the first rotation...
    with ConsoleLog(log, 20) as c:
        c.write(b"e" * 30)
    assert disk_use(log) <= 20  # ...and from then on the new cap holds


def test_symlink_at_log_path_is_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    os.symlink(target, tmp_path / "vm.console")
    with pytest.raises(OSError):
        ConsoleLog(tmp_path / "vm.console", 100)
    assert target.read_text() == "keep"


def test_write_errors_drop_and_never_raise(tmp_path, monkeypatch):
    log = tmp_path / "vm.console"
    c = ConsoleLog(log, 1000)

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    c.write(b"x" * 10)
    assert c.dropped == 10
    monkeypatch.undo()
    c.write(b"ok")
    c.close()
    assert read_console(log) == b"ok"


# --- argv ----------------------------------------------------------------------------------


def test_qemu_opt_value_doubles_commas():
    assert qemu_opt_value("/run/qsup/a,b/console.sock") == "/run/qsup/a,,b/console.sock"
    assert qemu_opt_value("plain") == "plain"
    for bad in ("a\x00b", "a\nb"):
        with pytest.raises(ValueError):
            qemu_opt_value(bad)


def test_console_chardev_args():
    assert console_chardev_args("/run/q,x/vm/console.sock") == [
        "-chardev", "socket,id=console,path=/run/q,,x/vm/console.sock,server=on,wait=off",
        "-serial", "chardev:console"]


# --- the pump, against a fake QEMU ---------------------------------------------------------


class FakeQemu:
    """Listens like QEMU's socket chardev (server=on): one client at a time."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(1)
        self.sock.setblocking(False)

    async def accept(self) -> trio.SocketStream:
        lsock = trio.socket.from_stdlib_socket(self.sock)
        conn, _ = await lsock.accept()
        return trio.SocketStream(conn)

    def close(self):
        self.sock.close()
        os.unlink(self.path)


def test_pump_copies_caps_and_reconnects(tmp_path):
    sock, log = tmp_path / "console.sock", tmp_path / "vm.console"

    async def main():
        async with trio.open_nursery() as n:
            # the pump starts before QEMU listens: it must retry, not fail
            n.start_soon(lambda: pump_console(sock, log, 4096, retry_max=0.05))
            await trio.sleep(0.2)
            qemu = FakeQemu(sock)
            conn = await qemu.accept()
            for i in range(3000):  # ~40 KB: ten times the cap
                await conn.send_all(b"guest says %06d\n" % i)
            await conn.send_all(b"END-1\n")
            await wait_for(lambda: read_console(log).endswith(b"END-1\n"))
            assert disk_use(log) <= 4096
            await conn.aclose()  # the "daemon restart" seen from QEMU: a new client comes
            conn = await qemu.accept()
            await conn.send_all(b"after reconnect\n")
            await wait_for(lambda: read_console(log).endswith(b"after reconnect\n"))
            await conn.aclose()
            qemu.close()
            n.cancel_scope.cancel()
        assert disk_use(log) <= 4096

    trio.run(main)


def test_pump_restarted_like_the_daemon_appends_within_cap(tmp_path):
    sock, log = tmp_path / "console.sock", tmp_path / "vm.console"
    qemu = FakeQemu(sock)

    async def one_life(text: bytes):
        async with trio.open_nursery() as n:
            connected = await n.start(lambda task_status: pump_console(
                sock, log, 4096, task_status=task_status))
            assert connected is True
            conn = await qemu.accept()
            await conn.send_all(text)
            await wait_for(lambda: read_console(log).endswith(text))
            n.cancel_scope.cancel()  # the daemon dies; QEMU keeps its listening socket
        await conn.aclose()

    trio.run(one_life, b"first daemon\n")
    trio.run(one_life, b"second daemon\n")
    assert read_console(log) == b"first daemon\nsecond daemon\n"
    qemu.close()


def test_pump_start_reports_false_when_qemu_never_listens(tmp_path):
    async def main():
        async with trio.open_nursery() as n:
            ok = await n.start(lambda task_status: pump_console(
                tmp_path / "none.sock", tmp_path / "vm.console", 4096, connect_timeout=0.1,
                retry_max=0.02, task_status=task_status))
            assert ok is False
            n.cancel_scope.cancel()

    trio.run(main)


def test_follow_console_across_rotation(tmp_path):
    log = tmp_path / "vm.console"

    async def main():
        got = bytearray()
        c = ConsoleLog(log, 200)
        c.write(b"old\n")

        async def reader():
            async for chunk in follow_console(log, poll=0.01):
                got.extend(chunk)

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await trio.sleep(0.05)
            expect = b"".join(b"%03d........\n" % i for i in range(60))  # 780 B: rotates 7x
            for i in range(60):
                c.write(b"%03d........\n" % i)
                await trio.sleep(0.005)
            await wait_for(lambda: bytes(got).endswith(b"059........\n"))
            n.cancel_scope.cancel()
        c.close()
        assert bytes(got) == expect, bytes(got)

    trio.run(main)


async def wait_for(cond, timeout: float = 5.0):
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)


# -- issue 16: what `qsup console` writes to the operator's terminal ------------------------------

HOSTILE = (b"login: \x1b[2J\x1b[H\x1b]0;pwned title\x07\x1b]52;c;ZWNobyBwd25lZA==\x07"
           b"\x1bP+q544e\x1b\\ok\x1b[31mred\x1b[0m\r\n\x9b6n\xc2\x9b6n\x08\x07\x1b(B\x1b7tab\tend\n"
           b"caf\xc3\xa9 \xff\n")


def test_terminal_filter_keeps_text_and_drops_every_control_sequence():
    from supervisor._console import TerminalFilter

    out = TerminalFilter().feed(HOSTILE)
    assert out == "login: okred\n\ufffd6ntab\tend\ncafé \ufffd\n".encode()
    assert not any(b in out for b in (b"\x1b", b"\x07", b"\x08", b"\r", "\x9b".encode()))


def test_terminal_filter_holds_a_sequence_split_across_reads():
    from supervisor._console import TerminalFilter

    for cut in range(1, len(HOSTILE)):
        f = TerminalFilter()
        assert f.feed(HOSTILE[:cut]) + f.feed(HOSTILE[cut:]) == TerminalFilter().feed(HOSTILE), cut


def test_an_unterminated_string_sequence_does_not_swallow_the_console():
    from supervisor._console import TerminalFilter

    f = TerminalFilter()
    assert f.feed(b"\x1b]0;" + b"x" * 10000 + b"\nafter\n").endswith(b"after\n")


def test_qsup_console_filters_unless_raw(tmp_path, capsysbinary):
    from supervisor._cli import _tail

    log = tmp_path / "vm.console"
    log.write_bytes(HOSTILE)
    _tail(log, 50, False)
    shown = capsysbinary.readouterr().out
    assert b"\x1b" not in shown and b"login: okred\n" in shown
    _tail(log, 50, False, raw=True)
    assert capsysbinary.readouterr().out == HOSTILE
