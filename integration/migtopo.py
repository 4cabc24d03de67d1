"""The two-node migration topology from DESIGN.md, for tests and the demo.

::

    client ns:  bridge "lan" 192.168.100.1/24, route 10.99.0.0/24 dev lan (on-link: the
                client ARPs for guests and the node holding the /32 answers by proxy ARP)
       |-- veth --> nodeA "uplink" 192.168.100.2 (proxy_arp=1, forwarding, default via client)
       |-- veth --> nodeB "uplink" 192.168.100.3
    nodeA "mig" 10.200.0.1/30 <-- veth --> nodeB "mig" 10.200.0.2/30   (the migration stream)

Each node runs its own `qsup serve` (own state dir, run dir and API socket).
Bridged mode: each node also has bridge br0 with a port "lanbr" on the client's lan.
"""

from __future__ import annotations

import math
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from guestcheck import check_guest, netns_ping, qsup_console_reader
from topo import VENV_BIN, Netns, QsupDaemon, veth

HERE = Path(__file__).resolve().parent
MAKE_CA = HERE.parent / "contrib" / "make-test-ca"
API_PORT = 8420  # each node's TLS API listener, on its end of the migration link


#: The migration tests' busy guest (kernel command line): memcheck rewrites 24 MiB at 100 MiB/s
#: and verifies every page it rewrites, so a migration at QEMU's default limits takes several
#: passes, and a page lost on the way shows as MEMCHECK-MISMATCH on the console.
BUSY = "guest.dirty=100 guest.dirty_mb=24"


def assert_guest_whole(topo: "TwoNodes", daemon: QsupDaemon, name: str, addr: str, *, busy: bool,
                       timeout: float = 30.0) -> None:
    """The guest on ``daemon`` answers the client, its console shows no virtio error, oops or
    panic, and (busy) its memory workload has verified a full sweep there.  Every migration
    test calls this: a migration whose guest fails it is a failed test."""
    check_guest(qsup_console_reader(daemon.state_dir, name), netns_ping(topo.client.name, addr),
                busy=busy, timeout=timeout)


class TwoNodes:
    def __init__(self, workdir: Path, prefix: str = "qst"):
        self.workdir = workdir
        self.made: list[Netns] = []
        self.daemons: list[QsupDaemon] = []
        try:
            self._build(prefix)
        except BaseException:
            self.close()  # the namespaces made so far
            raise

    def _build(self, prefix: str) -> None:
        self.client = self._ns(prefix)
        self.a = self._ns(prefix)
        self.b = self._ns(prefix)
        c = self.client
        c.run("ip", "link", "add", "lan", "type", "bridge")
        c.run("ip", "link", "set", "lan", "up")
        c.run("ip", "addr", "add", "192.168.100.1/24", "dev", "lan")
        c.run("ip", "route", "add", "10.99.0.0/24", "dev", "lan")
        c.run("sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=0")
        for i, (node, letter) in enumerate(((self.a, "a"), (self.b, "b"))):
            veth(node, "uplink", c, f"to{letter}")
            c.run("ip", "link", "set", f"to{letter}", "master", "lan")
            node.run("ip", "addr", "add", f"192.168.100.{2 + i}/24", "dev", "uplink")
            node.run("ip", "route", "add", "default", "via", "192.168.100.1")
            node.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv4.conf.uplink.proxy_arp=1")
            # bridged mode: br0 with a port on the client's lan
            veth(node, "lanbr", c, f"br{letter}")
            c.run("ip", "link", "set", f"br{letter}", "master", "lan")
            node.run("ip", "link", "add", "br0", "type", "bridge")
            node.run("ip", "link", "set", "br0", "up")
            node.run("ip", "link", "set", "lanbr", "master", "br0")
        veth(self.a, "mig", self.b, "mig")
        self.a.run("ip", "addr", "add", "10.200.0.1/30", "dev", "mig")
        self.b.run("ip", "addr", "add", "10.200.0.2/30", "dev", "mig")

    def _ns(self, prefix: str) -> Netns:
        ns = Netns(prefix)
        self.made.append(ns)
        return ns

    def start_daemons(self, extra_config: str = "", hooks: dict | None = None, *,
                      tls: bool = False) -> tuple[QsupDaemon, QsupDaemon]:
        """One ``qsup serve`` per node; ``hooks`` maps "a"/"b" to a node's hooks_dir.

        Each node declares the other in ``[peers]`` (so ``qsup migrate NAME --to
        node-b``): a ``unix:`` API with the peer's migration address ``10.200.0.x``, or,
        with ``tls``, ``https://10.200.0.x:8420`` -- both APIs listen on the migration link,
        certificates from ``contrib/make-test-ca`` (made here, in the work dir), and the
        migration stream is QEMU TLS.  ``daemon.node_name`` is what ``--to`` takes.

        Each daemon is registered for ``close()`` *before* it is waited for, so one
        that never gets ready is still killed by the teardown.
        """
        hooks = hooks or {}
        made = []
        nodes = ((self.a, "a", "10.200.0.1"), (self.b, "b", "10.200.0.2"))
        pki = self.workdir / "pki"
        if tls and not (pki / "ca.pem").exists():
            subprocess.run([str(MAKE_CA), str(pki), *(f"node-{x}={addr}" for _, x, addr in nodes)], check=True)
        for node, letter, addr in nodes:
            d = self.workdir / f"node-{letter}"
            d.mkdir(exist_ok=True)
            other, other_addr = next((x, a) for _, x, a in nodes if x != letter)
            if tls:
                own = (f'tls_ca = "{pki}/ca.pem"\ntls_cert = "{pki}/node-{letter}.pem"\n'
                       f'tls_key = "{pki}/node-{letter}-key.pem"\nlisten = "{addr}:{API_PORT}"\n')
                peer = f'"node-{other}" = "https://{other_addr}:{API_PORT}"\n'
            else:
                own = ""
                peer = (f'"node-{other}" = {{ api = "unix:{self.workdir}/node-{other}/qsup.sock", '
                        f'migration = "{other_addr}" }}\n')
            run_dir = None
            if tls:
                # QEMU (its own uid) reads its TLS creds from <run_dir>/tls/ when the migration
                # starts: every directory above must be searchable by it -- /run/qsup is, but
                # pytest's tmp dirs are 0700.  So these run dirs live in a 0711 dir of /tmp.
                self._shared = getattr(self, "_shared", None) or Path(tempfile.mkdtemp(prefix="qsup-tls-"))
                self._shared.chmod(0o711)
                run_dir = self._shared / f"run-{letter}"
            dm = QsupDaemon(node, d, hooks_dir=hooks.get(letter), start=False, run_dir=run_dir,
                            extra_config=f'node_name = "node-{letter}"\nmigration_address = "{addr}"\n'
                                         f'announce_interfaces = ["uplink"]\n'
                                         # the post-copy tests: QEMU 7.2 needs userfaultfd, which
                                         # an unprivileged QEMU only gets host-wide (see README)
                                         'allow_root_postcopy = true\n' + own + extra_config
                                         + "\n[peers]\n" + peer)
            dm.node_name = f"node-{letter}"
            self.daemons.append(dm)
            made.append(dm)
        for dm in made:
            dm.start()
        return made[0], made[1]

    def close(self) -> list[int]:
        leaked = []
        for d in self.daemons:
            leaked += d.close()
        for ns in reversed(self.made):
            ns.close()
        if getattr(self, "_shared", None) is not None:
            shutil.rmtree(self._shared, ignore_errors=True)
        return leaked


class RouteSampler:
    """route_sampler.py in a node namespace; transitions read back after stop()."""

    def __init__(self, ns: Netns, addr: str, out: Path):
        self.out = out
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns.name, str(VENV_BIN / "python"),
                                      str(HERE / "route_sampler.py"), addr, str(out)],
                                     stdout=subprocess.PIPE, text=True)
        ready = self.proc.stdout.readline().strip()
        if ready != "ready":
            self.kill()
            raise RuntimeError(f"route sampler did not start: {ready!r}")

    def kill(self) -> None:
        """Last resort (a failed test): SIGKILL it by pid; idempotent."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()

    def stop(self) -> list[tuple[float, int]]:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()
        return self._read()

    def present(self) -> bool:
        """Did the sampler ever see the route?  (Read while it runs or after stop().)"""
        return any(v for _, v in self._read())

    def _read(self) -> list[tuple[float, int]]:
        rows = []
        for line in self.out.read_text().splitlines():
            t, v = line.split()[:2]
            if v != "end":
                rows.append((float(t), int(v)))
        return rows


def intervals(transitions: list[tuple[float, int]], t_end: float) -> list[tuple[float, float]]:
    """Present-intervals [(start, end)] from transitions."""
    res, start = [], None
    for t, v in transitions:
        if v and start is None:
            start = t
        elif not v and start is not None:
            res.append((start, t))
            start = None
    if start is not None:
        res.append((start, t_end))
    return res


def overlap_and_gap(a: list, b: list, t_end: float) -> tuple[float, float]:
    """Seconds both held the route; and the longest time neither did after A first held it."""
    ia, ib = intervals(a, t_end), intervals(b, t_end)
    overlap = sum(max(0.0, min(x1, y1) - max(x0, y0)) for x0, x1 in ia for y0, y1 in ib)
    # gap: from A's last release to B's first acquisition after it
    gap = 0.0
    if ia and ib:
        a_release = ia[-1][1] if ia[-1][1] < t_end else None
        b_start = [s for s, _ in ib if a_release is not None and s >= a_release]
        if a_release is not None and b_start:
            gap = b_start[0] - a_release
    return overlap, gap


class PingError(RuntimeError):
    """ping's output has no totals line: nothing can be said about loss."""


#: an echo *reply* (``ping -D``); "From X icmp_seq=N Destination Host Unreachable" is not one
_REPLY = re.compile(r"^\[\d+\.\d+\] \d+ bytes from \S+: icmp_seq=(\d+) ", re.M)
_TOTALS = re.compile(r"^(\d+) packets transmitted, (\d+) received", re.M)


def ping_counts(out: str) -> dict:
    """Loss from ping's own totals ("N packets transmitted, M received").

    ``lost`` counts every request without a reply -- before, during and after the
    migration -- except the last one sent, when it has no reply: ping was interrupted
    less than one interval after sending it, so its reply may still have been on its
    way.  ``seqs`` are the sequence numbers of real echo replies (error lines such
    as "Destination Host Unreachable" carry an icmp_seq too, and are not replies).
    Output without the totals line raises :class:`PingError`.
    """
    m = _TOTALS.search(out)
    if not m:
        raise PingError(f"no totals in ping's output: {out[-500:]!r}")
    sent, received = int(m.group(1)), int(m.group(2))
    seqs = sorted({int(x) for x in _REPLY.findall(out)})
    if len(seqs) != received:
        raise PingError(f"ping says {received} received but printed {len(seqs)} replies: {out[-500:]!r}")
    in_flight = 1 if sent and sent not in seqs else 0
    return {"sent": sent, "received": received, "lost": sent - received - in_flight, "seqs": seqs}


class Pinger:
    """`ping -i 0.01 -D` from the client, its output read as it comes; loss from its totals."""

    def __init__(self, ns: Netns, addr: str):
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns.name, "ping", "-n", "-D", "-i", "0.01",
                                      "-W", "1", addr], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self._lines: list[str] = []
        self._replies = 0
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self._lines.append(line)
                if _REPLY.match(line):
                    self._replies += 1
                self._cond.notify_all()

    def wait_replies(self, n: int, timeout: float = 20) -> None:
        """Block until ``n`` more echo replies arrived than when called (not a sleep: a condition)."""
        with self._cond:
            target = self._replies + n
            if not self._cond.wait_for(lambda: self._replies >= target or self.proc.poll() is not None,
                                       timeout=timeout):
                raise TimeoutError(f"fewer than {n} ping replies in {timeout}s: {''.join(self._lines[-5:])!r}")
            if self._replies < target:
                raise RuntimeError(f"ping exited ({self.proc.returncode}): {''.join(self._lines[-5:])!r}")

    def stop(self) -> dict:
        """SIGINT ping (it prints its totals) and count; raises PingError on unparsable output."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)
        self.proc.stdout.close()
        return ping_counts("".join(self._lines))


def loss_budget(downtime_ms: float) -> int:
    return math.ceil((downtime_ms + 20) / 10)


# --- measurement helpers shared by integration/bench/migration_bench.py and integration/demo.py ---

def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (no interpolation): with 20 samples p99 is the maximum."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


class MigrationWatch:
    """Both nodes' route samplers and the client's 10 ms pinger around one migration.

    ``src_ns``/``dst_ns`` are the namespaces of the node that holds the route now and
    the one that should hold it after; ``result()`` stops everything and returns the
    overlap/gap (ms) measured from the samplers and the ping counts.  Use it as a
    context manager (or call ``close()`` in a ``finally``): whatever happens, nothing
    it started keeps running.
    """

    def __init__(self, topo: TwoNodes, src_ns: Netns, dst_ns: Netns, addr: str, outdir: Path, tag: str = ""):
        self._started: list = []
        try:
            self.src = self._start(RouteSampler, src_ns, addr, outdir / f"route-src{tag}.txt")
            self.dst = self._start(RouteSampler, dst_ns, addr, outdir / f"route-dst{tag}.txt")
            self.ping = self._start(Pinger, topo.client, addr)
        except BaseException:
            self.close()
            raise
        self._result: dict | None = None

    def _start(self, cls, *args):
        obj = cls(*args)
        self._started.append(obj)
        return obj

    def __enter__(self) -> "MigrationWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kill whatever still runs (a failed test); a no-op after ``result()``."""
        for obj in self._started:
            if obj.proc.poll() is None:
                obj.proc.kill()
                obj.proc.wait()

    def result(self) -> dict:
        if self._result is not None:
            return self._result
        try:
            ping = self.ping.stop()
            t_end = time.time()
            rs, rd = self.src.stop(), self.dst.stop()
        finally:
            self.close()
        overlap, gap = overlap_and_gap(rs, rd, t_end)
        seqs = ping.pop("seqs")
        holes = [(x, y) for x, y in zip(seqs, seqs[1:]) if y - x > 1]
        self._result = {"overlap_ms": round(overlap * 1000, 3), "gap_ms": round(gap * 1000, 3),
                        "src_routes": rs, "dst_routes": rd, "ping": ping, "ping_holes": holes,
                        "dst_has_route": bool(rd and rd[-1][1]), "src_has_route": bool(rs and rs[-1][1])}
        return self._result


def event_line(node: str, ev: dict, width: int = 100) -> str:
    """One compact line per event: node, seq, time, instance, type, then the other fields."""
    import json

    skip = ("seq", "ts", "instance", "type", "spec")
    extra = " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in ev.items() if k not in skip)
    ts = time.strftime("%H:%M:%S", time.localtime(ev.get("ts", 0))) + f".{int(ev.get('ts', 0) * 1000) % 1000:03d}"
    line = f"{node:<7}{ev.get('seq', 0):>5} {ts} {ev.get('instance') or '-':<8} {ev.get('type', '?'):<26} {extra}"
    return line if len(line) <= width + 60 else line[:width + 57] + "..."


def live_qemu_pids(daemons: list[QsupDaemon]) -> set[int]:
    """The QEMU pids the daemons report right now (``qsup ls --json``), incoming ones included.

    Why: QsupDaemon.close() finds QEMUs through ``instance.started`` events, and a
    migration destination's QEMU has none (its daemon logs ``instance.starting
    incoming=true`` and ``migration.prepared``, without a pid), so after a migration the
    guest's QEMU would outlive the test.  Ask the daemons while they still run.
    """
    import json

    pids = set()
    for d in daemons:
        try:
            r = d.cli("ls", "--json", check=False, timeout=10)
            pids |= {v["pid"] for v in json.loads(r.stdout) if v.get("pid")} if r.returncode == 0 else set()
        except (ValueError, subprocess.TimeoutExpired):
            pass
    return pids


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot): with the pid, a process's identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def close_nodes(t: TwoNodes, pids: set[int] = frozenset()) -> list[int]:
    """TwoNodes.close(), then SIGKILL (by pid) the QEMUs in ``pids`` + those the daemons report.

    A pid is killed only while it is still the same process: a QEMU (``guest=`` in its
    command line) with the start time it had when it was collected (a recorded pid may have
    been reused; QEMU's command line no longer names the work dir: it gets fds, not paths).
    Returns the pids that would not die.
    """
    import os
    import signal

    from topo import pid_alive

    pids = set(pids) | live_qemu_pids(t.daemons)
    starts = {p: _start_time(p) for p in pids}
    leaked = set(t.close())
    starts.update({p: _start_time(p) for p in leaked if p not in starts})
    mine = lambda p: pid_alive(p) and b"guest=" in _cmdline(p) and \
        starts.get(p) is not None and _start_time(p) == starts[p]  # noqa: E731
    for pid in pids:
        if mine(pid):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(mine(p) for p in pids | leaked) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = sorted(p for p in pids | leaked if mine(p))
    if left:
        print(f"warning: qemu pids would not die: {left}", file=sys.stderr)
    return left


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
