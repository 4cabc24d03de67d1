"""Prometheus metrics for ``GET /metrics``, fed by the event log.

Why events and not calls sprinkled through the code: every interesting thing
an instance does is already an event (``instance.<state>``, ``instance.started``
with its start timings, ``netconf.applied`` with its duration), so one event
sink (:meth:`EventLog.subscribe_sink`) sees all of it, and the metrics can
never disagree with the stream operators read.  The one exception is the
instances-by-state gauge, which is read from the node at scrape time, so it is
right even for instances that were reattached rather than started here.

The metrics live in their own :class:`CollectorRegistry` (not the process-wide
default), so two daemons in one test process, or a unit test, never share
counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from ._state import State

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: seconds; a TCG guest start is ~0.1-1 s up to QMP+netconf+cont, netconf is ms.
_START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
_NETCONF_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)


class _InstancesByState:
    """A collector that counts the node's instances per state at scrape time."""

    def __init__(self, node) -> None:
        self._node = node

    def collect(self):
        g = GaugeMetricFamily("qsup_instances", "Instances known to this node, by state", labels=["state"])
        counts = {s.value: 0 for s in State}
        for inst in self._node.list():
            counts[inst.state.value] = counts.get(inst.state.value, 0) + 1
        for state, n in counts.items():
            g.add_metric([state], n)
        yield g


class Metrics:
    """The daemon's metrics.  Attach with :meth:`watch` (events) and :meth:`observe_node`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter("qsup_events_emitted", "Events emitted, by type family", ["family"], registry=r)
        self.start_seconds = Histogram(
            "qsup_instance_start_seconds", "Start to running (spawn, QMP, netconf, cont)",
            buckets=_START_BUCKETS, registry=r)
        self.netconf_seconds = Histogram(
            "qsup_netconf_apply_seconds", "Host network configuration per instance start",
            buckets=_NETCONF_BUCKETS, registry=r)
        self.requests = Counter("qsup_http_requests", "HTTP requests answered", ["method", "status"], registry=r)
        self.followers = 0
        r.register(_Followers(self))

    def observe_node(self, node) -> None:
        self.registry.register(_InstancesByState(node))

    def watch(self, events) -> None:
        events.subscribe_sink(self.on_event)

    def on_event(self, ev: dict) -> None:
        """Event sink: cheap, never raises into the emitter (the EventLog guards it anyway)."""
        type_ = ev.get("type", "")
        # Label by family ("instance.running", "qmp", "netconf.applied"): QMP event names are
        # QEMU's to invent, so they are folded to keep the label set bounded.
        family = "qmp" if type_.startswith("qmp.") else type_
        self.events.labels(family).inc()
        if type_ == "instance.started":
            total = (ev.get("timings_ms") or {}).get("total")
            if isinstance(total, (int, float)):
                self.start_seconds.observe(total / 1000)
        elif type_ == "netconf.applied":
            ms = ev.get("ms")
            if isinstance(ms, (int, float)):
                self.netconf_seconds.observe(ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Followers:
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self):
        g = GaugeMetricFamily("qsup_event_followers", "Open GET /v1/events?follow=true streams")
        g.add_metric([], self._m.followers)
        yield g
