"""structlog set-up: JSON lines with per-task context, ready for journald.

Each instance task binds ``instance=<name>`` with
:func:`structlog.contextvars.bound_contextvars`; because contextvars are
copied into child tasks (and qmp_glue carries them across to its asyncio
thread), every line logged on behalf of an instance says which one.  The
renderer keeps every bound key: ``instance`` is never dropped or renamed.

Where the lines go (:func:`configure`):

* **stdout is the journal** (``$JOURNAL_STREAM`` names stdout's device:inode,
  which systemd sets for ``StandardOutput=journal``): each line is sent with
  journald's *native* protocol, so it carries ``PRIORITY=`` (``journalctl -p
  err`` works), ``INSTANCE=`` (``journalctl -u qsup INSTANCE=vm1``),
  ``QSUP_EVENT=``, ``SYSLOG_IDENTIFIER=qsup`` and ``MESSAGE=`` the JSON line.
  If the native socket cannot be used, the line goes to stdout with a
  ``<N>`` syslog priority prefix, which journald parses (``SyslogLevelPrefix=``
  is on by default), so the priority is still right.
* **anything else** (a terminal, a file, a pipe): plain JSON lines.

Library loggers (stdlib :mod:`logging`: qemu.qmp, hypercorn...) are routed
through the same renderer, so their lines get a priority and the instance
context too.

Timestamps are UTC ISO 8601 with milliseconds (:func:`format_ts`), the same
format ``qsup events`` shows in its time column.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import sys
import threading
import time
from datetime import datetime, timezone

import structlog

#: structlog level names, lowest first (the values ``log_level`` accepts).
LEVELS = ("debug", "info", "warning", "error", "critical")

#: syslog priorities (``journalctl -p``) by structlog level name.
PRIORITY = {"debug": 7, "info": 6, "notice": 5, "warning": 4, "warn": 4, "error": 3, "exception": 3,
            "critical": 2, "fatal": 2}

JOURNAL_SOCKET = "/run/systemd/journal/socket"
#: Environment override of the native socket path; empty disables the native protocol (the
#: ``<N>`` prefix is used instead).  Tests use it so they never write to the host's journal.
JOURNAL_SOCKET_ENV = "QSUP_JOURNAL_SOCKET"

_FIELD_RE = re.compile(r"[^A-Z0-9_]")


def format_ts(epoch: float) -> str:
    """``2025-01-31T12:34:56.789Z``: UTC, milliseconds.  Logs and ``qsup events`` both use it."""
    dt = datetime.fromtimestamp(epoch, timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def stream_is_journal(stream) -> bool:
    """True when ``stream`` is the journal stream systemd connected (``$JOURNAL_STREAM``)."""
    want = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = want.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def _timestamp(_logger, _name, event_dict):
    event_dict["timestamp"] = format_ts(time.time())
    return event_dict


class _StreamOut:
    """JSON lines on a stream, with a ``<N>`` priority prefix when ``prefix``."""

    def __init__(self, stream, prefix: bool):
        self.stream = stream
        self.prefix = prefix
        self._lock = threading.Lock()  # qmp_glue's asyncio thread logs too

    def write(self, line: str, priority: int, event_dict: dict) -> None:
        text = f"<{priority}>{line}\n" if self.prefix else f"{line}\n"
        with self._lock:
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed stdout must not take the daemon down


def _journal_field(key: str, value) -> bytes:
    """One field in journald's native format (binary-safe form when the value has a newline)."""
    if not isinstance(value, str):
        value = json.dumps(value, default=str, separators=(",", ":"))
    data = value.encode("utf-8", "replace")
    name = key.encode()
    if b"\n" in data:
        return name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return name + b"=" + data + b"\n"


def journal_fields(line: str, priority: int, event_dict: dict) -> dict[str, object]:
    """The native journal fields for one log line (also what tests check)."""
    fields: dict[str, object] = {"MESSAGE": line, "PRIORITY": str(priority), "SYSLOG_IDENTIFIER": "qsup"}
    for key, value in event_dict.items():
        if value is None or isinstance(value, (dict, list, tuple)):
            continue
        if key == "instance":
            fields["INSTANCE"] = value
        name = "QSUP_" + _FIELD_RE.sub("_", str(key).upper())
        if len(name) <= 64 and key not in ("timestamp", "exception"):
            fields[name] = value
    return fields


class _JournalOut:
    """journald's native protocol over its datagram socket; falls back to ``<N>`` lines."""

    def __init__(self, path: str, fallback: _StreamOut):
        self.path = path
        self.fallback = fallback
        self.sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            self.sock = None

    @property
    def native(self) -> bool:
        return self.sock is not None

    def write(self, line: str, priority: int, event_dict: dict) -> None:
        if self.sock is not None:
            payload = b"".join(_journal_field(k, v) for k, v in journal_fields(line, priority, event_dict).items())
            try:
                self.sock.send(payload)
                return
            except OSError:
                pass  # too big for a datagram, or journald restarting: this line goes by stdout
        self.fallback.write(line, priority, event_dict)


class _Output:
    """The last processor: render one JSON line, send it, drop the event (it is written)."""

    def __init__(self, out):
        self.out = out
        self.render = structlog.processors.JSONRenderer(sort_keys=False, default=str)

    def __call__(self, logger, name, event_dict):
        level = event_dict.get("level", "info")
        # the fields a reader scans for first, then the rest as logged
        head = {k: event_dict[k] for k in ("timestamp", "level", "event", "instance") if k in event_dict}
        event_dict = {**head, **{k: v for k, v in event_dict.items() if k not in head}}
        line = self.render(logger, name, event_dict)
        self.out.write(line, PRIORITY.get(level, 6), event_dict)
        raise structlog.DropEvent


class _StdlibBridge(logging.Handler):
    """stdlib :mod:`logging` records (qemu.qmp, hypercorn) through the structlog pipeline."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = record.levelname.lower()
            level = {"warn": "warning", "fatal": "critical"}.get(level, level)
            if level not in LEVELS:
                level = "info"
            kw: dict[str, object] = {"logger": record.name}
            if record.exc_info:
                kw["exc_info"] = record.exc_info
            getattr(structlog.get_logger(record.name), level)(record.getMessage(), **kw)
        except Exception:  # noqa: BLE001 -- logging must never raise into the caller
            self.handleError(record)


#: what :func:`configure` chose, for tests and diagnostics: "json", "prefix" or "journal"
mode = "json"


def configure(level: str = "info", stream=None, *, journal: bool | None = None,
              journal_socket: str | None = None) -> str:
    """Set up logging; returns the output mode: ``"journal"``, ``"prefix"`` or ``"json"``.

    ``journal`` None: detect it (``$JOURNAL_STREAM`` is ``stream``).  ``journal_socket``: the
    native socket (default ``$QSUP_JOURNAL_SOCKET`` or journald's own; ``""``: prefix only).
    """
    global mode
    level = level.lower()
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    stream = stream or sys.stdout
    if journal is None:
        journal = stream_is_journal(stream)
    if journal_socket is None:
        journal_socket = os.environ.get(JOURNAL_SOCKET_ENV, JOURNAL_SOCKET)
    out: _StreamOut | _JournalOut
    if journal:
        out = _StreamOut(stream, prefix=True)
        if journal_socket:
            native = _JournalOut(journal_socket, out)
            if native.native:
                out = native
        mode = "journal" if isinstance(out, _JournalOut) else "prefix"
    else:
        out = _StreamOut(stream, prefix=False)
        mode = "json"
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _timestamp,
            structlog.processors.format_exc_info,
            _Output(out),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.ReturnLoggerFactory(),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _StdlibBridge):
            root.removeHandler(h)
    root.addHandler(_StdlibBridge())
    root.setLevel(numeric)
    # qemu.qmp narrates every connection at INFO/DEBUG; qsup logs what matters itself
    logging.getLogger("qemu.qmp").setLevel(max(numeric, logging.WARNING))
    return mode


def get(name: str = "qsup"):
    return structlog.get_logger(name)
