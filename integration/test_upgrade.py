"""QEMU upgrades in place (issue 19): ``qsup upgrade NAME`` moves a running guest into a new QEMU
on the same node, on the very same tap (taken back from the running QEMU with pidfd_getfd), over
a socketpair.  Real QEMU, the real guest (busy: memcheck rewrites its RAM throughout), ping from
the client, and netlink watched in the node's namespace the whole time."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from guestcheck import check_guest
from migtopo import BUSY, Pinger
from netwatch import NetlinkWatch
from netwatch import changes as _changes
from test_daemon import daemon_factory, node, routed  # noqa: F401 - fixtures
from topo import QEMU, QEMU_DEBIAN, pid_alive


def _ifindex(ns, tap: str) -> int:
    return int(ns.run("cat", f"/sys/class/net/{tap}/ifindex").strip())


def _upgrade_under_ping(dm, ns, client, name: str, ip: str, tap: str, *args: str) -> dict:
    watch = NetlinkWatch(ns)
    pinger = Pinger(client, ip)
    try:
        pinger.wait_replies(20)
        r = dm.cli_json("upgrade", name, *args, timeout=300)
        pinger.wait_replies(20)
    finally:
        counts = pinger.stop()
        lines = watch.stop()
    assert not _changes(lines, tap), lines
    # the guest is unreachable only while QEMU switches over (its own downtime), not while the
    # new QEMU starts and the RAM moves: the taps keep the running QEMU's framing (qsup puts it
    # back right after the new QEMU set its own); 100/s pings, a budget like migtopo.loss_budget
    downtime = r["upgrade"]["downtime_ms"] or 0
    assert counts["lost"] <= downtime // 10 + 10, (counts, r["upgrade"])
    return r


def test_upgrade_under_ping_keeps_the_guest_and_the_host_network(node, daemon_factory):  # noqa: F811
    """Two upgrades in a row of a busy guest: each time one QEMU pid is replaced by another, the
    tap's ifindex stays, netlink sees no address/route/rule/neighbour change (and no link change
    but the tap's offload notes), the guest never reboots and its memory stays whole."""
    ns, client = node
    dm = daemon_factory(ns)
    spec = routed("up1", "10.99.9.2", "52:54:00:99:00:02")
    spec["append"] += " " + BUSY
    v = dm.start_instance(spec)
    tap = v["nics"][0]["tap"]
    index = _ifindex(ns, tap)
    dm.wait_console("up1")
    assert v["qemu"]["outdated"] is False and v["machine"]
    pids = [v["pid"]]
    for _ in range(2):
        r = _upgrade_under_ping(dm, ns, client, "up1", "10.99.9.2", tap)
        u = r["upgrade"]
        assert u["old_pid"] == pids[-1] and u["pid"] != pids[-1] and u["mode"] == "live", u
        assert not pid_alive(u["old_pid"])
        assert r["view"]["pid"] == u["pid"] and r["view"]["state"] == "running"
        assert r["view"]["uid"] == v["uid"] and r["view"]["machine"] == v["machine"]
        pids.append(u["pid"])
        assert _ifindex(ns, tap) == index
    assert dm.console("up1").count("GUEST-READY") == 1, "the guest rebooted"
    check_guest(lambda: dm.console("up1"), lambda: client.ping("10.99.9.2", count=1, timeout=5), busy=True)
    kinds = [e["type"] for e in dm.events() if e.get("instance") == "up1"]
    assert kinds.count("instance.upgraded") == 2 and "instance.upgrade_failed" not in kinds
    # the record names the new QEMU: a restarted daemon reattaches to it
    dm.kill()
    dm.start()
    shown = dm.cli_json("show", "up1")
    assert shown["pid"] == pids[-1] and shown["state"] == "running"
    assert dm.cli_json("stop", "up1", "--timeout", "10")["state"] == "stopped"


@pytest.fixture
def bad_qemu():
    """A root-owned 'QEMU' that refuses to start, in a root-owned 0755 directory."""
    d = Path(tempfile.mkdtemp(prefix="qsup-badqemu-", dir="/usr/local/lib"))
    os.chmod(d, 0o755)
    exe = d / "qemu-system-x86_64"
    exe.write_text("#!/bin/sh\necho 'qemu-system-x86_64: this build refuses to start' >&2\nexit 1\n")
    os.chmod(exe, 0o755)
    yield str(exe)
    shutil.rmtree(d)


def test_a_failed_upgrade_leaves_the_guest_on_its_qemu(node, daemon_factory, bad_qemu, tmp_path):  # noqa: F811
    """The new binary refuses to start: 422 with its words, the guest runs on, on the same pid;
    nothing of the new QEMU is left (no .next socket).  A --qemu that others may write is refused."""
    ns, client = node
    dm = daemon_factory(ns)
    v = dm.start_instance(routed("up2", "10.99.9.3", "52:54:00:99:00:03"))
    dm.wait_console("up2")
    r = dm.cli("upgrade", "up2", "--qemu", bad_qemu, check=False)
    assert r.returncode != 0 and "refuses to start" in r.stderr, r.stderr
    shown = dm.cli_json("show", "up2")
    assert shown["pid"] == v["pid"] and shown["state"] == "running"
    assert not list((dm.workdir / "run" / "up2").glob("*.next")) if (dm.workdir / "run").exists() else True
    assert client.ping("10.99.9.3", timeout=10)
    # a real QEMU that cannot run this guest: Debian's 7.2 has no pc-i440fx-10.0 (the pinned machine)
    r = dm.cli("upgrade", "up2", "--qemu", QEMU_DEBIAN, check=False)
    assert r.returncode != 0 and "machine" in r.stderr, r.stderr
    assert dm.cli_json("show", "up2")["pid"] == v["pid"]
    assert client.ping("10.99.9.3", timeout=10), "the guest's network broke"
    # a multiqueue NIC: its queue fds would be shared by both QEMUs, and the new one detaches the
    # queues beyond the first at start (QEMU 10 then aborts: "could not disable queue")
    mq = routed("up2q", "10.99.9.7", "52:54:00:99:00:07")
    mq["nics"][0]["queues"] = 2
    vq = dm.start_instance(mq)
    r = dm.cli("upgrade", "up2q", check=False)
    assert r.returncode != 0 and "nics[0].queues" in r.stderr and "multiqueue" in r.stderr, r.stderr
    assert dm.cli_json("show", "up2q")["pid"] == vq["pid"]
    assert dm.cli_json("stop", "up2q", "--timeout", "10")["state"] == "stopped"
    writable = tmp_path / "qemu"
    writable.write_text("#!/bin/sh\nexit 1\n")
    os.chmod(writable, 0o777)
    r = dm.cli("upgrade", "up2", "--qemu", str(writable), check=False)
    assert r.returncode != 0 and "qemu" in r.stderr and "writable" in r.stderr, r.stderr
    kinds = [e["type"] for e in dm.events() if e.get("instance") == "up2"]
    assert "instance.upgrade_failed" in kinds and "instance.upgraded" not in kinds
    assert dm.cli_json("stop", "up2", "--timeout", "10")["state"] == "stopped"


def test_upgrade_from_debian_7_2_to_10_0_with_the_machine_type_pinned(node, daemon_factory):  # noqa: F811
    """A busy guest started on Debian's 7.2 (machine pinned pc-i440fx-7.2) moves into 10.0.2.  7.2's
    TCG loses writes between dirty-bitmap syncs, so the guest is copied stopped (one pass)."""
    ns, client = node
    dm = daemon_factory(ns, extra_config=f'qemu = "{QEMU_DEBIAN}"\n')
    spec = routed("up3", "10.99.9.4", "52:54:00:99:00:04")
    spec["append"] += " " + BUSY
    v = dm.start_instance(spec)
    assert v["machine"] == "pc-i440fx-7.2" and v["qemu"]["version"].startswith("7.2"), v
    dm.wait_console("up3")
    r = _upgrade_under_ping(dm, ns, client, "up3", "10.99.9.4", v["nics"][0]["tap"], "--qemu", QEMU)
    u = r["upgrade"]
    assert u["mode"] == "stopped-copy" and r["view"]["qemu"]["version"].startswith("10.0"), r
    assert r["view"]["machine"] == "pc-i440fx-7.2"
    assert dm.console("up3").count("GUEST-READY") == 1, "the guest rebooted"
    check_guest(lambda: dm.console("up3"), lambda: client.ping("10.99.9.4", count=1, timeout=5), busy=True)
    assert dm.cli_json("stop", "up3", "--timeout", "10")["state"] == "stopped"


@pytest.mark.parametrize("step", ["upgrade.spawned", "upgrade.streaming", "upgrade.completed", "upgrade.cont"])
def test_a_daemon_killed_at_each_step_of_an_upgrade_leaves_one_qemu(node, daemon_factory, step):  # noqa: F811
    """``kill -9`` of the daemon at each step (QSUP_TEST_CRASH_AT), then a plain restart: exactly
    one QEMU of the guest is alive, the one the daemon shows, and the guest runs, whole."""
    ns, client = node
    dm = daemon_factory(ns, env={"QSUP_TEST_CRASH_AT": step})
    spec = routed("upk", "10.99.9.5", "52:54:00:99:00:05")
    spec["append"] += " " + BUSY
    v = dm.start_instance(spec)
    dm.wait_console("upk")
    r = dm.cli("upgrade", "upk", check=False, timeout=120)
    assert r.returncode != 0  # the daemon died under the request
    dm.kill()  # it is dead already: this reaps it and closes its log
    rec = json.loads((dm.state_dir / "instances" / "upk" / "record.json").read_text())
    assert rec["upgrade"] and rec["upgrade"]["pid"] != v["pid"], rec  # the new QEMU, recorded
    dm._env = None  # noqa: SLF001 - the next daemon crashes nowhere
    dm.start()
    shown = dm.cli_json("show", "upk")
    live = [int(p) for p in os.listdir("/proc") if p.isdigit() and _is_guest(int(p), "upk")]
    assert live == [shown["pid"]], (live, shown["pid"], step)
    assert shown["state"] == "running", shown
    if step in ("upgrade.spawned", "upgrade.streaming"):
        assert shown["pid"] == v["pid"]  # the old QEMU kept the guest
    else:
        assert shown["pid"] != v["pid"]  # the new one had it
    assert dm.console("upk").count("GUEST-READY") == 1, "the guest rebooted"
    check_guest(lambda: dm.console("upk"), lambda: client.ping("10.99.9.5", count=1, timeout=5), busy=True)
    assert dm.cli_json("stop", "upk", "--timeout", "10")["state"] == "stopped"


def _is_guest(pid: int, name: str) -> bool:
    try:
        return f"guest={name},".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.fixture
def replaceable_qemu():
    """A copy of the test QEMU in a root-owned 0755 directory, which a test can 'update' the way a
    package does (a new file renamed over the old one)."""
    d = Path(tempfile.mkdtemp(prefix="qsup-qemu-", dir="/usr/local/lib"))
    os.chmod(d, 0o755)
    exe = d / "qemu-system-x86_64"
    shutil.copy2(QEMU, exe)

    def update() -> None:
        tmp = d / ".qemu-new"
        shutil.copy2(QEMU, tmp)
        os.replace(tmp, exe)

    yield str(exe), update
    shutil.rmtree(d)


def test_upgrade_all_after_a_package_update(node, daemon_factory, replaceable_qemu, tmp_path):  # noqa: F811
    """Three guests -- routed, bridged and OVS NICs, one with a disk -- on a QEMU binary that is then
    replaced on disk: each is reported outdated (``show``, the event, the Prometheus gauge), and
    ``qsup upgrade --all --parallel 2`` moves every one into the installed binary: new pids, not
    outdated any more, each still answering, no netlink change."""
    from topo import Ovs

    ns, client = node
    exe, update = replaceable_qemu
    ovs = Ovs(ns, tmp_path / "ovs")
    try:
        ns.run("ip", "link", "add", "br0", "type", "bridge")
        ns.run("ip", "addr", "add", "10.98.0.1/24", "dev", "br0")
        ns.run("ip", "link", "set", "br0", "up")
        ovs.vsctl("add-br", "obr0", "--", "set", "bridge", "obr0", "datapath_type=netdev")
        dm = daemon_factory(ns, extra_config=f'qemu = "{exe}"\n', env=ovs.client_env)
        disk = tmp_path / "data.raw"
        subprocess.run(["qemu-img", "create", "-f", "raw", str(disk), "8M"], check=True, capture_output=True)
        disk.chmod(0o600)
        r1 = routed("ua", "10.99.9.10", "52:54:00:99:00:10")
        r1["disks"] = [{"id": "data", "path": str(disk), "format": "raw"}]
        b1 = routed("ub", "10.99.9.11", "52:54:00:99:00:11")
        b1["nics"].append({"mode": "bridged", "mac": "52:54:00:99:01:11", "link": "br0"})
        o1 = routed("uo", "10.99.9.12", "52:54:00:99:00:12")
        o1["nics"].append({"mode": "openvswitch", "mac": "52:54:00:99:02:12", "link": "obr0"})
        views = {s["name"]: dm.start_instance(s) for s in (r1, b1, o1)}
        for n in views:
            dm.wait_console(n)
        assert not any(dm.cli_json("show", n)["qemu"]["outdated"] for n in views)
        update()
        assert all(dm.cli_json("show", n)["qemu"]["outdated"] for n in views)
        import httpx

        with httpx.Client(transport=httpx.HTTPTransport(uds=str(dm.socket))) as http:
            text = http.get("http://qsup/metrics").text
        for n in views:
            assert re.search(rf'^qsup_instance_qemu_outdated{{instance="{n}",version="10\.0"}} 1\.0$', text, re.M), text
        tail = dm.tail(since=0)
        try:
            for n in views:
                tail.wait_for("instance.outdated", n, timeout=30)
        finally:
            tail.close()
        watch = NetlinkWatch(ns)
        try:
            out = dm.cli_json("upgrade", "--all", "--parallel", "2", timeout=600)
        finally:
            lines = watch.stop()
        assert sorted(out["upgraded"]) == sorted(views) and not out["failed"], out
        taps = {t["tap"] for n in views for t in dm.cli_json("show", n)["nics"]}
        assert not [ln for ln in _changes(lines, "") if not any(t in ln for t in taps)], lines
        for n, v in views.items():
            shown = dm.cli_json("show", n)
            assert shown["pid"] != v["pid"] and not pid_alive(v["pid"]) and not shown["qemu"]["outdated"]
            assert dm.console(n).count("GUEST-READY") == 1
        for ip in ("10.99.9.10", "10.99.9.11", "10.99.9.12"):
            assert client.ping(ip, timeout=10), ip
        assert [d["id"] for d in dm.cli_json("show", "ua")["disks"]] == ["data"]
        assert ovs.vsctl("list-ports", "obr0").split() == [t["tap"] for t in dm.cli_json("show", "uo")["nics"][1:]]
        for n in views:
            assert dm.cli_json("stop", n, "--timeout", "10")["state"] == "stopped"
    finally:
        ovs.close()


def test_upgrade_with_qemu_chroot_gets_a_fresh_jail(node, daemon_factory):  # noqa: F811
    """With ``qemu_chroot = true`` the new QEMU is jailed as the old one was: its own mount
    namespace, the jail's tmpfs as its root, the same uid."""
    from test_qemu_jail import JAIL, assert_jailed

    ns, client = node
    dm = daemon_factory(ns, extra_config=JAIL)
    v = dm.start_instance(routed("upj", "10.99.9.6", "52:54:00:99:00:06"))
    assert_jailed(dm, "upj", v["pid"])
    dm.wait_console("upj")
    r = dm.cli_json("upgrade", "upj", timeout=300)
    new = r["upgrade"]["pid"]
    assert new != v["pid"] and not pid_alive(v["pid"])
    assert_jailed(dm, "upj", new)
    assert os.readlink(f"/proc/{new}/ns/mnt") != os.readlink(f"/proc/{dm.pid}/ns/mnt")
    assert r["view"]["uid"] == v["uid"]
    assert client.ping("10.99.9.6", timeout=10)
    assert dm.cli_json("stop", "upj", "--timeout", "10")["state"] == "stopped"


def test_upgrade_after_a_nic_hotplug_keeps_both_nics(node, daemon_factory):  # noqa: F811
    """A NIC hotplugged with ``qsup nic add`` reached QEMU over SCM_RIGHTS, not on its command
    line: the upgrade finds its tap by the descriptors' fdinfo (``iff:``), and the new QEMU gets
    both NICs at their slots; both addresses answer after, nothing on the host network moved."""
    ns, client = node
    dm = daemon_factory(ns)
    spec = routed("upn", "10.99.9.20", "52:54:00:99:00:20")
    spec["append"] += " guest.ip1=10.99.9.21/32"  # for eth1, once it appears
    dm.start_instance(spec)
    dm.wait_console("upn")
    dm.cli_json("nic", "add", "upn", json.dumps({"mode": "routed", "ip": "10.99.9.21", "mac": "52:54:00:99:01:20"}))
    dm.wait_console("upn", "guest-nic: + eth1", timeout=60)
    assert client.ping("10.99.9.21", timeout=30)
    shown = dm.cli_json("show", "upn")
    taps = [n["tap"] for n in shown["nics"]]
    watch = NetlinkWatch(ns)
    try:
        r = dm.cli_json("upgrade", "upn", timeout=300)
    finally:
        lines = watch.stop()
    assert not [ln for ln in _changes(lines, "") if not any(t in ln for t in taps)], lines
    after = dm.cli_json("show", "upn")
    assert after["pid"] == r["upgrade"]["pid"] != shown["pid"]
    assert [(n["tap"], n["pci_slot"]) for n in after["nics"]] == [(n["tap"], n["pci_slot"]) for n in shown["nics"]]
    for ip in ("10.99.9.20", "10.99.9.21"):
        assert client.ping(ip, timeout=10), ip
    assert dm.cli_json("stop", "upn", "--timeout", "10")["state"] == "stopped"
