"""Live NIC changes, timed (issue 18): one real `qsup serve` in a node namespace with an uplink to a
client namespace, the real test guest under TCG with a routed NIC (eth0), and over the API:

* ``add_p50_ms`` / ``add_p99_ms``: from ``POST /v1/instances/nb/nics`` (a routed NIC) to the
  guest's new NIC answering a ping from the client (the guest's /init configures the NIC it sees
  appear: guest.ip1 on the kernel command line; the ping is tried every 20 ms);
* ``rm_p50_ms``: from ``DELETE .../nics/MAC`` to the host fully cleaned (the call returns after
  DEVICE_DELETED, netdev_del and the NIC's netconf undo; then the tap must be gone from the node);
* ``set_p50_ms``: ``PUT .../nics/MAC`` moving the NIC's routed address (a <-> b), and
  ``ping_lost``: pings to the guest's *other* NIC (eth0) lost during all the sets (``ping -i
  0.01`` from the client throughout; goal 0);
* ``cycles`` add/rm cycles on the one guest (each timed as above), then ``leaks``: taps, routes,
  rules and neighbours of the node's qs* devices beyond the baseline, QEMU's peripherals and
  descriptors beyond it, the daemon's descriptors beyond it; with the daemon's RSS before and
  after (``rss_growth_kib``).  The baseline is taken after one untimed warm-up add/rm (the first
  change opens what the daemon keeps open afterwards, e.g. a worker thread's socket).

Bridged NICs are not measured (the test guest answers through a hotplugged NIC by policy rules
via the routed gateway only).  ``BENCH_CYCLES`` (default 100) and ``BENCH_SETS`` (default 20).
Last line: one JSON object with ``"bench": "nic_hotplug"``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "integration"))

import httpx  # noqa: E402

from topo import Netns, QsupDaemon, guest_spec, node_with_uplink, qmp  # noqa: E402

CYCLES = int(os.environ.get("BENCH_CYCLES", "100"))
SETS = int(os.environ.get("BENCH_SETS", "20"))
MAC0, MAC1 = "52:54:00:88:00:40", "52:54:00:88:00:41"
IP0, IP1, IP1B = "10.99.10.40", "10.99.10.41", "10.99.10.42"


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))], 1)


def _ping_once(client: Netns, ip: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", client.name, "ping", "-c", "1", "-W", "0.2", ip],
                          capture_output=True).returncode == 0


def _wait_ping(client: Netns, ip: str, timeout: float = 180) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _ping_once(client, ip):
            return time.monotonic()
        time.sleep(0.02)
    raise RuntimeError(f"{ip} never answered")


def _host(ns: Netns) -> dict:
    links = sorted(link["ifname"] for link in ns.json("link", "show") if link["ifname"].startswith("qs"))
    routes = sorted(json.dumps(r, sort_keys=True) for r in ns.json("route", "show", "table", "all")
                    if r.get("dev", "").startswith("qs"))
    rules = sorted(json.dumps(r, sort_keys=True) for r in ns.json("rule", "show")
                   if str(r.get("iif", "")).startswith("qs"))
    neigh = sorted(f"{n.get('dst')} {n.get('dev')}" for n in ns.json("neigh", "show")
                   if n.get("dev", "").startswith("qs") and n.get("state") != ["FAILED"])
    return {"taps": links, "routes": routes, "rules": rules, "neigh": neigh}


def _guest_saw(dm: QsupDaemon, sign: str, n: int, timeout: float = 60) -> None:
    """The guest's console has its ``n``-th ``guest-nic: SIGN eth1`` line."""
    deadline = time.monotonic() + timeout
    while dm.console("nb").count(f"guest-nic: {sign} eth1") < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the guest never printed guest-nic: {sign} eth1 #{n}")
        time.sleep(0.05)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmRSS:")))


def run(work: Path) -> dict:
    node, client = Netns(), Netns()
    dm = None
    try:
        node_with_uplink(node, client)
        client.run("ip", "route", "add", "10.99.0.0/16", "via", "192.168.101.1")
        dm = QsupDaemon(node, work, extra_config="unplug_timeout = 30\n")
        spec = guest_spec("nb", [{"mode": "routed", "mac": MAC0, "ip": IP0}],
                          append=f"guest.ip0={IP0}/32 guest.ip1={IP1}/32 guest.ip1_also={IP1B}/32")
        v = dm.start_instance(spec)
        dm.wait_console("nb", timeout=600)  # TCG on a loaded host boots slowly
        _wait_ping(client, IP0)
        qemu_pid, sock = v["pid"], v["qmp_operator"]
        h = httpx.Client(transport=httpx.HTTPTransport(uds=str(dm.socket)), base_url="http://qsup", timeout=120)
        # one warm-up add/rm (not timed): what the first change allocates once (the daemon's worker
        # threads' sockets) is no leak; the baseline is taken after it
        h.post("/v1/instances/nb/nics", json={"mode": "routed", "ip": IP1, "mac": MAC1}).raise_for_status()
        _wait_ping(client, IP1)
        _guest_saw(dm, "+", 1)
        h.delete(f"/v1/instances/nb/nics/{MAC1}").raise_for_status()
        _guest_saw(dm, "-", 1)
        base_dev = qmp(sock, "qom-list", {"path": "/machine/peripheral"})
        time.sleep(0.5)  # the operator monitor's connection closed in QEMU too
        base_host, base_qemu_fds, base_daemon_fds, rss0 = _host(node), _fds(qemu_pid), _fds(dm.pid), _rss_kib(dm.pid)

        add_ms: list[float] = []
        rm_ms: list[float] = []
        for i in range(CYCLES):
            t0 = time.monotonic()
            r = h.post("/v1/instances/nb/nics", json={"mode": "routed", "ip": IP1, "mac": MAC1})
            r.raise_for_status()
            add_ms.append((_wait_ping(client, IP1) - t0) * 1000)
            _guest_saw(dm, "+", i + 2)  # its /init done configuring eth1 (not timed)
            tap = r.json()["nic"] and next(n["tap"] for n in r.json()["view"]["nics"] if n["mac"] == MAC1)
            if i == CYCLES - 1:
                break  # the last one stays for the sets
            t0 = time.monotonic()
            h.delete(f"/v1/instances/nb/nics/{MAC1}").raise_for_status()
            while tap in {link["ifname"] for link in node.json("link", "show")}:
                time.sleep(0.005)
            rm_ms.append((time.monotonic() - t0) * 1000)
            _guest_saw(dm, "-", i + 2)  # the guest's watcher saw eth1 go before the next add (not timed)

        # sets under a flood ping of the other NIC
        flood = subprocess.Popen(["ip", "netns", "exec", client.name, "ping", "-i", "0.01", "-W", "1", IP0],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(1)
        set_ms: list[float] = []
        for i in range(SETS):
            ip = IP1B if i % 2 == 0 else IP1
            t0 = time.monotonic()
            h.put(f"/v1/instances/nb/nics/{MAC1}", json={"mode": "routed", "ip": ip}).raise_for_status()
            set_ms.append((time.monotonic() - t0) * 1000)
            _wait_ping(client, ip, timeout=20)
        time.sleep(1)
        flood.send_signal(2)
        out, _ = flood.communicate(timeout=10)
        stats = next((line for line in out.splitlines() if "packets transmitted" in line), "")
        sent, got = (int(stats.split()[0]), int(stats.split()[3])) if stats else (0, 0)

        t0 = time.monotonic()
        h.delete(f"/v1/instances/nb/nics/{MAC1}").raise_for_status()
        rm_ms.append((time.monotonic() - t0) * 1000)
        h.close()  # its connection is a descriptor of the daemon's
        dev_now = qmp(sock, "qom-list", {"path": "/machine/peripheral"})
        time.sleep(1)
        host_now = _host(node)
        leaks = {k: sorted(set(host_now[k]) - set(base_host[k])) for k in host_now}
        leaks["qemu_devices"] = sorted({d["name"] for d in dev_now} - {d["name"] for d in base_dev})
        leaks["qemu_fds"] = _fds(qemu_pid) - base_qemu_fds
        leaks["daemon_fds"] = _fds(dm.pid) - base_daemon_fds
        rss1 = _rss_kib(dm.pid)
        dm.cli_json("stop", "nb", "--timeout", "10")
        n_leaks = sum(len(v) if isinstance(v, list) else max(v, 0) for v in leaks.values())
        return {
            "bench": "nic_hotplug", "accel": "tcg", "cycles": CYCLES, "sets": SETS,
            "add_p50_ms": _pct(add_ms, 50), "add_p99_ms": _pct(add_ms, 99),
            "rm_p50_ms": _pct(rm_ms, 50), "rm_p99_ms": _pct(rm_ms, 99),
            "set_p50_ms": _pct(set_ms, 50), "set_p99_ms": _pct(set_ms, 99),
            "ping_sent": sent, "ping_lost": sent - got, "ping_lost_goal": 0,
            "leaks": n_leaks, "leak_detail": {k: v for k, v in leaks.items() if v},
            "daemon_rss_kib_before": rss0, "daemon_rss_kib_after": rss1, "rss_growth_kib": rss1 - rss0,
        }
    finally:
        if dm is not None:
            dm.close()
        client.close()
        node.close()


def main() -> int:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:  # BENCH_DIR: where (default /tmp)
        try:
            res = run(Path(d))
        except BaseException:
            for log in Path(d).glob("state/logs/*.console"):  # the guest's side of a failure
                print(f"--- {log.name} (tail)\n{log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
            raise
    print(f"add->ping p50 {res['add_p50_ms']} ms p99 {res['add_p99_ms']} ms, rm p50 {res['rm_p50_ms']} ms, "
          f"set p50 {res['set_p50_ms']} ms, {res['ping_lost']} of {res['ping_sent']} pings lost, "
          f"{res['leaks']} leaks, daemon RSS {res['rss_growth_kib']:+d} KiB over {res['cycles']} cycles")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
