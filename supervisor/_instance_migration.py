"""The migration half of :class:`~supervisor._instance.Instance` (a mixin).

Kept apart so ``_instance.py`` stays about one thing -- an instance's own
lifecycle -- while this module holds what an instance does *for* a live
migration: apply/release its L3, announce, hand the guest over, take it
back after a failure, and finish a migration a killed daemon left behind.
The protocol itself (events, capabilities, who does what when) is in
``_migration.py``.
"""

from __future__ import annotations

import signal
import time

import structlog
import trio

import netconf
import qmp_glue

from ._migration import IncomingMigration, MigrateOptions, MigrationError, OutgoingMigration
from ._state import State

log = structlog.get_logger("qsup.instance")

_MIGRATION_RUNNING = frozenset({"setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug"})


class MigrationMixin:
    # -- migration -----------------------------------------------------
    async def _recover_migration(self, migration: dict, qemu_status: str) -> None:
        """A daemon died mid-migration; finish it from what QEMU says now.

        Whatever happened, the guest must end running on exactly one node
        with L3 on exactly that node:

        * destination, migration completed (guest paused, no L3 yet): L3, ``cont``;
          still ``inmigrate``: keep waiting for the event;
        * source, ``completed``: release L3, ``quit``;
          ``postcopy-*``: the guest runs on the destination already -- wait
          for the end, never cancel (cancel would resume a stale copy here);
          anything else: cancel, wait until QEMU says it is over (a cancel in
          ``device`` can lose to ``completed``), then keep the guest here, L3
          re-applied (idempotent) and running.
        """
        while self._nursery is None:
            await trio.sleep(0)
        info = await self.qmp.execute("query-migrate")
        mstatus = info.get("status", "none")
        self._emit("migration.recovering", direction=migration["direction"], qemu_status=qemu_status,
                   migrate_status=mstatus)
        if migration["direction"] == "in":
            self.migration.status = mstatus
            if (qemu_status == "inmigrate" and mstatus != "completed") or self.migration.activated:
                return  # the MIGRATION event comes to our new monitor connection
            self.migration.activated = True
            await self.migration.activate(time.time())
            return
        if mstatus.startswith("postcopy-"):
            # The guest already runs on the destination and pulls its pages from here:
            # cancelling would resume a second, stale copy here, with its L3 back.
            mstatus = await self._wait_migration_end(0.2)
            if mstatus != "completed":
                await self.release_l3()  # the destination owns the guest (or nobody does)
                self._emit("migration.postcopy_lost", migrate_status=mstatus)
                return
        if mstatus in _MIGRATION_RUNNING:
            try:
                await self.qmp.execute("migrate_cancel")
            except qmp_glue.QMPError as e:
                log.warning("migrate_cancel during recovery", error=str(e))
            # resume only once QEMU says it is over: in ``device`` the cancel can lose
            # the race and the migration complete -- then the guest is the destination's
            with trio.move_on_after(30):
                mstatus = await self._wait_migration_end(0.02)
        if mstatus == "completed":  # not "postmigrate" alone: a paused guest's failed migration ends there too
            await self.release_l3()
            await self.finish_migrated()
            return
        await self.resume_after_failed_migration(True)

    async def _wait_migration_end(self, interval: float) -> str:
        """Poll ``query-migrate`` while a migration still runs (post-copy included); its end status."""
        while True:
            try:
                status = (await self.qmp.execute("query-migrate", timeout=5)).get("status", "none")
            except (qmp_glue.QMPError, qmp_glue.QMPConnectionLost, trio.TooSlowError):
                return "lost"  # QEMU went away: the exit path cleans up
            if status not in _MIGRATION_RUNNING and not status.startswith("postcopy-"):
                return status
            await trio.sleep(interval)

    async def apply_l3(self, reason: str, *, inline: bool = False) -> float:
        """L3 for every NIC; returns netconf's own ms.

        Normally one hop to the netconf thread.  ``inline`` (a migration
        destination's activation, staged at prepare) runs it right here on
        the trio thread instead: with the journal already written it is a
        few netlink round trips (~0.2 ms), cheaper than waking another
        thread on a busy host.  Never inline when a hook would run (a hook
        may take seconds) -- that falls back to the worker.
        """
        if inline and not any(self.executor.hooked(netconf.plan(n, "activate")) for n in self.nics):
            return self._apply_phase("activate", reason)
        return await self.ctx.worker.run(self._apply_phase, "activate", reason)

    async def release_l3(self) -> None:
        """Undo exactly the journal's activate entries (routes, rules, sysctls)."""
        await self.ctx.worker.run(self.executor.undo, reason="migrate-out", phases={"activate"})

    async def announce_routed(self) -> None:
        """Gratuitous ARP / unsolicited NA for routed guests on the node's uplinks."""
        ifaces = self.ctx.cfg.announce_interfaces
        announce = getattr(netconf, "announce", None)
        if not ifaces or announce is None:
            return
        for nic in self.nics:
            if nic.mode == "routed":
                try:
                    res = await self.ctx.worker.run(announce, ifaces, ip=nic.ip, ip6=nic.ip6)
                    self._emit("migration.announced", mac=nic.mac, results=res)
                except netconf.NetconfError as e:
                    self._emit("migration.announce_failed", mac=nic.mac, error=str(e))

    async def migrate(self, opts: MigrateOptions) -> OutgoingMigration:
        """Start an outgoing migration; returns at once (follow it with the view/events)."""
        if self.state not in (State.RUNNING, State.PAUSED):
            raise MigrationError(f"instance is {self.state.value}, not running or paused", "name")
        self.migration = OutgoingMigration(self, opts)
        self.sm.move(State.MIGRATING, f"to {opts.to}")
        self.spawn(self.migration.run)
        return self.migration

    async def finish_migrated(self) -> None:
        """Source after ``completed``: quit QEMU; the exit path cleans up."""
        self._migrated = True
        self._stopping = True
        await self._try_qmp("quit")
        with trio.move_on_after(10):
            await self.proc.wait()
        self.proc.signal(signal.SIGKILL)

    async def resume_after_failed_migration(self, l3_released: bool) -> None:
        """Source after ``failed``/``cancelled``: L3 back, guest running again."""
        if not self.proc.alive:
            return
        if l3_released:
            await self.apply_l3("rollback")
        try:
            status = await self.qmp.execute("query-status")
            if not status.get("running"):
                await self.qmp.execute("cont")
            self.sm.move(State.RUNNING, "migration failed; resumed")
        except (qmp_glue.QMPError, qmp_glue.QMPConnectionLost) as e:
            log.error("could not resume after failed migration", error=str(e))

    async def abort_incoming(self) -> None:
        """The source gave up: tear the destination down (no L3 was applied)."""
        if not isinstance(self.migration, IncomingMigration) or self.migration.activated:
            raise MigrationError("not an incoming migration that is still pending", "name")
        self.migration.aborted = True
        self.proc.signal(signal.SIGKILL)
        await self.done.wait()

