"""The Kubernetes scaler in memory: a fake API server (tests/kube_fake.py) behind treq's StubTreq,
time on a task.Clock."""

from __future__ import annotations

import json
import os
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.balancing.methods import SortMethod, make_balancer
from protheus_broker.balancing.pool import ServerPool
from protheus_broker.balancing.servers import RemoteServer
from protheus_broker.kube.client import KubeClient, KubeError, LineStream, ResponseTooLarge
from protheus_broker.kube.endpoints import EndpointTable, slice_endpoints
from protheus_broker.kube.kubeconfig import KubeConnection
from protheus_broker.kube.scaler import SOURCE, KubernetesScaler
from protheus_broker.kube.settings import KubeSettings
from protheus_broker.scaling.controller import ScaleToZero, ScaleToZeroPolicy
from protheus_broker.scaling.interfaces import IScaler

from .helpers import LogCatcher
from .kube_fake import FakeApi, endpoint_slice

SLICES_V1 = "/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices"


class Harness:
    """A scaler on a fake API, a pool and a clock."""

    def __init__(self, test: SynchronousTestCase, api: FakeApi | None = None, token_file: str | None = None,
                 max_response: int = 64 * 1024, config_servers: tuple[RemoteServer, ...] = (),
                 **settings: Any) -> None:
        self.api = api or FakeApi()
        self.clock = Clock()
        self.stub = StubTreq(self.api)
        self.logs = LogCatcher(test)
        connection = KubeConnection(server="https://api.test:6443", namespace="ns",
                                    token=None if token_file else "secret", token_file=token_file)
        self.settings = KubeSettings(section="KUBE", connection=connection, namespace="ns", kind="deployments",
                                     workload="erp", service="erp", port_name="tcp",
                                     max_response=max_response, **settings)
        self.client = KubeClient(self.clock, self.stub, connection, request_timeout=self.settings.request_timeout,
                                 max_response=max_response, token_refresh=self.settings.token_refresh)
        self.pool = ServerPool(config_servers, make_balancer(SortMethod.CONNECTION), clock=self.clock)
        self.scaler = KubernetesScaler(self.clock, self.client, self.pool, self.settings, "BALANCE_TEST")
        self.changes = 0
        self.scaler.subscribe(self.count)
        test.addCleanup(self.stop)

    def count(self) -> None:
        self.changes += 1

    def start(self) -> "Harness":
        self.scaler.startService()
        self.flush()
        return self

    def stop(self) -> None:
        if self.scaler.running:
            self.scaler.stopService()
            self.flush()

    def flush(self) -> None:
        self.stub.flush()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.flush()

    def members(self) -> dict[str, str]:
        return {b.server_id: f"{b.address} {b.state.value}" for b in self.pool if b.source == SOURCE}

    def warnings(self) -> list[str]:
        return [t for t, e in zip(self.logs.texts(), self.logs.events)
                if e.get("log_level") is not None and e["log_level"].name in ("warn", "error")]


class EndpointTableTests(SynchronousTestCase):
    """Which endpoints of a slice count as ready AppServers."""

    def test_ready_and_not_ready(self) -> None:
        """Ready endpoints are listed; not-ready ones are not; an absent condition counts as ready."""
        obj = endpoint_slice("erp-a", [("10.0.0.1", True, "p1"), ("10.0.0.2", False, "p2")], "1")
        obj["endpoints"].append({"addresses": ["10.0.0.3"], "conditions": {}})
        ready, problem = slice_endpoints(obj, "tcp")
        self.assertIsNone(problem)
        self.assertEqual(sorted((e.server_id, e.host, e.port) for e in ready),
                         [("10.0.0.3:1234", "10.0.0.3", 1234), ("p1", "10.0.0.1", 1234)])

    def test_v1beta1_topology(self) -> None:
        """A v1beta1 slice (topology, no nodeName) reads the same."""
        obj = endpoint_slice("erp-a", [("10.0.0.1", True, "p1")], "1", beta=True)
        self.assertEqual([e.host for e in slice_endpoints(obj, "tcp")[0]], ["10.0.0.1"])

    def test_port_by_name_or_only_one(self) -> None:
        """The port is PORT_NAME's, or the only one; two ports and no name is a problem."""
        two = [{"name": "tcp", "port": 1234}, {"name": "http", "port": 8080}]
        obj = endpoint_slice("erp-a", [("10.0.0.1", True, "p1")], "1", ports=two)
        self.assertEqual([e.port for e in slice_endpoints(obj, "http")[0]], [8080])
        ready, problem = slice_endpoints(obj, "")
        self.assertEqual((ready, problem), (set(), "has no exactly one TCP port (set PORT_NAME)"))
        one = endpoint_slice("erp-a", [("10.0.0.1", True, "p1")], "1", port=4321, port_name="whatever")
        self.assertEqual([e.port for e in slice_endpoints(one, "")[0]], [4321])

    def test_fqdn_and_multi_address(self) -> None:
        """An FQDN slice is ignored; an endpoint with several addresses is one AppServer."""
        obj = endpoint_slice("erp-a", [("10.0.0.1", True, "p1")], "1")
        obj["endpoints"][0]["addresses"] = ["10.0.0.1", "10.0.0.9"]
        self.assertEqual([e.host for e in slice_endpoints(obj, "tcp")[0]], ["10.0.0.1"])
        obj["addressType"] = "FQDN"
        self.assertEqual(slice_endpoints(obj, "tcp"), (set(), None))

    def test_problem_logged_once(self) -> None:
        """A slice without the named port is logged once, not on every event."""
        logs = LogCatcher(self)
        table = EndpointTable("erp", "nope")
        obj = endpoint_slice("erp-a", [("10.0.0.1", True, "p1")], "1")
        table.event("ADDED", obj)
        table.event("MODIFIED", obj)
        self.assertEqual(len([t for t in logs.texts() if "not used" in t]), 1)
        self.assertEqual(table.ready(), [])


class ScalerListWatchTests(SynchronousTestCase):
    """List, then watch EndpointSlices; ready endpoints are pool members of source kubernetes."""

    def test_provides_iscaler(self) -> None:
        """The scaler implements IScaler."""
        self.assertTrue(IScaler.providedBy(Harness(self).scaler))

    def test_list_then_watch_with_bookmarks(self) -> None:
        """The list's resourceVersion starts a watch with bookmarks and the Service's label selector."""
        api = FakeApi()
        api.slices["erp-a"] = endpoint_slice("erp-a", [("10.0.0.1", True, "erp-1")], "90")
        h = Harness(self, api).start()
        lists = [r for r in api.of("GET", "endpointslices") if "watch" not in r["query"]]
        watches = [r for r in api.of("GET", "endpointslices") if r["query"].get("watch") == "1"]
        self.assertEqual(lists[0]["query"], {"labelSelector": "kubernetes.io/service-name=erp"})
        self.assertEqual(watches[0]["query"]["resourceVersion"], "100")
        self.assertEqual(watches[0]["query"]["allowWatchBookmarks"], "true")
        self.assertEqual(watches[0]["query"]["timeoutSeconds"], "300")
        self.assertEqual(lists[0]["authorization"], "Bearer secret")
        self.assertEqual(h.members(), {"erp-1": "10.0.0.1:1234 up"})
        self.assertEqual(h.scaler.ready(), 1)
        snapshot = h.scaler.snapshot()
        self.assertEqual((snapshot["ready"], snapshot["resource_version"], snapshot["endpointslices"]),
                         (1, "100", "discovery.k8s.io/v1"))
        self.assertNotIn("secret", repr(h.settings))

    def test_ready_endpoints_join_and_leave(self) -> None:
        """An endpoint turning ready joins the pool; turning not-ready it leaves (draining if busy)."""
        h = Harness(self).start()
        h.api.put_slice(endpoint_slice("erp-a", [("10.0.0.1", False, "erp-1")], "0"), "ADDED")
        h.flush()
        self.assertEqual(h.members(), {})
        h.api.put_slice(endpoint_slice("erp-a", [("10.0.0.1", True, "erp-1"), ("10.0.0.2", True, "erp-2")], "0"))
        h.flush()
        self.assertEqual(h.members(), {"erp-1": "10.0.0.1:1234 up", "erp-2": "10.0.0.2:1234 up"})
        h.pool.session_opening(h.pool.get("erp-2"))  # a session on erp-2
        h.api.put_slice(endpoint_slice("erp-a", [("10.0.0.1", True, "erp-1"), ("10.0.0.2", False, "erp-2")], "0"))
        h.flush()
        self.assertEqual(h.members(), {"erp-1": "10.0.0.1:1234 up", "erp-2": "10.0.0.2:1234 draining"})
        self.assertEqual(h.scaler.ready(), 1)
        h.api.delete_slice("erp-a")
        h.flush()
        self.assertEqual(h.members(), {"erp-2": "10.0.0.2:1234 draining"})
        h.pool.session_closed(next(b for b in h.pool if b.server_id == "erp-2"))
        self.assertEqual(h.members(), {})
        self.assertGreaterEqual(h.changes, 3)

    def test_config_members_kept(self) -> None:
        """REMOTE_SERVER members of the config stay beside the Kubernetes ones."""
        h = Harness(self, config_servers=(RemoteServer("01", "127.0.0.1", 7000),)).start()
        h.api.put_slice(endpoint_slice("erp-a", [("10.0.0.1", True, "erp-1")], "0"), "ADDED")
        h.flush()
        self.assertEqual(sorted(b.server_id for b in h.pool), ["01", "erp-1"])
        h.api.delete_slice("erp-a")
        h.flush()
        self.assertEqual([b.server_id for b in h.pool], ["01"])

    def test_bookmark_moves_resource_version(self) -> None:
        """A BOOKMARK changes nothing but the resourceVersion the next watch resumes from."""
        h = Harness(self).start()
        h.api.send({"type": "BOOKMARK", "object": {"kind": "EndpointSlice", "metadata": {"resourceVersion": "555"}}})
        h.flush()
        self.assertEqual(h.scaler.resource_version, "555")
        h.api.end_watches()
        h.advance(2)
        watches = [r for r in h.api.of("GET", "endpointslices") if r["query"].get("watch") == "1"]
        self.assertEqual([w["query"]["resourceVersion"] for w in watches], ["100", "555"])
        self.assertEqual(h.scaler.counts["lists"], 1)

    def test_watch_end_resumes_without_list(self) -> None:
        """A watch the server ends is resumed from the last resourceVersion seen, not re-listed."""
        h = Harness(self).start()
        h.api.put_slice(endpoint_slice("erp-a", [("10.0.0.1", True, "erp-1")], "0"), "ADDED")
        h.flush()
        h.api.end_watches()
        h.flush()
        watches = [r for r in h.api.of("GET", "endpointslices") if r["query"].get("watch") == "1"]
        self.assertEqual([w["query"]["resourceVersion"] for w in watches], ["100", "101"])
        self.assertEqual(h.scaler.counts["lists"], 1)
        self.assertEqual(h.members(), {"erp-1": "10.0.0.1:1234 up"})

    def test_broken_watch_resumes_after_pause(self) -> None:
        """A watch cut mid-stream is one log line, then resumes from the last resourceVersion
        after the backoff (no re-list)."""
        h = Harness(self).start()
        h.api.put_slice(endpoint_slice("erp-a", [("10.0.0.1", True, "erp-1")], "0"), "ADDED")
        h.flush()
        h.api.break_watches()
        h.flush()
        self.assertEqual(len([t for t in h.warnings() if "watching EndpointSlices" in t]), 1)
        self.assertEqual(h.scaler.counts["watches"], 1)
        h.advance(1.0)
        watches = [r for r in h.api.of("GET", "endpointslices") if r["query"].get("watch") == "1"]
        self.assertEqual([w["query"]["resourceVersion"] for w in watches], ["100", "101"])
        self.assertEqual(h.scaler.counts["lists"], 1)
        self.assertEqual(h.members(), {"erp-1": "10.0.0.1:1234 up"})

    def test_error_event_backs_off(self) -> None:
        """An ERROR event other than 410 is one log line and a retry after the backoff."""
        h = Harness(self).start()
        h.api.send({"type": "ERROR", "object": {"kind": "Status", "code": 500, "message": "etcd is sad"}})
        h.flush()
        texts = [t for t in h.warnings() if "watching EndpointSlices" in t]
        self.assertEqual(len(texts), 1)
        self.assertIn("error event 500: etcd is sad", texts[0])
        h.advance(1.0)
        self.assertEqual(h.scaler.counts["watches"], 2)

    def test_watch_ending_at_once_backs_off(self) -> None:
        """A watch that ends at once with no event waits before the next, doubling the wait."""
        h = Harness(self).start()
        for expected_watches, wait in ((2, 1.0), (3, 2.0), (4, 4.0)):
            h.api.end_watches()
            h.flush()
            h.advance(wait - 0.01)
            self.assertEqual(h.scaler.counts["watches"], expected_watches - 1)
            h.advance(0.01)
            self.assertEqual(h.scaler.counts["watches"], expected_watches)
        self.assertEqual(len([t for t in h.warnings() if "ended at once" in t]), 3)

    def test_gone_status_relists(self) -> None:
        """A watch answered 410 Gone lists again at once; 410 again right after that list waits."""
        h = Harness(self)
        h.api.gone_below = 200
        h.api.slices["erp-a"] = endpoint_slice("erp-a", [("10.0.0.1", True, "erp-1")], "0")
        h.start()
        self.assertEqual((h.scaler.counts["gone"], h.scaler.counts["lists"]), (2, 2))
        self.assertEqual(h.members(), {"erp-1": "10.0.0.1:1234 up"})
        self.assertEqual(len([t for t in h.warnings() if "410" in t]), 1)
        h.api.rv = 200  # compaction over: the next list's version can be watched
        h.advance(1.0)
        self.assertEqual(h.scaler.counts["lists"], 3)
        self.assertEqual(h.api.watchers[-1].args[b"resourceVersion"], [b"200"])

    def test_gone_event_relists(self) -> None:
        """An ERROR event with code 410 lists again; what changed meanwhile is picked up."""
        h = Harness(self).start()
        h.api.slices["erp-a"] = endpoint_slice("erp-a", [("10.0.0.7", True, "erp-7")], "150")
        h.api.rv = 150
        h.api.send({"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                                "message": "too old resource version: 100 (140)"}})
        h.flush()
        self.assertEqual(h.scaler.counts["lists"], 2)
        self.assertEqual(h.scaler.counts["gone"], 1)
        self.assertEqual(h.members(), {"erp-7": "10.0.0.7:1234 up"})
        watches = [r for r in h.api.of("GET", "endpointslices") if r["query"].get("watch") == "1"]
        self.assertEqual(watches[-1]["query"]["resourceVersion"], "150")
        self.assertEqual(h.warnings(), [])

    def test_v1beta1_fallback(self) -> None:
        """A server without discovery.k8s.io/v1 (Kubernetes 1.20) is read as v1beta1."""
        api = FakeApi(versions=("v1beta1",))
        api.slices["erp-a"] = endpoint_slice("erp-a", [("10.0.0.1", True, "erp-1")], "90", beta=True)
        h = Harness(self, api).start()
        self.assertEqual(h.scaler.api_version, "v1beta1")
        self.assertEqual(h.members(), {"erp-1": "10.0.0.1:1234 up"})
        paths = [r["path"] for r in api.of("GET", "endpointslices")]
        self.assertEqual(paths[0], SLICES_V1)
        self.assertTrue(all("v1beta1" in p for p in paths[1:]))
        self.assertEqual(h.warnings(), [])

    def test_v1_preferred(self) -> None:
        """A server with both versions is read as v1."""
        h = Harness(self, FakeApi(versions=("v1", "v1beta1"))).start()
        self.assertEqual(h.scaler.api_version, "v1")
        self.assertTrue(all("/v1/" in r["path"] for r in h.api.of("GET", "endpointslices")))

    def test_list_error_backs_off(self) -> None:
        """A failing list is logged once per attempt and retried after 1, 2, 4 ... up to BACKOFF_MAX."""
        api = FakeApi()
        api.scripted = [(500, b"oops")] * 6
        h = Harness(self, api, backoff_max=4.0)
        h.scaler.startService()
        h.flush()
        # the first request is the scale GET (scripted too); the list is the second
        times = []
        for _ in range(5):
            before = h.scaler.counts["lists"]
            waited = 0.0
            while h.scaler.counts["lists"] == before and waited < 10:
                h.advance(0.5)
                waited += 0.5
            times.append(waited)
        self.assertEqual(times[:4], [1.0, 2.0, 4.0, 4.0])
        self.assertTrue(all("HTTP 500" in t for t in h.warnings() if "EndpointSlices" in t))

    def test_garbled_watch_line(self) -> None:
        """A watch line that is not JSON is one log line; the scaler lists again after a pause."""
        h = Harness(self).start()
        h.api.send_raw(b"{not json\n")
        h.flush()
        texts = [t for t in h.warnings() if "EndpointSlices" in t]
        self.assertEqual(len(texts), 1)
        self.assertIn("garbled watch stream: a watch line is not JSON", texts[0])
        h.advance(1)
        self.assertEqual(h.scaler.counts["lists"], 2)

    def test_oversized_list(self) -> None:
        """An answer past MAX_RESPONSE is cut off: one log line, no members, a retry later."""
        api = FakeApi()
        api.slices = {f"s{i}": endpoint_slice(f"s{i}", [(f"10.0.{i // 250}.{i % 250}", True, f"p{i}")], "1")
                      for i in range(400)}
        h = Harness(self, api, max_response=64 * 1024).start()
        texts = [t for t in h.warnings() if "EndpointSlices" in t]
        self.assertEqual(len(texts), 1)
        self.assertIn("answer larger than 65536 bytes", texts[0])
        self.assertEqual(h.members(), {})

    def test_oversized_watch_line(self) -> None:
        """A watch line past the cap (no newline in sight) aborts the watch with one log line."""
        h = Harness(self).start()
        h.api.send_raw(b"x" * (70 * 1024))
        h.flush()
        texts = [t for t in h.warnings() if "EndpointSlices" in t]
        self.assertEqual(len(texts), 1)
        self.assertIn("watch line longer than 65536 bytes", texts[0])

    def test_silent_server_times_out(self) -> None:
        """A list with no answer fails after REQUEST_TIMEOUT, and is retried."""
        api = FakeApi()
        api.silent = True
        h = Harness(self, api, request_timeout=5.0).start()
        h.advance(4.9)
        self.assertEqual(h.warnings(), [])
        h.advance(0.1)
        self.assertTrue(any("no answer within 5s" in t for t in h.warnings()))

    def test_watch_deadline(self) -> None:
        """A watch still open WATCH_TIMEOUT + REQUEST_TIMEOUT after it began is closed and resumed."""
        h = Harness(self, watch_timeout=30.0, request_timeout=5.0).start()
        h.advance(34.9)
        self.assertEqual(h.scaler.counts["watches"], 1)
        h.advance(0.1)
        self.assertTrue(any("still open (the server did not end it) after 35s" in t for t in h.warnings()))
        h.advance(1.0)
        self.assertEqual(h.scaler.counts["watches"], 2)

    def test_stop_closes_watch(self) -> None:
        """Stopping the scaler closes its watch and schedules nothing more."""
        h = Harness(self).start()
        h.scaler.stopService()
        h.flush()
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(h.warnings(), [])


class ScalerScaleTests(SynchronousTestCase):
    """The /scale subresource."""

    def test_learns_replicas_at_start(self) -> None:
        """At start the workload's replicas are what desired() says."""
        api = FakeApi()
        api.replicas = 3
        h = Harness(self, api).start()
        self.assertEqual(h.scaler.desired(), 3)

    def test_learning_retried(self) -> None:
        """A failed read of the workload's scale at start is retried after BACKOFF_MAX."""
        api = FakeApi()
        api.replicas = 2
        api.scripted = [(503, b"")]
        h = Harness(self, api, backoff_max=5.0).start()
        self.assertEqual(h.scaler.desired(), 0)
        self.assertEqual(len([t for t in h.warnings() if "cannot read deployment/erp's scale" in t]), 1)
        h.advance(5.0)
        self.assertEqual(h.scaler.desired(), 2)

    def test_patch_body(self) -> None:
        """scale(n) GETs the Scale, then merge-patches spec.replicas."""
        h = Harness(self).start()
        h.scaler.scale(2, "a login is waiting")
        h.flush()
        patches = h.api.of("PATCH", "/scale")
        self.assertEqual(len(patches), 1)
        self.assertEqual(patches[0]["path"], "/apis/apps/v1/namespaces/ns/deployments/erp/scale")
        self.assertEqual(patches[0]["content_type"], "application/merge-patch+json")
        self.assertEqual(json.loads(patches[0]["body"]), {"spec": {"replicas": 2}})
        self.assertEqual(h.api.replicas, 2)
        self.assertEqual(h.scaler.desired(), 2)
        self.assertTrue(any("from 0 to 2 replicas: a login is waiting" in t for t in h.logs.texts()))

    def test_no_patch_when_equal(self) -> None:
        """Asking for the replicas already set sends no PATCH."""
        api = FakeApi()
        api.replicas = 1
        h = Harness(self, api).start()
        h.scaler.scale(1, "same")
        h.flush()
        self.assertEqual(h.api.of("PATCH", "/scale"), [])

    def test_statefulset_path(self) -> None:
        """A StatefulSet is scaled through statefulsets/NAME/scale."""
        api = FakeApi()
        clock = Clock()
        stub = StubTreq(api)
        connection = KubeConnection(server="https://api.test", namespace="ns", token="t")
        settings = KubeSettings(section="K", connection=connection, namespace="ns", kind="statefulsets",
                                workload="erp-db", service="erp")
        pool = ServerPool((), make_balancer(SortMethod.CONNECTION), clock=clock)
        scaler = KubernetesScaler(clock, KubeClient(clock, stub, connection), pool, settings)
        scaler.startService()
        scaler.scale(1, "test")
        stub.flush()
        scaler.stopService()
        stub.flush()
        self.assertEqual([r["path"] for r in api.of("PATCH", "/scale")],
                         ["/apis/apps/v1/namespaces/ns/statefulsets/erp-db/scale"])

    def test_failed_patch_retries(self) -> None:
        """A refused PATCH is one log line and is retried after the backoff."""
        h = Harness(self).start()
        h.api.scripted = [(403, json.dumps({"kind": "Status", "reason": "Forbidden", "code": 403,
                                            "message": "cannot patch deployments/scale"}).encode())]
        h.scaler.scale(1, "wake")
        h.flush()
        texts = [t for t in h.warnings() if "cannot scale" in t]
        self.assertEqual(len(texts), 1)
        self.assertIn("HTTP 403 Forbidden: cannot patch deployments/scale", texts[0])
        self.assertEqual(h.api.replicas, 0)
        h.advance(1.0)
        self.assertEqual(h.api.replicas, 1)

    def test_latest_scale_wins(self) -> None:
        """Scales asked while one is in flight end with the latest replicas."""
        api = FakeApi()
        h = Harness(self, api).start()
        h.scaler.scale(1, "one")
        h.scaler.scale(3, "three")
        h.scaler.scale(2, "two")
        h.flush()
        self.assertEqual(api.replicas, 2)
        self.assertEqual(h.scaler.desired(), 2)


class TokenTests(SynchronousTestCase):
    """The bearer token file is re-read (bound service-account tokens rotate)."""

    def test_token_reread(self) -> None:
        """A new token in the file is used once TOKEN_REFRESH has passed, not before."""
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write("first\n")
        h = Harness(self, token_file=path, token_refresh=60.0).start()
        with open(path, "w") as handle:
            handle.write("second\n")
        h.scaler.scale(1, "a")
        h.flush()
        self.assertEqual(h.api.requests[-1]["authorization"], "Bearer first")
        h.advance(60)
        h.scaler.scale(2, "b")
        h.flush()
        self.assertEqual(h.api.requests[-1]["authorization"], "Bearer second")
        self.assertEqual(h.client.token_reads, 2)

    def test_unreadable_token_keeps_last(self) -> None:
        """A token file that vanished keeps the last token, with one log line."""
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write("first")
        h = Harness(self, token_file=path, token_refresh=10.0).start()
        os.remove(path)
        h.advance(10)
        h.scaler.scale(1, "a")
        h.flush()
        self.assertEqual(h.api.requests[-1]["authorization"], "Bearer first")
        self.assertEqual(len([t for t in h.warnings() if "keeping the last token" in t]), 1)


class ClientTests(SynchronousTestCase):
    """The API client's error reporting."""

    def test_status_message(self) -> None:
        """A non-2xx answer is a KubeError with the Status's reason and message."""
        api = FakeApi()
        clock = Clock()
        stub = StubTreq(api)
        client = KubeClient(clock, stub, KubeConnection(server="https://api.test", token="t"))
        d = client.request("GET", "/api/v1/nothing")
        stub.flush()
        error = self.failureResultOf(d, KubeError).value
        self.assertEqual((error.status, error.reason), (404, "NotFound"))
        self.assertIn("no such path", str(error))

    def test_not_json(self) -> None:
        """A 200 answer that is not JSON is a KubeError saying so."""
        api = FakeApi()
        api.scripted = [(200, b"<html>proxy login</html>")]
        clock = Clock()
        stub = StubTreq(api)
        client = KubeClient(clock, stub, KubeConnection(server="https://api.test", token="t"))
        d = client.request("GET", "/api")
        stub.flush()
        self.assertIn("not JSON", str(self.failureResultOf(d, KubeError).value))


class LineStreamTests(SynchronousTestCase):
    """Watch lines, however the bytes arrive."""

    def test_split_anywhere(self) -> None:
        """Lines split across reads at any point come out whole, in order; blank lines are skipped."""
        data = b'{"a":1}\n\n{"b":2}\n' + b"x" * 300 + b"\n"
        for size in (1, 2, 7, 64, len(data)):
            lines: list[bytes] = []
            stream = LineStream(1000, lines.append)
            for i in range(0, len(data), size):
                stream.dataReceived(data[i:i + size])
            self.assertEqual(lines, [b'{"a":1}', b'{"b":2}', b"x" * 300])

    def test_long_line_in_pieces(self) -> None:
        """A line past the cap fails the stream even when it arrives in small pieces."""
        stream = LineStream(100, lambda line: None)
        for _ in range(11):
            stream.dataReceived(b"y" * 10)
        self.failureResultOf(stream.done, ResponseTooLarge)


class ScaleToZeroKubeTests(SynchronousTestCase):
    """The scale-to-zero controller around the Kubernetes scaler."""

    def test_sleep_and_wake(self) -> None:
        """Pods running at start sleep after ZERO_IDLE_TIME (the controller learns the Deployment's
        replicas from the scaler); a held login wakes one pod and is released when it is Ready."""
        api = FakeApi()
        api.replicas = 2
        h = Harness(self, api)
        sessions = [0]
        policy = ScaleToZeroPolicy(enabled=True, idle_time=30.0, wake_timeout=60.0, max_held=10)
        controller = ScaleToZero(h.clock, h.scaler, policy, lambda: sessions[0], name="BALANCE_TEST")
        controller.start()  # before the scaler has read the Deployment (in a unit its GET is in flight)
        self.addCleanup(controller.stop)
        self.assertEqual((h.scaler.desired(), controller.target), (0, 0))
        h.start()
        self.assertEqual((h.scaler.desired(), controller.target), (2, 2))
        h.advance(29.0)
        self.assertEqual(api.replicas, 2)
        h.advance(1.0)
        self.assertEqual(api.replicas, 0)  # asleep: no session for ZERO_IDLE_TIME
        held = controller.hold("login-1")
        h.flush()
        self.assertNoResult(held)
        self.assertEqual(api.replicas, 1)  # woken
        h.api.put_slice(endpoint_slice("erp-a", [("10.0.0.1", True, "erp-1")], "0"), "ADDED")
        h.flush()
        self.successResultOf(held)
        self.assertEqual(h.members(), {"erp-1": "10.0.0.1:1234 up"})
