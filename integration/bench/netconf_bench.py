"""Benchmark: netconf vs an equivalent shell script that forks `ip`, in the same run.

Run as root:  .venv/bin/python integration/bench/netconf_bench.py [--cycles N]

It creates its own network namespace, re-executes itself inside it (``ip
netns exec``), and deletes the namespace at the end.  Inside, it opens a
real tap and measures medians of

* routed: ``activate`` (apply) and ``activate + deactivate`` (apply + undo)
  for a v4+v6 NIC in table 100 -- 7 steps: 4 sysctls, 2 routes, 2 rules,
  one address -- with the journal on the real disk (one fsync per apply);
* bridged: ``attach + detach`` (tap up, fe: MAC, bridge MTU, master);

against a shell script doing the same with ``ip`` and ``/proc/sys`` writes.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TAP = "qsbench0"
IP, IP6, TABLE = "10.77.0.5", "2001:db8:77::5", "100"

ROUTED_UP = r"""
set -e
echo 1 > /proc/sys/net/ipv4/conf/$TAP/proxy_arp
echo 1 > /proc/sys/net/ipv4/conf/$TAP/forwarding
ip route replace $IP/32 dev $TAP table $TABLE
ip rule del iif $TAP lookup $TABLE 2>/dev/null || true
ip rule add iif $TAP lookup $TABLE
echo 1 > /proc/sys/net/ipv6/conf/$TAP/proxy_ndp
echo 1 > /proc/sys/net/ipv6/conf/$TAP/forwarding
ip -6 addr replace fe80::1/64 dev $TAP nodad
ip -6 route replace $IP6/128 dev $TAP table $TABLE
ip -6 rule del iif $TAP lookup $TABLE 2>/dev/null || true
ip -6 rule add iif $TAP lookup $TABLE
"""

ROUTED_DOWN = r"""
ip -6 rule del iif $TAP lookup $TABLE
ip -6 route del $IP6/128 dev $TAP table $TABLE
ip -6 addr del fe80::1/64 dev $TAP
echo 0 > /proc/sys/net/ipv6/conf/$TAP/forwarding
echo 0 > /proc/sys/net/ipv6/conf/$TAP/proxy_ndp
ip rule del iif $TAP lookup $TABLE
ip route del $IP/32 dev $TAP table $TABLE
echo 0 > /proc/sys/net/ipv4/conf/$TAP/forwarding
echo 0 > /proc/sys/net/ipv4/conf/$TAP/proxy_arp
"""

BRIDGED_UP = r"""
set -e
ip link set $TAP up
ip link set $TAP address fe:54:00:12:34:56
ip link set $TAP mtu $(cat /sys/class/net/$BRIDGE/mtu)
ip link set $TAP master $BRIDGE
"""

BRIDGED_DOWN = r"""
ip link set $TAP nomaster
ip link set $TAP address $OLDMAC mtu 1500
ip link set $TAP down
"""


def p50(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def sh(script: str, env: dict) -> None:
    subprocess.run(["sh", "-c", script], env=env, check=True, stderr=subprocess.DEVNULL)


def inside(cycles: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from netconf import Executor, Journal, Nic, open_tap, plan

    os.system("ip link set lo up")
    os.system("ip link add benchbr type bridge && ip link set benchbr mtu 1450 up")
    tap = open_tap(TAP)
    jdir = tempfile.mkdtemp(prefix="netconf-bench-", dir="/var/tmp")
    try:
        ex = Executor(Journal(Path(jdir) / "bench.journal"))
        routed = Nic("bench", "52:54:00:12:34:56", "routed", TAP, link=TABLE, ip=IP, ip6=IP6)
        ex.apply(plan(routed, "attach"), reason="start")
        act, cyc = [], []
        p = plan(routed, "activate")
        for _ in range(cycles):
            t0 = time.perf_counter()
            ex.apply(p, reason="start")
            t1 = time.perf_counter()
            ex.undo(reason="stop", phases=("activate",))
            t2 = time.perf_counter()
            act.append(t1 - t0)
            cyc.append(t2 - t0)
        ex.undo(reason="stop")

        env = dict(os.environ, TAP=TAP, IP=IP, IP6=IP6, TABLE=TABLE, BRIDGE="benchbr",
                   OLDMAC=Path(f"/sys/class/net/{TAP}/address").read_text().strip())
        os.system(f"ip link set {TAP} up")
        script_cyc = []
        for _ in range(max(10, cycles // 4)):
            t0 = time.perf_counter()
            sh(ROUTED_UP, env)
            sh(ROUTED_DOWN, env)
            script_cyc.append(time.perf_counter() - t0)
        os.system(f"ip link set {TAP} down")

        bridged = Nic("bench", "52:54:00:12:34:56", "bridged", TAP, link="benchbr")
        bp = plan(bridged, "attach")
        br_cyc = []
        for _ in range(cycles):
            t0 = time.perf_counter()
            ex.apply(bp, reason="start")
            ex.undo(reason="stop", phases=("attach",))
            br_cyc.append(time.perf_counter() - t0)
        script_br = []
        for _ in range(max(10, cycles // 4)):
            t0 = time.perf_counter()
            sh(BRIDGED_UP, env)
            sh(BRIDGED_DOWN, env)
            script_br.append(time.perf_counter() - t0)
        ex.journal.close()
    finally:
        tap.close()
        subprocess.run(["rm", "-rf", jdir])

    r = {
        "bench": "netconf",
        "routed_activate_p50_ms": round(p50(act), 3),
        "routed_cycle_p50_ms": round(p50(cyc), 3),
        "script_routed_cycle_p50_ms": round(p50(script_cyc), 3),
        "ratio_routed": round(p50(script_cyc) / p50(cyc), 1),
        "bridged_cycle_p50_ms": round(p50(br_cyc), 3),
        "script_bridged_cycle_p50_ms": round(p50(script_br), 3),
        "ratio_bridged": round(p50(script_br) / p50(br_cyc), 1),
    }
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inside:
        print(json.dumps(inside(args.cycles)))
        return
    ns = f"qsbench{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, "--inside",
                              "--cycles", str(args.cycles)], check=True, capture_output=True, text=True).stdout
    finally:
        subprocess.run(["ip", "netns", "del", ns])
    r = json.loads(out.strip().splitlines()[-1])
    print(f"routed  activate p50 {r['routed_activate_p50_ms']:.3f} ms; activate+deactivate p50 "
          f"{r['routed_cycle_p50_ms']:.3f} ms vs script {r['script_routed_cycle_p50_ms']:.2f} ms "
          f"-> {r['ratio_routed']}x")
    print(f"bridged attach+detach p50 {r['bridged_cycle_p50_ms']:.3f} ms vs script "
          f"{r['script_bridged_cycle_p50_ms']:.2f} ms -> {r['ratio_bridged']}x")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
