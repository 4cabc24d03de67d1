"""A real guest kernel panic, seen by qsup (issue 15): the guest's pvpanic device is real.

The test guest loads ``pvpanic-pci.ko`` and, with ``guest.nmi_panic=1``, sets
``kernel.unknown_nmi_panic``, so QMP ``inject-nmi`` panics its kernel: the kernel writes the
pvpanic register, QEMU (``-device pvpanic-pci -action panic=pause``) pauses the guest and
emits GUEST_PANICKED, and qsup must show it: ``runstate`` not running, a ``guest.panicked``
event, and a ``stop`` that goes straight to ``quit`` instead of waiting out the powerdown
timeout on a guest that can no longer power down.  On both QEMU versions qsup runs.

``guest.internal_error`` and ``guest.io_error`` are not produced here: under TCG a guest
cannot make QEMU stop with ``internal-error`` (that is a KVM emulation failure), and
``io-error`` needs a disk whose I/O fails, which the test guest does not have yet.
"""

from __future__ import annotations

import time

import pytest

from topo import QEMU, QEMU_DEBIAN, QsupDaemon, guest_spec

pytestmark = pytest.mark.integration


@pytest.fixture
def daemon(tmp_path, netns_factory, request):
    d = QsupDaemon(netns_factory(), tmp_path, powerdown_timeout=30,
                   extra_config=f'qemu = "{request.param}"\n')
    try:
        yield d
    finally:
        leaked = d.close()
        assert not leaked, f"qemu pids still alive at teardown: {leaked}"


def _wait_view(d: QsupDaemon, name: str, pred, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        v = d.cli_json("show", name)
        if pred(v):
            return v
        assert time.monotonic() < deadline, v
        time.sleep(0.1)


@pytest.mark.parametrize("daemon", [QEMU, QEMU_DEBIAN], indirect=True, ids=["qemu-10.0", "qemu-7.2"])
def test_a_real_kernel_panic_is_seen_and_stop_is_prompt(daemon):
    d = daemon
    d.start_instance(guest_spec("pan", [], append="guest.nmi_panic=1"))
    d.wait_console("pan")
    assert d.cli_json("show", "pan")["runstate"] == "running"
    d.cli("qmp", "pan", "inject-nmi")
    v = _wait_view(d, "pan", lambda v: v["runstate"] == "guest-panicked")
    assert v["state"] == "paused" and v["panic"] is not None, v
    panicked = [e for e in d.events() if e["type"] == "guest.panicked" and e.get("instance") == "pan"]
    assert panicked and panicked[-1]["policy"] == "pause", panicked
    t0 = time.monotonic()
    assert d.cli_json("stop", "pan")["state"] == "stopped"
    took = time.monotonic() - t0
    assert took < 10, f"stop of a panicked guest took {took:.1f}s (the powerdown timeout is 30 s)"
    steps = [e.get("step") for e in d.events() if e["type"] == "instance.stop_escalated"]
    assert steps and steps[0] == "quit", steps


@pytest.mark.parametrize("daemon", [QEMU], indirect=True, ids=["qemu-10.0"])
def test_on_panic_stop_ends_the_instance_crashed(daemon):
    d = daemon
    d.start_instance(guest_spec("pas", [], append="guest.nmi_panic=1", on_panic="stop"))
    d.wait_console("pas")
    d.cli("qmp", "pas", "inject-nmi")
    v = _wait_view(d, "pas", lambda v: v["state"] in ("crashed", "stopped", "failed"))
    assert v["state"] == "crashed" and v["exit_cause"] == "guest panicked", v
    assert v["pid"] is None
