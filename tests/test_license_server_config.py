"""protheus-license's ini ([LICENSESERVER], [LICENSES]) and its service wiring in memory
(journal replay at start, SIGHUP reload)."""

from __future__ import annotations

import os

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.ini import ConfigError
from protheus_broker.license.journal import DEFAULT_JOURNAL_PATH
from protheus_broker.license.settings import load_license_config, parse_license_config
from protheus_broker.license.tap import LicenseService

from tests.helpers import LogCatcher

MINIMAL = """\
[LicenseServer]
SECRET = 0123456789abcdef0123
[Licenses]
TOTVS_I = 50
APP_MINGLE = 5
"""


class LicenseConfigTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """The defaults: port 5555, status on 127.0.0.1:5556, TTL 30 s, grace 10 s, the journal
        under /var/lib/protheus-broker."""
        config = parse_license_config(MINIMAL, "license.ini")
        self.assertEqual((config.port, config.status_interface, config.status_port), (5555, "127.0.0.1", 5556))
        self.assertEqual((config.limits.ttl, config.limits.grace, config.journal),
                         (30.0, 10.0, DEFAULT_JOURNAL_PATH))
        self.assertEqual(config.counts, {"TOTVS_I": 50, "APP_MINGLE": 5})
        self.assertEqual((config.max_pending, config.max_pending_per_address, config.max_clients), (64, 8, 256))
        self.assertEqual(config.warnings, ())

    def test_bad_value_names_file_line_and_key(self) -> None:
        """A bad value is one line naming the file, the line and the key."""
        text = MINIMAL.replace("[Licenses]", "LEASE_TTL = 0.5\n[Licenses]")
        error = self.assertRaises(ConfigError, parse_license_config, text, "license.ini")
        self.assertEqual(str(error), "license.ini:3: LEASE_TTL: 0.5 is out of range (1 to 86400)")

    def test_bad_seat_count(self) -> None:
        """A seat count that is not a whole number names its class and line."""
        error = self.assertRaises(ConfigError, parse_license_config,
                                  MINIMAL.replace("= 5\n", "= five\n"), "license.ini")
        self.assertEqual(str(error), "license.ini:5: APP_MINGLE: expected a whole number, got 'five'")

    def test_bad_class_name(self) -> None:
        """A class name with a space is refused."""
        error = self.assertRaises(ConfigError, parse_license_config, MINIMAL + "APP X = 1\n", "license.ini")
        self.assertIn("license.ini:6: APP X: a license class", str(error))

    def test_a_secret_or_tls_is_required(self) -> None:
        """Without SECRET, SECRET_FILE or mutual TLS the server does not start."""
        error = self.assertRaises(ConfigError, parse_license_config,
                                  MINIMAL.replace("SECRET = 0123456789abcdef0123\n", ""), "license.ini")
        self.assertIn("SECRET or SECRET_FILE is required", str(error))

    def test_sections_are_required(self) -> None:
        """Both sections must be there."""
        self.assertRaises(ConfigError, parse_license_config, "[LicenseServer]\nSECRET=0123456789abcdef\n")
        self.assertRaises(ConfigError, parse_license_config, "[Licenses]\nTOTVS_I=1\n")

    def test_bad_token_hash(self) -> None:
        """An ADMIN_TOKEN_HASH that is not a protheus-broker-ctl hash is refused."""
        text = MINIMAL.replace("[Licenses]", "ADMIN_TOKEN_HASH = abc\n[Licenses]")
        error = self.assertRaises(ConfigError, parse_license_config, text, "license.ini")
        self.assertIn("license.ini:3: ADMIN_TOKEN_HASH:", str(error))

    def test_unknown_keys_and_no_totvs_i_warn(self) -> None:
        """Unknown keys and a missing TOTVS_I are warnings, not errors."""
        text = MINIMAL.replace("TOTVS_I = 50\n", "").replace("[Licenses]", "COLOUR = red\n[Licenses]")
        warnings = parse_license_config(text, "license.ini").warnings
        self.assertEqual(len(warnings), 2)
        self.assertIn("has no TOTVS_I", warnings[0])
        self.assertIn("COLOUR: unknown key", warnings[1])

    def test_journal_folder_must_exist(self) -> None:
        """A JOURNAL in a folder that does not exist is refused at load."""
        text = MINIMAL.replace("[Licenses]", "JOURNAL = /nonexistent/folder/license.journal\n[Licenses]")
        self.assertIn("JOURNAL: cannot write", str(self.assertRaises(ConfigError, parse_license_config, text)))


class LicenseServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.log = LogCatcher(self)
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        self.path = os.path.join(folder, "license.ini")
        self.journal = os.path.join(folder, "license.journal")
        self.write(MINIMAL)

    def write(self, text: str) -> None:
        with open(self.path, "w") as handle:
            handle.write(text.replace("[Licenses]", f"JOURNAL = {self.journal}\nSTATUS_PORT = 0\nPORT = 0\n"
                                                    "[Licenses]"))

    def service(self) -> LicenseService:
        reactor = MemoryReactorClock()
        reactor.advance(1_700_000_000)
        service = LicenseService(reactor, load_license_config(self.path))
        service.privilegedStartService()
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    def test_leases_survive_a_restart(self) -> None:
        """A service stopped and started again finds its leases in the journal."""
        first = self.service()
        lease = first.table.grant("b1", "TOTVS_I", 7)
        first.stopService()
        second = self.service()
        self.assertEqual(list(second.table.leases.values()), [lease])

    def test_sighup_reload_applies_seat_counts(self) -> None:
        """A reload applies new seat counts without taking leased seats back."""
        service = self.service()
        service.table.grant("b1", "TOTVS_I", 40)
        self.write(MINIMAL.replace("TOTVS_I = 50", "TOTVS_I = 20"))
        self.assertTrue(service.reload())
        self.assertEqual((service.table.counts["TOTVS_I"], service.table.in_use("TOTVS_I")), (20, 40))

    def test_bad_reload_keeps_the_running_config(self) -> None:
        """A reload of a broken file is one error line; the running config stays."""
        service = self.service()
        self.write(MINIMAL.replace("TOTVS_I = 50", "TOTVS_I = lots"))
        self.assertFalse(service.reload())
        self.assertEqual(service.table.counts["TOTVS_I"], 50)
        self.assertEqual(len([t for t in self.log.texts() if "reload refused" in t and "TOTVS_I" in t]), 1)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ShippedFilesTests(SynchronousTestCase):
    def test_shipped_license_ini_needs_a_secret_then_loads(self) -> None:
        """The shipped license.ini is a placeholder that does not start (no secret); with one it loads."""
        path = os.path.join(ROOT, "packaging", "etc", "license.ini")
        with open(path) as handle:
            text = handle.read()
        self.assertRaises(ConfigError, parse_license_config, text, path)
        config = parse_license_config(text.replace(";SECRET_FILE = /etc/protheus-broker/license.secret",
                                                   "SECRET = 0123456789abcdef0123"), path)
        self.assertEqual((config.port, config.counts, config.warnings), (5555, {"TOTVS_I": 10}, ()))

    def test_unit_has_the_brokers_hardening(self) -> None:
        """protheus-license.service carries every hardening line of protheus-broker.service."""
        def hardening(name: str) -> list[str]:
            with open(os.path.join(ROOT, "packaging", "systemd", name)) as handle:
                text = handle.read()
            block = text[text.index("# Hardening"):text.index("[Install]")]
            return [line for line in block.splitlines() if line and not line.startswith("#")]

        self.assertEqual(hardening("protheus-license.service"), hardening("protheus-broker.service"))
