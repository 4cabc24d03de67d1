"""The plan is pure and deterministic, and its step names are a public contract."""

import json

import pytest

from netconf import STEP_NAMES, Nic, Step, plan
from netconf._hooks import ACTIVATE_STEPS, ATTACH_STEPS
from netconf._plan import fe_mac

MAC = "52:54:00:AB:cd:01"


def nic(**kw):
    base = dict(instance="vm1", mac=MAC, mode="routed", tap="qsabc")
    base.update(kw)
    return Nic(**base)


def names(p):
    return [s.name for s in p]


def test_step_names_match_the_hooks_contract():
    assert STEP_NAMES["attach"] == ATTACH_STEPS
    assert STEP_NAMES["activate"] == ACTIVATE_STEPS


def test_routed_v4_main_table():
    p = plan(nic(ip="10.0.0.5"), "activate")
    assert names(p) == ["sysctl-ipv4", "neigh4", "route4"]
    sysctl, neigh, route = p
    # the guest's address resolves without ARP: its MAC is the spec's (see NeighOp)
    assert neigh.args == {"family": 4, "ifname": "qsabc", "address": "10.0.0.5", "mac": MAC}
    assert sysctl.args["keys"] == [["net/ipv4/conf/qsabc/proxy_arp", "1"], ["net/ipv4/conf/qsabc/forwarding", "1"]]
    assert route.args == {"family": 4, "dst": "10.0.0.5", "plen": 32, "ifname": "qsabc", "table": "main"}
    assert all(s.phase == "activate" and s.nic_id == MAC.lower() for s in p)


def test_routed_v4_v6_with_table_link():
    p = plan(nic(ip="10.0.0.5", ip6="2001:db8::5", link="guests"), "activate")
    assert names(p) == ["sysctl-ipv4", "neigh4", "route4", "rule4", "sysctl-ipv6", "gw6", "neigh6", "route6",
                        "rule6"]
    by = {s.name: s for s in p}
    assert by["rule4"].args == {"family": 4, "iifname": "qsabc", "table": "guests"}
    assert by["rule6"].args["family"] == 6
    assert by["route6"].args == {"family": 6, "dst": "2001:db8::5", "plen": 128, "ifname": "qsabc", "table": "guests"}
    assert by["gw6"].args == {"family": 6, "ifname": "qsabc", "address": "fe80::1", "plen": 64}
    assert by["sysctl-ipv6"].args["keys"] == [["net/ipv6/conf/qsabc/proxy_ndp", "1"],
                                              ["net/ipv6/conf/qsabc/forwarding", "1"]]


def test_routed_v6_only():
    assert names(plan(nic(ip6="2001:db8::5"), "activate")) == ["sysctl-ipv6", "gw6", "neigh6", "route6"]


def test_routed_attach_is_tap_up_only_with_mtu():
    p = plan(nic(ip="10.0.0.5", mtu=1400), "attach")
    assert names(p) == ["tap-up"]
    assert p[0].args == {"ifname": "qsabc", "mtu": 1400}


@pytest.mark.parametrize("mode", ["bridged", "openvswitch"])
def test_l2_modes_have_empty_activate(mode):
    assert plan(nic(mode=mode, link="br0", ip="10.0.0.5"), "activate") == ()


def test_bridged_attach_plain():
    p = plan(nic(mode="bridged", link="br0"), "attach")
    assert names(p) == ["tap-up", "bridge-port"]
    assert p[1].args == {"ifname": "qsabc", "bridge": "br0", "mac": "fe:54:00:ab:cd:01"}


def test_bridged_access_vlan_drops_default():
    p = plan(nic(mode="bridged", link="br0", vlan=10), "attach")
    assert names(p) == ["tap-up", "bridge-port", "bridge-vlan"]
    assert p[2].args == {"ifname": "qsabc", "bridge": "br0", "pvid": 10, "tagged": [], "drop_default": True}


def test_bridged_trunk_keeps_default_without_access_vlan():
    p = plan(nic(mode="bridged", link="br0", trunks=(30, 20, 20)), "attach")
    assert p[2].args == {"ifname": "qsabc", "bridge": "br0", "pvid": None, "tagged": [20, 30], "drop_default": False}


def test_bridged_vlan_1_keeps_default():
    p = plan(nic(mode="bridged", link="br0", vlan=1, trunks=(5,)), "attach")
    assert p[2].args["drop_default"] is False and p[2].args["tagged"] == [5]


def test_ovs_attach():
    p = plan(nic(mode="openvswitch", link="ovsbr", vlan=7, trunks=(9, 8)), "attach")
    assert names(p) == ["tap-up", "ovs-port"]
    assert p[1].args == {"bridge": "ovsbr", "port": "qsabc", "tag": 7, "trunks": [8, 9]}


def test_fe_mac():
    assert fe_mac("52:54:00:12:34:56") == "fe:54:00:12:34:56"
    assert fe_mac("02:AA:00:12:34:56") == "fe:aa:00:12:34:56"


@pytest.mark.parametrize("n", [
    nic(ip="10.0.0.5", ip6="2001:db8::5", link="7"),
    nic(mode="bridged", link="br0", vlan=3, trunks=(4,), mtu=9000),
    nic(mode="openvswitch", link="ovs", trunks=(4, 5)),
])
@pytest.mark.parametrize("phase", ["attach", "activate"])
def test_plan_is_deterministic_json_and_does_not_touch_the_nic(n, phase):
    before = n.to_dict()
    a, b = plan(n, phase), plan(n, phase)
    assert a == b and a.nic is n
    assert n.to_dict() == before
    blob = json.dumps([s.to_dict() for s in a])
    assert [Step.from_dict(d) for d in json.loads(blob)] == list(a)
    assert all(hash(s) == hash(Step.from_dict(s.to_dict())) for s in a)


def test_down_phases_are_not_planned():
    with pytest.raises(ValueError, match="journal"):
        plan(nic(ip="10.0.0.5"), "deactivate")


def test_plan_does_no_io(monkeypatch):
    import builtins
    import os

    def boom(*a, **k):
        raise AssertionError("plan did I/O")

    monkeypatch.setattr(builtins, "open", boom)
    monkeypatch.setattr(os, "stat", boom)
    monkeypatch.setattr(os, "listdir", boom)
    plan(nic(ip="10.0.0.5", ip6="2001:db8::5", link="guests"), "activate")
    plan(nic(mode="bridged", link="br0", vlan=3), "attach")
