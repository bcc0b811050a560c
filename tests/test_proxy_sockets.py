"""The proxy over real sockets on 127.0.0.1 (port 0), all in this process, bounded in time."""

from __future__ import annotations

import hashlib
import random
import socket
import fcntl
import struct
import termios
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientCreator, Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from protheus_broker.balancing.methods import ConnectionBalancer
from protheus_broker.balancing.pool import ServerPool
from protheus_broker.desktop.proxy import BrokerFactory
from protheus_broker.sockets import READ_SIZE
from protheus_broker.sim.appserver import AppServerSimFactory, greeting

from .helpers import LogCatcher, servers

MB = 1024 * 1024


def stream(seed: int, size: int, chunk: int = 64 * 1024) -> Any:
    """A reproducible random byte stream, in chunks."""
    rng = random.Random(seed)
    left = size
    while left:
        n = min(chunk, left)
        yield rng.randbytes(n)
        left -= n


@implementer(IHalfCloseableProtocol)
class Peer(Protocol):
    """A test peer: sends a random stream (then half-closes), hashes all it receives."""

    def __init__(self, send_seed: int | None = None, send_size: int = 0, half_close: bool = True,
                 wait_for_eof: bool = False) -> None:
        self.received = 0
        self.sent = 0  # bytes handed to the transport (a pull producer: the kernel took all but one chunk)
        self.digest = hashlib.sha256()
        self.done: defer.Deferred[Peer] = defer.Deferred()
        self.eof = defer.Deferred()
        self._chunks = stream(send_seed, send_size) if send_seed is not None else iter(())
        self.half_close = half_close
        self.wait_for_eof = wait_for_eof
        self.got_eof = False

    def connectionMade(self) -> None:
        if not self.wait_for_eof:
            self._start_sending()

    def _start_sending(self) -> None:
        self.transport.registerProducer(self, False)  # pull: resumeProducing when drained

    def resumeProducing(self) -> None:
        chunk = next(self._chunks, None)
        if chunk is None:
            self.transport.unregisterProducer()
            if self.half_close:
                self.transport.loseWriteConnection()
            return
        self.sent += len(chunk)
        self.transport.write(chunk)

    def stopProducing(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.digest.update(data)

    def readConnectionLost(self) -> None:
        self.got_eof = True
        self.eof.callback(self)
        if self.wait_for_eof:
            self._start_sending()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if self.got_eof:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        if not self.done.called:
            self.done.callback(self)


def expected_digest(seed: int, size: int) -> str:
    digest = hashlib.sha256()
    for chunk in stream(seed, size):
        digest.update(chunk)
    return digest.hexdigest()


class SocketCase(TestCase):
    """A broker over real sockets on 127.0.0.1 and its helpers."""

    timeout = 60

    def backend_factory(self, make: Any) -> Factory:
        factory = Factory()
        factory.protocol = make
        return factory

    def listen(self, factory: Factory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def broker(self, backend_ports: list[int], **options: Any) -> tuple[BrokerFactory, int]:
        pool = ServerPool(servers(*backend_ports), ConnectionBalancer())
        factory = BrokerFactory(reactor, pool, sort_method="CONNECTION", **options)
        return factory, self.listen(factory)

    def connect(self, port: int, protocol: Protocol) -> defer.Deferred:
        return ClientCreator(reactor, lambda: protocol).connectTCP("127.0.0.1", port)

    async def _read_greeting(self, port: int) -> Peer:
        peer = Peer()
        await self.connect(port, peer)
        peer.transport.loseWriteConnection()
        await peer.done
        return peer


class RealSocketTests(SocketCase):
    @defer.inlineCallbacks
    def test_random_data_both_ways_byte_exact(self) -> Any:
        """32 MB of random data each way arrives byte-exact; the client half-closes first."""
        size = 32 * MB
        server_peers: list[Peer] = []

        def make_server() -> Peer:
            peer = Peer(send_seed=2, send_size=size, half_close=True)
            server_peers.append(peer)
            return peer

        backend_port = self.listen(self.backend_factory(make_server))
        factory, port = self.broker([backend_port])
        logs = LogCatcher(self)
        client = Peer(send_seed=1, send_size=size)
        yield self.connect(port, client)
        yield client.done
        yield server_peers[0].done
        self.assertEqual(client.received, size)
        self.assertEqual(client.digest.hexdigest(), expected_digest(2, size))
        self.assertEqual(server_peers[0].received, size)
        self.assertEqual(server_peers[0].digest.hexdigest(), expected_digest(1, size))
        yield task.deferLater(reactor, 0.05, lambda: None)
        [event] = logs.ended()
        self.assertEqual((event["bytes_in"], event["bytes_out"]), (size, size))
        self.assertEqual(factory.sessions, {})
        self.assertEqual(factory.pool.get("01").active, 0)

    @defer.inlineCallbacks
    def test_half_close_from_server_first(self) -> Any:
        """The server sends and half-closes; the client, after EOF, still sends 4 MB that arrive."""
        size = 4 * MB
        got: list[Peer] = []

        def make_server() -> Peer:
            peer = Peer(send_seed=7, send_size=size)  # sends then half-closes
            got.append(peer)
            return peer

        backend_port = self.listen(self.backend_factory(make_server))
        _, port = self.broker([backend_port])
        client = Peer(send_seed=8, send_size=size, wait_for_eof=True)
        yield self.connect(port, client)
        yield client.done
        yield got[0].done
        self.assertEqual(client.digest.hexdigest(), expected_digest(7, size))
        self.assertEqual(got[0].digest.hexdigest(), expected_digest(8, size))

    @defer.inlineCallbacks
    def test_failover_on_refused_and_timed_out_servers(self) -> Any:
        """A refused server and one that never answers are skipped: the client lands on the third."""
        refused = socket.socket()
        refused.bind(("127.0.0.1", 0))  # bound, not listening: refused
        self.addCleanup(refused.close)
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)
        self.addCleanup(silent.close)
        fillers = []
        for _ in range(3):  # fill the accept queue: further SYNs are dropped, connect hangs
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(silent.getsockname())
            fillers.append(filler)
            self.addCleanup(filler.close)
        good = self.listen(AppServerSimFactory("good"))
        logs = LogCatcher(self)
        factory, port = self.broker(
            [refused.getsockname()[1], silent.getsockname()[1], good], connect_timeout=0.5)
        client = yield defer.ensureDeferred(self._read_greeting(port))
        self.assertEqual(client.received, len(greeting("good", 1)))
        failures = [b.connect_failures for b in factory.pool]
        self.assertEqual(failures, [1, 1, 0])
        reasons = " ".join(logs.texts())
        self.assertIn("Connection was refused", reasons)
        self.assertIn("timeout", reasons.lower())

    @defer.inlineCallbacks
    def test_no_server_up_closes_client(self) -> Any:
        """With no server reachable the client is closed without data."""
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        self.addCleanup(dead.close)
        _, port = self.broker([dead.getsockname()[1]])
        client = yield defer.ensureDeferred(self._read_greeting(port))
        self.assertEqual(client.received, 0)

    @defer.inlineCallbacks
    def test_session_cap(self) -> Any:
        """With MAX_SESSIONS=1 a second client is closed at once; after the first leaves, served."""
        backend = self.listen(AppServerSimFactory("only"))
        _, port = self.broker([backend], max_sessions=1)
        first = Peer()
        yield self.connect(port, first)
        second = yield defer.ensureDeferred(self._read_greeting(port))
        self.assertEqual(second.received, 0)
        first.transport.loseConnection()
        yield first.done
        yield task.deferLater(reactor, 0.05, lambda: None)
        third = yield defer.ensureDeferred(self._read_greeting(port))
        self.assertEqual(third.received, len(greeting("only", 2)))

    @defer.inlineCallbacks
    def test_backpressure_keeps_broker_buffers_bounded(self) -> Any:
        """200 MB toward a reader that stalls: the broker stops reading the client (the client's
        sends stall, its bytes wait in the kernel), never holds more than ~2 reads itself; all
        200 MB then arrive in order once the reader resumes."""
        size = 200 * MB
        readers: list[Peer] = []

        def make_reader() -> Peer:
            peer = Peer()
            readers.append(peer)
            return peer

        backend_port = self.listen(self.backend_factory(make_reader))
        factory, port = self.broker([backend_port])
        client = Peer(send_seed=3, send_size=size)
        yield self.connect(port, client)
        while not readers:
            yield task.deferLater(reactor, 0.01, lambda: None)
        reader = readers[0]
        reader.transport.pauseProducing()  # the AppServer stops reading
        self.addCleanup(lambda: reader.transport.abortConnection() if reader.transport.connected else None)

        peak = 0

        def buffered() -> int:
            total = 0
            for session in factory.sessions.values():
                for side in (session.client, session.server):
                    if side is not None:
                        t = side.transport
                        total += len(t.dataBuffer) - t.offset + t._tempDataLen
            return total

        def sample() -> None:
            nonlocal peak
            peak = max(peak, buffered())

        sampler = task.LoopingCall(sample)
        sampler.start(0.005)
        self.addCleanup(lambda: sampler.stop() if sampler.running else None)
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        yield task.deferLater(reactor, 1.0, lambda: None)  # the reader has stalled for a second
        # The client is held back far from the end, and sends no byte more in a further 0.3 s.
        sent = client.sent
        self.assertLess(sent, size // 2, f"the client sent {sent} of {size} bytes: nothing held it back")
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(client.sent, sent, "the client's sends went on")
        # Because the broker stopped reading it: the broker's end of the client's connection is not
        # among the reactor's readers, and the client's bytes wait in the kernel, unread at the
        # broker and unsent at the client.
        [session] = factory.sessions.values()
        from_client = session.client.transport
        self.assertNotIn(from_client, reactor.getReaders())
        unread = socket_queue(from_client.socket, termios.FIONREAD)
        unsent = socket_queue(client.transport.socket, termios.TIOCOUTQ)
        self.assertGreater(unread, 0)
        self.assertGreater(unsent, 0)
        print(f"\nbackpressure: client sent {sent / MB:.1f} MB, reader got {reader.received / MB:.1f} MB; "
              f"kernel: {unsent / MB:.1f} MB unsent at the client, {unread / MB:.1f} MB unread at "
              f"the broker; broker buffers peak {peak / 1024:.0f} KiB")
        self.assertLessEqual(peak, 2 * READ_SIZE + 64 * 1024, f"broker buffered {peak} bytes")
        reader.transport.resumeProducing()
        yield reader.eof
        sampler.stop()
        self.assertEqual(reader.received, size)
        self.assertEqual(reader.digest.hexdigest(), expected_digest(3, size))
        self.assertLessEqual(peak, 2 * READ_SIZE + 64 * 1024, f"broker buffered {peak} bytes")
        reader.transport.loseConnection()
        yield client.done


def socket_queue(sock: socket.socket, request: int) -> int:
    """Bytes in a socket's kernel queue: ``termios.FIONREAD`` received and not yet read,
    ``termios.TIOCOUTQ`` (SIOCOUTQ) written and not yet acknowledged by the peer."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0])


def hung_server(test: TestCase) -> int:
    """A port whose kernel completes handshakes but whose process never reads or answers (as a
    stopped AppServer): listening, never accepting."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    test.addCleanup(hung.close)
    return int(hung.getsockname()[1])


class ReplaySocketTests(SocketCase):
    """FIRST_RESPONSE_TIMEOUT over real sockets: the data path stays byte-exact."""

    @defer.inlineCallbacks
    def test_random_data_both_ways_byte_exact_with_replay_on(self) -> Any:
        """With the copy kept until the first answer, 32 MB each way still arrive byte-exact and
        nothing is kept afterwards."""
        size = 32 * MB
        server_peers: list[Peer] = []

        def make_server() -> Peer:
            peer = Peer(send_seed=2, send_size=size, half_close=True)
            server_peers.append(peer)
            return peer

        factory, port = self.broker([self.listen(self.backend_factory(make_server))],
                                    first_response_timeout=5.0)
        client = Peer(send_seed=1, send_size=size)
        yield self.connect(port, client)
        while not factory.sessions:
            yield task.deferLater(reactor, 0.01, lambda: None)
        [session] = factory.sessions.values()
        yield client.done
        yield server_peers[0].done
        self.assertEqual(client.digest.hexdigest(), expected_digest(2, size))
        self.assertEqual(server_peers[0].digest.hexdigest(), expected_digest(1, size))
        self.assertIsNone(session.kept)
        self.assertEqual(factory.pending.count, 0)

    @defer.inlineCallbacks
    def test_hung_server_login_replayed_byte_exact(self) -> Any:
        """A 60 KB login sent at once to a hung AppServer (within the copy's limit) is replayed on
        the next one and echoed back byte-exact after its greeting."""
        size = 60 * 1024
        logs = LogCatcher(self)
        factory, port = self.broker([hung_server(self), self.listen(AppServerSimFactory("good"))],
                                    first_response_timeout=0.5)
        client = Peer(send_seed=21, send_size=size, half_close=False)
        yield self.connect(port, client)
        head = len(greeting("good", 1))
        while client.received < head + size:
            yield task.deferLater(reactor, 0.01, lambda: None)
        client.transport.loseConnection()
        yield client.done
        while factory.sessions:
            yield task.deferLater(reactor, 0.01, lambda: None)
        echoed = hashlib.sha256()
        echoed.update(greeting("good", 1))
        for chunk in stream(21, size):
            echoed.update(chunk)
        self.assertEqual(client.digest.hexdigest(), echoed.hexdigest())
        self.assertTrue(any("no answer within 0.5s; replaying" in t for t in logs.texts()))
        self.assertEqual(factory.pool.get("01").reason, "no answer within 0.5s")

    @defer.inlineCallbacks
    def test_passthrough_tls_replayed_on_the_next_server(self) -> Any:
        """A TLS ClientHello sent to a hung AppServer is replayed on a TLS AppServer: the client's
        handshake completes and it gets the greeting, never noticing."""
        from protheus_broker.sim.tap import tls_factory

        from .tls_fixtures import certs

        c = certs()
        good = self.listen(tls_factory(AppServerSimFactory("tls"), c.cert("appserver"), c.key("appserver")))
        factory, port = self.broker([hung_server(self), good], first_response_timeout=0.5)
        client = Peer(half_close=False)
        yield ClientCreator(reactor, lambda: client).connectSSL("127.0.0.1", port, c.client_options())
        while client.received < len(greeting("tls", 1)):
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(client.transport.getPeerCertificate().get_subject().CN, "appserver")
        client.transport.loseConnection()
        yield client.done
        while factory.sessions:
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(factory.pool.get("01").connect_failures, 1)

    @defer.inlineCallbacks
    def test_handshakes_count_as_pending_under_termination(self) -> Any:
        """With TLS termination a connection in its handshake counts: past
        MAX_PENDING_PER_ADDRESS the next is closed at once; once it is gone, clients are served."""
        from protheus_broker.desktop.tls import SessionTLS
        from protheus_broker.tls.settings import SessionTLSConfig, TLSIdentity

        from .tls_fixtures import certs

        c = certs()
        pool = ServerPool(servers(self.listen(AppServerSimFactory("sim"))), ConnectionBalancer())
        factory = BrokerFactory(reactor, pool, max_pending_per_address=1)
        tls = SessionTLS(reactor, SessionTLSConfig(server=TLSIdentity(c.cert("broker"), c.key("broker"))),
                         factory)
        port = self.listen(tls.listening_factory())
        staller = Peer(half_close=False)  # connects and never starts its handshake
        yield self.connect(port, staller)
        while factory.pending.count < 1:
            yield task.deferLater(reactor, 0.01, lambda: None)
        refused = Peer(half_close=False)
        yield self.connect(port, refused)
        yield refused.done
        self.assertEqual((refused.received, factory.refused_pending_total), (0, 1))
        staller.transport.loseConnection()
        yield staller.done
        while factory.pending.count:
            yield task.deferLater(reactor, 0.01, lambda: None)
        client = Peer(half_close=False)
        yield ClientCreator(reactor, lambda: client).connectSSL("127.0.0.1", port, c.client_options())
        while client.received < len(greeting("sim", 1)):
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(factory.pending.count, 0)  # answered: established
        client.transport.loseConnection()
        yield client.done
        while factory.sessions:
            yield task.deferLater(reactor, 0.01, lambda: None)


class EagerSendTests(TestCase):
    def test_real_tcp_transport_is_eager(self) -> Any:
        """A real TCP transport of this Twisted has what send_now needs (else it would fall back)."""
        from protheus_broker.sockets import tune

        server_side: list[Any] = []

        class Grab(Protocol):
            def connectionMade(self) -> None:
                server_side.append(self.transport)

        port = reactor.listenTCP(0, Factory.forProtocol(Grab), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = ClientCreator(reactor, Protocol)
        d = client.connectTCP("127.0.0.1", port.getHost().port)

        def check(proto: Protocol) -> Any:
            self.assertTrue(tune(proto.transport))
            self.assertEqual(proto.transport.bufferSize, 256 * 1024)
            proto.transport.loseConnection()
            return task.deferLater(reactor, 0.05, lambda: [t.loseConnection() for t in server_side])

        return d.addCallback(check)
