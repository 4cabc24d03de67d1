"""Values inside QEMU option strings (``-chardev socket,path=VALUE,...``).

QEMU's option parser (``QemuOpts``/keyval) splits ``key=value`` pairs at commas; a literal
comma inside a value is written as ``,,``.  A path with a comma that is not doubled would
end the value early and the rest would be parsed as further options (``/srv/a,b`` ->
``path=/srv/a`` plus an option ``b``), so every value that is not a fixed literal --
paths from the config, the layout or a spec -- goes through :func:`qemu_opt_value`.

Arguments that QEMU does not parse as an option string (``-kernel PATH``, ``-initrd PATH``,
``-append STRING``, ``-runas USER``) must *not* be escaped.
"""

from __future__ import annotations

import os


def qemu_opt_value(value: str | os.PathLike) -> str:
    """Escape ``value`` for use after ``key=`` in a QEMU option string (commas doubled).

    Raises ValueError for a NUL (cannot be in argv) or a newline (QEMU would take it
    literally; nothing qsup passes should hold one).
    """
    s = os.fspath(value)
    if "\x00" in s or "\n" in s:
        raise ValueError(f"{s!r} cannot be passed in a QEMU option string")
    return s.replace(",", ",,")
