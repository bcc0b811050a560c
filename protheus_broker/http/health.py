"""``HEALTH_PATH``: the HTTP units' CONNECTION probe asks for a page instead of only connecting.

Every ``MONITORING_INTERVAL`` seconds each server gets ``GET <path> HTTP/1.1`` (``Host``,
``Connection: close``, through h11); a 2xx or 3xx within ``CONNECT_TIMEOUT`` is a good probe,
anything else (another status, no answer in time, a refused connect, an answer h11 refuses) is a
failed one, judged as a failed connect is (Suspended, then Down; the pool logs each change).
"""

from __future__ import annotations

from typing import Any

import h11
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from protheus_broker.balancing.pool import ServerPool
from protheus_broker.monitoring.monitor import ProbeMonitor, make_monitor
from protheus_broker.monitoring.settings import MonitoringConfig, MonitoringType


class HealthCheckFailed(Exception):
    """A health request that did not get a 2xx or 3xx; the text says what happened instead."""


class HealthRequest(Protocol):
    """One ``GET <path>``: *answered* fires with the response's status code or fails with
    :class:`HealthCheckFailed`; the connection is closed either way (the body is not read)."""

    transport: Any

    def __init__(self, host: str, port: int, path: str) -> None:
        self.host = f"[{host}]" if ":" in host else host
        self.port = port
        self.path = path
        self.answered: defer.Deferred[int] = defer.Deferred()
        self.conn = h11.Connection(our_role=h11.CLIENT)

    def connectionMade(self) -> None:
        request = h11.Request(method="GET", target=self.path,
                              headers=[("Host", f"{self.host}:{self.port}"), ("Connection", "close"),
                                       ("User-Agent", "protheus-broker-health")])
        self.transport.write(self.conn.send(request) + self.conn.send(h11.EndOfMessage()))

    def dataReceived(self, data: bytes) -> None:
        self.conn.receive_data(data)
        try:
            while not self.answered.called:
                event = self.conn.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    return
                if isinstance(event, h11.Response):
                    self.answered.callback(event.status_code)
                elif isinstance(event, h11.ConnectionClosed):
                    break
        except h11.RemoteProtocolError as exc:
            self.fail(f"malformed answer ({exc})")
        if self.answered.called and self.transport is not None:
            self.transport.loseConnection()

    def fail(self, why: str) -> None:
        if not self.answered.called:
            self.answered.errback(HealthCheckFailed(why))
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = Failure(Exception("connection lost"))) -> None:
        if not self.answered.called:
            self.answered.errback(HealthCheckFailed("closed before answering"))


class _HealthFactory(Factory):
    noisy = False

    def __init__(self, request: HealthRequest) -> None:
        self.request = request

    def buildProtocol(self, addr: Any) -> HealthRequest:
        return self.request


class HttpProbeMonitor(ProbeMonitor):
    """``CONNECTION`` for the HTTP units: with a *health_path* each probe is a ``GET`` of it
    (reload may change or clear the path: the next probe uses it)."""

    def __init__(self, reactor: Any, pool: ServerPool, monitoring_type: MonitoringType,
                 settings: MonitoringConfig, connect_timeout: float = 5.0, health_path: str = "") -> None:
        super().__init__(reactor, pool, monitoring_type, settings, connect_timeout)
        self.health_path = health_path

    def probe(self, watched: Any) -> defer.Deferred[None]:
        if not self.health_path or self.monitoring_type is not MonitoringType.CONNECTION:
            return super().probe(watched)
        backend = watched.backend
        path = self.health_path
        request = HealthRequest(backend.host, backend.port, path)
        attempt = self.tcp_endpoint(backend.host, backend.port).connect(_HealthFactory(request))
        attempt.addErrback(lambda f: request.fail(f"connect failed: {_reason(f)}"))

        def too_slow() -> None:
            request.fail(f"no answer within {self.connect_timeout:g}s")
            if not attempt.called:
                attempt.cancel()

        timer = self.reactor.callLater(self.connect_timeout, too_slow)

        def judged(status: int) -> None:
            if 200 <= status < 400:
                watched.health.heard(self.reactor.seconds())
            else:
                watched.health.failed(f"GET {path} answered {status}")

        def failed(failure: Failure) -> None:
            watched.health.failed(f"GET {path}: {_reason(failure)}")

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        judging: defer.Deferred[None] = request.answered.addBoth(done).addCallbacks(judged, failed)
        return judging


def _reason(failure: Failure) -> str:
    text = str(failure.value).strip().rstrip(".")
    return text or type(failure.value).__name__


def make_http_monitor(reactor: Any, pool: ServerPool, monitoring_type: MonitoringType,
                      settings: MonitoringConfig, connect_timeout: float = 5.0,
                      health_path: str = "") -> Service | None:
    """The HTTP units' monitor: :class:`HttpProbeMonitor` for ``CONNECTION`` (with or without a
    health path, so a reload may set one), else what :func:`make_monitor` gives."""
    if monitoring_type is MonitoringType.CONNECTION:
        return HttpProbeMonitor(reactor, pool, monitoring_type, settings, connect_timeout, health_path)
    return make_monitor(reactor, pool, monitoring_type, settings, connect_timeout)
