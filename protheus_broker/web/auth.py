"""Admin credentials: the token hash kept in the config, and checks of what a request presents.

The config holds only ``pbkdf2_sha256$<iterations>$<salt>$<hash>`` (base64 without padding), never
the token.  ``protheus-broker-ctl hash-token`` makes a random token and its hash.  A token that
verified once is remembered by its SHA-256, so a page polling every few seconds costs one PBKDF2
per token, not one per request, and the right token is recognised before any limiter is
consulted; every comparison is constant-time.

What a stranger can make the broker spend on wrong tokens is bounded three ways: the iteration
count (:data:`MAX_ITERATIONS`, checked when the config is read), wrong tokens per client address
(:class:`FailureLimiter`) and PBKDF2 runs in flight (:class:`Verifier`: one at a time, off the
reactor thread, a short queue, the rest refused at once).
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Deque, Iterable

from twisted.internet.defer import Deferred, DeferredSemaphore, succeed

SCHEME = "pbkdf2_sha256"
DEFAULT_ITERATIONS = 200_000
MIN_ITERATIONS = 10_000
#: The most iterations a TOKEN_HASH may ask for.  One PBKDF2-SHA256 at 1,000,000 iterations takes
#: about 0.2 s of one core (5x our default, above OWASP's 2023 advice of 600,000): enough for a
#: hand-picked token, while a hash naming 2,000,000,000 (one check: most of an hour) is refused
#: when the config is read rather than letting one request occupy a core for that long.
MAX_ITERATIONS = 1_000_000


class HashError(ValueError):
    """A TOKEN_HASH that is not ours."""


@dataclass(frozen=True)
class TokenHash:
    iterations: int
    salt: bytes
    digest: bytes


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_token(token: str, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None) -> str:
    """The TOKEN_HASH line for *token*."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", token.encode(), salt, iterations)
    return f"{SCHEME}${iterations}${_b64(salt)}${_b64(digest)}"


def new_token() -> str:
    """A random admin token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def parse_token_hash(text: str) -> TokenHash:
    """Split and check a TOKEN_HASH; :class:`HashError` says what is wrong."""
    parts = text.strip().split("$")
    if len(parts) != 4 or parts[0] != SCHEME:
        raise HashError(f"expected {SCHEME}$<iterations>$<salt>$<hash>")
    try:
        iterations = int(parts[1])
    except ValueError:
        raise HashError(f"iterations {parts[1]!r} is not a whole number") from None
    if iterations < MIN_ITERATIONS:
        raise HashError(f"{iterations} iterations is too few (at least {MIN_ITERATIONS})")
    if iterations > MAX_ITERATIONS:
        raise HashError(f"{iterations} iterations is too many (at most {MAX_ITERATIONS}: each check "
                        f"of a token would hold a core that long)")
    try:
        salt, digest = _unb64(parts[2]), _unb64(parts[3])
    except (ValueError, TypeError):
        raise HashError("salt or hash is not base64") from None
    if len(salt) < 8 or len(digest) != 32:
        raise HashError("salt shorter than 8 bytes or hash not 32 bytes")
    return TokenHash(iterations, salt, digest)


def pbkdf2_matches(token_hash: TokenHash, token: str) -> bool:
    """The slow check (PBKDF2), safe to run in a thread: does *token* match *token_hash*?"""
    digest = hashlib.pbkdf2_hmac("sha256", token.encode(), token_hash.salt, token_hash.iterations)
    return hmac.compare_digest(digest, token_hash.digest)


class TokenChecker:
    """Checks presented tokens against one TOKEN_HASH (None: every token is refused).

    :meth:`known` is the cheap check (a SHA-256 against the token that verified last);
    :meth:`check` adds the PBKDF2 in the calling thread (a :class:`Verifier` runs it elsewhere
    and reports back with :meth:`remember`).
    """

    def __init__(self, token_hash: str | None) -> None:
        self.source = token_hash
        self.hash = parse_token_hash(token_hash) if token_hash else None
        self._verified: bytes | None = None  # sha256 of the token that verified last

    @property
    def configured(self) -> bool:
        return self.hash is not None

    def known(self, token: str) -> bool:
        """True if *token* is the one that verified last (no PBKDF2)."""
        if self._verified is None or not token:
            return False
        return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._verified)

    def remember(self, token: str) -> None:
        """*token* verified: later checks of it are :meth:`known`."""
        self._verified = hashlib.sha256(token.encode()).digest()

    def check(self, token: str) -> bool:
        if self.hash is None or not token:
            return False
        if self.known(token):
            return True
        if pbkdf2_matches(self.hash, token):
            self.remember(token)
            return True
        return False


class FailureLimiter:
    """Wrong tokens per client address: at most *limit* in any *window* seconds each.

    IPv6 clients count by their /64 (one host usually holds a whole /64).  The table keeps at most
    *size* addresses, the one that failed least recently is forgotten first: a sweep over spoofed
    or IPv6 sources costs a bounded table, and what such a sweep gains is bounded by the
    :class:`Verifier` instead.  Clients on other addresses are never affected.
    """

    def __init__(self, limit: int = 10, window: float = 10.0, size: int = 1024) -> None:
        self.limit, self.window, self.size = limit, window, size
        self._failures: collections.OrderedDict[str, Deque[float]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    @staticmethod
    def key(host: str) -> str:
        """What *host* counts as: itself, or its /64 for IPv6."""
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return host
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            return str(ipaddress.IPv6Network((address, 64), strict=False))
        return str(address)

    def retry_after(self, host: str, now: float) -> float | None:
        """None if *host* may try a token now, else the seconds until it may."""
        times = self._failures.get(self.key(host))
        if times is None:
            return None
        while times and now - times[0] >= self.window:
            times.popleft()
        if len(times) < self.limit:
            return None
        return self.window - (now - times[0])

    def attempt(self, host: str, now: float) -> None:
        """Count a check of an unknown token (taken back by :meth:`forgive` if it was right)."""
        key = self.key(host)
        times = self._failures.pop(key, None)
        if times is None:
            times = collections.deque(maxlen=self.limit)
        times.append(now)
        self._failures[key] = times  # now the most recent
        while len(self._failures) > self.size:
            self._failures.popitem(last=False)

    def forgive(self, host: str) -> None:
        """The token of the last :meth:`attempt` was right: it does not count."""
        times = self._failures.get(self.key(host))
        if times:
            times.pop()


class VerifierBusy(Exception):
    """Too many token checks in flight: this one is refused without hashing."""


#: Runs a function in a thread, as ``twisted.internet.threads.deferToThreadPool`` does.
ThreadRunner = Callable[[Callable[[], bool]], "Deferred[bool]"]


class Verifier:
    """Runs PBKDF2 checks off the reactor thread: *running* at a time, *waiting* more queued, any
    further one refused at once with :class:`VerifierBusy` (wrong tokens cannot queue unbounded
    work, nor take every thread of the reactor's pool, which also resolves host names)."""

    def __init__(self, run_in_thread: ThreadRunner, running: int = 1, waiting: int = 4) -> None:
        self.run_in_thread = run_in_thread
        self.waiting = waiting
        self._semaphore = DeferredSemaphore(running)

    @property
    def in_flight(self) -> int:
        return self._semaphore.limit - self._semaphore.tokens + len(self._semaphore.waiting)

    def verify(self, token_hash: TokenHash, token: str) -> "Deferred[bool]":
        """Fires with whether *token* matches; fails with :class:`VerifierBusy` when full."""
        if self._semaphore.tokens == 0 and len(self._semaphore.waiting) >= self.waiting:
            raise VerifierBusy()
        return self._semaphore.run(self.run_in_thread, partial(pbkdf2_matches, token_hash, token))


def reactor_thread_runner(reactor: Any) -> ThreadRunner:
    """A :data:`ThreadRunner` on *reactor*'s own thread pool."""
    from twisted.internet.threads import deferToThreadPool

    def run(function: Callable[[], bool]) -> "Deferred[bool]":
        return deferToThreadPool(reactor, reactor.getThreadPool(), function)

    return run


def bearer_token(header: bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not value.strip():
        return None
    try:
        return value.strip().decode("ascii")
    except UnicodeDecodeError:
        return None


class Refused(Exception):
    """A request answered at once with an HTTP *status*, a message and extra headers (a
    listener turns it into its JSON error)."""

    def __init__(self, status: int, message: str, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def check_bearer(header: bytes | None, client: str, now: float, checker: TokenChecker,
                 limiter: "FailureLimiter", verifier: "Verifier",
                 challenge: dict[bytes, bytes]) -> "Deferred[bool | None]":
    """Whether an ``Authorization`` *header* from *client* carries the admin token: fires True
    (right), False (wrong: the caller logs it) or None (none presented).  Raises
    :class:`Refused` for a malformed header (401), an address over its wrong-token budget (429)
    or a busy verifier (503).  A right token is remembered and forgives its address."""
    token = bearer_token(header)
    if token is None:
        if header is not None:
            raise Refused(401, "Authorization header is not 'Bearer <token>'", challenge)
        return succeed(None)
    if checker.hash is None:
        return succeed(False)
    if checker.known(token):
        return succeed(True)
    wait = limiter.retry_after(client, now)
    if wait is not None:
        seconds = max(1, int(wait + 0.999))
        raise Refused(429, f"too many wrong tokens from {client}; try again in {seconds}s",
                      {b"retry-after": str(seconds).encode()})
    try:
        checking = verifier.verify(checker.hash, token)
    except VerifierBusy:
        raise Refused(503, "too many token checks in progress; try again in a second",
                      {b"retry-after": b"1"}) from None
    limiter.attempt(client, now)

    def verdict(right: bool) -> bool:
        if right:
            limiter.forgive(client)
            checker.remember(token)
        return right

    return checking.addCallback(verdict)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; Unix sockets count as local."""
    if host in ("", "unix"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def origin_matches(origin: bytes | None, host: bytes | None) -> bool:
    """A browser's Origin must name the host it sent the request to (absent: not a browser
    cross-site request, allowed)."""
    if origin is None:
        return True
    if host is None:
        return False
    text = origin.strip().lower()
    for scheme in (b"http://", b"https://"):
        if text.startswith(scheme):
            return hmac.compare_digest(text[len(scheme):], host.strip().lower())
    return False


#: Host names always served: a browser resolves ``localhost`` itself, so no DNS answer can
#: point it elsewhere.
LOCAL_NAMES = ("localhost",)


def host_of(header: bytes) -> str | None:
    """The host part of a ``Host`` header, lower case, without port or trailing dot (an IPv6
    literal without its brackets); None if it is not a well-formed host."""
    try:
        text = header.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return None
    if text.startswith("["):
        literal, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return None
        return literal
    name, colon, port = text.rpartition(":")
    if not colon:
        name = text
    elif not port.isdigit() or ":" in name:
        return None
    name = name.rstrip(".") if name not in ("", ".") else ""
    return name or None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def host_allowed(header: bytes | None, allowed: Iterable[str]) -> bool:
    """May a request naming *header* as its ``Host`` be answered?

    DNS rebinding makes a browser send a name the attacker controls (``Host: evil.example``) to
    our address; a name is therefore answered only if it is ``localhost`` or listed in *allowed*
    (``*`` allows any).  An IP literal is always answered: a browser sends one only when the URL
    held that address, so the page asking is already that address's own.  No ``Host`` at all (an
    HTTP/1.0 tool) is not a browser and is answered.
    """
    if header is None:
        return True
    host = host_of(header)
    if host is None:
        return False
    if _is_ip(host) or host in LOCAL_NAMES:
        return True
    names = {name.lower().rstrip(".") for name in allowed}
    return "*" in names or host in names
