"""End to end with the real ``twistd protheus-license`` on 127.0.0.1: leases survive a
``kill -9`` and restart of the license server (under load: no seat granted twice, none
lost), a client that vanishes gets its seats back after the grace, mutual TLS."""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import ClientCreator
from twisted.web.client import Agent, readBody

from protheus_broker.demo.children import TwistdChild, twistd_argv
from protheus_broker.license import protocol as lic
from protheus_broker.tls.certs import make_ca, make_cert, write_pair
from protheus_broker.tls.options import client_options
from protheus_broker.tls.settings import TLSFiles

from .helpers import ProcessTestCase
from .license_client import TestLicenseClient, handshake

SECRET = b"e2e-secret-e2e-secret"


class LicenseServerProcessTests(ProcessTestCase):
    timeout = 90

    def config(self, folder: str, extra: str = "", seats: int = 10, secret: bool = True) -> str:
        return self.write_ini(
            "[LicenseServer]\nINTERFACE = 127.0.0.1\nPORT = 0\nSTATUS_PORT = 0\n"
            + (f"SECRET = {SECRET.decode()}\n" if secret else "")
            + f"JOURNAL = {os.path.join(folder, 'license.journal')}\nLEASE_TTL = 30\nGRACE_TIME = 1\n"
            f"MAX_LEASES_PER_CLIENT = 100000\n{extra}[Licenses]\nTOTVS_I = {seats}\nAPP1 = 2\n",
            "license.ini")

    async def server(self, path: str, name: str = "license") -> tuple[TwistdChild, int, int]:
        child = self.start(name, twistd_argv("protheus-license", "--config", path))
        port = await child.listening()
        match = re.search(r"status on 127\.0\.0\.1:(\d+)", child.text())
        self.assertIsNotNone(match, child.text())
        assert match is not None
        return child, port, int(match.group(1))

    async def client(self, port: int, name: str) -> tuple[TestLicenseClient, list[dict[str, Any]]]:
        client = TestLicenseClient()
        await ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port, timeout=5)
        return client, await handshake(client, name, SECRET)

    async def status(self, port: int) -> dict[str, Any]:
        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}/status".encode())
        figures: dict[str, Any] = json.loads(await readBody(response))
        return figures

    async def kill9(self, child: TwistdChild) -> None:
        child.signal("KILL")
        await child.ended

    def test_leases_survive_kill_9_and_restart(self) -> defer.Deferred[None]:
        """A client's leases are there after the server is kill -9'd and restarted; no seat is
        granted twice."""
        return defer.ensureDeferred(self._survive())

    async def _survive(self) -> None:
        folder = self.mktemp_dir()
        path = self.config(folder)
        child, port, _ = await self.server(path)
        client, held = await self.client(port, "broker1")
        self.assertEqual(held, [])
        first = await client.callRemote(lic.Lease, license_class="TOTVS_I", seats=4)
        second = await client.callRemote(lic.Lease, license_class="TOTVS_I", seats=3)
        await self.kill9(child)
        started = time.monotonic()
        child, port, status_port = await self.server(path, "license-restarted")
        restart = time.monotonic() - started
        client, held = await self.client(port, "broker1")
        self.assertEqual(sorted((lease["lease_id"], lease["seats"]) for lease in held),
                         sorted([(first["lease_id"], 4), (second["lease_id"], 3)]))
        self.assertTrue(all(0 < lease["ttl"] <= 30 for lease in held))
        other, _ = await self.client(port, "broker2")
        third = await other.callRemote(lic.Lease, license_class="TOTVS_I", seats=10)
        self.assertEqual(third["seats"], 3)
        try:
            await other.callRemote(lic.Lease, license_class="TOTVS_I", seats=1)
        except lic.NoSeats:
            pass
        else:
            self.fail("an 11th seat of 10 was granted")
        figures = await self.status(status_port)
        self.assertEqual(figures["classes"]["TOTVS_I"], {"seats": 10, "in_use": 10, "free": 0})
        print(f"\nkill -9 + restart: 2 leases (7 seats) kept, restart to listening {restart:.2f}s, "
              f"a second client got the 3 seats left and no more")

    def test_kill_9_under_load_grants_no_seat_twice(self) -> defer.Deferred[None]:
        """Killed while a client leases as fast as it can, the restarted server holds every lease
        it answered, and at most the few in flight besides."""
        return defer.ensureDeferred(self._under_load())

    async def _under_load(self) -> None:
        folder = self.mktemp_dir()
        path = self.config(folder, seats=100000)
        child, port, status_port = await self.server(path)
        client, _ = await self.client(port, "loader")
        answered: set[str] = set()
        in_flight = 8
        killed = defer.Deferred[None]()
        started = time.monotonic()

        def one(_: Any = None) -> None:
            if killed.called:
                return
            asked = client.callRemote(lic.Lease, license_class="TOTVS_I", seats=1)
            asked.addCallback(granted)
            asked.addErrback(lambda _: None)  # the kill cuts the channel

        def granted(answer: dict[str, Any]) -> None:
            answered.add(answer["lease_id"])
            if len(answered) == 300 and not killed.called:
                child.signal("KILL")
                killed.callback(None)
            one()

        for _ in range(in_flight):
            one()
        await killed
        elapsed = time.monotonic() - started
        await child.ended
        seen_at_kill = len(answered)
        child, port, status_port = await self.server(path, "license-restarted")
        _, held = await self.client(port, "loader")
        found = {lease["lease_id"] for lease in held}
        self.assertEqual(answered - found, set())
        self.assertLessEqual(len(found - answered), in_flight)
        figures = await self.status(status_port)
        self.assertEqual(figures["classes"]["TOTVS_I"]["in_use"], len(found))
        print(f"\nunder load: {seen_at_kill} grants answered in {elapsed:.2f}s "
              f"({seen_at_kill / elapsed:.0f}/s, each fsync'd) before kill -9; after restart "
              f"{len(found)} leases found: all {len(answered)} answered ones, "
              f"{len(found - answered)} granted but unanswered (in flight)")

    def test_vanished_client_gets_its_seats_back_after_grace(self) -> defer.Deferred[None]:
        """A client whose connection drops and does not come back loses its seats after GRACE_TIME."""
        return defer.ensureDeferred(self._vanished())

    async def _vanished(self) -> None:
        folder = self.mktemp_dir()
        child, port, status_port = await self.server(self.config(folder))
        client, _ = await self.client(port, "broker1")
        await client.callRemote(lic.Lease, license_class="APP1", seats=2)
        self.assertEqual((await self.status(status_port))["classes"]["APP1"]["in_use"], 2)
        client.transport.abortConnection()
        dropped = time.monotonic()
        while (await self.status(status_port))["classes"]["APP1"]["in_use"]:
            if time.monotonic() - dropped > 10:
                self.fail("the seats did not come back:\n" + child.text())
            await task.deferLater(reactor, 0.1, lambda: None)
        back = time.monotonic() - dropped
        self.assertIn("released (client gone)", child.text())
        print(f"\nclient dropped: its 2 seats back after {back:.2f}s (GRACE_TIME = 1)")

    def test_mutual_tls_without_a_secret(self) -> defer.Deferred[None]:
        """On mutual TLS the certificates authenticate; the handshake's proofs are empty."""
        return defer.ensureDeferred(self._tls())

    async def _tls(self) -> None:
        folder = self.mktemp_dir()
        ca = make_ca()
        ca_pem, _ = write_pair(folder, "ca", ca)
        server_pem, server_key = write_pair(folder, "server", make_cert(ca, "license", ["127.0.0.1"]))
        broker_pem, broker_key = write_pair(folder, "broker", make_cert(ca, "broker", client=True))
        extra = f"SSL_CERTIFICATE = {server_pem}\nSSL_KEY = {server_key}\nSSL_CA = {ca_pem}\n"
        child, port, _ = await self.server(self.config(folder, extra, secret=False))
        files = TLSFiles(certificate=broker_pem, key=broker_key, ca=ca_pem)
        client = TestLicenseClient()
        await ClientCreator(reactor, lambda: client).connectSSL("127.0.0.1", port,
                                                                client_options(files, "127.0.0.1"), timeout=5)
        self.assertEqual(await handshake(client, "broker1", None), [])
        lease = await client.callRemote(lic.Lease, license_class="TOTVS_I", seats=2)
        self.assertEqual(lease["seats"], 2)
        self.assertIn("(mutual TLS)", child.text())
