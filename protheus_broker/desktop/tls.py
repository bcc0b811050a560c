"""TLS for SmartClient sessions: termination on the SmartClient port and TLS to the AppServers.

Passthrough needs nothing here: a ClientHello is just a plain client's first bytes.

*Termination*: the listener is a :class:`TerminatingFactory`; each connection starts as a
:class:`HandshakeGate`, which only after a completed handshake hands the (decrypted) transport to
the broker's own protocol (``FirstBytes`` or ``ClientSide``), so a client that fails or stalls its
handshake never costs an AppServer connection.  The server context is read through
:class:`ReloadableServerContext`, swapped on SIGHUP: open sessions keep theirs.

*Upstream*: :class:`UpstreamTLS` wraps a session's connection to an AppServer in TLS, checking
the AppServer's certificate against the CA and its ``REMOTE_SERVER`` host name or IP
(service-identity).  The session only links the two sides after the handshake; a failed handshake
is a failed connection, so the session fails over to the next AppServer.

Handshake failures (either side) are logged with their reason and counted in
``BrokerFactory.handshake_failures``.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from dataclasses import dataclass, replace
from typing import Any

import service_identity
import service_identity.cryptography
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IPushProducer,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from protheus_broker.ini import ConfigError
from protheus_broker.balancing.pool import Backend
from protheus_broker.desktop.proxy import BrokerFactory, PendingToken, ServerSide, Session
from protheus_broker.sockets import tune
from protheus_broker.tls.settings import SessionTLSConfig, TLSIdentity

log = Logger()

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
#: TLS 1.2 suites offered on the SmartClient port: forward secrecy and AEAD only (TLS 1.3 suites
#: are all of that kind and are not affected).
SERVER_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!MD5:!DSS"

_PEM_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


# --- loading and checking PEM files ------------------------------------------------------------

def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror or exc}", key=key) from None


def _not_after(cert: x509.Certificate) -> datetime.datetime:
    value = getattr(cert, "not_valid_after_utc", None)  # cryptography >= 42
    if value is None:
        value = cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    return value  # type: ignore[no-any-return]


def _not_before(cert: x509.Certificate) -> datetime.datetime:
    value = getattr(cert, "not_valid_before_utc", None)
    if value is None:
        value = cert.not_valid_before.replace(tzinfo=datetime.timezone.utc)
    return value  # type: ignore[no-any-return]


def load_certificates(path: str, key: str, check_dates: bool = True) -> list[x509.Certificate]:
    """Every certificate in the PEM file at *path* (first the leaf, then its chain); a file
    without one, with a broken one, or (with *check_dates*) an expired or not yet valid one is a
    :class:`ConfigError` naming the file."""
    blocks = _PEM_CERT_RE.findall(_read(path, key))
    if not blocks:
        raise ConfigError(path, "no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)", key=key)
    certificates = []
    for number, block in enumerate(blocks, start=1):
        try:
            certificates.append(x509.load_pem_x509_certificate(block))
        except ValueError as exc:
            raise ConfigError(path, f"certificate {number} is not valid PEM: {exc}", key=key) from None
    if check_dates:
        now = datetime.datetime.now(datetime.timezone.utc)
        for cert in certificates:
            subject = cert.subject.rfc4514_string()
            if _not_after(cert) < now:
                raise ConfigError(path, f"certificate {subject!r} expired on "
                                        f"{_not_after(cert):%Y-%m-%d %H:%M} UTC", key=key)
            if _not_before(cert) > now:
                raise ConfigError(path, f"certificate {subject!r} is not valid before "
                                        f"{_not_before(cert):%Y-%m-%d %H:%M} UTC", key=key)
    return certificates


def _public(value: Any) -> bytes:
    return value.public_key().public_bytes(serialization.Encoding.DER,  # type: ignore[no-any-return]
                                           serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(identity: TLSIdentity, leaf: x509.Certificate) -> Any:
    """The private key of *identity*, decrypted with its passphrase and checked to belong to
    *leaf*; every problem is a :class:`ConfigError` naming the key file."""
    path, key_name = identity.key, identity.key_key
    data = _read(path, key_name)
    try:
        key = serialization.load_pem_private_key(data, password=identity.passphrase)
    except TypeError as exc:
        if identity.passphrase:
            raise ConfigError(path, "the key is not encrypted but a passphrase is set", key=key_name) from None
        raise ConfigError(path, f"the key is encrypted: a passphrase is needed ({exc})", key=key_name) from None
    except ValueError as exc:
        if identity.passphrase and b"ENCRYPTED" in data:
            raise ConfigError(path, "wrong passphrase (cannot decrypt the key)", key=key_name) from None
        raise ConfigError(path, f"not a PEM private key: {exc}", key=key_name) from None
    except Exception as exc:  # unsupported key types and the like
        raise ConfigError(path, f"cannot load the key: {exc}", key=key_name) from None
    if _public(key) != _public(leaf):
        raise ConfigError(path, f"this key does not belong to the certificate in {identity.certificate}",
                          key=key_name)
    return key


@dataclass
class LoadedIdentity:
    """A checked certificate chain and key, in the pyOpenSSL types Twisted wants."""

    certificate: crypto.X509
    chain: list[crypto.X509]
    key: crypto.PKey

    def private_certificate(self) -> ssl.PrivateCertificate:
        cert = ssl.PrivateCertificate(self.certificate)
        cert._setPrivateKey(ssl.KeyPair(self.key))
        return cert


def load_identity(identity: TLSIdentity) -> LoadedIdentity:
    """Read, check (dates, key match, passphrase) and convert a certificate and its key."""
    certificates = load_certificates(identity.certificate, identity.certificate_key)
    key = load_private_key(identity, certificates[0])
    return LoadedIdentity(crypto.X509.from_cryptography(certificates[0]),
                          [crypto.X509.from_cryptography(c) for c in certificates[1:]],
                          crypto.PKey.from_cryptography_key(key))


def load_authorities(path: str, key: str) -> list[ssl.Certificate]:
    """The CA certificates in *path* (an expired CA is refused too)."""
    return [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in load_certificates(path, key)]


# --- contexts ------------------------------------------------------------------------------------

def server_options(config: SessionTLSConfig) -> ssl.CertificateOptions:
    """Options for the SmartClient listener: TLS 1.2+ (or 1.3), forward-secret AEAD ciphers,
    client certificates checked against SSL_CLIENT_CA (and required) when configured."""
    assert config.server is not None
    loaded = load_identity(config.server)
    extra: dict[str, Any] = {}
    if config.client_ca:
        extra = dict(verify=True, caCerts=[c.original for c in load_authorities(config.client_ca, "SSL_CLIENT_CA")],
                     requireCertificate=config.require_client_cert)
    options = ssl.CertificateOptions(
        privateKey=loaded.key, certificate=loaded.certificate, extraCertChain=loaded.chain or None,
        raiseMinimumTo=_VERSIONS[config.min_version],
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(SERVER_CIPHERS), **extra)
    options.getContext()  # build it now: problems show at startup, not at the first client
    return options


@implementer(IOpenSSLContextFactory)
class ReloadableServerContext:
    """An old-style context factory whose context can be replaced: Twisted asks it for the
    context at every new connection, so a reload changes the certificate for new handshakes while
    open connections keep the one they started with."""

    def __init__(self, options: ssl.CertificateOptions) -> None:
        self.options = options

    def getContext(self) -> SSL.Context:
        return self.options.getContext()


#: OpenSSL's X509_V_ERR_* codes a certificate check most often fails with, in words (OpenSSL's
#: own error list only says "certificate verify failed").
VERIFY_ERRORS = {
    2: "unable to get the issuer certificate",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in the chain",
    20: "unable to get local issuer certificate (not signed by a trusted CA)",
    21: "unable to verify the first certificate",
    23: "certificate revoked",
    26: "unsuitable certificate purpose",
}


def identity_error(cert: x509.Certificate, host: str) -> str | None:
    """Why *cert* is not the certificate of *host* (a DNS name or an IP address), or None."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        check: Any = service_identity.cryptography.verify_certificate_hostname
    else:
        check = service_identity.cryptography.verify_certificate_ip_address
    try:
        check(cert, host)
    except service_identity.VerificationError:
        names = ", ".join(_subject_names(cert)) or "no subjectAltName"
        return f"the certificate is not for {host} (it names {names})"
    except service_identity.CertificateError as exc:
        return f"the certificate names no usable host ({exc})"
    return None


def _subject_names(cert: x509.Certificate) -> list[str]:
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(name.value) for name in alt]


@implementer(IOpenSSLClientConnectionCreator)
class VerifyingCreator:
    """Client connections to the AppServer at *host*: the chain checked against the CA by
    OpenSSL and the leaf checked for *host* by service-identity, in one verify callback that
    also keeps *why* a check failed (expired, unknown CA, wrong name) on the side protocol as
    ``verify_error`` for the log line (OpenSSL itself only says "certificate verify failed")."""

    def __init__(self, creator: Any, host: str) -> None:
        self.creator = creator
        self.host = host

    def clientConnectionForTLS(self, tls_protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = self.creator.clientConnectionForTLS(tls_protocol)
        side: Any = tls_protocol.wrappedProtocol
        host = self.host

        def verify(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
            why: str | None = None
            if not ok:
                why = VERIFY_ERRORS.get(errno, f"X509 verify error {errno}")
                why = f"{why} (CN={cert.get_subject().CN or '?'}, depth {depth})"
            elif depth == 0:
                why = identity_error(cert.to_cryptography(), host)
            if why is not None and getattr(side, "verify_error", None) is None:  # the first reason
                side.verify_error = why
            return why is None

        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return connection


class UpstreamTLS:
    """Client TLS options per AppServer host, and the factory wrapping for a session."""

    def __init__(self, config: SessionTLSConfig, clock: Any) -> None:
        self.clock = clock
        self.handshake_timeout = config.handshake_timeout
        self.verify = config.upstream_verify
        self.min_version = _VERSIONS[config.min_version]
        self.authorities = (load_authorities(config.upstream_ca, "SSL_UPSTREAM_CA")
                            if config.upstream_ca else None)
        self.identity = load_identity(config.upstream_identity) if config.upstream_identity else None
        self._creators: dict[str, Any] = {}

    def creator(self, host: str) -> Any:
        """Connection creator for the AppServer at *host* (cached: building one costs a context)."""
        creator = self._creators.get(host)
        if creator is None:
            mine = self.identity.private_certificate() if self.identity else None
            if self.verify:
                trust: Any = None
                if self.authorities:
                    trust = (self.authorities[0] if len(self.authorities) == 1 else
                             ssl.trustRootFromCertificates(self.authorities))
                creator = VerifyingCreator(ssl.optionsForClientTLS(
                    host, trustRoot=trust, clientCertificate=mine,
                    extraCertificateOptions={"raiseMinimumTo": self.min_version}), host)
            else:
                extra: dict[str, Any] = {}
                if mine is not None:
                    extra = dict(privateKey=mine.privateKey.original, certificate=mine.original)
                creator = ssl.CertificateOptions(verify=False, raiseMinimumTo=self.min_version, **extra)
            self._creators[host] = creator
        return creator

    def wrap(self, session: Session, backend: Backend) -> TLSMemoryBIOFactory:
        """The factory to connect *session* to *backend* with."""
        return UpstreamTLSFactory(self.creator(backend.host), True, _UpstreamFactory(session, self))


# --- protocols -------------------------------------------------------------------------------

class SessionTLSProtocol(TLSMemoryBIOProtocol):
    """TLS with a half-close that TLS can express: our close_notify after what is queued (reads
    go on until the peer's close_notify), instead of a bare TCP FIN under the TLS layer."""

    def loseWriteConnection(self) -> None:
        self.loseConnection()
        if self._producer is not None:  # the other side's transport: it has no more to give
            self.unregisterProducer()  # TLS shuts down only once no producer is registered


class SessionTLSFactory(TLSMemoryBIOFactory):
    """TLS factory of the broker's session connections (quiet: one per session upstream)."""

    protocol = SessionTLSProtocol
    noisy = False


@implementer(IPushProducer)
class _KeepOpen:
    """The client's transport as producer of an AppServer TLS connection, minus
    ``stopProducing``: a lost AppServer connection must not close the client by itself (the
    session decides: end it, or fail over after a late TLS refusal)."""

    def __init__(self, producer: Any) -> None:
        self.producer = producer

    def pauseProducing(self) -> None:
        self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        self.producer.resumeProducing()

    def stopProducing(self) -> None:
        pass


class UpstreamTLSProtocol(SessionTLSProtocol):
    """The TLS connection to an AppServer."""

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        super().registerProducer(_KeepOpen(producer) if streaming else producer, streaming)


class UpstreamTLSFactory(SessionTLSFactory):
    protocol = UpstreamTLSProtocol


def describe_failure(reason: Failure) -> str:
    """A readable reason for a failed handshake (OpenSSL's error list, service-identity's text)."""
    value = reason.value
    if isinstance(value, SSL.Error) and value.args and isinstance(value.args[0], list):
        texts = [str(item[-1]) for item in value.args[0] if isinstance(item, tuple) and item]
        if texts:
            return "; ".join(texts)
    text = str(value).strip().rstrip(".")
    return text or type(value).__name__


def handshake_failed(broker: BrokerFactory, side: str, peer: str, why: str) -> None:
    """Count and log one failed handshake (*side*: "client" or "AppServer")."""
    broker.stats.record("handshake_failures")
    log.warn("TLS handshake with {side} {peer} failed: {why}", side=side, peer=peer, why=why,
             tls_failure=True)


def _address(transport: Any) -> str:
    peer = transport.getPeer()
    return f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"


class _HandshakeTimer:
    """The handshake deadline of one connection."""

    timer: Any = None
    timed_out = False

    def start_timer(self, clock: Any, seconds: float, transport: Any) -> None:
        def expire() -> None:
            self.timer = None
            self.timed_out = True
            transport.abortConnection()

        self.timer = clock.callLater(seconds, expire)

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


@implementer(IHandshakeListener)
class HandshakeGate(Protocol, _HandshakeTimer):
    """A terminated client until its handshake completes; then the broker's own protocol."""

    transport: Any

    def __init__(self, broker: BrokerFactory, timeout: float) -> None:
        self.broker = broker
        self.timeout = timeout
        self.done = False
        self.pending: PendingToken | None = None  # counted by TerminatingFactory.buildProtocol

    def connectionMade(self) -> None:
        self.start_timer(self.broker.clock, self.timeout, self.transport)

    def _release(self) -> None:
        if self.pending is not None:
            self.pending.release()
            self.pending = None

    def handshakeCompleted(self) -> None:
        self.stop_timer()
        self.done = True
        self._release()  # the broker's own protocol counts itself from here
        transport = self.transport
        inner = self.broker.buildProtocol(transport.getPeer())
        if inner is None:  # MAX_SESSIONS reached (logged by the broker)
            transport.abortConnection()
            return
        tune(transport.transport)  # TCP_NODELAY and the larger read size on the socket
        transport.wrappedProtocol = inner
        inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:  # not before handshakeCompleted hands over
        raise RuntimeError("TLS data before the handshake completed")

    def connectionLost(self, reason: Failure = Failure(Exception("lost"))) -> None:
        if self.done:
            return
        self.stop_timer()
        self._release()
        if self.timed_out:
            why = f"no handshake within SSL_HANDSHAKE_TIMEOUT={self.timeout:g}s"
        elif not getattr(self.transport, "spoke", True):  # a port probe, not a TLS client
            log.debug("client {peer} closed before sending anything", peer=_address(self.transport))
            return
        else:
            why = describe_failure(reason)
        handshake_failed(self.broker, "client", _address(self.transport), why)


class _GateFactory(Factory):
    noisy = False

    def __init__(self, broker: BrokerFactory, timeout: float) -> None:
        self.broker = broker
        self.timeout = timeout

    def buildProtocol(self, addr: Any) -> HandshakeGate:
        return HandshakeGate(self.broker, self.timeout)


class TerminatingTLSProtocol(SessionTLSProtocol):
    """A terminated SmartClient connection; remembers whether the client sent anything."""

    spoke = False

    def dataReceived(self, data: bytes) -> None:
        self.spoke = True
        super().dataReceived(data)


class TerminatingFactory(SessionTLSFactory):
    """The SmartClient listener with TLS termination in front of *broker*."""

    protocol = TerminatingTLSProtocol

    def __init__(self, context: ReloadableServerContext, broker: BrokerFactory, timeout: float) -> None:
        super().__init__(context, False, _GateFactory(broker, timeout))
        self.broker = broker

    def buildProtocol(self, addr: Any) -> Any:
        """A connection in its handshake counts as pending (capped per address and in all)."""
        pending = self.broker.admit(addr)
        if pending is None:
            return None  # over a cap (logged by the broker): closed at once
        protocol: Any = super().buildProtocol(addr)
        protocol.wrappedProtocol.pending = pending
        return protocol

    def stopFactory(self) -> None:
        super().stopFactory()
        self.broker.stopFactory()  # the port is closing: log the refusals not yet logged


class _AbortHandshake:
    """Stands for the connector while the upstream handshake runs: a client that leaves then
    aborts the connection (Session calls ``stopConnecting``)."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def stopConnecting(self) -> None:
        self.transport.abortConnection()


class HandshakeFailed(Exception):
    """The TLS handshake with an AppServer failed (the text says why)."""


@implementer(IHandshakeListener)
class TLSServerSide(ServerSide, _HandshakeTimer):
    """The AppServer side over TLS: linked to the client once the handshake completes; a failed
    handshake counts as a failed connection (the session tries the next AppServer)."""

    handshaken = False
    verify_error: str | None = None  # set by VerifyingCreator

    def __init__(self, session: Session, upstream: UpstreamTLS) -> None:
        self.session = session
        self.upstream = upstream

    def connectionMade(self) -> None:
        self.eager = tune(self.transport.transport) and False  # TLS writes go through OpenSSL
        self.session.connecting_through(_AbortHandshake(self.transport))
        self.start_timer(self.upstream.clock, self.upstream.handshake_timeout, self.transport)

    def handshakeCompleted(self) -> None:
        if self.transport.disconnecting:  # verification failed in a callback: connectionLost says why
            return
        self.stop_timer()
        self.handshaken = True
        self.session.server_connected(self)

    def connectionLost(self, reason: Failure = Failure(Exception("lost"))) -> None:
        if self.handshaken:
            if self.received == 0 and reason.check(SSL.Error) and self._refused_after_handshake(reason):
                return
            super().connectionLost(reason)
            return
        self.stop_timer()
        session = self.session
        if session.client_lost:
            why = "client left"
        else:
            why = (f"no handshake within SSL_HANDSHAKE_TIMEOUT={self.upstream.handshake_timeout:g}s"
                   if self.timed_out else describe_failure(reason))
            if self.verify_error:
                why = f"{why}: {self.verify_error}"
            backend = session.backend
            handshake_failed(session.broker, "AppServer",
                             f"{backend.server_id} ({backend.address})" if backend else "?", why)
        session.attempt_failed(Failure(HandshakeFailed(f"TLS handshake failed: {why}")))


    def _refused_after_handshake(self, reason: Failure) -> bool:
        """The AppServer refused us with a TLS alert after our side of the handshake was done
        (TLS 1.3: a missing or untrusted client certificate is only reported then).  Logged and
        counted as a failed handshake; if the client has sent nothing yet the session is unlinked
        and fails over like a refused connection (True), otherwise it ends (False)."""
        session = self.session
        backend = session.backend
        why = describe_failure(reason)
        handshake_failed(session.broker, "AppServer",
                         f"{backend.server_id} ({backend.address})" if backend else "?", why)
        return session.unlink_refused(self, Failure(HandshakeFailed(f"TLS handshake failed: {why}")))


class _UpstreamFactory(ClientFactory):
    """Builds the TLS server side of one session and passes connection failures to it."""

    noisy = False

    def __init__(self, session: Session, upstream: UpstreamTLS) -> None:
        self.session = session
        self.upstream = upstream

    def buildProtocol(self, addr: Any) -> TLSServerSide:
        return TLSServerSide(self.session, self.upstream)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.session.attempt_failed(reason)


# --- wiring ------------------------------------------------------------------------------------

class SessionTLS:
    """The TLS side of one broker listener, built from its config; reloadable.

    Every problem with a certificate, key or CA file is a :class:`ConfigError` naming the file.
    """

    def __init__(self, reactor: Any, config: SessionTLSConfig, broker: BrokerFactory) -> None:
        self.reactor = reactor
        self.broker = broker
        self.config = config
        self.context = ReloadableServerContext(server_options(config)) if config.terminate else None
        broker.upstream_tls = UpstreamTLS(config, reactor) if config.upstream else None

    def listening_factory(self) -> Any:
        """What to listen with: the broker itself (passthrough) or TLS in front of it."""
        if self.context is None:
            return self.broker
        return TerminatingFactory(self.context, self.broker, self.config.handshake_timeout)

    def describe(self) -> str:
        """One phrase for the startup line."""
        config = self.config
        if config.terminate:
            client = (", client certificate required" if config.require_client_cert else
                      ", client certificate checked if sent" if config.client_ca else "")
            front = f"TLS terminated (TLS {config.min_version}+{client})"
        else:
            front = "TLS passthrough"
        if config.upstream:
            back = "TLS to AppServers" + ("" if config.upstream_verify else " NOT VERIFIED")
        else:
            back = "plain TCP to AppServers"
        return f"{front}, {back}"

    def warn_at_startup(self) -> None:
        if self.config.upstream and not self.config.upstream_verify:
            log.warn("config: SSL_UPSTREAM_VERIFY=0: AppServer certificates are NOT checked; anyone "
                     "who can intercept broker-to-AppServer traffic can read and change it")

    def reload(self, config: SessionTLSConfig) -> None:
        """Re-read every certificate and key; new handshakes use them, open sessions keep theirs.
        Raises :class:`ConfigError` (keeping the running ones) when a file is bad."""
        if config.terminate != self.config.terminate:
            log.warn("reload: TLS termination switched {how}; restart to apply",
                     how="on" if config.terminate else "off")
            config = replace(config, server=self.config.server)  # the listener keeps its shape
        options = server_options(config) if config.terminate and self.context is not None else None
        upstream = UpstreamTLS(config, self.reactor) if config.upstream else None
        if options is not None and self.context is not None:
            self.context.options = options
        self.broker.upstream_tls = upstream
        if config.upstream and not config.upstream_verify and self.config.upstream_verify:
            self.warn_at_startup()
        self.config = config
