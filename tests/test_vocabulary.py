"""Each vocabulary is defined once and the other users derive it (issue 15).

NIC modes and hook reasons live in ``netconf._types`` (``Mode``, ``Reason``), the panic
policies and the name pattern in ``supervisor._spec`` (``OnPanic``, ``NAME_PATTERN``).  Getting
them must stay cheap: the CLI validates specs and must not import pyroute2.
"""

from __future__ import annotations

import subprocess
import sys
import typing

import netconf
from netconf import _hooks
from supervisor._config import NODE_NAME_RE, Config
from supervisor._spec import NAME_PATTERN, NAME_RE, ON_PANIC_POLICIES, InstanceSpec, NicSpec, OnPanic
from supervisor._state import EXITS, Exit


def test_modes_are_netconfs():
    assert NicSpec.model_fields["mode"].annotation is netconf.Mode
    assert netconf.MODES == typing.get_args(netconf.Mode) == ("routed", "bridged", "openvswitch")


def test_on_panic_is_one_literal():
    assert Config.model_fields["on_panic"].annotation is OnPanic
    assert typing.get_args(InstanceSpec.model_fields["on_panic"].annotation) == (OnPanic, type(None))
    assert ON_PANIC_POLICIES == ("pause", "stop", "restart")


def test_name_pattern_is_one():
    assert NAME_RE.pattern == f"^{NAME_PATTERN}$"
    assert NODE_NAME_RE.pattern == NAME_PATTERN + r"\Z"


def test_hook_reasons_are_netconfs():
    assert _hooks.REASONS is netconf.REASONS
    assert netconf.REASONS == typing.get_args(netconf.Reason)
    assert typing.get_type_hints(Exit)["undo_reason"] == netconf.Reason
    assert {e.undo_reason for e in EXITS.values()} <= set(netconf.REASONS)


def test_spec_and_config_do_not_import_pyroute2():
    code = ("import sys, supervisor._config, supervisor._spec, netconf; netconf.MODES; "
            "print(sorted(m for m in sys.modules if m.startswith('pyroute2')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"the spec's vocabulary pulled in pyroute2: {out}"
