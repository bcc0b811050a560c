#!/usr/bin/env python3
"""Broker CPU for active monitoring: N servers, each reporting once a second (simulated agents).

    python bench/monitor_bench.py [--servers 1000] [--seconds 20] [--tls]

This process plays the agents: one listener speaking the real agent protocol
(``protheus_broker.agent.AgentProtocol``) for N fake AppServers, with fixed figures.  The broker is
a real ``twistd protheus-broker`` child process with N ``REMOTE_SERVER``s in
``SMARTCLIENT_ACTIVE`` (or ``SMARTCLIENT_SSL_ACTIVE`` with ``--tls``), ``SORT_METHOD =
SERVER_MEMORY``.  Once every channel is authenticated and a few seconds have passed, the broker's
CPU time (user + system, psutil) is measured over ``--seconds`` and printed as a percentage of
one core.  Target: under 10 % for 1,000 servers at 1 report/s.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil  # noqa: E402
from twisted.internet import defer, task  # noqa: E402

from protheus_broker.agent.agent import Agent, AgentFactory, AppServerWatch  # noqa: E402
from protheus_broker.tls.certs import make_ca, make_cert, write_pair  # noqa: E402
from protheus_broker.demo.children import TwistdChild, spawn, twistd_argv  # noqa: E402
from protheus_broker.agent.settings import AgentConfig, WatchedAppServer  # noqa: E402
from protheus_broker.tls.settings import TLSFiles  # noqa: E402
from protheus_broker.demo.run import stop_all  # noqa: E402
from protheus_broker.agent.probe import ProcessFigures  # noqa: E402

SECRET = "bench-secret-0123456789"
FIRST_PORT = 20000


def fake_measure(port: int) -> Any:
    rng = random.Random(port)
    figures = ProcessFigures(pid=port, memory_bytes=rng.randrange(200, 2000) * 2**20,
                             users=rng.randrange(0, 200), threads=rng.randrange(20, 400),
                             cpu_percent=rng.uniform(0, 90))
    return lambda: figures


async def instant_accept() -> str:
    return ""


async def run(reactor: Any, args: argparse.Namespace) -> None:
    count = args.servers
    workdir = tempfile.mkdtemp(prefix="monitor_bench_")
    tls_broker = tls_agent = None
    if args.tls:
        ca = make_ca()
        write_pair(workdir, "ca", ca)
        write_pair(workdir, "broker", make_cert(ca, "broker", client=True))
        write_pair(workdir, "agent", make_cert(ca, "agent", ["127.0.0.1"]))
        ca_path = os.path.join(workdir, "ca.pem")
        tls_broker = TLSFiles(os.path.join(workdir, "broker.pem"), os.path.join(workdir, "broker.key"), ca_path)
        tls_agent = TLSFiles(os.path.join(workdir, "agent.pem"), os.path.join(workdir, "agent.key"), ca_path)

    watched = tuple(WatchedAppServer(f"S{i}", FIRST_PORT + i) for i in range(count))
    config = AgentConfig(path="<bench>", port=0, appservers=watched, secret=SECRET.encode(), tls=tls_agent)
    agent = Agent(reactor, config, host=(64 * 2**30, 32), watches={
        w.port: AppServerWatch(reactor, w, measure=fake_measure(w.port), connect_check=instant_accept,
                               accept_queue=lambda: None)
        for w in watched})
    await agent.sample_all()
    sampler = task.LoopingCall(agent.sample_all)
    sampler.start(1.0, now=False)
    factory = AgentFactory(agent)
    if tls_agent is not None:
        from protheus_broker.tls.options import server_options

        listener = reactor.listenSSL(0, factory, server_options(tls_agent), interface="127.0.0.1", backlog=2048)
    else:
        listener = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=2048)
    agent_port = listener.getHost().port

    mode = "SMARTCLIENT_SSL_ACTIVE" if tls_broker else "SMARTCLIENT_ACTIVE"
    lines = ["[BALANCE_SMART_CLIENT_DESKTOP]", "LOCAL_SERVER_PORT = 0", "LOCAL_SERVER_INTERFACE = 127.0.0.1",
             "SORT_METHOD = SERVER_MEMORY", f"MONITORING_TYPE = {mode}", f"AGENT_PORT = {agent_port}",
             f"AGENT_SECRET = {SECRET}"]
    if tls_broker:
        lines += [f"AGENT_SSL_CERTIFICATE = {tls_broker.certificate}", f"AGENT_SSL_KEY = {tls_broker.key}",
                  f"AGENT_SSL_CA = {tls_broker.ca}"]
    lines += [f"REMOTE_SERVER_{i:04d} = 127.0.0.1 {FIRST_PORT + i}" for i in range(count)]
    ini = os.path.join(workdir, "broker.ini")
    with open(ini, "w") as handle:
        handle.write("\n".join(lines) + "\n")

    broker = TwistdChild("broker")
    spawn(reactor, broker, twistd_argv("protheus-broker", "--config", ini), cwd=workdir)
    children = [broker]
    try:
        await broker.listening()
        start = time.monotonic()
        while broker.text().count("authenticated") < count:
            if time.monotonic() - start > 120:
                raise SystemExit(f"only {broker.text().count('authenticated')} of {count} channels "
                                 f"authenticated after 120 s:\n{broker.text()[-3000:]}")
            await task.deferLater(reactor, 0.2, lambda: None)
        connected_in = time.monotonic() - start
        await task.deferLater(reactor, 3.0, lambda: None)  # settle
        log_before = len(broker.text())
        process = psutil.Process(broker.pid)
        before = process.cpu_times()
        pushed_before = sum(len(w.links) for w in agent.watches.values())
        began = time.monotonic()
        await task.deferLater(reactor, args.seconds, lambda: None)
        after = process.cpu_times()
        elapsed = time.monotonic() - began
        used = (after.user - before.user) + (after.system - before.system)
        percent = 100.0 * used / elapsed
        problems = [line for line in broker.text()[log_before:].splitlines()
                    if "-> suspended" in line or "-> down" in line]
        sys.stdout.write(
            f"monitor_bench: {count} servers, {mode}, 1 report/s each ({pushed_before} channels up, "
            f"all authenticated in {connected_in:.1f}s)\n"
            f"broker CPU: {percent:.1f}% of one core over {elapsed:.0f}s "
            f"({percent / count * 1000:.1f}% per 1,000 servers; target < 10%)\n"
            f"state changes during the run: {len(problems)}\n" + "".join(f"  {p}\n" for p in problems[:5]))
    finally:
        sampler.stop()
        await stop_all(reactor, children)
        await listener.stopListening()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--tls", action="store_true", help="SMARTCLIENT_SSL_ACTIVE (mutual TLS)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.servers + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
