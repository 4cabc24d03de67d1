"""Two real nodes for the model test (integration/test_model.py), and what can be observed on them.

The nodes are migtopo.TwoNodes (a client and two node namespaces joined by veths), each
with its own ``qsup serve``.  The guests are cheap on purpose: a 64-byte multiboot
"kernel" (:func:`write_halt_kernel`) whose only instructions are ``cli; hlt``, in 32 MiB,
so a QEMU starts in ~100 ms, idles at ~0 % CPU under TCG and migrates in well under a
second.  A migration that must still be in flight when it is cancelled is throttled to
a few hundred bytes per second instead of being raced.

Everything observed here is read from the system, not from qsup's answers:

* QEMU processes: every process whose network namespace is the node's and whose
  executable is QEMU (``/proc/PID/ns/net``, ``/proc/PID/exe``), with its ``-name``;
* taps (``qs*`` links), the routes to the guests' addresses in every table, the
  ``iif qs*`` rules, the records under ``<state_dir>/instances``;
* the event log, read straight from ``events.db`` (read-only), so it can be checked
  while the daemon is dead too.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import struct
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from migtopo import TwoNodes
from supervisor._config import Config
from topo import LeftQemu, Netns, QsupDaemon, kill_qemus, pid_alive

QEMU_EXE = "qemu-system-x86_64"
#: the node config declares peers (issue 9): ``migrate`` then names a peer, not a socket
PEERS = "peers" in Config.model_fields
#: each node's end of migtopo's "mig" veth: where its incoming migrations listen
MIG_ADDR = {"a": "10.200.0.1", "b": "10.200.0.2"}


def write_halt_kernel(path: Path) -> Path:
    """A multiboot image (a.out kludge: loaded at 1 MiB, entry right after the header) that halts.

    ``cli; hlt; jmp .-1``: with interrupts off the vCPU stays halted, so TCG has nothing
    to run and an ACPI power button is ignored (a stop escalates to ``quit``).
    """
    magic, flags = 0x1BADB002, 0x00010000
    load = 0x100000
    header = struct.pack("<IIiIIIII", magic, flags, -(magic + flags), load, load, 0, 0, load + 0x20)
    code = bytes([0xFA, 0xF4, 0xEB, 0xFD])
    path.write_bytes((header.ljust(0x20, b"\0") + code).ljust(64, b"\0"))
    return path


def netns_inode(ns: Netns) -> int:
    return os.stat(f"/run/netns/{ns.name}").st_ino


@dataclass
class QemuSeen:
    pid: int
    name: str | None  # from ``-name guest=NAME,...``


def qemus_in(ns: Netns) -> dict[int, QemuSeen]:
    """Every live QEMU process in ``ns`` (zombies excluded), by pid."""
    ino = netns_inode(ns)
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        pid = int(d)
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino != ino:
                continue
            if os.path.basename(os.readlink(f"/proc/{pid}/exe")) != QEMU_EXE:
                continue
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not pid_alive(pid):
            continue
        name = None
        for i, a in enumerate(argv[:-1]):
            if a == b"-name":
                m = re.match(rb"guest=([^,]+)", argv[i + 1])
                name = m.group(1).decode() if m else None
        out[pid] = QemuSeen(pid, name)
    return out


@dataclass
class Observed:
    """One node as the system shows it."""

    qemus: dict[int, QemuSeen]
    taps: set[str]
    routes: set[str]  # guest addresses with a route in any table
    rules: set[str]  # the iif of every rule whose iif is a qsup tap
    records: set[str]
    views: dict[str, dict] | None  # GET /v1/instances by name; None: the daemon is down


class Node:
    """One node of the model test: its namespace, its daemon, an HTTP client on its socket."""

    def __init__(self, letter: str, ns: Netns, daemon: QsupDaemon):
        self.letter = letter
        self.ns = ns
        self.daemon = daemon
        self._http: httpx.Client | None = None

    @property
    def up(self) -> bool:
        return self.daemon.proc is not None and self.daemon.proc.poll() is None

    def http(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.daemon.socket)),
                                      base_url="http://qsup", timeout=60)
        return self._http

    def call(self, method: str, path: str, *, ok: tuple[int, ...] = (200, 201, 202), **kw) -> httpx.Response:
        r = self.http().request(method, path, **kw)
        if r.status_code not in ok:
            raise AssertionError(f"node-{self.letter}: {method} {path} -> {r.status_code} {r.text}"
                                 f"\ndaemon log: {self.daemon.log()[-2000:]}")
        return r

    def view(self, name: str) -> dict | None:
        r = self.call("GET", f"/v1/instances/{name}", ok=(200, 404))
        return r.json() if r.status_code == 200 else None

    def kill_daemon(self) -> None:
        self.daemon.kill()  # SIGKILL by pid
        self.close_http()

    def start_daemon(self) -> None:
        self.daemon.start()

    def close_http(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def events(self) -> list[dict]:
        """The whole event log, from the file (the daemon may be dead)."""
        db = self.daemon.state_dir / "events.db"
        if not db.exists():
            return []
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            rows = con.execute("SELECT seq, body FROM events ORDER BY seq").fetchall()
        finally:
            con.close()
        evs = []
        for seq, body in rows:
            ev = json.loads(body)
            ev.setdefault("seq", seq)
            evs.append(ev)
        return evs

    def observe(self, addresses: set[str]) -> Observed:
        links = {l["ifname"] for l in self.ns.json("link", "show")}
        routes = set()
        for r in self.ns.json("route", "show", "table", "all"):
            dst = r.get("dst", "")
            if dst in addresses:
                routes.add(dst)
        rules = {r["iif"] for r in self.ns.json("rule", "show") if r.get("iif", "").startswith("qs")}
        inst_dir = self.daemon.state_dir / "instances"
        records = {p.name for p in inst_dir.iterdir()} if inst_dir.is_dir() else set()
        views = None
        if self.up:
            views = {v["name"]: v for v in self.call("GET", "/v1/instances").json()["instances"]}
        return Observed(qemus=qemus_in(self.ns), taps={l for l in links if l.startswith("qs")},
                        routes=routes, rules=rules, records=records, views=views)


@dataclass
class ModelNodes:
    """TwoNodes + one daemon per node, configured for quick steps; ``close()`` removes everything."""

    workdir: Path
    topo: TwoNodes = field(init=False)
    nodes: dict[str, Node] = field(init=False, default_factory=dict)

    def __post_init__(self):
        self.topo = TwoNodes(self.workdir, prefix="qsm")
        try:
            for ns, letter in ((self.topo.a, "a"), (self.topo.b, "b")):
                addr = MIG_ADDR[letter]
                d = self.workdir / f"node-{letter}"
                d.mkdir(exist_ok=True)
                # the halted guest ignores the ACPI button: don't wait long for it
                dm = QsupDaemon(ns, d, start=False, powerdown_timeout=0.5,
                                extra_config=f'node_name = "node-{letter}"\nmigration_address = "{addr}"\n'
                                             + self._peers(letter))
                self.topo.daemons.append(dm)  # killed by TwoNodes.close() whatever happens
                self.nodes[letter] = Node(letter, ns, dm)
            for n in self.nodes.values():
                n.start_daemon()
        except BaseException:
            self.close()
            raise

    def _peers(self, letter: str) -> str:
        """The other node as a declared peer (``[peers]``, its API on its unix socket)."""
        if not PEERS:
            return ""
        o = "b" if letter == "a" else "a"
        sock = self.workdir / f"node-{o}" / "qsup.sock"
        return f'[peers]\nnode-{o} = {{ api = "unix:{sock}", migration = "{MIG_ADDR[o]}" }}\n'

    def migration_target(self, letter: str) -> str:
        """What ``to`` names for a migration to node ``letter``: its peer name (or socket path)."""
        return f"node-{letter}" if PEERS else str(self.nodes[letter].daemon.socket)

    def close(self) -> list[int]:
        """The leak check, then remove everything; returns the QEMUs that are a leak (empty: clean).

        Both daemons' instance lists are read, then both are SIGKILLed (a live daemon would
        start or adopt more), then each daemon's leak check runs (``QsupDaemon.close``: a live
        QEMU started under its state dir that is in neither its instance list nor its records
        is reported, and all are killed by pid).  A QEMU still in a node namespace after that
        was not started under its daemon's state dir: reported too, then killed by pid.
        """
        for n in self.nodes.values():
            n.close_http()
        listed = {k: n.daemon.instance_pids() for k, n in self.nodes.items()}
        for n in self.nodes.values():
            n.daemon.kill()
        left: list[int] = []
        for k, n in self.nodes.items():
            left += n.daemon.close(instances=listed[k])
        strays: set[int] = set()
        for ns in self.topo.made[1:]:  # the node namespaces (made[0] is the client)
            try:
                found = set(qemus_in(ns))
            except OSError:
                continue
            strays |= found
            left += [LeftQemu(p, f"in {ns.name}, not started under its daemon's state dir") for p in sorted(found)]
        left += kill_qemus(strays)
        left += self.topo.close()  # the namespaces (the daemons' checks again: nothing left to find)
        return left
