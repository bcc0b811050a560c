"""The broker screen as a twisted service: the admin endpoint and the chart's sampler."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure

from protheus_broker.web.settings import AdminConfig
from protheus_broker.web.http import Access, AdminResource, QuietSite
from protheus_broker.web.model import Broker, ConnectionHistory
from protheus_broker.web.port_status import HttpStatusRecogniser

log = Logger()


class AdminService(MultiService):
    """Listens on [BROKER_ADMIN] ENDPOINT and samples connections per server for the chart."""

    def __init__(self, reactor: Any, broker: Broker, config: AdminConfig) -> None:
        super().__init__()
        self.reactor = reactor
        self.broker = broker
        self.config = config
        self.history = ConnectionHistory(config.history_samples)
        self.access = Access(broker)  # shared with the port's status: one limiter, one verifier
        self.resource = AdminResource(broker, self.history, self.access)
        self.site = QuietSite(self.resource, reactor=reactor)
        self.port: Any = None
        sampler = TimerService(config.history_interval, self._sample)
        sampler.clock = reactor
        sampler.setServiceParent(self)

    def _sample(self) -> None:
        self.history.sample_units(self.reactor.seconds(), self.broker.units)

    def privilegedStartService(self) -> None:
        endpoint = serverFromString(self.reactor, self.config.endpoint)
        result: list[Any] = []
        listening = endpoint.listen(self.site)

        def keep(outcome: Any) -> Any:
            result.append(outcome)
            return outcome

        listening.addBoth(keep)
        if result:
            listening.addErrback(lambda _: None)  # handled here, synchronously
        if not result:  # an endpoint that listens later reports it when it does
            listening.addCallback(self._listening)
            listening.addErrback(lambda f: log.error("broker screen: cannot listen on {endpoint}: "
                                                     "{why}", endpoint=self.config.endpoint,
                                                     why=f.getErrorMessage()))
        elif isinstance(result[0], Failure):
            raise SystemExit(f"protheus-broker: {self.broker.config.path}: [BROKER_ADMIN] ENDPOINT: "
                             f"cannot listen on {self.config.endpoint}: {result[0].getErrorMessage()}")
        else:
            self._listening(result[0])
        super().privilegedStartService()

    def _listening(self, port: Any) -> None:
        self.port = port
        host = port.getHost()
        where = f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}" if hasattr(host, "port") \
            else str(getattr(host, "name", host))
        log.info("broker screen at http://{where}/ (JSON /api/v1/status, Prometheus /metrics)",
                 where=where, admin_endpoint=self.config.endpoint)

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


def add_admin(broker: Any, reactor: Any, config: AdminConfig) -> AdminService:
    """Attach the broker screen to a ``BrokerService``: its admin endpoint and, with
    PORT_STATUS, the status query on every unit's port."""

    service = AdminService(reactor, broker, config)
    service.setServiceParent(broker)
    if config.port_status:
        for unit in broker.units:
            unit.factory.recognisers.append(HttpStatusRecogniser(broker, reactor, service.access))
    return service
