"""The package as setup.cfg ships it (what pybuild puts in the .deb)."""

from __future__ import annotations

import configparser
import os

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PackageListTests(SynchronousTestCase):
    def test_every_subpackage_is_listed(self) -> None:
        """Each folder of protheus_broker with an __init__.py is in setup.cfg's packages (a
        missing one installs without its modules: the .deb's own test run fails on import)."""
        config = configparser.ConfigParser()
        config.read(os.path.join(ROOT, "setup.cfg"))
        listed = {name.strip() for name in config["options"]["packages"].split(",")}
        found = set()
        for folder, _, files in os.walk(os.path.join(ROOT, "protheus_broker")):
            if "__init__.py" in files and "__pycache__" not in folder:
                found.add(os.path.relpath(folder, ROOT).replace(os.sep, "."))
        self.assertEqual(found - listed, set())
        self.assertIn("twisted.plugins", listed)
