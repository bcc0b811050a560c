"""The demo's managed-node config: etc/demo-nodes.ini with the demo's placeholders filled in."""

from __future__ import annotations

import os
import shlex
import sys

from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.config import load_config
from protheus_broker.demo.run import DEMO_INI, NODES_INI, managed_nodes, prepare_ini


class DemoNodesTests(SynchronousTestCase):
    def test_placeholders_filled_and_config_valid(self) -> None:
        """{python} becomes this Python and {rundir} the demo's directory; the broker config loads."""
        run_dir = os.path.abspath(self.mktemp())
        os.makedirs(run_dir)
        path = prepare_ini(NODES_INI, run_dir)
        self.assertEqual(os.path.dirname(path), run_dir)
        config = load_config(path)
        desktop = config.desktop.nodes
        assert desktop is not None
        self.assertEqual(desktop.command[:3], (*shlex.split(shlex.quote(sys.executable)), "-m",
                                               "protheus_broker.demo.twistd"))
        self.assertEqual((desktop.lock_dir, desktop.persistent), (run_dir, True))
        self.assertEqual(managed_nodes(config), [
            "[BALANCE_SMART_CLIENT_DESKTOP] 2..4 nodes over TCP, one persistent",
            "[BALANCE_HTTP] 2..2 nodes over UNIX"])

    def test_plain_demo_ini_is_used_as_is(self) -> None:
        """An ini without the demo's placeholders is not copied."""
        self.assertEqual(prepare_ini(DEMO_INI, "/nonexistent"), DEMO_INI)
