"""One supervised instance: start, supervise, stop, crash -- in its own nursery.

An :class:`Instance` is driven by a single trio task (:meth:`Instance.run`)
that the node starts with ``nursery.start``.  The start sequence runs
*before* ``task_status.started()``, so a failed start raises straight back
to whoever asked for it, after rolling back everything it did.  Once
started, the task supervises: it forwards QMP events, answers stop
requests, and notices QEMU's exit the moment its pidfd becomes readable.

Start, in order (each step timed; the timings go into the ``instance.started``
event and the start-latency benchmark):

1. open each NIC's tap (the supervisor owns the fds);
2. spawn QEMU with ``-S`` and the tap fds, then close our copies;
3. connect QMP on the unix socket (racing QEMU's exit: a bad command line
   fails fast with QEMU's own message);
4. netconf ``attach`` then ``activate`` for every NIC, journaled;
5. ``cont``.

Any failure: SIGKILL QEMU (its taps vanish with it), undo the journal, drop
the records -- nothing half-applied -- and raise.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import structlog
import trio

import netconf
import qmp_glue

from ._config import Config
from ._instance_migration import MigrationMixin
from ._migration import IncomingMigration, OutgoingMigration, free_port, tcp_uri
from ._process import QemuProcess
from ._qemu import NicFds, build_argv
from ._records import Layout, ensure_dir, write_json
from ._spec import InstanceSpec, SpecError
from ._state import State, StateMachine

log = structlog.get_logger("qsup.instance")

#: ``query-migrate`` statuses of a migration that has not ended yet (before post-copy)


@dataclass
class NodeContext:
    """What every instance of a node shares."""

    cfg: Config
    layout: Layout
    events: Any  # supervisor._eventlog.EventLog
    aio: qmp_glue.AsyncioThread
    worker: netconf.NetconfWorker
    hooks: Any = None  # netconf.Hooks | None


class StartError(RuntimeError):
    """Starting failed; everything was rolled back.  ``field`` names the culprit when known."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


def build_nics(spec: InstanceSpec) -> list[netconf.Nic]:
    """The netconf view of the spec's NICs (taps named from instance + MAC)."""
    out = []
    for n in spec.resolved_nics():
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
    """Host facts a spec can't check itself: the bridge, OVS bridge or table must exist."""
    for i, nic in enumerate(nics):
        try:
            netconf.check_link(nic)
        except netconf.NetconfError as e:
            msg = str(e)
            if msg.startswith("link: "):
                msg = msg[len("link: "):]
            raise SpecError(f"nics[{i}].link", msg) from None


def _ms(a: float, b: float) -> float:
    return round((b - a) * 1000, 3)


@dataclass
class _StopRequest:
    force: bool = False
    timeout: float | None = None


class Instance(MigrationMixin):
    """A QEMU process, its taps and its host network, from start to final state."""

    def __init__(self, spec: InstanceSpec, ctx: NodeContext):
        self.spec = spec
        self.name = spec.name
        self.ctx = ctx
        self.nics = build_nics(spec)
        self.sm = StateMachine(State.STARTING, self._on_state)
        self.proc: QemuProcess | None = None
        self.qmp: qmp_glue.QMPClient | None = None
        self.executor = netconf.Executor(
            netconf.Journal(ctx.layout.journal_path(self.name)), hooks=ctx.hooks
        )
        self.timings: dict[str, float] = {}
        self.error: str | None = None
        self.created = time.time()
        self._stop_request: _StopRequest | None = None
        self._stop_wanted = trio.Event()
        self._stopping = False
        self._guest_shutdown = False
        self._migrated = False
        self.migration: IncomingMigration | OutgoingMigration | None = None
        self._nursery: trio.Nursery | None = None
        self.done = trio.Event()

    # -- views ---------------------------------------------------------
    @property
    def state(self) -> State:
        return self.sm.state

    def view(self) -> dict:
        """What ``show``/``ls`` print; ``state`` is one of the DESIGN.md states."""
        return {
            "name": self.name,
            "state": self.state.value,
            "pid": self.proc.pid if self.proc and self.proc.alive else None,
            "memory": self.spec.memory,
            "vcpus": self.spec.vcpus,
            "tags": list(self.spec.tags),
            "nics": [
                {"mac": n.mac, "mode": n.mode, "tap": n.tap, "link": n.link, "ip": n.ip,
                 "ip6": n.ip6, "vlan": n.vlan, "trunks": list(n.trunks), "queues": n.queues}
                for n in self.nics
            ],
            "qmp_operator": str(self.ctx.layout.operator_qmp_path(self.name)),
            "console": str(self.ctx.layout.console_path(self.name)),
            "created": self.created,
            "timings_ms": self.timings,
            "error": self.error,
            "migration": self.migration.view() if self.migration else None,
        }

    def record(self) -> dict:
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
            "migration": {"direction": self.migration.direction,
                          "postcopy": getattr(self.migration, "postcopy", False)
                          or getattr(getattr(self.migration, "opts", None), "postcopy", False)}
            if self.migration and not getattr(self.migration, "activated", False) else None,
        }

    def _save(self) -> None:
        write_json(self.ctx.layout.record_path(self.name), self.record())

    def _emit(self, type: str, **data) -> dict:
        return self.ctx.events.emit(type, instance=self.name, **data)

    def _on_state(self, old: State, new: State, reason: str) -> None:
        log.info("state", old=old.value, new=new.value, reason=reason)
        self._emit(f"instance.{new.value}", previous=old.value, reason=reason)
        # The record matters to a restarted daemon only for starting/migrating
        # (running vs paused comes from query-status), so pause/resume don't
        # pay two fsyncs on the trio thread.
        if {old, new} <= {State.RUNNING, State.PAUSED}:
            return
        if not new.is_final and self.ctx.layout.instance_dir(self.name).exists():
            self._save()

    # -- the task ------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with structlog.contextvars.bound_contextvars(instance=self.name):
            try:
                await self._start()
            except BaseException as exc:
                with trio.CancelScope(shield=True):
                    await self._rollback(exc)
                raise
            task_status.started(self)
            try:
                await self._supervise()
            finally:
                self._finished()

    async def run_reattached(self, proc: QemuProcess, migration: dict | None = None, *,
                             task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Take over a QEMU that a previous daemon started; never stops or pauses it.

        Reconnects the supervisor's monitor (a unix socket path, so it
        survives us), asks ``query-status`` and rebuilds the state from it.
        """
        with structlog.contextvars.bound_contextvars(instance=self.name):
            self.proc = proc
            try:
                self.qmp = await qmp_glue.connect(
                    str(self.ctx.layout.qmp_path(self.name)), loop=self.ctx.aio, timeout=10, name=self.name)
                status = await self.qmp.execute("query-status")
            except BaseException:
                if self.qmp is not None:
                    await self.qmp.aclose()
                raise
            st = status.get("status", "")
            if migration and migration["direction"] == "in":
                # before supervision starts, so no MIGRATION event is missed
                self.migration = IncomingMigration(self, migration.get("postcopy", False))
            if migration:
                self.sm.move(State.MIGRATING, f"reattached mid-migration (qemu status {st})")
            else:
                new = State.RUNNING if status.get("running") else State.PAUSED
                self.sm.move(new, f"reattached (qemu status {st})")
            self._emit("instance.reattached", pid=proc.pid, qemu_status=st, migration=migration)
            task_status.started(self)
            try:
                async with trio.open_nursery() as n:
                    n.start_soon(self._supervise)
                    if migration:
                        await self._recover_migration(migration, st)
            finally:
                self._finished()

    async def clean_up_dead(self, reason: str, final: State = State.CRASHED) -> None:
        """QEMU is gone (or must go): undo whatever the journal owns, drop the records.

        Used after a daemon restart for an instance whose QEMU died while
        no daemon watched it, or whose start was interrupted half-way.
        """
        with structlog.contextvars.bound_contextvars(instance=self.name):
            if self.proc is not None and self.proc.alive:
                self.proc.signal(signal.SIGKILL)
                await self.proc.wait()
            try:
                await self.ctx.worker.run(self.executor.recover, reason="crash")
                errors = []
            except netconf.NetconfError as e:
                errors = e.failures or [{"error": str(e)}]
                self._emit("netconf.undo_failed", reason="crash", error=str(e), failures=errors)
            else:
                self._emit("netconf.undone", reason="crash", recovered=True)
            if not errors:
                self.ctx.layout.remove_instance(self.name)
            self.error = reason
            self.sm.move(final, reason)
            self._finished()

    async def run_incoming(self, postcopy: bool, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Destination of a live migration: L2 now, L3 only at ``completed``."""
        with structlog.contextvars.bound_contextvars(instance=self.name):
            self.migration = IncomingMigration(self, postcopy)
            try:
                await self._start_incoming(postcopy)
            except BaseException as exc:
                with trio.CancelScope(shield=True):
                    await self._rollback(exc)
                raise
            task_status.started(self.migration.uri)
            try:
                async with trio.open_nursery() as n:
                    n.start_soon(self._incoming_watchdog)
                    await self._supervise()
                    n.cancel_scope.cancel()
            finally:
                self._finished()

    async def _incoming_watchdog(self) -> None:
        """Tear down a prepared destination that nobody ever migrates to.

        If the source (or its daemon) goes away between ``prepare`` and
        ``migrate``, QEMU would wait on ``-incoming`` forever, holding taps
        and memory.  No MIGRATION event within the config's
        ``incoming_timeout`` seconds: abort, as the source's abort call would.
        """
        timeout = self.ctx.cfg.incoming_timeout
        await trio.sleep(timeout)
        m = self.migration
        if m.status == "setup" and not m.activated and self.proc.alive:
            self._emit("migration.incoming_timeout", after_s=timeout)
            m.aborted = True
            self.proc.signal(signal.SIGKILL)

    async def _start_incoming(self, postcopy: bool) -> None:
        ctx = self.ctx
        t0 = time.perf_counter()
        self._emit("instance.starting", spec=self.spec.model_dump(mode="json"), incoming=True)
        await self._launch(incoming=True, reason="migrate-in")
        for nic in self.nics:  # journal L3 now: at ``completed`` only netlink work remains
            await ctx.worker.run(self.executor.stage, netconf.plan(nic, "activate"))
        caps = [{"capability": "events", "state": True},
                {"capability": "postcopy-ram", "state": postcopy}]
        await self.qmp.execute("migrate-set-capabilities", {"capabilities": caps})
        addr = ctx.cfg.migration_address
        uri = tcp_uri(addr, free_port(addr))
        await self.qmp.execute("migrate-incoming", {"uri": uri})
        self.migration.uri = uri
        self.sm.move(State.MIGRATING, "incoming")
        self.timings = {"prepare": _ms(t0, time.perf_counter())}
        self._emit("migration.prepared", uri=uri, postcopy=postcopy, timings_ms=self.timings, pid=self.proc.pid)

    async def _start(self) -> None:
        t0 = time.perf_counter()
        self._emit("instance.starting", spec=self.spec.model_dump(mode="json"))
        t_spawn, t_qmp = await self._launch(incoming=False, reason="start")
        await self.ctx.worker.run(self._apply_phase, "activate", "start")
        t_net = time.perf_counter()
        self._emit("netconf.applied", phases=["attach", "activate"], ms=_ms(t_qmp, t_net))

        await self.qmp.execute("cont")
        t_run = time.perf_counter()
        self.timings = {
            "spawn": _ms(t0, t_spawn), "qmp_ready": _ms(t_spawn, t_qmp),
            "netconf": _ms(t_qmp, t_net), "cont": _ms(t_net, t_run), "total": _ms(t0, t_run),
        }
        self.sm.move(State.RUNNING, "started")
        self._emit("instance.started", timings_ms=self.timings, pid=self.proc.pid)

    async def _launch(self, *, incoming: bool, reason: str) -> tuple[float, float]:
        """Taps, QEMU (-S), QMP, then L2 ``attach``.  Returns (t_spawned, t_qmp_ready)."""
        ctx, name = self.ctx, self.name
        check_host(self.nics)
        ensure_dir(ctx.layout.instance_dir(name))
        ensure_dir(ctx.layout.instance_run_dir(name))
        self._save()
        taps = []
        try:
            for nic in self.nics:
                taps.append(netconf.open_tap(nic.tap, nic.queues, mac=netconf.fe_mac(nic.mac)))
            argv = build_argv(
                self.spec, ctx.cfg, ctx.layout,
                [NicFds(n.mac, tuple(t.fds), t.vnet_hdr) for n, t in zip(self.nics, taps)],
                incoming=incoming,
                # post-copy needs userfaultfd, which an unprivileged QEMU may not get
                run_as=(ctx.cfg.qemu_user or None) if not self._needs_root() else None,
            )
            log_fd = os.open(ctx.layout.log_path(name), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
            try:
                self.proc = QemuProcess.spawn(argv, pass_fds=[fd for t in taps for fd in t.fds], log_fd=log_fd)
            finally:
                os.close(log_fd)
        finally:
            for t in taps:  # QEMU holds its own copies now
                t.close()
        t_spawn = time.perf_counter()
        self._save()
        log.info("spawned", pid=self.proc.pid)

        self.qmp = await self._connect_qmp()
        t_qmp = time.perf_counter()
        await ctx.worker.run(self._apply_phase, "attach", reason)
        return t_spawn, t_qmp

    def _apply_phase(self, phase: str, reason: str) -> float:
        """Every NIC's ``phase`` (sync: runs on the netconf thread); returns the ms spent inside."""
        t = time.perf_counter()
        for nic in self.nics:
            self.executor.apply(netconf.plan(nic, phase), reason=reason)
        return (time.perf_counter() - t) * 1000

    def _needs_root(self) -> bool:
        return isinstance(self.migration, IncomingMigration) and self.migration.postcopy

    async def _connect_qmp(self) -> qmp_glue.QMPClient:
        """Connect QMP, or fail fast with QEMU's own words if it exits first."""
        result: list = []

        async def connect(cancel):
            result.append(await qmp_glue.connect(
                str(self.ctx.layout.qmp_path(self.name)), loop=self.ctx.aio, timeout=30, name=self.name))
            cancel.cancel()

        async with trio.open_nursery() as n:
            n.start_soon(connect, n.cancel_scope)
            await self.proc.wait()
            n.cancel_scope.cancel()
        if not result:
            raise StartError(f"qemu exited with status {self.proc.returncode}: {self._log_tail()}")
        return result[0]

    def _log_tail(self, n: int = 3) -> str:
        try:
            lines = self.ctx.layout.log_path(self.name).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-n:])

    async def _rollback(self, exc: BaseException) -> None:
        """Undo a failed start completely; the instance ends ``failed``."""
        self.error = f"{type(exc).__name__}: {exc}"
        failures = getattr(exc, "failures", None) or []
        outputs = [f["output"].strip() for f in failures if f.get("output", "").strip()]
        if outputs:  # a hook's own words belong in the error, not just in a log
            self.error += " -- output: " + " | ".join(o.replace("\n", " / ")[-500:] for o in outputs)
        log.warning("start failed, rolling back", error=self.error)
        if failures:
            self._emit("netconf.failed", error=str(exc), failures=failures)
        await self._kill_qemu()
        if not await self._undo_netconf("rollback"):
            self.ctx.layout.remove_instance(self.name)
        if self.sm.can(State.FAILED):
            self.sm.move(State.FAILED, self.error)
        self._finished()

    async def _kill_qemu(self) -> None:
        if self.qmp is not None:
            await self.qmp.aclose()
        if self.proc is not None and self.proc.alive:
            self.proc.signal(signal.SIGKILL)
            await self.proc.wait()

    async def _undo_netconf(self, reason: str) -> list[dict]:
        t = time.perf_counter()
        try:
            await self.ctx.worker.run(self.executor.undo, reason=reason)
        except netconf.NetconfError as e:
            log.error("netconf undo failed", error=str(e), failures=e.failures)
            self._emit("netconf.undo_failed", reason=reason, error=str(e), failures=e.failures)
            return e.failures or [{"error": str(e)}]
        self._emit("netconf.undone", reason=reason, ms=_ms(t, time.perf_counter()))
        return []

    # -- supervision ---------------------------------------------------
    def _finished(self) -> None:
        self.executor.journal.close()
        self.done.set()

    def spawn(self, fn, *args) -> None:
        """Run ``fn(*args)`` as a task of this instance (ends with it)."""
        self._nursery.start_soon(fn, *args)

    async def _supervise(self) -> None:
        async with trio.open_nursery() as n:
            self._nursery = n
            n.start_soon(self._forward_events)
            n.start_soon(self._serve_stop)
            await self.proc.wait()
            n.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            await self._after_exit()

    async def _forward_events(self) -> None:
        """Every QMP event goes to the event log, with its data and QEMU's timestamp."""
        async for ev in self.qmp.events():
            name, data = ev.get("event", "?"), ev.get("data", {})
            ts = ev.get("timestamp", {})
            ev_ts = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
            if name == "MIGRATION" and self.migration is not None:
                await self.migration.handle(ev)  # first: activation is on the critical path
            self._emit(f"qmp.{name}", data=data, qmp_ts=ev_ts)
            if name == "RESUME" and isinstance(self.migration, IncomingMigration):
                self.migration.resumed(ev_ts)
            if name == "STOP" and isinstance(self.migration, OutgoingMigration):
                self.migration.stop_ts = self.migration.stop_ts or ev_ts
            if name == "STOP" and self.state == State.RUNNING and not self._stopping:
                self.sm.move(State.PAUSED, "qmp STOP")
            elif name == "RESUME" and self.state == State.PAUSED:
                self.sm.move(State.RUNNING, "qmp RESUME")
            elif name == "SHUTDOWN" and data.get("guest") and not self._stopping:
                self._guest_shutdown = True
        # QMP EOF.  Normally the pidfd fires at the same moment; if QEMU
        # lingers with a dead monitor it cannot be controlled any more.
        if not self._stopping:
            with trio.move_on_after(2):
                await self.proc.wait()
            if self.proc.alive:
                log.error("QMP lost but qemu still alive; killing it")
                self.proc.signal(signal.SIGKILL)

    async def _serve_stop(self) -> None:
        await self._stop_wanted.wait()
        req = self._stop_request
        self._stopping = True
        self.sm.move(State.STOPPING, "force" if req.force else "requested")
        if req.force:
            self.proc.signal(signal.SIGTERM)
            with trio.move_on_after(5):
                await self.proc.wait()
        else:
            timeout = self.ctx.cfg.powerdown_timeout if req.timeout is None else req.timeout
            with trio.move_on_after(timeout):
                # Repeat the ACPI press once a second: a guest that has not yet
                # started listening for it (early boot) drops the first one.
                while True:
                    await self._try_qmp("system_powerdown")
                    with trio.move_on_after(1):
                        await self.proc.wait()
                    if not self.proc.alive:
                        break
            if self.proc.alive:
                await self._try_qmp("quit")
                with trio.move_on_after(5):
                    await self.proc.wait()
        self.proc.signal(signal.SIGKILL)  # no-op if it already exited

    async def _try_qmp(self, cmd: str) -> None:
        try:
            with trio.fail_after(5):
                if cmd == "quit":
                    await self.qmp.quit()
                else:
                    await self.qmp.execute(cmd)
        except (qmp_glue.QMPError, qmp_glue.QMPConnectionLost, trio.TooSlowError) as e:
            log.info("qmp command failed during stop", command=cmd, error=str(e))

    async def _after_exit(self) -> None:
        await self.qmp.aclose()
        rc = self.proc.returncode
        incoming_failed = isinstance(self.migration, IncomingMigration) and not self.migration.activated
        if self._migrated:
            reason = "migrate-out"
        elif incoming_failed:
            # QEMU 7.2 exits by itself when an incoming migration fails: a
            # failure of the migration, not a crash.  No L3 was ever applied.
            reason = "rollback"
            self.error = "incoming migration aborted" if self.migration.aborted else \
                f"incoming migration failed (qemu exited with status {rc}, last status {self.migration.status})"
        elif self._stopping or self._guest_shutdown:
            reason = "stop"
        else:
            reason = "crash"
            self.error = f"qemu exited unexpectedly (status {rc})"
            log.error("qemu crashed", status=rc, log_tail=self._log_tail())
        errors = await self._undo_netconf(reason)
        if not errors:
            self.ctx.layout.remove_instance(self.name)
        if reason == "crash":
            self.sm.move(State.CRASHED, self.error)
        elif reason == "rollback":
            self.sm.move(State.FAILED, self.error)
        elif reason == "migrate-out":
            self.sm.move(State.STOPPED, "migrated")
        else:
            self.sm.move(State.STOPPED, "guest shutdown" if self._guest_shutdown and not self._stopping else "stopped")

    # -- requests ------------------------------------------------------
    async def stop(self, *, force: bool = False, timeout: float | None = None) -> None:
        """Ask the instance to stop and wait until it has (final state)."""
        if self.state.is_final:
            return
        if self._stop_request is None or force:
            self._stop_request = _StopRequest(force=force, timeout=timeout)
            if force and self._stopping and self.proc:
                self.proc.signal(signal.SIGKILL)
            self._stop_wanted.set()
        await self.done.wait()
