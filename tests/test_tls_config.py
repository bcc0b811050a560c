"""SmartClient TLS config: the TOTVS key names, defaults, and one clear line for every bad file."""

from __future__ import annotations

import os
import shutil

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.balancing.methods import ConnectionBalancer
from protheus_broker.config import parse_config
from protheus_broker.ini import ConfigError
from protheus_broker.balancing.pool import ServerPool
from protheus_broker.desktop.proxy import BrokerFactory
from protheus_broker.desktop.tls import SessionTLS
from protheus_broker.tap import Options, makeService
from protheus_broker.tls.settings import SessionTLSConfig, TLSIdentity

from .helpers import servers
from .tls_fixtures import PASSPHRASE, certs

DESKTOP = ("[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 4000\nSORT_METHOD = CONNECTION\n"
           "REMOTE_SERVER_01 = 10.0.0.1 5000\n")


def tls_of(extra: str, sections: str = "") -> SessionTLSConfig:
    return parse_config(DESKTOP + extra + sections, "/etc/b.ini").desktop.tls


class TLSKeyTests(SynchronousTestCase):
    """Which ini keys make which shape."""

    def test_no_keys_is_passthrough(self) -> None:
        """Without TLS keys the broker neither terminates nor encrypts upstream; verification
        would be on and TLS 1.2 the minimum."""
        tls = tls_of("")
        self.assertFalse(tls.terminate)
        self.assertFalse(tls.upstream)
        self.assertTrue(tls.upstream_verify)
        self.assertEqual(tls.min_version, "1.2")

    def test_broker_keys_terminate(self) -> None:
        """SSL_CERTIFICATE / SSL_KEY / SSL_PASSPHRASE in the broker section: termination."""
        c = certs()
        tls = tls_of(f"SSL_CERTIFICATE = {c.cert('locked')}\nSSL_KEY = {c.key('locked')}\n"
                     f"SSL_PASSPHRASE = {PASSPHRASE.decode()}\nSSL_MIN_VERSION = TLSv1.3\n")
        self.assertEqual(tls.server, TLSIdentity(c.cert("locked"), c.key("locked"), PASSPHRASE))
        self.assertEqual(tls.min_version, "1.3")

    def test_sslconfigure_keys_map_to_broker_keys(self) -> None:
        """[SSLConfigure] CertificateServer / KeyServer / PassPhrase stand for SSL_CERTIFICATE /
        SSL_KEY / SSL_PASSPHRASE, and errors name them as the user wrote them."""
        c = certs()
        config = parse_config(DESKTOP + f"[SSLConfigure]\nCertificateServer = {c.cert('broker')}\n"
                              f"KeyServer = {c.key('broker')}\nPassPhrase =\n", "/etc/b.ini")
        server = config.desktop.tls.server
        assert server is not None
        self.assertEqual((server.certificate, server.key), (c.cert("broker"), c.key("broker")))
        self.assertEqual(server.certificate_key, "[SSLConfigure] CertificateServer")
        self.assertEqual(list(config.warnings), [])

    def test_broker_keys_win_over_sslconfigure(self) -> None:
        """Both given: the broker section's pair is used and a warning says the other is ignored."""
        c = certs()
        config = parse_config(
            DESKTOP + f"SSL_CERTIFICATE = {c.cert('broker')}\nSSL_KEY = {c.key('broker')}\n"
            f"[SSLConfigure]\nCertificateServer = {c.cert('broker2')}\nKeyServer = {c.key('broker2')}\n",
            "/etc/b.ini")
        self.assertEqual(config.desktop.tls.server.certificate, c.cert("broker"))  # type: ignore[union-attr]
        self.assertIn("[SSLConfigure] CertificateServer/KeyServer/PassPhrase are ignored",
                      " ".join(config.warnings))

    def test_upstream_keys(self) -> None:
        """SSL_ENCRYPT_UPSTREAM=1 with a CA and a client certificate; SSL_UPSTREAM_VERIFY=0 is
        the explicit way to turn verification off."""
        c = certs()
        tls = tls_of(f"SSL_ENCRYPT_UPSTREAM = 1\nSSL_UPSTREAM_CA = {c.ca_path}\n"
                     f"SSL_UPSTREAM_CERTIFICATE = {c.cert('client')}\nSSL_UPSTREAM_KEY = {c.key('client')}\n")
        self.assertTrue(tls.upstream and tls.upstream_verify)
        self.assertEqual(tls.upstream_ca, c.ca_path)
        self.assertEqual(tls.upstream_identity.certificate, c.cert("client"))  # type: ignore[union-attr]
        self.assertFalse(tls_of("SSL_ENCRYPT_UPSTREAM = 1\nSSL_UPSTREAM_VERIFY = 0\n").upstream_verify)

    def test_bad_keys_are_one_line_errors(self) -> None:
        """Each bad TLS key stops parsing with file:line: KEY: what is wrong."""
        c = certs()
        cases = {
            "SSL_MIN_VERSION = SSLv3\n": "SSL_MIN_VERSION: expected TLS1.2 or TLS1.3, got 'SSLv3'",
            f"SSL_CERTIFICATE = {c.cert('broker')}\n": "SSL_KEY: is required with SSL_CERTIFICATE",
            "SSL_CERTIFICATE = /nonexistent/b.pem\nSSL_KEY = /nonexistent/b.key\n":
                "SSL_CERTIFICATE: cannot read '/nonexistent/b.pem': No such file or directory",
            f"SSL_CERTIFICATE = {c.cert('broker')}\nSSL_KEY = {c.key('broker')}\n"
            "SSL_REQUIRE_CLIENT_CERT = 1\n": "SSL_REQUIRE_CLIENT_CERT: needs SSL_CLIENT_CA",
            f"SSL_CLIENT_CA = {c.ca_path}\n": "SSL_CLIENT_CA: client certificates need TLS termination",
            "SSL_HANDSHAKE_TIMEOUT = 0\n": "SSL_HANDSHAKE_TIMEOUT",
        }
        for extra, expected in cases.items():
            with self.assertRaises(ConfigError, msg=extra) as caught:
                tls_of(extra)
            self.assertIn(expected, str(caught.exception))
            self.assertTrue(str(caught.exception).startswith("/etc/b.ini"), str(caught.exception))


class StartupFileTests(SynchronousTestCase):
    """Every problem with a certificate, key or CA file stops startup naming the file."""

    def check(self, config: SessionTLSConfig, path: str, problem: str) -> None:
        factory = BrokerFactory(MemoryReactorClock(), ServerPool(servers(1), ConnectionBalancer()))
        with self.assertRaises(ConfigError) as caught:
            SessionTLS(MemoryReactorClock(), config, factory)
        text = str(caught.exception)
        self.assertTrue(text.startswith(f"{path}: "), text)
        self.assertIn(problem, text)

    def serve(self, cert: str, key: str, passphrase: bytes | None = None) -> SessionTLSConfig:
        return SessionTLSConfig(server=TLSIdentity(cert, key, passphrase))

    def test_expired_certificate(self) -> None:
        """An expired server certificate: the file, the subject and the date."""
        c = certs()
        self.check(self.serve(c.cert("expired"), c.key("expired")), c.cert("expired"),
                   "SSL_CERTIFICATE: certificate 'CN=expired,O=protheus-broker' expired on ")

    def test_key_of_another_certificate(self) -> None:
        """A key that does not belong to the certificate."""
        c = certs()
        self.check(self.serve(c.cert("broker"), c.key("broker2")), c.key("broker2"),
                   f"SSL_KEY: this key does not belong to the certificate in {c.cert('broker')}")

    def test_wrong_passphrase(self) -> None:
        """An encrypted key with the wrong passphrase, or none."""
        c = certs()
        self.check(self.serve(c.cert("locked"), c.key("locked"), b"wrong"), c.key("locked"),
                   "SSL_KEY: wrong passphrase")
        self.check(self.serve(c.cert("locked"), c.key("locked")), c.key("locked"),
                   "SSL_KEY: the key is encrypted: a passphrase is needed")

    def test_passphrase_opens_encrypted_key(self) -> None:
        """The right passphrase loads the encrypted key."""
        c = certs()
        factory = BrokerFactory(MemoryReactorClock(), ServerPool(servers(1), ConnectionBalancer()))
        tls = SessionTLS(MemoryReactorClock(), self.serve(c.cert("locked"), c.key("locked"), PASSPHRASE),
                         factory)
        self.assertIsNotNone(tls.context)

    def test_unreadable_and_garbage_files(self) -> None:
        """A file that cannot be read, one that is not PEM, a missing CA."""
        c = certs()
        directory = self.mktemp()
        os.makedirs(directory)
        self.check(self.serve(directory, c.key("broker")), directory, "SSL_CERTIFICATE: cannot read: ")
        garbage = os.path.join(directory, "garbage.pem")
        with open(garbage, "w") as handle:
            handle.write("not a certificate\n")
        self.check(self.serve(garbage, c.key("broker")), garbage,
                   "SSL_CERTIFICATE: no PEM certificate in it")
        self.check(self.serve(c.cert("broker"), garbage), garbage, "SSL_KEY: not a PEM private key")
        self.check(SessionTLSConfig(upstream=True, upstream_ca=garbage), garbage,
                   "SSL_UPSTREAM_CA: no PEM certificate in it")

    def test_make_service_exits_with_the_line(self) -> None:
        """twistd protheus-broker with an expired certificate exits with one line naming it."""
        c = certs()
        directory = self.mktemp()
        os.makedirs(directory)
        cert = shutil.copy(c.cert("expired"), os.path.join(directory, "b.pem"))
        ini = os.path.join(directory, "appserver.ini")
        with open(ini, "w") as handle:
            handle.write(DESKTOP + f"SSL_CERTIFICATE = {cert}\nSSL_KEY = {c.key('expired')}\n")
        options = Options()
        options.parseOptions(["--config", ini])
        with self.assertRaises(SystemExit) as caught:
            makeService(options)
        message = str(caught.exception.code)
        self.assertTrue(message.startswith(f"protheus-broker: {cert}: SSL_CERTIFICATE: certificate "), message)
        self.assertIn("expired on", message)


class CertsCommandTests(SynchronousTestCase):
    """``python -m protheus_broker.tls.certs DIR --server NAME=HOSTS`` (what ``make certs`` runs)."""

    def test_server_certificates_for_broker_and_appserver(self) -> None:
        """The command writes a CA and server certificates valid for the given IPs and names,
        signed by that CA, with 0600 keys that load as a TLS identity."""
        from cryptography.hazmat.primitives.asymmetric import ec

        from protheus_broker.tls.certs import main
        from protheus_broker.desktop.tls import identity_error, load_certificates, load_identity

        directory = self.mktemp()
        self.assertEqual(main([directory, "--server", "broker-tls=127.0.0.1,localhost",
                               "--server", "appserver=10.0.0.5"]), 0)
        [ca] = load_certificates(os.path.join(directory, "ca.pem"), "ca")
        for name, hosts, other in (("broker-tls", ["127.0.0.1", "localhost"], "10.0.0.5"),
                                   ("appserver", ["10.0.0.5"], "127.0.0.1")):
            cert_path, key_path = (os.path.join(directory, f"{name}.{ext}") for ext in ("pem", "key"))
            [cert] = load_certificates(cert_path, "SSL_CERTIFICATE")
            for host in hosts:
                self.assertIsNone(identity_error(cert, host))
            self.assertIsNotNone(identity_error(cert, other))
            public = ca.public_key()
            assert isinstance(public, ec.EllipticCurvePublicKey)
            public.verify(cert.signature, cert.tbs_certificate_bytes,
                          ec.ECDSA(cert.signature_hash_algorithm))  # raises if not signed by the CA
            self.assertEqual(os.stat(key_path).st_mode & 0o777, 0o600)
            load_identity(TLSIdentity(cert_path, key_path))
