"""The Kubernetes scaler: a Deployment's (or StatefulSet's) ``/scale`` subresource sets how many
AppServer pods run; the Service's EndpointSlices say which are ready, and those join the unit's
:class:`ServerPool` as members of source ``"kubernetes"`` (leaving ones drain).

EndpointSlices are listed, then watched with bookmarks from the list's resourceVersion; a watch
that ends resumes from the last resourceVersion seen; a 410 Gone (the HTTP status or an ERROR
event) lists again; other errors wait (doubling, up to BACKOFF_MAX) and retry.  Kubernetes 1.20
serves ``discovery.k8s.io/v1beta1`` only, current clusters ``v1``: v1 is tried first.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from protheus_broker.balancing.pool import ServerPool
from protheus_broker.balancing.servers import RemoteServer
from protheus_broker.ini import ConfigError
from protheus_broker.kube.client import KubeClient, KubeError, make_http
from protheus_broker.kube.endpoints import BadObject, EndpointTable, resource_version
from protheus_broker.kube.kubeconfig import KubeConfigError
from protheus_broker.kube.settings import KubeSettings
from protheus_broker.scaling.interfaces import IScaler

log = Logger()

#: The pool source of the members this scaler adds.
SOURCE = "kubernetes"

#: The first pause after an error; it doubles up to BACKOFF_MAX.
BACKOFF_FIRST = 1.0

#: A watch that ends sooner than this after opening, with no event, counts as an error (no
#: tight loop against a server that closes every watch at once).
MIN_WATCH_TIME = 1.0


class Gone(KubeError):
    """410 Gone: the resourceVersion is too old (compacted); list again."""


def http_status(failure: Failure) -> int:
    """The HTTP status of a failed request (0: not an HTTP answer)."""
    error = failure.value
    return error.status if isinstance(error, KubeError) else 0


def describe(failure: Failure) -> str:
    """One line for a failed request."""
    error = failure.value
    if isinstance(error, KubeError):
        return str(error)
    return f"{type(error).__name__}: {error}"[:300]


@implementer(IScaler)
class KubernetesScaler(Service):
    """Scales one workload and follows its Service's ready endpoints into *pool*."""

    name = SOURCE
    drains_safely = False  # a scale-down lets Kubernetes pick which pod stops: one in use may

    def __init__(self, clock: Any, client: KubeClient, pool: ServerPool, settings: KubeSettings,
                 unit: str = "") -> None:
        self.clock = clock
        self.client = client
        self.pool = pool
        self.settings = settings
        self.unit = unit
        self.table = EndpointTable(settings.service, settings.port_name)
        self.api_version = settings.api_version or "v1"
        self.probing = not settings.api_version  # v1 first; a 404 falls back to v1beta1
        self.resource_version: str | None = None
        self._subscribers: list[Callable[[], None]] = []
        self._desired: int | None = None
        self._wanted: tuple[int, str] | None = None  # a scale not yet patched
        self._scaling: Deferred[Any] | None = None
        self._scale_timer: Any = None
        self._scale_backoff = BACKOFF_FIRST
        self._learn_timer: Any = None
        self._slices: Deferred[Any] | None = None  # the list or watch in flight
        self._slices_timer: Any = None
        self._backoff = BACKOFF_FIRST
        self._watch_started = 0.0
        self._watch_events = 0
        self._relisted = False  # listed again after a 410, no event since
        self._members: list[RemoteServer] = []
        self.counts = {"lists": 0, "watches": 0, "events": 0, "bookmarks": 0, "gone": 0, "errors": 0,
                       "patches": 0}

    # --- IScaler -------------------------------------------------------------------------------

    def desired(self) -> int:
        return self._desired or 0

    def ready(self) -> int:
        return len(self._members)

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)
        return unsubscribe

    def _notify(self) -> None:
        for callback in list(self._subscribers):
            try:
                callback()
            except Exception:
                log.failure("scaler subscriber {callback!r} failed", callback=callback)

    def scale(self, replicas: int, reason: str) -> None:
        if replicas < 0:
            raise ValueError(f"replicas must be 0 or more, got {replicas}")
        changed = replicas != self._desired
        self._desired = replicas
        self._wanted = (replicas, reason)
        if changed:
            self._notify()
        self._push_scale()

    def snapshot(self) -> dict[str, object]:
        """A plain dict for the status page and logs."""
        return {"scaler": SOURCE, "workload": self.settings.workload_label, "namespace": self.settings.namespace,
                "service": self.settings.service, "server": self.settings.connection.server,
                "desired": self.desired(), "ready": self.ready(), "pending_scale": self._wanted is not None,
                "endpointslices": f"discovery.k8s.io/{self.api_version}",
                "resource_version": self.resource_version, "counts": dict(self.counts)}

    # --- the /scale subresource ----------------------------------------------------------------

    @property
    def scale_path(self) -> str:
        s = self.settings
        return f"/apis/apps/v1/namespaces/{s.namespace}/{s.kind}/{s.workload}/scale"

    def _push_scale(self) -> None:
        if not self.running or self._scaling is not None or self._wanted is None:
            return
        if self._scale_timer is not None and self._scale_timer.active():
            return  # a retry is already due
        target, reason = self._wanted
        label = self.settings.workload_label

        def patch(current: Any) -> Any:
            old = _replicas(current)
            if old == target:
                return old, target
            self.counts["patches"] += 1
            d = self.client.request("PATCH", self.scale_path, body={"spec": {"replicas": target}},
                                    content_type="application/merge-patch+json")
            return d.addCallback(lambda new: (old, _replicas(new)))

        def done(result: tuple[int | None, int | None]) -> None:
            self._scaling = None
            self._scale_backoff = BACKOFF_FIRST
            old, new = result
            if self._wanted is not None and self._wanted[0] == target:
                self._wanted = None
            if old != new:
                log.info("Kubernetes: scaled {workload} from {old} to {new} replicas: {reason}",
                         workload=label, old=old, new=new, reason=reason, pool=self.unit)
            self._push_scale()  # a newer scale() came meanwhile

        def failed(failure: Failure) -> None:
            self._scaling = None
            if failure.check(CancelledError) or not self.running:
                return
            self.counts["errors"] += 1
            delay = self._scale_backoff
            self._scale_backoff = min(self._scale_backoff * 2, self.settings.backoff_max)
            log.warn("Kubernetes: cannot scale {workload} to {target}: {error}; retrying in {delay:g}s",
                     workload=label, target=target, error=describe(failure), delay=delay, pool=self.unit)
            self._scale_timer = self.clock.callLater(delay, self._push_scale)

        d = self.client.request("GET", self.scale_path)
        self._scaling = d
        d.addCallback(patch).addCallbacks(done, failed)

    def _learn_replicas(self) -> None:
        """At start: the workload's current replicas are what is desired until someone scales."""
        def learned(obj: Any) -> None:
            if self._desired is None:
                self._desired = _replicas(obj) or 0
                log.info("Kubernetes: {workload} has {replicas} replicas", workload=self.settings.workload_label,
                         replicas=self._desired, pool=self.unit)
                self._notify()

        def failed(failure: Failure) -> None:
            if not failure.check(CancelledError) and self.running and self._desired is None:
                delay = self.settings.backoff_max
                log.warn("Kubernetes: cannot read {workload}'s scale: {error}; retrying in {delay:g}s",
                         workload=self.settings.workload_label, error=describe(failure), delay=delay,
                         pool=self.unit)
                self._learn_timer = self.clock.callLater(delay, self._learn_replicas)
        if self.running and self._desired is None:
            self.client.request("GET", self.scale_path).addCallbacks(learned, failed)

    # --- EndpointSlices: list, then watch ---------------------------------------------------

    @property
    def slices_path(self) -> str:
        return f"/apis/discovery.k8s.io/{self.api_version}/namespaces/{self.settings.namespace}/endpointslices"

    def _selector(self) -> dict[str, str]:
        return {"labelSelector": f"kubernetes.io/service-name={self.settings.service}"}

    def _later(self, what: Callable[[], None], failure: Failure | None, doing: str) -> None:
        """Log one line for *failure* and do *what* after the current backoff."""
        delay = self._backoff
        self._backoff = min(self._backoff * 2, self.settings.backoff_max)
        self.counts["errors"] += 1
        log.warn("Kubernetes: {doing} EndpointSlices of Service {service}: {error}; retrying in {delay:g}s",
                 doing=doing, service=self.settings.service,
                 error=describe(failure) if failure is not None else "the watch ended at once",
                 delay=delay, pool=self.unit)
        self._slices_timer = self.clock.callLater(delay, what)

    def _list(self) -> None:
        if not self.running:
            return
        self.counts["lists"] += 1
        d = self.client.request("GET", self.slices_path, self._selector())
        self._slices = d
        d.addCallbacks(self._listed, self._list_failed)

    def _listed(self, obj: Any) -> None:
        self._slices = None
        try:
            items = obj.get("items") if isinstance(obj, dict) else None
            if not isinstance(items, list):
                raise BadObject("no items list")
            self.table.replace(items)
        except BadObject as e:
            self._later(self._list, Failure(KubeError(f"the list is not an EndpointSliceList ({e})")), "cannot list")
            return
        if self.probing:
            self.probing = False
            log.info("Kubernetes: EndpointSlices served as discovery.k8s.io/{version}",
                     version=self.api_version, pool=self.unit)
        self.resource_version = resource_version(obj)
        self._backoff = BACKOFF_FIRST
        self._apply()
        self._watch()

    def _list_failed(self, failure: Failure) -> None:
        self._slices = None
        if failure.check(CancelledError) or not self.running:
            return
        if self.probing and self.api_version == "v1" and http_status(failure) == 404:
            self.api_version = "v1beta1"  # Kubernetes before 1.21
            self._list()
            return
        self._later(self._list, failure, "cannot list")

    def _watch(self) -> None:
        if not self.running:
            return
        if self.resource_version is None:
            self._list()
            return
        self.counts["watches"] += 1
        query = dict(self._selector(), watch="1", allowWatchBookmarks="true",
                     resourceVersion=self.resource_version,
                     timeoutSeconds=str(max(1, int(self.settings.watch_timeout))))
        self._watch_started = self.clock.seconds()
        self._watch_events = 0
        d = self.client.watch(self.slices_path, query, self._line,
                              self.settings.watch_timeout + self.settings.request_timeout)
        self._slices = d
        d.addCallbacks(self._watch_ended, self._watch_failed)

    def _line(self, raw: bytes) -> None:
        """One watch event; raising aborts the watch (the error is logged once by _watch_failed)."""
        try:
            event = json.loads(raw)
        except ValueError:
            raise BadObject(f"a watch line is not JSON ({len(raw)} bytes)") from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise BadObject("a watch line is not an event")
        kind, obj = event["type"], event.get("object")
        self._watch_events += 1
        if kind == "ERROR":
            code = obj.get("code") if isinstance(obj, dict) else None
            message = str(obj.get("message", ""))[:300] if isinstance(obj, dict) else ""
            if code == 410:
                raise Gone(f"watch: 410 Gone: {message}", 410, "Expired")
            raise KubeError(f"watch: error event {code}: {message}", code if isinstance(code, int) else 0)
        if kind == "BOOKMARK":
            self.counts["bookmarks"] += 1
        else:
            self.counts["events"] += 1
            self.table.event(kind, obj)
            self._apply()
        self._relisted = False
        self.resource_version = resource_version(obj) or self.resource_version
        self._backoff = BACKOFF_FIRST

    def _watch_ended(self, ignored: Any) -> None:
        self._slices = None
        if not self.running:
            return
        if self._watch_events == 0 and self.clock.seconds() - self._watch_started < MIN_WATCH_TIME:
            self._later(self._watch, None, "watching")
            return
        self._watch()  # resume from the last resourceVersion seen

    def _watch_failed(self, failure: Failure) -> None:
        self._slices = None
        if failure.check(CancelledError) or not self.running:
            return
        if http_status(failure) == 410:
            self.counts["gone"] += 1
            rv, self.resource_version = self.resource_version, None
            if self._relisted:  # 410 again right after a fresh list, no event between: pause
                self._later(self._list, failure, "watching")
                return
            log.info("Kubernetes: resourceVersion {rv} is too old (410 Gone); listing EndpointSlices again",
                     rv=rv, pool=self.unit)
            self._relisted = True
            self._list()
            return
        if failure.check(BadObject):
            self.resource_version = None  # what we hold may be incomplete: list again
            failure = Failure(KubeError(f"garbled watch stream: {failure.value}"))
        self._later(self._watch, failure, "watching")

    # --- the pool -------------------------------------------------------------------------

    def _apply(self) -> None:
        members = [RemoteServer(server_id=e.server_id, host=e.host, port=e.port) for e in self.table.ready()]
        if members == self._members:
            return
        result = self.pool.reconfigure(members, SOURCE)
        self._members = [m for m in members if m.server_id not in result.clashes]
        log.info("Kubernetes: {ready} ready endpoints of Service {service} (joined: {added}; left: {removed})",
                 ready=len(self._members), service=self.settings.service,
                 added=", ".join(result.added) or "none",
                 removed=", ".join(result.removed + result.draining) or "none", pool=self.unit)
        self._notify()

    # --- service ----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        log.info("Kubernetes: scaling {workload} in namespace {namespace} via {server} ({source}); "
                 "AppServers from Service {service}", workload=self.settings.workload_label,
                 namespace=self.settings.namespace, server=self.settings.connection.server,
                 source=self.settings.connection.source, service=self.settings.service, pool=self.unit)
        self._learn_replicas()
        self._list()
        self._push_scale()

    def stopService(self) -> Any:
        super().stopService()
        for timer in (self._slices_timer, self._scale_timer, self._learn_timer):
            if timer is not None and timer.active():
                timer.cancel()
        for d in (self._slices, self._scaling):
            if d is not None:
                d.cancel()
        return None


def make_scaler(reactor: Any, pool: ServerPool, settings: KubeSettings, unit: str,
                path: str = "<config>") -> KubernetesScaler:
    """The scaler of a unit's ``KUBERNETES`` section, talking to the API server over treq
    (:class:`ConfigError` if the CA or client certificate is unusable)."""
    try:
        http = make_http(reactor, settings.connection, settings.request_timeout)
    except KubeConfigError as e:
        raise ConfigError(path, f"[{settings.section}] {e}", key="KUBECONFIG") from None
    client = KubeClient(reactor, http, settings.connection, request_timeout=settings.request_timeout,
                        max_response=settings.max_response, token_refresh=settings.token_refresh)
    return KubernetesScaler(reactor, client, pool, settings, unit)


def _replicas(obj: Any) -> int | None:
    """spec.replicas of a Scale object, or :class:`KubeError` if it has none."""
    spec = obj.get("spec") if isinstance(obj, dict) else None
    value = spec.get("replicas", 0) if isinstance(spec, dict) else None
    if not isinstance(value, int) or isinstance(value, bool):
        raise KubeError("the answer is not a Scale object")
    return value
