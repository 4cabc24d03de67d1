"""Per-instance uids for QEMU: each instance's QEMU runs as its own uid from ``qemu_uids``.

Why: with one shared uid (``nobody``) a guest that escapes into its QEMU can signal, ptrace
and read the memory of every other QEMU on the node.  With one uid per instance it owns
only its own process and files.

The allocator is deliberately small and stateless across restarts:

* it persists nothing: the core records each instance's uid in its instance record and, on
  every :meth:`UidAllocator.allocate`, passes the uids its records hold (live *and* prepared
  instances) as ``taken``;
* it skips any uid that has a passwd entry or a group entry with the same number (so the
  core may run QEMU as ``uid:gid`` with ``gid == uid`` -- recommended -- without borrowing a
  real group), and any uid or gid that a live process uses (``/proc/*/status`` ``Uid:``/
  ``Gid:`` lines: real, effective, saved and fs ids), which catches a QEMU whose record is
  lost and anything else an operator runs in the range;
* it hands uids out round-robin from just after the last one it gave, so a uid just
  released is the last to be reused (files the old instance left, e.g. in ``/dev/shm``,
  are not inherited by the next guest at once);
* 65535 (the 16-bit ``-1``) is never handed out.

Within one daemon :meth:`allocate` also remembers what it handed out until :meth:`release`,
so two starts racing before either is recorded cannot get the same uid.  Calls are
synchronous and cheap (one ``/proc`` scan per call).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
from collections.abc import Callable, Iterable
from typing import Annotated

from pydantic import AfterValidator

DEFAULT_QEMU_UIDS = "60000-60999"
_RANGE_RE = re.compile(r"([0-9]{1,10})-([0-9]{1,10})\Z")
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to setresuid
_NEVER = frozenset({65535})


class UidsExhausted(RuntimeError):
    """Every uid of ``qemu_uids`` is in use (a node capacity problem, not bad input)."""

    field = "qemu_uids"


def parse_uid_range(value: str) -> range:
    """``"START-END"`` (inclusive) -> ``range(START, END + 1)``; ValueError if malformed.

    START must be at least 1 (never root) and END at most 2**32 - 2.
    """
    m = _RANGE_RE.match(value) if isinstance(value, str) else None
    if not m:
        raise ValueError(f"{value!r} must be 'START-END', e.g. {DEFAULT_QEMU_UIDS!r}")
    start, end = int(m.group(1)), int(m.group(2))
    if start < 1 or end > _MAX_ID or start > end:
        raise ValueError(f"{value!r}: need 1 <= START <= END <= {_MAX_ID}")
    return range(start, end + 1)


def _check_range(value: str) -> str:
    parse_uid_range(value)
    return value


#: Config ``qemu_uids``: a ``"START-END"`` string, checked when the config is loaded.
QemuUids = Annotated[str, AfterValidator(_check_range)]


def has_account(uid: int) -> bool:
    """Does ``uid`` have a passwd entry, or a group entry with the same number (via NSS)?"""
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            pass
        except OverflowError:
            return True  # out of range for this platform: never hand it out
    return False


def process_ids(proc: str = "/proc") -> set[int]:
    """Every uid and gid (real, effective, saved, fs) of every live process."""
    out: set[int] = set()
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            with open(f"{proc}/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith((b"Uid:", b"Gid:")):
                        out.update(int(x) for x in line.split()[1:])
                        if line.startswith(b"Gid:"):
                            break  # Gid follows Uid; nothing further is needed
        except (OSError, ValueError):
            continue  # the process exited meanwhile
    return out


class UidAllocator:
    """Hands out uids from a range; see the module docstring for what it skips."""

    def __init__(self, uids: range | str = DEFAULT_QEMU_UIDS, *,
                 account: Callable[[int], bool] = has_account,
                 processes: Callable[[], set[int]] = process_ids):
        self.range = parse_uid_range(uids) if isinstance(uids, str) else uids
        self._account = account
        self._processes = processes
        self._held: set[int] = set()
        self._next = self.range.start

    def __contains__(self, uid: int) -> bool:
        return uid in self.range

    def allocate(self, taken: Iterable[int] = ()) -> int:
        """Return a free uid and hold it until :meth:`release`.

        ``taken``: the uids the node's instance records hold (live and prepared).
        Raises :class:`UidsExhausted` when none is free.
        """
        busy = set(taken) | self._held | _NEVER
        in_use = self._processes()
        r = self.range
        n = len(r)
        first = self._next if self._next in r else r.start
        for k in range(n):
            uid = r.start + (first - r.start + k) % n
            if uid in busy or uid in in_use or self._account(uid):
                continue
            self._held.add(uid)
            self._next = uid + 1 if uid + 1 in r else r.start
            return uid
        raise UidsExhausted(f"no free uid in qemu_uids {r.start}-{r.stop - 1}")

    def hold(self, uid: int) -> None:
        """Mark ``uid`` as in use (e.g. an instance reattached after a daemon restart)."""
        self._held.add(uid)

    def release(self, uid: int) -> None:
        """Give ``uid`` back (the instance is gone and its QEMU reaped).  Idempotent."""
        self._held.discard(uid)


def unprivileged_userfaultfd() -> bool:
    """``vm.unprivileged_userfaultfd = 1``: QEMU's own uid may use userfaultfd (post-copy).

    QEMU 7.2 calls userfaultfd(2) without UFFD_USER_MODE_ONLY, so an unprivileged QEMU gets it
    only with this host-wide sysctl, which qsup reads but never sets.
    """
    try:
        with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
            return f.read().strip() == "1"
    except OSError:
        return False
