"""Each instance's QEMU runs as its own uid, under QEMU's seccomp sandbox, with a scrubbed
environment, and needs no path on the host (taps, monitors, console, kernel, initrd are fds)."""

from __future__ import annotations

import time

from test_daemon import daemon_factory, node, routed  # noqa: F401 - fixtures
from topo import assert_own_seccomp_filter, proc_environ, proc_status

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
