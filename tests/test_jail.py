"""``qemu_chroot``: the jail's plan, its directory, the helper's failure path, the config key.

No root needed: the plan is built against a fake host root; the helper is run only where it
must fail before QEMU (as a user, ``unshare`` fails; as root, the missing jail dir or the
interpreter outside the jail does), and it must then never run QEMU.  The real jail is
checked with real QEMU in integration/test_qemu_jail.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from core_harness import Bench, spec
from supervisor._config import load_config
from supervisor._instance import StartError
from supervisor._jail import (
    EXIT_STATUS,
    MARK,
    Bind,
    JailError,
    _Fail,
    _open_sources,
    build_plan,
    jail_dir,
    plan_for,
    prepare_dir,
    remove_dir,
)
from supervisor._spec import SpecError

pytestmark = pytest.mark.usefixtures("no_fakes_left")

ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}


@pytest.fixture
def host(tmp_path) -> Path:
    """A fake merged-/usr host root, except /sbin, which is a real directory here."""
    h = tmp_path / "host"
    for d in ("usr/bin", "usr/lib", "usr/lib64", "sbin", "etc", "dev", "home/alice"):
        (h / d).mkdir(parents=True)
    for link, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
        (h / link).symlink_to(target)
    for f in ("etc/ld.so.cache", "etc/shadow", "dev/null", "dev/zero", "dev/random", "dev/urandom", "dev/kvm",
              "dev/sda"):
        (h / f).write_text("")
    return h


def _by_path(plan) -> dict[str, Bind]:
    return {b.path: b for b in plan.binds}


def test_plan_binds_usr_loader_and_four_devices_and_nothing_else(host, tmp_path):
    plan = build_plan(tmp_path / "jail", exe="/usr/bin/qemu-system-x86_64", env=ENV, host=str(host))
    binds = _by_path(plan)
    assert set(binds) == {"/usr", "/sbin", "/etc/ld.so.cache", "/dev/null", "/dev/zero", "/dev/random",
                          "/dev/urandom"}
    assert not binds["/usr"].rw and not binds["/sbin"].rw and not binds["/etc/ld.so.cache"].rw
    assert all(binds[d].rw for d in ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"))
    # merged-/usr symlinks are recreated as they are, not bound
    assert dict(plan.symlinks) == {"/bin": "usr/bin", "/lib": "usr/lib", "/lib64": "usr/lib64"}
    assert plan.exe == "/usr/bin/qemu-system-x86_64" and plan.env == ENV
    assert plan.root == str(tmp_path / "jail")


def test_kvm_only_when_the_accelerator_is_kvm(host, tmp_path):
    tcg = build_plan(tmp_path / "j", exe="/usr/bin/q", host=str(host))
    kvm = build_plan(tmp_path / "j", exe="/usr/bin/q", kvm=True, host=str(host))
    assert "/dev/kvm" not in _by_path(tcg) and _by_path(kvm)["/dev/kvm"].rw
    os.unlink(host / "dev/kvm")
    assert "/dev/kvm" not in _by_path(build_plan(tmp_path / "j", exe="/usr/bin/q", kvm=True, host=str(host)))


def test_a_qemu_outside_usr_is_bound_read_only(host, tmp_path):
    plan = build_plan(tmp_path / "j", exe="/opt/qemu/bin/qemu-system-x86_64", host=str(host))
    assert _by_path(plan)["/opt/qemu/bin/qemu-system-x86_64"] == Bind("/opt/qemu/bin/qemu-system-x86_64")


def test_tls_dir_is_bound_read_only_parents_first(host, tmp_path):
    plan = build_plan(tmp_path / "j", exe="/usr/bin/q", tls_dir=tmp_path / "run/tls", host=str(host))
    b = _by_path(plan)
    assert b[str(tmp_path / "run/tls")] == Bind(str(tmp_path / "run/tls"))
    # parents are bound before what lies below them (a bind under /usr goes over /usr's bind)
    depths = [p.path.count("/") for p in plan.binds]
    assert depths == sorted(depths)
    assert "/home" not in str(plan.to_json()) and "shadow" not in plan.to_json()


def test_the_jail_binds_no_disk(tmp_path):
    """Disks and their backing files reach QEMU as fdsets (supervisor/_disks.py, tests/test_disks.py):
    the jail holds none of them, whatever the spec's disks."""
    (tmp_path / "images").mkdir()
    for f in ("vm.qcow2", "base.raw", "data.img"):
        (tmp_path / "images" / f).write_bytes(b"\0" * 512)
    cfg = load_config(None, state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"), qemu=sys.executable,
                      image_dirs=[str(tmp_path / "images")], accel="tcg")
    s = spec(tmp_path, disks=[{"id": "root", "path": str(tmp_path / "images" / "vm.qcow2"), "format": "qcow2"},
                              {"id": "data", "path": str(tmp_path / "images" / "data.img"), "format": "raw"}])
    plan = plan_for(s, cfg, ENV)
    assert not [b for b in plan.binds if str(tmp_path / "images") in b.path], plan.binds
    assert not [b for b in plan.binds if b.rw and not b.path.startswith("/dev/")], plan.binds
    assert "images" not in plan.to_json()
    remove_dir(plan.root)


def test_jail_dir_is_per_instance_under_the_state_dir_and_names_cannot_escape(tmp_path):
    assert jail_dir(tmp_path, "vm1") == tmp_path / "jail" / "vm1"
    for bad in ("..", "../x", "a/../../b", "/etc", "."):
        with pytest.raises(ValueError):
            jail_dir(tmp_path, bad)


def test_prepare_dir_modes_reuse_and_refusal(tmp_path):
    j = tmp_path / "state" / "jail" / "vm1"
    prepare_dir(j)
    assert oct(j.stat().st_mode & 0o777) == "0o700" and oct(j.parent.stat().st_mode & 0o777) == "0o700"
    prepare_dir(j)  # an empty one left by a crash is reused
    (j / "x").write_text("someone's")
    with pytest.raises(JailError) as e:
        prepare_dir(j)
    assert e.value.field == "qemu_chroot" and "not an empty directory" in str(e.value)
    assert (j / "x").read_text() == "someone's"
    other = tmp_path / "elsewhere"
    other.mkdir()
    link = tmp_path / "state" / "jail" / "vm2"
    link.symlink_to(other)
    with pytest.raises(JailError):
        prepare_dir(link)


def test_remove_dir_is_rmdir_never_recursive(tmp_path):
    j = tmp_path / "vm1"
    j.mkdir()
    assert remove_dir(j) and not j.exists()
    assert remove_dir(j)  # already gone
    j.mkdir()
    (j / "usr").mkdir()
    (j / "usr" / "keep").write_text("a file seen through a mount, say")
    assert not remove_dir(j)
    assert (j / "usr" / "keep").exists()


def test_command_passes_the_plan_and_argv_as_elements_no_shell(host, tmp_path):
    plan = build_plan(tmp_path / "j", exe="/usr/bin/qemu-system-x86_64", env=ENV, host=str(host))
    argv = ["qemu-system-x86_64", "-append", "console=ttyS0 a;b $(x) `y` 'z'\"", "-name", "guest=x,debug-threads=on"]
    cmd = plan.command(argv, uid=60001, gid=60001)
    assert cmd[:4] == [sys.executable, "-I", "-m", "supervisor._jail"] and cmd[5] == "--" and cmd[6:] == argv
    sent = json.loads(cmd[4])
    assert sent["uid"] == sent["gid"] == 60001 and sent["root"] == str(tmp_path / "j") and sent["env"] == ENV
    assert {b["path"] for b in sent["binds"]} == {b.path for b in plan.binds}


def _helper(plan_json: str, marker: Path) -> subprocess.CompletedProcess:
    """The helper with a "QEMU" that would leave ``marker`` if it ever ran."""
    return subprocess.run([sys.executable, "-I", "-m", "supervisor._jail", plan_json, "--",
                           "/bin/sh", "-c", f"touch {marker}"], capture_output=True, text=True, timeout=30,
                          cwd=Path(__file__).parent.parent)


def test_helper_that_cannot_build_the_jail_says_so_and_never_runs_qemu(tmp_path):
    marker = tmp_path / "qemu-ran"
    plan = {"root": str(tmp_path / "no-such-jail"), "exe": "/bin/sh", "env": ENV, "uid": None, "gid": None,
            "binds": [], "symlinks": []}
    r = _helper(json.dumps(plan), marker)
    assert r.returncode == EXIT_STATUS, r
    assert r.stderr.startswith(MARK) and r.stderr.count("\n") == 1, r.stderr
    assert not marker.exists()
    r = _helper("{not json", marker)
    assert r.returncode == EXIT_STATUS and r.stderr.startswith(f"{MARK} bad plan"), r.stderr
    assert not marker.exists()


def test_bind_sources_must_be_what_the_daemon_checked(tmp_path):
    disk = tmp_path / "vm.raw"
    disk.write_bytes(b"")
    st = disk.stat()
    ok = _open_sources([{"path": str(disk), "ino": [st.st_dev, st.st_ino]}])
    os.close(ok[0][1])
    (tmp_path / "other.raw").write_bytes(b"")
    os.replace(tmp_path / "other.raw", disk)  # swapped after the plan
    with pytest.raises(_Fail, match="not the file the daemon checked"):
        _open_sources([{"path": str(disk), "ino": [st.st_dev, st.st_ino]}])
    (tmp_path / "link").symlink_to("/etc/shadow")
    with pytest.raises(_Fail, match="symbolic link"):
        _open_sources([{"path": str(tmp_path / "link")}])


def test_config_key_default_and_refusals(tmp_path):
    assert load_config(None).qemu_chroot is False
    cfg = tmp_path / "qsup.toml"
    cfg.write_text("qemu_chroot = true\n")
    assert load_config(cfg).qemu_chroot is True
    for bad in ('"true"', "1", '"yes"'):
        cfg.write_text(f"qemu_chroot = {bad}\n")
        with pytest.raises(SpecError) as e:
            load_config(cfg)
        assert e.value.field == "qemu_chroot", str(e.value)


def test_a_start_whose_jail_fails_names_qemu_chroot_and_leaves_nothing(tmp_path):
    """Through the real instance core (fake QEMU): as a user the helper's ``unshare`` fails, as root
    the fake QEMU's interpreter is not in the jail -- either way, before QEMU runs."""
    a = Bench(tmp_path, qemu_chroot=True)
    s = spec(tmp_path)

    async def main():
        async with a.running():
            with pytest.raises(StartError) as e:
                await a.node.start(s)
            assert e.value.field == "qemu_chroot", str(e.value)
            assert MARK in str(e.value)
            assert "vm" not in a.node.instances
            reason = a.of("instance.failed")[-1]["reason"]
            assert "qemu_chroot" in reason or MARK in reason

    trio.run(main)
    assert a.state_left() == []
    assert os.listdir(tmp_path / "a" / "state" / "jail") == []
