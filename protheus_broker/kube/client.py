"""A small Kubernetes API client on treq/twisted.web: JSON requests and line-by-line watch streams,
never blocking the reactor.

Every request has a client-side timeout (a server that accepts and says nothing must not hold a
scaler forever, python-kubernetes #1148/#1402); every body is bounded (a hostile or broken API
server must not take the broker's memory): a JSON answer is buffered up to *max_response* bytes,
a watch stream is read line by line, each line up to the same cap.  The bearer token is re-read
from its file every *token_refresh* seconds (bound service-account tokens rotate).
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable
from urllib.parse import urlencode

from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.logger import Logger
from twisted.web.client import Agent, PotentialDataLoss, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from treq.client import HTTPClient
from zope.interface import implementer

from protheus_broker.kube.kubeconfig import KubeConfigError, KubeConnection, read_small

log = Logger()

#: The default cap on a buffered answer and on one watch line.
MAX_RESPONSE = 8 * 1024 * 1024

#: A bearer token longer than this is refused (a mistake, not a token).
MAX_TOKEN_BYTES = 64 * 1024


class KubeError(Exception):
    """A request that did not succeed; :attr:`status` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason  # the Status object's reason (``Expired``, ``NotFound``...) if any


class ResponseTooLarge(KubeError):
    """The answer (or one watch line) passed the size cap."""


def split_pem(data: bytes) -> list[bytes]:
    """Each PEM certificate block of a bundle."""
    return re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", data, re.S)


@implementer(IPolicyForHTTPS)
class ApiServerTLS:
    """TLS to the API server: verified against the cluster CA (or the system's roots), with a
    client certificate when the kubeconfig has one; no verification only with
    ``insecure-skip-tls-verify``."""

    def __init__(self, connection: KubeConnection) -> None:
        self.insecure = connection.insecure
        self.client: Any = None
        if connection.client_cert_pem and connection.client_key_pem:
            try:
                self.client = ssl.PrivateCertificate.loadPEM(connection.client_cert_pem + b"\n" +
                                                             connection.client_key_pem)
            except Exception as e:
                raise KubeConfigError(f"the client certificate or key is not usable: {e}") from None
        self.trust: Any = None
        if connection.ca_pem is not None and not self.insecure:
            blocks = split_pem(connection.ca_pem)
            if not blocks:
                raise KubeConfigError("the cluster CA holds no PEM certificate")
            try:
                self.trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])
            except Exception as e:
                raise KubeConfigError(f"the cluster CA is not usable: {e}") from None

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        if self.insecure:
            if self.client is not None:
                return ssl.CertificateOptions(privateKey=self.client.privateKey.original,
                                              certificate=self.client.original, verify=False)
            return ssl.CertificateOptions(verify=False)
        trust = self.trust if self.trust is not None else ssl.platformTrust()
        return ssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=trust,
                                       clientCertificate=self.client)


def make_http(reactor: Any, connection: KubeConnection, connect_timeout: float) -> Any:
    """A treq ``HTTPClient`` for *connection* (TLS per :class:`ApiServerTLS`)."""
    agent = Agent(reactor, contextFactory=ApiServerTLS(connection), connectTimeout=connect_timeout)
    return HTTPClient(agent)


class BoundedBody(Protocol):
    """Collects a response body up to *cap* bytes; past it, aborts the connection."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.chunks: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred(lambda d: self._abort())
        self.failed = False

    def _abort(self) -> None:
        transport = self.transport
        if transport is not None:
            transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.failed:
            return
        self.size += len(data)
        if self.size > self.cap:
            self.failed = True
            self.chunks = []
            self._abort()
            if not self.done.called:
                self.done.errback(ResponseTooLarge(f"answer larger than {self.cap} bytes"))
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


class LineStream(Protocol):
    """A watch stream: hands each complete line to *on_line*; a line longer than *cap*, or
    *on_line* raising, aborts the stream and fails :attr:`done` with that error."""

    def __init__(self, cap: int, on_line: Callable[[bytes], None],
                 on_data: Callable[[], None] | None = None) -> None:
        self.cap = cap
        self.on_line = on_line
        self.on_data = on_data
        self.buffer = b""
        self.parts: list[bytes] = []  # an unfinished line, in pieces
        self.pending = 0  # its length
        self.done: Deferred[None] = Deferred(lambda d: self._abort())
        self.failed = False

    def _abort(self) -> None:
        transport = self.transport
        if transport is not None:
            transport.stopProducing()  # type: ignore[attr-defined]

    def _fail(self, error: BaseException) -> None:
        self.failed = True
        self.buffer, self.parts = b"", []
        self._abort()
        if not self.done.called:
            self.done.errback(Failure(error))

    def dataReceived(self, data: bytes) -> None:
        if self.failed:
            return
        if self.on_data is not None:
            self.on_data()
        if b"\n" not in data:  # the middle of a long line: no rescan of what is buffered
            self.parts.append(data)
            self.pending += len(data)
            if self.pending > self.cap:
                self._fail(ResponseTooLarge(f"watch line longer than {self.cap} bytes"))
            return
        self.buffer = b"".join(self.parts) + data
        self.parts, self.pending = [], 0
        while not self.failed:
            end = self.buffer.find(b"\n")
            if end < 0:
                break
            line, self.buffer = self.buffer[:end], self.buffer[end + 1:]
            if len(line) > self.cap:
                self._fail(ResponseTooLarge(f"watch line longer than {self.cap} bytes"))
                return
            if line.strip():
                try:
                    self.on_line(line)
                except Exception as e:
                    self._fail(e)
                    return
        if len(self.buffer) > self.cap:
            self._fail(ResponseTooLarge(f"watch line longer than {self.cap} bytes"))
            return
        if self.buffer:
            self.parts, self.pending = [self.buffer], len(self.buffer)
        self.buffer = b""

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)


def status_error(status: int, body: bytes, what: str) -> KubeError:
    """The KubeError for a non-2xx answer: the Status object's message and reason if it has one."""
    message, reason = "", ""
    try:
        obj = json.loads(body)
        if isinstance(obj, dict):
            message = str(obj.get("message", ""))[:300]
            reason = str(obj.get("reason", ""))[:100]
    except ValueError:
        pass
    return KubeError(f"{what}: HTTP {status}{' ' + reason if reason else ''}"
                     f"{': ' + message if message else ''}", status, reason)


class KubeClient:
    """JSON requests and watches against one API server, through *http* (a treq ``HTTPClient``,
    or ``treq.testing.StubTreq`` in tests), timed by *clock*."""

    def __init__(self, clock: Any, http: Any, connection: KubeConnection, request_timeout: float = 10.0,
                 max_response: int = MAX_RESPONSE, token_refresh: float = 60.0) -> None:
        self.clock = clock
        self.http = http
        self.connection = connection
        self.request_timeout = request_timeout
        self.max_response = max_response
        self.token_refresh = token_refresh
        self._token: str | None = connection.token
        self._token_read_at: float | None = None
        self.token_reads = 0  # how often the token file was read (tests, status)

    # --- authentication ---------------------------------------------------------------------

    def token(self) -> str | None:
        """The bearer token: the fixed one, or the token file's, re-read every *token_refresh*
        seconds (a file that cannot be read keeps the last token, with one line in the log)."""
        path = self.connection.token_file
        if path is None:
            return self._token
        now = self.clock.seconds()
        if self._token_read_at is None or now - self._token_read_at >= self.token_refresh:
            self._token_read_at = now
            try:
                data = read_small(path, "the bearer token")
                if len(data) > MAX_TOKEN_BYTES:
                    raise KubeConfigError(f"the bearer token {path} is larger than {MAX_TOKEN_BYTES} bytes")
                self._token = data.decode("ascii").strip()
                self.token_reads += 1
            except (KubeConfigError, UnicodeDecodeError) as e:
                log.warn("Kubernetes: {error}; keeping the last token", error=str(e))
        return self._token

    def headers(self, content_type: str | None = None) -> Headers:
        headers = Headers({b"Accept": [b"application/json"], b"User-Agent": [b"protheus-broker"]})
        token = self.token()
        if token:
            headers.setRawHeaders(b"Authorization", [f"Bearer {token}".encode("ascii", "replace")])
        if content_type:
            headers.setRawHeaders(b"Content-Type", [content_type.encode("ascii")])
        return headers

    def url(self, path: str, query: dict[str, str] | None = None) -> str:
        return self.connection.server + path + ("?" + urlencode(query) if query else "")

    # --- requests ---------------------------------------------------------------------------

    def _timed(self, d: Deferred[Any], seconds: float, what: str, late: str = "no answer within") -> Deferred[Any]:
        """*d*, cancelled after *seconds* of the clock (a :class:`KubeError` saying so)."""
        expired = []

        def expire() -> None:
            expired.append(True)
            d.cancel()
        timer = self.clock.callLater(seconds, expire)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if expired and isinstance(result, Failure):
                raise KubeError(f"{what}: {late} {seconds:g}s")
            return result
        return d.addBoth(done)

    def request(self, method: str, path: str, query: dict[str, str] | None = None,
                body: Any = None, content_type: str | None = None) -> Deferred[Any]:
        """*method* on *path*: the decoded JSON answer, or a :class:`KubeError` (a non-2xx
        status with the Status message; no answer within the timeout; too large; not JSON)."""
        what = f"{method} {path}"
        data = json.dumps(body).encode() if body is not None else None
        d: Deferred[Any] = self.http.request(method, self.url(path, query), headers=self.headers(content_type),
                                             data=data, unbuffered=True)

        def read(response: Any) -> Deferred[Any]:
            reader = BoundedBody(self.max_response)
            response.deliverBody(reader)

            def decode(raw: bytes) -> Any:
                if not 200 <= response.code < 300:
                    raise status_error(response.code, raw, what)
                try:
                    return json.loads(raw)
                except ValueError:
                    raise KubeError(f"{what}: the answer is not JSON ({len(raw)} bytes)",
                                    response.code) from None
            return reader.done.addCallback(decode)
        d.addCallback(read)
        return self._timed(d, self.request_timeout, what)

    def watch(self, path: str, query: dict[str, str], on_line: Callable[[bytes], None],
              deadline: float) -> Deferred[None]:
        """Open a watch on *path* and hand each line to *on_line*; fires when the server ends the
        stream, fails with a :class:`KubeError` on a non-2xx status, no headers within the request
        timeout, a stream still open *deadline* seconds after its headers, or a line too long.
        Cancelling it closes the stream."""
        what = f"watch {path}"
        d: Deferred[Any] = self.http.request("GET", self.url(path, query), headers=self.headers(),
                                             unbuffered=True)
        d = self._timed(d, self.request_timeout, what)

        def stream(response: Any) -> Deferred[None]:
            if not 200 <= response.code < 300:
                reader = BoundedBody(min(self.max_response, 64 * 1024))
                response.deliverBody(reader)

                def refuse(raw: bytes) -> None:
                    raise status_error(response.code, raw, what)

                def unread(failure: Failure) -> None:
                    raise KubeError(f"{what}: HTTP {response.code}", response.code)
                return reader.done.addCallbacks(refuse, unread)
            lines = LineStream(self.max_response, on_line)
            response.deliverBody(lines)
            return self._timed(lines.done, deadline, what, "still open (the server did not end it) after")
        d.addCallback(stream)
        return d
