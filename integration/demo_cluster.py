"""`make demo-cluster`: a 3-node Pacemaker cluster evacuates node1 by live migration, under ping.

The cluster is integration/cluster/harness.py (three full Corosync/Pacemaker nodes in
namespaces, each with its own `qsup serve`); the guests are ocf:qsup:qsup resources that
prefer node1: one real guest (busybox, pinged every 10 ms from the fabric namespace) and two
tiny halted ones.  Then `crm_attribute --node node1 --name standby --update on`, while:

* `crm_mon -1` is printed every few seconds (what an operator watches);
* afterwards, each node's `qsup events` for those guests, one line per event.

The measuring is integration/bench/evacuation.py's (same functions): migrated = same qsup
generation on the new node, the longest time a /32 sat on two nodes, ping loss against the
migration benchmark's budget, leaks on node1.  Everything is torn down.  Exit status 0 when
every guest was live-migrated, overlap is 0, ping loss within budget and node1 left clean.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE / "bench"), str(HERE / "cluster"), str(HERE)]

import evacuation as ev  # noqa: E402 -- importable once sys.path above is set
from harness import Cluster, missing_binaries  # noqa: E402 -- importable once sys.path above is set
from migtopo import event_line  # noqa: E402 -- importable once sys.path above is set


def step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def crm_mon(c: Cluster) -> str:
    return c.live().run("crm_mon", "-1", "--exclude=summary", check=False, timeout=20).stdout.rstrip()


def main() -> int:
    missing = missing_binaries()
    if missing:
        sys.exit(f"cluster packages missing ({', '.join(missing)}): run `make deps`")
    work = Path(tempfile.mkdtemp(prefix="qsup-demo-cluster-"))
    work.chmod(0o755)
    c, ok = None, False
    try:
        step("3 Pacemaker/Corosync nodes in namespaces, each with qsup serve")
        c = Cluster(work, 3, prefix="qdc", properties=ev.OPTIONS)
        print(f"quorate after {c.timings['quorate_s']} s, DC after {c.timings['dc_s']} s")
        gs = ev.guests(work, 2, 1)
        names = [n for n, _, _ in gs]
        step(f"guests {', '.join(names)} as ocf:qsup:qsup resources (allow-migrate=true), preferring node1")
        ev.add_guests(c, gs, "node1")
        ev.wait_all_on(c, names, "node1", timeout=300)
        c.wait_idle(timeout=120)
        c.nodes[0].qsup.wait_console("real0", timeout=180)
        print(crm_mon(c))
        seqs = {n.name: n.qsup.last_seq() for n in c.nodes}

        stop = threading.Event()

        def watch(t0: float) -> None:
            def loop():
                while not stop.wait(3):
                    print(f"\n-- crm_mon at +{time.time() - t0:.1f} s\n{crm_mon(c)}", flush=True)
            threading.Thread(target=loop, daemon=True).start()

        step("crm_attribute --node node1 --name standby --update on  (migration-limit 2)")
        try:
            res = ev.evacuate(c, gs, 2, work, show=watch)
        finally:
            stop.set()
        step("after the evacuation")
        print(crm_mon(c))
        step("qsup events on each node (qmp.* left out)")
        for n in c.nodes:
            lines = [e for e in ev.events(n, seqs[n.name]) if e.get("instance") in names
                     and not e["type"].startswith("qmp.")]
            print(f"-- {n.name}")
            for e in lines:
                print("  " + event_line(n.name, e))
        step("result")
        for k in ("migrated", "restarted", "overlap_max_ms", "ping_over_budget", "leaks", "wall_s",
                  "migration_p50_ms", "cycle_p50_ms", "max_in_flight", "spread", "ping"):
            print(f"  {k}: {res[k]}")
        ok = (res["migrated"] == len(gs) and res["restarted"] == 0 and res["overlap_max_ms"] == 0
              and res["ping_over_budget"] == 0 and res["leaks"] == 0)
    finally:
        if c is not None:
            step("teardown")
            left = c.close()
            print("clean" if not left else f"LEFT: {left}")
            ok = ok and not left
            if not left:
                shutil.rmtree(work, ignore_errors=True)
    print("\nOK" if ok else "\nFAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
