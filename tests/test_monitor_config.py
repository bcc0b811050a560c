"""Monitoring config: the broker's agent keys and the agent's own ini, every error as one line."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.agent.settings import load_agent_config, parse_agent_config

from protheus_broker.config import parse_config

from protheus_broker.ini import ConfigError

from protheus_broker.monitoring.settings import DEFAULT_AGENT_PORT, MonitoringType

HERE = os.path.dirname(os.path.abspath(__file__))
ETC = os.path.join(os.path.dirname(HERE), "etc")

BASE = ("[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 4000\nREMOTE_SERVER_01 = 10.0.0.1 5000\n"
        "REMOTE_SERVER_02 = 10.0.0.2 5000\n")
SECRET = "AGENT_SECRET = a-secret-of-enough-length\n"


class BrokerMonitoringKeysTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """CONNECTION probing every 60 s needs no agent; agents default to port 7077 on the
        AppServer's host; heartbeat 1 s, Suspended after 1 miss, Down after 3."""
        monitoring = parse_config(BASE).desktop.monitoring
        self.assertEqual(monitoring.agents, {"01": ("10.0.0.1", DEFAULT_AGENT_PORT),
                                             "02": ("10.0.0.2", DEFAULT_AGENT_PORT)})
        self.assertEqual((monitoring.probe_interval, monitoring.heartbeat_interval,
                          monitoring.suspend_misses, monitoring.down_misses, monitoring.suspect_time),
                         (60.0, 1.0, 1, 3, 10.0))
        self.assertIsNone(monitoring.secret)
        self.assertIsNone(monitoring.tls)

    def test_agent_addresses_and_intervals(self) -> None:
        """AGENT_SERVER_<id> and AGENT_PORT place agents; the timing keys are read."""
        config = parse_config(BASE + SECRET + "MONITORING_TYPE = SMARTCLIENT_ACTIVE\nAGENT_PORT = 7100\n"
                              "AGENT_SERVER_02 = agent2.lan 7200\nHEARTBEAT_INTERVAL = 0.5\n"
                              "HEARTBEAT_SUSPEND_MISSES = 2\nHEARTBEAT_DOWN_MISSES = 6\n"
                              "MONITORING_INTERVAL = 30\nSUSPECT_TIME = 4\nSESSION_MEMORY_MB = 64\n"
                              "SESSION_CPU_PERCENT = 0.5\n")
        monitoring = config.desktop.monitoring
        self.assertEqual(config.warnings, ())
        self.assertEqual(monitoring.agents, {"01": ("10.0.0.1", 7100), "02": ("agent2.lan", 7200)})
        self.assertEqual(monitoring.secret, b"a-secret-of-enough-length")
        self.assertEqual((monitoring.heartbeat_interval, monitoring.suspend_misses,
                          monitoring.down_misses, monitoring.probe_interval, monitoring.suspect_time),
                         (0.5, 2, 6, 30.0, 4.0))
        self.assertEqual(monitoring.session_memory_bytes, 64 * 1024 * 1024)
        self.assertEqual(monitoring.session_cpu_percent, 0.5)

    def test_secret_file(self) -> None:
        """AGENT_SECRET_FILE: the first line of the file is the secret."""
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write("from-a-file-0123456789\n")
        config = parse_config(BASE + f"MONITORING_TYPE = SMARTCLIENT\nAGENT_SECRET_FILE = {path}\n")
        self.assertEqual(config.desktop.monitoring.secret, b"from-a-file-0123456789")

    def test_tls_files(self) -> None:
        """SSL modes read AGENT_SSL_CERTIFICATE/KEY/CA; no secret needed."""
        paths = []
        for name in ("c.pem", "k.pem", "ca.pem"):
            path = os.path.join(os.path.abspath(self.mktemp()))
            open(path, "w").close()
            paths.append(path)
        config = parse_config(BASE + "MONITORING_TYPE = SMARTCLIENT_SSL_ACTIVE\n"
                              f"AGENT_SSL_CERTIFICATE = {paths[0]}\nAGENT_SSL_KEY = {paths[1]}\n"
                              f"AGENT_SSL_CA = {paths[2]}\n")
        tls = config.desktop.monitoring.tls
        assert tls is not None
        self.assertEqual((tls.certificate, tls.key, tls.ca), tuple(paths))
        self.assertEqual(config.desktop.monitoring_type, MonitoringType.SMARTCLIENT_SSL_ACTIVE)

    def test_errors_name_the_key(self) -> None:
        """Each monitoring mistake is one ConfigError naming the line and key."""
        cases = {
            "MONITORING_TYPE = SMARTCLIENT_ACTIVE\n": "AGENT_SECRET: AGENT_SECRET or AGENT_SECRET_FILE is required with MONITORING_TYPE=SMARTCLIENT_ACTIVE",
            "MONITORING_TYPE = SMARTCLIENT_ACTIVE\nAGENT_SECRET = short\n": "the secret is too short (5 bytes; at least 16)",
            "MONITORING_TYPE = SMARTCLIENT_SSL_ACTIVE\n": "AGENT_SSL_CERTIFICATE: is required with MONITORING_TYPE=SMARTCLIENT_SSL_ACTIVE",
            "AGENT_SSL_CA = /nonexistent/ca.pem\n": "is required with AGENT_SSL_CA (mutual TLS needs all three)",
            "MONITORING_TYPE = SMARTCLIENT_SSL\nAGENT_SSL_CERTIFICATE = /nonexistent/c.pem\n": "AGENT_SSL_CERTIFICATE: cannot read '/nonexistent/c.pem'",
            "AGENT_SERVER_09 = h 1\n": "AGENT_SERVER_09: no REMOTE_SERVER_09 for this agent",
            "AGENT_SERVER_01 = h\n": "AGENT_SERVER_01: missing port",
            "AGENT_SERVER_x-y = h 1\n": "server id must be letters and digits after AGENT_SERVER_",
            "AGENT_PORT = 70000\n": "AGENT_PORT: port 70000 is out of range",
            "HEARTBEAT_INTERVAL = -1\n": "HEARTBEAT_INTERVAL: -1 is out of range",
            "HEARTBEAT_INTERVAL = nan\n": "HEARTBEAT_INTERVAL: nan is out of range",
            "HEARTBEAT_SUSPEND_MISSES = 4\n": "HEARTBEAT_DOWN_MISSES: 3 is below HEARTBEAT_SUSPEND_MISSES (4)",
            "AGENT_SECRET = a-secret-of-enough-length\nAGENT_SECRET_FILE = /etc/hostname\n": "give AGENT_SECRET or AGENT_SECRET_FILE, not both",
        }
        for extra, message in cases.items():
            with self.assertRaises(ConfigError, msg=extra) as caught:
                parse_config(BASE + extra, "b.ini")
            self.assertIn(message, str(caught.exception), extra)
            self.assertTrue(str(caught.exception).startswith("b.ini:"), str(caught.exception))


AGENT = "[AGENT]\nSECRET = a-secret-of-enough-length\n[APPSERVER_01]\nPORT = 5001\n"


class AgentConfigTests(SynchronousTestCase):
    def test_example_agent_ini_loads(self) -> None:
        """etc/agent.ini, the documented example, is valid (given its secret file)."""
        secret = os.path.abspath(self.mktemp())
        with open(secret, "w") as handle:
            handle.write("a-secret-of-enough-length\n")
        with open(os.path.join(ETC, "agent.ini")) as handle:
            text = handle.read().replace("/etc/protheus-broker/agent.secret", secret)
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as handle:
            handle.write(text)
        config = load_agent_config(path)
        self.assertEqual(config.warnings, ())
        self.assertGreaterEqual(len(config.appservers), 1)

    def test_minimal_and_each_way_to_find_the_process(self) -> None:
        """Defaults: port 7077, sample every second; PID_FILE, PROCESS_NAME or the port alone."""
        config = parse_agent_config(
            AGENT + "[APPSERVER_02]\nPORT = 5002\nPID_FILE = /run/a.pid\n"
            "[AppServer_03]\nPORT = 5003\nPROCESS_NAME = appsrvlinux\nUSERS_FILE = /run/users\n")
        self.assertEqual((config.port, config.sample_interval, config.accept_timeout),
                         (DEFAULT_AGENT_PORT, 1.0, 3.0))
        self.assertEqual([w.found_by for w in config.appservers], [
            "the process listening on port 5001", "pid file /run/a.pid",
            "process 'appsrvlinux' listening on port 5003"])
        self.assertEqual(config.appservers[2].users_file, "/run/users")

    def test_agent_errors(self) -> None:
        """Agent ini mistakes are one line each."""
        cases = {
            "[APPSERVER_01]\nPORT = 5001\n": "no [AGENT] section",
            "[AGENT]\n[APPSERVER_01]\nPORT = 5001\n": "SECRET or SECRET_FILE is required when SSL_CERTIFICATE/SSL_KEY/SSL_CA are not set",
            "[AGENT]\nSECRET = a-secret-of-enough-length\n": "no [APPSERVER_<name>] section",
            AGENT + "[APPSERVER_02]\nHOST = x\n": "PORT is missing",
            AGENT + "[APPSERVER_02]\nPORT = 5001\n": "port 5001 is also [APPSERVER_01]'s",
            "[AGENT]\nSSL_CERTIFICATE = /nonexistent\n[APPSERVER_01]\nPORT = 5001\n": "SSL_CERTIFICATE: cannot read",
            AGENT.replace("[APPSERVER", "ACCEPT_TIMEOUT = -1\n[APPSERVER"): "ACCEPT_TIMEOUT: -1 is out of range",
            AGENT.replace("[APPSERVER", "ACCEPT_TIMEOUT = soon\n[APPSERVER"): "ACCEPT_TIMEOUT",
        }
        for text, message in cases.items():
            with self.assertRaises(ConfigError, msg=text) as caught:
                parse_agent_config(text, "agent.ini")
            self.assertIn(message, str(caught.exception), text)

    def test_accept_timeout(self) -> None:
        """[AGENT] ACCEPT_TIMEOUT sets how long a queued connection may wait; 0 turns it off."""
        for text, value in (("2.5", 2.5), ("0", 0.0)):
            config = parse_agent_config(AGENT.replace("[APPSERVER", f"ACCEPT_TIMEOUT = {text}\n[APPSERVER"))
            self.assertEqual((config.accept_timeout, config.warnings), (value, ()))

    def test_unknown_keys_warn(self) -> None:
        """Unknown keys and sections in the agent ini are warnings."""
        config = parse_agent_config(AGENT + "COLOUR = blue\n[OTHER]\n")
        self.assertEqual(len(config.warnings), 2)
