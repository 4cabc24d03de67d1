"""`qsup serve` for real: guests started through the CLI survive a SIGKILLed daemon.

Each test runs the daemon inside a fresh network namespace (the "node") with an uplink to a
client namespace, boots the real test guest under TCG through `qsup start`, and checks what a
user would: reachability (ping from the client), routes, `qsup ls/show/events` output, the
event stream's continuity across a daemon restart, file modes, and that nothing is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time

import pytest

from topo import EventTail, QsupDaemon, guest_spec, node_with_uplink, pid_alive


@pytest.fixture
def daemon_factory(tmp_path):
    made: list[QsupDaemon] = []
    tails: list[EventTail] = []

    def make(ns, **kw) -> QsupDaemon:
        d = tmp_path / f"node{len(made)}"
        d.mkdir()
        dm = QsupDaemon(ns, d, **kw)
        made.append(dm)
        return dm

    make.tails = tails
    yield make
    for t in tails:
        t.close()
    leaked = []
    for dm in made:
        leaked += dm.close()
    assert not leaked, f"qemu pids still alive at teardown: {leaked}"


@pytest.fixture
def node(netns_factory):
    node, client = netns_factory(), netns_factory()
    node_with_uplink(node, client)
    client.run("ip", "route", "add", "10.99.0.0/16", "via", "192.168.101.1")  # the guests, via the node
    return node, client


def routed(name: str, ip: str, mac: str) -> dict:
    return guest_spec(name, [{"mode": "routed", "mac": mac, "ip": ip}], append=f"guest.ip0={ip}/32")


def mode(p) -> str:
    return oct(stat.S_IMODE(os.stat(p).st_mode))


def test_three_guests_survive_a_daemon_sigkill(node, daemon_factory):
    node_ns, client = node
    dm = daemon_factory(node_ns)
    guests = {f"g{i}": (f"10.99.0.{10 + i}", f"52:54:00:aa:01:{i:02x}") for i in (1, 2, 3)}
    views = {n: dm.start_instance(routed(n, ip, mac)) for n, (ip, mac) in guests.items()}
    assert all(v["state"] == "running" and v["pid"] for v in views.values())
    for n, (ip, _) in guests.items():
        dm.wait_console(n)
        assert client.ping(ip), dm.console(n)[-1500:]
    taps = {n: v["nics"][0]["tap"] for n, v in views.items()}

    # private state: socket 0660, dirs 0700, records and the event log 0600
    assert mode(dm.socket) == "0o660"
    assert mode(dm.state_dir) == "0o700" and mode(dm.state_dir / "instances") == "0o700"
    assert mode(dm.state_dir / "events.db") == "0o600"
    for n in guests:
        assert mode(dm.state_dir / "instances" / n) == "0o700"
        assert mode(dm.state_dir / "instances" / n / "record.json") == "0o600"

    last_before = dm.events()[-1]["seq"]
    old_pid = dm.pid
    dm.kill()
    assert not pid_alive(old_pid)
    assert all(pid_alive(v["pid"]) for v in views.values()), "qemu died with the daemon"
    assert dm.socket.exists()  # stale socket left by the SIGKILL; the new daemon replaces it

    t0 = time.monotonic()
    dm.start()
    ready_s = time.monotonic() - t0
    after = {v["name"]: v for v in dm.cli_json("ls")}
    assert set(after) == set(guests)
    for n, v in views.items():
        assert after[n]["state"] == "running", after[n]
        assert after[n]["pid"] == v["pid"], "reattached to a different qemu?"
        shown = dm.cli_json("show", n)
        assert {"name", "state", "nics"} <= set(shown) and shown["nics"][0]["tap"] == taps[n]
    for n, (ip, _) in guests.items():
        assert client.ping(ip, timeout=10), f"{n} unreachable after reattach"
        assert f"{ip} dev {taps[n]}" in node_ns.run("ip", "route", "show", ip)

    # the event stream resumes with no gap: seq continues at +1, reattach is in it
    resumed = dm.events(since=last_before)
    assert resumed[0]["seq"] == last_before + 1
    assert [e["seq"] for e in resumed] == list(range(last_before + 1, last_before + 1 + len(resumed)))
    reattached = {e["instance"] for e in resumed if e["type"] == "instance.reattached"}
    assert reattached == set(guests)
    ready = [e for e in resumed if e["type"] == "daemon.ready"]
    assert ready and sorted(ready[0]["reattached"]) == sorted(guests)
    assert ready_s < 20, ready_s

    # and the reattached instances are fully controllable: stop them all
    for n in guests:
        v = dm.cli_json("stop", n, "--timeout", "5")
        assert v["state"] == "stopped", v
        assert not pid_alive(views[n]["pid"])
        assert node_ns.run("ip", "route", "show", guests[n][0]) == ""
        assert taps[n] not in node_ns.links()
    assert not list((dm.state_dir / "instances").iterdir())


def test_tailer_sees_the_lifecycle_in_order_and_qmp_shell_works(node, daemon_factory):
    node_ns, client = node
    dm = daemon_factory(node_ns)
    tail = dm.tail()
    daemon_factory.tails.append(tail)
    tail.wait_for("daemon.ready")  # the tailer is connected before the instance exists
    v = dm.start_instance(routed("t1", "10.99.0.21", "52:54:00:aa:02:01"))
    assert v["state"] == "running"

    r = dm.cli("qmp", "t1", input="query-status\n", timeout=30)
    assert '"running"' in r.stdout and '"status"' in r.stdout, r.stdout + r.stderr

    dm.wait_console("t1")
    assert dm.cli_json("stop", "t1", "--timeout", "10")["state"] == "stopped"
    tail.wait_for("instance.stopped", "t1")
    mine = [e for e in tail.events if e.get("instance") == "t1"]
    order = [e["type"] for e in mine if e["type"] in
             ("instance.starting", "instance.running", "instance.stopping", "instance.stopped")]
    assert order == ["instance.starting", "instance.running", "instance.stopping", "instance.stopped"]
    seqs = [e["seq"] for e in tail.events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "the follower missed or repeated events"
    # a stopped instance has no monitor to open
    r = dm.cli("qmp", "t1", check=False)
    assert r.returncode == 1 and "stopped" in r.stderr


def test_qemu_killed_while_the_daemon_is_down_is_cleaned_up(node, daemon_factory):
    """The tap (and routes through it) vanish with QEMU; the policy rule does not: the journal must."""
    node_ns, client = node
    dm = daemon_factory(node_ns)
    spec = guest_spec("k1", [{"mode": "routed", "mac": "52:54:00:aa:03:01", "ip": "10.99.0.31", "link": "100"}],
                      append="guest.ip0=10.99.0.31/32")
    v = dm.start_instance(spec)
    tap, pid = v["nics"][0]["tap"], v["pid"]
    assert f"10.99.0.31 dev {tap}" in node_ns.run("ip", "route", "show", "table", "100")
    assert f"iif {tap} lookup 100" in node_ns.run("ip", "rule", "show")
    last = dm.events()[-1]["seq"]
    dm.kill()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    # QEMU is gone and its tap with it (the kernel unregisters it just after the last fd
    # closes, so give it a moment), but the rule is host state nobody has undone yet
    deadline = time.monotonic() + 10
    while tap in node_ns.links() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tap not in node_ns.links()
    assert f"iif {tap} [detached] lookup 100" in node_ns.run("ip", "rule", "show")
    dm.start()
    assert f"iif {tap}" not in node_ns.run("ip", "rule", "show"), "journal not undone on restart"
    assert "10.99.0.31" not in node_ns.run("ip", "route", "show", "table", "all")
    assert node_ns.sysctl("net.ipv4.ip_forward") == "1"  # the node's own settings are untouched
    shown = dm.cli_json("show", "k1")
    assert shown["state"] == "crashed" and "while qsup was down" in (shown["error"] or "")
    evs = [e for e in dm.events(since=last) if e.get("instance") == "k1"]
    types = [e["type"] for e in evs]
    assert "netconf.undone" in types and "instance.crashed" in types
    assert types.index("netconf.undone") < types.index("instance.crashed")
    assert not (dm.state_dir / "instances" / "k1").exists()
    assert not (dm.run_dir / "k1").exists()
    # stopping an instance that already ended reports its final state (no error)
    assert dm.cli_json("stop", "k1")["state"] == "crashed"


def test_sigterm_leaves_guests_running_and_stop_mode_stops_them(node, daemon_factory):
    node_ns, client = node
    dm = daemon_factory(node_ns)
    v = dm.start_instance(routed("s1", "10.99.0.41", "52:54:00:aa:04:01"))
    pid, tap = v["pid"], v["nics"][0]["tap"]
    dm.wait_console("s1")
    assert dm.terminate() == 0
    assert pid_alive(pid), "SIGTERM with on_shutdown=leave killed the guest"
    assert client.ping("10.99.0.41"), "guest unreachable after the daemon left"
    assert not dm.socket.exists()  # a clean exit removes its socket
    assert "daemon.stopping" in [e["type"] for e in _read_events(dm)]

    dm.write_config(extra_config='on_shutdown = "stop"\n')
    dm.start()
    assert dm.cli_json("show", "s1")["pid"] == pid
    assert dm.terminate() == 0
    assert not pid_alive(pid), "on_shutdown=stop left the guest running"
    assert node_ns.run("ip", "route", "show", "10.99.0.41") == ""
    assert tap not in node_ns.links()
    assert not (dm.state_dir / "instances" / "s1").exists()
    types = [e["type"] for e in _read_events(dm) if e.get("instance") == "s1"]
    assert types[-2:] == ["netconf.undone", "instance.stopped"] or types[-1] == "instance.stopped", types


def _read_events(dm: QsupDaemon) -> list[dict]:
    """The event log read straight from its file (the daemon is not running)."""
    import sqlite3

    con = sqlite3.connect(f"file:{dm.state_dir / 'events.db'}?mode=ro", uri=True)
    try:
        return [json.loads(b) for (b,) in con.execute("SELECT body FROM events ORDER BY seq")]
    finally:
        con.close()
