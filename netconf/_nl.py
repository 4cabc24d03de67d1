"""A small, blocking rtnetlink client: pyroute2's message classes over a plain socket.

Why not ``pyroute2.IPRoute`` directly? pyroute2 0.9's synchronous
``IPRoute`` drives an asyncio loop for every call, which costs far more than
the kernel round trip on a plain ``AF_NETLINK`` socket. A routed NIC
activation needs about seven requests on a migration's critical path, so
that layer, not the kernel, would decide how long the activation takes. Even
pyroute2's generic NLA *encoder* costs more per message than the round trip.
So the hot requests (route, rule, address, link set, bridge VLAN) are packed
here with ``struct`` (a handful of fixed headers and flat attributes), the
rule dump on the hot path is parsed the same way, and pyroute2's
``MarshalRtnl`` decodes the cold dumps (routes on a conflict, bridge VLAN
tables) where its full attribute decoding is worth its cost. I/O is ours:
send one request, read until the ACK (or the end of a dump), map a negative
errno to ``OSError``.

The socket is not thread-safe and is meant to live on ONE thread: use
:func:`netlink` which hands out one client per thread (the
:class:`~netconf.NetconfWorker` thread in the daemon, the main thread in
tests and drivers).

Reading link state goes through ``/sys/class/net`` instead (mtu, address,
flags, master): a sysfs read is one small ``read`` and needs no decoding.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
import threading
from typing import Any, TypedDict

from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
)
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELNEIGH,
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_GETLINK,
    RTM_GETROUTE,
    RTM_GETRULE,
    RTM_NEWADDR,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    RTM_NEWRULE,
    RTM_SETLINK,
)
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

#: Our route/rule/address "protocol" marker.  The kernel keeps it on the
#: object, so after a crash we can tell a route *we* added from an identical
#: one somebody else made (``proto boot``/``static``...).  152 is unassigned
#: in iproute2's rt_protos.
RTPROT_QSUP = 152

NLMSG_ERROR = 2
NLMSG_DONE = 3
AF_BRIDGE = 7
RTEXT_FILTER_BRVLAN = 2
BRIDGE_VLAN_INFO_PVID = 2
BRIDGE_VLAN_INFO_UNTAGGED = 4
IFA_F_NODAD = 0x02
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RTN_UNICAST = 1
FR_ACT_TO_TBL = 1
IFF_UP = 1

_HDR = struct.Struct("=IHHII")


_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg and fib_rule_hdr share this layout
_IFADDR = struct.Struct("=BBBBI")
_IFINFO = struct.Struct("=BxHiII")
_NLA = struct.Struct("=HH")
_NDMSG = struct.Struct("=BxxxiHBB")  # ndmsg: family, ifindex, state, flags, type

RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
FRA_IIFNAME, FRA_PRIORITY, FRA_TABLE, FRA_PROTOCOL = 3, 6, 15, 21
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS, IFA_PROTO = 1, 2, 8, 11
IFLA_ADDRESS, IFLA_MTU, IFLA_MASTER, IFLA_AF_SPEC, IFLA_EXT_MASK = 1, 4, 10, 26, 29
IFLA_BRIDGE_VLAN_INFO = 2
RT_SCOPE_NOWHERE = 255
NDA_DST, NDA_LLADDR, NDA_PROTOCOL = 1, 2, 12
NUD_PERMANENT = 0x80


class Route(TypedDict):
    """A route as :meth:`Netlink.routes` reports it and :meth:`Netlink.route_restore` puts it back."""

    family: int
    dst: str
    dst_len: int
    table: int
    oif: int | None
    gateway: str | None
    proto: int
    scope: int
    type: int


class Rule(TypedDict):
    """A rule as :meth:`Netlink.rules` reports it."""

    iifname: str | None
    table: int
    priority: int
    proto: int
    action: int


def nla(kind: int, payload: bytes) -> bytes:
    """One netlink attribute (type-length-value, padded to 4 bytes)."""
    n = 4 + len(payload)
    return _NLA.pack(n, kind) + payload + b"\0" * ((-n) & 3)


def _u32(kind: int, v: int) -> bytes:
    return nla(kind, struct.pack("=I", v))


def _ip(family: int, addr: str) -> bytes:
    return socket.inet_pton(family, addr)


def _mac(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def parse_nlas(data: bytes, off: int, end: int) -> dict[int, bytes]:
    """type -> payload for the flat attributes in ``data[off:end]``."""
    out: dict[int, bytes] = {}
    while off + 4 <= end:
        n, kind = _NLA.unpack_from(data, off)
        if n < 4:
            break
        out[kind & 0x3FFF] = data[off + 4:off + n]
        off += (n + 3) & ~3
    return out


class Netlink:
    """One NETLINK_ROUTE socket with request/ack and dump helpers."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((0, 0))
        self._seq = itertools.count(1)
        self._marshal = MarshalRtnl()

    def close(self) -> None:
        self.sock.close()

    # -- transport ---------------------------------------------------------

    def _send(self, mtype: int, flags: int, body: bytes) -> int:
        seq = next(self._seq)
        self.sock.send(_HDR.pack(16 + len(body), mtype, flags, seq, 0) + body)
        return seq

    def request(self, mtype: int, body: bytes, flags: int = 0) -> None:
        """Send a change request and wait for its ACK; raise ``OSError`` on error."""
        seq = self._send(mtype, NLM_F_REQUEST | NLM_F_ACK | flags, body)
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, typ, _fl, mseq, _pid = _HDR.unpack_from(data, off)
                if mseq == seq and typ == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, off + 16)[0]
                    if code:
                        raise OSError(code, f"netlink: {os.strerror(code)}")
                    return
                off += (length + 3) & ~3 if length else len(data)

    def dump_raw(self, mtype: int, body: bytes) -> list[tuple[int, bytes, int, int]]:
        """Dump request; returns ``(type, buffer, offset, length)`` per reply message."""
        seq = self._send(mtype, NLM_F_REQUEST | NLM_F_DUMP, body)
        out: list[tuple[int, bytes, int, int]] = []
        while True:
            data = self.sock.recv(1 << 20)
            off = 0
            while off + 16 <= len(data):
                length, typ, _fl, mseq, _pid = _HDR.unpack_from(data, off)
                if not length:
                    break
                if mseq == seq:
                    if typ == NLMSG_DONE:
                        return out
                    if typ == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, off + 16)[0]
                        if code:
                            raise OSError(code, f"netlink dump: {os.strerror(code)}")
                    else:
                        out.append((typ, data, off, length))
                off += (length + 3) & ~3

    def dump(self, mtype: int, body: bytes) -> list[Any]:
        """Dump request decoded by pyroute2 (cold paths only: full attribute decoding)."""
        msgs: list[Any] = []  # pyroute2's message objects (untyped)
        for _typ, data, off, length in self.dump_raw(mtype, body):
            msgs.extend(self._marshal.parse(data[off:off + length]))
        return msgs

    # -- routes ------------------------------------------------------------

    @staticmethod
    def _route_body(family: int, dst: str, plen: int, table: int, oif: int | None, proto: int,
                    scope: int | None = None, rtype: int = RTN_UNICAST, gateway: str | None = None) -> bytes:
        if scope is None:
            scope = RT_SCOPE_LINK if family == socket.AF_INET else RT_SCOPE_UNIVERSE
        body = _RTMSG.pack(family, plen, 0, 0, table if table < 256 else 252, proto, scope, rtype, 0)
        body += nla(RTA_DST, _ip(family, dst)) + _u32(RTA_TABLE, table)
        if oif is not None:
            body += _u32(RTA_OIF, oif)
        if gateway:
            body += nla(RTA_GATEWAY, _ip(family, gateway))
        return body

    def route_add(self, family: int, dst: str, plen: int, table: int, oif: int, *, replace: bool = False) -> None:
        """Add (exclusively) or replace a device route tagged ``RTPROT_QSUP``."""
        flags = NLM_F_CREATE | (NLM_F_REPLACE if replace else NLM_F_EXCL)
        self.request(RTM_NEWROUTE, self._route_body(family, dst, plen, table, oif, RTPROT_QSUP), flags)

    def route_restore(self, r: Route) -> None:
        """Put back a route captured by :meth:`routes` (replace semantics)."""
        body = self._route_body(r["family"], r["dst"], r["dst_len"], r["table"], r.get("oif"), r["proto"],
                                r["scope"], r["type"], r.get("gateway"))
        self.request(RTM_NEWROUTE, body, NLM_F_CREATE | NLM_F_REPLACE)

    def route_del(self, family: int, dst: str, plen: int, table: int, oif: int, *, proto: int = RTPROT_QSUP) -> None:
        """Delete the route only if dst/table/oif/proto all match (the kernel checks)."""
        self.request(RTM_DELROUTE, self._route_body(family, dst, plen, table, oif, proto, RT_SCOPE_NOWHERE, 0))

    def routes(self, family: int, table: int, dst: str, plen: int) -> list[Route]:
        """The routes to exactly ``dst/plen`` in ``table`` (simple dicts)."""
        out: list[Route] = []
        for r in self.dump(RTM_GETROUTE, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
            rt_table = r.get_attr("RTA_TABLE") or r["table"]
            if rt_table != table or r["dst_len"] != plen or r.get_attr("RTA_DST") != dst:
                continue
            out.append({
                "family": family, "dst": dst, "dst_len": plen, "table": table,
                "oif": r.get_attr("RTA_OIF"), "gateway": r.get_attr("RTA_GATEWAY"),
                "proto": r["proto"], "scope": r["scope"], "type": r["type"],
            })
        return out

    # -- rules -------------------------------------------------------------

    @staticmethod
    def _rule_body(family: int, iifname: str, table: int, proto: int | None) -> bytes:
        body = _RTMSG.pack(family, 0, 0, 0, table if table < 256 else 252, 0, 0, FR_ACT_TO_TBL, 0)
        body += _u32(FRA_TABLE, table) + nla(FRA_IIFNAME, iifname.encode() + b"\0")
        if proto is not None:
            body += nla(FRA_PROTOCOL, bytes([proto]))
        return body

    def rules(self, family: int) -> list[Rule]:
        """All rules of ``family`` as dicts (iifname, table, priority, proto, action)."""
        out: list[Rule] = []
        for _typ, data, off, length in self.dump_raw(RTM_GETRULE, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
            hdr = _RTMSG.unpack_from(data, off + 16)
            a = parse_nlas(data, off + 28, off + length)
            iif = a.get(FRA_IIFNAME)
            out.append({
                "iifname": iif.rstrip(b"\0").decode() if iif else None,
                "table": struct.unpack("=I", a[FRA_TABLE])[0] if FRA_TABLE in a else hdr[4],
                "priority": struct.unpack("=I", a[FRA_PRIORITY])[0] if FRA_PRIORITY in a else 0,
                "proto": a[FRA_PROTOCOL][0] if FRA_PROTOCOL in a else 0,
                "action": hdr[7],
            })
        return out

    def rule_add(self, family: int, iifname: str, table: int) -> None:
        self.request(RTM_NEWRULE, self._rule_body(family, iifname, table, RTPROT_QSUP), NLM_F_CREATE)

    def rule_del(self, family: int, iifname: str, table: int) -> None:
        """Delete one ``iif X lookup T proto qsup`` rule; foreign rules never match."""
        self.request(RTM_DELRULE, self._rule_body(family, iifname, table, RTPROT_QSUP))

    # -- addresses ---------------------------------------------------------

    @staticmethod
    def _addr_body(family: int, index: int, address: str, plen: int, flags: int = 0) -> bytes:
        scope = RT_SCOPE_LINK if address.lower().startswith("fe80") else RT_SCOPE_UNIVERSE
        body = _IFADDR.pack(family, plen, flags, scope, index)
        body += nla(IFA_LOCAL if family == socket.AF_INET else IFA_ADDRESS, _ip(family, address))
        return body

    def addr_add(self, family: int, index: int, address: str, plen: int) -> None:
        """Add an address exclusively, without DAD, tagged ``RTPROT_QSUP``."""
        body = self._addr_body(family, index, address, plen, IFA_F_NODAD)
        body += _u32(IFA_FLAGS, IFA_F_NODAD) + nla(IFA_PROTO, bytes([RTPROT_QSUP]))
        self.request(RTM_NEWADDR, body, NLM_F_CREATE | NLM_F_EXCL)

    def addr_del(self, family: int, index: int, address: str, plen: int) -> None:
        self.request(RTM_DELADDR, self._addr_body(family, index, address, plen))

    # -- neighbours --------------------------------------------------------

    @staticmethod
    def _neigh_body(family: int, index: int, address: str, mac: str | None = None) -> bytes:
        body = _NDMSG.pack(family, index, NUD_PERMANENT, 0, 0) + nla(NDA_DST, _ip(family, address))
        if mac is not None:
            body += nla(NDA_LLADDR, _mac(mac)) + nla(NDA_PROTOCOL, bytes([RTPROT_QSUP]))
        return body

    def neigh_add(self, family: int, index: int, address: str, mac: str) -> None:
        """``ip neigh replace ADDRESS lladdr MAC dev INDEX nud permanent proto qsup``."""
        self.request(RTM_NEWNEIGH, self._neigh_body(family, index, address, mac), NLM_F_CREATE | NLM_F_REPLACE)

    def neigh_del(self, family: int, index: int, address: str) -> None:
        self.request(RTM_DELNEIGH, self._neigh_body(family, index, address))

    # -- links -------------------------------------------------------------

    def link_set(self, index: int, *, up: bool | None = None, mtu: int | None = None,
                 master: int | None = None, address: str | None = None) -> None:
        """``ip link set``: any of up/down, MTU, master (0 = nomaster), MAC."""
        change = IFF_UP if up is not None else 0
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, change)
        if mtu is not None:
            body += _u32(IFLA_MTU, mtu)
        if master is not None:
            body += _u32(IFLA_MASTER, master)
        if address is not None:
            body += nla(IFLA_ADDRESS, _mac(address))
        self.request(RTM_SETLINK, body)

    def bridge_vlans(self, index: int) -> list[tuple[int, int]]:
        """``[(vid, flags)]`` configured on bridge port ``index``."""
        body = _IFINFO.pack(AF_BRIDGE, 0, 0, 0, 0) + _u32(IFLA_EXT_MASK, RTEXT_FILTER_BRVLAN)
        out: list[tuple[int, int]] = []
        for link in self.dump(RTM_GETLINK, body):
            if link["index"] != index:
                continue
            spec = link.get_attr("IFLA_AF_SPEC")
            if spec is None:
                continue
            for name, value in spec["attrs"]:
                if name == "IFLA_BRIDGE_VLAN_INFO":
                    out.append((value["vid"], value["flags"]))
        return out

    def bridge_vlan(self, add: bool, index: int, vid: int, flags: int = 0) -> None:
        """``bridge vlan add|del dev PORT vid VID [pvid] [untagged]``."""
        info = nla(IFLA_BRIDGE_VLAN_INFO, struct.pack("=HH", flags, vid))
        body = _IFINFO.pack(AF_BRIDGE, 0, index, 0, 0) + nla(IFLA_AF_SPEC, info)
        self.request(RTM_SETLINK if add else RTM_DELLINK, body)


_local = threading.local()


def netlink() -> Netlink:
    """The calling thread's netlink client (created on first use)."""
    nl: Netlink | None = getattr(_local, "nl", None)
    if nl is None:
        nl = _local.nl = Netlink()
    return nl


def close_thread_netlink() -> None:
    nl = getattr(_local, "nl", None)
    if nl is not None:
        nl.close()
        _local.nl = None


def gone(exc: BaseException) -> bool:
    """True when the error means "the object is already not there"."""
    return isinstance(exc, OSError) and exc.errno in (
        errno.ENODEV, errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENXIO,
    )
