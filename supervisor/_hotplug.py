"""Disk hotplug: add, remove, resize and re-limit an instance's disks while its guest runs.

Every change is made of QMP steps that each leave something in QEMU; each done step is
undone, in reverse, when a later one fails, so a refused or failed change leaves QEMU as it
was, and the spec (the record) changes only once QEMU has the new state:

* **add** -- the chain is opened by qsup by the image rules (:func:`supervisor._disks.open_disk`,
  on a worker thread), each file goes to QEMU over SCM_RIGHTS with ``add-fd`` into a new fdset,
  then ``blockdev-add`` for each node bottom-first (``filename: /dev/fdset/N``), ``device_add``
  at the disk's PCI slot, ``block_set_io_throttle``; undone by ``device_del`` (waiting for
  ``DEVICE_DELETED``), ``blockdev-del``, ``remove-fd``.
* **remove** -- ``device_del``, then ``DEVICE_DELETED`` (the guest released the device) within
  ``unplug_timeout``; only then ``blockdev-del`` top-down and ``remove-fd``.  No
  ``DEVICE_DELETED`` in time: a clear error and the disk stays fully attached (nodes, fds,
  record).  Should the guest release it later, the removal is finished then.
* **resize** -- ``block_resize`` of the format node; grow only (a shrink cuts off data the guest
  may be using: refused, naming ``size``).
* **limits** -- ``block_set_io_throttle``; the new limits go into the spec.

fdset ids are tracked per disk for the QEMU's lifetime (launch: 1..N in the order of the disks
and their chain files; hotplug: above anything QEMU holds or held, never reused: QEMU 7.2
closes a removed fd only while the guest runs, and hands out a set's fds by access mode
alone) and recorded, so a reattached daemon removes the right sets.

Changes need the instance ``running`` or ``paused`` (:data:`supervisor._state.REQUIRES`); one
change at a time per instance, and a migration does not start while one is under way.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, cast

import structlog
import trio
from pydantic import BaseModel, ConfigDict, ValidationError

import qmp_glue

from ._disks import OpenDisk, blockdevs, device, device_id, node_name, open_disk, throttle, throttle_id
from ._errors import FieldError
from ._faults import Checkpoint
from ._spec import IO_LIMITS, MAX_BACKING_DEPTH, MAX_DISKS, DiskSpec, IoLimit, SpecError, _loc, _message, parse_spec
from ._state import REQUIRES, require

if TYPE_CHECKING:
    from ._instance import Instance

log = structlog.get_logger("qsup.hotplug")

#: seconds the guest has to release an unplugged disk (``DEVICE_DELETED``)
UNPLUG_TIMEOUT = 10.0
#: the largest size a resize may ask for (64 TiB)
MAX_DISK_SIZE = 64 << 40
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(i?B)?\s*\Z", re.IGNORECASE)
_UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}


class DiskConflict(FieldError, RuntimeError):
    """The instance cannot take a disk change now (its state, a migration): 409."""


class DiskChangeFailed(FieldError, RuntimeError):
    """QEMU refused a step of a disk change; every done step was undone (or the message says
    what is left).  422 ``change_failed``."""


class IoLimits(BaseModel):
    """Body of ``PATCH /v1/instances/{name}/disks/{id}``: the disk's new I/O limits (absent:
    unchanged, null: no limit)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    bps: IoLimit | None = None
    bps_rd: IoLimit | None = None
    bps_wr: IoLimit | None = None
    iops: IoLimit | None = None
    iops_rd: IoLimit | None = None
    iops_wr: IoLimit | None = None


def parse_disk(data: object, model: type[BaseModel] = DiskSpec) -> Any:
    """``data`` as a ``model`` (DiskSpec, IoLimits); SpecError naming the field, as parse_spec does."""
    if not isinstance(data, dict):
        raise SpecError("must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = max(e.errors(), key=lambda x: len(_loc(x["loc"])))
        field, msg = _loc(err["loc"]), _message(err)
        if msg.startswith("@"):  # a model validator naming its field
            field, _, msg = msg[1:].partition(": ")
        raise SpecError(msg, field or None) from None


def parse_size(value: object, field: str = "size") -> int:
    """Bytes from an integer or ``"10G"``/``"512M"``/``"10GiB"`` (binary units); SpecError naming ``field``."""
    if isinstance(value, bool):
        raise SpecError("must be a number of bytes or a size like '10G'", field)
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.fullmatch(value)):
        size = int(m.group(1)) << _UNITS[m.group(2).upper()]
    else:
        raise SpecError(f"{str(value)[:40]!r} is not a size: bytes, or a number with K, M, G, T or P", field)
    if size <= 0 or size % 512:
        raise SpecError(f"{size} bytes: must be a positive multiple of 512", field)
    if size > MAX_DISK_SIZE:
        raise SpecError(f"{size} bytes: at most {MAX_DISK_SIZE} (64 TiB)", field)
    return size


def _qmp_failed(e: BaseException) -> bool:
    return isinstance(e, (qmp_glue.QMPError, qmp_glue.QMPConnectionLost, qmp_glue.QMPTimeout, trio.TooSlowError))


class DiskOps:
    """One instance's live disk changes (see the module docstring)."""

    def __init__(self, inst: Instance, unplug_timeout: float | None = None) -> None:
        self.inst = inst
        self.unplug_timeout = unplug_timeout
        self._lock = trio.Lock()
        #: disk id -> the fdsets holding its chain's files (image first)
        self.fdsets: dict[str, list[int]] = {}
        self._next_fdset = 1
        self._deleted: dict[str, trio.Event] = {}  # device id -> set at its DEVICE_DELETED
        self._unplugging: set[str] = set()  # disk ids asked to go whose device_del timed out

    # -- the instance's side -------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.inst.name

    @property
    def state(self):  # for require()
        return self.inst.state

    @property
    def busy(self) -> bool:
        """A change is under way: a migration must not start now."""
        return self._lock.locked()

    def launched(self, disks: list[OpenDisk]) -> None:
        """QEMU was started with the disks in fdsets 1, 2, ... in order (supervisor/_qemu.py)."""
        n = 0
        self.fdsets = {}
        for od in disks:
            self.fdsets[od.spec.id] = list(range(n + 1, n + 1 + len(od.files)))
            n += len(od.files)
        self._next_fdset = n + 1

    def adopted(self, recorded: object) -> None:
        """A reattach: the fdsets the record names (a record from before hotplug: launch order)."""
        if isinstance(recorded, dict) and isinstance(recorded.get("disks"), dict):
            self.fdsets = {str(k): [int(x) for x in v] for k, v in recorded["disks"].items() if isinstance(v, list)}
            nxt = recorded.get("next")
            self._next_fdset = int(nxt) if isinstance(nxt, int) else 1
            return
        n = 0
        for d in self.inst.spec.disks:  # without backing files: a lower bound, query-fdsets adds the rest
            n += 1
            self.fdsets[d.id] = [n]
        self._next_fdset = n + 1

    def record(self) -> dict[str, Any]:
        return {"disks": self.fdsets, "next": self._next_fdset}

    def on_device_deleted(self, data: qmp_glue.JSONObject) -> None:
        """QMP ``DEVICE_DELETED``: wake the unplug that waits for it (or finish a late one)."""
        dev = data.get("device")
        if not isinstance(dev, str):
            return  # the virtio backend's own event (a path, no id)
        ev = self._deleted.get(dev)
        if ev is not None:
            ev.set()
            return
        late = next((i for i in self._unplugging if device_id(i) == dev), None)
        if late is not None:  # the guest let go after the unplug gave up: finish it now
            self.inst.spawn(self._finish_late_unplug, late)

    # -- requests ------------------------------------------------------------------------------
    @require("disk_change", DiskConflict)
    async def add(self, disk: DiskSpec) -> DiskSpec:
        """Hotplug ``disk`` (a DiskSpec as the caller gave it); the disk as recorded."""
        async with self._changing():
            disk = self._validate_new(disk)
            cfg = self.inst.ctx.cfg
            try:
                od = await trio.to_thread.run_sync(
                    lambda: open_disk("disk", disk, cfg.image_dirs, allow_device=cfg.allow_device_disks))
            except SpecError as e:
                raise SpecError(e.message, (e.field or "").removeprefix("disk.") or "path") from None
            with trio.CancelScope(shield=True):  # a half-made change must be completed or undone
                try:
                    await self._attach(od)
                finally:
                    od.close()
                self.inst.spec = self.inst.spec.model_copy(update={"disks": [*self.inst.spec.disks, disk]})
                self.inst.persist()
                self.inst.emit("disk.added", disk=disk.model_dump(mode="json", exclude_none=True),
                               fdsets=self.fdsets[disk.id])
            return disk

    @require("disk_change", DiskConflict)
    async def remove(self, disk_id: str) -> DiskSpec:
        async with self._changing():
            disk = self._disk(disk_id)
            with trio.CancelScope(shield=True):
                await self._unplug(disk)
                await self._detach(disk)
                self._removed(disk)
            return disk

    @require("disk_change", DiskConflict)
    async def resize(self, disk_id: str, size: int) -> dict[str, Any]:
        async with self._changing():
            disk = self._disk(disk_id)
            if disk.readonly:
                raise SpecError(f"disk {disk_id!r} is read-only", "id")
            old = await self._virtual_size(disk)
            if old is not None and size < old:
                raise SpecError(f"{size} bytes is smaller than the disk's {old}: shrinking loses the data "
                                "at its end and is refused", "size")
            with trio.CancelScope(shield=True):
                try:
                    await self.qmp.execute("block_resize", {"node-name": node_name(disk.id), "size": size})
                except qmp_glue.QMPError as e:
                    raise DiskChangeFailed(f"QEMU refused the resize of disk {disk_id!r}: "
                                           f"{self._paths(e.desc)}", "size") from None
                self.inst.emit("disk.resized", id=disk.id, size=size, previous=old)
            return {"id": disk.id, "size": size, "previous": old}

    @require("disk_change", DiskConflict)
    async def set_limits(self, disk_id: str, limits: IoLimits) -> DiskSpec:
        async with self._changing():
            disk = self._disk(disk_id)
            merged = {**disk.model_dump(), **limits.model_dump(exclude_unset=True)}
            new = parse_disk(merged)
            args = throttle(new) or {"id": throttle_id(new.id), **{k: 0 for k in IO_LIMITS}}
            with trio.CancelScope(shield=True):
                try:
                    await self.qmp.execute("block_set_io_throttle", cast(qmp_glue.JSONObject, args))
                except qmp_glue.QMPError as e:
                    raise DiskChangeFailed(f"QEMU refused the limits of disk {disk_id!r}: {e.desc}", "id") from None
                self._replace(new)
                self.inst.persist()
                self.inst.emit("disk.limits_changed", id=new.id, limits=new.io_limits())
            return new

    # -- the steps -----------------------------------------------------------------------------
    @property
    def qmp(self) -> qmp_glue.QMPClient:
        return self.inst.qmp

    def _changing(self) -> _Checked:
        """One change at a time, and none while a migration runs (checked again under the lock)."""
        return _Checked(self)

    def _disk(self, disk_id: str) -> DiskSpec:
        d = self.inst.spec.disk(disk_id)
        if d is None:
            from ._node import NotFound  # the node imports the instance: late

            raise NotFound(f"instance {self.name!r} has no disk {disk_id[:40]!r}", "id")
        return d

    def _validate_new(self, disk: DiskSpec) -> DiskSpec:
        """The rules of a start (count, unique id, a free slot, boot order), each refusal naming
        the body's field; the disk with its PCI slot."""
        spec = self.inst.spec
        if spec.disk(disk.id) is not None:
            raise SpecError(f"instance {self.name!r} already has a disk {disk.id!r}", "id")
        if len(spec.disks) >= MAX_DISKS:
            raise SpecError(f"instance {self.name!r} has {len(spec.disks)} disks, at most {MAX_DISKS}", "id")
        used = {s: w for w, s in spec._slots() if s is not None}  # noqa: SLF001 (the spec's own table)
        if disk.pci_slot is None:
            slot = spec.free_slot()
            if slot is None:
                raise SpecError("no free PCI slot left on this instance", "pci_slot")
            disk = disk.model_copy(update={"pci_slot": slot})
        elif disk.pci_slot in used:
            raise SpecError(f"slot {disk.pci_slot} is {used[disk.pci_slot]}'s", "pci_slot")
        if disk.boot is not None:
            clash = next((d.id for d in spec.disks if d.boot == disk.boot), None)
            if clash is not None:
                raise SpecError(f"boot index {disk.boot} is disk {clash!r}'s", "boot")
        data = spec.model_dump(mode="json", exclude_none=True)
        data["disks"] = [*data.get("disks", []), disk.model_dump(mode="json", exclude_none=True)]
        try:
            parse_spec(data)  # whatever else a start would refuse
        except SpecError as e:
            field = re.sub(r"^disks\[\d+\]\.?", "", e.field or "") or "id"
            raise SpecError(e.message, field) from None
        return disk

    async def _fresh_fdset(self) -> int:
        """An fdset id above anything this QEMU holds or held (never reused)."""
        try:
            held = await self.qmp.execute("query-fdsets")
        except qmp_glue.QMPError:
            held = []
        ids = [s.get("fdset-id") for s in held or [] if isinstance(s, dict)] if isinstance(held, list) else []
        top = max([i for i in ids if isinstance(i, int)], default=0)
        n = max(self._next_fdset, top + 1)
        self._next_fdset = n + 1
        return n

    async def _attach(self, od: OpenDisk) -> None:
        d = od.spec
        undo: list[tuple[str, dict[str, Any]]] = []
        step = "add-fd"
        try:
            sets: list[int] = []
            for f in od.files:
                fdset = await self._fresh_fdset()
                await self.qmp.execute("add-fd", {"fdset-id": fdset, "opaque": node_name(d.id, f.depth, "file")},
                                       fds=[f.fd])
                sets.append(fdset)
                undo.append(("remove-fd", {"fdset-id": fdset}))
                self.inst._fd_paths[f"/dev/fdset/{fdset}"] = f.path  # noqa: SLF001 (QEMU's errors name it so)
            self.fdsets[d.id] = sets
            self.inst.checkpoint(Checkpoint.DISK_FDS)
            step = "blockdev-add"
            for node in blockdevs(od, sets):
                await self.qmp.execute("blockdev-add", cast(qmp_glue.JSONObject, node))
                undo.append(("blockdev-del", {"node-name": cast(str, node["node-name"])}))
            self.inst.checkpoint(Checkpoint.DISK_NODES)
            step = "device_add"
            self._deleted[device_id(d.id)] = trio.Event()
            await self.qmp.execute("device_add", cast(qmp_glue.JSONObject, device(d)))
            undo.append(("device_del", {"id": device_id(d.id)}))
            self.inst.checkpoint(Checkpoint.DISK_DEVICE)
            step = "block_set_io_throttle"
            limits = throttle(d)
            if limits is not None:
                await self.qmp.execute("block_set_io_throttle", cast(qmp_glue.JSONObject, limits))
        except BaseException as e:
            left = await self._undo(undo)
            self.fdsets.pop(d.id, None)
            self._deleted.pop(device_id(d.id), None)
            said = self._paths(e.desc) if isinstance(e, qmp_glue.QMPError) else str(e) or type(e).__name__
            tail = f"; NOT undone: {', '.join(left)}" if left else "; every step was undone"
            self.inst.emit("disk.add_failed", id=d.id, step=step, error=said, left=left)
            if _qmp_failed(e):
                raise DiskChangeFailed(f"disk {d.id!r} not added: {step} failed: {said}{tail}",
                                       "path" if step == "blockdev-add" else "id") from e
            raise

    async def _undo(self, undo: list[tuple[str, dict[str, Any]]]) -> list[str]:
        """The done steps of an add, undone in reverse; what could not be undone."""
        left: list[str] = []
        for cmd, args in reversed(undo):
            try:
                if cmd == "device_del":
                    await self._device_del(args["id"])
                else:
                    await self.qmp.execute(cmd, args, timeout=10)
            except Exception as e:  # noqa: BLE001 -- every step is tried; what fails is reported
                log.error("disk add rollback step failed", command=cmd, args=args, error=str(e))
                left.append(f"{cmd} {next(iter(args.values()))}")
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
                return  # gone already
            with trio.fail_after(self._timeout()):
                await ev.wait()
        finally:
            self._deleted.pop(dev, None)

    def _timeout(self) -> float:
        if self.unplug_timeout is not None:
            return self.unplug_timeout
        return float(getattr(self.inst.ctx.cfg, "unplug_timeout", UNPLUG_TIMEOUT))

    async def _unplug(self, disk: DiskSpec) -> None:
        try:
            await self._device_del(device_id(disk.id))
        except trio.TooSlowError:
            self._unplugging.add(disk.id)
            self.inst.emit("disk.unplug_timeout", id=disk.id, after_s=self._timeout())
            raise DiskChangeFailed(
                f"disk {disk.id!r} stays attached: the guest did not release device {device_id(disk.id)!r} "
                f"within {self._timeout():g}s (no DEVICE_DELETED); nothing was removed. Should the guest "
                "release it later, qsup finishes the removal then", "id") from None
        except qmp_glue.QMPError as e:
            raise DiskChangeFailed(f"disk {disk.id!r} stays attached: QEMU refused device_del: {e.desc}",
                                   "id") from None

    async def _detach(self, disk: DiskSpec) -> None:
        """The device is gone: the nodes top-down, then the fdsets (errors logged, the rest goes on)."""
        nodes = await self._nodes_of(disk.id)
        sets = list(self.fdsets.get(disk.id, []))
        sets += await self._held_fdsets(disk.id, exclude=sets)
        failed = []
        for node in nodes:
            try:
                await self.qmp.execute("blockdev-del", {"node-name": node}, timeout=10)
            except qmp_glue.QMPError as e:
                failed.append(f"blockdev-del {node}: {e.desc}")
        for fdset in sets:
            try:
                await self.qmp.execute("remove-fd", {"fdset-id": fdset}, timeout=10)
            except qmp_glue.QMPError as e:
                if "not found" not in e.desc.lower():
                    failed.append(f"remove-fd {fdset}: {e.desc}")
        if failed:
            log.error("disk detach left something", disk=disk.id, failed=failed)
            self.inst.emit("disk.detach_incomplete", id=disk.id, failed=failed)

    async def _nodes_of(self, disk_id: str) -> list[str]:
        """The disk's nodes QEMU holds, top-down (each before the nodes it names)."""
        answer = await self.qmp.execute("query-named-block-nodes", {"flat": True}, timeout=10)
        names = {n.get("node-name") for n in answer if isinstance(n, dict)} if isinstance(answer, list) else set()
        out = []
        for depth in range(MAX_BACKING_DEPTH + 1):
            out += [n for n in (node_name(disk_id, depth), node_name(disk_id, depth, "file")) if n in names]
        return out

    async def _held_fdsets(self, disk_id: str, exclude: list[int]) -> list[int]:
        """fdsets QEMU holds for this disk (by the ``opaque`` qsup gives them) that the record lacks."""
        try:
            held = await self.qmp.execute("query-fdsets", timeout=5)
        except qmp_glue.QMPError:
            return []
        out = []
        for s in held if isinstance(held, list) else []:
            if not isinstance(s, dict) or s.get("fdset-id") in exclude:
                continue
            fds = s.get("fds")
            opaque = [fd.get("opaque") for fd in fds if isinstance(fd, dict)] if isinstance(fds, list) else []
            if any(isinstance(o, str) and (o == f"file-{disk_id}" or o.startswith(f"file-{disk_id}.b"))
                   for o in opaque):
                out.append(cast(int, s["fdset-id"]))
        return out

    def _removed(self, disk: DiskSpec) -> None:
        self.fdsets.pop(disk.id, None)
        self._unplugging.discard(disk.id)
        self.inst.spec = self.inst.spec.model_copy(
            update={"disks": [d for d in self.inst.spec.disks if d.id != disk.id]})
        self.inst.persist()
        self.inst.emit("disk.removed", id=disk.id)

    async def _finish_late_unplug(self, disk_id: str) -> None:
        async with self._lock:
            disk = self.inst.spec.disk(disk_id)
            if disk is None or disk_id not in self._unplugging:
                return
            with trio.CancelScope(shield=True):
                await self._detach(disk)
                self._removed(disk)

    async def _virtual_size(self, disk: DiskSpec) -> int | None:
        nodes = await self.qmp.execute("query-named-block-nodes", {"flat": True})
        for n in nodes if isinstance(nodes, list) else []:
            if isinstance(n, dict) and n.get("node-name") == node_name(disk.id):
                image = n.get("image")
                size = image.get("virtual-size") if isinstance(image, dict) else None
                return size if isinstance(size, int) else None
        return None

    def _replace(self, new: DiskSpec) -> None:
        self.inst.spec = self.inst.spec.model_copy(
            update={"disks": [new if d.id == new.id else d for d in self.inst.spec.disks]})

    def _paths(self, said: str) -> str:
        """QEMU names a file ``/dev/fdset/N``: the path qsup opened instead."""
        for fd_path, path in self.inst._fd_paths.items():  # noqa: SLF001
            said = said.replace(fd_path, path)
        return said


class _Checked:
    """``async with``: the change lock, then the state and migration checks again (a migration
    may have started while this change waited for the lock)."""

    def __init__(self, ops: DiskOps) -> None:
        self.ops = ops

    async def __aenter__(self) -> None:
        await self.ops._lock.acquire()  # noqa: SLF001
        try:
            inst = self.ops.inst
            if inst.state not in REQUIRES["disk_change"] or inst.cause is not None:
                raise DiskConflict(f"instance {inst.name!r} is {inst.state.value}; a disk change needs it "
                                   "paused or running", "name")
        except BaseException:
            self.ops._lock.release()  # noqa: SLF001
            raise

    async def __aexit__(self, *exc: object) -> None:
        self.ops._lock.release()  # noqa: SLF001
