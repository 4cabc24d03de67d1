"""`qsup events --follow` across a real daemon restart, with a real guest running through it.

The follower must reconnect and resume after the last seq it printed: every event exactly once,
in order, the restart's own events (daemon.ready, instance.reattached) included.  With
--no-reconnect it must exit non-zero and say which --since resumes, and that --since must indeed
continue the stream with no gap.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time

import pytest

from topo import VENV_BIN, QsupDaemon, guest_spec


class Follower:
    def __init__(self, dm: QsupDaemon, *extra: str):
        self.proc = subprocess.Popen([str(VENV_BIN / "qsup"), "events", "--follow", "--json", *extra,
                                      "--socket", str(dm.socket)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: list[dict] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            ev = json.loads(line)
            self.events.append(ev)
            self._q.put(ev)

    def wait_for(self, type_: str, instance: str | None = None, after: int = 0, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events:
                if ev["seq"] > after and ev["type"] == type_ and (instance is None or ev["instance"] == instance):
                    return ev
            left = deadline - time.monotonic()
            assert left > 0, f"no {type_} for {instance} after seq {after}: {[e['type'] for e in self.events]}"
            try:
                self._q.get(timeout=min(left, 0.5))
            except queue.Empty:
                pass

    def close(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=10)
        return self.proc.stderr.read()


@pytest.fixture
def daemon(netns_factory, tmp_path):
    dm = QsupDaemon(netns_factory(), tmp_path)
    followers: list[Follower] = []
    try:
        yield dm, followers
    finally:
        for f in followers:
            f.close()
        leaked = dm.close()
        assert not leaked, f"qemu pids still alive: {leaked}"


def assert_contiguous(events: list[dict]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"gap or duplicate: {seqs}"


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_follower_survives_a_daemon_restart(daemon, how):
    dm, followers = daemon
    f = Follower(dm)
    followers.append(f)
    ready = f.wait_for("daemon.ready")
    v = dm.start_instance(guest_spec("f1", []))
    f.wait_for("instance.running", "f1")

    if how == "sigterm":
        assert dm.terminate() == 0  # the guest stays (on_shutdown = "leave")
    else:
        dm.kill()
    time.sleep(1)  # the follower is now retrying against a dead socket
    assert f.proc.poll() is None, f.proc.stderr.read()
    dm.start()
    again = f.wait_for("daemon.ready", after=ready["seq"])
    assert f.wait_for("instance.reattached", "f1", after=ready["seq"])["pid"] == v["pid"]

    # live events after the restart still arrive, on the same follower
    assert dm.cli_json("stop", "f1", "--timeout", "5")["state"] == "stopped"
    f.wait_for("instance.stopped", "f1", after=again["seq"])
    assert f.proc.poll() is None
    assert_contiguous(f.events)
    # exactly what the daemon has stored, no more, no less
    stored = dm.events(since=f.events[0]["seq"] - 1)
    assert [e["seq"] for e in stored[:len(f.events)]] == [e["seq"] for e in f.events]
    assert [e["type"] for e in stored[:len(f.events)]] == [e["type"] for e in f.events]
    err = f.close()
    assert "reconnecting" in err and "reconnected" in err and "Traceback" not in err, err


def test_no_reconnect_exits_non_zero_with_the_seq_to_resume_from(daemon):
    dm, followers = daemon
    f = Follower(dm, "--no-reconnect")
    followers.append(f)
    f.wait_for("daemon.ready")
    dm.start_instance(guest_spec("f2", []))
    f.wait_for("instance.running", "f2")
    dm.kill()
    assert f.proc.wait(timeout=20) == 3
    err = f.proc.stderr.read()
    last = f.events[-1]["seq"]
    assert err.strip().splitlines() == [err.strip()] and "Traceback" not in err, err
    assert f"resume with --since {last}" in err, err

    dm.start()
    rest = dm.events(since=last)
    assert rest[0]["seq"] == last + 1
    assert_contiguous(f.events + rest)
    assert "instance.reattached" in [e["type"] for e in rest]
    assert dm.cli_json("stop", "f2", "--timeout", "5")["state"] == "stopped"
