"""Bridged and openvswitch NICs for real (Linux bridge; OVS userspace datapath)."""

from __future__ import annotations

import json
import os

import pytest

from nsutil import AgentError, snapshot

pytestmark = pytest.mark.integration

TAP = "qsnct1"
MAC = "52:54:00:aa:bb:01"


def nic(**kw):
    d = {"instance": "vm1", "mac": MAC, "mode": "bridged", "tap": TAP, "link": "br0"}
    d.update(kw)
    return d


@pytest.fixture
def bridge(ns):
    ns.run("ip", "link", "add", "br0", "type", "bridge")
    ns.run("ip", "link", "add", "port0", "type", "veth", "peer", "name", "port1")
    ns.run("ip", "link", "set", "port0", "address", "52:00:00:00:00:10", "master", "br0")
    ns.run("ip", "link", "set", "br0", "mtu", "1400", "up")
    # carrier on the bridge before the test starts, so the tap is not what brings br0 up
    ns.run("ip", "link", "set", "port0", "up")
    ns.run("ip", "link", "set", "port1", "up")
    return "br0"


def link(ns, name):
    return ns.json("link", "show", name)[0]


def test_bridged_attach_copies_mtu_sets_fe_mac_keeps_bridge_mac(ns, agent, bridge, tmp_path):
    j = str(tmp_path / "j")
    agent.call("open_tap", name=TAP)
    br_mac = link(ns, "br0")["address"]
    before = snapshot(ns)
    t = agent.call("apply", journal=j, nic=nic(), phase="attach", reason="start")
    assert [x["step"] for x in t if x["kind"] == "step"] == ["tap-up", "bridge-port"]
    tap = link(ns, TAP)
    assert tap["master"] == "br0" and tap["mtu"] == 1400 and tap["address"] == "fe:54:00:aa:bb:01"
    assert "UP" in tap["flags"]
    assert link(ns, "br0")["address"] == br_mac and link(ns, "br0")["mtu"] == 1400
    assert agent.call("apply", journal=j, nic=nic(), phase="activate", reason="start") == []
    agent.call("undo", journal=j, reason="stop")
    assert snapshot(ns) == before


def _kernel_has_bridge_vlan_filtering(ns) -> bool:
    return os.system(f"ip netns exec {ns.name} test -e /sys/class/net/br0/bridge/vlan_filtering") == 0


@pytest.mark.parametrize("vlan,trunks,expect", [
    (10, [], {10: {"PVID", "Egress Untagged"}}),
    (None, [20, 30], {1: {"PVID", "Egress Untagged"}, 20: set(), 30: set()}),
])
def test_bridged_vlan_access_and_trunk(ns, agent, bridge, tmp_path, vlan, trunks, expect):
    if not _kernel_has_bridge_vlan_filtering(ns):
        pytest.skip("kernel built without CONFIG_BRIDGE_VLAN_FILTERING (see test_bridged_vlan_without_"
                    "kernel_support_fails_cleanly)")
    ns.run("ip", "link", "set", "br0", "type", "bridge", "vlan_filtering", "1")
    j = str(tmp_path / "j")
    agent.call("open_tap", name=TAP)
    before = snapshot(ns)
    n = nic(vlan=vlan, trunks=trunks)
    agent.call("check_link", nic=n, index=0)
    agent.call("apply", journal=j, nic=n, phase="attach", reason="start")
    shown = json.loads(ns.run("bridge", "-j", "vlan", "show", "dev", TAP))
    got = {v["vlan"]: set(v.get("flags", [])) for port in shown if port["ifname"] == TAP for v in port["vlans"]}
    assert got == expect
    agent.call("undo", journal=j, reason="stop")
    assert snapshot(ns) == before


def test_bridged_vlan_without_kernel_support_fails_cleanly(ns, agent, bridge, tmp_path):
    """On a kernel without bridge VLAN filtering: check_link names the field, and an
    apply anyway fails at bridge-vlan and rolls back tap-up and bridge-port."""
    if _kernel_has_bridge_vlan_filtering(ns):
        pytest.skip("this kernel supports bridge VLAN filtering")
    j = str(tmp_path / "j")
    agent.call("open_tap", name=TAP)
    before = snapshot(ns)
    with pytest.raises(AgentError, match=r"^nics\[3\]\.vlan: this kernel has no bridge VLAN filtering"):
        agent.call("check_link", nic=nic(vlan=10), index=3)
    with pytest.raises(AgentError) as ei:
        agent.call("apply", journal=j, nic=nic(vlan=10), phase="attach", reason="start")
    assert ei.value.failures[0]["step"] == "bridge-vlan"
    assert snapshot(ns) == before


def test_check_link_bridge_errors(ns, agent, bridge):
    with pytest.raises(AgentError, match=r"^nics\[1\]\.link: bridge 'br9' does not exist$"):
        agent.call("check_link", nic=nic(link="br9"), index=1)
    with pytest.raises(AgentError, match=r"'port0' exists but is not a Linux bridge"):
        agent.call("check_link", nic=nic(link="port0"), index=0)
    agent.call("check_link", nic=nic(), index=0)


# -- openvswitch -------------------------------------------------------------


@pytest.fixture
def ovsbr(ovs):
    ovs.vsctl("add-br", "obr0", "--", "set", "bridge", "obr0", "datapath_type=netdev")
    return ovs


def test_ovs_port_with_tag_and_trunks_replaces_stale_port(ns, agent, ovsbr, tmp_path):
    ovs = ovsbr
    j = str(tmp_path / "j")
    # a stale row from a qemu that died without cleanup (its tap is long gone)
    ovs.vsctl("add-port", "obr0", TAP, "tag=99")
    agent.call("open_tap", name=TAP)
    n = nic(mode="openvswitch", link="obr0", vlan=10, trunks=[30, 20])
    agent.call("check_link", nic=n, index=0, ovs_db=ovs.db)
    agent.call("apply", journal=j, nic=n, phase="attach", reason="start", ovs_db=ovs.db)
    assert TAP in ovs.vsctl("list-ports", "obr0").split()
    assert ovs.vsctl("get", "Port", TAP, "tag").strip() == "10"
    assert ovs.vsctl("get", "Port", TAP, "trunks").strip() == "[20, 30]"
    assert "UP" in link(ns, TAP)["flags"]
    # idempotent
    agent.call("apply", journal=j, nic=n, phase="attach", reason="start", ovs_db=ovs.db)
    assert ovs.vsctl("list-ports", "obr0").split().count(TAP) == 1
    agent.call("undo", journal=j, reason="stop", ovs_db=ovs.db)
    assert TAP not in ovs.vsctl("list-ports", "obr0").split()
    assert "obr0" in ovs.vsctl("list-br").split()


def test_ovs_row_is_removed_after_the_tap_vanished(ns, agent, ovsbr, tmp_path):
    ovs = ovsbr
    j = str(tmp_path / "j")
    agent.call("open_tap", name=TAP)
    n = nic(mode="openvswitch", link="obr0")
    agent.call("apply", journal=j, nic=n, phase="attach", reason="start", ovs_db=ovs.db)
    agent.call("close_tap", name=TAP)
    assert TAP in ovs.vsctl("list-ports", "obr0").split()  # OVS rows do not vanish with the tap
    agent.call("undo", journal=j, reason="crash", ovs_db=ovs.db)
    assert ovs.vsctl("list-ports", "obr0").split() == []


def test_ovs_check_link_missing_bridge(ns, agent, ovs):
    with pytest.raises(AgentError, match=r"^nics\[0\]\.link: openvswitch bridge 'nope' does not exist$"):
        agent.call("check_link", nic=nic(mode="openvswitch", link="nope"), index=0, ovs_db=ovs.db)
