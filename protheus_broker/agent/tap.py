"""``twistd -n protheus-agent --config PATH``: wiring only."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from protheus_broker import __version__
from protheus_broker.agent.agent import Agent, AgentFactory
from protheus_broker.agent.farm import Farm
from protheus_broker.agent.launcher import ProcessLauncher
from protheus_broker.agent.settings import AgentConfig, DEFAULT_AGENT_CONFIG_PATH, load_agent_config
from protheus_broker.ini import ConfigError
from protheus_broker.tls.options import server_options

log = Logger()


class Options(usage.Options):
    synopsis = "[--config PATH]"
    longdesc = (
        "Agent beside TOTVS AppServers: measures each [APPSERVER_<name>] (memory, CPU, threads, "
        "users, accepts connections) and reports to the protheus-broker over AMP (shared secret "
        "or mutual TLS)."
    )
    optParameters = [
        ["config", "c", DEFAULT_AGENT_CONFIG_PATH, "The agent's ini file."],
    ]


class AgentService(MultiService):
    """Listens for brokers and samples the watched AppServers every SAMPLE_INTERVAL."""

    def __init__(self, reactor: Any, config: AgentConfig, agent: Agent | None = None) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.agent = agent or Agent(reactor, config)
        if self.agent.farm is None and config.farm is not None:
            self.agent.farm = Farm(reactor, config.farm, ProcessLauncher(reactor))
        self.factory = AgentFactory(self.agent)
        self.port: Any = None
        sampler = TimerService(config.sample_interval, self.agent.sample_all)
        sampler.clock = reactor
        sampler.setServiceParent(self)

    def privilegedStartService(self) -> None:
        config = self.config
        try:
            if config.tls is not None:

                self.port = self.reactor.listenSSL(config.port, self.factory, server_options(config.tls),
                                                   interface=config.interface)
            else:
                self.port = self.reactor.listenTCP(config.port, self.factory, interface=config.interface)
        except CannotListenError as exc:
            raise SystemExit(f"protheus-agent: {config.path}: PORT: cannot listen on "
                             f"{config.interface or '*'}:{config.port}: {exc.socketError}") from None
        super().privilegedStartService()

    def startService(self) -> None:
        for warning in self.config.warnings:
            log.warn("config: {remark}", remark=warning)
        host = self.port.getHost()
        log.info("protheus-agent {version} listening on {host}:{port} ({auth}); watching {watched}",
                 version=__version__, host=host.host, port=host.port,
                 auth="mutual TLS" + (" + shared secret" if self.config.secret else "")
                 if self.config.tls else "shared secret",
                 watched="; ".join(f"{w.name} port {w.port} ({w.found_by})" for w in self.config.appservers)
                 or "no AppServer")
        farm = self.config.farm
        if farm is not None:
            log.info("farm host: up to {max} nodes on {host}:{first}..{last}, templates {templates}",
                     max=farm.max_nodes, host=farm.host, first=farm.base_port + 1,
                     last=farm.base_port + farm.max_nodes, templates=", ".join(sorted(farm.templates)))
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        if self.agent.farm is not None:
            self.agent.farm.stop_all()
        if self.port is not None:
            return self.port.stopListening()
        return None


def makeService(options: Options) -> AgentService:
    from twisted.internet import reactor

    try:
        config = load_agent_config(options["config"])
    except ConfigError as exc:
        raise SystemExit(f"protheus-agent: {exc}") from None
    return AgentService(reactor, config)
