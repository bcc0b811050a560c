"""The first-bytes dispatch over real sockets on 127.0.0.1 (port 0), all in this process, bounded in time."""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import ClientCreator, Factory
from twisted.trial.unittest import TestCase

from protheus_broker.balancing.methods import ConnectionBalancer
from protheus_broker.balancing.pool import ServerPool
from protheus_broker.desktop.proxy import BrokerFactory
from protheus_broker.sim.appserver import AppServerSimFactory, greeting

from .helpers import servers
from .test_first_bytes import Magic, Recorder
from .test_proxy_sockets import MB, Peer, expected_digest


class FirstBytesSocketTests(TestCase):
    timeout = 60

    def listen(self, factory: Factory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def test_plain_bytes_exact_through_the_dispatcher(self) -> Any:
        """8 MB each way through a broker with a recogniser: byte-exact, half-close passed on."""
        size = 8 * MB
        got: list[Peer] = []

        def make_server() -> Peer:
            peer = Peer(send_seed=12, send_size=size)
            got.append(peer)
            return peer

        backend = Factory()
        backend.protocol = make_server
        pool = ServerPool(servers(self.listen(backend)), ConnectionBalancer())
        magic = Magic(b"PBRK1")
        port = self.listen(BrokerFactory(reactor, pool, recognisers=[magic]))
        client = Peer(send_seed=11, send_size=size)
        yield ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port)
        yield client.done
        yield got[0].done
        self.assertEqual(client.digest.hexdigest(), expected_digest(12, size))
        self.assertEqual(got[0].digest.hexdigest(), expected_digest(11, size))
        self.assertEqual(magic.taken, [])

    @defer.inlineCallbacks
    def test_silent_client_gets_the_server_greeting(self) -> Any:
        """A client that waits for the AppServer to speak gets its greeting after the wait."""
        pool = ServerPool(servers(self.listen(AppServerSimFactory("quiet"))), ConnectionBalancer())
        broker = BrokerFactory(reactor, pool, recognisers=[Magic(b"PBRK1")], first_bytes_wait=0.1)
        port = self.listen(broker)
        client = Peer(half_close=False)
        yield ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port)
        started = reactor.seconds()
        while client.received < len(greeting("quiet", 1)):
            yield task.deferLater(reactor, 0.01, lambda: None)
            self.assertLess(reactor.seconds() - started, 5)
        self.assertGreaterEqual(reactor.seconds() - started, 0.09)
        client.transport.loseConnection()
        yield client.done
        while broker.sessions:  # the broker closes its AppServer side too
            yield task.deferLater(reactor, 0.01, lambda: None)

    @defer.inlineCallbacks
    def test_recognised_protocol_owns_the_real_transport(self) -> Any:
        """A claimed connection is served by the recogniser's protocol over the real socket."""

        class Echo(Recorder):
            def dataReceived(self, data: bytes) -> None:
                self.transport.write(hashlib.sha256(data).hexdigest().encode()[:8])

        class EchoMagic(Magic):
            def take_over(self, broker: BrokerFactory, prefix: bytes) -> Recorder:
                return Echo()

        pool = ServerPool(servers(1), ConnectionBalancer())
        port = self.listen(BrokerFactory(reactor, pool, recognisers=[EchoMagic(b"PBRK1")]))
        client = Peer(half_close=False)
        yield ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port)
        client.transport.write(b"PBRK1")
        while client.received < 8:
            yield task.deferLater(reactor, 0.01, lambda: None)
        client.transport.loseConnection()
        yield client.done
        self.assertEqual(client.received, 8)
        self.assertEqual(pool.get("01").connect_failures, 0)  # no AppServer was tried


    @defer.inlineCallbacks
    def test_slowloris_from_one_address_leaves_logins_to_others(self) -> Any:
        """Undecided connections held open past MAX_PENDING_PER_ADDRESS are closed at once
        without a byte; the count is in the refusal log."""
        pool = ServerPool(servers(self.listen(AppServerSimFactory("sim"))), ConnectionBalancer())
        broker = BrokerFactory(reactor, pool, recognisers=[Magic(b"GET /status")],
                               first_bytes_wait=5, max_pending_per_address=3)
        port = self.listen(broker)
        held = []
        for _ in range(3):
            peer = Peer(half_close=False)
            yield ClientCreator(reactor, lambda: peer).connectTCP("127.0.0.1", port)
            peer.transport.write(b"GET /sta")  # undecided
            held.append(peer)
        while broker.pending.count < 3:
            yield task.deferLater(reactor, 0.01, lambda: None)
        refused = Peer(half_close=False)
        yield ClientCreator(reactor, lambda: refused).connectTCP("127.0.0.1", port)
        yield refused.done
        self.assertEqual((refused.received, broker.refused_pending_total), (0, 1))
        for peer in held:
            peer.transport.loseConnection()
            yield peer.done
        while broker.pending.count:
            yield task.deferLater(reactor, 0.01, lambda: None)
