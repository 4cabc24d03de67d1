"""N Pacemaker/Corosync nodes (and M pacemaker-remoted nodes) on one machine, each with its
own qsup daemon.

::

    fabric ns:  bridge "fab" 192.168.100.1/24, route 10.99.0.0/24 dev fab (the client: it pings
                routed guests; the node holding a guest's /32 answers by proxy ARP)
       |-- veth --> node1 "uplink" 192.168.100.11  (corosync/knet ring0, migration stream, API)
       |-- veth --> node2 "uplink" 192.168.100.12
       ...

A node is a network namespace (``topo.Netns``) plus a holder process started as
``ip netns exec NS unshare -m -u -p -f --mount-proc --propagation private nodeinit.py``: a
private mount, UTS and PID namespace whose PID 1 (``nodeinit.py``) reaps orphans.  Inside the
holder's mount namespace the harness mounts the node's private state over the host paths:

* tmpfs on ``/run`` and ``/dev/shm`` (libqb IPC rings, pid files; its abstract sockets are
  per network namespace already);
* bind mounts of ``<node>/…`` over ``/etc/corosync`` (corosync.conf, authkey),
  ``/var/lib/corosync``, ``/var/log/corosync``, ``/var/lib/pacemaker`` (cib, pengine,
  blackbox, cores: hacluster:haclient 0750), ``/var/log/pacemaker``, ``/etc/pacemaker``
  (authkey root:haclient 0640);
* a tmpfs over ``/usr/lib/ocf/resource.d`` holding the host's ``heartbeat`` and ``pacemaker``
  providers (bound back) and ``qsup/qsup`` = ``contrib/ocf/qsup`` (Pacemaker 2.1 has no
  OCF_RA_PATH: agents live under that one directory);
* ``/run/qsup`` = the node's qsup socket directory, so the resource template uses the
  production default socket ``/run/qsup/qsup.sock`` on every node.

A remote node (``Cluster(..., remote=M)``, named ``remoteN``, 192.168.100.3N) is the same
namespaces running ``pacemaker-remoted`` (unpacked by mk/cluster.mk) instead of corosync and
pacemakerd, joined by an ``ocf:pacemaker:remote`` resource; it shares ``/etc/pacemaker/authkey``.

``corosync -f`` and then ``pacemakerd`` run inside all three namespaces (``nsenter -t HOLDER
-m -u -n -p``), as children of the harness's nsenter processes, which it waits on.  ``qsup
serve`` runs in the node's network namespace only (``topo.QsupDaemon``): it needs no private
mount, and in the host PID namespace the pids in its events and views are real pids, which
is what ``QsupDaemon.close()`` kills by.

Teardown is the reverse order (cluster to maintenance mode, qsup daemons and their QEMUs,
pacemakerd, corosync, PID 1, the namespaces) and is verified: :meth:`Cluster.close` returns
what was left (processes in a node's namespaces, mounts, namespaces), which must be nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # integration/: topo, migtopo

from topo import ROOT, Netns, QsupDaemon, pid_alive, veth  # noqa: E402 -- importable once sys.path above is set

AGENT = ROOT / "contrib" / "ocf" / "qsup"
REMOTED = ROOT / "build" / "cluster" / "pacemaker-remote" / "usr" / "sbin" / "pacemaker-remoted"
NODEINIT = HERE / "nodeinit.py"
FENCE_AGENT = HERE / "fence_qsuptest"
FABRIC_NET = "192.168.100"
GUEST_NET = "10.99.0"
CLUSTER_BINARIES = ("corosync", "corosync-keygen", "pacemakerd", "cibadmin", "crm_resource", "crm_mon",
                    "crm_attribute", "ocf-tester", "xmllint", "curl")


def peers_declared() -> bool:
    """Whether this qsup has the node config's ``[peers]`` (``migrate --to`` then takes a peer
    name); before that, ``--to`` takes the destination's socket path."""
    from supervisor._config import Config

    return "peers" in Config.model_fields


def missing_binaries() -> list[str]:
    return [b for b in CLUSTER_BINARIES if not shutil.which(b, path="/usr/sbin:/usr/bin:/sbin:/bin")]


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _ns_inode(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


class NsProc:
    """A long-running process inside a node (via ``nsenter ... -p``, which forks it).

    The harness is the parent of nsenter, and nsenter the parent of the process: ``wait()``
    waits on both.  Signals go to the inner process by its (host) pid.
    """

    def __init__(self, node: ClusterNode, argv: list[str], log: Path, env: dict | None = None):
        self.argv = argv
        self._log = open(log, "ab")  # noqa: SIM115 -- the process's output, for its whole life
        self.popen = subprocess.Popen(node.nsenter_argv(pid_ns=True) + ["env", *[f"{k}={v}" for k, v in
                                                                          (env or {}).items()], *argv],
                                      stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        self.pid = None
        while self.pid is None and time.monotonic() < deadline:
            kids = _children(self.popen.pid)
            if kids:
                self.pid = kids[0]
            elif self.popen.poll() is not None:
                break
            else:
                time.sleep(0.01)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.pid and self.alive() and pid_alive(self.pid):
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM, wait; SIGKILL after ``timeout``."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.popen.wait(timeout=10)
        finally:
            self._log.close()


class ClusterNode:
    def __init__(self, cluster: Cluster, index: int, remote: bool = False):
        self.cluster = cluster
        self.index = index
        #: a pacemaker-remoted node: no corosync, joined through an ocf:pacemaker:remote resource
        self.remote = remote
        self.name = f"remote{index}" if remote else f"node{index}"
        self.addr = f"{FABRIC_NET}.{(30 if remote else 10) + index}"
        self.dir = cluster.workdir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.qsup_dir = self.dir / "qsup"  # /run/qsup inside the node: qsup.sock lives here
        self.qsup_dir.mkdir(exist_ok=True)
        self.ns: Netns | None = None
        self.holder: subprocess.Popen | None = None
        self.holder_pid: int | None = None
        self.pidns: str | None = None
        self.netns: str | None = None
        self.corosync: NsProc | None = None
        self.pacemakerd: NsProc | None = None
        self.remoted: NsProc | None = None
        self.qsup: QsupDaemon | None = None

    # --- inside the node ---------------------------------------------------------------------

    def nsenter_argv(self, pid_ns: bool = True) -> list[str]:
        return ["nsenter", "-t", str(self.holder_pid), "-m", "-u", "-n"] + (["-p"] if pid_ns else []) + ["--"]

    def run(self, *argv: str, check: bool = True, timeout: float = 60, env: dict | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run a command inside the node (mount, UTS, network and PID namespace)."""
        full = self.nsenter_argv() + (["env", *[f"{k}={v}" for k, v in env.items()]] if env else []) + list(argv)
        r = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input, check=False)
        if check and r.returncode != 0:
            raise RuntimeError(f"{self.name}: {' '.join(argv)} failed ({r.returncode}): "
                               f"{r.stderr.strip()[-2000:]} {r.stdout.strip()[-1000:]}")
        return r

    # --- setup -------------------------------------------------------------------------------

    def make_network(self, fabric: Netns, prefix: str) -> None:
        self.ns = Netns(prefix)
        self.netns = f"net:[{os.stat(f'/run/netns/{self.ns.name}').st_ino}]"
        port = f"{'r' if self.remote else 'n'}{self.index}"
        veth(self.ns, "uplink", fabric, port)
        fabric.run("ip", "link", "set", port, "master", "fab")
        self.ns.run("ip", "addr", "add", f"{self.addr}/24", "dev", "uplink")
        self.ns.run("ip", "route", "add", "default", "via", f"{FABRIC_NET}.1")
        self.ns.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv4.conf.uplink.proxy_arp=1")

    def make_dirs(self, corosync_conf: str, corosync_key: bytes, pcmk_key: bytes, cib: str) -> None:
        d = self.dir
        import grp
        import pwd

        uid, gid = pwd.getpwnam("hacluster").pw_uid, grp.getgrnam("haclient").gr_gid
        for sub in ("etc-corosync", "var-lib-corosync", "var-log-corosync", "var-lib-pacemaker",
                    "var-log-pacemaker", "etc-pacemaker"):
            (d / sub).mkdir(exist_ok=True)
        for sub in ("cib", "pengine", "blackbox", "cores"):
            p = d / "var-lib-pacemaker" / sub
            p.mkdir(exist_ok=True)
            os.chown(p, uid, gid)
            p.chmod(0o750)
        os.chown(d / "var-log-pacemaker", uid, gid)
        (d / "var-log-pacemaker").chmod(0o770)
        (d / "etc-corosync" / "corosync.conf").write_text(corosync_conf)
        key = d / "etc-corosync" / "authkey"
        key.write_bytes(corosync_key)
        key.chmod(0o400)
        pk = d / "etc-pacemaker" / "authkey"
        pk.write_bytes(pcmk_key)
        os.chown(pk, 0, gid)
        pk.chmod(0o640)
        cib_file = d / "var-lib-pacemaker" / "cib" / "cib.xml"
        cib_file.write_text(cib)
        os.chown(cib_file, uid, gid)
        cib_file.chmod(0o600)

    def start_holder(self) -> None:
        self.holder = subprocess.Popen(
            ["ip", "netns", "exec", self.ns.name, "unshare", "-m", "-u", "-p", "-f", "--mount-proc",
             "--propagation", "private", "--kill-child=SIGKILL", sys.executable, str(NODEINIT)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        line = self.holder.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"{self.name}: node init did not start ({self.holder.poll()}): {line!r}")
        kids = _children(self.holder.pid)
        if len(kids) != 1:
            raise RuntimeError(f"{self.name}: expected one PID 1 under unshare, got {kids}")
        self.holder_pid = kids[0]
        self.pidns = _ns_inode(f"/proc/{self.holder_pid}/ns/pid")
        d = self.dir
        binds = [("etc-corosync", "/etc/corosync"), ("var-lib-corosync", "/var/lib/corosync"),
                 ("var-log-corosync", "/var/log/corosync"), ("var-lib-pacemaker", "/var/lib/pacemaker"),
                 ("var-log-pacemaker", "/var/log/pacemaker"), ("etc-pacemaker", "/etc/pacemaker")]
        ocf = "/usr/lib/ocf/resource.d"
        script = "\n".join([
            "set -e",
            f"hostname {self.name}",
            "mount -t tmpfs -o mode=0755 tmpfs /run",
            "mount -t tmpfs -o mode=1777 tmpfs /dev/shm",
            # the host's OCF providers, plus ours, under a private resource.d
            "mkdir -p /run/.ocf-host",
            f"mount --bind {ocf} /run/.ocf-host",
            f"mount -t tmpfs -o mode=0755 tmpfs {ocf}",
            *[f"mkdir {ocf}/{p} && mount --bind /run/.ocf-host/{p} {ocf}/{p}"
              for p in sorted(os.listdir(ocf))],
            f"mkdir {ocf}/qsup && touch {ocf}/qsup/qsup && mount --bind {AGENT} {ocf}/qsup/qsup",
            *[f"mount --bind {d / src} {dst}" for src, dst in binds],
            f"mkdir -p /run/qsup && mount --bind {self.qsup_dir} /run/qsup",
            # /usr/sbin = the host's (symlinked) plus the test fence agent: the fencer only
            # runs fence_* agents from there
            "mkdir -p /run/.sbin-host /run/.sbin",
            "mount --bind /usr/sbin /run/.sbin-host",
            "cp -as /run/.sbin-host/. /run/.sbin/",
            f"ln -s {FENCE_AGENT} /run/.sbin/fence_qsuptest",
            "mount --bind /run/.sbin /usr/sbin",
        ])
        subprocess.run(["nsenter", "-t", str(self.holder_pid), "-m", "-u", "--", "sh", "-c", script],
                       check=True, capture_output=True, text=True, timeout=30)

    def start_corosync(self) -> None:
        self.corosync = NsProc(self, ["corosync", "-f"], self.dir / "corosync.out")

    def start_pacemaker(self) -> None:
        self.pacemakerd = NsProc(self, ["pacemakerd"], self.dir / "pacemakerd.out",
                                 env={"PCMK_logfile": "/var/log/pacemaker/pacemaker.log",
                                      "PCMK_logfacility": "none", "PCMK_debug": "no",
                                      # agents inherit it: a test run against another checkout
                                      **({"PYTHONPATH": os.environ["PYTHONPATH"]}
                                         if os.environ.get("PYTHONPATH") else {})})

    def start_remoted(self) -> None:
        if not REMOTED.exists():
            raise RuntimeError(f"{REMOTED} missing: run `make deps` (mk/cluster.mk unpacks pacemaker-remote)")
        self.remoted = NsProc(self, [str(REMOTED)], self.dir / "remoted.out",
                              env={"PCMK_logfile": "/var/log/pacemaker/pacemaker.log",
                                   "PCMK_logfacility": "none", "PCMK_debug": "no",
                                   **({"PYTHONPATH": os.environ["PYTHONPATH"]}
                                      if os.environ.get("PYTHONPATH") else {})})

    @property
    def socket(self) -> Path:
        return self.qsup_dir / "qsup.sock"

    def start_qsup(self) -> None:
        extra = (f'node_name = "{self.name}"\nmigration_address = "{self.addr}"\n'
                 'announce_interfaces = ["uplink"]\n' + self.cluster.qsup_config)
        if peers_declared():
            # the table form: the API on the peer's socket, the migration stream to its uplink
            # address (a bare "unix:" peer would mean 127.0.0.1: same host, not another node)
            extra += "".join(f'[peers.{n.name}]\napi = "unix:{n.socket}"\nmigration = "{n.addr}"\n'
                             for n in self.cluster.nodes if n is not self)
        self.qsup = QsupDaemon(self.ns, self.qsup_dir, extra_config=extra)

    # --- teardown ----------------------------------------------------------------------------

    def stop_holder(self) -> None:
        if self.holder and self.holder.poll() is None:
            if self.holder_pid and pid_alive(self.holder_pid):
                os.kill(self.holder_pid, signal.SIGTERM)
            try:
                self.holder.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.holder.kill()  # unshare --kill-child takes PID 1 (and so the namespace) along
                self.holder.wait(timeout=10)
        if self.holder and self.holder.stdout:
            self.holder.stdout.close()

    def processes(self) -> list[int]:
        """Host pids of processes in this node's network or PID namespace."""
        out = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            net, pidns = _ns_inode(f"{p}/ns/net"), _ns_inode(f"{p}/ns/pid")
            if (self.netns and net == self.netns) or (self.pidns and pidns == self.pidns):
                out.append(int(p.name))
        return out


class Cluster:
    """``Cluster(workdir, n)``: build and start everything; ``close()`` tears it down and
    returns the leftovers (empty when clean)."""

    def __init__(self, workdir: Path, n: int = 3, prefix: str = "qst", dc_deadtime: str = "2s",
                 properties: dict | None = None, remote: int = 0, qsup_config: str = ""):
        self.workdir = workdir
        #: extra top-level keys for every node's qsup.toml (TOML lines)
        self.qsup_config = qsup_config
        self.prefix = prefix
        self.nodes: list[ClusterNode] = []
        self.fabric: Netns | None = None
        self.timings: dict[str, float] = {}
        self.extra_qemu_pids: set[int] = set()
        t0 = time.monotonic()
        try:
            self._build(n, remote, dc_deadtime, properties or {})
        except BaseException:
            left = self.close()
            if left:
                print(f"warning: cluster teardown after a failed start left {left}", file=sys.stderr)
            raise
        self.timings["total_s"] = round(time.monotonic() - t0, 2)

    @property
    def full(self) -> list[ClusterNode]:
        return [n for n in self.nodes if not n.remote]

    @property
    def remotes(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.remote]

    def _build(self, n: int, remote: int, dc_deadtime: str, properties: dict) -> None:
        t0 = time.monotonic()
        self.fabric = Netns(self.prefix)
        f = self.fabric
        f.run("ip", "link", "add", "fab", "type", "bridge")
        f.run("ip", "link", "set", "fab", "up")
        f.run("ip", "addr", "add", f"{FABRIC_NET}.1/24", "dev", "fab")
        f.run("ip", "route", "add", f"{GUEST_NET}.0/24", "dev", "fab")
        keyfile = self.workdir / "corosync-authkey"
        subprocess.run(["corosync-keygen", "-k", str(keyfile)], check=True, capture_output=True, timeout=30)
        corosync_key = keyfile.read_bytes()
        pcmk_key = os.urandom(4096)
        self.nodes = [ClusterNode(self, i) for i in range(1, n + 1)] + \
            [ClusterNode(self, i, remote=True) for i in range(1, remote + 1)]
        conf = self.corosync_conf()
        cib = self.initial_cib(dc_deadtime, properties)
        for node in self.nodes:
            node.make_network(f, self.prefix)
            node.make_dirs(conf, corosync_key, pcmk_key, cib)
            node.start_holder()
        self.timings["namespaces_s"] = round(time.monotonic() - t0, 2)
        for node in self.full:
            node.start_corosync()
        for node in self.remotes:
            node.start_remoted()
        for node in self.nodes:
            node.start_qsup()
        self.wait_quorate()
        self.timings["quorate_s"] = round(time.monotonic() - t0, 2)
        for node in self.full:
            node.start_pacemaker()
        self.wait_online(self.full)
        self.timings["dc_s"] = round(time.monotonic() - t0, 2)
        if self.remotes:
            for node in self.remotes:
                self.cib("--create", "-o", "resources", "--xml-pipe",
                         input=f"""<primitive id="{node.name}" class="ocf" provider="pacemaker" type="remote">
    <instance_attributes id="{node.name}-attrs">
      <nvpair id="{node.name}-server" name="server" value="{node.addr}"/>
    </instance_attributes>
    <operations>
      <op id="{node.name}-monitor" name="monitor" interval="5s" timeout="15s"/>
    </operations>
  </primitive>""")
            self.wait_online(self.nodes)
            self.timings["remotes_s"] = round(time.monotonic() - t0, 2)

    # --- configuration -----------------------------------------------------------------------

    def corosync_conf(self) -> str:
        nodes = "\n".join(
            f"    node {{\n        ring0_addr: {n.addr}\n        name: {n.name}\n        nodeid: {n.index}\n    }}"
            for n in self.full)
        return f"""totem {{
    version: 2
    cluster_name: qsuptest
    transport: knet
    crypto_cipher: aes256
    crypto_hash: sha256
    token: 3000
}}
nodelist {{
{nodes}
}}
quorum {{
    provider: corosync_votequorum
}}
logging {{
    to_logfile: yes
    logfile: /var/log/corosync/corosync.log
    to_syslog: no
    to_stderr: no
    timestamp: on
}}
system {{
    sched_rr: no
}}
"""

    @staticmethod
    def initial_cib(dc_deadtime: str, properties: dict) -> str:
        props = {"dc-deadtime": dc_deadtime, "stonith-enabled": "false", "cluster-recheck-interval": "1min",
                 "no-quorum-policy": "stop", **properties}
        nv = "\n".join(f'        <nvpair id="opt-{k}" name="{k}" value="{v}"/>' for k, v in props.items())
        return f"""<cib validate-with="pacemaker-3.9" epoch="1" num_updates="0" admin_epoch="0">
  <configuration>
    <crm_config>
      <cluster_property_set id="cib-bootstrap-options">
{nv}
      </cluster_property_set>
    </crm_config>
    <nodes/>
    <resources/>
    <constraints/>
    <rsc_defaults>
      <meta_attributes id="rsc-options">
        <nvpair id="rsc-options-resource-stickiness" name="resource-stickiness" value="100"/>
      </meta_attributes>
    </rsc_defaults>
    <op_defaults>
      <meta_attributes id="op-options">
        <nvpair id="op-options-record-pending" name="record-pending" value="false"/>
      </meta_attributes>
    </op_defaults>
  </configuration>
  <status/>
</cib>
"""

    # --- waiting -----------------------------------------------------------------------------

    def wait_quorate(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            outs = [n.run("corosync-quorumtool", "-s", check=False, timeout=10) for n in self.full]
            if all(r.returncode == 0 and "Quorate:          Yes" in r.stdout
                   and f"Total votes:      {len(self.full)}" in r.stdout for r in outs):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"corosync not quorate in {timeout}s: {[r.stdout[-400:] for r in outs]}")
            time.sleep(0.3)

    def live(self) -> ClusterNode:
        """The first node whose cluster stack still runs (commands go there)."""
        for n in self.nodes:
            if n.holder_pid and pid_alive(n.holder_pid) and n.pacemakerd and n.pacemakerd.alive() \
                    and n.corosync and n.corosync.alive():
                return n
        raise RuntimeError("no live cluster node")

    def status(self, node: ClusterNode | None = None) -> ET.Element:
        r = (node or self.live()).run("crm_mon", "-1", "--output-as=xml", check=False, timeout=20)
        return ET.fromstring(r.stdout) if r.stdout.strip().startswith("<") else ET.Element("none")

    def wait_online(self, nodes: list[ClusterNode], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        want = {n.name for n in nodes}
        while True:
            st = self.status()
            dc = st.find("./summary/current_dc")
            online = {n.get("name") for n in st.findall("./nodes/node") if n.get("online") == "true"}
            if dc is not None and dc.get("present") == "true" and want <= online:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no DC with all nodes online in {timeout}s: "
                                   f"{ET.tostring(st, encoding='unicode')[-1500:]}")
            time.sleep(0.5)

    def wait_idle(self, timeout: float = 60) -> None:
        """Until the DC has no transition in progress (``crmadmin -q -S DC`` says S_IDLE)."""
        deadline = time.monotonic() + timeout
        while True:
            live = self.live()
            r = live.run("crmadmin", "-D", "-q", check=False, timeout=10)
            dc = (r.stdout.strip() or r.stderr.strip()).split()[-1] if (r.stdout or r.stderr).strip() else ""
            s = live.run("crmadmin", "-q", "-S", dc, check=False, timeout=10) if dc else None
            if s is not None and "S_IDLE" in (s.stdout + s.stderr):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not idle in {timeout}s ({dc}: {s and (s.stdout + s.stderr)})")
            time.sleep(0.3)

    # --- resources ---------------------------------------------------------------------------

    def node(self, name: str) -> ClusterNode:
        return next(n for n in self.nodes if n.name == name)

    def cib(self, *args: str, input: str | None = None, node: ClusterNode | None = None) -> str:
        return (node or self.live()).run("cibadmin", *args, input=input).stdout

    def add_resource(self, xml: str) -> None:
        self.cib("--create", "-o", "resources", "--xml-pipe", input=xml)

    def crm(self, *args: str, node: ClusterNode | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return (node or self.live()).run(*args, check=check)

    def locate(self, rsc: str) -> list[str]:
        """Nodes Pacemaker reports the resource active on."""
        st = self.status()
        for r in st.iter("resource"):
            if r.get("id") == rsc and r.get("active") == "true":
                return [n.get("name") for n in r.findall("node")]
        return []

    def wait_located(self, rsc: str, node: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            res = [r for r in st.iter("resource") if r.get("id") == rsc]
            if res and res[0].get("role") == "Started" and res[0].get("active") == "true" \
                    and [n.get("name") for n in res[0].findall("node")] == [node]:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{rsc} not started on {node} in {timeout}s: "
                                   f"{[ET.tostring(r, encoding='unicode') for r in res]}"
                                   f"\n{self.diagnose(rsc)}")
            time.sleep(0.5)

    def failures(self) -> list[dict]:
        return [dict(f.attrib) for f in self.status().iter("failure")]

    def operations(self, rsc: str) -> list[tuple[str, str, str, str]]:
        """(time, node, operation, result) of every executed operation on ``rsc``, in time order,
        from the nodes' controller logs ("Result of migrate_to operation for vm1 on node1: ok").
        The CIB keeps only each node's last operation, so a migrate_to is gone after the stop."""
        pat = re.compile(r"^(\w+ +\d+ [\d:.]+) .*Result of (\S+) operation for (\S+) on (\S+): ([^|]*?) *\|")
        out = []
        for n in self.nodes:
            log = n.dir / "var-log-pacemaker" / "pacemaker.log"
            for line in (log.read_text(errors="replace").splitlines() if log.exists() else []):
                m = pat.match(line)
                if m and m.group(3) == rsc:
                    out.append((m.group(1), m.group(4), m.group(2), m.group(5)))
        return sorted(out)

    def diagnose(self, rsc: str) -> str:
        """What a failed cluster test prints: Pacemaker's operations and failures for ``rsc``,
        each daemon's view of it (state, migration) and the nodes' log lines that name it
        (the agent's own messages included), newest last."""
        out = [f"operations: {[(n, op, res) for _, n, op, res in self.operations(rsc) if op != 'monitor']}",
               f"failures: {self.failures()}",
               "crm_mon: " + str([ET.tostring(r, encoding="unicode").strip() for r in self.status().iter("resource")
                                  if r.get("id") == rsc]),
               "crm_resource --locate: "
               f"{self.crm('crm_resource', '--locate', '--resource', rsc, check=False).stdout.strip()!r}"]
        for n in self.nodes:
            try:
                v = self.view(n, rsc)
            except Exception as e:  # noqa: BLE001 -- a diagnostic, never the failure itself
                v = {"error": repr(e)}
            if v:
                out.append(f"{n.name}: state={v.get('state')} migration={v.get('migration')}")
        for n in self.nodes:
            log = n.dir / "var-log-pacemaker" / "pacemaker.log"
            lines = [ln for ln in (log.read_text(errors="replace").splitlines() if log.exists() else [])
                     if rsc in ln and "monitor" not in ln]
            out += [f"{n.name} log: {ln}" for ln in lines[-25:]]
        return "\n".join(out)

    def peer_map(self) -> str:
        """The agent's ``peers`` parameter: empty with declared peers (node names are peer
        names); else each node's socket path, what ``qsup migrate --to`` takes today."""
        if peers_declared():
            return ""
        return " ".join(f"{n.name}={n.socket}" for n in self.nodes)

    def daemons(self) -> list[QsupDaemon]:
        return [n.qsup for n in self.nodes if n.qsup]

    def view(self, node: ClusterNode, name: str) -> dict | None:
        r = node.qsup.cli("show", name, "--json", check=False, timeout=30)
        return json.loads(r.stdout) if r.returncode == 0 else None

    # --- fencing -----------------------------------------------------------------------------

    def enable_fencing(self) -> None:
        """A stonith resource (``fence_qsuptest``) whose "power switch" is a harness thread:
        a fence request kills every process in the victim's namespaces (corosync, pacemaker,
        qsup, its QEMUs); then ``stonith-enabled=true``."""
        self.switch = self.workdir / "switch"
        (self.switch / "requests").mkdir(parents=True, exist_ok=True)
        (self.switch / "done").mkdir(exist_ok=True)
        self.fenced: list[tuple[str, float]] = []
        self._switch_stop = threading.Event()
        self._switch = threading.Thread(target=self._power_switch, daemon=True)
        self._switch.start()
        names = " ".join(n.name for n in self.nodes)
        self.cib("--create", "-o", "resources", "--xml-pipe",
                 input=f"""<primitive id="fence-switch" class="stonith" type="fence_qsuptest">
    <instance_attributes id="fence-switch-params">
      <nvpair id="fence-switch-dir" name="switch_dir" value="{self.switch}"/>
      <nvpair id="fence-switch-nodes" name="nodes" value="{names}"/>
      <nvpair id="fence-switch-hosts" name="pcmk_host_list" value="{names}"/>
      <nvpair id="fence-switch-check" name="pcmk_host_check" value="static-list"/>
    </instance_attributes>
    <operations>
      <op id="fence-switch-monitor" name="monitor" interval="60s"/>
    </operations>
  </primitive>""")
        self.crm("crm_attribute", "--type", "crm_config", "--name", "stonith-enabled", "--update", "true")
        self.wait_idle()

    def _power_switch(self) -> None:
        req, done = self.switch / "requests", self.switch / "done"
        while not self._switch_stop.is_set():
            for f in sorted(req.iterdir()):
                if f.name.startswith("."):
                    continue
                target = f.name.split(".")[0]
                ok = "ok"
                try:
                    self.power_off(self.node(target))
                except Exception as e:  # noqa: BLE001 -- answered to the fence agent
                    ok = f"error {e}"
                self.fenced.append((target, time.time()))
                tmp = done / ("." + f.name)
                tmp.write_text(ok)
                tmp.rename(done / f.name)
                f.unlink()
            self._switch_stop.wait(0.1)

    def power_off(self, node: ClusterNode) -> None:
        """What a power switch does: every process in the node's namespaces gets SIGKILL."""
        deadline = time.monotonic() + 10
        while True:
            procs = node.processes()
            if not procs:
                return
            for p in procs:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node.name}: processes survive SIGKILL: {procs}")
            time.sleep(0.05)

    # --- teardown ----------------------------------------------------------------------------

    def close(self) -> list[str]:
        """Tear everything down in reverse order; return what was left (must be empty)."""
        left: list[str] = []
        if getattr(self, "_switch", None):
            self._switch_stop.set()
            self._switch.join(timeout=5)
        live = [n for n in self.nodes if n.pacemakerd and n.pacemakerd.alive()
                and n.corosync and n.corosync.alive()]
        if live:  # no recovery, no migration while the cluster goes away
            live[0].run("crm_attribute", "--type", "crm_config", "--name", "maintenance-mode",
                        "--update", "true", check=False, timeout=20)
        # qsup daemons and their QEMUs: each daemon's leak check (QsupDaemon.close) reports a
        # live QEMU started under its state dir that it neither lists nor records -- before it
        # kills them all by pid -- and any that survives SIGKILL
        from migtopo import live_qemu_pids

        qemus = live_qemu_pids(self.daemons()) | self.extra_qemu_pids
        for n in reversed(self.nodes):
            if n.qsup:
                qemus |= n.qsup.qemu_pids()
                left += [f"{n.name}: {p!r}" for p in n.qsup.close()]
        # a QEMU a daemon listed or logged that is still alive was not under its state dir
        for pid in qemus:
            if pid_alive(pid) and str(self.workdir).encode() in _cmdline(pid):
                left.append(f"qemu {pid} alive after its daemon's teardown, not under its state dir (killed)")
                os.kill(pid, signal.SIGKILL)
        for n in reversed(self.nodes):
            if n.pacemakerd:
                n.pacemakerd.signal(signal.SIGTERM)
        for n in reversed(self.nodes):
            if n.pacemakerd:
                n.pacemakerd.stop(timeout=30)
        for n in reversed(self.nodes):
            if n.remoted:
                n.remoted.stop(timeout=15)
        for n in reversed(self.nodes):
            if n.corosync:
                n.corosync.stop(timeout=15)
        for n in reversed(self.nodes):
            n.stop_holder()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(n.processes() for n in self.nodes):
            time.sleep(0.1)
        for n in self.nodes:
            procs = n.processes()
            if procs:
                left.append(f"{n.name}: processes {[(p, _cmdline(p)[:80]) for p in procs]}")
        for pid in qemus:
            if pid_alive(pid) and str(self.workdir).encode() in _cmdline(pid):
                left.append(f"qemu {pid} alive")
        for n in reversed(self.nodes):
            if n.ns:
                n.ns.close()
        if self.fabric:
            self.fabric.close()
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
        for ns in [n.ns for n in self.nodes if n.ns] + ([self.fabric] if self.fabric else []):
            if any(line.split()[0] == ns.name for line in names.splitlines() if line.strip()):
                left.append(f"netns {ns.name}")
        mounts = Path("/proc/self/mountinfo").read_text()
        if str(self.workdir) in mounts:
            left.append("mounts under the work dir on the host: " + ", ".join(
                l.split()[4] for l in mounts.splitlines() if str(self.workdir) in l))
        self.nodes = []
        self.fabric = None
        return left


# --- the guest's real QEMU processes ----------------------------------------------------------

def guest_qemus(cluster: Cluster, name: str) -> list[tuple[str, int, list[bytes]]]:
    """(node, pid, argv) of every live QEMU process of guest ``name`` on the cluster's nodes,
    found in the host's /proc (it sees every node's processes): argv[0] a qemu-system binary
    and ``-name guest=NAME,...`` (supervisor/_qemu.py), mapped to its node by its network
    namespace (qsup starts QEMU in its node's).  QEMUs of other clusters or tests are skipped."""
    nets = {n.netns: n.name for n in cluster.nodes if n.netns}
    want = f"guest={name},".encode()
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if not argv or b"qemu-system" not in argv[0]:
            continue
        if not any(a == b"-name" and i + 1 < len(argv) and argv[i + 1].startswith(want) for i, a in enumerate(argv)):
            continue
        node = nets.get(_ns_inode(f"/proc/{p}/ns/net"))
        if node and pid_alive(int(p)):
            out.append((node, int(p), argv))
    return out


def _operator_socket(pid: int, argv: list[bytes]) -> str | None:
    """The path of the QEMU's operator QMP monitor: the fd of ``-chardev socket,id=op-qmp,fd=N``
    (qsup binds the socket and passes it), its inode, its path in the QEMU's /proc/PID/net/unix."""
    fd = next((m.group(1) for a in argv if (m := re.match(rb"socket,id=op-qmp,fd=(\d+)", a))), None)
    if fd is None:
        return None
    try:
        inode = os.readlink(f"/proc/{pid}/fd/{fd.decode()}").removeprefix("socket:[").rstrip("]")
        for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
            f = line.split()
            if len(f) >= 8 and f[6] == inode:
                return f[7]
    except OSError:
        pass
    return None


class _Qmp:
    """One kept-open connection to a QEMU's operator monitor: ``status()`` is query-status."""

    def __init__(self, path: str, timeout: float):
        import socket

        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.buf = b""
        try:
            self.sock.connect(path)
            self._reply()  # the greeting
            self.sock.sendall(b'{"execute": "qmp_capabilities"}\n')
            self._reply()
        except BaseException:
            self.sock.close()
            raise

    def _reply(self) -> dict:
        while True:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise OSError("QMP connection closed")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            msg = json.loads(line)
            if "event" not in msg:  # events (STOP, RESUME, MIGRATION...) come on this connection too
                return msg

    def status(self) -> dict:
        self.sock.sendall(b'{"execute": "query-status"}\n')
        r = self._reply()
        if "return" not in r:
            raise OSError(f"query-status: {r}")
        return r["return"]

    def close(self) -> None:
        self.sock.close()


class CopyWatch:
    """Samples the real QEMU copies of guest ``name`` across the nodes every ``interval`` s in a
    background thread (``with CopyWatch(cluster, name) as w: ...``; then ``w.check()``).

    What counts as a copy: a live QEMU process of the guest (:func:`guest_qemus`) whose vCPUs
    run the guest -- its operator monitor answers ``query-status`` with ``running: true``.  A
    migration's destination (``-incoming defer``, with ``-S``) is ``inmigrate`` and then
    ``paused`` until qsup activates it, and the source is ``finish-migrate``/``postmigrate``
    from the switchover until it quits: at every instant of a correct migration exactly one of
    the two runs the guest, so two QEMUs ``running`` at once are two copies.  A QEMU that does
    not answer (within ``qmp_timeout``) counts as its last answer, and one that never answered
    counts as a copy -- unknown is never "not running" -- except an incoming one, which cannot
    run before qsup activates it after its migration completed.
    """

    def __init__(self, cluster: Cluster, name: str, interval: float = 0.02, qmp_timeout: float = 2.0):
        self.cluster, self.name, self.interval, self.qmp_timeout = cluster, name, interval, qmp_timeout
        self.samples = 0
        self.max_gap = 0.0
        self.max_copies = 0
        #: (time.time(), [(node, pid, status)]) of every sample with more than one copy
        self.doubles: list[tuple[float, list[tuple[str, int, str]]]] = []
        #: the latest sample: [(node, pid, status)] of every QEMU of the guest, copies or not
        self.last: list[tuple[str, int, str]] = []
        self.last_copies: list[str] = []
        self.error: BaseException | None = None
        self._conns: dict[int, _Qmp | None] = {}
        self._known: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"copywatch-{name}")

    def __enter__(self) -> CopyWatch:
        self.sample()  # one before anything happens, in the caller's thread: fails loudly
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        for c in self._conns.values():
            if c:
                c.close()
        self._conns.clear()

    def _status(self, pid: int, argv: list[bytes]) -> str:
        """The QEMU's run state, or its last known one, or "unknown"."""
        try:
            c = self._conns.get(pid)
            if c is None:
                path = _operator_socket(pid, argv)
                if path is None:
                    raise OSError("no operator monitor")
                c = self._conns[pid] = _Qmp(path, self.qmp_timeout)
            st = c.status()
            self._known[pid] = "running" if st.get("running") else st.get("status", "?")
        except (OSError, ValueError):
            old = self._conns.pop(pid, None)
            if old:
                old.close()
        return self._known.get(pid, "unknown")

    @staticmethod
    def is_copy(status: str, argv: list[bytes]) -> bool:
        return status == "running" or (status == "unknown" and b"-incoming" not in argv)

    def sample(self) -> list[tuple[str, int, str]]:
        qemus = guest_qemus(self.cluster, self.name)
        seen = []
        copies = []
        for node, pid, argv in qemus:
            st = self._status(pid, argv)
            if not pid_alive(pid):  # it quit meanwhile: not a live QEMU
                continue
            seen.append((node, pid, st))
            if self.is_copy(st, argv):
                copies.append((node, pid, st))
        for pid in [p for p in self._conns if p not in {q[1] for q in qemus}]:
            c = self._conns.pop(pid)
            if c:
                c.close()
        self.samples += 1
        self.max_copies = max(self.max_copies, len(copies))
        if len(copies) > 1:
            self.doubles.append((time.time(), seen))
        self.last, self.last_copies = seen, [node for node, _, _ in copies]
        return seen

    def running(self) -> list[str]:
        """Nodes where the latest sample saw a copy."""
        return list(self.last_copies)

    def _run(self) -> None:
        t = time.monotonic()
        while not self._stop.wait(max(0.0, t + self.interval - time.monotonic())):
            now = time.monotonic()
            self.max_gap = max(self.max_gap, now - t)
            t = now
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 -- reported by check()
                self.error = e
                return

    def check(self) -> str:
        """Assert no two copies were ever seen; return a one-line summary."""
        assert self.error is None, f"the copy watch failed: {self.error!r}"
        assert not self.doubles, f"two copies of {self.name} at once ({len(self.doubles)} of {self.samples} " \
                                 f"samples), first: {self.doubles[0]}"
        return f"{self.samples} samples of the real QEMUs, max gap {self.max_gap * 1000:.0f} ms, never two copies"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""


def resource_xml(rid: str, spec: Path, *, peers: str = "", qsup: str | None = None, monitor: str = "5s",
                 extra_meta: dict | None = None, extra_params: dict | None = None) -> str:
    """The resource template: ocf:qsup:qsup, live-migratable."""
    params = {"name": rid, "spec": str(spec), **(extra_params or {})}
    if peers:
        params["peers"] = peers
    if qsup:
        params["qsup"] = qsup
    meta = {"allow-migrate": "true", "migration-threshold": "3", **(extra_meta or {})}
    p = "\n".join(f'      <nvpair id="{rid}-p-{k}" name="{k}" value="{v}"/>' for k, v in params.items())
    m = "\n".join(f'      <nvpair id="{rid}-m-{k}" name="{k}" value="{v}"/>' for k, v in meta.items())
    return f"""<primitive id="{rid}" class="ocf" provider="qsup" type="qsup">
    <instance_attributes id="{rid}-params">
{p}
    </instance_attributes>
    <meta_attributes id="{rid}-meta">
{m}
    </meta_attributes>
    <operations>
      <op id="{rid}-start" name="start" interval="0s" timeout="60s"/>
      <op id="{rid}-stop" name="stop" interval="0s" timeout="60s"/>
      <op id="{rid}-monitor" name="monitor" interval="{monitor}" timeout="20s"/>
      <op id="{rid}-migrate_to" name="migrate_to" interval="0s" timeout="120s"/>
      <op id="{rid}-migrate_from" name="migrate_from" interval="0s" timeout="60s"/>
    </operations>
  </primitive>"""
