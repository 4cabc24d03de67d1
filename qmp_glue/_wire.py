"""Trio-side writes of whole QMP commands to the monitor socket.

Why the trio thread writes commands itself: handing each command to the
asyncio thread first costs, per call, a wake-up of that thread (a write to
its self-pipe, an ``epoll`` return, two reads to drain the pipe) and a loop
iteration -- syscalls and cross-CPU wake-ups are what the glue's overhead is
made of, and that hop was a large part of it. So the trio thread writes the
command bytes directly, on its own ``dup()`` of the connected socket, and
only the *reply* crosses threads (qemu.qmp's reader task routes it back, see
``_session.py``).

This is safe because, once the session is established, nothing else writes
to the socket: qemu.qmp writes only the greeting-time ``qmp_capabilities``
(before we start) and whatever its own ``execute`` queues (which qmp_glue
never calls). Our own dup means each side closes only its own descriptor, so
neither can close a descriptor number the other is still using.

A command is written whole or not at all as seen by QEMU: the common case is
one non-blocking ``send`` that takes everything. If the socket buffer is
full (QEMU not reading), the rest is written under a lock (keeping commands
from interleaving) and shielded from cancellation (half a JSON object would
corrupt the stream), bounded by ``STUCK_TIMEOUT`` after which the connection
is shut down and treated as lost.

Descriptors (``add-fd``, ``getfd``) travel with the command's first bytes as one
``SCM_RIGHTS`` message (``sendmsg``), as libvirt sends them: QEMU's socket chardev keeps the
descriptors of the last message that carried any, and the command then takes them.  The
caller keeps its own copies (the kernel passes duplicates).
"""

from __future__ import annotations

import array
import socket
from collections.abc import Sequence

import trio

STUCK_TIMEOUT = 30.0  # seconds QEMU may leave a partly written command unread


class CommandWriter:
    """Ordered, whole-message writes to a socket; trio thread only."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._lock = trio.Lock()  # held while a message is only partly written
        self._closed = False

    async def write(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Write ``data`` entirely, ``fds`` (SCM_RIGHTS) with its first bytes. Raises ``OSError``
        if the connection broke, ``trio.ClosedResourceError`` if ``close()`` was called."""
        if self._closed:
            raise trio.ClosedResourceError("monitor socket closed")
        if not self._lock.locked():
            try:
                sent = self._send(data, fds)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return
            self._lock.acquire_nowait()  # no checkpoint since locked() above
            try:
                await self._finish(data[sent:], fds if not sent else ())
            finally:
                self._lock.release()
            return
        async with self._lock:
            await self._finish(data, fds)

    def _send(self, data: bytes, fds: Sequence[int]) -> int:
        if not fds:
            return self._sock.send(data)
        return self._sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])

    async def _finish(self, data: bytes, fds: Sequence[int] = ()) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(STUCK_TIMEOUT):
            while data:
                await trio.lowlevel.wait_writable(self._sock)
                try:
                    sent = self._send(data, fds)
                except BlockingIOError:
                    continue
                data = data[sent:]
                if sent:
                    fds = ()  # they went with the first bytes
        if data:
            self._sock.shutdown(socket.SHUT_RDWR)  # the reader sees EOF: connection lost
            raise BrokenPipeError(f"QEMU did not read a command for {STUCK_TIMEOUT}s")

    def close(self) -> None:
        """Close our descriptor (QEMU sees EOF once qemu.qmp closed its own too)."""
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
