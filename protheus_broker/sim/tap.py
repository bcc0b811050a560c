"""``twistd -n protheus-appserver-sim --port ENDPOINT --name NAME [--http]``: a sample AppServer
(the SmartClient echo one, or with ``--http`` the HTTP one of sim/http.py)."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.address import UNIXAddress
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.logger import Logger
from twisted.python import usage

from protheus_broker.sim.appserver import AppServerSimFactory
from protheus_broker.sim.http import SimHttpSite

log = Logger()


class Options(usage.Options):
    synopsis = "[--port ENDPOINT | --unix PATH] [--name NAME] [--http]"
    longdesc = "A stand-in TOTVS AppServer for demos and tests: greets with its name, then echoes."
    optParameters = [
        ["port", "p", "tcp:5000:interface=127.0.0.1", "Listening endpoint (tcp:0 picks a port)."],
        ["unix", None, None, "Listen on this Unix socket path instead of --port."],
        ["name", "n", "sim", "Name sent in the greeting line."],
        ["ballast-mb", None, 0, "Hold this many MiB of memory (to make servers differ).", int],
        ["tls-cert", None, None, "Serve TLS with this PEM certificate (an AppServer with SSL)."],
        ["tls-key", None, None, "The PEM key of --tls-cert."],
        ["tls-client-ca", None, None, "Require a client certificate signed by this CA."],
    ]
    optFlags = [
        ["no-greeting", None, "Echo only, no greeting line (for benchmarks)."],
        ["http", None, "Serve HTTP (a WebApp/REST stand-in: session page, /ws, /bytes/N, /echo, /health, /slow)."],
    ]


class SimService(Service):
    """Listens on an endpoint string and logs the real address (port 0 picks one)."""

    def __init__(self, reactor: Any, endpoint: str, factory: Any) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.factory = factory
        self.port: Any = None
        self.name = getattr(factory, "name", None) or factory.wrappedFactory.name

    def privilegedStartService(self) -> None:
        deferred = serverFromString(self.reactor, self.endpoint).listen(self.factory)
        deferred.addCallback(self._listening)
        deferred.addErrback(self._failed)

    def _listening(self, port: Any) -> None:
        self.port = port
        host = port.getHost()
        if isinstance(host, UNIXAddress):
            log.info("protheus-appserver-sim {name} listening on unix:{path}", name=self.name,
                     path=host.name.decode() if isinstance(host.name, bytes) else host.name)
            return
        log.info("protheus-appserver-sim {name} listening on {host}:{port}",
                 name=self.name, host=host.host, port=host.port)

    def _failed(self, failure: Any) -> None:
        log.error("protheus-appserver-sim {name}: cannot listen on {endpoint}: {error}",
                  name=self.name, endpoint=self.endpoint, error=failure.getErrorMessage())
        self.reactor.callWhenRunning(self.reactor.stop)  # not yet running: stop() would be lost

    def stopService(self) -> Any:
        super().stopService()
        return self.port.stopListening() if self.port is not None else None


def makeService(options: Options) -> SimService:
    from twisted.internet import reactor

    if options["unix"]:
        options["port"] = f"unix:{quoteStringArgument(options['unix'])}"

    factory: Any
    if options["http"]:
        factory = SimHttpSite(options["name"], reactor)
    else:
        factory = AppServerSimFactory(options["name"], greet=not options["no-greeting"],
                                      ballast_mb=options["ballast-mb"])
    if options["tls-cert"]:
        return SimService(reactor, options["port"], tls_factory(factory, options["tls-cert"],
                                                                options["tls-key"] or options["tls-cert"],
                                                                options["tls-client-ca"]))
    return SimService(reactor, options["port"], factory)


def tls_factory(factory: Any, cert: str, key: str, client_ca: str | None = None) -> Any:
    """*factory* behind TLS with this certificate (dates not checked: tests serve expired ones)."""
    from twisted.internet import ssl
    from twisted.protocols.tls import TLSMemoryBIOFactory

    factory.tls = True
    with open(cert, "rb") as cert_file, open(key, "rb") as key_file:
        mine = ssl.PrivateCertificate.loadPEM(cert_file.read() + b"\n" + key_file.read())
    if client_ca:
        with open(client_ca, "rb") as ca_file:
            options = mine.options(ssl.Certificate.loadPEM(ca_file.read()))
    else:
        options = mine.options()
    return TLSMemoryBIOFactory(options, False, factory)
