"""Integration fixtures: real namespaces, real qemu, a real guest.

Each fixture removes exactly what it made, even when the test fails.  The
session-level check at the end fails the run if a namespace created here is left.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from topo import Netns, QsupRun, leaked_namespaces


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _need_root():
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (namespaces, taps)")


@pytest.fixture
def netns_factory():
    made: list[Netns] = []

    def make(prefix: str = "qst") -> Netns:
        ns = Netns(prefix)
        made.append(ns)
        return ns

    yield make
    for ns in reversed(made):
        ns.close()


@pytest.fixture
def qsup_factory(tmp_path):
    runs: list[QsupRun] = []

    def start(ns: Netns, specs: list[dict], **kw) -> QsupRun:
        d = tmp_path / f"node{len(runs)}"
        d.mkdir()
        r = QsupRun(ns, d, specs, **kw)
        runs.append(r)
        return r

    yield start
    leaked = []
    for r in runs:
        leaked += r.close()  # a QEMU qsup lost (no record holds it), or one that survived SIGKILL
    assert not leaked, f"qemu leaks: {leaked}"


def pytest_sessionfinish(session, exitstatus):
    """Every fixture removes its namespaces; one still here is a leak, and fails the run.

    "Here": a namespace this pytest process made with any prefix of ``topo.NETNS_PREFIXES``
    (its names carry the pid), model, TLS, jail, peer, announce... alike.

    The leaked namespaces are deleted (so the next run starts clean), named on the
    terminal, and the session's exit status is set to "tests failed".
    """
    leaked = leaked_namespaces()
    if not leaked:
        return
    for ns in leaked:
        subprocess.run(["ip", "netns", "del", ns])
    msg = f"LEAK: {len(leaked)} network namespace(s) outlived their tests (deleted now): {' '.join(leaked)}"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(msg, red=True, bold=True)
    else:
        print(msg)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
