"""Boot the real test guest under TCG and prove its networking end to end.

These tests pin down the guest's contract (integration/guest/README.md) and, just as much, what
the *host* side must configure so that a routed or bridged guest is reachable. The supervisor's
netconf must replicate the host side exactly:

* routed IPv4: the guest has ADDR/32 and an on-link default gateway 169.254.0.1. The host routes
  ADDR/32 to the tap and sets ``proxy_arp=1`` *and* ``forwarding=1`` on the tap; it must also have
  a route to 169.254.0.1 through some other interface (a default route is enough), since proxy ARP
  only answers for targets it would forward elsewhere.
* routed IPv6: the guest has ADDR/128 and default via fe80::1. The host routes ADDR/128 to the
  tap and owns fe80::1/64 on the tap, so it answers the guest's neighbour solicitation itself.
  Forwarding IPv6 between interfaces needs ``net.ipv6.conf.all.forwarding=1``.
* bridged: tap and uplink on one bridge, nothing else.

The guest's other promises are pinned here too: the initramfs holds pvpanic, a QMP ``inject-nmi``
with ``guest.nmi_panic=1`` reaches QEMU as ``GUEST_PANICKED``, and the memory workload
(``guest.dirty=RATE``) runs, verifies itself, and reports a corrupted word -- the signals
integration/guestcheck.py reads for every migration test. Its virtio disks too: they appear as
/dev/vdX, a resize is seen, and diskpat (run over the console shell, or as the
``guest.diskload=vdX`` loop) verifies what it wrote and reports a block corrupted from the host.

Everything runs inside network namespaces made here. qemu is started inside them with
``ip netns exec`` (which execs, so the Popen pid *is* qemu's pid), killed by that pid, and the
namespaces are deleted in ``finally`` even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from guestcheck import (
    SerialShell,
    check_guest,
    console_problems,
    disk_check,
    disk_problems,
    disk_size,
    disk_verify,
    disk_write,
    diskload_progress,
    disks_seen,
    memcheck_progress,
    netns_ping,
    serial_shell_args,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
GUEST_DIR = ROOT / "build" / "guest"
KERNEL = GUEST_DIR / "vmlinuz"
INITRD = GUEST_DIR / "initrd.img"
QEMU = shutil.which("qemu-system-x86_64")
BUSYBOX = shutil.which("busybox")
READY_TIMEOUT = 60.0

if os.geteuid() != 0:
    pytest.skip("needs root (namespaces, taps)", allow_module_level=True)
if not (KERNEL.is_file() and INITRD.is_file()):
    pytest.skip("guest not built: run `make guest`", allow_module_level=True)
if QEMU is None or BUSYBOX is None:
    pytest.skip("needs qemu-system-x86_64 and busybox", allow_module_level=True)


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def nsrun(ns: str, *args: str) -> str:
    return run("ip", "netns", "exec", ns, *args)


@pytest.fixture
def netns() -> Iterator[callable]:
    """A factory of fresh network namespaces, all deleted afterwards."""
    made: list[str] = []

    def make() -> str:
        name = f"qsg-{uuid.uuid4().hex[:10]}"
        run("ip", "netns", "add", name)
        made.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    try:
        yield make
    finally:
        for name in reversed(made):
            subprocess.run(["ip", "netns", "del", name], check=False)


class Guest:
    """One qemu process running the test guest inside a namespace."""

    def __init__(
        self,
        ns: str,
        workdir: Path,
        append: str,
        taps: list[tuple[str, str]],
        extra: Sequence[str] = (),
        quiet: bool = True,
    ):
        self.console = workdir / "console.log"
        self.qmp_path = workdir / "qmp.sock"
        quiet_arg = "quiet " if quiet else ""
        args = [
            "ip", "netns", "exec", ns, QEMU,
            "-accel", "tcg", "-m", "256", "-display", "none", "-no-reboot",
            "-monitor", "none", "-serial", f"file:{self.console}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-kernel", str(KERNEL), "-initrd", str(INITRD),
            "-append", f"console=ttyS0 {quiet_arg}panic=-1 {append}",
            *extra,
        ]  # fmt: skip
        for i, (tap, mac) in enumerate(taps):
            args += [
                "-netdev", f"tap,id=n{i},ifname={tap},script=no,downscript=no,vhost=off",
                "-device", f"virtio-net-pci,netdev=n{i},mac={mac}",
            ]  # fmt: skip
        self.started = time.monotonic()
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self) -> float:
        """Seconds from qemu start to GUEST-READY on the console."""
        deadline = self.started + READY_TIMEOUT
        while time.monotonic() < deadline:
            if "GUEST-READY" in self.text():
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")
                raise AssertionError(f"qemu exited {self.proc.returncode}: {err}\n{self.text()}")
            time.sleep(0.05)
        raise AssertionError(f"no GUEST-READY in {READY_TIMEOUT}s:\n{self.text()}")

    def qmp(self, *commands: str) -> list[dict]:
        """Send commands on a fresh QMP connection; return every message read."""
        seen: list[dict] = []
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.qmp_path))
            reader = sock.makefile("r")
            seen.append(json.loads(reader.readline()))  # greeting
            for command in ("qmp_capabilities", *commands):
                sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
                while True:
                    msg = json.loads(reader.readline())
                    seen.append(msg)
                    if "return" in msg or "error" in msg:
                        break
        return seen

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # by pid: Popen.kill signals exactly this process
        self.proc.wait(timeout=10)
        self.proc.stderr.close()


@contextlib.contextmanager
def guest(ns: str, workdir: Path, append: str, taps: list[tuple[str, str]], **kw) -> Iterator[Guest]:
    g = Guest(ns, workdir, append, taps, **kw)
    try:
        yield g
    finally:
        g.kill()


def wait_tap(ns: str, tap: str) -> None:
    """qemu creates the tap when it opens it; wait for it to exist."""
    for _ in range(200):
        if subprocess.run(["ip", "-n", ns, "link", "show", tap], capture_output=True).returncode == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"tap {tap} never appeared in {ns}")


def pings(ns: str, addr: str, tries: int = 10) -> bool:
    """True once one echo request to addr is answered (the first may wait for ARP/ND)."""
    for _ in range(tries):
        done = subprocess.run(
            ["ip", "netns", "exec", ns, BUSYBOX, "ping", "-c", "1", "-W", "1", addr],
            capture_output=True,
        )
        if done.returncode == 0:
            return True
    return False


def sysctl(ns: str, *settings: str) -> None:
    nsrun(ns, "sysctl", "-qw", *settings)


def ip(ns: str, *args: str) -> None:
    run("ip", "-n", ns, *args)


def setup_routed_node(node: str, client: str) -> None:
    """node: uplink veth to client, default route out of it. client: routes everything to node."""
    run("ip", "-n", node, "link", "add", "up0", "type", "veth", "peer", "name", "up1", "netns", client)
    ip(node, "addr", "add", "192.0.2.1/24", "dev", "up0")
    ip(node, "addr", "add", "2001:db8:ff::1/64", "nodad", "dev", "up0")
    ip(node, "link", "set", "up0", "up")
    # The route that makes proxy ARP for 169.254.0.1 answer: it leads out of another device.
    ip(node, "route", "add", "default", "via", "192.0.2.2", "dev", "up0")
    sysctl(node, "net.ipv4.conf.up0.forwarding=1", "net.ipv6.conf.all.forwarding=1")
    ip(client, "addr", "add", "192.0.2.2/24", "dev", "up1")
    ip(client, "addr", "add", "2001:db8:ff::2/64", "nodad", "dev", "up1")
    ip(client, "link", "set", "up1", "up")
    ip(client, "route", "add", "default", "via", "192.0.2.1")
    ip(client, "-6", "route", "add", "default", "via", "2001:db8:ff::1")


def setup_routed_tap(node: str, tap: str, addr4: str, addr6: str) -> None:
    """What the supervisor's netconf does for a routed NIC once qemu holds the tap."""
    sysctl(
        node,
        f"net.ipv4.conf.{tap}.proxy_arp=1",
        f"net.ipv4.conf.{tap}.forwarding=1",
        f"net.ipv6.conf.{tap}.proxy_ndp=1",
        f"net.ipv6.conf.{tap}.forwarding=1",
    )
    ip(node, "addr", "add", "fe80::1/64", "nodad", "dev", tap)
    ip(node, "link", "set", tap, "up")
    ip(node, "route", "add", f"{addr4}/32", "dev", tap)
    ip(node, "-6", "route", "add", f"{addr6}/128", "dev", tap)


def test_routed_ipv4_and_ipv6(netns, tmp_path, record_property):
    node, client = netns(), netns()
    setup_routed_node(node, client)
    append = "guest.ip0=10.99.0.2/32 guest.ip6_0=2001:db8:99::2"
    with guest(node, tmp_path, append, [("tap0", "52:54:00:12:34:56")]) as g:
        wait_tap(node, "tap0")
        setup_routed_tap(node, "tap0", "10.99.0.2", "2001:db8:99::2")
        ready = g.wait_ready()
        record_property("guest_ready_seconds", round(ready, 2))
        print(f"GUEST-READY after {ready:.2f}s")
        console = g.text()
        assert "guest-if: eth0 mac=52:54:00:12:34:56 mtu=1500 addrs=10.99.0.2/32,2001:db8:99::2/128" in console
        assert "guest-route4: default via 169.254.0.1 dev eth0" in console
        assert "guest-route6: default via fe80::1 dev eth0" in console
        # From the node itself, then forwarded through the node from the client namespace:
        # the replies go through the guest's default gateways, so its ARP for 169.254.0.1
        # and its NS for fe80::1 must have been answered.
        assert pings(node, "10.99.0.2")
        assert pings(node, "2001:db8:99::2")
        assert pings(client, "10.99.0.2")
        assert pings(client, "2001:db8:99::2")
        neigh = run("ip", "-n", node, "neigh", "show", "dev", "tap0")
        assert "10.99.0.2 lladdr 52:54:00:12:34:56" in neigh


def test_routed_host_side_requirements(netns, tmp_path):
    """Each host-side setting the routed mode relies on is needed: drop it and the guest is cut off.

    * IPv4: ``forwarding=1`` on the tap (proxy ARP only answers for targets it would forward);
    * IPv6: fe80::1 on the tap (the guest's gateway; proxy_ndp is not what answers it);
    * IPv6 forwarding between interfaces: ``net.ipv6.conf.all.forwarding=1`` (the per-interface
      knob alone does not forward on this kernel).
    """
    node, client = netns(), netns()
    setup_routed_node(node, client)
    append = "guest.ip0=10.99.0.2 guest.ip6_0=2001:db8:99::2"
    with guest(node, tmp_path, append, [("tap0", "52:54:00:12:34:56")]) as g:
        wait_tap(node, "tap0")
        sysctl(node, "net.ipv4.conf.tap0.proxy_arp=1", "net.ipv4.conf.tap0.forwarding=0")
        ip(node, "link", "set", "tap0", "up")
        ip(node, "route", "add", "10.99.0.2/32", "dev", "tap0")
        ip(node, "-6", "route", "add", "2001:db8:99::2/128", "dev", "tap0")
        g.wait_ready()

        assert not pings(node, "10.99.0.2", tries=3)
        sysctl(node, "net.ipv4.conf.tap0.forwarding=1")
        assert pings(node, "10.99.0.2")

        assert not pings(node, "2001:db8:99::2", tries=3)
        ip(node, "addr", "add", "fe80::1/64", "nodad", "dev", "tap0")
        assert pings(node, "2001:db8:99::2")

        sysctl(node, "net.ipv6.conf.all.forwarding=0")
        sysctl(node, "net.ipv6.conf.tap0.forwarding=1", "net.ipv6.conf.up0.forwarding=1")
        assert not pings(client, "2001:db8:99::2", tries=3)
        sysctl(node, "net.ipv6.conf.all.forwarding=1")
        assert pings(client, "2001:db8:99::2")


def test_bridged_two_nics_mtu_and_powerdown(netns, tmp_path):
    """eth0 routed, eth1 bridged /24 with its own MTU; then QMP system_powerdown powers off."""
    node, client = netns(), netns()
    setup_routed_node(node, client)
    ip(node, "link", "add", "br0", "type", "bridge")
    ip(node, "link", "add", "lan0", "type", "veth", "peer", "name", "lan1")
    ip(node, "link", "set", "lan1", "master", "br0")
    ip(node, "addr", "add", "10.99.1.1/24", "dev", "lan0")
    ip(node, "addr", "add", "2001:db8:1::1/64", "nodad", "dev", "lan0")
    for dev in ("br0", "lan0", "lan1"):
        ip(node, "link", "set", dev, "mtu", "1400")
        ip(node, "link", "set", dev, "up")
    append = (
        "guest.ip0=10.99.0.2/32 guest.ip1=10.99.1.2/24 guest.ip6_1=2001:db8:1::2/64 guest.mtu1=1400"
        " guest.bogus=1 guest.gw0=1.2.3.4;reboot"
    )
    taps = [("tap0", "52:54:00:12:34:56"), ("tap1", "52:54:00:12:34:57")]
    with guest(node, tmp_path, append, taps) as g:
        wait_tap(node, "tap0")
        wait_tap(node, "tap1")
        setup_routed_tap(node, "tap0", "10.99.0.2", "2001:db8:99::2")
        ip(node, "link", "set", "tap1", "mtu", "1400")
        ip(node, "link", "set", "tap1", "master", "br0")
        ip(node, "link", "set", "tap1", "up")
        g.wait_ready()
        console = g.text()
        assert "guest: ignoring unknown key guest.bogus" in console
        assert "guest: ignoring bad value for guest.gw0" in console
        assert "guest-if: eth1 mac=52:54:00:12:34:57 mtu=1400 addrs=10.99.1.2/24,2001:db8:1::2/64" in console
        # The bridged NIC gets no default route: the routed eth0 holds it.
        assert "guest-route4: default via 169.254.0.1 dev eth0" in console
        assert "guest-route4: 10.99.1.0/24 dev eth1" in console
        assert pings(node, "10.99.1.2")
        assert pings(node, "2001:db8:1::2")
        assert pings(client, "10.99.0.2")

        events = g.qmp("system_powerdown")
        assert {"return": {}} in events
        g.proc.wait(timeout=30)
        assert g.proc.returncode == 0
        assert "power button pressed: powering off" in g.text()


# --- pvpanic, NMI panic, the memory workload ------------------------------------------------


class QmpSession:
    """One QMP connection kept open, so that events after a command's return are seen too."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.buf = b""
        self.events: list[dict] = []
        self._read(10.0)  # greeting
        self.cmd("qmp_capabilities")

    def _read(self, timeout: float) -> dict | None:
        """The next message, or None after ``timeout`` seconds without one."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                raise AssertionError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name: str, args: dict | None = None) -> dict:
        msg = {"execute": name, **({"arguments": args} if args else {})}
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read(10.0)
            if reply is None:
                raise AssertionError(f"no answer to {name} in 10s")
            if "event" in reply:
                self.events.append(reply)
            elif "return" in reply or "error" in reply:
                return reply

    def wait_event(self, name: str, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events:
                if ev["event"] == name:
                    return ev
            msg = self._read(max(0.0, deadline - time.monotonic()))
            if msg is None:
                return None
            if "event" in msg:
                self.events.append(msg)

    def close(self) -> None:
        self.sock.close()


def wait_console(g: Guest, pattern: str, timeout: float = 20.0) -> re.Match:
    """The first match of ``pattern`` on the console, waited for."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, g.text())
        if m:
            return m
        if g.proc.poll() is not None:
            raise AssertionError(f"qemu exited {g.proc.returncode} before {pattern!r}:\n{g.text()}")
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} on the console in {timeout}s:\n{g.text()}")


def next_progress(g: Guest, after: int | None, timeout: float = 10.0) -> tuple[int, float]:
    """The first MEMCHECK-OK generation newer than ``after``, and when it was seen (50 ms polls)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gen = memcheck_progress(g.text())
        if gen is not None and (after is None or gen > after):
            return gen, time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"memcheck made no progress after gen {after} in {timeout}s:\n{g.text()[-2000:]}")


def test_initrd_holds_pvpanic_and_memcheck():
    """pvpanic-pci.ko (the build asks for pvpanic_pci) and its dependency, in load order; memcheck."""
    listing = subprocess.run(
        f"gzip -dc {INITRD} | cpio -t --quiet", shell=True, check=True, capture_output=True, text=True
    ).stdout.split()
    assert "bin/memcheck" in listing and "bin/diskpat" in listing
    assert "lib/modules/virtio_blk.ko" in listing
    assert "lib/modules/pvpanic-pci.ko" in listing and "lib/modules/pvpanic.ko" in listing
    order = subprocess.run(
        f"gzip -dc {INITRD} | cpio -i --quiet --to-stdout lib/modules/load-order",
        shell=True, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    assert order.index("pvpanic.ko") < order.index("pvpanic-pci.ko")
    assert order.index("virtio_ring.ko") < order.index("virtio_net.ko")
    assert order.index("virtio.ko") < order.index("virtio_blk.ko")


def test_busy_guest_memcheck_runs_and_guest_check_passes(netns, tmp_path, record_property):
    """guest.dirty=50: memcheck starts, sweeps at about 50 MiB/s and reports progress; a full
    (not quiet) boot with a NIC, pvpanic and memcheck shows no console problem; check_guest passes."""
    node, client = netns(), netns()
    setup_routed_node(node, client)
    append = "guest.ip0=10.99.0.2/32 guest.dirty=50 guest.dirty_mb=24 guest.nmi_panic=1"
    with guest(node, tmp_path, append, [("tap0", "52:54:00:12:34:56")],
               extra=["-device", "pvpanic-pci"], quiet=False) as g:  # fmt: skip
        wait_tap(node, "tap0")
        setup_routed_tap(node, "tap0", "10.99.0.2", "2001:db8:99::2")
        g.wait_ready()
        wait_console(g, r"MEMCHECK-START size_mb=24 rate_mbps=50 pages=6144 locked=1\n")
        wait_console(g, r"MEMCHECK-OK gen=1 pages=6144 errors=0\n")
        check_guest(g.text, netns_ping(node, "10.99.0.2"), busy=True, timeout=15)
        # 24 MiB at 50 MiB/s: ~2.1 sweeps a second; the token bucket must not let it run faster.
        # Timed between two progress lines (one every 2 s at most), each seen within 50 ms.
        gen0, t0 = next_progress(g, memcheck_progress(g.text()))
        gen1, t1 = next_progress(g, gen0)
        rate = (gen1 - gen0) * 24 / (t1 - t0)
        record_property("memcheck_mib_per_s", round(rate, 1))
        assert rate < 50 * 1.3, f"memcheck dirtied {rate:.0f} MiB/s, asked for 50"
        text = g.text()
        assert "MEMCHECK-MISMATCH" not in text
        assert console_problems(text) == [], console_problems(text)
        assert "Linux version" in text  # not quiet: every boot line was there to be misjudged


def test_memcheck_selftest_reports_mismatch_and_nmi_without_knob(netns, tmp_path):
    """guest.memcheck_selftest=1: the flipped word is reported exactly, check_guest fails on it,
    and memcheck goes on. Without guest.nmi_panic, inject-nmi does not panic the guest."""
    node = netns()
    append = "guest.dirty=50 guest.dirty_mb=8 guest.memcheck_selftest=1"
    with guest(node, tmp_path, append, [], extra=["-device", "pvpanic-pci", "-action", "panic=pause"]) as g:
        g.wait_ready()
        flipped = wait_console(g, r"MEMCHECK-SELFTEST page=(\d+) word=(\d+)\n")
        page, word = flipped.groups()
        assert page == "1024"  # the middle of 8 MiB of pages
        bad = wait_console(
            g, rf"MEMCHECK-MISMATCH page={page} gen=1 word={word} want=([0-9a-f]{{16}}) got=([0-9a-f]{{16}})\n"
        )
        want, got = (int(x, 16) for x in bad.groups())
        assert want ^ got == 1 << 42  # the one bit it flipped
        wait_console(g, r"MEMCHECK-OK gen=\d+ pages=2048 errors=1\n")  # healed and going on
        assert [line for line in console_problems(g.text()) if "MEMCHECK-MISMATCH" in line] == [bad.group(0).strip()]
        with pytest.raises(AssertionError, match=r"(?s)console problem.*MEMCHECK-MISMATCH page=1024"):
            check_guest(g.text, lambda: True, busy=True, timeout=5)

        qmp = QmpSession(g.qmp_path)
        try:
            assert qmp.cmd("inject-nmi") == {"return": {}}
            wait_console(g, r"NMI received for unknown reason", timeout=10)
            assert qmp.wait_event("GUEST_PANICKED", timeout=1) is None
            assert qmp.cmd("query-status")["return"]["status"] == "running"
        finally:
            qmp.close()
        next_progress(g, memcheck_progress(g.text()))  # the NMI did not stop it


def test_nmi_panic_reaches_qemu_as_guest_panicked(netns, tmp_path):
    """guest.nmi_panic=1 + pvpanic-pci + -action panic=pause: inject-nmi -> GUEST_PANICKED, paused;
    the panic message (deferred: raised in NMI context) reaches the console after `cont`."""
    node = netns()
    append = "guest.nmi_panic=1"
    with guest(node, tmp_path, append, [], extra=["-device", "pvpanic-pci", "-action", "panic=pause"]) as g:
        g.wait_ready()
        qmp = QmpSession(g.qmp_path)
        try:
            assert qmp.cmd("inject-nmi") == {"return": {}}
            ev = qmp.wait_event("GUEST_PANICKED", timeout=10)
            assert ev is not None, f"no GUEST_PANICKED; events {qmp.events}\n{g.text()}"
            assert ev["data"]["action"] == "pause"
            assert qmp.cmd("query-status")["return"]["status"] == "guest-panicked"
            qmp.cmd("cont")  # the guest finishes its panic: prints it, reboots (panic=-1): qemu exits
        finally:
            qmp.close()
        assert g.proc.wait(timeout=15) == 0
        problems = console_problems(g.text())
        assert any("Kernel panic - not syncing: NMI" in line for line in problems), g.text()[-2000:]


def test_virtio_disks_diskpat_resize_and_corruption(tmp_path):
    """Two virtio-blk disks (raw images): both appear (console and /sys/block), with their sizes;
    the guest.diskload loop runs on vda without a mismatch and leaves it consistent; diskpat
    write + verify on vdb is ok; a block_resize is seen; blocks changed in the image from the host
    (bytes overwritten, a block copied over another) are reported as exactly those blocks.
    One boot; the console shell (guest.shell=1) over a unix socket runs the commands."""
    images = [tmp_path / "a.img", tmp_path / "b.img"]
    sizes = [8 << 20, 16 << 20]
    for image, size in zip(images, sizes, strict=True):
        with open(image, "wb") as f:
            f.truncate(size)
    console_log, qmp_path = tmp_path / "console.log", tmp_path / "qmp.sock"
    append = "guest.shell=1 guest.diskload=vda guest.diskload_blocks=64 guest.diskload_every=20"
    args = [
        QEMU, "-accel", "tcg", "-m", "256", "-display", "none", "-no-reboot", "-monitor", "none",
        "-nic", "none", *serial_shell_args(tmp_path / "con.sock", console_log),
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
        "-kernel", str(KERNEL), "-initrd", str(INITRD),
        "-append", f"console=ttyS0 quiet panic=-1 {append}",
    ]  # fmt: skip
    for i, image in enumerate(images):
        args += ["-drive", f"file={image},format=raw,if=none,id=d{i}", "-device", f"virtio-blk-pci,drive=d{i}"]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def text() -> str:
        try:
            return console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    shell = qmp = None
    try:
        shell = SerialShell(tmp_path / "con.sock")
        try:
            shell.wait_ready(READY_TIMEOUT)
        except TimeoutError:
            raise AssertionError(f"no console shell (qemu {proc.poll()}):\n{text()[-3000:]}") from None
        assert "GUEST-READY" in text()
        assert "guest-disk: vda size=8388608\n" in text() and "guest-disk: vdb size=16777216\n" in text()
        assert disks_seen(shell) == ["vda", "vdb"]
        assert [disk_size(shell, "vda"), disk_size(shell, "/dev/vdb")] == sizes
        deadline = time.monotonic() + 30
        while (diskload_progress(text()) or 0) < 40:  # the guest.diskload loop on vda
            assert time.monotonic() < deadline, f"diskpat loop made no progress:\n{text()[-2000:]}"
            time.sleep(0.2)
        assert disk_problems(text()) == [], disk_problems(text())  # before the mismatches made below

        # vdb: write, verify; a verify for another pass finds every block stale.
        assert disk_write(shell, "vdb", 0, 256, 5).startswith("diskpat: wrote 256 blocks start=0 seq=5 ")
        good = disk_verify(shell, "vdb", 0, 256, 5)
        assert (good.ok, good.blocks, good.seq_min, good.seq_max) == (True, 256, 5, 5), good
        stale = disk_verify(shell, "vdb", 0, 256, 6)
        assert (stale.ok, stale.bad, stale.seq_min, stale.seq_max) == (False, 256, 5, 5), stale
        assert "stale" in stale.output
        unwritten = disk_check(shell, "vdb", 250, 10)  # 256..259 were never written
        assert (unwritten.ok, unwritten.bad, unwritten.mismatched) == (False, 4, [256, 257, 258, 259])

        # The loop on vda ran all along (nothing else wrote vda), never finding a bad block; stopped,
        # it leaves every block whole, of two successive passes at most.
        assert shell.run("killall diskpat")[0] == 0
        passes = re.findall(r"diskpat: pass (\d+) blocks=64 errors=(\d+)\n", text())
        assert passes and passes[-1][1] == "0", passes
        loop = disk_check(shell, "vda", 0, 64)
        assert loop.ok and loop.seq_min >= 40 and loop.seq_max - loop.seq_min <= 1, loop

        qmp = QmpSession(qmp_path)
        # A resized disk is seen at once: virtio-blk's config change updates /sys/block/vdb/size.
        assert qmp.cmd("block_resize", {"device": "d1", "size": 32 << 20}) == {"return": {}}
        deadline = time.monotonic() + 10
        while disk_size(shell, "vdb") != 32 << 20:
            assert time.monotonic() < deadline, "the guest did not see vdb grow to 32 MiB"
            time.sleep(0.2)

        # Corrupt vdb's image from the host while the guest is stopped: 4 bytes inside block 100,
        # and block 3 copied over block 7 (a misplaced write). diskpat reads with O_DIRECT, so the
        # guest's page cache cannot hide it.
        assert qmp.cmd("stop") == {"return": {}}
        with open(images[1], "r+b") as f:
            f.seek(100 * 4096 + 1000)
            f.write(b"\xde\xad\xbe\xef")
            f.seek(3 * 4096)
            block3 = f.read(4096)
            f.seek(7 * 4096)
            f.write(block3)
        assert qmp.cmd("cont") == {"return": {}}
        bad = disk_verify(shell, "vdb", 0, 256, 5)
        assert (bad.ok, bad.bad, bad.mismatched) == (False, 2, [7, 100]), bad
        assert re.search(r"diskpat: MISMATCH block 7 misplaced ", bad.output), bad.output
        assert re.search(r"diskpat: MISMATCH block 100 corrupt .* word=125\n", bad.output), bad.output
        assert disk_check(shell, "vdb", 0, 256).mismatched == [7, 100]
        assert console_problems(text()) == [], console_problems(text())
    finally:
        if qmp is not None:
            qmp.close()
        if shell is not None:
            shell.close()
        if proc.poll() is None:
            proc.kill()  # by pid: Popen.kill signals exactly this qemu
        proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()
