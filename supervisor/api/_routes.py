"""The node's HTTP API (Starlette), served by the daemon on a unix socket (and optionally TCP).

Routes (all JSON unless noted; ``/openapi.json`` is generated from :data:`ROUTES`)::

    GET    /v1/health                      200 {"status": "ok", ...}   (503 while the daemon stops)
    GET    /metrics                        200 Prometheus text
    POST   /v1/instances                   201 view   (body: an instance spec; waits until running)
                                           200 view   (the same spec already runs here: create-or-start)
    GET    /v1/capacity                    200 host memory/vcpus and what live instances commit
    GET    /v1/instances                   200 {"instances": [view, ...]}
    GET    /v1/instances/{name}            200 view
    POST   /v1/instances/{name}/stop       200 final view (body optional: {"force", "timeout"})
    DELETE /v1/instances/{name}            200 final view (force-stops if still alive, then forgets)
    GET    /v1/events?since=SEQ&follow=B   200 NDJSON, one event per line

plus the migration routes of ``_migration_api.py``.  Errors are always ``{"error": "<one line>",
"field": <dotted field or null>, "code": "<slug>"}``:

    400 bad_request      malformed JSON, not an object, wrong content type, bad query parameter
    401 unauthorized     TCP listener without the right bearer token
    404 not_found        unknown instance or route
    405 method_not_allowed (with ``Allow``)
    409 conflict         the name is taken by a live instance; a migration refused
    413 too_large        body over 64 KiB
    422 invalid_spec     the spec (or stop options) failed validation, incl. host checks
    422 start_failed     valid spec, but QEMU/netconf failed; everything was rolled back
    500 internal         a bug: logged with its traceback
    503 unavailable      the daemon is shutting down (``app.state.stopping``)

Which exception becomes which answer is one table, ``_http.ERROR_TABLE``; only the errors in it
become 4xx.  A request with bad input changes nothing -- no instance entry, no record, no event:
the spec is parsed here, and the node checks the host facts (bridge exists, table known) before
it claims the name.  Rejected requests are not events; they are logged and counted in
``qsup_http_requests_total``.

``POST /v1/instances`` is create-or-start by name, so a retried or repeated create is safe
(a cluster agent's ``start``, a client whose first request timed out):

* nothing by that name, or an instance that ended (stopped, crashed, failed): a new instance
  (new ``generation``); the ended entry is replaced, as a transient libvirt domain that shut
  off is gone and Ganeti's ``gnt-instance startup`` of a down instance just starts it;
* a live instance with an identical spec (compared after parsing, so key order and defaults do
  not matter): 200 with its view, nothing changes -- once it is ``running`` or ``paused`` (a
  create never resumes a pause: that is the operator's, or ``on_panic``'s, decision); while
  its own start is still in progress the request waits for it and answers as above;
* a live instance with a different spec, one that is migrating (either way) or stopping:
  409 ``conflict`` naming ``name`` (the message lists the fields that differ).

``DELETE`` is "make it gone": a live instance is force-stopped (SIGTERM to QEMU, netconf undone)
and then dropped from the table; an instance that already ended is just dropped.  ``stop`` of
an instance that already ended answers 200 with its final view.

``GET /v1/events`` is answered by the outer layer directly (:class:`EventStream`), past
Starlette's middleware, because its cost per follower per event is what fan-out latency is made
of; the route is also registered with Starlette so the routing table stays complete.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import time
from dataclasses import dataclass

import structlog
import trio
from pydantic import BaseModel, ConfigDict, Field
from starlette.applications import Starlette
from starlette.datastructures import State as AppState
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import _migration_api
from ._http import (
    ERROR_TABLE,
    MAX_SEQ,
    NAME_PARAM,
    NDJSON,
    ApiRoute,
    HttpError,
    Op,
    error_response,
    errors,
    http_error,
    instance,
    json_body,
    links_by_name,
    node,
    ok,
    query_bool,
    query_int,
    read_json,
    ref,
    refuse_while_stopping,
    validate_body,
)
from ._metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ._metrics import Metrics
from ._node import Conflict, NotFound
from ._spec import MAX_NICS, MAX_PATH, MAX_QUEUES, MAX_TOTAL_QUEUES, parse_spec
from ._state import ExitCause, State

log = structlog.get_logger("qsup.api")

_EVENT_PAGE = 1000


class StopOptions(BaseModel):
    """Body of ``POST /v1/instances/{name}/stop`` (optional)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    force: bool = False
    timeout: float | None = Field(default=None, ge=0, le=3600, allow_inf_nan=False)


# -- handlers ----------------------------------------------------------------------------------

async def health(request: Request) -> Response:
    n = node(request)
    stopping = bool(getattr(request.app.state, "stopping", False))
    return JSONResponse({
        "status": "stopping" if stopping else "ok",
        "node": n.cfg.node_name,
        "instances": len(n.list()),
        "last_seq": request.app.state.events.last_seq,
        "reattached": request.app.state.reattached,
    }, 503 if stopping else 200)


async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=METRICS_CONTENT_TYPE)


async def openapi_json(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi)


async def list_instances(request: Request) -> Response:
    return JSONResponse({"instances": [i.view() for i in node(request).list()]})


async def show_instance(request: Request) -> Response:
    return JSONResponse(instance(request).view())


async def create_instance(request: Request) -> Response:
    data = await read_json(request)
    if not isinstance(data, dict):
        raise HttpError(400, "the instance spec must be a JSON object")
    refuse_while_stopping(request)
    spec = parse_spec(data)
    n = node(request)
    same = await _same_live_instance(n, spec)
    if same is not None:  # create-or-start: it already runs here with this spec
        return JSONResponse(same.view(), 200, headers={"location": f"/v1/instances/{same.name}"})
    # SpecError, Conflict (name taken) and StartError (rolled back) are answered by the table;
    # the node checks the host facts (bridge, table) itself, off the trio thread.
    inst = await n.start(spec)
    return JSONResponse(inst.view(), 201, headers={"location": f"/v1/instances/{inst.name}"})


def _lookup(n, name: str):
    try:
        return n.get(name)
    except NotFound:
        return None


def _spec_diff(a, b) -> list[str]:
    da, db = a.model_dump(mode="json"), b.model_dump(mode="json")
    return sorted(k for k in da.keys() | db.keys() if da.get(k) != db.get(k))


async def _same_live_instance(n, spec):
    """The live instance that already is ``spec`` (create-or-start answers it), None when
    nothing live holds the name (a new start; an ended entry is replaced), or
    :class:`Conflict`."""
    while True:
        old = _lookup(n, spec.name)
        if old is None or old.state.is_final:
            return None
        diff = _spec_diff(old.spec, spec)
        if diff:
            raise Conflict(f"instance {spec.name!r} already exists ({old.state.value}) with a different "
                           f"spec ({', '.join(diff)} differ)")
        incoming = (old.view().get("migration") or {}).get("direction") == "in"
        if old.state == State.STARTING and not incoming:
            # its own start is in progress (a concurrent create): answer as it ends
            while n.instances.get(spec.name) is old and old.state == State.STARTING:
                await trio.sleep(0.02)
            continue
        if old.state in (State.RUNNING, State.PAUSED):
            return old
        what = "the destination of a migration" if incoming else old.state.value
        raise Conflict(f"instance {spec.name!r} is {what}; ask again once it settles")


async def capacity(request: Request) -> Response:
    """What a node attribute or utilization script feeds to Pacemaker (see docs/CLUSTER.md)."""
    n = node(request)
    live = [i for i in n.list() if not i.state.is_final]
    mem = await trio.to_thread.run_sync(_meminfo)
    return JSONResponse({
        "node": n.cfg.node_name,
        "memory_total_mib": mem.get("MemTotal", 0) // 1024,
        "memory_available_mib": mem.get("MemAvailable", 0) // 1024,
        "vcpus": len(os.sched_getaffinity(0)),
        "committed_memory_mib": sum(i.spec.memory for i in live),
        "committed_vcpus": sum(i.spec.vcpus for i in live),
        "instances": len(live),
    })


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0])
    return out


async def stop_instance(request: Request) -> Response:
    inst = instance(request)
    data = await read_json(request, required=False)
    opts = StopOptions() if data is None else validate_body(StopOptions, data, "stop options")
    await node(request).stop(inst.name, force=opts.force, timeout=opts.timeout)
    return JSONResponse(inst.view())


async def delete_instance(request: Request) -> Response:
    inst = instance(request)
    n = node(request)
    if not inst.state.is_final:
        await n.stop(inst.name, force=True)
    if n.instances.get(inst.name) is inst:
        n.forget(inst.name)  # Conflict (it came back to life?) -> 409 through the table
    return JSONResponse(inst.view())


async def events(request: Request) -> Response:
    since = query_int(request, "since", 0)
    follow = query_bool(request, "follow", False)
    return EventStream(request.app.state, since, follow)


class _LineCache:
    """Encoded NDJSON lines by seq, shared by every reader of one app.

    A live event goes to every follower; encoding it once instead of once per follower matters
    at 50 followers.  Safe because an event never changes once it has a seq.
    """

    def __init__(self, size: int = 8192):
        self._lines: dict[int, bytes] = {}
        self._size = size

    def line(self, ev: dict) -> bytes:
        seq = ev["seq"]
        b = self._lines.get(seq)
        if b is None:
            b = (json.dumps(ev, separators=(",", ":")) + "\n").encode()
            if len(self._lines) >= self._size:
                for k in list(self._lines)[: self._size // 4]:
                    del self._lines[k]
            self._lines[seq] = b
        return b


class EventStream(Response):
    """``GET /v1/events`` as a raw ASGI response: NDJSON, batched, ends when the client leaves.

    A :class:`Response` so that it is what a route handler returns; Starlette only calls it (as
    an ASGI app), and :meth:`__call__` does all of it: ``Response.__init__`` is not run.

    Why not Starlette's StreamingResponse: every ``send`` through the server costs ~60-90 us, and
    one event goes to every follower, so the number of sends per event is what fan-out latency is
    made of.  Here a follower drains everything that is already emitted (a burst: a QMP event
    and the state change it causes are emitted back to back) into *one* send: while the event it
    just got is older than ``EventLog.last_seq``, the next one is available and
    :meth:`EventLog.follow` hands it over without blocking, so batching never waits.

    The follower ends when the client disconnects (``http.disconnect`` cancels it), when the
    event log closes, or when the daemon shuts down (the server cancels it).
    """

    def __init__(self, state, since: int, follow: bool):
        self.log = state.events
        self.metrics: Metrics = state.metrics
        self.lines: _LineCache = state.lines
        self.since = since
        self.follow = follow

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", NDJSON.encode()), (b"cache-control", b"no-store")]})
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._until_disconnect, receive, nursery.cancel_scope)
                if self.follow:
                    await self._live(send)
                else:
                    await self._backlog(send)
                nursery.cancel_scope.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away mid-send

    @staticmethod
    async def _until_disconnect(receive, cancel_scope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                cancel_scope.cancel()
                return

    async def _backlog(self, send) -> None:
        cursor = self.since
        while True:
            batch = self.log.since(cursor, _EVENT_PAGE)
            if not batch:
                return
            cursor = batch[-1]["seq"]
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"".join(self.lines.line(ev) for ev in batch)})

    async def _live(self, send) -> None:
        self.metrics.followers += 1
        chunk: list[bytes] = []
        try:
            async with contextlib.aclosing(self.log.follow(self.since, follow=True)) as stream:
                async for ev in stream:
                    chunk.append(self.lines.line(ev))
                    # More already emitted?  Then follow() yields it without blocking: keep going,
                    # so a burst becomes one send.  Otherwise send now -- never wait to batch.
                    if ev["seq"] < self.log.last_seq and len(chunk) < _EVENT_PAGE:
                        continue
                    body, chunk = b"".join(chunk), []
                    await send({"type": "http.response.body", "body": body, "more_body": True})
        finally:
            self.metrics.followers -= 1



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
LINK_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
ACCEL_PATTERN = "^[a-z][a-z0-9_-]{0,15}$"
STATES = [s.value for s in State]
MODES = ["routed", "bridged", "openvswitch"]


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


_PATH = {"type": "string", "maxLength": MAX_PATH, "pattern": PATH_PATTERN}


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
    },
    # what each mode needs (if/then/else: client generators keep NicSpec one model)
    "if": {"properties": {"mode": {"const": "routed"}}},
    "then": {"properties": {"vlan": {"type": "null"}},
             "anyOf": [{"required": ["ip"], "properties": {"ip": {"type": "string"}}},
                       {"required": ["ip6"], "properties": {"ip6": {"type": "string"}}}]},
    "else": {"required": ["link"], "properties": {"link": {"type": "string"}}},
}

INSTANCE_SPEC_BASE = {
    "type": "object",
    "description": "The fields of an instance spec (see InstanceSpec for the boot-source rule).",
    "additionalProperties": False,
    "required": ["name", "memory"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 63, "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"},
        "memory": {"type": "integer", "minimum": 16, "maximum": 1024 * 1024, "description": "MiB"},
        "vcpus": {"type": "integer", "minimum": 1, "maximum": 255, "default": 1},
        "kernel": {**_nullable(_PATH), "default": None},
        "initrd": {**_nullable(_PATH), "default": None},
        "append": {**_nullable({"type": "string", "maxLength": 4096, "pattern": TEXT_PATTERN}), "default": None},
        "disk": {**_nullable(_PATH), "default": None},
        "accel": {**_nullable({"type": "string", "pattern": ACCEL_PATTERN}), "default": None,
                  "description": "default: the node's accel"},
        "nics": {"type": "array", "items": ref("NicSpec"), "maxItems": MAX_NICS, "default": [],
                 "description": f"at most {MAX_NICS} NICs with at most {MAX_TOTAL_QUEUES} queues in all"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 256, "pattern": TEXT_PATTERN},
                 "default": []},
        "on_panic": {**_nullable({"type": "string", "enum": ["pause", "stop", "restart"]}), "default": None,
                     "description": "what a guest kernel panic does; default: the node's on_panic"},
    },
}


def _is_string(field: str, **kw) -> dict:
    return {"required": [field], "properties": {field: {"type": "string", **kw}}}


#: exactly one boot source; each branch is the whole spec (allOf the base), so a client
#: generator makes each a complete model
INSTANCE_SPEC = {
    "description": "An instance. Exactly one boot source: `kernel` (with optional `initrd`/`append`) or `disk`.",
    "oneOf": [ref("KernelBootSpec"), ref("DiskBootSpec")],
}
KERNEL_BOOT_SPEC = {
    "title": "KernelBootSpec",
    "allOf": [ref("InstanceSpecFields"),
              {"required": ["kernel"],
               "not": {"anyOf": [{"properties": {"kernel": {"type": "null"}}}, _is_string("disk")]}}],
}
DISK_BOOT_SPEC = {
    "title": "DiskBootSpec",
    "allOf": [ref("InstanceSpecFields"),
              {"required": ["disk"],
               "not": {"anyOf": [{"properties": {"disk": {"type": "null"}}}, _is_string("kernel"),
                                 _is_string("initrd"), _is_string("append", minLength=1)]}}],
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
        "code": {"type": "string", "enum": sorted({"bad_request", "unauthorized", "not_found", "method_not_allowed",
                                                   "too_large", "unavailable", "internal",
                                                   *(m.code for m in ERROR_TABLE.values())})},
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


def component_schemas() -> dict:
    return {
        "InstanceSpec": INSTANCE_SPEC, "KernelBootSpec": KERNEL_BOOT_SPEC, "DiskBootSpec": DISK_BOOT_SPEC,
        "InstanceSpecFields": INSTANCE_SPEC_BASE, "NicSpec": NIC_SPEC,
        "InstanceView": INSTANCE_VIEW, "NicView": NIC_VIEW, "Timings": TIMINGS, "InstanceList": INSTANCE_LIST,
        "StopOptions": STOP_OPTIONS, "Health": HEALTH, "Capacity": CAPACITY, "Event": EVENT, "Error": ERROR,
        **_migration_api.SCHEMAS,
    }


# -- the routes --------------------------------------------------------------------------------

_VIEW = ref("InstanceView")
_LOCATION = {"Location": {"description": "the new instance's URL", "schema": {"type": "string"}}}
_INSTANCE_LINKS = links_by_name("show_instance", "stop_instance", "delete_instance", "migrate_instance",
                                "cancel_migration")

ROUTES = [
    ApiRoute("/openapi.json", {"GET": Op(openapi_json, {
        "operationId": "get_openapi", "summary": "This document",
        "responses": {**ok("OpenAPI 3.1", {"type": "object"}), **errors()}})}),
    ApiRoute("/metrics", {"GET": Op(metrics, {
        "operationId": "get_metrics", "summary": "Prometheus metrics",
        "responses": {**ok("Prometheus text exposition 0.0.4", {"type": "string"}, media="text/plain"),
                      **errors()}})}),
    ApiRoute("/v1/health", {"GET": Op(health, {
        "operationId": "get_health", "summary": "Liveness and basic facts",
        "responses": {**ok("Serving", ref("Health")),
                      "503": {"description": "The daemon is shutting down",
                              "content": {"application/json": {"schema": ref("Health")}}},
                      **errors()}})}),
    ApiRoute("/v1/capacity", {"GET": Op(capacity, {
        "operationId": "get_capacity", "summary": "Host memory and vcpus, and what live instances commit",
        "responses": {**ok("Capacity", ref("Capacity")), **errors()}})}),
    ApiRoute("/v1/instances", {
        "GET": Op(list_instances, {
            "operationId": "list_instances", "summary": "List instances",
            "responses": {**ok("Instances, by name", ref("InstanceList")), **errors()}}),
        "POST": Op(create_instance, {
            "operationId": "create_instance",
            "summary": "Create and start an instance (create-or-start by name); returns once it runs",
            "requestBody": json_body("InstanceSpec"),
            "responses": {**ok("Already running (or paused) here with an identical spec: nothing changed",
                               _VIEW, 200, headers=_LOCATION, links=_INSTANCE_LINKS),
                          **ok("Running", _VIEW, 201, headers=_LOCATION, links=_INSTANCE_LINKS),
                          **errors(400, 409, 413, 422, 503)}}),
    }),
    ApiRoute("/v1/instances/{name}", {
        "GET": Op(show_instance, {
            "operationId": "show_instance", "summary": "One instance",
            "responses": {**ok("The instance", _VIEW), **errors(404)}}),
        "DELETE": Op(delete_instance, {
            "operationId": "delete_instance", "summary": "Force-stop if alive, then forget",
            "responses": {**ok("Final view", _VIEW), **errors(404, 409)}}),
    }, parameters=[NAME_PARAM]),
    ApiRoute("/v1/instances/{name}/stop", {"POST": Op(stop_instance, {
        "operationId": "stop_instance", "summary": "Stop: powerdown, then quit, then SIGKILL (force: SIGTERM)",
        "requestBody": json_body("StopOptions", False),
        "responses": {**ok("Final view", _VIEW), **errors(400, 404, 409, 413, 422)}})},
        parameters=[NAME_PARAM]),
    ApiRoute("/v1/events", {"GET": Op(events, {
        "operationId": "list_events", "summary": "Events as NDJSON (one Event per line); follow keeps it open",
        "parameters": [
            {"name": "since", "in": "query", "required": False, "description": "only events after this seq",
             "schema": {"type": "integer", "minimum": 0, "maximum": MAX_SEQ}},
            {"name": "follow", "in": "query", "required": False, "description": "keep streaming new events",
             "schema": {"type": "boolean"}}],
        "responses": {**ok("One Event object per line", {"type": "string", "description": "NDJSON of Event"},
                           media=NDJSON),
                      **errors(400)}})}),
    *_migration_api.ROUTES,
]

_METRICS_ROUTES = [r for r in ROUTES if r.path in ("/metrics", "/v1/health")]


# -- errors, auth, logging ---------------------------------------------------------------------

async def _known_error(request: Request, exc: Exception) -> Response:
    return http_error(exc).response()


async def _http_exception(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, HTTPException):  # registered for HTTPException only
        return await _internal(request, exc)
    msg = {404: f"no route {request.url.path[:200]}", 405: f"method {request.method[:20]} not allowed here"}
    return error_response(exc.status_code, msg.get(exc.status_code, exc.detail), None, None, exc.headers)


async def _internal(request: Request, exc: Exception) -> Response:
    # Starlette re-raises after this answer; _Outer logs the traceback.
    return error_response(500, f"internal error: {type(exc).__name__}", None, "internal")


_KNOWN_METHODS = frozenset(("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"))


@dataclass(frozen=True)
class HttpLimits:
    """Per listener: requests served at once, and live event followers (the config's ``http_max_*``)."""

    max_requests: int = 256
    max_followers: int = 64


@dataclass
class _Started:
    """A response's status and seconds to its start (0 and 0.0 until it starts)."""

    status: int = 0
    seconds: float = 0.0


class _Outer:
    """Outermost ASGI layer: bearer auth (TCP only), access log + metrics, and a last-resort 500."""

    state: AppState  # the inner app's, set by create_app / create_metrics_app

    def __init__(self, app, metrics: Metrics, token: str | None, *, events: bool = True,
                 limits: HttpLimits | None = None):
        self.app = app
        self.metrics = metrics
        self.token = token.encode() if token else None
        self.events = events  # serve GET /v1/events (the fast path)
        self.limits = limits or HttpLimits()
        self.active = 0  # requests being served now
        self.followers = 0  # of which live event streams

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        started = _Started()

        async def send_(message):
            if message["type"] == "http.response.start":
                started.status = message["status"]
                started.seconds = time.perf_counter() - t0
            await send(message)

        self.active += 1
        try:
            if self.active > self.limits.max_requests:
                await error_response(503, f"over {self.limits.max_requests} requests at once; retry", None,
                                     "busy", {"retry-after": "1"})(scope, receive, send_)
            elif self.token is not None and not self._authorized(scope):
                await error_response(401, "missing or wrong bearer token", None, "unauthorized",
                                     {"www-authenticate": "Bearer"})(scope, receive, send_)
            elif self.events and scope.get("path") == "/v1/events" and scope.get("method") == "GET":
                await self._events(scope, receive, send, send_, started, t0)
            else:
                await self.app(scope, receive, send_)
        except Exception as e:  # noqa: BLE001 -- logged; the client got (or gets) a JSON 500
            log.error("request failed", method=scope.get("method", "")[:20], path=scope.get("path", "")[:200],
                      error=repr(e), exc_info=True)
            if started.status == 0:
                await error_response(500, f"internal error: {type(e).__name__}", None, "internal")(
                    scope, receive, send_)
        finally:
            self.active -= 1
            method = scope.get("method", "")
            method = method if method in _KNOWN_METHODS else "other"
            route = scope.get("route")
            path = getattr(route, "path", None) or ("/v1/events" if self.events and scope.get("path") == "/v1/events"
                                                   else "unmatched")
            self.metrics.observe_request(method, path, started.status, started.seconds or time.perf_counter() - t0)
            if started.status >= 400 or scope.get("path", "").startswith("/v1/instances") and method != "GET":
                log.info("request", method=method, path=scope.get("path", "")[:200], status=started.status,
                         ms=round((time.perf_counter() - t0) * 1000, 2))

    async def _events(self, scope, receive, send, send_, started: _Started, t0: float) -> None:
        """``GET /v1/events`` straight to the stream, past Starlette's middleware.

        Each of the three middleware layers wraps ``send`` in another coroutine; one event goes
        out once per follower, so on this route those layers are most of the per-send cost that
        is not the server's own.  Same validation and errors as every other route.
        """
        request = Request(scope, receive)
        try:
            since = query_int(request, "since", 0)
            follow = query_bool(request, "follow", False)
        except HttpError as e:
            await e.response()(scope, receive, send_)
            return
        if follow and self.followers >= self.limits.max_followers:
            await error_response(503, f"over {self.limits.max_followers} event followers; retry", None,
                                 "busy", {"retry-after": "5"})(scope, receive, send_)
            return
        started.status = 200
        started.seconds = time.perf_counter() - t0  # a followed stream lasts: its latency is to the headers
        self.followers += follow
        try:
            await EventStream(self.app.state, since, follow)(scope, receive, send)
        finally:
            self.followers -= follow

    def _authorized(self, scope) -> bool:
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                scheme, _, cred = v.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(cred.strip(), self.token)
        return False


def _starlette(routes, node, events, metrics: Metrics, reattached, doc: dict | None) -> Starlette:
    handlers = {cls: _known_error for cls in ERROR_TABLE}
    handlers.update({HttpError: _known_error, HTTPException: _http_exception, Exception: _internal})
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.node = node
    app.state.events = events
    app.state.metrics = metrics
    app.state.reattached = list(reattached or [])
    app.state.lines = _LineCache()
    app.state.openapi = doc
    app.state.stopping = False
    return app


def _default_metrics(node, events) -> Metrics:
    metrics = Metrics()
    metrics.observe_node(node)
    metrics.watch(events)
    return metrics


def create_app(node, events, metrics: Metrics | None = None, *, token: str | None = None,
               reattached: list[str] | None = None, limits: HttpLimits | None = None):
    """The ASGI app for ``node``.  ``token`` set: every request needs ``Authorization: Bearer``.

    Set ``app.state.stopping = True`` when the daemon begins to shut down: health answers 503
    and no new instance or migration is started.
    """
    metrics = metrics or _default_metrics(node, events)
    app = _starlette(ROUTES, node, events, metrics, reattached, openapi(authenticated=token is not None))
    outer = _Outer(app, metrics, token, limits=limits)
    outer.state = app.state  # so callers can update e.g. reattached, stopping
    return outer


def create_metrics_app(node, events, metrics: Metrics | None = None, *, reattached: list[str] | None = None):
    """``/metrics`` and ``/v1/health`` only, without authentication (the ``metrics_listen`` listener)."""
    metrics = metrics or _default_metrics(node, events)
    app = _starlette(_METRICS_ROUTES, node, events, metrics, reattached, None)
    outer = _Outer(app, metrics, None, events=False)
    outer.state = app.state
    return outer


# -- OpenAPI -----------------------------------------------------------------------------------

_SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer",
               "description": "the node's token_file (TCP listener only; the unix socket needs none)"},
    "mutualTLS": {"type": "mutualTLS",
                  "description": "a client certificate signed by the node's tls_ca (TCP listener with TLS)"},
}


def openapi(*, authenticated: bool = False) -> dict:
    """The OpenAPI 3.1 document, generated from :data:`ROUTES`.

    ``authenticated``: the TCP listener's document (every operation needs the bearer token or a
    client certificate); otherwise the unix socket's (no credentials: access is the socket's mode).
    """
    return {
        "openapi": "3.1.0",
        "info": {"title": "qsup node API", "version": "1",
                 "description": "A per-node QEMU supervisor. Errors are always an Error object."},
        "security": [{"bearer": []}, {"mutualTLS": []}] if authenticated else [{}],
        "paths": {r.path: r.path_item() for r in ROUTES},
        "components": {"schemas": component_schemas(), "securitySchemes": _SECURITY_SCHEMES},
    }
