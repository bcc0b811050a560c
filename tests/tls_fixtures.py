"""Certificates for the TLS tests, made once per process with protheus_broker.tls.certs."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Any

from twisted.internet import ssl

from protheus_broker.tls.certs import Issued, make_ca, make_cert, write_pair

PASSPHRASE = b"correct horse battery"


class Certs:
    """A CA, a second unrelated CA, and leaf certificates in one directory."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="protheus-tls-test-")
        atexit.register(shutil.rmtree, self.dir, True)
        self.ca = make_ca("test CA")
        self.other_ca = make_ca("other CA")
        self.paths: dict[str, tuple[str, str]] = {}
        self.issued: dict[str, Issued] = {}
        write_pair(self.dir, "ca", self.ca)
        write_pair(self.dir, "other-ca", self.other_ca)
        self.add("broker", ["127.0.0.1", "localhost"])
        self.add("broker2", ["127.0.0.1", "localhost"])
        self.add("appserver", ["127.0.0.1"])
        self.add("client", [])
        self.add("wrong-name", ["appserver.example"])
        self.add("expired", ["127.0.0.1"], expired=True)
        self.add("foreign", ["127.0.0.1"], ca=self.other_ca)
        self.add("locked", ["127.0.0.1"], passphrase=PASSPHRASE)

    def add(self, name: str, hosts: list[str], expired: bool = False, ca: Issued | None = None,
            passphrase: bytes | None = None) -> None:
        issued = make_cert(ca or self.ca, name, hosts, both=True, expired=expired)
        self.issued[name] = issued
        self.paths[name] = write_pair(self.dir, name, issued, passphrase)

    def cert(self, name: str) -> str:
        return self.paths[name][0]

    def key(self, name: str) -> str:
        return self.paths[name][1]

    @property
    def ca_path(self) -> str:
        return os.path.join(self.dir, "ca.pem")

    @property
    def other_ca_path(self) -> str:
        return os.path.join(self.dir, "other-ca.pem")

    def private(self, name: str) -> ssl.PrivateCertificate:
        issued = self.issued[name]
        return ssl.PrivateCertificate.loadPEM(issued.cert_pem + b"\n" + issued.key_pem)

    def client_options(self, host: str = "127.0.0.1", ca: str = "", client: str | None = None) -> Any:
        with open(ca or self.ca_path, "rb") as handle:
            trust = ssl.Certificate.loadPEM(handle.read())
        return ssl.optionsForClientTLS(host, trustRoot=trust,
                                       clientCertificate=self.private(client) if client else None)


_certs: Certs | None = None


def certs() -> Certs:
    """The shared test certificates (made on first use)."""
    global _certs
    if _certs is None:
        _certs = Certs()
    return _certs
