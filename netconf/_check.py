"""Host-side validation of a NIC's ``link`` and routing-table lookups.

The supervisor validates a spec's *syntax* (MAC, CIDR, VLAN range, mode).
Whether ``link`` names something that exists on *this* host is checked here,
before anything is applied, so the user gets one clear line naming the field
(``nics[0].link: bridge 'br9' does not exist``) instead of a netlink errno
from the middle of an apply.

It reads sysfs, the iproute2 table files and asks ``ovs-vsctl``; for a routed NIC it also
dumps the host's routes on a netlink socket of its own (:func:`host_addresses`), never the
worker's, so it can run on any thread.
"""

from __future__ import annotations

import glob
import ipaddress
import os
import socket
import subprocess
import sys
from collections.abc import Sequence

from ._types import NetconfError, Nic

RT_TABLES_FILES = ("/etc/iproute2/rt_tables", "/usr/share/iproute2/rt_tables")
RT_TABLES_DIRS = ("/etc/iproute2/rt_tables.d", "/usr/share/iproute2/rt_tables.d")
MAX_TABLE = 2**32 - 1
#: Tables a routed NIC may not name: 0 is "unspecified", 253 (``default``) and 255 (``local``,
#: the host's own addresses) are the kernel's; a route there would override the node itself.
RESERVED_TABLES = {0: "unspec", 253: "default", 255: "local"}
MAIN_TABLE = 254

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _table_files() -> list[str]:
    files = [f for f in RT_TABLES_FILES if os.path.exists(f)]
    for d in RT_TABLES_DIRS:
        files += sorted(glob.glob(os.path.join(d, "*.conf")))
    return files


def table_names(files: Sequence[str] | None = None) -> dict[str, int]:
    """name -> number from the iproute2 ``rt_tables`` files (first one wins)."""
    names: dict[str, int] = {}
    for path in _table_files() if files is None else files:
        try:
            with open(path) as fh:
                lines = fh.read().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split("#", 1)[0].split()
            if len(parts) >= 2 and parts[0].isdigit():
                names.setdefault(parts[1], int(parts[0]))
    return names


def resolve_table(table: str | int, files: Sequence[str] | None = None) -> int:
    """A routing table number from a number or an ``rt_tables`` name.

    Raises ``ValueError`` when it is neither a number in 1..2**32-1 nor a
    known name (``main`` is 254, ``local`` 255, ``default`` 253 as usual).
    """
    if isinstance(table, int) or str(table).isdigit():
        num = int(table)
        if 1 <= num <= MAX_TABLE:
            return num
        raise ValueError(f"routing table {table} is out of range 1..{MAX_TABLE}")
    builtin = {"main": 254, "local": 255, "default": 253}
    named = table_names(files).get(str(table), builtin.get(str(table)))
    if named is None or named == 0:
        raise ValueError(f"routing table {table!r} is not a number and not named in /etc/iproute2/rt_tables")
    return named


def ovs_vsctl_argv(db: str | None) -> list[str]:
    argv = ["ovs-vsctl", "--timeout=5"]
    if db:
        argv.append(f"--db={db}")
    return argv


def check_link(nic: Nic, index: int | None = None, *, ovs_db: str | None = None) -> None:
    """Raise :class:`NetconfError` when ``nic.link`` cannot work on this host.

    ``index`` is the NIC's position in the spec: with it the message starts
    with the full field (``nics[0].link: bridge 'br9' does not exist``),
    without it with the NIC-relative one (``link: bridge 'br9' ...``).
    """
    field = f"nics[{index}]." if index is not None else ""
    link = nic.link
    if nic.mode == "routed":
        table = MAIN_TABLE
        if link is not None:
            try:
                table = resolve_table(link)
            except ValueError as e:
                raise NetconfError(f"{field}link: {e}") from None
            if table in RESERVED_TABLES:
                raise NetconfError(f"{field}link: routing table {link!r} is table {table} "
                                   f"({RESERVED_TABLES[table]}), reserved to the kernel")
        _check_not_the_hosts(nic, field, table)
        return
    if not link:
        raise NetconfError(f"{field}link: mode {nic.mode} needs a link (the bridge name)")
    if nic.mode == "bridged":
        _check_bridge(field, link, nic)
    elif nic.mode == "openvswitch":
        _check_ovs(field, link, ovs_db)
    else:
        raise NetconfError(f"{field}mode: unknown mode {nic.mode!r}")


def host_addresses(tables: Sequence[int]) -> tuple[set[IPAddress], set[IPAddress]]:
    """The host's own addresses and the gateways (next hops) of its routes in ``tables``.

    An address dump and a route dump per family, on a netlink socket of its own (this runs
    on a worker thread, not on the netconf worker's).  The routes are parsed with ``struct``,
    not pyroute2: a node with a full routing table must not pay seconds for a start.
    """
    from pyroute2.netlink.rtnl import RTM_GETADDR, RTM_GETROUTE  # only when a routed NIC is checked

    from ._nl import _IFADDR, _RTMSG, IFA_ADDRESS, IFA_LOCAL, RTA_GATEWAY, RTA_TABLE, Netlink, parse_nlas

    rta_multipath = 9
    local: set[IPAddress] = set()
    gateways: set[IPAddress] = set()
    nl = Netlink()
    try:
        for family in (socket.AF_INET, socket.AF_INET6):
            for _typ, data, off, length in nl.dump_raw(RTM_GETADDR, _IFADDR.pack(family, 0, 0, 0, 0)):
                nlas = parse_nlas(data, off + 16 + _IFADDR.size, off + length)
                for kind in (IFA_LOCAL, IFA_ADDRESS):
                    if kind in nlas:
                        local.add(ipaddress.ip_address(nlas[kind]))
            for _typ, data, off, length in nl.dump_raw(RTM_GETROUTE, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
                nlas = parse_nlas(data, off + 16 + _RTMSG.size, off + length)
                table = int.from_bytes(nlas[RTA_TABLE], sys.byteorder) if RTA_TABLE in nlas \
                    else _RTMSG.unpack_from(data, off + 16)[4]
                if table not in tables:
                    continue
                if RTA_GATEWAY in nlas:
                    gateways.add(ipaddress.ip_address(nlas[RTA_GATEWAY]))
                hops = nlas.get(rta_multipath, b"")
                pos = 0
                while pos + 8 <= len(hops):  # struct rtnexthop {u16 len; u8 flags, hops; s32 ifindex} + attrs
                    hop_len = int.from_bytes(hops[pos:pos + 2], sys.byteorder)
                    if hop_len < 8:
                        break
                    gw = parse_nlas(hops, pos + 8, pos + hop_len).get(RTA_GATEWAY)
                    if gw:
                        gateways.add(ipaddress.ip_address(gw))
                    pos += (hop_len + 3) & ~3
    finally:
        nl.close()
    return local, gateways


def _check_not_the_hosts(nic: Nic, field: str, table: int) -> None:
    """A routed address may not be one of the host's own, nor a next hop of its routes.

    Routing the host's gateway (or its own address) to a tap would take the node's uplink
    (or itself) away from it and hand the traffic to a guest.
    """
    mine = [(key, ipaddress.ip_interface(v).ip) for key, v in (("ip", nic.ip), ("ip6", nic.ip6)) if v]
    if not mine:
        return
    try:
        local, gateways = host_addresses(sorted({MAIN_TABLE, table}))
    except OSError as e:
        raise NetconfError(f"{field}ip: cannot read the host's addresses: {e}") from None
    for key, addr in mine:
        if addr in local:
            raise NetconfError(f"{field}{key}: {addr} is an address of this host (local)")
        if addr in gateways:
            raise NetconfError(f"{field}{key}: {addr} is a gateway of this host's routes")


def _check_bridge(field: str, link: str, nic: Nic) -> None:
    sysdir = os.path.join("/sys/class/net", link)
    if "/" in link or not os.path.exists(sysdir):
        raise NetconfError(f"{field}link: bridge {link!r} does not exist")
    if not os.path.isdir(os.path.join(sysdir, "bridge")):
        raise NetconfError(f"{field}link: {link!r} exists but is not a Linux bridge")
    if nic.vlan is None and not nic.trunks:
        return
    what = "vlan" if nic.vlan is not None else "trunks"
    try:
        with open(os.path.join(sysdir, "bridge", "vlan_filtering")) as fh:
            on = fh.read().strip() == "1"
    except FileNotFoundError:
        raise NetconfError(f"{field}{what}: this kernel has no bridge VLAN filtering "
                           "(CONFIG_BRIDGE_VLAN_FILTERING)") from None
    if not on:
        # Turning it on would change every other port of a bridge we do not own.
        raise NetconfError(f"{field}{what}: bridge {link!r} has vlan_filtering off; "
                           f"enable it (ip link set {link} type bridge vlan_filtering 1)")


def _check_ovs(field: str, link: str, ovs_db: str | None) -> None:
    try:
        r = subprocess.run(ovs_vsctl_argv(ovs_db) + ["br-exists", link],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetconfError(f"{field}link: cannot run ovs-vsctl: {e}") from None
    if r.returncode == 2:
        raise NetconfError(f"{field}link: openvswitch bridge {link!r} does not exist")
    if r.returncode != 0:
        raise NetconfError(f"{field}link: ovs-vsctl failed: {r.stderr.strip()}")
