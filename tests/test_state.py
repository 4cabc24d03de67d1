"""The state machine allows exactly the transitions in its table."""

import typing

import pytest

import netconf
from supervisor import TRANSITIONS, IllegalTransition, State, StateMachine


def test_every_state_has_a_row_and_final_states_are_sinks():
    assert set(TRANSITIONS) == set(State)
    for s in (State.STOPPED, State.CRASHED, State.FAILED):
        assert s.is_final and TRANSITIONS[s] == frozenset()


def test_normal_lifecycle_emits_each_change():
    seen = []
    sm = StateMachine(on_change=lambda o, n, r: seen.append((o.value, n.value, r)))
    for s in (State.RUNNING, State.PAUSED, State.RUNNING, State.STOPPING, State.STOPPED):
        sm.move(s, "t")
    assert [n for _, n, _ in seen] == ["running", "paused", "running", "stopping", "stopped"]


@pytest.mark.parametrize("path", [
    (State.STOPPED, State.RUNNING),
    (State.CRASHED, State.RUNNING),
    (State.FAILED, State.STARTING),
    (State.STOPPING, State.RUNNING),
])
def test_illegal_moves_raise(path):
    sm = StateMachine()
    prefix = {State.STOPPED: [State.RUNNING, State.STOPPING, State.STOPPED],
              State.CRASHED: [State.RUNNING, State.CRASHED],
              State.FAILED: [State.FAILED],
              State.STOPPING: [State.RUNNING, State.STOPPING]}[path[0]]
    for s in prefix:
        sm.move(s)
    with pytest.raises(IllegalTransition):
        sm.move(path[1])
    assert sm.state == path[0]


def test_state_values_are_the_documented_ones():
    assert {s.value for s in State} == {
        "starting", "running", "paused", "migrating", "stopping", "stopped", "crashed", "failed"}


def test_every_exit_cause_has_one_final_state_reachable_from_every_live_state():
    from supervisor._state import EXITS, ExitCause

    assert set(EXITS) == set(ExitCause)
    for cause, exit_ in EXITS.items():
        assert exit_.final.is_final
        assert exit_.undo_reason in typing.get_args(netconf.Reason)  # the hook's PHASE vocabulary
        for live in (s for s in State if not s.is_final):
            assert exit_.final in TRANSITIONS[live], (cause, live)


def test_no_move_leaves_stopping_except_to_a_final_state():
    assert all(s.is_final for s in TRANSITIONS[State.STOPPING])


# -- request guards (REQUIRES, require) ------------------------------------------------------


def test_every_guarded_request_is_a_method_that_uses_its_guard():
    """Each REQUIRES entry guards a request: an Instance method of that name, or the methods of the
    instance's live-change parts (disk_change: DiskOps, nic_change: NicOps) that carry its ``@require``."""
    import inspect as _inspect

    from supervisor._hotplug import DiskOps
    from supervisor._instance import Instance
    from supervisor._nicplug import NicOps
    from supervisor._state import REQUIRES

    parts = {"disk_change": DiskOps, "nic_change": NicOps}
    for request in REQUIRES:
        if request in parts:
            source = _inspect.getsource(parts[request])
            assert source.count(f'@require("{request}"') >= 2, request  # add, remove, ...
        else:
            assert f'@require("{request}"' in _inspect.getsource(getattr(Instance, request)), request


def test_require_refuses_before_the_method_runs_naming_the_states():
    import pytest as _pytest
    import trio as _trio

    from supervisor._state import State, require

    class Refused(Exception):
        def __init__(self, message, field):
            super().__init__(message)
            self.field = field

    class Inst:
        name = "vm"
        ran = 0

        def __init__(self, state):
            self.state = state

        @require("migrate", Refused)
        async def migrate(self):
            self.ran += 1

        @require("confirm_release", Refused)
        def confirm_release(self):
            self.ran += 1

    stopped = Inst(State.STOPPED)
    with _pytest.raises(Refused) as e:
        _trio.run(stopped.migrate)
    assert e.value.field == "name" and "is stopped" in str(e.value) and "paused or running" in str(e.value)
    with _pytest.raises(Refused):
        stopped.confirm_release()
    assert stopped.ran == 0
    live = Inst(State.RUNNING)
    _trio.run(live.migrate)
    live.confirm_release()
    assert live.ran == 2
