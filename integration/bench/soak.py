"""Soak benchmark: N live migrations (default 200) of one running guest, A <-> B, under ping.

Topology: migtopo.TwoNodes (client + node A + node B, each node with its own
``qsup serve``), built in a temp dir and torn down at the end.  Both daemons run
with ``event_retention = 100`` (the smallest the config allows), so the event
log's retention is exercised many times over: one migration is ~20-30 events
per node.

Each migration goes through the real CLI (``qsup migrate NAME --to DST --json``)
inside a migtopo.MigrationWatch: both nodes' 1 ms route samplers and the client's
10 ms ping.  The direction is decided by where the guest actually runs (asked
from both daemons), so a failed migration -- the guest stays on its source -- is
counted and the soak goes on from where the guest is.

Sampled for each daemon (pid of ``qsup serve``, read from /proc):

* **fds**: entries in /proc/PID/fd;
* **rss**: VmRSS from /proc/PID/status (and Threads);
* **db**: the state dir's ``events.db`` + ``events.db-wal`` (bytes), and the
  events table's row count / highest seq (read-only SQLite connection);
* **state**: every other byte in the state dir (records, journals, logs).

One sample per node right before the first migration (index 0) and one after
each migration (index i, once the ping recovered), which gives the curves; a
background thread also samples every 0.25 s to catch the peak *during*
migrations (``*_max``).  A daemon's numbers depend on whether it holds the
guest (a QMP connection, console pump, ...), so they zigzag with the direction;
with an even N the guest ends on A, where it started, so first and last are
like for like.  Trends: least-squares slope per 100 migrations over all samples
and over the second half (``*_slope_late_per100``), where the event DB is long
past its retention point.

Checked after every migration (``strays``): exactly one QEMU of this topology
alive, the tap / record / /32 route only on the node holding the guest.

The guest is busy and checked whole after every migration (issue 14, integration/guestcheck.py):
it runs memcheck (kernel command line ``guest.dirty=BENCH_DIRTY guest.dirty_mb=BENCH_DIRTY_MB``,
default 10 MiB/s over 24 MiB; ``BENCH_DIRTY=0``: idle, no memcheck), and after each migration,
on the node now holding it, ``check_guest`` asks that it answers a ping from the client, that
its console *since the migration began* (that node's log still holds its earlier stays) shows
no virtio error, oops, panic or ``MEMCHECK-MISMATCH``, and that memcheck verified a full sweep
there -- all within ``BENCH_CHECK_TIMEOUT`` s (default 60).  A migration whose guest fails it
counts in ``corrupted`` (the first five reports in ``corrupted_detail``), whatever the
migration's own result; the soak goes on while the guest still answers and stops after a
check that leaves it silent.  Before the first migration the same check must pass on node A
(else the run is a setup failure).

Checked at the end, after ``qsup stop`` + ``qsup rm`` (``leaks``): no QEMU, and
each node's links, IPv4/IPv6 routes (all tables), rules, proxy neighbours,
instance records and run-dir entries equal to what they were before the guest
started.

Human lines first; the last line is one JSON object (``"bench": "soak"``), with
``corrupted`` (and ``dirty_mbps``) besides the keys above.  The exit status is non-zero when
a migration failed, a stray or leak was found, or ``corrupted`` is not 0 (the JSON is printed
first).
``--samples PATH`` writes every per-migration row as JSON lines, ``--svg PATH``
draws fd / RSS / DB size against the migration number.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "integration"))
sys.path.insert(0, str(ROOT))

from guestcheck import check_guest, netns_ping, qsup_console_reader  # noqa: E402 -- importable once sys.path above is set
from migtopo import MigrationWatch, TwoNodes, close_nodes, loss_budget, percentile  # noqa: E402 -- importable once sys.path above is set
from supervisor._client import Client  # noqa: E402 -- importable once sys.path above is set
from supervisor._config import Config  # noqa: E402 -- importable once sys.path above is set
from topo import QsupDaemon, guest_spec, pid_alive  # noqa: E402 -- importable once sys.path above is set

IP, MAC = "10.99.0.2", "52:54:00:99:00:57"
NAME = f"soak-{os.getpid()}"  # unique: QEMU's command line names its guest (its paths are all fds)
RETENTION = 100
#: the guest's memory workload (MiB/s; 0 = idle guest, no memcheck) and its size (MiB):
#: moderate, so that many busy TCG guests share two cores (evacuation.py uses the same knobs)
DIRTY = int(os.environ.get("BENCH_DIRTY", "10"))
DIRTY_MB = int(os.environ.get("BENCH_DIRTY_MB", "24"))
#: seconds a guest check may take (a ping answered, then a full memcheck sweep verified)
CHECK_TIMEOUT = float(os.environ.get("BENCH_CHECK_TIMEOUT", "60"))


# --- the guest check (issue 14) ----------------------------------------------------------------

def busy_append() -> str:
    """The kernel command line words that start memcheck (none when ``BENCH_DIRTY=0``)."""
    return f" guest.dirty={DIRTY} guest.dirty_mb={DIRTY_MB}" if DIRTY else ""


def console_since(state_dir: Path, name: str) -> Callable[[], str]:
    """A ``console_text_fn`` for guest ``name``'s console log on the node whose state dir is
    ``state_dir``, returning only what was written there after this call.

    qsup keeps a guest's console log when the guest leaves a node, and appends to it when it
    comes back, so a check must not judge the lines of an earlier stay.  The log's inode, size
    and last bytes are noted now; a read takes that same file (same inode, same bytes before
    the offset: an inode number is reused) from the offset on -- or, once qsup rotated it to
    ``LOG.1``, that file from the offset plus all of the new ``LOG``; once neither is that file
    any more (or there was no log), both files are new text.
    """
    path = Path(state_dir) / "logs" / f"{name}.console"
    rotated = path.with_name(path.name + ".1")
    mark: tuple[int, int, bytes] | None = None
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - 256))
            tail = f.read(size - f.tell())
            mark = (os.fstat(f.fileno()).st_ino, size, tail)
    except FileNotFoundError:
        pass

    def read_from(p: Path) -> tuple[bool, str]:
        """(is it the noted file, its text after the mark -- or all of it if not)"""
        try:
            with open(p, "rb") as f:
                same = False
                if mark is not None and os.fstat(f.fileno()).st_ino == mark[0]:
                    _, size, tail = mark
                    f.seek(size - len(tail))
                    same = f.read(len(tail)) == tail
                if not same:
                    f.seek(0)
                return same, f.read().decode(errors="replace")
        except FileNotFoundError:
            return False, ""

    def read() -> str:
        same, text = read_from(path)
        if same:
            return text  # not rotated since: LOG.1 is older than the mark
        return read_from(rotated)[1] + text

    return read


def guest_check(state_dir: Path, name: str, ns_name: str, addr: str, *,
                since: bool = True) -> Callable[[], str | None]:
    """Start watching guest ``name`` on one node (its console from now on; with ``since``
    false, all of it); the returned callable runs ``check_guest`` there, pinging ``addr`` from
    namespace ``ns_name``, and gives None (whole) or the failure report."""
    console = console_since(state_dir, name) if since else qsup_console_reader(state_dir, name)

    def check() -> str | None:
        try:
            check_guest(console, netns_ping(ns_name, addr), busy=bool(DIRTY), timeout=CHECK_TIMEOUT)
        except AssertionError as e:
            return str(e)
        return None

    return check


# --- sampling --------------------------------------------------------------------------------

def fd_kinds(pid: int) -> dict:
    """The daemon's fds by kind: socket, pipe, anon_inode:[...], or the file's path."""
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        k = target.split(":[")[0] if target.startswith(("socket:", "pipe:")) else target
        kinds[k] = kinds.get(k, 0) + 1
    return kinds


def proc_stats(pid: int) -> dict:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    st = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "Threads"):
            st[k] = int(v.split()[0])
    return {"fds": fds, "rss_kb": st.get("VmRSS", 0), "threads": st.get("Threads", 0)}


def db_stats(state_dir: Path, rows: bool = True) -> dict:
    db, wal = state_dir / "events.db", state_dir / "events.db-wal"

    def size(p: Path) -> int:
        return p.stat().st_size if p.exists() else 0

    res = {"db_bytes": size(db) + size(wal), "wal_bytes": size(wal)}
    if rows and db.exists():
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            n, hi = con.execute("SELECT count(*), max(seq) FROM events").fetchone()
        finally:
            con.close()
        res |= {"rows": n, "max_seq": hi}
    return res


def dir_bytes(path: Path, skip: tuple[str, ...] = ()) -> int:
    total = 0
    for dp, _, files in os.walk(path):
        for f in files:
            if f in skip:
                continue
            try:
                total += os.lstat(os.path.join(dp, f)).st_size
            except OSError:
                pass
    return total


def node_sample(d) -> dict:
    s = proc_stats(d.pid) | db_stats(d.state_dir)
    s["fd_kinds"] = fd_kinds(d.pid)
    s["sockets"] = s["fd_kinds"].get("socket", 0)
    s["fds_nonsock"] = s["fds"] - s["sockets"]
    s["state_other_bytes"] = dir_bytes(d.state_dir, skip=("events.db", "events.db-wal", "events.db-shm"))
    return s


def qemu_pids(work: Path) -> list[int]:
    """Live QEMU processes of this run's guest, whoever their parent (an orphan counts).

    By ``-name guest=NAME,``: QEMU gets every path as an fd, so its command line does
    not name the work dir (``work`` is kept for the signature's sake).
    """
    mark = f"guest={NAME},".encode()
    res = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmd.split(b"\0")[0] and mark in cmd and pid_alive(int(p)):
            res.append(int(p))
    return res


def zombies(parents: set[int]) -> int:
    """Children of ``parents`` that exited and were not reaped (yet)."""
    n = 0
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z" and int(fields[1]) in parents:
            n += 1
    return n


class PeakSampler:
    """Samples both daemons every ``period`` s in a thread; keeps the maxima."""

    KEYS = ("fds", "rss_kb", "threads", "db_bytes")

    def __init__(self, daemons: dict, period: float = 0.25):
        self.daemons, self.period = daemons, period
        self.max = {n: {k: 0 for k in self.KEYS} for n in daemons}
        self.n = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            for n, d in self.daemons.items():
                try:
                    s = proc_stats(d.pid) | db_stats(d.state_dir, rows=False)
                except (OSError, ValueError):
                    continue
                m = self.max[n]
                for k in self.KEYS:
                    m[k] = max(m[k], s[k])
            self.n += 1

    def stop(self) -> None:
        self._stop.set()
        self._t.join(timeout=5)


# --- host state, for the leak check ----------------------------------------------------------

def host_state(ns, d) -> dict:
    def lines(*argv):
        return sorted(l.strip() for l in ns.run(*argv, check=False).splitlines() if l.strip())

    return {
        "links": sorted(ns.links()),
        "routes4": lines("ip", "-4", "route", "show", "table", "all"),
        "routes6": lines("ip", "-6", "route", "show", "table", "all"),
        "rules4": lines("ip", "rule", "show"),
        "rules6": lines("ip", "-6", "rule", "show"),
        "neigh_proxy": lines("ip", "neigh", "show", "proxy") + lines("ip", "-6", "neigh", "show", "proxy"),
        "records": sorted(p.name for p in (d.state_dir / "instances").iterdir())
        if (d.state_dir / "instances").is_dir() else [],
        "run_dir": sorted(p.name for p in d.run_dir.iterdir()) if d.run_dir.is_dir() else [],
    }


def _settling(line: str, links: list[str]) -> bool:
    """A kernel route for an IPv6 link-local address of a topology link that existed before:
    it appears once DAD finishes on that link, whenever that is (not qsup's doing)."""
    words = line.split()
    dev = words[words.index("dev") + 1] if "dev" in words else None
    return "fe80::" in line and "proto kernel" in line and dev in links


def diff_state(before: dict, after: dict) -> dict:
    out = {}
    for k, old in before.items():
        routes = k.startswith("routes")
        added = sorted(x for x in set(after[k]) - set(old) if not (routes and _settling(x, before["links"])))
        removed = sorted(x for x in set(old) - set(after[k]) if not (routes and _settling(x, before["links"])))
        if added or removed:
            out[k] = {"added": added, "removed": removed}
    return out


def holder_of(daemons: dict) -> list[str]:
    """The nodes whose daemon reports NAME alive (running, or paused between hops)."""
    res = []
    for n, d in daemons.items():
        with Client(d.socket) as c:
            for v in c.list():
                if v["name"] == NAME and v["state"] in ("running", "paused", "migrating", "starting"):
                    res.append(n)
    return res


def route_present(ns) -> bool:
    return bool(ns.run("ip", "route", "show", f"{IP}/32", check=False).strip())


def strays(t: TwoNodes, daemons: dict, holder: str, work: Path) -> list[str]:
    """What should not exist right after a migration, given that ``holder`` runs the guest."""
    bad = []
    q = qemu_pids(work)
    if len(q) != 1:
        bad.append(f"{len(q)} qemu processes: {q}")
    for n, ns in (("a", t.a), ("b", t.b)):
        d = daemons[n]
        recs = [p.name for p in (d.state_dir / "instances").iterdir()] if (d.state_dir / "instances").is_dir() else []
        route = route_present(ns)
        if n != holder:
            if route:
                bad.append(f"route {IP}/32 on non-holder {n}")
            if recs:
                bad.append(f"records on non-holder {n}: {recs}")
        elif not route:
            bad.append(f"no route {IP}/32 on holder {n}")
    return bad


# --- statistics ------------------------------------------------------------------------------

def slope_per100(xs: list[float], ys: list[float]) -> float | None:
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx * 100


def series_stats(rows: list[dict], node: str, key: str, scale: float = 1.0, nd: int = 3) -> dict:
    xs = [r["i"] for r in rows]
    ys = [r[node][key] / scale for r in rows]
    half = len(rows) // 2

    def r(v: float | None) -> float | None:
        return None if v is None else round(v, nd)

    return {"first": r(ys[0]), "last": r(ys[-1]), "min": r(min(ys)), "max": r(max(ys)),
            "slope_per100": r(slope_per100(xs, ys)),
            "slope_late_per100": r(slope_per100(xs[half:], ys[half:]))}


# --- the plot --------------------------------------------------------------------------------

def svg(rows: list[dict], path: Path, title: str) -> None:
    """Three stacked panels (fds, RSS MB, event DB KB), node A and node B, against migration number."""
    W, PH, L, R, T, GAP = 720, 150, 62, 16, 34, 34
    panels = [("fds", "open fds (dashed: other than sockets)", 1.0), ("rss_kb", "RSS (MB)", 1024.0),
              ("db_bytes", "events.db + -wal (KB)", 1024.0)]
    H = T + len(panels) * (PH + GAP) + 10
    xs = [r["i"] for r in rows]
    xmax = max(xs) or 1
    colors = {"a": "#1f77b4", "b": "#d62728"}
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
            f'font-family="sans-serif" font-size="11">'),
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="18" font-size="13">{title}</text>',
           f'<text x="{W - R - 150}" y="18" fill="{colors["a"]}">&#9644; node A</text>',
           f'<text x="{W - R - 80}" y="18" fill="{colors["b"]}">&#9644; node B</text>']
    for pi, (key, label, scale) in enumerate(panels):
        y0 = T + pi * (PH + GAP)
        vals = [r[n][key] / scale for r in rows for n in ("a", "b")]
        lo, hi = min(vals), max(vals)
        lo = 0 if key != "rss_kb" else lo * 0.9
        hi = hi * 1.1 if hi > lo else lo + 1
        def sx(x, xmax=xmax):
            return L + (W - L - R) * x / xmax

        def sy(v, y0=y0, lo=lo, hi=hi):
            return y0 + PH - PH * (v - lo) / (hi - lo)
        out.append(f'<rect x="{L}" y="{y0}" width="{W - L - R}" height="{PH}" fill="none" stroke="#999"/>')
        out.append(f'<text x="{L + 4}" y="{y0 + 13}" fill="#333">{label}</text>')
        for k in range(5):
            v = lo + (hi - lo) * k / 4
            out.append(f'<line x1="{L - 4}" x2="{L}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" stroke="#999"/>')
            out.append(f'<text x="{L - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.0f}</text>')
        for k in range(6):
            x = xmax * k / 5
            out.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{y0 + PH}" y2="{y0 + PH + 4}" stroke="#999"/>')
            out.append(f'<text x="{sx(x):.1f}" y="{y0 + PH + 15}" text-anchor="middle">{x:.0f}</text>')
        for n in ("a", "b"):
            pts = " ".join(f"{sx(r['i']):.1f},{sy(r[n][key] / scale):.1f}" for r in rows)
            out.append(f'<polyline points="{pts}" fill="none" stroke="{colors[n]}" stroke-width="1.2"/>')
            if key == "fds" and all("fds_nonsock" in r[n] for r in rows):  # dashed: fds other than sockets
                pts = " ".join(f"{sx(r['i']):.1f},{sy(r[n]['fds_nonsock']):.1f}" for r in rows)
                out.append(f'<polyline points="{pts}" fill="none" stroke="{colors[n]}" stroke-width="1"'
                           f' stroke-dasharray="4 3"/>')
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 4}" text-anchor="middle">migration number</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


# --- the run ---------------------------------------------------------------------------------

def evidence(w: dict, daemons: dict, seq0: dict, src: str) -> dict:
    """Route transitions (both samplers, CLOCK_REALTIME) and both nodes' migration/netconf events
    of this migration, so an overlap or a long gap can be told from a late sampler afterwards.

    ``src`` is the node the migration left; ``src_routes`` its sampler, ``dst_routes`` the other's.
    The source emits ``migration.switchover`` after its L3 release returned (``_migration.py``),
    so a source sampler that reports the release after that event's ``ts`` was late."""
    evs = {}
    for n, d in daemons.items():
        with Client(d.socket) as c:
            evs[n] = [{k: e.get(k) for k in ("seq", "ts", "type", "status", "step", "result", "error")
                       if e.get(k) is not None}
                      for e in c.events(since=seq0[n]) if e.get("instance") == NAME
                      and not e["type"].startswith(("qmp.MIGRATION_PASS", "qmp.RTC"))]
    return {"src": src, "src_routes": w["src_routes"], "dst_routes": w["dst_routes"], "events": evs}


def start_daemons(t: TwoNodes) -> tuple[QsupDaemon, QsupDaemon, bool]:
    """migtopo's two daemons, each also declaring the other as a ``[peers]`` entry when the
    config knows peers (then ``qsup migrate --to`` takes the node name).  Registered in
    ``t.daemons`` before they are waited for, so ``close_nodes`` kills them whatever happens."""
    peers = "peers" in Config.model_fields
    addr = {"a": "10.200.0.1", "b": "10.200.0.2"}
    made = []
    for node, me, other in ((t.a, "a", "b"), (t.b, "b", "a")):
        wd = t.workdir / f"node-{me}"
        wd.mkdir(exist_ok=True)
        cfg = (f'node_name = "node-{me}"\nmigration_address = "{addr[me]}"\n'
               f'announce_interfaces = ["uplink"]\nevent_retention = {RETENTION}\n')
        if peers:
            cfg += (f'[peers]\n"node-{other}" = {{ api = "unix:{t.workdir}/node-{other}/qsup.sock", '
                    f'migration = "{addr[other]}" }}\n')
        dm = QsupDaemon(node, wd, start=False, extra_config=cfg)
        t.daemons.append(dm)
        made.append(dm)
    for dm in made:
        dm.start()
    return made[0], made[1], peers


def migrate(src, dst, dst_name: str, mode: dict) -> tuple[dict, str]:
    """One `qsup migrate`; ``--to`` is the peer's socket path, or its node name where the
    daemon only accepts declared peers (tried once, then remembered in ``mode``)."""
    def run(to):
        r = src.cli("migrate", NAME, "--to", to, "--json", timeout=300, check=False)
        lines = r.stdout.strip().splitlines()
        try:
            return r, json.loads(lines[-1]) if lines else None
        except ValueError:
            return r, None

    to = dst_name if mode.get("by_name") else str(dst.socket)
    r, summary = run(to)
    if r.returncode == 2 and not mode.get("by_name") and "to" in r.stderr:
        mode["by_name"] = True
        r, summary = run(dst_name)
    return summary or {"result": "failed", "error": f"rc={r.returncode}"}, r.stderr.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--migrations", type=int, default=int(os.environ.get("BENCH_N", "200")))
    ap.add_argument("--samples", type=Path, help="write the per-migration rows here (JSON lines)")
    ap.add_argument("--svg", type=Path, help="draw fd / RSS / DB size vs migration number here")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds of ping after each migration")
    ap.add_argument("--idle-wait", type=float, default=80.0,
                    help="seconds idle after the guest is removed before the final fd sample")
    ap.add_argument("--from-samples", type=Path, metavar="JSONL",
                    help="run nothing: draw --svg from a --samples file of an earlier run")
    args = ap.parse_args()
    if args.from_samples:
        rows = [json.loads(line) for line in args.from_samples.read_text().splitlines() if line.strip()]
        svg(rows, args.svg, f"qsup soak: {len(rows) - 1} live migrations A\u2194B, event_retention={RETENTION}")
        return 0

    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="qsup-soak-"))
    t = None
    peak = None
    rows: list[dict] = []
    fails: list[dict] = []
    corrupted: list[dict] = []
    res: dict = {"bench": "soak"}
    rc = 1
    try:
        t = TwoNodes(work)  # prefix "qst" (topo.NETNS_PREFIXES)
        a, b, by_name = start_daemons(t)
        daemons = {"a": a, "b": b}
        start = {n: node_sample(d) for n, d in daemons.items()}  # before any guest
        nss = {"a": t.a, "b": t.b}
        for n, d in daemons.items():  # the pid is `qsup serve` itself (ip netns exec execs it)
            cmd = Path(f"/proc/{d.pid}/cmdline").read_bytes()
            assert b"serve" in cmd, cmd
        base = {n: host_state(nss[n], daemons[n]) for n in daemons}
        spec = guest_spec(NAME, [{"mode": "routed", "mac": MAC, "ip": IP}],
                          append=f"guest.ip0={IP}/32{busy_append()}")
        a.start_instance(spec)
        a.wait_console(NAME)
        if not t.client.ping(IP):
            raise RuntimeError("guest not reachable before the first migration")
        problem = guest_check(a.state_dir, NAME, t.client.name, IP, since=False)()  # a whole boot, memcheck runs
        if problem:
            raise RuntimeError(f"the guest is not whole before the first migration:\n{problem}")
        rows.append({"i": 0, "holder": "a", "a": node_sample(a), "b": node_sample(b), "qemus": len(qemu_pids(work))})
        peak = PeakSampler(daemons)
        mode: dict = {"by_name": by_name}
        holder = "a"
        print(f"soak: {args.migrations} migrations, event_retention={RETENTION}, guest memcheck "
              f"{f'{DIRTY} MiB/s over {DIRTY_MB} MiB' if DIRTY else 'off'}, work dir {work}", flush=True)
        for i in range(1, args.migrations + 1):
            other = "b" if holder == "a" else "a"
            src_node = holder
            src, dst = daemons[holder], daemons[other]
            tw = time.monotonic()
            seq0 = {n: d.last_seq() for n, d in daemons.items()}
            # both consoles from here on: the guest is checked where it ends up
            checks = {n: guest_check(d.state_dir, NAME, t.client.name, IP) for n, d in daemons.items()}
            watch = MigrationWatch(t, nss[holder], nss[other], IP, work, tag=str(i % 2))
            try:
                watch.ping.wait_replies(20)  # replies before the migration, so loss is counted between replies
                summary, err = migrate(src, dst, f"node-{other}", mode)
                time.sleep(args.settle)  # let the ping recover on the destination
            finally:
                w = watch.result()
            now = holder_of(daemons)
            if len(now) != 1:
                raise RuntimeError(f"after migration {i} the guest runs on {now or 'no node'}: {summary} {err[-500:]}")
            ok = summary.get("result") == "completed" and now == [other]
            if not ok:
                fails.append({"i": i, "from": holder, "summary": summary, "stderr": err[-300:]})
            holder = now[0]
            problem = checks[holder]()  # the guest is whole on the node holding it (issue 14)
            if problem:
                corrupted.append({"i": i, "from": src_node, "on": holder, "report": problem[-3000:]})
                print(f"#{i:<3} GUEST NOT WHOLE on {holder}:\n{problem}", flush=True)
            down = max(summary.get("downtime_ms") or 0, summary.get("switchover_ms") or 0)
            row = {"i": i, "holder": holder, "ok": ok, "total_ms": summary.get("total_ms"),
                   "downtime_ms": summary.get("downtime_ms"), "switchover_ms": summary.get("switchover_ms"),
                   "lost": w["ping"]["lost"], "sent": w["ping"]["sent"], "budget": loss_budget(down),
                   "overlap_ms": w["overlap_ms"], "gap_ms": w["gap_ms"],
                   "strays": strays(t, daemons, holder, work), "qemus": len(qemu_pids(work)),
                   "zombies": zombies({a.pid, b.pid}), "guest_ok": problem is None,
                   "a": node_sample(a), "b": node_sample(b), "wall_s": round(time.monotonic() - tw, 2)}
            if row["overlap_ms"] or row["gap_ms"] > down + 20:  # keep what explains it (files are reused)
                row["evidence"] = evidence(w, daemons, seq0, src_node)
            rows.append(row)
            print(f"#{i:<3} {'A->B' if other == 'b' else 'B->A'} {'ok' if ok else 'FAILED'} total {row['total_ms']} "
                  f"ms down {row['downtime_ms']} ms | lost {row['lost']}/{row['sent']} overlap {row['overlap_ms']} | "
                  f"fds {row['a']['fds']}/{row['b']['fds']} rss {row['a']['rss_kb'] // 1024}/"
                  f"{row['b']['rss_kb'] // 1024} MB db {row['a']['db_bytes'] // 1024}/{row['b']['db_bytes'] // 1024}"
                  f" KB rows {row['a'].get('rows')}/{row['b'].get('rows')}"
                  + (f" | STRAYS {row['strays']}" if row["strays"] else "")
                  + ("" if problem is None else " | GUEST CORRUPTED"), flush=True)
            if problem and not t.client.ping(IP):
                print(f"soak stopped after migration {i}: the guest no longer answers", flush=True)
                break
        peak.stop()
        # the end: stop and forget the guest, then compare the hosts with before
        d = daemons[holder]
        d.cli("stop", NAME, "--json", timeout=120)
        d.cli("rm", NAME, "--json", timeout=60)
        time.sleep(0.5)
        end = {n: node_sample(daemons[n]) for n in daemons}
        # hypercorn closes a connection the client closed cleanly only at keep_alive_timeout
        # (75 s in _daemon.py): idle past it, then the daemons' fds are compared with `start`
        print(f"idle {args.idle_wait} s (HTTP keep-alive timeout), then the last sample", flush=True)
        time.sleep(args.idle_wait)
        idle = {n: node_sample(daemons[n]) for n in daemons}
        after = {n: host_state(nss[n], daemons[n]) for n in daemons}
        leaks = {"qemu": qemu_pids(work)}
        for n in daemons:
            dd = diff_state(base[n], after[n])
            if dd:
                leaks[n] = dd
        mig = rows[1:]
        lost = [r["lost"] for r in mig]
        res |= {"migrations": len(mig), "completed": sum(r["ok"] for r in mig), "failures": len(fails),
                "event_retention": RETENTION,
                "ping": {"sent": sum(r["sent"] for r in mig), "lost_total": sum(lost),
                         "lost_p50": percentile(lost, 50), "lost_p99": percentile(lost, 99),
                         "lost_max": max(lost) if lost else None,
                         "over_budget": sum(r["lost"] > r["budget"] for r in mig)},
                "overlap_max_ms": max((r["overlap_ms"] for r in mig), default=None),
                "gap_max_ms": max((r["gap_ms"] for r in mig), default=None),
                "migration_total_p50_ms": percentile([r["total_ms"] for r in mig if r["total_ms"]], 50),
                "downtime_p50_ms": percentile([r["downtime_ms"] for r in mig if r["downtime_ms"] is not None], 50),
                "downtime_max_ms": max((r["downtime_ms"] or 0 for r in mig), default=None)}
        for n in ("a", "b"):
            res[f"node_{n}"] = {
                "fds": series_stats(rows, n, "fds", nd=2),
                "fds_nonsock": series_stats(rows, n, "fds_nonsock", nd=2),
                "sockets": series_stats(rows, n, "sockets", nd=2),
                "rss_mb": series_stats(rows, n, "rss_kb", 1024.0),
                "db_kb": series_stats(rows, n, "db_bytes", 1024.0, nd=1),
                "threads": series_stats(rows, n, "threads", nd=2),
                "state_other_kb": series_stats(rows, n, "state_other_bytes", 1024.0, nd=1),
                "peak": {"fds": peak.max[n]["fds"], "rss_mb": round(peak.max[n]["rss_kb"] / 1024, 1),
                         "threads": peak.max[n]["threads"], "db_kb": round(peak.max[n]["db_bytes"] / 1024, 1)},
                "event_rows_max": max(r[n].get("rows") or 0 for r in rows),
                "last_seq": end[n].get("max_seq"),
                "before_guest": {"fds": start[n]["fds"], "sockets": start[n]["sockets"],
                                 "rss_mb": round(start[n]["rss_kb"] / 1024, 1)},
                "after_rm": {"fds": end[n]["fds"], "sockets": end[n]["sockets"],
                             "rss_mb": round(end[n]["rss_kb"] / 1024, 1)},
                "after_idle": {"fds": idle[n]["fds"], "sockets": idle[n]["sockets"],
                               "rss_mb": round(idle[n]["rss_kb"] / 1024, 1),
                               "fd_kinds_vs_before": {
                                   k: idle[n]["fd_kinds"].get(k, 0) - start[n]["fd_kinds"].get(k, 0)
                                   for k in set(idle[n]["fd_kinds"]) | set(start[n]["fd_kinds"])
                                   if idle[n]["fd_kinds"].get(k, 0) != start[n]["fd_kinds"].get(k, 0)}},
            }
        res["peak_samples"] = peak.n
        res["strays"] = sum(bool(r.get("strays")) for r in mig)
        res["zombies_max"] = max(r["zombies"] for r in mig)  # unreaped QEMUs, 1 s after each migration
        res["overlaps"] = [{"i": r["i"], "overlap_ms": r["overlap_ms"], "to": r["holder"]} for r in mig
                           if r["overlap_ms"]]
        for n in daemons:  # an fd the daemon still holds with no guest, past the keep-alive timeout
            extra = idle[n]["fds"] - start[n]["fds"]
            if extra > 0:
                leaks.setdefault(n, {})["fds"] = {"added": [f"{extra} fds"], "removed": [],
                                                  "kinds": res[f"node_{n}"]["after_idle"]["fd_kinds_vs_before"]}
        res["leaks"] = leaks
        res["leak_count"] = len(leaks["qemu"]) + sum(len(v["added"]) + len(v["removed"]) if k != "fds"
                                                     else idle[n]["fds"] - start[n]["fds"]
                                                     for n in ("a", "b") for k, v in leaks.get(n, {}).items())
        res["fail_detail"] = fails[:5]
        res["corrupted"] = len(corrupted)  # migrations whose guest failed the check (issue 14)
        res["corrupted_detail"] = corrupted[:5]
        res["dirty_mbps"] = DIRTY
        rc = 0 if (not fails and res["leak_count"] == 0 and not res["strays"] and not corrupted) else 1
    finally:
        if peak is not None:
            peak.stop()
        if t is not None:
            close_nodes(t)
        for pid in qemu_pids(work):  # close_nodes finds QEMUs by the work dir in their cmdline: none has it
            print(f"warning: killing left-over qemu {pid}", file=sys.stderr)
            os.kill(pid, 9)
        subprocess.run(["rm", "-rf", str(work)], check=False)
    res["wall_s"] = round(time.monotonic() - t0, 1)
    if args.samples:
        with open(args.samples, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if args.svg and len(rows) > 1:
        svg(rows, args.svg, f"qsup soak: {len(rows) - 1} live migrations A\u2194B, event_retention={RETENTION}")
    for n in ("a", "b"):
        s = res[f"node_{n}"]
        print(f"node {n.upper()}: fds before the guest {s['before_guest']['fds']}, after rm {s['after_rm']['fds']},"
              f" after idle {s['after_idle']['fds']}; non-socket fds {s['fds_nonsock']['first']} -> "
              f"{s['fds_nonsock']['last']} (max {s['fds_nonsock']['max']})")
        print(f"node {n.upper()}: fds {s['fds']['first']} -> {s['fds']['last']} (max {s['peak']['fds']}, slope "
              f"{s['fds']['slope_per100']}/100), RSS {s['rss_mb']['first']} -> {s['rss_mb']['last']} MB (late slope "
              f"{s['rss_mb']['slope_late_per100']} MB/100), DB {s['db_kb']['first']} -> {s['db_kb']['last']} KB "
              f"(max {s['db_kb']['max']}, late slope {s['db_kb']['slope_late_per100']} KB/100), rows max "
              f"{s['event_rows_max']}")
    print(f"migrations {res['migrations']}, failures {res['failures']}, corrupted {res['corrupted']}, ping lost total "
          f"{res['ping']['lost_total']} (max {res['ping']['lost_max']}), strays {res['strays']}, "
          f"leaks {res['leak_count']}, wall {res['wall_s']} s")
    print(json.dumps(res))
    return rc


if __name__ == "__main__":
    sys.exit(main())
