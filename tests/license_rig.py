"""In-memory rig for the license client: an endpoint that connects to a
:class:`~tests.license_fake.FakeLicenseServer` through ``twisted.test.iosim`` pumps."""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.test.iosim import FakeTransport, IOPump
from zope.interface import implementer

from protheus_broker.license.client import LicenseClient
from protheus_broker.license.client_settings import LicenseClientConfig

from .license_fake import FakeLicenseFactory, FakeLicenseServer

SECRET = b"s" * 32


@implementer(IStreamClientEndpoint)
class LoopbackEndpoint:
    """Each connect builds a client and a server protocol joined by FakeTransports; ``refuse``
    makes connects fail (the server unreachable)."""

    def __init__(self, server: FakeLicenseServer) -> None:
        self.server = server
        self.factory = FakeLicenseFactory(server)
        self.pumps: list[IOPump] = []
        self.refuse = False
        self.attempts = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        self.attempts += 1
        if self.refuse:
            return fail(ConnectionRefusedError("refused"))
        client = factory.buildProtocol(None)
        server = self.factory.buildProtocol(None)
        client_io = FakeTransport(client, isServer=False)
        server_io = FakeTransport(server, isServer=True)
        client.makeConnection(client_io)
        server.makeConnection(server_io)
        self.pumps.append(IOPump(client, server, client_io, server_io, False))
        return succeed(client)

    def flush(self) -> None:
        """Move every byte both ways until nothing is left."""
        for _ in range(20):
            moved = False
            for pump in list(self.pumps):
                moved = pump.pump() or moved
            if not moved:
                break

    def cut(self) -> None:
        """Drop every open connection (a partition) and refuse new ones."""
        self.refuse = True
        for pump in self.pumps:
            pump.clientIO.loseConnection()
            pump.serverIO.loseConnection()
        self.flush()
        self.pumps = []


class Rig:
    """A clock, a fake license server, a license client connected to it through the loopback."""

    def __init__(self, seats: dict[str, int] | None = None, ttl: float = 30.0, server_secret: bytes = SECRET,
                 start: bool = True, **config: Any) -> None:
        self.clock = Clock()
        self.server = FakeLicenseServer(self.clock, seats if seats is not None else {"TOTVS_I": 100},
                                        server_secret, ttl=ttl)
        self.endpoint = LoopbackEndpoint(self.server)
        settings = dataclasses.replace(LicenseClientConfig(server="127.0.0.1", secret=SECRET,
                                                           client_name="broker-1", low_watermark=2,
                                                           high_watermark=8), **config)
        self.client = LicenseClient(self.clock, settings, endpoint=self.endpoint, retry_policy=lambda n: 1.0)
        self.pool = self.client.pool
        self.changes: list[tuple[bool, str]] = []
        self.client.subscribe(lambda up, why: self.changes.append((up, why)))
        if start:
            self.client.startService()
            self.flush()

    def flush(self) -> None:
        self.endpoint.flush()

    def advance(self, seconds: float, step: float = 0.5) -> None:
        """Let time pass in steps, pumping bytes after each."""
        left = seconds
        while left > 1e-9:
            now = min(step, left)
            self.clock.advance(now)
            self.flush()
            left -= now

    def stop(self) -> None:
        if self.client.running:
            self.client.stopService()
        self.flush()

    def count(self, kind: str) -> int:
        return len([entry for entry in self.server.log if entry[0] == kind])
