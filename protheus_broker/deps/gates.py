"""Where a unit's dependencies stop new sessions: a gate for the desktop unit's session machine
and a wrapper around an HTTP unit's dispatcher.

While a dependency is down an awake unit closes each new SmartClient with the reason in its
log line (:class:`DependencyGate`); the HTTP units answer 503 with Retry-After and a JSON body
naming the dependency (:class:`DependencyDispatcher`).  Sessions already open carry on: only
new ones ask.  A unit with scale to zero that is asleep or waking holds a new session instead
and starts no AppServer before its dependencies are up (scaling/controller.py): the gate lets
the session through to the broker's wake gate (``would_hold``), the dispatcher to the wake
dispatcher inside.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from protheus_broker.deps.state import DependencyDown, UnitDependencies
from protheus_broker.desktop.lifecycle import GateRefused, IGate
from protheus_broker.http.proxy import Choice, Headers, IDispatcher, NoBackend, RequestInfo


@implementer(IGate)
class DependencyGate:
    """A new SmartClient session goes on while every dependency of its unit is up; one that is
    down refuses it with :class:`GateRefused` ("dependency DBACCESS (host:port) down", "since
    ...: reason"); before the first verdict it waits for it."""

    def __init__(self, dependencies: UnitDependencies) -> None:
        self.dependencies = dependencies

    def acquire(self, session: Any) -> Deferred[None]:
        if self.dependencies.dependencies and self._asleep(session):
            return succeed(None)
        return self.dependencies.admit().addErrback(self._refused)

    def _asleep(self, session: Any) -> bool:
        """A later gate of the session's broker will hold it while the unit wakes (scale to
        zero's ``would_hold``): the wake waits for the dependencies before it starts an AppServer."""
        for gate in getattr(getattr(session, "broker", None), "gates", ()):
            would_hold = getattr(gate, "would_hold", None)
            if callable(would_hold) and would_hold(session):
                return True
        return False

    @staticmethod
    def _refused(reason: Failure) -> None:
        reason.trap(DependencyDown)
        down: DependencyDown = reason.value  # type: ignore[assignment]
        raise GateRefused(down.what, down.detail)

    def __repr__(self) -> str:
        return f"the first check of {', '.join(self.dependencies.names) or 'no dependency'}"


@implementer(IDispatcher)
class DependencyDispatcher:
    """An HTTP unit's dispatcher behind its dependencies: :meth:`choose` fails with
    :class:`NoBackend` (503, Retry-After, the reason in the JSON body) while one is down, else
    asks the dispatcher inside; everything else goes straight to it."""

    def __init__(self, inner: Any, dependencies: UnitDependencies) -> None:
        self.inner = inner
        self.dependencies = dependencies

    @property
    def strip_request_headers(self) -> frozenset[bytes]:
        return self.inner.strip_request_headers  # type: ignore[no-any-return]

    def choose(self, request: RequestInfo) -> Deferred[Choice]:
        if not self.dependencies.dependencies or self._asleep():
            return self.inner.choose(request)  # type: ignore[no-any-return]
        admitted = self.dependencies.admit()
        admitted.addCallbacks(lambda _: self.inner.choose(request), self._refused)
        return admitted  # type: ignore[return-value]

    def _asleep(self) -> bool:
        """The dispatcher inside holds this request while its unit wakes (scale to zero's
        ``would_hold``): the wake waits for the dependencies before it starts an AppServer."""
        would_hold = getattr(self.inner, "would_hold", None)
        return bool(would_hold()) if callable(would_hold) else False

    @staticmethod
    def _refused(reason: Failure) -> None:
        reason.trap(DependencyDown)
        down: DependencyDown = reason.value  # type: ignore[assignment]
        raise NoBackend(f"{down.what} {down.detail}", retry_after=down.retry_after)

    def opening(self, choice: Choice, backend: Any) -> None:
        self.inner.opening(choice, backend)

    def connect_failed(self, choice: Choice, backend: Any, reason: str) -> None:
        self.inner.connect_failed(choice, backend, reason)

    def answered(self, choice: Choice, backend: Any) -> None:
        self.inner.answered(choice, backend)

    def released(self, choice: Choice, backend: Any, outcome: str) -> None:
        self.inner.released(choice, backend, outcome)

    def again(self, choice: Choice) -> Deferred[Choice] | None:
        return self.inner.again(choice)  # type: ignore[no-any-return]

    def abandoned(self, choice: Choice) -> None:
        self.inner.abandoned(choice)

    def request_headers(self, choice: Choice, headers: Headers) -> Headers:
        return self.inner.request_headers(choice, headers)  # type: ignore[no-any-return]

    def response_headers(self, choice: Choice, backend: Any) -> Headers:
        return self.inner.response_headers(choice, backend)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # forward_cookie, slots, pool, ... of the dispatcher inside
