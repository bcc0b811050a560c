"""Proxy session logic in memory: pause until connected, failover, no server, cap, end events."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectError, ConnectionLost, ConnectionRefusedError, TimeoutError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.balancing import ConnectionBalancer, RoundRobinBalancer
from protheus_broker.pool import ServerPool, ServerState
from protheus_broker.proxy import BrokerFactory, ClientSide, ServerSide, Session

from .helpers import LogCatcher, servers


class HalfCloseTransport(StringTransport):
    """A StringTransport that records half-closes, as TCP transports allow."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class Harness:
    def __init__(self, test: SynchronousTestCase, count: int = 3, max_sessions: int = 0,
                 balancer: object = None) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = ServerPool(servers(*range(5001, 5001 + count)), balancer or ConnectionBalancer())
        self.factory = BrokerFactory(self.reactor, self.pool, connect_timeout=2.5,
                                     max_sessions=max_sessions, sort_method="CONNECTION")
        self.logs = LogCatcher(test)

    def accept(self, port: int = 40000) -> tuple[ClientSide | None, HalfCloseTransport]:
        addr = IPv4Address("TCP", "10.9.8.7", port)
        transport = HalfCloseTransport(peerAddress=addr)
        protocol = self.factory.buildProtocol(addr)
        if protocol is not None:
            protocol.makeConnection(transport)
        return protocol, transport

    def attempt(self, index: int = -1) -> tuple[str, int, Session, float]:
        host, port, factory, timeout, _ = self.reactor.tcpClients[index]
        return host, port, factory, timeout

    def connect_server(self, session: Session) -> tuple[ServerSide, HalfCloseTransport]:
        server = session.buildProtocol(None)
        transport = HalfCloseTransport()
        server.makeConnection(transport)
        return server, transport


class ProxySessionTests(SynchronousTestCase):
    def test_client_paused_until_server_connects(self) -> None:
        """The accepted connection reads nothing until its server is connected, then relays."""
        h = Harness(self)
        client, client_t = h.accept()
        self.assertEqual(client_t.producerState, "paused")
        host, port, session, timeout = h.attempt()
        self.assertEqual((host, port, timeout), ("127.0.0.1", 5001, 2.5))
        self.assertEqual(h.pool.get("01").active, 1)  # counted as soon as chosen
        server, server_t = h.connect_server(session)
        self.assertEqual(client_t.producerState, "producing")
        self.assertIs(client_t.producer, server_t)  # each is the other's producer
        self.assertIs(server_t.producer, client_t)
        assert client is not None
        client.dataReceived(b"login")
        server.dataReceived(b"welcome")
        self.assertEqual(server_t.value(), b"login")
        self.assertEqual(client_t.value(), b"welcome")

    def test_failover_on_refusal_and_timeout(self) -> None:
        """A refused and a timed-out server are skipped; the next one gets the session."""
        h = Harness(self)
        client, client_t = h.accept()
        session = h.attempt()[2]
        session.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(h.attempt()[:2], ("127.0.0.1", 5002))
        session.clientConnectionFailed(None, Failure(TimeoutError()))
        self.assertEqual(h.attempt()[:2], ("127.0.0.1", 5003))
        h.connect_server(session)
        self.assertEqual([b.active for b in h.pool], [0, 0, 1])
        self.assertEqual([b.connect_failures for b in h.pool], [1, 1, 0])
        self.assertEqual(client_t.producerState, "producing")
        self.assertFalse(client_t.disconnecting)

    def test_no_server_up_closes_client_and_says_why(self) -> None:
        """When every server fails the client is closed and the log names each failure."""
        h = Harness(self, count=2)
        client, client_t = h.accept()
        for _ in range(2):
            h.attempt()[2].clientConnectionFailed(None, Failure(ConnectionRefusedError("refused")))
        self.assertTrue(client_t.disconnecting)
        warning = [t for t in h.logs.texts() if "no AppServer available" in t]
        self.assertEqual(len(warning), 1)
        self.assertIn("01 127.0.0.1:5001", warning[0])
        self.assertIn("02 127.0.0.1:5002", warning[0])
        assert client is not None
        client.connectionLost(Failure(ConnectionLost()))
        [ended] = h.logs.ended()
        self.assertIn("no AppServer available", ended["how"])
        self.assertEqual(h.factory.sessions, {})
        self.assertEqual([b.active for b in h.pool], [0, 0])

    def test_all_servers_down_tries_none(self) -> None:
        """With every server down, no connect is attempted and the client is closed."""
        h = Harness(self, count=2)
        for backend in h.pool:
            h.pool.set_state(backend.server_id, ServerState.DOWN, "test")
        _, client_t = h.accept()
        self.assertEqual(h.reactor.tcpClients, [])
        self.assertTrue(client_t.disconnecting)

    def test_session_cap_refuses_cleanly(self) -> None:
        """Past MAX_SESSIONS new connections are refused (closed at once) and logged once."""
        h = Harness(self, max_sessions=2)
        first, _ = h.accept()
        h.accept()
        refused, _ = h.accept()
        self.assertIsNone(refused)
        self.assertIsNone(h.accept()[0])
        self.assertEqual(h.factory.refused_total, 2)
        self.assertEqual(len([t for t in h.logs.texts() if "MAX_SESSIONS=2" in t]), 1)
        assert first is not None
        first.connectionLost(Failure(ConnectionLost()))  # still connecting: stops the attempt
        h.attempt(0)[2].clientConnectionFailed(None, Failure(ConnectError("stopped")))
        self.assertIsNotNone(h.accept()[0])  # its place is free

    def test_end_event_has_every_field(self) -> None:
        """One structured event per session end: client, server, method, duration, bytes, how."""
        h = Harness(self)
        client, client_t = h.accept(port=41234)
        session = h.attempt()[2]
        server, server_t = h.connect_server(session)
        assert client is not None
        client.dataReceived(b"12345")
        server.dataReceived(b"abc")
        h.reactor.advance(2.5)
        client.readConnectionLost()  # client half-closes
        self.assertTrue(server_t.write_closed)
        self.assertFalse(server_t.disconnecting)
        client.connectionLost(Failure(ConnectionLost()))
        server.connectionLost(Failure(ConnectionLost()))
        [event] = h.logs.ended()
        self.assertEqual(
            {k: event[k] for k in ("client", "server_id", "sort_method", "duration", "bytes_in",
                                   "bytes_out", "how")},
            {"client": "10.9.8.7:41234", "server_id": "01", "sort_method": "CONNECTION",
             "duration": 2.5, "bytes_in": 5, "bytes_out": 3, "how": "client closed"},
        )
        self.assertEqual(h.pool.get("01").active, 0)
        self.assertEqual(h.pool.get("01").total, 1)

    def test_server_close_closes_client_after_flush(self) -> None:
        """The server closing makes the client close (loseConnection flushes what is queued)."""
        h = Harness(self)
        client, client_t = h.accept()
        server, server_t = h.connect_server(h.attempt()[2])
        server.dataReceived(b"last words")
        server.connectionLost(Failure(ConnectionLost("reset")))
        self.assertTrue(client_t.disconnecting)
        self.assertIsNone(client_t.producer)
        self.assertEqual(client_t.value(), b"last words")
        assert client is not None
        client.connectionLost(Failure(ConnectionLost()))
        [event] = h.logs.ended()
        self.assertTrue(event["how"].startswith("server lost"), event["how"])

    def test_half_close_is_passed_on(self) -> None:
        """EOF from one side half-closes the other; the session lives until both are done."""
        h = Harness(self)
        client, client_t = h.accept()
        server, server_t = h.connect_server(h.attempt()[2])
        assert client is not None
        client.readConnectionLost()
        self.assertTrue(server_t.write_closed)
        self.assertFalse(client_t.write_closed)
        self.assertEqual(h.factory.sessions[1].how, "client closed")
        self.assertEqual(h.logs.ended(), [])
        server.dataReceived(b"still talking")
        self.assertEqual(client_t.value(), b"still talking")

    def test_client_leaving_while_connecting_stops_the_attempt(self) -> None:
        """A client gone before its server answers stops the attempt and frees the count."""
        h = Harness(self)
        client, _ = h.accept()
        connector = h.reactor.connectors[-1]
        assert client is not None
        client.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(connector.stoppedConnecting, True)
        h.attempt()[2].clientConnectionFailed(connector, Failure(ConnectError("stopped")))
        self.assertEqual(h.pool.get("01").active, 0)
        self.assertEqual(h.pool.get("01").connect_failures, 0)  # not the server's fault
        self.assertEqual(h.pool.get("01").state, ServerState.UP)
        [event] = h.logs.ended()
        self.assertEqual(event["how"], "client left before a server answered")
        self.assertEqual(len(h.reactor.tcpClients), 1)  # no further server tried

    def test_round_robin_failover_sequence(self) -> None:
        """Round robin fails over along its sequence and the next session continues it."""
        h = Harness(self, balancer=RoundRobinBalancer())
        h.accept()
        h.attempt()[2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(h.attempt()[1], 5002)
        h.accept()
        self.assertEqual(h.attempt()[1], 5002)  # sequence: 1 was chosen, next is 2
