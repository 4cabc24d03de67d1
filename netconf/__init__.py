"""netconf: host network effects for qsup NICs -- plan, executor, journal, hooks.

* :func:`plan` turns a :class:`Nic` and a phase into named :class:`Step` s (pure);
* :class:`Executor` applies them over netlink and records each effect in a
  :class:`Journal` first, so :meth:`Executor.undo` removes exactly that;
* :class:`NetconfWorker` is the one thread netlink work runs on;
* :func:`open_tap` opens the NIC's tap, whose fds the supervisor hands to QEMU.

Names are imported lazily (as in :mod:`supervisor`): the spec validation and the CLI use the
vocabulary in ``netconf._types`` (:data:`Mode`, :data:`Reason`) and must not pay for
pyroute2, which only the executor needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._announce import announce
    from ._check import check_link, resolve_table
    from ._executor import Executor
    from ._hooks import HookError, HookResult, Hooks, StepHooks, hook_env
    from ._journal import Journal
    from ._plan import STEP_NAMES, Plan, Step, fe_mac, plan
    from ._tap import TapHandle, TapOffloads, open_tap, set_tap_offloads, tap_name_for, tap_offloads
    from ._types import MODES, REASONS, Mode, NetconfError, Nic, PlanPhase, Reason
    from ._worker import NetconfWorker

_EXPORTS = {
    "announce": "_announce",
    "check_link": "_check", "resolve_table": "_check",
    "Executor": "_executor",
    "HookError": "_hooks", "HookResult": "_hooks", "Hooks": "_hooks", "StepHooks": "_hooks", "hook_env": "_hooks",
    "Journal": "_journal",
    "STEP_NAMES": "_plan", "Plan": "_plan", "Step": "_plan", "fe_mac": "_plan", "plan": "_plan",
    "TapHandle": "_tap", "open_tap": "_tap", "tap_name_for": "_tap", "TapOffloads": "_tap",
    "tap_offloads": "_tap", "set_tap_offloads": "_tap",
    "MODES": "_types", "REASONS": "_types", "Mode": "_types", "NetconfError": "_types", "Nic": "_types",
    "PlanPhase": "_types", "Reason": "_types",
    "NetconfWorker": "_worker",
}

__all__ = [
    "Nic", "NetconfError", "Mode", "MODES", "PlanPhase", "Reason", "REASONS", "open_tap", "TapHandle",
    "tap_name_for", "plan", "Plan", "Step", "STEP_NAMES", "Journal", "Executor", "NetconfWorker",
    "check_link", "resolve_table",
    "Hooks", "HookError", "HookResult", "StepHooks", "hook_env", "announce", "fe_mac",
    "TapOffloads", "tap_offloads", "set_tap_offloads",
]


def __getattr__(name: str) -> object:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'netconf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value
