"""TLS termination: protheus-broker vs HAProxy 2.6 (``bind ... ssl crt``, ``nbthread 1``), 127.0.0.1 only.

``make bench-tls`` (or ``PYTHONPATH=. python bench/bench_tls.py``).  Both proxies terminate TLS with
the same ECDSA P-256 certificate (made by ``protheus_broker.tls.certs``) and pass plain TCP to the same
backend; the broker is configured with ``SSL_CERTIFICATE``/``SSL_KEY``.  In interleaved rounds (the
order rotates each round), the median of the rounds is reported:

1. throughput: one TLS connection sends ``--megabytes`` MiB to a sink backend that answers once
   it has all of it (TLS 1.3, AES-GCM as negotiated by both);
2. handshakes/s: ``--threads`` client threads each connect, do a full TLS handshake (no session
   resumption), one 64 B echo round trip, and close, for ``--seconds`` seconds.

Ratios are broker / HAProxy (targets: >= 0.5 for both).  The clients are Python's ``ssl`` in this
process (OpenSSL in C), the proxies and backends child processes stopped by pid; load and proxies
share the machine's cores, so compare only figures from the same run.
"""

from __future__ import annotations

import argparse
import os
import socket
import socketserver
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench as base  # noqa: E402  (bench/bench.py: child processes, targets, meters)

HOST = base.HOST
MSG = base.MSG
GOAL = 0.5


# --- the sink backend (a child process: ``bench_tls.py --sink``) ----------------------------------

class _Sink(socketserver.BaseRequestHandler):
    """Reads a 16-digit length, then that many bytes, then answers ``ok``."""

    def handle(self) -> None:
        sock = self.request
        header = b""
        while len(header) < 16:
            data = sock.recv(16 - len(header))
            if not data:
                return
            header += data
        left = int(header)
        buf = bytearray(1 << 20)
        while left > 0:
            n = sock.recv_into(buf)
            if not n:
                return
            left -= n
        sock.sendall(b"ok")


def run_sink() -> None:
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer((HOST, 0), _Sink)
    print(f"sink listening on {HOST}:{server.server_address[1]}", flush=True)
    server.serve_forever()


# --- targets -------------------------------------------------------------------------------------

def start_backend(children: base.Children, name: str, argv: list[str]) -> int:
    proc, log_path = children.start(name, argv)
    return base.wait_logged_port(proc, log_path)


def start_broker(children: base.Children, backend: int, cert: str, key: str, tag: str) -> base.Target:
    ini = children.workdir / f"broker-tls-{tag}.ini"
    ini.write_text(
        "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
        f"REMOTE_SERVER_01 = 127.0.0.1 {backend}\nSORT_METHOD = CONNECTION\nMONITORING_TYPE = DISABLED\n"
        f"MAX_SESSIONS = 20000\nSSL_CERTIFICATE = {cert}\nSSL_KEY = {key}\n")
    proc, log_path = children.start(f"broker-tls-{tag}", base.twistd("protheus-broker", "--config", str(ini)))
    return base.Target("broker", base.wait_logged_port(proc, log_path), proc)


def start_haproxy(children: base.Children, backend: int, pem: str, tag: str) -> base.Target:
    port = base.free_port()
    cfg = children.workdir / f"haproxy-tls-{tag}.cfg"
    cfg.write_text("\n".join([
        "global", "    nbthread 1", "    maxconn 9000", "    ssl-default-bind-options ssl-min-ver TLSv1.2",
        "defaults", "    mode tcp", "    maxconn 9000", "    timeout connect 5s", "    timeout client 1m",
        "    timeout server 1m",
        "frontend fe", f"    bind 127.0.0.1:{port} ssl crt {pem}", "    default_backend be",
        "backend be", f"    server s1 127.0.0.1:{backend}",
    ]) + "\n")
    proc, log_path = children.start(f"haproxy-tls-{tag}", [base.HAPROXY, "-db", "-f", str(cfg)])
    base.wait_listening(proc, port, log_path)
    return base.Target("haproxy", port, proc)


# --- measurements --------------------------------------------------------------------------------

def throughput_gbits(port: int, context: ssl.SSLContext, size: int) -> tuple[float, str]:
    """Gbit/s of *size* bytes over one TLS connection, and the TLS version and cipher used."""
    raw = socket.create_connection((HOST, port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with context.wrap_socket(raw, server_hostname=HOST) as conn:
        chunk = bytes(256 * 1024)
        t0 = time.perf_counter()
        conn.sendall(f"{size:016d}".encode())
        sent = 0
        while sent < size:
            piece = chunk if size - sent >= len(chunk) else chunk[: size - sent]
            conn.sendall(piece)
            sent += len(piece)
        if conn.recv(2) != b"ok":
            raise RuntimeError("the sink did not confirm the transfer")
        elapsed = time.perf_counter() - t0
        used = f"{conn.version()} {conn.cipher()[0]}"  # type: ignore[index]
    return size * 8 / elapsed / 1e9, used


def handshakes_per_s(port: int, context: ssl.SSLContext, seconds: float, threads: int) -> tuple[float, int]:
    """Full TLS handshakes/s (each with one 64 B echo round trip) from *threads* clients."""
    deadline = time.perf_counter() + seconds
    counts = [0] * threads
    errors = [0] * threads

    def client(index: int) -> None:
        while time.perf_counter() < deadline:
            try:
                with context.wrap_socket(socket.create_connection((HOST, port), timeout=10),
                                         server_hostname=HOST) as conn:
                    conn.sendall(MSG)
                    got = 0
                    while got < len(MSG):
                        data = conn.recv(len(MSG) - got)
                        if not data:
                            raise ConnectionError("closed")
                        got += len(data)
                counts[index] += 1
            except OSError:
                errors[index] += 1

    t0 = time.perf_counter()
    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.perf_counter() - t0), sum(errors)


# --- the run -------------------------------------------------------------------------------------

def make_certificates(directory: str) -> tuple[str, str, str, str]:
    """CA, server certificate and key for 127.0.0.1, and HAProxy's combined PEM."""
    from protheus_broker.tls.certs import make_ca, make_cert, write_pair

    ca = make_ca("bench CA")
    write_pair(directory, "ca", ca)
    cert, key = write_pair(directory, "server", make_cert(ca, "bench", ["127.0.0.1"], both=True))
    combined = os.path.join(directory, "haproxy.pem")
    with open(combined, "wb") as out, open(cert, "rb") as c, open(key, "rb") as k:
        out.write(c.read() + k.read())
    return os.path.join(directory, "ca.pem"), cert, key, combined


def run(args: argparse.Namespace, children: base.Children) -> dict[str, Any]:
    ca, cert, key, combined = make_certificates(str(children.workdir))
    context = ssl.create_default_context(cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    sink = start_backend(children, "sink", [base.PY, str(Path(__file__)), "--sink"])
    echo = start_backend(children, "echo", [base.PY, str(HERE / "echo_backend.py")])
    size = args.megabytes * 1024 * 1024
    results: dict[str, dict[str, list[float]]] = {t: {"gbits": [], "cpu": [], "hs": [], "hs_cpu": [],
                                                      "hs_errors": []}
                                                  for t in ("broker", "haproxy")}
    used = ""
    for round_no in range(args.rounds):
        order = ["broker", "haproxy"] if round_no % 2 == 0 else ["haproxy", "broker"]
        for name in order:
            for backend, figure in ((sink, "gbits"), (echo, "hs")):
                tag = f"{name}-{figure}-{round_no}"
                target = (start_broker(children, backend, cert, key, tag) if name == "broker"
                          else start_haproxy(children, backend, combined, tag))
                try:
                    with base.Watchdog(120), base.CpuMeter(target.pid) as meter:
                        if figure == "gbits":
                            gbits, used = throughput_gbits(target.port, context, size)
                            results[name]["gbits"].append(gbits)
                        else:
                            rate, errors = handshakes_per_s(target.port, context, args.seconds, args.threads)
                            results[name]["hs"].append(rate)
                            results[name]["hs_errors"].append(errors)
                    results[name]["cpu" if figure == "gbits" else "hs_cpu"].append(meter.percent)
                finally:
                    children.stop(target.proc)  # type: ignore[arg-type]
            base.say(f"round {round_no + 1} {name}: {results[name]['gbits'][-1]:.2f} Gbit/s, "
                     f"{results[name]['hs'][-1]:.0f} handshakes/s")
    return {"results": results, "cipher": used}


def table(res: dict[str, Any], args: argparse.Namespace) -> str:
    r = res["results"]
    med = {t: {k: statistics.median(v) for k, v in r[t].items() if v} for t in r}
    gb_ratio = med["broker"]["gbits"] / med["haproxy"]["gbits"]
    hs_ratio = med["broker"]["hs"] / med["haproxy"]["hs"]

    per_core = {t: {"gbits": 100 * med[t]["gbits"] / max(med[t]["cpu"], 1e-9),
                    "hs": 100 * med[t]["hs"] / max(med[t]["hs_cpu"], 1e-9)} for t in med}

    def mark(ratio: float) -> str:
        return "meets" if ratio >= GOAL else "MISSES"

    import twisted

    lines = [
        f"TLS termination, 127.0.0.1, medians of {args.rounds} rounds; HAProxy {base.HAPROXY_VERSION} "
        f"(nbthread 1, bind ssl crt), Twisted {twisted.__version__}, {res['cipher']}, ECDSA P-256",
        "",
        "| figure | protheus-broker | HAProxy | ratio broker/HAProxy | target |",
        "|---|---|---|---|---|",
        f"| throughput, 1 connection, {args.megabytes} MiB, Gbit/s | {med['broker']['gbits']:.2f} | "
        f"{med['haproxy']['gbits']:.2f} | {gb_ratio:.2f}x | >= {GOAL}x ({mark(gb_ratio)}) |",
        f"| proxy CPU during it, % of a core | {med['broker']['cpu']:.0f} | {med['haproxy']['cpu']:.0f} | | |",
        f"| Gbit/s per proxy core | {per_core['broker']['gbits']:.2f} | {per_core['haproxy']['gbits']:.2f} | "
        f"{per_core['broker']['gbits'] / per_core['haproxy']['gbits']:.2f}x | |",
        f"| full handshakes/s ({args.threads} client threads, + one 64 B echo) | {med['broker']['hs']:.0f} | "
        f"{med['haproxy']['hs']:.0f} | {hs_ratio:.2f}x | >= {GOAL}x ({mark(hs_ratio)}) |",
        f"| proxy CPU during it, % of a core | {med['broker']['hs_cpu']:.0f} | {med['haproxy']['hs_cpu']:.0f} | | |",
        f"| handshakes per proxy CPU-second | {per_core['broker']['hs']:.0f} | {per_core['haproxy']['hs']:.0f} | "
        f"{per_core['broker']['hs'] / per_core['haproxy']['hs']:.2f}x | |",
        f"| failed handshakes (all rounds) | {sum(r['broker']['hs_errors']):.0f} | "
        f"{sum(r['haproxy']['hs_errors']):.0f} | | |",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure; medians reported")
    parser.add_argument("--megabytes", type=int, default=256, help="MiB sent in the throughput run")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each handshake run")
    parser.add_argument("--threads", type=int, default=4, help="client threads in the handshake run")
    parser.add_argument("--haproxy", default="haproxy", help="the haproxy binary")
    parser.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        run_sink()
        return 0
    base.HAPROXY = args.haproxy
    import subprocess

    base.HAPROXY_VERSION = subprocess.run([args.haproxy, "-v"], capture_output=True, text=True).stdout.split()[2]
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as workdir:
        children = base.Children(Path(workdir))
        try:
            res = run(args, children)
        finally:
            children.stop_all()
    text = table(res, args)
    base.say()
    base.say(text)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "tls-latest.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
