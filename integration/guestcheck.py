"""Is the test guest still whole?  The check every migration test makes on its guest.

A migration that "completed" can still have broken the guest: a page the destination got
wrong shows up as a dead NIC (``virtio_net virtio0: output.0:id 0 is not a head!``), an
oops, a panic, or -- with the memory workload running (kernel command line
``guest.dirty=RATE``, see integration/guest/README.md) -- as a ``MEMCHECK-MISMATCH`` line.
This module reads those signs from the guest's serial console:

* :data:`CONSOLE_BAD` / :func:`console_problems`: the console lines that mean a broken guest;
* :func:`memcheck_progress`: the last generation memcheck reported (``MEMCHECK-OK gen=G``);
* :func:`check_guest`: the guest answers (a ping you supply), its console shows no problem,
  and, for a busy guest, memcheck is still making progress;
* :func:`console_log_reader` / :func:`qsup_console_reader` / :func:`netns_ping`: ready-made
  callables for qsup's console log files and for a ping from a network namespace;
* disks (virtio-blk, ``/dev/vdX``): :class:`SerialShell` runs commands on a guest booted with
  ``guest.shell=1`` whose console QEMU serves on a unix socket (:func:`serial_shell_args`),
  :class:`AttachedConsole` on one a qsup daemon runs (``qsup console NAME --attach``'s API);
  over it (or any :class:`GuestShell`), :func:`disks_seen`, :func:`disk_size`, and
  ``diskpat`` (integration/guest/diskpat.c): :func:`disk_write`, :func:`disk_verify`,
  :func:`disk_check`; :func:`diskload_progress` / :func:`disk_problems` read the console of a
  guest booted with ``guest.diskload=vdX`` (the write loop).

It only takes callables, so any topology plugs in, e.g. with integration/topo.py's daemons::

    check_guest(lambda: dst.console("vm1"), netns_ping(client.name, "10.0.0.2"), busy=True)

Keep in mind what the console can show.  With ``quiet`` (how topo.py boots the guest) the
kernel prints only errors and worse; oopses, panics, BUG:, stalls and virtio ring errors are
among them, kernel WARNINGs are not.  A panic raised in NMI context (QMP ``inject-nmi`` with
``guest.nmi_panic=1``) is not on the console while QEMU holds the guest paused for pvpanic
(``-action panic=pause``): printk defers it, and it appears only after ``cont``.  Watch
``GUEST_PANICKED`` / ``query-status`` for panics.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

#: Regular expressions (searched in each console line) that mean a broken guest.  Chosen from
#: the kernel's own messages and checked against full (non-``quiet``) boots of the test guest.
CONSOLE_BAD: tuple[str, ...] = (
    # virtio ring corruption (BAD_RING): "virtio_net virtio0: output.0:id 0 is not a head!"
    r"is not a head",
    # any other error a virtio NIC's *device* reports ("...: id 3 out of range", "Unexpected
    # TXQ ..."); its normal messages name the interface: "virtio_net virtio0 eth0: ..."
    r"virtio_net virtio\d+: ",
    r"Kernel panic",  # "Kernel panic - not syncing: ..."
    r"\bOops\b",  # "Oops: 0000 [#1] PREEMPT SMP NOPTI"
    r"\bBUG: ",  # "BUG: unable to handle page fault", "BUG: soft lockup", "BUG: Bad page state"
    r"kernel BUG at ",  # BUG(): "kernel BUG at mm/slub.c:379!"
    r"general protection fault",
    r"invalid opcode: ",  # die(): "invalid opcode: 0000 [#1] ..."
    r"double fault",  # "PANIC: double fault, error_code: 0x0"
    r"Fatal exception",  # "Kernel panic - not syncing: Fatal exception in interrupt"
    r"list_(add|del) corruption",
    r"Kernel stack is corrupted",
    r"WARNING: CPU: \d+ PID: \d+ at ",  # WARN_ON() (not shown with `quiet`)
    r"rcu_\w+ (self-)?detected stall",  # "rcu: INFO: rcu_sched self-detected stall on CPU"
    r"detected hard LOCKUP",
    r"blocked for more than \d+ seconds",  # the hung-task detector
    r"segfault at ",  # a guest process died of SIGSEGV (shown without `quiet`)
    r"guest: insmod \S+ failed",  # /init could not load a module (pvpanic, virtio_net...)
    r"MEMCHECK-MISMATCH",  # memcheck found a page that does not hold what it wrote
    r"MEMCHECK-ERROR",  # memcheck was asked for but could not start
)

_BAD = re.compile("|".join(f"(?:{p})" for p in CONSOLE_BAD))
# The kernel echoes its command line at boot: what a test passes there is not a problem.
_CMDLINE = re.compile(r"(Kernel )?[Cc]ommand line: ")
_MEMCHECK_OK = re.compile(r"MEMCHECK-OK gen=(\d+)")


def console_problems(text: str) -> list[str]:
    """The console lines that match :data:`CONSOLE_BAD`, in order, without line endings."""
    out = []
    for line in text.splitlines():
        line = line.rstrip()
        if _BAD.search(line) and not _CMDLINE.search(line):
            out.append(line)
    return out


def memcheck_progress(text: str) -> int | None:
    """The generation of the last ``MEMCHECK-OK gen=G`` line, or None if there is none."""
    last = None
    for last in _MEMCHECK_OK.finditer(text):
        pass
    return int(last.group(1)) if last else None


def _report(failures: list[str], text: str, tail_lines: int = 25) -> str:
    problems = console_problems(text)
    lines = ["guest check failed: " + "; ".join(failures)]
    if problems:
        lines.append(f"console problems ({len(problems)}):")
        lines += [f"  {p}" for p in problems[:20]]
        if len(problems) > 20:
            lines.append(f"  ... and {len(problems) - 20} more")
    tail = text.splitlines()[-tail_lines:]
    lines.append(f"console tail ({len(tail)} lines):")
    lines += [f"  | {t.rstrip()}" for t in tail]
    return "\n".join(lines)


def check_guest(
    console_text_fn: Callable[[], str],
    ping_fn: Callable[[], bool],
    *,
    busy: bool,
    timeout: float = 20.0,
    poll: float = 0.2,
) -> None:
    """Assert that the guest is whole; raise AssertionError naming what is not.

    * it answers: ``ping_fn()`` returns True (called until it does, ``poll`` s apart);
    * its console (``console_text_fn()``, the whole text to judge) has no
      :func:`console_problems`;
    * if ``busy`` (booted with ``guest.dirty=RATE``): memcheck reports a generation newer
      than the last one on the console when this was called, so the workload is alive
      (on the destination, after a migration) and has verified a full sweep since.

    All of it within ``timeout`` seconds of the call; a console problem ends the wait at once.
    The message quotes the offending console lines and the console's last lines.
    """
    deadline = time.monotonic() + timeout
    text = console_text_fn()
    start_gen = memcheck_progress(text) if busy else None
    failures: list[str] = []

    answered = False
    while not console_problems(text):
        if ping_fn():
            answered = True
            break
        if time.monotonic() >= deadline:
            break
        time.sleep(poll)
        text = console_text_fn()
    if not answered and not console_problems(text):
        failures.append(f"the guest did not answer (ping) within {timeout:g} s")

    if busy and not failures:
        while True:
            text = console_text_fn()
            gen = memcheck_progress(text)
            if gen is not None and (start_gen is None or gen > start_gen):
                break
            if console_problems(text):
                break
            if time.monotonic() >= deadline:
                seen = "none" if gen is None else str(gen)
                hint = "" if gen is not None else " (was the guest booted with guest.dirty=RATE?)"
                failures.append(
                    f"memcheck made no progress within {timeout:g} s: last MEMCHECK-OK gen"
                    f" {seen}, needed one after {start_gen if start_gen is not None else 'none'}{hint}"
                )
                break
            time.sleep(poll)

    text = console_text_fn()
    problems = console_problems(text)
    if problems:
        failures.insert(0, f"{len(problems)} console problem line(s), first: {problems[0]!r}")
    if failures:
        raise AssertionError(_report(failures, text))


def console_log_reader(path: str | Path) -> Callable[[], str]:
    """A ``console_text_fn`` for a console log file, including qsup's rotated ``PATH.1``.

    qsup's console log (supervisor/_console.py) moves ``PATH`` to ``PATH.1`` when it is full,
    so the older half is read first.  A missing file reads as "".
    """
    path = Path(path)
    rotated = path.with_name(path.name + ".1")

    def read() -> str:
        parts = []
        for p in (rotated, path):
            try:
                parts.append(p.read_text(errors="replace"))
            except FileNotFoundError:
                pass
        return "".join(parts)

    return read


def qsup_console_reader(state_dir: str | Path, name: str) -> Callable[[], str]:
    """The console of instance ``name`` of the qsup node whose state dir is ``state_dir``.

    The same file topo.py's ``_Console.console(name)`` reads (``STATE/logs/NAME.console``),
    plus its rotated half.
    """
    return console_log_reader(Path(state_dir) / "logs" / f"{name}.console")


def netns_ping(ns: str, addr: str, *, wait_s: int = 1) -> Callable[[], bool]:
    """A ``ping_fn``: one echo request to ``addr`` from network namespace ``ns``."""

    def ping() -> bool:
        done = subprocess.run(
            ["ip", "netns", "exec", ns, "ping", "-n", "-c", "1", "-W", str(wait_s), addr],
            capture_output=True,
        )
        return done.returncode == 0

    return ping


# --- disks: commands over the serial console, and diskpat ------------------------------------


class GuestShell(Protocol):
    """Anything that runs a shell command in the guest: ``run(command) -> (status, output)``."""

    def run(self, command: str, timeout: float = 30.0) -> tuple[int, str]: ...


def serial_shell_args(sock_path: str | Path, log_path: str | Path | None = None, chardev_id: str = "con") -> list[str]:
    """The qemu argv fragment for a serial console a :class:`SerialShell` can drive.

    QEMU listens on ``sock_path`` (``server=on,wait=off``: unconnected, output is dropped) and,
    with ``log_path``, also logs everything the guest prints there (a console text for
    :func:`check_guest`).  Boot the guest with ``console=ttyS0 guest.shell=1``.
    """
    spec = f"socket,id={chardev_id},path={sock_path},server=on,wait=off"
    if log_path is not None:
        spec += f",logfile={log_path}"
    return ["-chardev", spec, "-serial", f"chardev:{chardev_id}"]


class _MarkerShell:
    """:meth:`run` and :meth:`wait_ready` over a console: subclasses give ``_send`` and ``_recv``.

    Each :meth:`run` sends one line: ``{ COMMAND ; } 2>&1`` between two printf'd markers
    carrying a fresh token, the second one with the exit status, and returns what lies between
    them.  The tty echoes the line, but with ``%s`` where the token goes, so the echo never
    looks like a marker; kernel lines or a background job's output (diskpat loop) printed
    meanwhile may land in the output.
    """

    _buf = b""

    def _send(self, data: bytes) -> None:
        raise NotImplementedError

    def _recv(self, timeout: float) -> bytes | None:
        """Console output (None: nothing within ``timeout``); ConnectionError once it closed."""
        raise NotImplementedError

    def run(self, command: str, timeout: float = 30.0) -> tuple[int, str]:
        """Run ``command`` (one line of sh); return (exit status, its stdout+stderr)."""
        if "\n" in command:
            raise ValueError("one line only")
        token = uuid.uuid4().hex[:12]
        line = (
            f"printf '\\n@@QS-%s-BEGIN@@\\n' {token}; {{ {command} ; }} </dev/null 2>&1;"
            f" printf '\\n@@QS-%s-END-%d@@\\n' {token} $?\n"
        )
        end = re.compile(rf"@@QS-{token}-BEGIN@@\r?\n(.*?)\r?\n@@QS-{token}-END-(\d+)@@".encode(), re.S)
        self._send(line.encode())
        deadline = time.monotonic() + timeout
        while True:
            m = end.search(self._buf)
            if m:
                self._buf = self._buf[m.end() :]
                out = m.group(1).decode(errors="replace").replace("\r\n", "\n")
                return int(m.group(2)), out
            left = deadline - time.monotonic()
            if left <= 0:
                tail = self._buf[-2000:].decode(errors="replace")
                raise TimeoutError(f"no answer to {command!r} in {timeout:g} s (guest.shell=1?); got:\n{tail}")
            try:
                data = self._recv(left)
            except ConnectionError as e:
                raise ConnectionError(f"the console closed while running {command!r}: {e}") from None
            if data:
                self._buf += data

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the console shell answers (it starts just after GUEST-READY).

        It also turns the tty's echo off (``stty -echo``): busybox sh then reads plain lines,
        without its line editor, and the console log holds the outputs and markers only.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                # <&1: run() gives commands /dev/null as stdin; stdout is the console tty.
                rc, out = self.run("stty -echo <&1", timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise
                continue
            if rc == 0:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"stty -echo failed on the console (exit {rc}): {out}")
            time.sleep(0.2)


class SerialShell(_MarkerShell):
    """Commands run by the guest's console shell (``guest.shell=1``) over QEMU's unix socket.

    See :class:`_MarkerShell` for how.  QEMU serves one client at a time: while this is
    connected nobody else (qsup's console pump) is; under a qsup daemon use
    :class:`AttachedConsole`.
    """

    def __init__(self, sock_path: str | Path, *, connect_timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self.sock.connect(str(sock_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
        self._buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SerialShell:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv(self, timeout: float) -> bytes | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        if not data:
            raise ConnectionError("EOF")
        return data


class AttachedConsole(_MarkerShell):
    """Commands run by the guest's console shell (``guest.shell=1``) through a qsup daemon:
    ``qsup console NAME --attach``'s API (``POST /v1/instances/{name}/console/attach``), so
    qsup's pump keeps the connection and the capped log keeps recording.

    ``force``: take over from a client already attached.  :attr:`ended` is the daemon's reason
    once the attachment ended (``"detached"``, ``"taken over by another client"``, ...).
    """

    def __init__(self, daemon_socket: str | Path, name: str, *, force: bool = False, tail: int = 0):
        from supervisor._client import Client

        with Client(daemon_socket) as c:
            self.session = c.attach_console(name, force=force, tail=tail)
        self.name = name
        self._buf = b""

    @property
    def ended(self) -> str | None:
        end = self.session.end
        return None if end is None else str(end.get("reason"))

    def _send(self, data: bytes) -> None:
        self.session.send(data)

    def _recv(self, timeout: float) -> bytes | None:
        f = self.session.receive(timeout=timeout)
        if f is None:
            return None
        kind, value = f
        if kind == "end":
            raise ConnectionError(f"attachment ended: {value.get('reason')}")
        return value if kind == "output" else b""

    def output(self, timeout: float) -> bytes:
        """What the console printed within ``timeout`` (and was not consumed by :meth:`run`)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                data = self._recv(left)
            except ConnectionError:
                break
            if data:
                self._buf += data
        out, self._buf = self._buf, b""
        return out

    def wait_ended(self, timeout: float = 10.0) -> str:
        """The reason the daemon ended this attachment (waiting for its end frame)."""
        deadline = time.monotonic() + timeout
        while self.ended is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the attachment to {self.name} did not end in {timeout:g} s")
            f = self.session.receive(timeout=left)
            if f is not None and f[0] == "output":
                self._buf += f[1]
        return str(self.ended)

    def detach(self, timeout: float = 10.0) -> str:
        """Detach (the end of what is typed); the daemon's reason."""
        self.session.detach()
        return self.wait_ended(timeout)

    def close(self) -> None:
        self.session.detach()
        self.session.close()

    def __enter__(self) -> AttachedConsole:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class DiskResult:
    """What ``diskpat verify`` / ``diskpat check`` reported."""

    ok: bool
    blocks: int  # blocks looked at
    bad: int  # blocks that failed (0 when ok)
    seq_min: int  # the SEQ range of the consistent blocks (0..0 if none)
    seq_max: int
    mismatched: list[int] = field(default_factory=list)  # the blocks named (diskpat names 16 at most)
    output: str = ""


_DISKPAT_OK = re.compile(r"diskpat: ok (\d+) blocks start=\d+ seq=(\d+)\.\.(\d+)")
_DISKPAT_TOTAL = re.compile(r"diskpat: MISMATCH total (\d+) of (\d+) blocks start=\d+ seq=(\d+)\.\.(\d+)")
_DISKPAT_BLOCK = re.compile(r"diskpat: MISMATCH block (\d+) ")
_DISKPAT_PASS = re.compile(r"diskpat: pass (\d+) blocks=\d+ errors=(\d+)")
_DISKPAT_BAD = re.compile(r"diskpat: (MISMATCH|ERROR)")


def _dev(dev: str) -> str:
    return dev if dev.startswith("/") else f"/dev/{dev}"


def _diskpat(console: GuestShell, args: str, timeout: float) -> tuple[int, str]:
    rc, out = console.run(f"diskpat {args}", timeout=timeout)
    if rc not in (0, 1) or "diskpat: ERROR" in out:
        raise AssertionError(f"diskpat {args} failed (exit {rc}):\n{out}")
    return rc, out


def disk_write(console: GuestShell, dev: str, start: int, count: int, seq: int, *, timeout: float = 60.0) -> str:
    """``diskpat write``: blocks start..start+count-1 (4 KiB each) get pass ``seq``, fsync'd.

    Returns diskpat's ``diskpat: wrote ...`` line; raises AssertionError if it failed.
    """
    rc, out = _diskpat(console, f"write {_dev(dev)} {start} {count} {seq}", timeout)
    line = next((x for x in out.splitlines() if x.startswith("diskpat: wrote ")), None)
    if rc != 0 or line is None:
        raise AssertionError(f"diskpat write failed (exit {rc}):\n{out}")
    return line


def _result(rc: int, out: str) -> DiskResult:
    mismatched = [int(m.group(1)) for m in _DISKPAT_BLOCK.finditer(out)]
    ok = _DISKPAT_OK.search(out)
    if rc == 0 and ok:
        return DiskResult(True, int(ok.group(1)), 0, int(ok.group(2)), int(ok.group(3)), mismatched, out)
    total = _DISKPAT_TOTAL.search(out)
    if rc == 1 and total:
        bad, blocks, lo, hi = (int(x) for x in total.groups())
        return DiskResult(False, blocks, bad, lo, hi, mismatched, out)
    raise AssertionError(f"diskpat said nothing understood (exit {rc}):\n{out}")


def disk_verify(
    console: GuestShell, dev: str, start: int, count: int, seq: int, *, timeout: float = 60.0
) -> DiskResult:
    """``diskpat verify``: does every block hold exactly what ``disk_write(..., seq)`` wrote?

    A mismatch is a result (``ok=False``, the blocks in ``mismatched``), not an exception;
    an I/O or usage error raises AssertionError.
    """
    return _result(*_diskpat(console, f"verify {_dev(dev)} {start} {count} {seq}", timeout))


def disk_check(console: GuestShell, dev: str, start: int, count: int, *, timeout: float = 60.0) -> DiskResult:
    """``diskpat check``: is every block a whole diskpat block of its own number, whatever its
    SEQ?  ``seq_min``/``seq_max`` give the passes seen: after ``guest.diskload`` (the loop
    stopped), MAX-MIN <= 1.  Run it with the loop stopped: a block the loop is rewriting at
    that very moment may read torn.
    """
    return _result(*_diskpat(console, f"check {_dev(dev)} {start} {count}", timeout))


def disk_size(console: GuestShell, dev: str, *, timeout: float = 10.0) -> int:
    """The size in bytes the guest sees for disk ``dev`` (vdb or /dev/vdb): /sys/block/DEV/size * 512."""
    name = os.path.basename(dev)
    rc, out = console.run(f"cat /sys/block/{name}/size", timeout=timeout)
    m = re.search(r"^(\d+)\s*$", out, re.M)
    if rc != 0 or not m:
        raise AssertionError(f"no size for {name} (exit {rc}):\n{out}")
    return int(m.group(1)) * 512


def disks_seen(console: GuestShell, *, timeout: float = 10.0) -> list[str]:
    """The virtio disks the guest has (``vda``, ``vdb``, ...), sorted."""
    rc, out = console.run("ls /sys/block", timeout=timeout)
    if rc != 0:
        raise AssertionError(f"ls /sys/block failed (exit {rc}):\n{out}")
    return sorted(x for x in out.split() if re.fullmatch(r"vd[a-z]+", x))


def diskload_progress(text: str) -> int | None:
    """The pass of the last ``diskpat: pass P`` line (the ``guest.diskload`` loop), or None."""
    last = None
    for last in _DISKPAT_PASS.finditer(text):
        pass
    return int(last.group(1)) if last else None


def disk_problems(text: str) -> list[str]:
    """The console lines where diskpat reported a mismatch or an error, without line endings.

    Not part of :data:`CONSOLE_BAD` (a test may verify a block it corrupted on purpose): a
    test running ``guest.diskload`` checks these itself.
    """
    return [line.rstrip() for line in text.splitlines() if _DISKPAT_BAD.search(line) and not _CMDLINE.search(line)]
