"""Fixtures shared by the unit tests that run nodes against the fake QEMU (tests/fake_qemu.py)."""

from __future__ import annotations

import os
import signal

import pytest

from core_harness import fakes_alive


@pytest.fixture
def no_fakes_left(tmp_path):
    """After the test: no fake QEMU started under its tmp_path still runs (killed by pid, then failed)."""
    yield
    left = fakes_alive(tmp_path)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"fake qemu processes left running: {left}"
