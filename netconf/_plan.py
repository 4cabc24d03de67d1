"""The plan: which host effects one NIC needs in one phase.  PURE -- no I/O.

A plan is an ordered tuple of :class:`Step`.  Each step has a public
``name`` (hooks bind to it, so the names are a contract), the ``phase`` it
belongs to, the ``nic_id`` it concerns, and an ``op`` + ``args`` that the
executor knows how to apply and undo.  Everything is plain JSON data so that
the executor can journal a step verbatim.

Only the *up* phases are planned.  ``deactivate`` and ``detach`` are not
planned at all: they are the exact reverse of what the journal says was
done for ``activate`` / ``attach`` (``Executor.undo(phases=...)``), which is
what makes undo remove exactly what was applied even if the spec changed.

Step names, by phase:

* attach -- ``tap-up`` (all modes), ``bridge-port`` + ``bridge-vlan``
  (bridged), ``ovs-port`` (openvswitch);
* activate (routed only; other modes have an empty activate plan) --
  ``sysctl-ipv4``, ``route4``, ``rule4``, ``sysctl-ipv6``, ``gw6``,
  ``route6``, ``rule6``.

Why these effects make a routed guest work: the guest is configured with
``IP/32`` and ``default via 169.254.0.1`` (v6: ``default via fe80::1``).
It ARPs for 169.254.0.1 on its only link; nobody owns that address, so the
host must answer by proxy ARP.  The kernel answers a proxy ARP only when
``proxy_arp=1`` *and* ``forwarding=1`` on the tap *and* the route lookup
for the target (169.254.0.1, done as if forwarding a packet that came in
on the tap, so ``rule4`` applies) yields a unicast route through a
*different* device -- on a normal host that is the default route.  A host
(or namespace) without any route covering 169.254.0.1 gives the guest no
gateway.  For IPv6 we simply put ``fe80::1/64`` on the tap (no DAD), so the
guest's neighbour solicitation is answered directly; ``proxy_ndp`` and
per-tap ``forwarding`` are set as docs/ARCHITECTURE.md says a routed tap needs (forwarding IPv6 also
needs the host-wide ``net.ipv6.conf.all.forwarding=1``, which is host
policy and not touched here).  The way back is the ``/32`` (``/128``)
route to the tap, in table ``LINK`` when the NIC names one, together with
``iif TAP lookup LINK`` so the guest's own traffic uses that table too.

Host policy netconf does NOT touch (proven in
integration/netconf/test_netconf_gateway.py): traffic *to* the guest that
arrives on the uplink is forwarded only if the uplink has
``forwarding=1`` (v4) / ``net.ipv6.conf.all.forwarding=1`` (v6), and with a
table ``LINK`` it reaches the ``/32`` only if the admin routes uplink
traffic through that table (e.g. ``ip rule add iif UPLINK lookup LINK``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from ._types import JSONObject, Nic

#: The step names of each up phase, in order.  Public contract.
STEP_NAMES: dict[str, tuple[str, ...]] = {
    "attach": ("tap-up", "bridge-port", "bridge-vlan", "ovs-port"),
    "activate": ("sysctl-ipv4", "neigh4", "route4", "rule4", "sysctl-ipv6", "gw6", "neigh6", "route6", "rule6"),
}

GATEWAY4 = "169.254.0.1"
GATEWAY6 = "fe80::1"


@dataclasses.dataclass(frozen=True)
class Step:
    """One named host effect.  ``args`` is JSON data interpreted by ``op``."""

    name: str
    phase: str
    nic_id: str
    op: str
    args: JSONObject = dataclasses.field(hash=False)

    def to_dict(self) -> JSONObject:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Step":
        return cls(d["name"], d["phase"], d["nic_id"], d["op"], dict(d["args"]))


class Plan(tuple[Step, ...]):
    """A tuple of :class:`Step` that also remembers its :class:`Nic`.

    The executor needs the NIC for hook environments; the steps alone stay
    small.  Compares like a plain tuple.
    """

    nic: Nic

    def __new__(cls, steps: Iterable[Step], nic: Nic) -> "Plan":
        self = super().__new__(cls, steps)
        self.nic = nic
        return self


def fe_mac(mac: str) -> str:
    """The tap's own MAC: the guest MAC with the first octet forced to ``fe``.

    A Linux bridge takes the numerically lowest MAC of its ports as its own
    (unless set explicitly).  ``fe:`` sorts above every real vendor prefix,
    so adding a tap never changes the bridge's MAC (which would flush the
    neighbours' ARP entries for the host).
    """
    return "fe:" + mac.lower()[3:]


def _attach(nic: Nic) -> list[Step]:
    def mk(name: str, op: str, **args: Any) -> Step:
        return Step(name, "attach", nic.nic_id, op, args)

    steps = [mk("tap-up", "link", ifname=nic.tap, mtu=nic.mtu)]
    if nic.mode == "bridged":
        steps.append(mk("bridge-port", "bridge_port", ifname=nic.tap, bridge=nic.link, mac=fe_mac(nic.mac)))
        if nic.vlan is not None or nic.trunks:
            keep_default = nic.vlan in (None, 1) or 1 in nic.trunks
            steps.append(mk("bridge-vlan", "bridge_vlan", ifname=nic.tap, bridge=nic.link,
                            pvid=nic.vlan, tagged=sorted(set(nic.trunks) - {nic.vlan}),
                            drop_default=not keep_default))
    elif nic.mode == "openvswitch":
        steps.append(mk("ovs-port", "ovs_port", bridge=nic.link, port=nic.tap,
                        tag=nic.vlan, trunks=sorted(set(nic.trunks))))
    return steps


def _activate(nic: Nic) -> list[Step]:
    if nic.mode != "routed":
        return []
    def mk(name: str, op: str, **args: Any) -> Step:
        return Step(name, "activate", nic.nic_id, op, args)

    table = nic.link or "main"
    steps: list[Step] = []
    for fam, ip, plen, sysname in ((4, nic.ip, 32, "ipv4"), (6, nic.ip6, 128, "ipv6")):
        if not ip:
            continue
        conf = f"net/{sysname}/conf/{nic.tap}/"
        proxy = "proxy_arp" if fam == 4 else "proxy_ndp"
        steps.append(mk(f"sysctl-{sysname}", "sysctl", keys=[[conf + proxy, "1"], [conf + "forwarding", "1"]]))
        if fam == 6:
            steps.append(mk("gw6", "addr", family=6, ifname=nic.tap, address=GATEWAY6, plen=64))
        steps.append(mk(f"neigh{fam}", "neigh", family=fam, ifname=nic.tap, address=ip, mac=nic.mac))
        steps.append(mk(f"route{fam}", "route", family=fam, dst=ip, plen=plen, ifname=nic.tap, table=table))
        if nic.link:
            steps.append(mk(f"rule{fam}", "rule", family=fam, iifname=nic.tap, table=table))
    return steps


def plan(nic: Nic, phase: Literal["attach", "activate"]) -> Plan:
    """The ordered steps that bring ``nic`` up for ``phase``.

    Deterministic: the same NIC and phase always give an equal plan.
    """
    if phase == "attach":
        return Plan(_attach(nic), nic)
    if phase == "activate":
        return Plan(_activate(nic), nic)
    raise ValueError(f"only 'attach' and 'activate' are planned (got {phase!r}); "
                     "deactivate/detach are undone from the journal")
