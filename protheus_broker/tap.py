"""``twistd -n protheus-broker --config PATH``: wiring only."""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.error import CannotListenError
from twisted.logger import Logger, globalLogPublisher
from twisted.python import usage

from protheus_broker import __version__
from protheus_broker.balancing.methods import make_balancer
from protheus_broker.config import BrokerConfig, DEFAULT_CONFIG_PATH, load_config
from protheus_broker.ini import ConfigError
from protheus_broker.balancing.methods import SortMethod
from protheus_broker.desktop.settings import DesktopBalanceConfig
from protheus_broker.logs import console_file_observer
from protheus_broker.monitoring.monitor import make_monitor
from protheus_broker.balancing.pool import ServerPool
from protheus_broker.desktop.proxy import BrokerFactory
from protheus_broker.resume.broker import ResumableSessions
from protheus_broker.desktop.tls import SessionTLS
from protheus_broker.web.service import add_admin

log = Logger()


class Options(usage.Options):
    synopsis = "[--config PATH]"
    longdesc = (
        "Load-balancing broker for TOTVS Protheus AppServers: SmartClient desktop sessions are "
        "spread over the REMOTE_SERVER_xx of [BALANCE_SMART_CLIENT_DESKTOP] by SORT_METHOD. "
        "SIGHUP reloads the config without dropping sessions."
    )
    optParameters = [
        ["config", "c", DEFAULT_CONFIG_PATH, "The broker's appserver.ini."],
    ]


def _balancer(desktop: DesktopBalanceConfig) -> Any:
    monitoring = desktop.monitoring
    costs = {SortMethod.SERVER_MEMORY: float(monitoring.session_memory_bytes),
             SortMethod.SERVER_CPU: monitoring.session_cpu_percent}
    return make_balancer(desktop.effective_sort_method, desktop.metrics_max_age, costs)


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


class BrokerService(MultiService):
    """The broker: one listener and its pool, built from one config, reloadable on SIGHUP."""

    def __init__(self, reactor: Any, config: BrokerConfig) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        desktop = config.desktop
        self.pool = ServerPool(desktop.servers, _balancer(desktop), clock=reactor,
                               suspect_time=desktop.monitoring.suspect_time)
        self.monitor = make_monitor(reactor, self.pool, desktop.monitoring_type, desktop.monitoring,
                                    connect_timeout=desktop.connect_timeout)
        if self.monitor is not None:
            self.monitor.setServiceParent(self)
        resumable = ResumableSessions(reactor, desktop.resume) if desktop.resume.enabled else None
        self.factory = BrokerFactory(
            reactor, self.pool, connect_timeout=desktop.connect_timeout,
            max_sessions=desktop.max_sessions, sort_method=desktop.effective_sort_method.value,
            first_bytes_wait=desktop.first_bytes_wait,
            first_response_timeout=desktop.first_response_timeout,
            max_pending_per_address=desktop.max_pending_per_address,
            max_pending=desktop.max_pending,
            wait_for_server=desktop.wait_for_server,
            recognisers=[resumable.recogniser] if resumable is not None else [],
        )
        self.factory.standby = resumable
        self.session_tls = SessionTLS(reactor, desktop.tls, self.factory)  # ConfigError: bad file
        if config.admin is not None:  # the broker screen ([BROKER_ADMIN])
            add_admin(self, reactor, config.admin)
        self.port: Any = None
        self.started_at = reactor.seconds()
        self._console: Any = None
        self._previous_sighup: Any = None

    def privilegedStartService(self) -> None:
        desktop = self.config.desktop
        try:
            self.port = self.reactor.listenTCP(
                desktop.local_port, self.session_tls.listening_factory(), backlog=1024,
                interface=desktop.local_interface,
            )
        except CannotListenError as exc:
            where = f"{desktop.local_interface or '*'}:{desktop.local_port}"
            raise SystemExit(
                f"protheus-broker: {self.config.path}: LOCAL_SERVER_PORT: cannot listen on "
                f"{where}: {exc.socketError}"
            ) from None
        super().privilegedStartService()

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
        host = self.port.getHost()
        desktop = self.config.desktop
        open_files_limit(desktop.max_sessions, desktop.max_pending)
        self.session_tls.warn_at_startup()
        log.info("SmartClient sessions: {tls}", tls=self.session_tls.describe())
        log.info(
            "protheus-broker {version} listening on {host}:{port} ({service}); {count} AppServers, "
            "SORT_METHOD={sort_method}, MONITORING_TYPE={monitoring}",
            version=__version__, host=host.host, port=host.port, service=desktop.service_name,
            count=len(self.pool), sort_method=desktop.effective_sort_method.value,
            monitoring=desktop.monitoring_type.value,
        )
        super().startService()

    def stopService(self) -> Any:
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
        if self._console is not None:
            globalLogPublisher.removeObserver(self._console[0])
            self._console[1].close()
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()
        return None

    def reload(self) -> bool:
        """Re-read the config and apply it without dropping any session.  False if it is bad."""
        try:
            new = load_config(self.config.path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: {error}", error=str(exc))
            return False
        for warning in new.warnings:
            log.warn("config: {remark}", remark=warning)
        old, desktop = self.config.desktop, new.desktop
        try:
            self.session_tls.reload(desktop.tls)  # certificates re-read; open sessions keep theirs
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: {error}", error=str(exc))
            return False
        if (desktop.local_port, desktop.local_interface) != (old.local_port, old.local_interface):
            log.warn("reload: LOCAL_SERVER_PORT/LOCAL_SERVER_INTERFACE changed; restart to apply")
        result = self.pool.reconfigure(desktop.servers)
        self.pool.balancer = _balancer(desktop)
        self.pool.suspect_time = desktop.monitoring.suspect_time
        if (desktop.monitoring_type, desktop.monitoring.tls, desktop.monitoring.heartbeat_interval,
                desktop.monitoring.probe_interval) != (old.monitoring_type, old.monitoring.tls,
                                                        old.monitoring.heartbeat_interval,
                                                        old.monitoring.probe_interval):
            log.warn("reload: MONITORING_TYPE, AGENT_SSL_* or the intervals changed; restart to apply")
        elif self.monitor is not None:
            self.monitor.reconfigure(desktop.monitoring)  # type: ignore[attr-defined]
        self.factory.connect_timeout = desktop.connect_timeout
        self.factory.max_sessions = desktop.max_sessions
        self.factory.first_bytes_wait = desktop.first_bytes_wait
        self.factory.first_response_timeout = desktop.first_response_timeout  # new sessions
        self.factory.wait_for_server = desktop.wait_for_server  # new sessions
        self.factory.pending.per_address = desktop.max_pending_per_address
        self.factory.pending.total = desktop.max_pending
        self.factory.sort_method = desktop.effective_sort_method.value
        if self.factory.standby is not None:  # new links and drops use the new STANDBY_TIME etc.
            self.factory.standby.config = desktop.resume
        if desktop.resume.enabled != old.resume.enabled:
            log.warn("reload: RESUME_ENABLE changed; restart to apply")
        if _admin_shape(self.config) != _admin_shape(new):  # TOKEN_HASH, READ_ACCESS: live
            log.warn("reload: [BROKER_ADMIN] (the section, ENDPOINT, PORT_STATUS or HISTORY_*) "
                     "changed; restart to apply (TOKEN_HASH and READ_ACCESS apply now)")
        self.config = new
        log.info(
            "reloaded {path}: added {added}, removed {removed}, draining {draining}, kept {kept}; "
            "SORT_METHOD={sort_method}", path=new.path, added=result.added or "none",
            removed=result.removed or "none", draining=result.draining or "none",
            kept=len(result.kept), sort_method=desktop.effective_sort_method.value,
        )
        return True


def makeService(options: Options) -> BrokerService:
    from twisted.internet import reactor

    try:
        config = load_config(options["config"])
        return BrokerService(reactor, config)
    except ConfigError as exc:
        raise SystemExit(f"protheus-broker: {exc}") from None
