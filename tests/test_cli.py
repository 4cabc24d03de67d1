"""The qsup CLI against a real `qsup serve` subprocess (tmp dirs, no instances, no root needed).

Exit codes are the contract scripts rely on: 0 ok, 1 the daemon answered an error, 2 bad input
(one line naming the field, no traceback), 3 daemon unreachable.  ``--json`` output must parse.
QEMU is ``/bin/false`` here, so a valid spec fails to start (exit 1) and nothing real runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from needs import require

ROOT = Path(__file__).resolve().parent.parent
QSUP = [sys.executable, "-m", "supervisor._cli"]
#: an existing regular file: the daemon checks that a spec's kernel is one; "QEMU" (/bin/false)
#: never reads it
KERNEL = str(ROOT / "pyproject.toml")


def qsup(*args, env=None, timeout=30, **kw) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    e.pop("QSUP_SOCKET", None) if env is None or "QSUP_SOCKET" not in env else None
    return subprocess.run([*QSUP, *args], capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT, **kw)


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "QSUP_SOCKET")}


class Daemon:
    def __init__(self, tmp: Path, env: dict | None = None, **cfg):
        self.sock = tmp / "qsup.sock"
        self.config = tmp / "qsup.toml"
        lines = {"state_dir": str(tmp / "state"), "run_dir": str(tmp / "run"), "socket": str(self.sock),
                 "hooks_dir": str(tmp / "no-hooks"), "qemu": "/bin/false", "qemu_user": "", "accel": "tcg",
                 "image_dirs": [str(ROOT)], **cfg}
        self.config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in lines.items()))
        self.log = open(tmp / "daemon.log", "w+")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen([*QSUP, "serve", "--config", str(self.config)], stdout=self.log,
                                     stderr=subprocess.STDOUT, env={**_env(), "PYTHONPATH": str(ROOT), **(env or {})},
                                     cwd=ROOT)
        deadline = time.monotonic() + 20
        while '"ready"' not in Path(self.log.name).read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start: {Path(self.log.name).read_text()[-2000:]}")
            time.sleep(0.05)

    def cli(self, *args, **kw):
        return qsup(*args, "--socket", str(self.sock), **kw)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        finally:
            self.log.close()


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    try:
        yield d
    finally:
        if d.proc.poll() is None:
            d.stop()


def one_error_line(r) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("qsup: error: ")
    return lines[0]


def test_unreachable_is_exit_3(tmp_path):
    for args in (["ls"], ["show", "x"], ["stop", "x"], ["events"], ["qmp", "x"]):
        r = qsup(*args, "--socket", str(tmp_path / "nobody.sock"))
        assert r.returncode == 3, (args, r.stderr)
        assert "cannot reach the qsup daemon" in one_error_line(r)


def test_socket_from_environment(daemon, tmp_path):
    r = qsup("ls", "--json", env={"QSUP_SOCKET": str(daemon.sock)})
    assert r.returncode == 0 and json.loads(r.stdout) == []
    r = qsup("ls", env={"QSUP_SOCKET": str(tmp_path / "nope.sock")})
    assert r.returncode == 3


def test_ls_show_events_json(daemon):
    r = daemon.cli("ls", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == []
    r = daemon.cli("ls")
    assert r.returncode == 0 and r.stdout.split() == ["NAME", "STATE", "PID", "MEM", "CPUS", "NICS"]
    r = daemon.cli("events", "--json")
    assert r.returncode == 0
    evs = [json.loads(l) for l in r.stdout.splitlines()]
    assert evs and evs[-1]["type"] == "daemon.ready"
    assert all({"seq", "ts", "instance", "type"} <= set(e) for e in evs)
    r = daemon.cli("events", "--json", "--since", str(evs[-1]["seq"]))
    assert r.returncode == 0 and r.stdout == ""


def test_socket_mode_and_second_daemon_refused(daemon, tmp_path):
    assert oct(os.stat(daemon.sock).st_mode & 0o777) == "0o660"
    # same socket, other state dir: the socket answers, so the second daemon refuses
    other = tmp_path / "other"
    other.mkdir()
    cfg = other / "c.toml"
    cfg.write_text(daemon.config.read_text().replace(str(tmp_path / "state"), str(other / "state")))
    r = qsup("serve", "--config", str(cfg))
    assert r.returncode == 1 and "another daemon is answering" in r.stderr
    # same state dir: refused by the lock
    r = qsup("serve", "--config", str(daemon.config), "--socket", str(other / "s.sock"))
    assert r.returncode == 1 and "another qsup daemon holds" in r.stderr
    assert daemon.cli("ls").returncode == 0  # the first one is untouched


def test_stale_socket_is_replaced(tmp_path):
    import socket as s

    stale = s.socket(s.AF_UNIX)
    stale.bind(str(tmp_path / "qsup.sock"))
    stale.close()  # the file stays, nobody listens
    d = Daemon(tmp_path)
    try:
        assert d.cli("ls", "--json").returncode == 0
    finally:
        assert d.stop() == 0
    assert not (tmp_path / "qsup.sock").exists()


def test_bad_spec_is_exit_2_one_line_naming_the_field(daemon, tmp_path):
    cases = [
        ({"name": "../x", "memory": 64, "kernel": KERNEL}, "name"),
        ({"name": "a", "memory": 64, "kernel": KERNEL, "nics": [{"mode": "routed", "ip": "1.2.3.999"}]},
         "nics[0].ip"),
        ({"name": "a", "memory": 64, "kernel": KERNEL, "nics": [{"mode": "bridged", "link": "qsupnobr9"}]},
         "nics[0].link"),  # valid syntax: refused by the daemon's host check
        ({"name": "a", "memory": 64, "kernel": KERNEL, "colour": 1}, "colour"),
    ]
    for i, (spec, field) in enumerate(cases):
        p = tmp_path / f"bad{i}.json"
        p.write_text(json.dumps(spec))
        r = daemon.cli("start", str(p))
        assert r.returncode == 2, (spec, r.stderr)
        assert one_error_line(r).startswith(f"qsup: error: {field}:"), r.stderr
    toml = tmp_path / "bad.toml"
    toml.write_text(f'name = "ok"\nmemory = "lots"\nkernel = "{KERNEL}"\n')
    r = daemon.cli("start", str(toml))
    assert r.returncode == 2 and one_error_line(r).startswith("qsup: error: memory:")
    r = daemon.cli("start", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "cannot read spec" in one_error_line(r)
    assert json.loads(daemon.cli("ls", "--json").stdout) == []


def test_operation_failures_are_exit_1(daemon, tmp_path):
    for args in (["show", "nope"], ["stop", "nope"], ["stop", "nope", "--force", "--timeout", "3"]):
        r = daemon.cli(*args)
        assert r.returncode == 1, (args, r.stderr)
        assert "no instance named 'nope'" in one_error_line(r)
    # a valid spec whose "QEMU" (/bin/false) exits at once: rolled back, exit 1
    p = tmp_path / "ok.json"
    p.write_text(json.dumps({"name": "dies", "memory": 64, "kernel": KERNEL}))
    r = daemon.cli("start", str(p))
    assert r.returncode == 1
    assert "start failed (rolled back)" in one_error_line(r)
    assert json.loads(daemon.cli("ls", "--json").stdout) == []


def test_follow_no_reconnect_says_where_to_resume(daemon, tmp_path):
    tail = subprocess.Popen([*QSUP, "events", "--follow", "--no-reconnect", "--json", "--socket", str(daemon.sock)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    try:
        first = json.loads(tail.stdout.readline())
        assert first["type"] == "daemon.ready"
        p = tmp_path / "ok.json"
        p.write_text(json.dumps({"name": "f1", "memory": 64, "kernel": KERNEL}))
        assert daemon.cli("start", str(p)).returncode == 1
        got = [json.loads(tail.stdout.readline())]
        while got[-1]["type"] != "instance.failed":
            got.append(json.loads(tail.stdout.readline()))
        assert (got[0]["instance"], got[0]["type"]) == ("f1", "instance.starting")
        assert [e["seq"] for e in got] == list(range(first["seq"] + 1, first["seq"] + 1 + len(got)))
        assert daemon.stop() == 0
        rest = [json.loads(l) for l in tail.stdout.read().splitlines() if l.strip()]
        last = (rest or got)[-1]["seq"]  # daemon.stopping may or may not make it out
        # the daemon went away: not a normal end of the stream, and the error says how to resume
        assert tail.wait(timeout=10) == 3
        err = tail.stderr.read()
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert f"resume with --since {last}" in err, err
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()


def _followers(sock: Path) -> float:
    import httpx

    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://qsup") as c:
        text = c.get("/metrics").text
    return float(next(l.split()[-1] for l in text.splitlines() if l.startswith("qsup_event_followers ")))


def test_follower_task_ends_when_the_client_disconnects(daemon):
    tails = [subprocess.Popen([*QSUP, "events", "--follow", "--json", "--socket", str(daemon.sock)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT) for _ in range(3)]
    try:
        for t in tails:
            assert json.loads(t.stdout.readline())["type"] == "daemon.ready"
        assert _followers(daemon.sock) == 3
        for t in tails:
            t.kill()
            t.wait()
        deadline = time.monotonic() + 5
        while _followers(daemon.sock) != 0:
            assert time.monotonic() < deadline, "follower tasks outlived their clients"
            time.sleep(0.05)
    finally:
        for t in tails:
            if t.poll() is None:
                t.kill()
                t.wait()


def _free_port() -> int:
    import socket as s

    with s.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_tcp_listener_needs_the_token(tmp_path):
    token = tmp_path / "token"
    token.write_text("tok-" + "x" * 28 + "\n")
    token.chmod(0o600)
    port = _free_port()
    d = Daemon(tmp_path, listen=f"127.0.0.1:{port}", token_file=str(token))
    try:
        url = f"http://127.0.0.1:{port}"
        r = qsup("ls", "--json", "--url", url, "--token-file", str(token))
        assert r.returncode == 0 and json.loads(r.stdout) == []
        wrong = tmp_path / "wrong"
        wrong.write_text("not-the-token-at-all-000000")
        r = qsup("ls", "--url", url, "--token-file", str(wrong))
        assert r.returncode == 1 and "bearer token" in one_error_line(r)
        r = qsup("ls", "--url", url)
        assert r.returncode == 1
        assert d.cli("ls", "--json").returncode == 0  # the unix socket needs no token
        r = qsup("qmp", "x", "--url", url, "--token-file", str(token))
        assert r.returncode == 2 and "local socket" in one_error_line(r)
    finally:
        assert d.stop() == 0


def test_systemd_notify_ready_after_reattach_and_stopping(tmp_path):
    import socket as s

    notify = s.socket(s.AF_UNIX, s.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(20)
    d = Daemon(tmp_path, env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    try:
        msg = notify.recv(4096).decode()
        assert "READY=1" in msg.split("\n")
        # READY was sent once serving: the API answers, and the ready log line came first
        assert d.cli("ls", "--json").returncode == 0
        log = Path(d.log.name).read_text()
        assert log.index('"reattached"') < log.index('"ready"')
    finally:
        assert d.stop() == 0
        notify.settimeout(5)
        assert "STOPPING=1" in notify.recv(4096).decode()
        notify.close()


def test_sigint_exits_cleanly_like_sigterm(tmp_path):
    d = Daemon(tmp_path)
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(timeout=20) == 0
    d.log.close()
    assert not d.sock.exists()
    assert '"signal": "SIGINT"' in Path(d.log.name).read_text()


class _Lines:
    """``proc``'s stdout lines through a thread: ``next_json()`` fails after a timeout, never hangs."""

    def __init__(self, proc):
        import queue
        import threading

        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.q.put(l) for l in proc.stdout], daemon=True).start()

    def next_json(self, timeout: float = 20) -> dict:
        import queue

        try:
            return json.loads(self.q.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(f"no event within {timeout} s") from None


def test_follow_reconnects_across_a_daemon_restart_without_gap(tmp_path):
    d = Daemon(tmp_path)
    tail = subprocess.Popen([*QSUP, "events", "--follow", "--json", "--socket", str(d.sock)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**_env(), "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    lines = _Lines(tail)
    try:
        first = lines.next_json()
        assert first["type"] == "daemon.ready"
        assert d.stop() == 0
        d = Daemon(tmp_path)  # same state dir and socket: a restart
        got = [first]
        while not (got[-1]["type"] == "daemon.ready" and got[-1]["seq"] > first["seq"]):
            got.append(lines.next_json())
        seqs = [e["seq"] for e in got]
        assert seqs == list(range(first["seq"], first["seq"] + len(seqs))), seqs  # no gap, no duplicate
        assert "daemon.stopping" in [e["type"] for e in got]
        assert tail.poll() is None  # still following
        p = tmp_path / "ok.json"
        p.write_text(json.dumps({"name": "after", "memory": 64, "kernel": KERNEL}))
        assert d.cli("start", str(p)).returncode == 1
        nxt = lines.next_json()
        assert (nxt["seq"], nxt["instance"]) == (seqs[-1] + 1, "after")
    finally:
        tail.kill()
        tail.wait()
        d.stop()
    err = tail.stderr.read()
    assert "reconnecting" in err and "Traceback" not in err, err


def test_events_human_output_has_the_log_time_format(daemon):
    import re

    r = daemon.cli("events")
    assert r.returncode == 0
    line = r.stdout.splitlines()[-1]
    ts, seq, inst, typ = line.split()[:4]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ts), line
    assert typ == "daemon.ready" and inst == "-"
    log_ts = json.loads(next(l for l in Path(daemon.log.name).read_text().splitlines() if '"ready"' in l))["timestamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", log_ts)
    assert "None" not in r.stdout and "{'" not in r.stdout


def test_version():
    from importlib.metadata import version

    r = qsup("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"qsup {version('qsup')}"


def test_help_texts_are_clean_and_options_apply():
    r = qsup("--help")
    assert r.returncode == 0
    for cmd in ("serve", "run", "start", "ls", "show", "stop", "rm", "events", "migrate", "qmp", "console"):
        assert cmd in r.stdout, cmd
        h = qsup(cmd, "--help")
        assert h.returncode == 0
        assert "``" not in h.stdout and "\\b" not in h.stdout, (cmd, h.stdout)
    serve = qsup("serve", "--help").stdout
    assert "--url" not in serve and "--token-file" not in serve
    for local in ("qmp", "console"):
        assert "--url" not in qsup(local, "--help").stdout
    assert "--socket" not in qsup("run", "--help").stdout
    r = qsup("serve", "--url", "http://x")
    assert r.returncode == 2 and "No such option" in r.stderr


def test_rm_and_qmp_bad_input(daemon):
    r = daemon.cli("rm", "nope")
    assert r.returncode == 1 and "no instance named 'nope'" in one_error_line(r)
    r = daemon.cli("qmp", "nope", "query-status", "[1]")
    assert r.returncode == 2 and "arguments: must be a JSON object" in one_error_line(r)
    r = daemon.cli("qmp", "nope", "query-status", "{bad")
    assert r.returncode == 2 and "arguments: invalid JSON" in one_error_line(r)
    r = daemon.cli("qmp", "nope", "query-status")
    assert r.returncode == 1 and "no instance named 'nope'" in one_error_line(r)
    r = daemon.cli("console", "nope", "--no-follow")
    assert r.returncode == 1 and "no instance named 'nope'" in one_error_line(r)


def test_name_completion_asks_the_daemon(daemon, monkeypatch):
    """click's completion protocol, as the shell script drives it: COMP_WORDS/COMP_CWORD."""
    r = qsup(env={"_QSUP_COMPLETE": "bash_source"})
    assert r.returncode == 0 and "_QSUP_COMPLETE=bash_complete" in r.stdout
    # no instances: no names (and no error text in the prompt)
    r = qsup(env={"_QSUP_COMPLETE": "bash_complete", "COMP_WORDS": "qsup show ", "COMP_CWORD": "2",
                  "QSUP_SOCKET": str(daemon.sock)})
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr == ""
    r = qsup(env={"_QSUP_COMPLETE": "bash_complete", "COMP_WORDS": "qsup sh", "COMP_CWORD": "1"})
    assert "plain,show" in r.stdout.split()


def test_metrics_listener_needs_no_token_and_serves_only_metrics_and_health(tmp_path):
    import httpx

    token = tmp_path / "token"
    token.write_text("tok-" + "y" * 28 + "\n")
    token.chmod(0o600)
    api_port, metrics_port = _free_port(), _free_port()
    d = Daemon(tmp_path, listen=f"127.0.0.1:{api_port}", token_file=str(token),
               metrics_listen=f"127.0.0.1:{metrics_port}")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{metrics_port}", timeout=10) as c:
            r = c.get("/metrics")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            assert "qsup_instances" in r.text
            h = c.get("/v1/health")
            assert h.status_code == 200 and h.json()["status"] == "ok"
            # nothing else: no instances, no events, no changes, with or without a token
            for method, path in (("GET", "/v1/instances"), ("GET", "/v1/events"), ("POST", "/v1/instances"),
                                 ("DELETE", "/v1/instances/x")):
                r = c.request(method, path, headers={"authorization": f"Bearer {token.read_text().strip()}"})
                assert r.status_code in (404, 405), (method, path, r.status_code)
        # the API listener still wants its token, also for /metrics
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10) as c:
            assert c.get("/metrics").status_code == 401
    finally:
        assert d.stop() == 0


def test_metrics_listen_bad_address_is_one_line(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/s"\nrun_dir = "{tmp_path}/r"\nsocket = "{tmp_path}/q.sock"\n'
                   'metrics_listen = "nonsense"\n')
    r = qsup("serve", "--config", str(cfg))
    assert r.returncode == 1 and "metrics_listen: expected host:port" in r.stderr
    assert "Traceback" not in r.stderr


def test_console_tail_follows_appends_rotation_and_truncation(tmp_path):
    log = tmp_path / "vm.console"
    log.write_bytes(b"one\ntwo\nthree\n")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; "
                             "from supervisor._cli import _tail; _tail(Path(sys.argv[1]), 2, True, poll=0.05)",
                             str(log)], stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    lines = _Lines(proc)

    def nxt() -> str:
        import queue

        try:
            return lines.q.get(timeout=10).decode()
        except queue.Empty:
            raise AssertionError("no console output within 10 s") from None

    try:
        assert [nxt(), nxt()] == ["two\n", "three\n"]  # the last 2 lines first
        with open(log, "ab") as f:
            f.write(b"four\n")
        assert nxt() == "four\n"
        # rotation: the rest of the old file, then the new file from its start
        with open(log, "ab") as f:
            f.write(b"five\n")
            log.rename(tmp_path / "vm.console.1")
            f.write(b"six\n")
        log.write_bytes(b"seven\n")
        assert [nxt(), nxt(), nxt()] == ["five\n", "six\n", "seven\n"]
        # truncation (a new start): read again from the beginning
        log.write_bytes(b"")
        time.sleep(0.3)
        log.write_bytes(b"eight\n")
        assert nxt() == "eight\n"
    finally:
        proc.kill()
        proc.wait()


# -- peers and TLS (issue 9) -------------------------------------------------------------------

MAKE_CA = ROOT / "contrib" / "make-test-ca"


def _pem_config(pki: Path, name: str) -> dict:
    return {"node_name": name, "tls_ca": str(pki / "ca.pem"), "tls_cert": str(pki / f"{name}.pem"),
            "tls_key": str(pki / f"{name}-key.pem")}


def test_https_listener_with_client_certificates(tmp_path):
    require(Path("/usr/bin/openssl").exists(), "needs openssl")
    pki, rogue = tmp_path / "pki", tmp_path / "rogue"
    subprocess.run([str(MAKE_CA), str(pki), "a=127.0.0.1", "admin"], check=True)
    subprocess.run([str(MAKE_CA), str(rogue), "admin"], check=True)
    port = _free_port()
    # "admin" is an operator here; a certificate that is neither that nor a peer gets 403 (test_authz.py)
    d = Daemon(tmp_path, listen=f"127.0.0.1:{port}", operators=["admin"], **_pem_config(pki, "a"))
    url = f"https://127.0.0.1:{port}"
    ca = ["--cacert", str(pki / "ca.pem")]
    try:
        cert = ["--cert", str(pki / "admin.pem"), "--key", str(pki / "admin-key.pem")]
        r = qsup("ls", "--json", "--url", url, *ca, *cert)
        assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr
        r = qsup("ls", "--url", url, *ca)  # no certificate and no token (the node has no token_file)
        assert r.returncode == 1 and "bearer token" in one_error_line(r)
        r = qsup("ls", "--url", url, *ca, "--cert", str(rogue / "admin.pem"), "--key", str(rogue / "admin-key.pem"))
        assert r.returncode == 3, r.stderr
        one_error_line(r)
        r = qsup("ls", "--url", url, "--cert", str(pki / "admin.pem"), "--key", str(pki / "admin-key.pem"))
        assert r.returncode == 3, r.stderr  # the daemon's certificate is not trusted without --cacert
        r = qsup("ls", "--url", f"http://127.0.0.1:{port}", *ca)
        assert r.returncode == 2 and "https" in one_error_line(r)
        r = qsup("ls", "--url", f"http://127.0.0.1:{port}")
        assert r.returncode == 3  # plain HTTP is not served on a TLS listener
        r = qsup("ls", "--url", "http://10.1.2.3:8420")
        assert r.returncode == 2 and one_error_line(r).startswith("qsup: error: url:")
        r = d.cli("ls", *ca)
        assert r.returncode == 2 and "--url" in one_error_line(r)
    finally:
        assert d.stop() == 0


def test_plain_listen_on_a_non_loopback_address_is_refused(tmp_path):
    token = tmp_path / "token"
    token.write_text("tok-" + "x" * 28 + "\n")
    cfg = tmp_path / "qsup.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/state"\nrun_dir = "{tmp_path}/run"\nsocket = "{tmp_path}/s.sock"\n'
                   f'listen = "0.0.0.0:{_free_port()}"\ntoken_file = "{token}"\n')
    r = qsup("serve", "--config", str(cfg), timeout=20)
    assert r.returncode == 2 and one_error_line(r).startswith("qsup: error: config: listen:")
    assert "loopback" in r.stderr and not (tmp_path / "s.sock").exists()


def test_migrate_to_must_name_a_declared_peer(tmp_path):
    d = Daemon(tmp_path, node_name="a")
    try:
        for to in ("http://10.0.0.2:8420", "https://b:8420", "/run/qsup-b/qsup.sock", "b\n"):
            r = d.cli("migrate", "vm", "--to", to)
            assert r.returncode == 2 and one_error_line(r).startswith("qsup: error: to:"), (to, r.stderr)
        r = d.cli("migrate", "vm", "--to", "b")  # a node name, but not declared: the daemon says so
        assert r.returncode == 2 and "to: 'b' is not a declared peer" in one_error_line(r)
    finally:
        assert d.stop() == 0
