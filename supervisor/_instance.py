"""One supervised instance: one task, one nursery, one teardown.

:meth:`Instance.run` is the instance's only task.  It takes a *launcher*
(start, be a migration destination, or adopt a QEMU a previous daemon
started), then supervises, and always ends in :meth:`Instance._teardown`.
The launcher runs *before* ``task_status.started()``, so a failed start
raises straight back to whoever asked for it, after the teardown rolled
everything back.

Start, in order (each step timed; the timings go into ``instance.started``):

1. open each NIC's tap (the supervisor owns the fds);
2. spawn QEMU with ``-S`` and the tap fds, then close our copies;
3. connect QMP on the unix socket (racing QEMU's exit: a bad command line
   fails fast with QEMU's own words);
4. netconf ``attach`` then ``activate`` for every NIC, journaled;
5. ``cont``.

Why an exit *cause* rather than flags: the code that makes QEMU go away
knows why (a stop request, the guest's own shutdown, a hand-over to
another node...), and the teardown needs exactly that one fact to decide
what to undo and which final state follows (:data:`supervisor._state.EXITS`).
The first cause set wins; QEMU exiting with no cause set is a crash.

The instance serves its migrations through :class:`supervisor._migration.InstancePort`
(the methods in the "port" section below) and acts on the
:class:`~supervisor._migration.Outcome` each one ends with.
"""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, TypeVarTuple, cast

import structlog
import trio

import netconf
import qmp_glue

from ._config import Config
from ._console import open_log_fifo, pump_console, pump_log, read_tail
from ._disks import OpenDisk, device_id, node_name, open_disks, throttle
from ._errors import FieldError, describe, hook_output, only_cancelled, root_cause
from ._eventlog import EventLog
from ._faults import NO_FAULTS, Checkpoint
from ._hotplug import DiskOps
from ._images import BOOT_FIELDS, open_boot_files
from ._jail import MARK as JAIL_MARK
from ._jail import jail_dir, plan_for, remove_dir
from ._migration import (
    IncomingMigration,
    MigrateOptions,
    MigrationError,
    Outcome,
    OutgoingMigration,
    free_port,
    qemu_version,
    qmp_timestamp,
    recovery_options,
    tcp_uri,
)
from ._nicplug import NicOps
from ._process import QEMU_ENV, QemuProcess, connect_qmp_or_exit, listening_socket
from ._qemu import HostFds, NicFds, build_argv
from ._ratelimit import EventBudget
from ._records import Layout, ensure_dir, write_json
from ._spec import MACHINE_RE, InstanceSpec, SpecError
from ._state import EXITS, GUEST_FAULT_EVENTS, GUEST_STUCK, ExitCause, RunState, State, StateMachine, require
from ._storage import Targets
from ._tls import MigrationKey, qemu_creds_dir, qemu_gid, remove_qemu_creds, setup_qemu_tls
from ._uids import UidAllocator, unprivileged_userfaultfd
from ._upgrade import UpgradeConflict, UpgradeError, check_binary, run_upgrade, running_binary_outdated, settle

if TYPE_CHECKING:
    from ._migration import InstancePort

log = structlog.get_logger("qsup.instance")

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")


class FaultPoints(Protocol):
    """Where fault injection hooks in: :data:`~supervisor._faults.NO_FAULTS`, or a ``Faults`` in tests."""

    def reach(self, point: Checkpoint) -> None: ...


#: how often an instance looks whether its QEMU binary was replaced on disk (a readlink and a stat)
OUTDATED_POLL = 10.0


class _Closeable(Protocol):
    def close(self) -> None: ...


@dataclass
class NodeContext:
    """What every instance of a node shares."""

    cfg: Config
    layout: Layout
    events: EventLog
    aio: qmp_glue.AsyncioThread
    worker: netconf.NetconfWorker
    hooks: netconf.Hooks | None = None
    faults: FaultPoints = NO_FAULTS  # a supervisor._faults.Faults in tests
    uids: UidAllocator = dataclasses.field(default_factory=UidAllocator)  # the node passes one built from qemu_uids


class StartError(FieldError, RuntimeError):
    """Starting failed; everything was rolled back.  ``field`` names the culprit when known."""


def build_nics(spec: InstanceSpec) -> list[netconf.Nic]:
    """The netconf view of the spec's NICs (taps named from instance + MAC)."""
    out = []
    for n in spec.resolved_nics():
        if n.mac is None:  # resolved_nics() fills every MAC in
            raise RuntimeError(f"instance {spec.name!r}: a resolved NIC has no MAC")
        vlan, trunks = (n.vlan, ()) if isinstance(n.vlan, int) else (None, tuple(n.vlan or ()))
        out.append(
            netconf.Nic(
                instance=spec.name,
                mac=n.mac,
                mode=n.mode,
                tap=netconf.tap_name_for(spec.name, n.mac),
                link=n.link,
                ip=n.ip,
                ip6=n.ip6,
                vlan=vlan,
                trunks=trunks,
                queues=n.queues,
                tags=tuple(spec.tags),
            )
        )
    return out


def check_host(nics: list[netconf.Nic]) -> None:
    """Host facts a spec can't check itself: the bridge, OVS bridge or table must exist.

    Blocking (sysfs, ``ovs-vsctl``): the node runs it on a worker thread.
    ``check_link``'s own field (``nics[0].vlan``, ``nics[0].link``) is kept.
    """
    for i, nic in enumerate(nics):
        try:
            netconf.check_link(nic, i)
        except netconf.NetconfError as e:
            field, sep, msg = str(e).partition(": ")
            raise SpecError(msg, field) if sep else SpecError(str(e), f"nics[{i}]") from None


def _ms(a: float, b: float) -> float:
    return round((b - a) * 1000, 3)


def _run_status(answer: qmp_glue.JSONValue) -> tuple[RunState, bool]:
    """``query-status``'s answer: QEMU's run state (``running``, ``paused``, ...) and its ``running`` flag."""
    if isinstance(answer, dict):
        status = answer.get("status", "")
        if isinstance(status, str):
            return RunState.of(status), bool(answer.get("running"))
    raise TypeError(f"query-status answered {answer!r}, not an object with a status")


@dataclass
class _StopRequest:
    force: bool = False
    timeout: float | None = None


class Instance:
    """A QEMU process, its taps and its host network, from launch to final state."""

    def __init__(self, spec: InstanceSpec, ctx: NodeContext):
        self.spec = spec
        self.name = spec.name
        self.ctx = ctx
        self.nics = build_nics(spec)
        self.sm = StateMachine(State.STARTING, self._on_state)
        self.proc: QemuProcess | None = None
        self._qmp: qmp_glue.QMPClient | None = None
        self._executor: netconf.Executor | None = None  # opened at launch: claiming a name writes nothing
        #: kernel/initrd/disk as the node checked them (as opened: no symlink below the image dir): what QEMU is given
        self.images: dict[str, str] = {}
        self._upgrade_pid: QemuProcess | None = None  # the new QEMU while an upgrade runs
        self._upgrade_offloads: list[netconf.TapOffloads] = []  # the old QEMU's tap settings meanwhile
        self.qemu_version: str | None = None  # the running QEMU's, from query-version
        self._fd_paths: dict[str, str] = {}  # "/proc/self/fd/N" QEMU was given -> the file's path
        #: a migration destination's local-disk targets, created by the node's claim (supervisor/_storage.py)
        self.targets: Targets | None = None
        self.timings: dict[str, float] = {}
        self.error: str | None = None
        self.created = time.time()
        #: the guest's identity: new at every start, carried by a live migration, so
        #: "same generation on the new node" proves it was migrated, not restarted
        self.generation = uuid.uuid4().hex
        #: the uid this instance's QEMU runs as (its own, from ``qemu_uids``); None: the daemon's
        self.uid: int | None = None
        self.cause: ExitCause | None = None
        #: QEMU's run state as ``query-status`` names it (running, paused, guest-panicked, ...)
        self.runstate = RunState.PRELAUNCH
        self.panic: qmp_glue.JSONObject | None = None
        self.migration: IncomingMigration | OutgoingMigration | None = None
        self._stop_request: _StopRequest | None = None
        self._stop_wanted = trio.Event()
        self._migration_settled = trio.Event()
        self._migration_settled.set()
        #: finishes a migration a killed daemon left behind (adopt only)
        self._recovery: Callable[[], Awaitable[None]] | None = None
        self._nursery: trio.Nursery | None = None
        self._log_drained = trio.Event()  # QEMU's stderr copied to its end (the pump saw EOF)
        self._log_drained.set()
        #: QMP events not logged (rate limit: supervisor/_ratelimit.py); their handlers ran
        self.qmp_dropped = 0
        #: live disk changes (supervisor/_hotplug.py) and the fdsets each disk's files are in
        self.disk_ops = DiskOps(self)
        #: live NIC changes (supervisor/_nicplug.py) and QEMU's ids of each NIC
        self.nic_ops = NicOps(self)
        self.done = trio.Event()

    # -- views ---------------------------------------------------------
    @property
    def state(self) -> State:
        return self.sm.state

    @property
    def executor(self) -> netconf.Executor:
        if self._executor is None:
            self._executor = netconf.Executor(
                netconf.Journal(self.ctx.layout.journal_path(self.name)), hooks=self.ctx.hooks)
        return self._executor

    def view(self) -> dict[str, Any]:
        """What ``show``/``ls`` print; ``state`` is one of :class:`~supervisor._state.State`."""
        return {
            "name": self.name,
            "state": self.state.value,
            "runstate": self.runstate,
            "generation": self.generation,
            "pid": self.proc.pid if self.proc and self.proc.alive else None,
            "uid": self.uid,
            "memory": self.spec.memory,
            "vcpus": self.spec.vcpus,
            "tags": list(self.spec.tags),
            "nics": [
                {"mac": n.mac, "mode": n.mode, "tap": n.tap, "link": n.link, "ip": n.ip,
                 "ip6": n.ip6, "vlan": n.vlan, "trunks": list(n.trunks), "queues": n.queues,
                 "pci_slot": ns.pci_slot}
                for n, ns in zip(self.nics, self.spec.nics, strict=True)
            ],
            "machine": self.spec.machine,
            "qemu": self.qemu_identity(),
            "disks": [d.model_dump(mode="json", exclude_none=True) for d in self.spec.disks],
            "qmp_operator": str(self.ctx.layout.operator_qmp_path(self.name)),
            "console": str(self.ctx.layout.console_path(self.name)),
            "created": self.created,
            "timings_ms": self.timings,
            "error": self.error,
            "exit_cause": self.cause.value if self.cause else None,
            "panic": self.panic,
            "migration": self.migration.view() if self.migration else None,
        }

    def _migration_record(self) -> dict[str, Any] | None:
        m = self.migration
        if m is None or (isinstance(m, IncomingMigration) and m.activated) or \
                (isinstance(m, OutgoingMigration) and m.done.is_set()):
            return None
        return m.record()

    def record(self) -> dict[str, Any]:
        return {
            "version": 1,
            "name": self.name,
            "spec": self.spec.model_dump(mode="json"),
            "state": self.state.value,
            "pid": self.proc.pid if self.proc else None,
            "pid_start_time": self.proc.started_at if self.proc else None,
            "qmp": str(self.ctx.layout.qmp_path(self.name)),
            # The NIC<->tap association, keyed by the stable NIC id (the MAC).
            "nics": {n.nic_id: n.to_dict() for n in self.nics},
            "created": self.created,
            "generation": self.generation,
            "uid": self.uid,
            "migration": self._migration_record(),
            # the new QEMU of an upgrade under way: a restarted daemon settles which one holds the guest
            "upgrade": {"pid": self._upgrade_pid.pid, "pid_start_time": self._upgrade_pid.started_at,
                        "was_running": self.runstate == RunState.RUNNING,
                        "offloads": [o.to_dict() for o in self._upgrade_offloads]}
            if self._upgrade_pid is not None else None,
            "fdsets": self.disk_ops.record(),
            "nic_ops": self.nic_ops.record(),
        }

    def _save(self) -> None:
        write_json(self.ctx.layout.record_path(self.name), self.record())

    def _on_state(self, old: State, new: State, reason: str) -> None:
        log.info("state", instance=self.name, old=old.value, new=new.value, reason=reason)
        self.emit(f"instance.{new.value}", previous=old.value, reason=reason)
        # The record matters to a restarted daemon only for starting/migrating
        # (running vs paused comes from query-status), so pause/resume don't
        # pay two fsyncs on the trio thread.
        if {old, new} <= {State.RUNNING, State.PAUSED}:
            return
        if not new.is_final and self.ctx.layout.instance_dir(self.name).exists():
            self._save()

    # -- the port a migration uses (supervisor._migration.InstancePort) --
    @property
    def qmp(self) -> qmp_glue.QMPClient:
        """QEMU's monitor: connected by the launcher, before anything can use it."""
        if self._qmp is None:
            raise RuntimeError(f"instance {self.name!r}: QMP is not connected yet")
        return self._qmp

    @property
    def stop_requested(self) -> bool:
        """An exit is under way: a migration destination must not activate any more."""
        return self.cause is not None

    def emit(self, type: str, **data: Any) -> dict[str, Any]:
        return self.ctx.events.emit(type, instance=self.name, **data)

    def checkpoint(self, point: Checkpoint) -> None:
        self.ctx.faults.reach(point)

    def spec_json(self) -> dict[str, Any]:
        return self.spec.model_dump(mode="json")

    def spawn(self, fn: Callable[[*_Ts], Awaitable[object]], *args: *_Ts) -> None:
        """Run ``fn(*args)`` as a task of this instance (it ends with the instance).

        trio copies the context of the task that calls ``start_soon`` -- for a
        migration that is an HTTP handler -- so the instance's log context is
        bound again here.
        """
        async def bound() -> None:
            with structlog.contextvars.bound_contextvars(instance=self.name):
                await fn(*args)

        self._tasks.start_soon(bound)

    # -- what exists once launched -----------------------------------
    @property
    def _qemu(self) -> QemuProcess:
        """QEMU's process: set by the launcher (spawned or adopted) before anything supervises it."""
        if self.proc is None:
            raise RuntimeError(f"instance {self.name!r} has no QEMU process yet")
        return self.proc

    @property
    def _tasks(self) -> trio.Nursery:
        """The instance's nursery: open for as long as :meth:`run` runs."""
        if self._nursery is None:
            raise RuntimeError(f"instance {self.name!r} is not running")
        return self._nursery

    async def apply_l3(self, reason: netconf.Reason, *, inline: bool = False) -> float:
        """L3 for every NIC; returns netconf's own ms.

        Normally one hop to the netconf thread.  ``inline`` (a migration
        destination's activation, staged at prepare) runs it right here on
        the trio thread: with the journal already written it is a few
        netlink round trips, cheaper than waking another thread.  Never
        inline when a hook would run (a hook may take seconds).
        """
        if inline and not any(self.executor.hooked(netconf.plan(n, "activate")) for n in self.nics):
            return self._apply_phase("activate", reason)
        return await self.ctx.worker.run(self._apply_phase, "activate", reason)

    async def release_l3(self) -> None:
        """Undo exactly the journal's activate entries (routes, rules, sysctls)."""
        await self.ctx.worker.run(self.executor.undo, reason="migrate-out", phases={"activate"})

    def persist(self) -> None:
        """Write the record now (a migration's progress a restarted daemon must know)."""
        self._save()

    async def announce(self) -> None:
        """Gratuitous ARP / unsolicited NA for routed guests on the node's uplinks."""
        ifaces = self.ctx.cfg.announce_interfaces
        if not ifaces:
            return
        for nic in self.nics:
            if nic.mode == "routed":
                try:
                    res = await self.ctx.worker.run(netconf.announce, ifaces, ip=nic.ip, ip6=nic.ip6)
                    self.emit("migration.announced", mac=nic.mac, results=res)
                except netconf.NetconfError as e:
                    self.emit("migration.announce_failed", mac=nic.mac, error=str(e))

    # -- the task ------------------------------------------------------
    def exit(self, cause: ExitCause, error: str | None = None) -> None:
        """Say why QEMU goes away.  The first cause wins; the teardown acts on it."""
        if self.cause is None:
            self.cause = cause
            if error:
                self.error = error
            log.info("exit", instance=self.name, cause=cause.value, error=error)

    async def run(self, launcher: Callable[[*_Ts], Awaitable[_T]], *args: *_Ts,
                  task_status: trio.TaskStatus[_T] = trio.TASK_STATUS_IGNORED) -> None:
        """The instance's one task: launch, supervise, tear down.

        Before ``started`` a failure is the launch's: it is rolled back and
        raised to the caller as :class:`StartError`.  After it, nothing is
        raised except a cancellation (the node leaving its guests running):
        an unexpected error becomes the ``internal error`` exit cause, so the
        instance still ends in a final state with its error in an event.
        """
        started = False
        failure: BaseException | None = None
        with structlog.contextvars.bound_contextvars(instance=self.name):
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    value = await launcher(*args)
                    started = True
                    task_status.started(value)
                    if self.cause is None:
                        await self._supervise(nursery)
            except BaseException as exc:
                failure = exc
                if not started:
                    cause = root_cause(exc)
                    failures = getattr(cause, "failures", None)
                    if failures:  # netconf's per-step details, as an event
                        self.emit("netconf.failed", error=str(cause), failures=failures)
                    self.exit(ExitCause.START_FAILED, self._start_error_text(cause))
                elif not only_cancelled(exc):
                    log.error("instance task failed", error=describe(exc), exc_info=root_cause(exc))
                    self.emit("instance.internal_error", error=describe(exc))
                    self.exit(ExitCause.INTERNAL_ERROR, f"internal error: {describe(exc)}")
            finally:
                with trio.CancelScope(shield=True):
                    await self._teardown()
        if failure is None:
            return
        if only_cancelled(failure):
            raise failure
        if not started:
            cause = root_cause(failure)
            field = getattr(cause, "field", None)
            raise StartError(self.error or describe(failure), field) from failure

    @staticmethod
    def _start_error_text(cause: BaseException) -> str:
        """QEMU's or netconf's own words (without the field, which is reported apart); a failing
        hook's output belongs in it too."""
        field = getattr(cause, "field", None)
        if field:
            return str(cause).removeprefix(f"{field}: ") + hook_output(cause)
        return describe(cause)

    async def _teardown(self) -> None:
        """The one teardown.  From the exit cause alone: what to undo and which final state follows.

        No cause means the node is leaving the guest running (daemon
        shutdown): close our handles, keep QEMU, its network and its record
        for the next daemon.  Otherwise QEMU is made dead first, then the
        journal is undone, then the records go (kept if the undo failed, so
        a later daemon retries it), then the final state.
        """
        try:
            if self.cause is None:
                return
            exit_ = EXITS[self.cause]
            if self.proc is not None and self.proc.alive:
                self.proc.signal(signal.SIGKILL)
                await self.proc.wait()
            if self.uid is not None:
                self.ctx.uids.release(self.uid)  # its QEMU is gone: the uid owns nothing running
            if self.targets is not None:
                self.targets.close()
            if isinstance(self.migration, IncomingMigration):  # images created for a migration that failed
                self.migration.discard_targets()
            remove_qemu_creds(self.ctx.cfg.run_dir, self.name)  # a migration's key, if one was left
            jail = jail_dir(self.ctx.cfg.state_dir, self.name)  # qemu_chroot's mount point: empty, QEMU is dead
            if not remove_dir(jail):
                log.warning("jail directory not empty: left as it is", path=str(jail))
            await self._close_qmp()
            failures = await self._undo_netconf(exit_.undo_reason) if self._journal_exists() else []
            if not failures:
                self.ctx.layout.remove_instance(self.name)
            if self.cause is ExitCause.QEMU_DIED and self.error is None:
                rc = self.proc.returncode if self.proc else None
                self.error = f"qemu exited unexpectedly (status {rc}): {self._log_tail()}"
            self.sm.move(exit_.final, self.error or self.cause.value)
        finally:
            await self._close_qmp()
            if self._executor is not None:
                self._executor.journal.close()
            self.done.set()

    def _journal_exists(self) -> bool:
        return self._executor is not None or self.ctx.layout.journal_path(self.name).exists()

    async def _close_qmp(self) -> None:
        if self._qmp is not None:
            await self._qmp.aclose()

    async def _undo_netconf(self, reason: netconf.Reason) -> list[dict[str, Any]]:
        t = time.perf_counter()
        try:
            await self.ctx.worker.run(self.executor.undo, reason=reason)
        except netconf.NetconfError as e:
            log.error("netconf undo failed", error=str(e), failures=e.failures)
            self.emit("netconf.undo_failed", reason=reason, error=str(e), failures=e.failures)
            return e.failures or [{"error": str(e)}]
        self.emit("netconf.undone", reason=reason, ms=_ms(t, time.perf_counter()))
        return []

    # -- launchers -----------------------------------------------------
    async def launch_start(self) -> "Instance":
        t0 = time.perf_counter()
        self.emit("instance.starting", spec=self.spec_json())
        t_spawn, t_qmp = await self._launch(incoming=False, reason="start")
        await self.ctx.worker.run(self._apply_phase, "activate", "start")
        self.checkpoint(Checkpoint.ACTIVATED)
        t_net = time.perf_counter()
        self.emit("netconf.applied", phases=["attach", "activate"], ms=_ms(t_qmp, t_net))
        self.checkpoint(Checkpoint.CONT)
        await self.qmp.execute("cont")
        self.runstate = RunState.RUNNING
        t_run = time.perf_counter()
        self.timings = {
            "spawn": _ms(t0, t_spawn), "qmp_ready": _ms(t_spawn, t_qmp),
            "netconf": _ms(t_qmp, t_net), "cont": _ms(t_net, t_run), "total": _ms(t0, t_run),
        }
        self.sm.move(State.RUNNING, "started")
        self.emit("instance.started", timings_ms=self.timings, pid=self._qemu.pid)
        return self

    async def launch_incoming(self, postcopy: bool, source: str | None = None) -> str:
        """Destination of a live migration: L2 now, L3 staged, applied only at ``completed``.
        ``source``: the declared peer that prepared it (kept on the migration, and recorded)."""
        ctx = self.ctx
        t = self.targets
        m = self.migration = IncomingMigration(self, postcopy, release_wait=ctx.cfg.incoming_timeout,
                                               source=source, created=t.created if t else None,
                                               local=t.local if t else None)
        t0 = time.perf_counter()
        self.emit("instance.starting", spec=self.spec_json(), incoming=True)
        await self._launch(incoming=True, reason="migrate-in")
        for nic in self.nics:  # journal L3 now: at ``completed`` only netlink work remains
            await ctx.worker.run(self.executor.stage, netconf.plan(nic, "activate"))
        self.checkpoint(Checkpoint.STAGED)
        caps: list[dict[str, str | bool]] = [{"capability": "events", "state": True},
                                              {"capability": "postcopy-ram", "state": postcopy}]
        await self.qmp.execute("migrate-set-capabilities", {"capabilities": caps})
        creds = None
        if ctx.cfg.tls is not None:  # only the source that gets this key in the answer gets in
            m.key, m.creds_dir = MigrationKey.new(), qemu_creds_dir(ctx.cfg.run_dir, self.name, "server")
            creds = await setup_qemu_tls(self.qmp, m.key, m.creds_dir, endpoint="server",
                                         gid=qemu_gid(self._qemu.pid))
        addr = ctx.cfg.migration_address
        await m.export_disks(addr, creds)  # the local disks' targets, for the source's mirrors
        uri = tcp_uri(addr, free_port(addr))
        self.checkpoint(Checkpoint.LISTENING)
        await self.qmp.execute("migrate-incoming", {"uri": uri})
        m.uri = uri
        self.runstate = RunState.INMIGRATE
        self.sm.move(State.MIGRATING, "incoming")
        self.timings = {"prepare": _ms(t0, time.perf_counter())}
        self.emit("migration.prepared", uri=uri, postcopy=postcopy, timings_ms=self.timings, pid=self._qemu.pid)
        return uri

    async def launch_adopt(self, proc: QemuProcess | None, rec: dict[str, Any]) -> "Instance":
        """Take over a QEMU that a previous daemon started; never stops or pauses a live guest.

        ``rec`` is the instance's record as :meth:`record` wrote it (read back from JSON).

        A QEMU that died meanwhile, or whose start was cut short by the
        restart, gets its exit cause here and goes straight to the teardown.
        """
        if rec.get("upgrade"):  # the daemon died during an upgrade: one QEMU stays (supervisor/_upgrade.py)
            proc = await settle(self, proc, rec)
            self.proc = proc
            if proc is not None:
                self._save()  # the QEMU kept, and no upgrade under way any more
        self.proc = proc
        migration = rec.get("migration")
        if proc is None:
            if migration and migration.get("direction") == "in":  # never activated: an aborted incoming
                # (its record, for the teardown: the target images it created go)
                self.migration = IncomingMigration.from_record(self, migration, self.ctx.cfg.incoming_timeout)
                self.exit(ExitCause.INCOMING_ABORTED, "incoming migration ended while qsup was down")
            else:
                self.exit(ExitCause.QEMU_DIED, "qemu died while qsup was down")
            return self
        if rec.get("state") == State.STARTING.value:
            self.exit(ExitCause.START_FAILED, "start interrupted by a daemon restart")
            return self
        self.checkpoint(Checkpoint.REATTACH)
        await self._follow_log(None)  # first: what QEMU writes while no one reads the FIFO is lost
        self._qmp = await qmp_glue.connect(
            str(self.ctx.layout.qmp_path(self.name)), loop=self.ctx.aio, timeout=5, name=self.name)
        self.checkpoint(Checkpoint.REATTACH_STATUS)
        answer = await self.qmp.execute("query-status")
        await self._follow_console()
        try:  # a record from before machine types and PCI slots were pinned
            await self._pin_machine()
            await self._learn_layout()
        except (qmp_glue.QMPError, trio.TooSlowError) as e:
            log.info("machine type or device layout not pinned", error=str(e))
        self.runstate, running = _run_status(answer)
        self.disk_ops.adopted(rec.get("fdsets"))
        await self.nic_ops.adopted(rec.get("nic_ops"))  # settles a NIC change a killed daemon left
        if migration and migration.get("direction") == "in":
            incoming = IncomingMigration.from_record(self, migration, self.ctx.cfg.incoming_timeout)
            self.migration = incoming
            self._recovery = partial(self._recover_incoming, incoming)
        elif migration:
            opts = recovery_options(self.ctx.cfg, str(migration.get("to", "")), bool(migration.get("postcopy")),
                                    migration.get("switchover"))
            outgoing = OutgoingMigration(self, opts, was_running=bool(migration.get("was_running", True)))
            self.migration = outgoing
            self._migration_settled = trio.Event()
            self._recovery = partial(self._recover_outgoing, outgoing)
        if migration:
            self.sm.move(State.MIGRATING, f"reattached mid-migration (qemu status {self.runstate})")
        else:
            new = State.RUNNING if running else State.PAUSED
            self.sm.move(new, f"reattached (qemu status {self.runstate})")
        self.emit("instance.reattached", pid=proc.pid, qemu_status=self.runstate, migration=migration)
        return self

    async def _launch(self, *, incoming: bool, reason: netconf.Reason) -> tuple[float, float]:
        """Taps, QEMU (-S), QMP, then L2 ``attach``.  Returns (t_spawned, t_qmp_ready)."""
        ctx, name = self.ctx, self.name
        self.checkpoint(Checkpoint.DIRS)
        ensure_dir(ctx.layout.instance_dir(name))
        ensure_dir(ctx.layout.instance_run_dir(name))
        self._save()
        self.executor  # open the journal now: the teardown undoes whatever it records
        self.checkpoint(Checkpoint.TAPS)
        opened: list[_Closeable] = []  # taps, sockets and files QEMU gets as fds; ours are closed after the spawn
        try:
            # kernel/initrd, opened once more (a file may have changed since the check) on a
            # worker thread (a FIFO, a slow disk) and copied into sealed memfds: QEMU's copies
            self.checkpoint(Checkpoint.IMAGES_CHECKED)
            boot = await trio.to_thread.run_sync(self._open_boot_files)
            opened.extend(boot.values())
            disks = await trio.to_thread.run_sync(self._open_disks)
            opened.extend(disks)
            taps: list[netconf.TapHandle] = []
            for nic in self.nics:
                taps.append(netconf.open_tap(nic.tap, nic.queues, mac=netconf.fe_mac(nic.mac)))
                opened.append(taps[-1])
            host = self._host_fds(opened, boot)
            argv = build_argv(
                self.spec, ctx.cfg, ctx.layout,
                [NicFds(n.mac, tuple(t.fds), t.vnet_hdr, ns.pci_slot)
                 for n, ns, t in zip(self.nics, self.spec.nics, taps, strict=True)],
                host=host, incoming=incoming, disks=disks,
            )
            self._name_fdsets(disks)
            self.disk_ops.launched(disks)
            self.nic_ops.launched()
            self.uid = self._qemu_uid()
            jail = None
            if ctx.cfg.qemu_chroot:  # file system work: a worker thread
                jail = await trio.to_thread.run_sync(plan_for, self.spec, ctx.cfg, QEMU_ENV)
            # stdout/stderr into a FIFO qsup copies into the capped log (supervisor/_console.py)
            log_r, log_w = open_log_fifo(ctx.layout.log_fifo_path(name))
            try:
                self.proc = QemuProcess.popen(
                    argv, pass_fds=[fd for t in taps for fd in t.fds] + host.all()
                    + [f.fd for d in disks for f in d.files], log_fd=log_w,
                    uid=self.uid, gid=self.uid, jail=jail)
            except BaseException:
                os.close(log_r)
                raise
            finally:
                os.close(log_w)
        finally:
            for thing in opened:  # QEMU holds its own copies now
                thing.close()
        await self._follow_log(log_r)  # at once: the pump owns the read end from here
        t_spawn = time.perf_counter()
        self._save()
        log.info("spawned", pid=self.proc.pid)
        self.checkpoint(Checkpoint.SPAWNED)
        await self._follow_console()
        self._qmp = await self._connect_qmp()
        t_qmp = time.perf_counter()
        self.checkpoint(Checkpoint.QMP)
        await self._pin_machine()
        for d in self.spec.disks:
            limits = throttle(d)
            if limits is not None:  # a BlockBackend's setting: not migrated, set on every QEMU
                await self.qmp.execute("block_set_io_throttle", cast(qmp_glue.JSONObject, limits))
        await ctx.worker.run(self._apply_phase, "attach", reason)
        self.checkpoint(Checkpoint.ATTACHED)
        return t_spawn, t_qmp

    def _open_boot_files(self) -> dict[str, io.FileIO]:
        """Kernel and initrd by the rule of supervisor/_images.py, as sealed memfds (blocking: a worker thread)."""
        paths = {k: self.images.get(k) or getattr(self.spec, k) for k in BOOT_FIELDS}
        return open_boot_files(paths, self.ctx.cfg.image_dirs, max_bytes=self.spec.memory << 20)

    async def _pin_machine(self) -> None:
        """Record the versioned machine type QEMU's ``pc`` alias stands for, once: a guest must
        keep its machine across migrations and upgrades to another QEMU (docs/ARCHITECTURE.md).
        Learns the running QEMU's version too (``show``)."""
        await self._learn_version(self.qmp)
        if self.spec.machine is not None:
            return
        machines = await self.qmp.execute("query-machines")
        pinned = next((m.get("name") for m in machines or [] if isinstance(m, dict) and m.get("alias") == "pc"),
                      None) if isinstance(machines, list) else None
        if isinstance(pinned, str) and MACHINE_RE.fullmatch(pinned):
            self.spec = self.spec.model_copy(update={"machine": pinned})
            self._save()

    async def _learn_layout(self) -> None:
        """A record from before PCI slots were fixed: take each device's slot from the running QEMU
        (``query-pci``: ``nicN``, ``blk-ID``; the old single disk was an anonymous virtio-blk), so
        a hotplug picks a free slot and a migration destination gets the same layout."""
        spec = self.spec
        if all(n.pci_slot is not None for n in spec.nics) and all(d.pci_slot is not None for d in spec.disks):
            return
        buses = await self.qmp.execute("query-pci")
        devices: list[dict[str, Any]] = []
        for bus in buses if isinstance(buses, list) else []:
            found = bus.get("devices") if isinstance(bus, dict) else None
            devices += [d for d in found if isinstance(d, dict)] if isinstance(found, list) else []
        by_id = {str(d.get("qdev_id") or ""): d.get("slot") for d in devices}
        anonymous_blk = [d.get("slot") for d in devices if not d.get("qdev_id")  # virtio-blk, legacy/modern
                         and isinstance(d.get("id"), dict) and d["id"].get("device") in (0x1001, 0x1042)]
        nics = [n if n.pci_slot is not None or not isinstance(by_id.get(f"nic{i}"), int)
                else n.model_copy(update={"pci_slot": by_id[f"nic{i}"]}) for i, n in enumerate(spec.nics)]
        disks = []
        for d in spec.disks:
            slot = by_id.get(f"blk-{d.id}")
            if d.pci_slot is None and slot is None and len(spec.disks) == 1 and len(anonymous_blk) == 1:
                slot = anonymous_blk[0]
            disks.append(d if d.pci_slot is not None or not isinstance(slot, int)
                         else d.model_copy(update={"pci_slot": slot}))
        self.spec = spec.model_copy(update={"nics": nics, "disks": disks})
        self._save()

    async def _learn_version(self, qmp: qmp_glue.QMPClient) -> None:
        v = await qemu_version(qmp)
        self.qemu_version = ".".join(map(str, v)) if v else None

    def _open_disks(self) -> list[OpenDisk]:
        """Every disk and its backing chain by the rules of supervisor/_disks.py (blocking: a worker thread).
        A migration destination's local disks are the targets created for it, never opened by path."""
        cfg = self.ctx.cfg
        if self.targets is None:
            return open_disks(self.spec.disks, cfg.image_dirs, allow_device=cfg.allow_device_disks)
        return self.targets.take(self.spec.disks, cfg.image_dirs, allow_device=cfg.allow_device_disks)

    def _name_fdsets(self, disks: list[OpenDisk]) -> None:
        """QEMU names a disk's file ``/dev/fdset/N`` in its errors: the path qsup opened instead."""
        n = 0
        for od in disks:
            for f in od.files:
                n += 1
                self._fd_paths[f"/dev/fdset/{n}"] = f.path

    def _host_fds(self, opened: list[_Closeable], boot: dict[str, io.FileIO]) -> HostFds:
        """Bind the monitor and console sockets, for QEMU to inherit with ``boot`` (kernel/initrd)."""
        layout, name = self.ctx.layout, self.name
        socks = [listening_socket(p) for p in (layout.qmp_path(name), layout.operator_qmp_path(name),
                                               layout.console_socket_path(name))]
        opened.extend(socks)
        for key, f in boot.items():  # QEMU names the file as /proc/self/fd/N in its errors
            self._fd_paths[f"/proc/self/fd/{f.fileno()}"] = self.images.get(key) or getattr(self.spec, key)
        return HostFds(*(s.fileno() for s in socks), **{k: f.fileno() for k, f in boot.items()})

    def _qemu_uid(self) -> int | None:
        """The uid QEMU runs as: the instance's own, unless the config or post-copy says otherwise.

        ``None`` keeps the daemon's own uid: an unprivileged qsup (tests),
        ``qemu_user = ""``, or a post-copy destination where the config
        allows root post-copy (QEMU 7.2 needs userfaultfd, see docs/ARCHITECTURE.md).
        """
        cfg = self.ctx.cfg
        if os.geteuid() != 0 or cfg.qemu_user == "" or self._needs_root():
            return None
        return self.ctx.uids.allocate()

    async def _follow_console(self) -> None:
        """Copy the serial console into its capped log for as long as the instance lives.

        Started before ``cont`` so nothing the guest prints at boot is lost;
        it reconnects by itself, so a restarted daemon simply starts another.
        """
        layout = self.ctx.layout
        await self._tasks.start(pump_console, layout.console_socket_path(self.name),
                                layout.console_path(self.name), self.ctx.cfg.console_max_bytes)

    async def _follow_log(self, read_fd: int | None) -> None:
        """Copy QEMU's stdout/stderr from its FIFO into the log, capped like the console, until
        QEMU exits.  ``read_fd``: the FIFO's read end from the spawn; None: open it again (reattach)."""
        self._log_drained = trio.Event()
        await self._tasks.start(self._pump_log, read_fd)

    async def _pump_log(self, read_fd: int | None,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        layout = self.ctx.layout
        try:
            await pump_log(layout.log_fifo_path(self.name), layout.log_path(self.name),
                           self.ctx.cfg.console_max_bytes, read_fd=read_fd, task_status=task_status)
        finally:
            self._log_drained.set()

    async def _log_copied(self) -> None:
        """QEMU exited: give the log pump the moment it needs to copy QEMU's last words (EOF)."""
        with trio.move_on_after(2):
            await self._log_drained.wait()

    def _apply_phase(self, phase: Literal["attach", "activate"], reason: netconf.Reason) -> float:
        """Every NIC's ``phase`` (sync: runs on the netconf thread); returns the ms spent inside."""
        t = time.perf_counter()
        for nic in self.nics:
            self.executor.apply(netconf.plan(nic, phase), reason=reason)
        return (time.perf_counter() - t) * 1000

    def _needs_root(self) -> bool:
        """A post-copy destination with ``allow_root_postcopy`` on a host that keeps userfaultfd
        from unprivileged processes: only there QEMU runs as root (Node._check_postcopy)."""
        return isinstance(self.migration, IncomingMigration) and self.migration.postcopy and \
            self.ctx.cfg.allow_root_postcopy and not unprivileged_userfaultfd()

    async def _connect_qmp(self) -> qmp_glue.QMPClient:
        """Connect QMP, or fail fast with QEMU's own words if it exits first."""
        proc = self._qemu
        client = await connect_qmp_or_exit(proc, str(self.ctx.layout.qmp_path(self.name)), loop=self.ctx.aio,
                                           name=self.name)
        if client is None:
            await self._log_copied()
            said = self._log_tail()
            for fd_path, path in self._fd_paths.items():  # QEMU names the file as it was given it
                said = said.replace(fd_path, path)
            raise StartError(f"qemu exited with status {proc.returncode}: {said}", self._field_named_by(said))
        return client

    def _field_named_by(self, qemu_said: str) -> str | None:
        """The spec field QEMU's error is about: the one whose path it quotes, else its keyword."""
        if JAIL_MARK in qemu_said:  # the jail helper failed before QEMU ran (supervisor/_jail.py)
            return "qemu_chroot"
        for key in ("kernel", "initrd"):
            path = getattr(self.spec, key)
            if path and path in qemu_said:
                return key
        for i, d in enumerate(self.spec.disks):
            if d.path in qemu_said or f"'{device_id(d.id)}'" in qemu_said or f"'{node_name(d.id)}" in qemu_said:
                return f"disks[{i}]"
        low = qemu_said.lower()
        for key, words in (("initrd", ("initrd", "ram disk")), ("kernel", ("kernel",))):
            if getattr(self.spec, key) and any(w in low for w in words):
                return key
        if "machine" in low and "type" in low:
            return "machine"
        return None

    def _log_tail(self, n: int = 3) -> str:
        """QEMU's last ``n`` lines, from the last 8 KiB of its log (read by seeking: bounded)."""
        try:
            lines = read_tail(self.ctx.layout.log_path(self.name), 8192).decode(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in lines[-n:] if line.strip())

    # -- supervision ---------------------------------------------------
    async def _supervise(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._forward_events)
        nursery.start_soon(self._serve_stop)
        nursery.start_soon(self._watch_binary)
        if isinstance(self.migration, IncomingMigration) and not self.migration.activated:
            nursery.start_soon(self._incoming_watchdog, self.migration)
        if self._recovery is not None:  # adopted mid-migration
            nursery.start_soon(self._recovery)
        while True:  # an upgrade swaps the process: follow the new one
            proc = self._qemu
            await proc.wait()
            if self.proc is proc:
                break
        if self.cause is None:
            await self._log_copied()
            self.exit(*self._unannounced_exit())
        nursery.cancel_scope.cancel()

    def _unannounced_exit(self) -> tuple[ExitCause, str]:
        """QEMU exited and nobody said why: an incoming migration that failed, or a crash."""
        rc = self._qemu.returncode
        m = self.migration
        if isinstance(m, IncomingMigration) and not m.activated:
            # QEMU 7.2 exits by itself when an incoming migration fails: a
            # failure of the migration, not a crash.  No L3 was ever applied.
            return ExitCause.INCOMING_ABORTED, \
                f"incoming migration failed (qemu exited with status {rc}, last status {m.status})"
        log.error("qemu crashed", status=rc, log_tail=self._log_tail())
        return ExitCause.QEMU_DIED, f"qemu exited unexpectedly (status {rc}): {self._log_tail()}"

    async def _forward_events(self) -> None:
        """Every QMP event is handled; it goes to the event log, with its data and QEMU's
        timestamp, within the instance's budget (supervisor/_ratelimit.py: a guest chooses how
        many events QEMU reports); what is not logged is counted in ``qmp.dropped``."""
        budget = EventBudget()
        while True:
            qmp = self.qmp
            await self._forward_from(qmp, budget)
            if self._qmp is qmp:  # not an upgrade's old QEMU: QMP is gone for good
                break
        # QMP EOF.  Normally the pidfd fires at the same moment; if QEMU
        # lingers with a dead monitor it cannot be controlled any more.  When
        # an exit is already under way its own path escalates; this is the
        # backstop.
        proc = self._qemu
        with trio.move_on_after(2 if self.cause is None else 15):
            await proc.wait()
        if proc.alive:
            log.error("QMP lost but qemu still alive; killing it")
            self.exit(ExitCause.QEMU_DIED, "the monitor closed while qemu still ran; killed")
            proc.signal(signal.SIGKILL)

    async def _forward_from(self, qmp: qmp_glue.QMPClient, budget: EventBudget) -> None:
        """The events of one QEMU's monitor, until it closes."""
        try:
            async for ev in qmp.events():
                name, data = ev.get("event", "?"), ev.get("data", {})
                ts = qmp_timestamp(ev)
                if name == "MIGRATION" and self.migration is not None:
                    await self._on_migration_event(ev)  # first: activation is on the critical path
                logged, dropped = budget.admit(name)
                self.qmp_dropped = budget.total_dropped
                if dropped:
                    self.emit("qmp.dropped", count=dropped, total=budget.total_dropped)
                if logged:
                    self.emit(f"qmp.{name}", data=data, qmp_ts=ts)
                if name == "STOP":
                    self._on_qemu_stop(ts)
                elif name == "RESUME":
                    self._on_qemu_resume(ts)
                elif name == "GUEST_PANICKED":
                    self._on_guest_panicked(data)
                elif name == "DEVICE_DELETED":
                    self.disk_ops.on_device_deleted(data)
                    self.nic_ops.on_device_deleted(data)
                elif name == "SHUTDOWN" and data.get("guest"):
                    self.exit(ExitCause.GUEST_SHUTDOWN, None)
        finally:
            if budget.pending:
                self.emit("qmp.dropped", count=budget.flush(), total=budget.total_dropped)

    async def _on_migration_event(self, ev: qmp_glue.QMPEvent) -> None:
        m = self.migration
        if isinstance(m, IncomingMigration):
            self._on_incoming_outcome(await m.on_event(ev))
        elif m is not None and not m.done.is_set():
            m.on_event(ev)

    def _on_incoming_outcome(self, outcome: Outcome) -> None:
        if outcome is Outcome.ACTIVATED:
            self._activated()
        elif outcome is Outcome.SOURCE_SILENT and self.cause is None:
            # QEMU here holds a complete guest, but the source may still hold its L3 (or even
            # resume): never activate without its word.  The source rolls back when it sees us gone.
            self.emit("migration.source_silent", after_s=self.ctx.cfg.incoming_timeout)
            self.exit(ExitCause.INCOMING_ABORTED,
                      f"incoming migration aborted: the source never confirmed its L3 release within "
                      f"{self.ctx.cfg.incoming_timeout:g}s")
            self._qemu.signal(signal.SIGKILL)

    def _on_qemu_stop(self, ts: float) -> None:
        m = self.migration
        if isinstance(m, OutgoingMigration) and not m.done.is_set():
            m.on_stop(ts)
            self.runstate = RunState.PAUSED
            return
        if self.runstate not in GUEST_FAULT_EVENTS:  # QEMU stops a panicked guest after saying so
            self.runstate = RunState.PAUSED
        if self.state == State.RUNNING:
            self.sm.move(State.PAUSED, "qmp STOP")
        if self.cause is None:
            self.spawn(self._learn_why_stopped)

    def _on_qemu_resume(self, ts: float) -> None:
        self.runstate = RunState.RUNNING
        if isinstance(self.migration, IncomingMigration):
            self.migration.on_resume(ts)
        if self.state == State.PAUSED:
            self.sm.move(State.RUNNING, "qmp RESUME")

    async def _learn_why_stopped(self) -> None:
        """A STOP nobody asked for may be a fault (internal-error, io-error): QEMU's status says."""
        try:
            status, _ = _run_status(await self.qmp.execute("query-status", timeout=5))
        except (qmp_glue.QMPError, qmp_glue.QMPConnectionLost, trio.TooSlowError):
            return
        if self.runstate is not RunState.RUNNING:
            self.runstate = status
        event = GUEST_FAULT_EVENTS.get(status)
        if event and event != "guest.panicked":  # a panic has its own QMP event
            self.emit(event, qemu_status=status)

    def _on_guest_panicked(self, data: qmp_glue.JSONObject) -> None:
        """pvpanic: QEMU paused the guest (``-action panic=pause``); the policy says what next."""
        self.runstate = RunState.GUEST_PANICKED
        self.panic = {"action": data.get("action"), "info": data.get("info")}
        policy = self.spec.on_panic or self.ctx.cfg.on_panic
        self.emit("guest.panicked", policy=policy, **self.panic)
        if self.state == State.RUNNING:
            self.sm.move(State.PAUSED, "guest panicked")
        if policy == "stop":
            self.exit(ExitCause.GUEST_PANICKED, f"guest panicked: {data.get('info') or ''}".rstrip(": "))
            self.spawn(self._quit)
        elif policy == "restart":
            self.spawn(self._restart_guest)

    async def _restart_guest(self) -> None:
        try:
            await self.qmp.execute("system_reset", timeout=5)
            await self.qmp.execute("cont", timeout=5)
        except (qmp_glue.QMPError, qmp_glue.QMPConnectionLost, trio.TooSlowError) as e:
            self.emit("guest.restart_failed", error=str(e))
            return
        self.panic = None
        self.emit("guest.restarted", reason="panic")

    async def _incoming_watchdog(self, m: IncomingMigration) -> None:
        """Tear down a prepared destination that nobody ever migrates to.

        If the source (or its daemon) goes away between ``prepare`` and
        ``migrate``, QEMU would wait on ``-incoming`` forever, holding taps
        and memory.  No MIGRATION event within ``incoming_timeout``: abort.
        """
        timeout = self.ctx.cfg.incoming_timeout
        await trio.sleep(timeout)
        # ``m``, not ``self.migration``: by now the guest may be on its next migration, outgoing
        if self.migration is m and m.status == "setup" and not m.activated:
            self.emit("migration.incoming_timeout", after_s=timeout)
            self.exit(ExitCause.INCOMING_ABORTED,
                      f"incoming migration aborted: no source connected within {timeout:g}s")
            self._qemu.signal(signal.SIGKILL)

    # -- stop ------------------------------------------------------------
    async def _serve_stop(self) -> None:
        await self._stop_wanted.wait()
        req = self._stop_request
        if req is None:  # stop() sets the request before it sets _stop_wanted
            raise RuntimeError(f"instance {self.name!r}: a stop was wanted with no request")
        proc = self._qemu
        m = self.migration
        if isinstance(m, OutgoingMigration) and not self._migration_settled.is_set() and not req.force:
            # A stop during an outgoing migration: end the migration first, then stop
            # from its definite result (handed over: nothing left to stop here).
            self.emit("instance.stop_deferred", reason="cancelling the outgoing migration first")
            try:
                await m.cancel()
            except (MigrationError, qmp_glue.QMPError, qmp_glue.QMPConnectionLost) as e:
                log.info("cancel before stop", error=str(e))
            await self._migration_settled.wait()
            if self.cause is not None:
                return
        self.exit(ExitCause.REQUESTED_STOP)
        self.sm.move(State.STOPPING, "force" if req.force else "requested")
        if isinstance(m, IncomingMigration) and not m.activated:
            proc.signal(signal.SIGKILL)  # nothing ran here yet: nothing to shut down
        elif req.force:
            proc.signal(signal.SIGTERM)
            with trio.move_on_after(5):
                await proc.wait()
        elif self.runstate in GUEST_STUCK or self.runstate is not RunState.RUNNING:
            self.emit("instance.stop_escalated", step="quit", reason=f"guest is {self.runstate}")
            await self._quit()
        else:
            await self._powerdown(self.ctx.cfg.powerdown_timeout if req.timeout is None else req.timeout)
        proc.signal(signal.SIGKILL)  # no-op if it already exited

    async def _powerdown(self, timeout: float) -> None:
        proc = self._qemu
        with trio.move_on_after(timeout):
            # Repeat the ACPI press once a second: a guest that has not yet
            # started listening for it (early boot) drops the first one.
            while proc.alive:
                self.checkpoint(Checkpoint.POWERDOWN)
                await self._try_qmp("system_powerdown")
                with trio.move_on_after(1):
                    await proc.wait()
        if proc.alive:
            self.emit("instance.stop_escalated", step="quit", reason=f"no powerdown within {timeout:g}s")
            await self._quit()

    async def _quit(self) -> None:
        """``quit``, then SIGKILL if QEMU is still there 5 s later."""
        proc = self._qemu
        self.checkpoint(Checkpoint.QUIT)
        with trio.move_on_after(5):
            await self._try_qmp("quit")
            await proc.wait()
        if proc.alive:
            self.emit("instance.stop_escalated", step="kill", reason="qemu did not quit within 5s")
            proc.signal(signal.SIGKILL)

    async def _try_qmp(self, cmd: str) -> None:
        try:
            with trio.fail_after(5):
                if cmd == "quit":
                    await self.qmp.quit()
                else:
                    await self.qmp.execute(cmd)
        except (qmp_glue.QMPError, qmp_glue.QMPConnectionLost, trio.TooSlowError) as e:
            log.info("qmp command failed during stop", command=cmd, error=str(e))

    # -- migrations ------------------------------------------------------
    async def _migrate_out(self, m: OutgoingMigration) -> None:
        try:
            outcome = await m.run()
            await self._settle(m, outcome)
        finally:
            self._migration_settled.set()

    async def _recover_outgoing(self, m: OutgoingMigration) -> None:
        try:
            await self._settle(m, await m.recover())
        finally:
            self._migration_settled.set()

    async def _recover_incoming(self, m: IncomingMigration) -> None:
        self._on_incoming_outcome(await m.recover(self.runstate))

    def _activated(self) -> None:
        self.runstate = RunState.RUNNING
        if self.state == State.MIGRATING:  # a stop may have begun during the activation
            self.sm.move(State.RUNNING, "migration activated")

    async def _settle(self, m: OutgoingMigration, outcome: Outcome) -> None:
        """Act on how the outgoing migration ``m`` ended."""
        if outcome is Outcome.HANDED_OVER:
            self.checkpoint(Checkpoint.HANDED_OVER)
            self.exit(ExitCause.MIGRATED_OUT)
            await self._quit()
        elif self.cause is not None or not self._qemu.alive:
            return  # an exit is under way (a forced stop, QEMU died): it decides the end
        elif outcome in (Outcome.POSTCOPY_LOST, Outcome.UNCONFIRMED):
            self.runstate = RunState.POSTMIGRATE
            self.sm.move(State.PAUSED, f"{outcome.value}: copy kept paused for an operator")
        else:
            resumed = m.was_running
            self.sm.move(State.RUNNING if resumed else State.PAUSED, "migration failed; guest kept here")

    # -- requests --------------------------------------------------------
    @require("upgrade", UpgradeConflict)
    async def upgrade(self, qemu: str | None = None) -> dict[str, object]:
        """Move the guest into a new QEMU on this node, on the same taps (supervisor/_upgrade.py)."""
        if self.cause is not None:
            raise UpgradeConflict(f"instance is {self.state.value}, not running or paused", "name")
        if self.disk_ops.busy:
            raise UpgradeConflict(f"instance {self.name!r} has a disk change under way", "name")
        if self.nic_ops.busy:
            raise UpgradeConflict(f"instance {self.name!r} has a NIC change under way", "name")
        for i, nic in enumerate(self.spec.nics):
            if nic.queues > 1:
                raise UpgradeError(f"a multiqueue NIC ({nic.queues} queues) cannot be upgraded in place: the "
                                   "new QEMU would detach the queues it shares with the running one "
                                   "(docs/ARCHITECTURE.md, Upgrades in place)", f"nics[{i}].queues")
        binary = check_binary(qemu) if qemu else self.ctx.cfg.qemu
        done = trio.Event()
        out: list[dict[str, object]] = []
        failed: list[BaseException] = []

        async def task() -> None:
            try:
                out.append(await run_upgrade(self, binary))
            except UpgradeError as e:  # run_upgrade turns every failure into this; the guest runs on
                failed.append(e)
            finally:
                done.set()

        self.spawn(task)  # the instance's task: its end cancels the upgrade (which cleans up)
        await done.wait()
        if failed:
            raise failed[0]
        if not out:
            raise UpgradeError(f"instance {self.name!r} ended during the upgrade", "name")
        return out[0]

    def qemu_identity(self) -> dict[str, object] | None:
        """The binary the running QEMU executes, and whether it is the installed one (the node's
        ``qemu`` as it is on disk now: a package update replaces the file)."""
        proc = self.proc
        if proc is None or not proc.alive:
            return None
        try:
            exe = os.readlink(f"/proc/{proc.pid}/exe")
        except OSError:
            return None
        return {"binary": exe.removesuffix(" (deleted)"), "version": self.qemu_version,
                "outdated": running_binary_outdated(proc.pid, self.ctx.cfg.qemu)}

    async def _watch_binary(self) -> None:
        """``instance.outdated`` once, when the binary this QEMU runs stops being the installed one
        (a package update replaced it): the operator's cue for ``qsup upgrade``.  Again after an
        upgrade into a QEMU that is outdated in its turn."""
        said: int | None = None
        while True:
            proc = self.proc
            if proc is not None and said != proc.pid:
                q = self.qemu_identity()
                if q is not None and q["outdated"]:
                    said = proc.pid
                    self.emit("instance.outdated", pid=proc.pid, running=q["binary"], installed=self.ctx.cfg.qemu,
                              version=q.get("version"))
            await trio.sleep(OUTDATED_POLL)

    def _swap_qemu(self, proc: QemuProcess, qmp: qmp_glue.QMPClient, version: str | None) -> None:
        """The upgrade handed the guest over: ``proc`` is the instance's QEMU from now on."""
        self.proc, self._qmp, self._upgrade_pid, self.qemu_version = proc, qmp, None, version
        self.nic_ops.launched()  # the new QEMU was built from the spec: ids by position
        self._save()

    @require("migrate", MigrationError)
    async def migrate(self, opts: MigrateOptions) -> OutgoingMigration:
        """Start an outgoing migration; returns at once (follow it with the view/events)."""
        if self.cause is not None:
            raise MigrationError(f"instance is {self.state.value}, not running or paused", "name")
        if self.disk_ops.busy:
            raise MigrationError(f"instance {self.name!r} has a disk change under way; migrate once it is done",
                                 "name")
        if self.nic_ops.busy:
            raise MigrationError(f"instance {self.name!r} has a NIC change under way; migrate once it is done",
                                 "name")
        m = OutgoingMigration(self, opts, was_running=self.state == State.RUNNING)
        self.migration = m
        self._migration_settled = trio.Event()
        self.sm.move(State.MIGRATING, f"to {opts.to}")
        self.spawn(self._migrate_out, m)
        return m

    @require("cancel_migration", MigrationError)
    async def cancel_migration(self) -> None:
        m = self.migration
        if not isinstance(m, OutgoingMigration) or m.done.is_set():
            raise MigrationError(f"instance {self.name!r} has no outgoing migration in progress", "name")
        await m.cancel()

    @require("recover_postcopy", MigrationError)
    async def recover_postcopy(self) -> int:
        """Destination: listen again for a broken post-copy stream; the new port."""
        m = self.migration
        if not isinstance(m, IncomingMigration) or self.cause is not None:
            raise MigrationError("not an incoming migration", "name")
        return await m.recover_postcopy(self.ctx.cfg.migration_address)

    @require("confirm_release", MigrationError)
    def confirm_release(self) -> None:
        """The source confirms its L3 release: this destination may activate at ``completed``."""
        m = self.migration
        if not isinstance(m, IncomingMigration) or self.cause is not None:
            raise MigrationError("not an incoming migration that is still pending", "name")
        m.confirm_release()

    @require("abort_incoming", MigrationError)
    async def abort_incoming(self) -> None:
        """The source gave up: tear the destination down (no L3 was applied)."""
        m = self.migration
        if not isinstance(m, IncomingMigration) or m.activated or self.cause is not None:
            raise MigrationError("not an incoming migration that is still pending", "name")
        self.exit(ExitCause.INCOMING_ABORTED, "incoming migration aborted by the source")
        self._qemu.signal(signal.SIGKILL)
        await self.done.wait()

    async def stop(self, *, force: bool = False, timeout: float | None = None) -> None:
        """Ask the instance to stop and wait until it has (final state)."""
        if self.state.is_final:
            return
        if self._stop_request is None or force:
            escalate = self._stop_request is not None and self.state == State.STOPPING
            self._stop_request = _StopRequest(force=force, timeout=timeout)
            if force and escalate and self.proc:
                self.proc.signal(signal.SIGKILL)
            self._stop_wanted.set()
        await self.done.wait()


if TYPE_CHECKING:
    def _as_port(instance: Instance) -> InstancePort:
        """Never called: mypy checks here that an Instance is the port its migrations use."""
        return instance
