"""First-bytes dispatch on the SmartClient port: recognised protocols, plain clients, silence."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.balancing.methods import ConnectionBalancer
from protheus_broker.balancing.pool import ServerPool
from protheus_broker.desktop.proxy import MAX_PREFIX, BrokerFactory, ClientSide, CountedProtocol, FirstBytes

from .helpers import servers


class Recorder(Protocol):
    """What a recognised connection's protocol is given."""

    def __init__(self) -> None:
        self.data = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:
        self.lost = True


class Magic:
    """Claims connections that start with *magic*."""

    def __init__(self, magic: bytes, name: str = "magic", carries_sessions: bool = False) -> None:
        self.magic = magic
        self.name = name
        self.carries_sessions = carries_sessions
        self.taken: list[Recorder] = []

    def recognise(self, prefix: bytes) -> bool | None:
        if prefix.startswith(self.magic):
            return True
        if self.magic.startswith(prefix):
            return None
        return False

    def take_over(self, broker: BrokerFactory, prefix: bytes) -> Recorder:
        protocol = Recorder()
        self.taken.append(protocol)
        return protocol


class PointableTransport(StringTransport):
    """A StringTransport with the ``protocol`` attribute real TCP transports have."""

    protocol: Any = None


class Harness:
    def __init__(self, *recognisers: Magic, wait: float = 0.5, **options: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = ServerPool(servers(5001), ConnectionBalancer())
        self.factory = BrokerFactory(self.reactor, self.pool, recognisers=recognisers,
                                     first_bytes_wait=wait, **options)

    def accept(self, pointable: bool = True, host: str = "10.0.0.9") -> tuple[Any, StringTransport]:
        transport = PointableTransport() if pointable else StringTransport()
        transport.peerAddr = IPv4Address("TCP", host, 40000)
        protocol = self.factory.buildProtocol(transport.peerAddr)
        if protocol is None:  # refused by a cap
            return None, transport
        if pointable:
            transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport


class FirstBytesMemoryTests(SynchronousTestCase):
    def test_no_recognisers_means_plain_session_at_once(self) -> None:
        """Without recognisers nothing is sniffed: the session starts on accept, as before."""
        factory = BrokerFactory(MemoryReactorClock(), ServerPool(servers(5001), ConnectionBalancer()))
        self.assertIsInstance(factory.buildProtocol(None), ClientSide)

    def test_recognised_connection_handed_over_with_its_prefix(self) -> None:
        """Bytes split anywhere: once they match, the recogniser's protocol gets them all and the
        transport points at it; no AppServer is contacted."""
        magic = Magic(b"PBRK1")
        h = Harness(magic)
        sniffer, transport = h.accept()
        self.assertIsInstance(sniffer, FirstBytes)
        sniffer.dataReceived(b"PB")
        self.assertEqual(magic.taken, [])
        sniffer.dataReceived(b"RK1-hello")
        [taken] = magic.taken
        self.assertEqual(taken.data, b"PBRK1-hello")
        self.assertIs(taken.transport, transport)
        self.assertIsInstance(transport.protocol, CountedProtocol)  # counted until it closes
        self.assertIs(transport.protocol.wrapped, taken)
        self.assertEqual(h.reactor.tcpClients, [])
        self.assertEqual(h.reactor.getDelayedCalls(), [])  # the silence timer is cancelled

    def test_plain_client_decided_at_first_unmatched_byte(self) -> None:
        """A TLS ClientHello (or any SmartClient bytes) is plain at once: its bytes reach the server
        first, before anything sent later."""
        magic = Magic(b"GET ")
        h = Harness(magic)
        sniffer, transport = h.accept()
        sniffer.dataReceived(b"\x16\x03\x01\x02\x00")
        client = transport.protocol
        self.assertIsInstance(client, ClientSide)
        self.assertEqual(transport.producerState, "paused")
        _, _, session, _, _ = h.reactor.tcpClients[0]
        server = session.buildProtocol(None)
        server_t = StringTransport()
        server.makeConnection(server_t)
        client.dataReceived(b"more")
        self.assertEqual(server_t.value(), b"\x16\x03\x01\x02\x00more")
        self.assertEqual(client.received, 9)
        self.assertEqual(magic.taken, [])

    def test_silent_client_becomes_plain_after_the_wait(self) -> None:
        """A client that waits for the server to speak is connected after first_bytes_wait."""
        h = Harness(Magic(b"PBRK1"), wait=0.3)
        sniffer, transport = h.accept()
        h.reactor.advance(0.29)
        self.assertEqual(h.reactor.tcpClients, [])
        h.reactor.advance(0.02)
        self.assertEqual(len(h.reactor.tcpClients), 1)
        self.assertIsInstance(transport.protocol, ClientSide)

    def test_undecided_past_max_prefix_is_plain(self) -> None:
        """A recogniser that keeps asking for more gets at most MAX_PREFIX bytes."""

        class Greedy(Magic):
            def recognise(self, prefix: bytes) -> bool | None:
                return None

        h = Harness(Greedy(b""))
        sniffer, transport = h.accept()
        sniffer.dataReceived(b"x" * (MAX_PREFIX - 1))
        self.assertIs(transport.protocol, sniffer)
        sniffer.dataReceived(b"y")
        self.assertIsInstance(transport.protocol, ClientSide)

    def test_first_claim_wins_among_recognisers(self) -> None:
        """Recognisers are asked in order; one saying False does not stop another's claim."""
        http, resumable = Magic(b"GET "), Magic(b"PBRK")
        h = Harness(http, resumable)
        sniffer, _ = h.accept()
        sniffer.dataReceived(b"PBRK")
        self.assertEqual((len(http.taken), len(resumable.taken)), (0, 1))

    def test_eof_before_decision_reaches_the_server_after_the_bytes(self) -> None:
        """A client that sends a little and half-closes while undecided is plain; the server gets
        its bytes, then the EOF."""

        class HalfCloseTransport(StringTransport):
            write_closed = False

            def loseWriteConnection(self) -> None:
                self.write_closed = True

        h = Harness(Magic(b"PBRK1"))
        sniffer, transport = h.accept()
        sniffer.dataReceived(b"PB")
        sniffer.readConnectionLost()
        _, _, session, _, _ = h.reactor.tcpClients[0]
        server = session.buildProtocol(None)
        server_t = HalfCloseTransport()
        server.makeConnection(server_t)
        self.assertEqual(server_t.value(), b"PB")
        self.assertTrue(server_t.write_closed)
        self.assertEqual(session.how, "client closed")

    def test_lost_before_decision_leaves_nothing(self) -> None:
        """A client gone before saying enough: no session, no timer, nothing counted."""
        h = Harness(Magic(b"PBRK1"))
        sniffer, _ = h.accept()
        sniffer.dataReceived(b"PB")
        sniffer.connectionLost(Failure(Exception("gone")))
        self.assertEqual(h.reactor.getDelayedCalls(), [])
        self.assertEqual((h.factory.sessions, h.factory.sessions_total), ({}, 0))

    def test_transport_without_protocol_attribute_is_delegated(self) -> None:
        """A transport that cannot be re-pointed still reaches the new protocol, loss included."""
        magic = Magic(b"PBRK1")
        h = Harness(magic)
        sniffer, _ = h.accept(pointable=False)
        sniffer.dataReceived(b"PBRK1")
        sniffer.dataReceived(b"-later")
        sniffer.connectionLost(Failure(Exception("gone")))
        [taken] = magic.taken
        self.assertEqual(taken.data, b"PBRK1-later")
        self.assertTrue(taken.lost)


class PendingCountTests(SynchronousTestCase):
    """Connections undecided by their first bytes, or served by a non-session recogniser, count
    against MAX_PENDING_PER_ADDRESS and MAX_PENDING."""

    def test_undecided_connections_count_until_lost(self) -> None:
        """Undecided connections fill the per-address cap; one that leaves frees its place."""
        h = Harness(Magic(b"GET /status"), max_pending_per_address=2, max_pending=3)
        first, first_t = h.accept()
        first.dataReceived(b"GET ")
        h.accept()
        self.assertIsNone(h.accept()[0])  # the same address, over its cap
        self.assertIsNotNone(h.accept(host="10.0.0.10")[0])
        self.assertIsNone(h.accept(host="10.0.0.11")[0])  # over MAX_PENDING
        first.connectionLost(Failure(Exception("gone")))
        self.assertIsNotNone(h.accept()[0])
        self.assertEqual(h.factory.refused_pending_total, 2)

    def test_status_like_connection_counts_until_closed(self) -> None:
        """A connection a non-session recogniser took (a /status slowloris) still counts."""
        magic = Magic(b"GET /status")
        h = Harness(magic, max_pending_per_address=1)
        sniffer, transport = h.accept()
        sniffer.dataReceived(b"GET /status HTTP/1.1\r\n")
        [taken] = magic.taken
        self.assertIsNone(h.accept()[0])
        transport.protocol.connectionLost(Failure(Exception("closed")))
        self.assertTrue(taken.lost)
        self.assertEqual(h.factory.pending.count, 0)
        self.assertIsNotNone(h.accept()[0])

    def test_session_recogniser_is_uncounted_at_take_over(self) -> None:
        """The resumable recogniser's links carry sessions that count themselves: the link is
        uncounted once claimed."""
        magic = Magic(b"PBRK1", name="resumable", carries_sessions=True)
        h = Harness(magic, max_pending_per_address=1)
        sniffer, _ = h.accept()
        sniffer.dataReceived(b"PBRK1")
        self.assertEqual(h.factory.pending.count, 0)
        self.assertIsNotNone(h.accept()[0])

    def test_plain_client_counts_until_its_server_answers(self) -> None:
        """A plain client's count passes to its session and ends at the AppServer's first byte."""
        h = Harness(Magic(b"GET "), max_pending_per_address=1)
        sniffer, transport = h.accept()
        sniffer.dataReceived(b"\x16\x03")
        self.assertIsNone(h.accept()[0])
        session = h.reactor.tcpClients[0][2]
        server = session.buildProtocol(None)
        server.makeConnection(StringTransport())
        self.assertIsNone(h.accept()[0])  # connected, but no answer yet
        server.dataReceived(b"hello")
        self.assertEqual(h.factory.pending.count, 0)
        self.assertIsNotNone(h.accept()[0])


class FirstBytesWaitConfigTests(SynchronousTestCase):
    def test_config_sets_the_wait_at_start_and_on_reload(self) -> None:
        """FIRST_BYTES_WAIT reaches the broker's factory when it is built and on a reload."""
        from protheus_broker.config import load_config
        from protheus_broker.tap import BrokerService

        path = self.mktemp()
        text = ("[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nREMOTE_SERVER_01 = 127.0.0.1 5001\n"
                "SORT_METHOD = CONNECTION\nMONITORING_TYPE = DISABLED\n")
        with open(path, "w") as f:
            f.write(text + "FIRST_BYTES_WAIT = 0.25\n")
        service = BrokerService(MemoryReactorClock(), load_config(path))
        self.assertEqual(service.factory.first_bytes_wait, 0.25)
        with open(path, "w") as f:
            f.write(text + "FIRST_BYTES_WAIT = 2\n")
        self.assertTrue(service.reload())
        self.assertEqual(service.factory.first_bytes_wait, 2.0)

    def test_replay_and_pending_keys_reach_the_factory(self) -> None:
        """FIRST_RESPONSE_TIMEOUT, MAX_PENDING_PER_ADDRESS and MAX_PENDING reach the factory at
        start and on a reload."""
        from protheus_broker.config import load_config
        from protheus_broker.tap import BrokerService

        path = self.mktemp()
        text = ("[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nREMOTE_SERVER_01 = 127.0.0.1 5001\n"
                "MONITORING_TYPE = DISABLED\n")
        with open(path, "w") as f:
            f.write(text)
        service = BrokerService(MemoryReactorClock(), load_config(path))
        factory = service.factory
        self.assertEqual((factory.first_response_timeout, factory.pending.per_address,
                          factory.pending.total), (5.0, 128, 1024))
        with open(path, "w") as f:
            f.write(text + "FIRST_RESPONSE_TIMEOUT = 2.5\nMAX_PENDING_PER_ADDRESS = 10\nMAX_PENDING = 20\n")
        self.assertTrue(service.reload())
        self.assertEqual((factory.first_response_timeout, factory.pending.per_address,
                          factory.pending.total), (2.5, 10, 20))
