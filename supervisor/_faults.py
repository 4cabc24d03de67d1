"""Fault injection: named checkpoints at the await points of an instance's life.

The invariant in :mod:`supervisor._state` is only as good as the failure
paths that keep it, and failure paths are the ones nobody exercises by
hand.  Every await point of start, stop, reattach, migrate-out and
migrate-in calls :meth:`Faults.reach` with a :class:`Checkpoint` first; a
test arms one checkpoint with an exception and then checks the invariant
(final or live state, QEMU supervised or gone, journal undone or intact).

In production ``ctx.faults`` is :data:`NO_FAULTS`, whose ``reach`` is one
attribute test: cheap enough for the migration activation path.
"""

from __future__ import annotations

import enum


class Checkpoint(str, enum.Enum):
    # start (and the launch part of an incoming migration)
    DIRS = "start.dirs"
    TAPS = "start.taps"
    #: the node checked the images (Node._claim); the launch opens kernel and initrd again
    IMAGES_CHECKED = "start.images_checked"
    SPAWNED = "start.spawned"
    QMP = "start.qmp"
    ATTACHED = "start.attached"
    ACTIVATED = "start.activated"
    CONT = "start.cont"
    # incoming migration (destination)
    STAGED = "incoming.staged"
    LISTENING = "incoming.listening"
    AWAIT_RELEASE = "incoming.await_release"
    ACTIVATE = "incoming.activate"
    RESUME = "incoming.resume"
    # stop
    POWERDOWN = "stop.powerdown"
    QUIT = "stop.quit"
    # reattach
    REATTACH = "reattach.connect"
    REATTACH_STATUS = "reattach.status"
    # outgoing migration (source)
    PREPARE = "outgoing.prepare"
    CAPABILITIES = "outgoing.capabilities"
    MIGRATE = "outgoing.migrate"
    RELEASE = "outgoing.release"
    CONTINUE = "outgoing.continue"
    CONFIRM = "outgoing.confirm"
    HANDED_OVER = "outgoing.handed_over"
    # disk hotplug (supervisor/_hotplug.py): after each kind of step of an add
    DISK_FDS = "disk.fds"
    DISK_NODES = "disk.nodes"
    DISK_DEVICE = "disk.device"
    # upgrade in place (supervisor/_upgrade.py)
    UPGRADE_SPAWNED = "upgrade.spawned"
    UPGRADE_STREAMING = "upgrade.streaming"
    UPGRADE_COMPLETED = "upgrade.completed"
    UPGRADE_CONT = "upgrade.cont"
    # live NIC changes (supervisor/_nicplug.py): add after its tap + L2, netdev, device, L3;
    # remove after DEVICE_DELETED and after netdev_del + netconf undo; set after the diff applied
    NIC_TAP = "nic.tap"
    NIC_NETDEV = "nic.netdev"
    NIC_DEVICE = "nic.device"
    NIC_ACTIVATED = "nic.activated"
    NIC_UNPLUGGED = "nic.unplugged"
    NIC_DETACHED = "nic.detached"
    NIC_CONVERGED = "nic.converged"


class InjectedFault(RuntimeError):
    """The exception a checkpoint raises by default."""


class Faults:
    """Raise ``exc`` the ``count``-th time ``at`` is reached; record every checkpoint reached."""

    def __init__(self, at: Checkpoint | None = None, exc: BaseException | None = None, count: int = 1):
        self.at = at
        self.exc = exc
        self.count = count
        self.reached: list[Checkpoint] = []
        self.fired = False

    def reach(self, point: Checkpoint) -> None:
        self.reached.append(point)
        if point is self.at and not self.fired:
            self.count -= 1
            if self.count <= 0:
                self.fired = True
                raise self.exc or InjectedFault(f"injected at {point.value}")


class _NoFaults:
    def reach(self, point: Checkpoint) -> None:
        pass


NO_FAULTS = _NoFaults()

#: The daemon's environment variable that makes it SIGKILL itself at one checkpoint: how the
#: integration tests show that a daemon killed at each step of an upgrade leaves one QEMU.
CRASH_ENV = "QSUP_TEST_CRASH_AT"


class CrashAt:
    """``kill -9`` of the daemon itself the first time ``at`` is reached (tests only: see CRASH_ENV)."""

    def __init__(self, at: Checkpoint) -> None:
        self.at = at

    def reach(self, point: Checkpoint) -> None:
        if point is self.at:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


def from_env(environ) -> "CrashAt | _NoFaults":
    """The daemon's faults: none, unless :data:`CRASH_ENV` names a checkpoint."""
    name = environ.get(CRASH_ENV)
    return CrashAt(Checkpoint(name)) if name else NO_FAULTS
