"""Routed NICs for real: routes, rules, sysctls, gw6 in a fresh namespace each.

The code under test runs in an agent process inside the namespace
(nsutil.Agent); the test inspects the namespace from outside with ``ip -j``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from nsutil import AgentError, snapshot

pytestmark = pytest.mark.integration

TAP = "qsnct0"
MAC = "52:54:00:12:34:56"


def nic(**kw):
    d = {"instance": "vm1", "mac": MAC, "mode": "routed", "tap": TAP, "ip": "10.0.0.5", "ip6": "2001:db8::5"}
    d.update(kw)
    return d


def up(agent, jpath, n, **kw):
    agent.call("apply", journal=jpath, nic=n, phase="attach", reason="start", **kw)
    return agent.call("apply", journal=jpath, nic=n, phase="activate", reason="start", **kw)


def rules(ns, fam):
    return [r for r in ns.json(fam, "rule", "show") if r.get("iif") == TAP]


def routes(ns, fam, table):
    return [r for r in ns.json(fam, "route", "show", "table", table) if r.get("dev") == TAP]


def test_routed_v4_v6_in_table_link_apply_reapply_undo(ns, agent, tmp_path):
    j = str(tmp_path / "j" / "vm1.journal")
    agent.call("open_tap", name=TAP)
    before = snapshot(ns)
    up(agent, j, nic(link="100"))

    assert [(r["dst"], r.get("protocol")) for r in routes(ns, "-4", "100")] == [("10.0.0.5", "152")]
    assert [r["dst"] for r in routes(ns, "-6", "100")] == ["2001:db8::5"]
    assert routes(ns, "-4", "main") == []
    for fam in ("-4", "-6"):
        (r,) = rules(ns, fam)
        assert r["table"] == "100"
    addrs = {a["local"] for a in ns.json("addr", "show", "dev", TAP)[0]["addr_info"]}
    assert "fe80::1" in addrs
    for key in ("ipv4/conf/%s/proxy_arp", "ipv4/conf/%s/forwarding", "ipv6/conf/%s/proxy_ndp",
                "ipv6/conf/%s/forwarding"):
        assert ns.read("/proc/sys/net/" + key % TAP) == "1"
    link = ns.json("link", "show", TAP)[0]
    assert "UP" in link["flags"]

    # idempotent: nothing new on the host, nothing new in the journal
    during = snapshot(ns)
    n_entries = len(agent.call("journal", journal=j))
    t = agent.call("apply", journal=j, nic=nic(link="100"), phase="activate", reason="start")
    assert all(x.get("skipped") for x in t)
    assert snapshot(ns) == during
    assert len(agent.call("journal", journal=j)) == n_entries

    agent.call("undo", journal=j, reason="stop", phases=["activate"])
    assert routes(ns, "-4", "100") == [] and rules(ns, "-4") == [] and rules(ns, "-6") == []
    agent.call("undo", journal=j, reason="stop", phases=["attach"])
    assert snapshot(ns) == before


def test_routed_main_table_v4_only_makes_no_rules(ns, agent, tmp_path):
    j = str(tmp_path / "j")
    agent.call("open_tap", name=TAP)
    before = snapshot(ns)
    t = up(agent, j, nic(ip6=None, mtu=1400))
    assert [x["step"] for x in t if x["kind"] == "step"] == ["sysctl-ipv4", "neigh4", "route4"]
    assert [r["dst"] for r in routes(ns, "-4", "main")] == ["10.0.0.5"]
    assert rules(ns, "-4") == []
    assert ns.json("link", "show", TAP)[0]["mtu"] == 1400
    # the guest resolves without ARP: a permanent entry with the spec's MAC, tagged proto qsup
    (n,) = ns.json("neigh", "show", "dev", TAP)
    assert (n["dst"], n["lladdr"], n["state"]) == ("10.0.0.5", nic()["mac"].lower(), ["PERMANENT"]), n
    assert n.get("protocol") in ("152", 152), n
    agent.call("undo", journal=j, reason="stop")
    assert snapshot(ns) == before


def test_preexisting_routes_and_rules_are_kept(ns, agent, tmp_path):
    """An identical foreign route/rule is not ours; a route via another device is
    replaced and restored."""
    j = str(tmp_path / "j")
    agent.call("open_tap", name=TAP)
    agent.call("apply", journal=j, nic=nic(link="100"), phase="attach", reason="start")
    ns.run("ip", "link", "add", "other0", "type", "veth", "peer", "name", "other1")
    ns.run("ip", "link", "set", "other0", "up")
    ns.run("ip", "route", "add", "10.0.0.5/32", "dev", TAP, "table", "100")        # identical, foreign
    ns.run("ip", "-6", "route", "add", "2001:db8::5/128", "dev", "other0", "table", "100")  # different
    ns.run("ip", "rule", "add", "iif", TAP, "lookup", "100")                       # identical, foreign
    before = snapshot(ns)
    agent.call("apply", journal=j, nic=nic(link="100"), phase="activate", reason="start")
    assert len(rules(ns, "-4")) == 1  # no duplicate
    assert [r["dev"] for r in ns.json("-6", "route", "show", "table", "100") if r["dst"] == "2001:db8::5"] == [TAP]
    agent.call("undo", journal=j, reason="stop", phases=["activate"])
    assert snapshot(ns) == before


def test_undo_after_the_tap_vanished_counts_as_done(ns, agent, tmp_path):
    j = str(tmp_path / "j")
    before = snapshot(ns)
    agent.call("open_tap", name=TAP)
    up(agent, j, nic(link="100"))
    agent.call("close_tap", name=TAP)  # qemu exited: the tap and its routes are gone, rules are not
    assert len(rules(ns, "-4")) == 1
    agent.call("undo", journal=j, reason="crash")
    assert snapshot(ns) == before
    assert agent.call("journal", journal=j) == [] or all(
        e["status"] not in ("pending", "done") for e in agent.call("journal", journal=j))


def test_failure_mid_apply_rolls_back(ns, agent, tmp_path):
    """IPv6 disabled on the tap: gw6 fails after four steps succeeded; all are undone."""
    j = str(tmp_path / "j")
    agent.call("open_tap", name=TAP)
    agent.call("apply", journal=j, nic=nic(link="100"), phase="attach", reason="start")
    ns.run("sysctl", "-q", "-w", f"net.ipv6.conf.{TAP}.disable_ipv6=1")
    before = snapshot(ns)
    with pytest.raises(AgentError) as ei:
        agent.call("apply", journal=j, nic=nic(link="100"), phase="activate", reason="start")
    assert ei.value.type == "NetconfError"
    assert ei.value.failures[0]["step"] == "gw6"
    assert snapshot(ns) == before
    live = [e for e in agent.call("journal", journal=j) if e["status"] in ("pending", "done")]
    assert [e["step"] for e in live] == ["tap-up"]


def _hook(path, body):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def test_undo_keeps_going_past_failures_and_reports_all(ns, agent, tmp_path):
    j = str(tmp_path / "j")
    hd = tmp_path / "hooks"
    _hook(hd / "rule4" / "after.d" / "10-x", '[ "$ACTION" = down ] && exit 4\nexit 0\n')
    _hook(hd / "route6" / "after.d" / "10-y", '[ "$ACTION" = down ] && { echo nope; exit 5; }\nexit 0\n')
    agent.call("open_tap", name=TAP)
    agent.call("apply", journal=j, nic=nic(link="100"), phase="attach", reason="start")
    before = snapshot(ns)
    agent.call("apply", journal=j, nic=nic(link="100"), phase="activate", reason="start", hooks_dir=str(hd))
    with pytest.raises(AgentError) as ei:
        agent.call("undo", journal=j, reason="stop", phases=["activate"], hooks_dir=str(hd))
    assert [(f["step"], f["exit_code"]) for f in ei.value.failures] == [("route6", 5), ("rule4", 4)]
    assert "nope" in ei.value.failures[0]["output"]
    assert snapshot(ns) == before  # every default effect was still undone


def _wait_file(path, timeout=20):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) or not Path(path).read_text().strip():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return Path(path).read_text().strip()


def test_sigkill_mid_apply_then_recover_restores_host_exactly(ns, agents, tmp_path):
    """The applying process dies with route4 on the host but still 'pending' in the journal."""
    j = str(tmp_path / "j")
    holder = agents()  # holds the tap, so its effects do not simply vanish with the killed process
    holder.call("open_tap", name=TAP)
    holder.call("apply", journal=str(tmp_path / "attach-j"), nic=nic(link="100"), phase="attach", reason="start")
    # foreign and identical to what the plan makes: recovery must leave them alone
    ns.run("ip", "-6", "rule", "add", "iif", TAP, "lookup", "100")
    ns.run("ip", "-6", "route", "add", "2001:db8::5/128", "dev", TAP, "table", "100")
    before = snapshot(ns)
    marker = tmp_path / "paused"
    victim = agents({"QSUP_NETCONF_TEST_PAUSE_AFTER": "route4", "QSUP_NETCONF_TEST_PAUSE_MARKER": str(marker)})
    victim.send("apply", journal=j, nic=nic(link="100"), phase="activate", reason="start")
    _wait_file(marker)
    assert [r["dst"] for r in routes(ns, "-4", "100")] == ["10.0.0.5"]
    assert ns.read(f"/proc/sys/net/ipv4/conf/{TAP}/proxy_arp") == "1"
    victim.kill()

    rescuer = agents()
    pending = [e["step"] for e in rescuer.call("journal", journal=j) if e["status"] == "pending"]
    assert pending == ["route4", "rule4", "sysctl-ipv6", "gw6", "neigh6", "route6", "rule6"]
    rescuer.call("recover", journal=j, reason="crash")
    assert snapshot(ns) == before
    assert Path(j).read_text() == ""


def test_sigkill_inside_a_hook_then_recover(ns, agents, tmp_path):
    j = str(tmp_path / "j")
    hd = tmp_path / "hooks"
    marker = tmp_path / "hookpid"
    log = tmp_path / "log"
    _hook(hd / "route6" / "before.d" / "10-slow",
          f'echo "$ACTION $PHASE" >> {log}\n[ "$ACTION" = down ] && exit 0\necho $$ > {marker}\nexec sleep 60\n')
    holder = agents()
    holder.call("open_tap", name=TAP)
    holder.call("apply", journal=str(tmp_path / "attach-j"), nic=nic(link="100"), phase="attach", reason="start")
    before = snapshot(ns)
    victim = agents()
    victim.send("apply", journal=j, nic=nic(link="100"), phase="activate", reason="start", hooks_dir=str(hd))
    hook_pid = int(_wait_file(marker))
    try:
        assert len(rules(ns, "-4")) == 1  # the group before the hooked step is applied
        victim.kill()
    finally:
        os.kill(hook_pid, 9)  # the hook runs in its own session: we started it, we kill it
    rescuer = agents()
    rescuer.call("recover", journal=j, reason="crash", hooks_dir=str(hd))
    assert snapshot(ns) == before
    assert log.read_text().splitlines() == ["up start", "down crash"]


def test_multiqueue_tap_and_vnet_hdr(ns, agent):
    r = agent.call("open_tap", name=TAP, queues=4)
    assert r == {"fds": 4, "vnet_hdr": True}
    info = ns.json("-d", "link", "show", TAP)[0]["linkinfo"]["info_data"]
    assert info["type"] == "tap" and info.get("multi_queue") is True and info.get("vnet_hdr") is True
    assert info.get("persist") is not True
    agent.call("close_tap", name=TAP)
    assert TAP not in {l["ifname"] for l in ns.json("link", "show")}
