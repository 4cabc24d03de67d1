"""`make demo`: a live migration of a routed guest between two nodes, under ping.

The topology is migtopo.TwoNodes: a client namespace and two node namespaces
(A and B), each node with its own `qsup serve`.  A guest with one routed NIC
boots on A; the client pings it every 10 ms through whichever node answers
proxy ARP for it, and a sampler on each node reads the routing table every
millisecond.  `qsup events --follow` tails both daemons.  Then the real CLI
runs `qsup migrate NAME --to node-b` (B is a declared peer of A) with this terminal as its stdout,
so its progress bar and summary show as an operator would see them.

Afterwards: the ping result, the route overlap/gap the samplers measured
(overlap must be 0: the source releases the guest's /32 when QEMU stops the
guest for the switchover and confirms that to B; B installs it only at
`completed` and after that confirmation), the guest's integrity check, and
both nodes' event streams, one line per event.  Everything is torn down.
Exit status: 0 when the migration completed with zero overlap, the guest
answers on B and ping loss stays within ceil((downtime + 20 ms) / 10 ms);
1 otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from migtopo import (  # noqa: E402
    BUSY,
    MigrationWatch,
    TwoNodes,
    assert_guest_whole,
    close_nodes,
    event_line,
    loss_budget,
)
from topo import VENV_BIN, guest_spec  # noqa: E402

NAME, IP, MAC = "demo", "10.99.0.2", "52:54:00:de:00:01"


def step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def boot(t: TwoNodes, a) -> None:
    # busy: a memory workload that verifies its own pages, so a migration that loses any shows
    spec = guest_spec(NAME, [{"mode": "routed", "mac": MAC, "ip": IP}], append=f"guest.ip0={IP}/32 {BUSY}")
    v = a.start_instance(spec)
    print(f"{NAME} started on node A, qemu pid {v.get('pid')}; waiting for the guest to boot (TCG)...", flush=True)
    t0 = time.monotonic()
    a.wait_console(NAME)
    print(f"guest printed GUEST-READY after {time.monotonic() - t0:.1f}s", flush=True)
    if not t.client.ping(IP):
        raise RuntimeError("the client cannot reach the guest on node A")


def migrate(a, b) -> int:
    """`qsup migrate` through the real CLI, stdout inherited (progress bar + human summary)."""
    argv = [str(VENV_BIN / "qsup"), "migrate", NAME, "--to", b.node_name, "--socket", str(a.socket)]
    print("$ qsup migrate demo --to " + b.node_name, flush=True)
    return subprocess.run(argv, timeout=120).returncode


def verdict(rc: int, w: dict, summary: dict | None, whole: str | None) -> list[str]:
    """Why the demo failed (empty when it did not)."""
    problems = [f"the guest is not whole on node B: {whole}"] if whole else []
    if rc != 0 or not summary:
        problems.append(f"qsup migrate exited {rc}")
    if w["overlap_ms"] > 0:
        problems.append(f"both nodes held the route for {w['overlap_ms']} ms")
    if not w["dst_has_route"] or w["src_has_route"]:
        problems.append("the route is not on node B alone")
    ping = w["ping"]
    if ping["received"] == 0:
        problems.append("no ping replies")
    if summary:
        budget = loss_budget(max(summary.get("downtime_ms") or 0, summary.get("switchover_ms") or 0))
        if ping["lost"] > budget:
            problems.append(f"ping lost {ping['lost']} > budget {budget}")
    return problems


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="qsup-demo-"))
    t = None
    tails = []
    try:
        step("topology: client + node A + node B (network namespaces), a qsup daemon per node")
        t = TwoNodes(work, prefix="qdemo")
        a, b = t.start_daemons()
        print(f"client {t.client.name}, node A {t.a.name} ({a.socket}), node B {t.b.name} ({b.socket})")
        tails = [a.tail(since=0), b.tail(since=0)]
        step("boot a guest with a routed NIC on node A")
        boot(t, a)
        step(f"client pings {IP} every 10 ms; route samplers on both nodes; live migration A -> B")
        with MigrationWatch(t, t.a, t.b, IP, work) as watch:
            watch.ping.wait_replies(20)  # the guest answers before the migration starts
            rc = migrate(a, b)
            if rc == 0:
                watch.ping.wait_replies(50, timeout=10)  # ... and on B afterwards
            w = watch.result()
        summary = None
        try:
            ev = tails[0].wait_for("migration.completed", NAME, timeout=5)
            summary = {k: ev.get(k) for k in ("downtime_ms", "switchover_ms", "activation")}
        except (TimeoutError, RuntimeError):
            pass
        step("result")
        p = w["ping"]
        print(f"ping: {p['sent']} sent, {p['received']} received, {p['lost']} lost "
              f"(ping's totals, its last request excepted; holes at seq {w['ping_holes']})")
        if summary:
            down = max(summary["downtime_ms"] or 0, summary["switchover_ms"] or 0)
            print(f"      budget ceil((max(downtime {summary['downtime_ms']}, switchover {summary['switchover_ms']}) "
                  f"+ 20) / 10) = {loss_budget(down)}")
        print(f"routes: overlap {w['overlap_ms']} ms (both nodes held {IP}/32), gap {w['gap_ms']} ms (neither did)")
        print(f"        node A now {'has' if w['src_has_route'] else 'has no'} route, "
              f"node B {'has' if w['dst_has_route'] else 'has no'} route")
        for tail, last in ((tails[0], "instance.stopped"), (tails[1], "migration.activated")):
            try:  # the last event each node emits for the migration: the tailers have it all
                tail.wait_for(last, NAME, timeout=5)
            except (TimeoutError, RuntimeError):
                pass
        step("event streams (qsup events --follow on each node)")
        for label, tail in (("node-a", tails[0]), ("node-b", tails[1])):
            for ev in tail.events:
                print(event_line(label, ev))
        step("guest integrity on node B: it answers, a clean console, its memory workload verified a sweep")
        whole = None
        try:
            assert_guest_whole(t, b, NAME, IP, busy=True)
            print("guest whole")
        except AssertionError as e:
            whole = str(e).splitlines()[0]
            print(e)
        problems = verdict(rc, w, summary, whole)
        step("demo " + ("OK" if not problems else "FAILED: " + "; ".join(problems)))
        return 0 if not problems else 1
    finally:
        for tail in tails:
            tail.close()
        if t is not None:
            close_nodes(t)  # every QEMU either daemon started or took over, by pid
        shutil.rmtree(work, ignore_errors=True)


def run() -> int:
    try:
        return main()
    except (RuntimeError, TimeoutError, subprocess.SubprocessError) as e:
        print(f"\n== demo FAILED: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(run())
