"""The OpenAPI document says exactly what the server accepts and answers.

A client generator or a fuzzer takes the schema literally, so a spec the schema allows must be
one the server accepts and vice versa.  Here both judge the same examples: the JSON schema (by
jsonschema_rs, as a validating client would) and the server's own validation (``parse_spec``,
the pydantic models).  And the document is checked to be generated from the route list.
"""

from __future__ import annotations

import json

import jsonschema_rs
import pytest
from starlette.routing import Route

from supervisor._spec import DiskSpec, InstanceSpec, NicSpec, SpecError, parse_spec
from supervisor.api import _migration_routes, create_app, openapi
from supervisor.api._openapi import INSTANCE_VIEW
from supervisor.api._routes import ROUTES, StopOptions

DOC = openapi()


def validator(name: str):
    return jsonschema_rs.Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": DOC["components"]}, validate_formats=True)


SPEC = validator("InstanceSpec")
K = "/boot/vmlinuz"


def base(**kw) -> dict:
    return {"name": "vm1", "memory": 64, "kernel": K, **kw}


def nic(**kw) -> dict:
    return {"mode": "routed", "ip": "10.0.0.2", **kw}


def dsk(**kw) -> dict:
    return {"id": "d0", "path": "/d.img", "format": "raw", **kw}


# (id, spec, accepted?)
CASES = [
    ("minimal", base(), True),
    ("disk", {"name": "vm1", "memory": 64, "disk": "/d.img"}, True),
    ("disk-empty-append", {"name": "vm1", "memory": 64, "disk": "/d.img", "append": ""}, True),
    ("disk-append", {"name": "vm1", "memory": 64, "disk": "/d.img", "append": "x"}, False),
    ("disk-initrd", {"name": "vm1", "memory": 64, "disk": "/d.img", "initrd": "/i"}, False),
    ("kernel-and-disk", base(disk="/d.img"), True),  # the old disk is disks[0]: a kernel may go with it
    ("neither", {"name": "vm1", "memory": 64}, False),
    ("null-kernel-and-disk", {"name": "vm1", "memory": 64, "kernel": None, "disk": "/d"}, True),
    ("null-disk-kernel", base(disk=None), True),
    ("null-disk-only", {"name": "vm1", "memory": 64, "disk": None}, False),
    ("disk-and-disks", {"name": "vm1", "memory": 64, "disk": "/d", "disks": [dsk()]}, False),
    ("disk-and-empty-disks", {"name": "vm1", "memory": 64, "disk": "/d", "disks": []}, False),
    ("null-disk-and-disks", {"name": "vm1", "memory": 64, "disk": None, "disks": [dsk()]}, True),
    ("disk-not-a-string", {"name": "vm1", "memory": 64, "disk": 5}, False),
    ("disk-comma", {"name": "vm1", "memory": 64, "disk": "/a,b.img"}, True),  # never in a QEMU option
    ("disks-only", {"name": "vm1", "memory": 64, "disks": [dsk()]}, True),
    ("disks-empty", {"name": "vm1", "memory": 64, "disks": []}, False),
    ("disks-append", {"name": "vm1", "memory": 64, "disks": [dsk()], "append": "x"}, False),
    ("disks-initrd", {"name": "vm1", "memory": 64, "disks": [dsk()], "initrd": "/i"}, False),
    ("kernel-and-disks", base(initrd="/i", disks=[dsk(), dsk(id="data", path="/e.qcow2", format="qcow2")]), True),
    ("disk-all-fields", base(disks=[dsk(readonly=True, cache="writeback", discard="unmap", serial="SN-1.a_b",
                                        boot=0, bps_rd=1, bps_wr=2, iops=1000, pci_slot=31)]), True),
    ("disk-no-format", base(disks=[{"id": "d0", "path": "/d"}]), False),
    ("disk-no-id", base(disks=[{"path": "/d", "format": "raw"}]), False),
    ("disk-format-vmdk", base(disks=[dsk(format="vmdk")]), False),
    ("disk-format-probe", base(disks=[dsk(format=None)]), False),
    ("disk-id-upper", base(disks=[dsk(id="D0")]), False),
    ("disk-id-digit", base(disks=[dsk(id="0d")]), False),
    ("disk-id-17", base(disks=[dsk(id="d" * 17)]), False),
    ("disk-id-16", base(disks=[dsk(id="d" * 16)]), True),
    ("disk-id-newline", base(disks=[dsk(id="d0\n")]), False),
    ("disk-relative", base(disks=[dsk(path="d.img")]), False),
    ("disk-path-control", base(disks=[dsk(path="/d\x1b.img")]), False),
    ("disk-path-long", base(disks=[dsk(path="/" + "d" * 4096)]), False),
    ("disk-readonly-string", base(disks=[dsk(readonly="yes")]), False),
    ("disk-cache-bad", base(disks=[dsk(cache="auto")]), False),
    ("disk-discard-bad", base(disks=[dsk(discard="on")]), False),
    ("disk-serial-long", base(disks=[dsk(serial="s" * 21)]), False),
    ("disk-serial-space", base(disks=[dsk(serial="a b")]), False),
    ("disk-boot-100", base(disks=[dsk(boot=100)]), False),
    ("disk-bps-0", base(disks=[dsk(bps=0)]), False),
    ("disk-bps-huge", base(disks=[dsk(bps=10 ** 15 + 1)]), False),
    ("disk-bps-and-rd", base(disks=[dsk(bps=1, bps_rd=1)]), False),
    ("disk-iops-and-wr", base(disks=[dsk(iops=1, iops_wr=1)]), False),
    ("disk-bps-and-null-rd", base(disks=[dsk(bps=1, bps_rd=None)]), True),
    ("disk-slot-2", base(disks=[dsk(pci_slot=2)]), False),
    ("disk-slot-32", base(disks=[dsk(pci_slot=32)]), False),
    ("disk-unknown", base(disks=[dsk(colour="red")]), False),
    ("disks-8", base(disks=[dsk(id=f"d{i}") for i in range(8)]), True),
    ("disks-9", base(disks=[dsk(id=f"d{i}") for i in range(9)]), False),
    ("machine", base(machine="pc-i440fx-7.2"), True),
    ("machine-q35", base(machine="pc-q35-10.0"), True),
    ("machine-upper", base(machine="PC"), False),
    ("machine-option", base(machine="pc,accel=kvm"), False),
    ("machine-newline", base(machine="pc\n"), False),
    ("nic-slot", base(nics=[nic(pci_slot=3)]), True),
    ("nic-slot-2", base(nics=[nic(pci_slot=2)]), False),
    ("nic-slot-string", base(nics=[nic(pci_slot="3")]), False),
    ("all-fields", base(vcpus=2, initrd="/i", append="console=ttyS0", accel="tcg", tags=["a", "b c"],
                        on_panic="pause", nics=[nic(mac="52:54:00:00:00:01", ip6="2001:db8::1", link="100",
                                                    queues=2)]), True),
    ("unknown-field", base(colour=1), False),
    ("name-pattern", base(name="-x"), False),
    ("name-long", base(name="a" * 64), False),
    ("name-63", base(name="a" * 63), True),
    ("memory-low", base(memory=15), False),
    ("memory-string", base(memory="64"), False),
    ("memory-bool", base(memory=True), False),
    ("vcpus-0", base(vcpus=0), False),
    ("relative-kernel", base(kernel="vmlinuz"), False),
    ("comma-path", base(kernel="/a,b"), False),
    ("accel-upper", base(accel="TCG"), False),
    ("on-panic-bad", base(on_panic="reboot"), False),
    ("tag-long", base(tags=["x" * 257]), False),
    ("tag-256", base(tags=["x" * 256]), True),
    ("append-long", base(append="x" * 4097), False),
    ("routed-ip6-only", base(nics=[{"mode": "routed", "ip6": "fd00::5"}]), True),
    ("routed-ip-32", base(nics=[nic(ip="10.0.0.2/32")]), True),
    ("routed-ip-24", base(nics=[nic(ip="10.0.0.2/24")]), False),
    ("routed-no-ip", base(nics=[{"mode": "routed"}]), False),
    ("routed-vlan", base(nics=[nic(vlan=10)]), False),
    ("routed-ip-loopback", base(nics=[nic(ip="127.0.0.1")]), False),
    ("routed-ip-multicast", base(nics=[nic(ip="224.0.0.1")]), False),
    ("routed-ip-octet", base(nics=[nic(ip="10.0.0.256")]), False),
    ("routed-ip-leading-zero", base(nics=[nic(ip="10.0.0.01")]), False),
    ("routed-ip6-multicast", base(nics=[{"mode": "routed", "ip6": "ff02::1"}]), False),
    ("routed-ip6-loopback", base(nics=[{"mode": "routed", "ip6": "::1"}]), False),
    ("routed-ip6-full", base(nics=[{"mode": "routed", "ip6": "2001:db8:0:0:0:0:0:1/128"}]), True),
    ("routed-ip6-too-long", base(nics=[{"mode": "routed", "ip6": "2001:db8:0:0:0:0:0:1:2"}]), False),
    ("bridged", base(nics=[{"mode": "bridged", "link": "br0", "vlan": [10, 20]}]), True),
    ("bridged-no-link", base(nics=[{"mode": "bridged"}]), False),
    ("ovs-access", base(nics=[{"mode": "openvswitch", "link": "ovs0", "vlan": 4094}]), True),
    ("vlan-range", base(nics=[{"mode": "bridged", "link": "br0", "vlan": 4095}]), False),
    ("vlan-dup", base(nics=[{"mode": "bridged", "link": "br0", "vlan": [10, 10]}]), False),
    ("vlan-empty", base(nics=[{"mode": "bridged", "link": "br0", "vlan": []}]), False),
    ("link-bad", base(nics=[{"mode": "bridged", "link": "br 0"}]), False),
    ("mac-upper", base(nics=[nic(mac="52:54:00:AB:CD:EF")]), True),
    ("mac-multicast", base(nics=[nic(mac="01:00:5e:00:00:01")]), False),
    ("mac-bad", base(nics=[nic(mac="52:54:00:zz:00:01")]), False),
    ("queues-17", base(nics=[nic(queues=17)]), False),
    ("nic-unknown", base(nics=[nic(colour="red")]), False),
    ("mode-bad", base(nics=[nic(mode="nat")]), False),
    ("ip-link-local", base(nics=[nic(ip="169.254.3.4")]), False),
    ("ip-gateway", base(nics=[nic(ip="169.254.0.1")]), False),
    ("ip-169-other", base(nics=[nic(ip="169.253.0.1")]), True),
    ("ip-this-network", base(nics=[nic(ip="0.1.2.3")]), False),
    ("ip-reserved", base(nics=[nic(ip="240.0.0.1")]), False),
    ("ip-broadcast", base(nics=[nic(ip="255.255.255.255")]), False),
    ("ip-trailing-newline", base(nics=[nic(ip="10.0.0.2\n")]), False),
    ("ip6-link-local", base(nics=[{"mode": "routed", "ip6": "fe80::5"}]), False),
    ("ip6-site-local", base(nics=[{"mode": "routed", "ip6": "fec0::5"}]), True),
    ("ip6-v4-mapped", base(nics=[{"mode": "routed", "ip6": "::ffff:10.0.0.1"}]), False),
    ("ip6-scoped", base(nics=[{"mode": "routed", "ip6": "2001:db8::1%eth0"}]), False),
    ("name-trailing-newline", base(name="vm1\n"), False),
    ("append-newline", base(append="a\nb"), False),
    ("append-c1", base(append="a\x85b"), False),
    ("append-unicode", base(append="é ü"), True),
    ("kernel-control", base(kernel="/k\x07"), False),
    ("kernel-long", base(kernel="/" + "k" * 4096), False),
    ("kernel-4096", base(kernel="/" + "k" * 4095), True),
    ("tag-nul", base(tags=["a\x00"]), False),
    ("nics-16", base(nics=[nic(ip=f"10.0.0.{i + 2}") for i in range(16)]), True),
    ("nics-17", base(nics=[nic(ip=f"10.0.0.{i + 2}") for i in range(17)]), False),
]


def server_accepts(spec: dict) -> bool:
    try:
        parse_spec(spec)
    except SpecError:
        return False
    return True


@pytest.mark.parametrize("spec, accepted", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_schema_and_server_agree(spec, accepted):
    assert server_accepts(spec) is accepted, "the case table itself is wrong"
    assert SPEC.is_valid(spec) is accepted, list(SPEC.iter_errors(spec))[:3]


def test_the_things_the_schema_cannot_say_are_documented():
    """Two NICs with one MAC, two disks with one id, two devices in one PCI slot (no JSON Schema
    keyword compares items by one field), and the total of queues over all NICs (no keyword sums)."""
    dup = base(nics=[nic(mac="52:54:00:00:00:01"), nic(mac="52:54:00:00:00:01")])
    assert SPEC.is_valid(dup) and not server_accepts(dup)
    assert "MACs must differ" in DOC["components"]["schemas"]["NicSpec"]["description"]
    many = base(nics=[nic(ip=f"10.0.0.{i + 2}", queues=16) for i in range(5)])
    assert SPEC.is_valid(many) and not server_accepts(many)
    assert "64 queues in all" in DOC["components"]["schemas"]["InstanceSpecFields"]["properties"]["nics"]["description"]
    dup_id = base(disks=[dsk(), dsk(path="/e.img")])
    assert SPEC.is_valid(dup_id) and not server_accepts(dup_id)
    dup_slot = base(nics=[nic(pci_slot=5)], disks=[dsk(pci_slot=5)])
    assert SPEC.is_valid(dup_slot) and not server_accepts(dup_slot)
    said = DOC["components"]["schemas"]["DiskSpec"]["description"]
    assert "ids must differ" in said and "PCI slots between all NICs and disks" in said


@pytest.mark.parametrize("schema, model", [("InstanceSpecFields", InstanceSpec), ("NicSpec", NicSpec),
                                           ("DiskSpec", DiskSpec),
                                           ("StopOptions", StopOptions),
                                           ("MigrateBody", _migration_routes.MigrateBody),
                                           ("PrepareBody", _migration_routes.PrepareBody)])
def test_request_schemas_list_exactly_the_model_fields(schema, model):
    s = DOC["components"]["schemas"][schema]
    assert set(s["properties"]) == set(model.model_fields)
    assert s["additionalProperties"] is False
    assert set(s.get("required", [])) == {k for k, f in model.model_fields.items() if f.is_required()}


def test_prepare_body_spec_is_the_instance_spec():
    s = DOC["components"]["schemas"]["PrepareBody"]["properties"]["spec"]
    assert s == {"$ref": "#/components/schemas/InstanceSpec"}
    v = validator("PrepareBody")
    assert v.is_valid({"spec": base(), "postcopy": True})
    assert not v.is_valid({"spec": {"name": "vm1", "memory": 64}})  # no boot source


def test_boot_sources_are_a_oneof_of_complete_specs():
    schemas = DOC["components"]["schemas"]
    assert schemas["InstanceSpec"]["oneOf"] == [{"$ref": "#/components/schemas/KernelBootSpec"},
                                                {"$ref": "#/components/schemas/DiskBootSpec"},
                                                {"$ref": "#/components/schemas/OldDiskSpec"}]
    for branch in ("KernelBootSpec", "DiskBootSpec"):  # each the whole spec, for client generators
        assert schemas[branch]["allOf"][0] == {"$ref": "#/components/schemas/InstanceSpecFields"}
    # the old shape: every current field and the single disk
    old = schemas["OldDiskSpec"]
    assert set(old["properties"]) == set(InstanceSpec.model_fields) | {"disk"} and old["additionalProperties"] is False
    kernel, disks, legacy = validator("KernelBootSpec"), validator("DiskBootSpec"), validator("OldDiskSpec")
    both = base(disks=[dsk()])
    assert kernel.is_valid(base()) and kernel.is_valid(both) and not disks.is_valid(both)
    d = {"name": "vm1", "memory": 64, "disks": [dsk()]}
    assert disks.is_valid(d) and not kernel.is_valid(d) and not legacy.is_valid(d)
    d = {"name": "vm1", "memory": 64, "disk": "/d"}
    assert legacy.is_valid(d) and not kernel.is_valid(d) and not disks.is_valid(d)


def _no_untyped_arrays(node, path="$"):
    if isinstance(node, dict):
        if node.get("type") == "array" or (isinstance(node.get("type"), list) and "array" in node["type"]):
            assert "items" in node or "prefixItems" in node, f"untyped array at {path}"
        for k, v in node.items():
            _no_untyped_arrays(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _no_untyped_arrays(v, f"{path}[{i}]")


def test_every_array_is_typed_and_views_are_complete():
    _no_untyped_arrays(DOC)
    assert INSTANCE_VIEW["properties"]["nics"]["items"] == {"$ref": "#/components/schemas/NicView"}
    assert set(INSTANCE_VIEW["required"]) <= set(INSTANCE_VIEW["properties"])


def test_paths_come_from_the_route_list_one_route_per_path():
    paths = [r.path for r in ROUTES]
    assert len(paths) == len(set(paths)), "one route per path, listing all its methods"
    app = create_app(_NoNode(), _NoEvents())
    routes = [r for r in app.app.routes if isinstance(r, Route)]
    assert {r.path: set(r.methods) - {"HEAD"} for r in routes} == {
        p: {m.upper() for m in item if m != "parameters"} for p, item in DOC["paths"].items()}


def test_operations_have_unique_ids_and_document_errors():
    ids = []
    for path, item in DOC["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            ids.append(op["operationId"])
            assert "401" in op["responses"], (path, method)
            if "requestBody" in op:
                assert {"400", "413", "422"} <= set(op["responses"]), (path, method)
            if "{name}" in path:
                assert "404" in op["responses"], (path, method)
    assert len(ids) == len(set(ids))
    for op in ("create_instance", "prepare_incoming", "migrate_instance"):
        assert any(o.get("operationId") == op and "503" in o["responses"] and "409" in o["responses"]
                   for item in DOC["paths"].values() for o in item.values() if isinstance(o, dict))


def test_security_schemes():
    schemes = DOC["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert schemes["mutualTLS"]["type"] == "mutualTLS"
    assert DOC["security"] == [{}]  # the unix socket: access is the socket file's mode
    assert openapi(authenticated=True)["security"] == [{"bearer": []}, {"mutualTLS": []}]


def test_document_is_plain_json():
    assert json.loads(json.dumps(DOC)) == DOC


class _NoNode:
    cfg = None

    def list(self):
        return []


class _NoEvents:
    last_seq = 0

    def subscribe_sink(self, fn):
        pass
