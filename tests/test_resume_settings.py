"""The connector's settings, read from a smartclient.ini as users already have it."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.config import ConfigError
from protheus_broker.resume_settings import parse_smartclient_ini

INI = """[config]
lastmainprog=SIGAMDI
[drivers]
active=TCP
[TCP]
server = broker.example.com
port = 1234
BrokerProxy = 1
[LOCAL]
server=127.0.0.1
port=1234
"""


class SmartClientIniTests(SynchronousTestCase):
    def test_active_section_names_the_broker(self) -> None:
        """[drivers] active= picks the section; the connector listens on the same port locally."""
        config = parse_smartclient_ini(INI, "smartclient.ini")
        self.assertEqual((config.section, config.broker_host, config.broker_port), ("TCP", "broker.example.com", 1234))
        self.assertEqual((config.listen_interface, config.listen_port), ("127.0.0.1", 1234))

    def test_section_and_port_overrides(self) -> None:
        """--section and --listen-port choose another section and port (keys any case)."""
        text = INI.replace("[TCP]", "[Broker]").replace("active=TCP", "active=LOCAL")
        config = parse_smartclient_ini(text, "s.ini", "broker", listen_port=0)
        self.assertEqual((config.broker_host, config.listen_port), ("broker.example.com", 0))

    def test_errors_name_file_line_and_key(self) -> None:
        """Missing BrokerProxy, a section pointing at the workstation, a missing section: each a
        one-line error naming what is wrong."""
        with self.assertRaisesRegex(ConfigError, r"s.ini:8: BrokerProxy: must be 1"):
            parse_smartclient_ini(INI.replace("BrokerProxy = 1", "BrokerProxy = 0"), "s.ini")
        with self.assertRaisesRegex(ConfigError, r"s.ini:10: server: .*connect to itself"):
            parse_smartclient_ini(INI.replace("active=TCP", "active=LOCAL").replace("port=1234\n", "port=1234\nBrokerProxy=1\n"), "s.ini")
        with self.assertRaisesRegex(ConfigError, r"no \[NOPE\] section \(sections: \[CONFIG\], \[DRIVERS\], \[TCP\], \[LOCAL\]\)"):
            parse_smartclient_ini(INI, "s.ini", "NOPE")
        with self.assertRaisesRegex(ConfigError, "port must be a number"):
            parse_smartclient_ini(INI.replace("port = 1234", "port = twelve"), "s.ini")
