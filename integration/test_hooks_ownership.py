"""Issue 9: hooks run as root, so `qsup run` refuses a hook anyone but root could have changed.

Through the real `qsup run`: a hook owned by another uid, and a group-writable step
directory, each fail the start with an error naming the offending path, the hook never runs,
and the start is rolled back (no tap, no route, no record).  On today's main both hooks ran.
"""

from __future__ import annotations

import os

from test_hooks_real import hook, spec
from test_run_vm import _run_bad


def _check_refused(node, tmp_path, offending, marker, r):
    assert r.returncode == 1, r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert str(offending) in err and "refused" in err, err
    assert not marker.exists(), "the untrusted hook ran"
    assert "10.99.0.20" not in node.run("ip", "route", "show", "table", "all")
    assert not [l for l in node.links() if l.startswith("qs")]


def test_hook_owned_by_another_user_is_refused(netns_factory, tmp_path):
    node = netns_factory()
    hooks, marker = tmp_path / "hooks", tmp_path / "ran"
    bad = hook(hooks, "tap-up", "before.d", f"touch {marker}\n")
    os.chown(bad, 65534, 65534)
    r = _run_bad(node, tmp_path, [spec("ho1")], hooks_dir=hooks)
    _check_refused(node, tmp_path, bad, marker, r)


def test_group_writable_step_directory_is_refused(netns_factory, tmp_path):
    node = netns_factory()
    hooks, marker = tmp_path / "hooks", tmp_path / "ran"
    hook(hooks, "tap-up", "after.d", f"touch {marker}\n")
    (hooks / "tap-up" / "after.d").chmod(0o775)
    r = _run_bad(node, tmp_path, [spec("ho2")], hooks_dir=hooks)
    _check_refused(node, tmp_path, hooks / "tap-up" / "after.d", marker, r)
