"""Scale to zero: how long a login to a sleeping pool waits for its first AppServer byte.

``PYTHONPATH=. python bench/bench_wake.py [--rounds 5] [--burst 20]``.  One broker whose
``[BALANCE_SMART_CLIENT_DESKTOP]`` manages sample AppServer nodes (TCP) with ``MIN_NODES = 0``,
``SCALE_TO_ZERO = 1`` and ``ZERO_IDLE_TIME = 1``.  Each round waits until the pool is asleep (no
node), then:

* **cold**: one login (connect, send 4 KiB at once, read the greeting and the echo, byte-exact);
  time from connect to the first AppServer byte, beside the node's spawn-to-ready time from the
  broker's log (``ready in N s``: spawnProcess to the first accepted connection) and the
  controller's wake-to-ready (``woke in N s``); *overhead* = first byte - spawn-to-ready;
* **warm**: a second login right after, to the node now awake;
* every other round, a **burst**: ``--burst`` logins at once to the sleeping pool (all held,
  one wake, all released).

The broker is stopped by pid (it stops its nodes); any node pid it logged is killed afterwards.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench as base  # noqa: E402  (bench/bench.py: child processes, meters, helpers)

READY_RE = re.compile(rb"node (\d+) starting -> active: ready in ([\d.]+)s")
WOKE_RE = re.compile(rb"woke in ([\d.]+)s")
ENDED_RE = re.compile(rb"node \d+ ended")
STARTING_RE = re.compile(rb"starting node \d+")
PID_RE = re.compile(rb"node \d+: pid (\d+):")


def start_broker(children: base.Children) -> tuple[Any, Path, int]:
    wrapper = children.workdir / "twistd_run.py"
    wrapper.write_text("from twisted.scripts.twistd import run\nrun()\n")
    ini = children.workdir / "broker-wake.ini"
    ini.write_text(
        "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
        "SORT_METHOD = CONNECTION\nMONITORING_TYPE = DISABLED\n"
        f"NODE_COMMAND = {base.PY} {wrapper} -n --pidfile= protheus-appserver-sim "
        "--port tcp:{port}:interface=127.0.0.1 --name node{id}\n"
        f"BASE_PORT = {random.randrange(20000, 32000, 10)}\nMIN_NODES = 0\nMAX_NODES = 2\n"
        "SESSIONS_PER_NODE = 1000\nSTART_TIMEOUT = 30\nPOLL_INTERVAL = 0.5\nIDLE_TIME = 1\n"
        "SCALE_TO_ZERO = 1\nZERO_IDLE_TIME = 1\nWAKE_TIMEOUT = 60\nMAX_HELD = 500\n")
    proc, log_path = children.start("broker-wake", base.twistd("protheus-broker", "--config", str(ini)))
    return proc, log_path, base.wait_logged_port(proc, log_path)


def kill_nodes(log_path: Path) -> None:
    for pid in {int(p) for p in PID_RE.findall(log_path.read_bytes())}:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def wait_asleep(log_path: Path, timeout: float = 30.0) -> None:
    """Until every node started has ended."""
    deadline = time.monotonic() + timeout
    while True:
        text = log_path.read_bytes()
        if len(ENDED_RE.findall(text)) >= len(STARTING_RE.findall(text)):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pool did not go to sleep:\n{base._tail(log_path)}")
        time.sleep(0.05)


def login(port: int, size: int, seed: int) -> tuple[float, bool]:
    """(seconds from connect to the first AppServer byte, echo byte-exact)."""
    payload = random.Random(seed).randbytes(size)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        started = time.monotonic()
        sock.sendall(payload)
        data = sock.recv(65536)
        first = time.monotonic() - started
        while b"\r\n" not in data:
            more = sock.recv(65536)
            if not more:
                return first, False
            data += more
        _, _, echoed = data.partition(b"\r\n")
        while len(echoed) < size:
            more = sock.recv(65536)
            if not more:
                break
            echoed += more
    return first, echoed == payload


def run(args: argparse.Namespace, children: base.Children) -> dict[str, Any]:
    res: dict[str, list[float]] = {"cold": [], "ready": [], "woke": [], "overhead": [], "warm": [],
                                   "burst": [], "errors": []}
    proc, log_path, port = start_broker(children)
    try:
        for round_no in range(args.rounds):
            wait_asleep(log_path)
            seen_ready = len(READY_RE.findall(log_path.read_bytes()))
            seen_woke = len(WOKE_RE.findall(log_path.read_bytes()))
            if round_no % 2 == 1 and args.burst:
                results: list[tuple[float, bool]] = []
                lock = threading.Lock()

                def one(n: int) -> None:
                    try:
                        outcome = login(port, 4096, n)
                    except OSError:
                        outcome = (float("nan"), False)
                    with lock:
                        results.append(outcome)
                threads = [threading.Thread(target=one, args=(n,)) for n in range(args.burst)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                res["burst"] += [r[0] for r in results if r[1]]
                res["errors"].append(float(sum(1 for r in results if not r[1])))
                base.say(f"round {round_no + 1}: burst of {args.burst} to a sleeping pool: first byte p50 "
                         f"{statistics.median([r[0] for r in results]) * 1000:.0f} ms, max "
                         f"{max(r[0] for r in results) * 1000:.0f} ms, "
                         f"{sum(1 for r in results if not r[1])} errors")
            else:
                first, ok = login(port, 4096, round_no)
                text = log_path.read_bytes()
                ready = float(READY_RE.findall(text)[seen_ready][1])
                woke = float(WOKE_RE.findall(text)[seen_woke])
                warm, warm_ok = login(port, 4096, 1000 + round_no)
                res["cold"].append(first)
                res["ready"].append(ready)
                res["woke"].append(woke)
                res["overhead"].append(first - ready)
                res["warm"].append(warm)
                res["errors"].append(float((not ok) + (not warm_ok)))
                base.say(f"round {round_no + 1}: cold login first byte {first * 1000:.0f} ms (node spawn-to-ready "
                         f"{ready * 1000:.0f} ms, wake-to-ready {woke * 1000:.0f} ms, overhead "
                         f"{(first - ready) * 1000:+.1f} ms); warm {warm * 1000:.1f} ms; "
                         f"byte-exact {ok and warm_ok}")
    finally:
        children.stop(proc)
        kill_nodes(log_path)
    return res


def table(res: dict[str, list[float]]) -> str:
    def p50(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:.1f} ms" if values else "–"

    def top(values: list[float]) -> str:
        return f"{max(values) * 1000:.1f} ms" if values else "–"
    lines = ["| measure | p50 | max | n |", "|---|---:|---:|---:|"]
    for key, label in (("cold", "cold login: connect -> first AppServer byte"),
                       ("ready", "node spawn -> ready (broker log)"),
                       ("woke", "wake request -> ready member (controller)"),
                       ("overhead", "cold first byte - node spawn-to-ready"),
                       ("warm", "warm login (node awake): connect -> first byte"),
                       ("burst", "burst to a sleeping pool: each login's first byte")):
        lines.append(f"| {label} | {p50(res[key])} | {top(res[key])} | {len(res[key])} |")
    lines.append("")
    lines.append(f"errors (not byte-exact or refused): {sum(res['errors']):.0f}; target: cold first byte <= "
                 f"spawn-to-ready + 100 ms (max overhead {top(res['overhead'])})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--burst", type=int, default=20, help="logins at once in every other round (0: none)")
    args = parser.parse_args()
    import twisted
    base.TWISTED_VERSION = twisted.__version__
    return base.run_and_report("bench-wake", "sample AppServer nodes, scale to zero",
                               lambda children: run(args, children), table, "wake-latest.md")


if __name__ == "__main__":
    sys.exit(main())
