"""Issue 9, against a real `qsup serve` (root, a real guest): the node token never leaves for an
undeclared target, and a plain TCP listener on a non-loopback address is refused.

Before declared peers, `qsup migrate vm --to http://ANYWHERE` sent the node's bearer token
there in clear; here a listener plays the thief and must see no connection at all.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading

import pytest

from topo import VENV_BIN, Netns, QsupDaemon, guest_spec

TOKEN = "integration-token-0123456789abcdef"


class Thief:
    """A TCP listener (and a unix one) that records whatever connects."""

    def __init__(self, unix_path):
        self.seen: list[bytes] = []
        self.tcp = socket.socket()
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(8)
        self.port = self.tcp.getsockname()[1]
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind(str(unix_path))
        self.unix.listen(8)
        self.threads = [threading.Thread(target=self._accept, args=(s,), daemon=True) for s in (self.tcp, self.unix)]
        for t in self.threads:
            t.start()

    def _accept(self, s):
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            c.settimeout(2)
            try:
                self.seen.append(c.recv(65536))
            except OSError:
                self.seen.append(b"")
            c.close()

    def close(self):
        self.tcp.close()
        self.unix.close()


@pytest.fixture
def node(tmp_path):
    ns = Netns("qpe")
    d = None
    try:
        token = tmp_path / "token"
        token.write_text(TOKEN + "\n")
        token.chmod(0o600)
        d = QsupDaemon(ns, tmp_path, extra_config=f'node_name = "node-a"\nlisten = "127.0.0.1:8420"\n'
                                                  f'token_file = "{token}"\n')
        yield ns, d
    finally:
        leaked = d.close() if d is not None else []
        ns.close()
        assert not leaked, f"qemu pids left: {leaked}"


def test_migrate_to_undeclared_targets_sends_nothing(node, tmp_path):
    ns, d = node
    d.start_instance(guest_spec("p1", [], append=""))
    thief = Thief(tmp_path / "thief.sock")
    try:
        # the thief's socket path is reachable from the node's namespace; its TCP port is not
        # (another netns), which changes nothing: the refusal comes before any connect
        for to in (f"http://127.0.0.1:{thief.port}", f"https://127.0.0.1:{thief.port}", str(tmp_path / "thief.sock"),
                   f"unix:{tmp_path / 'thief.sock'}", "node-b"):
            r = subprocess.run(["curl", "-sS", "--unix-socket", str(d.socket), "-X", "POST",
                                "-H", "content-type: application/json", "-d", json.dumps({"to": to}),
                                "http://qsup/v1/instances/p1/migrate"], capture_output=True, text=True, timeout=30)
            body = json.loads(r.stdout)
            assert body["field"] == "to" and "not a declared peer" in body["error"], (to, body)
            r = d.cli("migrate", "p1", "--to", to, check=False)
            assert r.returncode == 2 and "to:" in r.stderr, (to, r.stderr)
        assert d.cli_json("show", "p1")["state"] == "running"
    finally:
        thief.close()
    assert thief.seen == [], thief.seen
    assert not [e for e in d.events() if e["type"].startswith("migration.")]


def test_plain_listen_off_loopback_is_refused(tmp_path):
    cfg = tmp_path / "qsup.toml"
    token = tmp_path / "token"
    token.write_text(TOKEN)
    cfg.write_text(f'state_dir = "{tmp_path}/state"\nrun_dir = "{tmp_path}/run"\nsocket = "{tmp_path}/q.sock"\n'
                   f'listen = "0.0.0.0:8420"\ntoken_file = "{token}"\n')
    r = subprocess.run([str(VENV_BIN / "qsup"), "serve", "--config", str(cfg)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and "listen:" in r.stderr and "loopback" in r.stderr, r.stderr
    assert not (tmp_path / "q.sock").exists()
