"""protheus-broker-ctl against real listeners on 127.0.0.1 (port 0) in this process: answers that are
not (or not quite) the broker screen."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer, protocol, reactor, threads
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from protheus_broker.web import ctl


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Fixed(Resource):
    isLeaf = True

    def __init__(self, status: int, content_type: bytes, body: bytes) -> None:
        super().__init__()
        self.status, self.content_type, self.body = status, content_type, body

    def render(self, request: Any) -> bytes:
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", self.content_type)
        return self.body


class _NotHttp(protocol.Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"SSH-2.0-OpenSSH_9.2\r\n")
        self.transport.loseConnection()


class BrokerAnswerTests(TestCase):
    """ctl against things on 127.0.0.1 that are not (or not quite) the broker screen."""

    timeout = 60

    def listen(self, factory: Any) -> str:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    def site(self, status: int, content_type: bytes, body: bytes) -> str:
        return self.listen(Site(_Fixed(status, content_type, body)))

    async def failure(self, url: str, *argv: str) -> tuple[int, str]:
        """ctl.run in a thread (it blocks): the CtlError's status and one-line message."""
        def call() -> tuple[int, str]:
            try:
                ctl.run(["--url", url, "--token", "t0ken-0123456789-abcdef", *argv])
            except ctl.CtlError as exc:
                return exc.status, str(exc)
            raise AssertionError("no CtlError")
        status, message = await threads.deferToThread(call)
        self.assertNotIn("\n", message)
        return status, message

    @defer.inlineCallbacks
    def test_connection_refused(self) -> Any:
        """Nothing listening: exit 1, 'cannot reach the broker'."""
        url = f"http://127.0.0.1:{closed_port()}"
        status, message = yield defer.ensureDeferred(self.failure(url, "status"))
        self.assertEqual(status, 1)
        self.assertIn(f"cannot reach the broker at {url}", message)
        self.assertIn("refused", message)

    @defer.inlineCallbacks
    def test_not_http_at_all(self) -> Any:
        """A port that speaks another protocol (an SSH banner): exit 1, one line."""
        factory = protocol.ServerFactory.forProtocol(_NotHttp)
        url = self.listen(factory)
        status, message = yield defer.ensureDeferred(self.failure(url, "servers"))
        self.assertEqual(status, 1)
        self.assertIn(f"{url} does not answer HTTP (it said 'SSH-2.0-OpenSSH_9.2\\r\\n')", message)

    @defer.inlineCallbacks
    def test_answer_that_is_not_json(self) -> Any:
        """An HTML page where JSON was expected: exit 1, it says it is not the broker screen."""
        url = self.site(200, b"text/html", b"<html>hello</html>")
        status, message = yield defer.ensureDeferred(self.failure(url, "status"))
        self.assertEqual(status, 1)
        self.assertIn("did not answer JSON", message)

    @defer.inlineCallbacks
    def test_json_that_is_not_the_broker_api(self) -> Any:
        """JSON of another shape: exit 1 (the table code must not raise KeyError)."""
        url = self.site(200, b"application/json", b'{"hello": "world"}')
        for command in ("status", "servers", "sessions"):
            status, message = yield defer.ensureDeferred(self.failure(url, command))
            self.assertEqual(status, 1)
            self.assertIn("JSON that is not the broker's", message)

    @defer.inlineCallbacks
    def test_http_error_without_json(self) -> Any:
        """An HTTP error with a text body: exit 1 with the status and reason."""
        url = self.site(500, b"text/plain", b"boom")
        status, message = yield defer.ensureDeferred(self.failure(url, "reload"))
        self.assertEqual((status, message), (1, "POST /api/v1/reload: HTTP 500: Internal Server Error"))
