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

from supervisor._api import MAX_BODY, create_app, openapi
from supervisor._config import load_config
from supervisor._eventlog import EventLog
from supervisor._node import Node

KERNEL = "/boot/vmlinuz-does-not-matter"
OK_NIC = {"mode": "routed", "ip": "10.0.0.2"}


def spec(**kw) -> dict:
    return {"name": "vm1", "memory": 64, "kernel": KERNEL, **kw}


def make_cfg(tmp_path, **kw):
    base = dict(state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"),
                socket=str(tmp_path / "qsup.sock"), hooks_dir=str(tmp_path / "no-hooks"),
                accel="tcg", qemu="/bin/false", qemu_user="", powerdown_timeout=1.0)
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
    ("kernel-and-disk", "POST", "/v1/instances", dict(json=spec(disk="/d.img")), 422, "kernel"),
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
            "/v1/health", "/metrics"} <= set(doc["paths"])
    assert "InstanceSpec" in doc["components"]["schemas"] and "NicSpec" in doc["components"]["schemas"]
    assert doc["components"]["schemas"]["InstanceSpec"]["additionalProperties"] is False


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


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")
def test_lifecycle_with_real_qemu(tmp_path):
    """create -> 201 running; duplicate -> 409; bad stop options -> 422; stop -> stopped; delete."""
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
    assert view["state"] == "running" and view["pid"] > 0 and view["name"] == "real1"
    assert created.headers["location"] == "/v1/instances/real1"
    assert dup.status_code == 409 and dup.json()["field"] == "name"
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
    assert not os.path.exists(tmp_path / "state" / "instances" / "real1")
