"""Storage migration benchmark (issue 17): a guest with a local disk that it writes throughout,
live-migrated over NBD between two nodes with local disks (integration/stortopo.py), in one run
next to the same guest on a shared disk and the same mirror + migrate sequence done by hand
against QEMU.

Per run (``BENCH_N`` rounds, default 3; disk ``BENCH_DISK_MIB``, default 1024, of which
``BENCH_FILL_MIB`` (default 128) random data, the rest sparse; the guest's write loop rewrites
8 MiB of it throughout, verifying every block):

* **local**: ``qsup migrate`` of the local-disk guest, alternately A->B and B->A (the source's
  image is removed after each move: the next destination must create its own), under the
  client's 10 ms ping with both nodes' routes sampled (migtopo.MigrationWatch);
* **shared**: the same guest shape on a disk in ``shared_image_dirs``, A->B / B->A;
* **raw**: two QEMUs started by hand in the node namespaces (the destination ``-incoming defer
  -S`` on its own empty image), the DESIGN sequence over the migration link: ``nbd-server-start``
  + ``block-export-add``, ``blockdev-add`` nbd + ``blockdev-mirror`` (full, write-blocking) until
  ready, ``migrate`` with pause-before-switchover, ``block-job-cancel`` + ``blockdev-del`` at
  ``pre-switchover``, ``migrate-continue``, ``nbd-server-stop`` + ``cont`` at ``completed``.
  Timed from the ``blockdev-add`` to ``cont`` returned; qsup's total from the CLI call to its
  answer (so qsup's includes the prepare: the destination QEMU's start, the image creation, the
  API calls).

Then once: an **aborted** local migration (the destination aborts while the RAM moves, the
mirror in sync), then the guest stopped and its source image checked block by block from the
host (every block of the write loop a whole diskpat block of its own number, passes within 1).

JSON keys: ``ratio_vs_raw`` (p50 of qsup's own ``total_ms`` -- the source's migration from its
start, prepare and destination QEMU start included, to the destination's activation -- over p50
raw total; ``ratio_vs_raw_cli_wall`` uses the CLI's wall time instead, which adds the CLI's own
start and its follow-up polling), ``downtime_delta_ms`` (p50
local downtime - p50 shared downtime, QEMU's figures), ``mismatches`` (diskpat MISMATCH/ERROR
lines on every console), ``overlap_ms`` (max), ``rollback_source_unchanged``, ``leaks`` (block
jobs, NBD nodes, exports, target images left, QEMUs left at the end).  Human lines first; the
last line is one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

from guestcheck import disk_problems, diskload_progress, qsup_console_reader  # noqa: E402
from migtopo import MigrationWatch, close_nodes  # noqa: E402
from stortopo import Storage, host_disk_check, make_image, qemu_leftovers, start_nodes  # noqa: E402
from topo import GUEST, QEMU, guest_spec  # noqa: E402

N = int(os.environ.get("BENCH_N", "3"))
DISK = int(os.environ.get("BENCH_DISK_MIB", "1024")) << 20
FILL = int(os.environ.get("BENCH_FILL_MIB", "128")) << 20
BLOCKS = 2048
IP = "10.99.0.2"
MAC = "52:54:00:99:00:02"
APPEND = f"guest.ip0={IP}/32 guest.diskload=vda guest.diskload_blocks={BLOCKS} guest.diskload_every=5"


def say(*a) -> None:
    print(*a, flush=True)


def spec(name: str, path: Path) -> dict:
    return guest_spec(name, [{"mode": "routed", "mac": MAC, "ip": IP}], append=APPEND,
                      disks=[{"id": "data", "path": str(path), "format": "raw"}])


def wait_passes(read, n: int, since: int = 0, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while (p := diskload_progress(read()) or 0) < since + n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"write loop at pass {p}: {read()[-800:]}")
        time.sleep(0.2)
    return p


def qsup_moves(t, nodes, name, st, *, local: bool, tmp: Path, results: list) -> int:
    """N migrations of ``name``, alternating; returns the mismatch lines seen on its consoles."""
    src, dst = nodes
    for i in range(N):
        read = qsup_console_reader(src.state_dir, name)
        wait_passes(read, 2, since=diskload_progress(read()) or 0)
        sns, dns = (t.a, t.b) if src is nodes[0] else (t.b, t.a)
        with MigrationWatch(t, sns, dns, IP, tmp, tag=f"-{name}-{i}") as w:
            w.ping.wait_replies(20)
            t0 = time.perf_counter()
            r = src.cli("migrate", name, "--to", dst.node_name, "--json", timeout=900)
            wall = (time.perf_counter() - t0) * 1000
            w.ping.wait_replies(30, timeout=20)
            res = w.result()
        s = json.loads(r.stdout.strip().splitlines()[-1])
        left = qemu_leftovers(dst, name)
        results.append({"kind": "local" if local else "shared", "wall_ms": round(wall, 1),
                        "downtime_ms": s.get("downtime_ms"), "total_ms": s.get("total_ms"),
                        "result": s.get("result"), "overlap_ms": res["overlap_ms"], "lost": res["ping"]["lost"],
                        "leftovers": left})
        say(f"  {results[-1]}")
        if local:  # the source's image stays where it was: the operator removes it
            (st.node_dir("a" if src is nodes[0] else "b") / f"{name}.raw").unlink()
        src, dst = dst, src
    problems = 0
    for d in nodes:
        problems += len(disk_problems(qsup_console_reader(d.state_dir, name)()))
    src.cli("stop", name, timeout=120)
    return problems


# -- the same by hand, against QEMU -------------------------------------------------------------

async def raw_move(t, st: Storage, tmp: Path) -> float:
    from qemu.qmp import QMPClient

    qemu_share = str(Path(QEMU).parent.parent / "share" / "qemu")
    src_img, dst_img = st.a / "raw-src.raw", st.b / "raw-dst.raw"
    for p in (src_img, dst_img):
        if p.exists():
            p.unlink()
    make_image(src_img, DISK, FILL)
    make_image(dst_img, DISK)

    def argv(name: str, img: Path, incoming: bool) -> list[str]:
        a = [QEMU, "-L", qemu_share, "-name", f"guest=raw-{name}", "-nodefaults", "-display", "none",
             "-machine", "pc-i440fx-7.2", "-accel", "tcg", "-m", "192", "-kernel", str(GUEST / "vmlinuz"),
             "-initrd", str(GUEST / "initrd.img"), "-append", f"console=ttyS0 quiet {APPEND}",
             "-serial", f"file:{tmp}/raw-{name}.console", "-qmp", f"unix:{tmp}/raw-{name}.qmp,server=on,wait=off",
             "-blockdev", json.dumps({"driver": "file", "node-name": "file-data", "filename": str(img),
                                      "cache": {"direct": True}}),
             "-blockdev", json.dumps({"driver": "raw", "node-name": "disk-data", "file": "file-data"}),
             "-device", "virtio-blk-pci,drive=disk-data,id=blk-data"]
        return a + (["-incoming", "defer", "-S"] if incoming else [])

    procs = [subprocess.Popen(["ip", "netns", "exec", t.a.name, *argv("src", src_img, False)]),
             subprocess.Popen(["ip", "netns", "exec", t.b.name, *argv("dst", dst_img, True)])]
    s, d = QMPClient("src"), QMPClient("dst")
    try:
        for q, n in ((s, "src"), (d, "dst")):
            for _ in range(100):
                try:
                    await q.connect(str(tmp / f"raw-{n}.qmp"))
                    break
                except Exception:  # noqa: BLE001 -- qemu.qmp's ConnectError until QEMU listens
                    await asyncio.sleep(0.1)
        console = tmp / "raw-src.console"
        for _ in range(900):
            if console.exists() and (diskload_progress(console.read_text(errors="replace")) or 0) >= 2:
                break
            await asyncio.sleep(0.2)
        caps = [{"capability": "events", "state": True}]
        await d.execute("migrate-set-capabilities", {"capabilities": caps})
        await s.execute("migrate-set-capabilities", {"capabilities": caps + [
            {"capability": "pause-before-switchover", "state": True}, {"capability": "return-path", "state": True}]})
        await d.execute("migrate-incoming", {"uri": "tcp:10.200.0.2:4444"})
        await d.execute("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "10.200.0.2", "port": "4445"}}})
        await d.execute("block-export-add", {"type": "nbd", "id": "export-data", "node-name": "disk-data",
                                             "name": "data", "writable": True})
        t0 = time.perf_counter()
        await s.execute("blockdev-add", {"driver": "nbd", "node-name": "nbd-data", "export": "data",
                                         "server": {"type": "inet", "host": "10.200.0.2", "port": "4445"}})
        await s.execute("blockdev-mirror", {"job-id": "mirror-data", "device": "disk-data", "target": "nbd-data",
                                            "sync": "full", "copy-mode": "write-blocking", "auto-dismiss": False})
        while (await s.execute("query-jobs"))[0]["status"] != "ready":
            await asyncio.sleep(0.02)
        await s.execute("migrate", {"uri": "tcp:10.200.0.2:4444"})
        while (await s.execute("query-migrate"))["status"] != "pre-switchover":
            await asyncio.sleep(0.005)
        await s.execute("block-job-cancel", {"device": "mirror-data"})
        while (await s.execute("query-jobs"))[0]["status"] != "concluded":
            await asyncio.sleep(0.005)
        await s.execute("job-dismiss", {"id": "mirror-data"})
        await s.execute("blockdev-del", {"node-name": "nbd-data"})
        await s.execute("migrate-continue", {"state": "pre-switchover"})
        while (await d.execute("query-migrate")).get("status") != "completed":
            await asyncio.sleep(0.005)
        await d.execute("nbd-server-stop")
        await d.execute("cont")
        return (time.perf_counter() - t0) * 1000
    finally:
        for q in (s, d):
            try:
                await q.disconnect()
            except Exception:  # noqa: BLE001 -- best effort
                pass
        for p in procs:
            p.kill()
            p.wait()
        for p in (src_img, dst_img):
            p.unlink(missing_ok=True)


# -- abort midway ---------------------------------------------------------------------------------

def aborted(t, a, b, st: Storage) -> tuple[bool, int, list[str]]:
    name = "ab"
    make_image(st.a / f"{name}.raw", DISK, FILL)
    a.start_instance(spec(name, st.images / f"{name}.raw"))
    a.wait_console(name)
    read = qsup_console_reader(a.state_dir, name)
    wait_passes(read, 2)
    proc = a.cli_async("migrate", name, "--to", b.node_name, "--max-bandwidth", str(1 << 20))
    leaks: list[str] = []
    try:
        deadline = time.monotonic() + 600
        while True:
            m = a.cli_json("show", name).get("migration") or {}
            if m.get("disks", {}).get("phase") == "synced" and m.get("status") == "active":
                break
            if m.get("result") is not None or time.monotonic() > deadline:
                raise RuntimeError(f"never mid-way: {m}")
            time.sleep(0.1)
        subprocess.run(["curl", "-sS", "--unix-socket", str(b.socket), "-X", "POST",
                        f"http://qsup/v1/migrations/incoming/{name}/abort"], capture_output=True, timeout=60,
                       check=True)
        proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 60
    while (v := a.cli_json("show", name))["state"] != "running":
        if time.monotonic() > deadline:
            raise RuntimeError(f"not running on A: {v}")
        time.sleep(0.1)
    leaks += qemu_leftovers(a, name)
    leaks += [f"image left on B: {p}" for p in os.listdir(st.b) if p == f"{name}.raw"]  # not other guests' disks
    wait_passes(read, 3, since=diskload_progress(read()) or 0)
    problems = len(disk_problems(read()))
    a.cli("stop", name, timeout=120)
    check = host_disk_check(st.a / f"{name}.raw", 0, BLOCKS)
    say(f"  aborted: source image check {check}, loop problems {problems}, leaks {leaks}")
    return check["bad"] == [] and check["seq_max"] - check["seq_min"] <= 1 and problems == 0, problems, leaks


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="qsup-bench-stor-"))
    st = Storage()
    t, a, b = start_nodes(tmp, st)
    results: list[dict] = []
    raw: list[float] = []
    leaks: list[str] = []
    mismatches = 0
    left_pids: list[int] = []
    try:
        say(f"storage_migration: disk {DISK >> 20} MiB ({FILL >> 20} MiB data), {N} rounds, qemu {QEMU}")
        make_image(st.a / "loc.raw", DISK, FILL)
        a.start_instance(spec("loc", st.images / "loc.raw"))
        a.wait_console("loc")
        say("local disk, qsup:")
        mismatches += qsup_moves(t, (a, b), "loc", st, local=True, tmp=tmp, results=results)
        make_image(st.shared / "sh.raw", DISK, FILL)
        a.start_instance(spec("sh", st.shared / "sh.raw"))
        a.wait_console("sh")
        say("shared disk, qsup:")
        mismatches += qsup_moves(t, (a, b), "sh", st, local=False, tmp=tmp, results=results)
        say("local disk, by hand against QEMU:")
        for _ in range(N):
            raw.append(asyncio.run(raw_move(t, st, tmp)))
            say(f"  raw total {raw[-1]:.1f} ms")
        say("aborted midway:")
        unchanged, problems, abort_leaks = aborted(t, a, b, st)
        mismatches += problems
        leaks += abort_leaks
    finally:
        left_pids = close_nodes(t)
        leftover_files = [str(p) for d in (st.a, st.b) for p in d.iterdir()
                          if p.name not in ("ab.raw", "loc.raw")]  # the sources the guests last ran on
        st.close()
    leaks += [f"job/node/export: {x}" for r in results for x in r["leftovers"]]
    leaks += [f"qemu pid {p}" for p in left_pids] + [f"file {f}" for f in leftover_files]
    loc = [r for r in results if r["kind"] == "local"]
    sh = [r for r in results if r["kind"] == "shared"]
    med = statistics.median
    out = {
        "bench": "storage_migration",
        "disk_mib": DISK >> 20, "fill_mib": FILL >> 20, "rounds": N, "qemu": QEMU,
        "ratio_vs_raw": round(med(r["total_ms"] for r in loc) / med(raw), 3),
        "ratio_vs_raw_cli_wall": round(med(r["wall_ms"] for r in loc) / med(raw), 3),
        "local_wall_ms_p50": med(r["wall_ms"] for r in loc), "raw_total_ms_p50": round(med(raw), 1),
        "shared_wall_ms_p50": med(r["wall_ms"] for r in sh),
        "downtime_local_ms_p50": med(r["downtime_ms"] for r in loc),
        "downtime_shared_ms_p50": med(r["downtime_ms"] for r in sh),
        "downtime_delta_ms": med(r["downtime_ms"] for r in loc) - med(r["downtime_ms"] for r in sh),
        "mismatches": mismatches,
        "overlap_ms": max(r["overlap_ms"] for r in results),
        "completed": sum(r["result"] == "completed" for r in results), "migrations": len(results),
        "ping_lost_max": max(r["lost"] for r in results),
        "rollback_source_unchanged": unchanged,
        "leaks": len(leaks), "leak_detail": leaks[:10],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
