"""Per-step user hooks: run user programs before, instead of, or after a named netconf step.

Why this exists
---------------
Ganeti's network configuration is a pair of shell scripts per mode.  They swallow errors, and
a site that needs one different line must copy and maintain the whole script.  In qsup the
network configuration is code, split into small *named steps* (``tap-up``, ``bridge-port``,
``route4``, ...).  A user can put programs next to any single step:

    <hooks_dir>/<step>/before.d/*    run, in order, before the step
    <hooks_dir>/<step>/replace       runs *instead of* the built-in step
    <hooks_dir>/<step>/after.d/*     run, in order, after the step

``hooks_dir`` defaults to :data:`DEFAULT_HOOKS_DIR` (``/etc/qsup/hooks``); the daemon config's
``hooks_dir`` overrides it, and ``None`` (or an empty string) disables hooks altogether.

This module only *finds* and *runs* hooks; the executor decides when.  It calls
:meth:`Hooks.find` for every step of every NIC, so ``find`` must be nearly free when no hooks
exist: the top-level listing of ``hooks_dir`` is cached and revalidated with a single
``stat`` (see :class:`_DirCache`).  Steps that do have a directory are rescanned on every call,
because ``chmod +x`` on a hook changes no directory mtime and must take effect at once.

Safety rules, each for a reason:

* argv is ``[path, step, action]`` and values travel in the environment only.  Nothing is
  ever interpolated into a shell string (``shell=False``), so a tag such as
  ``$(touch /tmp/pwned)`` reaches the hook as those literal characters.
* The environment is built from scratch (a fixed ``PATH`` plus the documented variables):
  the daemon's own environment, which may hold tokens, is not inherited.
* stdin is ``/dev/null`` (a hook must never wait for a terminal), cwd is ``/`` (a hook must not
  depend on, or pin, the daemon's working directory), and all other fds are closed but one: the
  ``O_PATH`` fd of the hook file itself, which it is executed through (see below).
* Each hook runs in its own session, hence its own process group.  On timeout the whole group
  gets SIGKILL, so ``sleep 100 &`` inside a hook does not outlive it.  (A grandchild that calls
  ``setsid`` itself escapes; that is the price of not using cgroups.)
* stdout and stderr are captured together and only the last :data:`OUTPUT_CAP` bytes are kept,
  so a chatty hook cannot grow the daemon's memory.
* A hook runs as root, so only a file nobody else could have written or swapped may run
  (:func:`check_trusted`).  The hook's path is resolved one component at a time from ``/``,
  symlinks included, and every directory looked into, every symlink followed and the file
  itself must be owned by root (or by the daemon's own uid, so an unprivileged test run
  works); directories and the file must not be group- or world-writable.  So a hook symlinked
  to a file in a user's home, a step directory symlinked into ``/tmp``, a hook owned by
  ``nobody`` or a group-writable ``before.d`` are all refused.  A sticky world-writable
  directory (``/tmp``) is accepted on the way *outside* ``hooks_dir`` (nobody can replace the
  root-owned entry below it), never inside it (anyone could add a hook).  The directories
  *above* ``hooks_dir`` are checked too: whoever can rename them can swap the whole hooks
  directory.  Since only trusted users can change anything on a trusted path, the check
  cannot be raced; a component that does not exist is refused (whoever creates it later would
  choose what runs).  Then the file is opened ``O_PATH|O_NOFOLLOW``, the fd must be the inode
  checked, and the hook is executed through it (``/proc/self/fd/N``), never by its path again:
  a script's ``$0`` is therefore ``/proc/self/fd/N`` (``readlink "$0"`` names the hook).  An
  untrusted hook is not skipped: the step fails with a :class:`HookError` naming the hook and
  the offending path.

A hook that exits non-zero, is killed by a signal, times out, or cannot be executed raises
:class:`HookError`.  Its ``failures`` list has the same shape the executor uses for its own
failed steps, so both can be reported together.

Environment variables are documented in ``examples/hooks/README.md`` and built by
:func:`hook_env`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import selectors
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import structlog

from ._plan import STEP_NAMES
from ._types import REASONS, Failure, NetconfError, Nic, Reason

log = structlog.get_logger("qsup.netconf.hooks")

DEFAULT_HOOKS_DIR = Path("/etc/qsup/hooks")

#: The only PATH a hook sees; nothing else is inherited from the daemon.
HOOK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Captured output is trimmed to its last OUTPUT_CAP bytes.
OUTPUT_CAP = 64 * 1024

#: How much of the output goes into the exception message (the full capture is in failures).
MESSAGE_OUTPUT_CAP = 4 * 1024

#: Step names a user may hook.  ``find`` accepts any name matching STEP_RE; this tuple is the
#: public contract and lets tooling warn about misspelt step directories.
ATTACH_STEPS = STEP_NAMES["attach"]
ACTIVATE_STEPS = STEP_NAMES["activate"]
KNOWN_STEPS = ATTACH_STEPS + ACTIVATE_STEPS + ("announce",)

#: A step name is one path component: lower-case letters, digits and dashes, not starting with
#: a dash.  This forbids ``..``, ``/`` and anything else that could leave hooks_dir.
STEP_RE = re.compile(r"[a-z0-9][a-z0-9-]*")

ACTIONS = ("up", "down")

# Files in before.d/after.d that are never run: dotfiles, editor and package-manager leftovers.
_IGNORED_SUFFIXES = (
    "~", ".bak", ".orig", ".rej", ".swp", ".swo", ".tmp", ".rpmnew", ".rpmsave", ".rpmorig",
)
_IGNORED_INFIXES = (".dpkg-", ".ucf-")

# The directory listing cache trusts a directory's mtime only once it is this old: two changes
# within one filesystem timestamp tick would otherwise leave the same mtime ("racy git").
_RACY_S = 2.0


@dataclasses.dataclass(frozen=True)
class StepHooks:
    """The hooks for one step, in the order they run (``replace`` runs instead of the step)."""

    before: tuple[Path, ...] = ()
    replace: Path | None = None
    after: tuple[Path, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.before or self.replace or self.after)


NO_HOOKS = StepHooks()


@dataclasses.dataclass(frozen=True)
class HookResult:
    """What one hook run did.  ``exit_code`` is negative when a signal killed the hook."""

    path: Path
    exit_code: int
    output: str
    duration_s: float
    timed_out: bool = False


class HookError(NetconfError):
    """A hook failed: non-zero exit, killed by a signal, timed out, or could not be executed.

    The message is one readable line (path, step, action, and the exit code or
    ``timed out after Ns``) followed by the hook's output, trimmed.  ``failures`` holds one
    dict with ``step``, ``path``, ``exit_code`` (``None`` if it never ran), ``output`` (up to
    :data:`OUTPUT_CAP` bytes), ``error`` (the one-line summary) and ``timed_out``.
    ``result`` is the :class:`HookResult` when the hook did run.
    """

    def __init__(self, message: str, failures: list[Failure] | None = None,
                 result: HookResult | None = None):
        super().__init__(message, failures)
        self.result = result


class Hooks:
    """Finds and runs the hooks under one directory.  Thread-safe; cheap to call often."""

    def __init__(self, hooks_dir: str | Path | None, timeout: float = 10.0):
        if hooks_dir is not None and str(hooks_dir) == "":
            hooks_dir = None  # an empty config value must not mean "the current directory"
        self.hooks_dir: Path | None = Path(hooks_dir) if hooks_dir is not None else None
        if timeout <= 0:
            raise ValueError(f"hook timeout must be positive, got {timeout!r}")
        self.timeout = float(timeout)
        self._top = _DirCache(self.hooks_dir) if self.hooks_dir is not None else None

    def __repr__(self) -> str:
        return f"Hooks({str(self.hooks_dir) if self.hooks_dir else None!r}, timeout={self.timeout})"

    def find(self, step: str) -> StepHooks:
        """Return the hooks installed for ``step`` (empty if none).

        Raises ValueError for a malformed step name.  Costs one ``stat`` when ``hooks_dir``
        has no directory for this step.
        """
        check_step(step)
        if self._top is None or step not in self._top.names():
            return NO_HOOKS
        assert self.hooks_dir is not None
        step_dir = self.hooks_dir / step
        replace = step_dir / "replace"
        return StepHooks(
            before=_scan(step_dir / "before.d"),
            replace=replace if _is_executable_file(replace) else None,
            after=_scan(step_dir / "after.d"),
        )

    def unknown_steps(self) -> list[str]:
        """Directories in hooks_dir that are no known step (likely typos); for a startup warning."""
        if self._top is None:
            return []
        assert self.hooks_dir is not None
        return sorted(n for n in self._top.names()
                      if n not in KNOWN_STEPS and not _ignored(n) and (self.hooks_dir / n).is_dir())

    def run(self, path: Path, env: dict[str, str], *, step: str, action: str) -> HookResult:
        """Run one hook to completion and return what it did.

        Raises HookError on a non-zero exit, a signal, a timeout or an exec failure.  Blocks
        for up to ``timeout`` seconds: call it from a worker thread, never from the trio loop.
        """
        check_step(step)
        if action not in ACTIONS:
            raise ValueError(f"hook action must be one of {ACTIONS}, got {action!r}")
        if env.get("ACTION", action) != action:
            raise ValueError(f"env ACTION={env['ACTION']!r} contradicts action={action!r}")
        path = Path(path)
        full_env = {**env, "PATH": HOOK_PATH, "STEP": step, "ACTION": action}
        _check_env(full_env)
        try:
            fd = _open_trusted(path, self.hooks_dir)
        except UntrustedHook as e:
            summary = f"hook {path} for step {step} ({action}) refused: {e}"
            log.warning("hook.untrusted", hook=str(path), step=step, action=action,
                        offending=str(e.path), error=str(e))
            raise HookError(summary, [_hook_failure(step, path, None, "", summary, False)]) from None
        argv = [str(path), step, action]
        log.debug("hook.start", hook=str(path), step=step, action=action)
        started = time.monotonic()
        try:
            # executed through the fd of the file checked, not by its path again: nothing
            # swapped in after the check can run (a script's interpreter reads it through
            # the same fd, which is why it stays open in the hook)
            proc = subprocess.Popen(
                argv, executable=f"/proc/self/fd/{fd}", pass_fds=(fd,), shell=False,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, env=full_env, cwd="/", close_fds=True,
                start_new_session=True,
            )
        except OSError as e:
            summary = f"hook {path} for step {step} ({action}) could not be executed: {e}"
            log.warning("hook.exec_failed", hook=str(path), step=step, action=action, error=str(e))
            raise HookError(summary, [_hook_failure(step, path, None, "", summary, False)]) from e
        finally:
            os.close(fd)

        with proc:
            raw, timed_out = _collect(proc, self.timeout)
        result = HookResult(
            path=path, exit_code=proc.returncode, output=_decode(raw),
            duration_s=time.monotonic() - started, timed_out=timed_out,
        )
        log.info("hook.done", hook=str(path), step=step, action=action,
                 exit_code=result.exit_code, timed_out=timed_out,
                 duration_ms=round(result.duration_s * 1000, 1),
                 output=_tail(result.output, MESSAGE_OUTPUT_CAP))
        if timed_out or result.exit_code != 0:
            raise _hook_error(result, step, action, self.timeout)
        return result


def hook_env(nic: Nic, *, ifindex: int | None, reason: Reason, action: str,
             bridge: str | None) -> dict[str, str]:
    """The documented hook environment for one NIC (``STEP`` and ``PATH`` are added by run).

    Optional variables (``INTERFACE_INDEX``, ``IP``, ``IP6``, ``LINK``, ``BRIDGE``, ``VLAN``,
    ``TRUNKS``, ``MTU``) are *absent* when they do not apply, never empty strings, so
    ``${VLAN+set}`` tells "no VLAN" apart from anything else.

    Tags are arbitrary user strings (spaces, quotes, ``$(...)``), so no separator is safe.
    ``TAGS`` is a JSON array (lossless; ``jq -r '.[]'``), and for plain ``sh`` each tag is also
    its own variable ``TAG_1`` .. ``TAG_<TAG_COUNT>``, read with ``printenv "TAG_$i"``.
    """
    if action not in ACTIONS:
        raise ValueError(f"hook action must be one of {ACTIONS}, got {action!r}")
    if reason not in REASONS:
        raise ValueError(f"hook reason must be one of {REASONS}, got {reason!r}")
    env = {
        "INSTANCE": nic.instance,
        "MAC": nic.nic_id,
        "MODE": nic.mode,
        "INTERFACE": nic.tap,
        "PHASE": reason,
        "ACTION": action,
        "TAGS": _tags_json(nic.tags),
        "TAG_COUNT": str(len(nic.tags)),
    }
    env.update({f"TAG_{i}": _env_safe(t) for i, t in enumerate(nic.tags, start=1)})
    optional = {
        "INTERFACE_INDEX": ifindex,
        "IP": nic.ip,
        "IP6": nic.ip6,
        "LINK": nic.link,
        "BRIDGE": bridge,
        "VLAN": nic.vlan,
        "TRUNKS": " ".join(str(t) for t in nic.trunks) if nic.trunks else None,
        "MTU": nic.mtu,
    }
    env.update({k: str(v) for k, v in optional.items() if v is not None})
    return env


def check_step(step: str) -> str:
    """Refuse a step name that is not a single safe path component (ValueError)."""
    if not isinstance(step, str) or not STEP_RE.fullmatch(step):
        raise ValueError(f"invalid hook step name {step!r}: must match {STEP_RE.pattern}")
    return step


class UntrustedHook(Exception):
    """A hook (or a directory above it) that someone other than root could have changed."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path} {why}")
        self.path = path


def _trusted_uids() -> frozenset[int]:
    return frozenset({0, os.geteuid()})


def check_trusted(path: str | Path, hooks_dir: str | Path | None) -> Path:
    """Return the resolved path of hook ``path`` if it may run; raise :class:`UntrustedHook`.

    The path is resolved the way the kernel resolves it, one component at a time from ``/``,
    and everything met on the way is checked (see the module docstring): each directory
    looked into and the file itself must be owned by root (or the daemon's uid) and not
    group- or world-writable; each symlink followed must be owned by root (or the daemon's
    uid).  A sticky directory (``/tmp``) is accepted on the way outside ``hooks_dir`` only.
    So is everything that decides *which* file runs -- including every directory holding a
    symlink -- and *what* it contains, changeable by trusted users only.  A component that
    does not exist is refused: whoever could create it later would choose what runs.
    :meth:`Hooks.run` then opens the file (``O_PATH|O_NOFOLLOW``), checks that this fd is
    the inode checked here, and executes it through that fd (:func:`_open_trusted`).
    """
    return _trusted(path, hooks_dir)[0]


def _trusted(path: str | Path, hooks_dir: str | Path | None) -> tuple[Path, os.stat_result]:
    """:func:`check_trusted`, also returning the ``lstat`` of the file it checked."""
    owners = _trusted_uids()
    base = Path(os.path.realpath(hooks_dir)) if hooks_dir is not None else None
    parts = list(Path(os.path.abspath(path)).parts[1:])
    cur = Path("/")
    _check_entry(cur, os.lstat(cur), owners, sticky_ok=True)
    links = 0
    while parts:
        name = parts.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            cur = cur.parent  # an ancestor of a checked real path: checked on the way down
            continue
        nxt = cur / name
        try:
            st = os.lstat(nxt)
        except FileNotFoundError:
            raise UntrustedHook(nxt, "does not exist") from None
        except OSError as e:
            raise UntrustedHook(nxt, f"cannot be checked: {e.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in owners:
                raise UntrustedHook(nxt, f"is a symlink owned by uid {st.st_uid}, not root")
            links += 1
            if links > 40:
                raise UntrustedHook(Path(path), "has too many levels of symbolic links")
            target = Path(os.readlink(nxt))
            if target.is_absolute():
                cur = Path("/")
                parts = list(target.parts[1:]) + parts
            else:
                parts = list(target.parts) + parts
            continue
        inside = base is not None and (nxt == base or base in nxt.parents)
        _check_entry(nxt, st, owners, sticky_ok=bool(parts) and not inside)
        cur = nxt
    if not stat.S_ISREG(st.st_mode):
        raise UntrustedHook(cur, "is not a regular file")
    return cur, st


def _open_trusted(path: str | Path, hooks_dir: str | Path | None) -> int:
    """An ``O_PATH`` fd of hook ``path`` once it passed :func:`_trusted`, and only if that fd is
    the very file checked (same device and inode, still a root-owned regular file nobody else
    may write); the caller executes through it and closes it."""
    real, checked = _trusted(path, hooks_dir)
    try:
        fd = os.open(real, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise UntrustedHook(real, f"cannot be opened: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (checked.st_dev, checked.st_ino) or not stat.S_ISREG(st.st_mode):
            raise UntrustedHook(real, "changed between the check and the open")
        _check_entry(real, st, _trusted_uids(), sticky_ok=False)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_entry(p: Path, st: os.stat_result, owners: frozenset[int], *, sticky_ok: bool) -> None:
    if st.st_uid not in owners:
        raise UntrustedHook(p, f"is owned by uid {st.st_uid}, not root")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        # A sticky directory's entries can only be replaced by their owners (checked next).
        if not (sticky_ok and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
            raise UntrustedHook(
                p, f"is group- or world-writable (mode {stat.S_IMODE(st.st_mode):04o})")


# --- finding -------------------------------------------------------------------------------


class _DirCache:
    """The set of entry names in one directory, revalidated by one ``stat`` per call.

    The key is (device, inode, mtime): replacing the directory or adding/removing an entry
    changes it.  A listing taken while the mtime was younger than ``_RACY_S`` is not trusted,
    because a second change within the same timestamp tick would keep the mtime unchanged.
    """

    def __init__(self, path: Path):
        self._path = path
        self._lock = threading.Lock()
        self._key: tuple[int, int, int] | None = None
        self._names: frozenset[str] = frozenset()

    def names(self) -> frozenset[str]:
        try:
            st = os.stat(self._path)
        except OSError:
            return frozenset()  # missing (or unreadable) hooks_dir: no hooks
        if not stat.S_ISDIR(st.st_mode):
            return frozenset()
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)
        with self._lock:
            if key == self._key:
                return self._names
            now_ns = time.time_ns()
            try:
                names = frozenset(os.listdir(self._path))
            except OSError:
                return frozenset()
            racy = now_ns - st.st_mtime_ns < _RACY_S * 1e9
            self._key = None if racy else key
            self._names = names
            return names


def _ignored(name: str) -> bool:
    return (name.startswith(".") or name.startswith("#") or name.endswith(_IGNORED_SUFFIXES)
            or any(infix in name for infix in _IGNORED_INFIXES))


def _is_executable_file(path: Path | str) -> bool:
    """A regular file (symlinks followed) that we may execute."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK)


def _scan(directory: Path) -> tuple[Path, ...]:
    """Executable regular files in ``directory``, in byte-wise lexical order ("C" locale)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return ()
    keep = [n for n in names if not _ignored(n) and _is_executable_file(directory / n)]
    keep.sort(key=lambda n: n.encode("utf-8", "surrogateescape"))
    return tuple(directory / n for n in keep)


# --- running -------------------------------------------------------------------------------


def _collect(proc: subprocess.Popen[bytes], timeout: float) -> tuple[bytes, bool]:
    """Read the hook's output until it exits or times out; reap it.  Returns (output, timed_out).

    We wait for the *process*, not for EOF: a background child the hook leaves behind may keep
    the pipe open for ever.  A pidfd tells us when the hook exits without polling; without one
    (old kernels) we poll every 50 ms.  On timeout the whole process group is SIGKILLed before
    the leader is reaped, so the group id cannot have been reused yet.
    """
    assert proc.stdout is not None
    out_fd = proc.stdout.fileno()
    os.set_blocking(out_fd, False)
    buf = bytearray()
    dropped = 0
    deadline = time.monotonic() + timeout
    pidfd = _pidfd(proc.pid)
    sel = selectors.DefaultSelector()
    try:
        sel.register(out_fd, selectors.EVENT_READ, "out")
        if pidfd is not None:
            sel.register(pidfd, selectors.EVENT_READ, "exit")
        eof = False
        while proc.poll() is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _kill_group(proc)
                proc.wait()
                dropped += _drain(out_fd, buf)
                return _with_dropped(buf, dropped), True
            wait = remaining if pidfd is not None else min(remaining, 0.05)
            for key, _ in sel.select(wait):
                if key.data == "out" and not eof:
                    chunk = _read(out_fd)
                    if chunk == b"":
                        eof = True
                        sel.unregister(out_fd)
                    elif chunk:
                        dropped += _append(buf, chunk)
        dropped += _drain(out_fd, buf)
        return _with_dropped(buf, dropped), False
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # start_new_session made the hook a session and group leader: pgid == pid.  The leader is
    # not reaped yet (at worst a zombie), so this pgid still names the hook's group.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read(fd: int) -> bytes | None:
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None


def _drain(fd: int, buf: bytearray) -> int:
    """Take what is already in the pipe, without waiting for writers that outlive the hook."""
    dropped = 0
    while True:
        chunk = _read(fd)
        if not chunk:
            return dropped
        dropped += _append(buf, chunk)


def _append(buf: bytearray, chunk: bytes) -> int:
    """Append, keeping only the last OUTPUT_CAP bytes; return how many were dropped."""
    buf += chunk
    excess = len(buf) - OUTPUT_CAP
    if excess > 0:
        del buf[:excess]
        return excess
    return 0


def _with_dropped(buf: bytearray, dropped: int) -> bytes:
    if not dropped:
        return bytes(buf)
    return f"[... {dropped} bytes of earlier output dropped ...]\n".encode() + bytes(buf)


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _check_env(env: dict[str, str]) -> None:
    """Fail early and clearly on values the kernel cannot pass (NUL) or bad names."""
    for k, v in env.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"hook environment must be str -> str, got {k!r}: {v!r}")
        if not k or "=" in k or "\0" in k or "\0" in v:
            raise ValueError(f"hook environment variable {k!r} cannot be passed (NUL or '=')")
        try:
            os.fsencode(k), os.fsencode(v)
        except UnicodeEncodeError as e:
            raise ValueError(f"hook environment variable {k!r} cannot be encoded: {e}") from None


def _env_safe(value: str) -> str:
    """``value`` with lone surrogates (legal in a JSON spec, unencodable) replaced by U+FFFD.

    Only the per-tag convenience variables need this: ``TAGS`` stays lossless via JSON escapes.
    """
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)


def _tags_json(tags: tuple[str, ...]) -> str:
    text = json.dumps(list(tags), ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: fall back to pure-ASCII escapes
        text = json.dumps(list(tags), separators=(",", ":"))
    return text


def _hook_failure(step: str, path: Path, exit_code: int | None, output: str, error: str,
             timed_out: bool) -> Failure:
    return {"step": step, "path": str(path), "exit_code": exit_code, "output": output,
            "error": error, "timed_out": timed_out}


def _hook_error(result: HookResult, step: str, action: str, timeout: float) -> HookError:
    if result.timed_out:
        how = f"timed out after {timeout:g}s (process group killed)"
    elif result.exit_code < 0:
        how = f"was killed by signal {_signame(-result.exit_code)}"
    else:
        how = f"exited with code {result.exit_code}"
    summary = f"hook {result.path} for step {step} ({action}) {how}"
    message = summary
    output = _tail(result.output, MESSAGE_OUTPUT_CAP)
    if output:
        message += "\n" + output
    failure = _hook_failure(step, result.path, result.exit_code, result.output, summary,
                       result.timed_out)
    return HookError(message, [failure], result)


def _tail(output: str, cap: int) -> str:
    output = output.rstrip("\n")
    return output if len(output) <= cap else "[...]\n" + output[-cap:]


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
