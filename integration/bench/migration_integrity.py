"""Migration integrity benchmark (issue 14): does a live migration hand the destination the
guest's memory exactly, on QEMU 7.2 and on QEMU 10.0.2, with and without
``pause-before-switchover``, raw QEMU and through qsup?

    .venv/bin/python integration/bench/migration_integrity.py [--n N] [--qemu 7.2|10.0|both]
        [--part raw|qsup|both] [--cells GLOB ...] [--rate MIB_S] [--out DIR]

Cells are keyed ``PART/QEMU/SWITCHOVER/DOWNTIME_MS/LOAD/TRANSPORT``, e.g.
``raw/7.2/pause/300/busy/tls``.  SWITCHOVER is ``pause`` (the ``pause-before-switchover``
capability on; raw: ``migrate-continue`` as soon as ``pre-switchover`` is seen, after
``--pause-ms``) or ``stop`` (the capability off; qsup's default mode).  LOAD ``busy`` boots the
test guest with ``guest.dirty=RATE guest.dirty_mb=24`` (memcheck rewrites and verifies 24 MiB
at RATE MiB/s, printing MEMCHECK-MISMATCH for a page that does not hold what it wrote),
``idle`` without it.  TRANSPORT ``tls`` (QEMU tls-creds-x509, verify-peer) or ``plain``.
``--cells`` takes fnmatch patterns (default: every cell of the selected parts and QEMUs).

**raw** (no qsup; adapted from ../shared/repro/pre_switchover_repro.py): a network namespace
with bridge ``br0`` 10.99.0.1/24 and two persistent taps; QEMU (TCG, 256 MiB, 1 vCPU,
``-machine pc-i440fx-7.2`` on both versions, pvpanic-pci, ``-action panic=pause``) runs in it
on one tap, the destination on the other with ``-incoming defer -S``; the guest moves back
and forth over 127.0.0.1 in the namespace, with ``max-bandwidth`` = QEMU's default
(128 MiB/s, what qsup sets) and the cell's ``downtime-limit``, while the namespace pings the
guest at 100/s.  After each migration:

(a) memory: at ``completed`` the source is in ``postmigrate`` and the destination still
    ``paused`` (it was started with ``-S`` and has not been sent ``cont``); ``pmemsave`` of
    all 256 MiB on both (into a tmpfs dir) and the differing 4 KiB pages counted, outside
    :data:`EXCLUDE` (see there: measured on idle 10.0 migrations);
(b) after ``cont`` on the destination and ``quit`` on the source: the guest answers (within
    20 s), then 20 pings in a row (``ping -c 20 -w 10`` must get 20 replies);
(c) guestcheck.check_guest on the console (no console problem; busy: memcheck's generation
    advances), and again no console problem after the 20 pings.

**qsup**: migtopo.TwoNodes (client + two nodes, one ``qsup serve`` each, with the cell's
QEMU as the daemons' ``qemu``; ``tls`` cells on the https-peer topology whose migration
stream is QEMU TLS), one routed guest (256 MiB, the busy knob in its ``append``), migrated
back and forth with ``qsup migrate NAME --to NODE --switchover S --downtime-limit D --json``
under migtopo.MigrationWatch (route samplers on both nodes, the client's 100/s ping).  After
each: (b)+(c) through the client namespace and qsup's console log
(guestcheck.check_guest), and the route overlap between the two nodes must be 0.  ``passes``
come from ``query-migrate`` polled on the source's operator monitor (the last answer seen; the
source quits soon after ``completed``, so it may be one sync short).  qsup refuses a TCG
migration from QEMU < 9.0 in either mode (422, field ``accel``): those cells record the refusal.

A migration is **corrupted** when (a) finds a differing page, or (b) or (c) fail.  After a
corrupted one the guest is replaced by a freshly booted one (a corrupted guest poisons later
runs).  A migration that does not complete (``failed``, or not converged within
``--migration-timeout`` s: then ``migrate_cancel``) is counted in ``failed``, not in
``migrations``.  A cell stops early at 3 corrupted.

Per cell: ``migrations``, ``corrupted``, ``rate``, ``ci95_high`` (one-sided 95 %
Clopper-Pearson upper bound of the corruption rate), ``passes_p50`` (``ram.dirty-sync-count``),
``downtime_p50_ms``, ``total_p50_ms``; raw: ``pages_differ_max``; qsup: ``overlap_max_ms``.
Progress and one JSON line per migration go to stderr (and to ``--out``/rows-*.jsonl); the last
stdout line is one JSON object with ``"bench": "migration_integrity"``.

Choices, measured on this harness (2 cores, TCG, TLS, max-bandwidth 128 MiB/s):

* **busy rate 100 MiB/s** (``--rate``): at 300 ms the switchover threshold (bandwidth x
  downtime, ~38 MiB) is above memcheck's whole 24 MiB, so no rate gives more than 3-4 dirty
  syncs there (100: 3; 150 and 200: 3-4; unlimited: 3-4); at 20 ms 100 MiB/s takes 9-12 syncs
  and converges on 10.0, while 150 MiB/s (above the link) never converged on 10.0 in 5 tries
  (cancelled at 40 s; 7.2 "converged" in 9 syncs -- and corrupted each time).  100 is also
  migtopo.BUSY, what the migration tests run.
* **no exclusion** (:data:`EXCLUDE` empty): idle QEMU 10.0 migrations with the whole 256 MiB
  compared (``--exclude none``, 0x0-0x10000000, ROM shadows and the legacy VGA window
  included) showed 0 differing pages, so every page is compared.
* **settle 5 s** (``--settle``) between a (re)boot and the first migration: the first
  migration right after boot corrupted most often on 7.2 in the calibration, and a cell that
  reboots after every corruption would otherwise over-sample that moment; rows carry
  ``since_boot`` and cells ``corrupted_first_after_boot``.

Everything it creates (namespace, bridge, taps, QEMUs by pid, daemons, temp dirs) is removed
in ``finally`` blocks, on Ctrl-C and SIGTERM too.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "integration"))

import guestcheck  # noqa: E402
import topo  # noqa: E402
from migtopo import MigrationWatch, TwoNodes, close_nodes  # noqa: E402

QEMUS = {"7.2": "/usr/bin/qemu-system-x86_64",
         "10.0": "/usr/local/lib/qsup-qemu-10.0/usr/bin/qemu-system-x86_64"}
GUEST = ROOT / "build" / "guest"
MEM_MB = 256
MEM = MEM_MB << 20
PAGE = 4096
MACHINE = "pc-i440fx-7.2"
MAX_BANDWIDTH = 128 * 1024 * 1024  # QEMU's default; what qsup sets when none is asked for
DIRTY_MB = 24
DEFAULT_RATE = 100  # MiB/s; see --rate and the calibration in BENCHMARKS.md
STOP_AT = 3  # corrupted migrations that end a cell early
NS_IP, GUEST_IP, MAC = "10.99.0.1", "10.99.0.2", "52:54:00:99:00:02"
TAPS = ("qita", "qitb")
#: Guest-physical ranges (start, end) left out of the page comparison.  Measured with
#: ``--exclude none`` on idle QEMU 10.0 migrations (see the module docstring); empty when nothing
#: differed there.
EXCLUDE: list[tuple[int, int]] = []

_stop_requested = False


def log(*a) -> None:
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def _sigterm(signum, frame):  # SIGTERM runs the same finally blocks as Ctrl-C
    raise KeyboardInterrupt(f"signal {signum}")


# --- statistics ---------------------------------------------------------------------------------

def binom_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))


def cp_upper(k: int, n: int, alpha: float = 0.05) -> float | None:
    """One-sided (1-alpha) Clopper-Pearson upper bound for k successes in n trials."""
    if n == 0:
        return None
    if k >= n:
        return 1.0
    if k == 0:
        return 1 - alpha ** (1 / n)
    lo, hi = k / n, 1.0
    for _ in range(100):  # P(X <= k; p) is decreasing in p: bisect for = alpha
        mid = (lo + hi) / 2
        if binom_cdf(k, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def p50(values: list) -> float | None:
    v = sorted(x for x in values if x is not None)
    return v[max(0, math.ceil(len(v) / 2) - 1)] if v else None


# --- a small synchronous QMP client -------------------------------------------------------------

class QmpError(RuntimeError):
    pass


class Qmp:
    def __init__(self, path: str, proc: subprocess.Popen | None = None, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.settimeout(120)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if proc is not None and proc.poll() is not None:
                    raise QmpError(f"qemu exited ({proc.returncode}) before its monitor came up")
                if time.monotonic() > deadline:
                    raise QmpError(f"no QMP on {path}")
                time.sleep(0.05)
        self.f = self.s.makefile("rwb")
        self.events: list[dict] = []
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, execute: str, args: dict | None = None):
        msg = {"execute": execute, **({"arguments": args} if args else {})}
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            line = self.f.readline()
            if not line:
                raise QmpError(f"{execute}: monitor closed")
            r = json.loads(line)
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise QmpError(f"{execute}: {r['error'].get('desc', r['error'])}")
            self.events.append(r)

    def close(self) -> None:
        for x in (self.f, self.s):
            try:
                x.close()
            except OSError:
                pass


# --- memory comparison --------------------------------------------------------------------------

def differing_pages(a: Path, b: Path) -> list[int]:
    """Guest-physical addresses of the 4 KiB pages that differ between two pmemsave dumps."""
    out = []
    chunk = 1 << 20
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if not x and not y:
                break
            if x != y:
                for p in range(0, max(len(x), len(y)), PAGE):
                    if x[p:p + PAGE] != y[p:p + PAGE]:
                        out.append(off + p)
            off += chunk
    return out


def excluded(addr: int) -> bool:
    return any(s <= addr < e for s, e in EXCLUDE)


# --- host helpers -------------------------------------------------------------------------------

def sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def kill_pid(proc: subprocess.Popen | None) -> None:
    """SIGKILL a process we started (by its Popen, i.e. by pid) and reap it."""
    if proc is not None and proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def ping_totals(out: str) -> tuple[int, int]:
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def make_qemu_tls(d: Path) -> Path:
    """A QEMU tls-creds-x509 dir (CA, server and client cert for DNS:spk) from contrib/make-test-ca."""
    pki = d / "pki"
    sh(str(ROOT / "contrib" / "make-test-ca"), str(pki), "spk")
    creds = d / "qemu-tls"
    creds.mkdir()
    for dst, src in (("ca-cert.pem", "ca.pem"), ("server-cert.pem", "spk.pem"), ("server-key.pem", "spk-key.pem"),
                     ("client-cert.pem", "spk.pem"), ("client-key.pem", "spk-key.pem")):
        shutil.copy(pki / src, creds / dst)
    return creds


# --- the raw QEMU part --------------------------------------------------------------------------

class RawNet:
    """Namespace + bridge + two persistent taps; removed by close()."""

    def __init__(self):
        self.ns = f"qint{os.getpid() % 100000}"
        sh("ip", "netns", "add", self.ns)
        try:
            x = lambda *a: sh("ip", "netns", "exec", self.ns, *a)  # noqa: E731
            x("ip", "link", "set", "lo", "up")
            x("ip", "link", "add", "br0", "type", "bridge")
            x("ip", "addr", "add", f"{NS_IP}/24", "dev", "br0")
            x("ip", "link", "set", "br0", "up")
            for t in TAPS:
                x("ip", "tuntap", "add", t, "mode", "tap", "vnet_hdr")
                x("ip", "link", "set", t, "master", "br0")
                x("ip", "link", "set", t, "up")
        except BaseException:
            self.close()
            raise

    def run(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.ns, *argv, **kw)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], **kw)

    def ping1(self) -> bool:
        return self.run("ping", "-n", "-c", "1", "-W", "1", GUEST_IP, check=False).returncode == 0

    def ping20(self) -> tuple[bool, str]:
        r = self.run("ping", "-n", "-q", "-c", "20", "-i", "0.05", "-w", "10", GUEST_IP, check=False)
        sent, recv = ping_totals(r.stdout)
        return recv >= 20, f"{recv}/{sent}"

    def close(self) -> None:
        sh("ip", "netns", "del", self.ns, check=False)  # takes the bridge and taps with it


class RawQemu:
    """One QEMU in the namespace, started and killed by pid."""

    def __init__(self, env: "RawEnv", tap: str, incoming: bool, append: str, console: Path, tag: str):
        self.qmp_path = str(env.dir / f"{tag}.qmp")
        argv = [env.binary, "-name", f"guest=integ-{tag}", "-nodefaults", "-no-user-config", "-display", "none",
                "-machine", MACHINE, "-accel", "tcg", "-m", str(MEM_MB), "-smp", "1",
                "-kernel", str(GUEST / "vmlinuz"), "-initrd", str(GUEST / "initrd.img"),
                "-append", append,
                "-chardev", f"file,id=con,path={console},append=on", "-serial", "chardev:con",
                "-device", "pvpanic-pci", "-action", "panic=pause",
                "-netdev", f"tap,id=net0,ifname={tap},script=no,downscript=no,vhost=off",
                "-device", f"virtio-net-pci,netdev=net0,mac={MAC},id=nic0",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off", "-S"]
        if env.tls:
            argv += ["-object", f"tls-creds-x509,id=tls0,dir={env.creds},endpoint=server,verify-peer=on",
                     "-object", f"tls-creds-x509,id=tlsc,dir={env.creds},endpoint=client,verify-peer=on"]
        if incoming:
            argv += ["-incoming", "defer"]
        self.tap = tap
        self.err = open(env.dir / "qemu.stderr", "ab")  # noqa: SIM115 -- closed by kill()
        self.proc = env.net.popen(argv, stdout=subprocess.DEVNULL, stderr=self.err)
        env.procs.append(self.proc)
        try:
            self.qmp = Qmp(self.qmp_path, self.proc)
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        if getattr(self, "qmp", None) is not None:
            self.qmp.close()
        kill_pid(self.proc)
        self.err.close()

    def quit(self) -> None:
        try:
            self.qmp.cmd("quit")
        except (QmpError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


class RawEnv:
    def __init__(self, work: Path, binary: str, tls: bool, creds: Path | None, net: RawNet, shm: Path):
        self.binary, self.tls, self.creds, self.net, self.shm = binary, tls, creds, net, shm
        self.dir = work
        self.procs: list[subprocess.Popen] = []

    def close(self) -> None:
        for p in self.procs:
            kill_pid(p)


class RawCell:
    def __init__(self, key: str, env: RawEnv, pause: bool, downtime: int, busy: bool, rate: int, args):
        self.key, self.env, self.pause, self.downtime, self.busy, self.rate = key, env, pause, downtime, busy, rate
        self.args = args
        self.cur: RawQemu | None = None
        self.boots = 0
        self.port = 47000

    def append(self) -> str:
        a = f"console=ttyS0 panic=-1 guest.ip0={GUEST_IP}/24"
        return a + (f" guest.dirty={self.rate} guest.dirty_mb={DIRTY_MB}" if self.busy else "")

    def boot(self) -> None:
        if self.cur is not None:
            self.cur.kill()
            self.cur = None
        self.boots += 1
        self.console = self.env.dir / f"{self.key.replace('/', '_')}-{self.boots}.console"
        self.cur = RawQemu(self.env, TAPS[0], False, self.append(), self.console, f"b{self.boots}-0")
        self.cur.qmp.cmd("cont")
        deadline = time.monotonic() + 90
        want = "MEMCHECK-OK" if self.busy else "GUEST-READY"
        while want not in self.read_console():
            if time.monotonic() > deadline:
                raise RuntimeError(f"guest did not boot ({want}): {self.read_console()[-1500:]}")
            time.sleep(0.2)
        deadline = time.monotonic() + 30
        while not self.env.net.ping1():
            if time.monotonic() > deadline:
                raise RuntimeError("guest not reachable after boot")
        time.sleep(self.args.settle)  # not a freshly booted kernel: its first seconds write a lot
        self.since_boot = 0
        log(f"{self.key}: guest booted (boot {self.boots})")

    def read_console(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def migrate(self, i: int) -> dict:
        env, src = self.env, self.cur
        assert src is not None
        tap = TAPS[1] if src.tap == TAPS[0] else TAPS[0]
        dst = RawQemu(env, tap, True, self.append(), self.console, f"b{self.boots}-{i + 1}")
        self.since_boot += 1
        row: dict = {"cell": self.key, "i": i, "boot": self.boots, "since_boot": self.since_boot}
        pinger = None
        try:
            self.port += 1
            uri = f"tcp:127.0.0.1:{self.port}"
            dst.qmp.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
            if env.tls:
                dst.qmp.cmd("migrate-set-parameters", {"tls-creds": "tls0"})
                src.qmp.cmd("migrate-set-parameters", {"tls-creds": "tlsc", "tls-hostname": "spk"})
            dst.qmp.cmd("migrate-incoming", {"uri": uri})
            caps = [{"capability": "events", "state": True}, {"capability": "return-path", "state": True},
                    {"capability": "pause-before-switchover", "state": self.pause}]
            src.qmp.cmd("migrate-set-capabilities", {"capabilities": caps})
            src.qmp.cmd("migrate-set-parameters", {"downtime-limit": self.downtime, "max-bandwidth": MAX_BANDWIDTH})
            pinger = env.net.popen(["ping", "-n", "-q", "-i", "0.01", GUEST_IP], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True)
            t0 = time.monotonic()
            src.qmp.cmd("migrate", {"uri": uri})
            continued = False
            while True:
                r = src.qmp.cmd("query-migrate")
                st = r.get("status")
                if st == "pre-switchover" and not continued:
                    continued = True
                    if self.args.pause_ms:
                        time.sleep(self.args.pause_ms / 1000)
                    src.qmp.cmd("migrate-continue", {"state": "pre-switchover"})
                if st in ("completed", "failed", "cancelled"):
                    break
                if time.monotonic() - t0 > self.args.migration_timeout and st not in ("cancelling",):
                    row["timeout"] = True
                    src.qmp.cmd("migrate_cancel")
                time.sleep(0.005)
            row["wall_ms"] = round((time.monotonic() - t0) * 1000, 1)
            if st == "completed":
                # QEMU 7.2 sets `completed` before it fills in total-time/downtime: read them again
                time.sleep(0.05)
                r = src.qmp.cmd("query-migrate")
            ram = r.get("ram", {})
            row |= {"status": st, "passes": ram.get("dirty-sync-count"), "downtime_ms": r.get("downtime"),
                    "total_ms": r.get("total-time"), "mbps": ram.get("mbps"),
                    "transferred_mib": round(ram.get("transferred", 0) / 2 ** 20, 1)}
            if st != "completed":
                row["error"] = r.get("error-desc")
                dst.kill()
                return row  # the guest stays on the source (running again after a cancel/failure)
            deadline = time.monotonic() + 30
            while (dst_st := dst.qmp.cmd("query-migrate").get("status")) not in ("completed", "failed"):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.005)
            row["dst_status"] = dst_st
            row["dst_runstate"] = dst.qmp.cmd("query-status").get("status")
            row["src_runstate"] = src.qmp.cmd("query-status").get("status")
            # (a) both stopped: the whole RAM of each, compared page by page
            fa, fb = env.shm / "src.bin", env.shm / "dst.bin"
            if not self.args.no_memcmp and dst_st == "completed":
                for q, f in ((src, fa), (dst, fb)):
                    q.qmp.cmd("pmemsave", {"val": 0, "size": MEM, "filename": str(f)})
                diff = differing_pages(fa, fb)
                row["pages_differ_all"] = len(diff)
                kept = [a for a in diff if not excluded(a)]
                row["pages_differ"] = len(kept)
                if diff:
                    row["differ_addrs"] = [hex(a) for a in diff[:16]]
                for f in (fa, fb):
                    f.unlink(missing_ok=True)
            dst.qmp.cmd("cont")
            src.quit()
        except BaseException:
            dst.kill()
            raise
        finally:
            if pinger is not None:
                pinger.send_signal(signal.SIGINT)
                try:
                    out, _ = pinger.communicate(timeout=10)
                    sent, recv = ping_totals(out)
                    row["ping_lost"] = sent - recv
                except subprocess.TimeoutExpired:
                    kill_pid(pinger)
        self.cur = dst
        self.check(row)
        return row

    def check(self, row: dict) -> None:
        """(b) and (c) on the guest now running on self.cur."""
        problems = []
        if row.get("dst_runstate") not in (None, "paused"):
            problems.append(f"destination was {row['dst_runstate']!r} at completed, not paused")
        if row.get("pages_differ"):
            problems.append(f"{row['pages_differ']} pages differ")
        try:
            guestcheck.check_guest(self.read_console, self.env.net.ping1, busy=self.busy, timeout=20)
        except AssertionError as e:
            problems.append(str(e).splitlines()[0])
            row["check_report"] = str(e)[-3000:]
        if not problems:
            ok, counts = self.env.net.ping20()
            row["ping20"] = counts
            if not ok:
                problems.append(f"20 pings: {counts} answered")
            bad = guestcheck.console_problems(self.read_console())
            if bad:
                problems.append(f"console after the pings: {bad[0]!r}")
        row["memcheck_gen"] = guestcheck.memcheck_progress(self.read_console()) if self.busy else None
        row["problems"] = problems
        row["corrupted"] = bool(problems)


def run_raw(ver: str, tls: bool, cells: list[tuple[str, bool, int, bool]], args, work: Path, shm: Path,
            creds: Path | None, results: dict, rows_out) -> None:
    net = RawNet()
    env = RawEnv(work, QEMUS[ver], tls, creds, net, shm)
    try:
        for key, pause, downtime, busy in cells:
            cell = RawCell(key, env, pause, downtime, busy, args.rate, args)
            rows: list[dict] = []
            failed = 0
            try:
                cell.boot()
                i = 0
                while len(rows) < args.n and failed < max(5, args.n // 5):
                    r = cell.migrate(i)
                    i += 1
                    rows_out.write(json.dumps(r) + "\n")
                    rows_out.flush()
                    brief = {k: r.get(k) for k in ("status", "passes", "downtime_ms", "total_ms", "pages_differ",
                                                   "pages_differ_all", "ping_lost", "ping20", "memcheck_gen")}
                    log(f"{key} #{i}: {brief}" + (f" PROBLEMS {r['problems']}" if r.get("problems") else ""))
                    if r.get("differ_addrs"):
                        log(f"   differing pages (first 16): {r['differ_addrs']}")
                    if r.get("status") != "completed":
                        failed += 1
                        continue
                    rows.append(r)
                    if r["corrupted"]:
                        if sum(x["corrupted"] for x in rows) >= STOP_AT:
                            break
                        cell.boot()
            except Exception as e:  # noqa: BLE001 -- the harness failing a cell is reported, not fatal
                log(f"{key}: harness error: {e!r}")
                results[key] = summarize(rows, "raw", failed, error=repr(e))
            else:
                results[key] = summarize(rows, "raw", failed)
            finally:
                if cell.cur is not None:
                    cell.cur.kill()
            results[key]["boots"] = cell.boots
            log(f"{key}: {json.dumps(results[key])}")
    finally:
        env.close()
        net.close()


# --- the qsup part ------------------------------------------------------------------------------

QSUP_IP, QSUP_MAC = "10.99.0.2", "52:54:00:99:00:42"


class PassPoller:
    """query-migrate on the source's operator monitor until the migration ends or QEMU goes away."""

    def __init__(self, path: str):
        self.last: dict = {}
        self.running = True
        self.error: str | None = None
        self.t = threading.Thread(target=self._run, args=(path,), daemon=True)
        self.t.start()

    def _run(self, path: str) -> None:
        try:
            q = Qmp(path, timeout=5)
        except Exception as e:  # noqa: BLE001
            self.error = repr(e)
            return
        self.polls = 0
        try:
            seen_running = False  # a former destination answers its incoming migration's `completed` first
            while self.running:
                r = q.cmd("query-migrate")
                self.polls += 1
                final = r.get("status") in ("completed", "failed", "cancelled")
                if r.get("status") not in (None, "none") and not final:
                    seen_running = True
                if seen_running:
                    self.last = r
                    if final:
                        return
                time.sleep(0.02)
        except Exception as e:  # noqa: BLE001 -- the source quit: keep what was seen
            self.error = repr(e)
        finally:
            q.close()

    def stop(self) -> dict:
        self.running = False
        self.t.join(timeout=10)
        return self.last


def run_qsup(ver: str, tls: bool, cells: list[tuple[str, bool, int, bool]], args, work: Path,
             results: dict, rows_out) -> None:
    topo_set = hasattr(topo, "QEMU")  # newer topo.py writes `qemu = topo.QEMU` into every daemon config
    if topo_set:
        topo.QEMU = QEMUS[ver]
    sub = work / f"qsup-{ver}-{'tls' if tls else 'plain'}"
    sub.mkdir()
    t = TwoNodes(sub)  # the default prefix: topo.NETNS_PREFIXES lists the ones allowed
    try:
        a, b = t.start_daemons(tls=tls, extra_config="" if topo_set else f'qemu = "{QEMUS[ver]}"\n')
        boots = 0
        for key, pause, downtime, busy in cells:
            rows: list[dict] = []
            failed = 0
            error = None
            refused = None
            name = None
            holder = a
            try:
                boots += 1
                name = f"ig{boots}"
                holder = boot_qsup(t, a, name, busy, args.rate, ver, args.settle)
                since_boot = 0
                i = 0
                while len(rows) < args.n and failed < max(5, args.n // 5):
                    src, dst = (a, b) if holder is a else (b, a)
                    r = qsup_migrate(t, src, dst, name, i, key, pause, downtime, busy, sub, args.migration_timeout)
                    since_boot += 1
                    r["boot"], r["since_boot"] = boots, since_boot
                    i += 1
                    rows_out.write(json.dumps(r) + "\n")
                    rows_out.flush()
                    brief = {k: r.get(k) for k in ("result", "passes", "downtime_ms", "total_ms", "overlap_ms",
                                                   "ping_lost", "ping20", "memcheck_gen")}
                    log(f"{key} #{i}: {brief}" + (f" PROBLEMS {r['problems']}" if r.get("problems") else ""))
                    if r.get("refused"):
                        refused = r["refused"]
                        break
                    if r.get("result") != "completed":
                        failed += 1
                        log(f"   migration failed: {r.get('error')} {r.get('stderr', '')[-400:]}")
                        holder = where_is(t, name) or holder
                        continue
                    holder = dst
                    rows.append(r)
                    if r["corrupted"]:
                        if sum(x["corrupted"] for x in rows) >= STOP_AT:
                            break
                        holder.cli("stop", name, check=False, timeout=60)
                        boots += 1
                        name = f"ig{boots}"
                        holder = boot_qsup(t, a, name, busy, args.rate, ver, args.settle)
                        since_boot = 0
            except Exception as e:  # noqa: BLE001
                error = repr(e)
                log(f"{key}: harness error: {e!r}")
            finally:
                if name is not None:
                    for d in (a, b):
                        d.cli("stop", name, check=False, timeout=60)
            results[key] = summarize(rows, "qsup", failed, error=error)
            if refused:
                results[key]["refused"] = refused
            log(f"{key}: {json.dumps(results[key])}")
    finally:
        for d in t.daemons:  # the daemons' logs outlive the work dir
            try:
                stamp = time.strftime("%H%M%S")
                shutil.copy(d.log_path, Path(args.out) / f"daemon-{sub.name}-{d.node_name}-{stamp}.log")
            except OSError:
                pass
        leaked = close_nodes(t)
        if leaked:
            log(f"qsup teardown: QEMUs that would not die: {leaked}")


def boot_qsup(t: TwoNodes, a, name: str, busy: bool, rate: int, ver: str, settle: float):
    k, i = topo.guest_paths()
    append = f"console=ttyS0 panic=-1 guest.ip0={QSUP_IP}/32"
    if busy:
        append += f" guest.dirty={rate} guest.dirty_mb={DIRTY_MB}"
    spec = {"name": name, "memory": MEM_MB, "kernel": k, "initrd": i, "append": append,
            "nics": [{"mode": "routed", "mac": QSUP_MAC, "ip": QSUP_IP}]}
    v = a.start_instance(spec)
    exe = os.readlink(f"/proc/{v['pid']}/exe") if v.get("pid") else None
    if exe is not None and os.path.realpath(exe) != os.path.realpath(QEMUS[ver]):
        raise RuntimeError(f"the daemon runs {exe}, not QEMU {ver} ({QEMUS[ver]})")
    a.wait_console(name, "MEMCHECK-OK" if busy else "GUEST-READY")
    if not t.client.ping(QSUP_IP):
        raise RuntimeError("guest not reachable after boot")
    time.sleep(settle)
    log(f"qsup guest {name} booted on {a.node_name} ({exe})")
    return a


def where_is(t: TwoNodes, name: str):
    for d in t.daemons:
        r = d.cli("show", name, "--json", check=False, timeout=10)
        if r.returncode == 0 and json.loads(r.stdout).get("state") in ("running", "paused"):
            return d
    return None


def qsup_migrate(t: TwoNodes, src, dst, name: str, i: int, key: str, pause: bool, downtime: int, busy: bool,
                 sub: Path, migration_timeout: float) -> dict:
    row: dict = {"cell": key, "i": i, "from": src.node_name, "to": dst.node_name}
    operator = src.cli_json("show", name)["qmp_operator"]
    src_ns, dst_ns = (t.a, t.b) if src is t.daemons[0] else (t.b, t.a)
    watch = MigrationWatch(t, src_ns, dst_ns, QSUP_IP, sub, tag=f"-{i % 2}")
    poller = None
    try:
        time.sleep(0.3)
        poller = PassPoller(operator)
        argv = ("migrate", name, "--to", dst.node_name, "--json", "--switchover", "pause" if pause else "stop",
                "--downtime-limit", str(downtime))
        try:
            r = src.cli(*argv, timeout=migration_timeout, check=False)
        except subprocess.TimeoutExpired:  # not converging: cancel it, the guest stays on the source
            src.cli("migrate", name, "--cancel", check=False, timeout=30)
            deadline = time.monotonic() + 60
            while src.cli_json("show", name).get("state") == "migrating" and time.monotonic() < deadline:
                time.sleep(0.5)
            r = subprocess.CompletedProcess(argv, 1, "", f"not completed within {migration_timeout:g} s: cancelled")
        lines = r.stdout.strip().splitlines()
        try:
            summary = json.loads(lines[-1]) if lines else {}
        except ValueError:
            summary = {}
        if not summary:
            summary = {"result": "failed", "error": r.stderr.strip()[-800:]}
        if r.returncode != 0 and not lines and "error:" in r.stderr:  # refused before it started (422)
            row["refused"] = r.stderr.strip()[-500:]
        row["stderr"] = r.stderr.strip()[-1500:] if r.returncode else ""
        if summary.get("result") == "completed":
            time.sleep(0.5)
    finally:
        last = poller.stop() if poller is not None else {}
        w = watch.result()
    row |= {"result": summary.get("result"), "error": summary.get("error"), "downtime_ms": summary.get("downtime_ms"),
            "total_ms": summary.get("total_ms"), "switchover_ms": summary.get("switchover_ms"),
            "passes": (last.get("ram") or {}).get("dirty-sync-count"), "passes_from_status": last.get("status"),
            "poller": {"polls": getattr(poller, "polls", None), "error": getattr(poller, "error", None)},
            "overlap_ms": w["overlap_ms"], "gap_ms": w["gap_ms"], "ping_lost": w["ping"]["lost"],
            "dst_has_route": w["dst_has_route"], "src_has_route": w["src_has_route"]}
    if row["result"] != "completed":
        return row
    problems = []
    if row["overlap_ms"] != 0:
        problems.append(f"route overlap {row['overlap_ms']} ms")
    if not row["dst_has_route"] or row["src_has_route"]:
        problems.append(f"route on dst {row['dst_has_route']}, on src {row['src_has_route']}")
    console = guestcheck.qsup_console_reader(dst.state_dir, name)
    try:
        guestcheck.check_guest(console, guestcheck.netns_ping(t.client.name, QSUP_IP), busy=busy, timeout=20)
    except AssertionError as e:
        problems.append(str(e).splitlines()[0])
        row["check_report"] = str(e)[-3000:]
    if not problems or not any("guest check" in p for p in problems):
        p = t.client.run("ping", "-n", "-q", "-c", "20", "-i", "0.05", "-w", "10", QSUP_IP, check=False)
        sent, recv = ping_totals(p)
        row["ping20"] = f"{recv}/{sent}"
        if recv < 20:
            problems.append(f"20 pings: {recv}/{sent} answered")
        bad = guestcheck.console_problems(console())
        if bad:
            problems.append(f"console after the pings: {bad[0]!r}")
    row["memcheck_gen"] = guestcheck.memcheck_progress(console()) if busy else None
    row["problems"] = problems
    row["corrupted"] = bool(problems)
    return row


# --- cells, summary, main -----------------------------------------------------------------------

def summarize(rows: list[dict], part: str, failed: int, error: str | None = None) -> dict:
    n = len(rows)
    k = sum(bool(r.get("corrupted")) for r in rows)
    hi = cp_upper(k, n)
    res = {"migrations": n, "corrupted": k, "rate": round(k / n, 4) if n else None,
           "ci95_high": round(hi, 4) if hi is not None else None, "failed": failed,
           "stopped_early": k >= STOP_AT,
           "passes_p50": p50([r.get("passes") for r in rows]),
           "passes_max": max((r["passes"] for r in rows if r.get("passes") is not None), default=None),
           "downtime_p50_ms": p50([r.get("downtime_ms") for r in rows]),
           "total_p50_ms": p50([r.get("total_ms") for r in rows])}
    if part == "raw":
        res["pages_differ_max"] = max((r.get("pages_differ", 0) or 0 for r in rows), default=None)
        res["pages_differ_all_max"] = max((r.get("pages_differ_all", 0) or 0 for r in rows), default=None)
        res["corrupted_by_pages"] = sum(bool(r.get("pages_differ")) for r in rows)
    else:
        res["overlap_max_ms"] = max((r["overlap_ms"] for r in rows), default=None)
    res["corrupted_first_after_boot"] = sum(bool(r.get("corrupted")) and r.get("since_boot") == 1 for r in rows)
    res["corrupted_by_guest_check"] = sum(any("guest check" in p or "pings" in p or "console" in p
                                              for p in r.get("problems", [])) for r in rows)
    if error:
        res["error"] = error
    return res


def all_cells(parts: list[str], qemus: list[str]) -> list[str]:
    keys = []
    for part in parts:
        for ver in qemus:
            for tr in ("tls", "plain"):
                for sw in ("stop", "pause"):
                    for dl in (300, 20):
                        for load in ("busy", "idle"):
                            keys.append(f"{part}/{ver}/{sw}/{dl}/{load}/{tr}")
    return keys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="migrations per cell (default 100)")
    ap.add_argument("--qemu", choices=("7.2", "10.0", "both"), default="both")
    ap.add_argument("--part", choices=("raw", "qsup", "both"), default="both")
    ap.add_argument("--cells", nargs="*", default=["*"], help="fnmatch patterns over cell keys")
    ap.add_argument("--rate", type=int, default=DEFAULT_RATE, help=f"busy guest's memcheck MiB/s ({DEFAULT_RATE})")
    ap.add_argument("--pause-ms", type=float, default=0, help="raw pause cells: hold pre-switchover this long")
    ap.add_argument("--migration-timeout", type=float, default=120, help="cancel a migration after this (s)")
    ap.add_argument("--no-memcmp", action="store_true", help="raw: skip the pmemsave comparison")
    ap.add_argument("--exclude", default=None,
                    help="raw: guest-physical ranges left out of the comparison, 'START-END,...' (hex), or 'none'")
    ap.add_argument("--settle", type=float, default=5,
                    help="seconds between a guest's boot (memcheck running) and its first migration (5)")
    ap.add_argument("--out", default="/tmp/integrity", help="dir for the per-migration rows")
    args = ap.parse_args()
    if args.exclude and args.exclude != "none":
        EXCLUDE[:] = [(int(r.split("-")[0], 16), int(r.split("-")[1], 16)) for r in args.exclude.split(",")]
    elif args.exclude == "none":
        EXCLUDE.clear()

    signal.signal(signal.SIGTERM, _sigterm)
    parts = ["raw", "qsup"] if args.part == "both" else [args.part]
    qemus = ["7.2", "10.0"] if args.qemu == "both" else [args.qemu]
    keys = [k for k in all_cells(parts, qemus) if any(fnmatch.fnmatchcase(k, p) for p in args.cells)]
    if not keys:
        print("no cell matches", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows_path = out / f"rows-{stamp}.jsonl"
    versions = {v: sh(QEMUS[v], "--version").stdout.splitlines()[0] for v in qemus}
    log(f"cells ({len(keys)}): {keys}; n={args.n}, busy rate {args.rate} MiB/s, rows -> {rows_path}")

    work = Path(tempfile.mkdtemp(prefix="qsup-integrity-"))
    work.chmod(0o755)
    shm = Path(tempfile.mkdtemp(prefix="qsup-integrity-", dir="/dev/shm"))
    results: dict = {}
    t0 = time.monotonic()
    interrupted = False
    try:
        creds = make_qemu_tls(work) if any(k.endswith("/tls") for k in keys) else None
        with open(rows_path, "a") as rows_out:
            for part in parts:
                for ver in qemus:
                    for tr in ("tls", "plain"):
                        group = []
                        for k in keys:
                            p, v, sw, dl, load, tr_ = k.split("/")
                            if (p, v, tr_) == (part, ver, tr):
                                group.append((k, sw == "pause", int(dl), load == "busy"))
                        if not group:
                            continue
                        if part == "raw":
                            run_raw(ver, tr == "tls", group, args, work, shm, creds, results, rows_out)
                        else:
                            run_qsup(ver, tr == "tls", group, args, work, results, rows_out)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: tearing down")
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    res = {"bench": "migration_integrity", "n": args.n, "busy_rate_mib_s": args.rate, "dirty_mb": DIRTY_MB,
           "memory_mib": MEM_MB, "raw_machine": MACHINE, "raw_max_bandwidth": MAX_BANDWIDTH,
           "raw_pause_ms": args.pause_ms, "settle_s": args.settle, "exclude": [[hex(s), hex(e)] for s, e in EXCLUDE],
           "qemu": versions, "wall_s": round(time.monotonic() - t0), "interrupted": interrupted,
           "rows": str(rows_path), "cells": results}
    print(json.dumps(res))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
