"""The instance core against a fake QEMU: the defects of issue 8, and the invariant under faults.

The invariant (supervisor/_state.py): every QEMU qsup started or adopted is
supervised by exactly one task or dead, and every instance task ends in a
final state with its error in an event.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import trio
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

import netconf
from core_harness import Bench, fake_knobs, fakes_alive, pid_alive, spec, wait_for
from supervisor._faults import Checkpoint, Faults
from supervisor._instance import StartError, check_host
from supervisor._migration import MigrateOptions, Switchover
from supervisor._spec import SpecError
from supervisor._state import ExitCause, State

pytestmark = pytest.mark.usefixtures("no_fakes_left")


def run(fn):
    return trio.run(fn)


# -- item 1: a malformed prepare answer --------------------------------------------------------

def _fake_destination(answer: dict, status: int = 201, calls: list | None = None):
    async def prepare(request):
        if calls is not None:
            calls.append(request.url.path)
        return JSONResponse(answer, status)
    return Starlette(routes=[Route("/v1/migrations/incoming", prepare, methods=["POST"]),
                             Route("/v1/migrations/incoming/{name}/abort", prepare, methods=["POST"])])


@pytest.mark.parametrize("answer", [{"name": "vm"}, {"name": "vm", "uri": "exec:touch /tmp/qsup-pwned"},
                                    {"name": "other", "uri": "tcp:127.0.0.1:1"}, ["tcp:127.0.0.1:1"]])
def test_bad_prepare_answer_fails_the_migration_and_keeps_the_guest_supervised(tmp_path, answer):
    import functools

    from hypercorn.config import Config as HyperConfig
    from hypercorn.trio import serve

    a = Bench(tmp_path, "a")

    async def main():
        async with a.running(), trio.open_nursery() as n:
            hc = HyperConfig()
            sock = tmp_path / "evil.sock"
            hc.bind = [f"unix:{sock}"]
            calls: list[str] = []
            await n.start(functools.partial(serve, _fake_destination(answer, calls=calls), hc,
                                            shutdown_trigger=trio.sleep_forever))
            inst = await a.node.start(spec(tmp_path))
            await a.node.migrate("vm", MigrateOptions(to=str(sock)))
            await wait_for(lambda: inst.state != State.MIGRATING)
            assert inst.state == State.RUNNING and inst.proc.alive
            failed = a.of("migration.failed")
            assert failed and "destination sent an invalid" in failed[-1]["error"] or \
                "prepared 'other'" in failed[-1]["error"]
            # it answered 201: whatever it prepared must be torn down, not left until incoming_timeout
            assert calls == ["/v1/migrations/incoming", "/v1/migrations/incoming/vm/abort"], calls
            pid = inst.proc.pid
            await inst.stop(force=True)
            assert inst.state == State.STOPPED and not pid_alive(pid)
            n.cancel_scope.cancel()

    run(main)
    assert a.state_left() == []


# -- item 2: undo failure at the switchover ----------------------------------------------------

@pytest.mark.parametrize("switchover", list(Switchover), ids=lambda m: m.value)
def test_l3_release_failing_at_the_switchover_rolls_back_and_keeps_running(tmp_path, switchover):
    faults = Faults(at=Checkpoint.RELEASE, exc=netconf.NetconfError("undo (migrate-out): 1 step(s) failed"))
    a, b = Bench(tmp_path, "a", faults), Bench(tmp_path, "b")

    async def main():
        async with a.running(), b.running(api=True):
            inst = await a.node.start(spec(tmp_path))
            await a.node.migrate("vm", MigrateOptions(to=str(b.socket), switchover=switchover))
            await wait_for(lambda: inst.state != State.MIGRATING)
            assert inst.state == State.RUNNING and inst.runstate == "running" and inst.proc.alive
            assert a.of("migration.failed")[-1]["l3_was_released"] is True
            assert "migration.activated" not in b.types()
            await wait_for(lambda: "vm" not in b.node.instances or b.node.instances["vm"].state.is_final)
            await inst.stop()
            assert inst.state == State.STOPPED

    run(main)
    assert a.state_left() == [] and b.state_left() == []


# -- item 3: a failed reattach -----------------------------------------------------------------

def test_failed_reattach_ends_failed_kills_qemu_and_stop_returns(tmp_path):
    a = Bench(tmp_path, "a")
    pid = []

    async def first():
        async with a.running():
            inst = await a.node.start(spec(tmp_path))
            pid.append(inst.proc.pid)
        # the node left: the guest keeps running for the next daemon

    async def second():
        (a.dir / "run" / "vm" / "qmp.sock").unlink()  # its monitor can't be reached any more
        async with a.running():
            inst = a.node.instances["vm"]
            with trio.fail_after(15):
                await inst.done.wait()
                await inst.stop()
            assert inst.state == State.FAILED and inst.cause == ExitCause.START_FAILED
            assert not pid_alive(pid[0])
            assert any(e["instance"] == "vm" for e in a.of("instance.reattach_failed"))

    run(first)
    assert pid_alive(pid[0])
    run(second)
    assert a.state_left() == []


# -- item 4: stop during a migration -----------------------------------------------------------

async def _migrating(a: Bench, b: Bench, tmp_path):
    """Start ``vm`` on a and migrate it to b; return (source, destination) once both see it active."""
    inst = await a.node.start(spec(tmp_path))
    await a.node.migrate("vm", MigrateOptions(to=str(b.socket)))
    await wait_for(lambda: getattr(getattr(b.node.instances.get("vm"), "migration", None), "status", "") == "active"
                   and inst.migration.status == "active")
    return inst, b.node.instances["vm"]


def test_stop_during_outgoing_migration_cancels_it_then_stops(tmp_path, monkeypatch):
    fake_knobs(tmp_path, migrate_seconds=3)
    a, b = Bench(tmp_path, "a"), Bench(tmp_path, "b")

    async def main():
        async with a.running(), b.running(api=True):
            inst, _dest = await _migrating(a, b, tmp_path)
            await inst.stop()
            assert inst.state == State.STOPPED and inst.cause == ExitCause.REQUESTED_STOP
            assert "instance.stop_deferred" in a.types("vm")
            assert a.of("migration.failed")[-1]["result"] in ("cancelled", "failed")
            await wait_for(lambda: "vm" not in b.node.instances or b.node.instances["vm"].state.is_final)
            assert "migration.activated" not in b.types()

    run(main)
    assert a.state_left() == [] and b.state_left() == []


def test_stop_on_the_destination_before_activation_never_activates(tmp_path, monkeypatch):
    fake_knobs(tmp_path, migrate_seconds=3)
    a, b = Bench(tmp_path, "a"), Bench(tmp_path, "b")

    async def main():
        async with a.running(), b.running(api=True):
            inst, dest = await _migrating(a, b, tmp_path)
            await dest.stop()
            assert dest.state == State.STOPPED and "migration.activated" not in b.types()
            await wait_for(lambda: inst.state != State.MIGRATING)
            assert inst.state == State.RUNNING and inst.proc.alive  # the source kept the guest
            await inst.stop()

    run(main)
    assert a.state_left() == [] and b.state_left() == []


def test_migration_completes_and_the_guest_moves(tmp_path):
    a, b = Bench(tmp_path, "a"), Bench(tmp_path, "b")

    async def main():
        async with a.running(), b.running(api=True):
            inst = await a.node.start(spec(tmp_path))
            await a.node.migrate("vm", MigrateOptions(to=str(b.socket)))
            with trio.fail_after(15):
                await inst.done.wait()
            assert inst.state == State.STOPPED and inst.cause == ExitCause.MIGRATED_OUT
            dest = b.node.instances["vm"]
            assert dest.state == State.RUNNING and dest.runstate == "running"
            assert dest.generation == inst.generation  # migrated, not restarted
            assert a.of("migration.completed")[-1]["activation"]["netconf_ms"] is not None
            await dest.stop()

    run(main)
    assert a.state_left() == [] and b.state_left() == []


# -- item 5: nothing blocking on the trio thread -----------------------------------------------

def test_host_checks_run_off_the_trio_thread(tmp_path, monkeypatch):
    def slow_check(nic, index=None, **kw):
        time.sleep(0.5)  # ovs-vsctl can take up to 10 s

    monkeypatch.setattr(netconf, "check_link", slow_check)
    a = Bench(tmp_path, "a")

    async def main():
        ticks = []

        async def ticker():
            while True:
                ticks.append(time.monotonic())
                await trio.sleep(0.01)

        async with a.running(), trio.open_nursery() as n:
            n.start_soon(ticker)
            await trio.sleep(0.05)
            nics = [{"mode": "routed", "ip": "10.9.0.2"}, {"mode": "routed", "ip": "10.9.0.3"}]
            inst = await a.node._claim(spec(tmp_path, nics=nics))  # the checks every start/prepare runs
            gaps = [y - x for x, y in zip(ticks, ticks[1:])]
            assert len(ticks) > 20 and max(gaps) < 0.3, f"the trio thread stalled for {max(gaps):.2f}s"
            a.node._drop(inst)
            assert a.state_left() == [] and a.types() == []  # a claim writes nothing
            n.cancel_scope.cancel()

    run(main)


# -- issue 16, finding 3: the files handed to QEMU ----------------------------------------------

class _ChangeAt(Faults):
    """Runs ``action`` when ``at`` is reached instead of raising: a file changes between check and open."""

    def __init__(self, at: Checkpoint, action):
        super().__init__()
        self.point, self.action = at, action

    def reach(self, point: Checkpoint) -> None:
        self.reached.append(point)
        if point is self.point and not self.fired:
            self.fired = True
            self.action()


def test_a_fifo_swapped_in_for_a_checked_kernel_is_refused_and_the_node_keeps_answering(tmp_path):
    s = spec(tmp_path)

    def swap():
        os.unlink(s.kernel)
        os.mkfifo(s.kernel)

    a = Bench(tmp_path, "a", _ChangeAt(Checkpoint.IMAGES_CHECKED, swap))
    done = threading.Event()

    def unblock():  # code that blocks in open() is let go after 5 s (the test then fails on the stall)
        if not done.wait(5):
            with open(s.kernel, "wb"):
                pass

    async def main():
        ticks = []

        async def ticker():
            while True:
                ticks.append(time.monotonic())
                await trio.sleep(0.01)

        async with a.running(), trio.open_nursery() as n:
            n.start_soon(ticker)
            threading.Thread(target=unblock, daemon=True).start()
            await trio.sleep(0.05)
            try:
                with pytest.raises(StartError) as e:
                    await a.node.start(s)
            finally:
                done.set()
            gaps = [y - x for x, y in zip(ticks, ticks[1:])]
            assert max(gaps) < 1, f"the trio thread stalled for {max(gaps):.2f}s"
            assert e.value.field == "kernel" and "FIFO" in str(e.value), e.value
            assert "vm" not in a.node.instances and a.of("instance.failed")
            n.cancel_scope.cancel()

    run(main)
    assert a.faults.fired and a.state_left() == []


def test_the_jail_plan_with_its_chain_walk_runs_off_the_trio_thread(tmp_path, monkeypatch):
    from supervisor._jail import JailError

    on_trio_thread = []

    def plan_for(*args, **kw):
        on_trio_thread.append(threading.current_thread() is threading.main_thread())
        raise JailError("not built in this test")

    monkeypatch.setattr("supervisor._instance.plan_for", plan_for)
    a = Bench(tmp_path, "a", qemu_chroot=True)

    async def main():
        async with a.running():
            with pytest.raises(StartError) as e:
                await a.node.start(spec(tmp_path))
            assert e.value.field == "qemu_chroot", e.value

    assert threading.current_thread() is threading.main_thread()  # trio.run runs here
    run(main)
    assert on_trio_thread == [False] and a.state_left() == []


# -- item 6: field names from check_link pass through ------------------------------------------

def test_check_host_keeps_check_links_field(monkeypatch):
    nics = [netconf.Nic(instance="vm", mac="52:54:00:00:00:01", mode="bridged", tap="t0", link="lo")]
    with pytest.raises(SpecError) as e:
        check_host(nics)
    assert e.value.field == "nics[0].link" and "not a Linux bridge" in str(e.value)

    def vlan_off(nic, index=None, **kw):
        raise netconf.NetconfError(f"nics[{index}].vlan: bridge 'br0' has vlan_filtering off")

    monkeypatch.setattr(netconf, "check_link", vlan_off)
    with pytest.raises(SpecError) as e:
        check_host(nics)
    assert e.value.field == "nics[0].vlan" and str(e.value).startswith("nics[0].vlan: bridge")


# -- item 7: a dead guest does not show as running ---------------------------------------------

@pytest.mark.parametrize("policy, final", [("pause", State.STOPPED), ("stop", State.CRASHED),
                                           ("restart", State.STOPPED)])
def test_guest_panic_is_surfaced_and_handled_by_policy(tmp_path, policy, final):
    a = Bench(tmp_path, "a", on_panic=policy, powerdown_timeout=30)

    async def main():
        async with a.running():
            inst = await a.node.start(spec(tmp_path))
            await inst.qmp.execute("inject-nmi")  # the fake's stand-in for a guest panic
            await wait_for(lambda: "guest.panicked" in a.types("vm"))
            ev = a.of("guest.panicked")[-1]
            assert ev["policy"] == policy and ev["info"]["type"] == "fake"
            if policy == "pause":
                assert inst.state == State.PAUSED and inst.runstate == "guest-panicked"
                assert inst.view()["runstate"] == "guest-panicked"
                t = time.monotonic()
                await inst.stop()  # a guest that cannot run: straight to quit, not 30 s of powerdown
                assert time.monotonic() - t < 5
                assert "instance.stop_escalated" in a.types("vm")
            elif policy == "stop":
                with trio.fail_after(10):
                    await inst.done.wait()
                assert inst.cause == ExitCause.GUEST_PANICKED
            else:
                await wait_for(lambda: "guest.restarted" in a.types("vm"))
                await wait_for(lambda: inst.state == State.RUNNING)
                await inst.stop()
            assert inst.state == final

    run(main)
    assert a.state_left() == []


# -- item 8: a failed start says what QEMU said, with the right field --------------------------

def test_failed_start_reports_qemus_words_and_the_field(tmp_path, monkeypatch):
    a = Bench(tmp_path, "a")
    s = spec(tmp_path)
    fake_knobs(tmp_path, fail=f"could not load kernel '{s.kernel}': Permission denied")

    async def main():
        async with a.running():
            with pytest.raises(StartError) as e:
                await a.node.start(s)
            assert e.value.field == "kernel"
            assert "could not load kernel" in str(e.value) and "ExceptionGroup" not in str(e.value)
            assert "vm" not in a.node.instances
            failed = a.of("instance.failed")[-1]
            assert "could not load kernel" in failed["reason"]

    run(main)
    assert a.state_left() == []


# -- stop escalation ---------------------------------------------------------------------------

def test_stop_escalates_powerdown_quit_kill(tmp_path, monkeypatch):
    fake_knobs(tmp_path, ignore_powerdown=True, ignore_quit=True)
    a = Bench(tmp_path, "a", powerdown_timeout=1)

    async def main():
        async with a.running():
            inst = await a.node.start(spec(tmp_path))
            await inst.stop()
            steps = [e["step"] for e in a.of("instance.stop_escalated")]
            assert steps == ["quit", "kill"] and inst.state == State.STOPPED

    run(main)


# -- the fault matrix --------------------------------------------------------------------------

async def _scenario_start_stop(a: Bench, b: Bench, tmp_path) -> None:
    inst = await a.node.start(spec(tmp_path))
    await inst.stop()


async def _scenario_escalated_stop(a: Bench, b: Bench, tmp_path) -> None:
    inst = await a.node.start(spec(tmp_path))
    await inst.qmp.execute("stop")  # a paused guest: straight to quit
    await wait_for(lambda: inst.runstate == "paused")
    await inst.stop()


async def _scenario_migrate(a: Bench, b: Bench, tmp_path, switchover=Switchover.STOP) -> None:
    inst = await a.node.start(spec(tmp_path))
    await a.node.migrate("vm", MigrateOptions(to=str(b.socket), switchover=switchover))
    await wait_for(lambda: inst.state != State.MIGRATING, timeout=20)
    # a migration that ended on the source must not leave the destination half-way
    await wait_for(lambda: "vm" not in b.node.instances or b.node.instances["vm"].state != State.MIGRATING,
                   timeout=20)


async def _scenario_migrate_pause(a: Bench, b: Bench, tmp_path) -> None:
    await _scenario_migrate(a, b, tmp_path, Switchover.PAUSE)


SCENARIOS = {"start-stop": _scenario_start_stop, "quit": _scenario_escalated_stop, "migrate": _scenario_migrate,
             "migrate-pause": _scenario_migrate_pause}

#: the launch checkpoints, reached first by the source's start and then by the destination's launch
LAUNCH = [Checkpoint.DIRS, Checkpoint.TAPS, Checkpoint.IMAGES_CHECKED, Checkpoint.SPAWNED, Checkpoint.QMP,
          Checkpoint.ATTACHED]
#: covered by their own tests below (they need a daemon restart)
ELSEWHERE = {Checkpoint.REATTACH, Checkpoint.REATTACH_STATUS,
             # the daemon is SIGKILLed at each (QSUP_TEST_CRASH_AT) on real QEMU: the fake QEMU has no
             # fd: migration; integration/test_upgrade.py::test_a_daemon_killed_at_each_step_...
             Checkpoint.UPGRADE_SPAWNED, Checkpoint.UPGRADE_STREAMING, Checkpoint.UPGRADE_COMPLETED,
             Checkpoint.UPGRADE_CONT}
#: live NIC changes: tests/test_nic_hotplug.py (a fault at each step of an add, and the daemon
#: SIGKILLed at every one of them, then restarted: record, QEMU and host agree)
#: live disk changes: tests/test_disk_hotplug.py (a fault after each kind of step of an add: every
#: done step undone in reverse, nothing left in QEMU)
ELSEWHERE |= {Checkpoint.DISK_FDS, Checkpoint.DISK_NODES, Checkpoint.DISK_DEVICE}
ELSEWHERE |= {Checkpoint.NIC_TAP, Checkpoint.NIC_NETDEV, Checkpoint.NIC_DEVICE, Checkpoint.NIC_ACTIVATED,
              Checkpoint.NIC_UNPLUGGED, Checkpoint.NIC_DETACHED, Checkpoint.NIC_CONVERGED}


def _matrix():
    """(scenario, checkpoint, the how-many-th reach fires): every checkpoint, the destination's launch too."""
    points = {
        "start-stop": [(p, 1) for p in LAUNCH + [Checkpoint.ACTIVATED, Checkpoint.CONT, Checkpoint.POWERDOWN]],
        "quit": [(Checkpoint.QUIT, 1)],
        "migrate": [(p, 2) for p in LAUNCH] + [(p, 1) for p in (
            Checkpoint.PREPARE, Checkpoint.CAPABILITIES, Checkpoint.MIGRATE, Checkpoint.RELEASE, Checkpoint.CONFIRM,
            Checkpoint.STAGED, Checkpoint.LISTENING, Checkpoint.AWAIT_RELEASE, Checkpoint.ACTIVATE,
            Checkpoint.RESUME, Checkpoint.HANDED_OVER, Checkpoint.QUIT)],
        "migrate-pause": [(Checkpoint.RELEASE, 1), (Checkpoint.CONTINUE, 1), (Checkpoint.CONFIRM, 1)],
    }
    return [(name, p, n) for name, ps in points.items() for p, n in ps]


def test_the_fault_matrix_covers_every_checkpoint():
    assert {p for _, p, _ in _matrix()} | ELSEWHERE == set(Checkpoint)


def _live_copies(bench: Bench, name: str = "vm") -> int:
    inst = bench.node.instances.get(name)
    return int(inst is not None and not inst.state.is_final and inst.proc is not None and pid_alive(inst.proc.pid))


@pytest.mark.parametrize("scenario, point, nth", _matrix(), ids=lambda v: getattr(v, "value", v))
def test_invariant_holds_after_a_fault_at_every_checkpoint(tmp_path, scenario, point, nth):
    faults = Faults(at=point, count=nth)
    a, b = Bench(tmp_path, "a", faults), Bench(tmp_path, "b", faults)

    async def main():
        async with a.running(), b.running(api=True):
            try:
                # a hang after a fault is a failure (trio.TooSlowError), never a pass
                with trio.fail_after(30):
                    await SCENARIOS[scenario](a, b, tmp_path)
            except StartError:
                pass
            # settle: every instance is either final, or live with its QEMU alive
            for bench in (a, b):
                for inst in list(bench.node.instances.values()):
                    if inst.state.is_final:
                        assert inst.done.is_set() and (inst.proc is None or not pid_alive(inst.proc.pid))
                    else:
                        assert inst.state != State.MIGRATING, inst.view()
                        assert inst.proc.alive and pid_alive(inst.proc.pid), inst.view()
            if scenario.startswith("migrate"):
                # a fault anywhere in a migration neither loses the guest nor doubles it
                copies = _live_copies(a) + _live_copies(b)
                assert copies == 1, (a.node.instances.get("vm") and a.node.instances["vm"].view(),
                                     b.node.instances.get("vm") and b.node.instances["vm"].view())
            for bench in (a, b):
                await bench.node.stop_all(timeout=1)
                for inst in bench.node.instances.values():
                    assert inst.state.is_final, inst.view()
        assert faults.fired, f"{point.value} was never reached: {faults.reached}"
        for bench in (a, b):
            # every instance task ended in a final state, with its reason in the event
            last = {}
            for e in bench.events.since(0, 100000):
                if e["type"].startswith("instance.") and e["type"][9:] in {s.value for s in State}:
                    last[e["instance"]] = e
            for name, e in last.items():
                assert e["type"] in ("instance.stopped", "instance.crashed", "instance.failed"), e
                assert e["reason"], e

    run(main)
    assert fakes_alive(tmp_path) == []
    assert a.state_left() == [] and b.state_left() == []


@pytest.mark.parametrize("point", [Checkpoint.REATTACH, Checkpoint.REATTACH_STATUS], ids=lambda p: p.value)
def test_invariant_holds_after_a_fault_during_reattach(tmp_path, point):
    a = Bench(tmp_path, "a")
    pid = []

    async def first():
        async with a.running():
            pid.append((await a.node.start(spec(tmp_path))).proc.pid)

    async def second():
        async with a.running():
            inst = a.node.instances["vm"]
            with trio.fail_after(15):
                await inst.done.wait()
            assert inst.state == State.FAILED and "injected" in inst.error
            assert a.reattached == []

    run(first)
    a.faults = Faults(at=point)
    run(second)
    assert a.faults.fired and not pid_alive(pid[0]) and a.state_left() == []


def test_postcopy_is_refused_naming_postcopy_where_qemu_cannot_run_it(tmp_path, monkeypatch):
    """QEMU runs as its own uid; without vm.unprivileged_userfaultfd a post-copy destination can't work."""
    monkeypatch.setattr("supervisor._node.os.geteuid", lambda: 0)
    monkeypatch.setattr("builtins.open", _fake_sysctl(open, "0"))
    b = Bench(tmp_path, "b", qemu_user="per-instance")

    async def main():
        async with b.running():
            with pytest.raises(SpecError) as e:
                await b.node.prepare_incoming(spec(tmp_path), postcopy=True)
            assert e.value.field == "postcopy" and "unprivileged_userfaultfd" in str(e.value)
            assert b.types() == [] and b.state_left() == []  # refused before anything

    run(main)
    allowed = Bench(tmp_path, "c", qemu_user="per-instance", allow_root_postcopy=True, image_dirs=[str(tmp_path)])
    allowed.node = None
    from supervisor._node import Node
    Node(allowed.cfg, allowed.events)._check_postcopy()  # no error: the config allows root post-copy


def _fake_sysctl(real_open, value: str):
    import io

    def fake(path, *a, **kw):
        if str(path) == "/proc/sys/vm/unprivileged_userfaultfd":
            return io.StringIO(value + "\n")
        return real_open(path, *a, **kw)
    return fake


def test_a_hook_directory_that_names_no_step_is_reported_at_start(tmp_path):
    hooks = tmp_path / "hooks"
    (hooks / "rout4").mkdir(parents=True)  # a typo of route4: its hooks would never run
    a = Bench(tmp_path, "a", hooks_dir=str(hooks))

    async def main():
        async with a.running():
            pass

    run(main)
    assert [e["directory"] for e in a.of("hooks.unknown_step")] == ["rout4"]


def test_an_incoming_whose_qemu_died_while_the_daemon_was_down_ends_failed(tmp_path, monkeypatch):
    """Found by the model test: it ended ``crashed``; an incoming that never activated is aborted."""
    fake_knobs(tmp_path, migrate_seconds=30)
    a, b = Bench(tmp_path, "a"), Bench(tmp_path, "b")
    pids = {}

    async def first():
        async with a.running(), b.running(api=True):
            inst = await a.node.start(spec(tmp_path))
            await a.node.migrate("vm", MigrateOptions(to=str(b.socket)))
            await wait_for(lambda: getattr(getattr(b.node.instances.get("vm"), "migration", None),
                                           "status", "") == "active")
            pids["dest"] = b.node.instances["vm"].proc.pid
            pids["src"] = inst.proc.pid
        # both daemons left; kill the destination's QEMU while nobody watches it
        os.kill(pids["dest"], signal.SIGKILL)

    async def second():
        async with b.running():
            inst = b.node.instances["vm"]
            with trio.fail_after(10):
                await inst.done.wait()
            assert inst.state == State.FAILED and inst.cause == ExitCause.INCOMING_ABORTED
        async with a.running():  # the source: the stream broke, the migration failed, guest kept
            src = a.node.instances["vm"]
            await wait_for(lambda: src.state != State.MIGRATING, timeout=20)
            assert src.state == State.RUNNING
            await src.stop()

    import os
    run(first)
    run(second)
    assert a.state_left() == [] and b.state_left() == []


def test_the_incoming_watchdog_never_touches_the_next_migration(tmp_path):
    """Found by the evacuation bench: the watchdog outlived the activation and, firing while the
    guest's next (outgoing) migration was still in ``setup``, read it as an incoming one:
    internal error, guest killed."""
    fake_knobs(tmp_path, migrate_seconds=0.5)
    a, b = Bench(tmp_path, "a"), Bench(tmp_path, "b", incoming_timeout=4)

    async def main():
        async with a.running(), b.running(api=True), trio.open_nursery() as n:
            hang = trio.socket.socket(trio.socket.AF_UNIX)
            await hang.bind(str(tmp_path / "hang.sock"))
            hang.listen(4)  # a destination that accepts and never answers: the next migration stays in setup
            inst = await a.node.start(spec(tmp_path))
            await a.node.migrate("vm", MigrateOptions(to=str(b.socket)))
            with trio.fail_after(20):
                await inst.done.wait()
            moved = b.node.instances["vm"]
            assert moved.state == State.RUNNING
            await b.node.migrate("vm", MigrateOptions(to=str(tmp_path / "hang.sock")))
            await trio.sleep(5)  # past the watchdog's 4 s, with the outgoing migration in setup
            assert moved.migration.status == "setup" and moved.state == State.MIGRATING
            assert "instance.internal_error" not in b.types() and moved.proc.alive
            await moved.stop(force=True)
            hang.close()
            n.cancel_scope.cancel()

    run(main)
    assert a.state_left() == [] and b.state_left() == []
