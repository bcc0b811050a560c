"""``twistd -n protheus-license --config PATH``: wiring only."""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import gatherResults
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from protheus_broker import __version__
from protheus_broker.ini import ConfigError
from protheus_broker.license.journal import FileJournal, JournalCorrupt, open_journal
from protheus_broker.license.leases import LeaseTable
from protheus_broker.license.server import LicenseFactory, LicenseServer
from protheus_broker.license.settings import (
    DEFAULT_LICENSE_CONFIG_PATH,
    LicenseServerConfig,
    load_license_config,
)
from protheus_broker.license.status import StatusResource
from protheus_broker.tls.options import server_options
from protheus_broker.web.http import QuietSite

log = Logger()

#: How often leases past their deadline or their client's grace are ended.
TICK_INTERVAL = 1.0


class Options(usage.Options):
    synopsis = "[--config PATH]"
    longdesc = (
        "License server for protheus-broker: counted seats per license class (TOTVS_I and one per "
        "application code) leased to brokers over an authenticated AMP channel (shared secret or "
        "mutual TLS), journalled so that a restart keeps every lease. SIGHUP reloads the seat counts."
    )
    optParameters = [
        ["config", "c", DEFAULT_LICENSE_CONFIG_PATH, "The license server's ini file."],
    ]


class LicenseService(MultiService):
    """The AMP listener, the status listener, the lease clock and the journal's compaction."""

    def __init__(self, reactor: Any, config: LicenseServerConfig) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.table = LeaseTable(reactor, config.counts, config.limits)
        self.server = LicenseServer(reactor, config, self.table)
        self.journal = FileJournal(config.journal)
        self.port: Any = None
        self.status_port: Any = None
        self._previous_sighup: Any = None
        for interval, call in ((TICK_INTERVAL, self.table.tick), (config.compact_interval, self.compact)):
            timer = TimerService(interval, call)
            timer.clock = reactor
            timer.setServiceParent(self)

    def privilegedStartService(self) -> None:
        config = self.config
        try:
            factory = LicenseFactory(self.server)
            if config.tls is not None:
                self.port = self.reactor.listenSSL(config.port, factory, server_options(config.tls),
                                                   interface=config.interface)
            else:
                self.port = self.reactor.listenTCP(config.port, factory, interface=config.interface)
        except CannotListenError as exc:
            raise SystemExit(f"protheus-license: {config.path}: PORT: cannot listen on "
                             f"{config.interface or '*'}:{config.port}: {exc.socketError}") from None
        try:
            self.status_port = self.reactor.listenTCP(config.status_port, QuietSite(StatusResource(self.server)),
                                                      interface=config.status_interface)
        except CannotListenError as exc:
            self.port.stopListening()
            raise SystemExit(f"protheus-license: {config.path}: STATUS_PORT: cannot listen on "
                             f"{config.status_interface}:{config.status_port}: {exc.socketError}") from None
        super().privilegedStartService()

    def startService(self) -> None:
        # The journal after privileges are dropped (its files belong to the service user); the
        # reactor is not running yet, so no broker is answered before the replay.
        try:
            replayed = open_journal(self.journal, self.table)
        except JournalCorrupt as exc:
            raise SystemExit(f"protheus-license: JOURNAL {exc}") from None
        except OSError as exc:
            raise SystemExit(f"protheus-license: {self.config.path}: JOURNAL: cannot use "
                             f"{self.config.journal!r}: {exc.strerror or exc}") from None
        try:
            self._previous_sighup = signal.signal(signal.SIGHUP,
                                                  lambda *_: self.reactor.callFromThread(self.reload))
        except ValueError:  # not the main thread (tests): reload() is still callable
            self._previous_sighup = None
        for warning in self.config.warnings:
            log.warn("config: {remark}", remark=warning)
        host, status = self.port.getHost(), self.status_port.getHost()
        config = self.config
        log.info("protheus-license {version} listening on {host}:{port} ({auth}); status on "
                 "{status_host}:{status_port}; seats: {seats}; journal {journal}: {leases} leases "
                 "kept from {records} records", version=__version__, host=host.host, port=host.port,
                 auth="mutual TLS" + (" + shared secret" if config.secret else "")
                 if config.tls else "shared secret",
                 status_host=status.host, status_port=status.port,
                 seats=", ".join(f"{name} {count}" for name, count in sorted(config.counts.items())),
                 journal=config.journal, leases=len(self.table.leases), records=replayed.records)
        super().startService()

    def compact(self) -> None:
        """Rewrite the journal as a snapshot of the live leases, if it grew since the last time."""
        if self.journal.fd is None or not self.journal.appended:
            return
        try:
            self.journal.compact(self.table.leases.values())
        except OSError as exc:
            log.error("journal {path}: compaction failed: {why}; appending to the old file",
                      path=self.journal.path, why=exc.strerror or str(exc))

    def reload(self) -> bool:
        """Re-read the config (SIGHUP): seat counts, lease times, bounds, secret, admin token."""
        try:
            config = load_license_config(self.config.path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: {error}", error=str(exc))
            return False
        for key in self.config.restart_needed(config):
            log.warn("reload: {key} changed; restart to apply it", key=key)
        for warning in config.warnings:
            log.warn("config: {remark}", remark=warning)
        self.config = config
        self.server.reload(config)
        log.info("reloaded {path}: seats: {seats}", path=config.path,
                 seats=", ".join(f"{name} {count}" for name, count in sorted(config.counts.items())))
        return True

    def stopService(self) -> Any:
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        super().stopService()
        self.compact()
        self.journal.close()
        stopping = [port.stopListening() for port in (self.port, self.status_port) if port is not None]
        self.port = self.status_port = None
        return gatherResults([d for d in stopping if d is not None])


def makeService(options: Options) -> LicenseService:
    from twisted.internet import reactor

    try:
        config = load_license_config(options["config"])
    except ConfigError as exc:
        raise SystemExit(f"protheus-license: {exc}") from None
    return LicenseService(reactor, config)
