"""netconf: host network effects for qsup NICs -- plan, executor, journal, hooks.

* :func:`plan` turns a :class:`Nic` and a phase into named :class:`Step` s (pure);
* :class:`Executor` applies them over netlink and records each effect in a
  :class:`Journal` first, so :meth:`Executor.undo` removes exactly that;
* :class:`NetconfWorker` is the one thread netlink work runs on;
* :func:`open_tap` opens the NIC's tap, whose fds the supervisor hands to QEMU.
"""

from ._announce import announce
from ._check import check_link, resolve_table
from ._executor import Executor
from ._hooks import HookError, HookResult, Hooks, StepHooks, hook_env
from ._journal import Journal
from ._plan import STEP_NAMES, Plan, Step, fe_mac, plan
from ._tap import TapHandle, open_tap, tap_name_for
from ._types import NetconfError, Nic, PlanPhase, Reason
from ._worker import NetconfWorker

__all__ = [
    "Nic", "NetconfError", "PlanPhase", "Reason", "open_tap", "TapHandle", "tap_name_for",
    "plan", "Plan", "Step", "STEP_NAMES", "Journal", "Executor", "NetconfWorker",
    "check_link", "resolve_table",
    "Hooks", "HookError", "HookResult", "StepHooks", "hook_env", "announce", "fe_mac",
]
