"""The Kubernetes scaler against a REAL Kubernetes API server (tools/k8s-testenv: etcd,
kube-apiserver and kube-controller-manager 1.20 built from Debian 12's sources).

There is no kubelet or scheduler: the test does their part (a Node, a binding per Pod, then
``pods/status`` Ready with podIP 127.0.0.1), and the Pod's "container" is a real sample AppServer
on 127.0.0.1.  The scaler runs with the least-privilege Role of packaging/kubernetes/rbac.yaml,
verifying the API server's certificate against its CA.

Needs the built test env (``tools/k8s-testenv/build.sh``, about 9 minutes; .ci/run builds it).
Without it this module says plainly that it did not run: a skip with that message locally, a
failure when ``K8S_TESTENV_REQUIRED=1`` (CI).
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import time
from typing import Any

from twisted.internet import defer, reactor, task, utils
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import SkipTest

from protheus_broker.config import load_config
from protheus_broker.demo.children import twistd_argv
from protheus_broker.desktop.unit import DesktopUnit
from protheus_broker.kube.client import KubeClient, KubeError, make_http
from protheus_broker.kube.kubeconfig import load_kubeconfig, parse_yaml
from protheus_broker.kube.scaler import SOURCE, KubernetesScaler

from .helpers import LogCatcher, ProcessTestCase, login

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.environ.get("K8S_TESTENV_TOOLS") or os.path.join(REPO, "tools", "k8s-testenv")
BUILT = os.environ.get("K8S_TESTENV") or os.path.join(os.path.expanduser("~"), ".cache", "k8s-testenv")
NS = "protheus"
DEPLOYMENT = "protheus-appserver"


def built() -> bool:
    return all(os.access(os.path.join(BUILT, p), os.X_OK)
               for p in ("bin/kube-apiserver", "bin/kube-controller-manager", "root/usr/bin/etcd"))


def free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def manifests(name: str) -> list[dict[str, Any]]:
    """The objects of packaging/kubernetes/<name> (documents split at ``---``)."""
    with open(os.path.join(REPO, "packaging", "kubernetes", name)) as handle:
        return [parse_yaml(doc) for doc in handle.read().split("\n---\n") if doc.strip()]


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


class Ended(ProcessProtocol):
    """A child process whose end the test waits for."""

    def __init__(self) -> None:
        self.ended: defer.Deferred[None] = defer.Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


class KubeApiServerTests(ProcessTestCase):
    """The scaler, a broker unit and a real API server."""

    timeout = 300

    def setUp(self) -> None:
        if not built():
            message = (f"DID NOT RUN: the real Kubernetes API server test needs the test env built in {BUILT} "
                       f"(run {TOOLS}/build.sh, about 9 minutes; .ci/run does)")
            if os.environ.get("K8S_TESTENV_REQUIRED") == "1":
                self.fail(message)
            raise SkipTest(message)
        super().setUp()
        self.figures: dict[str, Any] = {}
        self.restarted: list[Ended] = []

    # --- the control plane ---------------------------------------------------------------------

    async def start_env(self) -> None:
        self.run_dir = os.path.abspath(self.mktemp())
        api_port, etcd_port, peer_port = free_ports(3)
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.path.expanduser("~"),
                    "K8S_TESTENV": BUILT, "K8S_TESTENV_RUN": self.run_dir, "K8S_TESTENV_PORT": str(api_port),
                    "K8S_TESTENV_ETCD_PORT": str(etcd_port), "K8S_TESTENV_ETCD_PEER_PORT": str(peer_port)}
        self.addCleanup(lambda: defer.ensureDeferred(self.stop_env()))
        started = time.monotonic()
        out, err, code = await utils.getProcessOutputAndValue(
            "/bin/bash", [os.path.join(TOOLS, "run.sh"), "start"], env=self.env)
        self.figures["control plane start (s)"] = round(time.monotonic() - started, 2)
        if code != 0:
            logs = ""
            for name in ("apiserver.log", "etcd.log"):
                try:
                    with open(os.path.join(self.run_dir, name)) as handle:
                        logs += f"\n--- {name}\n" + handle.read()[-3000:]
                except OSError:
                    pass
            self.fail(f"run.sh start failed ({code}): {err.decode()}{logs}")
        self.kubeconfig = out.decode().strip().splitlines()[-1]
        self.api_port = api_port
        self.admin_connection = load_kubeconfig(self.kubeconfig)
        self.admin = KubeClient(reactor, make_http(reactor, self.admin_connection, 5.0), self.admin_connection,
                                request_timeout=10.0)

    async def stop_env(self) -> None:
        """Stop etcd, kube-apiserver and kube-controller-manager by the pids run.sh wrote."""
        pids = []
        for name in ("kcm", "apiserver", "etcd"):
            try:
                with open(os.path.join(self.run_dir, f"{name}.pid")) as handle:
                    pids.append(int(handle.read().strip()))
            except (OSError, ValueError):
                pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            await sleep(0.1)
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        for watcher in self.restarted:  # a restarted apiserver is our child: wait until it is reaped
            await watcher.ended

    async def api(self, method: str, path: str, body: Any = None, client: KubeClient | None = None,
                  content_type: str | None = None) -> Any:
        return await (client or self.admin).request(method, path, body=body, content_type=content_type)

    async def until(self, what: str, check: Any, seconds: float = 60.0, every: float = 0.05) -> Any:
        deadline = time.monotonic() + seconds
        while True:
            result = check()
            if isinstance(result, defer.Deferred):
                result = await result
            if result:
                return result
            if time.monotonic() > deadline:
                self.fail(f"gave up after {seconds:g}s waiting for {what}")
            await sleep(every)

    async def create(self, obj: dict[str, Any]) -> None:
        kind = obj["kind"]
        paths = {"ServiceAccount": f"/api/v1/namespaces/{NS}/serviceaccounts",
                 "Role": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles",
                 "RoleBinding": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings",
                 "Deployment": f"/apis/apps/v1/namespaces/{NS}/deployments",
                 "Service": f"/api/v1/namespaces/{NS}/services"}
        await self.api("POST", paths[kind], obj, content_type="application/json")

    async def broker_token(self) -> str:
        """The protheus-broker service account's token (the token controller's Secret)."""
        async def secret_name() -> str | None:
            sa = await self.api("GET", f"/api/v1/namespaces/{NS}/serviceaccounts/protheus-broker")
            secrets = sa.get("secrets") or []
            return secrets[0]["name"] if secrets else None
        name = await self.until("the service account's token Secret", lambda: defer.ensureDeferred(secret_name()),
                                seconds=60, every=0.2)
        secret = await self.api("GET", f"/api/v1/namespaces/{NS}/secrets/{name}")
        return base64.b64decode(secret["data"]["token"]).decode()

    def serving_ca(self) -> bytes:
        """The CA of the API server's self-signed serving certificate (the last block of its file)."""
        with open(os.path.join(self.run_dir, "pki", "serving", "apiserver.crt"), "rb") as handle:
            blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", handle.read(), re.S)
        return blocks[-1]

    async def pods(self) -> list[dict[str, Any]]:
        result = await self.api("GET", f"/api/v1/namespaces/{NS}/pods?labelSelector=app%3D{DEPLOYMENT}")
        return [p for p in result["items"] if not p["metadata"].get("deletionTimestamp")]

    async def play_kubelet(self, pod: str) -> None:
        """Bind *pod* to node-1 (the scheduler's part), then report it Running and Ready on
        127.0.0.1 (the kubelet's part)."""
        await self.api("POST", f"/api/v1/namespaces/{NS}/pods/{pod}/binding",
                       {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod},
                        "target": {"apiVersion": "v1", "kind": "Node", "name": "node-1"}},
                       content_type="application/json")
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        conditions = [{"type": t, "status": "True", "lastTransitionTime": now}
                      for t in ("Initialized", "PodScheduled", "ContainersReady", "Ready")]
        await self.api("PATCH", f"/api/v1/namespaces/{NS}/pods/{pod}/status",
                       {"status": {"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
                                   "hostIP": "127.0.0.1", "startTime": now, "conditions": conditions}},
                       content_type="application/merge-patch+json")

    # --- the test ------------------------------------------------------------------------------

    def test_scaler_against_real_api_server(self) -> defer.Deferred[None]:
        """Against kube-apiserver 1.20 with the least-privilege Role: replicas 0 -> 1 -> 0 through
        /scale, readiness through the EndpointSlice watch (v1beta1), watches that end and a 410
        survived, a held login through the broker reaches the Pod's AppServer; the daemon with
        SCALE_TO_ZERO=1 wakes the Deployment for a login and puts it back to sleep."""
        return defer.ensureDeferred(self.scenario())

    async def scenario(self) -> None:
        logs = LogCatcher(self)
        await self.start_env()
        await self.api("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                      "metadata": {"name": NS}}, content_type="application/json")
        await self.api("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}},
                       content_type="application/json")
        for obj in manifests("rbac.yaml"):
            await self.create(obj)
        sim = self.start("appserver", twistd_argv("protheus-appserver-sim", "--name", "pod",
                                                  "--port", "tcp:0:interface=127.0.0.1"))
        sim_port = await sim.listening()
        for obj in manifests("appserver.yaml"):
            if obj["kind"] == "Deployment":
                obj["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = sim_port
            await self.create(obj)
        token = await self.broker_token()
        kubeconfig = os.path.join(self.mktemp_dir(), "broker-kubeconfig")
        with open(kubeconfig, "w") as handle:  # JSON is YAML: the CA verifies the server, the token is the SA's
            json.dump({"apiVersion": "v1", "kind": "Config", "current-context": "c",
                       "clusters": [{"name": "k", "cluster": {
                           "server": f"https://127.0.0.1:{self.api_port}",
                           "certificate-authority-data": base64.b64encode(self.serving_ca()).decode()}}],
                       "users": [{"name": "broker", "user": {"token": token}}],
                       "contexts": [{"name": "c", "context": {"cluster": "k", "user": "broker", "namespace": NS}}]},
                      handle)
        broker_connection = load_kubeconfig(kubeconfig)
        limited = KubeClient(reactor, make_http(reactor, broker_connection, 5.0), broker_connection)
        try:
            await limited.request("GET", f"/api/v1/namespaces/{NS}/pods")
            self.fail("the broker's service account may list pods: the Role is not least privilege")
        except KubeError as e:
            self.assertEqual(e.status, 403)

        ini = self.write_ini(
            "[GENERAL]\nConsoleLog = 1\n[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
            "SORT_METHOD = CONNECTION\nMONITORING_TYPE = DISABLED\nCONNECT_TIMEOUT = 2\nWAIT_FOR_SERVER = 60\n"
            "KUBERNETES = KUBE_APPSERVER\n"
            f"[KUBE_APPSERVER]\nKUBECONFIG = {kubeconfig}\nDEPLOYMENT = {DEPLOYMENT}\nSERVICE = {DEPLOYMENT}\n"
            "PORT_NAME = smartclient\nWATCH_TIMEOUT = 3\nREQUEST_TIMEOUT = 5\nBACKOFF_MAX = 2\n")
        config = load_config(ini)
        unit = DesktopUnit(reactor, config.desktop, path=ini)
        unit.privilegedStartService()
        unit.startService()
        self.addCleanup(unit.stopService)
        scaler: KubernetesScaler = unit.scaler
        port = unit.port.getHost().port

        def members() -> list[str]:
            return [f"{b.server_id} {b.address} {b.state.value}" for b in unit.pool if b.source == SOURCE]

        await self.until("the first EndpointSlice list", lambda: scaler.counts["watches"] >= 1)
        self.assertEqual(scaler.api_version, "v1beta1")  # Kubernetes 1.20
        self.assertEqual((scaler.desired(), members()), (0, []))

        # a login arrives at an empty pool and waits (WAIT_FOR_SERVER) while the pod wakes
        held = defer.ensureDeferred(login(port, 1, patience=60.0))
        woke = time.monotonic()
        scaler.scale(1, "e2e: a login is waiting")
        pod = (await self.until("the Deployment's pod", lambda: defer.ensureDeferred(self.pods()), seconds=60))[0]
        self.figures["scale 0->1 to pod created (s)"] = round(time.monotonic() - woke, 3)
        deployment = await self.api("GET", f"/apis/apps/v1/namespaces/{NS}/deployments/{DEPLOYMENT}")
        self.assertEqual(deployment["spec"]["replicas"], 1)
        await self.play_kubelet(pod["metadata"]["name"])
        ready_at = time.monotonic()
        await self.until("the pod in the pool", lambda: members(), seconds=60, every=0.01)
        self.figures["pod Ready to pool member (s)"] = round(time.monotonic() - ready_at, 3)
        self.assertEqual(members(), [f"{pod['metadata']['name']} 127.0.0.1:{sim_port} up"])
        answered, took = await held
        self.assertTrue(answered, "the held login did not reach the pod's AppServer")
        self.figures["held login, scale to answer (s)"] = round(time.monotonic() - woke, 3)
        self.assertTrue((await login(port, 2))[0])

        # watches end (WATCH_TIMEOUT = 3) and resume from the last resourceVersion, no re-list
        lists = scaler.counts["lists"]
        await self.until("three more watches", lambda: scaler.counts["watches"] >= 4, seconds=30, every=0.1)
        self.assertEqual(scaler.counts["lists"], lists)
        self.assertEqual(len(members()), 1)

        # the API server restarts: the watch breaks, retries back off, and the resumed watch's
        # resourceVersion predates the new watch cache: 410 Gone (an ERROR event), a fresh list
        before_restart = len(self.scaler_warnings(logs))
        self.assertEqual(before_restart, 0)
        await self.api("PATCH", "/api/v1/nodes/node-1", {"metadata": {"labels": {"e2e": "restart"}}},
                       content_type="application/merge-patch+json")  # the store moves on
        restarted = time.monotonic()
        await self.restart_apiserver()
        self.figures["API server restart (s)"] = round(time.monotonic() - restarted, 2)
        await self.until("a 410 Gone after the restart", lambda: scaler.counts["gone"] >= 1, seconds=60, every=0.05)
        await self.until("the list after 410", lambda: scaler.counts["lists"] > lists, seconds=30)
        await self.until("a watch after the list", lambda: scaler._slices is not None, seconds=30)
        self.figures["restart to re-listed (s)"] = round(time.monotonic() - restarted, 2)
        self.assertEqual(len(members()), 1)
        self.assertTrue((await login(port, 3))[0])

        # back to zero: the pod terminates, leaves the pool through the watch
        slept = time.monotonic()
        scaler.scale(0, "e2e: idle")
        await self.until("the pod to leave the pool", lambda: not members(), seconds=60, every=0.01)
        self.figures["scale 1->0 to pool empty (s)"] = round(time.monotonic() - slept, 3)
        deployment = await self.api("GET", f"/apis/apps/v1/namespaces/{NS}/deployments/{DEPLOYMENT}")
        self.assertEqual(deployment["spec"].get("replicas", 0), 0)
        await self.api("DELETE", f"/api/v1/namespaces/{NS}/pods/{pod['metadata']['name']}?gracePeriodSeconds=0")

        self.figures.update({f"scaler {k}": v for k, v in scaler.counts.items()})
        await unit.stopService()

        # the daemon itself with SCALE_TO_ZERO=1 (twistd protheus-broker: config -> unit ->
        # scaler -> pool): a login held at the sleeping pool wakes the Deployment, reaches the pod
        # once it is Ready, and ZERO_IDLE_TIME after it ends the Deployment is back at zero
        with open(ini) as handle:
            text = handle.read()
        with open(ini, "w") as handle:
            handle.write(text.replace("KUBERNETES = KUBE_APPSERVER\n", "KUBERNETES = KUBE_APPSERVER\n"
                                      "SCALE_TO_ZERO = 1\nZERO_IDLE_TIME = 3\nWAKE_TIMEOUT = 60\n"))
        broker = self.start("broker", twistd_argv("protheus-broker", "--config", ini))
        broker_port = await broker.listening()
        await self.until("the daemon's first list", lambda: "discovery.k8s.io/v1beta1" in broker.text(), seconds=30)
        held = defer.ensureDeferred(login(broker_port, 4, patience=60.0))
        woke = time.monotonic()
        pod = (await self.until("the woken pod", lambda: defer.ensureDeferred(self.pods()), seconds=60))[0]
        self.figures["daemon: login to pod created (s)"] = round(time.monotonic() - woke, 3)
        await self.play_kubelet(pod["metadata"]["name"])
        answered, took = await held
        self.assertTrue(answered, f"the daemon's held login did not reach the pod:\n{broker.text()}")
        self.figures["daemon: held login, arrival to answer (s)"] = round(time.monotonic() - woke, 3)
        self.assertIn("1 ready endpoints of Service protheus-appserver", broker.text())
        ended = time.monotonic()

        async def asleep() -> bool:
            deployment = await self.api("GET", f"/apis/apps/v1/namespaces/{NS}/deployments/{DEPLOYMENT}")
            return deployment["spec"].get("replicas", 0) == 0
        await self.until("the Deployment back at zero", lambda: defer.ensureDeferred(asleep()), seconds=30,
                         every=0.1)
        self.figures["daemon: last session end to replicas 0 (s, ZERO_IDLE_TIME=3)"] = round(
            time.monotonic() - ended, 3)
        self.assertRegex(broker.text(), r"scale 1 -> 0: no session for \d+s")

        warnings = self.scaler_warnings(logs)
        self.figures["scaler warnings (all during the restart)"] = len(warnings)
        print("\nKubernetes e2e figures (kube-apiserver 1.20.2):")
        for key, value in self.figures.items():
            print(f"  {key}: {value}")
        for text in warnings:
            print(f"  warning: {text}")
            # what a restarting API server says: refused, cut, 5xx, and 403 while its RBAC
            # authorizer has not loaded the roles yet ("RBAC: role ... not found")
            self.assertRegex(text, "Connection refused|connection was closed|ConnectionLost|ConnectionDone|"
                                   "no answer within|HTTP 50[03]|ResponseFailed|ResponseNeverReceived|"
                                   r"HTTP 403 Forbidden: .*RBAC: \S+ \S+ not found")

    @staticmethod
    def scaler_warnings(logs: LogCatcher) -> list[str]:
        return [t for t, e in zip(logs.texts(), logs.events)
                if t.startswith("Kubernetes:") and e["log_level"].name in ("warn", "error")]

    async def restart_apiserver(self) -> None:
        """Stop kube-apiserver by its pid and start it again with the same command line (its new
        pid goes to the pid file, for stop_env); wait until it is ready."""
        pid_file = os.path.join(self.run_dir, "apiserver.pid")
        with open(pid_file) as handle:
            pid = int(handle.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = [a.decode() for a in handle.read().split(b"\0") if a]
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5  # it waits up to a minute for open requests: not that long
        while alive(pid) and time.monotonic() < deadline:
            await sleep(0.1)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
        await self.until("kube-apiserver to stop", lambda: not alive(pid), seconds=30)
        log_path = os.path.join(self.run_dir, "apiserver.log")
        watcher = Ended()
        process = reactor.spawnProcess(watcher, "/bin/sh",
                                       ["/bin/sh", "-c", f'exec "$@" >>"{log_path}" 2>&1', "sh", *argv],
                                       env=self.env, childFDs={})
        self.restarted.append(watcher)
        with open(pid_file, "w") as handle:
            handle.write(str(process.pid))

        async def ready() -> bool:
            try:  # served from etcd: ready for real
                await self.admin.request("GET", "/api/v1/namespaces/default")
            except Exception:
                return False
            return True
        await self.until("kube-apiserver to be ready again", lambda: defer.ensureDeferred(ready()),
                         seconds=60, every=0.25)
