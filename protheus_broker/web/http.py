"""The admin HTTP interface (twisted.web): page, JSON API, /metrics, actions; and the small
read-only status served on the SmartClient port.

Requests are routed by hand in one leaf resource so that every bad request gets a JSON error
naming what is wrong.  Reads: open to loopback clients by default (``READ_ACCESS``); actions:
``POST`` with ``Authorization: Bearer <token>`` always (a cross-site form cannot send that header;
a browser's ``Origin`` must match ``Host``).
"""

from __future__ import annotations

import json
from typing import Any, Callable
from urllib.parse import unquote

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from ..config import AdminConfig, ReadAccess
from . import metrics, model
from .auth import TokenChecker, bearer_token, is_loopback, origin_matches
from .page import PAGE_CSP, PAGE_HTML

log = Logger()

MAX_BODY = 64 * 1024
#: Wrong tokens cost a PBKDF2 each: at most this many checks per FAILURE_WINDOW seconds.
MAX_FAILURES = 10
FAILURE_WINDOW = 10.0

JSON_TYPE = b"application/json; charset=utf-8"


def _ignore(*args: Any) -> None:
    pass


class _Discard:
    """Where the body of a refused request goes (nothing is kept)."""

    def write(self, data: bytes) -> None:
        pass

    def seek(self, *args: Any) -> None:
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


class QuietSite(Site):
    """A Site without per-request access log lines (the page polls); actions log themselves.
    Request bodies are bounded (:class:`BoundedRequest`)."""

    noisy = False
    requestFactory = BoundedRequest

    def log(self, request: Any) -> None:
        pass


def _client_host(request: Request) -> str:
    peer = request.getClientAddress()
    return str(getattr(peer, "host", "unix") or "unix")


class _Reply(Exception):
    """Ends a request early with a JSON error."""

    def __init__(self, status: int, message: str, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Access:
    """Who may read and who may act, from the live [BROKER_ADMIN] config."""

    def __init__(self, broker: model.Broker) -> None:
        self.broker = broker
        self._checker: TokenChecker | None = None
        self._failures: list[float] = []

    @property
    def config(self) -> AdminConfig:
        return self.broker.config.admin or AdminConfig()

    def checker(self) -> TokenChecker:
        source = self.config.token_hash
        if self._checker is None or self._checker.source != source:  # a reload changed it
            self._checker = TokenChecker(source)
        return self._checker

    def token_ok(self, request: Request) -> bool | None:
        """True: a valid token; False: a wrong one; None: none presented."""
        header = request.getHeader(b"authorization")
        token = bearer_token(header)
        if token is None:
            if header is not None:
                raise _Reply(401, "Authorization header is not 'Bearer <token>'", _CHALLENGE)
            return None
        now = self.broker.reactor.seconds()
        self._failures = [t for t in self._failures if now - t < FAILURE_WINDOW]
        if len(self._failures) >= MAX_FAILURES:
            raise _Reply(429, f"too many wrong tokens; try again in {FAILURE_WINDOW:g}s",
                         {b"retry-after": str(int(FAILURE_WINDOW)).encode()})
        if self.checker().check(token):
            return True
        self._failures.append(now)
        log.warn("admin: wrong token from {client} for {method} {path}", client=_client_host(request),
                 method=request.method.decode(errors="replace"), path=request.path.decode(errors="replace"))
        return False

    def require_read(self, request: Request) -> None:
        verdict = self.token_ok(request)
        if verdict is False:
            raise _Reply(401, "wrong token", _CHALLENGE)
        if verdict:
            return
        access = self.config.read_access
        if access is ReadAccess.ANYWHERE:
            return
        if access is ReadAccess.LOCALHOST and is_loopback(_client_host(request)):
            return
        raise _Reply(401, "a token is needed to read this from " + _client_host(request), _CHALLENGE)

    def require_action(self, request: Request) -> str:
        """Checks an action request; returns who did it (for the log)."""
        if not origin_matches(request.getHeader(b"origin"), request.getHeader(b"host")):
            raise _Reply(403, "cross-site request refused (Origin does not match Host)")
        if not self.checker().configured:
            raise _Reply(403, "admin actions are disabled: no TOKEN_HASH in [BROKER_ADMIN]")
        verdict = self.token_ok(request)
        if verdict is None:
            raise _Reply(401, "admin actions need 'Authorization: Bearer <token>'", _CHALLENGE)
        if not verdict:
            raise _Reply(401, "wrong token", _CHALLENGE)
        return f"token@{_client_host(request)}"


_CHALLENGE = {b"www-authenticate": b'Bearer realm="protheus-broker"'}


def _json(request: Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, sort_keys=True).encode() + b"\n"


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
    """Shared request handling: method/path dispatch and errors as JSON."""

    isLeaf = True

    def __init__(self, broker: model.Broker) -> None:
        super().__init__()
        self.broker = broker
        self.access = Access(broker)

    def routes(self, method: bytes, parts: list[str], request: Request) -> Callable[[], bytes] | None:
        raise NotImplementedError

    def render(self, request: Request) -> bytes:
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"x-frame-options", b"DENY")
        method = request.method.upper()
        try:
            try:
                path = unquote(request.path.decode("ascii"), errors="strict")
            except (UnicodeDecodeError, ValueError):
                raise _Reply(400, "the path is not ASCII/UTF-8 URL text") from None
            parts = [p for p in path.split("/") if p]
            handler = self.routes(method if method != b"HEAD" else b"GET", parts, request)
            if handler is None:
                raise _Reply(404, f"no such resource: {path}")
            return handler()
        except _Reply as reply:
            for name, value in reply.headers.items():
                request.setHeader(name, value)
            return _json(request, reply.status, {"error": reply.message, "status": reply.status})
        except model.ActionError as error:
            return _json(request, error.status, {"error": error.message, "status": error.status})


def _method(method: bytes, allowed: bytes) -> None:
    if method != allowed:
        raise _Reply(405, f"use {allowed.decode()} here, not {method.decode(errors='replace')}",
                     {b"allow": allowed if allowed != b"GET" else b"GET, HEAD"})


class AdminResource(_Router):
    """The admin endpoint's whole URL space (see the README table)."""

    def __init__(self, broker: model.Broker, history: model.ConnectionHistory) -> None:
        super().__init__(broker)
        self.history = history

    def routes(self, method: bytes, parts: list[str], request: Request) -> Callable[[], bytes] | None:
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
            return self.read(method, request, lambda: {"samples": self.history.as_list()})
        if rest == ["reload"]:
            return self.act(method, request, lambda who: model.reload(self.broker, who))
        if len(rest) == 3 and rest[0] == "servers":
            server_id, action = rest[1], rest[2]
            if action not in ("drain", "ready", "down"):
                return None
            return self.act(method, request,
                            lambda who: model.server_action(self.broker, server_id, action, who))
        if len(rest) == 3 and rest[0] == "sessions" and rest[2] == "close":
            text = rest[1]
            if not text.isdigit():
                raise _Reply(400, f"session id must be a whole number, got {text!r}")
            return self.act(method, request,
                            lambda who: model.close_session(self.broker, int(text), who))
        return None

    def read(self, method: bytes, request: Request, produce: Callable[[], Any]) -> Callable[[], bytes]:
        _method(method, b"GET")
        self.access.require_read(request)
        return lambda: _json(request, 200, produce())

    def act(self, method: bytes, request: Request, do: Callable[[str], Any]) -> Callable[[], bytes]:
        _method(method, b"POST")  # bodies over MAX_BODY never get here (BoundedRequest)
        who = self.access.require_action(request)
        return lambda: _json(request, 200, do(who))

    def page(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", PAGE_CSP)
        request.setHeader(b"cache-control", b"no-store")
        return PAGE_HTML

    def metrics(self, request: Request) -> bytes:
        self.access.require_read(request)
        request.setHeader(b"content-type", metrics.CONTENT_TYPE_LATEST.encode())
        request.setHeader(b"cache-control", b"no-store")
        return metrics.render(self.broker)


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
    """What the SmartClient port answers to HTTP: ``/ping``, ``/status``, ``/status.json``."""

    def routes(self, method: bytes, parts: list[str], request: Request) -> Callable[[], bytes] | None:
        if parts not in (["ping"], ["status"], ["status.json"]):
            return None
        _method(method, b"GET")
        if parts == ["ping"]:
            return lambda: self.text(request, "pong\n")
        self.access.require_read(request)
        status = model.status(self.broker)
        status["pools"][0].pop("history")
        if parts == ["status.json"]:
            return lambda: _json(request, 200, status)
        return lambda: self.text(request, status_text(status))

    def text(self, request: Request, body: str) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return body.encode()

