"""The durable event stream: numbered JSON events in SQLite, fanned out to trio readers.

Every event is one JSON object ``{"seq", "ts", "instance", "type", ...data}``. Operators tail it
(``GET /v1/events?since=SEQ&follow=true``, ``qsup events --follow --since SEQ``) and resume after
a daemon restart by passing the last ``seq`` they saw. That contract drives the design:

* **seq is assigned here, strictly increasing, and persisted.** The table is
  ``seq INTEGER PRIMARY KEY AUTOINCREMENT``: SQLite records the largest seq ever used in
  ``sqlite_sequence``, so pruning (or an operator emptying the table) never lets seq go back.
  A new :class:`EventLog` on the same file continues at ``last_seq + 1``.

* **One INSERT per event, committed on its own, on one persistent connection** in WAL mode with
  ``synchronous=NORMAL``. A commit is then a ``write()`` to the WAL, no ``fsync``, so emit is cheap
  enough to call inline on the trio thread. WAL checkpoints (which do fsync, and take as long as
  the disk likes) run on a background thread with its own connection every
  :data:`_CHECKPOINT_EVERY` emits, so they never stall the trio thread. The durability
  trade-off, precisely:

  - the daemon crashing or being SIGKILLed loses nothing (the WAL is in the OS page cache);
  - the *machine* crashing may lose the events since the last checkpoint. The file stays
    consistent, but those seq numbers would be handed out again, and a reader who saw the lost
    ones would then skip the re-issued ones. So the file remembers the boot it was opened in
    (``/proc/sys/kernel/random/boot_id``) and whether it was closed cleanly; if it was not closed
    cleanly *and* the machine rebooted since, seq jumps ahead by
    :data:`SEQ_SKIP_AFTER_HOST_CRASH`. Seq numbers are identifiers, not a count: a jump in
    numbering is not a lost event. A clean :meth:`EventLog.close` checkpoints and fsyncs, so a
    normal stop or reboot never jumps, and a daemon restart after SIGKILL does not either.

  One writer per file: a second EventLog writing the same file gets ``sqlite3.IntegrityError``
  on a duplicate seq. The daemon's state-dir lock is what keeps a second daemon away.

* **Live fan-out through one shared ring, not per-reader queues.** :meth:`EventLog.emit` appends
  the event to an in-memory deque of the newest ``live_buffer`` events and wakes waiting readers
  with one :class:`trio.Event`. Each reader keeps only a cursor (the last seq it yielded) and asks
  "what comes after my cursor?": from the ring if the ring still holds ``cursor + 1``, else from
  SQLite by seq. So emit does no per-reader work (beyond trio rescheduling the parked readers),
  a slow reader can never block it (there is no queue to fill), and a reader that falls behind
  the ring re-reads from disk -- nothing is lost and nothing is repeated, because everything is
  keyed by seq. The ring is the "bounded per-reader buffer", shared: its memory is
  ``live_buffer`` events, not that times the number of readers.

* **Backlog then live, no gap, no duplicate.** Because a reader's only state is its cursor and
  every event reaches SQLite before the ring and before any wake-up, there is no window between
  "read the backlog" and "subscribe": both are "events with seq > cursor".

Retention keeps the newest ``retention`` rows, pruning in batches: one DELETE of the oldest rows
every ``max(1, min(100, retention // 10))`` emits (one statement per batch, not one per emit),
so the table holds between ``retention`` and ``retention + batch`` rows. It counts rows, not seq
numbers, since seq may jump. A reader further behind than that has lost the pruned events; they
are gone, and the stream resumes at the oldest one kept.

Data values JSON cannot encode are **coerced with ``str()``** (a ``Path``, an ``IPv4Address``, an
exception) rather than raising: an event is emitted in the middle of state transitions, and a
log call that throws there would do more harm than a stringified value. NaN/inf become ``null``
(strict JSON, so ``jq`` can read the stream). The dict that :meth:`emit` returns, and that every
reader receives, is the decoded stored JSON, so live and replayed events are identical. Data may
not use the keys ``seq`` or ``ts`` (``TypeError``). Storage errors (disk full) do raise.

Threading: one EventLog belongs to one thread (the trio thread): ``emit``, ``since``, ``follow``
and ``close`` are called there (sqlite3 enforces it). ``emit`` and ``since`` also work outside
``trio.run`` (e.g. before the daemon's loop starts).

Readers should close the iterator deterministically when they stop early::

    async with contextlib.aclosing(log.follow(since)) as events:
        async for ev in events:
            ...
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

__all__ = ["EventLog", "SEQ_SKIP_AFTER_HOST_CRASH"]

#: How far seq jumps when the file was not closed cleanly and the host rebooted since (see above).
#: Comfortably more than the events one WAL checkpoint interval can hold.
SEQ_SKIP_AFTER_HOST_CRASH = 1_000_000

_RESERVED = frozenset(("seq", "ts"))
_PAGE = 256  # events per SQLite read while catching up
_CHECKPOINT_EVERY = 200  # emits between background WAL checkpoints
_AUTOCHECKPOINT_PAGES = 20_000  # writer's own checkpoint: a safety net only (~80 MB WAL)
_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"

_log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    ts       REAL NOT NULL,
    instance TEXT,
    type     TEXT NOT NULL,
    body     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT
);
"""


def _boot_id() -> str | None:
    try:
        with open(_BOOT_ID_PATH) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _jsonable(value: Any) -> Any:
    """Fallback for json.dumps: anything it cannot encode becomes its str()."""
    return str(value)


def _finite(value: Any) -> Any:
    """Replace NaN/inf (not valid JSON) by None, recursively. Only used on the rare slow path."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _encode(event: dict) -> str:
    try:
        return json.dumps(event, separators=(",", ":"), default=_jsonable, allow_nan=False)
    except ValueError:  # NaN or inf somewhere
        return json.dumps(_finite(event), separators=(",", ":"), default=_jsonable)


class _Checkpointer:
    """Runs WAL checkpoints on its own thread and connection, so their fsyncs never stall emit().

    SQLite's automatic checkpoint runs inside the commit that crosses the threshold: with
    ``synchronous=NORMAL`` it fsyncs, and that fsync would stall the trio thread (every
    instance's supervision) for as long as the disk takes. A PASSIVE checkpoint from another
    connection does not block the writer.
    The writer connection keeps a high ``wal_autocheckpoint`` only as a safety net.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._cv = threading.Condition()
        self._pending = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="eventlog-checkpoint", daemon=True)
        self._thread.start()

    def request(self) -> None:
        with self._cv:
            self._pending = True
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            while True:
                with self._cv:
                    while not (self._pending or self._stopping):
                        self._cv.wait()
                    if self._stopping:
                        return
                    self._pending = False
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    _log.exception("event log checkpoint failed")
        finally:
            db.close()


def _create_private(path: str) -> None:
    """Create the database file mode 0600 before SQLite opens it; tighten it if it exists.

    SQLite gives the -wal and -shm files the main file's permission bits, so they follow.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class EventLog:
    """Numbered, persisted events with trio followers. See the module docstring for the design.

    ``path=None`` keeps the log in memory (an SQLite ``:memory:`` database): seq, ``since`` and
    ``follow`` all work, nothing survives the process. ``live_buffer`` is how many of the newest
    events are kept in memory for followers; readers further behind read from SQLite.
    """

    def __init__(
        self,
        path: str | os.PathLike | None,
        *,
        retention: int = 100_000,
        live_buffer: int = 4096,
    ) -> None:
        if retention < 1:
            raise ValueError("retention must be >= 1")
        if live_buffer < 1:
            raise ValueError("live_buffer must be >= 1")
        self.path = None if path is None else os.fspath(path)
        self.retention = retention
        self._prune_every = max(1, min(100, retention // 10))
        self._since_prune = 0
        self._ring: collections.deque[dict] = collections.deque(maxlen=live_buffer)
        self._wakeup: trio.Event | None = None
        self._sinks: list[Callable[[dict], None]] = []
        self._closed = False
        self._db = self._connect()
        self._checkpointer = None if self.path is None else _Checkpointer(self.path)
        self._since_checkpoint = 0
        self._last_seq = self._open_session()
        self._rows = self._db.execute("SELECT count(*) FROM events").fetchone()[0]
        self._prune()

    # -- opening ---------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self.path is None:
            db = sqlite3.connect(":memory:", isolation_level=None)
        else:
            _create_private(self.path)
            db = sqlite3.connect(self.path, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA wal_autocheckpoint={_AUTOCHECKPOINT_PAGES}")
        # NORMAL: commits are not fsynced; see the module docstring for what that risks.
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        return db

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _set_meta(self, key: str, value: str | None) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def _open_session(self) -> int:
        """Find the last seq, jump it after an unclean close + reboot, mark the file open."""
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        last = row[0] if row else 0
        boot = _boot_id()
        was_open = self._meta("open") == "1"
        if was_open and (boot is None or boot != self._meta("boot_id")):
            last += SEQ_SKIP_AFTER_HOST_CRASH
        self._db.execute("BEGIN")
        if last != (row[0] if row else 0):  # sqlite_sequence has no key: update or insert
            sql = (
                "UPDATE sqlite_sequence SET seq = ?1 WHERE name = 'events'"
                if row
                else "INSERT INTO sqlite_sequence(name, seq) VALUES ('events', ?1)"
            )
            self._db.execute(sql, (last,))
        self._set_meta("open", "1")
        self._set_meta("boot_id", boot)
        self._db.execute("COMMIT")
        return last

    # -- writing ---------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The seq of the newest event ever emitted to this file (0 if none)."""
        return self._last_seq

    def emit(self, type: str, instance: str | None = None, **data: Any) -> dict:
        """Store one event, wake followers, call sinks; return the event as readers will see it."""
        if self._closed:
            raise RuntimeError("EventLog is closed")
        bad = _RESERVED.intersection(data)
        if bad:
            raise TypeError(f"event data may not use the reserved key(s) {sorted(bad)}")
        seq = self._last_seq + 1
        ts = time.time()
        body = _encode({"seq": seq, "ts": ts, "instance": instance, "type": type, **data})
        self._db.execute(
            "INSERT INTO events(seq, ts, instance, type, body) VALUES (?, ?, ?, ?, ?)",
            (seq, ts, instance, type, body),
        )
        self._last_seq = seq
        self._rows += 1
        event = json.loads(body)
        self._ring.append(event)
        self._wake()
        self._since_prune += 1
        if self._since_prune >= self._prune_every:
            self._prune()
        self._since_checkpoint += 1
        if self._since_checkpoint >= _CHECKPOINT_EVERY and self._checkpointer is not None:
            self._since_checkpoint = 0
            self._checkpointer.request()
        for sink in self._sinks:
            self._call_sink(sink, event)
        return dict(event)

    def _wake(self) -> None:
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None:
            wakeup.set()

    def _prune(self) -> None:
        """Delete the oldest rows beyond ``retention``.

        By row count, not by ``last_seq - retention``: seq may jump (after a host crash), and
        arithmetic would then delete rows that are among the newest ``retention``.
        """
        self._since_prune = 0
        excess = self._rows - self.retention
        if excess > 0:
            cur = self._db.execute(
                "DELETE FROM events WHERE seq <= "
                "(SELECT seq FROM events ORDER BY seq LIMIT 1 OFFSET ?)",
                (excess - 1,),
            )
            self._rows -= cur.rowcount

    @staticmethod
    def _call_sink(sink: Callable[[dict], None], event: dict) -> None:
        try:
            sink(dict(event))
        except Exception:  # noqa: BLE001 - a broken observer must not break the stream or its caller
            _log.exception("event sink %r failed", sink)

    def subscribe_sink(self, fn: Callable[[dict], None]) -> None:
        """Call ``fn(event)`` synchronously after every emit (each call gets its own copy).

        For cheap in-process observers (the structlog logger, prometheus counters). Exceptions
        are logged and swallowed. A sink must not call :meth:`emit`.
        """
        self._sinks.append(fn)

    # -- reading ---------------------------------------------------------------------------

    def since(self, seq: int, limit: int = 1000) -> list[dict]:
        """Stored events with seq > ``seq``, oldest first, at most ``limit`` of them."""
        if self._closed:
            raise RuntimeError("EventLog is closed")
        rows = self._db.execute(
            "SELECT body FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
        ).fetchall()
        return [json.loads(body) for (body,) in rows]

    def _from_ring(self, cursor: int) -> list[dict] | None:
        """Events after ``cursor`` from memory, or None if the ring no longer holds cursor + 1.

        Ring entries have consecutive seqs (one emit = last_seq + 1), so position is arithmetic.
        """
        ring = self._ring
        if not ring:
            return None
        start = cursor + 1 - ring[0]["seq"]
        if start < 0:
            return None
        return list(itertools.islice(ring, start, start + _PAGE))

    async def follow(self, since: int = 0, *, follow: bool = True) -> AsyncIterator[dict]:
        """Yield events with seq > ``since`` in order: the backlog, then (if ``follow``) live ones.

        Ends after the backlog when ``follow`` is False, and when the log is closed. Each event is
        a fresh dict. Never blocks :meth:`emit`: a reader behind the in-memory ring re-reads from
        SQLite. Use ``contextlib.aclosing`` to stop early.
        """
        cursor = since
        await trio.lowlevel.checkpoint()
        while not self._closed:
            if cursor >= self._last_seq:
                if not follow:
                    return
                if self._wakeup is None:
                    self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            batch = self._from_ring(cursor)
            if batch is None:  # behind the ring (or a seq jump): catch up from disk
                batch = self.since(cursor, _PAGE)
                await trio.lowlevel.checkpoint()
                if not batch:  # only events pruned away remain between cursor and last_seq
                    cursor = self._last_seq
                    continue
            for event in batch:
                if event["seq"] <= cursor:
                    continue
                cursor = event["seq"]
                yield dict(event)

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Mark the file cleanly closed, checkpoint + fsync it, and end every follower."""
        if self._closed:
            return
        self._closed = True
        if self._checkpointer is not None:
            self._checkpointer.stop()
        try:
            self._set_meta("open", "0")
            if self.path is not None:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._db.close()
            self._wake()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
