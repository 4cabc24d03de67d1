"""Library internals qsup relies on: fail loudly, with the reason, when an upgrade changes them.

pyproject.toml caps these libraries below the next release for this reason; raising a cap means
running these tests against the new release first.

* qemu.qmp (qmp_glue/_session.py, qmp_glue/_client.py): ``AsyncProtocol._writer`` (the asyncio
  StreamWriter, for its transport's read size) and ``_reader_task`` (diagnostics), the reader
  calling ``_on_message`` for every message (events and replies are routed there), and the
  ``_cb_outbound``/``_cb_inbound`` hooks.
* pyroute2 (netconf/_nl.py): ``pyroute2.netlink.rtnl.marshal.MarshalRtnl().parse(bytes)``
  decoding a raw rtnetlink dump into messages with ``get_attr``, and the RTM_*/NLM_F_*
  constants imported from ``pyroute2.netlink`` and ``pyroute2.netlink.rtnl``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import socket
import struct
from importlib.metadata import version

import pytest


def _broken(lib: str, what: str) -> str:
    return (f"{lib} {version(lib)} changed an internal qsup relies on: {what}. "
            f"Pin {lib} back (see pyproject.toml's upper bound and constraints.txt) or adapt the code "
            f"named in tests/test_internals.py's docstring.")


# -- qemu.qmp ----------------------------------------------------------------------------------

def test_qemu_qmp_protocol_internals(tmp_path):
    from qemu.qmp import QMPClient
    from qemu.qmp.protocol import AsyncProtocol

    fresh = QMPClient("probe")
    for attr in ("_writer", "_reader_task"):
        if not hasattr(fresh, attr):
            pytest.fail(_broken("qemu.qmp", f"QMPClient() has no attribute {attr!r}"))
    for hook in ("_on_message", "_cb_outbound", "_cb_inbound"):
        fn = getattr(AsyncProtocol, hook, None) or getattr(QMPClient, hook, None)
        if fn is None or list(inspect.signature(fn).parameters) != ["self", "msg"]:
            pytest.fail(_broken("qemu.qmp", f"hook {hook}(self, msg) is gone or changed its signature"))
    if not inspect.iscoroutinefunction(QMPClient._on_message):
        pytest.fail(_broken("qemu.qmp", "_on_message is no longer a coroutine function"))

    seen: dict[str, list] = {"on_message": [], "outbound": [], "inbound": []}

    class Probe(QMPClient):
        async def _on_message(self, msg):
            seen["on_message"].append(dict(msg))
            await super()._on_message(msg)

        def _cb_outbound(self, msg):
            seen["outbound"].append(dict(msg))
            return msg

        def _cb_inbound(self, msg):
            seen["inbound"].append(dict(msg))
            return msg

    path = str(tmp_path / "qmp.sock")

    async def peer(reader, writer):
        writer.write(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, '
                     b'"capabilities": []}}\r\n')
        await writer.drain()
        buf, dec = "", json.JSONDecoder()
        while True:  # qemu.qmp sends JSON objects back to back, with no newline
            chunk = await reader.read(4096)
            if not chunk:
                return
            buf += chunk.decode()
            try:
                msg, end = dec.raw_decode(buf.lstrip())
            except ValueError:
                continue
            buf = buf.lstrip()[end:]
            reply = {"return": {"status": "running", "running": True} if msg["execute"] == "query-status" else {}}
            if "id" in msg:
                reply["id"] = msg["id"]
            writer.write(json.dumps(reply).encode() + b"\r\n")
            if msg["execute"] == "query-status":
                writer.write(b'{"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}\r\n')
            await writer.drain()

    async def main():
        server = await asyncio.start_unix_server(peer, path)
        client = Probe("probe")
        try:
            await client.connect(path)
            writer, task = client._writer, client._reader_task
            if writer is None or not hasattr(writer, "transport"):
                pytest.fail(_broken("qemu.qmp", "_writer is not an asyncio StreamWriter once connected"))
            if not isinstance(task, asyncio.Future) or task.done():
                pytest.fail(_broken("qemu.qmp", "_reader_task is not the running reader task once connected"))
            assert (await client.execute("query-status"))["running"] is True
            for _ in range(100):
                if any("event" in m for m in seen["on_message"]):
                    break
                await asyncio.sleep(0.01)
        finally:
            await client.disconnect()
            server.close()
            await server.wait_closed()
        if client._reader_task is not None:
            pytest.fail(_broken("qemu.qmp", "_reader_task is not cleared on disconnect"))

    asyncio.run(main())
    if not any(m.get("event") == "STOP" for m in seen["on_message"]):
        pytest.fail(_broken("qemu.qmp", "the reader no longer hands events to _on_message"))
    if not any("return" in m for m in seen["on_message"]):
        pytest.fail(_broken("qemu.qmp", "the reader no longer hands replies to _on_message"))
    if not any(m.get("execute") == "query-status" for m in seen["outbound"]):
        pytest.fail(_broken("qemu.qmp", "_cb_outbound is no longer called for commands"))
    if not seen["inbound"]:
        pytest.fail(_broken("qemu.qmp", "_cb_inbound is no longer called"))


# -- pyroute2 ----------------------------------------------------------------------------------

def test_pyroute2_marshal_and_constants():
    try:
        from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST  # noqa: F401
        from pyroute2.netlink.rtnl import (  # noqa: F401
            RTM_DELADDR,
            RTM_DELLINK,
            RTM_DELROUTE,
            RTM_DELRULE,
            RTM_GETLINK,
            RTM_GETROUTE,
            RTM_GETRULE,
            RTM_NEWADDR,
            RTM_NEWROUTE,
            RTM_NEWRULE,
            RTM_SETLINK,
        )
        from pyroute2.netlink.rtnl.marshal import MarshalRtnl
    except ImportError as e:
        pytest.fail(_broken("pyroute2", f"import failed: {e}"))
    assert (NLM_F_REQUEST, NLM_F_DUMP, RTM_GETLINK) == (1, 0x300, 18), _broken("pyroute2", "constant values")

    # a real dump of this namespace's links (no privileges needed), decoded the way _nl.py does
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        nl.bind((0, 0))
        body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0)  # ifinfomsg
        nl.send(struct.pack("=IHHII", 16 + len(body), RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
        marshal = MarshalRtnl()
        names = []
        done = False
        while not done:
            data = nl.recv(1 << 20)
            off = 0
            while off + 16 <= len(data):
                length, typ = struct.unpack_from("=IH", data, off)
                if typ == 3:  # NLMSG_DONE
                    done = True
                    break
                for msg in marshal.parse(data[off:off + length]):
                    try:
                        names.append(msg.get_attr("IFLA_IFNAME"))
                    except AttributeError:
                        pytest.fail(_broken("pyroute2", "decoded messages have no get_attr()"))
                off += (length + 3) & ~3
    finally:
        nl.close()
    if "lo" not in names:
        pytest.fail(_broken("pyroute2", f"MarshalRtnl().parse() no longer decodes RTM_NEWLINK (got {names!r})"))


def test_netconf_and_glue_import_with_these_versions():
    """The modules that use the internals import (a moved name fails here, not at run time)."""
    import netconf._nl  # noqa: F401
    import qmp_glue._session  # noqa: F401

    assert os.path.basename(netconf._nl.__file__) == "_nl.py"
