"""A stand-in AppServer for the demo, tests and benchmarks (never needed in production).

Each connection is greeted with one line naming the server and the session number, so people and
tests see where a session landed; after that every byte is echoed back, with backpressure.
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()


def greeting(name: str, session: int) -> bytes:
    """The first line a sample AppServer sends on each connection."""
    return f"PROTHEUS-SIM {name} session {session}\r\n".encode()


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class EchoSession(Protocol):
    """One SmartClient session on the sample AppServer: its own number and byte count.

    Behind TLS it starts at the end of the handshake: a write before it would pause the
    transport (its own producer) and stall the handshake."""

    transport: Any

    def __init__(self, factory: AppServerSimFactory) -> None:
        self.factory = factory
        self.number = next(factory.numbers)
        self.echoed = 0

    def connectionMade(self) -> None:
        self.factory.open_sessions += 1
        if not self.factory.tls:
            self.start()

    def handshakeCompleted(self) -> None:
        self.start()

    def start(self) -> None:
        # The transport is its own producer: when echoes back up, reading pauses.
        self.transport.registerProducer(self.transport, True)
        if self.factory.greet:
            self.transport.write(greeting(self.factory.name, self.number))

    def dataReceived(self, data: bytes) -> None:
        self.echoed += len(data)
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.unregisterProducer()
        self.transport.loseConnection()  # after the echoes are flushed

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.open_sessions -= 1
        log.info("{text}", text=f"sim {self.factory.name}: session {self.number} closed after "
                 f"echoing {self.echoed} bytes", session=self.number, echoed=self.echoed)


class AppServerSimFactory(Factory):
    """Serves :class:`EchoSession`; *ballast_mb* holds that much memory, so tests and demos can
    make sample AppServers differ in memory use."""

    noisy = False

    def __init__(self, name: str, greet: bool = True, ballast_mb: int = 0) -> None:
        self.name = name
        self.greet = greet
        self.numbers = itertools.count(1)
        self.open_sessions = 0
        self.tls = False  # set by sim_tap.tls_factory: start sessions after the handshake
        self.ballast = bytearray(ballast_mb * 1024 * 1024)
        for offset in range(0, len(self.ballast), 4096):  # touch every page so it is resident
            self.ballast[offset] = 1

    def buildProtocol(self, addr: Any) -> EchoSession:
        return EchoSession(self)
