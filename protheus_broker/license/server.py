"""``protheus-license``'s AMP listener: the server side of :mod:`.protocol`.

A broker connects, proves it holds the shared secret (or presents a certificate the CA signed,
on mutual TLS), and then leases, renews and releases blocks of seats.  Before authenticating a
peer may send only the handshake (:class:`~protheus_broker.monitoring.commands.QuietAMP`'s box
limits apply), within ``HANDSHAKE_TIMEOUT``; connections not yet authenticated are capped in
total (``MAX_PENDING``) and per address (``MAX_PENDING_PER_ADDRESS``), authenticated clients by
``MAX_CLIENTS``.  Refusals (a wrong secret included) are logged once, then at most once a minute
per address.

A client is known by its name: a connection lost starts the grace time of its leases; the same
client authenticating again within it gets them back in the ``LicenseAuthenticate`` answer (a
second connection under the same name replaces the first).
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogLevel
from twisted.protocols import amp
from twisted.python.failure import Failure

from protheus_broker.agent.agent import RefusalLog
from protheus_broker.license import protocol as lic
from protheus_broker.license.leases import Lease, LeaseTable
from protheus_broker.license.settings import LicenseServerConfig
from protheus_broker.monitoring.commands import QuietAMP

log = Logger()

#: A client's name: its host name or what its config says (no spaces: it goes in log lines).
_CLIENT_RE = re.compile(r"^[A-Za-z0-9_.:@\-]{1,128}$")
#: The error code of a change the journal could not record (the client retries later).
JOURNAL_FAILED = b"JOURNAL_FAILED"
#: Journal failures are logged at most this often.
JOURNAL_LOG_INTERVAL = 60.0


class LicenseServer:
    """The server apart from its sockets: the lease table, the config, who is connected and
    who waits to authenticate."""

    def __init__(self, reactor: Any, config: LicenseServerConfig, table: LeaseTable) -> None:
        self.reactor = reactor
        self.config = config
        self.table = table
        self.clients: dict[str, LicenseProtocol] = {}
        self.pending: dict[str, int] = {}
        self.refusals = RefusalLog(reactor)
        self.refused_connections = 0
        self.failed_handshakes = 0
        self._journal_logged = -JOURNAL_LOG_INTERVAL

    @property
    def pending_total(self) -> int:
        return sum(self.pending.values())

    def admit(self, host: str) -> str:
        """'' if a new connection from *host* may start its handshake, else why not."""
        if self.pending_total >= self.config.max_pending:
            return f"{self.pending_total} connections are authenticating (MAX_PENDING)"
        if self.pending.get(host, 0) >= self.config.max_pending_per_address:
            return f"{self.pending[host]} connections from {host} are authenticating (MAX_PENDING_PER_ADDRESS)"
        self.pending[host] = self.pending.get(host, 0) + 1
        return ""

    def settled(self, host: str) -> None:
        """A connection from *host* authenticated or went away: no longer pending."""
        left = self.pending.get(host, 0) - 1
        if left > 0:
            self.pending[host] = left
        else:
            self.pending.pop(host, None)

    def journal_failed(self, what: str, exc: OSError) -> amp.RemoteAmpError:
        """One error line (at most once a minute) and the error the client gets."""
        now = self.reactor.seconds()
        if now - self._journal_logged >= JOURNAL_LOG_INTERVAL:
            self._journal_logged = now
            log.error("journal {path}: cannot record {what}: {why}; refusing lease changes until "
                      "it can", path=self.config.journal, what=what, why=exc.strerror or str(exc))
        return amp.RemoteAmpError(JOURNAL_FAILED, f"the license server cannot record {what} now")

    def revoke(self, lease_id: str, by: str) -> Lease:
        """An admin takes a lease back; its client, if connected, hears ``Revoked`` at once."""
        lease = self.table.revoke(lease_id, by)
        holder = self.clients.get(lease.client)
        if holder is not None and holder.transport is not None:
            holder.callRemote(lic.Revoked, lease_id=lease.lease_id, reason=f"revoked by admin ({by})")
        return lease

    def reload(self, config: LicenseServerConfig) -> None:
        """New seat counts, lease times, bounds, secret and token (what needs no restart)."""
        self.config = config
        self.table.limits = config.limits
        self.table.set_counts(config.counts)


class LicenseProtocol(QuietAMP):
    """The server's end of one broker's channel."""

    peer_role = "broker"

    def __init__(self, server: LicenseServer, host: str) -> None:
        super().__init__()
        self.server = server
        self.peer_host = host
        self.peer = host
        self.client = ""
        self.client_nonce = b""
        self.server_nonce = b""
        self.pending = True
        self.timeout: Any = None

    # --- connection --------------------------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        peer = self.transport.getPeer()
        self.peer = f"{self.peer_host}:{getattr(peer, 'port', '')}"
        self.timeout = self.server.reactor.callLater(self.server.config.handshake_timeout, self._too_slow)

    def _too_slow(self) -> None:
        if self.transport is None or self.authenticated:
            return
        self.server.refusals.emit(self.peer_host, LogLevel.warn,
                                  "broker {peer}: no handshake within {timeout:g}s; dropping it",
                                  peer=self.peer, timeout=self.server.config.handshake_timeout)
        self.transport.abortConnection()

    def box_refused(self, why: str) -> None:
        self.server.refusals.emit(self.peer_host, LogLevel.warn,
                                  "broker {peer}: {why}; dropping the connection", peer=self.peer, why=why)

    def _refuse(self, why: str) -> None:
        self.server.failed_handshakes += 1
        self.server.refusals.emit(self.peer_host, LogLevel.error, "broker {peer} refused: {why}; dropping it",
                                  peer=self.peer, why=why)
        transport = self.transport
        self.server.reactor.callLater(0, lambda: transport and transport.loseConnection())

    def _settle(self) -> None:
        if self.pending:
            self.pending = False
            self.server.settled(self.peer_host)

    def connectionLost(self, reason: Failure = Failure(Exception("connection lost"))) -> None:
        super().connectionLost(reason)
        if self.timeout is not None and self.timeout.active():
            self.timeout.cancel()
        self._settle()
        if self.authenticated and self.server.clients.get(self.client) is self:
            del self.server.clients[self.client]
            log.info("client {client} ({peer}) disconnected", client=self.client, peer=self.peer)
            self.server.table.client_lost(self.client)

    # --- handshake ---------------------------------------------------------------------------

    @lic.LicenseHello.responder
    def hello(self, version: int, client: str, client_nonce: bytes) -> dict[str, Any]:
        if self.client_nonce:
            self._refuse("a second LicenseHello")
            raise lic.AuthenticationFailed("one LicenseHello per connection")
        if version != lic.PROTOCOL_VERSION:
            self._refuse(f"protocol version {version} (this server speaks {lic.PROTOCOL_VERSION})")
            raise lic.UnsupportedVersion(f"the license server speaks version {lic.PROTOCOL_VERSION}")
        if not _CLIENT_RE.match(client):
            self._refuse(f"malformed client name {client[:40]!r}")
            raise lic.AuthenticationFailed("a client name is 1 to 128 of A-Z a-z 0-9 _ . : @ -")
        if len(client_nonce) != lic.NONCE_BYTES:
            self._refuse("malformed challenge")
            raise lic.AuthenticationFailed("malformed challenge")
        self.client, self.client_nonce = client, client_nonce
        self.server_nonce = os.urandom(lic.NONCE_BYTES)
        return {"server_nonce": self.server_nonce,
                "server_proof": lic.proof(self.server.config.secret, lic.SERVER_ROLE, client_nonce,
                                          self.server_nonce, client)}

    @lic.LicenseAuthenticate.responder
    def authenticate(self, client_proof: bytes) -> dict[str, Any]:
        if not self.client_nonce or self.authenticated:
            self._refuse("LicenseAuthenticate out of turn")
            raise lic.NotAuthenticated("LicenseHello first, and once")
        expected = lic.proof(self.server.config.secret, lic.CLIENT_ROLE, self.server_nonce,
                             self.client_nonce, self.client)
        if not lic.proof_matches(expected, client_proof):
            self._refuse(f"wrong proof for client {self.client} (a different SECRET, or not our broker)")
            raise lic.AuthenticationFailed("wrong proof")
        server = self.server
        older = server.clients.get(self.client)
        if older is None and len(server.clients) >= server.config.max_clients:
            self._refuse(f"{len(server.clients)} clients are connected (MAX_CLIENTS)")
            raise lic.AuthenticationFailed("the license server has as many clients as it takes")
        self.authenticated = True
        self._settle()
        if self.timeout is not None and self.timeout.active():
            self.timeout.cancel()
        server.clients[self.client] = self
        if older is not None:
            log.warn("client {client} connected again from {peer}; dropping its older connection "
                     "({older})", client=self.client, peer=self.peer, older=older.peer)
            if older.transport is not None:
                older.transport.abortConnection()
        leases = server.table.client_back(self.client)
        log.info("client {client} ({peer}) authenticated; it holds {count} leases",
                 client=self.client, peer=self.peer, count=len(leases))
        now = server.reactor.seconds()
        return {"leases": [lease.wire(now) for lease in leases]}

    # --- leases ------------------------------------------------------------------------------

    def _require_authenticated(self, command: str) -> None:
        if not self.authenticated:
            self._refuse(f"{command} before authenticating")
            raise lic.NotAuthenticated("authenticate first")

    @lic.Lease.responder
    def lease(self, license_class: str, seats: int) -> dict[str, Any]:
        self._require_authenticated("Lease")
        try:
            granted = self.server.table.grant(self.client, license_class.upper(), seats)
        except OSError as exc:
            raise self.server.journal_failed("a grant", exc) from None
        return {"lease_id": granted.lease_id, "seats": granted.seats, "ttl": self.server.table.limits.ttl}

    @lic.Renew.responder
    def renew(self, lease_id: str) -> dict[str, Any]:
        self._require_authenticated("Renew")
        try:
            return {"ttl": self.server.table.renew(self.client, lease_id)}
        except OSError as exc:
            raise self.server.journal_failed("a renewal", exc) from None

    @lic.Release.responder
    def release(self, lease_id: str, seats: int) -> dict[str, Any]:
        self._require_authenticated("Release")
        try:
            return {"seats": self.server.table.release(self.client, lease_id, seats)}
        except OSError as exc:
            raise self.server.journal_failed("a release", exc) from None


class LicenseFactory(Factory):
    """Builds a protocol per connection, unless the caps on unauthenticated connections refuse it
    (then the connection is closed at once, with a rate-limited log line)."""

    noisy = False

    def __init__(self, server: LicenseServer) -> None:
        self.server = server

    def buildProtocol(self, addr: Any) -> LicenseProtocol | None:  # type: ignore[override]
        host = str(getattr(addr, "host", addr))
        why = self.server.admit(host)
        if why:
            self.server.refused_connections += 1
            self.server.refusals.emit(host, LogLevel.warn, "connection from {peer_host} refused: {why}",
                                      peer_host=host, why=why)
            return None
        return LicenseProtocol(self.server, host)
