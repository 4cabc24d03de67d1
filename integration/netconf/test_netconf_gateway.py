"""What exactly makes a routed guest reach its on-link gateway 169.254.0.1.

The guest has ``IP/32`` and ``default via 169.254.0.1``.  Nobody owns that
address; the host must answer the guest's ARP by proxy.  The kernel does so
only when ALL of these hold (each one is proven necessary below):

* ``proxy_arp=1`` on the tap,
* ``forwarding=1`` on the tap,
* a unicast route covering 169.254.0.1 through another device, found by
  the lookup the kernel does as if forwarding from the tap (so with
  ``iif TAP lookup LINK`` it falls through table LINK to main) -- normally
  the host's default route.

The fake-guest tests write real ARP requests into the tap fd and read the
kernel's answer; the last test boots the real test guest with qemu and
pings it (v4 and v6) from a client namespace through the host.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from nsutil import ROOT, Netns, sh
from topo import require

pytestmark = pytest.mark.integration

TAP = "qsnct2"
MAC = "52:54:00:12:34:99"


def nic(**kw):
    d = {"instance": "vm1", "mac": MAC, "mode": "routed", "tap": TAP, "ip": "10.0.0.5"}
    d.update(kw)
    return d


def uplink(ns):
    ns.run("ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1")
    ns.run("ip", "link", "set", "up0", "up")
    ns.run("ip", "link", "set", "up1", "up")
    ns.run("ip", "addr", "add", "192.0.2.1/24", "dev", "up0")


@pytest.mark.parametrize("case,link,answered", [
    ("complete", None, True),
    ("complete, table LINK falls through to main", "100", True),
    ("no route covering 169.254.0.1", None, False),
    ("forwarding=0 on the tap", None, False),
    ("proxy_arp=0 on the tap", None, False),
])
def test_proxy_arp_for_the_gateway_needs_exactly_this(ns, agent, tmp_path, case, link, answered):
    uplink(ns)
    if case != "no route covering 169.254.0.1":
        ns.run("ip", "route", "add", "default", "via", "192.0.2.2")
    j = str(tmp_path / "j")
    agent.call("open_tap", name=TAP)
    for phase in ("attach", "activate"):
        agent.call("apply", journal=j, nic=nic(link=link), phase=phase, reason="start")
    if case.startswith("forwarding=0"):
        ns.run("sysctl", "-q", "-w", f"net.ipv4.conf.{TAP}.forwarding=0")
    if case.startswith("proxy_arp=0"):
        ns.run("sysctl", "-q", "-w", f"net.ipv4.conf.{TAP}.proxy_arp=0")
    tap_mac = ns.json("link", "show", TAP)[0]["address"]
    got = agent.call("arp_probe", tap=TAP, mac=MAC, ip="10.0.0.5", target="169.254.0.1",
                     timeout=1.5 if answered else 1.0)
    assert got == (tap_mac if answered else None)
    agent.call("undo", journal=j, reason="stop")


GUEST = ROOT / "build" / "guest"


@pytest.fixture
def client():
    c = Netns("qsncc")
    try:
        yield c
    finally:
        c.close()


def _wait_for(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    tail = path.read_text(errors="replace")[-2000:] if path.exists() else ""
    raise AssertionError(f"{text!r} not in {path}:\n{tail}")


def _ping(ns: Netns, addr: str, v6: bool = False) -> bool:
    """True once one echo gets through (TCG guests are slow to start), and then 3 of 3."""
    ping = ["ping"] if shutil.which("ping") else ["busybox", "ping"]
    base = ["ip", "netns", "exec", ns.name, *ping, "-6" if v6 else "-4"]
    deadline = time.monotonic() + 60  # TCG guests crawl when the machine is busy
    while time.monotonic() < deadline:
        if subprocess.run(base + ["-c", "1", "-W", "2", addr], capture_output=True).returncode == 0:
            r = subprocess.run(base + ["-c", "3", "-W", "3", addr], capture_output=True, text=True)
            return r.returncode == 0 and " 0% packet loss" in r.stdout
    return False


def test_real_guest_reaches_its_gateway_v4_and_v6(ns, client, agent, tmp_path):
    require((GUEST / "vmlinuz").exists(), "test guest not built: run `make guest`")
    # node <-> client uplink; the node's default route covers 169.254.0.1
    ns.run("ip", "link", "add", "uplink", "type", "veth", "peer", "name", "down0", "netns", client.name)
    ns.run("ip", "link", "set", "uplink", "up")
    client.run("ip", "link", "set", "down0", "up")
    ns.run("ip", "addr", "add", "192.0.2.1/24", "dev", "uplink")
    ns.run("ip", "-6", "addr", "add", "fd00::1/64", "dev", "uplink", "nodad")
    client.run("ip", "addr", "add", "192.0.2.2/24", "dev", "down0")
    client.run("ip", "-6", "addr", "add", "fd00::2/64", "dev", "down0", "nodad")
    ns.run("ip", "route", "add", "default", "via", "192.0.2.2")
    ns.run("ip", "-6", "route", "add", "default", "via", "fd00::2")
    # host policy, not netconf's: forward what arrives on the uplink (v4) and at all (v6)
    ns.run("sysctl", "-q", "-w", "net.ipv4.conf.uplink.forwarding=1", "net.ipv6.conf.all.forwarding=1")
    client.run("ip", "route", "add", "10.0.0.5/32", "via", "192.0.2.1")
    client.run("ip", "-6", "route", "add", "2001:db8::5/128", "via", "fd00::1")
    # table LINK: the admin routes traffic from the uplink through it too
    ns.run("ip", "rule", "add", "iif", "uplink", "lookup", "100")
    ns.run("ip", "-6", "rule", "add", "iif", "uplink", "lookup", "100")

    j = str(tmp_path / "j")
    n = nic(ip6="2001:db8::5", link="100")
    agent.call("open_tap", name=TAP)
    agent.call("apply", journal=j, nic=n, phase="attach", reason="start")
    agent.call("apply", journal=j, nic=n, phase="activate", reason="start")
    log = tmp_path / "serial.log"
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", "192", "-nodefaults", "-no-reboot", "-display", "none",
            "-serial", f"file:{log}", "-kernel", str(GUEST / "vmlinuz"), "-initrd", str(GUEST / "initrd.img"),
            "-append", "console=ttyS0 quiet panic=-1 guest.ip0=10.0.0.5 guest.ip6_0=2001:db8::5",
            "-netdev", "tap,id=n0,fd={fd},vhost=off", "-device", f"virtio-net-pci,netdev=n0,mac={MAC}"]
    pid = agent.call("spawn", tap=TAP, argv=argv, log=str(tmp_path / "qemu.out"))
    try:
        _wait_for(log, "GUEST-READY", 90)
        assert _ping(client, "10.0.0.5"), "guest unreachable over IPv4"
        assert _ping(client, "2001:db8::5", v6=True), "guest unreachable over IPv6"
    finally:
        sh("kill", "-9", str(pid), check=False)
    agent.call("undo", journal=j, reason="stop")
