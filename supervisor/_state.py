"""The instance state machine: every state and every legal transition, here.

The supervisor never assigns ``instance.state`` directly; it asks the
:class:`StateMachine` to move, which refuses moves the table does not allow.
That keeps the lifecycle reviewable in one screen and turns a logic error
(say, "running" after "stopped") into an exception instead of a lie on the
API.

::

    starting --> running <--> paused
       |           |  \\         |
       |           |   migrating-+--> stopped   (source, after hand-off)
       v           v      |
     failed     stopping --> stopped
                   ^
    any live state --(qemu died unexpectedly)--> crashed

``failed`` means qsup could not bring the instance up (or an incoming
migration failed) and everything it applied was rolled back; ``crashed``
means QEMU went away on its own after it was up.
"""

from __future__ import annotations

import enum
from collections.abc import Callable


class State(str, enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    MIGRATING = "migrating"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in FINAL


FINAL = frozenset({State.STOPPED, State.CRASHED, State.FAILED})

TRANSITIONS: dict[State, frozenset[State]] = {
    State.STARTING: frozenset(
        {State.RUNNING, State.PAUSED, State.MIGRATING, State.STOPPING, State.FAILED, State.CRASHED}
    ),
    State.RUNNING: frozenset({State.PAUSED, State.MIGRATING, State.STOPPING, State.CRASHED}),
    State.PAUSED: frozenset({State.RUNNING, State.MIGRATING, State.STOPPING, State.CRASHED}),
    State.MIGRATING: frozenset(
        {State.RUNNING, State.PAUSED, State.STOPPING, State.STOPPED, State.FAILED, State.CRASHED}
    ),
    State.STOPPING: frozenset({State.STOPPED, State.CRASHED, State.FAILED}),
    State.STOPPED: frozenset(),
    State.CRASHED: frozenset(),
    State.FAILED: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


class StateMachine:
    """Holds one instance's state and enforces :data:`TRANSITIONS`.

    ``on_change(old, new, reason)`` is called after every move; the instance
    uses it to emit the lifecycle event and persist the record.
    """

    def __init__(
        self,
        initial: State = State.STARTING,
        on_change: Callable[[State, State, str], None] | None = None,
    ):
        self._state = initial
        self._on_change = on_change

    @property
    def state(self) -> State:
        return self._state

    def can(self, new: State) -> bool:
        return new in TRANSITIONS[self._state]

    def move(self, new: State, reason: str = "") -> None:
        old = self._state
        if old == new:
            return
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(f"{old.value} -> {new.value} is not allowed ({reason})")
        self._state = new
        if self._on_change:
            self._on_change(old, new, reason)
