"""Netlink watched in a namespace while qsup works, and what of it is a change of the host's
configuration (used by integration/test_upgrade.py and integration/bench/upgrade.py)."""

from __future__ import annotations

import re
import subprocess


class NetlinkWatch:
    """``ip -o monitor`` in a namespace: every address, route, rule, neighbour and link message."""

    def __init__(self, ns) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns.name, "ip", "-o", "monitor",
                                      "address", "route", "rule", "neigh", "link"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> list[str]:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        return [line for line in out.splitlines() if line.strip()]


#: the kernel's own reachability tracking of a dynamic neighbour entry (ping traffic moves it
#: between these on its own; a bridge's learned MACs show without an address): not a change of the
#: host's configuration
NUD_ONLY = re.compile(r"^(?!Deleted )(?:\S+ )?dev \S+ lladdr \S+ (?:router )?(STALE|REACHABLE|DELAY|PROBE) ?$")


def changes(lines: list[str], tap: str) -> list[str]:
    """What is neither QEMU's own offload setup on the tap (a link message naming it; and the
    ``FEATURE CHANGE`` that a bridge the tap is a port of recomputes from it) nor the kernel's
    reachability tracking of a dynamic neighbour entry."""
    return [line for line in lines
            if not (tap and re.match(rf"^\d+: {re.escape(tap)}[:@ ]", line)) and not NUD_ONLY.match(line)
            and " event FEATURE CHANGE " not in line]
