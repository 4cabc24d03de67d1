"""The instance spec: what a user asks for, validated before anything runs.

The spec is a public contract (DESIGN.md).  It arrives as JSON or TOML from
the CLI, the HTTP API or a migration peer, and everything downstream trusts
it, so validation is strict:

* unknown fields are refused (a typo must not silently become a default);
* every error names the field, as a dotted path such as ``nics[1].mac``;
* the instance name is restricted to ``[A-Za-z0-9][A-Za-z0-9_.-]{0,62}``
  and may not be ``.``/``..``-like, so it can never escape the state or run
  directory it is joined onto.

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
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
ACCEL_RE = re.compile(r"^[a-z][a-z0-9_-]{0,15}$")


class SpecError(ValueError):
    """A spec is invalid.  ``str(err)`` is one line that names the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


def _check_name(v: str) -> str:
    if not NAME_RE.match(v) or v.strip(".") == "":
        raise ValueError(
            f"invalid name {v!r}: must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,62}}"
        )
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class NicSpec(_Strict):
    """One NIC.  ``mac`` is its stable identity (records and hooks key on it)."""

    mac: str | None = None
    mode: Literal["routed", "bridged", "openvswitch"]
    link: str | None = Field(default=None, min_length=1, max_length=64)
    ip: str | None = None
    ip6: str | None = None
    vlan: int | list[int] | None = None
    queues: int = Field(default=1, ge=1, le=16)

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        if v is None:
            return v
        m = v.lower()
        if not MAC_RE.match(m):
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
        if v is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$", v):
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
        if self.mode in ("bridged", "openvswitch") and not self.link:
            raise ValueError(f"@link: required for mode {self.mode!r}")
        if self.mode == "routed" and not (self.ip or self.ip6):
            raise ValueError("@ip: routed mode needs ip or ip6")
        if self.mode == "routed" and self.vlan is not None:
            raise ValueError("@vlan: does not apply to routed mode")
        return self


def _host_address(v: str, version: int) -> str:
    """Accept ``ADDR`` or ``ADDR/32`` (``/128``); return the bare address."""
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
    if a.is_multicast or a.is_unspecified or a.is_loopback:
        raise ValueError(f"{v!r} is not a usable unicast address")
    return str(a)


class InstanceSpec(_Strict):
    """A whole instance.  Exactly one boot source: ``kernel`` or ``disk``."""

    name: Annotated[str, Field(min_length=1, max_length=63)]
    memory: int = Field(ge=16, le=1024 * 1024)
    vcpus: int = Field(default=1, ge=1, le=255)
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = Field(default=None, max_length=4096)
    disk: str | None = None
    accel: str | None = None
    nics: list[NicSpec] = []
    tags: list[str] = []
    #: what a guest kernel panic does (pvpanic); None: the node config's ``on_panic``
    on_panic: Literal["pause", "stop", "restart"] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v)

    @field_validator("accel")
    @classmethod
    def _accel(cls, v: str | None) -> str | None:
        if v is not None and not ACCEL_RE.match(v):
            raise ValueError(f"invalid accelerator {v!r}")
        return v

    @field_validator("kernel", "initrd", "disk")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith("/"):
            raise ValueError(f"{v!r} must be an absolute path")
        if "," in v or "\x00" in v:
            raise ValueError(f"{v!r}: ',' and NUL are not allowed in paths")
        return v

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        for t in v:
            if "\x00" in t or len(t) > 256:
                raise ValueError("tags must be under 256 characters, without NUL")
        return v

    @model_validator(mode="after")
    def _boot_and_nics(self) -> "InstanceSpec":
        if bool(self.kernel) == bool(self.disk):
            raise ValueError("@kernel: exactly one of kernel or disk is required")
        if (self.initrd or self.append) and not self.kernel:
            raise ValueError("@kernel: initrd and append need kernel")
        return self

    def resolved_nics(self) -> list[NicSpec]:
        """NICs with their MACs filled in and checked for duplicates.

        A NIC without ``mac`` gets a locally administered one derived from
        the instance name and its position, so it is stable across restarts
        and migrations of the same spec.
        """
        out, seen = [], {}
        for i, nic in enumerate(self.nics):
            mac = nic.mac or generated_mac(self.name, i)
            if mac in seen:
                raise SpecError(f"nics[{i}].mac", f"duplicate MAC {mac} (also nics[{seen[mac]}])")
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


def _message(err: dict) -> str:
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
        raise SpecError("", "spec must be an object")
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
        raise SpecError(field, msg) from None
    spec.resolved_nics()  # duplicate MACs
    return spec


def load_spec_file(path: str | Path) -> InstanceSpec:
    """Read a JSON (``.json``) or TOML (anything else) spec file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise SpecError("", f"cannot read spec {str(p)!r}: {e.strerror}") from None
    try:
        if p.suffix == ".json" or raw.lstrip()[:1] == b"{":
            data = json.loads(raw)
        else:
            data = tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise SpecError("", f"{p}: not valid JSON/TOML: {e}") from None
    return parse_spec(data)
