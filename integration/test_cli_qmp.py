"""`qsup qmp NAME COMMAND [JSON]`, `qsup console NAME` and `qsup rm NAME` against a real daemon
running a real guest (TCG) in a network namespace.

The one-shot `qmp` talks to the instance's operator monitor: exit 0 and QEMU's return value as
JSON on success, exit 1 with QEMU's error class on a QMP error, and user JSON goes to QEMU as
one message (never through a shell).
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from topo import VENV_BIN, QsupDaemon, guest_spec, pid_alive


@pytest.fixture
def daemon(netns_factory, tmp_path):
    dm = QsupDaemon(netns_factory(), tmp_path)
    try:
        yield dm
    finally:
        leaked = dm.close()
        assert not leaked, f"qemu pids still alive: {leaked}"


def test_qmp_one_shot_exit_codes_console_and_rm(daemon):
    dm = daemon
    v = dm.start_instance(guest_spec("q1", []))
    assert v["state"] == "running"
    pid = v["pid"]

    # 0: a command QEMU runs; stdout is its return value as JSON
    r = dm.cli("qmp", "q1", "query-status")
    assert r.returncode == 0
    status = json.loads(r.stdout)
    assert status["status"] == "running" and status["running"] is True
    # arguments as a JSON object
    r = dm.cli("qmp", "q1", "query-command-line-options", '{"option": "chardev"}')
    assert r.returncode == 0 and json.loads(r.stdout)[0]["option"] == "chardev"

    # 1: QEMU answers an error (unknown command; bad argument), one line naming QEMU's class
    r = dm.cli("qmp", "q1", "no-such-command", check=False)
    assert r.returncode == 1, r
    assert r.stderr.startswith("qsup: error: qmp no-such-command: CommandNotFound:"), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    r = dm.cli("qmp", "q1", "query-status", '{"bogus": 1}', "--json", check=False)
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["class"] == "GenericError", r
    # shell metacharacters are data, not commands: QEMU just doesn't know this "command"
    r = dm.cli("qmp", "q1", "query-status; touch /tmp/qsup-pwned", check=False)
    assert r.returncode == 1 and "CommandNotFound" in r.stderr
    # 2: not a JSON object
    r = dm.cli("qmp", "q1", "query-status", "[]", check=False)
    assert r.returncode == 2 and "arguments: must be a JSON object" in r.stderr

    # the one-shot really reached QEMU: stop it through the operator monitor, qsup sees the pause
    assert dm.cli("qmp", "q1", "stop").returncode == 0
    assert json.loads(dm.cli("qmp", "q1", "query-status").stdout)["status"] == "paused"
    deadline = time.monotonic() + 10
    while dm.cli_json("show", "q1")["state"] != "paused":
        assert time.monotonic() < deadline, dm.cli_json("show", "q1")
        time.sleep(0.1)
    assert dm.cli("qmp", "q1", "cont").returncode == 0

    # console: what the guest printed; --no-follow exits, -n limits the lines
    dm.wait_console("q1")
    r = dm.cli("console", "q1", "--no-follow", "-n", "1000")
    assert r.returncode == 0 and "GUEST-READY" in r.stdout
    r = dm.cli("console", "q1", "--no-follow", "-n", "2")
    assert r.returncode == 0 and len(r.stdout.splitlines()) <= 2
    # following: output written after it started shows up (the idle guest prints nothing, so the
    # test appends to the console file itself, as QEMU would)
    follower = subprocess.Popen([str(VENV_BIN / "qsup"), "console", "q1", "-n", "0", "--socket", str(dm.socket)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1)
        assert follower.poll() is None, follower.stderr.read()
        with open(v["console"], "a") as f:
            f.write("qsup-follow-marker\n")
        assert follower.stdout.readline() == b"qsup-follow-marker\n"
    finally:
        follower.terminate()
        follower.wait(timeout=10)

    # rm: force-stops the running guest and forgets it
    r = dm.cli("rm", "q1")
    assert r.returncode == 0 and r.stdout.strip() == "q1: deleted"
    assert not pid_alive(pid)
    assert dm.cli_json("ls") == []
    assert dm.cli("show", "q1", check=False).returncode == 1
    r = dm.cli("qmp", "q1", "query-status", check=False)
    assert r.returncode == 1 and "no instance named 'q1'" in r.stderr
