"""Namespaces, an in-namespace agent, OVS daemons and host snapshots for netconf tests.

One approach for running code under test inside a namespace: an **agent**
process started with ``ip netns exec NS python nsutil.py``.  It reads JSON
requests on stdin and answers one JSON line each, and it keeps state between
requests (open taps, journals, executors) -- which the tests need, because a
non-persistent tap lives only while some process holds its fd.  Tests can
run several agents in one namespace (one holds the tap, another applies and
gets SIGKILLed, a third recovers), and they inspect the namespace from the
outside with ``ip -n NS -j ...``.

Everything made here is removed by the owner's ``close()``; processes are
killed by the pid we started, never by name.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

# This file also runs as a script (the agent) inside a namespace; topo lives one level up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from topo import Netns, Ovs, sh  # noqa: E402,F401 (Ovs: the netconf fixtures import it from here)

ROOT = Path(__file__).resolve().parents[2]
PY = str(ROOT / ".venv" / "bin" / "python")


# -- snapshots -------------------------------------------------------------

_LINK_KEYS = ("ifname", "mtu", "address", "master", "flags", "link_type")


def snapshot(ns: Netns) -> dict:
    """The namespace's routes, rules, links, addresses and per-device sysctls."""
    snap = {
        "route4": ns.json("-4", "route", "show", "table", "all"),
        "route6": ns.json("-6", "route", "show", "table", "all"),
        "rule4": ns.json("-4", "rule", "show"),
        "rule6": ns.json("-6", "rule", "show"),
        "links": [{k: l.get(k) for k in _LINK_KEYS} for l in ns.json("link", "show")],
        "addrs": [{"ifname": a["ifname"], "addr": sorted((i["local"], i["prefixlen"]) for i in a.get("addr_info", []))}
                  for a in ns.json("addr", "show")],
        "neigh": sorted((n["dst"], n["dev"], n.get("lladdr")) for n in ns.json("neigh", "show", "nud", "permanent")),
    }
    out = ns.run("sh", "-c", "grep -H . /proc/sys/net/ipv4/conf/*/proxy_arp /proc/sys/net/ipv4/conf/*/forwarding "
                 "/proc/sys/net/ipv6/conf/*/proxy_ndp /proc/sys/net/ipv6/conf/*/forwarding", check=False)
    snap["sysctl"] = sorted(out.split())
    return snap


# -- the agent -------------------------------------------------------------


class Agent:
    """A python process inside ``ns`` serving netconf requests (see :func:`agent_main`)."""

    def __init__(self, ns: Netns, env: dict | None = None) -> None:
        full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns.name, PY, str(Path(__file__).resolve())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=full_env, cwd=str(ROOT),
        )
        self.pid = self.proc.pid  # `ip netns exec` execs python: same pid

    def send(self, op: str, **kw) -> None:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float = 60) -> dict:
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            raise TimeoutError("agent did not answer")
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError(f"agent exited with {self.proc.wait()}")
        return json.loads(line)

    def call(self, op: str, **kw):
        """Request and return the result; raise ``AgentError`` carrying the failures."""
        self.send(op, **kw)
        reply = self.recv()
        if not reply["ok"]:
            raise AgentError(reply["error"], reply.get("failures", []), reply.get("type"))
        return reply["result"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class AgentError(Exception):
    def __init__(self, message: str, failures: list, type_: str | None) -> None:
        super().__init__(message)
        self.failures = failures
        self.type = type_


# -- code that runs INSIDE the namespace -----------------------------------


def _arp_probe(fd: int, vnet_hdr: bool, guest_mac: str, guest_ip: str, target: str, timeout: float) -> str | None:
    """Act as the guest: ARP for ``target`` on the tap; return the MAC that answered."""
    mac = bytes.fromhex(guest_mac.replace(":", ""))
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, socket.inet_aton(guest_ip),
                      b"\0" * 6, socket.inet_aton(target))
    frame = b"\xff" * 6 + mac + b"\x08\x06" + arp
    hdr = b"\0" * 10 if vnet_hdr else b""
    deadline = time.monotonic() + timeout
    next_send = 0.0
    while time.monotonic() < deadline:
        if time.monotonic() >= next_send:
            os.write(fd, hdr + frame)
            next_send = time.monotonic() + 0.3
        r, _, _ = select.select([fd], [], [], 0.05)
        if not r:
            continue
        data = os.read(fd, 65536)[len(hdr):]
        if len(data) >= 42 and data[12:14] == b"\x08\x06":
            op, sha, spa = struct.unpack_from("!6x H 6s 4s", data, 14)
            if op == 2 and socket.inet_ntoa(spa) == target:
                return sha.hex(":")
    return None


def agent_main() -> None:
    # Replies go to the original stdout; anything else printed (structlog) goes to stderr.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from netconf import Executor, Hooks, Journal, Nic, open_tap, plan

    taps, journals = {}, {}

    def executor(req):
        path = req["journal"]
        if path not in journals:
            journals[path] = Journal(path)
        hooks = Hooks(req["hooks_dir"]) if req.get("hooks_dir") else None
        return Executor(journals[path], hooks=hooks, ovs_db=req.get("ovs_db"))

    def handle(req):
        op = req["op"]
        if op == "open_tap":
            h = taps[req["name"]] = open_tap(req["name"], req.get("queues", 1))
            return {"fds": len(h.fds), "vnet_hdr": h.vnet_hdr}
        if op == "close_tap":
            taps.pop(req["name"]).close()
            return None
        if op == "apply":
            return executor(req).apply(plan(Nic.from_dict(req["nic"]), req["phase"]), reason=req["reason"])
        if op == "undo":
            return executor(req).undo(reason=req["reason"], phases=req.get("phases"), nic_id=req.get("nic_id"))
        if op == "recover":
            return executor(req).recover(reason=req["reason"])
        if op == "journal":
            ex = executor(req)
            return [dict(e) for e in ex.journal.entries.values()]
        if op == "arp_probe":
            h = taps[req["tap"]]
            return _arp_probe(h.fds[0], h.vnet_hdr, req["mac"], req["ip"], req["target"], req.get("timeout", 2.0))
        if op == "check_link":
            from netconf import check_link

            return check_link(Nic.from_dict(req["nic"]), req.get("index"), ovs_db=req.get("ovs_db"))
        if op == "spawn":
            # e.g. qemu with the tap's fds; the test kills it by the returned pid
            fds = taps[req["tap"]].fds if req.get("tap") else []
            argv = [a.replace("{fd}", str(fds[0]) if fds else "") for a in req["argv"]]
            with open(req["log"], "wb") as log:
                p = subprocess.Popen(argv, pass_fds=fds, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            return p.pid
        raise ValueError(f"unknown op {op}")

    for line in sys.stdin:
        req = json.loads(line)
        try:
            reply = {"ok": True, "result": handle(req)}
        except Exception as e:  # noqa: BLE001 -- reported to the test, which decides
            reply = {"ok": False, "error": str(e), "type": type(e).__name__,
                     "failures": getattr(e, "failures", [])}
        replies.write(json.dumps(reply, default=str) + "\n")
        replies.flush()


if __name__ == "__main__":
    agent_main()
