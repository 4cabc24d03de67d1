"""The daemon dies at the worst moment of a start or a stop; a guest that will not stop.

* ``qsup serve`` is SIGKILLed in the middle of a start and in the middle of a stop.
  The moment is hit exactly, not by sleeping: a netconf hook of the instance
  SIGKILLs the daemon (by the pid the test wrote to a file).  After a restart the
  instance must be final or live -- never stuck -- and if final, nothing of it is
  left: no QEMU, tap, route, rule or record.  The NIC's L3 lives in routing table
  100, so its ``iif TAP lookup 100`` rule survives the tap: only qsup's journal
  undo removes it.
* Stop escalation: a guest that ignores the ACPI power button (its ``button``
  module refused with ``module_blacklist``) is stopped with ``quit`` after the
  powerdown timeout; a QEMU that does not even answer (SIGSTOPped) is SIGKILLed.
  The events show which step ended it, and the time is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from topo import QsupDaemon, guest_spec, node_with_uplink, pid_alive

IP = "10.99.0.51"
MAC = "52:54:00:aa:05:01"
FINAL = ("stopped", "crashed", "failed")

#: SIGKILL the daemon once, when the instance's hooked step runs at PHASE/ACTION.
KILL_DAEMON_HOOK = """#!/bin/sh
[ "$PHASE" = {phase} ] && [ "$ACTION" = {action} ] || exit 0
f={pidfile}
[ -s "$f" ] || exit 0
pid=$(cat "$f")
mv "$f" "$f.used"
kill -9 "$pid"
exit 0
"""


@pytest.fixture
def node(netns_factory):
    node, client = netns_factory(), netns_factory()
    node_with_uplink(node, client)
    client.run("ip", "route", "add", "10.99.0.0/16", "via", "192.168.101.1")
    return node, client


@pytest.fixture
def daemons(tmp_path):
    """Daemons registered for teardown before they are waited for; killed with their QEMUs."""
    made: list[QsupDaemon] = []

    def make(ns, **kw) -> QsupDaemon:
        d = tmp_path / f"node{len(made)}"
        d.mkdir()
        dm = QsupDaemon(ns, d, start=False, **kw)
        made.append(dm)
        dm.start()
        return dm

    yield make
    leaked = []
    for dm in made:
        leaked += dm.close()
    assert not leaked, f"qemu pids still alive at teardown: {leaked}"


def table_spec(name: str, append: str = "") -> dict:
    return guest_spec(name, [{"mode": "routed", "mac": MAC, "ip": IP, "link": "100"}],
                      append=f"guest.ip0={IP}/32 {append}")


def kill_hook(tmp_path, step: str, kind: str, phase: str, action: str) -> tuple:
    """A hook of ``step`` (``kind``: before.d/after.d) that SIGKILLs the daemon at PHASE/ACTION."""
    hooks = tmp_path / "hooks"
    pidfile = tmp_path / "daemon.pid"
    hook = hooks / step / kind / "50-kill-daemon"
    hook.parent.mkdir(parents=True)
    hook.write_text(KILL_DAEMON_HOOK.format(phase=phase, action=action, pidfile=pidfile))
    hook.chmod(0o755)
    return hooks, pidfile


def show(dm: QsupDaemon, name: str) -> dict:
    return dm.cli_json("show", name)


def leftovers(ns, dm: QsupDaemon, name: str) -> list[str]:
    out = []
    taps = sorted(l for l in ns.links() if l.startswith("qs"))
    if taps:
        out.append(f"taps {taps}")
    if IP in ns.run("ip", "route", "show", "table", "all"):
        out.append("route")
    if "lookup 100" in ns.run("ip", "rule", "show"):
        out.append("rule")
    if (dm.state_dir / "instances" / name).exists():
        out.append("record")
    return out


def assert_final_or_live(ns, client, dm: QsupDaemon, name: str, qemu_pids: set[int]) -> str:
    """The restarted daemon's verdict: final with nothing left, or running and reachable."""
    v = show(dm, name)
    assert v["state"] in FINAL + ("running",), v
    if v["state"] == "running":
        assert pid_alive(v["pid"]) and f"{IP} dev" in ns.run("ip", "route", "show", "table", "100")
        assert client.ping(IP), "live after the restart but unreachable"
        assert dm.cli_json("stop", name, "--timeout", "5")["state"] == "stopped"
    for pid in qemu_pids:
        deadline = time.monotonic() + 10
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(pid), f"qemu {pid} outlived the instance"
    assert leftovers(ns, dm, name) == [], leftovers(ns, dm, name)
    return v["state"]


def test_daemon_killed_in_the_middle_of_a_start(node, daemons, tmp_path):
    node_ns, client = node
    # right after the rule, the last L3 step, before ``cont``: the rule outlives QEMU's tap,
    # so only the restarted daemon's journal recovery can remove it
    hooks, pidfile = kill_hook(tmp_path, "rule4", "after.d", "start", "up")
    dm = daemons(node_ns, hooks_dir=hooks)
    pidfile.write_text(str(dm.pid))
    spec = dm.workdir / "spec-ds.json"
    spec.write_text(json.dumps(table_spec("ds")))
    r = dm.cli("start", str(spec), check=False)
    assert r.returncode == 3, (r.returncode, r.stderr)  # the daemon died under the request
    dm.proc.wait(timeout=10)
    assert (tmp_path / "daemon.pid.used").exists(), "the hook never ran"
    # what the start had made so far: a QEMU (paused, -S) and its tap, journaled
    rec = json.loads((dm.state_dir / "instances" / "ds" / "record.json").read_text())
    assert rec["state"] == "starting" and pid_alive(rec["pid"]), rec
    assert IP in node_ns.run("ip", "route", "show", "table", "100")
    assert "lookup 100" in node_ns.run("ip", "rule", "show")
    dm.start()
    state = assert_final_or_live(node_ns, client, dm, "ds", {rec["pid"]})
    assert state == "failed", state  # a start cut short is rolled back, not resumed


def test_daemon_killed_in_the_middle_of_a_stop(node, daemons, tmp_path):
    node_ns, client = node
    # rule4 is the last step applied, so the first undone: the rule is still there
    hooks, pidfile = kill_hook(tmp_path, "rule4", "after.d", "stop", "down")
    dm = daemons(node_ns, hooks_dir=hooks)
    v = dm.start_instance(table_spec("dt"))
    tap = v["nics"][0]["tap"]
    assert f"iif {tap} lookup 100" in node_ns.run("ip", "rule", "show")
    pidfile.write_text(str(dm.pid))
    r = dm.cli("stop", "dt", "--timeout", "3", check=False)
    assert r.returncode == 3, (r.returncode, r.stderr)
    dm.proc.wait(timeout=10)
    assert (tmp_path / "daemon.pid.used").exists(), "the hook never ran"
    # QEMU is gone (the undo runs after it exited), the undo was cut short: the rule is still there
    assert not pid_alive(v["pid"])
    assert f"iif {tap} [detached] lookup 100" in node_ns.run("ip", "rule", "show")
    dm.start()
    state = assert_final_or_live(node_ns, client, dm, "dt", {v["pid"]})
    assert state in ("stopped", "crashed"), state


def test_stop_escalates_powerdown_quit_sigkill(node, daemons):
    """``qsup stop``: powerdown (repeated) for ``--timeout`` s, then ``quit``, then SIGKILL.

    g1 ignores the power button: ``quit`` ends it (QEMU's SHUTDOWN says host-qmp-quit).
    g2's QEMU is frozen (SIGSTOP) after the first powerdown: neither powerdown nor quit
    is answered, so only SIGKILL ends it -- no SHUTDOWN event at all.  Each stop must
    end within its bound: timeout + quit's 5 s + 5 s wait (+ slack), not hang.
    """
    node_ns, client = node
    dm = daemons(node_ns)
    deaf = "module_blacklist=button"  # the guest then has no ACPI power button
    views = {}
    for i, name in enumerate(("g1", "g2")):
        views[name] = dm.start_instance(guest_spec(
            name, [{"mode": "routed", "mac": f"52:54:00:aa:06:0{i}", "ip": f"10.99.0.6{i}"}],
            append=f"guest.ip0=10.99.0.6{i}/32 {deaf}"))
    for name in views:
        dm.wait_console(name)
        assert "system_powerdown will be ignored" in dm.console(name), dm.console(name)[-1500:]
    tail = dm.tail(since=dm.events()[-1]["seq"])
    try:
        t0 = time.monotonic()
        assert dm.cli_json("stop", "g1", "--timeout", "2")["state"] == "stopped"
        quit_s = time.monotonic() - t0

        t0 = time.monotonic()
        stopper = dm.cli_async("stop", "g2", "--timeout", "2")
        tail.wait_for("qmp.POWERDOWN", "g2", timeout=10)
        os.kill(views["g2"]["pid"], signal.SIGSTOP)
        out, err = stopper.communicate(timeout=60)
        kill_s = time.monotonic() - t0
        assert stopper.returncode == 0, err
        assert json.loads(out)["state"] == "stopped"
        tail.wait_for("instance.stopped", "g2")
    finally:
        tail.close()
    g1, g2 = [e for e in tail.of("g1")], [e for e in tail.of("g2")]
    types1 = [e["type"] for e in g1]
    assert types1.count("qmp.POWERDOWN") >= 2, types1  # repeated, once a second
    shutdowns = [e["data"] for e in g1 if e["type"] == "qmp.SHUTDOWN"]
    assert shutdowns == [{"guest": False, "reason": "host-qmp-quit"}], shutdowns
    assert 2 <= quit_s < 2 + 5 + 3, quit_s
    types2 = [e["type"] for e in g2]
    assert "qmp.POWERDOWN" in types2 and "qmp.SHUTDOWN" not in types2, types2
    assert 2 + 5 <= kill_s < 2 + 5 + 5 + 3, kill_s
    for name, v in views.items():
        assert not pid_alive(v["pid"]), name
    assert not [l for l in node_ns.links() if l.startswith("qs")]
    assert "10.99.0.6" not in node_ns.run("ip", "route", "show", "table", "all")
