"""Live migration, driven by QEMU's own MIGRATION events.

The rule this module exists for: **a guest's L3 (routes, rules, proxy
ARP/NDP) is never on two nodes at once**, and the hand-over costs no more
than QEMU's own downtime plus two netlink batches.  It holds by causality,
not timing:

Source (``OutgoingMigration``)
    capabilities ``events`` + ``pause-before-switchover`` + ``return-path``
    (+ ``postcopy-ram``), then ``migrate``.  At MIGRATION ``pre-switchover`` the source guest is
    already stopped and its final device state not yet sent: the source
    runs netconf ``deactivate`` (undo of the activate phase only, from the
    journal), *then* ``migrate-continue``.  The destination cannot reach
    ``completed`` before that.  On ``completed``: ``quit``; the taps go with
    QEMU and the journal's L2 entries are undone.  On ``failed`` or
    ``cancelled``: re-activate L3 if it was released, ``cont`` if paused.

Destination (``IncomingMigration``)
    taps opened and ``attach`` (L2) applied when QEMU starts -- QEMU's
    self-announce after migration is lost if the tap is not on its bridge
    yet -- with ``-incoming defer -S`` and the ``events`` capability.  On
    MIGRATION ``completed`` (``postcopy-active`` for post-copy): ``activate``
    (L3), ``cont``, ``announce-self``, gratuitous ARP / unsolicited NA on the
    node's uplinks; event ``migration.activated`` with the QMP event's
    timestamp and the time from it to L3 applied and to ``cont`` returned.
    With QEMU 7.2 a failed incoming migration makes QEMU exit by itself:
    that is ``failed``, not a crash.

Never probe the incoming port: a TCP connect can kill an incoming QEMU.
"""

from __future__ import annotations

import math
import socket
import time
from dataclasses import dataclass, field

import httpx
import structlog
import trio

import netconf
import qmp_glue

from ._state import State

log = structlog.get_logger("qsup.migration")

#: QMP announce-self parameters (ms): five RARPs, 50..550 ms apart.
ANNOUNCE = {"initial": 50, "max": 550, "rounds": 5, "step": 100}
PROGRESS_HZ = 4


class MigrationError(RuntimeError):
    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class MigrateOptions:
    to: str  # the destination daemon: a unix socket path, or http(s)://host:port
    postcopy: bool = False
    max_bandwidth: int | None = None  # bytes/s
    downtime_limit: int | None = None  # ms
    token: str | None = None  # bearer token for an http:// destination
    #: cancel when no RAM moved for this long (a dead link stalls TCP, it doesn't fail it)
    stall_timeout: float = 15.0


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


class PeerClient:
    """Async client for another node's API (the destination daemon)."""

    def __init__(self, to: str, token: str | None = None, timeout: float = 60.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if to.startswith(("http://", "https://")):
            self._client = httpx.AsyncClient(base_url=to.rstrip("/"), headers=headers, timeout=timeout)
        else:
            self._client = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=to), base_url="http://qsup", headers=headers,
                timeout=timeout)

    async def _call(self, method: str, path: str, **kw) -> dict:
        try:
            r = await self._client.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise MigrationError(f"destination unreachable: {e}", "to") from None
        try:
            body = r.json()
        except ValueError:
            body = {"error": r.text[:200]}
        if r.status_code >= 400:
            raise MigrationError(f"destination refused ({r.status_code}): {body.get('error')}",
                                 body.get("field"))
        return body

    async def prepare(self, spec: dict, postcopy: bool) -> dict:
        return await self._call("POST", "/v1/migrations/incoming", json={"spec": spec, "postcopy": postcopy})

    async def abort(self, name: str) -> None:
        try:
            await self._call("POST", f"/v1/migrations/incoming/{name}/abort")
        except MigrationError as e:
            log.info("destination abort", result=str(e))

    async def show(self, name: str) -> dict:
        return await self._call("GET", f"/v1/instances/{name}")

    async def aclose(self) -> None:
        await self._client.aclose()


def _qmp_ts(ev: dict) -> float:
    ts = ev.get("timestamp", {})
    return ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6


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

    def update(self, info: dict) -> None:
        ram = info.get("ram", {})
        self.status = info.get("status", self.status)
        self.transferred = ram.get("transferred", self.transferred)
        self.remaining = ram.get("remaining", self.remaining)
        self.total = ram.get("total", self.total)
        self.mbps = ram.get("mbps", self.mbps)
        self.downtime_ms = info.get("downtime", self.downtime_ms)
        self.total_time_ms = info.get("total-time", self.total_time_ms)
        self.updated = time.time()


class OutgoingMigration:
    """The source side; runs as a task in the instance's nursery."""

    direction = "out"

    def __init__(self, inst, opts: MigrateOptions):
        self.inst = inst
        self.opts = opts
        self.progress = Progress()
        self.status = "setup"
        self.result: str | None = None  # completed | failed | cancelled
        self.error: str | None = None
        self.l3_released = False
        self.t0 = time.time()
        self.dest_view: dict | None = None
        self.total_ms: float | None = None
        self.stop_ts: float | None = None  # QMP timestamp of the source guest's STOP
        self.reached_postcopy = False
        self.done = trio.Event()
        self._events_send, self._events_recv = trio.open_memory_channel(math.inf)

    def view(self) -> dict:
        p = self.progress
        return {"direction": "out", "to": self.opts.to, "status": self.status, "result": self.result,
                "error": self.error, "postcopy": self.opts.postcopy, "l3_released": self.l3_released,
                "transferred": p.transferred, "remaining": p.remaining, "total": p.total, "mbps": p.mbps,
                "downtime_ms": p.downtime_ms, "total_time_ms": p.total_time_ms, "total_ms": self.total_ms,
                "switchover_ms": self.switchover_ms(((self.dest_view or {}).get("migration") or {}).get("activation")),
                "activation": (self.dest_view or {}).get("migration", {}).get("activation")}

    async def handle(self, ev: dict) -> None:
        self._events_send.send_nowait(ev)

    def switchover_ms(self, activation: dict | None) -> float | None:
        """QEMU's own clocks: source guest STOP -> destination ``completed``.

        QEMU's ``downtime`` is measured on the source and ends when the
        source has sent everything; the destination still has to load the
        device state before it reports ``completed``.  This is the window in
        which no node may hold the guest's L3 (both timestamps are QMP's).
        """
        if not activation or not self.stop_ts:
            return None
        return round((activation["qmp_ts"] - self.stop_ts) * 1000, 3)

    async def run(self) -> None:
        inst = self.inst
        qmp = inst.qmp
        peer = PeerClient(self.opts.to, self.opts.token)
        prepared = False
        try:
            inst._emit("migration.started", to=self.opts.to, postcopy=self.opts.postcopy)
            dest = await peer.prepare(inst.spec.model_dump(mode="json"), self.opts.postcopy)
            prepared = True
            uri = dest["uri"]
            # return-path: without it the source reports ``completed`` as soon as the last
            # bytes are in its socket buffer -- even when the destination just died -- and
            # would quit the only copy of the guest.  With it, ``completed`` waits for the
            # destination's "loaded" reply, and a dead destination is ``failed``.
            caps = [{"capability": "events", "state": True},
                    {"capability": "pause-before-switchover", "state": True},
                    {"capability": "return-path", "state": True},
                    {"capability": "postcopy-ram", "state": self.opts.postcopy}]
            await qmp.execute("migrate-set-capabilities", {"capabilities": caps})
            params = {}
            if self.opts.max_bandwidth:
                params["max-bandwidth"] = self.opts.max_bandwidth
            if self.opts.downtime_limit:
                params["downtime-limit"] = self.opts.downtime_limit
            if params:
                await qmp.execute("migrate-set-parameters", params)
            await qmp.execute("migrate", {"uri": uri})
            inst._emit("migration.uri", uri=uri)
            async with trio.open_nursery() as n:
                n.start_soon(self._poll_progress)
                await self._follow(qmp)
                n.cancel_scope.cancel()
        except (MigrationError, qmp_glue.QMPError, qmp_glue.QMPConnectionLost) as e:
            self.result = self.result or "failed"
            self.error = str(e)
            log.warning("migration failed", error=self.error)
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self._finish(peer, prepared)
                finally:
                    await peer.aclose()
                    self.done.set()

    async def _follow(self, qmp) -> None:
        """React to MIGRATION events until a final one; the events alone decide state."""
        postcopy_started = False
        async for ev in self._events_recv:
            status = ev["data"]["status"]
            self.status = status
            if status.startswith("postcopy-"):
                self.reached_postcopy = True
            if status == "active" and self.opts.postcopy and not postcopy_started:
                postcopy_started = True
                await qmp.execute("migrate-start-postcopy")
            elif status == "pre-switchover":
                t = time.perf_counter()
                await self.inst.release_l3()
                self.l3_released = True
                t_rel = time.perf_counter()
                await qmp.execute("migrate-continue", {"state": "pre-switchover"})
                self.inst._emit("migration.switchover", l3_released_ms=round((t_rel - t) * 1000, 3),
                                qmp_ts=_qmp_ts(ev))
            elif status in ("completed", "failed", "cancelled", "postcopy-paused"):
                self.result = status
                return

    async def _poll_progress(self) -> None:
        """``query-migrate`` at <= 4 Hz for the progress view, and stall detection.

        Progress only; the events alone decide state.  A link that goes down
        stalls the TCP stream without failing it, so if nothing moves for
        ``stall_timeout`` the migration is cancelled (and then rolled back
        by the ``cancelled`` event like any other).
        """
        last, since = -1, time.monotonic()
        while True:
            try:
                self.progress.update(await self.inst.qmp.execute("query-migrate", timeout=5))
            except (qmp_glue.QMPError, qmp_glue.QMPConnectionLost, trio.TooSlowError):
                return
            now = time.monotonic()
            if self.progress.transferred != last or self.status in ("pre-switchover", "device"):
                last, since = self.progress.transferred, now
            elif now - since > self.opts.stall_timeout and not self.status.startswith("postcopy"):
                # (never in post-copy: the destination already runs the guest, a
                # cancel would resume a stale copy here)
                self.error = f"no progress for {self.opts.stall_timeout:.0f}s; cancelled"
                self.inst._emit("migration.stalled", after_s=self.opts.stall_timeout)
                await self.cancel()
                return
            await trio.sleep(1 / PROGRESS_HZ)

    async def _finish(self, peer: PeerClient, prepared: bool) -> None:
        inst = self.inst
        self.total_ms = round((time.time() - self.t0) * 1000, 1)
        if self.result == "completed":
            try:
                self.progress.update(await inst.qmp.execute("query-migrate", timeout=5))
            except Exception:  # noqa: BLE001 - the summary is best effort
                pass
            # the destination activates on its own ``completed`` event, at about the
            # same moment as ours: wait (briefly) for its activation figures
            with trio.move_on_after(10):
                while True:
                    try:
                        self.dest_view = await peer.show(inst.name)
                    except MigrationError:
                        break
                    m = self.dest_view.get("migration") or {}
                    if m.get("activation") or self.dest_view.get("state") != "migrating":
                        break
                    await trio.sleep(0.02)
            activation = ((self.dest_view or {}).get("migration") or {}).get("activation")
            summary = {"total_ms": self.total_ms,
                       "downtime_ms": self.progress.downtime_ms,
                       "switchover_ms": self.switchover_ms(activation),
                       "activation": activation}
            inst._emit("migration.completed", **summary)
            await inst.finish_migrated()
            return
        if self.reached_postcopy:
            # The destination has been running the guest: this copy is stale.
            # Resuming it would put the guest on two nodes; keep it paused for
            # an operator (QEMU can still serve pages / be recovered).
            self.error = self.error or f"post-copy ended {self.status}"
            inst._emit("migration.postcopy_lost", status=self.status, error=self.error)
            if inst.proc.alive and inst.sm.can(State.PAUSED):
                inst.sm.move(State.PAUSED, "post-copy lost: stale copy kept paused")
            return
        # failed / cancelled / error: the source keeps the guest.
        if prepared:
            with trio.move_on_after(15):
                await peer.abort(inst.name)
        await inst.resume_after_failed_migration(self.l3_released)
        inst._emit("migration.failed", result=self.result or "failed", error=self.error,
                   l3_was_released=self.l3_released)

    async def cancel(self) -> None:
        await self.inst.qmp.execute("migrate_cancel")


class IncomingMigration:
    """The destination side: waits for ``completed`` and activates."""

    direction = "in"

    def __init__(self, inst, postcopy: bool):
        self.inst = inst
        self.postcopy = postcopy
        self.status = "setup"
        self.uri: str | None = None
        self.activation: dict | None = None
        self.activated = False
        self.aborted = False

    def view(self) -> dict:
        return {"direction": "in", "status": self.status, "uri": self.uri, "postcopy": self.postcopy,
                "activation": self.activation}

    async def handle(self, ev: dict) -> None:
        """Called by the instance's event task the moment a MIGRATION event arrives.

        Activation runs right here, before the event is even logged: it is
        the critical path (the guest is paused until ``cont``).
        """
        t_rx = time.time()
        status = ev["data"]["status"]
        self.status = status
        trigger = "postcopy-active" if self.postcopy else "completed"
        if status == trigger and not self.activated:
            self.activated = True
            await self.activate(_qmp_ts(ev), t_rx)

    async def activate(self, qmp_ts: float, t_rx: float | None = None) -> None:
        """L3, then ``cont``; then announce (in the background); timed from QEMU's event timestamp.

        ``t_rx`` is when qsup received the event.  If L3 fails the guest is
        still resumed -- the source has already handed it over, so running
        here without routes beats not running at all -- and the failure is
        reported as ``migration.activation_failed``.
        """
        inst = self.inst
        t_rx = t_rx or time.time()
        netconf_ms = 0.0
        try:
            netconf_ms = await inst.apply_l3("migrate-in", inline=True)
        except netconf.NetconfError as e:
            inst._emit("migration.activation_failed", error=str(e), failures=e.failures)
        t_l3 = time.time()
        await inst.qmp.execute("cont")
        t_cont = time.time()
        self.activation = {
            "qmp_ts": qmp_ts,
            "event_to_l3_ms": round((t_l3 - qmp_ts) * 1000, 3),
            "event_to_cont_ms": round((t_cont - qmp_ts) * 1000, 3),
            "received_to_l3_ms": round((t_l3 - t_rx) * 1000, 3),
            "received_to_cont_ms": round((t_cont - t_rx) * 1000, 3),
            "netconf_ms": round(netconf_ms, 3),
            "cont_ms": round((t_cont - t_l3) * 1000, 3),
        }
        inst.sm.move(State.RUNNING, "migration activated")
        inst._emit("migration.activated", **self.activation)
        inst.spawn(self._announce)

    def resumed(self, qmp_ts: float) -> None:
        """QEMU's RESUME after our ``cont``: when the guest really ran again, by QEMU's clock.

        ``cont`` *returning* (``event_to_cont_ms``) also includes the reply's
        trip back through the monitor; this is the other end of the guest's
        pause as QEMU saw it.
        """
        if self.activation and "event_to_resumed_ms" not in self.activation:
            self.activation["event_to_resumed_ms"] = round((qmp_ts - self.activation["qmp_ts"]) * 1000, 3)

    async def _announce(self) -> None:
        try:
            await self.inst.qmp.execute("announce-self", ANNOUNCE)
        except (qmp_glue.QMPError, qmp_glue.QMPConnectionLost) as e:
            log.warning("announce-self failed", error=str(e))
        await self.inst.announce_routed()
