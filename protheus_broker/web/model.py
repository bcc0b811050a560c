"""What the broker screen shows and does, as plain data: no HTTP here.

Everything reads the live objects (``BrokerService``: its units, each with its pool, factory
and stats recorder; the config) at the moment of the request.  Field names are the stable API documented in the README ("The broker screen").
"""

from __future__ import annotations

import collections
from typing import Any, Deque, Protocol as TypingProtocol

from twisted.logger import Logger

from protheus_broker import __version__
from protheus_broker.config import BrokerConfig, load_config
from protheus_broker.desktop.settings import DESKTOP_SECTION
from protheus_broker.ini import ConfigError
from protheus_broker.balancing.pool import ServerPool, ServerState, UnknownServer

log = Logger()

STATES = tuple(state.value for state in ServerState)
MAX_PER_PAGE = 500


class Broker(TypingProtocol):
    """What the screen needs from the broker (``tap.BrokerService`` is one)."""

    config: BrokerConfig
    units: list[Any]  # units.IBalanceUnit: name (section), config, pool, factory, stats, port
    reactor: Any
    started_at: float

    def reload(self) -> bool: ...


class ActionError(Exception):
    """An admin action or query that cannot be done: an HTTP status and a sentence."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ConnectionHistory:
    """Rings of samples of connections per server, for the chart: one ring per pool."""

    def __init__(self, samples: int = 120) -> None:
        self.size = samples
        self.rings: dict[str, Deque[dict[str, Any]]] = {}

    def sample(self, now: float, pool: ServerPool, name: str = DESKTOP_SECTION) -> None:
        ring = self.rings.setdefault(name, collections.deque(maxlen=self.size))
        ring.append({"t": round(now, 3), "connections": {b.server_id: b.active for b in pool}})

    def sample_units(self, now: float, units: list[Any]) -> None:
        """One sample of every unit's pool."""
        for unit in units:
            self.sample(now, unit.pool, unit.name)

    def as_list(self, name: str = DESKTOP_SECTION) -> list[dict[str, Any]]:
        return list(self.rings.get(name, ()))


def standby_of(factory: Any) -> Any:
    """The resumable-session store, or None (that feature absent or unused)."""
    return getattr(factory, "standby", None)


def _standby_sessions(factory: Any) -> list[dict[str, Any]]:
    standby = standby_of(factory)
    if standby is None:
        return []
    try:
        return [dict(entry) for entry in standby.snapshot()]
    except Exception:  # a status page must not fail because one part did
        log.failure("standby snapshot failed")
        return []


#: The counters a unit's resumable sessions record.
RESUME_COUNTERS = ("drops", "resumes", "expiries", "resume_failures", "unestablished_drops",
                   "standby_evictions")


class _FactoryUnit:
    """A bare ``BrokerFactory`` (and its pool) seen as one unit: what callers from before units
    hand the screen."""

    def __init__(self, factory: Any, pool: Any = None) -> None:
        self.name = DESKTOP_SECTION
        self.factory = factory
        self.pool = pool if pool is not None else factory.pool
        self.stats = factory.stats
        self.port = None


def units_of(broker: Any) -> list[Any]:
    """The broker's units; a bare factory, or anything with a ``pool`` and ``factory``, is one."""
    units = getattr(broker, "units", None)
    if units is not None:
        return list(units)
    if hasattr(broker, "sessions") and hasattr(broker, "stats"):  # a BrokerFactory
        return [_FactoryUnit(broker)]
    return [_FactoryUnit(broker.factory, broker.pool)]


def _recorded(unit: Any) -> dict[str, int]:
    """The unit's counters; a standby store with a recorder of its own adds the resume ones."""
    recorded: dict[str, int] = unit.stats.snapshot()
    standby = standby_of(unit.factory)
    own = getattr(standby, "stats", None)
    if own is not None and own is not unit.stats:
        mine = own.snapshot()
        for key in RESUME_COUNTERS:
            recorded[key] = mine[key]
    return recorded


def unit_counters(unit: Any) -> dict[str, int]:
    """One unit's totals (live sessions' bytes included), from its stats recorder."""
    factory = unit.factory
    recorded = _recorded(unit)
    sessions = list(factory.sessions.values())
    live_in = sum(s.client.received for s in sessions)
    live_out = sum(s.server.received for s in sessions if s.server is not None)
    standby = standby_of(factory)
    return {
        "sessions": len(sessions),
        "sessions_total": recorded["sessions_total"],
        "sessions_failed": recorded["sessions_failed"],
        "sessions_refused": recorded["sessions_refused"],
        "pending_refused": recorded["pending_refused"],
        "bytes_in": recorded["bytes_in"] + live_in,
        "bytes_out": recorded["bytes_out"] + live_out,
        "connect_failures": sum(b.connect_failures for b in unit.pool),
        "standby": int(getattr(standby, "count", 0)) if standby is not None else 0,
        "drops": recorded["drops"],
        "resumes": recorded["resumes"],
        "expiries": recorded["expiries"],
        "resume_failures": recorded["resume_failures"],
        "unestablished_drops": recorded["unestablished_drops"],
        "standby_evictions": recorded["standby_evictions"],
        "handshake_failures": recorded["handshake_failures"],
        **_http_counters(unit, recorded),
    }


def _http_counters(unit: Any, recorded: dict[str, int]) -> dict[str, int]:
    """What an HTTP unit adds: requests, 5xx answers, requests in flight, malformed requests,
    and the web-services queue (zero for a unit that has none)."""
    slots = getattr(unit, "slots", None)
    queue = slots.stats() if slots is not None else {}
    return {
        "http_requests": recorded.get("http_requests", 0),
        "http_5xx": recorded.get("http_5xx", 0),
        "http_in_flight": recorded.get("http_in_flight", 0),
        "http_bad_requests": recorded.get("http_bad_requests", 0),
        "queued": int(queue.get("queued", 0)),
        "queue_full": int(queue.get("queue_full", 0)),
        "queue_timeouts": int(queue.get("queue_timeouts", 0)),
        **_license_counters(unit),
    }


def _license_counters(unit: Any) -> dict[str, int]:
    """The license gate's figures (zero for a unit without one): requests waiting for a seat now,
    seated, and 503s for lack of a license."""
    gate = getattr(unit, "gate", None)
    if gate is None:
        return {"license_waiting": 0, "license_seated": 0, "license_refused": 0}
    return {"license_waiting": gate.waiting, "license_seated": gate.seated,
            "license_refused": sum(gate.refused.values())}


def license_status(broker: Any) -> dict[str, Any] | None:
    """The license client ([LICENSECLIENT]): connected, since, why, seats per class; None without one."""
    client = getattr(broker, "licenses", None)
    if client is None:
        return None
    status: dict[str, Any] = client.status()
    return status


def counters(broker: Any) -> dict[str, int]:
    """Broker-wide totals: the sum over the units (a bare factory is one unit)."""
    total: dict[str, int] = {}
    for unit in units_of(broker):
        for key, value in unit_counters(unit).items():
            total[key] = total.get(key, 0) + value
    return total


def _listen(unit: Any) -> str:
    port = getattr(unit, "port", None)
    if port is None:
        return ""
    host = port.getHost()
    return f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}"


def unit_servers(unit: Any, now: float) -> list[dict[str, Any]]:
    """The servers of one unit's pool, with their sessions in standby and the admin hold."""
    standby: collections.Counter[str] = collections.Counter(
        str(entry.get("server_id")) for entry in _standby_sessions(unit.factory))
    result = []
    slots = getattr(unit, "slots", None)  # [BALANCE_WEB_SERVICES]: per-server request caps
    for backend in unit.pool:
        entry = backend.snapshot(now)
        entry["standby"] = standby.get(backend.server_id, 0)
        entry["admin_hold"] = backend.admin_hold
        if slots is not None:
            entry["cap"] = slots.cap(backend.server_id)
            entry["in_flight"] = slots.in_flight(backend.server_id)
        result.append(entry)
    return result


def unit_nodes(unit: Any) -> dict[str, Any] | None:
    """The unit's managed nodes (None if it has no node manager)."""
    manager = getattr(unit, "nodes", None)
    if manager is None:
        return None
    policy = manager.policy
    return {"min_nodes": policy.min_nodes, "max_nodes": policy.max_nodes,
            "transport": policy.transport.value, "crash_streak": manager.crash_streak,
            "persistent_refused": manager.persistent_refused, "nodes": manager.snapshot()}


def unit_scale_to_zero(unit: Any) -> dict[str, Any] | None:
    """The unit's scale to zero (None when off): waking or not, held sessions, target, countdown."""
    controller = getattr(unit, "scale_to_zero", None)
    if controller is None:
        wake = getattr(unit, "wake", None)  # an HTTP unit's wake dispatcher, once given a controller
        controller = getattr(wake, "controller", None)
    return controller.snapshot() if controller is not None else None  # type: ignore[no-any-return]


def unit_scaler(unit: Any) -> dict[str, Any] | None:
    """The unit's Kubernetes scaler (None without ``KUBERNETES``): workload, replicas asked for and
    ready, the EndpointSlice watch (API version, resourceVersion) and its counts (lists, watches,
    410s, errors, patches)."""
    scaler = getattr(unit, "scaler", None)
    snapshot = getattr(scaler, "snapshot", None)
    return snapshot() if snapshot is not None else None  # type: ignore[no-any-return]


def unit_forecast(unit: Any, now: float) -> dict[str, Any] | None:
    """The warm-up's chart of today (None without WARMUP=1): forecast nodes per 15-minute slot
    against the sessions and nodes recorded."""
    controller = getattr(unit, "scale_to_zero", None)
    if controller is None:
        controller = getattr(getattr(unit, "wake", None), "controller", None)
    forecast = getattr(controller, "forecast", None)
    chart = getattr(forecast, "chart", None)
    return chart(now) if chart is not None else None  # type: ignore[no-any-return]


def unit_farm(unit: Any) -> list[dict[str, Any]] | None:
    """The unit's farm links (FARM_HOSTS): host, up or down, since, last problem, node ids on
    it; None without a farm."""
    spawner = getattr(getattr(unit, "nodes", None), "spawner", None)
    links = getattr(spawner, "snapshot", None)
    return links() if callable(links) else None


def servers(broker: Any) -> list[dict[str, Any]]:
    """Every unit's servers; each names its ``pool`` (the unit's section)."""
    now = broker.reactor.seconds()
    result = []
    for unit in units_of(broker):
        for entry in unit_servers(unit, now):
            entry["pool"] = unit.name
            result.append(entry)
    return result


def unit_dependencies(unit: Any, now: float) -> list[dict[str, Any]]:
    """The unit's DEPENDS_ON: each dependency's state (up, down, unchecked), since when, why, and
    the sessions it refused."""
    dependencies = getattr(unit, "dependencies", None)
    return dependencies.snapshot(now) if dependencies is not None else []


def dependencies(broker: Any) -> list[dict[str, Any]]:
    """Every dependency some unit names, once, with the units (``pools``) that name it."""
    now = broker.reactor.seconds()
    found: dict[str, dict[str, Any]] = {}
    for unit in units_of(broker):
        for entry in unit_dependencies(unit, now):
            shared = found.setdefault(entry["name"], {**entry, "refused": 0, "pools": []})
            shared["refused"] += entry["refused"]
            shared["pools"].append(unit.name)
    return list(found.values())


def pool_status(unit: Any, admin: Any, history: ConnectionHistory | None, now: float) -> dict[str, Any]:
    """One unit as the screen shows it."""
    config = unit.config
    return {
        "name": config.service_name,
        "section": unit.name,
        "listen": _listen(unit),
        "sort_method": config.effective_sort_method.value,
        "sort_method_configured": config.sort_method.value,
        "monitoring_type": config.monitoring_type.value,
        "max_sessions": config.max_sessions,
        "sessions": len(unit.factory.sessions),
        "servers": unit_servers(unit, now),
        "nodes": unit_nodes(unit),
        "scale_to_zero": unit_scale_to_zero(unit),
        "scaler": unit_scaler(unit),
        "dependencies": unit_dependencies(unit, now),
        "forecast": unit_forecast(unit, now),
        "farm": unit_farm(unit),
        "totals": unit_counters(unit),
        "license": unit.gate.status() if getattr(unit, "gate", None) is not None else None,
        "history": {
            "interval_seconds": admin.history_interval if admin else None,
            "samples": history.as_list(unit.name) if history is not None else [],
        },
    }


def status(broker: Broker, history: ConnectionHistory | None = None) -> dict[str, Any]:
    """The whole screen: broker, totals, pools (one per unit) with their servers and history."""
    now = broker.reactor.seconds()
    admin = broker.config.admin
    return {
        "version": __version__,
        "now": round(now, 3),
        "started_at": round(broker.started_at, 3),
        "uptime_seconds": round(now - broker.started_at, 3),
        "config_path": broker.config.path,
        "totals": counters(broker),
        "pools": [pool_status(unit, admin, history, now) for unit in units_of(broker)],
        "dependencies": dependencies(broker),
        "license_client": license_status(broker),
        "admin": {
            "actions": bool(admin and admin.token_hash),
            "read_access": admin.read_access.value if admin else None,
        },
    }


def sessions(broker: Broker, page: int = 1, per_page: int = 50) -> dict[str, Any]:
    """One page of live sessions (oldest first, every unit) and the sessions held in standby."""
    if page < 1:
        raise ActionError(400, f"page must be 1 or more, got {page}")
    if not 1 <= per_page <= MAX_PER_PAGE:
        raise ActionError(400, f"per_page must be 1 to {MAX_PER_PAGE}, got {per_page}")
    now = broker.reactor.seconds()
    live = sorted(((session, unit.name) for unit in units_of(broker)
                   for session in unit.factory.sessions.values()),
                  key=lambda pair: pair[0].session_id)
    total = len(live)
    chosen = live[(page - 1) * per_page: page * per_page]
    rows = []
    for session, pool in chosen:
        backend, server = session.backend, session.server
        rows.append({
            "id": session.session_id,
            "pool": pool,
            "client": session.client_address,
            "server": backend.server_id if backend is not None else None,
            "server_address": backend.address if backend is not None else None,
            "state": "open" if server is not None else "connecting",
            "started_at": round(session.started, 3),
            "duration_seconds": round(now - session.started, 3),
            "bytes_in": session.client.received,
            "bytes_out": server.received if server is not None else 0,
        })
    standby = []
    for unit in units_of(broker):
        for entry in _standby_sessions(unit.factory):
            entry.setdefault("pool", unit.name)
            standby.append(entry)
    return {
        "page": page, "per_page": per_page, "total": total,
        "pages": max(1, -(-total // per_page)), "sessions": rows,
        "standby": standby,
    }


# --- admin actions ---------------------------------------------------------------------------

def find_server(broker: Broker, server_id: str, pool: str | None = None) -> tuple[Any, Any]:
    """(unit, backend) of *server_id*: in the unit of section *pool*, or in the only unit
    that has it (409 when several do: the caller names the pool)."""
    units = list(units_of(broker))
    if pool is not None:
        units = [unit for unit in units if unit.name == pool]
        if not units:
            names = ", ".join(unit.name for unit in units_of(broker))
            raise ActionError(404, f"no pool {pool!r} (pools: {names})")
    found = []
    for unit in units:
        try:
            found.append((unit, unit.pool.get(server_id)))
        except UnknownServer:
            pass
    if not found:
        where = f"pool {pool}" if pool is not None else "the pool"
        raise ActionError(404, f"no server {server_id!r} in {where}")
    if len(found) > 1:
        names = ", ".join(unit.name for unit, _ in found)
        raise ActionError(409, f"server {server_id!r} is in several pools ({names}): name one "
                               "with ?pool=<section>")
    return found[0]


def server_action(broker: Broker, server_id: str, action: str, who: str,
                  pool: str | None = None) -> dict[str, Any]:
    """drain (no new sessions, existing ones continue), ready (back in rotation), down (no new
    sessions and monitoring does not bring it back until ready).  *pool* (a section) picks the
    pool when several have a server of that id."""
    if action not in ("drain", "ready", "down"):
        raise ActionError(404, f"unknown server action {action!r} (drain, ready, down)")
    unit, backend = find_server(broker, server_id, pool)
    servers_pool = unit.pool
    if action == "drain":
        backend.admin_hold = False
        servers_pool.set_state(server_id, ServerState.DRAINING, f"drained by admin ({who})")
    elif action == "ready":
        if backend.leaving:
            raise ActionError(409, f"server {server_id} was removed from the config; it leaves when "
                                   "its last session ends")
        backend.admin_hold = False
        servers_pool.set_state(server_id, ServerState.UP, f"made ready by admin ({who})")
    else:
        backend.admin_hold = True
        servers_pool.set_state(server_id, ServerState.DOWN, f"marked down by admin ({who})")
    log.info("admin {who}: {action} server {server_id}", who=who, action=action, server_id=server_id,
             pool=unit.name)
    return {"ok": True, "action": action, "pool": unit.name,
            "server": backend.snapshot(broker.reactor.seconds())}


NODE_ACTIONS = ("recycle", "discard")


def _node_unit(broker: Broker, pool: str | None) -> Any:
    """The unit with managed nodes: the one of section *pool*, or the only one there is."""
    units = [unit for unit in units_of(broker) if getattr(unit, "nodes", None) is not None]
    if pool is not None:
        units = [unit for unit in units if unit.name == pool]
    if not units:
        where = f"pool {pool!r}" if pool is not None else "any pool"
        raise ActionError(404, f"no managed nodes in {where}")
    if len(units) > 1:
        raise ActionError(409, "several pools have managed nodes: name one with ?pool=<section>")
    return units[0]


def node_action(broker: Broker, node_id: str, action: str, who: str,
                pool: str | None = None) -> dict[str, Any]:
    """recycle (a replacement first when needed, then discarded) or discard (no new sessions;
    stopped when its last session ends) a managed node."""
    if action not in NODE_ACTIONS:
        raise ActionError(404, f"unknown node action {action!r} (recycle, discard)")
    if not node_id.isdigit():
        raise ActionError(400, f"node id must be a whole number, got {node_id!r}")
    unit = _node_unit(broker, pool)
    manager = unit.nodes
    number = int(node_id)
    node = manager.nodes.get(number)
    if node is None:
        raise ActionError(404, f"no node {number} in pool {unit.name}")
    why = f"{action} by admin ({who})"
    done = manager.recycle(number, why) if action == "recycle" else manager.discard(number, why)
    if not done:
        raise ActionError(409, f"node {number} is {node.state.value}: cannot {action} it")
    log.info("admin {who}: {action} node {node_id}", who=who, action=action, node_id=number, pool=unit.name)
    return {"ok": True, "action": action, "pool": unit.name, "nodes": manager.snapshot()}


def scale_nodes(broker: Broker, min_nodes: int, who: str, pool: str | None = None) -> dict[str, Any]:
    """Set the pool's MIN_NODES for this run (0..MAX_NODES): nodes start or idle ones go."""
    unit = _node_unit(broker, pool)
    manager = unit.nodes
    if not 0 <= min_nodes <= manager.policy.max_nodes:
        raise ActionError(400, f"min must be 0 to MAX_NODES={manager.policy.max_nodes}, got {min_nodes}")
    manager.scale(min_nodes)
    log.info("admin {who}: scale nodes to {min_nodes}", who=who, min_nodes=min_nodes, pool=unit.name)
    return {"ok": True, "action": "scale", "pool": unit.name, "min_nodes": min_nodes,
            "nodes": manager.snapshot()}


def close_session(broker: Broker, session_id: int, who: str) -> dict[str, Any]:
    """Close a live session (ids are unique across the units)."""
    session = None
    for unit in units_of(broker):
        session = unit.factory.sessions.get(session_id)
        if session is not None:
            break
    if session is None:
        raise ActionError(404, f"no live session {session_id}")
    log.info("admin {who}: close session {session_id} ({client})", who=who,
             session_id=session_id, client=session.client_address)
    session.close(f"closed by admin ({who})")
    return {"ok": True, "action": "close", "session": session_id}


def reload(broker: Broker, who: str) -> dict[str, Any]:
    log.info("admin {who}: reload {path}", who=who, path=broker.config.path)
    try:
        load_config(broker.config.path)  # the same check reload() makes, for its message
    except ConfigError as exc:
        raise ActionError(409, f"reload refused, the running config is kept: {exc}") from None
    if not broker.reload():
        raise ActionError(409, "reload refused: the config has an error (see the broker log); "
                               "the running config is kept")
    return {"ok": True, "action": "reload", "config_path": broker.config.path}
