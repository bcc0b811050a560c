#!/usr/bin/env python3
"""How long from an AppServer's death to the broker marking it Down, over N kills.

    python bench/bench_failover_detect.py [--runs 10] [--tls]

Real processes on 127.0.0.1: two sample AppServers (A, B), an agent beside each, and a broker in
``SMARTCLIENT_ACTIVE`` (``SMARTCLIENT_SSL_ACTIVE`` with mutual TLS with ``--tls``).  Each run
waits a random 0-1 s (so the kill falls anywhere in the agent's 1 s sampling), SIGKILLs B, and
times from the kill to the broker's ``server B (...) up -> down`` line; then B is started again on
the same port and the broker waits for it Up before the next run.  Prints every run and the
p50/mean/max seconds.  No logins are made meanwhile: this is the monitoring path alone (a login
refused by the dead server suspends it at once, see ``tests/test_monitor_e2e.py``).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from protheus_broker.certs import make_ca, make_cert, write_pair  # noqa: E402
from protheus_broker.children import TwistdChild, spawn, twistd_argv  # noqa: E402
from protheus_broker.demo import stop_all  # noqa: E402

SECRET = "bench-secret-0123456789"


class Farm:
    """The processes of one bench, each started in *workdir* and stopped by pid at the end."""

    def __init__(self, reactor: Any, workdir: str) -> None:
        self.reactor = reactor
        self.workdir = workdir
        self.children: list[TwistdChild] = []

    def start(self, name: str, argv: list[str]) -> TwistdChild:
        child = TwistdChild(name)
        spawn(self.reactor, child, argv, cwd=self.workdir)
        self.children.append(child)
        return child

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.workdir, name)
        with open(path, "w") as handle:
            handle.write(text)
        return path

    def appserver(self, name: str, port: int = 0) -> TwistdChild:
        return self.start(name, twistd_argv("protheus-appserver-sim", "--name", name.lower(),
                                            "--port", f"tcp:{port}:interface=127.0.0.1"))


async def wait_for(reactor: Any, child: TwistdChild, pattern: str, start: int = 0,
                   limit: float = 30.0) -> float:
    """Poll *child*'s output after offset *start* for *pattern*; returns when (monotonic)."""
    deadline = time.monotonic() + limit
    while not re.search(pattern, child.text()[start:]):
        if time.monotonic() > deadline:
            raise SystemExit(f"{pattern!r} not seen in {limit:g} s:\n{child.text()[-3000:]}")
        await task.deferLater(reactor, 0.005, lambda: None)
    return time.monotonic()


async def run(reactor: Any, args: argparse.Namespace) -> None:
    farm = Farm(reactor, tempfile.mkdtemp(prefix="bench_failover_detect_"))
    try:
        sims = {name: farm.appserver(name) for name in ("A", "B")}
        ports = {name: await sim.listening() for name, sim in sims.items()}
        mode = "SMARTCLIENT_SSL_ACTIVE" if args.tls else "SMARTCLIENT_ACTIVE"
        if args.tls:
            ca = make_ca()
            write_pair(farm.workdir, "ca", ca)
            write_pair(farm.workdir, "broker", make_cert(ca, "broker", client=True))
            write_pair(farm.workdir, "agent", make_cert(ca, "agent", ["127.0.0.1", "localhost"]))
            d = farm.workdir
            agent_auth = f"SSL_CERTIFICATE = {d}/agent.pem\nSSL_KEY = {d}/agent.key\nSSL_CA = {d}/ca.pem\n"
            broker_auth = (f"AGENT_SSL_CERTIFICATE = {d}/broker.pem\nAGENT_SSL_KEY = {d}/broker.key\n"
                           f"AGENT_SSL_CA = {d}/ca.pem\n")
        else:
            agent_auth, broker_auth = f"SECRET = {SECRET}\n", f"AGENT_SECRET = {SECRET}\n"
        agent_ports = {}
        for name, port in ports.items():
            ini = farm.write(f"agent-{name}.ini", "[AGENT]\nPORT = 0\nINTERFACE = 127.0.0.1\n" + agent_auth
                             + f"[APPSERVER_{name}]\nPORT = {port}\n")
            agent_ports[name] = await farm.start(f"agent-{name}",
                                                 twistd_argv("protheus-agent", "--config", ini)).listening()
        servers = "".join(f"REMOTE_SERVER_{n} = 127.0.0.1 {ports[n]}\n"
                          f"AGENT_SERVER_{n} = 127.0.0.1 {agent_ports[n]}\n" for n in ports)
        ini = farm.write("broker.ini", "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\n"
                         "LOCAL_SERVER_INTERFACE = 127.0.0.1\nSORT_METHOD = CONNECTION\n"
                         f"MONITORING_TYPE = {mode}\n" + broker_auth + servers)
        broker = farm.start("broker", twistd_argv("protheus-broker", "--config", ini))
        await broker.listening()
        deadline = time.monotonic() + 30
        while len(re.findall(r"agent channel to \S+ authenticated", broker.text())) < 2:
            if time.monotonic() > deadline:
                raise SystemExit(f"agent channels not authenticated:\n{broker.text()[-3000:]}")
            await task.deferLater(reactor, 0.05, lambda: None)
        await task.deferLater(reactor, 1.5, lambda: None)  # first reports in

        settled = re.findall(r"server \w+ \(\S+\) \w+ -> \w+: [^\n]*", broker.text())
        sys.stdout.write(f"state changes before the first kill: {len(settled)}\n"
                         + "".join(f"  {line}\n" for line in settled))
        figures: list[float] = []
        for number in range(1, args.runs + 1):
            await task.deferLater(reactor, random.random(), lambda: None)  # any phase of the sampling
            offset = len(broker.text())
            killed_at = time.monotonic()
            sims["B"].signal("KILL")
            down_at = await wait_for(reactor, broker, r"server B \(\S+\) \w+ -> down: [^\n]*\n",
                                   start=offset)
            figures.append(down_at - killed_at)
            line = re.findall(r"server B \(\S+\) \w+ -> down: [^\n]*", broker.text()[offset:])[0]
            sys.stdout.write(f"run {number:3d}: kill -> Down {figures[-1]:.3f} s  ({line})\n")
            await sims["B"].ended
            offset = len(broker.text())
            sims["B"] = farm.appserver("B", ports["B"])
            await sims["B"].listening()
            await wait_for(reactor, broker, r"server B \(\S+\) \w+ -> up: [^\n]*\n", start=offset)
            await task.deferLater(reactor, 1.0, lambda: None)

        ordered = sorted(figures)
        sys.stdout.write(
            f"bench_failover_detect: {mode}, {len(figures)} kills (SIGKILL) of an AppServer with its "
            f"agent sampling every 1 s\n"
            f"kill -> Down seconds: p50 {statistics.median(ordered):.3f}, mean "
            f"{statistics.mean(ordered):.3f}, min {ordered[0]:.3f}, max {ordered[-1]:.3f}\n")
    finally:
        await stop_all(reactor, farm.children)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--tls", action="store_true", help="SMARTCLIENT_SSL_ACTIVE (mutual TLS)")
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
