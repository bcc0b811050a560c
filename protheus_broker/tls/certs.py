"""Make a small CA and the certificates for the agent channel and SmartClient TLS, with ``cryptography``.

``python -m protheus_broker.tls.certs DIR --broker broker --agent app1=10.0.0.11 --agent app2=app2.lan,10.0.0.12``
writes ``ca.pem``/``ca.key``, ``broker.pem``/``broker.key`` (a client certificate) and one
``agent-<name>.pem``/``agent-<name>.key`` (a server certificate for those host names and IPs) each.
``--server broker-tls=127.0.0.1,localhost --server appserver=127.0.0.1`` adds TLS server
certificates (``<name>.pem``/``<name>.key``, usable as client certificates too) for the broker's
SmartClient port (termination) and for AppServers (upstream TLS).
Keys are ECDSA P-256, written mode 0600.  For tests, demos and small sites; a site with its own
PKI uses its own certificates (server certificates for agents, a client certificate for the broker).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Issued:
    """A key and its certificate, PEM-encoded."""

    key_pem: bytes
    cert_pem: bytes
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "protheus-broker"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issued(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> Issued:
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return Issued(key_pem, cert.public_bytes(serialization.Encoding.PEM), key, cert)


def _validity(days: int, expired: bool = False) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.timezone.utc)
    if expired:  # for tests: valid for *days* until yesterday
        return now - datetime.timedelta(days=days + 1), now - datetime.timedelta(days=1)
    return now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)


def make_ca(common_name: str = "protheus-broker agent CA", days: int = 3650) -> Issued:
    """A self-signed CA that signs the broker's and the agents' certificates."""
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _issued(key, cert)


def make_cert(ca: Issued, common_name: str, hosts: list[str] = [], client: bool = False,
              days: int = 825, both: bool = False, expired: bool = False) -> Issued:
    """A certificate signed by *ca*: a TLS server certificate for *hosts* (DNS names and IP
    addresses, checked by the broker), or with *client* a TLS client certificate (the broker's).
    The extended key usage keeps an agent's certificate from passing as the broker's.  *both*:
    server and client use (SmartClient TLS: the broker and AppServers may present it either way).
    *expired*: already out of date (for tests)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days, expired)
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if both else
              [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH])
    builder = (
        x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca.cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            names.append(x509.DNSName(host))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _issued(key, builder.sign(ca.key, hashes.SHA256()))


def key_pem(issued: Issued, passphrase: bytes | None = None) -> bytes:
    """The private key as PKCS#8 PEM, encrypted with *passphrase* if given."""
    if not passphrase:
        return issued.key_pem
    return issued.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.BestAvailableEncryption(passphrase))


def write_pair(directory: str, stem: str, issued: Issued,
               passphrase: bytes | None = None) -> tuple[str, str]:
    """Write ``<stem>.pem`` and ``<stem>.key`` (0600; encrypted with *passphrase* if given)
    into *directory*; returns both paths."""
    cert_path = os.path.join(directory, f"{stem}.pem")
    key_path = os.path.join(directory, f"{stem}.key")
    with open(cert_path, "wb") as handle:
        handle.write(issued.cert_pem)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_pem(issued, passphrase))
    return cert_path, key_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m protheus_broker.tls.certs",
        description="Make a CA, the broker's client certificate and the agents' server certificates.")
    parser.add_argument("directory", help="where to write the PEM files (created if missing)")
    parser.add_argument("--broker", default="broker", help="the broker certificate's name (file stem)")
    parser.add_argument("--agent", action="append", default=[], metavar="NAME=HOST[,HOST...]",
                        help="an agent certificate for these host names / IP addresses (repeatable)")
    parser.add_argument("--server", action="append", default=[], metavar="NAME=HOST[,HOST...]",
                        help="a SmartClient-TLS certificate NAME.pem/.key for the broker's port or an "
                             "AppServer, for these host names / IP addresses (repeatable)")
    parser.add_argument("--days", type=int, default=825, help="validity of the leaf certificates")
    args = parser.parse_args(argv)
    named: dict[str, list[tuple[str, list[str]]]] = {"agent": [], "server": []}
    for option, specs in (("agent", args.agent), ("server", args.server)):
        for spec in specs:
            name, _, hosts = spec.partition("=")
            if not name or not hosts:
                sys.stderr.write(f"--{option} {spec!r}: expected NAME=HOST[,HOST...]\n")
                return 2
            named[option].append((name, [h for h in hosts.split(",") if h]))
    os.makedirs(args.directory, exist_ok=True)
    ca_cert = os.path.join(args.directory, "ca.pem")
    ca_key = os.path.join(args.directory, "ca.key")
    if os.path.exists(ca_cert) and os.path.exists(ca_key):
        with open(ca_cert, "rb") as cert_file, open(ca_key, "rb") as key_file:
            cert = x509.load_pem_x509_certificate(cert_file.read())
            key = serialization.load_pem_private_key(key_file.read(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            sys.stderr.write(f"{ca_key}: not an EC key made by this tool\n")
            return 1
        ca = _issued(key, cert)
        sys.stdout.write(f"using the existing CA {ca_cert}\n")
    else:
        ca = make_ca()
        write_pair(args.directory, "ca", ca)
        sys.stdout.write(f"wrote {ca_cert} and {ca_key} (keep ca.key offline)\n")
    if args.broker:
        paths = write_pair(args.directory, args.broker, make_cert(ca, args.broker, client=True, days=args.days))
        sys.stdout.write(f"wrote {paths[0]} and {paths[1]} (broker client certificate)\n")
    for name, host_list in named["agent"]:
        paths = write_pair(args.directory, f"agent-{name}",
                           make_cert(ca, name, host_list, client=False, days=args.days))
        sys.stdout.write(f"wrote {paths[0]} and {paths[1]} (agent {name}: {', '.join(host_list)})\n")
    for name, host_list in named["server"]:
        paths = write_pair(args.directory, name, make_cert(ca, name, host_list, both=True, days=args.days))
        sys.stdout.write(f"wrote {paths[0]} and {paths[1]} (TLS server {name}: {', '.join(host_list)})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
