"""Issue "Live migration", fault matrix: a process dies at the worst moment, the guest survives once.

Every case here kills something in the middle of a live migration and then
checks the one invariant the design exists for: **the guest runs on exactly
one node and its /32 route is on exactly that node** (or, when the only
copy of the guest is killed, on none), and neither node keeps a tap, route,
rule, record or QEMU process that belongs to nobody.

The cases the older ``test_migration.py`` does not cover:

* the destination QEMU dies at the switchover (the guest's STOP, or
  ``pre-switchover`` with ``--switchover pause``), i.e. *after* the source
  released the guest's L3.  The moment is hit exactly, not by sleeping: a
  netconf hook on the source's ``route4`` step (``after.d``, run first on
  undo) kills the destination QEMU when ``PHASE=migrate-out ACTION=down``;
* the source QEMU dies mid-stream;
* the destination daemon is SIGKILLed mid-migration and restarted (QEMU
  finishes the migration without it; the restarted daemon must activate);
* the source daemon is SIGKILLed mid-migration and restarted, both while
  the stream is ``active`` and while QEMU waits at ``pre-switchover`` (pause)
  with nobody to continue it (the restarted daemon must cancel and resume).

Slow migrations use ``--max-bandwidth`` so the windows are seconds wide
(TCG guest, 192 MiB, mostly zero pages: ~90 MB go over the wire, ~9 s at
10 MB/s).  The exact moments that matter (pre-switchover, post-copy) are
reached by construction -- a hook, the operator monitor -- not by sleeping.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from migtopo import RouteSampler, TwoNodes, assert_guest_whole
from test_migration import IP, has_route, routed_spec, wait_migrate_status, wait_state
from topo import QsupDaemon, pid_alive, qmp

SLOW = "2000000"  # bytes/s: the stream would take ~45 s (~90 MB of non-zero pages); we kill within 1 s
MEDIUM = "10000000"  # bytes/s: ~9 s, for the cases that let the migration complete


# --- topology and teardown -------------------------------------------------------------------

def start_daemons(t: TwoNodes, hooks: dict[str, Path] | None = None) -> tuple[QsupDaemon, QsupDaemon]:
    """``TwoNodes.start_daemons`` with an optional hooks_dir per node ("a"/"b")."""
    return t.start_daemons(hooks=hooks)


def _is_qemu_of(pid: int) -> bool:
    try:
        return b"guest=" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def qemu_pids(d: QsupDaemon) -> set[int]:
    """Every QEMU pid a daemon ever owned: its event log (started, reattached) and its records.

    ``QsupDaemon.qemu_pids`` only knows ``instance.started``; an *incoming* QEMU never emits
    that, so a failed test would leak it without the records and reattach events.
    """
    pids: set[int] = set()
    db = d.state_dir / "events.db"
    if db.exists():
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = con.execute("SELECT body FROM events WHERE type IN "
                               "('instance.started', 'instance.reattached')").fetchall()
        finally:
            con.close()
        pids |= {json.loads(b).get("pid") for (b,) in rows} - {None}
    for rec in (d.state_dir / "instances").glob("*/record.json"):
        try:
            pid = json.loads(rec.read_text()).get("pid")
        except (OSError, ValueError):
            continue
        if pid:
            pids.add(pid)
    return pids


@pytest.fixture
def topo(tmp_path):
    """TwoNodes without daemons; the test starts them (with hooks if it needs any).

    Teardown kills both daemons and every QEMU they owned -- incoming ones
    included -- by pid, then removes the namespaces, even when the test failed.
    """
    t = TwoNodes(tmp_path)
    seen: set[int] = set()
    try:
        yield t, seen
    finally:
        pids = set(seen)
        for d in t.daemons:
            pids |= qemu_pids(d)
        leaked = t.close()
        # a guest that ends the test running (on B, say) is killed here, not a leak;
        # leaks are asserted by the tests themselves
        alive = [p for p in pids if pid_alive(p) and _is_qemu_of(p)]
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while any(pid_alive(p) for p in alive) and time.monotonic() < deadline:
            time.sleep(0.05)
        leaked += [p for p in alive if pid_alive(p)]
        assert not leaked, f"qemu pids that would not die: {leaked}"


# --- what "nothing left" means ---------------------------------------------------------------

def leaks(ns) -> list[str]:
    """Anything of the guest's still on a node: taps, the /32 in any table, rules, proxy neighbours."""
    out = []
    taps = sorted(l for l in ns.links() if l.startswith("qs"))
    if taps:
        out.append(f"taps {taps}")
    if IP in ns.run("ip", "route", "show", "table", "all"):
        out.append("route")
    if "proto 152" in ns.run("ip", "rule", "show"):
        out.append("rule")
    if IP in ns.run("ip", "neigh", "show", "proxy"):
        out.append("proxy neighbour")
    return out


def records(d: QsupDaemon) -> list[str]:
    return sorted(p.parent.name for p in (d.state_dir / "instances").glob("*/record.json"))


def gone_or_final(d: QsupDaemon, name: str, timeout: float = 60) -> dict | None:
    """Wait until ``name`` on ``d`` is final, or unknown to ``d``; returns the view (None if unknown).

    "Unknown" is exactly the daemon's answer for it (exit 1, "no instance named"):
    any other failure -- the daemon unreachable (exit 3), a usage error -- raises.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = d.cli("show", name, "--json", check=False)
        if r.returncode == 1 and f"no instance named {name!r}" in r.stderr:
            return None
        if r.returncode != 0:
            raise RuntimeError(f"qsup show {name} on {d.workdir.name} failed ({r.returncode}): {r.stderr.strip()}")
        v = json.loads(r.stdout)
        if v["state"] in ("stopped", "crashed", "failed"):
            return v
        time.sleep(0.1)
    raise TimeoutError(f"{name} not final on {d.workdir.name}: {d.cli('show', name, '--json', check=False).stdout}")


def assert_only_on(t, here: QsupDaemon, here_ns, there: QsupDaemon, there_ns, name: str) -> None:
    """Exactly one node: the guest runs on ``here`` with its /32 there; ``there`` has nothing."""
    v = wait_state(here, name, {"running"}, timeout=60)
    assert pid_alive(v["pid"])
    other = gone_or_final(there, name)
    assert other is None or other["pid"] is None, other
    assert has_route(here_ns), "the guest's /32 is missing on the node that runs it"
    assert leaks(there_ns) == [], leaks(there_ns)
    assert records(there) == [], records(there)
    # the node that runs it has exactly its own tap, and one /32
    assert len([l for l in here_ns.links() if l.startswith("qs")]) == 1
    assert here_ns.run("ip", "route", "show", "table", "all").count(IP) == 1
    assert_guest_whole(t, here, name, IP, busy=True)


def migrate_detached(src: QsupDaemon, dst: QsupDaemon, name: str, *extra: str) -> None:
    src.cli("migrate", name, "--to", dst.node_name, "--json", "--detach", *extra)


def incoming_pid(dst: QsupDaemon, name: str, seen: set[int], states=("migrating",)) -> int:
    v = wait_state(dst, name, set(states), timeout=60)
    assert v["pid"], v
    seen.add(v["pid"])
    return v["pid"]


def events_of(d: QsupDaemon, name: str) -> list[str]:
    return [e["type"] for e in d.events() if e.get("instance") == name]


def wait_ram_moves(operator: str, timeout: float = 30) -> None:
    """Until the source QEMU has sent more RAM than when called (its own counters)."""
    first = qmp(operator, "query-migrate").get("ram", {}).get("transferred", 0)
    deadline = time.monotonic() + timeout
    while (info := qmp(operator, "query-migrate")).get("ram", {}).get("transferred", 0) <= first:
        assert time.monotonic() < deadline, f"no RAM moved in {timeout}s: {info}"
        time.sleep(0.05)


def started_guest(t, a: QsupDaemon, name: str, seen: set[int]) -> int:
    # busy, but slowly enough (2 MiB/s) that a migration at MEDIUM bandwidth converges
    a.start_instance(routed_spec(name, dirty=2))
    a.wait_console(name)
    pid = a.cli_json("show", name)["pid"]
    seen.add(pid)
    assert has_route(t.a)
    return pid


# --- the cases -------------------------------------------------------------------------------

KILL_HOOK = """#!/bin/sh
# Fault injection (test only): when the source releases the guest's L3 at pre-switchover,
# SIGKILL the qemu (destination or source) whose pid the test wrote to {pidfile}, once.
[ "$PHASE" = migrate-out ] && [ "$ACTION" = down ] || exit 0
f={pidfile}
i=0
while [ ! -s "$f" ] && [ "$i" -lt 80 ]; do sleep 0.1; i=$((i + 1)); done
[ -s "$f" ] || {{ echo "no pid file"; exit 0; }}
pid=$(cat "$f")
mv "$f" "$f.used"
kill -9 "$pid" && echo "killed qemu $pid"
# wait until it is gone (or a zombie its daemon has not reaped yet), so migrate-continue meets a dead peer
i=0
while [ "$i" -lt 50 ] && [ -e "/proc/$pid" ] && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null; do
    sleep 0.05; i=$((i + 1))
done
exit 0
"""


@pytest.mark.parametrize("switchover", ["stop", "pause"])
def test_kill_destination_qemu_at_the_switchover(topo, tmp_path, switchover):
    """The destination QEMU dies while the source releases its L3 (at STOP, or in the pause)."""
    t, seen = topo
    hooks = tmp_path / "hooks-a"
    pidfile = tmp_path / "dst-qemu.pid"
    hook = hooks / "route4" / "after.d" / "50-kill-destination"
    hook.parent.mkdir(parents=True)
    hook.write_text(KILL_HOOK.format(pidfile=pidfile))
    hook.chmod(0o755)
    a, b = start_daemons(t, {"a": hooks})
    name = "fps" + switchover[0]
    src_pid = started_guest(t, a, name, seen)

    migrate_detached(a, b, name, "--switchover", switchover)
    dst_pid = incoming_pid(b, name, seen)
    tmp = pidfile.with_suffix(".tmp")
    tmp.write_text(str(dst_pid))
    tmp.rename(pidfile)  # the hook waits for it (at most 8 s) if pre-switchover comes first

    assert_only_on(t, a, t.a, b, t.b, name)
    assert (tmp_path / "dst-qemu.pid.used").exists(), "the hook never ran: the switchover not reached?"
    assert not pid_alive(dst_pid)
    assert a.cli_json("show", name)["pid"] == src_pid
    ev = [e for e in a.events() if e.get("instance") == name]
    failed = [e for e in ev if e["type"] == "migration.failed"]
    assert failed and failed[-1]["l3_was_released"] is True, [e["type"] for e in ev]
    assert "migration.switchover" in [e["type"] for e in ev]
    assert "migration.activated" not in events_of(b, name)


def test_kill_source_qemu_mid_stream(topo):
    t, seen = topo
    a, b = start_daemons(t)
    name = "ksq"
    src_pid = started_guest(t, a, name, seen)
    migrate_detached(a, b, name, "--max-bandwidth", SLOW)
    dst_pid = incoming_pid(b, name, seen)
    wait_migrate_status(a, name, "active")
    os.kill(src_pid, signal.SIGKILL)

    # the only copy of the guest is gone: zero nodes hold it, nothing is left anywhere
    va = gone_or_final(a, name)
    assert va is not None and va["state"] == "crashed", va
    vb = gone_or_final(b, name)
    assert vb is None or vb["state"] == "failed", vb
    deadline = time.monotonic() + 10
    while pid_alive(dst_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(dst_pid), "the incoming qemu outlived the stream"
    for d, ns in ((a, t.a), (b, t.b)):
        assert leaks(ns) == [], (d.workdir.name, leaks(ns))
        assert records(d) == [], (d.workdir.name, records(d))
    assert "migration.activated" not in events_of(b, name)


@pytest.mark.parametrize("restart", ["after-completion", "before-completion"])
def test_kill_destination_daemon(topo, restart):
    """QEMU migrates without the destination daemon; the restarted daemon activates."""
    t, seen = topo
    a, b = start_daemons(t)
    name = "kdd" + restart[0]
    src_pid = started_guest(t, a, name, seen)
    migrate_detached(a, b, name, "--max-bandwidth", MEDIUM)
    dst_pid = incoming_pid(b, name, seen)
    wait_migrate_status(a, name, "active")
    b.kill()
    if restart == "after-completion":
        # QEMU completes on both sides; the destination daemon is down, so nobody applies L3
        # there, and the source keeps its (postmigrate) copy until the destination -- restarted,
        # waiting at `completed` -- takes its confirmation of the L3 release
        wait_migrate_status(a, name, "completed", timeout=90)
        assert not has_route(t.a)
        assert not has_route(t.b), "L3 applied on the destination while no daemon ran there"
        assert wait_state(a, name, {"migrating"})["pid"] == src_pid
        b.start()
        gone_or_final(a, name, timeout=90)
    else:
        b.start()
        assert wait_state(b, name, {"migrating", "running"})["pid"] == dst_pid
    assert_only_on(t, b, t.b, a, t.a, name)
    assert b.cli_json("show", name)["pid"] == dst_pid
    assert not pid_alive(src_pid)
    ev = [e for e in b.events() if e.get("instance") == name]
    types = [e["type"] for e in ev]
    assert "instance.reattached" in types and "migration.activated" in types, types
    rec = [e for e in ev if e["type"] == "migration.recovering"]
    # which path ran: completed-but-paused activated by the recovery, or the event awaited
    expect = {"after-completion": ("paused", "completed"), "before-completion": ("inmigrate", "active")}[restart]
    assert rec and (rec[0]["qemu_status"], rec[0]["migrate_status"]) == expect, rec


@pytest.mark.parametrize("when", ["active", "pre-switchover"])
def test_kill_source_daemon(topo, when):
    """The restarted source daemon cancels the orphaned migration and resumes the guest here.

    ``pre-switchover``: with ``--switchover pause`` QEMU waits there for ever with nobody to
    continue it.
    """
    t, seen = topo
    a, b = start_daemons(t)
    name = "ksd" + when[0]
    src_pid = started_guest(t, a, name, seen)
    operator = a.cli_json("show", name)["qmp_operator"]
    mode = "pause" if when == "pre-switchover" else "stop"
    migrate_detached(a, b, name, "--max-bandwidth", SLOW, "--switchover", mode)
    dst_pid = incoming_pid(b, name, seen)
    wait_migrate_status(a, name, "active")
    a.kill()
    if when == "pre-switchover":
        # nobody to continue: QEMU stops the guest and waits there for ever
        qmp(operator, "migrate-set-parameters", {"max-bandwidth": 1 << 30})
        deadline = time.monotonic() + 60
        while qmp(operator, "query-migrate").get("status") != "pre-switchover":
            assert time.monotonic() < deadline, qmp(operator, "query-migrate")
            time.sleep(0.1)
        assert qmp(operator, "query-status")["running"] is False
        time.sleep(0.5)  # an observation window, not a wait: nothing moves it on while no daemon runs
        assert qmp(operator, "query-migrate")["status"] == "pre-switchover"
    assert has_route(t.a) and not has_route(t.b)
    a.start()
    assert_only_on(t, a, t.a, b, t.b, name)
    assert a.cli_json("show", name)["pid"] == src_pid
    assert not pid_alive(dst_pid)
    ev = [e for e in a.events() if e.get("instance") == name]
    rec = [e for e in ev if e["type"] == "migration.recovering"]
    assert rec and rec[0]["migrate_status"] == when, rec
    assert {"status": "cancelled"} in [e["data"] for e in ev if e["type"] == "qmp.MIGRATION"]
    assert "migration.activated" not in events_of(b, name)


def test_kill_source_daemon_in_postcopy(topo):
    """Post-copy: once ``postcopy-active`` the guest runs on the destination and pulls its
    missing pages from the source.  A restarted source daemon must not cancel (that would
    resume a second copy of the guest with its L3 back); it lets QEMU finish, then quits."""
    t, seen = topo
    a, b = start_daemons(t)
    name = "ksdpc"
    src_pid = started_guest(t, a, name, seen)
    operator = a.cli_json("show", name)["qmp_operator"]
    # slow post-copy phase (~8 s): the window in which the destination runs but depends on the source
    qmp(operator, "migrate-set-parameters", {"max-postcopy-bandwidth": 10_000_000})
    migrate_detached(a, b, name, "--postcopy")
    dst_pid = incoming_pid(b, name, seen, ("migrating", "running"))  # post-copy activates within ~0.3 s
    assert wait_state(b, name, {"running"}, timeout=60)["pid"] == dst_pid  # activated at postcopy-active
    assert qmp(operator, "query-migrate")["status"] == "postcopy-active"
    a.kill()
    assert has_route(t.b) and not has_route(t.a)
    wait_ram_moves(operator)  # QEMU carries on serving pages with no daemon watching
    a.start()
    va = gone_or_final(a, name, timeout=90)
    assert va is None or va["state"] == "stopped", va
    assert not pid_alive(src_pid)
    assert_only_on(t, b, t.b, a, t.a, name)
    assert b.cli_json("show", name)["pid"] == dst_pid


# --- more moments: the source dies, its L3 release fails, post-copy ---------------------------

FAIL_HOOK = """#!/bin/sh
# Fault injection (test only): releasing the guest's route at pre-switchover fails.
[ "$PHASE" = migrate-out ] && [ "$ACTION" = down ] || exit 0
echo "injected failure releasing $IP"
exit 1
"""


def write_hook(hooks: Path, step: str, name: str, body: str) -> Path:
    """An executable ``after.d`` hook of ``step`` (after.d runs first on undo)."""
    hook = hooks / step / "after.d" / name
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text(body)
    hook.chmod(0o755)
    return hook


def prepared_pid(d: QsupDaemon, name: str) -> int:
    """The incoming QEMU's pid, from the destination's ``migration.prepared`` event."""
    pids = [e["pid"] for e in d.events() if e.get("instance") == name and e["type"] == "migration.prepared"]
    assert pids, events_of(d, name)
    return pids[-1]


def wait_dead(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid), f"pid {pid} outlived {timeout}s"


@pytest.mark.parametrize("switchover", ["stop", "pause"])
def test_kill_source_qemu_at_the_switchover(topo, tmp_path, switchover):
    """The source QEMU dies at the switchover, while the source releases its L3.

    ``pause``: the final state was never sent, the only copy of the guest is gone: the
    destination must never activate (no L3, no ``cont``); both nodes end with nothing.
    ``stop``: QEMU does not wait for the release, so the final state may have gone out before
    the kill: then the destination, told that the source's L3 is gone, runs the guest -- on B
    alone; otherwise both nodes end with nothing.  Never two copies, never a route on both.
    The moment is hit exactly: the source's own ``route4`` undo hook (migrate-out, down) kills it.
    """
    t, seen = topo
    hooks = tmp_path / "hooks-a"
    pidfile = tmp_path / "src-qemu.pid"
    write_hook(hooks, "route4", "50-kill-source", KILL_HOOK.format(pidfile=pidfile))
    a, b = start_daemons(t, {"a": hooks})
    name = "kps" + switchover[0]
    src_pid = started_guest(t, a, name, seen)
    pidfile.write_text(str(src_pid))
    migrate_detached(a, b, name, "--switchover", switchover)

    va = gone_or_final(a, name)
    assert va is not None and va["state"] == "crashed", va
    assert (tmp_path / "src-qemu.pid.used").exists(), "the hook never ran: the switchover not reached?"
    dst_pid = prepared_pid(b, name)
    seen.add(dst_pid)
    assert not pid_alive(src_pid)
    vb = wait_state(b, name, {"running", "failed", "stopped", "crashed"}, timeout=60)
    if switchover == "stop" and vb is not None and vb["state"] == "running":
        assert vb["pid"] == dst_pid
        assert_only_on(t, b, t.b, a, t.a, name)
        return
    assert vb is None or vb["state"] == "failed", vb
    wait_dead(dst_pid)
    for d, ns in ((a, t.a), (b, t.b)):
        assert leaks(ns) == [], (d.workdir.name, leaks(ns))
        assert records(d) == [], (d.workdir.name, records(d))
    assert "migration.activated" not in events_of(b, name)
    if switchover == "pause":
        # migrate-continue never succeeded, so the release was never confirmed
        assert "migration.release_confirmed" not in events_of(a, name)


@pytest.mark.parametrize("switchover", ["stop", "pause"])
def test_route4_down_hook_failing_at_the_switchover(topo, tmp_path, switchover):
    """The source's L3 release fails at the switchover: the migration fails, the guest stays.

    Under ``stop`` QEMU does not wait for the release: if it completes meanwhile, the
    destination still never activates (it waits for the confirmation that never comes); the
    source calls it off and resumes its own copy.

    It must keep running on the source, supervised, with its route intact (re-applied
    if part of it went), the destination torn down with no L3 ever applied there.
    """
    t, seen = topo
    hooks = tmp_path / "hooks-a"
    write_hook(hooks, "route4", "50-fail-release", FAIL_HOOK)
    a, b = start_daemons(t, {"a": hooks})
    name = "fhs" + switchover[0]
    src_pid = started_guest(t, a, name, seen)
    tail = a.tail(since=a.events()[-1]["seq"])
    try:
        migrate_detached(a, b, name, "--switchover", switchover)
        failed = tail.wait_for("migration.failed", name)
    finally:
        tail.close()
    assert "injected failure" in (failed.get("error") or ""), failed
    assert_only_on(t, a, t.a, b, t.b, name)
    assert a.cli_json("show", name)["pid"] == src_pid
    assert "migration.activated" not in events_of(b, name)
    assert not [e for e in tail.events if e["type"] == "instance.internal_error"], tail.events
    # still supervised: a stop ends it cleanly
    assert a.cli_json("stop", name, "--timeout", "5")["state"] == "stopped"
    assert not pid_alive(src_pid)
    assert leaks(t.a) == [] and records(a) == []


def start_postcopy(t, a: QsupDaemon, b: QsupDaemon, name: str, seen: set[int]) -> tuple[str, int]:
    """Start a post-copy migration whose post-copy phase lasts seconds; return once the guest
    runs on B (activated at ``postcopy-active``).  Returns (A's operator socket, B's QEMU pid)."""
    operator = a.cli_json("show", name)["qmp_operator"]
    qmp(operator, "migrate-set-parameters", {"max-postcopy-bandwidth": 10_000_000})
    migrate_detached(a, b, name, "--postcopy")
    dst_pid = incoming_pid(b, name, seen, ("migrating", "running"))
    assert wait_state(b, name, {"running"}, timeout=60)["pid"] == dst_pid
    assert qmp(operator, "query-migrate")["status"] == "postcopy-active"
    return operator, dst_pid


def test_postcopy_destination_killed(topo, tmp_path):
    """README: once the destination runs the guest, a failure never resumes the source's copy.

    The destination QEMU is killed in ``postcopy-active``.  The guest is lost -- the
    source's copy is stale, it is kept paused (``migration.postcopy_lost``) without L3 --
    and it never ran on two nodes: the source never resumed and its route, released at
    the switchover, never came back (sampled every millisecond).
    """
    t, seen = topo
    a, b = start_daemons(t)
    name = "pcd"
    src_pid = started_guest(t, a, name, seen)
    tail = a.tail(since=a.events()[-1]["seq"])
    sampler = RouteSampler(t.a, IP, tmp_path / "route-a.txt")
    try:
        operator, dst_pid = start_postcopy(t, a, b, name, seen)
        os.kill(dst_pid, signal.SIGKILL)
        tail.wait_for("migration.postcopy_lost", name)
        vb = gone_or_final(b, name)
        routes_a = sampler.stop()
    finally:
        sampler.kill()
        tail.close()
    assert vb is None or vb["state"] == "crashed", vb
    va = a.cli_json("show", name)
    assert va["state"] == "paused" and va["pid"] == src_pid and pid_alive(src_pid), va
    assert qmp(operator, "query-status")["running"] is False
    mine = [e["type"] for e in tail.of(name)]
    assert "qmp.RESUME" not in mine, mine
    assert "migration.failed" not in mine, mine
    assert [v for _, v in routes_a] == [1, 0], f"A's route after the switchover: {routes_a}"
    assert not has_route(t.a) and not has_route(t.b)
    assert leaks(t.b) == [] and records(b) == []
    # the operator's call: stop the stale copy; then A has nothing left either
    assert a.cli_json("stop", name, "--timeout", "1")["state"] == "stopped"
    wait_dead(src_pid)
    assert leaks(t.a) == [] and records(a) == []


def test_postcopy_link_cut_longer_than_the_stall_timeout(topo, tmp_path):
    """The migration link goes down in ``postcopy-active`` for 16 s (the stall timeout is 15 s).

    The destination runs the guest and needs pages only the source has.  While the link
    is down the source must neither resume (a second copy) nor cancel (post-copy is never
    stall-cancelled); its route stays released, B keeps its route.  Once the link is back
    the migration completes: the guest is on B alone and reachable.
    """
    t, seen = topo
    a, b = start_daemons(t)
    name = "pcl"
    src_pid = started_guest(t, a, name, seen)
    tail = a.tail(since=a.events()[-1]["seq"])
    try:
        operator, dst_pid = start_postcopy(t, a, b, name, seen)
        t.a.run("ip", "link", "set", "mig", "down")
        try:
            cut_until = time.monotonic() + 16
            while time.monotonic() < cut_until:  # an observation window: the invariant, every second
                assert qmp(operator, "query-status")["running"] is False
                assert qmp(operator, "query-migrate")["status"].startswith("postcopy-")
                assert not has_route(t.a) and has_route(t.b)
                time.sleep(1)
        finally:
            t.a.run("ip", "link", "set", "mig", "up")
        va = gone_or_final(a, name, timeout=120)
    finally:
        tail.close()
    assert va is None or va["state"] == "stopped", va
    mine = [e["type"] for e in tail.of(name)]
    assert "migration.completed" in mine and "qmp.RESUME" not in mine, mine
    assert "migration.stalled" not in mine and "migration.failed" not in mine, mine
    assert not pid_alive(src_pid)
    assert_only_on(t, b, t.b, a, t.a, name)
    assert b.cli_json("show", name)["pid"] == dst_pid


def test_postcopy_recovers_after_a_link_cut_that_breaks_the_stream(topo, tmp_path):
    """The migration link goes down in ``postcopy-active`` and both kernels give up on the
    stream (``ss -K`` on each node: where TCP's retransmission timeout would end), so both
    QEMUs go ``postcopy-paused``.  The guest runs on B and needs pages only A has: A must not
    resume it and keeps trying to resume the stream; once the link is back,
    ``migrate-recover`` on B and ``migrate resume`` on A complete the migration, and the guest
    runs on B alone, whole.
    """
    t, seen = topo
    a, b = start_daemons(t)
    name = "pcr"
    src_pid = started_guest(t, a, name, seen)
    tail = a.tail(since=a.events()[-1]["seq"])
    try:
        operator, dst_pid = start_postcopy(t, a, b, name, seen)
        t.a.run("ip", "link", "set", "mig", "down")
        try:
            t.a.run("ss", "-K", "dst", "10.200.0.2")
            t.b.run("ss", "-K", "dst", "10.200.0.1")
            deadline = time.monotonic() + 30
            # the stream broke (paused); qsup then tries to resume it at once (QEMU 10: the
            # recover-setup/recover states while it connects, back to paused when it can't)
            broken = ("postcopy-paused", "postcopy-recover-setup", "postcopy-recover")
            while qmp(operator, "query-migrate")["status"] not in broken:
                assert time.monotonic() < deadline, qmp(operator, "query-migrate")
                time.sleep(0.1)
            tail.wait_for("migration.postcopy_recovering", name)
            cut_until = time.monotonic() + 5
            while time.monotonic() < cut_until:  # an observation window: the invariant, twice a second
                assert qmp(operator, "query-status")["running"] is False
                assert not has_route(t.a) and has_route(t.b)
                time.sleep(0.5)
        finally:
            t.a.run("ip", "link", "set", "mig", "up")
        tail.wait_for("migration.postcopy_recovered", name, timeout=60)
        va = gone_or_final(a, name, timeout=120)
    finally:
        tail.close()
    assert va is None or va["state"] == "stopped", va
    mine = [e["type"] for e in tail.of(name)]
    assert "migration.completed" in mine and "qmp.RESUME" not in mine, mine
    assert "migration.postcopy_lost" not in mine, mine
    assert not pid_alive(src_pid)
    assert_only_on(t, b, t.b, a, t.a, name)
    assert b.cli_json("show", name)["pid"] == dst_pid
