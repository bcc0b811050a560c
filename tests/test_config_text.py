"""Config text as it arrives from the field: binary junk, odd line ends, impossible hosts, log files
the broker cannot write.  Each is one line naming the file and the line, never a traceback."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.config import load_config, parse_config

from protheus_broker.ini import ConfigError, decode_text, valid_host

MINIMAL = "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 4000\nREMOTE_SERVER_01 = 10.0.0.1 5000\n"


class BinaryTextTests(SynchronousTestCase):
    def error(self, data: bytes) -> str:
        with self.assertRaises(ConfigError) as caught:
            parse_config(decode_text("app.ini", data), "app.ini")
        return str(caught.exception)

    def test_binary_garbage_without_nul_names_its_line(self) -> None:
        """Binary bytes with no NUL are refused with the line and column of the first control byte."""
        message = self.error(MINIMAL.encode() + b"\xde\xad\x03\xbe\xef\n")
        self.assertEqual(message, "app.ini:4: unreadable text: control character '\\x03' at column 3; "
                                  "this is not an ini text file")

    def test_line_numbers_ignore_form_feeds_and_unicode_breaks(self) -> None:
        """A vertical tab, form feed or U+0085 does not shift the line numbers of later errors."""
        message = self.error(b"; note\x0c\n" + MINIMAL.encode())
        self.assertTrue(message.startswith("app.ini:1: unreadable text"), message)
        message = self.error(MINIMAL.encode() + "x = \u0085\n".encode())
        self.assertTrue(message.startswith("app.ini:4: unreadable text"), message)

    def test_windows_line_ends_and_ctrl_z(self) -> None:
        """CRLF files and a DOS end-of-file Ctrl-Z load as the same config."""
        config = parse_config(decode_text("app.ini", MINIMAL.replace("\n", "\r\n").encode() + b"\x1a"))
        self.assertEqual([s.host for s in config.desktop.servers], ["10.0.0.1"])

    def test_garbage_line_is_shown_with_its_number(self) -> None:
        """A later syntax error still names the line an editor shows."""
        message = self.error(b"\r\n" + MINIMAL.encode() + b"not ini at all\r\n")
        self.assertEqual(message, "app.ini:5: expected 'KEY = value' or '[SECTION]', got 'not ini at all'")

    @given(st.binary(max_size=400))
    def test_any_bytes_load_or_fail_in_one_line(self, data: bytes) -> None:
        """Whatever the bytes, the result is a config or a one-line ConfigError naming the file."""
        try:
            parse_config(decode_text("app.ini", MINIMAL.encode() + data), "app.ini")
        except ConfigError as error:
            text = str(error)
            self.assertNotIn("\n", text)
            self.assertTrue(text.startswith("app.ini"), text)
            self.assertNotIn("got ''", text)


class HostTests(SynchronousTestCase):
    def test_impossible_ip_literals_are_refused(self) -> None:
        """[:::::], 999.1.1.1 and a bracketed IPv4 are not addresses."""
        for host in ("[:::::]", ":::::", "999.1.1.1", "[10.0.0.1]", "1.2.3", "-app", "a..b", "[]"):
            with self.subTest(host=host):
                with self.assertRaises(ConfigError) as caught:
                    parse_config(MINIMAL + f"REMOTE_SERVER_02 = {host} 5000\n", "app.ini")
                self.assertEqual(str(caught.exception),
                                 f"app.ini:4: REMOTE_SERVER_02: {host!r} is not a host name or IP address")

    def test_real_hosts_are_accepted(self) -> None:
        """IPv4, IPv6 (bare or bracketed), and DNS names with hyphens or underscores load."""
        for host, stored in (("10.1.2.3", "10.1.2.3"), ("::1", "::1"), ("[fd00::5]", "fd00::5"),
                             ("app-01.corp.example", "app-01.corp.example"), ("APP_02", "APP_02")):
            with self.subTest(host=host):
                config = parse_config(MINIMAL + f"REMOTE_SERVER_02 = {host} 5000\n")
                self.assertEqual(config.desktop.servers[1].host, stored)

    def test_valid_host(self) -> None:
        """valid_host checks addresses with ipaddress and names label by label."""
        self.assertTrue(valid_host("localhost"))
        self.assertFalse(valid_host("x" * 64 + ".example"))
        self.assertFalse(valid_host("a b"))


class ConsoleFileTests(SynchronousTestCase):
    def general(self, path: str) -> str:
        with self.assertRaises(ConfigError) as caught:
            parse_config(f"[GENERAL]\nConsoleFile = {path}\n" + MINIMAL, "app.ini")
        return str(caught.exception)

    def test_missing_folder(self) -> None:
        """A ConsoleFile in a folder that does not exist is one line at load."""
        path = os.path.abspath(os.path.join(self.mktemp(), "broker.log"))
        self.assertEqual(self.general(path), f"app.ini:2: CONSOLEFILE: cannot write {path!r}: folder "
                                             f"{os.path.dirname(path)!r} does not exist")

    def test_directory(self) -> None:
        """A ConsoleFile that is a directory is refused."""
        folder = self.mktemp()
        os.mkdir(folder)
        self.assertIn("is a directory", self.general(folder))

    def test_unwritable_file_and_folder(self) -> None:
        """A read-only log file or folder is refused (as a non-root user; root may write anyway)."""
        folder = self.mktemp()
        os.mkdir(folder)
        existing = os.path.join(folder, "old.log")
        open(existing, "w").close()
        os.chmod(existing, 0o444)
        os.chmod(folder, 0o555)
        self.addCleanup(os.chmod, folder, 0o755)
        if os.access(existing, os.W_OK):  # root: the kernel lets it write; the check must agree
            parse_config(f"[GENERAL]\nConsoleFile = {existing}\n" + MINIMAL)
            return
        self.assertIn("permission denied", self.general(existing))
        self.assertIn("no permission to create files", self.general(os.path.join(folder, "new.log")))

    def test_writable_file_loads(self) -> None:
        """A ConsoleFile in a writable folder loads."""
        folder = self.mktemp()
        os.mkdir(folder)
        path = os.path.join(folder, "broker.log")
        config = parse_config(f"[GENERAL]\nConsoleFile = {path}\n" + MINIMAL)
        self.assertEqual(config.general.console_file, path)

    def test_load_config_of_a_real_file(self) -> None:
        """The check runs on load_config too (the daemon's path)."""
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write(f"[GENERAL]\nConsoleFile = {os.path.join(path + '.missing', 'x.log')}\n" + MINIMAL)
        with self.assertRaises(ConfigError):
            load_config(path)


class StandbyCapWarningTests(SynchronousTestCase):
    def test_standby_cap_not_below_max_sessions_is_warned(self) -> None:
        """STANDBY_MAX_SESSIONS at or above MAX_SESSIONS loads with a warning naming both."""
        config = parse_config(MINIMAL + "MAX_SESSIONS = 100\nSTANDBY_MAX_SESSIONS = 100\n", "app.ini")
        [warning] = [w for w in config.warnings if "STANDBY_MAX_SESSIONS" in w]
        self.assertEqual(warning, "app.ini:5: STANDBY_MAX_SESSIONS=100 is not below MAX_SESSIONS=100: "
                                  "sessions in standby could take every slot that logins need")
        self.assertFalse([w for w in parse_config(MINIMAL).warnings if "STANDBY" in w])
