"""The session lifecycle in memory: its transition table, gates, and waiting for a server."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from protheus_broker.balancing.methods import ConnectionBalancer
from protheus_broker.balancing.pool import ServerPool, ServerState
from protheus_broker.desktop.lifecycle import (TRANSITIONS, GateRefused, IGate, Lifecycle, ServerAvailable,
                                               SessionState)
from protheus_broker.desktop.proxy import BrokerFactory, ClientSide, Session
from protheus_broker.config import parse_config

from .helpers import LogCatcher, servers

S = SessionState


class Harness:
    """A broker over two servers, both Down unless told otherwise."""

    def __init__(self, test: SynchronousTestCase, wait: float = 5.0, down: bool = True,
                 **options: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = ServerPool(servers(5001, 5002), ConnectionBalancer(), clock=self.reactor)
        if down:
            for backend in self.pool:
                self.pool.set_state(backend.server_id, ServerState.DOWN, "monitor: refused")
        self.factory = BrokerFactory(self.reactor, self.pool, wait_for_server=wait,
                                     max_pending=4, **options)
        self.logs = LogCatcher(test)

    def accept(self, port: int = 40000) -> tuple[ClientSide, StringTransport]:
        addr = IPv4Address("TCP", "10.9.8.7", port)
        transport = StringTransport(peerAddress=addr)
        protocol = self.factory.buildProtocol(addr)
        assert isinstance(protocol, ClientSide)
        protocol.makeConnection(transport)
        return protocol, transport


class LifecycleTests(SynchronousTestCase):
    def test_legal_path(self) -> None:
        """The whole path accepted -> ended, with a replay, is legal."""
        life = Lifecycle(1)
        for state in (S.CHOOSING, S.WAITING, S.CHOOSING, S.CONNECTING, S.LINKED, S.CONNECTING,
                      S.LINKED, S.CLOSING, S.ENDED):
            self.assertTrue(life.move(state), state)
        self.assertTrue(life.ended)

    def test_illegal_move_is_one_log_line(self) -> None:
        """An illegal move is refused with one log line naming both states, and no exception."""
        logs = LogCatcher(self)
        life = Lifecycle(7)
        self.assertFalse(life.move(S.LINKED))
        self.assertIs(life.state, S.ACCEPTED)
        [line] = [t for t in logs.texts() if "illegal" in t]
        self.assertEqual(line, "session 7: illegal lifecycle move accepted -> linked, ignored")

    def test_ended_is_final(self) -> None:
        """Nothing leaves the ended state."""
        self.assertEqual(TRANSITIONS[S.ENDED], frozenset())
        self.assertEqual(set(TRANSITIONS), set(SessionState))

    def test_session_walks_the_machine(self) -> None:
        """A session with a server up goes choosing -> connecting -> linked -> ended, no wait."""
        h = Harness(self, down=False)
        client, client_t = h.accept()
        session = client.session
        self.assertIs(session.state, S.CONNECTING)
        server = session.buildProtocol(None)
        server.makeConnection(StringTransport())
        self.assertIs(session.state, S.LINKED)
        client.connectionLost(Failure(ConnectionDone()))
        self.assertIs(session.state, S.CLOSING)
        server.connectionLost(Failure(ConnectionDone()))
        self.assertIs(session.state, S.ENDED)
        self.assertEqual([t for t in h.logs.texts() if "illegal" in t], [])


class WaitingTests(SynchronousTestCase):
    def test_waits_and_times_out_with_its_reason(self) -> None:
        """With no server up, a session waits WAIT_FOR_SERVER seconds, then closes the client
        with the reason in its end line."""
        h = Harness(self, wait=5.0)
        client, client_t = h.accept()
        session = client.session
        self.assertIs(session.state, S.WAITING)
        self.assertEqual(client_t.producerState, "paused")
        self.assertEqual(h.reactor.tcpClients, [])
        self.assertEqual(h.factory.pending.count, 1)  # held sessions count as pending
        h.reactor.advance(4.9)
        self.assertFalse(client_t.disconnecting)
        h.reactor.advance(0.1)
        self.assertTrue(client_t.disconnecting)
        self.assertIs(session.state, S.CLOSING)
        self.assertEqual(h.factory.sessions_failed, 1)
        client.connectionLost(Failure(ConnectionDone()))
        [ended] = h.logs.ended()
        self.assertEqual(
            ended["how"], "no AppServer available (none could take a session within 5s: "
            "01 down: monitor: refused; 02 down: monitor: refused)")
        self.assertEqual(h.factory.pending.count, 0)
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_waits_then_connects_when_a_server_comes_up(self) -> None:
        """A waiting session connects as soon as a server is Up, to that server."""
        h = Harness(self, wait=5.0)
        client, client_t = h.accept()
        h.reactor.advance(2)
        h.pool.set_state("02", ServerState.UP, "monitor: answered")
        self.assertIs(client.session.state, S.CONNECTING)
        [(host, port, factory, timeout, _)] = h.reactor.tcpClients
        self.assertEqual(port, 5002)
        server = factory.buildProtocol(None)
        server.makeConnection(StringTransport())
        self.assertEqual(client_t.producerState, "producing")
        self.assertIs(client.session.state, S.LINKED)
        self.assertEqual(h.reactor.getDelayedCalls(), [])  # the wait's timer is gone

    def test_client_leaving_cancels_the_wait(self) -> None:
        """A client that leaves while waiting ends its session and holds no waiter or timer."""
        h = Harness(self, wait=5.0)
        client, client_t = h.accept()
        client.connectionLost(Failure(ConnectionDone()))
        self.assertIs(client.session.state, S.ENDED)
        self.assertEqual(h.pool._waiters, [])
        self.assertEqual(h.reactor.getDelayedCalls(), [])
        self.assertEqual(h.factory.pending.count, 0)
        h.pool.set_state("01", ServerState.UP, "monitor: answered")
        self.assertEqual(h.reactor.tcpClients, [])

    def test_no_wait_fails_at_once(self) -> None:
        """WAIT_FOR_SERVER=0 (the default) fails at once, as before."""
        h = Harness(self, wait=0.0)
        client, client_t = h.accept()
        self.assertTrue(client_t.disconnecting)
        self.assertEqual(client.session.how, "no AppServer available (none is up)")

    def test_waiting_sessions_are_capped_as_pending(self) -> None:
        """Waiting sessions count against MAX_PENDING: the fifth connection is refused."""
        h = Harness(self, wait=5.0)
        for port in range(4):
            h.accept(40000 + port)
        addr = IPv4Address("TCP", "10.9.8.7", 41000)
        self.assertIsNone(h.factory.buildProtocol(addr))

    def test_failover_after_the_wait_fails_as_before(self) -> None:
        """A server that came up and refuses: the session fails with the failures it met."""
        h = Harness(self, wait=5.0)
        client, client_t = h.accept()
        h.pool.set_state("01", ServerState.UP, "monitor: answered")
        h.reactor.tcpClients[-1][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertTrue(client_t.disconnecting)
        self.assertIn("01 127.0.0.1:5001", client.session.how)


@implementer(IGate)
class RecordingGate:
    """A gate that answers with the Deferred it is given."""

    def __init__(self, answer: Deferred[None]) -> None:
        self.answer = answer
        self.asked: list[Session] = []

    def acquire(self, session: Any) -> Deferred[None]:
        self.asked.append(session)
        return self.answer


class GateTests(SynchronousTestCase):
    def test_server_available_provides_igate(self) -> None:
        """ServerAvailable is an IGate."""
        h = Harness(self)
        self.assertTrue(verifyObject(IGate, ServerAvailable(h.pool, 1.0)))

    def test_refusing_gate_closes_with_its_reason(self) -> None:
        """A gate's refusal is the session's end reason and its log line; no server is tried."""
        h = Harness(self, down=False)
        gate = RecordingGate(fail(GateRefused("no license available", "all 10 in use")))
        h.factory.gates.append(gate)
        client, client_t = h.accept()
        self.assertEqual(gate.asked, [client.session])
        self.assertTrue(client_t.disconnecting)
        self.assertEqual(h.reactor.tcpClients, [])
        self.assertEqual(client.session.how, "no license available (all 10 in use)")
        self.assertIn("session 1 from 10.9.8.7:40000: no license available, closing the client "
                      "(all 10 in use)", h.logs.texts())

    def test_gates_pass_in_order(self) -> None:
        """A later gate holds the session until it fires; then the session connects."""
        h = Harness(self, down=False)
        answer: Deferred[None] = Deferred()
        h.factory.gates.append(RecordingGate(answer))
        client, client_t = h.accept()
        self.assertIs(client.session.state, S.WAITING)
        answer.callback(None)
        self.assertIs(client.session.state, S.CONNECTING)
        self.assertEqual(len(h.reactor.tcpClients), 1)

    def test_broken_gate_is_one_line_and_no_hold(self) -> None:
        """A gate failing with an unexpected error closes the client with one line naming it."""
        h = Harness(self, down=False)
        h.factory.gates.append(RecordingGate(fail(ValueError("bad state"))))
        client, client_t = h.accept()
        self.assertTrue(client_t.disconnecting)
        self.assertEqual(client.session.how, "a gate failed (bad state)")


class WaitSettingTests(SynchronousTestCase):
    def test_wait_for_server_key(self) -> None:
        """WAIT_FOR_SERVER is read in seconds, default 0."""
        text = "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT=1\nREMOTE_SERVER_01=127.0.0.1 2\n"
        self.assertEqual(parse_config(text).desktop.wait_for_server, 0.0)
        self.assertEqual(parse_config(text + "WAIT_FOR_SERVER=2.5\n").desktop.wait_for_server, 2.5)

