"""TLS termination and upstream TLS over real sockets on 127.0.0.1 (port 0), in this process."""

from __future__ import annotations

import hashlib
import os
import socket
from typing import Any, Callable

from twisted.internet import defer, reactor, ssl, task
from twisted.internet.protocol import ClientCreator, Factory, ProcessProtocol, Protocol
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from protheus_broker.balancing.methods import ConnectionBalancer
from protheus_broker.config import load_config
from protheus_broker.balancing.pool import ServerPool, ServerState
from protheus_broker.desktop.lifecycle import SessionState
from protheus_broker.desktop.proxy import BrokerFactory
from protheus_broker.desktop.tls import SessionTLS
from protheus_broker.tap import BrokerService
from protheus_broker.sim.appserver import AppServerSimFactory, greeting
from protheus_broker.sim.tap import tls_factory
from protheus_broker.tls.settings import SessionTLSConfig, TLSIdentity

from .helpers import LogCatcher, servers
from .test_proxy_sockets import MB, Peer, expected_digest
from .tls_fixtures import certs


class Reader(Peer):
    """A peer that sends *size* bytes without half-closing and fires *complete* once it has
    received *expect* bytes (TLS has no half-close: the test closes when both are done)."""

    def __init__(self, send_seed: int | None = None, send_size: int = 0, expect: int = 1) -> None:
        super().__init__(send_seed=send_seed, send_size=send_size, half_close=False)
        self.expect = expect
        self.complete: defer.Deferred[Reader] = defer.Deferred()
        self.head = b""  # the first bytes received, for messages

    def dataReceived(self, data: bytes) -> None:
        if len(self.head) < 200:
            self.head += data[:200]
        super().dataReceived(data)
        if self.received >= self.expect and not self.complete.called:
            self.complete.callback(self)


def identity(name: str) -> TLSIdentity:
    return TLSIdentity(certs().cert(name), certs().key(name))


class TrackedSim(AppServerSimFactory):
    """A sample AppServer that says when its last connection has closed."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        self._open = 0
        self.waiters: list[defer.Deferred[None]] = []
        super().__init__(name, **kwargs)

    @property
    def open_sessions(self) -> int:  # type: ignore[override]
        return self._open

    @open_sessions.setter
    def open_sessions(self, value: int) -> None:
        self._open = value
        if value == 0:
            waiters, self.waiters = self.waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def idle(self) -> defer.Deferred[None]:
        if self._open == 0:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self.waiters.append(waiter)
        return waiter


def broker_idle(factory: BrokerFactory) -> defer.Deferred[None]:
    """Fires once *factory* has no open session (each ended session has closed both sides)."""
    if not factory.sessions:
        return defer.succeed(None)
    waiter: defer.Deferred[None] = defer.Deferred()
    ended = factory.session_ended

    def session_ended(session: Any, how: str) -> None:
        ended(session, how)
        if not factory.sessions and not waiter.called:
            waiter.callback(None)

    factory.session_ended = session_ended  # type: ignore[method-assign]
    return waiter


def logged(test: TestCase, match: Callable[[LogEvent], bool]) -> defer.Deferred[LogEvent]:
    """Fires with the first log event from now on that *match* accepts (during *test*)."""
    seen: defer.Deferred[LogEvent] = defer.Deferred()

    def observe(event: LogEvent) -> None:
        if not seen.called and match(event):
            seen.callback(event)

    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return seen


def tls_failure(event: LogEvent) -> bool:
    return bool(event.get("tls_failure"))


class OpenSSLClient(ProcessProtocol):
    """``openssl s_client``: what it prints, and when it has printed something or ended."""

    def __init__(self) -> None:
        self.output = b""
        self.waiting: list[tuple[bytes, defer.Deferred[None]]] = []
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for item in list(self.waiting):
            if item[0] in self.output:
                self.waiting.remove(item)
                item[1].callback(None)

    errReceived = outReceived

    def printed(self, text: bytes) -> defer.Deferred[None]:
        waiter: defer.Deferred[None] = defer.Deferred()
        if text in self.output:
            waiter.callback(None)
        else:
            self.waiting.append((text, waiter))
        return waiter

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


class TLSSocketCase(TestCase):
    """Brokers, sample AppServers and TLS clients on 127.0.0.1; all closed before the test ends."""

    timeout = 30

    def setUp(self) -> None:
        self.sims: list[TrackedSim] = []
        self.brokers: list[BrokerFactory] = []
        self.addCleanup(self.settle)

    def settle(self) -> defer.Deferred[Any]:
        """Wait (bounded) until every broker session and sample AppServer connection closed."""
        waits = [broker_idle(b) for b in self.brokers] + [s.idle() for s in self.sims]
        return defer.gatherResults(waits).addTimeout(5, reactor)

    def listen(self, factory: Any) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def sim(self, name: str) -> int:
        factory = TrackedSim(name)
        self.sims.append(factory)
        return self.listen(factory)

    def tls_sim(self, name: str, cert: str, **kwargs: Any) -> int:
        c = certs()
        factory = TrackedSim(name, **kwargs)
        self.sims.append(factory)
        return self.listen(tls_factory(factory, c.cert(cert), c.key(cert)))

    def broker(self, ports: list[int], config: SessionTLSConfig) -> tuple[BrokerFactory, SessionTLS, int]:
        factory = BrokerFactory(reactor, ServerPool(servers(*ports), ConnectionBalancer()),
                                sort_method="CONNECTION")
        self.brokers.append(factory)
        tls = SessionTLS(reactor, config, factory)
        return factory, tls, self.listen(tls.listening_factory())

    async def tls_client(self, port: int, options: Any, expect: int = 1) -> Reader:
        client = Reader(expect=expect)
        await ClientCreator(reactor, lambda: client).connectSSL("127.0.0.1", port, options)
        return client

    async def greeted(self, port: int, options: Any, name: str, number: int = 1) -> Reader:
        client = await self.tls_client(port, options, expect=len(greeting(name, number)))
        await client.complete
        return client

    async def rejected(self, port: int, options: Any) -> Reader:
        client = await self.tls_client(port, options)
        await client.done
        self.assertEqual(client.received, 0)
        return client

    def subject_cn(self, transport: Any) -> str:
        return transport.getPeerCertificate().get_subject().CN  # type: ignore[no-any-return]


class SessionTLSTests(TLSSocketCase):
    """Termination and upstream TLS."""

    @defer.inlineCallbacks
    def test_termination_serves_broker_certificate(self) -> Any:
        """With termination the client sees the broker's certificate and reaches a plain AppServer."""
        backend = self.sim("plain")
        _, _, port = self.broker([backend], SessionTLSConfig(server=identity("broker")))
        client = yield defer.ensureDeferred(self.greeted(port, certs().client_options(), "plain"))
        self.assertEqual(client.digest.digest(), hashlib.sha256(greeting("plain", 1)).digest())
        self.assertEqual(self.subject_cn(client.transport), "broker")
        client.transport.loseConnection()
        yield client.done

    @defer.inlineCallbacks
    def test_fifty_megabytes_through_termination_and_upstream(self) -> Any:
        """50 MB each way through TLS termination and TLS upstream arrive byte-exact."""
        size = 50 * MB
        made: defer.Deferred[Reader] = defer.Deferred()

        def make_server() -> Reader:
            peer = Reader(send_seed=12, send_size=size, expect=size)
            made.callback(peer)
            return peer

        c = certs()
        backend = self.listen(tls_factory(Factory.forProtocol(make_server), c.cert("appserver"),
                                          c.key("appserver")))
        factory, _, port = self.broker([backend], SessionTLSConfig(
            server=identity("broker"), upstream=True, upstream_ca=c.ca_path))
        client = Reader(send_seed=11, send_size=size, expect=size)
        yield ClientCreator(reactor, lambda: client).connectSSL("127.0.0.1", port, c.client_options())
        server = yield made
        yield client.complete
        yield server.complete
        self.assertEqual(client.digest.hexdigest(), expected_digest(12, size))
        self.assertEqual(server.digest.hexdigest(), expected_digest(11, size))
        client.transport.loseConnection()
        yield server.done
        self.assertEqual(factory.handshake_failures, 0)

    @defer.inlineCallbacks
    def test_upstream_bad_certificates_fail_over(self) -> Any:
        """AppServers with a foreign CA, a wrong name and an expired certificate are refused with
        a logged reason and the session fails over to the good one."""
        c = certs()
        ports = [self.tls_sim("foreign", "foreign"), self.tls_sim("wrongname", "wrong-name"),
                 self.tls_sim("expired", "expired"), self.tls_sim("good", "appserver")]
        logs = LogCatcher(self)
        factory, _, port = self.broker(ports, SessionTLSConfig(upstream=True, upstream_ca=c.ca_path))
        client = Reader(expect=len(greeting("good", 1)))
        yield ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port)
        yield client.complete
        self.assertEqual(client.head, greeting("good", 1))
        self.assertEqual(factory.handshake_failures, 3)
        failures = [e for e in logs.events if e.get("tls_failure")]
        self.assertEqual([e["side"] for e in failures], ["AppServer"] * 3)
        whys = [e["why"].lower() for e in failures]
        self.assertIn("certificate verify failed", whys[0])
        self.assertIn("not for 127.0.0.1 (it names appserver.example)", whys[1])
        self.assertIn("unable to get local issuer certificate", whys[0])
        self.assertIn("expired", whys[2])
        self.assertEqual([b.connect_failures for b in factory.pool], [1, 1, 1, 0])
        client.transport.loseConnection()
        yield client.done

    @defer.inlineCallbacks
    def test_upstream_client_certificate(self) -> Any:
        """An AppServer that requires a client certificate gets SSL_UPSTREAM_CERTIFICATE; a broker
        without one fails its handshake there (logged) and the session fails over."""
        c = certs()

        def strict(name: str) -> int:
            factory = TrackedSim(name)
            self.sims.append(factory)
            return self.listen(tls_factory(factory, c.cert("appserver"), c.key("appserver"), c.ca_path))

        with_cert, _, port = self.broker([strict("strict")], SessionTLSConfig(
            upstream=True, upstream_ca=c.ca_path, upstream_identity=identity("client")))
        client = Reader(expect=len(greeting("strict", 1)))
        yield ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port)
        yield client.complete
        self.assertEqual(client.head, greeting("strict", 1))
        client.transport.loseConnection()
        yield client.done

        without, _, port = self.broker([strict("strict2"), self.tls_sim("open", "appserver")],
                                       SessionTLSConfig(upstream=True, upstream_ca=c.ca_path))
        failed = logged(self, tls_failure)
        client = Reader(expect=len(greeting("open", 1)))
        yield ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port)
        event = yield failed
        self.assertEqual(event["side"], "AppServer")
        yield client.complete
        self.assertEqual(client.head, greeting("open", 1))
        self.assertEqual((with_cert.handshake_failures, without.handshake_failures), (0, 1))
        client.transport.loseConnection()
        yield client.done

    @defer.inlineCallbacks
    def test_upstream_verification_off(self) -> Any:
        """SSL_UPSTREAM_VERIFY=0 accepts an AppServer certificate from an unknown CA."""
        _, _, port = self.broker([self.tls_sim("foreign", "foreign")],
                                 SessionTLSConfig(upstream=True, upstream_verify=False))
        client = Reader(expect=len(greeting("foreign", 1)))
        yield ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port)
        yield client.complete
        client.transport.loseConnection()
        yield client.done

    @defer.inlineCallbacks
    def test_client_certificate_required(self) -> Any:
        """With SSL_REQUIRE_CLIENT_CERT a client without a certificate is rejected (logged,
        counted) and one with a CA-signed certificate is served."""
        c = certs()
        backend = self.sim("sim")
        factory, _, port = self.broker([backend], SessionTLSConfig(
            server=identity("broker"), client_ca=c.ca_path, require_client_cert=True))
        failed = logged(self, tls_failure)
        yield defer.ensureDeferred(self.rejected(port, c.client_options()))
        event = yield failed
        self.assertEqual(factory.handshake_failures, 1)
        self.assertEqual(event["side"], "client")
        self.assertIn("certificate", event["why"].lower())
        self.assertEqual(factory.sessions_total, 0)  # no AppServer connection for it
        client = yield defer.ensureDeferred(self.greeted(port, c.client_options(client="client"), "sim"))
        client.transport.loseConnection()
        yield client.done

    @defer.inlineCallbacks
    def test_client_trusting_another_ca_is_refused_and_others_served(self) -> Any:
        """A client that does not trust the broker's CA fails its handshake; the broker logs it
        and serves the next client."""
        c = certs()
        backend = self.sim("sim")
        factory, _, port = self.broker([backend], SessionTLSConfig(server=identity("broker")))
        failed = logged(self, tls_failure)
        yield defer.ensureDeferred(self.rejected(port, c.client_options(ca=c.other_ca_path)))
        event = yield failed
        self.assertEqual(factory.handshake_failures, 1)
        self.assertIn("unknown ca", event["why"].lower())
        client = yield defer.ensureDeferred(self.greeted(port, c.client_options(), "sim"))
        client.transport.loseConnection()
        yield client.done

    @defer.inlineCallbacks
    def test_stalled_handshake_times_out(self) -> Any:
        """A client that sends half a ClientHello and stalls is closed after SSL_HANDSHAKE_TIMEOUT."""
        backend = self.sim("sim")
        logs = LogCatcher(self)
        factory, _, port = self.broker([backend], SessionTLSConfig(server=identity("broker"),
                                                                  handshake_timeout=0.2))
        closed: defer.Deferred[None] = defer.Deferred()

        class Staller(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a truncated hello

            def connectionLost(self, reason: Any = None) -> None:
                closed.callback(None)

        started = reactor.seconds()
        yield ClientCreator(reactor, Staller).connectTCP("127.0.0.1", port)
        yield closed
        self.assertGreaterEqual(reactor.seconds() - started, 0.15)
        self.assertEqual(factory.handshake_failures, 1)
        [event] = [e for e in logs.events if e.get("tls_failure")]
        self.assertIn("SSL_HANDSHAKE_TIMEOUT=0.2s", event["why"])
        self.assertEqual(factory.sessions_total, 0)

    @defer.inlineCallbacks
    def test_port_probe_is_not_a_handshake_failure(self) -> Any:
        """A connection closed without sending a byte (a port probe) is not counted or warned;
        one that sends garbage instead of a ClientHello is."""
        backend = self.sim("sim")
        logs = LogCatcher(self)
        factory, _, port = self.broker([backend], SessionTLSConfig(server=identity("broker")))
        closed: list[defer.Deferred[None]] = []

        class Probe(Protocol):
            def __init__(self, payload: bytes) -> None:
                self.payload = payload
                self.lost: defer.Deferred[None] = defer.Deferred()
                closed.append(self.lost)

            def connectionMade(self) -> None:
                if self.payload:
                    self.transport.write(self.payload)
                else:
                    self.transport.loseConnection()

            def connectionLost(self, reason: Any = None) -> None:
                self.lost.callback(None)

        yield ClientCreator(reactor, Probe, b"").connectTCP("127.0.0.1", port)
        yield closed[-1]
        failed = logged(self, tls_failure)
        yield ClientCreator(reactor, Probe, b"GET / HTTP/1.0\r\n\r\n").connectTCP("127.0.0.1", port)
        event = yield failed
        yield closed[-1]
        self.assertEqual(factory.handshake_failures, 1)
        self.assertEqual(len([e for e in logs.events if e.get("tls_failure")]), 1)
        self.assertIn("http request", event["why"].lower())

    @defer.inlineCallbacks
    def test_reload_swaps_certificate_keeping_sessions(self) -> Any:
        """A reload with a new certificate: new handshakes get it, an open session keeps echoing."""
        c = certs()
        backend = self.sim("sim")
        factory, tls, port = self.broker([backend], SessionTLSConfig(server=identity("broker")))
        first = yield defer.ensureDeferred(self.greeted(port, c.client_options(), "sim"))
        self.assertEqual(self.subject_cn(first.transport), "broker")
        tls.reload(SessionTLSConfig(server=identity("broker2")))
        second = yield defer.ensureDeferred(self.greeted(port, c.client_options(), "sim", 2))
        self.assertEqual(self.subject_cn(second.transport), "broker2")
        first.expect = first.received + 5
        first.complete = defer.Deferred()
        first.transport.write(b"hello")
        yield first.complete  # echoed through the session opened before the reload
        self.assertEqual(len(factory.sessions), 2)
        for client in (first, second):
            client.transport.loseConnection()
            yield client.done

    def test_terminated_session_waits_for_a_server_then_connects(self) -> Any:
        """With TLS both ways and WAIT_FOR_SERVER, a client that arrives while no AppServer is
        up waits (handshake done, paused), then is served by the AppServer that comes up."""
        c = certs()
        backend = self.tls_sim("tls", "appserver")
        factory, _, port = self.broker([backend], SessionTLSConfig(
            server=identity("broker"), upstream=True, upstream_ca=c.ca_path))
        factory.wait_for_server = 20.0
        factory.pool.set_state("01", ServerState.DOWN, "monitor: refused")

        async def scenario() -> None:
            client = await self.tls_client(port, c.client_options(), expect=len(greeting("tls", 1)))
            while not any(s.state is SessionState.WAITING for s in factory.sessions.values()):
                await task.deferLater(reactor, 0.01, lambda: None)
            self.assertEqual(client.received, 0)
            factory.pool.set_state("01", ServerState.UP, "monitor: answered")
            await client.complete
            self.assertEqual(client.digest.digest(), hashlib.sha256(greeting("tls", 1)).digest())
            client.transport.loseConnection()
            await client.done
            self.assertEqual(factory.sessions_failed, 0)

        return defer.ensureDeferred(scenario())

    def test_refused_port_is_plain_failover(self) -> None:
        """Sanity: a closed port under upstream TLS is an ordinary connect failure (not a
        handshake failure)."""
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        self.addCleanup(dead.close)
        factory, _, port = self.broker([dead.getsockname()[1]], SessionTLSConfig(upstream=True))

        async def scenario() -> None:
            client = Reader()
            await ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port)
            await client.done
            self.assertEqual(client.received, 0)
            self.assertEqual(factory.handshake_failures, 0)
            self.assertEqual(factory.sessions_failed, 1)

        return defer.ensureDeferred(scenario())  # type: ignore[return-value]


class PassthroughTests(TLSSocketCase):
    """No TLS keys: the client's TLS goes to the AppServer untouched, balancing still works."""

    @defer.inlineCallbacks
    def test_twisted_client_sees_appserver_certificate(self) -> Any:
        """Twisted's TLS client through a passthrough broker verifies and sees the AppServer's
        certificate, and sessions are balanced over two TLS AppServers."""
        ports = [self.tls_sim("a", "appserver"), self.tls_sim("b", "appserver")]
        factory, _, port = self.broker(ports, SessionTLSConfig())
        first = yield defer.ensureDeferred(self.greeted(port, certs().client_options(), "a"))
        second = yield defer.ensureDeferred(self.greeted(port, certs().client_options(), "b"))
        self.assertEqual(first.head, greeting("a", 1))
        self.assertEqual(second.head, greeting("b", 1))
        self.assertEqual(self.subject_cn(first.transport), "appserver")
        self.assertEqual(factory.handshake_failures, 0)
        for client in (first, second):
            client.transport.loseConnection()
            yield client.done

    @defer.inlineCallbacks
    def test_openssl_s_client_sees_appserver_certificate(self) -> Any:
        """``openssl s_client`` through a passthrough broker verifies the AppServer's certificate
        (CA and IP) and its data is echoed back."""
        backend = self.tls_sim("tlsapp", "appserver")
        _, _, port = self.broker([backend], SessionTLSConfig())
        client = OpenSSLClient()
        process = reactor.spawnProcess(client, "openssl", [
            "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", certs().ca_path,
            "-verify_return_error", "-verify_ip", "127.0.0.1"], env=os.environ)

        def kill() -> None:
            if not client.ended.called:
                process.signalProcess("KILL")

        self.addCleanup(lambda: client.ended)
        self.addCleanup(kill)
        yield client.printed(greeting("tlsapp", 1))
        self.assertIn(b"Verify return code: 0 (ok)", client.output)
        self.assertRegex(client.output.decode(), r"subject=.*CN = appserver\n")
        process.write(b"ping-through-the-broker\n")
        yield client.printed(b"ping-through-the-broker")
        process.closeStdin()  # s_client ends the session and exits
        yield client.ended


class TerminationPolicyTests(TLSSocketCase):
    """Minimum TLS version, the verification-off warning, and reload through the service."""

    @defer.inlineCallbacks
    def test_min_version_refuses_older_clients(self) -> Any:
        """SSL_MIN_VERSION=TLS1.3: a TLS 1.2-only client is refused with a logged reason, a
        TLS 1.3 client is served."""
        c = certs()
        backend = self.sim("sim")
        factory, _, port = self.broker([backend], SessionTLSConfig(server=identity("broker"),
                                                                   min_version="1.3"))
        with open(c.ca_path, "rb") as handle:
            trust = ssl.Certificate.loadPEM(handle.read())
        old = ssl.optionsForClientTLS("127.0.0.1", trustRoot=trust, extraCertificateOptions={
            "lowerMaximumSecurityTo": ssl.TLSVersion.TLSv1_2})
        failed = logged(self, tls_failure)
        yield defer.ensureDeferred(self.rejected(port, old))
        event = yield failed
        self.assertIn("unsupported protocol", event["why"].lower())
        self.assertEqual(factory.sessions_total, 0)
        self.assertEqual(factory.handshake_failures, 1)
        client = yield defer.ensureDeferred(self.greeted(port, c.client_options(), "sim"))
        self.assertEqual(client.transport.getHandle().get_protocol_version_name(), "TLSv1.3")
        client.transport.loseConnection()
        yield client.done

    @defer.inlineCallbacks
    def test_weak_ciphers_refused(self) -> Any:
        """A TLS 1.2 client offering only a CBC suite without AEAD is refused; the broker serves
        the next client."""
        c = certs()
        backend = self.sim("sim")
        factory, _, port = self.broker([backend], SessionTLSConfig(server=identity("broker")))
        with open(c.ca_path, "rb") as handle:
            trust = ssl.Certificate.loadPEM(handle.read())
        weak = ssl.optionsForClientTLS("127.0.0.1", trustRoot=trust, extraCertificateOptions={
            "lowerMaximumSecurityTo": ssl.TLSVersion.TLSv1_2,
            "acceptableCiphers": ssl.AcceptableCiphers.fromOpenSSLCipherString("ECDHE-ECDSA-AES128-SHA")})
        failed = logged(self, tls_failure)
        yield defer.ensureDeferred(self.rejected(port, weak))
        event = yield failed
        # Twisted 22.4's client ends up offering no TLS 1.2 suite at all: "unsupported protocol"
        self.assertTrue({"no shared cipher", "unsupported protocol"} & {event["why"].lower()}, event["why"])
        client = yield defer.ensureDeferred(self.greeted(port, c.client_options(), "sim"))
        client.transport.loseConnection()
        yield client.done

    def test_verification_off_warns_at_startup(self) -> None:
        """SSL_UPSTREAM_VERIFY=0 is said at startup as a warning and in the startup line."""
        factory = BrokerFactory(reactor, ServerPool(servers(1), ConnectionBalancer()))
        logs = LogCatcher(self)
        tls = SessionTLS(reactor, SessionTLSConfig(upstream=True, upstream_verify=False), factory)
        tls.warn_at_startup()
        [warning] = [t for t in logs.texts() if "SSL_UPSTREAM_VERIFY=0" in t]
        self.assertIn("NOT checked", warning)
        self.assertEqual(tls.describe(), "TLS passthrough, TLS to AppServers NOT VERIFIED")
        verified = SessionTLS(reactor, SessionTLSConfig(upstream=True, upstream_ca=certs().ca_path),
                              factory)
        verified.warn_at_startup()
        self.assertEqual(len([t for t in logs.texts() if "SSL_UPSTREAM_VERIFY" in t]), 1)

    def start_service(self, ini: str) -> tuple[BrokerService, int]:
        path = os.path.join(os.path.abspath(self.mktemp()), "appserver.ini")
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as handle:
            handle.write(ini)
        service = BrokerService(reactor, load_config(path))
        self.brokers.append(service.factory)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        return service, service.port.getHost().port

    @defer.inlineCallbacks
    def test_service_reload_rereads_certificates_keeping_sessions(self) -> Any:
        """BrokerService.reload() (SIGHUP) re-reads the certificate files: new handshakes get the
        new certificate, an open TLS session keeps working; a bad new file is refused with the
        running certificate kept."""
        c = certs()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert, key = os.path.join(directory, "broker.pem"), os.path.join(directory, "broker.key")

        def install(name: str) -> None:
            for source, target in ((c.cert(name), cert), (c.key(name), key)):
                with open(source, "rb") as src, open(target, "wb") as dst:
                    dst.write(src.read())

        install("broker")
        backend = self.sim("sim")
        service, port = self.start_service(
            "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
            f"SORT_METHOD = CONNECTION\nMONITORING_TYPE = DISABLED\nREMOTE_SERVER_01 = 127.0.0.1 {backend}\n"
            f"SSL_CERTIFICATE = {cert}\nSSL_KEY = {key}\n")
        first = yield defer.ensureDeferred(self.greeted(port, c.client_options(), "sim"))
        self.assertEqual(self.subject_cn(first.transport), "broker")

        install("broker2")
        self.assertTrue(service.reload())
        second = yield defer.ensureDeferred(self.greeted(port, c.client_options(), "sim", 2))
        self.assertEqual(self.subject_cn(second.transport), "broker2")
        first.expect, first.complete = first.received + 5, defer.Deferred()
        first.transport.write(b"hello")
        yield first.complete  # echoed through the session opened before the reload

        install("expired")
        logs = LogCatcher(self)
        self.assertFalse(service.reload())
        [refused] = [t for t in logs.texts() if "reload refused" in t]
        self.assertIn(cert, refused)
        self.assertIn("expired", refused)
        third = yield defer.ensureDeferred(self.greeted(port, c.client_options(), "sim", 3))
        self.assertEqual(self.subject_cn(third.transport), "broker2")
        for client in (first, second, third):
            client.transport.loseConnection()
            yield client.done
