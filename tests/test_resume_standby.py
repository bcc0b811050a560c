"""Standby is earned and bounded (issue 12, finding 1), in memory: a session whose link drops
before the connector acknowledged AppServer bytes ends at once; established sessions still wait
and resume; at most STANDBY_MAX_SESSIONS wait, the oldest ending first; a session in standby holds
no more than what was unacknowledged at the drop."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.resume import crypto
from protheus_broker.config import parse_config
from protheus_broker.resume.frames import HELLO, MAGIC, FrameParser, Kind, count_frame, encode

from .helpers import LogCatcher
from .resume_wire import Endpoint
from .test_resume_session import BROKER, Rig, payload


def raw_link(rig: Rig, host: str = "10.6.6.6") -> tuple[Endpoint, FrameParser]:
    """A hand-driven link to the broker (an attacker's, or a broken connector's)."""
    peer = Endpoint()
    rig.net.connect(peer, rig.broker.buildProtocol(None), rig.net.address(host),
                    IPv4Address("TCP", *BROKER), link=True)
    return peer, FrameParser()


def hello(peer: Endpoint) -> None:
    peer.transport.write(MAGIC + encode(Kind.HELLO, HELLO.pack(crypto.KeyPair().public, 1 << 20)))


class EarnedStandbyTests(SynchronousTestCase):
    def test_hello_then_reset_ends_the_session_at_once(self) -> None:
        """A link that sends HELLO and resets, even after the AppServer spoke, leaves nothing: no
        standby, no session slot, the AppServer connection closed, no timer, one log line."""
        logs = LogCatcher(self)
        rig = Rig(echo=False)
        peer, parser = raw_link(rig)
        hello(peer)
        rig.settle()
        [welcome] = parser.feed(bytes(peer.data))
        self.assertEqual(welcome.kind, Kind.WELCOME)
        [app] = rig.app.accepted
        app.transport.write(b"AppServer hello")  # reaches the link; never acknowledged
        rig.settle()
        self.assertEqual(len(rig.broker.sessions), 1)
        rig.net.cut(rig.link())  # a reset
        rig.settle()
        self.assertEqual((rig.sessions.count, rig.sessions.streams, rig.broker.sessions), (0, {}, {}))
        self.assertIsNotNone(app.lost)
        self.assertEqual(rig.reactor.getDelayedCalls(), [])
        self.assertEqual((rig.sessions.unestablished, rig.sessions.drops), (1, 0))
        [ended] = logs.ended()
        self.assertIn("before the session was established", ended["how"])
        self.assertEqual(len(logs.events), 1)

    def test_reset_before_the_appserver_answers_ends_the_session(self) -> None:
        """A reset while the AppServer connection is still being made stops the attempt: the
        slot is freed and no AppServer connection is left behind."""
        rig = Rig()
        peer, _ = raw_link(rig)
        hello(peer)
        rig.net.pump_once()  # the HELLO reaches the broker; the AppServer connect is under way
        self.assertEqual(len(rig.broker.sessions), 1)
        rig.net.cut(rig.link())
        rig.settle()
        self.assertEqual((rig.sessions.count, rig.broker.sessions), (0, {}))
        self.assertTrue(all(app.lost is not None for app in rig.app.accepted))
        self.assertEqual(rig.sessions.unestablished, 1)

    def test_blind_acknowledgement_does_not_earn_standby(self) -> None:
        """Acknowledging AppServer bytes that were never sent is a protocol error: the link is
        dropped and the session ends, it does not go to standby."""
        rig = Rig(echo=False)
        peer, _ = raw_link(rig)
        hello(peer)
        rig.settle()
        peer.transport.write(count_frame(Kind.ACK, 100))
        rig.settle()
        self.assertIsNotNone(peer.lost)
        self.assertEqual((rig.sessions.count, rig.broker.sessions, rig.sessions.drops), (0, {}, 0))

    def test_keepalive_without_appserver_bytes_does_not_earn_standby(self) -> None:
        """A link that only keeps itself alive (PING 0) for a minute is still not established:
        its drop ends the session."""
        rig = Rig(echo=False)
        peer, _ = raw_link(rig)
        hello(peer)
        rig.settle()
        for _ in range(60):
            peer.transport.write(count_frame(Kind.PING, 0))
            rig.advance(1.0, step=0.5)
        self.assertEqual(len(rig.broker.sessions), 1)
        rig.net.cut(rig.link())
        rig.settle()
        self.assertEqual((rig.sessions.count, rig.broker.sessions), (0, {}))
        self.assertEqual(rig.sessions.unestablished, 1)

    def test_connector_acknowledges_first_appserver_bytes_at_once(self) -> None:
        """The connector acknowledges the AppServer's first bytes without waiting for a keepalive,
        so a real session is established one round trip after the AppServer first speaks."""
        rig = Rig(echo=False, buffer=1024 * 1024)
        client = rig.smartclient(establish=False)
        stream = rig.stream()
        self.assertFalse(stream.established)
        rig.app.accepted[0].transport.write(b"hi")
        rig.settle()  # no time passes: no PING
        self.assertEqual(bytes(client.data), b"hi")
        self.assertEqual(stream.out.size, 0)  # acknowledged
        self.assertTrue(stream.established)

    def test_established_session_waits_in_standby_and_resumes(self) -> None:
        """Once the connector acknowledged AppServer bytes, a drop puts the session in standby and
        the connector resumes it without loss."""
        rig = Rig(echo=False)
        client = rig.smartclient()
        self.assertTrue(rig.stream().established)
        rig.net.down = True
        rig.cut()
        rig.advance(2.0)
        self.assertEqual((rig.sessions.count, rig.sessions.drops, rig.sessions.unestablished), (1, 1, 0))
        rig.net.down = False
        rig.advance(0.5)
        rig.app.accepted[0].transport.write(b"after")
        rig.settle()
        self.assertEqual((rig.sessions.resumes, bytes(client.data)), (1, b"after"))

    def test_unestablished_drop_closes_the_smartclient(self) -> None:
        """A real connector whose link drops before it acknowledged AppServer bytes is refused on
        its resume and closes the SmartClient (it logs in again, as after a drop before the
        WELCOME); nothing is left on either side."""
        rig = Rig(echo=False)
        client = rig.smartclient(establish=False)
        rig.cut()
        rig.advance(1.0)
        self.assertIsNotNone(client.lost)
        self.assertEqual((rig.sessions.resume_failures, rig.sessions.unestablished), (1, 1))
        self.assertTrue(rig.idle())


class StandbyCapTests(SynchronousTestCase):
    def open(self, rig: Rig, count: int) -> list[Any]:
        clients = [rig.smartclient() for _ in range(count)]
        for client, n in zip(clients, range(count)):
            client.transport.write(f"client {n}.".encode())
        rig.settle()
        return clients

    def test_cap_ends_the_oldest_standby_session(self) -> None:
        """With STANDBY_MAX_SESSIONS=2, a third drop ends the oldest session in standby (its
        AppServer connection closed, its slot freed), the two newest resume without loss."""
        logs = LogCatcher(self)
        rig = Rig(echo=False, standby_max=2)
        clients = self.open(rig, 3)
        apps = list(rig.app.accepted)
        rig.net.down = True
        for link in rig.net.links():
            rig.net.cut(link)
            rig.advance(1.0)
        self.assertEqual((rig.sessions.count, len(rig.broker.sessions)), (2, 2))
        self.assertEqual((rig.sessions.evictions, rig.sessions.drops), (1, 3))
        self.assertIsNotNone(apps[0].lost)
        self.assertEqual([app.lost for app in apps[1:]], [None, None])
        [evicted] = logs.find(event="resume.evicted")
        self.assertEqual((evicted["cap"], evicted["count"]), (2, 1))
        rig.net.down = False
        rig.advance(1.0)
        self.assertEqual(rig.sessions.resumes, 2)
        self.assertIsNotNone(clients[0].lost)
        for n in (1, 2):
            apps[n].transport.write(b"back")
            rig.settle()
            self.assertEqual(bytes(clients[n].data), b"back")
            self.assertEqual(bytes(apps[n].data), f"client {n}.".encode())

    def test_evictions_logged_at_most_once_in_ten_seconds(self) -> None:
        """Six drops over a cap of one end five sessions with one log line, all counted."""
        logs = LogCatcher(self)
        rig = Rig(echo=False, standby_max=1)
        self.open(rig, 6)
        rig.net.down = True
        for link in rig.net.links():
            rig.net.cut(link)
            rig.advance(0.5)
        self.assertEqual(rig.sessions.count, 1)
        self.assertEqual(rig.sessions.evictions, 5)
        self.assertEqual(len(logs.find(event="resume.evicted")), 1)

    def test_standby_max_sessions_key(self) -> None:
        """STANDBY_MAX_SESSIONS in the desktop section sets the cap (default 1000); a bad value is
        one error naming the key."""
        base = ("[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT=1\nREMOTE_SERVER_A=h 2\n"
                "SORT_METHOD=CONNECTION\n")
        self.assertEqual(parse_config(base).desktop.resume.standby_max_sessions, 1000)
        parsed = parse_config(base + "STANDBY_MAX_SESSIONS = 50\n")
        self.assertEqual((parsed.desktop.resume.standby_max_sessions, parsed.warnings), (50, ()))
        with self.assertRaisesRegex(Exception, r":5: STANDBY_MAX_SESSIONS: 0 is out of range"):
            parse_config(base + "STANDBY_MAX_SESSIONS = 0\n")
        with self.assertRaisesRegex(Exception, "STANDBY_MAX_SESSIONS: expected a whole number"):
            parse_config(base + "STANDBY_MAX_SESSIONS = many\n")


class StandbyMemoryTests(SynchronousTestCase):
    def test_idle_standby_session_holds_no_buffers(self) -> None:
        """An idle session in standby keeps no stream bytes: an empty replay buffer, nothing held
        for the AppServer, no link (and so no frame parser or socket buffers)."""
        rig = Rig(buffer=1024 * 1024)
        client = rig.smartclient()
        client.transport.write(payload(1, 300_000))
        rig.advance(2.0)  # echoed and acknowledged
        rig.net.down = True
        rig.cut()
        rig.settle()
        stream = rig.stream()
        self.assertEqual(rig.sessions.count, 1)
        self.assertEqual((stream.out.size, len(stream.out._chunks), stream.held, stream.link),
                         (0, 0, [], None))
