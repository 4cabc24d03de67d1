"""Live migration, driven by QEMU's own MIGRATION events.

The rule this module exists for: **a guest's L3 (routes, rules, proxy
ARP/NDP) is never on two nodes at once**, and the hand-over costs no more
than QEMU's own downtime plus two netlink batches.  It holds by causality,
not timing (docs/ARCHITECTURE.md, "Switchover"):

Source (:class:`OutgoingMigration`)
    capabilities ``events`` + ``return-path`` (+ ``postcopy-ram``), then
    ``migrate``.  With the default :attr:`Switchover.STOP` the source
    releases its L3 when QEMU stops the guest for the switchover (the STOP
    event), QEMU never waits for it, and then the source *confirms* the
    release to the destination over the peer API.  (A QEMU whose migration
    corrupts guests is refused before anything starts: :func:`migration_refusal`.)  With
    :attr:`Switchover.PAUSE` (``pause-before-switchover``) the release happens
    while QEMU waits at ``pre-switchover``, then ``migrate-continue``, then
    the same confirmation.

Destination (:class:`IncomingMigration`)
    taps and L2 when QEMU starts (its self-announce is lost if the tap is
    not on its bridge yet), ``-incoming defer -S``, the ``events``
    capability.  On ``completed`` (``postcopy-active`` for post-copy) it
    waits for the source's confirmed release (usually there already: the
    source released at STOP, before the final RAM and device state were
    even sent), then L3, ``cont``, announcements.  QEMU 7.2 exits by itself
    when an incoming migration fails: that is an aborted incoming, not a
    crash.

How a migration talks to its instance: through :class:`InstancePort`, a
narrow typed interface (emit an event, apply/release L3, announce, spawn a
task in the instance's nursery, is a stop under way).  A migration never
moves the instance's state; whatever happens inside it ends in a definite
:class:`Outcome` that the instance then acts on.

Everything a peer answers is validated against a schema before use
(:class:`PrepareAnswer`, :class:`PeerView`): a bad answer is a failed
migration with a clear error, and the guest keeps running on the source.

Never probe the incoming port: a TCP connect can kill an incoming QEMU.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import httpx
import structlog
import trio
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic import Field as PydField

import netconf
import qmp_glue
from qmp_glue import JSONObject, QMPEvent

from . import _storage as storage
from ._errors import FieldError, describe, only_cancelled
from ._faults import Checkpoint
from ._migration_phases import (
    DestinationL3,
    SourceDisks,
    SourceL3,
    Stream,
    TargetDisks,
    destination_l3_phases,
    source_disks_phases,
    source_l3_phases,
    stream_phases,
    target_disks_phases,
)
from ._spec import parse_spec
from ._state import FINAL

if TYPE_CHECKING:
    from ._tls import MigrationKey, TlsFiles

log = structlog.get_logger("qsup.migration")

#: QMP announce-self parameters (ms): five RARPs, 50..550 ms apart.
ANNOUNCE = {"initial": 50, "max": 550, "rounds": 5, "step": 100}
PROGRESS_HZ = 4
#: QEMU's own defaults for ``max-bandwidth`` (bytes/s) and ``downtime-limit`` (ms)
QEMU_MAX_BANDWIDTH = 128 * 1024 * 1024
QEMU_DOWNTIME_LIMIT = 300
#: ``query-migrate`` statuses of a migration that has not ended (post-copy ones aside)
RUNNING_STATUSES = frozenset({"setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug"})
#: a peer's ``state`` of an instance that holds no live copy of the guest (the instance's final states)
FINAL_VIEW_STATES = frozenset(s.value for s in FINAL)
#: MIGRATION event statuses that end a migration on the source
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})


class MigrationError(FieldError, RuntimeError):
    """A migration was refused or failed; ``field`` is the request's (``to``, ``name``)."""

    field_in_text = False  # the messages stand alone; the API answers the field apart

    def __init__(self, message: str, field: str | None = None, *, status: int | None = None):
        super().__init__(message, field)
        #: the HTTP status a peer answered with, when it answered
        self.status = status


class Outcome(str, enum.Enum):
    """How a migration ended, for the instance to act on."""

    HANDED_OVER = "handed over"  # source: the destination runs the guest; quit here
    ROLLED_BACK = "rolled back"  # source: the guest stays here, L3 back, running as before
    POSTCOPY_LOST = "post-copy lost"  # source: the destination ran the guest; stale copy kept paused
    UNCONFIRMED = "unconfirmed"  # source: QEMU completed, the destination never took the release; kept paused
    ACTIVATED = "activated"  # destination: L3 applied, guest resumed
    PENDING = "pending"  # destination: nothing to do yet
    SOURCE_SILENT = "source silent"  # destination: completed, but the source never confirmed its release


class Switchover(str, enum.Enum):
    """Where the source lets go of the guest's L3 (docs/ARCHITECTURE.md, "Switchover").

    Either way the destination applies L3 only after the source confirmed the release.
    """

    #: at the source guest's STOP; QEMU never waits for qsup
    STOP = "stop"
    #: inside QEMU's ``pause-before-switchover``
    PAUSE = "pause"


#: The oldest QEMU a live migration may run from, per (accelerator, switchover mode).  QEMU
#: 7.2's TCG loses guest stores between the migration's dirty-bitmap syncs (fixed upstream by
#: 03bfc2188f in 9.0; docs/ARCHITECTURE.md, "Guest integrity"), which corrupts busy guests
#: whatever the switchover mode: integration/bench/migration_integrity.py measured it
#: (BENCHMARKS.md).  KVM keeps its own dirty log and is not affected.
MIGRATION_MIN_QEMU: dict[tuple[str, Switchover], tuple[int, int]] = {
    ("tcg", Switchover.STOP): (9, 0),
    ("tcg", Switchover.PAUSE): (9, 0),
}


def migration_refusal(mode: Switchover, accel: str, qemu_version: tuple[int, int] | None) -> str | None:
    """Why a migration from a QEMU of ``qemu_version`` under ``accel`` is refused, or None."""
    need = MIGRATION_MIN_QEMU.get((accel, mode))
    if need is None or qemu_version is None or qemu_version >= need:
        return None
    have = ".".join(map(str, qemu_version))
    return (f"live migration of a {accel} guest needs QEMU >= {need[0]}.{need[1]} (it runs QEMU {have}, "
            f"switchover {mode.value!r}): QEMU {have}'s TCG loses guest writes between dirty-bitmap syncs "
            "and corrupted busy guests in integration/bench/migration_integrity.py (BENCHMARKS.md); "
            "restart it on a newer QEMU (the node config's qemu)")


class InstancePort(Protocol):
    """What a migration may ask of its instance, and nothing more."""

    name: str
    generation: str

    @property
    def qmp(self) -> qmp_glue.QMPClient: ...

    @property
    def stop_requested(self) -> bool: ...

    def emit(self, type: str, **data) -> dict: ...

    def checkpoint(self, point: Checkpoint) -> None: ...

    def spec_json(self) -> dict: ...


    async def apply_l3(self, reason: netconf.Reason, *, inline: bool = False) -> float: ...

    async def release_l3(self) -> None: ...

    def persist(self) -> None: ...

    async def announce(self) -> None: ...

    def spawn(self, fn, *args) -> None: ...


@dataclass(frozen=True)
class QemuTls:
    """The source QEMU's side of a TLS migration stream: its key comes in the prepare answer
    (supervisor/_tls.py, ``MigrationKey``)."""

    creds_dir: Path  # written just before QEMU loads it, removed right after
    gid: int | None  # QEMU's gid: the creds dir is readable by it (and root) only


@dataclass(frozen=True)
class MigrateOptions:
    to: str  # the destination daemon: a unix socket path, or https://host:port
    postcopy: bool = False
    max_bandwidth: int | None = None  # bytes/s
    downtime_limit: int | None = None  # ms
    switchover: Switchover = Switchover.STOP
    token: str | None = None  # bearer token for an https:// destination (none when a client cert is used)
    #: the declared peer's name (``[peers]`` key): what its certificates must name
    peer: str | None = None
    #: where the source's QEMU connects; the port comes from the peer's prepare answer.
    #: The source builds the URI itself: a peer never supplies a scheme or an address.
    migration_host: str = "127.0.0.1"
    #: node-to-node HTTPS: our cert as client cert, the peer's checked against tls_ca and ``peer``
    api_tls: TlsFiles | None = None
    #: the migration stream over QEMU's TLS (the destination must answer ``tls: true``)
    qemu_tls: QemuTls | None = None
    #: cancel when no RAM moved for this long (a dead link stalls TCP, it doesn't fail it)
    stall_timeout: float = 15.0
    #: how long a broken post-copy stream (``postcopy-paused``) is retried before giving up
    postcopy_recover_timeout: float = 120.0
    #: how long the source keeps trying to confirm its L3 release to the destination (whose
    #: daemon may be restarting): the default ``incoming_timeout``, how long it waits for it
    confirm_timeout: float = 120.0
    #: the node's ``shared_image_dirs``: a disk beneath one is reopened by the destination,
    #: every other is local and copied (supervisor/_storage.py)
    shared_dirs: tuple[Path, ...] = ()
    #: how long the local disks' mirrors may take to be ready (in sync) before the RAM migration
    disks_ready_timeout: float = 600.0

    @property
    def shown_to(self) -> str:
        return self.peer or self.to


async def qemu_version(qmp: qmp_glue.QMPClient) -> tuple[int, int] | None:
    """(major, minor) of the QEMU behind ``qmp`` (``query-version``), None if it won't say."""
    try:
        q = (await query(qmp, "query-version")).get("qemu")
    except (qmp_glue.QMPError, qmp_glue.QMPConnectionLost, trio.TooSlowError):
        return None
    if not isinstance(q, dict) or not isinstance(q.get("major"), int) or not isinstance(q.get("minor"), int):
        return None
    return _number(q, "major", 0), _number(q, "minor", 0)


def peer_options(cfg, peer_name: str, *, name: str, qemu_pid: int | None, **kw) -> MigrateOptions:
    """The options for migrating ``name`` to the declared peer ``peer_name`` (KeyError if undeclared).

    Credentials go to declared peers only: to an ``https://`` peer the node's certificate, to a
    ``unix:`` peer nothing.
    """
    from ._tls import qemu_creds_dir, qemu_gid

    peer = cfg.peers[peer_name]
    tls = cfg.tls
    qemu_tls = None
    if tls is not None:
        qemu_tls = QemuTls(qemu_creds_dir(cfg.run_dir, name, "client"), qemu_gid(qemu_pid))
    return MigrateOptions(to=peer.target, peer=peer_name, migration_host=peer.migration_host,
                          api_tls=tls if peer.is_https else None, qemu_tls=qemu_tls,
                          shared_dirs=tuple(getattr(cfg, "shared_image_dirs", ())), **kw)


def recovery_options(cfg, to: str, postcopy: bool, switchover: object) -> MigrateOptions:
    """What a restarted daemon knows of an outgoing migration from its record.

    ``to`` is the declared peer's name when it still is one (then the release can be confirmed
    to it); a record written before switchover modes existed used the pause.
    """
    mode = Switchover(switchover) if switchover in {m.value for m in Switchover} else Switchover.PAUSE
    peers = getattr(cfg, "peers", None) or {}
    if to in peers:
        peer = peers[to]
        return MigrateOptions(to=peer.target, peer=to, migration_host=peer.migration_host, postcopy=postcopy,
                              switchover=mode, api_tls=cfg.tls if peer.is_https else None,
                              shared_dirs=tuple(getattr(cfg, "shared_image_dirs", ())))
    return MigrateOptions(to=to, postcopy=postcopy, switchover=mode,
                          shared_dirs=tuple(getattr(cfg, "shared_image_dirs", ())))


def free_port(address: str) -> int:
    """A free TCP port on ``address`` (bind to 0, read, close).

    The port is handed to ``migrate-incoming``; nothing ever connects to it
    to "check" it -- an incoming QEMU can die of such a probe.
    """
    fam = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def tcp_uri(address: str, port: int) -> str:
    return f"tcp:[{address}]:{port}" if ":" in address else f"tcp:{address}:{port}"


def parse_tcp_uri(uri: str) -> tuple[str, int]:
    """``tcp:ADDR:PORT`` (``tcp:[ADDR6]:PORT``) with a literal IP and a port in range, else ValueError.

    The only migration URI the source accepts from a peer: any other scheme
    (``exec:`` runs a command, ``unix:``/``fd:`` reach local files) is refused.
    """
    if not isinstance(uri, str) or not uri.startswith("tcp:") or not uri.isascii() or not uri.isprintable():
        raise ValueError("must be tcp:ADDRESS:PORT")
    host, sep, port = uri[4:].rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("must end in a port 1..65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ipaddress.ip_address(host).version != 6:
            raise ValueError("brackets are for IPv6 addresses")
    else:
        ipaddress.IPv4Address(host)
    return host, int(port)


class NbdAnswer(BaseModel):
    """Where the destination exports the local disks' targets: a port on the declared peer's
    migration address (the source builds the address itself), one export per local disk,
    named by its id (the source checks they are exactly its local disks)."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    port: int = PydField(ge=1, le=65535)
    exports: list[str] = PydField(max_length=8)


class PrepareAnswer(BaseModel):
    """The destination's answer to ``POST /v1/migrations/incoming``.

    Only a port and whether the stream is TLS: the source builds the URI itself from the
    declared peer's migration address (any ``uri`` in the answer is ignored).
    """

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    name: str
    port: int = PydField(ge=1, le=65535)
    tls: bool = False
    #: this migration's stream key (``tls``): 256 bits, hex
    psk: str | None = PydField(default=None, pattern=r"^[0-9a-f]{64}$")
    #: the local disks' NBD exports (only when the offer had local disks)
    nbd: NbdAnswer | None = None


class Activation(BaseModel):
    """The destination's activation figures (all optional; shown, never acted on)."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    qmp_ts: float | None = None
    release_waited_ms: float | None = None
    event_to_l3_ms: float | None = None
    event_to_cont_ms: float | None = None
    received_to_l3_ms: float | None = None
    received_to_cont_ms: float | None = None
    netconf_ms: float | None = None
    cont_ms: float | None = None
    event_to_resumed_ms: float | None = None


class PeerMigration(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    activation: Activation | None = None


class PeerView(BaseModel):
    """The part of the destination's ``GET /v1/instances/{name}`` the source reads."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    name: str
    state: str
    migration: PeerMigration | None = None


def _peer_answer(model: type[BaseModel], body: object, what: str):
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        raise MigrationError(f"destination sent an invalid {what}: {loc}: {err['msg']}", "to") from None


def check_exports(answer: PrepareAnswer, local: list[str]) -> None:
    """The answer's NBD exports are exactly this node's local disks (MigrationError naming ``to``)."""
    if not local:
        if answer.nbd is not None:
            raise MigrationError("destination sent NBD exports for a guest without local disks", "to")
        return
    if answer.nbd is None:
        raise MigrationError("destination sent no NBD exports for the local disks", "to")
    if sorted(answer.nbd.exports) != sorted(local) or len(set(answer.nbd.exports)) != len(local):
        shown = [e[:20] for e in answer.nbd.exports]
        raise MigrationError(f"destination exports {shown!r}, not the local disks {local!r}", "to")


class PeerClient:
    """Async client for another node's API (the destination daemon).

    ``to``: a unix socket path, or an ``https://`` URL.  Over https the node's own certificate
    is the client certificate (``tls``), and the peer's certificate must be signed by
    ``tls_ca`` and name ``server_name`` -- the declared peer -- whatever the URL's host is.
    """

    def __init__(self, to: str, token: str | None = None, timeout: float = 60.0, *,
                 tls: TlsFiles | None = None, server_name: str | None = None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._extensions: dict = {}
        if to.startswith("https://"):
            from ._tls import peer_context

            if tls is None or not server_name:
                raise MigrationError("an https peer needs the node's TLS files and the peer's name", "to")
            self._extensions = {"sni_hostname": server_name}
            self._client = httpx.AsyncClient(base_url=to.rstrip("/"), headers=headers, timeout=timeout,
                                             verify=peer_context(tls))
        elif to.startswith(("http://", "unix:")) or not to.startswith("/"):
            raise MigrationError(f"not a peer address: {to[:80]!r}", "to")
        else:
            self._client = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=to), base_url="http://qsup", headers=headers,
                timeout=timeout)

    async def _call(self, method: str, path: str, **kw) -> object:
        try:
            r = await self._client.request(method, path, extensions=self._extensions, **kw)
        except httpx.HTTPError as e:
            raise MigrationError(f"destination unreachable: {_why(e)}", "to") from None
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code >= 400:
            err = body if isinstance(body, dict) else {}
            said, named = err.get("error"), err.get("field")
            message = said if isinstance(said, str) else r.text[:200]
            field_ = named if isinstance(named, str) else None
            raise MigrationError(f"destination refused ({r.status_code}): {message[:500]}", field_,
                                 status=r.status_code)
        return body

    async def prepare(self, name: str, spec: dict, postcopy: bool, generation: str,
                      disks: list[dict[str, object]] | None = None) -> object:
        """Ask the destination to prepare; its answer, unchecked (:meth:`prepared`): a 2xx means
        it may have prepared *something*, which is then owed an abort if the answer is bad.
        ``disks``: what this node holds of each disk (supervisor/_storage.py, ``DiskOffer``)."""
        body: dict[str, object] = {"spec": spec, "postcopy": postcopy, "generation": generation}
        if disks:
            body["disks"] = disks
        return await self._call("POST", "/v1/migrations/incoming", json=body)

    @staticmethod
    def prepared(name: str, body: object) -> PrepareAnswer:
        """The destination's prepare answer, validated (MigrationError naming ``to`` if bad)."""
        answer = _peer_answer(PrepareAnswer, body, "prepare answer")
        if answer.name != name:
            raise MigrationError(f"destination prepared {answer.name[:80]!r}, not {name!r}", "to")
        return answer

    async def abort(self, name: str) -> str:
        """Tear the destination's pending incoming down: ``aborted``, ``gone`` (404),
        ``refused`` (409: no longer a pending incoming -- it activated, or is ending; look
        before resuming a copy here) or ``unreachable``."""
        try:
            await self._call("POST", f"/v1/migrations/incoming/{name}/abort")
        except MigrationError as e:
            log.info("destination abort", result=str(e))
            return {404: "gone", 409: "refused"}.get(e.status or 0, "unreachable")
        return "aborted"

    async def recover_postcopy(self, name: str) -> int:
        """Ask the destination to listen again for a broken post-copy stream; the port it listens on."""
        body = await self._call("POST", f"/v1/migrations/incoming/{name}/recover")
        answer = _peer_answer(PrepareAnswer, body, "recover answer")
        if answer.name != name:
            raise MigrationError(f"destination recovered {answer.name[:80]!r}, not {name!r}", "to")
        return answer.port

    async def confirm_release(self, name: str) -> None:
        """Tell the destination that this node no longer holds the guest's L3 (it may activate)."""
        await self._call("POST", f"/v1/migrations/incoming/{name}/released")

    async def show(self, name: str) -> PeerView:
        view = _peer_answer(PeerView, await self._call("GET", f"/v1/instances/{name}"), "instance view")
        if view.name != name:
            raise MigrationError(f"destination showed {view.name[:80]!r}, not {name!r}", "to")
        return view

    async def aclose(self) -> None:
        await self._client.aclose()


def _why(first: BaseException) -> str:
    """The first non-empty message down the cause chain (httpx wraps e.g. an SSL error silently)."""
    seen = 0
    e: BaseException | None = first
    while e is not None and seen < 8:
        if str(e):
            return f"{type(e).__name__}: {str(e)[:300]}" if seen else str(e)[:300]
        e = e.__cause__ or e.__context__
        seen += 1
    return "connection failed"


def qmp_timestamp(ev: QMPEvent) -> float:
    ts = ev["timestamp"]
    seconds, micros = ts.get("seconds", 0), ts.get("microseconds", 0)
    return (seconds if isinstance(seconds, int | float) else 0) + \
        (micros if isinstance(micros, int | float) else 0) / 1e6


async def query(qmp: qmp_glue.QMPClient, cmd: str, timeout: float = 5) -> JSONObject:
    """A QMP query whose answer is a JSON object (``query-migrate``, ``query-status``)."""
    answer = await qmp.execute(cmd, timeout=timeout)
    if not isinstance(answer, dict):
        raise qmp_glue.QMPError("GenericError", f"answered {type(answer).__name__}, not an object", cmd)
    return answer


def _number(obj: JSONObject, key: str, default: int) -> int:
    v = obj.get(key)
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else default


@dataclass
class Progress:
    status: str = "setup"
    transferred: int = 0
    remaining: int = 0
    total: int = 0
    mbps: float = 0.0
    downtime_ms: int | None = None
    total_time_ms: int | None = None
    updated: float = field(default_factory=time.time)

    def update(self, info: JSONObject) -> None:
        ram = info.get("ram")
        ram = ram if isinstance(ram, dict) else {}
        status = info.get("status")
        self.status = status if isinstance(status, str) else self.status
        self.transferred = _number(ram, "transferred", self.transferred)
        self.remaining = _number(ram, "remaining", self.remaining)
        self.total = _number(ram, "total", self.total)
        mbps = ram.get("mbps")
        self.mbps = float(mbps) if isinstance(mbps, int | float) else self.mbps
        if isinstance(info.get("downtime"), int):
            self.downtime_ms = _number(info, "downtime", 0)
        if isinstance(info.get("total-time"), int):
            self.total_time_ms = _number(info, "total-time", 0)
        self.updated = time.time()


async def wait_qemu_migration_end(qmp: qmp_glue.QMPClient, interval: float) -> str:
    """Poll ``query-migrate`` while a migration runs (post-copy included); its end status.

    ``lost`` when QEMU went away (its exit path cleans up).
    """
    while True:
        try:
            status = str((await query(qmp, "query-migrate")).get("status", "none"))
        except (qmp_glue.QMPError, qmp_glue.QMPConnectionLost, trio.TooSlowError):
            return "lost"
        if status not in RUNNING_STATUSES and not status.startswith("postcopy-"):
            return status
        await trio.sleep(interval)


class OutgoingMigration:
    """The source side.  :meth:`run` (or :meth:`recover`) returns its :class:`Outcome`.

    Its progress is two phase machines (supervisor/_migration_phases.py): ``stream`` (how far
    QEMU's stream got) and ``l3`` (the guest's L3 here: held, releasing, gone, confirmed).
    """

    direction = "out"

    def __init__(self, port: InstancePort, opts: MigrateOptions, *, was_running: bool = True):
        self.port = port
        self.opts = opts
        self.was_running = was_running
        self.progress = Progress()
        self.status = "setup"  # QEMU's own word for its migration (query-migrate / MIGRATION)
        self.result: str | None = None  # completed | failed | cancelled | postcopy-paused
        self.error: str | None = None
        self.stream = stream_phases()
        self.l3 = source_l3_phases()
        self._peer: PeerClient | None = None
        self.t0 = time.time()
        self.activation: Activation | None = None
        self.total_ms: float | None = None
        self.stop_ts: float | None = None  # QMP timestamp of the source guest's STOP
        self.done = trio.Event()
        self._events_send, self._events_recv = trio.open_memory_channel[QMPEvent](math.inf)
        #: the ids of the local disks (copied over NBD), from the offer made to the destination
        self.local: list[str] = []
        self.disks = source_disks_phases()
        self.mirrors = storage.MirrorStatus()

    @property
    def postcopy(self) -> bool:
        return self.opts.postcopy

    @property
    def reached_postcopy(self) -> bool:
        """The destination has run the guest: this copy may be stale; never resume it."""
        return self.stream.is_(Stream.POSTCOPY, Stream.RECOVERING)

    def view(self) -> dict[str, object]:
        p = self.progress
        activation = self.activation.model_dump() if self.activation else None
        return {"direction": "out", "to": self.opts.shown_to, "status": self.status, "result": self.result,
                "error": self.error, "postcopy": self.opts.postcopy, "l3_released": not self.l3.is_(SourceL3.HELD),
                "l3": self.l3.now.value, "stream": self.stream.now.value,
                "switchover": self.opts.switchover.value, "release_confirmed": self.l3.is_(SourceL3.CONFIRMED),
                "transferred": p.transferred, "remaining": p.remaining, "total": p.total, "mbps": p.mbps,
                "downtime_ms": p.downtime_ms, "total_time_ms": p.total_time_ms, "total_ms": self.total_ms,
                "switchover_ms": self.switchover_ms(), "activation": activation,
                "disks": {"phase": self.disks.now.value, "local": self.local, **self.mirrors.view()}}

    def record(self) -> dict[str, object]:
        return {"direction": "out", "postcopy": self.opts.postcopy, "to": self.opts.shown_to,
                "was_running": self.was_running, "switchover": self.opts.switchover.value, "local": self.local}

    def on_event(self, ev: QMPEvent) -> None:
        """The instance's event task hands every MIGRATION event over, in order."""
        self._events_send.send_nowait(ev)

    def on_stop(self, qmp_ts: float) -> None:
        """The instance's event task hands the source guest's STOP over, in order with MIGRATION events."""
        self.stop_ts = self.stop_ts or qmp_ts
        self._events_send.send_nowait({"event": "STOP", "data": {}, "timestamp": {
            "seconds": int(qmp_ts), "microseconds": int(qmp_ts % 1 * 1e6)}})

    def switchover_ms(self) -> float | None:
        """QEMU's own clocks: source guest STOP -> destination ``completed``.

        QEMU's ``downtime`` ends when the source has sent everything; the
        destination still loads the device state before ``completed``.
        This is the window in which no node may hold the guest's L3.
        """
        if not self.activation or self.activation.qmp_ts is None or not self.stop_ts:
            return None
        return round((self.activation.qmp_ts - self.stop_ts) * 1000, 3)

    # -- the run ---------------------------------------------------------
    async def run(self) -> Outcome:
        peer: PeerClient | None = None
        try:
            try:
                self.port.emit("migration.started", to=self.opts.shown_to, postcopy=self.opts.postcopy,
                               tls=self.opts.qemu_tls is not None, switchover=self.opts.switchover.value)
                peer = self._peer = PeerClient(self.opts.to, self.opts.token, tls=self.opts.api_tls,
                                               server_name=self.opts.peer)
                self.port.checkpoint(Checkpoint.PREPARE)
                spec = self.port.spec_json()
                offered = await storage.offers(self.port.qmp, parse_spec(spec), self.opts.shared_dirs) \
                    if spec.get("disks") else []
                self.local = [str(o["id"]) for o in offered if not o["shared"]]
                if self.local:
                    self.disks = source_disks_phases(local=True)
                body = await peer.prepare(self.port.name, spec, self.opts.postcopy, self.port.generation,
                                          **({"disks": offered} if offered else {}))
                self.stream.move(Stream.PREPARED)  # it answered 2xx: from here on it is owed an abort
                answer = peer.prepared(self.port.name, body)
                if answer.tls != (self.opts.qemu_tls is not None):
                    raise MigrationError(
                        "the destination's migration stream is " + ("TLS" if answer.tls else "plain") +
                        ", this node's is " + ("TLS" if self.opts.qemu_tls else "plain") +
                        " (set tls_ca/tls_cert/tls_key on both or neither)", "to")
                if answer.tls and answer.psk is None:
                    raise MigrationError("the destination sent no key for the TLS migration stream", "to")
                check_exports(answer, self.local)
                await self._start_qemu(tcp_uri(self.opts.migration_host, answer.port), answer.psk,
                                       answer.nbd.port if answer.nbd else None)
                async with trio.open_nursery() as n:
                    n.start_soon(self._poll_progress)
                    await self._follow()
                    n.cancel_scope.cancel()
            except BaseException as e:
                if only_cancelled(e):
                    if not self.stream.is_(Stream.NEW) and peer is not None and self.port.stop_requested:
                        # The instance is ending under us (its QEMU died, a forced stop): the
                        # destination must not wait for a confirmation that will never come.
                        with trio.CancelScope(shield=True), trio.move_on_after(5):
                            await peer.abort(self.port.name)
                    raise  # else the daemon is leaving: a restarted one recovers from the record
                self.error = self.error or describe(e)
                log.warning("migration failed", error=self.error)
            with trio.CancelScope(shield=True):
                outcome = await self._conclude(peer, prepared=not self.stream.is_(Stream.NEW))
            return outcome
        finally:
            with trio.CancelScope(shield=True):
                if peer is not None:
                    await peer.aclose()
            self.done.set()

    async def _start_qemu(self, uri: str, psk: str | None, nbd_port: int | None = None) -> None:
        qmp = self.port.qmp
        # return-path: without it the source reports ``completed`` as soon as the last
        # bytes are in its socket buffer -- even when the destination just died -- and
        # would quit the only copy of the guest.  With it, ``completed`` waits for the
        # destination's "loaded" reply, and a dead destination is ``failed``.
        caps: list[dict[str, str | bool]] = [
                {"capability": "events", "state": True},
                # local disks: their mirrors end at pre-switchover, whatever the switchover mode
                {"capability": "pause-before-switchover",
                 "state": self.opts.switchover is Switchover.PAUSE or bool(self.local)},
                {"capability": "return-path", "state": True},
                {"capability": "postcopy-ram", "state": self.opts.postcopy}]
        self.port.checkpoint(Checkpoint.CAPABILITIES)
        await qmp.execute("migrate-set-capabilities", {"capabilities": caps})
        # Always both: QEMU keeps migration parameters for its whole life, so a migration
        # asked for without a limit must not run at the limit of an earlier one.
        params = {"max-bandwidth": self.opts.max_bandwidth or QEMU_MAX_BANDWIDTH,
                  "downtime-limit": self.opts.downtime_limit or QEMU_DOWNTIME_LIMIT}
        await qmp.execute("migrate-set-parameters", params)
        tls = self.opts.qemu_tls
        creds = None
        if tls is not None and psk is not None:
            from ._tls import MigrationKey, setup_qemu_tls

            creds = await setup_qemu_tls(qmp, MigrationKey(psk), tls.creds_dir, endpoint="client", gid=tls.gid)
        if self.local:
            assert nbd_port is not None
            await self._copy_disks(nbd_port, creds)
        self.port.checkpoint(Checkpoint.MIGRATE)
        self.stream.move(Stream.SENT)
        await qmp.execute("migrate", {"uri": uri})
        self.port.emit("migration.uri", uri=uri)

    async def _follow(self) -> None:
        """React to MIGRATION events (and the guest's STOP) until a final one; the events alone decide state."""
        qmp = self.port.qmp
        async for ev in self._events_recv:
            if ev["event"] == "STOP":
                # QEMU stopped the guest to switch over (or for post-copy): from here on it runs
                # nowhere until the destination's ``cont``.  Under PAUSE the release waits for
                # ``pre-switchover`` instead.
                if self.opts.switchover is Switchover.STOP and self.stream.is_(Stream.SENT) \
                        and self.l3.is_(SourceL3.HELD):
                    await self._release(qmp_timestamp(ev))
                    await self._confirm_release(within=2)  # the rest of the window after the end
                continue
            status = str(ev["data"].get("status", ""))
            self.status = status
            if status == "postcopy-active" and self.stream.is_(Stream.SENT, Stream.RECOVERING):
                self.stream.move(Stream.POSTCOPY)
            if status == "active" and self.opts.postcopy and self.stream.is_(Stream.SENT):
                await qmp.execute("migrate-start-postcopy")  # QEMU says ``active`` once per migration
            elif status == "pre-switchover":
                if self.l3.is_(SourceL3.HELD):
                    await self._release(qmp_timestamp(ev))
                if self.disks.is_(SourceDisks.SYNCED):  # the guest is paused: the mirrors are in sync
                    await self._detach_disks()
                self.port.checkpoint(Checkpoint.CONTINUE)
                await qmp.execute("migrate-continue", {"state": "pre-switchover"})
                await self._confirm_release(within=2)
            elif status == "postcopy-paused" and await self._recover_postcopy():
                continue  # QEMU's next events: postcopy-recover, postcopy-active, completed
            elif status in FINAL_STATUSES or status == "postcopy-paused":
                if status.startswith("postcopy-") and self.stream.is_(Stream.SENT):
                    self.stream.move(Stream.POSTCOPY)
                self.result = status
                return

    async def _recover_postcopy(self) -> bool:
        """The post-copy stream broke: the guest runs on the destination, which needs pages
        only this node has.  Resume the stream (``migrate-recover`` there, ``migrate resume``
        here) until it is back or ``postcopy_recover_timeout`` passes; never resume the guest
        here.  False: give up (the outcome is then ``post-copy lost``)."""
        budget = self.opts.postcopy_recover_timeout
        if self._peer is None or budget <= 0 or not self.stream.is_(Stream.POSTCOPY):
            return False
        self.stream.move(Stream.RECOVERING)
        qmp = self.port.qmp
        self.port.emit("migration.postcopy_recovering", within_s=budget)
        attempts = 0
        with trio.move_on_after(budget):
            while True:
                attempts += 1
                try:
                    if await self._resume_postcopy(qmp):
                        self.stream.move(Stream.POSTCOPY)
                        self.port.emit("migration.postcopy_recovered", attempts=attempts)
                        return True
                except (MigrationError, qmp_glue.QMPError, trio.TooSlowError) as e:
                    log.info("post-copy recovery attempt", attempt=attempts, error=describe(e))
                    if await self._destination_gone(self._peer):
                        break  # nothing left there to resume: the outcome is post-copy lost
                await trio.sleep(1)
        self.error = f"post-copy stream broke and could not be resumed within {budget:g}s ({attempts} attempts)"
        self.port.emit("migration.postcopy_recovery_failed", attempts=attempts, error=self.error)
        return False

    async def _resume_postcopy(self, qmp: qmp_glue.QMPClient) -> bool:
        """One attempt: the destination listens again, this QEMU reconnects; True once the
        stream runs again (``postcopy-active``, or already ``completed``).  An attempt still
        connecting after 10 s (``postcopy-recover-setup``: the link may still be down) is
        paused again for the next one."""
        assert self._peer is not None
        port = await self._peer.recover_postcopy(self.port.name)
        await qmp.execute("migrate", {"uri": tcp_uri(self.opts.migration_host, port), "resume": True})
        with trio.move_on_after(10):
            while True:
                status = (await query(qmp, "query-migrate")).get("status")
                if status in ("postcopy-active", "completed"):
                    return True
                if status == "postcopy-paused":
                    return False  # this attempt failed at once
                await trio.sleep(0.1)
        try:
            await qmp.execute("migrate-pause", timeout=5)
        except qmp_glue.QMPError as e:
            log.info("post-copy recovery: migrate-pause", error=str(e))
        return False

    async def _copy_disks(self, port: int, creds: str | None) -> None:
        """The local disks to the destination's NBD exports: a client node and a mirror
        (``sync: full``, ``write-blocking``) per disk, then wait until every one is ready.
        Progress in the view (``disks``) and as ``migration.disks`` events; a mirror that fails,
        stops moving for ``stall_timeout`` or is not ready within ``disks_ready_timeout`` fails
        the migration (the caller's failure path abandons them)."""
        qmp = self.port.qmp
        t0 = time.perf_counter()
        self.disks.move(SourceDisks.COPYING)
        self.port.emit("migration.disks", phase="copying", local=self.local)
        added: list[str] = []
        await storage.start_mirrors(qmp, self.local, self.opts.migration_host, port, creds, added, [])
        last, since, shown = -1, time.monotonic(), 0.0
        with trio.fail_after(self.opts.disks_ready_timeout):
            while True:
                self.mirrors = await storage.mirror_status(qmp, self.local)
                if self.mirrors.failed:
                    raise MigrationError(self.mirrors.failed, "to")
                if self.mirrors.ready:
                    break
                now = time.monotonic()
                if self.mirrors.done != last:
                    last, since = self.mirrors.done, now
                elif now - since > self.opts.stall_timeout:
                    raise MigrationError(f"the disk copy made no progress for {self.opts.stall_timeout:.0f}s", "to")
                if now - shown >= 1:
                    shown = now
                    self.port.emit("migration.disks", phase="copying", **self.mirrors.view())
                await trio.sleep(0.02)
        self.disks.move(SourceDisks.SYNCED)
        self.port.emit("migration.disks", phase="synced", ms=round((time.perf_counter() - t0) * 1000, 1),
                       **self.mirrors.view())

    async def _detach_disks(self) -> None:
        """At ``pre-switchover``: end the mirrors without pivot (the source image stays the guest's)
        and remove the NBD client nodes, before QEMU sends the final state."""
        t = time.perf_counter()
        self.mirrors = await storage.mirror_status(self.port.qmp, self.local)
        if self.mirrors.failed or not self.mirrors.ready:
            raise MigrationError(self.mirrors.failed or "a disk mirror left sync before the switchover", "to")
        await storage.finish_mirrors(self.port.qmp, self.local)
        self.disks.move(SourceDisks.DETACHED)
        self.port.emit("migration.disks", phase="detached", ms=round((time.perf_counter() - t) * 1000, 3),
                       **self.mirrors.view())

    async def _abandon_disks(self) -> None:
        """A failure while the disks were being copied: no job, no NBD node left; the guest keeps
        its source images (a mirror never pivots)."""
        if not self.disks.is_(SourceDisks.PENDING, SourceDisks.COPYING, SourceDisks.SYNCED):
            return
        left = await storage.abandon_mirrors(self.port.qmp, self.local)
        self.disks.move(SourceDisks.ABANDONED)
        self.port.emit("migration.disks", phase="abandoned", left=left)

    async def _release(self, qmp_ts: float | None) -> None:
        """Undo the journal's activate entries; RELEASING first: a half-done release is put back."""
        t = time.perf_counter()
        self.l3.move(SourceL3.RELEASING)
        self.port.checkpoint(Checkpoint.RELEASE)
        await self.port.release_l3()
        self.l3.move(SourceL3.GONE)
        self.port.emit("migration.switchover", mode=self.opts.switchover.value,
                       l3_released_ms=round((time.perf_counter() - t) * 1000, 3), qmp_ts=qmp_ts)

    async def _confirm_release(self, within: float | None = None) -> bool:
        """Tell the destination our L3 is gone, retrying until it answers or ``within`` s pass.

        The destination activates only after this: it waits at ``completed``
        for it.  A 409 is final: that destination will not take the guest.
        """
        if not self.l3.is_(SourceL3.GONE) or self._peer is None:
            return self.l3.is_(SourceL3.CONFIRMED)
        self.port.checkpoint(Checkpoint.CONFIRM)
        t = time.perf_counter()
        with trio.move_on_after(self.opts.confirm_timeout if within is None else within):
            while True:
                try:
                    await self._peer.confirm_release(self.port.name)
                    self.l3.move(SourceL3.CONFIRMED)
                    break
                except MigrationError as e:
                    # 409: it is no longer a pending incoming (it gave up, or is ending): final.
                    # Anything else (unreachable, 404 while a restarting daemon reattaches): retry.
                    if e.status == 409:
                        self.error = self.error or f"the destination refused the release: {e}"
                        break
                    log.info("release confirmation", error=str(e))
                await trio.sleep(0.2)
        confirmed = self.l3.is_(SourceL3.CONFIRMED)
        self.port.emit("migration.release_confirmed", ok=confirmed, ms=round((time.perf_counter() - t) * 1000, 3))
        return confirmed

    async def _poll_progress(self) -> None:
        """``query-migrate`` at <= 4 Hz for the progress view, and stall detection.

        Progress only; the events alone decide state.  A link that goes down
        stalls the TCP stream without failing it, so if nothing moves for
        ``stall_timeout`` the migration is cancelled (and then rolled back
        like any other).  Never in post-copy: the destination already runs
        the guest, and a cancel would resume a stale copy here.
        """
        last, since = -1, time.monotonic()
        while True:
            try:
                self.progress.update(await query(self.port.qmp, "query-migrate"))
            except (qmp_glue.QMPError, qmp_glue.QMPConnectionLost, trio.TooSlowError):
                return
            now = time.monotonic()
            if self.progress.transferred != last or self.status in ("pre-switchover", "device"):
                last, since = self.progress.transferred, now
            elif now - since > self.opts.stall_timeout and not self.status.startswith("postcopy"):
                self.error = f"no progress for {self.opts.stall_timeout:.0f}s; cancelled"
                self.port.emit("migration.stalled", after_s=self.opts.stall_timeout)
                await self.cancel()
                return
            await trio.sleep(1 / PROGRESS_HZ)

    async def _end_in_qemu(self) -> None:
        """Our side failed while QEMU may still migrate: make QEMU's migration end, and learn how.

        In ``pre-switchover`` QEMU waits for us forever; elsewhere it would
        go on.  A cancel in ``device`` can lose the race to ``completed``:
        then the guest is the destination's, and the result says so.
        """
        qmp = self.port.qmp
        try:
            status = str((await query(qmp, "query-migrate")).get("status", "none"))
            if status.startswith("postcopy-"):
                if self.stream.is_(Stream.SENT):
                    self.stream.move(Stream.POSTCOPY)
                self.result = await wait_qemu_migration_end(qmp, 0.2)
                return
            if status in RUNNING_STATUSES:
                await qmp.execute("migrate_cancel", timeout=5)
                with trio.move_on_after(30):
                    status = await wait_qemu_migration_end(qmp, 0.02)
            self.result = "completed" if status == "completed" else "failed"
        except (qmp_glue.QMPError, qmp_glue.QMPConnectionLost, trio.TooSlowError) as e:
            self.error = self.error or describe(e)
            self.result = "failed"

    async def _conclude(self, peer: PeerClient | None, *, prepared: bool) -> Outcome:
        """QEMU's migration is over (or ours failed): decide the one outcome, and leave the
        destination told.  Every path ends the stream phase."""
        try:
            await self._abandon_disks()  # first: a mirror must not outlive the migration
            return await self._decide(peer, prepared)
        finally:
            self.stream.move(Stream.ENDED)
            if self.opts.qemu_tls is not None:  # QEMU forgets this migration's key, whatever the outcome
                from ._tls import drop_qemu_tls

                await drop_qemu_tls(self.port.qmp, "client")

    async def _decide(self, peer: PeerClient | None, prepared: bool) -> Outcome:
        port = self.port
        self.total_ms = round((time.time() - self.t0) * 1000, 1)
        if self.result is None and self.stream.is_(Stream.SENT, Stream.POSTCOPY, Stream.RECOVERING):
            await self._end_in_qemu()
        if self.result == "completed" or self.reached_postcopy:
            if self.l3.is_(SourceL3.HELD, SourceL3.RELEASING):  # no switchover step, or it failed: (re)try
                await self._release_after_completion()
            await self._confirm_release()
        if self.result == "completed" and not self.l3.is_(SourceL3.CONFIRMED) and peer is not None:
            # The destination never activates without our word (the release failed, or it could
            # not be told): call it off and keep the guest here, where QEMU can resume it.
            called_off = await peer.abort(port.name) if prepared else "unreachable"
            if called_off in ("aborted", "gone") or await self._destination_gone(peer):
                self.error = self.error or "the L3 release was never confirmed to the destination"
                self.result = "failed"
                return await self._rolled_back()
            self.error = self.error or "the destination never acknowledged the L3 release"
            port.emit("migration.unconfirmed", error=self.error)
            return Outcome.UNCONFIRMED
        if self.result == "completed":
            if not await self._destination_took_it(peer):
                self.error = self.error or "the destination ended before it ran the guest"
                self.result = "failed"
                return await self._rolled_back()
            await self._summarise()
            return Outcome.HANDED_OVER
        if self.reached_postcopy:
            # The destination has been running the guest: this copy is stale.
            # Resuming it would put the guest on two nodes; keep it paused for
            # an operator (QEMU can still serve pages / be recovered).
            self.error = self.error or f"post-copy ended {self.status}"
            port.emit("migration.postcopy_lost", status=self.status, error=self.error)
            return Outcome.POSTCOPY_LOST
        self.result = self.result or "failed"
        if self.error is None:  # QEMU's own words (e.g. a TLS handshake that failed)
            try:
                said = (await query(port.qmp, "query-migrate")).get("error-desc")
                self.error = said if isinstance(said, str) else None
            except (qmp_glue.QMPError, qmp_glue.QMPConnectionLost, trio.TooSlowError):
                pass
        if prepared and peer is not None:
            with trio.move_on_after(15):
                if await peer.abort(port.name) == "refused" and await self._destination_runs(peer):
                    # It took the guest (QEMU here said failed, e.g. the return path broke
                    # after the destination loaded everything): never resume a second copy.
                    port.emit("migration.handed_over_after_failure", result=self.result, error=self.error)
                    self.result = "completed"
                    return Outcome.HANDED_OVER
        return await self._rolled_back()

    async def _rolled_back(self) -> Outcome:
        released = not self.l3.is_(SourceL3.HELD)
        await self._roll_back()
        self.port.emit("migration.failed", result=self.result, error=self.error, l3_was_released=released)
        return Outcome.ROLLED_BACK

    async def _destination_gone(self, peer: PeerClient) -> bool:
        """The destination says it has no live copy of the guest (404, or a final state)."""
        try:
            view = await peer.show(self.port.name)
        except MigrationError as e:
            return e.status == 404
        return view.state in FINAL_VIEW_STATES

    async def _destination_runs(self, peer: PeerClient) -> bool:
        try:
            view = await peer.show(self.port.name)
        except MigrationError:
            return False
        return view.state in ("running", "paused")

    async def _release_after_completion(self) -> None:
        self.l3.move(SourceL3.RELEASING)  # from HELD, or again: a retry of a release that failed half-way
        try:
            await self.port.release_l3()
            self.l3.move(SourceL3.GONE)
        except netconf.NetconfError as e:
            self.port.emit("netconf.undo_failed", reason="migrate-out", error=str(e), failures=e.failures)

    async def _roll_back(self) -> None:
        """The guest stays here: L3 back (all of it, if the release failed half-way), running as before."""
        port = self.port
        if not self.l3.is_(SourceL3.HELD):
            try:
                await port.apply_l3("rollback")
                self.l3.move(SourceL3.HELD)
            except netconf.NetconfError as e:
                port.emit("netconf.failed", reason="rollback", error=str(e), failures=e.failures)
        try:
            status = await query(port.qmp, "query-status")
            if self.was_running and not status.get("running"):
                await port.qmp.execute("cont", timeout=5)
        except (qmp_glue.QMPError, qmp_glue.QMPConnectionLost, trio.TooSlowError) as e:
            log.error("could not resume after failed migration", error=str(e))

    async def _destination_took_it(self, peer: PeerClient | None) -> bool:
        """After ``completed``: wait (briefly) for the destination's activation; False if it ended without.

        The destination activates on its own ``completed`` event, at about the same moment as
        ours.  If it ends instead (its QEMU died, a stop, a fault) before ``cont``, it never ran
        the guest and this postmigrate copy is the only current one.  Unreachable: assume it
        took it, as QEMU says (it cannot resume a second copy without our word either).
        """
        if peer is None:
            return True
        with trio.move_on_after(10):
            while True:
                try:
                    view = await peer.show(self.port.name)
                except MigrationError as e:
                    log.info("destination view", error=str(e))
                    return e.status != 404
                self.activation = view.migration.activation if view.migration else None
                if self.activation:
                    return True
                if view.state in FINAL_VIEW_STATES:
                    return False
                if view.state != "migrating":
                    return True
                await trio.sleep(0.02)
        return True

    async def _summarise(self) -> None:
        port = self.port
        try:
            self.progress.update(await query(port.qmp, "query-migrate"))
        except (qmp_glue.QMPError, qmp_glue.QMPConnectionLost, trio.TooSlowError):
            pass  # the summary is best effort
        port.emit("migration.completed", total_ms=self.total_ms, downtime_ms=self.progress.downtime_ms,
                  switchover_ms=self.switchover_ms(),
                  activation=self.activation.model_dump() if self.activation else None)

    async def cancel(self) -> None:
        if self.status.startswith("postcopy-") or self.reached_postcopy:
            raise MigrationError("a post-copy migration cannot be cancelled: the destination runs the guest",
                                 "name")
        await self.port.qmp.execute("migrate_cancel")

    async def recover(self) -> Outcome:
        """A daemon died mid-migration (source side); finish it from what QEMU says now.

        ``completed``: release L3, confirm, hand over.  ``postcopy-*``: the guest
        runs on the destination already -- wait for the end, never cancel.
        Anything else still running: cancel, wait until QEMU says it is over
        (a cancel in ``device`` can lose to ``completed``), keep the guest.
        """
        try:
            if self.opts.peer:  # to confirm the release (the destination waits for it) or abort
                self._peer = PeerClient(self.opts.to, self.opts.token, tls=self.opts.api_tls,
                                        server_name=self.opts.peer)
            spec = self.port.spec_json()
            self.local = [d.id for _, d in storage.local_disks(parse_spec(spec), self.opts.shared_dirs)] \
                if spec.get("disks") else []
            info = await query(self.port.qmp, "query-migrate")
            self.status = str(info.get("status", "none"))
            self.port.emit("migration.recovering", direction="out", migrate_status=self.status)
            # a daemon killed after the switchover step may have released some L3: put it all back
            self.l3.move(SourceL3.RELEASING)
            if self.status == "completed":
                self.stream.move(Stream.SENT)
                self.result = "completed"
            elif self.status.startswith("postcopy-"):
                self.stream.move(Stream.POSTCOPY)
                self.result = await wait_qemu_migration_end(self.port.qmp, 0.2)
            elif self.status in RUNNING_STATUSES:
                self.stream.move(Stream.SENT)  # _conclude cancels it
            else:
                self.result = "failed"
            if self.local and self.status != "completed" and not self.status.startswith("postcopy-"):
                self.disks = source_disks_phases(local=True)  # whatever mirror is left: abandoned
        except BaseException as e:
            if only_cancelled(e):
                raise
            self.error = describe(e)
        with trio.CancelScope(shield=True):
            try:
                outcome = await self._conclude(self._peer, prepared=self._peer is not None)
            finally:
                if self._peer is not None:
                    await self._peer.aclose()
                self.done.set()
        return outcome


class IncomingMigration:
    """The destination side: waits for ``completed`` and the source's confirmed release, then activates.

    Its L3 is a phase machine (supervisor/_migration_phases.py): staged, cleared by the source's
    confirmation, activated -- and only from cleared.
    """

    direction = "in"

    def __init__(self, port: InstancePort, postcopy: bool, *, release_wait: float = 120.0,
                 source_released: bool = False, source: str | None = None,
                 created: list[storage.Created] | None = None, local: list[str] | None = None):
        self.port = port
        #: the local disks' target images created here for this migration, and their disk ids
        #: (exported over NBD); deleted again unless the guest is resumed here
        self.created = list(created or [])
        self.local = list(local or [])
        self.targets = target_disks_phases(created=bool(self.created))
        self.nbd_port: int | None = None
        self.postcopy = postcopy
        #: the declared peer that prepared it, the only peer that may drive it (None: the
        #: operator's); recorded, so a restarted daemon still knows (supervisor/api/_authz.py)
        self.source = source
        self.status = "setup"  # QEMU's own word for its migration
        self.uri: str | None = None
        self.activation: dict[str, float] | None = None
        #: how long to wait at ``completed`` for the source's confirmation
        self.release_wait = release_wait
        #: the source confirmed its L3 is gone (persisted: a restarted daemon must not wait again)
        self.l3 = destination_l3_phases(cleared=source_released)
        self._cleared = trio.Event()
        if source_released:
            self._cleared.set()
        self.release_waited_ms = 0.0
        #: this migration's stream key (TLS): handed to the source once, never shown or recorded;
        #: QEMU's creds dir for it (kept until the migration ends: GnuTLS reads it at the handshake)
        self.key: MigrationKey | None = None
        self.creds_dir: Path | None = None

    @property
    def activated(self) -> bool:
        """Activation began (L3, ``cont``): it never runs twice."""
        return self.l3.is_(DestinationL3.ACTIVATED)

    def view(self) -> dict[str, object]:
        return {"direction": "in", "status": self.status, "uri": self.uri, "postcopy": self.postcopy,
                "l3": self.l3.now.value, "source_released": not self.l3.is_(DestinationL3.STAGED),
                "activation": self.activation, "source": self.source,
                "disks": {"phase": self.targets.now.value, "local": self.local, "nbd_port": self.nbd_port}}

    def record(self) -> dict[str, object]:
        return {"direction": "in", "postcopy": self.postcopy,
                "source_released": not self.l3.is_(DestinationL3.STAGED), "source": self.source,
                "local": self.local, "created": [c.record() for c in self.created]}

    @classmethod
    def from_record(cls, port: InstancePort, rec: dict, release_wait: float) -> "IncomingMigration":
        """What a restarted daemon knows of an incoming migration (its record, as JSON)."""
        created = [c for c in map(storage.Created.from_record, rec.get("created") or []) if c is not None]
        local = [x for x in rec.get("local") or [] if isinstance(x, str)]
        return cls(port, bool(rec.get("postcopy")), release_wait=release_wait,
                   source_released=rec.get("source_released") is True,
                   source=rec.get("source") if isinstance(rec.get("source"), str) else None,
                   created=created, local=local)

    async def export_disks(self, address: str, creds: str | None) -> None:
        """The local disks' targets, writable over NBD on ``address`` (a free port), for the source's
        mirrors only: with TLS under this migration's key (``creds``: its tls-creds-psk object)."""
        if not self.targets.is_(TargetDisks.CREATED) or not self.local:
            return
        port = free_port(address)
        await storage.export_targets(self.port.qmp, self.local, address, port, creds)
        self.nbd_port = port
        self.targets.move(TargetDisks.EXPORTED)
        self.port.emit("migration.disks_exported", local=self.local, port=port)

    async def stop_exports(self) -> None:
        """No NBD client may write here any more (before ``cont``; at a failure, before the key goes)."""
        if self.targets.is_(TargetDisks.EXPORTED, TargetDisks.CREATED):
            await storage.stop_exports(self.port.qmp)
            self.targets.move(TargetDisks.STOPPED)

    def discard_targets(self) -> list[str]:
        """The instance's teardown: the images created for a migration that did not end here
        (QEMU is dead) are deleted -- only those, each only while it is the file created."""
        if not self.created or self.targets.is_(TargetDisks.KEPT, TargetDisks.DELETED):
            return []
        left = storage.remove_created(self.created)
        self.targets.move(TargetDisks.DELETED)
        self.port.emit("migration.disks_deleted", paths=[c.path for c in self.created], left=left)
        return left

    async def recover_postcopy(self, address: str) -> int:
        """The post-copy stream broke (``postcopy-paused``): listen again on a new port.

        QEMU's main loop here may be blocked on a guest page that only the source has (a
        device touching guest RAM): an in-band command then never answers.  So the status
        falls back to QEMU's own MIGRATION events, and ``migrate-recover`` goes out-of-band,
        as QEMU intends it to (its listener then runs on the monitor's thread).
        """
        qmp = self.port.qmp
        try:
            status = (await query(qmp, "query-migrate", timeout=1)).get("status")
        except qmp_glue.QMPTimeout:
            status = self.status  # the main loop is stuck: what QEMU's last event said
            log.info("post-copy recovery: QEMU's main loop does not answer; status from its events",
                     status=status)
        if not self.postcopy or status != "postcopy-paused":
            raise MigrationError(f"not a paused post-copy migration (qemu status {status})", "name")
        port = free_port(address)
        uri = tcp_uri(address, port)
        await qmp.execute("migrate-recover", {"uri": uri}, timeout=5, oob=True)
        self.uri = uri
        self.port.emit("migration.postcopy_listening", uri=uri)
        return port

    def confirm_release(self) -> None:
        """The source says its L3 is gone: recorded before the answer, so a restart keeps it."""
        if self.l3.is_(DestinationL3.STAGED):
            self.l3.move(DestinationL3.CLEARED)
            self._cleared.set()
            self.port.persist()
            self.port.emit("migration.source_released", status=self.status)

    async def on_event(self, ev: QMPEvent) -> Outcome:
        """Called by the instance's event task the moment a MIGRATION event arrives.

        Activation runs right here, before the event is even logged: it is
        the critical path (the guest is paused until ``cont``).
        """
        t_rx = time.time()
        status = str(ev["data"].get("status", ""))
        self.status = status
        if status in FINAL_STATUSES and self.targets.is_(TargetDisks.EXPORTED):
            # the source detached at pre-switchover: stop the server before ``cont`` and before
            # the key object goes (the NBD server holds it)
            try:
                await self.stop_exports()
            except (qmp_glue.QMPError, qmp_glue.QMPTimeout) as e:
                log.warning("nbd-server-stop failed", error=str(e))
        if self.key is not None and status in FINAL_STATUSES:  # QEMU forgets this migration's key
            self.key = None
            self.port.spawn(self._drop_tls)
        trigger = "postcopy-active" if self.postcopy else "completed"
        if status == trigger and not self.activated and not self.port.stop_requested:
            if not await self._source_released():
                return Outcome.SOURCE_SILENT
            return await self.activate(qmp_timestamp(ev), t_rx)
        return Outcome.PENDING

    async def _source_released(self) -> bool:
        """Wait (bounded) for the source's confirmation; usually it came before ``completed``."""
        self.port.checkpoint(Checkpoint.AWAIT_RELEASE)
        if self._cleared.is_set():
            return True
        t = time.perf_counter()
        with trio.move_on_after(self.release_wait):
            await self._cleared.wait()
        self.release_waited_ms = round((time.perf_counter() - t) * 1000, 3)
        return self._cleared.is_set()

    async def activate(self, qmp_ts: float, t_rx: float | None = None) -> Outcome:
        """L3, then ``cont``; then announce (in the background); timed from QEMU's event timestamp.

        Only from ``CLEARED`` (the phase table refuses anything else).  ``t_rx`` is when qsup
        received the event.  If L3 fails the guest is still resumed -- the source has already
        handed it over, so running here without routes beats not running at all -- and the
        failure is reported as ``migration.activation_failed``.
        """
        port = self.port
        if self.targets.is_(TargetDisks.CREATED, TargetDisks.EXPORTED):
            await self.stop_exports()  # raises: never ``cont`` with an NBD client still able to write
        self.l3.move(DestinationL3.ACTIVATED)
        t_rx = t_rx or time.time()
        netconf_ms = 0.0
        port.checkpoint(Checkpoint.ACTIVATE)
        try:
            netconf_ms = await port.apply_l3("migrate-in", inline=True)
        except netconf.NetconfError as e:
            port.emit("migration.activation_failed", error=str(e), failures=e.failures)
        t_l3 = time.time()
        port.checkpoint(Checkpoint.RESUME)
        await port.qmp.execute("cont")
        if self.targets.is_(TargetDisks.STOPPED):
            self.targets.move(TargetDisks.KEPT)
        t_cont = time.time()
        self.activation = {
            "qmp_ts": qmp_ts,
            "release_waited_ms": self.release_waited_ms,
            "event_to_l3_ms": round((t_l3 - qmp_ts) * 1000, 3),
            "event_to_cont_ms": round((t_cont - qmp_ts) * 1000, 3),
            "received_to_l3_ms": round((t_l3 - t_rx) * 1000, 3),
            "received_to_cont_ms": round((t_cont - t_rx) * 1000, 3),
            "netconf_ms": round(netconf_ms, 3),
            "cont_ms": round((t_cont - t_l3) * 1000, 3),
        }
        port.emit("migration.activated", **self.activation)
        port.spawn(self._announce)
        return Outcome.ACTIVATED

    def on_resume(self, qmp_ts: float) -> None:
        """QEMU's RESUME after our ``cont``: when the guest really ran again, by QEMU's clock."""
        if self.activation and "event_to_resumed_ms" not in self.activation:
            self.activation["event_to_resumed_ms"] = round((qmp_ts - self.activation["qmp_ts"]) * 1000, 3)

    async def _drop_tls(self) -> None:
        from ._tls import drop_qemu_tls

        await drop_qemu_tls(self.port.qmp, "server", self.creds_dir)

    async def _announce(self) -> None:
        try:
            await self.port.qmp.execute("announce-self", ANNOUNCE)
        except (qmp_glue.QMPError, qmp_glue.QMPConnectionLost, qmp_glue.QMPTimeout) as e:
            # best effort; in post-copy the main loop may wait on a page that is not here yet
            # (a broken stream: until it is resumed), and that must not end the guest's only copy
            log.warning("announce-self failed", error=str(e))
        await self.port.announce()

    async def recover(self, qemu_status: str) -> Outcome:
        """A daemon died mid-migration (destination side); activate if QEMU completed meanwhile."""
        info = await query(self.port.qmp, "query-migrate")
        mstatus = str(info.get("status", "none"))
        self.port.emit("migration.recovering", direction="in", qemu_status=qemu_status, migrate_status=mstatus)
        self.status = mstatus
        if (qemu_status == "inmigrate" and mstatus != "completed") or self.activated:
            return Outcome.PENDING  # the MIGRATION event comes to our new monitor connection
        if not await self._source_released():
            return Outcome.SOURCE_SILENT
        return await self.activate(time.time())
