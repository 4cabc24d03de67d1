"""Node-level input checks: what a spec may ask of *this* node, checked before anything opens.

:mod:`._spec` checks a spec on its own (syntax, special addresses, caps).  These checks need
the node's view: the other instances and the file system.  The node calls both right after
parsing and before it emits an event, writes a record or opens a tap, so a refusal changes
nothing.  Both raise :class:`SpecError` naming the field (``nics[1].ip``, ``disk``).

* :func:`check_unique_addresses` -- a routed address is routed to one tap only.  Two
  instances with the same ``ip`` in the same routing table would silently take over each
  other's route (the second ``route replace`` wins).
* :func:`check_images` -- ``kernel``/``initrd``/``disk`` must be regular files (device nodes
  only for ``disk`` and only with ``allow_device_disks``), inside one of ``image_dirs`` when
  that is set, after resolving every symlink and ``..``.  It returns the resolved paths:
  pass *those* to QEMU, so a symlink swapped after the check cannot redirect it.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

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
            raise SpecError(field, f"{addr} is also {mine[key]} of this instance")
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
                raise SpecError(clash, f"{addr} is already routed to instance "
                                       f"{other.name!r} ({ofield}){where}")


def check_images(spec: InstanceSpec, image_dirs: Sequence[str | os.PathLike] | None,
                 allow_device_disks: bool = False) -> dict[str, str]:
    """Check ``kernel``/``initrd``/``disk``; return ``{field: resolved path}`` for those set.

    * missing (or dangling) -> refused;
    * every symlink and ``..`` is resolved first, and the *result* is checked;
    * ``image_dirs`` set: the result must be inside one of them (they are resolved too);
      ``None`` (the config default) allows any path;
    * the result must be a regular file; a block/character device is allowed for ``disk``
      only, and only with ``allow_device_disks``; directories, FIFOs, sockets never.

    QEMU should be given the returned paths, not the spec's.
    """
    roots = None
    if image_dirs is not None:
        roots = [Path(os.path.realpath(d)) for d in image_dirs]
    out: dict[str, str] = {}
    for field in ("kernel", "initrd", "disk"):
        value = getattr(spec, field)
        if value is None:
            continue
        real = Path(os.path.realpath(value))
        shown = repr(value) if str(real) == value else f"{value!r} (resolves to {str(real)!r})"
        if roots is not None and not any(real == r or r in real.parents for r in roots):
            dirs = ", ".join(repr(str(r)) for r in roots) or "none"
            raise SpecError(field, f"{shown} is not inside image_dirs ({dirs})")
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise SpecError(field, f"{shown} does not exist") from None
        except OSError as e:
            raise SpecError(field, f"{shown}: {e.strerror}") from None
        if stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode):
            if field != "disk":
                raise SpecError(field, f"{shown} is a device node, not a regular file")
            if not allow_device_disks:
                raise SpecError(field, f"{shown} is a device node "
                                       "(allowed only with allow_device_disks = true)")
        elif not stat.S_ISREG(st.st_mode):
            raise SpecError(field, f"{shown} is not a regular file")
        out[field] = str(real)
    return out


# --- config value types (used by _config.Config) ---------------------------------------------


def _check_image_dirs(v: list[Path] | None) -> list[Path] | None:
    if v is None:
        return v
    for d in v:
        if not d.is_absolute():
            raise ValueError(f"{str(d)!r} must be an absolute path")
        if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) <= 0xDFFF
               for c in str(d)):
            raise ValueError(f"{str(d)!r} contains a control character or lone surrogate")
    return v


#: Config ``image_dirs``: absolute directories, or None (any path allowed).
ImageDirs = Annotated[list[Path] | None, AfterValidator(_check_image_dirs)]
