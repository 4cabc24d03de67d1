"""qsup's supervisor: instances, their state machine, records, the node and the CLI.

The public surface is small; the modules behind it are private.
"""

from ._config import Config, load_config
from ._instance import Instance, NodeContext, StartError
from ._node import Conflict, Node, NotFound
from ._spec import InstanceSpec, NicSpec, SpecError, load_spec_file, parse_spec
from ._state import IllegalTransition, State, StateMachine, TRANSITIONS

__all__ = [
    "Config", "load_config", "Instance", "NodeContext", "StartError", "Conflict", "Node",
    "NotFound", "InstanceSpec", "NicSpec", "SpecError", "load_spec_file", "parse_spec",
    "IllegalTransition", "State", "StateMachine", "TRANSITIONS",
]
