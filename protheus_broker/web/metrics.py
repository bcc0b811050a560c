"""Prometheus ``/metrics``: a custom collector that reads the live broker at scrape time."""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from protheus_broker import __version__
from protheus_broker.nodes.manager import NodeState
from protheus_broker.web.model import (STATES, Broker, license_status, unit_counters, unit_dependencies,
                                         unit_farm, unit_scale_to_zero, unit_scaler, units_of)

__all__ = ["BrokerCollector", "CONTENT_TYPE_LATEST", "render"]

_PREFIX = "protheus_broker"

#: The managed node states (nodes/manager.py).
NODE_STATES = tuple(state.value for state in NodeState)


#: The per-unit counters and their help, labelled ``pool`` (the unit's section).
COUNTER_HELP = (
    ("sessions_total", "Sessions accepted since start"),
    ("sessions_failed", "Sessions closed because no AppServer answered"),
    ("sessions_refused", "Connections refused by MAX_SESSIONS"),
    ("pending_refused", "Connections refused by MAX_PENDING or MAX_PENDING_PER_ADDRESS"),
    ("bytes_in", "Bytes from SmartClients to AppServers"),
    ("bytes_out", "Bytes from AppServers to SmartClients"),
    ("connect_failures", "Failed connects to AppServers"),
    ("drops", "Resumable sessions whose client dropped (held in standby)"),
    ("resumes", "Sessions resumed by a reconnecting client"),
    ("expiries", "Standby sessions that expired unresumed"),
    ("resume_failures", "Resume attempts refused"),
    ("unestablished_drops", "Resumable sessions ended because their link dropped before "
                            "they were established"),
    ("standby_evictions", "Standby sessions ended at STANDBY_MAX_SESSIONS to make room"),
    ("handshake_failures", "Failed TLS handshakes on the SmartClient port"),
    ("http_requests", "HTTP requests received (HTTP units)"),
    ("http_5xx", "HTTP requests answered 5xx, by the broker or the AppServer"),
    ("http_bad_requests", "HTTP requests refused as malformed (400, 408, 431)"),
    ("queue_full", "Web-services requests refused at once: the queue was full"),
    ("queue_timeouts", "Web-services requests that waited QUEUE_TIMEOUT and got 503"),
    ("license_seated", "Requests under a Stateless=1 URI that got a license seat"),
)

#: Per-unit gauges: (key of unit_counters, metric name, help).
GAUGE_HELP = (
    ("standby", "standby_sessions", "Sessions held in standby now"),
    ("http_in_flight", "http_in_flight_requests", "HTTP requests being answered now"),
    ("queued", "queued_requests", "Web-services requests waiting in the queue now"),
    ("license_waiting", "license_waiting_requests", "Requests waiting for a license seat now"),
)


class BrokerCollector:
    """Yields the broker's metric families from its units, fresh at each scrape: every counter
    and every server metric is labelled ``pool`` (the unit's section)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def collect(self) -> Iterator[Any]:
        broker = self.broker
        now = broker.reactor.seconds()
        units = units_of(broker)
        per_unit = [(unit.name, unit_counters(unit)) for unit in units]

        info = GaugeMetricFamily(f"{_PREFIX}_info", "Broker version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(f"{_PREFIX}_uptime_seconds", "Seconds since the broker started",
                                value=now - broker.started_at)
        sessions = GaugeMetricFamily(f"{_PREFIX}_sessions", "Sessions open now", labels=["pool"])
        for name, totals in per_unit:
            sessions.add_metric([name], totals["sessions"])
        yield sessions
        for key, help_text in COUNTER_HELP:
            name = key[: -len("_total")] if key.endswith("_total") else key
            family = CounterMetricFamily(f"{_PREFIX}_{name}", help_text, labels=["pool"])
            for pool, totals in per_unit:
                family.add_metric([pool], totals[key])
            yield family
        for key, name, help_text in GAUGE_HELP:
            gauge = GaugeMetricFamily(f"{_PREFIX}_{name}", help_text, labels=["pool"])
            for pool, totals in per_unit:
                gauge.add_metric([pool], totals[key])
            yield gauge

        yield from _license_families(broker, units)
        yield from _farm_families(units)

        labels = ["pool", "server", "address"]
        state = GaugeMetricFamily(f"{_PREFIX}_server_state", "1 for the server's current state",
                                  labels=labels + ["state"])
        connections = GaugeMetricFamily(f"{_PREFIX}_server_connections",
                                        "Sessions through the broker on this server now", labels=labels)
        total = CounterMetricFamily(f"{_PREFIX}_server_sessions", "Sessions that reached this server",
                                    labels=labels)
        failures = CounterMetricFamily(f"{_PREFIX}_server_connect_failures",
                                       "Failed connects to this server", labels=labels)
        memory = GaugeMetricFamily(f"{_PREFIX}_server_memory_bytes", "Reported memory", labels=labels)
        users = GaugeMetricFamily(f"{_PREFIX}_server_users", "Reported users", labels=labels)
        threads = GaugeMetricFamily(f"{_PREFIX}_server_threads", "Reported threads", labels=labels)
        cpu = GaugeMetricFamily(f"{_PREFIX}_server_cpu_percent", "Reported CPU", labels=labels)
        age = GaugeMetricFamily(f"{_PREFIX}_server_metrics_age_seconds", "Age of the last report",
                                labels=labels)
        for unit in units:
            for backend in unit.pool:
                values = [unit.name, backend.server_id, backend.address]
                for name in STATES:
                    state.add_metric(values + [name], 1 if backend.state.value == name else 0)
                connections.add_metric(values, backend.active)
                total.add_metric(values, backend.total)
                failures.add_metric(values, backend.connect_failures)
                metrics = backend.metrics
                if metrics is not None:
                    memory.add_metric(values, metrics.memory_bytes)
                    users.add_metric(values, metrics.users)
                    threads.add_metric(values, metrics.threads)
                    cpu.add_metric(values, metrics.cpu_percent)
                    age.add_metric(values, max(0.0, now - metrics.taken_at))
        yield from (state, connections, total, failures, memory, users, threads, cpu, age)

        labels = ["pool", "dependency", "address"]
        up = GaugeMetricFamily(f"{_PREFIX}_dependency_up", "1 while the dependency (DEPENDS_ON) is up, "
                               "0 while it is down or not checked yet: the unit takes no new session",
                               labels=labels)
        refused = CounterMetricFamily(f"{_PREFIX}_dependency_refusals", "New sessions or requests "
                                      "refused because the dependency was down", labels=labels)
        since = GaugeMetricFamily(f"{_PREFIX}_dependency_state_seconds", "Seconds since the "
                                  "dependency last went up or down", labels=labels)
        for unit in units:
            for entry in unit_dependencies(unit, now):
                values = [unit.name, entry["name"], entry["where"]]
                up.add_metric(values, 1 if entry["state"] == "up" else 0)
                refused.add_metric(values, entry["refused"])
                since.add_metric(values, entry["for_seconds"])
        yield from (up, refused, since)
        yield from self._nodes(units)

    def _nodes(self, units: list[Any]) -> Iterator[Any]:
        """Managed nodes: one state gauge per node and state, sessions, memory, crash streak."""
        labels = ["pool", "node", "persistent"]
        state = GaugeMetricFamily(f"{_PREFIX}_node_state", "1 for the managed node's current state",
                                  labels=labels + ["state"])
        sessions = GaugeMetricFamily(f"{_PREFIX}_node_sessions", "Sessions on this node now", labels=labels)
        memory = GaugeMetricFamily(f"{_PREFIX}_node_memory_bytes", "Resident memory of the node's processes",
                                   labels=labels)
        streak = GaugeMetricFamily(f"{_PREFIX}_node_crash_streak", "Node failures in a row", labels=["pool"])
        for unit in units:
            manager = getattr(unit, "nodes", None)
            if manager is None:
                continue
            streak.add_metric([unit.name], manager.crash_streak)
            for row in manager.snapshot():
                values = [unit.name, str(row["id"]), "1" if row["persistent"] else "0"]
                for name in NODE_STATES:
                    state.add_metric(values + [name], 1 if row["state"] == name else 0)
                sessions.add_metric(values, row["sessions"])
                if row["memory_bytes"] is not None:
                    memory.add_metric(values, row["memory_bytes"])
        yield from (state, sessions, memory, streak)
        yield from self._scale_to_zero(units)
        yield from self._kubernetes(units)

    def _scale_to_zero(self, units: list[Any]) -> Iterator[Any]:
        """Scale to zero: waking, held sessions, target, wakes and refusals per pool."""
        waking = GaugeMetricFamily(f"{_PREFIX}_wake_waking", "1 while a wake waits for a ready AppServer",
                                   labels=["pool"])
        held = GaugeMetricFamily(f"{_PREFIX}_wake_held_sessions", "Sessions held while a node wakes",
                                 labels=["pool"])
        target = GaugeMetricFamily(f"{_PREFIX}_wake_target", "AppServers scale to zero asks for", labels=["pool"])
        wakes = CounterMetricFamily(f"{_PREFIX}_wakes", "Wakes from zero", labels=["pool"])
        refused = CounterMetricFamily(f"{_PREFIX}_wake_refused", "Sessions refused while waking",
                                      labels=["pool", "why"])
        for unit in units:
            snap = unit_scale_to_zero(unit)
            if snap is None:
                continue
            waking.add_metric([unit.name], 1 if snap["waking"] else 0)
            held.add_metric([unit.name], snap["held"])
            target.add_metric([unit.name], snap["target"] or 0)
            wakes.add_metric([unit.name], snap["wakes"])
            refused.add_metric([unit.name, "max_held"], snap["refused_full"])
            refused.add_metric([unit.name, "wake_timeout"], snap["refused_timeout"])
        yield from (waking, held, target, wakes, refused)

    def _kubernetes(self, units: list[Any]) -> Iterator[Any]:
        """The Kubernetes scaler per pool: replicas asked for and ready, watch restarts, 410s, errors."""
        desired = GaugeMetricFamily(f"{_PREFIX}_kube_desired_replicas",
                                    "Replicas the Kubernetes scaler last asked for", labels=["pool", "workload"])
        ready = GaugeMetricFamily(f"{_PREFIX}_kube_ready_replicas",
                                  "Ready endpoints of the Service (pool members)", labels=["pool", "workload"])
        restarts = CounterMetricFamily(f"{_PREFIX}_kube_watch_restarts",
                                       "EndpointSlice watches opened after the first", labels=["pool", "workload"])
        gone = CounterMetricFamily(f"{_PREFIX}_kube_watch_gone",
                                   "Watches ended by 410 Gone (then re-listed)", labels=["pool", "workload"])
        errors = CounterMetricFamily(f"{_PREFIX}_kube_errors", "Kubernetes API errors (list, watch, scale)",
                                     labels=["pool", "workload"])
        for unit in units:
            snap = unit_scaler(unit)
            if snap is None:
                continue
            labels = [unit.name, str(snap.get("workload", ""))]
            counts: Any = snap.get("counts") or {}
            desired.add_metric(labels, snap.get("desired") or 0)
            ready.add_metric(labels, snap.get("ready") or 0)
            restarts.add_metric(labels, max(0, counts.get("watches", 0) - 1))
            gone.add_metric(labels, counts.get("gone", 0))
            errors.add_metric(labels, counts.get("errors", 0))
        yield from (desired, ready, restarts, gone, errors)


def _license_families(broker: Any, units: list[Any]) -> Iterator[Any]:
    """503s for lack of a license by unit and reason; with a license client, its channel and
    the seats per class (held, in use, free) and the requests waiting per class."""
    refused = CounterMetricFamily(f"{_PREFIX}_license_refused", "Requests answered 503 for lack of a license seat",
                                  labels=["pool", "reason"])
    for unit in units:
        gate = getattr(unit, "gate", None)
        if gate is not None:
            for reason, count in sorted(gate.refused.items()):
                refused.add_metric([unit.name, reason], count)
    yield refused
    client = license_status(broker)
    if client is None:
        return
    yield GaugeMetricFamily(f"{_PREFIX}_license_connected", "1 while the license channel is up",
                            value=1 if client["connected"] else 0)
    seats = GaugeMetricFamily(f"{_PREFIX}_license_seats", "License seats held by this broker, by class and state",
                              labels=["license_class", "state"])
    waiting = GaugeMetricFamily(f"{_PREFIX}_license_class_waiting", "Requests waiting for a seat, by class",
                                labels=["license_class"])
    for name, figures in client["classes"].items():
        for state in ("held", "in_use", "free"):
            seats.add_metric([name, state], figures[state])
        waiting.add_metric([name], figures["waiting"])
    yield seats
    yield waiting


def _farm_families(units: list[Any]) -> Iterator[Any]:
    """FARM_HOSTS: 1 while the broker's channel to the farm host's agent is up, and the nodes
    placed there."""
    up = GaugeMetricFamily(f"{_PREFIX}_farm_link_up", "1 while the channel to the farm host's agent "
                           "is up (its nodes keep running while it is down)", labels=["pool", "host"])
    nodes = GaugeMetricFamily(f"{_PREFIX}_farm_nodes", "Managed nodes this broker placed on the farm host",
                              labels=["pool", "host"])
    for unit in units:
        for link in unit_farm(unit) or []:
            up.add_metric([unit.name, link["host"]], 1 if link["state"] == "up" else 0)
            nodes.add_metric([unit.name, link["host"]], len(link["nodes"]))
    yield up
    yield nodes


def render(broker: Broker) -> bytes:
    """The text exposition of the broker's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(broker))  # type: ignore[arg-type]
    return generate_latest(registry)
