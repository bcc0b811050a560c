"""A TCP proxy that breaks the link under test: it cuts connections at chosen byte counts (a reset,
or a black hole that the keepalive must find), refuses connections while the "network" is down,
and records when each outage ended.  Runs in the test's (or bench's) own reactor."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.python.failure import Failure


class _Side(Protocol):
    transport: Any
    peer: _Side | None = None

    def __init__(self, pair: _Pair) -> None:
        self.pair = pair

    def dataReceived(self, data: bytes) -> None:
        pair = self.pair
        if pair.silent or self.peer is None:
            return
        self.peer.transport.write(data)
        pair.proxy.forwarded(pair, len(data))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.pair.lost(self)


class _Pair(ClientFactory):
    """One proxied connection: the accepted front and the back towards the target."""

    noisy = False

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.front: _Side = _Front(self)
        self.back: _Side | None = None
        self.silent = False
        self.closed = False

    def buildProtocol(self, addr: Any) -> _Side:
        self.back = back = _BackSide(self)
        return back

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.front.transport.abortConnection()

    def back_connected(self) -> None:
        front, back = self.front, self.back
        assert back is not None
        front.peer, back.peer = back, front
        front.transport.registerProducer(back.transport, True)
        back.transport.registerProducer(front.transport, True)
        front.transport.resumeProducing()

    def cut(self, silent: bool) -> None:
        if silent:  # nothing moves and nobody is told: the keepalive must notice
            self.silent = True
            for side in (self.front, self.back):
                if side is not None and side.transport is not None:
                    side.transport.pauseProducing()
        else:
            self.abort()

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.proxy.pairs.discard(self)
        for side in (self.front, self.back):
            if side is not None and side.transport is not None and side.transport.connected:
                side.transport.abortConnection()

    def lost(self, side: _Side) -> None:
        self.abort()


class _Front(_Side):
    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        proxy = self.pair.proxy
        proxy.reactor.connectTCP("127.0.0.1", proxy.target_port, self.pair, timeout=5)


class _BackSide(_Side):
    def connectionMade(self) -> None:
        self.pair.back_connected()


class _Refused(Protocol):
    def connectionMade(self) -> None:
        self.transport.abortConnection()


class FaultProxy(Factory):
    """Forwards 127.0.0.1 connections to *target_port*; after each byte count in *cut_at* (bytes
    forwarded both ways, in total) cuts every open connection, a fraction *silent_ratio* of them
    as black holes, and stays down for a random time drawn by *downtime*."""

    noisy = False

    def __init__(self, reactor: Any, target_port: int, cut_at: list[int], rng: random.Random,
                 silent_ratio: float = 0.05, downtime: Any = None) -> None:
        self.reactor = reactor
        self.target_port = target_port
        self.cut_at = sorted(cut_at)
        self.rng = rng
        self.silent_ratio = silent_ratio
        self.downtime = downtime or (lambda r: r.uniform(0.0, 0.05))
        self.pairs: set[_Pair] = set()
        self.total = 0
        self.cuts = 0
        self.silent_cuts = 0
        self.refused = 0
        self.down_until = 0.0
        self.restored: list[float] = []  # when each outage ended (first connection let through)
        self._outage = False

    def buildProtocol(self, addr: Any) -> Protocol:
        now = self.reactor.seconds()
        if now < self.down_until:
            self.refused += 1
            return _Refused()
        if self._outage:
            self._outage = False
            self.restored.append(now)
        pair = _Pair(self)
        self.pairs.add(pair)
        return pair.front

    def forwarded(self, pair: _Pair, count: int) -> None:
        self.total += count
        if self.cut_at and self.total >= self.cut_at[0]:  # one cut per threshold, however close
            self.cut_at.pop(0)
            self.cut_all()

    def cut_all(self) -> None:
        silent = self.rng.random() < self.silent_ratio
        self.cuts += 1
        self.silent_cuts += silent
        for pair in list(self.pairs):
            pair.cut(silent)
        self.down_until = self.reactor.seconds() + self.downtime(self.rng)
        self._outage = True

