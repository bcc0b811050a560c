"""Managed nodes: spawn-to-ready time, and new sessions/s through Unix-socket nodes vs TCP nodes.

``make bench-nodes`` (or ``PYTHONPATH=. python bench/bench_nodes.py``).  Each round starts, for each
transport (the order rotates), a broker whose ``[BALANCE_SMART_CLIENT_DESKTOP]`` manages two sample
AppServers (``protheus-appserver-sim --no-greeting``, over ``TCP`` or ``UNIX``); it reads each node's
spawn-to-ready time from the broker's log (``ready in N s``: from spawnProcess to the first accepted
connection), then measures new sessions/s through the broker (connect, one 64 B echo round trip,
close), sequential and 50 concurrent.  Medians over the rounds; the UNIX/TCP ratios are the
medians of the per-round ratios.  Every broker is stopped by pid
(it stops its nodes); any node pid it logged is killed afterwards in case.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench as base  # noqa: E402  (bench/bench.py: child processes, meters, helpers)

TRANSPORTS = ("TCP", "UNIX")
READY_RE = re.compile(rb"node (\d+) starting -> active: ready in ([\d.]+)s")
PID_RE = re.compile(rb"node \d+: pid (\d+):")


def start_broker(children: base.Children, transport: str, tag: str) -> tuple[Any, Path, int]:
    """A broker managing two sample AppServer nodes over *transport*; its port once both are ready."""
    wrapper = children.workdir / "twistd_run.py"
    wrapper.write_text("from twisted.scripts.twistd import run\nrun()\n")
    where = ("--unix {socket}" if transport == "UNIX" else "--port tcp:{port}:interface=127.0.0.1")
    sockets = children.workdir / f"s{tag}"
    ini = children.workdir / f"broker-{tag}.ini"
    ini.write_text(
        "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
        "SORT_METHOD = CONNECTION\nMONITORING_TYPE = DISABLED\nMAX_SESSIONS = 20000\n"
        f"NODE_COMMAND = {base.PY} {wrapper} -n --pidfile= protheus-appserver-sim {where} "
        "--no-greeting --name node{id}\n"
        f"TRANSPORT = {transport}\nSOCKET_DIR = {sockets}\nBASE_PORT = {random.randrange(20000, 32000, 10)}\n"
        "MIN_NODES = 2\nMAX_NODES = 2\nSESSIONS_PER_NODE = 100000\nSTART_TIMEOUT = 30\n")
    proc, log_path = children.start(f"broker-{tag}", base.twistd("protheus-broker", "--config", str(ini)))
    port = base.wait_logged_port(proc, log_path)
    deadline = base.time.monotonic() + 30
    while len(READY_RE.findall(log_path.read_bytes())) < 2:
        if base.time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"broker-{tag}: nodes not ready:\n{base._tail(log_path)}")
        base.time.sleep(0.05)
    return proc, log_path, port


def kill_nodes(log_path: Path) -> None:
    for pid in {int(p) for p in PID_RE.findall(log_path.read_bytes())}:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def run(args: argparse.Namespace, children: base.Children) -> dict[str, Any]:
    res: dict[str, dict[str, list[float]]] = {t: {"ready": [], "seq": [], "conc": [], "errors": []}
                                              for t in TRANSPORTS}
    for round_no in range(args.rounds):
        order = TRANSPORTS if round_no % 2 == 0 else TRANSPORTS[::-1]
        for transport in order:
            proc, log_path, port = start_broker(children, transport, f"{transport.lower()}{round_no}")
            try:
                res[transport]["ready"] += [float(s) for _, s in READY_RE.findall(log_path.read_bytes())]
                base.sessions_sequential(port, 200)  # warm-up
                seq, seq_errors = base.sessions_sequential(port, args.sessions)
                conc, conc_errors = base.sessions_concurrent(port, args.sessions, 50, 60.0)
                res[transport]["seq"].append(seq)
                res[transport]["conc"].append(conc)
                res[transport]["errors"].append(float(seq_errors + conc_errors))
                base.say(f"round {round_no + 1} {transport}: ready "
                         f"{', '.join(f'{x * 1000:.0f} ms' for x in res[transport]['ready'][-2:])}; "
                         f"{seq:.0f} sessions/s sequential, {conc:.0f} concurrent, "
                         f"{seq_errors + conc_errors} errors")
            finally:
                children.stop(proc)
                kill_nodes(log_path)
    return res


def table(res: dict[str, Any]) -> str:
    def med(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")
    lines = ["| nodes over | spawn-to-ready p50 | max | sessions/s sequential | sessions/s 50 concurrent | errors |",
             "|---|---:|---:|---:|---:|---:|"]
    for transport in TRANSPORTS:
        r = res[transport]
        lines.append(f"| {transport} | {med(r['ready']) * 1000:.0f} ms | {max(r['ready'], default=0) * 1000:.0f} ms "
                     f"| {med(r['seq']):.0f} | {med(r['conc']):.0f} | {sum(r['errors']):.0f} |")
    tcp, unix = res["TCP"], res["UNIX"]
    if tcp["seq"] and unix["seq"]:  # each round ran both: the median of the per-round ratios
        seq = [u / t for u, t in zip(unix["seq"], tcp["seq"])]
        conc = [u / t for u, t in zip(unix["conc"], tcp["conc"])]
        lines.append("")
        lines.append(f"UNIX / TCP (median of {len(seq)} per-round ratios): {med(seq):.2f}x sequential, "
                     f"{med(conc):.2f}x concurrent")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=2000, help="sessions per measurement")
    args = parser.parse_args()
    import twisted
    base.TWISTED_VERSION = twisted.__version__
    return base.run_and_report("bench-nodes", "sample AppServer nodes", lambda children: run(args, children),
                               table, "nodes-latest.md")


if __name__ == "__main__":
    sys.exit(main())
