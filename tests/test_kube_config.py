"""The Kubernetes scaler's configuration: the KUBERNETES section's keys, kubeconfig files (the YAML
subset), in-cluster service-account files, and the units that get a scaler."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from hypothesis import given, settings, strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.config import parse_config
from protheus_broker.desktop.unit import DesktopUnit
from protheus_broker.http.unit import HttpUnit
from protheus_broker.ini import ConfigError
from protheus_broker.kube.client import ApiServerTLS
from protheus_broker.kube.kubeconfig import (KubeConfigError, YamlError, from_kubeconfig, in_cluster,
                                             load_kubeconfig, parse_yaml)
from protheus_broker.kube.scaler import KubernetesScaler
from protheus_broker.scaling.interfaces import IScaler

from .tls_fixtures import certs

TESTENV_KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: testenv
  cluster: {server: "https://127.0.0.1:6443", insecure-skip-tls-verify: true}
users:
- name: admin
  user: {token: testenv-token}
contexts:
- name: testenv
  context: {cluster: testenv, user: admin, namespace: default}
current-context: testenv
"""

KUBECTL_KUBECONFIG = """\
apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: {ca}
    server: https://10.0.0.1:443   # the API server
  name: prod
- cluster:
    server: https://other:443
  name: other
contexts:
- context:
    cluster: prod
    namespace: erp
    user: "broker"
  name: prod-ctx
current-context: prod-ctx
kind: Config
preferences: {{}}
users:
- name: broker
  user:
    token: 'abc''def'
"""


def write(test: SynchronousTestCase, text: str, name: str = "kubeconfig") -> str:
    folder = test.mktemp()
    os.makedirs(folder)
    path = os.path.join(folder, name)
    with open(path, "w") as handle:
        handle.write(text)
    return path


def unit_ini(kube_keys: str, unit: str = "BALANCE_SMART_CLIENT_DESKTOP", servers: str = "") -> str:
    desktop = "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nSORT_METHOD = CONNECTION\n"
    if unit == "BALANCE_SMART_CLIENT_DESKTOP":
        return f"{desktop}KUBERNETES = KUBE_ERP\n{servers}\n[KUBE_ERP]\n{kube_keys}"
    return (f"{desktop}REMOTE_SERVER_01 = 127.0.0.1 1234\n[{unit}]\nLOCAL_SERVER_PORT = 0\n"
            f"KUBERNETES = KUBE_ERP\n{servers}\n[KUBE_ERP]\n{kube_keys}")


class KubeconfigTests(SynchronousTestCase):
    """Reading kubeconfig files."""

    def test_testenv_flow_style(self) -> None:
        """run.sh's kubeconfig (flow mappings, insecure-skip-tls-verify) reads right."""
        c = from_kubeconfig(TESTENV_KUBECONFIG, "/x/kubeconfig")
        self.assertEqual((c.server, c.namespace, c.insecure, c.token, c.ca_pem),
                         ("https://127.0.0.1:6443", "default", True, "testenv-token", None))

    def test_kubectl_block_style(self) -> None:
        """kubectl's block style with CA data, quoted strings and comments reads right."""
        ca = base64.b64encode(b"PEM").decode()
        c = from_kubeconfig(KUBECTL_KUBECONFIG.format(ca=ca), "/x/kubeconfig")
        self.assertEqual((c.server, c.namespace, c.insecure, c.token, c.ca_pem),
                         ("https://10.0.0.1:443", "erp", False, "abc'def", b"PEM"))

    def test_context_choice(self) -> None:
        """CONTEXT picks another context; an unknown one is an error naming it."""
        doc = parse_yaml(KUBECTL_KUBECONFIG.format(ca="UEVN"))
        doc["contexts"].append({"name": "o", "context": {"cluster": "other"}})
        c = from_kubeconfig(json.dumps(doc), "/x/k", context="o")
        self.assertEqual((c.server, c.token), ("https://other:443", None))
        with self.assertRaisesRegex(KubeConfigError, "no context named 'nope'"):
            from_kubeconfig(json.dumps(doc), "/x/k", context="nope")

    def test_relative_files(self) -> None:
        """certificate-authority and tokenFile are read relative to the kubeconfig's folder."""
        path = write(self, "apiVersion: v1\nclusters:\n- name: c\n  cluster:\n    server: https://h:6443\n"
                           "    certificate-authority: ca.pem\nusers:\n- name: u\n  user:\n    tokenFile: tok\n"
                           "contexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n")
        with open(os.path.join(os.path.dirname(path), "ca.pem"), "wb") as handle:
            handle.write(b"CA")
        c = load_kubeconfig(path)
        self.assertEqual(c.ca_pem, b"CA")
        self.assertEqual(c.token_file, os.path.join(os.path.dirname(os.path.abspath(path)), "tok"))

    def test_exec_refused(self) -> None:
        """exec credentials are refused with a clear message."""
        text = TESTENV_KUBECONFIG.replace("{token: testenv-token}", "{exec: {command: aws}}")
        with self.assertRaisesRegex(KubeConfigError, "exec and auth-provider"):
            from_kubeconfig(text, "/x/k")

    def test_garbage(self) -> None:
        """Text that is not a kubeconfig is a KubeConfigError, not a traceback."""
        for text in ("key: [unterminated", "- a\n- b\n", ":::", "a: |\n  block\n", "\tx: 1"):
            with self.assertRaises(KubeConfigError):
                from_kubeconfig(text, "/x/k")

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=200))
    def test_yaml_never_crashes(self, text: str) -> None:
        """Any text parses or raises YamlError (never another exception)."""
        try:
            parse_yaml(text)
        except YamlError:
            pass

    @settings(max_examples=100, deadline=None)
    @given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True),
                           st.one_of(st.from_regex(r"[a-zA-Z0-9/:._-]{1,12}", fullmatch=True),
                                     st.lists(st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True),
                                                              st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True),
                                                              min_size=1, max_size=3), max_size=3)),
                           min_size=1, max_size=5))
    def test_yaml_block_round_trip(self, doc: dict[str, Any]) -> None:
        """Block mappings and sequences of mappings, as kubectl writes them, read back as written."""
        lines = []
        for key, value in doc.items():
            if isinstance(value, str):
                lines.append(f"{key}: '{value}'")
            else:
                lines.append(f"{key}:")
                for item in value:
                    for n, (k, v) in enumerate(item.items()):
                        lines.append(f"{'- ' if n == 0 else '  '}{k}: '{v}'")
        expected = {k: (v if v != [] else None) for k, v in doc.items()}
        self.assertEqual(parse_yaml("\n".join(lines)), expected)


class InClusterTests(SynchronousTestCase):
    """The pod's service-account view."""

    def service_account(self) -> str:
        folder = self.mktemp()
        os.makedirs(folder)
        for name, data in (("token", "tok"), ("ca.crt", "CA"), ("namespace", "erp\n")):
            with open(os.path.join(folder, name), "w") as handle:
                handle.write(data)
        return folder

    def test_in_cluster(self) -> None:
        """KUBERNETES_SERVICE_HOST/PORT, ca.crt, the namespace file and the token file are used."""
        folder = self.service_account()
        c = in_cluster({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}, folder)
        self.assertEqual((c.server, c.namespace, c.ca_pem, c.token_file, c.token),
                         ("https://10.96.0.1:443", "erp", b"CA", os.path.join(folder, "token"), None))
        c6 = in_cluster({"KUBERNETES_SERVICE_HOST": "fd00::1"}, folder)
        self.assertEqual(c6.server, "https://[fd00::1]:443")

    def test_not_in_a_pod(self) -> None:
        """Outside a pod without KUBECONFIG: an error saying so."""
        with self.assertRaisesRegex(KubeConfigError, "not running in a Kubernetes pod"):
            in_cluster({}, self.service_account())


class SettingsTests(SynchronousTestCase):
    """The KUBERNETES section's keys, read through the config file."""

    def test_keys(self) -> None:
        """Every key is read, with defaults for the rest; the unit needs no REMOTE_SERVER."""
        path = write(self, TESTENV_KUBECONFIG)
        config = parse_config(unit_ini(f"KUBECONFIG = {path}\nDEPLOYMENT = protheus\nSERVICE = protheus-tcp\n"
                                       "PORT_NAME = smartclient\nREQUEST_TIMEOUT = 3\nTOKEN_REFRESH = 30\n"))
        kube = config.desktop.kubernetes
        assert kube is not None
        self.assertEqual((kube.kind, kube.workload, kube.service, kube.port_name, kube.namespace),
                         ("deployments", "protheus", "protheus-tcp", "smartclient", "default"))
        self.assertEqual((kube.request_timeout, kube.token_refresh, kube.watch_timeout, kube.backoff_max),
                         (3.0, 30.0, 300.0, 30.0))
        self.assertEqual(config.desktop.servers, ())
        self.assertEqual(config.desktop.wait_for_server, 10.0)
        self.assertEqual(config.warnings, ())

    def test_statefulset_and_defaults(self) -> None:
        """STATEFULSET scales a StatefulSet; SERVICE defaults to its name; NAMESPACE overrides."""
        path = write(self, TESTENV_KUBECONFIG)
        kube = parse_config(unit_ini(f"KUBECONFIG = {path}\nSTATEFULSET = erp\nNAMESPACE = prod\n")).desktop.kubernetes
        assert kube is not None
        self.assertEqual((kube.kind, kube.service, kube.namespace, kube.workload_label),
                         ("statefulsets", "erp", "prod", "statefulset/erp"))

    def test_bad_keys(self) -> None:
        """Each bad key is one ConfigError naming the key."""
        path = write(self, TESTENV_KUBECONFIG)
        cases = [
            (f"KUBECONFIG = {path}\n", "exactly one of DEPLOYMENT or STATEFULSET"),
            (f"KUBECONFIG = {path}\nDEPLOYMENT = a\nSTATEFULSET = b\n", "exactly one of"),
            (f"KUBECONFIG = {path}\nDEPLOYMENT = Bad_Name\n", "DEPLOYMENT.*not a Kubernetes name"),
            (f"KUBECONFIG = {path}\nDEPLOYMENT = a\nREQUEST_TIMEOUT = 0\n", "REQUEST_TIMEOUT.*out of range"),
            (f"KUBECONFIG = {path}\nDEPLOYMENT = a\nTOKEN_REFRESH = soon\n", "TOKEN_REFRESH.*expected a number"),
            (f"KUBECONFIG = {path}\nDEPLOYMENT = a\nENDPOINTSLICE_VERSION = v2\n", "ENDPOINTSLICE_VERSION"),
            (f"KUBECONFIG = {path}.missing\nDEPLOYMENT = a\n", "KUBECONFIG.*cannot read kubeconfig"),
        ]
        for keys, pattern in cases:
            with self.assertRaisesRegex(ConfigError, pattern):
                parse_config(unit_ini(keys))

    def test_missing_section(self) -> None:
        """KUBERNETES naming no section is an error naming it."""
        text = "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nKUBERNETES = NOPE\n"
        with self.assertRaisesRegex(ConfigError, r"KUBERNETES.*no \[NOPE\] section"):
            parse_config(text)

    def test_unknown_key_warned(self) -> None:
        """An unknown key in the KUBERNETES section is one warning; the section itself is known."""
        path = write(self, TESTENV_KUBECONFIG)
        config = parse_config(unit_ini(f"KUBECONFIG = {path}\nDEPLOYMENT = a\nREPLICAS = 3\n"))
        self.assertEqual(len(config.warnings), 1)
        self.assertIn("[KUBE_ERP] REPLICAS: unknown key", config.warnings[0])

    def test_http_unit(self) -> None:
        """An HTTP unit may take its servers from Kubernetes only."""
        path = write(self, TESTENV_KUBECONFIG)
        config = parse_config(unit_ini(f"KUBECONFIG = {path}\nDEPLOYMENT = a\n", unit="BALANCE_HTTP"))
        http = config.unit("BALANCE_HTTP")
        self.assertEqual(http.servers, ())
        self.assertIsNotNone(http.kubernetes)


class UnitWiringTests(SynchronousTestCase):
    """Units with a KUBERNETES section get a scaler as a child service."""

    def test_desktop_unit_scaler(self) -> None:
        """The desktop unit's scaler is an IScaler on the unit's pool, a child service."""
        path = write(self, TESTENV_KUBECONFIG)
        config = parse_config(unit_ini(f"KUBECONFIG = {path}\nDEPLOYMENT = a\n"))
        unit = DesktopUnit(MemoryReactorClock(), config.desktop)
        self.assertIsInstance(unit.scaler, KubernetesScaler)
        self.assertTrue(IScaler.providedBy(unit.scaler))
        self.assertIs(unit.scaler.pool, unit.pool)
        self.assertIn(unit.scaler, list(unit))

    def test_http_unit_scaler(self) -> None:
        """The HTTP unit gets one too; without the key, no scaler."""
        path = write(self, TESTENV_KUBECONFIG)
        config = parse_config(unit_ini(f"KUBECONFIG = {path}\nDEPLOYMENT = a\n", unit="BALANCE_HTTP"))
        unit = HttpUnit(MemoryReactorClock(), config.unit("BALANCE_HTTP"), name="BALANCE_HTTP")
        self.assertIsInstance(unit.scaler, KubernetesScaler)
        plain = parse_config("[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\n"
                             "REMOTE_SERVER_01 = 127.0.0.1 1\n")
        self.assertIsNone(DesktopUnit(MemoryReactorClock(), plain.desktop).scaler)

    def test_bad_ca_is_config_error(self) -> None:
        """A kubeconfig CA that is no certificate stops the unit with a ConfigError."""
        text = TESTENV_KUBECONFIG.replace("insecure-skip-tls-verify: true",
                                          "certificate-authority-data: " + base64.b64encode(b"junk").decode())
        path = write(self, text)
        config = parse_config(unit_ini(f"KUBECONFIG = {path}\nDEPLOYMENT = a\n"))
        with self.assertRaisesRegex(ConfigError, "no PEM certificate"):
            DesktopUnit(MemoryReactorClock(), config.desktop)


class TlsPolicyTests(SynchronousTestCase):
    """TLS to the API server."""

    def test_ca_verified(self) -> None:
        """With a CA, connections verify the server against it (and its name)."""
        with open(certs().ca_path) as handle:
            ca = handle.read().encode()
        connection = from_kubeconfig(TESTENV_KUBECONFIG.replace(
            "insecure-skip-tls-verify: true", "certificate-authority-data: " + base64.b64encode(ca).decode()),
            "/x/k")
        policy = ApiServerTLS(connection)
        self.assertIsNotNone(policy.trust)
        creator = policy.creatorForNetloc(b"127.0.0.1", 6443)
        self.assertEqual(creator._hostnameASCII, "127.0.0.1")


class ScaleToZeroSettingsTests(SynchronousTestCase):
    """SCALE_TO_ZERO with a Kubernetes scaler."""

    def test_scale_to_zero_with_kubernetes(self) -> None:
        """SCALE_TO_ZERO=1 is accepted with KUBERNETES (WAKE_TIMEOUT 60 s by default) and the
        desktop unit's controller drives the Kubernetes scaler."""
        path = write(self, TESTENV_KUBECONFIG)
        config = parse_config(unit_ini(f"KUBECONFIG = {path}\nDEPLOYMENT = a\n",
                                       servers="SCALE_TO_ZERO = 1\nZERO_IDLE_TIME = 120\n"))
        policy = config.desktop.scale_to_zero
        self.assertEqual((policy.enabled, policy.idle_time, policy.wake_timeout, policy.min_awake),
                         (True, 120.0, 60.0, 1))
        unit = DesktopUnit(MemoryReactorClock(), config.desktop)
        assert unit.scale_to_zero is not None
        self.assertIs(unit.scale_to_zero.scaler, unit.scaler)

    def test_scale_to_zero_needs_a_scaler(self) -> None:
        """SCALE_TO_ZERO=1 without nodes or KUBERNETES names both in its error."""
        text = ("[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nREMOTE_SERVER_01 = 127.0.0.1 1\n"
                "SCALE_TO_ZERO = 1\n")
        with self.assertRaisesRegex(ConfigError, "NODES = <section>\\) or KUBERNETES"):
            parse_config(text)
