"""Executor orchestration against a fake host (no root): journaling, rollback,
undo that keeps going, idempotent re-apply, crash recovery and hook ordering.

The netlink ops themselves are exercised for real in integration/netconf/.
Hooks here are the real ``netconf.Hooks`` running real scripts in tmp_path.
"""

import os
import stat

import pytest

import netconf._ops as ops
from netconf import Executor, Hooks, Journal, NetconfError, Nic, Step
from netconf._plan import Plan

NIC = Nic("vm1", "52:54:00:00:00:01", "routed", "qsnotthere0", ip="10.0.0.5")
HOST: dict = {}


class FakeOp(ops.Op):
    def observe(self, args):
        return {"old": HOST.get(args["key"])}

    def apply(self, args, prior, note):
        if args.get("fail"):
            raise OSError(5, f"cannot set {args['key']}")
        HOST[args["key"]] = args["value"]

    def undo(self, args, prior, result):
        if args.get("fail_undo"):
            raise OSError(5, f"cannot restore {args['key']}")
        if prior["old"] is None:
            HOST.pop(args["key"], None)
        else:
            HOST[args["key"]] = prior["old"]


@pytest.fixture(autouse=True)
def fake_host(monkeypatch):
    HOST.clear()
    monkeypatch.setitem(ops.OPS, "fake", FakeOp)
    yield HOST


def mkplan(*specs, phase="activate"):
    steps = [Step(name, phase, NIC.nic_id, "fake", dict(args)) for name, args in specs]
    return Plan(steps, NIC)


PLAN = mkplan(("sysctl-ipv4", {"key": "a", "value": 1}), ("route4", {"key": "b", "value": 2}),
              ("rule4", {"key": "c", "value": 3}))


def test_apply_then_undo_restores_prior_values(tmp_path):
    HOST["a"] = 0  # pre-existing value is restored, not deleted
    ex = Executor(Journal(tmp_path / "j"))
    timings = ex.apply(PLAN, reason="start")
    assert HOST == {"a": 1, "b": 2, "c": 3}
    assert [t["step"] for t in timings if t["kind"] == "step"] == ["sysctl-ipv4", "route4", "rule4"]
    assert all(t["ms"] >= 0 for t in timings)
    ex.undo(reason="stop", phases=["activate"])
    assert HOST == {"a": 0}
    assert ex.journal.live() == []


def test_reapply_is_idempotent(tmp_path):
    ex = Executor(Journal(tmp_path / "j"))
    ex.apply(PLAN, reason="start")
    n = len(ex.journal.entries)
    HOST["b"] = "changed-by-someone"
    timings = ex.apply(PLAN, reason="start")
    assert all(t.get("skipped") for t in timings)
    assert len(ex.journal.entries) == n
    assert HOST["b"] == "changed-by-someone"


def test_failure_mid_apply_rolls_back_this_call_only(tmp_path):
    ex = Executor(Journal(tmp_path / "j"))
    ex.apply(mkplan(("tap-up", {"key": "t", "value": "up"}), phase="attach"), reason="start")
    bad = mkplan(("sysctl-ipv4", {"key": "a", "value": 1}), ("route4", {"key": "b", "value": 2, "fail": True}),
                 ("rule4", {"key": "c", "value": 3}))
    with pytest.raises(NetconfError) as ei:
        ex.apply(bad, reason="start")
    assert "route4" in str(ei.value)
    assert ei.value.failures[0]["step"] == "route4"
    assert HOST == {"t": "up"}  # the earlier attach is untouched
    statuses = {e["step"]: e["status"] for e in ex.journal.entries.values()}
    assert statuses == {"tap-up": "done", "sysctl-ipv4": "undone", "route4": "undone", "rule4": "void"}


def test_undo_keeps_going_and_reports_every_failure(tmp_path):
    ex = Executor(Journal(tmp_path / "j"))
    p = mkplan(("sysctl-ipv4", {"key": "a", "value": 1, "fail_undo": True}), ("route4", {"key": "b", "value": 2}),
               ("rule4", {"key": "c", "value": 3, "fail_undo": True}))
    ex.apply(p, reason="start")
    with pytest.raises(NetconfError) as ei:
        ex.undo(reason="stop")
    assert [f["step"] for f in ei.value.failures] == ["rule4", "sysctl-ipv4"]
    assert "b" not in HOST  # the one in the middle was still undone
    assert [e["step"] for e in ex.journal.live()] == ["sysctl-ipv4", "rule4"]  # kept for a retry


def test_recover_resolves_pending_entries_from_a_dead_process(tmp_path):
    path = tmp_path / "j"
    HOST["keep"] = "foreign"
    j = Journal(path)
    ex = Executor(j)
    ex.apply(mkplan(("tap-up", {"key": "t", "value": "up"}), phase="attach"), reason="start")
    # what a SIGKILL between "record" and "done" leaves: two pending records, one applied
    e1, e2 = j.add([{"kind": "step", "step": "route4", "phase": "activate", "nic_id": NIC.nic_id, "op": "fake",
                     "args": {"key": "b", "value": 2}, "prior": {"old": None}},
                    {"kind": "step", "step": "rule4", "phase": "activate", "nic_id": NIC.nic_id, "op": "fake",
                     "args": {"key": "c", "value": 3}, "prior": {"old": None}}])
    HOST["b"] = 2
    os.close(j._fd)  # the process dies: no close(), no further writes
    ex2 = Executor(Journal(path))
    assert {e["step"] for e in ex2.journal.pending()} == {"route4", "rule4"}
    ex2.recover(reason="crash")
    assert HOST == {"keep": "foreign"}
    assert path.read_text() == ""  # compacted: nothing owned any more


def write_hook(path, log, exit_code=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\necho "{path.parent.name}/{path.name} $STEP $ACTION $PHASE $INTERFACE" >> {log}\n'
                    f"exit {exit_code}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_hooks_run_around_and_instead_of_steps_and_reverse_on_undo(tmp_path):
    log = tmp_path / "log"
    hd = tmp_path / "hooks"
    write_hook(hd / "route4" / "before.d" / "10-a", log)
    write_hook(hd / "route4" / "replace", log)
    write_hook(hd / "route4" / "after.d" / "20-b", log)
    write_hook(hd / "rule4" / "after.d" / "30-c", log)
    ex = Executor(Journal(tmp_path / "j"), hooks=Hooks(hd))
    ex.apply(PLAN, reason="start")
    assert HOST == {"a": 1, "c": 3}  # route4 was replaced by the hook
    ex.apply(PLAN, reason="start")  # idempotent: hooked steps are not re-run either
    ex.undo(reason="stop")
    assert HOST == {}
    assert log.read_text().splitlines() == [
        "before.d/10-a route4 up start qsnotthere0",
        "route4/replace route4 up start qsnotthere0",
        "after.d/20-b route4 up start qsnotthere0",
        "after.d/30-c rule4 up start qsnotthere0",
        "after.d/30-c rule4 down stop qsnotthere0",
        "after.d/20-b route4 down stop qsnotthere0",
        "route4/replace route4 down stop qsnotthere0",
        "before.d/10-a route4 down stop qsnotthere0",
    ]


def test_failing_hook_rolls_back_with_phase_rollback(tmp_path):
    log = tmp_path / "log"
    hd = tmp_path / "hooks"
    write_hook(hd / "route4" / "before.d" / "10-a", log)
    write_hook(hd / "rule4" / "before.d" / "10-bad", log, exit_code=3)
    ex = Executor(Journal(tmp_path / "j"), hooks=Hooks(hd))
    with pytest.raises(NetconfError) as ei:
        ex.apply(PLAN, reason="migrate-in")
    f = ei.value.failures[0]
    assert f["step"] == "rule4" and f["exit_code"] == 3 and f["path"].endswith("10-bad")
    assert HOST == {}
    assert log.read_text().splitlines() == [
        "before.d/10-a route4 up migrate-in qsnotthere0",
        "before.d/10-bad rule4 up migrate-in qsnotthere0",
        "before.d/10-a route4 down rollback qsnotthere0",
    ]
    assert ex.journal.live() == []
