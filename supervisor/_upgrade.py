"""QEMU upgrades in place: a local live migration into a new QEMU on the same taps.

Why this works, and why nothing on the host network moves: qsup opened each tap itself.  The
new QEMU gets duplicates of the very tap descriptors the running one holds (taken back from it
with ``pidfd_getfd``: qsup closed its own copies after the spawn), the disks opened afresh by
qsup (a new open file description each: the image locks are per description, and the old QEMU
gives its up when the migration inactivates its images), the same uid, the same machine type
and the same PCI layout (both recorded in the spec).  The migration stream is a socketpair:
the new QEMU inherits one end (``migrate-incoming fd:N``), the running one gets the other over
SCM_RIGHTS (``getfd``, then ``migrate fd:upgrade``): no TCP port, no TLS, nothing anyone else
could connect to.  Routes, rules, neighbour entries, bridge ports and OVS rows are never
touched; a paused incoming QEMU does not read the shared tap (../shared/DESIGN.md).

The order:

1. ``PREPARED``: the new QEMU runs ``-incoming defer -S`` with its monitors, console and log
   FIFO at ``*.next`` paths beside the live ones; capabilities (``events``) on both sides.
2. ``STREAMING``: ``migrate`` on the old QEMU; the guest keeps running there until the
   switchover.  A failure here (or a QEMU that dies) leaves the guest running on the old QEMU:
   the new one is killed by pid, its paths removed, the taken descriptors closed.
3. ``HANDED_OVER``: the old QEMU says ``completed``; the new one is ``cont``-ed at once.  From
   here the new QEMU is the instance's: the ``*.next`` paths are renamed over the live ones
   (the console pump reconnects by itself), the record names the new pid, the old QEMU quits.

A TCG guest is not upgraded away from a QEMU < 9.0 (its dirty tracking loses writes:
``_migration.MIGRATION_MIN_QEMU``, the same gate as a live migration between nodes).
"""

from __future__ import annotations

import ctypes
import enum
import os
import socket
import stat
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import trio

import netconf
import qmp_glue

from ._errors import FieldError, describe
from ._faults import Checkpoint

if TYPE_CHECKING:
    from ._instance import Instance

log = structlog.get_logger("qsup.upgrade")

#: pidfd_getfd(2), the same number on every 64-bit architecture that has it
_SYS_PIDFD_GETFD = 438
#: the migration stream's fd name in the old QEMU (``getfd``)
FD_NAME = "qsup-upgrade"
#: how long a handover may take before it is cancelled (the guest keeps running on the old QEMU)
UPGRADE_TIMEOUT = 600.0


class UpgradeError(FieldError):
    """An upgrade was refused (a bad ``--qemu``) or failed; the guest runs on, on the QEMU it had."""


class UpgradeConflict(UpgradeError):
    """Not now: the instance migrates, is being upgraded or changed, or is not running."""


class Step(enum.Enum):
    """Where an upgrade is; each step says what a failure there must undo."""

    PREPARED = "prepared"  # the new QEMU waits for the stream: kill it, the old one runs on
    STREAMING = "streaming"  # RAM moves: cancel, kill the new one; QEMU resumes the old by itself
    HANDED_OVER = "handed-over"  # the new QEMU is the guest's: nothing is undone any more


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def take_fd(pidfd: int, target_fd: int) -> int:
    """A duplicate of ``target_fd`` of the process behind ``pidfd`` (``pidfd_getfd``), close-on-exec."""
    fd = _libc().syscall(_SYS_PIDFD_GETFD, pidfd, target_fd, 0)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd of fd {target_fd}: {os.strerror(err)}")
    return int(fd)


def check_binary(path: str) -> str:
    """``--qemu``: an absolute path to a regular executable that only root can change (it will
    run as the instance's uid, started by root).  Returns the path as given."""
    if not os.path.isabs(path):
        raise UpgradeError(f"{path!r} must be an absolute path", "qemu")
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError as e:
        raise UpgradeError(f"{path!r}: {e.strerror}", "qemu") from None
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
        raise UpgradeError(f"{path!r} is not an executable file", "qemu")
    for p in [real, *map(str, Path(real).parents)]:
        pst = os.stat(p)
        if pst.st_uid != 0 or pst.st_mode & 0o022:
            raise UpgradeError(f"{path!r}: {p!r} is not owned by root or is writable by others", "qemu")
    return path


def binary_identity(path: str) -> tuple[int, int, int] | None:
    """(dev, ino, mtime) of a QEMU binary: a package upgrade replaces the file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, int(st.st_mtime)


def running_binary_outdated(pid: int, configured: str) -> bool:
    """Does the QEMU at ``pid`` run another file than ``configured`` is now (replaced on disk by a
    package upgrade: its ``exe`` reads ``... (deleted)``, or another inode)?"""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        st = os.stat(f"/proc/{pid}/exe")
    except OSError:
        return False
    if exe.endswith(" (deleted)"):
        return True
    ident = binary_identity(configured)
    return ident is not None and (st.st_dev, st.st_ino) != ident[:2]


def next_path(p: Path) -> Path:
    """Where the new QEMU's socket or FIFO waits until the handover."""
    return p.with_name(p.name + ".next")


@dataclass
class Handover:
    """What one upgrade made, so a failure undoes exactly that."""

    step: Step = Step.PREPARED
    #: the guest ran when the upgrade began: a failure resumes it on the old QEMU if it is paused
    #: (QEMU resumes a guest it stopped for a failed migration itself, but not one qsup stopped
    #: for a stopped copy; the instance's runstate follows QEMU's STOP, so it can't tell)
    was_running: bool = False
    taken: list[int] = field(default_factory=list)  # tap fds taken from the old QEMU
    offloads: list[netconf.TapOffloads] = field(default_factory=list)  # the old QEMU's, per NIC
    stream: socket.socket | None = None  # our end of the socketpair, for the old QEMU
    t0: float = field(default_factory=time.perf_counter)

    def close(self) -> None:
        for fd in self.taken:
            os.close(fd)
        self.taken.clear()
        if self.stream is not None:
            self.stream.close()
            self.stream = None


async def wait_completed(qmp: qmp_glue.QMPClient, timeout: float) -> dict:
    """Poll the old QEMU's ``query-migrate`` until the stream ends; its last answer."""
    with trio.fail_after(timeout):
        while True:
            answer = await qmp.execute("query-migrate", timeout=5)
            info = answer if isinstance(answer, dict) else {}
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise UpgradeError(f"the local migration {status}: {info.get('error-desc', '')}".rstrip(": "))
            await trio.sleep(0.02)


def _tap_groups(pid: int, taps: list[str]) -> list[tuple[tuple[int, ...], bool]]:
    """(fds, vnet_hdr) of each of ``taps`` (the instance's NICs, in order) as the QEMU at ``pid``
    holds them: its descriptors whose ``/proc/PID/fdinfo`` names the tap (``iff:``) -- those
    passed on its command line and those a hotplug handed over with ``getfd`` alike.  vnet_hdr:
    what the command line says, else on (a hotplugged NIC's tap is opened with it)."""
    from ._process import cmdline

    args = cmdline(pid)
    off = {v.split(",id=", 1)[1].split(",", 1)[0] for o, v in zip(args, args[1:])
           if o == "-netdev" and v.startswith("tap,") and "vnet_hdr=off" in v and ",id=" in v}
    by_tap: dict[str, list[int]] = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            with open(f"/proc/{pid}/fdinfo/{name}") as f:
                iff = next((line.split(":", 1)[1].strip() for line in f if line.startswith("iff:")), None)
        except OSError:
            continue
        if iff:
            by_tap.setdefault(iff, []).append(int(name))
    out = []
    for i, tap in enumerate(taps):
        fds = sorted(by_tap.get(tap, ()))
        if not fds:
            raise UpgradeError(f"the running QEMU holds no descriptor of tap {tap!r} (nics[{i}])")
        out.append((tuple(fds), f"net{i}" not in off))
    return out


async def run_upgrade(inst: Instance, binary: str) -> dict[str, object]:
    """The handover (see the module docstring).  Runs as a task of the instance, so the
    instance's end cancels it (and the cleanup below kills the new QEMU)."""
    from ._console import open_log_fifo, pump_log
    from ._jail import plan_for
    from ._migration import Switchover, migration_refusal, qemu_version
    from ._process import QemuProcess, listening_socket
    from ._qemu import HostFds, NicFds, build_argv
    from ._state import State

    ctx, name, layout = inst.ctx, inst.name, inst.ctx.layout
    old_proc, old_qmp = inst._qemu, inst.qmp  # noqa: SLF001 - the upgrade is the instance's own procedure
    accel = inst.spec.accel or ctx.cfg.accel
    # a QEMU whose TCG loses writes between dirty syncs copies the guest stopped: one pass, consistent
    stopped_copy = migration_refusal(Switchover.STOP, accel, await qemu_version(old_qmp)) is not None
    was = inst.state
    live_paths = [layout.qmp_path(name), layout.operator_qmp_path(name), layout.console_socket_path(name),
                  layout.log_fifo_path(name)]
    h = Handover(was_running=inst.runstate == "running")
    new_proc: QemuProcess | None = None
    new_qmp: qmp_glue.QMPClient | None = None
    inst.sm.move(State.MIGRATING, "upgrade")
    inst.emit("instance.upgrading", qemu=binary, mode="stopped-copy" if stopped_copy else "live")
    try:
        with trio.fail_after(UPGRADE_TIMEOUT):
            groups = _tap_groups(old_proc.pid, [n.tap for n in inst.nics])
            pidfd = os.pidfd_open(old_proc.pid)
            try:
                taps: list[tuple[tuple[int, ...], bool]] = []
                for fds, vnet in groups:
                    dups = []
                    for fd in fds:
                        dups.append(take_fd(pidfd, fd))
                        h.taken.append(dups[-1])
                    taps.append((tuple(dups), vnet))
            finally:
                os.close(pidfd)
            # what the old QEMU set on each tap: put back if the new one goes before the handover
            h.offloads = [netconf.tap_offloads(fds[0], nic.tap) for (fds, _), nic in zip(taps, inst.nics, strict=True)]
            inst._upgrade_offloads = h.offloads  # noqa: SLF001 - recorded with the new pid
            boot = await trio.to_thread.run_sync(inst._open_boot_files)  # noqa: SLF001
            disks = await trio.to_thread.run_sync(inst._open_disks)  # noqa: SLF001
            socks = [listening_socket(next_path(p)) for p in live_paths[:3]]
            ours, theirs = socket.socketpair()
            h.stream = ours
            try:
                host = HostFds(*(s.fileno() for s in socks), **{k: f.fileno() for k, f in boot.items()})
                cfg = ctx.cfg.model_copy(update={"qemu": binary})
                argv = build_argv(inst.spec, cfg, layout,
                                  [NicFds(n.mac, fds, vnet, ns.pci_slot)
                                   for n, ns, (fds, vnet) in zip(inst.nics, inst.spec.nics, taps, strict=True)],
                                  host=host, incoming=True, disks=disks)
                jail = await trio.to_thread.run_sync(plan_for, inst.spec, cfg, _qemu_env()) if cfg.qemu_chroot else None
                log_r, log_w = open_log_fifo(next_path(live_paths[3]))
                try:
                    new_proc = QemuProcess.popen(
                        argv, pass_fds=[fd for fds, _ in taps for fd in fds] + host.all()
                        + [f.fd for d in disks for f in d.files] + [theirs.fileno()],
                        log_fd=log_w, uid=inst.uid, gid=inst.uid, jail=jail)
                except BaseException:
                    os.close(log_r)
                    raise
                finally:
                    os.close(log_w)
                stream_fd = theirs.fileno()
            finally:
                theirs.close()
                for s in socks:
                    s.close()
                for f in boot.values():
                    f.close()
                for d in disks:
                    d.close()
            inst._upgrade_pid = new_proc  # noqa: SLF001 - recorded: a restarted daemon finds it
            inst.persist()
            inst.emit("instance.upgrade_spawned", pid=new_proc.pid, qemu=binary)
            inst.checkpoint(Checkpoint.UPGRADE_SPAWNED)
            inst.spawn(partial(pump_log, next_path(live_paths[3]), layout.log_path(name),
                               ctx.cfg.console_max_bytes, read_fd=log_r))
            new_qmp = await _connect(inst, new_proc, next_path(live_paths[0]))
            # the new QEMU set its own vnet header size (10) and offloads on the shared taps while it
            # started; the running QEMU frames with what its guest negotiated (12): until the
            # handover (when the new QEMU sets the migrated values itself) the guest would be cut
            # off -- the upgrade benchmark saw a 1 s gap.  Its monitor answers: its devices are up.
            restore_offloads(inst, h.offloads, quiet=True)
            caps: list[dict[str, str | bool]] = [{"capability": "events", "state": True}]
            for q in (old_qmp, new_qmp):
                await q.execute("migrate-set-capabilities", {"capabilities": caps})
            await new_qmp.execute("migrate-incoming", {"uri": f"fd:{stream_fd}"})
            h.step = Step.STREAMING
            inst.checkpoint(Checkpoint.UPGRADE_STREAMING)
            await old_qmp.execute("getfd", {"fdname": FD_NAME}, fds=[ours.fileno()])
            h.close()  # QEMU holds its own copies now (the taps, our end of the stream)
            was_running = h.was_running
            if stopped_copy and was_running:
                await old_qmp.execute("stop")
            t_mig = time.perf_counter()
            await old_qmp.execute("migrate", {"uri": f"fd:{FD_NAME}"})
            info = await wait_completed(old_qmp, UPGRADE_TIMEOUT)
            inst.checkpoint(Checkpoint.UPGRADE_COMPLETED)
            while _status(await new_qmp.execute("query-status")) == "inmigrate":
                await trio.sleep(0.005)
            if was_running:
                await new_qmp.execute("cont")
            inst.checkpoint(Checkpoint.UPGRADE_CONT)
            h.step = Step.HANDED_OVER
            t_run = time.perf_counter()
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await _undo(inst, h, old_qmp, new_proc, new_qmp, live_paths)
            if inst.cause is None:
                inst.sm.move(was if was in (State.RUNNING, State.PAUSED) else State.RUNNING, "upgrade failed")
            inst.emit("instance.upgrade_failed", qemu=binary, error=str(exc) or type(exc).__name__)
        if isinstance(exc, UpgradeError):
            raise
        if isinstance(exc, Exception):  # never the guest's end: the old QEMU runs on
            raise UpgradeError(f"upgrade failed, the guest runs on its old QEMU: {describe(exc)}") from exc
        raise
    # the new QEMU is the guest's now: from here nothing may fail the instance
    assert new_proc is not None and new_qmp is not None
    version = await qemu_version(new_qmp)
    inst._swap_qemu(new_proc, new_qmp, ".".join(map(str, version)) if version else None)  # noqa: SLF001
    for p in live_paths:
        try:
            os.replace(next_path(p), p)
        except OSError as e:  # the console pump / a restarted daemon would not find it: say so
            log.error("upgrade: a path of the new QEMU not renamed", path=str(p), error=str(e))
    downtime = info.get("downtime") if isinstance(info, dict) else None
    result: dict[str, object] = {
        "old_pid": old_proc.pid, "pid": new_proc.pid, "qemu": binary,
        "mode": "stopped-copy" if stopped_copy else "live",
        "downtime_ms": downtime, "migration_ms": round((t_run - t_mig) * 1000, 3),
        "total_ms": round((t_run - h.t0) * 1000, 3),
    }
    inst.sm.move(was if was in (State.RUNNING, State.PAUSED) else State.RUNNING, "upgraded")
    inst.emit("instance.upgraded", **result)
    with trio.CancelScope(shield=True):
        await _retire(old_proc, old_qmp)
    return result


def _status(answer: object) -> object:
    return answer.get("status") if isinstance(answer, dict) else None


def _qemu_env() -> dict[str, str]:
    from ._process import QEMU_ENV

    return dict(QEMU_ENV)


async def _connect(inst: Instance, proc, path: Path) -> qmp_glue.QMPClient:
    """The new QEMU's monitor, or its own words if it exits first."""
    from ._process import connect_qmp_or_exit

    client = await connect_qmp_or_exit(proc, str(path), loop=inst.ctx.aio, name=f"{inst.name}.next")
    if client is None:
        await trio.sleep(0.2)  # its last words into the log
        raise UpgradeError(f"the new QEMU exited with status {proc.returncode}: {inst._log_tail()}", "qemu")  # noqa: SLF001
    return client


async def _undo(inst: Instance, h: Handover, old_qmp: qmp_glue.QMPClient, new_proc, new_qmp, live_paths) -> None:
    """Before the handover: the old QEMU keeps (or gets back) the guest, the new one goes."""
    import signal

    if h.step is Step.STREAMING:
        try:
            await old_qmp.execute("migrate_cancel", timeout=5)
        except (qmp_glue.QMPError, qmp_glue.QMPConnectionLost, trio.TooSlowError) as e:
            log.warning("upgrade: migrate_cancel", error=str(e))
        with trio.move_on_after(10):  # QEMU resumes a guest it stopped for the migration by itself;
            while True:  # a stopped-copy stop was ours
                st = await old_qmp.execute("query-migrate", timeout=5)
                if not isinstance(st, dict) or st.get("status") not in ("active", "setup", "cancelling", "device"):
                    break
                await trio.sleep(0.05)
        try:
            status = await old_qmp.execute("query-status", timeout=5)
            if isinstance(status, dict) and status.get("status") in ("paused", "postmigrate") and h.was_running:
                await old_qmp.execute("cont", timeout=5)
        except (qmp_glue.QMPError, qmp_glue.QMPConnectionLost, trio.TooSlowError) as e:
            log.warning("upgrade: resuming the old QEMU", error=str(e))
    if new_qmp is not None:
        await new_qmp.aclose()
    if new_proc is not None and new_proc.alive:
        new_proc.signal(signal.SIGKILL)
        await new_proc.wait()
    if new_proc is not None and h.offloads:
        restore_offloads(inst, h.offloads)
    inst._upgrade_pid = None  # noqa: SLF001
    if inst.cause is None:
        inst.persist()
    for p in live_paths:
        next_path(p).unlink(missing_ok=True)
    h.close()


def restore_offloads(inst: Instance, offloads: list[netconf.TapOffloads], quiet: bool = False) -> None:
    """The new QEMU set its own vnet header size and offloads on the shared taps at start: put the
    running QEMU's back (else the guest's frames are cut wrong and its network is dead) -- at once,
    and again if the new QEMU goes before the handover.  ``quiet``: no event (the normal path)."""
    proc = inst.proc
    if proc is None or not proc.alive:
        return
    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError as e:
        log.warning("upgrade: taps' offloads not restored", error=str(e))
        return
    try:
        for (fds, _), off in zip(_tap_groups(proc.pid, [n.tap for n in inst.nics]), offloads, strict=True):
            fd = take_fd(pidfd, fds[0])
            try:
                netconf.set_tap_offloads(fd, off)
            finally:
                os.close(fd)
        if not quiet:
            inst.emit("instance.upgrade_taps_restored", offloads=[o.to_dict() for o in offloads])
    except (OSError, ValueError) as e:
        log.error("upgrade: taps' offloads not restored", error=str(e))
        inst.emit("instance.upgrade_taps_restore_failed", error=str(e))
    finally:
        os.close(pidfd)


async def _retire(proc, qmp: qmp_glue.QMPClient) -> None:
    """The old QEMU, handed over: ``quit``, by pid if it does not."""
    import signal

    try:
        await qmp.quit(timeout=10)
    except (qmp_glue.QMPError, qmp_glue.QMPConnectionLost, trio.TooSlowError) as e:
        log.info("upgrade: quit of the old QEMU", error=str(e))
    with trio.move_on_after(10):
        await proc.wait()
    if proc.alive:
        proc.signal(signal.SIGKILL)
        await proc.wait()
    await qmp.aclose()


async def settle(inst: Instance, old, rec: dict):
    """A daemon died during an upgrade (its record names the new QEMU): decide which QEMU holds
    the guest and end with exactly one.  Returns the process to adopt (None: neither lives).

    * the old QEMU's migration ``completed``: the guest is the new one's (``cont`` it if the
      guest ran), the old one goes;
    * otherwise the old QEMU keeps it (its migration is cancelled; a stopped copy is resumed),
      the new one goes -- also when the old one is gone and the new never got the whole guest.
    """
    import signal

    from ._process import QemuProcess, cmdline

    up = rec.get("upgrade") or {}
    layout, name = inst.ctx.layout, inst.name
    live = [layout.qmp_path(name), layout.operator_qmp_path(name), layout.console_socket_path(name),
            layout.log_fifo_path(name)]
    new = QemuProcess.attach(up["pid"], up.get("pid_start_time")) if isinstance(up.get("pid"), int) else None
    if new is not None and f"guest={name},debug-threads=on" not in cmdline(new.pid):
        new = None
    was_running = up.get("was_running", True) is not False

    async def status(path: Path, what: str) -> tuple[qmp_glue.QMPClient | None, str | None, str | None]:
        try:
            q = await qmp_glue.connect(str(path), loop=inst.ctx.aio, timeout=5, name=f"{name}.{what}")
        except (qmp_glue.QMPConnectionLost, trio.TooSlowError, OSError):
            return None, None, None
        try:
            mig, run = _status(await q.execute("query-migrate", timeout=5)), \
                _status(await q.execute("query-status", timeout=5))
            return q, str(mig) if mig else None, str(run) if run else None
        except (qmp_glue.QMPError, qmp_glue.QMPConnectionLost, trio.TooSlowError):
            await q.aclose()
            return None, None, None

    old_q, old_mig, old_run = (await status(live[0], "old")) if old is not None else (None, None, None)
    new_q, _, new_run = (await status(next_path(live[0]), "new")) if new is not None else (None, None, None)
    handed_over = old_mig == "completed" or (old is None and new_run in ("paused", "running"))
    try:
        if new is not None and handed_over:
            if new_q is not None and new_run == "paused" and was_running:
                await new_q.execute("cont", timeout=5)
            if old is not None:
                old.signal(signal.SIGKILL)
                await old.wait()
            for p in live:
                if next_path(p).exists():
                    os.replace(next_path(p), p)
            inst.emit("instance.upgrade_settled", kept="new", pid=new.pid)
            return new
        if new is not None:
            new.signal(signal.SIGKILL)
            await new.wait()
        # the new QEMU (killed now, or gone by itself: its stream closed with the daemon) set its
        # own offloads on the shared taps at start
        saved = [netconf.TapOffloads(**o) for o in up.get("offloads") or [] if isinstance(o, dict)]
        if old is not None and len(saved) == len(inst.nics):
            inst.proc = old
            restore_offloads(inst, saved)
        if old_q is not None and old_mig in ("active", "setup", "device", "pre-switchover"):
            await old_q.execute("migrate_cancel", timeout=5)
        if old_q is not None and old_run in ("paused", "postmigrate") and was_running:
            await old_q.execute("cont", timeout=5)
        for p in live:
            next_path(p).unlink(missing_ok=True)
        inst.emit("instance.upgrade_settled", kept="old" if old is not None else "none",
                  pid=old.pid if old is not None else None)
        return old
    except (qmp_glue.QMPError, qmp_glue.QMPConnectionLost, trio.TooSlowError) as e:
        log.warning("upgrade settle", error=str(e))
        return old if not handed_over else new
    finally:
        for q in (old_q, new_q):
            if q is not None:
                await q.aclose()
