"""Where the Kubernetes API is and how to authenticate to it: in-cluster (the pod's service
account) or a kubeconfig file.  Pure data and parsing; the token file is re-read by the client.

A kubeconfig is YAML (or JSON).  PyYAML is not a dependency of the broker, so :func:`parse_yaml`
reads the subset kubectl and the usual generators write: block mappings and sequences, flow
mappings and sequences on one line, plain and quoted scalars, comments.
"""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

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
        document = json.loads(text) if text.lstrip().startswith("{") else parse_yaml(text)
    except (ValueError, YamlError) as e:
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


# --- the YAML subset ---------------------------------------------------------------------------

class YamlError(ValueError):
    """Text outside the YAML subset :func:`parse_yaml` reads."""


def _strip_comment(line: str) -> str:
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def _scalar(text: str) -> Any:
    text = text.strip()
    if text.startswith('"'):
        if not text.endswith('"') or len(text) < 2:
            raise YamlError(f"unterminated string {text!r}")
        return json.loads(text)  # YAML's double-quoted escapes are JSON's for what we read
    if text.startswith("'"):
        if not text.endswith("'") or len(text) < 2:
            raise YamlError(f"unterminated string {text!r}")
        return text[1:-1].replace("''", "'")
    if text.startswith("{") or text.startswith("["):
        return _flow(text)
    if text in ("true", "True"):
        return True
    if text in ("false", "False"):
        return False
    if text in ("null", "~", ""):
        return None
    if re.fullmatch(r"-?[0-9]+", text):
        return int(text)
    return text


def _split_flow(body: str) -> list[str]:
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(body):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    parts.append(body[start:])
    return [p.strip() for p in parts if p.strip()]


def _key_value(text: str) -> tuple[str, str] | None:
    """``key: value`` split at the first ': ' (or a trailing ':') outside quotes."""
    quote = ""
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == ":" and (i + 1 == len(text) or text[i + 1] in " \t"):
            key = text[:i].strip()
            return str(_scalar(key)) if key[:1] in "'\"" else key, text[i + 1:].strip()
    return None


def _flow(text: str) -> Any:
    if text.startswith("{"):
        if not text.endswith("}"):
            raise YamlError(f"unterminated flow mapping {text!r}")
        result: dict[str, Any] = {}
        for part in _split_flow(text[1:-1]):
            pair = _key_value(part)
            if pair is None:
                raise YamlError(f"not 'key: value' in {text!r}")
            result[pair[0]] = _scalar(pair[1])
        return result
    if not text.endswith("]"):
        raise YamlError(f"unterminated flow sequence {text!r}")
    return [_scalar(part) for part in _split_flow(text[1:-1])]


def parse_yaml(text: str) -> Any:
    """The YAML subset of kubeconfig files (see the module docstring); :class:`YamlError` beyond it."""
    lines: list[tuple[int, str]] = []
    for raw in text.splitlines():
        if raw.strip() in ("---", "..."):
            continue
        if "\t" in raw[:len(raw) - len(raw.lstrip())]:
            raise YamlError("tab in indentation")
        line = _strip_comment(raw)
        if line.strip():
            lines.append((len(line) - len(line.lstrip(" ")), line.strip()))
    if not lines:
        return None
    value, end = _block(lines, 0, lines[0][0])
    if end != len(lines):
        raise YamlError(f"unexpected indentation at {lines[end][1]!r}")
    return value


def _block(lines: list[tuple[int, str]], i: int, indent: int) -> tuple[Any, int]:
    if lines[i][1].startswith("- ") or lines[i][1] == "-":
        items: list[Any] = []
        while i < len(lines) and lines[i][0] == indent and (lines[i][1].startswith("- ") or lines[i][1] == "-"):
            rest = lines[i][1][1:].lstrip(" ")
            inner = indent + (len(lines[i][1]) - len(rest))
            if not rest:  # "-" then a nested block
                i += 1
                if i < len(lines) and lines[i][0] > indent:
                    value, i = _block(lines, i, lines[i][0])
                else:
                    value = None
                items.append(value)
                continue
            # the item's first line is at column *inner*: parse it and its continuation as a block
            sub = [(inner, rest)]
            j = i + 1
            while j < len(lines) and lines[j][0] > indent:
                sub.append(lines[j])
                j += 1
            value, used = _block(sub, 0, inner)
            if used != len(sub):
                raise YamlError(f"unexpected indentation at {sub[used][1]!r}")
            items.append(value)
            i = j
        return items, i
    mapping: dict[str, Any] = {}
    if _key_value(lines[i][1]) is None:
        if i + 1 < len(lines) and lines[i + 1][0] > indent:
            raise YamlError(f"expected 'key: value' at {lines[i][1]!r}")
        return _scalar(lines[i][1]), i + 1
    while i < len(lines) and lines[i][0] == indent:
        pair = _key_value(lines[i][1])
        if pair is None:
            raise YamlError(f"expected 'key: value' at {lines[i][1]!r}")
        key, rest = pair
        i += 1
        if rest:
            if rest[:1] in "|>":
                raise YamlError("block scalars (| and >) are not supported")
            mapping[key] = _scalar(rest)
        elif i < len(lines) and (lines[i][0] > indent or (lines[i][0] == indent and lines[i][1].startswith("-"))):
            mapping[key], i = _block(lines, i, lines[i][0])
        else:
            mapping[key] = None
    return mapping, i
