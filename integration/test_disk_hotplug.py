"""Disk hotplug for real (issue 17): a real `qsup serve`, the real test guest under TCG, QEMU as
its own uid.  `qsup disk add/resize/limits/rm` are seen from inside the guest (its console
watcher prints `guest-disk: + vdX`, `~ vdX`, `- vdX`), the record and `show` follow, the images
stay 0600 root (QEMU gets descriptors: no image path on its command line), and an add that QEMU
refuses half-way leaves nothing in QEMU (query-block, query-named-block-nodes, query-fdsets).
Everything is torn down by pid (the daemon fixture's leak check)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
from pathlib import Path

from test_daemon import daemon_factory, node, routed  # noqa: F401 - fixtures
from topo import qmp


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def _wait_console(dm, name: str, text: str, timeout: float = 30) -> None:
    dm.wait_console(name, text, timeout=timeout)


def _qemu_block(sock: str) -> dict:
    """What QEMU holds: devices, block nodes, fdsets (with their opaque names)."""
    return {
        "devices": sorted(b.get("qdev", "") for b in qmp(sock, "query-block")),
        "nodes": sorted(n["node-name"] for n in qmp(sock, "query-named-block-nodes", {"flat": True})),
        "fdsets": sorted((s["fdset-id"], tuple(f.get("opaque") for f in s["fds"])) for s in qmp(sock, "query-fdsets")),
    }


def _bad_qcow2(path: Path) -> None:
    """A qcow2 whose header qsup accepts (version, size, no backing) but QEMU refuses at
    blockdev-add: an unknown incompatible feature bit (header offset 72)."""
    _qemu_img("create", "-f", "qcow2", str(path), "4M")
    with open(path, "r+b") as f:
        f.seek(72)
        (features,) = struct.unpack(">Q", f.read(8))
        f.seek(72)
        f.write(struct.pack(">Q", features | (1 << 62)))


def test_hotplug_resize_limits_unplug_seen_by_the_guest(node, daemon_factory, tmp_path):  # noqa: F811
    ns, _client = node
    dm = daemon_factory(ns, extra_config="unplug_timeout = 20\n")
    private = tmp_path / "disks"
    private.mkdir(mode=0o700)
    boot, data, bad = private / "boot.raw", private / "data.raw", private / "bad.qcow2"
    _qemu_img("create", "-f", "raw", str(boot), "8M")
    _qemu_img("create", "-f", "raw", str(data), "16M")
    _bad_qcow2(bad)
    for f in (boot, data, bad):
        os.chmod(f, 0o600)
    spec = routed("hp", "10.99.7.40", "52:54:00:77:00:40")
    spec["disks"] = [{"id": "boot", "path": str(boot), "format": "raw"}]
    v = dm.start_instance(spec)
    pid, sock = v["pid"], v["qmp_operator"]
    assert 60000 <= v["uid"] <= 60999
    dm.wait_console("hp")
    assert "guest-disk: vda size=8388608" in dm.console("hp")
    before = _qemu_block(sock)

    # -- a failure half-way leaves nothing in QEMU ---------------------------------------------
    r = dm.cli("disk", "add", "hp", json.dumps({"id": "bad", "path": str(bad), "format": "qcow2"}), check=False)
    assert r.returncode != 0 and "bad" in r.stderr and "undone" in r.stderr, r.stderr
    assert "/dev/fdset/" not in r.stderr  # QEMU's words name the file qsup opened
    assert _qemu_block(sock) == before
    assert [d["id"] for d in dm.cli_json("show", "hp")["disks"]] == ["boot"]
    failed = [e for e in dm.events() if e["type"] == "disk.add_failed"]
    assert failed and failed[-1]["step"] == "blockdev-add" and failed[-1]["left"] == [], failed

    # -- hotplug ---------------------------------------------------------------------------------
    added = dm.cli_json("disk", "add", "hp", json.dumps({"id": "data", "path": str(data), "format": "raw",
                                                          "serial": "DATA1"}))
    assert added["disk"]["id"] == "data" and added["disk"]["pci_slot"] == 5  # NIC 3, boot 4
    _wait_console(dm, "hp", "guest-disk: + vdb size=16777216")
    shown = dm.cli_json("show", "hp")
    assert [(d["id"], d["pci_slot"]) for d in shown["disks"]] == [("boot", 4), ("data", 5)]
    rec = json.loads((dm.state_dir / "instances" / "hp" / "record.json").read_text())
    assert [d["id"] for d in rec["spec"]["disks"]] == ["boot", "data"]
    now = _qemu_block(sock)
    assert {"disk-data", "file-data"} <= set(now["nodes"])
    data_sets = [s for s in now["fdsets"] if s[1] == ("file-data",)]
    assert len(data_sets) == 1, now["fdsets"]
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    for f in (boot, data, bad):
        assert str(f) not in cmdline and f.name not in cmdline
    held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert str(data) in held and str(bad) not in held, held  # the failed add's descriptor is gone too

    # -- resize ----------------------------------------------------------------------------------
    r = dm.cli_json("disk", "resize", "hp", "data", "32M")
    assert r["disk"]["size"] == 32 << 20
    _wait_console(dm, "hp", "guest-disk: ~ vdb size=33554432")
    r = dm.cli("disk", "resize", "hp", "data", "16M", check=False)
    assert r.returncode == 2 and "size" in r.stderr, r.stderr  # a shrink

    # -- I/O limits ------------------------------------------------------------------------------
    r = dm.cli_json("disk", "limits", "hp", "data", "--iops", "500")
    assert r["disk"]["iops"] == 500
    inserted = next(b["inserted"] for b in qmp(sock, "query-block") if "blk-data" in b.get("qdev", ""))
    assert inserted["iops"] == 500, inserted
    assert dm.cli_json("show", "hp")["disks"][1]["iops"] == 500

    # -- unplug ----------------------------------------------------------------------------------
    dm.cli_json("disk", "rm", "hp", "data")
    _wait_console(dm, "hp", "guest-disk: - vdb")
    assert _qemu_block(sock) == before
    assert [d["id"] for d in dm.cli_json("show", "hp")["disks"]] == ["boot"]
    held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert str(data) not in held, held
    types = [e["type"] for e in dm.events()]
    assert {"disk.added", "disk.resized", "disk.limits_changed", "disk.removed"} <= set(types)

    assert dm.cli_json("stop", "hp", "--timeout", "10")["state"] == "stopped"
    for f in (boot, data, bad):
        st = f.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
    time.sleep(0)
