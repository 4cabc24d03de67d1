"""HTTP routes for live migration (part of the API app's route list, ``_routes.ROUTES``).

::

    POST /v1/migrations/incoming              destination: prepare; body {"spec", "postcopy"};
                                              201 {"name", "port", "tls", "uri"} (taps + L2 + qemu
                                              -incoming defer -S); the source uses only the port
    POST /v1/migrations/incoming/{name}/abort destination: tear a pending incoming migration down
    POST /v1/migrations/incoming/{name}/recover   destination: listen again for a broken post-copy
                                              stream (``migrate-recover``); {"name", "port", ...}
    POST /v1/migrations/incoming/{name}/released  destination: the source's L3 is gone (activation
                                              at ``completed`` waits for this)
    POST /v1/instances/{name}/migrate         source: body {"to", "postcopy", "max_bandwidth",
                                              "downtime_limit", "switchover"}; ``to`` names a ``[peers]`` entry;
                                              202 view (follow it with GET)
    POST /v1/instances/{name}/migrate/cancel  source: migrate_cancel

A declared peer (its client certificate) may call the four destination routes and only for itself:
prepare an incoming from itself (``source`` absent or its own name), then abort, recover and
confirm the release of the incomings it prepared (``_routes.ACCESS``, api/_authz.py); the
source routes are the operator's.

``to`` must be a key of the node config's ``[peers]``; anything else (a URL, a socket path, an
unknown name) is refused with 422 naming ``to`` before anything is contacted.  Credentials go to
declared peers only: to an ``https://`` peer the node's certificate (``tls_cert``; the peer's
certificate must be signed by ``tls_ca`` and name the peer); to a ``unix:`` peer nothing (the
socket's mode is its access control).  The bearer token never travels between nodes.
The source builds the migration URI itself from the peer's declared migration address and the
port in the prepare answer (supervisor/_migration.py, ``PrepareAnswer``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .._instance import StartError
from .._migration import MigrateOptions, Switchover, migration_refusal, parse_tcp_uri, peer_options, qemu_version
from .._node import Conflict
from .._spec import SpecError, parse_spec
from .._storage import disk_refusal
from ._authz import incoming_source, role_of
from ._errors import ErrorKind, HttpError, http_error
from ._openapi import NAME_PARAM, ApiRoute, Op, errors, json_body, links_by_name, ok, ref
from ._request import instance, node, read_json, refuse_while_stopping, validate_body


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class PrepareBody(_Body):
    spec: dict
    postcopy: bool = False
    #: the source's instance generation: the guest keeps its identity across the move
    generation: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    #: the declared peer the guest comes from, which may then drive this incoming (a peer caller:
    #: itself, the default; the operator: any declared peer, or none -- then only the operator)
    source: str | None = Field(default=None, min_length=1, max_length=63)
    #: what the source holds of each disk of the spec, in order (supervisor/_storage.py,
    #: ``DiskOffer``: id, format, virtual size, shared); required when the spec has disks
    disks: list | None = None


class MigrateBody(_Body):
    to: str = Field(min_length=1, max_length=63)  # a [peers] key
    postcopy: bool = False
    max_bandwidth: int | None = Field(default=None, ge=1)
    downtime_limit: int | None = Field(default=None, ge=1, le=2000000)
    switchover: Literal["stop", "pause"] = "stop"


async def prepare_incoming(request: Request) -> Response:
    body = validate_body(PrepareBody, await read_json(request))
    # a peer prepares from itself only (403 naming source); recorded on the incoming
    source = incoming_source(role_of(request.scope), body.source, getattr(node(request).cfg, "peers", None) or {})
    refuse_while_stopping(request)
    try:
        spec = parse_spec(body.spec)
        # the node checks the host facts itself (off the trio thread); rolled back on failure
        uri = await node(request).prepare_incoming(spec, postcopy=body.postcopy, generation=body.generation,
                                                   source=source, disks=body.disks)
    except (SpecError, StartError, Conflict) as e:  # their fields are the spec's: inside "spec"
        raise http_error(e, field_prefix="spec") from None
    _, port = parse_tcp_uri(uri)
    tls = getattr(node(request).cfg, "tls", None) is not None
    answer: dict[str, object] = {"name": spec.name, "port": port, "tls": tls, "uri": uri}
    key = getattr(getattr(node(request).get(spec.name), "migration", None), "key", None)
    if key is not None:  # this migration's stream key: to the caller that prepared it, once
        answer["psk"] = key.key
    incoming = getattr(node(request).get(spec.name), "migration", None)
    if incoming is not None and getattr(incoming, "nbd_port", None):  # local disks' targets (_storage.py)
        answer["nbd"] = {"port": incoming.nbd_port, "exports": list(incoming.local)}
    return JSONResponse(answer, 201)


async def recover_postcopy(request: Request) -> Response:
    inst = instance(request)
    port = await node(request).recover_postcopy(inst.name)  # MigrationError -> 409
    return JSONResponse({"name": inst.name, "port": port, "tls": getattr(node(request).cfg, "tls", None)
                         is not None, "uri": inst.migration.uri if inst.migration else None})


async def confirm_release(request: Request) -> Response:
    inst = instance(request)
    node(request).confirm_release(inst.name)  # MigrationError -> 409 through the table
    return JSONResponse(inst.view())


async def abort_incoming(request: Request) -> Response:
    inst = instance(request)
    await node(request).abort_incoming(inst.name)  # MigrationError -> 409 through the table
    return JSONResponse(inst.view())


async def migrate(request: Request) -> Response:
    n = node(request)
    data = await read_json(request)
    if isinstance(data, dict) and isinstance(data.get("to"), str):
        _declared_peer(n.cfg, data["to"])  # before anything else: the clearest error for a URL
    inst = instance(request)
    body = validate_body(MigrateBody, data)
    refuse_while_stopping(request)
    opts = migrate_options(n.cfg, body, qemu_pid=inst.proc.pid if getattr(inst, "proc", None) else None,
                           name=inst.name)
    if inst.state.value in ("running", "paused"):
        accel = (inst.spec.accel or n.cfg.accel).split(",")[0]
        why = migration_refusal(opts.switchover, accel, await qemu_version(inst.qmp))
        if why:
            raise HttpError(why, "accel", kind=ErrorKind.INVALID_SPEC)
    disks = disk_refusal(inst.spec, n.cfg.shared_image_dirs, postcopy=body.postcopy)
    if disks:
        raise HttpError(disks[0], disks[1], kind=ErrorKind.INVALID_SPEC)
    await n.migrate(inst.name, opts)
    return JSONResponse(inst.view(), 202)


def _declared_peer(cfg, to: str):
    peers = getattr(cfg, "peers", None) or {}
    peer = peers.get(to)
    if peer is None:
        declared = ", ".join(sorted(peers)) or "none"
        raise HttpError(f"to: {to[:80]!r} is not a declared peer (the config's [peers]: {declared[:400]})", "to",
                        kind=ErrorKind.INVALID_SPEC)
    return peer


def migrate_options(cfg, body: MigrateBody, *, qemu_pid: int | None, name: str) -> MigrateOptions:
    """The options for a migration to the declared peer ``body.to`` (422 naming ``to`` if undeclared)."""
    _declared_peer(cfg, body.to)
    return peer_options(cfg, body.to, name=name, qemu_pid=qemu_pid, postcopy=body.postcopy,
                        postcopy_recover_timeout=cfg.postcopy_recover_timeout,
                        max_bandwidth=body.max_bandwidth, downtime_limit=body.downtime_limit,
                        switchover=Switchover(body.switchover))


async def cancel(request: Request) -> Response:
    inst = instance(request)
    await node(request).cancel_migration(inst.name)
    return JSONResponse(inst.view())


_VIEW = ref("InstanceView")

ROUTES = [
    ApiRoute("/v1/migrations/incoming", {"POST": Op(prepare_incoming, {
        "operationId": "prepare_incoming",
        "summary": "Destination: prepare an incoming migration (taps, L2, qemu -incoming defer -S)",
        "requestBody": json_body("PrepareBody"),
        "responses": {**ok("Prepared: migrate to `uri`", ref("Prepared"), 201,
                           links=links_by_name("show_instance", "abort_incoming", "delete_instance")),
                      **errors(400, 409, 413, 422, 503)}})}),
    ApiRoute("/v1/migrations/incoming/{name}/abort", {"POST": Op(abort_incoming, {
        "operationId": "abort_incoming",
        "summary": "Destination: tear a pending incoming migration down (no L3 was applied)",
        "responses": {**ok("Final view", _VIEW), **errors(404, 409)}})}, parameters=[NAME_PARAM]),
    ApiRoute("/v1/migrations/incoming/{name}/recover", {"POST": Op(recover_postcopy, {
        "operationId": "recover_postcopy",
        "summary": "Destination: the post-copy stream broke (postcopy-paused); listen again (migrate-recover) "
                   "on a new port for the source's `migrate resume`",
        "responses": {**ok("Listening", ref("Prepared")), **errors(404, 409)}})},
        parameters=[NAME_PARAM]),
    ApiRoute("/v1/migrations/incoming/{name}/released", {"POST": Op(confirm_release, {
        "operationId": "confirm_release",
        "summary": "Destination: the source confirms it released the guest's L3; activation may proceed "
                   "at `completed`",
        "responses": {**ok("View", _VIEW), **errors(404, 409)}})}, parameters=[NAME_PARAM]),
    ApiRoute("/v1/instances/{name}/migrate", {"POST": Op(migrate, {
        "operationId": "migrate_instance",
        "summary": "Source: start a live migration; follow it with GET /v1/instances/{name}",
        "requestBody": json_body("MigrateBody"),
        "responses": {**ok("Migrating", _VIEW, 202), **errors(400, 404, 409, 413, 422, 503)}})},
        parameters=[NAME_PARAM]),
    ApiRoute("/v1/instances/{name}/migrate/cancel", {"POST": Op(cancel, {
        "operationId": "cancel_migration",
        "summary": "Source: cancel the migration in progress (the guest stays here)",
        "responses": {**ok("View", _VIEW), **errors(404, 409)}})}, parameters=[NAME_PARAM]),
]


_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_INT_OR_NULL = {"type": ["integer", "null"]}

#: the OpenAPI component schemas of these routes and of the migration part of the instance view
SCHEMAS = {
    "PrepareBody": {
        "type": "object", "additionalProperties": False, "required": ["spec"],
        "properties": {"spec": ref("InstanceSpec"),
                       "postcopy": {"type": "boolean", "default": False},
                       "generation": {"anyOf": [{"type": "string", "pattern": "^[0-9a-f]{32}$"}, {"type": "null"}],
                                      "default": None,
                                      "description": "the source's instance generation, kept across the move"},
                       "source": {"anyOf": [{"type": "string", "minLength": 1, "maxLength": 63}, {"type": "null"}],
                                  "default": None,
                                  "description": "the declared peer the guest comes from, which may then drive "
                                                 "this incoming; a peer may name only itself (the default for "
                                                 "a peer), the operator any declared peer (or none)"},
                       "disks": {"anyOf": [{"type": "array", "maxItems": 8, "items": {
                           "type": "object", "additionalProperties": False,
                           "required": ["id", "format", "size", "shared"],
                           "properties": {"id": {"type": "string"},
                                          "format": {"type": "string", "enum": ["raw", "qcow2"]},
                                          "size": {"type": "integer", "minimum": 1},
                                          "shared": {"type": "boolean"}}}}, {"type": "null"}],
                                 "default": None,
                                 "description": "what the source holds of each disk of the spec, in order: id, "
                                                "format, virtual size (bytes), and whether it is beneath the "
                                                "source's shared_image_dirs; required when the spec has disks"}}},
    "Prepared": {
        "type": "object", "required": ["name", "port", "tls", "uri"],
        "properties": {"name": {"type": "string"},
                       "port": {"type": "integer", "minimum": 1, "maximum": 65535,
                                "description": "the incoming port; the source connects to the peer's declared "
                                               "migration address on it"},
                       "tls": {"type": "boolean", "description": "the migration stream is QEMU TLS"},
                       "psk": {"type": "string", "pattern": "^[0-9a-f]{64}$",
                               "description": "with tls: this migration's stream key (QEMU tls-creds-psk), "
                                              "256 bits in hex; the source's QEMU uses it, nothing keeps it"},
                       "uri": {"type": "string", "description": "informational: what the destination listens on"},
                       "nbd": {"type": "object", "required": ["port", "exports"],
                               "properties": {"port": {"type": "integer", "minimum": 1, "maximum": 65535},
                                              "exports": {"type": "array", "maxItems": 8,
                                                          "items": {"type": "string"}}},
                               "description": "with local disks: the NBD server (on the peer's declared "
                                              "migration address) and its writable exports, one per local "
                                              "disk, named by its id"}}},
    "MigrateBody": {
        "type": "object", "additionalProperties": False, "required": ["to"],
        "properties": {
            "to": {"type": "string", "minLength": 1, "maxLength": 63,
                   "description": "the destination node: a key of the node config's [peers]"},
            "postcopy": {"type": "boolean", "default": False},
            "max_bandwidth": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}], "default": None,
                              "description": "bytes/s"},
            "downtime_limit": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 2000000}, {"type": "null"}],
                               "default": None, "description": "ms"},
            "switchover": {"type": "string", "enum": ["stop", "pause"], "default": "stop",
                           "description": "where the source releases the guest's L3: at the guest's STOP "
                                          "(default), or inside QEMU's pause-before-switchover"}}},
    "Activation": {
        "type": "object",
        "description": "Destination: from QEMU's `completed` (its own timestamp, `qmp_ts`) to L3 applied and "
                       "to `cont` returned, in ms",
        "required": ["qmp_ts", "event_to_l3_ms", "event_to_cont_ms"],
        "properties": {
            "qmp_ts": _NUM, "release_waited_ms": _NUM_OR_NULL, "event_to_l3_ms": _NUM, "event_to_cont_ms": _NUM,
            "received_to_l3_ms": _NUM, "received_to_cont_ms": _NUM, "netconf_ms": _NUM, "cont_ms": _NUM,
            "event_to_resumed_ms": _NUM}},
    "OutgoingMigration": {
        "type": "object",
        "required": ["direction", "to", "status", "result", "error", "postcopy", "l3_released"],
        "properties": {
            "direction": {"const": "out"},
            "to": {"type": "string"},
            "status": {"type": "string", "description": "QEMU's migration status"},
            "result": {"anyOf": [{"type": "string", "enum": ["completed", "failed", "cancelled", "postcopy-paused"]},
                                 {"type": "null"}]},
            "error": {"type": ["string", "null"]},
            "postcopy": {"type": "boolean"},
            "l3_released": {"type": "boolean"},
            "switchover": {"type": "string", "enum": ["stop", "pause"]},
            "release_confirmed": {"type": "boolean",
                                  "description": "the destination acknowledged the L3 release"},
            "transferred": {"type": "integer"}, "remaining": {"type": "integer"}, "total": {"type": "integer"},
            "mbps": _NUM,
            "downtime_ms": _INT_OR_NULL, "total_time_ms": _INT_OR_NULL, "total_ms": _NUM_OR_NULL,
            "switchover_ms": {**_NUM_OR_NULL,
                              "description": "source guest STOP to destination `completed`, QEMU's clocks"},
            "activation": {"anyOf": [ref("Activation"), {"type": "null"}]}}},
    "IncomingMigration": {
        "type": "object",
        "required": ["direction", "status", "uri", "postcopy", "activation"],
        "properties": {
            "direction": {"const": "in"},
            "status": {"type": "string"},
            "uri": {"type": ["string", "null"]},
            "postcopy": {"type": "boolean"},
            "source_released": {"type": "boolean", "description": "the source confirmed its L3 release"},
            "source": {"type": ["string", "null"],
                       "description": "the declared peer that prepared it, the only peer that may drive it "
                                      "(null: the operator's)"},
            "activation": {"anyOf": [ref("Activation"), {"type": "null"}]}}},
}
