"""HEALTH_PATH over real sockets: the probe against the sample HTTP AppServer's /health."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from protheus_broker.balancing.methods import SortMethod, make_balancer
from protheus_broker.balancing.pool import ServerPool, ServerState
from protheus_broker.http.health import HttpProbeMonitor
from protheus_broker.monitoring.settings import MonitoringConfig, MonitoringType
from protheus_broker.sim.http import SimHttpSite

from .helpers import servers
from .test_http_sockets import as_deferred


class HealthSocketsTests(TestCase):
    """GET /health of the sample HTTP AppServer on 127.0.0.1 keeps it Up; a 404 path suspends it."""

    @as_deferred
    async def test_sim_health_and_a_404(self) -> None:
        """/health answers 200 (Up); /missing answers 404 (Suspended, the reason names it);
        a closed port is a failed connect."""
        port = reactor.listenTCP(0, SimHttpSite("A", reactor), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        closed = reactor.listenTCP(0, SimHttpSite("B", reactor), interface="127.0.0.1")
        closed_port = closed.getHost().port
        await closed.stopListening()
        pool = ServerPool(servers(port.getHost().port, closed_port), make_balancer(SortMethod.CONNECTION),
                          clock=reactor)
        monitor = HttpProbeMonitor(reactor, pool, MonitoringType.CONNECTION,
                                   MonitoringConfig(probe_interval=60.0), connect_timeout=5.0,
                                   health_path="/health")
        up, gone = monitor.watched["01"], monitor.watched["02"]
        await monitor.probe(up)
        self.assertIs(pool.get("01").state, ServerState.UP)
        await monitor.probe(gone)
        self.assertIs(pool.get("02").state, ServerState.SUSPENDED)
        self.assertIn("connect failed", pool.get("02").reason)
        monitor.health_path = "/missing"
        await monitor.probe(up)
        self.assertIs(pool.get("01").state, ServerState.SUSPENDED)
        self.assertIn("GET /missing answered 404", pool.get("01").reason)
        monitor.health_path = "/health"
        await monitor.probe(up)
        self.assertIs(pool.get("01").state, ServerState.UP)
