"""``twistd -n protheus-broker --config PATH``: wiring only."""

from __future__ import annotations

import itertools
import signal
from typing import Any, Callable, Sequence

from twisted.application.service import MultiService
from twisted.logger import Logger, globalLogPublisher
from twisted.python import usage

from protheus_broker.config import BrokerConfig, DEFAULT_CONFIG_PATH, load_config
from protheus_broker.deps.checker import DependencyRegistry
from protheus_broker.deps.state import LICENSE_CLIENT, ChannelDependency
from protheus_broker.desktop.settings import DESKTOP_SECTION
from protheus_broker.desktop.unit import DesktopUnit
from protheus_broker.http.settings import HTTP_SECTION, WEB_SERVICES_SECTION
from protheus_broker.http.unit import HttpUnit, WebServicesUnit
from protheus_broker.ini import ConfigError
from protheus_broker.license.client import LicenseClient
from protheus_broker.logs import console_file_observer
from protheus_broker.web.service import add_admin

log = Logger()


class Options(usage.Options):
    synopsis = "[--config PATH]"
    longdesc = (
        "Load-balancing broker for TOTVS Protheus AppServers: each [BALANCE_*] section of the "
        "appserver.ini (SMART_CLIENT_DESKTOP, HTTP, WEB_SERVICES) is a unit spreading its "
        "sessions or requests over its REMOTE_SERVER_xx by SORT_METHOD. SIGHUP reloads the "
        "config without dropping sessions."
    )
    optParameters = [
        ["config", "c", DEFAULT_CONFIG_PATH, "The broker's appserver.ini."],
    ]


def _admin_shape(config: BrokerConfig) -> tuple[Any, ...] | None:
    """What of [BROKER_ADMIN] is fixed at start (the rest is read on each request)."""
    admin = config.admin
    if admin is None:
        return None
    return (admin.endpoint, admin.port_status, admin.history_interval, admin.history_samples)


#: File descriptors besides the sessions: listeners, logs, agent links, admin requests.
FD_MARGIN = 100


def fds_needed(max_sessions: int, max_pending: int) -> int:
    """Descriptors the caps can use: 2 per session (client and AppServer), 1 per pending
    connection not yet in a session, and a margin."""
    return 2 * max_sessions + max_pending + FD_MARGIN


def open_files_limit(max_sessions: int, max_pending: int, rlimit: Any = None) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one (as HAProxy does: Debian's default soft
    limit of 1,024 is a few hundred sessions), log the figure, and warn when it is below what
    MAX_SESSIONS and MAX_PENDING can use.  Returns (soft, hard); *rlimit* is the ``resource``
    module (a test passes a stand-in)."""
    if rlimit is None:
        import resource as rlimit
    soft, hard = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)
    if hard == rlimit.RLIM_INFINITY or hard > soft:
        target = hard if hard != rlimit.RLIM_INFINITY else max(soft, 1_048_576)
        try:
            rlimit.setrlimit(rlimit.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warn("cannot raise the open files limit from {soft} to {target}: {error}",
                     soft=soft, target=target, error=str(exc))
    needed = fds_needed(max_sessions, max_pending)
    log.info("open files limit {soft} (hard {hard})", soft=soft,
             hard="unlimited" if hard == rlimit.RLIM_INFINITY else hard)
    if max_sessions and soft < needed:
        log.warn("open files limit {soft} is below the {needed} that MAX_SESSIONS={max_sessions} "
                 "and MAX_PENDING={max_pending} can use (2 per session, 1 per pending connection, "
                 "{margin} spare): raise LimitNOFILE= in the systemd unit or lower MAX_SESSIONS",
                 soft=soft, needed=needed, max_sessions=max_sessions, max_pending=max_pending,
                 margin=FD_MARGIN)
    return soft, hard


#: The balance units this version serves: ``[BALANCE_*]`` section -> how to build its unit
#: (the section's reader is in :data:`protheus_broker.config.UNIT_READERS`).
UNIT_BUILDERS: dict[str, Callable[..., Any]] = {DESKTOP_SECTION: DesktopUnit, HTTP_SECTION: HttpUnit,
                                                WEB_SERVICES_SECTION: WebServicesUnit}


#: The units that take a license client (their Stateless=1 URIs take seats).
HTTP_UNITS = (HTTP_SECTION, WEB_SERVICES_SECTION)


class BrokerService(MultiService):
    """The broker: one balance unit per ``[BALANCE_*]`` section (listener, factory, pool,
    monitor, counters), the broker screen and the console log; reloadable on SIGHUP."""

    def __init__(self, reactor: Any, config: BrokerConfig, units: Sequence[Any] | None = None) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        #: session ids, unique across the units (the screen closes a session by its id)
        self.session_ids = itertools.count(1)
        #: the checks of the sections the units' DEPENDS_ON name, shared; started before the units
        self.dependencies = DependencyRegistry(reactor)
        self.dependencies.setServiceParent(self)
        self.dependencies.configure(config.dependencies)
        #: the one license client ([LICENSECLIENT]), shared by the HTTP units' license gates
        self.licenses = LicenseClient(reactor, config.license_client) if config.license_client else None
        if self.licenses is not None:
            self.licenses.setServiceParent(self)  # before the units: started before them, stopped after
            # DEPENDS_ON = LICENSECLIENT: the license channel's state, not a TCP check of SERVER:PORT
            self.dependencies.provide(LICENSE_CLIENT, ChannelDependency(LICENSE_CLIENT, self.licenses))
        if units is None:  # tests may hand units built directly
            units = [UNIT_BUILDERS[section](reactor, unit_config, name=section, path=config.path,
                                            ids=self.session_ids,
                                            **({"licenses": self.licenses} if section in HTTP_UNITS else {}))
                     for section, unit_config in config.units]
        self.units: list[Any] = list(units)
        for unit in self.units:
            unit.setServiceParent(self)
        self.dependencies.provide_units(config.dependencies, self.unit)  # UNIT = BALANCE_...
        self._depend(config)
        if config.admin is not None:  # the broker screen ([BROKER_ADMIN])
            add_admin(self, reactor, config.admin)
        self.started_at = reactor.seconds()
        self._console: Any = None
        self._previous_sighup: Any = None

    def _depend(self, config: BrokerConfig) -> None:
        """Hand each unit the dependencies its DEPENDS_ON names (none: it depends on nothing)."""
        for unit in self.units:
            dependencies = getattr(unit, "dependencies", None)
            if dependencies is not None:
                dependencies.use(self.dependencies.resolve(config.depends_on.get(unit.name, ())))

    def provide_dependency(self, name: str, dependency: Any) -> None:
        """Section *name*'s state is *dependency* (an IDependency) from now on, not a TCP check:
        the license client channel for LICENSECLIENT (deps.state.ChannelDependency)."""
        self.dependencies.provide(name, dependency)
        self._depend(self.config)

    def unit(self, name: str) -> Any:
        """The unit of section *name*, or None."""
        for unit in self.units:
            if unit.name == name:
                return unit
        return None

    @property
    def desktop(self) -> Any:
        """The SmartClient desktop unit (the first unit when a test built others)."""
        return self.unit(DESKTOP_SECTION) or self.units[0]

    # The desktop unit's parts, where callers from before units look for them.
    pool = property(lambda self: self.desktop.pool)
    factory = property(lambda self: self.desktop.factory)
    monitor = property(lambda self: self.desktop.monitor)
    session_tls = property(lambda self: self.desktop.session_tls)
    port = property(lambda self: self.desktop.port)

    def startService(self) -> None:
        # SIGHUP first: whoever reads "listening on" may reload at once.
        try:
            self._previous_sighup = signal.signal(
                signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload)
            )
        except ValueError:  # not the main thread (tests): reload() is still callable
            self._previous_sighup = None
        try:
            console = console_file_observer(self.config.general)
        except OSError as exc:  # checked at load: only a file that changed since gets here
            console = None
            log.error("config: ConsoleFile: cannot write {path!r}: {why}; logging to twistd's log "
                      "only", path=self.config.general.console_file, why=exc.strerror or str(exc))
        if console is not None:
            self._console = console
            globalLogPublisher.addObserver(console[0])
        for warning in self.config.warnings:
            log.warn("config: {remark}", remark=warning)
        if not self.config.general.console_log:
            log.warn("config: ConsoleLog=0: under twistd the log goes where twistd sends it "
                     "(--logfile, --syslog, the journal); it is not switched off")
        caps = [unit.config for unit in self.units]
        open_files_limit(sum(c.max_sessions for c in caps) if all(c.max_sessions for c in caps) else 0,
                         sum(c.max_pending for c in caps))
        super().startService()  # each unit logs where it listens
        if len(self.units) > 1:
            log.info("{count} balance units: {units}", count=len(self.units),
                     units="; ".join(f"[{unit.name}] {unit.describe()}" for unit in self.units))

    def stopService(self) -> Any:
        """Stop every unit and the screen; the Deferred fires when all of them have (twistd
        waits for it)."""
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        if self._console is not None:
            globalLogPublisher.removeObserver(self._console[0])
            self._console[1].close()
            self._console = None
        return super().stopService()

    def reload(self) -> bool:
        """Re-read the config and hand each unit its section, without dropping any session.
        False if the file is bad (nothing applied)."""
        try:
            new = load_config(self.config.path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: {error}", error=str(exc))
            return False
        for warning in new.warnings:
            log.warn("config: {remark}", remark=warning)
        running = {unit.name for unit in self.units}
        for section, _ in new.units:
            if section not in running:
                log.warn("reload: [{section}] is new; restart to serve it", section=section)
        for unit in self.units:
            unit_config = new.unit(unit.name)
            if unit_config is None:
                log.warn("reload: [{section}] is gone from the file; it keeps running with its "
                         "old config until a restart", section=unit.name)
                continue
            if not unit.reload(unit_config):
                return False
        if self.config.license_client != new.license_client:
            log.warn("reload: [LICENSECLIENT] changed; restart to apply")
        for unit in self.units:
            old_names, names = self.config.depends_on.get(unit.name, ()), new.depends_on.get(unit.name, ())
            if old_names != names:
                log.info("reload: [{section}] DEPENDS_ON {names} (was {old})", section=unit.name,
                         names=", ".join(names) or "nothing", old=", ".join(old_names) or "nothing")
        self.dependencies.configure(new.dependencies)
        self.dependencies.provide_units(new.dependencies, self.unit)
        self._depend(new)
        if _admin_shape(self.config) != _admin_shape(new):  # TOKEN_HASH, READ_ACCESS: live
            log.warn("reload: [BROKER_ADMIN] (the section, ENDPOINT, PORT_STATUS or HISTORY_*) "
                     "changed; restart to apply (TOKEN_HASH and READ_ACCESS apply now)")
        self.config = new
        return True


def makeService(options: Options) -> BrokerService:
    from twisted.internet import reactor

    try:
        config = load_config(options["config"])
        return BrokerService(reactor, config)
    except ConfigError as exc:
        raise SystemExit(f"protheus-broker: {exc}") from None
