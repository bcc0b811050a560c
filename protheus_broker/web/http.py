"""The admin HTTP interface (twisted.web): page, JSON API, /metrics, actions; and the small
read-only status served on the SmartClient port.

Requests are routed by hand in one leaf resource so that every bad request gets a JSON error
naming what is wrong.  Reads: open to loopback clients by default (``READ_ACCESS``); actions:
``POST`` with ``Authorization: Bearer <token>`` always (a cross-site form cannot send that header;
a browser's ``Origin`` must match ``Host``).  The admin endpoint answers only the host names it
serves (``localhost``, IP literals, ``ALLOWED_HOSTS``), which defeats DNS rebinding.

Connections are bounded in time: a request must be complete (headers and body) within
:data:`REQUEST_TIMEOUT` seconds of the connection opening or of the previous answer, whatever the
pace of its bytes (slowloris), and an idle connection is closed after the site's ``timeOut``.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Union
from urllib.parse import unquote

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from protheus_broker.web.settings import AdminConfig, ReadAccess
from protheus_broker.web import metrics, model
from protheus_broker.web.auth import (FailureLimiter, Refused, TokenChecker, Verifier, check_bearer, host_allowed,
                   is_loopback, origin_matches, reactor_thread_runner)
from protheus_broker.web.page import PAGE_CSP, PAGE_HTML

log = Logger()

MAX_BODY = 64 * 1024
#: Wrong tokens cost a PBKDF2 each: at most this many per client address per FAILURE_WINDOW s.
MAX_FAILURES = 10
FAILURE_WINDOW = 10.0
#: Client addresses whose wrong tokens are remembered (the least recent are forgotten first).
FAILURE_TABLE_SIZE = 1024
#: Seconds a client has to send a whole request (headers and body), from the connection opening
#: or the previous answer.
REQUEST_TIMEOUT = 10.0
#: Idle seconds before a kept-alive admin connection is closed (the page polls every 2 s).
ADMIN_IDLE_TIMEOUT = 60

JSON_TYPE = b"application/json; charset=utf-8"


def _ignore(*args: Any) -> None:
    pass


class _Discard:
    """Where the body of a refused request goes (nothing is kept)."""

    def write(self, data: bytes) -> None:
        pass

    def seek(self, *args: Any) -> None:
        pass

    def close(self) -> None:  # twisted.web closes a request's content when the connection ends
        pass


class BoundedRequest(Request):
    """A request whose body may not exceed :data:`MAX_BODY`: twisted.web would otherwise keep any
    body (spooled to a temporary file) before the resource sees it.  A bigger or chunked body is
    answered 413 at once and the connection closed, with nothing stored."""

    def gotLength(self, length: int | None) -> None:
        if length is not None and length <= MAX_BODY:
            super().gotLength(length)
            return
        self.content = _Discard()  # type: ignore[assignment]
        body = json.dumps({"error": f"request body over {MAX_BODY} bytes or chunked (none is needed)",
                           "status": 413}).encode()
        transport: Any = self.channel.transport
        transport.write(b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: " + JSON_TYPE +
                        b"\r\ncontent-length: " + str(len(body)).encode() +
                        b"\r\nconnection: close\r\n\r\n" + body)
        transport.loseConnection()  # stops reading at once; the answer is flushed first
        channel: Any = self.channel  # bytes already read past the headers are dropped, as
        channel.dataReceived = channel.lineReceived = channel.rawDataReceived = _ignore  # twisted does

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if isinstance(self.content, _Discard):  # refused in gotLength: already answered
            return
        super().requestReceived(command, path, version)


class BoundedChannel(HTTPChannel):
    """An HTTP/1.1 channel with a deadline for each request: it must be wholly received within
    :data:`REQUEST_TIMEOUT` seconds of the connection opening (or of the previous answer, once
    its first byte arrives), however its bytes trickle in; else the connection is timed out
    (twisted's own idle timeout restarts at every byte, so one byte every few seconds would hold
    a connection for ever)."""

    requestTimeout = REQUEST_TIMEOUT
    _deadline: Any = None
    _timed_out = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm()

    def _arm(self) -> None:
        if self._deadline is None and not self._timed_out:
            self._deadline = self.callLater(self.requestTimeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline, self._timed_out = None, True
        self.setTimeout(None)  # the idle timeout would only repeat what follows
        self.timeoutConnection()  # one info line; the connection is aborted if it does not close

    def dataReceived(self, data: bytes) -> None:
        if not self._handlingRequest:  # the first bytes of the next request on a kept-alive link
            self._arm()
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._disarm()
        super().allContentReceived()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._disarm()
        super().connectionLost(reason)


class QuietSite(Site):
    """A Site without per-request access log lines (the page polls); actions log themselves.
    Request bodies are bounded (:class:`BoundedRequest`), requests and idle connections are
    bounded in time (:class:`BoundedChannel`, ``timeOut``)."""

    noisy = False
    requestFactory = BoundedRequest
    protocol = BoundedChannel  # type: ignore[assignment]  # HTTP/1.1 only: no HTTP/2 needed
    timeOut = ADMIN_IDLE_TIMEOUT

    def log(self, request: Any) -> None:
        pass


def _client_host(request: Request) -> str:
    peer = request.getClientAddress()
    return str(getattr(peer, "host", "unix") or "unix")


#: Ends a request early with a JSON error.
_Reply = Refused


def _host_text(request: Request) -> str:
    return (request.getHeader(b"host") or b"").decode("ascii", errors="replace")[:100]


class Access:
    """Who may read and who may act, from the live [BROKER_ADMIN] config.

    A presented token is first compared with the one that verified last (a SHA-256): the right
    token passes whatever anyone else sends.  Any other token is checked by PBKDF2 in a thread
    (:class:`Verifier`), unless its client address is over its limit of wrong tokens (429) or too
    many checks are in flight (503).  One :class:`Access` serves the admin endpoint and the
    SmartClient port's status, so the limits hold across both.
    """

    def __init__(self, broker: model.Broker, verifier: Verifier | None = None) -> None:
        self.broker = broker
        self._checker: TokenChecker | None = None
        self.limiter = FailureLimiter(MAX_FAILURES, FAILURE_WINDOW, FAILURE_TABLE_SIZE)
        self._verifier = verifier

    @property
    def config(self) -> AdminConfig:
        return self.broker.config.admin or AdminConfig()

    @property
    def verifier(self) -> Verifier:
        if self._verifier is None:  # the reactor's thread pool, once a token needs hashing
            self._verifier = Verifier(reactor_thread_runner(self.broker.reactor))
        return self._verifier

    @verifier.setter
    def verifier(self, verifier: Verifier) -> None:
        self._verifier = verifier

    def checker(self) -> TokenChecker:
        source = self.config.token_hash
        if self._checker is None or self._checker.source != source:  # a reload changed it
            self._checker = TokenChecker(source)
        return self._checker

    def check_host(self, request: Request) -> None:
        """Refuse a request whose ``Host`` is not a name this endpoint serves (DNS rebinding)."""
        if not host_allowed(request.getHeader(b"host"), self.config.allowed_hosts):
            raise _Reply(421, f"Host {_host_text(request)!r} is not a name this broker answers to "
                              "(add it to [BROKER_ADMIN] ALLOWED_HOSTS)")

    def token_ok(self, request: Request) -> "Deferred[bool | None]":
        """Fires True: the right token; False: a wrong one; None: none presented.  Raises (or
        fails with) :class:`_Reply` for a malformed header, a limited address or a busy verifier."""
        client = _client_host(request)
        checking = check_bearer(request.getHeader(b"authorization"), client, self.broker.reactor.seconds(),
                                self.checker(), self.limiter, self.verifier, _CHALLENGE)

        def verdict(right: bool | None) -> bool | None:
            if right is False:
                log.warn("admin: wrong token from {client} for {method} {path}", client=client,
                         method=request.method.decode(errors="replace"),
                         path=request.path.decode(errors="replace"))
            return right

        return checking.addCallback(verdict)

    def require_read(self, request: Request) -> "Deferred[str]":
        """Fires with why the read is allowed: ``token``, ``anywhere`` or ``loopback``."""
        def decide(verdict: bool | None) -> str:
            if verdict is False:
                raise _Reply(401, "wrong token", _CHALLENGE)
            if verdict:
                return "token"
            access = self.config.read_access
            if access is ReadAccess.ANYWHERE:
                return "anywhere"
            if access is ReadAccess.LOCALHOST and is_loopback(_client_host(request)):
                return "loopback"
            raise _Reply(401, "a token is needed to read this from " + _client_host(request), _CHALLENGE)

        return self.token_ok(request).addCallback(decide)

    def require_action(self, request: Request) -> "Deferred[str]":
        """Checks an action request; fires with who did it (for the log)."""
        if not origin_matches(request.getHeader(b"origin"), request.getHeader(b"host")):
            raise _Reply(403, "cross-site request refused (Origin does not match Host)")
        if not self.checker().configured:
            raise _Reply(403, "admin actions are disabled: no TOKEN_HASH in [BROKER_ADMIN]")

        def decide(verdict: bool | None) -> str:
            if verdict is None:
                raise _Reply(401, "admin actions need 'Authorization: Bearer <token>'", _CHALLENGE)
            if not verdict:
                raise _Reply(401, "wrong token", _CHALLENGE)
            return f"token@{_client_host(request)}"

        return self.token_ok(request).addCallback(decide)


_CHALLENGE = {b"www-authenticate": b'Bearer realm="protheus-broker"'}

#: What a route's handler gives: the body now, or later.
Body = Union[bytes, "Deferred[bytes]"]


def _json(request: Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, sort_keys=True).encode() + b"\n"


def _str_arg(request: Request, name: str) -> str | None:
    """A query argument as text, or None when absent."""
    values = (request.args or {}).get(name.encode())
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise _Reply(400, f"{name} must be UTF-8 text") from None


def _int_arg(request: Request, name: str, default: int) -> int:
    values = (request.args or {}).get(name.encode())
    if not values:
        return default
    text = values[0].decode(errors="replace")
    try:
        return int(text)
    except ValueError:
        raise _Reply(400, f"query parameter {name}: expected a whole number, got {text!r}") from None


class _Router(Resource):
    """Shared request handling: method/path dispatch and errors as JSON; an answer may wait for a
    token check in a thread (``NOT_DONE_YET``)."""

    isLeaf = True

    def __init__(self, broker: model.Broker, access: Access | None = None) -> None:
        super().__init__()
        self.broker = broker
        self.access = access if access is not None else Access(broker)

    def routes(self, method: bytes, parts: list[str], request: Request) -> Callable[[], Body] | None:
        raise NotImplementedError

    def before_routing(self, request: Request) -> None:
        """Checks made on every request before its path is looked at."""

    def render(self, request: Request) -> Any:
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"x-frame-options", b"DENY")
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        answer: "Deferred[bytes]" = maybeDeferred(self.dispatch, request)
        answer.addErrback(self.error_body, request)
        answer.addCallback(self.send, request, gone)
        answer.addErrback(lambda f: log.failure("broker screen: answering {path} failed", f,
                                                path=request.path.decode(errors="replace")))
        return NOT_DONE_YET

    def dispatch(self, request: Request) -> "Deferred[bytes]":
        method = request.method.upper()
        self.before_routing(request)
        try:
            path = unquote(request.path.decode("ascii"), errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise _Reply(400, "the path is not ASCII/UTF-8 URL text") from None
        parts = [p for p in path.split("/") if p]
        handler = self.routes(method if method != b"HEAD" else b"GET", parts, request)
        if handler is None:
            raise _Reply(404, f"no such resource: {path}")
        body = handler()
        return body if isinstance(body, Deferred) else succeed(body)

    def error_body(self, failure: Failure, request: Request) -> bytes:
        reply = failure.check(_Reply, model.ActionError)
        if reply is _Reply:
            error: Any = failure.value
            for name, value in error.headers.items():
                request.setHeader(name, value)
            return _json(request, error.status, {"error": error.message, "status": error.status})
        if reply is model.ActionError:
            action: Any = failure.value
            return _json(request, action.status, {"error": action.message, "status": action.status})
        log.failure("broker screen: {method} {path} failed", failure,
                    method=request.method.decode(errors="replace"),
                    path=request.path.decode(errors="replace"))
        return _json(request, 500, {"error": "internal error (logged)", "status": 500})

    def send(self, body: bytes, request: Request, gone: list[bool]) -> None:
        if gone:  # the client left while its token was checked
            return
        request.setHeader(b"content-length", str(len(body)).encode())
        request.write(body)  # twisted.web drops the body of an answer to HEAD
        request.finish()


def _method(method: bytes, allowed: bytes) -> None:
    if method != allowed:
        raise _Reply(405, f"use {allowed.decode()} here, not {method.decode(errors='replace')}",
                     {b"allow": allowed if allowed != b"GET" else b"GET, HEAD"})


class AdminResource(_Router):
    """The admin endpoint's whole URL space (see the README table)."""

    def __init__(self, broker: model.Broker, history: model.ConnectionHistory,
                 access: Access | None = None) -> None:
        super().__init__(broker, access)
        self.history = history

    def before_routing(self, request: Request) -> None:
        self.access.check_host(request)  # every request: page, reads and actions

    def routes(self, method: bytes, parts: list[str], request: Request) -> Callable[[], Body] | None:
        if not parts:
            _method(method, b"GET")
            return lambda: self.page(request)
        if parts == ["ping"]:
            _method(method, b"GET")
            return lambda: _json(request, 200, {"ok": True, "version": model.__version__})
        if parts == ["metrics"]:
            _method(method, b"GET")
            return lambda: self.metrics(request)
        if parts[:2] != ["api", "v1"] or len(parts) < 3:
            return None
        rest = parts[2:]
        if rest == ["status"]:
            return self.read(method, request, lambda: model.status(self.broker, self.history))
        if rest == ["servers"]:
            return self.read(method, request, lambda: {"servers": model.servers(self.broker)})
        if rest == ["sessions"]:
            return self.read(method, request, lambda: model.sessions(
                self.broker, _int_arg(request, "page", 1), _int_arg(request, "per_page", 50)))
        if rest == ["history"]:
            return self.read(method, request, lambda: {
                "samples": self.history.as_list(),
                "pools": {unit.name: self.history.as_list(unit.name) for unit in self.broker.units}})
        if rest == ["reload"]:
            return self.act(method, request, lambda who: model.reload(self.broker, who))
        if len(rest) == 3 and rest[0] == "servers":
            server_id, action = rest[1], rest[2]
            if action not in ("drain", "ready", "down"):
                return None
            pool = _str_arg(request, "pool")
            return self.act(method, request,
                            lambda who: model.server_action(self.broker, server_id, action, who, pool))
        if rest == ["nodes", "scale"]:
            pool = _str_arg(request, "pool")
            return self.act(method, request, lambda who: model.scale_nodes(
                self.broker, _int_arg(request, "min", -1), who, pool))
        if len(rest) == 3 and rest[0] == "nodes" and rest[2] in model.NODE_ACTIONS:
            node_id, action = rest[1], rest[2]
            pool = _str_arg(request, "pool")
            return self.act(method, request,
                            lambda who: model.node_action(self.broker, node_id, action, who, pool))
        if len(rest) == 3 and rest[0] == "sessions" and rest[2] == "close":
            text = rest[1]
            if not text.isdigit():
                raise _Reply(400, f"session id must be a whole number, got {text!r}")
            return self.act(method, request,
                            lambda who: model.close_session(self.broker, int(text), who))
        return None

    def read(self, method: bytes, request: Request, produce: Callable[[], Any]) -> Callable[[], Body]:
        _method(method, b"GET")
        return lambda: self.access.require_read(request).addCallback(
            lambda _: _json(request, 200, produce()))

    def act(self, method: bytes, request: Request, do: Callable[[str], Any]) -> Callable[[], Body]:
        _method(method, b"POST")  # bodies over MAX_BODY never get here (BoundedRequest)
        return lambda: self.access.require_action(request).addCallback(
            lambda who: _json(request, 200, do(who)))

    def page(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", PAGE_CSP)
        request.setHeader(b"cache-control", b"no-store")
        return PAGE_HTML

    def metrics(self, request: Request) -> "Deferred[bytes]":
        def render(_: str) -> bytes:
            request.setHeader(b"content-type", metrics.CONTENT_TYPE_LATEST.encode())
            request.setHeader(b"cache-control", b"no-store")
            return metrics.render(self.broker)

        return self.access.require_read(request).addCallback(render)


def status_text(status: dict[str, Any]) -> str:
    """The plain-text status of the SmartClient port's ``GET /status``."""
    totals = status["totals"]
    lines = [
        f"protheus-broker {status['version']} up {status['uptime_seconds']:.0f}s",
        f"sessions {totals['sessions']} total {totals['sessions_total']} failed {totals['sessions_failed']} "
        f"refused {totals['sessions_refused']} standby {totals['standby']}",
    ]
    for pool in status["pools"]:
        lines.append(f"pool {pool['name']} listen {pool['listen']} sort {pool['sort_method']} "
                     f"monitoring {pool['monitoring_type']}")
        for server in pool["servers"]:
            lines.append(f"server {server['id']} {server['address']} {server['state']} "
                         f"connections {server['connections']}")
    return "\n".join(lines) + "\n"


class PortStatusResource(_Router):
    """What the SmartClient port answers to HTTP: ``/ping``, ``/status``, ``/status.json``.

    The port faces the network under names the broker cannot know (SmartClients and monitors
    reach it by whatever name or address they were given), so ``Host`` is checked only where DNS
    rebinding would gain something: a read allowed because the client is on loopback
    (READ_ACCESS = LOCALHOST, no token), which is what a rebinding page in a browser on the
    broker's host would get.  With a token, or READ_ACCESS = ANYWHERE (anyone who reaches the
    port may read it anyway), any ``Host`` is answered.  ``/ping`` says only "pong".
    """

    def routes(self, method: bytes, parts: list[str], request: Request) -> Callable[[], Body] | None:
        if parts not in (["ping"], ["status"], ["status.json"]):
            return None
        _method(method, b"GET")
        if parts == ["ping"]:
            return lambda: self.text(request, "pong\n")

        def answer(granted: str) -> bytes:
            if granted == "loopback":
                self.access.check_host(request)
            status = model.status(self.broker)
            for pool in status["pools"]:
                pool.pop("history")
            if parts == ["status.json"]:
                return _json(request, 200, status)
            return self.text(request, status_text(status))

        return lambda: self.access.require_read(request).addCallback(answer)

    def text(self, request: Request, body: str) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return body.encode()
