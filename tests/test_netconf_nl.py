"""The hand-packed netlink requests decode, with pyroute2's own parser, to what we meant.

The hot path packs messages with ``struct`` for speed (see netconf/_nl.py);
this checks the bytes against pyroute2's independent decoder, including the
bridge VLAN request that the test kernel cannot execute.
"""

import socket
import struct

import pytest
from pyroute2.netlink.rtnl import RTM_DELLINK, RTM_DELROUTE, RTM_NEWADDR, RTM_NEWROUTE, RTM_NEWRULE, RTM_SETLINK
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from netconf._nl import RTPROT_QSUP, Netlink, parse_nlas


@pytest.fixture
def sent(monkeypatch):
    nl = Netlink()
    out = []
    monkeypatch.setattr(nl, "request", lambda mtype, body, flags=0: out.append((mtype, body, flags)))
    yield nl, out
    nl.close()


def decode(mtype, body):
    data = struct.pack("=IHHII", 16 + len(body), mtype, 0, 1, 0) + body
    (msg,) = list(MarshalRtnl().parse(data))
    return msg


def test_route_add_and_del(sent):
    nl, out = sent
    nl.route_add(socket.AF_INET, "10.0.0.5", 32, 1000, 7)
    nl.route_del(socket.AF_INET6, "2001:db8::5", 128, 254, 7)
    m = decode(*out[0][:2])
    assert out[0][0] == RTM_NEWROUTE
    assert (m["family"], m["dst_len"], m["proto"], m["scope"]) == (2, 32, RTPROT_QSUP, 253)
    assert m.get_attr("RTA_DST") == "10.0.0.5" and m.get_attr("RTA_OIF") == 7 and m.get_attr("RTA_TABLE") == 1000
    assert m["table"] == 252  # RT_TABLE_COMPAT: the real table is in RTA_TABLE
    d = decode(*out[1][:2])
    assert out[1][0] == RTM_DELROUTE and d.get_attr("RTA_DST") == "2001:db8::5" and d["proto"] == RTPROT_QSUP


def test_rule(sent):
    nl, out = sent
    nl.rule_add(socket.AF_INET6, "qsabc", 100)
    m = decode(*out[0][:2])
    assert out[0][0] == RTM_NEWRULE and m["family"] == 10 and m["action"] == 1
    assert m.get_attr("FRA_IIFNAME") == "qsabc" and m.get_attr("FRA_TABLE") == 100
    assert m.get_attr("FRA_PROTOCOL") == RTPROT_QSUP


def test_addr(sent):
    nl, out = sent
    nl.addr_add(socket.AF_INET6, 9, "fe80::1", 64)
    m = decode(*out[0][:2])
    assert out[0][0] == RTM_NEWADDR and (m["index"], m["prefixlen"], m["scope"]) == (9, 64, 253)
    assert m.get_attr("IFA_ADDRESS") == "fe80::1" and m.get_attr("IFA_FLAGS") & 0x02
    assert m.get_attr("IFA_PROTO") == RTPROT_QSUP


def test_link_set(sent):
    nl, out = sent
    nl.link_set(4, up=True, mtu=1400, master=3, address="fe:54:00:12:34:56")
    nl.link_set(4, up=False)
    m = decode(*out[0][:2])
    assert out[0][0] == RTM_SETLINK and m["index"] == 4 and m["flags"] & 1 and m["change"] & 1
    assert (m.get_attr("IFLA_MTU"), m.get_attr("IFLA_MASTER"), m.get_attr("IFLA_ADDRESS")) == \
        (1400, 3, "fe:54:00:12:34:56")
    d = decode(*out[1][:2])
    assert d["change"] & 1 and not d["flags"] & 1


def test_bridge_vlan(sent):
    nl, out = sent
    nl.bridge_vlan(True, 5, 10, 6)
    nl.bridge_vlan(False, 5, 1)
    m = decode(*out[0][:2])
    assert out[0][0] == RTM_SETLINK and m["family"] == 7 and m["index"] == 5
    (info,) = [v for k, v in m.get_attr("IFLA_AF_SPEC")["attrs"] if k == "IFLA_BRIDGE_VLAN_INFO"]
    assert (info["vid"], info["flags"]) == (10, 6)
    assert out[1][0] == RTM_DELLINK


def test_parse_nlas_pads_and_masks_flags():
    blob = struct.pack("=HH", 5, 3) + b"x\0\0\0" + struct.pack("=HH", 8, 0x8000 | 15) + struct.pack("=I", 7)
    assert parse_nlas(blob, 0, len(blob)) == {3: b"x", 15: struct.pack("=I", 7)}


def test_neigh_add_and_del(sent):
    from pyroute2.netlink.rtnl import RTM_DELNEIGH, RTM_NEWNEIGH

    nl, out = sent
    nl.neigh_add(socket.AF_INET, 7, "10.0.0.5", "52:54:00:aa:bb:cc")
    nl.neigh_del(socket.AF_INET6, 7, "2001:db8::5")
    mtype, body, flags = out[0]
    m = decode(mtype, body)
    assert mtype == RTM_NEWNEIGH and flags & 0x400 and flags & 0x100  # NLM_F_CREATE | NLM_F_REPLACE
    assert (m["family"], m["ifindex"], m["state"]) == (2, 7, 0x80)  # NUD_PERMANENT
    assert m.get_attr("NDA_DST") == "10.0.0.5" and m.get_attr("NDA_LLADDR") == "52:54:00:aa:bb:cc"
    assert m.get_attr("NDA_PROTOCOL") == RTPROT_QSUP
    d = decode(*out[1][:2])
    assert out[1][0] == RTM_DELNEIGH and (d["family"], d["ifindex"]) == (10, 7)
    assert d.get_attr("NDA_DST") == "2001:db8::5"
