"""Mutual-TLS options for the agent channel, from the PEM files named in the configs.

The broker is the TLS client: it presents its certificate and checks the agent's against the CA
and against the agent's address (host name or IP, with service-identity).  The agent is the TLS
server: it requires a client certificate signed by the same CA.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import ssl

from protheus_broker.tls.settings import TLSFiles


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def client_options(files: TLSFiles, hostname: str) -> Any:
    """Options for connecting to the agent at *hostname* (a DNS name or an IP address)."""
    authority = ssl.Certificate.loadPEM(_read(files.ca))
    mine = ssl.PrivateCertificate.loadPEM(_read(files.certificate) + b"\n" + _read(files.key))
    return ssl.optionsForClientTLS(hostname, trustRoot=authority, clientCertificate=mine)


def server_options(files: TLSFiles) -> ssl.CertificateOptions:
    """Options for the agent's listener: our certificate; a CA-signed client certificate required."""
    authority = ssl.Certificate.loadPEM(_read(files.ca))
    mine = ssl.PrivateCertificate.loadPEM(_read(files.certificate) + b"\n" + _read(files.key))
    return mine.options(authority)
