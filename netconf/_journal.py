"""The per-instance journal: what netconf did to the host, so undo is exact.

The file is JSON lines, append-only between compactions:

* ``{"t": "add", "id": 7, "status": "pending", "kind": "step", "step": "route4", ...}``
  -- an effect about to be applied, with everything needed to undo it and
  the prior state observed (old sysctl value, old MTU/MAC/master...);
* ``{"t": "set", "id": 7, "status": "done", ...}`` -- a status change
  (``done``, ``undone``, or ``void`` for a recorded effect that was never
  attempted because an earlier step failed), optionally with extra fields
  merged into the entry (e.g. ``result``).

Durability contract (the reason the journal is cheap enough for a
migration's activation, which is on the critical path): a record that
*announces* an effect is fsync'd before the effect is applied --
:meth:`Journal.add` with ``sync=True``; the executor writes the records of a
run of consecutive default steps in ONE write and ONE fsync (a "step group")
before applying the first of them. Status changes are plain ``write()``s:
they survive the death of the process (the data is in the kernel page cache)
and become durable with the next fsync. If the machine loses power before
that, an effect may still read ``pending``; :meth:`Executor.recover`
resolves pending entries by looking at the host, so a lost status change
costs nothing but a re-check.

Compaction rewrites only the live entries to a temporary file, fsyncs it,
``rename``s it over the journal and fsyncs the directory: a crash leaves
either the old or the new file, never a mix.  A torn last line (crash in
the middle of ``write``) is ignored when loading.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: One journal entry: a JSON object (``id``, ``status``, ``kind``, ``step``, ``phase``, ``nic_id``,
#: then the step's ``op``/``args``/``prior``/``result`` or the hook's ``role``/``path``/``nic``).
Entry = dict[str, Any]

LIVE = ("pending", "done")
_dumps = json.JSONEncoder(separators=(",", ":"), sort_keys=False).encode

#: Compact automatically once this many dead (undone/void) entries pile up.
COMPACT_AFTER = 512


class Journal:
    """An open journal file.  Not thread-safe: one executor owns it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        self.entries: dict[int, Entry] = {}
        self._next_id = 1
        self._dead = 0
        self._load()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(self._fd, 0o600)

    # -- loading -----------------------------------------------------------

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        for line in data.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # torn tail write
            self._fold(rec)
        self._dead = sum(1 for e in self.entries.values() if e["status"] not in LIVE)

    def _fold(self, rec: Entry) -> None:
        kind = rec.pop("t", None)
        if kind == "add":
            self.entries[rec["id"]] = rec
            self._next_id = max(self._next_id, rec["id"] + 1)
        elif kind == "set" and rec.get("id") in self.entries:
            self.entries[rec.pop("id")].update(rec)

    # -- writing -----------------------------------------------------------

    def _write(self, lines: list[str], sync: bool) -> None:
        data = ("\n".join(lines) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        if sync:
            # fdatasync: the appended bytes and the new file size, without
            # the mtime-only metadata flush a full fsync adds.
            os.fdatasync(self._fd)

    def add(self, entries: Iterable[Entry], *, sync: bool = True) -> list[Entry]:
        """Record new ``pending`` entries (one write, one fsync); returns them with ids."""
        out, lines = [], []
        for e in entries:
            e = dict(e, id=self._next_id, status="pending")
            self._next_id += 1
            lines.append(_dumps(dict(e, t="add")))
            out.append(e)
        if lines:
            self._write(lines, sync)
            for e in out:
                self.entries[e["id"]] = e
        return out

    def set(self, entry: Entry, status: str, *, sync: bool = False, **fields: Any) -> None:
        """Change an entry's status (and merge ``fields``).  Not fsync'd by default."""
        rec = dict(fields, t="set", id=entry["id"], status=status)
        self._write([_dumps(rec)], sync)
        entry.update(fields, status=status)
        if status not in LIVE:
            self._dead += 1

    def sync(self) -> None:
        os.fdatasync(self._fd)

    # -- queries -----------------------------------------------------------

    def live(self, *, phases: Iterable[str] | None = None, nic_id: str | None = None) -> list[Entry]:
        """Entries still owning an effect (pending or done), oldest first."""
        ph = set(phases) if phases is not None else None
        return [
            e for e in self.entries.values()
            if e["status"] in LIVE
            and (ph is None or e["phase"] in ph)
            and (nic_id is None or e["nic_id"] == nic_id)
        ]

    def pending(self) -> list[Entry]:
        return [e for e in self.entries.values() if e["status"] == "pending"]

    # -- compaction --------------------------------------------------------

    def maybe_compact(self) -> bool:
        if self._dead >= COMPACT_AFTER:
            self.compact()
            return True
        return False

    def compact(self) -> None:
        """Atomically rewrite the file with only the live entries."""
        live = {i: e for i, e in self.entries.items() if e["status"] in LIVE}
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            data = "".join(_dumps(dict(e, t="add")) + "\n" for e in live.values()).encode()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        old = self._fd
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        os.close(old)
        self.entries = live
        self._dead = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
