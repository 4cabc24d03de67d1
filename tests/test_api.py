"""The HTTP API in-process: a real Node (tmp state/run dirs) behind the Starlette app, no root.

The core property: a request with bad input gets the documented 4xx with the field named, and
changes nothing -- the instance table, the state and run dirs and the event log are exactly as
before.  QEMU here is ``/bin/false`` (a start that passes validation then fails inside "QEMU"),
except in the happy-path test, which runs the real qemu-system-x86_64 on an empty disk when it is
installed (no root needed: no NICs, no -runas).
"""

from __future__ import annotations

import json
import os
import shutil

import httpx
import pytest
import trio

from needs import require
from supervisor._config import load_config
from supervisor._eventlog import EventLog
from supervisor._node import Node
from supervisor.api import create_app, openapi

#: a regular file that exists (the node checks that images do); "QEMU" (/bin/false) never reads it
KERNEL = os.path.realpath("/bin/true")
OK_NIC = {"mode": "routed", "ip": "10.0.0.2"}


def spec(**kw) -> dict:
    return {"name": "vm1", "memory": 64, "kernel": KERNEL, **kw}


def make_cfg(tmp_path, **kw):
    base = dict(state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"),
                socket=str(tmp_path / "qsup.sock"), hooks_dir=str(tmp_path / "no-hooks"),
                accel="tcg", qemu="/bin/false", qemu_user="", powerdown_timeout=1.0,
                image_dirs=[os.path.dirname(KERNEL), str(tmp_path)])
    base.update(kw)
    return load_config(None, **base)


def with_api(tmp_path, fn, *, token=None, **cfg_kw):
    """Run ``await fn(client, node, events)`` against a fresh node + app; returns its result."""
    cfg = make_cfg(tmp_path, **cfg_kw)

    async def main():
        events = EventLog(None)
        node = Node(cfg, events)
        try:
            async with node.running():
                app = create_app(node, events, token=token)
                transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
                async with httpx.AsyncClient(transport=transport, base_url="http://qsup") as client:
                    try:
                        return await fn(client, node, events)
                    finally:
                        await node.stop_all(timeout=1)
        finally:
            events.close()

    return trio.run(main)


def snapshot(tmp_path, node, events) -> tuple:
    def tree(p):
        return sorted(str(x.relative_to(p)) for x in p.rglob("*")) if p.exists() else []

    return ([i.view()["name"] + ":" + i.state.value for i in node.list()], events.last_seq,
            tree(tmp_path / "state" / "instances"), tree(tmp_path / "run"))


class _chunks:
    """A body without Content-Length (sent chunked): the size limit must hold while streaming."""

    def __init__(self, n):
        self.n = n

    async def __aiter__(self):
        for _ in range(self.n):
            yield b" " * 4096


JSON = {"content-type": "application/json"}

# (id, method, path, request kwargs, status, field)
BAD = [
    ("malformed-json", "POST", "/v1/instances", dict(content=b'{"name": "a",', headers=JSON), 400, None),
    ("text-plain", "POST", "/v1/instances", dict(content=json.dumps(spec()).encode(),
                                                  headers={"content-type": "text/plain"}), 400, None),
    ("no-content-type", "POST", "/v1/instances", dict(content=json.dumps(spec()).encode()), 400, None),
    ("empty-body", "POST", "/v1/instances", dict(content=b"", headers=JSON), 400, None),
    ("not-an-object", "POST", "/v1/instances", dict(json=[spec()]), 400, None),
    ("nan", "POST", "/v1/instances", dict(content=b'{"name":"a","memory":NaN,"kernel":"/k"}', headers=JSON),
     400, None),
    ("deep-nesting", "POST", "/v1/instances", dict(content=b"[" * 30000 + b"]" * 30000, headers=JSON), 400, None),
    ("not-utf8", "POST", "/v1/instances", dict(content=b'{"name":"\xff\xfe"}', headers=JSON), 400, None),
    ("oversized", "POST", "/v1/instances", dict(json=spec(tags=["x" * 200] * 400)), 413, None),
    ("oversized-chunked", "POST", "/v1/instances", dict(content=_chunks(20), headers=JSON), 413, None),
    ("unknown-field", "POST", "/v1/instances", dict(json=spec(bogus=1)), 422, "bogus"),
    ("unknown-nic-field", "POST", "/v1/instances", dict(json=spec(nics=[{**OK_NIC, "colour": "red"}])),
     422, "nics[0].colour"),
    ("memory-string", "POST", "/v1/instances", dict(json=spec(memory="64")), 422, "memory"),
    ("memory-huge", "POST", "/v1/instances", dict(json=spec(memory=10**30)), 422, "memory"),
    ("vcpus-float", "POST", "/v1/instances", dict(json=spec(vcpus=1.5)), 422, "vcpus"),
    ("name-dotdot-slash", "POST", "/v1/instances", dict(json=spec(name="../x")), 422, "name"),
    ("name-dots", "POST", "/v1/instances", dict(json=spec(name="..")), 422, "name"),
    ("name-empty", "POST", "/v1/instances", dict(json=spec(name="")), 422, "name"),
    ("name-missing", "POST", "/v1/instances", dict(json={"memory": 64, "kernel": KERNEL}), 422, "name"),
    ("bad-mac", "POST", "/v1/instances", dict(json=spec(nics=[{**OK_NIC, "mac": "52:54:00:zz:00:01"}])),
     422, "nics[0].mac"),
    ("multicast-mac", "POST", "/v1/instances", dict(json=spec(nics=[{**OK_NIC, "mac": "01:00:5e:00:00:01"}])),
     422, "nics[0].mac"),
    ("duplicate-mac", "POST", "/v1/instances", dict(json=spec(nics=[{**OK_NIC, "mac": "52:54:00:00:00:01"},
                                                                    {**OK_NIC, "mac": "52:54:00:00:00:01"}])),
     422, "nics[1].mac"),
    ("bad-ip", "POST", "/v1/instances", dict(json=spec(nics=[{"mode": "routed", "ip": "10.0.0.999"}])),
     422, "nics[0].ip"),
    ("ip6-as-ip", "POST", "/v1/instances", dict(json=spec(nics=[{"mode": "routed", "ip": "fd00::1"}])),
     422, "nics[0].ip"),
    ("ip-with-prefix", "POST", "/v1/instances", dict(json=spec(nics=[{"mode": "routed", "ip": "10.0.0.0/24"}])),
     422, "nics[0].ip"),
    ("routed-no-ip", "POST", "/v1/instances", dict(json=spec(nics=[{"mode": "routed"}])), 422, "nics[0].ip"),
    ("bad-mode", "POST", "/v1/instances", dict(json=spec(nics=[{"mode": "nat", "ip": "10.0.0.2"}])),
     422, "nics[0].mode"),
    ("vlan-range", "POST", "/v1/instances", dict(json=spec(nics=[{"mode": "bridged", "link": "br0", "vlan": 5000}])),
     422, "nics[0].vlan"),
    ("vlan-routed", "POST", "/v1/instances", dict(json=spec(nics=[{**OK_NIC, "vlan": 10}])), 422, "nics[0].vlan"),
    ("bridged-no-link", "POST", "/v1/instances", dict(json=spec(nics=[{"mode": "bridged"}])), 422, "nics[0].link"),
    ("bridge-missing-on-host", "POST", "/v1/instances",
     dict(json=spec(nics=[{"mode": "bridged", "link": "qsupnobr0"}])), 422, "nics[0].link"),
    ("no-boot-source", "POST", "/v1/instances", dict(json=spec(kernel=None)), 422, "kernel"),
    # kernel and a disk are fine now; the disk must open (checked before anything changes)
    ("disk-missing", "POST", "/v1/instances", dict(json=spec(disk="/nonexistent/d.img")), 422, "disks[0].path"),
    ("disk-no-format", "POST", "/v1/instances", dict(json=spec(disks=[{"id": "d0", "path": "/d.img"}])), 422,
     "disks[0].format"),
    ("disk-dup-id", "POST", "/v1/instances",
     dict(json=spec(disks=[{"id": "d0", "path": "/a.img", "format": "raw"},
                           {"id": "d0", "path": "/b.img", "format": "raw"}])), 422, "disks[1].id"),
    ("relative-kernel", "POST", "/v1/instances", dict(json=spec(kernel="vmlinuz")), 422, "kernel"),
    ("tags-not-list", "POST", "/v1/instances", dict(json=spec(tags="a,b")), 422, "tags"),
    ("show-unknown", "GET", "/v1/instances/nope", {}, 404, "name"),
    ("show-bad-name", "GET", "/v1/instances/..%2Fx", {}, 404, None),
    ("show-dotdot", "GET", "/v1/instances/...", {}, 404, "name"),
    ("stop-unknown", "POST", "/v1/instances/nope/stop", dict(json={"force": True}), 404, "name"),
    ("delete-unknown", "DELETE", "/v1/instances/nope", {}, 404, "name"),
    ("put-collection", "PUT", "/v1/instances", dict(json=spec()), 405, None),
    ("delete-collection", "DELETE", "/v1/instances", {}, 405, None),
    ("post-health", "POST", "/v1/health", {}, 405, None),
    ("unknown-route", "GET", "/v2/instances", {}, 404, None),
    ("since-negative", "GET", "/v1/events?since=-1", {}, 400, "since"),
    ("since-text", "GET", "/v1/events?since=abc", {}, 400, "since"),
    ("since-huge", "GET", "/v1/events?since=99999999999999999999", {}, 400, "since"),
    ("follow-maybe", "GET", "/v1/events?follow=maybe", {}, 400, "follow"),
]


@pytest.mark.parametrize("method, path, kw, status, field", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request_is_rejected_and_changes_nothing(tmp_path, method, path, kw, status, field):
    async def go(client, node, events):
        events.emit("test.marker")
        before = snapshot(tmp_path, node, events)
        r = await client.request(method, path, **kw)
        after = snapshot(tmp_path, node, events)
        return r, before, after

    r, before, after = with_api(tmp_path, go)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert set(doc) == {"error", "field", "code"}
    assert doc["field"] == field, doc
    assert "\n" not in doc["error"] and doc["error"]
    assert after == before


def test_the_table_is_big_enough():
    assert len(BAD) >= 20


def test_start_that_fails_in_qemu_is_422_rolled_back(tmp_path):
    async def go(client, node, events):
        seq0 = events.last_seq
        r = await client.post("/v1/instances", json=spec(name="dies"))
        lst = await client.get("/v1/instances")
        return r, lst, [e["type"] for e in events.since(seq0)]

    r, lst, types = with_api(tmp_path, go)
    assert r.status_code == 422
    doc = r.json()
    assert doc["code"] == "start_failed" and "rolled back" in doc["error"] and "qemu exited" in doc["error"]
    assert lst.json() == {"instances": []}
    assert types[0] == "instance.starting" and types[-1] == "instance.failed"
    assert not (tmp_path / "state" / "instances" / "dies").exists()
    assert not (tmp_path / "run" / "dies").exists()


def test_health_metrics_openapi(tmp_path):
    async def go(client, node, events):
        events.emit("instance.started", instance="x", timings_ms={"total": 120.0})
        return [await client.get(p) for p in ("/v1/health", "/metrics", "/openapi.json", "/metrics")]

    health, metrics, schema, metrics2 = with_api(tmp_path, go)
    assert health.json()["status"] == "ok"
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'qsup_instances{state="running"} 0.0' in text
    assert 'qsup_events_emitted_total{family="instance.started"} 1.0' in text
    assert "qsup_instance_start_seconds_count 1.0" in text
    assert 'qsup_http_requests_total{method="GET",route="/v1/health",status="200"}' in metrics2.text
    assert 'qsup_http_request_duration_seconds_count{method="GET",route="/metrics"} 1.0' in metrics2.text
    assert "_created" not in metrics2.text
    doc = schema.json()
    assert doc == json.loads(json.dumps(openapi()))
    assert {"/v1/instances", "/v1/instances/{name}", "/v1/instances/{name}/stop", "/v1/events",
            "/v1/health", "/metrics", "/v1/capacity"} <= set(doc["paths"])
    assert "InstanceSpec" in doc["components"]["schemas"] and "NicSpec" in doc["components"]["schemas"]
    assert doc["components"]["schemas"]["InstanceSpecFields"]["additionalProperties"] is False


def test_events_ndjson_since(tmp_path):
    async def go(client, node, events):
        for i in range(5):
            events.emit("test.n", i=i)
        all_ = await client.get("/v1/events")
        tail = await client.get("/v1/events?since=3&follow=false")
        return all_, tail

    all_, tail = with_api(tmp_path, go)
    assert all_.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(l) for l in all_.text.splitlines()]
    assert [e["seq"] for e in lines] == [1, 2, 3, 4, 5]
    assert [e["i"] for e in lines] == [0, 1, 2, 3, 4]
    assert [json.loads(l)["seq"] for l in tail.text.splitlines()] == [4, 5]


def test_tcp_app_needs_the_bearer_token(tmp_path):
    token = "s3cret-token-0123456789"

    async def go(client, node, events):
        out = [await client.get("/v1/health"),
               await client.get("/v1/health", headers={"authorization": "Bearer wrong"}),
               await client.get("/v1/health", headers={"authorization": f"Bearer {token}"}),
               await client.post("/v1/instances", json=spec(name="../x"))]
        return out

    none, wrong, right, bad = with_api(tmp_path, go, token=token)
    assert none.status_code == 401 and none.json()["code"] == "unauthorized"
    assert none.headers["www-authenticate"] == "Bearer"
    assert wrong.status_code == 401
    assert right.status_code == 200
    assert bad.status_code == 401  # auth is checked before anything is parsed


QEMU = shutil.which("qemu-system-x86_64")


def test_lifecycle_with_real_qemu(tmp_path):
    """create -> 201 running; the same create again -> 200 (create-or-start); bad stop options -> 422;
    stop -> stopped; delete."""
    require(QEMU, "qemu-system-x86_64 not installed")
    disk = tmp_path / "empty.img"
    disk.write_bytes(b"\0" * 1024 * 1024)
    body = {"name": "real1", "memory": 32, "disk": str(disk), "tags": ["a b", "$(x)"]}

    async def go(client, node, events):
        seq0 = events.last_seq
        created = await client.post("/v1/instances", json=body)
        dup = await client.post("/v1/instances", json=body)
        listed = await client.get("/v1/instances")
        shown = await client.get("/v1/instances/real1")
        before = snapshot(tmp_path, node, events)
        bad_opts = [await client.post("/v1/instances/real1/stop", json=o)
                    for o in ({"force": "yes"}, {"timeout": -1}, {"timeout": 1, "extra": 1})]
        bad_ct = await client.post("/v1/instances/real1/stop", content=b"{}", headers={"content-type": "text/x"})
        unchanged = snapshot(tmp_path, node, events) == before
        stopped = await client.post("/v1/instances/real1/stop", json={"force": True})
        again = await client.post("/v1/instances/real1/stop")
        deleted = await client.delete("/v1/instances/real1")
        gone = await client.get("/v1/instances/real1")
        types = [e["type"] for e in events.since(seq0) if e["instance"] == "real1"]
        return created, dup, listed, shown, bad_opts, bad_ct, unchanged, stopped, again, deleted, gone, types

    (created, dup, listed, shown, bad_opts, bad_ct, unchanged, stopped, again, deleted, gone,
     types) = with_api(tmp_path, go, qemu=QEMU)
    assert created.status_code == 201, created.text
    view = created.json()
    # the real node's answers are what the OpenAPI document says they are
    import jsonschema_rs

    doc = openapi()
    for schema, doc_ in (("InstanceView", view), ("InstanceView", shown.json()), ("InstanceView", stopped.json()),
                         ("InstanceList", listed.json()), ("InstanceView", dup.json()), ("Error", gone.json())):
        v = jsonschema_rs.Draft202012Validator({"$ref": f"#/components/schemas/{schema}",
                                                "components": doc["components"]})
        assert v.is_valid(doc_), (schema, doc_, [str(e) for e in v.iter_errors(doc_)][:3])
    assert view["state"] == "running" and view["pid"] > 0 and view["name"] == "real1"
    assert created.headers["location"] == "/v1/instances/real1"
    # create-or-start: the identical spec again is the same instance, unchanged
    assert dup.status_code == 200 and dup.json()["generation"] == view["generation"], dup.text
    assert dup.json()["pid"] == view["pid"]
    assert [v["name"] for v in listed.json()["instances"]] == ["real1"]
    assert shown.json()["tags"] == ["a b", "$(x)"] and shown.json()["nics"] == []
    assert [(r.status_code, r.json()["field"]) for r in bad_opts] == [(422, "force"), (422, "timeout"),
                                                                       (422, "extra")]
    assert bad_ct.status_code == 400
    assert unchanged
    assert stopped.status_code == 200 and stopped.json()["state"] == "stopped"
    assert again.status_code == 200 and again.json()["state"] == "stopped"
    assert deleted.status_code == 200
    assert gone.status_code == 404
    assert types.index("instance.running") < types.index("instance.stopping") < types.index("instance.stopped")
    assert types.count("instance.starting") == 1  # the repeated create started nothing
    assert not os.path.exists(tmp_path / "state" / "instances" / "real1")


def test_create_or_start_by_name(tmp_path):
    """Same spec -> 200, the same instance (also for two creates at once); a different spec ->
    409 naming ``name`` and the fields; an ended instance of that name is replaced (201, new
    generation); the capacity endpoint counts only live instances."""
    require(QEMU, "qemu-system-x86_64 not installed")
    disk = tmp_path / "empty.img"
    disk.write_bytes(b"\0" * 1024 * 1024)
    body = {"name": "cs1", "memory": 32, "disk": str(disk)}

    async def go(client, node, events):
        out = {"cap0": await client.get("/v1/capacity")}
        results = []

        async def create(b):
            results.append(await client.post("/v1/instances", json=b))

        async with trio.open_nursery() as n:  # two identical creates at once: one start
            n.start_soon(create, body)
            await trio.sleep(0.01)
            n.start_soon(create, dict(reversed(list(body.items()))))  # key order does not matter
        out["pair"] = results
        out["cap1"] = await client.get("/v1/capacity")
        out["other"] = await client.post("/v1/instances", json={**body, "memory": 48, "tags": ["x"]})
        out["stop"] = await client.post("/v1/instances/cs1/stop", json={"force": True})
        out["cap2"] = await client.get("/v1/capacity")
        out["again"] = await client.post("/v1/instances", json=body)
        out["starts"] = [e["type"] for e in events.since(0) if e["instance"] == "cs1"].count("instance.starting")
        return out

    o = with_api(tmp_path, go, qemu=QEMU)
    codes = sorted(r.status_code for r in o["pair"])
    assert codes == [200, 201], [r.text for r in o["pair"]]
    first, second = o["pair"]
    assert first.json()["generation"] == second.json()["generation"]
    assert second.json()["state"] == "running"
    other = o["other"].json()
    assert o["other"].status_code == 409 and other["field"] == "name" and other["code"] == "conflict"
    assert "memory" in other["error"] and "tags" in other["error"], other
    assert o["stop"].json()["state"] == "stopped"
    again = o["again"]
    assert again.status_code == 201 and again.json()["state"] == "running", again.text
    assert again.json()["generation"] != first.json()["generation"]  # a new start: a new guest identity
    assert o["starts"] == 2
    cap0, cap1, cap2 = (o[k].json() for k in ("cap0", "cap1", "cap2"))
    import jsonschema_rs

    v = jsonschema_rs.Draft202012Validator({"$ref": "#/components/schemas/Capacity",
                                            "components": openapi()["components"]})
    for c in (cap0, cap1, cap2):
        assert v.is_valid(c), c
    assert cap0["instances"] == 0 and cap0["committed_memory_mib"] == 0 and cap0["committed_vcpus"] == 0
    assert cap1["instances"] == 1 and cap1["committed_memory_mib"] == 32 and cap1["committed_vcpus"] == 1
    assert cap2["instances"] == 0 and cap2["committed_memory_mib"] == 0
    assert cap0["vcpus"] == len(os.sched_getaffinity(0))
    assert 0 < cap0["memory_available_mib"] <= cap0["memory_total_mib"]


# -- errors: the one table -----------------------------------------------------------------------

class _Boom:
    """A node whose start raises what it is told to."""

    def __init__(self, exc):
        self.exc = exc
        self.cfg = type("Cfg", (), {"node_name": "t", "token_file": None})()

    def list(self):
        return []

    def get(self, name):
        from supervisor._node import NotFound

        raise NotFound(f"no instance named {name!r}")

    async def start(self, spec):
        raise self.exc

    async def prepare_incoming(self, spec, postcopy=False, generation=None, source=None, disks=None):
        raise self.exc


def _boom(exc, path="/v1/instances", body=None):
    async def main():
        events = EventLog(None)
        try:
            app = create_app(_Boom(exc), events)
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://qsup") as c:
                return await c.post(path, json=body or spec())
        finally:
            events.close()

    return trio.run(main)


def _table_cases():
    from supervisor._instance import StartError
    from supervisor._migration import MigrationError
    from supervisor._node import Conflict, NotFound
    from supervisor._spec import SpecError

    return [
        ("spec", SpecError("bridge 'br9' does not exist", "nics[0].link"), 422, "invalid_spec", "nics[0].link"),
        ("conflict", Conflict("instance 'vm1' already exists (running)"), 409, "conflict", "name"),
        ("not-found", NotFound("no instance named 'vm1'"), 404, "not_found", "name"),
        ("start", StartError("qemu: could not open kernel '/k': No such file", "kernel"), 422, "start_failed",
         "kernel"),
        ("migration", MigrationError("destination refused", "to"), 409, "conflict", "to"),
        # anything else is a bug: 500, never a 4xx that would hide it from the fuzzers
        ("runtime", RuntimeError("oops"), 500, "internal", None),
        ("value", ValueError("oops"), 500, "internal", None),
        ("key", KeyError("uri"), 500, "internal", None),
        ("group", ExceptionGroup("nursery", [RuntimeError("x")]), 500, "internal", None),
    ]


@pytest.mark.parametrize("case", _table_cases(), ids=lambda c: c[0])
def test_error_table_maps_only_known_errors_to_4xx(case):
    _, exc, status, code, field = case
    r = _boom(exc)
    assert r.status_code == status, r.text
    assert r.json()["code"] == code and r.json()["field"] == field
    if status == 422 and code == "start_failed":
        assert r.json()["error"] == "start failed (rolled back): kernel: qemu: could not open kernel '/k': No such file"


def test_prepare_names_the_spec_field_inside_the_body():
    from supervisor._spec import SpecError

    r = _boom(SpecError("bridge 'br9' does not exist", "nics[0].link"), "/v1/migrations/incoming",
              {"spec": spec(), "postcopy": False})
    assert r.status_code == 422
    assert r.json() == {"error": "spec.nics[0].link: bridge 'br9' does not exist", "field": "spec.nics[0].link",
                        "code": "invalid_spec"}
    assert _boom(RuntimeError("x"), "/v1/migrations/incoming", {"spec": spec()}).status_code == 500
    from supervisor._instance import StartError
    from supervisor._node import Conflict

    taken = _boom(Conflict("instance 'vm1' already exists (running)"), "/v1/migrations/incoming", {"spec": spec()})
    assert (taken.status_code, taken.json()["field"], taken.json()["code"]) == (409, "spec.name", "conflict")
    failed = _boom(StartError("cannot open", "kernel"), "/v1/migrations/incoming", {"spec": spec()})
    assert failed.status_code == 422 and failed.json() == {
        "error": "start failed (rolled back): spec.kernel: cannot open", "field": "spec.kernel", "code": "start_failed"}


def test_405_allows_every_method_of_the_path(tmp_path):
    async def go(client, node, events):
        return [await client.request(m, p) for m, p in
                (("PUT", "/v1/instances"), ("PATCH", "/v1/instances/vm1"), ("GET", "/v1/instances/vm1/stop"))]

    coll, item, stop = with_api(tmp_path, go)
    allow = lambda r: {m.strip() for m in r.headers["allow"].split(",")}  # noqa: E731
    assert coll.status_code == 405 and allow(coll) == {"GET", "HEAD", "POST"}
    assert item.status_code == 405 and allow(item) == {"GET", "HEAD", "DELETE"}
    assert stop.status_code == 405 and allow(stop) == {"POST"}
    assert coll.json()["code"] == "method_not_allowed"


def test_stopping_daemon_answers_503_and_starts_nothing(tmp_path):
    async def go(client, node, events):
        client._transport.app.state.stopping = True
        return (await client.get("/v1/health"), await client.post("/v1/instances", json=spec(name="late")),
                await client.get("/v1/instances"))

    health, create, lst = with_api(tmp_path, go)
    assert health.status_code == 503 and health.json()["status"] == "stopping"
    assert create.status_code == 503 and create.json()["code"] == "unavailable"
    assert lst.json() == {"instances": []}


def test_metrics_app_serves_only_metrics_and_health_without_a_token(tmp_path):
    from supervisor.api import create_metrics_app

    async def go(client, node, events):
        app = create_metrics_app(node, events, reattached=["a"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://qsup") as c:
            return [await c.get(p) for p in ("/metrics", "/v1/health", "/v1/instances", "/openapi.json",
                                              "/v1/events")] + [await c.post("/v1/instances", json=spec())]

    m, h, i, o, e, p = with_api(tmp_path, go, token="s3cret-token-0123456789")
    assert m.status_code == 200 and "qsup_build_info" in m.text
    assert h.status_code == 200 and h.json()["reattached"] == ["a"]
    assert [r.status_code for r in (i, o, e, p)] == [404, 404, 404, 404]


# -- metrics -------------------------------------------------------------------------------------

def _scrape(metrics) -> str:
    return metrics.render().decode()


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in metrics:\n{text}")


def test_metrics_follow_the_event_log():
    from supervisor.api import Metrics

    events = EventLog(None)
    m = Metrics()
    m.watch(events)
    try:
        events.emit("migration.completed", instance="a", total_ms=2500.0, downtime_ms=12, switchover_ms=31.5,
                    activation={"event_to_l3_ms": 0.8})
        events.emit("migration.failed", instance="b", result="cancelled", error="x", l3_was_released=False)
        events.emit("migration.failed", instance="b", result="weird", error="x", l3_was_released=False)
        events.emit("migration.activated", instance="c", qmp_ts=1.0, event_to_l3_ms=0.9, event_to_cont_ms=1.7)
        events.emit("netconf.failed", instance="d", error="e", failures=[
            {"step": "route4", "path": "/etc/qsup/hooks/route4", "exit_code": 1, "error": "hook"},
            {"step": "addr6", "error": "netlink"}])
        events.emit("netconf.undo_failed", instance="d", reason="crash", error="e",
                    failures=[{"step": "rule4", "error": "gone"}])
        text = _scrape(m)
    finally:
        events.close()
    assert _value(text, 'qsup_migrations_total{direction="out",result="completed"}') == 1
    assert _value(text, 'qsup_migrations_total{direction="out",result="cancelled"}') == 1
    assert _value(text, 'qsup_migrations_total{direction="out",result="failed"}') == 1  # unknown results fold
    assert _value(text, 'qsup_migrations_total{direction="in",result="activated"}') == 1
    assert _value(text, "qsup_migration_duration_seconds_sum") == 2.5
    assert _value(text, 'qsup_migration_downtime_seconds_bucket{le="0.025"}') == 1
    assert _value(text, "qsup_migration_switchover_gap_seconds_sum") == pytest.approx(0.0315)
    assert _value(text, 'qsup_migration_activation_seconds_sum{until="cont"}') == pytest.approx(0.0017)
    assert _value(text, 'qsup_hook_failures_total{step="route4"}') == 1
    assert 'qsup_hook_failures_total{step="addr6"}' not in text  # not a hook
    assert _value(text, "qsup_netconf_failures_total") == 1
    assert _value(text, 'qsup_netconf_undo_failures_total{reason="crash"}') == 1
    assert "_created" not in text


def test_qmp_call_latency_and_errors_come_from_the_glue(tmp_path):
    import tempfile

    from qmp_glue import AsyncioThread, QMPError, QMPTimeout, connect
    from qmp_peer import PeerError, QMPPeer
    from supervisor.api import Metrics

    m = Metrics()
    d = tempfile.mkdtemp(prefix="qm", dir="/tmp")
    path = os.path.join(d, "qmp.sock")

    def refuse(args):
        raise PeerError("GenericError", "no")

    async def main():
        peer = QMPPeer(path)
        peer.handlers["refuse"] = refuse
        with AsyncioThread() as aio:
            async with trio.open_nursery() as n:
                await n.start(peer.serve)
                client = await connect(path, loop=aio, timeout=5, name="vm")
                try:
                    await client.execute("query-status")
                    await client.execute("query-status")
                    with pytest.raises(QMPError):
                        await client.execute("refuse")
                    with pytest.raises(QMPTimeout):
                        await client.execute("hang", timeout=0.05)
                finally:
                    await client.aclose()
                    n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    text = _scrape(m)
    assert _value(text, 'qsup_qmp_call_seconds_count{command="query-status"}') == 2
    assert _value(text, 'qsup_qmp_call_errors_total{command="refuse",kind="qmp_error"}') == 1
    assert _value(text, 'qsup_qmp_call_errors_total{command="hang",kind="timeout"}') == 1
    assert 'qsup_qmp_call_errors_total{command="query-status"' not in text
    import gc
    import weakref

    from qmp_glue import _client

    gone = weakref.ref(m)
    del m  # the glue holds its observer weakly: a dropped Metrics is not kept alive nor called
    gc.collect()
    assert gone() is None
    _client._notify("x", 0.0, None)
    assert all(r() is not None for r in _client._observers)


def promtool() -> str | None:
    """promtool from $PROMTOOL, PATH, or unpacked from Debian's ``prometheus`` package into build/."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "prometheus",
                        "usr", "bin", "promtool")
    for p in (os.environ.get("PROMTOOL"), shutil.which("promtool"), here):
        if p and os.access(p, os.X_OK):
            return p
    return None


PROMTOOL = promtool()


def test_a_scrape_passes_promtool_check_metrics(tmp_path):
    """Every family the daemon can expose, with data in it, as Prometheus' own linter sees it."""
    import subprocess

    assert PROMTOOL, "promtool missing: Debian's prometheus package ships it (apt-get install prometheus)"
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0")

    async def go(client, node, events):
        from supervisor._instance import Instance
        from supervisor._spec import parse_spec

        inst = Instance(parse_spec({"name": "m1", "memory": 64, "disk": str(disk), "nics": []}), node.ctx)
        node.instances["m1"] = inst  # an instance to describe (never started)
        events.emit("instance.started", instance="m1", timings_ms={"total": 120.0})
        events.emit("netconf.applied", instance="m1", ms=1.2)
        events.emit("migration.completed", instance="m1", total_ms=2500.0, downtime_ms=12, switchover_ms=31.5)
        events.emit("migration.activated", instance="m1", qmp_ts=1.0, event_to_l3_ms=0.9, event_to_cont_ms=1.7)
        events.emit("netconf.undo_failed", instance="m1", reason="stop", error="e",
                    failures=[{"step": "route4", "path": "/h/route4", "error": "x"}])
        await client.get("/v1/instances/nope")
        r = await client.get("/metrics")
        del node.instances["m1"]
        return r

    r = with_api(tmp_path, go)
    text = r.text
    assert 'qsup_instance_info{accel="",instance="m1",memory_mib="64",nics="0",vcpus="1"} 1.0' in text
    assert 'qsup_instance_state{instance="m1",state="starting"} 1.0' in text
    assert 'qsup_instance_state{instance="m1",state="running"} 0.0' in text
    assert 'qsup_http_requests_total{method="GET",route="/v1/instances/{name}",status="404"} 1.0' in text
    assert "qsup_build_info{" in text
    out = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
