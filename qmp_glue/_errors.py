"""Exceptions raised by qmp_glue.

They are deliberately few, so the supervisor can tell apart the three things
that matter to it: QEMU refused a command (``QMPError``), QEMU is gone
(``QMPConnectionLost``), or QEMU is too slow (``QMPTimeout``). qemu.qmp's own
exception types never escape this package.
"""

from __future__ import annotations

import trio


class QMPError(Exception):
    """QEMU answered a command with an error.

    ``error_class`` is QMP's class (``GenericError``, ``DeviceNotFound``...),
    ``desc`` its human description and ``command`` the command that failed.
    """

    def __init__(self, error_class: str, desc: str, command: str) -> None:
        super().__init__(f"{command}: {error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc
        self.command = command


class QMPConnectionLost(Exception):
    """The monitor connection is gone (QEMU exited, crashed or closed it).

    Raised by calls that were pending when it happened and by calls made
    afterwards. Whether a pending command took effect is unknown: QMP gives
    no way to tell, so query QEMU (if it still exists) to find out.
    """


class QMPTimeout(trio.TooSlowError):
    """``connect`` or ``execute`` did not finish within its timeout.

    A subclass of ``trio.TooSlowError``, so code that already catches trio's
    timeout catches this one too.
    """
