"""Pool members from several sources, observers, waiting for a server, host names, in memory."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.balancing.methods import ConnectionBalancer
from protheus_broker.balancing.pool import (RESOLVE_AFTER_FAILURE, RESOLVE_EVERY, NoServerAvailable, PoolEvent,
                                            ServerPool, ServerState)
from protheus_broker.balancing.servers import RemoteServer
from protheus_broker.desktop.proxy import BrokerFactory

from .helpers import LogCatcher, servers


def pool(clock: Clock | None = None) -> ServerPool:
    return ServerPool(servers(5001, 5002), ConnectionBalancer(), clock=clock)


class SourceTests(SynchronousTestCase):
    def test_config_members_carry_their_source(self) -> None:
        """Servers from the config file are from source "config"; an added one names its own."""
        p = pool()
        p.add(RemoteServer("N1", "127.0.0.1", 6001), source="nodes")
        self.assertEqual({b.server_id: b.source for b in p}, {"01": "config", "02": "config", "N1": "nodes"})
        self.assertEqual(p.get("N1").snapshot(0.0)["source"], "nodes")

    def test_member_from_another_source_survives_a_reload(self) -> None:
        """A reload replaces only the config's members: a node's server stays."""
        p = pool()
        p.add(RemoteServer("N1", "127.0.0.1", 6001), source="nodes")
        result = p.reconfigure(servers(5001))
        self.assertEqual(result.removed, ["02"])
        self.assertEqual(sorted(b.server_id for b in p), ["01", "N1"])
        self.assertEqual(p.get("N1").state, ServerState.UP)

    def test_source_reconfigure_leaves_the_config_alone(self) -> None:
        """Another source reconfigures only its own members."""
        p = pool()
        p.reconfigure([RemoteServer("N1", "127.0.0.1", 6001), RemoteServer("N2", "127.0.0.1", 6002)],
                      source="nodes")
        result = p.reconfigure([RemoteServer("N2", "127.0.0.1", 6002)], source="nodes")
        self.assertEqual((result.removed, result.kept), (["N1"], ["N2"]))
        self.assertEqual(sorted(b.server_id for b in p), ["01", "02", "N2"])

    def test_clashing_id_is_not_taken_over(self) -> None:
        """A config server whose id another source holds is not added, with one log line."""
        logs = LogCatcher(self)
        p = pool()
        p.add(RemoteServer("03", "127.0.0.1", 6003), source="nodes")
        result = p.reconfigure(servers(5001, 5002, 5003))
        self.assertEqual(result.clashes, ["03"])
        self.assertEqual(p.get("03").port, 6003)
        [line] = [t for t in logs.texts() if "not added" in t]
        self.assertIn("server 03 (127.0.0.1:5003) not added: that id is a member from nodes", line)

    def test_remove_checks_the_source(self) -> None:
        """A source removes its own members only."""
        p = pool()
        p.add(RemoteServer("N1", "127.0.0.1", 6001), source="nodes")
        self.assertRaises(ValueError, p.remove, "01", source="nodes")
        self.assertTrue(p.remove("N1", source="nodes"))
        self.assertEqual(sorted(b.server_id for b in p), ["01", "02"])


class ObserverTests(SynchronousTestCase):
    def test_observers_hear_joins_leaves_and_state_changes(self) -> None:
        """Every join, leave and state change reaches a subscriber, until it unsubscribes."""
        p = pool()
        heard: list[PoolEvent] = []
        unsubscribe = p.subscribe(heard.append)
        p.add(RemoteServer("N1", "127.0.0.1", 6001), source="nodes")
        p.set_state("01", ServerState.DOWN, "monitor: refused")
        p.set_state("01", ServerState.DOWN, "monitor: refused")  # no change, no event
        p.remove("N1")
        p.reconfigure(servers(5001))
        self.assertEqual([(e.kind, e.server_id, e.state, e.source) for e in heard], [
            ("added", "N1", ServerState.UP, "nodes"),
            ("state", "01", ServerState.DOWN, "config"),
            ("removed", "N1", ServerState.UP, "nodes"),
            ("removed", "02", ServerState.UP, "config"),
        ])
        unsubscribe()
        p.set_state("01", ServerState.UP, "monitor: answered")
        self.assertEqual(len(heard), 4)

    def test_failing_observer_is_logged_and_others_still_hear(self) -> None:
        """An observer that raises is logged; the next one still hears the event."""
        logs = LogCatcher(self)
        p = pool()

        def broken(event: PoolEvent) -> None:
            raise RuntimeError("boom")
        heard: list[PoolEvent] = []
        p.subscribe(broken)
        p.subscribe(heard.append)
        p.set_state("01", ServerState.DOWN, "x")
        self.assertEqual(len(heard), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(any("pool observer" in t for t in logs.texts()))


class WhenAvailableTests(SynchronousTestCase):
    def _all_down(self, clock: Clock) -> ServerPool:
        p = pool(clock)
        for backend in p:
            p.set_state(backend.server_id, ServerState.DOWN, "monitor: refused")
        return p

    def test_fires_at_once_when_a_server_can_take_a_session(self) -> None:
        """Up, or Suspended as a last resort, is available now."""
        clock = Clock()
        p = pool(clock)
        p.set_state("01", ServerState.DOWN, "x")
        p.set_state("02", ServerState.SUSPENDED, "late report")
        self.assertIsNone(self.successResultOf(p.when_available(5)))

    def test_fires_when_a_server_comes_up(self) -> None:
        """A waiter fires when a server comes up, and its timer is cancelled."""
        clock = Clock()
        p = self._all_down(clock)
        d = p.when_available(5)
        self.assertNoResult(d)
        clock.advance(3)
        p.set_state("02", ServerState.UP, "monitor: answered")
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_fires_when_a_server_joins(self) -> None:
        """A server added by another source wakes the waiters."""
        clock = Clock()
        p = self._all_down(clock)
        d = p.when_available(5)
        p.add(RemoteServer("N1", "127.0.0.1", 6001), source="nodes")
        self.successResultOf(d)

    def test_times_out_with_a_reason(self) -> None:
        """After the timeout it fails with NoServerAvailable naming each server's state."""
        clock = Clock()
        p = self._all_down(clock)
        d = p.when_available(5)
        clock.advance(5)
        failure = self.failureResultOf(d, NoServerAvailable)
        self.assertEqual(failure.getErrorMessage(), "none could take a session within 5s: "
                         "01 down: monitor: refused; 02 down: monitor: refused")
        p.set_state("01", ServerState.UP, "back")  # a late change touches nothing

    def test_cancel_stops_the_wait(self) -> None:
        """Cancelling drops the waiter and its timer."""
        clock = Clock()
        p = self._all_down(clock)
        d = p.when_available(5)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])
        p.set_state("01", ServerState.UP, "back")

    def test_empty_pool_says_so(self) -> None:
        """An empty pool's timeout says the pool is empty."""
        clock = Clock()
        p = ServerPool([], ConnectionBalancer(), clock=clock)
        d = p.when_available(1)
        clock.advance(1)
        self.assertIn("the pool is empty", self.failureResultOf(d, NoServerAvailable).getErrorMessage())


class FakeResolver:
    """An IHostnameResolver that answers when the test says so."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, Any]] = []

    def resolveHostName(self, receiver: Any, host: str, port: int = 0, *args: Any) -> Any:
        self.asked.append((host, receiver))
        return receiver

    def answer(self, index: int, *addresses: str) -> None:
        host, receiver = self.asked[index]
        receiver.resolutionBegan(None)
        for address in addresses:
            receiver.addressResolved(IPv4Address("TCP", address, 0))
        receiver.resolutionComplete()


class HostNameTests(SynchronousTestCase):
    def _pool(self, clock: Clock) -> tuple[ServerPool, FakeResolver]:
        p = ServerPool([RemoteServer("01", "app.example", 5001), RemoteServer("02", "10.0.0.2", 5002)],
                       ConnectionBalancer(), clock=clock)
        resolver = FakeResolver()
        p.use_resolver(resolver)
        return p, resolver

    def test_names_resolved_at_load_in_the_background(self) -> None:
        """Every host name is looked up when the pool gets its resolver; IP literals are not."""
        clock = Clock()
        p, resolver = self._pool(clock)
        self.assertEqual([host for host, _ in resolver.asked], ["app.example"])
        self.assertEqual(p.addresses_for(p.get("01")), [])  # not answered yet
        resolver.answer(0, "192.0.2.1", "192.0.2.2")
        self.assertEqual(p.addresses_for(p.get("01")), ["192.0.2.1", "192.0.2.2"])
        self.assertEqual(p.get("02").addresses, [])

    def test_reload_resolves_new_members(self) -> None:
        """A server added by a reload (or another source) is looked up when it joins."""
        clock = Clock()
        p, resolver = self._pool(clock)
        p.reconfigure([RemoteServer("01", "app.example", 5001), RemoteServer("03", "db.example", 5003)])
        self.assertEqual([host for host, _ in resolver.asked], ["app.example", "db.example"])

    def test_refreshed_when_old_and_after_failure(self) -> None:
        """Known addresses are used at once; once old they are looked up again in the background,
        and a server whose addresses all failed is looked up again."""
        clock = Clock()
        p, resolver = self._pool(clock)
        resolver.answer(0, "192.0.2.1")
        backend = p.get("01")
        clock.advance(RESOLVE_EVERY - 1)
        self.assertEqual(p.addresses_for(backend), ["192.0.2.1"])
        self.assertEqual(len(resolver.asked), 1)
        clock.advance(1)
        self.assertEqual(p.addresses_for(backend), ["192.0.2.1"])  # the old ones meanwhile
        self.assertEqual(len(resolver.asked), 2)
        self.assertEqual(p.addresses_for(backend), ["192.0.2.1"])  # one lookup at a time
        self.assertEqual(len(resolver.asked), 2)
        resolver.answer(1, "192.0.2.9")
        self.assertEqual(backend.addresses, ["192.0.2.9"])
        clock.advance(RESOLVE_AFTER_FAILURE)
        p.connect_failed(backend, "refused")
        self.assertEqual(len(resolver.asked), 3)

    def test_failed_lookup_keeps_the_last_addresses(self) -> None:
        """A lookup that finds nothing keeps the last known addresses, with one log line."""
        logs = LogCatcher(self)
        clock = Clock()
        p, resolver = self._pool(clock)
        resolver.answer(0, "192.0.2.1")
        clock.advance(RESOLVE_EVERY)
        p.addresses_for(p.get("01"))
        resolver.answer(1)
        self.assertEqual(p.get("01").addresses, ["192.0.2.1"])
        self.assertIn("server 01: app.example has no address; keeping the last known", logs.texts())

    def test_session_uses_the_pool_addresses(self) -> None:
        """A session connects to the addresses the pool resolved, without a lookup of its own."""
        reactor = MemoryReactorClock()
        p = ServerPool([RemoteServer("01", "app.example", 5001)], ConnectionBalancer(), clock=reactor)
        resolver = FakeResolver()
        reactor.nameResolver = resolver  # type: ignore[attr-defined]
        factory = BrokerFactory(reactor, p)
        resolver.answer(0, "192.0.2.7")
        client = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 4000))
        assert client is not None
        client.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 4000)))
        self.assertEqual([c[:2] for c in reactor.tcpClients], [("192.0.2.7", 5001)])
        self.assertEqual(len(resolver.asked), 1)
