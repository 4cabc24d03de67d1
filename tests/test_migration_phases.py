"""The migration's phase machines, and both sides driven against a fake InstancePort.

No QEMU and no daemon: a scripted QMP stand-in and a fake peer, so the order of the steps
that carry the zero-overlap rule is checked exactly -- the source releases its L3 only after
the guest stopped and confirms only after the release; the destination applies L3 only after
that confirmation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

import supervisor._migration as mig
from supervisor._faults import Checkpoint
from supervisor._migration import (
    IncomingMigration,
    InstancePort,
    MigrateOptions,
    Outcome,
    OutgoingMigration,
    PeerView,
    Switchover,
)
from supervisor._migration_phases import (
    DESTINATION_L3_MOVES,
    SOURCE_L3_MOVES,
    STREAM_MOVES,
    DestinationL3,
    PhaseError,
    SourceL3,
    Stream,
    destination_l3_phases,
    source_l3_phases,
)

# -- the tables ----------------------------------------------------------------------------------


@pytest.mark.parametrize("moves", [STREAM_MOVES, SOURCE_L3_MOVES, DESTINATION_L3_MOVES])
def test_every_phase_has_a_row(moves):
    phase_type = type(next(iter(moves)))
    assert set(moves) == set(phase_type)
    for targets in moves.values():
        assert targets <= set(phase_type)


def test_the_destination_activates_only_after_the_source_confirmed():
    dst = destination_l3_phases()
    with pytest.raises(PhaseError):
        dst.move(DestinationL3.ACTIVATED)  # STAGED -> ACTIVATED: the source may still hold L3
    dst.move(DestinationL3.CLEARED)
    dst.move(DestinationL3.ACTIVATED)
    with pytest.raises(PhaseError):
        dst.move(DestinationL3.ACTIVATED)  # never twice


def test_the_source_confirms_only_what_is_gone():
    src = source_l3_phases()
    with pytest.raises(PhaseError):
        src.move(SourceL3.CONFIRMED)
    src.move(SourceL3.RELEASING)
    with pytest.raises(PhaseError):
        src.move(SourceL3.CONFIRMED)  # a release under way is not a release
    src.move(SourceL3.GONE)
    src.move(SourceL3.CONFIRMED)


def test_an_ended_stream_moves_nowhere():
    assert STREAM_MOVES[Stream.ENDED] == frozenset()


# -- a fake port ---------------------------------------------------------------------------------


@dataclass
class FakeQMP:
    """What the migration asks of QEMU, answered from a script."""

    status: str = "none"
    calls: list[str] = field(default_factory=list)
    running: bool = True

    async def execute(self, cmd, args=None, *, timeout=30.0):
        self.calls.append(cmd)
        if cmd == "query-migrate":
            return {"status": self.status, "ram": {"transferred": len(self.calls)}}
        if cmd == "query-status":
            return {"status": "running" if self.running else "postmigrate", "running": self.running}
        return {}


class FakePort:
    name = "vm"
    generation = "0" * 32

    def __init__(self, nursery: trio.Nursery):
        self._qmp = FakeQMP()
        self.steps: list[str] = []
        self.events: list[tuple[str, dict]] = []
        self._nursery = nursery

    @property
    def qmp(self):
        return self._qmp

    @property
    def stop_requested(self) -> bool:
        return False

    def emit(self, type: str, **data) -> dict:
        self.events.append((type, data))
        return data

    def checkpoint(self, point: Checkpoint) -> None:
        self.steps.append(point.value)

    def spec_json(self) -> dict:
        return {"name": self.name}

    async def apply_l3(self, reason: str, *, inline: bool = False) -> float:
        self.steps.append(f"apply_l3:{reason}")
        return 0.1

    async def release_l3(self) -> None:
        self.steps.append("release_l3")

    def persist(self) -> None:
        self.steps.append("persist")

    async def announce(self) -> None:
        self.steps.append("announce")

    def spawn(self, fn, *args) -> None:
        self._nursery.start_soon(fn, *args)


def _ports_type_check(p: FakePort) -> InstancePort:
    return p  # mypy: the fake satisfies the port


class FakePeer:
    """The destination daemon as the source's PeerClient sees it."""

    def __init__(self, steps: list[str]):
        self.steps = steps

    async def prepare(self, name, spec, postcopy, generation):
        self.steps.append("peer.prepare")
        return {"name": name, "port": 4444, "tls": False}

    prepared = staticmethod(mig.PeerClient.prepared)

    async def confirm_release(self, name):
        self.steps.append("peer.confirm_release")

    async def abort(self, name):
        self.steps.append("peer.abort")
        return "aborted"

    async def show(self, name):
        return PeerView.model_validate({"name": name, "state": "running",
                                        "migration": {"activation": {"qmp_ts": 1.0}}})

    async def aclose(self):
        pass


def _event(status: str) -> dict:
    return {"event": "MIGRATION", "data": {"status": status}, "timestamp": {"seconds": 1, "microseconds": 0}}


@pytest.mark.parametrize("switchover", list(Switchover), ids=lambda m: m.value)
def test_the_source_releases_after_the_stop_and_confirms_after_the_release(monkeypatch, switchover):
    async def main():
        async with trio.open_nursery() as n:
            port = FakePort(n)
            monkeypatch.setattr(mig, "PeerClient", lambda *a, **k: FakePeer(port.steps))
            m = OutgoingMigration(port, MigrateOptions(to="/peer.sock", peer="node-b", switchover=switchover))
            n.start_soon(m.run)
            await trio.testing.wait_all_tasks_blocked()
            assert "migrate" in port.qmp.calls and m.stream.now is Stream.SENT
            m.on_event(_event("active"))
            port.qmp.status = "active"
            await trio.testing.wait_all_tasks_blocked()
            assert "release_l3" not in port.steps  # the guest still runs: its L3 stays
            m.on_stop(1.5)
            if switchover is Switchover.PAUSE:
                await trio.testing.wait_all_tasks_blocked()
                assert "release_l3" not in port.steps  # PAUSE releases at pre-switchover
                m.on_event(_event("pre-switchover"))
            await trio.testing.wait_all_tasks_blocked()
            assert m.l3.now is SourceL3.CONFIRMED
            m.on_event(_event("completed"))
            port.qmp.status = "completed"
            with trio.fail_after(5):
                await m.done.wait()
        order = [s for s in port.steps if s in ("release_l3", "peer.confirm_release", "outgoing.release",
                                                 "outgoing.confirm", "outgoing.continue")]
        expect = ["outgoing.release", "release_l3"]
        if switchover is Switchover.PAUSE:
            expect.append("outgoing.continue")
            assert "migrate-continue" in port.qmp.calls
        assert order == expect + ["outgoing.confirm", "peer.confirm_release"], port.steps
        assert m.stream.now is Stream.ENDED and m.result == "completed"
        assert [e for e, _ in port.events].count("migration.completed") == 1

    trio.run(main)


def test_the_destination_applies_l3_only_after_the_confirmation():
    async def main():
        async with trio.open_nursery() as n:
            port = FakePort(n)
            m = IncomingMigration(port, postcopy=False, release_wait=10)
            outcome: list[Outcome] = []

            async def deliver():
                outcome.append(await m.on_event(_event("completed")))

            n.start_soon(deliver)
            await trio.testing.wait_all_tasks_blocked()
            assert outcome == [] and not [s for s in port.steps if s.startswith("apply_l3")]
            assert m.l3.now is DestinationL3.STAGED
            m.confirm_release()
            await trio.testing.wait_all_tasks_blocked()
            assert outcome == [Outcome.ACTIVATED]
            assert port.steps.index("persist") < port.steps.index("apply_l3:migrate-in")
            assert port.qmp.calls[-1] in ("cont", "announce-self")
            assert m.l3.now is DestinationL3.ACTIVATED
            n.cancel_scope.cancel()

    trio.run(main)


def test_a_silent_source_never_gets_its_l3_applied_here():
    async def main():
        async with trio.open_nursery() as n:
            port = FakePort(n)
            m = IncomingMigration(port, postcopy=False, release_wait=0.2)
            assert await m.on_event(_event("completed")) is Outcome.SOURCE_SILENT
            assert not [s for s in port.steps if s.startswith("apply_l3")]
            assert "cont" not in port.qmp.calls and m.l3.now is DestinationL3.STAGED

    trio.run(main)
