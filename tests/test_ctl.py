"""protheus-broker-ctl: every failure is one line on stderr and exit status 2 (command line) or 1
(the broker), never a traceback: in-process here; against small servers on 127.0.0.1 in test_ctl_sockets, as a process in
test_ctl_e2e."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.web import ctl


def run_main(*argv: str) -> tuple[int, str, str]:
    """ctl.main(argv) in-process: exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            ctl.main(list(argv))
        except SystemExit as exit:
            return int(exit.code or 0), out.getvalue(), err.getvalue()
    raise AssertionError("main() did not exit")


class CommandLineTests(SynchronousTestCase):
    def one_line(self, argv: list[str], status: int, expected: str) -> None:
        code, out, err = run_main(*argv)
        self.assertEqual((code, out), (status, ""), err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertTrue(err.startswith("protheus-broker-ctl: "), err)
        self.assertIn(expected, err)

    def test_unreadable_token_file(self) -> None:
        """A missing, directory, binary or empty --token-file: one line naming it, exit 2."""
        missing = os.path.abspath(self.mktemp())
        self.one_line(["--token-file", missing, "status"], 2, f"--token-file {missing}: No such file or directory")
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        self.one_line(["--token-file", folder, "reload"], 2, f"--token-file {folder}: Is a directory")
        binary = os.path.abspath(self.mktemp())
        with open(binary, "wb") as handle:
            handle.write(b"\xff\xfe\x00garbage\n")
        self.one_line(["--token-file", binary, "reload"], 2, "not text")
        empty = os.path.abspath(self.mktemp())
        open(empty, "w").close()
        self.one_line(["--token-file", empty, "reload"], 2, "the first line is empty")

    def test_url_that_is_not_http(self) -> None:
        """--url must be http(s)://HOST[:PORT]: anything else is one line, exit 2, before any
        connection is tried."""
        for url in ("ftp://127.0.0.1/", "127.0.0.1:8480", "http://[::1", "http://127.0.0.1:99999",
                    "http://", "not a url", "http://127.0.0.1:8480/?x=1", "file:///etc/passwd"):
            self.one_line(["--url", url, "status"], 2, f"--url {url!r}")

    def test_token_that_cannot_be_sent(self) -> None:
        """A token with non-ASCII or spaces cannot go in a header: one line, exit 2."""
        self.one_line(["--token", "caf\u00e9-token-0123456789", "status"], 2, "--token: the token must be")

    def test_usage_errors_of_commands(self) -> None:
        """A command without its argument, or a bad page number: one line, exit 2."""
        self.one_line(["drain"], 2, "drain needs a server ID")
        self.one_line(["sessions", "two"], 2, "page must be a number")


class BrokenPipeTests(SynchronousTestCase):
    def test_reader_leaving_is_not_an_error(self) -> None:
        """`protheus-broker-ctl … | head`: a closed stdout ends the command quietly, status 0."""
        def broken(argv: Any) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        self.patch(ctl, "run", broken)
        with open(self.mktemp(), "w") as out:  # a real file: main re-points its descriptor
            err = io.StringIO()
            self.patch(sys, "stdout", out)
            with contextlib.redirect_stderr(err):
                with self.assertRaises(SystemExit) as exit:
                    ctl.main(["servers"])
        self.assertEqual(exit.exception.code, 0)
        self.assertEqual(err.getvalue(), "")
