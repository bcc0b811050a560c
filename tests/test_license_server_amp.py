"""protheus-license's AMP channel in memory (iosim): the handshake with the right and a wrong
secret, nothing before it, box limits, caps on unauthenticated connections, grace and
reconnect, revoke pushed to the client, reload."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.license import protocol as lic
from protheus_broker.license.leases import LeaseTable, Limits, Reason
from protheus_broker.license.server import LicenseFactory, LicenseProtocol, LicenseServer
from protheus_broker.license.settings import LicenseServerConfig

from tests.helpers import LogCatcher
from tests.license_client import TestLicenseClient, handshake

SECRET = b"s3cret-s3cret-s3cret"


def config(**changes: Any) -> LicenseServerConfig:
    values: dict[str, Any] = {"path": "<test>", "counts": {"TOTVS_I": 10, "APP1": 2}, "secret": SECRET,
                              "limits": Limits(ttl=30.0, grace=10.0, max_seats_per_lease=8,
                                               max_leases_per_client=4)}
    values.update(changes)
    return LicenseServerConfig(**values)


class Harness:
    def __init__(self, test: SynchronousTestCase, **changes: Any) -> None:
        self.test = test
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        settings = config(**changes)
        self.table = LeaseTable(self.clock, settings.counts, settings.limits)
        self.server = LicenseServer(self.clock, settings, self.table)
        self.factory = LicenseFactory(self.server)
        self.pumps: list[iosim.IOPump] = []

    def connect(self, host: str = "127.0.0.1") -> tuple[TestLicenseClient, LicenseProtocol]:
        server = self.factory.buildProtocol(IPv4Address("TCP", host, 40000 + len(self.pumps)))
        assert server is not None
        client = TestLicenseClient()
        self.pumps.append(iosim.connect(
            server, iosim.FakeTransport(server, isServer=True,
                                        peerAddress=IPv4Address("TCP", host, 40000 + len(self.pumps))),
            client, iosim.makeFakeClient(client)))
        self.settle()
        return client, server

    def settle(self) -> None:
        for _ in range(3):
            self.clock.advance(0)
            for pump in self.pumps:
                pump.flush()

    def outcome(self, deferred: Any) -> Any:
        """What a client's call (or coroutine) gives once the channel is pumped (AMP logs an
        error answer nobody handles at once: the result is taken before pumping)."""
        result = defer.ensureDeferred(deferred) if not isinstance(deferred, defer.Deferred) else deferred
        outcomes: list[Any] = []
        result.addBoth(outcomes.append)
        self.settle()
        self.test.assertEqual(len(outcomes), 1, "no answer")
        return outcomes[0]

    def call(self, deferred: Any) -> Any:
        result = self.outcome(deferred)
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def fails(self, deferred: Any, error: type[Exception]) -> Failure:
        result = self.outcome(deferred)
        self.test.assertIsInstance(result, Failure)
        self.test.assertTrue(result.check(error), result)
        return result

    def authenticated(self, name: str = "broker1", host: str = "127.0.0.1") -> tuple[TestLicenseClient, LicenseProtocol]:
        client, server = self.connect(host)
        self.call(handshake(client, name, SECRET))
        return client, server


class HandshakeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.log = LogCatcher(self)
        self.h = Harness(self)

    def test_right_secret_authenticates_and_leases(self) -> None:
        """The right secret: both proofs match, the client leases."""
        client, server = self.h.connect()
        self.assertEqual(self.h.call(handshake(client, "broker1", SECRET)), [])
        self.assertTrue(server.authenticated)
        answer = self.h.call(client.callRemote(lic.Lease, license_class="TOTVS_I", seats=3))
        self.assertEqual((answer["seats"], answer["ttl"]), (3, 30.0))
        self.assertEqual(self.h.server.pending, {})

    def test_wrong_secret_is_refused_and_logged_once(self) -> None:
        """A wrong secret: AuthenticationFailed, the connection closed, one log line per address a minute."""
        for _ in range(3):
            client, server = self.h.connect()
            self.h.fails(handshake(client, "broker1", SECRET, proof_secret=b"wrong-wrong-wrong-wrong"),
                         lic.AuthenticationFailed)
            self.assertTrue(client.lost)
            self.assertFalse(server.authenticated)
        lines = [t for t in self.log.texts() if "wrong proof" in t]
        self.assertEqual(len(lines), 1)
        self.assertEqual((self.h.server.failed_handshakes, self.h.server.pending), (3, {}))
        self.h.clock.advance(61)
        client, _ = self.h.connect()
        self.h.fails(handshake(client, "broker1", SECRET, proof_secret=b"wrong-wrong-wrong-wrong"),
                     lic.AuthenticationFailed)
        lines = [t for t in self.log.texts() if "wrong proof" in t]
        self.assertEqual(len(lines), 2)
        self.assertIn("2 more refused from 127.0.0.1", lines[1])

    def test_server_without_our_secret_is_detected_by_the_client(self) -> None:
        """The server proves the secret too: a client with another secret sees a mismatch."""
        client, _ = self.h.connect()
        self.h.fails(handshake(client, "broker1", b"another-secret-entirely"), lic.AuthenticationFailed)

    def test_nothing_but_the_handshake_before_authentication(self) -> None:
        """Lease, Renew or Release before authenticating: NotAuthenticated and the connection dropped."""
        client, server = self.h.connect()
        self.h.fails(client.callRemote(lic.Lease, license_class="TOTVS_I", seats=1), lic.NotAuthenticated)
        self.assertTrue(client.lost)
        self.assertEqual(self.h.table.leases, {})

    def test_wrong_version_is_refused(self) -> None:
        """Another protocol version is UnsupportedVersion."""
        client, _ = self.h.connect()
        self.h.fails(client.callRemote(lic.LicenseHello, version=99, client="b", client_nonce=b"x" * 32),
                     lic.UnsupportedVersion)

    def test_malformed_client_name_is_refused(self) -> None:
        """A client name with spaces is refused before any proof is computed."""
        client, _ = self.h.connect()
        self.h.fails(client.callRemote(lic.LicenseHello, version=1, client="a b", client_nonce=b"x" * 32),
                     lic.AuthenticationFailed)

    def test_oversized_box_before_authentication_is_dropped(self) -> None:
        """A box over 4 KiB before authenticating drops the connection, with one log line."""
        client, server = self.h.connect()
        self.assertIsInstance(self.h.outcome(client.callRemote(lic.LicenseHello, version=1, client="b" * 5000,
                                                               client_nonce=b"x" * 32)), Failure)
        self.assertTrue(client.lost)
        self.assertIn("before authenticating", server.dropped)

    def test_handshake_timeout(self) -> None:
        """A connection that does not authenticate within HANDSHAKE_TIMEOUT is dropped."""
        client, server = self.h.connect()
        self.h.clock.advance(10)
        self.h.settle()
        self.assertTrue(client.lost)
        self.assertEqual(self.h.server.pending, {})


class ConnectionCapTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.log = LogCatcher(self)

    def test_pending_per_address_and_in_total(self) -> None:
        """Unauthenticated connections are capped per address and in total; authenticating frees a slot."""
        h = Harness(self, max_pending=5, max_pending_per_address=3)
        held = [h.connect("10.0.0.1") for _ in range(3)]
        self.assertIsNone(h.factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1)))
        h.connect("10.0.0.2")
        h.connect("10.0.0.3")
        self.assertIsNone(h.factory.buildProtocol(IPv4Address("TCP", "10.0.0.4", 1)))
        h.call(handshake(held[0][0], "broker1", SECRET))
        self.assertIsNotNone(h.factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1)))
        self.assertEqual(h.server.refused_connections, 2)

    def test_max_clients(self) -> None:
        """More authenticated clients than MAX_CLIENTS are refused; the same name may replace itself."""
        h = Harness(self, max_clients=1)
        h.authenticated("broker1")
        client, _ = h.connect()
        h.fails(handshake(client, "broker2", SECRET), lic.AuthenticationFailed)
        h.authenticated("broker1")
        self.assertEqual(list(h.server.clients), ["broker1"])


class LeaseChannelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.log = LogCatcher(self)
        self.h = Harness(self)

    def test_errors_cross_the_wire(self) -> None:
        """NoSeats, UnknownClass and UnknownLease reach the client as themselves."""
        client, _ = self.h.authenticated()
        self.h.call(client.callRemote(lic.Lease, license_class="APP1", seats=2))
        self.h.fails(client.callRemote(lic.Lease, license_class="APP1", seats=1), lic.NoSeats)
        self.h.fails(client.callRemote(lic.Lease, license_class="APP9", seats=1), lic.UnknownClass)
        self.h.fails(client.callRemote(lic.Renew, lease_id="nope"), lic.UnknownLease)
        self.assertFalse(client.lost)

    def test_class_names_are_case_blind(self) -> None:
        """A class asked in lower case is the config's (upper-cased) class."""
        client, _ = self.h.authenticated()
        self.assertEqual(self.h.call(client.callRemote(lic.Lease, license_class="app1", seats=1))["seats"], 1)

    def test_renew_and_release(self) -> None:
        """Renew answers the TTL; Release answers the seats left."""
        client, _ = self.h.authenticated()
        lease = self.h.call(client.callRemote(lic.Lease, license_class="TOTVS_I", seats=5))
        self.h.clock.advance(25)
        self.assertEqual(self.h.call(client.callRemote(lic.Renew, lease_id=lease["lease_id"]))["ttl"], 30.0)
        self.h.clock.advance(25)
        self.assertEqual(self.h.call(client.callRemote(lic.Release, lease_id=lease["lease_id"], seats=2)),
                         {"seats": 3})

    def test_reconnect_within_grace_finds_its_leases(self) -> None:
        """A client whose connection dropped and that authenticates again within the grace is
        answered its leases, with what is left of their TTL."""
        client, _ = self.h.authenticated()
        lease = self.h.call(client.callRemote(lic.Lease, license_class="TOTVS_I", seats=4))
        client.transport.loseConnection()
        self.h.settle()
        self.assertEqual(self.h.server.clients, {})
        self.h.clock.advance(9)
        self.h.table.tick()
        again, _ = self.h.connect()
        leases = self.h.call(handshake(again, "broker1", SECRET))
        self.assertEqual([(entry["lease_id"], entry["seats"], entry["ttl"]) for entry in leases],
                         [(lease["lease_id"], 4, 21.0)])
        self.h.clock.advance(5)
        self.h.table.tick()
        self.assertEqual(self.h.table.in_use("TOTVS_I"), 4)

    def test_lost_client_loses_its_leases_after_grace(self) -> None:
        """No reconnect within GRACE_TIME: the client's leases end, reason 'client gone'."""
        client, _ = self.h.authenticated()
        self.h.call(client.callRemote(lic.Lease, license_class="TOTVS_I", seats=4))
        client.transport.loseConnection()
        self.h.settle()
        self.h.clock.advance(10)
        self.h.table.tick()
        self.assertEqual((self.h.table.in_use("TOTVS_I"), self.h.table.releases[Reason.CLIENT_GONE]), (0, 1))

    def test_a_second_connection_under_the_same_name_replaces_the_first(self) -> None:
        """The same client authenticating again drops its older connection; its leases stay."""
        first, _ = self.h.authenticated()
        lease = self.h.call(first.callRemote(lic.Lease, license_class="TOTVS_I", seats=2))
        second, server = self.h.connect()
        leases = self.h.call(handshake(second, "broker1", SECRET))
        self.assertEqual([entry["lease_id"] for entry in leases], [lease["lease_id"]])
        self.assertTrue(first.lost)
        self.assertIs(self.h.server.clients["broker1"], server)
        self.h.clock.advance(15)
        self.h.table.tick()
        self.assertEqual(self.h.table.in_use("TOTVS_I"), 2)

    def test_revoke_is_pushed_to_the_client(self) -> None:
        """An admin revoke ends the lease and the client hears Revoked at once."""
        client, _ = self.h.authenticated()
        lease = self.h.call(client.callRemote(lic.Lease, license_class="APP1", seats=2))
        self.h.server.revoke(lease["lease_id"], "token@127.0.0.1")
        self.h.settle()
        self.assertEqual(client.revoked, [(lease["lease_id"], "revoked by admin (token@127.0.0.1)")])
        self.h.fails(client.callRemote(lic.Renew, lease_id=lease["lease_id"]), lic.UnknownLease)

    def test_reload_changes_counts_and_limits(self) -> None:
        """A reload's seat counts and TTL apply to the next grant."""
        client, _ = self.h.authenticated()
        self.h.server.reload(config(counts={"TOTVS_I": 1}, limits=Limits(ttl=60.0)))
        answer = self.h.call(client.callRemote(lic.Lease, license_class="TOTVS_I", seats=5))
        self.assertEqual((answer["seats"], answer["ttl"]), (1, 60.0))

    def test_journal_failure_is_an_error_not_a_grant(self) -> None:
        """A grant the journal cannot record is refused (an error the client sees) with one log line."""
        class Full:
            def record(self, entry: dict[str, Any]) -> None:
                raise OSError(28, "No space left on device")

        self.h.table.journal = Full()
        client, _ = self.h.authenticated()
        for _ in range(2):
            failure = self.h.fails(client.callRemote(lic.Lease, license_class="TOTVS_I", seats=1),
                                   amp.RemoteAmpError)
            self.assertIn("cannot record a grant", str(failure.value))
        self.assertEqual(self.h.table.leases, {})
        self.assertEqual(len([t for t in self.log.texts() if "No space left" in t]), 1)
