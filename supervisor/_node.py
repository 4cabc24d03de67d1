"""A node: the instances of one host, the resources they share, one nursery.

The node owns, for its whole life:

* the asyncio thread that qemu.qmp runs on (``qmp_glue.AsyncioThread``);
* the netconf worker thread that owns the netlink socket;
* the event log;
* a nursery in which each instance's task runs (each instance then opens
  its own nursery inside).

Both ``qsup run`` (foreground) and ``qsup serve`` (the daemon) are a node;
they differ only in where requests come from.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Sequence
from contextlib import asynccontextmanager

import structlog
import trio

import netconf
import qmp_glue

from ._config import Config
from ._disks import check_disks
from ._errors import FieldError
from ._faults import NO_FAULTS
from ._instance import Instance, NodeContext, StartError, check_host
from ._limits import check_images, check_unique_addresses
from ._process import QemuProcess, cmdline
from ._records import Layout, read_json
from ._spec import InstanceSpec, SpecError, parse_spec
from ._storage import DiskOffer, check_offer, parse_offers, prepare_disks
from ._tls import qemu_creds_root
from ._uids import UidAllocator, unprivileged_userfaultfd

log = structlog.get_logger("qsup.node")


def open_event_log(cfg: Config):
    """Prepare the node's directories and open its durable event log."""
    from ._eventlog import EventLog

    Layout(cfg.state_dir, cfg.run_dir).prepare()
    return EventLog(cfg.state_dir / "events.db", retention=cfg.event_retention)


class Conflict(FieldError, RuntimeError):
    """The request clashes with the node's state (a duplicate name, say)."""

    def __init__(self, message: str, field: str = "name"):
        super().__init__(message, field)


class NotFound(FieldError, KeyError):
    """No instance by that name (the field is ``name``)."""

    field_in_text = False

    def __init__(self, message: str, field: str = "name"):
        super().__init__(message, field)


class Node:
    def __init__(self, cfg: Config, events, *, faults=NO_FAULTS):
        self.cfg = cfg
        self.faults = faults  # supervisor._faults.Faults in fault-injection tests
        self.layout = Layout(cfg.state_dir, cfg.run_dir)
        self.events = events
        self.instances: dict[str, Instance] = {}
        self._nursery: trio.Nursery | None = None
        self.ctx: NodeContext | None = None

    def _running(self) -> tuple[NodeContext, trio.Nursery]:
        """The context and nursery :meth:`running` opened."""
        if self.ctx is None or self._nursery is None:
            raise RuntimeError("the node is not running (async with node.running())")
        return self.ctx, self._nursery

    @asynccontextmanager
    async def running(self):
        """Open the node's threads and nursery; on exit, instances are left as they are
        unless :meth:`stop_all` was called (the daemon's ``on_shutdown``)."""
        self.layout.prepare()
        # Three threads hand work to each other on the critical paths (trio, the
        # qemu.qmp asyncio thread, the netconf worker).  With CPython's default
        # 5 ms GIL switch interval a woken thread can wait that long for the
        # GIL; 0.5 ms keeps a migration's activation in the low milliseconds.
        sys.setswitchinterval(0.0005)
        hooks = netconf.Hooks(self.cfg.hooks_dir, timeout=self.cfg.hook_timeout) if self.cfg.hooks_dir else None
        for typo in hooks.unknown_steps() if hooks else []:  # a hook that would silently never run
            log.warning("hook directory names no step", directory=typo)
            self.events.emit("hooks.unknown_step", directory=typo)
        with qmp_glue.AsyncioThread() as aio, netconf.NetconfWorker() as worker:
            self.ctx = NodeContext(self.cfg, self.layout, self.events, aio, worker, hooks, self.faults,
                                   UidAllocator(self.cfg.qemu_uids))
            if self.cfg.announce_interfaces:
                # open the packet socket now: the first announce is on a migration's critical path
                await worker.run(netconf.announce, [])
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    yield self
                finally:
                    nursery.cancel_scope.cancel()

    async def reattach(self) -> list[str]:
        """Find every recorded instance again after a (re)start of the daemon.

        For each record: if its QEMU is alive (same pid, same start time,
        our ``-name``), reconnect and supervise it without touching the
        guest; if it died while no daemon watched, or its start was cut
        short, its instance task tears it down (journal undone, record
        dropped) with an event.  Returns the names that were reattached.
        """
        ctx, nursery = self._running()
        names = []
        for name in self.layout.recorded_instances():
            try:
                rec = read_json(self.layout.record_path(name))
                if not isinstance(rec, dict):
                    raise TypeError(f"the record is a JSON {type(rec).__name__}, not an object")
                spec = parse_spec(rec["spec"])
            except (OSError, ValueError, KeyError, TypeError, SpecError) as e:
                log.error("unreadable record, skipped", instance=name, error=str(e))
                self.events.emit("instance.record_unreadable", instance=name, error=str(e))
                continue
            inst = Instance(spec, ctx)
            inst.generation = rec.get("generation") or inst.generation
            if isinstance(rec.get("uid"), int) and rec["uid"] in ctx.uids:
                inst.uid = rec["uid"]
                ctx.uids.hold(inst.uid)
            recorded = {k.lower(): netconf.Nic.from_dict(v) for k, v in rec.get("nics", {}).items()}
            inst.nics = [recorded.get(n.nic_id, n) for n in inst.nics]
            proc = None
            if rec.get("pid"):
                proc = QemuProcess.attach(rec["pid"], rec.get("pid_start_time"))
                if proc is not None and f"guest={name},debug-threads=on" not in cmdline(proc.pid):
                    proc = None  # pid reused by something else
            self.instances[name] = inst
            try:
                await nursery.start(inst.run, inst.launch_adopt, proc, rec)
            except StartError as e:  # the instance ended failed (QEMU killed, journal undone)
                log.error("reattach failed", instance=name, error=str(e))
                self.events.emit("instance.reattach_failed", instance=name, error=str(e))
                continue
            if inst.cause is None:
                names.append(name)
        return names

    def get(self, name: str) -> Instance:
        inst = self.instances.get(name)
        if inst is None:
            raise NotFound(f"no instance named {name!r}")
        return inst

    def list(self) -> list[Instance]:
        return [self.instances[k] for k in sorted(self.instances)]

    def check_free(self, name: str) -> None:
        """Raise :class:`Conflict` unless ``name`` can be started on this node.

        A name whose run dir would be one of qsup's own entries of ``run_dir`` (the QEMU TLS
        creds root ``tls``, the API socket) is refused: the instance would chmod the one and
        its teardown delete it (SpecError naming ``name``)."""
        own = {os.path.abspath(qemu_creds_root(self.cfg.run_dir)), os.path.abspath(self.cfg.socket)}
        if os.path.abspath(self.layout.instance_run_dir(name)) in own:
            raise SpecError(f"{name!r} is reserved on this node: {self.cfg.run_dir}/{name} is qsup's own", "name")
        old = self.instances.get(name)
        if old is not None and not old.state.is_final:
            raise Conflict(f"instance {name!r} already exists ({old.state.value})")
        if self.layout.record_path(name).exists():
            raise Conflict(f"instance {name!r} has a record on this node")

    async def _claim(self, spec: InstanceSpec, offers: "Sequence[DiskOffer] | None" = None) -> Instance:
        """Reserve the name, then check what the spec can't check itself.

        The name is taken first so that two concurrent requests can't both
        pass the checks; a check that fails gives it back.  Nothing is
        written and no event is emitted until the checks passed.
        """
        name = spec.name
        self.check_free(name)
        # before the first await, so the check and the reservation are one step
        others = [i.spec for i in self.instances.values() if not i.state.is_final]
        check_unique_addresses(spec, others)
        ctx, _ = self._running()
        inst = Instance(spec.with_layout(), ctx)  # every device's PCI slot fixed from here on
        self.instances[name] = inst
        try:
            # sysfs, rt_tables, ovs-vsctl (up to 10 s) and the image files: never on the trio thread
            inst.images = await trio.to_thread.run_sync(self._host_and_image_checks, spec, inst.nics, others,
                                                        offers, inst)
        except BaseException:
            targets = getattr(inst, "targets", None)
            if targets is not None:  # created, then a cancel: nothing will launch on them
                targets.discard()
            self._drop(inst)
            raise
        return inst

    def _check_postcopy(self) -> None:
        """Post-copy only where QEMU can run it: unprivileged with the host's consent, or root by config.

        QEMU 7.2 calls userfaultfd(2) without UFFD_USER_MODE_ONLY: as its own
        uid it needs vm.unprivileged_userfaultfd = 1, a host-wide choice qsup
        does not make.  Otherwise only ``allow_root_postcopy`` lets it run, as root --
        for the guest's whole life, its disks opened read-write by root -- and only on a node
        whose ``image_dirs`` confine every image (checked in the claim, as for any start).
        """
        if os.geteuid() != 0 or self.cfg.qemu_user == "" or unprivileged_userfaultfd():
            return
        if not self.cfg.allow_root_postcopy:
            raise SpecError("this node's QEMU runs unprivileged and vm.unprivileged_userfaultfd "
                            "is 0: set it to 1, or allow_root_postcopy = true in the config", "postcopy")
        if self.cfg.image_dirs is None or any(os.path.abspath(d) == "/" for d in self.cfg.image_dirs):
            raise SpecError("allow_root_postcopy would run this destination's QEMU as root with "
                            "its disk opened read-write: that needs image_dirs confining the "
                            "images in the config, not '/' (or vm.unprivileged_userfaultfd = 1, "
                            "which needs no root)", "postcopy")

    def _host_and_image_checks(self, spec: InstanceSpec, nics, others=(), offers: "Sequence[DiskOffer] | None" = None,
                               inst: Instance | None = None) -> dict[str, str]:
        check_host(nics)
        # again, with table names resolved through rt_tables (a file read: not on the trio
        # thread); ``others`` was taken with the reservation, so of two racing claims the
        # later one always sees the earlier
        check_unique_addresses(spec, others, netconf.resolve_table)
        if offers is None:
            check_disks(spec.disks, self.cfg.image_dirs, allow_device=self.cfg.allow_device_disks)
        else:  # a migration destination: shared disks reopened and checked, local ones created
            images = check_images(spec, self.cfg.image_dirs)
            assert inst is not None
            inst.targets = prepare_disks(spec, offers, self.cfg)
            return images
        return check_images(spec, self.cfg.image_dirs)

    def _drop(self, inst: Instance) -> None:
        if self.instances.get(inst.name) is inst:
            del self.instances[inst.name]

    async def _run(self, inst: Instance, launcher, *args):
        try:
            return await self._running()[1].start(inst.run, launcher, *args)
        except BaseException:
            self._drop(inst)
            raise

    async def start(self, spec: InstanceSpec) -> Instance:
        """Start an instance and return once it runs; raise (rolled back) if it can't."""
        inst = await self._claim(spec)
        return await self._run(inst, inst.launch_start)

    async def prepare_incoming(self, spec: InstanceSpec, *, postcopy: bool = False,
                               generation: str | None = None, source: str | None = None,
                               disks: object = None) -> str:
        """Be the destination of a live migration; returns the URI to migrate to.  ``source``:
        the declared peer that prepared it, the only peer that may drive it (None: the operator).
        ``disks``: the source's offer of the spec's disks (supervisor/_storage.py); a shared disk
        is reopened and checked, a local one never opened: its target is created here."""
        if postcopy:
            self._check_postcopy()
        offered = parse_offers(disks if disks is not None else [])
        if spec.disks and disks is None:
            raise SpecError("the source sent no offer of the spec's disks (shared or local, sizes)", "disks")
        check_offer(spec, offered, self.cfg.shared_image_dirs)
        inst = await self._claim(spec, offered)
        if generation:
            inst.generation = generation
        return await self._run(inst, inst.launch_incoming, postcopy, source)

    async def abort_incoming(self, name: str) -> Instance:
        inst = self.get(name)
        await inst.abort_incoming()
        return inst

    async def recover_postcopy(self, name: str) -> int:
        return await self.get(name).recover_postcopy()

    def confirm_release(self, name: str) -> Instance:
        inst = self.get(name)
        inst.confirm_release()
        return inst

    async def migrate(self, name: str, opts) -> Instance:
        inst = self.get(name)
        await inst.migrate(opts)
        return inst

    async def cancel_migration(self, name: str) -> Instance:
        inst = self.get(name)
        await inst.cancel_migration()
        return inst

    async def stop(self, name: str, *, force: bool = False, timeout: float | None = None) -> Instance:
        inst = self.get(name)
        await inst.stop(force=force, timeout=timeout)
        return inst

    async def stop_all(self, *, timeout: float | None = None) -> None:
        async with trio.open_nursery() as n:
            for inst in self.list():
                if not inst.state.is_final:
                    n.start_soon(functools.partial(inst.stop, timeout=timeout))

    def forget(self, name: str) -> None:
        """Drop a final-state instance from the table."""
        inst = self.get(name)
        if not inst.state.is_final:
            raise Conflict(f"instance {name!r} is {inst.state.value}")
        del self.instances[name]
        self.events.emit("instance.deleted", instance=name, state=inst.state.value)
