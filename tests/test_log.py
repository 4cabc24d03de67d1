"""Logs ready for journald: a priority on every line, INSTANCE= as a field, a log level.

Unit tests of supervisor/_log.py, and `qsup serve` as systemd would run it: stdout is the journal
stream ($JOURNAL_STREAM names it), once with journald's native socket (a fake one here, never
the host's) and once without (the "<N>" prefix journald parses with SyslogLevelPrefix=true).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import structlog

from supervisor import _log

ROOT = Path(__file__).resolve().parent.parent
QSUP = [sys.executable, "-m", "supervisor._cli"]
#: an existing regular file: the daemon checks that a spec's kernel is one; "QEMU" (/bin/false)
#: never reads it
KERNEL = str(ROOT / "pyproject.toml")
TS_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    _log.configure("info", stream=io.StringIO(), journal=False)


def parse_native(datagram: bytes) -> dict[str, str]:
    """journald's native protocol: KEY=value lines, or KEY\\n<u64 le length><bytes>\\n."""
    fields, i = {}, 0
    while i < len(datagram):
        nl = datagram.index(b"\n", i)
        head = datagram[i:nl]
        if b"=" in head:
            k, v = head.split(b"=", 1)
            fields[k.decode()] = v.decode()
            i = nl + 1
        else:
            (n,) = struct.unpack_from("<Q", datagram, nl + 1)
            start = nl + 9
            fields[head.decode()] = datagram[start:start + n].decode()
            assert datagram[start + n:start + n + 1] == b"\n"
            i = start + n + 1
    return fields


def test_priority_prefix_on_every_line_when_stdout_is_the_journal():
    out = io.StringIO()
    assert _log.configure("debug", stream=out, journal=True, journal_socket="") == "prefix"
    log = structlog.get_logger("t")
    with structlog.contextvars.bound_contextvars(instance="vm1"):
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
        log.critical("c")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("x")
        logging.getLogger("hypercorn.error").error("library line")
    lines = out.getvalue().splitlines()
    prios = [int(re.match(r"<(\d)>", l).group(1)) for l in lines if l.startswith("<")]
    # a traceback is part of its line's JSON (escaped newlines): one journal entry, one prefix
    assert len(lines) == len(prios) == 7, lines
    assert prios == [7, 6, 4, 3, 2, 3, 3]
    docs = [json.loads(l[3:]) for l in lines]
    assert all(d["instance"] == "vm1" for d in docs), "the bound instance must survive rendering"
    assert "ValueError: boom" in docs[5]["exception"]
    assert docs[6]["logger"] == "hypercorn.error" and docs[6]["event"] == "library line"
    assert all(TS_RE.fullmatch(d["timestamp"]) for d in docs)


def test_plain_json_lines_when_not_the_journal(monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    assert _log.configure("info", stream=out) == "json"
    structlog.get_logger().info("hello", k=1)
    structlog.get_logger().debug("filtered")
    (line,) = out.getvalue().splitlines()
    assert json.loads(line)["event"] == "hello"


def test_journal_stream_detection(tmp_path, monkeypatch):
    with open(tmp_path / "stream", "w") as f, open(tmp_path / "other", "w") as other:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert _log.stream_is_journal(f)
        assert not _log.stream_is_journal(other)
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not _log.stream_is_journal(f)


def test_native_journal_fields(tmp_path):
    path = str(tmp_path / "journal.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    srv.settimeout(5)
    out = io.StringIO()
    try:
        assert _log.configure("info", stream=out, journal=True, journal_socket=path) == "journal"
        log = structlog.get_logger("qsup.instance")
        with structlog.contextvars.bound_contextvars(instance="vm7"):
            log.error("migration failed", error="line one\nline two", ms=12.5)
        log.info("no instance here")
        a = parse_native(srv.recv(65536))
        b = parse_native(srv.recv(65536))
    finally:
        srv.close()
    assert out.getvalue() == "", "native mode must not also write to stdout"
    assert a["PRIORITY"] == "3" and a["INSTANCE"] == "vm7" and a["SYSLOG_IDENTIFIER"] == "qsup"
    assert a["QSUP_EVENT"] == "migration failed" and a["QSUP_MS"] == "12.5"
    assert a["QSUP_ERROR"] == "line one\nline two"  # the binary-safe form round-trips
    msg = json.loads(a["MESSAGE"])
    assert msg["instance"] == "vm7" and msg["level"] == "error"
    assert b["PRIORITY"] == "6" and "INSTANCE" not in b


def test_native_socket_gone_falls_back_to_the_prefix(tmp_path):
    out = io.StringIO()
    assert _log.configure("info", stream=out, journal=True,
                          journal_socket=str(tmp_path / "nobody")) == "prefix"
    structlog.get_logger().warning("w")
    assert out.getvalue().startswith("<4>{")


def test_bad_level_refused():
    with pytest.raises(ValueError, match="log level"):
        _log.configure("loud")


def test_format_ts_is_utc_milliseconds():
    assert _log.format_ts(0) == "1970-01-01T00:00:00.000Z"
    assert _log.format_ts(1700000000.1234) == "2023-11-14T22:13:20.123Z"


# -- `qsup serve` as systemd runs it ---------------------------------------------------------

def _serve(tmp: Path, env: dict, **cfg) -> tuple[subprocess.Popen, Path, Path]:
    sock = tmp / "qsup.sock"
    conf = {"state_dir": str(tmp / "state"), "run_dir": str(tmp / "run"), "socket": str(sock),
            "hooks_dir": "", "qemu": "/bin/false", "qemu_user": "", "accel": "tcg", "image_dirs": [str(ROOT)],
            **cfg}
    config = tmp / "qsup.toml"
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in conf.items()))
    logf = tmp / "stdout"
    base = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "QSUP_SOCKET")}
    with open(logf, "w") as out:
        st = os.fstat(out.fileno())
        proc = subprocess.Popen([*QSUP, "serve", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT,
                                env={**base, "PYTHONPATH": str(ROOT), "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}",
                                     **env}, cwd=ROOT)
    deadline = time.monotonic() + 20
    while not sock.exists() or subprocess.run([*QSUP, "ls", "--socket", str(sock)], capture_output=True,
                                              env={**base, "PYTHONPATH": str(ROOT)}, cwd=ROOT).returncode:
        assert proc.poll() is None and time.monotonic() < deadline, logf.read_text()
        time.sleep(0.1)
    return proc, sock, logf


def _start_failing_instance(tmp: Path, sock: Path) -> None:
    spec = tmp / "vm.json"
    spec.write_text(json.dumps({"name": "vmx", "memory": 64, "kernel": KERNEL}))
    r = subprocess.run([*QSUP, "start", str(spec), "--socket", str(sock)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert r.returncode == 1, r.stderr


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


#: a NOTIFY_SOCKET nobody listens on: the daemon logs a warning ("sd_notify failed") at READY
def _broken_notify(tmp: Path) -> dict:
    return {"NOTIFY_SOCKET": str(tmp / "no-systemd-here.sock")}


def test_serve_under_journal_stream_prefixes_every_line(tmp_path):
    proc, sock, logf = _serve(tmp_path, {"QSUP_JOURNAL_SOCKET": "", **_broken_notify(tmp_path)})
    try:
        _start_failing_instance(tmp_path, sock)
    finally:
        _stop(proc)
    lines = logf.read_text().splitlines()
    assert lines
    bad = [l for l in lines if not re.match(r"<[0-7]>\{", l)]
    assert not bad, f"lines without a priority prefix: {bad[:5]}"
    docs = [(int(l[1]), json.loads(l[3:])) for l in lines]
    events = [(p, d["event"]) for p, d in docs]
    assert (6, "ready") in events and (4, "sd_notify failed") in events, events
    assert all(p == {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}[d["level"]] for p, d in docs)
    assert [d for _, d in docs if d.get("instance") == "vmx"], "no line names the instance"


def test_serve_log_level_warning(tmp_path):
    proc, sock, logf = _serve(tmp_path, {"QSUP_JOURNAL_SOCKET": "", **_broken_notify(tmp_path)},
                              log_level="warning")
    try:
        _start_failing_instance(tmp_path, sock)
    finally:
        _stop(proc)
    lines = logf.read_text().splitlines()
    assert lines and all(re.match(r"<[0-4]>\{", l) for l in lines), lines
    assert any('"sd_notify failed"' in l for l in lines)


def test_serve_native_journal_fields(tmp_path):
    path = str(tmp_path / "journal.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    srv.settimeout(0.5)
    proc, sock, logf = _serve(tmp_path, {"QSUP_JOURNAL_SOCKET": path, **_broken_notify(tmp_path)})
    try:
        _start_failing_instance(tmp_path, sock)
    finally:
        _stop(proc)
    got = []
    try:
        while True:
            got.append(parse_native(srv.recv(1 << 20)))
    except TimeoutError:
        pass
    finally:
        srv.close()
    assert logf.read_text() == "", "native mode: nothing on stdout"
    assert got, "nothing reached the journal socket"
    assert ("4", "sd_notify failed") in [(f["PRIORITY"], f["QSUP_EVENT"]) for f in got]
    assert any(f.get("INSTANCE") == "vmx" for f in got), [f["MESSAGE"] for f in got]
    assert all(json.loads(f["MESSAGE"]).get("instance") == f.get("INSTANCE") for f in got)
