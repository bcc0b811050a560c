"""An in-memory network for the resumable-session tests: TCP-like connections that the test moves
byte by byte, pauses, half-closes, cuts at any point or silences, under a MemoryReactorClock.

Not a test module: ``test_resume_session`` builds on it.
"""

from __future__ import annotations

import hashlib
from io import BytesIO
from typing import Any, Callable

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.error import UserError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

#: Bytes queued on an end above which its streaming producer is paused (half of it: resumed).
HIGH_WATER = 64 * 1024


class End(StringTransport):
    """One end of an in-memory TCP connection.  Written bytes wait until :class:`Net` moves them;
    an end whose reading is paused gets nothing; producers are paused above :data:`HIGH_WATER`."""

    def __init__(self, host: IPv4Address, peer: IPv4Address) -> None:
        super().__init__(host, peer, lenient=True)
        self.protocol: Any = None  # re-pointable, as on tcp.Connection (FirstBytes uses it)
        self.other: End | None = None
        self.write_shut = False
        self.eof_passed = False
        self.aborted = False
        self.lost = False
        self.producer_paused = False

    def write(self, data: bytes) -> None:
        if self.lost or self.disconnecting or self.write_shut:
            return
        super().write(data)
        self.water()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseWriteConnection(self) -> None:
        self.write_shut = True

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True

    def queued(self) -> int:
        return self.io.tell()

    def take(self, limit: int | None) -> bytes:
        data = self.io.getvalue()
        chunk = data if limit is None else data[:limit]
        self.io = BytesIO()
        self.io.write(data[len(chunk):])
        return chunk

    def water(self) -> None:
        producer = self.producer
        if producer is None or not self.streaming:
            return
        size = self.queued()
        if size > HIGH_WATER and not self.producer_paused:
            self.producer_paused = True
            producer.pauseProducing()
        elif size <= HIGH_WATER // 2 and self.producer_paused:
            self.producer_paused = False
            producer.resumeProducing()


class Connection:
    """Two ends; *link* marks connector-broker connections (cut and counted by the tests)."""

    def __init__(self, client: End, server: End, link: bool) -> None:
        self.client = client
        self.server = server
        self.link = link
        self.silent = False  # a black hole: nothing moves, nobody is told
        self.closed = False


class Net:
    """Listeners by (host, port), connections, and the pump that moves bytes between them."""

    def __init__(self, reactor: MemoryReactorClock) -> None:
        self.reactor = reactor
        self.listeners: dict[tuple[str, int], Factory] = {}
        self.connections: list[Connection] = []
        self.link_hosts: set[tuple[str, int]] = set()
        self.down = False  # the connector-broker network: attempts are refused
        self.ports = iter(range(40000, 60000))
        self.read_size = 64 * 1024  # bytes per move (one socket read)
        self.link_chunk: int | None = None  # bytes per move on links (1: every boundary)
        self.link_bytes = 0  # bytes moved over links so far
        self.on_link_bytes: Callable[[], None] | None = None
        self.link_wire: list[bytes] = []  # every byte moved over links, for secrecy checks

    def listen(self, host: str, port: int, factory: Factory, link: bool = False) -> None:
        self.listeners[(host, port)] = factory
        if link:
            self.link_hosts.add((host, port))

    def address(self, host: str = "10.0.0.5") -> IPv4Address:
        return IPv4Address("TCP", host, next(self.ports))

    def connect(self, client: Protocol, server: Protocol, client_address: IPv4Address,
                server_address: IPv4Address, link: bool = False) -> Connection:
        """Join two protocols; the server side is made first, as on accept."""
        c_end, s_end = End(client_address, server_address), End(server_address, client_address)
        c_end.other, s_end.other = s_end, c_end
        c_end.protocol, s_end.protocol = client, server
        connection = Connection(c_end, s_end, link)
        self.connections.append(connection)
        server.makeConnection(s_end)
        client.makeConnection(c_end)
        return connection

    def complete(self) -> bool:
        """Answer the reactor's pending connectTCP calls."""
        moved = False
        while self.reactor.tcpClients:
            host, port, factory, _timeout, _bind = self.reactor.tcpClients.pop(0)
            connector = self.reactor.connectors.pop(0)
            moved = True
            if connector.stoppedConnecting:
                factory.clientConnectionFailed(connector, Failure(UserError()))
                continue
            listener = self.listeners.get((host, port))
            link = (host, port) in self.link_hosts
            if listener is None or (link and self.down):
                factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
                continue
            client_address = self.address()
            server_address = IPv4Address("TCP", host, port)
            server = listener.buildProtocol(client_address)
            client = factory.buildProtocol(server_address)
            if server is None:
                factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
                continue
            self.connect(client, server, client_address, server_address, link=link)
        return moved

    def pump_once(self) -> bool:
        moved = False
        for connection in list(self.connections):
            if connection.closed:
                continue
            if connection.silent:  # an end that gives up learns it at once; the other does not
                moved |= self.close_silent(connection)
                continue
            for a, b in ((connection.client, connection.server), (connection.server, connection.client)):
                if connection.closed:
                    break
                if a.aborted:
                    self.close(connection, aborted_by=a)
                    moved = True
                    break
                if a.queued() and b.producerState != "paused":
                    chunk = a.take(self.link_chunk if connection.link and self.link_chunk
                                   else self.read_size)
                    if connection.link:
                        self.link_bytes += len(chunk)
                        self.link_wire.append(chunk)
                    b.protocol.dataReceived(chunk)
                    a.water()
                    moved = True
                    if connection.link and self.on_link_bytes is not None:
                        self.on_link_bytes()
                    continue
                if a.queued():
                    continue
                if a.write_shut and not a.eof_passed:
                    a.eof_passed = True
                    moved = True
                    reader = IHalfCloseableProtocol(b.protocol, None)
                    if reader is None:
                        self.close(connection)
                        break
                    reader.readConnectionLost()
                    writer = IHalfCloseableProtocol(a.protocol, None)
                    if writer is not None:
                        writer.writeConnectionLost()
                elif a.disconnecting:
                    self.close(connection)
                    moved = True
                    break
        return moved

    def close(self, connection: Connection, aborted_by: End | None = None,
              reason: Failure | None = None) -> None:
        """Both ends learn the connection is gone (queued bytes are lost)."""
        if connection.closed:
            return
        connection.closed = True
        self.connections.remove(connection)
        for end in (connection.client, connection.server):
            end.lost = True
            end.connected = False
        for end in (connection.client, connection.server):
            why = reason or (Failure(ConnectionLost("reset")) if aborted_by is not None
                             else Failure(ConnectionDone()))
            end.protocol.connectionLost(why)

    def close_silent(self, connection: Connection) -> bool:
        moved = False
        for end in (connection.client, connection.server):
            if (end.aborted or end.disconnecting) and not end.lost:
                end.lost = True
                end.connected = False
                end.protocol.connectionLost(Failure(ConnectionLost("aborted")))
                moved = True
        if connection.client.lost and connection.server.lost:
            connection.closed = True
            self.connections.remove(connection)
        return moved

    def cut(self, connection: Connection) -> None:
        """The network fails under a link: both ends see it reset, in-flight bytes are lost."""
        self.close(connection, reason=Failure(ConnectionLost("cut by the test")))

    def links(self) -> list[Connection]:
        return [c for c in self.connections if c.link]

    def settle(self, limit: int = 1_000_000) -> None:
        """Connect, move and close until nothing changes (the clock does not move)."""
        for _ in range(limit):
            self.reactor.advance(0)
            if not (self.complete() | self.pump_once()):
                if not [c for c in self.reactor.getDelayedCalls() if c.getTime() <= self.reactor.seconds()]:
                    return
        raise AssertionError("the network did not settle")


@implementer(IHalfCloseableProtocol)
class Endpoint(Protocol):
    """A SmartClient or an AppServer for the tests: sends what it is told, keeps all it gets."""

    transport: Any

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.data = bytearray()
        self.digest = hashlib.sha256()
        self.got_eof = False
        self.lost: Failure | None = None
        self.made = False

    def connectionMade(self) -> None:
        self.made = True
        if self.echo:
            self.transport.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.digest.update(data)
        if self.echo:
            self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.got_eof = True
        if self.echo:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.lost = reason


class EndpointFactory(Factory):
    """AppServer side: every accepted connection is an :class:`Endpoint`, kept in order."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.accepted: list[Endpoint] = []

    def buildProtocol(self, addr: Any) -> Endpoint:
        endpoint = Endpoint(self.echo)
        self.accepted.append(endpoint)
        return endpoint
