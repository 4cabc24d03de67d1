"""HTTP routes for live migration (added to the API app by ``_api.create_app``).

::

    POST /v1/migrations/incoming              destination: prepare; body {"spec", "postcopy"};
                                              201 {"uri", "name"} (taps + L2 + qemu -incoming defer -S)
    POST /v1/migrations/incoming/{name}/abort destination: tear a pending incoming migration down
    POST /v1/instances/{name}/migrate         source: body {"to", "postcopy", "max_bandwidth",
                                              "downtime_limit"}; 202 view (follow it with GET)
    POST /v1/instances/{name}/migrate/cancel  source: migrate_cancel

The destination's token for an ``http://`` peer is the source node's own
``token_file`` (one cluster token), never part of a request.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._api import ApiError, _instance, _node, read_json, validate_body
from ._instance import StartError, build_nics, check_host
from ._migration import MigrateOptions, MigrationError
from ._node import Conflict
from ._spec import SpecError, parse_spec


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class PrepareBody(_Body):
    spec: dict
    postcopy: bool = False


class MigrateBody(_Body):
    to: str = Field(min_length=1, max_length=4096)
    postcopy: bool = False
    max_bandwidth: int | None = Field(default=None, ge=1)
    downtime_limit: int | None = Field(default=None, ge=1, le=2000000)


async def prepare_incoming(request: Request) -> Response:
    node = _node(request)
    body = validate_body(PrepareBody, await read_json(request))
    try:
        spec = parse_spec(body.spec)
        check_host(build_nics(spec))
        uri = await node.prepare_incoming(spec, postcopy=body.postcopy)
    except SpecError as e:
        raise ApiError(422, f"spec.{e}", f"spec.{e.field}" if e.field else "spec", "invalid_spec") from None
    except Conflict as e:
        raise ApiError(409, str(e), e.field, "conflict") from None
    except (StartError, Exception) as e:  # noqa: BLE001 - rolled back; the answer says why
        raise ApiError(422, f"prepare failed (rolled back): {type(e).__name__}: {e}", None,
                       "start_failed") from None
    return JSONResponse({"name": spec.name, "uri": uri}, 201)


async def _node_call(request: Request, method: str) -> Response:
    """Call ``node.<method>(name)``; a MigrationError is a 409 naming the field."""
    inst = _instance(request)
    try:
        await getattr(_node(request), method)(inst.name)
    except MigrationError as e:
        raise ApiError(409, str(e), e.field, "conflict") from None
    return JSONResponse(inst.view())


async def abort_incoming(request: Request) -> Response:
    return await _node_call(request, "abort_incoming")


async def migrate(request: Request) -> Response:
    inst = _instance(request)
    node = _node(request)
    body = validate_body(MigrateBody, await read_json(request))
    token = None
    if body.to.startswith(("http://", "https://")) and node.cfg.token_file:
        token = node.cfg.token_file.read_text().strip()
    opts = MigrateOptions(to=body.to, postcopy=body.postcopy, max_bandwidth=body.max_bandwidth,
                          downtime_limit=body.downtime_limit, token=token)
    try:
        await node.migrate(inst.name, opts)
    except MigrationError as e:
        raise ApiError(409, str(e), e.field, "conflict") from None
    return JSONResponse(inst.view(), 202)


async def cancel(request: Request) -> Response:
    return await _node_call(request, "cancel_migration")


ROUTES = [
    Route("/v1/migrations/incoming", prepare_incoming, methods=["POST"]),
    Route("/v1/migrations/incoming/{name}/abort", abort_incoming, methods=["POST"]),
    Route("/v1/instances/{name}/migrate", migrate, methods=["POST"]),
    Route("/v1/instances/{name}/migrate/cancel", cancel, methods=["POST"]),
]


def openapi_paths(view: dict, json_body, ok, err, name_param: dict) -> dict:
    """The migration routes' part of ``/openapi.json`` (merged by ``_api.openapi``)."""
    return {
        "/v1/migrations/incoming": {"post": {
            "summary": "Destination: prepare an incoming migration (taps, L2, qemu -incoming defer -S)",
            "requestBody": json_body("PrepareBody", True),
            "responses": {**ok("Prepared", {"type": "object", "required": ["name", "uri"],
                                            "properties": {"name": {"type": "string"},
                                                           "uri": {"type": "string"}}}, 201),
                          **err(400, 409, 413, 422)}}},
        "/v1/migrations/incoming/{name}/abort": {"parameters": [name_param], "post": {
            "summary": "Destination: tear a pending incoming migration down (no L3 was applied)",
            "responses": {**ok("Final view", view), **err(404, 409)}}},
        "/v1/instances/{name}/migrate": {"parameters": [name_param], "post": {
            "summary": "Source: start a live migration; follow it with GET /v1/instances/{name}",
            "requestBody": json_body("MigrateBody", True),
            "responses": {**ok("Migrating", view, 202), **err(400, 404, 409, 413, 422)}}},
        "/v1/instances/{name}/migrate/cancel": {"parameters": [name_param], "post": {
            "summary": "Source: cancel the migration in progress (the guest stays here)",
            "responses": {**ok("View", view), **err(404, 409)}}},
    }


def openapi_schemas() -> dict:
    return {"PrepareBody": PrepareBody.model_json_schema(), "MigrateBody": MigrateBody.model_json_schema()}
