"""A live migration's progress, as explicit phase machines -- all of them in this one file.

The instance's own states live in :mod:`supervisor._state`; a migration does not move them
(docs/ARCHITECTURE.md, "How a migration talks to its instance").  What a migration itself has
done so far decides what it still owes when it ends -- an abort to the destination, L3 put
back, a ``cont``, never a resume after post-copy -- so it is kept here as phases with the moves
allowed between them, not as loose flags:

* :class:`Stream` -- how far the migration stream got, on the source;
* :class:`SourceL3` -- the guest's L3 on the source: held, being released, gone, and whether
  the destination has been told;
* :class:`DestinationL3` -- the guest's L3 on the destination: staged, cleared by the source's
  confirmation, activated;
* :class:`SourceDisks` -- the local disks' copy on the source (mirrors to the destination's
  NBD exports): what a failure must abandon, and whether the switchover may go on;
* :class:`TargetDisks` -- the local disks' target images on the destination: created, exported,
  the export stopped (before ``cont``), kept (the guest runs on them) or deleted.

Together they carry the rule of supervisor/_migration.py: the destination activates only from
``CLEARED``, which only the source's ``CONFIRMED`` leads to, which only ``GONE`` leads to.
:class:`Phases` refuses any other move with :class:`PhaseError`, so a logic error is an
exception, not a route on two nodes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Generic, TypeVar


class Stream(enum.Enum):
    """The source's migration stream."""

    NEW = "new"  # nothing asked of anyone yet
    PREPARED = "prepared"  # the destination listens: if we give up now, it is owed an abort
    SENT = "sent"  # QEMU's ``migrate`` was issued: QEMU's own events decide from here
    POSTCOPY = "postcopy"  # the destination runs the guest: never cancel, never resume it here
    RECOVERING = "recovering"  # the post-copy stream broke: resuming it (migrate-recover + resume)
    ENDED = "ended"  # QEMU's migration is over, one way or the other


STREAM_MOVES: Mapping[Stream, frozenset[Stream]] = {
    Stream.NEW: frozenset({Stream.PREPARED, Stream.SENT, Stream.POSTCOPY, Stream.ENDED}),  # the last
    # three: a restarted daemon takes over whatever QEMU is doing (OutgoingMigration.recover)
    Stream.PREPARED: frozenset({Stream.SENT, Stream.ENDED}),
    Stream.SENT: frozenset({Stream.POSTCOPY, Stream.ENDED}),
    Stream.POSTCOPY: frozenset({Stream.RECOVERING, Stream.ENDED}),
    Stream.RECOVERING: frozenset({Stream.POSTCOPY, Stream.ENDED}),
    Stream.ENDED: frozenset(),
}


class SourceL3(enum.Enum):
    """The guest's L3 (routes, rules, proxy ARP/NDP, neighbour entries) on the source."""

    HELD = "held"  # all of it is here
    RELEASING = "releasing"  # a release began: a rollback must put all of it back
    GONE = "gone"  # none of it is left here
    CONFIRMED = "confirmed"  # ... and the destination knows: it activates at ``completed``


SOURCE_L3_MOVES: Mapping[SourceL3, frozenset[SourceL3]] = {
    SourceL3.HELD: frozenset({SourceL3.RELEASING}),
    # again RELEASING: a release that failed half-way is retried after ``completed``
    SourceL3.RELEASING: frozenset({SourceL3.RELEASING, SourceL3.GONE, SourceL3.HELD}),
    SourceL3.GONE: frozenset({SourceL3.CONFIRMED, SourceL3.HELD}),
    # HELD again from CONFIRMED: the destination gave up before it ran the guest
    SourceL3.CONFIRMED: frozenset({SourceL3.HELD}),
}


class DestinationL3(enum.Enum):
    """The guest's L3 on the destination."""

    STAGED = "staged"  # journaled when QEMU started, not applied: the source may still hold it
    CLEARED = "cleared"  # the source confirmed its release: ours to apply at ``completed``
    ACTIVATED = "activated"  # applied (or tried), ``cont`` sent: never again


DESTINATION_L3_MOVES: Mapping[DestinationL3, frozenset[DestinationL3]] = {
    DestinationL3.STAGED: frozenset({DestinationL3.CLEARED}),
    DestinationL3.CLEARED: frozenset({DestinationL3.ACTIVATED}),
    DestinationL3.ACTIVATED: frozenset(),
}


class SourceDisks(enum.Enum):
    """The local disks' copy, on the source (supervisor/_storage.py)."""

    NONE = "none"  # no local disk: nothing to copy
    PENDING = "pending"  # local disks, nothing made in QEMU yet
    COPYING = "copying"  # NBD client nodes / mirror jobs exist: a failure must abandon them
    SYNCED = "synced"  # every mirror ready (kept in sync, write-blocking): the RAM migration may run
    DETACHED = "detached"  # at pre-switchover: the jobs ended without pivot, the nodes are gone
    ABANDONED = "abandoned"  # a failure: jobs force-cancelled, nodes deleted; the source image is the guest's


SOURCE_DISKS_MOVES: Mapping[SourceDisks, frozenset[SourceDisks]] = {
    SourceDisks.NONE: frozenset(),
    SourceDisks.PENDING: frozenset({SourceDisks.COPYING, SourceDisks.ABANDONED}),
    SourceDisks.COPYING: frozenset({SourceDisks.SYNCED, SourceDisks.ABANDONED}),
    SourceDisks.SYNCED: frozenset({SourceDisks.DETACHED, SourceDisks.ABANDONED}),
    SourceDisks.DETACHED: frozenset(),
    SourceDisks.ABANDONED: frozenset(),
}


class TargetDisks(enum.Enum):
    """The local disks' target images, on the destination."""

    NONE = "none"  # no local disk
    CREATED = "created"  # made here for this migration: deleted unless the guest runs here
    EXPORTED = "exported"  # the NBD server and its writable exports are up
    STOPPED = "stopped"  # the NBD server is stopped: nothing writes to them but this QEMU
    KEPT = "kept"  # the guest was resumed here: they are its disks now
    DELETED = "deleted"  # the migration failed: the images created here are gone


TARGET_DISKS_MOVES: Mapping[TargetDisks, frozenset[TargetDisks]] = {
    TargetDisks.NONE: frozenset(),
    # CREATED -> STOPPED: a restarted daemon stops whatever export QEMU still has
    TargetDisks.CREATED: frozenset({TargetDisks.EXPORTED, TargetDisks.STOPPED, TargetDisks.DELETED}),
    TargetDisks.EXPORTED: frozenset({TargetDisks.STOPPED, TargetDisks.DELETED}),
    TargetDisks.STOPPED: frozenset({TargetDisks.KEPT, TargetDisks.DELETED}),
    TargetDisks.KEPT: frozenset(),
    TargetDisks.DELETED: frozenset(),
}


class PhaseError(RuntimeError):
    """A move the table does not allow: a logic error in the migration code."""


P = TypeVar("P", Stream, SourceL3, DestinationL3, SourceDisks, TargetDisks)


class Phases(Generic[P]):
    """One phase machine: the current phase, and :meth:`move` checked against its table."""

    def __init__(self, start: P, moves: Mapping[P, frozenset[P]]):
        self.now: P = start
        self._moves: Mapping[P, frozenset[P]] = moves

    def move(self, to: P) -> None:
        if to not in self._moves[self.now]:
            raise PhaseError(f"{type(to).__name__}: {self.now.value} -> {to.value} is not allowed")
        self.now = to

    def is_(self, *phases: P) -> bool:
        return self.now in phases

    def __repr__(self) -> str:
        return f"<{type(self.now).__name__} {self.now.value}>"


def stream_phases() -> Phases[Stream]:
    return Phases(Stream.NEW, STREAM_MOVES)


def source_l3_phases() -> Phases[SourceL3]:
    return Phases(SourceL3.HELD, SOURCE_L3_MOVES)


def destination_l3_phases(cleared: bool = False) -> Phases[DestinationL3]:
    return Phases(DestinationL3.CLEARED if cleared else DestinationL3.STAGED, DESTINATION_L3_MOVES)


def source_disks_phases(local: bool = False) -> Phases[SourceDisks]:
    return Phases(SourceDisks.PENDING if local else SourceDisks.NONE, SOURCE_DISKS_MOVES)


def target_disks_phases(created: bool = False) -> Phases[TargetDisks]:
    return Phases(TargetDisks.CREATED if created else TargetDisks.NONE, TARGET_DISKS_MOVES)
