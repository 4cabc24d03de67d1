"""Each instance's QEMU runs as its own uid, under QEMU's seccomp sandbox, with a scrubbed
environment, and needs no path on the host (taps, monitors, console, kernel, initrd are fds)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from test_daemon import daemon_factory, node, routed  # noqa: F401 - fixtures
from topo import GUEST, assert_own_seccomp_filter, proc_environ, proc_status

DAEMON_ONLY_VAR = "QSUP_TEST_SECRET"


def test_every_qemu_has_its_own_uid_and_the_sandbox(node, daemon_factory, monkeypatch):  # noqa: F811
    ns, _client = node
    monkeypatch.setenv(DAEMON_ONLY_VAR, "must-not-reach-qemu")
    dm = daemon_factory(ns)
    views = [dm.start_instance(routed(f"iso{i}", f"10.99.7.{i + 2}", f"52:54:00:77:00:0{i}")) for i in range(2)]
    uids = []
    for v in views:
        st = proc_status(v["pid"])
        real, effective, saved, fs = (int(x) for x in st["Uid"].split())
        assert real == effective == saved == fs, st["Uid"]
        assert 60000 <= real <= 60999 and v["uid"] == real
        assert st["Groups"].strip() == ""  # no supplementary groups
        assert_own_seccomp_filter(v["pid"], dm.pid)  # QEMU's -sandbox filter, not one inherited
        assert st["CapEff"] == "0000000000000000"
        env = proc_environ(v["pid"])
        assert DAEMON_ONLY_VAR not in env and set(env) <= {"PATH", "LC_ALL"}, env
        uids.append(real)
    assert len(set(uids)) == 2, uids
    # the console log still fills, via qsup (QEMU can't reach the state dir)
    deadline = time.monotonic() + 30  # the guest prints it a moment after the start returned
    while "GUEST-READY" not in (out := dm.cli("console", "iso0", "--no-follow", "--lines", "200").stdout) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "GUEST-READY" in out
    for v in views:
        assert dm.cli_json("stop", v["name"], "--timeout", "10")["state"] == "stopped"


def test_a_kernel_only_root_can_read_boots_from_a_sealed_copy(node, daemon_factory, tmp_path):  # noqa: F811
    """Issue 16, finding 3: QEMU (its own uid) reopened ``/proc/self/fd/N`` of the kernel qsup had
    opened, with its own permissions: a 0600 root kernel in a 0700 directory failed to boot.  Now
    QEMU gets a sealed memfd copy of what qsup opened, and holds nothing of the original file."""
    ns, _client = node
    dm = daemon_factory(ns)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    kernel, initrd = private / "vmlinuz", private / "initrd.img"
    for src, dst in ((GUEST / "vmlinuz", kernel), (GUEST / "initrd.img", initrd)):
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o600)
    spec = routed("rootonly", "10.99.7.20", "52:54:00:77:00:20")
    spec.update(kernel=str(kernel), initrd=str(initrd))
    v = dm.start_instance(spec)
    assert 60000 <= v["uid"] <= 60999  # QEMU runs as its own uid: the file is unreadable to it
    held = {os.readlink(f"/proc/{v['pid']}/fd/{fd}") for fd in os.listdir(f"/proc/{v['pid']}/fd")}
    assert "/memfd:qsup-kernel (deleted)" in held and "/memfd:qsup-initrd (deleted)" in held, held
    assert str(kernel) not in held and str(initrd) not in held, held
    dm.wait_console("rootonly")
    assert dm.cli_json("stop", "rootonly", "--timeout", "10")["state"] == "stopped"
    # and a file outside image_dirs is refused before anything starts, naming the field
    p = dm.workdir / "spec-shadow.json"
    p.write_text(json.dumps({**{k: x for k, x in spec.items() if k != "initrd"}, "name": "shadow",
                             "kernel": "/etc/shadow"}))
    r = dm.cli("start", str(p), check=False)
    assert r.returncode == 2 and "kernel" in r.stderr and "image_dirs" in r.stderr, r.stderr


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def test_kernel_initrd_and_two_disks_as_fds_root_only_images(node, daemon_factory, tmp_path):  # noqa: F811
    """Issue 17: a guest with kernel + initrd + two disks (a raw one and a qcow2 over a raw
    backing file) boots and sees both; the images are 0600 root in a 0700 directory, QEMU runs
    as its own uid and its command line holds no image path: qsup opened every file of every
    chain and passed descriptors (fdsets).  The machine type is pinned and shown."""
    ns, _client = node
    dm = daemon_factory(ns)
    private = tmp_path / "disks"
    private.mkdir(mode=0o700)
    boot, base, data = private / "boot.raw", private / "base.raw", private / "data.qcow2"
    _qemu_img("create", "-f", "raw", str(boot), "8M")
    _qemu_img("create", "-f", "raw", str(base), "16M")
    _qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(data), "24M")
    for f in (boot, base, data):
        os.chmod(f, 0o600)
    spec = routed("disks2", "10.99.7.30", "52:54:00:77:00:30")
    spec["disks"] = [{"id": "boot", "path": str(boot), "format": "raw", "serial": "BOOT1"},
                     {"id": "data", "path": str(data), "format": "qcow2", "cache": "writeback"}]
    v = dm.start_instance(spec)
    assert 60000 <= v["uid"] <= 60999
    cmdline = Path(f"/proc/{v['pid']}/cmdline").read_bytes().decode()
    for f in (boot, base, data):
        assert str(f) not in cmdline and f.name not in cmdline, cmdline
    assert "/dev/fdset/" in cmdline
    held = {os.readlink(f"/proc/{v['pid']}/fd/{fd}") for fd in os.listdir(f"/proc/{v['pid']}/fd")}
    assert {str(boot), str(data), str(base)} <= held, held  # descriptors qsup opened
    dm.wait_console("disks2")
    con = dm.console("disks2")
    assert "guest-disk: vda size=8388608" in con and "guest-disk: vdb size=25165824" in con, con[-2000:]
    shown = dm.cli_json("show", "disks2")
    assert re.fullmatch(r"pc-i440fx-\d+\.\d+", shown["machine"]), shown
    assert [(d["id"], d["pci_slot"]) for d in shown["disks"]] == [("boot", 4), ("data", 5)]
    assert shown["nics"][0]["pci_slot"] == 3
    assert dm.cli_json("stop", "disks2", "--timeout", "10")["state"] == "stopped"
    for f in (boot, base, data):
        st = f.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)


def test_a_qcow2_whose_backing_file_lies_outside_image_dirs_is_refused(node, daemon_factory, tmp_path):  # noqa: F811
    """Issue 17: a backing file outside image_dirs (here /etc/passwd, named raw) and a json:
    backing are refused before anything starts, naming the disk; nothing is left behind."""
    ns, _client = node
    dm = daemon_factory(ns)
    evil = tmp_path / "evil.qcow2"
    _qemu_img("create", "-f", "qcow2", "-u", "-b", "/etc/passwd", "-F", "raw", str(evil), "1M")
    spec = routed("evil", "10.99.7.31", "52:54:00:77:00:31")
    spec["disks"] = [{"id": "ok", "path": str(GUEST / "initrd.img"), "format": "raw", "readonly": True},
                     {"id": "evil", "path": str(evil), "format": "qcow2"}]
    p = dm.workdir / "spec-evil.json"
    p.write_text(json.dumps(spec))
    r = dm.cli("start", str(p), check=False)
    assert r.returncode == 2 and "disks[1].path" in r.stderr and "image_dirs" in r.stderr, r.stderr
    assert "/etc/passwd" in r.stderr
    assert dm.cli_json("ls") == [] or all(i["name"] != "evil" for i in dm.cli_json("ls"))


def test_a_record_without_pci_slots_learns_them_from_the_running_qemu(node, daemon_factory, tmp_path):  # noqa: F811
    """A record written before slots were fixed (here: the slots taken out of a live one) is
    reattached, and the slots are read from the running QEMU (query-pci: nic0, blk-ID), recorded
    and shown: a later hotplug takes a free slot, a migration builds the same layout."""
    ns, _client = node
    dm = daemon_factory(ns)
    data = tmp_path / "d.raw"
    _qemu_img("create", "-f", "raw", str(data), "4M")
    spec = routed("oldrec", "10.99.7.40", "52:54:00:77:00:40")
    spec["disks"] = [{"id": "data", "path": str(data), "format": "raw"}]
    v = dm.start_instance(spec)
    assert v["nics"][0]["pci_slot"] == 3 and v["disks"][0]["pci_slot"] == 4
    dm.kill()
    rec_path = dm.state_dir / "instances" / "oldrec" / "record.json"
    rec = json.loads(rec_path.read_text())
    for dev in rec["spec"]["nics"] + rec["spec"]["disks"]:
        dev.pop("pci_slot")
    rec_path.write_text(json.dumps(rec))
    dm.start()
    shown = dm.cli_json("show", "oldrec")
    assert shown["pid"] == v["pid"]
    assert shown["nics"][0]["pci_slot"] == 3 and shown["disks"][0]["pci_slot"] == 4, shown
    assert json.loads(rec_path.read_text())["spec"]["disks"][0]["pci_slot"] == 4
    assert dm.cli_json("stop", "oldrec", "--timeout", "10")["state"] == "stopped"
