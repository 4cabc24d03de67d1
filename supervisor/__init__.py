"""qsup's supervisor: instances, their state machine, records, the node and the CLI.

The public surface is small; the modules behind it are private.  Names are
imported lazily so that ``qsup ls`` (which needs only the HTTP client) does
not pay for importing netconf and pyroute2.
"""

import importlib

_EXPORTS = {
    "Config": "_config", "load_config": "_config",
    "Instance": "_instance", "NodeContext": "_instance", "StartError": "_instance",
    "Conflict": "_node", "Node": "_node", "NotFound": "_node",
    "InstanceSpec": "_spec", "NicSpec": "_spec", "SpecError": "_spec", "load_spec_file": "_spec",
    "parse_spec": "_spec",
    "IllegalTransition": "_state", "State": "_state", "StateMachine": "_state", "TRANSITIONS": "_state",
    "EventLog": "_eventlog",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'supervisor' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
