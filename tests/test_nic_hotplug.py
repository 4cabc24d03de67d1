"""NIC hotplug, unplug and live network changes against the fake QEMU (tests/fake_qemu.py keeps
netdevs, getfd'd descriptors and virtio-net devices as QEMU does) and a fake host network
(tests/nic_fakes.py: taps are files, netconf's effects a JSON file; the real executor and
journal run).  Through the HTTP API: validation that changes nothing, a failure at every step of
an add leaving nothing in QEMU or on the host, the diff of a set, the 409s, and a daemon killed
(SIGKILL, in a child process) at each NIC checkpoint: the restarted daemon's record, QEMU and the
host agree."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap

import httpx
import pytest
import trio

import nic_fakes
from core_harness import Bench, fake_knobs, spec
from supervisor._faults import Checkpoint, Faults, InjectedFault
from supervisor._spec import NicSpec

MAC1 = "52:54:00:00:00:01"
MAC2 = "52:54:00:00:00:02"


def trio_test(fn):
    @functools.wraps(fn)
    def run(*args, **kw):
        return trio.run(functools.partial(fn, *args, **kw))
    return run


@pytest.fixture(autouse=True)
def fake_net(tmp_path, monkeypatch):
    monkeypatch.setenv("NIC_FAKE_DIR", str(tmp_path))
    nic_fakes.install(monkeypatch)


def _client(bench: Bench) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(bench.socket)), base_url="http://qsup")


def _record(bench: Bench, name: str = "vm") -> dict:
    return json.loads((bench.dir / "state" / "instances" / name / "record.json").read_text())


async def _nets(inst) -> dict:
    return await inst.qmp.execute("x-fake-nets")


def _host_of(mac: str) -> list[str]:
    """The host effects (fake) that name this NIC's tap or address."""
    from netconf import tap_name_for
    tap = tap_name_for("vm", mac)
    return [k for k in nic_fakes.host() if tap in k]


async def _state(inst) -> tuple:
    """Everything a change may touch: QEMU's NICs, the host, the taps, the spec."""
    nets = await _nets(inst)
    return (nets["netdevs"], nets["monfds"], sorted(nets["nics"]), sorted(nic_fakes.host()),
            sorted(nic_fakes.tap_names()), inst.spec.model_dump(mode="json"))


async def _start(bench: Bench, tmp_path, nics=None):
    nics = nics if nics is not None else [{"mode": "routed", "ip": "10.9.0.2", "mac": MAC1}]
    return await bench.node.start(spec(tmp_path, nics=nics))


@trio_test
async def test_add_set_rm_routed(tmp_path):
    fake_knobs(tmp_path)
    bench = Bench(tmp_path)
    async with bench.running(api=True), _client(bench) as c:
        inst = await _start(bench, tmp_path)
        before = await _state(inst)
        assert (await _nets(inst))["nics"] == {"nic0": {"netdev": "net0", "mac": MAC1, "id": "nic0", "addr": "0x3"}}

        r = await c.post("/v1/instances/vm/nics", json={"mode": "routed", "ip": "10.9.0.3", "mac": MAC2})
        assert r.status_code == 201, r.text
        nic = r.json()["nic"]
        assert nic["pci_slot"] == 4 and nic["mac"] == MAC2
        nets = await _nets(inst)
        assert nets["netdevs"] == ["net-525400000002", "net0"] and nets["monfds"] == []  # netdev took the fd
        assert nets["nics"]["nic-525400000002"] == {"id": "nic-525400000002", "netdev": "net-525400000002",
                                                     "mac": MAC2, "addr": "0x4"}
        assert any("10.9.0.3" in k and k.startswith("route ") for k in _host_of(MAC2))
        assert {t for t in nic_fakes.tap_names()} == {inst.nics[0].tap, inst.nics[1].tap}  # QEMU holds it
        rec = _record(bench)
        assert [n["mac"] for n in rec["spec"]["nics"]] == [MAC1, MAC2]
        assert rec["nic_ops"]["ids"][MAC2] == ["net-525400000002", "nic-525400000002"] and not rec["nic_ops"]["pending"]
        assert [n["ip"] for n in r.json()["view"]["nics"]] == ["10.9.0.2", "10.9.0.3"]
        assert [n["pci_slot"] for n in r.json()["view"]["nics"]] == [3, 4]
        assert bench.of("nic.added")[-1]["nic"]["mac"] == MAC2
        m = (await c.get("/metrics")).text
        assert 'nics="2"' in m

        # a routed address changed: only the neighbour and the route move, no link bounce
        host1 = set(_host_of(MAC1))
        r = await c.put(f"/v1/instances/vm/nics/{MAC2}", json={"mode": "routed", "ip": "10.9.0.4"})
        assert r.status_code == 200, r.text
        ev = bench.of("nic.changed")[-1]
        assert ev["undone"] == ["neigh4", "route4"] and ev["applied"] == ["neigh4", "route4"], ev
        assert ev["link_bounced"] is False and ev["diff"]["changed"] == ["neigh4", "route4"]
        assert not any("10.9.0.3" in k for k in nic_fakes.host())
        assert any("10.9.0.4" in k and k.startswith("route ") for k in _host_of(MAC2))
        assert set(_host_of(MAC1)) == host1  # the other NIC untouched
        assert inst.spec.nics[1].ip == "10.9.0.4" and _record(bench)["spec"]["nics"][1]["ip"] == "10.9.0.4"
        assert _record(bench)["nics"][MAC2]["ip"] == "10.9.0.4"

        # to a bridge: L3 goes, L2 changes, the guest's link bounced
        r = await c.put(f"/v1/instances/vm/nics/{MAC2}", json={"mode": "bridged", "link": "br0", "vlan": 7})
        assert r.status_code == 200, r.text
        ev = bench.of("nic.changed")[-1]
        assert ev["link_bounced"] is True and "route4" in ev["undone"] and "bridge-port" in ev["applied"]
        assert (await _nets(inst))["links"] == {"nic-525400000002": True}
        assert not any(k.startswith("route ") for k in _host_of(MAC2))

        r = await c.delete(f"/v1/instances/vm/nics/{MAC2}")
        assert r.status_code == 200, r.text
        assert await _state(inst) == before
        assert _host_of(MAC2) == []
        rec = _record(bench)
        assert [n["mac"] for n in rec["spec"]["nics"]] == [MAC1] and MAC2 not in rec["nics"]
        assert bench.of("nic.removed")[-1]["mac"] == MAC2
        await bench.node.stop("vm")
    assert nic_fakes.host() == {} and nic_fakes.tap_names() == set()


@trio_test
async def test_generated_macs_are_pinned_and_multiqueue_passes_every_fd(tmp_path):
    fake_knobs(tmp_path)
    bench = Bench(tmp_path)
    async with bench.running(api=True), _client(bench) as c:
        inst = await _start(bench, tmp_path, nics=[{"mode": "routed", "ip": "10.9.0.2"}])
        first = inst.nics[0].mac
        r = await c.post("/v1/instances/vm/nics", json={"mode": "bridged", "link": "br0", "queues": 4})
        assert r.status_code == 201, r.text
        mac = r.json()["nic"]["mac"]
        assert mac != first and [n.mac for n in inst.spec.nics] == [first, mac]  # both written in
        dev = (await _nets(inst))["nics"][f"nic-{mac.replace(':', '')}"]
        assert dev["mq"] is True and dev["vectors"] == 10
        r = await c.delete(f"/v1/instances/vm/nics/{first}")  # the first one goes: the other keeps its MAC
        assert r.status_code == 200, r.text
        assert [n.mac for n in inst.spec.nics] == [mac] and inst.nics[0].mac == mac
        assert (await _nets(inst))["netdevs"] == [f"net-{mac.replace(':', '')}"]
        await bench.node.stop("vm")


@pytest.mark.parametrize("body, field", [
    ({"mode": "routed", "ip": "10.9.0.9", "mac": MAC1}, "mac"),  # the first NIC's MAC
    ({"mode": "routed", "ip": "10.9.0.2"}, "ip"),  # the first NIC's address
    ({"mode": "routed", "ip": "10.9.0.50"}, "ip"),  # another instance's address
    ({"mode": "routed", "ip": "10.9.0.9", "pci_slot": 3}, "pci_slot"),  # the first NIC's slot
    ({"mode": "routed", "ip": "10.9.0.9", "queues": 64}, "queues"),  # over MAX_QUEUES
    ({"mode": "routed", "ip": "10.9.0.9", "vlan": 3}, "vlan"),
    ({"mode": "routed", "ip": "169.254.0.1"}, "ip"),
    ({"mode": "bridged"}, "link"),
    ({"mode": "bridged", "link": "nobr"}, "link"),  # the host has no such bridge
    ({"mode": "routed", "ip": "10.9.0.9", "nope": 1}, "nope"),
    ({"mode": "routed", "ip": "10.9.0.9", "mac": "01:00:00:00:00:01"}, "mac"),
])
@trio_test
async def test_refusals_name_the_field_and_change_nothing(tmp_path, body, field):
    fake_knobs(tmp_path)
    bench = Bench(tmp_path)
    async with bench.running(api=True), _client(bench) as c:
        await bench.node.start(spec(tmp_path, name="other", nics=[{"mode": "routed", "ip": "10.9.0.50"}]))
        inst = await _start(bench, tmp_path)
        before, rec, events = await _state(inst), _record(bench), len(bench.types())
        r = await c.post("/v1/instances/vm/nics", json=body)
        assert r.status_code == 422, r.text
        assert r.json()["field"] == field, r.json()
        assert await _state(inst) == before and _record(bench) == rec and len(bench.types()) == events
        await bench.node.stop_all(timeout=1)


@trio_test
async def test_caps_set_refusals_and_not_found(tmp_path):
    fake_knobs(tmp_path)
    bench = Bench(tmp_path)
    async with bench.running(api=True), _client(bench) as c:
        inst = await _start(bench, tmp_path, nics=[
            {"mode": "routed", "ip": f"10.9.1.{i}", "queues": 16 if i < 4 else 1} for i in range(1, 5)])
        r = await c.post("/v1/instances/vm/nics", json={"mode": "routed", "ip": "10.9.0.9", "queues": 16})
        assert r.status_code == 422 and r.json()["field"] == "queues", r.text  # 49 + 16 > 64 in all
        for i in range(12):
            r = await c.post("/v1/instances/vm/nics", json={"mode": "routed", "ip": f"10.9.2.{i + 1}"})
            assert r.status_code == 201, r.text
        r = await c.post("/v1/instances/vm/nics", json={"mode": "routed", "ip": "10.9.3.1"})
        assert r.status_code == 422 and "at most 16" in r.json()["error"] and r.json()["field"] == "mac", r.text
        mac = inst.nics[0].mac
        for body, field in (({"mode": "routed", "ip": "10.9.1.1", "queues": 16}, "mode"),  # nothing changes
                            ({"mode": "routed", "ip": "10.9.1.1", "queues": 1}, "queues"),
                            ({"mode": "routed", "ip": "10.9.1.1", "queues": 16, "pci_slot": 30}, "pci_slot"),
                            ({"mode": "routed", "ip": "10.9.1.2", "queues": 16}, "ip")):  # the second NIC's
            r = await c.put(f"/v1/instances/vm/nics/{mac}", json=body)
            assert r.status_code == 422 and r.json()["field"] == field, (body, r.text)
        r = await c.delete("/v1/instances/vm/nics/52:54:00:ff:ff:ff")
        assert r.status_code == 404 and r.json()["field"] == "mac"
        r = await c.delete("/v1/instances/vm/nics/nope")
        assert r.status_code == 404
        await bench.node.stop("vm")


@pytest.mark.parametrize("point", [Checkpoint.NIC_TAP, Checkpoint.NIC_NETDEV, Checkpoint.NIC_DEVICE,
                                   Checkpoint.NIC_ACTIVATED])
@trio_test
async def test_a_failure_at_each_step_undoes_the_add(tmp_path, point):
    fake_knobs(tmp_path)
    bench = Bench(tmp_path, faults=Faults(point))
    async with bench.running():
        inst = await _start(bench, tmp_path)
        before, rec = await _state(inst), _record(bench)
        with pytest.raises(InjectedFault):
            await inst.nic_ops.add(NicSpec(mode="routed", ip="10.9.0.3", mac=MAC2))
        assert await _state(inst) == before and _record(bench) == rec
        assert bench.of("nic.add_failed")[-1]["left"] == []
        await bench.node.stop("vm")
    assert nic_fakes.host() == {} and nic_fakes.tap_names() == set()


@pytest.mark.parametrize("cmd", ["getfd", "netdev_add", "device_add", "route"])
@trio_test
async def test_qemu_or_the_host_refusing_a_step_undoes_the_add(tmp_path, cmd, monkeypatch):
    fake_knobs(tmp_path, fail_commands={cmd: f"fake refuses {cmd}"} if cmd != "route" else {})
    bench = Bench(tmp_path)
    async with bench.running(api=True), _client(bench) as c:
        inst = await _start(bench, tmp_path)
        before, rec = await _state(inst), _record(bench)
        if cmd == "route":
            monkeypatch.setenv("NIC_FAKE_FAIL", "route")
        r = await c.post("/v1/instances/vm/nics", json={"mode": "routed", "ip": "10.9.0.3", "mac": MAC2})
        monkeypatch.delenv("NIC_FAKE_FAIL", raising=False)
        assert r.status_code == 422 and r.json()["code"] == "change_failed", r.text
        assert "every step was undone" in r.json()["error"]
        assert await _state(inst) == before and _record(bench) == rec
        await bench.node.stop("vm")


@trio_test
async def test_a_failed_set_goes_back_to_the_old_plan(tmp_path, monkeypatch):
    fake_knobs(tmp_path)
    bench = Bench(tmp_path)
    async with bench.running(api=True), _client(bench) as c:
        inst = await _start(bench, tmp_path)
        before, rec = await _state(inst), _record(bench)
        monkeypatch.setenv("NIC_FAKE_FAIL", "bridge_port")  # the host refuses the new bridge port
        r = await c.put(f"/v1/instances/vm/nics/{MAC1}", json={"mode": "bridged", "link": "br0"})
        monkeypatch.delenv("NIC_FAKE_FAIL")
        assert r.status_code == 422 and r.json()["code"] == "change_failed", r.text
        assert "back on its old network" in r.json()["error"]
        assert await _state(inst) == before and _record(bench) == rec
        monkeypatch.setenv("NIC_FAKE_FAIL", "route:10.9.0.7")  # the new route refused: the old one back
        r = await c.put(f"/v1/instances/vm/nics/{MAC1}", json={"mode": "routed", "ip": "10.9.0.7"})
        monkeypatch.delenv("NIC_FAKE_FAIL")
        assert r.status_code == 422 and r.json()["code"] == "change_failed", r.text
        assert await _state(inst) == before and _record(bench) == rec
        assert bench.of("nic.change_failed")[-1]["left"] == []
        await bench.node.stop("vm")


@trio_test
async def test_unplug_timeout_keeps_the_nic_then_a_late_release_finishes_it(tmp_path):
    fake_knobs(tmp_path, unplug_seconds=1.0)
    bench = Bench(tmp_path, unplug_timeout=0.3)
    async with bench.running(api=True), _client(bench) as c:
        inst = await _start(bench, tmp_path)
        before = await _state(inst)
        r = await c.post("/v1/instances/vm/nics", json={"mode": "routed", "ip": "10.9.0.3", "mac": MAC2})
        assert r.status_code == 201
        attached = await _state(inst)
        r = await c.delete(f"/v1/instances/vm/nics/{MAC2}")
        assert r.status_code == 422 and "stays attached" in r.json()["error"], r.text
        assert (await _state(inst))[3:] == attached[3:]  # host, taps, spec
        with trio.fail_after(5):
            while not bench.of("nic.removed"):
                await trio.sleep(0.05)
        assert await _state(inst) == before
        await bench.node.stop("vm")


@trio_test
async def test_409_while_migrating_stopped_or_upgrading(tmp_path):
    from supervisor._state import State
    fake_knobs(tmp_path)
    bench = Bench(tmp_path)
    async with bench.running(api=True), _client(bench) as c:
        inst = await _start(bench, tmp_path)
        inst.sm.move(State.MIGRATING, "test")
        for r in (await c.post("/v1/instances/vm/nics", json={"mode": "routed", "ip": "10.9.0.3"}),
                  await c.delete(f"/v1/instances/vm/nics/{MAC1}"),
                  await c.put(f"/v1/instances/vm/nics/{MAC1}", json={"mode": "routed", "ip": "10.9.0.4"})):
            assert r.status_code == 409 and r.json()["field"] == "name", r.text
        inst.sm.move(State.RUNNING, "test")
        inst._upgrade_pid = inst.proc  # as an upgrade under way has it
        r = await c.post("/v1/instances/vm/nics", json={"mode": "routed", "ip": "10.9.0.3"})
        assert r.status_code == 409 and "upgraded" in r.json()["error"], r.text
        inst._upgrade_pid = None
        await bench.node.stop("vm")
        r = await c.post("/v1/instances/vm/nics", json={"mode": "routed", "ip": "10.9.0.3"})
        assert r.status_code == 409


@trio_test
async def test_a_migration_waits_for_no_nic_change(tmp_path):
    from supervisor._migration import MigrateOptions, MigrationError
    fake_knobs(tmp_path)
    bench = Bench(tmp_path)
    async with bench.running():
        inst = await _start(bench, tmp_path)
        async with inst.nic_ops._lock:  # a change under way
            with pytest.raises(MigrationError, match="NIC change"):
                await inst.migrate(MigrateOptions(to="/nowhere"))
        await bench.node.stop("vm")


# -- kill -9 of the daemon at each NIC checkpoint ----------------------------------------------

_CHILD = textwrap.dedent("""
    import os, sys, trio
    sys.path.insert(0, {tests!r})
    import nic_fakes
    nic_fakes.install()
    from core_harness import Bench, spec
    from supervisor._faults import Checkpoint, CrashAt
    from supervisor._spec import NicSpec
    tmp, point, op = sys.argv[1], sys.argv[2], sys.argv[3]
    from pathlib import Path

    async def main():
        bench = Bench(Path(tmp), faults=CrashAt(Checkpoint(point)))
        async with bench.running():
            inst = await bench.node.start(spec(Path(tmp), nics=[{{"mode": "routed", "ip": "10.9.0.2",
                                                                  "mac": "52:54:00:00:00:01"}}]))
            if op == "add":
                await inst.nic_ops.add(NicSpec(mode="routed", ip="10.9.0.3", mac="52:54:00:00:00:02"))
            elif op == "remove":
                await inst.nic_ops.remove("52:54:00:00:00:01")
            elif op == "set":
                await inst.nic_ops.change("52:54:00:00:00:01", NicSpec(mode="routed", ip="10.9.0.4"))
            print("no crash", flush=True)
            os._exit(3)

    trio.run(main)
""")


@pytest.mark.parametrize("op, point", [
    ("add", Checkpoint.NIC_TAP), ("add", Checkpoint.NIC_NETDEV), ("add", Checkpoint.NIC_DEVICE),
    ("add", Checkpoint.NIC_ACTIVATED), ("remove", Checkpoint.NIC_UNPLUGGED), ("remove", Checkpoint.NIC_DETACHED),
    ("set", Checkpoint.NIC_CONVERGED)], ids=lambda v: getattr(v, "value", v))
def test_daemon_killed_mid_change_then_record_qemu_and_host_agree(tmp_path, op, point):
    fake_knobs(tmp_path)
    env = {**os.environ, "NIC_FAKE_DIR": str(tmp_path)}
    tests = os.path.dirname(os.path.abspath(__file__))
    child = subprocess.run([sys.executable, "-c", _CHILD.format(tests=tests), str(tmp_path), point.value, op],
                           env=env, capture_output=True, text=True, timeout=60, cwd=os.path.dirname(tests))
    assert child.returncode == -signal.SIGKILL, (child.returncode, child.stdout, child.stderr[-3000:])
    bench = Bench(tmp_path)

    async def restarted():
        async with bench.running():
            assert bench.reattached == ["vm"], bench.types()
            inst = bench.node.instances["vm"]
            settled = bench.of("nic.change_settled")
            assert len(settled) == 1 and settled[0]["change"]["op"] == op, bench.types()
            nets = await _nets(inst)
            # QEMU's NIC devices are the record's NICs, at their slots, with their MACs
            rec = _record(bench)
            assert rec["nic_ops"]["pending"] is None
            want = {n["mac"]: f"{n['pci_slot']:#x}" for n in rec["spec"]["nics"]}
            assert {d["mac"]: d["addr"] for d in nets["nics"].values()} == want, (nets, rec["spec"]["nics"])
            assert sorted(rec["nics"]) == sorted(want) == sorted(n.mac for n in inst.nics)
            assert nets["monfds"] == [] and len(nets["netdevs"]) == len(want)
            # the host holds exactly the current plans of the recorded NICs, and only their taps exist
            import netconf
            expected = set()
            for n in inst.nics:
                for phase in ("attach", "activate"):
                    for s in netconf.plan(n, phase):
                        expected.add(nic_fakes._key(s.op, s.args))
            assert set(nic_fakes.host()) == expected
            assert nic_fakes.tap_names() == {n.tap for n in inst.nics}
            live = {e["nic_id"] for e in inst.executor.journal.live()}
            assert live == set(want)
            if op == "set":
                assert inst.nics[0].ip == "10.9.0.2"  # rolled back to the old plan
            await bench.node.stop("vm")
        assert nic_fakes.host() == {} and nic_fakes.tap_names() == set()

    trio.run(restarted)


@trio_test
async def test_a_migration_after_a_hotplug_builds_the_destination_with_both_nics_at_their_slots(tmp_path,
                                                                                               monkeypatch):
    from supervisor._migration import MigrateOptions
    from supervisor._state import State

    def tap_anyway(name, queues=1, mac=None):  # both "nodes" share this host: the same tap name twice
        return nic_fakes.netconf.TapHandle(name=name, fds=[os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                                                           for _ in range(queues)], vnet_hdr=True)
    monkeypatch.setattr(nic_fakes.netconf, "open_tap", tap_anyway)
    fake_knobs(tmp_path)
    a, b = Bench(tmp_path, "a"), Bench(tmp_path, "b")
    async with a.running(), b.running(api=True):
        inst = await _start(a, tmp_path)
        await inst.nic_ops.add(NicSpec(mode="routed", ip="10.9.0.3", mac=MAC2))
        await a.node.migrate("vm", MigrateOptions(to=str(b.socket)))
        with trio.fail_after(20):
            while inst.state != State.STOPPED:
                await trio.sleep(0.05)
        dest = b.node.instances["vm"]
        assert dest.state == State.RUNNING, dest.view()
        assert [(n.mac, n.pci_slot) for n in dest.spec.nics] == [(MAC1, 3), (MAC2, 4)]
        nets = await _nets(dest)
        assert {d["mac"]: d["addr"] for d in nets["nics"].values()} == {MAC1: "0x3", MAC2: "0x4"}
        assert dest.nic_ops.ids == {MAC1: ("net0", "nic0"), MAC2: ("net1", "nic1")}
        await dest.nic_ops.remove(MAC2)  # by its id on this QEMU (by position here)
        assert (await _nets(dest))["netdevs"] == ["net0"] and [n.mac for n in dest.nics] == [MAC1]
        await b.node.stop("vm")
