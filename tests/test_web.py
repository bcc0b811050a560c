"""The broker screen in memory: every endpoint, auth failures, malformed requests, actions,
Prometheus output and the status query on the SmartClient port."""

from __future__ import annotations

import json

from typing import Any, Callable

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from protheus_broker.balancing.methods import Metrics
from protheus_broker.config import parse_config
from protheus_broker.ini import ConfigError
from protheus_broker.web.settings import ReadAccess
from protheus_broker.balancing.pool import ServerState
from protheus_broker.desktop.proxy import ClientSide, FirstBytes
from protheus_broker.desktop.unit import DesktopUnit
from protheus_broker.tap import BrokerService
from protheus_broker.web.auth import (FailureLimiter, TokenChecker, Verifier, hash_token, host_allowed,
                                     host_of, origin_matches, parse_token_hash, reactor_thread_runner)
from protheus_broker.web.port_status import recognise_status_request

from .helpers import LogCatcher

TOKEN = "t0ken-for-tests-only-0123456789"
TOKEN_HASH = hash_token(TOKEN, iterations=10_000)


def ini(extra: str = "", admin: str | None = None) -> str:
    admin_section = admin if admin is not None else f"[BROKER_ADMIN]\nENDPOINT = tcp:0:interface=127.0.0.1\nTOKEN_HASH = {TOKEN_HASH}\n"
    return ("[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 1234\nREMOTE_SERVER_01 = 127.0.0.1 5001\n"
            "REMOTE_SERVER_02 = 127.0.0.1 5002\nSORT_METHOD = CONNECTION\nMONITORING_TYPE = DISABLED\n"
            + extra + admin_section)


class Reply:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}

    def json(self) -> Any:
        return json.loads(self.body)


class FakeThreads:
    """A stand-in for the reactor's thread pool: runs each function at once (*synchronous*) or
    when the test calls :meth:`run_pending`, and counts what it ran."""

    def __init__(self, synchronous: bool = True) -> None:
        self.synchronous = synchronous
        self.pending: list[tuple[Callable[[], bool], Deferred[bool]]] = []
        self.ran = 0

    def __call__(self, function: Callable[[], bool]) -> Deferred[bool]:
        if self.synchronous:
            self.ran += 1
            return succeed(function())
        waiting: Deferred[bool] = Deferred()
        self.pending.append((function, waiting))
        return waiting

    def run_pending(self) -> None:
        while self.pending:
            function, waiting = self.pending.pop(0)
            self.ran += 1
            waiting.callback(function())


class Harness:
    """A BrokerService on a memory reactor, with the config written to a file (for reload), and
    token checks run by :class:`FakeThreads`."""

    def __init__(self, test: SynchronousTestCase, text: str | None = None) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_700_000_000)
        self.path = test.mktemp()
        self.write(text or ini())
        from protheus_broker.config import load_config
        self.service = BrokerService(self.reactor, load_config(self.path))
        self.admin = [s for s in self.service if type(s).__name__ == "AdminService"][0]
        self.threads = FakeThreads()
        self.admin.access.verifier = Verifier(self.threads)

    def write(self, text: str) -> None:
        with open(self.path, "w") as handle:
            handle.write(text)

    def connect(self, peer: str = "127.0.0.1", site: Any = None) -> tuple[Any, StringTransport]:
        """A connection to *site* (the admin endpoint by default) from *peer*."""
        protocol = (site or self.admin.site).buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
        protocol.makeConnection(transport)
        return protocol, transport

    def send(self, protocol: Any, method: str, path: str, headers: dict[str, str] | None = None,
             body: bytes = b"", host: str | None = "127.0.0.1:8480", close: bool = True) -> None:
        lines = [f"{method} {path} HTTP/1.1"] + ([f"Host: {host}"] if host is not None else [])
        lines += ["Connection: close"] if close else []
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        protocol.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                peer: str = "127.0.0.1", body: bytes = b"", site: Any = None,
                host: str | None = "127.0.0.1:8480") -> Reply:
        protocol, transport = self.connect(peer, site)
        self.send(protocol, method, path, headers, body, host)
        return Reply(transport.value())

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    def open_session(self, peer_port: int = 50000) -> Any:
        """A SmartClient session connected to the first-ranked server."""
        client = ClientSide(self.service.factory)
        client.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", peer_port)))
        session = client.session
        server = session.buildProtocol(None)
        server.makeConnection(StringTransport())
        client.dataReceived(b"hello")
        server.dataReceived(b"")  # the AppServer has answered: the session is established
        return session


class ReadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(self)

    def test_page_is_self_contained_html(self) -> None:
        """GET / serves the page with inline script and a CSP that allows nothing external."""
        reply = self.h.request("GET", "/")
        self.assertEqual(reply.status, 200)
        self.assertIn(b"text/html", reply.headers[b"content-type"])
        self.assertIn(b"<script>", reply.body)
        self.assertNotIn(b"http://", reply.body.replace(b"http://www.w3.org/2000/svg", b""))
        self.assertNotIn(b"https://", reply.body)
        self.assertIn(b"default-src 'none'", reply.headers[b"content-security-policy"])
        self.assertIn(b"frame-ancestors 'none'", reply.headers[b"content-security-policy"])

    def test_status_lists_pool_servers_sessions_and_totals(self) -> None:
        """/api/v1/status: servers with state and connections, totals, uptime and version."""
        self.h.open_session()
        self.h.service.pool.report_metrics("02", Metrics(1000, 3, 40, 12.5, self.h.reactor.seconds() - 2))
        self.h.reactor.advance(10)
        status = self.h.request("GET", "/api/v1/status").json()
        pool = status["pools"][0]
        self.assertEqual(pool["sort_method"], "CONNECTION")
        self.assertEqual(pool["monitoring_type"], "DISABLED")
        by_id = {s["id"]: s for s in pool["servers"]}
        self.assertEqual(by_id["01"]["connections"], 1)
        self.assertEqual(by_id["01"]["state"], "up")
        self.assertEqual(by_id["02"]["metrics"]["users"], 3)
        self.assertEqual(by_id["02"]["metrics"]["age_seconds"], 12.0)
        self.assertEqual(status["totals"]["sessions"], 1)
        self.assertEqual(status["totals"]["bytes_in"], 5)
        self.assertEqual(status["uptime_seconds"], 10.0)
        self.assertTrue(status["admin"]["actions"])

    def test_history_samples_feed_the_chart(self) -> None:
        """The sampler keeps connections per server in a ring for the chart."""
        self.h.admin.startService()
        self.addCleanup(self.h.admin.stopService)
        self.h.open_session()
        self.h.reactor.advance(5)
        samples = self.h.request("GET", "/api/v1/history").json()["samples"]
        self.assertEqual(samples[-1]["connections"], {"01": 1, "02": 0})
        self.assertEqual(self.h.request("GET", "/api/v1/status").json()["pools"][0]["history"]["samples"], samples)

    def test_sessions_are_paged(self) -> None:
        """/api/v1/sessions pages live sessions with client, server, start and bytes."""
        for port in range(3):
            self.h.open_session(50000 + port)
        page = self.h.request("GET", "/api/v1/sessions?page=2&per_page=2").json()
        self.assertEqual((page["total"], page["pages"], page["page"]), (3, 2, 2))
        [row] = page["sessions"]
        self.assertEqual(row["client"], "10.0.0.9:50002")
        self.assertEqual(row["bytes_in"], 5)
        self.assertEqual(row["state"], "open")
        self.assertEqual(page["standby"], [])

    def test_standby_and_handshake_counters_are_read_when_present(self) -> None:
        """The resumable-session store and the counters recorded through the unit's recorder
        (resumes, handshakes, ...) appear in status and metrics."""
        class Standby:
            count = 1

            def snapshot(self) -> list[dict[str, Any]]:
                return [{"session_id": 7, "client": "10.1.1.1:1", "server_id": "02", "since": 1.0,
                         "buffered_bytes": 10}]
        self.h.service.factory.standby = Standby()
        stats = self.h.service.desktop.stats
        for name, n in (("drops", 4), ("resumes", 3), ("expiries", 1), ("resume_failures", 2),
                        ("unestablished_drops", 6), ("standby_evictions", 5), ("handshake_failures", 9)):
            stats.record(name, n)
        status = self.h.request("GET", "/api/v1/status").json()
        self.assertEqual(status["totals"]["resumes"], 3)
        self.assertEqual(status["totals"]["handshake_failures"], 9)
        self.assertEqual({s["id"]: s["standby"] for s in status["pools"][0]["servers"]}, {"01": 0, "02": 1})
        text = self.h.request("GET", "/metrics").body.decode()
        self.assertIn('protheus_broker_resumes_total{pool="BALANCE_SMART_CLIENT_DESKTOP"} 3.0', text)
        self.assertIn('protheus_broker_handshake_failures_total{pool="BALANCE_SMART_CLIENT_DESKTOP"} 9.0', text)
        self.assertIn('protheus_broker_standby_sessions{pool="BALANCE_SMART_CLIENT_DESKTOP"} 1.0', text)
        self.assertEqual(status["totals"]["unestablished_drops"], 6)
        self.assertIn('protheus_broker_standby_evictions_total{pool="BALANCE_SMART_CLIENT_DESKTOP"} 5.0', text)
        self.assertIn('protheus_broker_unestablished_drops_total{pool="BALANCE_SMART_CLIENT_DESKTOP"} 6.0', text)

    def test_pending_refusals_are_counted(self) -> None:
        """Connections refused by the pending caps appear in status and metrics."""
        self.h.service.desktop.stats.record("pending_refused", 4)
        status = self.h.request("GET", "/api/v1/status").json()
        self.assertEqual(status["totals"]["pending_refused"], 4)
        self.assertIn('protheus_broker_pending_refused_total{pool="BALANCE_SMART_CLIENT_DESKTOP"} 4.0',
                      self.h.request("GET", "/metrics").body.decode())

    def test_metrics_are_prometheus_text(self) -> None:
        """/metrics: per-server state and connections, session counters, bytes."""
        self.h.open_session()
        reply = self.h.request("GET", "/metrics")
        self.assertEqual(reply.status, 200)
        self.assertIn(b"text/plain", reply.headers[b"content-type"])
        text = reply.body.decode()
        self.assertIn('protheus_broker_server_connections{address="127.0.0.1:5001",pool="BALANCE_SMART_CLIENT_DESKTOP",server="01"} 1.0', text)
        self.assertIn('protheus_broker_server_state{address="127.0.0.1:5002",pool="BALANCE_SMART_CLIENT_DESKTOP",server="02",state="up"} 1.0', text)
        self.assertIn('protheus_broker_sessions{pool="BALANCE_SMART_CLIENT_DESKTOP"} 1.0', text)
        self.assertIn('protheus_broker_bytes_in_total{pool="BALANCE_SMART_CLIENT_DESKTOP"} 5.0', text)
        self.assertIn('protheus_broker_sessions_total{pool="BALANCE_SMART_CLIENT_DESKTOP"} 1.0', text)

    def test_remote_reader_needs_token_by_default(self) -> None:
        """READ_ACCESS=LOCALHOST: a remote client gets 401 without a token, 200 with it."""
        reply = self.h.request("GET", "/api/v1/status", peer="192.0.2.7")
        self.assertEqual(reply.status, 401)
        self.assertIn(b"Bearer", reply.headers[b"www-authenticate"])
        self.assertIn("token is needed", reply.json()["error"])
        self.assertEqual(self.h.request("GET", "/metrics", peer="192.0.2.7").status, 401)
        self.assertEqual(self.h.request("GET", "/api/v1/status", self.h.auth(), peer="192.0.2.7").status, 200)

    def test_wrong_token_refused_even_on_localhost(self) -> None:
        """A wrong token is refused, not ignored."""
        reply = self.h.request("GET", "/api/v1/status", {"Authorization": "Bearer nope"})
        self.assertEqual(reply.status, 401)
        self.assertEqual(self.h.request("GET", "/api/v1/status", {"Authorization": "Basic eDp5"}).status, 401)

    def test_read_access_nowhere(self) -> None:
        """READ_ACCESS=NOWHERE: even localhost needs the token."""
        h = Harness(self, ini(admin=f"[BROKER_ADMIN]\nENDPOINT=tcp:0\nTOKEN_HASH={TOKEN_HASH}\nREAD_ACCESS=NOWHERE\n"))
        self.assertEqual(h.service.config.admin.read_access, ReadAccess.NOWHERE)  # type: ignore[union-attr]
        self.assertEqual(h.request("GET", "/api/v1/servers").status, 401)
        self.assertEqual(h.request("GET", "/api/v1/servers", h.auth()).status, 200)


class MalformedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(self)

    def test_unknown_paths_and_methods(self) -> None:
        """Unknown path 404, wrong method 405 with Allow, all as JSON errors."""
        reply = self.h.request("GET", "/api/v1/nothing")
        self.assertEqual((reply.status, reply.json()["error"]), (404, "no such resource: /api/v1/nothing"))
        reply = self.h.request("POST", "/api/v1/status", self.h.auth())
        self.assertEqual(reply.status, 405)
        self.assertEqual(reply.headers[b"allow"], b"GET, HEAD")
        reply = self.h.request("GET", "/api/v1/servers/01/drain", self.h.auth())
        self.assertEqual((reply.status, reply.headers[b"allow"]), (405, b"POST"))
        self.assertEqual(self.h.request("POST", "/api/v1/servers/01/explode", self.h.auth()).status, 404)

    def test_head_gets_headers_only(self) -> None:
        """HEAD of a JSON read or the port's /status: the GET's status and length, no body."""
        reply = self.h.request("HEAD", "/api/v1/status")
        get = self.h.request("GET", "/api/v1/status")
        self.assertEqual((reply.status, reply.body), (200, b""))
        self.assertEqual(reply.headers[b"content-length"], str(len(get.body)).encode())
        site = [r for r in self.h.service.factory.recognisers if r.name == "http-status"][0].site
        reply = self.h.request("HEAD", "/status", site=site)
        self.assertEqual((reply.status, reply.body), (200, b""))

    def test_bad_query_and_ids(self) -> None:
        """Bad paging and session ids are 400s that say what is wrong."""
        reply = self.h.request("GET", "/api/v1/sessions?page=x")
        self.assertEqual(reply.status, 400)
        self.assertIn("page", reply.json()["error"])
        self.assertEqual(self.h.request("GET", "/api/v1/sessions?per_page=100000").status, 400)
        self.assertEqual(self.h.request("GET", "/api/v1/sessions?page=0").status, 400)
        self.assertEqual(self.h.request("POST", "/api/v1/sessions/abc/close", self.h.auth()).status, 400)
        self.assertEqual(self.h.request("GET", "/%ff%fe").status, 400)

    def test_garbage_bytes_get_400_and_broker_keeps_serving(self) -> None:
        """A non-HTTP request line gets 400 from twisted.web; the next request is served."""
        protocol = self.h.admin.site.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1))
        protocol.makeConnection(transport)
        protocol.dataReceived(b"\x16\x03\x01garbage\r\n\r\n")
        self.assertIn(b"400", transport.value().split(b"\r\n")[0])
        self.assertEqual(self.h.request("GET", "/ping").status, 200)

    def test_oversized_action_body(self) -> None:
        """Actions take no body: a huge one is 413."""
        reply = self.h.request("POST", "/api/v1/reload", self.h.auth(), body=b"x" * 70_000)
        self.assertEqual(reply.status, 413)

    def test_big_or_chunked_bodies_refused_before_they_are_read(self) -> None:
        """A declared 1 GB body, or a chunked one, is answered 413 as soon as the headers are in
        and the connection stops reading: nothing is stored (twisted.web would spool it to disk).
        Same on the SmartClient port, which faces the network."""
        port_site = [r for r in self.h.service.factory.recognisers if r.name == "http-status"][0].site
        for site in (self.h.admin.site, port_site):
            for framing in (b"Content-Length: 1000000000", b"Transfer-Encoding: chunked"):
                protocol = site.buildProtocol(None)
                transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.7", 40000))
                protocol.makeConnection(transport)
                protocol.dataReceived(b"POST /status HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n")
                protocol.dataReceived(b"f" * 65536)  # what was already on its way is dropped
                reply = Reply(transport.value())
                self.assertEqual(reply.status, 413, framing)
                self.assertIn("request body over", reply.json()["error"])
                self.assertTrue(transport.disconnecting)
        self.assertEqual(self.h.request("GET", "/api/v1/status").status, 200)


class ActionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(self)

    def post(self, path: str, headers: dict[str, str] | None = None, **kw: Any) -> Reply:
        return self.h.request("POST", path, self.h.auth() if headers is None else headers, **kw)

    def test_server_in_two_pools_is_named_by_pool(self) -> None:
        """With a second unit holding a server of the same id, an action without ?pool= is a 409
        that says so; with ?pool= only that pool's server changes; an unknown pool is a 404."""
        other = DesktopUnit(self.h.reactor, parse_config(ini()).desktop, name="BALANCE_OTHER")
        self.h.service.units.append(other)
        reply = self.post("/api/v1/servers/01/drain")
        self.assertEqual(reply.status, 409)
        self.assertIn("?pool=", reply.json()["error"])
        reply = self.post("/api/v1/servers/01/drain?pool=BALANCE_OTHER")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json()["pool"], "BALANCE_OTHER")
        self.assertEqual(other.pool.get("01").state, ServerState.DRAINING)
        self.assertEqual(self.h.service.pool.get("01").state, ServerState.UP)
        self.assertEqual(self.post("/api/v1/servers/01/drain?pool=BALANCE_NONE").status, 404)
        status = self.h.request("GET", "/api/v1/status").json()
        self.assertEqual([pool["section"] for pool in status["pools"]],
                         ["BALANCE_SMART_CLIENT_DESKTOP", "BALANCE_OTHER"])

    def test_drain_keeps_sessions_and_stops_new_ones(self) -> None:
        """Drain: the existing session carries on, new sessions go elsewhere; ready puts it back."""
        first = self.h.open_session()
        self.assertEqual(first.backend.server_id, "01")
        reply = self.post("/api/v1/servers/01/drain")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json()["server"]["state"], "draining")
        self.assertFalse(first.ended)
        second = self.h.open_session(50001)
        third = self.h.open_session(50002)
        self.assertEqual((second.backend.server_id, third.backend.server_id), ("02", "02"))
        self.assertEqual(self.post("/api/v1/servers/01/ready").json()["server"]["state"], "up")
        self.assertEqual(self.h.open_session(50003).backend.server_id, "01")

    def test_down_is_not_undone_by_monitoring(self) -> None:
        """Down by an admin holds against a healthy monitor verdict until ready."""
        self.post("/api/v1/servers/02/down")
        self.h.service.pool.monitor_verdict("02", ServerState.UP, "probe ok")
        self.assertEqual(self.h.service.pool.get("02").state, ServerState.DOWN)
        self.post("/api/v1/servers/02/ready")
        self.h.service.pool.monitor_verdict("02", ServerState.DOWN, "probe failed")
        self.assertEqual(self.h.service.pool.get("02").state, ServerState.DOWN)

    def test_unknown_server_404(self) -> None:
        """An action on a server not in the pool is 404 naming it."""
        reply = self.post("/api/v1/servers/99/drain")
        self.assertEqual(reply.status, 404)
        self.assertIn("'99'", reply.json()["error"])

    def test_close_session(self) -> None:
        """Close ends the session (both sides dropped) and it leaves the list."""
        session = self.h.open_session()
        self.assertEqual(self.post(f"/api/v1/sessions/{session.session_id}/close").status, 200)
        self.assertTrue(session.client.transport.disconnecting or session.client.transport.disconnected
                        if hasattr(session.client.transport, "disconnected") else True)
        session.client.connectionLost(Failure(ConnectionDone()))  # memory transports do not report it
        session.server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.h.request("GET", "/api/v1/sessions").json()["total"], 0)
        self.assertEqual(self.post(f"/api/v1/sessions/{session.session_id}/close").status, 404)

    def test_reload_applies_and_bad_reload_is_409(self) -> None:
        """Reload re-reads the file; a broken file is refused with its error and nothing changes."""
        self.h.write(ini("REMOTE_SERVER_03 = 127.0.0.1 5003\n"))
        self.assertEqual(self.post("/api/v1/reload").status, 200)
        self.assertEqual(len(self.h.service.pool), 3)
        self.h.write(ini("REMOTE_SERVER_04 = 127.0.0.1 nope\n"))
        reply = self.post("/api/v1/reload")
        self.assertEqual(reply.status, 409)
        self.assertIn("REMOTE_SERVER_04", reply.json()["error"])
        self.assertEqual(len(self.h.service.pool), 3)

    def test_reload_applies_token_now_and_warns_for_endpoint(self) -> None:
        """A new TOKEN_HASH applies at once (the old token stops working); a changed ENDPOINT is
        kept until a restart, which the log says."""
        other = "an-0ther-t0ken-for-tests-0123456789"
        logs = LogCatcher(self)
        self.h.write(ini(admin=f"[BROKER_ADMIN]\nENDPOINT = tcp:0:interface=127.0.0.1\n"
                               f"TOKEN_HASH = {hash_token(other, iterations=10_000)}\n"))
        self.assertEqual(self.post("/api/v1/reload").status, 200)
        self.assertEqual(self.post("/api/v1/servers/01/drain").status, 401)
        self.assertEqual(self.post("/api/v1/servers/01/drain", {"Authorization": f"Bearer {other}"}).status, 200)
        self.assertFalse([t for t in logs.texts() if "[BROKER_ADMIN]" in t])
        self.h.write(ini(admin=f"[BROKER_ADMIN]\nENDPOINT = tcp:9999:interface=127.0.0.1\n"
                               f"TOKEN_HASH = {hash_token(other, iterations=10_000)}\n"))
        self.assertEqual(self.post("/api/v1/reload", {"Authorization": f"Bearer {other}"}).status, 200)
        [warned] = [t for t in logs.texts() if "[BROKER_ADMIN]" in t]
        self.assertIn("restart to apply", warned)

    def test_actions_always_need_the_token(self) -> None:
        """From localhost too: no token 401, wrong token 401, other scheme 401."""
        self.assertEqual(self.post("/api/v1/servers/01/drain", {}).status, 401)
        self.assertEqual(self.post("/api/v1/servers/01/drain", {"Authorization": "Bearer wrong"}).status, 401)
        self.assertEqual(self.post("/api/v1/reload", {"Authorization": "Basic YTpi"}).status, 401)
        self.assertEqual(self.h.service.pool.get("01").state, ServerState.UP)

    def test_cross_site_origin_refused(self) -> None:
        """An Origin that is not the page's own is refused even with a token (CSRF)."""
        reply = self.post("/api/v1/servers/01/drain", {**self.h.auth(), "Origin": "http://evil.example"})
        self.assertEqual(reply.status, 403)
        reply = self.post("/api/v1/servers/01/drain", {**self.h.auth(), "Origin": "http://127.0.0.1:8480"})
        self.assertEqual(reply.status, 200)

    def test_no_token_hash_means_no_actions(self) -> None:
        """Without TOKEN_HASH the screen is read-only: actions are 403."""
        h = Harness(self, ini(admin="[BROKER_ADMIN]\nENDPOINT = tcp:0\n"))
        reply = h.request("POST", "/api/v1/reload", {"Authorization": "Bearer anything"})
        self.assertEqual(reply.status, 403)
        self.assertIn("TOKEN_HASH", reply.json()["error"])

    def test_wrong_tokens_are_rate_limited(self) -> None:
        """After 10 wrong tokens in 10 s from one address it answers 429 without hashing."""
        for _ in range(10):
            self.post("/api/v1/reload", {"Authorization": "Bearer wrong"})
        self.assertEqual(self.post("/api/v1/reload", {"Authorization": "Bearer wrong"}).status, 429)
        self.h.reactor.advance(11)
        self.assertEqual(self.post("/api/v1/reload").status, 200)


class PortStatusTests(SynchronousTestCase):
    def test_recogniser_decides_at_first_mismatch(self) -> None:
        """GET/HEAD of /ping, /status, /status.json is HTTP; anything else is SmartClient."""
        self.assertIsNone(recognise_status_request(b"GE"))
        self.assertIsNone(recognise_status_request(b"GET /sta"))
        self.assertTrue(recognise_status_request(b"GET /status HTTP/1.1"))
        self.assertTrue(recognise_status_request(b"HEAD /ping HTTP/1.0"))
        self.assertTrue(recognise_status_request(b"GET /status.json?x=1 HTTP/1.1"))
        self.assertFalse(recognise_status_request(b"GET /other HTTP/1.1"))
        self.assertFalse(recognise_status_request(b"GET /statusx"))
        self.assertFalse(recognise_status_request(b"\x00\x01"))
        self.assertFalse(recognise_status_request(b"POST /status"))

    def port_request(self, h: Harness, raw: bytes, peer: str = "127.0.0.1") -> bytes:
        protocol = h.service.factory.buildProtocol(None)
        self.assertIsInstance(protocol, FirstBytes)
        transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 1))
        transport.protocol = protocol
        protocol.makeConnection(transport)
        protocol.dataReceived(raw)
        return transport.value()

    def test_status_on_smartclient_port(self) -> None:
        """The SmartClient port answers /ping, /status and /status.json; no session is opened."""
        h = Harness(self)
        self.assertIn(b"pong", self.port_request(h, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"))
        text = Reply(self.port_request(h, b"GET /status HTTP/1.1\r\nHost: localhost:1234\r\n\r\n"))
        self.assertIn(b"server 01 127.0.0.1:5001 up connections 0", text.body)
        js = Reply(self.port_request(h, b"GET /status.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")).json()
        self.assertEqual(js["pools"][0]["servers"][0]["id"], "01")
        self.assertEqual(h.service.factory.sessions_total, 0)
        remote = Reply(self.port_request(h, b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n", peer="192.0.2.1"))
        self.assertEqual(remote.status, 401)

    def test_other_bytes_stay_smartclient(self) -> None:
        """A SmartClient's binary first bytes open a session as before."""
        h = Harness(self)
        self.port_request(h, b"\x01\x02binary")
        self.assertEqual(h.service.factory.sessions_total, 1)

    def test_port_status_off(self) -> None:
        """PORT_STATUS=0: no status-query recogniser (with RESUME_ENABLE=0 too, the port is plain
        SmartClient and new connections skip the first-bytes check)."""
        h = Harness(self, ini(admin="[BROKER_ADMIN]\nENDPOINT=tcp:0\nPORT_STATUS=0\n"))
        self.assertEqual([r.name for r in h.service.factory.recognisers], ["resumable"])
        h = Harness(self, ini("RESUME_ENABLE = 0\n", admin="[BROKER_ADMIN]\nENDPOINT=tcp:0\nPORT_STATUS=0\n"))
        self.assertEqual(h.service.factory.recognisers, [])
        h = Harness(self, ini("RESUME_ENABLE = 0\n"))
        self.assertEqual([r.name for r in h.service.factory.recognisers], ["http-status"])


class ConfigAndAuthTests(SynchronousTestCase):
    def test_defaults_and_absence(self) -> None:
        """No [BROKER_ADMIN]: no screen; present: default endpoint on localhost 8480."""
        self.assertIsNone(parse_config(ini(admin="")).admin)
        config = parse_config(ini(admin="[BROKER_ADMIN]\n")).admin
        assert config is not None
        self.assertEqual(config.endpoint, "tcp:8480:interface=127.0.0.1")
        self.assertIsNone(config.token_hash)
        self.assertTrue(any("no TOKEN_HASH" in w for w in parse_config(ini(admin="[BROKER_ADMIN]\n")).warnings))

    def test_bad_keys_are_one_line_errors(self) -> None:
        """Bad ENDPOINT, TOKEN_HASH, READ_ACCESS name the key and line."""
        for text, key in (("ENDPOINT = bogus:1", "ENDPOINT"), ("TOKEN_HASH = secret", "TOKEN_HASH"),
                          ("READ_ACCESS = everyone", "READ_ACCESS")):
            with self.assertRaises(ConfigError) as caught:
                parse_config(ini(admin=f"[BROKER_ADMIN]\n{text}\n"), "a.ini")
            self.assertIn(f"a.ini:8: {key}:", str(caught.exception))

    def test_unknown_admin_key_warns(self) -> None:
        """A misspelt key in [BROKER_ADMIN] is a warning."""
        config = parse_config(ini(admin="[BROKER_ADMIN]\nTOKEN_HAHS = x\n"))
        self.assertTrue(any("TOKEN_HAHS: unknown key" in w for w in config.warnings))

    def test_token_hash_roundtrip(self) -> None:
        """hash_token/TokenChecker: right token passes (again from cache), wrong fails."""
        checker = TokenChecker(TOKEN_HASH)
        self.assertTrue(checker.check(TOKEN))
        self.assertTrue(checker.check(TOKEN))
        self.assertFalse(checker.check(TOKEN + "x"))
        self.assertFalse(TokenChecker(None).check(TOKEN))
        self.assertEqual(parse_token_hash(TOKEN_HASH).iterations, 10_000)

    def test_origin_check(self) -> None:
        """Origin must equal the Host the browser used."""
        self.assertTrue(origin_matches(None, b"h:1"))
        self.assertTrue(origin_matches(b"http://h:1", b"h:1"))
        self.assertFalse(origin_matches(b"http://h:2", b"h:1"))
        self.assertFalse(origin_matches(b"null", b"h:1"))




WRONG = {"Authorization": "Bearer wrong-token-0123456789"}


class LockoutTests(SynchronousTestCase):
    """Finding 5: strangers sending wrong tokens cannot lock the admin out."""

    def setUp(self) -> None:
        self.h = Harness(self)

    def flood(self, peer: str, count: int = 25) -> list[int]:
        return [self.h.request("POST", "/api/v1/reload", WRONG, peer=peer).status for _ in range(count)]

    def test_wrong_tokens_from_one_address_do_not_limit_another(self) -> None:
        """25 wrong tokens from 192.0.2.66 are 401 then 429 for it alone; the right token, never
        verified before, is 200 from localhost and from another remote address."""
        statuses = self.flood("192.0.2.66")
        self.assertEqual((statuses[:10], set(statuses[10:])), ([401] * 10, {429}))
        self.assertEqual(self.h.request("POST", "/api/v1/reload", self.h.auth()).status, 200)
        self.assertEqual(self.h.request("GET", "/api/v1/status", self.h.auth(), peer="192.0.2.77").status, 200)

    def test_right_token_passes_from_a_limited_address(self) -> None:
        """Once the token verified, it is recognised before the limiter: 200 even from the
        address that is over its limit of wrong tokens."""
        self.assertEqual(self.h.request("GET", "/api/v1/status", self.h.auth(), peer="192.0.2.66").status, 200)
        self.assertEqual(self.flood("192.0.2.66")[-1], 429)
        for _ in range(25):
            self.assertEqual(self.h.request("POST", "/api/v1/reload", self.h.auth(), peer="192.0.2.66").status, 200)
            self.assertEqual(self.h.request("POST", "/api/v1/reload", WRONG, peer="192.0.2.66").status, 429)

    def test_limited_address_costs_no_hashing_and_recovers(self) -> None:
        """Over the limit a wrong token is 429 with Retry-After and no PBKDF2 is run; after the
        window it may try again."""
        self.flood("192.0.2.66", 10)
        ran = self.h.threads.ran
        reply = self.h.request("POST", "/api/v1/reload", WRONG, peer="192.0.2.66")
        self.assertEqual(reply.status, 429)
        self.assertEqual(reply.headers[b"retry-after"], b"10")
        self.assertIn("192.0.2.66", reply.json()["error"])
        self.assertEqual(self.h.threads.ran, ran)
        self.h.reactor.advance(10)
        self.assertEqual(self.h.request("POST", "/api/v1/reload", WRONG, peer="192.0.2.66").status, 401)

    def test_failure_table_is_bounded(self) -> None:
        """A sweep over 5,000 source addresses leaves at most 1,024 entries; an IPv6 /64 counts as
        one client; a right token is not counted."""
        limiter = FailureLimiter(limit=3, window=10.0, size=1024)
        for n in range(5000):
            limiter.attempt(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", 0.0)
        self.assertEqual(len(limiter), 1024)
        self.assertIsNone(limiter.retry_after("10.0.0.0", 0.0))  # the oldest were forgotten
        for n in range(3):
            limiter.attempt(f"2001:db8::{n + 1}", 1.0)
        self.assertEqual(limiter.retry_after("2001:db8::ffff", 2.0), 9.0)
        self.assertIsNone(limiter.retry_after("2001:db8:0:1::1", 2.0))
        limiter.forgive("2001:db8::3")
        self.assertIsNone(limiter.retry_after("2001:db8::3", 2.0))
        self.assertEqual(FailureLimiter.key("::ffff:192.0.2.1"), "192.0.2.1")

    def test_verification_does_not_block_other_requests(self) -> None:
        """While a token is being hashed (in a thread) the broker answers other requests; the
        waiting request is answered when the hash is done."""
        self.h.threads.synchronous = False
        protocol, waiting = self.h.connect(peer="192.0.2.66")
        self.h.send(protocol, "GET", "/api/v1/status", WRONG)
        self.assertEqual(waiting.value(), b"")
        self.assertEqual(len(self.h.threads.pending), 1)
        self.assertEqual(self.h.request("GET", "/api/v1/status").status, 200)
        self.assertEqual(self.h.request("GET", "/ping").status, 200)
        self.h.threads.run_pending()
        self.assertEqual(Reply(waiting.value()).status, 401)

    def test_verifications_in_flight_are_bounded(self) -> None:
        """One hash runs at a time and four wait; a sixth unknown token is 503 at once, while
        the known right token and tokenless reads are still served."""
        self.assertEqual(self.h.request("GET", "/api/v1/status", self.h.auth()).status, 200)
        self.h.threads.synchronous = False
        connections = []
        for n in range(5):
            protocol, transport = self.h.connect(peer=f"192.0.2.{n + 1}")
            self.h.send(protocol, "GET", "/api/v1/status", WRONG)
            connections.append(transport)
        self.assertEqual(len(self.h.threads.pending), 1)
        busy = self.h.request("GET", "/api/v1/status", WRONG, peer="192.0.2.99")
        self.assertEqual((busy.status, busy.headers[b"retry-after"]), (503, b"1"))
        self.assertEqual(self.h.request("GET", "/api/v1/status", self.h.auth(), peer="192.0.2.99").status, 200)
        self.assertEqual(self.h.request("GET", "/api/v1/status").status, 200)
        self.h.threads.run_pending()
        self.assertEqual([Reply(t.value()).status for t in connections], [401] * 5)
        self.assertEqual(self.h.threads.ran, 6)  # the right token once, the five wrong ones

    def test_client_gone_before_the_check_ends(self) -> None:
        """A client that disconnects while its token is hashed costs nothing more: no answer is
        written, nothing is logged as an error."""
        self.h.threads.synchronous = False
        protocol, transport = self.h.connect(peer="192.0.2.66")
        self.h.send(protocol, "POST", "/api/v1/reload", self.h.auth())
        protocol.connectionLost(Failure(ConnectionDone()))
        self.h.threads.run_pending()
        self.assertEqual(transport.value(), b"")

    def test_token_hash_iterations_are_bounded(self) -> None:
        """A TOKEN_HASH above 1,000,000 iterations is a one-line config error naming the key
        (2,000,000,000 would hold a core for most of an hour per check); 1,000,000 is accepted."""
        salt = "c2FsdHNhbHRzYWx0"
        digest = "A" * 43
        with self.assertRaises(ConfigError) as caught:
            parse_config(ini(admin=f"[BROKER_ADMIN]\nTOKEN_HASH = pbkdf2_sha256$2000000000${salt}${digest}\n"),
                         "a.ini")
        message = str(caught.exception)
        self.assertIn("a.ini:8: TOKEN_HASH: 2000000000 iterations is too many (at most 1000000", message)
        self.assertNotIn("\n", message)
        config = parse_config(ini(admin=f"[BROKER_ADMIN]\nTOKEN_HASH = pbkdf2_sha256$1000000${salt}${digest}\n"))
        self.assertEqual(parse_token_hash(config.admin.token_hash or "").iterations, 1_000_000)  # type: ignore[union-attr]


class ReactorThreadTests(TestCase):
    def test_real_thread_pool_checks_tokens(self) -> None:
        """The production runner hashes in the reactor's thread pool and reports back."""
        from twisted.internet import reactor

        verifier = Verifier(reactor_thread_runner(reactor))
        parsed = parse_token_hash(TOKEN_HASH)
        right = verifier.verify(parsed, TOKEN)
        wrong = verifier.verify(parsed, TOKEN + "x")
        return gatherResults([right, wrong]).addCallback(self.assertEqual, [True, False])


class HostTests(SynchronousTestCase):
    """Finding 5: a DNS-rebinding page cannot read or act through a browser on localhost."""

    def setUp(self) -> None:
        self.h = Harness(self)

    def test_rebinding_host_refused(self) -> None:
        """Host: evil.example (with or without port) gets 421 for reads, the page and actions,
        even from localhost with the token; nothing is done."""
        for path in ("/api/v1/sessions", "/api/v1/status", "/metrics", "/"):
            for host in ("evil.example", "evil.example:8480", "EVIL.example."):
                reply = self.h.request("GET", path, host=host)
                self.assertEqual(reply.status, 421, (path, host))
                self.assertIn("ALLOWED_HOSTS", reply.json()["error"])
        reply = self.h.request("POST", "/api/v1/servers/01/drain", self.h.auth(), host="evil.example")
        self.assertEqual(reply.status, 421)
        self.assertEqual(self.h.service.pool.get("01").state, ServerState.UP)

    def test_loopback_names_and_ip_literals_served(self) -> None:
        """localhost, 127.0.0.1, [::1] and other IP literals, with or without port, and no Host
        at all (not a browser) are answered."""
        for host in ("localhost", "localhost:8480", "127.0.0.1", "127.0.0.1:8480", "[::1]", "[::1]:8480",
                     "LocalHost.", "10.1.2.3:8480", None):
            self.assertEqual(self.h.request("GET", "/api/v1/sessions", host=host).status, 200, host)
        for host in ("[::1", "::1", "a b", "localhost:http", "\xff"):
            self.assertEqual(self.h.request("GET", "/api/v1/status", host=host).status, 421, host)

    def test_allowed_hosts_are_served_and_reloaded(self) -> None:
        """ALLOWED_HOSTS names are answered; a reload changes them at once; * allows any."""
        config = ini(admin=f"[BROKER_ADMIN]\nENDPOINT = tcp:0\nTOKEN_HASH = {TOKEN_HASH}\n"
                           "ALLOWED_HOSTS = broker.example.com, Screen.Example.\n")
        h = Harness(self, config)
        for host in ("broker.example.com", "BROKER.example.com:8480", "screen.example"):
            self.assertEqual(h.request("GET", "/api/v1/status", host=host).status, 200, host)
        self.assertEqual(h.request("GET", "/api/v1/status", host="other.example").status, 421)
        h.write(config.replace("Screen.Example.", "*"))
        self.assertEqual(h.request("POST", "/api/v1/reload", h.auth()).status, 200)
        self.assertEqual(h.request("GET", "/api/v1/status", host="other.example").status, 200)

    def test_bad_allowed_hosts_is_one_line_error(self) -> None:
        """An ALLOWED_HOSTS entry that is not a host name names the key and line."""
        with self.assertRaises(ConfigError) as caught:
            parse_config(ini(admin="[BROKER_ADMIN]\nALLOWED_HOSTS = ok.example, evil/path\n"), "a.ini")
        self.assertIn("a.ini:8: ALLOWED_HOSTS: 'evil/path' is not a host name", str(caught.exception))

    def test_port_status_checks_host_for_loopback_reads(self) -> None:
        """On the SmartClient port a loopback read with a foreign Host is 421; without Host (an
        HTTP/1.0 tool), with a token, or with READ_ACCESS=ANYWHERE any Host is answered."""
        site = [r for r in self.h.service.factory.recognisers if r.name == "http-status"][0].site
        self.assertEqual(self.h.request("GET", "/status", site=site, host="evil.example").status, 421)
        self.assertEqual(self.h.request("GET", "/status.json", site=site, host="evil.example").status, 421)
        self.assertEqual(self.h.request("GET", "/ping", site=site, host="evil.example").status, 200)
        self.assertEqual(self.h.request("GET", "/status", site=site, host=None).status, 200)
        self.assertEqual(self.h.request("GET", "/status", self.h.auth(), site=site, host="broker.lan",
                                        peer="192.0.2.5").status, 200)
        h = Harness(self, ini(admin="[BROKER_ADMIN]\nENDPOINT = tcp:0\nREAD_ACCESS = ANYWHERE\n"))
        site = [r for r in h.service.factory.recognisers if r.name == "http-status"][0].site
        self.assertEqual(h.request("GET", "/status", site=site, host="broker.lan", peer="192.0.2.5").status, 200)

    def test_host_parsing(self) -> None:
        """host_of: lower case, no port, no trailing dot, IPv6 without brackets; junk is None."""
        self.assertEqual(host_of(b"Broker.Example.:8480"), "broker.example")
        self.assertEqual(host_of(b"[::1]:80"), "::1")
        self.assertIsNone(host_of(b"[::1]x"))
        self.assertIsNone(host_of(b"[zz]"))
        self.assertIsNone(host_of(b":80"))
        self.assertFalse(host_allowed(b"127.0.0.1.nip.io", ()))
        self.assertTrue(host_allowed(b"127.0.0.1.nip.io", ("127.0.0.1.NIP.io",)))


class RequestLimitTests(SynchronousTestCase):
    """Finding 6: a refused body ends cleanly; a slow client is dropped."""

    def setUp(self) -> None:
        self.h = Harness(self)
        self.port_site = [r for r in self.h.service.factory.recognisers if r.name == "http-status"][0].site

    def test_refused_body_closes_without_unhandled_error(self) -> None:
        """A 413 on the admin port and on the SmartClient port's /status, then the connection
        ends: one status, no log line at all (it was "Unhandled Error: '_Discard' object has no
        attribute 'close'")."""
        logs = LogCatcher(self)
        protocol, transport = self.h.connect(peer="192.0.2.7")
        self.h.send(protocol, "POST", "/api/v1/reload", body=b"x" * (70 * 1024))
        self.assertEqual(Reply(transport.value()).status, 413)
        protocol.connectionLost(Failure(ConnectionDone()))
        port = self.h.service.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 1))
        transport.protocol = port
        port.makeConnection(transport)
        port.dataReceived(b"GET /status HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertEqual(Reply(transport.value()).status, 413)
        self.assertIsNot(transport.protocol, port)  # handed to the HTTP site
        transport.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(logs.texts(), [])

    def test_slow_request_is_dropped(self) -> None:
        """One byte every 5 s (each byte resets twisted's idle timeout) on either site: the
        connection is closed 10 s after it opened, and aborted 15 s later if still open."""
        for site in (self.h.admin.site, self.port_site):
            protocol, transport = self.h.connect(peer="192.0.2.7", site=site)
            aborted: list[bool] = []
            transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
            opened = self.h.reactor.seconds()
            protocol.dataReceived(b"GET /status HTTP/1.1\r\n")
            while self.h.reactor.seconds() - opened < 60:
                self.h.reactor.advance(5)
                if transport.disconnecting:
                    break
                protocol.dataReceived(b"X")
            self.assertEqual(self.h.reactor.seconds() - opened, 10.0)
            self.h.reactor.advance(15)
            self.assertEqual(aborted, [True])
            protocol.connectionLost(Failure(ConnectionDone()))

    def test_kept_alive_connection_gets_a_fresh_deadline(self) -> None:
        """An answered request on a kept-alive connection: the link may idle (30 s) and the next
        request has its own 10 s; a complete request is never cut by the deadline."""
        protocol, transport = self.h.connect()
        self.h.send(protocol, "GET", "/api/v1/status", close=False)
        self.assertEqual(Reply(transport.value()).status, 200)
        transport.clear()
        self.h.reactor.advance(30)
        self.assertFalse(transport.disconnecting)
        self.h.send(protocol, "GET", "/ping", close=False)
        self.assertEqual(Reply(transport.value()).status, 200)
        self.h.reactor.advance(60)
        self.assertTrue(transport.disconnecting)  # the idle timeout
        protocol.connectionLost(Failure(ConnectionDone()))
