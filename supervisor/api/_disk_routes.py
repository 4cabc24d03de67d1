"""HTTP routes for live disk changes (part of the API app's route list, ``_routes.ROUTES``).

::

    POST   /v1/instances/{name}/disks              hotplug; body: a DiskSpec; 201 {"disk", "view"}
    DELETE /v1/instances/{name}/disks/{id}         unplug (waits for the guest: DEVICE_DELETED)
    POST   /v1/instances/{name}/disks/{id}/resize  grow; body {"size": bytes or "10G"}
    PATCH  /v1/instances/{name}/disks/{id}         I/O limits; body {"bps", "iops", ...} (null: none)

The steps, their rollback and the fdsets are supervisor/_hotplug.py's.  A bad body or a refused
change (a duplicate id, no free PCI slot, an image outside the image dirs, a shrink) is 422
``invalid_spec`` naming the body's field and changes nothing; an instance that is not running or
paused (migrating, stopped, ...) is 409; QEMU refusing a step is 422 ``change_failed``, every
done step undone.  All four are the operator's.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .._hotplug import MAX_DISK_SIZE, IoLimits, parse_disk, parse_size
from .._spec import DISK_ID_RE, IO_LIMITS, MAX_IO_LIMIT
from ._errors import ErrorKind, HttpError
from ._openapi import DISK_SPEC, NAME_PARAM, ApiRoute, Op, errors, json_body, ok, ref
from ._request import instance, read_json, refuse_while_stopping, validate_body


class ResizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    size: int | str


def _disk_id(request: Request) -> str:
    disk_id = request.path_params["id"]
    if not DISK_ID_RE.fullmatch(disk_id):
        raise HttpError(f"no disk {disk_id[:40]!r} (not a valid disk id)", "id", kind=ErrorKind.NOT_FOUND)
    return disk_id


def _answer(inst, disk, status: int = 200) -> Response:
    return JSONResponse({"disk": disk, "view": inst.view()}, status)


async def add_disk(request: Request) -> Response:
    inst = instance(request)
    data = await read_json(request)
    if not isinstance(data, dict):
        raise HttpError("the disk spec must be a JSON object", kind=ErrorKind.BAD_REQUEST)
    disk = parse_disk(data)
    refuse_while_stopping(request)
    added = await inst.disk_ops.add(disk)
    return _answer(inst, added.model_dump(mode="json", exclude_none=True), 201)


async def remove_disk(request: Request) -> Response:
    inst = instance(request)
    disk_id = _disk_id(request)
    removed = await inst.disk_ops.remove(disk_id)
    return _answer(inst, removed.model_dump(mode="json", exclude_none=True))


async def resize_disk(request: Request) -> Response:
    inst = instance(request)
    disk_id = _disk_id(request)
    body = validate_body(ResizeBody, await read_json(request))
    size = parse_size(body.size)
    result = await inst.disk_ops.resize(disk_id, size)
    return _answer(inst, result)


async def set_disk_limits(request: Request) -> Response:
    inst = instance(request)
    disk_id = _disk_id(request)
    data = await read_json(request)
    if not isinstance(data, dict):
        raise HttpError("the I/O limits must be a JSON object", kind=ErrorKind.BAD_REQUEST)
    limits = parse_disk(data, IoLimits)
    new = await inst.disk_ops.set_limits(disk_id, limits)
    return _answer(inst, new.model_dump(mode="json", exclude_none=True))


DISK_ID_PARAM = {"name": "id", "in": "path", "required": True, "description": "The disk's id",
                 "schema": {"type": "string", "pattern": DISK_ID_RE.pattern[:-2] + "$"}}
_DISK_ANSWER = ref("DiskChange")
_ERRORS = errors(400, 404, 409, 413, 422)

ROUTES = [
    ApiRoute("/v1/instances/{name}/disks", {"POST": Op(add_disk, {
        "operationId": "add_disk",
        "summary": "Hotplug a disk: qsup opens its chain (the image rules), QEMU gets fds; all or nothing",
        "requestBody": json_body("DiskSpec"),
        "responses": {**ok("Added", _DISK_ANSWER, 201), **errors(400, 404, 409, 413, 422, 503)}})},
        parameters=[NAME_PARAM]),
    ApiRoute("/v1/instances/{name}/disks/{id}", {
        "DELETE": Op(remove_disk, {
            "operationId": "remove_disk",
            "summary": "Unplug a disk: device_del, then DEVICE_DELETED (unplug_timeout, else 422 and the disk "
                       "stays attached), then its nodes and fds",
            "responses": {**ok("Removed", _DISK_ANSWER), **errors(404, 409, 422)}}),
        "PATCH": Op(set_disk_limits, {
            "operationId": "set_disk_limits",
            "summary": "Change a disk's I/O limits live (block_set_io_throttle); null removes a limit",
            "requestBody": json_body("IoLimits"),
            "responses": {**ok("Changed", _DISK_ANSWER), **_ERRORS}}),
    }, parameters=[NAME_PARAM, DISK_ID_PARAM]),
    ApiRoute("/v1/instances/{name}/disks/{id}/resize", {"POST": Op(resize_disk, {
        "operationId": "resize_disk",
        "summary": "Grow a disk (block_resize); a shrink is refused",
        "requestBody": json_body("DiskResize"),
        "responses": {**ok("Resized", _DISK_ANSWER), **_ERRORS}})},
        parameters=[NAME_PARAM, DISK_ID_PARAM]),
]

_LIMIT = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_IO_LIMIT}, {"type": "null"}], "default": None}
_LIMITS = {k: {**_LIMIT, "description": ("bytes/s" if k.startswith("bps") else "operations/s")
               + ("" if "_" in k else f"; excludes {k}_rd/{k}_wr")} for k in IO_LIMITS}

SCHEMAS = {
    "DiskSpec": DISK_SPEC,  # the instance spec's (supervisor/api/_openapi.py): one definition
    "IoLimits": {"type": "object", "additionalProperties": False, "properties": dict(_LIMITS),
                 "description": "absent: unchanged; null: no limit"},
    "DiskResize": {
        "type": "object", "additionalProperties": False, "required": ["size"],
        "properties": {"size": {"anyOf": [
            {"type": "integer", "minimum": 512, "maximum": MAX_DISK_SIZE, "multipleOf": 512},
            {"type": "string", "pattern": "^\\s*[0-9]+\\s*([KMGTPkmgtp](i?[Bb])?)?\\s*$"}],
            "description": "the new virtual size: bytes, or binary units (10G = 10 GiB); a multiple of 512, "
                           "not smaller than now"}}},
    "DiskChange": {
        "type": "object", "required": ["disk", "view"],
        "properties": {"disk": {"type": "object", "description": "the disk as recorded (resize: id, size, "
                                                                 "previous)"},
                       "view": ref("InstanceView")}},
}
