"""Where a unit's dependencies stop new sessions: a gate for the desktop unit's session machine
and a wrapper around an HTTP unit's dispatcher.

While a dependency is down the desktop unit closes each new SmartClient with the reason in its
log line (:class:`DependencyGate`); the HTTP units answer 503 with Retry-After and a JSON body
naming the dependency (:class:`DependencyDispatcher`).  Sessions already open carry on: only
new ones ask.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
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
        return self.dependencies.admit().addErrback(self._refused)

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
        if not self.dependencies.dependencies:
            return self.inner.choose(request)  # type: ignore[no-any-return]
        admitted = self.dependencies.admit()
        admitted.addCallbacks(lambda _: self.inner.choose(request), self._refused)
        return admitted  # type: ignore[return-value]

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
