"""Issue 9: a guest can no longer fill the disk through its serial console.

The guest floods its console: its init is ``busybox seq 999999999`` (kernel ``rdinit=`` with
the arguments after ``--``), one increasing number per line, ~70-140 KB/s under TCG.

* the first test drives a real QEMU with :func:`console_chardev_args` and
  :func:`pump_console` directly (no daemon): the log stays under the cap, and a pump that is
  stopped and started again (a daemon restart) reconnects and sees the guest still printing;
* the other two go through ``qsup run`` / ``qsup serve``: they hold on today's main only once
  the instance core uses the console socket and the pump (they fail before: the file chardev
  grows without bound).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import trio

from supervisor._console import console_chardev_args, pump_console, read_console, rotated_path
from topo import guest_paths, guest_spec

FLOOD = "console=ttyS0 quiet panic=-1 rdinit=/bin/busybox -- seq 999999999"
CAP = 64 * 1024


def disk_use(log: Path) -> int:
    return sum(p.stat().st_size for p in (log, rotated_path(log)) if p.exists())


def last_number(log: Path) -> int:
    lines = read_console(log).splitlines()
    for line in reversed(lines[:-1]):  # the last line may be cut mid-number
        if line.strip().isdigit():
            return int(line)
    return 0


@pytest.fixture
def flooding_qemu(tmp_path):
    kernel, initrd = guest_paths()
    sock = tmp_path / "run,dir" / "console.sock"  # a comma: the path must be escaped
    sock.parent.mkdir()
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-nodefaults", "-no-user-config",
         "-display", "none", "-m", "192", "-kernel", kernel, "-initrd", initrd, "-append", FLOOD,
         *console_chardev_args(sock)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    yield qemu, sock
    if qemu.poll() is None:
        os.kill(qemu.pid, signal.SIGKILL)
    qemu.wait()
    qemu.stderr.close()


def test_real_qemu_console_is_capped_across_pump_restarts(flooding_qemu, tmp_path):
    qemu, sock = flooding_qemu
    log = tmp_path / "vm.console"

    async def pump_for(log: Path, seconds: float, until=None) -> None:
        """Pump for ``seconds``, or -- with ``until`` -- until it holds (at most 90 s)."""
        async with trio.open_nursery() as n:
            connected = await n.start(lambda task_status: pump_console(
                sock, log, CAP, connect_timeout=10, task_status=task_status))
            assert connected, qemu.stderr
            if until is None:
                await trio.sleep(seconds)
            else:
                with trio.move_on_after(90):
                    while not until():
                        await trio.sleep(0.1)
                await trio.sleep(seconds)
            n.cancel_scope.cancel()

    # boot (~4 s under TCG, more on a loaded machine) then flood: until well past one rotation
    trio.run(pump_for, log, 2, lambda: rotated_path(log).exists() and last_number(log) > 5000)
    assert qemu.poll() is None, qemu.stderr.read().decode()
    assert disk_use(log) <= CAP
    assert rotated_path(log).exists(), "the guest printed less than the cap: the test proves nothing"
    first = last_number(log)
    assert first > 5000, read_console(log)[-300:]

    time.sleep(2)  # "daemon down": QEMU discards, the guest is not blocked
    # the "restarted daemon" (here writing to a second log, to see where it picks up)
    log2 = tmp_path / "vm2.console"
    trio.run(pump_for, log2, 1)
    lines = read_console(log2).splitlines()
    resumed = int(lines[1])  # lines[0] may be cut
    assert resumed > first + 1000, (first, resumed)  # the guest went on printing meanwhile
    assert last_number(log2) > resumed
    # and again on the first log: appended, under the same cap
    trio.run(pump_for, log, 3)
    assert last_number(log) > resumed
    assert disk_use(log) <= CAP
    assert qemu.poll() is None


def test_qsup_run_caps_a_flooding_guests_console(netns_factory, qsup_factory):
    run = qsup_factory(netns_factory(), [dict(guest_spec("flood1", []), append=FLOOD)],
                       extra_config=f"console_max_bytes = {CAP}\n")
    run.wait_event("instance.started", "flood1", timeout=60)
    log = run.state_dir / "logs" / "flood1.console"
    deadline = time.monotonic() + 60
    while not rotated_path(log).exists() and time.monotonic() < deadline:
        assert disk_use(log) <= CAP if log.exists() else True, disk_use(log)
        time.sleep(0.2)
    assert rotated_path(log).exists(), f"console never rotated: {disk_use(log) if log.exists() else 0} bytes"
    time.sleep(3)
    assert disk_use(log) <= CAP, disk_use(log)
    assert last_number(log) > 0
    assert run.stop() == 0


def test_daemon_restart_keeps_following_the_console(netns_factory, tmp_path):
    from topo import QsupDaemon

    dm = QsupDaemon(netns_factory(), tmp_path, extra_config=f"console_max_bytes = {CAP}\n")
    try:
        dm.start_instance(dict(guest_spec("flood2", []), append=FLOOD))
        log = dm.state_dir / "logs" / "flood2.console"
        deadline = time.monotonic() + 60
        while last_number(log) < 1000 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert last_number(log) >= 1000
        dm.kill()
        before = last_number(log)
        dm.start()
        deadline = time.monotonic() + 30
        while last_number(log) <= before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert last_number(log) > before, "the restarted daemon does not follow the console"
        assert disk_use(log) <= CAP
        dm.cli("stop", "flood2", "--force")
    finally:
        leaked = dm.close()
        assert not leaked, leaked
