"""The license gate of an HTTP unit: "license on demand" (seed 002) at the broker.

A request whose path is under a ``Stateless=1`` URI section's ``URL`` takes one seat of its
license class from the broker's local :class:`~protheus_broker.license.pool.SeatPool` before it
is forwarded, and gives it back when it is over (answered, failed, or its client gone).  No seat
free: it waits (FIFO, bounded, ``LICENSE_QUEUE_TIMEOUT``), then gets 503 with Retry-After and the
reason in the seed's terms.  The class is ``TOTVS_I`` unless a trusted API manager
(``TRUSTED_API_MANAGERS``) names an application in ``x-totvs-appcode``; from anyone else that
header is removed before forwarding.

:class:`LicenseGate` wraps the unit's :class:`~protheus_broker.http.proxy.IDispatcher`: the seat is
taken before the balancer's choice (a request waiting for a license holds no AppServer slot) and
kept in the :class:`Choice`'s state until :meth:`LicenseGate.abandoned`.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from typing import Any
from urllib.parse import unquote

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from protheus_broker.http.proxy import Choice, Headers, NoBackend, RequestInfo, DispatcherWrapper
from protheus_broker.http.settings import LicenseGateConfig
from protheus_broker.license.pool import NOT_CONFIGURED, REASON_CODES, NoSeat, SeatPool, no_license
from protheus_broker.license.protocol import DEFAULT_CLASS

log = Logger()

APPCODE = b"x-totvs-appcode"
_APPCODE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_TRUST_CACHE_SIZE = 4096


def _origin_path(target: bytes) -> str:
    """The path of a request target as sent (absolute-form reduced to its path), without query."""
    text = target.decode("latin-1")
    if not text.startswith("/"):  # absolute-form (http://host/path) or asterisk-form
        scheme = text.find("://")
        if scheme >= 0:
            slash = text.find("/", scheme + 3)
            text = text[slash:] if slash >= 0 else "/"
        else:
            text = "/" + text
    for cut in ("?", "#"):
        at = text.find(cut)
        if at >= 0:
            text = text[:at]
    return text


def _normalised(text: str) -> str:
    if "%" in text or "/." in text or "//" in text or "\\" in text:
        text = unquote(text, encoding="latin-1").replace("\\", "/")
        text = re.sub("/+", "/", text)
        text = posixpath.normpath(text) if text != "/" else text
    return text.lower()


def request_path(target: bytes) -> str:
    """The path of a request target, normalised as a server would route it: no query, percent
    escapes decoded, ``\\`` as ``/``, repeated slashes and dot segments resolved, lower case (so
    ``/REST/../rest//x`` cannot slip past a gated ``/rest``)."""
    return _normalised(_origin_path(target))


class UriTable:
    """The URI sections' URL prefixes, longest first: a path takes the rule of the most specific
    URL it is under (``/rest/app`` Stateless=1 inside ``/rest`` Stateless=0 is gated)."""

    def __init__(self, config: LicenseGateConfig) -> None:
        rules = [(rule.url.rstrip("/").lower(), rule.stateless) for rule in config.uris]
        self.rules = sorted(rules, key=lambda pair: len(pair[0]), reverse=True)
        self.gated = any(stateless for _, stateless in rules)

    def stateless(self, target: bytes) -> bool:
        """True when *target*'s path is under a Stateless=1 URL (and no more specific Stateless=0),
        as sent or normalised: whichever way the AppServer reads it, a gated call takes a seat.  A
        target with escapes, dot segments or backslashes is also gated when it merely starts with a
        Stateless=1 URL as sent (``/rest%2f..%2fopen``): the safe side."""
        raw = _origin_path(target)
        path = _normalised(raw)
        if self._match(path):
            return True
        lowered = raw.lower()
        return lowered != path and self._match(lowered, loose=True)

    def _match(self, path: str, loose: bool = False) -> bool:
        for prefix, stateless in self.rules:
            if not prefix or path == prefix or path.startswith(prefix if loose else prefix + "/"):
                return stateless
        return False


class LicenseGate(DispatcherWrapper):
    """An :class:`IDispatcher` that takes a license seat for requests under Stateless=1 URIs,
    then asks the unit's own dispatcher (*inner*) for the servers."""

    def __init__(self, clock: Any, inner: Any, seats: SeatPool | None, config: LicenseGateConfig,
                 name: str = "") -> None:
        super().__init__(inner)
        self.clock = clock
        self.seats = seats
        self.name = name
        self.refused: dict[str, int] = {code: 0 for code in REASON_CODES.values()}
        self.waiting = 0  # requests of this unit waiting for a seat now
        self.seated = 0  # requests that got a seat
        self.seated_after_wait = 0
        self.wait_seconds = 0.0  # total time the seated-after-wait requests waited
        self.appcode_stripped = 0  # x-totvs-appcode headers removed (untrusted senders)
        self.configure(config)

    def configure(self, config: LicenseGateConfig) -> None:
        """New URI sections, trusted networks and waits (a reload); requests under way keep theirs."""
        self.config = config
        self.table = UriTable(config)
        self.trusted_networks = config.trusted_api_managers
        self._trust: dict[str, bool] = {}
        if self.table.gated:
            log.info("[{section}] license gate: a seat per request under {urls}; x-totvs-appcode honoured "
                     "from {trusted}; wait up to {timeout:g}s behind {length} requests{missing}", section=self.name,
                     missing="" if self.seats is not None else
                     " (no [LICENSECLIENT]: they get 503 'license server not configured')",
                     urls=", ".join(rule.url for rule in config.uris if rule.stateless),
                     trusted=", ".join(str(net) for net in self.trusted_networks) or "nobody",
                     timeout=config.queue_timeout, length=config.queue_length, pool=self.name)

    # --- trust -----------------------------------------------------------------------------

    def trusted(self, client: str) -> bool:
        """True when *client* (an address) is in TRUSTED_API_MANAGERS."""
        known = self._trust.get(client)
        if known is not None:
            return known
        try:
            address: Any = ipaddress.ip_address(client.split("%", 1)[0])
        except ValueError:
            verdict = False
        else:
            if getattr(address, "ipv4_mapped", None) is not None:
                address = address.ipv4_mapped
            verdict = any(address.version == net.version and address in net for net in self.trusted_networks)
        if len(self._trust) >= _TRUST_CACHE_SIZE:
            self._trust.clear()
        self._trust[client] = verdict
        return verdict

    # --- choose ----------------------------------------------------------------------------

    def choose(self, request: RequestInfo) -> "Deferred[Choice]":
        appcode: bytes | None = None
        for name, value in request.headers:
            if name == APPCODE:
                appcode = value
        strip = False
        license_class = DEFAULT_CLASS
        if appcode is not None:
            if self.trusted(request.client):
                license_class = appcode.decode("latin-1").strip().upper()  # as the server names classes
            else:
                strip = True
                self.appcode_stripped += 1
        if not self.table.gated or not self.table.stateless(request.target):
            choosing = self.inner.choose(request)
            return choosing.addCallback(self._strip, strip) if strip else choosing
        if license_class is not DEFAULT_CLASS and not _APPCODE_RE.match(license_class):
            return self._refuse(no_license(repr(license_class[:64])), request)
        if self.seats is None:
            return self._refuse(NoSeat(NOT_CONFIGURED), request)
        if self.seats.try_take(license_class):
            self.seated += 1
            if self.config.time_log:
                self._time_log(request, license_class, 0.0)
            return self._forward(request, license_class, strip, 0.0)
        return self._wait(request, license_class, strip)

    def _strip(self, choice: Choice, strip: bool) -> Choice:
        choice.state["license_strip"] = strip
        return choice

    def _refuse(self, error: NoSeat, request: RequestInfo, waited: float | None = None) -> "Deferred[Choice]":
        self.refused[error.code] += 1
        if waited is not None and self.config.time_log:
            self._time_log(request, "-", waited, error.reason)
        return fail(NoBackend(error.reason, retry_after=error.retry_after))

    def _time_log(self, request: RequestInfo, license_class: str, waited: float, refused: str = "") -> None:
        """FWFRAME_TIMELS=1: one line per gated request with the time it waited for its seat."""
        log.info("license time: {client} {path} class {license_class} waited {ms:.3f} ms{outcome}",
                 client=request.client, path=request.target.decode("latin-1")[:200], license_class=license_class,
                 ms=waited * 1000.0, outcome=f"; 503 {refused}" if refused else "", pool=self.name,
                 license_wait=waited)

    def _forward(self, request: RequestInfo, license_class: str, strip: bool, waited: float) -> "Deferred[Choice]":
        """The seat is held: the unit's dispatcher chooses; its failure gives the seat back.  The
        choice's state keeps the class (``license``) and the wait (``license_wait``, seconds)."""
        seats = self.seats
        assert seats is not None

        def chosen(choice: Choice) -> Choice:
            choice.state["license"] = license_class
            choice.state["license_wait"] = waited
            if strip:
                choice.state["license_strip"] = True
            return choice

        def not_chosen(failure: Failure) -> Failure:
            seats.give_back(license_class)
            return failure

        return self.inner.choose(request).addCallbacks(chosen, not_chosen)

    def _wait(self, request: RequestInfo, license_class: str, strip: bool) -> "Deferred[Choice]":
        """No seat free: wait in the pool's FIFO; cancelling (client gone) leaves it, or, once
        seated, cancels the inner choice and gives the seat back."""
        seats = self.seats
        assert seats is not None
        started = self.clock.seconds()
        current: list[Deferred[Any]] = []

        def cancel(_: Deferred[Choice]) -> None:
            if current:
                current[-1].cancel()

        outer: Deferred[Choice] = Deferred(cancel)

        def deliver(choice: Choice) -> None:
            if outer.called:  # cancelled meanwhile: hand everything back
                self.abandoned(choice)
            else:
                outer.callback(choice)

        def deliver_failure(failure: Failure) -> None:
            if not outer.called:
                outer.errback(failure)

        def seated(waited: float) -> None:
            self.waiting -= 1
            self.seated += 1
            self.seated_after_wait += 1
            self.wait_seconds += waited
            if self.config.time_log:
                self._time_log(request, license_class, waited)
            if outer.called:
                seats.give_back(license_class)
                return
            forwarding = self._forward(request, license_class, strip, waited)
            current.append(forwarding)
            forwarding.addCallbacks(deliver, deliver_failure)

        def unseated(failure: Failure) -> None:
            self.waiting -= 1
            if failure.check(NoSeat):
                error: Any = failure.value
                refusal = self._refuse(error, request, self.clock.seconds() - started)
                refusal.addErrback(deliver_failure)
            else:
                deliver_failure(failure)

        self.waiting += 1
        waiting = seats.wait(license_class, self.config.queue_timeout, self.config.queue_length)
        current.append(waiting)
        waiting.addCallbacks(seated, unseated)
        waiting.addErrback(self._bug, deliver_failure)
        return outer

    def _bug(self, failure: Failure, deliver_failure: Any) -> None:
        log.failure("license gate: error while seating a request", failure, pool=self.name)
        deliver_failure(failure)

    # --- the end of a request ----------------------------------------------------------------

    def abandoned(self, choice: Choice) -> None:
        """The request is over: the unit's dispatcher hears it, and the seat goes back."""
        self.inner.abandoned(choice)
        license_class = choice.state.pop("license", None)
        if license_class is not None and self.seats is not None:
            self.seats.give_back(license_class)

    def request_headers(self, choice: Choice, headers: Headers) -> Headers:
        headers = self.inner.request_headers(choice, headers)
        if choice.state.get("license_strip"):
            headers = [(name, value) for name, value in headers if name != APPCODE]
        return headers

    # --- reading ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The broker screen's view of the gate."""
        return {
            "uris": [{"section": rule.section, "url": rule.url, "stateless": rule.stateless}
                     for rule in self.config.uris],
            "trusted_api_managers": [str(net) for net in self.trusted_networks],
            "configured": self.seats is not None,
            "waiting": self.waiting,
            "seated": self.seated,
            "seated_after_wait": self.seated_after_wait,
            "wait_seconds": round(self.wait_seconds, 6),
            "appcode_stripped": self.appcode_stripped,
            "refused": dict(self.refused),
        }
