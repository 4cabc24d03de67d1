"""A real Pacemaker/Corosync cluster driving qsup through contrib/ocf/qsup: three full nodes
(corosync + pacemakerd) and one pacemaker-remoted node, each with its own qsup daemon.

One cluster for the module (about 10 s to a DC); the tests run in file order and share it:
a guest placed and started -> moved with ``crm_resource --move`` to another full node, then to
the remote node (live migrations, checked in Pacemaker's operations, both daemons' event
logs and the guest's qsup ``generation``, which a live migration carries and a start renews) ->
the remote node put on standby (evacuated by live migration) -> a source daemon SIGKILLed
mid-migration -> ``ocf-tester`` on a live node, with the monitor's cost measured ->
a node fenced (last: it stays off).  The fixture's teardown asserts that nothing is left: no
process in any node namespace, no mount, no namespace, no QEMU.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from guestcheck import check_guest
from harness import AGENT, GUEST_NET, Cluster, CopyWatch, missing_binaries, resource_xml
from topo import VENV_BIN, guest_spec, pid_alive

VM = "vm1"
VM_IP = f"{GUEST_NET}.10"
VM_MAC = "52:54:00:c1:00:10"
QSUP = str(VENV_BIN / "qsup")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.fail(f"cluster packages missing ({', '.join(missing)}): run `make deps` (mk/cluster.mk)")
    c = Cluster(tmp_path_factory.mktemp("cluster"), 3, remote=1)
    try:
        yield c
    finally:
        left = c.close()
        assert not left, f"cluster teardown left: {left}"


@pytest.fixture(scope="module")
def vm(cluster):
    """The guest as a Pacemaker resource; returns its resource id once it runs somewhere."""
    spec = cluster.workdir / f"{VM}.json"
    spec.write_text(json.dumps(guest_spec(VM, [{"mode": "routed", "mac": VM_MAC, "ip": VM_IP}],
                                          append=f"guest.ip0={VM_IP}/32 guest.dirty=20 guest.dirty_mb=24")))
    cluster.add_resource(resource_xml(VM, spec, peers=cluster.peer_map(), qsup=QSUP))
    node = _wait_started(cluster, VM)
    return VM, spec, node


def _wait_started(c: Cluster, rsc: str, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while True:
        where = c.locate(rsc)
        if len(where) == 1:
            v = c.view(c.node(where[0]), rsc)
            if v and v["state"] == "running":
                return where[0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{rsc} not started in {timeout}s: at {where}\n{c.diagnose(rsc)}")
        time.sleep(0.5)


def _holders(c: Cluster, name: str) -> dict[str, str]:
    """node -> qsup state, for every node whose daemon knows the instance."""
    out = {}
    for n in c.nodes:
        v = c.view(n, name)
        if v:
            out[n.name] = v["state"]
    return out


def _running_on(c: Cluster, name: str) -> list[str]:
    return [n for n, s in _holders(c, name).items() if s == "running"]


def _assert_one_qemu(c: Cluster, name: str, node: str) -> None:
    """The real processes, not the daemons' views: exactly one live QEMU of ``name`` across the
    nodes, on ``node``, the pid its daemon reports, and its vCPUs run the guest."""
    w = CopyWatch(c, name)
    try:
        seen = w.sample()
    finally:
        w.stop()
    assert [(n, st) for n, _, st in seen] == [(node, "running")], seen
    pid = seen[0][1]
    assert pid_alive(pid)
    assert (c.view(c.node(node), name) or {}).get("pid") == pid, (pid, c.view(c.node(node), name))


def _consoles(c: Cluster, name: str) -> dict[str, int]:
    """How much of each node's console log of ``name`` exists now (the log outlives an instance
    on its node: a guest that comes back to a node appends to what it wrote there before)."""
    return {n.name: len(n.qsup.console(name)) for n in c.nodes}


def _migrated(c: Cluster, name: str, src: str, dst: str, src_seq: int, dst_seq: int,
              consoles: dict[str, int]) -> None:
    """Assert from both event logs that ``name`` went src -> dst by live migration."""
    s_ev = [e for e in c.node(src).qsup.events(since=src_seq) if e.get("instance") == name]
    d_ev = [e for e in c.node(dst).qsup.events(since=dst_seq) if e.get("instance") == name]
    s_types, d_types = [e["type"] for e in s_ev], [e["type"] for e in d_ev]
    print(f"events {src} (source): {[t for t in s_types if not t.startswith('qmp.')]}\n"
          f"events {dst} (target): {[t for t in d_types if not t.startswith('qmp.')]}")
    assert "migration.completed" in s_types, s_types
    assert "migration.activated" in d_types, d_types
    # a restart would show a fresh start on the target and a powerdown on the source
    assert "instance.started" not in d_types, d_types
    assert "instance.stopping" not in s_types, s_types
    # the guest did not boot again: nothing of a boot on the target's serial console
    assert "GUEST-READY" not in c.node(dst).qsup.console(name)[consoles.get(dst, 0):]
    # and it is whole there: it answers, no virtio error/oops/panic since it arrived, and its
    # memory workload verified a full sweep on the target
    check_guest(lambda: c.node(dst).qsup.console(name)[consoles.get(dst, 0):], lambda: c.fabric.ping(VM_IP),
                busy=True, timeout=30)


def _assert_migrated_by_pacemaker(c: Cluster, name: str, src: str, dst: str) -> None:
    """The last operations: migrate_to on src, migrate_from on dst, stop on src -- all ok,
    and no start anywhere after the migrate_to."""
    ops = c.operations(name)
    migrations = [k for k, o in enumerate(ops) if o[2] == "migrate_to"]
    assert migrations, f"no migrate_to: {ops}"
    i = migrations[-1]
    tail = [(node, op, res) for _, node, op, res in ops[i:] if op != "monitor"]
    assert tail == [(src, "migrate_to", "ok"), (dst, "migrate_from", "ok"), (src, "stop", "ok")], ops


def _generation(c: Cluster, node: str, name: str) -> str:
    """The instance's generation on ``node`` (new at every start, carried by live migration)."""
    v = c.view(c.node(node), name)
    assert v and len(v.get("generation") or "") == 32, v
    return v["generation"]


def test_agent_is_the_shipped_one():
    assert AGENT.exists() and AGENT.stat().st_mode & 0o755 == 0o755
    out = subprocess.run([str(AGENT), "meta-data"], capture_output=True, text=True, check=True).stdout
    assert '<action name="migrate_to"' in out and '<action name="migrate_from"' in out


def test_guest_placed_and_started(cluster, vm):
    name, _, node = vm
    assert _running_on(cluster, name) == [node]
    assert _holders(cluster, name) == {node: "running"}
    cluster.node(node).qsup.wait_console(name)
    assert cluster.fabric.ping(VM_IP), "guest not reachable from the fabric"
    # every node probed it and the start succeeded: no failed operation anywhere
    assert cluster.failures() == []


def _move(cluster: Cluster, name: str, dst: str) -> None:
    """``crm_resource --move`` to dst, assert it was live-migrated, then ``--clear``."""
    src = cluster.locate(name)[0]
    seqs = cluster.node(src).qsup.last_seq(), cluster.node(dst).qsup.last_seq()
    gen = _generation(cluster, src, name)
    consoles = _consoles(cluster, name)
    t0 = time.monotonic()
    watch = CopyWatch(cluster, name).__enter__()  # the real QEMUs, every 20 ms, until idle
    try:
        cluster.crm("crm_resource", "--move", "--resource", name, "--node", dst)
        cluster.wait_located(name, dst, timeout=120)
        cluster.wait_idle()
        moved_s = time.monotonic() - t0
        watch.stop()
        copies = watch.check()
        _assert_migrated_by_pacemaker(cluster, name, src, dst)
        _migrated(cluster, name, src, dst, *seqs, consoles)
        assert _holders(cluster, name) == {dst: "running"}  # the source's stop forgot its entry
        assert _generation(cluster, dst, name) == gen, "the guest's generation changed: restarted, not migrated"
        assert cluster.fabric.ping(VM_IP)
        assert cluster.failures() == []
        _assert_one_qemu(cluster, name, dst)
        print(f"move {src} -> {dst}: {moved_s:.1f} s from crm_resource --move to idle; {copies}")
    finally:
        watch.stop()
        cluster.crm("crm_resource", "--clear", "--resource", name)
    cluster.wait_idle()
    assert cluster.locate(name) == [dst]  # stickiness: clearing the move does not move it back


def test_move_live_migrates(cluster, vm):
    src = cluster.locate(vm[0])[0]
    _move(cluster, vm[0], next(n.name for n in cluster.full if n.name != src))


def test_move_to_remote_node_live_migrates(cluster, vm):
    """The agent runs under pacemaker-remoted there: how Pacemaker scales past Corosync."""
    online = {n.get("name"): n.get("type") for n in cluster.status().findall("./nodes/node")
              if n.get("online") == "true"}
    assert online == {"node1": "member", "node2": "member", "node3": "member", "remote1": "remote"}
    _move(cluster, vm[0], "remote1")


def test_standby_evacuates_by_live_migration(cluster, vm):
    name = vm[0]
    src = cluster.locate(name)[0]
    seqs = {n.name: n.qsup.last_seq() for n in cluster.nodes}
    gen = _generation(cluster, src, name)
    consoles = _consoles(cluster, name)
    watch = CopyWatch(cluster, name).__enter__()  # the real QEMUs, every 20 ms, until idle
    try:
        cluster.crm("crm_attribute", "--node", src, "--name", "standby", "--update", "on")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # during the migration crm_mon lists both nodes
            where = cluster.locate(name)
            if len(where) == 1 and where[0] != src:
                break
            time.sleep(0.5)
        dst = cluster.locate(name)
        assert len(dst) == 1 and dst[0] != src, f"{dst}\n{cluster.diagnose(name)}"
        cluster.wait_located(name, dst[0])
        cluster.wait_idle()
        watch.stop()
        print(f"standby {src} -> {dst[0]}: {watch.check()}")
        _assert_migrated_by_pacemaker(cluster, name, src, dst[0])
        _migrated(cluster, name, src, dst[0], seqs[src], seqs[dst[0]], consoles)
        assert _holders(cluster, name) == {dst[0]: "running"}
        assert _generation(cluster, dst[0], name) == gen, "standby restarted the guest instead of migrating it"
        assert cluster.fabric.ping(VM_IP)
        _assert_one_qemu(cluster, name, dst[0])
    finally:
        watch.stop()
        cluster.crm("crm_attribute", "--node", src, "--name", "standby", "--update", "off")
    cluster.wait_idle()


def test_source_daemon_killed_during_migration(cluster):
    """SIGKILL the source's qsup daemon while Pacemaker live-migrates a guest, restart it a
    second later: whatever the outcome, the guest ends on exactly one node, the one Pacemaker
    reports."""
    name, ip, mac = "vm2", f"{GUEST_NET}.11", "52:54:00:c1:00:11"
    spec = cluster.workdir / f"{name}.json"
    spec.write_text(json.dumps(guest_spec(name, [{"mode": "routed", "mac": mac, "ip": ip}],
                                          append=f"guest.ip0={ip}/32")))
    # ~90 MB of non-zero pages at 10 MB/s: the stream runs for seconds, long enough to kill into
    cluster.add_resource(resource_xml(name, spec, peers=cluster.peer_map(), qsup=QSUP,
                                      extra_params={"migrate_options": "--max-bandwidth 10000000"}))
    watch = CopyWatch(cluster, name)
    try:
        src = _wait_started(cluster, name)
        daemon = cluster.node(src).qsup
        daemon.wait_console(name)
        dst = next(n.name for n in cluster.nodes if n.name != src)
        watch.__enter__()  # the real QEMUs, every 20 ms, until idle
        cluster.crm("crm_resource", "--move", "--resource", name, "--node", dst)
        deadline = time.monotonic() + 60
        while ((cluster.view(cluster.node(src), name) or {}).get("migration") or {}).get("status") != "active":
            assert time.monotonic() < deadline, cluster.view(cluster.node(src), name)
            time.sleep(0.1)
        daemon.kill()
        time.sleep(1)
        daemon.start()
        deadline = time.monotonic() + 120
        while True:
            where, running = cluster.locate(name), _running_on(cluster, name)
            if len(where) == 1 and running == where:
                break
            assert time.monotonic() < deadline, (where, _holders(cluster, name), cluster.operations(name))
            time.sleep(0.5)
        cluster.wait_idle()
        watch.stop()
        copies = watch.check()
        assert _running_on(cluster, name) == cluster.locate(name) and len(cluster.locate(name)) == 1
        assert _holders(cluster, name) == {cluster.locate(name)[0]: "running"}
        # and from the real processes: one live QEMU of the guest, where Pacemaker says
        _assert_one_qemu(cluster, name, cluster.locate(name)[0])
        assert cluster.fabric.ping(ip)
        print(f"killed {src}'s daemon mid-migration: guest on {cluster.locate(name)[0]}; "
              f"operations {[(n, op, res) for _, n, op, res in cluster.operations(name) if op != 'monitor']}; "
              f"{copies}")
    finally:
        watch.stop()
        cluster.crm("crm_resource", "--clear", "--resource", name, check=False)
        _remove_resource(cluster, name)
    assert _holders(cluster, name) == {}


def _remove_resource(c: Cluster, name: str) -> None:
    c.crm("crm_resource", "--resource", name, "--meta", "--set-parameter", "target-role",
          "--parameter-value", "Stopped", check=False)
    deadline = time.monotonic() + 90
    while c.locate(name) and time.monotonic() < deadline:
        time.sleep(0.5)
    c.wait_idle()
    c.cib("--delete", "-o", "resources", "--xml-text", f'<primitive id="{name}"/>')
    c.crm("crm_resource", "--cleanup", "--resource", name, check=False)
    c.wait_idle()


def test_ocf_tester_against_live_node(cluster):
    """ocf-tester runs the agent through its whole contract on node3's live qsup daemon
    (its own instance, outside Pacemaker), then one monitor call's cost is measured."""
    node = cluster.full[-1]
    name = "ocft"
    spec = cluster.workdir / f"{name}.json"
    spec.write_text(json.dumps(guest_spec(name, [])))
    agent = "/usr/lib/ocf/resource.d/qsup/qsup"  # the agent as Pacemaker runs it in the node
    r = node.run("ocf-tester", "-n", name, "-o", f"spec={spec}", "-o", f"qsup={QSUP}", "-o", "force_stop=true", agent,
                 check=False, timeout=240)
    assert r.returncode == 0 and "passed all tests" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
    assert name not in [v["name"] for v in node.qsup.cli_json("ls")]  # the tester stopped it

    # monitor cost: the agent (sh + curl on the socket) vs the Python CLI, on a running guest
    env = {"OCF_ROOT": "/usr/lib/ocf", "OCF_RESOURCE_INSTANCE": name, "OCF_RESKEY_spec": str(spec),
           "OCF_RESKEY_qsup": QSUP}
    node.run(agent, "start", env=env, timeout=90)
    try:
        cost = node.run("sh", "-c", _TIMING, env={**env, "QSUP": QSUP}, timeout=120).stdout.split()
        agent_ms, cli_ms = float(cost[0]), float(cost[1])
        print(f"monitor cost (median): agent {agent_ms:.1f} ms, `qsup show --json` {cli_ms:.1f} ms")
        assert agent_ms < cli_ms / 5, (agent_ms, cli_ms)
        assert node.run(agent, "monitor", env=env, check=False).returncode == 0
    finally:
        node.run(agent, "stop", env=env, timeout=90)
    assert node.run(agent, "monitor", env=env, check=False).returncode == 7


# median wall time (ms) of 20 agent calls and 3 CLI calls, measured inside the node: the agent's monitor and
# the CLI's show (what a Python agent would cost at least)
_TIMING = r"""
med() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
t() { s=$(date +%s%N); "$@" >/dev/null 2>&1; e=$(date +%s%N); echo $(( (e - s) / 1000 )); }
a=$(for i in $(seq 20); do t /usr/lib/ocf/resource.d/qsup/qsup monitor; done | med)
c=$(for i in $(seq 3); do t "$QSUP" show "$OCF_RESOURCE_INSTANCE" --json --socket /run/qsup/qsup.sock; done | med)
echo "$(awk "BEGIN{print $a/1000}") $(awk "BEGIN{print $c/1000}")"
"""


def test_fenced_node_guest_restarted_elsewhere_once(cluster):
    """Corosync dies on the guest's node (qsup and the guest live on): the others must fence
    it before starting the guest anywhere else, and then start it exactly once.  Runs last:
    the fenced node stays off."""
    cluster.enable_fencing()
    name, ip, mac = "vm3", f"{GUEST_NET}.12", "52:54:00:c1:00:12"
    spec = cluster.workdir / f"{name}.json"
    spec.write_text(json.dumps(guest_spec(name, [{"mode": "routed", "mac": mac, "ip": ip}],
                                          append=f"guest.ip0={ip}/32")))
    cluster.add_resource(resource_xml(name, spec, peers=cluster.peer_map(), qsup=QSUP))
    # on a full node (its corosync is what dies here)
    cluster.cib("--create", "-o", "constraints", "--xml-text",
                f'<rsc_location id="{name}-prefers" rsc="{name}" node="{cluster.full[-1].name}" score="100"/>')
    victim = cluster.node(_wait_started(cluster, name))
    if victim is not cluster.full[-1]:
        cluster.wait_located(name, cluster.full[-1].name)
        victim = cluster.full[-1]
    victim.qsup.wait_console(name)
    gen = _generation(cluster, victim.name, name)
    survivors = [n.name for n in cluster.nodes if n is not victim]
    seqs = {n: cluster.node(n).qsup.last_seq() for n in survivors}
    t0 = time.time()
    # the real QEMUs of the guest on every node, every 20 ms (not the daemons' views: the
    # victim's daemon dies with it, and one that does not answer says nothing about its QEMU)
    with CopyWatch(cluster, name) as watch:
        victim.corosync.signal(signal.SIGKILL)
        where = []
        deadline = time.monotonic() + 150
        while True:
            running = watch.running()
            if watch.doubles or watch.error:  # check() below says what it saw
                break
            if cluster.fenced and len(running) == 1 and running[0] in survivors:
                where = cluster.locate(name)
                if where == running:
                    break
            assert time.monotonic() < deadline, (cluster.fenced, watch.last, cluster.operations(name))
            time.sleep(0.1)
        cluster.wait_idle()
    copies = watch.check()
    assert [t for t, _ in cluster.fenced] == [victim.name]
    fence_t = cluster.fenced[0][1]
    assert not victim.processes()  # the switch left nothing of it: no qsup, no QEMU
    starts = [(n, res) for _, n, op, res in cluster.operations(name) if op == "start" and n in survivors]
    assert starts == [(where[0], "ok")], cluster.operations(name)
    # the survivor started the guest only after the victim was powered off (fence_t: the switch
    # had killed every process of the victim's namespaces)
    started = [e["ts"] for e in cluster.node(where[0]).qsup.events(since=seqs[where[0]])
               if e.get("instance") == name and e["type"] == "instance.started"]
    assert len(started) == 1 and started[0] > fence_t, (started, fence_t)
    _assert_one_qemu(cluster, name, where[0])
    # restarted, not migrated: a new generation (the fenced copy's died with its node)
    assert _generation(cluster, where[0], name) != gen
    assert cluster.fabric.ping(ip)
    print(f"fenced {victim.name} {fence_t - t0:.1f} s after its corosync died; {name} restarted on "
          f"{where[0]} {started[0] - fence_t:.1f} s after the fence ({copies})")
