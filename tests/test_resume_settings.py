"""The connector's settings, read from a smartclient.ini as users already have it."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.ini import ConfigError
from protheus_broker.resume.settings import parse_smartclient_ini

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


class BrokerWiringTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write(text)
        return path

    def test_resumable_sessions_wired_and_reloaded(self) -> None:
        """The broker port takes connector links unless RESUME_ENABLE=0; a SIGHUP reload applies a
        new STANDBY_TIME to later drops."""
        from twisted.internet.testing import MemoryReactorClock

        from protheus_broker.config import load_config
        from protheus_broker.tap import BrokerService

        base = ("[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT=0\nREMOTE_SERVER_A=127.0.0.1 2\n"
                "SORT_METHOD=CONNECTION\nMONITORING_TYPE=DISABLED\n")
        path = self.write(base + "STANDBY_TIME=60\n")
        service = BrokerService(MemoryReactorClock(), load_config(path))
        standby = service.factory.standby
        self.assertEqual(service.factory.recognisers, [standby.recogniser])
        self.assertEqual((standby.count, standby.snapshot(), standby.config.standby_time), (0, [], 60.0))
        with open(path, "w") as handle:
            handle.write(base + "STANDBY_TIME=90\n")
        self.assertTrue(service.reload())
        self.assertEqual(standby.config.standby_time, 90.0)
        off = BrokerService(MemoryReactorClock(), load_config(self.write(base + "RESUME_ENABLE=0\n")))
        self.assertEqual((off.factory.standby, off.factory.recognisers), (None, []))
