"""What the broker screen shows and does, as plain data: no HTTP here.

Everything reads the live objects (``BrokerService``: its pool, factory, config) at the moment
of the request.  Field names are the stable API documented in the README ("The broker screen").
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
    pool: ServerPool
    factory: Any  # proxy.BrokerFactory
    reactor: Any
    started_at: float
    port: Any

    def reload(self) -> bool: ...


class ActionError(Exception):
    """An admin action or query that cannot be done: an HTTP status and a sentence."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ConnectionHistory:
    """A ring of samples of connections per server, for the chart (one pool)."""

    def __init__(self, samples: int = 120) -> None:
        self.samples: Deque[dict[str, Any]] = collections.deque(maxlen=samples)

    def sample(self, now: float, pool: ServerPool) -> None:
        self.samples.append({"t": round(now, 3),
                             "connections": {b.server_id: b.active for b in pool}})

    def as_list(self) -> list[dict[str, Any]]:
        return list(self.samples)


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


def counters(factory: Any) -> dict[str, int]:
    """Broker-wide totals (live sessions' bytes included)."""
    sessions = list(factory.sessions.values())
    live_in = sum(s.client.received for s in sessions)
    live_out = sum(s.server.received for s in sessions if s.server is not None)
    standby = standby_of(factory)
    return {
        "sessions": len(sessions),
        "sessions_total": factory.sessions_total,
        "sessions_failed": factory.sessions_failed,
        "sessions_refused": factory.refused_total,
        "pending_refused": int(getattr(factory, "refused_pending_total", 0)),
        "bytes_in": getattr(factory, "bytes_in_total", 0) + live_in,
        "bytes_out": getattr(factory, "bytes_out_total", 0) + live_out,
        "connect_failures": sum(b.connect_failures for b in factory.pool),
        "standby": int(getattr(standby, "count", 0)) if standby is not None else 0,
        "drops": int(getattr(standby, "drops", 0)),
        "resumes": int(getattr(standby, "resumes", 0)),
        "expiries": int(getattr(standby, "expiries", 0)),
        "resume_failures": int(getattr(standby, "resume_failures", 0)),
        "unestablished_drops": int(getattr(standby, "unestablished", 0)),
        "standby_evictions": int(getattr(standby, "evictions", 0)),
        "handshake_failures": int(getattr(factory, "handshake_failures", 0)),
    }


def _listen(broker: Broker) -> str:
    port = getattr(broker, "port", None)
    if port is None:
        return ""
    host = port.getHost()
    return f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}"


def servers(broker: Broker) -> list[dict[str, Any]]:
    now = broker.reactor.seconds()
    standby: collections.Counter[str] = collections.Counter(
        str(entry.get("server_id")) for entry in _standby_sessions(broker.factory))
    result = []
    for backend in broker.pool:
        entry = backend.snapshot(now)
        entry["standby"] = standby.get(backend.server_id, 0)
        entry["admin_hold"] = backend.admin_hold
        result.append(entry)
    return result


def status(broker: Broker, history: ConnectionHistory | None = None) -> dict[str, Any]:
    """The whole screen: broker, totals, pools with their servers and chart history."""
    now = broker.reactor.seconds()
    desktop = broker.config.desktop
    admin = broker.config.admin
    pool = {
        "name": desktop.service_name,
        "section": DESKTOP_SECTION,
        "listen": _listen(broker),
        "sort_method": desktop.effective_sort_method.value,
        "sort_method_configured": desktop.sort_method.value,
        "monitoring_type": desktop.monitoring_type.value,
        "max_sessions": desktop.max_sessions,
        "sessions": len(broker.factory.sessions),
        "servers": servers(broker),
        "history": {
            "interval_seconds": admin.history_interval if admin else None,
            "samples": history.as_list() if history is not None else [],
        },
    }
    return {
        "version": __version__,
        "now": round(now, 3),
        "started_at": round(broker.started_at, 3),
        "uptime_seconds": round(now - broker.started_at, 3),
        "config_path": broker.config.path,
        "totals": counters(broker.factory),
        "pools": [pool],
        "admin": {
            "actions": bool(admin and admin.token_hash),
            "read_access": admin.read_access.value if admin else None,
        },
    }


def sessions(broker: Broker, page: int = 1, per_page: int = 50) -> dict[str, Any]:
    """One page of live sessions (oldest first) and the sessions held in standby."""
    if page < 1:
        raise ActionError(400, f"page must be 1 or more, got {page}")
    if not 1 <= per_page <= MAX_PER_PAGE:
        raise ActionError(400, f"per_page must be 1 to {MAX_PER_PAGE}, got {per_page}")
    now = broker.reactor.seconds()
    live = sorted(broker.factory.sessions.values(), key=lambda s: s.session_id)
    total = len(live)
    chosen = live[(page - 1) * per_page: page * per_page]
    rows = []
    for session in chosen:
        backend, server = session.backend, session.server
        rows.append({
            "id": session.session_id,
            "client": session.client_address,
            "server": backend.server_id if backend is not None else None,
            "server_address": backend.address if backend is not None else None,
            "state": "open" if server is not None else "connecting",
            "started_at": round(session.started, 3),
            "duration_seconds": round(now - session.started, 3),
            "bytes_in": session.client.received,
            "bytes_out": server.received if server is not None else 0,
        })
    return {
        "page": page, "per_page": per_page, "total": total,
        "pages": max(1, -(-total // per_page)), "sessions": rows,
        "standby": _standby_sessions(broker.factory),
    }


# --- admin actions ---------------------------------------------------------------------------

def _backend(broker: Broker, server_id: str) -> Any:
    try:
        return broker.pool.get(server_id)
    except UnknownServer:
        raise ActionError(404, f"no server {server_id!r} in the pool") from None


def server_action(broker: Broker, server_id: str, action: str, who: str) -> dict[str, Any]:
    """drain (no new sessions, existing ones continue), ready (back in rotation), down (no new
    sessions and monitoring does not bring it back until ready)."""
    backend = _backend(broker, server_id)
    if action == "drain":
        backend.admin_hold = False
        broker.pool.set_state(server_id, ServerState.DRAINING, f"drained by admin ({who})")
    elif action == "ready":
        if backend.leaving:
            raise ActionError(409, f"server {server_id} was removed from the config; it leaves when "
                                   "its last session ends")
        backend.admin_hold = False
        broker.pool.set_state(server_id, ServerState.UP, f"made ready by admin ({who})")
    elif action == "down":
        backend.admin_hold = True
        broker.pool.set_state(server_id, ServerState.DOWN, f"marked down by admin ({who})")
    else:
        raise ActionError(404, f"unknown server action {action!r} (drain, ready, down)")
    log.info("admin {who}: {action} server {server_id}", who=who, action=action, server_id=server_id)
    return {"ok": True, "action": action, "server": backend.snapshot(broker.reactor.seconds())}


def close_session(broker: Broker, session_id: int, who: str) -> dict[str, Any]:
    session = broker.factory.sessions.get(session_id)
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
