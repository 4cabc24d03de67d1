"""The instance spec: what a user asks for, validated before anything runs.

The spec is a public contract (README.md, "Instance spec").  It arrives as JSON or TOML from
the CLI, the HTTP API or a migration peer, and everything downstream trusts
it, so validation is strict:

* unknown fields are refused (a typo must not silently become a default);
* every error names the field, as a dotted path such as ``nics[1].mac``;
* the instance name is restricted to :data:`NAME_PATTERN` (which also rules
  out ``.``/``..``), so it can never escape the state or run directory it is
  joined onto;
* every string is checked on the *whole* string (``fullmatch``/``\\Z``:
  Python's ``re.match(... $)`` accepts ``"x\\n"``) and free text (``append``,
  ``tags``, paths) may hold no control character (C0, DEL, C1: newline, NUL,
  ESC...) and no lone surrogate, so nothing downstream (argv, hook
  environment, JSON events, log lines) ever sees one;
* routed addresses are real unicast host addresses: not unspecified,
  broadcast, multicast, loopback, link-local, reserved, v4-mapped, scoped,
  nor the guests' own gateway (:data:`netconf._plan.GATEWAY4`/``GATEWAY6``);
* NICs and queues are capped (:data:`MAX_NICS`, :data:`MAX_QUEUES`,
  :data:`MAX_TOTAL_QUEUES`) below what QEMU's ``pc`` machine can place.

Validation here is syntactic.  Facts about the host (does the bridge exist,
is the routing table known) are checked by :func:`netconf.check_link` just
before start, and reported the same way.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from netconf._plan import GATEWAY4, GATEWAY6
from netconf._types import BRIDGE_MODES, Mode

from ._errors import FieldError

#: An instance name, and a node name as a ``[peers]`` key: one path component that starts with a
#: letter or digit, so never ``.``/``..``.  The one definition of the pattern.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"
#: What a guest kernel panic does: the spec's ``on_panic`` and the node config's default.
OnPanic = Literal["pause", "stop", "restart"]
ON_PANIC_POLICIES: tuple[OnPanic, ...] = get_args(OnPanic)

# NAME_RE's pattern is also the OpenAPI schema's (ECMA-262, where ``$`` is the end of input), so
# it keeps ``$``; in Python match it only with ``fullmatch`` (or :func:`valid_name`).  The
# others end in ``\Z`` so that even a plain ``.match`` cannot accept a trailing newline.
NAME_RE = re.compile(f"^{NAME_PATTERN}$")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z")
ACCEL_RE = re.compile(r"^[a-z][a-z0-9_-]{0,15}\Z")
LINK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*\Z")

#: Control characters (C0, DEL, C1) and lone surrogates: refused in every string field.
_BAD_CHAR_RE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

# -- limits: what QEMU can place, with room to spare ---------------------------------------
# A ``pc`` (i440fx) machine has one PCI bus with 32 slots.  With ``-nodefaults`` slot 0 is the
# host bridge and slot 1 the PIIX3 (ISA bridge, IDE, ACPI PM), so 30 are free; QEMU 7.2 refuses
# a 31st device ("PCI: no slot/function available", checked on this host).  qsup puts each NIC
# in its own slot (no multifunction) and needs one more for a virtio disk, and future devices
# (rng, balloon, ...) need their own: 16 NICs leaves 14 slots for everything else.
MAX_NICS = 16
#: Disks: each virtio-blk disk takes its own slot too.  16 NICs + 8 disks + pvpanic = 25 of 30.
MAX_DISKS = 8
#: A qcow2 backing chain deeper than this is refused (qsup opens every file of it).
MAX_BACKING_DEPTH = 16
#: The PCI slots qsup places devices in (``addr=``), fixed per device and recorded in the spec so a
#: migration destination, a reattach or an upgrade sees the same layout.  Slot 2 is pvpanic's (the
#: first ``-device``, where QEMU put it before slots were fixed); NICs and disks take 3..31.
PVPANIC_SLOT = 2
FIRST_SLOT, LAST_SLOT = 3, 31
DISK_ID_RE = re.compile(r"^[a-z][a-z0-9_-]{0,15}\Z")
SERIAL_RE = re.compile(r"^[A-Za-z0-9_.-]{1,20}\Z")
MACHINE_RE = re.compile(r"^[a-z][a-z0-9._-]{0,63}\Z")
#: the largest I/O limit (bytes/s or operations/s) QEMU's throttling takes (THROTTLE_VALUE_MAX)
MAX_IO_LIMIT = 1_000_000_000_000_000
DiskFormat = Literal["raw", "qcow2"]
DiskCache = Literal["none", "writeback", "writethrough", "directsync", "unsafe"]
#: the I/O limit fields of a disk, as QEMU's ``block_set_io_throttle`` names them
IO_LIMITS = ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")
# Per NIC, QEMU allows up to 1024 queues (MAX_QUEUE_NUM; virtio-net needs 2q+1 <= 1024
# virtqueues) and Linux 256 per tap (MAX_TAP_QUEUES); a guest uses at most one queue pair per
# vCPU.  Each queue is a tap fd that qsup opens and passes to QEMU, and each needs two MSI-X
# vectors (``vectors=2q+2``; with KVM every vector may take an IRQ route, 4096 per VM, shared).
# 16 per NIC and 64 in all keeps a guest at <= 64 tap fds and <= 2*64 + 2*16 = 160 vectors.
MAX_QUEUES = 16
MAX_TOTAL_QUEUES = 64
#: PATH_MAX
MAX_PATH = 4096


class SpecError(FieldError, ValueError):
    """A spec (or the node config) is invalid.  ``str(err)`` is one line that names the field."""


def valid_name(v: object) -> bool:
    """Is ``v`` a valid instance name (the whole string; for the API's path parameter too)."""
    return isinstance(v, str) and NAME_RE.fullmatch(v) is not None and v.strip(".") != ""


def check_text(v: str) -> str:
    """Refuse control characters (newline, NUL, ESC, DEL, C1) and lone surrogates anywhere."""
    m = _BAD_CHAR_RE.search(v)
    if m:
        c = ord(m.group())
        what = "a lone surrogate" if 0xD800 <= c <= 0xDFFF else "a control character"
        raise ValueError(f"contains {what} (U+{c:04X}) at offset {m.start()}")
    return v


#: A free-text string: no control characters, no lone surrogates.
Text = Annotated[str, AfterValidator(check_text)]


def _check_tag(v: str) -> str:
    if len(v) > 256:
        raise ValueError("a tag must be at most 256 characters")
    return check_text(v)


def _check_name(v: str) -> str:
    if not valid_name(v):
        raise ValueError(
            f"invalid name {v!r}: must match {NAME_PATTERN}"
        )
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class NicSpec(_Strict):
    """One NIC.  ``mac`` is its stable identity (records and hooks key on it)."""

    mac: str | None = None
    mode: Mode
    link: str | None = Field(default=None, min_length=1, max_length=64)
    ip: str | None = None
    ip6: str | None = None
    vlan: int | list[int] | None = None
    queues: int = Field(default=1, ge=1, le=MAX_QUEUES)
    #: its PCI slot; assigned at create when absent (:meth:`InstanceSpec.with_layout`)
    pci_slot: int | None = Field(default=None, ge=FIRST_SLOT, le=LAST_SLOT)

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        if v is None:
            return v
        m = v.lower()
        if not MAC_RE.fullmatch(m):
            raise ValueError(f"invalid MAC address {v!r}")
        if int(m[:2], 16) & 1:
            raise ValueError(f"MAC address {v!r} is multicast")
        return m

    @field_validator("ip")
    @classmethod
    def _ip(cls, v: str | None) -> str | None:
        return None if v is None else _host_address(v, 4)

    @field_validator("ip6")
    @classmethod
    def _ip6(cls, v: str | None) -> str | None:
        return None if v is None else _host_address(v, 6)

    @field_validator("link")
    @classmethod
    def _link(cls, v: str | None) -> str | None:
        if v is not None and not LINK_RE.fullmatch(v):
            raise ValueError(f"invalid link {v!r}")
        return v

    @field_validator("vlan")
    @classmethod
    def _vlan(cls, v: int | list[int] | None) -> int | list[int] | None:
        ids = [v] if isinstance(v, int) else (v or [])
        for i in ids:
            if not 1 <= i <= 4094:
                raise ValueError(f"VLAN {i} out of range 1..4094")
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError("VLAN trunk list must be non-empty and without duplicates")
        return v

    @model_validator(mode="after")
    def _mode_needs(self) -> "NicSpec":
        if self.mode in BRIDGE_MODES and not self.link:
            raise ValueError(f"@link: required for mode {self.mode!r}")
        if self.mode == "routed" and not (self.ip or self.ip6):
            raise ValueError("@ip: routed mode needs ip or ip6")
        if self.mode == "routed" and self.vlan is not None:
            raise ValueError("@vlan: does not apply to routed mode")
        return self


def _check_path(v: str) -> str:
    if not v.startswith("/"):
        raise ValueError(f"{v!r} must be an absolute path")
    if len(v) > MAX_PATH:
        raise ValueError(f"path longer than {MAX_PATH} characters")
    return check_text(v)


IoLimit = Annotated[int, Field(ge=1, le=MAX_IO_LIMIT)]


class DiskSpec(_Strict):
    """One disk.  ``id`` is its identity (QEMU node and device names, records, ``disk rm``).

    The format is declared, never probed: a raw image whose content looks like a qcow2
    header stays raw.  qsup opens the image and every file of its qcow2 backing chain itself
    (supervisor/_disks.py); QEMU gets descriptors, never a path.
    """

    id: str
    path: str
    format: DiskFormat
    readonly: bool = False
    cache: DiskCache = "none"
    discard: Literal["ignore", "unmap"] = "ignore"
    serial: str | None = None
    #: the boot order (``bootindex``): the lowest boots first; None: not a boot device
    boot: int | None = Field(default=None, ge=0, le=99)
    bps: IoLimit | None = None
    bps_rd: IoLimit | None = None
    bps_wr: IoLimit | None = None
    iops: IoLimit | None = None
    iops_rd: IoLimit | None = None
    iops_wr: IoLimit | None = None
    pci_slot: int | None = Field(default=None, ge=FIRST_SLOT, le=LAST_SLOT)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not DISK_ID_RE.fullmatch(v):
            raise ValueError(f"invalid disk id {v!r}: must match {DISK_ID_RE.pattern[1:-2]}")
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return _check_path(v)

    @field_validator("serial")
    @classmethod
    def _serial(cls, v: str | None) -> str | None:
        if v is not None and not SERIAL_RE.fullmatch(v):
            raise ValueError(f"invalid serial {v!r}: 1 to 20 of A-Z a-z 0-9 _ . -")
        return v

    @model_validator(mode="after")
    def _limits(self) -> "DiskSpec":
        for kind in ("bps", "iops"):
            if getattr(self, kind) is not None and (getattr(self, f"{kind}_rd") or getattr(self, f"{kind}_wr")):
                raise ValueError(f"@{kind}: a total limit excludes {kind}_rd/{kind}_wr")
        return self

    def io_limits(self) -> dict[str, int]:
        """QEMU's ``block_set_io_throttle`` arguments (0: no limit)."""
        return {k: getattr(self, k) or 0 for k in IO_LIMITS}


def _host_address(v: str, version: int) -> str:
    """Accept ``ADDR`` or ``ADDR/32`` (``/128``); return the bare address.

    Only a routable unicast host address is accepted: see the module docstring.
    """
    if _BAD_CHAR_RE.search(v) or "%" in v or not v.isascii():
        raise ValueError(f"invalid IPv{version} address {v!r}")
    try:
        iface = ipaddress.ip_interface(v)
    except ValueError:
        raise ValueError(f"invalid IPv{version} address {v!r}") from None
    if iface.version != version:
        raise ValueError(f"invalid IPv{version} address {v!r}")
    if "/" in v and iface.network.prefixlen != iface.max_prefixlen:
        raise ValueError(
            f"{v!r}: a guest address is a host address (/{iface.max_prefixlen} or none)"
        )
    a = iface.ip
    if a == _GATEWAY4 or a == _GATEWAY6:
        why = "the guests' own gateway"
    elif a.is_unspecified or (version == 4 and a in _THIS_NETWORK):
        why = "unspecified"
    elif a.is_multicast:
        why = "multicast"
    elif version == 4 and a == _BROADCAST:
        why = "the broadcast address"
    elif a.is_loopback:
        why = "loopback"
    elif a.is_link_local:
        why = "link-local"
    elif version == 4 and a.is_reserved:
        why = "reserved (240.0.0.0/4)"
    elif isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        why = "an IPv4-mapped address"
    else:
        return str(a)
    raise ValueError(f"{v!r} is {why}, not a usable guest address")


_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_BROADCAST = ipaddress.ip_address("255.255.255.255")


#: netconf's on-link gateway addresses, which no guest may have
_GATEWAY4 = ipaddress.IPv4Address(GATEWAY4)
_GATEWAY6 = ipaddress.IPv6Address(GATEWAY6)


class InstanceSpec(_Strict):
    """A whole instance: ``kernel`` (with ``initrd``, ``append``) and/or ``disks``.

    The single ``disk`` path of old specs is still read (records of running instances, old
    spec files): it becomes ``disks = [{id = "disk0", path, format}]``, its format from its name
    as qsup always took it (``.qcow2``, else raw) -- the one place a format is not declared.
    """

    name: Annotated[str, Field(min_length=1, max_length=63)]
    memory: int = Field(ge=16, le=1024 * 1024)
    vcpus: int = Field(default=1, ge=1, le=255)
    kernel: str | None = None
    initrd: str | None = None
    append: Text | None = Field(default=None, max_length=4096)
    disks: list[DiskSpec] = []
    #: a versioned machine type (``pc-i440fx-7.2``); resolved from QEMU's ``pc`` alias at the
    #: first start and recorded, so migrations and upgrades keep the guest's machine
    machine: str | None = None
    accel: str | None = None
    nics: list[NicSpec] = []
    tags: list[Annotated[str, AfterValidator(_check_tag)]] = []
    #: what a guest kernel panic does (pvpanic); None: the node config's ``on_panic``
    on_panic: OnPanic | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v)

    @field_validator("accel")
    @classmethod
    def _accel(cls, v: str | None) -> str | None:
        if v is not None and not ACCEL_RE.fullmatch(v):
            raise ValueError(f"invalid accelerator {v!r}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _old_disk(cls, data: object) -> object:
        """The old single ``disk`` path (see the class docstring)."""
        if isinstance(data, dict) and "disk" in data:
            data = dict(data)
            path = data.pop("disk")
            if path is not None:
                if "disks" in data:
                    raise ValueError("@disk: give disks, not disk (the old single disk) as well")
                if not isinstance(path, str):
                    raise ValueError("@disk: must be a path")
                fmt = "qcow2" if path.endswith(".qcow2") else "raw"
                data["disks"] = [{"id": "disk0", "path": path, "format": fmt}]
        return data

    @field_validator("kernel", "initrd")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if "," in v:  # QEMU's -kernel takes a path as an option value
            raise ValueError(f"{v!r}: ',' is not allowed in paths")
        return _check_path(v)

    @field_validator("machine")
    @classmethod
    def _machine(cls, v: str | None) -> str | None:
        if v is not None and not MACHINE_RE.fullmatch(v):
            raise ValueError(f"invalid machine type {v!r}")
        return v

    @model_validator(mode="after")
    def _boot_and_nics(self) -> "InstanceSpec":
        if not self.kernel and not self.disks:
            raise ValueError("@kernel: a kernel or at least one disk is required")
        if (self.initrd or self.append) and not self.kernel:
            raise ValueError("@kernel: initrd and append need kernel")
        if len(self.nics) > MAX_NICS:
            raise ValueError(f"@nics: {len(self.nics)} NICs, at most {MAX_NICS}")
        if len(self.disks) > MAX_DISKS:
            raise ValueError(f"@disks: {len(self.disks)} disks, at most {MAX_DISKS}")
        ids: dict[str, int] = {}
        for i, d in enumerate(self.disks):
            if d.id in ids:
                raise ValueError(f"@disks[{i}].id: duplicate disk id {d.id!r} (also disks[{ids[d.id]}])")
            ids[d.id] = i
        slots: dict[int, str] = {}
        for where, slot in self._slots():
            if slot is not None:
                if slot in slots:
                    raise ValueError(f"@{where}.pci_slot: slot {slot} is also {slots[slot]}'s")
                slots[slot] = where
        total = 0
        for i, nic in enumerate(self.nics):
            total += nic.queues
            if total > MAX_TOTAL_QUEUES:
                raise ValueError(f"@nics[{i}].queues: {total} queues in all NICs so far, "
                                 f"at most {MAX_TOTAL_QUEUES} per instance")
        return self

    def _slots(self) -> list[tuple[str, int | None]]:
        return ([(f"nics[{i}]", n.pci_slot) for i, n in enumerate(self.nics)]
                + [(f"disks[{i}]", d.pci_slot) for i, d in enumerate(self.disks)])

    def with_layout(self) -> "InstanceSpec":
        """This spec with every NIC and disk given a PCI slot: the lowest free one, NICs first,
        in order (what QEMU chose by itself before slots were fixed, for a spec without disks).
        Recorded at create; a migration destination, a reattach and an upgrade use it as it is."""
        used = {slot for _, slot in self._slots() if slot is not None}
        free = (s for s in range(FIRST_SLOT, LAST_SLOT + 1) if s not in used)
        nics = [n if n.pci_slot is not None else n.model_copy(update={"pci_slot": next(free)}) for n in self.nics]
        disks = [d if d.pci_slot is not None else d.model_copy(update={"pci_slot": next(free)}) for d in self.disks]
        return self.model_copy(update={"nics": nics, "disks": disks})

    def free_slot(self) -> int | None:
        """The lowest PCI slot no device of this spec has (a hotplug's), or None: all taken."""
        used = {slot for _, slot in self._slots()}
        return next((s for s in range(FIRST_SLOT, LAST_SLOT + 1) if s not in used), None)

    def disk(self, disk_id: str) -> DiskSpec | None:
        return next((d for d in self.disks if d.id == disk_id), None)

    def resolved_nics(self) -> list[NicSpec]:
        """NICs with their MACs filled in and checked for duplicates.

        A NIC without ``mac`` gets a locally administered one derived from
        the instance name and its position, so it is stable across restarts
        and migrations of the same spec.
        """
        out: list[NicSpec] = []
        seen: dict[str, int] = {}
        for i, nic in enumerate(self.nics):
            mac = nic.mac or generated_mac(self.name, i)
            if mac in seen:
                raise SpecError(f"duplicate MAC {mac} (also nics[{seen[mac]}])", f"nics[{i}].mac")
            seen[mac] = i
            out.append(nic.model_copy(update={"mac": mac}))
        return out


def generated_mac(name: str, index: int) -> str:
    h = hashlib.sha256(f"{name}/{index}".encode()).digest()
    return "52:54:00:%02x:%02x:%02x" % (h[0], h[1], h[2])


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("int", "list[int]", "str") or "[" in str(part):
            continue  # pydantic union branch names, not fields
        else:
            out += ("." if out else "") + str(part)
    return out


def _message(err: ErrorDetails) -> str:
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "missing":
        msg = "required field missing"
    return msg


def parse_spec(data: object) -> InstanceSpec:
    """Validate a decoded spec (a dict); raise :class:`SpecError` on the first problem."""
    if not isinstance(data, dict):
        raise SpecError("spec must be an object")
    try:
        spec = InstanceSpec.model_validate(data)
    except ValidationError as e:
        errs = e.errors()
        # Prefer the most specific error when a union produced several.
        err = max(errs, key=lambda x: len(_loc(x["loc"])))
        field, msg = _loc(err["loc"]), _message(err)
        if msg.startswith("@"):  # a model validator naming its field: "@link: ..."
            sub, _, msg = msg[1:].partition(": ")
            field = f"{field}.{sub}" if field else sub
        raise SpecError(msg, field) from None
    spec.resolved_nics()  # duplicate MACs
    return spec


def load_spec_file(path: str | Path) -> InstanceSpec:
    """Read a JSON (``.json``) or TOML (anything else) spec file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise SpecError(f"cannot read spec {str(p)!r}: {e.strerror}") from None
    try:
        if p.suffix == ".json" or raw.lstrip()[:1] == b"{":
            data = json.loads(raw)
        else:
            data = tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise SpecError(f"{p}: not valid JSON/TOML: {e}") from None
    return parse_spec(data)
