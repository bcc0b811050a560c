"""Where the Kubernetes API is and how to authenticate to it: in-cluster (the pod's service
account) or a kubeconfig file.  Pure data and parsing; the token file is re-read by the client.

A kubeconfig is YAML (or JSON, which is YAML too): read with PyYAML's ``safe_load`` (plain data,
no object construction), from a file capped at :data:`MAX_FILE_BYTES`.
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

#: The service account's files in a pod.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

#: A kubeconfig or token file larger than this is refused (a mistake, not a config).
MAX_FILE_BYTES = 1024 * 1024


class KubeConfigError(Exception):
    """The kubeconfig or the in-cluster files cannot be used; the text says why."""


@dataclass(frozen=True)
class KubeConnection:
    """How to reach one API server."""

    server: str  # https://host:port (no trailing slash)
    namespace: str = "default"
    ca_pem: bytes | None = None  # the cluster CA; None: the system's roots (or insecure)
    insecure: bool = False  # insecure-skip-tls-verify
    token: str | None = field(default=None, repr=False)  # a fixed bearer token (kubeconfig)
    token_file: str | None = None  # a token file re-read periodically (in-cluster, tokenFile)
    client_cert_pem: bytes | None = None
    client_key_pem: bytes | None = field(default=None, repr=False)
    source: str = "in-cluster"  # for messages: "in-cluster" or the kubeconfig path

    @property
    def tls(self) -> bool:
        return self.server.startswith("https:")


def read_small(path: str, what: str) -> bytes:
    """A small file's bytes, or :class:`KubeConfigError` naming *what* it is."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise KubeConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise KubeConfigError(f"{what} {path} is larger than {MAX_FILE_BYTES} bytes")
    return data


def in_cluster(environ: Mapping[str, str], directory: str = SERVICE_ACCOUNT_DIR) -> KubeConnection:
    """The pod's own view: ``KUBERNETES_SERVICE_HOST``/``_PORT``, the service account's CA,
    namespace and token (the token file is kept: it is re-read, bound tokens rotate)."""
    host = environ.get("KUBERNETES_SERVICE_HOST", "").strip()
    port = environ.get("KUBERNETES_SERVICE_PORT", "").strip() or "443"
    if not host:
        raise KubeConfigError("not running in a Kubernetes pod (KUBERNETES_SERVICE_HOST is unset) "
                              "and no KUBECONFIG given")
    if not port.isdigit():
        raise KubeConfigError(f"KUBERNETES_SERVICE_PORT is not a port: {port!r}")
    if ":" in host:
        host = f"[{host}]"
    token_file = os.path.join(directory, "token")
    read_small(token_file, "the service-account token")  # present now, re-read later
    ca = read_small(os.path.join(directory, "ca.crt"), "the cluster CA")
    try:
        namespace = read_small(os.path.join(directory, "namespace"), "the namespace file").decode().strip()
    except KubeConfigError:
        namespace = "default"
    return KubeConnection(server=f"https://{host}:{port}", namespace=namespace or "default", ca_pem=ca,
                          token_file=token_file, source="in-cluster")


# --- kubeconfig --------------------------------------------------------------------------------

def _named(items: Any, name: str, kind: str) -> dict[str, Any]:
    if not isinstance(items, list):
        raise KubeConfigError(f"no {kind}s list")
    for item in items:
        if isinstance(item, dict) and item.get("name") == name:
            inner = item.get(kind)
            return inner if isinstance(inner, dict) else {}
    raise KubeConfigError(f"no {kind} named {name!r}")


def _pem(entry: Mapping[str, Any], data_key: str, file_key: str, base: str, what: str) -> bytes | None:
    data = entry.get(data_key)
    if data:
        try:
            return base64.b64decode(str(data), validate=True)
        except ValueError:
            raise KubeConfigError(f"{data_key} is not base64") from None
    path = entry.get(file_key)
    if path:
        return read_small(os.path.join(base, str(path)), what)
    return None


def from_kubeconfig(text: str, path: str, context: str = "") -> KubeConnection:
    """The connection of *context* (default: current-context) in a kubeconfig's *text*; relative
    file names are taken from *path*'s folder."""
    try:
        document = parse_yaml(text)
    except YamlError as e:
        raise KubeConfigError(f"cannot parse it: {e}") from None
    if not isinstance(document, dict):
        raise KubeConfigError("not a kubeconfig (no mapping at the top)")
    name = context or str(document.get("current-context") or "")
    if not name:
        raise KubeConfigError("no current-context and no CONTEXT given")
    ctx = _named(document.get("contexts"), name, "context")
    cluster = _named(document.get("clusters"), str(ctx.get("cluster", "")), "cluster")
    user = _named(document.get("users"), str(ctx.get("user", "")), "user") if ctx.get("user") else {}
    base = os.path.dirname(os.path.abspath(path))
    server = str(cluster.get("server") or "").rstrip("/")
    if not re.match(r"^https?://[^/\s]+$", server):
        raise KubeConfigError(f"cluster server {server!r} is not http(s)://host:port")
    if user.get("exec") or user.get("auth-provider"):
        raise KubeConfigError("exec and auth-provider credentials are not supported: use a token "
                              "or a client certificate")
    token = user.get("token")
    token_file = user.get("tokenFile")
    if isinstance(token, bool) or isinstance(token_file, bool):
        raise KubeConfigError("token and tokenFile must be text")
    return KubeConnection(
        server=server,
        namespace=str(ctx.get("namespace") or "default"),
        ca_pem=_pem(cluster, "certificate-authority-data", "certificate-authority", base, "the cluster CA"),
        insecure=cluster.get("insecure-skip-tls-verify") in (True, "true"),
        token=str(token) if token else None,
        token_file=os.path.join(base, str(token_file)) if token_file else None,
        client_cert_pem=_pem(user, "client-certificate-data", "client-certificate", base, "the client certificate"),
        client_key_pem=_pem(user, "client-key-data", "client-key", base, "the client key"),
        source=path,
    )


def load_kubeconfig(path: str, context: str = "") -> KubeConnection:
    """Read and parse the kubeconfig at *path*."""
    try:
        text = read_small(path, "kubeconfig").decode("utf-8")
    except UnicodeDecodeError:
        raise KubeConfigError(f"kubeconfig {path} is not UTF-8") from None
    return from_kubeconfig(text, path, context)


class YamlError(ValueError):
    """Text that is not YAML."""


def parse_yaml(text: str) -> Any:
    """The plain data of a YAML document (mappings, sequences, scalars); :class:`YamlError` if
    *text* is not YAML."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise YamlError(str(e).replace("\n", " ")) from None
