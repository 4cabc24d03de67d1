"""A run_dir QEMU can't reach is refused when the daemon starts (issue 16, finding 3).

With ``tls_*`` QEMU -- its own uid -- reads a migration's TLS files under ``<run_dir>/tls``.  A
run_dir below a directory those uids cannot search (a 0700 temp dir) used to fail every TLS
migration on the destination, after the source had started, with "Permission denied"; now the
daemon says so at start and does not start.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import trio

from supervisor._config import load_config
from supervisor._daemon import DaemonError, serve_daemon

MAKE_CA = Path(__file__).resolve().parent.parent / "contrib" / "make-test-ca"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def _cfg(tmp_path: Path, run_dir: Path, **kw):
    pki = tmp_path / "pki"
    if not pki.exists():
        subprocess.run([str(MAKE_CA), str(pki), "a"], check=True, capture_output=True)
    return load_config(None, state_dir=str(tmp_path / "state"), run_dir=str(run_dir),
                       socket=str(tmp_path / "qsup.sock"), hooks_dir="", node_name="a", accel="tcg",
                       tls_ca=str(pki / "ca.pem"), tls_cert=str(pki / "a.pem"), tls_key=str(pki / "a-key.pem"),
                       **kw)


@pytest.fixture
def as_root(monkeypatch):
    """QEMU runs as an instance uid only under a root daemon."""
    if os.geteuid() != 0:
        monkeypatch.setattr(os, "geteuid", lambda: 0)


class _Started:
    """serve_daemon's task_status: the daemon is ready -- leave it at once (cancel its scope)."""

    def __init__(self, scope: trio.CancelScope):
        self.scope = scope
        self.called = False

    def started(self, value=None) -> None:
        self.called = True
        self.scope.cancel()


def _starts(cfg) -> bool:
    """Whether the daemon gets ready on ``cfg`` (it is stopped right then); its DaemonError otherwise."""
    async def main() -> bool:
        with trio.fail_after(30), trio.CancelScope() as scope:
            status = _Started(scope)
            await serve_daemon(cfg, task_status=status)
        return status.called

    return trio.run(main)


def test_a_run_dir_below_a_0700_directory_is_refused_at_start_saying_why(tmp_path, as_root):
    private = tmp_path / "private"
    private.mkdir()
    os.chmod(private, 0o700)
    cfg = _cfg(tmp_path, private / "run")
    with pytest.raises(DaemonError) as e:
        _starts(cfg)
    msg = str(e.value)
    # the first directory on the way that others can't search: pytest's own 0700 dir, or ours
    first = next(p for p in [*reversed((private / "run").parents), private]
                 if p.exists() and not os.stat(p).st_mode & 0o001)
    assert msg.startswith("run_dir: ") and f"{str(first)!r}" in msg and "0700" in msg and "tls" in msg, msg
    assert not (tmp_path / "qsup.sock").exists()  # refused before it served anything


def test_a_searchable_run_dir_or_a_qemu_that_needs_none_starts(tmp_path, as_root):
    base = Path(tempfile.mkdtemp(prefix="qsup-run-dir-test-", dir="/tmp"))
    try:
        os.chmod(base, 0o711)  # mkdtemp makes it 0700
        assert _starts(_cfg(tmp_path, base / "run"))
        os.chmod(base, 0o700)
        assert _starts(_cfg(tmp_path, base / "run", qemu_user=""))  # QEMU runs as the daemon's uid
        assert _starts(_cfg(tmp_path, base / "run", qemu_chroot=True))  # the jail binds <run_dir>/tls itself
    finally:
        shutil.rmtree(base)
