"""Prometheus metrics for ``GET /metrics``, fed by the event log, the node and the QMP glue.

Why events and not calls sprinkled through the code: every interesting thing an instance does is
already an event (``instance.<state>``, ``instance.started`` with its start timings,
``netconf.applied``, ``migration.completed``/``failed``/``activated`` with their figures,
``netconf.failed``/``undo_failed`` with their failures), so one event sink
(:meth:`EventLog.subscribe_sink`) sees all of it, and the metrics never disagree with the stream
operators read.  The exceptions:

* per-instance info and state, and the instances-by-state gauge, are read from the node at
  scrape time, so they are right even for instances that were reattached, not started here;
* QMP call latency and errors come from ``qmp_glue.observe_calls`` (a command is not an event);
* HTTP latency is observed by the API's outer layer, per route template (bounded labels).

The metrics live in their own :class:`CollectorRegistry` (not the process-wide default), so two
daemons in one test process, or a unit test, never share counters.  The ``_created`` series
prometheus_client adds to counters and histograms are turned off: they double the output and no
dashboard reads them.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from importlib import metadata
from typing import ClassVar

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

from qmp_glue._client import observe_calls

from .._state import State

prometheus_client.disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: seconds; a TCG guest start is ~0.1-1 s up to QMP+netconf+cont, netconf is ms.
_START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
_NETCONF_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
#: a whole migration: seconds (256 MiB over loopback ~1-3 s; real guests, minutes)
_MIGRATION_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900)
#: downtime, switchover gap, activation: milliseconds to a second or two
_PAUSE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
#: QMP and HTTP calls: sub-millisecond to a stop's seconds
_CALL_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5, 10, 60)

_MIGRATION_RESULTS = {"completed", "failed", "cancelled", "postcopy-paused"}
_QMP_OUTCOMES = {"qmp_error", "timeout", "connection_lost", "cancelled"}


def _version() -> str:
    try:
        return metadata.version("qsup")
    except metadata.PackageNotFoundError:
        return "unknown"


def _seconds(ms) -> float | None:
    return ms / 1000 if isinstance(ms, (int, float)) and not isinstance(ms, bool) and ms >= 0 else None


class _NodeCollector:
    """Scrape-time gauges read from the node: instances by state, per-instance info and state."""

    def __init__(self, node) -> None:
        self._node = node

    def collect(self):
        by_state = GaugeMetricFamily("qsup_instances", "Instances known to this node, by state", labels=["state"])
        info = InfoMetricFamily("qsup_instance", "One series per instance: its spec's facts",
                                labels=["instance", "memory_mib", "vcpus", "accel", "nics"])
        state = GaugeMetricFamily("qsup_instance_state",
                                  "1 for the instance's current state, 0 for the others", labels=["instance", "state"])
        outdated = GaugeMetricFamily(
            "qsup_instance_qemu_outdated", "1 when the instance's running QEMU is not the installed binary "
            "(replaced on disk since it started, or another file): `qsup upgrade` it",
            labels=["instance", "version"])
        counts = {s.value: 0 for s in State}
        for inst in self._node.list():
            qemu = inst.qemu_identity()
            if qemu is not None:
                outdated.add_metric([inst.name, str(qemu.get("version") or "")], 1 if qemu["outdated"] else 0)
            cur = inst.state.value
            counts[cur] = counts.get(cur, 0) + 1
            spec = inst.spec
            info.add_metric([inst.name, str(spec.memory), str(spec.vcpus), spec.accel or "",
                             str(len(spec.nics))], {})
            for s in State:
                state.add_metric([inst.name, s.value], 1 if s.value == cur else 0)
        for value, n in counts.items():
            by_state.add_metric([value], n)
        yield by_state
        yield info
        yield state
        yield outdated


class _Followers:
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self):
        g = GaugeMetricFamily("qsup_event_followers", "Open GET /v1/events?follow=true streams")
        g.add_metric([], self._m.followers)
        yield g


class Metrics:
    """The daemon's metrics.  Attach with :meth:`watch` (events) and :meth:`observe_node`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        info = InfoMetricFamily("qsup_build", "qsup's version and its Python")
        info.add_metric([], {"version": _version(), "python": platform.python_version(),
                             "implementation": platform.python_implementation()})
        r.register(_Static([info]))
        self.events = Counter("qsup_events_emitted", "Events emitted, by type family", ["family"], registry=r)
        self.start_seconds = Histogram(
            "qsup_instance_start_seconds", "Start to running (spawn, QMP, netconf, cont)",
            buckets=_START_BUCKETS, registry=r)
        self.netconf_seconds = Histogram(
            "qsup_netconf_apply_seconds", "Host network configuration per instance start",
            buckets=_NETCONF_BUCKETS, registry=r)
        self.netconf_failures = Counter(
            "qsup_netconf_failures", "Host network configuration that failed (start rolled back, or L3 at activation)",
            registry=r)
        self.undo_failures = Counter(
            "qsup_netconf_undo_failures", "Netconf undo runs that left journal entries behind, by reason",
            ["reason"], registry=r)
        self.hook_failures = Counter(
            "qsup_hook_failures", "Hooks that failed (non-zero exit, signal, timeout), by step", ["step"], registry=r)
        self.migration_seconds = Histogram(
            "qsup_migration_duration_seconds", "Source: migrate to completed", buckets=_MIGRATION_BUCKETS, registry=r)
        self.migration_downtime = Histogram(
            "qsup_migration_downtime_seconds", "Source: the guest's downtime as QEMU reports it",
            buckets=_PAUSE_BUCKETS, registry=r)
        self.migration_gap = Histogram(
            "qsup_migration_switchover_gap_seconds",
            "Source guest STOP to destination completed, by QEMU's clocks (no node holds the guest's L3)",
            buckets=_PAUSE_BUCKETS, registry=r)
        self.migration_activation = Histogram(
            "qsup_migration_activation_seconds",
            "Destination: QEMU's completed to L3 applied (until=l3) and to cont returned (until=cont)",
            ["until"], buckets=_PAUSE_BUCKETS, registry=r)
        self.migrations = Counter(
            "qsup_migrations", "Migrations that ended, by direction and result", ["direction", "result"], registry=r)
        self.qmp_seconds = Histogram(
            "qsup_qmp_call_seconds", "QMP command round trips, by command", ["command"],
            buckets=_CALL_BUCKETS, registry=r)
        self.qmp_errors = Counter(
            "qsup_qmp_call_errors", "QMP commands that failed, by command and kind", ["command", "kind"], registry=r)
        self.requests = Counter("qsup_http_requests", "HTTP requests answered",
                                ["method", "route", "status"], registry=r)
        self.request_seconds = Histogram(
            "qsup_http_request_duration_seconds", "HTTP request to response headers, by route",
            ["method", "route"], buckets=_CALL_BUCKETS, registry=r)
        self.followers = 0
        r.register(_Followers(self))
        for until in ("l3", "cont"):
            self.migration_activation.labels(until)
        observe_calls(self.on_qmp_call)

    def observe_node(self, node) -> None:
        self.registry.register(_NodeCollector(node))

    def watch(self, events) -> None:
        events.subscribe_sink(self.on_event)

    # -- sinks -----------------------------------------------------------------------------------

    def on_qmp_call(self, command: str, seconds: float, outcome: str | None) -> None:
        """qmp_glue's observer: every ``execute`` (trio thread).  ``outcome`` None is success."""
        self.qmp_seconds.labels(command).observe(seconds)
        if outcome is not None:
            self.qmp_errors.labels(command, outcome if outcome in _QMP_OUTCOMES else "other").inc()

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(method, route).observe(seconds)

    def on_event(self, ev: dict) -> None:
        """Event sink: cheap, never raises into the emitter (the EventLog guards it anyway)."""
        type_ = ev.get("type", "")
        # Label by family ("instance.running", "qmp", "netconf.applied"): QMP event names are
        # QEMU's to invent, so they are folded to keep the label set bounded.
        family = "qmp" if type_.startswith("qmp.") else type_
        self.events.labels(family).inc()
        handler = self._EVENT_HANDLERS.get(type_)
        if handler is not None:
            handler(self, ev)

    def _started(self, ev: dict) -> None:
        _observe(self.start_seconds, (ev.get("timings_ms") or {}).get("total"))

    def _netconf_applied(self, ev: dict) -> None:
        _observe(self.netconf_seconds, ev.get("ms"))

    def _netconf_failed(self, ev: dict) -> None:
        self.netconf_failures.inc()
        self._hooks(ev)

    def _undo_failed(self, ev: dict) -> None:
        self.undo_failures.labels(str(ev.get("reason") or "unknown")[:32]).inc()
        self._hooks(ev)

    def _hooks(self, ev: dict) -> None:
        for f in ev.get("failures") or []:
            if isinstance(f, dict) and f.get("path"):  # a hook's failure carries its path
                self.hook_failures.labels(str(f.get("step") or "unknown")[:64]).inc()

    def _migration_completed(self, ev: dict) -> None:
        self.migrations.labels("out", "completed").inc()
        _observe(self.migration_seconds, ev.get("total_ms"))
        _observe(self.migration_downtime, ev.get("downtime_ms"))
        _observe(self.migration_gap, ev.get("switchover_ms"))

    def _migration_failed(self, ev: dict) -> None:
        result = ev.get("result")
        self.migrations.labels("out", result if result in _MIGRATION_RESULTS else "failed").inc()

    def _postcopy_lost(self, ev: dict) -> None:
        self.migrations.labels("out", "postcopy_lost").inc()

    def _migration_activated(self, ev: dict) -> None:
        self.migrations.labels("in", "activated").inc()
        _observe(self.migration_activation.labels("l3"), ev.get("event_to_l3_ms"))
        _observe(self.migration_activation.labels("cont"), ev.get("event_to_cont_ms"))

    def _activation_failed(self, ev: dict) -> None:
        self.netconf_failures.inc()  # (the guest still runs: activation goes on without L3)
        self._hooks(ev)

    def _incoming_timeout(self, ev: dict) -> None:
        self.migrations.labels("in", "timeout").inc()

    #: event type -> its handler (plain functions: ``on_event`` passes the instance)
    _EVENT_HANDLERS: ClassVar[dict[str, Callable[[Metrics, dict], None]]] = {
        "instance.started": _started,
        "netconf.applied": _netconf_applied,
        "netconf.failed": _netconf_failed,
        "netconf.undo_failed": _undo_failed,
        "migration.completed": _migration_completed,
        "migration.failed": _migration_failed,
        "migration.postcopy_lost": _postcopy_lost,
        "migration.activated": _migration_activated,
        "migration.activation_failed": _activation_failed,
        "migration.incoming_timeout": _incoming_timeout,
    }

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _observe(histogram, ms) -> None:
    s = _seconds(ms)
    if s is not None:
        histogram.observe(s)


class _Static:
    def __init__(self, families) -> None:
        self._families = families

    def collect(self):
        yield from self._families
