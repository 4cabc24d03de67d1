"""Disk hotplug against the fake QEMU (tests/fake_qemu.py keeps fdsets, nodes and devices as QEMU
does): add / rm / resize / limits through the HTTP API, validation that changes nothing, and a
failure at every step of an add leaving nothing behind in QEMU."""

from __future__ import annotations

import functools
import json
import os

import httpx
import pytest
import trio

from core_harness import Bench, fake_knobs, spec
from supervisor._faults import Checkpoint, Faults, InjectedFault


def trio_test(fn):
    @functools.wraps(fn)
    def run(*args, **kw):
        return trio.run(functools.partial(fn, *args, **kw))
    return run


def _raw(tmp_path, name: str, size: int = 1 << 20) -> str:
    p = tmp_path / name
    with open(p, "wb") as f:
        f.truncate(size)
    os.chmod(p, 0o600)
    return str(p)


def _client(bench: Bench) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(bench.socket)), base_url="http://qsup")


async def _qmp(inst, cmd: str, args=None):
    return await inst.qmp.execute(cmd, args)


async def _qemu_block(inst) -> dict:
    nodes = await _qmp(inst, "query-named-block-nodes", {"flat": True})
    fdsets = await _qmp(inst, "query-fdsets")
    block = await _qmp(inst, "query-block")
    return {"nodes": sorted(n["node-name"] for n in nodes),
            "fdsets": {s["fdset-id"]: [f.get("opaque") for f in s["fds"]] for s in fdsets},
            "devices": sorted(b["qdev"].split("/")[3] for b in block)}


def _record(bench: Bench, name: str = "vm") -> dict:
    return json.loads((bench.dir / "state" / "instances" / name / "record.json").read_text())


async def _start(bench: Bench, tmp_path, **kw):
    return await bench.node.start(spec(tmp_path, disks=[{"id": "root", "path": _raw(tmp_path, "root.img"),
                                                        "format": "raw"}], **kw))


@trio_test
async def test_add_resize_limits_rm(tmp_path):
    fake_knobs(tmp_path)
    bench = Bench(tmp_path)
    data = _raw(tmp_path, "data.img")
    async with bench.running(api=True), _client(bench) as c:
        inst = await _start(bench, tmp_path)
        before = await _qemu_block(inst)
        assert before["fdsets"] == {1: ["file-root"]} and before["devices"] == ["blk-root"]

        r = await c.post("/v1/instances/vm/disks", json={"id": "data", "path": data, "format": "raw",
                                                          "iops": 100, "serial": "D1"})
        assert r.status_code == 201, r.text
        disk = r.json()["disk"]
        assert disk["pci_slot"] is not None and disk["iops"] == 100
        now = await _qemu_block(inst)
        assert now["devices"] == ["blk-data", "blk-root"]
        assert {"disk-data", "file-data"} <= set(now["nodes"])
        assert now["fdsets"][2] == ["file-data"]  # above the launch's sets, opaque names the node
        assert [d.id for d in inst.spec.disks] == ["root", "data"]
        assert [d["id"] for d in _record(bench)["spec"]["disks"]] == ["root", "data"]
        assert _record(bench)["fdsets"]["disks"] == {"root": [1], "data": [2]}
        added = bench.of("disk.added")[-1]
        assert added["disk"]["id"] == "data" and added["fdsets"] == [2]

        r = await c.post("/v1/instances/vm/disks/data/resize", json={"size": "2M"})
        assert r.status_code == 200, r.text
        assert r.json()["disk"] == {"id": "data", "size": 2 << 20, "previous": 1 << 20}
        assert bench.of("disk.resized")[-1]["size"] == 2 << 20
        r = await c.post("/v1/instances/vm/disks/data/resize", json={"size": 1 << 20})
        assert r.status_code == 422 and r.json()["field"] == "size"  # a shrink
        r = await c.post("/v1/instances/vm/disks/data/resize", json={"size": "1000"})
        assert r.status_code == 422 and r.json()["field"] == "size"  # not a multiple of 512

        r = await c.patch("/v1/instances/vm/disks/data", json={"iops": None, "bps_rd": 1 << 20})
        assert r.status_code == 200, r.text
        d = inst.spec.disk("data")
        assert d.iops is None and d.bps_rd == 1 << 20
        r = await c.patch("/v1/instances/vm/disks/data", json={"bps": 5})
        assert r.status_code == 422  # bps excludes bps_rd: nothing changed
        assert inst.spec.disk("data").bps is None

        r = await c.delete("/v1/instances/vm/disks/data")
        assert r.status_code == 200, r.text
        assert await _qemu_block(inst) == before
        assert [d["id"] for d in _record(bench)["spec"]["disks"]] == ["root"]
        assert "data" not in _record(bench)["fdsets"]["disks"]
        assert bench.of("disk.removed")[-1]["id"] == "data"

        # hotplug again: a new fdset, never a reused one
        r = await c.post("/v1/instances/vm/disks", json={"id": "data", "path": data, "format": "raw"})
        assert r.status_code == 201, r.text
        assert (await _qemu_block(inst))["fdsets"] == {1: ["file-root"], 3: ["file-data"]}
        await bench.node.stop("vm")


@pytest.mark.parametrize("body, field", [
    ({"id": "root", "format": "raw"}, "id"),  # duplicate id
    ({"id": "x", "format": "raw", "path": "/etc/passwd"}, "path"),  # outside the image dirs
    ({"id": "x", "format": "qcow2"}, "path"),  # a raw file declared qcow2
    ({"id": "x", "format": "raw", "pci_slot": 3}, "pci_slot"),  # the root disk's slot
    ({"id": "x", "format": "raw", "boot": 0}, "boot"),  # the root disk's boot index
    ({"id": "X!", "format": "raw"}, "id"),
    ({"id": "x", "format": "raw", "bps": 1, "bps_rd": 2}, "bps"),
    ({"id": "x", "format": "raw", "nope": 1}, "nope"),
])
@trio_test
async def test_refusals_name_the_field_and_change_nothing(tmp_path, body, field):
    fake_knobs(tmp_path)
    bench = Bench(tmp_path)
    body = {"path": _raw(tmp_path, "x.img"), **body}
    async with bench.running(api=True), _client(bench) as c:
        inst = await _start(bench, tmp_path, )
        inst.spec = inst.spec.model_copy(update={"disks": [inst.spec.disks[0].model_copy(update={"boot": 0})]})
        before, rec, events = await _qemu_block(inst), _record(bench), len(bench.types())
        r = await c.post("/v1/instances/vm/disks", json=body)
        assert r.status_code == 422, r.text
        assert r.json()["field"] == field, r.json()
        assert await _qemu_block(inst) == before and _record(bench) == rec and len(bench.types()) == events
        await bench.node.stop("vm")


@trio_test
async def test_too_many_disks_and_not_found(tmp_path):
    fake_knobs(tmp_path)
    bench = Bench(tmp_path)
    async with bench.running(api=True), _client(bench) as c:
        await _start(bench, tmp_path)
        for i in range(7):
            r = await c.post("/v1/instances/vm/disks", json={"id": f"d{i}", "format": "raw",
                                                              "path": _raw(tmp_path, f"d{i}.img")})
            assert r.status_code == 201, r.text
        r = await c.post("/v1/instances/vm/disks", json={"id": "d9", "format": "raw",
                                                          "path": _raw(tmp_path, "d9.img")})
        assert r.status_code == 422 and r.json()["field"] == "id" and "at most 8" in r.json()["error"]
        r = await c.delete("/v1/instances/vm/disks/nope")
        assert r.status_code == 404 and r.json()["field"] == "id"
        r = await c.post("/v1/instances/vm/disks/nope/resize", json={"size": 4096})
        assert r.status_code == 404
        await bench.node.stop("vm")


@pytest.mark.parametrize("point", [Checkpoint.DISK_FDS, Checkpoint.DISK_NODES, Checkpoint.DISK_DEVICE])
@trio_test
async def test_a_failure_at_each_step_undoes_the_add(tmp_path, point):
    fake_knobs(tmp_path)
    bench = Bench(tmp_path, faults=Faults(point))
    async with bench.running():
        inst = await _start(bench, tmp_path)
        before, rec = await _qemu_block(inst), _record(bench)
        from supervisor._spec import DiskSpec
        with pytest.raises(InjectedFault):
            await inst.disk_ops.add(DiskSpec(id="data", path=_raw(tmp_path, "data.img"), format="raw"))
        assert await _qemu_block(inst) == before
        assert _record(bench) == rec and inst.spec.disk("data") is None
        assert bench.of("disk.add_failed")[-1]["left"] == []
        await bench.node.stop("vm")


@pytest.mark.parametrize("cmd", ["blockdev-add", "device_add", "block_set_io_throttle"])
@trio_test
async def test_qemu_refusing_a_step_undoes_the_add(tmp_path, cmd):
    fake_knobs(tmp_path, fail_commands={cmd: f"fake refuses {cmd}"})
    bench = Bench(tmp_path)
    async with bench.running(api=True), _client(bench) as c:
        inst = await bench.node.start(spec(tmp_path))  # no disk at start: the knob hits the hotplug only
        before, rec = await _qemu_block(inst), _record(bench)
        r = await c.post("/v1/instances/vm/disks", json={"id": "data", "format": "raw", "iops": 10,
                                                          "path": _raw(tmp_path, "data.img")})
        assert r.status_code == 422 and r.json()["code"] == "change_failed", r.text
        assert f"fake refuses {cmd}" in r.json()["error"] and "every step was undone" in r.json()["error"]
        assert await _qemu_block(inst) == before and _record(bench) == rec
        await bench.node.stop("vm")


@trio_test
async def test_unplug_timeout_keeps_the_disk_then_a_late_release_finishes_it(tmp_path):
    fake_knobs(tmp_path, unplug_seconds=1.0)
    bench = Bench(tmp_path, unplug_timeout=0.3)
    async with bench.running(api=True), _client(bench) as c:
        inst = await _start(bench, tmp_path)
        r = await c.post("/v1/instances/vm/disks", json={"id": "data", "format": "raw",
                                                          "path": _raw(tmp_path, "data.img")})
        assert r.status_code == 201
        attached = await _qemu_block(inst)
        r = await c.delete("/v1/instances/vm/disks/data")
        assert r.status_code == 422 and r.json()["code"] == "change_failed" and "stays attached" in r.json()["error"]
        assert inst.spec.disk("data") is not None
        assert (await _qemu_block(inst))["nodes"] == attached["nodes"]
        assert (await _qemu_block(inst))["fdsets"] == attached["fdsets"]
        with trio.fail_after(5):  # the guest lets go later: qsup finishes the removal then
            while not bench.of("disk.removed"):
                await trio.sleep(0.05)
        assert inst.spec.disk("data") is None
        assert (await _qemu_block(inst))["fdsets"] == {1: ["file-root"]}
        await bench.node.stop("vm")


@trio_test
async def test_409_unless_running_or_paused(tmp_path):
    fake_knobs(tmp_path)
    bench = Bench(tmp_path)
    async with bench.running(api=True), _client(bench) as c:
        inst = await _start(bench, tmp_path)
        await bench.node.stop("vm")
        r = await c.post("/v1/instances/vm/disks", json={"id": "data", "format": "raw",
                                                          "path": _raw(tmp_path, "data.img")})
        assert r.status_code == 409 and r.json()["field"] == "name", r.text
        r = await c.post("/v1/instances/vm/disks/root/resize", json={"size": "4M"})
        assert r.status_code == 409
        assert inst.state.value == "stopped"


@trio_test
async def test_disk_change_refuses_while_migrating_and_migration_waits_for_none(tmp_path):
    from supervisor._state import State
    fake_knobs(tmp_path)
    bench = Bench(tmp_path)
    async with bench.running(api=True), _client(bench) as c:
        inst = await _start(bench, tmp_path)
        inst.sm.move(State.MIGRATING, "test")  # as a migration does
        r = await c.post("/v1/instances/vm/disks", json={"id": "data", "format": "raw",
                                                          "path": _raw(tmp_path, "data.img")})
        assert r.status_code == 409 and "migrating" in r.json()["error"], r.text
        r = await c.delete("/v1/instances/vm/disks/root")
        assert r.status_code == 409
        inst.sm.move(State.RUNNING, "test")
        await bench.node.stop("vm")
