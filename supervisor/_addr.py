"""Host names and addresses, as the config and the CLI judge them (pure, no heavy imports)."""

from __future__ import annotations

import ipaddress


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback address (``127.0.0.0/8``, ``::1``): traffic that stays on this host.

    Why it matters: plain HTTP (and a bearer token in it) is only allowed where nothing
    leaves the machine.
    """
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
