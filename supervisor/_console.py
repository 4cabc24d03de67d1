"""The serial console, capped: a guest can no longer fill the disk through it.

Before, QEMU wrote the console to a file chardev in ``state_dir``: a guest printing in a loop
grew it without limit, on the disk that also holds records, journals and the event DB.  Now:

* QEMU serves the console on a unix socket (:func:`console_chardev_args`: a ``socket``
  chardev with ``server=on,wait=off``).  Unconnected, QEMU discards console output instead
  of blocking the guest;
* qsup connects and copies what arrives into a :class:`ConsoleLog`: the current file is
  rotated to ``<log>.1`` when it reaches half of ``console_max_bytes``, so the two files
  together never exceed ``console_max_bytes``;
* it survives a daemon restart: QEMU outlives the daemon, the socket is a *path*, and the
  restarted daemon's :func:`pump_console` connects again (QEMU accepts one client at a time
  and listens again when it goes).  What the guest prints while no daemon runs is lost,
  which is the point: nobody is there to bound it.  A pipe would die with the daemon.

When qsup reads slower than the guest prints, QEMU's serial device waits for the socket to
drain, so a flooding guest is slowed down, and never buffered without bound.

The log is opened ``O_APPEND|O_NOFOLLOW``, mode 0600.  Writes are plain ``os.write`` calls
from the trio thread: appends of at most 64 KiB to the page cache, no fsync.  A failed write
(disk full) drops that chunk, logs once a minute and keeps reading, so the guest is never
blocked by a full disk.
"""

from __future__ import annotations

import codecs
import errno
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import structlog
import trio

from ._qemuopt import qemu_opt_value

log = structlog.get_logger("qsup.console")

#: The chardev id; ``-serial chardev:ID``.
CHARDEV_ID = "console"
READ_SIZE = 65536
_WARN_EVERY_S = 60.0


def console_chardev_args(sock_path: str | os.PathLike, chardev_id: str = CHARDEV_ID) -> list[str]:
    """The argv fragment for the serial console on a unix socket QEMU listens on.

    Replaces ``-chardev file,id=console,path=... -serial chardev:console`` in _qemu.py.
    """
    return [
        "-chardev",
        f"socket,id={chardev_id},path={qemu_opt_value(sock_path)},server=on,wait=off",
        "-serial", f"chardev:{chardev_id}",
    ]


def rotated_path(log_path: str | os.PathLike) -> Path:
    p = Path(log_path)
    return p.with_name(p.name + ".1")


class ConsoleLog:
    """An append-only log that keeps at most ``max_bytes`` on disk in two files.

    ``path`` holds the newest output, at most ``max_bytes // 2`` bytes; when the next byte
    would not fit, ``path`` is renamed over ``path.1`` and a new ``path`` is started.  A log
    reopened after a restart continues where it was (appending, same cap).
    """

    def __init__(self, path: str | os.PathLike, max_bytes: int, mode: int = 0o600):
        if max_bytes < 2:
            raise ValueError(f"console max_bytes must be at least 2, got {max_bytes}")
        self.path = Path(path)
        self.rotated = rotated_path(self.path)
        self.max_bytes = max_bytes
        self.file_cap = max_bytes // 2
        self._mode = mode
        self._fd: int | None = None
        self._size = 0
        self.written = 0  # bytes accepted since open (for tests and metrics)
        self.dropped = 0  # bytes lost to write errors
        self._warned_at = float("-inf")
        self._open()

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                     | os.O_NOFOLLOW, self._mode)
        self._fd, self._size = fd, os.fstat(fd).st_size
        return fd

    def _rotate(self) -> None:
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        os.replace(self.path, self.rotated)
        self._open()

    def write(self, data: bytes) -> None:
        """Append ``data``, rotating as needed.  Never raises for I/O errors (drops instead)."""
        view = memoryview(data)
        try:
            while view:
                fd = self._fd if self._fd is not None else self._open()
                room = self.file_cap - self._size
                if room <= 0:
                    self._rotate()
                    continue
                n = os.write(fd, view[:room])
                self._size += n
                self.written += n
                view = view[n:]
        except OSError as e:
            self.dropped += len(view)
            now = time.monotonic()
            if now - self._warned_at >= _WARN_EVERY_S:
                self._warned_at = now
                log.warning("console.write_failed", path=str(self.path),
                            error=errno.errorcode.get(e.errno, str(e)) if e.errno is not None else str(e),
                            dropped=self.dropped)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ConsoleLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the interactive console (``qsup console NAME --attach``) --------------------------------------
#
# QEMU's socket chardev serves one client, and that client is the pump: an attached operator
# does not connect to QEMU, the pump's :class:`ConsoleHub` stands between.  Output goes to the
# capped log first, then to the attached client's bounded buffer (a slow client loses output,
# counted, and never slows the log or the guest); what the client types is written into the
# pump's connection by the client's own task (so a guest that does not read its UART pushes
# back on the client alone).  One client at a time: a second attach is refused
# (:class:`ConsoleBusy`) unless it takes over, and then the first is ended with a reason.

#: what an attach starts with: the end of the log, so the user sees the prompt
ATTACH_TAIL = 4096
#: output an attached client may lag behind before it loses some
ATTACH_BUFFER = 1 << 20

_HUBS: dict[str, ConsoleHub] = {}


class ConsoleBusy(Exception):
    """Someone else is attached (409); ``force`` takes over."""


class ConsoleUnavailable(Exception):
    """No console connection to attach to: the instance is not running here (409)."""


def console_hub(sock_path: str | os.PathLike) -> ConsoleHub | None:
    """The hub of the pump that holds ``sock_path`` now (None: no pump runs for it)."""
    return _HUBS.get(os.fspath(sock_path))


class Attachment:
    """One attached client: the output it has yet to take (bounded), and why it ended."""

    def __init__(self, hub: ConsoleHub, cap: int = ATTACH_BUFFER):
        self.hub = hub
        self.cap = cap
        self.ended: str | None = None  # the reason, once ended
        self.dropped = 0  # output bytes lost because the client lagged more than ``cap``
        self.unsent = 0  # typed bytes dropped because QEMU was not connected (e.g. an upgrade's handover)
        self._buf = bytearray()
        self._wake = trio.Event()

    def feed(self, data: bytes) -> None:
        if self.ended is not None:
            return
        room = self.cap - len(self._buf)
        if len(data) > room:
            self.dropped += len(data) - max(room, 0)
            data = data[:max(room, 0)]
        self._buf += data
        self._wake.set()

    def end(self, reason: str) -> None:
        if self.ended is None:
            self.ended = reason
        self._wake.set()

    async def receive(self) -> bytes:
        """The output that arrived since the last call, waiting for some; b"" once ended."""
        while not self._buf:
            if self.ended is not None:
                return b""
            self._wake = trio.Event()
            await self._wake.wait()
        out = bytes(self._buf)
        self._buf.clear()
        return out

    async def send(self, data: bytes) -> None:
        """Type ``data`` on the console (dropped, and counted, while QEMU is not connected)."""
        await self.hub.write(self, data)

    def detach(self, reason: str = "detached") -> None:
        self.hub.detach(self, reason)


class ConsoleHub:
    """The pump's connection shared with at most one attached client (see above)."""

    def __init__(self, sock_path: str | os.PathLike, log_path: str | os.PathLike):
        self.key = os.fspath(sock_path)
        self.log_path = log_path
        self.stream: trio.abc.Stream | None = None  # the pump's connection to QEMU, while connected
        self.attached: Attachment | None = None
        self.closed = False
        self._write_lock = trio.Lock()
        _HUBS[self.key] = self

    def attach(self, name: str, *, force: bool = False, tail: int = ATTACH_TAIL) -> Attachment:
        """A new :class:`Attachment`, its output starting with the log's last ``tail`` bytes."""
        if self.closed:
            raise ConsoleUnavailable(f"instance {name!r} has no console connection")
        old = self.attached
        if old is not None and not force:
            raise ConsoleBusy(f"the console of instance {name!r} is attached by another client "
                              f"(force takes it over)")
        if old is not None:
            old.end("taken over by another client")
            log.info("console.taken_over", socket=self.key)
        a = Attachment(self)
        a.feed(read_tail(self.log_path, tail) if tail else b"")  # no await since the pump's write: no gap
        self.attached = a
        return a

    def detach(self, a: Attachment, reason: str = "detached") -> None:
        a.end(reason)
        if self.attached is a:
            self.attached = None

    def output(self, data: bytes) -> None:
        """From the pump, after the log has it."""
        if self.attached is not None:
            self.attached.feed(data)

    async def write(self, a: Attachment, data: bytes) -> None:
        if a is not self.attached or not data:
            return  # ended (taken over): its input goes nowhere
        async with self._write_lock:
            if a is not self.attached:
                return
            stream = self.stream
            if stream is None:
                a.unsent += len(data)
                return
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                a.unsent += len(data)  # QEMU went; the pump reconnects (or ends)

    def close(self, reason: str) -> None:
        self.closed = True
        if self.attached is not None:
            self.detach(self.attached, reason)
        if _HUBS.get(self.key) is self:
            del _HUBS[self.key]


async def pump_console(sock_path: str | os.PathLike, log_path: str | os.PathLike,
                       max_bytes: int, *, retry_min: float = 0.05, retry_max: float = 1.0,
                       connect_timeout: float = 5.0,
                       task_status: trio.TaskStatus[bool] = trio.TASK_STATUS_IGNORED) -> None:
    """Copy the console from QEMU's socket into a capped :class:`ConsoleLog`, until cancelled.

    Connects to ``sock_path`` (retrying with backoff while QEMU is not listening yet),
    copies until EOF (QEMU exited, or dropped the connection), then connects again: the
    caller cancels it when the instance goes.  For ``nursery.start``: reports ``True`` once
    connected the first time, or ``False`` if that took longer than ``connect_timeout`` (it
    keeps trying either way).  Start it after QEMU is spawned and before ``cont`` so nothing
    the guest prints at boot is lost.

    While it runs, its :class:`ConsoleHub` (:func:`console_hub` by ``sock_path``) lets one client
    attach: what arrives goes to the log *and* to that client, what the client types is written
    into this same connection (QEMU serves one client: this one).
    """
    console = ConsoleLog(log_path, max_bytes)
    hub = ConsoleHub(sock_path, log_path)

    def write(data: bytes) -> None:
        console.write(data)
        hub.output(data)

    reported = False
    deadline = trio.current_time() + connect_timeout
    delay = retry_min
    try:
        while True:
            try:
                stream = await trio.open_unix_socket(os.fspath(sock_path))
            except OSError:
                if not reported and trio.current_time() >= deadline:
                    reported = True
                    task_status.started(False)
                await trio.sleep(delay)
                delay = min(retry_max, delay * 2)
                continue
            delay = retry_min
            if not reported:
                reported = True
                task_status.started(True)
            log.debug("console.connected", socket=os.fspath(sock_path))
            async with stream:
                hub.stream = stream
                try:
                    await _copy(stream, write)
                finally:
                    hub.stream = None
            log.debug("console.disconnected", socket=os.fspath(sock_path))
    finally:
        hub.close("the console closed (the instance stopped)")
        console.close()


def read_tail(log_path: str | os.PathLike, max_bytes: int) -> bytes:
    """The last ``max_bytes`` kept (``.1`` then current), read by seeking: bounded whatever the size."""
    out = b""
    for p in (Path(log_path), rotated_path(log_path)):  # newest first
        need = max_bytes - len(out)
        if need <= 0:
            break
        try:
            with open(p, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - need))
                out = f.read(need) + out
        except FileNotFoundError:
            continue
    return out


# --- QEMU's stderr ------------------------------------------------------------------------------
#
# QEMU's stderr is the guest's too: a guest that makes a device warn in a loop writes through it.
# It goes into a FIFO (``<run_dir>/<name>/stderr.fifo``) that qsup reads and copies into a
# :class:`ConsoleLog` with the console's cap.  A FIFO, not a pipe: QEMU outlives the daemon and a
# restarted daemon opens the same FIFO by its path again.  Both ends are non-blocking, so QEMU
# never waits for qsup: when qsup lags (the FIFO full) or no daemon runs (no reader: EPIPE, QEMU
# ignores SIGPIPE) what QEMU writes is lost -- as the console's is -- instead of buffered.


def open_log_fifo(path: str | os.PathLike) -> tuple[int, int]:
    """Make the FIFO at ``path`` (0600, a stale one replaced); return its (read, write) fds, both
    non-blocking and close-on-exec.  QEMU gets the write end as stdout/stderr, qsup reads."""
    path = os.fspath(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.mkfifo(path, 0o600)
    rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        wfd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except BaseException:
        os.close(rfd)
        raise
    return rfd, wfd


async def pump_log(fifo_path: str | os.PathLike, log_path: str | os.PathLike, max_bytes: int, *,
                   read_fd: int | None = None,
                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Copy QEMU's stderr from its FIFO into a capped log (mode 0640) until EOF (QEMU exited).

    ``read_fd``: the read end :func:`open_log_fifo` returned (the pump owns it); ``None``: open
    ``fifo_path`` again (a restarted daemon).  No FIFO there: a QEMU an older qsup started, which
    writes the log file itself -- nothing to do.  Reports ``started`` at once.
    """
    if read_fd is None:
        try:
            read_fd = os.open(fifo_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError):
            task_status.started()
            return
    stream = trio.lowlevel.FdStream(read_fd)
    task_status.started()
    with ConsoleLog(log_path, max_bytes, mode=0o640) as out:
        async with stream:
            await _copy(stream, out.write)


def read_console(log_path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """The kept console output, oldest first (``.1`` then current); the last ``max_bytes``."""
    out = b""
    for p in (rotated_path(log_path), Path(log_path)):
        try:
            out += p.read_bytes()
        except FileNotFoundError:
            pass
    return out if max_bytes is None else out[-max_bytes:]


async def follow_console(log_path: str | os.PathLike, *, from_start: bool = False,
                         poll: float = 0.2) -> AsyncIterator[bytes]:
    """Yield console output as it is written (for ``qsup console NAME``), across rotations.

    Starts at the end of the log (or with everything kept, ``from_start``).  On rotation it
    finishes the renamed file through its open fd, then continues with the new one.
    """
    path = Path(log_path)
    if from_start:
        kept = read_console(path)
        if kept:
            yield kept
    f = None
    try:
        while f is None:
            try:
                f = open(path, "rb")  # noqa: SIM115 - closed in the finally below
            except FileNotFoundError:
                await trio.sleep(poll)
        if not from_start:
            f.seek(0, os.SEEK_END)
        else:
            f.seek(os.fstat(f.fileno()).st_size)  # already yielded by read_console
        while True:
            chunk = f.read(READ_SIZE)
            if chunk:
                yield chunk
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:
                st = None
            if st is not None and st.st_ino != os.fstat(f.fileno()).st_ino:
                rest = f.read()  # rotated: the old file's tail, then the new file
                if rest:
                    yield rest
                f.close()
                f = open(path, "rb")  # noqa: SIM115 - closed in the finally below
                continue
            await trio.sleep(poll)
    finally:
        if f is not None:
            f.close()


#: The longest OSC/DCS/SOS/PM/APC string dropped whole; after it the filter prints again, so a
#: guest that never ends its string cannot hide the rest of its console.
_MAX_STRING = 4096
_NORMAL, _ESC, _ESC_INTER, _CSI, _STRING, _STRING_ESC = range(6)
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_C1_STRINGS = "\x90\x98\x9d\x9e\x9f"  # DCS, SOS, OSC, PM, APC
#: CSI finals an interactive filter keeps: cursor up/down/forward/back, next/previous line, column,
#: position, erase display/line, insert/delete/erase characters, colours (SGR)
_SAFE_CSI = "ABCDEFGHfJK@PXm"


class TerminalFilter:
    """A guest's console output made harmless for the operator's terminal (``qsup console``).

    The guest chooses every byte of its console, and a terminal obeys escape sequences: set
    the window title, write the clipboard (OSC 52), answer queries into the operator's input,
    redraw the screen to hide lines.  This keeps text (UTF-8; invalid bytes become U+FFFD),
    newline and tab, and drops every other C0 control, DEL and C1 control, and escape
    sequences whole: CSI (``ESC [`` or U+009B, up to its final byte), the strings OSC, DCS,
    SOS, PM and APC (up to BEL or ST, at most :data:`_MAX_STRING` characters), and ``ESC``
    with intermediates and a final.  ``\\r`` is dropped (``\\r\\n`` is a newline).  A sequence
    split across reads is held until it ends.

    ``interactive`` (``qsup console --attach`` on a terminal, in raw mode, where a shell edits
    its line): ``\\r``, backspace and BEL are kept, and so are the CSI sequences that only move
    the cursor, erase, insert or delete characters, or set colours (final byte in
    :data:`_SAFE_CSI`, numeric parameters); everything else is dropped as above (titles,
    clipboard, queries whose answers would be typed into the guest, mode changes).
    """

    def __init__(self, *, interactive: bool = False) -> None:
        self._decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        self._state = _NORMAL
        self._string_len = 0
        self._interactive = interactive
        self._params: list[str] = []

    def feed(self, data: bytes) -> bytes:
        text = self._decode(data)
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            if self._state == _NORMAL:
                m = _CONTROLS.search(text, i)
                end = m.start() if m else n
                out.append(text[i:end])
                i = end
                if m is None:
                    break
            kept = self._step(text[i])
            if kept:
                out.append(kept)
            i += 1
        return "".join(out).encode()

    def _step(self, c: str) -> str:
        """One control character in NORMAL, or any character inside a sequence; what to keep."""
        state, o = self._state, ord(c)
        if state == _NORMAL:
            if c == "\x1b":
                self._state = _ESC
            elif c == "\x9b":
                self._state, self._params = _CSI, []
            elif self._interactive and c in "\r\b\x07":
                return c
            elif c in _C1_STRINGS:
                self._state, self._string_len = _STRING, 0
        elif state == _ESC:
            if c == "[":
                self._state, self._params = _CSI, []
            elif c in "]PX^_":
                self._state, self._string_len = _STRING, 0
            elif 0x20 <= o <= 0x2F:
                self._state = _ESC_INTER
            elif c != "\x1b":
                self._state = _NORMAL  # the final byte, or an abort: dropped either way
        elif state == _ESC_INTER:
            if not 0x20 <= o <= 0x2F:
                self._state = _NORMAL
        elif state == _CSI:
            if 0x40 <= o <= 0x7E:
                self._state = _NORMAL
                params = "".join(self._params)
                if self._interactive and c in _SAFE_CSI and len(params) <= 32 \
                        and all(p in "0123456789;" for p in params):
                    return f"\x1b[{params}{c}"
            elif 0x20 <= o <= 0x3F:
                if len(self._params) <= 32:
                    self._params.append(c)
            else:  # not a parameter: the sequence is broken off
                self._state = _NORMAL
                if c == "\x1b":
                    self._state = _ESC
        elif state == _STRING:
            self._string_len += 1
            if c in "\x07\x9c" or self._string_len > _MAX_STRING:
                self._state = _NORMAL
            elif c == "\x1b":
                self._state = _STRING_ESC
        elif state == _STRING_ESC:
            self._state = _NORMAL
            if c != "\\":  # ST ends the string; any other ESC x starts a sequence of its own
                self._state = _ESC
                return self._step(c)
        return ""


async def _copy(stream: trio.abc.ReceiveStream, write: Callable[[bytes], object]) -> None:
    """Copy what ``stream`` delivers into ``write`` until EOF or a broken stream (QEMU gone)."""
    while True:
        try:
            data = await stream.receive_some(READ_SIZE)
        except trio.BrokenResourceError:
            return
        if not data:
            return
        write(bytes(data))
