"""contrib/ocf/qsup against a scripted daemon: every state mapping and migration outcome.

The real cluster tests (test_cluster.py) show the agent working; these show what it answers
in the cases a healthy cluster never produces on its own: a rolled-back or unknown migration,
an unreachable daemon, a panicked guest.  The "daemon" is a tiny HTTP server on a unix socket
that serves scripted views of GET /v1/instances/NAME (a migrate request advances it to the
next view); the "qsup" CLI (start only) is a script that records its argv, advances the daemon
to its next view and exits with a chosen code.
"""

from __future__ import annotations

import http.server
import json
import os
import socketserver
import subprocess
import threading
import time
from pathlib import Path

import pytest

from harness import AGENT

NAME = "g1"


class FakeDaemon:
    def __init__(self, path: Path):
        self.path = path
        self.views: list[tuple[int, dict]] = [(404, {"error": "no instance", "code": "not_found"})]
        self.requests: list[tuple[str, str, str]] = []
        self.migrate_answer = 202
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def address_string(self):
                return "unix"

            def log_message(self, *a):
                pass

            def _answer(self, code: int, body: dict) -> None:
                data = json.dumps(body, separators=(",", ":")).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n).decode() if n else ""
                fake.requests.append((self.command, self.path, body))
                if self.path == "/_next":
                    if len(fake.views) > 1:
                        fake.views.pop(0)
                    return self._answer(200, {})
                if self.path == "/v1/capacity":
                    return self._answer(200, {"node": "n1", "memory_total_mib": 4000, "memory_available_mib": 3000,
                                              "vcpus": 2, "committed_memory_mib": 256, "committed_vcpus": 1,
                                              "instances": 1})
                if self.command == "DELETE":
                    fake.views = [(404, {"error": "gone", "code": "not_found"})]
                    return self._answer(200, {})
                code, view = fake.views[0]
                if self.command == "POST" and self.path.endswith("/stop"):
                    fake.views = [(200, {**view, "state": "stopped"})]
                    return self._answer(200, fake.views[0][1])
                if self.command == "POST" and self.path.endswith("/migrate"):
                    # the daemon took the migration: what it shows next is the next scripted view
                    if len(fake.views) > 1:
                        fake.views.pop(0)
                    return self._answer(fake.migrate_answer, {} if fake.migrate_answer == 202 else
                                        {"error": "to: not a declared peer", "field": "to", "code": "invalid"})
                if self.command == "POST":
                    return self._answer(202, {})
                self._answer(code, view)

            do_GET = do_POST = do_DELETE = _handle

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self.server = Server(str(path), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def script(self, *views: tuple[int, dict]) -> None:
        self.views = list(views)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def view(state: str, **kw) -> tuple[int, dict]:
    return 200, {"name": NAME, "state": state, "runstate": kw.pop("runstate", None), "pid": 1,
                 "nics": [], "error": None, "panic": kw.pop("panic", None), "migration": kw.pop("migration", None),
                 **kw}


ABSENT = (404, {"error": f"no instance named '{NAME}'", "field": "name", "code": "not_found"})


@pytest.fixture
def env(tmp_path):
    sock = tmp_path / "qsup.sock"
    d = FakeDaemon(sock)
    spec = tmp_path / "g1.json"
    spec.write_text(json.dumps({"name": NAME, "memory": 64}))
    cli_log = tmp_path / "cli.log"
    cli = tmp_path / "fake-qsup"
    cli.write_text(f"""#!/bin/sh
echo "$@" >> {cli_log}
curl -s -o /dev/null --unix-socket {sock} -X POST http://x/_next
exit ${{FAKE_RC:-0}}
""")
    cli.chmod(0o755)
    e = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "OCF_ROOT": "/usr/lib/ocf",
         "OCF_RESOURCE_INSTANCE": NAME, "OCF_RESKEY_spec": str(spec), "OCF_RESKEY_socket": str(sock),
         "OCF_RESKEY_qsup": str(cli), "HA_LOGFILE": str(tmp_path / "ha.log"), "HA_debug": "0"}
    yield d, e, cli_log
    d.close()


def agent(env: dict, action: str, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([str(AGENT), action], env={**env, **extra}, capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.mark.parametrize("scripted, rc", [
    (view("running"), 0),
    (view("paused"), 0),
    (view("migrating", migration={"direction": "out", "status": "active", "result": None}), 0),
    (view("starting"), 0),
    (view("stopping"), 0),
    (view("stopped"), 7),
    (ABSENT, 7),
    (view("crashed"), 1),
    (view("failed"), 1),
    (view("paused", runstate="guest-panicked", panic={"action": "pause", "info": None}), 1),
    (view("running", runstate="internal-error"), 1),
])
def test_monitor_maps_states(env, scripted, rc):
    d, e, _ = env
    d.script(scripted)
    r = agent(e, "monitor")
    assert r.returncode == rc, (scripted, r.stderr)
    assert r.returncode != 1 or "ocf-exit-reason:" in r.stderr


def test_monitor_and_stop_never_claim_stopped_without_the_daemon(env, tmp_path):
    _, e, _ = env
    e = {**e, "OCF_RESKEY_socket": str(tmp_path / "nobody-listens.sock"), "OCF_RESKEY_CRM_meta_timeout": "6000"}
    t0 = time.monotonic()
    r = agent(e, "monitor")
    assert r.returncode == 1 and "not reachable" in r.stderr, r.stderr
    assert agent(e, "stop").returncode == 1
    assert time.monotonic() - t0 < 20


def test_migrate_to_success_only_when_completed(env):
    d, e, log = env
    out = {"direction": "out", "to": "x", "status": "completed", "result": "completed"}
    d.script(view("running"), view("stopped", migration=out))
    r = agent(e, "migrate_to", OCF_RESKEY_CRM_meta_migrate_target="node2",
              OCF_RESKEY_peers="node2=qsup-b node3=n3")
    assert r.returncode == 0, r.stderr
    assert migrations(d) == [{"to": "qsup-b"}]
    assert not log.exists()  # one HTTP request, no CLI
    # and again (idempotent): already migrated away is success, without a second migration
    assert agent(e, "migrate_to", OCF_RESKEY_CRM_meta_migrate_target="node2").returncode == 0
    assert len(migrations(d)) == 1


def test_migrate_to_maps_unlisted_node_to_its_own_name(env):
    d, e, _ = env
    d.script(view("running"), view("stopped", migration={"direction": "out", "result": "completed"}))
    assert agent(e, "migrate_to", OCF_RESKEY_CRM_meta_migrate_target="node3",
                 OCF_RESKEY_peers="node2=p2").returncode == 0
    assert migrations(d) == [{"to": "node3"}]


def migrations(d: FakeDaemon) -> list[dict]:
    return [json.loads(b) for m, p, b in d.requests if m == "POST" and p == f"/v1/instances/{NAME}/migrate"]


def test_migrate_to_refused_request_is_a_failure_and_the_guest_stays(env):
    d, e, _ = env
    d.migrate_answer = 422
    d.script(view("running"))
    r = agent(e, "migrate_to", OCF_RESKEY_CRM_meta_migrate_target="node2")
    assert r.returncode == 1 and "runs here" in r.stderr and "422" in r.stderr, r.stderr
    assert agent(e, "migrate_to", OCF_RESKEY_CRM_meta_migrate_target="bad/peer").returncode == 1


def test_migrate_to_fails_when_rolled_back(env):
    d, e, _ = env
    d.script(view("running"), view("running", migration={"direction": "out", "result": "failed",
                                                          "error": "destination died"}))
    r = agent(e, "migrate_to", OCF_RESKEY_CRM_meta_migrate_target="node2", FAKE_RC="1")
    assert r.returncode == 1 and "rolled back" in r.stderr, r.stderr


def test_migrate_to_exit_code_is_only_a_hint(env):
    """The CLI failed (say it crashed) but the daemon says completed: that is a success."""
    d, e, _ = env
    d.script(view("running"), view("stopped", migration={"direction": "out", "result": "completed"}))
    assert agent(e, "migrate_to", OCF_RESKEY_CRM_meta_migrate_target="node2", FAKE_RC="1").returncode == 0


def test_migrate_to_unknown_outcome_cancels_then_fails(env):
    """Still migrating at the deadline: the agent asks for a rollback, and without an answer
    reports failure (Pacemaker then treats the guest as possibly on both nodes and stops it on
    both before starting it anywhere), never success."""
    d, e, _ = env
    d.script(view("running"), view("migrating", migration={"direction": "out", "status": "active", "result": None}))
    t0 = time.monotonic()
    r = agent(e, "migrate_to", OCF_RESKEY_CRM_meta_migrate_target="node2", FAKE_RC="3",
              OCF_RESKEY_CRM_meta_timeout="9000")
    assert r.returncode == 1 and "outcome unknown" in r.stderr, r.stderr
    assert ("POST", f"/v1/instances/{NAME}/migrate/cancel", "{}") in d.requests
    assert time.monotonic() - t0 < 12


def test_migrate_to_refuses_when_not_active_here(env):
    d, e, log = env
    d.script(ABSENT)
    assert agent(e, "migrate_to", OCF_RESKEY_CRM_meta_migrate_target="node2").returncode == 1
    assert not log.exists()


def test_migrate_from_confirms_only_a_running_guest(env):
    d, e, _ = env
    d.script(view("running"))
    assert agent(e, "migrate_from").returncode == 0
    d.script(ABSENT)
    assert agent(e, "migrate_from").returncode == 1


def test_stop_after_migration_is_a_noop_success(env):
    d, e, _ = env
    d.script(view("stopped", migration={"direction": "out", "result": "completed"}))
    assert agent(e, "stop").returncode == 0
    assert [r[0] for r in d.requests if r[0] != "GET"] == ["DELETE"]  # forgotten, nothing stopped
    assert agent(e, "stop").returncode == 0  # and again: absent


def test_stop_stops_a_running_guest(env):
    d, e, _ = env
    d.script(view("running"))
    assert agent(e, "stop").returncode == 0
    assert any(m == "POST" and p.endswith("/stop") for m, p, _ in d.requests)
    assert agent(e, "monitor").returncode == 7


def test_start_is_idempotent_and_bad_spec_is_a_config_error(env):
    d, e, log = env
    d.script(view("running"))
    assert agent(e, "start").returncode == 0
    assert not log.exists()  # already running: no start issued
    d.script(ABSENT)
    assert agent(e, "start", FAKE_RC="2").returncode == 6  # qsup refused the spec: OCF_ERR_CONFIGURED


def test_start_publishes_node_utilization(env, tmp_path):
    """utilization=true: after a successful start the node's utilization is set from
    GET /v1/capacity (memory = available + committed), and only when it changed."""
    d, e, _ = env
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "crm_attribute.log"
    (bindir / "crm_attribute").write_text(f"""#!/bin/sh
echo "$@" >> {calls}
case "$*" in *--query*) case "$*" in *"--name cpu"*) echo 2 ;; *) echo 1 ;; esac ;; esac
""")
    (bindir / "crm_attribute").chmod(0o755)
    e = {**e, "PATH": f"{bindir}:{e['PATH']}", "OCF_RESKEY_CRM_meta_on_node": "n1"}
    d.script(ABSENT, view("running"))
    assert agent(e, "start", OCF_RESKEY_utilization="true").returncode == 0
    updates = [line for line in calls.read_text().splitlines() if "--update" in line]
    assert updates == ["--node n1 --utilization --name memory --update 3256"], calls.read_text()
    calls.unlink()
    d.script(view("running"))
    assert agent(e, "start").returncode == 0  # default: utilization=false, nothing published
    assert not calls.exists()


def test_validate_all(env, tmp_path):
    _, e, _ = env
    assert agent(e, "validate-all").returncode == 0
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"name": "someone-else"}))
    assert agent(e, "validate-all", OCF_RESKEY_spec=str(other)).returncode == 6
    assert agent(e, "validate-all", OCF_RESKEY_spec=str(tmp_path / "missing.json")).returncode == 5
    assert agent(e, "validate-all", OCF_RESKEY_name="../x").returncode == 6
    assert agent(e, "bogus").returncode == 3


def test_migrate_to_source_lost_it_outcome_unknown(env):
    """The source daemon no longer knows the guest (it restarted and finished or lost the
    migration): the target is a declared peer the agent cannot ask (the daemon holds the
    credentials), so the outcome is unknown: failure, never success -- Pacemaker then stops
    the guest on both nodes before it starts it anywhere."""
    d, e, _ = env
    d.script(view("running"), ABSENT)
    r = agent(e, "migrate_to", OCF_RESKEY_CRM_meta_migrate_target="node2", OCF_RESKEY_peers="node2=qsup-b")
    assert r.returncode == 1 and "outcome unknown" in r.stderr, r.stderr


def test_migrate_options_reach_the_request_and_are_checked(env):
    d, e, _ = env
    d.script(view("running"), view("stopped", migration={"direction": "out", "result": "completed"}))
    assert agent(e, "migrate_to", OCF_RESKEY_CRM_meta_migrate_target="n2",
                 OCF_RESKEY_migrate_options="--max-bandwidth 5000000 --postcopy --downtime-limit 300").returncode == 0
    assert migrations(d) == [{"to": "n2", "max_bandwidth": 5000000, "postcopy": True, "downtime_limit": 300}]
    assert agent(e, "validate-all", OCF_RESKEY_migrate_options="--to evil").returncode == 6


def test_migrate_options_never_reach_the_json_unchecked(env):
    """A value after --max-bandwidth used to pass when it started with a digit and was pasted
    into the request raw: ``1,"switchover":"pause"`` added a member (issue 16)."""
    d, e, _ = env
    d.script(view("running"), view("stopped", migration={"direction": "out", "result": "completed"}))
    r = agent(e, "migrate_to", OCF_RESKEY_CRM_meta_migrate_target="n2",
              OCF_RESKEY_migrate_options='--max-bandwidth 1,"switchover":"pause"')
    assert r.returncode == 6 and "--max-bandwidth takes an integer" in r.stderr, r.stderr
    assert migrations(d) == []
    assert agent(e, "migrate_to", OCF_RESKEY_CRM_meta_migrate_target="n2",
                 OCF_RESKEY_migrate_options="--switchover pause --max-bandwidth 0").returncode == 0
    assert migrations(d) == [{"to": "n2", "switchover": "pause", "max_bandwidth": 0}]
