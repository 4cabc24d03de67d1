"""What a test needs from the machine that ``make deps guest`` installs (openssl, QEMU, the guest).

On a developer's machine a missing one skips the test, naming it.  Under CI (``CI`` set and not
``false``/``0``) everything was installed first, so a missing tool is a failure: a skip there
would be a test that silently never ran.  (integration/topo.py has the same ``require``.)
"""

from __future__ import annotations

import os

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(ok: object, what: str) -> None:
    """Skip (fail under CI) the calling test unless ``ok``; ``what`` says what is missing."""
    if ok:
        return
    if under_ci():
        pytest.fail(f"{what} (CI: a missing tool fails the run instead of skipping)", pytrace=False)
    pytest.skip(what)
