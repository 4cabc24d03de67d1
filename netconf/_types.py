"""Plain data shared by the plan, the executor and the supervisor.

A :class:`Nic` is what netconf needs to know about one guest NIC once the
supervisor has validated the user's spec and opened the tap.  It is frozen
and JSON-friendly (see :meth:`Nic.to_dict`) because it is stored in the
instance record and handed to hooks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal, TypeAlias, get_args

#: How a NIC reaches the network: the one definition (the spec's ``nics[].mode`` and the
#: hooks' ``MODE`` are this).
Mode = Literal["routed", "bridged", "openvswitch"]
MODES: tuple[Mode, ...] = get_args(Mode)
#: The modes whose ``link`` is a bridge (Linux or Open vSwitch) the tap is plugged into.
BRIDGE_MODES: frozenset[Mode] = frozenset({"bridged", "openvswitch"})

#: The phases of a NIC's configuration.  ``attach``/``activate`` go up,
#: ``deactivate``/``detach`` are their exact reverses (undo from the journal).
PlanPhase = Literal["attach", "activate", "deactivate", "detach"]

#: Why netconf is running; exported to hooks as ``PHASE``.  The one definition: the hooks'
#: check (:data:`REASONS`) and the teardown's undo reasons (``supervisor._state.EXITS``) use it.
Reason = Literal["start", "stop", "crash", "migrate-in", "migrate-out", "rollback"]
REASONS: tuple[Reason, ...] = get_args(Reason)

#: JSON data: what a step's args are, and what the journal and the failure lists hold.
JSONValue: TypeAlias = "dict[str, JSONValue] | list[JSONValue] | str | int | float | bool | None"
JSONObject: TypeAlias = "dict[str, JSONValue]"

#: One failed step, as :attr:`NetconfError.failures` lists it (``step``, ``error``, ...).
Failure: TypeAlias = JSONObject


@dataclasses.dataclass(frozen=True)
class Nic:
    """One guest NIC as netconf sees it.

    ``nic_id`` is the stable key (the lower-case MAC), never a list index:
    records, journal entries and hook runs are keyed by it.
    """

    instance: str
    mac: str
    mode: Mode
    tap: str
    link: str | None = None
    ip: str | None = None  # IPv4 host address, no prefix (routed: installed as /32)
    ip6: str | None = None  # IPv6 host address, no prefix (routed: installed as /128)
    vlan: int | None = None  # access VLAN (untagged on the tap)
    trunks: tuple[int, ...] = ()  # tagged VLANs (bridged: vlan_filtering; ovs: trunks=)
    queues: int = 1
    tags: tuple[str, ...] = ()
    mtu: int | None = None

    @property
    def nic_id(self) -> str:
        return self.mac.lower()

    def to_dict(self) -> JSONObject:
        d = dataclasses.asdict(self)
        d["trunks"] = list(self.trunks)
        d["tags"] = list(self.tags)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Nic":
        d = dict(d)
        d["trunks"] = tuple(d.get("trunks") or ())
        d["tags"] = tuple(d.get("tags") or ())
        return cls(**d)


class NetconfError(Exception):
    """A host network step failed.

    ``failures`` lists every failed step (undo keeps going and reports them
    all); each item is a dict with at least ``step`` and ``error``, and for a
    hook also ``path``, ``exit_code`` and ``output``.
    """

    #: set by :func:`netconf.announce` when some interfaces failed: what the others did
    results: list[JSONObject]

    def __init__(self, message: str, failures: list[Failure] | None = None) -> None:
        super().__init__(message)
        self.failures = failures or []
