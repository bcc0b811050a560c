"""WebSocket half-close through the HTTP proxy over real sockets on 127.0.0.1: after the 101 one
side shuts its write half, the other still sends what it has, it all arrives, both close cleanly."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from protheus_broker.balancing.methods import SortMethod, make_balancer
from protheus_broker.balancing.pool import ServerPool
from protheus_broker.balancing.servers import RemoteServer
from protheus_broker.http.affinity import AffinityCookies
from protheus_broker.http.proxy import HttpProxyFactory, ProxySettings
from protheus_broker.http.unit import PoolDispatcher
from protheus_broker.http.upstream import UpstreamPool, tcp_connector

from .http_backend import connect
from .test_http_sockets import as_deferred, timeout

UPGRADE = (b"GET /ws HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
           b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n")
SWITCHED = (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
CLIENT_BYTES = bytes(range(256)) * 1024  # 256 KiB each way: more than one read
SERVER_BYTES = bytes(reversed(range(256))) * 1024


@implementer(IHalfCloseableProtocol)
class Side(Protocol):
    """One end after the upgrade: keeps what arrives; *first* says whether it shuts its write half
    first (then sends nothing more) or answers the other's EOF with its remaining bytes and closes."""

    transport: Any

    def __init__(self, payload: bytes, first: bool, head: bytes | None = None) -> None:
        self.payload = payload
        self.first = first
        self.head = head  # the client's request (None: the AppServer end)
        self.raw = b""
        self.upgraded = False
        self.got_eof = False
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        if self.head is not None:
            self.transport.write(self.head)

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        if self.upgraded or b"\r\n\r\n" not in self.raw:
            return
        head, _, self.raw = self.raw.partition(b"\r\n\r\n")
        self.upgraded = True
        if self.head is None:  # the AppServer: switch
            self.transport.write(SWITCHED)
        if self.first:
            self.transport.write(self.payload)
            self.transport.loseWriteConnection()

    def readConnectionLost(self) -> None:
        self.got_eof = True
        if not self.first:
            self.transport.write(self.payload)
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.reason = reason
        self.lost.callback(None)


class HalfCloseTests(TestCase):
    """After the 101 either side may half-close; the other's remaining bytes still arrive."""

    async def relay(self, client_first: bool) -> None:
        backends: list[Side] = []

        def build(addr: Any) -> Side:
            side = Side(SERVER_BYTES, first=not client_first)
            backends.append(side)
            return side
        backend_factory = Factory.forProtocol(Protocol)
        backend_factory.buildProtocol = build  # type: ignore[method-assign]
        listening = reactor.listenTCP(0, backend_factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(listening.stopListening)
        pool = ServerPool([RemoteServer("A", "127.0.0.1", listening.getHost().port)],
                          make_balancer(SortMethod.CONNECTION), clock=reactor)
        upstreams = UpstreamPool(reactor, tcp_connector(reactor, 2.0))
        self.addCleanup(upstreams.close_all)
        factory = HttpProxyFactory(reactor, PoolDispatcher(reactor, pool, AffinityCookies()), upstreams,
                                   ProxySettings())
        proxies: list[Any] = []
        built = factory.buildProtocol

        def keep(addr: Any) -> Any:
            protocol = built(addr)
            proxies.append(protocol)
            return protocol
        factory.buildProtocol = keep  # type: ignore[method-assign]
        front = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(front.stopListening)
        client = Side(CLIENT_BYTES, first=client_first, head=UPGRADE)
        await connect(front.getHost().port, client)
        await timeout(client.lost)
        self.assertEqual(len(backends), 1)
        await timeout(backends[0].lost)
        client_reason, backend_reason = client.reason, backends[0].reason
        assert client_reason is not None and backend_reason is not None
        self.assertTrue(client.upgraded and backends[0].upgraded)
        self.assertEqual(len(backends[0].raw), len(CLIENT_BYTES))
        self.assertEqual(backends[0].raw, CLIENT_BYTES)
        self.assertEqual(len(client.raw), len(SERVER_BYTES))
        self.assertEqual(client.raw, SERVER_BYTES)
        self.assertTrue(client.got_eof and backends[0].got_eof)
        self.assertTrue(client_reason.check(ConnectionDone), client_reason)
        self.assertTrue(backend_reason.check(ConnectionDone), backend_reason)
        for _ in range(200):  # the proxy's two legs close too
            if all(p.closed for p in proxies):
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        self.assertTrue(proxies and all(p.closed for p in proxies))

    @as_deferred
    async def test_client_half_closes_first(self) -> None:
        """The browser shuts its write half after sending; the AppServer's remaining bytes still
        arrive, then both ends see a clean close."""
        await self.relay(client_first=True)

    @as_deferred
    async def test_appserver_half_closes_first(self) -> None:
        """The AppServer shuts its write half after sending; the browser's remaining bytes still
        reach it, then both ends see a clean close."""
        await self.relay(client_first=False)
