"""protheus-license's status listener in memory: JSON, /metrics, the authenticated revoke."""

from __future__ import annotations

import json

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from protheus_broker.license.leases import LeaseTable, Limits
from protheus_broker.license.server import LicenseServer
from protheus_broker.license.settings import LicenseServerConfig
from protheus_broker.license.status import StatusResource
from protheus_broker.web.auth import Verifier, hash_token

TOKEN = "the-admin-token"


def request(method: bytes, path: bytes, client: str = "127.0.0.1", token: str | None = None,
            args: dict[bytes, list[bytes]] | None = None, **headers: bytes) -> DummyRequest:
    made = DummyRequest([])
    made.method, made.args = method, args or {}
    made.path = path  # type: ignore[attr-defined]
    made.client = IPv4Address("TCP", client, 50000)
    if token is not None:
        made.requestHeaders.addRawHeader(b"authorization", b"Bearer " + token.encode())
    for name, value in headers.items():
        made.requestHeaders.addRawHeader(name.encode(), value)
    return made


class StatusTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1000)
        config = LicenseServerConfig(path="<t>", counts={"TOTVS_I": 10, "APP1": 2}, secret=b"x" * 16,
                                     limits=Limits(ttl=30.0), admin_token_hash=hash_token(TOKEN, 10_000))
        self.table = LeaseTable(self.clock, config.counts, config.limits)
        self.server = LicenseServer(self.clock, config, self.table)
        self.resource = StatusResource(self.server, Verifier(lambda call: defer.maybeDeferred(call)))

    def render(self, made: DummyRequest) -> tuple[int, bytes]:
        self.resource.render(made)  # type: ignore[arg-type]
        self.assertEqual(made.finished, 1)
        return made.responseCode or 200, b"".join(made.written)

    def test_status_json(self) -> None:
        """/status gives seats per class, in use, leased per client, releases by reason."""
        lease = self.table.grant("b1", "TOTVS_I", 4)
        self.table.grant("b2", "APP1", 1)
        self.table.release("b1", lease.lease_id, 1)
        code, body = self.render(request(b"GET", b"/status"))
        figures = json.loads(body)
        self.assertEqual(code, 200)
        self.assertEqual(figures["classes"], {"APP1": {"free": 1, "in_use": 1, "seats": 2},
                                              "TOTVS_I": {"free": 7, "in_use": 3, "seats": 10}})
        self.assertEqual(figures["clients"]["b1"], {"connected": False, "lost_since": None, "leases": 1,
                                                    "seats": {"TOTVS_I": 3}})
        self.assertEqual((figures["releases"]["returned"], len(figures["leases"])), (1, 2))

    def test_metrics(self) -> None:
        """/metrics has seats, in use, leased per client and releases by reason."""
        self.table.grant("b1", "TOTVS_I", 4)
        code, body = self.render(request(b"GET", b"/metrics"))
        self.assertEqual(code, 200)
        for line in (b'protheus_license_seats{class="TOTVS_I"} 10.0',
                     b'protheus_license_seats_in_use{class="TOTVS_I"} 4.0',
                     b'protheus_license_seats_leased{class="TOTVS_I",client="b1"} 4.0',
                     b'protheus_license_releases_total{reason="revoked by admin"} 0.0'):
            self.assertIn(line, body)

    def test_reads_from_elsewhere_need_the_token(self) -> None:
        """A non-loopback client reads only with the admin token."""
        self.assertEqual(self.render(request(b"GET", b"/status", client="10.1.1.1"))[0], 401)
        self.assertEqual(self.render(request(b"GET", b"/status", client="10.1.1.1", token=TOKEN))[0], 200)

    def test_revoke_needs_the_token(self) -> None:
        """POST /revoke without a token or with a wrong one is 401 and revokes nothing."""
        lease = self.table.grant("b1", "APP1", 2)
        args = {b"lease": [lease.lease_id.encode()]}
        self.assertEqual(self.render(request(b"POST", b"/revoke", args=args))[0], 401)
        self.assertEqual(self.render(request(b"POST", b"/revoke", args=args, token="wrong"))[0], 401)
        self.assertEqual(self.table.in_use("APP1"), 2)

    def test_revoke_with_the_token(self) -> None:
        """POST /revoke with the token ends the lease, logged as revoked by admin."""
        lease = self.table.grant("b1", "APP1", 2)
        code, body = self.render(request(b"POST", b"/revoke", token=TOKEN,
                                         args={b"lease": [lease.lease_id.encode()]}))
        self.assertEqual((code, json.loads(body)["revoked"]), (200, lease.lease_id))
        self.assertEqual(self.table.in_use("APP1"), 0)
        code, _ = self.render(request(b"POST", b"/revoke", token=TOKEN, args={b"lease": [b"nope"]}))
        self.assertEqual(code, 404)

    def test_cross_site_and_rebinding_are_refused(self) -> None:
        """A foreign Origin (403) or a Host name that is not ours (421) is refused."""
        lease = self.table.grant("b1", "APP1", 2)
        args = {b"lease": [lease.lease_id.encode()]}
        self.assertEqual(self.render(request(b"POST", b"/revoke", token=TOKEN, args=args,
                                             origin=b"http://evil.example", host=b"127.0.0.1:5556"))[0], 403)
        self.assertEqual(self.render(request(b"GET", b"/status", host=b"evil.example"))[0], 421)
        self.assertEqual(self.table.in_use("APP1"), 2)

    def test_wrong_tokens_are_limited_per_address(self) -> None:
        """After ten wrong tokens an address gets 429 until its window passes."""
        for _ in range(10):
            self.render(request(b"POST", b"/revoke", client="10.2.2.2", token="wrong", args={b"lease": [b"x"]}))
        code, _ = self.render(request(b"POST", b"/revoke", client="10.2.2.2", token="wrong",
                                      args={b"lease": [b"x"]}))
        self.assertEqual(code, 429)

    def test_unknown_path(self) -> None:
        """An unknown page is a JSON 404."""
        code, body = self.render(request(b"GET", b"/nope"))
        self.assertEqual((code, json.loads(body)["status"]), (404, 404))
