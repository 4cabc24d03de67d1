"""Issue 17, local-disk live migration: two nodes whose disks are local (stortopo: the same path
is a different file on each node), a real guest writing its disk throughout (guest.diskload: a
verifying write loop), migrated over NBD under the client's 10 ms ping.

* completed: 0 mismatches on either node's console, overlap 0, ping loss within the budget, the
  guest whole on B, no block job / NBD node / export left in B's QEMU, the source image on A
  whole (every block a diskpat block of its own number) and left in place, B's image 0600 root;
* aborted midway (the destination aborts while the RAM moves, mirrors in sync): the guest runs
  on A on its own image, which stays whole, no job or NBD node left in A's QEMU, and B deleted
  the image it created (and nothing else).
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from guestcheck import disk_problems, diskload_progress, qsup_console_reader
from migtopo import BUSY, MigrationWatch, assert_guest_whole, loss_budget
from stortopo import Storage, host_disk_check, make_image, qemu_leftovers, start_nodes
from topo import guest_spec, pid_alive

IP = "10.99.0.2"
MAC = "52:54:00:99:00:02"
BLOCKS = 2048  # the guest's write loop: 8 MiB of the disk, rewritten pass after pass


@pytest.fixture
def nodes(tmp_path):
    st = Storage()
    t = None
    try:
        t, a, b = start_nodes(tmp_path, st)
        yield t, a, b, st
    finally:
        leaked = t.close() if t is not None else []
        st.close()
        assert not leaked, f"qemu pids left: {leaked}"


def disk_spec(st: Storage, name: str, *, busy: bool = False, extra: str = "") -> dict:
    append = (f"guest.ip0={IP}/32 guest.diskload=vda guest.diskload_blocks={BLOCKS} guest.diskload_every=5 "
              + (BUSY if busy else "") + extra)
    return guest_spec(name, [{"mode": "routed", "mac": MAC, "ip": IP}], append=append,
                      disks=[{"id": "data", "path": str(st.images / f"{name}.raw"), "format": "raw"}])


def console(daemon, name):
    return qsup_console_reader(daemon.state_dir, name)


def wait_passes(read, n: int, since: int = 0, timeout: float = 120) -> int:
    """Until the guest's write loop reports pass >= since + n (a condition, not a sleep)."""
    deadline = time.monotonic() + timeout
    while (p := diskload_progress(read()) or 0) < since + n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"write loop at pass {p}, wanted {since + n}: {read()[-1500:]}")
        time.sleep(0.2)
    return p


def migrate(src, dst, name, *extra, check=True):
    return src.cli("migrate", name, "--to", dst.node_name, "--json", *extra, timeout=600, check=check)


def test_local_disk_migration_under_ping_and_write_load(nodes, tmp_path):
    t, a, b, st = nodes
    make_image(st.a / "s1.raw", 256 << 20, fill=32 << 20)
    spec = disk_spec(st, "s1")
    a.start_instance(spec)
    a.wait_console("s1")
    read_a = console(a, "s1")
    before = wait_passes(read_a, 2)
    qemu_a = a.cli_json("show", "s1")["pid"]
    with MigrationWatch(t, t.a, t.b, IP, tmp_path) as watch:
        watch.ping.wait_replies(20)
        summary = json.loads(migrate(a, b, "s1").stdout.strip().splitlines()[-1])
        watch.ping.wait_replies(50, timeout=10)
        w = watch.result()
    print(json.dumps({k: v for k, v in w.items() if k not in ("src_routes", "dst_routes")}), summary)
    assert summary["result"] == "completed", summary
    assert w["overlap_ms"] == 0.0
    budget = loss_budget(max(summary["downtime_ms"], summary["switchover_ms"] or 0))
    assert w["ping"]["lost"] <= budget, (w["ping"], summary)
    assert_guest_whole(t, b, "s1", IP, busy=False)
    read_b = console(b, "s1")
    wait_passes(read_b, 3, since=before)  # the loop goes on on B, verifying what it wrote on A
    assert disk_problems(read_a()) == [] and disk_problems(read_b()) == []
    vb = b.cli_json("show", "s1")
    assert vb["state"] == "running"
    assert qemu_leftovers(b, "s1") == []
    assert not pid_alive(qemu_a)
    # the source image: left in place, whole (A's QEMU is gone: nobody writes it)
    src = host_disk_check(st.a / "s1.raw", 0, BLOCKS)
    assert src["bad"] == [] and src["seq_max"] - src["seq_min"] <= 1, src
    stb = os.stat(st.b / "s1.raw")
    assert stb.st_size == 256 << 20 and stb.st_mode & 0o777 == 0o600 and stb.st_uid == 0
    events = [e["type"] for e in a.events() if e.get("instance") == "s1"]
    assert "migration.disks" in events


def test_local_disk_migration_busy_guest(nodes, tmp_path):
    """The same with the guest rewriting its RAM too (several RAM passes while the mirror keeps
    the disk in sync), and a qcow2 disk with a backing file, flattened on the destination."""
    t, a, b, st = nodes
    make_image(st.a / "base.raw", 64 << 20, fill=8 << 20)
    # the backing file by a relative name: base.raw next to the image, which only A has
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base.raw",
                    str(st.a / "s3.qcow2")], check=True)  # a test image, made by the test
    os.chmod(st.a / "s3.qcow2", 0o600)
    spec = disk_spec(st, "s3", busy=True)
    spec["disks"][0].update(path=str(st.images / "s3.qcow2"), format="qcow2")
    a.start_instance(spec)
    a.wait_console("s3")
    read_a = console(a, "s3")
    before = wait_passes(read_a, 2)
    with MigrationWatch(t, t.a, t.b, IP, tmp_path) as watch:
        watch.ping.wait_replies(20)
        summary = json.loads(migrate(a, b, "s3").stdout.strip().splitlines()[-1])
        watch.ping.wait_replies(50, timeout=10)
        w = watch.result()
    assert summary["result"] == "completed", summary
    assert w["overlap_ms"] == 0.0
    assert_guest_whole(t, b, "s3", IP, busy=True)
    read_b = console(b, "s3")
    wait_passes(read_b, 3, since=before)
    assert disk_problems(read_a()) == [] and disk_problems(read_b()) == []
    assert qemu_leftovers(b, "s3") == []
    assert not (st.b / "base.raw").exists()  # flattened: B never needed the backing file
    r = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(st.b / "s3.qcow2")], capture_output=True,
                       text=True, check=True)
    info = json.loads(r.stdout)
    assert info["format"] == "qcow2" and "backing-filename" not in info and info["virtual-size"] == 64 << 20


def test_a_migration_after_a_hotplug_keeps_the_device_layout(nodes, tmp_path):
    """Issue 17: a disk hotplugged at a running guest (a local one, then mirrored over NBD) and a
    shared one: after the migration the destination's QEMU has every device at the PCI slot the
    source had -- the slots live in the spec, which the destination is built from -- the guest's
    write loop on vda verifies on, and the hotplugged local disk arrived byte for byte."""
    import hashlib

    from topo import qmp

    t, a, b, st = nodes
    make_image(st.a / "s4.raw", 64 << 20, fill=8 << 20)
    make_image(st.a / "s4-hot.raw", 16 << 20, fill=16 << 20)
    make_image(st.shared / "s4-shared.raw", 8 << 20, fill=1 << 20)
    a.start_instance(disk_spec(st, "s4"))
    a.wait_console("s4")
    read_a = console(a, "s4")
    before = wait_passes(read_a, 2)
    hot = {"id": "hot", "path": str(st.images / "s4-hot.raw"), "format": "raw"}
    shared = {"id": "shr", "path": str(st.shared / "s4-shared.raw"), "format": "raw", "readonly": True}
    for d in (hot, shared):
        a.cli_json("disk", "add", "s4", json.dumps(d))
    deadline = time.monotonic() + 30
    while read_a().count("guest-disk: + vd") < 2:  # the guest's own watcher saw both arrive
        assert time.monotonic() < deadline, read_a()[-1500:]
        time.sleep(0.2)
    va = a.cli_json("show", "s4")
    slots_a = {d["id"]: d["pci_slot"] for d in va["disks"]}
    assert len(set(slots_a.values())) == 3, slots_a

    def pci(view) -> dict[int, str]:
        devs = qmp(view["qmp_operator"], "query-pci")[0]["devices"]
        return {d["slot"]: d.get("qdev_id", "") for d in devs}

    layout_a = pci(va)
    digest_a = hashlib.sha256((st.a / "s4-hot.raw").read_bytes()).hexdigest()
    summary = json.loads(migrate(a, b, "s4").stdout.strip().splitlines()[-1])
    assert summary["result"] == "completed", summary
    vb = b.cli_json("show", "s4")
    assert {d["id"]: d["pci_slot"] for d in vb["disks"]} == slots_a
    assert pci(vb) == layout_a, (pci(vb), layout_a)
    read_b = console(b, "s4")
    wait_passes(read_b, 3, since=before)
    assert disk_problems(read_a()) == [] and disk_problems(read_b()) == []
    b.cli("stop", "s4")
    assert hashlib.sha256((st.b / "s4-hot.raw").read_bytes()).hexdigest() == digest_a
    assert sorted(os.listdir(st.b)) == ["s4-hot.raw", "s4.raw"]  # B created the local ones only


def test_aborted_midway_keeps_the_guest_on_its_source_disk(nodes, tmp_path):
    t, a, b, st = nodes
    make_image(st.a / "s2.raw", 128 << 20, fill=16 << 20)
    a.start_instance(disk_spec(st, "s2", busy=True))
    a.wait_console("s2")
    read_a = console(a, "s2")
    before = wait_passes(read_a, 2)
    # slow RAM (1 MiB/s against a guest dirtying 100 MiB/s): the mirrors are in sync long before
    proc = a.cli_async("migrate", "s2", "--to", b.node_name, "--max-bandwidth", str(1 << 20))
    try:
        deadline = time.monotonic() + 120
        while True:
            m = (a.cli_json("show", "s2").get("migration") or {})
            if m.get("disks", {}).get("phase") == "synced" and m.get("status") == "active":
                break
            assert time.monotonic() < deadline and m.get("result") is None, (m.get("error"), m)
            time.sleep(0.1)
        assert (st.b / "s2.raw").exists()  # B created its target
        r = subprocess.run(["curl", "-sS", "--unix-socket", str(b.socket), "-X", "POST",
                            "http://qsup/v1/migrations/incoming/s2/abort"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        summary = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        summary = {}
    assert summary.get("result") != "completed", (out, err)
    deadline = time.monotonic() + 60
    while (v := a.cli_json("show", "s2"))["state"] != "running":
        assert time.monotonic() < deadline, v
        time.sleep(0.1)
    assert v["migration"]["disks"]["phase"] == "abandoned", v["migration"]
    assert qemu_leftovers(a, "s2") == []
    assert not (st.b / "s2.raw").exists()  # B deleted the image it created
    assert os.listdir(st.b) == []
    wait_passes(read_a, 3, since=diskload_progress(read_a()) or before)  # it writes on
    assert disk_problems(read_a()) == []
    assert_guest_whole(t, a, "s2", IP, busy=True)
    a.cli("stop", "s2")
    src = host_disk_check(st.a / "s2.raw", 0, BLOCKS)
    assert src["bad"] == [] and src["seq_max"] - src["seq_min"] <= 1, src


def test_local_disk_migration_over_tls(tmp_path):
    """TLS nodes: the NBD exports take only the migration's own key (the stream's tls-creds-psk)."""
    st = Storage()
    t = None
    try:
        t, a, b = start_nodes(tmp_path, st, tls=True)
        make_image(st.a / "s4.raw", 64 << 20, fill=8 << 20)
        a.start_instance(disk_spec(st, "s4"))
        a.wait_console("s4")
        read_a = console(a, "s4")
        before = wait_passes(read_a, 2)
        summary = json.loads(migrate(a, b, "s4").stdout.strip().splitlines()[-1])
        assert summary["result"] == "completed", summary
        read_b = console(b, "s4")
        wait_passes(read_b, 3, since=before)
        assert disk_problems(read_a()) == [] and disk_problems(read_b()) == []
        assert qemu_leftovers(b, "s4") == []
        operator = b.cli_json("show", "s4")["qmp_operator"]
        from topo import qmp

        assert not [o for o in qmp(operator, "qom-list", {"path": "/objects"}) if "tls" in o["name"]]
    finally:
        leaked = t.close() if t is not None else []
        st.close()
        assert not leaked, f"qemu pids left: {leaked}"
