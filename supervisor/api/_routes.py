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

plus the migration routes of ``_migration_routes.py``, the disk routes of ``_disk_routes.py``
(hotplug, unplug, resize, I/O limits) and the interactive console of ``_console_routes.py``.
Errors are always ``{"error": "<one line>", "field": <dotted field or null>, "code": "<slug>"}``:

    400 bad_request      malformed JSON, not an object, wrong content type, bad query parameter
    401 unauthorized     TCP listener without the right bearer token
    403 forbidden        the caller's role may not make this request (:data:`ACCESS`, _authz.py)
    404 not_found        unknown instance or route
    405 method_not_allowed (with ``Allow``)
    408 timeout          the body did not arrive within 30 s
    409 conflict         the name is taken by a live instance; a migration refused; a disk or NIC
                         change while the instance is not running or paused (migrating, stopped)
                         or is being upgraded
    413 too_large        body over 64 KiB
    422 invalid_spec     the spec (or stop options) failed validation, incl. host checks
    422 start_failed     valid spec, but QEMU/netconf failed; everything was rolled back
    422 change_failed    a live disk or NIC change QEMU or the host refused (every done step
                         undone), or an unplug the guest did not complete in time (the device stays)
                         (the NIC routes: ``_nic_routes.py``)
    500 internal         a bug: logged with its traceback
    503 unavailable      the daemon is shutting down (``app.state.stopping``)
    503 busy             over ``http_max_requests`` / ``http_max_followers`` (with ``Retry-After``)

Every error answer is a row of one table, ``_errors.ErrorKind`` (the schema's ``code`` enum too);
which exception becomes which is ``_errors.ERROR_TABLE``, and only the errors in it become 4xx.
A request with bad input changes nothing -- no instance entry, no record, no event: the spec is
parsed here, and the node checks the host facts (bridge exists, table known) before it claims
the name.  Rejected requests are not events; they are logged and counted in
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

``GET /v1/events`` is answered by the outer layer directly (``_events.EventStream``), past
Starlette's middleware, because its cost per follower per event is what fan-out latency is made
of; the route is also registered with Starlette so the routing table stays complete.
"""

from __future__ import annotations

import os

import trio
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .._node import Conflict, NotFound
from .._spec import parse_spec
from .._state import State
from . import _console_routes, _disk_routes, _migration_routes, _nic_routes, _upgrade_routes
from ._authz import Access, Authorizer
from ._errors import ErrorKind, HttpError
from ._events import EventStream
from ._metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ._openapi import NAME_PARAM, SCHEMAS, ApiRoute, Op, document, errors, json_body, links_by_name, ok, ref
from ._request import (
    MAX_SEQ,
    NDJSON,
    instance,
    node,
    query_bool,
    query_int,
    read_json,
    refuse_while_stopping,
    validate_body,
)


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
        raise HttpError("the instance spec must be a JSON object", kind=ErrorKind.BAD_REQUEST)
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
    """The fields of the live spec ``a`` that the asked-for ``b`` differs in; what qsup filled in at
    create (PCI slots, the pinned machine) counts only where ``b`` asks for it itself."""
    b = b.with_layout() if b.machine is not None or a.machine is None else \
        b.model_copy(update={"machine": a.machine}).with_layout()
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
    *_migration_routes.ROUTES,
    *_disk_routes.ROUTES,
    *_nic_routes.ROUTES,
    *_upgrade_routes.ROUTES,
    *_console_routes.ROUTES,
]

#: Who may call each operation (by operationId; supervisor/api/_authz.py has the roles).  Checked
#: on every request before Starlette routes it (``AUTHORIZER``, in ``_asgi._Outer``) and stated on
#: every operation of the OpenAPI document (``x-qsup-roles``).  A declared peer takes part only in
#: live migrations to this node, and only in the ones it prepared.
ACCESS: dict[str, Access] = {
    "get_openapi": Access.OPERATOR,
    "get_metrics": Access.OPERATOR,
    "get_health": Access.OPERATOR,
    "get_capacity": Access.OPERATOR,
    "list_instances": Access.OPERATOR,
    "create_instance": Access.OPERATOR,
    "show_instance": Access.PEER_INCOMING,  # the source follows the destination's view
    "delete_instance": Access.OPERATOR,
    "stop_instance": Access.OPERATOR,
    "list_events": Access.OPERATOR,
    "prepare_incoming": Access.PEER_PREPARE,
    "abort_incoming": Access.PEER_INCOMING,
    "recover_postcopy": Access.PEER_INCOMING,
    "confirm_release": Access.PEER_INCOMING,
    "migrate_instance": Access.OPERATOR,  # the source side: the operator's decision
    "cancel_migration": Access.OPERATOR,
    "add_disk": Access.OPERATOR,
    "remove_disk": Access.OPERATOR,
    "resize_disk": Access.OPERATOR,
    "set_disk_limits": Access.OPERATOR,
    "upgrade_instance": Access.OPERATOR,
    "add_nic": Access.OPERATOR,
    "remove_nic": Access.OPERATOR,
    "set_nic": Access.OPERATOR,
    "attach_console": Access.OPERATOR,
}
#: the table over the routes, built once (an operation without an entry fails the import)
AUTHORIZER = Authorizer(ROUTES, ACCESS)


def component_schemas() -> dict:
    return {**_nic_routes.SCHEMAS,
            **SCHEMAS, **_migration_routes.SCHEMAS, **_disk_routes.SCHEMAS, **_upgrade_routes.SCHEMAS,
            **_console_routes.SCHEMAS}


def openapi(*, authenticated: bool = False) -> dict:
    """The OpenAPI 3.1 document, generated from :data:`ROUTES`.

    ``authenticated``: the TCP listener's document (every operation needs the bearer token or a
    client certificate); otherwise the unix socket's (no credentials: access is the socket's mode).
    """
    return document(ROUTES, component_schemas(), authenticated=authenticated, access=ACCESS)
