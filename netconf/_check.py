"""Host-side validation of a NIC's ``link`` and routing-table lookups.

The supervisor validates a spec's *syntax* (MAC, CIDR, VLAN range, mode).
Whether ``link`` names something that exists on *this* host is checked here,
before anything is applied, so the user gets one clear line naming the field
(``nics[0].link: bridge 'br9' does not exist``) instead of a netlink errno
from the middle of an apply.

It reads sysfs, the iproute2 table files and asks ``ovs-vsctl``; it does not
touch netlink, so it can run on any thread.
"""

from __future__ import annotations

import glob
import os
import subprocess
from collections.abc import Sequence

from ._types import NetconfError, Nic

RT_TABLES_FILES = ("/etc/iproute2/rt_tables", "/usr/share/iproute2/rt_tables")
RT_TABLES_DIRS = ("/etc/iproute2/rt_tables.d", "/usr/share/iproute2/rt_tables.d")
MAX_TABLE = 2**32 - 1


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
        if link is not None:
            try:
                resolve_table(link)
            except ValueError as e:
                raise NetconfError(f"{field}link: {e}") from None
        return
    if not link:
        raise NetconfError(f"{field}link: mode {nic.mode} needs a link (the bridge name)")
    if nic.mode == "bridged":
        _check_bridge(field, link, nic)
    elif nic.mode == "openvswitch":
        _check_ovs(field, link, ovs_db)
    else:
        raise NetconfError(f"{field}mode: unknown mode {nic.mode!r}")


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
