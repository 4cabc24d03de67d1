"""A QEMU process we can wait on, whether we started it or found it again.

After a daemon restart the QEMU processes are no longer our children, so
``waitpid`` is not available.  A *pidfd* works for both: it becomes
readable the moment the process exits, which is how a crash is noticed at
once instead of by polling.  For our own children we also reap, so no
zombie is left.

PID reuse is guarded by the start time (field 22 of ``/proc/PID/stat``,
in clock ticks since boot): a record stores it, and a process with the same
pid but another start time is not ours.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    import qmp_glue

    from ._jail import JailPlan


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


QEMU_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def listening_socket(path: Path) -> socket.socket:
    """A unix socket bound at ``path`` and listening, for QEMU to inherit (``chardev fd=``).

    Bound by qsup, so QEMU needs no access to the directory; mode 0600, so
    only root (qsup, an operator's ``qsup qmp``) can connect.
    """
    path.unlink(missing_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(path))
        os.chmod(path, 0o600)
        s.listen(4)
    except BaseException:
        s.close()
        raise
    return s


class QemuProcess:
    """A handle on a QEMU pid: ``await wait()``, ``signal()``, ``alive``."""

    def __init__(self, pid: int, *, child: bool, popen: subprocess.Popen | None = None):
        self.pid = pid
        self.child = child
        self._popen = popen
        self.returncode: int | None = None
        self._watching = False
        self._watch_done = trio.Event()
        self.started_at = start_time(pid)
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = None
            self._reap()
            if self.returncode is None:
                self.returncode = -1

    @classmethod
    def popen(cls, argv: list[str], *, pass_fds: list[int], log_fd: int,
              uid: int | None = None, gid: int | None = None, jail: JailPlan | None = None) -> "QemuProcess":
        """Start QEMU in its own session (a daemon's SIGINT must not reach it).

        With ``uid``/``gid`` the child drops to them before exec, with no
        supplementary groups (QEMU's ``-runas`` can't be combined with its
        seccomp sandbox).  The environment is scrubbed: QEMU gets a PATH and
        nothing of the daemon's.

        With ``jail`` (a :class:`supervisor._jail.JailPlan`) the jail helper is spawned
        instead, as root: it builds the jail, drops to ``uid``/``gid`` itself and
        execs QEMU in the same process, with the same fds (so the pid is QEMU's).
        """
        creds: dict[str, Any]
        if jail is not None:
            argv, creds = jail.command(argv, uid=uid, gid=gid), {}
        else:
            creds = {} if uid is None else {"user": uid, "group": gid, "extra_groups": []}
        popen = subprocess.Popen(
            argv,
            pass_fds=pass_fds,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            start_new_session=True,
            close_fds=True,
            env=QEMU_ENV,
            **creds,
        )
        return cls(popen.pid, child=True, popen=popen)

    @classmethod
    def attach(cls, pid: int, expected_start: int | None) -> "QemuProcess | None":
        """Find a recorded QEMU again; None if it is gone or the pid was reused."""
        st = start_time(pid)
        if st is None or (expected_start is not None and st != expected_start):
            return None
        proc = cls(pid, child=False)
        return None if proc.returncode is not None else proc

    @property
    def alive(self) -> bool:
        return self.returncode is None

    def _reap(self) -> None:
        if self._popen is not None:
            rc = self._popen.poll()
            if rc is not None:
                self.returncode = rc
        elif not self.child and start_time(self.pid) != self.started_at:
            self.returncode = -1  # gone (not our child: no exit status to read)

    async def wait(self) -> int:
        """Wait for exit, without polling.  Any number of tasks may wait.

        Only one task may block on the pidfd at a time (trio allows one
        reader per fd), so one waiter watches and the others wait for it to
        finish -- or to be cancelled, in which case one of them takes over.
        """
        while self.returncode is None:
            if self._watching:
                await self._watch_done.wait()
                continue
            self._watching = True
            self._watch_done = trio.Event()
            try:
                if self._pidfd is None:
                    await trio.sleep(0.05)
                    self._reap()
                else:
                    await trio.lowlevel.wait_readable(self._pidfd)
                    self.returncode = self._popen.wait() if self._popen is not None else -1
            finally:
                self._watching = False
                self._watch_done.set()
        self._close_pidfd()
        return self.returncode

    def signal(self, sig: int = signal.SIGKILL) -> None:
        if self.returncode is not None:
            return
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            try:
                trio.lowlevel.notify_closing(self._pidfd)
            except Exception:  # noqa: BLE001 - e.g. not in a trio run: nobody to wake, close anyway
                pass
            os.close(self._pidfd)
            self._pidfd = None


async def connect_qmp_or_exit(proc: QemuProcess, path: str, *, loop: qmp_glue.AsyncioThread,
                              name: str) -> qmp_glue.QMPClient | None:
    """Connect QEMU's monitor at ``path``, or None if QEMU exits first (its log then says why).

    qsup binds the monitor socket itself, so a connect can succeed and then see EOF when QEMU
    dies at start: QEMU's exit answers then, not the lost connection.
    """
    import qmp_glue  # noqa: F811 -- at run time too

    result: list[qmp_glue.QMPClient] = []

    async def connect(cancel: trio.CancelScope) -> None:
        try:
            result.append(await qmp_glue.connect(path, loop=loop, timeout=30, name=name))
        except qmp_glue.QMPConnectionLost:
            with trio.move_on_after(5):
                await proc.wait()
            if proc.alive:
                raise
            return
        cancel.cancel()

    async with trio.open_nursery() as n:
        n.start_soon(connect, n.cancel_scope)
        await proc.wait()
        n.cancel_scope.cancel()
    return result[0] if result else None
