"""SmartClient TLS end to end with real twistd processes: broker plugin + TLS sample AppServer."""

from __future__ import annotations

import shutil
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import ClientCreator

from protheus_broker.demo.children import TwistdChild, twistd_argv
from protheus_broker.sim.appserver import greeting

from .helpers import ProcessTestCase
from .test_session_tls_sockets import Reader
from .tls_fixtures import certs


class TLSProcessTests(ProcessTestCase):
    timeout = 60

    async def tls_client(self, port: int, name: str, number: int) -> Reader:
        client = Reader(expect=len(greeting(name, number)))
        await ClientCreator(reactor, lambda: client).connectSSL("127.0.0.1", port, certs().client_options())
        await client.complete
        self.assertEqual(client.head, greeting(name, number))
        return client

    @defer.inlineCallbacks
    def test_twistd_termination_upstream_and_sighup(self) -> Any:
        """twistd protheus-broker terminating TLS and verifying a TLS sample AppServer
        (protheus-appserver-sim --tls-cert); SIGHUP with a new certificate file: new clients get
        it, the open session keeps echoing."""
        yield defer.ensureDeferred(self._scenario())

    async def _scenario(self) -> None:
        c = certs()
        sim = self.start("sim", twistd_argv(
            "protheus-appserver-sim", "--name", "tls1", "--port", "tcp:0:interface=127.0.0.1",
            "--tls-cert", c.cert("appserver"), "--tls-key", c.key("appserver")))
        sim_port = await sim.listening()
        directory = self.mktemp_dir()
        cert, key = shutil.copy(c.cert("broker"), directory), shutil.copy(c.key("broker"), directory)
        path = self.write_ini(
            "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
            f"SORT_METHOD = CONNECTION\nMONITORING_TYPE = DISABLED\nREMOTE_SERVER_01 = 127.0.0.1 {sim_port}\n"
            f"SSL_ENCRYPT_UPSTREAM = 1\nSSL_UPSTREAM_CA = {c.ca_path}\n"
            f"[SSLConfigure]\nCertificateServer = {cert}\nKeyServer = {key}\n")
        broker: TwistdChild = self.start("broker", twistd_argv("protheus-broker", "--config", path))
        port = await broker.listening()
        self.assertIn("SmartClient sessions: TLS terminated (TLS 1.2+), TLS to AppServers", broker.text())

        first = await self.tls_client(port, "tls1", 1)
        self.assertEqual(first.transport.getPeerCertificate().get_subject().CN, "broker")

        shutil.copy(c.cert("broker2"), cert)
        shutil.copy(c.key("broker2"), key)
        broker.signal("HUP")
        while "reloaded" not in broker.text():
            await task.deferLater(reactor, 0.05, lambda: None)
        second = await self.tls_client(port, "tls1", 2)
        self.assertEqual(second.transport.getPeerCertificate().get_subject().CN, "broker2")
        first.expect, first.complete = first.received + 5, defer.Deferred()
        first.transport.write(b"hello")
        await first.complete
        for client in (first, second):
            client.transport.loseConnection()
            await client.done
