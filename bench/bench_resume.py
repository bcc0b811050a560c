"""Resumable sessions on 127.0.0.1: how fast a session flows again after the network returns, what a
session in standby costs the broker, and the connector's price on throughput.

``PYTHONPATH=. python bench/bench_resume.py`` (options: ``--help``).  Child processes: the sample
AppServer (echo), protheus-broker, protheus-connect; the load and the fault proxy (from
``tests/fault_proxy.py``) run in this process's reactor.  Every child is stopped by pid.

1. resume latency: one 64 B ping-pong session through connector -> fault proxy -> broker; every
   ``--interval`` s the proxy resets the link and refuses connections for ``--down`` s; the time
   from the end of each outage to the next echo reaching the client (p50/p99, ms);
2. memory per standby session: the broker's RSS (psutil) before opening ``--sessions`` sessions
   through the connector and after all their links were cut (sessions in standby), over the count;
3. bulk throughput, ``--mb`` MB each way at once through connector+broker vs the broker alone
   (median of ``--rounds``).
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from twisted.internet import defer, task
from twisted.internet.protocol import ClientCreator, Protocol

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protheus_broker.children import TwistdChild, spawn, twistd_argv  # noqa: E402
from protheus_broker.demo import stop_all  # noqa: E402
from tests.fault_proxy import FaultProxy  # noqa: E402
from tests.test_proxy_sockets import Peer  # noqa: E402

MB = 1024 * 1024


class PingPong(Protocol):
    """Sends 64 B, waits for the echo, sends again; records when each echo arrived."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.buffer = b""
        self.echoes: list[float] = []
        self.running = True

    def connectionMade(self) -> None:
        self.transport.write(b"p" * 64)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 64:
            self.buffer = self.buffer[64:]
            self.echoes.append(self.reactor.seconds())
            if self.running:
                self.transport.write(b"p" * 64)


class Idle(Protocol):
    """One idle session: a 1-byte round trip (both legs up), then nothing."""

    received = 0

    def connectionMade(self) -> None:
        self.transport.write(b"x")

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)


class Chain:
    """The child processes of one measurement."""

    def __init__(self, reactor: Any, workdir: Path, keepalive: float) -> None:
        self.reactor = reactor
        self.workdir = workdir
        self.keepalive = keepalive
        self.children: list[TwistdChild] = []

    async def start(self, name: str, argv: list[str]) -> tuple[TwistdChild, int]:
        child = spawn(self.reactor, TwistdChild(name), argv, cwd=str(self.workdir))
        self.children.append(child)
        return child, await child.listening()

    async def sim_and_broker(self) -> tuple[TwistdChild, int]:
        _, sim_port = await self.start("sim", twistd_argv(
            "protheus-appserver-sim", "--no-greeting", "--port", "tcp:0:interface=127.0.0.1"))
        ini = self.workdir / "appserver.ini"
        ini.write_text("[GENERAL]\nConsoleLog=1\n[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT=0\n"
                       "LOCAL_SERVER_INTERFACE=127.0.0.1\nSORT_METHOD=CONNECTION\n"
                       f"MONITORING_TYPE=DISABLED\nMAX_SESSIONS=0\nREMOTE_SERVER_A=127.0.0.1 {sim_port}\n"
                       f"RESUME_KEEPALIVE={self.keepalive}\nRESUME_BUFFER_SIZE=1024\n")
        return await self.start("broker", twistd_argv("protheus-broker", "--config", str(ini)))

    async def connector(self, port: int) -> int:
        ini = self.workdir / "smartclient.ini"
        ini.write_text(f"[drivers]\nactive=TCP\n[TCP]\nserver=127.0.0.1\nport={port}\nBrokerProxy=1\n")
        _, local = await self.start("connector", twistd_argv(
            "protheus-connect", "--config", str(ini), "--listen-port", "0",
            "--keepalive", str(self.keepalive)))
        return local

    async def stop(self) -> None:
        await stop_all(self.reactor, self.children)
        self.children = []


async def sleep(reactor: Any, seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def resume_latency(reactor: Any, chain: Chain, outages: int, interval: float,
                         down: float) -> tuple[list[float], list[float]]:
    broker, broker_port = await chain.sim_and_broker()
    proxy = FaultProxy(reactor, broker_port, [], random.Random(1), silent_ratio=0.0,
                       downtime=lambda r: down)
    listening = reactor.listenTCP(0, proxy, interface="127.0.0.1")
    local = await chain.connector(listening.getHost().port)
    client = PingPong(reactor)
    await ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", local)
    restored: list[float] = []
    for _ in range(outages):
        await sleep(reactor, interval - down)
        proxy.cut_all()
        restored.append(proxy.down_until)
        await sleep(reactor, down)
    await sleep(reactor, 1.0)
    client.running = False
    client.transport.loseConnection()
    await listening.stopListening()
    await chain.stop()
    def flowing_after(moments: list[float]) -> list[float]:
        delays = []
        for at in moments:
            after = [t for t in client.echoes if t > at]
            if after:
                delays.append(after[0] - at)
        return delays

    return flowing_after(restored), flowing_after(proxy.restored)


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


async def standby_memory(reactor: Any, chain: Chain, sessions: int) -> tuple[int, int, int]:
    broker, broker_port = await chain.sim_and_broker()
    proxy = FaultProxy(reactor, broker_port, [], random.Random(1), silent_ratio=0.0,
                       downtime=lambda r: 3600.0)
    listening = reactor.listenTCP(0, proxy, interface="127.0.0.1", backlog=2048)
    local = await chain.connector(listening.getHost().port)
    await sleep(reactor, 0.5)
    assert broker.pid is not None
    before = rss(broker.pid)
    clients = []
    for start in range(0, sessions, 100):
        batch = [Idle() for _ in range(min(100, sessions - start))]
        await defer.gatherResults([ClientCreator(reactor, lambda p=p: p).connectTCP("127.0.0.1", local)
                                   for p in batch])
        clients.extend(batch)
    while any(p.received < 1 for p in clients):
        await sleep(reactor, 0.05)
    attached = rss(broker.pid)
    proxy.cut_all()
    while broker.text().count("link dropped (") < sessions:
        await sleep(reactor, 0.1)
    await sleep(reactor, 0.5)
    standby = rss(broker.pid)
    for peer in clients:
        peer.transport.abortConnection()
    await listening.stopListening()
    await chain.stop()
    return before, attached, standby


async def throughput(reactor: Any, chain: Chain, size: int, via_connector: bool) -> float:
    broker, broker_port = await chain.sim_and_broker()
    port = await chain.connector(broker_port) if via_connector else broker_port
    peer = Peer(send_seed=1, send_size=size)
    started = time.perf_counter()
    await ClientCreator(reactor, lambda: peer).connectTCP("127.0.0.1", port)
    await peer.done
    elapsed = time.perf_counter() - started
    assert peer.received == size, (peer.received, size)
    await chain.stop()
    return size / MB / elapsed


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


async def main(reactor: Any, options: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    chain = Chain(reactor, workdir, options.keepalive)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: stop_all(reactor, chain.children))
    print(f"bench_resume: Python {sys.version.split()[0]}, Twisted "
          f"{__import__('twisted').__version__}, {psutil.cpu_count()} cores", flush=True)

    delays, handshakes = await resume_latency(reactor, chain, options.outages, options.interval,
                                              options.down)
    ms = [d * 1000 for d in delays]
    print(f"link restored -> data flowing again ({len(ms)} of {options.outages} outages of "
          f"{options.down * 1000:.0f} ms, resets): p50 {percentile(ms, 0.5):.1f} ms, "
          f"p99 {percentile(ms, 0.99):.1f} ms, max {max(ms):.1f} ms", flush=True)
    ms = [d * 1000 for d in handshakes]
    print(f"  of which after the connector's reconnect was accepted (resume handshake + replay + "
          f"echo): p50 {percentile(ms, 0.5):.2f} ms, p99 {percentile(ms, 0.99):.2f} ms; the rest is "
          f"the retry backoff (capped at 250 ms)", flush=True)

    before, attached, standby = await standby_memory(reactor, chain, options.sessions)
    print(f"broker RSS: {before / MB:.1f} MiB idle, {attached / MB:.1f} MiB with {options.sessions} "
          f"connector sessions open, {standby / MB:.1f} MiB with them in standby: "
          f"{(attached - before) / options.sessions / 1024:.1f} KiB per open session, "
          f"{(standby - before) / options.sessions / 1024:.1f} KiB per standby session "
          f"(AppServer connection included)", flush=True)

    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(options.rounds):
        for via in (False, True):
            rates[via].append(await throughput(reactor, chain, options.mb * MB, via))
    alone, connected = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"bulk, {options.mb} MB each way at once (median of {options.rounds}): broker alone "
          f"{alone:.0f} MB/s each way, connector+broker {connected:.0f} MB/s each way "
          f"({connected / alone:.0%})", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outages", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.4, help="seconds between cuts")
    parser.add_argument("--down", type=float, default=0.1, help="seconds each outage lasts")
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keepalive", type=float, default=1.0)
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, parser.parse_args())))
