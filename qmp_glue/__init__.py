"""qmp_glue: QEMU's monitor (QMP) for trio code, on top of qemu.qmp.

qemu.qmp is the QMP client; it is asyncio-only. This package runs it on one
dedicated asyncio thread (``AsyncioThread``; see ``_bridge.py`` for why not
trio-asyncio) and exposes a small trio API::

    with AsyncioThread() as aio:           # one per process is plenty
        async with await connect("/run/vm1.qmp", loop=aio) as qmp:
            status = await qmp.execute("query-status")
            async for event in qmp.events():   # ends when QEMU goes away
                ...

Layout, like qemu.qmp's own split between transport and protocol:
``_bridge.py`` (the trio<->asyncio call bridge, knows nothing of QMP),
``_session.py`` (the asyncio half: qemu.qmp with small adaptations),
``_client.py`` (the trio half: ``connect``/``QMPClient``),
``_errors.py`` (the only exceptions callers see), ``_types.py`` (the JSON
types of commands, replies and events).
"""

from ._bridge import AsyncioThread
from ._client import QMPClient, connect
from ._errors import QMPConnectionLost, QMPError, QMPTimeout
from ._types import JSONArg, JSONObject, JSONValue, QMPEvent

__all__ = [
    "AsyncioThread",
    "JSONArg",
    "JSONObject",
    "JSONValue",
    "QMPClient",
    "QMPConnectionLost",
    "QMPError",
    "QMPEvent",
    "QMPTimeout",
    "connect",
]
