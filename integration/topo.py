"""Test topology helpers: network namespaces and a `qsup run` driven inside one.

Everything here is for tests only, so forking `ip` is fine.  Every object
tracks what it created and removes exactly that in ``close()``; processes
are killed by the pid we started, never by name.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
#: The QEMU the daemons under test run: the supported 10.0.2 (`make qemu10`; QEMU 7.2's TCG corrupts
#: migrating guests, docs/ARCHITECTURE.md "Guest integrity").  QSUP_TEST_QEMU overrides it;
#: QEMU_DEBIAN is Debian 12's 7.2, for the tests that cover it.
QEMU = os.environ.get("QSUP_TEST_QEMU") or "/usr/local/lib/qsup-qemu-10.0/usr/bin/qemu-system-x86_64"
QEMU_DEBIAN = "/usr/bin/qemu-system-x86_64"


def qemu_line(extra_config: str) -> str:
    """The config's ``qemu`` key: QEMU, unless the test's own config names one."""
    return "" if re.search(r"(?m)^qemu\s*=", extra_config) else f'qemu = "{QEMU}"\n'


def plain_migration_line(extra_config: str) -> str:
    """Test topologies migrate between namespaces over their uplink addresses; without TLS
    that needs the operator's opt-in (README, ``allow_plain_migration_network``)."""
    if re.search(r"(?m)^(tls_ca|allow_plain_migration_network)\s*=", extra_config):
        return ""
    return "allow_plain_migration_network = true\n"


GUEST = ROOT / "build" / "guest"


def image_dirs(workdir: Path) -> list[str]:
    """What a test daemon's ``image_dirs`` allows: the test guest, and the scratch tree the test
    writes its own kernels and disks in -- the top directory under the system temp dir that holds
    ``workdir`` (``/tmp/pytest-of-root`` for pytest's, a bench's ``mkdtemp``), else ``workdir``."""
    import tempfile

    tmp = Path(tempfile.gettempdir()).resolve()
    w = workdir.resolve()
    scratch = tmp / w.relative_to(tmp).parts[0] if w.is_relative_to(tmp) and w != tmp else w
    return [str(GUEST), str(scratch)]


def image_dirs_line(workdir: Path, extra_config: str) -> str:
    """The config's ``image_dirs`` (:func:`image_dirs`), unless the test's own config names them."""
    if re.search(r"(?m)^image_dirs\s*=", extra_config):
        return ""
    return f"image_dirs = {json.dumps(image_dirs(workdir))}\n"
_counter = itertools.count()

#: Every network namespace prefix the integration tests (and demos) use, defined once.  A
#: namespace is named ``<prefix><pid % 100000>-<n>`` (:func:`netns_name`: the pid of the process
#: that made it), so the session's leak check (conftest.py, :func:`leaked_namespaces`) sees
#: every namespace this pytest process made, whatever its prefix; ``netns_name`` refuses a
#: prefix that is not listed here.
NETNS_PREFIXES = (
    "qst",  # the default: Netns(), netns_factory, TwoNodes, the cluster harness, netconf fixtures
    "qsm",  # the model test's nodes (modelnodes.py)
    "qtl",  # TLS migration (test_tls_migration.py)
    "qjl",  # jailed nodes over TLS (test_qemu_jail.py)
    "qpe",  # peers (test_peers.py)
    "qsncc",  # the netconf gateway test's client (netconf/test_netconf_gateway.py)
    "qsan-nbr", "qsan-nodeB",  # neighbour announcements (netconf_announce/test_announce.py)
    "qdemo", "qdc",  # demo.py, demo_cluster.py
    "qmb", "qmt",  # bench/migration_bench.py: plain and TLS topologies
)


def netns_name(prefix: str = "qst") -> str:
    """A new namespace name of this process: ``<prefix><pid % 100000>-<n>``."""
    if prefix not in NETNS_PREFIXES:
        raise ValueError(f"netns prefix {prefix!r} is not in topo.NETNS_PREFIXES: add it there, "
                         "or the session's leak check would not see its namespaces")
    return f"{prefix}{os.getpid() % 100000}-{next(_counter)}"


def leaked_namespaces(pid: int | None = None) -> list[str]:
    """Namespaces that process ``pid`` (default: this one) made with :func:`netns_name`, any
    prefix of :data:`NETNS_PREFIXES`, that still exist."""
    import re

    tag = (os.getpid() if pid is None else pid) % 100000
    ours = re.compile(rf"(?:{'|'.join(map(re.escape, NETNS_PREFIXES))}){tag}-\d+")
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return [l.split()[0] for l in out.splitlines() if l.strip() and ours.fullmatch(l.split()[0])]


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(ok: object, what: str) -> None:
    """Skip the calling test unless ``ok`` (``what``: the missing tool: the guest, openssl, QEMU);
    under CI (``CI`` set, not ``false``/``0``), where ``make deps guest`` installed everything,
    fail instead: there a skip would be a test that silently never ran.  (tests/needs.py: the
    same for the unit tests.)"""
    if ok:
        return
    import pytest

    if under_ci():
        pytest.fail(f"{what} (CI: a missing tool fails the run instead of skipping)", pytrace=False)
    pytest.skip(what)


def sh(*argv: str, check: bool = True, ns: str | None = None, timeout: float = 30) -> str:
    if ns:
        argv = ("ip", "netns", "exec", ns, *argv)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


class Netns:
    """A network namespace with lo up; deleted on close()."""

    def __init__(self, prefix: str = "qst"):
        self.name = netns_name(prefix)
        sh("ip", "netns", "add", self.name)
        self.run("ip", "link", "set", "lo", "up")

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> str:
        return sh(*argv, check=check, ns=self.name, timeout=timeout)

    def json(self, *argv: str):
        out = self.run("ip", "-j", *argv)
        return json.loads(out) if out.strip() else []

    def links(self) -> set[str]:
        return {l["ifname"] for l in self.json("link", "show")}

    def read(self, path: str) -> str:
        """A /proc or /sys file as seen from inside the namespace."""
        return self.run("cat", path).strip()

    def sysctl(self, key: str) -> str:
        return self.read("/proc/sys/" + key.replace(".", "/"))

    def ping(self, addr: str, count: int = 3, timeout: float = 20) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = subprocess.run(["ip", "netns", "exec", self.name, "ping", "-c", "1", "-W", "1", addr],
                               capture_output=True)
            if r.returncode == 0:
                ok = subprocess.run(["ip", "netns", "exec", self.name, "ping", "-c", str(count),
                                     "-i", "0.2", "-W", "2", addr], capture_output=True)
                return ok.returncode == 0
        return False

    def close(self) -> None:
        sh("ip", "netns", "del", self.name, check=False)


def veth(a: Netns, a_if: str, b: Netns, b_if: str) -> None:
    """A veth pair with one end in each namespace, both up."""
    a.run("ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name)
    a.run("ip", "link", "set", a_if, "up")
    b.run("ip", "link", "set", b_if, "up")


def node_with_uplink(node: Netns, client: Netns, n: int = 1) -> None:
    """Join ``node`` to ``client`` with a /24 and give the node a default route.

    A routed node needs a route covering the guest's on-link gateway
    169.254.0.1 outside the tap, or proxy ARP will not answer for it; a real
    node has its default route, so the test node gets one too.
    """
    veth(node, "uplink", client, f"down{n}")
    node.run("ip", "addr", "add", f"192.168.{100 + n}.1/24", "dev", "uplink")
    client.run("ip", "addr", "add", f"192.168.{100 + n}.2/24", "dev", f"down{n}")
    node.run("ip", "route", "add", "default", "via", f"192.168.{100 + n}.2")
    # A routed node forwards between its uplink and the taps.
    node.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")


def guest_paths() -> tuple[str, str]:
    k, i = GUEST / "vmlinuz", GUEST / "initrd.img"
    if not (k.exists() and i.exists()):
        raise RuntimeError("guest image missing: run `make guest` (make test does it)")
    return str(k), str(i)


def guest_spec(name: str, nics: list[dict], append: str = "", **kw) -> dict:
    k, i = guest_paths()
    return {"name": name, "memory": 192, "kernel": k, "initrd": i,
            "append": f"console=ttyS0 quiet panic=-1 {append}".strip(), "nics": nics, **kw}


#: events that carry the pid of a QEMU the daemon started (or took over)
PID_EVENTS = ("instance.started", "migration.prepared", "instance.reattached", "instance.upgrade_spawned")


def qemu_pids_of(events: list[dict]) -> set[int]:
    return {e["pid"] for e in events if e.get("type") in PID_EVENTS and e.get("pid")}


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict ("Uid" -> "60001\t60001\t60001\t60001", "Seccomp" -> "2", ...)."""
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def seccomp_filters(pid: int) -> int:
    """How many seccomp filters process ``pid`` runs under (``Seccomp_filters`` in /proc/PID/status)."""
    return int(proc_status(pid)["Seccomp_filters"])


def assert_own_seccomp_filter(qemu_pid: int, daemon_pid: int) -> None:
    """QEMU installed a seccomp filter of its own (``-sandbox``): it runs under more filters
    than the daemon that spawned it.

    ``Seccomp: 2`` alone would also hold for a filter QEMU merely inherited (a daemon under
    systemd's ``SystemCallFilter=``), and ``NoNewPrivs`` is set by the jail helper itself,
    so neither says QEMU's own sandbox is on.
    """
    q, d = proc_status(qemu_pid), proc_status(daemon_pid)
    assert q["Seccomp"] == "2", f"qemu {qemu_pid}: Seccomp {q['Seccomp']} (2: filter mode)"
    assert int(q["Seccomp_filters"]) > int(d["Seccomp_filters"]), (
        f"qemu {qemu_pid} runs under {q['Seccomp_filters']} seccomp filter(s), its daemon {daemon_pid} under "
        f"{d['Seccomp_filters']}: QEMU's own -sandbox filter is not there")


def proc_environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(e.decode().split("=", 1) for e in f.read().split(b"\0") if b"=" in e)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie counts as dead
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot): with the pid, a process's identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])


class LeftQemu(int):
    """A QEMU pid a teardown reports, with why; its repr says both, so an assert message does."""

    why: str

    def __new__(cls, pid: int, why: str) -> LeftQemu:  # noqa: PYI034 - an int subclass
        obj = super().__new__(cls, pid)
        obj.why = why
        return obj

    def __repr__(self) -> str:
        return f"<qemu {int(self)}: {self.why}>"


def qemus_under(state_dir: Path, run_dir: Path | None = None) -> set[int]:
    """Every live process qsup started under ``state_dir``: its stdout or stderr is the FIFO
    ``<run_dir>/<name>/stderr.fifo`` qsup copies into ``<state_dir>/logs/<name>.log`` (how qsup
    starts QEMU, jailed or not), or that log file itself (a QEMU an older qsup started).

    Found by what the process holds open, not by its name: nobody else's QEMU writes there.
    """
    logs = f"{Path(state_dir).resolve()}/logs/"
    fifos = f"{Path(run_dir).resolve()}/" if run_dir is not None else None
    me = os.getpid()
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        for fd in (1, 2):
            try:
                target = os.readlink(f"/proc/{d}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(logs) or (fifos and target.startswith(fifos) and target.endswith("/stderr.fifo")):
                if pid_alive(int(d)):
                    out.add(int(d))
                break
    return out


def recorded_qemu_pids(state_dir: Path) -> set[int]:
    """The QEMUs the records under ``<state_dir>/instances`` hold (pid and start time match):
    what a restarted daemon would take over."""
    out = set()
    for rec in (Path(state_dir) / "instances").glob("*/record.json"):
        try:
            r = json.loads(rec.read_text())
        except (OSError, ValueError):
            continue
        pid = r.get("pid")
        if pid and (r.get("pid_start_time") is None or proc_start_time(pid) == r["pid_start_time"]):
            out.add(pid)
    return out


def unowned_qemus(state_dir: Path, owned: set[int], *, grace: float = 1.0,
                  run_dir: Path | None = None) -> list[LeftQemu]:
    """The live QEMUs started under ``state_dir`` that are not in ``owned`` (what their daemon
    lists and records): each one a QEMU qsup leaked.  One already on its way out (quit, killed
    by the daemon's own teardown) gets ``grace`` seconds to go."""
    suspects = qemus_under(state_dir, run_dir) - set(owned)
    deadline = time.monotonic() + grace
    while any(pid_alive(p) for p in suspects) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [LeftQemu(p, f"started under {state_dir}, alive, and not in its daemon's instances or records")
            for p in sorted(suspects) if pid_alive(p)]


def qemu_leak_check(state_dir: Path, listed: set[int] = frozenset(), run_dir: Path | None = None) -> list[LeftQemu]:
    """The leak check of one qsup (its process already dead), then its QEMUs killed by pid.

    Reported, before anything is killed: a live QEMU started under ``state_dir`` that qsup
    does not own -- not in ``listed`` (its instance list while it ran) nor in a record (what
    the next daemon would take over): a QEMU qsup leaked; and one qsup owns that the search
    under ``state_dir`` did not find (this check would be blind to it).  Then every one of
    them is SIGKILLed by pid; one that survives SIGKILL is reported too.
    """
    owned = {p for p in set(listed) | recorded_qemu_pids(state_dir) if pid_alive(p)}
    left = unowned_qemus(state_dir, owned, run_dir=run_dir)
    found = qemus_under(state_dir, run_dir)
    left += [LeftQemu(p, f"owned by its daemon but not found under {state_dir}: the leak check is blind to it")
             for p in sorted(owned - found) if pid_alive(p) and p not in qemus_under(state_dir, run_dir)]
    return left + kill_qemus(found | owned)


def kill_qemus(pids: set[int], timeout: float = 5) -> list[LeftQemu]:
    """SIGKILL each pid (never by name), wait; returns those that survive."""
    pids = {p for p in pids if pid_alive(p)}
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [LeftQemu(p, "survived SIGKILL") for p in sorted(pids) if pid_alive(p)]


def _env(extra: dict | None) -> dict | None:
    """The environment for a process we start: ours plus ``extra`` (None: inherit as is)."""
    return None if not extra else {**os.environ, **extra}


def qmp(sock: str, cmd: str, args: dict | None = None) -> dict:
    """One command on an instance's *operator* monitor (a second QMP monitor; no daemon needed).

    Returns QEMU's ``return`` value; raises on an ``error`` answer.  Events are skipped.
    """
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(sock)
        f = s.makefile("rwb")

        def call(execute, arguments=None):
            msg = {"execute": execute, **({"arguments": arguments} if arguments else {})}
            f.write(json.dumps(msg).encode() + b"\n")
            f.flush()
            while True:
                r = json.loads(f.readline())
                if "return" in r:
                    return r["return"]
                if "error" in r:
                    raise RuntimeError(f"{execute}: {r['error']}")

        json.loads(f.readline())  # greeting
        call("qmp_capabilities")
        return call(cmd, args)


class _Console:
    """Reading a guest's serial console from a node's state dir."""

    state_dir: Path

    def console(self, name: str) -> str:
        p = self.state_dir / "logs" / f"{name}.console"
        return p.read_text(errors="replace") if p.exists() else ""

    def wait_console(self, name: str, text: str = "GUEST-READY", timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.console(name):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not on {name}'s console: {self.console(name)[-1500:]}")
            time.sleep(0.1)


class QsupRun(_Console):
    """`qsup run SPEC...` in a namespace, its events collected from stdout."""

    def __init__(self, ns: Netns, workdir: Path, specs: list[dict], *, hooks_dir: Path | None = None,
                 powerdown_timeout: float = 3.0, extra_config: str = "", env: dict | None = None):
        self.ns = ns
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.run_dir = workdir / "run"
        cfg = workdir / "qsup.toml"
        cfg.write_text(
            f'state_dir = "{self.state_dir}"\nrun_dir = "{self.run_dir}"\n'
            f'socket = "{workdir}/qsup.sock"\naccel = "tcg"\n{qemu_line(extra_config)}'
            f'{plain_migration_line(extra_config)}{image_dirs_line(workdir, extra_config)}'
            f'powerdown_timeout = {powerdown_timeout}\n'
            + (f'hooks_dir = "{hooks_dir}"\n' if hooks_dir else 'hooks_dir = "/nonexistent-qsup-hooks"\n')
            + extra_config
        )
        paths = []
        for i, s in enumerate(specs):
            p = workdir / f"spec{i}.json"
            p.write_text(json.dumps(s))
            paths.append(str(p))
        self.events: list[dict] = []
        self._q: queue.Queue = queue.Queue()
        self.stderr_path = workdir / "qsup.stderr"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 -- `qsup run`'s stderr for its whole life, closed by close()
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns.name, str(VENV_BIN / "qsup"), "run", "--json",
             "--config", str(cfg), *paths],
            stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=_env(env),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            ev["_rx"] = time.time()
            self.events.append(ev)
            self._q.put(ev)
        self._q.put(None)

    def wait_event(self, type: str, instance: str | None = None, timeout: float = 60) -> dict:
        for ev in self.events:
            if ev["type"] == type and (instance is None or ev.get("instance") == instance):
                return ev
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {type} event within {timeout}s; got {[e['type'] for e in self.events]}"
                                   f"; stderr: {self.stderr()[-2000:]}")
            try:
                ev = self._q.get(timeout=left)
            except queue.Empty:
                continue
            if ev is None:
                raise RuntimeError(f"qsup exited ({self.proc.poll()}) before {type}; stderr: {self.stderr()[-3000:]}")
            if ev["type"] == type and (instance is None or ev.get("instance") == instance):
                return ev

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def qemu_pids(self) -> set[int]:
        return qemu_pids_of(self.events)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM qsup and wait; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._reader.join(timeout=5)

    def close(self) -> list[int]:
        """Last-resort cleanup, and the leak check (:func:`qemu_leak_check`): returns the QEMUs
        that are a leak -- started under its state dir and held by no record -- or that
        survived SIGKILL; empty when clean."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        left = qemu_leak_check(self.state_dir, run_dir=self.run_dir)
        self._stderr.close()
        return left


class QsupDaemon(_Console):
    """`qsup serve` in a namespace, driven through the real CLI on its unix socket.

    The daemon can be SIGKILLed and started again on the same config (``kill()``/``start()``),
    which is how reattach is tested.  ``close()`` is the leak check (a QEMU the daemon started
    and does not own fails it) and kills the daemon and every QEMU it started -- found by
    their logs under its state dir, killed by pid -- so a failed test leaves nothing running.
    """

    #: the config's node_name when a topology set one (what `migrate --to` takes)
    node_name: str | None = None

    def __init__(self, ns: Netns, workdir: Path, *, powerdown_timeout: float = 3.0, extra_config: str = "",
                 hooks_dir: Path | None = None, env: dict | None = None, start: bool = True,
                 run_dir: Path | None = None):
        self.ns = ns
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.run_dir = run_dir or workdir / "run"
        self.socket = workdir / "qsup.sock"
        self.config = workdir / "qsup.toml"
        self.write_config(powerdown_timeout=powerdown_timeout, extra_config=extra_config, hooks_dir=hooks_dir)
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._env = env
        if start:
            self.start()

    def write_config(self, *, powerdown_timeout: float = 3.0, extra_config: str = "",
                     hooks_dir: Path | None = None) -> None:
        self.config.write_text(
            f'state_dir = "{self.state_dir}"\nrun_dir = "{self.run_dir}"\nsocket = "{self.socket}"\n'
            f'accel = "tcg"\n{qemu_line(extra_config)}{plain_migration_line(extra_config)}'
            f'{image_dirs_line(self.workdir, extra_config)}powerdown_timeout = {powerdown_timeout}\n'
            + (f'hooks_dir = "{hooks_dir}"\n' if hooks_dir else 'hooks_dir = "/nonexistent-qsup-hooks"\n')
            + extra_config
        )

    def start(self, timeout: float = 30) -> None:
        """Start the daemon and wait until it is ready (it has reattached and serves).

        A daemon that does not get ready in time is SIGKILLed here, by pid, before the
        error is raised: the caller has no handle on it yet if this ran from ``__init__``.
        """
        assert self.proc is None or self.proc.poll() is not None, "daemon already running"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 -- the daemon's output, closed by kill()/terminate()
        mark = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns.name, str(VENV_BIN / "qsup"), "serve", "--config", str(self.config)],
            stdout=self._log, stderr=subprocess.STDOUT, env=_env(self._env))
        try:
            self._wait_ready(mark, timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, mark: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with open(self.log_path, "rb") as f:
                f.seek(mark)
                if b'"event": "ready"' in f.read():
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"qsup serve exited ({self.proc.returncode}): {self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"qsup serve not ready in {timeout}s: {self.log()[-3000:]}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cli(self, *args: str, input: str | None = None, timeout: float = 120, check: bool = True):
        r = subprocess.run([str(VENV_BIN / "qsup"), *args, "--socket", str(self.socket)], input=input,
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"qsup {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}"
                               f"\ndaemon log: {self.log()[-2000:]}")
        return r

    def cli_async(self, *args: str) -> subprocess.Popen:
        """``qsup ARGS --json`` started, not waited for (the caller communicate()s)."""
        return subprocess.Popen([str(VENV_BIN / "qsup"), *args, "--json", "--socket", str(self.socket)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def cli_json(self, *args: str, **kw):
        return json.loads(self.cli(*args, "--json", **kw).stdout)

    def start_instance(self, spec: dict) -> dict:
        p = self.workdir / f"spec-{spec['name']}.json"
        p.write_text(json.dumps(spec))
        return self.cli_json("start", str(p))

    def events(self, since: int = 0) -> list[dict]:
        out = self.cli("events", "--json", "--since", str(since)).stdout
        return [json.loads(l) for l in out.splitlines() if l.strip()]

    def last_seq(self) -> int:
        """The newest event's seq, from ``/v1/health``: the ``since`` for "events from now on"
        (exact even when retention pruned every event the log ever had)."""
        from supervisor._client import Client

        with Client(self.socket) as c:
            return c.health()["last_seq"]

    def tail(self, since: int | None = None) -> "EventTail":
        return EventTail(self, since)

    def kill(self) -> None:
        """SIGKILL the daemon (by pid): what a crash looks like."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self._log:
            self._log.close()

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self._log:
                self._log.close()

    def qemu_pids(self) -> set[int]:
        """Every QEMU pid this daemon's event log says it started (read from the file directly)."""
        import sqlite3

        db = self.state_dir / "events.db"
        if not db.exists():
            return set()
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            marks = ", ".join("?" * len(PID_EVENTS))
            rows = con.execute(f"SELECT body FROM events WHERE type IN ({marks})", PID_EVENTS).fetchall()
        finally:
            con.close()
        return qemu_pids_of([json.loads(b) for (b,) in rows])

    def instance_pids(self) -> set[int]:
        """The QEMU pids of the instances the running daemon lists as live (``qsup ls``, final
        states left out); empty when it is down or does not answer."""
        if self.proc is None or self.proc.poll() is not None:
            return set()
        try:
            r = self.cli("ls", "--json", check=False, timeout=10)
            views = json.loads(r.stdout) if r.returncode == 0 else []
        except (ValueError, subprocess.TimeoutExpired):
            return set()
        return {v["pid"] for v in views if v.get("pid") and v.get("state") not in ("stopped", "crashed", "failed")}

    def close(self, instances: set[int] | None = None) -> list[int]:
        """The leak check and the teardown; returns the QEMUs that are a leak (empty when clean).

        The daemon's instance list is read (``instances``: what it listed before someone
        killed it), the daemon SIGKILLed, then :func:`qemu_leak_check`: every live QEMU
        started under its state dir that it does not own -- in neither that list nor a
        record -- is reported *before* anything is killed; then all are SIGKILLed by pid and
        any that survives SIGKILL is reported too.
        """
        if instances is None:
            instances = self.instance_pids()
        self.kill()
        return qemu_leak_check(self.state_dir, instances, self.run_dir)


class Ovs:
    """ovsdb-server + ovs-vswitchd in ``ns`` with their own db/run dir; userspace datapath.

    A process given ``env`` (``OVS_RUNDIR``) talks to this instance with a plain
    ``ovs-vsctl``, as qsup's netconf does.
    """

    def __init__(self, ns: Netns, rundir: Path) -> None:
        self.ns, self.dir = ns, Path(rundir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db = f"unix:{self.dir}/db.sock"
        self.procs: list[subprocess.Popen] = []
        env = dict(os.environ, OVS_RUNDIR=str(self.dir), OVS_LOGDIR=str(self.dir), OVS_DBDIR=str(self.dir))
        self.env = env
        try:
            self._boot()
        except BaseException:
            self.close()  # a daemon that started before the failure must not outlive it
            raise

    @property
    def client_env(self) -> dict:
        """What a client (qsup's ``ovs-vsctl``) needs in its environment to reach this OVS."""
        return {"OVS_RUNDIR": str(self.dir)}

    def _boot(self) -> None:
        sh("ovsdb-tool", "create", str(self.dir / "conf.db"), "/usr/share/openvswitch/vswitch.ovsschema")
        self._spawn("ovsdb-server", str(self.dir / "conf.db"), f"--remote=punix:{self.dir}/db.sock",
                    f"--unixctl={self.dir}/ovsdb.ctl", f"--log-file={self.dir}/ovsdb.log")
        self._wait_for(self.dir / "db.sock")
        self.vsctl("--no-wait", "init")
        self._spawn("ovs-vswitchd", self.db, f"--unixctl={self.dir}/vswitchd.ctl",
                    f"--log-file={self.dir}/vswitchd.log")
        self._wait_for(self.dir / "vswitchd.ctl")

    def _spawn(self, *argv: str) -> None:
        p = subprocess.Popen(["ip", "netns", "exec", self.ns.name, *argv], env=self.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)

    @staticmethod
    def _wait_for(path: Path, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} did not appear")
            time.sleep(0.02)

    def vsctl(self, *argv: str, check: bool = True) -> str:
        return self.ns.run("ovs-vsctl", "--timeout=10", f"--db={self.db}", *argv, check=check)

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


class EventTail:
    """`qsup events --follow --json` as a subprocess; its events collected in a thread."""

    def __init__(self, daemon: QsupDaemon, since: int | None = None):
        args = [str(VENV_BIN / "qsup"), "events", "--follow", "--json", "--socket", str(daemon.socket)]
        if since is not None:
            args += ["--since", str(since)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: list[dict] = []
        self._q: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            ev = json.loads(line)
            self.events.append(ev)
            self._q.put(ev)
        self._q.put(None)

    def wait_for(self, type: str, instance: str | None = None, timeout: float = 60, **data) -> dict:
        """The first event of ``type`` (for ``instance``) whose ``data`` fields match.

        ``data`` matches the event's own fields or, for ``qmp.*`` events, QEMU's
        ``data`` object: ``wait_for("qmp.MIGRATION", "vm", status="active")``.
        """
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for ev in self.events[seen:]:
                seen += 1
                if _matches(ev, type, instance, data):
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"tail: no {type} {data or ''} for {instance} in {timeout}s: "
                                   f"{[e['type'] for e in self.events]}")
            try:
                if self._q.get(timeout=min(left, 0.5)) is None and self.proc.poll() is not None:
                    if not any(_matches(e, type, instance, data) for e in self.events[seen:]):
                        raise RuntimeError(f"tail ended ({self.proc.returncode}) before {type}")
            except queue.Empty:
                pass

    def of(self, instance: str, type: str | None = None) -> list[dict]:
        """The events seen so far for ``instance`` (of ``type`` when given)."""
        return [e for e in self.events if e.get("instance") == instance and (type is None or e["type"] == type)]

    def close(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.kill()
        rc = self.proc.wait()
        self._reader.join(timeout=5)
        return rc


def _matches(ev: dict, type: str, instance: str | None, data: dict) -> bool:
    if ev["type"] != type or (instance is not None and ev.get("instance") != instance):
        return False
    fields = {**ev, **(ev.get("data") or {})} if isinstance(ev.get("data"), dict) else ev
    return all(fields.get(k) == v for k, v in data.items())
