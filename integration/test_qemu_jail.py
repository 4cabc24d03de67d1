"""``qemu_chroot = true``: each QEMU in its own mount namespace, in a jail of its own.

Real QEMU (TCG), the real guest, ``qsup serve`` in a network namespace (test_daemon's fixtures).
What is checked, from the host:

* QEMU's root is the jail: its root mount is the read-only tmpfs mounted on
  ``<state_dir>/jail/<name>`` (the mount's source names that directory), listing
  ``/proc/PID/root`` shows only the jail's entries, and every mount in QEMU's namespace is
  one the jail made (nothing of the host's ``/run``, ``/tmp``, state dir...).  QEMU's
  ``readlink /proc/PID/root`` is ``/``: the jail is *its* root mount (``pivot_root``, see
  supervisor/_jail.py), which is why the root mount's source is what names the jail dir;
* its mount namespace differs from the daemon's; it runs as the instance's uid, no groups,
  no capabilities, ``no_new_privs``, under more seccomp filters than its daemon (QEMU's own
  ``-sandbox``, not only one inherited), with the scrubbed environment;
* the guest boots (console) and answers ping; a 0600 root disk in a 0700 directory, with its
  qcow2 backing file, reaches QEMU as descriptors: nothing of it is bound into the jail;
* stop: the jail dir is gone and nothing is mounted under the node's dirs, in the test's
  nor in the daemon's mount namespace; a daemon restart reattaches a jailed QEMU, and cleans
  up the jail of one that died meanwhile; a jail that can't be built fails the start naming
  ``qemu_chroot`` with the helper's words and leaves nothing;
* a live migration (TLS streams) between two jailed nodes: both QEMUs read their creds
  through the jail's read-only ``<run_dir>/tls``.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from migtopo import BUSY, TwoNodes, assert_guest_whole
from test_daemon import daemon_factory, node, routed  # noqa: F401 - fixtures
from topo import assert_own_seccomp_filter, guest_spec, pid_alive, proc_environ, proc_status, qmp

JAIL = "qemu_chroot = true\n"
DAEMON_ONLY_VAR = "QSUP_TEST_SECRET"
#: what a jail may mount besides the host's real top-level lib/bin directories
JAIL_MOUNTS = {"/", "/usr", "/etc/ld.so.cache", "/dev/null", "/dev/zero", "/dev/random", "/dev/urandom", "/proc"}
ROOT_ENTRIES = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


def _mountinfo(pid: int | str) -> list[dict]:
    """``/proc/PID/mountinfo`` as dicts: point, fstype, source, opts (per-mount options)."""
    out = []
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            pre, _, post = line.rstrip("\n").partition(" - ")
            fields, post = pre.split(), post.split()
            dec = lambda s: s.encode().decode("unicode_escape")  # noqa: E731 - \040 etc.
            out.append({"point": dec(fields[4]), "opts": fields[5].split(","), "fstype": post[0],
                        "source": dec(post[1])})
    return out


def _host_root_entries() -> set[str]:
    return {p for p in ROOT_ENTRIES if os.path.islink(p) or os.path.isdir(p)}


def _mounted_under(pid: int | str, *dirs: Path) -> list[str]:
    return [m["point"] for m in _mountinfo(pid)
            if any(m["point"] == str(d) or m["point"].startswith(f"{d}/") for d in dirs)]


def assert_jailed(dm, name: str, pid: int, *, extra: set[str] = frozenset()) -> None:
    jail = dm.state_dir / "jail" / name
    st = os.lstat(jail)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == 0
    assert os.listdir(jail) == [], "the jail dir on the host is only a mount point"
    mounts = _mountinfo(pid)
    roots = [m for m in mounts if m["point"] == "/"]
    assert len(roots) == 1, roots
    assert roots[0]["fstype"] == "tmpfs" and roots[0]["source"] == str(jail), roots[0]
    assert "ro" in roots[0]["opts"] and "nosuid" in roots[0]["opts"]
    points = {m["point"] for m in mounts}
    real_dirs = {p for p in ROOT_ENTRIES if os.path.isdir(p) and not os.path.islink(p)}
    assert points <= JAIL_MOUNTS | real_dirs | set(extra), points - JAIL_MOUNTS - real_dirs
    by_point = {m["point"]: m for m in mounts}
    assert "ro" in by_point["/usr"]["opts"] and "nosuid" in by_point["/usr"]["opts"]
    assert by_point["/proc"]["fstype"] == "proc"
    # its root, seen from the host, holds the jail's entries and nothing else
    listing = {"/" + e for e in os.listdir(f"/proc/{pid}/root")}
    assert listing == {"/usr", "/etc", "/dev", "/proc"} | _host_root_entries() | \
        {"/" + Path(p).parts[1] for p in extra}, listing
    assert os.listdir(f"/proc/{pid}/root/etc") == ["ld.so.cache"]
    assert not os.path.exists(f"/proc/{pid}/root{dm.state_dir}")
    assert os.readlink(f"/proc/{pid}/root") == "/"  # the jail is the root mount of its namespace
    # a mount namespace of its own
    own = os.readlink(f"/proc/{pid}/ns/mnt")
    assert own != os.readlink(f"/proc/{dm.pid}/ns/mnt") and own != os.readlink("/proc/self/ns/mnt")
    # and everything the isolation promise says still holds
    s = proc_status(pid)
    real, eff, saved, fs = (int(x) for x in s["Uid"].split())
    assert real == eff == saved == fs and 60000 <= real <= 60999, s["Uid"]
    assert s["Groups"].strip() == "" and s["CapEff"] == "0000000000000000"
    assert s["NoNewPrivs"] == "1", s["NoNewPrivs"]  # set by the jail helper: says nothing of the sandbox
    assert_own_seccomp_filter(pid, dm.pid)  # QEMU's -sandbox filter, more than the daemon's
    env = proc_environ(pid)
    assert DAEMON_ONLY_VAR not in env and set(env) <= {"PATH", "LC_ALL"}, env


def assert_gone(dm, name: str) -> None:
    assert not (dm.state_dir / "jail" / name).exists()
    left = _mounted_under("self", dm.workdir) + _mounted_under(dm.pid, dm.workdir)
    assert not left, f"mounted under the node's dirs: {left}"


def test_jailed_qemu_runs_in_its_own_root_and_namespace_and_leaves_nothing(node, daemon_factory,  # noqa: F811
                                                                             monkeypatch):
    ns, client = node
    monkeypatch.setenv(DAEMON_ONLY_VAR, "must-not-reach-qemu")
    dm = daemon_factory(ns, extra_config=JAIL)
    v = dm.start_instance(routed("j1", "10.99.8.2", "52:54:00:88:00:01"))
    assert v["state"] == "running"
    assert_jailed(dm, "j1", v["pid"])
    assert v["uid"] == int(proc_status(v["pid"])["Uid"].split()[0])
    dm.wait_console("j1")
    assert client.ping("10.99.8.2")
    assert dm.cli_json("stop", "j1", "--timeout", "10")["state"] == "stopped"
    assert not pid_alive(v["pid"])
    assert_gone(dm, "j1")
    assert os.listdir(dm.state_dir / "jail") == []


def _qcow2_overlay(path: Path, backing: str, size: int = 1 << 20) -> None:
    """A qcow2 over ``backing`` (raw), made without opening it (``-u``): the test's own tool."""
    import subprocess

    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", str(path), str(size)],
                   check=True, capture_output=True)


def test_disks_reach_the_jailed_qemu_as_descriptors_nothing_bound(node, daemon_factory, tmp_path):  # noqa: F811
    """Issue 17: qsup opens the disk and its qcow2 backing file and passes them as fdsets; the
    jail binds neither (it used to bind the overlay rw and the backing ro, and the overlay had to
    be 0666).  The images are 0600 root in a 0700 directory QEMU's uid can't traverse."""
    import subprocess

    ns, _client = node
    dm = daemon_factory(ns, extra_config=JAIL)
    images = tmp_path / "images"
    images.mkdir(mode=0o700)
    base = images / "base.raw"
    base.write_bytes(b"\0" * (1 << 20))
    overlay = images / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(overlay)],
                   check=True, capture_output=True)
    for f in (base, overlay):
        f.chmod(0o600)
    v = dm.start_instance({"name": "d1", "memory": 64, "nics": [],
                           "disks": [{"id": "d", "path": str(overlay), "format": "qcow2"}]})
    assert v["state"] == "running"
    assert_jailed(dm, "d1", v["pid"])
    points = {m["point"] for m in _mountinfo(v["pid"])}
    assert str(overlay) not in points and str(base) not in points, points
    held = {os.readlink(f"/proc/{v['pid']}/fd/{fd}") for fd in os.listdir(f"/proc/{v['pid']}/fd")}
    assert {str(overlay), str(base)} <= held, held
    nodes = {n["node-name"]: n for n in qmp(v["qmp_operator"], "query-named-block-nodes")}
    assert nodes["disk-d"]["image"]["backing-image"]["format"] == "raw", nodes["disk-d"]
    assert not nodes["disk-d"]["ro"] and nodes["disk-d.b1"]["ro"]
    assert nodes["file-d"]["file"].startswith("/dev/fdset/"), nodes["file-d"]
    assert dm.cli_json("stop", "d1", "--force")["state"] == "stopped"
    assert_gone(dm, "d1")


def test_a_fifo_as_a_backing_file_is_refused_and_the_daemon_keeps_answering(node, daemon_factory, tmp_path):  # noqa: F811
    """Issue 16, finding 3: the chain walker opened a FIFO named as a backing file on the trio
    thread, and the whole daemon hung until a writer came.  Now it opens it non-blocking, off the
    trio thread, and refuses it naming ``disk``; a symlinked backing file is refused too."""
    import subprocess
    import threading

    ns, _client = node
    dm = daemon_factory(ns, extra_config=JAIL)
    images = tmp_path / "images"
    images.mkdir()
    fifo = images / "fifo.raw"
    os.mkfifo(fifo)
    overlay = images / "on-fifo.qcow2"
    _qcow2_overlay(overlay, "fifo.raw")
    (images / "base.raw").write_bytes(b"\0" * (1 << 20))
    (images / "link.raw").symlink_to(images / "base.raw")
    linked = images / "on-link.qcow2"
    _qcow2_overlay(linked, "link.raw")
    done = threading.Event()

    def unblock():  # a daemon blocked in open() is let go once the test gave up on it
        while not done.wait(1):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass  # no reader: nobody is blocked

    try:
        for disk, words in ((overlay, "FIFO"), (linked, "symbolic link")):
            p = dm.workdir / f"spec-{disk.stem}.json"
            p.write_text(json.dumps({"name": disk.stem, "memory": 64, "nics": [],
                                     "disks": [{"id": "d", "path": str(disk), "format": "qcow2"}]}))
            r = dm.cli("start", str(p), check=False, timeout=20)
            assert r.returncode != 0 and "disk" in r.stderr and words in r.stderr, r.stderr
            assert dm.cli_json("ls") is not None  # the daemon answers
    except subprocess.TimeoutExpired:
        threading.Thread(target=unblock, daemon=True).start()
        raise
    finally:
        done.set()
    assert not (dm.state_dir / "jail").exists() or os.listdir(dm.state_dir / "jail") == []
    assert not (dm.state_dir / "instances" / "on-fifo").exists()


def test_daemon_restart_reattaches_a_jailed_qemu_and_cleans_up_a_dead_ones_jail(node, daemon_factory):  # noqa: F811
    ns, client = node
    dm = daemon_factory(ns, extra_config=JAIL)
    keep = dm.start_instance(routed("r1", "10.99.8.11", "52:54:00:88:00:11"))
    dead = dm.start_instance(routed("r2", "10.99.8.12", "52:54:00:88:00:12"))
    dm.wait_console("r1")
    dm.kill()
    os.kill(dead["pid"], signal.SIGKILL)  # a QEMU this test's daemon started, by pid
    deadline = time.monotonic() + 10
    while pid_alive(dead["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (dm.state_dir / "jail" / "r2").exists()  # nobody was there to remove it
    dm.start()
    views = {v["name"]: v for v in dm.cli_json("ls")}
    assert views["r1"]["state"] == "running" and views["r1"]["pid"] == keep["pid"]
    assert views["r2"]["state"] == "crashed"
    assert not (dm.state_dir / "jail" / "r2").exists(), "the dead QEMU's jail dir outlived its teardown"
    assert_jailed(dm, "r1", keep["pid"])  # dm.pid is the new daemon: still another namespace
    assert client.ping("10.99.8.11", timeout=10)
    assert dm.cli_json("stop", "r1", "--timeout", "10")["state"] == "stopped"
    assert_gone(dm, "r1")
    assert os.listdir(dm.state_dir / "jail") == []


def test_a_jail_that_cannot_be_built_fails_the_start_naming_qemu_chroot(node, daemon_factory, tmp_path):  # noqa: F811
    """The helper's own words, field ``qemu_chroot``, and nothing left: no process, no jail dir,
    no record, no tap, no route.  Here QEMU is a wrapper whose interpreter the jail doesn't have
    (it is outside /usr; only the wrapper itself is bound)."""
    ns, _client = node
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "sh").symlink_to("/bin/sh")
    wrapper = tools / "qemu-wrapper"
    wrapper.write_text(f"#!{tools}/sh\nexec qemu-system-x86_64 \"$@\"\n")
    wrapper.chmod(0o755)
    dm = daemon_factory(ns, extra_config=JAIL + f'qemu = "{wrapper}"\n')
    spec = routed("f1", "10.99.8.21", "52:54:00:88:00:21")
    p = dm.workdir / "spec-f1.json"
    p.write_text(json.dumps(spec))
    r = dm.cli("start", str(p), check=False)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert "qemu_chroot:" in err and "qsup jail (qemu_chroot): exec" in err, err
    assert "No such file or directory" in err, err
    assert not (dm.state_dir / "jail" / "f1").exists()
    assert not (dm.state_dir / "instances" / "f1").exists()
    assert ns.run("ip", "route", "show", "10.99.8.21") == ""
    assert not [t for t in ns.links() if t.startswith("qs")], ns.links()
    assert not _mounted_under(dm.pid, dm.workdir)

    # a leftover that is not an empty directory is refused before anything runs, and left alone
    dm.write_config(extra_config=JAIL)
    dm.kill()
    dm.start()
    left = dm.state_dir / "jail" / "f2"
    left.mkdir(parents=True)
    (left / "something").write_text("not ours")
    spec = routed("f2", "10.99.8.22", "52:54:00:88:00:22")
    p = dm.workdir / "spec-f2.json"
    p.write_text(json.dumps(spec))
    r = dm.cli("start", str(p), check=False)
    assert r.returncode == 1 and "qemu_chroot:" in r.stderr and "not an empty directory" in r.stderr, r.stderr
    assert (left / "something").read_text() == "not ours"
    assert not (dm.state_dir / "instances" / "f2").exists()


@pytest.fixture
def jailed_tls_nodes(tmp_path):
    t = TwoNodes(tmp_path, prefix="qjl")
    try:
        a, b = t.start_daemons(JAIL, tls=True)
        yield t, a, b
    finally:
        leaked = t.close()
        assert not leaked, f"qemu pids left: {leaked}"


def test_live_migration_between_jailed_nodes_over_tls(jailed_tls_nodes):
    ip, mac = "10.99.0.2", "52:54:00:99:00:02"
    t, a, b = jailed_tls_nodes
    src = a.start_instance(guest_spec("m1", [{"mode": "routed", "mac": mac, "ip": ip}],
                                      append=f"guest.ip0={ip}/32 {BUSY}"))
    tls = {str(a.run_dir / "tls")}
    assert_jailed(a, "m1", src["pid"], extra=tls)
    a.wait_console("m1")
    assert t.client.ping(ip)
    r = a.cli("migrate", "m1", "--to", b.node_name, "--json", timeout=300, check=False)
    summary = json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else None
    assert summary and summary["result"] == "completed", (summary, r.stderr)
    dst = b.cli_json("show", "m1")
    assert dst["state"] == "running"
    assert_jailed(b, "m1", dst["pid"], extra={str(b.run_dir / "tls")})
    # the stream was TLS (this migration's own key, loaded through the jail), and once it ended
    # the destination's QEMU holds no key any more
    started = [e for e in a.events() if e["type"] == "migration.started" and e.get("instance") == "m1"]
    assert started and started[-1]["tls"] is True
    deadline = time.monotonic() + 10
    while qmp(dst["qmp_operator"], "query-migrate-parameters")["tls-creds"]:
        assert time.monotonic() < deadline, "the destination QEMU still holds the migration's key"
        time.sleep(0.1)
    assert not pid_alive(src["pid"])
    assert_gone(a, "m1")
    assert_guest_whole(t, b, "m1", ip, busy=True)
    assert b.cli_json("stop", "m1", "--timeout", "10")["state"] == "stopped"
    assert_gone(b, "m1")
