"""The OpenAPI side of the HTTP API: routes that carry their operations, the building blocks of an
operation, the component schemas, and the document assembled from a route list.

Routes are :class:`ApiRoute`: one per path, listing all of its methods, so that a 405 carries
the right ``Allow`` header; each method carries its own OpenAPI operation, so ``/openapi.json``
is generated from the route list (:func:`document`) and cannot drift from it.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import get_args

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from netconf._types import MODES as netconf_MODES

from .._spec import (
    DISK_ID_RE,
    FIRST_SLOT,
    IO_LIMITS,
    LAST_SLOT,
    MACHINE_RE,
    MAX_BACKING_DEPTH,
    MAX_DISKS,
    MAX_IO_LIMIT,
    MAX_NICS,
    MAX_PATH,
    MAX_QUEUES,
    MAX_TOTAL_QUEUES,
    NAME_RE,
    ON_PANIC_POLICIES,
    SERIAL_RE,
    DiskCache,
    DiskFormat,
    DiskSpec,
)
from .._state import ExitCause, State
from ._authz import Access
from ._errors import ErrorKind

# -- routes that carry their OpenAPI operations ------------------------------------------------

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Op:
    """One method of one path: its handler and its OpenAPI operation object."""

    handler: Handler
    operation: dict = field(default_factory=dict)


class ApiRoute(Route):
    """One route per path, with every method it serves (so a 405's ``Allow`` is complete)."""

    def __init__(self, path: str, ops: dict[str, Op], *, parameters: list | None = None):
        self.ops = {m.upper(): op for m, op in ops.items()}
        self.parameters = parameters or []
        handlers = {m: op.handler for m, op in self.ops.items()}
        if "GET" in handlers:
            handlers.setdefault("HEAD", handlers["GET"])

        async def dispatch(request: Request) -> Response:
            return await handlers[request.method](request)

        dispatch.__name__ = "_".join(op.handler.__name__ for op in self.ops.values())
        super().__init__(path, dispatch, methods=list(self.ops))

    def path_item(self) -> dict:
        """This path's OpenAPI path item."""
        item: dict = {}
        if self.parameters:
            item["parameters"] = self.parameters
        for method, op in self.ops.items():
            item[method.lower()] = op.operation
        return item


# -- OpenAPI building blocks -------------------------------------------------------------------

def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def json_body(name: str, required: bool = True) -> dict:
    return {"required": required, "content": {"application/json": {"schema": ref(name)}}}


def ok(description: str, schema: dict, code: int = 200, media: str = "application/json",
       headers: dict | None = None, links: dict | None = None) -> dict:
    out = {"description": description, "content": {media: {"schema": schema}}}
    if headers:
        out["headers"] = headers
    if links:
        out["links"] = links
    return {str(code): out}


def links_by_name(*operation_ids: str) -> dict:
    """OpenAPI links from an answer that names an instance to the operations on it."""
    return {op: {"operationId": op, "parameters": {"name": "$response.body#/name"}} for op in operation_ids}


_ERROR_TEXT = {
    400: "Bad request: malformed JSON, not an object, wrong content type, bad query parameter",
    401: "Unauthorized: the TCP listener needs the bearer token (or a client certificate)",
    403: "Forbidden: the caller's role may not call this (a peer outside its own migrations to this node, "
         "or a certificate that is neither a declared peer nor in operators); see x-qsup-roles",
    404: "Not found: no such instance",
    409: "Conflict: the name is taken, the migration was refused, or a disk or NIC change while the instance "
         "is not running or paused (or is being upgraded)",
    413: "Request body over 64 KiB",
    422: "Invalid (the field is named), or the start failed and was rolled back (code start_failed), or "
         "QEMU or the host refused a live disk or NIC change, undone (code change_failed)",
    503: "The daemon is shutting down (code unavailable), or over http_max_requests / http_max_followers "
         "(code busy, with Retry-After)",
}


def errors(*codes: int) -> dict:
    """Error answers for an operation; 401 and 403 are on every operation (the TCP listener)."""
    return {str(c): {"description": _ERROR_TEXT[c], "content": {"application/json": {"schema": ref("Error")}}}
            for c in sorted({401, 403, *codes})}


NAME_PARAM = {"name": "name", "in": "path", "required": True, "description": "The instance name",
              "schema": {"type": "string", "pattern": NAME_RE.pattern, "maxLength": 63}}


# -- OpenAPI: the component schemas ------------------------------------------------------------
#
# Written out rather than derived from the pydantic models: a client generator or a fuzzer
# takes the schema literally, so it must say exactly what the validators accept (patterns,
# ranges, the kernel/disk choice, what each NIC mode needs).  tests/test_openapi_schema.py
# checks it against the models, example by example.

_HEX4 = "[0-9a-fA-F]{1,4}"
_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
#: a unicast MAC (the first octet's low bit clear), any case
MAC_PATTERN = "^[0-9a-fA-F][02468aceACE](:[0-9a-fA-F]{2}){5}$"
#: a routable IPv4 host address, optionally /32: not 0/8, loopback, link-local (169.254/16, which
#: holds the guests' gateway), multicast, reserved or broadcast (240/4)
IP_PATTERN = ("^(([1-9]|[1-9][0-9]|1[01][0-9]|12[0-6]|12[89]|1[3-5][0-9]|16[0-8]|1[7-9][0-9]|2[01][0-9]|22[0-3])"
              f"(\\.{_OCTET}){{3}}|169\\.(25[0-35]|2[0-4][0-9]|1[0-9]{{2}}|[1-9]?[0-9])(\\.{_OCTET}){{2}})(/32)?$")
#: a routable IPv6 host address, optionally /128, whose first group is 1000..fdff or fec0..feff: never
#: unspecified, loopback, v4-mapped, link-local (fe80::/10, which holds the guests' gateway) or multicast
IP6_PATTERN = (f"^([1-9a-eA-E][0-9a-fA-F]{{3}}|[fF][0-9a-dA-D][0-9a-fA-F]{{2}}|[fF][eE][c-fC-F][0-9a-fA-F])"
               f"((:{_HEX4}){{7}}|(:{_HEX4}){{0,5}}::({_HEX4})?)(/128)?$")
#: no control characters (C0, DEL, C1); JSON text has no lone surrogates to refuse
_TEXT = "\\x00-\\x1f\\x7f-\\x9f"
TEXT_PATTERN = f"^[^{_TEXT}]*$"
PATH_PATTERN = f"^/[^,{_TEXT}]*$"
DISK_PATH_PATTERN = f"^/[^{_TEXT}]*$"
LINK_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
ACCEL_PATTERN = "^[a-z][a-z0-9_-]{0,15}$"
STATES = [s.value for s in State]
MODES = list(netconf_MODES)  # netconf/_types.py: the one definition


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


_PATH = {"type": "string", "maxLength": MAX_PATH, "pattern": PATH_PATTERN}
#: a disk's path is never part of a QEMU option string (it is opened by qsup): ',' is allowed
_DISK_PATH = {"type": "string", "maxLength": MAX_PATH, "pattern": DISK_PATH_PATTERN}
_PCI_SLOT = {"type": "integer", "minimum": FIRST_SLOT, "maximum": LAST_SLOT}


def _pattern(rx: re.Pattern) -> str:
    """A ``re`` pattern anchored with ``\\Z`` as a JSON Schema (ECMA-262) one, where ``$`` is the end."""
    return rx.pattern[:-2] + "$" if rx.pattern.endswith("\\Z") else rx.pattern


def _vlan_id() -> dict:
    return {"type": "integer", "minimum": 1, "maximum": 4094}


NIC_SPEC = {
    "type": "object",
    "description": "One NIC. `mac` is its stable identity (generated from name and position if omitted; "
                   "MACs must differ between NICs). routed needs `ip` or `ip6` and takes no `vlan`; "
                   "bridged and openvswitch need `link` (the bridge).",
    "additionalProperties": False,
    "required": ["mode"],
    "properties": {
        "mac": {**_nullable({"type": "string", "pattern": MAC_PATTERN}), "default": None},
        "mode": {"type": "string", "enum": MODES},
        "link": {**_nullable({"type": "string", "minLength": 1, "maxLength": 64, "pattern": LINK_PATTERN}),
                 "default": None,
                 "description": "routed: the routing table; bridged/openvswitch: the bridge"},
        "ip": {**_nullable({"type": "string", "pattern": IP_PATTERN}), "default": None},
        "ip6": {**_nullable({"type": "string", "pattern": IP6_PATTERN}), "default": None},
        "vlan": {"anyOf": [_vlan_id(),
                           {"type": "array", "items": _vlan_id(), "minItems": 1, "uniqueItems": True},
                           {"type": "null"}],
                 "default": None, "description": "an access VLAN, or a list of trunk VLANs"},
        "queues": {"type": "integer", "minimum": 1, "maximum": MAX_QUEUES, "default": 1},
        "pci_slot": {**_nullable(_PCI_SLOT), "default": None,
                     "description": "its PCI slot; the lowest free one is assigned and recorded at create"},
    },
    # what each mode needs (if/then/else: client generators keep NicSpec one model)
    "if": {"properties": {"mode": {"const": "routed"}}},
    "then": {"properties": {"vlan": {"type": "null"}},
             "anyOf": [{"required": ["ip"], "properties": {"ip": {"type": "string"}}},
                       {"required": ["ip6"], "properties": {"ip6": {"type": "string"}}}]},
    "else": {"required": ["link"], "properties": {"link": {"type": "string"}}},
}

_IO_LIMIT = {**_nullable({"type": "integer", "minimum": 1, "maximum": MAX_IO_LIMIT}), "default": None}
#: a disk's I/O limits (DiskSpec; the live change's body, IoLimits, too)
IO_LIMIT_FIELDS = {k: {**_IO_LIMIT, "description": ("bytes/s" if k.startswith("bps") else "operations/s")
                       + ("" if "_" in k else f"; excludes {k}_rd/{k}_wr")} for k in IO_LIMITS}


def _is_integer(field: str) -> dict:
    return {"required": [field], "properties": {field: {"type": "integer"}}}


DISK_SPEC = {
    "type": "object",
    "description": "One disk. `id` is its identity (QEMU node and device names, records, `disk rm`); ids "
                   "must differ between disks, and PCI slots between all NICs and disks. The format is "
                   "declared, never probed. qsup opens the image and every file of its qcow2 backing "
                   "chain itself (inside image_dirs, no symlink, a regular file; a backing must name its "
                   f"format, raw or qcow2, and be a file: no json: or protocol backing; at most "
                   f"{MAX_BACKING_DEPTH} backing files) and QEMU gets descriptors, never a path.",
    "additionalProperties": False,
    "required": ["id", "path", "format"],
    "properties": {
        "id": {"type": "string", "pattern": _pattern(DISK_ID_RE)},
        "path": _DISK_PATH,
        "format": {"type": "string", "enum": list(get_args(DiskFormat))},
        "readonly": {"type": "boolean", "default": False},
        "cache": {"type": "string", "enum": list(get_args(DiskCache)), "default": "none"},
        "discard": {"type": "string", "enum": list(get_args(DiskSpec.model_fields["discard"].annotation)),
                    "default": "ignore"},
        "serial": {**_nullable({"type": "string", "pattern": _pattern(SERIAL_RE)}), "default": None},
        "boot": {**_nullable({"type": "integer", "minimum": 0, "maximum": 99}), "default": None,
                 "description": "boot order (bootindex): the lowest boots first; null: not a boot device"},
        **IO_LIMIT_FIELDS,
        "pci_slot": {**_nullable(_PCI_SLOT), "default": None,
                     "description": "its PCI slot; default: the lowest free one (at create, after the "
                                    "NICs'; at a hotplug, then), recorded"},
    },
    # a total limit excludes its read/write limits
    "not": {"anyOf": [{"allOf": [_is_integer(kind), {"anyOf": [_is_integer(f"{kind}_rd"),
                                                                  _is_integer(f"{kind}_wr")]}]}
                      for kind in ("bps", "iops")]},
}


#: the fields of a spec, by name (InstanceSpecFields holds exactly the model's; the old shape,
#: OldDiskSpec, has ``disk`` as well)
_SPEC_FIELDS = {
    "name": {"type": "string", "minLength": 1, "maxLength": 63, "pattern": NAME_RE.pattern},
    "memory": {"type": "integer", "minimum": 16, "maximum": 1024 * 1024, "description": "MiB"},
    "vcpus": {"type": "integer", "minimum": 1, "maximum": 255, "default": 1},
    "kernel": {**_nullable(_PATH), "default": None},
    "initrd": {**_nullable(_PATH), "default": None},
    "append": {**_nullable({"type": "string", "maxLength": 4096, "pattern": TEXT_PATTERN}), "default": None},
    "disks": {"type": "array", "items": ref("DiskSpec"), "maxItems": MAX_DISKS, "default": [],
              "description": f"at most {MAX_DISKS} disks, with distinct ids"},
    "machine": {**_nullable({"type": "string", "pattern": _pattern(MACHINE_RE)}), "default": None,
                "description": "a versioned machine type (pc-i440fx-7.2); default: what QEMU's pc alias "
                               "stands for, pinned and recorded at the first start"},
    "accel": {**_nullable({"type": "string", "pattern": ACCEL_PATTERN}), "default": None,
              "description": "default: the node's accel"},
    "nics": {"type": "array", "items": ref("NicSpec"), "maxItems": MAX_NICS, "default": [],
             "description": f"at most {MAX_NICS} NICs with at most {MAX_TOTAL_QUEUES} queues in all"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 256, "pattern": TEXT_PATTERN},
             "default": []},
    "on_panic": {**_nullable({"type": "string", "enum": list(ON_PANIC_POLICIES)}), "default": None,
                 "description": "what a guest kernel panic does; default: the node's on_panic"},
}

INSTANCE_SPEC_BASE = {
    "type": "object",
    "description": "The fields of an instance spec (see InstanceSpec for the boot-source rule).",
    "additionalProperties": False,
    "required": ["name", "memory"],
    "properties": _SPEC_FIELDS,
}


def _is_string(field: str, **kw) -> dict:
    return {"required": [field], "properties": {field: {"type": "string", **kw}}}


_HAS_DISKS = {"required": ["disks"], "properties": {"disks": {"minItems": 1}}}
#: initrd and append (non-empty) need a kernel
_NEEDS_KERNEL = {"if": {"anyOf": [_is_string("initrd"), _is_string("append", minLength=1)]},
                 "then": _is_string("kernel")}

#: a boot source: a kernel, or at least one disk, or both.  The branches are exclusive (a kernel
#: or none; the old ``disk`` key or not) and each is the whole spec (allOf the base, or complete),
#: so a client generator makes each a complete model
INSTANCE_SPEC = {
    "description": "An instance: a `kernel` (with optional `initrd`/`append`), at least one of `disks`, "
                   "or both. OldDiskSpec is the old shape with a single `disk`.",
    "oneOf": [ref("KernelBootSpec"), ref("DiskBootSpec"), ref("OldDiskSpec")],
}
KERNEL_BOOT_SPEC = {
    "title": "KernelBootSpec",
    # "kernel present and not null" rather than a second "type": "string" for it: a client
    # generator cannot merge the base's nullable kernel with a plain string one
    "allOf": [ref("InstanceSpecFields"),
              {"required": ["kernel"], "not": {"properties": {"kernel": {"type": "null"}}}}],
}
DISK_BOOT_SPEC = {
    "title": "DiskBootSpec",
    "allOf": [ref("InstanceSpecFields"),
              {**_HAS_DISKS, "not": {"anyOf": [_is_string("kernel"), _is_string("initrd"),
                                               _is_string("append", minLength=1)]}}],
}
#: the old shape: a single ``disk`` path, read as ``disks = [{id = "disk0", path, format}]`` (format
#: qcow2 for a ``.qcow2`` name, else raw); with a ``disk`` there may be no ``disks``
OLD_DISK_SPEC = {
    "title": "OldDiskSpec",
    "type": "object",
    "description": "Deprecated: the old single `disk`, read as disks[0] (id `disk0`, format qcow2 when the "
                   "name ends in .qcow2, else raw). Records of running instances may still hold it.",
    "additionalProperties": False,
    "required": ["name", "memory", "disk"],
    "properties": {**_SPEC_FIELDS, "disk": {**_nullable(_DISK_PATH), "default": None}},
    "allOf": [{"if": _is_string("disk"), "then": {"not": {"required": ["disks"]}}},
              {"anyOf": [_is_string("kernel"), _is_string("disk"), _HAS_DISKS]},
              _NEEDS_KERNEL],
}

NIC_VIEW = {
    "type": "object",
    "required": ["mac", "mode", "tap", "link", "ip", "ip6", "vlan", "trunks", "queues"],
    "properties": {
        "mac": {"type": "string"},
        "mode": {"type": "string", "enum": MODES},
        "tap": {"type": "string", "description": "the tap device qsup opened for this NIC"},
        "link": {"type": ["string", "null"]},
        "ip": {"type": ["string", "null"]},
        "ip6": {"type": ["string", "null"]},
        "vlan": {"type": ["integer", "null"], "description": "access VLAN"},
        "trunks": {"type": "array", "items": {"type": "integer"}},
        "queues": {"type": "integer"},
    },
}

TIMINGS = {
    "type": "object",
    "description": "Milliseconds per start step (`prepare` for a migration destination)",
    "properties": {k: {"type": "number"} for k in ("spawn", "qmp_ready", "netconf", "cont", "total", "prepare")},
    "additionalProperties": {"type": "number"},
}

EXIT_CAUSES = [c.value for c in ExitCause]

INSTANCE_VIEW = {
    "type": "object",
    "required": ["name", "state", "runstate", "generation", "pid", "memory", "vcpus", "tags", "nics",
                 "qmp_operator", "console", "created", "timings_ms", "error", "exit_cause", "panic", "migration"],
    "properties": {
        "name": {"type": "string"},
        "state": {"type": "string", "enum": STATES},
        "runstate": {"type": "string", "description": "QEMU's own run state (query-status): running, paused, "
                                                      "guest-panicked, internal-error, io-error, inmigrate, ..."},
        "generation": {"type": "string", "pattern": "^[0-9a-f]{32}$",
                       "description": "new at every start, kept across live migrations"},
        "exit_cause": {"type": ["string", "null"], "enum": [*EXIT_CAUSES, None],
                       "description": "why QEMU went (or is going) away"},
        "panic": {"anyOf": [{"type": "object", "properties": {
            "action": {"type": ["string", "null"]}, "info": {"type": ["object", "null"]}}}, {"type": "null"}],
            "description": "QEMU's GUEST_PANICKED details, while the panic stands"},
        "pid": {"type": ["integer", "null"], "description": "QEMU's pid while it runs"},
        "memory": {"type": "integer"},
        "vcpus": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "nics": {"type": "array", "items": ref("NicView")},
        "qmp_operator": {"type": "string", "description": "the operator's QMP socket"},
        "console": {"type": "string", "description": "the serial console log"},
        "created": {"type": "number", "description": "Unix time"},
        "timings_ms": ref("Timings"),
        "error": {"type": ["string", "null"]},
        "migration": {"anyOf": [ref("OutgoingMigration"), ref("IncomingMigration"), {"type": "null"}]},
    },
}

INSTANCE_LIST = {"type": "object", "required": ["instances"],
                 "properties": {"instances": {"type": "array", "items": ref("InstanceView")}}}

CAPACITY = {
    "type": "object",
    "description": "The host's capacity and what live instances (not stopped, crashed or failed) commit; "
                   "memory in MiB. Feed it to Pacemaker as node utilization (docs/CLUSTER.md).",
    "required": ["node", "memory_total_mib", "memory_available_mib", "vcpus", "committed_memory_mib",
                 "committed_vcpus", "instances"],
    "properties": {
        "node": {"type": "string"},
        "memory_total_mib": {"type": "integer", "minimum": 0, "description": "MemTotal"},
        "memory_available_mib": {"type": "integer", "minimum": 0, "description": "MemAvailable"},
        "vcpus": {"type": "integer", "minimum": 1, "description": "CPUs the daemon may run on (nproc)"},
        "committed_memory_mib": {"type": "integer", "minimum": 0, "description": "sum of live instances' memory"},
        "committed_vcpus": {"type": "integer", "minimum": 0, "description": "sum of live instances' vcpus"},
        "instances": {"type": "integer", "minimum": 0, "description": "live instances"},
    },
}

HEALTH = {
    "type": "object",
    "required": ["status", "node", "instances", "last_seq", "reattached"],
    "properties": {
        "status": {"type": "string", "enum": ["ok", "stopping"]},
        "node": {"type": "string"},
        "instances": {"type": "integer", "minimum": 0},
        "last_seq": {"type": "integer", "minimum": 0},
        "reattached": {"type": "array", "items": {"type": "string"},
                       "description": "instances found running again when the daemon started"},
    },
}

EVENT = {
    "type": "object",
    "description": "One event; `type` decides the other fields (e.g. `instance.running`, `migration.completed`)",
    "required": ["seq", "ts", "instance", "type"],
    "properties": {
        "seq": {"type": "integer", "minimum": 1, "description": "strictly increasing, persisted"},
        "ts": {"type": "number", "description": "Unix time"},
        "instance": {"type": ["string", "null"]},
        "type": {"type": "string"},
    },
}

ERROR = {
    "type": "object",
    "additionalProperties": False,
    "required": ["error", "field", "code"],
    "properties": {
        "error": {"type": "string", "description": "one line"},
        "field": {"type": ["string", "null"], "description": "the offending field, dotted (`nics[0].mac`)"},
        # every code the server sends: built from the one table (_errors.ErrorKind)
        "code": {"type": "string", "enum": sorted({kind.code for kind in ErrorKind})},
    },
}

STOP_OPTIONS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "force": {"type": "boolean", "default": False, "description": "SIGTERM instead of powerdown"},
        "timeout": {**_nullable({"type": "number", "minimum": 0, "maximum": 3600}), "default": None,
                    "description": "seconds of powerdown before quit; default: the node's powerdown_timeout"},
    },
}


#: the component schemas of the core routes (``_migration_routes.SCHEMAS`` has the migration ones)
SCHEMAS = {
    "InstanceSpec": INSTANCE_SPEC, "KernelBootSpec": KERNEL_BOOT_SPEC, "DiskBootSpec": DISK_BOOT_SPEC,
    "OldDiskSpec": OLD_DISK_SPEC, "InstanceSpecFields": INSTANCE_SPEC_BASE, "NicSpec": NIC_SPEC,
    "DiskSpec": DISK_SPEC,
    "InstanceView": INSTANCE_VIEW, "NicView": NIC_VIEW, "Timings": TIMINGS, "InstanceList": INSTANCE_LIST,
    "StopOptions": STOP_OPTIONS, "Health": HEALTH, "Capacity": CAPACITY, "Event": EVENT, "Error": ERROR,
}


# -- the document ------------------------------------------------------------------------------

_SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer",
               "description": "the node's token_file (TCP listener only; the unix socket needs none)"},
    "mutualTLS": {"type": "mutualTLS",
                  "description": "a client certificate signed by the node's tls_ca (TCP listener with TLS)"},
}


_ROLES_TEXT = ("Roles: the unix socket and the bearer token are the operator, who may call every operation. "
               "On a TLS listener a client certificate naming a declared peer (a key of the node's [peers]) is "
               "that peer, which may only take part in its own live migrations to this node; one whose name is "
               "in the node's `operators` is the operator; any other gets 403 everywhere. Each operation's "
               "`x-qsup-roles` lists who may call it.")


def _with_roles(item: dict, access: Mapping[str, Access]) -> dict:
    """A path item whose operations say who may call them (``x-qsup-roles`` and a sentence)."""
    out = {}
    for key, op in item.items():
        if isinstance(op, dict) and "operationId" in op:
            a = access[op["operationId"]]
            said = op.get("description")
            op = {**op, "description": f"{said} {a.sentence}" if said else a.sentence, "x-qsup-roles": a.roles}
        out[key] = op
    return out


def document(routes: list[ApiRoute], schemas: dict, *, authenticated: bool, access: Mapping[str, Access]) -> dict:
    """The OpenAPI 3.1 document of ``routes`` with the component ``schemas``; ``access`` (operationId
    -> :class:`Access`) says who may call each operation.

    ``authenticated``: the TCP listener's document (every operation needs the bearer token or a
    client certificate); otherwise the unix socket's (no credentials: access is the socket's mode).
    """
    return {
        "openapi": "3.1.0",
        "info": {"title": "qsup node API", "version": "1",
                 "description": "A per-node QEMU supervisor. Errors are always an Error object. " + _ROLES_TEXT},
        "security": [{"bearer": []}, {"mutualTLS": []}] if authenticated else [{}],
        "paths": {r.path: _with_roles(r.path_item(), access) for r in routes},
        "components": {"schemas": schemas, "securitySchemes": _SECURITY_SCHEMES},
    }
