"""``qsup console NAME --attach`` for real (issue 18): a real `qsup serve`, the real test guest
under TCG with a shell on its console (``guest.shell=1``).

Commands run in the guest through the daemon (guestcheck.AttachedConsole: the attach API, what
the CLI uses), the capped log records them all along, a second attach is refused naming the
instance, ``--force`` takes over (the first client is told), and Ctrl-] detaches, leaving the
guest running and its console recorded.
"""

from __future__ import annotations

import re
import time

import pytest

from guestcheck import AttachedConsole
from supervisor._client import RequestFailed
from test_daemon import daemon_factory  # noqa: F401 - fixture
from topo import guest_spec


def _wait_log(dm, name: str, text: str, timeout: float = 30) -> None:
    dm.wait_console(name, text, timeout=timeout)


def test_attach_runs_commands_one_writer_force_and_escape(netns_factory, daemon_factory):  # noqa: F811
    dm = daemon_factory(netns_factory())
    v = dm.start_instance(guest_spec("con1", [], append="guest.shell=1"))
    pid = v["pid"]
    dm.wait_console("con1")

    # -- commands in the guest, through the daemon ------------------------------------------------
    first = AttachedConsole(dm.socket, "con1")
    first.wait_ready(60)
    rc, out = first.run("uname -r")
    assert rc == 0 and re.fullmatch(r"\d+\.\d+\S*", out.strip()), (rc, out)
    release = out.strip()
    rc, out = first.run("echo $((6*7))")
    assert (rc, out.strip()) == (0, "42"), (rc, out)
    rc, out = first.run("sh -c 'exit 3'")  # a status comes back as it is
    assert rc == 3
    # the capped log recorded both answers (the pump owns the connection all along)
    log = dm.console("con1")
    assert release in log and re.search(r"^42\r?$", log, re.M), log[-1500:]

    # -- one writer at a time ------------------------------------------------------------------------
    with pytest.raises(RequestFailed) as e:
        AttachedConsole(dm.socket, "con1")
    assert e.value.status == 409 and "'con1'" in str(e.value), e.value
    r = dm.cli("console", "con1", "--attach", input="echo nope\n", check=False)
    assert r.returncode == 1 and "con1" in r.stderr and "attached by another client" in r.stderr, r.stderr
    assert "nope" not in dm.console("con1")

    # -- --force takes over; the first client is told and disconnected ----------------------------
    r = dm.cli("console", "con1", "--attach", "--force", "--linger", "3", input="echo forced-$((40+2))\n")
    assert r.returncode == 0, r.stderr
    assert "forced-42" in r.stdout, r.stdout[-1500:]
    assert first.wait_ended() == "taken over by another client"
    first.close()
    assert "forced-42" in dm.console("con1")

    # -- Ctrl-] detaches: what follows it is not typed; the guest runs on, the log records --------
    r = dm.cli("console", "con1", "--attach",
               input="(sleep 3; echo late-$((2*3))) >/dev/console 2>&1 &\n\x1decho after-escape\n")
    assert r.returncode == 0, r.stderr
    _wait_log(dm, "con1", "late-6")  # printed after the detach, nobody attached: still recorded
    time.sleep(1)
    assert "after-escape" not in dm.console("con1")
    view = dm.cli_json("show", "con1")
    assert view["state"] == "running" and view["pid"] == pid

    # free again after the detach: attach, the shell still answers
    with AttachedConsole(dm.socket, "con1") as again:
        rc, out = again.run("echo still-$((1+1))")
        assert (rc, out.strip()) == (0, "still-2")
        assert again.detach() == "detached"
    assert "still-2" in dm.console("con1")

    dm.cli("stop", "con1", "--force")
    with pytest.raises(RequestFailed) as e:
        AttachedConsole(dm.socket, "con1")
    assert e.value.status == 409 and "'con1'" in str(e.value)
