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
  callables for qsup's console log files and for a ping from a network namespace.

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

import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

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
