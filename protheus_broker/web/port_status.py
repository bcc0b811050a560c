"""The TOTVS-style status query on the SmartClient port: a :class:`~protheus_broker.proxy.Recogniser`.

A connection whose first bytes are ``GET `` or ``HEAD `` followed by ``/ping``, ``/status`` or
``/status.json`` (optionally ``?query``) and a space is served by a small read-only HTTP site;
anything else (other paths included: AppServers answer their own HTTP) stays a SmartClient
session, decided at the first byte that cannot match.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IProtocol

from protheus_broker.web.http import Access, PortStatusResource, QuietSite
from protheus_broker.web.model import Broker

PATHS = (b"/ping", b"/status", b"/status.json")
#: Idle seconds before a kept-alive status connection is closed (a monitor polls, a person
#: reloads; neither needs the connection held longer on a port that faces the network).
PORT_IDLE_TIMEOUT = 15
METHODS = (b"GET ", b"HEAD ")


def _could_be(stem: bytes, candidates: tuple[bytes, ...]) -> bool:
    return any(c.startswith(stem) for c in candidates)


def recognise_status_request(prefix: bytes) -> bool | None:
    """True: an HTTP status query; False: not one; None: need more bytes."""
    for method in METHODS:
        if len(prefix) < len(method):
            if method.startswith(prefix):
                return None
            continue
        if not prefix.startswith(method):
            continue
        target = prefix[len(method):]
        end = target.find(b" ")
        if end < 0:  # the request target is not complete yet
            path = target.split(b"?", 1)[0]
            if b"?" in target:
                return None if path in PATHS else False
            return None if _could_be(path, PATHS) else False
        return target[:end].split(b"?", 1)[0] in PATHS
    return False


class HttpStatusRecogniser:
    """Hands status queries on the SmartClient port to a read-only twisted.web site."""

    name = "http-status"
    carries_sessions = False  # each query counts as pending until it closes

    def __init__(self, broker: Broker, reactor: Any, access: Access | None = None) -> None:
        self.site = QuietSite(PortStatusResource(broker, access), reactor=reactor)
        self.site.timeOut = PORT_IDLE_TIMEOUT  # and each request within REQUEST_TIMEOUT

    def recognise(self, prefix: bytes) -> bool | None:
        return recognise_status_request(prefix)

    def take_over(self, broker: Any, prefix: bytes) -> IProtocol:
        protocol = self.site.buildProtocol(None)
        assert protocol is not None
        return protocol
