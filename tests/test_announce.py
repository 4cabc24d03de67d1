"""Frame builders for the post-migration announce: every byte pinned, no root needed.

The expected frames are written out field by field from RFC 826 (ARP),
RFC 5227 (announcement), RFC 4861 4.4 (Neighbour Advertisement) and
RFC 8200 (IPv6 header, pseudo-header checksum), not produced by the code
under test.  That the kernel accepts them is the integration test's job.
"""

from __future__ import annotations

import socket
import struct

import pytest

from netconf import NetconfError
from netconf._announce import (
    announce,
    arp_packet,
    checksum,
    garp_reply,
    garp_request,
    icmpv6_checksum,
    mac_bytes,
    na_message,
    pick_source,
    unsolicited_na,
)

MAC = bytes.fromhex("021122334455")
IP4 = socket.inet_aton("10.55.0.9")
LL = socket.inet_pton(socket.AF_INET6, "fe80::11:22ff:fe33:4455")
IP6 = socket.inet_pton(socket.AF_INET6, "fd00:55::9")
ALL_NODES = socket.inet_pton(socket.AF_INET6, "ff02::1")


def h(*parts: str) -> bytes:
    return bytes.fromhex("".join(parts).replace(" ", ""))


def test_mac_bytes():
    assert mac_bytes("02:11:22:33:44:55") == MAC
    assert mac_bytes("02-11-22-33-44-55") == MAC
    with pytest.raises(ValueError):
        mac_bytes("02:11:22:33:44")


def test_arp_packet_layout():
    assert arp_packet(1, MAC, IP4, b"\0" * 6, IP4) == h(
        "0001 0800 06 04 0001",  # htype Ethernet, ptype IPv4, hlen 6, plen 4, op request
        "021122334455 0a370009",  # sender MAC, sender IP
        "000000000000 0a370009",  # target MAC, target IP
    )


def test_garp_request_frame_exact():
    f = garp_request(MAC, IP4)
    assert f == h(
        "ffffffffffff 021122334455 0806",  # broadcast, from our MAC, ARP
        "0001 0800 06 04 0001",
        "021122334455 0a370009",
        "000000000000 0a370009",  # RFC 5227 announcement: tha zero, tpa = spa
        "00" * 18,  # padded to the 60-byte Ethernet minimum
    )
    assert len(f) == 60


def test_garp_reply_frame_exact():
    f = garp_reply(MAC, IP4)
    assert f == h(
        "ffffffffffff 021122334455 0806",
        "0001 0800 06 04 0002",  # op reply
        "021122334455 0a370009",
        "021122334455 0a370009",  # Linux counts a reply as gratuitous only if tha == sha
        "00" * 18,
    )


def test_checksum_rfc1071_example():
    # RFC 1071 section 3: words 0001 f203 f4f5 f6f7 sum to ddf2 (after carry), complement 220d
    assert checksum(h("0001f203f4f5f6f7")) == 0x220D
    assert checksum(h("01")) == ~0x0100 & 0xFFFF  # odd length: padded with a zero byte


def test_na_message_layout_and_checksum():
    m = na_message(LL, ALL_NODES, IP6, MAC)
    assert len(m) == 32
    typ, code, csum, flags = struct.unpack_from("!BBHI", m)
    assert (typ, code) == (136, 0)
    assert flags == 0x20000000  # Override only: R=0 (bit 31), S=0 (bit 30), O=1 (bit 29), reserved 0
    assert m[8:24] == IP6
    assert m[24:] == h("02 01 021122334455")  # option Target Link-Layer Address, length 1 (8 octets)
    # Receiver's check: the sum over pseudo-header + message (checksum included) is all ones.
    pseudo = LL + ALL_NODES + struct.pack("!I", 32) + b"\0\0\0" + bytes([58])
    assert checksum(pseudo + m) == 0
    assert icmpv6_checksum(LL, ALL_NODES, m[:2] + b"\0\0" + m[4:]) == csum


def test_na_flags_are_passed_through():
    m = na_message(LL, ALL_NODES, IP6, MAC, flags=0)
    assert struct.unpack_from("!I", m, 4)[0] == 0


def test_unsolicited_na_frame_exact():
    f = unsolicited_na(MAC, LL, IP6)
    assert f == h(
        "333300000001 021122334455 86dd",  # ff02::1's multicast MAC, from our MAC, IPv6
        "60000000 0020 3a ff",  # version 6, payload 32, next header ICMPv6, hop limit 255
        "fe800000000000000011 22ff fe33 4455",  # source: our link-local
        "ff020000000000000000000000000001",  # all-nodes
        "88 00 8c8d",  # type 136, code 0, checksum
        "20000000",  # O=1 S=0 R=0
        "fd000055000000000000000000000009",  # target: the guest
        "02 01 021122334455",  # Target Link-Layer Address = our MAC
    )
    assert len(f) == 86


def _line(addr: str, ifindex: int, scope: int, flags: int, name: str) -> str:
    a = socket.inet_pton(socket.AF_INET6, addr).hex()
    return f"{a} {ifindex:02x} 40 {scope:02x} {flags:02x} {name:>8}\n"


def test_pick_source_prefers_usable_link_local():
    lines = [
        _line("fd00::2", 4, 0x00, 0x80, "uplink"),
        _line("fe80::1", 4, 0x20, 0x80, "uplink"),
        _line("fe80::9", 5, 0x20, 0x80, "other"),
    ]
    assert pick_source(lines, "uplink") == socket.inet_pton(socket.AF_INET6, "fe80::1")
    assert pick_source(lines, "other") == socket.inet_pton(socket.AF_INET6, "fe80::9")
    assert pick_source(lines, "missing") is None


def test_pick_source_tentative_and_failed():
    tentative_ll = _line("fe80::1", 4, 0x20, 0x40, "uplink")
    global_ok = _line("fd00::2", 4, 0x00, 0x80, "uplink")
    failed_ll = _line("fe80::3", 4, 0x20, 0x08, "uplink")
    # A usable global beats a tentative link-local ...
    assert pick_source([tentative_ll, global_ok], "uplink") == socket.inet_pton(socket.AF_INET6, "fd00::2")
    # ... a tentative link-local beats nothing; a DAD-failed address is never used.
    assert pick_source([failed_ll, tentative_ll], "uplink") == socket.inet_pton(socket.AF_INET6, "fe80::1")
    assert pick_source([failed_ll], "uplink") is None
    # prefix-named interfaces do not match each other
    assert pick_source([_line("fe80::1", 4, 0x20, 0x80, "uplink0")], "uplink") is None


@pytest.mark.parametrize("kw, msg", [
    ({"ip": "10.55.0"}, "ip '10.55.0'"),
    ({"ip6": "fd00::55::9"}, "ip6 'fd00::55::9'"),
    ({"ip": "fd00::9"}, "ip 'fd00::9'"),
    ({"ip": "10.0.0.1", "count": 0}, "count"),
])
def test_bad_arguments_raise_before_sending(kw, msg):
    with pytest.raises(NetconfError, match=msg):
        announce(["uplink0"], **kw)


def test_interfaces_must_be_a_sequence_of_names():
    with pytest.raises(NetconfError, match="list of names"):
        announce("uplink0", ip="10.0.0.1")
