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
3. the same with an AppServer that talks while its sessions are in standby: ``--talk-sessions``
   sessions on an in-process AppServer that greets, then sends ``--talk-mb`` MB to each session
   once all are in standby; the broker's RSS growth over the count;
4. a resumable-session flood: ``--flood`` links that send the magic and a HELLO and reset once
   the broker answers (MAX_SESSIONS=0); the broker's RSS growth and the sessions left in standby;
5. bulk throughput, ``--mb`` MB each way at once through connector+broker vs the broker alone
   (median of ``--rounds``).

``--only`` runs some of them (``latency,standby,talk,flood,bulk``).
"""

from __future__ import annotations

import argparse
import random
import re
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from twisted.internet import defer, task
from twisted.internet.protocol import ClientCreator, Factory, Protocol

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protheus_broker.demo.children import TwistdChild, spawn, twistd_argv  # noqa: E402
from protheus_broker.demo.run import stop_all  # noqa: E402
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


class Talker(Protocol):
    """An AppServer session that greets, then sends what it is told to (with backpressure)."""

    def __init__(self, talkers: list[Talker]) -> None:
        self.talkers = talkers
        self.left = 0
        self.paused = False

    def connectionMade(self) -> None:
        self.talkers.append(self)
        self.transport.registerProducer(self, True)
        self.transport.write(b"AppServer hello\r\n")

    def talk(self, size: int) -> None:
        self.left = size
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while self.left > 0 and not self.paused:
            chunk = min(64 * 1024, self.left)
            self.left -= chunk
            self.transport.write(b"t" * chunk)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.left = 0


class HelloThenReset(Protocol):
    """One flood link: magic + HELLO, then a TCP reset as soon as the broker answers."""

    def __init__(self) -> None:
        self.done: defer.Deferred[None] = defer.Deferred()
        self.answered = False

    def connectionMade(self) -> None:
        from protheus_broker.resume import crypto
        from protheus_broker.resume.frames import HELLO, MAGIC, Kind, encode

        self.transport.write(MAGIC + encode(Kind.HELLO, HELLO.pack(crypto.KeyPair().public, MB)))

    def dataReceived(self, data: bytes) -> None:
        if not self.answered:
            self.answered = True
            self.transport.abortConnection()  # SO_LINGER 0: a reset

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(None)


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

    async def sim_and_broker(self, greeting: bool = False) -> tuple[TwistdChild, int]:
        _, sim_port = await self.start("sim", twistd_argv(
            "protheus-appserver-sim", *([] if greeting else ["--no-greeting"]),
            "--port", "tcp:0:interface=127.0.0.1"))
        return await self.broker(sim_port)

    async def broker(self, app_port: int) -> tuple[TwistdChild, int]:
        sim_port = app_port
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
    await sleep(reactor, chain.keepalive * 1.5)  # every connector acknowledged (at latest a PING)
    attached = rss(broker.pid)
    proxy.cut_all()
    while ended(broker) < sessions:
        await sleep(reactor, 0.1)
    await sleep(reactor, 0.5)
    standby = rss(broker.pid)
    assert in_standby(broker) == sessions, (in_standby(broker), sessions)
    for peer in clients:
        peer.transport.abortConnection()
    await listening.stopListening()
    await chain.stop()
    return before, attached, standby


def in_standby(broker: TwistdChild) -> int:
    """Sessions the broker put in standby (one "resume.drop" line each)."""
    return len(re.findall(r"link dropped \(.*\); standby up to", broker.text()))


def ended(broker: TwistdChild) -> int:
    """Sessions in standby or ended (a drop before a session was established ends it)."""
    return in_standby(broker) + len(re.findall(r"session \d+ \S+ -> \S+ ended: ", broker.text()))


async def talking_standby_memory(reactor: Any, chain: Chain, sessions: int,
                                 talk: int) -> tuple[int, int, int]:
    """RSS with *sessions* idle in standby, then after their AppServer sent *talk* bytes each."""
    talkers: list[Talker] = []
    app = reactor.listenTCP(0, Factory.forProtocol(lambda: Talker(talkers)), interface="127.0.0.1",
                            backlog=2048)
    broker, broker_port = await chain.broker(app.getHost().port)
    proxy = FaultProxy(reactor, broker_port, [], random.Random(1), silent_ratio=0.0,
                       downtime=lambda r: 3600.0)
    listening = reactor.listenTCP(0, proxy, interface="127.0.0.1", backlog=2048)
    local = await chain.connector(listening.getHost().port)
    assert broker.pid is not None
    clients = []
    for start in range(0, sessions, 100):
        batch = [Idle() for _ in range(min(100, sessions - start))]
        await defer.gatherResults([ClientCreator(reactor, lambda p=p: p).connectTCP("127.0.0.1", local)
                                   for p in batch])
        clients.extend(batch)
    while any(p.received < 1 for p in clients):
        await sleep(reactor, 0.05)
    await sleep(reactor, chain.keepalive * 1.5)
    proxy.cut_all()
    while ended(broker) < sessions:
        await sleep(reactor, 0.1)
    await sleep(reactor, 0.5)
    standby = rss(broker.pid)
    for talker in talkers:
        talker.talk(talk)
    await sleep(reactor, 3.0)
    talked = rss(broker.pid)
    for peer in clients:
        peer.transport.abortConnection()
    await listening.stopListening()
    await chain.stop()
    for talker in talkers:
        talker.transport.abortConnection()
    await app.stopListening()
    return in_standby(broker), standby, talked


async def flood_memory(reactor: Any, chain: Chain, count: int) -> tuple[int, int, int, float]:
    """RSS before and after *count* HELLO-then-reset links, sessions left in standby, seconds."""
    broker, broker_port = await chain.sim_and_broker(greeting=True)
    assert broker.pid is not None
    await sleep(reactor, 0.5)
    before = rss(broker.pid)
    started = time.perf_counter()
    for start in range(0, count, 50):
        batch = [HelloThenReset() for _ in range(min(50, count - start))]
        for p in batch:
            ClientCreator(reactor, lambda p=p: p).connectTCP("127.0.0.1", broker_port)
        await defer.gatherResults([p.done for p in batch])
    elapsed = time.perf_counter() - started
    while ended(broker) < count:
        await sleep(reactor, 0.1)
    await sleep(reactor, 0.5)
    after = rss(broker.pid)
    await chain.stop()
    return before, after, in_standby(broker), elapsed


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

    only = set(options.only.split(","))
    if "latency" in only:
        delays, handshakes = await resume_latency(reactor, chain, options.outages, options.interval,
                                                  options.down)
        ms = [d * 1000 for d in delays]
        print(f"link restored -> data flowing again ({len(ms)} of {options.outages} outages of "
              f"{options.down * 1000:.0f} ms, resets): p50 {percentile(ms, 0.5):.1f} ms, "
              f"p99 {percentile(ms, 0.99):.1f} ms, max {max(ms):.1f} ms", flush=True)
        ms = [d * 1000 for d in handshakes]
        print(f"  of which after the connector's reconnect was accepted (resume handshake + replay "
              f"+ echo): p50 {percentile(ms, 0.5):.2f} ms, p99 {percentile(ms, 0.99):.2f} ms; the "
              f"rest is the retry backoff (capped at 250 ms)", flush=True)

    if "standby" in only:
        before, attached, standby = await standby_memory(reactor, chain, options.sessions)
        print(f"broker RSS: {before / MB:.1f} MiB idle, {attached / MB:.1f} MiB with "
              f"{options.sessions} connector sessions open, {standby / MB:.1f} MiB with them in "
              f"standby: {(attached - before) / options.sessions / 1024:.1f} KiB per open session, "
              f"{(standby - before) / options.sessions / 1024:.1f} KiB per standby session "
              f"(AppServer connection included)", flush=True)

    if "talk" in only:
        n = options.talk_sessions
        held, standby, talked = await talking_standby_memory(reactor, chain, n, options.talk_mb * MB)
        print(f"{held} sessions in standby, then their AppServer sends {options.talk_mb} MB to each: "
              f"broker RSS {standby / MB:.1f} -> {talked / MB:.1f} MiB, "
              f"{(talked - standby) / n / 1024:.1f} KiB more per standby session", flush=True)

    if "flood" in only:
        before, after, held, elapsed = await flood_memory(reactor, chain, options.flood)
        print(f"flood of {options.flood} HELLO-then-reset links in {elapsed:.1f}s: {held} sessions "
              f"left in standby, broker RSS {before / MB:.1f} -> {after / MB:.1f} MiB "
              f"({(after - before) / options.flood / 1024:.1f} KiB per flood link)", flush=True)

    if "bulk" not in only:
        return
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
    parser.add_argument("--talk-sessions", type=int, default=200)
    parser.add_argument("--talk-mb", type=int, default=2)
    parser.add_argument("--flood", type=int, default=5000)
    parser.add_argument("--only", default="latency,standby,talk,flood,bulk")
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, parser.parse_args())))
