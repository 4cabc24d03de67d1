"""Re-point neighbours at this node right after a live migration: GARP + unsolicited NA.

Why
---
With routed NICs, a neighbour on the uplink (the client, the upstream
router) reaches the guest's address through the node that *proxies* for it:
its ARP/ND cache says "10.55.0.9 is at <old node's uplink MAC>".  When the
guest lands on another node, the neighbour keeps sending to the old node
for up to tens of seconds (an entry stays REACHABLE 15-45 s, then DELAY 5 s
and three unicast probes before it re-resolves).  So, right after the migration
completes, the destination announces on each uplink that the guest's
addresses are at *its* uplink MAC:

* IPv4: a gratuitous ARP request (sender IP = target IP = guest, target MAC
  zero; RFC 5227's "ARP announcement") *and* a gratuitous ARP reply (sender
  IP = target IP, target MAC = sender MAC), both broadcast.
* IPv6: an unsolicited Neighbour Advertisement to ff02::1 (Router=0,
  Solicited=0, Override=1, target = guest, Target Link-Layer Address option =
  uplink MAC), hop limit 255, from the uplink's link-local address.

What a Linux neighbour accepts (net/ipv4/arp.c ``arp_process``,
net/ipv6/ndisc.c ``ndisc_recv_na``; verified in namespaces on 6.18 by
``integration/netconf_announce``):

* ARP: an **existing** entry for the sender IP is updated by *any* ARP
  packet from that IP -- request or reply, ``arp_accept`` does not matter.
  ``arp_accept`` (default 0) only decides whether a *missing* entry is
  created.  The new MAC replaces the old one only with "override", which the
  kernel grants when the entry is older than ``locktime`` (1 s) **or** the
  packet is gratuitous (sender IP == target IP, for a reply also target MAC
  == sender MAC, and the sender IP routes as unicast on the receiver).  A
  gratuitous packet therefore wins even over an entry confirmed a moment
  ago; either the request or the reply alone is enough, we send both
  because other stacks differ (some only honour one kind).  The entry ends
  ``STALE`` (broadcast/request does not prove reachability), so the
  neighbour re-verifies with a unicast probe -- which our proxy ARP answers.
  ``PERMANENT``/``NOARP`` entries are never touched; an entry in ``FAILED``
  or ``INCOMPLETE`` state is filled in.
* IPv6: only an **existing** entry is updated (a router with
  ``forwarding=1`` and ``accept_untracked_na`` may create one).  The MAC is
  replaced only if the NA has **Override=1**; without it a ``REACHABLE``
  entry keeps the old MAC and just turns ``STALE``.  ``FAILED`` entries are
  ignored, hop limit must be 255, a multicast NA must have Solicited=0, and
  ``drop_unsolicited_na=1`` on the receiver drops the lot.

How: whole frames on AF_PACKET, for both families
-------------------------------------------------
The NA could go through an ``AF_INET6``/``IPPROTO_ICMPV6`` raw socket (the
kernel fills in the checksum and source).  We build the whole Ethernet frame
instead, because:

* one mechanism for both families; frames are sent with ``sendto`` naming
  the interface, so they leave exactly there, and the Ethernet source is the
  MAC we just read with SIOCGIFHWADDR in the caller's netns (unlike
  /sys/class/net, which shows the netns /sys was mounted in);
* no dependence on kernel source selection, which fails while the uplink's
  link-local is still tentative (DAD) and differs with ``addr_gen_mode``;
  we choose the source ourselves (see :func:`pick_source`);
* the output is a pure function of its inputs, so unit tests pin every byte,
  checksum included;
* it skips the IPv6 output path, ip6tables OUTPUT and multicast loopback,
  which buy nothing here and cost time.

The packet socket (protocol 0: it receives nothing) is opened once per netns
and kept: closing a packet socket waits for an RCU grace period
(``packet_release`` -> ``synchronize_net``), far longer than the rest of the
work. Frames sent on it are not looped back into our own stack.

Cost: this runs on the migration's critical path, so it is synchronous,
forks nothing and sleeps never: per interface two ioctls, per family one to
two ``sendto`` plus building the frame.  See the measured numbers printed by
``integration/netconf_announce`` (``test_cost_per_interface_and_family``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import threading
import time
from collections.abc import Sequence

from ._types import Failure, JSONObject, NetconfError

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ARPHRD_ETHER = 1
ARPOP_REQUEST = 1
ARPOP_REPLY = 2
ICMPV6_NA = 136
NA_FLAG_ROUTER = 0x80000000
NA_FLAG_SOLICITED = 0x40000000
NA_FLAG_OVERRIDE = 0x20000000
ND_OPT_TARGET_LL = 2

BROADCAST = b"\xff" * 6
ALL_NODES = socket.inet_pton(socket.AF_INET6, "ff02::1")
ALL_NODES_MAC = b"\x33\x33\x00\x00\x00\x01"  # 33:33 + low 32 bits of ff02::1
ETH_MIN = 60  # minimum Ethernet frame without FCS; short frames are padded

# /proc/net/if_inet6 flags (IFA_F_*) and scopes
_IFA_F_DADFAILED = 0x08
_IFA_F_TENTATIVE = 0x40
_SCOPE_LINK = 0x20


# -- pure builders ---------------------------------------------------------


def mac_bytes(mac: str) -> bytes:
    """``"02:00:00:00:00:aa"`` -> 6 bytes."""
    b = bytes.fromhex(mac.replace(":", "").replace("-", ""))
    if len(b) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return b


def ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    """An Ethernet II frame (no FCS), zero-padded to the 60-byte minimum."""
    frame = dst + src + struct.pack("!H", ethertype) + payload
    return frame.ljust(ETH_MIN, b"\0")


def arp_packet(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    """An Ethernet/IPv4 ARP packet (28 bytes)."""
    return struct.pack("!HHBBH6s4s6s4s", ARPHRD_ETHER, ETH_P_IP, 6, 4, op, sha, spa, tha, tpa)


def garp_request(mac: bytes, ip: bytes) -> bytes:
    """Gratuitous ARP request frame: "who has IP? tell IP at MAC", broadcast (RFC 5227 announcement)."""
    return ethernet(BROADCAST, mac, ETH_P_ARP, arp_packet(ARPOP_REQUEST, mac, ip, b"\0" * 6, ip))


def garp_reply(mac: bytes, ip: bytes) -> bytes:
    """Gratuitous ARP reply frame: "IP is at MAC", target = sender (Linux requires tha == sha), broadcast."""
    return ethernet(BROADCAST, mac, ETH_P_ARP, arp_packet(ARPOP_REPLY, mac, ip, mac, ip))


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def icmpv6_checksum(src: bytes, dst: bytes, icmp: bytes) -> int:
    """ICMPv6 checksum over the IPv6 pseudo-header (RFC 8200 8.1) and the message."""
    return checksum(src + dst + struct.pack("!I3xB", len(icmp), socket.IPPROTO_ICMPV6) + icmp)


def na_message(src: bytes, dst: bytes, target: bytes, mac: bytes, flags: int = NA_FLAG_OVERRIDE) -> bytes:
    """ICMPv6 Neighbour Advertisement (RFC 4861 4.4) with a Target Link-Layer Address option, checksummed."""
    body = struct.pack("!I16sBB6s", flags, target, ND_OPT_TARGET_LL, 1, mac)
    csum = icmpv6_checksum(src, dst, struct.pack("!BBH", ICMPV6_NA, 0, 0) + body)
    return struct.pack("!BBH", ICMPV6_NA, 0, csum) + body


def ipv6_packet(src: bytes, dst: bytes, next_header: int, payload: bytes, hop_limit: int = 255) -> bytes:
    """An IPv6 header (version 6, traffic class 0, flow label 0) plus ``payload``."""
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, hop_limit, src, dst) + payload


def unsolicited_na(mac: bytes, src: bytes, target: bytes) -> bytes:
    """The whole frame: ``target`` is at ``mac`` (O=1, S=0, R=0), from ``src`` to ff02::1, hop limit 255."""
    na = na_message(src, ALL_NODES, target, mac)
    return ethernet(ALL_NODES_MAC, mac, ETH_P_IPV6, ipv6_packet(src, ALL_NODES, socket.IPPROTO_ICMPV6, na))


def pick_source(lines: Sequence[str], ifname: str) -> bytes | None:
    """Choose the NA's source from /proc/net/if_inet6 lines for ``ifname``.

    Preference: a usable link-local, then any other usable address on the
    interface, then a tentative link-local (the kernel would refuse it as a
    source, but receivers do not check and an announce beats none).  An
    address whose DAD failed is never used.  ``None``: no IPv6 on it.
    """
    best, best_rank = None, 99
    for line in lines:
        f = line.split()
        if len(f) != 6 or f[5] != ifname:
            continue
        scope, flags = int(f[3], 16), int(f[4], 16)
        if flags & _IFA_F_DADFAILED:
            continue
        tentative = bool(flags & _IFA_F_TENTATIVE)
        rank = (0 if scope == _SCOPE_LINK else 1) if not tentative else (2 if scope == _SCOPE_LINK else 99)
        if rank < best_rank:
            best, best_rank = bytes.fromhex(f[0]), rank
    return best


# -- the side effects -------------------------------------------------------


SIOCGIFHWADDR = 0x8927
SIOCGIFINDEX = 0x8933

# One unbound, protocol-0 packet socket for the netns we run in (it receives
# nothing). Cached because closing a packet socket costs a whole RCU grace
# period (packet_release -> synchronize_net), which would be most of
# announce()'s time. Keyed by the calling thread's netns inode; only the
# latest netns is kept, so at most one namespace is pinned. A socket keeps
# its netns alive, so the inode cannot be reused under us. announce() is
# meant for one thread (netconf's worker): a switch of netns closes the
# previous socket, which another thread might still be using.
_cache: tuple[int, socket.socket] | None = None
_cache_lock = threading.Lock()


def _netns_key() -> int:
    try:
        return os.stat("/proc/thread-self/ns/net").st_ino
    except OSError:
        return 0


def _packet_socket() -> socket.socket:
    global _cache
    key = _netns_key()
    with _cache_lock:
        if _cache is not None and _cache[0] == key:
            return _cache[1]
        try:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except OSError as e:  # EPERM without CAP_NET_RAW
            raise NetconfError(f"announce: cannot open a packet socket: {e}") from e
        old, _cache = _cache, (key, s)
    if old is not None:
        old[1].close()  # slow (see above), but only when the netns changes
    return _cache[1]


def _resolve(s: socket.socket, ifname: str) -> tuple[bytes, int]:
    """``ifname``'s MAC and ifindex, in the socket's netns (unlike /sys/class/net, which is the mount's)."""
    if not isinstance(ifname, str):
        raise NetconfError(f"announce: interface name must be a string, not {ifname!r}")
    name = ifname.encode()
    if not 0 < len(name) < 16 or b"\0" in name:
        raise NetconfError(f"announce: {ifname!r} is not a valid interface name")
    try:
        hw = fcntl.ioctl(s, SIOCGIFHWADDR, struct.pack("16s16x", name))
        ifindex = struct.unpack_from("@i", fcntl.ioctl(s, SIOCGIFINDEX, struct.pack("16s16x", name)), 16)[0]
    except OSError as e:
        if e.errno == errno.ENODEV:
            raise NetconfError(f"announce: interface {ifname!r} does not exist") from e
        raise NetconfError(f"announce: cannot use interface {ifname!r}: {e}") from e
    hatype = struct.unpack_from("@H", hw, 16)[0]
    if hatype != ARPHRD_ETHER:
        raise NetconfError(f"announce: interface {ifname!r} is not Ethernet (ARPHRD {hatype})")
    return hw[18:24], ifindex


def _send(s: socket.socket, ifname: str, ethertype: int, frames: Sequence[bytes], count: int) -> int:
    sent = 0
    for _ in range(count):
        for f in frames:
            s.sendto(f, (ifname, ethertype))
            sent += 1
    return sent


def _read_if_inet6() -> list[str]:
    try:
        with open("/proc/net/if_inet6") as f:
            return f.readlines()
    except FileNotFoundError:  # IPv6 disabled on the host
        return []


def _parse(addr: str | None, family: int, what: str) -> bytes | None:
    if addr is None:
        return None
    try:
        return socket.inet_pton(family, addr)
    except (OSError, ValueError, TypeError) as e:
        raise NetconfError(f"announce: {what} {addr!r} is not a valid address") from e


def announce(interfaces: Sequence[str], *, ip: str | None = None, ip6: str | None = None,
             count: int = 1) -> list[JSONObject]:
    """Tell the neighbours on each of ``interfaces`` that ``ip``/``ip6`` are at that interface's MAC.

    Sends ``count`` rounds back to back (no sleeping: this is the critical
    path; a caller wanting spaced repeats calls again later).  Per round:
    GARP request + GARP reply for ``ip``, one unsolicited NA for ``ip6``.

    Returns one dict per (interface, family): ``interface``, ``ifindex``,
    ``mac``, ``family`` (``"inet"``/``"inet6"``), ``ip``, ``frames`` (sent),
    ``us`` (time spent on that family), ``resolve_us`` (looking up the
    interface's MAC and ifindex, shared by its families), ``error`` (``None`` or text; a
    send error such as ENETDOWN does not stop the others) and, for inet6,
    ``src``.

    ``announce([])`` sends nothing: it opens the cached socket and runs the
    builders once, which takes those one-time costs off the first real call
    (a migration's).  Call it on the worker thread at startup.

    Raises :class:`NetconfError` for a bad address or count, before sending
    anything.  Interfaces that do not exist (or are not Ethernet) are
    skipped while the others are still announced, then NetconfError names
    them; its ``failures`` list them and its ``results`` attribute carries
    the results of the interfaces that were announced.
    """
    if isinstance(interfaces, str):
        raise NetconfError("announce: interfaces must be a list of names, not a string")
    if count < 1:
        raise NetconfError(f"announce: count must be >= 1, not {count}")
    v4 = _parse(ip, socket.AF_INET, "ip")
    v6 = _parse(ip6, socket.AF_INET6, "ip6")
    results: list[JSONObject] = []
    failures: list[Failure] = []
    if6_lines: list[list[str]] = []  # /proc/net/if_inet6, read once, by the first inet6 announce
    s = _packet_socket()
    if not interfaces:
        _warm_up(s)
    for ifname in interfaces:
        t0 = time.perf_counter()
        try:
            mac, ifindex = _resolve(s, ifname)
        except NetconfError as e:
            failures.append({"step": "announce", "interface": ifname, "error": str(e)})
            continue
        base: JSONObject = {"interface": ifname, "ifindex": ifindex, "mac": mac.hex(":"),
                "resolve_us": round((time.perf_counter() - t0) * 1e6, 1)}
        if v4 is not None:
            results.append(_announce_v4(s, ifname, mac, v4, ip, count, base))
        if v6 is not None:
            results.append(_announce_v6(s, ifname, mac, v6, ip6, count, base, if6_lines))
    if failures:
        err = NetconfError("announce: " + "; ".join(str(f["error"]).removeprefix("announce: ") for f in failures),
                           failures)
        err.results = results
        raise err
    return results


def _warm_up(s: socket.socket) -> None:
    """Exercise every code path of a real announce except the sends (see :func:`announce`)."""
    try:
        _resolve(s, "lo")
    except NetconfError:  # lo is not Ethernet: that path is warm too
        pass
    mac, v4, v6 = b"\x02" + bytes(5), bytes(4), bytes(16)
    garp_request(mac, v4), garp_reply(mac, v4)
    src = pick_source(_read_if_inet6(), "lo") or v6
    unsolicited_na(mac, src, v6)
    socket.inet_ntop(socket.AF_INET6, src)


def _announce_v4(s: socket.socket, ifname: str, mac: bytes, v4: bytes, ip: str | None, count: int,
                 base: JSONObject) -> JSONObject:
    t0 = time.perf_counter()
    r: JSONObject = dict(base, family="inet", ip=ip, frames=0, error=None)
    try:
        r["frames"] = _send(s, ifname, ETH_P_ARP, (garp_request(mac, v4), garp_reply(mac, v4)), count)
    except OSError as e:
        r["error"] = str(e)
    r["us"] = round((time.perf_counter() - t0) * 1e6, 1)
    return r


def _announce_v6(s: socket.socket, ifname: str, mac: bytes, v6: bytes, ip6: str | None, count: int,
                 base: JSONObject, if6_lines: list[list[str]]) -> JSONObject:
    t0 = time.perf_counter()
    r: JSONObject = dict(base, family="inet6", ip=ip6, src=None, frames=0, error=None)
    if not if6_lines:
        if6_lines.append(_read_if_inet6())
    src = pick_source(if6_lines[0], ifname)
    if src is None:
        r["error"] = f"no usable IPv6 address on {ifname} to send the advertisement from"
    else:
        r["src"] = socket.inet_ntop(socket.AF_INET6, src)
        try:
            r["frames"] = _send(s, ifname, ETH_P_IPV6, (unsolicited_na(mac, src, v6),), count)
        except OSError as e:
            r["error"] = str(e)
    r["us"] = round((time.perf_counter() - t0) * 1e6, 1)
    return r
