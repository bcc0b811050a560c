"""A Service's ready endpoints, from its EndpointSlices (``discovery.k8s.io`` v1 or v1beta1): pure
state, no I/O.  The scaler feeds it the list and the watch events; it answers which AppServers
(address and port) are ready now.

The two API versions agree on what we read (``endpoints[].addresses``, ``conditions.ready``,
``targetRef``, the slice's ``ports``); v1beta1 has ``topology`` where v1 has ``nodeName``/``zone``,
which the broker does not use.  A ``ready`` condition that is absent means "unknown", which the API
documents as "interpret as ready".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from twisted.logger import Logger

log = Logger()


@dataclass(frozen=True, order=True)
class Endpoint:
    """One ready AppServer: where to connect, and its pod (for the server id)."""

    host: str
    port: int
    pod: str = ""

    @property
    def server_id(self) -> str:
        """The pool id: the pod's name, else its address."""
        return self.pod or f"{self.host}:{self.port}"


class BadObject(ValueError):
    """An object that is not the EndpointSlice (or list, or event) it should be."""


def slice_port(obj: dict[str, Any], port_name: str) -> int | None:
    """The port of the slice named *port_name*, or with no name given, its only port; None if
    the slice has no such port."""
    ports = obj.get("ports")
    if not isinstance(ports, list):
        return None
    candidates = [p for p in ports if isinstance(p, dict) and isinstance(p.get("port"), int)
                  and (p.get("protocol") in (None, "TCP"))]
    if port_name:
        candidates = [p for p in candidates if p.get("name") == port_name]
    elif len(candidates) > 1:
        unnamed = [p for p in candidates if not p.get("name")]
        candidates = unnamed if len(unnamed) == 1 else []
    if len(candidates) != 1:
        return None
    port: int = candidates[0]["port"]
    return port if 0 < port < 65536 else None


def slice_endpoints(obj: dict[str, Any], port_name: str) -> tuple[set[Endpoint], str | None]:
    """The ready endpoints of one EndpointSlice object, and a problem to log (None if none)."""
    if obj.get("addressType") not in ("IPv4", "IPv6"):
        return set(), None  # FQDN slices: not ours to connect to
    port = slice_port(obj, port_name)
    endpoints = obj.get("endpoints") or []
    if not isinstance(endpoints, list):
        raise BadObject("endpoints is not a list")
    if port is None:
        if not endpoints:
            return set(), None
        wanted = f"a port named {port_name!r}" if port_name else "exactly one TCP port (set PORT_NAME)"
        return set(), f"has no {wanted}"
    ready: set[Endpoint] = set()
    for endpoint in endpoints:
        if not isinstance(endpoint, dict):
            raise BadObject("an endpoint is not an object")
        conditions = endpoint.get("conditions") or {}
        if not isinstance(conditions, dict) or conditions.get("ready") is False:
            continue
        if conditions.get("terminating") is True and conditions.get("ready") is not True:
            continue
        ref = endpoint.get("targetRef") or {}
        pod = str(ref.get("name", "")) if isinstance(ref, dict) and ref.get("kind", "Pod") == "Pod" else ""
        addresses = endpoint.get("addresses") or []
        if not isinstance(addresses, list):
            raise BadObject("addresses is not a list")
        if addresses and isinstance(addresses[0], str):  # all addresses are one pod: use the first
            ready.add(Endpoint(addresses[0], port, pod))
    return ready, None


def object_name(obj: Any) -> str:
    """metadata.name of an object, or :class:`BadObject`."""
    if not isinstance(obj, dict):
        raise BadObject("not an object")
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        raise BadObject("no metadata.name")
    return meta["name"]


def resource_version(obj: Any) -> str | None:
    """metadata.resourceVersion of an object or list, if any."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    value = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return value if isinstance(value, str) and value else None


class EndpointTable:
    """The ready endpoints of one Service, slice by slice."""

    def __init__(self, service: str, port_name: str = "") -> None:
        self.service = service
        self.port_name = port_name
        self.slices: dict[str, set[Endpoint]] = {}
        self._problems: dict[str, str] = {}  # slice -> the problem last logged for it

    def ready(self) -> list[Endpoint]:
        """Every ready endpoint, each once, sorted."""
        result: set[Endpoint] = set()
        for endpoints in self.slices.values():
            result |= endpoints
        return sorted(result)

    def _update(self, name: str, obj: dict[str, Any]) -> None:
        endpoints, problem = slice_endpoints(obj, self.port_name)
        if problem != self._problems.get(name):
            if problem is not None:
                log.warn("Service {service}: EndpointSlice {slice} {problem}; its endpoints are not used",
                         service=self.service, slice=name, problem=problem)
                self._problems[name] = problem
            else:
                self._problems.pop(name, None)
        self.slices[name] = endpoints

    def replace(self, items: Iterable[Any]) -> None:
        """A fresh list: forget every slice not in it."""
        self.slices = {}
        for obj in items:
            self._update(object_name(obj), obj)

    def event(self, kind: str, obj: Any) -> None:
        """One watch event (ADDED, MODIFIED, DELETED) on a slice."""
        name = object_name(obj)
        if kind == "DELETED":
            self.slices.pop(name, None)
            self._problems.pop(name, None)
        elif kind in ("ADDED", "MODIFIED"):
            self._update(name, obj)
        else:
            raise BadObject(f"unknown event type {kind!r}")
