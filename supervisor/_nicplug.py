"""Live NIC changes: add, remove and re-network an instance's NICs while its guest runs.

The same shape as disk hotplug (supervisor/_hotplug.py): each change is a list of steps that each
leave something in QEMU or on the host; a later step that fails undoes the done ones in reverse,
and the spec (the record) changes only once QEMU and the host have the new state.

* **add** -- the spec rules of a start (caps, unique MAC, routed addresses unique on the node,
  netconf's host check on a worker thread); qsup opens the tap (``netconf.open_tap``), applies L2
  (the NIC's ``attach`` plan through the instance's executor: journaled, hooks as at start),
  hands each queue's fd to QEMU (``getfd`` over SCM_RIGHTS), ``netdev_add`` (``fd``/``fds``),
  ``device_add virtio-net-pci`` at the NIC's fixed PCI slot, then L3 (``activate``); undone by
  the netconf undo of that NIC, ``closefd``, ``netdev_del``, ``device_del``.  qsup closes its own
  tap fds once QEMU holds them; the tap is non-persistent, so it goes with QEMU's netdev.
* **remove** -- ``device_del``, then ``DEVICE_DELETED`` within ``unplug_timeout``; only then
  ``netdev_del`` (QEMU closes the tap: it vanishes), the journal's undo of that NIC only (keyed by
  its id, the MAC).  No ``DEVICE_DELETED`` in time: a clear error and the NIC stays as it is (host
  network, netdev, record); a late release finishes the removal then.
* **set** -- the new NIC's ``attach``/``activate`` plans against what the journal says the host
  holds for it (``Executor.converge``): only the steps that differ are undone and applied, on the
  same tap; when L2 changed the guest's link is bounced (``set_link`` off, on).  A failure
  converges back to the old plans.

**A daemon killed mid-change** (``kill -9``): before its first step, a change writes its intent
into the instance record (``nic_change``: the operation, the old and new NIC, QEMU's ids).  The
next daemon, at reattach, settles it from what QEMU holds (``qom-list /machine/peripheral``): an
add whose device QEMU has is finished (L3 applied, recorded), one whose device it lacks is undone
(netdev, fds, the NIC's journal); a removal whose device is gone is finished, one whose device
is still there keeps the NIC (finished if the guest lets go later); a set goes back to the old
plans.  Record, QEMU and host network then agree.

QEMU's ids: NICs of a launch are ``net{i}``/``nic{i}`` in spec order (supervisor/_qemu.py); a
hotplugged one is ``net-MAC``/``nic-MAC`` (hex digits).  The ids are recorded (``nic_ops`` in the
record) since a removal shifts the spec's order but not QEMU's names.

Changes need the instance ``running`` or ``paused`` (:data:`supervisor._state.REQUIRES`) and no
upgrade under way; one change at a time per instance (disk changes have their own lock), and a
migration or an upgrade does not start while one is under way.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

import structlog
import trio
from pydantic import ValidationError

import netconf
import qmp_glue

from ._errors import FieldError
from ._faults import Checkpoint
from ._limits import check_unique_addresses
from ._spec import MAX_NICS, InstanceSpec, NicSpec, SpecError, _loc, _message, generated_mac, parse_spec
from ._state import REQUIRES, require

if TYPE_CHECKING:
    from ._instance import Instance

log = structlog.get_logger("qsup.nicplug")

#: seconds the guest has to release an unplugged NIC (``DEVICE_DELETED``), unless the config says
UNPLUG_TIMEOUT = 10.0
_FIELD_RE = re.compile(r"^nics\[\d+\]\.?")


class NicConflict(FieldError, RuntimeError):
    """The instance cannot take a NIC change now (its state, a migration, an upgrade): 409."""


class NicChangeFailed(FieldError, RuntimeError):
    """QEMU or the host refused a step of a NIC change; every done step was undone (or the
    message says what is left).  422 ``change_failed``."""


def parse_nic(data: object) -> NicSpec:
    """``data`` as a NicSpec; SpecError naming the field (``ip``, ``vlan``), as parse_spec does."""
    if not isinstance(data, dict):
        raise SpecError("must be a JSON object")
    try:
        return NicSpec.model_validate(data)
    except ValidationError as e:
        err = max(e.errors(), key=lambda x: len(_loc(x["loc"])))
        field, msg = _loc(err["loc"]), _message(err)
        if msg.startswith("@"):
            field, _, msg = msg[1:].partition(": ")
        raise SpecError(msg, field or None) from None


def _hex(mac: str) -> str:
    return mac.replace(":", "").lower()


def hot_ids(mac: str) -> tuple[str, str]:
    """QEMU's netdev and device ids of a hotplugged NIC."""
    return f"net-{_hex(mac)}", f"nic-{_hex(mac)}"


def _qmp_failed(e: BaseException) -> bool:
    return isinstance(e, (qmp_glue.QMPError, qmp_glue.QMPConnectionLost, qmp_glue.QMPTimeout, trio.TooSlowError,
                          netconf.NetconfError, OSError))


def _l2(nic: netconf.Nic) -> netconf.Plan:
    return netconf.plan(nic, "attach")


def _l3(nic: netconf.Nic) -> netconf.Plan:
    return netconf.plan(nic, "activate")


def plan_diff(old: netconf.Nic, new: netconf.Nic) -> dict[str, list[str]]:
    """The steps that differ between two NICs' plans: ``removed`` (old only), ``changed`` (both,
    other args), ``added`` (new only), per phase in order."""
    out: dict[str, list[str]] = {"removed": [], "changed": [], "added": []}
    for a, b in ((_l2(old), _l2(new)), (_l3(old), _l3(new))):
        was = {s.name: s.args for s in a}
        now = {s.name: s.args for s in b}
        out["removed"] += [n for n in was if n not in now]
        out["changed"] += [n for n in was if n in now and was[n] != now[n]]
        out["added"] += [n for n in now if n not in was]
    return out


class NicOps:
    """One instance's live NIC changes (see the module docstring)."""

    def __init__(self, inst: Instance, unplug_timeout: float | None = None) -> None:
        self.inst = inst
        self.unplug_timeout = unplug_timeout
        self._lock = trio.Lock()
        #: mac -> (netdev id, device id) as QEMU names them
        self.ids: dict[str, tuple[str, str]] = {}
        #: the change under way, as recorded (a restarted daemon settles it)
        self.pending: dict[str, Any] | None = None
        self._deleted: dict[str, trio.Event] = {}  # device id -> set at its DEVICE_DELETED
        self._unplugging: set[str] = set()  # MACs whose device_del timed out

    # -- the instance's side -------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.inst.name

    @property
    def state(self):  # for require()
        return self.inst.state

    @property
    def busy(self) -> bool:
        """A change is under way: a migration or an upgrade must not start now."""
        return self._lock.locked()

    def launched(self) -> None:
        """A QEMU built from the spec (a start, a migration destination, an upgrade): ids by position."""
        self.ids = {n.mac: (f"net{i}", f"nic{i}") for i, n in enumerate(self.inst.nics)}

    def record(self) -> dict[str, Any]:
        return {"ids": {m: list(v) for m, v in self.ids.items()}, "pending": self.pending,
                "unplugging": sorted(self._unplugging)}

    async def adopted(self, recorded: object) -> None:
        """A reattach: QEMU's ids from the record (an older record: launch order); a change the
        previous daemon left half-done is settled against what QEMU holds."""
        self.launched()
        if not isinstance(recorded, dict):
            return
        ids = recorded.get("ids")
        if isinstance(ids, dict):
            self.ids = {str(m): (str(v[0]), str(v[1])) for m, v in ids.items() if isinstance(v, list) and len(v) == 2}
        self._unplugging = {m for m in recorded.get("unplugging") or [] if isinstance(m, str)}
        pending = recorded.get("pending")
        if isinstance(pending, dict):
            self.pending = pending
            with trio.CancelScope(shield=True):
                await self._settle(pending)

    def on_device_deleted(self, data: qmp_glue.JSONObject) -> None:
        """QMP ``DEVICE_DELETED``: wake the unplug that waits for it (or finish a late one)."""
        dev = data.get("device")
        if not isinstance(dev, str):
            return
        ev = self._deleted.get(dev)
        if ev is not None:
            ev.set()
            return
        late = next((m for m in self._unplugging if self.ids.get(m, ("", ""))[1] == dev), None)
        if late is not None:
            self.inst.spawn(self._finish_late_unplug, late)

    # -- requests ------------------------------------------------------------------------------
    @require("nic_change", NicConflict)
    async def add(self, nic: NicSpec, others: Iterable[InstanceSpec] = ()) -> NicSpec:
        """Hotplug ``nic`` (as the caller gave it); the NIC as recorded (MAC and slot filled in).
        ``others``: the specs of the node's other live instances (routed addresses are unique)."""
        async with self._changing():
            others = list(others)
            spec = self._validate_new(nic, others)
            nic = spec.nics[-1]
            assert nic.mac is not None and nic.pci_slot is not None
            net = self._netconf_nic(spec, nic)
            await self._host_checks(net, spec, others)
            netdev_id, dev_id = hot_ids(nic.mac)
            with trio.CancelScope(shield=True):  # a half-made change is completed or undone
                self._intend({"op": "add", "mac": nic.mac, "new": nic.model_dump(mode="json"),
                              "ids": [netdev_id, dev_id]})
                t0 = time.perf_counter()
                await self._attach(net, nic, netdev_id, dev_id)
                self._commit_add(spec, net, netdev_id, dev_id)
                self.inst.emit("nic.added", nic=self._nic_view(net, nic), ms=round((time.perf_counter() - t0) * 1e3, 3))
            return nic

    @require("nic_change", NicConflict)
    async def remove(self, mac: str) -> NicSpec:
        async with self._changing():
            nic, net = self._nic(mac)
            netdev_id, dev_id = self.ids.get(net.mac, hot_ids(net.mac))
            with trio.CancelScope(shield=True):
                self._intend({"op": "remove", "mac": net.mac, "old": nic.model_dump(mode="json"),
                              "ids": [netdev_id, dev_id]})
                await self._unplug(net, dev_id)
                self.inst.checkpoint(Checkpoint.NIC_UNPLUGGED)
                await self._detach(net, netdev_id)
                self._commit_remove(net)
            return nic

    @require("nic_change", NicConflict)
    async def change(self, mac: str, new: NicSpec, others: Iterable[InstanceSpec] = ()) -> NicSpec:
        """Change NIC ``mac``'s network live (mode, link, addresses, VLANs); queues and slot stay."""
        async with self._changing():
            old, old_net = self._nic(mac)
            others = list(others)
            spec, new = self._validate_set(old, new, others)
            new_net = self._netconf_nic(spec, new)
            await self._host_checks(new_net, spec, others)
            diff = plan_diff(old_net, new_net)
            l2 = any(s in diff[k] for k in diff for s in netconf.STEP_NAMES["attach"])
            _, dev_id = self.ids.get(old_net.mac, hot_ids(old_net.mac))
            with trio.CancelScope(shield=True):
                self._intend({"op": "set", "mac": old_net.mac, "old": old.model_dump(mode="json"),
                              "new": new.model_dump(mode="json"), "ids": list(self.ids.get(old_net.mac, ("", "")))})
                t0 = time.perf_counter()
                try:
                    done = await self.inst.ctx.worker.run(self._converge, new_net, "start")
                    self.inst.checkpoint(Checkpoint.NIC_CONVERGED)
                    if l2:
                        await self._bounce(dev_id)
                except BaseException as e:
                    left = await self._back_to(old_net, dev_id if l2 else None)
                    said = str(e) or type(e).__name__
                    self.inst.emit("nic.change_failed", mac=old_net.mac, error=said, left=left)
                    if _qmp_failed(e):
                        tail = f"; NOT put back: {', '.join(left)}" if left else "; the NIC is back on its old network"
                        raise NicChangeFailed(f"NIC {old_net.mac} not changed: {said}{tail}", "mac") from e
                    raise
                self._replace(spec, new_net)
                self.pending = None
                self.inst.persist()
                self.inst.emit("nic.changed", mac=new_net.mac, nic=self._nic_view(new_net, new),
                               previous=self._nic_view(old_net, old), diff=diff, undone=done["undone"],
                               applied=done["applied"], link_bounced=l2,
                               ms=round((time.perf_counter() - t0) * 1e3, 3))
            return new

    # -- validation ----------------------------------------------------------------------------
    def _changing(self) -> _Checked:
        return _Checked(self)

    def _resolved(self) -> list[NicSpec]:
        """The spec's NICs with their MACs written in: a generated MAC depends on the NIC's
        position, which a removal changes, so a live change pins every MAC first."""
        return self.inst.spec.resolved_nics()

    def _nic(self, mac: str) -> tuple[NicSpec, netconf.Nic]:
        m = mac.lower()
        for ns, n in zip(self._resolved(), self.inst.nics, strict=True):
            if n.mac == m:
                return ns, n
        from ._node import NotFound  # the node imports the instance: late

        raise NotFound(f"instance {self.name!r} has no NIC {mac[:40]!r}", "mac")

    def _check(self, spec_data: dict, others: list[InstanceSpec]) -> InstanceSpec:
        """Whatever a start would refuse, naming the body's field (``nics[3].ip`` -> ``ip``)."""
        try:
            spec = parse_spec(spec_data)
            check_unique_addresses(spec, others)
        except SpecError as e:
            raise SpecError(e.message, _FIELD_RE.sub("", e.field or "") or "mac") from None
        return spec

    def _validate_new(self, nic: NicSpec, others: list[InstanceSpec]) -> InstanceSpec:
        spec = self.inst.spec
        nics = self._resolved()
        if len(nics) >= MAX_NICS:
            raise SpecError(f"instance {self.name!r} has {len(nics)} NICs, at most {MAX_NICS}", "mac")
        macs = {n.mac for n in nics}
        if nic.mac is not None and nic.mac in macs:
            raise SpecError(f"instance {self.name!r} already has a NIC with MAC {nic.mac}", "mac")
        if nic.mac is None:
            k = len(nics)
            while generated_mac(spec.name, k) in macs:
                k += 1
            nic = nic.model_copy(update={"mac": generated_mac(spec.name, k)})
        used = {s: w for w, s in spec._slots() if s is not None}  # noqa: SLF001 (the spec's own table)
        if nic.pci_slot is None:
            slot = spec.free_slot()
            if slot is None:
                raise SpecError("no free PCI slot left on this instance", "pci_slot")
            nic = nic.model_copy(update={"pci_slot": slot})
        elif nic.pci_slot in used:
            raise SpecError(f"slot {nic.pci_slot} is {used[nic.pci_slot]}'s", "pci_slot")
        data = spec.model_dump(mode="json")
        data["nics"] = [n.model_dump(mode="json") for n in [*nics, nic]]
        return self._check(data, others)

    def _validate_set(self, old: NicSpec, new: NicSpec, others: list[InstanceSpec]) -> tuple[InstanceSpec, NicSpec]:
        if new.mac is not None and new.mac != old.mac:
            raise SpecError(f"the MAC is the NIC's identity: {new.mac} is not {old.mac} (remove and add instead)",
                            "mac")
        if new.pci_slot is not None and new.pci_slot != old.pci_slot:
            raise SpecError(f"a NIC keeps its PCI slot ({old.pci_slot}) while the guest runs", "pci_slot")
        if new.queues != old.queues:
            raise SpecError(f"queues is {old.queues}: a new queue count needs a new tap (remove and add instead)",
                            "queues")
        new = new.model_copy(update={"mac": old.mac, "pci_slot": old.pci_slot})
        if new == old:
            raise SpecError("nothing to change: the NIC is already so", "mode")
        data = self.inst.spec.model_dump(mode="json")
        data["nics"] = [(new if n.mac == old.mac else n).model_dump(mode="json") for n in self._resolved()]
        spec = self._check(data, others)
        return spec, new

    def _netconf_nic(self, spec: InstanceSpec, nic: NicSpec) -> netconf.Nic:
        from ._instance import build_nics

        return next(n for n in build_nics(spec) if n.mac == nic.mac)

    async def _host_checks(self, net: netconf.Nic, spec: InstanceSpec, others: list[InstanceSpec]) -> None:
        """The bridge, OVS bridge or table exists; routed addresses unique with table names
        resolved (rt_tables): blocking, on a worker thread."""
        def check() -> None:
            try:
                netconf.check_link(net)
            except netconf.NetconfError as e:
                field, sep, msg = str(e).partition(": ")
                raise SpecError(msg, field) if sep else SpecError(str(e), "link") from None
            try:
                check_unique_addresses(spec, others, netconf.resolve_table)
            except SpecError as e:
                raise SpecError(e.message, _FIELD_RE.sub("", e.field or "") or "ip") from None

        await trio.to_thread.run_sync(check)

    # -- the steps -----------------------------------------------------------------------------
    @property
    def qmp(self) -> qmp_glue.QMPClient:
        return self.inst.qmp

    def _intend(self, change: dict[str, Any]) -> None:
        """The change goes into the record before its first step (a restarted daemon settles it)."""
        self.pending = change
        self.inst.persist()

    async def _attach(self, net: netconf.Nic, nic: NicSpec, netdev_id: str, dev_id: str) -> None:
        ex = self.inst.executor
        worker = self.inst.ctx.worker
        undo: list[tuple[str, Any]] = []
        step = "tap"
        tap: netconf.TapHandle | None = None
        try:
            tap = netconf.open_tap(net.tap, net.queues, mac=netconf.fe_mac(net.mac))
            step = "attach"
            undo.append(("netconf", None))  # the NIC's journal: whatever of L2/L3 got applied
            await worker.run(ex.apply, _l2(net), reason="start")
            self.inst.checkpoint(Checkpoint.NIC_TAP)
            step = "getfd"
            names = []
            for i, fd in enumerate(tap.fds):
                name = f"{netdev_id}-q{i}"
                await self.qmp.execute("getfd", {"fdname": name}, fds=[fd])
                names.append(name)
                undo.append(("closefd", {"fdname": name}))
            step = "netdev_add"
            args: dict[str, Any] = {"type": "tap", "id": netdev_id, "vhost": False}
            if len(names) == 1:
                args["fd"] = names[0]
            else:
                args["fds"] = ":".join(names)
            if not tap.vnet_hdr:
                args["vnet_hdr"] = False
            await self.qmp.execute("netdev_add", cast(qmp_glue.JSONObject, args))
            undo.append(("netdev_del", {"id": netdev_id}))
            self.inst.checkpoint(Checkpoint.NIC_NETDEV)
            step = "device_add"
            self._deleted[dev_id] = trio.Event()
            await self.qmp.execute("device_add", cast(qmp_glue.JSONObject, device(nic, netdev_id, dev_id)))
            undo.append(("device_del", {"id": dev_id}))
            self.inst.checkpoint(Checkpoint.NIC_DEVICE)
            step = "activate"
            await worker.run(ex.apply, _l3(net), reason="start")
            self.inst.checkpoint(Checkpoint.NIC_ACTIVATED)
        except BaseException as e:
            left = await self._undo(undo, net)
            said = e.desc if isinstance(e, qmp_glue.QMPError) else str(e) or type(e).__name__
            tail = f"; NOT undone: {', '.join(left)}" if left else "; every step was undone"
            self.inst.emit("nic.add_failed", mac=net.mac, step=step, error=said, left=left)
            self.pending = None
            self.inst.persist()
            if _qmp_failed(e):
                field = {"tap": "mac", "attach": "link", "activate": "ip"}.get(step, "mac")
                raise NicChangeFailed(f"NIC {net.mac} not added: {step} failed: {said}{tail}", field) from e
            raise
        finally:
            self._deleted.pop(dev_id, None)
            if tap is not None:
                tap.close()  # QEMU holds its own copies (or nothing: the tap goes)

    async def _undo(self, undo: list[tuple[str, Any]], net: netconf.Nic) -> list[str]:
        """An add's done steps, in reverse; what could not be undone."""
        left: list[str] = []
        for what, args in reversed(undo):
            try:
                if what == "netconf":
                    await self.inst.ctx.worker.run(self.inst.executor.undo, reason="rollback", nic_id=net.nic_id)
                elif what == "device_del":
                    await self._device_del(args["id"])
                elif what == "closefd":
                    try:
                        await self.qmp.execute("closefd", args, timeout=10)
                    except qmp_glue.QMPError:
                        pass  # netdev_add took it: gone with the netdev
                else:
                    await self.qmp.execute(what, args, timeout=10)
            except Exception as e:  # noqa: BLE001 -- every step is tried; what fails is reported
                log.error("nic add rollback step failed", step=what, args=args, error=str(e))
                left.append(what if args is None else f"{what} {next(iter(args.values()))}")
        return left

    async def _device_del(self, dev: str) -> None:
        """``device_del`` and wait for ``DEVICE_DELETED``; TooSlowError when the guest keeps it."""
        ev = self._deleted.setdefault(dev, trio.Event())
        try:
            try:
                await self.qmp.execute("device_del", {"id": dev})
            except qmp_glue.QMPError as e:
                if e.error_class != "DeviceNotFound":
                    raise
                return
            with trio.fail_after(self._timeout()):
                await ev.wait()
        finally:
            self._deleted.pop(dev, None)

    def _timeout(self) -> float:
        if self.unplug_timeout is not None:
            return self.unplug_timeout
        return float(getattr(self.inst.ctx.cfg, "unplug_timeout", UNPLUG_TIMEOUT))

    async def _unplug(self, net: netconf.Nic, dev_id: str) -> None:
        try:
            await self._device_del(dev_id)
        except trio.TooSlowError:
            self._unplugging.add(net.mac)
            self.pending = None
            self.inst.persist()
            self.inst.emit("nic.unplug_timeout", mac=net.mac, after_s=self._timeout())
            raise NicChangeFailed(
                f"NIC {net.mac} stays attached: the guest did not release device {dev_id!r} within "
                f"{self._timeout():g}s (no DEVICE_DELETED); nothing was removed. Should the guest release "
                "it later, qsup finishes the removal then", "mac") from None
        except qmp_glue.QMPError as e:
            self.pending = None
            self.inst.persist()
            raise NicChangeFailed(f"NIC {net.mac} stays attached: QEMU refused device_del: {e.desc}", "mac") from None

    async def _detach(self, net: netconf.Nic, netdev_id: str) -> list[str]:
        """The device is gone: the netdev (QEMU closes the tap, which vanishes), then the NIC's
        journal undone.  What failed is reported in an event; the rest goes on."""
        failed = []
        try:
            await self.qmp.execute("netdev_del", {"id": netdev_id}, timeout=10)
        except qmp_glue.QMPError as e:
            if e.error_class != "DeviceNotFound" and "not found" not in e.desc.lower():
                failed.append(f"netdev_del {netdev_id}: {e.desc}")
        try:
            await self.inst.ctx.worker.run(self.inst.executor.undo, reason="stop", nic_id=net.nic_id)
        except netconf.NetconfError as e:
            failed.append(str(e))
        self.inst.checkpoint(Checkpoint.NIC_DETACHED)
        if failed:
            log.error("nic detach left something", mac=net.mac, failed=failed)
            self.inst.emit("nic.detach_incomplete", mac=net.mac, failed=failed)
        return failed

    def _converge(self, net: netconf.Nic, reason: netconf.Reason) -> dict[str, list[str]]:
        """(the netconf thread) the NIC's host state made ``net``'s plans, touching only the difference."""
        return self.inst.executor.converge([_l2(net), _l3(net)], reason=reason)

    async def _bounce(self, dev_id: str) -> None:
        """The guest's link down and up: it renews what it must (DHCP, ARP, its neighbours)."""
        await self.qmp.execute("set_link", {"name": dev_id, "up": False}, timeout=10)
        await trio.sleep(0.1)
        await self.qmp.execute("set_link", {"name": dev_id, "up": True}, timeout=10)

    async def _back_to(self, old: netconf.Nic, bounce_dev: str | None) -> list[str]:
        """A failed set: the old plans again (and the link up); what could not be put back."""
        left = []
        try:
            await self.inst.ctx.worker.run(self._converge, old, "rollback")
        except Exception as e:  # noqa: BLE001
            log.error("nic set rollback failed", mac=old.mac, error=str(e))
            left.append(f"netconf: {e}")
        if bounce_dev is not None:
            try:
                await self.qmp.execute("set_link", {"name": bounce_dev, "up": True}, timeout=10)
            except Exception as e:  # noqa: BLE001
                left.append(f"set_link up: {e}")
        self.pending = None
        self.inst.persist()
        return left

    # -- the record ----------------------------------------------------------------------------
    def _commit_add(self, spec: InstanceSpec, net: netconf.Nic, netdev_id: str, dev_id: str) -> None:
        self.inst.spec = self.inst.spec.model_copy(update={"nics": spec.nics})
        self.inst.nics = [*self.inst.nics, net]
        self.ids[net.mac] = (netdev_id, dev_id)
        self.pending = None
        self.inst.persist()

    def _commit_remove(self, net: netconf.Nic) -> None:
        keep = [ns for ns in self._resolved() if ns.mac != net.mac]
        self.inst.spec = self.inst.spec.model_copy(update={"nics": keep})
        self.inst.nics = [n for n in self.inst.nics if n.mac != net.mac]
        self.ids.pop(net.mac, None)
        self._unplugging.discard(net.mac)
        self.pending = None
        self.inst.persist()
        self.inst.emit("nic.removed", mac=net.mac, tap=net.tap)

    def _replace(self, spec: InstanceSpec, net: netconf.Nic) -> None:
        self.inst.spec = self.inst.spec.model_copy(update={"nics": spec.nics})
        self.inst.nics = [net if n.mac == net.mac else n for n in self.inst.nics]

    @staticmethod
    def _nic_view(net: netconf.Nic, nic: NicSpec) -> dict[str, Any]:
        return {"mac": net.mac, "mode": net.mode, "tap": net.tap, "link": net.link, "ip": net.ip, "ip6": net.ip6,
                "vlan": net.vlan, "trunks": list(net.trunks), "queues": net.queues, "pci_slot": nic.pci_slot}

    async def _finish_late_unplug(self, mac: str) -> None:
        async with self._lock:
            net = next((n for n in self.inst.nics if n.mac == mac), None)
            if net is None or mac not in self._unplugging:
                return
            netdev_id, _ = self.ids.get(mac, hot_ids(mac))
            with trio.CancelScope(shield=True):
                await self._detach(net, netdev_id)
                self._commit_remove(net)

    # -- a change a killed daemon left --------------------------------------------------------
    async def _devices(self) -> set[str] | None:
        """The ids of QEMU's user-created devices (None: QEMU did not say)."""
        try:
            answer = await self.qmp.execute("qom-list", {"path": "/machine/peripheral"}, timeout=10)
        except (qmp_glue.QMPError, trio.TooSlowError):
            return None
        if not isinstance(answer, list):
            return None
        return {str(p["name"]) for p in answer if isinstance(p, dict) and str(p.get("type", "")).startswith("child<")}

    async def _settle(self, pending: dict[str, Any]) -> None:
        op, mac = pending.get("op"), str(pending.get("mac", ""))
        ids = pending.get("ids") or ["", ""]
        netdev_id, dev_id = str(ids[0]), str(ids[1])
        devices = await self._devices()
        outcome = "unknown"
        try:
            if op == "add":
                new = NicSpec.model_validate(pending["new"])
                if devices is not None and dev_id in devices and all(n.mac != mac for n in self.inst.nics):
                    data = self.inst.spec.model_dump(mode="json")
                    data["nics"] = [n.model_dump(mode="json") for n in [*self._resolved(), new]]
                    spec = parse_spec(data)
                    net = self._netconf_nic(spec, new)
                    await self.inst.ctx.worker.run(self.inst.executor.apply, _l3(net), reason="start")
                    self._commit_add(spec, net, netdev_id, dev_id)
                    self.inst.emit("nic.added", nic=self._nic_view(net, new), recovered=True)
                    outcome = "finished"
                else:
                    steps: list[tuple[str, dict[str, Any]]] = [("netdev_del", {"id": netdev_id})]
                    steps += [("closefd", {"fdname": f"{netdev_id}-q{i}"}) for i in range(new.queues)]
                    for cmd, args in steps:  # whichever of them QEMU holds (the tap goes with the last fd)
                        try:
                            await self.qmp.execute(cmd, cast(qmp_glue.JSONObject, args), timeout=10)
                        except qmp_glue.QMPError:
                            pass
                    await self.inst.ctx.worker.run(self.inst.executor.undo, reason="rollback",
                                                   nic_id=mac.lower())
                    outcome = "undone"
            elif op == "remove":
                gone = next((n for n in self.inst.nics if n.mac == mac), None)
                if gone is not None and devices is not None and dev_id not in devices:
                    await self._detach(gone, netdev_id)
                    self._commit_remove(gone)
                    outcome = "finished"
                elif gone is not None:
                    self._unplugging.add(mac)  # the guest may still let go: finished then
                    outcome = "kept"
            elif op == "set":
                old = next((n for n in self.inst.nics if n.mac == mac), None)
                if old is not None:
                    await self._back_to(old, dev_id if dev_id else None)
                    outcome = "rolled back"
        except Exception as e:  # noqa: BLE001 -- reported; the instance is adopted all the same
            log.error("settling a NIC change left by the previous daemon failed", change=pending, error=str(e))
            outcome = f"failed: {e}"
        self.pending = None
        self.inst.persist()
        self.inst.emit("nic.change_settled", change=pending, outcome=outcome)


def device(nic: NicSpec, netdev_id: str, dev_id: str) -> dict[str, Any]:
    """``device_add``'s arguments for a hotplugged virtio-net NIC (as supervisor/_qemu.py's ``-device``)."""
    assert nic.mac is not None and nic.pci_slot is not None
    args: dict[str, Any] = {"driver": "virtio-net-pci", "id": dev_id, "netdev": netdev_id, "mac": nic.mac,
                            "addr": f"{nic.pci_slot:#x}"}
    if nic.queues > 1:
        args.update({"mq": True, "vectors": 2 * nic.queues + 2})
    return args


class _Checked:
    """``async with``: the change lock, then the state, migration and upgrade checks again."""

    def __init__(self, ops: NicOps) -> None:
        self.ops = ops

    async def __aenter__(self) -> None:
        await self.ops._lock.acquire()  # noqa: SLF001
        try:
            inst = self.ops.inst
            if inst.state not in REQUIRES["nic_change"] or inst.cause is not None:
                raise NicConflict(f"instance {inst.name!r} is {inst.state.value}; a NIC change needs it "
                                  "paused or running", "name")
            if getattr(inst, "_upgrade_pid", None) is not None:
                raise NicConflict(f"instance {inst.name!r} is being upgraded; change its NICs once that is done",
                                  "name")
        except BaseException:
            self.ops._lock.release()  # noqa: SLF001
            raise

    async def __aexit__(self, *exc: object) -> None:
        self.ops._lock.release()  # noqa: SLF001
