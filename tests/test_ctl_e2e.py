"""protheus-broker-ctl as a process (``python -m protheus_broker.web.ctl``): failures are one line on
stderr, never a traceback."""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from .test_ctl_sockets import closed_port


class ProcessTests(TestCase):
    """The installed command's path: ``python -m protheus_broker.web.ctl``."""

    timeout = 60

    async def ctl(self, *argv: str) -> tuple[str, str, int]:
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "protheus_broker.web.ctl", *argv],
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        return out.decode(), err.decode(), code

    @defer.inlineCallbacks
    def test_no_traceback_for_bad_token_file_or_url(self) -> Any:
        """A missing --token-file, a non-HTTP --url and a refused connection: each one line on
        stderr, no traceback; exit 2, 2 and 1."""
        missing = os.path.abspath(self.mktemp())
        cases = [(["--token-file", missing, "status"], 2), (["--url", "ftp://127.0.0.1/", "status"], 2),
                 (["--url", f"http://127.0.0.1:{closed_port()}", "status"], 1)]
        for argv, expected in cases:
            out, err, code = yield defer.ensureDeferred(self.ctl(*argv))
            print(f"\nprotheus-broker-ctl {' '.join(argv)} -> exit {code}: {err.strip()}")
            self.assertEqual((code, out), (expected, ""), err)
            self.assertNotIn("Traceback", err)
            self.assertEqual(len(err.strip().splitlines()), 1, err)

