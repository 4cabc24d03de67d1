"""HTTP routes for live NIC changes (part of the API app's route list, ``_routes.ROUTES``).

::

    POST   /v1/instances/{name}/nics         hotplug; body: a NicSpec; 201 {"nic", "view"}
    DELETE /v1/instances/{name}/nics/{mac}   unplug (waits for the guest: DEVICE_DELETED)
    PUT    /v1/instances/{name}/nics/{mac}   change its network live; body: the NIC's new NicSpec

The steps, their rollback and the record are supervisor/_nicplug.py's.  A bad body or a refused
change (a duplicate MAC or routed address, too many NICs or queues, no free PCI slot, a bridge or
table the host lacks, a new queue count or slot) is 422 ``invalid_spec`` naming the body's field
and changes nothing; an instance that is not running or paused (migrating, stopped, ...) or is
being upgraded is 409; QEMU or the host refusing a step is 422 ``change_failed``, every done step
undone.  All three are the operator's.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .._nicplug import parse_nic
from .._spec import MAC_RE
from ._errors import ErrorKind, HttpError
from ._openapi import NAME_PARAM, ApiRoute, Op, errors, json_body, ok, ref
from ._request import instance, node, read_json, refuse_while_stopping


def _mac(request: Request) -> str:
    mac = request.path_params["mac"].lower()
    if not MAC_RE.fullmatch(mac):
        raise HttpError(f"no NIC {mac[:40]!r} (not a MAC address)", "mac", kind=ErrorKind.NOT_FOUND)
    return mac


def _others(request: Request, inst) -> list:
    """The specs of the node's other live instances: a routed address is routed to one tap only."""
    return [i.spec for i in node(request).instances.values() if i is not inst and not i.state.is_final]


async def _body(request: Request):
    data = await read_json(request)
    if not isinstance(data, dict):
        raise HttpError("the NIC spec must be a JSON object", kind=ErrorKind.BAD_REQUEST)
    return parse_nic(data)


def _answer(inst, nic, status: int = 200) -> Response:
    return JSONResponse({"nic": nic.model_dump(mode="json", exclude_none=True), "view": inst.view()}, status)


async def add_nic(request: Request) -> Response:
    inst = instance(request)
    nic = await _body(request)
    refuse_while_stopping(request)
    added = await inst.nic_ops.add(nic, _others(request, inst))
    return _answer(inst, added, 201)


async def remove_nic(request: Request) -> Response:
    inst = instance(request)
    removed = await inst.nic_ops.remove(_mac(request))
    return _answer(inst, removed)


async def set_nic(request: Request) -> Response:
    inst = instance(request)
    mac = _mac(request)
    nic = await _body(request)
    refuse_while_stopping(request)
    changed = await inst.nic_ops.change(mac, nic, _others(request, inst))
    return _answer(inst, changed)


MAC_PARAM = {"name": "mac", "in": "path", "required": True, "description": "The NIC's MAC address (its identity)",
             "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$"}}
_ANSWER = ref("NicChange")

ROUTES = [
    ApiRoute("/v1/instances/{name}/nics", {"POST": Op(add_nic, {
        "operationId": "add_nic",
        "summary": "Hotplug a NIC: qsup opens its tap and applies L2, QEMU gets the fd (getfd, netdev_add, "
                   "device_add at a fixed PCI slot), then L3; all or nothing",
        "requestBody": json_body("NicSpec"),
        "responses": {**ok("Added", _ANSWER, 201), **errors(400, 404, 409, 413, 422, 503)}})},
        parameters=[NAME_PARAM]),
    ApiRoute("/v1/instances/{name}/nics/{mac}", {
        "DELETE": Op(remove_nic, {
            "operationId": "remove_nic",
            "summary": "Unplug a NIC: device_del, then DEVICE_DELETED (unplug_timeout, else 422 and the NIC "
                       "stays), then netdev_del and the netconf undo of that NIC only",
            "responses": {**ok("Removed", _ANSWER), **errors(404, 409, 422)}}),
        "PUT": Op(set_nic, {
            "operationId": "set_nic",
            "summary": "Change a NIC's network live (routed addresses, bridge, VLAN, OVS tag): only the steps "
                       "that differ between its old and new netconf plans are undone and applied, on the same "
                       "tap; the guest's link is bounced when L2 changed. MAC, queues and PCI slot stay",
            "requestBody": json_body("NicSpec"),
            "responses": {**ok("Changed", _ANSWER), **errors(400, 404, 409, 413, 422, 503)}}),
    }, parameters=[NAME_PARAM, MAC_PARAM]),
]

SCHEMAS = {
    "NicChange": {
        "type": "object", "required": ["nic", "view"],
        "properties": {"nic": ref("NicSpec"), "view": ref("InstanceView")}},
}
