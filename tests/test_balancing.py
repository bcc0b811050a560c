"""Balancing: the seed's worked examples as tests, metric methods, and pool membership."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.balancing.methods import (
    ConnectionBalancer,
    MetricBalancer,
    Metrics,
    RoundRobinBalancer,
    make_balancer,
)
from protheus_broker.balancing.methods import SortMethod
from protheus_broker.balancing.servers import RemoteServer
from protheus_broker.balancing.pool import Backend, ServerPool, ServerState


def servers(count: int) -> list[RemoteServer]:
    return [RemoteServer(f"{n:02d}", "127.0.0.1", 5000 + n) for n in range(1, count + 1)]


class Broker:
    """The seed's 'broker screen': open and close sessions, see where they land."""

    def __init__(self, method: SortMethod, count: int = 3) -> None:
        self.pool = ServerPool(servers(count), make_balancer(method))
        self.sessions: list[Backend] = []

    def fewest(self, now: float = 0.0) -> set[str]:
        """The servers the balancer ranks first, equally (ties): those a login may go to."""
        ranked = self.pool.candidates(now)  # (CONNECTION: ranking changes nothing)
        return {b.server_id for b in ranked if b.active == ranked[0].active}

    def login(self, now: float = 0.0, choose: str | None = None) -> str:
        """A session to the balancer's first choice, or to *choose* when it is one of the tied
        first choices (the seed's 'any of them may be chosen')."""
        ranked = self.pool.candidates(now)
        backend = ranked[0]
        if choose is not None:
            backend = next(b for b in ranked if b.server_id == choose)
            if backend.active != ranked[0].active:
                raise AssertionError(f"{choose} has {backend.active} connections, the balancer's "
                                     f"first choice {ranked[0].server_id} {ranked[0].active}")
        self.pool.session_opening(backend)
        self.pool.session_connected(backend)
        self.sessions.append(backend)
        return backend.server_id

    def logout(self, server_id: str) -> None:
        backend = next(b for b in reversed(self.sessions) if b.server_id == server_id)
        self.sessions.remove(backend)
        self.pool.session_closed(backend)

    def screen(self) -> dict[str, int]:
        return {b.server_id: b.active for b in self.pool}


class ConnectionWorkedExampleTests(SynchronousTestCase):
    def test_seed_connection_sequence(self) -> None:
        """Seed 001, CONNECTION, every step: 1; 2 (2 or 3); 3 (must); 2 leaves; next to 2; the user
        on 2 opens an MDI tab (one more connection, from a tie) and server 2 shows 2 connections."""
        broker = Broker(SortMethod.CONNECTION)
        # "Supondo inicialmente que nenhum usuário está logado."
        self.assertEqual(broker.screen(), {"01": 0, "02": 0, "03": 0})
        # "os 3 servidores possuem o mesmo número de conexões (zero), qualquer um deles poderá ser
        # escolhido. O servidor 1 foi o escolhido."
        self.assertEqual(broker.fewest(), {"01", "02", "03"})
        self.assertEqual(broker.login(), "01")
        self.assertEqual(broker.screen(), {"01": 1, "02": 0, "03": 0})
        # "O próximo usuário a se logar irá para o servidor 2 ou servidor 3. Foi escolhido o servidor 2."
        self.assertEqual(broker.fewest(), {"02", "03"})
        self.assertEqual(broker.login(), "02")
        self.assertEqual(broker.screen(), {"01": 1, "02": 1, "03": 0})
        # "o próximo usuário a se conectar será obrigatoriamente direcionado ao servidor 3."
        self.assertEqual(broker.fewest(), {"03"})
        self.assertEqual(broker.login(), "03")
        self.assertEqual(broker.screen(), {"01": 1, "02": 1, "03": 1})
        # "o segundo usuário (servidor 2) fecha sua sessão ... o servidor 2 agora aparece com zero
        # conexões."
        broker.logout("02")
        self.assertEqual(broker.screen(), {"01": 1, "02": 0, "03": 1})
        # "o próximo usuário que se conectar irá ser direcionado ao servidor 2, que é o servidor com
        # o menor número de conexões."
        self.assertEqual(broker.fewest(), {"02"})
        self.assertEqual(broker.login(), "02")
        self.assertEqual(broker.screen(), {"01": 1, "02": 1, "03": 1})
        # "o usuário se conectou no servidor 2 no módulo SIGAADV, e abriu uma rotina de 'Consulta
        # Genérica'. Portanto, aparecem 2 conexões para o servidor 2": the MDI tab is one more
        # connection through the broker, balanced like any other.  All three are at one, a tie
        # ("qualquer um deles"), so server 2 is a choice CONNECTION allows, and the tab taken
        # there gives the seed's screen.  (Our tie rule, table order, would pick 01 here.)
        self.assertEqual(broker.fewest(), {"01", "02", "03"})
        self.assertEqual(broker.login(choose="02"), "02")
        self.assertEqual(broker.screen(), {"01": 1, "02": 2, "03": 1})
        # and the tab is a connection of its own: closing it leaves the user's first one
        broker.logout("02")
        self.assertEqual(broker.screen(), {"01": 1, "02": 1, "03": 1})


class RoundRobinWorkedExampleTests(SynchronousTestCase):
    def test_seed_round_robin_sequence(self) -> None:
        """Seed 001, ROUND_ROBIN: 1, 2, 3; 3 closes; next still 1, then 2, then 3."""
        broker = Broker(SortMethod.ROUND_ROBIN)
        self.assertEqual(broker.login(), "01")  # SIGAMDI menu
        self.assertEqual(broker.login(), "02")  # MDI tab 'Consulta Genérica'
        self.assertEqual(broker.login(), "03")  # a new SmartClient
        broker.logout("03")
        self.assertEqual(broker.screen(), {"01": 1, "02": 1, "03": 0})
        self.assertEqual(broker.login(), "01")  # next in sequence, although 3 has zero
        self.assertEqual(broker.login(), "02")
        self.assertEqual(broker.login(), "03")

    def test_down_server_skipped_sequence_continues(self) -> None:
        """A down server is skipped and the sequence carries on after it."""
        broker = Broker(SortMethod.ROUND_ROBIN)
        broker.pool.set_state("02", ServerState.DOWN, "test")
        self.assertEqual([broker.login() for _ in range(4)], ["01", "03", "01", "03"])
        broker.pool.set_state("02", ServerState.UP, "test")
        self.assertEqual([broker.login(), broker.login()], ["01", "02"])  # after 03 comes 01

    def test_failover_order_is_the_rest_of_the_sequence(self) -> None:
        """The ranking after the first choice is the rest of the sequence (failover order)."""
        balancer = RoundRobinBalancer()
        pool = ServerPool(servers(4), balancer)
        self.assertEqual([b.server_id for b in pool.candidates(0)], ["01", "02", "03", "04"])
        self.assertEqual([b.server_id for b in pool.candidates(0)], ["02", "03", "04", "01"])


class MetricBalancerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.now = 100.0

    def pool_with(self, method: SortMethod, reports: dict[str, Metrics | None]) -> ServerPool:
        pool = ServerPool(servers(len(reports)), make_balancer(method, metrics_max_age=3.0))
        for server_id, metrics in reports.items():
            if metrics is not None:
                pool.report_metrics(server_id, metrics)
        return pool

    def test_each_method_chooses_its_lowest_figure(self) -> None:
        """SERVER_MEMORY/USERS/THREADS/CPU each pick the server lowest in their own figure."""
        t = self.now
        reports: dict[str, Metrics | None] = {
            "01": Metrics(memory_bytes=300, users=1, threads=90, cpu_percent=50.0, taken_at=t),
            "02": Metrics(memory_bytes=100, users=9, threads=80, cpu_percent=70.0, taken_at=t),
            "03": Metrics(memory_bytes=200, users=5, threads=10, cpu_percent=20.0, taken_at=t),
        }
        expected = {
            SortMethod.SERVER_MEMORY: ["02", "03", "01"],
            SortMethod.SERVER_USERS: ["01", "03", "02"],
            SortMethod.SERVER_THREADS: ["03", "02", "01"],
            SortMethod.SERVER_CPU: ["03", "01", "02"],
        }
        for method, order in expected.items():
            pool = self.pool_with(method, reports)
            self.assertEqual([b.server_id for b in pool.candidates(self.now)], order, method)

    def test_stale_and_missing_metrics_rank_last_by_connections(self) -> None:
        """A server without a fresh report ranks after those with one, by its connections."""
        t = self.now
        pool = self.pool_with(SortMethod.SERVER_MEMORY, {
            "01": Metrics(1, 0, 0, 0.0, taken_at=t - 10),  # stale though lowest
            "02": Metrics(500, 0, 0, 0.0, taken_at=t - 1),
            "03": None,
        })
        pool.session_opening(pool.get("01"))
        self.assertEqual([b.server_id for b in pool.candidates(self.now)], ["02", "03", "01"])

    def test_no_fresh_metrics_is_connection(self) -> None:
        """With no fresh report anywhere, SERVER_* ranks exactly as CONNECTION."""
        pool = self.pool_with(SortMethod.SERVER_CPU, {"01": None, "02": None, "03": None})
        pool.session_opening(pool.get("01"))
        pool.session_opening(pool.get("02"))
        self.assertEqual([b.server_id for b in pool.candidates(self.now)], ["03", "01", "02"])

    def test_equal_figures_tie_on_connections(self) -> None:
        """Equal figures go to fewer connections, then table order."""
        t = self.now
        pool = self.pool_with(SortMethod.SERVER_USERS, {s: Metrics(0, 3, 0, 0.0, t) for s in ("01", "02", "03")})
        pool.session_opening(pool.get("01"))
        self.assertEqual([b.server_id for b in pool.candidates(self.now)], ["02", "03", "01"])

    def test_not_a_metric_method(self) -> None:
        """MetricBalancer refuses a non-metric method."""
        self.assertRaises(ValueError, MetricBalancer, SortMethod.ROUND_ROBIN, 3.0)


class InvariantTests(SynchronousTestCase):
    @given(
        st.sampled_from(list(SortMethod)),
        st.lists(st.sampled_from([ServerState.UP, ServerState.DOWN, ServerState.DRAINING,
                                  ServerState.SUSPENDED]), min_size=1, max_size=8),
        st.lists(st.integers(0, 5), min_size=8, max_size=8),
    )
    def test_rank_is_a_permutation_of_available_servers(self, method, states, loads) -> None:  # type: ignore[no-untyped-def]
        """Every method ranks each Up server once, then each Suspended one, never a down one."""
        pool = ServerPool(servers(len(states)), make_balancer(method))
        for backend, state, load in zip(list(pool), states, loads):
            backend.state = state
            backend.active = load
            backend.metrics = Metrics(load * 7 % 5, load, load, float(load), taken_at=0.0)
        ranked = [b.server_id for b in pool.candidates(1.0)]
        up = [b.server_id for b in pool if b.state is ServerState.UP]
        suspended = [b.server_id for b in pool if b.state is ServerState.SUSPENDED]
        # every Up server first, then the Suspended ones as last resort; never down or draining
        self.assertEqual(sorted(ranked[:len(up)]), sorted(up))
        self.assertEqual(sorted(ranked[len(up):]), sorted(suspended))

    @given(st.lists(st.sampled_from(["open", "close"]), max_size=60))
    def test_connection_keeps_counts_within_one(self, ops: list[str]) -> None:
        """CONNECTION with closes always from the busiest keeps servers within one session."""
        pool = ServerPool(servers(3), ConnectionBalancer())
        for op in ops:
            if op == "open":
                pool.session_opening(pool.candidates(0)[0])
            else:
                busiest = max(pool, key=lambda b: b.active)
                if busiest.active:
                    pool.session_closed(busiest)
            counts = [b.active for b in pool]
            self.assertLessEqual(max(counts) - min(counts), 1)


class PoolMembershipTests(SynchronousTestCase):
    def test_join_drain_ready_leave(self) -> None:
        """Servers join at run time; a draining server takes no new session; an idle one leaves."""
        pool = ServerPool(servers(2), ConnectionBalancer())
        pool.add(RemoteServer("NEW", "127.0.0.1", 6000))
        self.assertEqual([b.server_id for b in pool.candidates(0)], ["01", "02", "NEW"])
        pool.set_state("01", ServerState.DRAINING, "admin")
        self.assertEqual([b.server_id for b in pool.candidates(0)], ["02", "NEW"])
        pool.set_state("01", ServerState.UP, "admin")
        self.assertTrue(pool.remove("NEW"))
        self.assertEqual([b.server_id for b in pool], ["01", "02"])
        self.assertRaises(ValueError, pool.add, RemoteServer("01", "h", 1))

    def test_suspended_servers_are_the_last_resort(self) -> None:
        """Suspended servers come after every Up one (and alone when none is up); down never."""
        pool = ServerPool(servers(3), ConnectionBalancer())
        pool.set_state("01", ServerState.DOWN, "test")
        pool.set_state("02", ServerState.SUSPENDED, "test")
        self.assertEqual([b.server_id for b in pool.candidates(0)], ["03", "02"])
        pool.set_state("03", ServerState.SUSPENDED, "test")
        pool.session_opening(pool.get("02"))
        self.assertEqual([b.server_id for b in pool.candidates(0)], ["03", "02"])
        pool.set_state("02", ServerState.DRAINING, "test")
        pool.set_state("03", ServerState.DOWN, "test")
        self.assertEqual(pool.candidates(0), [])

    def test_server_back_from_suspicion_takes_one_session_at_a_time(self) -> None:
        """After SUSPECT_TIME a server is on probation: while one session tries it, others rank it
        last; once a session is answered it ranks as usual again."""
        pool = ServerPool(servers(3), ConnectionBalancer(), suspect_time=10.0)
        pool.connect_failed(pool.get("02"), "refused")

        def ids() -> list[str]:
            return [b.server_id for b in pool.candidates(11.0)]

        self.assertEqual(ids(), ["01", "02", "03"])
        probe = pool.get("02")
        self.assertTrue(pool.session_opening(probe))
        self.assertEqual(ids(), ["01", "03", "02"])  # one session is trying it: last resort
        pool.probe_ended(probe)  # that one left without an answer: the next may try
        pool.session_closed(probe)
        self.assertEqual(ids(), ["01", "02", "03"])
        self.assertTrue(pool.session_opening(probe))
        self.assertFalse(pool.session_opening(pool.get("01")))
        self.assertFalse(pool.session_opening(pool.get("01")))
        pool.session_answered(probe)
        pool.probe_ended(probe)
        self.assertEqual(ids(), ["03", "02", "01"])  # answered: by connections again
        self.assertFalse(pool.session_opening(probe))

    def test_answer_from_a_server_the_broker_suspended_brings_it_up(self) -> None:
        """A first byte from a server suspended by a failed session makes it Up again; a server
        suspended by monitoring stays as monitoring says."""
        pool = ServerPool(servers(2), ConnectionBalancer(), suspect_time=10.0)
        pool.session_failed(pool.get("01"), "no answer within 2s")
        self.assertIs(pool.get("01").state, ServerState.SUSPENDED)
        self.assertEqual(pool.get("01").reason, "no answer within 2s")
        pool.session_answered(pool.get("01"))
        self.assertIs(pool.get("01").state, ServerState.UP)
        pool.monitor_verdict("02", ServerState.SUSPENDED, "missed heartbeat")
        pool.session_answered(pool.get("02"))
        self.assertIs(pool.get("02").state, ServerState.SUSPENDED)

    def test_busy_server_leaves_after_its_last_session(self) -> None:
        """A server removed while it carries sessions drains and goes when the last one ends."""
        pool = ServerPool(servers(2), ConnectionBalancer())
        busy = pool.get("01")
        pool.session_opening(busy)
        self.assertFalse(pool.remove("01"))
        self.assertEqual(busy.state, ServerState.DRAINING)
        self.assertEqual([b.server_id for b in pool.candidates(0)], ["02"])
        pool.session_closed(busy)
        self.assertEqual([b.server_id for b in pool], ["02"])

    def test_reconfigure_keeps_sessions(self) -> None:
        """A reload adds new servers, removes idle ones, drains busy ones; sessions are untouched."""
        pool = ServerPool(servers(3), ConnectionBalancer())
        busy = pool.get("02")
        pool.session_opening(busy)
        result = pool.reconfigure([RemoteServer("01", "127.0.0.1", 5001),
                                   RemoteServer("04", "127.0.0.1", 5004),
                                   RemoteServer("03", "127.0.0.1", 6003)])  # 03 moved
        self.assertEqual((result.added, result.removed, result.draining, result.kept),
                         (["04", "03"], ["03"], ["02"], ["01"]))
        self.assertEqual(busy.state, ServerState.DRAINING)
        self.assertEqual(busy.active, 1)
        self.assertEqual(sorted(b.address for b in pool.candidates(0)),
                         ["127.0.0.1:5001", "127.0.0.1:5004", "127.0.0.1:6003"])
        pool.session_closed(busy)
        self.assertNotIn(busy, list(pool))
        self.assertEqual(pool.get("03").port, 6003)

    def test_snapshot(self) -> None:
        """A server's snapshot shows state, counts and metric age."""
        pool = ServerPool(servers(1), ConnectionBalancer())
        pool.report_metrics("01", Metrics(10, 1, 2, 3.0, taken_at=5.0))
        snap = pool.get("01").snapshot(now=7.5)
        self.assertEqual(snap["state"], "up")
        self.assertEqual(snap["metrics"], {"memory_bytes": 10, "users": 1, "threads": 2,
                                           "cpu_percent": 3.0, "age_seconds": 2.5})
