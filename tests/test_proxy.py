"""Proxy session logic in memory: pause until connected, failover, no server, cap, end events."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectError, ConnectionLost, ConnectionRefusedError, TimeoutError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.balancing.methods import ConnectionBalancer, RoundRobinBalancer
from protheus_broker.balancing.pool import RESOLVE_EVERY, ServerPool, ServerState
from protheus_broker.balancing.servers import RemoteServer
from protheus_broker.desktop.pending import client_host
from protheus_broker.desktop.proxy import KEEP_LIMIT, BrokerFactory, ClientSide, ServerSide, Session

from .helpers import LogCatcher, servers


class HalfCloseTransport(StringTransport):
    """A StringTransport that records half-closes, as TCP transports allow."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class Harness:
    def __init__(self, test: SynchronousTestCase, count: int = 3, max_sessions: int = 0,
                 balancer: object = None, **options: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = ServerPool(servers(*range(5001, 5001 + count)), balancer or ConnectionBalancer(),
                               clock=self.reactor, suspect_time=10.0)
        self.factory = BrokerFactory(self.reactor, self.pool, connect_timeout=2.5,
                                     max_sessions=max_sessions, sort_method="CONNECTION", **options)
        self.logs = LogCatcher(test)

    def accept(self, port: int = 40000, host: str = "10.9.8.7") -> tuple[ClientSide | None, HalfCloseTransport]:
        addr = IPv4Address("TCP", host, port)
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


class SuspendedFailoverTests(SynchronousTestCase):
    def test_rolling_restart_login_lands_on_the_suspended_server(self) -> None:
        """Kill 01, a login suspends it, 01 restarts, 02 is killed: the next login is refused by
        02 and lands on 01 (Suspended, tried after every Up one) instead of failing."""
        h = Harness(self, count=2)
        h.accept()
        h.attempt()[2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))  # 01 killed
        self.assertIs(h.pool.get("01").state, ServerState.SUSPENDED)
        h.connect_server(h.attempt()[2])  # that login lands on 02
        h.reactor.advance(3)  # 01 restarted, 02 killed, within SUSPECT_TIME
        _, client_t = h.accept(port=40001)
        self.assertEqual(h.attempt()[1], 5002)
        h.attempt()[2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(h.attempt()[1], 5001)  # the suspended one, as a last resort
        h.connect_server(h.attempt()[2])
        self.assertFalse(client_t.disconnecting)
        self.assertEqual(client_t.producerState, "producing")
        self.assertEqual(h.factory.sessions_failed, 0)

    def test_down_and_draining_are_never_tried(self) -> None:
        """After the Up and Suspended servers fail, Down and Draining ones are not tried."""
        h = Harness(self, count=4)
        h.pool.set_state("03", ServerState.DOWN, "test")
        h.pool.set_state("04", ServerState.DRAINING, "test")
        h.pool.connect_failed(h.pool.get("02"), "refused")
        _, client_t = h.accept()
        for _ in range(2):
            h.attempt()[2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual([c[1] for c in h.reactor.tcpClients], [5001, 5002])
        self.assertTrue(client_t.disconnecting)


class ReplayTests(SynchronousTestCase):
    """A login replayed on the next AppServer when the first does not answer."""

    def linked(self, timeout: float = 2.0, count: int = 3, **options: Any) -> tuple[Harness, ClientSide, HalfCloseTransport, Session, ServerSide, HalfCloseTransport]:
        h = Harness(self, count=count, first_response_timeout=timeout, **options)
        client, client_t = h.accept()
        assert client is not None
        session = h.attempt()[2]
        server, server_t = h.connect_server(session)
        return h, client, client_t, session, server, server_t

    def test_hung_server_login_replayed_on_the_next(self) -> None:
        """No answer within FIRST_RESPONSE_TIMEOUT: the connection is aborted, the exact client
        bytes and EOF go to the next server, its answer reaches the client, and the hung server
        is suspended naming why."""
        h, client, client_t, session, server, server_t = self.linked()
        client.dataReceived(b"log")
        client.dataReceived(b"in")
        client.readConnectionLost()
        self.assertEqual(server_t.value(), b"login")
        h.reactor.advance(1.9)
        self.assertEqual(len(h.reactor.tcpClients), 1)
        h.reactor.advance(0.1)
        self.assertTrue(server_t.disconnected)  # aborted
        self.assertEqual(h.attempt()[1], 5002)
        server2, server2_t = h.connect_server(session)
        self.assertEqual(server2_t.value(), b"login")
        self.assertTrue(server2_t.write_closed)
        server.connectionLost(Failure(ConnectionLost()))  # the aborted one: ignored
        server2.dataReceived(b"welcome")
        self.assertEqual(client_t.value(), b"welcome")
        self.assertIs(h.pool.get("01").state, ServerState.SUSPENDED)
        self.assertEqual(h.pool.get("01").reason, "no answer within 2s")
        self.assertEqual([b.active for b in h.pool], [0, 1, 0])
        self.assertIsNone(session.kept)  # the copy is dropped at the first answer
        self.assertIs(server2_t.producer, client_t)
        self.assertEqual(h.reactor.getDelayedCalls(), [])
        self.assertEqual(h.logs.ended(), [])

    def test_hung_server_back_from_suspicion_costs_one_login(self) -> None:
        """After SUSPECT_TIME the hung server gets one login at a time: the logins meanwhile go
        elsewhere, and when the probe is not answered it is suspended again."""
        h, client, client_t, session, server, server_t = self.linked(count=2)
        client.dataReceived(b"login")
        h.reactor.advance(2)
        h.connect_server(session)[0].dataReceived(b"ok")  # 02 answers: 01 suspended
        self.assertIs(h.pool.get("01").state, ServerState.SUSPENDED)
        h.reactor.advance(10)
        probe, _ = h.accept(port=40001)
        assert probe is not None
        self.assertEqual(h.attempt()[1], 5001)  # back on probation: this login tries it
        probe_session = h.attempt()[2]
        h.connect_server(probe_session)
        probe.dataReceived(b"login")
        for port in (40002, 40003):
            h.accept(port=port)
            self.assertEqual(h.attempt()[1], 5002)  # the others do not wait on it
        h.reactor.advance(2)  # the probe gets no answer: replayed on 02
        self.assertEqual(h.attempt()[:2], ("127.0.0.1", 5002))
        h.connect_server(probe_session)[0].dataReceived(b"ok")
        self.assertIs(h.pool.get("01").state, ServerState.SUSPENDED)

    def test_reset_before_answer_is_replayed(self) -> None:
        """An AppServer that resets (killed with the login in its queue) before its first byte:
        the login goes to the next one."""
        h, client, client_t, session, server, server_t = self.linked()
        client.dataReceived(b"hello")
        server.connectionLost(Failure(ConnectionLost("Connection reset by peer")))
        server2, server2_t = h.connect_server(h.attempt()[2])
        self.assertEqual(server2_t.value(), b"hello")
        client.dataReceived(b" again")
        server2.dataReceived(b"ok")
        self.assertEqual(server2_t.value(), b"hello again")
        self.assertEqual(client_t.value(), b"ok")
        self.assertFalse(client_t.disconnecting)

    def test_junk_that_no_server_answers_suspends_nobody(self) -> None:
        """Bytes no AppServer answers (junk, half a message) end the session after every server,
        and no server is suspended for it."""
        h, client, client_t, session, server, server_t = self.linked(count=2)
        client.dataReceived(b"\x00junk")
        h.reactor.advance(2)
        h.connect_server(h.attempt()[2])
        h.reactor.advance(2)
        self.assertTrue(client_t.disconnecting)
        self.assertEqual([b.state for b in h.pool], [ServerState.UP, ServerState.UP])
        self.assertEqual(h.factory.sessions_failed, 1)
        client.connectionLost(Failure(ConnectionLost()))
        [ended] = h.logs.ended()
        self.assertIn("no answer within 2s", ended["how"])
        self.assertEqual([b.active for b in h.pool], [0, 0])

    def test_silent_client_starts_no_timer(self) -> None:
        """A client that sends nothing is never replayed: the timer starts at its first bytes."""
        h, client, client_t, session, server, server_t = self.linked()
        h.reactor.advance(60)
        self.assertEqual(len(h.reactor.tcpClients), 1)
        server.dataReceived(b"greeting")
        client.dataReceived(b"login")
        h.reactor.advance(60)
        self.assertEqual(len(h.reactor.tcpClients), 1)
        self.assertEqual(server_t.value(), b"login")

    def test_copy_is_bounded_then_dropped(self) -> None:
        """Past KEEP_LIMIT unanswered bytes (not a login: a bulk upload, a protocol whose server
        answers late) the copy goes and the session is relayed without replay: the client is
        never stalled, every byte reaches the server in order, and no timer replays it."""
        h, client, client_t, session, server, server_t = self.linked()
        chunks = [bytes([n]) * 40_000 for n in range(3)]
        self.assertLess(40_000, KEEP_LIMIT, "the first chunk must fit the copy")
        self.assertGreater(80_000, KEEP_LIMIT, "the second must pass it")
        client.dataReceived(chunks[0])
        self.assertEqual(session.kept_size, 40_000)
        client.dataReceived(chunks[1])
        self.assertIsNone(session.kept)
        self.assertFalse(session.replayable())
        self.assertEqual(client_t.producerState, "producing")
        self.assertIs(server_t.producer, client_t)  # ordinary backpressure from now on
        client.dataReceived(chunks[2])
        h.reactor.advance(60)
        self.assertEqual(len(h.reactor.tcpClients), 1)  # nothing replayed
        self.assertEqual(server_t.value(), b"".join(chunks))
        server.dataReceived(b"ok")
        self.assertEqual(client_t.value(), b"ok")

    def test_off_when_zero(self) -> None:
        """FIRST_RESPONSE_TIMEOUT=0: nothing is kept and nothing is replayed."""
        h, client, client_t, session, server, server_t = self.linked(timeout=0)
        client.dataReceived(b"login")
        h.reactor.advance(600)
        self.assertIsNone(session.kept)
        self.assertEqual(len(h.reactor.tcpClients), 1)
        self.assertIs(server_t.producer, client_t)


class PendingCapTests(SynchronousTestCase):
    def test_per_address_cap_counts_only_what_is_not_established(self) -> None:
        """MAX_PENDING_PER_ADDRESS refuses a third unanswered login from one address, not from
        another; once a session has its AppServer's first byte it no longer counts."""
        h = Harness(self, max_pending_per_address=2)
        first, _ = h.accept(40001)
        h.accept(40002)
        self.assertIsNone(h.accept(40003)[0])
        self.assertIsNotNone(h.accept(40004, host="10.9.8.8")[0])
        server, _ = h.connect_server(h.attempt(0)[2])
        server.dataReceived(b"answer")  # established: uncounted
        self.assertIsNotNone(h.accept(40005)[0])
        self.assertIsNone(h.accept(40006)[0])
        self.assertEqual(h.factory.refused_pending_total, 2)
        self.assertEqual(h.factory.pending.count, 3)

    def test_global_cap(self) -> None:
        """MAX_PENDING refuses past the total, whatever the address; a session that ends frees
        its place."""
        h = Harness(self, max_pending=2)
        first, _ = h.accept(host="10.0.0.1")
        h.accept(host="10.0.0.2")
        self.assertIsNone(h.accept(host="10.0.0.3")[0])
        assert first is not None
        first.connectionLost(Failure(ConnectionLost()))
        h.attempt(0)[2].clientConnectionFailed(None, Failure(ConnectError("stopped")))
        self.assertIsNotNone(h.accept(host="10.0.0.3")[0])

    def test_refusal_lines_count_every_refusal(self) -> None:
        """1,001 refusals in a burst: one line at once (1), one after the interval (1,000)."""
        h = Harness(self, max_sessions=1)
        h.accept()
        for port in range(1001):
            self.assertIsNone(h.accept(port=port + 1)[0])
        lines = h.logs.find(refused=1)
        self.assertEqual(len(lines), 1)
        h.reactor.advance(10)
        counts = [e["refused"] for e in h.logs.events if "refused" in e]
        self.assertEqual(counts, [1, 1000])
        self.assertEqual(h.factory.refused_total, 1001)
        self.assertIn("refused 1000 connection(s) in the last 10s", h.logs.texts()[-1])
        h.reactor.advance(10)
        self.assertEqual(h.reactor.getDelayedCalls(), [])  # quiet again: the next logs at once


class NameResolutionTests(SynchronousTestCase):
    def resolver(self, answers: dict[str, list[str]]) -> list[str]:
        asked: list[str] = []

        class Resolver:
            def resolveHostName(self, receiver: Any, host: str, port: int = 0, *args: Any) -> Any:
                asked.append(host)
                receiver.resolutionBegan(None)
                for address in answers.get(host, []):
                    kind = IPv6Address if ":" in address else IPv4Address
                    receiver.addressResolved(kind("TCP", address, port))
                receiver.resolutionComplete()
                return receiver

        self.reactor.nameResolver = Resolver()  # type: ignore[attr-defined]
        return asked

    def test_every_address_of_a_name_is_tried(self) -> None:
        """A name with an IPv6 and an IPv4 address: each is tried before the next server; when
        all fail the server is suspended once."""
        pool = ServerPool([RemoteServer("01", "app.example", 5001), RemoteServer("02", "10.0.0.2", 5002)],
                          ConnectionBalancer(), suspect_time=10.0)
        self.reactor = MemoryReactorClock()
        asked = self.resolver({"app.example": ["2001:db8::1", "192.0.2.1"]})
        factory = BrokerFactory(self.reactor, pool)
        LogCatcher(self)
        protocol = factory.buildProtocol(None)
        assert protocol is not None
        protocol.makeConnection(HalfCloseTransport())
        self.assertEqual([c[:2] for c in self.reactor.tcpClients], [("2001:db8::1", 5001)])
        self.reactor.tcpClients[-1][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(self.reactor.tcpClients[-1][:2], ("192.0.2.1", 5001))
        self.assertIs(pool.get("01").state, ServerState.UP)
        self.reactor.tcpClients[-1][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(self.reactor.tcpClients[-1][:2], ("10.0.0.2", 5002))
        self.assertIs(pool.get("01").state, ServerState.SUSPENDED)
        self.assertEqual(pool.get("01").active, 0)
        self.assertEqual(asked, ["app.example"])  # the IP literal is not resolved
        factory.buildProtocol(None).makeConnection(HalfCloseTransport())  # type: ignore[union-attr]
        self.assertEqual(self.reactor.tcpClients[-1][:2], ("10.0.0.2", 5002))  # 01 is suspended
        self.reactor.tcpClients[-1][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(self.reactor.tcpClients[-1][:2], ("2001:db8::1", 5001))  # last resort
        self.assertEqual(asked, ["app.example"])  # resolved once, when the pool got its resolver
        self.reactor.advance(RESOLVE_EVERY)
        factory.buildProtocol(None).makeConnection(HalfCloseTransport())  # type: ignore[union-attr]
        self.assertEqual(asked, ["app.example", "app.example"])  # refreshed in the background

    def test_unresolvable_name_fails_over(self) -> None:
        """A name without addresses is a failed server: the next one is tried."""
        pool = ServerPool([RemoteServer("01", "nowhere.example", 5001), RemoteServer("02", "10.0.0.2", 5002)],
                          ConnectionBalancer())
        self.reactor = MemoryReactorClock()
        self.resolver({})
        logs = LogCatcher(self)
        factory = BrokerFactory(self.reactor, pool)
        protocol = factory.buildProtocol(None)
        assert protocol is not None
        protocol.makeConnection(HalfCloseTransport())
        self.assertEqual([c[:2] for c in self.reactor.tcpClients], [("10.0.0.2", 5002)])
        self.assertTrue(any("cannot resolve nowhere.example" in t for t in logs.texts()))


class OpenFilesLimitTests(SynchronousTestCase):
    class FakeResource:
        RLIMIT_NOFILE = 7
        RLIM_INFINITY = -1

        def __init__(self, soft: int, hard: int) -> None:
            self.limits = (soft, hard)

        def getrlimit(self, which: int) -> tuple[int, int]:
            return self.limits

        def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
            self.limits = limits

    def test_soft_limit_raised_to_hard_and_logged(self) -> None:
        """At start the soft RLIMIT_NOFILE is raised to the hard one and the figure logged."""
        from protheus_broker.tap import open_files_limit

        logs = LogCatcher(self)
        fake = self.FakeResource(1024, 524288)
        self.assertEqual(open_files_limit(10000, 1024, fake), (524288, 524288))
        self.assertEqual(fake.limits, (524288, 524288))
        self.assertIn("open files limit 524288 (hard 524288)", logs.texts())
        self.assertFalse([t for t in logs.texts() if "below" in t])

    def test_warns_with_the_numbers_when_too_low(self) -> None:
        """A hard limit below 2 per session plus the pending connections is one warning with both
        numbers."""
        from protheus_broker.tap import open_files_limit

        logs = LogCatcher(self)
        open_files_limit(10000, 1024, self.FakeResource(1024, 4096))
        [warning] = [t for t in logs.texts() if "below" in t]
        self.assertIn("open files limit 4096 is below the 21124 that MAX_SESSIONS=10000", warning)


class AddressKeyTests(SynchronousTestCase):
    def test_ipv6_clients_count_by_their_64_prefix(self) -> None:
        """Per-address caps count an IPv6 client by its /64 (one host may use any address in
        it), an IPv4-mapped one by its IPv4 address."""
        self.assertEqual(client_host(IPv6Address("TCP", "2001:db8:1:2:aaaa::1", 1)),
                         client_host(IPv6Address("TCP", "2001:db8:1:2:bbbb::7", 2)))
        self.assertNotEqual(client_host(IPv6Address("TCP", "2001:db8:1:2::1", 1)),
                            client_host(IPv6Address("TCP", "2001:db8:1:3::1", 1)))
        self.assertEqual(client_host(IPv6Address("TCP", "::ffff:10.1.2.3", 1)), "10.1.2.3")
        self.assertEqual(client_host(IPv4Address("TCP", "10.1.2.3", 1)), "10.1.2.3")
        self.assertEqual(client_host(None), "")
