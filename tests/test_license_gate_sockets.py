"""The license gate through a real [BALANCE_WEB_SERVICES] unit on 127.0.0.1 (port 0): a license
client over TCP to a fake license server, an AppServer that counts requests in flight."""

from __future__ import annotations

import functools
from typing import Any, Callable, Coroutine

import h11
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from protheus_broker.config import parse_config
from protheus_broker.http.settings import WEB_SERVICES_SECTION
from protheus_broker.license.client import LicenseClient
from protheus_broker.license.client_settings import LicenseClientConfig
from protheus_broker.license.leases import LeaseTable
from protheus_broker.license.server import LicenseFactory, LicenseServer
from protheus_broker.license.settings import parse_license_config
from protheus_broker.tap import UNIT_BUILDERS

from protheus_broker.tls.options import server_options
from protheus_broker.tls.settings import TLSFiles

from .http_backend import Client, connect, header
from .tls_fixtures import certs
from .license_fake import FakeLicenseFactory, FakeLicenseServer


def as_deferred(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., defer.Deferred[None]]:
    """An async test as a Deferred-returning one (Twisted 22.4's trial does not await coroutines)."""
    @functools.wraps(test)
    def run(self: Any) -> defer.Deferred[None]:
        return defer.ensureDeferred(test(self))
    return run


class SlowBackend(Protocol):
    """Answers each request 20 ms later; the factory counts requests in flight."""

    factory: "SlowBackendFactory"
    transport: Any

    def connectionMade(self) -> None:
        self.conn = h11.Connection(h11.SERVER)

    def dataReceived(self, data: bytes) -> None:
        self.conn.receive_data(data)
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:
                self.transport.loseConnection()
                return
            if event in (h11.NEED_DATA, h11.PAUSED):
                return
            if isinstance(event, h11.Request):
                self.factory.started(event)
            elif isinstance(event, h11.EndOfMessage):
                reactor.callLater(0.02, self.answer)  # type: ignore[attr-defined]
            elif isinstance(event, h11.ConnectionClosed):
                return

    def answer(self) -> None:
        self.factory.in_flight -= 1
        if self.transport is None or self.conn.our_state is not h11.SEND_RESPONSE:
            return
        self.transport.write(self.conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"2")])))
        self.transport.write(self.conn.send(h11.Data(data=b"ok")))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()


class SlowBackendFactory(Factory):
    protocol = SlowBackend

    def __init__(self) -> None:
        self.in_flight = 0
        self.most = 0
        self.requests: list[h11.Request] = []

    def started(self, request: h11.Request) -> None:
        self.requests.append(request)
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)


async def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition not met in time")


class GateSocketTests(TestCase):
    """Seats enforced on real sockets."""

    async def rig(self, seats: int, ttl: float = 30.0) -> tuple[Any, SlowBackendFactory, FakeLicenseServer]:
        secret_path = self.mktemp()
        with open(secret_path, "wb") as handle:
            handle.write(b"0123456789abcdef0123\n")
        server = FakeLicenseServer(reactor, {"TOTVS_I": seats, "APP7": 1}, b"0123456789abcdef0123", ttl=ttl)
        self.license_port = license_port = reactor.listenTCP(0, FakeLicenseFactory(server), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(license_port.stopListening)
        backend = SlowBackendFactory()
        backend_port = reactor.listenTCP(0, backend, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(backend_port.stopListening)
        config = parse_config(
            "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nREMOTE_SERVER_01 = 127.0.0.1 1\n"
            "SORT_METHOD = ROUND_ROBIN\n"
            "[BALANCE_WEB_SERVICES]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
            f"REMOTE_SERVER_A = 127.0.0.1 {backend_port.getHost().port}\nMONITORING_TYPE = DISABLED\n"
            "URIS = APP\nTRUSTED_API_MANAGERS = 127.0.0.2\nACCESS_LOG = 0\n"
            "[APP]\nURL=/rest/\nStateless=1\n"
            f"[LICENSECLIENT]\nSERVER = 127.0.0.1\nPORT = {license_port.getHost().port}\n"
            f"SECRET_FILE = {secret_path}\nLOW_WATERMARK = 1\nHIGH_WATERMARK = 4\n")
        self.client = client = LicenseClient(reactor, config.license_client)
        client.startService()
        self.addCleanup(client.stopService)
        unit = UNIT_BUILDERS[WEB_SERVICES_SECTION](reactor, config.unit(WEB_SERVICES_SECTION),
                                                   name=WEB_SERVICES_SECTION, licenses=client)
        unit.privilegedStartService()
        unit.startService()
        self.addCleanup(unit.stopService)
        await wait_for(lambda: client.connected and client.pool.stats().get("TOTVS_I", {}).get("held") == min(seats, 4))
        return unit, backend, server

    async def request(self, port: int, target: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
        client = Client(1)
        await connect(port, client)
        self.addCleanup(lambda: client.transport.loseConnection())
        client.send_request(b"GET", target, headers)
        await client.done.addTimeout(20, reactor)
        return client.responses[0] if client.responses else {"status": None}

    @as_deferred
    async def test_seats_bound_the_requests_at_the_appserver(self) -> None:
        """3 seats, 30 concurrent requests under /rest: all answered, never more than 3 at the AppServer."""
        unit, backend, server = await self.rig(seats=3)
        port = unit.port.getHost().port
        answers = await defer.gatherResults([defer.ensureDeferred(self.request(port, b"/rest/x/%d" % n))
                                             for n in range(30)])
        self.assertEqual([a["status"] for a in answers], [200] * 30)
        self.assertEqual(backend.most, 3)
        self.assertEqual(len(backend.requests), 30)
        free = await self.request(port, b"/other")
        self.assertEqual(free["status"], 200)
        self.assertEqual(unit.gate.status()["seated"], 30)
        self.assertEqual(server.leased("TOTVS_I"), 3)
        print(f"\n  sockets: 3 seats, 30 concurrent requests, at most {backend.most} at the AppServer, "
              f"{unit.gate.seated_after_wait} waited for a seat ({unit.gate.wait_seconds * 1000:.0f} ms in all)")

    @as_deferred
    async def test_untrusted_appcode_never_reaches_the_appserver(self) -> None:
        """From 127.0.0.1 (not trusted) x-totvs-appcode never reaches the AppServer."""
        unit, backend, _ = await self.rig(seats=2)
        port = unit.port.getHost().port
        answer = await self.request(port, b"/rest/a", [(b"x-totvs-appcode", b"NOPE")])
        self.assertEqual(answer["status"], 200)
        self.assertNotIn(b"x-totvs-appcode", [name for name, _ in backend.requests[-1].headers])
        self.assertIsNone(header(answer, b"retry-after"))

    @as_deferred
    async def test_partition_serves_from_leases_then_503_unreachable(self) -> None:
        """License server gone: requests go on while the leases last, then 503 license server unreachable."""
        unit, backend, server = await self.rig(seats=2, ttl=1.5)
        port = unit.port.getHost().port
        await self.license_port.stopListening()
        for channel in list(server.channels):
            channel.transport.abortConnection()
        await wait_for(lambda: not self.client.connected)
        answer = await self.request(port, b"/rest/during")
        self.assertEqual(answer["status"], 200)
        await wait_for(lambda: self.client.pool.stats()["TOTVS_I"]["held"] == 0, seconds=5.0)
        answer = await self.request(port, b"/rest/after")
        self.assertEqual(answer["status"], 503)
        self.assertEqual(header(answer, b"retry-after"), b"10")
        self.assertIn(b'"license server unreachable"', answer["body"])
        free = await self.request(port, b"/other")
        self.assertEqual(free["status"], 200)


class RealServerTests(TestCase):
    """The broker's client against protheus-license's own server (in this process, over TCP)."""

    @as_deferred
    async def test_client_leases_renews_and_returns_with_the_real_server(self) -> None:
        """Handshake, a block leased within MAX_SEATS_PER_LEASE, an app class, everything returned at stop."""
        journal = self.mktemp()
        config = parse_license_config(
            "[LicenseServer]\nINTERFACE = 127.0.0.1\nPORT = 0\nSECRET = 0123456789abcdef0123\n"
            f"JOURNAL = {journal}\nLEASE_TTL = 30\nMAX_SEATS_PER_LEASE = 5\n"
            "[Licenses]\nTOTVS_I = 12\nAPP7 = 1\n")
        table = LeaseTable(reactor, config.counts, config.limits)
        server = LicenseServer(reactor, config, table)
        port = reactor.listenTCP(0, LicenseFactory(server), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        client = LicenseClient(reactor, LicenseClientConfig(
            server="127.0.0.1", port=port.getHost().port, secret=b"0123456789abcdef0123", client_name="broker-a",
            low_watermark=2, high_watermark=8))
        client.startService()
        self.addCleanup(lambda: client.stopService() if client.running else None)
        await wait_for(lambda: client.connected and client.pool.stats()["TOTVS_I"]["held"] == 8)
        self.assertEqual(table.in_use("TOTVS_I"), 8)
        self.assertEqual(sorted(lease.seats for lease in table.held_by("broker-a")), [3, 5])  # MAX_SEATS_PER_LEASE
        seat = client.pool.wait("APP7", 5.0, 10)
        self.assertLess(await seat, 5.0)
        self.assertEqual(table.in_use("APP7"), 1)
        refused = client.pool.wait("NOPE", 5.0, 10)
        with self.assertRaises(Exception) as caught:
            await refused
        self.assertEqual(str(caught.exception), "no license for application NOPE")
        await client.stopService()
        self.assertEqual((table.in_use("TOTVS_I"), table.in_use("APP7")), (0, 0))  # confirmed before stopping

    async def tls_server(self) -> tuple[LeaseTable, int]:
        """protheus-license over mutual TLS only (no secret), certificates from the test CA."""
        fixture = certs()
        config = parse_license_config(
            "[LicenseServer]\nINTERFACE = 127.0.0.1\nPORT = 0\n"
            f"SSL_CERTIFICATE = {fixture.cert('appserver')}\nSSL_KEY = {fixture.key('appserver')}\n"
            f"SSL_CA = {fixture.ca_path}\nJOURNAL = {self.mktemp()}\n[Licenses]\nTOTVS_I = 4\n")
        assert config.tls is not None
        table = LeaseTable(reactor, config.counts, config.limits)
        port = reactor.listenSSL(0, LicenseFactory(LicenseServer(reactor, config, table)),  # type: ignore[attr-defined]
                                 server_options(config.tls), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return table, port.getHost().port

    def tls_client(self, port: int, name: str, ca: str | None = None) -> LicenseClient:
        fixture = certs()
        client = LicenseClient(reactor, LicenseClientConfig(
            server="127.0.0.1", port=port, client_name="broker-tls", low_watermark=1, high_watermark=3,
            tls=TLSFiles(certificate=fixture.cert(name), key=fixture.key(name), ca=ca or fixture.ca_path)))
        client.startService()
        self.addCleanup(lambda: client.stopService() if client.running else None)
        return client

    @as_deferred
    async def test_mutual_tls_without_secret(self) -> None:
        """SSL_CERTIFICATE/SSL_KEY/SSL_CA and no secret: the certificates authenticate both ends."""
        table, port = await self.tls_server()
        client = self.tls_client(port, "client")
        await wait_for(lambda: client.connected and client.pool.stats()["TOTVS_I"]["held"] == 3)
        self.assertEqual(table.in_use("TOTVS_I"), 3)
        await client.stopService()
        self.assertEqual(table.in_use("TOTVS_I"), 0)

    @as_deferred
    async def test_mutual_tls_foreign_certificate_refused(self) -> None:
        """A client certificate from another CA gets no channel and no seat."""
        table, port = await self.tls_server()
        client = self.tls_client(port, "foreign")
        await wait_for(lambda: "unknown ca" in client.reason)
        self.assertFalse(client.connected)
        self.assertEqual(table.in_use("TOTVS_I"), 0)
