"""Start-latency breakdown: qsup vs bare `qemu -S`, measured in the same run.

qsup: spawn (taps opened + qemu forked) -> QMP ready -> NICs configured
(attach+activate, journaled) -> running (`cont` returned), for an instance
with one routed NIC.  Bare: fork `qemu -S` with the same machine options,
connect to its QMP socket and finish the capabilities handshake.  The
overhead is qsup's spawn->running minus bare spawn->QMP-ready, per
iteration, alternating the two so drift hits both.

Runs itself inside a fresh network namespace (re-executing with
`ip netns exec`), which it deletes at the end.  Last line: one JSON object.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "integration"))
N = int(os.environ.get("BENCH_N", "15"))


def bare_qemu(tmp: Path, kernel: str, i: int) -> float:
    sock = tmp / f"bare{i}.sock"
    t0 = time.perf_counter()
    p = subprocess.Popen(
        ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none", "-machine", "pc",
         "-accel", "tcg", "-m", "64", "-chardev", f"socket,id=q,path={sock},server=on,wait=off",
         "-mon", "chardev=q,mode=control", "-kernel", kernel, "-S", "-runas", "nobody"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(sock))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                time.sleep(0.0005)
        f = s.makefile("rwb")
        f.readline()  # greeting
        f.write(b'{"execute":"qmp_capabilities"}\n')
        f.flush()
        f.readline()
        t = time.perf_counter() - t0
        s.close()
        return t * 1000
    finally:
        p.kill()
        p.wait()


async def qsup_starts(tmp: Path, kernel: str, n: int, bare_times: list) -> list[dict]:
    import trio

    from supervisor import Node, load_config, parse_spec
    from supervisor._eventlog import EventLog

    cfg = load_config(None, state_dir=str(tmp / "state"), run_dir=str(tmp / "run"), accel="tcg",
                      hooks_dir="/nonexistent", image_dirs=[str(Path(kernel).parent)])
    events = EventLog(None)
    node = Node(cfg, events)
    out = []
    async with node.running():
        for i in range(n + 1):
            bare = await trio.to_thread.run_sync(bare_qemu, tmp, kernel, i)
            spec = parse_spec({"name": f"b{i}", "memory": 64, "kernel": kernel,
                               "nics": [{"mode": "routed", "ip": f"10.77.{i // 250}.{i % 250 + 1}"}]})
            inst = await node.start(spec)
            t = dict(inst.timings)
            await node.stop(spec.name, force=True)
            if i:  # the first iteration warms caches
                out.append(t)
                bare_times.append(bare)
    events.close()
    return out


def child() -> None:
    import trio

    from topo import guest_paths

    kernel = guest_paths()[0]
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "route", "add", "default", "dev", "lo"], check=True)
    with tempfile.TemporaryDirectory() as d:
        bare: list[float] = []
        runs = trio.run(qsup_starts, Path(d), kernel, N, bare)
    med = lambda k: round(statistics.median(r[k] for r in runs), 2)  # noqa: E731
    res = {
        "bench": "start_latency",
        "n": N,
        "qsup_spawn_ms": med("spawn"),
        "qsup_qmp_ready_ms": med("qmp_ready"),
        "qsup_netconf_ms": med("netconf"),
        "qsup_cont_ms": med("cont"),
        "qsup_total_p50_ms": med("total"),
        "bare_spawn_to_qmp_p50_ms": round(statistics.median(bare), 2),
    }
    res["overhead_p50_ms"] = round(res["qsup_total_p50_ms"] - res["bare_spawn_to_qmp_p50_ms"], 2)
    res["overhead_goal_ms"] = 30
    print(f"qsup: spawn {res['qsup_spawn_ms']} ms -> QMP ready +{res['qsup_qmp_ready_ms']} ms -> "
          f"NICs configured +{res['qsup_netconf_ms']} ms -> running +{res['qsup_cont_ms']} ms "
          f"= {res['qsup_total_p50_ms']} ms")
    print(f"bare qemu -S: spawn -> QMP ready {res['bare_spawn_to_qmp_p50_ms']} ms")
    print(json.dumps(res))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child()
        return 0
    ns = f"qbench{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, "--child"]).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns])


if __name__ == "__main__":
    sys.exit(main())
