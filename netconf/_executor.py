"""The executor: apply a plan over netlink, journal every effect, undo exactly.

Synchronous by design: it runs on the :class:`~netconf.NetconfWorker`
thread in the daemon (or the main thread of a test/driver) and uses that
thread's netlink socket (:func:`netconf._nl.netlink`).

Apply, for each run of consecutive steps that have no hooks (a "group"):

1. observe the prior state of every step in the group (reads only);
2. journal all of them as ``pending`` in one write + ONE fsync;
3. apply them in order, marking each ``done`` (plain write, no fsync).

A step with hooks is its own group: ``before`` hooks (ACTION=up), then the
``replace`` hook or the default step, then ``after`` hooks; each hook run
is journaled (fsync'd) before it starts.  Undo walks the journal backwards,
so ``after`` hooks are re-run with ACTION=down first, then the default undo
(or the replace hook with ACTION=down), then ``before`` hooks with
ACTION=down.  A hook that failed on the way up is recorded ``failed`` and
is not re-run on the way down.

If anything fails, the effects this call applied are undone in reverse and
one :class:`NetconfError` is raised.  Re-applying a plan whose steps are
already ``done`` for the *same* tap (same ifindex) changes nothing; a done
entry for an older tap of the same name (qemu restarted) is first undone
(its effects mostly vanished with the old tap), then the step is applied
again.

Why batch the fsync per group: an fsync costs far more than the netlink
request it guards, and one per step would dominate a routed activation,
which is on a live migration's critical path.
The guarantee that matters -- nothing changes on the host before a durable
record says how to undo it -- holds per group.  The tradeoff: priors of a
group are observed before its earlier steps run, so a later step sees the
state *before* the group (e.g. ``bridge-port`` records the MTU from before
``tap-up`` changed it); undo runs in reverse, so restoring those older
values in order still ends at the original state.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._journal import Entry, Journal
from ._nl import netlink
from ._ops import OPS, Note, Op, ifindex
from ._plan import Plan, Step
from ._types import BRIDGE_MODES, Failure, JSONObject, NetconfError, Nic, Reason

if TYPE_CHECKING:
    from ._hooks import Hooks, StepHooks

#: Test hook for crash tests: stop for ever right after applying this step,
#: before marking it done (so the journal says "pending" while the effect is
#: on the host), after creating the file named by ..._MARKER.
_PAUSE_AFTER = os.environ.get("QSUP_NETCONF_TEST_PAUSE_AFTER")


def _test_pause() -> None:
    with open(os.environ["QSUP_NETCONF_TEST_PAUSE_MARKER"], "w") as fh:
        fh.write(str(os.getpid()))
    while True:
        time.sleep(3600)


def _bridge_of(nic: Nic) -> str | None:
    return nic.link if nic.mode in BRIDGE_MODES else None


def _step_failure(exc: BaseException, step: str, **extra: Any) -> Failure:
    """One failure dict; a HookError's own (path, exit_code, output) wins."""
    out = {"step": step, "error": str(exc).splitlines()[0] if str(exc) else repr(exc), **extra}
    for f in getattr(exc, "failures", None) or []:
        out.update({k: v for k, v in f.items() if k != "step"})
        break
    return out


def _at_step(exc: Exception, step: str) -> None:
    """Tag ``exc`` with the step it came from (``apply`` names it in its failure)."""
    exc.step = step  # type: ignore[attr-defined]


def _current_ifindex(tap: str) -> int | None:
    try:
        return ifindex(tap)
    except OSError:
        return None


class Executor:
    """Applies plans and undoes them from ``journal``."""

    def __init__(self, journal: Journal, *, hooks: Hooks | None = None, ovs_db: str | None = None) -> None:
        self.journal = journal
        self.hooks = hooks
        self.ovs_db = ovs_db

    # -- helpers -----------------------------------------------------------

    def _op(self, name: str) -> Op:
        return OPS[name](netlink(), self.ovs_db)

    def _hooks_for(self, step: Step) -> StepHooks | None:
        if self.hooks is None:
            return None
        found = self.hooks.find(step.name)
        if not (found.before or found.replace or found.after):
            return None
        return found

    def _hook_runner(self) -> Hooks:
        if self.hooks is not None:
            return self.hooks
        from . import _hooks  # undo of a hook journaled by an earlier executor

        return _hooks.Hooks(None)

    def _run_hook(self, entry: Entry, action: str, reason: Reason) -> None:
        from ._hooks import hook_env

        nic = Nic.from_dict(entry["nic"])
        env = hook_env(nic, ifindex=_current_ifindex(nic.tap) or entry.get("ifindex"),
                       reason=reason, action=action, bridge=_bridge_of(nic))
        self._hook_runner().run(Path(entry["path"]), env, step=entry["step"], action=action)

    def stage(self, plan: Plan) -> int:
        """Journal ``plan``'s (un-hooked) steps now, so a later :meth:`apply` skips the fsync.

        A migration destination knows its ``activate`` plan long before QEMU
        reports ``completed``; staging it at prepare time takes the journal's
        observe + write + fdatasync off the activation's critical path.  A
        staged entry is an ordinary ``pending`` entry -- recorded before it
        is applied -- so undo and crash recovery treat it as they treat any
        pending entry (undo is safe whether or not it took effect).
        Returns the number of entries staged.
        """
        nic: Nic = plan.nic
        tap_index = _current_ifindex(nic.tap)
        records: list[Entry] = []
        for step in plan:
            done, stale = self._find_done(step, tap_index)
            if done or stale or self._hooks_for(step) is not None:
                continue
            prior = self._op(step.op).observe(step.args)
            records.append({"kind": "step", "step": step.name, "phase": step.phase, "nic_id": step.nic_id,
                            "op": step.op, "args": step.args, "prior": prior, "ifindex": tap_index,
                            "staged": True})
        return len(self.journal.add(records, sync=True))

    def hooked(self, plan: Plan) -> bool:
        """Would any step of ``plan`` run a user hook?  (Hooks may block for seconds.)"""
        return any(self._hooks_for(step) is not None for step in plan)

    @staticmethod
    def _is_staged(entry: Entry, step: Step, tap_index: int | None) -> bool:
        return bool(entry.get("staged") and entry["status"] == "pending" and entry["kind"] == "step"
                and entry["args"] == step.args and entry.get("ifindex") == tap_index)

    def _find_done(self, step: Step, tap_index: int | None) -> tuple[bool, list[Entry]]:
        """(already applied for this tap?, stale entries for an older tap); staged entries are neither."""
        same = [e for e in self.journal.live(phases=(step.phase,), nic_id=step.nic_id)
                if e["step"] == step.name and not self._is_staged(e, step, tap_index)]
        # Done means the effect itself is there -- the step's entry, or the hook that replaces
        # it -- not merely a before/after hook whose "down" failed after the effect was undone.
        effect = any(e["kind"] == "step" or e.get("role") == "replace" for e in same)
        ok = effect and all(
            e["status"] == "done" and e.get("ifindex") == tap_index
            and (e["kind"] == "hook" or e["args"] == step.args)
            for e in same)
        return ok, ([] if ok else same)

    # -- apply -------------------------------------------------------------

    def apply(self, plan: Plan, *, reason: Reason) -> list[JSONObject]:
        """Apply ``plan`` in order; on failure undo this call's effects and raise."""
        nic: Nic = plan.nic
        tap_index = _current_ifindex(nic.tap)
        timings: list[JSONObject] = []
        applied: list[Entry] = []
        group: list[Step] = []
        try:
            for step in plan:
                done, stale = self._find_done(step, tap_index)
                if done:
                    timings.append({"step": step.name, "kind": "step", "ms": 0.0, "skipped": True})
                    continue
                if stale:
                    self._undo_entries(list(reversed(stale)), reason, [])
                hooks = self._hooks_for(step)
                if hooks is None:
                    group.append(step)
                    continue
                self._apply_group(group, nic, tap_index, applied, timings)
                group = []
                self._apply_hooked(step, hooks, nic, tap_index, reason, applied, timings)
            self._apply_group(group, nic, tap_index, applied, timings)
        except Exception as exc:
            failures = [_step_failure(exc, getattr(exc, "step", "?"))]
            self._undo_entries(list(reversed(applied)), "rollback", failures)
            raise NetconfError(
                f"{nic.nic_id}: {plan[0].phase if plan else '?'} failed at "
                f"{failures[0]['step']}: {failures[0]['error']}"
                + (f" (+{len(failures) - 1} rollback failures)" if len(failures) > 1 else ""),
                failures,
            ) from exc
        return timings

    def _apply_group(self, group: list[Step], nic: Nic, tap_index: int | None, applied: list[Entry],
                     timings: list[JSONObject]) -> None:
        if not group:
            return
        t0 = time.perf_counter()
        records: list[Entry] = []
        slots: list[Entry | None] = []
        staged = {e["step"]: e for e in self.journal.live(phases=(group[0].phase,), nic_id=group[0].nic_id)
                  if e.get("staged")}
        for step in group:
            pre = staged.get(step.name)
            if pre is not None and self._is_staged(pre, step, tap_index):
                slots.append(pre)  # journaled (and fsync'd) at stage(): nothing to write now
                continue
            try:
                prior = self._op(step.op).observe(step.args)
            except Exception as e:
                _at_step(e, step.name)
                raise
            records.append({"kind": "step", "step": step.name, "phase": step.phase, "nic_id": step.nic_id,
                            "op": step.op, "args": step.args, "prior": prior, "ifindex": tap_index})
            slots.append(None)
        added = iter(self.journal.add(records, sync=True) if records else [])
        entries = [slot if slot is not None else next(added) for slot in slots]
        timings.append({"step": "journal", "kind": "journal", "ms": (time.perf_counter() - t0) * 1e3,
                        "records": len(records)})
        for i, entry in enumerate(entries):
            t1 = time.perf_counter()
            try:
                result = self._op(entry["op"]).apply(entry["args"], entry["prior"], self._noter(entry))
            except Exception as e:
                applied.append(entry)  # pending: undo is safe whether or not it took effect
                for rest in entries[i + 1:]:
                    self.journal.set(rest, "void")
                _at_step(e, entry["step"])
                raise
            if _PAUSE_AFTER == entry["step"]:
                _test_pause()
            self.journal.set(entry, "done", result=result)
            applied.append(entry)
            timings.append({"step": entry["step"], "kind": "step", "ms": (time.perf_counter() - t1) * 1e3})

    def _noter(self, entry: Entry) -> Note:
        def note(**fields: Any) -> None:
            self.journal.set(entry, "pending", sync=True, prior=dict(entry["prior"], **fields))
        return note

    def _apply_hooked(self, step: Step, hooks: StepHooks, nic: Nic, tap_index: int | None, reason: Reason,
                      applied: list[Entry], timings: list[JSONObject]) -> None:
        for path in hooks.before:
            self._hook(step, "before", path, nic, tap_index, reason, applied, timings)
        if hooks.replace is not None:
            self._hook(step, "replace", hooks.replace, nic, tap_index, reason, applied, timings)
        else:
            self._apply_group([step], nic, tap_index, applied, timings)
        for path in hooks.after:
            self._hook(step, "after", path, nic, tap_index, reason, applied, timings)

    def _hook(self, step: Step, role: str, path: Path, nic: Nic, tap_index: int | None, reason: Reason,
              applied: list[Entry], timings: list[JSONObject]) -> None:
        (entry,) = self.journal.add([{
            "kind": "hook", "role": role, "path": str(path), "step": step.name, "phase": step.phase,
            "nic_id": step.nic_id, "nic": nic.to_dict(), "ifindex": tap_index,
        }], sync=True)
        t0 = time.perf_counter()
        try:
            self._run_hook(entry, "up", reason)
        except Exception as e:
            self.journal.set(entry, "failed", error=str(e))
            _at_step(e, step.name)
            raise
        self.journal.set(entry, "done")
        applied.append(entry)
        timings.append({"step": step.name, "kind": "hook", "role": role, "path": str(path),
                        "ms": (time.perf_counter() - t0) * 1e3})

    # -- undo --------------------------------------------------------------

    def _undo_one(self, entry: Entry, reason: Reason) -> None:
        if entry["kind"] == "hook":
            self._run_hook(entry, "down", reason)
            return
        result = entry.get("result") if entry["status"] == "done" else None
        self._op(entry["op"]).undo(entry["args"], entry["prior"], result)

    def _undo_entries(self, entries: Iterable[Entry], reason: Reason, failures: list[Failure]) -> None:
        for entry in entries:
            try:
                self._undo_one(entry, reason)
            except Exception as e:  # noqa: BLE001 - recorded as a failure; the other undos go on
                extra = {"path": entry["path"]} if entry["kind"] == "hook" else {}
                failures.append(_step_failure(e, entry["step"], nic_id=entry["nic_id"], **extra))
                continue
            self.journal.set(entry, "undone")

    def undo(self, *, reason: Reason, phases: Iterable[str] | None = None, nic_id: str | None = None) -> None:
        """Undo what the journal owns (optionally only ``phases`` / one NIC), newest first.

        Keeps going past failures; failed entries stay in the journal (a
        later undo retries them) and one :class:`NetconfError` lists all.
        """
        failures: list[Failure] = []
        self._undo_entries(reversed(self.journal.live(phases=phases, nic_id=nic_id)), reason, failures)
        self.journal.maybe_compact()
        if failures:
            raise NetconfError(
                f"undo ({reason}): {len(failures)} step(s) failed: "
                + "; ".join(f"{f['step']}: {f['error']}" for f in failures),
                failures,
            )

    def changed_steps(self, plans: Iterable[Plan], nic_id: str) -> list[str]:
        """The steps of ``nic_id`` whose journaled effect differs from ``plans`` (a live change's
        diff against what the host holds): a step the plans no longer have, or have with other
        args.  Steps the plans add are not listed (:meth:`apply` sees them as not done)."""
        want = {(s.phase, s.name): s.args for p in plans for s in p}
        phases = {s.phase for p in plans for s in p} | {"attach", "activate"}
        out: list[str] = []
        for e in self.journal.live(phases=phases, nic_id=nic_id):
            key = (e["phase"], e["step"])
            if key not in want or (e["kind"] == "step" and e["args"] != want[key]):
                if e["step"] not in out:
                    out.append(e["step"])
        return out

    def converge(self, plans: list[Plan], *, reason: Reason, undo_reason: Reason = "stop") -> dict[str, list[str]]:
        """Make one NIC's host state ``plans`` (its attach plan, then its activate plan), touching
        only what differs: every journaled step of the NIC that the plans drop or change is undone
        (with its hooks, newest first), then the plans are applied (a step done already with the
        same args is skipped).  A live NIC change and its rollback both use it.  Returns the step
        names undone and applied; raises :class:`NetconfError` as :meth:`apply` does (the steps
        undone here are not put back: the caller converges to the old plans for that)."""
        if not plans:
            return {"undone": [], "applied": []}
        nic_id = plans[0].nic.nic_id
        changed = set(self.changed_steps(plans, nic_id))
        failures: list[Failure] = []
        stale = [e for e in self.journal.live(phases=("attach", "activate"), nic_id=nic_id) if e["step"] in changed]
        self._undo_entries(reversed(stale), undo_reason, failures)
        if failures:
            raise NetconfError(f"{nic_id}: undoing {failures[0]['step']} failed: {failures[0]['error']}", failures)
        applied: list[str] = []
        for plan in plans:
            for t in self.apply(plan, reason=reason):
                if t.get("kind") == "step" and not t.get("skipped"):
                    applied.append(str(t["step"]))
        self.journal.maybe_compact()
        return {"undone": sorted(changed, key=lambda n: [e["step"] for e in stale].index(n)), "applied": applied}

    def recover(self, *, reason: Reason) -> None:
        """After a crash: resolve ``pending`` entries against the host, then undo everything.

        A pending entry's undo is written to be correct whether or not the
        effect reached the host (see :mod:`netconf._ops`): deletes match
        our proto marker and the tap's ifindex, restores write the recorded
        prior values.  Pending entries whose effect is absent therefore
        resolve to no-ops, present ones are removed.
        """
        self.undo(reason=reason)
        self.journal.compact()
