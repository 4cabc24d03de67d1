"""The JSON types of QMP: what commands take and return, and what an event is.

QMP is JSON; qemu.qmp hands messages over as ``Message`` (a ``Mapping[str, object]``).
``qmp_glue`` types them at its edge, once, so callers get ``JSONValue`` back from
``execute`` and a ``QMPEvent`` from ``events()`` instead of ``object``/``Any``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeAlias, TypedDict

#: A JSON value as QMP sends it (what ``json.loads`` returns).
JSONValue: TypeAlias = "dict[str, JSONValue] | list[JSONValue] | str | int | float | bool | None"
#: A JSON object: most commands return one, every event's ``data`` is one.
JSONObject: TypeAlias = "dict[str, JSONValue]"
#: What a command's ``arguments`` may hold: JSON built from read-only views, so a caller's
#: ``dict[str, str]`` or ``list[dict[str, bool]]`` is accepted as it is.
JSONArg: TypeAlias = "Mapping[str, JSONArg] | Sequence[JSONArg] | str | int | float | bool | None"


class QMPEvent(TypedDict):
    """One QMP event; the three keys are always present (``data`` and ``timestamp`` may be ``{}``)."""

    event: str
    data: JSONObject
    timestamp: JSONObject
