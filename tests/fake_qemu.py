"""A stand-in for qemu-system-x86_64, for unit tests of the instance core without root.

Run with the argv the supervisor builds (``supervisor._qemu.build_argv``).  It
serves both QMP monitors on their unix socket paths with the real wire
protocol (:class:`qmp_peer.QMPPeer`), keeps a run state the way QEMU does
(``prelaunch``/``inmigrate`` under ``-S``, ``running``, ``paused``,
``postmigrate``, ``guest-panicked``), and migrates over a real TCP connection
to another fake: MIGRATION ``setup``/``active``/``pre-switchover`` (with
``pause-before-switchover``)/``device``/``completed`` on the source, and
``active``/``completed`` -- or ``failed`` and exit, as QEMU 7.2 does -- on the
destination.  Only QEMU is fake; the supervisor runs its real code.

Behaviour knobs come as JSON in the file ``$FAKE_QEMU_KNOBS`` (the wrapper
sets it: qsup gives QEMU a scrubbed environment):
``fail`` (print it and exit 1 before the monitors exist), ``ignore_powerdown``,
``ignore_quit``, ``migrate_seconds`` (how long RAM "moves"), ``switchover_seconds`` (STOP to
``device`` without the pause: the final RAM and device state; a cancel in it wins),
``stderr_flood`` (bytes written to stderr at start, then ``fake-qemu: flood done``),
``chatty`` (a stderr line per ``query-status``), ``event_flood`` (after ``cont``: that many
``GUEST_CRASHLOADED`` events -- pvpanic's bit 1, which does not stop the guest -- then a STOP).

Disks (supervisor/_disks.py, _hotplug.py): the fdsets (``-add-fd``; ``add-fd`` takes the fd sent
with it over SCM_RIGHTS, refused without one, as QEMU does), block nodes (``-blockdev``,
``blockdev-add``/``-del``: a node's file, backing and fdset must exist, a node in use cannot go)
and virtio-blk devices (``-device``, ``device_add``/``device_del`` + ``DEVICE_DELETED``) are kept
as QEMU keeps them, with ``query-fdsets``, ``query-named-block-nodes``, ``query-block``,
``block_resize`` and ``block_set_io_throttle``.  Knobs: ``fail_commands`` (``{command:
message}``: that command is refused), ``unplug_seconds`` (the guest's delay before it lets a
device go; default 0.05), ``ignore_unplug`` (the guest never lets go).

NICs (supervisor/_nicplug.py): ``-netdev tap``/``-device virtio-net-pci`` of the command line,
``getfd`` (the fd sent with it over SCM_RIGHTS, kept under its name; ``closefd``), ``netdev_add``
``type=tap`` (takes the named fds: ``fd`` or ``fds=a:b``), ``netdev_del`` (closes them),
``device_add``/``device_del`` of ``virtio-net-pci`` (the netdev must exist, one device per
netdev, a free PCI slot), ``set_link`` and ``qom-list /machine/peripheral``.
"""

from __future__ import annotations

import array
import json
import os
import socket
import sys
from pathlib import Path

import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import qmp_peer  # noqa: E402
from qmp_peer import PeerError, QMPPeer  # noqa: E402

#: descriptors that came with the last message that carried any (QEMU's chardev keeps them so)
_RECEIVED_FDS: list[int] = []


async def _lines_with_fds(self):
    """qmp_peer's reader, with recvmsg: SCM_RIGHTS descriptors are kept for ``add-fd``."""
    decoder = json.JSONDecoder()
    buf = ""
    sock = self.stream.socket
    while True:
        data, anc, _flags, _addr = await sock.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
        if data and not anc:  # as QEMU's socket chardev: descriptors no command took go at the next read
            for old in _RECEIVED_FDS:
                os.close(old)
            _RECEIVED_FDS.clear()
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                for old in _RECEIVED_FDS:
                    os.close(old)
                _RECEIVED_FDS[:] = list(fds)
        if not data:
            return
        buf += data.decode()
        while True:
            buf = buf.lstrip()
            try:
                obj, end = decoder.raw_decode(buf)
            except json.JSONDecodeError:
                break
            buf = buf[end:]
            yield obj


qmp_peer._Conn.lines = _lines_with_fds  # noqa: SLF001 -- this process only


def _chardevs(argv: list[str]) -> dict[str, dict]:
    """id -> options of every ``-chardev socket`` (the two monitors and the serial console)."""
    out = {}
    for i, a in enumerate(argv[:-1]):
        if a == "-chardev" and argv[i + 1].startswith("socket,"):
            opts = dict(kv.split("=", 1) for kv in argv[i + 1].split(",")[1:] if "=" in kv)
            out[opts["id"]] = opts
    return out


class FakeQemu:
    def __init__(self, argv: list[str], knobs: dict):
        self.knobs = knobs
        self.incoming = "-incoming" in argv
        self.status = "inmigrate" if self.incoming else ("prelaunch" if "-S" in argv else "running")
        self.caps: dict[str, bool] = {}
        self.migration = "none"
        self.vm_was_running = False
        self.continue_switchover = trio.Event()
        self.cancelled = False
        chardevs = _chardevs(argv)
        self.console = chardevs.pop("console", None)
        self.peers = [QMPPeer(o.get("path"), fd=int(o["fd"]) if "fd" in o else None) for o in chardevs.values()]
        self.block = FakeBlock(self, argv)
        self._nursery: trio.Nursery | None = None
        for peer in self.peers:
            peer.close_on_quit = False
            peer.handlers.update({
                "query-status": self.query_status, "cont": self.cont, "stop": self.stop,
                "system_powerdown": self.powerdown, "system_reset": self.reset,
                "migrate-set-capabilities": self.set_caps, "migrate-set-parameters": lambda a: {},
                "migrate": self.migrate, "migrate-incoming": self.migrate_incoming,
                "migrate-continue": self.migrate_continue, "migrate_cancel": self.migrate_cancel,
                "query-migrate": lambda a: {"status": self.migration}, "announce-self": lambda a: {},
                "inject-nmi": self.panic,
                # what ``-machine pc`` stands for, as QEMU 7.2 answers (qsup pins it at start)
                "query-machines": lambda a: [{"name": "pc-i440fx-7.2", "alias": "pc", "is-default": True,
                                              "cpu-max": 255, "hotpluggable-cpus": True},
                                             {"name": "pc-i440fx-7.1", "cpu-max": 255}],
            })
            peer.handlers.update(self.block.handlers())
            for cmd, message in (knobs.get("fail_commands") or {}).items():
                peer.handlers[cmd] = _refuse(message)

    # -- events and exit -----------------------------------------------------
    async def emit(self, event: str, data: dict | None = None) -> None:
        for peer in self.peers:
            await peer.emit(event, data)

    async def set_migration(self, status: str) -> None:
        self.migration = status
        if self.caps.get("events"):
            await self.emit("MIGRATION", {"status": status})

    def exit(self, code: int) -> None:
        sys.stdout.flush()
        os._exit(code)

    # -- run state -----------------------------------------------------------
    def query_status(self, args: dict) -> dict:
        if self.knobs.get("chatty"):
            _stderr(b"fake-qemu: query-status\n")
        return {"status": self.status, "running": self.status == "running", "singlestep": False}

    async def cont(self, args: dict) -> dict:
        if self.status in ("inmigrate", "postmigrate"):
            raise PeerError("GenericError", f"cannot cont in state {self.status}")
        self.status = "running"
        await self.emit("RESUME")
        if self.knobs.get("event_flood"):
            self._nursery.start_soon(self._event_flood, int(self.knobs["event_flood"]))
        return {}

    async def _event_flood(self, n: int) -> None:
        for i in range(n):
            await self.emit("GUEST_CRASHLOADED", {"action": "run", "n": i})
        self.status = "paused"
        await self.emit("STOP")

    async def _stderr_flood(self, n: int) -> None:
        line = b"fake-qemu: warning: the guest did something odd again " + b"x" * 64 + b"\n"
        while n > 0:
            n -= _stderr(line[:n], wait=True)
            await trio.sleep(0)
        _stderr(b"fake-qemu: flood done\n", wait=True)

    async def stop(self, args: dict) -> dict:
        if self.status == "running":
            self.status = "paused"
            await self.emit("STOP")
        return {}

    async def powerdown(self, args: dict) -> dict:
        if not self.knobs.get("ignore_powerdown") and self.status == "running":
            self._nursery.start_soon(self._shutdown)
        return {}

    async def _shutdown(self) -> None:
        await trio.sleep(0.05)
        await self.emit("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
        self.exit(0)

    async def reset(self, args: dict) -> dict:
        await self.emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})
        if self.status == "guest-panicked":
            self.status = "paused"
        return {}

    async def panic(self, args: dict) -> dict:
        """``inject-nmi`` stands for a guest kernel panic (pvpanic, ``-action panic=pause``)."""
        self.status = "guest-panicked"
        await self.emit("GUEST_PANICKED", {"action": "pause", "info": {"type": "fake", "message": "nmi"}})
        await self.emit("STOP")
        return {}

    # -- migration -----------------------------------------------------------
    def set_caps(self, args: dict) -> dict:
        for c in args["capabilities"]:
            self.caps[c["capability"]] = c["state"]
        return {}

    async def migrate(self, args: dict) -> dict:
        host, port = args["uri"][4:].rsplit(":", 1)
        self._nursery.start_soon(self._send, host.strip("[]"), int(port))
        return {}

    async def migrate_continue(self, args: dict) -> dict:
        if self.migration != "pre-switchover":
            raise PeerError("GenericError", f"migration not in pre-switchover state ({self.migration})")
        self.continue_switchover.set()
        return {}

    async def migrate_cancel(self, args: dict) -> dict:
        if self.migration in ("setup", "active", "pre-switchover") and not self.cancelled:
            self.cancelled = True
            self.continue_switchover.set()
        return {}

    async def _send(self, host: str, port: int) -> None:
        self.vm_was_running = self.status == "running"
        await self.set_migration("setup")
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            await self._failed("failed")
            return
        async with stream:
            try:
                await self.set_migration("active")
                deadline = trio.current_time() + float(self.knobs.get("migrate_seconds", 0.2))
                while trio.current_time() < deadline and not self.cancelled:
                    await stream.send_all(b"RAM\n")
                    await trio.sleep(0.02)
                if not self.cancelled:
                    if self.status == "running":
                        self.status = "paused"  # finish-migrate
                        await self.emit("STOP")
                    if self.caps.get("pause-before-switchover"):
                        await self.set_migration("pre-switchover")
                        await self.continue_switchover.wait()
                    else:
                        # the final RAM and device state take a while; a cancel then still wins
                        with trio.move_on_after(float(self.knobs.get("switchover_seconds", 0.1))):
                            await self.continue_switchover.wait()
                if self.cancelled:
                    await self.set_migration("cancelling")
                    await self._failed("cancelled")
                    return
                await self.set_migration("device")
                await stream.send_all(b"DONE\n")
                answer = await stream.receive_some(16) if self.caps.get("return-path") else b"OK\n"
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                answer = b""
        if not answer.startswith(b"OK"):
            await self._failed("failed")
            return
        self.status = "postmigrate"
        await self.set_migration("completed")

    async def _failed(self, status: str) -> None:
        await self.set_migration(status)
        if self.vm_was_running and self.status != "running":
            self.status = "running"  # QEMU restarts a guest whose migration failed
            await self.emit("RESUME")

    async def migrate_incoming(self, args: dict) -> dict:
        host, port = args["uri"][4:].rsplit(":", 1)
        listeners = await trio.open_tcp_listeners(int(port), host=host.strip("[]"))
        self._nursery.start_soon(self._receive, listeners[0])
        return {}

    async def _receive(self, listener) -> None:
        async with listener:
            stream = await listener.accept()
        await self.set_migration("active")
        buf = b""
        async with stream:
            try:
                while b"DONE\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    buf = buf[-8:] + data
            except (trio.BrokenResourceError, OSError):
                pass
            if b"DONE\n" not in buf:
                await self.set_migration("failed")
                print("qemu-system-x86_64: load of migration failed: Input/output error", flush=True)
                self.exit(1)
            self.status = "paused"
            await self.set_migration("completed")
            try:
                await stream.send_all(b"OK\n")
            except (trio.BrokenResourceError, OSError):
                pass

    async def _serve_console(self) -> None:
        """The serial console: accepts qsup's connection and prints one boot line."""
        if "fd" in self.console:
            sock = trio.socket.fromfd(int(self.console["fd"]), trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        else:
            sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
            await sock.bind(self.console["path"])
            sock.listen(2)
        async with trio.SocketListener(sock) as listener:
            while True:
                stream = await listener.accept()
                self._nursery.start_soon(self._console_client, stream)

    @staticmethod
    async def _console_client(stream) -> None:
        """Print one boot line, then echo what is typed (a tty would) until qsup closes the
        connection (as QEMU does)."""
        async with stream:
            try:
                await stream.send_all(b"fake guest: booting\r\n")
                while data := await stream.receive_some(4096):
                    await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    # -- main ------------------------------------------------------------------
    async def run(self) -> None:
        async with trio.open_nursery() as n:
            self._nursery = n
            for peer in self.peers:
                if peer.path and os.path.exists(peer.path):
                    os.unlink(peer.path)
                await n.start(peer.serve)
            if self.console:
                n.start_soon(self._serve_console)
            if self.knobs.get("stderr_flood"):
                n.start_soon(self._stderr_flood, int(self.knobs["stderr_flood"]))
            if self.knobs.get("ignore_quit"):
                return
            while True:  # quit: QMPPeer replies; the process then exits, like QEMU
                await trio.sleep(0.01)
                if any(cmd == "quit" for peer in self.peers for cmd, _ in peer.received):
                    await trio.sleep(0.01)
                    self.exit(0)


def _refuse(message: str):
    def refuse(args: dict) -> dict:
        raise PeerError("GenericError", message)
    return refuse


class FakeBlock:
    """QEMU's fdsets, block nodes and virtio-blk devices, as far as qsup uses them."""

    def __init__(self, qemu: FakeQemu, argv: list[str]) -> None:
        self.qemu = qemu
        self.fdsets: dict[int, list[dict]] = {}  # id -> [{"fd", "opaque"}]
        self.nodes: dict[str, dict] = {}  # node-name -> blockdev-add arguments (+ "size")
        self.devices: dict[str, dict] = {}  # id -> device_add arguments
        self.throttle: dict[str, dict] = {}
        self._unplugging: set[str] = set()
        self.monfds: dict[str, int] = {}  # getfd name -> fd
        self.netdevs: dict[str, dict] = {}
        self.nics: dict[str, dict] = {}  # virtio-net-pci devices: id -> arguments
        self.links: dict[str, bool] = {}
        self._net_argv(argv)
        for i, a in enumerate(argv[:-1]):
            v = argv[i + 1]
            if a == "-add-fd":
                opts = dict(kv.split("=", 1) for kv in v.split(","))
                self.fdsets.setdefault(int(opts["set"]), []).append({"fd": int(opts["fd"]),
                                                                      "opaque": opts.get("opaque")})
            elif a == "-blockdev":
                self.blockdev_add(json.loads(v))
            elif a == "-device" and v.startswith("{"):
                self.device_add(json.loads(v), hot=False)

    def handlers(self) -> dict:
        return {"add-fd": self.add_fd, "remove-fd": self.remove_fd, "query-fdsets": self.query_fdsets,
                "blockdev-add": self.blockdev_add, "blockdev-del": self.blockdev_del,
                "device_add": self.device_add, "device_del": self.device_del,
                "query-named-block-nodes": self.query_nodes, "query-block": self.query_block,
                "block_resize": self.block_resize, "block_set_io_throttle": self.set_throttle,
                "getfd": self.getfd, "closefd": self.closefd, "netdev_add": self.netdev_add,
                "netdev_del": self.netdev_del, "set_link": self.set_link, "qom-list": self.qom_list,
                # the tests' view of the NICs (not QEMU's)
                "x-fake-nets": lambda a: {"netdevs": sorted(self.netdevs), "monfds": sorted(self.monfds),
                                          "nics": {d: {k: v for k, v in n.items() if k != "driver"}
                                                   for d, n in self.nics.items()},
                                          "links": self.links}}

    # fdsets
    def add_fd(self, args: dict) -> dict:
        if not _RECEIVED_FDS:
            raise PeerError("GenericError", "No file descriptor supplied via SCM_RIGHTS")
        fd = _RECEIVED_FDS.pop(0)
        fdset = args.get("fdset-id")
        if fdset is None:
            fdset = next(i for i in range(len(self.fdsets) + 1) if i not in self.fdsets)
        self.fdsets.setdefault(fdset, []).append({"fd": fd, "opaque": args.get("opaque")})
        return {"fdset-id": fdset, "fd": fd}

    def remove_fd(self, args: dict) -> dict:
        fdset = args["fdset-id"]
        if fdset not in self.fdsets:
            raise PeerError("GenericError", f"File descriptor named 'fdset-id:{fdset}' not found")
        for f in self.fdsets.pop(fdset):
            if f["fd"] >= 3 and f["fd"] not in (0, 1, 2):
                try:
                    os.close(f["fd"])
                except OSError:
                    pass
        return {}

    def query_fdsets(self, args: dict) -> list:
        return [{"fdset-id": i, "fds": [{"fd": f["fd"], **({"opaque": f["opaque"]} if f["opaque"] else {})}
                                        for f in fds]} for i, fds in sorted(self.fdsets.items())]

    # nodes
    def _users(self, name: str) -> list[str]:
        return [n for n, a in self.nodes.items() if name in (a.get("file"), a.get("backing"))] + \
            [d for d, a in self.devices.items() if a.get("drive") == name]

    def blockdev_add(self, args: dict) -> dict:
        name = args.get("node-name")
        if not name or name in self.nodes:
            raise PeerError("GenericError", f"Duplicate nodes with node-name='{name}'")
        size = 0
        if args["driver"] in ("file", "host_device"):
            fn = args.get("filename", "")
            if not fn.startswith("/dev/fdset/") or int(fn.rsplit("/", 1)[1]) not in self.fdsets:
                raise PeerError("GenericError", f"Could not open '{fn}': No such file or directory")
            fd = self.fdsets[int(fn.rsplit("/", 1)[1])][0]["fd"]
            try:
                size = os.fstat(fd).st_size
            except OSError:
                size = 0
        else:
            for ref in (args.get("file"), args.get("backing")):
                if ref is not None and ref not in self.nodes:
                    raise PeerError("GenericError", f"Cannot find device='' nor node-name='{ref}'")
            size = self.nodes[args["file"]]["size"]
        self.nodes[name] = {**args, "size": size}
        return {}

    def blockdev_del(self, args: dict) -> dict:
        name = args["node-name"]
        if name not in self.nodes:
            raise PeerError("GenericError", f"Failed to find node with node-name='{name}'")
        if self._users(name):
            raise PeerError("GenericError", f"Node '{name}' is busy: node is used as backing hd of "
                                            f"'{self._users(name)[0]}'")
        del self.nodes[name]
        return {}

    def query_nodes(self, args: dict) -> list:
        return [{"node-name": n, "drv": a["driver"], "ro": bool(a.get("read-only")),
                 "file": a.get("filename") or a.get("file"), "image": {"virtual-size": a["size"]}}
                for n, a in self.nodes.items()]

    def query_block(self, args: dict) -> list:
        return [{"device": "", "qdev": f"/machine/peripheral/{d}/virtio-backend", "locked": False,
                 "removable": False, "inserted": {"node-name": a["drive"], "image": {
                     "virtual-size": self.nodes[a["drive"]]["size"]}}} for d, a in self.devices.items()]

    def block_resize(self, args: dict) -> dict:
        node = self.nodes.get(args.get("node-name", ""))
        if node is None:
            raise PeerError("GenericError", f"Cannot find device='' nor node-name='{args.get('node-name')}'")
        if node.get("read-only"):
            raise PeerError("GenericError", "Block node is read-only")
        node["size"] = args["size"]
        return {}

    def set_throttle(self, args: dict) -> dict:
        """``id``: the virtio-blk device inside the proxy (``/machine/peripheral/ID/virtio-backend``);
        the proxy's own id has no block backend, as in QEMU."""
        path = args.get("id", "")
        parts = path.split("/")
        if path in self.devices:
            raise PeerError("GenericError", "Device does not have a block device backend")
        if len(parts) != 5 or parts[:3] != ["", "machine", "peripheral"] or parts[4] != "virtio-backend" \
                or parts[3] not in self.devices:
            raise PeerError("DeviceNotFound", f"Device '{path}' not found")
        self.throttle[parts[3]] = args
        return {}

    # devices
    def device_add(self, args: dict, hot: bool = True) -> dict:
        if args.get("driver") == "virtio-net-pci" and hot:
            return self._nic_add(args)
        if args.get("driver") != "virtio-blk-pci":
            if hot:
                raise PeerError("GenericError", f"fake: device_add of {args.get('driver')} not supported")
            return {}
        dev = args.get("id")
        if dev in self.devices:
            raise PeerError("GenericError", f"Duplicate device ID '{dev}'")
        if args.get("drive") not in self.nodes:
            raise PeerError("GenericError", f"Property 'virtio-blk-device.drive' can't find value "
                                            f"'{args.get('drive')}'")
        if any(d.get("drive") == args["drive"] for d in self.devices.values()):
            raise PeerError("GenericError", "Conflicts with use by another device as 'root'")
        if any(d.get("addr") == args.get("addr") for d in self.devices.values()):
            raise PeerError("GenericError", f"PCI: slot {args.get('addr')} function 0 not available for "
                                            f"virtio-blk-pci, in use by virtio-blk-pci,id=''")
        self.devices[dev] = args
        return {}

    # NICs
    def _net_argv(self, argv: list[str]) -> None:
        for i, a in enumerate(argv[:-1]):
            v = argv[i + 1]
            opts = dict(kv.split("=", 1) for kv in v.split(",")[1:] if "=" in kv)
            if a == "-netdev" and v.startswith("tap,"):
                fds = [opts["fd"]] if "fd" in opts else opts.get("fds", "").split(":")
                self.netdevs[opts["id"]] = {"fds": [int(f) for f in fds if f]}  # inherited; netdev_del closes them
            elif a == "-device" and v.startswith("virtio-net-pci,"):
                self.nics[opts["id"]] = {"driver": "virtio-net-pci", **opts}

    def _slots(self) -> set:
        return {int(str(d.get("addr")), 0) for d in [*self.devices.values(), *self.nics.values()]
                if d.get("addr") is not None}

    def getfd(self, args: dict) -> dict:
        if not _RECEIVED_FDS:
            raise PeerError("GenericError", "No file descriptor supplied via SCM_RIGHTS")
        name = args["fdname"]
        if name in self.monfds:
            os.close(self.monfds.pop(name))
        self.monfds[name] = _RECEIVED_FDS.pop(0)
        return {}

    def closefd(self, args: dict) -> dict:
        name = args["fdname"]
        if name not in self.monfds:
            raise PeerError("GenericError", f"File descriptor named '{name}' not found")
        os.close(self.monfds.pop(name))
        return {}

    def netdev_add(self, args: dict) -> dict:
        nid = args.get("id")
        if args.get("type") != "tap":
            raise PeerError("GenericError", f"fake: netdev type {args.get('type')} not supported")
        if nid in self.netdevs:
            raise PeerError("GenericError", f"Duplicate ID '{nid}' for netdev")
        names = [args["fd"]] if "fd" in args else str(args.get("fds", "")).split(":")
        missing = [n for n in names if n not in self.monfds]
        if missing:
            raise PeerError("GenericError", f"File descriptor named '{missing[0]}' has not been found")
        self.netdevs[nid] = {"fds": [self.monfds.pop(n) for n in names], **args}
        return {}

    def netdev_del(self, args: dict) -> dict:
        nid = args["id"]
        if nid not in self.netdevs:
            raise PeerError("DeviceNotFound", f"Device '{nid}' not found")
        for fd in self.netdevs.pop(nid)["fds"]:
            os.close(fd)
        return {}

    def _nic_add(self, args: dict) -> dict:
        dev = args.get("id")
        if dev in self.nics or dev in self.devices:
            raise PeerError("GenericError", f"Duplicate device ID '{dev}'")
        if args.get("netdev") not in self.netdevs:
            raise PeerError("GenericError", f"Property 'virtio-net-device.netdev' can't find value "
                                            f"'{args.get('netdev')}'")
        if any(d.get("netdev") == args["netdev"] for d in self.nics.values()):
            raise PeerError("GenericError", f"Property 'virtio-net-pci.netdev' can't take value "
                                            f"'{args['netdev']}', it's in use")
        if args.get("addr") is not None and int(str(args["addr"]), 0) in self._slots():
            raise PeerError("GenericError", f"PCI: slot {int(str(args['addr']), 0)} function 0 not available "
                                            "for virtio-net-pci, in use by another device")
        self.nics[dev] = args
        return {}

    def set_link(self, args: dict) -> dict:
        if args["name"] not in self.nics:
            raise PeerError("DeviceNotFound", f"Device '{args['name']}' not found")
        self.links[args["name"]] = bool(args["up"])
        return {}

    def qom_list(self, args: dict) -> list:
        if args.get("path") != "/machine/peripheral":
            raise PeerError("GenericError", f"fake: qom-list {args.get('path')} not supported")
        return [{"name": d, "type": f"child<{a.get('driver')}>"} for d, a in [*self.devices.items(),
                                                                             *self.nics.items()]]

    async def device_del(self, args: dict) -> dict:
        dev = args["id"]
        if dev not in self.devices and dev not in self.nics:
            raise PeerError("DeviceNotFound", f"Device '{dev}' not found")
        if dev not in self._unplugging and not self.qemu.knobs.get("ignore_unplug"):
            self._unplugging.add(dev)
            self.qemu._nursery.start_soon(self._guest_unplugs, dev)
        return {}

    async def _guest_unplugs(self, dev: str) -> None:
        await trio.sleep(float(self.qemu.knobs.get("unplug_seconds", 0.05)))
        self.devices.pop(dev, None)
        self.nics.pop(dev, None)
        self.throttle.pop(dev, None)
        self._unplugging.discard(dev)
        await self.qemu.emit("DEVICE_DELETED", {"path": f"/machine/peripheral/{dev}/virtio-backend"})
        await self.qemu.emit("DEVICE_DELETED", {"device": dev, "path": f"/machine/peripheral/{dev}"})


def _stderr(data: bytes, wait: bool = False) -> int:
    """Write to stderr as QEMU does (qsup may make it a non-blocking pipe): bytes written."""
    while True:
        try:
            return os.write(2, data)
        except BlockingIOError:
            if not wait:
                return 0
            import time

            time.sleep(0.001)
        except BrokenPipeError:  # nobody reads (no daemon): lost, as QEMU's would be
            return len(data)


def main() -> None:
    path = os.environ.get("FAKE_QEMU_KNOBS", "")
    knobs = json.loads(Path(path).read_text()) if path and os.path.exists(path) else {}
    if knobs.get("fail"):
        print(f"qemu-system-x86_64: {knobs['fail']}", flush=True)
        sys.exit(1)
    trio.run(FakeQemu(sys.argv[1:], knobs).run)


if __name__ == "__main__":
    main()
