"""Where a sleeping unit holds its new sessions while a node wakes: a gate for the desktop
unit's session machine and a wrapper around an HTTP unit's dispatcher.

Desktop (:class:`WakeGate`): a SmartClient login that finds no ready AppServer waits in its
session's *waiting* state (client paused: its first bytes stay in the kernel or the replay
buffer, as with ``WAIT_FOR_SERVER``) while :class:`~.controller.ScaleToZero` wakes a node, then
goes on to the next gate and connects (while the unit is asleep or waking, :meth:`WakeGate.would_hold`,
the dependency gate before it lets the session through: a dependency that is down is waited for
by the wake, see :class:`~.controller.ScaleToZero`; awake, the dependency gate refuses at once);
refused (``MAX_HELD``, ``WAKE_TIMEOUT``), it is closed
with the reason in its log line.  A client that leaves cancels its hold.

HTTP (:class:`WakeDispatcher`): a request that finds no ready member waits the same way inside
``choose()``; refused, it is answered 503 with ``Retry-After`` and the reason in the JSON body.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from protheus_broker.desktop.lifecycle import GateRefused, IGate
from protheus_broker.http.proxy import Choice, Headers, IDispatcher, NoBackend, RequestInfo
from protheus_broker.scaling.controller import ScaleToZero, WakeRefused


@implementer(IGate)
class WakeGate:
    """A new SmartClient session goes on at once while a member is ready; else it is held
    while the controller wakes one (see the module docstring)."""

    def __init__(self, controller: ScaleToZero, pool: Any = None) -> None:
        self.controller = controller
        self.pool = pool  # a fixed server (REMOTE_SERVER_xx) that can take the session: no hold

    def would_hold(self, session: Any = None) -> bool:
        """True when :meth:`acquire` would hold a session now (the unit is asleep or waking)."""
        return self.controller.must_hold() and not (self.pool is not None and self.pool.can_take_session())

    def acquire(self, session: Any) -> Deferred[None]:
        if self.pool is not None and self.pool.can_take_session():
            return succeed(None)
        return self.controller.hold(str(getattr(session, "client_address", ""))).addErrback(self._refused)

    @staticmethod
    def _refused(reason: Failure) -> None:
        reason.trap(WakeRefused)
        refused: WakeRefused = reason.value  # type: ignore[assignment]
        raise GateRefused(refused.what, refused.detail)

    def __repr__(self) -> str:
        controller = self.controller
        return (f"waking a node: {len(controller.held)} held, WAKE_TIMEOUT="
                f"{controller.policy.wake_timeout:g}s")


@implementer(IDispatcher)
class WakeDispatcher:
    """An HTTP unit's dispatcher behind scale to zero: with a *controller* (None: a plain
    pass-through), :meth:`choose` holds a request while a member wakes, or fails with
    :class:`NoBackend` (503, Retry-After, the reason); everything else goes straight inside."""

    def __init__(self, inner: Any, controller: ScaleToZero | None = None, pool: Any = None) -> None:
        self.inner = inner
        self.controller = controller
        self.pool = pool if pool is not None else getattr(inner, "pool", None)  # a member up: no hold

    @property
    def strip_request_headers(self) -> frozenset[bytes]:
        return self.inner.strip_request_headers  # type: ignore[no-any-return]

    def would_hold(self) -> bool:
        """True when :meth:`choose` would hold a request now (the unit is asleep or waking): a
        dependency that is down is then waited for by the wake, not refused at once."""
        controller, pool = self.controller, self.pool
        return (controller is not None and controller.must_hold()
                and not (pool is not None and pool.can_take_session()))

    def choose(self, request: RequestInfo) -> Deferred[Choice]:
        controller = self.controller
        if controller is None or not self.would_hold():
            return self.inner.choose(request)  # type: ignore[no-any-return]
        held = controller.hold(request.client)
        held.addCallbacks(lambda _: self.inner.choose(request), self._refused)
        return held  # type: ignore[return-value]

    @staticmethod
    def _refused(reason: Failure) -> None:
        reason.trap(WakeRefused)
        refused: WakeRefused = reason.value  # type: ignore[assignment]
        raise NoBackend(f"{refused.what}: {refused.detail}", retry_after=refused.retry_after)

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


class ScaleToZeroService(Service):
    """Starts a unit's :class:`ScaleToZero` with the unit (after its nodes) and stops it first."""

    def __init__(self, controller: ScaleToZero) -> None:
        self.controller = controller

    def startService(self) -> None:
        super().startService()
        self.controller.start()

    def stopService(self) -> Any:
        self.controller.stop()
        return super().stopService()
