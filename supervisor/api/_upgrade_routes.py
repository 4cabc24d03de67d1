"""HTTP route for QEMU upgrades in place (part of the API app's route list, ``_routes.ROUTES``).

::

    POST /v1/instances/{name}/upgrade   body (optional) {"qemu": "/abs/path"}; 200 {"upgrade", "view"}

The handover itself is supervisor/_upgrade.py's.  A bad ``qemu`` (not absolute, not an
executable, not root's alone) is 422 ``change_failed`` naming ``qemu``; an instance that is not
running or paused (migrating, being upgraded, stopped) is 409; a failed handover is 422
``change_failed`` and the guest runs on, on its old QEMU.  The operator's only.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .._spec import MAX_PATH
from ._openapi import NAME_PARAM, ApiRoute, Op, errors, json_body, ok, ref
from ._request import instance, read_json, refuse_while_stopping, validate_body


class UpgradeBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    qemu: str | None = Field(default=None, min_length=1, max_length=MAX_PATH)


async def upgrade_instance(request: Request) -> Response:
    inst = instance(request)
    data = await read_json(request, required=False)
    body = UpgradeBody() if data is None else validate_body(UpgradeBody, data, "upgrade options")
    refuse_while_stopping(request)
    result = await inst.upgrade(body.qemu)
    return JSONResponse({"upgrade": result, "view": inst.view()})


ROUTES = [
    ApiRoute("/v1/instances/{name}/upgrade", {"POST": Op(upgrade_instance, {
        "operationId": "upgrade_instance",
        "summary": "Move the guest into a new QEMU on this node, on the same taps and disks (a local "
                   "migration over a socketpair); the host network is not touched",
        "requestBody": json_body("UpgradeOptions", False),
        "responses": {**ok("Upgraded", ref("UpgradeResult")), **errors(400, 404, 409, 413, 422, 503)}})},
        parameters=[NAME_PARAM]),
]

SCHEMAS = {
    "UpgradeOptions": {
        "type": "object", "additionalProperties": False,
        "properties": {"qemu": {"anyOf": [{"type": "string", "minLength": 1, "maxLength": MAX_PATH},
                                          {"type": "null"}], "default": None,
                                "description": "the QEMU binary (absolute; root's alone); default: the "
                                               "node config's qemu as it is now"}}},
    "UpgradeResult": {
        "type": "object", "required": ["upgrade", "view"],
        "properties": {
            "upgrade": {"type": "object", "required": ["old_pid", "pid", "qemu", "mode"], "properties": {
                "old_pid": {"type": "integer"}, "pid": {"type": "integer"}, "qemu": {"type": "string"},
                "mode": {"type": "string", "enum": ["live", "stopped-copy"],
                         "description": "stopped-copy: the old QEMU's TCG loses writes between dirty "
                                        "syncs (< 9.0), so the guest is copied stopped"},
                "downtime_ms": {"type": ["number", "null"], "description": "QEMU's own figure"},
                "migration_ms": {"type": "number"}, "total_ms": {"type": "number"}}},
            "view": ref("InstanceView")}},
}
