"""schemathesis against the API with every one of its default checks, none excluded.

The app is the real one (``create_app``: routing, body parsing, validation, the error table,
the outer layer, the event stream), served by hypercorn's trio worker on 127.0.0.1 in a thread.
Only the node behind it is a stand-in (:class:`FakeNode`): it accepts every spec the parser
accepts, as a node with every bridge and table would -- which is what the positive-data check
demands: a request the schema calls valid must be answered 2xx (or 404/409).  The real node's
answers are checked against the same schemas in ``integration/test_openapi_client.py``.

Both listeners' documents are fuzzed: the unix socket's (no credentials) and the TCP
listener's (bearer token: ``ignored_auth`` then checks that a request without it gets 401).

The generator is told the things the schema cannot say.  A migration's ``to`` must name a
declared peer (the fake node declares :data:`PEER`): a positive migrate case names it, and is
sent for :data:`MIGRATABLE`, an instance that runs, so it reaches the node's ``migrate`` (a test
after the fuzzing checks that it did).  Two NICs with the same MAC, more than 64 queues over
all NICs, two disks with one id, two devices in one PCI slot (all in the schema's
descriptions): such bodies are rejected from *positive* cases
with Hypothesis' ``assume``, so its health checks see the filtering (none is suppressed but
``too_slow``: every case is a real HTTP request).
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import requests
import schemathesis
import trio
from hypothesis import HealthCheck, assume, settings

from supervisor._config import Config
from supervisor._eventlog import EventLog
from supervisor._hotplug import parse_size
from supervisor._migration import MigrationError
from supervisor._node import Conflict, NotFound
from supervisor._spec import MAX_TOTAL_QUEUES, DiskSpec, InstanceSpec, SpecError, generated_mac
from supervisor._state import State
from supervisor._storage import check_offer, parse_offers
from supervisor.api import create_app, openapi

TOKEN = "fuzz-token-0123456789abcdef"
#: the one peer the fake node declares: what a positive migrate case's ``to`` names
PEER = "fuzz-peer"
#: an instance every fake node starts with, running: what positive migrate cases migrate
MIGRATABLE = "fuzz-vm"


class FakeQmp:
    async def execute(self, cmd: str, args: dict | None = None, *, timeout: float | None = None) -> dict:
        assert cmd == "query-version", cmd
        return {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": ""}


class FakeDiskOps:
    """Disk hotplug on a node with every image: an add takes any disk (its slot the lowest free
    one), a change of a disk the instance lacks is 404, as the real one's (supervisor/_hotplug.py)."""

    def __init__(self, inst: "FakeInstance"):
        self.inst = inst

    def _disk(self, disk_id: str) -> DiskSpec:
        d = self.inst.spec.disk(disk_id)
        if d is None:
            raise NotFound(f"instance {self.inst.name!r} has no disk {disk_id!r}", "id")
        return d

    def _replace(self, disks: list[DiskSpec]) -> None:
        self.inst.spec = self.inst.spec.model_copy(update={"disks": disks})

    async def add(self, disk: DiskSpec) -> DiskSpec:
        await trio.lowlevel.checkpoint()
        if disk.pci_slot is None:
            disk = disk.model_copy(update={"pci_slot": self.inst.spec.free_slot()})
        return disk  # not kept: the next add may take the same id

    async def remove(self, disk_id: str) -> DiskSpec:
        d = self._disk(disk_id)
        self._replace([x for x in self.inst.spec.disks if x.id != disk_id])
        return d

    async def resize(self, disk_id: str, size: int) -> dict:
        self._disk(disk_id)
        return {"id": disk_id, "size": size, "previous": 512}

    async def set_limits(self, disk_id: str, limits) -> DiskSpec:
        d = self._disk(disk_id)
        return d.model_copy(update=limits.model_dump(exclude_unset=True))


class FakeNicOps:
    """NIC hotplug on a node with every bridge: an add takes any NIC (a generated MAC, the lowest
    free slot), a change of a NIC the instance lacks is 404, as the real one's (supervisor/_nicplug.py)."""

    def __init__(self, inst: "FakeInstance"):
        self.inst = inst

    def _nic(self, mac: str):
        n = next((x for x in self.inst.spec.resolved_nics() if x.mac == mac.lower()), None)
        if n is None:
            raise NotFound(f"instance {self.inst.name!r} has no NIC {mac!r}", "mac")
        return n

    async def add(self, nic, others=()):
        await trio.lowlevel.checkpoint()
        return nic.model_copy(update={"mac": nic.mac or "52:54:00:00:00:99",
                                      "pci_slot": nic.pci_slot or self.inst.spec.free_slot()})

    async def remove(self, mac: str):
        return self._nic(mac)

    async def change(self, mac: str, nic, others=()):
        old = self._nic(mac)
        return nic.model_copy(update={"mac": old.mac, "pci_slot": old.pci_slot})


class FakeInstance:
    def __init__(self, spec: InstanceSpec, state: State = State.RUNNING):
        self.spec = spec
        self.name = spec.name
        self.state = state
        self.created = time.time()
        self.incoming = False
        self.qmp = FakeQmp()
        self.disk_ops = FakeDiskOps(self)
        self.nic_ops = FakeNicOps(self)

    def qemu_identity(self) -> dict | None:  # the metrics ask (supervisor/api/_metrics.py): no QEMU here
        return None

    async def upgrade(self, qemu: str | None) -> dict:  # an upgrade in place that always works
        await trio.lowlevel.checkpoint()
        return {"old_pid": 4242, "pid": 4243, "qemu": qemu or "/usr/bin/qemu-system-x86_64", "mode": "live",
                "downtime_ms": 1.0, "migration_ms": 2.0, "total_ms": 3.0}

    def view(self) -> dict:
        live = not self.state.is_final
        return {
            "name": self.name, "state": self.state.value, "pid": 4242 if live else None,
            "runstate": "running" if live else "shutdown", "generation": "0" * 32,
            "exit_cause": None if live else "requested stop", "panic": None,
            "memory": self.spec.memory, "vcpus": self.spec.vcpus, "tags": list(self.spec.tags),
            "nics": [{"mac": n.mac, "mode": n.mode, "tap": f"qs{i}", "link": n.link, "ip": n.ip, "ip6": n.ip6,
                      "vlan": n.vlan if isinstance(n.vlan, int) else None,
                      "trunks": n.vlan if isinstance(n.vlan, list) else [], "queues": n.queues}
                     for i, n in enumerate(self.spec.resolved_nics())],
            "qmp_operator": f"/run/qsup/{self.name}/qmp-operator.sock",
            "console": f"/var/lib/qsup/logs/{self.name}.console",
            "created": self.created,
            "timings_ms": {"spawn": 1.0, "qmp_ready": 2.0, "netconf": 0.5, "cont": 0.3, "total": 3.8},
            "error": None,
            "migration": ({"direction": "in", "status": "setup", "uri": "tcp:127.0.0.1:1", "postcopy": False,
                           "activation": None} if self.incoming else None),
        }


class FakeNode:
    """The node's API-facing surface; every spec the parser accepts starts."""

    def __init__(self, events):
        # a real node config (every field the routes read, with its default), declaring one peer
        self.cfg = Config.model_validate({"node_name": "fuzz", "accel": "tcg", "peers": {
            PEER: {"api": "unix:/nonexistent/fuzz-peer.sock", "migration": "127.0.0.1"}}})
        self.events = events
        self.instances: dict[str, FakeInstance] = {}
        self.migrations = 0  # migrate calls that got through to the node
        self.reset()

    def reset(self) -> None:
        self.instances.clear()
        # no disk: a local disk would refuse a post-copy migrate (a rule of the node's disks)
        spec = InstanceSpec(name=MIGRATABLE, memory=64, kernel="/nonexistent/vmlinuz")
        self.instances[MIGRATABLE] = FakeInstance(spec)

    def list(self):
        return [self.instances[k] for k in sorted(self.instances)]

    def get(self, name: str) -> FakeInstance:
        inst = self.instances.get(name)
        if inst is None:
            raise NotFound(f"no instance named {name!r}")
        return inst

    def _claim(self, spec: InstanceSpec) -> FakeInstance:
        old = self.instances.get(spec.name)
        if old is not None and not old.state.is_final:
            raise Conflict(f"instance {spec.name!r} already exists ({old.state.value})")
        inst = self.instances[spec.name] = FakeInstance(spec)
        self.events.emit("instance.running", instance=spec.name)
        return inst

    async def start(self, spec: InstanceSpec) -> FakeInstance:
        await trio.lowlevel.checkpoint()
        return self._claim(spec)

    async def prepare_incoming(self, spec: InstanceSpec, *, postcopy: bool = False,
                               generation: str | None = None, source: str | None = None,
                               disks: object = None) -> str:
        # the source's disk offer, checked as the real node checks it (supervisor/_storage.py)
        check_offer(spec, parse_offers(disks if disks is not None else []), self.cfg.shared_image_dirs)
        inst = self._claim(spec)
        inst.state, inst.incoming = State.MIGRATING, True
        return "tcp:127.0.0.1:49152"

    async def recover_postcopy(self, name: str) -> int:
        inst = self.get(name)
        if not inst.incoming or inst.state.is_final:
            raise MigrationError(f"instance {name!r} has no paused post-copy migration", "name")
        return 49153

    def confirm_release(self, name: str):
        inst = self.get(name)
        if not inst.incoming or inst.state.is_final:
            raise MigrationError(f"instance {name!r} has no incoming migration pending", "name")
        return inst

    async def abort_incoming(self, name: str):
        inst = self.get(name)
        if not inst.incoming or inst.state.is_final:
            raise MigrationError(f"instance {name!r} has no incoming migration pending", "name")
        inst.state = State.FAILED
        return inst

    async def migrate(self, name: str, opts):
        inst = self.get(name)
        if inst.state.is_final or inst.incoming:
            raise MigrationError(f"instance {name!r} is {inst.state.value}", "name")
        assert opts.peer == PEER, opts
        self.migrations += 1
        self.events.emit("migration.started", instance=name, to=opts.shown_to)

    async def cancel_migration(self, name: str):
        self.get(name)
        raise MigrationError(f"instance {name!r} has no outgoing migration in progress", "name")

    async def stop(self, name: str, *, force: bool = False, timeout: float | None = None):
        inst = self.get(name)
        if not inst.state.is_final:
            inst.state = State.STOPPED
            self.events.emit("instance.stopped", instance=name)
        return inst

    def forget(self, name: str) -> None:
        inst = self.get(name)
        if not inst.state.is_final:
            raise Conflict(f"instance {name!r} is {inst.state.value}")
        del self.instances[name]
        self.events.emit("instance.deleted", instance=name)


class Server:
    """The app under hypercorn's trio worker on 127.0.0.1:<free port>, in a thread."""

    def __init__(self, token: str | None = None):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.token = token
        self._ready = threading.Event()
        self._stop: trio.CancelScope | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self._ready.wait(10) and self.error is None, self.error  # not serving: every request would hang

    def _run(self) -> None:
        from hypercorn.config import Config
        from hypercorn.trio import serve

        async def main():
            self.events = EventLog(None)
            self.node = FakeNode(self.events)
            self.app = create_app(self.node, self.events, token=self.token)
            cfg = Config()
            cfg.bind = [f"fd://{self.sock.detach()}"]
            cfg.accesslog = cfg.errorlog = None
            cfg.graceful_timeout = 0.5
            try:
                with trio.CancelScope() as self._stop:
                    self._token = trio.lowlevel.current_trio_token()
                    async with trio.open_nursery() as n:
                        await n.start(serve, self.app, cfg)
                        self._ready.set()
                        await trio.sleep_forever()
            finally:
                self.events.close()  # on the thread that opened it (sqlite)

        try:
            trio.run(main)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e
            self._ready.set()

    def close(self) -> None:
        if self._token is not None:
            self._token.run_sync_soon(self._stop.cancel)
        self.thread.join(10)


@pytest.fixture(scope="module")
def unix_doc_server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def tcp_doc_server():
    s = Server(token=TOKEN)
    yield s
    s.close()


def _beyond_the_schema(case) -> bool:
    """A body that breaks one of the rules JSON Schema cannot state (documented in it): two
    NICs with one MAC, more than MAX_TOTAL_QUEUES queues over all NICs, two disks with one id,
    two devices (NICs and disks) in one PCI slot, a resize to a size with units that is no
    positive multiple of 512."""
    body = case.body if isinstance(case.body, dict) else {}
    if case.path.endswith("/resize") and "size" in body:
        try:
            parse_size(body["size"])
        except SpecError:
            return True
        return False
    spec = body.get("spec") if case.path == "/v1/migrations/incoming" else body
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        return False
    nics = [n for n in spec.get("nics") or [] if isinstance(n, dict)]
    disks = [d for d in spec.get("disks") or [] if isinstance(d, dict)]
    macs = [(n.get("mac") or generated_mac(spec["name"], i)).lower() for i, n in enumerate(nics)]
    queues = sum(q for n in nics if isinstance(q := n.get("queues", 1), (int, float)))
    ids = [d.get("id") for d in disks]
    slots = [x["pci_slot"] for x in nics + disks if x.get("pci_slot") is not None]
    return (len(macs) != len(set(macs)) or queues > MAX_TOTAL_QUEUES or len(ids) != len(set(ids))
            or len(slots) != len(set(slots)))


def _positive(case) -> bool:
    return bool(case.meta and case.meta.generation.mode.is_positive)


def _prepare(case, *, stateful: bool = False) -> None:
    """What every case gets before it is sent; for a positive one, the rules the schema cannot
    say: ``to`` (and a prepare's ``source``) names the declared peer (and, unless a link chose the
    instance, the instance is one that runs), and a body beyond the schema is rejected with ``assume``."""
    if case.path == "/v1/events" and isinstance(case.query, dict) and \
            str(case.query.get("follow", "")).lower() in ("true", "1", "yes"):
        case.query["follow"] = "false"  # a followed stream never ends; following is tested elsewhere
    if not _positive(case):
        return
    if case.path.endswith("/migrate") and case.method.upper() == "POST" and isinstance(case.body, dict):
        case.body["to"] = PEER
        if not stateful:
            case.path_parameters["name"] = MIGRATABLE
    if case.path == "/v1/migrations/incoming" and isinstance(case.body, dict):
        if isinstance(case.body.get("source"), str):
            case.body["source"] = PEER
        # the source offers exactly the spec's disks (what the schema cannot say: it is the spec's)
        spec = case.body.get("spec")
        if isinstance(spec, dict):
            disks = spec.get("disks") or ([{"id": "disk0", "format": "qcow2" if spec["disk"].endswith(".qcow2")
                                            else "raw"}] if isinstance(spec.get("disk"), str) else [])
            case.body["disks"] = [{"id": d.get("id"), "format": d.get("format"), "size": 1 << 20, "shared": False}
                                  for d in disks if isinstance(d, dict)] if disks or "disks" in case.body else None
    assume(not _beyond_the_schema(case))


#: every health check but ``too_slow`` (each case is a real HTTP request): ``filter_too_much``
#: says when ``assume`` rejects too many
FUZZ = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

unix_schema = schemathesis.openapi.from_dict(openapi())
tcp_schema = schemathesis.openapi.from_dict(openapi(authenticated=True))


@unix_schema.parametrize()
@FUZZ
def test_unix_listener_all_default_checks(case, unix_doc_server):
    _prepare(case)
    case.call_and_validate(base_url=unix_doc_server.url, timeout=30)


@tcp_schema.parametrize()
@FUZZ
def test_tcp_listener_all_default_checks(case, tcp_doc_server):
    _prepare(case)
    case.call_and_validate(base_url=tcp_doc_server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)


def test_positive_migrate_cases_reached_the_node(unix_doc_server, tcp_doc_server):
    """The fuzzing above really migrated (202 from the node), on both listeners: positive
    migrate cases that never reached the node would leave the route untested."""
    assert unix_doc_server.node.migrations > 0 and tcp_doc_server.node.migrations > 0, \
        (unix_doc_server.node.migrations, tcp_doc_server.node.migrations)


def test_the_fuzzed_app_serves_the_fuzzed_document(unix_doc_server, tcp_doc_server):
    assert httpx.get(unix_doc_server.url + "/openapi.json").json() == openapi()
    r = httpx.get(tcp_doc_server.url + "/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.json() == openapi(authenticated=True)
    assert requests.get(tcp_doc_server.url + "/v1/instances").status_code == 401


def test_stateful_links_all_default_checks():
    """Sequences that follow the documented links (create -> show/stop/delete/migrate...): the
    checks that need a history (use_after_free, ensure_resource_availability) run here."""
    server = Server()
    try:
        schema = schemathesis.openapi.from_dict(openapi())
        Machine = schema.as_state_machine()

        class Run(Machine):
            def setup(self):
                server.node.reset()  # every run starts from the same node (reproducible)
                self.deleted: set[str] = set()

            def before_call(self, case):
                _prepare(case, stateful=True)

            def after_call(self, response, case):
                super().after_call(response, case)
                name = (case.path_parameters or {}).get("name")
                body = case.body if isinstance(case.body, dict) else {}
                spec = body.get("spec") if isinstance(body.get("spec"), dict) else body
                if name is None:  # a create or a prepare makes the name live again
                    name = spec.get("name")
                if 200 <= response.status_code < 300 and isinstance(name, str):
                    (self.deleted.add if case.method.upper() == "DELETE" else self.deleted.discard)(name)

            def validate_response(self, response, case, **kwargs):
                # schemathesis takes a DELETE to remove the paths below it only: an incoming deleted
                # as /v1/instances/{name} is gone from /v1/migrations/incoming/{name}/... as well, and
                # its 404 there is right (ensure_resource_availability would call the resource lost)
                if response.status_code == 404 and case.path.startswith("/v1/migrations/incoming/") and \
                        (case.path_parameters or {}).get("name") in self.deleted:
                    return
                super().validate_response(response, case, **kwargs)

            def call(self, case, **kwargs):
                return case.call(base_url=server.url, timeout=30, **kwargs)

        Run.run(settings=settings(max_examples=40, deadline=None, derandomize=True,
                                  suppress_health_check=[HealthCheck.too_slow], stateful_step_count=6))
        seen = {json.loads(line)["type"] for line in httpx.get(server.url + "/v1/events").text.splitlines()}
        # the links were followed: created instances were migrated, stopped and deleted by name
        assert {"instance.running", "migration.started", "instance.stopped", "instance.deleted"} <= seen, seen
    finally:
        server.close()
