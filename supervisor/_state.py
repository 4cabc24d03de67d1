"""The instance state machine: its states, transitions and exit causes, in one place.

**The invariant.**  Every QEMU that qsup started or adopted is, at every
moment, either supervised by exactly one task or dead; and every instance
task ends in a final state, with its error in an event.

How the code makes that true rather than hoping for it:

* An instance has exactly one task, :meth:`Instance.run`, and one nursery.
  Everything that acts on its QEMU (event forwarding, stop, migrations,
  the console) runs inside that nursery, so no exception can leave it
  without passing through the ``finally`` that calls the one teardown.
* The teardown kills QEMU if it still runs, undoes the netconf journal and
  moves to the final state that :data:`EXITS` names for the exit cause.
  The only way out without a final state is the node leaving its guests
  running on daemon shutdown (the task is cancelled with no exit cause):
  then QEMU keeps its record, and the next daemon adopts it again.
* The code that causes an exit says so with one :class:`ExitCause`
  (``Instance.exit``); the first cause set wins.  The teardown decides
  from it alone what to undo and which final state follows.

::

    starting --> running <--> paused
       |            |    \\      |
       |            |     migrating ---> stopped   (source: handed over)
       v            v        |
     failed      stopping --> stopped
    any live state --(qemu died, panicked)--> crashed
    any live state --(start/incoming failed, internal error)--> failed

A stop requested while a migration runs does not move the state at once:
the migration is asked to end (the source cancels, the destination is torn
down before it activates), and the stop proceeds from whatever definite
result that gives -- so there is never a ``stopping -> running`` move.
"""

from __future__ import annotations

import enum
import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, TypeVar, cast

from netconf._types import Reason


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
_ENDS = frozenset({State.STOPPING, State.STOPPED, State.CRASHED, State.FAILED})

TRANSITIONS: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.RUNNING, State.PAUSED, State.MIGRATING}) | _ENDS,
    State.RUNNING: frozenset({State.PAUSED, State.MIGRATING}) | _ENDS,
    State.PAUSED: frozenset({State.RUNNING, State.MIGRATING}) | _ENDS,
    State.MIGRATING: frozenset({State.RUNNING, State.PAUSED}) | _ENDS,
    State.STOPPING: frozenset({State.STOPPED, State.CRASHED, State.FAILED}),
    State.STOPPED: frozenset(),
    State.CRASHED: frozenset(),
    State.FAILED: frozenset(),
}


class ExitCause(str, enum.Enum):
    """Why an instance's QEMU goes away; set once, by the code that causes it."""

    REQUESTED_STOP = "requested stop"
    GUEST_SHUTDOWN = "guest shutdown"
    QEMU_DIED = "qemu died"
    MIGRATED_OUT = "migrated out"
    START_FAILED = "start failed"
    INCOMING_ABORTED = "incoming aborted"
    GUEST_PANICKED = "guest panicked"
    INTERNAL_ERROR = "internal error"


class Exit(NamedTuple):
    """What the teardown does for a cause: the final state and the netconf undo reason.

    The undo reason is the hook environment's ``PHASE`` (docs/ARCHITECTURE.md).
    """

    final: State
    undo_reason: Reason


EXITS: dict[ExitCause, Exit] = {
    ExitCause.REQUESTED_STOP: Exit(State.STOPPED, "stop"),
    ExitCause.GUEST_SHUTDOWN: Exit(State.STOPPED, "stop"),
    ExitCause.QEMU_DIED: Exit(State.CRASHED, "crash"),
    ExitCause.MIGRATED_OUT: Exit(State.STOPPED, "migrate-out"),
    ExitCause.START_FAILED: Exit(State.FAILED, "rollback"),
    ExitCause.INCOMING_ABORTED: Exit(State.FAILED, "rollback"),
    ExitCause.GUEST_PANICKED: Exit(State.CRASHED, "crash"),
    ExitCause.INTERNAL_ERROR: Exit(State.FAILED, "crash"),
}

class RunState(str, enum.Enum):
    """QEMU's own run state (``query-status``), as qsup last learnt it (shown as ``runstate``).

    QEMU's vocabulary, not ours: the instance's :class:`State` is what qsup decides; this is
    what QEMU says (a ``running`` instance's guest may be ``guest-panicked``).
    """

    PRELAUNCH = "prelaunch"
    RUNNING = "running"
    PAUSED = "paused"
    INMIGRATE = "inmigrate"
    FINISH_MIGRATE = "finish-migrate"
    POSTMIGRATE = "postmigrate"
    GUEST_PANICKED = "guest-panicked"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    SAVE_VM = "save-vm"
    RESTORE_VM = "restore-vm"
    DEBUG = "debug"
    COLO = "colo"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def of(cls, qemu_says: object) -> RunState:
        """QEMU's word as a RunState; one this QEMU made up is shown as ``paused`` (not running)."""
        try:
            return cls(qemu_says)
        except ValueError:
            return cls.PAUSED


#: QEMU run states in which the guest cannot run until something outside it
#: acts: ``stop`` skips the ACPI powerdown for them.
GUEST_STUCK = frozenset({RunState.GUEST_PANICKED, RunState.INTERNAL_ERROR, RunState.IO_ERROR,
                         RunState.SHUTDOWN, RunState.POSTMIGRATE})

#: QEMU run states that are a fault of the guest or its host, and their event.
GUEST_FAULT_EVENTS: dict[RunState, str] = {
    RunState.GUEST_PANICKED: "guest.panicked",
    RunState.INTERNAL_ERROR: "guest.internal_error",
    RunState.IO_ERROR: "guest.io_error",
}

#: What each request needs of the instance's state, next to the table that moves it
#: (checked by :func:`require`, in the manner of qemu.qmp's ``@require(Runstate...)``).
REQUIRES: dict[str, frozenset[State]] = {
    "migrate": frozenset({State.RUNNING, State.PAUSED}),
    "cancel_migration": frozenset({State.MIGRATING}),
    "abort_incoming": frozenset({State.MIGRATING}),
    # also after the activation: a source retrying a confirmation whose answer it lost
    "confirm_release": frozenset({State.MIGRATING, State.RUNNING, State.PAUSED}),
    # the destination of a post-copy runs the guest from postcopy-active on
    "recover_postcopy": frozenset({State.RUNNING, State.PAUSED}),
    # disk hotplug, resize, limits (supervisor/_hotplug.py): never during a migration
    "disk_change": frozenset({State.RUNNING, State.PAUSED}),
    # a new QEMU on the same taps (supervisor/_upgrade.py): never during a migration or another upgrade
    "upgrade": frozenset({State.RUNNING, State.PAUSED}),
    # NIC hotplug, unplug, live network change (supervisor/_nicplug.py): never during a migration
    "nic_change": frozenset({State.RUNNING, State.PAUSED}),
}


class IllegalTransition(RuntimeError):
    pass


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


class _HasState(Protocol):
    name: str

    @property
    def state(self) -> State: ...


def require(request: str, error: Callable[[str, str], Exception]) -> Callable[[_Fn], _Fn]:
    """Refuse ``request`` (a :data:`REQUIRES` key) with ``error(message, "name")`` unless the
    instance is in one of the states the table allows for it -- before the method runs."""
    allowed = REQUIRES[request]

    def check(inst: _HasState) -> None:
        if inst.state not in allowed:
            wanted = " or ".join(sorted(s.value for s in allowed))
            raise error(f"instance {inst.name!r} is {inst.state.value}; {request} needs it {wanted}", "name")

    def deco(fn: _Fn) -> _Fn:
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def guarded_async(self: _HasState, *args: Any, **kw: Any) -> Any:
                check(self)
                return await fn(self, *args, **kw)
            return cast(_Fn, guarded_async)

        @functools.wraps(fn)
        def guarded(self: _HasState, *args: Any, **kw: Any) -> Any:
            check(self)
            return fn(self, *args, **kw)
        return cast(_Fn, guarded)

    return deco


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
