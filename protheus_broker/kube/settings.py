"""The Kubernetes scaler's keys: a balance unit names a section with ``KUBERNETES = <section>``;
that section says which Deployment or StatefulSet to scale, which Service's EndpointSlices list
its ready AppServers, and how to reach the API server (in-cluster, or ``KUBECONFIG``)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

from protheus_broker.ini import Section
from protheus_broker.kube.kubeconfig import KubeConfigError, KubeConnection, in_cluster, load_kubeconfig

#: A DNS-1123 name (Deployments, StatefulSets, Services, namespaces, port names).
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


@dataclass(frozen=True)
class KubeSettings:
    """One unit's Kubernetes scaler."""

    section: str  # the section the keys come from
    connection: KubeConnection
    namespace: str
    kind: str  # "deployments" or "statefulsets" (the API's resource name)
    workload: str  # the Deployment's or StatefulSet's name
    service: str  # the Service whose EndpointSlices list the ready AppServers
    port_name: str = ""  # the Service port to use ("" : its only port)
    token_refresh: float = 60.0  # TOKEN_REFRESH: seconds between reads of the token file
    request_timeout: float = 10.0  # REQUEST_TIMEOUT: a request with no answer by then fails
    watch_timeout: float = 300.0  # WATCH_TIMEOUT: the server ends each watch after this (timeoutSeconds)
    max_response: int = 8 * 1024 * 1024  # MAX_RESPONSE: cap on an answer and on one watch line, bytes
    backoff_max: float = 30.0  # BACKOFF_MAX: the longest pause between retries after errors
    api_version: str = ""  # ENDPOINTSLICE_VERSION: v1, v1beta1 or "" (probe v1, then v1beta1)

    @property
    def workload_label(self) -> str:
        return f"{self.kind[:-1]}/{self.workload}"


def _name(section: Section, key: str, default: str = "") -> str:
    value = section.text(key, default)
    if value and not _NAME_RE.match(value):
        raise section.error(key, f"{value!r} is not a Kubernetes name (lower-case letters, digits, '-', '.')")
    return value


def read_kubernetes(unit: Section, sections: Mapping[str, Section], warnings: list[str] | None = None,
                    environ: Mapping[str, str] | None = None,
                    service_account_dir: str | None = None) -> KubeSettings | None:
    """The unit's :class:`KubeSettings` from the section its ``KUBERNETES`` key names, or None
    without that key.  The connection is resolved now (kubeconfig read, or the pod's service
    account), so a wrong file is one error line at start."""
    named = unit.raw("KUBERNETES")
    if not named:
        return None
    section = sections.get(named)
    if section is None:
        raise unit.error("KUBERNETES", f"no [{named}] section in the file")
    deployment = _name(section, "DEPLOYMENT")
    statefulset = _name(section, "STATEFULSET")
    if bool(deployment) == bool(statefulset):
        raise section.error("DEPLOYMENT" if deployment else "STATEFULSET",
                            f"[{section.name}] needs exactly one of DEPLOYMENT or STATEFULSET")
    kind, workload = ("deployments", deployment) if deployment else ("statefulsets", statefulset)
    kubeconfig = section.text("KUBECONFIG", "")
    context = section.text("CONTEXT", "")
    try:
        if kubeconfig:
            connection = load_kubeconfig(kubeconfig, context)
        else:
            connection = in_cluster(os.environ if environ is None else environ,
                                    *(() if service_account_dir is None else (service_account_dir,)))
    except KubeConfigError as e:
        raise section.error("KUBECONFIG", str(e)) from None
    api_version = section.text("ENDPOINTSLICE_VERSION", "").lower()
    if api_version not in ("", "v1", "v1beta1"):
        raise section.error("ENDPOINTSLICE_VERSION", f"expected v1 or v1beta1 (or empty: probe), got {api_version!r}")
    settings = KubeSettings(
        section=section.name,
        connection=connection,
        namespace=_name(section, "NAMESPACE", connection.namespace),
        kind=kind,
        workload=workload,
        service=_name(section, "SERVICE", workload),
        port_name=section.text("PORT_NAME", ""),
        token_refresh=section.number("TOKEN_REFRESH", 60.0, 1.0, 3600.0),
        request_timeout=section.number("REQUEST_TIMEOUT", 10.0, 0.1, 300.0),
        watch_timeout=section.number("WATCH_TIMEOUT", 300.0, 1.0, 3600.0),
        max_response=section.integer("MAX_RESPONSE", 8 * 1024 * 1024, 64 * 1024, 1024 * 1024 * 1024),
        backoff_max=section.number("BACKOFF_MAX", 30.0, 1.0, 3600.0),
        api_version=api_version,
    )
    if warnings is not None:
        for key in section.unknown_keys():
            warnings.append(f"{section.path}:{section.line(key)}: [{section.name}] {key}: unknown key; ignored")
    return settings
