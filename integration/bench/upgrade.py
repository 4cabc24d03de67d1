"""Upgrade benchmark (issue 19): QEMU upgrades in place against cross-node live migration, in one run.

Topology: migtopo.TwoNodes (client + node A + node B, each node with its own ``qsup serve``),
built in a temp dir and torn down at the end.  Both daemons run the same QEMU binary: a copy of
the test QEMU (topo.QEMU, 10.0.2) in a root-owned 0755 directory under /usr/local/lib, which
the benchmark "updates" the way a package does (a new copy renamed over it), making every
guest that runs it outdated (integration/test_upgrade.py's ``replaceable_qemu``).

Part 1, one busy guest (the test guest, 192 MiB, memcheck rewriting 24 MiB at 100 MiB/s,
migtopo.BUSY), routed, booted on node A:

* cross-node live migrations (``qsup migrate NAME --to NODE --json``), BENCH_CROSS_PAIRS
  round trips A->B->A before the upgrades and as many after (default 2 + 2: 8 migrations), so
  both kinds of handover see the same drift of a shared machine's load;
* BENCH_N (default 20) consecutive ``qsup upgrade NAME --json`` on node A, each one into the
  configured binary.

Around every handover (either kind) the client pings the guest every 10 ms (migtopo.Pinger,
``ping -D``): ``gap_ms`` is the longest interval between two echo replies from 20 replies
before the command to 20 replies after it, from ping's own timestamps; ``lost`` is ping's
count.  For an upgrade the gap is also placed against the daemon's events (same host clock):
``gap_start_after_spawn_ms`` = last reply before the gap - ``instance.upgrade_spawned`` (the
new QEMU started), ``gap_end_after_upgraded_ms`` = first reply after it - ``instance.upgraded``
(new QEMU cont-ed, paths renamed).

Around every upgrade ``ip -o monitor address route rule neigh link`` runs in node A's namespace
(integration/netwatch.py, as integration/test_upgrade.py) and ``netlink_changes`` counts what that
test's ``_changes`` keeps: everything but link messages naming the guest's tap (QEMU's own offload
setup), ``FEATURE CHANGE`` and the kernel's reachability tracking of dynamic neighbours.
After every upgrade: the old pid is gone, the new one differs, the tap's ifindex is the same,
the console still shows GUEST-READY exactly once (no reboot), memcheck's generation went on
counting from where it was (it restarts at 1 on a reboot) and ``check_guest`` passes (the guest
answers, no console problem, memcheck verified a new sweep).  Each cross-node migration's
guest gets the same ``check_guest`` on its destination.

``ping_over_budget``: upgrades that lost more than ``ceil(downtime_ms / 10) + 3`` pings
(downtime_ms: QEMU's own figure from the upgrade's answer; the + 3 pays for the ``cont`` after
QEMU's ``completed`` -- qsup polls query-migrate every 20 ms -- and one request in flight).
The cross-node migrations are counted against the migration benchmark's budget,
``ceil((max(downtime, switchover) + 20) / 10)`` (migtopo.loss_budget), as
``ping_over_budget_cross_node``.

Part 2, a fleet: the busy guest is stopped, then up to BENCH_GUESTS (default 50) small guests
(the test guest, BENCH_GUEST_MB = 96 MiB, idle, routed; at 64 MiB
its kernel prints nothing and never boots) are started on node A, four at a time,
each waited for (GUEST-READY); a guest that does not boot within 120 s is stopped and not used,
and no more are started after BENCH_BOOT_BUDGET_S (default 420 s).  ``guests`` says how many
took part.  Then for ``--parallel`` 1, 2 and 4 in turn: the binary is replaced on disk (every
guest now ``qemu.outdated``), and ``qsup upgrade --all --parallel P --json`` is timed
(``wall_s``), netlink watched in node A's namespace the whole time (changes counted as the
test does for ``--all``: ``_changes`` minus lines naming any guest tap).  After each round every
guest must show a new pid, not outdated, the old pid gone and GUEST-READY once; after the
last, every guest must answer a ping.

``leaks`` (goal 0), once everything ran: QEMU processes under either daemon's state/run dir
that the daemon does not list (an old QEMU left behind), ``*.next`` paths in either run dir,
then -- every instance stopped with ``qsup stop --force`` -- any QEMU still alive under the
state dirs and any tun/tap device left in either node namespace, plus whatever the teardown's
own leak check (QsupDaemon.close) reports.

Percentiles are nearest-rank: over 20 samples p99 is the maximum.  Human lines first; the last
line is one JSON object with ``"bench": "upgrade"``.  Run as root:
``.venv/bin/python integration/bench/upgrade.py``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "integration"))

from guestcheck import check_guest, memcheck_progress, netns_ping, qsup_console_reader  # noqa: E402
from migtopo import BUSY, Pinger, TwoNodes, close_nodes, loss_budget, percentile  # noqa: E402
from netwatch import NetlinkWatch  # noqa: E402
from netwatch import changes as _changes  # noqa: E402
from topo import QEMU, guest_spec, pid_alive, qemus_under  # noqa: E402

N = int(os.environ.get("BENCH_N", "20"))
CROSS_PAIRS = int(os.environ.get("BENCH_CROSS_PAIRS", "2"))
GUESTS = int(os.environ.get("BENCH_GUESTS", "50"))
GUEST_MB = int(os.environ.get("BENCH_GUEST_MB", "96"))
BOOT_BUDGET_S = float(os.environ.get("BENCH_BOOT_BUDGET_S", "420"))
PARALLEL = (1, 2, 4)
NAME, IP, MAC = "ub1", "10.99.0.2", "52:54:00:99:00:42"

_STAMPED_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from \S+: icmp_seq=\d+ ", re.M)


class ReplaceableQemu:
    """A copy of the test QEMU in a root-owned 0755 dir; ``update()`` renames a new copy over it."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="qsup-qemu-bench-", dir="/usr/local/lib"))
        os.chmod(self.dir, 0o755)
        self.exe = self.dir / "qemu-system-x86_64"
        shutil.copy2(QEMU, self.exe)

    def update(self) -> None:
        tmp = self.dir / ".qemu-new"
        shutil.copy2(QEMU, tmp)
        os.replace(tmp, self.exe)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def reply_gap(lines: list[str]) -> tuple[float, float] | None:
    """The longest interval between two consecutive echo replies, by ping -D's timestamps (epoch
    seconds): (last reply before it, first reply after it)."""
    ts = [float(m.group(1)) for m in _STAMPED_REPLY.finditer("".join(lines))]
    if len(ts) < 2:
        return None
    return max(zip(ts, ts[1:]), key=lambda ab: ab[1] - ab[0])


def under_ping(client, fn):
    """Run ``fn()`` between 20 echo replies before and 20 after; (fn's result, gap_ms, ping counts,
    the gap's (start, end) in epoch seconds)."""
    pinger = Pinger(client, IP)
    try:
        pinger.wait_replies(20)
        out = fn()
        pinger.wait_replies(20, timeout=60)
    finally:
        counts = pinger.stop()
    gap = reply_gap(pinger._lines)
    return out, (round((gap[1] - gap[0]) * 1000, 1) if gap else None), counts, gap


def ifindex(ns, tap: str) -> int:
    return int(ns.run("cat", f"/sys/class/net/{tap}/ifindex").strip())


def signed(v: float | None) -> str:
    return "?" if v is None else f"{v:+}"


def p(values: list, q: float) -> float | None:
    v = percentile([x for x in values if x is not None], q)
    return None if v is None else round(v, 1)


# --- part 1: one busy guest, upgrades vs cross-node migrations ---------------------------------

class Busy:
    def __init__(self, t: TwoNodes, a, b):
        self.t, self.a, self.b = t, a, b
        spec = guest_spec(NAME, [{"mode": "routed", "mac": MAC, "ip": IP}], append=f"guest.ip0={IP}/32 {BUSY}")
        v = a.start_instance(spec)
        a.wait_console(NAME)
        self.tap = v["nics"][0]["tap"]
        self.machine = v["machine"]
        self.pid = v["pid"]
        check_guest(lambda: a.console(NAME), netns_ping(t.client.name, IP), busy=True, timeout=60)
        self.upgrades: list[dict] = []
        self.cross: list[dict] = []
        self.problems: list[str] = []

    def cross_node(self, src, dst) -> None:
        i = len(self.cross)

        def migrate():
            r = src.cli("migrate", NAME, "--to", dst.node_name, "--json", timeout=300, check=False)
            lines = r.stdout.strip().splitlines()
            return json.loads(lines[-1]) if lines else {"result": "failed", "error": r.stderr.strip()}

        s, gap, counts, _ = under_ping(self.t.client, migrate)
        if s.get("result") != "completed":
            raise RuntimeError(f"cross-node migration {i} did not complete: {s}")
        check_guest(qsup_console_reader(dst.state_dir, NAME), netns_ping(self.t.client.name, IP), busy=True,
                    timeout=60)
        down = max(s.get("downtime_ms") or 0, s.get("switchover_ms") or 0)
        row = {"gap_ms": gap, "lost": counts["lost"], "budget": loss_budget(down),
               "downtime_ms": s.get("downtime_ms"), "switchover_ms": s.get("switchover_ms"),
               "total_ms": s.get("total_ms")}
        self.cross.append(row)
        print(f"cross-node #{i:<2} {src.node_name}->{dst.node_name}: gap {gap} ms, lost {counts['lost']} "
              f"(budget {row['budget']}), downtime {row['downtime_ms']} ms, switchover {row['switchover_ms']} ms, "
              f"total {row['total_ms']} ms", flush=True)

    def upgrade(self) -> None:
        i, a, ns = len(self.upgrades), self.a, self.t.a
        index = ifindex(ns, self.tap)
        gen0 = memcheck_progress(a.console(NAME))
        self.pid = a.cli_json("show", NAME)["pid"]  # a cross-node round trip brought a new one
        seq0 = a.last_seq()
        watch = NetlinkWatch(ns)
        try:
            r, gap, counts, span = under_ping(self.t.client, lambda: a.cli_json("upgrade", NAME, timeout=300))
        finally:
            lines = watch.stop()
        u = r["upgrade"]
        # where the ping gap sits in the upgrade: its start after the new QEMU was spawned, its end
        # after the daemon said "upgraded" (the new QEMU cont-ed, the paths renamed), in ms
        evs = {e["type"]: e["ts"] for e in a.events(since=seq0) if e.get("instance") == NAME}
        spawned, upgraded = evs.get("instance.upgrade_spawned"), evs.get("instance.upgraded")
        gap_start = round((span[0] - spawned) * 1000) if span and spawned else None
        gap_end = round((span[1] - upgraded) * 1000) if span and upgraded else None
        changes = _changes(lines, self.tap)
        bad = []
        if u["old_pid"] != self.pid or u["pid"] == self.pid or pid_alive(u["old_pid"]):
            bad.append(f"pids: {u['old_pid']} -> {u['pid']} (had {self.pid}, old alive {pid_alive(u['old_pid'])})")
        if u["mode"] != "live":
            bad.append(f"mode {u['mode']}")
        if r["view"]["pid"] != u["pid"] or r["view"]["state"] != "running" or r["view"]["machine"] != self.machine:
            bad.append(f"view: pid {r['view']['pid']} state {r['view']['state']} machine {r['view']['machine']}")
        if ifindex(ns, self.tap) != index:
            bad.append("tap ifindex changed")
        try:
            check_guest(lambda: a.console(NAME), netns_ping(self.t.client.name, IP), busy=True, timeout=60)
        except AssertionError as e:
            bad.append(str(e).splitlines()[0])
        text = a.console(NAME)
        ready, gen1 = text.count("GUEST-READY"), memcheck_progress(text)
        if ready != 1:
            bad.append(f"GUEST-READY {ready} times on the console: the guest rebooted")
        if gen0 is None or gen1 is None or gen1 <= gen0:
            bad.append(f"memcheck generation {gen0} -> {gen1}: did not keep counting")
        self.pid = u["pid"]
        budget = math.ceil((u["downtime_ms"] or 0) / 10) + 3
        row = {"gap_ms": gap, "lost": counts["lost"], "budget": budget, "downtime_ms": u["downtime_ms"],
               "migration_ms": u["migration_ms"], "total_ms": u["total_ms"], "netlink": changes, "bad": bad,
               "gap_start_after_spawn_ms": gap_start, "gap_end_after_upgraded_ms": gap_end,
               "spawn_to_upgraded_ms": round((upgraded - spawned) * 1000) if spawned and upgraded else None}
        self.upgrades.append(row)
        self.problems += [f"upgrade #{i}: {b}" for b in bad]
        print(f"upgrade #{i:<2} pid {u['old_pid']} -> {u['pid']}: gap {gap} ms, lost {counts['lost']} "
              f"(budget {budget}), downtime {u['downtime_ms']} ms, migration {u['migration_ms']:.0f} ms, "
              f"total {u['total_ms']:.0f} ms, netlink {len(changes)}, memcheck gen {gen0}->{gen1} | gap from "
              f"spawned{signed(gap_start)} ms to upgraded{signed(gap_end)} ms "
              f"(spawned->upgraded {row['spawn_to_upgraded_ms']} ms)"
              + (f" | PROBLEMS: {bad}" if bad else "") + (f" | netlink: {changes}" if changes else ""), flush=True)


# --- part 2: a fleet, upgrade --all at --parallel 1/2/4 -----------------------------------------

def fleet_ip(i: int) -> str:
    return f"10.99.0.{100 + i}"


def start_fleet(a, want: int) -> tuple[list[str], list[str], float]:
    """Start up to ``want`` small guests on ``a`` four at a time; (booted, failed, seconds)."""
    t0 = time.monotonic()
    booted: list[str] = []
    failed: list[str] = []

    def one(i: int) -> tuple[str, bool]:
        n = f"f{i:02d}"
        spec = guest_spec(n, [{"mode": "routed", "mac": f"52:54:00:99:10:{i:02x}", "ip": fleet_ip(i)}],
                          append=f"guest.ip0={fleet_ip(i)}/32", memory=GUEST_MB)
        try:
            a.start_instance(spec)
            a.wait_console(n, timeout=120)
            return n, True
        except (RuntimeError, TimeoutError) as e:
            print(f"  {n} did not boot: {str(e).splitlines()[0][:200]}", flush=True)
            a.cli("stop", n, "--force", "--json", check=False)
            return n, False

    with ThreadPoolExecutor(4) as pool:
        i = 0
        while i < want and time.monotonic() - t0 < BOOT_BUDGET_S:
            batch = range(i, min(i + 4, want))
            for n, ok in pool.map(one, batch):
                (booted if ok else failed).append(n)
            i += len(batch)
            print(f"  fleet: {len(booted)} booted, {len(failed)} failed, {time.monotonic() - t0:.0f} s", flush=True)
    return booted, failed, round(time.monotonic() - t0, 1)


def all_round(t: TwoNodes, a, qemu: ReplaceableQemu, names: list[str], parallel: int) -> dict:
    before = {v["name"]: v for v in a.cli_json("ls") if v["name"] in names}
    qemu.update()
    views = {v["name"]: v for v in a.cli_json("ls") if v["name"] in names}
    outdated = sum(bool((v.get("qemu") or {}).get("outdated")) for v in views.values())
    watch = NetlinkWatch(t.a)
    t0 = time.monotonic()
    try:
        r = a.cli("upgrade", "--all", "--parallel", str(parallel), "--json", timeout=3600, check=False)
    finally:
        wall = time.monotonic() - t0
        lines = watch.stop()
    out = json.loads(r.stdout) if r.stdout.strip() else {"upgraded": [], "failed": names, "results": {}}
    taps = {nic["tap"] for v in views.values() for nic in v["nics"]}
    changes = [ln for ln in _changes(lines, "") if not any(tp in ln for tp in taps)]
    after = {v["name"]: v for v in a.cli_json("ls") if v["name"] in names}
    bad = []
    for n in names:
        v0, v1 = before[n], after.get(n)
        if v1 is None or v1["pid"] == v0["pid"] or pid_alive(v0["pid"]) or (v1.get("qemu") or {}).get("outdated") \
                or v1["state"] != "running":
            bad.append(f"{n}: {v0['pid']} -> {v1 and v1['pid']} state {v1 and v1['state']}")
        elif a.console(n).count("GUEST-READY") != 1:
            bad.append(f"{n}: rebooted")
    downs = [x.get("downtime_ms") for x in out["results"].values() if x.get("ok")]
    totals = [x.get("total_ms") for x in out["results"].values() if x.get("ok")]
    errors = {n: x.get("error") for n, x in out["results"].items() if not x.get("ok")}
    row = {"parallel": parallel, "wall_s": round(wall, 1), "outdated_before": outdated,
           "upgraded": len(out["upgraded"]), "failed": len(out["failed"]), "netlink": changes, "bad": bad,
           "errors": errors, "downtime_p50_ms": p(downs, 50), "total_p50_ms": p(totals, 50),
           "total_max_ms": p(totals, 100)}
    print(f"upgrade --all --parallel {parallel}: {row['upgraded']}/{len(names)} upgraded "
          f"({outdated} outdated before), {row['failed']} failed, wall {row['wall_s']} s "
          f"({wall / max(1, len(names)):.2f} s/guest), per-guest total p50 {row['total_p50_ms']} / max "
          f"{row['total_max_ms']} ms, downtime p50 {row['downtime_p50_ms']} ms, netlink {len(changes)}"
          + (f" | PROBLEMS: {bad[:5]}" if bad else "") + (f" | errors: {list(errors.items())[:3]}" if errors else "")
          + (f" | netlink: {changes[:5]}" if changes else ""), flush=True)
    return row


# --- leaks ----------------------------------------------------------------------------------------

def taps_in(ns) -> list[str]:
    return [l["ifname"] for l in ns.json("link", "show", "type", "tun")]


def count_leaks(t: TwoNodes, daemons) -> dict:
    """Before any stop: unlisted QEMUs and *.next paths; then every instance stopped: any QEMU
    or tap left."""
    unlisted, nexts = [], []
    for d in daemons:
        listed = {v["pid"] for v in d.cli_json("ls") if v.get("pid")}
        unlisted += sorted(qemus_under(d.state_dir, d.run_dir) - listed)
        nexts += [str(x) for x in d.run_dir.rglob("*.next")] if d.run_dir.exists() else []
    for d in daemons:
        names = [v["name"] for v in d.cli_json("ls") if v["state"] in ("running", "paused")]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: d.cli("stop", n, "--force", "--timeout", "10", "--json", check=False), names))
    time.sleep(1)
    qemus = sorted(set().union(*(qemus_under(d.state_dir, d.run_dir) for d in daemons)))
    taps = taps_in(t.a) + taps_in(t.b)
    return {"unlisted_qemus": unlisted, "next_paths": nexts, "qemus_after_stop": qemus, "taps_after_stop": taps}


# --- report ---------------------------------------------------------------------------------------

def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="qsup-upbench-"))
    qemu = ReplaceableQemu()
    t: TwoNodes | None = None
    res: dict = {"bench": "upgrade"}
    teardown_leaks: list[int] = []
    try:
        t = TwoNodes(work)
        a, b = t.start_daemons(extra_config=f'qemu = "{qemu.exe}"\n')
        busy = Busy(t, a, b)
        print(f"busy guest {NAME} on node A: machine {busy.machine}, {BUSY}", flush=True)
        for _ in range(CROSS_PAIRS):
            busy.cross_node(a, b)
            busy.cross_node(b, a)
        for _ in range(N):
            busy.upgrade()
        for _ in range(CROSS_PAIRS):
            busy.cross_node(a, b)
            busy.cross_node(b, a)
        ups, cross = busy.upgrades, busy.cross
        assert a.console(NAME).count("GUEST-READY") == 1
        a.cli("stop", NAME, "--force", "--json")

        names, boot_failed, boot_s = start_fleet(a, GUESTS)
        print(f"fleet: {len(names)} guests of {GUEST_MB} MiB booted in {boot_s} s ({len(boot_failed)} did not)",
              flush=True)
        rounds = [all_round(t, a, qemu, names, par) for par in PARALLEL]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: t.client.ping(fleet_ip(int(i[1:])), count=1, timeout=10), names))
        silent = [n for n, ok in zip(names, answers) if not ok]
        print(f"fleet after the rounds: {len(names) - len(silent)}/{len(names)} answer a ping"
              + (f" (silent: {silent})" if silent else ""), flush=True)

        leaks = count_leaks(t, (a, b))
        daemons = list(t.daemons)
        teardown_leaks = close_nodes(t)
        t = None
        leaks["teardown"] = teardown_leaks
        n_leaks = sum(len(v) for v in leaks.values())
        print(f"leaks: {n_leaks} ({ {k: v for k, v in leaks.items() if v} or 'none' })", flush=True)
        del daemons

        gaps, xgaps = [r["gap_ms"] for r in ups], [r["gap_ms"] for r in cross]
        netlink = sum(len(r["netlink"]) for r in ups) + sum(len(r["netlink"]) for r in rounds)
        res |= {
            "n": len(ups), "cross_node_n": len(cross),
            "gap_ms_p50": p(gaps, 50), "gap_ms_p99": p(gaps, 99),
            "gap_ms_cross_node_p50": p(xgaps, 50), "gap_ms_cross_node_p99": p(xgaps, 99),
            "downtime_ms_p50": p([r["downtime_ms"] for r in ups], 50),
            "downtime_ms_max": p([r["downtime_ms"] for r in ups], 100),
            "downtime_ms_cross_node_p50": p([r["downtime_ms"] for r in cross], 50),
            "upgrade_total_ms_p50": p([r["total_ms"] for r in ups], 50),
            "upgrade_migration_ms_p50": p([r["migration_ms"] for r in ups], 50),
            "gap_start_after_spawn_ms_p50": p([r["gap_start_after_spawn_ms"] for r in ups], 50),
            "gap_end_after_upgraded_ms_p50": p([r["gap_end_after_upgraded_ms"] for r in ups], 50),
            "spawn_to_upgraded_ms_p50": p([r["spawn_to_upgraded_ms"] for r in ups], 50),
            "cross_node_total_ms_p50": p([r["total_ms"] for r in cross], 50),
            "ping_lost_p50": p([r["lost"] for r in ups], 50), "ping_lost_max": p([r["lost"] for r in ups], 100),
            "ping_lost_cross_node_p50": p([r["lost"] for r in cross], 50),
            "ping_budget": "ceil(downtime_ms/10)+3",
            "ping_over_budget": sum(r["lost"] > r["budget"] for r in ups),
            "ping_over_budget_cross_node": sum(r["lost"] > r["budget"] for r in cross),
            "netlink_changes": netlink,
            "netlink_changes_single": sum(len(r["netlink"]) for r in ups),
            "netlink_changes_all": sum(len(r["netlink"]) for r in rounds),
            "uptime_kept": not busy.problems, "guest_problems": busy.problems,
            "guests": len(names), "guest_mb": GUEST_MB, "boot_failed": len(boot_failed), "boot_s": boot_s,
            "wall_s": {str(r["parallel"]): r["wall_s"] for r in rounds},
            "all_failed": {str(r["parallel"]): r["failed"] for r in rounds},
            "all_problems": sum(len(r["bad"]) for r in rounds),
            "all_total_ms_p50": {str(r["parallel"]): r["total_p50_ms"] for r in rounds},
            "fleet_silent": len(silent),
            "leaks": n_leaks,
        }
        res["goal_gap_met"] = bool(res["gap_ms_p50"] is not None and res["gap_ms_cross_node_p50"] is not None
                                   and res["gap_ms_p50"] <= res["gap_ms_cross_node_p50"]
                                   and res["gap_ms_p99"] <= res["gap_ms_cross_node_p99"])
        res["goals_met"] = bool(res["goal_gap_met"] and netlink == 0 and res["ping_over_budget"] == 0
                                and n_leaks == 0 and res["uptime_kept"])
        print(f"gap (100/s ping, longest interval between replies): upgrade p50 {res['gap_ms_p50']} / p99 "
              f"{res['gap_ms_p99']} ms over {len(ups)} vs cross-node p50 {res['gap_ms_cross_node_p50']} / p99 "
              f"{res['gap_ms_cross_node_p99']} ms over {len(cross)}: goal (upgrade <= cross-node) "
              f"{'met' if res['goal_gap_met'] else 'NOT met'}")
        print(f"QEMU downtime p50: upgrade {res['downtime_ms_p50']} ms (max {res['downtime_ms_max']}), cross-node "
              f"{res['downtime_ms_cross_node_p50']} ms; total p50: upgrade {res['upgrade_total_ms_p50']} ms, "
              f"cross-node {res['cross_node_total_ms_p50']} ms")
        print(f"pings lost per upgrade p50 {res['ping_lost_p50']} / max {res['ping_lost_max']}; over budget "
              f"(ceil(downtime/10)+3) {res['ping_over_budget']}/{len(ups)}; cross-node over its budget "
              f"{res['ping_over_budget_cross_node']}/{len(cross)}")
        print(f"netlink changes: {netlink} ({res['netlink_changes_single']} over {len(ups)} upgrades, "
              f"{res['netlink_changes_all']} over the --all rounds); {len(ups)} consecutive upgrades: uptime "
              f"{'kept' if res['uptime_kept'] else 'NOT kept'}")
        print(f"upgrade --all over {len(names)} guests of {GUEST_MB} MiB: wall " +
              ", ".join(f"--parallel {k}: {v} s" for k, v in res["wall_s"].items()) + f"; leaks {n_leaks}")
        print(json.dumps(res))
        return 0 if res["goals_met"] else 1
    finally:
        if t is not None:
            close_nodes(t)
        qemu.close()
        subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    sys.exit(main())
