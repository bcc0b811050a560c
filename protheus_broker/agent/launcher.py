"""Real node processes for a farm host: ``reactor.spawnProcess`` in their own process group
(SIGTERM to them if the agent dies), output lines to the agent's log, readiness by connecting."""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from protheus_broker.agent.farm import INodeLauncher
from protheus_broker.processes import LineOutput, ProcessGroup, port_free, spawn_in_group

log = Logger()

PROBE_TIMEOUT = 2.0


class _Quiet(Factory):
    noisy = False
    protocol = Protocol


class _Output(LineOutput):
    def __init__(self, label: str, ended: Callable[[str], None]) -> None:
        super().__init__(self._log, ended)
        self.label = label

    def _log(self, fd: int, text: str) -> None:
        log.info("farm: {label}: {line}", label=self.label, line=text)


@implementer(INodeLauncher)
class ProcessLauncher:
    """Starts farm nodes on this host."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def launch(self, argv: list[str], env: dict[str, str], label: str,
               ended: Callable[[str], None]) -> ProcessGroup:
        full_env = dict(os.environ)
        full_env.update(env)
        return ProcessGroup(spawn_in_group(self.reactor, _Output(label, ended), argv, full_env).pid)

    def port_free(self, host: str, port: int) -> bool:
        return port_free(host, port)

    def probe(self, host: str, port: int) -> Deferred[bool]:
        d: Deferred[Any] = HostnameEndpoint(self.reactor, host, port, timeout=PROBE_TIMEOUT).connect(_Quiet())

        def connected(protocol: Any) -> bool:
            protocol.transport.loseConnection()
            return True
        return d.addCallbacks(connected, lambda _: False)
