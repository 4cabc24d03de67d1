"""Issue "Live migration": two nodes, a real guest, L3 moved exactly at completion.

Topology: migtopo.TwoNodes (client + node A + node B, each node with its own
`qsup serve`).  The client pings the guest every 10 ms through whichever
node answers proxy ARP for it; a sampler in each node reads the routing
table every millisecond.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from migtopo import Pinger, RouteSampler, TwoNodes, loss_budget, overlap_and_gap
from topo import guest_spec, pid_alive

IP = "10.99.0.2"
MAC = "52:54:00:99:00:02"


@pytest.fixture
def nodes(tmp_path):
    t = TwoNodes(tmp_path)
    try:
        a, b = t.start_daemons()
        yield t, a, b
    finally:
        leaked = t.close()
        assert not leaked, f"qemu pids left: {leaked}"


def routed_spec(name="m1"):
    return guest_spec(name, [{"mode": "routed", "mac": MAC, "ip": IP}], append=f"guest.ip0={IP}/32")


def has_route(node, addr=IP) -> bool:
    return addr in node.run("ip", "route", "show", addr)


def wait_state(daemon, name, states, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = daemon.cli("show", name, "--json", check=False)
        if r.returncode == 0:
            v = json.loads(r.stdout)
            if v["state"] in states:
                return v
        elif "stopped" in states or "gone" in states:
            return None
        time.sleep(0.1)
    raise TimeoutError(f"{name} never reached {states}: {daemon.cli('show', name, '--json', check=False).stdout}")


def migrate(src, dst, name, *extra, check=True):
    return src.cli("migrate", name, "--to", str(dst.socket), "--json", *extra, timeout=300, check=check)


def leftovers(node) -> list[str]:
    out = []
    if [l for l in node.links() if l.startswith("qs")]:
        out.append(f"taps: {[l for l in node.links() if l.startswith('qs')]}")
    if has_route(node):
        out.append("route")
    if "proto 152" in node.run("ip", "rule", "show"):
        out.append("rule")
    return out


def test_routed_migration_under_ping_zero_overlap(nodes, tmp_path):
    t, a, b = nodes
    a.start_instance(routed_spec())
    a.wait_console("m1")
    assert t.client.ping(IP), "guest not reachable before migration"
    qemu_a = a.cli_json("show", "m1")["pid"]
    sa = RouteSampler(t.a, IP, tmp_path / "ra.txt")
    sb = RouteSampler(t.b, IP, tmp_path / "rb.txt")
    ping = Pinger(t.client, IP)
    time.sleep(1)
    r = migrate(a, b, "m1")
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    time.sleep(1.5)
    res = ping.stop()
    t_end = time.time()
    ra, rb = sa.stop(), sb.stop()
    overlap, gap = overlap_and_gap(ra, rb, t_end)
    # QEMU's `downtime` ends when the *source* has sent everything; the destination still
    # loads the device state before `completed`.  Both are QEMU's own clocks; take the larger.
    downtime = max(summary["downtime_ms"], summary["switchover_ms"] or 0)
    seqs = res["seqs"]
    holes = [(x, y) for x, y in zip(seqs, seqs[1:]) if y - x > 1]
    print("ping holes", holes, "route A", ra, "route B", rb)
    print(json.dumps({"overlap_ms": overlap * 1000, "gap_ms": gap * 1000, "downtime_ms": downtime,
                      "ping": {k: v for k, v in res.items() if k != "seqs"}, "summary": summary}))
    assert summary["result"] == "completed"
    assert overlap == 0.0, f"both nodes held the route for {overlap * 1000:.1f} ms"
    assert gap * 1000 <= downtime + 20, (gap * 1000, downtime)
    assert res["lost"] <= loss_budget(downtime), (res, downtime)
    # exactly one node: B runs the guest with L3; A has nothing left
    vb = b.cli_json("show", "m1")
    assert vb["state"] == "running"
    assert vb["migration"]["activation"]["event_to_cont_ms"] > 0
    assert has_route(t.b) and not has_route(t.a)
    assert not pid_alive(qemu_a)
    assert leftovers(t.a) == []
    assert t.client.ping(IP)


def test_bridged_migration_under_ping(nodes, tmp_path):
    t, a, b = nodes
    t.client.run("ip", "addr", "add", "10.98.0.1/24", "dev", "lan")
    spec = guest_spec("m2", [{"mode": "bridged", "mac": MAC, "link": "br0"}], append="guest.ip0=10.98.0.2/24")
    a.start_instance(spec)
    a.wait_console("m2")
    assert t.client.ping("10.98.0.2")
    ping = Pinger(t.client, "10.98.0.2")
    time.sleep(1)
    summary = json.loads(migrate(a, b, "m2").stdout.strip().splitlines()[-1])
    time.sleep(1.5)
    res = ping.stop()
    assert summary["result"] == "completed"
    assert res["lost"] <= loss_budget(max(summary["downtime_ms"], summary["switchover_ms"] or 0)), (res, summary)
    assert b.cli_json("show", "m2")["state"] == "running"
    assert leftovers(t.a) == []


def test_postcopy_migration(nodes):
    t, a, b = nodes
    a.start_instance(routed_spec("pc1"))
    a.wait_console("pc1")
    summary = json.loads(migrate(a, b, "pc1", "--postcopy").stdout.strip().splitlines()[-1])
    assert summary["result"] == "completed"
    assert b.cli_json("show", "pc1")["state"] == "running"
    assert t.client.ping(IP)
    assert has_route(t.b) and not has_route(t.a)


def test_back_and_forth_ten_times_no_leaks(nodes):
    t, a, b = nodes
    a.start_instance(routed_spec("bf"))
    a.wait_console("bf")
    src, dst = a, b
    for i in range(10):
        summary = json.loads(migrate(src, dst, "bf").stdout.strip().splitlines()[-1])
        assert summary["result"] == "completed", (i, summary)
        src, dst = dst, src
    # after an even number of hops the guest is back on A
    assert a.cli_json("show", "bf")["state"] == "running"
    assert t.client.ping(IP)
    assert leftovers(t.b) == []
    assert len([l for l in t.a.links() if l.startswith("qs")]) == 1
    assert t.a.run("ip", "rule", "show").count("proto 152") == 0


def _fault_setup(nodes, name):
    t, a, b = nodes
    a.start_instance(routed_spec(name))
    a.wait_console(name)
    return t, a, b


def _assert_on_a_only(t, a, b, name):
    v = wait_state(a, name, {"running"})
    assert v["state"] == "running"
    assert has_route(t.a) and not has_route(t.b)
    assert leftovers(t.b) == []
    assert t.client.ping(IP)


def test_cancel_keeps_guest_on_source(nodes):
    t, a, b = _fault_setup(nodes, "c1")
    # a slow migration we can cancel
    r = a.cli("migrate", "c1", "--to", str(b.socket), "--max-bandwidth", "1000000", "--json", "--detach")
    time.sleep(1.0)
    a.cli("migrate", "--cancel", "c1")
    _assert_on_a_only(t, a, b, "c1")


@pytest.mark.parametrize("when", ["setup", "active"])
def test_kill_destination_qemu(nodes, when):
    t, a, b = _fault_setup(nodes, "k" + when[0])
    name = "k" + when[0]
    a.cli("migrate", name, "--to", str(b.socket), "--max-bandwidth", "2000000", "--json", "--detach")
    v = wait_state(b, name, {"migrating"})
    if when == "active":
        time.sleep(1.0)
    os.kill(b.cli_json("show", name)["pid"], signal.SIGKILL)
    _assert_on_a_only(t, a, b, name)


def test_veth_down_between_nodes(nodes):
    t, a, b = _fault_setup(nodes, "v1")
    a.cli("migrate", "v1", "--to", str(b.socket), "--max-bandwidth", "2000000", "--json", "--detach")
    wait_state(b, "v1", {"migrating"})
    time.sleep(0.5)
    t.a.run("ip", "link", "set", "mig", "down")
    try:
        _assert_on_a_only(t, a, b, "v1")
    finally:
        t.a.run("ip", "link", "set", "mig", "up")


def test_prepared_destination_nobody_migrates_to_tears_itself_down(tmp_path):
    """The source vanished between prepare and migrate: the destination must not wait forever."""
    t = TwoNodes(tmp_path)
    try:
        a, b = t.start_daemons(extra_config="incoming_timeout = 3\n")
        import httpx

        spec = routed_spec("orphan")
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(b.socket)), base_url="http://qsup") as c:
            r = c.post("/v1/migrations/incoming", json={"spec": spec, "postcopy": False})
        assert r.status_code == 201, r.text
        assert [l for l in t.b.links() if l.startswith("qs")], "prepare should have opened the tap"
        v = wait_state(b, "orphan", {"failed"}, timeout=30)
        assert v["state"] == "failed" and "abort" in (v["error"] or "")
        assert leftovers(t.b) == []
        assert not (b.state_dir / "instances" / "orphan").exists()
        assert any(e["type"] == "migration.incoming_timeout" for e in b.events())
    finally:
        leaked = t.close()
        assert not leaked
