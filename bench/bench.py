"""protheus-broker vs a direct connection vs HAProxy 2.6 (``mode tcp``, ``nbthread 1``), 127.0.0.1 only.

``make bench`` (or ``PYTHONPATH=. python bench/bench.py``).  Every figure is taken against the same
backend for all three targets, in interleaved rounds (the order of the targets rotates each round),
and the median of the rounds is reported:

1. bulk throughput, 1 stream: ``iperf3 -c`` through each target to one ``iperf3 -s``;
2. 64 B ping-pong round trip p50/p99 on one connection, and the latency each proxy adds (p50 minus
   the direct p50);
3. new sessions/s: connect, one 64 B echo round trip, close; sequential and 50 concurrent;
4. RSS per idle proxied session: the proxy's RSS before and after opening 5,000 sessions through it
   (each after one 1-byte round trip, so both legs are up), over 5,000; a fresh proxy each round.

The load generators are plain sockets / one epoll loop in this process; the proxies and backends
are child processes, started and stopped by pid (also on Ctrl-C).  The table goes to stdout and to
bench/results/latest.md.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import gc
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

try:
    import psutil
except ImportError:  # pragma: no cover
    sys.exit("bench: needs psutil (pip install psutil)")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
HOST = "127.0.0.1"
TARGETS = ("direct", "broker", "haproxy")
LISTEN_RE = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")

TARGETS_GOALS = {  # figure -> (comparison, bound): the broker/HAProxy ratio we aim for
    "bulk": (">=", 0.9),
    "added": ("<=", 2.0),
    "seq": (">=", 0.8),
    "conc": (">=", 0.8),
    "rss": ("<=", 1.0),
}


# --- child processes ----------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _child_setup() -> None:
    """In each child, before exec: the open-files soft limit up to the hard one, and SIGTERM if
    the bench itself dies (a safety net; the bench stops every child by pid in any case)."""
    _raise_nofile()
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Children:
    """Every process the bench starts, stopped by pid."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[bytes], Any]] = []

    def start(self, name: str, argv: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log_path = self.workdir / f"{name}.log"
        log_file = open(log_path, "ab")  # a file never fills up and blocks the child
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            cwd=self.workdir, env=env, preexec_fn=_child_setup, start_new_session=True,
        )
        self.procs.append((name, proc, log_file))
        return proc, log_path

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        for i, (_, p, log_file) in enumerate(self.procs):
            if p is proc:
                del self.procs[i]
                _terminate(p)
                log_file.close()
                return

    def stop_all(self) -> None:
        while self.procs:
            self.stop(self.procs[-1][1])


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_logged_port(proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 20) -> int:
    """The port a child logged in a ``listening on 127.0.0.1:PORT`` line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = LISTEN_RE.search(log_path.read_bytes())
        if match:
            return int(match.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"{log_path.stem} exited ({proc.returncode}):\n{_tail(log_path)}")
        time.sleep(0.05)
    raise RuntimeError(f"{log_path.stem} did not report its port in {timeout}s:\n{_tail(log_path)}")


def wait_listening(proc: subprocess.Popen[bytes], port: int, log_path: Path, timeout: float = 20) -> None:
    """Wait until *proc* has a LISTEN socket on *port* (no probe connection is made)."""
    deadline = time.monotonic() + timeout
    ps = psutil.Process(proc.pid)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{log_path.stem} exited ({proc.returncode}):\n{_tail(log_path)}")
        try:
            conns = getattr(ps, "net_connections", None) or ps.connections  # psutil < 6
            conns = conns(kind="tcp")
        except psutil.Error:
            conns = []
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{log_path.stem} is not listening on {port} after {timeout}s:\n{_tail(log_path)}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def twistd(*args: str) -> list[str]:
    return [PY, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", *args]


# --- the three targets --------------------------------------------------------------------------

class Target:
    """A way to reach a backend: directly (pid None) or through a proxy process."""

    def __init__(self, name: str, port: int, proc: subprocess.Popen[bytes] | None) -> None:
        self.name = name
        self.port = port
        self.proc = proc

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


def start_broker(children: Children, backend_port: int, tag: str) -> Target:
    ini = children.workdir / f"broker-{tag}.ini"
    ini.write_text(
        "[BALANCE_SMART_CLIENT_DESKTOP]\n"
        "LOCAL_SERVER_PORT = 0\n"
        "LOCAL_SERVER_INTERFACE = 127.0.0.1\n"
        f"REMOTE_SERVER_01 = 127.0.0.1 {backend_port}\n"
        "SORT_METHOD = CONNECTION\n"
        "MONITORING_TYPE = DISABLED\n"
        "MAX_SESSIONS = 20000\n"
    )
    proc, log_path = children.start(f"broker-{tag}", twistd("protheus-broker", "--config", str(ini)))
    return Target("broker", wait_logged_port(proc, log_path), proc)


def start_haproxy(children: Children, backend_port: int, tag: str, log: bool) -> Target:
    """HAProxy in the foreground (-db), one thread; our pid is HAProxy's own."""
    port = free_port()
    cfg = children.workdir / f"haproxy-{tag}.cfg"
    lines = ["global", "    nbthread 1", "    maxconn 9000"]
    if log:
        lines.append("    log stdout format raw local0")
    if HAPROXY_BUFSIZE:
        lines.append(f"    tune.bufsize {HAPROXY_BUFSIZE}")
    lines += ["defaults", "    mode tcp", "    maxconn 9000"]
    if log:
        lines += ["    log global", "    option tcplog"]
    lines += [
        "    timeout connect 5s", "    timeout client 10m", "    timeout server 10m",
        "frontend fe", f"    bind 127.0.0.1:{port}", "    default_backend be",
        "backend be", f"    server s1 127.0.0.1:{backend_port}",
    ]
    cfg.write_text("\n".join(lines) + "\n")
    proc, log_path = children.start(f"haproxy-{tag}", [HAPROXY, "-db", "-f", str(cfg)])
    wait_listening(proc, port, log_path)
    return Target("haproxy", port, proc)


# --- measurements -------------------------------------------------------------------------------

class Watchdog:
    """Bounds a blocking measurement: SIGALRM after *seconds* raises TimeoutError."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __enter__(self) -> Watchdog:
        def fire(signum: int, frame: Any) -> None:
            raise TimeoutError(f"measurement took longer than {self.seconds}s")
        self._old = signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc: Any) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._old)


class CpuMeter:
    """CPU seconds a process used over a measurement, as % of one core."""

    def __init__(self, pid: int | None) -> None:
        self.ps = psutil.Process(pid) if pid else None

    def __enter__(self) -> CpuMeter:
        self.t0 = time.monotonic()
        self.c0 = self._cpu()
        return self

    def _cpu(self) -> float:
        if self.ps is None:
            return 0.0
        t = self.ps.cpu_times()
        return t.user + t.system

    def __exit__(self, *exc: Any) -> None:
        self.seconds = self._cpu() - self.c0
        self.percent = 100 * self.seconds / max(time.monotonic() - self.t0, 1e-9)


def bulk_gbits(port: int, seconds: int) -> float:
    argv = ["iperf3", "-c", HOST, "-p", str(port), "-t", str(seconds), "-O", "1", "-J"]
    for attempt in range(3):
        out = subprocess.run(argv, capture_output=True, timeout=seconds + 20, preexec_fn=_raise_nofile)
        try:
            result = json.loads(out.stdout)
        except json.JSONDecodeError:
            result = {"error": out.stdout.decode(errors="replace")[-300:] + out.stderr.decode()[-300:]}
        if "error" not in result:
            return result["end"]["sum_received"]["bits_per_second"] / 1e9
        if "busy" not in str(result["error"]) or attempt == 2:
            raise RuntimeError(f"iperf3 through port {port}: {result['error']}")
        time.sleep(1)
    raise AssertionError("unreachable")


MSG = b"p" * 64


def ping_pong_us(port: int, count: int, warmup: int) -> list[float]:
    """Round-trip times (µs) of 64 B messages, one at a time on one connection."""
    s = socket.create_connection((HOST, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(64)
    view = memoryview(buf)
    send, recv_into, clock = s.send, s.recv_into, time.perf_counter_ns
    samples = [0] * count
    try:
        for i in range(-warmup, count):
            t0 = clock()
            send(MSG)
            got = 0
            while got < 64:
                n = recv_into(view[got:])
                if not n:
                    raise RuntimeError("connection closed during the ping-pong")
                got += n
            if i >= 0:
                samples[i] = clock() - t0
    finally:
        s.close()
    return [x / 1000 for x in samples]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def sessions_sequential(port: int, count: int) -> tuple[float, int]:
    """Sessions/s of connect, one 64 B echo round trip, close; one after the other."""
    addr = (HOST, port)
    errors = 0
    t0 = time.perf_counter()
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.connect(addr)
            s.send(MSG)
            got = 0
            while got < 64:
                data = s.recv(256)
                if not data:
                    raise ConnectionError("closed early")
                got += len(data)
        except OSError:
            errors += 1
        finally:
            s.close()
    elapsed = time.perf_counter() - t0
    return (count - errors) / elapsed, errors


def sessions_concurrent(port: int, count: int, concurrency: int, budget: float) -> tuple[float, int]:
    """The same sessions, *concurrency* in flight at once, from one epoll loop."""
    addr = (HOST, port)
    epoll = select.epoll()
    EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
    socks: dict[int, list[Any]] = {}  # fd -> [socket, bytes received, connected]
    started = done = errors = 0

    def start_one() -> None:
        nonlocal started, errors
        started += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        err = s.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            errors += 1
            s.close()
            return
        fd = s.fileno()
        socks[fd] = [s, 0, False]
        epoll.register(fd, EPOLLOUT)

    def finish(fd: int, ok: bool) -> None:
        nonlocal done, errors
        epoll.unregister(fd)
        socks.pop(fd)[0].close()
        if ok:
            done += 1
        else:
            errors += 1

    t0 = time.perf_counter()
    deadline = t0 + budget
    for _ in range(min(concurrency, count)):
        start_one()
    while socks:
        if time.perf_counter() > deadline:
            for fd in list(socks):
                finish(fd, False)
            break
        for fd, events in epoll.poll(1.0):
            entry = socks.get(fd)
            if entry is None:
                continue
            s = entry[0]
            if not entry[2]:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    finish(fd, False)
                else:
                    entry[2] = True
                    try:
                        s.send(MSG)
                    except OSError:
                        finish(fd, False)
                    else:
                        epoll.modify(fd, EPOLLIN)
                        continue
            else:
                try:
                    data = s.recv(256)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    entry[1] += len(data)
                    if entry[1] < 64:
                        continue
                    finish(fd, True)
                else:
                    finish(fd, False)
            while len(socks) < concurrency and started < count:
                start_one()
    epoll.close()
    elapsed = time.perf_counter() - t0
    return done / elapsed, errors


def rss_per_session(target: Target, count: int, warmup: int) -> tuple[float, float, float]:
    """(bytes per session, RSS before MiB, RSS after MiB) for *count* idle sessions via *target*."""
    ps = psutil.Process(target.pid)
    addr = (HOST, target.port)

    def open_sessions(n: int) -> list[socket.socket]:
        socks = []
        for _ in range(n):
            s = socket.create_connection(addr)
            socks.append(s)
            s.send(b"x")  # one round trip: the session is linked to the backend at both ends
            if s.recv(16) != b"x":
                raise RuntimeError("no echo on a new session")
        return socks

    for s in open_sessions(warmup):  # lazy imports and first-use allocations are not per session
        s.close()
    time.sleep(0.5)
    before = ps.memory_info().rss
    socks = open_sessions(count)
    try:
        time.sleep(1.0)
        after = ps.memory_info().rss
    finally:
        for s in socks:
            s.close()
    return (after - before) / count, before / 2**20, after / 2**20


# --- the run ------------------------------------------------------------------------------------

def rotated(round_no: int) -> list[str]:
    k = round_no % len(TARGETS)
    return list(TARGETS[k:] + TARGETS[:k])


def say(text: str = "") -> None:
    print(text, flush=True)


def run(args: argparse.Namespace, children: Children) -> dict[str, Any]:
    rounds = args.rounds
    res: dict[str, dict[str, list[float]]] = {}

    def record(figure: str, target: str, value: float) -> None:
        res.setdefault(figure, {}).setdefault(target, []).append(value)

    # 1. bulk ------------------------------------------------------------------------------
    say(f"== 1. bulk throughput, 1 stream, iperf3 -t {args.bulk_seconds} (backend: iperf3 -s)")
    iperf_port = free_port()
    iperf, iperf_log = children.start("iperf3-server", ["iperf3", "-s", "-B", HOST, "-p", str(iperf_port)])
    wait_listening(iperf, iperf_port, iperf_log)
    targets = {
        "direct": Target("direct", iperf_port, None),
        "broker": start_broker(children, iperf_port, "bulk"),
        "haproxy": start_haproxy(children, iperf_port, "bulk", args.haproxy_log),
    }
    for r in range(rounds):
        for name in rotated(r):
            t = targets[name]
            with CpuMeter(t.pid) as cpu:
                gbits = bulk_gbits(t.port, args.bulk_seconds)
            record("bulk", name, gbits)
            if t.pid:
                record("bulk_cpu", name, cpu.percent)
            say(f"   round {r + 1} {name:8s} {gbits:6.2f} Gbit/s"
                + (f"   proxy CPU {cpu.percent:4.0f}%" if t.pid else ""))
    for name in ("broker", "haproxy"):
        children.stop(targets[name].proc)  # type: ignore[arg-type]
    children.stop(iperf)

    # 2.+3. latency and session rate -------------------------------------------------------
    echo_desc = ("sample AppServer, protheus-appserver-sim --no-greeting" if args.backend == "sim"
                 else "bench/echo_backend.py, one Python epoll loop")
    if args.backend == "sim":
        echo, echo_log = children.start("echo-backend", twistd(
            "protheus-appserver-sim", "--port", "tcp:0:interface=127.0.0.1", "--name", "b1",
            "--no-greeting"))
    else:
        echo, echo_log = children.start("echo-backend", [PY, str(HERE / "echo_backend.py")])
    echo_port = wait_logged_port(echo, echo_log)
    targets = {
        "direct": Target("direct", echo_port, None),
        "broker": start_broker(children, echo_port, "echo"),
        "haproxy": start_haproxy(children, echo_port, "echo", args.haproxy_log),
    }
    say(f"== 2. 64 B ping-pong, {args.pings} round trips on one connection (backend: {echo_desc})")
    for name in TARGETS:  # a pass not counted: the first measurement after a quiet spell runs slow
        with Watchdog(60):
            ping_pong_us(targets[name].port, 1000, warmup=0)
    for r in range(rounds):
        for name in rotated(r):
            t = targets[name]
            gc.disable()
            try:
                with Watchdog(60):
                    rtts = ping_pong_us(t.port, args.pings, warmup=300)
            finally:
                gc.enable()
            p50, p99 = percentile(rtts, 50), percentile(rtts, 99)
            record("p50", name, p50)
            record("p99", name, p99)
            say(f"   round {r + 1} {name:8s} p50 {p50:7.1f} µs   p99 {p99:7.1f} µs")

    say(f"== 3. new sessions/s: connect, 64 B echo, close; {args.seq_sessions} sequential, "
        f"{args.conc_sessions} with 50 in flight (backend: {echo_desc})")
    for r in range(rounds):
        for name in rotated(r):
            t = targets[name]
            gc.disable()
            try:
                with CpuMeter(t.pid) as cpu1, Watchdog(60):
                    seq, seq_err = sessions_sequential(t.port, args.seq_sessions)
                time.sleep(0.2)
                with CpuMeter(t.pid) as cpu2:
                    conc, conc_err = sessions_concurrent(t.port, args.conc_sessions, 50, budget=60)
            finally:
                gc.enable()
            record("seq", name, seq)
            record("conc", name, conc)
            if t.pid:
                record("seq_cpu", name, 1e6 * cpu1.seconds / args.seq_sessions)
                record("conc_cpu", name, 1e6 * cpu2.seconds / args.conc_sessions)
            errs = seq_err + conc_err
            if errs:
                record("errors", name, errs)
            say(f"   round {r + 1} {name:8s} sequential {seq:7.0f}/s"
                + (f" (proxy CPU {cpu1.percent:3.0f}%)" if t.pid else " " * 18)
                + f"   50 concurrent {conc:7.0f}/s"
                + (f" (proxy CPU {cpu2.percent:3.0f}%)" if t.pid else "")
                + (f"   {errs} FAILED sessions" if errs else ""))
            time.sleep(0.2)
    for name in ("broker", "haproxy"):
        children.stop(targets[name].proc)  # type: ignore[arg-type]

    # 4. RSS per idle session -------------------------------------------------------------
    say(f"== 4. RSS per idle proxied session, {args.idle_sessions} sessions, a fresh proxy each "
        f"round, {min(rounds, args.rss_rounds)} rounds (backend: {echo_desc})")
    for r in range(min(rounds, args.rss_rounds)):
        for name in rotated(r):
            if name == "direct":
                continue
            proxy = (start_broker(children, echo_port, f"rss{r}") if name == "broker"
                     else start_haproxy(children, echo_port, f"rss{r}", args.haproxy_log))
            try:
                with Watchdog(120):
                    per, before, after = rss_per_session(proxy, args.idle_sessions, warmup=200)
            finally:
                children.stop(proxy.proc)  # type: ignore[arg-type]
            record("rss", name, per)
            say(f"   round {r + 1} {name:8s} {per / 1024:5.2f} KB/session   "
                f"(RSS {before:6.1f} -> {after:6.1f} MiB)")
            time.sleep(0.3)
    children.stop(echo)
    res["_echo_desc"] = echo_desc  # type: ignore[assignment]
    return res


def table(res: dict[str, Any], args: argparse.Namespace) -> str:
    """The markdown table.  Values are medians over rounds; the broker/HAProxy ratio is the median
    of the per-round ratios (the two were measured moments apart, so drift between rounds, up to
    2x on this machine, cancels out)."""
    def values(figure: str, target: str) -> list[float]:
        return res.get(figure, {}).get(target, [])

    def med(xs: list[float]) -> float | None:
        return statistics.median(xs) if xs else None

    def fmt(value: float | None, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    def paired(bs: list[float], hs: list[float]) -> float | None:
        ratios = [b / h for b, h in zip(bs, hs) if h]
        return med(ratios)

    # added latency, per round: the proxy's p50/p99 minus the direct one of the same round
    for q in ("p50", "p99"):
        direct = values(q, "direct")
        for t in ("broker", "haproxy"):
            res.setdefault(f"added_{q}", {})[t] = [x - d for x, d in zip(values(q, t), direct)]
        res[f"added_{q}"]["direct"] = [0.0] * len(direct)

    rows: list[str] = []

    def row(label: str, figure: str, spec: str, scale: float = 1.0, goal: str | None = None,
            show_ratio: bool = True) -> None:
        d, b, h = (values(figure, t) for t in TARGETS)
        ratio = paired(b, h) if show_ratio else None
        cells = [fmt(None if m is None else m * scale, spec) for m in (med(d), med(b), med(h))]
        target_text = verdict = ""
        if goal:
            op, bound = TARGETS_GOALS[goal]
            target_text = f"{'≥' if op == '>=' else '≤'} {bound:g}×"
            if ratio is not None:
                ok = ratio >= bound if op == ">=" else ratio <= bound
                verdict = "met" if ok else "**missed**"
        rows.append(f"| {label} | {' | '.join(cells)} | {fmt(ratio, '.2f')} | {target_text} | {verdict} |")

    row(f"1. bulk, 1 stream, Gbit/s (iperf3 -t {args.bulk_seconds})", "bulk", ".2f", goal="bulk")
    row("   proxy CPU during bulk, % of a core", "bulk_cpu", ".0f", show_ratio=False)
    row("2. 64 B round trip p50, µs", "p50", ".1f")
    row("   64 B round trip p99, µs", "p99", ".1f")
    row("2. **added latency p50, µs** (p50 − direct p50)", "added_p50", ".1f", goal="added")
    row("   added latency p99, µs", "added_p99", ".1f")
    row("3. new sessions/s, sequential", "seq", ".0f", goal="seq")
    row("   proxy CPU per session (sequential), µs", "seq_cpu", ".0f")
    row("3. new sessions/s, 50 concurrent", "conc", ".0f", goal="conc")
    row("   proxy CPU per session (50 concurrent), µs", "conc_cpu", ".0f")
    row(f"4. RSS per idle session, KB ({args.idle_sessions} sessions)", "rss", ".2f",
        scale=1 / 1024, goal="rss")

    head = ("| figure | direct | broker | HAProxy | broker / HAProxy | target | |\n"
            "|---|---:|---:|---:|---:|---|---|")
    notes = [
        f"Medians of {args.rounds} interleaved rounds ({min(args.rounds, args.rss_rounds)} for RSS) "
        f"on 127.0.0.1; {os.cpu_count()} CPUs shared by load generator, proxy and backend. "
        "broker / HAProxy = median of the per-round ratios.",
        "Backends: bulk → `iperf3 -s`; latency, sessions, RSS → " + res["_echo_desc"] + ".",
        f"HAProxy {HAPROXY_VERSION}: `mode tcp`, `nbthread 1`, no splice, "
        + (f"`tune.bufsize {HAPROXY_BUFSIZE}`, " if HAPROXY_BUFSIZE else "default `tune.bufsize` (16 KiB), ")
        + ("per-session log (`option tcplog`) to stdout → file" if args.haproxy_log else "no logging")
        + f"; broker: Python {platform.python_version()}, Twisted {TWISTED_VERSION}, its per-session "
        "info log line to stdout → file.",
        "Added latency = p50 (p99) minus the direct p50 (p99) of the same round. Sessions: connect, "
        "one 64 B echo round trip, close. Proxy CPU = user + system time of the proxy process.",
    ]
    if res.get("errors"):
        notes.append("FAILED sessions: " + ", ".join(
            f"{t} {int(sum(v))}" for t, v in res["errors"].items()))
    return head + "\n" + "\n".join(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def main() -> int:
    global HAPROXY, HAPROXY_BUFSIZE, HAPROXY_VERSION, TWISTED_VERSION
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per figure; medians reported")
    parser.add_argument("--rss-rounds", type=int, default=3, help="rounds of the RSS test (at most --rounds)")
    parser.add_argument("--bulk-seconds", type=int, default=2, help="iperf3 -t (plus 1 s omitted)")
    parser.add_argument("--pings", type=int, default=5000, help="64 B round trips per round")
    parser.add_argument("--seq-sessions", type=int, default=1500)
    parser.add_argument("--conc-sessions", type=int, default=3000)
    parser.add_argument("--idle-sessions", type=int, default=5000)
    parser.add_argument("--backend", choices=("echo", "sim"), default="echo",
                        help="echo: bench/echo_backend.py (default); sim: protheus-appserver-sim")
    parser.add_argument("--no-haproxy-log", dest="haproxy_log", action="store_false",
                        help="run HAProxy without its per-session log line")
    parser.add_argument("--haproxy-bufsize", type=int, default=0,
                        help="HAProxy tune.bufsize (default: HAProxy's own, 16384)")
    parser.add_argument("--haproxy", default=shutil.which("haproxy") or "/usr/sbin/haproxy")
    args = parser.parse_args()

    HAPROXY = args.haproxy
    HAPROXY_BUFSIZE = args.haproxy_bufsize
    if not os.access(HAPROXY, os.X_OK):
        sys.exit(f"bench: haproxy not found ({HAPROXY}); apt-get install haproxy")
    if not shutil.which("iperf3"):
        sys.exit("bench: iperf3 not found; apt-get install iperf3")
    HAPROXY_VERSION = subprocess.run([HAPROXY, "-v"], capture_output=True, text=True).stdout.split()[2]
    import twisted
    TWISTED_VERSION = twisted.__version__
    _raise_nofile()
    needed = 2 * args.idle_sessions + 200
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < needed:
        sys.exit(f"bench: the open-files limit is below {needed}; lower --idle-sessions")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    return run_and_report("bench", f"HAProxy {HAPROXY_VERSION}, iperf3", lambda children: run(args, children),
                          lambda res: table(res, args), "latest.md")


def run_and_report(name: str, tools: str, measure: Callable[["Children"], Any],
                   render: Callable[[Any], str], results_file: str) -> int:
    """The frame of every bench script: the machine line, *measure* with every child stopped by
    pid whatever happens, the Markdown table printed and written to bench/results/."""
    started = time.monotonic()
    say(f"protheus-broker {name}: {platform.node()}, {os.cpu_count()} CPUs, load "
        f"{os.getloadavg()[0]:.2f}; {tools}, Python {platform.python_version()}, "
        f"Twisted {TWISTED_VERSION}")
    with tempfile.TemporaryDirectory(prefix=f"protheus-{name}-") as tmp:
        children = Children(Path(tmp))
        try:
            res = measure(children)
        except KeyboardInterrupt:
            say("\ninterrupted: stopping every process the bench started")
            return 130
        finally:
            children.stop_all()
    text = render(res)
    elapsed = time.monotonic() - started
    say()
    say(text)
    say(f"({elapsed:.0f} s)")
    out = HERE / "results" / results_file
    out.parent.mkdir(exist_ok=True)
    out.write_text(f"# protheus-broker {name}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n{text}"
                   f"\n({elapsed:.0f} s)\n")
    say(f"written to {out.relative_to(ROOT)}")
    return 0


HAPROXY = "haproxy"
HAPROXY_BUFSIZE = 0
HAPROXY_VERSION = "?"
TWISTED_VERSION = "?"

if __name__ == "__main__":
    sys.exit(main())
