"""Issue "netconf complete": per-step hooks for real, through `qsup run` and a real guest.

A hook replaces a step or runs before/after it; a failing hook fails the
start and rolls everything back; a hanging hook is killed at its timeout.
"""

from __future__ import annotations

import json
import subprocess

from test_run_vm import MAC1, _run_bad, assert_nothing_left, tap_of
from topo import guest_spec, node_with_uplink


def hook(root, step, kind, body, name="10-hook"):
    """Write an executable hook; kind is before.d, after.d or replace."""
    path = root / step / kind / name if kind != "replace" else root / step / "replace"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def spec(name, ip="10.99.0.20"):
    return guest_spec(name, [{"mode": "routed", "mac": MAC1, "ip": ip}], append=f"guest.ip0={ip}/32")


def test_replace_a_step_and_run_before_and_after(netns_factory, qsup_factory, tmp_path):
    node, client = netns_factory(), netns_factory()
    node_with_uplink(node, client)
    hooks, log = tmp_path / "hooks", tmp_path / "order.log"
    # replace route4: the same route, but with metric 7 (and its own undo on ACTION=down)
    hook(hooks, "route4", "replace",
         'if [ "$ACTION" = up ]; then exec ip route replace "$IP/32" dev "$INTERFACE" metric 7; '
         'else ip route del "$IP/32" dev "$INTERFACE" metric 7 2>/dev/null || true; fi\n')
    hook(hooks, "tap-up", "before.d", f'echo "before $STEP $ACTION $PHASE" >> {log}\n')
    hook(hooks, "tap-up", "after.d", f'echo "after $STEP $ACTION $PHASE" >> {log}\n')
    run = qsup_factory(node, [spec("h1")], hooks_dir=hooks)
    tap, pid = tap_of(run, "h1", MAC1)
    assert "metric 7" in node.run("ip", "route", "show", "10.99.0.20")
    run.wait_console("h1")
    assert node.ping("10.99.0.20"), run.console("h1")[-1500:]
    assert run.stop() == 0
    # undo mirrors apply: after-hooks, the step's undo, then before-hooks
    assert log.read_text().splitlines() == [
        "before tap-up up start", "after tap-up up start", "after tap-up down stop", "before tap-up down stop"]
    assert_nothing_left(node, run, "h1", pid, [tap])


def test_failing_hook_fails_the_start_and_rolls_back(netns_factory, tmp_path):
    node, client = netns_factory(), netns_factory()
    node_with_uplink(node, client)
    hooks = tmp_path / "hooks"
    bad = hook(hooks, "route4", "after.d", 'echo "boom from $INTERFACE"; exit 3\n')
    r = _run_bad(node, tmp_path, [spec("h2")], hooks_dir=hooks, json_events=True)
    assert r.returncode == 1, r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert str(bad) in err and "code 3" in err, err
    assert "10.99.0.20" not in node.run("ip", "route", "show", "table", "all")
    assert not [l for l in node.links() if l.startswith("qs")]
    # the event carries the hook's path, exit code and output
    events = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    failed = [e for e in events if e["type"] == "instance.failed"]
    assert failed and str(bad) in failed[0]["reason"] and "code 3" in failed[0]["reason"], events[-3:]
    assert "boom from qs" in failed[0]["reason"]


def test_hanging_hook_is_killed_at_its_timeout(netns_factory, tmp_path):
    node = netns_factory()
    hooks = tmp_path / "hooks"
    hung = hook(hooks, "tap-up", "before.d", "sleep 60 & sleep 60\n")
    r = _run_bad(node, tmp_path, [spec("h3")], hooks_dir=hooks, config_extra="hook_timeout = 1\n")
    assert r.returncode == 1, r.stderr
    assert "timed out after 1" in r.stderr and str(hung) in r.stderr, r.stderr
    # the hook's whole process group is gone
    out = subprocess.run(["pgrep", "-f", str(hung)], capture_output=True, text=True).stdout
    assert not out.strip()


def test_a_table_that_does_not_exist_is_refused(netns_factory, tmp_path):
    node = netns_factory()
    s = guest_spec("h4", [{"mode": "routed", "mac": MAC1, "ip": "10.99.0.21", "link": "nosuchtable"}])
    r = _run_bad(node, tmp_path, [s])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("qsup: error: nics[0].link:"), r.stderr
