#!/usr/bin/env python3
"""Bench: one `qsup serve` with 200 instances -- memory, idle CPU, reattach time, event fan-out.

Setup: a node namespace (with an uplink namespace, like the tests), one daemon in it, and
INSTANCES instances started through the API, each with one routed NIC (tap, /32 route, proxy
ARP sysctls: the real netconf path) and ``-m 16``.  The guest is a 36-byte multiboot "kernel"
written here that executes ``cli; hlt``: QEMU loads it with ``-kernel``, the instance is
``cont``'d and *running* like any other, and a halted vCPU costs no host CPU -- so the numbers
are the daemon's, not 200 booting TCG guests fighting over two cores.

Measured (daemon = the `qsup serve` process only; QEMU processes are not counted):

* **RSS**: the daemon's VmRSS before any instance and with all of them; per instance = the
  difference / INSTANCES.  Goal: total <= 150 MB.
* **idle CPU**: the daemon's utime+stime over IDLE seconds with every instance running and no
  API traffic, as % of one core.  Goal <= 1 %.
* **reattach**: SIGKILL the daemon, start a new one, time until it is READY (every instance
  reattached: pid + start time verified, QMP reconnected, query-status); also the daemon's own
  ``reattach_ms`` (the reattach phase alone, without interpreter start-up).  Goal <= 5 s.
* **event fan-out**: READERS concurrent ``GET /v1/events?follow=true`` streams on the unix
  socket; the bench drives QMP ``stop``/``cont`` on one instance's operator monitor, which makes
  the daemon emit events (``qmp.STOP``, ``instance.paused``, ...).  Latency per event per
  reader = receipt time - the event's ``ts`` (taken in ``EventLog.emit``; same host clock).
  Goal p99 <= 10 ms.

Run (root): ``.venv/bin/python integration/bench/daemon_scale.py [--instances 200]``.
The last line of output is one JSON object ``{"bench": "daemon_scale", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import struct
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1]))
from topo import Netns, QsupDaemon, node_with_uplink  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
EVENT_RE = re.compile(rb'"seq":(\d+),"ts":([0-9.e+-]+)')


def halt_kernel(path: Path) -> str:
    """A multiboot image (a.out kludge) whose entry point is ``cli; hlt; jmp hlt``."""
    magic, flags, base = 0x1BADB002, 0x00010000, 0x100000
    header = struct.pack("<8I", magic, flags, (-(magic + flags)) & 0xFFFFFFFF, base, base, 0, 0, base + 32)
    path.write_bytes(header + bytes([0xFA, 0xF4, 0xEB, 0xFD]))
    return str(path)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p / 100))]


def api(dm: QsupDaemon) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(dm.socket)), base_url="http://qsup",
                        timeout=httpx.Timeout(10, read=120))


def start_all(dm: QsupDaemon, kernel: str, n: int, parallel: int) -> list[float]:
    def one(i: int) -> float:
        spec = {"name": f"b{i:03d}", "memory": 16, "kernel": kernel,
                "nics": [{"mode": "routed", "ip": f"10.100.{i // 250}.{i % 250 + 1}"}]}
        with api(dm) as c:
            t = time.perf_counter()
            r = c.post("/v1/instances", json=spec)
            if r.status_code != 201:
                raise RuntimeError(f"start b{i:03d}: {r.status_code} {r.text}")
            return time.perf_counter() - t

    with ThreadPoolExecutor(parallel) as ex:
        return list(ex.map(one, range(n)))


# -- fan-out -----------------------------------------------------------------------------------

async def reader(sock_path: str, since: int, out: list[tuple[int, float, float]], connected) -> None:
    s = await trio.open_unix_socket(sock_path)
    await s.send_all(f"GET /v1/events?since={since}&follow=true HTTP/1.1\r\nHost: qsup\r\n\r\n".encode())
    buf = b""
    first = True
    async with s:
        while True:
            data = await s.receive_some(65536)
            rx = time.time()
            if not data:
                return
            if first:
                first = False
                connected()
            buf += data
            last_end = 0
            for m in EVENT_RE.finditer(buf):
                out.append((int(m.group(1)), float(m.group(2)), rx))
                last_end = m.end()
            buf = buf[last_end:] if last_end else buf[-256:]


async def qmp_line(stream, pending: bytearray) -> dict:
    while b"\n" not in pending:
        data = await stream.receive_some(65536)
        if not data:
            raise RuntimeError("QMP closed")
        pending += data
    line, _, rest = bytes(pending).partition(b"\n")
    pending[:] = rest
    return json.loads(line)


async def qmp_cmd(stream, pending: bytearray, cmd: str) -> None:
    await stream.send_all(json.dumps({"execute": cmd}).encode() + b"\n")
    while True:
        msg = await qmp_line(stream, pending)
        if "return" in msg or "error" in msg:
            return


async def fanout(dm: QsupDaemon, qmp_path: str, readers: int, pairs: int, rate: float,
                 commands: tuple[str, ...]) -> dict:
    with api(dm) as c:
        since = int(c.get("/v1/health").json()["last_seq"])
    samples: list[list[tuple[int, float, float]]] = [[] for _ in range(readers)]
    n_connected = 0

    def connected():
        nonlocal n_connected
        n_connected += 1

    async with trio.open_nursery() as nursery:
        for i in range(readers):
            nursery.start_soon(reader, str(dm.socket), since, samples[i], connected)
        qmp = await trio.open_unix_socket(qmp_path)
        pending = bytearray()
        await qmp_line(qmp, pending)  # greeting
        await qmp_cmd(qmp, pending, "qmp_capabilities")
        # warm-up: one stop/cont so every reader has its stream open and has seen an event
        await qmp_cmd(qmp, pending, "stop")
        await qmp_cmd(qmp, pending, "cont")
        with trio.fail_after(20):
            while n_connected < readers:
                await trio.sleep(0.05)
        await trio.sleep(0.5)
        with api(dm) as c:
            followers_gauge = next(float(l.split()[-1]) for l in (await trio.to_thread.run_sync(
                lambda: c.get("/metrics").text)).splitlines() if l.startswith("qsup_event_followers "))
            warm_last = int((await trio.to_thread.run_sync(lambda: c.get("/v1/health").json()))["last_seq"])
        for _ in range(pairs):
            for cmd in commands:
                await qmp_cmd(qmp, pending, cmd)
                await trio.sleep(1 / rate / len(commands))
        await trio.sleep(1.0)
        await qmp.aclose()
        nursery.cancel_scope.cancel()
    lat = [(rx - ts) * 1000 for per in samples for (seq, ts, rx) in per if seq > warm_last]
    by_seq: dict[int, list[float]] = {}
    for per in samples:
        for seq, ts, rx in per:
            if seq > warm_last:
                by_seq.setdefault(seq, []).append((rx - ts) * 1000)
    first = [min(v) for v in by_seq.values()]
    spread = [max(v) - min(v) for v in by_seq.values()]
    per_reader = [len({seq for (seq, _, _) in per if seq > warm_last}) for per in samples]
    return {"readers": readers, "followers_gauge": followers_gauge, "events": max(per_reader),
            "min_events_per_reader": min(per_reader), "samples": len(lat),
            "p50_ms": round(pct(lat, 50), 3), "p99_ms": round(pct(lat, 99), 3), "max_ms": round(max(lat), 3),
            "first_reader_p50_ms": round(pct(first, 50), 3), "first_reader_p99_ms": round(pct(first, 99), 3),
            "spread_p50_ms": round(pct(spread, 50), 3), "spread_p99_ms": round(pct(spread, 99), 3)}


# -- main --------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--readers", type=int, default=50)
    ap.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU measurement")
    ap.add_argument("--pairs", type=int, default=100, help="stop/cont pairs for the fan-out test")
    ap.add_argument("--rate", type=float, default=20.0, help="stop/cont pairs per second")
    ap.add_argument("--parallel", type=int, default=4, help="concurrent start requests")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the daemon inherits it

    node = client = dm = None
    result: dict = {"bench": "daemon_scale", "instances": args.instances}
    with tempfile.TemporaryDirectory(prefix="qsup-bench-") as tmp:
        work = Path(tmp)
        try:
            node, client = Netns("qsb"), Netns("qsb")
            node_with_uplink(node, client)
            kernel = halt_kernel(work / "halt.kernel")
            dm = QsupDaemon(node, work)
            time.sleep(1)
            rss0 = rss_kb(dm.pid)

            t = time.perf_counter()
            lat = start_all(dm, kernel, args.instances, args.parallel)
            start_s = time.perf_counter() - t
            print(f"started {args.instances} in {start_s:.1f}s (p50 {pct(lat, 50) * 1000:.0f} ms, "
                  f"p99 {pct(lat, 99) * 1000:.0f} ms per start)", flush=True)
            with api(dm) as c:
                views = c.get("/v1/instances").json()["instances"]
            assert len(views) == args.instances and all(v["state"] == "running" for v in views)
            pids = {v["name"]: v["pid"] for v in views}
            qemu_rss_mb = sum(rss_kb(p) for p in pids.values()) / 1024
            time.sleep(3)
            rss1 = rss_kb(dm.pid)
            print(f"daemon RSS {rss0 / 1024:.1f} MB empty, {rss1 / 1024:.1f} MB with {args.instances}", flush=True)

            c0, q0, t0 = cpu_ticks(dm.pid), sum(map(cpu_ticks, pids.values())), time.monotonic()
            time.sleep(args.idle)
            c1, q1, t1 = cpu_ticks(dm.pid), sum(map(cpu_ticks, pids.values())), time.monotonic()
            idle_pct = (c1 - c0) / TICK / (t1 - t0) * 100
            qemu_idle_pct = (q1 - q0) / TICK / (t1 - t0) * 100
            print(f"daemon idle CPU {idle_pct:.2f}% over {t1 - t0:.0f}s (all {args.instances} halted QEMUs together: "
                  f"{qemu_idle_pct:.0f}% of a core); load average {os.getloadavg()[0]:.2f}", flush=True)

            # (a) fan-out alone: system_powerdown makes QEMU emit POWERDOWN (the halted guest ignores
            # it), one event with no state change behind it.
            fan = trio.run(fanout, dm, views[0]["qmp_operator"], args.readers, args.pairs * 2, args.rate * 2,
                           ("system_powerdown",))
            print(f"fan-out to {args.readers} readers (qmp.POWERDOWN): p50 {fan['p50_ms']} ms, "
                  f"p99 {fan['p99_ms']} ms", flush=True)
            # (b) state changes: stop/cont -> qmp.STOP + instance.paused, qmp.RESUME + instance.running;
            # each state change also rewrites the instance record on the daemon's thread.
            fan_state = trio.run(fanout, dm, views[0]["qmp_operator"], args.readers, args.pairs, args.rate,
                                 ("stop", "cont"))
            print(f"fan-out to {args.readers} readers (stop/cont state changes): p50 {fan_state['p50_ms']} ms, "
                  f"p99 {fan_state['p99_ms']} ms", flush=True)

            dm.kill()
            t = time.perf_counter()
            dm.start(timeout=120)
            ready_s = time.perf_counter() - t
            with api(dm) as c:
                after = {v["name"]: v for v in c.get("/v1/instances").json()["instances"]}
                ready_ev = [e for e in map(json.loads, c.get(
                    "/v1/events", params={"since": 0}).text.splitlines()) if e["type"] == "daemon.ready"][-1]
            reattached_ok = (len(ready_ev["reattached"]) == args.instances
                             and all(after[n]["pid"] == p and after[n]["state"] == "running" for n, p in pids.items()))
            print(f"reattach after SIGKILL: ready in {ready_s:.2f}s (reattach phase {ready_ev['reattach_ms']} ms),"
                  f" all {args.instances} reattached: {reattached_ok}", flush=True)
            rss2 = rss_kb(dm.pid)

            result.update({
                "start_total_s": round(start_s, 2),
                "start_p50_ms": round(pct(lat, 50) * 1000, 1), "start_p99_ms": round(pct(lat, 99) * 1000, 1),
                "rss_empty_mb": round(rss0 / 1024, 1), "rss_mb": round(rss1 / 1024, 1),
                "rss_per_instance_kb": round((rss1 - rss0) / args.instances, 1),
                "rss_after_reattach_mb": round(rss2 / 1024, 1),
                "qemu_rss_total_mb": round(qemu_rss_mb, 1),
                "idle_cpu_pct": round(idle_pct, 3), "idle_window_s": round(t1 - t0, 1),
                "qemu_idle_cpu_pct_total": round(qemu_idle_pct, 1), "loadavg_1m_end": round(os.getloadavg()[0], 2),
                "reattach_ready_s": round(ready_s, 3), "reattach_phase_ms": ready_ev["reattach_ms"],
                "reattached_all": reattached_ok,
                "fanout": fan, "fanout_state_changes": fan_state,
                "goals": {"rss_mb<=150": rss1 / 1024 <= 150, "idle_cpu_pct<=1": idle_pct <= 1,
                          "reattach_s<=5": ready_s <= 5, "fanout_p99_ms<=10": fan["p99_ms"] <= 10},
            })
        finally:
            if dm is not None:
                left = dm.close()  # SIGKILL the daemon and every QEMU it started, by pid
                if left:
                    print(f"warning: qemu pids would not die: {left}", file=sys.stderr)
            for ns in (client, node):
                if ns is not None:
                    ns.close()  # routes, sysctls and any tap left go with the namespace
    print(json.dumps(result))


if __name__ == "__main__":
    main()
