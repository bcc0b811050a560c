"""What the broker screen costs: answer times of its endpoints with many sessions open, and the
price of the first-bytes check on new sessions.  127.0.0.1 only.

``PYTHONPATH=. python bench/bench_screen.py [--sessions 1000 5000] [--rounds 3]``

For each session count, a broker with ``[BROKER_ADMIN]`` (port 0) in front of
``bench/echo_backend.py`` gets that many idle sessions (each after one round trip), then each of
``/api/v1/status``, ``/api/v1/sessions?per_page=500``, ``/metrics`` and the SmartClient port's
``/status`` is fetched 20 times: the median and p99 answer times are printed, and the share of
one core that a page open in a browser (two requests every 2 s) costs.  Then sequential new
sessions/s (connect, 64 B echo, close) with no first-bytes check (``RESUME_ENABLE = 0``,
``PORT_STATUS = 0``), with the resumable-link recogniser only (the default without
``[BROKER_ADMIN]``) and with both recognisers, rounds interleaved.
Every process started is stopped by pid.
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (bench/bench.py: children, ports, sessions_sequential)

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
SCREEN_RE = re.compile(rb"broker screen at http://127\.0\.0\.1:(\d+)/")


def start(children: bench.Children, backend_port: int, tag: str, port_status: bool,
          resume: bool = True) -> tuple[bench.Target, str]:
    ini = children.workdir / f"screen-{tag}.ini"
    ini.write_text(
        "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
        f"REMOTE_SERVER_01 = 127.0.0.1 {backend_port}\nSORT_METHOD = CONNECTION\n"
        f"MONITORING_TYPE = DISABLED\nMAX_SESSIONS = 20000\nRESUME_ENABLE = {1 if resume else 0}\n"
        "[BROKER_ADMIN]\nENDPOINT = tcp:0:interface=127.0.0.1\n"
        f"PORT_STATUS = {1 if port_status else 0}\n"
    )
    proc, log_path = children.start(f"broker-{tag}", bench.twistd("protheus-broker", "--config", str(ini)))
    port = bench.wait_logged_port(proc, log_path)
    deadline = time.monotonic() + 20
    while (match := SCREEN_RE.search(log_path.read_bytes())) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no broker screen line:\n{bench._tail(log_path)}")
        time.sleep(0.05)
    return bench.Target("broker", port, proc), f"http://127.0.0.1:{match.group(1).decode()}"


def open_sessions(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.create_connection((bench.HOST, port))
        s.send(b"x")
        if s.recv(16) != b"x":
            raise RuntimeError("no echo on a new session")
        socks.append(s)
    return socks


def fetch_ms(url: str, times: int) -> tuple[float, float, int]:
    """(median ms, p99 ms, body bytes) of GET *url*."""
    took, size = [], 0
    for _ in range(times):
        t0 = time.perf_counter()
        with NO_PROXY.open(url, timeout=30) as response:
            size = len(response.read())
        took.append((time.perf_counter() - t0) * 1000)
    return statistics.median(took), bench.percentile(took, 99), size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the sessions/s comparison")
    parser.add_argument("--count", type=int, default=2000, help="sessions per sessions/s round")
    args = parser.parse_args()
    bench._raise_nofile()
    import tempfile
    with tempfile.TemporaryDirectory(prefix="bench-screen-") as tmp:
        children = bench.Children(Path(tmp))
        try:
            echo, echo_log = children.start("echo-backend", [bench.PY, str(bench.HERE / "echo_backend.py")])
            backend_port = bench.wait_logged_port(echo, echo_log)
            print("| sessions open | endpoint | median ms | p99 ms | body KiB | page polling, % of a core |")
            print("|---|---|---|---|---|---|")
            for count in args.sessions:
                target, url = start(children, backend_port, f"s{count}", True)
                socks = open_sessions(target.port, count)
                try:
                    page = 0.0
                    for name, full in (("/api/v1/status", url + "/api/v1/status"),
                                       ("/api/v1/sessions?per_page=500", url + "/api/v1/sessions?per_page=500"),
                                       ("/metrics", url + "/metrics"),
                                       ("SmartClient port /status", f"http://127.0.0.1:{target.port}/status")):
                        median, p99, size = fetch_ms(full, 20)
                        if name.startswith("/api/v1/s"):
                            page += median  # the page fetches status and one sessions page
                        share = f"{page / 2000 * 100:.2f}" if name.startswith("/api/v1/sessions") else ""
                        print(f"| {count} | `{name}` | {median:.1f} | {p99:.1f} | {size / 1024:.0f} | {share} |")
                finally:
                    for s in socks:
                        s.close()
                    children.stop(target.proc)  # type: ignore[arg-type]
            shapes = {"no first-bytes check": (False, False), "resumable links": (False, True),
                      "resumable links + status query": (True, True)}
            rates: dict[str, list[float]] = {name: [] for name in shapes}
            for round_no in range(args.rounds):
                names = list(shapes)[round_no % len(shapes):] + list(shapes)[:round_no % len(shapes)]
                for name in names:
                    port_status, resume = shapes[name]
                    tag = f"r{round_no}-{list(shapes).index(name)}"
                    target, _ = start(children, backend_port, tag, port_status, resume)
                    bench.sessions_sequential(target.port, 200)  # warm-up
                    rate, errors = bench.sessions_sequential(target.port, args.count)
                    if errors:
                        raise RuntimeError(f"{name}: {errors} failed sessions")
                    rates[name].append(rate)
                    children.stop(target.proc)  # type: ignore[arg-type]
            base = statistics.median(rates["no first-bytes check"])
            print()
            print(f"new sessions/s, sequential, median of {args.rounds} rounds:")
            for name, values in rates.items():
                rate = statistics.median(values)
                print(f"  {name:32s} {rate:7.0f}  ({rate / base:.3f}x)")
        finally:
            children.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
