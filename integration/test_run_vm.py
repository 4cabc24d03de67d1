"""Issue "Run one VM for real": `qsup run` boots a real guest and cleans up.

Each test runs `qsup run` inside a fresh network namespace (the "node"),
boots the real Debian-kernel guest under TCG, checks reachability and the
host configuration, then stops it and checks that nothing is left: no
qemu, tap, route, rule or record.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from topo import VENV_BIN, Ovs, guest_spec, image_dirs_line, node_with_uplink, pid_alive, veth

MAC1 = "52:54:00:aa:00:01"
MAC2 = "52:54:00:aa:00:02"


def tap_of(run, name, mac):
    ev = run.wait_event("instance.started", name)
    rec = json.loads((run.state_dir / "instances" / name / "record.json").read_text())
    return rec["nics"][mac]["tap"], ev["pid"]


def assert_nothing_left(node, run, name, pid, taps):
    assert not pid_alive(pid), "qemu still running"
    links = node.links()
    for t in taps:
        assert t not in links, f"tap {t} left behind"
    routes = node.run("ip", "route", "show", "table", "all")
    assert "10.99." not in routes, routes
    assert not (run.state_dir / "instances" / name).exists(), "record left behind"
    assert not (run.run_dir / name).exists(), "run dir left behind"
    rules = node.run("ip", "rule", "show")
    assert "iif qs" not in rules, rules


def test_routed_guest_is_pingable_and_cleaned_up(netns_factory, qsup_factory):
    node, client = netns_factory(), netns_factory()
    node_with_uplink(node, client)
    spec = guest_spec("r1", [{"mode": "routed", "mac": MAC1, "ip": "10.99.0.2", "ip6": "fd00:99::2"}],
                      append="guest.ip0=10.99.0.2/32 guest.ip6_0=fd00:99::2/128")
    run = qsup_factory(node, [spec])
    tap, pid = tap_of(run, "r1", MAC1)
    run.wait_console("r1")
    assert node.ping("10.99.0.2"), run.console("r1")[-2000:]
    # while it runs, the route and the per-tap sysctls are there
    assert "10.99.0.2 dev " + tap in node.run("ip", "route", "show", "10.99.0.2")
    assert node.sysctl(f"net.ipv4.conf.{tap}.proxy_arp") == "1"
    assert node.sysctl(f"net.ipv4.conf.{tap}.forwarding") == "1"
    assert node.sysctl(f"net.ipv6.conf.{tap}.proxy_ndp") == "1"
    assert tap in node.run("ip", "-6", "route", "show", "fd00:99::2")
    # the record is private and keyed by MAC
    rec_path = run.state_dir / "instances" / "r1" / "record.json"
    assert oct(os.stat(rec_path).st_mode & 0o777) == "0o600"
    assert oct(os.stat(rec_path.parent).st_mode & 0o777) == "0o700"
    assert run.stop() == 0
    types = [e["type"] for e in run.events if e.get("instance") == "r1"]
    assert types.index("instance.running") < types.index("instance.stopping") < types.index("instance.stopped")
    assert_nothing_left(node, run, "r1", pid, [tap])


def test_routed_ipv6_is_pingable(netns_factory, qsup_factory):
    node, client = netns_factory(), netns_factory()
    node_with_uplink(node, client)
    spec = guest_spec("r6", [{"mode": "routed", "mac": MAC1, "ip6": "fd00:99::6"}],
                      append="guest.ip6_0=fd00:99::6/128")
    run = qsup_factory(node, [spec])
    tap, pid = tap_of(run, "r6", MAC1)
    run.wait_console("r6")
    assert node.ping("fd00:99::6"), run.console("r6")[-2000:]
    assert run.stop() == 0
    assert_nothing_left(node, run, "r6", pid, [tap])


def _bridge(node, peer):
    node.run("ip", "link", "add", "br0", "type", "bridge")
    node.run("ip", "link", "set", "br0", "mtu", "1400", "up")
    veth(node, "vb0", peer, "eth0")
    node.run("ip", "link", "set", "vb0", "master", "br0")
    peer.run("ip", "link", "set", "eth0", "mtu", "1400")
    peer.run("ip", "addr", "add", "10.98.0.1/24", "dev", "eth0")


def test_bridged_guest_is_pingable_from_the_bridge(netns_factory, qsup_factory):
    node, peer = netns_factory(), netns_factory()
    _bridge(node, peer)
    br_mac = node.json("link", "show", "br0")[0]["address"]
    spec = guest_spec("b1", [{"mode": "bridged", "mac": MAC1, "link": "br0"}],
                      append="guest.ip0=10.98.0.2/24")
    run = qsup_factory(node, [spec])
    tap, pid = tap_of(run, "b1", MAC1)
    link = node.json("link", "show", tap)[0]
    assert link["master"] == "br0" and link["mtu"] == 1400
    run.wait_console("b1")
    assert peer.ping("10.98.0.2"), run.console("b1")[-2000:]
    assert node.json("link", "show", "br0")[0]["address"] == br_mac
    assert run.stop() == 0
    assert_nothing_left(node, run, "b1", pid, [tap])
    assert node.json("link", "show", "br0")[0]["address"] == br_mac


def test_one_instance_two_nics_routed_and_bridged(netns_factory, qsup_factory):
    node, client, peer = netns_factory(), netns_factory(), netns_factory()
    node_with_uplink(node, client)
    _bridge(node, peer)
    spec = guest_spec("two", [{"mode": "routed", "mac": MAC1, "ip": "10.99.0.3"},
                              {"mode": "bridged", "mac": MAC2, "link": "br0"}],
                      append="guest.ip0=10.99.0.3/32 guest.ip1=10.98.0.3/24")
    run = qsup_factory(node, [spec])
    tap1, pid = tap_of(run, "two", MAC1)
    tap2, _ = tap_of(run, "two", MAC2)
    run.wait_console("two")
    assert node.ping("10.99.0.3"), run.console("two")[-2000:]
    assert peer.ping("10.98.0.3"), run.console("two")[-2000:]
    assert run.stop() == 0
    assert_nothing_left(node, run, "two", pid, [tap1, tap2])


def test_qemu_sigkill_is_detected_within_a_second_and_undone(netns_factory, qsup_factory, tmp_path):
    """QEMU SIGKILLed: qsup notices at once and undoes what *it* made -- not what the kernel undoes.

    When QEMU dies its taps vanish, and with them every route through a tap.  So the
    NICs here leave state the kernel keeps: a routed NIC whose L3 lives in routing
    table 100 (the ``iif TAP lookup 100`` rule stays, "[detached]") and an
    openvswitch NIC (the OVS Port/Interface rows stay).  Only qsup's journal undo
    removes those.
    """
    node, client = netns_factory(), netns_factory()
    node_with_uplink(node, client)
    ovs = Ovs(node, tmp_path / "ovs")
    try:
        ovs.vsctl("add-br", "obr0", "--", "set", "bridge", "obr0", "datapath_type=netdev")
        spec = guest_spec("k1", [{"mode": "routed", "mac": MAC1, "ip": "10.99.0.4", "link": "100"},
                                 {"mode": "openvswitch", "mac": MAC2, "link": "obr0"}],
                          append="guest.ip0=10.99.0.4/32")
        run = qsup_factory(node, [spec], env=ovs.client_env)
        tap, pid = tap_of(run, "k1", MAC1)
        ovs_tap, _ = tap_of(run, "k1", MAC2)
        assert f"10.99.0.4 dev {tap}" in node.run("ip", "route", "show", "table", "100")
        assert f"iif {tap} lookup 100" in node.run("ip", "rule", "show")
        assert ovs_tap in ovs.vsctl("list-ports", "obr0").split()
        t_kill = time.time()
        os.kill(pid, signal.SIGKILL)
        crashed = run.wait_event("instance.crashed", "k1", timeout=10)
        assert crashed["ts"] - t_kill < 1.0, crashed["ts"] - t_kill
        # qsup run exits non-zero once its only instance crashed
        assert run.proc.wait(timeout=30) == 1
        assert_nothing_left(node, run, "k1", pid, [tap, ovs_tap])
        assert f"iif {tap}" not in node.run("ip", "rule", "show"), "the table's rule was not undone"
        assert node.run("ip", "route", "show", "table", "100") == ""
        assert ovs_tap not in ovs.vsctl("list-ports", "obr0").split(), "the OVS port was not undone"
        assert ovs.vsctl("--bare", "--columns=name", "find", "Interface", f"name={ovs_tap}").strip() == ""
        undone = [e for e in run.events if e["type"] == "netconf.undone"]
        assert undone and undone[0]["reason"] == "crash"
    finally:
        ovs.close()


def _run_bad(node, tmp_path, specs, config_extra="", hooks_dir="/nonexistent-qsup-hooks", json_events=False):
    paths = []
    for i, s in enumerate(specs):
        p = tmp_path / f"bad{i}.json"
        p.write_text(json.dumps(s))
        paths.append(str(p))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/state"\nrun_dir = "{tmp_path}/run"\naccel = "tcg"\n'
                   f'hooks_dir = "{hooks_dir}"\n{image_dirs_line(tmp_path, config_extra)}{config_extra}')
    before = node.links()
    r = subprocess.run(["ip", "netns", "exec", node.name, str(VENV_BIN / "qsup"), "run", "--config", str(cfg),
                        *(["--json"] if json_events else []), *paths], capture_output=True, text=True, timeout=60)
    assert node.links() == before, "a bad spec left a link behind"
    inst = tmp_path / "state" / "instances"
    assert not inst.exists() or not any(inst.iterdir()), "a bad spec left a record"
    assert "Traceback" not in r.stderr
    return r


@pytest.mark.parametrize("nic, field", [
    ({"mode": "routed", "mac": "52:54:00:zz:00:01", "ip": "10.99.0.5"}, "nics[0].mac"),
    ({"mode": "routed", "mac": MAC1, "ip": "10.99.0.999"}, "nics[0].ip"),
    ({"mode": "bridged", "mac": MAC1, "link": "nosuchbr"}, "nics[0].link"),
])
def test_bad_nic_specs_name_the_field_and_leave_nothing(netns_factory, tmp_path, nic, field):
    node = netns_factory()
    r = _run_bad(node, tmp_path, [guest_spec("bad", [nic])])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith(f"qsup: error: {field}:"), r.stderr


def test_bad_names_and_duplicates(netns_factory, tmp_path):
    node = netns_factory()
    r = _run_bad(node, tmp_path, [guest_spec("../x", [])])
    assert r.returncode == 2 and "qsup: error: name: invalid name '../x'" in r.stderr
    assert not (tmp_path / "x").exists()
    r = _run_bad(node, tmp_path, [guest_spec("dup", []), guest_spec("dup", [])])
    assert r.returncode == 2 and "name: duplicate" in r.stderr


def test_tags_reach_hooks_literally(netns_factory, qsup_factory, tmp_path):
    node, client = netns_factory(), netns_factory()
    node_with_uplink(node, client)
    hooks = tmp_path / "hooks"
    (hooks / "route4" / "after.d").mkdir(parents=True)
    out = tmp_path / "hook-env.json"
    script = hooks / "route4" / "after.d" / "10-dump"
    script.write_text(f"#!{VENV_BIN / 'python'}\nimport json, os, sys\n"
                      f"json.dump({{'env': dict(os.environ), 'argv': sys.argv}}, open({str(out)!r}, 'a'))\n"
                      f"open({str(out)!r}, 'a').write('\\n')\n")
    script.chmod(0o755)
    pwned = tmp_path / "pwned"
    tags = [f"$(touch {pwned})", f"; touch {pwned}", "it's \"quoted\"", f"`touch {pwned}`"]
    spec = guest_spec("t1", [{"mode": "routed", "mac": MAC1, "ip": "10.99.0.7"}],
                      append="guest.ip0=10.99.0.7/32", tags=tags)
    run = qsup_factory(node, [spec], hooks_dir=hooks)
    tap, pid = tap_of(run, "t1", MAC1)
    seen = [json.loads(l) for l in out.read_text().splitlines() if l.strip()]
    up = [s for s in seen if s["env"]["ACTION"] == "up"][0]
    assert json.loads(up["env"]["TAGS"]) == tags
    assert up["env"]["INSTANCE"] == "t1" and up["env"]["INTERFACE"] == tap and up["env"]["IP"] == "10.99.0.7"
    assert up["env"]["PHASE"] == "start"
    assert run.stop() == 0
    assert not pwned.exists(), "a tag was interpreted by a shell"
    assert_nothing_left(node, run, "t1", pid, [tap])
