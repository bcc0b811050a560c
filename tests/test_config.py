"""Config: the TOTVS appserver.ini as users write it, and one clear line for every error."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.balancing.methods import SortMethod

from protheus_broker.balancing.servers import RemoteServer

from protheus_broker.config import load_config, parse_config

from protheus_broker.ini import ConfigError

from protheus_broker.monitoring.settings import MonitoringType

HERE = os.path.dirname(os.path.abspath(__file__))
ETC = os.path.join(os.path.dirname(HERE), "etc")

MINIMAL = "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 4000\nREMOTE_SERVER_01 = 10.0.0.1 5000\n"


class SeedConfigTests(SynchronousTestCase):
    def test_seed_example_loads_unchanged(self) -> None:
        """The example from the TOTVS documentation loads with its servers in file order."""
        config = load_config(os.path.join(ETC, "seed-example.ini"))
        desktop = config.desktop
        self.assertEqual(desktop.local_port, 4000)
        self.assertEqual(
            desktop.servers,
            (
                RemoteServer("01", "172.16.50.42", 5000),
                RemoteServer("02", "172.16.50.42", 5001),
                RemoteServer("03", "172.16.50.42", 5002),
            ),
        )
        self.assertEqual(desktop.service_name, "XXX_TOTVS_BALANCE_SC_001")
        self.assertEqual(desktop.service_display_name, "BROKER SERVICE")
        self.assertTrue(config.general.console_log)
        self.assertFalse(config.general.console_log_date)

    def test_seed_default_sort_method_falls_back_with_one_warning(self) -> None:
        """SERVER_MEMORY is the default; without active monitoring it balances by CONNECTION."""
        config = load_config(os.path.join(ETC, "seed-example.ini"))
        self.assertEqual(config.desktop.sort_method, SortMethod.SERVER_MEMORY)
        self.assertEqual(config.desktop.effective_sort_method, SortMethod.CONNECTION)
        self.assertEqual(len([w for w in config.warnings if "SORT_METHOD" in w]), 1)

    def test_shipped_package_config_loads_without_remarks(self) -> None:
        """The Debian package's appserver.ini (its commented examples included) is valid as shipped."""
        path = os.path.join(os.path.dirname(ETC), "packaging", "etc", "appserver.ini")  # pybuild.testfiles too
        config = load_config(path)
        self.assertEqual((config.warnings, config.admin, config.desktop.resume.standby_time), ((), None, 180.0))

    def test_demo_config_loads(self) -> None:
        """The demo config is valid and has three local servers."""
        config = load_config(os.path.join(ETC, "demo.ini"))
        self.assertEqual(len(config.desktop.servers), 3)
        self.assertEqual(config.admin and config.admin.endpoint, "tcp:8480:interface=127.0.0.1")
        # The one remark: the demo's broker screen is read-only (no admin token ships).
        self.assertEqual([w.split(": ", 1)[1] for w in config.warnings],
                         ["[BROKER_ADMIN] no TOKEN_HASH: the screen is read-only "
                          "(make one with: protheus-broker-ctl hash-token)"])


class SyntaxTests(SynchronousTestCase):
    def test_comments_case_spaces_and_quotes(self) -> None:
        """; and # comments, any case, spaces around =, quoted values all read as TOTVS means."""
        config = parse_config(
            "; leading comment\n"
            "# hash comment\n"
            "[general]   ; trailing\n"
            "consolelog=0  # off\n"
            "ConsoleLogDate = 1\n"
            "[Balance_Smart_Client_Desktop]\n"
            "  local_server_port   =   4100 ; the port\n"
            'Remote_Server_xy = "myhost 5000"\n'
            "REMOTE_SERVER_0A = 10.0.0.2 5001 # second\n"
            'SERVICE_DISPLAY_NAME = "A; B # C"\n'
            "sort_method = protheus_threads\n"
            "MONITORING_TYPE = smartclient_active\n"
            "AGENT_SECRET = sixteen-chars-or-more\n"
        )
        self.assertFalse(config.general.console_log)
        self.assertTrue(config.general.console_log_date)
        self.assertEqual(config.desktop.local_port, 4100)
        self.assertEqual([s.server_id for s in config.desktop.servers], ["XY", "0A"])
        self.assertEqual(config.desktop.servers[0].host, "myhost")
        self.assertEqual(config.desktop.service_display_name, "A; B # C")
        self.assertEqual(config.desktop.sort_method, SortMethod.SERVER_THREADS)
        self.assertEqual(config.desktop.effective_sort_method, SortMethod.SERVER_THREADS)
        self.assertEqual(config.desktop.monitoring_type, MonitoringType.SMARTCLIENT_ACTIVE)

    def test_every_protheus_alias(self) -> None:
        """PROTHEUS_MEMORY/USERS/THREADS/CPU are the SERVER_* methods."""
        for alias, method in [
            ("PROTHEUS_MEMORY", SortMethod.SERVER_MEMORY), ("PROTHEUS_USERS", SortMethod.SERVER_USERS),
            ("PROTHEUS_THREADS", SortMethod.SERVER_THREADS), ("PROTHEUS_CPU", SortMethod.SERVER_CPU),
        ]:
            self.assertEqual(parse_config(MINIMAL + f"SORT_METHOD={alias}\n").desktop.sort_method, method)

    def test_disable_alias(self) -> None:
        """DISABLE and DISABLED both turn monitoring off."""
        for value in ("DISABLE", "disabled"):
            config = parse_config(MINIMAL + f"MONITORING_TYPE={value}\n")
            self.assertEqual(config.desktop.monitoring_type, MonitoringType.DISABLED)

    def test_ipv6_server(self) -> None:
        """An IPv6 address, bare or in brackets, is a host."""
        config = parse_config(MINIMAL + "REMOTE_SERVER_02 = ::1 5001\nREMOTE_SERVER_03 = [::1] 5002\n")
        self.assertEqual([s.host for s in config.desktop.servers[1:]], ["::1", "::1"])

    def test_unknown_keys_and_sections_warn(self) -> None:
        """Unknown keys and sections are warnings naming them, not failures."""
        config = parse_config(MINIMAL + "FANCY_KEY = 1\n[ENVIRONMENT]\nSourcePath = x\n[BALANCE_FOO]\n")
        text = "\n".join(config.warnings)
        self.assertIn("FANCY_KEY: unknown key", text)
        self.assertIn("unknown section [ENVIRONMENT]", text)
        self.assertIn("[BALANCE_FOO] is not a balance unit this broker knows", text)

    def test_windows_encodings(self) -> None:
        """cp1252 and UTF-16 files (Windows editors) read like UTF-8 ones."""
        text = "; configuração\n" + MINIMAL
        for encoding in ("cp1252", "utf-16", "utf-8-sig"):
            path = self.mktemp()
            with open(path, "wb") as handle:
                handle.write(text.encode(encoding))
            self.assertEqual(load_config(path).desktop.local_port, 4000)

    @given(st.permutations(["01", "0A", "XY", "7", "Z9"]))
    def test_servers_keep_file_order(self, ids: list[str]) -> None:
        """REMOTE_SERVER keys in any order make the server table in file order."""
        lines = "".join(f"REMOTE_SERVER_{i} = h{i} 5000\n" for i in ids)
        config = parse_config("[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT=1\n" + lines)
        self.assertEqual([s.server_id for s in config.desktop.servers], [i.upper() for i in ids])


class ErrorTests(SynchronousTestCase):
    """Each error is one line: file, line, key and what is wrong."""

    def assertConfigError(self, text: str, line: int | None, key: str | None, words: str) -> str:
        with self.assertRaises(ConfigError) as caught:
            parse_config(text, "broker.ini")
        error = caught.exception
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertEqual((error.line, error.key), (line, key), message)
        self.assertIn(words, message)
        prefix = "broker.ini" if line is None else f"broker.ini:{line}:"
        self.assertTrue(message.startswith(prefix), message)
        return message

    def test_missing_file(self) -> None:
        """A missing file names the path."""
        path = os.path.join(self.mktemp(), "nope.ini")
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertEqual(str(caught.exception), f"{path}: file not found")

    def test_unreadable_binary(self) -> None:
        """A binary file is refused, naming the line of the NUL byte."""
        path = self.mktemp()
        with open(path, "wb") as handle:
            handle.write(b"[GENERAL]\nA=1\n\x00\x01\x02")
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertIn(":3: unreadable text", str(caught.exception))

    def test_unknown_sort_method(self) -> None:
        """An unknown SORT_METHOD names the valid ones."""
        message = self.assertConfigError(MINIMAL + "SORT_METHOD = FASTEST\n", 4, "SORT_METHOD", "unknown method 'FASTEST'")
        self.assertIn("ROUND_ROBIN", message)

    def test_unknown_monitoring_type(self) -> None:
        """An unknown MONITORING_TYPE is refused."""
        self.assertConfigError(MINIMAL + "MONITORING_TYPE = PING\n", 4, "MONITORING_TYPE", "unknown type 'PING'")

    def test_bad_port(self) -> None:
        """A port that is not a number, or out of range, is refused."""
        self.assertConfigError("[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = http\n", 2, "LOCAL_SERVER_PORT", "port must be a number")
        self.assertConfigError(MINIMAL.replace("4000", "70000"), 2, "LOCAL_SERVER_PORT", "out of range")
        self.assertConfigError(MINIMAL.replace("5000", "0"), 3, "REMOTE_SERVER_01", "out of range")

    def test_missing_local_port(self) -> None:
        """No LOCAL_SERVER_PORT names the section's line."""
        self.assertConfigError("\n[BALANCE_SMART_CLIENT_DESKTOP]\nREMOTE_SERVER_01 = h 1\n", 2,
                               "[BALANCE_SMART_CLIENT_DESKTOP]", "LOCAL_SERVER_PORT is missing")

    def test_server_without_port(self) -> None:
        """A REMOTE_SERVER with only a host says the port is missing."""
        self.assertConfigError(MINIMAL + "REMOTE_SERVER_02 = 10.0.0.2\n", 4, "REMOTE_SERVER_02", "missing port")

    def test_server_with_bad_host(self) -> None:
        """A host with a comma or other junk is refused."""
        self.assertConfigError(MINIMAL + "REMOTE_SERVER_02 = a,b 5000\n", 4, "REMOTE_SERVER_02", "not a host name")

    def test_server_with_extra_field(self) -> None:
        """Three fields are refused for the desktop broker."""
        self.assertConfigError(MINIMAL + "REMOTE_SERVER_02 = h 5000 9\n", 4, "REMOTE_SERVER_02", "expected 'host port'")

    def test_duplicate_ids(self) -> None:
        """The same server id twice (any case) is refused, naming both lines."""
        message = self.assertConfigError(MINIMAL + "remote_server_01 = h 5001\n", 4, "REMOTE_SERVER_01", "duplicate key")
        self.assertIn("first at line 3", message)

    def test_duplicate_section(self) -> None:
        """The same section twice is refused."""
        self.assertConfigError(MINIMAL + "[balance_smart_client_desktop]\n", 4, "[BALANCE_SMART_CLIENT_DESKTOP]", "duplicate section")

    def test_bad_server_id(self) -> None:
        """A REMOTE_SERVER key without letters/digits after the underscore is refused."""
        self.assertConfigError(MINIMAL + "REMOTE_SERVER_ = h 1\n", 4, "REMOTE_SERVER_", "letters and digits")

    def test_no_servers(self) -> None:
        """A desktop section without servers is refused."""
        self.assertConfigError("[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT=1\n", 1,
                               "[BALANCE_SMART_CLIENT_DESKTOP]", "no REMOTE_SERVER")

    def test_no_desktop_section(self) -> None:
        """A file without the desktop section is refused."""
        self.assertConfigError("[GENERAL]\nConsoleLog=1\n", None, None, "no [BALANCE_SMART_CLIENT_DESKTOP]")

    def test_garbage_line(self) -> None:
        """A line that is neither key = value nor [section] is shown."""
        self.assertConfigError(MINIMAL + "this is not ini\n", 4, None, "got 'this is not ini'")

    def test_bad_boolean_and_numbers(self) -> None:
        """ConsoleLog must be 0/1; CONNECT_TIMEOUT and MAX_SESSIONS must be in range."""
        self.assertConfigError("[GENERAL]\nConsoleLog = maybe\n" + MINIMAL, 2, "CONSOLELOG", "expected 1 or 0")
        self.assertConfigError(MINIMAL + "CONNECT_TIMEOUT = soon\n", 4, "CONNECT_TIMEOUT", "expected a number")
        self.assertConfigError(MINIMAL + "MAX_SESSIONS = -1\n", 4, "MAX_SESSIONS", "out of range")
        self.assertConfigError(MINIMAL + "FIRST_BYTES_WAIT = 60\n", 4, "FIRST_BYTES_WAIT", "out of range")

    def test_first_bytes_wait(self) -> None:
        """FIRST_BYTES_WAIT sets how long a silent client may wait before it is a plain session."""
        self.assertEqual(parse_config(MINIMAL).desktop.first_bytes_wait, 0.5)
        self.assertEqual(parse_config(MINIMAL + "FIRST_BYTES_WAIT = 0.2\n").desktop.first_bytes_wait, 0.2)

    @given(st.text(max_size=200))
    def test_any_text_parses_or_fails_cleanly(self, text: str) -> None:
        """Whatever the text, the parser returns a config or raises ConfigError, never crashes."""
        try:
            parse_config(MINIMAL + text)
        except ConfigError as error:
            self.assertNotIn("\n", str(error))


class HardeningKeyTests(SynchronousTestCase):
    """FIRST_RESPONSE_TIMEOUT, MAX_PENDING_PER_ADDRESS and MAX_PENDING."""

    def test_defaults(self) -> None:
        """Replay after 5 s of silence; 128 unestablished connections per address, 1024 in all."""
        desktop = parse_config(MINIMAL).desktop
        self.assertEqual((desktop.first_response_timeout, desktop.max_pending_per_address,
                          desktop.max_pending), (5.0, 128, 1024))

    def test_set_and_zero_disables(self) -> None:
        """Each key is read; 0 turns the replay or the cap off."""
        desktop = parse_config(MINIMAL + "FIRST_RESPONSE_TIMEOUT = 0\nMAX_PENDING_PER_ADDRESS = 0\n"
                               "MAX_PENDING = 50\n").desktop
        self.assertEqual((desktop.first_response_timeout, desktop.max_pending_per_address,
                          desktop.max_pending), (0.0, 0, 50))

    def test_bad_values_name_line_and_key(self) -> None:
        """Out of range or not a number: one line naming file, line and key."""
        errors = ErrorTests("assertConfigError")
        errors.assertConfigError(MINIMAL + "FIRST_RESPONSE_TIMEOUT = -1\n", 4, "FIRST_RESPONSE_TIMEOUT",
                                 "out of range")
        errors.assertConfigError(MINIMAL + "FIRST_RESPONSE_TIMEOUT = nan\n", 4, "FIRST_RESPONSE_TIMEOUT",
                                 "out of range")
        errors.assertConfigError(MINIMAL + "MAX_PENDING_PER_ADDRESS = many\n", 4,
                                 "MAX_PENDING_PER_ADDRESS", "expected a whole number")
        errors.assertConfigError(MINIMAL + "MAX_PENDING = -5\n", 4, "MAX_PENDING", "out of range")


class UnitConfigTests(SynchronousTestCase):
    def test_units_in_file_order_and_desktop_property(self) -> None:
        """One unit config per [BALANCE_*] section the broker serves; config.desktop is the
        desktop one; an unknown [BALANCE_*] section is a warning, not a unit."""
        config = parse_config("[BALANCE_SOMETHING]\nX=1\n" + MINIMAL)
        self.assertEqual([name for name, _ in config.units], ["BALANCE_SMART_CLIENT_DESKTOP"])
        self.assertIs(config.desktop, config.units[0][1])
        self.assertIs(config.unit("BALANCE_SMART_CLIENT_DESKTOP"), config.desktop)
        self.assertIsNone(config.unit("BALANCE_SOMETHING"))
        self.assertTrue([w for w in config.warnings if "[BALANCE_SOMETHING] is not a balance unit" in w])
