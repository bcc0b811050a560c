"""``protheus-license``'s status listener (``STATUS_INTERFACE``, 127.0.0.1 by default):

- ``GET /status``: JSON (seats per class, in use, free; clients and what they hold; every lease;
  releases by reason; connections);
- ``GET /metrics``: the same figures for Prometheus;
- ``POST /revoke?lease=<id>``: an admin takes a lease back (its client hears ``Revoked``).

Reads are answered to loopback clients, or to anyone presenting the admin token; the revoke
needs ``Authorization: Bearer <token>`` checked against ``ADMIN_TOKEN_HASH`` (made by
``protheus-broker-ctl hash-token``), with the broker screen's defences: PBKDF2 off the reactor
thread and bounded, wrong tokens limited per address, ``Host`` checked against DNS rebinding and
``Origin`` against cross-site posts.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from protheus_broker import __version__
from protheus_broker.license.leases import Reason
from protheus_broker.license.protocol import UnknownLease
from protheus_broker.license.server import LicenseServer
from protheus_broker.web.auth import (
    FailureLimiter,
    Refused,
    TokenChecker,
    Verifier,
    check_bearer,
    host_allowed,
    is_loopback,
    origin_matches,
    reactor_thread_runner,
)

log = Logger()

_JSON = b"application/json; charset=utf-8"
_CHALLENGE = {b"www-authenticate": b'Bearer realm="protheus-license"'}


def status(server: LicenseServer) -> dict[str, Any]:
    """The server's figures, as ``GET /status`` gives them."""
    table = server.table
    now = server.reactor.seconds()
    clients: dict[str, dict[str, Any]] = {}
    for name in sorted({lease.client for lease in table.leases.values()} | set(server.clients)):
        held = table.held_by(name)
        seats: dict[str, int] = {}
        for lease in held:
            seats[lease.license_class] = seats.get(lease.license_class, 0) + lease.seats
        clients[name] = {"connected": name in server.clients, "lost_since": table.lost.get(name),
                         "leases": len(held), "seats": seats}
    return {
        "version": __version__,
        "classes": {name: {"seats": table.counts.get(name, 0), "in_use": table.in_use(name),
                           "free": table.free(name)} for name in table.classes()},
        "clients": clients,
        "leases": [{"lease_id": lease.lease_id, "client": lease.client, "class": lease.license_class,
                    "seats": lease.seats, "ttl": round(max(0.0, lease.expires - now), 3)}
                   for lease in sorted(table.leases.values(), key=lambda lease: lease.lease_id)],
        "grants": table.grants,
        "refusals": table.refusals,
        "releases": {reason.value: table.releases[reason] for reason in Reason},
        "connections": {"authenticated": len(server.clients), "pending": server.pending_total,
                        "refused": server.refused_connections,
                        "failed_handshakes": server.failed_handshakes},
        "ttl": table.limits.ttl,
        "grace": table.limits.grace,
    }


class LicenseCollector:
    """The status figures as Prometheus metric families, read at each scrape."""

    def __init__(self, server: LicenseServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Any]:
        figures = status(self.server)
        prefix = "protheus_license"
        seats = GaugeMetricFamily(f"{prefix}_seats", "Seats of the class (config)", labels=["class"])
        in_use = GaugeMetricFamily(f"{prefix}_seats_in_use", "Seats of the class leased now", labels=["class"])
        leased = GaugeMetricFamily(f"{prefix}_seats_leased", "Seats a client holds now",
                                   labels=["client", "class"])
        leases = GaugeMetricFamily(f"{prefix}_leases", "Leases a client holds now", labels=["client"])
        for name, figure in figures["classes"].items():
            seats.add_metric([name], figure["seats"])
            in_use.add_metric([name], figure["in_use"])
        for client, figure in figures["clients"].items():
            leases.add_metric([client], figure["leases"])
            for name, count in figure["seats"].items():
                leased.add_metric([client, name], count)
        releases = CounterMetricFamily(f"{prefix}_releases", "Leases ended or reduced, by reason",
                                       labels=["reason"])
        for reason, count in figures["releases"].items():
            releases.add_metric([reason], count)
        grants = CounterMetricFamily(f"{prefix}_grants", "Leases granted")
        grants.add_metric([], figures["grants"])
        refusals = CounterMetricFamily(f"{prefix}_refusals", "Lease requests refused (no seats, "
                                                             "unknown class, client at its bound)")
        refusals.add_metric([], figures["refusals"])
        connections = figures["connections"]
        clients = GaugeMetricFamily(f"{prefix}_clients", "Authenticated clients connected")
        clients.add_metric([], connections["authenticated"])
        pending = GaugeMetricFamily(f"{prefix}_pending_connections", "Connections not yet authenticated")
        pending.add_metric([], connections["pending"])
        refused = CounterMetricFamily(f"{prefix}_refused_connections", "Connections refused by "
                                                                       "MAX_PENDING(_PER_ADDRESS)")
        refused.add_metric([], connections["refused"])
        failed = CounterMetricFamily(f"{prefix}_failed_handshakes", "Handshakes refused (wrong "
                                                                    "proof, bad hello, MAX_CLIENTS)")
        failed.add_metric([], connections["failed_handshakes"])
        yield from (seats, in_use, leased, leases, releases, grants, refusals, clients, pending,
                    refused, failed)


def render_metrics(server: LicenseServer) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LicenseCollector(server))  # type: ignore[arg-type]
    return generate_latest(registry)


_Reply = Refused


def _client_host(request: Request) -> str:
    return str(getattr(request.getClientAddress(), "host", "unix") or "unix")


class StatusResource(Resource):
    """The whole status listener: one leaf resource routing on method and path."""

    isLeaf = True

    def __init__(self, server: LicenseServer, verifier: Verifier | None = None) -> None:
        super().__init__()
        self.license = server
        self.limiter = FailureLimiter(10, 10.0, 1024)
        self._verifier = verifier
        self._checker: TokenChecker | None = None

    def checker(self) -> TokenChecker:
        source = self.license.config.admin_token_hash
        if self._checker is None or self._checker.source != source:  # a reload changed it
            self._checker = TokenChecker(source)
        return self._checker

    @property
    def verifier(self) -> Verifier:
        if self._verifier is None:
            self._verifier = Verifier(reactor_thread_runner(self.license.reactor))
        return self._verifier

    def render(self, request: Request) -> Any:
        answer: Deferred[Any] = maybeDeferred(self._dispatch, request)

        def failed(failure: Failure) -> bytes:
            error = failure.value
            if isinstance(error, _Reply):
                for name, value in error.headers.items():
                    request.setHeader(name, value)
                return self._json(request, error.status, {"error": error.message, "status": error.status})
            log.failure("status: {method} {path} failed", failure, method=request.method, path=request.path)
            return self._json(request, 500, {"error": "internal error (logged)", "status": 500})

        def send(body: bytes) -> None:
            if not request.finished and not getattr(request, "_disconnected", False):
                request.write(body)
                request.finish()

        answer.addErrback(failed).addCallback(send)
        return NOT_DONE_YET

    @staticmethod
    def _json(request: Request, code: int, body: Any) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", _JSON)
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body, sort_keys=True).encode() + b"\n"

    def _dispatch(self, request: Request) -> Deferred[bytes]:
        if not host_allowed(request.getHeader(b"host"), ()):
            raise _Reply(421, "Host is not a name this license server answers to")
        method, path = request.method, request.path.rstrip(b"/") or b"/"
        if method == b"GET" and path in (b"/", b"/status"):
            return self._read(request).addCallback(lambda _: self._json(request, 200, status(self.license)))
        if method == b"GET" and path == b"/metrics":
            def metrics(_: Any) -> bytes:
                request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
                return render_metrics(self.license)
            return self._read(request).addCallback(metrics)
        if method == b"POST" and path == b"/revoke":
            return self._act(request).addCallback(lambda who: self._revoke(request, who))
        if path in (b"/", b"/status", b"/metrics", b"/revoke"):
            raise _Reply(405, f"{method.decode(errors='replace')} is not allowed here")
        raise _Reply(404, "no such page: try /status, /metrics or POST /revoke?lease=<id>")

    def _revoke(self, request: Request, who: str) -> bytes:
        values = (request.args or {}).get(b"lease") or []
        lease_id = values[0].decode("utf-8", "replace") if values else ""
        if not lease_id:
            raise _Reply(400, "which lease? POST /revoke?lease=<id>")
        try:
            lease = self.license.revoke(lease_id, who)
        except UnknownLease:
            raise _Reply(404, f"no lease {lease_id[:40]!r}") from None
        return self._json(request, 200, {"revoked": lease.lease_id, "client": lease.client,
                                         "class": lease.license_class, "seats": lease.seats})

    def _token(self, request: Request) -> Deferred[bool | None]:
        """True: the right token; False: a wrong one; None: none presented."""
        client = _client_host(request)
        checking = check_bearer(request.getHeader(b"authorization"), client, self.license.reactor.seconds(),
                                self.checker(), self.limiter, self.verifier, _CHALLENGE)

        def verdict(right: bool | None) -> bool | None:
            if right is False:
                log.warn("status: wrong admin token from {client}", client=client)
            return right

        return checking.addCallback(verdict)

    def _read(self, request: Request) -> Deferred[str]:
        def decide(verdict: bool | None) -> str:
            if verdict is False:
                raise _Reply(401, "wrong token", _CHALLENGE)
            if verdict or is_loopback(_client_host(request)):
                return "ok"
            raise _Reply(401, f"a token is needed to read this from {_client_host(request)}", _CHALLENGE)
        return self._token(request).addCallback(decide)

    def _act(self, request: Request) -> Deferred[str]:
        if not origin_matches(request.getHeader(b"origin"), request.getHeader(b"host")):
            raise _Reply(403, "cross-site request refused (Origin does not match Host)")
        if not self.checker().configured:
            raise _Reply(403, "admin actions are disabled: no ADMIN_TOKEN_HASH in [LICENSESERVER]")

        def decide(verdict: bool | None) -> str:
            if verdict is None:
                raise _Reply(401, "revoke needs 'Authorization: Bearer <token>'", _CHALLENGE)
            if not verdict:
                raise _Reply(401, "wrong token", _CHALLENGE)
            return f"token@{_client_host(request)}"
        return self._token(request).addCallback(decide)
