"""Node-level input checks: what a spec may ask of *this* node, checked before anything opens.

:mod:`._spec` checks a spec on its own (syntax, special addresses, caps).  These checks need
the node's view: the other instances and the file system.  The node calls both right after
parsing and before it emits an event, writes a record or opens a tap, so a refusal changes
nothing.  Both raise :class:`SpecError` naming the field (``nics[1].ip``, ``disks[0].path``).

* :func:`check_unique_addresses` -- a routed address is routed to one tap only.  Two
  instances with the same ``ip`` in the same routing table would silently take over each
  other's route (the second ``route replace`` wins).
* :func:`check_images` -- ``kernel``/``initrd`` must be regular files inside one of
  ``image_dirs``, reached without following a symlink below the image dir
  (:mod:`supervisor._images`); disks are checked with their backing chains by
  :func:`supervisor._disks.check_disks`.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from ._images import check_image
from ._spec import InstanceSpec, SpecError

# The kernel's own table names (iproute2 knows them without rt_tables); a routed NIC without
# ``link`` routes in main.
_BUILTIN_TABLES = {"main": 254, "local": 255, "default": 253, "unspec": 0}


def table_key(link: str | None) -> int | str:
    """A routing table as a comparable key, without reading any file: a number for none (main),
    a built-in name or any decimal string (``"0254"`` is 254); other names as they are
    (the node's host checks resolve them through rt_tables, :func:`check_unique_addresses`'s
    ``resolve``)."""
    if link is None:
        return 254
    if link.isdecimal():
        return int(link)
    return _BUILTIN_TABLES.get(link, link)


def _routed_addresses(spec: InstanceSpec, resolve: Callable[[str], int | str]
                      ) -> Iterator[tuple[str, int | str, ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """(field, table, address) for every routed address of ``spec``, in NIC order."""
    for i, nic in enumerate(spec.nics):
        if nic.mode != "routed":
            continue  # a bridged NIC's ip is informational: qsup routes nothing to it
        table = table_key(nic.link)
        if isinstance(table, str):
            table = resolve(table)
        for key in ("ip", "ip6"):
            value = getattr(nic, key)
            if value is not None:
                yield f"nics[{i}].{key}", table, ipaddress.ip_address(value)


def check_unique_addresses(spec: InstanceSpec, others: Iterable[InstanceSpec],
                           resolve: Callable[[str], int | str] = str) -> None:
    """Refuse a routed ``ip``/``ip6`` that another instance (or another NIC) already routes.

    ``others`` are the specs of every *other* live or prepared instance on this node (the
    caller leaves ``spec``'s own record out).  Addresses are compared as addresses, per
    routing table (``link``), and tables as tables: none, ``main``, ``254`` and ``0254`` are
    the same one.  ``resolve`` maps a table *name* to its number: the node passes
    :func:`netconf.resolve_table` (rt_tables) from its host checks, off the trio thread; the
    default compares other names as names.  The same address in two tables is two routes and
    no conflict.  Bridged/openvswitch NICs are not routed and do not count.
    """
    mine: dict[tuple[int | str, object], str] = {}
    for field, table, addr in _routed_addresses(spec, resolve):
        key = (table, addr)
        if key in mine:
            raise SpecError(f"{addr} is also {mine[key]} of this instance", field)
        mine[key] = field
    if not mine:
        return
    for other in others:
        try:
            routed = list(_routed_addresses(other, resolve))
        except ValueError:  # a name rt_tables no longer has: it cannot be the same table
            continue
        for ofield, table, addr in routed:
            clash = mine.get((table, addr))
            if clash is not None:
                where = "" if table == 254 else f" in table {table}"
                raise SpecError(f"{addr} is already routed to instance "
                                f"{other.name!r} ({ofield}){where}", clash)


def check_images(spec: InstanceSpec, image_dirs: Sequence[str | os.PathLike]) -> dict[str, str]:
    """Check ``kernel``/``initrd``; return ``{field: the path as opened}`` for those set.

    Each is opened (``O_PATH``: nothing read, no device opened, never blocking) by the rule of
    :mod:`supervisor._images`: inside one of ``image_dirs`` (``["/"]``: anywhere), no symlink
    followed below the image dir, ``..`` never leaving it; then ``fstat``: a regular file;
    missing files, devices, directories, FIFOs and sockets never.  Disks and their backing
    chains are checked by :func:`supervisor._disks.check_disks`.

    Kernel and initrd are opened again when QEMU is launched, by the same rule, and that
    descriptor is the one whose content QEMU gets.
    """
    out: dict[str, str] = {}
    for field in ("kernel", "initrd"):
        value = getattr(spec, field)
        if value is not None:
            out[field] = check_image(field, value, image_dirs)
    return out


# --- config value types (used by _config.Config) ---------------------------------------------


def _check_image_dirs(v: list[Path]) -> list[Path]:
    for d in v:
        if not d.is_absolute():
            raise ValueError(f"{str(d)!r} must be an absolute path")
        if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) <= 0xDFFF
               for c in str(d)):
            raise ValueError(f"{str(d)!r} contains a control character or lone surrogate")
    return v


#: the config's ``image_dirs`` unless it says otherwise; ``["/"]`` is how a config allows any path
DEFAULT_IMAGE_DIRS = (Path("/var/lib/qsup/images"),)

#: Config ``image_dirs``: absolute directories (``["/"]``: any path, chosen explicitly).
ImageDirs = Annotated[list[Path], AfterValidator(_check_image_dirs)]
