"""Resumable sessions in memory: connector and broker over a network the test cuts, silences and
restores, with a MemoryReactorClock for keepalives, backoff and the standby window."""

from __future__ import annotations

import hashlib
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.resume import crypto
from protheus_broker.balancing.methods import ConnectionBalancer
from protheus_broker.config import parse_config
from protheus_broker.resume.connector import ConnectorFactory
from protheus_broker.balancing.pool import ServerPool, ServerState
from protheus_broker.desktop.lifecycle import SessionState
from protheus_broker.desktop.proxy import BrokerFactory, ClientSide
from protheus_broker.resume.broker import ResumableSessions
from protheus_broker.resume.frames import MAGIC, PROOF, RESUME, FrameParser, Kind, encode
from protheus_broker.resume.settings import ConnectorConfig, ResumeConfig

from .helpers import LogCatcher, servers
from .resume_wire import Endpoint, EndpointFactory, Net

APP = ("127.0.0.1", 5001)
GREETING = b"AppServer hello\r\n"
BROKER = ("broker.example", 4000)


class Rig:
    """SmartClient -> connector -> (links the test controls) -> broker -> AppServer, in memory."""

    def __init__(self, standby: float = 180.0, buffer: int = 64 * 1024, keepalive: float = 1.0,
                 connector_buffer: int | None = None, echo: bool = True, standby_max: int = 1000) -> None:
        self.reactor = clock = __import__("twisted.internet.testing", fromlist=["x"]).MemoryReactorClock()
        self.net = Net(clock)
        self.app = EndpointFactory(echo=echo)
        self.net.listen(*APP, self.app)
        self.config = ResumeConfig(standby_time=standby, buffer_size=buffer, keepalive=keepalive,
                                   standby_max_sessions=standby_max)
        self.sessions = ResumableSessions(clock, self.config)
        self.broker = BrokerFactory(clock, ServerPool(servers(APP[1]), ConnectionBalancer()),
                                    recognisers=[self.sessions.recogniser])
        self.broker.standby = self.sessions
        self.net.listen(*BROKER, self.broker, link=True)
        self.connector = ConnectorFactory(clock, ConnectorConfig(
            path="smartclient.ini", section="TCP", broker_host=BROKER[0], broker_port=BROKER[1],
            listen_interface="127.0.0.1", listen_port=1234,
            buffer_size=connector_buffer or buffer, keepalive=keepalive))

    def smartclient(self, establish: bool = True) -> Endpoint:
        """A SmartClient connecting through the connector.  With *establish*, its new AppServer
        connection first sends a greeting, which the connector acknowledges (so the session has
        earned standby); the greeting is then removed from what the client got."""
        client = Endpoint()
        local = self.connector.buildProtocol(None)
        accepted = len(self.app.accepted)
        self.net.connect(client, local, self.net.address("127.0.0.1"),
                         __import__("twisted.internet.address", fromlist=["x"]).IPv4Address(
                             "TCP", "127.0.0.1", 1234))
        self.net.settle()
        if establish and len(self.app.accepted) > accepted:
            self.app.accepted[-1].transport.write(GREETING)
            self.net.settle()
            assert bytes(client.data) == GREETING
            client.data.clear()
            client.digest = hashlib.sha256()
        return client

    def settle(self) -> None:
        self.net.settle()

    def advance(self, seconds: float, step: float = 0.05) -> None:
        """Let time pass in small steps, the network moving between them."""
        end = self.reactor.seconds() + seconds
        while self.reactor.seconds() < end - 1e-9:
            self.reactor.advance(min(step, end - self.reactor.seconds()))
            self.net.settle()

    def link(self) -> Any:
        [link] = self.net.links()
        return link

    def cut(self) -> None:
        self.net.cut(self.link())

    def stream(self) -> Any:
        [stream] = self.sessions.streams.values()
        return stream

    def idle(self) -> bool:
        """Nothing left anywhere: no session, no link, no timer."""
        return (not self.sessions.streams and not self.connector.streams and not self.net.connections
                and not self.broker.sessions and not self.reactor.getDelayedCalls())


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


class OpenAndRelayTests(SynchronousTestCase):
    def test_session_relays_both_ways_and_ends_cleanly(self) -> None:
        """Bytes go SmartClient -> AppServer -> back; half-close ends the session on both sides,
        leaving no session, link or timer."""
        rig = Rig()
        client = rig.smartclient()
        self.assertEqual(len(rig.sessions.streams), 1)
        data = payload(1, 300_000)
        client.transport.write(data)
        client.transport.loseWriteConnection()
        rig.settle()
        [app] = rig.app.accepted
        self.assertEqual(bytes(app.data), data)
        self.assertEqual(bytes(client.data), data)
        self.assertTrue(client.got_eof)
        self.assertIsNotNone(client.lost)
        self.assertTrue(rig.idle())
        self.assertEqual((rig.sessions.drops, rig.sessions.resumes), (0, 0))

    def test_secret_never_on_the_wire(self) -> None:
        """The resume secret is derived on both sides and never sent, nor is it in a resume."""
        rig = Rig()
        client = rig.smartclient()
        client.transport.write(b"login")
        rig.settle()
        rig.cut()
        rig.advance(0.5)
        self.assertEqual(rig.sessions.resumes, 1)
        stream = rig.stream()
        [connector_stream] = rig.connector.streams
        self.assertEqual(stream.secret, connector_stream.secret)
        self.assertGreaterEqual(len(stream.secret) * 8, 128)
        self.assertNotIn(stream.secret, b"".join(rig.net.link_wire))

    def test_plain_smartclient_still_served_on_the_same_port(self) -> None:
        """A SmartClient without the connector gets an ordinary session on the same factory."""
        rig = Rig()
        client = Endpoint()
        conn = rig.net.connect(client, rig.broker.buildProtocol(None), rig.net.address(),
                               __import__("twisted.internet.address", fromlist=["x"]).IPv4Address(
                                   "TCP", *BROKER))
        client.transport.write(b"\x16\x03\x01hello")
        rig.settle()
        self.assertIsInstance(conn.server.protocol, ClientSide)
        self.assertEqual(bytes(client.data), b"\x16\x03\x01hello")
        self.assertEqual(rig.sessions.streams, {})


    def test_resumable_session_waits_for_a_server(self) -> None:
        """Through the connector too, a session arriving with no AppServer up waits
        (WAIT_FOR_SERVER), then its bytes reach the server that comes up, in order."""
        rig = Rig()
        rig.broker.wait_for_server = 5.0
        rig.broker.pool.set_state("01", ServerState.DOWN, "monitor: refused")
        client = rig.smartclient(establish=False)
        data = payload(3, 100_000)
        client.transport.write(data)
        rig.advance(2)
        self.assertEqual(rig.app.accepted, [])
        [session] = rig.broker.sessions.values()
        self.assertIs(session.state, SessionState.WAITING)
        rig.broker.pool.set_state("01", ServerState.UP, "monitor: answered")
        rig.settle()
        [app] = rig.app.accepted
        self.assertEqual(bytes(app.data), data)
        self.assertEqual(bytes(client.data), data)  # echoed back


class ResumeTests(SynchronousTestCase):
    def exchange(self, rig: Rig, data: bytes, cuts: list[int], establish: bool = True,
                 watch: Any = None) -> Endpoint:
        """Open a session and send *data* in pieces, cutting the link once the given numbers of
        bytes have crossed links (with *establish*, counted from after the session was
        established; else the handshake included)."""
        pending = sorted(cuts)

        def maybe_cut() -> None:
            if watch is not None:
                watch()
            while pending and rig.net.link_bytes >= pending[0]:
                pending.pop(0)
                if rig.net.links():
                    rig.cut()

        if establish:
            client = rig.smartclient()
            pending = [cut + rig.net.link_bytes for cut in pending]
            rig.net.on_link_bytes = maybe_cut
        else:
            rig.net.on_link_bytes = maybe_cut
            client = rig.smartclient(establish=False)
        piece = max(1, len(data) // 3)
        for start in range(0, len(data), piece):
            client.transport.write(data[start:start + piece])
            rig.advance(0.3, step=0.1)
        client.transport.loseWriteConnection()
        rig.advance(1.0, step=0.1)
        return client

    def test_resume_at_every_boundary(self) -> None:
        """A cut after every single link byte (so at every frame boundary and inside every frame,
        handshake included): once the session is established, both streams arrive whole and in
        order, the AppServer sees one connection and the session ends cleanly; a cut before
        WELCOME reaches the connector closes the SmartClient with nothing delivered; a cut after
        it but before the connector's first acknowledgement of AppServer bytes reached the
        broker ends the session at once on both sides (nothing kept in standby)."""
        data = payload(7, 240)
        clean = Rig()
        clean.net.link_chunk = 1
        marks: list[int] = []

        def watch() -> None:
            if not marks and any(s.established for s in clean.sessions.streams.values()):
                marks.append(clean.net.link_bytes)

        self.exchange(clean, data, [], establish=False, watch=watch)
        total = clean.net.link_bytes
        self.assertTrue(clean.idle())
        self.assertGreater(total, 2 * len(data))
        welcome_at = len(MAGIC) + 5 + 36 + 5 + 56  # magic, HELLO, WELCOME
        [established_at] = marks
        self.assertGreater(established_at, welcome_at + len(data) // 3)  # after the first echo
        logs = LogCatcher(self)
        for cut in range(0, total + 1):
            logs.events.clear()
            rig = Rig()
            rig.net.link_chunk = 1
            client = self.exchange(rig, data, [cut], establish=False)
            if cut < welcome_at:
                self.assertEqual((bytes(client.data), client.lost is not None), (b"", True), cut)
                rig.advance(180.5, step=30)
            elif cut < established_at:
                self.assertIsNotNone(client.lost, cut)
                self.assertTrue(data.startswith(bytes(client.data)), cut)
                self.assertEqual((rig.sessions.drops, rig.sessions.unestablished), (0, 1), cut)
                self.assertEqual(len(logs.find(event="connector.failed")), 1, cut)
            else:
                self.assertEqual(bytes(client.data), data, f"cut after link byte {cut}")
                self.assertEqual(bytes(rig.app.accepted[0].data), data, cut)
                self.assertLessEqual(rig.sessions.drops, 1, cut)
                self.assertEqual(rig.sessions.resumes, rig.sessions.drops, cut)
                self.assertEqual(rig.connector.resumes, rig.connector.drops, cut)
                self.assertEqual(logs.find(event="connector.failed"), [], cut)
            if cut < len(MAGIC) + 41:  # before the HELLO: no AppServer connection
                self.assertEqual(len(rig.app.accepted), 0, cut)
            elif cut < established_at:  # ended at once: closed, or never completed
                self.assertLessEqual(len(rig.app.accepted), 1, cut)
                self.assertTrue(all(app.lost is not None for app in rig.app.accepted), cut)
            else:
                self.assertEqual(len(rig.app.accepted), 1, cut)
            self.assertTrue(rig.idle(), f"cut after link byte {cut}: something left over")

    @settings(max_examples=40, deadline=None)
    @given(st.lists(st.integers(min_value=120, max_value=400_000), max_size=8),
           st.integers(min_value=0, max_value=2**32))
    def test_many_cuts_at_random_points(self, cuts: list[int], seed: int) -> None:
        """Several cuts anywhere in a 200 KB exchange: byte-exact both ways, one AppServer
        connection, every drop resumed."""
        rig = Rig(buffer=64 * 1024)
        data = payload(seed, 200_000)
        client = self.exchange(rig, data, cuts)
        self.assertEqual(bytes(client.data), data)
        self.assertEqual(len(rig.app.accepted), 1)
        self.assertEqual(rig.sessions.resumes, rig.sessions.drops)
        self.assertTrue(rig.idle())

    def test_resume_logs_downtime_and_bytes_replayed(self) -> None:
        """One drop and one resume event, with the downtime and the bytes sent again."""
        logs = LogCatcher(self)
        rig = Rig(echo=False)
        client = rig.smartclient()
        client.transport.write(b"x" * 1000)
        rig.settle()
        [app] = rig.app.accepted
        rig.link().silent = True  # a black hole: the broker sends, nothing arrives
        app.transport.write(b"y" * 5000)  # unacknowledged when the link drops: replayed
        rig.settle()
        rig.net.down = True
        rig.cut()
        rig.advance(2.0)
        self.assertEqual(rig.sessions.count, 1)
        [entry] = rig.sessions.snapshot()
        self.assertEqual(entry["buffered_bytes"], 5000)
        self.assertEqual(set(entry), {"session_id", "client", "server_id", "since", "buffered_bytes"})
        self.assertEqual(entry["server_id"], "01")
        rig.net.down = False
        rig.advance(0.5)
        self.assertEqual(bytes(client.data), b"y" * 5000)
        [drop] = logs.find(event="resume.drop")
        [resumed] = logs.find(event="resume.resumed")
        self.assertEqual(resumed["bytes_replayed"], 5000)
        self.assertGreaterEqual(resumed["downtime"], 2.0)
        self.assertLess(resumed["downtime"], 2.5)  # backoff capped: back within a second
        self.assertEqual((rig.sessions.count, rig.sessions.snapshot()), (0, []))

    def test_roaming_resume_from_another_address(self) -> None:
        """The connector may come back from a new IP: the secret, not the address, decides."""
        rig = Rig()
        client = rig.smartclient()
        client.transport.write(b"before")
        rig.settle()
        first = rig.stream().peer.host
        rig.net.address = lambda host="10.9.9.9": __import__(  # type: ignore[method-assign]
            "twisted.internet.address", fromlist=["x"]).IPv4Address("TCP", host, 50000)
        rig.cut()
        rig.advance(0.2)
        client.transport.write(b"after")
        rig.settle()
        self.assertEqual((first, rig.stream().peer.host), ("10.0.0.5", "10.9.9.9"))
        self.assertEqual(bytes(client.data), b"beforeafter")


class StandbyTests(SynchronousTestCase):
    def test_expiry_at_the_window(self) -> None:
        """With the network down the session waits exactly STANDBY_TIME: then the AppServer
        connection is closed, everything freed, one expiry logged, and the connector closes the
        SmartClient."""
        logs = LogCatcher(self)
        rig = Rig(standby=180.0)
        client = rig.smartclient()
        client.transport.write(b"hi")
        rig.settle()
        [app] = rig.app.accepted
        rig.net.down = True
        rig.cut()
        rig.advance(179.9, step=5)
        self.assertEqual((rig.sessions.count, app.lost, client.lost), (1, None, None))
        rig.advance(0.2)
        self.assertEqual((rig.sessions.count, rig.sessions.expiries), (0, 1))
        rig.advance(0.5)  # the connector's own window ends at its next attempt
        self.assertIsNotNone(app.lost)
        self.assertIsNotNone(client.lost)
        [expired] = logs.find(event="resume.expired")
        self.assertEqual(expired["window"], 180.0)
        self.assertEqual(rig.connector.expiries, 1)
        self.assertTrue(rig.idle())

    def test_standby_time_key_sets_the_window(self) -> None:
        """STANDBY_TIME in the desktop section is the window; the default is 180 s."""
        base = ("[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT=1\nREMOTE_SERVER_A=h 2\n"
                "SORT_METHOD=CONNECTION\n")
        self.assertEqual(parse_config(base).desktop.resume.standby_time, 180.0)
        config = parse_config(base + "STANDBY_TIME = 30\nRESUME_BUFFER_SIZE=256\n").desktop.resume
        self.assertEqual((config.standby_time, config.buffer_size), (30.0, 256 * 1024))
        self.assertEqual(parse_config(base + "STANDBY_TIME = 30\n").warnings, ())
        with self.assertRaisesRegex(Exception, "STANDBY_TIME: expected a number"):
            parse_config(base + "STANDBY_TIME = soon\n")
        rig = Rig(standby=30.0)
        rig.smartclient()
        rig.net.down = True
        rig.cut()
        rig.advance(29.9, step=5)
        self.assertEqual(rig.sessions.expiries, 0)
        rig.advance(0.2)
        self.assertEqual(rig.sessions.expiries, 1)

    def test_full_replay_buffer_stops_reading_the_appserver(self) -> None:
        """The broker keeps unacknowledged AppServer bytes up to its buffer, then stops reading
        the AppServer (backpressure, nothing lost); in standby it reads nothing more; after the
        resume every byte arrives."""
        rig = Rig(buffer=64 * 1024, echo=False)
        client = rig.smartclient()
        [app] = rig.app.accepted
        rig.link().silent = True  # a black hole: nothing is acknowledged
        data = payload(3, 1_000_000)
        for start in range(0, len(data), 16 * 1024):
            app.transport.write(data[start:start + 16 * 1024])
        rig.settle()
        stream = rig.stream()
        server_end = app.transport.other
        self.assertEqual(server_end.producerState, "paused")  # the broker does not read
        self.assertGreaterEqual(stream.out.size, 64 * 1024)
        self.assertLess(stream.out.size, 64 * 1024 + 256 * 1024)  # at most one read over
        held = stream.out.size
        rig.net.down = True
        rig.cut()
        rig.settle()
        self.assertEqual((rig.sessions.count, stream.out.size), (1, held))
        self.assertEqual(server_end.producerState, "paused")
        self.assertGreater(app.transport.queued(), 600_000)  # the rest waits at the AppServer
        self.assertEqual(app.transport.producer_paused, False)  # not our business: no producer
        rig.net.down = False
        rig.advance(1.0)
        self.assertEqual(bytes(client.data), data)
        self.assertEqual(server_end.producerState, "producing")

    def test_standby_reads_nothing_from_the_appserver(self) -> None:
        """An idle session in standby holds no AppServer bytes, whatever the AppServer sends
        meanwhile (it waits in the AppServer's socket buffers): its replay buffer is empty, the
        AppServer connection is not read; after the resume every byte arrives in order."""
        rig = Rig(buffer=1024 * 1024, echo=False)
        client = rig.smartclient()
        [app] = rig.app.accepted
        rig.net.down = True
        rig.cut()
        rig.settle()
        data = payload(5, 2_000_000)
        for start in range(0, len(data), 16 * 1024):
            app.transport.write(data[start:start + 16 * 1024])
        rig.advance(5.0, step=0.5)
        stream = rig.stream()
        self.assertEqual((rig.sessions.count, stream.out.size, stream.out._chunks), (1, 0, type(
            stream.out._chunks)()))
        self.assertEqual((stream.held, stream.link), ([], None))
        self.assertEqual(app.transport.other.producerState, "paused")
        self.assertEqual(app.transport.queued(), len(data))
        [entry] = rig.sessions.snapshot()
        self.assertEqual(entry["buffered_bytes"], 0)
        rig.net.down = False
        rig.advance(1.0)
        self.assertEqual(bytes(client.data), data)
        self.assertEqual(rig.sessions.count, 0)

    def test_full_connector_buffer_stops_reading_the_smartclient(self) -> None:
        """The connector keeps unacknowledged SmartClient bytes up to its buffer, then stops
        reading the SmartClient until a resume frees space."""
        rig = Rig(buffer=64 * 1024, echo=False)
        client = rig.smartclient()
        rig.net.down = True
        rig.cut()
        data = payload(4, 500_000)
        client.transport.write(data)
        rig.settle()
        local_end = client.transport.other
        [stream] = rig.connector.streams
        self.assertEqual(local_end.producerState, "paused")
        self.assertLess(stream.out.size, 64 * 1024 + 300_000)
        rig.net.down = False
        rig.advance(1.0)
        self.assertEqual(bytes(rig.app.accepted[0].data), data)


class RefusalTests(SynchronousTestCase):
    def raw_link(self, rig: Rig) -> tuple[Endpoint, FrameParser]:
        """A hand-driven connector link to the broker."""
        peer = Endpoint()
        rig.net.connect(peer, rig.broker.buildProtocol(None), rig.net.address("10.6.6.6"),
                        __import__("twisted.internet.address", fromlist=["x"]).IPv4Address(
                            "TCP", *BROKER), link=True)
        return peer, FrameParser()

    def frames(self, peer: Endpoint, parser: FrameParser) -> list[Any]:
        out = parser.feed(bytes(peer.data))
        peer.data.clear()
        return out

    def test_unknown_session_refused(self) -> None:
        """A resume of a session id the broker does not hold is refused, counted and logged."""
        logs = LogCatcher(self)
        rig = Rig()
        peer, parser = self.raw_link(rig)
        peer.transport.write(MAGIC + encode(Kind.RESUME, RESUME.pack(b"n" * 16, b"c" * 16)))
        rig.settle()
        [refuse] = self.frames(peer, parser)
        self.assertEqual((refuse.kind, refuse.payload), (Kind.REFUSE, b"unknown or expired session"))
        self.assertIsNotNone(peer.lost)
        self.assertEqual(rig.sessions.resume_failures, 1)
        self.assertEqual(len(logs.find(event="resume.refused")), 1)

    def test_wrong_secret_refused_and_session_kept(self) -> None:
        """A proof made with another secret is refused; the real connector still resumes."""
        rig = Rig()
        client = rig.smartclient()
        rig.net.down = True
        rig.cut()
        rig.settle()
        stream = rig.stream()
        peer, parser = self.raw_link(rig)
        peer.transport.write(MAGIC + encode(Kind.RESUME, RESUME.pack(stream.key, b"c" * 16)))
        rig.settle()
        [challenge] = self.frames(peer, parser)
        self.assertEqual(challenge.kind, Kind.CHALLENGE)
        mac = crypto.proof(b"w" * 32, b"connector", stream.key, b"c" * 16, challenge.payload, 0)
        peer.transport.write(encode(Kind.PROOF, PROOF.pack(mac, 0)))
        rig.settle()
        [refuse] = self.frames(peer, parser)
        self.assertEqual(refuse.kind, Kind.REFUSE)
        self.assertIn(b"does not match", refuse.payload)
        self.assertEqual((rig.sessions.resume_failures, rig.sessions.count), (1, 1))
        rig.net.down = False
        rig.advance(0.5)
        client.transport.write(b"still here")
        rig.settle()
        self.assertEqual(bytes(client.data), b"still here")

    def test_recorded_proof_cannot_be_replayed(self) -> None:
        """A proof seen on the wire is bound to that attempt's nonces: replayed, it fails."""
        rig = Rig()
        rig.smartclient()
        rig.cut()
        rig.advance(0.2)
        wire = b"".join(rig.net.link_wire)
        start = wire.rindex(bytes([Kind.PROOF]) + PROOF.size.to_bytes(4, "big"))
        recorded = wire[start:start + 5 + PROOF.size]
        stream = rig.stream()
        peer, parser = self.raw_link(rig)
        peer.transport.write(MAGIC + encode(Kind.RESUME, RESUME.pack(stream.key, b"c" * 16)) + recorded)
        rig.settle()
        kinds = [f.kind for f in self.frames(peer, parser)]
        self.assertEqual(kinds, [Kind.CHALLENGE, Kind.REFUSE])

    def test_duplicate_resume_attempts(self) -> None:
        """Two links proving the same session: the later one wins, the earlier is dropped, the
        stream continues without loss or duplication, and a late proof of the loser fails."""
        rig = Rig(echo=False)
        client = rig.smartclient()
        client.transport.write(b"one.")
        rig.settle()
        rig.net.down = True  # the real connector stays out of it
        rig.cut()
        rig.settle()
        stream = rig.stream()
        links = []
        for nonce in (b"a" * 16, b"b" * 16):
            peer, parser = self.raw_link(rig)
            peer.transport.write(MAGIC + encode(Kind.RESUME, RESUME.pack(stream.key, nonce)))
            rig.settle()
            [challenge] = self.frames(peer, parser)
            links.append((peer, parser, nonce, challenge.payload))
        held = stream.out.base  # the real connector acknowledged the greeting
        for peer, parser, nonce, broker_nonce in links:
            mac = crypto.proof(stream.secret, b"connector", stream.key, nonce, broker_nonce, held)
            peer.transport.write(encode(Kind.PROOF, PROOF.pack(mac, held)))
            rig.settle()
        first, second = links
        self.assertIsNotNone(first[0].lost)
        self.assertIsNone(second[0].lost)
        self.assertIs(stream.link.transport.other, second[0].transport)
        self.assertEqual((rig.sessions.resumes, rig.sessions.drops), (2, 2))
        [app] = rig.app.accepted
        app.transport.write(b"two.")
        rig.settle()
        got = self.frames(second[0], second[1])
        self.assertEqual([f.kind for f in got][:2], [Kind.RESUMED, Kind.DATA])
        self.assertEqual(b"".join(f.payload for f in got if f.kind is Kind.DATA), b"two.")
        self.assertEqual(len(app.data), 4)  # "one." exactly once

    def test_garbage_after_the_magic_is_a_clear_protocol_error(self) -> None:
        """Bytes that are not frames are refused with a reason; the broker stays up."""
        logs = LogCatcher(self)
        rig = Rig()
        peer, parser = self.raw_link(rig)
        peer.transport.write(MAGIC + b"\xff\x00\x00\x00\x00")
        rig.settle()
        [refuse] = self.frames(peer, parser)
        self.assertIn(b"unknown frame kind 255", refuse.payload)
        self.assertEqual(len(logs.find(event="resume.protocol_error")), 1)


class KeepaliveTests(SynchronousTestCase):
    def test_silent_link_detected_and_resumed(self) -> None:
        """A link that goes silent (a black hole, no reset) is found dead within dead_after on
        both sides; the connector reconnects and nothing is lost."""
        rig = Rig(keepalive=1.0, echo=False)
        client = rig.smartclient()
        link = rig.link()
        link.silent = True
        client.transport.write(b"into the void")
        rig.advance(3.5)
        self.assertEqual(rig.sessions.drops, 0)
        rig.advance(2.0)  # 4 keepalives of silence, checked once a second
        self.assertEqual(rig.sessions.drops, 1)
        self.assertEqual(rig.connector.drops, 1)
        rig.advance(0.5)
        self.assertEqual(rig.sessions.resumes, 1)
        self.assertEqual(bytes(rig.app.accepted[0].data), b"into the void")

    def test_idle_link_kept_alive(self) -> None:
        """An idle but healthy link is not dropped: PINGs keep both sides hearing each other."""
        rig = Rig(keepalive=1.0)
        rig.smartclient()
        rig.advance(60.0, step=0.5)
        self.assertEqual((rig.sessions.drops, rig.connector.drops), (0, 0))


class SessionCapTests(SynchronousTestCase):
    def test_resume_allowed_at_max_sessions_new_sessions_refused(self) -> None:
        """At MAX_SESSIONS a session in standby still resumes (it is not a new session), while a
        new connector session is refused with a reason and a plain client is closed."""
        logs = LogCatcher(self)
        rig = Rig(echo=False)
        rig.broker.max_sessions = 1
        client = rig.smartclient()
        client.transport.write(b"first")
        rig.settle()
        rig.cut()
        rig.advance(0.5)
        self.assertEqual(rig.sessions.resumes, 1)
        second = rig.smartclient()
        rig.advance(0.5)
        self.assertIsNotNone(second.lost)
        self.assertEqual(len(logs.find(event="resume.refused")), 1)
        plain = Endpoint()
        rig.net.connect(plain, rig.broker.buildProtocol(None), rig.net.address(),
                        __import__("twisted.internet.address", fromlist=["x"]).IPv4Address(
                            "TCP", *BROKER))
        plain.transport.write(b"\x16\x03\x01")
        rig.settle()
        self.assertIsNotNone(plain.lost)
        self.assertEqual((rig.broker.refused_total, len(rig.app.accepted)), (2, 1))
        client.transport.write(b"-still")
        rig.settle()
        self.assertEqual(bytes(rig.app.accepted[0].data), b"first-still")


class ScreenTests(SynchronousTestCase):
    def test_standby_shown_on_the_broker_screen(self) -> None:
        """The broker screen's data (web.model) counts and lists a session in standby against its
        server, and counts the drop and then the resume."""
        from types import SimpleNamespace

        from protheus_broker.web import model

        rig = Rig()
        client = rig.smartclient()
        client.transport.write(b"hi")
        rig.settle()
        screen: Any = SimpleNamespace(pool=rig.broker.pool, factory=rig.broker, reactor=rig.reactor)
        self.assertEqual([s["standby"] for s in model.servers(screen)], [0])
        rig.net.down = True
        rig.cut()
        rig.advance(0.1)
        totals = model.counters(rig.broker)
        self.assertEqual((totals["standby"], totals["drops"], totals["resumes"]), (1, 1, 0))
        [server] = model.servers(screen)
        self.assertEqual(server["standby"], 1)
        [held] = rig.sessions.snapshot()
        self.assertEqual(held["server_id"], server["id"])
        rig.net.down = False
        rig.advance(3)
        totals = model.counters(rig.broker)
        self.assertEqual((totals["standby"], totals["drops"], totals["resumes"]), (0, 1, 1))
