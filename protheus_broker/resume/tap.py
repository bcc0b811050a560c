"""``twistd -n protheus-connect --config smartclient.ini``: the workstation connector; wiring only."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from protheus_broker import __version__
from protheus_broker.ini import ConfigError, read_file
from protheus_broker.resume.connector import ConnectorFactory
from protheus_broker.resume.settings import ConnectorConfig, parse_smartclient_ini

log = Logger()


class Options(usage.Options):
    synopsis = "--config smartclient.ini [--section NAME] [--listen-port PORT]"
    longdesc = (
        "Workstation connector for protheus-broker: SmartClient connects to 127.0.0.1, the "
        "connector carries each session to the broker over the resumable protocol, so sessions "
        "survive network drops for the broker's STANDBY_TIME (180 s by default). The broker is "
        "read from a smartclient.ini section (server=, port=, BrokerProxy=1)."
    )
    optParameters = [
        ["config", "c", None, "The smartclient.ini naming the broker."],
        ["section", "s", None, "Its section naming the broker (default: [drivers] active=)."],
        ["listen-port", "p", None, "Port SmartClient connects to (default: the broker's port).", int],
        ["listen-interface", None, "127.0.0.1", "Address to listen on (keep it local)."],
        ["keepalive", None, 1.0, "Seconds between keepalives; a link silent 4x this is dead.", float],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config PATH is required: the smartclient.ini naming the broker")


class ConnectorService(Service):
    """Listens for SmartClient on the workstation."""

    def __init__(self, reactor: Any, config: ConnectorConfig) -> None:
        self.reactor = reactor
        self.config = config
        self.factory = ConnectorFactory(reactor, config)
        self.port: Any = None

    def privilegedStartService(self) -> None:
        config = self.config
        try:
            self.port = self.reactor.listenTCP(config.listen_port, self.factory,
                                               interface=config.listen_interface)
        except CannotListenError as exc:
            raise SystemExit(f"protheus-connect: cannot listen on {config.listen_interface}:"
                             f"{config.listen_port}: {exc.socketError}") from None
        super().privilegedStartService()

    def startService(self) -> None:
        host = self.port.getHost()
        config = self.config
        log.info("protheus-connect {version} listening on {host}:{port}; sessions go to the broker "
                 "{broker_host}:{broker_port} ({path} [{section}])", version=__version__,
                 host=host.host, port=host.port, broker_host=config.broker_host,
                 broker_port=config.broker_port, path=config.path, section=config.section)
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        return self.port.stopListening() if self.port is not None else None


def makeService(options: Options) -> ConnectorService:
    from twisted.internet import reactor

    path = options["config"]
    try:
        config = parse_smartclient_ini(read_file(path), path, options["section"],
                                       options["listen-port"], options["listen-interface"],
                                       keepalive=options["keepalive"])
    except ConfigError as exc:
        raise SystemExit(f"protheus-connect: {exc}") from None
    return ConnectorService(reactor, config)
