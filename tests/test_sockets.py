"""The eager-send adapter (protheus_broker.sockets) on a real ``tcp.Connection`` over a fake socket
in memory: partial sends, ordering, the error fallback, transports it must leave alone."""

from __future__ import annotations

import socket
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import tcp
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.sockets import READ_SIZE, send_now, tune


class FakeSocket:
    """A non-blocking socket in memory: ``send`` takes at most *room* bytes (none: BlockingIOError)
    or raises *error*; what it took is in ``wire``."""

    def __init__(self, room: int = 1 << 30) -> None:
        self.room = room
        self.error: OSError | None = None
        self.wire = bytearray()
        self.sends = 0
        self.options: dict[tuple[int, int], int] = {}

    def setblocking(self, flag: bool) -> None:
        pass

    def fileno(self) -> int:
        return -1

    def setsockopt(self, level: int, name: int, value: int) -> None:
        self.options[(level, name)] = value

    def getsockopt(self, level: int, name: int) -> int:
        return self.options.get((level, name), 0)

    def shutdown(self, how: int) -> None:
        pass

    def send(self, data: Any) -> int:
        self.sends += 1
        if self.error is not None:
            raise self.error
        if not self.room:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        taken = bytes(data[:self.room])
        self.room -= len(taken)
        self.wire += taken
        return len(taken)


class FakeConnection(tcp.Connection):
    """Twisted's own TCP transport, connected, over a :class:`FakeSocket`."""

    _tlsClientDefault = True  # startTLS() as a client, like tcp.Client

    def __init__(self, skt: FakeSocket) -> None:
        super().__init__(skt, Protocol(), MemoryReactor())  # type: ignore[arg-type]
        self.protocol.makeConnection(self)
        self.connected = 1
        self.fake = skt

    def queued(self) -> int:
        """Bytes the transport holds, not yet given to the socket."""
        return len(self.dataBuffer) - self.offset + self._tempDataLen

    def flush(self, room: int) -> Any:
        """The reactor finds the socket writable with *room* bytes free."""
        self.fake.room = room
        return self.doWrite()


def connection(room: int = 1 << 30) -> FakeConnection:
    conn = FakeConnection(FakeSocket(room))
    assert tune(conn)
    return conn


class TuneTests(SynchronousTestCase):
    def test_tcp_connection_is_eager_with_nodelay_and_read_size(self) -> None:
        """A plain TCP transport gets TCP_NODELAY and the 256 KiB read size and allows eager sends."""
        conn = FakeConnection(FakeSocket())
        self.assertTrue(tune(conn))
        self.assertEqual(conn.fake.options[(socket.IPPROTO_TCP, socket.TCP_NODELAY)], True)
        self.assertEqual(conn.bufferSize, READ_SIZE)

    def test_string_transport_is_not_eager(self) -> None:
        """A transport that is not a TCP connection (StringTransport) is written to plainly."""
        self.assertFalse(tune(StringTransport()))

    def test_twisted_without_the_internals_is_not_eager(self) -> None:
        """A TCP transport lacking any internal that send_now reads falls back to plain writes."""
        for name in ("_tempDataLen", "offset", "dataBuffer", "socket", "connected",
                     "_writeDisconnecting", "disconnecting"):

            class Other(FakeConnection):
                hidden = ""

                def setTcpNoDelay(self, enabled: bool) -> None:
                    pass

                def __getattribute__(self, attribute: str) -> Any:
                    if attribute == object.__getattribute__(self, "hidden"):
                        raise AttributeError(attribute)
                    return object.__getattribute__(self, attribute)

            conn = Other(FakeSocket())
            conn.hidden = name
            self.assertFalse(tune(conn), name)

    def test_tls_transport_over_tcp_is_not_eager(self) -> None:
        """A TLS protocol over TCP gets TCP_NODELAY on the socket below but is written plainly."""
        conn = FakeConnection(FakeSocket())
        factory = TLSMemoryBIOFactory(CertificateOptions(), True, Factory.forProtocol(Protocol))
        tls = factory.buildProtocol(None)
        tls.makeConnection(conn)
        self.assertFalse(tune(tls))
        self.assertEqual(conn.fake.options[(socket.IPPROTO_TCP, socket.TCP_NODELAY)], True)

    def test_connection_that_started_tls_is_not_eager(self) -> None:
        """After startTLS a TCP transport's bytes must go through OpenSSL: no eager sends."""
        conn = FakeConnection(FakeSocket())
        conn.startTLS(CertificateOptions())
        self.assertFalse(tune(conn))

    def test_nodelay_refused_is_ignored(self) -> None:
        """TCP_NODELAY refused (OSError from setTcpNoDelay, as Twisted 22.4 raises it): eager
        sends are still allowed."""
        conn = FakeConnection(FakeSocket())

        def refuse(enabled: bool) -> None:
            raise OSError(95, "Operation not supported")

        conn.setTcpNoDelay = refuse  # type: ignore[method-assign]
        self.assertTrue(tune(conn))


class SendNowTests(SynchronousTestCase):
    def test_whole_send_leaves_at_once(self) -> None:
        """With nothing queued, the bytes go to the socket at once and nothing waits in Twisted."""
        conn = connection()
        send_now(conn, b"hello")
        self.assertEqual((bytes(conn.fake.wire), conn.queued()), (b"hello", 0))

    def test_partial_send_queues_the_rest_in_order(self) -> None:
        """The kernel takes part: the rest is queued through transport.write and leaves next."""
        conn = connection(room=10)
        send_now(conn, b"a" * 25)
        self.assertEqual((bytes(conn.fake.wire), conn.queued()), (b"a" * 10, 15))
        conn.flush(room=100)
        self.assertEqual((bytes(conn.fake.wire), conn.queued()), (b"a" * 25, 0))

    def test_nothing_overtakes_queued_bytes(self) -> None:
        """While bytes are queued, later ones are queued behind them, not sent eagerly."""
        conn = connection(room=10)
        send_now(conn, b"a" * 25)
        sends = conn.fake.sends
        conn.fake.room = 1000  # the socket has room again, but the queue is not flushed yet
        send_now(conn, b"b" * 5)
        self.assertEqual((conn.fake.sends, bytes(conn.fake.wire)), (sends, b"a" * 10))
        conn.flush(room=1000)
        self.assertEqual(bytes(conn.fake.wire), b"a" * 25 + b"b" * 5)
        send_now(conn, b"c")  # queue empty again: eager once more
        self.assertEqual((bytes(conn.fake.wire), conn.queued()), (b"a" * 25 + b"b" * 5 + b"c", 0))

    def test_would_block_queues_everything(self) -> None:
        """A full socket (BlockingIOError) queues all the bytes for the reactor."""
        conn = connection(room=0)
        send_now(conn, b"late")
        self.assertEqual((bytes(conn.fake.wire), conn.queued()), (b"", 4))
        self.assertIn(conn, conn.reactor.getWriters())
        conn.flush(room=100)
        self.assertEqual((bytes(conn.fake.wire), conn.queued()), (b"late", 0))

    def test_socket_error_left_to_the_transport(self) -> None:
        """send raising OSError: the bytes go through transport.write, whose flush meets the error
        and reports the connection lost as Twisted does."""
        conn = connection()
        conn.fake.error = ConnectionResetError(104, "Connection reset by peer")
        send_now(conn, b"lost")
        self.assertEqual(conn.queued(), 4)
        self.assertIsInstance(conn.doWrite(), ConnectionLost)

    def test_big_write_pauses_the_producer_as_write_does(self) -> None:
        """What the kernel does not take counts against the write buffer: backpressure as usual."""

        class Producer:
            paused = 0

            def pauseProducing(self) -> None:
                self.paused += 1

            def resumeProducing(self) -> None:
                pass

            def stopProducing(self) -> None:
                pass

        conn = connection(room=1000)
        producer = Producer()
        conn.registerProducer(producer, True)
        send_now(conn, b"x" * (READ_SIZE + 1001))
        self.assertEqual((conn.queued(), producer.paused), (READ_SIZE + 1, 1))

    def test_closing_transport_not_sent_eagerly(self) -> None:
        """After loseConnection the bytes are queued, flushed, then the connection closes."""
        conn = connection()
        conn.loseConnection()
        send_now(conn, b"bye")
        self.assertEqual((conn.fake.sends, conn.queued()), (0, 3))
        conn.flush(room=100)
        self.assertEqual(bytes(conn.fake.wire), b"bye")

    def test_half_closing_transport_not_sent_eagerly(self) -> None:
        """After loseWriteConnection nothing is sent eagerly; once shut, bytes are dropped as by
        transport.write, never sent after the FIN."""
        conn = connection()
        conn.loseWriteConnection()
        send_now(conn, b"last")
        self.assertEqual((conn.fake.sends, conn.queued()), (0, 4))
        conn.flush(room=100)
        self.assertEqual(bytes(conn.fake.wire), b"last")
        send_now(conn, b"after the FIN")
        self.assertEqual((bytes(conn.fake.wire), conn.queued()), (b"last", 0))

    def test_disconnected_transport_sends_nothing(self) -> None:
        """A transport whose connection is lost neither sends nor queues."""
        conn = connection()
        conn.connected = 0
        send_now(conn, b"ghost")
        self.assertEqual((conn.fake.sends, conn.queued()), (0, 0))

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.one_of(st.tuples(st.just("send"), st.integers(0, 300)),
                              st.tuples(st.just("room"), st.integers(0, 400)),
                              st.tuples(st.just("flush"), st.integers(0, 400))), max_size=40))
    def test_bytes_leave_in_order_however_the_kernel_takes_them(self, steps: list[tuple[str, int]]) -> None:
        """Any mix of sends, socket room and flushes: the wire is always a prefix of what was
        given, nothing goes eagerly while bytes are queued, and a final flush delivers it all."""
        conn = connection(room=0)
        given_bytes = bytearray()
        for number, (step, size) in enumerate(steps):
            if step == "send":
                data = bytes([number % 256]) * size
                before = (len(conn.fake.wire), conn.queued())
                send_now(conn, data)
                given_bytes += data
                if before[1]:
                    self.assertEqual(len(conn.fake.wire), before[0])
            elif step == "room":
                conn.fake.room = size
            elif conn.queued():
                conn.flush(size)
            self.assertTrue(given_bytes.startswith(conn.fake.wire))
            self.assertEqual(len(conn.fake.wire) + conn.queued(), len(given_bytes))
        if conn.queued():
            conn.flush(len(given_bytes))
        self.assertEqual(conn.fake.wire, given_bytes)
