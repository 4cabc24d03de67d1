"""NIC hotplug for real (issue 18): a real `qsup serve`, the real test guest under TCG, QEMU as its
own uid.  A running guest gets a second routed NIC (`qsup nic add`), configures it by itself (its
/init watcher: guest.ip1 from the kernel command line, `guest-nic: + eth1`) and answers a ping
on it from the client; the NIC's routed address is changed live (`qsup nic set`): the old one
stops answering, the new one answers, and the first NIC's host state is not touched; `qsup nic
rm` leaves nothing of it on the host (tap, routes, rules, neighbours, sysctls' tap dir) nor in
QEMU (its device, its netdev); `show`, the record and the metrics follow.  Everything is torn
down by pid (the daemon fixture's leak check)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from test_daemon import daemon_factory, node, routed  # noqa: F401 - fixtures
from topo import qmp

MAC0, MAC1 = "52:54:00:77:01:40", "52:54:00:77:01:41"
IP0, IP1, IP1B = "10.99.9.40", "10.99.9.41", "10.99.9.42"


def _host(ns) -> dict:
    """What the node holds for the guest's taps: links, routes, rules, neighbours."""
    links = {link["ifname"] for link in ns.json("link", "show") if link["ifname"].startswith("qs")}
    routes = [r for r in ns.json("route", "show", "table", "all") if r.get("dev", "").startswith("qs")]
    rules = [r for r in ns.json("rule", "show") if str(r.get("iif", "")).startswith("qs")]
    # the permanent entries (qsup's own: neigh4/neigh6); dynamic ones come and go with the
    # guest's traffic and change state on their own (a CI run failed on a STALE -> DELAY)
    neigh = [{k: n.get(k) for k in ("dst", "dev", "lladdr")} for n in ns.json("neigh", "show")
             if n.get("dev", "").startswith("qs") and "PERMANENT" in (n.get("state") or [])]
    return {"links": sorted(links), "routes": sorted(json.dumps(r, sort_keys=True) for r in routes),
            "rules": sorted(json.dumps(r, sort_keys=True) for r in rules),
            "neigh": sorted(json.dumps(n, sort_keys=True) for n in neigh)}


def _peripherals(sock: str) -> list[str]:
    return sorted(p["name"] for p in qmp(sock, "qom-list", {"path": "/machine/peripheral"}))


def test_add_ping_set_address_rm_leaves_nothing(node, daemon_factory):  # noqa: F811
    ns, client = node
    dm = daemon_factory(ns, extra_config="unplug_timeout = 30\n")
    spec = routed("nh", IP0, MAC0)
    spec["append"] += f" guest.ip1={IP1}/32 guest.ip1_also={IP1B}/32"  # for eth1, once it appears
    v = dm.start_instance(spec)
    sock = v["qmp_operator"]
    dm.wait_console("nh")
    assert client.ping(IP0), dm.console("nh")[-1500:]
    before = _host(ns)
    devices_before = _peripherals(sock)
    assert not client.ping(IP1, count=1, timeout=3)

    # -- add: the guest configures eth1 and answers on it ----------------------------------------
    t0 = time.monotonic()
    added = dm.cli_json("nic", "add", "nh", json.dumps({"mode": "routed", "ip": IP1, "mac": MAC1}))
    assert added["nic"]["mac"] == MAC1 and added["nic"]["pci_slot"] == 4, added["nic"]
    dm.wait_console("nh", f"guest-nic: + eth1 mac={MAC1}", timeout=60)
    assert client.ping(IP1, timeout=30), dm.console("nh")[-2000:]
    add_ms = (time.monotonic() - t0) * 1000
    assert client.ping(IP0)
    shown = dm.cli_json("show", "nh")
    assert [(n["mac"], n["ip"], n["pci_slot"]) for n in shown["nics"]] == [(MAC0, IP0, 3), (MAC1, IP1, 4)]
    tap1 = shown["nics"][1]["tap"]
    assert tap1 in _host(ns)["links"]
    assert "nic-525400770141" in _peripherals(sock)
    rec = json.loads((dm.state_dir / "instances" / "nh" / "record.json").read_text())
    assert [n["mac"] for n in rec["spec"]["nics"]] == [MAC0, MAC1] and MAC1 in rec["nics"]
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(dm.socket)), base_url="http://qsup") as h:
        assert 'instance="nh"' in h.get("/metrics").text and 'nics="2"' in h.get("/metrics").text
    added_ev = [e for e in dm.events() if e["type"] == "nic.added"]
    assert added_ev and added_ev[-1]["nic"]["mac"] == MAC1

    # -- set: the routed address moves; the first NIC's host state untouched ---------------------
    tap0_state = [r for r in _host(ns)["routes"] if IP0 in r]
    assert not client.ping(IP1B, count=1, timeout=3)  # the guest has it, the host routes it nowhere
    changed = dm.cli_json("nic", "set", "nh", MAC1, json.dumps({"mode": "routed", "ip": IP1B}))
    assert changed["nic"]["ip"] == IP1B
    assert client.ping(IP1B, timeout=20), dm.console("nh")[-2000:]
    assert not client.ping(IP1, count=1, timeout=3)
    assert client.ping(IP0)
    assert [r for r in _host(ns)["routes"] if IP0 in r] == tap0_state
    ev = [e for e in dm.events() if e["type"] == "nic.changed"][-1]
    assert ev["undone"] == ["neigh4", "route4"] and ev["link_bounced"] is False, ev
    assert dm.cli_json("show", "nh")["nics"][1]["ip"] == IP1B

    # -- rm: nothing of the NIC left on the host or in QEMU ---------------------------------------
    t1 = time.monotonic()
    dm.cli_json("nic", "rm", "nh", MAC1)
    rm_ms = (time.monotonic() - t1) * 1000
    dm.wait_console("nh", "guest-nic: - eth1", timeout=30)
    assert _host(ns) == before, (_host(ns), before)
    assert _peripherals(sock) == devices_before
    assert not client.ping(IP1B, count=1, timeout=3)
    assert client.ping(IP0)
    assert [n["mac"] for n in dm.cli_json("show", "nh")["nics"]] == [MAC0]
    print(f"nic add->ping {add_ms:.0f} ms, rm {rm_ms:.0f} ms")
    assert dm.cli_json("stop", "nh", "--timeout", "10")["state"] == "stopped"
    assert _host(ns)["links"] == []


@pytest.mark.parametrize("op, step", [("add", "nic.netdev"), ("add", "nic.device"), ("rm", "nic.unplugged"),
                                      ("set", "nic.converged")])
def test_a_daemon_killed_mid_change_then_restarted_agrees_with_qemu_and_the_host(node, daemon_factory,  # noqa: F811
                                                                                   op, step):
    """``kill -9`` of the daemon at a NIC checkpoint (QSUP_TEST_CRASH_AT), then a plain restart: the
    change is settled (an add whose device QEMU has is finished, one without undone; a removal whose
    device is gone finished; a set rolled back), and the record, QEMU's devices, the node's taps
    and routes and the guest's answers agree."""
    ns, client = node
    dm = daemon_factory(ns, env={"QSUP_TEST_CRASH_AT": step}, extra_config="unplug_timeout = 30\n")
    spec = routed("nk", IP0, MAC0)
    spec["append"] += f" guest.ip1={IP1}/32 guest.ip1_also={IP1B}/32"
    if op != "add":  # the NIC exists from the start (eth1 at boot: configured by the watcher's rules too)
        spec["nics"].append({"mode": "routed", "mac": MAC1, "ip": IP1})
    v = dm.start_instance(spec)
    sock = v["qmp_operator"]
    dm.wait_console("nk")
    body = json.dumps({"mode": "routed", "ip": IP1, "mac": MAC1})
    argv = {"add": ("nic", "add", "nk", body), "rm": ("nic", "rm", "nk", MAC1),
            "set": ("nic", "set", "nk", MAC1, json.dumps({"mode": "routed", "ip": IP1B}))}[op]
    r = dm.cli(*argv, check=False, timeout=120)
    assert r.returncode != 0, r.stdout  # the daemon died under the request
    dm.kill()
    dm._env = None  # noqa: SLF001 - the next daemon crashes nowhere
    dm.start()
    settled = [e for e in dm.events() if e["type"] == "nic.change_settled"]
    assert len(settled) == 1, [e["type"] for e in dm.events()][-20:]
    shown = dm.cli_json("show", "nk")
    macs = [n["mac"] for n in shown["nics"]]
    expect_two = {"add": step == "nic.device", "rm": False, "set": True}[op]
    assert macs == ([MAC0, MAC1] if expect_two else [MAC0]), (settled, shown["nics"])
    rec = json.loads((dm.state_dir / "instances" / "nk" / "record.json").read_text())
    assert [n["mac"] for n in rec["spec"]["nics"]] == macs and sorted(rec["nics"]) == sorted(macs)
    assert rec["nic_ops"]["pending"] is None
    nic_devices = [p for p in _peripherals(sock) if p.startswith("nic")]
    assert len(nic_devices) == len(macs), nic_devices
    assert _host(ns)["links"] == sorted(n["tap"] for n in shown["nics"])
    routes = " ".join(_host(ns)["routes"])
    assert IP0 in routes
    if op == "set":
        assert shown["nics"][1]["ip"] == IP1 and IP1 in routes and IP1B not in routes  # rolled back
    elif expect_two:
        assert IP1 in routes and client.ping(IP1, timeout=60), dm.console("nk")[-1500:]
    else:
        assert IP1 not in routes and IP1B not in routes
        assert not client.ping(IP1, count=1, timeout=3)
    assert client.ping(IP0)
    assert dm.cli_json("stop", "nk", "--timeout", "10")["state"] == "stopped"
    assert _host(ns)["links"] == []


def test_a_hotplugged_nic_configured_through_the_attached_console(node, daemon_factory):  # noqa: F811
    """Issue 18 must-show: a running guest gets a second NIC; the operator configures it inside
    the guest through ``qsup console --attach`` (the API the CLI uses: AttachedConsole) -- no
    ``guest.ipN`` on the command line -- and the guest answers a ping on it."""
    from guestcheck import AttachedConsole

    ns, client = node
    dm = daemon_factory(ns)
    ip1, mac1 = "10.99.0.31", "52:54:00:77:01:31"
    spec = routed("nc", "10.99.0.30", "52:54:00:77:00:30")
    spec["append"] += " guest.shell=1"
    dm.start_instance(spec)
    dm.wait_console("nc")
    dm.cli_json("nic", "add", "nc", json.dumps({"mode": "routed", "ip": ip1, "mac": mac1}))
    dm.wait_console("nc", "guest-nic: + eth1", timeout=60)
    assert not client.ping(ip1, count=1, timeout=3)  # nothing in the guest configured it
    with AttachedConsole(dm.socket, "nc") as con:
        con.wait_ready(60)
        for cmd in ("ip link set eth1 up", f"ip addr add {ip1}/32 dev eth1",
                    "ip route add 169.254.0.1 dev eth1 table 131",
                    "ip route add default via 169.254.0.1 dev eth1 table 131",
                    f"ip rule add from {ip1} table 131"):
            rc, out = con.run(cmd)
            assert rc == 0, (cmd, out)
        rc, out = con.run("ip -o addr show dev eth1")
        assert ip1 in out, out
    assert client.ping(ip1, timeout=30), dm.console("nc")[-1500:]
    assert client.ping("10.99.0.30")
    assert dm.cli_json("stop", "nc", "--timeout", "10")["state"] == "stopped"
