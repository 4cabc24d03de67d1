"""The default step implementations: observe, apply, undo -- one class per op.

Every op has three parts, called by the executor:

* ``observe(args)`` -> ``prior``: read whatever the undo will need *before*
  anything changes (old sysctl values, old MTU/MAC/master, the table
  number, which rules already exist).  Journaled with the pending record.
* ``apply(args, prior, note)`` -> ``result``: make the change.  ``note``
  durably records extra prior state discovered late (a route that had to be
  *replaced* is recorded before the replace).
* ``undo(args, prior, result)``: put things back.  ``result`` is ``None``
  when the entry is still *pending* (the process died between the record
  and the status change), so every undo must be safe whether or not the
  effect is present -- that is how ``recover()`` resolves pending entries:
  deletes match on our ``proto 152`` marker and on the tap's ifindex, so an
  absent effect is a no-op and a foreign object never matches.

Ownership rules (what undo will NOT remove):

* a route to the same prefix in the same table *through the same tap* that
  existed before (``EEXIST`` on our exclusive add) is not ours: kept;
* a route to the prefix through *another* device is replaced, recorded
  first, and restored on undo;
* an ``iif TAP lookup T`` rule that already existed (any proto) is not
  ours: kept, and no duplicate is added;
* sysctls are restored to their observed old values, never "deleted";
* an OVS port with the tap's name that existed before is stale (its tap is
  gone with the qemu that used it): it is removed and not restored.

One known gap: addresses carry no ownership check on delete, so if the
process dies between journaling ``gw6`` and learning that ``fe80::1``
already existed on the tap, recovery removes it.  The tap is created by
the supervisor, so nothing else is expected to put ``fe80::1`` on it.

"Gone" errors (ENODEV, ENOENT, ESRCH...) in undo mean the object vanished
with the tap, which counts as undone.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
from collections.abc import Callable
from typing import Any

from ._check import ovs_vsctl_argv, resolve_table
from ._nl import BRIDGE_VLAN_INFO_PVID, BRIDGE_VLAN_INFO_UNTAGGED, Netlink, gone

_FAM = {4: socket.AF_INET, 6: socket.AF_INET6}

#: An op's ``args`` (the step's), ``prior`` and ``result``: JSON objects, journaled verbatim,
#: each read back only by the op that defined its keys.
Data = dict[str, Any]
#: ``note(**fields)``: merge late-discovered prior state into the journaled ``prior`` (durably).
Note = Callable[..., None]


def ifindex(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise OSError(errno.ENODEV, f"interface {name!r} does not exist") from None


def _sys(ifname: str, attr: str) -> str:
    with open(f"/sys/class/net/{ifname}/{attr}") as fh:
        return fh.read().strip()


def _master(ifname: str) -> int | None:
    try:
        return ifindex(os.path.basename(os.readlink(f"/sys/class/net/{ifname}/master")))
    except OSError:
        return None


def _ignore_gone(fn: Callable[..., object], *a: Any, **kw: Any) -> None:
    try:
        fn(*a, **kw)
    except OSError as e:
        if not gone(e):
            raise


class Op:
    def __init__(self, nl: Netlink, ovs_db: str | None = None) -> None:
        self.nl = nl
        self.ovs_db = ovs_db

    def observe(self, args: Data) -> Data:
        return {}

    def apply(self, args: Data, prior: Data, note: Note) -> Data | None:
        raise NotImplementedError

    def undo(self, args: Data, prior: Data, result: Data | None) -> None:
        raise NotImplementedError


class LinkOp(Op):
    """``tap-up``: set the tap up (and its MTU when the NIC has one)."""

    def observe(self, args: Data) -> Data:
        name = args["ifname"]
        idx = ifindex(name)
        return {"ifindex": idx, "up": bool(int(_sys(name, "flags"), 16) & 1), "mtu": int(_sys(name, "mtu"))}

    def apply(self, args: Data, prior: Data, note: Note) -> None:
        self.nl.link_set(prior["ifindex"], up=True, mtu=args.get("mtu"))

    def undo(self, args: Data, prior: Data, result: Data | None) -> None:
        _ignore_gone(self.nl.link_set, prior["ifindex"], up=prior["up"],
                     mtu=prior["mtu"] if args.get("mtu") else None)


class BridgePortOp(Op):
    """``bridge-port``: fe: MAC, the bridge's MTU, then master=bridge."""

    def observe(self, args: Data) -> Data:
        name = args["ifname"]
        return {"ifindex": ifindex(name), "mac": _sys(name, "address"),
                "mtu": int(_sys(name, "mtu")), "master": _master(name)}

    def apply(self, args: Data, prior: Data, note: Note) -> Data | None:
        br = ifindex(args["bridge"])
        mtu = int(_sys(args["bridge"], "mtu"))
        # MAC and MTU before enslaving: the bridge never sees a lower MAC.
        self.nl.link_set(prior["ifindex"], address=args["mac"], mtu=mtu)
        self.nl.link_set(prior["ifindex"], master=br)
        return {"bridge_ifindex": br, "mtu": mtu}

    def undo(self, args: Data, prior: Data, result: Data | None) -> None:
        idx = prior["ifindex"]
        _ignore_gone(self.nl.link_set, idx, master=prior["master"] or 0)
        _ignore_gone(self.nl.link_set, idx, address=prior["mac"], mtu=prior["mtu"])


class BridgeVlanOp(Op):
    """``bridge-vlan``: access VLAN as pvid untagged, trunks tagged, drop vid 1."""

    def observe(self, args: Data) -> Data:
        return {"ifindex": ifindex(args["ifname"])}

    def apply(self, args: Data, prior: Data, note: Note) -> None:
        idx = prior["ifindex"]
        before = {vid for vid, _ in self.nl.bridge_vlans(idx)}
        note(vlans_before=sorted(before))
        if args.get("pvid") is not None:
            self.nl.bridge_vlan(True, idx, args["pvid"], BRIDGE_VLAN_INFO_PVID | BRIDGE_VLAN_INFO_UNTAGGED)
        for vid in args.get("tagged", []):
            self.nl.bridge_vlan(True, idx, vid)
        if args.get("drop_default") and 1 in before:
            self.nl.bridge_vlan(False, idx, 1)

    def undo(self, args: Data, prior: Data, result: Data | None) -> None:
        idx = prior["ifindex"]
        before = set(prior.get("vlans_before", [1]))
        for vid in [args.get("pvid")] + list(args.get("tagged", [])):
            if vid is not None and vid not in before:
                _ignore_gone(self.nl.bridge_vlan, False, idx, vid)
        if args.get("drop_default") and 1 in before:
            _ignore_gone(self.nl.bridge_vlan, True, idx, 1, BRIDGE_VLAN_INFO_PVID | BRIDGE_VLAN_INFO_UNTAGGED)


class OvsPortOp(Op):
    """``ovs-port``: one ovs-vsctl transaction: drop stale port, add-port with tag/trunks."""

    def _vsctl(self, *argv: str) -> None:
        r = subprocess.run(ovs_vsctl_argv(self.ovs_db) + list(argv), capture_output=True, text=True, timeout=15)
        if r.returncode != 0:
            raise OSError(errno.EIO, f"ovs-vsctl {' '.join(argv)}: {r.stderr.strip()}")

    def apply(self, args: Data, prior: Data, note: Note) -> None:
        cols = []
        if args.get("tag") is not None:
            cols.append(f"tag={int(args['tag'])}")
        if args.get("trunks"):
            cols.append("trunks=" + ",".join(str(int(v)) for v in args["trunks"]))
        self._vsctl("--", "--if-exists", "del-port", args["port"],
                    "--", "add-port", args["bridge"], args["port"], *cols)

    def undo(self, args: Data, prior: Data, result: Data | None) -> None:
        self._vsctl("--if-exists", "del-port", args["port"])


class SysctlOp(Op):
    """``sysctl-ipv4``/``sysctl-ipv6``: per-tap values; undo restores the old ones."""

    def observe(self, args: Data) -> Data:
        old = {}
        for key, _ in args["keys"]:
            with open("/proc/sys/" + key) as fh:
                old[key] = fh.read().strip()
        return {"old": old}

    def apply(self, args: Data, prior: Data, note: Note) -> None:
        for key, value in args["keys"]:
            with open("/proc/sys/" + key, "w") as fh:
                fh.write(value)

    def undo(self, args: Data, prior: Data, result: Data | None) -> None:
        for key, _ in reversed(args["keys"]):
            try:
                with open("/proc/sys/" + key, "w") as fh:
                    fh.write(prior["old"][key])
            except FileNotFoundError:
                pass  # the tap is gone, and its conf/ directory with it


class RouteOp(Op):
    """``route4``/``route6``: IP/32 (/128) dev TAP [table LINK], proto qsup."""

    def observe(self, args: Data) -> Data:
        return {"ifindex": ifindex(args["ifname"]), "table": resolve_table(args["table"])}

    def apply(self, args: Data, prior: Data, note: Note) -> Data | None:
        fam, idx, table = _FAM[args["family"]], prior["ifindex"], prior["table"]
        try:
            self.nl.route_add(fam, args["dst"], args["plen"], table, idx)
            return {"owned": True}
        except OSError as e:
            if e.errno != errno.EEXIST:
                raise
        existing = self.nl.routes(fam, table, args["dst"], args["plen"])
        if any(r["oif"] == idx and not r.get("gateway") for r in existing):
            return {"owned": False}  # identical route pre-existed: not ours
        replaced = existing[0] if existing else None
        note(replaced=replaced)  # durable before we overwrite it
        self.nl.route_add(fam, args["dst"], args["plen"], table, idx, replace=True)
        return {"owned": True}

    def undo(self, args: Data, prior: Data, result: Data | None) -> None:
        if result is not None and not result.get("owned"):
            return
        fam = _FAM[args["family"]]
        _ignore_gone(self.nl.route_del, fam, args["dst"], args["plen"], prior["table"], prior["ifindex"])
        replaced = prior.get("replaced")
        if replaced:
            _ignore_gone(self.nl.route_restore, replaced)


class RuleOp(Op):
    """``rule4``/``rule6``: ``iif TAP lookup LINK`` once, proto qsup."""

    def observe(self, args: Data) -> Data:
        table = resolve_table(args["table"])
        fam = _FAM[args["family"]]
        existed = any(r["iifname"] == args["iifname"] and r["table"] == table for r in self.nl.rules(fam))
        return {"table": table, "existed": existed}

    def apply(self, args: Data, prior: Data, note: Note) -> Data | None:
        if prior["existed"]:
            return {"owned": False}
        self.nl.rule_add(_FAM[args["family"]], args["iifname"], prior["table"])
        return {"owned": True}

    def undo(self, args: Data, prior: Data, result: Data | None) -> None:
        if prior["existed"] or (result is not None and not result.get("owned")):
            return
        _ignore_gone(self.nl.rule_del, _FAM[args["family"]], args["iifname"], prior["table"])


class AddrOp(Op):
    """``gw6``: fe80::1/64 on the tap, no DAD, so ``default via fe80::1`` resolves."""

    def observe(self, args: Data) -> Data:
        return {"ifindex": ifindex(args["ifname"])}

    def apply(self, args: Data, prior: Data, note: Note) -> Data | None:
        try:
            self.nl.addr_add(_FAM[args["family"]], prior["ifindex"], args["address"], args["plen"])
        except OSError as e:
            if e.errno != errno.EEXIST:
                raise
            return {"owned": False}
        return {"owned": True}

    def undo(self, args: Data, prior: Data, result: Data | None) -> None:
        if result is not None and not result.get("owned"):
            return
        _ignore_gone(self.nl.addr_del, _FAM[args["family"]], prior["ifindex"], args["address"], args["plen"])


class NeighOp(Op):
    """``neigh4``/``neigh6``: the guest's address -> its MAC on the tap, permanent, proto qsup.

    Why: without it the host resolves the guest by ARP/ND the first time it forwards to it.
    After a live migration that first request reaches the tap while the guest is still
    paused (L3 is applied before ``cont``); it can go unanswered, and the next one comes
    ``retrans_time`` (1 s) later, so the guest can be unreachable for that second although
    its route moved at once.  The MAC is the spec's, so nothing needs asking.
    The tap is qsup's own, so any entry on it is replaced; undo deletes it (it also goes
    with the tap).
    """

    def observe(self, args: Data) -> Data:
        return {"ifindex": ifindex(args["ifname"])}

    def apply(self, args: Data, prior: Data, note: Note) -> Data | None:
        self.nl.neigh_add(_FAM[args["family"]], prior["ifindex"], args["address"], args["mac"])
        return {"owned": True}

    def undo(self, args: Data, prior: Data, result: Data | None) -> None:
        _ignore_gone(self.nl.neigh_del, _FAM[args["family"]], prior["ifindex"], args["address"])


OPS: dict[str, type[Op]] = {
    "link": LinkOp,
    "bridge_port": BridgePortOp,
    "bridge_vlan": BridgeVlanOp,
    "ovs_port": OvsPortOp,
    "sysctl": SysctlOp,
    "route": RouteOp,
    "rule": RuleOp,
    "addr": AddrOp,
    "neigh": NeighOp,
}
