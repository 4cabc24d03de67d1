"""Issue 9's model test: random sequences of lifecycle steps on two real nodes, checked against a model.

Hypothesis (stateful testing, ``RuleBasedStateMachine``) draws sequences of:

* ``start`` an instance on a node, ``stop`` it;
* ``kill_qemu``: SIGKILL an instance's QEMU by pid (its daemon up or down);
* ``kill_daemon``: SIGKILL a node's ``qsup serve``; ``restart_daemon``;
* ``migrate`` an instance to the other node (it must complete);
* ``migrate_cancel``: a throttled migration, cancelled while QEMU reports it ``active``
  (the guest must stay where it was, the destination must be torn down).

against two real daemons in namespaces (integration/modelnodes.py, built on
migtopo.TwoNodes) with real QEMUs.  The guests are halted multiboot stubs in 32 MiB
(see ``modelnodes.write_halt_kernel``), so a step costs QEMU almost nothing.

After every step the model says what must be true on each node, and the system is
observed (not asked) until it is so, or the step fails after ``SETTLE_S``.  Every sample of
that settle period is also checked for a transient double, which fails the step at once even
if it would go away (:meth:`Machine.transient_doubles`): a guest address routed on both nodes
at once, a QEMU that is neither the model's nor one that was there before the step (on its
way out), two QEMUs of one name on a node, a route the model does not expect that was not there
before the step.  What must settle:

* QEMU processes in the node's namespace: exactly the model's pids, each with its ``-name``;
* taps, routes (any table) and ``iif`` rules: exactly those of the model's instances
  (a rule outlives its tap when QEMU died under a dead daemon; recovery removes it);
* records under ``<state_dir>/instances``: exactly the model's instances;
* the API's views (when the daemon is up): state and pid as in the model;
* the event log (read from ``events.db``): seq strictly increasing, every
  ``instance.<state>`` move legal per ``supervisor._state.TRANSITIONS`` *from the last state
  this log showed for that instance* (not from the event's own ``previous``, which the state
  machine guarantees; see :func:`lifecycle_mismatches`), and each instance's last lifecycle
  event is the state the model expects on that node.

How much runs: ``make test`` runs ``QSUP_MODEL_EXAMPLES`` sequences (default 5) of up to
``QSUP_MODEL_STEPS`` steps (default 10), without shrinking, a few minutes in all.  More::

    QSUP_MODEL_EXAMPLES=200 QSUP_MODEL_SHRINK=1 .venv/bin/pytest -q integration/test_model.py

(``QSUP_MODEL_SHRINK=1`` turns on Hypothesis' shrinking of a failing sequence: slow with
real daemons, but the sequence it prints is minimal.)  The per-test timeout grows with
the number of examples.  A failing sequence is printed as Python steps; keep it as an
explicit regression test below (``Machine`` can be driven by hand, see the tests at the end).
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from modelnodes import ModelNodes, Observed, write_halt_kernel
from netconf._tap import tap_name_for
from supervisor._state import TRANSITIONS, State
from topo import qmp

EXAMPLES = int(os.environ.get("QSUP_MODEL_EXAMPLES", "5"))
STEPS = int(os.environ.get("QSUP_MODEL_STEPS", "10"))
SHRINK = os.environ.get("QSUP_MODEL_SHRINK", "") not in ("", "0")
#: a step's effects must be observable within this (a crash is noticed at once; a
#: migrated-out source quits and tears down right after ``completed``)
SETTLE_S = 20.0
#: the throttle of a migration that must still be running when it is cancelled
SLOW_BANDWIDTH = 100  # bytes/s: ~1 page per 100 ms slot, >10 min for 32 MiB of zero pages

#: Defects this test found, fixed in dbb5ffa; each keeps its explicit regression test below:
#: * a prepared destination whose QEMU exited while its daemon was down ended ``crashed`` at
#:   the restart instead of ``failed`` (test_destination_daemon_down_mid_migration);
#: * a migration without ``max_bandwidth`` ran at a cancelled one's throttle, which QEMU
#:   keeps for its whole life (test_unthrottled_migration_after_a_throttled_one).

NAMES = ("g0", "g1", "g2")
NODES = ("a", "b")
TABLE = "100"  # routed NICs name a table: route in it + an ``iif TAP lookup 100`` rule
LIFECYCLE = {f"instance.{s.value}": s for s in State}


def addr(name: str) -> str:
    return f"10.99.0.{10 + NAMES.index(name)}"


def mac(name: str) -> str:
    return f"52:54:00:77:00:{10 + NAMES.index(name):02x}"


def tap(name: str) -> str:
    return tap_name_for(name, mac(name))


def other(node: str) -> str:
    return "b" if node == "a" else "a"


def lifecycle_mismatches(n: str, events: list[dict], restarts: list[int] = ()) -> tuple[list[str], dict[str, State]]:
    """Each ``instance.<state>`` event of node ``n`` against the last state this log showed for
    that instance; returns (what is wrong, the last state per instance).

    An event's own ``previous`` is what the daemon's state machine moved from, so it is always
    legal; a lost, doubled or out-of-order event shows only against what came before it in the
    log.  ``restarts``: the last seq before each daemon restart.  A restarted daemon takes an
    instance over with a state machine of its own that starts at ``starting`` (no event), so an
    instance's first event after a restart moves from there -- and only an instance the old
    daemon left live can be taken over.  Otherwise the first event of an instance (or of a
    new one after a final state) is ``instance.starting``, and every other one moves from the
    last state seen, as ``previous`` must also say.
    """
    out: list[str] = []
    last: dict[str, State] = {}
    epoch_of: dict[str, int] = {}
    bounds = sorted(restarts)
    for e in events:
        new = LIFECYCLE.get(e["type"])
        if new is None:
            continue
        k = e["instance"]
        epoch = sum(1 for b in bounds if e["seq"] > b)
        cur = last.get(k)
        adopted = cur is not None and not cur.is_final and epoch_of.get(k, 0) < epoch
        if adopted:
            ok, want_prev = new in TRANSITIONS[State.STARTING], State.STARTING.value
        elif cur is None or cur.is_final:
            ok, want_prev = new is State.STARTING, None
        else:
            ok, want_prev = new in TRANSITIONS[cur], cur.value
        if not ok:
            seen = f"after {cur.value}" if cur else "as its first event"
            how = ", taken over by a restarted daemon" if adopted else ""
            out.append(f"node-{n}: illegal move in events ({seen}{how}): {e}")
        elif want_prev is not None and e.get("previous") != want_prev:
            out.append(f"node-{n}: event says previous={e.get('previous')!r}, the log showed {want_prev!r} last: {e}")
        last[k] = new
        epoch_of[k] = epoch
    return out, last


@dataclass
class Live:
    """An instance that holds its guest on ``node`` (a migration source until it hands over)."""

    node: str
    pid: int
    qemu_dead: bool = False  # SIGKILLed while its daemon was down: noticed at the restart
    mig: str | None = None  # an outgoing migration to this node is in flight (throttled)
    mig_over: bool = False  # ... and ended in QEMU while this daemon was down: settled at its restart
    throttled: bool = False  # this QEMU ran a throttled migration (a later one must not inherit it)


@dataclass
class Incoming:
    """A prepared migration destination: QEMU ``-incoming``, a tap, a record, no L3."""

    node: str
    pid: int
    qemu_dead: bool = False


class Machine(RuleBasedStateMachine):
    """The model (``live``, ``last``, ``up``) and the real nodes, stepped together."""

    workdir_base: Path | None = None
    _count = 0

    def __init__(self):
        super().__init__()
        Machine._count += 1
        base = Machine.workdir_base
        assert base is not None, "set Machine.workdir_base first"
        self.kernel = write_halt_kernel(base / "halt.mb")
        self.workdir = base / f"ex{Machine._count}"
        self.workdir.mkdir()
        self.nodes = ModelNodes(self.workdir)
        #: instance name -> where it lives (at most one node: names are unique across the two)
        self.live: dict[str, Live] = {}
        #: instance name -> its migration destination while a migration is in flight
        self.incoming: dict[str, Incoming] = {}
        #: node -> instance name -> the lifecycle state its last event on that node must name
        self.last: dict[str, dict[str, str]] = {n: {} for n in NODES}
        #: node -> the last event seq before each of its daemon restarts
        self.restarts: dict[str, list[int]] = {n: [] for n in NODES}
        #: node -> what the last settled check observed, and the QEMU pids and addresses the
        #: model has held there since: what may still be on its way out while settling
        self.settled: dict[str, Observed] = {}
        self.held: dict[str, tuple[set[int], set[str]]] = {n: (set(), set()) for n in NODES}
        self.up = {n: True for n in NODES}
        self.steps: list[str] = []

    def teardown(self):
        leaked = self.nodes.close()  # the leak check: QEMUs a daemon started and does not own, or unkillable
        assert not leaked, f"qemu leaks: {leaked}"

    # -- helpers -----------------------------------------------------------
    def node(self, n: str):
        return self.nodes.nodes[n]

    def spec(self, name: str) -> dict:
        return {"name": name, "memory": 32, "kernel": str(self.kernel), "append": "qsup-model",
                "nics": [{"mode": "routed", "mac": mac(name), "ip": addr(name), "link": TABLE}]}

    def hold(self, n: str, name: str, pid: int) -> None:
        """The model now has ``name``'s QEMU ``pid`` on node ``n`` (so after the step it may be on
        its way out there, not a stray)."""
        self.held[n][0].add(pid)
        self.held[n][1].add(addr(name))

    def log(self, step: str) -> None:
        self.steps.append(step)
        print(f"model step {len(self.steps)}: {step}", flush=True)

    def live_on(self, n: str, *, daemon_up: bool | None = None) -> list[str]:
        return sorted(k for k, v in self.live.items() if v.node == n and (daemon_up is None or self.up[n] == daemon_up))

    def free_names(self) -> list[str]:
        return [k for k in NAMES if k not in self.live and k not in self.incoming]

    def movable(self) -> list[str]:
        """Instances a migration can start from: alive, not migrating (both daemons must be up)."""
        return sorted(k for k, v in self.live.items() if not v.qemu_dead and v.mig is None)

    def in_flight(self, *, src_up: bool | None = None) -> list[str]:
        return sorted(k for k, v in self.live.items() if v.mig is not None and not v.mig_over and not v.qemu_dead
                      and k in self.incoming and (src_up is None or self.up[v.node] == src_up))

    # -- how a migration's end shows on each side ------------------------------
    def _end_incoming(self, name: str) -> None:
        """The destination's QEMU exits (or is killed): a failed incoming migration, never a crash.

        DESIGN.md: "A failed incoming migration makes the destination qemu exit, and that
        must be handled as a failure, not a crash to retry" -- also when its daemon learns
        it only at a restart.
        """
        inc = self.incoming.get(name)
        if inc is None:
            return
        if self.up[inc.node]:
            del self.incoming[name]
            self.last[inc.node][name] = "failed"
        else:
            inc.qemu_dead = True

    def _end_source_kept(self, name: str) -> None:
        """The migration failed or was cancelled: the source keeps (and runs) the guest."""
        live = self.live[name]
        if self.up[live.node]:
            live.mig, live.mig_over = None, False
            self.last[live.node][name] = "running"
        else:
            live.mig_over = True

    def tail(self, *ns: str) -> str:
        """The last daemon log lines of nodes ``ns``, for a failure message."""
        return "\n".join(f"--- node-{n} log:\n{self.node(n).daemon.log()[-3000:]}" for n in ns)

    def wait_view(self, n: str, name: str, cond, what: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        v = None
        while time.monotonic() < deadline:
            v = self.node(n).view(name)
            if v is not None and cond(v):
                return v
            time.sleep(0.05)
        raise AssertionError(f"node-{n}: {name} never {what}: {v}")

    # -- the steps, callable by hand (regression tests) ----------------------
    def do_start(self, n: str, name: str) -> None:
        self.log(f"start {name} on {n}")
        v = self.node(n).call("POST", "/v1/instances", json=self.spec(name), ok=(201,)).json()
        assert v["state"] == "running" and v["pid"], v
        self.live[name] = Live(n, v["pid"])
        self.hold(n, name, v["pid"])
        self.last[n][name] = "running"

    def do_stop(self, name: str) -> None:
        n = self.live[name].node
        self.log(f"stop {name} on {n}")
        v = self.node(n).call("POST", f"/v1/instances/{name}/stop", json={}).json()
        assert v["state"] == "stopped", v
        if self.live[name].mig is not None:  # cancelled first: the destination is torn down
            self._end_incoming(name)
        del self.live[name]
        self.last[n][name] = "stopped"

    def do_kill_qemu(self, name: str) -> None:
        inst = self.live[name]
        self.log(f"kill -9 qemu of {name} on {inst.node} (daemon {'up' if self.up[inst.node] else 'down'})")
        os.kill(inst.pid, signal.SIGKILL)
        if inst.mig is not None:  # the stream breaks: the destination's QEMU exits
            self._end_incoming(name)
        if self.up[inst.node]:
            del self.live[name]
            self.last[inst.node][name] = "crashed"
        else:
            inst.qemu_dead = True

    def do_kill_incoming_qemu(self, name: str) -> None:
        inc = self.incoming[name]
        self.log(f"kill -9 incoming qemu of {name} on {inc.node} (daemon {'up' if self.up[inc.node] else 'down'})")
        os.kill(inc.pid, signal.SIGKILL)
        self._end_incoming(name)
        self._end_source_kept(name)

    def do_kill_daemon(self, n: str) -> None:
        self.log(f"kill -9 daemon {n}")
        self.node(n).kill_daemon()
        self.up[n] = False

    def do_restart_daemon(self, n: str) -> None:
        self.log(f"restart daemon {n}")
        before = max((e["seq"] for e in self.node(n).events()), default=0)
        self.restarts[n].append(before)
        self.node(n).start_daemon()
        self.up[n] = True
        # every guest whose QEMU survived is taken over again, same pid, with an event
        want = {(k, v.pid) for k, v in self.live.items() if v.node == n and not v.qemu_dead} | \
            {(k, v.pid) for k, v in self.incoming.items() if v.node == n and not v.qemu_dead}
        deadline = time.monotonic() + SETTLE_S
        while True:
            got = {(e["instance"], e.get("pid")) for e in self.node(n).events()
                   if e["seq"] > before and e["type"] == "instance.reattached"}
            if got == want or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert got == want, f"node-{n} reattached {sorted(got)}, model {sorted(want)}\n{self.tail(n)}"
        for name in self.live_on(n):
            live = self.live[name]
            if live.qemu_dead:  # cleaned up from its journal, with an event
                del self.live[name]
                self.last[n][name] = "crashed"
            elif live.mig is not None:
                # recovery: a migration still running in QEMU is cancelled, one that failed
                # meanwhile is settled: the guest stays here, running.  One that QEMU
                # *completed* meanwhile (QEMU does not wait for the daemon at the switchover)
                # is handed over: the restarted daemon confirms its L3 release, the waiting
                # destination activates, and this side stops.  The views say which it was.
                dst = live.mig
                v = self.wait_view(n, name, lambda v: v["state"] != "migrating", "settled after the restart")
                inc = self.incoming.get(name)
                if v["state"] == "stopped" and inc is not None and not inc.qemu_dead:
                    vd = self.wait_view(dst, name, lambda v: v["state"] == "running", "running (handed over)")
                    assert vd["pid"] == inc.pid, vd
                    del self.incoming[name]
                    self.live[name] = Live(dst, vd["pid"])
                    self.last[n][name] = "stopped"
                    self.last[dst][name] = "running"
                    continue
                live.mig, live.mig_over = None, False
                self.last[n][name] = "running"
                self._end_incoming(name)
        for name, inc in list(self.incoming.items()):
            if inc.node == n and inc.qemu_dead:
                del self.incoming[name]
                self.last[n][name] = "failed"

    def do_migrate(self, name: str) -> None:
        src = self.live[name].node
        dst = other(src)
        body = {"to": self.nodes.migration_target(dst)}  # no max_bandwidth: QEMU's default, whatever ran before
        self.log(f"migrate {name} {src} -> {dst}" + (" (after a throttled one)" if self.live[name].throttled else ""))
        self.node(src).call("POST", f"/v1/instances/{name}/migrate", json=body, ok=(202,))
        v = self.wait_view(src, name, lambda v: v["state"] in ("stopped", "crashed", "failed") or
                           (v.get("migration") or {}).get("result"), "finished migrating", timeout=30)
        assert (v.get("migration") or {}).get("result") == "completed", (v.get("migration"), self.tail(src, dst))
        vd = self.wait_view(dst, name, lambda v: v["state"] == "running", "running on the destination")
        self.live[name] = Live(dst, vd["pid"])
        self.hold(dst, name, vd["pid"])
        self.last[src][name] = "stopped"
        self.last[dst][name] = "running"

    def do_migrate_slow(self, name: str) -> None:
        """Start a migration throttled to ``SLOW_BANDWIDTH``: it stays ``active`` until finished or ended."""
        inst = self.live[name]
        src, dst = inst.node, other(inst.node)
        self.log(f"migrate {name} {src} -> {dst} throttled (left in flight)")
        self.node(src).call("POST", f"/v1/instances/{name}/migrate",
                            json={"to": self.nodes.migration_target(dst), "max_bandwidth": SLOW_BANDWIDTH},
                            ok=(202,))
        self.wait_view(src, name, lambda v: (v.get("migration") or {}).get("status") == "active",
                       "active (throttled migration)")
        vd = self.wait_view(dst, name, lambda v: v["state"] == "migrating" and v["pid"], "prepared")
        inst.mig = dst
        inst.throttled = True
        self.incoming[name] = Incoming(dst, vd["pid"])
        self.hold(dst, name, vd["pid"])
        self.last[src][name] = "migrating"
        self.last[dst][name] = "migrating"

    def do_cancel(self, name: str) -> None:
        inst = self.live[name]
        self.log(f"cancel the migration of {name} on {inst.node}")
        self.node(inst.node).call("POST", f"/v1/instances/{name}/migrate/cancel")
        v = self.wait_view(inst.node, name, lambda v: (v.get("migration") or {}).get("result") and
                           v["state"] != "migrating", "done cancelling")
        assert v["migration"]["result"] == "cancelled", v
        assert v["state"] == "running" and v["pid"] == inst.pid, v
        self._end_incoming(name)
        self._end_source_kept(name)

    def do_finish(self, name: str) -> None:
        """Lift the throttle on the source's operator monitor: the migration completes."""
        inst = self.live[name]
        src, dst = inst.node, inst.mig
        self.log(f"finish the migration of {name} {src} -> {dst} (operator lifts the throttle)")
        qmp(self.node(src).view(name)["qmp_operator"], "migrate-set-parameters", {"max-bandwidth": 1 << 30})
        v = self.wait_view(src, name, lambda v: v["state"] in ("stopped", "crashed", "failed") or
                           (v.get("migration") or {}).get("result"), "finished migrating", timeout=30)
        assert (v.get("migration") or {}).get("result") == "completed", (v.get("migration"), self.tail(src, dst))
        vd = self.wait_view(dst, name, lambda v: v["state"] == "running", "running on the destination")
        assert vd["pid"] == self.incoming[name].pid, vd
        del self.incoming[name]
        self.live[name] = Live(dst, vd["pid"])
        self.last[src][name] = "stopped"
        self.last[dst][name] = "running"

    def do_migrate_cancel(self, name: str) -> None:
        self.do_migrate_slow(name)
        self.do_cancel(name)

    # -- rules ---------------------------------------------------------------
    @precondition(lambda self: any(self.up.values()) and self.free_names())
    @rule(data=st.data())
    def start(self, data):
        n = data.draw(st.sampled_from([n for n in NODES if self.up[n]]), label="node")
        self.do_start(n, data.draw(st.sampled_from(self.free_names()), label="name"))

    @precondition(lambda self: any(self.live_on(n, daemon_up=True) for n in NODES))
    @rule(data=st.data())
    def stop(self, data):
        self.do_stop(data.draw(st.sampled_from(self._with_daemon()), label="name"))

    @precondition(lambda self: any(not v.qemu_dead for v in self.live.values()))
    @rule(data=st.data())
    def kill_qemu(self, data):
        self.do_kill_qemu(data.draw(st.sampled_from(sorted(k for k, v in self.live.items() if not v.qemu_dead)),
                                    label="name"))

    @precondition(lambda self: any(self.up.values()))
    @rule(data=st.data())
    def kill_daemon(self, data):
        self.do_kill_daemon(data.draw(st.sampled_from([n for n in NODES if self.up[n]]), label="node"))

    @precondition(lambda self: not all(self.up.values()))
    @rule(data=st.data())
    def restart_daemon(self, data):
        self.do_restart_daemon(data.draw(st.sampled_from([n for n in NODES if not self.up[n]]), label="node"))

    @precondition(lambda self: any(not v.qemu_dead for v in self.incoming.values()))
    @rule(data=st.data())
    def kill_incoming_qemu(self, data):
        self.do_kill_incoming_qemu(data.draw(st.sampled_from(
            sorted(k for k, v in self.incoming.items() if not v.qemu_dead)), label="name"))

    @precondition(lambda self: all(self.up.values()) and self.movable())
    @rule(data=st.data())
    def migrate(self, data):
        self.do_migrate(data.draw(st.sampled_from(self.movable()), label="name"))

    @precondition(lambda self: all(self.up.values()) and self.movable())
    @rule(data=st.data())
    def migrate_slow(self, data):
        self.do_migrate_slow(data.draw(st.sampled_from(self.movable()), label="name"))

    @precondition(lambda self: self.in_flight(src_up=True))
    @rule(data=st.data())
    def cancel(self, data):
        self.do_cancel(data.draw(st.sampled_from(self.in_flight(src_up=True)), label="name"))

    @precondition(lambda self: all(self.up.values()) and self.in_flight())
    @rule(data=st.data())
    def finish(self, data):
        self.do_finish(data.draw(st.sampled_from(self.in_flight()), label="name"))

    def _with_daemon(self) -> list[str]:
        return sorted(k for k, v in self.live.items() if self.up[v.node])

    # -- the comparison --------------------------------------------------------
    @invariant()
    def observed_matches_model(self):
        self.check(SETTLE_S)

    def check(self, timeout: float = SETTLE_S) -> None:
        """Poll until every node looks as the model says; fail with the differences.

        Every sample is also checked for a transient double (:meth:`transient_doubles`),
        which fails at once: waiting for it to go away would hide it.
        """
        deadline = time.monotonic() + timeout
        while True:
            obs = {n: self.node(n).observe({addr(k) for k in NAMES}) for n in NODES}
            doubles = self.transient_doubles(obs)
            if doubles:
                seen = [f"node-{n}: qemus {sorted((p, q.name) for p, q in o.qemus.items())}, routes {sorted(o.routes)}"
                        for n, o in obs.items()]
                raise AssertionError(f"after {self.steps}, while settling:\n  " + "\n  ".join(doubles + seen)
                                     + "\n" + self.tail(*NODES))
            diffs = [d for n in NODES for d in self.mismatches(n, obs[n])]
            if not diffs:
                self.settled = obs
                self.held = {n: (set(), set()) for n in NODES}
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"after {self.steps}:\n  " + "\n  ".join(diffs))
            time.sleep(0.1)

    def expected_qemus(self, n: str) -> dict[int, str]:
        """The QEMUs the model has on node ``n`` now: pid -> instance name."""
        return {v.pid: k for table in (self.live, self.incoming) for k, v in table.items()
                if v.node == n and not v.qemu_dead}

    def transient_doubles(self, obs: dict[str, Observed]) -> list[str]:
        """What one sample of both nodes must never show, even for a moment: a guest address
        routed on both nodes; on a node, two QEMUs of one name, a QEMU that is neither the
        model's now nor on its way out (there at the last settled check, or held by the model
        since), a route the model does not expect there that is not on its way out either."""
        out = []
        for a in sorted(obs["a"].routes & obs["b"].routes):
            out.append(f"{a} routed on both nodes at once")
        for n in NODES:
            before = self.settled.get(n)
            was_qemus = (set(before.qemus) if before else set()) | self.held[n][0]
            was_routes = (before.routes if before else set()) | self.held[n][1]
            want = self.expected_qemus(n)
            names = [q.name for q in obs[n].qemus.values()]
            for name in sorted({x for x in names if names.count(x) > 1}, key=str):
                out.append(f"node-{n}: {names.count(name)} QEMUs named {name}: {sorted(obs[n].qemus)}")
            for pid, q in sorted(obs[n].qemus.items()):
                if pid not in want and pid not in was_qemus:
                    out.append(f"node-{n}: a QEMU the model does not have: pid {pid} ({q.name}); "
                               f"model {want}, there before the step {sorted(was_qemus)}")
            want_routes = {addr(k) for k, v in self.live.items() if v.node == n and not v.qemu_dead}
            for r in sorted(obs[n].routes - want_routes - was_routes):
                out.append(f"node-{n}: route to {r} the model does not expect (nor was it there before)")
        return out

    def mismatches(self, n: str, obs: Observed | None = None) -> list[str]:
        node = self.node(n)
        if obs is None:
            obs = node.observe({addr(k) for k in NAMES})
        here = {k: v for k, v in self.live.items() if v.node == n}
        running = {k: v for k, v in here.items() if not v.qemu_dead}
        inc = {k: v for k, v in self.incoming.items() if v.node == n}
        inc_running = {k: v for k, v in inc.items() if not v.qemu_dead}
        out = []

        def diff(what, want, got):
            if want != got:
                out.append(f"node-{n} {what}: model {sorted(want)}, observed {sorted(got)}")

        diff("qemu pids", {(v.pid, k) for k, v in (*running.items(), *inc_running.items())},
             {(q.pid, q.name) for q in obs.qemus.values()})
        diff("taps", {tap(k) for k in (*running, *inc_running)}, obs.taps)
        diff("routes", {addr(k) for k in running}, obs.routes)  # never on a destination before completed
        diff("rules", {tap(k) for k in here}, obs.rules)
        diff("records", {*here, *inc}, obs.records)
        if self.up[n] and obs.views is not None:
            live_views = {k for k, v in obs.views.items() if not State(v["state"]).is_final}
            diff("live instances (API)", {*here, *inc}, live_views)
            for k, v in obs.views.items():
                if k in here or k in inc:
                    want = ("migrating", inc[k].pid) if k in inc else \
                        ("migrating" if here[k].mig else "running", here[k].pid)
                    if (v["state"], v["pid"]) != want:
                        out.append(f"node-{n} {k}: view says {v['state']} pid {v['pid']}, model {want}")
                elif v["state"] != self.last[n].get(k):
                    out.append(f"node-{n} {k}: view says {v['state']}, model {self.last[n].get(k)}")
        out += self.event_mismatches(n, node.events())
        return out

    def event_mismatches(self, n: str, events: list[dict]) -> list[str]:
        out = []
        seqs = [e["seq"] for e in events]
        if any(b <= a for a, b in itertools.pairwise(seqs)):
            out.append(f"node-{n}: event seqs not strictly increasing: {seqs}")
        moves, last = lifecycle_mismatches(n, events, self.restarts[n])
        out += moves
        want = self.last[n]
        got = {k: v.value for k, v in last.items()}
        if want != got:
            out.append(f"node-{n} last lifecycle event per instance: model {want}, observed {got}")
        return out


def _settings(examples: int) -> settings:
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if SHRINK else [])
    return settings(max_examples=examples, stateful_step_count=STEPS, deadline=None, phases=phases,
                    suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.fixture
def machine_dir(tmp_path):
    Machine.workdir_base = tmp_path
    yield tmp_path
    Machine.workdir_base = None


@pytest.mark.timeout(180 + 120 * EXAMPLES * max(1, STEPS // 10) * (3 if SHRINK else 1))
def test_model(machine_dir):
    run_state_machine_as_test(Machine, settings=_settings(EXAMPLES))


# --- the checker itself, on event logs written by hand ---

def _ev(seq: int, inst: str, state: str, previous: str | None = None) -> dict:
    e = {"seq": seq, "type": f"instance.{state}", "instance": inst}
    return e if previous is None else {**e, "previous": previous}


def test_lifecycle_check_reads_the_log_not_each_events_previous():
    ok = [_ev(1, "g0", "starting"), _ev(2, "g0", "running", "starting"), _ev(3, "g0", "migrating", "running"),
          _ev(4, "g0", "running", "migrating"), _ev(5, "g0", "stopping", "running"),
          _ev(6, "g0", "stopped", "stopping"), _ev(7, "g0", "starting"), _ev(8, "g0", "running", "starting")]
    assert lifecycle_mismatches("a", ok) == ([], {"g0": State.RUNNING})
    # each event below is legal from its own ``previous``: only the log shows what is wrong
    doubled = ok[:2] + [_ev(3, "g0", "running", "starting")]
    lost = ok[:2] + [_ev(4, "g0", "running", "migrating")]  # its migrating event never came
    restarted_live = [_ev(1, "g0", "starting"), _ev(2, "g0", "running", "starting"), _ev(3, "g0", "starting")]
    for events in (doubled, lost, restarted_live):
        assert lifecycle_mismatches("a", events)[0], events
    # a restarted daemon takes a live instance over from ``starting`` (no event of its own) ...
    adopted = ok[:3] + [_ev(10, "g0", "migrating", "starting"), _ev(11, "g0", "running", "migrating")]
    assert lifecycle_mismatches("a", adopted, restarts=[3]) == ([], {"g0": State.RUNNING})
    assert lifecycle_mismatches("a", adopted)[0]  # ... which without that restart is a lost event
    # ... and never one that had ended
    ended = ok[:6] + [_ev(10, "g0", "running", "starting")]
    assert lifecycle_mismatches("a", ended, restarts=[6])[0]


# --- explicit sequences: each a step list the random test found or that matters on its own ---

@pytest.fixture
def machine(machine_dir):
    m = Machine()
    try:
        yield m
    finally:
        m.teardown()


def test_every_step_kind_once(machine):
    """Every kind of step, in an order that reaches each interesting combination once."""
    m = machine
    m.do_start("a", "g0")
    m.check()
    m.do_start("b", "g1")
    m.check()
    m.do_migrate("g0")  # a -> b
    m.check()
    m.do_migrate_cancel("g1")  # stays on b
    m.check()
    m.do_kill_daemon("b")
    m.check()
    m.do_kill_qemu("g1")  # under a dead daemon: its rule stays until the restart
    m.check()
    m.do_restart_daemon("b")
    m.check()
    m.do_kill_qemu("g0")  # under a live daemon: crashed at once
    m.check()
    m.do_start("a", "g2")
    m.do_stop("g2")
    m.check()


def test_in_flight_migration_steps(machine):
    """A throttled migration left in flight, ended every way: cancel, finish, daemon and QEMU kills."""
    m = machine
    m.do_start("a", "g0")
    m.do_migrate_slow("g0")
    m.check()
    m.do_finish("g0")  # a -> b completes
    m.check()
    m.do_migrate_slow("g0")  # b -> a
    m.check()
    m.do_kill_daemon("b")  # the source's daemon dies mid-migration
    m.check()
    m.do_restart_daemon("b")  # recovery cancels (the guest stays on b) or, if QEMU completed, hands over
    m.check()
    m.do_migrate_slow("g0")
    m.do_kill_incoming_qemu("g0")  # the destination dies: the source keeps the guest
    m.check()
    m.do_migrate_slow("g0")
    m.do_kill_qemu("g0")  # the source dies: the destination is torn down
    m.check()
    m.do_start("a", "g1")
    m.do_migrate_slow("g1")
    m.do_stop("g1")  # a stop mid-migration cancels it first
    m.check()


def test_destination_daemon_down_mid_migration(machine):
    """The destination's daemon is dead while the migration ends (cancelled, then the
    destination's QEMU killed); at its restart the incoming instances end ``failed``
    (incoming aborted), not ``crashed``, nothing is left on b, and b takes a migration again.

    Found by the random test: both ended ``crashed`` before dbb5ffa.
    """
    m = machine
    m.do_start("a", "g0")
    m.do_start("a", "g1")
    m.do_migrate_slow("g0")
    m.do_migrate_slow("g1")
    m.do_kill_daemon("b")
    m.check()
    m.do_cancel("g0")  # b can't be told; its QEMU exits when the stream ends
    m.check()
    m.do_kill_incoming_qemu("g1")  # under b's dead daemon; a keeps g1
    m.check()
    m.do_restart_daemon("b")
    m.check()
    m.do_migrate("g0")  # b works again
    m.check()


def test_unthrottled_migration_after_a_throttled_one(machine):
    """A migration without ``max_bandwidth`` must not inherit the previous migration's limit.

    Found by the random test: QEMU keeps migration parameters for its life, and before
    dbb5ffa qsup set ``max-bandwidth`` only when given, so this migration ran at 100 B/s.
    """
    m = machine
    m.do_start("a", "g0")
    m.do_migrate_cancel("g0")
    m.check()
    m.do_migrate("g0")  # must complete at full speed
    m.check()
