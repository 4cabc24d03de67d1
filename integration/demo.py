"""`make demo`: boot a real guest under qsup with a routed NIC and ping it.

A node namespace runs `qsup run`; a client namespace reaches the guest
through the node's uplink (proxy ARP, as a routed deployment would).  The
event stream is printed as it happens.  Everything is torn down at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from topo import Netns, QsupRun, guest_spec, node_with_uplink  # noqa: E402


def show(ev: dict) -> None:
    extra = {k: v for k, v in ev.items() if k not in ("seq", "ts", "instance", "type", "_rx", "spec")}
    print(f"  event {ev['seq']:>4} {ev.get('instance') or '-':<6} {ev['type']:<22} {json.dumps(extra)[:110]}")


def main() -> int:
    node = client = run = None
    try:
        node, client = Netns("qdemo"), Netns("qdemo")
        node_with_uplink(node, client)
        client.run("ip", "route", "add", "10.99.0.0/24", "via", "192.168.101.1")
        print(f"node namespace {node.name}, client namespace {client.name}")
        spec = guest_spec("demo", [{"mode": "routed", "mac": "52:54:00:de:00:01", "ip": "10.99.0.2"}],
                          append="guest.ip0=10.99.0.2/32")
        run = QsupRun(node, Path(tempfile.mkdtemp(prefix="qsup-demo-")), [spec])
        started = run.wait_event("instance.started", "demo", timeout=60)
        print(f"qemu pid {started['pid']}, start timings (ms): {started['timings_ms']}")
        t = time.monotonic()
        run.wait_console("demo")
        print(f"guest printed GUEST-READY after {time.monotonic() - t:.1f}s")
        print("client pings the guest through the node:")
        out = subprocess.run(["ip", "netns", "exec", client.name, "ping", "-c", "5", "-i", "0.2", "10.99.0.2"],
                             capture_output=True, text=True)
        print("  " + "\n  ".join(out.stdout.strip().splitlines()[-2:]))
        print("stopping (SIGTERM to qsup run)...")
        run.stop()
        print("event stream:")
        for ev in run.events:
            show(ev)
        return 0 if out.returncode == 0 else 1
    finally:
        if run:
            run.close()
        for ns in (client, node):
            if ns:
                ns.close()


if __name__ == "__main__":
    sys.exit(main())
