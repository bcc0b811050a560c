"""``twistd -n protheus-appserver-sim --port ENDPOINT --name NAME``: a sample AppServer."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from .sim import AppServerSimFactory

log = Logger()


class Options(usage.Options):
    synopsis = "[--port ENDPOINT] [--name NAME]"
    longdesc = "A stand-in TOTVS AppServer for demos and tests: greets with its name, then echoes."
    optParameters = [
        ["port", "p", "tcp:5000:interface=127.0.0.1", "Listening endpoint (tcp:0 picks a port)."],
        ["name", "n", "sim", "Name sent in the greeting line."],
        ["ballast-mb", None, 0, "Hold this many MiB of memory (to make servers differ).", int],
    ]
    optFlags = [["no-greeting", None, "Echo only, no greeting line (for benchmarks)."]]


class SimService(Service):
    """Listens on an endpoint string and logs the real address (port 0 picks one)."""

    def __init__(self, reactor: Any, endpoint: str, factory: AppServerSimFactory) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.factory = factory
        self.port: Any = None

    def privilegedStartService(self) -> None:
        deferred = serverFromString(self.reactor, self.endpoint).listen(self.factory)
        deferred.addCallback(self._listening)
        deferred.addErrback(self._failed)

    def _listening(self, port: Any) -> None:
        self.port = port
        host = port.getHost()
        log.info("protheus-appserver-sim {name} listening on {host}:{port}",
                 name=self.factory.name, host=host.host, port=host.port)

    def _failed(self, failure: Any) -> None:
        log.error("protheus-appserver-sim {name}: cannot listen on {endpoint}: {error}",
                  name=self.factory.name, endpoint=self.endpoint, error=failure.getErrorMessage())
        self.reactor.stop()

    def stopService(self) -> Any:
        super().stopService()
        return self.port.stopListening() if self.port is not None else None


def makeService(options: Options) -> SimService:
    from twisted.internet import reactor

    factory = AppServerSimFactory(options["name"], greet=not options["no-greeting"],
                                  ballast_mb=options["ballast-mb"])
    return SimService(reactor, options["port"], factory)
