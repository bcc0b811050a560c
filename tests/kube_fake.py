"""A fake Kubernetes API (a twisted.web resource) for the in-memory scaler tests: a workload's
``/scale`` and a Service's EndpointSlices, listed and watched; tests push events and end watches."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request


def endpoint_slice(name: str, endpoints: list[tuple[str, bool, str]], rv: str, port: int = 1234,
                   port_name: str = "tcp", beta: bool = False, ports: Any = None) -> dict[str, Any]:
    """An EndpointSlice of Service ``erp``: *endpoints* are (ip, ready, pod) triples."""
    items = []
    for ip, ready, pod in endpoints:
        item: dict[str, Any] = {"addresses": [ip], "conditions": {"ready": ready},
                                "targetRef": {"kind": "Pod", "name": pod, "namespace": "ns"}}
        if beta:
            item["topology"] = {"kubernetes.io/hostname": "node-1"}
        else:
            item["nodeName"] = "node-1"
        items.append(item)
    return {
        "apiVersion": "discovery.k8s.io/v1beta1" if beta else "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv,
                     "labels": {"kubernetes.io/service-name": "erp"}},
        "addressType": "IPv4", "endpoints": items,
        "ports": ports if ports is not None else [{"name": port_name, "port": port, "protocol": "TCP"}],
    }


def header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode() if isinstance(value, bytes) else value


class FakeApi(Resource):
    """The API paths the scaler uses, in memory."""

    isLeaf = True

    def __init__(self, versions: tuple[str, ...] = ("v1",)) -> None:
        super().__init__()
        self.versions = versions
        self.replicas = 0
        self.slices: dict[str, dict[str, Any]] = {}
        self.rv = 100
        self.requests: list[dict[str, Any]] = []
        self.watchers: list[Request] = []
        self.scripted: list[tuple[int, bytes]] = []  # next answers, whatever the path
        self.gone_below: int | None = None  # a watch from an older resourceVersion gets HTTP 410
        self.silent = False  # accept requests and never answer

    def status(self, request: Request, code: int, reason: str, message: str) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                           "reason": reason, "code": code}).encode()

    def render(self, request: Request) -> Any:
        url = urlsplit(request.uri.decode())
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        body = request.content.read() if request.content is not None else b""
        self.requests.append({"method": request.method.decode(), "path": url.path, "query": query,
                              "authorization": header(request, b"authorization"),
                              "content_type": header(request, b"content-type"), "body": body})
        if self.silent:
            return NOT_DONE_YET
        if self.scripted:
            code, data = self.scripted.pop(0)
            request.setResponseCode(code)
            return data
        parts = url.path.strip("/").split("/")
        if url.path.endswith("/scale"):
            if request.method == b"PATCH":
                if header(request, b"content-type") != "application/merge-patch+json":
                    return self.status(request, 415, "UnsupportedMediaType", "wrong patch type")
                self.replicas = json.loads(body)["spec"]["replicas"]
            return json.dumps({"kind": "Scale", "metadata": {"name": parts[-2]},
                               "spec": {"replicas": self.replicas} if self.replicas else {},
                               "status": {"replicas": self.replicas}}).encode()
        if "endpointslices" in parts:
            version = parts[2]
            if version not in self.versions:
                return self.status(request, 404, "NotFound", "the server could not find the requested resource")
            if query.get("watch") == "1":
                if self.gone_below is not None and int(query["resourceVersion"]) < self.gone_below:
                    return self.status(request, 410, "Expired", "too old resource version")
                request.setHeader(b"content-type", b"application/json")
                request.write(b"")
                self.watchers.append(request)
                request.notifyFinish().addErrback(lambda f: None)
                return NOT_DONE_YET
            return json.dumps({"kind": "EndpointSliceList", "metadata": {"resourceVersion": str(self.rv)},
                               "items": list(self.slices.values())}).encode()
        return self.status(request, 404, "NotFound", "no such path")

    # --- what tests do ------------------------------------------------------------------------

    def put_slice(self, obj: dict[str, Any], kind: str = "MODIFIED") -> None:
        """Store a slice and send the event to every open watch."""
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.slices[obj["metadata"]["name"]] = obj
        self.send({"type": kind, "object": obj})

    def delete_slice(self, name: str) -> None:
        self.rv += 1
        obj = self.slices.pop(name)
        self.send({"type": "DELETED", "object": obj})

    def send(self, event: Any) -> None:
        self.send_raw(json.dumps(event).encode() + b"\n")

    def send_raw(self, data: bytes) -> None:
        for request in self.watchers:
            request.write(data)

    def end_watches(self) -> None:
        watchers, self.watchers = self.watchers, []
        for request in watchers:
            request.finish()

    def break_watches(self) -> None:
        """Cut every open watch's connection mid-stream (no final chunk)."""
        watchers, self.watchers = self.watchers, []
        for request in watchers:
            request.channel.transport.loseConnection()

    def of(self, method: str, fragment: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == method and fragment in r["path"]]
